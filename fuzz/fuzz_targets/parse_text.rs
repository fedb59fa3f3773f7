//! Any bytes as a record's text (`virt=kvm resrc=net ...`): fields or an error, never a
//! panic; every field has a name.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmaudit_core::audit::parse::{Value, parse_text};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(fields) = parse_text(&text) {
        for (name, value) in &fields {
            assert!(!name.is_empty() && !name.contains(' ') && !name.contains('='));
            if let Value::Raw(v) = value {
                assert!(!v.contains(' '), "a raw value ends at a space");
            }
        }
    }
});
