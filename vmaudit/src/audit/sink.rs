//! Where records go: the kernel audit subsystem, vmaudit's journal, or both.
//!
//! In `both` mode a record is sent to the kernel first, then its journal line, which carries
//! the kernel's verdict (`sent`, `disabled`, `refused: EPERM`), is appended and fsync'd;
//! [`AuditSink::emit`] returns only after both, so the caller reports an action done only once
//! its record is durable. (The journal is written second because its line carries the
//! kernel's verdict, which exists only once the kernel has answered.) When the kernel
//! drops records (auditing disabled) or refuses them, one warning says so, the first time, and
//! the journal goes on.
//!
//! The kernel side runs on a thread of its own: a send can block (a full audit backlog makes
//! senders wait), and whoever emits must not. [`AuditSink::emit`] waits at most
//! [`KERNEL_WAIT`] for the kernel's answer; a record not answered by then is journaled with
//! `kernel: "queued"`, the kernel gets it in order, and its answer, when it comes, is checked
//! like any other (a refusal in `kernel` mode fails the next emit, or [`AuditSink::flush`]).

use std::{
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

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

/// How long [`AuditSink::emit`] waits for the kernel's answer before it journals the record
/// as `queued`.
pub const KERNEL_WAIT: Duration = Duration::from_millis(250);

type Answer = Result<SendStatus, KernelError>;

/// One record for the kernel thread, and where its answer goes.
struct Job {
    kind: AuditType,
    text: String,
    answer: mpsc::SyncSender<Answer>,
}

/// The thread that talks to the kernel audit subsystem.
struct KernelThread {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// Records handed over and not answered yet, oldest first.
    waiting: Vec<(AuditType, mpsc::Receiver<Answer>)>,
}

impl KernelThread {
    fn start(mut port: Box<dyn KernelPort>) -> Self {
        let (jobs, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("vmaudit-audit".into())
            .spawn(move || {
                for job in rx {
                    let answer = port.send(job.kind, &job.text);
                    // The receiver is gone only when the sink is: nobody is left to tell.
                    let _ = job.answer.send(answer);
                }
            });
        match thread {
            Ok(t) => Self {
                jobs: Some(jobs),
                thread: Some(t),
                waiting: Vec::new(),
            },
            Err(e) => {
                log::error!("cannot start the kernel audit thread: {e}");
                Self {
                    jobs: None,
                    thread: None,
                    waiting: Vec::new(),
                }
            }
        }
    }

    /// Hands a record over; its answer if it comes within `wait` and nothing older is still
    /// unanswered (otherwise it is queued behind them).
    fn send(&mut self, kind: AuditType, text: &str, wait: Duration) -> Option<Answer> {
        let (answer, rx) = mpsc::sync_channel(1);
        let job = Job {
            kind,
            text: text.to_owned(),
            answer,
        };
        let Some(jobs) = &self.jobs else {
            return Some(Err(KernelError::Timeout {
                op: "the kernel audit thread",
                timeout: Duration::ZERO,
            }));
        };
        if jobs.send(job).is_err() {
            return Some(Err(KernelError::Timeout {
                op: "the kernel audit thread (gone)",
                timeout: Duration::ZERO,
            }));
        }
        if !self.waiting.is_empty() {
            self.waiting.push((kind, rx));
            return None;
        }
        match rx.recv_timeout(wait) {
            Ok(a) => Some(a),
            Err(_) => {
                self.waiting.push((kind, rx));
                None
            }
        }
    }

    /// The answers that came for queued records, oldest first, waiting at most `wait` for the
    /// first one still missing.
    fn answered(&mut self, wait: Duration) -> Vec<(AuditType, Answer)> {
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + wait;
        while let Some((kind, rx)) = self.waiting.first() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(a) => {
                    out.push((*kind, a));
                    self.waiting.remove(0);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.waiting.remove(0);
                }
            }
        }
        out
    }
}

impl Drop for KernelThread {
    fn drop(&mut self) {
        self.jobs = None;
        // A thread blocked in the kernel is left to end with the process: joining it would
        // make whoever drops the sink wait on the kernel too.
        if self.waiting.is_empty()
            && let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("the kernel audit thread panicked");
        }
    }
}

/// The configured destination of records.
pub struct AuditSink {
    mode: AuditMode,
    journal: Option<Journal>,
    kernel: Result<KernelThread, Errno>,
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
        let kernel = match (mode, kernel) {
            (AuditMode::Journal, _) => Err(Errno::ENOTSUP),
            (_, Ok(port)) => Ok(KernelThread::start(port)),
            (_, Err(e)) => Err(e),
        };
        Ok(Self {
            mode,
            journal,
            kernel,
            warned: false,
        })
    }

    /// The journal records go to, if any.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    /// Waits (at most `wait`) for the kernel's answers to queued records; in `kernel` mode a
    /// refusal among them is the error.
    pub fn flush(&mut self, wait: Duration) -> Result<(), SinkError> {
        let answers = match &mut self.kernel {
            Ok(k) => k.answered(wait),
            Err(_) => return Ok(()),
        };
        self.check_late(answers)?;
        match &self.kernel {
            Ok(k) if !k.waiting.is_empty() => {
                log::warn!(
                    "{} audit record(s) still wait for the kernel after {wait:?}",
                    k.waiting.len()
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Answers to records journaled as `queued`: a refusal fails `kernel` mode, and is warned
    /// about (once) otherwise.
    fn check_late(&mut self, answers: Vec<(AuditType, Answer)>) -> Result<(), SinkError> {
        for (kind, a) in answers {
            match a {
                Ok(SendStatus::Accepted) => {}
                Ok(SendStatus::Disabled) => self.warn_once(kind, &KernelOutcome::Disabled),
                Err(source) if self.mode == AuditMode::Kernel => {
                    return Err(SinkError::Kernel { kind, source });
                }
                Err(e) => self.warn_once(
                    kind,
                    &KernelOutcome::Refused(e.errno().unwrap_or(Errno::EPROTO)),
                ),
            }
        }
        Ok(())
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
        let (answer, late) = match &mut self.kernel {
            Ok(k) => {
                let late = k.answered(Duration::ZERO);
                (k.send(record.kind, &record.text, KERNEL_WAIT), late)
            }
            Err(errno) => (
                Some(Err(KernelError::Refused {
                    op: "open",
                    errno: *errno,
                })),
                Vec::new(),
            ),
        };
        self.check_late(late)?;
        let outcome = match answer {
            None => KernelOutcome::Queued,
            Some(Ok(SendStatus::Accepted)) => KernelOutcome::Sent,
            Some(Ok(SendStatus::Disabled)) => KernelOutcome::Disabled,
            Some(Err(source)) if self.mode == AuditMode::Kernel => {
                return Err(SinkError::Kernel {
                    kind: record.kind,
                    source,
                });
            }
            Some(Err(e)) => KernelOutcome::Refused(e.errno().unwrap_or(Errno::EPROTO)),
        };
        self.warn_once(record.kind, &outcome);
        Ok(outcome)
    }

    fn warn_once(&mut self, kind: AuditType, outcome: &KernelOutcome) {
        if matches!(outcome, KernelOutcome::Sent | KernelOutcome::Queued) {
            return;
        }
        if !self.warned {
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
                    "the kernel audit subsystem refused a {kind} record ({outcome}): \
                     VIRT_* records are {rest}"
                ),
            }
        }
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
