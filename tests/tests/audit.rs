//! vmaudit's records in the real kernel audit subsystem: sent, stamped by the kernel, read back
//! from its multicast log, written as auditd writes them, and found by Debian's `ausearch` and
//! `aureport`. Kernel auditing is switched for each test and restored after it.

use std::{io::Write as _, path::Path, process::Command, time::Instant};

use vmaudit::audit::{
    AuditMode, AuditSink, AuditType, ControlOp, Journal, KernelAudit, KernelOutcome, KernelRecord,
    Reader, Record, SendStatus, StartReason, VmIdent, encode, logfmt,
};
use vmaudit_tests::{AuditEnabledGuard, PATIENCE, TempDir, fresh_uuid, require_root};

const MAC: &str = "52:54:00:12:34:56";

/// Waits for the kernel's record of the user text `text`, skipping every other record.
fn wait_record(reader: &mut Reader, kind: AuditType, text: &str) -> KernelRecord {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match reader.next_timeout(left).expect("read the audit log") {
            Some(r) if r.kind == kind.id() && r.user_msg() == Some(text) => return r,
            Some(r) => seen.push(r),
            None => panic!(
                "the kernel logged no {kind} record {text:?} within {PATIENCE:?}; saw {seen:#?}"
            ),
        }
    }
}

/// The kernel's own fields of a user record, which must be exactly
/// `pid=OURS uid=0 auid=N ses=N` (and `subj=...` only on hosts with an LSM).
fn check_kernel_fields(rec: &KernelRecord) {
    let (head, _) = rec.user_parts().expect("a user record: ... msg='...'");
    let fields: Vec<(&str, &str)> = head
        .split(' ')
        .map(|f| f.split_once('=').expect("name=value"))
        .collect();
    let names: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
    let lsm = Path::new("/sys/kernel/security/lsm");
    match names.as_slice() {
        ["pid", "uid", "auid", "ses"] => {}
        ["pid", "uid", "auid", "ses", "subj"] if lsm.exists() => {}
        other => panic!("unexpected kernel fields {other:?} in {:?}", rec.text),
    }
    assert_eq!(fields[0].1, std::process::id().to_string(), "{}", rec.text);
    assert_eq!(fields[1].1, "0");
    for (n, v) in &fields[2..4] {
        assert!(v.parse::<u32>().is_ok(), "{n}={v} in {}", rec.text);
    }
}

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn records_reach_the_kernel_log_and_ausearch_reads_them() {
    require_root();
    let _audit = AuditEnabledGuard::set(true);
    let mut reader = Reader::open().expect("join the audit log's multicast group");
    let uuid = fresh_uuid();
    let vm = VmIdent::new("kvm", "vmaudit-audit-t1", uuid);
    let tun = Path::new("/dev/net/tun");
    let open = Record::net_open(&vm, MAC, tun, encode::rdev_of(tun))
        .fd(5)
        .emulator_fd(23)
        .build()
        .unwrap();
    assert!(
        open.libvirt_text()
            .ends_with("path=\"/dev/net/tun\" rdev=0A:C8")
    );
    let start = Record::control(&vm, ControlOp::Start(StartReason::Booted), 4242)
        .build()
        .unwrap();

    let mut kernel = KernelAudit::open().unwrap();
    assert!(kernel.status().unwrap().is_enabled());
    for rec in [&open, &start] {
        assert_eq!(
            kernel.send(rec.kind, &rec.text).unwrap(),
            SendStatus::Accepted
        );
    }
    let got_open = wait_record(&mut reader, AuditType::VirtResource, &open.text);
    let got_start = wait_record(&mut reader, AuditType::VirtControl, &start.text);

    // `audit(SECS.MSEC:SERIAL): pid=.. uid=.. auid=.. ses=.. msg='TEXT'`, TEXT exactly ours.
    for got in [&got_open, &got_start] {
        eprintln!("kernel record {}: {}", got.kind, got.text);
        let (stamp, _) = got.split_stamp().expect("kernel stamp");
        assert!(
            got.text.starts_with(&format!("audit({stamp}): pid=")),
            "{}",
            got.text
        );
        check_kernel_fields(got);
    }
    assert_eq!(got_open.user_msg(), Some(open.text.as_str()));
    assert!(got_open.text.ends_with(&format!(" msg='{}'", open.text)));
    assert!(got_open.stamp().unwrap() < got_start.stamp().unwrap());

    // As auditd writes them, read by Debian's ausearch and aureport.
    let dir = TempDir::new("audit-log");
    let log = dir.0.join("audit.log");
    let mut f = std::fs::File::create(&log).unwrap();
    for got in [&got_open, &got_start] {
        let line = logfmt::auditd_line(got).unwrap();
        assert!(line.starts_with(&format!(
            "type={} msg=audit(",
            AuditType::from_id(got.kind).unwrap()
        )));
        writeln!(f, "{line}").unwrap();
    }
    drop(f);
    let log = log.to_str().unwrap();
    let uuid = uuid.to_string();
    let (ok, out) = run(
        "ausearch",
        &["-if", log, "-m", "VIRT_RESOURCE", "--uuid", &uuid],
    );
    assert!(ok, "ausearch found nothing: {out}");
    assert!(out.contains(&open.text), "{out}");
    assert!(
        !out.contains("op=start"),
        "ausearch -m VIRT_RESOURCE gave the control record: {out}"
    );
    let (ok, out) = run(
        "ausearch",
        &["-if", log, "-m", "VIRT_CONTROL", "--uuid", &uuid],
    );
    assert!(ok, "ausearch found nothing: {out}");
    assert!(out.contains(&start.text), "{out}");
    // aureport --virt: `N. DATE TIME TYPE SUCCESS EVENT`, EVENT being the kernel's serial.
    let (ok, out) = run("aureport", &["--virt", "-if", log]);
    assert!(ok, "aureport: {out}");
    for (got, kind) in [(&got_open, "VIRT_RESOURCE"), (&got_start, "VIRT_CONTROL")] {
        let serial = got.stamp().unwrap().serial.to_string();
        let listed = out.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() == 6 && w[3] == kind && w[4] == "yes" && w[5] == serial
        });
        assert!(
            listed,
            "aureport --virt does not list {kind} event {serial}: {out}"
        );
    }
    let (ok, out) = run("aureport", &["--virt", "--summary", "-if", log]);
    assert!(ok, "aureport --summary: {out}");
}

#[test]
fn sink_both_journals_what_the_kernel_logged() {
    require_root();
    let _audit = AuditEnabledGuard::set(true);
    let mut reader = Reader::open().unwrap();
    let dir = TempDir::new("audit-sink");
    let path = dir.0.join("vm.jsonl");
    let mut sink = AuditSink::new(AuditMode::Both, Some(Journal::open(&path).unwrap())).unwrap();
    let vm = VmIdent::new("qemu", "vmaudit audit t2", fresh_uuid());
    let rec = Record::net(&vm, vmaudit::audit::NetChange::Attach, MAC)
        .fd(9)
        .build()
        .unwrap();
    assert!(
        rec.text.contains("vm=766D6175646974206175646974207432 "),
        "{}",
        rec.text
    );
    let out = sink.emit(&rec).unwrap();
    assert_eq!(out.kernel, KernelOutcome::Sent);
    assert!(out.journaled);
    // The journal line is on disk when emit returns, and the kernel has the same text.
    let lines = Journal::read(&path).unwrap();
    assert_eq!(lines, vec![out.entry]);
    assert_eq!(lines[0].kernel, "sent");
    assert_eq!(lines[0].fd, Some(9));
    let got = wait_record(&mut reader, AuditType::VirtResource, &lines[0].text);
    check_kernel_fields(&got);
}

#[test]
fn disabled_auditing_is_reported_not_hidden() {
    require_root();
    let _audit = AuditEnabledGuard::set(false);
    let mut kernel = KernelAudit::open().unwrap();
    assert!(!kernel.status().unwrap().is_enabled());
    let vm = VmIdent::new("kvm", "vmaudit-audit-t3", fresh_uuid());
    let rec = Record::control(&vm, ControlOp::Start(StartReason::Booted), 1)
        .build()
        .unwrap();
    assert_eq!(
        kernel.send(rec.kind, &rec.text).unwrap(),
        SendStatus::Disabled
    );

    let dir = TempDir::new("audit-disabled");
    let path = dir.0.join("vm.jsonl");
    let mut sink = AuditSink::new(AuditMode::Both, Some(Journal::open(&path).unwrap())).unwrap();
    for _ in 0..2 {
        assert_eq!(sink.emit(&rec).unwrap().kernel, KernelOutcome::Disabled);
    }
    let lines = Journal::read(&path).unwrap();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l.kernel == "disabled"));
}

#[test]
fn enabling_and_disabling_shows_in_status() {
    require_root();
    let _audit = AuditEnabledGuard::set(true);
    let mut kernel = KernelAudit::open().unwrap();
    assert_eq!(kernel.status().unwrap().enabled, 1);
    kernel.set_enabled(false).unwrap();
    assert_eq!(kernel.status().unwrap().enabled, 0);
    kernel.set_enabled(true).unwrap();
    assert_eq!(kernel.status().unwrap().enabled, 1);
}
