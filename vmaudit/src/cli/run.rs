//! `vmaudit run SPEC`: run a VM, auditing every step (see `vmaudit::runtime::run`).

use std::path::PathBuf;

use vmaudit::{
    audit::AuditMode,
    runtime::run::{RunOptions, run as run_vm},
    serve,
};

use super::print_json;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The VM spec (TOML; see docs/run.md).
    spec: PathBuf,
    /// Where the audit records go: the kernel audit subsystem, the journal, or both.
    #[arg(long, value_enum, default_value_t = AuditMode::Both)]
    audit: AuditMode,
    /// The journal (JSON lines). Default: /var/log/vmaudit/<name>.jsonl.
    #[arg(long)]
    journal: Option<PathBuf>,
    /// Stop the VM at the first violation and exit 7.
    #[arg(long)]
    strict: bool,
    /// Do not hold the claims to the kernel's evidence (no verdicts).
    #[arg(long, conflicts_with = "strict")]
    no_verify: bool,
    /// How long a claim may wait for its kernel evidence (2s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = super::duration)]
    deadline: std::time::Duration,
    /// The same in milliseconds (the older spelling).
    #[arg(long, value_name = "MS", hide = true, conflicts_with = "deadline")]
    deadline_ms: Option<u64>,
    /// Size of the verifier's kernel event ring buffer in bytes (a power of two, at least 4096).
    #[arg(long, default_value_t = vmaudit_common::DEFAULT_RING_BYTES, value_parser = super::watch::parse_ring)]
    ring_buffer_bytes: u32,
    /// Serve the live dashboard, /metrics (Prometheus), /api/state and /events (SSE) over HTTP
    /// on ADDR (IP:PORT, or a PORT on 127.0.0.1; port 0 picks a free one). Give the spec
    /// first, or write `--serve=ADDR`.
    #[arg(long, value_name = "ADDR", num_args = 0..=1,
          default_missing_value = DEFAULT_SERVE, conflicts_with = "no_verify")]
    serve: Option<String>,
}

/// `--serve` without an address: [`serve::DEFAULT_ADDR`], spelled for clap.
pub(super) const DEFAULT_SERVE: &str = "127.0.0.1:9464";

pub fn run(args: Args) -> u8 {
    let mut opts = RunOptions::new(args.spec);
    opts.audit = args.audit;
    opts.journal = args.journal;
    opts.strict = args.strict;
    opts.verify = !args.no_verify;
    opts.deadline = args
        .deadline_ms
        .map_or(args.deadline, std::time::Duration::from_millis);
    opts.tracker.ring_bytes = args.ring_buffer_bytes;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return super::fail(&e, vmaudit::exit::INTERNAL),
    };
    let result = rt.block_on(async {
        // Bound before anything starts: a bad address leaves nothing behind.
        let _server = match &args.serve {
            Some(addr) => {
                match serve::serve_observers(addr, serve::Hub::new(), &mut opts.observers) {
                    Ok(s) => Some(s),
                    Err(e) => return Err(Failed::Serve(e)),
                }
            }
            None => None,
        };
        let shutdown = stop_signal();
        // The journal holds every entry; stdout is a copy for whoever reads it. When its reader
        // is gone the VM goes on, and that is said once.
        let mut echo = true;
        run_vm(
            &opts,
            &mut |entry| {
                if echo && let Err(e) = print_json(entry) {
                    echo = false;
                    log::warn!(
                        "stdout cannot be written ({e}): journal entries are no longer printed, \
                         the journal still has them all"
                    );
                }
            },
            &mut |pid| vmaudit::notice!("VM running, emulator pid {pid}"),
            shutdown,
        )
        .await
        .map_err(Failed::Run)
    });
    match result {
        Ok(ending) => {
            vmaudit::notice!("VM ended: {ending:?}");
            ending.exit_code()
        }
        Err(Failed::Serve(e)) => super::fail(&e, e.exit_code()),
        Err(Failed::Run(e)) => super::fail(&e, e.exit_code()),
    }
}

/// Resolves on the first SIGINT, SIGTERM, SIGHUP or SIGQUIT: each stops the VM the same way.
/// Registered at once, not when first polled: a signal that comes while the VM starts must not
/// take its default action (ending vmaudit without its clean-up).
fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let kinds = [
        SignalKind::interrupt(),
        SignalKind::terminate(),
        SignalKind::hangup(),
        SignalKind::quit(),
    ];
    let handlers: Vec<_> = kinds.into_iter().map(signal).collect();
    async move {
        let mut streams = Vec::new();
        for h in handlers {
            match h {
                Ok(s) => streams.push(s),
                Err(e) => log::warn!("cannot handle a stop signal: {e}"),
            }
        }
        if streams.is_empty() {
            // Without handlers only the emulator's end stops the VM.
            std::future::pending::<()>().await;
        }
        futures::future::select_all(streams.iter_mut().map(|s| Box::pin(s.recv()))).await;
    }
}

enum Failed {
    Serve(serve::ServeError),
    Run(vmaudit::runtime::run::RunError),
}
