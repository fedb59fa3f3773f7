//! `vmaudit monitor`: another manager's (libvirt's) audit records held to the kernel's
//! evidence, by the same verification loop and rules as `vmaudit run`
//! ([`crate::verify::engine`]).
//!
//! - [`source`]: the records, from the kernel's audit multicast group or a followed audit.log.
//!
//! The tracker follows the managers and every process they fork (qemu included); each record
//! of a VIRT_* type becomes a claim ([`vmaudit_core::claim::claim_of`]), and what libvirt's
//! records do not say (which fd) the ledger infers from the kernel.

pub mod source;

use std::{
    future::Future,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;
use vmaudit_core::{
    audit::parse::parse_line,
    claim::{NotAClaim, claim_of},
    verdict::Totals,
};

use self::source::{Line, Source, SourceError};
use crate::{
    audit::{Journal, JournalError},
    observe::{ObserveError, loader::TrackerOptions, monotonic_ns},
    verify::{
        engine::{Engine, EngineConfig, EngineError, Msg},
        observer::Observers,
        publish::Lines,
    },
};

/// The process names of the managers monitor mode knows (libvirt's monolithic daemon and its
/// modular QEMU driver daemon).
pub const MANAGER_NAMES: &[&str] = &["libvirtd", "virtqemud"];

#[derive(Clone, Debug)]
pub struct MonitorOptions {
    pub source: Source,
    /// The manager's pids; empty: every running libvirtd/virtqemud.
    pub managers: Vec<u32>,
    pub journal: Option<PathBuf>,
    /// How long a claim may wait for its evidence.
    pub deadline: Duration,
    /// Print each verdict's journal line on stdout.
    pub echo: bool,
    pub tracker: TrackerOptions,
    pub observers: Observers,
}

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(
        "no manager to watch: no {} process is running (name one with --manager PID)",
        MANAGER_NAMES.join(" or ")
    )]
    NoManager,
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("the record source failed: {0}")]
    SourceFailed(String),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Verify(#[from] EngineError),
}

impl MonitorError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NoManager => crate::exit::NO_SUCH_PROCESS,
            Self::Source(_) | Self::SourceFailed(_) => crate::exit::AUDIT_SOURCE,
            Self::Journal(_) => crate::exit::JOURNAL,
            Self::Verify(e) => e.exit_code(),
        }
    }
}

impl From<ObserveError> for MonitorError {
    fn from(e: ObserveError) -> Self {
        Self::Verify(e.into())
    }
}

/// Counts of what the monitor read and could not use, and of what the ledger could not judge.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Lines read.
    pub records: u64,
    /// Records that were claims.
    pub claims: u64,
    /// Records of other types (not VIRT_CONTROL/VIRT_RESOURCE).
    pub other_types: u64,
    /// VIRT_* records about resources the kernel cannot speak for (mem, vcpu, fs, ...).
    pub other_resources: u64,
    /// Lines that did not parse, or VIRT_* records missing fields.
    pub malformed: u64,
    /// Claims about VMs never seen to start.
    pub unknown_vm: u64,
    /// Start records whose pid now belongs to a later process.
    pub pid_reuse: u64,
    /// Claims written before vmaudit watched.
    pub historic: u64,
    /// VIRT_RESOURCE records by `resrc`.
    pub resources: std::collections::BTreeMap<String, ResrcCount>,
}

/// What the monitor made of one `resrc`'s records.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ResrcCount {
    /// Records seen.
    pub records: u64,
    /// Records that became claims (each judged).
    pub claims: u64,
    /// Records the kernel cannot speak for (mem, vcpu, fs, ...; see the README's coverage).
    pub not_verifiable: u64,
}

impl Stats {
    /// One line per `resrc`, for the summary: `disk 1/1/0` (records/claims/not verifiable).
    pub fn resources_line(&self) -> String {
        self.resources
            .iter()
            .map(|(r, c)| format!("{r} {}/{}/{}", c.records, c.claims, c.not_verifiable))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What a monitor session ends with.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Outcome {
    pub totals: Totals,
    pub stats: Stats,
}

impl Outcome {
    /// `verify`'s exit codes: 7 when anything was violated, 8 when something is unconfirmed or
    /// unknown.
    pub fn exit_code(&self) -> u8 {
        self.totals.exit_code()
    }
}

/// The pids of running libvirt daemons.
pub fn find_managers() -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(e.path().join("comm"))
            && MANAGER_NAMES.contains(&comm.trim())
        {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

/// Monitors until `shutdown` resolves (or the source ends); `ready` is called once the
/// tracker watches the managers and the source is open.
pub async fn monitor(
    opts: MonitorOptions,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&[u32]),
) -> Result<Outcome, MonitorError> {
    let managers = if opts.managers.is_empty() {
        find_managers()
    } else {
        opts.managers.clone()
    };
    if managers.is_empty() {
        return Err(MonitorError::NoManager);
    }
    // Everything that can fail on bad input fails before anything is attached.
    let body = source::open(&opts.source)?;
    let journal = opts.journal.as_ref().map(Journal::open).transpose()?;
    let engine = Engine::start(
        EngineConfig {
            deadline: opts.deadline,
            tracker: opts.tracker.clone(),
            observers: opts.observers.clone(),
            watch: managers.clone(),
            managers: managers.clone(),
        },
        Box::new(Lines {
            journal,
            echo: opts.echo,
        }),
    )?;
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("vmaudit-records".into())
            .spawn(move || body(tx, stop))
            .map_err(|source| ObserveError::Poll { source })?
    };
    let stop_reader = StopOnDrop(stop, Some(reader));
    ready(&managers);
    let mut stats = Stats::default();
    let read = feed(&engine, rx, shutdown, &mut stats).await;
    drop(stop_reader);
    let outcome = engine.finish();
    read?;
    let judged = outcome?;
    stats.unknown_vm = judged.ledger.unknown_vm;
    stats.pid_reuse = judged.ledger.pid_reuse;
    stats.historic = judged.ledger.historic;
    let outcome = Outcome {
        totals: judged.totals,
        stats,
    };
    if let Some(path) = &opts.journal {
        Journal::open(path)?.append_json(&serde_json::json!({
            "type": "monitor-summary",
            "totals": outcome.totals,
            "stats": outcome.stats,
        }))?;
    }
    Ok(outcome)
}

/// Turns the source's lines into claims for the verifier until the source ends or `shutdown`.
async fn feed(
    engine: &Engine,
    mut rx: mpsc::UnboundedReceiver<Line>,
    shutdown: impl Future<Output = ()>,
    stats: &mut Stats,
) -> Result<(), MonitorError> {
    let start_wall = vmaudit_core::time::unix_now_ns();
    let mut caught_up = false;
    let mut next_id = 1u64;
    tokio::pin!(shutdown);
    loop {
        let line = tokio::select! {
            l = rx.recv() => l,
            () = &mut shutdown => return Ok(()),
        };
        match line {
            None => return Ok(()),
            Some(Line::Record(text)) => {
                stats.records += 1;
                let Some(c) = to_claim(&text, stats, &mut next_id, caught_up, start_wall) else {
                    continue;
                };
                engine.claim(c)?;
            }
            Some(Line::CaughtUp) => {
                caught_up = true;
                engine.send(Msg::CaughtUp)?;
            }
            Some(Line::Failed(e)) => return Err(MonitorError::SourceFailed(e)),
        }
    }
}

struct StopOnDrop(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        if let Some(t) = self.1.take() {
            let _ = t.join();
        }
    }
}

/// The claim of one audit.log line, counting what is not one.
fn to_claim(
    line: &str,
    stats: &mut Stats,
    next_id: &mut u64,
    caught_up: bool,
    start_wall: u64,
) -> Option<vmaudit_core::claim::Claim> {
    let p = match parse_line(line) {
        Ok(p) => p,
        Err(e) => {
            stats.malformed += 1;
            log::debug!("skipping a line that does not parse ({e}): {line}");
            return None;
        }
    };
    let claimed = claim_of(&p);
    if let Some(resrc) = p.get("resrc") {
        let n = stats.resources.entry(resrc.to_owned()).or_default();
        n.records += 1;
        n.claims += u64::from(claimed.is_ok());
        n.not_verifiable += u64::from(matches!(claimed, Err(NotAClaim::OtherResource(_))));
    }
    match claimed {
        Ok(rc) => {
            stats.claims += 1;
            let id = *next_id;
            *next_id += 1;
            let historic = !caught_up && rc.record_ts_ns < start_wall;
            Some(rc.into_claim(id, monotonic_ns(), historic))
        }
        Err(NotAClaim::OtherType) => {
            stats.other_types += 1;
            None
        }
        Err(NotAClaim::OtherResource(_)) => {
            stats.other_resources += 1;
            None
        }
        Err(e @ NotAClaim::Malformed { .. }) => {
            stats.malformed += 1;
            log::warn!("{e}: {line}");
            None
        }
    }
}
