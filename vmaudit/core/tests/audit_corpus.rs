//! The audit.log corpus (tests/fixtures/audit-corpus/): every libvirt record shape
//! in every encoding it lists, and malformed lines. Each `NAME.log` has a `NAME.expected`: one
//! JSON line per line of the log, with the type, each field's encoding and decoded value, the
//! typed view's facts, or the kind of error the line must give.

use std::{collections::BTreeSet, fs, path::PathBuf};

use serde_json::Value as Json;
use vmaudit_core::audit::parse::{LogScan, Parsed, Value, parse_line};

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/audit-corpus")
}

fn files() -> Vec<(String, String, Vec<Json>)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(corpus()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let log = fs::read_to_string(&path).unwrap();
        let expected: Vec<Json> = fs::read_to_string(path.with_extension("expected"))
            .unwrap_or_else(|e| panic!("{name} has no .expected: {e}"))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            log.lines().count(),
            expected.len(),
            "{name}: one expectation per line"
        );
        out.push((name, log, expected));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(out.len(), 3, "the corpus files");
    out
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Quoted(_) => "quoted",
        Value::Hex(_) => "hex",
        Value::Raw(_) => "raw",
        Value::Missing => "missing",
    }
}

fn check_fields(what: &str, got: &[(String, Value)], want: &Json) {
    for (name, exp) in want.as_object().unwrap() {
        let v = got
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("{what}: no field {name}"));
        assert_eq!(kind_of(v), exp[0], "{what}: {name} encoding");
        assert_eq!(v.text(), exp[1].as_str(), "{what}: {name} value");
    }
}

#[test]
fn every_line_decodes_as_expected_or_fails_with_the_right_kind() {
    for (name, log, expected) in files() {
        for (line, exp) in log.lines().zip(&expected) {
            let what = format!("{name}:{}", exp["line"]);
            if exp.get("blank").is_some() {
                assert!(line.is_empty(), "{what}");
                continue;
            }
            if let Some(kind) = exp["error"].as_str() {
                let e = parse_line(line).expect_err(&what);
                assert_eq!(e.kind(), kind, "{what}: {e}");
                continue;
            }
            let p: Parsed = parse_line(line).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(
                p.type_id().map(u64::from),
                exp["type"].as_u64(),
                "{what} type"
            );
            check_fields(&what, &p.fields, &exp["fields"]);
            let want_fields = exp["fields"].as_object().unwrap().len();
            assert_eq!(p.fields.len(), want_fields, "{what}: every field, no more");
            if let Some(sender) = exp.get("sender") {
                check_fields(&what, &p.sender, sender);
            } else {
                assert_eq!(p.sender_pid(), Some(14870), "{what}");
            }
            if let Some(virt) = exp.get("virt") {
                let got = serde_json::to_value(p.virt()).unwrap();
                for (k, v) in virt.as_object().unwrap() {
                    assert_eq!(got.get(k).unwrap_or(&Json::Null), v, "{what}: typed {k}");
                }
            }
        }
    }
}

#[test]
fn a_scan_of_each_file_counts_records_others_and_errors() {
    for (name, log, expected) in files() {
        let scan = LogScan::scan(&log);
        let errors = expected.iter().filter(|e| e.get("error").is_some()).count();
        let others = expected
            .iter()
            .filter(|e| e.get("other_type").is_some())
            .count();
        let blank = expected.iter().filter(|e| e.get("blank").is_some()).count();
        assert_eq!(scan.errors.len(), errors, "{name}");
        assert_eq!(scan.other_types.values().sum::<usize>(), others, "{name}");
        assert_eq!(
            scan.records.len(),
            expected.len() - errors - others - blank,
            "{name}"
        );
    }
}

/// Each shape of AUDIT-FORMAT.md's "The records" is in the corpus, and each encoding.
#[test]
fn the_corpus_covers_every_shape_and_encoding() {
    let mut shapes = BTreeSet::new();
    let mut encodings = BTreeSet::new();
    for (_, log, _) in files() {
        for line in log.lines() {
            let Ok(p) = parse_line(line) else { continue };
            let v = p.virt();
            let mut shape = format!("{}", p.type_id().unwrap_or(0));
            for part in [&v.resrc, &v.op, &v.reason, &v.class].into_iter().flatten() {
                shape.push(' ');
                shape.push_str(part);
            }
            if let Some(bus) = p.get("bus") {
                shape.push_str(&format!(" bus={bus}"));
            }
            shapes.insert(shape);
            for (_, val) in &p.fields {
                encodings.insert(kind_of(val));
            }
            if line.contains("='") {
                encodings.insert("single-quoted");
            }
            if line.contains("=?") && line.contains("=\"?\"") {
                encodings.insert("missing both ways");
            }
            for form in ["node=", "type=UNKNOWN[", "audit: type=", "\u{1d}"] {
                if line.starts_with(form) || line.contains(form) {
                    encodings.insert(form);
                }
            }
            if let Some(virt) = v.virt {
                encodings.insert(if virt == "kvm" {
                    "virt=kvm"
                } else {
                    "virt=qemu"
                });
            }
        }
    }
    let mut want: Vec<String> = [
        "2501 net open",
        "2501 net start",
        "2501 net attach",
        "2501 net detach",
        "2501 cgroup deny all",
        "2501 cgroup allow major",
        "2501 cgroup allow path",
        "2501 cgroup deny path",
        "2500 start booted",
        "2501 disk start",
        "2501 fs start",
        "2501 chardev start",
        "2501 rng start",
        "2501 smartcard attach",
        "2501 dev attach bus=pci",
        "2501 dev attach bus=usb",
        "2501 dev detach bus=scsi",
        "2501 mem start",
        "2501 vcpu start",
        "2501 iothread start",
        "2502",
    ]
    .map(str::to_owned)
    .to_vec();
    for stop in [
        "shutdown",
        "destroyed",
        "crashed",
        "failed",
        "migrated",
        "saved",
    ] {
        want.push(format!("2500 stop {stop}"));
    }
    for w in &want {
        assert!(shapes.contains(w), "no {w:?} in the corpus: {shapes:#?}");
    }
    for e in [
        "quoted",
        "hex",
        "raw",
        "missing",
        "single-quoted",
        "missing both ways",
        "node=",
        "type=UNKNOWN[",
        "audit: type=",
        "\u{1d}",
        "virt=kvm",
        "virt=qemu",
    ] {
        assert!(encodings.contains(e), "no {e:?} in the corpus");
    }
}
