//! The VM's device cgroup: layout detection, v2 device program, v1 devices controller.
//!
//! A [`VmCgroup`] is one directory, `<hierarchy>/vmaudit/<vm name>` by default, whose device
//! ACL is a list of [`Rule`]s applied one by one, each with its own result (the runtime audits
//! every ACL change, success or failure):
//! - cgroup v2 ([`VmCgroup::create_v2`]): vmaudit's `BPF_PROG_TYPE_CGROUP_DEVICE` program,
//!   attached with a bpf link, decides from a hash map in libvirt's layout and reports every
//!   decision ([`DecisionStream`]). The link belongs to this process: the ACL holds while the
//!   [`VmCgroup`] lives (libvirt's legacy attach outlives libvirtd; ours does not outlive
//!   vmaudit).
//! - cgroup v1 ([`VmCgroup::create_v1`]): the `devices` controller's files. The kernel reports
//!   no decisions there.
//!
//! [`VmCgroup::kernel_rules`] reads back what the kernel holds, so the ACL can be held to the
//! records that claim it ([`DeviceRule::effective`] says what a list of rules should leave).

pub mod attached;
pub mod layout;
pub mod pin;
pub mod v1;
mod v2;

use std::{
    fs::{File, OpenOptions},
    io::{self, ErrorKind, Write as _},
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd},
        unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use nix::sys::statfs::{CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, FsType, statfs};
use thiserror::Error;

use self::v2::DeviceProgram;
pub use self::{
    layout::{Layout, VM_PARENT},
    v2::DecisionStream,
};
// The ACL's types are the core's: what the runtime applies and what the verifier judges.
pub use vmaudit_core::acl::{
    Acl, AclError, DEFAULT_PATHS, Decision, DecisionDev, DevKind, DevTypes, DeviceRule,
    MatchedEntry, PTY_CATEGORY, PTY_MAJOR, Rule,
};

/// Name of the device program as the kernel lists it (`bpftool prog`, `loaded_programs`).
pub const PROGRAM: &str = vmaudit_common::devcg::programs::DEVICE;

/// The file a process id is written to, to move that process into a cgroup.
pub const CGROUP_PROCS: &str = "cgroup.procs";

/// A rule and what applying it gave.
pub type RuleOutcome = (Rule, Result<(), CgroupError>);

/// What went wrong with a VM cgroup. Messages are one line and name the path or rule.
#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("parsing {path}")]
    Mountinfo {
        path: PathBuf,
        #[source]
        source: crate::mountinfo::MountinfoError,
    },
    #[error(
        "no cgroup hierarchy with device control is mounted (neither cgroup2 nor the v1 devices controller)"
    )]
    NoHierarchy,
    #[error("{path} is not on a {expected} hierarchy")]
    WrongHierarchy {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("invalid cgroup name {name:?}: one non-empty path component, not . or ..")]
    BadName { name: String },
    #[error("cgroup {path} already exists (left by a crash? remove it)")]
    Exists { path: PathBuf },
    #[error("creating cgroup {path}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path} still has processes: they must exit or move out first")]
    Busy { path: PathBuf },
    #[error("removing cgroup {path}")]
    Rmdir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path} was removed")]
    Removed { path: PathBuf },
    #[error("stat {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Acl(#[from] AclError),
    #[error("loading the device cgroup program")]
    Load {
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("device cgroup object lacks {name}")]
    MissingObject { name: &'static str },
    #[error("device cgroup program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching the device program to {path}")]
    Attach {
        path: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("device cgroup map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("rule {rule} conflicts with {held} held for the same numbers (one map entry each)")]
    KeyConflict { rule: String, held: String },
    #[error("device map entry {key:#x} = {value:#x} is no rule")]
    MapEntry { key: u64, value: u32 },
    #[error("mounting {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pinning the device program's link at {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Which cgroup version a [`VmCgroup`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

enum Backend {
    /// None once removed.
    V2(Option<Box<DeviceProgram>>),
    V1,
}

/// A VM's cgroup and its device ACL. Dropping it removes the cgroup (best effort, failures
/// logged) and detaches the program.
pub struct VmCgroup {
    dir: PathBuf,
    procs_path: PathBuf,
    /// `cgroup.procs`, open for writing (close-on-exec).
    procs: File,
    cgroup_id: Option<u64>,
    backend: Backend,
    decisions: Option<DecisionStream>,
    removed: bool,
}

impl VmCgroup {
    /// Creates `name` under `<hierarchy>/vmaudit`: cgroup v2 when mounted, else the v1
    /// devices controller.
    pub fn create(
        layout: &Layout,
        name: &str,
        rules: &[Rule],
    ) -> Result<(Self, Vec<RuleOutcome>), CgroupError> {
        if let Some(parent) = layout.vm_parent_v2() {
            Self::create_v2(&parent, name, rules)
        } else if let Some(parent) = layout.vm_parent_v1() {
            Self::create_v1(&parent, name, rules)
        } else {
            Err(CgroupError::NoHierarchy)
        }
    }

    /// Creates `parent/name` on cgroup v2 (`parent` is made if missing), attaches the device
    /// program (everything denied from then on), and applies `rules` in order.
    pub fn create_v2(
        parent: &Path,
        name: &str,
        rules: &[Rule],
    ) -> Result<(Self, Vec<RuleOutcome>), CgroupError> {
        Self::create_v2_pinned(parent, name, rules, None)
    }

    /// [`VmCgroup::create_v2`], with the program's link pinned at `pin` (see [`pin`]): the ACL
    /// then holds even if this process dies, until the pin is removed. [`VmCgroup::remove`]
    /// removes it.
    pub fn create_v2_pinned(
        parent: &Path,
        name: &str,
        rules: &[Rule],
        pin: Option<&Path>,
    ) -> Result<(Self, Vec<RuleOutcome>), CgroupError> {
        let dir = make_dir(parent, name, CGROUP2_SUPER_MAGIC, "cgroup2")?;
        let made = (|| {
            let handle = open_dir(&dir)?;
            let ino = handle
                .metadata()
                .map_err(|source| CgroupError::Stat {
                    path: dir.clone(),
                    source,
                })?
                .ino();
            let (program, stream) = DeviceProgram::attach(&handle, &dir, pin)?;
            let procs_path = dir.join(CGROUP_PROCS);
            let procs = open_procs(&procs_path)?;
            Ok(Self {
                dir: dir.clone(),
                procs_path,
                procs,
                cgroup_id: Some(ino),
                backend: Backend::V2(Some(Box::new(program))),
                decisions: Some(stream),
                removed: false,
            })
        })();
        Self::finish(made, &dir, rules)
    }

    /// Creates `parent/name` under the cgroup v1 devices controller (`parent` is made if
    /// missing) and applies `rules` in order (write `a` to `devices.deny` first to deny by
    /// default: a new v1 cgroup inherits its parent's list). No decision stream.
    pub fn create_v1(
        parent: &Path,
        name: &str,
        rules: &[Rule],
    ) -> Result<(Self, Vec<RuleOutcome>), CgroupError> {
        let dir = make_dir(parent, name, CGROUP_SUPER_MAGIC, "cgroup v1")?;
        let made = (|| {
            if !dir.join(v1::DEVICES_LIST).exists() {
                return Err(CgroupError::WrongHierarchy {
                    path: parent.to_owned(),
                    expected: "cgroup v1 devices",
                });
            }
            let procs_path = dir.join(CGROUP_PROCS);
            let procs = open_procs(&procs_path)?;
            Ok(Self {
                dir: dir.clone(),
                procs_path,
                procs,
                cgroup_id: None,
                backend: Backend::V1,
                decisions: None,
                removed: false,
            })
        })();
        Self::finish(made, &dir, rules)
    }

    fn finish(
        made: Result<Self, CgroupError>,
        dir: &Path,
        rules: &[Rule],
    ) -> Result<(Self, Vec<RuleOutcome>), CgroupError> {
        match made {
            Ok(mut cg) => {
                let outcomes = cg.apply(rules);
                Ok((cg, outcomes))
            }
            Err(e) => {
                if let Err(rm) = std::fs::remove_dir(dir) {
                    log::warn!("removing {} after a failed set-up: {rm}", dir.display());
                }
                Err(e)
            }
        }
    }

    /// Applies each rule in order; one result per rule (a failure does not stop the rest).
    pub fn apply(&mut self, rules: &[Rule]) -> Vec<RuleOutcome> {
        rules
            .iter()
            .map(|r| (r.clone(), self.apply_rule(r)))
            .collect()
    }

    /// Applies one rule (e.g. a device hot-plugged later).
    pub fn apply_rule(&mut self, rule: &Rule) -> Result<(), CgroupError> {
        match &mut self.backend {
            Backend::V2(Some(p)) => p.apply(rule),
            Backend::V1 if !self.removed => v1::apply(&self.dir, rule),
            _ => Err(CgroupError::Removed {
                path: self.dir.clone(),
            }),
        }
    }

    /// What the kernel holds, sorted: the map's entries (v2) or `devices.list` (v1).
    pub fn kernel_rules(&self) -> Result<Vec<DeviceRule>, CgroupError> {
        match &self.backend {
            Backend::V2(Some(p)) => p.rules(),
            Backend::V1 if !self.removed => v1::rules(&self.dir),
            _ => Err(self.removed_error()),
        }
    }

    pub fn version(&self) -> CgroupVersion {
        match self.backend {
            Backend::V2(_) => CgroupVersion::V2,
            Backend::V1 => CgroupVersion::V1,
        }
    }

    /// The cgroup directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The cgroup v2 id (the directory's inode number), as [`Decision::cgroup_id`] and
    /// `bpf_get_current_cgroup_id` give it. None on v1.
    pub fn cgroup_id(&self) -> Option<u64> {
        self.cgroup_id
    }

    /// `cgroup.procs` of the VM cgroup.
    pub fn procs_path(&self) -> &Path {
        &self.procs_path
    }

    /// `cgroup.procs`, open for writing and close-on-exec: hand it to [`join_in_child`] in a
    /// child's `pre_exec`, so the emulator starts inside the cgroup.
    pub fn procs_fd(&self) -> BorrowedFd<'_> {
        self.procs.as_fd()
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        let value = pid.to_string();
        (&self.procs)
            .write_all(value.as_bytes())
            .map_err(|source| CgroupError::Write {
                path: self.procs_path.clone(),
                value,
                source,
            })
    }

    /// The decision stream (v2; None on v1, or once taken).
    pub fn decisions(&mut self) -> Option<&mut DecisionStream> {
        self.decisions.as_mut()
    }

    /// Takes the decision stream, e.g. to poll it from an async task (v2; None on v1).
    pub fn take_decisions(&mut self) -> Option<DecisionStream> {
        self.decisions.take()
    }

    /// Decisions the program made but could not report (ring buffer full). Always 0 on v1,
    /// which reports nothing.
    pub fn lost_decisions(&self) -> Result<u64, CgroupError> {
        match &self.backend {
            Backend::V2(Some(p)) => p.lost(),
            Backend::V2(None) => Err(self.removed_error()),
            Backend::V1 => Ok(0),
        }
    }

    /// Removes the cgroup directory, then detaches the program. Every process must have exited
    /// or moved out: if not ([`CgroupError::Busy`]) nothing changes, the ACL still holds and
    /// removal can be retried. Removing twice is not an error.
    pub fn remove(&mut self) -> Result<(), CgroupError> {
        if self.removed {
            return Ok(());
        }
        match std::fs::remove_dir(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) if e.kind() == ErrorKind::ResourceBusy => {
                return Err(CgroupError::Busy {
                    path: self.dir.clone(),
                });
            }
            Err(source) => {
                return Err(CgroupError::Rmdir {
                    path: self.dir.clone(),
                    source,
                });
            }
        }
        self.removed = true;
        if let Backend::V2(program) = &mut self.backend
            && let Some(p) = program.take()
        {
            p.detach()?;
        }
        Ok(())
    }

    fn removed_error(&self) -> CgroupError {
        CgroupError::Removed {
            path: self.dir.clone(),
        }
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            match self.backend {
                Backend::V2(_) => log::warn!("{e}; its device program is detached anyway"),
                Backend::V1 => log::warn!("{e}; it is left in place"),
            }
        }
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs` (see
/// [`VmCgroup::procs_fd`]). Async-signal-safe (one write(2), no allocation), for
/// `std::os::unix::process::CommandExt::pre_exec`.
pub fn join_in_child(procs: BorrowedFd<'_>) -> io::Result<()> {
    // "0" names the writing process.
    // SAFETY: writes one byte from a live static buffer to an fd the caller keeps open.
    let n = unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) };
    if n == 1 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn check_name(name: &str) -> Result<(), CgroupError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(CgroupError::BadName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Makes `parent` (if missing) and `parent/name`, checking both are on `magic`'s filesystem.
fn make_dir(
    parent: &Path,
    name: &str,
    magic: FsType,
    expected: &'static str,
) -> Result<PathBuf, CgroupError> {
    check_name(name)?;
    std::fs::create_dir_all(parent).map_err(|source| CgroupError::Mkdir {
        path: parent.to_owned(),
        source,
    })?;
    let fs = statfs(parent).map_err(|e| CgroupError::Stat {
        path: parent.to_owned(),
        source: e.into(),
    })?;
    if fs.filesystem_type() != magic {
        return Err(CgroupError::WrongHierarchy {
            path: parent.to_owned(),
            expected,
        });
    }
    let dir = parent.join(name);
    match std::fs::create_dir(&dir) {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(CgroupError::Exists { path: dir }),
        Err(source) => Err(CgroupError::Mkdir { path: dir, source }),
    }
}

fn open_dir(dir: &Path) -> Result<File, CgroupError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|source| CgroupError::Open {
            path: dir.to_owned(),
            source,
        })
}

fn open_procs(path: &Path) -> Result<File, CgroupError> {
    // std opens with O_CLOEXEC.
    OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|source| CgroupError::Open {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_component() {
        for bad in ["", ".", "..", "a/b", "a\0"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("vm-1 test").unwrap();
    }

    #[test]
    fn a_v2_cgroup_is_refused_outside_cgroup2() {
        let parent = std::env::temp_dir().join(format!("vmaudit-cg-unit-{}", std::process::id()));
        let err = VmCgroup::create_v2(&parent, "vm", &[]).err().unwrap();
        let _ = std::fs::remove_dir_all(&parent);
        assert!(
            matches!(
                err,
                CgroupError::WrongHierarchy {
                    expected: "cgroup2",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().ends_with("is not on a cgroup2 hierarchy"));
    }

    #[test]
    fn create_without_any_hierarchy() {
        let err = VmCgroup::create(&Layout::default(), "vm", &[])
            .err()
            .unwrap();
        assert!(matches!(err, CgroupError::NoHierarchy));
    }
}
