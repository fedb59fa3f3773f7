//! The cgroup claims: the device policy the kernel enforces, held to each ACL change a record
//! claims, and, once confirmed, held there: a rule removed, a rule no claim made, the device
//! program detached or replaced.

use std::path::{Path, PathBuf};

use super::{
    Found, Ledger,
    findings::Finding,
    vm::{Confirmed, grants},
};
use crate::{
    acl::DeviceRule,
    claim::{AclChange, Claim, ClaimKind},
    verdict::{ClaimRef, Evidence, Verdict},
    view::{DevicePolicy, Enforcer, KernelView},
};

pub(super) fn judge(l: &mut Ledger, c: &Claim, view: &dyn KernelView, last: bool) -> Option<Found> {
    let ClaimKind::Cgroup { cgroup, change } = &c.kind else {
        unreachable!("acl::judge takes cgroup claims")
    };
    let Some(dir) = cgroup
        .clone()
        .or_else(|| l.vms.get(&c.uuid).and_then(|v| v.cgroup.clone()))
    else {
        return Some(Found::unknown("the record names no cgroup"));
    };
    let policy = match view.device_policy(&dir) {
        Ok(p) => p,
        Err(e) => {
            return last.then(|| {
                Found::unknown(format!(
                    "the device policy of {} cannot be read: {e}",
                    dir.display()
                ))
            });
        }
    };
    let found = if c.success {
        claimed(l, c, &dir, *change, &policy)
    } else {
        Some(failed(&dir, *change, &policy))
    };
    match found {
        Some(f) => Some(f),
        None => last.then(|| missing(&dir, *change, &policy)),
    }
}

/// A successful change: confirmed when the kernel holds it (and remembered, to hold it there).
fn claimed(
    l: &mut Ledger,
    c: &Claim,
    dir: &Path,
    change: AclChange,
    policy: &DevicePolicy,
) -> Option<Found> {
    let vm = l.vms.entry(c.uuid.clone()).or_default();
    match change {
        AclChange::DenyAll => policy.default_deny.then(|| {
            if let Enforcer::Programs { ids, .. } = &policy.enforcer {
                vm.programs = Some(Confirmed {
                    what: ids.clone(),
                    claim: c.claim_ref(),
                    reported: false,
                });
            }
            Found::confirmed(
                format!(
                    "{} denies every device it does not allow",
                    enforcer_name(dir, policy)
                ),
                vec![policy_evidence(dir, policy)],
            )
        }),
        AclChange::Allow(rule) => {
            let k = policy.rules.iter().find(|k| grants(k, &rule))?;
            vm.rules.push(Confirmed {
                what: rule,
                claim: c.claim_ref(),
                reported: false,
            });
            Some(Found::confirmed(
                format!("the device policy of {} allows {rule}", dir.display()),
                vec![map_evidence(dir, format!("kernel entry {k}"))],
            ))
        }
        AclChange::Deny(rule) => (!policy.rules.iter().any(|k| grants(k, &rule))).then(|| {
            Found::confirmed(
                format!(
                    "the device policy of {} no longer allows {rule}",
                    dir.display()
                ),
                vec![map_evidence(dir, holds(policy))],
            )
        }),
    }
}

/// A change recorded as failed: the kernel must not hold it.
fn failed(dir: &Path, change: AclChange, policy: &DevicePolicy) -> Found {
    let held = match change {
        AclChange::DenyAll => policy.default_deny,
        AclChange::Allow(r) => policy.rules.iter().any(|k| grants(k, &r)),
        AclChange::Deny(r) => !policy.rules.iter().any(|k| grants(k, &r)),
    };
    let e = vec![map_evidence(dir, holds(policy))];
    if held {
        Found::violated(
            "the change is recorded as failed, yet the kernel holds it",
            e,
        )
    } else {
        Found::confirmed("the change failed, and the kernel does not hold it", e)
    }
}

/// The deadline passed and the kernel does not hold a successful change.
fn missing(dir: &Path, change: AclChange, policy: &DevicePolicy) -> Found {
    let what = match change {
        AclChange::DenyAll => format!(
            "nothing denies by default on {}: {}",
            dir.display(),
            match policy.enforcer {
                Enforcer::Programs { .. } => "no device program is attached",
                Enforcer::DevicesList => "devices.list allows every device",
            }
        ),
        AclChange::Allow(r) => format!("the device policy of {} does not allow {r}", dir.display()),
        AclChange::Deny(r) => format!("the device policy of {} still allows {r}", dir.display()),
    };
    Found::violated(what, vec![map_evidence(dir, holds(policy))])
}

fn enforcer_name(dir: &Path, policy: &DevicePolicy) -> String {
    match &policy.enforcer {
        Enforcer::Programs { ids, .. } => format!(
            "the device program {} attached to {}",
            ids.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            dir.display()
        ),
        Enforcer::DevicesList => format!("the devices controller of {}", dir.display()),
    }
}

fn policy_evidence(dir: &Path, policy: &DevicePolicy) -> Evidence {
    let detail = match &policy.enforcer {
        Enforcer::Programs { ids, map_id } => format!(
            "device program {ids:?} (map {map_id}) attached: what it does not allow is denied; {}",
            holds(policy)
        ),
        Enforcer::DevicesList => format!("devices.list: {}", holds(policy)),
    };
    Evidence::new(0, "program")
        .path(dir.display().to_string())
        .detail(detail)
}

fn map_evidence(dir: &Path, detail: String) -> Evidence {
    Evidence::new(0, "map")
        .path(dir.display().to_string())
        .detail(detail)
}

fn holds(policy: &DevicePolicy) -> String {
    let rules: Vec<String> = policy.rules.iter().map(DeviceRule::to_string).collect();
    format!("it holds {}", rules.join(", "))
}

/// Re-reads the device policy of every running VM: what was confirmed must still hold, and the
/// kernel must allow nothing the claims do not.
pub(super) fn recheck(l: &mut Ledger, view: &dyn KernelView, now: u64, out: &mut Vec<Verdict>) {
    let vms: Vec<(String, PathBuf)> = l
        .vms
        .iter()
        .filter(|(_, v)| v.running && v.acl_claimed)
        .filter_map(|(u, v)| Some((u.clone(), v.cgroup.clone()?)))
        .collect();
    for (uuid, dir) in vms {
        let Ok(policy) = view.device_policy(&dir) else {
            continue;
        };
        program_kept(l, &uuid, &dir, &policy, now, out);
        if detached(&policy) {
            // Nothing enforces the ACL any more: that one violation says it all.
            if let Some(vm) = l.vms.get_mut(&uuid) {
                vm.rules.iter_mut().for_each(|r| r.reported = true);
            }
            continue;
        }
        rules_kept(l, &uuid, &dir, &policy, now, out);
        nothing_extra(l, &uuid, &dir, &policy, now, out);
    }
}

/// No device program is attached any more (cgroup v2).
fn detached(policy: &DevicePolicy) -> bool {
    matches!(&policy.enforcer, Enforcer::Programs { ids, .. } if ids.is_empty())
}

fn program_kept(
    l: &mut Ledger,
    uuid: &str,
    dir: &Path,
    policy: &DevicePolicy,
    now: u64,
    out: &mut Vec<Verdict>,
) {
    let Some(vm) = l.vms.get_mut(uuid) else {
        return;
    };
    let Some(p) = vm.programs.as_mut().filter(|p| !p.reported) else {
        return;
    };
    let ids = match &policy.enforcer {
        Enforcer::Programs { ids, .. } => ids.clone(),
        Enforcer::DevicesList => Vec::new(),
    };
    if ids == p.what {
        return;
    }
    p.reported = true;
    let how = if ids.is_empty() {
        "detached: nothing denies by default any more".to_owned()
    } else {
        format!("replaced: now {ids:?}")
    };
    let found = Found::violated(
        format!(
            "the device program {:?} of VM {}'s cgroup {} was {how}",
            p.what,
            vm.name,
            dir.display()
        ),
        vec![policy_evidence(dir, policy)],
    );
    let claim = p.claim.clone();
    out.push(l.seal(claim, found, now, now));
}

fn rules_kept(
    l: &mut Ledger,
    uuid: &str,
    dir: &Path,
    policy: &DevicePolicy,
    now: u64,
    out: &mut Vec<Verdict>,
) {
    let Some(vm) = l.vms.get_mut(uuid) else {
        return;
    };
    let name = vm.name.clone();
    let mut gone: Vec<(ClaimRef, Found)> = Vec::new();
    for r in vm.rules.iter_mut().filter(|r| !r.reported) {
        if policy.rules.iter().any(|k| grants(k, &r.what)) {
            continue;
        }
        r.reported = true;
        gone.push((
            r.claim.clone(),
            Found::violated(
                format!(
                    "{} is no longer in the device policy of VM {name}'s cgroup: removed after the manager set it",
                    r.what
                ),
                vec![map_evidence(dir, format!("the map now: {}", holds(policy)))],
            ),
        ));
    }
    for (claim, found) in gone {
        out.push(l.seal(claim, found, now, now));
    }
}

fn nothing_extra(
    l: &mut Ledger,
    uuid: &str,
    dir: &Path,
    policy: &DevicePolicy,
    now: u64,
    out: &mut Vec<Verdict>,
) {
    let Some(vm) = l.vms.get(uuid) else {
        return;
    };
    let extra: Vec<DeviceRule> = policy
        .rules
        .iter()
        .filter(|k| !vm.acl.iter().any(|c| grants(c, k)))
        .copied()
        .collect();
    let name = vm.name.clone();
    for rule in extra {
        let text = format!(
            "the device policy of VM {name}'s cgroup {} allows {rule}, which no claim made",
            dir.display()
        );
        let found = Found::violated(
            text.clone(),
            vec![map_evidence(dir, format!("{:?}", rule.bpf_entry()))],
        );
        let key = Finding::MapExtra {
            cgroup: dir.to_owned(),
            rule,
        };
        l.report(key, ClaimRef::unclaimed(text), found, now, now, out);
    }
}
