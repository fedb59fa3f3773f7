//! libvirt's VIRT_* records as claims about what the kernel holds.

use std::path::PathBuf;

use crate::{
    audit::parse::Parsed,
    cgroup::{Acl, DevTypes, DeviceRule},
    procfs::DevNum,
};

/// What one libvirt record claims.
#[derive(Clone, Debug, PartialEq)]
pub enum MKind {
    /// `resrc=net reason=open`: the manager opened `path` for the NIC `mac`.
    NetOpen {
        mac: String,
        path: String,
        rdev: Option<DevNum>,
    },
    /// `resrc=net reason=start|attach`: the emulator holds the NIC's device from now on.
    NetUp { mac: String, attach: bool },
    /// `resrc=net reason=detach`: the emulator released the NIC's device.
    NetDetach { mac: String },
    /// `resrc=cgroup reason=deny class=all`: a default-deny device policy on `cgroup`.
    CgroupDeny { cgroup: PathBuf },
    /// `resrc=cgroup reason=allow`: `rule` is in the cgroup's device policy.
    CgroupAllow { cgroup: PathBuf, rule: DeviceRule },
    /// VIRT_CONTROL `op=start`: the emulator is `pid`.
    VmStart { pid: u32 },
    /// VIRT_CONTROL `op=stop`.
    VmStop { reason: String },
}

impl MKind {
    pub fn name(&self) -> &'static str {
        match self {
            Self::NetOpen { .. } => "net-open",
            Self::NetUp { attach: false, .. } => "net-start",
            Self::NetUp { attach: true, .. } => "net-attach",
            Self::NetDetach { .. } => "net-detach",
            Self::CgroupDeny { .. } | Self::CgroupAllow { .. } => "cgroup",
            Self::VmStart { .. } => "vm-start",
            Self::VmStop { .. } => "vm-stop",
        }
    }

    pub fn mac(&self) -> Option<&str> {
        match self {
            Self::NetOpen { mac, .. } | Self::NetUp { mac, .. } | Self::NetDetach { mac } => {
                Some(mac)
            }
            _ => None,
        }
    }
}

/// A record's claim, with where and when it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct MClaim {
    pub id: u64,
    pub kind: MKind,
    pub vm: String,
    pub uuid: String,
    /// The sender of the record (libvirtd's pid).
    pub sender: Option<u32>,
    /// `res=success`.
    pub success: bool,
    /// The record's text (libvirt's part and libaudit's).
    pub text: String,
    /// The record's audit timestamp (unix ns, millisecond precision).
    pub record_ts_ns: u64,
    /// CLOCK_MONOTONIC when vmaudit read it.
    pub arrived_ns: u64,
    /// Written before vmaudit watched (read from the log's past with `--from-start`).
    pub historic: bool,
}

impl MClaim {
    pub fn claim_ref(&self) -> crate::verify::ClaimRef {
        crate::verify::ClaimRef {
            id: self.id,
            kind: self.kind.name().to_owned(),
            record_ts_ns: self.record_ts_ns,
            text: self.text.clone(),
            mac: self.kind.mac().map(str::to_owned),
            fd: None,
        }
    }
}

/// Why a record is not a claim.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotAClaim {
    /// Not VIRT_CONTROL or VIRT_RESOURCE (VIRT_MACHINE_ID, or not libvirt's at all).
    #[error("not a VIRT_CONTROL or VIRT_RESOURCE record")]
    OtherType,
    /// A VIRT_* record about something other than devices (mem, vcpu, disk, ...).
    #[error("resrc={0} is not a device claim")]
    OtherResource(String),
    /// A VIRT_* record missing a field its shape needs, or with a bad value.
    #[error("malformed {kind} record: {why}")]
    Malformed { kind: String, why: String },
}

fn malformed(kind: &str, why: impl Into<String>) -> NotAClaim {
    NotAClaim::Malformed {
        kind: kind.to_owned(),
        why: why.into(),
    }
}

/// `0A:C8` (libvirt's `%02X:%02X`) as a device number.
pub fn parse_rdev(s: &str) -> Option<DevNum> {
    let (maj, min) = s.split_once(':')?;
    Some(DevNum {
        major: u32::from_str_radix(maj, 16).ok()?,
        minor: u32::from_str_radix(min, 16).ok()?,
    })
}

/// The record type's name: auditd writes the name, or `UNKNOWN[2501]` where it lacks one.
fn type_of(kind: &str) -> &str {
    match kind {
        "UNKNOWN[2500]" => "VIRT_CONTROL",
        "UNKNOWN[2501]" => "VIRT_RESOURCE",
        "UNKNOWN[2502]" => "VIRT_MACHINE_ID",
        k => k,
    }
}

/// The claim a parsed record makes (ids and times are filled in by the caller).
pub fn claim_of(p: &Parsed) -> Result<(MKind, String, String, bool), NotAClaim> {
    let kind = type_of(&p.kind);
    if kind != "VIRT_CONTROL" && kind != "VIRT_RESOURCE" {
        return Err(NotAClaim::OtherType);
    }
    let need = |name: &str| {
        p.get(name)
            .map(str::to_owned)
            .ok_or_else(|| malformed(kind, format!("no {name}")))
    };
    let vm = p.get("vm").unwrap_or_default().to_owned();
    let uuid = need("uuid")?;
    let success = p.get("res") == Some("success");
    let k = if kind == "VIRT_CONTROL" {
        match need("op")?.as_str() {
            "start" => {
                let pid: u32 = need("vm-pid")?
                    .parse()
                    .map_err(|_| malformed(kind, "vm-pid is not a number"))?;
                if pid == 0 {
                    return Err(malformed(kind, "op=start with vm-pid=0"));
                }
                MKind::VmStart { pid }
            }
            "stop" => MKind::VmStop {
                reason: p.get("reason").unwrap_or("?").to_owned(),
            },
            op => return Err(NotAClaim::OtherResource(format!("op={op}"))),
        }
    } else {
        let resrc = need("resrc")?;
        let reason = need("reason")?;
        match (resrc.as_str(), reason.as_str()) {
            ("net", "open") => MKind::NetOpen {
                mac: need("net")?,
                path: need("path")?,
                rdev: p.get("rdev").and_then(parse_rdev),
            },
            ("net", "start" | "attach") => MKind::NetUp {
                mac: need("new-net")?,
                attach: reason == "attach",
            },
            ("net", "detach") => MKind::NetDetach {
                mac: need("old-net")?,
            },
            ("net", r) => return Err(malformed(kind, format!("resrc=net reason={r}"))),
            ("cgroup", reason) => {
                let cgroup = PathBuf::from(need("cgroup")?);
                let acl = |p: &Parsed| -> Result<Acl, NotAClaim> {
                    need("acl")?
                        .parse()
                        .map_err(|_| malformed(kind, format!("acl={:?}", p.get("acl"))))
                };
                match (reason, need("class")?.as_str()) {
                    ("deny", "all") => MKind::CgroupDeny { cgroup },
                    ("allow", "all") => MKind::CgroupAllow {
                        cgroup,
                        rule: DeviceRule {
                            types: DevTypes::All,
                            major: None,
                            minor: None,
                            acl: p
                                .get("acl")
                                .and_then(|a| a.parse().ok())
                                .unwrap_or_else(|| "rwm".parse().expect("rwm")),
                        },
                    },
                    ("allow", "path") => {
                        let rdev = need("rdev")?;
                        let dev = parse_rdev(&rdev)
                            .ok_or_else(|| malformed(kind, format!("rdev={rdev}")))?;
                        MKind::CgroupAllow {
                            cgroup,
                            rule: DeviceRule {
                                // libvirt's path rules are for character devices here; the
                                // record does not say, so match either type.
                                types: DevTypes::Char,
                                major: Some(dev.major),
                                minor: Some(dev.minor),
                                acl: acl(p)?,
                            },
                        }
                    }
                    ("allow", "major") => {
                        let maj = need("maj")?;
                        let major = u32::from_str_radix(&maj, 16)
                            .map_err(|_| malformed(kind, format!("maj={maj}")))?;
                        MKind::CgroupAllow {
                            cgroup,
                            rule: DeviceRule {
                                types: DevTypes::Char,
                                major: Some(major),
                                minor: None,
                                acl: acl(p)?,
                            },
                        }
                    }
                    (r, c) => {
                        return Err(NotAClaim::OtherResource(format!(
                            "cgroup reason={r} class={c}"
                        )));
                    }
                }
            }
            (other, _) => return Err(NotAClaim::OtherResource(other.to_owned())),
        }
    };
    Ok((k, vm, uuid, success))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::parse::parse_line;

    const FIXTURE: &str = include_str!("../../../tests/fixtures/libvirt-9.0-audit.log");

    #[test]
    fn every_device_record_of_a_real_libvirt_run_is_a_claim() {
        let mut kinds = Vec::new();
        for line in FIXTURE.lines() {
            let p = parse_line(line).unwrap();
            match claim_of(&p) {
                Ok((k, vm, uuid, ok)) => {
                    assert_eq!(vm, "vmlv0");
                    assert!(uuid.starts_with("7e57c0de"));
                    assert!(ok);
                    kinds.push(k.name());
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

    #[test]
    fn hex_majors_and_rdevs_decode() {
        let line = "type=VIRT_RESOURCE msg=audit(1.2:3): pid=1 uid=0 auid=0 ses=1 msg='virt=kvm resrc=cgroup reason=allow vm=\"a\" uuid=u cgroup=\"/x/\" class=major category=pty maj=88 acl=rw exe=\"/x\" hostname=? addr=? terminal=? res=success'";
        let (k, ..) = claim_of(&parse_line(line).unwrap()).unwrap();
        let MKind::CgroupAllow { rule, .. } = k else {
            panic!("{k:?}")
        };
        assert_eq!((rule.major, rule.minor), (Some(136), None));
        assert_eq!(
            parse_rdev("0A:C8"),
            Some(DevNum {
                major: 10,
                minor: 200
            })
        );
        assert_eq!(parse_rdev("zz:1"), None);
    }

    #[test]
    fn a_record_missing_its_fields_is_malformed() {
        let line = "type=VIRT_RESOURCE msg=audit(1.2:3): pid=1 uid=0 auid=0 ses=1 msg='virt=kvm resrc=net reason=open vm=\"a\" uuid=u res=success'";
        assert!(matches!(
            claim_of(&parse_line(line).unwrap()),
            Err(NotAClaim::Malformed { .. })
        ));
    }
}
