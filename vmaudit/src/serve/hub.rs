//! The hub: what the verifier told, kept for the dashboard and the metrics.
//!
//! It is an [`Observer`], called on the verifier thread: each call takes one short lock,
//! updates the state and the counters, and (only when someone listens) sends one JSON event
//! on a broadcast channel, which never blocks. Every event carries a sequence number, and so
//! does the snapshot of `/api/state`: a client that subscribes first, then reads the snapshot,
//! applies exactly the events after it.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use serde::Serialize;
use tokio::sync::broadcast;

use super::metrics::{
    CauseLabel, KindLabel, Metrics, OpLabel, ResultLabel, VerdictLabels, VmLabels,
};
use crate::{
    cgroup::{Decision, DecisionDev},
    observe::{
        GapRecord,
        table::{FdRecord, Op},
    },
    procfs::{DevNum, FileKind},
    verify::{
        Claim, ClaimKind, Verdict,
        observer::{AuditEvent, Observer, VmInfo},
    },
};

/// How many verdicts the hub keeps for a new page (the metrics count them all).
pub const KEPT_VERDICTS: usize = 1000;
/// Events a slow client may fall behind by before it is told to reload the state.
const CHANNEL: usize = 4096;

/// The claim behind an fd.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClaimTag {
    pub id: u64,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The status of the last verdict that named this fd as evidence, if any yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'static str>,
}

/// One fd of a live table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FdRow {
    pub fd: i32,
    pub path: String,
    pub kind: Option<FileKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdev: Option<DevNum>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iface: Option<String>,
    pub cloexec: bool,
    /// How it arrived (`seed`, `open`, `inherit`, ...).
    pub via: Op,
    /// Kernel CLOCK_MONOTONIC ns it arrived (0: held when watching started).
    pub since_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim: Option<ClaimTag>,
}

/// The dashboard's state.
#[derive(Debug, Default)]
struct State {
    /// The sequence number of the last event.
    seq: u64,
    /// By uuid (or name when the uuid is unknown), in the order first heard of.
    vms: Vec<VmInfo>,
    /// The VM name of each running emulator pid.
    vm_of_pid: HashMap<u32, String>,
    procs: BTreeMap<u32, BTreeMap<i32, FdRow>>,
    verdicts: VecDeque<Verdict>,
    totals: BTreeMap<&'static str, u64>,
    claims: u64,
    lost: BTreeMap<&'static str, u64>,
    allowed: u64,
    denied: u64,
}

/// The JSON of `/api/state`.
#[derive(Serialize)]
struct Snapshot<'a> {
    seq: u64,
    vms: &'a [VmInfo],
    processes: Vec<ProcView<'a>>,
    /// Oldest first.
    verdicts: &'a VecDeque<Verdict>,
    totals: &'a BTreeMap<&'static str, u64>,
    claims: u64,
    lost: &'a BTreeMap<&'static str, u64>,
    decisions: Decisions,
}

#[derive(Serialize)]
struct ProcView<'a> {
    pid: u32,
    /// The VM whose emulator this is, if it is one.
    vm: Option<&'a str>,
    fds: Vec<&'a FdRow>,
}

#[derive(Serialize)]
struct Decisions {
    allowed: u64,
    denied: u64,
}

/// A live event of `/events`.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Event<'a> {
    Vm {
        seq: u64,
        vm: &'a VmInfo,
    },
    /// `row` is the fd as it is now; null when it is gone.
    Fd {
        seq: u64,
        pid: u32,
        fd: i32,
        op: &'a str,
        row: Option<&'a FdRow>,
    },
    /// A claim taken up (its verdict follows).
    Claim {
        seq: u64,
        id: u64,
        kind: &'static str,
    },
    Verdict {
        seq: u64,
        verdict: &'a Verdict,
    },
    Gap {
        seq: u64,
        gap: &'a GapRecord,
    },
    Decision {
        seq: u64,
        decision: DecisionView,
    },
}

#[derive(Serialize)]
struct DecisionView {
    ts_ns: u64,
    tgid: u32,
    cgroup_id: u64,
    dev: &'static str,
    major: u32,
    minor: u32,
    access: String,
    allowed: bool,
}

/// Shared by the verifier (as an observer) and the HTTP server.
#[derive(Debug)]
pub struct Hub {
    state: Mutex<State>,
    metrics: Metrics,
    events: broadcast::Sender<Arc<str>>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            metrics: Metrics::default(),
            events: broadcast::channel(CHANNEL).0,
        }
    }
}

impl Hub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The OpenMetrics text of `/metrics`.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    /// Live events (JSON), from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.events.subscribe()
    }

    /// The JSON of `/api/state`.
    pub fn state_json(&self) -> String {
        let st = self.lock();
        let processes = st
            .procs
            .iter()
            .map(|(pid, fds)| ProcView {
                pid: *pid,
                vm: st.vm_of_pid.get(pid).map(String::as_str),
                fds: fds.values().collect(),
            })
            .collect();
        let snap = Snapshot {
            seq: st.seq,
            vms: &st.vms,
            processes,
            verdicts: &st.verdicts,
            totals: &st.totals,
            claims: st.claims,
            lost: &st.lost,
            decisions: Decisions {
                allowed: st.allowed,
                denied: st.denied,
            },
        };
        serde_json::to_string(&snap).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters, not broken invariants: go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Numbers the event and sends it to whoever listens (serialised only then).
    fn send(&self, st: &mut State, make: impl FnOnce(u64) -> Option<String>) {
        st.seq += 1;
        if self.events.receiver_count() == 0 {
            return;
        }
        if let Some(json) = make(st.seq) {
            // No receiver left since the check: nothing to do.
            let _ = self.events.send(Arc::from(json));
        }
    }

    /// Sets the fd-count gauge of `pid` if it is a running VM's emulator.
    fn gauge(&self, st: &State, pid: u32) {
        if let Some(vm) = st.vm_of_pid.get(&pid) {
            let n = st.procs.get(&pid).map_or(0, BTreeMap::len);
            self.metrics
                .vm_fds
                .get_or_create(&VmLabels {
                    vm: vm.clone(),
                    pid: pid.to_string(),
                })
                .set(n as i64);
        }
    }

    /// Tags an fd with the claim behind it, and tells the clients.
    fn tag(&self, st: &mut State, pid: u32, fd: i32, tag: ClaimTag) {
        let Some(row) = st.procs.get_mut(&pid).and_then(|t| t.get_mut(&fd)) else {
            return;
        };
        if row.claim.as_ref() == Some(&tag) {
            return;
        }
        row.claim = Some(tag);
        let row = row.clone();
        self.send(st, |seq| {
            serde_json::to_string(&Event::Fd {
                seq,
                pid,
                fd,
                op: "claim",
                row: Some(&row),
            })
            .ok()
        });
    }
}

/// The name of an op as `vmaudit watch` prints it.
fn op_name(op: Op) -> String {
    match serde_json::to_value(op) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{op:?}"),
    }
}

impl Observer for Hub {
    fn audit(&self, event: &AuditEvent) {
        let m = &self.metrics;
        match *event {
            AuditEvent::Record { stamp } => {
                m.audit_records.inc();
                m.audit_last_record.set(stamp);
            }
            AuditEvent::Lost { cause, count } => {
                m.audit_lost
                    .get_or_create(&CauseLabel {
                        cause: cause.to_owned(),
                    })
                    .inc_by(count);
            }
            AuditEvent::Status {
                enabled,
                backlog_limit,
            } => {
                m.audit_enabled.set(i64::from(enabled));
                m.audit_backlog_limit.set(i64::from(backlog_limit));
            }
        }
    }

    fn not_from_manager(&self, _claim: &Claim) {
        self.metrics.not_from_manager.inc();
    }

    fn vm(&self, vm: &VmInfo) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let key = |v: &VmInfo| {
            if v.uuid.is_empty() {
                v.name.clone()
            } else {
                v.uuid.clone()
            }
        };
        let k = key(vm);
        match st.vms.iter().position(|v| key(v) == k) {
            Some(i) => {
                let old = st.vms[i].pid;
                if old != 0 && old != vm.pid {
                    // A restart: the old emulator is no VM's any more.
                    st.vm_of_pid.remove(&old);
                    self.metrics.vm_fds.remove(&VmLabels {
                        vm: vm.name.clone(),
                        pid: old.to_string(),
                    });
                }
                st.vms[i] = vm.clone();
            }
            None => st.vms.push(vm.clone()),
        }
        if vm.pid != 0 {
            if vm.state == "running" {
                st.vm_of_pid.insert(vm.pid, vm.name.clone());
                self.gauge(st, vm.pid);
            } else {
                st.vm_of_pid.remove(&vm.pid);
                self.metrics.vm_fds.remove(&VmLabels {
                    vm: vm.name.clone(),
                    pid: vm.pid.to_string(),
                });
            }
        }
        self.send(st, |seq| serde_json::to_string(&Event::Vm { seq, vm }).ok());
    }

    fn claim(&self, claim: &Claim) {
        self.metrics
            .claims
            .get_or_create(&KindLabel {
                kind: claim.kind.name().to_owned(),
            })
            .inc();
        let mut st = self.lock();
        st.claims += 1;
        self.send(&mut st, |seq| {
            serde_json::to_string(&Event::Claim {
                seq,
                id: claim.id,
                kind: claim.kind.name(),
            })
            .ok()
        });
        if let ClaimKind::NetUp {
            mac,
            emulator_pid: Some(emulator_pid),
            handed,
            ..
        } = &claim.kind
        {
            for f in handed {
                let tag = ClaimTag {
                    id: claim.id,
                    kind: claim.kind.name().to_owned(),
                    mac: Some(mac.clone()),
                    status: None,
                };
                self.tag(&mut st, *emulator_pid, f.emulator_fd, tag);
            }
        }
    }

    fn verdict(&self, v: &Verdict) {
        let status = v.status.as_str();
        self.metrics
            .verdicts
            .get_or_create(&VerdictLabels {
                status: status.to_owned(),
                kind: v.claim.kind.clone(),
            })
            .inc();
        let mut st = self.lock();
        *st.totals.entry(status).or_default() += 1;
        for e in &v.evidence {
            if let Some(fd) = e.fd {
                let tag = ClaimTag {
                    id: v.claim.id,
                    kind: v.claim.kind.clone(),
                    mac: v.claim.mac.clone(),
                    status: Some(status),
                };
                self.tag(&mut st, e.pid, fd, tag);
            }
        }
        if st.verdicts.len() == KEPT_VERDICTS {
            st.verdicts.pop_front();
        }
        st.verdicts.push_back(v.clone());
        self.send(&mut st, |seq| {
            serde_json::to_string(&Event::Verdict { seq, verdict: v }).ok()
        });
    }

    fn fd(&self, r: &FdRecord) {
        let op = op_name(r.op);
        self.metrics
            .fd_events
            .get_or_create(&OpLabel { op: op.clone() })
            .inc();
        let Some(fd) = r.fd.filter(|_| r.result.is_ok()) else {
            return;
        };
        let mut st = self.lock();
        let table = st.procs.entry(r.pid).or_default();
        match r.op {
            Op::Seed
            | Op::Open
            | Op::Dup
            | Op::RecvFd
            | Op::PidfdGetfd
            | Op::New
            | Op::Inherit
            | Op::ResyncAdd => {
                let file = r.file.as_ref();
                table.insert(
                    fd,
                    FdRow {
                        fd,
                        path: file.map(|f| f.path.clone()).unwrap_or_default(),
                        kind: file.map(|f| f.kind),
                        rdev: file.and_then(|f| f.rdev),
                        iface: file.and_then(|f| f.iface.clone()),
                        cloexec: r.cloexec.unwrap_or(false),
                        via: r.op,
                        since_ns: r.ts,
                        claim: None,
                    },
                );
            }
            Op::Close
            | Op::Replaced
            | Op::CloseRange
            | Op::ExecCloexec
            | Op::Exit
            | Op::ResyncRemove => {
                table.remove(&fd);
            }
            Op::CloexecOn | Op::CloexecOff => {
                if let Some(row) = table.get_mut(&fd) {
                    row.cloexec = r.op == Op::CloexecOn;
                }
            }
            // Still held here.
            Op::SendFd => {}
        }
        if r.op == Op::Exit && table.is_empty() {
            st.procs.remove(&r.pid);
        }
        self.gauge(&st, r.pid);
        let row = st.procs.get(&r.pid).and_then(|t| t.get(&fd)).cloned();
        self.send(&mut st, |seq| {
            serde_json::to_string(&Event::Fd {
                seq,
                pid: r.pid,
                fd,
                op: &op,
                row: row.as_ref(),
            })
            .ok()
        });
    }

    fn gap(&self, g: &GapRecord) {
        for (cause, n) in &g.causes {
            self.metrics
                .lost_events
                .get_or_create(&CauseLabel {
                    cause: (*cause).to_owned(),
                })
                .inc_by(*n);
        }
        let mut st = self.lock();
        for (cause, n) in &g.causes {
            *st.lost.entry(cause).or_default() += n;
        }
        self.send(&mut st, |seq| {
            serde_json::to_string(&Event::Gap { seq, gap: g }).ok()
        });
    }

    fn decision(&self, d: &Decision) {
        let result = if d.allowed { "allowed" } else { "denied" };
        self.metrics
            .decisions
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
        let mut st = self.lock();
        if d.allowed {
            st.allowed += 1;
        } else {
            st.denied += 1;
        }
        self.send(&mut st, |seq| {
            let decision = DecisionView {
                ts_ns: d.ts_ns,
                tgid: d.tgid,
                cgroup_id: d.cgroup_id,
                dev: match d.dev {
                    DecisionDev::Char => "c",
                    DecisionDev::Block => "b",
                    DecisionDev::Other(_) => "?",
                },
                major: d.major,
                minor: d.minor,
                access: d.access.to_string(),
                allowed: d.allowed,
            };
            serde_json::to_string(&Event::Decision { seq, decision }).ok()
        });
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::{
        procfs::{FdIdentity, Source},
        verify::{ClaimRef, Evidence, Handed, Status},
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
        hub.verdict(&Verdict::new(claim, Status::Violated, "released", vec![ev]));
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
}
