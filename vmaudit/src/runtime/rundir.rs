//! The run directory `/run/vmaudit/<name>` (mode 0700: the control and QMP sockets, and
//! `state.json`), the lock that makes one run of a VM at a time, and the state a run keeps
//! there so that the run after it can find what it left if it dies.
//!
//! The lock is an exclusive `flock` on `/run/vmaudit/.lock/<name>`, held for the whole run:
//! the kernel releases it when the holder dies, however it dies, so a stale lock cannot block
//! a restart and a reused pid cannot pass for a live run. Of two simultaneous starts exactly
//! one gets it; the other fails at once, naming the holder, and touches nothing. The directory
//! itself is made under a temporary name with its state inside and renamed into place, so it
//! never exists without its state.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{
        DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
    },
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::paths;

/// The state file in the run directory.
pub const STATE: &str = "state.json";

/// Why the run directory or its lock could not be had.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("VM {name} is already running under vmaudit (pid {owner})")]
    Running { name: String, owner: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RunDirError + '_ {
    move |source| RunDirError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A process, told apart from a later one with the same pid by its start time (clock ticks
/// after boot, `/proc/PID/stat` field 22).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: u32,
    pub start: u64,
}

impl ProcessId {
    /// This process.
    pub fn me() -> io::Result<Self> {
        Self::of(std::process::id())
    }

    pub fn of(pid: u32) -> io::Result<Self> {
        Self::read(pid).map(|(id, _)| id)
    }

    /// The process and its state letter (`R`, `S`, `Z`, ...).
    fn read(pid: u32) -> io::Result<(Self, char)> {
        let stat = ::procfs::process::Process::new_with_root(paths::Roots::default().pid_dir(pid))
            .and_then(|p| p.stat())
            .map_err(crate::procfs::io_error)?;
        Ok((
            Self {
                pid,
                start: stat.starttime,
            },
            stat.state,
        ))
    }

    /// Whether this very process still runs (not merely a process with its pid, nor a zombie
    /// waiting to be reaped).
    pub fn alive(&self) -> bool {
        Self::read(self.pid)
            .is_ok_and(|(now, state)| now.start == self.start && !matches!(state, 'Z' | 'X'))
    }
}

/// A macvtap link a run creates: enough to recognise it later.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkNote {
    pub name: String,
    pub parent: String,
    pub mac: String,
}

/// What a run records about itself as it goes, each thing before it is made, for the run that
/// comes after it should it die.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub owner: Option<ProcessId>,
    pub uuid: String,
    pub journal: Option<PathBuf>,
    pub emulator: Option<ProcessId>,
    /// The VM's cgroup directory.
    pub cgroup: Option<PathBuf>,
    /// The pinned link of the cgroup's device program (cgroup v2).
    pub pin: Option<PathBuf>,
    pub links: Vec<LinkNote>,
    /// Device nodes vmaudit made (`/dev/tapN`).
    pub nodes: Vec<PathBuf>,
    /// Tap interfaces (they go with their last fd).
    pub taps: Vec<String>,
}

/// The lock on one VM's name, held for the whole run; released (and its file removed) on drop.
#[derive(Debug)]
pub struct RunLock {
    file: Flock<File>,
    path: PathBuf,
}

fn lock_dir() -> PathBuf {
    Path::new(paths::RUN_DIR).join(".lock")
}

/// Makes `dir` with `mode` whatever the umask (and refuses one that is not a directory).
fn make_dir(dir: &Path, mode: u32) -> Result<(), RunDirError> {
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(io_err(dir)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(dir)(e)),
    }
}

impl RunLock {
    /// Takes the lock of VM `name`, or fails at once naming the run that holds it.
    pub fn acquire(name: &str) -> Result<Self, RunDirError> {
        make_dir(Path::new(paths::RUN_DIR), 0o755)?;
        let dir = lock_dir();
        make_dir(&dir, 0o700)?;
        let path = dir.join(name);
        loop {
            let opened = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path);
            let file = match opened {
                Ok(f) => f,
                // The directory went with the last lock in it, just now: make it again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    make_dir(&dir, 0o700)?;
                    continue;
                }
                Err(e) => return Err(io_err(&path)(e)),
            };
            let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(f) => f,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(RunDirError::Running {
                        name: name.to_owned(),
                        owner: holder(&path),
                    });
                }
                Err((_, e)) => return Err(io_err(&path)(e.into())),
            };
            // The holder before us may have removed the file after we opened it: the lock is
            // ours only if the path still names the file we locked.
            let same = fs::metadata(&path)
                .is_ok_and(|m| file.metadata().is_ok_and(|f| f.ino() == m.ino()));
            if !same {
                continue;
            }
            let mut f = file;
            f.set_len(0).map_err(io_err(&path))?;
            write!(f, "{}", std::process::id()).map_err(io_err(&path))?;
            return Ok(Self { file: f, path });
        }
    }
}

/// The pid the holder of a lock wrote in it; it writes it right after taking the lock, so an
/// empty file is looked at again a few times.
fn holder(path: &Path) -> String {
    for _ in 0..1000 {
        match fs::read_to_string(path) {
            Ok(s) if !s.trim().is_empty() => return s.trim().to_owned(),
            Ok(_) => std::thread::yield_now(),
            Err(_) => break,
        }
    }
    "unknown".into()
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Removed while still held: whoever opened it meanwhile sees that it is gone and
        // starts over with a new file.
        if let Err(e) = fs::remove_file(&self.path) {
            log::warn!("removing {}: {e}", self.path.display());
        }
        // The lock directory goes with its last lock (another run's lock keeps it).
        if let Some(dir) = self.path.parent()
            && fs::remove_dir(dir).is_err()
        {
            log::debug!("{} stays: other locks are in it", dir.display());
        }
        log::debug!("released the lock {:?}", self.file);
    }
}

/// The run directory of a live run, with its state; removed on drop.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    pub state: State,
}

impl RunDir {
    /// Makes the run directory of VM `name` (mode 0700, whatever the umask) with `state` in it,
    /// atomically: made under a temporary name, then renamed into place. The lock must be held
    /// and a dead run's directory removed first (the `recover` module does both).
    pub fn create(_lock: &RunLock, name: &str, state: State) -> Result<Self, RunDirError> {
        let path = paths::vm_run_dir(name);
        let tmp = Path::new(paths::RUN_DIR).join(format!(".new-{name}-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        make_dir(&tmp, 0o700)?;
        let made = write_state(&tmp, &state).and_then(|()| {
            fs::rename(&tmp, &path).map_err(|source| RunDirError::Io {
                path: path.clone(),
                source,
            })
        });
        if let Err(e) = made {
            if let Err(rm) = fs::remove_dir_all(&tmp) {
                log::warn!("removing {}: {rm}", tmp.display());
            }
            return Err(e);
        }
        Ok(Self { path, state })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes the state and writes it (atomically) before the caller goes on.
    pub fn note(&mut self, change: impl FnOnce(&mut State)) -> Result<(), RunDirError> {
        change(&mut self.state);
        write_state(&self.path, &self.state)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            log::warn!("removing {}: {e}", self.path.display());
        }
    }
}

fn write_state(dir: &Path, state: &State) -> Result<(), RunDirError> {
    let path = dir.join(STATE);
    let tmp = dir.join(format!("{STATE}.tmp"));
    let text = serde_json::to_string_pretty(state).expect("the state serialises");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_data().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// What is in a run directory nobody holds: its state, or None when it has none that parses
/// (a directory of an older vmaudit).
pub fn read_state(dir: &Path) -> Option<State> {
    let text = fs::read_to_string(dir.join(STATE)).ok()?;
    serde_json::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_its_pid_and_start_time() {
        let me = ProcessId::me().unwrap();
        assert!(me.alive());
        let later = ProcessId {
            start: me.start + 1,
            ..me
        };
        assert!(
            !later.alive(),
            "same pid, another start: not the same process"
        );
    }

    #[test]
    fn state_round_trips() {
        let s = State {
            owner: Some(ProcessId { pid: 7, start: 9 }),
            uuid: "u".into(),
            links: vec![LinkNote {
                name: "mvt0".into(),
                parent: "eth0".into(),
                mac: "52:54:00:00:00:01".into(),
            }],
            ..State::default()
        };
        let t = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<State>(&t).unwrap(), s);
    }
}
