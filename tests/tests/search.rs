//! `vmaudit search` over journals of real runs (a stand-in emulator with two interfaces, real
//! qemu hot-plug with and without a guest acknowledging the unplug) and over the audit.log
//! libvirt wrote: what a user sees, the fd numbers held to the journal's kernel evidence, and
//! the exit codes.

use std::collections::BTreeSet;

use serde_json::Value;
use vmaudit_tests::{Bins, TempDir, bins, require_root, run_vmaudit, vmrun::VmRun};

const UUID: &str = "6a1f2e3d-4c5b-4a69-8877-665544332211";
const MAC1: &str = "52:54:00:00:71:01";
const MAC2: &str = "52:54:00:00:71:02";
const LIBVIRT_LOG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/libvirt-9.0-audit.log"
);

fn search(bins: &Bins, args: &[&str]) -> (i32, Vec<Value>, String) {
    let mut all = vec!["search"];
    all.extend_from_slice(args);
    let (code, out, err) = run_vmaudit(bins, &all);
    let lines = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (code, lines, err)
}

fn fds_of(v: &Value, key: &str) -> BTreeSet<i64> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {v:#}"))
        .iter()
        .map(|f| f["fd"].as_i64().or_else(|| f.as_i64()).unwrap())
        .collect()
}

/// The verdict on the record whose text contains `needle`, read from the journal itself.
fn verdict_on(journal: &[Value], needle: &str) -> Value {
    let rec = journal
        .iter()
        .find(|l| l["text"].as_str().is_some_and(|t| t.contains(needle)))
        .unwrap_or_else(|| panic!("no record with {needle}"));
    journal
        .iter()
        .find(|l| l["type"] == "verdict" && l["claim"]["record_ts_ns"] == rec["ts_ns"])
        .unwrap_or_else(|| panic!("no verdict on {needle}"))
        .clone()
}

fn evidence_fds(v: &Value) -> BTreeSet<i64> {
    v["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["fd"].as_i64())
        .collect()
}

#[test]
fn fds_of_two_interfaces_are_the_kernels_and_filters_find_their_records() {
    require_root();
    let bins = bins!();
    let fake = format!(
        "[emulator]\npath = \"{}\"\nargs = [\"--mode\", \"hold\"]\n",
        bins.fake_emulator.display()
    );
    let body = format!(
        "{fake}[[interface]]\nmac = \"{MAC1}\"\nifname = \"vmsr-t0\"\nqueues = 2\n\n[[interface]]\nmac = \"{MAC2}\"\nifname = \"vmsr-t1\"\n"
    );
    let mut vm = VmRun::start(&bins, "vmaudit-sr1", UUID, &body, &[]);
    let emu = vm.emulator_pid();
    for mac in [MAC1, MAC2] {
        vm.json("net-start verdict", |v| {
            v["type"] == "verdict" && v["claim"]["kind"] == "net-start" && v["claim"]["mac"] == mac
        });
    }
    // Asked while the VM runs: both MACs held.
    let j = vm.journal.to_str().unwrap().to_owned();
    let (code, out, err) = search(&bins, &["fds", "--mac", MAC1, &j]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out[0]["state"], "held", "{:#}", out[0]);
    let (code, kept) = vm.stop();
    assert_eq!(code, 0);
    let journal = kept.lines();
    let j = kept.journal.to_str().unwrap();

    for (mac, queues) in [(MAC1, 2), (MAC2, 1)] {
        let (code, out, err) = search(&bins, &["fds", "--mac", mac, j]);
        assert_eq!(code, 0, "{err}");
        let a = &out[0];
        let kernel = verdict_on(
            &journal,
            &format!("reason=start vm=\"vmaudit-sr1\" uuid={UUID} old-net=\"?\" new-net=\"{mac}\""),
        );
        assert_eq!(kernel["status"], "confirmed");
        assert_eq!(fds_of(a, "fds"), evidence_fds(&kernel), "{a:#}");
        assert_eq!(fds_of(a, "fds").len(), queues);
        assert_eq!(fds_of(a, "claimed_fds"), fds_of(a, "fds"));
        assert_eq!(a["emulator_pid"], emu);
        assert_eq!(a["status"], "confirmed");
        assert_eq!(a["claim"]["reason"], "start");
        assert_eq!(a["state"], "vm-stopped", "{a:#}");
        assert!(
            a["fds"]
                .as_array()
                .unwrap()
                .iter()
                .all(|f| f["path"] == "/dev/net/tun" && f["rdev"] == "10:200"),
            "{a:#}"
        );
        assert_eq!(a["opened"].as_array().unwrap().len(), queues, "{a:#}");
    }
    // Asked at a moment before the VM stopped: still held then.
    let stop = journal
        .iter()
        .find(|l| l["text"].as_str().is_some_and(|t| t.contains("op=stop")))
        .unwrap();
    let just_before = {
        let ns = stop["ts_ns"].as_u64().unwrap() - 1_000_000;
        format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000)
    };
    let (code, out, _) = search(&bins, &["fds", "--mac", MAC2, "--at", &just_before, j]);
    assert_eq!(
        (code, out[0]["state"].as_str()),
        (0, Some("held")),
        "{:#}",
        out[0]
    );

    // Listing: every record of MAC1 (two opens, the start), each with its verdicts.
    let (code, out, _) = search(&bins, &["--mac", MAC1, j]);
    assert_eq!(code, 0);
    let reasons: Vec<&str> = out.iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["open", "open", "start"]);
    assert!(
        out.iter()
            .all(|e| e["verdicts"][0]["status"] == "confirmed")
    );
    // By device, in either notation, and by path: the three tun opens.
    for dev in ["10:200", "0A:C8"] {
        let (code, out, _) = search(&bins, &["--device", dev, "--vm", "vmaudit-sr1", j]);
        assert_eq!(code, 0);
        let opens = out.iter().filter(|e| e["reason"] == "open").count();
        assert_eq!(opens, 3, "{dev}");
    }
    let (code, by_path, err) = search(&bins, &["--device", "/dev/null", j]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(by_path.len(), 1);
    assert_eq!(by_path[0]["resrc"], "cgroup");
    // By pid: every record of this run names the emulator.
    let (code, by_pid, err) = search(&bins, &["--pid", &emu.to_string(), j]);
    assert_eq!(code, 0, "{err}");
    let records = journal.iter().filter(|l| l["type"] != "verdict").count();
    assert_eq!(by_pid.len(), records);
    // By status and uuid; nothing violated, nothing of another VM.
    let (code, out, err) = search(&bins, &["--status", "violated", j]);
    assert_eq!((code, out.len()), (19, 0), "{err}");
    assert!(err.contains("no record matched"), "{err}");
    let (code, _, _) = search(
        &bins,
        &["--uuid", "00000000-0000-4000-8000-000000000000", j],
    );
    assert_eq!(code, 19);
    let (code, out, _) = search(
        &bins,
        &["--uuid", &UUID.to_uppercase(), "--status", "confirmed", j],
    );
    assert_eq!(code, 0);
    assert_eq!(out.len(), records, "every record of this run was confirmed");
    // A time window: nothing before the run, everything from its first second.
    let (code, _, _) = search(&bins, &["--until", "2000-01-01T00:00:00Z", j]);
    assert_eq!(code, 19);
    let first = journal[0]["ts_ns"].as_u64().unwrap() / 1_000_000_000;
    let (code, out, err) = search(&bins, &["--since", &first.to_string(), j]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.len(), records);
    // Nothing to answer: no such MAC.
    let (code, _, err) = search(&bins, &["fds", "--mac", "52:54:00:00:71:99", j]);
    assert_eq!(code, 19);
    assert!(
        err.contains("no start or attach of 52:54:00:00:71:99"),
        "{err}"
    );
    let (code, _, err) = search(&bins, &["released", "--mac", MAC1, j]);
    assert_eq!(code, 19, "no detach in this run: {err}");
}

#[test]
fn bad_filters_and_unreadable_inputs_are_refused_with_one_line() {
    let bins = bins!();
    let tmp = TempDir::new("search-bad");
    let garbage = tmp.0.join("garbage.jsonl");
    std::fs::write(&garbage, "{\"not\": \"a journal line\"}\n").unwrap();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["--mac", "52:54:00:zz:00:01", LIBVIRT_LOG],
            2,
            "--mac \"52:54:00:zz:00:01\" is not a MAC address",
        ),
        (
            &["fds", "--mac", "nope", LIBVIRT_LOG],
            2,
            "--mac \"nope\" is not a MAC address",
        ),
        (
            &["--device", "tun", LIBVIRT_LOG],
            2,
            "--device \"tun\" is neither a device path",
        ),
        (
            &["--since", "yesterday", LIBVIRT_LOG],
            2,
            "--since \"yesterday\" is neither RFC 3339",
        ),
        (
            &["released", "--mac", MAC1, "--at", "soon", LIBVIRT_LOG],
            2,
            "--until \"soon\"",
        ),
        (
            &["--uuid", "xyz", LIBVIRT_LOG],
            2,
            "--uuid \"xyz\" is not a uuid",
        ),
        (
            &["--since", "20", "--until", "10", LIBVIRT_LOG],
            2,
            "is after --until",
        ),
        (
            &["/nonexistent/j.jsonl"],
            11,
            "cannot read /nonexistent/j.jsonl",
        ),
        (
            &["--audit-log", "/nonexistent/audit.log"],
            11,
            "cannot read /nonexistent/audit.log",
        ),
        (
            &[garbage.to_str().unwrap()],
            11,
            "is not a vmaudit journal: line 1",
        ),
        (
            &["--audit-log", garbage.to_str().unwrap()],
            11,
            "is not an audit.log",
        ),
    ];
    for (args, want, msg) in cases {
        // The fixture is an audit.log, not a journal: give it as one where a journal is expected.
        let args: Vec<&str> = args
            .iter()
            .flat_map(|a| {
                if *a == LIBVIRT_LOG {
                    vec!["--audit-log", a]
                } else {
                    vec![*a]
                }
            })
            .collect();
        let (code, out, err) = run_vmaudit(&bins, &[&["search"], &args[..]].concat());
        assert_eq!(code, *want, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: nothing on stdout: {out}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
    }
}

#[test]
fn libvirts_audit_log_answers_with_what_libvirt_says_and_no_more() {
    let bins = bins!();
    // The hot-plugged NIC: attached to the emulator libvirt started (vm-pid), opened
    // /dev/net/tun, and no fds named: libvirt's records name none, an audit.log has no kernel.
    let (code, out, err) = search(
        &bins,
        &[
            "fds",
            "--mac",
            "52:54:00:1b:00:03",
            "--audit-log",
            LIBVIRT_LOG,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let a = &out[0];
    assert_eq!(a["claim"]["reason"], "attach");
    assert_eq!(a["emulator_pid"], 14915);
    assert_eq!(a["opened"], serde_json::json!(["/dev/net/tun (10:200)"]));
    assert_eq!(a["fds"], serde_json::json!([]));
    assert_eq!(a["status"], Value::Null);
    assert_eq!(a["state"], "vm-stopped");
    assert!(
        a["summary"]
            .as_str()
            .unwrap()
            .contains("its records name no fds"),
        "{a:#}"
    );
    let (code, _, err) = search(
        &bins,
        &[
            "released",
            "--mac",
            "52:54:00:1b:00:03",
            "--audit-log",
            LIBVIRT_LOG,
        ],
    );
    assert_eq!(code, 19, "libvirt never detached it: {err}");
    // Every /dev/net/tun open, by libvirt's hex rdev; every record of the run by its vm-pid.
    let (code, out, err) = search(&bins, &["--device", "0A:C8", "--audit-log", LIBVIRT_LOG]);
    assert_eq!(code, 0, "{err}");
    let macs: Vec<&str> = out.iter().map(|e| e["mac"].as_str().unwrap()).collect();
    assert_eq!(
        macs,
        [
            "52:54:00:1b:00:01",
            "52:54:00:1b:00:02",
            "52:54:00:1b:00:03"
        ]
    );
    let (code, out, err) = search(&bins, &["--pid", "14915", "--audit-log", LIBVIRT_LOG]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.len(), 20);
    // A verdict status filter finds nothing in an audit.log: it has no verdicts.
    let (code, _, _) = search(
        &bins,
        &["--status", "confirmed", "--audit-log", LIBVIRT_LOG],
    );
    assert_eq!(code, 19);
    // A window of the stamps: the three records at 1795882953.296 (start, mem, vcpu, ...).
    let (code, out, err) = search(
        &bins,
        &[
            "--since",
            "1795882953.296",
            "--until",
            "1795882953.296",
            "--audit-log",
            LIBVIRT_LOG,
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.len(), 5, "{out:#?}");
}

/// Real qemu, no guest: the unplug is never acknowledged, so no detach is claimed; search says
/// so, and says qemu still holds the attached fd.
#[test]
fn an_unacknowledged_detach_is_reported_as_not_claimed_and_the_fd_as_held() {
    require_root();
    let bins = bins!();
    let body = "[[interface]]\nmac = \"52:54:00:00:72:01\"\nifname = \"vmsr2-boot\"\n";
    let mut vm = VmRun::start(&bins, "vmaudit-sr2", UUID, body, &[]);
    let emu = vm.emulator_pid();
    let mac = "52:54:00:00:72:02";
    let (code, out, err) = run_vmaudit(
        &bins,
        &[
            "attach-net",
            "vmaudit-sr2",
            "--mac",
            mac,
            "--ifname",
            "vmsr2-t1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let attached: Value = serde_json::from_str(out.trim()).unwrap();
    let (code, _, err) = run_vmaudit(
        &bins,
        &[
            "detach-net",
            "vmaudit-sr2",
            "--mac",
            mac,
            "--timeout-ms",
            "300",
        ],
    );
    assert_eq!(code, 17, "{err}");
    let (code, kept) = vm.stop();
    assert_eq!(code, 0, "no detach claimed, nothing violated");
    let j = kept.journal.to_str().unwrap();
    let journal = kept.lines();
    let (code, out, err) = search(&bins, &["released", "--mac", mac, j]);
    assert_eq!(code, 0, "{err}");
    let r = &out[0];
    assert_eq!(r["detach"]["result"], "failed");
    let held: BTreeSet<i64> = attached["emulator_fds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_i64().unwrap())
        .collect();
    assert_eq!(fds_of(r, "claimed_fds"), held);
    assert_eq!(fds_of(r, "not_closed"), held);
    let summary = r["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("no detach was claimed (res=failed: ")
            && summary.ends_with(&format!(
                "still holds fd {}",
                held.iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        "{summary}"
    );
    let (code, out, _) = search(&bins, &["fds", "--mac", mac, j]);
    assert_eq!(code, 0);
    let a = &out[0];
    assert_eq!(a["claim"]["reason"], "attach");
    let kernel = verdict_on(
        &journal,
        &format!("reason=attach vm=\"vmaudit-sr2\" uuid={UUID} old-net=\"?\" new-net=\"{mac}\""),
    );
    assert_eq!(fds_of(a, "fds"), evidence_fds(&kernel));
    assert_eq!(fds_of(a, "fds"), held);
    assert_eq!(a["emulator_pid"], emu);
    let since: Vec<&str> = a["since"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["what"].as_str().unwrap())
        .collect();
    assert_eq!(since, ["detach-failed", "vm-stop"], "{a:#}");
    // At the moment of the failed detach, it was still held.
    let detach = journal
        .iter()
        .find(|l| {
            l["text"]
                .as_str()
                .is_some_and(|t| t.contains("reason=detach"))
        })
        .unwrap();
    let ns = detach["ts_ns"].as_u64().unwrap();
    let at = format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000);
    let (code, out, err) = search(&bins, &["fds", "--mac", mac, "--at", &at, j]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out[0]["state"], "held", "{:#}", out[0]);
}

/// Real qemu with a real guest: the guest acknowledges the unplug; search names the fds the
/// kernel saw qemu close, the same as the detach verdict's evidence and the attach's fds.
#[test]
fn a_confirmed_detach_names_the_fds_the_kernel_saw_closed() {
    require_root();
    let bins = bins!();
    let guest = vmaudit_tests::guest::GuestImage::find();
    let logs = TempDir::new("sr-guest");
    let serial = logs.0.join("serial.log");
    let body = format!(
        "{}\n[[interface]]\nmac = \"52:54:00:00:73:01\"\nifname = \"vmsr3-boot\"\n",
        guest.emulator_toml(&serial)
    );
    let mut vm = VmRun::start(&bins, "vmaudit-sr3", UUID, &body, &[]);
    let emu = vm.emulator_pid();
    vmaudit_tests::guest::wait_ready(&serial);
    let mac = "52:54:00:00:73:02";
    let (code, out, err) = run_vmaudit(
        &bins,
        &["attach-net", "vmaudit-sr3", "--mac", mac, "--queues", "2"],
    );
    assert_eq!(code, 0, "{err}");
    let attached: Value = serde_json::from_str(out.trim()).unwrap();
    let held: BTreeSet<i64> = attached["emulator_fds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_i64().unwrap())
        .collect();
    assert_eq!(held.len(), 2);
    let (code, _, err) = run_vmaudit(&bins, &["detach-net", "vmaudit-sr3", "--mac", mac]);
    assert_eq!(code, 0, "{err}");
    vm.json("detach verdict", |v| {
        v["type"] == "verdict" && v["claim"]["kind"] == "net-detach"
    });
    let j = vm.journal.to_str().unwrap().to_owned();
    let (code, out, err) = search(&bins, &["released", "--mac", mac, &j]);
    assert_eq!(code, 0, "{err}");
    let r = &out[0];
    let journal = vm.journal_lines();
    let kernel = verdict_on(
        &journal,
        &format!("reason=detach vm=\"vmaudit-sr3\" uuid={UUID} old-net=\"{mac}\""),
    );
    assert_eq!(kernel["status"], "confirmed");
    assert_eq!(r["status"], "confirmed");
    assert_eq!(fds_of(r, "closed"), evidence_fds(&kernel));
    assert_eq!(fds_of(r, "closed"), held);
    assert_eq!(r["not_closed"], serde_json::json!([]));
    assert!(
        r["closed"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["pid"] == emu && c["what"] == "close"),
        "{r:#}"
    );
    assert!(
        r["summary"].as_str().unwrap().starts_with(&format!(
            "the kernel saw the emulator (pid {emu}) close fd "
        )),
        "{r:#}"
    );
    // And the fds question, asked after the detach: released by it.
    let (code, out, err) = search(&bins, &["fds", "--mac", mac, &j]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out[0]["state"], "released", "{:#}", out[0]);
    assert_eq!(fds_of(&out[0], "fds"), held);
    let (code, _) = vm.stop();
    assert_eq!(code, 0);
}
