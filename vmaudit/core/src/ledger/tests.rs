//! Every rule of the ledger, on a stand-in kernel ([`FakeKernel`]): no root, no kernel.

use std::path::PathBuf;

use super::*;
use crate::{
    acl::{Acl, DecisionDev, DevTypes, DeviceRule},
    claim::{AclChange, Handed},
    fd::{DevNum, FdEntry, FdIdentity, FileKind, Op, Outcome, Source, TUN},
    view::{DevicePolicy, Enforcer, FakeKernel, FdRef, NetFd, ProcessInfo},
};

const MGR: u32 = 10;
const EMU: u32 = 20;
const STRANGER: u32 = 30;
const MAC: &str = "52:54:00:00:00:01";
const UUID: &str = "u-1";
const MS: u64 = 1_000_000;
const DEADLINE: u64 = 100 * MS;

fn tun(iface: Option<&str>) -> FdIdentity {
    FdIdentity {
        path: "/dev/net/tun".into(),
        kind: FileKind::Char,
        rdev: Some(TUN),
        dev: None,
        ino: Some(1),
        flags: None,
        mode: None,
        ofd: None,
        iface: iface.map(str::to_owned),
        source: Source::Proc,
    }
}

fn device(path: &str, major: u32, minor: u32) -> FdIdentity {
    FdIdentity {
        path: path.into(),
        rdev: Some(DevNum::new(major, minor)),
        ..tun(None)
    }
}

fn entry(fd: i32, id: FdIdentity, since: u64, via: Op) -> FdEntry {
    FdEntry {
        fd,
        id,
        cloexec: false,
        since_ns: since,
        via,
    }
}

fn rec(pid: u32, op: Op, fd: i32, ts: u64, file: FdIdentity) -> FdRecord {
    FdRecord {
        ty: "fd",
        ts,
        pid,
        tid: pid,
        op,
        syscall: "test",
        fd: Some(fd),
        result: Outcome::Ok,
        cloexec: Some(false),
        from_fd: None,
        file: Some(file),
    }
}

/// A ledger on a stand-in kernel, with a clock.
struct T {
    l: Ledger,
    k: FakeKernel,
    out: Vec<Verdict>,
    now: u64,
    ids: u64,
}

impl T {
    fn new() -> Self {
        let mut k = FakeKernel::default();
        k.tables.insert(MGR, Default::default());
        Self {
            l: Ledger::new(DEADLINE, [MGR]),
            k,
            out: Vec::new(),
            now: 1_000 * MS,
            ids: 0,
        }
    }

    fn at(&mut self, ms: u64) -> &mut Self {
        self.now = 1_000 * MS + ms * MS;
        self
    }

    fn fd(&mut self, r: FdRecord) {
        // The table follows the record, as the tracker's does.
        let at = r.fd.unwrap();
        if r.op.is_release() {
            self.k.drop_fd(r.pid, at);
        } else if r.op.is_gain() {
            self.k
                .hold(r.pid, entry(at, r.file.clone().unwrap(), r.ts, r.op));
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

    fn recheck(&mut self) {
        self.l.recheck(&self.k, self.now, &mut self.out);
    }

    /// The one verdict since the last call.
    fn one(&mut self) -> Verdict {
        assert_eq!(self.out.len(), 1, "{:#?}", self.out);
        self.out.pop().unwrap()
    }

    fn none(&mut self) {
        assert!(self.out.is_empty(), "{:#?}", self.out);
    }

    /// A running VM whose emulator holds tap fd 7 (interface vnet0, libvirt's host-side MAC),
    /// its start and NIC claims confirmed, as libvirt's records say it.
    fn libvirt_vm(&mut self) {
        self.k.processes.insert(EMU, ProcessInfo::default());
        self.k
            .addresses
            .insert("vnet0".into(), "fe:54:00:00:00:01".into());
        self.fd(rec(MGR, Op::Open, 40, self.now, tun(Some("vnet0"))));
        self.claim(open(None));
        self.fd(rec(EMU, Op::Inherit, 7, self.now, tun(Some("vnet0"))));
        self.fd(rec(MGR, Op::Close, 40, self.now, tun(Some("vnet0"))));
        self.claim(up(None, vec![]));
        self.claim(ClaimKind::VmStart { pid: EMU });
        let v: Vec<Status> = self.out.drain(..).map(|v| v.status).collect();
        assert_eq!(v, [Status::Confirmed; 3]);
    }
}

fn child_of_manager() -> ProcessInfo {
    ProcessInfo {
        ppid: MGR,
        ..Default::default()
    }
}

fn open(fd: Option<i32>) -> ClaimKind {
    ClaimKind::NetOpen {
        mac: MAC.into(),
        path: "/dev/net/tun".into(),
        rdev: Some(TUN),
        fd,
    }
}

fn up(pid: Option<u32>, handed: Vec<Handed>) -> ClaimKind {
    ClaimKind::NetUp {
        mac: MAC.into(),
        attach: false,
        emulator_pid: pid,
        handed,
    }
}

fn handed(fd: i32, same: Option<bool>) -> Handed {
    Handed {
        fd,
        emulator_fd: fd,
        same_at_handoff: same,
        rdev: Some(TUN),
        path: "/dev/net/tun".into(),
    }
}

fn detach(fds: Option<Vec<i32>>) -> ClaimKind {
    ClaimKind::NetDetach {
        mac: MAC.into(),
        emulator_pid: None,
        fds,
    }
}

fn has(v: &Verdict, what: &str) -> bool {
    v.reason.contains(what)
}

// ---- net-open ----

#[test]
fn an_open_is_confirmed_by_the_managers_open_event() {
    let mut t = T::new();
    t.fd(rec(MGR, Op::Open, 7, t.now, tun(None)));
    t.at(1).claim(open(Some(7)));
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    assert_eq!((v.evidence[0].pid, v.evidence[0].fd), (MGR, Some(7)));
    assert_eq!(v.claim.fd, Some(7));
}

#[test]
fn a_libvirt_open_names_the_managers_oldest_unnamed_open_and_says_so() {
    let mut t = T::new();
    t.fd(rec(MGR, Op::Open, 7, t.now, tun(None)));
    t.fd(rec(MGR, Op::Open, 8, t.now + 1, tun(None)));
    t.at(1).claim(open(None));
    let first = t.one();
    t.claim(open(None));
    let second = t.one();
    assert_eq!(first.evidence[0].fd, Some(7));
    assert_eq!(second.evidence[0].fd, Some(8));
    assert!(
        first.evidence[0]
            .detail
            .as_deref()
            .unwrap()
            .starts_with("inferred:")
    );
}

#[test]
fn an_open_never_seen_is_unconfirmed_at_its_deadline_and_not_before() {
    let mut t = T::new();
    t.claim(open(Some(7)));
    t.none();
    t.at(99).tick();
    t.none();
    t.at(100).tick();
    let v = t.one();
    assert_eq!(v.status, Status::Unconfirmed);
    assert!(has(&v, "saw no open"), "{}", v.reason);
}

#[test]
fn an_open_after_the_record_does_not_confirm_it() {
    let mut t = T::new();
    t.claim(open(Some(7)));
    t.fd(rec(MGR, Op::Open, 7, t.now + 1, tun(None)));
    t.at(100).tick();
    assert_eq!(t.one().status, Status::Unconfirmed);
}

#[test]
fn a_failed_open_is_confirmed_by_the_kernels_refusal() {
    let mut t = T::new();
    let mut r = rec(MGR, Op::Open, 0, t.now, device("/dev/vhost-net", 10, 238));
    r.fd = None;
    r.result = Outcome::from_errno(2);
    r.file.as_mut().unwrap().path = "/dev/net/tun".into();
    t.l.on_fd(&r, &t.k, &mut t.out);
    t.at(1).claim_with(open(None), false);
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed);
    assert!(has(&v, "ENOENT"), "{}", v.reason);
}

// ---- net-start / net-attach ----

#[test]
fn a_start_with_handed_fds_is_confirmed_by_the_table_and_kcmp_at_handoff() {
    let mut t = T::new();
    t.fd(rec(EMU, Op::Inherit, 7, t.now, tun(None)));
    t.claim(up(Some(EMU), vec![handed(7, Some(true))]));
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    assert_eq!((v.evidence[0].pid, v.evidence[0].fd), (EMU, Some(7)));
    assert!(v.evidence[0].detail.as_deref().unwrap().contains("kcmp"));
}

#[test]
fn a_handed_fd_that_kcmp_found_different_is_violated() {
    let mut t = T::new();
    t.fd(rec(EMU, Op::Inherit, 7, t.now, tun(None)));
    t.claim(up(Some(EMU), vec![handed(7, Some(false))]));
    let v = t.one();
    assert_eq!(v.status, Status::Violated);
    assert!(has(&v, "not the open file"), "{}", v.reason);
}

/// A tun fd whose open file description the kernel names `ofd`.
fn tun_ofd(ofd: u64) -> FdIdentity {
    FdIdentity {
        ofd: Some(ofd),
        ..tun(None)
    }
}

/// The manager opened fd 5 (kernel id 42), and its open record named it (as in `run`); the
/// emulator holds fd 7 with kernel id `emu_ofd`.
fn handoff(emu_ofd: u64, kcmp: Option<bool>) -> Verdict {
    let mut t = T::new();
    t.fd(rec(MGR, Op::Open, 5, t.now, tun_ofd(42)));
    t.claim(open(Some(5)));
    assert_eq!(t.one().status, Status::Confirmed);
    t.out.clear();
    t.fd(rec(EMU, Op::Inherit, 7, t.now, tun_ofd(emu_ofd)));
    t.claim(up(
        Some(EMU),
        vec![Handed {
            emulator_fd: 7,
            ..handed(5, kcmp)
        }],
    ));
    t.one()
}

#[test]
fn a_handed_fd_is_the_managers_open_by_the_kernels_id_kcmp_cross_checking() {
    let v = handoff(42, Some(true));
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    let d = v.evidence[0].detail.clone().unwrap();
    assert!(
        d.contains("id is the one of the manager's fd 5; kcmp at hand-off agrees"),
        "{d}"
    );
    // Without kcmp, the ids alone decide.
    let v = handoff(42, None);
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    assert!(v.evidence[0].detail.as_deref().unwrap().contains("no kcmp"));
}

#[test]
fn a_later_hand_off_at_the_same_number_is_not_the_claims_fd() {
    // fd 7 arrives (the manager's open, id 42), goes with its detach, and the number comes back
    // with the next attach's file (id 43) before the verifier takes the first attach up.
    let mut t = T::new();
    let now = t.at(0).now;
    t.fd(rec(MGR, Op::Open, 5, now, tun_ofd(42)));
    t.claim(open(Some(5)));
    assert_eq!(t.one().status, Status::Confirmed);
    let now = t.at(1).now;
    t.fd(rec(EMU, Op::RecvFd, 7, now, tun_ofd(42)));
    let made = t.at(2).now;
    let now = t.at(3).now;
    t.fd(rec(EMU, Op::Close, 7, now, tun_ofd(42)));
    let now = t.at(5).now;
    t.fd(rec(MGR, Op::Open, 5, now, tun_ofd(43)));
    let now = t.at(6).now;
    t.fd(rec(EMU, Op::RecvFd, 7, now, tun_ofd(43)));
    t.now = made;
    let mut attach = up(
        Some(EMU),
        vec![Handed {
            emulator_fd: 7,
            ..handed(5, None)
        }],
    );
    if let ClaimKind::NetUp { attach: a, .. } = &mut attach {
        *a = true;
    }
    t.claim(attach);
    assert!(
        t.out.iter().all(|v| v.status != Status::Violated),
        "{:#?}",
        t.out
    );
}

#[test]
fn a_handed_fd_whose_kernel_id_differs_or_that_kcmp_contradicts_is_violated() {
    let v = handoff(43, Some(true));
    assert_eq!(v.status, Status::Violated, "{}", v.reason);
    assert!(has(&v, "open-file-description ids"), "{}", v.reason);
    assert!(
        v.evidence[0]
            .detail
            .as_deref()
            .unwrap()
            .contains("kcmp at hand-off disagrees"),
        "{:?}",
        v.evidence
    );
    // The ids say the same file and kcmp says not: the kernel's two answers disagree.
    let v = handoff(42, Some(false));
    assert_eq!(v.status, Status::Violated, "{}", v.reason);
}

#[test]
fn a_handed_fd_the_emulator_closed_before_the_claim_is_violated_with_the_close() {
    let mut t = T::new();
    t.fd(rec(EMU, Op::Inherit, 7, t.now, tun(None)));
    t.fd(rec(EMU, Op::Close, 7, t.now + 5, tun(None)));
    t.at(1).claim(up(Some(EMU), vec![handed(7, Some(true))]));
    // A detach may still explain the close, until the deadline.
    t.none();
    t.at(200).tick();
    let v = t.one();
    assert_eq!(v.status, Status::Violated, "{}", v.reason);
    assert_eq!(
        (v.evidence[0].what.as_str(), v.evidence[0].fd),
        ("close", Some(7))
    );
}

#[test]
fn a_libvirt_start_infers_the_emulators_fd_from_the_taps_address() {
    let mut t = T::new();
    t.k.addresses
        .insert("vnet0".into(), "fe:54:00:00:00:01".into());
    t.claim(ClaimKind::VmStart { pid: EMU });
    t.out.clear();
    t.fd(rec(EMU, Op::Inherit, 9, t.now, tun(Some("vnet0"))));
    t.claim(up(None, vec![]));
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    let d = v.evidence[0].detail.as_deref().unwrap();
    assert!(
        d.starts_with("inferred:") && d.contains("fe:54:00:00:00:01"),
        "{d}"
    );
    assert_eq!(v.claim.fd, Some(9));
}

#[test]
fn a_libvirt_start_infers_the_fd_by_kcmp_when_the_address_does_not_say() {
    let mut t = T::new();
    t.claim(ClaimKind::VmStart { pid: EMU });
    t.fd(rec(MGR, Op::Open, 40, t.now, tun(None)));
    t.claim(open(None));
    t.fd(rec(EMU, Op::Inherit, 9, t.now, tun(None)));
    t.k.same.push((FdRef::new(MGR, 40), FdRef::new(EMU, 9)));
    t.out.clear();
    t.claim(up(None, vec![]));
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    assert!(v.evidence[0].detail.as_deref().unwrap().contains("kcmp"));
}

#[test]
fn a_libvirt_start_waits_for_the_vms_start_record() {
    let mut t = T::new();
    t.k.addresses
        .insert("vnet0".into(), "fe:54:00:00:00:01".into());
    t.fd(rec(EMU, Op::Inherit, 9, t.now, tun(Some("vnet0"))));
    t.claim(up(None, vec![]));
    t.none();
    t.claim(ClaimKind::VmStart { pid: EMU });
    let got: Vec<(String, Status)> = t.out.drain(..).map(|v| (v.claim.kind, v.status)).collect();
    assert_eq!(
        got,
        [
            ("vm-start".into(), Status::Confirmed),
            ("net-start".into(), Status::Confirmed)
        ]
    );
}

#[test]
fn a_start_for_a_vm_never_seen_to_start_is_unknown() {
    let mut t = T::new();
    t.claim(up(None, vec![]));
    t.at(100).tick();
    let v = t.one();
    assert_eq!(v.status, Status::Unknown);
    assert_eq!(t.l.stats.unknown_vm, 1);
}

#[test]
fn a_libvirt_start_whose_emulator_closed_the_tap_right_away_is_violated_with_the_close() {
    let mut t = T::new();
    t.k.addresses
        .insert("vnet0".into(), "fe:54:00:00:00:01".into());
    t.claim(ClaimKind::VmStart { pid: EMU });
    t.out.clear();
    t.fd(rec(EMU, Op::Inherit, 9, t.now, tun(Some("vnet0"))));
    t.fd(rec(EMU, Op::Close, 9, t.now + 1, tun(Some("vnet0"))));
    // The tap vanished with its last fd: its address is no longer readable.
    t.k.addresses.clear();
    t.at(1).claim(up(None, vec![]));
    t.none();
    t.at(200).tick();
    t.out.retain(|v| v.claim.kind != "vm-start");
    let v = t.one();
    assert_eq!(v.status, Status::Violated, "{}", v.reason);
    assert_eq!(
        (v.evidence[0].what.as_str(), v.evidence[0].fd),
        ("close", Some(9))
    );
}

#[test]
fn a_start_no_fd_of_the_emulator_answers_is_violated_at_the_deadline() {
    let mut t = T::new();
    t.fd(rec(EMU, Op::Inherit, 3, t.now, device("/dev/null", 1, 3)));
    t.claim(ClaimKind::VmStart { pid: EMU });
    t.out.clear();
    t.claim(up(None, vec![]));
    t.none();
    t.at(100).tick();
    let v = t.one();
    assert_eq!(v.status, Status::Violated);
    assert!(has(&v, "holds no fd for it"), "{}", v.reason);
}

#[test]
fn a_start_of_an_emulator_not_watched_is_unknown() {
    let mut t = T::new();
    t.claim(up(Some(99), vec![handed(7, Some(true))]));
    t.at(100).tick();
    assert_eq!(t.one().status, Status::Unknown);
}

// ---- release and detach, in either order ----

#[test]
fn a_release_then_the_detach_that_explains_it_is_no_violation() {
    let mut t = T::new();
    t.libvirt_vm();
    t.fd(rec(EMU, Op::Close, 7, t.now + MS, tun(None)));
    t.at(50).tick();
    t.none();
    t.claim(detach(None));
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    assert_eq!(
        (v.evidence[0].what.as_str(), v.evidence[0].fd),
        ("close", Some(7))
    );
    t.at(1000).tick();
    t.none();
}

#[test]
fn a_detach_then_the_release_is_no_violation() {
    let mut t = T::new();
    t.libvirt_vm();
    t.claim(detach(Some(vec![7])));
    t.none();
    t.fd(rec(EMU, Op::Close, 7, t.now + MS, tun(None)));
    t.at(2).tick();
    assert_eq!(t.one().status, Status::Confirmed);
    t.at(1000).tick();
    t.none();
}

#[test]
fn a_release_with_no_detach_is_violated_with_the_close_at_the_deadline() {
    let mut t = T::new();
    t.libvirt_vm();
    let close_ts = t.now + MS;
    t.fd(rec(EMU, Op::Close, 7, close_ts, tun(None)));
    t.at(50).tick();
    t.none();
    t.at(200).tick();
    let v = t.one();
    assert_eq!(v.status, Status::Violated);
    assert!(has(&v, "with no detach record"), "{}", v.reason);
    assert_eq!(v.claim.kind, "net-start");
    let e = &v.evidence[0];
    assert_eq!((e.pid, e.fd, e.ts), (EMU, Some(7), Some(close_ts)));
}

/// A hot-unplug right after the attach: the kernel's close is applied before the attach claim
/// is judged, and the detach record comes after it.
#[test]
fn an_attach_whose_fd_the_detach_after_it_released_is_confirmed_with_gain_and_close() {
    let mut t = T::new();
    t.k.processes.insert(EMU, child_of_manager());
    t.claim(ClaimKind::VmStart { pid: EMU });
    t.out.clear();
    let gain = t.now;
    t.fd(rec(EMU, Op::RecvFd, 7, gain, tun(None)));
    t.fd(rec(EMU, Op::Close, 7, gain + MS, tun(None)));
    let mut attach = up(Some(EMU), vec![handed(7, Some(true))]);
    if let ClaimKind::NetUp { attach: a, .. } = &mut attach {
        *a = true;
    }
    t.at(2).claim(attach);
    t.none();
    t.claim(detach(Some(vec![7])));
    t.at(3).tick();
    let mut v = std::mem::take(&mut t.out);
    v.sort_by_key(|v| v.claim.id);
    let st: Vec<Status> = v.iter().map(|v| v.status).collect();
    assert_eq!(st, [Status::Confirmed; 2], "{v:#?}");
    let whats: Vec<(&str, Option<u64>)> = v[0]
        .evidence
        .iter()
        .map(|e| (e.what.as_str(), e.ts))
        .collect();
    assert_eq!(
        whats,
        [("recv_fd", Some(gain)), ("close", Some(gain + MS))],
        "{:#?}",
        v[0]
    );
    t.at(1000).tick();
    t.none();
}

/// The same in monitor mode: the detach names no fds; it waits for the attach, which names
/// them.
#[test]
fn a_libvirt_attach_released_before_it_was_judged_is_confirmed_and_so_is_its_detach() {
    let mut t = T::new();
    t.libvirt_vm();
    t.k.addresses
        .insert("vnet1".into(), "fe:54:00:00:00:02".into());
    let mac2 = "52:54:00:00:00:02";
    t.fd(rec(EMU, Op::RecvFd, 8, t.now, tun(Some("vnet1"))));
    t.fd(rec(EMU, Op::Close, 8, t.now + MS, tun(Some("vnet1"))));
    t.at(2).claim(ClaimKind::NetUp {
        mac: mac2.into(),
        attach: true,
        emulator_pid: None,
        handed: vec![],
    });
    t.none();
    t.claim(ClaimKind::NetDetach {
        mac: mac2.into(),
        emulator_pid: None,
        fds: None,
    });
    t.at(3).tick();
    let v = std::mem::take(&mut t.out);
    let st: Vec<(&str, Status)> = v
        .iter()
        .map(|v| (v.claim.kind.as_str(), v.status))
        .collect();
    assert_eq!(
        st,
        [
            ("net-attach", Status::Confirmed),
            ("net-detach", Status::Confirmed)
        ],
        "{v:#?}"
    );
    t.at(1000).tick();
    t.none();
}

/// A detach of an earlier attach of the NIC explains no release after a later attach.
#[test]
fn an_earlier_detach_does_not_explain_a_later_attachs_release() {
    let mut t = T::new();
    t.libvirt_vm();
    t.claim(detach(None));
    t.fd(rec(EMU, Op::Close, 7, t.now + MS, tun(None)));
    t.at(2).tick();
    assert_eq!(t.one().status, Status::Confirmed);
    t.fd(rec(EMU, Op::RecvFd, 7, t.now, tun(Some("vnet0"))));
    t.fd(rec(EMU, Op::Close, 7, t.now + MS, tun(Some("vnet0"))));
    t.at(3).claim(ClaimKind::NetUp {
        mac: MAC.into(),
        attach: true,
        emulator_pid: None,
        handed: vec![],
    });
    t.none();
    t.at(300).tick();
    let v = t.one();
    assert_eq!(v.status, Status::Violated, "{v:#?}");
    assert!(has(&v, "with no detach"), "{}", v.reason);
}

/// Attach and detach, thousands of times in one VM (half of them with the unplug's close
/// seen before the attach is judged): every claim confirmed, and what the ledger keeps stays
/// flat.
#[test]
fn thousands_of_attach_detach_cycles_keep_the_ledger_flat() {
    let mut t = T::new();
    t.k.processes.insert(EMU, child_of_manager());
    t.claim(ClaimKind::VmStart { pid: EMU });
    t.out.clear();
    let mut sizes = Vec::new();
    for i in 0..3000u64 {
        let ms = i * 10;
        let mac = format!("52:54:00:00:{:02x}:{:02x}", i / 256, i % 256);
        t.at(ms);
        t.fd(rec(MGR, Op::Open, 40, t.now, tun(None)));
        t.claim(ClaimKind::NetOpen {
            mac: mac.clone(),
            path: "/dev/net/tun".into(),
            rdev: Some(TUN),
            fd: Some(40),
        });
        t.fd(rec(EMU, Op::RecvFd, 7, t.now, tun(None)));
        t.fd(rec(MGR, Op::Close, 40, t.now, tun(None)));
        // Every other cycle, the unplug's close is applied before the attach is judged.
        let raced = i % 2 == 0;
        if raced {
            t.fd(rec(EMU, Op::Close, 7, t.now + 1, tun(None)));
        }
        t.claim(ClaimKind::NetUp {
            mac: mac.clone(),
            attach: true,
            emulator_pid: Some(EMU),
            handed: vec![Handed {
                fd: 40,
                ..handed(7, Some(true))
            }],
        });
        t.at(ms + 5);
        if !raced {
            t.fd(rec(EMU, Op::Close, 7, t.now, tun(None)));
        }
        t.claim(ClaimKind::NetDetach {
            mac,
            emulator_pid: Some(EMU),
            fds: Some(vec![7]),
        });
        t.tick();
        assert!(
            t.out.iter().all(|v| v.status == Status::Confirmed),
            "{:#?}",
            t.out
        );
        t.out.clear();
        if i % 1000 == 999 {
            sizes.push(t.l.footprint());
        }
    }
    assert_eq!(sizes[0], sizes[2], "{sizes:?}");
}

#[test]
fn a_release_on_the_emulators_way_out_is_no_violation() {
    let mut t = T::new();
    t.libvirt_vm();
    t.fd(rec(EMU, Op::Close, 7, t.now + MS, tun(None)));
    t.k.exit(EMU);
    t.at(200).tick();
    t.none();
}

#[test]
fn a_detach_of_an_emulator_with_no_table_is_unknown() {
    let mut t = T::new();
    t.claim(ClaimKind::NetDetach {
        mac: MAC.into(),
        emulator_pid: Some(99),
        fds: Some(vec![7]),
    });
    let v = t.one();
    assert_eq!(v.status, Status::Unknown, "{}", v.reason);
}

#[test]
fn a_detach_whose_fd_is_still_held_is_violated_at_the_deadline() {
    let mut t = T::new();
    t.libvirt_vm();
    t.claim(detach(None));
    t.none();
    t.at(200).tick();
    let v = t.one();
    assert_eq!(v.status, Status::Violated);
    assert!(has(&v, "still holds fd 7"), "{}", v.reason);
    assert_eq!(
        (v.evidence[0].what.as_str(), v.evidence[0].fd),
        ("holds", Some(7))
    );
}

#[test]
fn a_detach_of_a_nic_never_confirmed_is_unknown() {
    let mut t = T::new();
    t.claim(ClaimKind::VmStart { pid: EMU });
    t.out.clear();
    t.claim(detach(None));
    assert_eq!(t.one().status, Status::Unknown);
}

#[test]
fn a_failed_detach_is_confirmed_while_the_emulator_holds_the_fds() {
    let mut t = T::new();
    t.libvirt_vm();
    t.claim_with(detach(Some(vec![7])), false);
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    t.fd(rec(EMU, Op::Close, 7, t.now + MS, tun(None)));
    t.at(200).tick();
    assert_eq!(
        t.one().status,
        Status::Violated,
        "a failed detach releases nothing: the release is unexplained"
    );
}

// ---- lost events ----

fn lose(t: &mut T, pid: u32, from_ms: u64, to_ms: u64) {
    t.l.on_loss(Loss {
        pid,
        from_ns: 1_000 * MS + from_ms * MS,
        to_ns: 1_000 * MS + to_ms * MS,
        lost: 3,
    });
}

#[test]
fn lost_events_in_a_claims_window_make_it_unknown_for_every_kind() {
    let mut t = T::new();
    t.fd(rec(MGR, Op::Open, 7, t.now, tun(None)));
    lose(&mut t, MGR, 0, 1);
    t.at(2).claim(open(Some(7)));
    let v = t.one();
    assert_eq!(v.status, Status::Unknown, "open: {}", v.reason);
    assert!(v.evidence.iter().any(|e| e.what == "lost"));

    let mut t = T::new();
    t.libvirt_vm();
    lose(&mut t, EMU, 1, 2);
    t.fd(rec(EMU, Op::Close, 7, t.now + 3 * MS, tun(None)));
    t.at(4).claim(detach(None));
    assert_eq!(t.one().status, Status::Unknown, "detach");

    let mut t = T::new();
    t.k.processes.insert(EMU, child_of_manager());
    t.k.tables.insert(EMU, Default::default());
    lose(&mut t, EMU, 0, 1);
    t.at(2).claim(ClaimKind::VmStart { pid: EMU });
    assert_eq!(t.one().status, Status::Unknown, "start");

    let mut t = T::new();
    t.libvirt_vm();
    t.k.exit(EMU);
    lose(&mut t, EMU, 5, 6);
    t.at(7).claim(ClaimKind::VmStop {
        pid: None,
        reason: "destroyed".into(),
    });
    assert_eq!(t.one().status, Status::Unknown, "stop");
}

#[test]
fn lost_events_outside_the_window_change_nothing() {
    let mut t = T::new();
    lose(&mut t, MGR, 0, 1);
    t.at(500).fd(rec(MGR, Op::Open, 7, 1_500 * MS, tun(None)));
    t.at(501).claim(open(Some(7)));
    assert_eq!(t.one().status, Status::Confirmed);
    let mut t = T::new();
    lose(&mut t, STRANGER, 0, 1000);
    t.fd(rec(MGR, Op::Open, 7, t.now, tun(None)));
    t.claim(open(Some(7)));
    assert_eq!(t.one().status, Status::Confirmed, "another process's loss");
}

#[test]
fn lost_events_around_a_release_make_the_finding_unknown() {
    let mut t = T::new();
    t.libvirt_vm();
    t.fd(rec(EMU, Op::Close, 7, t.now + MS, tun(None)));
    lose(&mut t, EMU, 1, 2);
    t.at(200).tick();
    let v = t.one();
    assert_eq!(v.status, Status::Unknown, "{}", v.reason);
}

// ---- copies, sends, escapes ----

#[test]
fn a_nic_fd_held_by_any_other_process_is_violated_once_naming_the_holder() {
    let mut t = T::new();
    t.libvirt_vm();
    t.k.net.push(NetFd {
        at: FdRef::new(STRANGER, 5),
        path: "/dev/net/tun".into(),
        comm: "thief".into(),
    });
    t.k.processes.insert(
        STRANGER,
        ProcessInfo {
            comm: "thief".into(),
            ..Default::default()
        },
    );
    t.recheck();
    t.none();
    t.k.same.push((FdRef::new(STRANGER, 5), FdRef::new(EMU, 7)));
    t.recheck();
    let v = t.one();
    assert_eq!(v.status, Status::Violated);
    assert!(has(&v, "thief (pid 30) as fd 5"), "{}", v.reason);
    assert_eq!((v.evidence[0].pid, v.evidence[0].fd), (STRANGER, Some(5)));
    t.recheck();
    t.none();
}

#[test]
fn the_managers_copy_is_no_violation() {
    let mut t = T::new();
    t.libvirt_vm();
    t.k.hold(MGR, entry(41, tun(None), t.now, Op::Dup));
    t.k.net.push(NetFd {
        at: FdRef::new(MGR, 41),
        path: "/dev/net/tun".into(),
        comm: "libvirtd".into(),
    });
    t.k.same.push((FdRef::new(MGR, 41), FdRef::new(EMU, 7)));
    t.recheck();
    t.none();
}

#[test]
fn a_nic_fd_escaping_into_a_child_of_the_emulator_is_violated_at_once() {
    let mut t = T::new();
    t.libvirt_vm();
    let child = 21;
    t.k.same.push((FdRef::new(child, 7), FdRef::new(EMU, 7)));
    t.fd(rec(child, Op::Inherit, 7, t.now, tun(None)));
    let v = t.one();
    assert_eq!(v.status, Status::Violated);
    assert_eq!((v.evidence[0].pid, v.evidence[0].fd), (child, Some(7)));
    assert!(has(&v, "inherit"), "{}", v.reason);
}

#[test]
fn a_nic_fd_the_emulator_sends_is_violated() {
    let mut t = T::new();
    t.libvirt_vm();
    t.fd(rec(EMU, Op::SendFd, 7, t.now, tun(None)));
    let v = t.one();
    assert_eq!(v.status, Status::Violated);
    assert!(has(&v, "SCM_RIGHTS"), "{}", v.reason);
}

// ---- devices no claim gave ----

fn acl_vm(t: &mut T) {
    t.claim(ClaimKind::Cgroup {
        cgroup: None,
        change: AclChange::DenyAll,
    });
    t.claim(ClaimKind::Cgroup {
        cgroup: None,
        change: AclChange::Allow(DeviceRule {
            types: DevTypes::Char,
            major: Some(1),
            minor: Some(3),
            acl: Acl::RW,
        }),
    });
    t.out.clear();
}

#[test]
fn a_device_outside_the_claimed_acl_is_violated_one_allowed_is_not() {
    let mut t = T::new();
    acl_vm(&mut t);
    t.libvirt_vm();
    t.fd(rec(EMU, Op::Open, 12, t.now, device("/dev/null", 1, 3)));
    t.fd(rec(EMU, Op::Open, 13, t.now, device("/dev/sda", 8, 0)));
    t.at(200).tick();
    let v = t.one();
    assert_eq!(v.status, Status::Violated);
    assert!(has(&v, "claimed ACL does not allow"), "{}", v.reason);
    assert_eq!((v.evidence[0].pid, v.evidence[0].fd), (EMU, Some(13)));
}

#[test]
fn a_network_device_no_claim_gave_is_violated_one_an_attach_names_is_not() {
    let mut t = T::new();
    t.libvirt_vm();
    // Received (getfd) before the attach record that names it.
    t.k.addresses
        .insert("vnet1".into(), "fe:54:00:00:00:02".into());
    t.fd(rec(EMU, Op::RecvFd, 8, t.now, tun(Some("vnet1"))));
    t.claim(ClaimKind::NetUp {
        mac: "52:54:00:00:00:02".into(),
        attach: true,
        emulator_pid: None,
        handed: vec![],
    });
    assert_eq!(t.one().status, Status::Confirmed);
    t.fd(rec(EMU, Op::RecvFd, 9, t.now, tun(Some("vnet9"))));
    t.at(200).tick();
    let v = t.one();
    assert_eq!(v.status, Status::Violated);
    assert!(has(&v, "only the manager opens"), "{}", v.reason);
    assert_eq!(v.evidence[0].fd, Some(9));
}

// ---- cgroup ----

fn cg() -> PathBuf {
    PathBuf::from("/sys/fs/cgroup/machine/vm1")
}

fn rule(major: u32, minor: Option<u32>) -> DeviceRule {
    DeviceRule {
        types: DevTypes::Char,
        major: Some(major),
        minor,
        acl: Acl::RW,
    }
}

fn policy(ids: Vec<u32>, rules: Vec<DeviceRule>) -> DevicePolicy {
    DevicePolicy {
        default_deny: !ids.is_empty(),
        enforcer: Enforcer::Programs { ids, map_id: 5 },
        rules,
    }
}

fn cgroup(change: AclChange) -> ClaimKind {
    ClaimKind::Cgroup {
        cgroup: Some(cg()),
        change,
    }
}

#[test]
fn cgroup_claims_are_held_to_the_device_policy_and_kept_there() {
    let mut t = T::new();
    t.k.policies.insert(
        cg(),
        policy(vec![42], vec![rule(1, Some(3)), rule(136, None)]),
    );
    t.claim(cgroup(AclChange::DenyAll));
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    assert!(v.evidence[0].detail.as_deref().unwrap().contains("42"));
    t.claim(cgroup(AclChange::Allow(rule(1, Some(3)))));
    t.claim(cgroup(AclChange::Allow(rule(136, None))));
    let all: Vec<Status> = t.out.drain(..).map(|v| v.status).collect();
    assert_eq!(all, [Status::Confirmed; 2]);
    t.libvirt_vm();
    t.recheck();
    t.none();
    // A rule removed behind the manager's back.
    t.k.policies
        .insert(cg(), policy(vec![42], vec![rule(136, None)]));
    t.recheck();
    let v = t.one();
    assert_eq!(v.status, Status::Violated);
    assert!(has(&v, "1:3 rw") && has(&v, "no longer"), "{}", v.reason);
    // A rule no claim made.
    t.k.policies.insert(
        cg(),
        policy(vec![42], vec![rule(136, None), rule(10, Some(200))]),
    );
    t.recheck();
    let v = t.one();
    assert_eq!(
        (v.claim.kind.as_str(), v.status),
        ("unclaimed", Status::Violated)
    );
    // The program detached: one violation says it, not one per rule it took with it.
    t.k.policies.insert(cg(), policy(vec![], vec![]));
    t.recheck();
    let v = t.one();
    assert!(has(&v, "detached"), "{}", v.reason);
    t.recheck();
    t.none();
}

#[test]
fn a_replaced_device_program_is_violated() {
    let mut t = T::new();
    t.k.policies.insert(cg(), policy(vec![42], vec![]));
    t.claim(cgroup(AclChange::DenyAll));
    t.out.clear();
    t.libvirt_vm();
    t.k.policies.insert(cg(), policy(vec![43], vec![]));
    t.recheck();
    let v = t.one();
    assert!(has(&v, "replaced"), "{}", v.reason);
}

#[test]
fn a_rule_the_kernel_lacks_is_violated_at_the_deadline() {
    let mut t = T::new();
    t.k.policies.insert(cg(), policy(vec![42], vec![]));
    t.claim(cgroup(AclChange::Allow(rule(1, Some(3)))));
    t.none();
    t.at(100).tick();
    let v = t.one();
    assert_eq!(v.status, Status::Violated);
    assert!(has(&v, "does not allow c 1:3 rw"), "{}", v.reason);
}

#[test]
fn a_failed_change_is_confirmed_when_the_kernel_does_not_hold_it() {
    let mut t = T::new();
    t.k.policies.insert(cg(), policy(vec![42], vec![]));
    t.claim_with(cgroup(AclChange::Allow(rule(1, Some(3)))), false);
    assert_eq!(t.one().status, Status::Confirmed);
    t.k.policies
        .insert(cg(), policy(vec![42], vec![rule(1, Some(3))]));
    t.claim_with(cgroup(AclChange::Allow(rule(1, Some(3)))), false);
    assert_eq!(t.one().status, Status::Violated);
}

#[test]
fn an_unreadable_cgroup_is_unknown_not_confirmed() {
    let mut t = T::new();
    t.claim(cgroup(AclChange::DenyAll));
    t.at(100).tick();
    assert_eq!(t.one().status, Status::Unknown);
}

#[test]
fn a_decision_the_claimed_acl_does_not_explain_is_violated() {
    let mut t = T::new();
    acl_vm(&mut t);
    let d = |major, allowed| Decision {
        ts_ns: t.now,
        cgroup_id: 1,
        tgid: EMU,
        dev: DecisionDev::Char,
        major,
        minor: 3,
        access: Acl::READ,
        allowed,
        matched: None,
    };
    let (ok, bad) = (d(1, true), d(8, true));
    t.l.on_decision(UUID, &ok, t.now, &mut t.out);
    t.none();
    t.l.on_decision(UUID, &bad, t.now, &mut t.out);
    let v = t.one();
    assert_eq!(v.status, Status::Violated);
    assert_eq!(v.evidence[0].what, "decision");
}

// ---- start and stop ----

#[test]
fn a_start_is_confirmed_by_the_tracker_or_proc_and_violated_without_a_process() {
    let mut t = T::new();
    t.fd(rec(EMU, Op::Inherit, 3, t.now, device("/dev/null", 1, 3)));
    t.claim(ClaimKind::VmStart { pid: EMU });
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed);
    assert_eq!(v.evidence[0].what, "fork");

    let mut t = T::new();
    t.k.processes.insert(
        EMU,
        ProcessInfo {
            exe: "/usr/bin/qemu".into(),
            ..Default::default()
        },
    );
    t.claim(ClaimKind::VmStart { pid: EMU });
    assert_eq!(t.one().evidence[0].path.as_deref(), Some("/usr/bin/qemu"));

    let mut t = T::new();
    t.claim(ClaimKind::VmStart { pid: EMU });
    t.none();
    t.at(100).tick();
    assert_eq!(t.one().status, Status::Violated);
}

#[test]
fn a_start_naming_a_pid_reused_since_is_unknown() {
    let mut t = T::new();
    t.k.processes.insert(
        EMU,
        ProcessInfo {
            start_unix_ns: 1_800_000_000_000_000_000,
            ..Default::default()
        },
    );
    t.claim(ClaimKind::VmStart { pid: EMU });
    assert_eq!(t.one().status, Status::Unknown);
    assert_eq!(t.l.stats.pid_reuse, 1);
}

#[test]
fn a_stop_is_confirmed_by_the_exit_and_violated_while_the_emulator_runs() {
    let stop = || ClaimKind::VmStop {
        pid: None,
        reason: "destroyed".into(),
    };
    let mut t = T::new();
    t.libvirt_vm();
    t.claim(stop());
    t.none();
    t.at(100).tick();
    let v = t.one();
    assert_eq!(v.status, Status::Violated);
    assert!(has(&v, "still runs"), "{}", v.reason);

    let mut t = T::new();
    t.libvirt_vm();
    t.fd(rec(EMU, Op::Exit, 7, t.now, tun(None)));
    t.k.exit(EMU);
    t.claim(stop());
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    assert_eq!(v.evidence[0].what, "exit");
}

#[test]
fn the_stop_settles_every_claim_left_and_the_opens_never_passed() {
    let mut t = T::new();
    t.libvirt_vm();
    // An open of another NIC, never passed, still held; and a detach still waiting.
    t.fd(rec(MGR, Op::Open, 44, t.now, tun(None)));
    t.claim(ClaimKind::NetOpen {
        mac: "52:54:00:00:00:09".into(),
        path: "/dev/net/tun".into(),
        rdev: Some(TUN),
        fd: Some(44),
    });
    assert_eq!(t.one().status, Status::Confirmed);
    t.claim(detach(None));
    t.none();
    t.k.exit(EMU);
    t.claim(ClaimKind::VmStop {
        pid: None,
        reason: "destroyed".into(),
    });
    let got: Vec<(String, Status, String)> = t
        .out
        .drain(..)
        .map(|v| (v.claim.kind, v.status, v.reason))
        .collect();
    assert_eq!(got.len(), 3, "{got:#?}");
    assert_eq!(
        (got[0].0.as_str(), got[0].1),
        ("vm-stop", Status::Confirmed)
    );
    assert_eq!(got[1].0, "net-detach", "{got:#?}");
    assert_eq!(
        (got[2].0.as_str(), got[2].1),
        ("net-open", Status::Violated)
    );
    assert!(
        got[2].2.contains("still held by the manager"),
        "{}",
        got[2].2
    );
    assert_eq!(t.l.pending(), 0);
}

#[test]
fn an_open_never_passed_and_closed_is_confirmed_at_the_end() {
    let mut t = T::new();
    t.fd(rec(MGR, Op::Open, 44, t.now, tun(None)));
    t.claim(open(Some(44)));
    t.out.clear();
    t.fd(rec(MGR, Op::Close, 44, t.now + 1, tun(None)));
    t.l.finish(&t.k, t.now, &mut t.out);
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed);
    assert!(has(&v, "opened, not passed"), "{}", v.reason);
}

#[test]
fn a_run_mode_stop_in_progress_explains_every_release() {
    let mut t = T::new();
    t.fd(rec(EMU, Op::Inherit, 7, t.now, tun(None)));
    t.claim(up(Some(EMU), vec![handed(7, Some(true))]));
    t.claim(ClaimKind::VmStart { pid: EMU });
    t.out.clear();
    t.l.on_stopping(EMU);
    t.fd(rec(EMU, Op::Close, 7, t.now, tun(None)));
    t.at(500).tick();
    t.none();
}

#[test]
fn past_claims_superseded_by_a_later_record_are_unknown() {
    let mut t = T::new();
    let past = |id, kind| Claim {
        id,
        kind,
        vm_name: "vm1".into(),
        uuid: UUID.into(),
        success: true,
        sender: None,
        text: String::new(),
        record_ts_ns: 1,
        made_ns: 0,
        historic: true,
    };
    t.l.on_claim(
        past(1, ClaimKind::VmStart { pid: EMU }),
        &t.k,
        t.now,
        &mut t.out,
    );
    t.l.on_claim(
        past(
            2,
            ClaimKind::VmStop {
                pid: None,
                reason: "shutdown".into(),
            },
        ),
        &t.k,
        t.now,
        &mut t.out,
    );
    t.none();
    t.l.caught_up(&t.k, t.now, &mut t.out);
    let got: Vec<Status> = t.out.drain(..).map(|v| v.status).collect();
    assert_eq!(
        got[0],
        Status::Unknown,
        "the start is superseded by the stop"
    );
    assert_eq!(t.l.stats.historic, 2);
}

#[test]
fn a_copy_made_before_the_claim_named_the_nic_is_found_when_it_does() {
    let mut t = T::new();
    let child = 21;
    // The emulator forks a child that inherits the tap fd before any claim arrives.
    t.fd(rec(EMU, Op::Inherit, 7, t.now, tun(None)));
    t.fd(rec(child, Op::Inherit, 7, t.now, tun(None)));
    t.k.same.push((FdRef::new(child, 7), FdRef::new(EMU, 7)));
    t.none();
    t.claim(up(Some(EMU), vec![handed(7, Some(true))]));
    let got: Vec<(Status, String)> = t.out.drain(..).map(|v| (v.status, v.reason)).collect();
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(got[0].0, Status::Confirmed);
    assert_eq!(got[1].0, Status::Violated);
    assert!(
        got[1].1.contains("(pid 21) as fd 7 (inherit)"),
        "{}",
        got[1].1
    );
}

#[test]
fn a_nic_fd_sent_before_the_claim_named_it_is_violated_at_the_deadline() {
    let mut t = T::new();
    t.fd(rec(EMU, Op::Inherit, 7, t.now, tun(None)));
    t.fd(rec(EMU, Op::SendFd, 7, t.now, tun(None)));
    t.claim(up(Some(EMU), vec![handed(7, Some(true))]));
    assert_eq!(t.one().status, Status::Confirmed);
    t.at(200).tick();
    let v = t.one();
    assert_eq!(v.status, Status::Violated);
    assert_eq!(v.evidence[0].what, "send_fd");
}

#[test]
fn a_device_opened_before_the_vms_start_is_judged_when_the_start_is_known() {
    let mut t = T::new();
    acl_vm(&mut t);
    t.k.processes.insert(EMU, child_of_manager());
    t.fd(rec(EMU, Op::Open, 13, t.now, device("/dev/sda", 8, 0)));
    t.fd(rec(EMU, Op::Close, 13, t.now + 1, device("/dev/sda", 8, 0)));
    t.claim(ClaimKind::VmStart { pid: EMU });
    t.out.clear();
    t.at(200).tick();
    let v = t.one();
    assert_eq!(
        v.status,
        Status::Violated,
        "opened and closed: it still got access"
    );
    assert_eq!(v.evidence[0].fd, Some(13));
}

#[test]
fn a_detached_nics_fd_number_reused_by_the_next_attach_is_no_violation() {
    let mut t = T::new();
    t.k.processes.insert(EMU, ProcessInfo::default());
    t.claim(ClaimKind::VmStart { pid: EMU });
    t.out.clear();
    let attach = |t: &mut T, mac: &str, since: u64| {
        t.fd(rec(EMU, Op::RecvFd, 12, since, tun(None)));
        t.claim(ClaimKind::NetUp {
            mac: mac.into(),
            attach: true,
            emulator_pid: Some(EMU),
            handed: vec![handed(12, Some(true))],
        });
        assert_eq!(t.one().status, Status::Confirmed);
    };
    let detach = |t: &mut T, mac: &str, ts: u64| {
        t.fd(rec(EMU, Op::Close, 12, ts, tun(None)));
        t.claim(ClaimKind::NetDetach {
            mac: mac.into(),
            emulator_pid: Some(EMU),
            fds: Some(vec![12]),
        });
        assert_eq!(t.one().status, Status::Confirmed);
    };
    let now = t.now;
    attach(&mut t, "52:54:00:00:00:0a", now);
    detach(&mut t, "52:54:00:00:00:0a", now + 1);
    let now = t.at(1).now;
    attach(&mut t, "52:54:00:00:00:0b", now);
    t.at(500).tick();
    t.none();
    let now = t.now;
    detach(&mut t, "52:54:00:00:00:0b", now);
    t.at(1000).tick();
    t.none();
}

#[test]
fn a_failed_set_up_is_judged_by_its_own_release_when_the_number_is_reused_before_the_claim() {
    let mut t = T::new();
    let n = t.now;
    t.fd(rec(MGR, Op::Open, 9, n, tun(None)));
    t.fd(rec(MGR, Op::Close, 9, n + 1, tun(None)));
    // The manager reuses fd 9 for another file after the record, and the tracker delivers
    // that before the verifier takes the claim up.
    let mut other = tun(None);
    other.path = "/run/vmaudit/vm1".into();
    other.kind = FileKind::Dir;
    other.rdev = None;
    t.fd(rec(MGR, Op::Open, 9, n + 10, other.clone()));
    t.fd(rec(MGR, Op::Close, 9, n + 11, other));
    t.now = n + 2;
    t.claim_with(open(None), false);
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    assert_eq!(
        v.evidence[1].ts,
        Some(n + 1),
        "the tun's own close: {:?}",
        v.evidence
    );
}

#[test]
fn a_failed_device_set_up_is_confirmed_by_the_open_and_its_release() {
    let mut t = T::new();
    t.fd(rec(MGR, Op::Open, 9, t.now, tun(None)));
    t.fd(rec(MGR, Op::Close, 9, t.now + 1, tun(None)));
    t.at(1).claim_with(open(None), false);
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    assert!(has(&v, "released it before the record"), "{}", v.reason);
    assert_eq!(
        v.evidence
            .iter()
            .map(|e| e.what.as_str())
            .collect::<Vec<_>>(),
        ["open", "close"]
    );
}

#[test]
fn an_inferred_nic_is_held_while_any_of_its_fds_is_and_a_dup_of_it_is_no_device_violation() {
    let mut t = T::new();
    t.k.addresses
        .insert("vnet0".into(), "fe:54:00:00:00:01".into());
    t.fd(rec(EMU, Op::Inherit, 7, t.now, tun(Some("vnet0"))));
    // The emulator dups its tap fd and closes the copy, before any claim arrives.
    let mut dup = rec(EMU, Op::Dup, 4, t.now + 1, tun(Some("vnet0")));
    dup.from_fd = Some(7);
    t.fd(dup);
    t.fd(rec(EMU, Op::Close, 4, t.now + 2, tun(Some("vnet0"))));
    t.at(1).claim(up(None, vec![]));
    t.claim(ClaimKind::VmStart { pid: EMU });
    let got: Vec<(String, Status)> = t.out.drain(..).map(|v| (v.claim.kind, v.status)).collect();
    assert_eq!(
        got,
        [
            ("vm-start".into(), Status::Confirmed),
            ("net-start".into(), Status::Confirmed)
        ]
    );
    t.at(500).tick();
    t.none();
}

#[test]
fn a_start_naming_a_process_the_manager_did_not_start_is_violated() {
    let mut t = T::new();
    let stranger = ProcessInfo {
        exe: "/usr/sbin/init".into(),
        ppid: 0,
        ..Default::default()
    };
    t.k.processes.insert(1, stranger);
    t.claim(ClaimKind::VmStart { pid: 1 });
    let v = t.one();
    assert_eq!(v.status, Status::Violated, "{}", v.reason);
    assert!(has(&v, "no process the manager started"), "{}", v.reason);
    // A descendant of the manager, or a process in the VM's cgroup, is one it started.
    let mut t = T::new();
    t.k.processes.insert(
        77,
        ProcessInfo {
            ppid: 76,
            ..Default::default()
        },
    );
    t.k.processes.insert(76, child_of_manager());
    t.claim(ClaimKind::VmStart { pid: 77 });
    assert_eq!(t.one().status, Status::Confirmed);
    let mut t = T::new();
    t.k.policies.insert(cg(), policy(vec![42], vec![]));
    t.claim(cgroup(AclChange::DenyAll));
    t.out.clear();
    t.k.processes.insert(88, ProcessInfo::default());
    t.k.cgroups.insert(88, cg().join("emulator"));
    t.claim(ClaimKind::VmStart { pid: 88 });
    let v = t.one();
    assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
    assert!(v.evidence[0].detail.as_deref().unwrap().contains("cgroup"));
}

#[test]
fn records_lost_around_a_release_make_it_unknown_but_not_a_claim_confirmed_by_the_kernel() {
    let mut t = T::new();
    t.libvirt_vm();
    t.fd(rec(EMU, Op::Close, 7, t.now + MS, tun(None)));
    // The detach record may be among the records lost.
    t.l.on_record_loss(t.now, t.now + 2 * MS, 1);
    t.at(200).tick();
    let v = t.one();
    assert_eq!(v.status, Status::Unknown, "{}", v.reason);
    assert!(has(&v, "audit records were lost"), "{}", v.reason);
    t.fd(rec(MGR, Op::Open, 9, t.now, tun(None)));
    t.claim(open(Some(9)));
    assert_eq!(
        t.one().status,
        Status::Confirmed,
        "an open seen in the kernel stays confirmed"
    );
}

#[test]
fn a_vm_is_forgotten_once_its_stop_is_judged() {
    let mut t = T::new();
    t.libvirt_vm();
    assert_eq!(t.l.vms(), 1);
    t.k.exit(EMU);
    t.claim(ClaimKind::VmStop {
        pid: None,
        reason: "destroyed".into(),
    });
    assert_eq!(t.one().status, Status::Confirmed);
    assert_eq!(t.l.vms(), 0);
    // Its restart is a VM anew.
    t.k.processes.insert(EMU + 1, child_of_manager());
    t.claim(ClaimKind::VmStart { pid: EMU + 1 });
    assert_eq!(t.one().status, Status::Confirmed);
    assert_eq!(t.l.vms(), 1);
}

#[test]
fn the_emulators_own_fd_names_its_tap_not_an_identity_copied_at_fork() {
    let mut t = T::new();
    t.k.addresses
        .insert("vnet0".into(), "fe:54:00:00:00:01".into());
    t.k.addresses
        .insert("vnet9".into(), "fe:54:00:00:00:09".into());
    // The identity the child inherited names another tap (the parent's number moved on).
    t.k.ifaces.insert(FdRef::new(EMU, 7), "vnet0".into());
    t.fd(rec(EMU, Op::Inherit, 7, t.now, tun(Some("vnet9"))));
    t.k.processes.insert(EMU, child_of_manager());
    t.claim(ClaimKind::VmStart { pid: EMU });
    t.claim(up(None, vec![]));
    let got: Vec<Status> = t.out.drain(..).map(|v| v.status).collect();
    assert_eq!(got, [Status::Confirmed, Status::Confirmed]);
}
