//! Where the cgroup hierarchies are mounted, read from /proc/self/mountinfo (never assumed):
//! the cgroup v2 mount (`/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup` on pure v2
//! hosts) and the cgroup v1 `devices` controller, if any.

use std::path::{Path, PathBuf};

use super::CgroupError;
use crate::mountinfo::{self, Mount, MountinfoError};

/// Directory under a hierarchy's root that holds vmaudit's VM cgroups.
pub const VM_PARENT: &str = "vmaudit";

/// The cgroup mounts of this host, as this process sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// The cgroup v2 mount point (fstype `cgroup2`).
    pub v2: Option<PathBuf>,
    /// The cgroup v1 `devices` controller mount point (fstype `cgroup`, `devices` among the
    /// super options).
    pub v1_devices: Option<PathBuf>,
}

impl Layout {
    /// Reads [`crate::paths::SELF_MOUNTINFO`].
    pub fn detect() -> Result<Self, CgroupError> {
        Self::from_file(Path::new(crate::paths::SELF_MOUNTINFO))
    }

    /// Reads a mountinfo file.
    pub fn from_file(path: &Path) -> Result<Self, CgroupError> {
        let mounts = mountinfo::read(path)
            .map_err(|source| CgroupError::Read {
                path: path.to_owned(),
                source,
            })?
            .map_err(|source| CgroupError::Mountinfo {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self::of_mounts(&mounts))
    }

    /// Parses mountinfo text (proc(5)).
    pub fn parse(text: &str) -> Result<Self, MountinfoError> {
        let mounts: Vec<Mount> = mountinfo::parse(text).collect::<Result<_, _>>()?;
        Ok(Self::of_mounts(&mounts))
    }

    /// Where a hierarchy is mounted more than once, the first mount of its root (ROOT `/`)
    /// wins, else its first mount.
    pub fn of_mounts(mounts: &[Mount]) -> Self {
        let mut v2: Option<(bool, &Path)> = None;
        let mut v1: Option<(bool, &Path)> = None;
        for m in mounts {
            let slot = match m.fs_type.as_str() {
                "cgroup2" => &mut v2,
                "cgroup" if m.has_super_option("devices") => &mut v1,
                _ => continue,
            };
            let whole = m.root == "/";
            if slot
                .as_ref()
                .is_none_or(|(was_whole, _)| whole && !was_whole)
            {
                *slot = Some((whole, &m.mount_point));
            }
        }
        Self {
            v2: v2.map(|(_, p)| p.to_owned()),
            v1_devices: v1.map(|(_, p)| p.to_owned()),
        }
    }

    /// `<v2 mount>/vmaudit`: the default parent of VM cgroups on cgroup v2.
    pub fn vm_parent_v2(&self) -> Option<PathBuf> {
        self.v2.as_ref().map(|p| p.join(VM_PARENT))
    }

    /// `<v1 devices mount>/vmaudit`: the default parent of VM cgroups on cgroup v1.
    pub fn vm_parent_v1(&self) -> Option<PathBuf> {
        self.v1_devices.as_ref().map(|p| p.join(VM_PARENT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This project's machines: v1 controllers under /sys/fs/cgroup, v2 at .../unified.
    const HYBRID: &str = "\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// A systemd host in pure v2 mode.
    const PURE_V2: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 30 0:24 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
35 25 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn hybrid_layout() {
        let l = Layout::parse(HYBRID).unwrap();
        assert_eq!(l.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(
            l.v1_devices.as_deref(),
            Some(Path::new("/sys/fs/cgroup/devices"))
        );
        assert_eq!(
            l.vm_parent_v2().as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified/vmaudit"))
        );
        assert_eq!(
            l.vm_parent_v1().as_deref(),
            Some(Path::new("/sys/fs/cgroup/devices/vmaudit"))
        );
    }

    #[test]
    fn pure_v2_layout() {
        let l = Layout::parse(PURE_V2).unwrap();
        assert_eq!(l.v2.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        assert_eq!(l.v1_devices, None);
    }

    #[test]
    fn no_cgroups_at_all() {
        let l = Layout::parse("26 30 0:24 / /proc rw - proc proc rw\n").unwrap();
        assert_eq!(l, Layout::default());
    }

    #[test]
    fn co_mounted_controllers_escapes_and_bind_mounts() {
        let text = "\
50 31 0:40 /machine /srv/bind rw - cgroup2 cgroup2 rw
51 31 0:40 / /sys/fs/cgroup/my\\040v2 rw - cgroup2 cgroup2 rw
52 31 0:41 / /sys/fs/cgroup/devices,cpu rw - cgroup cgroup rw,cpu,devices
53 31 0:42 / /sys/fs/cgroup/named rw - cgroup cgroup rw,name=devices
";
        let l = Layout::parse(text).unwrap();
        assert_eq!(l.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/my v2")));
        assert_eq!(
            l.v1_devices.as_deref(),
            Some(Path::new("/sys/fs/cgroup/devices,cpu"))
        );
        // A named hierarchy called "devices" is not the controller.
        let l = Layout::parse("53 31 0:42 / /x rw - cgroup cgroup rw,name=devices\n").unwrap();
        assert_eq!(l.v1_devices, None);
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert_eq!(
            Layout::parse("1 2 0:1 / /x rw cgroup2 cgroup2 rw\n")
                .unwrap_err()
                .line,
            1
        );
        assert!(Layout::parse("\n1 2 / - cgroup2 c rw\n").is_err());
        assert!(Layout::parse("1 2 0:1 / /x\\04 rw - cgroup2 c rw\n").is_err());
    }

    #[test]
    fn this_hosts_mountinfo_parses() {
        Layout::detect().unwrap();
    }
}
