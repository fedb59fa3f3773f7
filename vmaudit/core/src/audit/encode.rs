//! libaudit's value encoding (`audit_encode_nv_string`), the fields libvirt writes raw, and
//! the checks every complete record text must pass.
//!
//! An encoded field is `name="value"`, or `name=HEX` (upper case, every byte, no quotes) when
//! any byte of the value is `"`, below 0x21 (space and control), 0x7F, or 0x80 and above
//! (libaudit compares a signed `char`, so UTF-8 bytes count as "below 0x21"). A missing value
//! is `name="?"`. Raw fields (`uuid`, `reason`, `net`, `rdev`, `maj`, `acl`, `class`,
//! `category`, `vm-pid`, `virt`, `resrc`, `op`) are written as they are, so they must be
//! made of bytes that need no encoding.

use std::fmt::Write as _;

use thiserror::Error;

use crate::fd::DevNum;

/// The most text the kernel logs of one user message (`AUDIT_MESSAGE_TEXT_MAX`): anything
/// longer would be cut silently, so longer records are refused.
pub const MAX_TEXT: usize = 8560;

/// Why a field or a record text cannot be written.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error(
        "field {field}: {value:?} cannot be written unencoded (empty, or a byte needs encoding)"
    )]
    Raw { field: String, value: String },
    #[error("{name:?} is not an audit field name (letters, digits, '-' and '_' only)")]
    Name { name: String },
    #[error("the record has a single quote at byte {at}, which would end the kernel's msg='...'")]
    SingleQuote { at: usize },
    #[error("the record is {len} bytes, over the kernel's limit of {max}")]
    TooLong { len: usize, max: usize },
}

/// Whether libaudit would hex-encode this value (`audit_value_needs_encoding`).
pub fn needs_encoding(value: &[u8]) -> bool {
    value
        .iter()
        .any(|&b| b == b'"' || !(0x21..0x7F).contains(&b))
}

/// Every byte as two upper-case hex digits (`audit_encode_value`).
pub fn hex_upper(value: &[u8]) -> String {
    let mut s = String::with_capacity(value.len() * 2);
    for b in value {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02X}");
    }
    s
}

/// `name="value"`, `name=HEX` or, for a missing value, `name="?"`.
pub fn encode_nv(name: &str, value: Option<&str>) -> String {
    encode_nv_bytes(name, value.map(str::as_bytes))
}

/// [`encode_nv`] for a value that need not be UTF-8 (a path, the executable).
pub fn encode_nv_bytes(name: &str, value: Option<&[u8]>) -> String {
    match value {
        Some(v) if needs_encoding(v) => format!("{name}={}", hex_upper(v)),
        Some(v) => format!("{name}=\"{}\"", String::from_utf8_lossy(v)),
        None => format!("{name}=\"?\""),
    }
}

/// `name=value` for a field libvirt writes raw; refused when the value is empty or has a byte
/// that would need encoding (it would break the record's parsing).
pub fn raw(name: &str, value: &str) -> Result<String, EncodeError> {
    check_name(name)?;
    if value.is_empty() || needs_encoding(value.as_bytes()) || value.contains('\'') {
        return Err(EncodeError::Raw {
            field: name.to_owned(),
            value: value.to_owned(),
        });
    }
    Ok(format!("{name}={value}"))
}

/// A field name vmaudit may add: ASCII letters, digits, `-` and `_`, not empty.
pub fn check_name(name: &str) -> Result<(), EncodeError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(EncodeError::Name {
            name: name.to_owned(),
        })
    }
}

/// libvirt's `rdev` value: `%02X:%02X` of major:minor (upper-case hex, at least two digits),
/// or `?` when the file is not a device.
pub fn rdev(dev: Option<DevNum>) -> String {
    dev.map_or_else(|| "?".to_owned(), DevNum::libvirt_hex)
}

/// The device number of `path` if it is a character or block device (libvirt stats the path,
/// following links), `None` otherwise or when it cannot be stat'ed.
pub fn rdev_of(path: &std::path::Path) -> Option<DevNum> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let meta = std::fs::metadata(path).ok()?;
    let ft = meta.file_type();
    (ft.is_char_device() || ft.is_block_device()).then(|| DevNum::from_raw(meta.rdev()))
}

/// Checks a complete record text: no single quote (the kernel wraps it in `msg='...'`) and
/// no more than [`MAX_TEXT`] bytes.
pub fn check_text(text: &str) -> Result<(), EncodeError> {
    if let Some(at) = text.find('\'') {
        return Err(EncodeError::SingleQuote { at });
    }
    if text.len() > MAX_TEXT {
        return Err(EncodeError::TooLong {
            len: text.len(),
            max: MAX_TEXT,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_values_are_quoted() {
        assert_eq!(encode_nv("vm", Some("guest1")), r#"vm="guest1""#);
        assert_eq!(
            encode_nv("path", Some("/dev/net/tun")),
            r#"path="/dev/net/tun""#
        );
        // libaudit quotes a value with a single quote; check_text refuses the record.
        assert_eq!(encode_nv("vm", Some("it's")), r#"vm="it's""#);
        assert_eq!(encode_nv("vm", Some("")), r#"vm="""#);
    }

    #[test]
    fn missing_value_is_question_mark() {
        assert_eq!(encode_nv("old-net", None), r#"old-net="?""#);
    }

    #[test]
    fn hex_for_space_quote_control_del_and_utf8() {
        assert_eq!(encode_nv("vm", Some("a b")), "vm=612062");
        assert_eq!(encode_nv("vm", Some("a\"b")), "vm=612262");
        assert_eq!(encode_nv("vm", Some("a\tb")), "vm=610962");
        assert_eq!(encode_nv("vm", Some("a\nb")), "vm=610A62");
        assert_eq!(encode_nv("vm", Some("a\x7fb")), "vm=617F62");
        assert_eq!(encode_nv("vm", Some("é")), "vm=C3A9");
        assert_eq!(encode_nv_bytes("exe", Some(b"/x\xff")), "exe=2F78FF");
        // 0x21 ('!') and 0x7E ('~') are the printable bounds: quoted.
        assert_eq!(encode_nv("vm", Some("!~")), r#"vm="!~""#);
    }

    #[test]
    fn raw_fields() {
        assert_eq!(
            raw("net", "52:54:00:aa:bb:cc").unwrap(),
            "net=52:54:00:aa:bb:cc"
        );
        for bad in ["", "a b", "x\"", "it's", "é"] {
            assert!(
                matches!(raw("virt", bad), Err(EncodeError::Raw { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(raw("a b", "x"), Err(EncodeError::Name { .. })));
    }

    #[test]
    fn rdev_is_libvirt_hex() {
        let d = |major, minor| Some(DevNum { major, minor });
        assert_eq!(rdev(d(10, 200)), "0A:C8");
        assert_eq!(rdev(d(1, 3)), "01:03");
        assert_eq!(rdev(d(10, 238)), "0A:EE");
        assert_eq!(rdev(d(10, 232)), "0A:E8");
        assert_eq!(rdev(d(262, 1)), "106:01");
        assert_eq!(rdev(d(246, 4096)), "F6:1000");
        assert_eq!(rdev(None), "?");
    }

    #[test]
    fn rdev_of_stats_devices_only() {
        assert_eq!(rdev(rdev_of("/dev/null".as_ref())), "01:03");
        assert_eq!(rdev_of("/".as_ref()), None);
        assert_eq!(rdev_of("/nonexistent/vmaudit".as_ref()), None);
    }

    #[test]
    fn text_checks() {
        assert_eq!(check_text("virt=kvm vm=\"a\""), Ok(()));
        assert_eq!(
            check_text("vm=\"it's\""),
            Err(EncodeError::SingleQuote { at: 6 })
        );
        assert_eq!(check_text(&"x".repeat(MAX_TEXT)), Ok(()));
        assert_eq!(
            check_text(&"x".repeat(MAX_TEXT + 1)),
            Err(EncodeError::TooLong {
                len: MAX_TEXT + 1,
                max: MAX_TEXT
            })
        );
    }
}
