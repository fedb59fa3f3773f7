//! `vmaudit search`: the records of journals and audit.log files, with their verdicts, found
//! by MAC, VM, uuid, emulator pid, device, time and verdict status; and two questions asked
//! backwards from a moment: which fds the emulator holds for a MAC ([`answer::fds`]) and which
//! it released at its last detach ([`answer::released`]).
//!
//! - [`load`]: journals and audit.log files read into one time-ordered list of [`Event`]s,
//!   each with its verdicts and its VM's emulator pid.
//! - [`filter`]: the filters, parsed from what a person types.
//! - [`answer`]: the two questions.
//! - [`render`]: aligned lines for a terminal.

pub mod answer;
pub mod filter;
pub mod load;
pub mod render;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{audit::virt::VirtRecord, verify::Verdict};

/// One record (or one finding no record accounts for), with what the kernel said about it.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// `FILE:LINE`.
    pub source: String,
    /// RFC 3339 UTC of `ts_ns`.
    pub ts: String,
    /// Unix ns: the journal line's `ts_ns`, or the kernel's stamp in an audit.log.
    pub ts_ns: u64,
    /// `VIRT_RESOURCE`, `VIRT_CONTROL`, `VIRT_MACHINE_ID`, or `unclaimed` for a finding no
    /// record accounts for.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(flatten)]
    pub rec: VirtRecord,
    /// The emulator's pid: the VM's `vm-pid` (from its start record, for every record of that
    /// run of the VM) or the kernel's evidence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emulator_pid: Option<u32>,
    /// The emulator's fd numbers the record names (vmaudit's `vmaudit-emulator-fd(s)`;
    /// libvirt's records name none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub emulator_fds: Vec<i32>,
    /// libvirt's part of the text (before libaudit's ` exe=...` suffix).
    pub text: String,
    /// vmaudit's extra fields (`vmaudit-why`, `vmaudit-step`, ...).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
    /// The verdicts on it, in the order they were given (journals only).
    pub verdicts: Vec<Verdict>,
    /// Whether it comes from a vmaudit journal (verdicts possible) or an audit.log.
    #[serde(skip)]
    pub from_journal: bool,
}

impl Event {
    /// The MAC it is about: the record's, or the claim's.
    pub fn mac(&self) -> Option<&str> {
        self.rec
            .mac
            .as_deref()
            .or_else(|| self.verdicts.iter().find_map(|v| v.claim.mac.as_deref()))
    }

    /// A net record with this reason (`start`, `attach`, `detach`, `open`).
    pub fn is_net(&self, reason: &str) -> bool {
        self.rec.resrc.as_deref() == Some("net") && self.rec.reason.as_deref() == Some(reason)
    }

    /// A VIRT_CONTROL record with this op (`start`, `stop`).
    pub fn is_op(&self, op: &str) -> bool {
        self.rec.op.as_deref() == Some(op)
    }

    /// Whether the same VM: by uuid when both have one, else by name.
    pub fn same_vm(&self, other: &Event) -> bool {
        match (&self.rec.uuid, &other.rec.uuid) {
            (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
            _ => self.rec.vm.is_some() && self.rec.vm == other.rec.vm,
        }
    }
}

/// libvirt's part of a record text: everything before libaudit's ` exe=` suffix.
pub fn libvirt_part(text: &str) -> &str {
    text.split(" exe=").next().unwrap_or_default()
}
