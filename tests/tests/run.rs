//! `vmaudit run` with real parts: Debian's qemu, real tap and macvtap devices, a real cgroup.
//! Records are checked field by field against libvirt's format; the emulator's fds are read
//! from /proc by the test itself.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc::{Receiver, channel},
    thread,
};

use serde_json::Value;
use vmaudit_tests::{
    Bins, ChildGuard, Helper, PATIENCE, TempDir, VethGuard, bins, proc_fds, require_root,
    run_vmaudit,
};

const UUID: &str = "5b0c2a7e-9a55-4d5e-8f0a-2f7e1c3d4b6a";

/// A running `vmaudit run`: stdout lines (journal entries) and stderr lines as they come.
struct Run {
    child: ChildGuard,
    stderr: Receiver<String>,
    stdout: Receiver<Value>,
}

impl Run {
    fn start(bins: &Bins, spec: &Path, journal: &Path) -> Self {
        let mut child = Command::new(&bins.vmaudit)
            .arg("run")
            .arg(spec)
            .args(["--audit", "journal", "--journal"])
            .arg(journal)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmaudit run");
        let (etx, stderr) = channel();
        let e = child.stderr.take().unwrap();
        thread::spawn(move || {
            for l in BufReader::new(e).lines().map_while(Result::ok) {
                eprintln!("[vmaudit run] {l}");
                if etx.send(l).is_err() {
                    return;
                }
            }
        });
        let (otx, stdout) = channel();
        let o = child.stdout.take().unwrap();
        thread::spawn(move || {
            for l in BufReader::new(o).lines().map_while(Result::ok) {
                let v: Value =
                    serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}"));
                if otx.send(v).is_err() {
                    return;
                }
            }
        });
        Self {
            child: ChildGuard(child),
            stderr,
            stdout,
        }
    }

    /// Waits for `vmaudit: VM NAME running, emulator pid PID` and returns the pid.
    fn wait_running(&self) -> u32 {
        loop {
            let line = self
                .stderr
                .recv_timeout(PATIENCE)
                .expect("vmaudit run: no `running` line");
            if let Some(rest) = line.split("emulator pid ").nth(1) {
                return rest.trim().parse().expect("pid");
            }
        }
    }

    /// SIGTERM, then every remaining record and the exit code.
    fn stop(self) -> (i32, Vec<Value>) {
        // SAFETY: kill with our child's pid.
        unsafe { libc::kill(self.child.0.id() as i32, libc::SIGTERM) };
        self.finish()
    }

    fn finish(mut self) -> (i32, Vec<Value>) {
        let records: Vec<Value> = self.stdout.iter().collect();
        let code = self.child.0.wait().expect("wait").code().unwrap_or(-1);
        (code, records)
    }
}

/// The journal's records (its verdict lines left out).
fn journal_lines(path: &Path) -> Vec<Value> {
    all_lines(path)
        .into_iter()
        .filter(|v| v["type"] != "verdict")
        .collect()
}

fn all_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn texts(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["text"].as_str().unwrap().to_owned())
        .collect()
}

/// `vmaudit run SPEC` to its end, journal only: the exit code and stderr.
fn run_once(bins: &Bins, spec: &Path, journal: &Path) -> (i32, String) {
    let (code, _, err) = run_vmaudit(
        bins,
        &[
            "run",
            spec.to_str().unwrap(),
            "--audit",
            "journal",
            "--journal",
            journal.to_str().unwrap(),
        ],
    );
    (code, err)
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn write_spec(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join("vm.toml");
    std::fs::write(&p, format!("name = \"{name}\"\nuuid = \"{UUID}\"\n{body}")).unwrap();
    p
}

#[test]
fn real_qemu_holds_exactly_the_passed_tap_and_macvtap_fds() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("run-qemu");
    let veth = VethGuard::new("vmaudit-rv0");
    let spec = write_spec(
        &tmp.0,
        "vmaudit-t1",
        r#"
[[interface]]
mac = "52:54:00:00:10:01"
ifname = "vma-t1tap"

[[interface]]
mac = "52:54:00:00:10:02"
backend = "macvtap"
parent = "vmaudit-rv0"
ifname = "vma-t1mvt"
"#,
    );
    let journal = tmp.0.join("journal.jsonl");
    let run = Run::start(&bins, &spec, &journal);
    let qemu = run.wait_running();

    // The journal, written and fsync'd before `running` was said.
    let recs = journal_lines(&journal);
    let t = texts(&recs);
    let vm = format!("vm=\"vmaudit-t1\" uuid={UUID}");
    // Open records, libvirt's fields in libvirt's order, ours after.
    let tap_open = format!(
        "virt=qemu resrc=net reason=open {vm} net=52:54:00:00:10:01 path=\"/dev/net/tun\" rdev=0A:C8"
    );
    let tap_rec = recs
        .iter()
        .find(|r| r["text"].as_str().unwrap().starts_with(&tap_open))
        .unwrap_or_else(|| panic!("no {tap_open} in {t:#?}"));
    assert_eq!(tap_rec["type"], "VIRT_RESOURCE");
    assert_eq!(tap_rec["result"], "success");
    assert!(tap_rec["text"].as_str().unwrap().contains(" res=success"));
    let mvt_rec = recs
        .iter()
        .find(|r| r["mac"] == "52:54:00:00:10:02" && r["reason"] == "open")
        .unwrap_or_else(|| panic!("no macvtap open in {t:#?}"));
    let ifindex = std::fs::read_to_string("/sys/class/net/vma-t1mvt/ifindex").unwrap();
    assert_eq!(mvt_rec["path"], format!("/dev/tap{}", ifindex.trim()));
    // The cgroup: deny all, then the default allows, then the pty major.
    let cg = recs
        .iter()
        .find(|r| r["class"] == "all")
        .expect("deny all record");
    let cgroup_dir = PathBuf::from(cg["cgroup"].as_str().unwrap().trim_end_matches('/'));
    assert!(cg["text"].as_str().unwrap().starts_with(&format!(
        "virt=qemu resrc=cgroup reason=deny {vm} cgroup=\""
    )));
    assert!(t.iter().any(|x| x.starts_with(&format!("virt=qemu resrc=cgroup reason=allow {vm} cgroup=\"{}/\" class=path path=\"/dev/null\" rdev=01:03 acl=rw", cgroup_dir.display()))), "{t:#?}");
    assert!(
        t.iter()
            .any(|x| x.contains("class=major category=pty maj=88 acl=rw")),
        "{t:#?}"
    );
    // Start records.
    for mac in ["52:54:00:00:10:01", "52:54:00:00:10:02"] {
        let s = format!("virt=qemu resrc=net reason=start {vm} old-net=\"?\" new-net=\"{mac}\"");
        assert!(t.iter().any(|x| x.starts_with(&s)), "no {s} in {t:#?}");
    }
    let ctl = format!("virt=qemu op=start reason=booted {vm} vm-pid={qemu}");
    let ctl_rec = recs
        .iter()
        .find(|r| r["text"].as_str().unwrap().starts_with(&ctl))
        .unwrap_or_else(|| panic!("no {ctl} in {t:#?}"));
    assert_eq!(ctl_rec["type"], "VIRT_CONTROL");

    // qemu holds exactly the passed device fds, at the numbers the records give.
    let passed: BTreeSet<i32> = recs
        .iter()
        .filter(|r| r["reason"] == "open")
        .map(|r| r["emulator_fd"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(passed.len(), 2);
    let held = proc_fds(qemu);
    let device_fds: BTreeSet<i32> = held
        .iter()
        .copied()
        .filter(|fd| {
            let target = std::fs::read_link(format!("/proc/{qemu}/fd/{fd}")).unwrap();
            target == Path::new("/dev/net/tun") || target.to_string_lossy().starts_with("/dev/tap")
        })
        .collect();
    assert_eq!(device_fds, passed);
    // Nothing else of vmaudit's leaked into qemu: no fd it has is vmaudit's open file (kcmp).
    let vmaudit_pid = run.child.0.id();
    for qfd in held.iter().filter(|fd| **fd > 2) {
        for vfd in proc_fds(vmaudit_pid).iter().filter(|fd| **fd > 2) {
            assert!(
                !vmaudit::kcmp::same_file(qemu, *qfd, vmaudit_pid, *vfd).unwrap(),
                "qemu fd {qfd} is vmaudit's fd {vfd}"
            );
        }
    }
    // vmaudit closed its own copies of the device fds.
    let vm_held: Vec<String> = proc_fds(vmaudit_pid)
        .iter()
        .filter_map(|fd| std::fs::read_link(format!("/proc/{vmaudit_pid}/fd/{fd}")).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    assert!(
        !vm_held
            .iter()
            .any(|p| p == "/dev/net/tun" || p.starts_with("/dev/tap")),
        "{vm_held:?}"
    );

    // The cgroup enforces the ACL on a process inside it.
    let mut h = Helper::spawn(&bins);
    std::fs::write(cgroup_dir.join("cgroup.procs"), h.pid().to_string()).unwrap();
    h.fd("open /dev/null");
    let denied = h.try_cmd("open /dev/net/tun").unwrap_err();
    assert!(denied.contains("Operation not permitted"), "{denied}");
    drop(h);

    let (code, _) = run.stop();
    assert_eq!(code, 0, "stopped on SIGTERM");
    let recs = journal_lines(&journal);
    let stop = recs.last().unwrap();
    assert!(
        stop["text"].as_str().unwrap().starts_with(&format!(
            "virt=qemu op=stop reason=destroyed {vm} vm-pid=0 "
        )),
        "{stop}"
    );
    assert!(
        stop["text"]
            .as_str()
            .unwrap()
            .ends_with(&format!("vmaudit-vm-pid=\"{qemu}\"")),
        "{stop}"
    );
    // Nothing left: qemu, links, cgroup, run dir.
    assert!(!Path::new(&format!("/proc/{qemu}")).exists());
    assert!(!link_exists("vma-t1tap") && !link_exists("vma-t1mvt"));
    assert!(!cgroup_dir.exists(), "{} left", cgroup_dir.display());
    assert!(!Path::new("/run/vmaudit/vmaudit-t1").exists());
    drop(veth);
}

#[test]
fn bad_specs_are_refused_naming_the_field_and_leave_nothing() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("run-bad");
    let journal = tmp.0.join("j.jsonl");
    let j = journal.to_str().unwrap();
    let cases: &[(&str, &str, i32, &str)] = &[
        (
            "unknown key",
            "colour = \"red\"\n",
            10,
            "unknown field `colour`",
        ),
        (
            "bad MAC",
            "[[interface]]\nmac = \"52:54:00:zz:00:01\"\n",
            10,
            "is not a MAC address",
        ),
        (
            "duplicate MAC",
            "[[interface]]\nmac = \"52:54:00:00:00:01\"\n[[interface]]\nmac = \"52:54:00:00:00:01\"\n",
            10,
            "interface[1].mac: duplicate MAC",
        ),
        (
            "missing parent",
            "[[interface]]\nmac = \"52:54:00:00:00:01\"\nbackend = \"macvtap\"\nparent = \"vmaudit-none0\"\n",
            10,
            "interface[0].parent: no link named `vmaudit-none0`",
        ),
        (
            "missing emulator",
            "[emulator]\npath = \"/nonexistent/qemu\"\n",
            10,
            "emulator.path: `/nonexistent/qemu` not found",
        ),
    ];
    for (what, body, code, msg) in cases {
        let spec = write_spec(&tmp.0, "vmaudit-bad", body);
        let (got, out, err) = run_vmaudit(
            &bins,
            &[
                "run",
                spec.to_str().unwrap(),
                "--audit",
                "journal",
                "--journal",
                j,
            ],
        );
        assert_eq!(got, *code, "{what}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: one line: {err}");
        assert!(err.contains(msg), "{what}: {err}");
        assert!(out.is_empty(), "{what}: {out}");
        assert!(
            !journal.exists(),
            "{what}: nothing journaled before the spec is valid"
        );
    }
    // An unwritable journal.
    let spec = write_spec(&tmp.0, "vmaudit-bad", "");
    let (got, _, err) = run_vmaudit(
        &bins,
        &[
            "run",
            spec.to_str().unwrap(),
            "--audit",
            "journal",
            "--journal",
            "/proc/vmaudit/j.jsonl",
        ],
    );
    assert_eq!(got, 11, "{err}");
    assert!(err.contains("/proc/vmaudit/j.jsonl"), "{err}");
    assert!(!Path::new("/run/vmaudit/vmaudit-bad").exists());
}

/// An interface that cannot be set up (its tap name belongs to a link that is no tap, so
/// TUNSETIFF refuses it) after another one opened: both opens are recorded, everything is
/// unwound, and the verifier holds each open to the kernel: the first was opened and never
/// passed, then closed; the second was opened and released before its failure record.
#[test]
fn an_interface_that_cannot_be_set_up_is_recorded_and_every_open_unwound() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("run-busy");
    let busy = VethGuard::new("vma-busy");
    let spec = write_spec(
        &tmp.0,
        "vmaudit-busy",
        "[[interface]]\nmac = \"52:54:00:00:20:01\"\nifname = \"vma-op1\"\n\
         [[interface]]\nmac = \"52:54:00:00:20:02\"\nifname = \"vma-busy\"\n",
    );
    let journal = tmp.0.join("j.jsonl");
    let (code, err) = run_once(&bins, &spec, &journal);
    assert_eq!(code, 12, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("vma-busy"), "{err}");
    let recs = journal_lines(&journal);
    let t = texts(&recs);
    assert_eq!(
        recs.len(),
        2,
        "an open record each, nothing after the failure: {t:#?}"
    );
    assert!(
        t[0].contains("net=52:54:00:00:20:01") && t[0].contains("res=success"),
        "{t:#?}"
    );
    assert!(
        t[1].contains("net=52:54:00:00:20:02") && t[1].contains("res=failed"),
        "{t:#?}"
    );
    let verdicts: Vec<Value> = all_lines(&journal)
        .into_iter()
        .filter(|v| v["type"] == "verdict")
        .collect();
    let on = |i: usize| -> Vec<&Value> {
        verdicts
            .iter()
            .filter(|v| v["claim"]["record_ts_ns"] == recs[i]["ts_ns"])
            .collect()
    };
    let first = on(0);
    assert!(
        first.iter().all(|v| v["status"] == "confirmed"),
        "{first:#?}"
    );
    let unpassed = first
        .iter()
        .find(|v| {
            v["reason"]
                .as_str()
                .unwrap()
                .starts_with("opened, not passed")
        })
        .unwrap_or_else(|| panic!("an opened-not-passed verdict: {first:#?}"));
    let fd = recs[0]["fd"].as_i64().unwrap();
    let e = &unpassed["evidence"][0];
    assert_eq!(
        (e["what"].as_str(), e["fd"].as_i64()),
        (Some("close"), Some(fd)),
        "vmaudit's close of the fd it opened: {unpassed:#}"
    );
    let second = on(1);
    assert_eq!(second.len(), 1, "{second:#?}");
    assert_eq!(second[0]["status"], "confirmed", "{:#}", second[0]);
    assert!(
        second[0]["reason"]
            .as_str()
            .unwrap()
            .contains("released it before the record"),
        "{:#}",
        second[0]
    );
    assert!(!link_exists("vma-op1"), "the tap went with its fd");
    assert!(link_exists(&busy.0), "the other link is untouched");
    assert!(!Path::new("/run/vmaudit/vmaudit-busy").exists());
}

/// vhost-net, as this host has it: where /dev/vhost-net exists its fd is opened, recorded and
/// passed like the tap's; where it does not (CONFIG_VHOST_NET off), the failed open is recorded,
/// the kernel's refusal confirms it, and the tap opened before it is unwound.
#[test]
fn vhost_net_is_recorded_as_the_host_has_it() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("run-vhost");
    let spec = write_spec(
        &tmp.0,
        "vmaudit-vh",
        "[[interface]]\nmac = \"52:54:00:00:20:01\"\nifname = \"vma-vhtap\"\nvhost = true\n",
    );
    let journal = tmp.0.join("j.jsonl");
    if Path::new("/dev/vhost-net").exists() {
        let run = Run::start(&bins, &spec, &journal);
        run.wait_running();
        let (code, _) = run.stop();
        assert_eq!(code, 0);
        let recs = journal_lines(&journal);
        let vhost = recs
            .iter()
            .find(|r| r["path"] == "/dev/vhost-net" && r["reason"] == "open")
            .expect("an open record of /dev/vhost-net");
        assert_eq!(vhost["result"], "success", "{vhost:#}");
        return assert_all_confirmed(&journal);
    }
    let (code, _, err) = run_vmaudit(
        &bins,
        &[
            "run",
            spec.to_str().unwrap(),
            "--audit",
            "journal",
            "--journal",
            journal.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 12, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("/dev/vhost-net"), "{err}");
    let recs = journal_lines(&journal);
    let t = texts(&recs);
    assert!(
        t[1].contains("path=\"/dev/vhost-net\" rdev=?") && t[1].contains("res=failed"),
        "{t:#?}"
    );
    assert_eq!(recs.len(), 2, "nothing after the failure: {t:#?}");
    let vhost = all_lines(&journal)
        .into_iter()
        .find(|v| v["type"] == "verdict" && v["claim"]["record_ts_ns"] == recs[1]["ts_ns"])
        .expect("a verdict on the failed open");
    assert_eq!(vhost["status"], "confirmed", "{vhost:#}");
    assert!(
        vhost["reason"].as_str().unwrap().contains("refused"),
        "{vhost:#}"
    );
    assert!(!link_exists("vma-vhtap"), "the tap went with its fd");
    assert!(!Path::new("/run/vmaudit/vmaudit-vh").exists());
}

fn assert_all_confirmed(journal: &Path) {
    let bad: Vec<Value> = all_lines(journal)
        .into_iter()
        .filter(|v| v["type"] == "verdict" && v["status"] != "confirmed")
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
}

/// With `--audit both`, every record reaches the kernel audit subsystem too, and Debian's
/// `ausearch --uuid` finds each one in an audit.log written from the kernel's own stream.
#[test]
fn kernel_records_are_found_by_ausearch_and_aureport() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("run-ausearch");
    let _audit = vmaudit_tests::AuditEnabledGuard::set(true);
    let mut reader = vmaudit::audit::Reader::open().expect("audit multicast reader");
    let spec = write_spec(
        &tmp.0,
        "vmaudit-t2",
        "[[interface]]\nmac = \"52:54:00:00:30:01\"\nifname = \"vma-t2tap\"\n",
    );
    let journal = tmp.0.join("journal.jsonl");
    let mut child = Command::new(&bins.vmaudit)
        .arg("run")
        .arg(&spec)
        .args(["--audit", "both", "--journal"])
        .arg(&journal)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut guard = ChildGuard(child);
    for line in stderr.lines().map_while(Result::ok) {
        if line.contains("emulator pid") {
            break;
        }
    }
    // SAFETY: kill with our child's pid.
    unsafe { libc::kill(guard.0.id() as i32, libc::SIGTERM) };
    assert_eq!(guard.0.wait().unwrap().code(), Some(0));
    let recs = journal_lines(&journal);
    assert!(recs.iter().all(|r| r["kernel"] == "sent"), "{recs:#?}");
    // The kernel's copies, as auditd would log them, until the stop record.
    let mut log = String::new();
    let mut seen = 0;
    while seen < recs.len() {
        let rec = reader
            .next_timeout(PATIENCE)
            .expect("read")
            .expect("a record within PATIENCE");
        if rec.text.contains(&format!("uuid={UUID}")) {
            seen += 1;
            log.push_str(&vmaudit::audit::logfmt::auditd_line(&rec).unwrap());
            log.push('\n');
        }
    }
    for r in &recs {
        assert!(
            log.contains(&format!("msg='{}'", r["text"].as_str().unwrap())),
            "kernel copy of {}",
            r["text"]
        );
    }
    let file = tmp.0.join("audit.log");
    std::fs::write(&file, &log).unwrap();
    let out = Command::new("ausearch")
        .args([
            "-if",
            file.to_str().unwrap(),
            "-m",
            "VIRT_RESOURCE,VIRT_CONTROL",
            "--uuid",
            UUID,
            "--raw",
        ])
        .output()
        .expect("ausearch (Debian package auditd)");
    let found = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        found
            .lines()
            .filter(|l| l.starts_with("type=VIRT_"))
            .count(),
        recs.len(),
        "{found}"
    );
    let out = Command::new("aureport")
        .args(["--virt", "-if", file.to_str().unwrap()])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(
        report.lines().filter(|l| l.contains("VIRT_")).count() >= recs.len(),
        "{report}"
    );
}

/// The emulator dying under vmaudit: `op=stop reason=crashed`, exit 15, everything removed.
#[test]
fn an_emulator_that_dies_is_recorded_as_crashed() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("run-crash");
    let spec = write_spec(
        &tmp.0,
        "vmaudit-t3",
        "[[interface]]\nmac = \"52:54:00:00:40:01\"\nifname = \"vma-t3tap\"\nqueues = 2\n",
    );
    let journal = tmp.0.join("journal.jsonl");
    let run = Run::start(&bins, &spec, &journal);
    let qemu = run.wait_running();
    // A multiqueue tap: one record and one fd per queue, all held by qemu.
    let recs = journal_lines(&journal);
    let opens: Vec<&Value> = recs.iter().filter(|r| r["reason"] == "open").collect();
    assert_eq!(opens.len(), 2);
    let tun_fds: BTreeSet<i32> = proc_fds(qemu)
        .into_iter()
        .filter(|fd| {
            std::fs::read_link(format!("/proc/{qemu}/fd/{fd}"))
                .is_ok_and(|p| p == Path::new("/dev/net/tun"))
        })
        .collect();
    assert_eq!(
        tun_fds,
        opens
            .iter()
            .map(|r| r["emulator_fd"].as_i64().unwrap() as i32)
            .collect()
    );
    // SAFETY: SIGKILL to the emulator, which this test started through vmaudit.
    unsafe { libc::kill(qemu as i32, libc::SIGKILL) };
    let (code, _) = run.finish();
    assert_eq!(code, 15);
    let stop = journal_lines(&journal).pop().unwrap();
    assert!(
        stop["text"].as_str().unwrap().starts_with(&format!(
            "virt=qemu op=stop reason=crashed vm=\"vmaudit-t3\" uuid={UUID} vm-pid=0 "
        )),
        "{stop}"
    );
    assert!(!link_exists("vma-t3tap"));
    assert!(!Path::new("/run/vmaudit/vmaudit-t3").exists());
}
