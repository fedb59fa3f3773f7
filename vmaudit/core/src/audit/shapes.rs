//! libvirt's part of each record, field for field as `domain_audit.c` writes it.

use std::os::unix::ffi::OsStrExt as _;

use std::path::PathBuf;

use uuid::Uuid;

use super::{
    encode::{self, EncodeError, encode_nv, encode_nv_bytes, raw},
    vocab::{CgroupClass, CgroupReason, ControlOp, NetChange},
};
use crate::fd::DevNum;

/// The VM a record is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmIdent {
    /// `kvm`, or `qemu` for TCG (libvirt's domain type).
    pub virt: String,
    pub name: String,
    pub uuid: Uuid,
}

impl VmIdent {
    pub fn new(virt: impl Into<String>, name: impl Into<String>, uuid: Uuid) -> Self {
        Self {
            virt: virt.into(),
            name: name.into(),
            uuid,
        }
    }
}

/// The facts of a record, for the journal and for checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordFields {
    pub virt: String,
    pub vm: String,
    pub uuid: Uuid,
    /// `net`, `cgroup` (VIRT_RESOURCE records).
    pub resrc: Option<String>,
    /// `start`, `stop` (VIRT_CONTROL records).
    pub op: Option<String>,
    pub reason: String,
    pub mac: Option<String>,
    pub path: Option<String>,
    pub rdev: Option<DevNum>,
    pub cgroup: Option<String>,
    pub class: Option<String>,
    pub category: Option<String>,
    pub maj: Option<u32>,
    pub acl: Option<String>,
    pub vm_pid: Option<i64>,
    /// The fd number in vmaudit (extra field `vmaudit-fd`).
    pub fd: Option<i32>,
    /// The fd number in the emulator (extra field `vmaudit-emulator-fd`).
    pub emulator_fd: Option<i32>,
    /// Other extra fields, in order, as given.
    pub extra: Vec<(String, String)>,
}

/// What a record is about, before it is written.
#[derive(Clone, Debug)]
pub(super) enum Shape {
    NetOpen {
        mac: String,
        path: PathBuf,
        rdev: Option<DevNum>,
    },
    Net {
        change: NetChange,
        mac: String,
    },
    Cgroup {
        reason: CgroupReason,
        cgroup: PathBuf,
        class: CgroupClass,
    },
    Control {
        op: ControlOp,
        vm_pid: i64,
    },
}

/// Why libvirt's part cannot be written.
pub(super) enum ShapeError {
    Mac(String),
    Encode(EncodeError),
}

impl From<EncodeError> for ShapeError {
    fn from(e: EncodeError) -> Self {
        Self::Encode(e)
    }
}

/// The structured fields every shape starts from.
pub(super) fn base_fields(vm: &VmIdent, reason: &str) -> RecordFields {
    RecordFields {
        virt: vm.virt.clone(),
        vm: vm.name.clone(),
        uuid: vm.uuid,
        resrc: None,
        op: None,
        reason: reason.to_owned(),
        mac: None,
        path: None,
        rdev: None,
        cgroup: None,
        class: None,
        category: None,
        maj: None,
        acl: None,
        vm_pid: None,
        fd: None,
        emulator_fd: None,
        extra: Vec::new(),
    }
}

/// `virt=... ` checked as a raw field (it is written unencoded).
pub(super) fn virt_field(vm: &VmIdent) -> Result<String, EncodeError> {
    raw("virt", &vm.virt)
}

/// libvirt's text for `shape` and the same facts as structured fields.
pub(super) fn libvirt_text(
    vm: &VmIdent,
    shape: &Shape,
) -> Result<(String, RecordFields), ShapeError> {
    let virt = virt_field(vm)?;
    let name = encode_nv("vm", Some(&vm.name));
    let uuid = vm.uuid.hyphenated();
    match shape {
        Shape::NetOpen { mac, path, rdev } => {
            let mac = parse_mac(mac)?;
            let mut f = base_fields(vm, "open");
            f.resrc = Some("net".into());
            f.mac = Some(mac.clone());
            f.path = Some(path.to_string_lossy().into_owned());
            f.rdev = *rdev;
            let path = encode_nv_bytes("path", Some(path.as_os_str().as_bytes()));
            let rdev = encode::rdev(*rdev);
            let net = raw("net", &mac)?;
            let text =
                format!("{virt} resrc=net reason=open {name} uuid={uuid} {net} {path} rdev={rdev}");
            Ok((text, f))
        }
        Shape::Net { change, mac } => {
            let mac = parse_mac(mac)?;
            let reason = change.as_str();
            let mut f = base_fields(vm, reason);
            f.resrc = Some("net".into());
            f.mac = Some(mac.clone());
            let (old, new) = match change {
                NetChange::Detach => (Some(mac.as_str()), None),
                _ => (None, Some(mac.as_str())),
            };
            let old = encode_nv("old-net", old);
            let new = encode_nv("new-net", new);
            let text = format!("{virt} resrc=net reason={reason} {name} uuid={uuid} {old} {new}");
            Ok((text, f))
        }
        Shape::Cgroup {
            reason,
            cgroup,
            class,
        } => {
            let reason = reason.as_str();
            let mut f = base_fields(vm, reason);
            f.resrc = Some("cgroup".into());
            f.cgroup = Some(cgroup.to_string_lossy().into_owned());
            f.class = Some(class.as_str().into());
            let detail = match class {
                CgroupClass::All => "all".to_owned(),
                CgroupClass::Major { category, maj, acl } => {
                    f.category = Some(category.clone());
                    f.maj = Some(*maj);
                    f.acl = Some(acl.to_string());
                    let category = raw("category", category)?;
                    let acl = raw("acl", &acl.to_string())?;
                    format!("major {category} maj={maj:02X} {acl}")
                }
                CgroupClass::Path { path, rdev, acl } => {
                    f.path = Some(path.to_string_lossy().into_owned());
                    f.rdev = *rdev;
                    f.acl = Some(acl.to_string());
                    let path = encode_nv_bytes("path", Some(path.as_os_str().as_bytes()));
                    let acl = raw("acl", &acl.to_string())?;
                    format!("path {path} rdev={} {acl}", encode::rdev(*rdev))
                }
            };
            let cgroup = encode_nv_bytes("cgroup", Some(cgroup.as_os_str().as_bytes()));
            let text = format!(
                "{virt} resrc=cgroup reason={reason} {name} uuid={uuid} {cgroup} class={detail}"
            );
            Ok((text, f))
        }
        Shape::Control { op, vm_pid } => {
            let mut f = base_fields(vm, op.reason());
            f.op = Some(op.op().into());
            f.vm_pid = Some(*vm_pid);
            let text = format!(
                "{virt} op={} reason={} {name} uuid={uuid} vm-pid={vm_pid}",
                op.op(),
                op.reason()
            );
            Ok((text, f))
        }
    }
}

/// A MAC address `aa:bb:cc:dd:ee:ff` (hex, either case), printed lower case as libvirt does.
fn parse_mac(mac: &str) -> Result<String, ShapeError> {
    let octets: Vec<&str> = mac.split(':').collect();
    let ok = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(mac.to_ascii_lowercase())
    } else {
        Err(ShapeError::Mac(mac.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use uuid::Uuid;

    use super::super::{
        Acl, AuditType, CgroupClass, CgroupReason, ControlOp, NetChange, Record, RecordError,
        StartReason, StopReason, VmIdent, encode::EncodeError,
    };
    use crate::fd::DevNum;

    const UUID: &str = "c7a5fdbd-cdaf-9455-926a-d65c16db1809";
    const SUFFIX: &str = " exe=\"/usr/sbin/libvirtd\" hostname=? addr=? terminal=? res=success";

    fn vm() -> VmIdent {
        VmIdent::new("kvm", "guest1", Uuid::parse_str(UUID).unwrap())
    }

    fn dev(major: u32, minor: u32) -> Option<DevNum> {
        Some(DevNum { major, minor })
    }

    fn text(b: super::super::RecordBuilder) -> String {
        let r = b.exe(Path::new("/usr/sbin/libvirtd")).build().unwrap();
        assert_eq!(r.text, format!("{}{SUFFIX}", r.libvirt_text()));
        r.libvirt_text().to_owned()
    }

    #[test]
    fn net_open() {
        let b = Record::net_open(
            &vm(),
            "52:54:00:AA:bb:cc",
            "/dev/net/tun".as_ref(),
            dev(10, 200),
        );
        assert_eq!(
            text(b),
            format!(
                "virt=kvm resrc=net reason=open vm=\"guest1\" uuid={UUID} \
                 net=52:54:00:aa:bb:cc path=\"/dev/net/tun\" rdev=0A:C8"
            )
        );
        let b = Record::net_open(
            &vm(),
            "52:54:00:aa:bb:cc",
            "/dev/vhost-net".as_ref(),
            dev(10, 238),
        );
        assert!(text(b).ends_with("path=\"/dev/vhost-net\" rdev=0A:EE"));
        let b = Record::net_open(&vm(), "52:54:00:aa:bb:cc", "/tmp/x".as_ref(), None);
        assert!(text(b).ends_with("path=\"/tmp/x\" rdev=?"));
    }

    #[test]
    fn net_lifecycle() {
        let mac = "52:54:00:aa:bb:cc";
        for (change, word, old, new) in [
            (NetChange::Start, "start", "\"?\"", "\"52:54:00:aa:bb:cc\""),
            (
                NetChange::Attach,
                "attach",
                "\"?\"",
                "\"52:54:00:aa:bb:cc\"",
            ),
            (
                NetChange::Detach,
                "detach",
                "\"52:54:00:aa:bb:cc\"",
                "\"?\"",
            ),
        ] {
            assert_eq!(
                text(Record::net(&vm(), change, mac)),
                format!(
                    "virt=kvm resrc=net reason={word} vm=\"guest1\" uuid={UUID} \
                     old-net={old} new-net={new}"
                )
            );
        }
    }

    #[test]
    fn cgroup_records() {
        let cg = Path::new("/sys/fs/cgroup/unified/machine/qemu-1-guest1.libvirt-qemu");
        let head = format!(
            "virt=kvm resrc=cgroup reason=deny vm=\"guest1\" uuid={UUID} cgroup=\"{}\"",
            cg.display()
        );
        let all = Record::cgroup(&vm(), CgroupReason::Deny, cg, CgroupClass::All);
        assert_eq!(text(all), format!("{head} class=all"));
        let pty = CgroupClass::Major {
            category: "pty".into(),
            maj: 136,
            acl: Acl::RW,
        };
        let allow = head.replace("reason=deny", "reason=allow");
        assert_eq!(
            text(Record::cgroup(&vm(), CgroupReason::Allow, cg, pty)),
            format!("{allow} class=major category=pty maj=88 acl=rw")
        );
        let kvm = CgroupClass::Path {
            path: "/dev/kvm".into(),
            rdev: dev(10, 232),
            acl: Acl::RW,
        };
        assert_eq!(
            text(Record::cgroup(&vm(), CgroupReason::Allow, cg, kvm)),
            format!("{allow} class=path path=\"/dev/kvm\" rdev=0A:E8 acl=rw")
        );
        let null = CgroupClass::Path {
            path: "/dev/null".into(),
            rdev: dev(1, 3),
            acl: "rwm".parse().unwrap(),
        };
        let r = Record::cgroup(&vm(), CgroupReason::Allow, cg, null)
            .build()
            .unwrap();
        assert!(
            r.libvirt_text()
                .ends_with("path=\"/dev/null\" rdev=01:03 acl=rwm")
        );
        assert_eq!(r.fields.class.as_deref(), Some("path"));
        assert_eq!(r.fields.rdev.unwrap().to_string(), "1:3");
    }

    #[test]
    fn control_records() {
        let start = Record::control(&vm(), ControlOp::Start(StartReason::Booted), 4242);
        assert_eq!(
            text(start),
            format!("virt=kvm op=start reason=booted vm=\"guest1\" uuid={UUID} vm-pid=4242")
        );
        for (reason, word) in [
            (StopReason::Shutdown, "shutdown"),
            (StopReason::Destroyed, "destroyed"),
            (StopReason::Crashed, "crashed"),
            (StopReason::Failed, "failed"),
            (StopReason::Migrated, "migrated"),
            (StopReason::Saved, "saved"),
        ] {
            let r = Record::control(&vm(), ControlOp::Stop(reason), 4242)
                .build()
                .unwrap();
            assert_eq!(r.kind, AuditType::VirtControl);
            assert_eq!(
                r.libvirt_text(),
                format!("virt=kvm op=stop reason={word} vm=\"guest1\" uuid={UUID} vm-pid=4242")
            );
        }
    }

    #[test]
    fn suffix_result_and_extras_come_last() {
        let r = Record::net_open(
            &vm(),
            "52:54:00:aa:bb:cc",
            "/dev/net/tun".as_ref(),
            dev(10, 200),
        )
        .success(false)
        .fd(5)
        .emulator_fd(23)
        .extra("vmaudit-queue", "queue 0")
        .exe(Path::new("/usr/bin/vm audit"))
        .build()
        .unwrap();
        assert_eq!(r.kind, AuditType::VirtResource);
        assert!(!r.success);
        assert_eq!(
            &r.text[r.libvirt_text().len()..],
            " exe=2F7573722F62696E2F766D206175646974 hostname=? addr=? terminal=? res=failed \
             vmaudit-fd=\"5\" vmaudit-emulator-fd=\"23\" vmaudit-queue=71756575652030"
        );
        assert_eq!(r.fields.fd, Some(5));
        assert_eq!(r.fields.emulator_fd, Some(23));
        assert_eq!(
            r.fields.extra,
            vec![("vmaudit-queue".into(), "queue 0".into())]
        );
    }

    #[test]
    fn default_exe_is_this_process() {
        let r = Record::net(&vm(), NetChange::Start, "52:54:00:aa:bb:cc")
            .build()
            .unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let want = super::encode_nv("exe", exe.to_str());
        assert!(
            r.text.contains(&format!(" {want} hostname=? ")),
            "{}",
            r.text
        );
    }

    #[test]
    fn encoded_vm_names() {
        let odd = VmIdent::new("qemu", "my vm", Uuid::parse_str(UUID).unwrap());
        let r = Record::control(&odd, ControlOp::Start(StartReason::Booted), 1)
            .build()
            .unwrap();
        assert!(
            r.text
                .starts_with("virt=qemu op=start reason=booted vm=6D7920766D uuid=")
        );
        assert_eq!(r.fields.vm, "my vm");
    }

    #[test]
    fn refusals() {
        let quote = VmIdent::new("kvm", "it's", Uuid::nil());
        let e = Record::control(&quote, ControlOp::Start(StartReason::Booted), 1).build();
        assert!(matches!(
            e,
            Err(RecordError::Encode {
                source: EncodeError::SingleQuote { .. },
                ..
            })
        ));
        let e = Record::net(&vm(), NetChange::Start, "52:54:00:aa:bb").build();
        assert!(matches!(e, Err(RecordError::Mac { .. })));
        let e = Record::net(&vm(), NetChange::Start, "52:54:00:aa:bb:cc")
            .extra("vmaudit-x", &"y".repeat(9000))
            .build();
        assert!(matches!(
            e,
            Err(RecordError::Encode {
                source: EncodeError::TooLong { .. },
                ..
            })
        ));
        let e = Record::net(&vm(), NetChange::Start, "52:54:00:aa:bb:cc")
            .extra("a=b", "1")
            .build();
        assert!(matches!(
            e,
            Err(RecordError::Encode {
                source: EncodeError::Name { .. },
                ..
            })
        ));
        let bad_virt = VmIdent::new("k vm", "g", Uuid::nil());
        let e = Record::net(&bad_virt, NetChange::Start, "52:54:00:aa:bb:cc").build();
        assert!(matches!(
            e,
            Err(RecordError::Encode {
                source: EncodeError::Raw { .. },
                ..
            })
        ));
    }
}
