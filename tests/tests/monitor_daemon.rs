//! `vmaudit monitor` as a daemon on a libvirt host: managers followed across a libvirtd restart,
//! records of other processes refused, a vm-pid the manager did not start, a record naming a
//! FIFO as its cgroup, the audit stream's own losses, and its journal (read by `verify` and
//! `search`, reopened on SIGHUP).
//!
//! Runs as root, one test at a time:
//! `cargo test -p vmaudit-tests --test monitor_daemon -- --test-threads=1`.

use std::{fs, io::Write as _, path::Path};

use serde_json::Value;
use vmaudit::audit::{AuditType, KernelAudit};
use vmaudit_tests::{
    AuditEnabledGuard, TempDir, Watch, bins,
    libvirt::{AuditCapture, Domain, Libvirt, Nic},
    require_root, run_vmaudit,
};

/// `vmaudit monitor` of the kernel's audit stream, following libvirtd (and `also`), with a
/// journal at `journal`.
fn monitor(lv_pid: u32, also: &[u32], journal: &Path, extra: &[&str]) -> Watch {
    let bins = bins!();
    let mut pids = vec![lv_pid.to_string()];
    pids.extend(also.iter().map(u32::to_string));
    let mut args: Vec<&str> = vec!["--journal", journal.to_str().unwrap()];
    for p in &pids {
        args.extend(["--manager", p.as_str()]);
    }
    args.extend(["--deadline-ms", "2000"]);
    args.extend_from_slice(extra);
    Watch::start_sub(&bins, "monitor", &args, "monitoring manager pid")
}

fn verdict(m: &mut Watch, kind: &str, pred: impl Fn(&Value) -> bool) -> Value {
    m.wait_any(kind, |v| {
        v["type"] == "verdict" && v["claim"]["kind"] == kind && pred(v)
    })
}

/// A VIRT record sent through the kernel by this process, as a forger would.
fn send(kind: AuditType, text: &str) {
    let mut k = KernelAudit::open().expect("NETLINK_AUDIT");
    k.send(
        kind,
        &format!("{text} exe=\"/usr/sbin/libvirtd\" hostname=? addr=? terminal=? res=success"),
    )
    .expect("send a VIRT record");
}

fn journal_lines(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_libvirtd_restart_under_a_running_vm_is_followed() {
    require_root();
    const NAME: &str = "vmdmn1";
    const UUID: &str = "7e57c0de-0000-4000-8000-00000000f001";
    let tmp = TempDir::new("monitor-restart");
    let _audit = AuditCapture::start();
    let lv = Libvirt::start();
    let journal = tmp.0.join("j.jsonl");
    let mut m = monitor(lv.libvirtd_pid(), &[], &journal, &[]);
    let mut dom = Domain::start(
        &lv,
        NAME,
        UUID,
        &[Nic::new("52:54:00:1f:01:01", "vmdmn1n0")],
    );
    let qemu = dom.pid();
    assert_eq!(verdict(&mut m, "vm-start", |_| true)["status"], "confirmed");
    let new = lv.restart_libvirtd();
    m.wait_stderr(|l| l.contains(&format!("following manager pid {new}")));
    // The new libvirtd hot-plugs a NIC: its open and the attach are judged.
    dom.attach(&Nic::new("52:54:00:1f:01:02", "vmdmn1n1"));
    let open = verdict(&mut m, "net-open", |v| {
        v["claim"]["mac"] == "52:54:00:1f:01:02"
    });
    assert_eq!(open["status"], "confirmed", "{open:#}");
    assert_eq!(
        open["evidence"][0]["pid"], new,
        "the new libvirtd's open: {open:#}"
    );
    let attach = verdict(&mut m, "net-attach", |_| true);
    assert_eq!(attach["status"], "confirmed", "{attach:#}");
    assert_eq!(attach["evidence"][0]["pid"], qemu);
    dom.destroy();
    assert_eq!(verdict(&mut m, "vm-stop", |_| true)["status"], "confirmed");
    let (code, seen) = m.stop();
    let bad: Vec<&Value> = seen
        .iter()
        .filter(|v| v["type"] == "verdict" && v["status"] != "confirmed")
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
    assert_eq!(code, 0);
    let summary = journal_lines(&journal)
        .into_iter()
        .find(|v| v["type"] == "monitor-summary")
        .expect("a summary line");
    assert!(
        summary["stats"]["managers_followed"].as_u64().unwrap() >= 1,
        "{summary:#}"
    );
}

/// A forged record (a VIRT_CONTROL start naming pid 1 for a running VM) from a process that is
/// no manager is no claim: counted, journaled as such, and it changes no verdict. From a
/// manager, a vm-pid it did not start is a violation; and a record naming a FIFO as its
/// cgroup is refused without blocking the monitor.
#[test]
fn forged_records_vm_pids_and_cgroup_paths_are_held_to_who_sent_them() {
    require_root();
    const NAME: &str = "vmdmn2";
    const UUID: &str = "7e57c0de-0000-4000-8000-00000000f002";
    let tmp = TempDir::new("monitor-forged");
    let _audit = AuditCapture::start();
    let lv = Libvirt::start();
    let journal = tmp.0.join("j.jsonl");
    let mut m = monitor(lv.libvirtd_pid(), &[], &journal, &[]);
    let mut dom = Domain::start(
        &lv,
        NAME,
        UUID,
        &[Nic::new("52:54:00:1f:02:01", "vmdmn2n0")],
    );
    assert_eq!(verdict(&mut m, "vm-start", |_| true)["status"], "confirmed");
    send(
        AuditType::VirtControl,
        &format!("virt=qemu op=start reason=booted vm=\"{NAME}\" uuid={UUID} vm-pid=1"),
    );
    m.wait_stderr(|l| l.contains("not a claim") && l.contains(&std::process::id().to_string()));
    dom.destroy();
    let stop = verdict(&mut m, "vm-stop", |_| true);
    assert_eq!(
        stop["status"], "confirmed",
        "not \"pid 1 still runs\": {stop:#}"
    );
    let (code, seen) = m.stop();
    assert_eq!(code, 0, "nothing violated: {seen:#?}");
    assert!(
        !seen.iter().any(|v| v["type"] == "verdict"
            && v["claim"]["text"]
                .as_str()
                .unwrap()
                .split_whitespace()
                .any(|f| f == "vm-pid=1")),
        "the forged record got no verdict"
    );
    let lines = journal_lines(&journal);
    let forged = lines
        .iter()
        .find(|v| v["vm_pid"] == 1)
        .expect("the forged record is journaled");
    assert_eq!(
        forged["extra"]["vmaudit-not-a-claim"],
        "its sender is no manager"
    );
    let summary = lines
        .iter()
        .find(|v| v["type"] == "monitor-summary")
        .unwrap();
    assert_eq!(summary["stats"]["not_from_manager"], 1, "{summary:#}");

    // This process as a manager too: its vm-pid=1 is no process it started, and its FIFO is
    // no cgroup.
    let me = std::process::id();
    let journal = tmp.0.join("j2.jsonl");
    let mut m = monitor(lv.libvirtd_pid(), &[me], &journal, &[]);
    let fifo = tmp.0.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let uuid = "7e57c0de-0000-4000-8000-00000000f0ff";
    send(
        AuditType::VirtResource,
        &format!(
            "virt=kvm resrc=cgroup reason=deny vm=\"vmforged\" uuid={uuid} cgroup=\"{}\" class=all",
            fifo.display()
        ),
    );
    send(
        AuditType::VirtControl,
        &format!("virt=kvm op=start reason=booted vm=\"vmforged\" uuid={uuid} vm-pid=1"),
    );
    let start = verdict(&mut m, "vm-start", |_| true);
    assert_eq!(start["status"], "violated", "{start:#}");
    assert!(
        start["reason"]
            .as_str()
            .unwrap()
            .contains("no process the manager started"),
        "{start:#}"
    );
    let cg = verdict(&mut m, "cgroup", |_| true);
    assert_eq!(cg["status"], "unknown", "{cg:#}");
    assert!(
        cg["reason"]
            .as_str()
            .unwrap()
            .contains("not under a cgroup mount"),
        "{cg:#}"
    );
    let (code, _) = m.stop();
    assert_eq!(code, 7);
}

/// The monitor's journal holds each record beside its verdicts: `verify` and `search` read
/// it. SIGHUP reopens it by its path, as logrotate's postrotate asks.
#[test]
fn the_journal_is_read_by_verify_and_search_and_reopened_on_sighup() {
    require_root();
    const NAME: &str = "vmdmn3";
    const UUID: &str = "7e57c0de-0000-4000-8000-00000000f003";
    let bins = bins!();
    let tmp = TempDir::new("monitor-journal");
    let _audit = AuditCapture::start();
    let lv = Libvirt::start();
    let journal = tmp.0.join("j.jsonl");
    let mut m = monitor(lv.libvirtd_pid(), &[], &journal, &[]);
    let mut dom = Domain::start(
        &lv,
        NAME,
        UUID,
        &[Nic::new("52:54:00:1f:03:01", "vmdmn3n0")],
    );
    assert_eq!(verdict(&mut m, "vm-start", |_| true)["status"], "confirmed");
    let rotated = tmp.0.join("j.jsonl.1");
    fs::rename(&journal, &rotated).unwrap();
    // SAFETY: SIGHUP to the monitor this test started.
    unsafe { libc::kill(m.pid() as i32, libc::SIGHUP) };
    dom.destroy();
    assert_eq!(verdict(&mut m, "vm-stop", |_| true)["status"], "confirmed");
    // The next write after SIGHUP went to a journal opened anew at the path.
    m.wait_stderr(|l| l.contains("reopened"));
    let (code, _) = m.stop();
    assert_eq!(code, 0);
    let after = journal_lines(&journal);
    assert!(
        after
            .iter()
            .any(|v| v["type"] == "VIRT_CONTROL" && v["op"] == "stop"),
        "{after:#?}"
    );
    assert!(after.iter().any(|v| v["type"] == "monitor-summary"));
    for file in [&rotated, &journal] {
        let (code, out, err) = run_vmaudit(&bins, &["verify", file.to_str().unwrap(), "--json"]);
        assert_eq!(code, 0, "{out}{err}");
        let report: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            report["unverified"], 0,
            "every record joined to its verdicts: {report:#}"
        );
    }
    let (code, out, err) = run_vmaudit(
        &bins,
        &[
            "search",
            "--vm",
            NAME,
            "--json",
            rotated.to_str().unwrap(),
            journal.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let found: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(found.iter().any(|e| e["reason"] == "booted"), "{found:#?}");
    assert!(
        found
            .iter()
            .all(|e| !e["verdicts"].as_array().unwrap().is_empty()),
        "{found:#?}"
    );
}

/// Records lost in the stream (a serial number skipped) make a NIC release `unknown`: the
/// detach record may be among them. A stand-in manager (this test) and emulator, and a log.
#[test]
fn records_lost_around_a_release_make_it_unknown() {
    use vmaudit_tests::manager::{record, tap};
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("monitor-lost");
    let log = tmp.0.join("audit.log");
    fs::write(&log, "").unwrap();
    let me = std::process::id();
    let journal = tmp.0.join("j.jsonl");
    let mut m = Watch::start_sub(
        &bins,
        "monitor",
        &[
            "--manager",
            &me.to_string(),
            "--journal",
            journal.to_str().unwrap(),
            "--audit-log",
            log.to_str().unwrap(),
            "--deadline-ms",
            "1500",
        ],
        "monitoring manager pid",
    );
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mac = [0x52, 0x54, 0x00, 0x1f, 0x04, 0x01];
    let t = tap(&sock, "vml%d", &mac);
    let emulator = vmaudit_tests::manager::StandIn::start(&bins, &["close-later"], &[&t]);
    drop(t);
    let (name, uuid) = ("vml1", "7e57c0de-0000-4000-8000-00000000f004");
    let mut serial = 0;
    let append = |text: &str| {
        fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    };
    let mut lines = record(
        "VIRT_RESOURCE",
        &mut serial,
        &format!(
            "resrc=net reason=start vm=\"{name}\" uuid={uuid} old-net=\"?\" new-net=\"52:54:00:1f:04:01\""
        ),
    );
    lines += &record(
        "VIRT_CONTROL",
        &mut serial,
        &format!(
            "op=start reason=booted vm=\"{name}\" uuid={uuid} vm-pid={}",
            emulator.pid()
        ),
    );
    append(&lines);
    assert_eq!(
        verdict(&mut m, "net-start", |_| true)["status"],
        "confirmed"
    );
    // The emulator closes the NIC's fd; then a record whose serial skips five.
    emulator.close_fds();
    serial += 5;
    append(&record("USER", &mut serial, "op=noise"));
    let v = m.wait_any("the release", |v| {
        v["type"] == "verdict" && v["claim"]["kind"] == "net-start" && v["status"] != "confirmed"
    });
    assert_eq!(v["status"], "unknown", "{v:#}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("audit records were lost"),
        "{v:#}"
    );
    let (code, _) = m.stop();
    assert_eq!(code, 8);
    let summary = journal_lines(&journal)
        .into_iter()
        .find(|v| v["type"] == "monitor-summary")
        .unwrap();
    assert_eq!(summary["stats"]["records_lost"], 5, "{summary:#}");
    drop(emulator);
}

/// Auditing off: the monitor says so at its start, and its metrics show it.
#[test]
fn auditing_off_is_a_warning_and_a_metric() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("monitor-off");
    let _off = AuditEnabledGuard::set(false);
    let me = std::process::id().to_string();
    let m = Watch::start_sub(
        &bins,
        "monitor",
        &[
            "--manager",
            &me,
            "--journal",
            tmp.0.join("j.jsonl").to_str().unwrap(),
            "--serve",
            "127.0.0.1:0",
        ],
        "monitoring manager pid",
    );
    let addr = m
        .stderr_before_ready
        .iter()
        .find_map(|l| l.strip_prefix("vmaudit: serving http://"))
        .and_then(|rest| rest.split('/').next())
        .expect("monitor --serve says where it listens")
        .to_owned();
    m.wait_stderr(|l| l.contains("auditing is off"));
    let metrics = ureq::get(format!("http://{addr}/metrics"))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    assert!(
        metrics.lines().any(|l| l == "vmaudit_audit_enabled 0"),
        "{metrics}"
    );
    let (code, _) = m.stop();
    assert_eq!(code, 0);
}
