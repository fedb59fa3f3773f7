//! `vmaudit watch`: stream a process's fd events from the kernel, and with `--serve` show
//! them on the dashboard.

use std::{io::Write as _, sync::Arc};

use vmaudit::{
    exit,
    observe::{
        ObserveError, Output, Sink, Summary, WatchOptions, Watcher, flushed,
        loader::TrackerOptions, table::FdRecord,
    },
    procfs::ProcFs,
    serve::{self, Hub, ServeError},
    verify::observer::Observer as _,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The process to watch (repeat for several).
    #[arg(long, required = true)]
    pid: Vec<u32>,
    /// Also watch children the process forks from now on (not threads), transitively.
    #[arg(long)]
    follow_children: bool,
    /// Size of the kernel's event ring buffer in bytes (a power of two, at least 4096).
    #[arg(long, default_value_t = vmaudit_common::DEFAULT_RING_BYTES, value_parser = parse_ring)]
    ring_buffer_bytes: u32,
    /// Serve the dashboard of the watched processes (their fd tables, fd events and lost
    /// events per second), /metrics (Prometheus), /api/state and /events (SSE) over HTTP on
    /// ADDR (IP:PORT, or a PORT on 127.0.0.1; port 0 picks a free one).
    #[arg(long, value_name = "ADDR", num_args = 0..=1,
          default_missing_value = super::run::DEFAULT_SERVE)]
    serve: Option<String>,
}

pub fn parse_ring(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err("must be a power of two of at least 4096".into());
    }
    Ok(n)
}

/// JSON lines on stdout, gathered in one buffer and written once per batch of kernel events
/// (or once the buffer holds [`JsonLines::WRITE_AT`] bytes, so memory stays flat).
pub struct JsonLines {
    out: std::io::Stdout,
    /// The batch's lines, each appended in place: no allocation and no copy per record.
    buf: Vec<u8>,
    /// The first write that failed: nothing is written after it, and the next flush returns it.
    failed: Option<std::io::Error>,
}

impl JsonLines {
    /// The most bytes a batch holds before they are written.
    const WRITE_AT: usize = 1 << 16;

    pub fn stdout() -> Self {
        Self {
            out: std::io::stdout(),
            buf: Vec::with_capacity(Self::WRITE_AT + 4096),
            failed: None,
        }
    }

    fn end_line(&mut self) {
        self.buf.push(b'\n');
        if self.buf.len() >= Self::WRITE_AT {
            self.write_batch();
        }
    }

    /// Writes the batch's whole lines (so stdout's own line buffer passes them straight
    /// through), or keeps the first error for [`Sink::flush`] to return.
    fn write_batch(&mut self) {
        if self.failed.is_none()
            && let Err(e) = self
                .out
                .write_all(&self.buf)
                .and_then(|()| self.out.flush())
        {
            self.failed = Some(e);
        }
        self.buf.clear();
    }
}

impl Sink for JsonLines {
    fn record(&mut self, out: Output) {
        match &out {
            // An fd record per kernel event: its direct writer (the same bytes as serde's).
            Output::Fd(r) => r.write_json(&mut self.buf),
            // Writing to a `Vec` cannot fail, and a gap serializes (a test writes them all).
            Output::Gap(_) => serde_json::to_writer(&mut self.buf, &out)
                .expect("a gap record serializes into memory"),
        }
        self.end_line();
    }
    fn records(&mut self, batch: &mut Vec<FdRecord>) {
        for r in batch.iter() {
            r.write_json(&mut self.buf);
            self.end_line();
        }
        batch.clear();
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.write_batch();
        match &self.failed {
            Some(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            None => Ok(()),
        }
    }
}

/// A sink that also tells the dashboard's hub.
struct Tee<'a> {
    sink: &'a mut dyn Sink,
    hub: Option<Arc<Hub>>,
}

impl Sink for Tee<'_> {
    fn record(&mut self, out: Output) {
        match (&self.hub, &out) {
            (Some(hub), Output::Fd(r)) => hub.fd(r),
            (Some(hub), Output::Gap(g)) => hub.gap(g),
            (None, _) => {}
        }
        self.sink.record(out);
    }
    fn records(&mut self, batch: &mut Vec<FdRecord>) {
        if let Some(hub) = &self.hub {
            batch.iter().for_each(|r| hub.fd(r));
        }
        self.sink.records(batch);
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.sink.flush()
    }
}

enum Failed {
    Serve(ServeError),
    Watch(ObserveError),
}

fn runtime() -> Result<tokio::runtime::Runtime, ObserveError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ObserveError::Poll { source })
}

pub fn run(args: Args) -> u8 {
    let opts = WatchOptions {
        pids: args.pid.clone(),
        follow_children: args.follow_children,
        tracker: TrackerOptions {
            ring_bytes: args.ring_buffer_bytes,
        },
        ignore_tids: Vec::new(),
    };
    let mut sink = JsonLines::stdout();
    let result = runtime().map_err(Failed::Watch).and_then(|rt| {
        rt.block_on(async {
            // Bound before the tracker loads: a bad address leaves nothing behind.
            let server = match &args.serve {
                Some(addr) => {
                    Some(serve::serve(addr, Hub::for_processes()).map_err(Failed::Serve)?)
                }
                None => None,
            };
            let mut tee = Tee {
                sink: &mut sink,
                hub: server.as_ref().map(|s| s.hub().clone()),
            };
            watch_on(&opts, &mut tee).await.map_err(Failed::Watch)
        })
    });
    let output = |source| Failed::Watch(ObserveError::Output { source });
    let result = match (result, sink.flush()) {
        (Ok(summary), Ok(())) => super::print_json(&summary)
            .map(|()| summary)
            .map_err(output),
        (Ok(_), Err(e)) => Err(output(e)),
        // The output's failure was said once already.
        (Err(failed @ Failed::Watch(ObserveError::Output { .. })), _) | (Err(failed), Ok(())) => {
            Err(failed)
        }
        (Err(failed), Err(e)) => {
            log::warn!("the records before the failure could not be written to stdout either: {e}");
            Err(failed)
        }
    };
    match result {
        Ok(summary) => {
            if summary.ended == "exited" {
                let pids: Vec<String> = args.pid.iter().map(u32::to_string).collect();
                vmaudit::notice!("watched process {} exited", pids.join(", "));
                exit::TARGET_EXITED
            } else {
                exit::OK
            }
        }
        Err(Failed::Serve(e)) => super::fail(&e, e.exit_code()),
        Err(Failed::Watch(e)) => super::fail(&e, e.exit_code()),
    }
}

/// Starts the watcher, says so on stderr, and runs it until SIGINT/SIGTERM or the end of
/// every watched process.
pub fn watch(opts: &WatchOptions, sink: &mut dyn Sink) -> Result<Summary, ObserveError> {
    runtime()?.block_on(watch_on(opts, sink))
}

/// [`watch`] on the current tokio runtime.
async fn watch_on(opts: &WatchOptions, sink: &mut dyn Sink) -> Result<Summary, ObserveError> {
    let shutdown = shutdown_signal();
    let watcher = Watcher::start(opts, ProcFs::default(), sink)?;
    flushed(sink)?;
    let held: usize = opts
        .pids
        .iter()
        .filter_map(|p| watcher.tables().get(*p))
        .map(|t| t.fds.len())
        .sum();
    // Tests and scripts wait for this line before making the watched process act.
    vmaudit::notice!("watching pid {:?} ({held} fds)", opts.pids);
    watcher.run(sink, shutdown).await
}

/// Resolves on the first SIGINT or SIGTERM. Call it inside the runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Registered now, not when first polled: a signal that comes before the future is awaited
    // must not take the default action (ending vmaudit without its clean-up).
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        let (Ok(mut int), Ok(mut term)) = handlers else {
            // Without signal handlers only the watched processes' exit ends the watch.
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
}
