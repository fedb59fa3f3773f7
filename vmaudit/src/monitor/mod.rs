//! `vmaudit monitor`: another manager's (libvirt's) audit records held to the kernel's
//! evidence.
//!
//! - [`source`]: the records, from the kernel's audit multicast group or a followed audit.log.
//! - [`claims`]: what each VIRT_* record claims.
//! - [`ledger`]: the claims judged against the fd tracker (which follows libvirtd and every
//!   process it forks: qemu included), kcmp, the interfaces' addresses and the device maps.

pub mod claims;
pub mod ledger;
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

use self::{
    claims::{MClaim, MKind, NotAClaim, claim_of},
    ledger::{MonitorLedger, Stats},
    source::{Line, Source, SourceError},
};
use crate::{
    audit::{
        journal::{Journal, JournalError},
        parse::parse_line,
    },
    observe::{ObserveError, Output, WatchOptions, Watcher, loader::TrackerOptions, monotonic_ns},
    procfs::ProcFs,
    verify::{
        Status, Verdict,
        engine::Totals,
        observer::{Observer, Observers, VmInfo},
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
    Observe(#[from] ObserveError),
}

/// What a monitor session ends with.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Outcome {
    pub totals: Totals,
    pub stats: Stats,
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
    let mut journal = opts.journal.as_ref().map(Journal::open).transpose()?;
    let watch = WatchOptions {
        pids: managers.clone(),
        follow_children: true,
        tracker: opts.tracker.clone(),
        ignore_tids: vec![],
    };
    let obs = opts.observers.clone();
    let mut w = Watcher::start(&watch, ProcFs::default(), &mut |o: Output| {
        if let Output::Fd(r) = &o {
            obs.fd(r);
        }
    })?;
    let start_wall = wall_ns();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("vmaudit-records".into())
            .spawn(move || body(tx, stop))
            .map_err(|source| ObserveError::Poll { source })?
    };
    let _stop_reader = StopOnDrop(stop, Some(reader));
    ready(&managers);

    let mut ledger = MonitorLedger::new(opts.deadline.as_nanos() as u64, managers);
    let mut out: Vec<Verdict> = Vec::new();
    let mut totals = Totals::default();
    let mut caught_up = false;
    let mut next_id = 1u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut slow = tokio::time::interval(Duration::from_millis(500));
    tokio::pin!(shutdown);
    // Each batch of verdicts: the journal first (one write, one fsync), then stdout.
    let mut emit = |out: &mut Vec<Verdict>, totals: &mut Totals| -> Result<(), MonitorError> {
        if out.is_empty() {
            return Ok(());
        }
        if let Some(j) = journal.as_mut() {
            j.append_all(out)?;
        }
        let mut o = std::io::stdout().lock();
        for v in out.drain(..) {
            totals.add(v.status);
            if v.status == Status::Violated {
                eprintln!(
                    "vmaudit: VIOLATION: {} [{} claim {}]",
                    v.reason, v.claim.kind, v.claim.id
                );
            }
            obs.verdict(&v);
            if opts.echo {
                let _ = serde_json::to_writer(&mut o, &v);
                let _ = std::io::Write::write_all(&mut o, b"\n");
            }
        }
        let _ = std::io::Write::flush(&mut o);
        Ok(())
    };
    loop {
        tokio::select! {
            l = rx.recv() => {
                let Some(first) = l else { break };
                // Every line available now, after one drain: the kernel events before any of
                // them are then applied.
                let mut batch = vec![first];
                while batch.len() < 4096 {
                    match rx.try_recv() {
                        Ok(l) => batch.push(l),
                        Err(_) => break,
                    }
                }
                drain(&mut w, &mut ledger, &obs)?;
                for l in batch {
                    match l {
                        Line::Record(text) => {
                            ledger.stats.records += 1;
                            let Some(c) = to_claim(&text, &mut ledger.stats, &mut next_id, caught_up, start_wall) else {
                                continue;
                            };
                            if let MKind::VmStart { pid } = c.kind
                                && std::path::Path::new(&format!("/proc/{pid}")).exists()
                            {
                                // Started before vmaudit watched, or by a manager it does not
                                // follow: watch it from now on, its table read from /proc.
                                let _ = w.add(pid, true, &mut |o: Output| {
                                    if let Output::Fd(r) = &o {
                                        obs.fd(r);
                                    }
                                });
                            }
                            tell_vm(&obs, &c);
                            ledger.on_claim(c, w.tables(), monotonic_ns(), &mut out);
                        }
                        Line::CaughtUp => {
                            caught_up = true;
                            ledger.caught_up(w.tables(), monotonic_ns(), &mut out);
                        }
                        Line::Failed(e) => return Err(MonitorError::SourceFailed(e)),
                    }
                }
            }
            r = w.readable() => {
                r?;
                drain(&mut w, &mut ledger, &obs)?;
                ledger.on_tick(w.tables(), monotonic_ns(), &mut out);
            }
            _ = tick.tick() => {
                drain(&mut w, &mut ledger, &obs)?;
                ledger.on_tick(w.tables(), monotonic_ns(), &mut out);
            }
            _ = slow.tick() => {
                ledger.touch();
                ledger.recheck_rules(&mut out);
                ledger.scan_copies(&mut out);
            }
            () = &mut shutdown => break,
        }
        emit(&mut out, &mut totals)?;
    }
    drain(&mut w, &mut ledger, &obs)?;
    ledger.finish(w.tables(), monotonic_ns(), &mut out);
    emit(&mut out, &mut totals)?;
    let outcome = Outcome {
        totals,
        stats: ledger.stats.clone(),
    };
    if let Some(j) = journal.as_mut() {
        j.append_json(&serde_json::json!({
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

fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The claim of one audit.log line, counting what is not one.
fn to_claim(
    line: &str,
    stats: &mut Stats,
    next_id: &mut u64,
    caught_up: bool,
    start_wall: u64,
) -> Option<MClaim> {
    let p = match parse_line(line) {
        Ok(p) => p,
        Err(e) => {
            stats.malformed += 1;
            log::debug!("skipping a line that does not parse ({e}): {line}");
            return None;
        }
    };
    match claim_of(&p) {
        Ok((kind, vm, uuid, success)) => {
            let record_ts_ns = p.stamp.secs * 1_000_000_000 + u64::from(p.stamp.msec) * 1_000_000;
            let id = *next_id;
            *next_id += 1;
            let text = line
                .split_once("msg='")
                .map(|(_, t)| t.trim_end_matches('\''))
                .unwrap_or(line)
                .to_owned();
            Some(MClaim {
                id,
                kind,
                vm,
                uuid,
                sender: p.sender_pid(),
                success,
                text,
                record_ts_ns,
                arrived_ns: monotonic_ns(),
                historic: !caught_up && record_ts_ns < start_wall,
            })
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

fn tell_vm(obs: &Observers, c: &MClaim) {
    let (pid, state) = match c.kind {
        MKind::VmStart { pid } => (pid, "running"),
        MKind::VmStop { .. } => (0, "stopped"),
        _ => return,
    };
    obs.vm(&VmInfo {
        name: c.vm.clone(),
        uuid: c.uuid.clone(),
        pid,
        state,
    });
}

fn drain(w: &mut Watcher, ledger: &mut MonitorLedger, obs: &Observers) -> Result<(), ObserveError> {
    let mut outputs: Vec<Output> = Vec::new();
    w.drain(&mut |o: Output| outputs.push(o));
    w.check_losses(&mut |o: Output| outputs.push(o))?;
    let now = monotonic_ns();
    for o in outputs {
        match o {
            Output::Fd(r) => {
                obs.fd(&r);
                ledger.on_record(&r, now);
            }
            Output::Gap(g) => {
                obs.gap(&g);
                ledger.on_gap(g.pid, g.lost);
            }
        }
    }
    Ok(())
}
