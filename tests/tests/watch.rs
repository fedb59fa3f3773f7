//! `vmaudit watch` against the real kernel: every way a process gains or loses an fd, each
//! asserted from vmaudit's own output; losses counted and repaired; bad input refused cleanly.

use std::{
    collections::BTreeSet,
    io::IoSlice,
    os::{fd::AsRawFd as _, unix::net::UnixStream},
};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde_json::Value;
use vmaudit_tests::{
    BindMount, ChildGuard, Helper, TempDir, VethGuard, Watch, bins, proc_fds, require_root,
    run_vmaudit, vmaudit_programs_gone,
};

fn fds_of(records: &[Value], pid: u32, op: &str) -> BTreeSet<i32> {
    records
        .iter()
        .filter(|v| v["type"] == "fd" && v["pid"] == pid && v["op"] == op)
        .filter_map(|v| v["fd"].as_i64().map(|f| f as i32))
        .collect()
}

fn ino(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).unwrap().ino()
}

#[test]
fn every_fd_transition_is_reported() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("transitions");
    let mut h = Helper::spawn(&bins);
    let pid = h.pid();
    let before = proc_fds(pid);
    let mut w = Watch::start(&bins, &["--pid", &pid.to_string(), "--follow-children"]);
    for fd in &before {
        w.wait_fd(pid, "seed", *fd);
    }

    // open (openat), with identity: path and rdev.
    let null = h.fd("open /dev/null");
    let r = w.wait_fd(pid, "open", null);
    // The seed (every record of it precedes the first event) is exactly what /proc showed.
    assert_eq!(fds_of(&w.seen, pid, "seed"), before);
    assert_eq!(
        (
            r["syscall"].as_str(),
            r["path"].as_str(),
            r["rdev"].as_str()
        ),
        (Some("openat"), Some("/dev/null"), Some("1:3"))
    );
    assert_eq!(
        (r["result"].as_str(), r["cloexec"].as_bool()),
        (Some("ok"), Some(false))
    );
    assert_eq!(r["tid"], pid, "single-threaded helper: tid is the pid");
    assert!(r["ts"].as_u64().unwrap() > 0, "kernel timestamp");
    // Read by the kernel program from the fd table at the syscall's exit: the inode, its
    // filesystem, the open flags and the open file description's id.
    assert_eq!(r["source"], "kernel", "{r}");
    assert_eq!(
        r["ino"].as_u64(),
        Some(ino(std::path::Path::new("/dev/null")))
    );
    assert_eq!(r["mode"].as_u64().map(|m| m & 0o170000), Some(0o020000));
    assert_eq!(
        r["flags"].as_u64().map(|f| f & 3),
        Some(libc::O_RDWR as u64)
    );
    let null_ofd = r["ofd"].as_u64().expect("an open-file-description id");

    // A tap device's fd carries its rdev 10:200.
    let tun = h.fd("open /dev/net/tun cloexec");
    let r = w.wait_fd(pid, "open", tun);
    assert_eq!(
        (r["rdev"].as_str(), r["cloexec"].as_bool()),
        (Some("10:200"), Some(true))
    );

    // openat2 and creat.
    let o2 = h.fd("openat2 /dev/zero");
    let r = w.wait_fd(pid, "open", o2);
    assert_eq!(
        (r["syscall"].as_str(), r["cloexec"].as_bool()),
        (Some("openat2"), Some(true))
    );
    let created = tmp.0.join("created");
    let cr = h.fd(&format!("creat {}", created.display()));
    let r = w.wait_fd(pid, "open", cr);
    assert_eq!(r["syscall"], "creat");
    assert_eq!(r["ino"].as_u64(), Some(ino(&created)));

    // A failed open is reported with its errno and changes nothing.
    let missing = tmp.0.join("missing");
    let reply = h.try_cmd(&format!("open_ro {}", missing.display()));
    assert!(reply.unwrap_err().contains("No such file"));
    let r = w.wait_for("failed open", |v| {
        v["op"] == "open" && v["result"] == "ENOENT"
    });
    assert_eq!(r["path"].as_str(), Some(missing.to_str().unwrap()));
    assert!(r["fd"].is_null());

    // dup, dup2 onto an open fd (an implicit close), dup3 with O_CLOEXEC, fcntl F_DUPFD(_CLOEXEC).
    let d = h.fd(&format!("dup {null}"));
    let r = w.wait_fd(pid, "dup", d);
    assert_eq!(
        (
            r["syscall"].as_str(),
            r["from_fd"].as_i64(),
            r["path"].as_str()
        ),
        (Some("dup"), Some(null as i64), Some("/dev/null"))
    );
    // A dup shares the open file description; another open of the same file does not.
    assert_eq!(r["ofd"].as_u64(), Some(null_ofd), "{r}");
    let again = h.fd("open /dev/null");
    let r2 = w.wait_fd(pid, "open", again);
    assert_ne!(r2["ofd"].as_u64(), Some(null_ofd), "{r2}");
    assert_eq!(r2["ino"], r["ino"]);
    let d2 = h.fd(&format!("dup2 {tun} {d}"));
    assert_eq!(d2, d);
    let r = w.wait_fd(pid, "replaced", d);
    assert_eq!(r["path"], "/dev/null");
    let r = w.wait_fd(pid, "dup", d);
    assert_eq!(
        (r["syscall"].as_str(), r["rdev"].as_str()),
        (Some("dup2"), Some("10:200"))
    );
    let d3 = h.fd(&format!("dup3 {null} 60"));
    let r = w.wait_fd(pid, "dup", d3);
    assert_eq!(
        (r["syscall"].as_str(), r["cloexec"].as_bool()),
        (Some("dup3"), Some(true))
    );
    let f1 = h.fd(&format!("dupfd {null} 70"));
    let r = w.wait_fd(pid, "dup", f1);
    assert_eq!(
        (r["syscall"].as_str(), r["cloexec"].as_bool(), f1),
        (Some("fcntl"), Some(false), 70)
    );
    let f2 = h.fd(&format!("dupfd_cloexec {null} 80"));
    let r = w.wait_fd(pid, "dup", f2);
    assert_eq!((r["cloexec"].as_bool(), f2), (Some(true), 80));

    // An fd arriving through SCM_RIGHTS from another (unwatched) process.
    let sock_path = tmp.0.join("sock");
    let listener = h.fd(&format!("listen {}", sock_path.display()));
    w.wait_fd(pid, "new", listener);
    let client = UnixStream::connect(&sock_path).unwrap();
    let conn = h.fd(&format!("accept {listener}"));
    w.wait_fd(pid, "new", conn);
    let passed_path = tmp.0.join("passed");
    let passed = std::fs::File::create(&passed_path).unwrap();
    let fds = [passed.as_raw_fd()];
    sendmsg::<()>(
        client.as_raw_fd(),
        &[IoSlice::new(b"x")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    let got: i32 = h.cmd(&format!("recvfd {conn}"))[0].parse().unwrap();
    let r = w.wait_fd(pid, "recv_fd", got);
    assert_eq!(r["syscall"], "recvmsg");
    assert_eq!(
        r["ino"].as_u64(),
        Some(ino(&passed_path)),
        "identity of the received file"
    );
    // The same open file description in both processes, by kcmp.
    assert!(vmaudit::kcmp::same_file(std::process::id(), passed.as_raw_fd(), pid, got).unwrap());
    // And by the kernel's id: the helper's pidfd_getfd of the received fd shares it too.
    let recv_ofd = r["ofd"].as_u64().expect("ofd of the received file");

    // pidfd_getfd. The pidfd it goes through comes first (and goes after).
    let pg_recv = h.fd(&format!("pidfd_getfd {got}"));
    let pidfd = w.wait_for("pidfd_open", |v| {
        v["op"] == "new" && v["syscall"] == "pidfd_open"
    })["fd"]
        .as_i64()
        .unwrap() as i32;
    let r = w.wait_fd(pid, "pidfd_getfd", pg_recv);
    assert_eq!(r["ofd"].as_u64(), Some(recv_ofd), "{r}");
    w.wait_fd(pid, "close", pidfd);
    let pg = h.fd(&format!("pidfd_getfd {null}"));
    let r = w.wait_for("pidfd_open", |v| {
        v["op"] == "new" && v["syscall"] == "pidfd_open"
    });
    let pidfd = r["fd"].as_i64().unwrap() as i32;
    let r = w.wait_fd(pid, "pidfd_getfd", pg);
    assert_eq!(
        (r["path"].as_str(), r["cloexec"].as_bool()),
        (Some("/dev/null"), Some(true))
    );
    w.wait_fd(pid, "close", pidfd);

    // pipe2 gives two fds.
    let pipe: Vec<i32> = h.cmd("pipe2").iter().map(|s| s.parse().unwrap()).collect();
    for fd in &pipe {
        let r = w.wait_fd(pid, "new", *fd);
        assert_eq!(
            (r["syscall"].as_str(), r["kind"].as_str()),
            (Some("pipe2"), Some("fifo"))
        );
    }

    // close and close_range.
    h.fd(&format!("close {f1}"));
    let r = w.wait_fd(pid, "close", f1);
    assert_eq!(r["path"], "/dev/null");
    h.fd(&format!(
        "close_range {} {}",
        pipe[0].min(pipe[1]),
        pipe[0].max(pipe[1])
    ));
    for fd in &pipe {
        w.wait_fd(pid, "close_range", *fd);
    }

    // fork: the followed child inherits every fd (the parent's, plus the two pipes the
    // helper makes for it), closes some, and exits holding exactly what /proc shows.
    let parent_before = proc_fds(pid);
    let child: u32 = h.fd(&format!("fork {null}")) as u32;
    let child_holds = proc_fds(child);
    // Fd numbers depend on what the test runner left open, so wait for a count, not a number.
    let want = parent_before.len() + 4;
    while fds_of(&w.seen, child, "inherit").len() < want {
        w.wait_for("inherit", |v| v["pid"] == child && v["op"] == "inherit");
    }
    let inherited = fds_of(&w.seen, child, "inherit");
    assert!(
        inherited.is_superset(&parent_before),
        "{inherited:?} ⊉ {parent_before:?}"
    );
    assert_eq!(
        inherited.len(),
        parent_before.len() + 4,
        "plus the helper's two pipes"
    );
    let r = w.wait_fd(child, "close", null);
    assert_eq!(r["path"], "/dev/null");
    h.cmd("reap");
    // Exit records come in fd order: the last one closes the set.
    w.wait_fd(child, "exit", *child_holds.last().unwrap());
    assert_eq!(
        fds_of(&w.seen, child, "exit"),
        child_holds,
        "the child released exactly what it held"
    );

    // exec: close-on-exec fds leave, the others stay.
    let open_now = proc_fds(pid);
    let cloexec_now: BTreeSet<i32> = open_now
        .iter()
        .copied()
        .filter(|fd| {
            let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .unwrap()
                .trim();
            u32::from_str_radix(flags, 8).unwrap() & libc::O_CLOEXEC as u32 != 0
        })
        .collect();
    assert!(cloexec_now.contains(&tun) && cloexec_now.contains(&d3));
    let before_exec = proc_fds(pid);
    writeln_helper_exec(&mut h);
    let after_exec = proc_fds(pid);
    w.wait_for("exec", |v| v["op"] == "exec_cloexec" && v["pid"] == pid);
    // Wait for the last one, then compare the whole set.
    let last = *before_exec.difference(&after_exec).max().unwrap();
    w.wait_fd(pid, "exec_cloexec", last);
    let left_by_exec: BTreeSet<i32> = before_exec.difference(&after_exec).copied().collect();
    assert_eq!(fds_of(&w.seen, pid, "exec_cloexec"), left_by_exec);
    assert!(left_by_exec.is_superset(&cloexec_now));

    // exit: every fd still held is released, vmaudit ends with code 6 and a summary.
    let final_fds = proc_fds(pid);
    let status = h.exit();
    assert!(status.success());
    let (code, records) = w.finish();
    assert_eq!(code, 6, "watched process exited");
    assert_eq!(
        fds_of(&records, pid, "exit"),
        final_fds,
        "exit releases the exact table"
    );
    let summary = records.last().unwrap();
    assert_eq!(summary["type"], "summary");
    assert_eq!(summary["lost_total"], 0);
    assert_eq!(summary["ended"], "exited");
    // Only the watched processes appear: the test's own opens were never reported.
    let me = std::process::id();
    assert!(records.iter().all(|v| v["pid"] != me));
    assert_eq!(vmaudit_programs_gone(), Ok(()), "programs left after exit");
}

#[test]
fn a_device_opened_again_keeps_its_path_through_each_mount() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("paths-again");
    // The same inode (/dev/null) under a second mount: its path differs by mount.
    let alias = tmp.0.join("null-alias");
    let _bind = BindMount::new(std::path::Path::new("/dev/null"), &alias);
    let mut h = Helper::spawn(&bins);
    let pid = h.pid();
    let mut w = Watch::start(&bins, &["--pid", &pid.to_string()]);
    let alias = alias.to_string_lossy().into_owned();
    // Each path twice in a row (the second gain of a dentry and mount reuses the path the
    // kernel side sent), then alternating (each change of mount walks again).
    let order = ["/dev/null", "/dev/null", alias.as_str(), alias.as_str()];
    for path in order.iter().chain(order.iter().rev()) {
        let fd = h.fd(&format!("open {path}"));
        let r = w.wait_fd(pid, "open", fd);
        assert_eq!(
            (r["path"].as_str(), r["rdev"].as_str(), r["source"].as_str()),
            (Some(*path), Some("1:3"), Some("kernel")),
            "{r}"
        );
        h.cmd(&format!("close {fd}"));
        w.wait_fd(pid, "close", fd);
    }
    w.finish_clean(h);
}

#[test]
fn the_floor_hook_drains_an_event_per_syscall_of_its_process() {
    require_root();
    let bins = bins!();
    let mut h = Helper::spawn(&bins);
    let pid = h.pid().to_string();
    let w = Watch::start_sub(
        &bins,
        "noop-hook",
        &["--emit-for", &pid],
        "floor hook attached",
    );
    // 1000 openat+close pairs: 2000 syscall exits, plus those of the helper's command I/O.
    h.cmd("flood 1000");
    let mut other = Helper::spawn(&bins);
    other.cmd("flood 1000");
    // SAFETY: kill with the pid of our own child.
    unsafe { libc::kill(w.pid() as i32, libc::SIGINT) };
    let last = w.wait_stderr(|l| l.contains("events drained"));
    let (code, records) = w.finish();
    assert_eq!(code, 0, "{last}");
    assert!(records.is_empty(), "{records:?}");
    let events: u64 = last
        .split_whitespace()
        .find_map(|word| word.parse().ok())
        .unwrap_or_else(|| panic!("no count in {last:?}"));
    // The other process's 2000 exits are not among them; the helper's own I/O adds a few.
    assert!((2000..2100).contains(&events), "{last}");
    h.exit();
    other.exit();
    vmaudit_programs_gone().expect("the floor program is detached at exit");
}

fn writeln_helper_exec(h: &mut Helper) {
    // The helper re-executes itself and says `ok exec` from the new image.
    assert_eq!(h.cmd("exec"), vec!["exec".to_owned()]);
}

#[test]
fn flood_overflows_the_ring_and_resyncs_the_table() {
    require_root();
    let bins = bins!();
    let mut h = Helper::spawn(&bins);
    let pid = h.pid();
    // The smallest ring (one page): a tight open/close loop overflows it.
    let mut w = Watch::start(
        &bins,
        &["--pid", &pid.to_string(), "--ring-buffer-bytes", "4096"],
    );
    h.fd("flood 200000");
    // State the resync must find: 50 fds opened right after the flood.
    h.fd("hold 50");
    let gap = w.wait_for("a gap", |v| v["type"] == "gap");
    assert_eq!(gap["pid"], pid);
    assert!(gap["causes"]["ring_full"].as_u64().unwrap() > 0, "{gap}");
    // The window the loss may lie in: from the last clean check (or the seed) to the resync.
    let (since, ts) = (
        gap["since_ns"].as_u64().unwrap(),
        gap["ts"].as_u64().unwrap(),
    );
    assert!(0 < since && since <= ts, "{gap}");
    // Markers: open /dev/full until one open is reported as an event (the ring has room
    // again), then one more. vmaudit checks for losses after every batch it reads, so once the
    // second marker is reported (as an event, or found by a resync) every loss before the
    // first has been repaired.
    let seen_as = |w: &mut Watch, fd: i32| {
        w.wait_for("marker", |v| {
            v["pid"] == pid && v["fd"] == fd && (v["op"] == "open" || v["op"] == "resync_add")
        })["op"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let mut rounds = 0;
    while seen_as(&mut w, h.fd("open /dev/full")) != "open" {
        rounds += 1;
        assert!(rounds < 100, "the ring never drained");
    }
    let last = h.fd("open /dev/full");
    seen_as(&mut w, last);
    let truth = proc_fds(pid);
    h.exit();
    let (code, records) = w.finish();
    assert_eq!(code, 6);
    let summary = records.last().unwrap();
    assert!(
        summary["lost"]["ring_full"].as_u64().unwrap() > 0,
        "{summary}"
    );
    assert!(summary["lost_total"].as_u64().unwrap() > 0);
    assert!(summary["gaps"].as_u64().unwrap() >= 1);
    // What vmaudit released at exit (its table) is what /proc showed: the truth.
    let released: BTreeSet<i32> = fds_of(&records, pid, "exit");
    let removed_on_resync = fds_of(&records, pid, "resync_remove");
    assert_eq!(
        released, truth,
        "table after resync differs from /proc (resync removed {removed_on_resync:?})"
    );
}

#[test]
fn unknown_pid_is_refused_with_its_own_code_and_nothing_attached() {
    require_root();
    let bins = bins!();
    let (code, out, err) = run_vmaudit(&bins, &["watch", "--pid", "999999999"]);
    assert_eq!(code, 3, "{err}");
    assert!(out.is_empty());
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("no such process: 999999999"), "{err}");
    let (code, _, err) = run_vmaudit(&bins, &["fds", "--pid", "999999999"]);
    assert_eq!(
        (code, err.trim()),
        (3, "vmaudit: error: no such process: 999999999")
    );
    assert_eq!(vmaudit_programs_gone(), Ok(()));
}

/// Records whose reader left reach nobody: `vmaudit watch` says so in one line and ends with its
/// own code, taking its programs with it, instead of watching on with its output going nowhere.
#[test]
fn a_reader_gone_from_stdout_ends_the_watch_with_its_own_code() {
    use std::io::BufRead as _;
    require_root();
    let bins = bins!();
    let mut h = Helper::spawn(&bins);
    let mut child = ChildGuard(
        std::process::Command::new(&bins.vmaudit)
            .args(["watch", "--pid", &h.pid().to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn vmaudit"),
    );
    let mut stderr = std::io::BufReader::new(child.0.stderr.take().expect("stderr"));
    let mut line = String::new();
    while !line.contains("watching pid") {
        line.clear();
        let n = stderr.read_line(&mut line).expect("read vmaudit's stderr");
        assert_ne!(n, 0, "vmaudit ended before it was watching");
    }
    // The reader leaves; the watched process then gains and loses fds: records to write.
    drop(child.0.stdout.take());
    h.cmd("flood 1000");
    // Its exit too: a watch that wrote on into nothing would end now with 6.
    h.exit();
    let rest: Vec<String> = stderr.lines().map_while(Result::ok).collect();
    let code = child.0.wait().expect("wait vmaudit").code();
    assert_eq!(code, Some(23), "{rest:?}");
    assert_eq!(
        rest,
        vec!["vmaudit: error: writing the records to stdout: Broken pipe (os error 32)".to_owned()]
    );
    assert_eq!(vmaudit_programs_gone(), Ok(()));
}

#[test]
fn a_thread_id_is_not_a_process() {
    require_root();
    let bins = bins!();
    // A thread of this test process.
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tx.send(unsafe { libc::gettid() }).unwrap();
        let _ = done_rx.recv();
    });
    let tid = rx.recv().unwrap();
    let (code, _, err) = run_vmaudit(&bins, &["watch", "--pid", &tid.to_string()]);
    done_tx.send(()).unwrap();
    t.join().unwrap();
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("is a thread of process"), "{err}");
}

#[test]
fn missing_privileges_exit_4_with_nothing_attached() {
    require_root();
    let bins = bins!();
    let h = Helper::spawn(&bins);
    // Drop to nobody with no capabilities.
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&bins.vmaudit)
        .args(["watch", "--pid", &h.pid().to_string()])
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("missing capabilities CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE"),
        "{err}"
    );
    assert_eq!(vmaudit_programs_gone(), Ok(()));
}

#[test]
fn tracefs_is_mounted_when_absent() {
    require_root();
    let bins = bins!();
    let tracing = std::path::Path::new("/sys/kernel/tracing");
    // Unmount every tracefs stacked there (ignore "not mounted").
    while nix::mount::umount2(tracing, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
    assert!(!tracing.join("events").exists(), "tracefs still mounted");
    let h = Helper::spawn(&bins);
    let w = Watch::start(&bins, &["--pid", &h.pid().to_string()]);
    assert!(tracing.join("events/syscalls/sys_enter_openat").exists());
    let (code, records) = w.stop();
    assert_eq!(code, 0, "stopped by SIGTERM");
    assert_eq!(records.last().unwrap()["ended"], "signal");
}

#[test]
fn fds_prints_the_table_as_json() {
    require_root();
    let bins = bins!();
    let mut h = Helper::spawn(&bins);
    let tun = h.fd("open /dev/net/tun");
    let (code, out, err) = run_vmaudit(&bins, &["fds", "--pid", &h.pid().to_string(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    let fds: BTreeSet<i32> = rows
        .iter()
        .map(|r| r["fd"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(fds, proc_fds(h.pid()));
    let row = rows.iter().find(|r| r["fd"] == tun).unwrap();
    assert_eq!(
        (
            row["path"].as_str(),
            row["rdev"].as_str(),
            row["kind"].as_str()
        ),
        (Some("/dev/net/tun"), Some("10:200"), Some("char"))
    );
}

#[test]
fn tap_and_macvtap_fds_name_their_interfaces() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("ifaces");
    let veth = VethGuard::new("vmaudit-tv0");
    let node = veth.add_macvtap("vmaudit-tmv0", &tmp.0);
    let mut h = Helper::spawn(&bins);
    let pid = h.pid();
    let mut w = Watch::start(&bins, &["--pid", &pid.to_string()]);
    // A tap: /dev/net/tun attached to an interface with TUNSETIFF; fdinfo names it.
    let tun = h.fd("open /dev/net/tun");
    w.wait_fd(pid, "open", tun);
    h.fd(&format!("tunsetiff {tun} vmaudit-tap0"));
    // A macvtap: its /dev/tapN node belongs to the macvtap link.
    let mvt = h.fd(&format!("open {}", node.display()));
    let r = w.wait_fd(pid, "open", mvt);
    assert_eq!(r["iface"], "vmaudit-tmv0", "{r}");
    assert_eq!(r["kind"], "char");
    let (code, out, err) = run_vmaudit(&bins, &["fds", "--pid", &pid.to_string(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    let row = |fd: i32| rows.iter().find(|r| r["fd"] == fd).unwrap().clone();
    assert_eq!(
        (row(tun)["iface"].as_str(), row(tun)["rdev"].as_str()),
        (Some("vmaudit-tap0"), Some("10:200"))
    );
    assert_eq!(row(mvt)["iface"], "vmaudit-tmv0");
    h.exit();
    let (code, records) = w.finish();
    assert_eq!(code, 6);
    // The tap fd's identity at exit carries the interface it had by then: the kernel program
    // read it when TUNSETIFF attached the fd.
    let exit_tun = records
        .iter()
        .find(|v| v["op"] == "exit" && v["fd"] == tun)
        .unwrap();
    assert_eq!(
        (exit_tun["rdev"].as_str(), exit_tun["iface"].as_str()),
        (Some("10:200"), Some("vmaudit-tap0")),
        "{exit_tun}"
    );
}

#[test]
fn compat_syscalls_forks_clone_pidfd_and_fd_returning_ioctls_are_followed() {
    require_root();
    let bins = bins!();
    let mut h = Helper::spawn(&bins);
    let pid = h.pid();
    let mut w = Watch::start(&bins, &["--pid", &pid.to_string(), "--follow-children"]);
    let null = h.fd("open /dev/null");
    let r = w.wait_fd(pid, "open", null);
    let ofd = r["ofd"].as_u64().unwrap();

    // dup through int 0x80: decoded with i386 numbers, the file read from the table.
    let d = h.fd(&format!("compat_dup {null}"));
    let r = w.wait_fd(pid, "dup", d);
    assert_eq!(
        (
            r["syscall"].as_str(),
            r["from_fd"].as_i64(),
            r["ofd"].as_u64()
        ),
        (Some("dup"), Some(null as i64), Some(ofd)),
        "{r}"
    );

    // fork through int 0x80: the child is followed (its inherited fds, then its exit), as a
    // 64-bit fork's is; no syscall entry hook is needed to tell it from a thread.
    let child = h.fd("compat_fork") as u32;
    let r = w.wait_for("the 32-bit child's inherited /dev/null", |v| {
        v["pid"] == child && v["op"] == "inherit" && v["fd"] == null
    });
    assert_eq!(r["ofd"].as_u64(), Some(ofd), "{r}");
    w.wait_for("the 32-bit child's exit", |v| {
        v["pid"] == child && v["op"] == "exit"
    });

    // clone(CLONE_PIDFD): the pidfd lands in the parent's table.
    let pidfd = h.fd("clone_pidfd");
    let r = w.wait_fd(pid, "new", pidfd);
    assert_eq!(
        (r["syscall"].as_str(), r["source"].as_str()),
        (Some("clone"), Some("kernel"))
    );
    assert!(proc_fds(pid).contains(&pidfd), "the pidfd is in the table");

    // TIOCGPTPEER returns an fd: the pty's peer, a char device of the pts major (136).
    let pair: Vec<i32> = h.cmd("ptpeer").iter().map(|s| s.parse().unwrap()).collect();
    let r = w.wait_fd(pid, "new", pair[1]);
    assert_eq!(
        (r["syscall"].as_str(), r["kind"].as_str()),
        (Some("ioctl"), Some("char"))
    );
    assert!(r["rdev"].as_str().unwrap().starts_with("136:"), "{r}");

    h.exit();
    let (code, records) = w.finish();
    assert_eq!(code, 6);
    let summary = records.last().unwrap();
    assert_eq!(summary["lost_total"], 0, "{summary}");
    assert_eq!(summary["gaps"], 0, "nothing missed: {summary}");
}
