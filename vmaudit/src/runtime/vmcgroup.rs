//! The VM's cgroup as `vmaudit run` sets it up: where it goes (spec), which rules (libvirt's
//! defaults, then the spec's), and one audit record per ACL change, success or failure.

use std::path::{Path, PathBuf};

use super::{
    run::{RunError, Trail},
    spec::{CgroupVersion, Spec},
};
use crate::{
    audit::record::{CgroupClass, CgroupReason, Record},
    cgroup::{Acl, CgroupError, DevKind, Layout, Rule, VmCgroup},
    procfs::DevNum,
    verify::{AclChange, ClaimKind, engine::Msg},
};

/// Why the cgroup could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("no {wanted} hierarchy is mounted (see /proc/self/mountinfo)")]
    NoHierarchy { wanted: &'static str },
    #[error("acl[{index}]")]
    SpecRule {
        index: usize,
        #[source]
        source: Box<vmaudit_core::acl::AclError>,
    },
    #[error("creating the VM's cgroup")]
    Create(#[source] Box<CgroupError>),
    #[error("ACL rule `{rule}` was refused")]
    Rule {
        rule: String,
        #[source]
        source: Box<CgroupError>,
    },
}

/// The VM's cgroup while it runs; [`VmCgroupHandle::remove`] (or drop) takes it away.
pub struct VmCgroupHandle {
    pub cgroup: VmCgroup,
}

impl VmCgroupHandle {
    pub fn procs_path(&self) -> PathBuf {
        self.cgroup.procs_path().to_owned()
    }
    pub fn path(&self) -> &Path {
        self.cgroup.path()
    }
    /// Removes the cgroup (its processes must be gone); a failure is logged.
    pub fn remove(mut self) {
        if self.cgroup.remove().is_ok() {
            return;
        }
        // Something the emulator forked is still inside (an escapee, or a child dying of its
        // parent-death signal): kill what is left (cgroup v2's cgroup.kill) and wait, bounded,
        // for the cgroup to be empty before removing it.
        let dir = self.cgroup.path().to_owned();
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let empty = || {
            std::fs::read_to_string(dir.join("cgroup.events"))
                .map(|t| t.lines().any(|l| l.trim() == "populated 0"))
                .unwrap_or(true)
        };
        while !empty() && std::time::Instant::now() < deadline {
            // The kernel reports emptiness in cgroup.events (pollable with inotify, which this
            // one-off clean-up does not warrant): check again shortly.
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if let Err(e) = self.cgroup.remove() {
            log::warn!("removing cgroup {}: {e}", dir.display());
        }
    }
}

/// The audit record of one ACL change.
fn record_of(trail: &Trail<'_>, cgroup: &Path, rule: &Rule) -> crate::audit::record::RecordBuilder {
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

/// The spec's extra rules.
fn spec_rules(spec: &Spec) -> Result<Vec<Rule>, SetupError> {
    spec.acl
        .iter()
        .enumerate()
        .map(|(index, a)| {
            let err = |source| SetupError::SpecRule {
                index,
                source: Box::new(source),
            };
            let acl: Acl = a.acl.parse().map_err(err)?;
            match (&a.path, a.major) {
                (Some(p), _) => Rule::path(p, acl).map_err(err),
                (None, Some(major)) => {
                    let kind = if a.kind.as_deref() == Some("block") {
                        DevKind::Block
                    } else {
                        DevKind::Char
                    };
                    Rule::major(kind, major, a.category.as_deref().unwrap_or_default(), acl)
                        .map_err(err)
                }
                (None, None) => unreachable!("the spec's validation requires path or major"),
            }
        })
        .collect()
}

/// A cgroup of this VM's name with no process in it is what a vmaudit that was killed left
/// behind: remove it so this run can start. One with processes is left alone (creating the
/// cgroup then fails, naming it).
fn remove_leftover(dir: &Path) {
    let Ok(procs) = std::fs::read_to_string(dir.join(crate::cgroup::CGROUP_PROCS)) else {
        return;
    };
    if procs.trim().is_empty() {
        match std::fs::remove_dir(dir) {
            Ok(()) => log::warn!("removed a leftover empty cgroup {}", dir.display()),
            Err(e) => log::warn!("leftover cgroup {}: {e}", dir.display()),
        }
    }
}

/// Creates the VM's cgroup with libvirt's default ACL and the spec's rules, writing one record
/// per change. Any refused rule fails the set-up (after its record), and the cgroup is removed.
pub fn setup(spec: &Spec, trail: &mut Trail<'_>) -> Result<VmCgroupHandle, RunError> {
    let fail = |e: SetupError| RunError::Cgroup(Box::new(e));
    let layout = Layout::detect().map_err(|e| fail(SetupError::Create(Box::new(e))))?;
    let (root, v2) = match (spec.cgroup.version, &layout.v2, &layout.v1_devices) {
        (CgroupVersion::Auto | CgroupVersion::V2, Some(v2), _) => (v2.clone(), true),
        (CgroupVersion::Auto | CgroupVersion::V1, None, Some(v1))
        | (CgroupVersion::V1, _, Some(v1)) => (v1.clone(), false),
        (CgroupVersion::V2, None, _) => {
            return Err(fail(SetupError::NoHierarchy {
                wanted: "cgroup v2",
            }));
        }
        (_, _, None) => {
            return Err(fail(SetupError::NoHierarchy {
                wanted: "cgroup v1 devices",
            }));
        }
    };
    let parent = root.join(&spec.cgroup.parent);
    remove_leftover(&parent.join(&spec.name));
    let mut rules = Rule::defaults();
    rules.extend(spec_rules(spec).map_err(fail)?);
    let created = if v2 {
        VmCgroup::create_v2(&parent, &spec.name, &rules)
    } else {
        VmCgroup::create_v1(&parent, &spec.name, &rules)
    };
    let (cgroup, outcomes) = match created {
        Ok(c) => c,
        Err(e) => {
            // Nothing was applied: the first change (deny all) is audited as failed.
            let dir = parent.join(&spec.name);
            trail.emit(record_of(trail, &dir, &Rule::DenyAll).success(false))?;
            return Err(fail(SetupError::Create(Box::new(e))));
        }
    };
    let mut handle = VmCgroupHandle { cgroup };
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
            handle.remove();
            return Err(e);
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
        handle.remove();
        return Err(fail(e));
    }
    if let (Some(v), Some(stream)) = (trail.verifier(), handle.cgroup.take_decisions()) {
        let uuid = trail.vm.uuid.hyphenated().to_string();
        if let Err(e) = v.send(Msg::Decisions {
            uuid,
            stream: Box::new(stream),
        }) {
            handle.remove();
            return Err(RunError::Verify(e));
        }
    }
    Ok(handle)
}
