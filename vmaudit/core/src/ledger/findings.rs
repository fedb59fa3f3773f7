//! What no claim accounts for, found in the kernel's events and reads:
//! - a NIC fd the emulator releases with no detach (the detach may follow within the deadline;
//!   the emulator's exit or the VM's stop explains it too);
//! - a NIC fd held by any other process, however it got there (inherited by a child, sent
//!   over SCM_RIGHTS, copied out with pidfd_getfd), and a NIC fd the emulator sends;
//! - a device the emulator holds that no claim gave it (a network device only the manager
//!   passes, or one the claimed ACL does not allow);
//! - a device access the cgroup program decided otherwise than the claimed ACL says.

use std::{collections::HashSet, path::PathBuf};

use super::{
    Found, Ledger,
    kernel::Change,
    vm::{Vm, acl_allows},
};
use crate::{
    acl::{Acl, Decision, DecisionDev, DeviceRule},
    fd::{DevNum, FdIdentity, FdRecord, FileKind, Op},
    verdict::{ClaimRef, Evidence, Verdict},
    view::{FdRef, KernelView},
};

/// A finding, reported once.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Finding {
    Release {
        at: FdRef,
        ts: u64,
    },
    Copy {
        holder: FdRef,
        of: FdRef,
    },
    Send {
        at: FdRef,
        ts: u64,
    },
    Device {
        at: FdRef,
        rdev: DevNum,
    },
    Decision {
        dev: DevNum,
        block: bool,
        access: Acl,
        allowed: bool,
    },
    MapExtra {
        cgroup: PathBuf,
        rule: DeviceRule,
    },
}

impl Finding {
    /// Whether it concerns process `pid` (to forget it with the process).
    pub fn about(&self, pid: u32) -> bool {
        match self {
            Self::Release { at, .. } | Self::Send { at, .. } | Self::Device { at, .. } => {
                at.pid == pid
            }
            Self::Copy { holder, of } => holder.pid == pid || of.pid == pid,
            Self::Decision { .. } | Self::MapExtra { .. } => false,
        }
    }
}

/// Something to judge once its time comes.
#[derive(Clone, Debug)]
pub enum Watch {
    /// A NIC fd released: a violation at `due` unless a detach, the exit or the stop explains it.
    Release {
        fd: LiveFd,
        ts: u64,
        op: Op,
        due: u64,
    },
    /// A device gained by the emulator: at `due` (its claims are in by then), a violation
    /// unless a claim gave it.
    Device {
        at: FdRef,
        ts: u64,
        op: Op,
        /// The fd it duplicates, if a dup.
        from: Option<i32>,
        file: FdIdentity,
        due: u64,
    },
    /// A network fd sent by the emulator before a claim named it.
    Send { at: FdRef, ts: u64, due: u64 },
}

impl Watch {
    fn due(&self) -> u64 {
        match self {
            Self::Release { due, .. } | Self::Device { due, .. } | Self::Send { due, .. } => *due,
        }
    }
}

/// What one fd record means for the findings.
pub(super) fn on_change(
    l: &mut Ledger,
    change: Change,
    r: &FdRecord,
    view: &dyn KernelView,
    out: &mut Vec<Verdict>,
) {
    let due = r.ts + l.deadline_ns;
    match change {
        Change::Released(at, op) if op != Op::Exit && !l.stopping.contains(&at.pid) => {
            if let Some(fd) = live_nic_fd(l, at, r.ts) {
                l.watches.push(Watch::Release {
                    fd,
                    ts: r.ts,
                    op,
                    due,
                });
            }
        }
        Change::Sent(at) if !l.managers.contains(&at.pid) => {
            if live_nic_fd(l, at, r.ts).is_some() {
                send(l, at, r.ts, r.ts, out);
            } else {
                // Perhaps an fd whose claim has not arrived yet: look again at the deadline.
                l.watches.push(Watch::Send { at, ts: r.ts, due });
            }
        }
        Change::DeviceGained(at, op, file) => {
            // A child of the emulator, or a process not known as an emulator yet.
            if file.is_net_device() && l.vm_of_pid(at.pid).is_none() {
                check_copy(l, at, op.name(), Against::All, view, r.ts, out);
            }
            let from_nic = op == Op::Dup
                && r.from_fd
                    .is_some_and(|f| live_nic_fd(l, FdRef::new(at.pid, f), r.ts).is_some());
            // Judged at `due`, when the claims that could give it are in, if the process is
            // then an emulator.
            if !matches!(op, Op::Inherit | Op::Seed) && !from_nic {
                l.watches.push(Watch::Device {
                    at,
                    ts: r.ts,
                    op,
                    from: r.from_fd.filter(|_| op == Op::Dup),
                    file,
                    due,
                });
            }
        }
        _ => {}
    }
}

/// A NIC fd the emulator holds and no detach released: which VM, NIC and claim.
#[derive(Clone, Debug)]
pub struct LiveFd {
    at: FdRef,
    uuid: String,
    mac: String,
    claim: ClaimRef,
}

/// The NIC fd at `at` that the emulator held at kernel time `ts`, if no detach released it.
fn live_nic_fd(l: &Ledger, at: FdRef, ts: u64) -> Option<LiveFd> {
    l.vms.iter().find_map(|(uuid, vm)| {
        vm.live_fds()
            .find(|(_, h)| h.at == at && h.since <= ts)
            .map(|(mac, h)| LiveFd {
                at,
                uuid: uuid.clone(),
                mac: mac.to_owned(),
                claim: h.claim.clone(),
            })
    })
}

/// Whether the NIC fd `fd` is still held by the claim that put it there, unreleased.
fn still_live(l: &Ledger, fd: &LiveFd) -> bool {
    l.vms
        .get(&fd.uuid)
        .and_then(|vm| vm.nics.get(&fd.mac))
        .is_some_and(|n| {
            n.held
                .iter()
                .any(|h| h.at == fd.at && h.claim.id == fd.claim.id && !h.released)
        })
}

/// Every NIC fd of emulator `pid` is released (the manager stops it, or the VM stopped).
pub(super) fn release_all(l: &mut Ledger, pid: u32) {
    for vm in l.vms.values_mut() {
        for nic in vm.nics.values_mut() {
            for h in nic.held.iter_mut().filter(|h| h.at.pid == pid) {
                h.released = true;
            }
        }
    }
    l.watches
        .retain(|w| !matches!(w, Watch::Release { fd, .. } if fd.at.pid == pid));
}

/// The devices the emulator holds when its VM's start is judged (inherited at launch).
pub(super) fn watch_devices_of(l: &mut Ledger, pid: u32, view: &dyn KernelView, now: u64) {
    let Some(t) = view.table(pid) else {
        return;
    };
    for e in t.fds.values() {
        if matches!(e.id.kind, FileKind::Char | FileKind::Block) {
            l.watches.push(Watch::Device {
                at: FdRef::new(pid, e.fd),
                ts: e.since_ns,
                op: e.via,
                from: None,
                file: e.id.clone(),
                due: now + l.deadline_ns,
            });
        }
    }
}

/// Judges the watches whose time has come.
pub(super) fn settle(l: &mut Ledger, view: &dyn KernelView, now: u64, out: &mut Vec<Verdict>) {
    let (due, keep): (Vec<Watch>, Vec<Watch>) = std::mem::take(&mut l.watches)
        .into_iter()
        .partition(|w| w.due() <= now);
    l.watches = keep;
    for w in due {
        match w {
            Watch::Release { fd, ts, op, .. } => release(l, fd, ts, op, view, now, out),
            Watch::Device {
                at,
                ts,
                op,
                from,
                file,
                ..
            } => device(l, at, ts, op, from, &file, now, out),
            Watch::Send { at, ts, .. } => send(l, at, ts, now, out),
        }
    }
}

fn release(
    l: &mut Ledger,
    fd: LiveFd,
    ts: u64,
    op: Op,
    view: &dyn KernelView,
    now: u64,
    out: &mut Vec<Verdict>,
) {
    if !still_live(l, &fd) {
        return; // a detach, or the stop, released it
    }
    let LiveFd {
        at,
        uuid,
        mac,
        claim,
    } = fd;
    let running = l.vms.get(&uuid).is_some_and(|v| v.running);
    if !running || l.stopping.contains(&at.pid) || l.log.exited(at.pid, view) {
        return;
    }
    let name = l.vms.get(&uuid).map(|v| v.name.clone()).unwrap_or_default();
    let found = Found::violated(
        format!(
            "the emulator (pid {}) of VM {name} released fd {} of NIC {mac} ({op}) with no detach record",
            at.pid, at.fd
        ),
        vec![
            Evidence::new(at.pid, op.name())
                .fd(at.fd)
                .at(ts)
                .detail(format!("NIC {mac}'s fd")),
        ],
    )
    .on([at.pid])
    .absent_record();
    l.report(Finding::Release { at, ts }, claim, found, ts, now, out);
}

fn send(l: &mut Ledger, at: FdRef, ts: u64, now: u64, out: &mut Vec<Verdict>) {
    let Some(LiveFd { mac, claim, .. }) = live_nic_fd(l, at, ts) else {
        return;
    };
    let found = Found::violated(
        format!(
            "the emulator (pid {}) sent fd {} of NIC {mac} to another process through SCM_RIGHTS",
            at.pid, at.fd
        ),
        vec![
            Evidence::new(at.pid, Op::SendFd.name())
                .fd(at.fd)
                .at(ts)
                .detail(format!("sendmsg SCM_RIGHTS by pid {}", at.pid)),
        ],
    )
    .on([at.pid]);
    l.report(Finding::Send { at, ts }, claim, found, ts, now, out);
}

#[allow(clippy::too_many_arguments)]
fn device(
    l: &mut Ledger,
    at: FdRef,
    ts: u64,
    op: Op,
    from: Option<i32>,
    file: &FdIdentity,
    now: u64,
    out: &mut Vec<Verdict>,
) {
    let Some(rdev) = file.rdev else {
        return;
    };
    let copy_of_nic = from.is_some_and(|f| live_nic_fd(l, FdRef::new(at.pid, f), ts).is_some());
    if copy_of_nic || l.vms.values().any(|vm| vm.gave(at, ts)) {
        return; // a claim gave it (or the file a claim gave)
    }
    let Some((_, vm)) = l.vm_of_pid(at.pid) else {
        return;
    };
    let block = file.kind == FileKind::Block;
    let why = if file.is_net_device() {
        "a network device only the manager opens and passes"
    } else if vm.acl_claimed && !acl_allows(&vm.acl, block, rdev, Acl::READ) {
        "a device the claimed ACL does not allow"
    } else {
        return;
    };
    let path = &file.path;
    let text = format!(
        "emulator pid {} holds fd {} on {path} ({rdev})",
        at.pid, at.fd
    );
    let found = Found::violated(
        format!(
            "the emulator holds {path} (fd {}, {rdev}), {why}, and no claim gave it",
            at.fd
        ),
        vec![
            Evidence::new(at.pid, op.name())
                .fd(at.fd)
                .at(ts)
                .path(path.clone())
                .rdev(Some(rdev))
                .detail(why),
        ],
    )
    .on([at.pid])
    .absent_record();
    l.report(
        Finding::Device { at, rdev },
        ClaimRef::unclaimed(text),
        found,
        ts,
        now,
        out,
    );
}

/// Which of the emulators' NIC fds a copy check compares with: all, or one VM's one NIC (the
/// NIC a claim just named).
#[derive(Clone, Copy)]
pub(super) enum Against<'a> {
    All,
    Nic { uuid: &'a str, mac: &'a str },
}

/// An emulator's NIC fd a copy may be of: its VM's name, the NIC, the fd, the claim that named it.
type NicCopySource = (String, String, FdRef, ClaimRef);

/// The emulators' live NIC fds `against` takes.
fn live_nic_fds(l: &Ledger, against: Against<'_>) -> Vec<NicCopySource> {
    let of_vm = |vm: &Vm, only: Option<&str>| -> Vec<NicCopySource> {
        vm.live_fds()
            .filter(|(mac, _)| only.is_none_or(|m| m == *mac))
            .map(|(mac, h)| (vm.name.clone(), mac.to_owned(), h.at, h.claim.clone()))
            .collect()
    };
    match against {
        Against::All => l.vms.values().flat_map(|vm| of_vm(vm, None)).collect(),
        Against::Nic { uuid, mac } => l
            .vms
            .get(uuid)
            .map(|vm| of_vm(vm, Some(mac)))
            .unwrap_or_default(),
    }
}

/// The kernel's open-file-description id of a watched fd, when its table has it.
fn ofd_of(view: &dyn KernelView, at: FdRef) -> Option<u64> {
    view.table(at.pid)
        .and_then(|t| t.fds.get(&at.fd))
        .and_then(|e| e.id.ofd)
}

/// Whether `holder` (any process but the emulators and managers) holds one of the emulators'
/// NIC fds: kcmp decides, asked only where the kernel's ids do not already tell two files apart.
fn check_copy(
    l: &mut Ledger,
    holder: FdRef,
    how: &str,
    against: Against<'_>,
    view: &dyn KernelView,
    now: u64,
    out: &mut Vec<Verdict>,
) {
    if l.managers.contains(&holder.pid) || l.vm_of_pid(holder.pid).is_some() {
        return;
    }
    let live = live_nic_fds(l, against);
    compare_copy(l, holder, how, &live, view, now, out);
}

/// Reports `holder` if it holds one of `live`.
fn compare_copy(
    l: &mut Ledger,
    holder: FdRef,
    how: &str,
    live: &[NicCopySource],
    view: &dyn KernelView,
    now: u64,
    out: &mut Vec<Verdict>,
) {
    let mine = ofd_of(view, holder);
    for (name, mac, of, claim) in live.iter().cloned() {
        if mine.zip(ofd_of(view, of)).is_some_and(|(a, b)| a != b) {
            continue;
        }
        if view.same_file(holder, of) != Some(true) {
            continue;
        }
        let comm = view.process(holder.pid).map(|p| p.comm).unwrap_or_default();
        let found = Found::violated(
            format!(
                "NIC {mac} of VM {name}: the emulator's fd {} is also held by {comm} (pid {}) as fd {} ({how})",
                of.fd, holder.pid, holder.fd
            ),
            vec![
                Evidence::new(holder.pid, "kcmp").fd(holder.fd).at(now).detail(format!(
                    "kcmp: {comm} (pid {}) fd {} is the same open file description as the emulator's (pid {}) fd {}",
                    holder.pid, holder.fd, of.pid, of.fd
                )),
                Evidence::new(of.pid, "holds").fd(of.fd),
            ],
        )
        .on([of.pid]);
        l.report(Finding::Copy { holder, of }, claim, found, now, now, out);
    }
}

/// The network fds of every watched process that is not an emulator (its children) compared
/// with the NIC fds `against`: what they got before the claim that named the NIC.
pub(super) fn scan_watched(
    l: &mut Ledger,
    against: Against<'_>,
    view: &dyn KernelView,
    now: u64,
    out: &mut Vec<Verdict>,
) {
    let live = live_nic_fds(l, against);
    if live.is_empty() {
        return;
    }
    let emulators: HashSet<u32> = l.vms.values().filter_map(|vm| vm.pid).collect();
    for pid in view.watched() {
        if l.managers.contains(&pid) || emulators.contains(&pid) {
            continue;
        }
        let held: Vec<(FdRef, Op)> = view
            .table(pid)
            .filter(|t| !t.exited)
            .map(|t| {
                t.fds
                    .values()
                    .filter(|e| e.id.is_net_device())
                    .map(|e| (FdRef::new(pid, e.fd), e.via))
                    .collect()
            })
            .unwrap_or_default();
        for (at, via) in held {
            compare_copy(l, at, via.name(), &live, view, now, out);
        }
    }
}

/// Every process's network fds compared with the emulators' NIC fds.
pub(super) fn scan_copies(l: &mut Ledger, view: &dyn KernelView, now: u64, out: &mut Vec<Verdict>) {
    if !l
        .vms
        .values()
        .any(|vm| vm.running && vm.live_fds().next().is_some())
    {
        return;
    }
    for n in view.net_fds() {
        check_copy(
            l,
            n.at,
            "found by a scan of every process's fds",
            Against::All,
            view,
            now,
            out,
        );
    }
}

/// A decision of the VM's cgroup program that the claimed ACL does not explain.
pub(super) fn on_decision(
    l: &mut Ledger,
    uuid: &str,
    d: &Decision,
    now: u64,
    out: &mut Vec<Verdict>,
) {
    let Some(vm) = l.vms.get(uuid).filter(|vm| vm.acl_claimed) else {
        return;
    };
    let block = matches!(d.dev, DecisionDev::Block);
    let dev = DevNum::new(d.major, d.minor);
    if acl_allows(&vm.acl, block, dev, d.access) == d.allowed {
        return;
    }
    let what = if d.allowed {
        "the kernel allowed a device access the claimed ACL does not"
    } else {
        "the kernel denied a device access the claimed ACL allows"
    };
    let verb = if d.allowed { "allowed" } else { "denied" };
    let kind = if block { "block" } else { "char" };
    let e = Evidence::new(d.tgid, "decision")
        .at(d.ts_ns)
        .rdev(Some(dev))
        .detail(format!("{kind} {dev} access {}", d.access));
    let found = Found::violated(
        format!("{what}: {dev} {} by pid {}", d.access, d.tgid),
        vec![e],
    );
    let claim = ClaimRef::unclaimed(format!(
        "device {dev} access {} by pid {}: {verb}",
        d.access, d.tgid
    ));
    let key = Finding::Decision {
        dev,
        block,
        access: d.access,
        allowed: d.allowed,
    };
    l.report(key, claim, found, d.ts_ns, now, out);
}
