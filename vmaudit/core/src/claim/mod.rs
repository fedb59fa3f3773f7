//! Claims: what a manager's audit record says the kernel holds, with what its source knows.
//!
//! One claim type for both modes. vmaudit's own runtime knows exactly which fd it opened, which
//! number the emulator got and whether kcmp found them the same open file at hand-off; a
//! libvirt record names only the MAC, the path and the device. Fields a record does not carry
//! are `None` (or empty), and the ledger's inference step fills them from the kernel, saying in
//! the evidence what was inferred and from what.

mod record;
mod resource;

use std::path::PathBuf;

pub use record::{NotAClaim, RecordClaim, claim_of};
pub use resource::{Resrc, Target};

use crate::{acl::DeviceRule, fd::DevNum, verdict::ClaimRef};

/// The kind names verdicts and metrics use, in one place.
pub const KINDS: &[&str] = &[
    NET_OPEN, NET_START, NET_ATTACH, NET_DETACH, CGROUP, VM_START, VM_STOP, DISK, CHARDEV, RNG,
    HOSTDEV, TPM, SHMEM, EVDEV, UNCLAIMED,
];
pub const NET_OPEN: &str = "net-open";
pub const NET_START: &str = "net-start";
pub const NET_ATTACH: &str = "net-attach";
pub const NET_DETACH: &str = "net-detach";
pub const CGROUP: &str = "cgroup";
pub const VM_START: &str = "vm-start";
pub const VM_STOP: &str = "vm-stop";
pub const DISK: &str = "disk";
pub const CHARDEV: &str = "chardev";
pub const RNG: &str = "rng";
pub const HOSTDEV: &str = "hostdev";
pub const TPM: &str = "tpm";
pub const SHMEM: &str = "shmem";
pub const EVDEV: &str = "evdev";
/// What no claim accounts for (a finding of the kernel's).
pub const UNCLAIMED: &str = "unclaimed";

/// One fd handed to the emulator, as vmaudit's runtime knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Handed {
    /// The fd in the manager (vmaudit).
    pub fd: i32,
    /// Its number in the emulator.
    pub emulator_fd: i32,
    /// kcmp(KCMP_FILE) of the two, taken when the claim was made (vmaudit closes its copies
    /// right after): `Some(true)` the same open file description, `Some(false)` not, `None`
    /// kcmp failed (one of them was gone).
    pub same_at_handoff: Option<bool>,
    pub rdev: Option<DevNum>,
    pub path: String,
}

/// One change to a VM's device ACL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AclChange {
    /// `reason=deny class=all`: deny every device not allowed after it.
    DenyAll,
    /// `reason=allow`: the kernel allows this.
    Allow(DeviceRule),
    /// `reason=deny` of one class: the kernel no longer allows this.
    Deny(DeviceRule),
}

/// What a record claims.
#[derive(Clone, Debug, PartialEq)]
pub enum ClaimKind {
    /// `resrc=net reason=open`: the manager opened `path` for NIC `mac` (as `fd`, when the
    /// record says).
    NetOpen {
        mac: String,
        path: String,
        rdev: Option<DevNum>,
        fd: Option<i32>,
    },
    /// `resrc=net reason=start|attach`: the emulator holds the NIC's device from now on.
    /// `handed`: the fds, when the manager says exactly (vmaudit's runtime); empty otherwise.
    NetUp {
        mac: String,
        attach: bool,
        emulator_pid: Option<u32>,
        handed: Vec<Handed>,
    },
    /// `resrc=net reason=detach`: the emulator released the NIC's device (`fds`: the emulator's
    /// fd numbers, when the manager says).
    NetDetach {
        mac: String,
        emulator_pid: Option<u32>,
        fds: Option<Vec<i32>>,
    },
    /// `resrc=cgroup`: one change to the ACL of the cgroup directory `cgroup`.
    Cgroup {
        cgroup: Option<PathBuf>,
        change: AclChange,
    },
    /// VIRT_CONTROL `op=start`: the emulator is `pid`.
    VmStart { pid: u32 },
    /// VIRT_CONTROL `op=stop`: the emulator (`pid`, when the manager says) is gone, and with it
    /// every fd.
    VmStop { pid: Option<u32>, reason: String },
    /// Another resource's record: the emulator holds `new` (a start, attach or update) and no
    /// longer holds `old` (a detach or update).
    Resource {
        resrc: Resrc,
        reason: String,
        old: Option<Target>,
        new: Option<Target>,
    },
}

impl ClaimKind {
    /// The kind's name in verdicts (one of [`KINDS`]).
    pub const fn name(&self) -> &'static str {
        match self {
            Self::NetOpen { .. } => NET_OPEN,
            Self::NetUp { attach: false, .. } => NET_START,
            Self::NetUp { attach: true, .. } => NET_ATTACH,
            Self::NetDetach { .. } => NET_DETACH,
            Self::Cgroup { .. } => CGROUP,
            Self::VmStart { .. } => VM_START,
            Self::VmStop { .. } => VM_STOP,
            Self::Resource { resrc, .. } => resrc.name(),
        }
    }

    pub fn mac(&self) -> Option<&str> {
        match self {
            Self::NetOpen { mac, .. } | Self::NetUp { mac, .. } | Self::NetDetach { mac, .. } => {
                Some(mac)
            }
            _ => None,
        }
    }
}

/// A claim: a record, what it says, and where and when it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Claim {
    /// Sequence number in this run.
    pub id: u64,
    pub kind: ClaimKind,
    pub vm_name: String,
    pub uuid: String,
    /// `res=success`.
    pub success: bool,
    /// Who sent the record (the audit record's sender pid), when known.
    pub sender: Option<u32>,
    /// The record's text (libvirt's part).
    pub text: String,
    /// The record's time (Unix ns).
    pub record_ts_ns: u64,
    /// CLOCK_MONOTONIC when the claim existed (its record written, or read): kernel events
    /// before it are in the ring before the claim reaches the ledger.
    pub made_ns: u64,
    /// Written before vmaudit watched (read from a log's past).
    pub historic: bool,
}

impl Claim {
    pub fn claim_ref(&self) -> ClaimRef {
        let fd = match &self.kind {
            ClaimKind::NetOpen { fd, .. } => *fd,
            _ => None,
        };
        ClaimRef {
            id: self.id,
            kind: self.kind.name().to_owned(),
            record_ts_ns: self.record_ts_ns,
            text: self.text.clone(),
            mac: self.kind.mac().map(str::to_owned),
            fd,
        }
    }
}
