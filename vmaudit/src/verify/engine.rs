//! The verification loop, one for both modes: claims and kernel events in, verdicts out.
//!
//! A thread of its own runs the fd tracker over the processes it is told to follow (vmaudit
//! itself and its children in `run`; the managers and theirs in `monitor`), ignoring its own
//! syscalls (its reads of /proc would otherwise report themselves). Claims arrive on a channel;
//! each is judged by the [`Ledger`] after the kernel events before it have been applied.
//! Verdicts go, in batches and in order, to a publisher thread ([`publish`]) that writes them
//! (the journal's fsync never holds a judgement up); violations also go to stderr as they
//! happen, and to the observers.

use std::{collections::HashMap, path::PathBuf, thread::JoinHandle, time::Duration};

use tokio::sync::{mpsc, watch};
use vmaudit_core::{
    audit::JournalEntry,
    claim::{Claim, ClaimKind},
    ledger::{Ledger, LedgerStats, Loss},
    verdict::{Status, Totals, Verdict},
};

use super::{
    host::HostView,
    observer::{Observer, Observers, VmInfo},
    publish::{Line, Publish, PublishError, Publisher},
};
use crate::{
    cgroup::{DecisionStream, Layout},
    observe::{ObserveError, Output, WatchOptions, Watcher, loader::TrackerOptions, monotonic_ns},
    procfs::ProcFs,
};

/// What the verifier is told.
pub enum Msg {
    /// A claim, with (`monitor`) the record that made it, to journal.
    Claim(Box<Claim>, Option<Box<JournalEntry>>),
    /// The record source has read its past (`monitor --from-start`).
    CaughtUp,
    /// A VM cgroup's decision stream (cgroup v2, vmaudit's own program).
    Decisions {
        uuid: String,
        stream: Box<DecisionStream>,
    },
    /// The manager is stopping the emulator `pid` (its releases from now on are the stop's).
    Stopping(u32),
    /// Audit records were lost between these arrival times (CLOCK_MONOTONIC).
    RecordLoss {
        from_ns: u64,
        to_ns: u64,
        lost: u64,
    },
    Finish,
}

/// Settings of the verifier.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// How long a claim may wait for its evidence.
    pub deadline: Duration,
    pub tracker: TrackerOptions,
    /// Told everything the verifier sees.
    pub observers: Observers,
    /// The processes to follow, with their children.
    pub watch: Vec<u32>,
    /// The processes whose records are claims (and whose opens name the devices).
    pub managers: Vec<u32>,
    /// Executables whose processes are managers too, found when they start (a restarted
    /// libvirtd, a virtqemud started on demand) and followed from then on.
    pub manager_exes: Vec<PathBuf>,
}

/// What a verification ends with.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    pub totals: Totals,
    pub ledger: LedgerStats,
    pub managers: ManagerStats,
}

/// Whose records were claims.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ManagerStats {
    /// Managers found running their executable after the start (restarts, new instances).
    pub followed: u64,
    /// Records whose sender is no manager: not claims.
    pub not_from_manager: u64,
}

/// Why the verifier stopped short.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Observe(#[from] ObserveError),
    #[error("writing verdicts")]
    Publish(#[source] PublishError),
    #[error("the verifier thread {0}")]
    Thread(&'static str),
}

impl EngineError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Observe(e) => e.exit_code(),
            Self::Publish(_) => crate::exit::JOURNAL,
            Self::Thread(_) => crate::exit::INTERNAL,
        }
    }
}

/// A running verifier.
pub struct Engine {
    tx: mpsc::UnboundedSender<Msg>,
    thread: Option<JoinHandle<Result<Outcome, EngineError>>>,
    /// Violations so far (for `--strict`).
    pub violations: watch::Receiver<u64>,
}

impl Engine {
    /// Starts the verifier thread and returns once the tracker follows every process of
    /// `cfg.watch`. Verdicts go to `publish` on a thread of its own.
    pub fn start(cfg: EngineConfig, publish: Box<dyn Publish>) -> Result<Self, EngineError> {
        let (tx, rx) = mpsc::unbounded_channel::<Msg>();
        let (vtx, violations) = watch::channel(0u64);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), ObserveError>>();
        let publisher = Publisher::start(publish).map_err(EngineError::Publish)?;
        let thread = std::thread::Builder::new()
            .name("vmaudit-verify".into())
            .spawn(move || run_thread(cfg, rx, vtx, ready_tx, publisher))
            .map_err(|source| ObserveError::Poll { source })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                tx,
                thread: Some(thread),
                violations,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e.into())
            }
            Err(_) => Err(match thread.join() {
                Ok(Err(e)) => e,
                _ => EngineError::Thread("ended before it was ready"),
            }),
        }
    }

    /// Hands the verifier a message; an error means it is gone (its end says why).
    pub fn send(&self, m: Msg) -> Result<(), EngineError> {
        self.tx.send(m).map_err(|_| EngineError::Thread("is gone"))
    }

    pub fn claim(&self, c: Claim) -> Result<(), EngineError> {
        self.send(Msg::Claim(Box::new(c), None))
    }

    /// A sender for another thread (the record reader of `monitor`).
    pub fn sender(&self) -> mpsc::UnboundedSender<Msg> {
        self.tx.clone()
    }

    /// Judges what is left, waits until every verdict is written, and returns the totals.
    pub fn finish(mut self) -> Result<Outcome, EngineError> {
        let _ = self.tx.send(Msg::Finish);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => Err(EngineError::Thread("panicked")),
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

fn run_thread(
    cfg: EngineConfig,
    rx: mpsc::UnboundedReceiver<Msg>,
    vtx: watch::Sender<u64>,
    ready: std::sync::mpsc::Sender<Result<(), ObserveError>>,
    publisher: Publisher,
) -> Result<Outcome, EngineError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ObserveError::Poll { source })?;
    rt.block_on(async move {
        let mut v = match Verifier::start(&cfg, vtx, publisher) {
            Ok(v) => {
                let _ = ready.send(Ok(()));
                v
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return Ok(Outcome::default());
            }
        };
        v.run(rx).await?;
        v.end()
    })
}

/// The loop's state: the tracker, the ledger, the verdicts on their way out.
struct Verifier {
    w: Watcher,
    layout: Layout,
    ledger: Ledger,
    decisions: Vec<(String, Box<DecisionStream>)>,
    out: Vec<Verdict>,
    /// Lines waiting for the publisher, in order: records, then the verdicts judged after them.
    lines: Vec<Line>,
    totals: Totals,
    obs: Observers,
    vtx: watch::Sender<u64>,
    publisher: Publisher,
    manager_exes: Vec<PathBuf>,
    managers: ManagerStats,
    /// Processes seen exited, and when: their tables go once nothing can ask for them.
    exited: HashMap<u32, u64>,
    deadline_ns: u64,
}

/// How often pending claims and findings are looked at when no event arrives.
const TICK: Duration = Duration::from_millis(10);
/// How often the device policies and every process's network fds are read again, and every
/// followed table is checked against the kernel's.
const RECHECK: Duration = crate::observe::CHECK_PERIOD;
/// Claims taken after one drain of the tracker, at most.
const BATCH: usize = 4096;

impl Verifier {
    fn start(
        cfg: &EngineConfig,
        vtx: watch::Sender<u64>,
        publisher: Publisher,
    ) -> Result<Self, ObserveError> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let opts = WatchOptions {
            pids: cfg.watch.clone(),
            follow_children: true,
            tracker: cfg.tracker.clone(),
            ignore_tids: vec![tid],
        };
        let obs = cfg.observers.clone();
        let w = Watcher::start(&opts, ProcFs::default(), &mut |o: Output| {
            if let Output::Fd(r) = &o {
                obs.fd(r);
            }
        })?;
        let layout = Layout::detect().unwrap_or_default();
        Ok(Self {
            w,
            layout,
            ledger: Ledger::new(cfg.deadline.as_nanos() as u64, cfg.managers.iter().copied()),
            decisions: Vec::new(),
            out: Vec::new(),
            lines: Vec::new(),
            totals: Totals::default(),
            obs: cfg.observers.clone(),
            vtx,
            publisher,
            manager_exes: cfg.manager_exes.clone(),
            managers: ManagerStats::default(),
            exited: HashMap::new(),
            deadline_ns: cfg.deadline.as_nanos() as u64,
        })
    }

    async fn run(&mut self, mut rx: mpsc::UnboundedReceiver<Msg>) -> Result<(), EngineError> {
        let mut tick = tokio::time::interval(TICK);
        let mut recheck = tokio::time::interval(RECHECK);
        loop {
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else { break };
                    self.drain()?;
                    let mut batch = vec![m];
                    while batch.len() < BATCH && let Ok(m) = rx.try_recv() {
                        batch.push(m);
                    }
                    if self.take(batch) {
                        break;
                    }
                }
                r = self.w.readable() => {
                    r?;
                    self.drain()?;
                    // Evidence that just arrived decides pending claims now, not at the tick.
                    self.tick();
                }
                _ = tick.tick() => {
                    self.drain()?;
                    self.tick();
                }
                _ = recheck.tick() => {
                    self.follow_managers();
                    self.forget_exited();
                    self.check_tables()?;
                    let view = HostView::new(self.w.tables(), &self.layout);
                    self.ledger.recheck(&view, monotonic_ns(), &mut self.out);
                }
            }
            self.publish();
        }
        Ok(())
    }

    /// Takes a batch of messages; true when told to finish.
    fn take(&mut self, batch: Vec<Msg>) -> bool {
        for m in batch {
            match m {
                Msg::Claim(c, record) => self.claim(*c, record),
                Msg::CaughtUp => {
                    let view = HostView::new(self.w.tables(), &self.layout);
                    self.ledger.caught_up(&view, monotonic_ns(), &mut self.out);
                }
                Msg::Decisions { uuid, stream } => self.decisions.push((uuid, stream)),
                Msg::Stopping(pid) => self.ledger.on_stopping(pid),
                Msg::RecordLoss {
                    from_ns,
                    to_ns,
                    lost,
                } => self.ledger.on_record_loss(from_ns, to_ns, lost),
                Msg::Finish => return true,
            }
        }
        false
    }

    fn claim(&mut self, c: Claim, record: Option<Box<JournalEntry>>) {
        let from_manager = self.sent_by_manager(&c);
        if let Some(mut r) = record {
            r.claim_id = from_manager.then_some(c.id);
            if !from_manager {
                r.extra.insert(
                    "vmaudit-not-a-claim".into(),
                    "its sender is no manager".into(),
                );
            }
            self.lines.push(Line::Record(*r));
        }
        if !from_manager {
            self.managers.not_from_manager += 1;
            log::warn!(
                "not a claim: a {} record for VM {} sent by pid {}, which is no manager",
                c.kind.name(),
                c.vm_name,
                c.sender.map_or_else(|| "?".to_owned(), |p| p.to_string())
            );
            self.obs.not_from_manager(&c);
            return;
        }
        if let ClaimKind::VmStart { pid } = c.kind
            && self.w.tables().get(pid).is_none()
            && std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            // Started before vmaudit watched, or by a process it does not follow: watch it
            // from now on, its table read from /proc.
            let obs = &self.obs;
            if let Err(e) = self.w.add(pid, true, &mut |o: Output| {
                if let Output::Fd(r) = &o {
                    obs.fd(r);
                }
            }) {
                log::warn!("cannot watch the emulator pid {pid} the record names: {e}");
            }
        }
        tell_claim(&self.obs, &c);
        let view = HostView::new(self.w.tables(), &self.layout);
        self.ledger
            .on_claim(c, &view, monotonic_ns(), &mut self.out);
    }

    /// Whether a record's sender is a manager: one followed, or a process running a manager's
    /// executable (followed from now on). A past record whose sender is gone cannot be checked,
    /// and is taken.
    fn sent_by_manager(&mut self, c: &Claim) -> bool {
        let Some(sender) = c.sender else {
            return false;
        };
        if self.ledger.managers().contains(&sender) {
            return true;
        }
        let procfs = ProcFs::default();
        if c.historic && !procfs.exists(sender) {
            return true;
        }
        let manager = procfs
            .exe(sender)
            .is_some_and(|x| self.manager_exes.contains(&x));
        if manager {
            self.follow(sender);
        }
        manager
    }

    /// Drops the tables of processes that exited long enough ago (a few deadlines: every claim
    /// that could ask for them is judged by then).
    fn forget_exited(&mut self) {
        let now = monotonic_ns();
        let exited: Vec<u32> = self
            .w
            .tables()
            .pids()
            .filter(|p| self.w.tables().get(*p).is_some_and(|t| t.exited))
            .collect();
        for pid in exited {
            let since = *self.exited.entry(pid).or_insert(now);
            if now.saturating_sub(since) > 3 * self.deadline_ns {
                self.w.forget_exited(pid);
                self.exited.remove(&pid);
            }
        }
    }

    /// Follows manager processes that started since the last look, and forgets those gone.
    fn follow_managers(&mut self) {
        if self.manager_exes.is_empty() {
            return;
        }
        let running = ProcFs::default().running(&self.manager_exes);
        let gone: Vec<u32> = self
            .ledger
            .managers()
            .iter()
            .copied()
            .filter(|p| !running.contains(p) && self.w.tables().get(*p).is_none_or(|t| t.exited))
            .collect();
        for pid in gone {
            log::warn!("manager pid {pid} is gone");
            self.ledger.remove_manager(pid);
        }
        for pid in running {
            if !self.ledger.managers().contains(&pid) {
                self.follow(pid);
            }
        }
    }

    fn follow(&mut self, pid: u32) {
        let obs = &self.obs;
        match self.w.add(pid, true, &mut |o: Output| {
            if let Output::Fd(r) = &o {
                obs.fd(r);
            }
        }) {
            Ok(()) => {
                self.ledger.add_manager(pid);
                self.managers.followed += 1;
                log::warn!("following manager pid {pid}");
            }
            Err(e) => log::warn!("cannot follow manager pid {pid}: {e}"),
        }
    }

    /// Applies every kernel event and loss available now, in order.
    fn drain(&mut self) -> Result<(), ObserveError> {
        let mut outputs: Vec<Output> = Vec::new();
        self.w.drain(&mut |o: Output| outputs.push(o));
        self.w.check_losses(&mut |o: Output| outputs.push(o))?;
        self.apply(outputs);
        Ok(())
    }

    /// Checks every followed table against the kernel's (what no probe saw becomes a gap).
    fn check_tables(&mut self) -> Result<(), ObserveError> {
        let mut outputs: Vec<Output> = Vec::new();
        self.w.check_tables(&mut |o: Output| outputs.push(o))?;
        self.apply(outputs);
        Ok(())
    }

    /// Hands the tracker's outputs to the observers and the ledger; a gap makes what its
    /// process did in the gap's window unknown.
    fn apply(&mut self, outputs: Vec<Output>) {
        let view = HostView::new(self.w.tables(), &self.layout);
        for o in outputs {
            log::trace!("{}", serde_json::to_string(&o).unwrap_or_default());
            match o {
                Output::Fd(r) => {
                    self.obs.fd(&r);
                    self.ledger.on_fd(&r, &view, &mut self.out);
                }
                Output::Gap(g) => {
                    self.obs.gap(&g);
                    self.ledger.on_loss(Loss {
                        pid: g.pid,
                        from_ns: g.since_ns,
                        to_ns: g.ts,
                        lost: g.lost,
                    });
                }
            }
        }
    }

    fn tick(&mut self) {
        for (uuid, d) in self.decisions.iter_mut() {
            for dec in d.drain() {
                self.obs.decision(&dec);
                self.ledger
                    .on_decision(uuid, &dec, monotonic_ns(), &mut self.out);
            }
        }
        let view = HostView::new(self.w.tables(), &self.layout);
        self.ledger.on_tick(&view, monotonic_ns(), &mut self.out);
    }

    /// The verdicts judged so far: totals, a stderr line for each (violations at error level,
    /// unknown and unconfirmed ones as warnings), the observers,
    /// then the publisher.
    fn publish(&mut self) {
        if self.out.is_empty() && self.lines.is_empty() {
            return;
        }
        for v in &self.out {
            self.totals.add(v.status);
            let (kind, id) = (&v.claim.kind, v.claim.id);
            match v.status {
                Status::Violated => {
                    log::error!("VIOLATION: {} [{kind} claim {id}]", v.reason);
                    self.vtx.send_replace(self.totals.violated);
                }
                Status::Unknown | Status::Unconfirmed => {
                    log::warn!("{}: {} [{kind} claim {id}]", v.status.as_str(), v.reason);
                }
                Status::Confirmed => log::debug!("confirmed: {} [{kind} claim {id}]", v.reason),
            }
            self.obs.verdict(v);
        }
        self.lines.extend(self.out.drain(..).map(Line::Verdict));
        self.publisher.send(std::mem::take(&mut self.lines));
    }

    /// Judges everything left, writes it, and waits for the publisher.
    fn end(mut self) -> Result<Outcome, EngineError> {
        self.drain()?;
        self.tick();
        let view = HostView::new(self.w.tables(), &self.layout);
        self.ledger.finish(&view, monotonic_ns(), &mut self.out);
        self.publish();
        self.publisher.finish().map_err(EngineError::Publish)?;
        Ok(Outcome {
            totals: self.totals,
            ledger: self.ledger.stats.clone(),
            managers: self.managers,
        })
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
        ClaimKind::VmStop { pid, .. } => (pid.unwrap_or(0), "stopped"),
        _ => return,
    };
    obs.vm(&VmInfo {
        name: c.vm_name.clone(),
        uuid: c.uuid.clone(),
        pid,
        state,
    });
}
