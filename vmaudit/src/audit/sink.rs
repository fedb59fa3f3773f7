//! Where records go: the kernel audit subsystem, vmaudit's journal, or both.
//!
//! In `both` mode a record is sent to the kernel first, then its journal line, which carries
//! the kernel's verdict (`sent`, `disabled`, `refused: EPERM`), is appended and fsync'd;
//! [`AuditSink::emit`] returns only after both, so the caller reports an action done only once
//! its record is durable. (The journal is written second because its line carries the
//! kernel's verdict, which exists only once the kernel has answered.) When the kernel
//! drops records (auditing disabled) or refuses them, one warning says so, the first time, and
//! the journal goes on.

use std::time::SystemTime;

use nix::errno::Errno;
use thiserror::Error;

use super::{
    AuditType,
    journal::{Journal, JournalEntry, JournalError},
    kernel::{KernelAudit, KernelError, SendStatus},
    record::Record,
};
pub use vmaudit_core::audit::KernelOutcome;

/// Where records go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AuditMode {
    /// The kernel audit subsystem only, as libvirt does.
    Kernel,
    /// vmaudit's journal only.
    Journal,
    /// Both: the kernel, and the journal with the kernel's verdict.
    Both,
}

impl AuditMode {
    fn kernel(self) -> bool {
        matches!(self, Self::Kernel | Self::Both)
    }
}

/// The seam to the kernel audit subsystem; [`KernelAudit`] in production, a fake in tests.
pub trait KernelPort: Send {
    fn send(&mut self, kind: AuditType, text: &str) -> Result<SendStatus, KernelError>;
}

impl KernelPort for KernelAudit {
    fn send(&mut self, kind: AuditType, text: &str) -> Result<SendStatus, KernelError> {
        KernelAudit::send(self, kind, text)
    }
}

/// Why a record could not be emitted.
#[derive(Debug, Error)]
pub enum SinkError {
    #[error("audit mode {mode:?} needs a journal")]
    NoJournal { mode: AuditMode },
    #[error("audit mode kernel: cannot use the kernel audit subsystem")]
    KernelOpen {
        #[source]
        source: KernelError,
    },
    #[error("cannot journal the {kind} record")]
    Journal {
        kind: AuditType,
        #[source]
        source: JournalError,
    },
    #[error("the kernel audit subsystem did not take the {kind} record")]
    Kernel {
        kind: AuditType,
        #[source]
        source: KernelError,
    },
}

/// What became of one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmitOutcome {
    pub kernel: KernelOutcome,
    /// The record's journal line, with the kernel's verdict: the line written in `journal`
    /// and `both` modes, the line that would have been in `kernel` mode (for stdout).
    pub entry: JournalEntry,
    /// Whether `entry` was written to the journal (and fsync'd).
    pub journaled: bool,
}

/// The configured destination of records.
pub struct AuditSink {
    mode: AuditMode,
    journal: Option<Journal>,
    kernel: Result<Box<dyn KernelPort>, Errno>,
    warned: bool,
}

impl AuditSink {
    /// Opens the kernel side for `kernel` and `both` modes. In `both` mode a kernel without
    /// audit support is not fatal: records are journaled as `refused`.
    pub fn new(mode: AuditMode, journal: Option<Journal>) -> Result<Self, SinkError> {
        let kernel = match mode {
            AuditMode::Journal => Err(Errno::ENOTSUP),
            AuditMode::Kernel => match KernelAudit::open() {
                Ok(k) => Ok(Box::new(k) as Box<dyn KernelPort>),
                Err(source) => return Err(SinkError::KernelOpen { source }),
            },
            AuditMode::Both => KernelAudit::open()
                .map(|k| Box::new(k) as Box<dyn KernelPort>)
                .map_err(|e| e.errno().unwrap_or(Errno::EPROTO)),
        };
        Self::build(mode, journal, kernel)
    }

    /// A sink whose kernel side is `kernel` (a fake, in tests).
    pub fn with_kernel(
        mode: AuditMode,
        journal: Option<Journal>,
        kernel: Box<dyn KernelPort>,
    ) -> Result<Self, SinkError> {
        Self::build(mode, journal, Ok(kernel))
    }

    fn build(
        mode: AuditMode,
        journal: Option<Journal>,
        kernel: Result<Box<dyn KernelPort>, Errno>,
    ) -> Result<Self, SinkError> {
        if mode != AuditMode::Kernel && journal.is_none() {
            return Err(SinkError::NoJournal { mode });
        }
        Ok(Self {
            mode,
            journal,
            kernel,
            warned: false,
        })
    }

    pub fn mode(&self) -> AuditMode {
        self.mode
    }

    /// Sends `record` where the mode says; returns once it is in the kernel's hands and
    /// fsync'd in the journal.
    pub fn emit(&mut self, record: &Record) -> Result<EmitOutcome, SinkError> {
        let kernel = if self.mode.kernel() {
            self.send_kernel(record)?
        } else {
            KernelOutcome::NotRequested
        };
        let entry = JournalEntry::new(record, &kernel, SystemTime::now());
        let journaled = match &mut self.journal {
            Some(j) if self.mode != AuditMode::Kernel => {
                j.append_entry(&entry)
                    .map_err(|source| SinkError::Journal {
                        kind: record.kind,
                        source,
                    })?;
                true
            }
            _ => false,
        };
        Ok(EmitOutcome {
            kernel,
            entry,
            journaled,
        })
    }

    fn send_kernel(&mut self, record: &Record) -> Result<KernelOutcome, SinkError> {
        let outcome = match &mut self.kernel {
            Ok(k) => match k.send(record.kind, &record.text) {
                Ok(SendStatus::Accepted) => KernelOutcome::Sent,
                Ok(SendStatus::Disabled) => KernelOutcome::Disabled,
                Err(source) if self.mode == AuditMode::Kernel => {
                    return Err(SinkError::Kernel {
                        kind: record.kind,
                        source,
                    });
                }
                Err(e) => KernelOutcome::Refused(e.errno().unwrap_or(Errno::EPROTO)),
            },
            Err(errno) => KernelOutcome::Refused(*errno),
        };
        if outcome != KernelOutcome::Sent && !self.warned {
            self.warned = true;
            let rest = match self.mode {
                AuditMode::Kernel => "dropped",
                _ => "written to the journal only",
            };
            match outcome {
                KernelOutcome::Disabled => log::warn!(
                    "kernel auditing is disabled (enable it with `auditctl -e 1`): \
                     VIRT_* records are {rest}"
                ),
                _ => log::warn!(
                    "the kernel audit subsystem refused a {} record ({outcome}): \
                     VIRT_* records are {rest}",
                    record.kind
                ),
            }
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::audit::{ControlOp, StartReason, Uuid, VmIdent, journal::tests::Scratch};

    type Log = Arc<Mutex<Vec<(AuditType, String)>>>;

    /// A kernel that answers each send with the next scripted answer and keeps what it got.
    struct FakeKernel {
        answers: Vec<Result<SendStatus, Errno>>,
        got: Log,
    }

    impl KernelPort for FakeKernel {
        fn send(&mut self, kind: AuditType, text: &str) -> Result<SendStatus, KernelError> {
            self.got.lock().unwrap().push((kind, text.to_owned()));
            self.answers
                .remove(0)
                .map_err(|errno| KernelError::Refused {
                    op: "VIRT_CONTROL",
                    errno,
                })
        }
    }

    fn fake(answers: Vec<Result<SendStatus, Errno>>) -> (Box<FakeKernel>, Log) {
        let got = Arc::default();
        let k = FakeKernel {
            answers,
            got: Arc::clone(&got),
        };
        (Box::new(k), got)
    }

    fn record() -> Record {
        let vm = VmIdent::new("qemu", "g", Uuid::nil());
        Record::control(&vm, ControlOp::Start(StartReason::Booted), 7)
            .build()
            .unwrap()
    }

    #[test]
    fn outcome_words() {
        assert_eq!(KernelOutcome::Sent.to_string(), "sent");
        assert_eq!(KernelOutcome::Disabled.to_string(), "disabled");
        assert_eq!(
            KernelOutcome::Refused(Errno::EPERM).to_string(),
            "refused: EPERM"
        );
        assert_eq!(KernelOutcome::NotRequested.to_string(), "not-requested");
    }

    #[test]
    fn both_sends_then_journals_the_verdict_and_warns_once() {
        let dir = Scratch::new("sink-both");
        let path = dir.0.join("j.jsonl");
        let (k, got) = fake(vec![
            Ok(SendStatus::Accepted),
            Ok(SendStatus::Disabled),
            Err(Errno::EPERM),
        ]);
        let mut sink =
            AuditSink::with_kernel(AuditMode::Both, Some(Journal::open(&path).unwrap()), k)
                .unwrap();
        let rec = record();
        let outs: Vec<EmitOutcome> = (0..3).map(|_| sink.emit(&rec).unwrap()).collect();
        assert_eq!(
            outs.iter().map(|o| o.kernel).collect::<Vec<_>>(),
            [
                KernelOutcome::Sent,
                KernelOutcome::Disabled,
                KernelOutcome::Refused(Errno::EPERM)
            ]
        );
        assert!(sink.warned);
        assert!(outs.iter().all(|o| o.journaled));
        let lines = Journal::read(&path).unwrap();
        let words: Vec<&str> = lines.iter().map(|e| e.kernel.as_str()).collect();
        assert_eq!(words, ["sent", "disabled", "refused: EPERM"]);
        assert_eq!(lines, outs.into_iter().map(|o| o.entry).collect::<Vec<_>>());
        let got = got.lock().unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], (AuditType::VirtControl, rec.text.clone()));
    }

    #[test]
    fn journal_mode_never_touches_the_kernel() {
        let dir = Scratch::new("sink-journal");
        let path = dir.0.join("j.jsonl");
        let (k, got) = fake(vec![]);
        let mut sink =
            AuditSink::with_kernel(AuditMode::Journal, Some(Journal::open(&path).unwrap()), k)
                .unwrap();
        let out = sink.emit(&record()).unwrap();
        assert_eq!(out.kernel, KernelOutcome::NotRequested);
        assert!(got.lock().unwrap().is_empty());
        assert_eq!(Journal::read(&path).unwrap()[0].kernel, "not-requested");
        assert!(!sink.warned);
    }

    #[test]
    fn kernel_mode_fails_when_refused_and_needs_no_journal() {
        let (k, _) = fake(vec![
            Ok(SendStatus::Accepted),
            Ok(SendStatus::Disabled),
            Err(Errno::EPERM),
        ]);
        let mut sink = AuditSink::with_kernel(AuditMode::Kernel, None, k).unwrap();
        let out = sink.emit(&record()).unwrap();
        assert_eq!((out.kernel, out.journaled), (KernelOutcome::Sent, false));
        assert_eq!(out.entry.kernel, "sent");
        assert_eq!(
            sink.emit(&record()).unwrap().kernel,
            KernelOutcome::Disabled
        );
        assert!(matches!(
            sink.emit(&record()),
            Err(SinkError::Kernel {
                kind: AuditType::VirtControl,
                ..
            })
        ));
    }

    #[test]
    fn journal_modes_need_a_journal() {
        for mode in [AuditMode::Journal, AuditMode::Both] {
            let (k, _) = fake(vec![]);
            assert!(matches!(
                AuditSink::with_kernel(mode, None, k),
                Err(SinkError::NoJournal { .. })
            ));
        }
    }
}
