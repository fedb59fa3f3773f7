//! `vmaudit monitor`: hold a running libvirt's audit records to the kernel's evidence.

use std::path::PathBuf;

use vmaudit::{
    exit,
    monitor::{MonitorError, MonitorOptions, monitor, source::Source},
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
    /// The manager's pid (repeat for several). Default: every running libvirtd/virtqemud.
    #[arg(long)]
    manager: Vec<u32>,
    /// Append the verdicts (JSON lines, fsync'd) to this journal.
    #[arg(long)]
    journal: Option<PathBuf>,
    /// How long a claim may wait for its kernel evidence, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    deadline_ms: u64,
    /// Do not print verdicts on stdout.
    #[arg(long)]
    quiet: bool,
    /// Size of the kernel event ring buffer in bytes (a power of two, at least 4096).
    #[arg(long, default_value_t = vmaudit_common::DEFAULT_RING_BYTES, value_parser = super::watch::parse_ring)]
    ring_buffer_bytes: u32,
    /// Serve the live dashboard, /metrics (Prometheus), /api/state and /events (SSE) over HTTP
    /// on ADDR (IP:PORT, or a PORT on 127.0.0.1; port 0 picks a free one; default
    /// 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = super::run::DEFAULT_SERVE)]
    serve: Option<String>,
}

pub fn run(args: Args) -> u8 {
    let source = match args.audit_log {
        Some(path) => Source::File {
            path,
            from_start: args.from_start,
        },
        None => Source::Kernel,
    };
    let mut opts = MonitorOptions {
        source,
        managers: args.manager,
        journal: args.journal,
        deadline: std::time::Duration::from_millis(args.deadline_ms),
        echo: !args.quiet,
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
            Some(addr) => match vmaudit::serve::serve_observers(addr, &mut opts.observers) {
                Ok(s) => Some(s),
                Err(e) => return Err(Failed::Serve(e)),
            },
            None => None,
        };
        let shutdown = shutdown_signal();
        monitor(opts, shutdown, |managers| {
            let pids: Vec<String> = managers.iter().map(u32::to_string).collect();
            eprintln!("vmaudit: monitoring manager pid {}", pids.join(", "));
        })
        .await
        .map_err(Failed::Monitor)
    });
    match result {
        Ok(o) => {
            let s = &o.stats;
            eprintln!(
                "vmaudit: {} records, {} claims: {} confirmed, {} violated, {} unconfirmed, {} unknown; \
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

enum Failed {
    Serve(vmaudit::serve::ServeError),
    Monitor(MonitorError),
}
