//! The hub: what the verifier (or `watch`'s tracker) told, kept for the dashboard and the
//! metrics.
//!
//! It is an [`Observer`], called on the verifier thread: each call takes one short lock,
//! updates the state, the history and the counters, and (only when someone listens) sends one
//! JSON event on a broadcast channel, which never blocks. Every event carries a sequence
//! number, and so does the snapshot of `/api/state`: a client that subscribes first, then reads
//! the snapshot, applies exactly the events after it.

mod state;

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;

use self::state::{NOTHING, State, apply_fd, vm_key};
use super::{
    metrics::{
        CauseLabel, KindLabel, Metrics, OpLabel, PidLabel, ResultLabel, VerdictLabels, VmLabels,
    },
    view::{
        ClaimTag, DecisionView, Decisions, Event, ProcView, Scope, Snapshot, StatusCounts,
        VerdictView, VmView,
    },
};
use crate::{
    cgroup::{Decision, DecisionDev},
    observe::{
        GapRecord,
        table::{FdRecord, Op},
    },
    verify::{
        Claim, ClaimKind, Status, Verdict,
        observer::{AuditEvent, Observer, VmInfo},
    },
};

/// How many verdicts the hub keeps for a new page (the metrics count them all).
pub const KEPT_VERDICTS: usize = 1000;
/// Events a slow client may fall behind by before it is told to reload the state.
const CHANNEL: usize = 4096;
const NS: u64 = 1_000_000_000;

/// Unix ns now, and its second.
fn now() -> (u64, u64) {
    let ns = vmaudit_core::time::unix_now_ns();
    (ns, ns / NS)
}

fn status_index(status: Status) -> usize {
    Status::ALL.iter().position(|s| *s == status).unwrap_or(0)
}

/// Shared by the verifier (as an observer) and the HTTP server.
#[derive(Debug)]
pub struct Hub {
    scope: Scope,
    state: Mutex<State>,
    metrics: Metrics,
    events: broadcast::Sender<Arc<str>>,
}

impl Hub {
    /// A hub of VMs (`run`).
    pub fn new() -> Arc<Self> {
        Self::with_scope(Scope::Vms, false)
    }

    /// A hub of VMs whose claims come from an audit stream (`monitor`): with its metrics.
    pub fn for_monitor() -> Arc<Self> {
        Self::with_scope(Scope::Vms, true)
    }

    /// A hub of watched processes (`watch`).
    pub fn for_processes() -> Arc<Self> {
        Self::with_scope(Scope::Processes, false)
    }

    fn with_scope(scope: Scope, audit_source: bool) -> Arc<Self> {
        Arc::new(Self {
            scope,
            state: Mutex::default(),
            metrics: Metrics::new(audit_source),
            events: broadcast::channel(CHANNEL).0,
        })
    }

    /// The sequence number of the last event.
    pub fn seq(&self) -> u64 {
        self.lock().seq
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
        let (now_ns, t) = now();
        let mut guard = self.lock();
        let st = &mut *guard;
        st.history.prune(t);
        let processes = st
            .procs
            .iter()
            .map(|(pid, fds)| ProcView {
                pid: *pid,
                vm: st.vm_of_pid.get(pid).map(|i| st.vms[*i].info.name.as_str()),
                fds: fds.values().collect(),
            })
            .collect();
        let snap = Snapshot {
            scope: self.scope,
            seq: st.seq,
            vms: &st.vms,
            processes,
            verdicts: &st.verdicts,
            totals: st.totals,
            claims: st.claims,
            lost: &st.lost,
            decisions: Decisions {
                allowed: st.allowed,
                denied: st.denied,
            },
            history: st.history.view(now_ns),
        };
        serde_json::to_string(&snap).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters, not broken invariants: go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Numbers the event and sends it to whoever listens (serialised only then).
    fn send(&self, seq: &mut u64, make: impl FnOnce(u64) -> Option<String>) {
        *seq += 1;
        if self.events.receiver_count() == 0 {
            return;
        }
        if let Some(json) = make(*seq) {
            // No receiver left since the check: nothing to do.
            let _ = self.events.send(Arc::from(json));
        }
    }

    /// Sets the fd-count gauge of `pid`: a running VM's emulator, or a watched process (whose
    /// series goes with its table).
    fn gauge(&self, st: &State, pid: u32) {
        let n = st.fds_of(pid) as i64;
        match self.scope {
            Scope::Vms => {
                if let Some(i) = st.vm_of_pid.get(&pid) {
                    self.metrics
                        .vm_fds
                        .get_or_create(&VmLabels {
                            vm: st.vms[*i].info.name.clone(),
                            pid: pid.to_string(),
                        })
                        .set(n);
                }
            }
            Scope::Processes => {
                let label = PidLabel {
                    pid: pid.to_string(),
                };
                if st.procs.contains_key(&pid) {
                    self.metrics.process_fds.get_or_create(&label).set(n);
                } else {
                    self.metrics.process_fds.remove(&label);
                }
            }
        }
    }

    /// Tags an fd with the claim behind it, and tells the clients.
    fn tag(&self, st: &mut State, t: u64, pid: u32, fd: i32, tag: ClaimTag) {
        let Some(row) = st.procs.get_mut(&pid).and_then(|t| t.get_mut(&fd)) else {
            return;
        };
        if row.claim.as_ref() == Some(&tag) {
            return;
        }
        row.claim = Some(tag);
        let subject = st.subject(self.scope, pid);
        let row = st.procs.get(&pid).and_then(|t| t.get(&fd));
        self.send(&mut st.seq, |seq| {
            serde_json::to_string(&Event::Fd {
                seq,
                t,
                pid,
                fd: Some(fd),
                op: "claim",
                row,
                subject: subject.as_deref(),
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
        let (_, t) = now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let key = vm_key(&vm.name, &vm.uuid);
        let i = match st.vm_index.get(&key) {
            Some(&i) => {
                let old = st.vms[i].info.pid;
                if old != 0 && old != vm.pid {
                    // A restart: the old emulator is no VM's any more.
                    st.vm_of_pid.remove(&old);
                    self.metrics.vm_fds.remove(&VmLabels {
                        vm: vm.name.clone(),
                        pid: old.to_string(),
                    });
                }
                st.vms[i].info = vm.clone();
                i
            }
            None => {
                st.vms.push(VmView {
                    info: vm.clone(),
                    key: key.clone(),
                    verdicts: StatusCounts::default(),
                });
                st.vm_index.insert(key.clone(), st.vms.len() - 1);
                st.vms.len() - 1
            }
        };
        if vm.pid != 0 {
            let fds = if vm.state == "running" {
                st.vm_of_pid.insert(vm.pid, i);
                self.gauge(st, vm.pid);
                st.fds_of(vm.pid)
            } else {
                st.vm_of_pid.remove(&vm.pid);
                self.metrics.vm_fds.remove(&VmLabels {
                    vm: vm.name.clone(),
                    pid: vm.pid.to_string(),
                });
                0
            };
            st.history.fds(t, &key, fds);
        }
        let view = &st.vms[i];
        self.send(&mut st.seq, |seq| {
            serde_json::to_string(&Event::Vm { seq, t, vm: view }).ok()
        });
    }

    fn claim(&self, claim: &Claim) {
        self.metrics
            .claims
            .get_or_create(&KindLabel {
                kind: claim.kind.name().to_owned(),
            })
            .inc();
        let (_, t) = now();
        let mut guard = self.lock();
        let st = &mut *guard;
        st.claims += 1;
        let key = vm_key(&claim.vm_name, &claim.uuid);
        if !key.is_empty() {
            st.remember_claim(claim.id, key);
        }
        self.send(&mut st.seq, |seq| {
            serde_json::to_string(&Event::Claim {
                seq,
                t,
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
                self.tag(st, t, *emulator_pid, f.emulator_fd, tag);
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
        let (_, t) = now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let idx = status_index(v.status);
        st.totals.0[idx] += 1;
        let vm = st.vm_of_verdict(v);
        if let Some(i) = vm.as_ref().and_then(|k| st.vm_index.get(k)) {
            st.vms[*i].verdicts.0[idx] += 1;
        }
        st.history.verdict(t, v.status, vm.as_deref());
        for e in &v.evidence {
            if let Some(fd) = e.fd {
                let tag = ClaimTag {
                    id: v.claim.id,
                    kind: v.claim.kind.clone(),
                    mac: v.claim.mac.clone(),
                    status: Some(status),
                };
                self.tag(st, t, e.pid, fd, tag);
            }
        }
        if st.verdicts.len() == KEPT_VERDICTS {
            st.verdicts.pop_front();
        }
        st.verdicts.push_back(VerdictView {
            verdict: v.clone(),
            vm,
        });
        let verdict = st.verdicts.back();
        self.send(&mut st.seq, |seq| {
            serde_json::to_string(&Event::Verdict {
                seq,
                t,
                verdict: verdict?,
            })
            .ok()
        });
    }

    fn fd(&self, r: &FdRecord) {
        let op = op_name(r.op);
        self.metrics
            .fd_events
            .get_or_create(&OpLabel { op: op.clone() })
            .inc();
        let (now_ns, t) = now();
        let mut guard = self.lock();
        let st = &mut *guard;
        if let Some(fd) = r.fd.filter(|_| r.result.is_ok()) {
            apply_fd(&mut st.procs, r, fd, now_ns);
        }
        self.gauge(st, r.pid);
        let subject = st.subject(self.scope, r.pid);
        let fds = st.fds_of(r.pid);
        st.history
            .fd_event(t, subject.as_deref().map(|key| (key, fds)));
        let row =
            r.fd.and_then(|fd| st.procs.get(&r.pid).and_then(|t| t.get(&fd)));
        self.send(&mut st.seq, |seq| {
            serde_json::to_string(&Event::Fd {
                seq,
                t,
                pid: r.pid,
                fd: r.fd,
                op: &op,
                row,
                subject: subject.as_deref(),
            })
            .ok()
        });
    }

    fn gap(&self, g: &GapRecord) {
        let (_, t) = now();
        let mut guard = self.lock();
        let st = &mut *guard;
        // The gaps of one check share its host-wide causes: counted once.
        let counted = if g.check == st.last_check {
            &NOTHING
        } else {
            st.last_check = g.check;
            &g.causes
        };
        for (cause, n) in counted {
            self.metrics
                .lost_events
                .get_or_create(&CauseLabel {
                    cause: (*cause).to_owned(),
                })
                .inc_by(*n);
            *st.lost.entry(cause).or_default() += n;
        }
        st.history.lost(t, counted);
        self.send(&mut st.seq, |seq| {
            serde_json::to_string(&Event::Gap {
                seq,
                t,
                gap: g,
                counted,
            })
            .ok()
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
        let (_, t) = now();
        let mut guard = self.lock();
        let st = &mut *guard;
        if d.allowed {
            st.allowed += 1;
        } else {
            st.denied += 1;
        }
        self.send(&mut st.seq, |seq| {
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
            serde_json::to_string(&Event::Decision { seq, t, decision }).ok()
        });
    }
}

#[cfg(test)]
mod tests;
