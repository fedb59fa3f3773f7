//! The kernel fd tracker: eBPF events in, exact per-process fd tables and records out.
//!
//! Order of start-up, so that nothing is missed: attach every program, put the process in
//! the kernel's watch set, note the kernel clock, then read its table from /proc. Events from
//! before that clock reading are already in the snapshot and are skipped; everything after
//! is applied in order. When the kernel reports lost events for a process, its table is read
//! again from /proc (same clock rule) and the gap is reported as a gap.

pub mod event;
pub mod loader;
pub mod preflight;
pub mod table;

use std::{collections::BTreeMap, io, path::PathBuf};

use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use vmaudit_common::LossCause;

use self::{
    event::{Event, decode, parse_raw},
    loader::{Tracker, TrackerOptions},
    table::{FdRecord, Lookahead, Tables},
};
use crate::{exit, procfs::ProcFs};

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
            Self::Program { .. } | Self::Attach { .. } => exit::KERNEL_FEATURE,
            Self::NoSuchProcess { .. } | Self::NotAProcess { .. } => exit::NO_SUCH_PROCESS,
            Self::MissingObject { .. }
            | Self::Map { .. }
            | Self::Proc { .. }
            | Self::Poll { .. } => exit::INTERNAL,
        }
    }
}

/// A gap: events lost for a process, after which its table was read again from /proc.
#[derive(Clone, Debug, Serialize)]
pub struct GapRecord {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub ts: u64,
    pub pid: u32,
    /// Events the kernel side could not deliver for this process since the last check
    /// (a lower bound: see `causes` for the exact totals).
    pub lost: u64,
    /// Events lost on the whole host since the last check, per cause.
    pub causes: BTreeMap<&'static str, u64>,
    /// fds found in /proc that the table did not have.
    pub added: Vec<i32>,
    /// fds the table had that /proc did not.
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
    fn flush(&mut self) {}
}

impl<F: FnMut(Output)> Sink for F {
    fn record(&mut self, out: Output) {
        self(out)
    }
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
    Tracker::load(opts)
}

/// `pid` must be a process (a thread group leader), not a thread or nothing.
fn check_process(procfs: &ProcFs, pid: u32) -> Result<(), ObserveError> {
    match preflight::tgid_of(&procfs.roots.proc, pid) {
        None => Err(ObserveError::NoSuchProcess { pid }),
        Some(tgid) if tgid != pid => Err(ObserveError::NotAProcess { pid, tgid }),
        Some(_) => Ok(()),
    }
}

/// Watches processes and keeps their fd tables exact.
pub struct Watcher {
    tracker: Tracker,
    ring: AsyncFd<RingBuf<MapData>>,
    tables: Tables<ProcFs>,
    /// Per process: the kernel time its table was last read from /proc; older events are in it.
    read_at: BTreeMap<u32, u64>,
    last_losses: [u64; LossCause::COUNT as usize],
    events: u64,
    records: u64,
    gaps: u64,
    malformed: u64,
}

impl Watcher {
    /// Loads the tracker, starts watching `opts.pids` and seeds their tables. The seed
    /// records go to `sink`.
    pub fn start(
        opts: &WatchOptions,
        procfs: ProcFs,
        sink: &mut dyn Sink,
    ) -> Result<Self, ObserveError> {
        for &pid in &opts.pids {
            check_process(&procfs, pid)?;
        }
        let mut tracker = start_tracker(&opts.tracker)?;
        let ring = tracker
            .take_ring()
            .ok_or(ObserveError::MissingObject { name: "EVENTS" })?;
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
            tables: Tables::new(procfs),
            read_at: BTreeMap::new(),
            last_losses,
            events: 0,
            records: 0,
            gaps: 0,
            malformed: 0,
        };
        for &tid in &opts.ignore_tids {
            w.tracker.ignore_tid(tid)?;
        }
        for &pid in &opts.pids {
            w.watch_and_seed(pid, opts.follow_children, sink)?;
        }
        Ok(w)
    }

    /// Starts watching one more process (and, with `follow_children`, what it forks), seeding
    /// its table from /proc; the seed records go to `sink`. A process already watched is left
    /// as it is.
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

    /// Puts `pid` in the kernel's watch set, then reads its table from /proc (events after the
    /// read are applied on top); the seed records go to `sink`.
    fn watch_and_seed(
        &mut self,
        pid: u32,
        follow_children: bool,
        sink: &mut dyn Sink,
    ) -> Result<(), ObserveError> {
        self.tracker.watch(pid, follow_children)?;
        let t0 = monotonic_ns();
        let seed = self
            .tables
            .seed(pid)
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => ObserveError::NoSuchProcess { pid },
                _ => ObserveError::Proc { pid, source },
            })?;
        self.read_at.insert(pid, t0);
        for r in seed {
            self.emit(sink, Output::Fd(r));
        }
        Ok(())
    }

    /// Stops reporting the syscalls of thread `tid` (see [`Tracker::ignore_tid`]).
    pub fn ignore_tid(&mut self, tid: u32) -> Result<(), ObserveError> {
        self.tracker.ignore_tid(tid)
    }

    /// Waits until the ring buffer has events (then [`Watcher::drain`] them).
    pub async fn readable(&mut self) -> Result<(), ObserveError> {
        let mut guard = self
            .ring
            .readable_mut()
            .await
            .map_err(|source| ObserveError::Poll { source })?;
        guard.clear_ready();
        Ok(())
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

    /// Reads every event available now and applies it. Returns whether any arrived.
    pub fn drain(&mut self, sink: &mut dyn Sink) -> bool {
        let mut raws = Vec::new();
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            match parse_raw(&item) {
                Ok(raw) => raws.push(raw),
                Err(e) => {
                    log::warn!("malformed ring-buffer record: {e}");
                    self.malformed += 1;
                }
            }
        }
        let mut events: Vec<Event> = Vec::with_capacity(raws.len());
        for raw in &raws {
            match decode(raw) {
                Ok(e) => events.push(e),
                Err(e) => {
                    log::warn!("undecodable event: {e}");
                    self.malformed += 1;
                }
            }
        }
        self.events += raws.len() as u64;
        let lookahead = Lookahead::new(&events);
        self.tables.begin_batch();
        for (i, ev) in events.iter().enumerate() {
            if self.read_at.get(&ev.tgid).is_some_and(|t0| ev.ts_ns < *t0) {
                continue;
            }
            if self.tables.get(ev.tgid).is_none() {
                // A process whose fork event was lost: start its table from /proc.
                self.resync_one(ev.tgid, 0, sink);
            }
            let records = self
                .tables
                .apply(ev, &|fd| lookahead.touched_after(i, ev.tgid, fd));
            for r in records {
                self.emit(sink, Output::Fd(r));
            }
        }
        !raws.is_empty()
    }

    /// Compares the kernel's loss counters with the last look; on new losses resyncs the
    /// affected tables from /proc and reports each as a gap.
    pub fn check_losses(&mut self, sink: &mut dyn Sink) -> Result<(), ObserveError> {
        let now = self.tracker.losses()?;
        if now == self.last_losses {
            return Ok(());
        }
        let mut causes = BTreeMap::new();
        for cause in LossCause::ALL {
            let d = now[cause as usize] - self.last_losses[cause as usize];
            if d > 0 {
                causes.insert(cause.name(), d);
            }
        }
        self.last_losses = now;
        // Drain first: events delivered before the loss must be applied before the resync.
        self.drain(sink);
        let per_pid = self.tracker.take_lost_tgids()?;
        let targets: Vec<(u32, u64)> = if per_pid.is_empty() {
            // The per-process map could not say who lost events: resync everyone.
            self.tables.pids().map(|p| (p, 0)).collect()
        } else {
            per_pid
        };
        for (pid, lost) in targets {
            if self.tables.get(pid).is_none_or(|t| t.exited) {
                continue;
            }
            let (added, removed, records) = self.resync_one(pid, lost, sink);
            self.gaps += 1;
            sink.record(Output::Gap(GapRecord {
                ty: "gap",
                ts: *self.read_at.get(&pid).unwrap_or(&0),
                pid,
                lost,
                causes: causes.clone(),
                added,
                removed,
            }));
            for r in records {
                self.emit(sink, Output::Fd(r));
            }
        }
        Ok(())
    }

    fn resync_one(
        &mut self,
        pid: u32,
        _lost: u64,
        sink: &mut dyn Sink,
    ) -> (Vec<i32>, Vec<i32>, Vec<FdRecord>) {
        let t0 = monotonic_ns();
        self.read_at.insert(pid, t0);
        let records = if self.tables.get(pid).is_none() {
            let seeded = self.tables.seed(pid).unwrap_or_default();
            for r in seeded {
                self.emit(sink, Output::Fd(r));
            }
            Vec::new()
        } else {
            self.tables.resync(pid, t0)
        };
        let pick = |op| {
            records
                .iter()
                .filter(|r| r.op == op)
                .filter_map(|r| r.fd)
                .collect::<Vec<_>>()
        };
        (
            pick(table::Op::ResyncAdd),
            pick(table::Op::ResyncRemove),
            records,
        )
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
        let ended = loop {
            if self.tables.all_exited() {
                break "exited";
            }
            tokio::select! {
                _ = &mut shutdown => break "signal",
                ready = self.ring.readable_mut() => {
                    let mut guard = ready.map_err(|source| ObserveError::Poll { source })?;
                    // Clear before draining: a wake-up that lands after the drain then stays.
                    guard.clear_ready();
                    self.drain(sink);
                    self.check_losses(sink)?;
                    sink.flush();
                }
                _ = tick.tick() => {
                    self.drain(sink);
                    self.check_losses(sink)?;
                    sink.flush();
                }
            }
        };
        self.drain(sink);
        self.check_losses(sink)?;
        sink.flush();
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
