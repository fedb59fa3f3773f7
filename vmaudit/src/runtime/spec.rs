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

use super::{identity::Identity, names};
use crate::cgroup::{Acl, DevKind, Rule};

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

impl Interface {
    /// The interface's own fields (the field at fault, and why): backend and parent, queues,
    /// names. Shared by the spec and hot-plug requests.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.queues == 0 || self.queues > 16 {
            return Err(("queues", "must be 1 to 16".into()));
        }
        match (self.backend, &self.parent) {
            (Backend::Macvtap, None) => {
                return Err(("parent", "macvtap needs a parent link".into()));
            }
            (Backend::Tap, Some(_)) => {
                return Err(("parent", "only a macvtap interface has a parent".into()));
            }
            (_, Some(p)) => names::ifname(p).map_err(|m| ("parent", m))?,
            _ => {}
        }
        if let Some(n) = &self.ifname {
            names::ifname(n).map_err(|m| ("ifname", m))?;
        }
        Ok(())
    }
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
    /// The unprivileged user the emulator runs as (never root). Default `vmaudit-qemu`.
    #[serde(default = "default_user")]
    pub user: String,
    /// Its group. Default: the user's primary group.
    #[serde(default)]
    pub group: Option<String>,
}

impl Default for EmulatorSpec {
    fn default() -> Self {
        Self {
            path: default_emulator(),
            args: None,
            accel: Accel::default(),
            memory_mib: default_memory(),
            machine: default_machine(),
            user: default_user(),
            group: None,
        }
    }
}

fn default_user() -> String {
    super::identity::DEFAULT_USER.to_owned()
}

/// Who may use the VM's control socket besides root.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSpec {
    /// A user (name or uid) whose connections are taken too (checked with SO_PEERCRED).
    #[serde(default)]
    pub owner: Option<String>,
}

/// The placeholder of custom emulator arguments for the QMP socket's fd, which vmaudit binds
/// (mode 0600, in its 0700 run directory) and hands to the emulator.
pub const QMP_FD: &str = "{qmp-fd}";

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
    #[serde(default)]
    pub control: ControlSpec,
}

/// What the spec resolves to on this host, checked before anything is created.
#[derive(Clone, Debug)]
pub struct Host {
    /// The emulator's program, found.
    pub program: PathBuf,
    /// Who the emulator runs as.
    pub identity: Identity,
    /// The control socket's owner besides root.
    pub control_owner: Option<u32>,
    /// The spec's extra ACL rules, resolved (device nodes stat'ed).
    pub rules: Vec<Rule>,
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
    /// Reads, parses and validates a spec file, and resolves it on this host.
    pub fn load(path: &Path) -> Result<(Self, Host), SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.to_owned(),
            source,
        })?;
        let spec = Self::parse(path, &text)?;
        let host = spec.validate_host(path, Path::new("/sys/class/net"))?;
        Ok((spec, host))
    }

    /// Whether vmaudit hands the emulator a QMP socket: always with its default command line,
    /// with custom arguments when one names [`QMP_FD`].
    pub fn has_qmp(&self) -> bool {
        self.emulator
            .args
            .as_ref()
            .is_none_or(|a| a.iter().any(|x| x.contains(QMP_FD)))
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
        let field = |f: &str, r: Result<(), String>| r.map_err(|m| Self::field(path, f, m));
        field("name", names::vm_name(&self.name))?;
        self.validate_emulator(path)?;
        self.validate_interfaces(path)?;
        self.extra_majors(path)?;
        field("cgroup.parent", names::cgroup_parent(&self.cgroup.parent))?;
        if let Some(o) = &self.control.owner {
            field("control.owner", names::account(o))?;
        }
        Ok(())
    }

    fn validate_emulator(&self, path: &Path) -> Result<(), SpecError> {
        let e = &self.emulator;
        let field = |f: &str, r: Result<(), String>| r.map_err(|m| Self::field(path, f, m));
        field("emulator.machine", names::machine(&e.machine))?;
        field("emulator.user", names::account(&e.user))?;
        if let Some(g) = &e.group {
            field("emulator.group", names::account(g))?;
        }
        field("emulator.path", names::argument(&e.path.to_string_lossy()))?;
        if !(16..=1 << 20).contains(&e.memory_mib) {
            return Err(Self::field(path, "emulator.memory_mib", "16 to 1048576"));
        }
        for (i, a) in e.args.iter().flatten().enumerate() {
            let f = format!("emulator.args[{i}]");
            field(&f, names::argument(a))?;
            if a.contains("{qmp}") {
                return Err(Self::field(
                    path,
                    f,
                    "`{qmp}` is gone: the emulator cannot create a socket in vmaudit's run \
                     directory; name the socket vmaudit binds by its fd: \
                     \"-chardev\", \"socket,id=qmp,fd={qmp-fd},server=on,wait=off\", \
                     \"-mon\", \"chardev=qmp,mode=control\"",
                ));
            }
        }
        Ok(())
    }

    fn validate_interfaces(&self, path: &Path) -> Result<(), SpecError> {
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
            iface.check().map_err(|(k, m)| Self::field(path, f(k), m))?;
            if let Some(n) = &iface.ifname
                && !ifnames.insert(n.clone())
            {
                return Err(Self::field(
                    path,
                    f("ifname"),
                    format!("duplicate interface name {n}"),
                ));
            }
        }
        Ok(())
    }

    /// The spec's ACL entries as rules: whole majors checked now (their category too), device
    /// nodes only once `stat` can look at them ([`Spec::validate_host`]).
    fn extra_majors(&self, path: &Path) -> Result<(), SpecError> {
        self.rules(path, |_, _| Ok(None)).map(|_| ())
    }

    fn rules(
        &self,
        path: &Path,
        mut node: impl FnMut(&Path, Acl) -> Result<Option<Rule>, String>,
    ) -> Result<Vec<Rule>, SpecError> {
        let mut out = Vec::new();
        for (i, a) in self.acl.iter().enumerate() {
            let f = |k: &str| format!("acl[{i}].{k}");
            let err = |k: &str, e: &dyn std::fmt::Display| Self::field(path, f(k), e.to_string());
            if a.acl.is_empty() || !a.acl.chars().all(|c| "rwm".contains(c)) {
                return Err(Self::field(
                    path,
                    f("acl"),
                    format!("`{}` is not a subset of rwm", a.acl.escape_debug()),
                ));
            }
            let acl: Acl = a.acl.parse().map_err(|e| err("acl", &e))?;
            if let Some(k) = &a.kind
                && k != "char"
                && k != "block"
            {
                return Err(Self::field(
                    path,
                    f("type"),
                    format!("`{}` is neither char nor block", k.escape_debug()),
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
                (Some(p), None) => {
                    if !p.is_absolute() {
                        return Err(Self::field(
                            path,
                            f("path"),
                            format!("`{}` is not an absolute path", p.display()),
                        ));
                    }
                    names::argument(&p.to_string_lossy()).map_err(|m| err("path", &m))?;
                    if let Some(r) = node(p, acl).map_err(|e| err("path", &e))? {
                        out.push(r);
                    }
                }
                (None, Some(major)) => {
                    if major > 4095 {
                        return Err(Self::field(path, f("major"), "0 to 4095"));
                    }
                    let Some(category) = &a.category else {
                        return Err(Self::field(
                            path,
                            f("category"),
                            "a major needs a category (e.g. pty)",
                        ));
                    };
                    let kind = if a.kind.as_deref() == Some("block") {
                        DevKind::Block
                    } else {
                        DevKind::Char
                    };
                    out.push(
                        Rule::major(kind, major, category, acl).map_err(|e| err("category", &e))?,
                    );
                }
            }
        }
        Ok(out)
    }

    /// Checks what the host must have and resolves it: the emulator, its user and group,
    /// the control socket's owner, each macvtap parent, each ACL device node.
    pub fn validate_host(&self, path: &Path, sys_class_net: &Path) -> Result<Host, SpecError> {
        let Some(program) = find_program(&self.emulator.path) else {
            return Err(Self::field(
                path,
                "emulator.path",
                format!(
                    "`{}` not found (install qemu-system-x86, or name another emulator)",
                    self.emulator.path.display()
                ),
            ));
        };
        let identity = Identity::resolve(&self.emulator.user, self.emulator.group.as_deref())
            .map_err(|m| {
                let f = if m.contains("group") && self.emulator.group.is_some() {
                    "emulator.group"
                } else {
                    "emulator.user"
                };
                Self::field(path, f, m)
            })?;
        let control_owner = match &self.control.owner {
            Some(o) => Some(
                super::identity::uid_of(o).map_err(|m| Self::field(path, "control.owner", m))?,
            ),
            None => None,
        };
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
        let rules = self.rules(path, |p, acl| {
            if !p.exists() {
                return Err(format!("`{}` does not exist", p.display()));
            }
            Rule::path(p, acl).map(Some).map_err(|e| e.to_string())
        })?;
        Ok(Host {
            program,
            identity,
            control_owner,
            rules,
        })
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
    fn what_reaches_qemu_or_a_path_is_checked_at_parse() {
        let uuid = "uuid = \"c7a5fdbd-cdaf-9455-926a-d65c16db1809\"\n";
        let with = |body: &str| err(&format!("name = \"x\"\n{uuid}{body}"));
        assert_eq!(
            err(&format!("name = \"a,b\"\n{uuid}")),
            "spec vm.toml: name: `a,b` holds `,`"
        );
        assert!(
            with("[emulator]\nmachine = \"pc,accel=kvm\"\n")
                .starts_with("spec vm.toml: emulator.machine: ")
        );
        assert!(
            with("[emulator]\nargs = [\"-qmp\", \"unix:{qmp},server=on\"]\n")
                .starts_with("spec vm.toml: emulator.args[1]: `{qmp}` is gone")
        );
        assert!(with("[emulator]\nuser = \"a b\"\n").starts_with("spec vm.toml: emulator.user: "));
        assert!(
            with("[[acl]]\nmajor = 136\ncategory = \"p t\"\n")
                .starts_with("spec vm.toml: acl[0].category: ")
        );
        assert!(
            with("[[acl]]\nmajor = 5000\ncategory = \"x\"\n")
                .starts_with("spec vm.toml: acl[0].major: ")
        );
        assert!(
            with("[cgroup]\nparent = \"a/../..\"\n").starts_with("spec vm.toml: cgroup.parent: ")
        );
        assert!(
            with("[[interface]]\nmac = \"52:54:00:00:00:01\"\nifname = \"sixteen-bytes-xx\"\n")
                .starts_with("spec vm.toml: interface[0].ifname: ")
        );
        assert!(
            with("[[interface]]\nmac = \"52:54:00:00:00:01\"\nifname = \"tap%d\"\n")
                .starts_with("spec vm.toml: interface[0].ifname: ")
        );
        assert!(with("[control]\nowner = \"\"\n").starts_with("spec vm.toml: control.owner: "));
        assert!(
            with("[emulator]\nmemory_mib = 999999999\n")
                .starts_with("spec vm.toml: emulator.memory_mib: ")
        );
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
        // A user every Debian host has (the default, vmaudit-qemu, is made by the setup).
        s2.emulator.user = "nobody".into();
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
