//! `vmaudit monitor`: another manager's (libvirt's) audit records held to the kernel's
//! evidence, by the same verification loop and rules as `vmaudit run`
//! ([`crate::verify::engine`]).
//!
//! - [`source`]: the records, from the kernel's audit multicast group or a followed audit.log.
//!
//! The tracker follows the managers and every process they fork (qemu included); each record
//! of a VIRT_* type becomes a claim ([`vmaudit_core::claim::claim_of`]), and what libvirt's
//! records do not say (which fd) the ledger infers from the kernel.

mod feed;
pub mod source;

use std::{
    future::Future,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;
use vmaudit_core::{
    audit::parse::Parsed,
    claim::{NotAClaim, RecordClaim},
    verdict::Totals,
};

use self::source::{Source, SourceError};
use crate::{
    audit::{Journal, JournalError, KernelAudit},
    observe::{ObserveError, loader::TrackerOptions},
    procfs::ProcFs,
    verify::{
        engine::{Engine, EngineConfig, EngineError},
        observer::Observers,
        publish::Lines,
    },
};

/// The executables of the managers monitor mode knows by default: libvirt's monolithic
/// daemon and its modular QEMU driver daemon.
pub const MANAGER_EXES: &[&str] = &["/usr/sbin/libvirtd", "/usr/sbin/virtqemud"];

#[derive(Clone, Debug)]
pub struct MonitorOptions {
    pub source: Source,
    /// Managers named by pid (besides those found by executable).
    pub managers: Vec<u32>,
    /// Every process running one of these is a manager, from when it starts.
    pub manager_exes: Vec<PathBuf>,
    pub journal: Option<PathBuf>,
    /// How long a claim may wait for its evidence.
    pub deadline: Duration,
    /// Journal each record beside its verdicts (so that `verify` and `search` read it).
    pub journal_records: bool,
    /// Set (SIGHUP) to reopen the journal by its path before the next write.
    pub reopen: Option<Arc<AtomicBool>>,
    /// Print each verdict's journal line on stdout.
    pub echo: bool,
    pub tracker: TrackerOptions,
    pub observers: Observers,
}

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(
        "no manager to watch: no process runs {} (name one with --manager PID or --manager-exe PATH)",
        .exes.join(" or ")
    )]
    NoManager { exes: Vec<String> },
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
            Self::NoManager { .. } => crate::exit::NO_SUCH_PROCESS,
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
    /// Records whose sender is no manager (not claims).
    pub not_from_manager: u64,
    /// Managers found after the start (a restart, a new instance).
    pub managers_followed: u64,
    /// Audit records lost on the way (overruns, the kernel's lost counter, serial gaps).
    pub records_lost: u64,
    /// Times the reader waited for room in the queue (backpressure).
    pub queue_waits: u64,
}

/// What the monitor made of one `resrc`'s records.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ResrcCount {
    /// Records seen.
    pub records: u64,
    /// Records that became claims (each judged).
    pub claims: u64,
    /// Records the kernel cannot speak for (mem, vcpu, fs, ...; see docs/verdicts.md, what monitor mode verifies).
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

    /// Counts a VIRT_RESOURCE record under its `resrc`.
    pub fn count_resrc(&mut self, p: &Parsed, claimed: &Result<RecordClaim, NotAClaim>) {
        let Some(resrc) = p.get("resrc") else {
            return;
        };
        let n = self.resources.entry(resrc.to_owned()).or_default();
        n.records += 1;
        n.claims += u64::from(claimed.is_ok());
        n.not_verifiable += u64::from(matches!(claimed, Err(NotAClaim::OtherResource(_))));
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

/// Monitors until `shutdown` resolves (or the source ends); `ready` is called once the
/// tracker watches the managers and the source is open.
pub async fn monitor(
    opts: MonitorOptions,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&[u32]),
) -> Result<Outcome, MonitorError> {
    let mut managers = opts.managers.clone();
    for pid in ProcFs::default().running(&opts.manager_exes) {
        if !managers.contains(&pid) {
            managers.push(pid);
        }
    }
    if managers.is_empty() {
        return Err(MonitorError::NoManager {
            exes: opts
                .manager_exes
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
        });
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
            manager_exes: opts.manager_exes.clone(),
        },
        Box::new(Lines {
            journal,
            echo: opts.echo,
            reopen: opts.reopen.clone(),
        }),
    )?;
    let (tx, rx) = mpsc::channel(source::QUEUE);
    let waits = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, sink) = (
            stop.clone(),
            source::Sink {
                tx,
                waits: waits.clone(),
            },
        );
        std::thread::Builder::new()
            .name("vmaudit-records".into())
            .spawn(move || body(sink, stop))
            .map_err(|source| ObserveError::Poll { source })?
    };
    let stop_reader = StopOnDrop(stop, Some(reader));
    let kernel = KernelAudit::open()
        .inspect_err(|e| {
            log::warn!(
                "the kernel's audit status cannot be read ({e}): its lost records are not counted"
            )
        })
        .ok();
    let heartbeat = matches!(opts.source, Source::Kernel);
    ready(&managers);
    let feed = feed::Feed::new(
        &engine,
        opts.observers.clone(),
        opts.journal_records,
        kernel,
        heartbeat,
    );
    let read = feed.run(rx, shutdown).await;
    drop(stop_reader);
    let outcome = engine.finish();
    let mut stats = read?;
    let judged = outcome?;
    stats.unknown_vm = judged.ledger.unknown_vm;
    stats.pid_reuse = judged.ledger.pid_reuse;
    stats.historic = judged.ledger.historic;
    stats.not_from_manager = judged.managers.not_from_manager;
    stats.managers_followed = judged.managers.followed;
    stats.claims -= judged.managers.not_from_manager;
    stats.queue_waits = waits.load(Ordering::Relaxed);
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

struct StopOnDrop(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        if let Some(t) = self.1.take() {
            let _ = t.join();
        }
    }
}
