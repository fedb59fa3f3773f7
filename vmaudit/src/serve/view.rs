//! The JSON the hub serves: the rows it keeps, the snapshot of `/api/state` and the events of
//! `/events`.

use std::collections::{BTreeMap, VecDeque};

use serde::{Serialize, Serializer, ser::SerializeMap};

use super::history::HistoryView;
use crate::{
    observe::{GapRecord, table::Op},
    procfs::{DevNum, FileKind},
    verify::{Status, Verdict, observer::VmInfo},
};

/// What the hub shows: the VMs of `run` and `monitor`, or the processes of `watch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// VMs, their emulators' fd tables and the verdicts; the history's subjects are VMs.
    Vms,
    /// Every watched process and its fd table; the history's subjects are processes.
    Processes,
}

/// The claim behind an fd.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClaimTag {
    pub id: u64,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The status of the last verdict that named this fd as evidence, if any yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'static str>,
}

/// One fd of a live table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FdRow {
    pub fd: i32,
    pub path: String,
    pub kind: Option<FileKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdev: Option<DevNum>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iface: Option<String>,
    pub cloexec: bool,
    /// How it arrived (`seed`, `open`, `inherit`, ...).
    pub via: Op,
    /// Kernel CLOCK_MONOTONIC ns it arrived (0: held when watching started).
    pub since_ns: u64,
    /// The same moment in Unix ns (0: held when watching started).
    pub since_unix_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim: Option<ClaimTag>,
}

/// Counts by status, as `{"confirmed": n, ...}`, in [`Status::ALL`]'s order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusCounts(pub [u64; 4]);

impl Serialize for StatusCounts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(4))?;
        for (status, n) in Status::ALL.iter().zip(self.0) {
            m.serialize_entry(status.as_str(), &n)?;
        }
        m.end()
    }
}

/// A VM, with its verdicts so far by status.
#[derive(Clone, Debug, Serialize)]
pub struct VmView {
    #[serde(flatten)]
    pub info: VmInfo,
    /// The VM's key in the history: its uuid, or its name when the uuid is unknown.
    pub key: String,
    pub verdicts: StatusCounts,
}

/// A verdict, with the VM it is about when the hub knows it (the history's key).
#[derive(Clone, Debug, Serialize)]
pub struct VerdictView {
    #[serde(flatten)]
    pub verdict: Verdict,
    pub vm: Option<String>,
}

/// The JSON of `/api/state`.
#[derive(Serialize)]
pub struct Snapshot<'a> {
    pub scope: Scope,
    pub seq: u64,
    pub vms: &'a [VmView],
    pub processes: Vec<ProcView<'a>>,
    /// Oldest first.
    pub verdicts: &'a VecDeque<VerdictView>,
    pub totals: StatusCounts,
    pub claims: u64,
    pub lost: &'a BTreeMap<&'static str, u64>,
    pub decisions: Decisions,
    pub history: HistoryView<'a>,
}

#[derive(Serialize)]
pub struct ProcView<'a> {
    pub pid: u32,
    /// The VM whose emulator this is, if it is one.
    pub vm: Option<&'a str>,
    pub fds: Vec<&'a FdRow>,
}

#[derive(Serialize)]
pub struct Decisions {
    pub allowed: u64,
    pub denied: u64,
}

/// A live event of `/events`. Each carries `seq` and `t`, the Unix second the hub counted it
/// in (the history's second).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Event<'a> {
    Vm {
        seq: u64,
        t: u64,
        vm: &'a VmView,
    },
    /// `row` is the fd as it is now (null once gone); `fd` is null for a failed attempt that
    /// names none. `subject` is the history's key of the process, if it has one. Op `claim`
    /// only re-tags the fd with its claim: it is no fd event and is not counted.
    Fd {
        seq: u64,
        t: u64,
        pid: u32,
        fd: Option<i32>,
        op: &'a str,
        row: Option<&'a FdRow>,
        subject: Option<&'a str>,
    },
    /// A claim taken up (its verdict follows).
    Claim {
        seq: u64,
        t: u64,
        id: u64,
        kind: &'static str,
    },
    Verdict {
        seq: u64,
        t: u64,
        verdict: &'a VerdictView,
    },
    /// `counted`: the events lost that this gap adds to the totals (the gaps of one loss check
    /// share its host-wide causes, counted once: empty for the others).
    Gap {
        seq: u64,
        t: u64,
        gap: &'a GapRecord,
        counted: &'a BTreeMap<&'static str, u64>,
    },
    Decision {
        seq: u64,
        t: u64,
        decision: DecisionView,
    },
}

#[derive(Serialize)]
pub struct DecisionView {
    pub ts_ns: u64,
    pub tgid: u32,
    pub cgroup_id: u64,
    pub dev: &'static str,
    pub major: u32,
    pub minor: u32,
    pub access: String,
    pub allowed: bool,
}
