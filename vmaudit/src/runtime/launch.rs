//! Launching the emulator: inside the VM's cgroup, with the device fds and nothing else.

use std::{
    ffi::CString,
    io,
    os::{fd::RawFd, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
    process::Stdio,
};

use super::spec::{Accel, Spec};

/// Why the emulator could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("starting {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// qemu's default command line: a paused `pc` machine with no guest, QMP on `qmp`.
pub fn default_args(spec: &Spec, qmp: &Path) -> Vec<String> {
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
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ]
}

/// What the child does between fork and exec, prepared before the fork (no allocation after).
struct ChildSetup {
    cgroup_procs: Option<CString>,
    keep: Vec<RawFd>,
}

impl ChildSetup {
    /// Runs in the forked child: join the cgroup, then mark every fd close-on-exec except the
    /// ones handed to the emulator.
    fn run(&self) -> io::Result<()> {
        // The emulator goes with vmaudit, even if vmaudit is killed (no clean-up could run
        // then, and a VM nobody audits must not live on).
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(procs) = &self.cgroup_procs {
            // SAFETY: a NUL-terminated path prepared before the fork; open/write/close are
            // async-signal-safe.
            unsafe {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let r = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                libc::close(fd);
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
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
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Starts the emulator: `program args`, in the cgroup whose `cgroup.procs` is given, holding
/// exactly `keep` (same numbers as here) besides stdin (null), stdout and stderr (vmaudit's
/// stderr, so its complaints are seen).
pub fn spawn(
    program: &Path,
    args: &[String],
    cgroup_procs: Option<&Path>,
    keep: &[RawFd],
) -> Result<tokio::process::Child, LaunchError> {
    let setup = ChildSetup {
        cgroup_procs: cgroup_procs.and_then(|p| CString::new(p.as_os_str().as_bytes()).ok()),
        keep: keep.to_vec(),
    };
    // The emulator's stdout goes to vmaudit's stderr: vmaudit's stdout is for its own data.
    let out = {
        use std::os::fd::AsFd as _;
        io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_or_else(|_| Stdio::null(), Stdio::from)
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
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
        program: program.to_owned(),
        source,
    })
}
