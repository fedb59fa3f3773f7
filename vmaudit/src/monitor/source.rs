//! Where libvirt's records come from: the kernel's audit multicast group (read-only, beside
//! auditd), or an audit.log followed across rotation.

use std::{
    io,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;

use crate::{
    audit::{kernel::KernelError, reader::Reader},
    follow::{Follow, TooLong},
};

/// What the source thread sends.
#[derive(Debug)]
pub enum Line {
    /// One audit.log line (`type=... msg=audit(...): ...`).
    Record(String),
    /// Everything that was in the log when vmaudit started has been read.
    CaughtUp,
    /// Records were lost on the way (`enobufs`: the multicast socket overran) or a line was
    /// not kept (`too_long`).
    Lost(&'static str),
    /// The source failed; the monitor stops.
    Failed(String),
}

/// How many lines may wait for the monitor; a reader that finds it full waits (and the
/// waits are counted: the kernel then queues, or drops and says so).
pub const QUEUE: usize = 8192;

/// The longest audit.log line kept (the kernel caps a record's text at 8970 bytes).
const MAX_LINE: usize = 64 * 1024;

/// Where lines go, and how often the reader had to wait for room.
pub struct Sink {
    pub tx: mpsc::Sender<Line>,
    pub waits: Arc<std::sync::atomic::AtomicU64>,
}

impl Sink {
    /// Sends a line, waiting for room if need be; false when the monitor is gone.
    fn send(&self, line: Line) -> bool {
        match self.tx.try_send(line) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(line)) => {
                self.waits.fetch_add(1, Ordering::Relaxed);
                self.tx.blocking_send(line).is_ok()
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Where to read.
#[derive(Clone, Debug)]
pub enum Source {
    Kernel,
    File { path: PathBuf, from_start: bool },
}

/// How often a followed log is looked at when it has nothing new (like `tail -F`).
const FOLLOW_POLL: Duration = Duration::from_millis(50);

/// The body of the thread that reads an open source: lines to the sender until the flag is set.
pub type Reading = Box<dyn FnOnce(Sink, Arc<AtomicBool>) + Send>;

/// Opens the source now (so that a bad path or missing privilege fails before anything else
/// starts) and returns the thread body that reads it.
pub fn open(source: &Source) -> Result<Reading, SourceError> {
    match source {
        Source::Kernel => {
            let mut reader = Reader::open().map_err(SourceError::Kernel)?;
            Ok(Box::new(move |tx, stop| {
                tx.send(Line::CaughtUp);
                while !stop.load(Ordering::Relaxed) {
                    let line = match reader.next_timeout(Duration::from_millis(100)) {
                        // Every type: the serial numbers of all of them show what was lost.
                        Ok(Some(r)) => Line::Record(format!(
                            "type={} msg={}",
                            vmaudit_core::audit::type_name(r.kind),
                            r.text
                        )),
                        Ok(None) => continue,
                        Err(KernelError::Overrun) => Line::Lost("enobufs"),
                        Err(e) => {
                            tx.send(Line::Failed(e.to_string()));
                            return;
                        }
                    };
                    if !tx.send(line) {
                        return;
                    }
                }
            }))
        }
        Source::File { path, from_start } => {
            let mut f = Follow::open(path.clone(), *from_start, MAX_LINE).map_err(|source| {
                SourceError::Log {
                    path: path.clone(),
                    source,
                }
            })?;
            Ok(Box::new(move |tx, stop| {
                let mut caught_up = false;
                while !stop.load(Ordering::Relaxed) {
                    let line = match f.next_line() {
                        Ok(Some(Ok(l))) => Line::Record(l),
                        Ok(Some(Err(TooLong))) => Line::Lost("too_long"),
                        Ok(None) => {
                            if !caught_up {
                                caught_up = true;
                                tx.send(Line::CaughtUp);
                            }
                            std::thread::sleep(FOLLOW_POLL);
                            continue;
                        }
                        Err(e) => {
                            tx.send(Line::Failed(format!("{}: {e}", f.path().display())));
                            return;
                        }
                    };
                    if !tx.send(line) {
                        return;
                    }
                }
            }))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read the kernel audit log (multicast group)")]
    Kernel(#[source] KernelError),
    #[error("cannot read audit log {}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
