//! The resource rules on a stand-in kernel ([`FakeKernel`]): no root, no kernel.

use std::path::PathBuf;

use super::super::*;
use crate::{
    acl::{Acl, DevTypes, DeviceRule},
    claim::{AclChange, Resrc, Target},
    fd::{DevNum, FdEntry, FdIdentity, FileKind, Op, Outcome, Source},
    view::{DevicePolicy, Enforcer, FakeKernel, FdRef, FileId, Holder, ProcessInfo},
};

const MGR: u32 = 10;
const EMU: u32 = 20;
const LOGD: u32 = 40;
const UUID: &str = "u-1";
const MS: u64 = 1_000_000;
const DEADLINE: u64 = 100 * MS;
const DISK: &str = "/var/lib/vm/a.qcow2";
const FS: DevNum = DevNum::new(254, 0);
const PIPEFS: DevNum = DevNum::new(0, 13);

fn file(kind: FileKind, dev: DevNum, ino: u64, rdev: Option<DevNum>) -> FileId {
    FileId {
        kind,
        dev,
        ino,
        rdev,
    }
}

fn ident(path: &str, f: FileId) -> FdIdentity {
    FdIdentity {
        path: path.into(),
        kind: f.kind,
        rdev: f.rdev,
        dev: Some(f.dev),
        ino: Some(f.ino),
        flags: None,
        mode: None,
        ofd: None,
        iface: None,
        source: Source::Proc,
    }
}

fn image() -> FileId {
    file(FileKind::Regular, FS, 77, None)
}

fn urandom() -> FileId {
    file(
        FileKind::Char,
        DevNum::new(0, 5),
        4,
        Some(DevNum::new(1, 9)),
    )
}

struct T {
    l: Ledger,
    k: FakeKernel,
    out: Vec<Verdict>,
    now: u64,
    ids: u64,
}

impl T {
    /// A running VM (its start claimed and confirmed) whose emulator holds nothing yet.
    fn new() -> Self {
        let mut k = FakeKernel::default();
        k.tables.insert(MGR, Default::default());
        k.tables.insert(EMU, Default::default());
        k.processes.insert(
            EMU,
            ProcessInfo {
                ppid: MGR,
                ..Default::default()
            },
        );
        k.files.insert(DISK.into(), image());
        k.files.insert("/dev/urandom".into(), urandom());
        let mut t = Self {
            l: Ledger::new(DEADLINE, [MGR]),
            k,
            out: Vec::new(),
            now: 1_000 * MS,
            ids: 0,
        };
        t.claim(ClaimKind::VmStart { pid: EMU });
        assert_eq!(t.one().status, Status::Confirmed);
        t
    }

    fn at(&mut self, ms: u64) -> &mut Self {
        self.now = 1_000 * MS + ms * MS;
        self
    }

    /// The emulator gains `fd` on `path` via `op`, as the tracker reports it.
    fn gain(&mut self, fd: i32, path: &str, f: FileId, op: Op) {
        self.record(op, fd, ident(path, f));
    }

    fn release(&mut self, fd: i32) {
        let id = self.k.tables[&EMU].fds[&fd].id.clone();
        self.record(Op::Close, fd, id);
    }

    fn record(&mut self, op: Op, fd: i32, id: FdIdentity) {
        let r = FdRecord {
            ty: "fd",
            ts: self.now,
            pid: EMU,
            tid: EMU,
            op,
            syscall: "test",
            fd: Some(fd),
            result: Outcome::Ok,
            cloexec: Some(false),
            from_fd: None,
            file: Some(id.clone()),
        };
        if op.is_release() {
            self.k.drop_fd(EMU, fd);
        } else {
            self.k.hold(
                EMU,
                FdEntry {
                    fd,
                    id,
                    cloexec: false,
                    since_ns: self.now,
                    via: op,
                },
            );
        }
        self.l.on_fd(&r, &self.k, &mut self.out);
    }

    fn claim(&mut self, kind: ClaimKind) -> u64 {
        self.claim_with(kind, true)
    }

    fn claim_with(&mut self, kind: ClaimKind, success: bool) -> u64 {
        self.ids += 1;
        let c = Claim {
            id: self.ids,
            kind,
            vm_name: "vm1".into(),
            uuid: UUID.into(),
            success,
            sender: Some(MGR),
            text: "t".into(),
            record_ts_ns: 1_700_000_000_000_000_000,
            made_ns: self.now,
            historic: false,
        };
        self.l.on_claim(c, &self.k, self.now, &mut self.out);
        self.ids
    }

    fn tick(&mut self) {
        self.l.on_tick(&self.k, self.now, &mut self.out);
    }

    fn one(&mut self) -> Verdict {
        assert_eq!(self.out.len(), 1, "{:#?}", self.out);
        self.out.pop().unwrap()
    }

    fn none(&mut self) {
        assert!(self.out.is_empty(), "{:#?}", self.out);
    }
}

fn gained(resrc: Resrc, path: &str) -> ClaimKind {
    ClaimKind::Resource {
        resrc,
        reason: "start".into(),
        old: None,
        new: Some(Target::Path(path.into())),
    }
}

fn detached(resrc: Resrc, path: &str) -> ClaimKind {
    ClaimKind::Resource {
        resrc,
        reason: "detach".into(),
        old: Some(Target::Path(path.into())),
        new: None,
    }
}

fn has(v: &Verdict, what: &str) -> bool {
    v.reason.contains(what)
}

// ---- held: disk, rng, hostdev, chardev ----

#[test]
fn a_disk_is_confirmed_by_an_fd_on_the_same_device_and_inode() {
    let mut t = T::new();
    // qemu opened the image through another name: the inode decides, not the path.
    t.gain(13, "/srv/link-to-a.qcow2", image(), Op::Open);
    t.claim(gained(Resrc::Disk, DISK));
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    assert_eq!(v.claim.kind, "disk");
    assert_eq!(v.claim.fd, Some(13));
    assert_eq!((v.evidence[0].pid, v.evidence[0].fd), (EMU, Some(13)));
    assert!(v.evidence[0].detail.as_deref().unwrap().contains("inode"));
}

#[test]
fn a_disk_the_emulator_does_not_hold_is_violated_at_the_deadline_and_not_before() {
    let mut t = T::new();
    // Another file of the same name elsewhere is not the image.
    t.gain(13, DISK, file(FileKind::Regular, FS, 78, None), Op::Open);
    t.claim(gained(Resrc::Disk, DISK));
    t.none();
    t.at(99).tick();
    t.none();
    t.at(100).tick();
    let v = t.one();
    assert_eq!(v.status, Status::Violated, "{}", v.reason);
    assert!(has(&v, "holds no fd on it"), "{}", v.reason);
}

#[test]
fn a_path_that_cannot_be_read_is_unknown_with_the_reason() {
    let mut t = T::new();
    t.claim(gained(Resrc::Disk, "/gone.qcow2"));
    let v = t.one();
    assert_eq!(v.status, Status::Unknown);
    assert!(has(&v, "no such file"), "{}", v.reason);
}

#[test]
fn a_claim_before_the_vms_start_waits_for_it() {
    let mut t = T::new();
    t.claim(ClaimKind::VmStop {
        pid: Some(EMU),
        reason: "destroyed".into(),
    });
    t.k.exit(EMU);
    t.at(1).tick();
    t.out.clear();
    // The next boot: its resources are recorded before its start.
    let next = 21;
    t.k.tables.insert(next, Default::default());
    t.k.processes.insert(
        next,
        ProcessInfo {
            ppid: MGR,
            ..Default::default()
        },
    );
    t.claim(gained(Resrc::Disk, DISK));
    t.none();
    t.k.hold(
        next,
        FdEntry {
            fd: 9,
            id: ident(DISK, image()),
            cloexec: false,
            since_ns: t.now,
            via: Op::Open,
        },
    );
    t.claim(ClaimKind::VmStart { pid: next });
    let got: Vec<(String, Status)> = t.out.drain(..).map(|v| (v.claim.kind, v.status)).collect();
    assert_eq!(
        got,
        [
            ("vm-start".into(), Status::Confirmed),
            ("disk".into(), Status::Confirmed)
        ]
    );
}

fn acl_vm(t: &mut T, rules: &[DeviceRule]) {
    let cg = PathBuf::from("/sys/fs/cgroup/machine/vm1");
    t.k.policies.insert(
        cg.clone(),
        DevicePolicy {
            enforcer: Enforcer::Programs {
                ids: vec![5],
                map_id: 6,
            },
            rules: rules.to_vec(),
            default_deny: true,
        },
    );
    t.claim(ClaimKind::Cgroup {
        cgroup: Some(cg.clone()),
        change: AclChange::DenyAll,
    });
    for r in rules {
        t.claim(ClaimKind::Cgroup {
            cgroup: Some(cg.clone()),
            change: AclChange::Allow(*r),
        });
    }
    assert!(t.out.drain(..).all(|v| v.status == Status::Confirmed));
}

fn char_rule(major: u32, minor: u32) -> DeviceRule {
    DeviceRule {
        types: DevTypes::Char,
        major: Some(major),
        minor: Some(minor),
        acl: Acl::RW,
    }
}

#[test]
fn an_rng_device_the_emulator_opened_is_confirmed_citing_the_cgroup_claim_that_allows_it() {
    let mut t = T::new();
    acl_vm(&mut t, &[char_rule(1, 3), char_rule(1, 9)]);
    t.gain(3, "/dev/urandom", urandom(), Op::Open);
    t.claim(gained(Resrc::Rng, "/dev/urandom"));
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    assert_eq!(v.claim.kind, "rng");
    let map = v
        .evidence
        .iter()
        .find(|e| e.what == "map")
        .expect("the ACL");
    // Claims 2 (deny all), 3 (1:3), 4 (1:9): the 1:9 rule is claim 4's.
    assert!(
        map.detail.as_deref().unwrap().contains("cgroup claim 4"),
        "{map:?}"
    );
}

#[test]
fn a_device_the_emulator_opened_that_the_claimed_acl_does_not_allow_is_violated() {
    let mut t = T::new();
    acl_vm(&mut t, &[char_rule(1, 3)]);
    t.gain(3, "/dev/urandom", urandom(), Op::Open);
    t.claim(gained(Resrc::Rng, "/dev/urandom"));
    // The device finding of the emulator's open is another matter: only the claim's verdict.
    let v = t
        .out
        .drain(..)
        .find(|v| v.claim.kind == "rng")
        .expect("the rng verdict");
    assert_eq!(v.status, Status::Violated, "{}", v.reason);
    assert!(has(&v, "does not allow"), "{}", v.reason);
}

#[test]
fn a_device_the_manager_passed_needs_no_acl() {
    let mut t = T::new();
    acl_vm(&mut t, &[char_rule(1, 3)]);
    let tpm = file(
        FileKind::Char,
        DevNum::new(0, 5),
        9,
        Some(DevNum::new(10, 224)),
    );
    t.k.files.insert("/dev/tpm0".into(), tpm);
    t.gain(30, "/dev/tpm0", tpm, Op::Inherit);
    t.claim(gained(Resrc::Tpm, "/dev/tpm0"));
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    assert_eq!(v.claim.kind, "tpm");
}

#[test]
fn a_pci_hostdev_is_its_iommu_groups_vfio_node_held_and_allowed() {
    let mut t = T::new();
    let vfio = file(
        FileKind::Char,
        DevNum::new(0, 5),
        30,
        Some(DevNum::new(243, 0)),
    );
    t.k.host_devices
        .insert(("pci".into(), "0000:00:1f.0".into()), "/dev/vfio/12".into());
    t.k.files.insert("/dev/vfio/12".into(), vfio);
    acl_vm(&mut t, &[char_rule(243, 0)]);
    t.gain(40, "/dev/vfio/12", vfio, Op::Open);
    let dev = Target::HostDev {
        bus: "pci".into(),
        address: "0000:00:1f.0".into(),
    };
    t.claim(ClaimKind::Resource {
        resrc: Resrc::Hostdev,
        reason: "attach".into(),
        old: None,
        new: Some(dev.clone()),
    });
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    assert_eq!(v.claim.kind, "hostdev");
    assert_eq!(v.evidence[0].rdev.as_deref(), Some("243:0"));
    assert!(v.evidence.iter().any(|e| e.what == "map"));
    // An address sysfs does not know is unknown, never confirmed.
    t.claim(ClaimKind::Resource {
        resrc: Resrc::Hostdev,
        reason: "attach".into(),
        old: None,
        new: Some(Target::HostDev {
            bus: "pci".into(),
            address: "0000:00:02.0".into(),
        }),
    });
    assert_eq!(t.one().status, Status::Unknown);
}

#[test]
fn a_pty_chardev_is_the_ptmx_fd_whose_tty_index_is_its_number() {
    let mut t = T::new();
    let ptmx = file(
        FileKind::Char,
        DevNum::new(0, 5),
        6,
        Some(DevNum::new(5, 2)),
    );
    let pts3 = file(
        FileKind::Char,
        DevNum::new(0, 24),
        6,
        Some(DevNum::new(136, 3)),
    );
    t.k.files.insert("/dev/pts/3".into(), pts3);
    t.k.files.insert(
        "/dev/pts/4".into(),
        file(
            FileKind::Char,
            DevNum::new(0, 24),
            7,
            Some(DevNum::new(136, 4)),
        ),
    );
    t.gain(11, "/dev/ptmx", ptmx, Op::Open);
    t.k.ptys.insert(FdRef::new(EMU, 11), 3);
    t.claim(gained(Resrc::Chardev, "/dev/pts/3"));
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    assert!(
        v.evidence[0]
            .detail
            .as_deref()
            .unwrap()
            .contains("tty-index 3")
    );
    t.claim(gained(Resrc::Chardev, "/dev/pts/4"));
    t.none();
    t.at(100).tick();
    assert_eq!(t.one().status, Status::Violated);
}

#[test]
fn a_unix_socket_chardev_is_the_socket_bound_there() {
    let mut t = T::new();
    let sockfile = file(FileKind::Socket, FS, 300, None);
    t.k.files.insert("/run/a.sock".into(), sockfile);
    t.k.files
        .insert("/run/b.sock".into(), file(FileKind::Socket, FS, 301, None));
    t.k.sockets.insert("/run/a.sock".into(), vec![9000]);
    t.k.sockets.insert("/run/b.sock".into(), vec![9001]);
    t.gain(
        29,
        "socket:[9000]",
        file(FileKind::Socket, DevNum::new(0, 8), 9000, None),
        Op::Inherit,
    );
    t.claim(gained(Resrc::Chardev, "/run/a.sock"));
    assert_eq!(t.one().status, Status::Confirmed);
    // Bound by another process: the emulator may be its client, which fds do not show.
    t.claim(gained(Resrc::Chardev, "/run/b.sock"));
    let v = t.one();
    assert_eq!(v.status, Status::Unknown, "{}", v.reason);
    assert!(has(&v, "sock_diag"), "{}", v.reason);
}

#[test]
fn a_file_chardev_written_by_a_log_daemon_is_found_through_its_pipe() {
    let mut t = T::new();
    let log = file(FileKind::Regular, FS, 500, None);
    t.k.files.insert("/var/log/serial.log".into(), log);
    let pipe = file(FileKind::Fifo, PIPEFS, 4242, None);
    // libvirtd closed its copy before the tracker read it: only the number is known, and the
    // file is read again now.
    let unknown = FdIdentity {
        kind: FileKind::Unknown,
        dev: None,
        ino: None,
        ..ident("?", pipe)
    };
    t.record(Op::Inherit, 6, unknown);
    t.k.fresh
        .insert(FdRef::new(EMU, 6), ident("pipe:[4242]", pipe));
    // virtlogd holds the pipe's read end and the file.
    t.k.others.push(Holder {
        at: FdRef::new(LOGD, 17),
        file: (PIPEFS, 4242),
        comm: "virtlogd".into(),
    });
    t.k.others.push(Holder {
        at: FdRef::new(LOGD, 18),
        file: (FS, 500),
        comm: "virtlogd".into(),
    });
    t.claim(gained(Resrc::Chardev, "/var/log/serial.log"));
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    let d = v.evidence[0].detail.as_deref().unwrap();
    assert!(
        d.starts_with("inferred:") && d.contains("virtlogd (pid 40)"),
        "{d}"
    );
    assert_eq!((v.evidence[1].pid, v.evidence[1].fd), (LOGD, Some(18)));
}

#[test]
fn a_file_held_by_a_process_with_no_pipe_to_the_emulator_is_not_the_emulators() {
    let mut t = T::new();
    let log = file(FileKind::Regular, FS, 500, None);
    t.k.files.insert("/var/log/serial.log".into(), log);
    t.gain(
        6,
        "pipe:[4242]",
        file(FileKind::Fifo, PIPEFS, 4242, None),
        Op::Inherit,
    );
    t.k.others.push(Holder {
        at: FdRef::new(LOGD, 18),
        file: (FS, 500),
        comm: "virtlogd".into(),
    });
    t.claim(gained(Resrc::Chardev, "/var/log/serial.log"));
    t.at(100).tick();
    assert_eq!(t.one().status, Status::Violated);
}

#[test]
fn a_pipe_chardev_is_its_in_and_out_fifos() {
    let mut t = T::new();
    let fin = file(FileKind::Fifo, FS, 601, None);
    t.k.files.insert("/run/p.in".into(), fin);
    t.k.files
        .insert("/run/p.out".into(), file(FileKind::Fifo, FS, 602, None));
    t.gain(8, "/run/p.in", fin, Op::Open);
    t.claim(gained(Resrc::Chardev, "/run/p"));
    assert_eq!(t.one().status, Status::Confirmed);
}

#[test]
fn a_failed_attach_is_confirmed_while_nothing_holds_it() {
    let mut t = T::new();
    t.claim_with(gained(Resrc::Disk, DISK), false);
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    assert!(has(&v, "failed"), "{}", v.reason);
}

// ---- detach and release ----

#[test]
fn a_detach_is_confirmed_by_the_close_of_the_images_fd() {
    let mut t = T::new();
    t.gain(13, DISK, image(), Op::Open);
    t.claim(gained(Resrc::Disk, DISK));
    t.out.clear();
    t.at(5).release(13);
    t.claim(detached(Resrc::Disk, DISK));
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    assert_eq!(
        (v.evidence[0].what.as_str(), v.evidence[0].fd),
        ("close", Some(13))
    );
    t.at(200).tick();
    t.none();
}

#[test]
fn a_detach_while_the_emulator_still_holds_the_image_is_violated_at_the_deadline() {
    let mut t = T::new();
    t.gain(13, DISK, image(), Op::Open);
    t.claim(gained(Resrc::Disk, DISK));
    t.out.clear();
    t.claim(detached(Resrc::Disk, DISK));
    t.none();
    t.at(100).tick();
    let v = t.one();
    assert_eq!(v.status, Status::Violated, "{}", v.reason);
    assert!(has(&v, "still holds fd 13"), "{}", v.reason);
}

#[test]
fn a_detach_of_a_deleted_image_is_judged_by_the_fds_it_was_confirmed_with() {
    let mut t = T::new();
    t.gain(13, DISK, image(), Op::Open);
    t.claim(gained(Resrc::Disk, DISK));
    t.out.clear();
    t.release(13);
    t.k.files.remove(&PathBuf::from(DISK));
    t.claim(detached(Resrc::Disk, DISK));
    assert_eq!(t.one().status, Status::Confirmed);
}

#[test]
fn a_release_with_no_detach_is_violated_a_deadline_later() {
    let mut t = T::new();
    t.gain(13, DISK, image(), Op::Open);
    let id = t.claim(gained(Resrc::Disk, DISK));
    t.out.clear();
    t.at(10).release(13);
    t.at(109).tick();
    t.none();
    t.at(110).tick();
    let v = t.one();
    assert_eq!(v.status, Status::Violated, "{}", v.reason);
    assert_eq!(v.claim.id, id);
    assert!(has(&v, "no detach record"), "{}", v.reason);
    assert_eq!(
        (v.evidence[0].what.as_str(), v.evidence[0].fd),
        ("close", Some(13))
    );
    t.at(500).tick();
    t.none();
}

#[test]
fn a_reopen_of_the_image_is_no_release() {
    let mut t = T::new();
    t.gain(13, DISK, image(), Op::Open);
    t.claim(gained(Resrc::Disk, DISK));
    t.out.clear();
    t.at(10).release(13);
    t.at(11).gain(14, DISK, image(), Op::Open);
    t.at(200).tick();
    t.none();
    // And the new fd is the one watched from then on.
    t.at(300).release(14);
    t.at(400).tick();
    assert_eq!(t.one().status, Status::Violated);
}

#[test]
fn a_release_the_detach_follows_within_the_deadline_is_no_violation() {
    let mut t = T::new();
    t.gain(13, DISK, image(), Op::Open);
    t.claim(gained(Resrc::Disk, DISK));
    t.out.clear();
    t.at(10).release(13);
    t.at(50).claim(detached(Resrc::Disk, DISK));
    assert_eq!(t.one().status, Status::Confirmed);
    t.at(200).tick();
    t.none();
}

#[test]
fn releases_at_the_vms_stop_are_the_stops() {
    let mut t = T::new();
    t.gain(13, DISK, image(), Op::Open);
    t.claim(gained(Resrc::Disk, DISK));
    t.out.clear();
    t.l.on_stopping(EMU);
    t.at(10).release(13);
    t.at(200).tick();
    t.none();
}

#[test]
fn lost_events_around_a_resource_claim_make_it_unknown() {
    let mut t = T::new();
    t.gain(13, DISK, image(), Op::Open);
    t.l.on_loss(Loss {
        pid: EMU,
        from_ns: t.now,
        to_ns: t.now + MS,
        lost: 2,
    });
    t.at(1).claim(gained(Resrc::Disk, DISK));
    let v = t.one();
    assert_eq!(v.status, Status::Unknown, "{}", v.reason);
    assert!(has(&v, "lost"), "{}", v.reason);
}
