//! The verifier: every audit record is a claim about what the kernel holds; the fd tracker
//! and the cgroup device program give the kernel's side; each claim gets a verdict with its
//! evidence.
//!
//! - [`claims`]: what each record claims, and what the main thread measured with it (kcmp,
//!   the device map) while it could.
//! - [`ledger`]: holding claims to the kernel's evidence (pure logic over fd tables).
//! - [`engine`]: the verifier thread inside `vmaudit run`: the tracker, the claims, the
//!   decisions, the deadlines.
//! - [`observer`]: hooks for whoever shows what the verifier sees (dashboard, metrics).
//! - [`report`]: `vmaudit verify JOURNAL`.

pub mod claims;
pub mod engine;
pub mod ledger;
pub mod observer;
pub mod report;

use serde::{Deserialize, Serialize};

/// A verdict's status. Never `Confirmed` without kernel evidence; lost events make it
/// `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Confirmed,
    Violated,
    /// The deadline passed without the evidence.
    Unconfirmed,
    /// Events were lost in the window: nothing can be said.
    Unknown,
}

/// The reason of an `unknown` verdict when events were lost for any of `pids` (`lost`: events
/// lost per pid), or None.
pub fn lost_reason(lost: &std::collections::HashMap<u32, u64>, pids: &[u32]) -> Option<String> {
    let n: Vec<String> = pids
        .iter()
        .filter_map(|p| lost.get(p).map(|l| format!("{l} for pid {p}")))
        .collect();
    (!n.is_empty()).then(|| {
        format!(
            "kernel events were lost ({}): nothing can be said",
            n.join(", ")
        )
    })
}

/// One kernel fact behind a verdict.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    /// Kernel CLOCK_MONOTONIC ns of the event (the fd's arrival, close, the exit, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    /// What the kernel saw: `open`, `inherit`, `close`, `exit`, `kcmp`, `map`, `decision`, ...
    pub what: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Which claim a verdict judges.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClaimRef {
    /// The claim's sequence number in this run (0 for what no claim accounts for).
    pub id: u64,
    /// `net-open`, `net-start`, `net-detach`, `cgroup`, `vm-start`, `vm-stop`, `unclaimed`.
    pub kind: String,
    /// The record's journal timestamp (`ts_ns` of its journal line), 0 for `unclaimed`.
    pub record_ts_ns: u64,
    /// libvirt's part of the record's text, or what was found for `unclaimed`.
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
}

/// A verdict: a journal line `{"type":"verdict", ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    #[serde(rename = "type")]
    pub ty: String,
    pub ts: String,
    pub ts_ns: u64,
    pub claim: ClaimRef,
    pub status: Status,
    /// Why, for a person.
    pub reason: String,
    pub evidence: Vec<Evidence>,
    /// From the kernel event that decided it to this verdict, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ns: Option<u64>,
}

impl Verdict {
    pub fn new(
        claim: ClaimRef,
        status: Status,
        reason: impl Into<String>,
        evidence: Vec<Evidence>,
    ) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self {
            ty: "verdict".to_owned(),
            ts: vmaudit_core::time::rfc3339_ms(now),
            ts_ns: now,
            claim,
            status,
            reason: reason.into(),
            evidence,
            latency_ns: None,
        }
    }
}
