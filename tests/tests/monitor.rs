//! `vmaudit monitor` against the real libvirt 9.0 (Debian) and the real kernel audit
//! subsystem: every claim libvirt's records make gets a verdict with kernel evidence, and
//! misbehaviour libvirt will not produce on its own (staged here) is caught.
//!
//! Runs as root, one test at a time:
//! `cargo test -p vmaudit-tests --test monitor -- --test-threads=1`.

use std::{
    collections::BTreeSet,
    fs,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
};

use serde_json::Value;
use vmaudit::cgroup::{DevTypes, DeviceRule, attached::RuleMap};
use vmaudit_tests::{
    Helper, TempDir, Watch, bins,
    libvirt::{AuditCapture, Domain, Libvirt, Nic},
    require_root, run_vmaudit, vmaudit_programs_gone,
};

/// A `vmaudit monitor` of `lv`'s libvirtd, with `extra` arguments; verdicts on stdout.
fn monitor(lv_pid: u32, journal: &Path, extra: &[&str]) -> Watch {
    let bins = bins!();
    let pid = lv_pid.to_string();
    let mut args = vec!["--manager", &pid, "--journal", journal.to_str().unwrap()];
    if !extra.contains(&"--deadline-ms") {
        args.extend_from_slice(&["--deadline-ms", "3000"]);
    }
    args.extend_from_slice(extra);
    Watch::start_sub(&bins, "monitor", &args, "monitoring manager pid")
}

/// Waits for the verdict of a `kind` claim satisfying `pred`.
fn verdict(m: &mut Watch, what: &str, kind: &str, pred: impl Fn(&Value) -> bool) -> Value {
    m.wait_for(what, |v| {
        v["type"] == "verdict" && v["claim"]["kind"] == kind && pred(v)
    })
}

fn verdicts(seen: &[Value]) -> Vec<&Value> {
    seen.iter().filter(|v| v["type"] == "verdict").collect()
}

/// qemu's /dev/net/tun fds, read by the test from /proc.
fn tun_fds(pid: u32) -> BTreeSet<i64> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| fs::read_link(e.path()).is_ok_and(|t| t == Path::new("/dev/net/tun")))
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

fn journal_verdicts(path: &Path) -> usize {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"type\":\"verdict\""))
        .count()
}

/// The same checks for both sources: the whole life of a VM with two NICs at start and a
/// third hot-plugged, each claim confirmed with the kernel's evidence.
fn check_life(
    seen: &[Value],
    libvirtd: u32,
    qemu: u32,
    start_fds: &BTreeSet<i64>,
    all_fds: &BTreeSet<i64>,
    macs: &[&str],
) {
    let vs = verdicts(seen);
    let of = |kind: &str| -> Vec<&Value> {
        vs.iter()
            .copied()
            .filter(|v| v["claim"]["kind"] == kind)
            .collect()
    };
    for v in &vs {
        assert_eq!(v["status"], "confirmed", "every claim is confirmed: {v:#}");
    }
    assert_eq!(of("net-open").len(), 3, "{vs:#?}");
    assert_eq!(of("net-start").len(), 2);
    assert_eq!(of("net-attach").len(), 1);
    assert_eq!(of("cgroup").len(), 9, "deny all, 7 paths, the pty major");
    assert_eq!(of("vm-start").len(), 1);
    assert_eq!(of("vm-stop").len(), 1);
    // The opens were libvirtd's, each a distinct fd of /dev/net/tun.
    for v in of("net-open") {
        let e = &v["evidence"][0];
        assert_eq!(e["pid"], libvirtd, "{v:#}");
        assert_eq!(e["path"], "/dev/net/tun");
        assert_eq!(e["what"], "open");
    }
    // Each NIC's fd in qemu is one /proc showed, one per NIC.
    let mut got = BTreeSet::new();
    for (kind, fds) in [("net-start", start_fds), ("net-attach", all_fds)] {
        for v in of(kind) {
            let e = &v["evidence"][0];
            assert_eq!(e["pid"], qemu, "{v:#}");
            let fd = e["fd"].as_i64().unwrap();
            assert!(fds.contains(&fd), "{fd} not in {fds:?}: {v:#}");
            assert!(got.insert(fd), "fd {fd} claimed twice");
            assert!(macs.contains(&v["claim"]["mac"].as_str().unwrap()), "{v:#}");
        }
    }
    assert_eq!(&got, all_fds);
    let start = &of("vm-start")[0]["evidence"][0];
    assert_eq!(start["pid"], qemu);
    let stop = &of("vm-stop")[0]["evidence"][0];
    assert_eq!(
        (stop["pid"].as_u64(), stop["what"].as_str()),
        (Some(qemu as u64), Some("exit"))
    );
}

#[test]
fn monitor_confirms_a_real_libvirts_claims_from_the_kernel_and_from_its_log() {
    require_root();
    const NAME: &str = "vmmon0";
    const UUID: &str = "7e57c0de-0000-4000-8000-00000000b001";
    let tmp = TempDir::new("monitor-life");
    let mut audit = AuditCapture::start();
    let lv = Libvirt::start();
    let libvirtd = lv.libvirtd_pid();
    let j_kernel = tmp.0.join("kernel.jsonl");
    let j_log = tmp.0.join("log.jsonl");
    // Both sources at once: the kernel's multicast group, and auditd's log followed.
    let mut mk = monitor(libvirtd, &j_kernel, &[]);
    let mut ml = monitor(
        libvirtd,
        &j_log,
        &["--audit-log", audit.log().to_str().unwrap()],
    );
    let nics = [
        Nic::new("52:54:00:1c:00:01", "vmmon0n0"),
        Nic::new("52:54:00:1c:00:02", "vmmon0n1"),
    ];
    let hot = Nic::new("52:54:00:1c:00:03", "vmmon0n2");
    let macs = [nics[0].mac.as_str(), nics[1].mac.as_str(), hot.mac.as_str()];

    let mut dom = Domain::start(&lv, NAME, UUID, &nics);
    let qemu = dom.pid();
    let start_fds = tun_fds(qemu);
    assert_eq!(start_fds.len(), 2);
    dom.attach(&hot);
    audit.wait_record("VIRT_RESOURCE", UUID, &[("reason", "attach")]);
    let all_fds = tun_fds(qemu);
    assert_eq!(all_fds.len(), 3);
    for m in [&mut mk, &mut ml] {
        verdict(m, "attach verdict", "net-attach", |_| true);
    }
    dom.destroy();
    for m in [&mut mk, &mut ml] {
        verdict(m, "stop verdict", "vm-stop", |_| true);
    }
    let (code_k, seen_k) = mk.stop();
    let (code_l, seen_l) = ml.stop();
    check_life(&seen_k, libvirtd, qemu, &start_fds, &all_fds, &macs);
    check_life(&seen_l, libvirtd, qemu, &start_fds, &all_fds, &macs);
    assert_eq!((code_k, code_l), (0, 0));
    assert_eq!(journal_verdicts(&j_kernel), verdicts(&seen_k).len());
    assert_eq!(journal_verdicts(&j_log), verdicts(&seen_l).len());
    vmaudit_programs_gone().unwrap();
}

#[test]
fn a_tap_fd_copied_out_of_qemu_and_a_rule_removed_behind_libvirt_are_caught() {
    require_root();
    const NAME: &str = "vmmon1";
    const UUID: &str = "7e57c0de-0000-4000-8000-00000000b002";
    let tmp = TempDir::new("monitor-staged");
    let mut audit = AuditCapture::start();
    let lv = Libvirt::start();
    let mut m = monitor(lv.libvirtd_pid(), &tmp.0.join("j.jsonl"), &[]);
    let nic = Nic::new("52:54:00:1c:01:01", "vmmon1n0");
    let mut dom = Domain::start(&lv, NAME, UUID, std::slice::from_ref(&nic));
    let qemu = dom.pid();
    let v = verdict(&mut m, "net-start", "net-start", |_| true);
    assert_eq!(v["status"], "confirmed", "{v:#}");
    let tap_fd = v["evidence"][0]["fd"].as_i64().unwrap() as i32;

    // Another process (this test) takes a copy of qemu's tap fd.
    // SAFETY: plain syscalls; the returned fds are owned below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, qemu as i32, 0) } as i32;
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: pidfd_open just returned this fd, owned by nothing else.
    let _pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: as above.
    let stolen = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, tap_fd, 0) } as i32;
    assert!(
        stolen >= 0,
        "pidfd_getfd: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: pidfd_getfd just returned this fd, owned by nothing else.
    let stolen = unsafe { OwnedFd::from_raw_fd(stolen) };
    let me = std::process::id();
    let v = m.wait_for("the copy", |v| {
        v["type"] == "verdict" && v["status"] == "violated" && v["evidence"][0]["pid"] == me
    });
    assert_eq!(v["claim"]["mac"], nic.mac.as_str(), "{v:#}");
    assert_eq!(v["evidence"][0]["what"], "kcmp");
    assert_eq!(
        v["evidence"][0]["fd"].as_i64(),
        Some(std::os::fd::AsRawFd::as_raw_fd(&stolen) as i64)
    );
    drop(stolen);

    // A rule removed from libvirt's own device map, behind its back.
    let deny = audit.wait_record(
        "VIRT_RESOURCE",
        UUID,
        &[("resrc", "cgroup"), ("class", "all")],
    );
    let cgroup = deny.get("cgroup").expect("the cgroup field").to_owned();
    let mut map = RuleMap::of_cgroup(Path::new(&cgroup)).expect("libvirt's device map");
    let full = DeviceRule {
        types: DevTypes::Char,
        major: Some(1),
        minor: Some(7),
        acl: "rw".parse().unwrap(),
    };
    assert!(
        map.rules()
            .unwrap()
            .iter()
            .any(|r| r.major == Some(1) && r.minor == Some(7))
    );
    map.remove(&full).expect("remove /dev/full's entry");
    let v = m.wait_for("the removed rule", |v| {
        v["type"] == "verdict" && v["status"] == "violated" && v["claim"]["kind"] == "cgroup"
    });
    assert!(
        v["claim"]["text"].as_str().unwrap().contains("/dev/full"),
        "{v:#}"
    );
    assert!(v["reason"].as_str().unwrap().contains("no longer"), "{v:#}");

    // libvirt's device program detached from the VM's cgroup (a legacy attach).
    let ids = vmaudit_tests::bpf::detach_device_programs(Path::new(&cgroup));
    let v = m.wait_for("the program detached", |v| {
        v["type"] == "verdict" && v["status"] == "violated" && v["claim"]["kind"] == "cgroup"
    });
    assert!(
        v["reason"].as_str().unwrap().contains("was detached"),
        "{v:#}"
    );
    assert!(
        v["reason"].as_str().unwrap().contains(&format!("{ids:?}")),
        "{v:#}"
    );
    assert!(
        v["claim"]["text"].as_str().unwrap().contains("class=all"),
        "{v:#}"
    );

    dom.destroy();
    verdict(&mut m, "stop verdict", "vm-stop", |_| true);
    let (code, seen) = m.stop();
    assert_eq!(code, 7, "violations found: exit 7");
    assert_eq!(
        verdicts(&seen)
            .iter()
            .filter(|v| v["status"] == "violated")
            .count(),
        3,
        "exactly the three staged violations: {seen:#?}"
    );
}

#[test]
fn a_monitor_started_after_the_vm_judges_the_past_from_what_runs_now() {
    require_root();
    const NAME: &str = "vmmon2";
    const UUID: &str = "7e57c0de-0000-4000-8000-00000000b003";
    let tmp = TempDir::new("monitor-late");
    let mut audit = AuditCapture::start();
    let lv = Libvirt::start();
    let nic = Nic::new("52:54:00:1c:02:01", "vmmon2n0");
    let mut dom = Domain::start(&lv, NAME, UUID, std::slice::from_ref(&nic));
    let qemu = dom.pid();
    audit.wait_record("VIRT_CONTROL", UUID, &[("op", "start")]);
    let mut m = monitor(
        lv.libvirtd_pid(),
        &tmp.0.join("j.jsonl"),
        &["--audit-log", audit.log().to_str().unwrap(), "--from-start"],
    );
    let v = verdict(&mut m, "net-start", "net-start", |_| true);
    assert_eq!(v["status"], "confirmed", "{v:#}");
    assert_eq!(v["evidence"][0]["pid"], qemu);
    assert!(tun_fds(qemu).contains(&v["evidence"][0]["fd"].as_i64().unwrap()));
    dom.destroy();
    verdict(&mut m, "stop verdict", "vm-stop", |_| true);
    let (code, seen) = m.stop();
    assert_eq!(
        code, 8,
        "the open before vmaudit watched is unknown: verify's exit code"
    );
    let vs = verdicts(&seen);
    let open = vs
        .iter()
        .find(|v| v["claim"]["kind"] == "net-open")
        .unwrap();
    assert_eq!(
        open["status"], "unknown",
        "the open was before vmaudit watched: {open:#}"
    );
    for kind in ["vm-start", "vm-stop", "cgroup"] {
        let v = vs.iter().find(|v| v["claim"]["kind"] == kind).unwrap();
        assert_eq!(v["status"], "confirmed", "{v:#}");
    }
}

#[test]
fn bad_records_are_counted_never_a_crash() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("monitor-bad");
    let manager = Helper::spawn(&bins);
    let me = manager.pid();
    let log = tmp.0.join("audit.log");
    let u = "7e57c0de-0000-4000-8000-00000000b0ff";
    let lines = [
        // Not audit lines at all, and cut short.
        "garbage".to_owned(),
        "type=VIRT_RESOURCE msg=audit(1700000000.1".to_owned(),
        format!(
            "type=VIRT_RESOURCE msg=audit(1700000000.100:1): pid={me} uid=0 auid=0 ses=1 msg='virt=kvm resrc=net reason=open vm=\"x\" uuid={u} net=52:54"
        ),
        // Unknown types, and resources that are not device claims.
        "type=SYSCALL msg=audit(1700000000.100:2): arch=c000003e syscall=59 success=yes".to_owned(),
        format!(
            "type=VIRT_RESOURCE msg=audit(1700000000.100:3): pid={me} uid=0 auid=0 ses=1 msg='virt=kvm resrc=mem reason=start vm=\"x\" uuid={u} old-mem=0 new-mem=1 exe=\"/x\" hostname=? addr=? terminal=? res=success'"
        ),
        // A VIRT record missing its fields.
        format!(
            "type=VIRT_RESOURCE msg=audit(1700000000.100:4): pid={me} uid=0 auid=0 ses=1 msg='virt=kvm resrc=net reason=start vm=\"x\" uuid={u} res=success'"
        ),
        // A NIC of a VM never seen to start.
        format!(
            "type=VIRT_RESOURCE msg=audit(1700000000.100:5): pid={me} uid=0 auid=0 ses=1 msg='virt=kvm resrc=net reason=attach vm=\"x\" uuid={u} old-net=\"?\" new-net=\"52:54:00:1c:ff:01\" exe=\"/x\" hostname=? addr=? terminal=? res=success'"
        ),
        // A start whose pid now belongs to a process started long after the record.
        format!(
            "type=VIRT_CONTROL msg=audit(1000000000.100:6): pid={me} uid=0 auid=0 ses=1 msg='virt=kvm op=start reason=booted vm=\"y\" uuid=7e57c0de-0000-4000-8000-00000000b0fe vm-pid={me} exe=\"/x\" hostname=? addr=? terminal=? res=success'"
        ),
    ];
    fs::write(&log, lines.join("\n") + "\n").unwrap();
    let mut m = monitor(
        me,
        &tmp.0.join("j.jsonl"),
        &[
            "--audit-log",
            log.to_str().unwrap(),
            "--from-start",
            "--deadline-ms",
            "300",
        ],
    );
    let reuse = verdict(&mut m, "pid reuse", "vm-start", |_| true);
    assert_eq!(reuse["status"], "unknown");
    assert!(
        reuse["reason"].as_str().unwrap().contains("pid reuse"),
        "{reuse:#}"
    );
    let orphan = verdict(&mut m, "unknown VM", "net-attach", |_| true);
    assert_eq!(orphan["status"], "unknown", "{orphan:#}");
    let (code, _) = m.stop();
    assert_eq!(code, 8, "unknown verdicts, nothing violated");
    // The summary line counts each kind of bad input.
    let journal = fs::read_to_string(tmp.0.join("j.jsonl")).unwrap();
    let summary: Value = journal
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["type"] == "monitor-summary")
        .expect("a summary line");
    let s = &summary["stats"];
    assert_eq!(s["records"], 8, "{s:#}");
    assert_eq!(s["malformed"], 4, "{s:#}");
    assert_eq!(s["other_types"], 1, "{s:#}");
    assert_eq!(s["other_resources"], 1, "{s:#}");
    assert_eq!(s["unknown_vm"], 1, "{s:#}");
    assert_eq!(s["pid_reuse"], 1, "{s:#}");
    manager.exit();
}

#[test]
fn bad_sources_and_managers_exit_with_their_own_code_and_nothing_attached() {
    require_root();
    let bins = bins!();
    let (code, _, err) = run_vmaudit(
        &bins,
        &[
            "monitor",
            "--manager",
            "1",
            "--audit-log",
            "/nonexistent/audit.log",
        ],
    );
    assert_eq!(code, 20, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("/nonexistent/audit.log"), "{err}");
    let (code, _, err) = run_vmaudit(&bins, &["monitor", "--manager", "999999999"]);
    assert_eq!(code, 3, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    vmaudit_programs_gone().unwrap();
}

#[test]
fn the_demo_runs_in_monitor_mode_against_libvirt() {
    require_root();
    let bins = bins!();
    let lv = Libvirt::start();
    let (code, out, err) = run_vmaudit(&bins, &["demo", "--monitor"]);
    assert_eq!(code, 0, "{out}\n{err}");
    for line in [
        "confirmed   vm-start",
        "confirmed   net-start",
        "confirmed   vm-stop",
    ] {
        assert!(out.contains(line), "no {line:?} in:\n{out}\n{err}");
    }
    assert!(out.contains("0 violated"), "{out}");
    drop(lv);
}

/// A stand-in emulator holding `fds` (inherited), in `mode` (with its arguments).
fn stand_in(mode: &[&str], fds: &[&std::fs::File]) -> vmaudit_tests::manager::StandIn {
    vmaudit_tests::manager::StandIn::start(&bins!(), mode, fds)
}

#[test]
fn detach_records_are_held_to_the_emulators_closes() {
    use std::io::Write as _;
    use vmaudit_tests::manager::{record, tap};
    require_root();
    let tmp = TempDir::new("monitor-detach");
    let log = tmp.0.join("audit.log");
    fs::write(&log, "").unwrap();
    let me = std::process::id();
    let mut m = monitor(
        me,
        &tmp.0.join("j.jsonl"),
        &[
            "--audit-log",
            log.to_str().unwrap(),
            "--deadline-ms",
            "1500",
            "--serve",
            "127.0.0.1:0",
        ],
    );
    let addr = m
        .stderr_before_ready
        .iter()
        .find_map(|l| l.strip_prefix("vmaudit: serving http://"))
        .and_then(|rest| rest.split('/').next())
        .expect("monitor --serve says where it listens")
        .to_owned();
    // This test is the manager: VM "vmd1" gets two taps, VM "vmd2" one, as libvirt makes them.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let macs: [[u8; 6]; 3] = [
        [0x52, 0x54, 0x00, 0x1d, 0x00, 0x01],
        [0x52, 0x54, 0x00, 0x1d, 0x00, 0x02],
        [0x52, 0x54, 0x00, 0x1d, 0x00, 0x03],
    ];
    let mac = |m: &[u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
    let taps: Vec<std::fs::File> = macs.iter().map(|m| tap(&sock, "vmd%d", m)).collect();
    // vmd1's emulator closes its fds on SIGUSR1; vmd2's keeps its one.
    let em1 = stand_in(&["close-later"], &[&taps[0], &taps[1]]);
    let em2 = stand_in(&["hold"], &[&taps[2]]);
    drop(taps);
    let (p1, p2) = (em1.pid(), em2.pid());
    let mut serial = 0;
    let mut text = String::new();
    let vms = [
        (
            "vmd1",
            "7e57c0de-0000-4000-8000-00000000d001",
            p1,
            &macs[..2],
        ),
        (
            "vmd2",
            "7e57c0de-0000-4000-8000-00000000d002",
            p2,
            &macs[2..],
        ),
    ];
    for (name, uuid, pid, ms) in vms {
        for m in ms {
            text += &record(
                "VIRT_RESOURCE",
                &mut serial,
                &format!(
                    "resrc=net reason=open vm=\"{name}\" uuid={uuid} net={} path=\"/dev/net/tun\" rdev=0A:C8",
                    mac(m)
                ),
            );
        }
        for m in ms {
            text += &record(
                "VIRT_RESOURCE",
                &mut serial,
                &format!(
                    "resrc=net reason=start vm=\"{name}\" uuid={uuid} old-net=\"?\" new-net=\"{}\"",
                    mac(m)
                ),
            );
        }
        text += &record(
            "VIRT_CONTROL",
            &mut serial,
            &format!("op=start reason=booted vm=\"{name}\" uuid={uuid} vm-pid={pid}"),
        );
    }
    let append = |t: &str| {
        let mut f = fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(t.as_bytes()).unwrap();
    };
    append(&text);
    let mut held = std::collections::BTreeMap::new();
    for _ in 0..3 {
        let v = verdict(&mut m, "net-start", "net-start", |_| true);
        assert_eq!(v["status"], "confirmed", "{v:#}");
        held.insert(
            v["claim"]["mac"].as_str().unwrap().to_owned(),
            v["evidence"][0]["fd"].as_i64().unwrap(),
        );
    }

    // What --serve shows of it: the two VMs, and the three confirmed starts in /metrics.
    let get = |path: &str| {
        ureq::get(format!("http://{addr}{path}"))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .into_body()
            .read_to_string()
            .unwrap()
    };
    let state: Value = serde_json::from_str(&get("/api/state")).unwrap();
    let names: BTreeSet<&str> = state["vms"]
        .as_array()
        .unwrap_or_else(|| panic!("no vms in {state:#}"))
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, BTreeSet::from(["vmd1", "vmd2"]), "{state:#}");
    let metrics = get("/metrics");
    let starts = metrics
        .lines()
        .find(|l| {
            l.starts_with("vmaudit_verdicts_total{")
                && l.contains("kind=\"net-start\"")
                && l.contains("status=\"confirmed\"")
        })
        .unwrap_or_else(|| panic!("no confirmed net-start count in:\n{metrics}"));
    assert!(starts.ends_with(" 3"), "{starts}");

    // vmd1: libvirt claims NIC 1 detached, and qemu does close (both its fds: NIC 2 goes with
    // no detach record).
    let detach = |name: &str, uuid: &str, m: &[u8; 6], serial: &mut u64| {
        record(
            "VIRT_RESOURCE",
            serial,
            &format!(
                "resrc=net reason=detach vm=\"{name}\" uuid={uuid} old-net=\"{}\" new-net=\"?\"",
                mac(m)
            ),
        )
    };
    // SAFETY: kill with our own child's pid.
    unsafe { libc::kill(p1 as i32, libc::SIGUSR1) };
    append(&detach(vms[0].0, vms[0].1, &macs[0], &mut serial));
    let v = verdict(&mut m, "detach of NIC 1", "net-detach", |_| true);
    assert_eq!(v["status"], "confirmed", "{v:#}");
    let fd1 = held[&mac(&macs[0])];
    assert_eq!(
        (
            v["evidence"][0]["what"].as_str(),
            v["evidence"][0]["fd"].as_i64()
        ),
        (Some("close"), Some(fd1)),
        "the detach released qemu's fd {fd1}: {v:#}"
    );
    let v = m.wait_for("NIC 2 released without a detach", |v| {
        v["type"] == "verdict" && v["status"] == "violated" && v["claim"]["mac"] == mac(&macs[1])
    });
    assert!(
        v["reason"].as_str().unwrap().contains("no detach record"),
        "{v:#}"
    );

    // vmd2: a detach is claimed, but qemu keeps the fd.
    append(&detach(vms[1].0, vms[1].1, &macs[2], &mut serial));
    let v = verdict(&mut m, "detach of NIC 3", "net-detach", |_| true);
    assert_eq!(v["status"], "violated", "{v:#}");
    assert_eq!(v["evidence"][0]["fd"].as_i64(), Some(held[&mac(&macs[2])]));
    let (code, _) = m.stop();
    assert_eq!(code, 7);
    drop((em1, em2));
}

/// The hot-unplug that libvirt does for real: a domain booting the test guest, a NIC attached
/// and detached with `virsh` (the guest acknowledges the unplug, libvirt closes the tap and then
/// writes its detach record). The start, the attach and the detach are confirmed, the detach
/// with qemu's close of the NIC's fd, and nothing is violated.
#[test]
fn a_guest_acknowledged_libvirt_hot_unplug_is_confirmed_with_no_violation() {
    require_root();
    const NAME: &str = "vmmong";
    const UUID: &str = "7e57c0de-0000-4000-8000-00000000b00c";
    let guest = vmaudit_tests::guest::GuestImage::find();
    let tmp = TempDir::new("monitor-guest");
    let _audit = AuditCapture::start();
    let lv = Libvirt::start();
    let journal = tmp.0.join("j.jsonl");
    let mut m = monitor(lv.libvirtd_pid(), &journal, &["--deadline-ms", "2000"]);
    let boot = Nic::new("52:54:00:1c:0c:01", "vmmongn0");
    let plugged = Nic::new("52:54:00:1c:0c:02", "vmmongn1");
    let serial = tmp.0.join("serial.log");
    let mut dom = Domain::start_guest(
        &lv,
        NAME,
        UUID,
        std::slice::from_ref(&boot),
        &guest,
        &serial,
    );
    let qemu = dom.pid();
    vmaudit_tests::guest::wait_ready(&serial);
    let v = verdict(&mut m, "vm-start", "vm-start", |_| true);
    assert_eq!(v["status"], "confirmed", "{v:#}");

    dom.attach(&plugged);
    let attach = verdict(&mut m, "net-attach", "net-attach", |_| true);
    assert_eq!(attach["status"], "confirmed", "{attach:#}");
    let fd = attach["evidence"][0]["fd"].as_i64().unwrap();
    assert!(
        tun_fds(qemu).contains(&fd),
        "qemu holds fd {fd}: {attach:#}"
    );

    let answer = dom.detach(&plugged);
    assert!(answer.contains("detached successfully"), "{answer}");
    let detach = verdict(&mut m, "net-detach", "net-detach", |_| true);
    assert_eq!(detach["status"], "confirmed", "{detach:#}");
    let e = &detach["evidence"][0];
    assert_eq!(
        (e["pid"].as_u64(), e["what"].as_str(), e["fd"].as_i64()),
        (Some(u64::from(qemu)), Some("close"), Some(fd)),
        "the detach released qemu's fd {fd}: {detach:#}"
    );
    assert!(!tun_fds(qemu).contains(&fd), "qemu no longer holds fd {fd}");

    dom.destroy();
    verdict(&mut m, "vm-stop", "vm-stop", |_| true);
    let (code, seen) = m.stop();
    let vs = verdicts(&seen);
    let bad: Vec<&&Value> = vs.iter().filter(|v| v["status"] != "confirmed").collect();
    assert!(
        bad.is_empty(),
        "every claim confirmed, nothing violated: {bad:#?}"
    );
    assert_eq!(code, 0, "every claim confirmed");
    for kind in [
        "net-open",
        "net-start",
        "net-attach",
        "net-detach",
        "cgroup",
        "vm-start",
        "vm-stop",
    ] {
        assert!(
            vs.iter().any(|v| v["claim"]["kind"] == kind),
            "a {kind} verdict: {vs:#?}"
        );
    }
}

/// What a real qemu under libvirt will not do, done by stand-in emulators under this test as
/// their manager, each caught in monitor mode with the offending pid and fd: a NIC fd sent over
/// SCM_RIGHTS to a stranger, one escaping into the emulator's child, a network device the
/// emulator opens itself, and an open the manager never passed and still holds when the VM
/// stops.
#[test]
fn misbehaviour_only_a_stand_in_produces_is_caught_in_monitor_mode() {
    use std::{io::Write as _, os::unix::net::UnixListener};
    use vmaudit_tests::manager::{record, tap};
    require_root();
    let tmp = TempDir::new("monitor-bad-emu");
    let log = tmp.0.join("audit.log");
    fs::write(&log, "").unwrap();
    let me = std::process::id();
    let mut m = monitor(
        me,
        &tmp.0.join("j.jsonl"),
        &["--audit-log", log.to_str().unwrap(), "--deadline-ms", "800"],
    );
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mac = |n: u8| [0x52, 0x54, 0x00, 0x1e, 0x00, n];
    let text = |m: &[u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
    let stranger_path = tmp.0.join("stranger.sock");
    let stranger = UnixListener::bind(&stranger_path).unwrap();
    let taps: Vec<fs::File> = (1..=5).map(|n| tap(&sock, "vme%d", &mac(n))).collect();
    let sender = stand_in(
        &["send-stranger", "--to", stranger_path.to_str().unwrap()],
        &[&taps[0]],
    );
    let (conn, _) = stranger.accept().unwrap();
    let leaker = stand_in(&["leak-child"], &[&taps[1]]);
    let opener = stand_in(&["open-tun"], &[&taps[2]]);
    let holder = stand_in(&["hold"], &[&taps[3]]);
    let pids = [sender.pid(), leaker.pid(), opener.pid(), holder.pid()];
    // VM 4's second NIC: opened by the manager, recorded, never passed, kept.
    let kept = &taps[4];
    let mut serial = 0;
    let mut lines = String::new();
    for (i, pid) in pids.iter().enumerate() {
        let (name, uuid) = (
            format!("vme{i}"),
            format!("7e57c0de-0000-4000-8000-00000000e00{i}"),
        );
        let mut nics = vec![mac(i as u8 + 1)];
        if i == 3 {
            nics.push(mac(5));
        }
        for n in &nics {
            lines += &record(
                "VIRT_RESOURCE",
                &mut serial,
                &format!(
                    "resrc=net reason=open vm=\"{name}\" uuid={uuid} net={} path=\"/dev/net/tun\" rdev=0A:C8",
                    text(n)
                ),
            );
        }
        lines += &record(
            "VIRT_RESOURCE",
            &mut serial,
            &format!(
                "resrc=net reason=start vm=\"{name}\" uuid={uuid} old-net=\"?\" new-net=\"{}\"",
                text(&nics[0])
            ),
        );
        lines += &record(
            "VIRT_CONTROL",
            &mut serial,
            &format!("op=start reason=booted vm=\"{name}\" uuid={uuid} vm-pid={pid}"),
        );
    }
    let append = |t: &str| {
        fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(t.as_bytes())
            .unwrap();
    };
    append(&lines);
    let violated = |m: &mut Watch, what: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
        m.wait_any(what, |v| {
            v["type"] == "verdict" && v["status"] == "violated" && pred(v)
        })
    };
    let v = violated(&mut m, "sent over SCM_RIGHTS", &|v| {
        v["reason"].as_str().unwrap().contains("SCM_RIGHTS")
    });
    assert_eq!(v["evidence"][0]["pid"], pids[0], "{v:#}");
    assert_eq!(v["evidence"][0]["what"], "send_fd", "{v:#}");
    let v = violated(&mut m, "escaped into a child", &|v| {
        v["reason"].as_str().unwrap().contains("is also held by")
            && v["claim"]["mac"] == text(&mac(2))
    });
    assert_ne!(
        v["evidence"][0]["pid"], pids[1],
        "the holder is the child: {v:#}"
    );
    let v = violated(&mut m, "a tun the emulator opened", &|v| {
        v["reason"]
            .as_str()
            .unwrap()
            .contains("only the manager opens")
    });
    assert_eq!(v["evidence"][0]["pid"], pids[2], "{v:#}");
    assert_eq!(v["evidence"][0]["rdev"], "10:200", "{v:#}");
    // VM 3 stops: its emulator is gone, and the open of its second NIC is still held here.
    holder.end();
    append(&record(
        "VIRT_CONTROL",
        &mut serial,
        "op=stop reason=destroyed vm=\"vme3\" uuid=7e57c0de-0000-4000-8000-00000000e003 vm-pid=0",
    ));
    let v = violated(&mut m, "opened, not passed, still held", &|v| {
        v["reason"]
            .as_str()
            .unwrap()
            .contains("still held by the manager")
    });
    let e = &v["evidence"][0];
    use std::os::fd::AsRawFd as _;
    assert_eq!(
        (e["pid"].as_u64(), e["fd"].as_i64()),
        (Some(u64::from(me)), Some(i64::from(kept.as_raw_fd()))),
        "{v:#}"
    );
    let (code, _) = m.stop();
    assert_eq!(code, 7);
    drop((conn, sender, leaker, opener, taps));
}
