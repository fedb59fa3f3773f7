//! Checks before loading anything, each failing with a message a person can act on.

use std::path::{Path, PathBuf};

use ::procfs::process::{Process, Status};

use super::ObserveError;
use crate::{mountinfo, paths};

/// Capability numbers (linux/capability.h).
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// This process's effective capabilities (`CapEff:` of /proc/self/status); none if unreadable.
fn effective_caps() -> u64 {
    Process::myself()
        .and_then(|p| p.status())
        .map_or(0, |s| s.capeff)
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
    let missing = missing_caps(effective_caps());
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ObserveError::Privileges {
            missing: missing.join(", "),
        })
    }
}

/// Makes sure tracefs is mounted where aya looks for it (`/sys/kernel/tracing`), mounting it
/// when absent. Returns the mount point.
pub fn ensure_tracefs() -> Result<PathBuf, ObserveError> {
    let default = Path::new(paths::TRACEFS_DEFAULT);
    // Unreadable, mountinfo shows no tracefs, and the mount below makes one.
    let mounts = mountinfo::read_lenient(Path::new(paths::SELF_MOUNTINFO)).unwrap_or_default();
    if mountinfo::mount_points(&mounts, "tracefs").any(|m| m == default) {
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

/// Fails when a sched tracepoint the tracker needs is missing. (Syscalls are followed through the
/// `raw_syscalls` raw tracepoint, which needs no tracefs; an absent one fails the attach.)
pub fn check_tracepoints(tracefs: &Path) -> Result<(), ObserveError> {
    for name in [
        "sched_process_fork",
        "sched_process_exec",
        "sched_process_exit",
    ] {
        if !tracefs.join("events/sched").join(name).exists() {
            return Err(ObserveError::Tracepoint {
                name: format!("sched/{name}"),
            });
        }
    }
    Ok(())
}

/// `/proc/PID/status` of `pid` under `proc_root`, or None if no such process.
fn status_of(proc_root: &Path, pid: u32) -> Option<Status> {
    Process::new_with_root(proc_root.join(pid.to_string()))
        .and_then(|p| p.status())
        .ok()
}

/// How many pid namespaces `pid` has a number in, from the one of `proc_root` down to its own
/// (`NSpid:`): 1 when it is in that namespace itself.
pub fn pid_namespace_depth(proc_root: &Path, pid: u32) -> Option<usize> {
    status_of(proc_root, pid)?.nspid.map(|ns| ns.len())
}

/// The thread-group id of `pid` from /proc/PID/status, or None if no such process.
pub fn tgid_of(proc_root: &Path, pid: u32) -> Option<u32> {
    u32::try_from(status_of(proc_root, pid)?.tgid).ok()
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn missing_caps_are_named() {
        assert_eq!(missing_caps(0x1ff_ffff_ffff), Vec::<&str>::new());
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
        for tp in ["sched/sched_process_fork", "sched/sched_process_exec"] {
            fs::create_dir_all(dir.join("events").join(tp)).unwrap();
        }
        let err = check_tracepoints(&dir).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel has no tracepoint sched/sched_process_exit (needs CONFIG_FTRACE_SYSCALLS and tracefs)"
        );
        assert_eq!(err.exit_code(), crate::exit::KERNEL_FEATURE);
        fs::create_dir_all(dir.join("events/sched/sched_process_exit")).unwrap();
        assert!(check_tracepoints(&dir).is_ok());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn this_process_and_its_thread_are_read_from_proc() {
        let root = Path::new("/proc");
        let me = std::process::id();
        assert_eq!(tgid_of(root, me), Some(me));
        assert!(pid_namespace_depth(root, me).is_some_and(|d| d >= 1));
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
            done_rx.recv().unwrap();
        });
        let tid = u32::try_from(tid_rx.recv().unwrap()).unwrap();
        assert_ne!(tid, me);
        assert_eq!(tgid_of(root, tid), Some(me));
        done_tx.send(()).unwrap();
        thread.join().unwrap();
        assert_eq!(tgid_of(root, u32::MAX), None);
        assert_eq!(pid_namespace_depth(root, u32::MAX), None);
    }
}
