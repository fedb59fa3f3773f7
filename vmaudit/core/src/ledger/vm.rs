//! What the ledger knows of each VM: its emulator, its NICs and their fds, its cgroup and the
//! ACL its claims describe, and what was confirmed in the kernel (to hold it there).

use std::{collections::BTreeMap, path::PathBuf};

use crate::{
    acl::{DevTypes, DeviceRule},
    claim::AclChange,
    fd::DevNum,
    verdict::ClaimRef,
    view::FdRef,
};

/// An fd the emulator holds for a NIC, from the claim that put it there.
#[derive(Clone, Debug)]
pub struct HeldFd {
    pub at: FdRef,
    /// When it arrived in the emulator (kernel time): which file at that number.
    pub since: u64,
    pub claim: ClaimRef,
    /// A detach claim (or the VM's stop) released it: its release is no violation.
    pub released: bool,
}

/// A manager's open named by an open claim.
#[derive(Clone, Debug)]
pub struct NicOpen {
    pub at: FdRef,
    pub ts: u64,
    pub path: String,
    /// The kernel's id of its open file description, when known.
    pub ofd: Option<u64>,
    pub claim: ClaimRef,
    /// The emulator got this very file (kcmp, or the handed list says so).
    pub passed: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Nic {
    pub opens: Vec<NicOpen>,
    pub held: Vec<HeldFd>,
    /// The last successful detach claim of it: its id, and when it was made.
    pub detach: Option<(u64, u64)>,
}

impl Nic {
    /// Nothing of it is left to judge: detached before `horizon` (no finding of its fds is
    /// still due), every fd released by a claim and gone from the emulator (`held_now` says
    /// whether it still holds that fd), every open passed.
    pub fn done(&self, horizon: u64, held_now: impl Fn(&HeldFd) -> bool) -> bool {
        self.detach.is_some_and(|(_, made)| made < horizon)
            && self.held.iter().all(|h| h.released && !held_now(h))
            && self.opens.iter().all(|o| o.passed)
    }
}

/// A rule confirmed in the kernel, held to it from then on.
#[derive(Clone, Debug)]
pub struct Confirmed<T> {
    pub what: T,
    pub claim: ClaimRef,
    /// Its loss was reported.
    pub reported: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Vm {
    pub name: String,
    pub pid: Option<u32>,
    /// A start was claimed and no stop yet.
    pub running: bool,
    /// Its stop was judged: its claims are judged for good as they come.
    pub settled: bool,
    pub cgroup: Option<PathBuf>,
    /// The ACL the claims describe, in effect now.
    pub acl: Vec<DeviceRule>,
    /// Whether any ACL claim was made (an empty ACL after deny-all still says something).
    pub acl_claimed: bool,
    pub rules: Vec<Confirmed<DeviceRule>>,
    /// The device programs attached when deny-all was confirmed (cgroup v2).
    pub programs: Option<Confirmed<Vec<u32>>>,
    pub nics: BTreeMap<String, Nic>,
}

impl Vm {
    /// Applies an ACL claim to the ACL in effect.
    pub fn claim_acl(&mut self, change: AclChange) {
        self.acl_claimed = true;
        match change {
            AclChange::DenyAll => self.acl.clear(),
            AclChange::Allow(r) => match self.acl.iter_mut().find(|a| same_device(a, &r)) {
                Some(a) => a.acl = a.acl.union(r.acl),
                None => self.acl.push(r),
            },
            AclChange::Deny(r) => self.acl.retain(|a| !same_device(a, &r)),
        }
    }

    /// The NIC fds the emulator holds and no detach released.
    pub fn live_fds(&self) -> impl Iterator<Item = (&str, &HeldFd)> {
        self.nics.iter().flat_map(|(mac, n)| {
            n.held
                .iter()
                .filter(|h| !h.released)
                .map(move |h| (mac.as_str(), h))
        })
    }

    /// Whether a claim gave the emulator the file that arrived at `at` at `since`.
    pub fn gave(&self, at: FdRef, since: u64) -> bool {
        self.nics
            .values()
            .any(|n| n.held.iter().any(|h| h.at == at && h.since == since))
    }
}

/// The same device and type (the rights are compared apart); a kernel entry for every type
/// covers a rule for one.
pub fn same_device(kernel: &DeviceRule, r: &DeviceRule) -> bool {
    kernel.major == r.major
        && kernel.minor == r.minor
        && (kernel.types == r.types || kernel.types == DevTypes::All)
}

/// Whether a kernel entry grants at least what `r` claims.
pub fn grants(kernel: &DeviceRule, r: &DeviceRule) -> bool {
    same_device(kernel, r) && kernel.acl.contains(r.acl)
}

/// Whether `acl` lets a device `dev` (block or char) be accessed with `access`.
pub fn acl_allows(acl: &[DeviceRule], block: bool, dev: DevNum, access: crate::acl::Acl) -> bool {
    acl.iter().any(|r| {
        let type_ok = match r.types {
            DevTypes::All => true,
            DevTypes::Char => !block,
            DevTypes::Block => block,
        };
        type_ok
            && r.major.is_none_or(|m| m == dev.major)
            && r.minor.is_none_or(|m| m == dev.minor)
            && r.acl.contains(access)
    })
}

/// Whether `host_mac` (a tap's address) is libvirt's host side of guest MAC `mac`: the same, or
/// the same with the first byte 0xfe.
pub fn host_mac_matches(host_mac: &str, mac: &str) -> bool {
    let h = host_mac.trim().to_ascii_lowercase();
    let m = mac.to_ascii_lowercase();
    h == m || (h.len() == 17 && m.len() == 17 && h.starts_with("fe") && h[2..] == m[2..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::Acl;

    #[test]
    fn acl_matching_follows_libvirts_lookup() {
        let acl = vec![
            DeviceRule {
                types: DevTypes::Char,
                major: Some(1),
                minor: Some(3),
                acl: Acl::RW,
            },
            DeviceRule {
                types: DevTypes::Char,
                major: Some(136),
                minor: None,
                acl: Acl::RW,
            },
        ];
        let d = DevNum::new;
        assert!(acl_allows(&acl, false, d(1, 3), Acl::RW));
        assert!(
            !acl_allows(&acl, true, d(1, 3), Acl::READ),
            "a block device is not a char rule's"
        );
        assert!(acl_allows(&acl, false, d(136, 7), Acl::WRITE));
        assert!(!acl_allows(&acl, false, d(10, 200), Acl::READ));
        assert!(!acl_allows(&acl, false, d(1, 3), Acl::MKNOD));
    }

    #[test]
    fn libvirts_host_side_mac_matches_the_guest_mac() {
        assert!(host_mac_matches("fe:54:00:1b:00:01\n", "52:54:00:1b:00:01"));
        assert!(host_mac_matches("52:54:00:1b:00:01", "52:54:00:1b:00:01"));
        assert!(!host_mac_matches("fe:54:00:1b:00:02", "52:54:00:1b:00:01"));
        assert!(!host_mac_matches("", "52:54:00:1b:00:01"));
    }

    #[test]
    fn the_claimed_acl_follows_deny_all_allow_and_deny() {
        let r = |minor, acl| DeviceRule {
            types: DevTypes::Char,
            major: Some(1),
            minor: Some(minor),
            acl,
        };
        let mut vm = Vm::default();
        vm.claim_acl(AclChange::Allow(r(3, Acl::READ)));
        vm.claim_acl(AclChange::DenyAll);
        assert!(vm.acl.is_empty() && vm.acl_claimed);
        vm.claim_acl(AclChange::Allow(r(3, Acl::READ)));
        vm.claim_acl(AclChange::Allow(r(3, Acl::WRITE)));
        vm.claim_acl(AclChange::Allow(r(5, Acl::RW)));
        assert_eq!(vm.acl, vec![r(3, Acl::RW), r(5, Acl::RW)]);
        vm.claim_acl(AclChange::Deny(r(5, Acl::RW)));
        assert_eq!(vm.acl, vec![r(3, Acl::RW)]);
    }
}
