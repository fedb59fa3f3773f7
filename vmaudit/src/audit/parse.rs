//! Reading libvirt's VIRT_* records back: an audit.log line (`type=... msg=audit(...): ...
//! msg='...'`) or a record's text, in every encoding libvirt and libaudit have used.
//!
//! A value is `name="text"`, `name='text'` (the single-quoted form of old libaudit), upper-case
//! hex for the fields libaudit encodes (`vm`, `path`, `cgroup`, `old-*`/`new-*`, `device`,
//! `exe`) when their text needed it, `name=?` or `name="?"` when missing, or raw. Raw fields
//! (`maj=88`, `acl=rw`) can look like hex, so hex is decoded only for the encoded fields.
//! Malformed or truncated input is an error, never a panic.

use thiserror::Error;

/// Why a line or text is not a record.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not an audit.log record line (no `type=`)")]
    NoType,
    #[error("no `msg=audit(SECS.MSEC:SERIAL):` stamp")]
    NoStamp,
    #[error("an unterminated quoted value for {field:?}")]
    Unterminated { field: String },
    #[error("a field without a name at byte {at}")]
    NoName { at: usize },
}

/// The kernel's stamp of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub secs: u64,
    pub msec: u32,
    pub serial: u64,
}

/// One field's value, as written and decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Quoted(String),
    /// Hex-encoded bytes, decoded (lossily, as UTF-8).
    Hex(String),
    Raw(String),
    /// `?` or `"?"`.
    Missing,
}

impl Value {
    /// The value's text, decoded; None when missing.
    pub fn text(&self) -> Option<&str> {
        match self {
            Self::Quoted(s) | Self::Hex(s) | Self::Raw(s) => Some(s),
            Self::Missing => None,
        }
    }
}

/// A parsed record: its type name, stamp, the sender's fields, and the text's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub kind: String,
    pub stamp: Stamp,
    /// `pid`, `uid`, `auid`, `ses` (and `subj` when an LSM runs) of the sender.
    pub sender: Vec<(String, Value)>,
    /// The text's fields (libvirt's, libaudit's, any vmaudit-*), in order.
    pub fields: Vec<(String, Value)>,
}

impl Parsed {
    /// A field of the text, decoded.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.text())
    }

    pub fn sender_pid(&self) -> Option<u32> {
        self.sender
            .iter()
            .find(|(k, _)| k == "pid")
            .and_then(|(_, v)| v.text()?.parse().ok())
    }
}

/// Fields libaudit hex-encodes when their text needs it.
fn is_encoded(name: &str) -> bool {
    matches!(
        name,
        "vm" | "path" | "cgroup" | "device" | "exe" | "vm-ctx" | "img-ctx" | "model"
    ) || name.starts_with("old-")
        || name.starts_with("new-")
}

fn decode_hex(v: &str) -> Option<String> {
    if v.is_empty() || !v.len().is_multiple_of(2) || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..v.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&v[i..i + 2], 16).ok())
        .collect();
    bytes.map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Parses a record's text (`virt=kvm resrc=net ... res=success`) into fields.
pub fn parse_text(text: &str) -> Result<Vec<(String, Value)>, ParseError> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && b[i] != b' ' {
            i += 1;
        }
        let name = &text[start..i];
        if name.is_empty() {
            return Err(ParseError::NoName { at: start });
        }
        if i >= b.len() || b[i] == b' ' {
            // A bare word: a field with no value.
            out.push((name.to_owned(), Value::Missing));
            continue;
        }
        i += 1; // '='
        let value = if i < b.len() && (b[i] == b'"' || b[i] == b'\'') {
            let q = b[i];
            let vstart = i + 1;
            let end = text[vstart..]
                .find(q as char)
                .ok_or_else(|| ParseError::Unterminated {
                    field: name.to_owned(),
                })?;
            i = vstart + end + 1;
            let v = &text[vstart..vstart + end];
            if v == "?" {
                Value::Missing
            } else {
                Value::Quoted(v.to_owned())
            }
        } else {
            let vstart = i;
            while i < b.len() && b[i] != b' ' {
                i += 1;
            }
            let v = &text[vstart..i];
            match (v, is_encoded(name).then(|| decode_hex(v)).flatten()) {
                ("?", _) => Value::Missing,
                (_, Some(decoded)) => Value::Hex(decoded),
                _ => Value::Raw(v.to_owned()),
            }
        };
        out.push((name.to_owned(), value));
    }
    Ok(out)
}

/// Parses an audit.log line, RAW or ENRICHED (the enriched part after `\x1d` is ignored).
pub fn parse_line(line: &str) -> Result<Parsed, ParseError> {
    let line = line.split('\u{1d}').next().unwrap_or_default().trim_end();
    let rest = line.strip_prefix("type=").ok_or(ParseError::NoType)?;
    let (kind, rest) = rest.split_once(' ').ok_or(ParseError::NoStamp)?;
    let rest = rest.strip_prefix("msg=audit(").ok_or(ParseError::NoStamp)?;
    let (stamp, rest) = rest.split_once("):").ok_or(ParseError::NoStamp)?;
    let (time, serial) = stamp.split_once(':').ok_or(ParseError::NoStamp)?;
    let (secs, msec) = time.split_once('.').ok_or(ParseError::NoStamp)?;
    let stamp = Stamp {
        secs: secs.parse().map_err(|_| ParseError::NoStamp)?,
        msec: msec.parse().map_err(|_| ParseError::NoStamp)?,
        serial: serial.parse().map_err(|_| ParseError::NoStamp)?,
    };
    let (sender, text) = match rest.split_once(" msg='") {
        Some((s, t)) => (
            s,
            t.strip_suffix('\'')
                .ok_or_else(|| ParseError::Unterminated {
                    field: "msg".into(),
                })?,
        ),
        None => (rest, ""),
    };
    Ok(Parsed {
        kind: kind.to_owned(),
        stamp,
        sender: parse_text(sender)?,
        fields: parse_text(text)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../../tests/fixtures/libvirt-9.0-audit.log");

    #[test]
    fn every_record_libvirt_wrote_parses() {
        let mut n = 0;
        for line in FIXTURE.lines().filter(|l| !l.trim().is_empty()) {
            let p = parse_line(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert!(p.kind.starts_with("VIRT_"), "{line}");
            assert_eq!(p.get("virt"), Some("qemu"));
            assert!(p.get("uuid").is_some() && p.get("vm").is_some(), "{line}");
            assert_eq!(p.get("exe"), Some("/usr/sbin/libvirtd"));
            assert!(p.sender_pid().is_some());
            n += 1;
        }
        assert_eq!(n, 20);
        let open =
            parse_line(FIXTURE.lines().find(|l| l.contains("reason=open")).unwrap()).unwrap();
        assert_eq!(
            (open.get("path"), open.get("rdev"), open.get("net")),
            (
                Some("/dev/net/tun"),
                Some("0A:C8"),
                Some("52:54:00:1b:00:01")
            )
        );
        let pty = parse_line(
            FIXTURE
                .lines()
                .find(|l| l.contains("category=pty"))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            (pty.get("maj"), pty.get("acl")),
            (Some("88"), Some("rw")),
            "raw fields that look like hex stay raw"
        );
        let start = parse_line(
            FIXTURE
                .lines()
                .find(|l| l.contains("reason=start") && l.contains("resrc=net"))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            (start.get("old-net"), start.get("new-net")),
            (None, Some("52:54:00:1b:00:01"))
        );
    }

    #[test]
    fn every_encoding() {
        // Hex for an encoded field (a VM name with a space), the old single-quoted form, "?".
        let f = parse_text("virt=kvm resrc=net reason=open vm=6D7920766D uuid=u net=52:54:00:00:00:01 path='/dev/net/tun' rdev=? old-net=\"?\"").unwrap();
        let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("vm"), Some(Value::Hex("my vm".into())));
        assert_eq!(get("path"), Some(Value::Quoted("/dev/net/tun".into())));
        assert_eq!(get("rdev"), Some(Value::Missing));
        assert_eq!(get("old-net"), Some(Value::Missing));
        assert_eq!(get("net"), Some(Value::Raw("52:54:00:00:00:01".into())));
    }

    /// Truncated and mangled input is refused or parsed, never a panic (every prefix and
    /// every single-byte corruption of every fixture line).
    #[test]
    fn truncated_and_mangled_lines_never_panic() {
        for line in FIXTURE.lines().take(8) {
            for cut in 0..line.len() {
                if line.is_char_boundary(cut) {
                    let _ = parse_line(&line[..cut]);
                }
            }
            let bytes = line.as_bytes();
            for at in (0..bytes.len()).step_by(3) {
                for b in [b'\'', b'"', b'=', b' ', b')', b':'] {
                    let mut m = bytes.to_vec();
                    m[at] = b;
                    let _ = parse_line(&String::from_utf8_lossy(&m));
                }
            }
        }
        assert_eq!(parse_line("type=VIRT_RESOURCE"), Err(ParseError::NoStamp));
        assert_eq!(parse_line("garbage"), Err(ParseError::NoType));
        assert!(matches!(
            parse_text("vm=\"unterminated"),
            Err(ParseError::Unterminated { .. })
        ));
    }
}
