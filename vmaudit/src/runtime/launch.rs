//! Launching the emulator: inside the VM's cgroup, as an unprivileged user, with the device
//! fds and nothing else.
//!
//! Between fork and exec the child joins the cgroup (as root: writing `cgroup.procs` needs
//! it), takes the configured user's groups and gid, drops every capability from its bounding
//! set, takes the uid (which clears its permitted, effective and ambient sets), sets
//! `no_new_privs` (no setuid or file-capability binary can give anything back), asks for
//! SIGKILL when vmaudit dies, and closes every fd but stdin/stdout/stderr and the claimed ones.
//! Its environment is `PATH` alone; its working directory `/`. Once it runs it cannot leave
//! the cgroup: moving a process needs write access to the target's `cgroup.procs` (root's).

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, RawFd},
    path::{Path, PathBuf},
    process::Stdio,
};

use super::{
    identity::Identity,
    spec::{Accel, Spec},
};

/// The emulator's whole environment.
pub const EMULATOR_PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why the emulator could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("starting {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the capability count")]
    CapLast(#[source] io::Error),
}

/// qemu's default command line: a paused `pc` machine with no guest, QMP on the listening
/// socket `qmp_fd` (vmaudit's, handed over).
pub fn default_args(spec: &Spec, qmp_fd: RawFd) -> Vec<String> {
    let e = &spec.emulator;
    vec![
        "-name".into(),
        format!("guest={},debug-threads=on", spec.name),
        "-uuid".into(),
        spec.uuid.to_string(),
        "-accel".into(),
        match e.accel {
            Accel::Tcg => "tcg".into(),
            Accel::Kvm => "kvm".into(),
        },
        "-M".into(),
        e.machine.clone(),
        "-m".into(),
        e.memory_mib.to_string(),
        "-nodefaults".into(),
        "-nographic".into(),
        "-display".into(),
        "none".into(),
        "-S".into(),
        "-chardev".into(),
        format!("socket,id=vmaudit-qmp,fd={qmp_fd},server=on,wait=off"),
        "-mon".into(),
        "chardev=vmaudit-qmp,mode=control".into(),
    ]
}

/// How the emulator is started.
pub struct Launch<'a> {
    pub program: &'a Path,
    pub args: &'a [String],
    /// The VM cgroup's `cgroup.procs`, open for writing.
    pub cgroup_procs: BorrowedFd<'a>,
    /// The fds it gets, at the same numbers.
    pub keep: &'a [RawFd],
    pub identity: &'a Identity,
}

/// What the child does between fork and exec, prepared before the fork (no allocation after).
struct ChildSetup {
    cgroup_procs: RawFd,
    keep: Vec<RawFd>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    /// The highest capability number this kernel knows.
    cap_last: libc::c_ulong,
    parent: libc::pid_t,
}

/// The error of the last failed libc call, for the `?` of a pre_exec step.
fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl ChildSetup {
    /// Runs in the forked child; every step is a plain syscall (async-signal-safe).
    fn run(&self) -> io::Result<()> {
        // "0" moves the writing process itself.
        // SAFETY: writes two bytes of a static buffer to an fd the parent keeps open.
        if unsafe { libc::write(self.cgroup_procs, b"0\n".as_ptr().cast(), 2) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the group list was prepared before the fork and outlives the call.
        check(unsafe { libc::setgroups(self.groups.len(), self.groups.as_ptr()) })?;
        // SAFETY: plain id arguments.
        check(unsafe { libc::setresgid(self.gid, self.gid, self.gid) })?;
        for cap in 0..=self.cap_last {
            // SAFETY: prctl with integer arguments.
            check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) })?;
        }
        // SAFETY: prctl with integer arguments.
        check(unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        })?;
        // Leaving uid 0 for good clears the permitted, effective and ambient capabilities.
        // SAFETY: plain id arguments.
        check(unsafe { libc::setresuid(self.uid, self.uid, self.uid) })?;
        // SAFETY: prctl with integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
        // After the uid change, which clears it: the emulator dies with vmaudit, whatever
        // kills vmaudit (no clean-up could run then, and a VM nobody audits must not live on).
        // SAFETY: prctl with integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) })?;
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != self.parent {
            return Err(io::Error::other("vmaudit died before the emulator started"));
        }
        // SAFETY: umask only sets the mask.
        unsafe { libc::umask(0o077) };
        // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        for &fd in &self.keep {
            // SAFETY: fcntl on an fd number; clears FD_CLOEXEC so the emulator inherits it.
            check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) })?;
        }
        Ok(())
    }
}

fn cap_last() -> Result<libc::c_ulong, LaunchError> {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .map_err(LaunchError::CapLast)?
        .trim()
        .parse()
        .map_err(|e| LaunchError::CapLast(io::Error::new(io::ErrorKind::InvalidData, e)))
}

/// Starts the emulator: `program args`, in the cgroup, as the unprivileged identity, holding
/// exactly `keep` (same numbers as here) besides stdin (null), stdout and stderr (vmaudit's
/// stderr, so its complaints are seen).
pub fn spawn(l: Launch<'_>) -> Result<tokio::process::Child, LaunchError> {
    let setup = ChildSetup {
        cgroup_procs: l.cgroup_procs.as_raw_fd(),
        keep: l.keep.to_vec(),
        uid: l.identity.uid,
        gid: l.identity.gid,
        groups: l.identity.groups.clone(),
        cap_last: cap_last()?,
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
    };
    // The emulator's stdout goes to vmaudit's stderr: vmaudit's stdout is for its own data.
    let out = {
        use std::os::fd::AsFd as _;
        io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_or_else(|_| Stdio::null(), Stdio::from)
    };
    let mut cmd = tokio::process::Command::new(l.program);
    cmd.args(l.args)
        .env_clear()
        .env("PATH", EMULATOR_PATH_ENV)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    // SAFETY: the closure only makes async-signal-safe syscalls on data prepared before the
    // fork, as pre_exec requires.
    unsafe {
        cmd.pre_exec(move || setup.run());
    }
    cmd.spawn().map_err(|source| LaunchError::Spawn {
        program: l.program.to_owned(),
        source,
    })
}
