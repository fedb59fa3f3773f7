//! `vmaudit run` killed (SIGKILL: no clean-up can run) at each phase of start, hot-plug and
//! stop. After each death: the emulator is dead, and a process left in the VM's cgroup is still
//! confined (the pinned device program refuses it /dev/net/tun); the journal reads (`verify`
//! exits 0, 7 or 8, never 1 or 11); and a restart of the same spec removes what the dead run
//! left, journals it (`recovered`, and `op=stop reason=crashed` when the VM had started), runs,
//! stops cleanly, and leaves the host as it was.
//!
//! The stand-in emulator holds vmaudit at a phase on purpose (a late QMP greeting, a slow
//! `device_add`, an unplug nobody acknowledges, a SIGTERM it will not act on), so that each
//! kill lands where it is meant to, except the first: opening devices and setting up the
//! cgroup takes milliseconds, and the kill lands somewhere from the first device record to the
//! wait for the emulator, which the test prints.

use std::path::Path;

use serde_json::Value;
use vmaudit_tests::{
    Bins, Helper, PATIENCE, VethGuard, bins, hardening::Snapshot, require_root, run_vmaudit,
    vmrun::VmRun,
};

const UUID: &str = "7e6d5c4b-3a29-4817-a6f5-e4d3c2b1a098";

/// The stand-in emulator with QMP, and `extra` of its own options.
fn body(bins: &Bins, name: &str, extra: &[&str], macvtap: bool) -> String {
    let mut args = vec!["--qmp-fd", "{qmp-fd}"];
    args.extend(extra);
    let args: Vec<String> = args.iter().map(|a| format!("\"{a}\"")).collect();
    let mut b = format!(
        "[emulator]\npath = \"{}\"\nargs = [{}]\n[[interface]]\nmac = \"52:54:00:00:a0:01\"\nifname = \"{name}-t\"\n",
        bins.fake_emulator.display(),
        args.join(", ")
    );
    if macvtap {
        b.push_str(&format!(
            "[[interface]]\nmac = \"52:54:00:00:a0:02\"\nbackend = \"macvtap\"\nparent = \"vmcrv0\"\nifname = \"{name}-m\"\n"
        ));
    }
    b
}

fn cgroup(name: &str) -> String {
    format!("/sys/fs/cgroup/unified/vmaudit/{name}")
}

/// Puts a helper process into the VM's cgroup, where the ACL allows /dev/null but not
/// /dev/net/tun.
fn helper_in_cgroup(bins: &Bins, name: &str) -> Helper {
    let mut h = Helper::spawn(bins);
    std::fs::write(
        format!("{}/cgroup.procs", cgroup(name)),
        h.pid().to_string(),
    )
    .unwrap();
    h.fd("open /dev/null");
    let refused = h.try_cmd("open /dev/net/tun").unwrap_err();
    assert!(refused.contains("not permitted"), "{refused}");
    h
}

/// Whether `pid` has ended (gone, or a zombie nobody reaped yet).
fn ended(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn wait_ended(pid: u32, what: &str) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !ended(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} (pid {pid}) still runs"
        );
        std::thread::yield_now();
    }
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn verify_code(bins: &Bins, journal: &Path) -> (i32, Value) {
    let (code, out, err) = run_vmaudit(bins, &["verify", journal.to_str().unwrap(), "--json"]);
    let report = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    (code, report)
}

/// What a scenario brings vmaudit to before the kill: the emulator's pid if it started, and a
/// helper left in the cgroup.
struct AtKill {
    emulator: Option<u32>,
    helper: Option<Helper>,
}

/// Runs a VM, brings it to a phase with `reach`, kills vmaudit there, then checks confinement,
/// the journal and a clean restart.
fn crash_at(
    bins: &Bins,
    name: &str,
    spec: &str,
    phase: &str,
    reach: impl FnOnce(&mut VmRun) -> AtKill,
) {
    let before = Snapshot::take();
    let veth = VethGuard::new("vmcrv0");
    let mut vm = VmRun::start(bins, name, UUID, spec, &[]);
    let at = reach(&mut vm);
    // SAFETY: SIGKILL to the vmaudit this test started.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGKILL) };
    let (code, kept) = vm.wait();
    assert_eq!(code, -1, "{phase}: killed by the signal");
    let journal = kept.journal.clone();
    // What the dead run noted before it died: its emulator, if it had started one.
    let state: Value = std::fs::read_to_string(format!("/run/vmaudit/{name}/state.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let noted = state["emulator"]["pid"].as_u64().map(|p| p as u32);
    if at.emulator.is_some() {
        assert_eq!(
            noted, at.emulator,
            "{phase}: the run noted its emulator: {state}"
        );
    }
    let emulator = at.emulator.or(noted);
    let written: Vec<String> = lines(&journal)
        .iter()
        .filter(|v| v["text"].is_string())
        .map(|v| {
            let t = v["text"].as_str().unwrap();
            t.split(" vm=").next().unwrap_or(t).to_owned()
        })
        .collect();
    eprintln!(
        "{phase}: killed after {} records, the last: {:?}",
        written.len(),
        written.last()
    );

    // Confinement: the emulator died with vmaudit; a process still in the cgroup is confined.
    if let Some(emu) = emulator {
        wait_ended(emu, &format!("{phase}: the emulator"));
    }
    let mut helper = at.helper;
    if let Some(h) = helper.as_mut() {
        let refused = h.try_cmd("open /dev/net/tun").unwrap_err();
        assert!(
            refused.contains("not permitted"),
            "{phase}: still confined after the crash: {refused}"
        );
    }
    // The journal reads.
    let (vcode, report) = verify_code(bins, &journal);
    assert!(
        matches!(vcode, 0 | 7 | 8),
        "{phase}: verify exits {vcode}: {report:#}"
    );
    assert_eq!(
        report["chain"]["breaks"], 0,
        "{phase}: {:#}",
        report["chain"]
    );

    // A clean restart of the same spec (same journal, same name).
    let restart = body(bins, name, &[], spec.contains("macvtap"));
    let mut again = VmRun::start_in(bins, kept.into_dir(), name, UUID, &restart, &[]);
    let emu2 = again.emulator_pid();
    let all = lines(&journal);
    let recovered = all
        .iter()
        .find(|v| v["type"] == "vmaudit" && v["event"] == "recovered")
        .unwrap_or_else(|| panic!("{phase}: the recovery is journaled"));
    eprintln!("{phase}: recovered: {}", recovered["did"]);
    let crashed_stop = all.iter().any(|v| {
        v["text"]
            .as_str()
            .is_some_and(|t| t.contains("op=stop reason=crashed") && t.contains("vmaudit-why="))
    });
    assert_eq!(
        crashed_stop,
        emulator.is_some(),
        "{phase}: a stop record for the dead run's VM exactly when it had started one"
    );
    if let Some(h) = helper {
        wait_ended(h.pid(), &format!("{phase}: the process left in the cgroup"));
        drop(h);
    }
    assert_ne!(Some(emu2), emulator);
    let (code, journal) = again.stop();
    assert!(
        matches!(code, 0 | 8),
        "{phase}: the restarted VM stops cleanly: {code}"
    );
    let (vcode, report) = verify_code(bins, &journal);
    assert!(matches!(vcode, 0 | 8), "{phase}: {report:#}");
    assert_eq!(
        report["chain"]["breaks"], 0,
        "{phase}: one intact chain over both runs"
    );
    drop(journal);
    drop(veth);
    before.assert_back(phase);
}

fn ready_pid(vm: &mut VmRun) -> u32 {
    let l = vm.stderr_line("the stand-in's ready line", |l| {
        l.contains("fake-emulator: ready pid=")
    });
    l.split("pid=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn killed_while_opening_devices_and_making_the_cgroup() {
    require_root();
    let bins = bins!();
    let name = "vmaudit-cr1";
    let spec = body(&bins, name, &["--greeting-delay-ms", "60000"], true);
    crash_at(&bins, name, &spec, "start (devices, cgroup)", |vm| {
        vm.json("the first open record", |v| v["reason"] == "open");
        AtKill {
            emulator: None,
            helper: None,
        }
    });
}

#[test]
fn killed_while_the_emulator_starts() {
    require_root();
    let bins = bins!();
    let name = "vmaudit-cr2";
    let spec = body(&bins, name, &["--greeting-delay-ms", "60000"], true);
    crash_at(
        &bins,
        name,
        &spec,
        "start (emulator launched, not up)",
        |vm| {
            let emu = ready_pid(vm);
            AtKill {
                emulator: Some(emu),
                helper: Some(helper_in_cgroup(&bins, name)),
            }
        },
    );
}

#[test]
fn killed_while_running() {
    require_root();
    let bins = bins!();
    let name = "vmaudit-cr3";
    let spec = body(&bins, name, &[], true);
    crash_at(&bins, name, &spec, "running", |vm| {
        let emu = vm.emulator_pid();
        AtKill {
            emulator: Some(emu),
            helper: Some(helper_in_cgroup(&bins, name)),
        }
    });
}

#[test]
fn killed_during_an_attach() {
    require_root();
    let bins = bins!();
    let name = "vmaudit-cr4";
    let spec = body(&bins, name, &["--device-add-delay-ms", "2500"], false);
    crash_at(&bins, name, &spec, "hot-plug (attach in flight)", |vm| {
        let emu = vm.emulator_pid();
        let b = bins.clone();
        let client = std::thread::spawn(move || {
            run_vmaudit(
                &b,
                &["attach-net", "vmaudit-cr4", "--mac", "52:54:00:00:a0:03"],
            )
        });
        vm.stderr_line("device_add in qemu", |l| l.contains("qmp device_add"));
        // The client is answered once vmaudit is gone (its connection closes): not before.
        std::thread::spawn(move || drop(client.join()));
        AtKill {
            emulator: Some(emu),
            helper: None,
        }
    });
}

#[test]
fn killed_during_a_detach() {
    require_root();
    let bins = bins!();
    let name = "vmaudit-cr5";
    let spec = body(&bins, name, &["--no-unplug-ack"], false);
    crash_at(&bins, name, &spec, "hot-unplug (detach in flight)", |vm| {
        let emu = vm.emulator_pid();
        let (code, _, err) = run_vmaudit(
            &bins,
            &["attach-net", "vmaudit-cr5", "--mac", "52:54:00:00:a0:03"],
        );
        assert_eq!(code, 0, "{err}");
        let b = bins.clone();
        let client = std::thread::spawn(move || {
            run_vmaudit(
                &b,
                &[
                    "detach-net",
                    "vmaudit-cr5",
                    "--mac",
                    "52:54:00:00:a0:03",
                    "--timeout-ms",
                    "30000",
                ],
            )
        });
        vm.stderr_line("device_del in qemu", |l| l.contains("qmp device_del"));
        std::thread::spawn(move || drop(client.join()));
        AtKill {
            emulator: Some(emu),
            helper: None,
        }
    });
}

#[test]
fn killed_while_stopping() {
    require_root();
    let bins = bins!();
    let name = "vmaudit-cr6";
    let spec = body(&bins, name, &["--mode", "linger-term"], true);
    crash_at(&bins, name, &spec, "stop (emulator given SIGTERM)", |vm| {
        let emu = vm.emulator_pid();
        let helper = helper_in_cgroup(&bins, name);
        // SAFETY: SIGTERM to the vmaudit this test started.
        unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
        vm.stderr_line("the emulator told to stop", |l| {
            l.contains("fake-emulator: term")
        });
        AtKill {
            emulator: Some(emu),
            helper: Some(helper),
        }
    });
}
