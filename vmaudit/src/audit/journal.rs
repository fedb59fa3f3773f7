//! vmaudit's own journal: an append-only JSON-lines file, one line per record, each line on
//! disk (fsync'd) before [`Journal::append`] returns, so that the caller reports an action
//! done only once its record is durable.
//!
//! Each line has `ts` (RFC 3339 UTC, milliseconds), `ts_ns` (Unix ns), `type`
//! (`VIRT_RESOURCE`), `type_id` (2501), `result` (`success`/`failed`), `text` (the exact audit
//! text, suffix and extras included), `kernel` (`sent`, `disabled`, `refused: EPERM`,
//! `queued`, `not-requested`), then the record's facts, each omitted when absent: `virt`, `vm`,
//! `uuid`, `resrc` or `op`, `reason`, `mac`, `path`, `rdev` (`MAJ:MIN` decimal), `fd` (in
//! vmaudit), `emulator_fd` (in the emulator), `cgroup`, `class`, `category`, `maj` (decimal),
//! `acl`, `vm_pid`, `extra` (other extra fields); and last, on every line (records, verdicts,
//! events alike), `seq` and `prev`: the hash chain ([`super::chain`]).
//!
//! Crash safety: a line is written in one `write` with O_APPEND; a write that fails is cut back
//! off the file; a last line left torn by a crash is cut back to the last newline when the
//! journal is next opened, and that repair is itself journaled (`journal-repaired`). A journal
//! deleted, replaced (rotated) or truncated under vmaudit is noticed before the next write (the
//! path's inode is checked before each batch), reopened by name, and that is journaled
//! (`journal-reopened`, the first line of the new file). One process writes a journal at a time
//! (an exclusive `flock`); within a process every `Journal` of one file shares one chain.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
};

use nix::fcntl::{Flock, FlockArg};
use serde_json::{Value, json};
use thiserror::Error;

use super::chain::{self, EVENT_TYPE, GENESIS};
pub use vmaudit_core::audit::JournalEntry;
use vmaudit_core::audit::{KernelOutcome, Record};

/// What went wrong with the journal; every variant names the file.
#[derive(Debug, Error)]
pub enum JournalError {
    #[error("journal {path} is not writable")]
    Unwritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open journal {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal {path} is being written by another process")]
    Busy { path: PathBuf },
    #[error("cannot repair the torn last line of journal {path}")]
    Repair {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot append to journal {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot fsync journal {path}")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read journal {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal {path}, line {line}: not a journal entry")]
    Parse {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("the journal writer of {path} panicked while writing")]
    Poisoned { path: PathBuf },
}

/// One line of a journal, as its readers (`verify`, `search`, `report`) tell them apart.
#[derive(Debug)]
pub enum Line {
    /// An audit record (`type` is its audit type name: `VIRT_RESOURCE`, ...).
    Record(Box<JournalEntry>),
    /// A verdict on a claim (`"type":"verdict"`).
    Verdict(Box<vmaudit_core::verdict::Verdict>),
    /// A line about the run itself (`"type":"monitor-summary"`, vmaudit's own events
    /// `"type":"vmaudit"`, ...): lower-case `type`s are vmaudit's own, upper-case ones audit
    /// type names.
    Run(serde_json::Value),
}

/// Which of the three a journal line says it is, by its `type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineKind {
    Record,
    Verdict,
    Run,
}

impl LineKind {
    /// `"verdict"`; another lower-case `type` is vmaudit's own (a line about the run);
    /// anything else is an audit record's type name.
    pub fn of(v: &serde_json::Value) -> Self {
        match v["type"].as_str() {
            Some("verdict") => Self::Verdict,
            Some(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') => {
                Self::Run
            }
            _ => Self::Record,
        }
    }
}

impl Line {
    /// Reads one line. Anything that is none of the three is an error: a file of other JSON is
    /// not a journal.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        let v: serde_json::Value = serde_json::from_str(text)?;
        match LineKind::of(&v) {
            LineKind::Verdict => Ok(Self::Verdict(Box::new(serde_json::from_value(v)?))),
            LineKind::Run => Ok(Self::Run(v)),
            LineKind::Record => Ok(Self::Record(Box::new(serde_json::from_value(v)?))),
        }
    }
}

/// The journal file, open for appending (O_APPEND | O_CREAT | O_CLOEXEC, mode 0600 when
/// vmaudit creates it). Clones share the file and its chain.
#[derive(Clone, Debug)]
pub struct Journal {
    w: Arc<Mutex<Writer>>,
    path: PathBuf,
}

/// The open file and where its chain stands.
#[derive(Debug)]
struct Writer {
    path: PathBuf,
    file: Flock<File>,
    /// (st_dev, st_ino) of the open file.
    id: (u64, u64),
    /// Bytes the file holds as far as this writer knows (it only grows by our writes).
    len: u64,
    /// The last line's `seq` (0: none yet).
    seq: u64,
    /// The last line's hash ([`GENESIS`] for an empty journal).
    last: String,
}

/// A file's (st_dev, st_ino) and its writer, if still open.
type OpenWriter = ((u64, u64), Weak<Mutex<Writer>>);

/// Every journal this process has open, so that two `Journal::open` of one file share one
/// chain (and one lock).
static OPEN: Mutex<Vec<OpenWriter>> = Mutex::new(Vec::new());

/// What opening found at the end of the file.
struct Opened {
    writer: Writer,
    /// (bytes cut, their hash) when a torn last line was cut off.
    repaired: Option<(u64, String)>,
}

impl Journal {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, JournalError> {
        let path = path.as_ref().to_owned();
        let file = create_or_open(&path)?;
        let meta = file.metadata().map_err(|source| JournalError::Open {
            path: path.clone(),
            source,
        })?;
        let id = (meta.dev(), meta.ino());
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(w) = open
            .iter()
            .find(|(k, _)| *k == id)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(Self { w, path });
        }
        let Opened { writer, repaired } = Writer::take(&path, file, 0, GENESIS.to_owned())?;
        let w = Arc::new(Mutex::new(writer));
        open.push((id, Arc::downgrade(&w)));
        drop(open);
        let j = Self { w, path };
        if let Some((cut, digest)) = repaired {
            log::warn!(
                "journal {}: cut off a torn last line ({cut} bytes) left by an interrupted write",
                j.path.display()
            );
            j.event(
                "journal-repaired",
                json!({ "cut_bytes": cut, "cut_sha256": digest }),
            )?;
        }
        Ok(j)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends the line for `record` in one write and fsyncs it; returns the line written.
    pub fn append(
        &self,
        record: &Record,
        kernel: &KernelOutcome,
    ) -> Result<JournalEntry, JournalError> {
        let entry = JournalEntry::new(record, kernel, std::time::SystemTime::now());
        self.append_entry(&entry)?;
        Ok(entry)
    }

    /// Appends a prepared line and fsyncs it.
    pub fn append_entry(&self, entry: &JournalEntry) -> Result<(), JournalError> {
        self.append_json(entry)
    }

    /// Appends any JSON line (a verdict) in one write and fsyncs it.
    pub fn append_json<T: serde::Serialize>(&self, value: &T) -> Result<(), JournalError> {
        self.append_all(std::slice::from_ref(value))
    }

    /// Appends several JSON lines in one write and one fsync (a batch of verdicts).
    pub fn append_all<T: serde::Serialize>(&self, values: &[T]) -> Result<(), JournalError> {
        if values.is_empty() {
            return Ok(());
        }
        let lines: Vec<String> = values
            .iter()
            .map(|v| serde_json::to_string(v).expect("journal lines always serialise"))
            .collect();
        self.writer()?.write_batch(lines)
    }

    /// Journals one of vmaudit's own events (`type` `vmaudit`, `event` NAME, then `fields`).
    pub fn event(&self, name: &str, fields: Value) -> Result<(), JournalError> {
        self.writer()?.write_batch(vec![event_line(name, fields)])
    }

    fn writer(&self) -> Result<std::sync::MutexGuard<'_, Writer>, JournalError> {
        self.w.lock().map_err(|_| JournalError::Poisoned {
            path: self.path.clone(),
        })
    }

    /// Every record of the journal at `path`, in order. Verdicts and vmaudit's events are not
    /// records and are left out; a last line without its newline is a write cut short (its
    /// `append` never returned success) and is skipped.
    pub fn read(path: impl AsRef<Path>) -> Result<Vec<JournalEntry>, JournalError> {
        let path = path.as_ref();
        let text = fs::read_to_string(path).map_err(|source| JournalError::Read {
            path: path.to_owned(),
            source,
        })?;
        let (lines, _torn) = chain::split(&text);
        let mut out = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            // Verdicts and lines about the run share the journal; they are not records.
            match Line::parse(l) {
                Ok(Line::Record(e)) => out.push(*e),
                Ok(_) => {}
                Err(source) => {
                    return Err(JournalError::Parse {
                        path: path.to_owned(),
                        line: i + 1,
                        source,
                    });
                }
            }
        }
        Ok(out)
    }
}

fn event_line(name: &str, fields: Value) -> String {
    let now = vmaudit_core::time::unix_now_ns();
    let mut v = json!({
        "type": EVENT_TYPE,
        "ts": vmaudit_core::time::rfc3339_ms(now),
        "ts_ns": now,
        "event": name,
    });
    if let (Some(obj), Value::Object(extra)) = (v.as_object_mut(), fields) {
        obj.extend(extra);
    }
    v.to_string()
}

/// Opens `path` for appending; a file vmaudit creates gets mode 0600 whatever the umask.
fn create_or_open(path: &Path) -> Result<File, JournalError> {
    let opts = |create_new: bool| {
        let mut o = OpenOptions::new();
        o.append(true)
            .read(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC);
        if create_new {
            o.create_new(true);
        }
        o
    };
    let err = |source: io::Error| match source.raw_os_error() {
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => JournalError::Unwritable {
            path: path.to_owned(),
            source,
        },
        _ => JournalError::Open {
            path: path.to_owned(),
            source,
        },
    };
    match opts(true).open(path) {
        Ok(f) => {
            f.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(err)?;
            Ok(f)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => opts(false).open(path).map_err(err),
        Err(e) => Err(err(e)),
    }
}

impl Writer {
    /// Locks `file`, cuts a torn last line, and finds where its chain stands; an empty file
    /// continues from (`seq`, `last`).
    fn take(path: &Path, file: File, seq: u64, last: String) -> Result<Opened, JournalError> {
        let mut file = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            if e == nix::errno::Errno::EWOULDBLOCK {
                JournalError::Busy {
                    path: path.to_owned(),
                }
            } else {
                JournalError::Open {
                    path: path.to_owned(),
                    source: e.into(),
                }
            }
        })?;
        let repair = |source| JournalError::Repair {
            path: path.to_owned(),
            source,
        };
        let meta = file.metadata().map_err(repair)?;
        let (len, repaired) = cut_torn(&mut file, meta.len()).map_err(repair)?;
        let (seq, last) = match last_line(&mut file, len).map_err(repair)? {
            Some(line) => {
                let v: Option<Value> = serde_json::from_str(&line).ok();
                let s = v.and_then(|v| v.get("seq")?.as_u64()).unwrap_or(0);
                (s, chain::hash(&line))
            }
            None => (seq, last),
        };
        Ok(Opened {
            writer: Self {
                path: path.to_owned(),
                id: (meta.dev(), meta.ino()),
                file,
                len,
                seq,
                last,
            },
            repaired,
        })
    }

    /// Writes `lines` (sealed into the chain) in one write and one fsync, after following the
    /// path if the file was moved, deleted or truncated.
    fn write_batch(&mut self, lines: Vec<String>) -> Result<(), JournalError> {
        self.follow_path()?;
        self.write_lines(lines)
    }

    /// Seals `lines` into the chain and writes them. A failed write is cut back off the file,
    /// and the chain stays where it was.
    fn write_lines(&mut self, lines: Vec<String>) -> Result<(), JournalError> {
        let (seq, last) = (self.seq, self.last.clone());
        let mut buf = String::new();
        for l in lines {
            self.seq += 1;
            let sealed = chain::seal(&l, self.seq, &self.last);
            self.last = chain::hash(&sealed);
            buf.push_str(&sealed);
            buf.push('\n');
        }
        let written = self
            .file
            .write_all(buf.as_bytes())
            .map_err(|source| JournalError::Write {
                path: self.path.clone(),
                source,
            })
            .and_then(|()| {
                self.file.sync_data().map_err(|source| JournalError::Sync {
                    path: self.path.clone(),
                    source,
                })
            });
        match written {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.seq = seq;
                self.last = last;
                if let Err(t) = self.file.set_len(self.len) {
                    log::error!(
                        "journal {}: cannot cut back a failed write: {t}",
                        self.path.display()
                    );
                }
                Err(e)
            }
        }
    }

    /// When the file at the journal's path is no longer the one open (deleted, or moved away
    /// and replaced) or was truncated, reopens it by name and journals why, as the first line
    /// of what follows.
    fn follow_path(&mut self) -> Result<(), JournalError> {
        let why = match fs::metadata(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => "gone",
            Ok(m) if (m.dev(), m.ino()) != self.id => "replaced",
            Ok(m) if m.len() < self.len => "truncated",
            _ => return Ok(()),
        };
        log::warn!(
            "journal {} was {why}: reopening it by name",
            self.path.display()
        );
        let (old_ino, old_seq) = (self.id.1, self.seq);
        let repair = |source| JournalError::Repair {
            path: self.path.clone(),
            source,
        };
        let repaired = if why == "truncated" {
            // The same file: go on with it, from what is left of it.
            let size = self.file.metadata().map_err(repair)?.len();
            let (len, repaired) = cut_torn(&mut self.file, size).map_err(repair)?;
            self.len = len;
            if let Some(line) = last_line(&mut self.file, len).map_err(repair)? {
                self.seq = serde_json::from_str::<Value>(&line)
                    .ok()
                    .and_then(|v| v.get("seq")?.as_u64())
                    .unwrap_or(0);
                self.last = chain::hash(&line);
            }
            repaired
        } else {
            let file = create_or_open(&self.path)?;
            let Opened { writer, repaired } =
                Self::take(&self.path, file, self.seq, self.last.clone())?;
            let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
            for (k, _) in open.iter_mut().filter(|(k, _)| *k == self.id) {
                *k = writer.id;
            }
            drop(open);
            *self = writer;
            repaired
        };
        let mut fields = json!({
            "reason": why,
            "path": self.path.display().to_string(),
            "previous_inode": old_ino,
            "previous_seq": old_seq,
        });
        if let Some((cut, digest)) = repaired {
            fields["cut_bytes"] = json!(cut);
            fields["cut_sha256"] = json!(digest);
        }
        self.write_lines(vec![event_line(chain::REOPENED, fields)])
    }
}

/// Cuts a last line without its newline off the file (`size` bytes long); returns the new
/// length and, if something was cut, how much and its hash.
fn cut_torn(file: &mut File, size: u64) -> io::Result<(u64, Option<(u64, String)>)> {
    if size == 0 || read_at(file, size - 1, 1)? == b"\n" {
        return Ok((size, None));
    }
    let keep = match rfind_newline(file, size)? {
        Some(at) => at + 1,
        None => 0,
    };
    let cut = read_at(file, keep, (size - keep) as usize)?;
    let digest = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&cut));
    file.set_len(keep)?;
    file.sync_data()?;
    Ok((keep, Some((size - keep, digest))))
}

/// The last complete line of a file whose `len` bytes end with a newline.
fn last_line(file: &mut File, len: u64) -> io::Result<Option<String>> {
    if len == 0 {
        return Ok(None);
    }
    let start = rfind_newline(file, len - 1)?.map_or(0, |at| at + 1);
    let bytes = read_at(file, start, (len - 1 - start) as usize)?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// The offset of the last `\n` before `end`, reading backwards in chunks.
fn rfind_newline(file: &mut File, end: u64) -> io::Result<Option<u64>> {
    const CHUNK: u64 = 64 * 1024;
    let mut hi = end;
    while hi > 0 {
        let lo = hi.saturating_sub(CHUNK);
        let buf = read_at(file, lo, (hi - lo) as usize)?;
        if let Some(i) = buf.iter().rposition(|b| *b == b'\n') {
            return Ok(Some(lo + i as u64));
        }
        hi = lo;
    }
    Ok(None)
}

fn read_at(file: &mut File, at: u64, n: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; n];
    file.seek(SeekFrom::Start(at))?;
    file.read_exact(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use nix::errno::Errno;

    use super::*;
    use crate::audit::{ControlOp, NetChange, StartReason, Uuid, VmIdent};

    /// A directory removed on drop.
    pub(crate) struct Scratch(pub PathBuf);

    impl Scratch {
        pub(crate) fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "vmaudit-unit-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn vm() -> VmIdent {
        VmIdent::new(
            "kvm",
            "guest1",
            Uuid::parse_str("c7a5fdbd-cdaf-9455-926a-d65c16db1809").unwrap(),
        )
    }

    #[test]
    fn round_trip() {
        let dir = Scratch::new("journal");
        let path = dir.0.join("vm.jsonl");
        let open = Record::net_open(&vm(), "52:54:00:aa:bb:cc", "/dev/net/tun".as_ref(), None)
            .fd(7)
            .emulator_fd(7)
            .extra("vmaudit-queue", "0")
            .build()
            .unwrap();
        let start = Record::control(&vm(), ControlOp::Start(StartReason::Booted), 99)
            .success(false)
            .build()
            .unwrap();
        let j = Journal::open(&path).unwrap();
        let a = j.append(&open, &KernelOutcome::Sent).unwrap();
        let b = j
            .append(&start, &KernelOutcome::Refused(Errno::EPERM))
            .unwrap();
        drop(j);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // Reopening appends.
        let j = Journal::open(&path).unwrap();
        let net = Record::net(&vm(), NetChange::Detach, "52:54:00:aa:bb:cc")
            .build()
            .unwrap();
        let c = j.append(&net, &KernelOutcome::Disabled).unwrap();
        assert_eq!(Journal::read(&path).unwrap(), vec![a.clone(), b.clone(), c]);

        assert_eq!(a.kind, "VIRT_RESOURCE");
        assert_eq!(a.type_id, 2501);
        assert_eq!(a.result, "success");
        assert_eq!(a.kernel, "sent");
        assert_eq!(a.text, open.text);
        assert_eq!(
            a.uuid.as_deref(),
            Some("c7a5fdbd-cdaf-9455-926a-d65c16db1809")
        );
        assert_eq!((a.fd, a.emulator_fd), (Some(7), Some(7)));
        assert_eq!(a.rdev, None);
        assert_eq!(a.extra.get("vmaudit-queue").map(String::as_str), Some("0"));
        assert_eq!(b.kind, "VIRT_CONTROL");
        assert_eq!(b.type_id, 2500);
        assert_eq!(b.result, "failed");
        assert_eq!(b.kernel, "refused: EPERM");
        assert_eq!((b.op.as_deref(), b.vm_pid), (Some("start"), Some(99)));
        assert!(b.ts.ends_with('Z') && b.ts.len() == 24, "{}", b.ts);

        // Absent facts are left out of the line.
        let text = fs::read_to_string(&path).unwrap();
        let second: serde_json::Value = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
        for absent in ["mac", "path", "rdev", "fd", "resrc", "cgroup", "extra"] {
            assert!(second.get(absent).is_none(), "{absent} in {second}");
        }
        assert_eq!(second["type"], "VIRT_CONTROL");
        assert_eq!(second["vm_pid"], 99);
    }

    #[test]
    fn torn_last_line_is_skipped_a_bad_line_is_not() {
        let dir = Scratch::new("torn");
        let path = dir.0.join("vm.jsonl");
        let rec = Record::net(&vm(), NetChange::Start, "52:54:00:aa:bb:cc")
            .build()
            .unwrap();
        let j = Journal::open(&path).unwrap();
        j.append(&rec, &KernelOutcome::NotRequested).unwrap();
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"ts\":\"20")
            .unwrap();
        assert_eq!(Journal::read(&path).unwrap().len(), 1);
        fs::write(&path, "{}\n").unwrap();
        assert!(matches!(
            Journal::read(&path),
            Err(JournalError::Parse { line: 1, .. })
        ));
    }

    fn events(path: &Path) -> Vec<Value> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| v["type"] == EVENT_TYPE)
            .collect()
    }

    fn record() -> Record {
        Record::net(&vm(), NetChange::Start, "52:54:00:aa:bb:cc")
            .build()
            .unwrap()
    }

    #[test]
    fn every_line_is_chained_across_handles_and_reopenings() {
        let dir = Scratch::new("chain");
        let path = dir.0.join("vm.jsonl");
        let a = Journal::open(&path).unwrap();
        let b = Journal::open(&path).unwrap();
        a.append(&record(), &KernelOutcome::Sent).unwrap();
        b.append_json(&serde_json::json!({"type": "monitor-summary"}))
            .unwrap();
        a.append(&record(), &KernelOutcome::Queued).unwrap();
        drop((a, b));
        let j = Journal::open(&path).unwrap();
        j.append(&record(), &KernelOutcome::Sent).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let r = chain::check(&text);
        assert!(r.intact(), "{r:?}\n{text}");
        assert_eq!(r.chained, 4);
        assert_eq!(Journal::read(&path).unwrap()[1].kernel, "queued");
    }

    #[test]
    fn another_process_cannot_write_the_same_journal() {
        let dir = Scratch::new("busy");
        let path = dir.0.join("vm.jsonl");
        let _j = Journal::open(&path).unwrap();
        // Another open file description of the same file, as another process would have.
        let other = File::open(&path).unwrap();
        assert!(Flock::lock(other, FlockArg::LockExclusiveNonblock).is_err());
    }

    #[test]
    fn a_torn_last_line_is_cut_back_and_the_repair_journaled() {
        let dir = Scratch::new("repair");
        let path = dir.0.join("vm.jsonl");
        let j = Journal::open(&path).unwrap();
        j.append(&record(), &KernelOutcome::Sent).unwrap();
        drop(j);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"ts\":\"20").unwrap();
        drop(f);
        let j = Journal::open(&path).unwrap();
        j.append(&record(), &KernelOutcome::Sent).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains("{\"ts\":\"20{"), "{text}");
        let ev = events(&path);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0]["event"], "journal-repaired");
        assert_eq!(ev[0]["cut_bytes"], 9);
        assert!(chain::check(&text).intact());
        assert_eq!(Journal::read(&path).unwrap().len(), 2);
    }

    #[test]
    fn a_rotated_deleted_or_truncated_journal_is_reopened_and_said() {
        let dir = Scratch::new("rotate");
        let path = dir.0.join("vm.jsonl");
        let j = Journal::open(&path).unwrap();
        j.append(&record(), &KernelOutcome::Sent).unwrap();
        // Rotated as logrotate does it: moved aside, a new file created.
        fs::rename(&path, dir.0.join("vm.jsonl.1")).unwrap();
        File::create(&path).unwrap();
        j.append(&record(), &KernelOutcome::Sent).unwrap();
        let ev = events(&path);
        assert_eq!(ev[0]["event"], chain::REOPENED);
        assert_eq!(ev[0]["reason"], "replaced");
        assert_eq!(ev[0]["previous_seq"], 1);
        let text = fs::read_to_string(&path).unwrap();
        assert!(chain::check(&text).intact(), "{text}");
        assert_eq!(
            fs::read_to_string(dir.0.join("vm.jsonl.1"))
                .unwrap()
                .lines()
                .count(),
            1
        );

        fs::remove_file(&path).unwrap();
        j.append(&record(), &KernelOutcome::Sent).unwrap();
        assert_eq!(events(&path)[0]["reason"], "gone");

        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(0).unwrap();
        j.append(&record(), &KernelOutcome::Sent).unwrap();
        let ev = events(&path);
        assert_eq!(ev[0]["reason"], "truncated");
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(chain::check(&text).intact(), "{text}");
    }

    #[test]
    fn lines_are_records_verdicts_or_about_the_run_and_nothing_else() {
        let summary = r#"{"type":"monitor-summary","totals":{},"stats":{}}"#;
        assert!(matches!(Line::parse(summary), Ok(Line::Run(_))));
        let event = r#"{"type":"vmaudit","event":"journal-repaired"}"#;
        assert!(matches!(Line::parse(event), Ok(Line::Run(_))));
        // Other JSON is not a journal line, even with no `type` at all.
        assert!(Line::parse(r#"{"not": "a journal line"}"#).is_err());
        assert!(Line::parse(r#"{"type":"VIRT_CONTROL"}"#).is_err());
        assert!(Line::parse(r#"{"type":"verdict"}"#).is_err());
    }

    #[test]
    fn open_errors_name_the_path() {
        let e = Journal::open("/nonexistent-dir/vm.jsonl").unwrap_err();
        assert!(matches!(e, JournalError::Open { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "cannot open journal /nonexistent-dir/vm.jsonl"
        );
        // sysfs refuses to create files, even to root.
        let e = Journal::open("/sys/vmaudit-journal.jsonl").unwrap_err();
        assert!(matches!(e, JournalError::Unwritable { .. }), "{e:?}");
        assert!(e.to_string().contains("/sys/vmaudit-journal.jsonl"));
        assert!(matches!(
            Journal::read("/nonexistent-dir/vm.jsonl"),
            Err(JournalError::Read { .. })
        ));
    }
}
