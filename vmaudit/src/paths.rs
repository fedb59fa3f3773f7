//! Every filesystem location vmaudit reads or writes, in one place.

use std::path::PathBuf;

/// Where /proc and /sys are; tests point these at fixtures.
#[derive(Clone, Debug)]
pub struct Roots {
    pub proc: PathBuf,
    pub sys: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Self {
            proc: PathBuf::from("/proc"),
            sys: PathBuf::from("/sys"),
        }
    }
}

impl Roots {
    pub fn pid_dir(&self, pid: u32) -> PathBuf {
        self.proc.join(pid.to_string())
    }
    pub fn fd_dir(&self, pid: u32) -> PathBuf {
        self.pid_dir(pid).join("fd")
    }
    pub fn fd_link(&self, pid: u32, fd: i32) -> PathBuf {
        self.fd_dir(pid).join(fd.to_string())
    }
    pub fn fdinfo(&self, pid: u32, fd: i32) -> PathBuf {
        self.pid_dir(pid).join("fdinfo").join(fd.to_string())
    }
    /// `/sys/dev/char/MAJ:MIN`: a link into the device's sysfs directory.
    pub fn sys_dev_char(&self, major: u32, minor: u32) -> PathBuf {
        self.sys
            .join("dev")
            .join("char")
            .join(format!("{major}:{minor}"))
    }
}

/// The mount information of this process, to find tracefs and the cgroup layout.
pub const SELF_MOUNTINFO: &str = "/proc/self/mountinfo";
/// Where vmaudit mounts tracefs when it is not mounted anywhere.
pub const TRACEFS_DEFAULT: &str = "/sys/kernel/tracing";

/// The running kernel's type information (struct layouts for the fd tracker's offsets).
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";
/// The per-boot secret key of open-file-description ids (tmpfs: gone at reboot), mode 0600.
pub const OFD_KEY: &str = "/run/vmaudit/ofd-key";
/// Where vmaudit mounts bpffs when it is not mounted anywhere.
pub const BPFFS_DEFAULT: &str = "/sys/fs/bpf";
/// vmaudit's directory in bpffs: `<bpffs>/vmaudit/<name>/devcg-link` pins a VM's device program.
pub const BPFFS_DIR: &str = "vmaudit";

/// Per-VM runtime state of `vmaudit run` (QMP socket, pid file): `/run/vmaudit/<name>`.
pub const RUN_DIR: &str = "/run/vmaudit";
/// Default journal of `vmaudit run`: `/var/log/vmaudit/<name>.jsonl`.
pub const JOURNAL_DIR: &str = "/var/log/vmaudit";

/// The run directory of VM `name`.
pub fn vm_run_dir(name: &str) -> PathBuf {
    PathBuf::from(RUN_DIR).join(name)
}

/// The default journal of `vmaudit monitor`.
pub const MONITOR_JOURNAL: &str = "/var/log/vmaudit/monitor.jsonl";

/// The default journal of VM `name`.
pub fn default_journal(name: &str) -> PathBuf {
    PathBuf::from(JOURNAL_DIR).join(format!("{name}.jsonl"))
}
