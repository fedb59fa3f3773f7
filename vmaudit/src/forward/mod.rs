//! `vmaudit forward`: journals followed by name (across rotation and truncation, as
//! [`crate::follow`] does) and each line sent as one RFC 5424 syslog message.
//!
//! - [`message`]: a line as a message (severity, MSGID, structured data, the line as MSG).
//! - [`target`]: the receiver (UDP, TCP, a unix datagram socket) and the connection to it.
//! - [`state`]: how far each journal was forwarded, for a restart to resume there.
//!
//! No line is skipped without a stderr line saying so: a send that fails over TCP or a unix
//! socket is retried with backoff until it succeeds or vmaudit is stopped; one that fails over
//! UDP, a line too long to keep, a journal rotated away while vmaudit was stopped, and lines
//! read but not sent when it stops, are each said on stderr.

pub mod message;
pub mod state;
pub mod target;

use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use fasyslog::Facility;
use tokio::sync::{mpsc, watch};

use self::{
    message::Formatter,
    state::{State, StateError},
    target::{Sender, Target},
};
use crate::{
    exit,
    follow::{Follow, Position, Resumed, TooLong},
};

/// The longest journal line forwarded (a verdict with much evidence is some kilobytes).
pub const MAX_LINE: usize = 1 << 20;
/// Lines read ahead of the sender.
const QUEUE: usize = 1024;
/// How often a followed journal is looked at when it has nothing new (like `tail -F`).
const POLL: Duration = Duration::from_millis(50);
/// The state is saved when the sender has caught up, and at least this often in a burst.
const SAVE_EVERY: Duration = Duration::from_secs(1);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct ForwardOptions {
    pub journals: Vec<PathBuf>,
    /// Read each journal from its start (else from its end), unless the state has it.
    pub from_start: bool,
    pub target: Target,
    pub facility: Facility,
    pub state: Option<PathBuf>,
}

/// What was forwarded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub sent: u64,
    /// Lost in sending (UDP), each said on stderr.
    pub not_sent: u64,
    /// Longer than [`MAX_LINE`], each said on stderr.
    pub too_long: u64,
    /// Read but not sent when vmaudit was stopped (a `--state` resumes at the first).
    pub unsent_at_stop: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot read journal {}", path.display())]
    Journal {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

impl ForwardError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Journal { .. } => exit::JOURNAL,
            Self::State(_) => exit::FORWARD,
        }
    }
}

/// What a journal's reader sends.
struct Read {
    journal: usize,
    /// Where the line starts and where the next one does.
    start: Position,
    end: Position,
    got: Got,
}

enum Got {
    Line(String),
    TooLong,
    Failed(io::Error),
}

/// One journal: its path as given, and as the state knows it (absolute).
struct Journal {
    path: PathBuf,
    key: PathBuf,
}

/// Forwards every line the journals get until `shutdown` resolves; `ready` is called once
/// every journal is open.
pub async fn forward(
    opts: ForwardOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(),
) -> Result<Outcome, ForwardError> {
    let mut state = match &opts.state {
        Some(p) => State::load(p)?,
        None => State::default(),
    };
    let (journals, follows) = open_all(&opts, &state)?;
    let mut positions: Vec<Position> = follows.iter().map(Follow::position).collect();
    save(&opts, &mut state, &journals, &positions)?;

    let stop_reading = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let readers: Vec<_> = follows
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let (tx, stop) = (tx.clone(), stop_reading.clone());
            std::thread::spawn(move || read(i, f, &tx, &stop))
        })
        .collect();
    drop(tx);
    let (stop_tx, mut stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    ready();

    let mut sender = Sender::new(opts.target.clone());
    let formatter = Formatter::new(opts.facility);
    let mut out = Outcome::default();
    let mut saved = Instant::now();
    let failed = loop {
        let r = tokio::select! {
            _ = stop.wait_for(|s| *s) => break None,
            r = rx.recv() => match r {
                Some(r) => r,
                None => break None,
            },
        };
        let path = journals[r.journal].path.display();
        match r.got {
            Got::Line(line) => {
                match deliver(&mut sender, &formatter.format(&line), &mut stop).await {
                    Delivery::Sent => out.sent += 1,
                    Delivery::Dropped(e) => {
                        out.not_sent += 1;
                        log::warn!(
                            "forward: {}: the line of {path} at byte {} was not sent: {e}",
                            opts.target,
                            r.start.offset
                        );
                    }
                    Delivery::Stopped => {
                        out.unsent_at_stop += 1;
                        break None;
                    }
                }
            }
            Got::TooLong => {
                out.too_long += 1;
                log::warn!(
                    "forward: {path}: the line at byte {} is longer than {MAX_LINE} bytes: not forwarded",
                    r.start.offset
                );
            }
            Got::Failed(source) => {
                break Some(ForwardError::Journal {
                    path: journals[r.journal].path.clone(),
                    source,
                });
            }
        }
        positions[r.journal] = r.end;
        if rx.is_empty() || saved.elapsed() >= SAVE_EVERY {
            save(&opts, &mut state, &journals, &positions)?;
            saved = Instant::now();
        }
    };

    // Stopping: the readers end (a full queue no longer holds them), what they read and was
    // not sent is counted, and the positions of the lines sent are saved.
    stop_reading.store(true, Ordering::Relaxed);
    rx.close();
    for r in readers {
        let _ = r.join();
    }
    while let Ok(r) = rx.try_recv() {
        if matches!(r.got, Got::Line(_)) {
            out.unsent_at_stop += 1;
        }
    }
    save(&opts, &mut state, &journals, &positions)?;
    if out.unsent_at_stop > 0 {
        let then = if opts.state.is_some() {
            "the state file resumes at the first of them"
        } else {
            "they are not forwarded (--state FILE would resume there)"
        };
        log::warn!(
            "forward: stopped with {} lines read and not sent: {then}",
            out.unsent_at_stop
        );
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Opens every journal, where the state says it was forwarded up to, or at its end (start
/// with `from_start`).
fn open_all(
    opts: &ForwardOptions,
    state: &State,
) -> Result<(Vec<Journal>, Vec<Follow>), ForwardError> {
    let mut journals = Vec::new();
    let mut follows = Vec::new();
    for path in &opts.journals {
        let key = std::path::absolute(path).unwrap_or_else(|_| path.clone());
        let failed = |source| ForwardError::Journal {
            path: path.clone(),
            source,
        };
        let follow = match state.get(&key) {
            Some(at) => {
                let (f, how) = Follow::resume(path.clone(), at, MAX_LINE).map_err(failed)?;
                say_resumed(path, at, &how);
                f
            }
            None => Follow::open(path.clone(), opts.from_start, MAX_LINE).map_err(failed)?,
        };
        journals.push(Journal {
            path: path.clone(),
            key,
        });
        follows.push(follow);
    }
    Ok((journals, follows))
}

fn say_resumed(path: &Path, at: Position, how: &Resumed) {
    let (path, n) = (path.display(), at.offset);
    match how {
        Resumed::InPlace => {}
        Resumed::Rotated(old) => log::info!(
            "forward: {path}: resuming in {} (rotated) at byte {n}, then {path}",
            old.display()
        ),
        Resumed::Truncated => log::warn!(
            "forward: {path}: truncated below byte {n}, where forwarding stopped: \
             what it held after byte {n} is not forwarded; forwarding it from its start"
        ),
        Resumed::Gone => log::warn!(
            "forward: {path}: the file forwarded up to byte {n} is no longer beside it \
             (rotated away): its lines after byte {n} are not forwarded; forwarding {path} from \
             its start"
        ),
    }
}

fn save(
    opts: &ForwardOptions,
    state: &mut State,
    journals: &[Journal],
    positions: &[Position],
) -> Result<(), StateError> {
    let Some(file) = &opts.state else {
        return Ok(());
    };
    for (j, at) in journals.iter().zip(positions) {
        state.set(&j.key, *at);
    }
    state.save(file)
}

/// The body of a journal's reader thread: each line (or what went wrong) to the sender, until
/// the flag is set or the sender is gone.
fn read(journal: usize, mut f: Follow, tx: &mpsc::Sender<Read>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let start = f.position();
        let got = match f.next_line() {
            Ok(Some(Ok(line))) => Got::Line(line),
            Ok(Some(Err(TooLong))) => Got::TooLong,
            Ok(None) => {
                std::thread::sleep(POLL);
                continue;
            }
            Err(e) => Got::Failed(e),
        };
        let last = matches!(got, Got::Failed(_));
        let r = Read {
            journal,
            start,
            end: f.position(),
            got,
        };
        if tx.blocking_send(r).is_err() || last {
            return;
        }
    }
}

enum Delivery {
    Sent,
    /// Not sent, and not to be tried again (UDP).
    Dropped(io::Error),
    /// vmaudit is stopping before it could be sent.
    Stopped,
}

/// Sends one message; over TCP or a unix socket, tries again with backoff until it is sent or
/// vmaudit stops, saying on stderr when the receiver fails and when it takes messages again.
async fn deliver(sender: &mut Sender, msg: &str, stop: &mut watch::Receiver<bool>) -> Delivery {
    let mut wait = BACKOFF_FIRST;
    let mut failing = false;
    loop {
        let sent = tokio::select! {
            sent = sender.send(msg) => sent,
            _ = stop.wait_for(|s| *s) => return Delivery::Stopped,
        };
        let target = sender.target();
        match sent {
            Ok(()) => {
                if failing {
                    log::info!("forward: {target}: sending again");
                }
                return Delivery::Sent;
            }
            Err(e) if !target.retries() => return Delivery::Dropped(e),
            Err(e) => {
                if !failing {
                    log::warn!(
                        "forward: {target}: {e}; trying again (no line is skipped; \
                         one sent just before may not have arrived)"
                    );
                    failing = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => return Delivery::Stopped,
                }
                wait = (wait * 2).min(BACKOFF_MAX);
            }
        }
    }
}
