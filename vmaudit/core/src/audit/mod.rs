//! libvirt's audit record format: building records byte for byte as libvirt writes them,
//! encoding values as libaudit does, and reading records back in every encoding.
//!
//! vmaudit writes the same `VIRT_*` records libvirt writes (libvirt's fields in libvirt's
//! order, then libaudit's ` exe=... hostname=? addr=? terminal=? res=...` suffix), so that
//! `ausearch`, `aureport --virt` and every rule written for libvirt hosts read them unchanged.
//! What vmaudit knows beyond libvirt (the fd numbers) goes in extra `vmaudit-*` fields after
//! the suffix.
//!
//! Imports flow one way: [`encode`] and [`vocab`] at the bottom; [`shapes`] (libvirt's part of
//! each record) on them; [`record`] (the builder) on shapes; [`entry`] (a journal line) on
//! record. [`parse`] and [`virt`] read records back; [`logfmt`] writes a kernel record as
//! auditd does.

pub mod encode;
pub mod entry;
pub mod logfmt;
pub mod parse;
pub mod record;
mod shapes;
pub mod virt;
pub mod vocab;

use std::{borrow::Cow, fmt};

pub use entry::{JournalEntry, KernelOutcome};
pub use record::{
    Acl, CgroupClass, CgroupReason, ControlOp, NetChange, Record, RecordBuilder, RecordError,
    RecordFields, StartReason, StopReason, VmIdent,
};
/// Record builders take the VM's UUID as this type (re-exported so users need no `uuid` dep).
pub use uuid::Uuid;

/// Message types by number, with libaudit's names (`audit_msg_type_to_name`): the one table
/// every reader and writer of type names uses. Types not listed are written `UNKNOWN[N]`, as
/// auditd writes them.
const TYPE_NAMES: &[(u16, &str)] = &[
    (1005, "USER"),
    (1006, "LOGIN"),
    (1100, "USER_AUTH"),
    (1101, "USER_ACCT"),
    (1105, "USER_START"),
    (1106, "USER_END"),
    (1107, "USER_AVC"),
    (1112, "USER_LOGIN"),
    (1130, "SERVICE_START"),
    (1131, "SERVICE_STOP"),
    (1200, "DAEMON_START"),
    (1203, "DAEMON_ABORT"),
    (1300, "SYSCALL"),
    (1302, "PATH"),
    (1305, "CONFIG_CHANGE"),
    (1307, "CWD"),
    (1309, "EXECVE"),
    (1320, "EOE"),
    (1327, "PROCTITLE"),
    (1400, "AVC"),
    (2500, "VIRT_CONTROL"),
    (2501, "VIRT_RESOURCE"),
    (2502, "VIRT_MACHINE_ID"),
    (2503, "VIRT_INTEGRITY_CHECK"),
    (2504, "VIRT_CREATE"),
    (2505, "VIRT_DESTROY"),
    (2506, "VIRT_MIGRATE_IN"),
    (2507, "VIRT_MIGRATE_OUT"),
];

/// libaudit's name of type `id` when it has one.
const fn known_name(id: u16) -> Option<&'static str> {
    let mut i = 0;
    while i < TYPE_NAMES.len() {
        if TYPE_NAMES[i].0 == id {
            return Some(TYPE_NAMES[i].1);
        }
        i += 1;
    }
    None
}

/// The name auditd writes for type `id`: libaudit's (`VIRT_RESOURCE`), else `UNKNOWN[id]`.
pub fn type_name(id: u16) -> Cow<'static, str> {
    match known_name(id) {
        Some(n) => Cow::Borrowed(n),
        None => Cow::Owned(format!("UNKNOWN[{id}]")),
    }
}

/// The number of a type as a log may write it: a name (`VIRT_RESOURCE`), auditd's
/// `UNKNOWN[2501]`, or the printk form `2501`.
pub fn type_id(name: &str) -> Option<u16> {
    if let Some((id, _)) = TYPE_NAMES.iter().find(|(_, n)| *n == name) {
        return Some(*id);
    }
    name.strip_prefix("UNKNOWN[")
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name)
        .parse()
        .ok()
}

/// The audit message types vmaudit writes and judges (linux/audit.h, user range 2100-2999).
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
    const ALL: [Self; 3] = [Self::VirtControl, Self::VirtResource, Self::VirtMachineId];

    /// The type number.
    pub const fn id(self) -> u16 {
        self as u16
    }

    /// The name auditd and ausearch use (`VIRT_RESOURCE`), from [`TYPE_NAMES`].
    pub const fn name(self) -> &'static str {
        match known_name(self.id()) {
            Some(n) => n,
            None => panic!("every AuditType is in TYPE_NAMES"),
        }
    }

    /// The type with this number, if it is one of vmaudit's.
    pub fn from_id(id: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The type a log names `name` (`VIRT_RESOURCE`, `UNKNOWN[2501]`, `2501`).
    pub fn from_name(name: &str) -> Option<Self> {
        type_id(name).and_then(Self::from_id)
    }
}

impl fmt::Display for AuditType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One record the kernel logged, as a multicast listener receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelRecord {
    /// The message type (2501 for VIRT_RESOURCE).
    pub kind: u16,
    /// `audit(SECS.MSEC:SERIAL): pid=.. uid=.. auid=.. ses=.. msg='...'`.
    pub text: String,
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(AuditType::from_name(&format!("UNKNOWN[{id}]")), Some(t));
            assert_eq!(AuditType::from_name(&id.to_string()), Some(t));
        }
        assert_eq!(AuditType::from_id(1100), None);
        assert_eq!(type_name(1300), "SYSCALL");
        assert_eq!(type_name(2599), "UNKNOWN[2599]");
        assert_eq!(type_id("SYSCALL"), Some(1300));
        assert_eq!(type_id("UNKNOWN[x]"), None);
    }
}
