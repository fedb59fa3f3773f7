//! libvirt's VIRT_* records as claims: what each record says, in the claim's terms.

use std::path::PathBuf;

use super::{AclChange, Claim, ClaimKind};
use crate::{
    acl::{Acl, DevTypes, DeviceRule},
    audit::{AuditType, parse::Parsed},
    fd::DevNum,
};

/// Why a record is not a claim.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotAClaim {
    /// Not VIRT_CONTROL or VIRT_RESOURCE (VIRT_MACHINE_ID, or not libvirt's at all).
    #[error("not a VIRT_CONTROL or VIRT_RESOURCE record")]
    OtherType,
    /// A VIRT_* record about a resource the kernel cannot speak for (mem, vcpu, fs, ...).
    #[error("resrc={0} is not a claim the kernel can judge")]
    OtherResource(String),
    /// A VIRT_* record missing a field its shape needs, or with a bad value.
    #[error("malformed {kind} record: {why}")]
    Malformed { kind: String, why: String },
}

pub(super) fn malformed(kind: AuditType, why: impl Into<String>) -> NotAClaim {
    NotAClaim::Malformed {
        kind: kind.name().to_owned(),
        why: why.into(),
    }
}

/// What a record claims, with where and when it comes from; the id and the time it was read
/// are the reader's to add ([`RecordClaim::into_claim`]).
#[derive(Clone, Debug, PartialEq)]
pub struct RecordClaim {
    pub kind: ClaimKind,
    pub vm_name: String,
    pub uuid: String,
    pub success: bool,
    pub sender: Option<u32>,
    pub record_ts_ns: u64,
    /// The record's text (inside `msg='...'`).
    pub text: String,
}

impl RecordClaim {
    /// The claim numbered `id`, read at `made_ns` (CLOCK_MONOTONIC).
    pub fn into_claim(self, id: u64, made_ns: u64, historic: bool) -> Claim {
        Claim {
            id,
            kind: self.kind,
            vm_name: self.vm_name,
            uuid: self.uuid,
            success: self.success,
            sender: self.sender,
            text: self.text,
            record_ts_ns: self.record_ts_ns,
            made_ns,
            historic,
        }
    }
}

/// The claim a parsed record makes.
pub fn claim_of(p: &Parsed) -> Result<RecordClaim, NotAClaim> {
    let kind = match AuditType::from_name(&p.kind) {
        Some(t @ (AuditType::VirtControl | AuditType::VirtResource)) => t,
        _ => return Err(NotAClaim::OtherType),
    };
    let need = |name: &str| need(p, kind, name);
    let uuid = need("uuid")?;
    let claim = match kind {
        AuditType::VirtControl => control(p, kind)?,
        _ => resource(p, kind)?,
    };
    Ok(RecordClaim {
        kind: claim,
        vm_name: p.get("vm").unwrap_or_default().to_owned(),
        uuid,
        success: p.get("res") == Some("success"),
        sender: p.sender_pid(),
        record_ts_ns: p.stamp.unix_ns(),
        text: p.text.clone(),
    })
}

pub(super) fn need(p: &Parsed, kind: AuditType, name: &str) -> Result<String, NotAClaim> {
    p.get(name)
        .map(str::to_owned)
        .ok_or_else(|| malformed(kind, format!("no {name}")))
}

fn control(p: &Parsed, kind: AuditType) -> Result<ClaimKind, NotAClaim> {
    match need(p, kind, "op")?.as_str() {
        "start" => {
            let pid: u32 = need(p, kind, "vm-pid")?
                .parse()
                .map_err(|_| malformed(kind, "vm-pid is not a number"))?;
            if pid == 0 {
                return Err(malformed(kind, "op=start with vm-pid=0"));
            }
            Ok(ClaimKind::VmStart { pid })
        }
        "stop" => Ok(ClaimKind::VmStop {
            pid: None,
            reason: p.get("reason").unwrap_or("?").to_owned(),
        }),
        op => Err(NotAClaim::OtherResource(format!("op={op}"))),
    }
}

fn resource(p: &Parsed, kind: AuditType) -> Result<ClaimKind, NotAClaim> {
    let resrc = need(p, kind, "resrc")?;
    let reason = need(p, kind, "reason")?;
    let mac = |name| need(p, kind, name).map(|m| m.to_ascii_lowercase());
    Ok(match (resrc.as_str(), reason.as_str()) {
        ("net", "open") => ClaimKind::NetOpen {
            mac: mac("net")?,
            path: need(p, kind, "path")?,
            rdev: p.get("rdev").and_then(DevNum::parse_libvirt_hex),
            fd: None,
        },
        ("net", "start" | "attach") => ClaimKind::NetUp {
            mac: mac("new-net")?,
            attach: reason == "attach",
            emulator_pid: None,
            handed: Vec::new(),
        },
        ("net", "detach") => ClaimKind::NetDetach {
            mac: mac("old-net")?,
            emulator_pid: None,
            fds: None,
        },
        ("net", r) => return Err(malformed(kind, format!("resrc=net reason={r}"))),
        ("cgroup", _) => ClaimKind::Cgroup {
            cgroup: Some(PathBuf::from(need(p, kind, "cgroup")?)),
            change: acl_change(p, kind, &reason)?,
        },
        (other, r) => match super::resource::claim(p, kind, other, r)? {
            Some(k) => k,
            None => return Err(NotAClaim::OtherResource(other.to_owned())),
        },
    })
}

/// A cgroup record's change: `deny class=all`, or an allow or deny of a path, a major or
/// everything.
fn acl_change(p: &Parsed, kind: AuditType, reason: &str) -> Result<AclChange, NotAClaim> {
    let class = need(p, kind, "class")?;
    if (reason, class.as_str()) == ("deny", "all") {
        return Ok(AclChange::DenyAll);
    }
    let acl = || -> Result<Acl, NotAClaim> {
        match p.get("acl") {
            None if class == "all" => Ok(Acl::RWM),
            a => a
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| malformed(kind, format!("acl={a:?}"))),
        }
    };
    let rule = match class.as_str() {
        "all" => DeviceRule {
            types: DevTypes::All,
            major: None,
            minor: None,
            acl: acl()?,
        },
        "path" => {
            let rdev = need(p, kind, "rdev")?;
            let dev = DevNum::parse_libvirt_hex(&rdev)
                .ok_or_else(|| malformed(kind, format!("rdev={rdev}")))?;
            // libvirt's path rules are for character devices here; the record does not say.
            DeviceRule {
                types: DevTypes::Char,
                major: Some(dev.major),
                minor: Some(dev.minor),
                acl: acl()?,
            }
        }
        "major" => {
            let maj = need(p, kind, "maj")?;
            DeviceRule {
                types: DevTypes::Char,
                major: Some(
                    u32::from_str_radix(&maj, 16)
                        .map_err(|_| malformed(kind, format!("maj={maj}")))?,
                ),
                minor: None,
                acl: acl()?,
            }
        }
        c => {
            return Err(NotAClaim::OtherResource(format!(
                "cgroup reason={reason} class={c}"
            )));
        }
    };
    match reason {
        "allow" => Ok(AclChange::Allow(rule)),
        "deny" => Ok(AclChange::Deny(rule)),
        r => Err(malformed(kind, format!("resrc=cgroup reason={r}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::parse::parse_line;

    const FIXTURE: &str = include_str!("../../../../tests/fixtures/libvirt-9.0-audit.log");

    #[test]
    fn every_device_record_of_a_real_libvirt_run_is_a_claim() {
        let mut kinds = Vec::new();
        for line in FIXTURE.lines() {
            let p = parse_line(line).unwrap();
            match claim_of(&p) {
                Ok(c) => {
                    assert_eq!(c.vm_name, "vmlv0");
                    assert!(c.uuid.starts_with("7e57c0de"));
                    assert!(c.success);
                    assert!(c.sender.is_some() && c.record_ts_ns > 0);
                    assert!(c.text.starts_with("virt="), "{}", c.text);
                    kinds.push(c.kind.name());
                }
                Err(NotAClaim::OtherType | NotAClaim::OtherResource(_)) => {}
                Err(e) => panic!("{line}: {e}"),
            }
        }
        let count = |n: &str| kinds.iter().filter(|k| **k == n).count();
        assert_eq!(count("net-open"), 3);
        assert_eq!(count("net-start"), 2);
        assert_eq!(count("net-attach"), 1);
        assert_eq!(count("cgroup"), 9);
        assert_eq!(count("vm-start"), 1);
        assert_eq!(count("vm-stop"), 1);
    }

    fn cgroup_change(text: &str) -> AclChange {
        let line = format!(
            "type=VIRT_RESOURCE msg=audit(1.200:3): pid=1 uid=0 auid=0 ses=1 msg='virt=kvm resrc=cgroup vm=\"a\" uuid=u cgroup=\"/x/\" {text} exe=\"/x\" hostname=? addr=? terminal=? res=success'"
        );
        match claim_of(&parse_line(&line).unwrap()).unwrap().kind {
            ClaimKind::Cgroup { change, .. } => change,
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn cgroup_records_decode_hex_majors_and_rdevs() {
        let AclChange::Allow(pty) =
            cgroup_change("reason=allow class=major category=pty maj=88 acl=rw")
        else {
            panic!()
        };
        assert_eq!((pty.major, pty.minor, pty.acl), (Some(136), None, Acl::RW));
        let AclChange::Allow(kvm) =
            cgroup_change("reason=allow class=path path=\"/dev/kvm\" rdev=0A:E8 acl=rw")
        else {
            panic!()
        };
        assert_eq!((kvm.major, kvm.minor), (Some(10), Some(232)));
        assert_eq!(cgroup_change("reason=deny class=all"), AclChange::DenyAll);
        assert!(matches!(
            cgroup_change("reason=deny class=path path=\"/dev/kvm\" rdev=0A:E8 acl=rw"),
            AclChange::Deny(_)
        ));
    }

    #[test]
    fn a_record_missing_its_fields_is_malformed() {
        let line = "type=VIRT_RESOURCE msg=audit(1.200:3): pid=1 uid=0 auid=0 ses=1 msg='virt=kvm resrc=net reason=open vm=\"a\" uuid=u res=success'";
        assert!(matches!(
            claim_of(&parse_line(line).unwrap()),
            Err(NotAClaim::Malformed { .. })
        ));
        let other = "type=VIRT_RESOURCE msg=audit(1.200:3): pid=1 uid=0 auid=0 ses=1 msg='virt=kvm resrc=mem reason=start vm=\"a\" uuid=u old-mem=0 new-mem=65536 res=success'";
        assert_eq!(
            claim_of(&parse_line(other).unwrap()),
            Err(NotAClaim::OtherResource("mem".into()))
        );
    }
}
