//! `vmaudit watch` against the real kernel on the rarer ways into and out of a table: io_uring,
//! recvmmsg of many messages, control messages and fds, fd-returning ioctls and syscalls, a table shared through
//! CLONE_FILES, a seccomp supervisor's ADDFD. Each is either followed event by event, or found
//! and repaired with a gap that names its cause: never missed silently.

use vmaudit_tests::{Helper, Watch, bins, proc_fds, require_root};

fn ints(words: Vec<String>) -> Vec<i32> {
    words.iter().map(|w| w.parse().unwrap()).collect()
}

#[test]
fn io_uring_opens_and_closes_are_repaired_with_a_gap() {
    require_root();
    let bins = bins!();
    let mut h = Helper::spawn(&bins);
    let pid = h.pid();
    let mut w = Watch::start(&bins, &["--pid", &pid.to_string()]);
    // An openat through the ring: no syscall names the fd; its completion makes vmaudit read
    // the table again.
    let fd = ints(h.cmd("uring_open /dev/null"))[0];
    let gap = w.wait_for("the io_uring gap", |v| v["type"] == "gap");
    assert_eq!(gap["pid"], pid);
    assert!(gap["causes"]["io_uring"].as_u64().unwrap() >= 1, "{gap}");
    assert_eq!(gap["added"], serde_json::json!([fd]), "{gap}");
    let r = w.wait_fd(pid, "resync_add", fd);
    assert_eq!(
        (r["path"].as_str(), r["source"].as_str()),
        (Some("/dev/null"), Some("kernel"))
    );
    assert_eq!(r["cloexec"], true);
    // A close through the ring, likewise.
    h.cmd(&format!("uring_close {fd}"));
    let gap = w.wait_for("the second io_uring gap", |v| v["type"] == "gap");
    // (Its ring's own fd may be in the same resync, closed before its event arrived.)
    assert!(
        gap["removed"].as_array().unwrap().contains(&fd.into()),
        "{gap}"
    );
    w.wait_fd(pid, "resync_remove", fd);
    let records = w.finish_clean(h);
    assert_eq!(records.last().unwrap()["gaps"], 2);
}

#[test]
fn every_fd_of_every_message_of_a_recvmmsg_is_followed() {
    require_root();
    let bins = bins!();
    let mut h = Helper::spawn(&bins);
    let pid = h.pid();
    let mut w = Watch::start(&bins, &["--pid", &pid.to_string()]);
    // Six datagrams in one sendmmsg and one recvmmsg; the second carries 40 fds, sent in five
    // SCM_RIGHTS control messages, the last the kernel's most (SCM_MAX_FD, 253), in 32; each
    // arrives with five control messages (two timestamps, credentials, a pidfd of the sender
    // and its fds).
    let counts = [1, 40, 0, 3, 1, 253];
    let line = counts.map(|n: usize| n.to_string()).join(" ");
    let words = h.cmd(&format!("recvmmsg_fds {line}"));
    assert_eq!(words[0], "cmsgs:5", "{words:?}");
    let got: Vec<(i32, String)> = words[1..]
        .iter()
        .map(|w| {
            let (fd, kind) = w.split_once(':').unwrap();
            (fd.parse().unwrap(), kind.to_string())
        })
        .collect();
    let sent: usize = counts.iter().sum();
    assert_eq!(got.len(), sent + counts.len(), "{got:?}");
    // Each fd received is an event with its file read from the table, in the order the kernel
    // installed them (each wait looks past the previous match only).
    for (fd, kind) in &got {
        let r = w.wait_fd(pid, "recv_fd", *fd);
        assert_eq!(
            (r["syscall"].as_str(), r["source"].as_str()),
            (Some("recvmmsg"), Some("kernel")),
            "{r}"
        );
        let identity = match kind.as_str() {
            "null" => r["rdev"] == "1:3",
            "zero" => r["rdev"] == "1:5",
            "pidfd" => r["path"] == "anon_inode:[pidfd]",
            other => panic!("fd {fd} holds {other}"),
        };
        assert!(identity, "fd {fd} ({kind}): {r}");
    }
    // The sender's side: every fd of every control message is a send_fd.
    let send_fds = w
        .seen
        .iter()
        .filter(|v| v["op"] == "send_fd" && v["syscall"] == "sendmmsg")
        .count();
    assert_eq!(send_fds, sent);
    let table = proc_fds(pid);
    let records = w.finish_clean(h);
    let summary = records.last().unwrap();
    assert_eq!(summary["gaps"], 0, "{summary}");
    // Nothing left to repair: vmaudit's table at the exit is what /proc showed.
    let released: std::collections::BTreeSet<i32> = records
        .iter()
        .filter(|v| v["type"] == "fd" && v["pid"] == pid && v["op"] == "exit")
        .map(|v| v["fd"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(released, table);
    assert!(got.iter().all(|(fd, _)| table.contains(fd)));
}

#[test]
fn fd_returning_ioctls_and_syscalls_are_followed() {
    require_root();
    let bins = bins!();
    let mut h = Helper::spawn(&bins);
    let pid = h.pid();
    let mut w = Watch::start(&bins, &["--pid", &pid.to_string()]);
    let new_fd = |w: &mut Watch, fd: i32, syscall: &str, path: &str| {
        let r = w.wait_fd(pid, "new", fd);
        assert_eq!(r["syscall"], syscall, "{r}");
        assert_eq!(r["source"], "kernel", "{r}");
        assert!(r["ofd"].as_u64().is_some(), "{r}");
        assert!(
            r["path"].as_str().unwrap().starts_with(path),
            "fd {fd} from {syscall}: {r}"
        );
    };
    // TUNGETDEVNETNS on a tap's fd, SIOCGSKNS on a socket: each an fd of the network namespace.
    let tun = h.fd("open /dev/net/tun");
    h.fd(&format!("tunsetiff {tun} vmaudit-nsq0"));
    let netns = h.fd(&format!("ioctl_fd {tun} 54e3"));
    new_fd(&mut w, netns, "ioctl", "net:[");
    let sock_path = format!("/tmp/vmaudit-paths-{pid}.sock");
    let sock = h.fd(&format!("listen {sock_path}"));
    std::fs::remove_file(&sock_path).unwrap();
    new_fd(
        &mut w,
        h.fd(&format!("ioctl_fd {sock} 894c")),
        "ioctl",
        "net:[",
    );
    // NS_GET_USERNS on a namespace fd; PIDFD_GET_NET_NAMESPACE on a pidfd.
    let ns = h.fd("open_ro /proc/self/ns/net");
    new_fd(
        &mut w,
        h.fd(&format!("ioctl_fd {ns} b701")),
        "ioctl",
        "user:[",
    );
    let pidfd = h.fd("pidfd_self");
    new_fd(&mut w, pidfd, "pidfd_open", "anon_inode:[pidfd]");
    new_fd(
        &mut w,
        h.fd(&format!("ioctl_fd {pidfd} ff04")),
        "ioctl",
        "net:[",
    );
    // A VM and a device of it: KVM_CREATE_DEVICE writes the fd into its argument.
    let kvm = ints(h.cmd("kvm_device"));
    new_fd(&mut w, kvm[1], "ioctl", "anon_inode:kvm-vm");
    new_fd(&mut w, kvm[2], "ioctl", "anon_inode:kvm-vfio");
    // Syscalls that return an fd of something not opened by path.
    let more = ints(h.cmd("newfds"));
    new_fd(&mut w, more[0], "mq_open", "/vmaudit-test-");
    new_fd(&mut w, more[1], "fsopen", "anon_inode:[fscontext]");
    new_fd(&mut w, more[2], "open_tree", "/tmp");
    new_fd(
        &mut w,
        more[3],
        "landlock_create_ruleset",
        "anon_inode:[landlock-ruleset]",
    );
    let held = proc_fds(pid);
    let records = w.finish_clean(h);
    let summary = records.last().unwrap();
    assert_eq!(summary["gaps"], 0, "nothing missed: {summary}");
    // Every fd the helper held is one vmaudit released at its exit.
    let released: std::collections::BTreeSet<i32> = records
        .iter()
        .filter(|v| v["op"] == "exit" && v["pid"] == pid)
        .map(|v| v["fd"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(released, held);
}

#[test]
fn a_table_shared_through_clone_files_is_one_table() {
    require_root();
    let bins = bins!();
    let mut h = Helper::spawn(&bins);
    let pid = h.pid();
    let mut w = Watch::start(&bins, &["--pid", &pid.to_string(), "--follow-children"]);
    // The child opens in the table it shares with the helper: the open is the helper's too.
    let got = ints(h.cmd("clone_files_open /dev/zero"));
    let (child, fd) = (got[0] as u32, got[1]);
    let r = w.wait_for("the child's open", |v| {
        v["op"] == "open" && v["pid"] == child
    });
    assert_eq!(
        (r["fd"].as_i64(), r["path"].as_str()),
        (Some(fd as i64), Some("/dev/zero"))
    );
    let r = w.wait_fd(pid, "open", fd);
    assert_eq!(
        (r["tid"].as_u64(), r["path"].as_str()),
        (Some(child as u64), Some("/dev/zero"))
    );
    assert!(proc_fds(pid).contains(&fd));
    let records = w.finish_clean(h);
    assert_eq!(records.last().unwrap()["gaps"], 0);
}

#[test]
fn what_no_probe_sees_is_found_by_the_periodic_check() {
    require_root();
    let bins = bins!();
    let mut h = Helper::spawn(&bins);
    let pid = h.pid();
    // Without --follow-children the child's syscalls are not followed: its open in the table
    // it shares with the helper is a change of the helper's table no event reports.
    let mut w = Watch::start(&bins, &["--pid", &pid.to_string()]);
    let fd = ints(h.cmd("clone_files_open /dev/zero"))[1];
    let gap = w.wait_for("the missed gap", |v| v["type"] == "gap");
    assert_eq!(gap["pid"], pid);
    assert_eq!(gap["causes"]["missed"], 1, "{gap}");
    assert_eq!(gap["added"], serde_json::json!([fd]), "{gap}");
    assert!(gap["since_ns"].as_u64().unwrap() <= gap["ts"].as_u64().unwrap());
    let r = w.wait_fd(pid, "resync_add", fd);
    assert_eq!(r["path"], "/dev/zero");
    w.finish_clean(h);
}

#[test]
fn a_seccomp_supervisors_addfd_is_a_gain_of_the_target() {
    require_root();
    let bins = bins!();
    let mut h = Helper::spawn(&bins);
    let pid = h.pid();
    let mut w = Watch::start(&bins, &["--pid", &pid.to_string(), "--follow-children"]);
    let got = ints(h.cmd("addfd /dev/full"));
    let (target, fd) = (got[0] as u32, got[1]);
    // The target's notifier fd is an event of its own.
    let r = w.wait_for("the notifier fd", |v| {
        v["pid"] == target && v["syscall"] == "seccomp"
    });
    assert_eq!(r["op"], "new", "{r}");
    // The supervisor opened /dev/full and put that very open file into the target's table.
    let opened = w.wait_for("the supervisor's open", |v| {
        v["pid"] == pid && v["op"] == "open" && v["path"] == "/dev/full"
    });
    let r = w.wait_fd(target, "addfd", fd);
    assert_eq!(
        (
            r["tid"].as_u64(),
            r["rdev"].as_str(),
            r["cloexec"].as_bool()
        ),
        (Some(pid as u64), Some("1:7"), Some(true)),
        "{r}"
    );
    assert_eq!(
        r["ofd"], opened["ofd"],
        "the same open file description: {r}"
    );
    assert!(proc_fds(target).contains(&fd));
    h.cmd("reap");
    let records = w.finish_clean(h);
    assert_eq!(records.last().unwrap()["gaps"], 0);
}

#[test]
fn the_programs_diagnostics_reach_the_log_at_debug() {
    require_root();
    let bins = bins!();
    let mut h = Helper::spawn(&bins);
    let pid = h.pid();
    let mut cmd = std::process::Command::new(&bins.vmaudit);
    cmd.env("RUST_LOG", "debug")
        .args(["watch", "--pid", &pid.to_string(), "--follow-children"]);
    let w = Watch::start_command(cmd, "watching pid");
    // The fork program says, through aya-log, which child it follows.
    let child = h.fd("fork 0");
    let line = w.wait_stderr(|l| l.contains(&format!("forked {child}")));
    assert!(
        line.contains(&format!("pid {pid} forked {child}")),
        "{line}"
    );
    assert!(line.contains("followed"), "{line}");
    h.cmd("reap");
    w.finish_clean(h);
}
