//! What the fd events of the watched processes told the ledger: the managers' opens of network
//! devices and their failed opens, the life of every network-device fd in other watched
//! processes (the emulators and anything they fork), the last gain and release of each fd,
//! forks and exits.

use std::collections::{HashMap, HashSet};

use crate::{
    fd::{DevNum, FdIdentity, FdRecord, FileKind, Op, is_net_device},
    verdict::Evidence,
    view::{FdRef, KernelView},
};

/// A manager's open of a network device.
#[derive(Clone, Debug)]
pub struct MgrOpen {
    pub at: FdRef,
    pub ts: u64,
    pub path: String,
    pub rdev: Option<DevNum>,
    /// The kernel's id of the open file description (see [`FdIdentity::ofd`]), when known.
    pub ofd: Option<u64>,
    /// The id of the open claim it was found for.
    pub named: Option<u64>,
    /// Its release (time and how): this open's, not a later one of the same number.
    pub released: Option<(u64, Op)>,
}

impl MgrOpen {
    pub fn evidence(&self) -> Evidence {
        Evidence::new(self.at.pid, "open")
            .fd(self.at.fd)
            .at(self.ts)
            .path(self.path.clone())
            .rdev(self.rdev)
    }
}

/// A failed open by a manager.
#[derive(Clone, Debug)]
pub struct FailedOpen {
    pub pid: u32,
    pub path: String,
    pub errno: String,
    pub ts: u64,
}

/// A network-device fd of a watched process that is not a manager, from its arrival to its
/// release. The interface and its address are read when it arrives: a non-persistent tap
/// vanishes with its last fd, so they could not be read after.
#[derive(Clone, Debug)]
pub struct NetFdLife {
    pub at: FdRef,
    pub since: u64,
    pub via: Op,
    pub path: String,
    pub rdev: Option<DevNum>,
    pub iface: Option<String>,
    pub address: Option<String>,
    pub released: Option<(u64, Op)>,
}

impl NetFdLife {
    /// The arrival (or, once released, the release) as evidence.
    pub fn evidence(&self) -> Evidence {
        let (what, ts) = match self.released {
            Some((ts, op)) => (op, ts),
            None => (Op::Seed, self.since),
        };
        let what = if self.released.is_some() {
            what.name()
        } else {
            "holds"
        };
        let mut e = Evidence::new(self.at.pid, what)
            .fd(self.at.fd)
            .at(ts)
            .path(self.path.clone())
            .rdev(self.rdev);
        if let Some(i) = &self.iface {
            e = e.detail(format!("interface {i}, arrived via {}", self.via));
        }
        e
    }
}

/// What one fd record changed, for the findings to look at.
pub enum Change {
    /// A process that is not a manager gained a device fd.
    DeviceGained(FdRef, Op, FdIdentity),
    /// A watched process released an fd.
    Released(FdRef, Op),
    /// A watched process sent an fd over SCM_RIGHTS.
    Sent(FdRef),
    Nothing,
}

#[derive(Clone, Debug, Default)]
pub struct KernelLog {
    pub opens: Vec<MgrOpen>,
    pub failed: Vec<FailedOpen>,
    pub net: Vec<NetFdLife>,
    /// The last release of each fd: time and how.
    pub releases: HashMap<FdRef, (u64, Op)>,
    /// The last arrival of each fd: time and how.
    pub gains: HashMap<FdRef, (u64, Op)>,
    pub forks: HashMap<u32, u64>,
    pub exits: HashMap<u32, u64>,
}

impl KernelLog {
    /// Applies one record (in kernel order) and says what changed.
    pub fn apply(
        &mut self,
        r: &FdRecord,
        managers: &HashSet<u32>,
        view: &dyn KernelView,
    ) -> Change {
        let Some(fd) = r.fd else {
            self.failed_open(r, managers);
            return Change::Nothing;
        };
        let at = FdRef::new(r.pid, fd);
        match r.op {
            op if op.is_release() => self.released(at, r),
            Op::SendFd => Change::Sent(at),
            Op::CloexecOn | Op::CloexecOff => Change::Nothing,
            op => self.gained(at, op, r, managers, view),
        }
    }

    fn failed_open(&mut self, r: &FdRecord, managers: &HashSet<u32>) {
        if r.op == Op::Open && !r.result.is_ok() && managers.contains(&r.pid) {
            self.failed.push(FailedOpen {
                pid: r.pid,
                path: r
                    .file
                    .as_ref()
                    .map(|f| f.path.to_string())
                    .unwrap_or_default(),
                errno: r.result.to_string(),
                ts: r.ts,
            });
        }
    }

    fn released(&mut self, at: FdRef, r: &FdRecord) -> Change {
        self.releases.insert(at, (r.ts, r.op));
        if let Some(o) = self
            .opens
            .iter_mut()
            .rev()
            .find(|o| o.at == at && o.released.is_none())
        {
            o.released = Some((r.ts, r.op));
        }
        if r.op == Op::Exit {
            self.exits.entry(at.pid).or_insert(r.ts);
        }
        if let Some(n) = self
            .net
            .iter_mut()
            .rev()
            .find(|n| n.at == at && n.released.is_none())
        {
            n.released = Some((r.ts, r.op));
        }
        Change::Released(at, r.op)
    }

    fn gained(
        &mut self,
        at: FdRef,
        op: Op,
        r: &FdRecord,
        managers: &HashSet<u32>,
        view: &dyn KernelView,
    ) -> Change {
        self.gains.insert(at, (r.ts, op));
        if op == Op::Inherit {
            self.forks.entry(at.pid).or_insert(r.ts);
        }
        let Some(file) = r.file.as_ref() else {
            return Change::Nothing;
        };
        let net = is_net_device(&file.path, file.rdev);
        if managers.contains(&at.pid) {
            if net && op == Op::Open {
                self.opens.push(MgrOpen {
                    at,
                    ts: r.ts,
                    path: file.path.to_string(),
                    rdev: file.rdev,
                    ofd: file.ofd,
                    named: None,
                    released: None,
                });
            }
            return Change::Nothing;
        }
        if net {
            // The process's own fd, read now, before an identity copied from its parent at
            // fork (the parent's number may have moved on to another file by the time the
            // tracker named it).
            let iface = view.iface_of(at).or_else(|| file.iface.clone());
            let address = iface.as_deref().and_then(|i| view.iface_address(i));
            self.net.push(NetFdLife {
                at,
                since: r.ts,
                via: op,
                path: file.path.to_string(),
                rdev: file.rdev,
                iface,
                address,
                released: None,
            });
        }
        if matches!(file.kind, FileKind::Char | FileKind::Block) {
            return Change::DeviceGained(at, op, file.clone());
        }
        Change::Nothing
    }

    /// Whether `pid` exited (an exit event, or its table says so).
    pub fn exited(&self, pid: u32, view: &dyn KernelView) -> bool {
        self.exits.contains_key(&pid) || view.table(pid).is_some_and(|t| t.exited)
    }

    /// The network-device fds `pid` held at or after `since` (held now, or released since).
    pub fn net_fds_of(&self, pid: u32, since: u64) -> impl Iterator<Item = &NetFdLife> {
        self.net
            .iter()
            .filter(move |n| n.at.pid == pid && n.released.is_none_or(|(ts, _)| ts >= since))
    }

    /// Forgets the network fds released before `before`.
    pub fn prune_released(&mut self, before: u64) {
        self.net
            .retain(|n| n.released.is_none_or(|(ts, _)| ts >= before));
    }

    /// Forgets what is about processes in `pids` (a VM's processes, once it is judged gone).
    pub fn forget(&mut self, pids: &[u32]) {
        self.net.retain(|n| !pids.contains(&n.at.pid));
        self.releases.retain(|k, _| !pids.contains(&k.pid));
        self.gains.retain(|k, _| !pids.contains(&k.pid));
        self.forks.retain(|p, _| !pids.contains(p));
    }
}
