//! Where libvirt's records come from: the kernel's audit multicast group (read-only, beside
//! auditd), or an audit.log followed across rotation.

use std::{
    fs::File,
    io::{self, BufRead as _, BufReader, Read as _, Seek as _, SeekFrom},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;

use crate::audit::{kernel::KernelError, reader::Reader};

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
            let mut f =
                Follow::open(path.clone(), *from_start).map_err(|source| SourceError::Log {
                    path: path.clone(),
                    source,
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
                            tx.send(Line::Failed(format!("{}: {e}", f.path.display())));
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

/// An audit.log followed by name: when the file at the path is replaced (rotated) or
/// truncated, the rest of the old one is read, then the new one from its start.
struct Follow {
    path: PathBuf,
    reader: BufReader<File>,
    ino: u64,
    pos: u64,
    partial: String,
    /// Skipping the rest of a line longer than [`MAX_LINE`].
    too_long: bool,
}

/// A line longer than any audit record, skipped.
#[derive(Debug, PartialEq, Eq)]
pub struct TooLong;

impl Follow {
    fn open(path: PathBuf, from_start: bool) -> io::Result<Self> {
        let mut file = File::open(&path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        let pos = if from_start {
            0
        } else {
            file.seek(SeekFrom::End(0))?
        };
        Ok(Self {
            path,
            reader: BufReader::new(file),
            ino: meta.ino(),
            pos,
            partial: String::new(),
            too_long: false,
        })
    }

    /// The next whole line (or that it was longer than any record), or None when there is
    /// none yet. A line's memory is bounded: past [`MAX_LINE`] the rest of it is skipped.
    fn next_line(&mut self) -> io::Result<Option<Result<String, TooLong>>> {
        loop {
            let mut buf = Vec::new();
            let n = (&mut self.reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut buf)?;
            self.pos += n as u64;
            if n > 0 {
                let whole = buf.ends_with(b"\n");
                if self.too_long || self.partial.len() + buf.len() > MAX_LINE {
                    self.partial.clear();
                    self.too_long = !whole;
                    if whole {
                        return Ok(Some(Err(TooLong)));
                    }
                    continue;
                }
                self.partial.push_str(&String::from_utf8_lossy(&buf));
                if whole {
                    let line = std::mem::take(&mut self.partial);
                    return Ok(Some(Ok(line.trim_end_matches('\n').to_owned())));
                }
                continue;
            }
            // At the end: has the path moved on (rotation) or been truncated?
            match std::fs::metadata(&self.path) {
                Ok(m) if m.ino() != self.ino => {
                    let file = File::open(&self.path)?;
                    self.ino = file.metadata()?.ino();
                    self.reader = BufReader::new(file);
                    self.pos = 0;
                    if !self.partial.is_empty() {
                        // The old file ended without a newline: that line is whole.
                        let line = std::mem::take(&mut self.partial);
                        return Ok(Some(Ok(line)));
                    }
                    continue;
                }
                Ok(m) if m.len() < self.pos => {
                    self.reader.seek(SeekFrom::Start(0))?;
                    self.pos = 0;
                    self.partial.clear();
                    continue;
                }
                // Gone for now (between a rename and the new file's creation): wait.
                _ => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn a_followed_log_is_read_across_rotation_and_truncation() {
        let dir = std::env::temp_dir().join(format!("vmaudit-follow-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("audit.log");
        std::fs::write(&log, "old\n").unwrap();
        let mut f = Follow::open(log.clone(), false).unwrap();
        assert_eq!(f.next_line().unwrap(), None, "starts at the end");
        let mut w = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        w.write_all(b"one\ntw").unwrap();
        assert_eq!(f.next_line().unwrap(), Some(Ok("one".into())));
        assert_eq!(f.next_line().unwrap(), None, "a partial line waits");
        w.write_all(b"o\n").unwrap();
        assert_eq!(f.next_line().unwrap(), Some(Ok("two".into())));
        // Rotation: the old file renamed, a new one created at the path.
        w.write_all(b"three\n").unwrap();
        std::fs::rename(&log, dir.join("audit.log.1")).unwrap();
        std::fs::write(&log, "four\n").unwrap();
        assert_eq!(f.next_line().unwrap(), Some(Ok("three".into())));
        assert_eq!(f.next_line().unwrap(), Some(Ok("four".into())));
        // Truncation in place.
        std::fs::write(&log, "").unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(b"5\n")
            .unwrap();
        assert_eq!(f.next_line().unwrap(), Some(Ok("5".into())));
        // A line longer than any record is skipped, and the next one read.
        let mut w = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        w.write_all(&vec![b'x'; 3 * MAX_LINE]).unwrap();
        w.write_all(b"\nsix\n").unwrap();
        assert_eq!(f.next_line().unwrap(), Some(Err(TooLong)));
        assert_eq!(f.next_line().unwrap(), Some(Ok("six".into())));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
