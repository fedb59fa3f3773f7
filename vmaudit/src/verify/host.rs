//! The host as the ledger sees it ([`KernelView`]): the tracker's fd tables, kcmp, /proc, /sys
//! and the device policies of cgroups (BPF_PROG_QUERY and the program's map on v2,
//! `devices.list` on v1).

use std::{
    ffi::OsStr,
    fs::{File, OpenOptions},
    io::Read as _,
    os::{fd::AsFd as _, unix::fs::OpenOptionsExt as _},
    path::{Component, Path, PathBuf},
};

use ::procfs::{FromReadSI as _, KernelStats, ProcessCGroup, process::Process};
use vmaudit_core::{
    acl::{Acl, DevTypes, DeviceRule},
    fd::{DevNum, ProcTable},
    view::{DevicePolicy, Enforcer, FdRef, FileId, Holder, KernelView, NetFd, ProcessInfo},
};

use crate::{
    cgroup::{
        Layout,
        attached::{RuleMap, device_programs_of},
        v1,
    },
    observe::table::Tables,
    paths::Roots,
    procfs::ProcFs,
};

/// The real host, over the tracker's tables.
pub struct HostView<'a> {
    tables: &'a Tables<ProcFs>,
    layout: &'a Layout,
    roots: Roots,
}

impl<'a> HostView<'a> {
    pub fn new(tables: &'a Tables<ProcFs>, layout: &'a Layout) -> Self {
        Self {
            tables,
            layout,
            roots: Roots::default(),
        }
    }

    /// The cgroup directory a record names, if it is one: under a cgroup mount, with no `..`,
    /// opened as a directory without blocking and without following a link.
    fn open_cgroup(&self, dir: &Path) -> Result<(File, bool), String> {
        let v2 = self.layout.v2.as_deref().filter(|r| dir.starts_with(r));
        let v1 = self
            .layout
            .v1_devices
            .as_deref()
            .filter(|r| dir.starts_with(r));
        if v2.is_none() && v1.is_none() {
            return Err(format!("{} is not under a cgroup mount", dir.display()));
        }
        if dir
            .components()
            .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
        {
            return Err(format!("{} is not a plain path", dir.display()));
        }
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok((f, v2.is_some()))
    }

    fn v2_policy(&self, dir: &File) -> Result<DevicePolicy, String> {
        let ids = device_programs_of(dir.as_fd()).map_err(|e| format!("BPF_PROG_QUERY: {e}"))?;
        let map = ids.iter().find_map(|id| RuleMap::of_program(*id).ok());
        let (rules, map_id) = match &map {
            Some(m) => (m.rules().map_err(|e| e.to_string())?, m.map_id),
            None => (Vec::new(), 0),
        };
        Ok(DevicePolicy {
            default_deny: !ids.is_empty(),
            enforcer: Enforcer::Programs { ids, map_id },
            rules,
        })
    }

    fn v1_policy(&self, dir: &Path) -> Result<DevicePolicy, String> {
        let path = dir.join(v1::DEVICES_LIST);
        let mut text = String::new();
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .and_then(|mut f| f.read_to_string(&mut text))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let rules = v1::parse_list(&text).map_err(|e| e.to_string())?;
        let all = DeviceRule {
            types: DevTypes::All,
            major: None,
            minor: None,
            acl: Acl::RWM,
        };
        Ok(DevicePolicy {
            default_deny: !rules.contains(&all),
            enforcer: Enforcer::DevicesList,
            rules,
        })
    }
}

impl KernelView for HostView<'_> {
    fn table(&self, pid: u32) -> Option<&ProcTable> {
        self.tables.get(pid)
    }

    fn watched(&self) -> Vec<u32> {
        self.tables.pids().collect()
    }

    fn same_file(&self, a: FdRef, b: FdRef) -> Option<bool> {
        crate::kcmp::same_file(a.pid, a.fd, b.pid, b.fd).ok()
    }

    fn iface_of(&self, at: FdRef) -> Option<String> {
        self.tables.resolver().identity(at.pid, at.fd).ok()?.iface
    }

    fn identity(&self, at: FdRef) -> Option<vmaudit_core::fd::FdIdentity> {
        self.tables.resolver().identity(at.pid, at.fd).ok()
    }

    fn iface_address(&self, iface: &str) -> Option<String> {
        // A name from the kernel, but never a path of its own.
        if iface.is_empty() || iface.contains('/') || iface == "." || iface == ".." {
            return None;
        }
        let path = self.roots.sys.join("class/net").join(iface).join("address");
        std::fs::read_to_string(path)
            .ok()
            .map(|a| a.trim().to_owned())
    }

    fn device_policy(&self, dir: &Path) -> Result<DevicePolicy, String> {
        let (f, v2) = self.open_cgroup(dir)?;
        if v2 {
            self.v2_policy(&f)
        } else {
            self.v1_policy(dir)
        }
    }

    fn process(&self, pid: u32) -> Option<ProcessInfo> {
        process_info(&self.roots, pid)
    }

    fn cgroup_of(&self, pid: u32) -> Option<PathBuf> {
        let process = Process::new_with_root(self.roots.pid_dir(pid)).ok()?;
        cgroup_dir(&process.cgroups().ok()?.0, self.layout)
    }

    fn net_fds(&self) -> Vec<NetFd> {
        net_fds(&self.roots)
    }

    fn stat(&self, path: &Path) -> Result<FileId, String> {
        super::files::stat(path)
    }

    fn pty_index(&self, at: FdRef) -> Option<u32> {
        let text = std::fs::read_to_string(self.roots.fdinfo(at.pid, at.fd)).ok()?;
        super::files::tty_index(&text)
    }

    fn unix_sockets_at(&self, path: &Path) -> Vec<u64> {
        let table = std::fs::read_to_string(self.roots.proc.join("net/unix")).unwrap_or_default();
        super::files::unix_sockets_at(&table, path)
    }

    fn holders(&self, files: &[(DevNum, u64)]) -> Vec<Holder> {
        super::files::holders(&self.roots, files)
    }

    fn host_device(&self, bus: &str, address: &str) -> Result<std::path::PathBuf, String> {
        super::files::host_device(&self.roots, bus, address)
    }
}

/// The cgroup directory `/proc/PID/cgroup` names: its v2 one (`0::/path`) under the v2 mount,
/// else its v1 devices one (`N:devices:/path`) under that mount.
fn cgroup_dir(groups: &[ProcessCGroup], layout: &Layout) -> Option<PathBuf> {
    let under = |root: &Option<PathBuf>, rel: &str| {
        root.as_ref().map(|r| r.join(rel.trim_start_matches('/')))
    };
    let v2 = groups.iter().find(|g| g.controllers.is_empty());
    match v2 {
        Some(g) if layout.v2.is_some() => under(&layout.v2, &g.pathname),
        _ => {
            let v1 = groups
                .iter()
                .find(|g| g.controllers.iter().any(|c| c == "devices"))?;
            under(&layout.v1_devices, &v1.pathname)
        }
    }
}

/// A process from /proc: start time, exe, comm, parent.
fn process_info(roots: &Roots, pid: u32) -> Option<ProcessInfo> {
    let process = Process::new_with_root(roots.pid_dir(pid)).ok()?;
    let stat = process.stat().ok()?;
    Some(ProcessInfo {
        start_unix_ns: boot_time_ns(roots)?
            + stat.starttime * 1_000_000_000 / ::procfs::ticks_per_second().max(1),
        exe: process
            .exe()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        comm: stat.comm,
        ppid: u32::try_from(stat.ppid).ok()?,
    })
}

/// The boot time (Unix ns), `btime` of /proc/stat.
fn boot_time_ns(roots: &Roots) -> Option<u64> {
    let stat = KernelStats::from_file(roots.proc.join("stat"), ::procfs::current_system_info());
    Some(stat.ok()?.btime * 1_000_000_000)
}

/// Every tun/tap, vhost-net and macvtap fd of every process. One readlink per fd: the procfs
/// crate's `Process::fd` would add an open and an lstat per fd of every process on the host.
fn net_fds(roots: &Roots) -> Vec<NetFd> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir(&roots.proc) else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let mut comm: Option<String> = None;
        for f in fds.flatten() {
            let Some(fd) = f.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(target) = std::fs::read_link(f.path()) else {
                continue;
            };
            if !is_net_path(target.as_os_str()) {
                continue;
            }
            let comm = comm.get_or_insert_with(|| {
                std::fs::read_to_string(p.path().join("comm"))
                    .map(|c| c.trim().to_owned())
                    .unwrap_or_default()
            });
            out.push(NetFd {
                at: FdRef::new(pid, fd),
                path: target.display().to_string(),
                comm: comm.clone(),
            });
        }
    }
    out
}

fn is_net_path(p: &OsStr) -> bool {
    let p = p.to_string_lossy();
    p == "/dev/net/tun" || p == "/dev/vhost-net" || p.starts_with("/dev/tap")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_cgroup_is_read_under_its_mount() {
        use ::procfs::{FromBufRead as _, ProcessCGroups};
        let layout = Layout {
            v2: Some(PathBuf::from("/sys/fs/cgroup/unified")),
            v1_devices: Some(PathBuf::from("/sys/fs/cgroup/devices")),
        };
        let text = "12:devices:/machine/a\n0::/machine/qemu-1-vm.libvirt-qemu/emulator\n";
        let text = &ProcessCGroups::from_buf_read(text.as_bytes()).unwrap().0;
        assert_eq!(
            cgroup_dir(text, &layout),
            Some(PathBuf::from(
                "/sys/fs/cgroup/unified/machine/qemu-1-vm.libvirt-qemu/emulator"
            ))
        );
        let v1_only = Layout { v2: None, ..layout };
        assert_eq!(
            cgroup_dir(text, &v1_only),
            Some(PathBuf::from("/sys/fs/cgroup/devices/machine/a"))
        );
        assert_eq!(cgroup_dir(&[], &v1_only), None);
    }

    #[test]
    fn this_process_is_read_from_proc() {
        let me = process_info(&Roots::default(), std::process::id()).unwrap();
        assert!(me.start_unix_ns > 1_600_000_000_000_000_000);
        assert!(me.start_unix_ns <= vmaudit_core::time::unix_now_ns() + 1_000_000_000);
        assert!(!me.exe.is_empty() && !me.comm.is_empty());
        assert_eq!(me.ppid, std::os::unix::process::parent_id());
        assert!(process_info(&Roots::default(), u32::MAX).is_none());
    }

    #[test]
    fn record_paths_outside_the_cgroup_mounts_are_refused() {
        let layout = Layout {
            v2: Some(PathBuf::from("/sys/fs/cgroup/unified")),
            v1_devices: None,
        };
        let tables = Tables::new(ProcFs::default());
        let view = HostView::new(&tables, &layout);
        for bad in [
            "/tmp/fifo",
            "/sys/fs/cgroup/unified/../../../tmp",
            "/sys/fs/cgroup/unifiedx/a",
            "relative",
        ] {
            let e = view.device_policy(Path::new(bad)).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        assert!(view.iface_address("../../etc").is_none());
    }
}
