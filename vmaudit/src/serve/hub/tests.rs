//! The hub against the observer calls the verifier and `watch` make.

use std::collections::BTreeMap;

use serde_json::Value;

use super::*;
use crate::{
    procfs::{DevNum, FdIdentity, FileKind, Source},
    serve::history::WINDOW_S,
    verify::{ClaimRef, Evidence, Handed},
};

const EMU: u32 = 4242;

fn record(op: Op, fd: i32, path: &str) -> FdRecord {
    FdRecord {
        ty: "fd",
        ts: 7,
        pid: EMU,
        tid: EMU,
        op,
        syscall: "close",
        fd: Some(fd),
        result: vmaudit_core::fd::Outcome::Ok,
        cloexec: Some(false),
        from_fd: None,
        file: Some(FdIdentity {
            path: path.into(),
            kind: FileKind::Char,
            rdev: Some(DevNum {
                major: 10,
                minor: 200,
            }),
            dev: None,
            ino: None,
            flags: None,
            mode: None,
            ofd: None,
            iface: Some("vmtap0".into()),
            source: Source::Proc,
        }),
    }
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .map(|v| v.trim().parse().unwrap())
}

#[test]
fn tables_claims_verdicts_and_metrics_follow_the_verifier() {
    let hub = Hub::new();
    let mut live = hub.subscribe();
    hub.fd(&record(Op::Inherit, 38, "/dev/net/tun"));
    hub.fd(&record(Op::Inherit, 39, "/dev/vhost-net"));
    hub.vm(&VmInfo {
        name: "vm1".into(),
        uuid: "u1".into(),
        pid: EMU,
        state: "running",
    });
    hub.claim(&Claim {
        id: 3,
        kind: ClaimKind::NetUp {
            mac: "52:54:00:00:00:01".into(),
            attach: false,
            emulator_pid: Some(EMU),
            handed: vec![Handed {
                fd: 38,
                emulator_fd: 38,
                same_at_handoff: Some(true),
                rdev: None,
                path: "/dev/net/tun".into(),
            }],
        },
        vm_name: "vm1".into(),
        uuid: "u1".into(),
        success: true,
        sender: None,
        text: String::new(),
        record_ts_ns: 1,
        made_ns: 1,
        historic: false,
    });
    let st: Value = serde_json::from_str(&hub.state_json()).unwrap();
    let proc = &st["processes"][0];
    assert_eq!(
        (proc["pid"].as_u64(), proc["vm"].as_str()),
        (Some(4242), Some("vm1"))
    );
    assert_eq!(proc["fds"][0]["claim"]["kind"], "net-start");
    assert_eq!(proc["fds"][0]["claim"]["mac"], "52:54:00:00:00:01");
    assert_eq!(
        proc["fds"][1]["claim"],
        Value::Null,
        "fd 39 was not claimed"
    );
    let text = hub.metrics_text();
    assert_eq!(
        metric(&text, "vmaudit_vm_fds{vm=\"vm1\",pid=\"4242\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, "vmaudit_claims_total{kind=\"net-start\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "vmaudit_fd_events_total{op=\"inherit\"}"),
        Some(2.0)
    );

    // The close, then its violation.
    hub.fd(&record(Op::Close, 38, "/dev/net/tun"));
    hub.verdict(&released_fd_38());
    let st: Value = serde_json::from_str(&hub.state_json()).unwrap();
    assert_eq!(st["processes"][0]["fds"].as_array().unwrap().len(), 1);
    assert_eq!(st["totals"]["violated"], 1);
    assert_eq!(st["verdicts"][0]["status"], "violated");
    let text = hub.metrics_text();
    assert_eq!(
        metric(&text, "vmaudit_vm_fds{vm=\"vm1\",pid=\"4242\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "vmaudit_verdicts_total{status=\"violated\",kind=\"net-start\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "vmaudit_verdicts_total{status=\"confirmed\",kind=\"net-start\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&text, "vmaudit_cgroup_decisions_total{result=\"denied\"}"),
        Some(0.0)
    );

    // The events came in order, numbered, the snapshot's seq being the last one's.
    let mut types = Vec::new();
    let mut last = 0;
    while let Ok(json) = live.try_recv() {
        let ev: Value = serde_json::from_str(&json).unwrap();
        let seq = ev["seq"].as_u64().unwrap();
        assert_eq!(seq, last + 1, "{ev}");
        last = seq;
        types.push(ev["type"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        types,
        ["fd", "fd", "vm", "claim", "fd", "fd", "verdict"],
        "the fourth fd event is the claim tagging fd 38"
    );
    assert_eq!(st["seq"], last);

    // The VM stops: its gauge goes.
    hub.vm(&VmInfo {
        name: "vm1".into(),
        uuid: "u1".into(),
        pid: EMU,
        state: "stopped",
    });
    assert_eq!(
        metric(
            &hub.metrics_text(),
            "vmaudit_vm_fds{vm=\"vm1\",pid=\"4242\"}"
        ),
        None
    );
}

fn sum(rate: &Value) -> Vec<u64> {
    let mut out = Vec::new();
    for bucket in rate.as_array().unwrap() {
        for (i, n) in bucket[1].as_array().unwrap().iter().enumerate() {
            if out.len() <= i {
                out.push(0);
            }
            out[i] += n.as_u64().unwrap();
        }
    }
    out
}

fn vm1(state: &'static str) -> VmInfo {
    VmInfo {
        name: "vm1".into(),
        uuid: "u1".into(),
        pid: EMU,
        state,
    }
}

#[test]
fn the_history_follows_fd_events_verdicts_and_vms() {
    let hub = Hub::new();
    // Before the VM is known its emulator's events count for the host only.
    hub.fd(&record(Op::Inherit, 38, "/dev/net/tun"));
    hub.vm(&vm1("running"));
    hub.fd(&record(Op::Inherit, 39, "/dev/vhost-net"));
    hub.fd(&record(Op::Close, 38, "/dev/net/tun"));
    hub.verdict(&released_fd_38());
    let st: Value = serde_json::from_str(&hub.state_json()).unwrap();
    assert_eq!(st["scope"], "vms");
    let h = &st["history"];
    assert_eq!(h["window_s"], WINDOW_S);
    assert_eq!(sum(&h["fd_events"]), [3]);
    assert_eq!(sum(&h["verdicts"]), [0, 1, 0, 0]);
    let vm = &h["subjects"]["u1"];
    assert_eq!(sum(&vm["events"]), [2], "the two after the VM was known");
    assert_eq!(sum(&vm["verdicts"]), [0, 1, 0, 0], "by its emulator's pid");
    // 1 fd when the VM was known, 2, then 1: within one second only the last stays.
    let steps = vm["fds"].as_array().unwrap();
    assert_eq!(steps.last().unwrap()[1], 1, "{steps:?}");
    assert_eq!(st["vms"][0]["verdicts"]["violated"], 1);
    assert_eq!(st["vms"][0]["key"], "u1");
    assert_eq!(st["verdicts"][0]["vm"], "u1");
    let row = &st["processes"][0]["fds"][0];
    assert!(row["since_unix_ns"].as_u64().unwrap() > 1_600_000_000 * NS);
    // It stops: no fds from now on.
    hub.vm(&vm1("stopped"));
    let st: Value = serde_json::from_str(&hub.state_json()).unwrap();
    let steps = st["history"]["subjects"]["u1"]["fds"].as_array().unwrap();
    assert_eq!(steps.last().unwrap()[1], 0);
}

fn gap(check: u64, pid: u32, ring_full: u64) -> GapRecord {
    GapRecord {
        ty: "gap",
        ts: 9,
        since_ns: 1,
        pid,
        lost: 1,
        causes: BTreeMap::from([("ring_full", ring_full)]),
        check,
        added: Vec::new(),
        removed: Vec::new(),
    }
}

#[test]
fn lost_events_count_once_per_loss_check() {
    let hub = Hub::new();
    let mut live = hub.subscribe();
    // One check resynced two processes: its causes are the host's, once.
    hub.gap(&gap(1, EMU, 5));
    hub.gap(&gap(1, EMU + 1, 5));
    // The next check found as many: counted again.
    hub.gap(&gap(2, EMU, 5));
    let st: Value = serde_json::from_str(&hub.state_json()).unwrap();
    assert_eq!(st["lost"]["ring_full"], 10);
    let lost: u64 = st["history"]["lost"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b[1]["ring_full"].as_u64().unwrap())
        .sum();
    assert_eq!(lost, 10);
    assert_eq!(
        metric(
            &hub.metrics_text(),
            "vmaudit_lost_events_total{cause=\"ring_full\"}"
        ),
        Some(10.0)
    );
    let counted: Vec<Value> = std::iter::from_fn(|| live.try_recv().ok())
        .map(|j| serde_json::from_str::<Value>(&j).unwrap()["counted"].clone())
        .collect();
    assert_eq!(
        counted,
        [
            serde_json::json!({"ring_full": 5}),
            serde_json::json!({}),
            serde_json::json!({"ring_full": 5})
        ]
    );
}

#[test]
fn watched_processes_are_their_own_subjects() {
    let hub = Hub::for_processes();
    hub.fd(&record(Op::Seed, 0, "/dev/null"));
    hub.fd(&record(Op::Open, 5, "/dev/net/tun"));
    let st: Value = serde_json::from_str(&hub.state_json()).unwrap();
    assert_eq!(st["scope"], "processes");
    assert_eq!(st["processes"][0]["fds"].as_array().unwrap().len(), 2);
    let subject = &st["history"]["subjects"]["4242"];
    assert_eq!(sum(&subject["events"]), [2]);
    assert_eq!(subject["fds"].as_array().unwrap().last().unwrap()[1], 2);
    let gauge = "vmaudit_process_fds{pid=\"4242\"}";
    assert_eq!(metric(&hub.metrics_text(), gauge), Some(2.0));
    // It exits: its table and its gauge go; its history shows 0 fds.
    hub.fd(&record(Op::Exit, 0, "/dev/null"));
    hub.fd(&record(Op::Exit, 5, "/dev/net/tun"));
    let st: Value = serde_json::from_str(&hub.state_json()).unwrap();
    assert_eq!(st["processes"], serde_json::json!([]));
    let steps = st["history"]["subjects"]["4242"]["fds"].as_array().unwrap();
    assert_eq!(steps.last().unwrap()[1], 0);
    assert_eq!(metric(&hub.metrics_text(), gauge), None);
}

/// The violation of claim 3 (net-start): the emulator released fd 38.
fn released_fd_38() -> Verdict {
    let claim = ClaimRef {
        id: 3,
        kind: "net-start".into(),
        ..ClaimRef::default()
    };
    let ev = Evidence {
        pid: EMU,
        fd: Some(38),
        what: "close".into(),
        ..Evidence::default()
    };
    Verdict::new(claim, Status::Violated, "released", vec![ev])
}
