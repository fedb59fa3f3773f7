//! libvirt's records of resources besides the network whose file the emulator holds: disks,
//! chardevs, RNG backends, host devices, TPMs, shared memory and evdev inputs
//! (src/conf/domain_audit.c). Each names a path, or a host device by bus address, that the
//! emulator holds from a start or attach on, and no longer after a detach.
//!
//! Shapes, as libvirt writes them (`?` for none):
//! - `resrc=disk|chardev|rng reason=R old-disk=PATH new-disk=PATH` (the generic shape);
//! - `resrc=dev reason=R bus=pci|usb|scsi|mdev|scsi_host device=ADDRESS` (host devices; a USB
//!   redirection writes `bus=usb device="USB redirdev"`);
//! - `resrc=hostdev reason=R disk=PATH` or `chardev=PATH` (capabilities mode);
//! - `resrc=tpm reason=R device=PATH` (passthrough), `resrc=tpm-emulator device=SOCKET`;
//! - `resrc=shmem reason=R size=N path=/dev/shm/NAME`, `resrc=ivshmem-socket path=SOCKET`;
//! - `resrc=evdev reason=R path=/dev/input/eventN`.

use std::fmt;

use super::{ClaimKind, NotAClaim, record::need};
use crate::audit::{AuditType, parse::Parsed};

/// A resource kind the kernel can say something about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resrc {
    Disk,
    Chardev,
    Rng,
    Hostdev,
    Tpm,
    Shmem,
    Evdev,
}

impl Resrc {
    /// The claim kind's name (one of [`super::KINDS`]).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Disk => super::DISK,
            Self::Chardev => super::CHARDEV,
            Self::Rng => super::RNG,
            Self::Hostdev => super::HOSTDEV,
            Self::Tpm => super::TPM,
            Self::Shmem => super::SHMEM,
            Self::Evdev => super::EVDEV,
        }
    }
}

/// What a resource record names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// A file or device node (an image, a chardev's file, pty or socket, `/dev/urandom`,
    /// `/dev/tpm0`, `/dev/shm/NAME`, `/dev/input/eventN`).
    Path(String),
    /// A host device by its bus address; the node the emulator opens is found in sysfs.
    HostDev { bus: String, address: String },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(p) => f.write_str(p),
            Self::HostDev { bus, address } => write!(f, "{bus} device {address}"),
        }
    }
}

/// The claim of a resource record: `Ok(None)` when it is not one the kernel can say anything
/// about (mem, vcpu, fs, ...: counted, never judged).
pub(super) fn claim(
    p: &Parsed,
    kind: AuditType,
    resrc: &str,
    reason: &str,
) -> Result<Option<ClaimKind>, NotAClaim> {
    let generic = |r: Resrc, name: &str| {
        let side = |s: &str| {
            p.get(&format!("{s}-{name}"))
                .map(|v| Target::Path(v.into()))
        };
        (r, side("old"), side("new"))
    };
    let one = |r: Resrc, t: Target| {
        // These shapes carry no old/new: the reason says which way.
        if reason == "detach" {
            (r, Some(t), None)
        } else {
            (r, None, Some(t))
        }
    };
    let path = |name: &str| need(p, kind, name).map(Target::Path);
    let (resrc, old, new) = match resrc {
        "disk" => generic(Resrc::Disk, "disk"),
        "chardev" => generic(Resrc::Chardev, "chardev"),
        "rng" => generic(Resrc::Rng, "rng"),
        "dev" => match host_dev(p, kind)? {
            Some(t) => one(Resrc::Hostdev, t),
            None => return Ok(None),
        },
        "hostdev" => {
            let t = p.get("disk").or_else(|| p.get("chardev"));
            let t = t.ok_or_else(|| super::record::malformed(kind, "no disk or chardev"))?;
            one(Resrc::Hostdev, Target::Path(t.into()))
        }
        "tpm" => one(Resrc::Tpm, path("device")?),
        "shmem" => one(Resrc::Shmem, path("path")?),
        "evdev" => one(Resrc::Evdev, path("path")?),
        _ => return Ok(None),
    };
    if old.is_none() && new.is_none() {
        return Err(super::record::malformed(
            kind,
            format!("resrc={} names no old or new source", resrc.name()),
        ));
    }
    Ok(Some(ClaimKind::Resource {
        resrc,
        reason: reason.to_owned(),
        old,
        new,
    }))
}

/// A `resrc=dev` record's device: PCI, mediated, USB and SCSI host devices are nodes the
/// emulator opens; a USB redirection (`device="USB redirdev"`, a chardev) and a vhost-scsi
/// target (`bus=scsi_host`, a WWPN behind a passed /dev/vhost-scsi fd) name none.
fn host_dev(p: &Parsed, kind: AuditType) -> Result<Option<Target>, NotAClaim> {
    let bus = need(p, kind, "bus")?;
    let address = need(p, kind, "device")?;
    let usb_address = |a: &str| {
        a.split_once('.').is_some_and(|(b, d)| {
            [b, d]
                .iter()
                .all(|n| n.len() == 3 && n.bytes().all(|c| c.is_ascii_digit()))
        })
    };
    Ok(match bus.as_str() {
        "pci" | "mdev" | "scsi" => Some(Target::HostDev { bus, address }),
        "usb" if usb_address(&address) => Some(Target::HostDev { bus, address }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{audit::parse::parse_line, claim::claim_of};

    fn kind_of(text: &str) -> Result<ClaimKind, NotAClaim> {
        let line = format!(
            "type=VIRT_RESOURCE msg=audit(1.200:3): pid=1 uid=0 auid=0 ses=1 msg='virt=kvm {text} exe=\"/x\" hostname=? addr=? terminal=? res=success'"
        );
        claim_of(&parse_line(&line).unwrap()).map(|c| c.kind)
    }

    fn res(resrc: Resrc, old: Option<Target>, new: Option<Target>) -> ClaimKind {
        ClaimKind::Resource {
            resrc,
            reason: String::new(),
            old,
            new,
        }
    }

    fn path(p: &str) -> Option<Target> {
        Some(Target::Path(p.into()))
    }

    fn without_reason(k: ClaimKind) -> ClaimKind {
        match k {
            ClaimKind::Resource {
                resrc, old, new, ..
            } => res(resrc, old, new),
            k => k,
        }
    }

    #[test]
    fn every_shape_libvirt_writes_is_read() {
        let cases = [
            (
                "resrc=disk reason=start vm=\"a\" uuid=u old-disk=\"?\" new-disk=\"/var/lib/a.qcow2\"",
                res(Resrc::Disk, None, path("/var/lib/a.qcow2")),
            ),
            (
                // A path with a space is hex-encoded.
                "resrc=disk reason=update vm=\"a\" uuid=u old-disk=\"/a.iso\" new-disk=2F6220632E69736F",
                res(Resrc::Disk, path("/a.iso"), path("/b c.iso")),
            ),
            (
                "resrc=chardev reason=detach vm=\"a\" uuid=u old-chardev=\"/dev/pts/3\" new-chardev=?",
                res(Resrc::Chardev, path("/dev/pts/3"), None),
            ),
            (
                "resrc=rng reason=start vm=\"a\" uuid=u old-rng=\"?\" new-rng=\"/dev/urandom\"",
                res(Resrc::Rng, None, path("/dev/urandom")),
            ),
            (
                "resrc=dev reason=attach vm=\"a\" uuid=u bus=pci device=\"0000:00:1f.0\"",
                res(
                    Resrc::Hostdev,
                    None,
                    Some(Target::HostDev {
                        bus: "pci".into(),
                        address: "0000:00:1f.0".into(),
                    }),
                ),
            ),
            (
                "resrc=dev reason=detach vm=\"a\" uuid=u bus=usb device=\"001.004\"",
                res(
                    Resrc::Hostdev,
                    Some(Target::HostDev {
                        bus: "usb".into(),
                        address: "001.004".into(),
                    }),
                    None,
                ),
            ),
            (
                "resrc=hostdev reason=start vm=\"a\" uuid=u disk=\"/dev/sdb\"",
                res(Resrc::Hostdev, None, path("/dev/sdb")),
            ),
            (
                "resrc=tpm reason=start vm=\"a\" uuid=u device=\"/dev/tpm0\"",
                res(Resrc::Tpm, None, path("/dev/tpm0")),
            ),
            (
                "resrc=shmem reason=start vm=\"a\" uuid=u size=4194304 path=/dev/shm/s0",
                res(Resrc::Shmem, None, path("/dev/shm/s0")),
            ),
            (
                "resrc=evdev reason=start vm=\"a\" uuid=u path=/dev/input/event2",
                res(Resrc::Evdev, None, path("/dev/input/event2")),
            ),
        ];
        for (text, want) in cases {
            let got = kind_of(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(without_reason(got.clone()), want, "{text}");
            assert!(super::super::KINDS.contains(&got.name()), "{}", got.name());
        }
    }

    #[test]
    fn resources_the_kernel_cannot_speak_for_are_no_claims() {
        for text in [
            "resrc=mem reason=start vm=\"a\" uuid=u old-mem=0 new-mem=65536",
            "resrc=vcpu reason=start vm=\"a\" uuid=u old-vcpu=0 new-vcpu=1",
            "resrc=iothread reason=start vm=\"a\" uuid=u old-iothread=0 new-iothread=1",
            "resrc=fs reason=start vm=\"a\" uuid=u old-fs=\"?\" new-fs=\"/srv\"",
            "resrc=smartcard reason=start vm=\"a\" uuid=u old-smartcard=\"?\" new-smartcard=\"nss-smartcard-device\"",
            "resrc=dev reason=start vm=\"a\" uuid=u bus=usb device=55534220726564697264657620",
            "resrc=dev reason=start vm=\"a\" uuid=u bus=scsi_host device=\"naa.5001405df3e54061\"",
            "resrc=tpm-emulator reason=start vm=\"a\" uuid=u device=\"/run/libvirt/qemu/swtpm/1-a-swtpm.sock\"",
            "resrc=ivshmem-socket reason=start vm=\"a\" uuid=u path=/tmp/ivshmem.sock",
        ] {
            assert!(
                matches!(kind_of(text), Err(NotAClaim::OtherResource(_))),
                "{text}: {:?}",
                kind_of(text)
            );
        }
    }

    #[test]
    fn every_resource_shape_of_the_corpus_is_a_claim_or_counted_as_not_verifiable() {
        const SHAPES: &str =
            include_str!("../../../../tests/fixtures/audit-corpus/libvirt-shapes.log");
        let mut got = std::collections::BTreeMap::<String, (u32, u32)>::new();
        for line in SHAPES.lines() {
            let Ok(p) = parse_line(line) else { continue };
            let Some(resrc) = p.get("resrc").map(str::to_owned) else {
                continue;
            };
            let n = got.entry(resrc).or_default();
            match claim_of(&p) {
                Ok(_) => n.0 += 1,
                Err(NotAClaim::OtherResource(_)) => n.1 += 1,
                Err(e) => panic!("{line}: {e}"),
            }
        }
        for (resrc, claims, not) in [
            ("disk", 2, 0),
            ("chardev", 1, 0),
            ("rng", 1, 0),
            ("dev", 3, 0),
            ("fs", 0, 1),
            ("smartcard", 0, 1),
            ("mem", 0, 2),
            ("vcpu", 0, 1),
            ("iothread", 0, 1),
        ] {
            assert_eq!(got.get(resrc), Some(&(claims, not)), "{resrc}: {got:?}");
        }
    }

    #[test]
    fn a_resource_record_naming_nothing_is_malformed() {
        for text in [
            "resrc=disk reason=start vm=\"a\" uuid=u old-disk=? new-disk=?",
            "resrc=tpm reason=start vm=\"a\" uuid=u",
            "resrc=dev reason=start vm=\"a\" uuid=u bus=pci",
        ] {
            assert!(
                matches!(kind_of(text), Err(NotAClaim::Malformed { .. })),
                "{text}"
            );
        }
    }
}
