//! The kernel fd tracker: eBPF events in, exact per-process fd tables and records out.
//!
//! Order of start-up, so that nothing is missed: attach every program, put the process in
//! the kernel's watch set, note the kernel clock, then read its table from /proc. Events from
//! before that clock reading are already in the snapshot and are skipped; everything after
//! is applied in order. When the kernel reports lost events for a process, its table is read
//! again from /proc (same clock rule) and the gap is reported as a gap.

pub mod btf;
pub mod check;
pub mod event;
pub mod key;
pub mod loader;
pub mod preflight;
mod ringpos;
pub mod table;

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    path::PathBuf,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use vmaudit_common::LossCause;

use self::{
    event::{Change, Event, Gain, PathMemory, decode, parse_raw},
    loader::{Tracker, TrackerOptions},
    table::{FdRecord, Op, Tables},
};
use crate::{
    exit,
    procfs::{FdIdentity, ProcFs},
};

/// Why observing could not start or go on.
#[derive(Debug, Error)]
pub enum ObserveError {
    #[error("missing capabilities {missing} (run as root, or grant them)")]
    Privileges { missing: String },
    #[error("cannot mount tracefs at {path} ({errno}); mount it: mount -t tracefs nodev {path}")]
    Tracefs {
        path: PathBuf,
        errno: nix::errno::Errno,
    },
    #[error("kernel has no tracepoint {name} (needs CONFIG_FTRACE_SYSCALLS and tracefs)")]
    Tracepoint { name: String },
    #[error("no such process: {pid}")]
    NoSuchProcess { pid: u32 },
    #[error("pid {pid} is a thread of process {tgid}; watch the process")]
    NotAProcess { pid: u32, tgid: u32 },
    #[error("loading the eBPF programs failed")]
    Load {
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the kernel's type information")]
    Btf {
        #[source]
        source: btf::BtfError,
    },
    #[error("the open-file-description key {}", crate::paths::OFD_KEY)]
    Key {
        #[source]
        source: io::Error,
    },
    #[error("reading the fd table of pid {pid} with the task_file iterator")]
    Iter {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("eBPF object lacks {name}")]
    MissingObject { name: &'static str },
    #[error("eBPF program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching to tracepoint {tracepoint}")]
    Attach {
        tracepoint: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {what}")]
    Map {
        what: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("reading /proc for pid {pid}")]
    Proc {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("waiting for kernel events")]
    Poll {
        #[source]
        source: io::Error,
    },
    #[error("writing the records to stdout")]
    Output {
        #[source]
        source: io::Error,
    },
}

impl ObserveError {
    /// The documented exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Privileges { .. } => exit::PRIVILEGES,
            Self::Tracefs { .. } | Self::Tracepoint { .. } => exit::KERNEL_FEATURE,
            // Loading fails for want of privileges (EPERM) or of kernel support.
            Self::Load { source } => match source.as_ref() {
                aya::EbpfError::MapError(_) | aya::EbpfError::ProgramError(_) => {
                    exit::KERNEL_FEATURE
                }
                _ => exit::INTERNAL,
            },
            Self::Program { .. } | Self::Attach { .. } | Self::Btf { .. } => exit::KERNEL_FEATURE,
            Self::NoSuchProcess { .. } | Self::NotAProcess { .. } => exit::NO_SUCH_PROCESS,
            Self::MissingObject { .. }
            | Self::Map { .. }
            | Self::Proc { .. }
            | Self::Key { .. }
            | Self::Iter { .. }
            | Self::Poll { .. } => exit::INTERNAL,
            Self::Output { .. } => exit::OUTPUT,
        }
    }
}

/// A gap: events lost for a process, after which its table was read again from the kernel (the task_file iterator).
///
/// What the process did in `[since_ns, ts]` (kernel CLOCK_MONOTONIC) is not known event by
/// event: verdicts that depend on that window are `unknown`.
#[derive(Clone, Debug, Serialize)]
pub struct GapRecord {
    #[serde(rename = "type")]
    pub ty: &'static str,
    /// When the table was read again: the end of the window.
    pub ts: u64,
    /// The kernel time of the last check that found nothing lost for this process (or of its
    /// seed): the start of the window.
    pub since_ns: u64,
    pub pid: u32,
    /// Events the kernel side could not deliver for this process since the last check
    /// (a lower bound: see `causes` for the exact totals).
    pub lost: u64,
    /// Events lost on the whole host since the last check, per cause.
    pub causes: BTreeMap<&'static str, u64>,
    /// The loss check that found it, numbered from 1: the gaps of one check share its
    /// `causes`, which a consumer counts once.
    pub check: u64,
    /// fds found in the kernel's table that the table did not have.
    pub added: Vec<i32>,
    /// fds the table had that the kernel's did not.
    pub removed: Vec<i32>,
}

/// What the watcher reports, one JSON object per line.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Output {
    Fd(FdRecord),
    Gap(GapRecord),
}

/// Where the watcher's output goes. Records come in batches (one per read of the ring
/// buffer); `flush` ends each batch, so a buffered sink writes once per batch, not per line.
pub trait Sink {
    fn record(&mut self, out: Output);
    /// fd records in order, taken out of `batch` (left empty). A sink that only reads them
    /// overrides it to take them by reference: a record is over 200 bytes, moved at each hand-over.
    fn records(&mut self, batch: &mut Vec<FdRecord>) {
        for r in batch.drain(..) {
            self.record(Output::Fd(r));
        }
    }
    /// Delivers what was handed over. An error ends the watch: records after it reach nobody.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<F: FnMut(Output)> Sink for F {
    fn record(&mut self, out: Output) {
        self(out)
    }
}

/// [`Sink::flush`], its error as the watch's.
pub fn flushed(sink: &mut dyn Sink) -> Result<(), ObserveError> {
    sink.flush()
        .map_err(|source| ObserveError::Output { source })
}

/// Per-process line of the summary.
#[derive(Clone, Debug, Serialize)]
pub struct ProcSummary {
    pub pid: u32,
    pub fds: usize,
    pub exited: bool,
}

/// The last line of `vmaudit watch`.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    #[serde(rename = "type")]
    pub ty: &'static str,
    /// Kernel events received.
    pub events: u64,
    /// fd records written.
    pub records: u64,
    /// Events lost, per cause.
    pub lost: BTreeMap<&'static str, u64>,
    pub lost_total: u64,
    /// Gaps reported (table resyncs).
    pub gaps: u64,
    /// Ring-buffer records that did not decode.
    pub malformed: u64,
    pub processes: Vec<ProcSummary>,
    /// Why watching ended: `signal` or `exited`.
    pub ended: &'static str,
}

/// What to watch.
#[derive(Clone, Debug, Default)]
pub struct WatchOptions {
    pub pids: Vec<u32>,
    pub follow_children: bool,
    pub tracker: TrackerOptions,
    /// Threads of the watched processes whose own syscalls are not reported.
    pub ignore_tids: Vec<u32>,
}

/// The kernel's CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Runs the preflight checks and loads the tracker.
pub fn start_tracker(opts: &TrackerOptions) -> Result<Tracker, ObserveError> {
    preflight::check_caps()?;
    let tracefs = preflight::ensure_tracefs()?;
    preflight::check_tracepoints(&tracefs)?;
    Tracker::load(opts, &tracefs)
}

/// `pid` must be a process (a thread group leader), not a thread or nothing.
fn check_process(procfs: &ProcFs, pid: u32) -> Result<(), ObserveError> {
    match preflight::tgid_of(&procfs.roots.proc, pid) {
        None => Err(ObserveError::NoSuchProcess { pid }),
        Some(tgid) if tgid != pid => Err(ObserveError::NotAProcess { pid, tgid }),
        Some(_) => Ok(()),
    }
}

/// How often each watched table is checked against the kernel's (task_file iterator).
pub const CHECK_PERIOD: Duration = Duration::from_millis(500);

/// Watches processes and keeps their fd tables exact.
pub struct Watcher {
    tracker: Tracker,
    ring: AsyncFd<RingBuf<MapData>>,
    positions: ringpos::RingPositions,
    tables: Tables<ProcFs>,
    /// Per process: the kernel time its table was last read whole; older events are in it.
    read_at: BTreeMap<u32, u64>,
    /// Per process: the kernel time of the last loss check that found nothing lost for it (or
    /// of its seed): where the window of its next gap starts.
    clean_at: BTreeMap<u32, u64>,
    /// The periodic check of the tables against the kernel's.
    checker: check::Checker,
    /// Processes some of whose threads are ignored: their tables lack those threads' fds by
    /// design, so they are not checked against the kernel's.
    partly_ignored: BTreeSet<u32>,
    /// Processes whose table may have changed in a way no event describes (io_uring, compat
    /// syscalls, seccomp ADDFD): checked against the kernel's at the next loss check.
    unseen: BTreeMap<u32, BTreeMap<&'static str, u64>>,
    last_losses: [u64; LossCause::COUNT as usize],
    /// Records of the current batch, reused: no allocation per event.
    batch: Vec<FdRecord>,
    /// Device files' paths as the kernel side last sent them.
    paths: PathMemory,
    /// Whether the last drain found events (the consumer then lingers before it waits).
    busy: bool,
    loss_checks: u64,
    events: u64,
    records: u64,
    gaps: u64,
    malformed: u64,
}

/// Records handed to the sink at once at most (a record is over 200 bytes: 128 of them stay
/// in the CPU's cache between being made and being written).
const HANDOVER: usize = 128;

/// How long a consumer that just drained events lets more gather before it waits for a wake-up
/// (the producer then wakes nobody unless the pending bytes cross the threshold: see
/// `vmaudit_common::WAKEUP_BYTES`).
pub const LINGER: Duration = Duration::from_micros(200);

/// A kernel snapshot as the tables take it: fd -> (identity, close-on-exec).
fn snapshot_map(recs: Vec<vmaudit_common::IterRecord>) -> BTreeMap<i32, (FdIdentity, bool)> {
    recs.into_iter()
        .filter(|r| r.fd >= 0)
        .map(|r| {
            (
                r.fd,
                (
                    table::kernel_identity(&r.file, None, event::iface_of(&r.iface)),
                    r.cloexec != 0,
                ),
            )
        })
        .collect()
}

impl Watcher {
    /// Loads the tracker, starts watching `opts.pids` and seeds their tables. The seed
    /// records go to `sink`.
    pub fn start(
        opts: &WatchOptions,
        mut procfs: ProcFs,
        sink: &mut dyn Sink,
    ) -> Result<Self, ObserveError> {
        for &pid in &opts.pids {
            check_process(&procfs, pid)?;
        }
        let mut tracker = start_tracker(&opts.tracker)?;
        procfs.tun_from_kernel = tracker.tun_named;
        let ring = tracker
            .take_ring()
            .ok_or(ObserveError::MissingObject { name: "EVENTS" })?;
        let positions = ringpos::RingPositions::new(std::os::fd::AsFd::as_fd(&ring))
            .map_err(|source| ObserveError::Poll { source })?;
        // SAFETY: the RingBuf owns its map fd, which stays open and the same for as long as
        // the RingBuf lives, and the AsyncFd owns the RingBuf.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| ObserveError::Poll {
                source: e.into_parts().1,
            })?;
        let last_losses = tracker.losses()?;
        let mut w = Self {
            tracker,
            ring,
            positions,
            tables: Tables::new(procfs),
            read_at: BTreeMap::new(),
            clean_at: BTreeMap::new(),
            checker: check::Checker::default(),
            partly_ignored: BTreeSet::new(),
            unseen: BTreeMap::new(),
            last_losses,
            batch: Vec::with_capacity(HANDOVER),
            paths: PathMemory::default(),
            busy: false,
            loss_checks: 0,
            events: 0,
            records: 0,
            gaps: 0,
            malformed: 0,
        };
        for &tid in &opts.ignore_tids {
            w.ignore_tid(tid)?;
        }
        for &pid in &opts.pids {
            w.watch_and_seed(pid, opts.follow_children, sink)?;
        }
        Ok(w)
    }

    /// Starts watching one more process (and, with `follow_children`, what it forks), seeding
    /// its table from the kernel; the seed records go to `sink`. A process already watched is
    /// left as it is.
    pub fn add(
        &mut self,
        pid: u32,
        follow_children: bool,
        sink: &mut dyn Sink,
    ) -> Result<(), ObserveError> {
        if self.tables.get(pid).is_some_and(|t| !t.exited) {
            return Ok(());
        }
        check_process(self.tables.resolver(), pid)?;
        self.watch_and_seed(pid, follow_children, sink)
    }

    /// Puts `pid` in the kernel's watch set, then reads its table with the task_file iterator
    /// (events after the read are applied on top); the seed records go to `sink`.
    fn watch_and_seed(
        &mut self,
        pid: u32,
        follow_children: bool,
        sink: &mut dyn Sink,
    ) -> Result<(), ObserveError> {
        self.tracker.watch(pid, follow_children)?;
        let t0 = monotonic_ns();
        let snap = self.tracker.snapshot(pid)?;
        if snap.is_empty() && !self.tables.resolver().exists(pid) {
            return Err(ObserveError::NoSuchProcess { pid });
        }
        let seed = self.tables.seed_from(pid, snapshot_map(snap));
        self.read_at.insert(pid, t0);
        self.clean_at.insert(pid, t0);
        self.checker.agreed(pid, t0);
        for r in seed {
            self.emit(sink, Output::Fd(r));
        }
        Ok(())
    }

    /// Stops reporting the syscalls of thread `tid` (see [`Tracker::ignore_tid`]); its
    /// process's table is no longer checked against the kernel's.
    pub fn ignore_tid(&mut self, tid: u32) -> Result<(), ObserveError> {
        let proc_root = &self.tables.resolver().roots.proc;
        let tgid =
            preflight::tgid_of(proc_root, tid).ok_or(ObserveError::NoSuchProcess { pid: tid })?;
        self.partly_ignored.insert(tgid);
        self.tracker.ignore_tid(tid)
    }

    /// Waits until the ring buffer has events (then [`Watcher::drain`] them). After a drain
    /// that found events it first lets more gather for a moment, cut short when the pending
    /// bytes cross the wake-up threshold (a small ring would otherwise fill meanwhile); before
    /// it sleeps it asks the kernel side for a wake-up, which the next event sends (the others
    /// send none).
    pub async fn readable(&mut self) -> Result<(), ObserveError> {
        if self.busy {
            if let Ok(ready) = tokio::time::timeout(LINGER, self.ring.readable_mut()).await {
                ready
                    .map_err(|source| ObserveError::Poll { source })?
                    .clear_ready();
            }
            if self.has_events() {
                return Ok(());
            }
        }
        self.tracker.consumer_waits()?;
        // An event submitted between the last drain and the request woke nobody: look again.
        if self.has_events() {
            return Ok(());
        }
        let mut guard = self
            .ring
            .readable_mut()
            .await
            .map_err(|source| ObserveError::Poll { source })?;
        guard.clear_ready();
        Ok(())
    }

    /// Whether the ring buffer holds an event now (no syscall: its pages are mapped).
    fn has_events(&mut self) -> bool {
        self.positions.pending()
    }

    pub fn tables(&self) -> &Tables<ProcFs> {
        &self.tables
    }

    /// Drops the table of a process that exited: a long-running watcher keeps no table of
    /// every process it ever followed.
    pub fn forget_exited(&mut self, pid: u32) {
        self.tables.forget_exited(pid);
    }

    fn emit(&mut self, sink: &mut dyn Sink, out: Output) {
        if matches!(out, Output::Fd(_)) {
            self.records += 1;
        }
        sink.record(out);
    }

    /// Hands a batch of fd records to `sink`, leaving `batch` empty.
    fn emit_batch(&mut self, sink: &mut dyn Sink, batch: &mut Vec<FdRecord>) {
        self.records += batch.len() as u64;
        sink.records(batch);
    }

    /// Reads every event available now and applies it. Returns whether any arrived.
    pub fn drain(&mut self, sink: &mut dyn Sink) -> bool {
        let mut n = 0u64;
        let mut batch = std::mem::take(&mut self.batch);
        loop {
            let decoded = {
                let Some(item) = self.ring.get_mut().next() else {
                    break;
                };
                n += 1;
                parse_raw(&item).and_then(|raw| {
                    let mut ev = decode(&raw)?;
                    self.paths.fill(&raw, &mut ev);
                    Ok(ev)
                })
            };
            match decoded {
                Ok(ev) => self.apply(&ev, &mut batch, sink),
                Err(e) => {
                    log::warn!("malformed ring-buffer record: {e}");
                    self.malformed += 1;
                }
            }
            // Hand records over in small batches: memory stays flat however long the drain,
            // and the records are still in the cache when the sink reads them.
            if batch.len() >= HANDOVER {
                self.emit_batch(sink, &mut batch);
            }
        }
        self.emit_batch(sink, &mut batch);
        self.batch = batch;
        self.events += n;
        self.busy = n > 0;
        n > 0
    }

    fn apply(&mut self, ev: &Event, batch: &mut Vec<FdRecord>, sink: &mut dyn Sink) {
        if let Change::AddFd {
            target,
            fd,
            cloexec,
            ref file,
        } = ev.change
        {
            match self.addfd_target(ev.tgid, target) {
                Some(pid) => {
                    let gain = Event {
                        tgid: pid,
                        change: Change::Gain {
                            fd,
                            how: Gain::AddFd,
                            cloexec,
                            from: None,
                            file: file.clone(),
                        },
                        ..ev.clone()
                    };
                    self.apply(&gain, batch, sink);
                }
                None => log::debug!(
                    "pid {} put fd {fd} into thread {target}, not a process vmaudit follows in its pid namespace",
                    ev.tgid
                ),
            }
            return;
        }
        if self.read_at.get(&ev.tgid).is_some_and(|t0| ev.ts_ns < *t0) {
            return;
        }
        if self.tables.get(ev.tgid).is_none() {
            // A process whose fork event was lost: start its table from the kernel.
            self.emit_batch(sink, batch);
            self.resync_one(ev.tgid, sink);
        }
        // Processes sharing the table see the change too (the tables apply it to each).
        let peers: Vec<u32> = self.tables.peers(ev.tgid).collect();
        for pid in std::iter::once(ev.tgid).chain(peers) {
            if let Change::Unseen { reason, .. } = ev.change {
                *self
                    .unseen
                    .entry(pid)
                    .or_default()
                    .entry(reason)
                    .or_default() += 1;
            }
            match ev.change {
                Change::Exit if pid == ev.tgid => self.checker.forget(pid),
                _ => self.checker.touch(pid, &ev.change),
            }
        }
        self.tables.apply(ev, batch);
    }

    /// The followed process whose table an ADDFD changed: thread `tid` as the notification named
    /// it, which is vmaudit's numbering only when the supervisor is in vmaudit's pid namespace.
    fn addfd_target(&self, supervisor: u32, tid: u32) -> Option<u32> {
        let proc_root = &self.tables.resolver().roots.proc;
        if preflight::pid_namespace_depth(proc_root, supervisor) != Some(1) {
            return None;
        }
        if self.tables.get(tid).is_some() {
            return Some(tid);
        }
        preflight::tgid_of(proc_root, tid).filter(|p| self.tables.get(*p).is_some())
    }

    /// Compares the kernel's loss counters with the last look; on new losses (or events that
    /// say a table changed unseen) resyncs the affected tables from the kernel's task_file
    /// iterator and reports each as a gap.
    pub fn check_losses(&mut self, sink: &mut dyn Sink) -> Result<(), ObserveError> {
        // Read the clock before the counters: a loss counted after this reading belongs to the
        // next window.
        let checked_at = monotonic_ns();
        let now = self.tracker.losses()?;
        if now == self.last_losses && self.unseen.is_empty() {
            for t in self.clean_at.values_mut() {
                *t = checked_at;
            }
            return Ok(());
        }
        let mut causes = BTreeMap::new();
        for cause in LossCause::ALL {
            let d = now[cause as usize] - self.last_losses[cause as usize];
            if d > 0 {
                causes.insert(cause.name(), d);
            }
        }
        let lost_any = now != self.last_losses;
        self.last_losses = now;
        self.loss_checks += 1;
        // Drain first: events delivered before the loss must be applied before the resync.
        self.drain(sink);
        let per_pid = if lost_any {
            self.tracker.take_lost_tgids()?
        } else {
            Vec::new()
        };
        let mut targets: BTreeMap<u32, (u64, BTreeMap<&'static str, u64>)> =
            if lost_any && per_pid.is_empty() {
                // The per-process map could not say who lost events: resync everyone.
                self.tables
                    .pids()
                    .map(|p| (p, (0, causes.clone())))
                    .collect()
            } else {
                per_pid
                    .into_iter()
                    .map(|(p, n)| (p, (n, causes.clone())))
                    .collect()
            };
        for (pid, reasons) in std::mem::take(&mut self.unseen) {
            targets.entry(pid).or_default().1.extend(reasons);
        }
        for (pid, t) in self.clean_at.iter_mut() {
            if !targets.contains_key(pid) {
                *t = checked_at;
            }
        }
        for (pid, (lost, causes)) in targets {
            if self.tables.get(pid).is_none_or(|t| t.exited) {
                continue;
            }
            let since_ns = self.clean_at.get(&pid).copied().unwrap_or(0);
            self.gap(pid, since_ns, lost, causes, sink);
        }
        Ok(())
    }

    /// Resyncs `pid` from the kernel and reports the gap: `[since_ns, ts]` is what is unknown.
    fn gap(
        &mut self,
        pid: u32,
        since_ns: u64,
        lost: u64,
        causes: BTreeMap<&'static str, u64>,
        sink: &mut dyn Sink,
    ) {
        let records = self.resync_one(pid, sink);
        let ts = *self.read_at.get(&pid).unwrap_or(&0);
        self.clean_at.insert(pid, ts);
        self.gaps += 1;
        let pick = |op| {
            records
                .iter()
                .filter(|r| r.op == op)
                .filter_map(|r| r.fd)
                .collect::<Vec<_>>()
        };
        sink.record(Output::Gap(GapRecord {
            ty: "gap",
            ts,
            since_ns,
            pid,
            lost,
            causes,
            check: self.loss_checks,
            added: pick(Op::ResyncAdd),
            removed: pick(Op::ResyncRemove),
        }));
        for r in records {
            self.emit(sink, Output::Fd(r));
        }
    }

    /// Checks live tables against the kernel's (the task_file iterator, [`check::PER_PERIOD`]
    /// processes per call, in turn): what the probes missed shows as a difference, which, once
    /// confirmed (see [`check`]), is reported as a gap (cause `missed`) and repaired. Call it
    /// about every [`CHECK_PERIOD`].
    pub fn check_tables(&mut self, sink: &mut dyn Sink) -> Result<(), ObserveError> {
        // Losses first: a table that lost events is read again and the gap says why.
        self.drain(sink);
        self.check_losses(sink)?;
        let live: Vec<u32> = self
            .tables
            .pids()
            .filter(|p| self.tables.get(*p).is_some_and(|t| !t.exited))
            .filter(|p| !self.partly_ignored.contains(p))
            .collect();
        for pid in self.checker.round(live) {
            let t0 = monotonic_ns();
            // An error: the process is gone (its exit event comes).
            let Ok(recs) = self.tracker.snapshot(pid) else {
                continue;
            };
            self.drain(sink);
            self.check_losses(sink)?;
            if self.read_at.get(&pid).is_some_and(|t| *t >= t0) {
                continue;
            }
            let Some(table) = self.tables.get(pid).filter(|t| !t.exited) else {
                continue;
            };
            let diffs = check::differences(table, &snapshot_map(recs));
            if let Some(since_ns) = self.checker.judge(pid, t0, diffs) {
                // A check of its own: its cause is not the last loss check's.
                self.loss_checks += 1;
                self.gap(pid, since_ns, 0, BTreeMap::from([("missed", 1)]), sink);
            }
        }
        Ok(())
    }

    /// Reads `pid`'s table again from the kernel (events before the read are skipped);
    /// returns the differences as records (a table not seen before is seeded).
    fn resync_one(&mut self, pid: u32, sink: &mut dyn Sink) -> Vec<FdRecord> {
        let t0 = monotonic_ns();
        self.read_at.insert(pid, t0);
        self.clean_at.entry(pid).or_insert(t0);
        self.checker.agreed(pid, t0);
        let snap = self
            .tracker
            .snapshot(pid)
            .ok()
            .filter(|s| !s.is_empty() || self.tables.resolver().exists(pid))
            .map(snapshot_map);
        if self.tables.get(pid).is_none() {
            for r in self.tables.seed_from(pid, snap.unwrap_or_default()) {
                self.emit(sink, Output::Fd(r));
            }
            return Vec::new();
        }
        self.tables.resync_from(pid, t0, snap)
    }

    /// Waits for kernel events and applies them until `shutdown` resolves or every watched
    /// process has exited. Then drains what is left and returns the summary.
    pub async fn run(
        mut self,
        sink: &mut dyn Sink,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<Summary, ObserveError> {
        tokio::pin!(shutdown);
        // Losses that wake nobody (no event reached the ring) are found on this tick.
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
        let mut check = tokio::time::interval(CHECK_PERIOD);
        let ended = loop {
            if self.tables.all_exited() {
                break "exited";
            }
            tokio::select! {
                _ = &mut shutdown => break "signal",
                ready = self.readable() => {
                    ready?;
                    self.drain(sink);
                    self.check_losses(sink)?;
                    flushed(sink)?;
                }
                _ = tick.tick() => {
                    self.tracker.flush_logs();
                    self.drain(sink);
                    self.check_losses(sink)?;
                    flushed(sink)?;
                }
                _ = check.tick() => {
                    self.check_tables(sink)?;
                    flushed(sink)?;
                }
            }
        };
        self.drain(sink);
        self.check_losses(sink)?;
        flushed(sink)?;
        Ok(self.summary(ended))
    }

    fn summary(&self, ended: &'static str) -> Summary {
        let mut lost = BTreeMap::new();
        for cause in LossCause::ALL {
            lost.insert(cause.name(), self.last_losses[cause as usize]);
        }
        let mut processes: Vec<ProcSummary> = self
            .tables
            .pids()
            .filter_map(|pid| {
                self.tables.get(pid).map(|t| ProcSummary {
                    pid,
                    fds: t.fds.len(),
                    exited: t.exited,
                })
            })
            .collect();
        processes.sort_by_key(|p| p.pid);
        Summary {
            ty: "summary",
            events: self.events,
            records: self.records,
            lost_total: self.last_losses.iter().sum(),
            lost,
            gaps: self.gaps,
            malformed: self.malformed,
            processes,
            ended,
        }
    }
}
