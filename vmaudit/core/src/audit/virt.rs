//! A typed view of one parsed libvirt record ([`Parsed`]): what it is about (`resrc`, `op`,
//! `reason`), which VM, which MAC, which device, and the outcome, decoded from whichever of
//! libvirt's shapes it has (AUDIT-FORMAT.md, "The records").

use serde::Serialize;

use super::{AuditType, parse::Parsed};
use crate::fd::DevNum;

/// The facts of one VIRT_* record. Every field is `None` when the record does not carry it
/// (or carries `?`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VirtRecord {
    /// `kvm`, `qemu`, `lxc`, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virt: Option<String>,
    /// `resrc=` (VIRT_RESOURCE): `net`, `cgroup`, `disk`, `mem`, `dev`, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resrc: Option<String>,
    /// `op=` (VIRT_CONTROL): `start`, `stop`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    /// `open`, `start`, `attach`, `detach`, `allow`, `deny`, `booted`, `destroyed`, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// The interface's MAC: `net=` of an open record, else `new-net=` (start, attach) or
    /// `old-net=` (detach). Lower-cased.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// `old-<resrc>=` and `new-<resrc>=` (`old-net`, `new-disk`, `new-mem`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new: Option<String>,
    /// `path=` (a device opened, or a cgroup ACL's device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `rdev=` decoded from libvirt's `%02X:%02X`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdev: Option<DevNum>,
    /// `vm-pid=` (VIRT_CONTROL); libvirt writes 0 or -1 when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_pid: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// `class=`: `all`, `major`, `path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// `maj=` decoded from libvirt's hex (`88` is 136).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maj: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acl: Option<String>,
    /// `res=success` (true), `res=failed` (false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
}

impl VirtRecord {
    pub fn of(p: &Parsed) -> Self {
        let get = |k: &str| p.get(k).map(str::to_owned);
        let resrc = get("resrc");
        let (old, new) = match &resrc {
            Some(r) => (get(&format!("old-{r}")), get(&format!("new-{r}"))),
            None => (None, None),
        };
        let mac = match resrc.as_deref() {
            Some("net") => get("net")
                .or_else(|| new.clone())
                .or_else(|| old.clone())
                .map(|m| m.to_ascii_lowercase()),
            _ => None,
        };
        Self {
            virt: get("virt"),
            op: get("op"),
            reason: get("reason"),
            vm: get("vm"),
            uuid: get("uuid"),
            mac,
            old,
            new,
            path: get("path"),
            rdev: p.get("rdev").and_then(DevNum::parse_libvirt_hex),
            vm_pid: p.get("vm-pid").and_then(|v| v.parse().ok()),
            cgroup: get("cgroup"),
            class: get("class"),
            category: get("category"),
            maj: p.get("maj").and_then(|m| u32::from_str_radix(m, 16).ok()),
            acl: get("acl"),
            success: match p.get("res") {
                Some("success") => Some(true),
                Some("failed") => Some(false),
                _ => None,
            },
            exe: get("exe"),
            resrc,
        }
    }
}

impl Parsed {
    /// The typed view of this record.
    pub fn virt(&self) -> VirtRecord {
        VirtRecord::of(self)
    }

    /// The record's type, when it is one of libvirt's.
    pub fn audit_type(&self) -> Option<AuditType> {
        self.type_id().and_then(AuditType::from_id)
    }

    /// Unix time of the kernel's stamp, in ns.
    pub fn unix_ns(&self) -> u64 {
        self.stamp.unix_ns()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::parse::parse_line;

    #[test]
    fn typed_views_of_each_shape() {
        let open = parse_line("type=VIRT_RESOURCE msg=audit(1.020:1): pid=1 uid=0 auid=4294967295 ses=4294967295 msg='virt=kvm resrc=net reason=open vm=\"a b\" uuid=u net=52:54:00:AA:bb:cc path=\"/dev/net/tun\" rdev=0A:C8 exe=\"/usr/sbin/libvirtd\" hostname=? addr=? terminal=? res=success'").unwrap().virt();
        assert_eq!(open.mac.as_deref(), Some("52:54:00:aa:bb:cc"));
        assert_eq!(
            open.rdev,
            Some(DevNum {
                major: 10,
                minor: 200
            })
        );
        assert_eq!(open.success, Some(true));
        assert_eq!(open.virt.as_deref(), Some("kvm"));
        let detach = parse_line("type=VIRT_RESOURCE msg=audit(1.020:2): pid=1 uid=0 auid=0 ses=1 msg='virt=kvm resrc=net reason=detach vm=\"a\" uuid=u old-net=\"52:54:00:aa:bb:cc\" new-net=\"?\" exe=\"/x\" hostname=? addr=? terminal=? res=failed'").unwrap().virt();
        assert_eq!(
            (detach.mac.as_deref(), detach.new, detach.success),
            (Some("52:54:00:aa:bb:cc"), None, Some(false))
        );
        let pty = parse_line("type=VIRT_RESOURCE msg=audit(1.0:3): pid=1 msg='virt=kvm resrc=cgroup reason=allow vm=\"a\" uuid=u cgroup=\"/sys/fs/cgroup/x/\" class=major category=pty maj=88 acl=rw res=success'").unwrap().virt();
        assert_eq!(
            (pty.maj, pty.class.as_deref(), pty.mac),
            (Some(136), Some("major"), None)
        );
        let mem = parse_line("type=VIRT_RESOURCE msg=audit(1.0:4): pid=1 msg='virt=kvm resrc=mem reason=start vm=\"a\" uuid=u old-mem=0 new-mem=131072 res=success'").unwrap().virt();
        assert_eq!(
            (mem.old.as_deref(), mem.new.as_deref()),
            (Some("0"), Some("131072")),
            "numeric old-/new- fields are not hex"
        );
        let start = parse_line("type=VIRT_CONTROL msg=audit(1.5:5): pid=1 msg='virt=qemu op=start reason=booted vm=\"a\" uuid=u vm-pid=4242 res=success'").unwrap();
        assert_eq!(start.virt().vm_pid, Some(4242));
        assert_eq!(start.audit_type(), Some(AuditType::VirtControl));
        assert_eq!(start.unix_ns(), 1_005_000_000);
    }
}
