//! The vocabulary of libvirt's records: reasons, operations, cgroup classes and ACLs.

use std::path::PathBuf;

use crate::fd::DevNum;

/// A NIC's lifecycle record (`resrc=net reason=...` with `old-net`/`new-net`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetChange {
    /// The NIC was there when the VM booted: `old-net="?" new-net="MAC"`.
    Start,
    /// Hot-plugged: `old-net="?" new-net="MAC"`.
    Attach,
    /// Hot-unplugged: `old-net="MAC" new-net="?"`.
    Detach,
}

impl NetChange {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Attach => "attach",
            Self::Detach => "detach",
        }
    }
}

/// Whether a device cgroup ACL entry allows or denies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupReason {
    Allow,
    Deny,
}

impl CgroupReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// What a cgroup device ACL entry covers (`class=...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupClass {
    /// Every device: `class=all`.
    All,
    /// Every device of a major: `class=major category=pty maj=88 acl=rw` (`maj` in hex).
    Major {
        category: String,
        maj: u32,
        acl: Acl,
    },
    /// One device node: `class=path path="/dev/kvm" rdev=0A:E8 acl=rw`.
    Path {
        path: PathBuf,
        rdev: Option<DevNum>,
        acl: Acl,
    },
}

impl CgroupClass {
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Major { .. } => "major",
            Self::Path { .. } => "path",
        }
    }
}

/// A device ACL (a subset of `rwm`, printed in that order): the cgroup module's, so a rule and
/// its record cannot disagree.
pub use crate::acl::Acl;

/// Why a VM started (`op=start reason=...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartReason {
    Booted,
    Restored,
    Migrated,
    FromSnapshot,
}

/// Why a VM stopped (`op=stop reason=...`), libvirt's shut-off reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Unknown,
    Shutdown,
    Destroyed,
    Crashed,
    Migrated,
    Saved,
    Failed,
    FromSnapshot,
    Daemon,
}

/// A VIRT_CONTROL operation with its reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlOp {
    Start(StartReason),
    Stop(StopReason),
}

impl ControlOp {
    /// `start` or `stop`.
    pub const fn op(self) -> &'static str {
        match self {
            Self::Start(_) => "start",
            Self::Stop(_) => "stop",
        }
    }

    /// The reason as libvirt writes it.
    pub const fn reason(self) -> &'static str {
        match self {
            Self::Start(r) => match r {
                StartReason::Booted => "booted",
                StartReason::Restored => "restored",
                StartReason::Migrated => "migrated",
                StartReason::FromSnapshot => "from-snapshot",
            },
            Self::Stop(r) => match r {
                StopReason::Unknown => "unknown",
                StopReason::Shutdown => "shutdown",
                StopReason::Destroyed => "destroyed",
                StopReason::Crashed => "crashed",
                StopReason::Migrated => "migrated",
                StopReason::Saved => "saved",
                StopReason::Failed => "failed",
                StopReason::FromSnapshot => "from-snapshot",
                StopReason::Daemon => "daemon",
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_prints_in_rwm_order() {
        assert_eq!(Acl::RW.to_string(), "rw");
        assert_eq!("mwr".parse::<Acl>().unwrap().to_string(), "rwm");
        assert_eq!("m".parse::<Acl>().unwrap().to_string(), "m");
        for bad in ["", "rr", "rx", "RW"] {
            assert!(bad.parse::<Acl>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn control_words() {
        assert_eq!(ControlOp::Start(StartReason::Booted).op(), "start");
        assert_eq!(ControlOp::Start(StartReason::Booted).reason(), "booted");
        assert_eq!(ControlOp::Stop(StopReason::Destroyed).op(), "stop");
        assert_eq!(
            ControlOp::Stop(StopReason::FromSnapshot).reason(),
            "from-snapshot"
        );
    }
}
