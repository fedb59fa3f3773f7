//! libvirt-compatible audit records: formatting, the kernel audit subsystem sink, the journal.
//!
//! vmaudit writes the same `VIRT_*` records libvirt writes, byte for byte (libvirt's fields in
//! libvirt's order, then libaudit's ` exe=... hostname=? addr=? terminal=? res=...` suffix), so
//! that `ausearch`, `aureport --virt` and every rule written for libvirt hosts read them
//! unchanged. What vmaudit knows beyond libvirt (the fd numbers) goes in extra `vmaudit-*`
//! fields after the suffix.
//!
//! - [`encode`]: libaudit's value encoding (`audit_encode_nv_string`), raw fields, `rdev`.
//! - [`record`]: the record builders ([`Record::net_open`], [`Record::net`],
//!   [`Record::cgroup`], [`Record::control`]).
//! - [`kernel`]: the kernel audit subsystem over NETLINK_AUDIT: status, enable, send.
//! - [`reader`]: a multicast [`Reader`] of what the kernel logged.
//! - [`parse`]: reading records back (audit.log lines, kernel records, any encoding);
//!   [`virt`]: their typed view.
//! - [`logfmt`]: a kernel record as auditd writes it in `audit.log`.
//! - [`journal`]: vmaudit's own append-only JSON-lines journal, fsync'd per record.
//! - [`sink`]: where records go ([`AuditMode`]): journal, kernel, or both.

pub mod encode;
mod entry;
pub mod journal;
pub mod kernel;
pub mod logfmt;
pub mod parse;
pub mod reader;
mod reason;
pub mod record;
mod shapes;
pub mod sink;
pub mod virt;

use std::fmt;

pub use journal::{Journal, JournalEntry, JournalError};
pub use kernel::{AuditStatus, KernelAudit, KernelError, SendStatus};
pub use reader::{KernelRecord, Reader};
pub use record::{
    Acl, CgroupClass, CgroupReason, ControlOp, NetChange, Record, RecordBuilder, RecordError,
    RecordFields, StartReason, StopReason, VmIdent,
};
pub use sink::{AuditMode, AuditSink, EmitOutcome, KernelOutcome, KernelPort, SinkError};
/// Record builders take the VM's UUID as this type (re-exported so users need no `uuid` dep).
pub use uuid::Uuid;

/// The audit message types vmaudit writes (linux/audit.h, user range 2100-2999).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum AuditType {
    /// A VM's lifecycle: `op=start`, `op=stop`.
    VirtControl = 2500,
    /// A resource given to or taken from a VM: devices, cgroup ACLs, NICs.
    VirtResource = 2501,
    /// A VM's security labels.
    VirtMachineId = 2502,
}

impl AuditType {
    /// The message type number.
    pub const fn id(self) -> u16 {
        self as u16
    }

    /// The name auditd and ausearch use (`VIRT_RESOURCE`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::VirtControl => "VIRT_CONTROL",
            Self::VirtResource => "VIRT_RESOURCE",
            Self::VirtMachineId => "VIRT_MACHINE_ID",
        }
    }

    /// The type with this number, if it is one of vmaudit's.
    pub const fn from_id(id: u16) -> Option<Self> {
        match id {
            2500 => Some(Self::VirtControl),
            2501 => Some(Self::VirtResource),
            2502 => Some(Self::VirtMachineId),
            _ => None,
        }
    }

    /// The type with this name (`VIRT_RESOURCE`).
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::VirtControl, Self::VirtResource, Self::VirtMachineId]
            .into_iter()
            .find(|t| t.name() == name)
    }
}

impl fmt::Display for AuditType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::AuditType;

    #[test]
    fn type_numbers_and_names() {
        for (t, id, name) in [
            (AuditType::VirtControl, 2500, "VIRT_CONTROL"),
            (AuditType::VirtResource, 2501, "VIRT_RESOURCE"),
            (AuditType::VirtMachineId, 2502, "VIRT_MACHINE_ID"),
        ] {
            assert_eq!(t.id(), id);
            assert_eq!(t.name(), name);
            assert_eq!(AuditType::from_id(id), Some(t));
            assert_eq!(AuditType::from_name(name), Some(t));
        }
        assert_eq!(AuditType::from_id(1100), None);
    }
}
