//! The run's life against what goes on around it: two starts of one VM at once, every stop
//! signal, and a SIGTERM while a client idles, a detach waits on a guest and the emulator
//! ignores SIGTERM.

use std::time::{Duration, Instant};

use vmaudit_tests::{
    Bins, TempDir, bins, hardening::Snapshot, require_root, run_vmaudit, vmrun::VmRun,
};

const UUID: &str = "5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d";

fn fake(bins: &Bins, args: &[&str], ifname: &str) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[emulator]\npath = \"{}\"\nargs = [{}]\n[[interface]]\nmac = \"52:54:00:00:c0:01\"\nifname = \"{ifname}\"\n",
        bins.fake_emulator.display(),
        args.join(", ")
    )
}

#[test]
fn of_two_simultaneous_starts_exactly_one_runs_and_the_other_touches_nothing() {
    require_root();
    let bins = bins!();
    let before = Snapshot::take();
    let name = "vmaudit-lc1";
    let body = fake(&bins, &["--qmp-fd", "{qmp-fd}"], "vmlc1-t");
    let mut a = VmRun::start_in(&bins, TempDir::new("lc1-a"), name, UUID, &body, &[]);
    let mut b = VmRun::start_in(&bins, TempDir::new("lc1-b"), name, UUID, &body, &[]);
    let says = |vm: &mut VmRun| {
        vm.stderr_line("running, or refused", |l| {
            l.contains("emulator pid") || l.contains("already running")
        })
    };
    let (la, lb) = (says(&mut a), says(&mut b));
    let (winner, loser, refusal) = match (la.contains("emulator pid"), lb.contains("emulator pid"))
    {
        (true, false) => (a, b, lb),
        (false, true) => (b, a, la),
        other => panic!("exactly one runs: {other:?}: {la:?} / {lb:?}"),
    };
    let loser_journal = loser.journal.clone();
    let (code, _) = loser.wait();
    assert_eq!(code, 21, "{refusal}");
    assert!(
        refusal.contains(&format!(
            "VM {name} is already running under vmaudit (pid {})",
            winner.pid()
        )),
        "{refusal}"
    );
    assert!(!loser_journal.exists(), "the loser wrote nothing");
    // The winner is untouched: its state names it, it serves requests.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("/run/vmaudit/{name}/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["owner"]["pid"], winner.pid());
    let (code, _, err) = run_vmaudit(&bins, &["attach-net", name, "--mac", "52:54:00:00:c0:02"]);
    assert_eq!(code, 0, "{err}");
    let (code, journal) = winner.stop();
    assert!(matches!(code, 0 | 8), "{code}");
    let (vcode, _, verr) = run_vmaudit(&bins, &["verify", journal.to_str().unwrap()]);
    assert!(matches!(vcode, 0 | 8), "{verr}");
    drop(journal);
    before.assert_back("two starts");
}

#[test]
fn sighup_and_sigquit_stop_the_vm_as_sigterm_does() {
    require_root();
    let bins = bins!();
    let before = Snapshot::take();
    for (sig, name) in [
        (libc::SIGHUP, "vmaudit-lc2"),
        (libc::SIGQUIT, "vmaudit-lc3"),
    ] {
        let mut vm = VmRun::start(&bins, name, UUID, &fake(&bins, &[], "vmlc-sig"), &[]);
        vm.emulator_pid();
        // SAFETY: a signal to the vmaudit this test started.
        unsafe { libc::kill(vm.pid() as i32, sig) };
        let (code, journal) = vm.wait();
        assert!(matches!(code, 0 | 8), "signal {sig}: {code}");
        let stop = journal
            .lines()
            .into_iter()
            .rev()
            .find(|v| v["op"] == "stop")
            .expect("a stop record");
        assert_eq!(stop["reason"], "destroyed", "signal {sig}: {stop}");
    }
    before.assert_back("stop signals");
}

#[test]
fn sigterm_stops_the_vm_within_5s_whatever_else_goes_on() {
    require_root();
    let bins = bins!();
    let before = Snapshot::take();
    let name = "vmaudit-lc4";
    let body = fake(
        &bins,
        &[
            "--mode",
            "ignore-term",
            "--qmp-fd",
            "{qmp-fd}",
            "--no-unplug-ack",
        ],
        "vmlc4-t",
    );
    let mut vm = VmRun::start(&bins, name, UUID, &body, &[]);
    vm.emulator_pid();
    let mac = "52:54:00:00:c0:03";
    let (code, _, err) = run_vmaudit(&bins, &["attach-net", name, "--mac", mac]);
    assert_eq!(code, 0, "{err}");
    // A client that says nothing, and a detach no guest will acknowledge for a minute.
    let _idle =
        std::os::unix::net::UnixStream::connect(format!("/run/vmaudit/{name}/control.sock"))
            .unwrap();
    let b = bins.clone();
    let detach = std::thread::spawn(move || {
        run_vmaudit(
            &b,
            &[
                "detach-net",
                "vmaudit-lc4",
                "--mac",
                mac,
                "--timeout-ms",
                "60000",
            ],
        )
    });
    vm.stderr_line("the detach in qemu", |l| l.contains("qmp device_del"));
    let t0 = Instant::now();
    // SAFETY: SIGTERM to the vmaudit this test started.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
    let (code, journal) = vm.wait();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "stopped in {took:?}");
    assert!(matches!(code, 0 | 7 | 8), "{code}");
    let (dcode, _, derr) = detach.join().unwrap();
    assert_ne!(dcode, 0, "the detach was not done: {derr}");
    let stop = journal
        .lines()
        .into_iter()
        .rev()
        .find(|v| v["op"] == "stop")
        .expect("a stop record");
    assert_eq!(stop["reason"], "destroyed", "{stop}");
    drop(journal);
    before.assert_back("SIGTERM within 5 s");
}

#[test]
fn a_multiqueue_interface_is_one_tap_with_a_queue_per_fd() {
    require_root();
    let bins = bins!();
    let before = Snapshot::take();
    // No ifname: the kernel numbers the tap once, and every queue joins that tap.
    let body = format!(
        "[emulator]\npath = \"{}\"\nargs = [\"--mode\", \"hold\"]\n[[interface]]\nmac = \"52:54:00:00:c0:04\"\nqueues = 3\n",
        bins.fake_emulator.display()
    );
    let mut vm = VmRun::start(&bins, "vmaudit-lc5", UUID, &body, &[]);
    let emu = vm.emulator_pid();
    let fds: Vec<i64> = vm
        .journal_lines()
        .iter()
        .filter(|r| r["reason"] == "open")
        .map(|r| r["emulator_fd"].as_i64().unwrap())
        .collect();
    assert_eq!(fds.len(), 3);
    let taps: std::collections::BTreeSet<String> = fds
        .iter()
        .map(|fd| {
            std::fs::read_to_string(format!("/proc/{emu}/fdinfo/{fd}"))
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("iff:").map(|v| v.trim().to_owned()))
                .unwrap_or_else(|| panic!("fd {fd} is not a tap"))
        })
        .collect();
    assert_eq!(taps.len(), 1, "one tap for the three queues: {taps:?}");
    let tap = taps.into_iter().next().unwrap();
    let flags = std::fs::read_to_string(format!("/sys/class/net/{tap}/tun_flags")).unwrap();
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
    assert_ne!(flags & 0x0100, 0, "IFF_MULTI_QUEUE on {tap}");
    let (code, _) = vm.stop();
    assert!(matches!(code, 0 | 8), "{code}");
    before.assert_back("multiqueue");
}
