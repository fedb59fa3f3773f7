//! The audit trail of one VM: every record goes to the sink (the kernel, then the journal,
//! fsync'd), its journal line to `on_record` (stdout, for the operator), and its claim to the
//! verifier. Every failure to write or hand over is returned, never dropped.
//!
//! The trail is used through `&self` by the run loop and by a hot-plug in flight at the same
//! time (one task, one thread): each write borrows it only while it writes, never across an
//! await.

use std::{cell::RefCell, time::Duration};

use serde_json::Value;
use tokio::sync::watch;

use super::devices::{OpenAttempt, Role};
use crate::{
    audit::{
        AuditSink, JournalEntry, SinkError,
        journal::JournalError,
        record::{Record, RecordBuilder, RecordError, VmIdent},
    },
    exit,
    observe::monotonic_ns,
    verify::{
        Claim, ClaimKind,
        engine::{Engine, EngineError, Msg, Outcome},
    },
};

/// Why a record, an event or a claim could not be written or handed over.
#[derive(Debug, thiserror::Error)]
pub enum TrailError {
    #[error("audit record")]
    Record(#[from] RecordError),
    #[error("writing the audit record")]
    Sink(#[source] SinkError),
    #[error("journaling an event")]
    Event(#[source] JournalError),
    #[error("verifier")]
    Verify(#[source] EngineError),
}

impl TrailError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Record(_) => exit::INTERNAL,
            Self::Sink(_) | Self::Event(_) => exit::JOURNAL,
            Self::Verify(e) => e.exit_code(),
        }
    }
}

struct Inner<'a> {
    sink: AuditSink,
    on_record: &'a mut dyn FnMut(&JournalEntry),
    claims: u64,
}

/// The records, events and claims of one VM.
pub struct Trail<'a> {
    pub vm: VmIdent,
    inner: RefCell<Inner<'a>>,
    verifier: Option<Engine>,
}

impl<'a> Trail<'a> {
    pub fn new(
        vm: VmIdent,
        sink: AuditSink,
        on_record: &'a mut dyn FnMut(&JournalEntry),
        verifier: Option<Engine>,
    ) -> Self {
        Self {
            vm,
            inner: RefCell::new(Inner {
                sink,
                on_record,
                claims: 0,
            }),
            verifier,
        }
    }

    pub fn emit(&self, b: RecordBuilder) -> Result<Record, TrailError> {
        self.emit_entry(b).map(|(rec, _)| rec)
    }

    fn emit_entry(&self, b: RecordBuilder) -> Result<(Record, JournalEntry), TrailError> {
        let rec = b.build()?;
        let mut inner = self.inner.borrow_mut();
        let outcome = inner.sink.emit(&rec).map_err(TrailError::Sink)?;
        (inner.on_record)(&outcome.entry);
        Ok((rec, outcome.entry))
    }

    /// Emits a record and hands its claim to the verifier.
    pub fn emit_claim(&self, b: RecordBuilder, kind: ClaimKind) -> Result<Record, TrailError> {
        let (rec, entry) = self.emit_entry(b)?;
        // The claim exists once its record is written (and fsync'd).
        let made_ns = monotonic_ns();
        if let Some(v) = &self.verifier {
            let id = {
                let mut inner = self.inner.borrow_mut();
                inner.claims += 1;
                inner.claims
            };
            v.claim(Claim {
                id,
                kind,
                vm_name: self.vm.name.clone(),
                uuid: self.vm.uuid.hyphenated().to_string(),
                success: rec.success,
                sender: Some(std::process::id()),
                text: rec.libvirt_text().to_owned(),
                record_ts_ns: entry.ts_ns,
                made_ns,
                historic: false,
            })
            .map_err(TrailError::Verify)?;
        }
        Ok(rec)
    }

    /// The `reason=open` record of one device open (success or failure) and its claim.
    /// `inherited`: the fd reaches the emulator at the same number (launch), so the record
    /// names it; a hot-plugged fd gets its number from qemu's getfd, named by the attach.
    pub fn record_open(
        &self,
        mac: &str,
        a: &OpenAttempt<'_>,
        inherited: bool,
    ) -> Result<Record, TrailError> {
        let mut b = Record::net_open(&self.vm, mac, a.path, a.rdev).success(a.result.is_ok());
        if let Ok(fd) = a.result {
            b = b.fd(fd);
            if inherited {
                b = b.emulator_fd(fd);
            }
        }
        b = b
            .extra(
                "vmaudit-role",
                if a.role == Role::Tap { "tap" } else { "vhost" },
            )
            .extra("vmaudit-queue", &a.queue.to_string());
        let claim = ClaimKind::NetOpen {
            mac: mac.to_owned(),
            path: a.path.display().to_string(),
            rdev: a.rdev,
            fd: a.result.as_ref().ok().copied(),
        };
        self.emit_claim(b, claim)
    }

    /// Journals one of vmaudit's own events (nothing without a journal: `--audit kernel`).
    pub fn event(&self, name: &str, fields: Value) -> Result<(), TrailError> {
        let inner = self.inner.borrow();
        match inner.sink.journal() {
            Some(j) => j.event(name, fields).map_err(TrailError::Event),
            None => Ok(()),
        }
    }

    /// Tells the verifier (nothing without one: `--no-verify`).
    pub fn tell(&self, m: Msg) -> Result<(), TrailError> {
        match &self.verifier {
            Some(v) => v.send(m).map_err(TrailError::Verify),
            None => Ok(()),
        }
    }

    pub fn verifying(&self) -> bool {
        self.verifier.is_some()
    }

    /// Violations so far, as the verifier counts them (None without a verifier).
    pub fn violations(&self) -> Option<watch::Receiver<u64>> {
        self.verifier.as_ref().map(|v| v.violations.clone())
    }

    /// Waits for the kernel's answers to queued records and for every verdict; the verifier's
    /// totals (None without one).
    pub fn finish(self) -> Result<Option<Outcome>, TrailError> {
        let flushed = self
            .inner
            .into_inner()
            .sink
            .flush(Duration::from_secs(1))
            .map_err(TrailError::Sink);
        let outcome = match self.verifier {
            Some(v) => Some(v.finish().map_err(TrailError::Verify)?),
            None => None,
        };
        flushed?;
        Ok(outcome)
    }
}
