//! cgroup v1 `devices` controller: `devices.deny`, `devices.allow`, `devices.list`. The kernel
//! reports no decisions here: a v1 VM cgroup has no decision stream.

use std::{fs::OpenOptions, io::Write as _, path::Path};

use super::{CgroupError, DeviceRule, Rule};

/// Written `a` to deny every device.
pub const DEVICES_DENY: &str = "devices.deny";
/// Written one `c MAJ:MIN rwm`-style line per allowed device.
pub const DEVICES_ALLOW: &str = "devices.allow";
/// What the kernel allows, one line per entry.
pub const DEVICES_LIST: &str = "devices.list";

/// Writes `value` to the control file `name` of `dir` in one write(2), as the kernel requires.
fn write_control(dir: &Path, name: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(name);
    let err = |source| CgroupError::Write {
        path: path.clone(),
        value: value.to_owned(),
        source,
    };
    let mut f = OpenOptions::new().write(true).open(&path).map_err(err)?;
    f.write_all(value.as_bytes()).map_err(err)
}

/// Applies one rule: [`Rule::DenyAll`] writes `a` to `devices.deny`, an allow its line to
/// `devices.allow`.
pub(super) fn apply(dir: &Path, rule: &Rule) -> Result<(), CgroupError> {
    match rule {
        Rule::DenyAll => write_control(dir, DEVICES_DENY, "a"),
        _ => write_control(dir, DEVICES_ALLOW, &rule.to_string()),
    }
}

/// `devices.list` as rules, sorted.
pub(super) fn rules(dir: &Path) -> Result<Vec<DeviceRule>, CgroupError> {
    let path = dir.join(DEVICES_LIST);
    let text = std::fs::read_to_string(&path).map_err(|source| CgroupError::Read {
        path: path.clone(),
        source,
    })?;
    parse_list(&text)
}

/// Parses the text of a `devices.list`, sorted.
pub fn parse_list(text: &str) -> Result<Vec<DeviceRule>, CgroupError> {
    let mut out = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(DeviceRule::parse_v1)
        .collect::<Result<Vec<_>, _>>()?;
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{Acl, DevKind};

    #[test]
    fn devices_list_round_trips_the_default_acl() {
        let rules = Rule::defaults_with(|p| {
            let minor = match p.to_str().unwrap() {
                "/dev/null" => 3,
                "/dev/zero" => 5,
                _ => return Err(vmaudit_core::acl::AclError::NotADevice { path: p.to_owned() }),
            };
            Rule::path_rdev(p, DevKind::Char, 1, minor, Acl::RW)
        });
        // As the kernel lists them after `a` denied and three allows.
        let listed = parse_list("c 1:3 rw\nc 1:5 rw\nc 136:* rw\n").unwrap();
        assert_eq!(listed, DeviceRule::effective(&rules));
        assert_eq!(parse_list("").unwrap(), []);
        assert_eq!(
            parse_list("a *:* rwm\n").unwrap()[0].to_string(),
            "a *:* rwm"
        );
        assert!(parse_list("c 1:3 rw\ngarbage\n").is_err());
    }

    #[test]
    fn writes_go_to_the_right_control_file() {
        let dir = std::env::temp_dir().join(format!("vmaudit-v1-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [DEVICES_DENY, DEVICES_ALLOW] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        apply(&dir, &Rule::DenyAll).unwrap();
        let pty = Rule::major(DevKind::Char, 136, "pty", Acl::RW).unwrap();
        apply(&dir, &pty).unwrap();
        let deny = std::fs::read_to_string(dir.join(DEVICES_DENY)).unwrap();
        let allow = std::fs::read_to_string(dir.join(DEVICES_ALLOW)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((deny.as_str(), allow.as_str()), ("a", "c 136:* rw"));
        let err = apply(Path::new("/nonexistent"), &pty).unwrap_err();
        assert_eq!(
            err.to_string(),
            "writing \"c 136:* rw\" to /nonexistent/devices.allow"
        );
    }
}
