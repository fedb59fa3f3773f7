//! The verifier thread of `vmaudit run`.
//!
//! It watches vmaudit itself and every child it forks (the emulator, and whatever the emulator
//! forks) with the kernel fd tracker, from a thread of its own whose syscalls the kernel side
//! ignores (its reads of /proc would otherwise report themselves). Claims arrive on a channel;
//! each is judged after the kernel events before it have been applied. Verdicts go to the
//! journal (fsync'd), to `on_verdict`, and violations to stderr as they happen; `on_verdict`
//! runs on a thread of its own ([`Publisher`]), so that an fsync never delays a judgement.

use std::{thread::JoinHandle, time::Duration};

use tokio::sync::{mpsc, watch};

use super::{
    Status, Verdict,
    claims::{Claim, ClaimKind},
    ledger::Ledger,
    observer::{Observer, Observers, VmInfo},
};
use crate::{
    cgroup::{DecisionStream, DeviceRule},
    observe::{ObserveError, Output, WatchOptions, Watcher, loader::TrackerOptions, monotonic_ns},
    procfs::ProcFs,
};

/// What the run thread tells the verifier.
pub enum Msg {
    Claim(Box<Claim>),
    /// The VM cgroup's decision stream (v2 only).
    Decisions(DecisionStream),
    /// The device map as read now.
    KernelRules(Vec<DeviceRule>),
    /// vmaudit is stopping the emulator `pid` (its closes from now on are the stop's).
    Stopping(u32),
    Finish,
}

/// Counts of verdicts by status.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    pub confirmed: u64,
    pub violated: u64,
    pub unconfirmed: u64,
    pub unknown: u64,
}

impl Totals {
    pub fn add(&mut self, s: Status) {
        match s {
            Status::Confirmed => self.confirmed += 1,
            Status::Violated => self.violated += 1,
            Status::Unconfirmed => self.unconfirmed += 1,
            Status::Unknown => self.unknown += 1,
        }
    }
}

/// A running verifier.
pub struct Engine {
    tx: mpsc::UnboundedSender<Msg>,
    thread: Option<JoinHandle<Result<Totals, ObserveError>>>,
    /// Violations so far (for `--strict`).
    pub violations: watch::Receiver<u64>,
}

/// Settings of the verifier.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// How long a claim may wait for its evidence.
    pub deadline: Duration,
    pub tracker: TrackerOptions,
    /// Told everything the verifier sees.
    pub observers: Observers,
}

impl Engine {
    /// Starts the verifier thread and returns once the tracker watches this process.
    pub fn start(
        cfg: EngineConfig,
        on_verdict: Box<dyn FnMut(&Verdict) + Send>,
    ) -> Result<Self, ObserveError> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
        let (vtx, violations) = watch::channel(0u64);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), ObserveError>>();
        let me = std::process::id();
        let publisher = Publisher::start(on_verdict)?;
        let thread = std::thread::Builder::new()
            .name("vmaudit-verify".into())
            .spawn(move || -> Result<Totals, ObserveError> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| ObserveError::Poll { source })?;
                rt.block_on(async move {
                    // SAFETY: gettid has no preconditions.
                    let tid = unsafe { libc::gettid() } as u32;
                    let opts = WatchOptions {
                        pids: vec![me],
                        follow_children: true,
                        tracker: cfg.tracker.clone(),
                        ignore_tids: vec![tid],
                    };
                    let mut w = match Watcher::start(&opts, ProcFs::default(), &mut |_| {}) {
                        Ok(w) => w,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return Ok(Totals::default());
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let mut ledger = Ledger::new(me, cfg.deadline.as_nanos() as u64);
                    let mut decisions: Option<DecisionStream> = None;
                    let mut totals = Totals::default();
                    let mut out: Vec<Verdict> = Vec::new();
                    let obs = cfg.observers.clone();
                    let mut tick = tokio::time::interval(Duration::from_millis(10));
                    loop {
                        tokio::select! {
                            m = rx.recv() => match m {
                                Some(Msg::Claim(c)) => {
                                    drain(&mut w, &mut ledger, &mut out, &obs)?;
                                    tell_claim(&obs, &c);
                                    ledger.on_claim(*c, w.tables(), monotonic_ns(), &mut out);
                                }
                                Some(Msg::Decisions(d)) => decisions = Some(d),
                                Some(Msg::KernelRules(k)) => ledger.on_kernel_rules(&k, &mut out),
                                Some(Msg::Stopping(pid)) => {
                                    drain(&mut w, &mut ledger, &mut out, &obs)?;
                                    ledger.on_stopping(pid);
                                }
                                Some(Msg::Finish) | None => break,
                            },
                            r = w.readable() => {
                                r?;
                                drain(&mut w, &mut ledger, &mut out, &obs)?;
                                // Evidence that just arrived decides pending claims now, not at
                                // the next tick.
                                ledger.on_tick(w.tables(), monotonic_ns(), &mut out);
                            }
                            _ = tick.tick() => {
                                drain(&mut w, &mut ledger, &mut out, &obs)?;
                                if let Some(d) = decisions.as_mut() {
                                    for dec in d.drain() {
                                        obs.decision(&dec);
                                        ledger.on_decision(&dec, &mut out);
                                    }
                                }
                                ledger.on_tick(w.tables(), monotonic_ns(), &mut out);
                            }
                        }
                        publish(&mut out, &publisher, &mut totals, &vtx, &obs);
                    }
                    drain(&mut w, &mut ledger, &mut out, &obs)?;
                    if let Some(d) = decisions.as_mut() {
                        for dec in d.drain() {
                            obs.decision(&dec);
                            ledger.on_decision(&dec, &mut out);
                        }
                    }
                    ledger.finish(w.tables(), monotonic_ns(), &mut out);
                    publish(&mut out, &publisher, &mut totals, &vtx, &obs);
                    // Every verdict is written before the totals are.
                    publisher.finish();
                    Ok(totals)
                })
            })
            .map_err(|source| ObserveError::Poll { source })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                tx,
                thread: Some(thread),
                violations,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(ObserveError::Poll {
                    source: std::io::Error::other("the verifier thread ended before it was ready"),
                })
            }
        }
    }

    pub fn send(&self, m: Msg) {
        let _ = self.tx.send(m);
    }

    pub fn claim(&self, c: Claim) {
        self.send(Msg::Claim(Box::new(c)));
    }

    /// Judges what is left and returns the totals.
    pub fn finish(mut self) -> Result<Totals, ObserveError> {
        let _ = self.tx.send(Msg::Finish);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => Err(ObserveError::Poll {
                source: std::io::Error::other("the verifier thread panicked"),
            }),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Finish);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn drain(
    w: &mut Watcher,
    ledger: &mut Ledger,
    out: &mut Vec<Verdict>,
    obs: &Observers,
) -> Result<(), ObserveError> {
    let mut outputs: Vec<Output> = Vec::new();
    w.drain(&mut |o: Output| outputs.push(o));
    w.check_losses(&mut |o: Output| outputs.push(o))?;
    for o in outputs {
        match o {
            Output::Fd(r) => {
                obs.fd(&r);
                ledger.on_record(&r, out)
            }
            Output::Gap(g) => {
                obs.gap(&g);
                ledger.on_gap(g.pid, g.lost)
            }
        }
    }
    Ok(())
}

fn publish(
    out: &mut Vec<Verdict>,
    publisher: &Publisher,
    totals: &mut Totals,
    vtx: &watch::Sender<u64>,
    obs: &Observers,
) {
    for v in out.drain(..) {
        totals.add(v.status);
        if v.status == Status::Violated {
            eprintln!(
                "vmaudit: VIOLATION: {} [{} claim {}]",
                v.reason, v.claim.kind, v.claim.id
            );
            vtx.send_replace(totals.violated);
        }
        obs.verdict(&v);
        publisher.send(v);
    }
}

/// Runs `on_verdict` (the journal: a write and an fsync per verdict, milliseconds on a busy
/// disk) on a thread of its own, in order. On the verifier thread, each fsync held up the
/// claims queued behind it: that was most of the claim-to-verdict tail (BENCHMARKS.md,
/// `verdict`). Dropping it (or [`Publisher::finish`]) waits until every verdict is written.
struct Publisher {
    tx: Option<std::sync::mpsc::Sender<Verdict>>,
    thread: Option<JoinHandle<()>>,
}

impl Publisher {
    fn start(mut on_verdict: Box<dyn FnMut(&Verdict) + Send>) -> Result<Self, ObserveError> {
        let (tx, rx) = std::sync::mpsc::channel::<Verdict>();
        let thread = std::thread::Builder::new()
            .name("vmaudit-verdicts".into())
            .spawn(move || {
                for v in rx {
                    on_verdict(&v);
                }
            })
            .map_err(|source| ObserveError::Poll { source })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn send(&self, v: Verdict) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(v);
        }
    }

    fn finish(mut self) {
        self.close();
    }

    fn close(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.close();
    }
}

/// Tells the observers of a claim, and of the VM a start or stop claim names.
fn tell_claim(obs: &Observers, c: &Claim) {
    if obs.is_empty() {
        return;
    }
    obs.claim(c);
    let (pid, state) = match c.kind {
        ClaimKind::VmStart { pid } => (pid, "running"),
        ClaimKind::VmStop { pid } => (pid, "stopped"),
        _ => return,
    };
    let field = |name: &str| {
        crate::audit::parse::parse_text(&c.text)
            .ok()
            .and_then(|kv| kv.into_iter().find(|(k, _)| k == name))
            .and_then(|(_, v)| v.text().map(str::to_owned))
            .unwrap_or_default()
    };
    obs.vm(&VmInfo {
        name: field("vm"),
        uuid: field("uuid"),
        pid,
        state,
    });
}
