//! vmaudit's own journal: an append-only JSON-lines file, one line per record, each line on
//! disk (fsync'd) before [`Journal::append`] returns, so that the caller reports an action
//! done only once its record is durable.
//!
//! Each line has `ts` (RFC 3339 UTC, milliseconds), `ts_ns` (Unix ns), `type`
//! (`VIRT_RESOURCE`), `type_id` (2501), `result` (`success`/`failed`), `text` (the exact audit
//! text, suffix and extras included), `kernel` (`sent`, `disabled`, `refused: EPERM`,
//! `not-requested`), then the record's facts, each omitted when absent: `virt`, `vm`, `uuid`,
//! `resrc` or `op`, `reason`, `mac`, `path`, `rdev` (`MAJ:MIN` decimal), `fd` (in vmaudit),
//! `emulator_fd` (in the emulator), `cgroup`, `class`, `category`, `maj` (decimal), `acl`,
//! `vm_pid`, `extra` (other extra fields).

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use thiserror::Error;

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
}

/// One line of a journal, as its readers (`verify`, `search`, `report`) tell them apart.
#[derive(Debug)]
pub enum Line {
    /// An audit record (`type` is its audit type name: `VIRT_RESOURCE`, ...).
    Record(Box<JournalEntry>),
    /// A verdict on a claim (`"type":"verdict"`).
    Verdict(Box<vmaudit_core::verdict::Verdict>),
    /// A line about the run itself (`"type":"monitor-summary"`, ...): lower-case `type`s are
    /// vmaudit's own, upper-case ones audit type names.
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

/// The journal file, open for appending (O_APPEND | O_CREAT | O_CLOEXEC, mode 0600).
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
}

impl Journal {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, JournalError> {
        let path = path.as_ref().to_owned();
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EACCES | libc::EPERM | libc::EROFS) => JournalError::Unwritable {
                    path: path.clone(),
                    source,
                },
                _ => JournalError::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        Ok(Self { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends the line for `record` in one write and fsyncs it; returns the line written.
    pub fn append(
        &mut self,
        record: &Record,
        kernel: &KernelOutcome,
    ) -> Result<JournalEntry, JournalError> {
        let entry = JournalEntry::new(record, kernel, std::time::SystemTime::now());
        self.append_entry(&entry)?;
        Ok(entry)
    }

    /// Appends a prepared line and fsyncs it.
    pub fn append_entry(&mut self, entry: &JournalEntry) -> Result<(), JournalError> {
        self.append_json(entry)
    }

    /// Appends any JSON line (a verdict) in one write and fsyncs it.
    pub fn append_json<T: serde::Serialize>(&mut self, value: &T) -> Result<(), JournalError> {
        self.append_all(std::slice::from_ref(value))
    }

    /// Appends several JSON lines in one write and one fsync (a batch of verdicts).
    pub fn append_all<T: serde::Serialize>(&mut self, values: &[T]) -> Result<(), JournalError> {
        if values.is_empty() {
            return Ok(());
        }
        let mut buf = String::new();
        for v in values {
            buf.push_str(&serde_json::to_string(v).expect("journal lines always serialise"));
            buf.push('\n');
        }
        self.file
            .write_all(buf.as_bytes())
            .map_err(|source| JournalError::Write {
                path: self.path.clone(),
                source,
            })?;
        self.file.sync_all().map_err(|source| JournalError::Sync {
            path: self.path.clone(),
            source,
        })
    }

    /// Every entry of the journal at `path`, in order. A last line without its newline is a
    /// write cut short (its `append` never returned success) and is skipped.
    pub fn read(path: impl AsRef<Path>) -> Result<Vec<JournalEntry>, JournalError> {
        let path = path.as_ref();
        let text = fs::read_to_string(path).map_err(|source| JournalError::Read {
            path: path.to_owned(),
            source,
        })?;
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                Line::parse(l).map_err(|source| JournalError::Parse {
                    path: path.to_owned(),
                    line: i + 1,
                    source,
                })
            })
            // Verdicts and lines about the run share the journal; they are not records.
            .filter_map(|l| match l {
                Ok(Line::Record(e)) => Some(Ok(*e)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use nix::errno::Errno;

    use super::*;
    use crate::audit::{
        ControlOp, NetChange, Record, StartReason, Uuid, VmIdent, sink::KernelOutcome,
    };

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
        let mut j = Journal::open(&path).unwrap();
        let a = j.append(&open, &KernelOutcome::Sent).unwrap();
        let b = j
            .append(&start, &KernelOutcome::Refused(Errno::EPERM))
            .unwrap();
        drop(j);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // Reopening appends.
        let mut j = Journal::open(&path).unwrap();
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
        let mut j = Journal::open(&path).unwrap();
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

    #[test]
    fn lines_are_records_verdicts_or_about_the_run_and_nothing_else() {
        let summary = r#"{"type":"monitor-summary","totals":{},"stats":{}}"#;
        assert!(matches!(Line::parse(summary), Ok(Line::Run(_))));
        // Other JSON is not a journal line, even with no `type` at all.
        assert!(Line::parse(r#"{"not": "a journal line"}"#).is_err());
        assert!(Line::parse(r#"{"type":"VIRT_CONTROL"}"#).is_err());
        assert!(Line::parse(r#"{"type":"verdict"}"#).is_err());
    }
}
