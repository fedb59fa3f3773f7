//! Checks before loading anything, each failing with a message a person can act on.

use std::{
    fs,
    path::{Path, PathBuf},
};

use super::ObserveError;
use crate::paths;

/// Capability numbers (linux/capability.h).
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Parses `CapEff:` from /proc/self/status text.
pub fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The capabilities missing from `caps` for loading and attaching the tracker and reading
/// other processes' fd tables.
pub fn missing_caps(caps: u64) -> Vec<&'static str> {
    let has = |c: u32| caps & (1u64 << c) != 0;
    let admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !(admin || has(CAP_BPF)) {
        missing.push("CAP_BPF");
    }
    if !(admin || has(CAP_PERFMON)) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_SYS_PTRACE) {
        missing.push("CAP_SYS_PTRACE");
    }
    missing
}

/// Fails unless this process may load and attach the tracker.
pub fn check_caps() -> Result<(), ObserveError> {
    let status = fs::read_to_string(paths::SELF_STATUS).unwrap_or_default();
    let missing = missing_caps(effective_caps(&status).unwrap_or(0));
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ObserveError::Privileges {
            missing: missing.join(", "),
        })
    }
}

/// The mount points of filesystems of type `fstype` in mountinfo text.
pub fn mounts_of_type(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let ty = right.split(' ').next()?;
            (ty == fstype).then(|| PathBuf::from(unescape_mount(mount_point)))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal `\040` etc.
fn unescape_mount(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Makes sure tracefs is mounted where aya looks for it (`/sys/kernel/tracing`), mounting it
/// when absent. Returns the mount point.
pub fn ensure_tracefs() -> Result<PathBuf, ObserveError> {
    let default = Path::new(paths::TRACEFS_DEFAULT);
    let mountinfo = fs::read_to_string(paths::SELF_MOUNTINFO).unwrap_or_default();
    let mounted = mounts_of_type(&mountinfo, "tracefs");
    if mounted.iter().any(|m| m == default) {
        return Ok(default.to_owned());
    }
    nix::mount::mount(
        Some("nodev"),
        default,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| ObserveError::Tracefs {
        path: default.to_owned(),
        errno,
    })?;
    log::info!("mounted tracefs at {}", default.display());
    Ok(default.to_owned())
}

/// Fails when a sched or clone-entry tracepoint the tracker needs is missing. (Syscalls are followed through
/// the `raw_syscalls` raw tracepoints, which need no tracefs; an absent one fails the attach.)
pub fn check_tracepoints(tracefs: &Path) -> Result<(), ObserveError> {
    let sched = [
        "sched_process_fork",
        "sched_process_exec",
        "sched_process_exit",
    ]
    .map(|n| ("sched".to_owned(), n.to_owned()));
    let clone =
        super::loader::CLONE_SYSCALLS.map(|n| ("syscalls".to_owned(), format!("sys_enter_{n}")));
    for (category, name) in sched.into_iter().chain(clone) {
        if !tracefs.join("events").join(&category).join(&name).exists() {
            return Err(ObserveError::Tracepoint {
                name: format!("{category}/{name}"),
            });
        }
    }
    Ok(())
}

/// How many pid namespaces `pid` has a number in, from the one of `proc_root` down to its own
/// (`NSpid:`): 1 when it is in that namespace itself.
pub fn pid_namespace_depth(proc_root: &Path, pid: u32) -> Option<usize> {
    let status = fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| v.split_whitespace().count())
}

/// The thread-group id of `pid` from /proc/PID/status, or None if no such process.
pub fn tgid_of(proc_root: &Path, pid: u32) -> Option<u32> {
    let status = fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_parse_and_missing() {
        let status = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert_eq!(
            missing_caps(effective_caps(status).unwrap()),
            Vec::<&str>::new()
        );
        assert_eq!(
            missing_caps(0),
            vec!["CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE"]
        );
        // CAP_SYS_ADMIN covers BPF and PERFMON, not PTRACE.
        assert_eq!(missing_caps(1 << CAP_SYS_ADMIN), vec!["CAP_SYS_PTRACE"]);
    }

    #[test]
    fn a_missing_tracepoint_is_named_and_exits_5() {
        let dir = std::env::temp_dir().join(format!("vmaudit-tracefs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for tp in [
            "sched/sched_process_fork",
            "sched/sched_process_exec",
            "syscalls/sys_enter_clone",
        ] {
            fs::create_dir_all(dir.join("events").join(tp)).unwrap();
        }
        let err = check_tracepoints(&dir).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel has no tracepoint sched/sched_process_exit (needs CONFIG_FTRACE_SYSCALLS and tracefs)"
        );
        assert_eq!(err.exit_code(), crate::exit::KERNEL_FEATURE);
        for tp in [
            "sched/sched_process_exit",
            "syscalls/sys_enter_clone3",
            "syscalls/sys_enter_fork",
            "syscalls/sys_enter_vfork",
        ] {
            fs::create_dir_all(dir.join("events").join(tp)).unwrap();
        }
        assert!(check_tracepoints(&dir).is_ok());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mountinfo_finds_tracefs_and_unescapes() {
        let mi = "22 1 0:20 / /sys rw - sysfs sysfs rw\n\
                  40 22 0:12 / /sys/kernel/tracing rw,nosuid - tracefs nodev rw\n\
                  41 22 0:13 / /mnt/with\\040space rw shared:5 - tracefs nodev rw\n";
        assert_eq!(
            mounts_of_type(mi, "tracefs"),
            vec![
                PathBuf::from("/sys/kernel/tracing"),
                PathBuf::from("/mnt/with space")
            ]
        );
        assert!(mounts_of_type(mi, "bpf").is_empty());
    }
}
