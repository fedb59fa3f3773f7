//! One line of the journal: the record's text, the kernel's verdict, and the record's facts.

use std::{
    collections::BTreeMap,
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::record::Record;
use crate::time::rfc3339_ms;

/// What the kernel audit subsystem did with a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelOutcome {
    /// Acknowledged: the kernel logged it.
    Sent,
    /// Auditing is disabled: the kernel would have dropped it, so it was not sent.
    Disabled,
    /// Refused (or the socket could not be used), with the errno.
    Refused(nix::errno::Errno),
    /// Handed to the sender but not answered in time: the kernel gets it in order, and a
    /// refusal is reported when it comes.
    Queued,
    /// The mode does not send to the kernel.
    NotRequested,
}

impl fmt::Display for KernelOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sent => f.write_str("sent"),
            Self::Disabled => f.write_str("disabled"),
            Self::Refused(e) => write!(f, "refused: {e:?}"),
            Self::Queued => f.write_str("queued"),
            Self::NotRequested => f.write_str("not-requested"),
        }
    }
}

/// One journal line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub ts: String,
    pub ts_ns: u64,
    #[serde(rename = "type")]
    pub kind: String,
    pub type_id: u16,
    pub result: String,
    pub text: String,
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resrc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulator_fd: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maj: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_pid: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
    /// The claim this record made in the journal's run (its verdicts name the same id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_id: Option<u64>,
}

impl JournalEntry {
    /// The line for `record` now, with `kernel: "not-requested"`. Prefer the line
    /// `AuditSink::emit` returns, which has the kernel's verdict.
    pub fn from_record(record: &Record) -> Self {
        Self::new(record, &KernelOutcome::NotRequested, SystemTime::now())
    }

    /// The line for `record`, sent to the kernel with outcome `kernel`, at `at`.
    pub fn new(record: &Record, kernel: &KernelOutcome, at: SystemTime) -> Self {
        let ts_ns = at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let f = &record.fields;
        Self {
            ts: rfc3339_ms(ts_ns),
            ts_ns,
            kind: record.kind.name().to_owned(),
            type_id: record.kind.id(),
            result: if record.success { "success" } else { "failed" }.to_owned(),
            text: record.text.clone(),
            kernel: kernel.to_string(),
            virt: Some(f.virt.clone()),
            vm: Some(f.vm.clone()),
            uuid: Some(f.uuid.hyphenated().to_string()),
            resrc: f.resrc.clone(),
            op: f.op.clone(),
            reason: Some(f.reason.clone()),
            mac: f.mac.clone(),
            path: f.path.clone(),
            rdev: f.rdev.map(|d| d.to_string()),
            fd: f.fd,
            emulator_fd: f.emulator_fd,
            cgroup: f.cgroup.clone(),
            class: f.class.clone(),
            category: f.category.clone(),
            maj: f.maj,
            acl: f.acl.clone(),
            vm_pid: f.vm_pid,
            extra: f.extra.iter().cloned().collect(),
            claim_id: None,
        }
    }

    /// The line for another manager's record, as read (`monitor`): the kernel's stamp is its
    /// time, its fields those the record carries.
    pub fn of_record(p: &super::parse::Parsed) -> Self {
        let v = p.virt();
        let ts_ns = p.stamp.unix_ns();
        Self {
            ts: rfc3339_ms(ts_ns),
            ts_ns,
            kind: p.kind.clone(),
            type_id: p.type_id().unwrap_or(0),
            result: match v.success {
                Some(true) => "success",
                Some(false) => "failed",
                None => "?",
            }
            .to_owned(),
            text: p.text.clone(),
            kernel: "read".to_owned(),
            virt: v.virt,
            vm: v.vm,
            uuid: v.uuid,
            resrc: v.resrc,
            op: v.op,
            reason: v.reason,
            mac: v.mac,
            path: v.path,
            rdev: v.rdev.map(|d| d.to_string()),
            fd: None,
            emulator_fd: None,
            cgroup: v.cgroup,
            class: v.class,
            category: v.category,
            maj: v.maj,
            acl: v.acl,
            vm_pid: v.vm_pid,
            extra: p
                .sender_pid()
                .map(|pid| ("vmaudit-sender-pid".to_owned(), pid.to_string()))
                .into_iter()
                .collect(),
            claim_id: None,
        }
    }
}
