//! The VM's cgroup as `vmaudit run` sets it up: where it goes (spec), which rules (libvirt's
//! defaults, then the spec's), and one audit record per ACL change, success or failure.
//!
//! vmaudit marks the cgroups it makes with the extended attribute `trusted.vmaudit.vm` (the
//! VM's uuid; only CAP_SYS_ADMIN may set `trusted.*`), and removes a cgroup only when it bears
//! that mark: a cgroup of another manager at the same path is never touched.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{
    spec::{CgroupVersion, Spec},
    trail::{Trail, TrailError},
};
use crate::{
    audit::record::{CgroupClass, CgroupReason, Record, RecordBuilder},
    cgroup::{CgroupError, Layout, Rule, VmCgroup},
    procfs::DevNum,
    verify::{AclChange, ClaimKind, engine::Msg},
};

/// The extended attribute that marks a cgroup as vmaudit's, holding the VM's uuid.
pub const MARK: &str = "trusted.vmaudit.vm";

/// How long the removal of a cgroup waits for its killed processes to be gone.
const EMPTY_WAIT: Duration = Duration::from_secs(2);

/// Why the cgroup could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("no {wanted} hierarchy is mounted (see /proc/self/mountinfo)")]
    NoHierarchy { wanted: &'static str },
    #[error(
        "cgroup {path} exists and is not this VM's (no {MARK} mark of its uuid): another manager's? remove it, or set cgroup.parent"
    )]
    NotOurs { path: PathBuf },
    #[error("creating the VM's cgroup")]
    Create(#[source] Box<CgroupError>),
    #[error("marking cgroup {path} as vmaudit's")]
    Mark {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ACL rule `{rule}` was refused")]
    Rule {
        rule: String,
        #[source]
        source: Box<CgroupError>,
    },
    #[error(transparent)]
    Trail(#[from] TrailError),
}

/// Where the VM's cgroup goes: its directory, and whether it is on cgroup v2.
pub fn target(spec: &Spec) -> Result<(PathBuf, bool), SetupError> {
    let layout = Layout::detect().map_err(|e| SetupError::Create(Box::new(e)))?;
    let (root, v2) = match (spec.cgroup.version, &layout.v2, &layout.v1_devices) {
        (CgroupVersion::Auto | CgroupVersion::V2, Some(v2), _) => (v2.clone(), true),
        (CgroupVersion::Auto | CgroupVersion::V1, None, Some(v1))
        | (CgroupVersion::V1, _, Some(v1)) => (v1.clone(), false),
        (CgroupVersion::V2, None, _) => {
            return Err(SetupError::NoHierarchy {
                wanted: "cgroup v2",
            });
        }
        (_, _, None) => {
            return Err(SetupError::NoHierarchy {
                wanted: "cgroup v1 devices",
            });
        }
    };
    Ok((root.join(&spec.cgroup.parent).join(&spec.name), v2))
}

/// The VM's cgroup while it runs; [`VmCgroupHandle::remove`] takes it away.
pub struct VmCgroupHandle {
    pub cgroup: VmCgroup,
}

impl VmCgroupHandle {
    pub fn path(&self) -> &Path {
        self.cgroup.path()
    }

    /// Removes the cgroup, killing what is still inside first (an escapee, or a child of the
    /// emulator), then its pinned program.
    pub fn remove(mut self) -> Result<(), CgroupError> {
        if self.cgroup.remove().is_ok() {
            return Ok(());
        }
        let dir = self.cgroup.path().to_owned();
        let killed = kill_all(&dir);
        log::warn!(
            "cgroup {}: killed {killed} process(es) left inside",
            dir.display()
        );
        self.cgroup.remove()
    }
}

/// Whether `dir` bears vmaudit's mark for the VM `uuid`.
pub fn is_ours(dir: &Path, uuid: &str) -> bool {
    let (Ok(path), Ok(name)) = (CString::new(dir.as_os_str().as_bytes()), CString::new(MARK))
    else {
        return false;
    };
    let mut buf = [0u8; 64];
    // SAFETY: NUL-terminated path and name; the kernel writes at most `buf.len()` bytes.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    n > 0 && &buf[..n as usize] == uuid.as_bytes()
}

fn mark(dir: &Path, uuid: &str) -> std::io::Result<()> {
    let path = CString::new(dir.as_os_str().as_bytes())?;
    let name = CString::new(MARK)?;
    // SAFETY: NUL-terminated path and name; the value is read for `uuid.len()` bytes.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            uuid.as_ptr().cast(),
            uuid.len(),
            0,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join(crate::cgroup::CGROUP_PROCS))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kills every process in the cgroup `dir` and waits (bounded) until none is left: cgroup v2's
/// `cgroup.kill` (atomic: nothing inside can fork its way out); on cgroup v1, which has none,
/// SIGKILL to each process `cgroup.procs` lists, again until the list is empty. Returns how
/// many processes were found.
pub fn kill_all(dir: &Path) -> usize {
    let found = procs(dir).len();
    let kill_file = dir.join("cgroup.kill");
    let deadline = Instant::now() + EMPTY_WAIT;
    if kill_file.exists()
        && let Err(e) = std::fs::write(&kill_file, "1")
    {
        log::warn!("writing {}: {e}", kill_file.display());
    }
    loop {
        let left = procs(dir);
        if left.is_empty() || Instant::now() > deadline {
            if !left.is_empty() {
                log::warn!(
                    "cgroup {}: {} process(es) still inside after {EMPTY_WAIT:?}",
                    dir.display(),
                    left.len()
                );
            }
            return found;
        }
        for pid in &left {
            // SAFETY: kill with a pid read from the cgroup; a pid gone meanwhile gives ESRCH.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        // A killed process leaves cgroup.procs once reaped by its parent; nothing signals
        // that to a process that is not the parent.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The audit record of one ACL change.
fn record_of(trail: &Trail<'_>, cgroup: &Path, rule: &Rule) -> RecordBuilder {
    let (reason, class) = match rule {
        Rule::DenyAll => (CgroupReason::Deny, CgroupClass::All),
        Rule::Path {
            path,
            major,
            minor,
            acl,
            ..
        } => (
            CgroupReason::Allow,
            CgroupClass::Path {
                path: path.clone(),
                rdev: Some(DevNum {
                    major: *major,
                    minor: *minor,
                }),
                acl: *acl,
            },
        ),
        Rule::Major {
            major,
            category,
            acl,
            ..
        } => (
            CgroupReason::Allow,
            CgroupClass::Major {
                category: category.clone(),
                maj: *major,
                acl: *acl,
            },
        ),
    };
    // libvirt writes the cgroup directory with a trailing `/`.
    let dir = PathBuf::from(format!("{}/", cgroup.display()));
    Record::cgroup(&trail.vm, reason, &dir, class)
}

/// Creates the VM's cgroup at `dir` (see [`target`]), marked as vmaudit's, with libvirt's
/// default ACL and `extra` (the spec's rules), writing one record per change; on cgroup v2 the
/// program's link is pinned at `pin`. Any refused rule fails the set-up (after its record),
/// and the cgroup is removed.
pub fn setup(
    (dir, v2): (&Path, bool),
    extra: &[Rule],
    pin: Option<&Path>,
    trail: &Trail<'_>,
) -> Result<VmCgroupHandle, SetupError> {
    if dir.exists() {
        // Refused before any change: the first (deny all) is audited as failed.
        trail.emit(record_of(trail, dir, &Rule::DenyAll).success(false))?;
        return Err(SetupError::NotOurs {
            path: dir.to_owned(),
        });
    }
    let (parent, name) = (
        dir.parent().unwrap_or(Path::new("/")),
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let mut rules = Rule::defaults();
    rules.extend(extra.iter().cloned());
    let created = if v2 {
        VmCgroup::create_v2_pinned(parent, &name, &rules, pin)
    } else {
        VmCgroup::create_v1(parent, &name, &rules)
    };
    let (cgroup, outcomes) = match created {
        Ok(c) => c,
        Err(e) => {
            // Nothing was applied: the first change (deny all) is audited as failed.
            trail.emit(record_of(trail, dir, &Rule::DenyAll).success(false))?;
            return Err(SetupError::Create(Box::new(e)));
        }
    };
    let mut handle = VmCgroupHandle { cgroup };
    let uuid = trail.vm.uuid.hyphenated().to_string();
    if let Err(source) = mark(handle.path(), &uuid) {
        let path = handle.path().to_owned();
        remove_after_failure(handle);
        return Err(SetupError::Mark { path, source });
    }
    let mut refused = None;
    for (rule, result) in outcomes {
        let rec = record_of(trail, handle.path(), &rule).success(result.is_ok());
        let claim = ClaimKind::Cgroup {
            cgroup: Some(handle.path().to_owned()),
            change: match rule.device_rule() {
                Some(r) => AclChange::Allow(r),
                None => AclChange::DenyAll,
            },
        };
        if let Err(e) = trail.emit_claim(rec, claim) {
            remove_after_failure(handle);
            return Err(e.into());
        }
        if let Err(source) = result
            && refused.is_none()
        {
            refused = Some(SetupError::Rule {
                rule: rule.to_string(),
                source: Box::new(source),
            });
        }
    }
    if let Some(e) = refused {
        remove_after_failure(handle);
        return Err(e);
    }
    if trail.verifying()
        && let Some(stream) = handle.cgroup.take_decisions()
        && let Err(e) = trail.tell(Msg::Decisions {
            uuid,
            stream: Box::new(stream),
        })
    {
        remove_after_failure(handle);
        return Err(e.into());
    }
    Ok(handle)
}

/// Removes a cgroup that failed its set-up; the set-up's own error is what the caller reports.
fn remove_after_failure(handle: VmCgroupHandle) {
    if let Err(e) = handle.remove() {
        log::error!("{e}");
    }
}
