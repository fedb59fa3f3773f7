//! The records: libvirt's text, libaudit's suffix, vmaudit's extra fields, and the same facts
//! as structured fields for the journal.
//!
//! A record is built in three parts, in this order, so that libvirt's field order is never
//! touched: libvirt's fields (see `domain_audit.c`), libaudit's
//! ` exe=... hostname=? addr=? terminal=? res=success|failed`, then vmaudit's own
//! `vmaudit-*` fields.

use std::{os::unix::ffi::OsStrExt as _, path::Path, sync::OnceLock};

use thiserror::Error;

use super::{
    AuditType,
    encode::{self, EncodeError, encode_nv, encode_nv_bytes},
    shapes::{Shape, ShapeError},
};
pub use super::{
    shapes::{RecordFields, VmIdent},
    vocab::{Acl, CgroupClass, CgroupReason, ControlOp, NetChange, StartReason, StopReason},
};
use crate::fd::DevNum;

/// Where libaudit reads the name of the executable it writes as `exe=`.
const SELF_EXE: &str = "/proc/self/exe";

/// Why a record cannot be built.
#[derive(Debug, Error)]
pub enum RecordError {
    #[error("{mac:?} is not a MAC address (six hex octets separated by ':')")]
    Mac { mac: String },
    #[error("cannot write the {kind} record for VM {vm:?}")]
    Encode {
        kind: AuditType,
        vm: String,
        #[source]
        source: EncodeError,
    },
}

/// One complete audit record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: AuditType,
    /// The complete text the kernel is given: libvirt's fields, libaudit's suffix, extras.
    pub text: String,
    pub success: bool,
    pub fields: RecordFields,
    /// Length of libvirt's part of `text` (before the suffix).
    libvirt_len: usize,
}

impl Record {
    /// libvirt's part of the text, before libaudit's suffix.
    pub fn libvirt_text(&self) -> &str {
        &self.text[..self.libvirt_len]
    }

    /// A device opened for a NIC: `virt=kvm resrc=net reason=open vm="NAME" uuid=UUID
    /// net=MAC path="/dev/net/tun" rdev=0A:C8`. `rdev` is `None` for a file that is not a
    /// device (libvirt writes `rdev=?`); see [`encode::rdev_of`].
    pub fn net_open(vm: &VmIdent, mac: &str, path: &Path, rdev: Option<DevNum>) -> RecordBuilder {
        RecordBuilder::new(
            vm,
            Shape::NetOpen {
                mac: mac.to_owned(),
                path: path.to_owned(),
                rdev,
            },
        )
    }

    /// A NIC's lifecycle: `virt=kvm resrc=net reason=start vm="NAME" uuid=UUID old-net="?"
    /// new-net="MAC"` (`detach`: `old-net="MAC" new-net="?"`).
    pub fn net(vm: &VmIdent, change: NetChange, mac: &str) -> RecordBuilder {
        RecordBuilder::new(
            vm,
            Shape::Net {
                change,
                mac: mac.to_owned(),
            },
        )
    }

    /// A device cgroup ACL entry: `virt=kvm resrc=cgroup reason=deny vm="NAME" uuid=UUID
    /// cgroup="DIR" class=...`.
    pub fn cgroup(
        vm: &VmIdent,
        reason: CgroupReason,
        cgroup: &Path,
        class: CgroupClass,
    ) -> RecordBuilder {
        RecordBuilder::new(
            vm,
            Shape::Cgroup {
                reason,
                cgroup: cgroup.to_owned(),
                class,
            },
        )
    }

    /// A lifecycle record (VIRT_CONTROL): `virt=kvm op=start reason=booted vm="NAME"
    /// uuid=UUID vm-pid=PID`.
    pub fn control(vm: &VmIdent, op: ControlOp, vm_pid: i64) -> RecordBuilder {
        RecordBuilder::new(vm, Shape::Control { op, vm_pid })
    }
}

/// A record being built: the shape's facts, then the result and extra fields.
#[derive(Clone, Debug)]
pub struct RecordBuilder {
    vm: VmIdent,
    shape: Shape,
    success: bool,
    extra: Vec<Extra>,
    exe: Option<Vec<u8>>,
}

#[derive(Clone, Debug)]
enum Extra {
    Fd(i32),
    EmulatorFd(i32),
    Other(String, String),
}

impl RecordBuilder {
    fn new(vm: &VmIdent, shape: Shape) -> Self {
        Self {
            vm: vm.clone(),
            shape,
            success: true,
            extra: Vec::new(),
            exe: None,
        }
    }

    /// `res=success` (the default) or `res=failed`.
    pub fn success(mut self, success: bool) -> Self {
        self.success = success;
        self
    }

    /// The fd number in vmaudit: extra field `vmaudit-fd`.
    pub fn fd(mut self, fd: i32) -> Self {
        self.extra.push(Extra::Fd(fd));
        self
    }

    /// The fd number in the emulator: extra field `vmaudit-emulator-fd`.
    pub fn emulator_fd(mut self, fd: i32) -> Self {
        self.extra.push(Extra::EmulatorFd(fd));
        self
    }

    /// Any other extra field, after libaudit's suffix, encoded like libvirt's encoded fields.
    pub fn extra(mut self, name: &str, value: &str) -> Self {
        self.extra
            .push(Extra::Other(name.to_owned(), value.to_owned()));
        self
    }

    /// The executable named in `exe=` (default: this process's, from /proc/self/exe).
    pub fn exe(mut self, exe: &Path) -> Self {
        self.exe = Some(exe.as_os_str().as_bytes().to_vec());
        self
    }

    /// The record, or why it cannot be written (bad MAC, a raw field that would need
    /// encoding, a single quote anywhere, more than [`encode::MAX_TEXT`] bytes).
    pub fn build(self) -> Result<Record, RecordError> {
        let kind = match self.shape {
            Shape::Control { .. } => AuditType::VirtControl,
            _ => AuditType::VirtResource,
        };
        let enc = |source| RecordError::Encode {
            kind,
            vm: self.vm.name.clone(),
            source,
        };
        let (libvirt, mut fields) =
            super::shapes::libvirt_text(&self.vm, &self.shape).map_err(|e| match e {
                ShapeError::Mac(mac) => RecordError::Mac { mac },
                ShapeError::Encode(e) => enc(e),
            })?;
        let exe = match &self.exe {
            Some(exe) => encode_nv_bytes("exe", Some(exe)),
            None => encode_nv_bytes("exe", self_exe()),
        };
        let res = if self.success { "success" } else { "failed" };
        let mut text = format!("{libvirt} {exe} hostname=? addr=? terminal=? res={res}");
        for extra in &self.extra {
            let (name, value) = match extra {
                Extra::Fd(fd) => {
                    fields.fd = Some(*fd);
                    ("vmaudit-fd", fd.to_string())
                }
                Extra::EmulatorFd(fd) => {
                    fields.emulator_fd = Some(*fd);
                    ("vmaudit-emulator-fd", fd.to_string())
                }
                Extra::Other(name, value) => {
                    fields.extra.push((name.clone(), value.clone()));
                    (name.as_str(), value.clone())
                }
            };
            encode::check_name(name).map_err(enc)?;
            text.push(' ');
            text.push_str(&encode_nv(name, Some(&value)));
        }
        encode::check_text(&text).map_err(enc)?;
        Ok(Record {
            kind,
            text,
            success: self.success,
            fields,
            libvirt_len: libvirt.len(),
        })
    }
}

/// This process's executable, read once, as libaudit does; `None` when unreadable
/// (`exe="?"`).
fn self_exe() -> Option<&'static [u8]> {
    static EXE: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    EXE.get_or_init(|| {
        std::fs::read_link(SELF_EXE)
            .ok()
            .map(|p| p.into_os_string().as_bytes().to_vec())
    })
    .as_deref()
}
