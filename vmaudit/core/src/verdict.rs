//! Verdicts: a claim's status, why, and the kernel evidence behind it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A verdict's status. Never `Confirmed` without kernel evidence; lost events make it
/// `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Confirmed,
    Violated,
    /// The deadline passed without the evidence.
    Unconfirmed,
    /// Events were lost in the window, or what the claim is about could not be seen: nothing
    /// can be said.
    Unknown,
}

impl Status {
    /// Every status, in the order reports list them.
    pub const ALL: [Status; 4] = [
        Status::Confirmed,
        Status::Violated,
        Status::Unconfirmed,
        Status::Unknown,
    ];

    /// The word the journal, reports and metrics use.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Confirmed => "confirmed",
            Self::Violated => "violated",
            Self::Unconfirmed => "unconfirmed",
            Self::Unknown => "unknown",
        }
    }

    /// How bad it is, for "the worst verdict" of a claim: violated > unknown > unconfirmed >
    /// confirmed.
    pub const fn severity(self) -> u8 {
        match self {
            Self::Confirmed => 0,
            Self::Unconfirmed => 1,
            Self::Unknown => 2,
            Self::Violated => 3,
        }
    }

    /// The worst of several statuses; None for none.
    pub fn worst(all: impl IntoIterator<Item = Status>) -> Option<Status> {
        all.into_iter().max_by_key(|s| s.severity())
    }

    /// Parses the journal's word.
    pub fn parse(s: &str) -> Option<Status> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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
    /// What the kernel saw or was read: an fd op (`open`, `inherit`, `close`, `exit`, ...),
    /// `holds` (an fd table), `kcmp`, `map`, `program`, `decision`, `process`, `lost`.
    pub what: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<String>,
    /// More, for a person; what was inferred and from what starts with `inferred:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Evidence {
    /// A fact about `pid` (fd, time, path and detail follow with the builders).
    pub fn new(pid: u32, what: impl Into<String>) -> Self {
        Self {
            pid,
            what: what.into(),
            ..Default::default()
        }
    }

    pub fn fd(mut self, fd: i32) -> Self {
        self.fd = Some(fd);
        self
    }

    pub fn at(mut self, ts: u64) -> Self {
        self.ts = Some(ts);
        self
    }

    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }

    pub fn rdev(mut self, rdev: Option<crate::fd::DevNum>) -> Self {
        self.rdev = rdev.map(|r| r.to_string());
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// Which claim a verdict judges.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClaimRef {
    /// The claim's sequence number in this run (0 for what no claim accounts for).
    pub id: u64,
    /// One of [`crate::claim::KINDS`].
    pub kind: String,
    /// The record's timestamp (Unix ns), 0 for `unclaimed`.
    pub record_ts_ns: u64,
    /// The record's text (libvirt's part), or what was found for `unclaimed`.
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
}

impl ClaimRef {
    /// What no claim accounts for: `text` says what was found.
    pub fn unclaimed(text: impl Into<String>) -> Self {
        Self {
            kind: crate::claim::UNCLAIMED.to_owned(),
            text: text.into(),
            ..Default::default()
        }
    }
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
        let now = crate::time::unix_now_ns();
        Self {
            ty: "verdict".to_owned(),
            ts: crate::time::rfc3339_ms(now),
            ts_ns: now,
            claim,
            status,
            reason: reason.into(),
            evidence,
            latency_ns: None,
        }
    }
}

/// Counts of verdicts by status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub confirmed: u64,
    pub violated: u64,
    pub unconfirmed: u64,
    pub unknown: u64,
}

impl Totals {
    pub fn add(&mut self, s: Status) {
        *self.get_mut(s) += 1;
    }

    pub fn get(&self, s: Status) -> u64 {
        match s {
            Status::Confirmed => self.confirmed,
            Status::Violated => self.violated,
            Status::Unconfirmed => self.unconfirmed,
            Status::Unknown => self.unknown,
        }
    }

    fn get_mut(&mut self, s: Status) -> &mut u64 {
        match s {
            Status::Confirmed => &mut self.confirmed,
            Status::Violated => &mut self.violated,
            Status::Unconfirmed => &mut self.unconfirmed,
            Status::Unknown => &mut self.unknown,
        }
    }

    /// The exit code `run`, `monitor` and `verify` end with: 7 when anything was violated, 8
    /// when something is unconfirmed or unknown, 0 when every claim is confirmed.
    pub fn exit_code(&self) -> u8 {
        if self.violated > 0 {
            crate::exit::VIOLATED
        } else if self.unconfirmed + self.unknown > 0 {
            crate::exit::UNCONFIRMED
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_rank_and_spell() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(
            Status::worst([Status::Confirmed, Status::Unknown, Status::Unconfirmed]),
            Some(Status::Unknown)
        );
        assert_eq!(Status::worst([]), None);
    }

    #[test]
    fn totals_give_the_exit_code() {
        let mut t = Totals::default();
        assert_eq!(t.exit_code(), 0);
        t.add(Status::Unknown);
        assert_eq!(t.exit_code(), 8);
        t.add(Status::Violated);
        assert_eq!(t.exit_code(), 7);
        assert_eq!(t.get(Status::Unknown), 1);
    }
}
