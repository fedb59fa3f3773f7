//! Reading libvirt's VIRT_* records back: an audit.log line (`type=... msg=audit(...): ...
//! msg='...'`), a record the kernel multicasts ([`parse_kernel`]), or a record's text, in
//! every encoding libvirt and libaudit have used.
//!
//! Lines: `[node=HOST ]type=NAME msg=audit(SECS.MSEC:SERIAL): SENDER msg='TEXT'`, where NAME
//! is `VIRT_RESOURCE` or the numeric form auditd writes for a type it has no name for
//! (`UNKNOWN[2501]`), or the kernel's printk form `type=2501 audit(...): ...` (dmesg, with
//! any `audit: ` prefix removed). `node=` (auditd's `name_format`) is kept as the first
//! sender field.
//!
//! A value is `name="text"`, `name='text'` (the single-quoted form of old libaudit), upper-case
//! hex for the fields libaudit encodes (`vm`, `path`, `cgroup`, `old-*`/`new-*`, `device`,
//! `exe`) when their text needed it, `name=?` or `name="?"` when missing, or raw. Raw fields
//! (`maj=88`, `acl=rw`) can look like hex, so hex is decoded only for the encoded fields.
//! Malformed or truncated input is an error, never a panic.

use thiserror::Error;

use super::{type_id, type_name};
pub use crate::time::Stamp;

/// Why a line or text is not a record.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
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

impl ParseError {
    /// A short name for counting errors by kind: `no-type`, `no-stamp`, `unterminated`,
    /// `no-name`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoType => "no-type",
            Self::NoStamp => "no-stamp",
            Self::Unterminated { .. } => "unterminated",
            Self::NoName { .. } => "no-name",
        }
    }
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
    /// The record's text as sent (inside `msg='...'`).
    pub text: String,
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

    /// A field of the text as written (quoted, hex, raw or missing), decoded.
    pub fn field_value(&self, name: &str) -> Option<&Value> {
        self.fields.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// The message type's number: from the name (`VIRT_RESOURCE`), the numeric name auditd
    /// writes for types it does not know (`UNKNOWN[2501]`), or the printk form (`2501`).
    pub fn type_id(&self) -> Option<u16> {
        type_id(&self.kind)
    }

    /// The node (`node=HOST`) that logged the record, when auditd names it.
    pub fn node(&self) -> Option<&str> {
        self.sender
            .first()
            .filter(|(k, _)| k == "node")
            .and_then(|(_, v)| v.text())
    }

    pub fn sender_pid(&self) -> Option<u32> {
        self.sender
            .iter()
            .find(|(k, _)| k == "pid")
            .and_then(|(_, v)| v.text()?.parse().ok())
    }
}

/// Fields libaudit hex-encodes when their text needs it. libvirt writes the numeric
/// `old-mem`/`new-mem`, `old-vcpu`/`new-vcpu` and `old-iothread`/`new-iothread` raw
/// (`%lld`, `%u`): `new-mem=131072` is a number, not the hex of three bytes.
fn is_encoded(name: &str) -> bool {
    let numeric = |resrc: &str| matches!(resrc, "mem" | "vcpu" | "iothread");
    match name
        .strip_prefix("old-")
        .or_else(|| name.strip_prefix("new-"))
    {
        Some(resrc) => !numeric(resrc),
        None => matches!(
            name,
            "vm" | "path"
                | "cgroup"
                | "device"
                | "disk"
                | "chardev"
                | "exe"
                | "vm-ctx"
                | "img-ctx"
                | "model"
        ),
    }
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

/// Parses an audit.log line, RAW or ENRICHED (the enriched part after `\x1d` is ignored), with
/// or without auditd's `node=HOST ` prefix, with a type name (`VIRT_RESOURCE`), auditd's
/// numeric form (`UNKNOWN[2501]`) or the printk form (`type=2501 audit(...): ...`).
pub fn parse_line(line: &str) -> Result<Parsed, ParseError> {
    let line = line.split('\u{1d}').next().unwrap_or_default().trim_end();
    let line = line.strip_prefix("audit: ").unwrap_or(line);
    let (node, line) = match line.strip_prefix("node=") {
        Some(rest) => {
            let (node, rest) = rest.split_once(' ').ok_or(ParseError::NoType)?;
            (Some(node), rest.trim_start())
        }
        None => (None, line),
    };
    let rest = line.strip_prefix("type=").ok_or(ParseError::NoType)?;
    let (kind, rest) = rest.split_once(' ').ok_or(ParseError::NoStamp)?;
    let rest = rest.strip_prefix("msg=").unwrap_or(rest);
    let mut parsed = parse_stamped(kind, rest)?;
    if let Some(node) = node {
        parsed
            .sender
            .insert(0, ("node".to_owned(), Value::Raw(node.to_owned())));
    }
    Ok(parsed)
}

/// Parses a record as the kernel multicasts it to audit listeners ([`super::Reader`]): the
/// message type's number and `audit(SECS.MSEC:SERIAL): pid=.. uid=.. msg='...'`. The kind is
/// named as auditd would name it (`VIRT_RESOURCE`, or `UNKNOWN[N]`).
pub fn parse_kernel(kind: u16, text: &str) -> Result<Parsed, ParseError> {
    parse_stamped(&type_name(kind), text.trim_end_matches(['\0', '\n']))
}

/// `audit(SECS.MSEC:SERIAL): SENDER msg='TEXT'` (or a kernel record with no `msg=`).
fn parse_stamped(kind: &str, rest: &str) -> Result<Parsed, ParseError> {
    let rest = rest.strip_prefix("audit(").ok_or(ParseError::NoStamp)?;
    let (stamp, rest) = rest.split_once("):").ok_or(ParseError::NoStamp)?;
    let stamp = Stamp::parse(stamp).ok_or(ParseError::NoStamp)?;
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
        text: text.to_owned(),
    })
}

/// What a whole audit.log held: the records, the lines that are not records (with why), and
/// how many records were of types other than libvirt's (`VIRT_*`, 2500-2502), by type.
#[derive(Clone, Debug, Default)]
pub struct LogScan {
    /// (line number from 1, record), VIRT_* records only, in order.
    pub records: Vec<(usize, Parsed)>,
    /// (line number from 1, why), for lines that are not records.
    pub errors: Vec<(usize, ParseError)>,
    /// Records of other types, counted by type name.
    pub other_types: std::collections::BTreeMap<String, usize>,
}

impl LogScan {
    /// Reads every line; never fails, never panics: what is not a record is counted.
    pub fn scan(text: &str) -> Self {
        let mut out = Self::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match parse_line(line) {
                Ok(p) if p.type_id().and_then(super::AuditType::from_id).is_some() => {
                    out.records.push((i + 1, p));
                }
                Ok(p) => *out.other_types.entry(p.kind).or_default() += 1,
                Err(e) => out.errors.push((i + 1, e)),
            }
        }
        out
    }

    /// One line for a person: `20 VIRT_* records; skipped 3 of other types (SYSCALL: 3); 1
    /// line not a record (unterminated: 1, first at line 7)`.
    pub fn summary(&self) -> String {
        let mut s = format!("{} VIRT_* records", self.records.len());
        let others: usize = self.other_types.values().sum();
        if others > 0 {
            let list: Vec<String> = self
                .other_types
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect();
            s.push_str(&format!(
                "; skipped {others} of other types ({})",
                list.join(", ")
            ));
        }
        if let Some((first, _)) = self.errors.first() {
            let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
            for (_, e) in &self.errors {
                *kinds.entry(e.kind()).or_default() += 1;
            }
            let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            s.push_str(&format!(
                "; {} line{} not a record ({}, first at line {first})",
                self.errors.len(),
                if self.errors.len() == 1 { "" } else { "s" },
                list.join(", ")
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../../../tests/fixtures/libvirt-9.0-audit.log");

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

    #[test]
    fn node_prefix_numeric_types_printk_and_multicast_forms() {
        let text = "pid=7 uid=0 auid=4294967295 ses=4294967295 msg='virt=kvm op=start reason=booted vm=\"a\" uuid=u vm-pid=9 exe=\"/usr/sbin/libvirtd\" hostname=? addr=? terminal=? res=success'";
        let forms = [
            format!("node=host1 type=VIRT_CONTROL msg=audit(10.250:3): {text}"),
            format!("type=UNKNOWN[2500] msg=audit(10.250:3): {text}"),
            format!("audit: type=2500 audit(10.250:3): {text}"),
        ];
        for line in &forms {
            let p = parse_line(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert_eq!(p.type_id(), Some(2500), "{line}");
            assert_eq!(p.sender_pid(), Some(7), "{line}");
            assert_eq!(p.get("vm-pid"), Some("9"));
            assert_eq!(
                p.stamp,
                Stamp {
                    secs: 10,
                    msec: 250,
                    serial: 3
                }
            );
        }
        assert_eq!(parse_line(&forms[0]).unwrap().node(), Some("host1"));
        assert_eq!(parse_line(&forms[1]).unwrap().node(), None);
        let k = parse_kernel(2500, &format!("audit(10.250:3): {text}\0")).unwrap();
        assert_eq!(
            (k.kind.as_str(), k.get("op")),
            ("VIRT_CONTROL", Some("start"))
        );
        assert_eq!(k, parse_line(&forms[0][11..]).unwrap());
        assert_eq!(
            parse_kernel(1300, "audit(1.2:3): arch=c000003e")
                .unwrap()
                .kind,
            "SYSCALL"
        );
        assert_eq!(parse_kernel(2501, "garbage"), Err(ParseError::NoStamp));
        assert_eq!(
            parse_line("node=host1"),
            Err(ParseError::NoType),
            "a node and nothing else"
        );
    }

    #[test]
    fn a_log_is_scanned_and_what_is_not_a_record_is_counted() {
        let log = format!(
            "{}\ntype=SYSCALL msg=audit(1.2:3): arch=c000003e syscall=59\n\ntype=VIRT_RESOURCE msg=audit(1.2:4): pid=1 msg='vm=\"x\n{}\ngarbage\n",
            FIXTURE.lines().next().unwrap(),
            FIXTURE.lines().nth(1).unwrap()
        );
        let scan = LogScan::scan(&log);
        assert_eq!(
            scan.records.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            [1, 5]
        );
        assert_eq!(scan.other_types.get("SYSCALL"), Some(&1));
        assert_eq!(
            scan.errors,
            [
                (
                    4,
                    ParseError::Unterminated {
                        field: "msg".into()
                    }
                ),
                (6, ParseError::NoType)
            ]
        );
        assert_eq!(
            scan.summary(),
            "2 VIRT_* records; skipped 1 of other types (SYSCALL: 1); 2 lines not a record (no-type: 1, unterminated: 1, first at line 4)"
        );
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
