//! What each record claims, with what the main thread measured when it made the claim (the
//! kcmp of vmaudit's fd against the emulator's, the device map's contents): facts that can
//! only be taken at that moment (vmaudit closes its copies right after).

use crate::{cgroup::DeviceRule, procfs::DevNum};

/// One passed fd of a start/attach claim.
#[derive(Clone, Debug, PartialEq)]
pub struct PassedFd {
    /// The fd in vmaudit.
    pub fd: i32,
    /// Its number in the emulator.
    pub emulator_fd: i32,
    /// kcmp(KCMP_FILE) of the two, taken when the claim was made: `Some(true)` same open file
    /// description, `Some(false)` not, `None` kcmp failed (one of them was gone).
    pub kcmp_same: Option<bool>,
    pub rdev: Option<DevNum>,
    pub path: String,
}

/// What a record claims.
#[derive(Clone, Debug, PartialEq)]
pub enum ClaimKind {
    /// `resrc=net reason=open`: vmaudit opened `path` as `fd` (or failed to).
    NetOpen {
        mac: String,
        path: String,
        rdev: Option<DevNum>,
        fd: Option<i32>,
        success: bool,
    },
    /// `resrc=net reason=start|attach`: the emulator holds these fds from now on.
    NetStart {
        mac: String,
        emulator_pid: u32,
        fds: Vec<PassedFd>,
    },
    /// `resrc=net reason=detach`: the emulator released these fds.
    NetDetach {
        mac: String,
        emulator_pid: u32,
        emulator_fds: Vec<i32>,
    },
    /// `resrc=cgroup`: one ACL change; `rule` is what it should leave in the kernel (None for
    /// deny-all). `claimed` is the whole claimed ACL after it, `kernel` the device map (or
    /// devices.list) read right after the change set was applied.
    Cgroup {
        deny_all: bool,
        rule: Option<DeviceRule>,
        success: bool,
        claimed: Vec<DeviceRule>,
        kernel: Result<Vec<DeviceRule>, String>,
    },
    /// VIRT_CONTROL `op=start`: the emulator is `pid`, launched by vmaudit.
    VmStart { pid: u32 },
    /// VIRT_CONTROL `op=stop`: the emulator `pid` is gone, and with it every fd.
    VmStop { pid: u32 },
}

impl ClaimKind {
    pub fn name(&self) -> &'static str {
        match self {
            Self::NetOpen { .. } => "net-open",
            Self::NetStart { .. } => "net-start",
            Self::NetDetach { .. } => "net-detach",
            Self::Cgroup { .. } => "cgroup",
            Self::VmStart { .. } => "vm-start",
            Self::VmStop { .. } => "vm-stop",
        }
    }
}

/// A claim: a record and what it says.
#[derive(Clone, Debug, PartialEq)]
pub struct Claim {
    pub id: u64,
    pub kind: ClaimKind,
    /// libvirt's part of the record's text.
    pub text: String,
    /// The record's journal timestamp (unix ns).
    pub record_ts_ns: u64,
    /// CLOCK_MONOTONIC when the claim was made: kernel events before it are in the ring
    /// before the claim reaches the verifier.
    pub made_ns: u64,
}

impl Claim {
    pub fn claim_ref(&self) -> super::ClaimRef {
        let (mac, fd) = match &self.kind {
            ClaimKind::NetOpen { mac, fd, .. } => (Some(mac.clone()), *fd),
            ClaimKind::NetStart { mac, .. } | ClaimKind::NetDetach { mac, .. } => {
                (Some(mac.clone()), None)
            }
            _ => (None, None),
        };
        super::ClaimRef {
            id: self.id,
            kind: self.kind.name().to_owned(),
            record_ts_ns: self.record_ts_ns,
            text: self.text.clone(),
            mac,
            fd,
        }
    }
}
