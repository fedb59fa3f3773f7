//! What a name may hold where it reaches a path, qemu's command line, the kernel or an audit
//! record: one rule per kind of name, shared by the spec and the control socket's requests.
//! Each returns the reason a value is refused, for a message that names the field.

/// The longest VM name: it becomes a directory, a cgroup and a journal file name.
pub const VM_NAME_MAX: usize = 64;
/// IFNAMSIZ - 1: the kernel's limit on an interface name.
pub const IFNAME_MAX: usize = 15;

fn control(s: &str) -> Option<char> {
    s.chars().find(|c| c.is_control())
}

/// A VM name. libvirt refuses an empty name, `/` and a newline; vmaudit also refuses what
/// would reach qemu's `-name guest=` option or a path unescaped: `,` (qemu's option separator),
/// control characters, `'` (which an audit record cannot carry), a leading `.` (vmaudit's own
/// entries in /run/vmaudit), and more than 64 bytes.
pub fn vm_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > VM_NAME_MAX {
        return Err(format!("must be 1-{VM_NAME_MAX} bytes"));
    }
    if let Some(c) = control(s) {
        return Err(format!(
            "`{}` holds the control character {c:?}",
            s.escape_debug()
        ));
    }
    if let Some(c) = s.chars().find(|c| matches!(c, '/' | ',' | '\'')) {
        return Err(format!("`{s}` holds `{c}`"));
    }
    if s.starts_with('.') {
        return Err(format!("`{s}` starts with `.`"));
    }
    Ok(())
}

/// A host interface name (tap or macvtap link, or a macvtap parent): the kernel's rules
/// (1-15 bytes, not `.` or `..`, no `/`, `:` or whitespace), and no `%` (the kernel would take
/// it as a numbering template), `,` or control characters.
pub fn ifname(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > IFNAME_MAX {
        return Err(format!(
            "`{}` is not a valid interface name (1-{IFNAME_MAX} bytes; it has {})",
            s.escape_debug(),
            s.len()
        ));
    }
    if s == "." || s == ".." {
        return Err(format!("`{s}` is not a valid interface name"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| c.is_control() || c.is_whitespace() || matches!(c, '/' | ':' | '%' | ','))
    {
        return Err(format!(
            "`{}` is not a valid interface name (it holds {c:?})",
            s.escape_debug()
        ));
    }
    Ok(())
}

/// A qemu machine type, as `-M NAME` takes it: letters, digits, `.`, `-` and `_`, starting with
/// a letter or digit, at most 64 bytes (qemu's own names, e.g. `pc`, `q35`, `pc-i440fx-7.2`).
pub fn machine(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a qemu machine type (letters, digits, `.`, `-`, `_`)",
            s.escape_debug()
        ))
    }
}

/// A user or group name, or a number.
pub fn account(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a user or group name",
            s.escape_debug()
        ))
    }
}

/// An argument of the emulator's command line: no control characters (a NUL would cut it, a
/// newline would forge a log line).
pub fn argument(s: &str) -> Result<(), String> {
    match control(s) {
        Some(c) => Err(format!(
            "`{}` holds the control character {c:?}",
            s.escape_debug()
        )),
        None => Ok(()),
    }
}

/// The cgroup parent: relative, its components neither empty, `.` nor `..`, no control
/// characters.
pub fn cgroup_parent(s: &str) -> Result<(), String> {
    if s.starts_with('/') {
        return Err("must be relative (under the hierarchy's root)".into());
    }
    if s.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!(
            "`{s}` has an empty, `.` or `..` component (it must stay under the hierarchy's root)"
        ));
    }
    argument(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names() {
        for good in ["web1", "a b", "été", "x.y-z_1"] {
            assert!(vm_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a,b",
            "a/b",
            "a\nb",
            "a'b",
            ".hidden",
            &"x".repeat(65),
            "a\u{7f}",
        ] {
            assert!(vm_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn interface_names() {
        assert!(ifname("vmtap0").is_ok());
        assert!(ifname("a-15-bytes-name").is_ok());
        assert!(
            ifname("a-16-bytes-name!")
                .unwrap_err()
                .contains("it has 16")
        );
        for bad in ["", ".", "..", "a b", "a/b", "a:b", "tap%d", "a,b", "a\tb"] {
            assert!(ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn machines_parents_arguments() {
        assert!(machine("pc-i440fx-7.2").is_ok());
        for bad in ["", "pc,accel=kvm", "-pc", "pc q35"] {
            assert!(machine(bad).is_err(), "{bad:?}");
        }
        assert!(cgroup_parent("vmaudit/vms").is_ok());
        for bad in ["/abs", "a/../b", "..", "a//b", "a/./b"] {
            assert!(cgroup_parent(bad).is_err(), "{bad:?}");
        }
        assert!(argument("-serial").is_ok());
        assert!(argument("a\0b").is_err());
    }
}
