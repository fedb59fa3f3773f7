//! Any bytes as an audit.log line, a kernel record and a whole log: a record or an error,
//! never a panic; and what parses keeps its invariants.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmaudit_core::audit::parse::{LogScan, parse_kernel, parse_line};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(p) = parse_line(&text) {
        // The typed view reads any record.
        let v = p.virt();
        if let Some(mac) = v.mac {
            assert_eq!(mac, mac.to_ascii_lowercase());
        }
        let _ = (p.type_id(), p.sender_pid(), p.node(), p.unix_ns());
    }
    let kind = data
        .first()
        .map_or(2501, |b| 2500 + u16::from(*b % 4));
    let _ = parse_kernel(kind, &text);
    let scan = LogScan::scan(&text);
    assert!(scan.records.len() + scan.errors.len() <= text.lines().count());
    let _ = scan.summary();
});
