//! Where libvirt's records come from: the kernel's audit multicast group (read-only, beside
//! auditd), or an audit.log followed across rotation.

use std::{
    fs::File,
    io::{self, BufRead as _, BufReader, Seek as _, SeekFrom},
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
    /// The source failed; the monitor stops.
    Failed(String),
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
pub type Reading = Box<dyn FnOnce(mpsc::UnboundedSender<Line>, Arc<AtomicBool>) + Send>;

/// Opens the source now (so that a bad path or missing privilege fails before anything else
/// starts) and returns the thread body that reads it.
pub fn open(source: &Source) -> Result<Reading, SourceError> {
    match source {
        Source::Kernel => {
            let mut reader = Reader::open().map_err(SourceError::Kernel)?;
            Ok(Box::new(move |tx, stop| {
                let _ = tx.send(Line::CaughtUp);
                while !stop.load(Ordering::Relaxed) {
                    match reader.next_timeout(Duration::from_millis(100)) {
                        Ok(Some(r)) => {
                            let Some(name) =
                                vmaudit_core::audit::AuditType::from_id(r.kind).map(|t| t.name())
                            else {
                                continue;
                            };
                            if tx
                                .send(Line::Record(format!("type={name} msg={}", r.text)))
                                .is_err()
                            {
                                return;
                            }
                        }
                        Ok(None) => {}
                        Err(KernelError::Overrun) => {
                            log::warn!("the audit multicast socket overran: records were lost");
                        }
                        Err(e) => {
                            let _ = tx.send(Line::Failed(e.to_string()));
                            return;
                        }
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
                    match f.next_line() {
                        Ok(Some(l)) => {
                            if tx.send(Line::Record(l)).is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            if !caught_up {
                                caught_up = true;
                                let _ = tx.send(Line::CaughtUp);
                            }
                            std::thread::sleep(FOLLOW_POLL);
                        }
                        Err(e) => {
                            let _ = tx.send(Line::Failed(format!("{}: {e}", f.path.display())));
                            return;
                        }
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
}

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
        })
    }

    /// The next whole line, or None when there is none yet.
    fn next_line(&mut self) -> io::Result<Option<String>> {
        loop {
            let mut buf = Vec::new();
            let n = self.reader.read_until(b'\n', &mut buf)?;
            self.pos += n as u64;
            if n > 0 {
                self.partial.push_str(&String::from_utf8_lossy(&buf));
                if self.partial.ends_with('\n') {
                    let line = std::mem::take(&mut self.partial);
                    return Ok(Some(line.trim_end_matches('\n').to_owned()));
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
                        return Ok(Some(line));
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
        assert_eq!(f.next_line().unwrap().as_deref(), Some("one"));
        assert_eq!(f.next_line().unwrap(), None, "a partial line waits");
        w.write_all(b"o\n").unwrap();
        assert_eq!(f.next_line().unwrap().as_deref(), Some("two"));
        // Rotation: the old file renamed, a new one created at the path.
        w.write_all(b"three\n").unwrap();
        std::fs::rename(&log, dir.join("audit.log.1")).unwrap();
        std::fs::write(&log, "four\n").unwrap();
        assert_eq!(f.next_line().unwrap().as_deref(), Some("three"));
        assert_eq!(f.next_line().unwrap().as_deref(), Some("four"));
        // Truncation in place.
        std::fs::write(&log, "").unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(b"5\n")
            .unwrap();
        assert_eq!(f.next_line().unwrap().as_deref(), Some("5"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
