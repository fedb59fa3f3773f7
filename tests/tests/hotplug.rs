//! Hot-plug and hot-unplug over QMP with real qemu: fd by fd, audited and verified.

use std::{collections::BTreeSet, path::Path};

use serde_json::Value;
use vmaudit_tests::{Bins, TempDir, bins, proc_fds, require_root, run_vmaudit, vmrun::VmRun};

const UUID: &str = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d";

/// `vmaudit run` of a VM named `name` with one boot tap; `emulator` is the spec's
/// `[emulator]` table (empty: vmaudit's default qemu).
fn start(bins: &Bins, name: &str, emulator: &str) -> VmRun {
    let body =
        format!("{emulator}\n[[interface]]\nmac = \"52:54:00:00:60:01\"\nifname = \"vmhp-boot\"\n");
    VmRun::start(bins, name, UUID, &body, &[])
}

/// The emulator's /dev/net/tun fds, read by the test from /proc.
fn tun_fds(pid: u32) -> BTreeSet<i32> {
    proc_fds(pid)
        .into_iter()
        .filter(|fd| {
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .is_ok_and(|p| p == Path::new("/dev/net/tun"))
        })
        .collect()
}

fn answer(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

#[test]
fn without_a_guest_a_detach_is_not_claimed_and_qemu_keeps_the_fd() {
    require_root();
    let bins = bins!();
    let mut vm = start(&bins, "vmaudit-hp1", "");
    let emu = vm.emulator_pid();
    let before = tun_fds(emu);
    let (code, out, err) = run_vmaudit(
        &bins,
        &[
            "attach-net",
            "vmaudit-hp1",
            "--mac",
            "52:54:00:00:60:02",
            "--ifname",
            "vmhp1-t1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let a = answer(&out);
    let fds: BTreeSet<i32> = a["emulator_fds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_i64().unwrap() as i32)
        .collect();
    let after = tun_fds(emu);
    assert_eq!(
        after.difference(&before).copied().collect::<BTreeSet<_>>(),
        fds,
        "qemu holds exactly the attached fd"
    );
    // No guest acknowledges the unplug: vmaudit says so, claims nothing, qemu keeps the fd.
    let (code, out, err) = run_vmaudit(
        &bins,
        &[
            "detach-net",
            "vmaudit-hp1",
            "--mac",
            "52:54:00:00:60:02",
            "--timeout-ms",
            "500",
        ],
    );
    assert_eq!(code, 17, "{err}");
    assert!(
        err.contains("did not acknowledge the unplug") && err.contains("qemu still holds fd"),
        "{err}"
    );
    assert_eq!(answer(&out)["emulator_fds"].as_array().unwrap().len(), 1);
    assert_eq!(tun_fds(emu), after, "the kernel says qemu still holds it");
    let lines = vm.journal_lines();
    let texts: Vec<&str> = lines.iter().filter_map(|l| l["text"].as_str()).collect();
    assert!(
        texts
            .iter()
            .any(|t| t.contains("reason=attach") && t.contains("res=success")),
        "{texts:#?}"
    );
    let detach = texts
        .iter()
        .find(|t| t.contains("reason=detach"))
        .expect("a detach record");
    assert!(
        detach.contains("res=failed") && detach.contains("vmaudit-why="),
        "{detach}"
    );
    let (code, kept) = vm.stop();
    let lines = kept.lines();
    assert_eq!(code, 0);
    let verdicts: Vec<&Value> = lines.iter().filter(|l| l["type"] == "verdict").collect();
    assert!(
        verdicts.iter().all(|v| v["status"] == "confirmed"),
        "{verdicts:#?}"
    );
    assert!(
        !verdicts.iter().any(|v| v["claim"]["kind"] == "net-detach"),
        "no detach was claimed"
    );
    let attach = verdicts
        .iter()
        .find(|v| {
            v["claim"]["kind"] == "net-attach"
                && v["claim"]["text"]
                    .as_str()
                    .unwrap()
                    .contains("reason=attach")
        })
        .expect("a verdict on the attach");
    let detail = attach["evidence"][0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("open-file-description id is the one of the manager's fd")
            && detail.contains("kcmp at hand-off agrees"),
        "{attach:#}"
    );
}

#[test]
fn bad_requests_are_refused_audited_and_leave_nothing() {
    require_root();
    let bins = bins!();
    let (code, _, err) = run_vmaudit(
        &bins,
        &[
            "detach-net",
            "vmaudit-no-such-vm",
            "--mac",
            "52:54:00:00:60:09",
        ],
    );
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no VM named \"vmaudit-no-such-vm\""), "{err}");
    let mut vm = start(&bins, "vmaudit-hp2", "");
    let emu = vm.emulator_pid();
    let held = proc_fds(emu);
    let cases: &[(&[&str], &str)] = &[
        (
            &["attach-net", "vmaudit-hp2", "--mac", "52:54:00:00:60:01"],
            "already has an interface with MAC",
        ),
        (
            &["attach-net", "vmaudit-hp2", "--mac", "52:54:00:zz:60:01"],
            "is not a MAC address",
        ),
        (
            &["detach-net", "vmaudit-hp2", "--mac", "52:54:00:00:60:77"],
            "has no interface with MAC",
        ),
        (
            &[
                "attach-net",
                "vmaudit-hp2",
                "--mac",
                "52:54:00:00:60:03",
                "--backend",
                "macvtap",
                "--parent",
                "vmaudit-nope0",
            ],
            "failed at open",
        ),
    ];
    for (args, msg) in cases {
        let (code, _, err) = run_vmaudit(&bins, args);
        assert_eq!(code, 16, "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
    }
    assert_eq!(proc_fds(emu), held, "qemu gained nothing");
    let (code, kept) = vm.stop();
    let lines = kept.lines();
    assert_eq!(code, 0);
    // The failed attach is audited (libvirt audits no failed attach).
    let failed = lines
        .iter()
        .filter_map(|l| l["text"].as_str())
        .find(|t| t.contains("reason=attach") && t.contains("52:54:00:00:60:03"))
        .expect("a failure record");
    assert!(
        failed.contains("res=failed") && failed.contains("vmaudit-step=\"open\""),
        "{failed}"
    );
    assert!(!Path::new("/sys/class/net/vmvthp1").exists());
}

/// A real guest kernel acknowledges each unplug: 200 attach/detach cycles, zero fds leaked in
/// vmaudit or qemu, every verdict confirmed (each detach's release seen in the kernel).
#[test]
fn two_hundred_cycles_with_a_real_guest_leak_nothing_and_are_all_confirmed() {
    require_root();
    let bins = bins!();
    let guest = vmaudit_tests::guest::GuestImage::find();
    let logs = TempDir::new("hp-guest");
    let serial = logs.0.join("serial.log");
    let mut vm = start(&bins, "vmaudit-hp3", &guest.emulator_toml(&serial));
    let emu = vm.emulator_pid();
    vmaudit_tests::guest::wait_ready(&serial);
    let vmaudit_pid = vm.pid();
    let qemu_before = tun_fds(emu);
    let vmaudit_before = proc_fds(vmaudit_pid).len();
    for i in 0..200 {
        let mac = format!("52:54:00:01:{:02x}:{:02x}", i / 256, i % 256);
        let (code, _, err) = run_vmaudit(&bins, &["attach-net", "vmaudit-hp3", "--mac", &mac]);
        assert_eq!(code, 0, "cycle {i} attach: {err}");
        let (code, _, err) = run_vmaudit(&bins, &["detach-net", "vmaudit-hp3", "--mac", &mac]);
        assert_eq!(code, 0, "cycle {i} detach: {err}");
    }
    assert_eq!(
        tun_fds(emu),
        qemu_before,
        "qemu holds no fd of a detached interface"
    );
    assert_eq!(
        proc_fds(vmaudit_pid).len(),
        vmaudit_before,
        "vmaudit leaked no fd"
    );
    let (code, kept) = vm.stop();
    let lines = kept.lines();
    let verdicts: Vec<&Value> = lines.iter().filter(|l| l["type"] == "verdict").collect();
    let bad: Vec<&&Value> = verdicts
        .iter()
        .filter(|v| v["status"] != "confirmed")
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
    assert_eq!(code, 0);
    let count = |kind: &str, reason: &str| {
        verdicts
            .iter()
            .filter(|v| {
                v["claim"]["kind"] == kind && v["claim"]["text"].as_str().unwrap().contains(reason)
            })
            .count()
    };
    assert_eq!(count("net-attach", "reason=attach"), 200);
    assert_eq!(count("net-detach", "reason=detach"), 200);
    // Each detach names the fd it released, and the kernel's close is its evidence.
    let d = verdicts
        .iter()
        .find(|v| v["claim"]["kind"] == "net-detach")
        .unwrap();
    assert_eq!(d["evidence"][0]["what"], "close", "{d:#}");
}

/// qemu refusing a command (a microvm has no PCI bus for `device_add`): the netdev is rolled
/// back, the failure and the rollback are audited, and qemu holds nothing new.
#[test]
fn a_command_qemu_refuses_is_rolled_back_and_audited() {
    require_root();
    let bins = bins!();
    // No boot interface: a microvm has no PCI bus for one.
    let body = "[emulator]\nargs = [\"-M\", \"microvm\", \"-nodefaults\", \"-display\", \"none\", \"-S\", \"-chardev\", \"socket,id=qmp,fd={qmp-fd},server=on,wait=off\", \"-mon\", \"chardev=qmp,mode=control\"]\n";
    let mut vm = VmRun::start(&bins, "vmaudit-hp4", UUID, body, &[]);
    let emulator = vm.emulator_pid();
    let held = proc_fds(emulator);
    let (code, _, err) = run_vmaudit(
        &bins,
        &[
            "attach-net",
            "vmaudit-hp4",
            "--mac",
            "52:54:00:00:60:05",
            "--ifname",
            "vmhp4-t",
        ],
    );
    assert_eq!(code, 16, "{err}");
    assert!(err.contains("failed at device_add"), "{err}");
    assert_eq!(
        proc_fds(emulator),
        held,
        "the rollback left qemu holding nothing new"
    );
    assert!(
        !Path::new("/sys/class/net/vmhp4-t").exists(),
        "the tap went with its fds"
    );
    // A qemu that stops answering: the request fails in bounded time, audited.
    // SAFETY: SIGSTOP/SIGCONT to the qemu this test started through vmaudit.
    unsafe { libc::kill(emulator as i32, libc::SIGSTOP) };
    let (code, _, err) = run_vmaudit(
        &bins,
        &[
            "attach-net",
            "vmaudit-hp4",
            "--mac",
            "52:54:00:00:60:06",
            "--ifname",
            "vmhp4-u",
        ],
    );
    // SAFETY: as above.
    unsafe { libc::kill(emulator as i32, libc::SIGCONT) };
    assert_eq!(code, 16, "{err}");
    assert!(err.contains("did not answer"), "{err}");
    // The fd was already in flight to qemu (SCM_RIGHTS holds it in the socket): once resumed,
    // qemu holds a tun fd no claim gave it (the rollback could not reach it), and the verifier
    // says so.
    let (code, kept) = vm.stop();
    assert_eq!(code, 7, "qemu holds a tun fd no claim gave it");
    let text = std::fs::read_to_string(&*kept).unwrap();
    let violations: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] == "verdict" && v["status"] == "violated")
        .collect();
    assert_eq!(violations.len(), 1, "{violations:#?}");
    let v = &violations[0];
    assert_eq!(v["claim"]["kind"], "unclaimed", "{v:#}");
    assert_eq!(
        (
            v["evidence"][0]["pid"].as_u64(),
            v["evidence"][0]["rdev"].as_str()
        ),
        (Some(u64::from(emulator)), Some("10:200")),
        "{v:#}"
    );
    let failed: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("reason=attach") && l.contains("res=failed"))
        .collect();
    assert_eq!(failed.len(), 2, "{failed:#?}");
    assert!(
        failed[0].contains(r#"vmaudit-step=\"device_add\""#)
            && failed[0].contains("vmaudit-rollback"),
        "{}",
        failed[0]
    );
    assert!(failed[0].contains("netdev_del"), "{}", failed[0]);
}
