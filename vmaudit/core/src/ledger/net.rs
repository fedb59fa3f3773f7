//! The NIC claims: a device opened by the manager, a NIC started or attached (the emulator
//! holds its fds), a NIC detached (the emulator released them); and the opens never passed.
//!
//! vmaudit's runtime says which fds; a libvirt record does not, and the ledger infers them:
//! - an open record's fd: the manager's oldest open of that device no earlier record named;
//! - the emulator's fds for a NIC: its network fds whose interface carries libvirt's host side
//!   of the NIC's MAC (the guest MAC with its first byte 0xfe), or that kcmp finds to be the
//!   open file description the manager opened;
//! - the fds a detach released: those the NIC's start or attach was confirmed with.

use super::{
    Found, Ledger,
    kernel::NetFdLife,
    vm::{HeldFd, NicOpen, host_mac_matches},
};
use crate::{
    claim::{Claim, ClaimKind, Handed},
    fd::FdEntry,
    verdict::{Evidence, Verdict},
    view::{FdRef, KernelView},
};

/// Whether an fd the emulator holds is the very open file the manager handed it: the kernel's
/// open-file-description ids of the manager's open and of the emulator's fd (primary), and
/// kcmp at hand-off (the cross-check).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Handoff {
    ofd: Option<bool>,
    kcmp: Option<bool>,
}

impl Handoff {
    /// For fd `h` of NIC `mac` of the claim's VM: the manager's open of it is the one the NIC's
    /// open claim named, or one not named yet.
    fn of(
        l: &Ledger,
        c: &Claim,
        mac: &str,
        managers: &[u32],
        h: &Handed,
        held: Option<&FdEntry>,
    ) -> Self {
        let mine = |at: FdRef| at.fd == h.fd && managers.contains(&at.pid);
        let named = l
            .vms
            .get(&c.uuid)
            .and_then(|v| v.nics.get(mac))
            .and_then(|n| n.opens.iter().rev().find(|o| mine(o.at)))
            .map(|o| o.ofd);
        let mgr = named
            .or_else(|| l.log.opens.iter().rev().find(|o| mine(o.at)).map(|o| o.ofd))
            .flatten();
        let emu = held.and_then(|e| e.id.ofd);
        Self {
            ofd: mgr.zip(emu).map(|(a, b)| a == b),
            kcmp: h.same_at_handoff,
        }
    }

    /// The same file: by the ids when known, else by kcmp; a disagreement is not.
    fn same(self) -> Option<bool> {
        match (self.ofd, self.kcmp) {
            (Some(a), Some(b)) if a != b => Some(false),
            (Some(a), _) => Some(a),
            (None, k) => k,
        }
    }

    /// What decided it, for the evidence.
    fn detail(self, mgr_fd: i32) -> String {
        let kcmp = match (self.kcmp, self.ofd) {
            (Some(k), Some(o)) if k == o => "kcmp at hand-off agrees",
            (Some(_), Some(_)) => "kcmp at hand-off disagrees",
            (None, Some(_)) => "no kcmp at hand-off",
            (Some(true), None) => "kcmp at hand-off: the same open file description",
            (Some(false), None) => "kcmp at hand-off: not the same open file description",
            (None, None) => "nothing says it is the same open file description",
        };
        match self.ofd {
            Some(true) => format!(
                "the kernel's open-file-description id is the one of the manager's fd {mgr_fd}; {kcmp}"
            ),
            Some(false) => format!(
                "the kernel's open-file-description id is not the one of the manager's fd {mgr_fd}; {kcmp}"
            ),
            None => format!("{kcmp} as the manager's fd {mgr_fd}"),
        }
    }
}

pub(super) fn judge_open(l: &mut Ledger, c: &Claim, last: bool) -> Option<Found> {
    let ClaimKind::NetOpen {
        mac,
        path,
        rdev,
        fd,
    } = &c.kind
    else {
        unreachable!("judge_open takes open claims")
    };
    let managers = l.managers_of(c);
    if !c.success {
        return judge_failed_open(l, c, path, &managers, last);
    }
    let candidates = l.log.opens.iter_mut().filter(|o| {
        o.named.is_none()
            && managers.contains(&o.at.pid)
            && o.ts <= c.made_ns
            && (o.path == *path || (rdev.is_some() && o.rdev == *rdev))
            && fd.is_none_or(|fd| o.at.fd == fd)
    });
    // The record names its fd: the latest open of it. Else the oldest no record named.
    let found = match fd {
        Some(_) => candidates.max_by_key(|o| o.ts),
        None => candidates.min_by_key(|o| o.ts),
    };
    let Some(o) = found else {
        return last.then(|| {
            Found::unconfirmed(format!(
                "the kernel saw no open of {path} by the manager before this record"
            ))
            .on(managers.clone())
        });
    };
    o.named = Some(c.id);
    let o = o.clone();
    // Named, it is the NIC's now; the list keeps only opens still to be named.
    l.log.opens.retain(|x| x.named.is_none());
    let mut e = o.evidence();
    if fd.is_none() {
        e = e.detail(
            "inferred: the manager's oldest open of this device that no earlier record named",
        );
    }
    let nic = l.vms.entry(c.uuid.clone()).or_default();
    nic.nics
        .entry(mac.clone())
        .or_default()
        .opens
        .push(NicOpen {
            at: o.at,
            ts: o.ts,
            path: o.path.clone(),
            ofd: o.ofd,
            claim: {
                let mut r = c.claim_ref();
                r.fd = Some(o.at.fd);
                r
            },
            passed: false,
        });
    Some(
        Found::confirmed(
            format!(
                "the manager (pid {}) opened {} as fd {} for NIC {mac}",
                o.at.pid, o.path, o.at.fd
            ),
            vec![e],
        )
        .on([o.at.pid])
        .about(Some(o.at.fd)),
    )
}

fn judge_failed_open(
    l: &mut Ledger,
    c: &Claim,
    path: &str,
    managers: &[u32],
    last: bool,
) -> Option<Found> {
    let failed = l
        .log
        .failed
        .iter()
        .rev()
        .find(|f| managers.contains(&f.pid) && f.path == path && f.ts <= c.made_ns);
    if let Some(f) = failed {
        return Some(
            Found::confirmed(
                format!("the kernel refused to open {path} ({})", f.errno),
                vec![
                    Evidence::new(f.pid, "open")
                        .at(f.ts)
                        .path(path)
                        .detail(f.errno.clone()),
                ],
            )
            .on([f.pid]),
        );
    }
    if let Some(found) = opened_then_released(l, c, path, managers) {
        return Some(found);
    }
    last.then(|| {
        Found::unconfirmed(format!(
            "the kernel saw no failed open of {path} by the manager"
        ))
        .on(managers.to_vec())
    })
}

/// A device whose open succeeded but whose set-up failed (a tap's TUNSETIFF, as libvirt also
/// audits it): the manager opened it and released it before the record, and nothing was
/// passed.
fn opened_then_released(l: &mut Ledger, c: &Claim, path: &str, managers: &[u32]) -> Option<Found> {
    let o = l.log.opens.iter_mut().find(|o| {
        o.named.is_none()
            && managers.contains(&o.at.pid)
            && o.path == path
            && o.released
                .is_some_and(|(ts, _)| ts >= o.ts && ts <= c.made_ns)
    })?;
    o.named = Some(c.id);
    let o = o.clone();
    l.log.opens.retain(|x| x.named.is_none());
    let (ts, op) = o.released?;
    Some(
        Found::confirmed(
            format!(
                "the manager (pid {}) opened {path} as fd {} and released it before the record: the device was not set up, nothing was passed",
                o.at.pid, o.at.fd
            ),
            vec![
                o.evidence(),
                Evidence::new(o.at.pid, op.name()).fd(o.at.fd).at(ts),
            ],
        )
        .on([o.at.pid]),
    )
}

/// One of the emulator's fds for a NIC, as found.
struct NicFd {
    at: FdRef,
    /// When it arrived in the emulator.
    since: u64,
    /// Held now (evidence `holds`), or released (evidence: the release).
    held: bool,
    evidence: Evidence,
}

/// The emulator of `c`'s VM and its table, or the verdict that they are not known.
fn emulator_of(
    l: &mut Ledger,
    c: &Claim,
    given: Option<u32>,
    last: bool,
) -> Result<u32, Option<Found>> {
    match given.or_else(|| l.vms.get(&c.uuid).and_then(|v| v.pid)) {
        Some(pid) => Ok(pid),
        None if last => {
            l.stats.unknown_vm += 1;
            Err(Some(Found::unknown(
                "no start record for this VM was seen: its emulator is not known",
            )))
        }
        None => Err(None),
    }
}

pub(super) fn judge_up(
    l: &mut Ledger,
    c: &Claim,
    view: &dyn KernelView,
    last: bool,
) -> Option<Found> {
    let ClaimKind::NetUp {
        mac,
        attach,
        emulator_pid,
        handed,
    } = &c.kind
    else {
        unreachable!("judge_up takes start and attach claims")
    };
    let emu = match emulator_of(l, c, *emulator_pid, last) {
        Ok(pid) => pid,
        Err(f) => return f,
    };
    if view.table(emu).is_none() {
        return last.then(|| {
            Found::unknown(format!(
                "the emulator (pid {emu}) is not watched: its fds cannot be seen"
            ))
        });
    }
    let managers = l.managers_of(c);
    let table = view.table(emu);
    let bad = handed.iter().find_map(|h| {
        let held = table
            .and_then(|t| t.fds.get(&h.emulator_fd))
            .map(Box::as_ref)
            .filter(|e| arrived_for(e, c));
        let how = Handoff::of(l, c, mac, &managers, h, held);
        (how.same() == Some(false)).then_some((h, how))
    });
    if let Some((bad, how)) = bad {
        let by = if how.ofd.is_some() {
            "the kernel's open-file-description ids"
        } else {
            "kcmp at hand-off"
        };
        return Some(
            Found::violated(
                format!(
                    "the emulator's fd {} is not the open file the manager opened as fd {} ({by})",
                    bad.emulator_fd, bad.fd
                ),
                vec![
                    Evidence::new(emu, "handoff")
                        .fd(bad.emulator_fd)
                        .detail(how.detail(bad.fd)),
                ],
            )
            .on([emu]),
        );
    }
    let found = if handed.is_empty() {
        infer_nic_fds(l, c, emu, mac, view)
    } else {
        let how = |h: &Handed, held: Option<&FdEntry>| Handoff::of(l, c, mac, &managers, h, held);
        match handed_fds(l, c, emu, handed, view, how) {
            Some(f) => f,
            None => return last.then(|| not_held(l, c, emu, mac, *attach, view)),
        }
    };
    up_verdict(l, c, emu, mac, *attach, found, handed, view, last)
}

#[allow(clippy::too_many_arguments)]
fn up_verdict(
    l: &mut Ledger,
    c: &Claim,
    emu: u32,
    mac: &str,
    attach: bool,
    found: Vec<NicFd>,
    handed: &[Handed],
    view: &dyn KernelView,
    last: bool,
) -> Option<Found> {
    if found.is_empty() {
        return last.then(|| not_held(l, c, emu, mac, attach, view));
    }
    // The manager's exact list must be held fd by fd; an inferred NIC is held while any of its
    // fds is (a copy the emulator made and closed is no release of the NIC).
    let gone = if handed.is_empty() {
        found.iter().all(|f| !f.held).then(|| &found[0])
    } else {
        found.iter().find(|f| !f.held)
    };
    if let Some(gone) = gone {
        if let Some(detach) = detached_after(l, c, mac) {
            return Some(held_until_detach(l, c, emu, mac, &found, handed, detach));
        }
        // Its detach record may follow within the deadline (libvirt closes the tap, then
        // writes it; a hot-unplug right after the attach is judged after both).
        if !last {
            return None;
        }
        // The claim did give these fds: their arrival is no device no claim gave.
        register_held(l, c, mac, &found, handed, true);
        return Some(
            Found::violated(
                format!(
                    "the emulator (pid {emu}) does not hold fd {} of NIC {mac}: it released it ({}) with no detach",
                    gone.at.fd, gone.evidence.what
                ),
                vec![gone.evidence.clone()],
            )
            .on([emu]),
        );
    }
    let found: Vec<NicFd> = found.into_iter().filter(|f| f.held).collect();
    let list = fd_list(found.iter().map(|f| f.at.fd));
    register_held(l, c, mac, &found, handed, false);
    let first = found.first().map(|f| f.at.fd);
    let same = if handed.is_empty() {
        ""
    } else {
        ", the same open files the manager opened"
    };
    Some(
        Found::confirmed(
            format!("the emulator (pid {emu}) holds fd {list} of NIC {mac}{same}"),
            found.into_iter().map(|f| f.evidence).collect(),
        )
        .on([emu])
        .about(first),
    )
}

/// The id of a successful detach of NIC `mac` claimed after claim `c`.
fn detached_after(l: &Ledger, c: &Claim, mac: &str) -> Option<u64> {
    l.vms
        .get(&c.uuid)?
        .nics
        .get(mac)?
        .detach
        .map(|(id, _)| id)
        .filter(|id| *id > c.id)
}

/// The NIC's fds arrived and were released, and a detach claimed after this claim explains
/// the release: the emulator held them. They are registered released, for the detach.
fn held_until_detach(
    l: &mut Ledger,
    c: &Claim,
    emu: u32,
    mac: &str,
    found: &[NicFd],
    handed: &[Handed],
    detach: u64,
) -> Found {
    let mut evidence = Vec::new();
    for f in found {
        if let Some(&(ts, op)) = l.log.gains.get(&f.at) {
            evidence.push(Evidence::new(emu, op.name()).fd(f.at.fd).at(ts));
        }
        evidence.push(f.evidence.clone());
    }
    register_held(l, c, mac, found, handed, true);
    Found::confirmed(
        format!(
            "the emulator (pid {emu}) held fd {} of NIC {mac} until it released it for the detach (claim {detach}) that followed",
            fd_list(found.iter().map(|f| f.at.fd))
        ),
        evidence,
    )
    .on([emu])
    .about(found.first().map(|f| f.at.fd))
}

/// The NIC's fds, as the manager handed them; None while one is neither held nor released.
/// Whether the emulator's fd can be the one claim `c` is about: it arrived before the record
/// was made. A later one at the same number is a later hand-off's (the claim, waiting for its
/// detach, is judged after the fd went and its number came back).
fn arrived_for(e: &FdEntry, c: &Claim) -> bool {
    e.since_ns <= c.made_ns
}

fn handed_fds(
    l: &Ledger,
    c: &Claim,
    emu: u32,
    handed: &[Handed],
    view: &dyn KernelView,
    handoff: impl Fn(&Handed, Option<&FdEntry>) -> Handoff,
) -> Option<Vec<NicFd>> {
    let table = view.table(emu)?;
    handed
        .iter()
        .map(|h| {
            let at = FdRef::new(emu, h.emulator_fd);
            let held = table
                .fds
                .get(&h.emulator_fd)
                .map(Box::as_ref)
                .filter(|e| h.rdev.is_none() || e.id.rdev == h.rdev)
                .filter(|e| arrived_for(e, c));
            let how = handoff(h, held);
            match (held, l.log.releases.get(&at)) {
                (Some(e), _) if how.same() == Some(true) => Some(NicFd {
                    at,
                    since: e.since_ns,
                    held: true,
                    evidence: Evidence::new(emu, e.via.name())
                        .fd(h.emulator_fd)
                        .at(e.since_ns)
                        .path(e.id.path.clone())
                        .rdev(e.id.rdev)
                        .detail(how.detail(h.fd)),
                }),
                (None, Some(&(ts, op))) => Some(NicFd {
                    at,
                    since: l.log.gains.get(&at).map_or(0, |g| g.0),
                    held: false,
                    evidence: Evidence::new(emu, op.name())
                        .fd(h.emulator_fd)
                        .at(ts)
                        .path(h.path.clone())
                        .rdev(h.rdev),
                }),
                _ => None,
            }
        })
        .collect()
}

/// The emulator's fds for NIC `mac` that the kernel shows: by the interface's address, or by
/// kcmp with the manager's open of it. Released ones count (their release is the evidence).
fn infer_nic_fds(l: &Ledger, c: &Claim, emu: u32, mac: &str, view: &dyn KernelView) -> Vec<NicFd> {
    let opens: Vec<FdRef> = l
        .vms
        .get(&c.uuid)
        .and_then(|v| v.nics.get(mac))
        .map(|n| n.opens.iter().map(|o| o.at).collect())
        .unwrap_or_default();
    let earlier: Vec<(FdRef, u64)> = l
        .vms
        .get(&c.uuid)
        .and_then(|v| v.nics.get(mac))
        .map(|n| {
            n.held
                .iter()
                .filter(|h| h.claim.id < c.id)
                .map(|h| (h.at, h.since))
                .collect()
        })
        .unwrap_or_default();
    let since = c.made_ns.saturating_sub(l.deadline_ns);
    candidates(l, emu, since, view)
        .into_iter()
        // An fd an earlier start or attach of the NIC accounts for is not this claim's.
        .filter(|life| !earlier.contains(&(life.at, life.since)))
        .filter_map(|life| nic_fd(&life, mac, &opens, view))
        .collect()
}

/// The emulator's network fds: what the tracker saw arrive (held, or released since `since`),
/// and what its table holds from before watching.
fn candidates(l: &Ledger, emu: u32, since: u64, view: &dyn KernelView) -> Vec<NetFdLife> {
    let mut out: Vec<NetFdLife> = l.log.net_fds_of(emu, since).cloned().collect();
    if let Some(t) = view.table(emu) {
        for e in t.fds.values().filter(|e| e.id.is_net_device()) {
            let at = FdRef::new(emu, e.fd);
            if out.iter().any(|n| n.at == at && n.released.is_none()) {
                continue;
            }
            let iface = view.iface_of(at).or_else(|| e.id.iface.clone());
            out.push(NetFdLife {
                at,
                since: e.since_ns,
                via: e.via,
                path: e.id.path.to_string(),
                rdev: e.id.rdev,
                address: iface.as_deref().and_then(|i| view.iface_address(i)),
                iface,
                released: None,
            });
        }
    }
    out
}

fn nic_fd(life: &NetFdLife, mac: &str, opens: &[FdRef], view: &dyn KernelView) -> Option<NicFd> {
    let held = life.released.is_none();
    // The address now, or as read when the fd arrived (a released tap may be gone).
    let address = held
        .then(|| life.iface.as_deref().and_then(|i| view.iface_address(i)))
        .flatten()
        .or_else(|| life.address.clone());
    let by_mac = address.as_deref().is_some_and(|a| host_mac_matches(a, mac));
    let by_kcmp = (!by_mac && held)
        .then(|| {
            opens
                .iter()
                .find(|o| view.same_file(**o, life.at) == Some(true))
        })
        .flatten();
    if !by_mac && by_kcmp.is_none() {
        return None;
    }
    let mut how = Vec::new();
    if let Some(i) = &life.iface {
        how.push(format!("interface {i}"));
    }
    if by_mac {
        how.push(format!(
            "whose address {} is libvirt's host side of {mac}",
            address.unwrap_or_default().trim()
        ));
    }
    if let Some(o) = by_kcmp {
        how.push(format!(
            "kcmp: the open file description the manager (pid {}) opened as fd {}",
            o.pid, o.fd
        ));
    }
    how.push(format!("arrived via {}", life.via));
    let mut evidence = life.evidence();
    evidence.detail = Some(format!("inferred: {}", how.join("; ")));
    Some(NicFd {
        at: life.at,
        since: life.since,
        held,
        evidence,
    })
}

/// No fd of the emulator is the NIC's: a violation, with what it holds and released.
fn not_held(
    l: &Ledger,
    c: &Claim,
    emu: u32,
    mac: &str,
    attach: bool,
    view: &dyn KernelView,
) -> Found {
    let since = c.made_ns.saturating_sub(l.deadline_ns);
    let evidence: Vec<Evidence> = candidates(l, emu, since, view)
        .iter()
        .map(NetFdLife::evidence)
        .collect();
    let how = if attach { "attached" } else { "started with" };
    Found::violated(
        format!(
            "the manager says VM {} {how} NIC {mac}, but the emulator (pid {emu}) holds no fd for it",
            c.vm_name
        ),
        evidence,
    )
    .on([emu])
}

/// The NIC's fds become held (their release is now watched, unless `released`: a detach
/// already explains it), and the opens they are marked passed.
fn register_held(
    l: &mut Ledger,
    c: &Claim,
    mac: &str,
    found: &[NicFd],
    handed: &[Handed],
    released: bool,
) {
    let mut claim = c.claim_ref();
    claim.fd = found.first().map(|f| f.at.fd);
    let nic = l
        .vms
        .entry(c.uuid.clone())
        .or_default()
        .nics
        .entry(mac.to_owned())
        .or_default();
    for f in found {
        // A new fd at the number replaces the old one, unless a claim released the old one (it
        // still answers for its own arrival until it is pruned).
        nic.held
            .retain(|h| h.at != f.at || (h.released && h.since != f.since));
        nic.held.push(HeldFd {
            at: f.at,
            since: f.since,
            claim: claim.clone(),
            released,
        });
    }
    for o in nic.opens.iter_mut() {
        // vmaudit says which; for libvirt's records, the NIC's fds are found, so its opens
        // were passed.
        o.passed |= handed.is_empty() || handed.iter().any(|h| h.fd == o.at.fd);
    }
}

/// A detach claim (its id, when it was made) releases the NIC's fds: their release is no
/// violation from now on.
pub(super) fn note_detach(
    l: &mut Ledger,
    claim: (u64, u64),
    uuid: &str,
    mac: &str,
    fds: Option<&[i32]>,
) {
    let Some(vm) = l.vms.get_mut(uuid) else {
        return;
    };
    let pid = vm.pid;
    let nic = vm.nics.entry(mac.to_owned()).or_default();
    nic.detach = Some(claim);
    for h in nic.held.iter_mut() {
        if fds.is_none_or(|f| f.contains(&h.at.fd)) && pid.is_none_or(|p| p == h.at.pid) {
            h.released = true;
        }
    }
}

pub(super) fn judge_detach(
    l: &mut Ledger,
    c: &Claim,
    view: &dyn KernelView,
    last: bool,
) -> Option<Found> {
    let ClaimKind::NetDetach {
        mac,
        emulator_pid,
        fds,
    } = &c.kind
    else {
        unreachable!("judge_detach takes detach claims")
    };
    let emu = match emulator_of(l, c, *emulator_pid, last) {
        Ok(pid) => pid,
        Err(f) => return f,
    };
    let Some(table) = view.table(emu) else {
        return Some(Found::unknown(format!(
            "the emulator (pid {emu}) is not watched: no kernel evidence of what it released"
        )));
    };
    let fds: Vec<i32> = match fds {
        Some(f) => f.clone(),
        None => nic_fds_known(l, c, emu, mac),
    };
    if fds.is_empty() && !last && l.up_pending(&c.uuid, mac) {
        // The start or attach that names the fds is still waiting for its evidence.
        return None;
    }
    if fds.is_empty() {
        return Some(Found::unknown(format!(
            "which fds NIC {mac} had is not known (no start or attach of it was confirmed)"
        )));
    }
    let still: Vec<Evidence> = fds
        .iter()
        .filter_map(|fd| table.fds.get(fd))
        .map(|e| {
            Evidence::new(emu, "holds")
                .fd(e.fd)
                .at(e.since_ns)
                .path(e.id.path.clone())
                .rdev(e.id.rdev)
        })
        .collect();
    if c.success {
        detach_claimed(l, emu, mac, &fds, still, last)
    } else {
        Some(detach_failed(emu, mac, &fds, still))
    }
}

/// The fds NIC `mac` was confirmed held with.
fn nic_fds_known(l: &Ledger, c: &Claim, emu: u32, mac: &str) -> Vec<i32> {
    l.vms
        .get(&c.uuid)
        .and_then(|v| v.nics.get(mac))
        .map(|n| {
            n.held
                .iter()
                .filter(|h| h.at.pid == emu)
                .map(|h| h.at.fd)
                .collect()
        })
        .unwrap_or_default()
}

fn detach_claimed(
    l: &Ledger,
    emu: u32,
    mac: &str,
    fds: &[i32],
    still: Vec<Evidence>,
    last: bool,
) -> Option<Found> {
    if !still.is_empty() {
        let held = fd_list(still.iter().filter_map(|e| e.fd));
        return last.then(|| {
            Found::violated(
                format!(
                    "the manager says NIC {mac} was detached, but the emulator (pid {emu}) still holds fd {held}"
                ),
                still,
            )
            .on([emu])
        });
    }
    let evidence = fds
        .iter()
        .map(|fd| {
            let at = FdRef::new(emu, *fd);
            match l.log.releases.get(&at) {
                Some(&(ts, op)) => Evidence::new(emu, op.name()).fd(*fd).at(ts),
                None => Evidence::new(emu, "holds")
                    .fd(*fd)
                    .detail("not in the emulator's fd table"),
            }
            .detail(format!("NIC {mac}'s fd, released"))
        })
        .collect();
    Some(
        Found::confirmed(
            format!(
                "the emulator (pid {emu}) released every fd of NIC {mac}: fd {}",
                fd_list(fds.iter().copied())
            ),
            evidence,
        )
        .on([emu]),
    )
}

/// A detach recorded as failed claims nothing released: the emulator should still hold them.
fn detach_failed(emu: u32, mac: &str, fds: &[i32], still: Vec<Evidence>) -> Found {
    if still.len() == fds.len() {
        Found::confirmed(
            format!(
                "the detach of NIC {mac} failed, and the emulator (pid {emu}) still holds fd {}",
                fd_list(fds.iter().copied())
            ),
            still,
        )
        .on([emu])
    } else {
        Found::violated(
            format!(
                "the detach of NIC {mac} is recorded as failed, yet the emulator (pid {emu}) released some of its fds"
            ),
            still,
        )
        .on([emu])
    }
}

/// Once a VM is settled: every open of it that was never passed must be closed by now.
pub(super) fn judge_unpassed(
    l: &mut Ledger,
    uuid: &str,
    view: &dyn KernelView,
    now: u64,
    out: &mut Vec<Verdict>,
) {
    let Some(vm) = l.vms.get_mut(uuid) else {
        return;
    };
    let opens: Vec<NicOpen> = vm
        .nics
        .values_mut()
        .flat_map(|n| std::mem::take(&mut n.opens))
        .filter(|o| !o.passed)
        .collect();
    for o in opens {
        let found = unpassed(l, &o, view);
        let v = l.seal(o.claim.clone(), found, o.ts, now);
        out.push(v);
    }
}

fn unpassed(l: &Ledger, o: &NicOpen, view: &dyn KernelView) -> Found {
    let still = view
        .table(o.at.pid)
        .and_then(|t| t.fds.get(&o.at.fd))
        .filter(|e| e.since_ns == o.ts);
    match (still, l.log.releases.get(&o.at)) {
        (None, Some(&(ts, op))) => Found::confirmed(
            format!(
                "opened, not passed: the manager closed fd {} ({}) and no watched process holds it",
                o.at.fd, o.path
            ),
            vec![Evidence::new(o.at.pid, op.name()).fd(o.at.fd).at(ts)],
        )
        .on([o.at.pid]),
        (None, None) => Found::unknown(format!(
            "opened, not passed: fd {} ({}) is gone from the manager's table, but its release was not seen",
            o.at.fd, o.path
        ))
        .on([o.at.pid]),
        (Some(e), _) => Found::violated(
            format!(
                "opened, not passed, and fd {} ({}) is still held by the manager (pid {})",
                o.at.fd, o.path, o.at.pid
            ),
            vec![
                Evidence::new(o.at.pid, "holds")
                    .fd(o.at.fd)
                    .at(e.since_ns)
                    .path(e.id.path.clone())
                    .rdev(e.id.rdev),
            ],
        )
        .on([o.at.pid]),
    }
}

pub(super) fn fd_list(fds: impl Iterator<Item = i32>) -> String {
    fds.map(|f| f.to_string()).collect::<Vec<_>>().join(", ")
}
