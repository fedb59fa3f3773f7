//! Everything the verifier learns, as it learns it, for whoever shows it (the dashboard and
//! the metrics of `vmaudit serve`, benchmarks).
//!
//! Observers are called from the verifier thread, in kernel order, and must not block: take a
//! short lock, update counters, push to a channel.

use std::sync::Arc;

use super::{Claim, Verdict};
use crate::{
    cgroup::Decision,
    observe::{GapRecord, table::FdRecord},
};

/// A VM the verifier knows of (from a start claim, or a record naming it).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VmInfo {
    pub name: String,
    pub uuid: String,
    /// The emulator's pid (0 while unknown).
    pub pid: u32,
    /// `running` or `stopped`.
    pub state: &'static str,
}

/// What the monitor learns of the audit stream itself.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AuditEvent {
    /// A record arrived, stamped at this Unix time (seconds).
    Record { stamp: f64 },
    /// Records lost: `enobufs` (the multicast socket overran), `kernel` (the kernel's lost
    /// counter), `serial_gap` (serial numbers skipped), `too_long` (a line longer than any
    /// record), `queue_wait` (the reader waited for room: backpressure, nothing lost).
    Lost { cause: &'static str, count: u64 },
    /// The kernel's audit status: whether auditing is on, and its backlog limit.
    Status { enabled: bool, backlog_limit: u32 },
}

/// Called for each thing the verifier sees. Every method has an empty default.
pub trait Observer: Send + Sync {
    /// A VM started, stopped, or was first heard of.
    fn vm(&self, _vm: &VmInfo) {}
    /// A claim, when the verifier takes it up (before its verdict).
    fn claim(&self, _claim: &Claim) {}
    fn verdict(&self, _verdict: &Verdict) {}
    /// One fd gained, lost or changed in a watched process (including the `seed` of a process
    /// when watching starts, so an observer can keep its own copy of every fd table).
    fn fd(&self, _record: &FdRecord) {}
    /// Events lost for a process, and the resync that followed.
    fn gap(&self, _gap: &GapRecord) {}
    /// One decision of a VM cgroup's device program.
    fn decision(&self, _decision: &Decision) {}
    /// A record whose sender is no manager: not taken as a claim.
    fn not_from_manager(&self, _claim: &Claim) {}
    /// The audit stream (`monitor`).
    fn audit(&self, _event: &AuditEvent) {}
}

/// A list of observers, called in order.
#[derive(Clone, Default)]
pub struct Observers(Vec<Arc<dyn Observer>>);

impl std::fmt::Debug for Observers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Observers({})", self.0.len())
    }
}

impl Observers {
    pub fn push(&mut self, o: Arc<dyn Observer>) {
        self.0.push(o);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Observer for Observers {
    fn vm(&self, vm: &VmInfo) {
        self.0.iter().for_each(|o| o.vm(vm));
    }
    fn claim(&self, claim: &Claim) {
        self.0.iter().for_each(|o| o.claim(claim));
    }
    fn verdict(&self, verdict: &Verdict) {
        self.0.iter().for_each(|o| o.verdict(verdict));
    }
    fn fd(&self, record: &FdRecord) {
        self.0.iter().for_each(|o| o.fd(record));
    }
    fn gap(&self, gap: &GapRecord) {
        self.0.iter().for_each(|o| o.gap(gap));
    }
    fn decision(&self, decision: &Decision) {
        self.0.iter().for_each(|o| o.decision(decision));
    }
    fn not_from_manager(&self, claim: &Claim) {
        self.0.iter().for_each(|o| o.not_from_manager(claim));
    }
    fn audit(&self, event: &AuditEvent) {
        self.0.iter().for_each(|o| o.audit(event));
    }
}
