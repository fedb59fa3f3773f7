//! `vmaudit monitor`: hold a running libvirt's audit records to the kernel's evidence.

use std::{
    os::unix::fs::DirBuilderExt as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use vmaudit::{
    exit,
    monitor::{MANAGER_EXES, MonitorError, MonitorOptions, monitor, source::Source},
    observe::loader::TrackerOptions,
};

use super::watch::shutdown_signal;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Follow this audit.log (as auditd writes it; followed across rotation) instead of
    /// reading the kernel's audit multicast group.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// With --audit-log: read the log from its start (records written before vmaudit watched
    /// are judged against what runs now, or `unknown` when a later record superseded them).
    #[arg(long, requires = "audit_log")]
    from_start: bool,
    /// A manager's pid (repeat for several), besides every process running a --manager-exe.
    #[arg(long)]
    manager: Vec<u32>,
    /// Every process running this executable is a manager, from when it starts: followed
    /// across restarts and new instances (repeat for several). Default: /usr/sbin/libvirtd and
    /// /usr/sbin/virtqemud.
    #[arg(long, value_name = "PATH")]
    manager_exe: Vec<PathBuf>,
    /// Append the records and their verdicts (JSON lines, fsync'd) to this journal; SIGHUP
    /// reopens it (after logrotate moved it).
    #[arg(long, default_value = vmaudit::paths::MONITOR_JOURNAL)]
    journal: PathBuf,
    /// Write no journal.
    #[arg(long, conflicts_with = "journal")]
    no_journal: bool,
    /// What the journal holds: `full` (each record and its verdicts: what `verify` and
    /// `search` read) or `verdicts` (the verdicts only).
    #[arg(long, value_enum, default_value_t = JournalMode::Full)]
    journal_mode: JournalMode,
    /// How long a claim may wait for its kernel evidence (2s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = super::duration)]
    deadline: std::time::Duration,
    /// The same in milliseconds (the older spelling).
    #[arg(long, value_name = "MS", hide = true, conflicts_with = "deadline")]
    deadline_ms: Option<u64>,
    /// Do not print verdicts on stdout (the journal and stderr's lines still have them).
    #[arg(long)]
    no_echo: bool,
    /// Size of the kernel event ring buffer in bytes (a power of two, at least 4096).
    #[arg(long, default_value_t = vmaudit_common::DEFAULT_RING_BYTES, value_parser = super::watch::parse_ring)]
    ring_buffer_bytes: u32,
    /// Serve the live dashboard, /metrics (Prometheus), /api/state and /events (SSE) over HTTP
    /// on ADDR (IP:PORT, or a PORT on 127.0.0.1; port 0 picks a free one; default
    /// 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = super::run::DEFAULT_SERVE)]
    serve: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum JournalMode {
    Full,
    Verdicts,
}

pub fn run(args: Args) -> u8 {
    let source = match args.audit_log {
        Some(path) => Source::File {
            path,
            from_start: args.from_start,
        },
        None => Source::Kernel,
    };
    let manager_exes = if args.manager_exe.is_empty() {
        MANAGER_EXES.iter().map(PathBuf::from).collect()
    } else {
        args.manager_exe
    };
    if !args.no_journal
        && args.journal == std::path::Path::new(vmaudit::paths::MONITOR_JOURNAL)
        && let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(vmaudit::paths::JOURNAL_DIR)
    {
        vmaudit::failure!(
            "cannot make the journal directory {}: {e}",
            vmaudit::paths::JOURNAL_DIR
        );
        return exit::JOURNAL;
    }
    let reopen = Arc::new(AtomicBool::new(false));
    let mut opts = MonitorOptions {
        source,
        managers: args.manager,
        manager_exes,
        journal: (!args.no_journal).then_some(args.journal),
        journal_records: args.journal_mode == JournalMode::Full,
        reopen: Some(reopen.clone()),
        deadline: args
            .deadline_ms
            .map_or(args.deadline, std::time::Duration::from_millis),
        echo: !args.no_echo,
        tracker: TrackerOptions {
            ring_bytes: args.ring_buffer_bytes,
        },
        observers: Default::default(),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return super::fail(&e, exit::INTERNAL),
    };
    let result = rt.block_on(async {
        // Bound before anything starts: a bad address leaves nothing behind.
        let _server = match &args.serve {
            Some(addr) => match vmaudit::serve::serve_observers(
                addr,
                vmaudit::serve::Hub::for_monitor(),
                &mut opts.observers,
            ) {
                Ok(s) => Some(s),
                Err(e) => return Err(Failed::Serve(e)),
            },
            None => None,
        };
        let shutdown = shutdown_signal();
        reopen_on_sighup(reopen);
        monitor(opts, shutdown, |managers| {
            let pids: Vec<String> = managers.iter().map(u32::to_string).collect();
            vmaudit::notice!("monitoring manager pid {}", pids.join(", "));
        })
        .await
        .map_err(Failed::Monitor)
    });
    match result {
        Ok(o) => {
            let s = &o.stats;
            vmaudit::notice!(
                "{} records, {} claims: {} confirmed, {} violated, {} unconfirmed, {} unknown; \
                 skipped {} other types, {} other resources, {} malformed; {} for unknown VMs, {} pid reuse, {} before watching; \
                 by resrc (records/claims/not verifiable): {}",
                s.records,
                s.claims,
                o.totals.confirmed,
                o.totals.violated,
                o.totals.unconfirmed,
                o.totals.unknown,
                s.other_types,
                s.other_resources,
                s.malformed,
                s.unknown_vm,
                s.pid_reuse,
                s.historic,
                s.resources_line()
            );
            o.exit_code()
        }
        Err(Failed::Serve(e)) => super::fail(&e, e.exit_code()),
        Err(Failed::Monitor(e)) => super::fail(&e, e.exit_code()),
    }
}

/// SIGHUP sets `flag`: the journal is reopened by its path before the next write.
fn reopen_on_sighup(flag: Arc<AtomicBool>) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    flag.store(true, Ordering::Relaxed);
                }
            });
        }
        Err(e) => log::warn!("SIGHUP cannot reopen the journal: {e}"),
    }
}

enum Failed {
    Serve(vmaudit::serve::ServeError),
    Monitor(MonitorError),
}
