//! The VM spec (TOML): what `vmaudit run` builds. Unknown keys are refused; every error names
//! the field.

use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::{Deserialize, Deserializer};
use thiserror::Error;

/// A spec that cannot be used, naming the field at fault.
#[derive(Debug, Error)]
pub enum SpecError {
    #[error("cannot read spec {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spec {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("spec {path}: {field}: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// A MAC address, printed lower-case `52:54:00:aa:bb:cc` as libvirt does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || format!("`{s}` is not a MAC address (six hex bytes separated by colons)");
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if mac[0] & 1 != 0 {
            return Err(format!("`{s}` is a multicast MAC address"));
        }
        Ok(Self(mac))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// How an interface reaches the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A tap device through /dev/net/tun (TUNSETIFF).
    Tap,
    /// A macvtap link on a parent interface, opened through its /dev/tapN node.
    Macvtap,
}

/// One network interface of the VM.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// The guest MAC.
    #[serde(deserialize_with = "de_mac")]
    pub mac: Mac,
    /// `tap` (default) or `macvtap`.
    #[serde(default = "default_backend")]
    pub backend: Backend,
    /// The host interface name (tap, or macvtap link). Default: `vmaudit%d` / `vmtap%d`,
    /// numbered by the kernel.
    #[serde(default)]
    pub ifname: Option<String>,
    /// macvtap only: the parent link.
    #[serde(default)]
    pub parent: Option<String>,
    /// Also open /dev/vhost-net, once per queue.
    #[serde(default)]
    pub vhost: bool,
    /// Queues (fds per device); above 1 the tap is multiqueue.
    #[serde(default = "one")]
    pub queues: u32,
}

fn default_backend() -> Backend {
    Backend::Tap
}
fn one() -> u32 {
    1
}

fn de_mac<'de, D: Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

/// An extra device ACL entry: a device node, or a whole major of a category.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclEntry {
    /// A device node path (its type and numbers are read with stat).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// A major number (with `category`, `type`).
    #[serde(default)]
    pub major: Option<u32>,
    /// The category libvirt names such a rule by (e.g. `pty`).
    #[serde(default)]
    pub category: Option<String>,
    /// `char` (default) or `block`, for a major.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// A subset of `rwm`. Default `rw`.
    #[serde(default = "rw")]
    pub acl: String,
}

fn rw() -> String {
    "rw".to_owned()
}

/// Which cgroup hierarchy carries the device ACL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// v2 when a cgroup2 hierarchy is mounted, else the v1 devices controller.
    #[default]
    Auto,
    V2,
    V1,
}

/// Where the VM's cgroup goes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupSpec {
    /// Parent directory, relative to the hierarchy's root. Default `vmaudit`.
    #[serde(default = "default_cgroup_parent")]
    pub parent: String,
    #[serde(default)]
    pub version: CgroupVersion,
}

impl Default for CgroupSpec {
    fn default() -> Self {
        Self {
            parent: default_cgroup_parent(),
            version: CgroupVersion::Auto,
        }
    }
}

fn default_cgroup_parent() -> String {
    "vmaudit".to_owned()
}

/// The emulator to launch.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmulatorSpec {
    /// The program. Default: Debian's `qemu-system-x86_64` (found on PATH).
    #[serde(default = "default_emulator")]
    pub path: PathBuf,
    /// Arguments replacing vmaudit's default qemu command line (a paused `pc` machine with no
    /// guest). The per-interface `-netdev`/`-device` arguments are appended either way.
    #[serde(default)]
    pub args: Option<Vec<String>>,
    /// `tcg` (default; the audit records then say `virt=qemu`, as libvirt's do for
    /// `type='qemu'`) or `kvm` (`virt=kvm`).
    #[serde(default)]
    pub accel: Accel,
    /// Guest memory in MiB. Default 64.
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// qemu machine type. Default `pc` (PCI hot-plug).
    #[serde(default = "default_machine")]
    pub machine: String,
}

impl Default for EmulatorSpec {
    fn default() -> Self {
        Self {
            path: default_emulator(),
            args: None,
            accel: Accel::default(),
            memory_mib: default_memory(),
            machine: default_machine(),
        }
    }
}

fn default_emulator() -> PathBuf {
    PathBuf::from("qemu-system-x86_64")
}
fn default_memory() -> u32 {
    64
}
fn default_machine() -> String {
    "pc".to_owned()
}

/// qemu's accelerator, and so the `virt=` of the records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    #[default]
    Tcg,
    Kvm,
}

impl Accel {
    /// libvirt's `virt=` value for the domain type this accelerator gives.
    pub fn virt(self) -> &'static str {
        match self {
            Self::Tcg => "qemu",
            Self::Kvm => "kvm",
        }
    }
}

/// A VM spec.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: String,
    #[serde(deserialize_with = "de_uuid")]
    pub uuid: uuid::Uuid,
    #[serde(default)]
    pub emulator: EmulatorSpec,
    #[serde(default, rename = "interface")]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub acl: Vec<AclEntry>,
    #[serde(default)]
    pub cgroup: CgroupSpec,
}

fn de_uuid<'de, D: Deserializer<'de>>(d: D) -> Result<uuid::Uuid, D::Error> {
    let s = String::deserialize(d)?;
    uuid::Uuid::try_parse(&s).map_err(|_| serde::de::Error::custom(format!("`{s}` is not a UUID")))
}

/// Looks a program up on PATH (or takes it as a path when it has a `/`).
pub fn find_program(p: &Path) -> Option<PathBuf> {
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_owned());
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|d| d.join(p))
        .find(|c| c.is_file())
}

impl Spec {
    /// Reads, parses and validates a spec file.
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.to_owned(),
            source,
        })?;
        let spec = Self::parse(path, &text)?;
        spec.validate_host(path, Path::new("/sys/class/net"))?;
        Ok(spec)
    }

    /// Parses and validates a spec's text (no look at the host).
    pub fn parse(path: &Path, text: &str) -> Result<Self, SpecError> {
        let spec: Spec = toml::from_str(text).map_err(|e| SpecError::Parse {
            path: path.to_owned(),
            // toml's message carries the line, the snippet and the field; keep one line.
            message: one_line(&e),
        })?;
        spec.validate(path)?;
        Ok(spec)
    }

    fn field(path: &Path, field: impl Into<String>, message: impl Into<String>) -> SpecError {
        SpecError::Field {
            path: path.to_owned(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn validate(&self, path: &Path) -> Result<(), SpecError> {
        let ok_name = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && !s.contains(['/', '\'', '\0'])
                && s != "."
                && s != ".."
        };
        if !ok_name(&self.name) {
            return Err(Self::field(
                path,
                "name",
                "must be 1-64 characters, without `/`, quotes or NUL",
            ));
        }
        let mut macs = BTreeSet::new();
        let mut ifnames = BTreeSet::new();
        for (i, iface) in self.interfaces.iter().enumerate() {
            let f = |k: &str| format!("interface[{i}].{k}");
            if !macs.insert(iface.mac) {
                return Err(Self::field(
                    path,
                    f("mac"),
                    format!("duplicate MAC {}", iface.mac),
                ));
            }
            if iface.queues == 0 || iface.queues > 16 {
                return Err(Self::field(path, f("queues"), "must be 1 to 16"));
            }
            match (iface.backend, &iface.parent) {
                (Backend::Macvtap, None) => {
                    return Err(Self::field(
                        path,
                        f("parent"),
                        "macvtap needs a parent link",
                    ));
                }
                (Backend::Tap, Some(_)) => {
                    return Err(Self::field(
                        path,
                        f("parent"),
                        "only a macvtap interface has a parent",
                    ));
                }
                _ => {}
            }
            if let Some(n) = &iface.ifname {
                if n.is_empty() || n.len() > 15 || n.contains(['/', ' ', ':', '\0']) {
                    return Err(Self::field(
                        path,
                        f("ifname"),
                        format!("`{n}` is not a valid interface name (1-15 characters)"),
                    ));
                }
                if !ifnames.insert(n.clone()) {
                    return Err(Self::field(
                        path,
                        f("ifname"),
                        format!("duplicate interface name {n}"),
                    ));
                }
            }
        }
        for (i, a) in self.acl.iter().enumerate() {
            let f = |k: &str| format!("acl[{i}].{k}");
            if a.acl.is_empty() || !a.acl.chars().all(|c| "rwm".contains(c)) {
                return Err(Self::field(
                    path,
                    f("acl"),
                    format!("`{}` is not a subset of rwm", a.acl),
                ));
            }
            match (&a.path, a.major) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(Self::field(
                        path,
                        format!("acl[{i}]"),
                        "give either `path` or `major`",
                    ));
                }
                (Some(p), None) if !p.is_absolute() => {
                    return Err(Self::field(
                        path,
                        f("path"),
                        format!("`{}` is not an absolute path", p.display()),
                    ));
                }
                (None, Some(_)) if a.category.is_none() => {
                    return Err(Self::field(
                        path,
                        f("category"),
                        "a major needs a category (e.g. pty)",
                    ));
                }
                _ => {}
            }
            if let Some(k) = &a.kind
                && k != "char"
                && k != "block"
            {
                return Err(Self::field(
                    path,
                    f("type"),
                    format!("`{k}` is neither char nor block"),
                ));
            }
        }
        if self.cgroup.parent.split('/').any(|c| c == "..") || self.cgroup.parent.starts_with('/') {
            return Err(Self::field(
                path,
                "cgroup.parent",
                "must be relative, without `..`",
            ));
        }
        if self.emulator.memory_mib < 16 {
            return Err(Self::field(path, "emulator.memory_mib", "at least 16"));
        }
        Ok(())
    }

    /// Checks what the host must have: the emulator, each macvtap parent, each ACL path.
    pub fn validate_host(&self, path: &Path, sys_class_net: &Path) -> Result<(), SpecError> {
        if find_program(&self.emulator.path).is_none() {
            return Err(Self::field(
                path,
                "emulator.path",
                format!(
                    "`{}` not found (install qemu-system-x86, or name another emulator)",
                    self.emulator.path.display()
                ),
            ));
        }
        for (i, iface) in self.interfaces.iter().enumerate() {
            if let Some(parent) = &iface.parent
                && !sys_class_net.join(parent).exists()
            {
                return Err(Self::field(
                    path,
                    format!("interface[{i}].parent"),
                    format!("no link named `{parent}`"),
                ));
            }
        }
        for (i, a) in self.acl.iter().enumerate() {
            if let Some(p) = &a.path
                && !p.exists()
            {
                return Err(Self::field(
                    path,
                    format!("acl[{i}].path"),
                    format!("`{}` does not exist", p.display()),
                ));
            }
        }
        Ok(())
    }
}

fn one_line(e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => format!("{msg} (at byte {})", span.start),
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "demo"
uuid = "c7a5fdbd-cdaf-9455-926a-d65c16db1809"

[[interface]]
mac = "52:54:00:12:34:56"

[[interface]]
mac = "52:54:00:AB:cd:ef"
backend = "macvtap"
parent = "eth0"
vhost = true
queues = 2

[[acl]]
path = "/dev/urandom"

[[acl]]
major = 136
category = "pty"
acl = "rw"
"#;

    fn parse(t: &str) -> Result<Spec, SpecError> {
        Spec::parse(Path::new("vm.toml"), t)
    }

    #[test]
    fn a_full_spec_parses_with_defaults() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.name, "demo");
        assert_eq!(s.uuid.to_string(), "c7a5fdbd-cdaf-9455-926a-d65c16db1809");
        assert_eq!(s.interfaces[0].backend, Backend::Tap);
        assert_eq!(s.interfaces[0].queues, 1);
        assert_eq!(s.interfaces[1].mac.to_string(), "52:54:00:ab:cd:ef");
        assert_eq!(s.emulator.machine, "pc");
        assert_eq!(s.emulator.accel.virt(), "qemu");
        assert_eq!(s.cgroup.parent, "vmaudit");
        assert_eq!(s.acl[0].acl, "rw");
    }

    fn err(t: &str) -> String {
        parse(t).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field() {
        let head = "name = \"x\"\nuuid = \"c7a5fdbd-cdaf-9455-926a-d65c16db1809\"\n";
        let e = err(&format!("{head}colour = 1\n"));
        assert!(e.starts_with("spec vm.toml: unknown field `colour`"), "{e}");
        let e = err(&format!(
            "{head}[[interface]]\nmac = \"52:54:00:zz:00:01\"\n"
        ));
        assert!(
            e.contains("`52:54:00:zz:00:01` is not a MAC address"),
            "{e}"
        );
        let e = err("name = \"x\"\nuuid = \"nope\"\n");
        assert!(e.contains("`nope` is not a UUID"), "{e}");
        let e = err(&format!(
            "{head}[[interface]]\nmac = \"52:54:00:00:00:01\"\n[[interface]]\nmac = \"52:54:00:00:00:01\"\n"
        ));
        assert_eq!(
            e,
            "spec vm.toml: interface[1].mac: duplicate MAC 52:54:00:00:00:01"
        );
        let e = err(&format!(
            "{head}[[interface]]\nmac = \"52:54:00:00:00:01\"\nbackend = \"macvtap\"\n"
        ));
        assert_eq!(
            e,
            "spec vm.toml: interface[0].parent: macvtap needs a parent link"
        );
        let e = err(&format!(
            "{head}[[interface]]\nmac = \"52:54:00:00:00:01\"\nqueues = 0\n"
        ));
        assert_eq!(e, "spec vm.toml: interface[0].queues: must be 1 to 16");
        let e = err(&format!(
            "{head}[[acl]]\npath = \"/dev/null\"\nacl = \"rx\"\n"
        ));
        assert_eq!(e, "spec vm.toml: acl[0].acl: `rx` is not a subset of rwm");
        let e = err(&format!(
            "{head}[[interface]]\nmac = \"01:00:00:00:00:01\"\n"
        ));
        assert!(e.contains("multicast"), "{e}");
        assert!(
            err("uuid = \"c7a5fdbd-cdaf-9455-926a-d65c16db1809\"\n")
                .contains("missing field `name`")
        );
        for e in [
            err(&format!("{head}colour = 1\n")),
            err("name = \"x\"\nuuid = \"nope\"\n"),
        ] {
            assert_eq!(e.lines().count(), 1, "one line: {e}");
        }
    }

    #[test]
    fn host_checks_name_the_field() {
        let s = parse(GOOD).unwrap();
        let dir = std::env::temp_dir().join(format!("vmaudit-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s2 = s.clone();
        s2.emulator.path = PathBuf::from("/nonexistent/qemu");
        let e = s2
            .validate_host(Path::new("vm.toml"), &dir)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("spec vm.toml: emulator.path: `/nonexistent/qemu` not found"),
            "{e}"
        );
        s2.emulator.path = PathBuf::from("/bin/sh");
        let e = s2
            .validate_host(Path::new("vm.toml"), &dir)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "spec vm.toml: interface[1].parent: no link named `eth0`");
        std::fs::create_dir_all(dir.join("eth0")).unwrap();
        assert!(s2.validate_host(Path::new("vm.toml"), &dir).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
