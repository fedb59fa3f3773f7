//! Who the emulator runs as: a configured unprivileged user and group (never root), with the
//! user's supplementary groups (`kvm`, for /dev/kvm), resolved before anything is created.

use std::ffi::CString;

use nix::unistd::{Gid, Group, Uid, User};

/// The user the emulator runs as unless the spec names another; `cargo xtask setup` creates it
/// (as libvirt's package creates `libvirt-qemu`).
pub const DEFAULT_USER: &str = "vmaudit-qemu";

/// A resolved user, group and supplementary groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the user's, from the group database), `gid` included.
    pub groups: Vec<u32>,
}

impl Identity {
    /// Resolves `user` (a name or a number) and `group` (default: the user's primary group).
    /// Refuses root (uid 0) and group 0: the emulator never runs privileged.
    pub fn resolve(user: &str, group: Option<&str>) -> Result<Self, String> {
        let u = lookup_user(user)?;
        if u.uid.is_root() {
            return Err(format!(
                "`{user}` is root: the emulator runs as an unprivileged user"
            ));
        }
        let gid = match group {
            Some(g) => lookup_group(g)?,
            None => u.gid,
        };
        if gid.as_raw() == 0 {
            return Err(format!(
                "group {} is root's group: the emulator runs without it",
                group.unwrap_or("0")
            ));
        }
        let name = CString::new(u.name.as_bytes()).map_err(|_| "a NUL in a user name")?;
        let mut groups: Vec<u32> = nix::unistd::getgrouplist(&name, gid)
            .map_err(|e| format!("the groups of `{}`: {e}", u.name))?
            .into_iter()
            .map(Gid::as_raw)
            .filter(|g| *g != 0)
            .collect();
        groups.sort_unstable();
        groups.dedup();
        Ok(Self {
            user: u.name,
            uid: u.uid.as_raw(),
            gid: gid.as_raw(),
            groups,
        })
    }
}

fn lookup_user(user: &str) -> Result<User, String> {
    let found = match user.parse::<u32>() {
        Ok(n) => User::from_uid(Uid::from_raw(n)),
        Err(_) => User::from_name(user),
    };
    match found {
        Ok(Some(u)) => Ok(u),
        Ok(None) if user == DEFAULT_USER => Err(format!(
            "no user `{user}` (cargo xtask setup creates it: a system user in group kvm)"
        )),
        Ok(None) => Err(format!("no user `{user}`")),
        Err(e) => Err(format!("looking up user `{user}`: {e}")),
    }
}

fn lookup_group(group: &str) -> Result<Gid, String> {
    let found = match group.parse::<u32>() {
        Ok(n) => Group::from_gid(Gid::from_raw(n)),
        Err(_) => Group::from_name(group),
    };
    match found {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(format!("no group `{group}`")),
        Err(e) => Err(format!("looking up group `{group}`: {e}")),
    }
}

/// The uid of a user given by name or number (the control socket's owner).
pub fn uid_of(user: &str) -> Result<u32, String> {
    lookup_user(user).map(|u| u.uid.as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_refused_and_nobody_resolves() {
        assert!(
            Identity::resolve("root", None)
                .unwrap_err()
                .contains("is root")
        );
        assert!(
            Identity::resolve("0", None)
                .unwrap_err()
                .contains("is root")
        );
        let n = Identity::resolve("nobody", None).unwrap();
        assert_ne!(n.uid, 0);
        assert!(n.groups.contains(&n.gid));
        assert!(
            Identity::resolve("nobody", Some("root"))
                .unwrap_err()
                .contains("root's group")
        );
        assert_eq!(
            Identity::resolve("no-such-user-here", None).unwrap_err(),
            "no user `no-such-user-here`"
        );
    }
}
