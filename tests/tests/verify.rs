//! The verifier against misbehaviour real qemu will not produce (a stand-in emulator that does
//! it on purpose) and against a clean run of real qemu. Every wait is on a verdict line.

use std::{os::unix::net::UnixListener, path::Path, thread};

use serde_json::Value;
use vmaudit_tests::{Bins, Helper, TempDir, bins, require_root, run_vmaudit, vmrun::VmRun};

const UUID: &str = "3f9e8d7c-6b5a-4a39-8281-706f5e4d3c2b";

/// `vmaudit run` of a one-tap VM named `name`; `emulator` is the spec's `[emulator]` table,
/// `extra` more spec text.
struct Vm;

impl Vm {
    #[allow(clippy::new_ret_no_self)]
    fn start(bins: &Bins, name: &str, emulator: &str, extra: &str, flags: &[&str]) -> VmRun {
        let body = format!(
            "{emulator}\n[[interface]]\nmac = \"52:54:00:00:50:01\"\nifname = \"{}\"\n{extra}",
            &name[..name.len().min(12)]
        );
        VmRun::start(bins, name, UUID, &body, flags)
    }
}

/// Waits for a verdict matching `pred`.
fn verdict(vm: &mut VmRun, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    vm.json(what, |v| v["type"] == "verdict" && pred(v))
}

fn violation(vm: &mut VmRun, what: &str, reason_contains: &str) -> Value {
    verdict(vm, what, |v| {
        v["status"] == "violated" && v["reason"].as_str().unwrap().contains(reason_contains)
    })
}

fn fake(bins: &Bins, mode: &[&str]) -> String {
    let args: Vec<String> = ["--mode"]
        .iter()
        .chain(mode)
        .map(|a| format!("\"{a}\""))
        .collect();
    format!(
        "[emulator]\npath = \"{}\"\nargs = [{}]\n",
        bins.fake_emulator.display(),
        args.join(", ")
    )
}

/// A one-tap VM run by `vmaudit run` on the stand-in emulator in `mode`.
fn fake_vm(bins: &Bins, name: &str, mode: &[&str]) -> VmRun {
    Vm::start(bins, name, &fake(bins, mode), "", &[])
}

/// Stops the VM; `run` ends with 7, a violation found.
fn ends_violated(vm: VmRun) {
    let (code, _) = vm.stop();
    assert_eq!(code, 7, "a violation was found: vmaudit run exits 7");
}

fn verify_json(bins: &Bins, journal: &Path) -> (i32, Value) {
    let (code, out, err) = run_vmaudit(bins, &["verify", journal.to_str().unwrap(), "--json"]);
    (
        code,
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}")),
    )
}

#[test]
fn a_clean_run_of_real_qemu_is_confirmed_claim_by_claim() {
    require_root();
    let bins = bins!();
    let mut vm = Vm::start(&bins, "vmaudit-v-clean", "", "", &[]);
    vm.emulator_pid();
    verdict(&mut vm, "net-start", |v| {
        v["claim"]["kind"] == "net-start" && v["status"] == "confirmed"
    });
    let (code, journal) = vm.stop();
    assert_eq!(code, 0);
    let (code, report) = verify_json(&bins, &journal);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["totals"]["violated"], 0);
    assert_eq!(report["totals"]["unconfirmed"], 0);
    assert_eq!(report["unverified"], 0);
    let rows = report["rows"].as_array().unwrap();
    assert!(
        rows.iter().all(|r| r["status"] == "confirmed"),
        "{report:#}"
    );
    // Each kind of claim was confirmed with kernel evidence.
    let verdicts: Vec<Value> = std::fs::read_to_string(&*journal)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] == "verdict")
        .collect();
    for kind in ["net-open", "net-start", "cgroup", "vm-start", "vm-stop"] {
        let v = verdicts
            .iter()
            .find(|v| v["claim"]["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} verdict"));
        assert_eq!(v["status"], "confirmed", "{v:#}");
        assert!(
            !v["evidence"].as_array().unwrap().is_empty(),
            "{kind}: confirmed without evidence: {v:#}"
        );
    }
    let start = verdicts
        .iter()
        .find(|v| v["claim"]["kind"] == "net-start")
        .unwrap();
    let e = &start["evidence"][0];
    // The kernel's open-file-description ids say it is vmaudit's open file; kcmp agrees.
    let detail = e["detail"].as_str().unwrap();
    assert!(
        detail.contains("open-file-description id is the one of the manager's fd")
            && detail.contains("kcmp at hand-off agrees"),
        "{start:#}"
    );
    assert!(
        e["ts"].as_u64().unwrap() > 0 && e["what"] == "inherit",
        "{start:#}"
    );
}

#[test]
fn an_emulator_that_closes_a_passed_fd_is_caught() {
    require_root();
    let bins = bins!();
    let mut vm = fake_vm(&bins, "vmaudit-v-close", &["close-later"]);
    let emu = vm.emulator_pid();
    verdict(&mut vm, "net-start", |v| {
        v["claim"]["kind"] == "net-start" && v["status"] == "confirmed"
    });
    // The stand-in handles SIGUSR1 once it says it is ready.
    vm.stderr_line("fake-emulator ready", |l| {
        l.starts_with("fake-emulator: ready")
    });
    // SAFETY: SIGUSR1 to the stand-in: it closes the passed fds and keeps running.
    unsafe { libc::kill(emu as i32, libc::SIGUSR1) };
    let v = violation(&mut vm, "released", "released fd");
    assert_eq!(v["claim"]["kind"], "net-start");
    assert_eq!(v["evidence"][0]["what"], "close");
    let (code, journal) = vm.stop();
    assert_eq!(code, 7, "a violation was found");
    let (code, report) = verify_json(&bins, &journal);
    assert_eq!(
        (code, report["totals"]["violated"].as_u64()),
        (7, Some(1)),
        "{report:#}"
    );
}

#[test]
fn a_passed_fd_escaping_into_a_child_is_caught() {
    require_root();
    let bins = bins!();
    let mut vm = fake_vm(&bins, "vmaudit-v-leak", &["leak-child"]);
    vm.emulator_pid();
    let v = violation(&mut vm, "escape", "is also held by fake-emulator");
    assert!(
        v["reason"].as_str().unwrap().ends_with("(inherit)"),
        "{v:#}"
    );
    assert!(
        v["evidence"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("kcmp"),
        "{v:#}"
    );
    ends_violated(vm);
}

#[test]
fn a_passed_fd_sent_to_a_stranger_is_caught() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("v-stranger");
    let sock = tmp.0.join("stranger.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    // The emulator runs as an unprivileged user: let it connect.
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let stranger = thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 8];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        use std::os::fd::AsRawFd as _;
        let msg = nix::sys::socket::recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
        msg.cmsgs().unwrap().count()
    });
    let mut vm = fake_vm(
        &bins,
        "vmaudit-v-send",
        &["send-stranger", "--to", sock.to_str().unwrap()],
    );
    vm.emulator_pid();
    let v = violation(&mut vm, "send", "through SCM_RIGHTS");
    assert_eq!(v["evidence"][0]["what"], "send_fd");
    assert_eq!(stranger.join().unwrap(), 1, "the stranger received the fd");
    ends_violated(vm);
}

#[test]
fn a_network_device_the_emulator_opens_itself_is_caught() {
    require_root();
    let bins = bins!();
    // The ACL lets it open the tun device; still, no claim passed it that fd. It runs as an
    // unprivileged user, for whom /dev/net/tun is closed (0600): a node of the same device
    // (c 10:200) it may open stands in for a host whose /dev/net/tun is open to it.
    let tmp = TempDir::new("v-tun");
    let node = tmp.0.join("tun");
    vmaudit_tests::sh(
        "mknod",
        &["-m", "0666", node.to_str().unwrap(), "c", "10", "200"],
    );
    let mut vm = Vm::start(
        &bins,
        "vmaudit-v-tun",
        &fake(&bins, &["open-tun", "--device", node.to_str().unwrap()]),
        &format!("[[acl]]\npath = \"{}\"\n", node.display()),
        &[],
    );
    vm.emulator_pid();
    let v = violation(&mut vm, "unclaimed tun", "only the manager opens");
    assert_eq!(v["claim"]["kind"], "unclaimed");
    assert_eq!(v["evidence"][0]["rdev"], "10:200");
    ends_violated(vm);
}

#[test]
fn a_device_map_changed_behind_vmaudits_back_is_caught() {
    require_root();
    let bins = bins!();
    let mut vm = fake_vm(&bins, "vmaudit-v-map", &["hold"]);
    vm.emulator_pid();
    verdict(&mut vm, "cgroup", |v| {
        v["claim"]["kind"] == "cgroup" && v["status"] == "confirmed"
    });
    // Allow /dev/net/tun (c 10:200 rw) in the VM's device map, with libvirt's layout.
    let info = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .find(|m| m.name_as_str() == Some("DEVCG_RULES"))
        .expect("the VM's device map");
    let data = aya::maps::MapData::from_id(info.id()).unwrap();
    let mut map: aya::maps::HashMap<_, u64, u32> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
    map.insert((10u64 << 32) | 200, ((2 | 4) << 16) | 2, 0)
        .unwrap();
    let v = violation(&mut vm, "extra map rule", "which no claim made");
    assert_eq!(v["claim"]["kind"], "unclaimed");
    // A process of the VM's cgroup now opens /dev/net/tun: the kernel allows it, the claims do not.
    let cgroup = std::fs::read_to_string(&vm.journal)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find_map(|r| {
            r["cgroup"]
                .as_str()
                .map(|c| c.trim_end_matches('/').to_owned())
        })
        .unwrap();
    let mut h = Helper::spawn(&bins);
    std::fs::write(Path::new(&cgroup).join("cgroup.procs"), h.pid().to_string()).unwrap();
    h.fd("open /dev/net/tun");
    let v = violation(
        &mut vm,
        "decision",
        "the kernel allowed a device access the claimed ACL does not",
    );
    assert_eq!(v["evidence"][0]["pid"], h.pid());
    drop(h);
    ends_violated(vm);
}

#[test]
fn strict_stops_the_vm_at_the_first_violation() {
    require_root();
    let bins = bins!();
    let mut vm = Vm::start(
        &bins,
        "vmaudit-v-strict",
        &fake(&bins, &["leak-child"]),
        "",
        &["--strict"],
    );
    let emu = vm.emulator_pid();
    let (code, journal) = vm.wait();
    assert_eq!(code, 7, "--strict exits 7");
    assert!(
        !Path::new(&format!("/proc/{emu}")).exists(),
        "the VM was stopped"
    );
    let text = std::fs::read_to_string(&*journal).unwrap();
    assert!(text.contains("op=stop reason=destroyed"), "{text}");
    // The escaped child was in the VM's cgroup too: it is gone with the cgroup.
    let cgroup = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find_map(|r| {
            r["cgroup"]
                .as_str()
                .map(|c| c.trim_end_matches('/').to_owned())
        })
        .unwrap();
    assert!(!Path::new(&cgroup).exists(), "{cgroup} left behind");
}

#[test]
fn lost_events_make_verdicts_unknown() {
    require_root();
    let bins = bins!();
    let mut vm = Vm::start(
        &bins,
        "vmaudit-v-lost",
        &fake(&bins, &["flood", "200000"]),
        "",
        &["--ring-buffer-bytes", "4096"],
    );
    vm.emulator_pid();
    vm.stderr_line("fake-emulator ready", |l| {
        l.starts_with("fake-emulator: ready")
    });
    let (code, journal) = vm.stop();
    assert_eq!(
        code, 8,
        "nothing violated, something unknown: verify's exit code"
    );
    let verdicts: Vec<Value> = std::fs::read_to_string(&*journal)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] == "verdict")
        .collect();
    let stop = verdicts
        .iter()
        .find(|v| v["claim"]["kind"] == "vm-stop")
        .expect("a vm-stop verdict");
    assert_eq!(stop["status"], "unknown", "{stop:#}");
    assert!(
        stop["reason"]
            .as_str()
            .unwrap()
            .contains("kernel events were lost"),
        "{stop:#}"
    );
    assert!(
        verdicts.iter().all(|v| v["status"] != "violated"),
        "{verdicts:#?}"
    );
    let (code, report) = verify_json(&bins, &journal);
    assert_eq!(code, 8, "{report:#}");
    assert!(report["totals"]["unknown"].as_u64().unwrap() >= 1);
}

/// The VM's cgroup directory, from its first cgroup record.
fn cgroup_of(vm: &VmRun) -> std::path::PathBuf {
    vm.journal_lines()
        .iter()
        .find_map(|r| r["cgroup"].as_str().map(|c| c.trim_end_matches('/').into()))
        .expect("a cgroup record")
}

/// The passed fd the stand-in emulator holds, from its ready line.
fn emulator_fd(vm: &mut VmRun) -> i32 {
    let ready = vm.stderr_line("fake-emulator ready", |l| {
        l.starts_with("fake-emulator: ready")
    });
    ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("fds="))
        .and_then(|f| f.split(',').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no fds= in {ready:?}"))
}

#[test]
fn a_nic_fd_copied_out_of_the_emulator_with_pidfd_getfd_is_caught() {
    require_root();
    let bins = bins!();
    let mut vm = fake_vm(&bins, "vmaudit-v-getfd", &["hold"]);
    let emu = vm.emulator_pid();
    let fd = emulator_fd(&mut vm);
    verdict(&mut vm, "net-start", |v| v["claim"]["kind"] == "net-start");
    // A process vmaudit does not watch (this test) takes a copy of the emulator's tap fd.
    // SAFETY: pidfd_open and pidfd_getfd take integers; the fds they return are owned below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, emu as libc::c_int, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: as above.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd as libc::c_int, fd, 0) };
    assert!(
        copy >= 0,
        "pidfd_getfd: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: both fds were just returned by the kernel and are owned by nothing else.
    let (_pidfd, _copy) = unsafe {
        use std::os::fd::FromRawFd as _;
        (
            std::os::fd::OwnedFd::from_raw_fd(pidfd as i32),
            std::os::fd::OwnedFd::from_raw_fd(copy as i32),
        )
    };
    let v = violation(&mut vm, "copy", "is also held by");
    let e = &v["evidence"][0];
    assert_eq!(
        (e["pid"].as_u64(), e["fd"].as_i64(), e["what"].as_str()),
        (
            Some(u64::from(std::process::id())),
            Some(copy),
            Some("kcmp")
        ),
        "{v:#}"
    );
    assert_eq!(v["claim"]["kind"], "net-start");
    ends_violated(vm);
}

#[test]
fn a_rule_removed_from_the_device_map_is_caught() {
    require_root();
    let bins = bins!();
    let mut vm = fake_vm(&bins, "vmaudit-v-rm", &["hold"]);
    vm.emulator_pid();
    verdict(&mut vm, "vm-start", |v| v["claim"]["kind"] == "vm-start");
    let mut map = vmaudit::cgroup::attached::RuleMap::of_cgroup(&cgroup_of(&vm)).unwrap();
    let null = vmaudit::cgroup::DeviceRule::parse_v1("c 1:3 rw").unwrap();
    map.remove(&null).unwrap();
    let v = violation(
        &mut vm,
        "rule removed",
        "c 1:3 rw is no longer in the device policy",
    );
    assert_eq!(v["claim"]["kind"], "cgroup");
    assert!(
        v["claim"]["text"]
            .as_str()
            .unwrap()
            .contains("path=\"/dev/null\""),
        "{v:#}"
    );
    assert_eq!(v["evidence"][0]["what"], "map");
    ends_violated(vm);
}

#[test]
fn the_device_program_detached_is_caught() {
    require_root();
    let bins = bins!();
    let mut vm = fake_vm(&bins, "vmaudit-v-det", &["hold"]);
    vm.emulator_pid();
    verdict(&mut vm, "vm-start", |v| v["claim"]["kind"] == "vm-start");
    let ids = vmaudit_tests::bpf::detach_device_programs(&cgroup_of(&vm));
    let v = violation(&mut vm, "program detached", "was detached");
    assert!(
        v["reason"].as_str().unwrap().contains(&format!("{ids:?}")),
        "names the program: {v:#}"
    );
    assert!(
        v["claim"]["text"].as_str().unwrap().contains("reason=deny"),
        "{v:#}"
    );
    ends_violated(vm);
}

#[test]
fn a_device_program_attached_beside_the_vms_is_caught() {
    require_root();
    let bins = bins!();
    let mut vm = fake_vm(&bins, "vmaudit-v-rep", &["hold"]);
    vm.emulator_pid();
    verdict(&mut vm, "vm-start", |v| v["claim"]["kind"] == "vm-start");
    let _allow_all = vmaudit_tests::bpf::AllowAll::attach(&cgroup_of(&vm));
    let v = violation(&mut vm, "program replaced", "was replaced");
    assert_eq!(v["claim"]["kind"], "cgroup");
    ends_violated(vm);
}

/// The cgroup v1 devices controller, end to end: every cgroup claim is confirmed from
/// `devices.list`, the emulator is confined by it, and a rule removed behind vmaudit's back
/// (written to `devices.deny`) is caught.
#[test]
fn a_cgroup_v1_vm_is_held_to_devices_list() {
    require_root();
    let bins = bins!();
    let h = vmaudit_tests::Hierarchies::get();
    let mut vm = Vm::start(
        &bins,
        "vmaudit-v-v1",
        &fake(&bins, &["hold"]),
        "[cgroup]\nversion = \"v1\"\n",
        &[],
    );
    let emu = vm.emulator_pid();
    verdict(&mut vm, "vm-start", |v| v["claim"]["kind"] == "vm-start");
    let cgroup = cgroup_of(&vm);
    assert!(
        cgroup.starts_with(&h.v1_devices),
        "{} is a v1 cgroup",
        cgroup.display()
    );
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|p| p == emu.to_string()),
        "the emulator is in it"
    );
    let cgroup_verdicts: Vec<Value> = vm
        .journal_lines()
        .into_iter()
        .filter(|v| v["type"] == "verdict" && v["claim"]["kind"] == "cgroup")
        .collect();
    assert_eq!(
        cgroup_verdicts.len(),
        9,
        "deny all, 7 paths, the pty major: {cgroup_verdicts:#?}"
    );
    for v in &cgroup_verdicts {
        assert_eq!(v["status"], "confirmed", "{v:#}");
        assert!(
            v["evidence"][0]["detail"]
                .as_str()
                .unwrap()
                .contains("devices.list")
                || v["evidence"][0]["what"] == "map",
            "{v:#}"
        );
    }
    std::fs::write(cgroup.join("devices.deny"), "c 1:3 rwm").unwrap();
    let v = violation(
        &mut vm,
        "v1 rule removed",
        "c 1:3 rw is no longer in the device policy",
    );
    assert_eq!(v["claim"]["kind"], "cgroup");
    ends_violated(vm);
}
