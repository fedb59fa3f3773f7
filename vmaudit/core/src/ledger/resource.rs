//! The claims of resources besides the network (disk, chardev, rng, hostdev, tpm, shmem,
//! evdev): the emulator holds an fd on what the record names from a start or attach on, and
//! none after a detach.
//!
//! What the record names is read with stat (never opened) and found in the emulator's table:
//! - a file (an image, a chardev's file or FIFO, `/dev/shm/NAME`): an fd on the same device
//!   and inode; or, for a file a log daemon writes for the emulator (libvirt's virtlogd and a
//!   chardev's file), a pipe whose other end is held by the process that holds the file;
//! - a device node: an fd with its device number and type; a pty slave (`/dev/pts/N`): a
//!   `/dev/ptmx` fd whose `tty-index` is N; a device the emulator opened itself must be one
//!   the ACL its cgroup claims allows (the cgroup claim that allows it is cited);
//! - a unix socket: an fd on the socket bound to that path;
//! - a host device by bus address: the node sysfs gives for it (`/dev/vfio/N`, ...).
//!
//! Once confirmed, the resource is held there: the emulator releasing its last fd on it with
//! no detach record (a detach, the exit or the stop explains it) is a violation a deadline
//! later; a release followed by a new fd on the same file (a reopen) is none.

use super::{Found, Ledger, net::fd_list, vm::acl_allows};
use crate::{
    acl::Acl,
    claim::{Claim, ClaimKind, Resrc, Target},
    fd::{DevNum, FdEntry, FdRecord, FileKind, Op},
    verdict::{ClaimRef, Evidence, Verdict},
    view::{FdRef, FileId, KernelView},
};

/// `/dev/ptmx`, whose fds are the masters of the ptys `/dev/pts/N`.
const PTMX: DevNum = DevNum::new(5, 2);

/// The resources confirmed held, each watched for a release no claim explains.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    held: Vec<HeldRes>,
}

#[derive(Clone, Debug)]
struct HeldRes {
    uuid: String,
    pid: u32,
    resrc: Resrc,
    target: Target,
    /// The emulator's fds on it, as last found (their releases are the evidence of a detach).
    fds: Vec<FdRef>,
    claim: ClaimRef,
    /// A detach (or update) claim released it.
    released: bool,
    /// One of its fds was released: looked at again at `due`.
    pending: Option<Release>,
}

#[derive(Clone, Copy, Debug)]
struct Release {
    at: FdRef,
    ts: u64,
    op: Op,
    due: u64,
}

/// An fd of the emulator on what a record names.
struct Hold {
    at: FdRef,
    evidence: Vec<Evidence>,
    /// A device node the emulator opened itself: (device, block).
    opened_device: Option<(DevNum, bool)>,
}

/// How the emulator holds what a record names, as the kernel shows it now.
enum Seen {
    Held(Vec<Hold>),
    /// Held by no fd of the emulator: what was looked for.
    NotHeld(String),
    /// The kernel cannot tell.
    Unknowable(String),
}

pub(super) fn judge(l: &mut Ledger, c: &Claim, view: &dyn KernelView, last: bool) -> Option<Found> {
    let ClaimKind::Resource {
        resrc, old, new, ..
    } = &c.kind
    else {
        unreachable!("resource::judge takes resource claims")
    };
    let Some(emu) = l.vms.get(&c.uuid).filter(|v| v.running).and_then(|v| v.pid) else {
        return last.then(|| {
            l.stats.unknown_vm += 1;
            Found::unknown("no start record for this VM was seen: its emulator is not known")
        });
    };
    if view.table(emu).is_none() {
        return last.then(|| {
            Found::unknown(format!(
                "the emulator (pid {emu}) is not watched: its fds cannot be seen"
            ))
        });
    }
    let mut parts = Vec::new();
    if let Some(t) = new {
        parts.push(gained(l, c, view, emu, *resrc, t, last)?);
    }
    if let Some(t) = old.as_ref().filter(|o| Some(*o) != new.as_ref()) {
        parts.push(released(l, c, view, emu, *resrc, t, last)?);
    }
    Some(combine(parts).on([emu]))
}

/// Both sides of an update in one verdict: the worst status, every reason and fact.
fn combine(parts: Vec<Found>) -> Found {
    let mut it = parts.into_iter();
    let first = it.next().expect("a resource claim names old or new");
    it.fold(first, |a, b| {
        let status = if b.status.severity() > a.status.severity() {
            b.status
        } else {
            a.status
        };
        let mut evidence = a.evidence;
        evidence.extend(b.evidence);
        Found::new(status, format!("{}; {}", a.reason, b.reason), evidence).about(a.fd.or(b.fd))
    })
}

/// The side a record says the emulator now holds (held when the record says success).
fn gained(
    l: &mut Ledger,
    c: &Claim,
    view: &dyn KernelView,
    emu: u32,
    resrc: Resrc,
    t: &Target,
    last: bool,
) -> Option<Found> {
    let what = resrc.name();
    match (locate(view, emu, resrc, t), c.success) {
        (Seen::Unknowable(why), _) => Some(Found::unknown(format!("{what} {t}: {why}"))),
        (Seen::Held(holds), true) => Some(confirm_held(l, c, emu, resrc, t, holds)),
        (Seen::NotHeld(why), true) => last.then(|| {
            Found::violated(
                format!(
                    "the manager says VM {} has {what} {t}, but the emulator (pid {emu}) holds no fd on it ({why})",
                    c.vm_name
                ),
                vec![],
            )
        }),
        (Seen::NotHeld(_), false) => Some(Found::confirmed(
            format!(
                "the {what} change failed, and the emulator (pid {emu}) holds no fd on {t}"
            ),
            vec![Evidence::new(emu, "holds").detail(format!("no fd on {t} in its table"))],
        )),
        (Seen::Held(holds), false) => last.then(|| {
            Found::violated(
                format!(
                    "the {what} change is recorded as failed, yet the emulator (pid {emu}) holds fd {} on {t}",
                    fd_list(holds.iter().map(|h| h.at.fd))
                ),
                holds.into_iter().flat_map(|h| h.evidence).collect(),
            )
        }),
    }
}

/// The side a record says the emulator no longer holds (still held when the record says the
/// detach failed).
fn released(
    l: &mut Ledger,
    c: &Claim,
    view: &dyn KernelView,
    emu: u32,
    resrc: Resrc,
    t: &Target,
    last: bool,
) -> Option<Found> {
    let what = resrc.name();
    let seen = match locate(view, emu, resrc, t) {
        // Gone from the host (a deleted image): the fds it was confirmed with tell.
        Seen::Unknowable(why) => match known_fds(l, c, resrc, t) {
            Some(fds) if !fds.iter().any(|f| still_held(view, *f)) => Seen::NotHeld(format!(
                "{why}; none of fd {} is held",
                fd_list(fds.iter().map(|f| f.fd))
            )),
            _ => return Some(Found::unknown(format!("{what} {t}: {why}"))),
        },
        seen => seen,
    };
    match (seen, c.success) {
        (Seen::NotHeld(why), true) => Some(Found::confirmed(
            format!("the emulator (pid {emu}) holds no fd on {what} {t} any more"),
            release_evidence(l, c, resrc, t, emu, &why),
        )),
        (Seen::Held(holds), true) => last.then(|| {
            Found::violated(
                format!(
                    "the manager says {what} {t} was detached, but the emulator (pid {emu}) still holds fd {}",
                    fd_list(holds.iter().map(|h| h.at.fd))
                ),
                holds.into_iter().flat_map(|h| h.evidence).collect(),
            )
        }),
        (Seen::Held(holds), false) => Some(Found::confirmed(
            format!(
                "the detach of {what} {t} failed, and the emulator (pid {emu}) still holds fd {}",
                fd_list(holds.iter().map(|h| h.at.fd))
            ),
            holds.into_iter().flat_map(|h| h.evidence).collect(),
        )),
        (Seen::NotHeld(why), false) => last.then(|| {
            Found::violated(
                format!(
                    "the detach of {what} {t} is recorded as failed, yet the emulator (pid {emu}) holds no fd on it ({why})"
                ),
                vec![],
            )
        }),
        (Seen::Unknowable(_), _) => unreachable!("handled above"),
    }
}

/// Held: confirmed, unless the emulator opened a device itself that the claimed ACL does not
/// allow; remembered, to watch its release.
fn confirm_held(
    l: &mut Ledger,
    c: &Claim,
    emu: u32,
    resrc: Resrc,
    t: &Target,
    holds: Vec<Hold>,
) -> Found {
    let what = resrc.name();
    let fds: Vec<FdRef> = holds.iter().map(|h| h.at).collect();
    let mut evidence: Vec<Evidence> = Vec::new();
    let mut outside = None;
    for h in holds {
        evidence.extend(h.evidence);
        let Some((dev, block)) = h.opened_device else {
            continue;
        };
        match acl_check(l, &c.uuid, dev, block) {
            Ok(Some(e)) => evidence.push(e),
            Ok(None) => {}
            Err(()) => outside = Some((h.at, dev)),
        }
    }
    let first = fds.first().map(|f| f.fd);
    if let Some((at, dev)) = outside {
        return Found::violated(
            format!(
                "the emulator (pid {emu}) opened {what} {t} ({dev}) itself as fd {}, which the ACL its cgroup claims does not allow",
                at.fd
            ),
            evidence,
        )
        .about(first);
    }
    let mut claim = c.claim_ref();
    claim.fd = first;
    let res = &mut l.resources;
    res.held
        .retain(|h| !(h.uuid == c.uuid && h.target == *t && h.resrc == resrc));
    res.held.push(HeldRes {
        uuid: c.uuid.clone(),
        pid: emu,
        resrc,
        target: t.clone(),
        fds: fds.clone(),
        claim,
        released: false,
        pending: None,
    });
    Found::confirmed(
        format!(
            "the emulator (pid {emu}) holds {what} {t}: fd {}",
            fd_list(fds.iter().map(|f| f.fd))
        ),
        evidence,
    )
    .about(first)
}

/// A device the emulator opened itself against the ACL its VM's cgroup claims: Ok(the
/// confirmed cgroup claim that allows it, if any), Err when the claimed ACL does not allow
/// it. No ACL claimed: nothing to hold it to.
fn acl_check(l: &Ledger, uuid: &str, dev: DevNum, block: bool) -> Result<Option<Evidence>, ()> {
    let Some(vm) = l.vms.get(uuid).filter(|v| v.acl_claimed) else {
        return Ok(None);
    };
    if !acl_allows(&vm.acl, block, dev, Acl::READ) {
        return Err(());
    }
    let by = vm
        .rules
        .iter()
        .find(|r| acl_allows(std::slice::from_ref(&r.what), block, dev, Acl::READ));
    Ok(by.map(|r| {
        let mut e = Evidence::new(0, "map").rdev(Some(dev)).detail(format!(
            "the device cgroup allows it: {} (cgroup claim {}, confirmed in the kernel's policy)",
            r.what, r.claim.id
        ));
        if let Some(dir) = &vm.cgroup {
            e = e.path(dir.display().to_string());
        }
        e
    }))
}

/// What the record names, and the emulator's fds on it.
fn locate(view: &dyn KernelView, emu: u32, resrc: Resrc, t: &Target) -> Seen {
    let files = match resolve(view, resrc, t) {
        Ok(f) => f,
        Err(why) => return Seen::Unknowable(why),
    };
    let Some(table) = view.table(emu) else {
        return Seen::Unknowable(format!("the emulator (pid {emu}) is not watched"));
    };
    let fresh: Vec<FdEntry> = table
        .fds
        .values()
        .map(|e| refreshed(view, emu, e))
        .collect();
    let fds: Vec<&FdEntry> = fresh.iter().collect();
    let mut looked = Vec::new();
    for (path, file) in &files {
        match find(view, emu, &fds, path, file) {
            Seen::Held(h) => return Seen::Held(h),
            Seen::NotHeld(why) => looked.push(why),
            u @ Seen::Unknowable(_) => return u,
        }
    }
    Seen::NotHeld(looked.join("; "))
}

/// A table entry whose file the tracker could not identify (a received fd its sender closed
/// first), read again now.
fn refreshed(view: &dyn KernelView, emu: u32, e: &FdEntry) -> FdEntry {
    let mut e = e.clone();
    if e.id.ino.is_none()
        && let Some(id) = view.identity(FdRef::new(emu, e.fd))
    {
        e.id = id;
    }
    e
}

/// The files a record's target is/// The files a record's target is: its path (and, for a chardev `pipe`, the `.in`/`.out` pair
/// qemu opens in its place), or a host device's node.
fn resolve(
    view: &dyn KernelView,
    resrc: Resrc,
    t: &Target,
) -> Result<Vec<(String, FileId)>, String> {
    let path = match t {
        Target::Path(p) => p.clone(),
        Target::HostDev { bus, address } => view.host_device(bus, address)?.display().to_string(),
    };
    if !path.starts_with('/') {
        return Err(format!("{path} is not an absolute path"));
    }
    let first = view.stat(path.as_ref());
    if resrc != Resrc::Chardev || first.is_ok() {
        return first.map(|f| vec![(path, f)]);
    }
    let pair: Vec<(String, FileId)> = [".in", ".out"]
        .iter()
        .filter_map(|s| {
            let p = format!("{path}{s}");
            view.stat(p.as_ref()).ok().map(|f| (p, f))
        })
        .collect();
    if pair.is_empty() {
        return first.map(|f| vec![(path, f)]);
    }
    Ok(pair)
}

/// The emulator's fds on one file.
fn find(view: &dyn KernelView, emu: u32, fds: &[&FdEntry], path: &str, file: &FileId) -> Seen {
    let direct = |e: &&&FdEntry| match file.kind {
        FileKind::Char | FileKind::Block => e.id.kind == file.kind && e.id.rdev == file.rdev,
        FileKind::Socket => false,
        _ => e.id.dev == Some(file.dev) && e.id.ino == Some(file.ino),
    };
    let same = match file.kind {
        FileKind::Char | FileKind::Block => "the same device number",
        _ => "the same device and inode",
    };
    let mut holds: Vec<Hold> = fds
        .iter()
        .filter(direct)
        .map(|e| hold(emu, e, path, file, same))
        .collect();
    if holds.is_empty() {
        holds = match (file.kind, file.rdev) {
            (FileKind::Char, Some(r)) if pty_index(r).is_some() => ptmx_of(view, emu, fds, path, r),
            (FileKind::Socket, _) => return socket(view, emu, fds, path, file),
            (FileKind::Char | FileKind::Block, _) => Vec::new(),
            _ => through_pipe(view, emu, fds, path, file),
        };
    }
    if holds.is_empty() {
        let what = match file.rdev {
            Some(r) => format!("an fd on device {r} ({path})"),
            None => format!("an fd on {path} (device {}, inode {})", file.dev, file.ino),
        };
        return Seen::NotHeld(format!("no {what} in its table"));
    }
    Seen::Held(holds)
}

fn hold(emu: u32, e: &FdEntry, path: &str, file: &FileId, how: &str) -> Hold {
    let device = matches!(e.id.kind, FileKind::Char | FileKind::Block);
    Hold {
        at: FdRef::new(emu, e.fd),
        evidence: vec![
            Evidence::new(emu, "holds")
                .fd(e.fd)
                .at(e.since_ns)
                .path(e.id.path.clone())
                .rdev(e.id.rdev)
                .detail(format!("arrived via {}; {how} as {path}", e.via)),
        ],
        opened_device: (device && e.via == Op::Open)
            .then(|| e.id.rdev.map(|r| (r, file.kind == FileKind::Block)))
            .flatten(),
    }
}

/// The pty index of a Unix 98 pty slave (`/dev/pts/N`, majors 136 to 143).
fn pty_index(r: DevNum) -> Option<u32> {
    (136..=143)
        .contains(&r.major)
        .then(|| (r.major - 136) * 256 + r.minor)
}

/// The emulator's `/dev/ptmx` fds that are the master of pty `slave`.
fn ptmx_of(
    view: &dyn KernelView,
    emu: u32,
    fds: &[&FdEntry],
    path: &str,
    slave: DevNum,
) -> Vec<Hold> {
    let index = pty_index(slave);
    fds.iter()
        .filter(|e| e.id.rdev == Some(PTMX))
        .filter(|e| view.pty_index(FdRef::new(emu, e.fd)) == index)
        .map(|e| Hold {
            at: FdRef::new(emu, e.fd),
            evidence: vec![
                Evidence::new(emu, "holds")
                    .fd(e.fd)
                    .at(e.since_ns)
                    .path(e.id.path.clone())
                    .rdev(e.id.rdev)
                    .detail(format!(
                        "the master of {path}: its fdinfo says tty-index {}",
                        index.unwrap_or_default()
                    )),
            ],
            opened_device: None,
        })
        .collect()
}

/// A unix socket path: the emulator holds the socket bound there (a server socket, its own or
/// passed by the manager). A socket bound there by another process may be connected to the
/// emulator's: only sock_diag names a connection's peer, and vmaudit does not read it.
fn socket(view: &dyn KernelView, emu: u32, fds: &[&FdEntry], path: &str, file: &FileId) -> Seen {
    let bound = view.unix_sockets_at(path.as_ref());
    if bound.is_empty() {
        return Seen::NotHeld(format!("no unix socket is bound to {path}"));
    }
    let holds: Vec<Hold> = fds
        .iter()
        .filter(|e| e.id.kind == FileKind::Socket && e.id.ino.is_some_and(|i| bound.contains(&i)))
        .map(|e| hold(emu, e, path, file, "the unix socket bound"))
        .collect();
    if holds.is_empty() {
        return Seen::Unknowable(format!(
            "the socket bound to {path} (inode {}) is another process's; whether the emulator is connected to it only sock_diag says",
            bound
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Seen::Held(holds)
}

/// A file another process writes for the emulator (libvirt's virtlogd and a chardev's log
/// file): the emulator holds a pipe whose other end that process holds.
fn through_pipe(
    view: &dyn KernelView,
    emu: u32,
    fds: &[&FdEntry],
    path: &str,
    file: &FileId,
) -> Vec<Hold> {
    let pipes: Vec<(&FdEntry, (DevNum, u64))> = fds
        .iter()
        .filter(|e| e.id.kind == FileKind::Fifo)
        .filter_map(|e| Some((*e, (e.id.dev?, e.id.ino?))))
        .collect();
    if pipes.is_empty() {
        return Vec::new();
    }
    let mut keys: Vec<(DevNum, u64)> = pipes.iter().map(|p| p.1).collect();
    keys.push((file.dev, file.ino));
    let holders = view.holders(&keys);
    let writers = holders
        .iter()
        .filter(|h| h.at.pid != emu && h.file == (file.dev, file.ino));
    for w in writers {
        // The writer's end of one of the emulator's pipes.
        let Some((end, pipe)) = holders.iter().find_map(|h| {
            let p = pipes
                .iter()
                .find(|p| h.at.pid == w.at.pid && h.file == p.1)?;
            Some((h, p.0))
        }) else {
            continue;
        };
        let who = format!("{} (pid {})", w.comm, w.at.pid);
        return vec![Hold {
            at: FdRef::new(emu, pipe.fd),
            evidence: vec![
                Evidence::new(emu, "holds")
                    .fd(pipe.fd)
                    .at(pipe.since_ns)
                    .path(pipe.id.path.clone())
                    .detail(format!(
                        "inferred: written through {who}, which holds the other end of this pipe (its fd {}) and {path} (its fd {}); which of its pipes feeds which file the kernel does not say",
                        end.at.fd, w.at.fd
                    )),
                Evidence::new(w.at.pid, "holds").fd(w.at.fd).path(path.to_owned()),
            ],
            opened_device: None,
        }];
    }
    Vec::new()
}

/// The fds `c`'s VM's emulator was confirmed holding `t` with.
fn known_fds(l: &Ledger, c: &Claim, resrc: Resrc, t: &Target) -> Option<Vec<FdRef>> {
    l.resources
        .held
        .iter()
        .find(|h| h.uuid == c.uuid && h.resrc == resrc && h.target == *t)
        .map(|h| h.fds.clone())
}

fn still_held(view: &dyn KernelView, at: FdRef) -> bool {
    view.table(at.pid)
        .is_some_and(|t| t.fds.contains_key(&at.fd))
}

/// The releases of the fds the resource was confirmed with, or what was looked for.
fn release_evidence(
    l: &Ledger,
    c: &Claim,
    resrc: Resrc,
    t: &Target,
    emu: u32,
    why: &str,
) -> Vec<Evidence> {
    let released: Vec<Evidence> = known_fds(l, c, resrc, t)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|at| {
            let (ts, op) = l.log.releases.get(&at)?;
            Some(
                Evidence::new(at.pid, op.name())
                    .fd(at.fd)
                    .at(*ts)
                    .detail(format!("{} {t}'s fd", resrc.name())),
            )
        })
        .collect();
    if released.is_empty() {
        vec![Evidence::new(emu, "holds").detail(why.to_owned())]
    } else {
        released
    }
}

/// A detach (or update) claim releases what it names: its release is no violation.
pub(super) fn note(l: &mut Ledger, c: &Claim) {
    let ClaimKind::Resource {
        resrc,
        old: Some(old),
        ..
    } = &c.kind
    else {
        return;
    };
    for h in l.resources.held.iter_mut() {
        if h.uuid == c.uuid && h.resrc == *resrc && h.target == *old {
            h.released = true;
        }
    }
}

/// An fd record: a held resource's fd released is looked at again a deadline later.
pub(super) fn on_fd(l: &mut Ledger, r: &FdRecord) {
    let Some(fd) = r.fd else {
        return;
    };
    if !r.op.is_release() || r.op == Op::Exit || l.stopping.contains(&r.pid) {
        return;
    }
    let at = FdRef::new(r.pid, fd);
    let due = r.ts + l.deadline_ns;
    for h in l.resources.held.iter_mut().filter(|h| !h.released) {
        if h.fds.contains(&at) {
            h.pending.get_or_insert(Release {
                at,
                ts: r.ts,
                op: r.op,
                due,
            });
        }
    }
}

/// The releases whose time has come: a violation unless a detach, the stop or the exit
/// explains them, or the emulator holds the resource again (a reopen). Resources of VMs
/// judged gone are forgotten.
pub(super) fn settle(l: &mut Ledger, view: &dyn KernelView, now: u64, out: &mut Vec<Verdict>) {
    let vms = &l.vms;
    l.resources
        .held
        .retain(|h| vms.get(&h.uuid).is_some_and(|v| !v.settled));
    for i in 0..l.resources.held.len() {
        let h = &mut l.resources.held[i];
        let Some(rel) = h.pending.filter(|p| p.due <= now) else {
            continue;
        };
        h.pending = None;
        let h = h.clone();
        let running = l
            .vms
            .get(&h.uuid)
            .is_some_and(|v| v.running && v.pid == Some(h.pid));
        if h.released || !running || l.stopping.contains(&h.pid) || l.log.exited(h.pid, view) {
            continue;
        }
        match locate(view, h.pid, h.resrc, &h.target) {
            Seen::Held(holds) => {
                l.resources.held[i].fds = holds.iter().map(|x| x.at).collect();
            }
            Seen::Unknowable(_) => {}
            Seen::NotHeld(why) => {
                l.resources.held[i].released = true;
                let found = release_found(l, &h, rel, &why);
                out.push(l.seal(h.claim.clone(), found, rel.ts, now));
            }
        }
    }
}

fn release_found(l: &Ledger, h: &HeldRes, rel: Release, why: &str) -> Found {
    let name = l
        .vms
        .get(&h.uuid)
        .map(|v| v.name.clone())
        .unwrap_or_default();
    let what = h.resrc.name();
    Found::violated(
        format!(
            "the emulator (pid {}) of VM {name} released {what} {} (fd {}, {}) with no detach record",
            h.pid, h.target, rel.at.fd, rel.op
        ),
        vec![
            Evidence::new(h.pid, rel.op.name())
                .fd(rel.at.fd)
                .at(rel.ts)
                .detail(format!("{what} {}'s last fd: {why}", h.target)),
        ],
    )
    .on([h.pid])
}

#[cfg(test)]
mod tests;
