//! The one seam between judging and the host: every read of the kernel or of the host that the
//! ledger needs. The real implementation reads the tracker's tables, kcmp, /proc, /sys and BPF
//! maps; [`FakeKernel`] answers from what a test set up, so every rule has a unit test without
//! root.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use crate::{
    acl::DeviceRule,
    fd::{DevNum, FdEntry, FdIdentity, FileKind, ProcTable},
};

/// An fd in a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FdRef {
    pub pid: u32,
    pub fd: i32,
}

impl FdRef {
    pub const fn new(pid: u32, fd: i32) -> Self {
        Self { pid, fd }
    }
}

/// What enforces a cgroup's device ACL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enforcer {
    /// cgroup v2: the device programs attached to the directory (ids), the first of which with
    /// a rule map (libvirt's layout) gave `rules`.
    Programs { ids: Vec<u32>, map_id: u32 },
    /// cgroup v1: the `devices` controller (`devices.list`).
    DevicesList,
}

/// A cgroup's device policy as the kernel holds it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePolicy {
    pub enforcer: Enforcer,
    /// What it allows (the map's entries, or `devices.list`'s lines), sorted.
    pub rules: Vec<DeviceRule>,
    /// Whatever no rule allows is denied (a program is attached; `a *:* rwm` is not listed).
    pub default_deny: bool,
}

/// A process as the host shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    /// When it started (Unix ns).
    pub start_unix_ns: u64,
    pub exe: String,
    pub comm: String,
    pub ppid: u32,
}

/// An fd on a network device (tun/tap, vhost-net, macvtap) held by some process on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetFd {
    pub at: FdRef,
    pub path: String,
    pub comm: String,
}

/// What a path names, as stat(2) says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    pub kind: FileKind,
    /// The filesystem's device and the inode: the file itself.
    pub dev: DevNum,
    pub ino: u64,
    /// A device node's device number.
    pub rdev: Option<DevNum>,
}

/// An fd on the host holding a file given by its device and inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub at: FdRef,
    pub file: (DevNum, u64),
    pub comm: String,
}

/// Every read of the kernel or host the ledger needs.
pub trait KernelView {
    /// A watched process's fd table, exact as the tracker keeps it; None when not watched.
    fn table(&self, pid: u32) -> Option<&ProcTable>;
    /// Every watched process.
    fn watched(&self) -> Vec<u32>;
    /// Whether two fds are the same open file description (kcmp); None when either is gone.
    fn same_file(&self, a: FdRef, b: FdRef) -> Option<bool>;
    /// The network interface of a tun/tap or macvtap fd, read now (a tap names its interface
    /// only after TUNSETIFF, so an identity taken at arrival may lack it).
    fn iface_of(&self, at: FdRef) -> Option<String>;
    /// What an fd is, read now (the tracker may know only a received fd's number when its
    /// sender closed its copy first).
    fn identity(&self, at: FdRef) -> Option<FdIdentity>;
    /// An interface's MAC address.
    fn iface_address(&self, iface: &str) -> Option<String>;
    /// The device policy of a cgroup directory. The path comes from a record: the real view
    /// refuses any path outside the cgroup mounts, and never blocks on it.
    fn device_policy(&self, cgroup: &Path) -> Result<DevicePolicy, String>;
    /// A process, or None when there is none with that pid.
    fn process(&self, pid: u32) -> Option<ProcessInfo>;
    /// The cgroup directory a process is in (the v2 one, else the v1 devices one), as a path
    /// under the cgroup mount.
    fn cgroup_of(&self, pid: u32) -> Option<PathBuf>;
    /// Every network-device fd held by any process on the host (to find copies of an
    /// emulator's fds, however they were taken).
    fn net_fds(&self) -> Vec<NetFd>;
    /// What `path` names now, following links. The path comes from a record: the real view
    /// never opens it (a FIFO or a device would block or act), never triggers an automount,
    /// and says why it cannot tell.
    fn stat(&self, path: &Path) -> Result<FileId, String>;
    /// The pty a `/dev/ptmx` fd is the master of (`tty-index` in fdinfo).
    fn pty_index(&self, at: FdRef) -> Option<u32>;
    /// The inodes of the unix sockets bound to `path` (in vmaudit's network namespace).
    fn unix_sockets_at(&self, path: &Path) -> Vec<u64>;
    /// Every fd on the host whose file is one of `files` (device, inode).
    fn holders(&self, files: &[(DevNum, u64)]) -> Vec<Holder>;
    /// The device node the emulator opens for host device `address` on `bus`: `pci` and
    /// `mdev`, its IOMMU group's `/dev/vfio/N`; `usb` (`BBB.DDD`), `/dev/bus/usb/BBB/DDD`;
    /// `scsi` (`scsi_hostH:B:T:U`), its `/dev/sgN`.
    fn host_device(&self, bus: &str, address: &str) -> Result<PathBuf, String>;
}

/// A stand-in host for unit tests: tables, same-file pairs, interfaces, policies and processes
/// as set up.
#[derive(Clone, Debug, Default)]
pub struct FakeKernel {
    pub tables: HashMap<u32, ProcTable>,
    /// Pairs that are the same open file description (either order).
    pub same: Vec<(FdRef, FdRef)>,
    pub ifaces: HashMap<FdRef, String>,
    pub addresses: HashMap<String, String>,
    pub policies: HashMap<PathBuf, DevicePolicy>,
    pub processes: HashMap<u32, ProcessInfo>,
    pub cgroups: HashMap<u32, PathBuf>,
    pub net: Vec<NetFd>,
    pub files: HashMap<PathBuf, FileId>,
    pub ptys: HashMap<FdRef, u32>,
    pub sockets: HashMap<PathBuf, Vec<u64>>,
    /// Fds of processes the tables do not hold, with their file (device, inode).
    pub others: Vec<Holder>,
    pub host_devices: HashMap<(String, String), PathBuf>,
    /// What [`KernelView::identity`] reads now, where it differs from the table's.
    pub fresh: HashMap<FdRef, FdIdentity>,
}

impl FakeKernel {
    /// Puts `entry` in `pid`'s table (making the table).
    pub fn hold(&mut self, pid: u32, entry: FdEntry) {
        self.tables
            .entry(pid)
            .or_default()
            .fds
            .insert(entry.fd, Box::new(entry));
    }

    /// Takes `fd` out of `pid`'s table.
    pub fn drop_fd(&mut self, pid: u32, fd: i32) {
        if let Some(t) = self.tables.get_mut(&pid) {
            t.fds.remove(&fd);
        }
    }

    /// Marks `pid` exited (its table empty).
    pub fn exit(&mut self, pid: u32) {
        let t = self.tables.entry(pid).or_default();
        t.fds = BTreeMap::new();
        t.exited = true;
        self.processes.remove(&pid);
    }
}

impl KernelView for FakeKernel {
    fn table(&self, pid: u32) -> Option<&ProcTable> {
        self.tables.get(&pid)
    }

    fn watched(&self) -> Vec<u32> {
        self.tables.keys().copied().collect()
    }

    fn same_file(&self, a: FdRef, b: FdRef) -> Option<bool> {
        let held = |r: FdRef| {
            self.tables
                .get(&r.pid)
                .is_some_and(|t| t.fds.contains_key(&r.fd))
                || self.net.iter().any(|n| n.at == r)
        };
        if !(held(a) && held(b)) {
            return None;
        }
        Some(a == b || self.same.contains(&(a, b)) || self.same.contains(&(b, a)))
    }

    fn iface_of(&self, at: FdRef) -> Option<String> {
        self.ifaces.get(&at).cloned()
    }

    fn identity(&self, at: FdRef) -> Option<FdIdentity> {
        self.fresh.get(&at).cloned().or_else(|| {
            let t = self.tables.get(&at.pid)?;
            t.fds.get(&at.fd).map(|e| e.id.clone())
        })
    }

    fn iface_address(&self, iface: &str) -> Option<String> {
        self.addresses.get(iface).cloned()
    }

    fn device_policy(&self, cgroup: &Path) -> Result<DevicePolicy, String> {
        self.policies
            .get(cgroup)
            .cloned()
            .ok_or_else(|| format!("{}: no such cgroup", cgroup.display()))
    }

    fn process(&self, pid: u32) -> Option<ProcessInfo> {
        self.processes.get(&pid).cloned()
    }

    fn cgroup_of(&self, pid: u32) -> Option<PathBuf> {
        self.cgroups.get(&pid).cloned()
    }

    fn net_fds(&self) -> Vec<NetFd> {
        self.net.clone()
    }

    fn stat(&self, path: &Path) -> Result<FileId, String> {
        self.files
            .get(path)
            .copied()
            .ok_or_else(|| format!("{}: no such file", path.display()))
    }

    fn pty_index(&self, at: FdRef) -> Option<u32> {
        self.ptys.get(&at).copied()
    }

    fn unix_sockets_at(&self, path: &Path) -> Vec<u64> {
        self.sockets.get(path).cloned().unwrap_or_default()
    }

    fn holders(&self, files: &[(DevNum, u64)]) -> Vec<Holder> {
        let in_tables = self.tables.iter().flat_map(|(pid, t)| {
            t.fds.values().filter_map(move |e| {
                Some(Holder {
                    at: FdRef::new(*pid, e.fd),
                    file: (e.id.dev?, e.id.ino?),
                    comm: String::new(),
                })
            })
        });
        in_tables
            .chain(self.others.iter().cloned())
            .filter(|h| files.contains(&h.file))
            .collect()
    }

    fn host_device(&self, bus: &str, address: &str) -> Result<PathBuf, String> {
        self.host_devices
            .get(&(bus.to_owned(), address.to_owned()))
            .cloned()
            .ok_or_else(|| format!("no {bus} device {address}"))
    }
}
