//! Hostile input: specs, control-socket requests and journals made to break vmaudit. Each ends
//! in one clear line on stderr and a documented exit code, and leaves nothing behind (cgroups,
//! links, tap nodes, run directories, pins, BPF programs, emulator processes, compared before
//! and after).

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
};

use serde_json::Value;
use vmaudit::audit::{
    Journal,
    record::{ControlOp, NetChange, Record, StartReason, VmIdent},
    sink::KernelOutcome,
};
use vmaudit_tests::{
    Bins, TapGuard, TempDir, VethGuard, bins,
    hardening::{Snapshot, run_vmaudit_as, run_vmaudit_unprivileged},
    require_root, run_vmaudit,
    vmrun::VmRun,
};

const UUID: &str = "4d3c2b1a-0f9e-4d8c-9b7a-6e5f4d3c2b1a";

/// Asserts one line on stderr holding `msg`, and the exit code.
fn one_line(what: &str, (code, _out, err): &(i32, String, String), want: i32, msg: &str) {
    assert_eq!(*code, want, "{what}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{what}: one line: {err}");
    assert!(err.contains(msg), "{what}: {err:?} lacks {msg:?}");
}

fn run_spec(bins: &Bins, dir: &Path, text: &str) -> (i32, String, String) {
    let spec = dir.join("vm.toml");
    std::fs::write(&spec, text).unwrap();
    let journal = dir.join("j.jsonl");
    run_vmaudit(
        bins,
        &[
            "run",
            spec.to_str().unwrap(),
            "--audit",
            "journal",
            "--journal",
            journal.to_str().unwrap(),
        ],
    )
}

#[test]
fn hostile_specs_are_refused_with_one_line_and_leave_nothing() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("hostile-spec");
    let before = Snapshot::take();
    let veth = VethGuard::new("vmhsv0");
    let head = |name: &str| format!("name = \"{name}\"\nuuid = \"{UUID}\"\n");
    let h = head("vmaudit-hs");
    let fake = bins.fake_emulator.display().to_string();
    let iface = "[[interface]]\nmac = \"52:54:00:00:90:01\"\n";
    let cases: Vec<(&str, String, i32, &str)> = vec![
        (
            "a comma in the name",
            head("a,b"),
            10,
            "name: `a,b` holds `,`",
        ),
        ("a newline in the name", head("a\\nb"), 10, "name: "),
        (
            "a slash in the name",
            head("a/b"),
            10,
            "name: `a/b` holds `/`",
        ),
        ("a leading dot", head(".x"), 10, "starts with `.`"),
        ("a quote in the name", head("a'b"), 10, "holds `'`"),
        ("an empty name", head(""), 10, "name: must be 1-64 bytes"),
        (
            "a name over 64 bytes",
            head(&"n".repeat(65)),
            10,
            "name: must be 1-64 bytes",
        ),
        (
            "a machine with options",
            format!("{h}[emulator]\nmachine = \"pc,accel=kvm\"\n"),
            10,
            "emulator.machine: ",
        ),
        (
            "an empty machine",
            format!("{h}[emulator]\nmachine = \"\"\n"),
            10,
            "emulator.machine: ",
        ),
        (
            "the old {qmp}",
            format!("{h}[emulator]\nargs = [\"-qmp\", \"unix:{{qmp}},server=on\"]\n"),
            10,
            "emulator.args[1]: `{qmp}` is gone",
        ),
        (
            "a NUL in an argument",
            format!("{h}[emulator]\nargs = [\"a\\u0000b\"]\n"),
            10,
            "emulator.args[0]: ",
        ),
        (
            "a newline in the emulator path",
            format!("{h}[emulator]\npath = \"/bin/x\\ny\"\n"),
            10,
            "emulator.path: ",
        ),
        (
            "no memory",
            format!("{h}[emulator]\nmemory_mib = 0\n"),
            10,
            "emulator.memory_mib: 16 to 1048576",
        ),
        (
            "root as the emulator's user",
            format!("{h}[emulator]\nuser = \"root\"\n"),
            10,
            "emulator.user: `root` is root",
        ),
        (
            "uid 0 as the emulator's user",
            format!("{h}[emulator]\nuser = \"0\"\n"),
            10,
            "emulator.user: `0` is root",
        ),
        (
            "an unknown user",
            format!("{h}[emulator]\nuser = \"vmaudit-nobody-here\"\n"),
            10,
            "emulator.user: no user `vmaudit-nobody-here`",
        ),
        (
            "root's group",
            format!("{h}[emulator]\ngroup = \"root\"\n"),
            10,
            "emulator.group: group root is root's group",
        ),
        (
            "a bad category",
            format!("{h}[[acl]]\nmajor = 136\ncategory = \"p t\"\n"),
            10,
            "acl[0].category: ",
        ),
        (
            "a major out of range",
            format!("{h}[[acl]]\nmajor = 5000\ncategory = \"x\"\n"),
            10,
            "acl[0].major: 0 to 4095",
        ),
        (
            "an access outside rwm",
            format!("{h}[[acl]]\npath = \"/dev/null\"\nacl = \"rx\"\n"),
            10,
            "acl[0].acl: `rx` is not a subset of rwm",
        ),
        (
            "a relative device path",
            format!("{h}[[acl]]\npath = \"dev/null\"\n"),
            10,
            "acl[0].path: `dev/null` is not an absolute path",
        ),
        (
            "a missing device",
            format!("{h}[[acl]]\npath = \"/dev/vmaudit-none\"\n"),
            10,
            "acl[0].path: `/dev/vmaudit-none` does not exist",
        ),
        (
            "a file as a device",
            format!("{h}[[acl]]\npath = \"/etc/passwd\"\n"),
            10,
            "acl[0].path: /etc/passwd is not a character or block device",
        ),
        (
            "both path and major",
            format!("{h}[[acl]]\npath = \"/dev/null\"\nmajor = 1\ncategory = \"x\"\n"),
            10,
            "acl[0]: give either `path` or `major`",
        ),
        (
            "a type neither char nor block",
            format!("{h}[[acl]]\nmajor = 1\ncategory = \"x\"\ntype = \"pipe\"\n"),
            10,
            "acl[0].type: ",
        ),
        (
            "`..` in the cgroup parent",
            format!("{h}[cgroup]\nparent = \"vmaudit/../..\"\n"),
            10,
            "cgroup.parent: ",
        ),
        (
            "an absolute cgroup parent",
            format!("{h}[cgroup]\nparent = \"/sys/fs/cgroup\"\n"),
            10,
            "cgroup.parent: must be relative",
        ),
        (
            "an empty cgroup component",
            format!("{h}[cgroup]\nparent = \"a//b\"\n"),
            10,
            "cgroup.parent: ",
        ),
        (
            "an unknown cgroup version",
            format!("{h}[cgroup]\nversion = \"v3\"\n"),
            10,
            "unknown variant `v3`",
        ),
        (
            "an ifname over 15 bytes",
            format!("{h}{iface}ifname = \"vmaudit-16-bytes\"\n"),
            10,
            "interface[0].ifname: `vmaudit-16-bytes` is not a valid interface name (1-15 bytes; it has 16)",
        ),
        (
            "a template ifname",
            format!("{h}{iface}ifname = \"vm%d\"\n"),
            10,
            "interface[0].ifname: ",
        ),
        (
            "a colon in the ifname",
            format!("{h}{iface}ifname = \"vm:0\"\n"),
            10,
            "interface[0].ifname: ",
        ),
        (
            "a duplicate ifname",
            format!(
                "{h}{iface}ifname = \"vmhs0\"\n[[interface]]\nmac = \"52:54:00:00:90:02\"\nifname = \"vmhs0\"\n"
            ),
            10,
            "interface[1].ifname: duplicate interface name vmhs0",
        ),
        (
            "no queues",
            format!("{h}{iface}queues = 0\n"),
            10,
            "interface[0].queues: must be 1 to 16",
        ),
        (
            "too many queues",
            format!("{h}{iface}queues = 17\n"),
            10,
            "interface[0].queues: must be 1 to 16",
        ),
        (
            "a macvtap without parent",
            format!("{h}{iface}backend = \"macvtap\"\n"),
            10,
            "interface[0].parent: macvtap needs a parent link",
        ),
        (
            "a tap with a parent",
            format!("{h}{iface}parent = \"vmhsv0\"\n"),
            10,
            "interface[0].parent: only a macvtap interface has a parent",
        ),
        (
            "a missing parent link",
            format!("{h}{iface}backend = \"macvtap\"\nparent = \"vmhs-none\"\n"),
            10,
            "interface[0].parent: no link named `vmhs-none`",
        ),
        (
            "a multicast MAC",
            format!("{h}[[interface]]\nmac = \"01:00:5e:00:00:01\"\n"),
            10,
            "is a multicast MAC address",
        ),
        (
            "a duplicate MAC",
            format!("{h}{iface}{iface}"),
            10,
            "interface[1].mac: duplicate MAC 52:54:00:00:90:01",
        ),
        (
            "an unknown key",
            format!("{h}colour = \"red\"\n"),
            10,
            "unknown field `colour`",
        ),
        (
            "a bad uuid",
            "name = \"x\"\nuuid = \"not-a-uuid\"\n".into(),
            10,
            "`not-a-uuid` is not a UUID",
        ),
        (
            "a bad control owner",
            format!("{h}[control]\nowner = \"a b\"\n"),
            10,
            "control.owner: ",
        ),
        (
            "an unknown control owner",
            format!("{h}[control]\nowner = \"vmaudit-nobody-here\"\n"),
            10,
            "control.owner: no user",
        ),
        (
            "a missing emulator",
            format!("{h}[emulator]\npath = \"/nonexistent/qemu\"\n"),
            10,
            "emulator.path: `/nonexistent/qemu` not found",
        ),
    ];
    for (what, text, code, msg) in &cases {
        let got = run_spec(&bins, &tmp.0, text);
        one_line(what, &got, *code, msg);
        assert!(got.1.is_empty(), "{what}: stdout {:?}", got.1);
        assert!(
            !tmp.0.join("j.jsonl").exists(),
            "{what}: nothing journaled for a spec refused"
        );
    }
    // A cgroup of another manager where the VM's would go: refused, and left alone.
    let other = Path::new("/sys/fs/cgroup/unified/vmaudit/vmaudit-hs");
    assert!(
        Path::new("/sys/fs/cgroup/unified").is_dir(),
        "this test needs cgroup v2 at /sys/fs/cgroup/unified (HOST-FACTS)"
    );
    std::fs::create_dir_all(other).unwrap();
    let got = run_spec(
        &bins,
        &tmp.0,
        &format!("{h}[emulator]\npath = \"{fake}\"\n"),
    );
    let still = other.is_dir();
    std::fs::remove_dir(other).unwrap();
    one_line(
        "another manager's cgroup",
        &got,
        13,
        "exists and is not this VM's",
    );
    assert!(still, "another manager's cgroup is never removed");
    // The failed run's journal: its failure record, and an intact chain.
    let (vcode, _, verr) = run_vmaudit(&bins, &["verify", tmp.0.join("j.jsonl").to_str().unwrap()]);
    assert_eq!(vcode, 8, "{verr}");
    std::fs::remove_file(tmp.0.join("j.jsonl")).unwrap();
    // Names the host already has: a macvtap link's (the veth's peer), a tap's (another VM's,
    // persistent here): refused by the kernel (EEXIST; EBUSY with IFF_TUN_EXCL), audited as a
    // failed open, and the other link left as it was.
    let other = TapGuard::new("vmhs-other");
    let taken = [
        (
            "a macvtap name a link has",
            format!(
                "{h}[emulator]\npath = \"{fake}\"\n{iface}backend = \"macvtap\"\nparent = \"vmhsv0\"\nifname = \"vmhsv0-p\"\n"
            ),
            "interface 52:54:00:00:90:01: macvtap link: creating macvtap vmhsv0-p on vmhsv0",
        ),
        (
            "a tap another VM has",
            format!("{h}[emulator]\npath = \"{fake}\"\n{iface}ifname = \"vmhs-other\"\n"),
            "TUNSETIFF on /dev/net/tun for vmhs-other: Device or resource busy",
        ),
    ];
    for (what, text, msg) in &taken {
        let got = run_spec(&bins, &tmp.0, text);
        one_line(what, &got, 12, msg);
        let journal = tmp.0.join("j.jsonl");
        let failed: Vec<Value> = std::fs::read_to_string(&journal)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| v["reason"] == "open")
            .collect();
        assert_eq!(failed.len(), 1, "{what}: one failed open record");
        assert_eq!(failed[0]["result"], "failed", "{what}");
        std::fs::remove_file(&journal).unwrap();
    }
    assert!(Path::new("/sys/class/net/vmhsv0-p").exists());
    assert!(Path::new("/sys/class/net/vmhs-other").exists());
    drop(other);
    // Journals that cannot be written.
    let spec = tmp.0.join("vm.toml");
    std::fs::write(&spec, format!("{h}[emulator]\npath = \"{fake}\"\n")).unwrap();
    let s = spec.to_str().unwrap();
    for (what, journal, msg) in [
        (
            "an unwritable journal",
            "/proc/vmaudit/j.jsonl",
            "cannot open journal /proc/vmaudit/j.jsonl",
        ),
        (
            "a directory as the journal",
            tmp.0.to_str().unwrap(),
            "journal",
        ),
    ] {
        let got = run_vmaudit(
            &bins,
            &["run", s, "--audit", "journal", "--journal", journal],
        );
        one_line(what, &got, 11, msg);
    }
    // A journal another process writes (`flock`, holding the lock a writer takes).
    let busy = tmp.0.join("busy.jsonl");
    std::fs::write(&busy, "").unwrap();
    let mut holder = std::process::Command::new("flock")
        .args(["-x", busy.to_str().unwrap(), "sleep", "60"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + vmaudit_tests::PATIENCE;
    while nix::fcntl::Flock::lock(
        std::fs::File::open(&busy).unwrap(),
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .is_ok()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "flock never took the lock"
        );
        std::thread::yield_now();
    }
    let got = run_vmaudit(
        &bins,
        &[
            "run",
            s,
            "--audit",
            "journal",
            "--journal",
            busy.to_str().unwrap(),
        ],
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    one_line(
        "a journal being written",
        &got,
        11,
        "is being written by another process",
    );
    drop(veth);
    before.assert_back("hostile specs");
}

/// A VM with the stand-in emulator serving QMP, its control socket open to root and `nobody`.
fn control_vm(bins: &Bins) -> VmRun {
    let body = format!(
        "[emulator]\npath = \"{}\"\nargs = [\"--qmp-fd\", \"{{qmp-fd}}\"]\n[control]\nowner = \"nobody\"\n\
         [[interface]]\nmac = \"52:54:00:00:91:01\"\nifname = \"vmhc-boot\"\n",
        bins.fake_emulator.display()
    );
    VmRun::start(bins, "vmaudit-hc", UUID, &body, &[])
}

/// Sends raw bytes to the control socket and returns the answer.
fn raw(name: &str, bytes: &[u8]) -> Value {
    let mut s = UnixStream::connect(format!("/run/vmaudit/{name}/control.sock")).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

#[test]
fn hostile_requests_are_refused_with_one_line_and_leave_nothing() {
    require_root();
    let bins = bins!();
    let outside = Snapshot::take();
    let veth = VethGuard::new("vmhcv0");
    let mut vm = control_vm(&bins);
    vm.emulator_pid();
    let running = Snapshot::take();
    let vm_name = "vmaudit-hc";
    let ok_mac = "52:54:00:00:91:02";
    let cases: Vec<(&str, Vec<&str>, i32, &str)> = vec![
        (
            "a bad MAC",
            vec!["attach-net", vm_name, "--mac", "52:54:00:zz:00:01"],
            16,
            "bad request: mac: ",
        ),
        (
            "a multicast MAC",
            vec!["attach-net", vm_name, "--mac", "01:00:5e:00:00:01"],
            16,
            "multicast",
        ),
        (
            "an ifname over 15 bytes",
            vec![
                "attach-net",
                vm_name,
                "--mac",
                ok_mac,
                "--ifname",
                "vmaudit-16-bytes",
            ],
            16,
            "bad request: ifname: `vmaudit-16-bytes` is not a valid interface name (1-15 bytes; it has 16)",
        ),
        (
            "a template ifname",
            vec!["attach-net", vm_name, "--mac", ok_mac, "--ifname", "vm%d"],
            16,
            "bad request: ifname: ",
        ),
        (
            "no queues",
            vec!["attach-net", vm_name, "--mac", ok_mac, "--queues", "0"],
            16,
            "bad request: queues: must be 1 to 16",
        ),
        (
            "too many queues",
            vec!["attach-net", vm_name, "--mac", ok_mac, "--queues", "99"],
            16,
            "bad request: queues: must be 1 to 16",
        ),
        (
            "a macvtap without parent",
            vec![
                "attach-net",
                vm_name,
                "--mac",
                ok_mac,
                "--backend",
                "macvtap",
            ],
            16,
            "bad request: parent: macvtap needs a parent link",
        ),
        (
            "a tap with a parent",
            vec!["attach-net", vm_name, "--mac", ok_mac, "--parent", "vmhcv0"],
            16,
            "bad request: parent: only a macvtap",
        ),
        (
            "a missing parent",
            vec![
                "attach-net",
                vm_name,
                "--mac",
                ok_mac,
                "--backend",
                "macvtap",
                "--parent",
                "vmhc-none",
            ],
            16,
            "attach 52:54:00:00:91:02 failed at open",
        ),
        (
            "the MAC of a NIC it has",
            vec!["attach-net", vm_name, "--mac", "52:54:00:00:91:01"],
            16,
            "already has an interface with MAC 52:54:00:00:91:01",
        ),
        (
            "the name of a link the host has",
            vec!["attach-net", vm_name, "--mac", ok_mac, "--ifname", "lo"],
            16,
            "ifname: an interface named lo exists already",
        ),
        (
            "the name of its own NIC",
            vec![
                "attach-net",
                vm_name,
                "--mac",
                ok_mac,
                "--ifname",
                "vmhc-boot",
            ],
            16,
            "exists already",
        ),
        (
            "a detach of a MAC it lacks",
            vec!["detach-net", vm_name, "--mac", ok_mac],
            16,
            "the VM has no interface with MAC 52:54:00:00:91:02",
        ),
        (
            "a detach with no time",
            vec!["detach-net", vm_name, "--mac", ok_mac, "--timeout-ms", "0"],
            16,
            "bad request: timeout_ms: 1 to 60000",
        ),
        (
            "a detach with an hour",
            vec![
                "detach-net",
                vm_name,
                "--mac",
                ok_mac,
                "--timeout-ms",
                "3600000",
            ],
            16,
            "bad request: timeout_ms: 1 to 60000",
        ),
        (
            "a VM that does not run",
            vec!["attach-net", "vmaudit-none", "--mac", ok_mac],
            3,
            "no VM named \"vmaudit-none\" runs under vmaudit",
        ),
    ];
    for (what, args, code, msg) in &cases {
        let got = run_vmaudit(&bins, args);
        one_line(what, &got, *code, msg);
        running.assert_back(what);
    }
    // Raw bytes on the socket.
    let raws: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not JSON", b"hello\n".to_vec(), "bad request: "),
        (
            "an unknown op",
            b"{\"op\":\"reboot\"}\n".to_vec(),
            "bad request: unknown variant `reboot`",
        ),
        (
            "an unknown field",
            format!("{{\"op\":\"attach-net\",\"mac\":\"{ok_mac}\",\"vhost\":true}}\n").into_bytes(),
            "bad request: unknown field `vhost`",
        ),
        ("an empty request", b"\n".to_vec(), "bad request: empty"),
        (
            "a request over 64 KiB",
            [vec![b'{'; 70_000], b"\n".to_vec()].concat(),
            "request longer than 65536 bytes",
        ),
        (
            "bytes that are not UTF-8",
            b"\xff\xfe\n".to_vec(),
            "bad request: not UTF-8",
        ),
    ];
    for (what, bytes, msg) in &raws {
        let a = raw(vm_name, bytes);
        assert_eq!(a["code"], 16, "{what}: {a}");
        assert_eq!(a["ok"], false, "{what}: {a}");
        let m = a["message"].as_str().unwrap();
        assert!(m.contains(msg) && !m.contains('\n'), "{what}: {m:?}");
        running.assert_back(what);
    }
    // A client that connects and says nothing is answered after the read timeout; meanwhile
    // the loop serves others.
    let mut idle = UnixStream::connect(format!("/run/vmaudit/{vm_name}/control.sock")).unwrap();
    let t0 = std::time::Instant::now();
    let got = run_vmaudit(&bins, &["detach-net", vm_name, "--mac", ok_mac]);
    one_line(
        "a request beside an idle client",
        &got,
        16,
        "no interface with MAC",
    );
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(4),
        "served at once beside the idle client"
    );
    let mut out = String::new();
    idle.read_to_string(&mut out).unwrap();
    let a: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        a["message"]
            .as_str()
            .unwrap()
            .contains("no request within 5s"),
        "{a}"
    );
    // Another uid than root or the owner: refused by SO_PEERCRED (given the capabilities to
    // reach the 0700 directory, as a bind mount of the socket would give it).
    let got = run_vmaudit_as(&bins, "daemon", &["attach-net", vm_name, "--mac", ok_mac]);
    one_line(
        "a stranger's request",
        &got,
        4,
        "permission denied: uid 1 is neither root nor this VM's control owner",
    );
    // Without CAP_DAC_OVERRIDE the socket's mode refuses the connection itself: that is a
    // refusal too (4), not a missing VM (3).
    let got = run_vmaudit_unprivileged(&bins, "daemon", &["attach-net", vm_name, "--mac", ok_mac]);
    one_line(
        "a plain user's request",
        &got,
        4,
        &format!("permission denied: the control socket of VM \"{vm_name}\" is root's"),
    );
    // The owner passes the check (its bad request then fails on its own merits).
    let got = run_vmaudit_as(&bins, "nobody", &["attach-net", vm_name, "--mac", "bad"]);
    one_line("the owner's request", &got, 16, "bad request: mac: ");
    running.assert_back("peer credentials");
    // The VM still runs: stop it, and the host is as before.
    let (code, journal) = vm.stop();
    assert!(code == 0 || code == 8, "stopped: {code}");
    let (vcode, _, verr) = run_vmaudit(&bins, &["verify", journal.to_str().unwrap()]);
    assert!(vcode == 0 || vcode == 8, "an intact journal: {verr}");
    drop(veth);
    outside.assert_back("hostile requests");
}

/// A chained journal of a few records, written by vmaudit's own journal writer.
fn journal(path: &Path) -> Vec<String> {
    let vm = VmIdent::new(
        "qemu",
        "vmaudit-hj",
        vmaudit::audit::Uuid::parse_str(UUID).unwrap(),
    );
    let j = Journal::open(path).unwrap();
    for r in [
        Record::net_open(&vm, "52:54:00:00:92:01", "/dev/net/tun".as_ref(), None).fd(7),
        Record::net(&vm, NetChange::Start, "52:54:00:00:92:01"),
        Record::control(&vm, ControlOp::Start(StartReason::Booted), 42),
        Record::net(&vm, NetChange::Attach, "52:54:00:00:92:02"),
        Record::net(&vm, NetChange::Detach, "52:54:00:00:92:02"),
    ] {
        j.append(&r.build().unwrap(), &KernelOutcome::NotRequested)
            .unwrap();
    }
    drop(j);
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

#[test]
fn hostile_journals_are_told_apart_from_broken_ones() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("hostile-journal");
    let path = tmp.0.join("j.jsonl");
    let lines = journal(&path);
    let p = path.to_str().unwrap();
    let verify = || run_vmaudit(&bins, &["verify", p, "--json"]);
    // Intact: records without verdicts, so unverified (8), and no complaint.
    let (code, _, err) = verify();
    assert_eq!((code, err.as_str()), (8, ""), "intact");
    let tampered: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "a line removed",
            [&lines[..2], &lines[3..]].concat(),
            "1 line(s) removed",
        ),
        (
            "a line edited",
            {
                let mut l = lines.clone();
                l[1] = l[1].replace("52:54:00:00:92:01", "52:54:00:00:92:09");
                l
            },
            "line 2 was edited",
        ),
        (
            "two lines swapped",
            {
                let mut l = lines.clone();
                l.swap(1, 2);
                l
            },
            "reordered",
        ),
        (
            "the first lines removed",
            lines[2..].to_vec(),
            "the journal starts at seq 3",
        ),
        (
            "a garbled line",
            {
                let mut l = lines.clone();
                l[3] = "{\"type\":".into();
                l
            },
            "line 4 is not a journal line",
        ),
        (
            "a line stripped of its chain",
            {
                let mut l = lines.clone();
                l[4] = l[4].split(",\"seq\"").next().unwrap().to_owned() + "}";
                l
            },
            "line 5 has no sequence number",
        ),
        (
            "a line added",
            {
                let mut l = lines.clone();
                l.insert(2, l[1].clone());
                l
            },
            "reordered or repeated",
        ),
    ];
    for (what, l, msg) in &tampered {
        write_lines(&path, l);
        one_line(what, &verify(), 7, msg);
    }
    // A torn last line: counted and skipped, never a failure to read.
    write_lines(&path, &lines);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"{\"ts\":\"2026")
        .unwrap();
    one_line(
        "a torn last line",
        &verify(),
        8,
        "a torn last line (a write cut short) is skipped",
    );
    let got = run_vmaudit(&bins, &["search", "--vm", "vmaudit-hj", "--json", p]);
    one_line(
        "search over a torn line",
        &got,
        0,
        "1 torn last line skipped",
    );
    // Not journals at all.
    std::fs::write(&path, b"\x00\x01binary\xff\n").unwrap();
    one_line("binary garbage", &verify(), 11, "is not a vmaudit journal");
    one_line(
        "a missing journal",
        &run_vmaudit(&bins, &["verify", "/nonexistent/j.jsonl"]),
        11,
        "reading journal /nonexistent/j.jsonl",
    );
    one_line(
        "a directory",
        &run_vmaudit(&bins, &["verify", tmp.0.to_str().unwrap()]),
        11,
        "reading journal",
    );
    let got = run_vmaudit(&bins, &["search", "--json", p]);
    one_line("search over garbage", &got, 11, "is not a vmaudit journal");
}
