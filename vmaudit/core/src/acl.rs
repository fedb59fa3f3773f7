//! The device ACL: the rules a VM manager applies ([`Rule`]), what the kernel holds
//! ([`DeviceRule`]), and their encodings (libvirt's BPF map entries, cgroup v1 lines).

use std::{
    collections::BTreeMap,
    fmt,
    io::ErrorKind,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    str::FromStr,
};

use vmaudit_common::devcg::{
    self, ACC_MKNOD, ACC_READ, ACC_WRITE, ANY, DEV_ALL, DEV_BLOCK, DEV_CHAR, Matched, key,
    split_key, split_value, value,
};

/// Why an ACL, a rule or a `devices.list` line is not valid.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("stat {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a character or block device")]
    NotADevice { path: PathBuf },
    #[error("device path {path} is not absolute")]
    RelativePath { path: PathBuf },
    #[error("invalid access {text:?}: a non-empty subset of rwm")]
    BadAcl { text: String },
    #[error("invalid device category {category:?}: letters, digits, - and _ only")]
    BadCategory { category: String },
    #[error("device number {major}:{minor} is reserved (0xffffffff means any)")]
    BadNumber { major: u32, minor: u32 },
    #[error("malformed devices.list line {line:?}")]
    DevicesList { line: String },
}

/// The devices libvirt allows qemu by default (`cgroup_device_acl` in qemu.conf), rw each.
pub const DEFAULT_PATHS: [&str; 7] = [
    "/dev/null",
    "/dev/full",
    "/dev/zero",
    "/dev/random",
    "/dev/urandom",
    "/dev/ptmx",
    "/dev/kvm",
];
/// The pty major (`/dev/pts/N`), allowed rw by default as libvirt does.
pub const PTY_MAJOR: u32 = 136;
/// Category of [`PTY_MAJOR`] in audit records.
pub const PTY_CATEGORY: &str = "pty";

/// Access rights: a set of r(ead), w(rite), m(knod), printed in "rwm" order. Held as the
/// `BPF_DEVCG_ACC_*` bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Acl(u32);

impl Acl {
    pub const READ: Acl = Acl(ACC_READ);
    pub const WRITE: Acl = Acl(ACC_WRITE);
    pub const MKNOD: Acl = Acl(ACC_MKNOD);
    pub const RW: Acl = Acl(ACC_READ | ACC_WRITE);
    pub const RWM: Acl = Acl(ACC_READ | ACC_WRITE | ACC_MKNOD);

    /// From `BPF_DEVCG_ACC_*` bits; None if any other bit is set.
    pub const fn from_bits(bits: u32) -> Option<Acl> {
        if bits & !(ACC_READ | ACC_WRITE | ACC_MKNOD) == 0 {
            Some(Acl(bits))
        } else {
            None
        }
    }
    /// The `BPF_DEVCG_ACC_*` bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub const fn union(self, other: Acl) -> Acl {
        Acl(self.0 | other.0)
    }
    pub const fn contains(self, other: Acl) -> bool {
        self.0 & other.0 == other.0
    }
}

impl fmt::Display for Acl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (bit, c) in [(ACC_READ, 'r'), (ACC_WRITE, 'w'), (ACC_MKNOD, 'm')] {
            if self.0 & bit != 0 {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for Acl {
    type Err = AclError;
    /// Any non-empty subset of `rwm`, each letter at most once, in any order.
    fn from_str(s: &str) -> Result<Self, AclError> {
        let bad = || AclError::BadAcl { text: s.to_owned() };
        let mut bits = 0;
        for c in s.chars() {
            let bit = match c {
                'r' => ACC_READ,
                'w' => ACC_WRITE,
                'm' => ACC_MKNOD,
                _ => return Err(bad()),
            };
            if bits & bit != 0 {
                return Err(bad());
            }
            bits |= bit;
        }
        if bits == 0 {
            return Err(bad());
        }
        Ok(Acl(bits))
    }
}

/// A device node's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DevKind {
    Char,
    Block,
}

impl DevKind {
    /// `c` or `b`, as cgroup v1 and `ls -l` write it.
    pub const fn letter(self) -> char {
        match self {
            Self::Char => 'c',
            Self::Block => 'b',
        }
    }
    /// The `BPF_DEVCG_DEV_*` bit.
    pub const fn bits(self) -> u32 {
        match self {
            Self::Char => DEV_CHAR,
            Self::Block => DEV_BLOCK,
        }
    }
}

/// One change to a VM's device ACL, in the order a manager applies (and audits) them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// Deny every device (clears every allow before it). Audited `class=all`.
    DenyAll,
    /// Allow one device node, by its rdev at the time the rule was made. Audited `class=path`.
    Path {
        path: PathBuf,
        kind: DevKind,
        major: u32,
        minor: u32,
        acl: Acl,
    },
    /// Allow every minor of a major. Audited `class=major category=...`.
    Major {
        kind: DevKind,
        major: u32,
        category: String,
        acl: Acl,
    },
}

impl Rule {
    /// Allows the device node at `path` (symlinks followed, as libvirt's stat does) with `acl`.
    pub fn path(path: impl Into<PathBuf>, acl: Acl) -> Result<Rule, AclError> {
        let path = path.into();
        let meta = std::fs::metadata(&path).map_err(|source| AclError::Stat {
            path: path.clone(),
            source,
        })?;
        let ft = meta.file_type();
        let kind = if ft.is_char_device() {
            DevKind::Char
        } else if ft.is_block_device() {
            DevKind::Block
        } else {
            return Err(AclError::NotADevice { path });
        };
        let rdev = meta.rdev();
        Rule::path_rdev(path, kind, libc::major(rdev), libc::minor(rdev), acl)
    }

    /// Allows `path` known to be `kind` `major:minor` (no stat).
    pub fn path_rdev(
        path: impl Into<PathBuf>,
        kind: DevKind,
        major: u32,
        minor: u32,
        acl: Acl,
    ) -> Result<Rule, AclError> {
        let path = path.into();
        if !path.is_absolute() {
            return Err(AclError::RelativePath { path });
        }
        check_number(major, minor)?;
        check_acl(acl)?;
        Ok(Rule::Path {
            path,
            kind,
            major,
            minor,
            acl,
        })
    }

    /// Allows every minor of `major`. `category` names it in audit records (e.g. `pty`); it is
    /// written there raw, so it must be non-empty ASCII letters, digits, `-` or `_`.
    pub fn major(kind: DevKind, major: u32, category: &str, acl: Acl) -> Result<Rule, AclError> {
        check_number(major, 0)?;
        check_acl(acl)?;
        let ok = !category.is_empty()
            && category
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(AclError::BadCategory {
                category: category.to_owned(),
            });
        }
        Ok(Rule::Major {
            kind,
            major,
            category: category.to_owned(),
            acl,
        })
    }

    /// libvirt's default ACL: deny all, then rw for each of [`DEFAULT_PATHS`] that exists (a
    /// path that exists but is not a device is skipped too, with a warning), then
    /// `c 136:* rw`.
    pub fn defaults() -> Vec<Rule> {
        Self::defaults_with(|p| Rule::path(p, Acl::RW))
    }

    /// [`Rule::defaults`], with `make` turning each default path into a rule (tests inject it).
    pub fn defaults_with(mut make: impl FnMut(&Path) -> Result<Rule, AclError>) -> Vec<Rule> {
        let mut rules = vec![Rule::DenyAll];
        for p in DEFAULT_PATHS {
            match make(Path::new(p)) {
                Ok(r) => rules.push(r),
                Err(AclError::Stat { source, .. }) if source.kind() == ErrorKind::NotFound => {}
                Err(e) => log::warn!("default device ACL: skipping {p}: {e}"),
            }
        }
        rules.push(Rule::Major {
            kind: DevKind::Char,
            major: PTY_MAJOR,
            category: PTY_CATEGORY.to_owned(),
            acl: Acl::RW,
        });
        rules
    }

    /// The audit record's `class`: `all`, `path` or `major`.
    pub const fn class(&self) -> &'static str {
        match self {
            Self::DenyAll => "all",
            Self::Path { .. } => "path",
            Self::Major { .. } => "major",
        }
    }

    /// The audit record's `reason`: `deny` or `allow`.
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::DenyAll => "deny",
            _ => "allow",
        }
    }

    pub const fn acl(&self) -> Option<Acl> {
        match self {
            Self::DenyAll => None,
            Self::Path { acl, .. } | Self::Major { acl, .. } => Some(*acl),
        }
    }

    /// What this rule puts in the kernel (None for [`Rule::DenyAll`], which removes).
    pub fn device_rule(&self) -> Option<DeviceRule> {
        match *self {
            Self::DenyAll => None,
            Self::Path {
                kind,
                major,
                minor,
                acl,
                ..
            } => Some(DeviceRule {
                types: DevTypes::from(kind),
                major: Some(major),
                minor: Some(minor),
                acl,
            }),
            Self::Major {
                kind, major, acl, ..
            } => Some(DeviceRule {
                types: DevTypes::from(kind),
                major: Some(major),
                minor: None,
                acl,
            }),
        }
    }
}

fn check_number(major: u32, minor: u32) -> Result<(), AclError> {
    if major == ANY || minor == ANY {
        return Err(AclError::BadNumber { major, minor });
    }
    Ok(())
}

fn check_acl(acl: Acl) -> Result<(), AclError> {
    if acl.is_empty() {
        return Err(AclError::BadAcl {
            text: String::new(),
        });
    }
    Ok(())
}

/// cgroup v1 form: `a` (what goes to `devices.deny`) or `c 1:3 rw` / `c 136:* rw` (what goes to
/// `devices.allow`).
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.device_rule() {
            None => f.write_str("a"),
            Some(d) => d.fmt(f),
        }
    }
}

/// Device types a kernel entry applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DevTypes {
    Char,
    Block,
    /// Both (`a` in cgroup v1).
    All,
}

impl From<DevKind> for DevTypes {
    fn from(k: DevKind) -> Self {
        match k {
            DevKind::Char => Self::Char,
            DevKind::Block => Self::Block,
        }
    }
}

impl DevTypes {
    pub const fn letter(self) -> char {
        match self {
            Self::Char => 'c',
            Self::Block => 'b',
            Self::All => 'a',
        }
    }
    pub const fn bits(self) -> u32 {
        match self {
            Self::Char => DEV_CHAR,
            Self::Block => DEV_BLOCK,
            Self::All => DEV_ALL,
        }
    }
    const fn from_bits(bits: u32) -> Option<Self> {
        match bits {
            DEV_CHAR => Some(Self::Char),
            DEV_BLOCK => Some(Self::Block),
            DEV_ALL => Some(Self::All),
            _ => None,
        }
    }
}

/// An allow entry as the kernel holds it: a BPF map entry or a `devices.list` line. No path:
/// the kernel knows only numbers. `None` is "any" (`*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceRule {
    pub types: DevTypes,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub acl: Acl,
}

impl DeviceRule {
    /// libvirt's map entry: key `(major << 32) | minor` (0xffffffff for any), value
    /// `(access << 16) | types`.
    pub const fn bpf_entry(&self) -> (u64, u32) {
        let major = match self.major {
            Some(m) => m,
            None => ANY,
        };
        let minor = match self.minor {
            Some(m) => m,
            None => ANY,
        };
        (key(major, minor), value(self.acl.bits(), self.types.bits()))
    }

    /// Decodes a map entry; None if the value has bits no rule sets.
    pub const fn from_bpf_entry(key: u64, value: u32) -> Option<DeviceRule> {
        let (major, minor) = split_key(key);
        let (access, types) = split_value(value);
        let (Some(types), Some(acl)) = (DevTypes::from_bits(types), Acl::from_bits(access)) else {
            return None;
        };
        if acl.is_empty() {
            return None;
        }
        Some(DeviceRule {
            types,
            major: if major == ANY { None } else { Some(major) },
            minor: if minor == ANY { None } else { Some(minor) },
            acl,
        })
    }

    /// Parses a `devices.list` line: `c 1:3 rw`, `c 136:* rw`, `a *:* rwm`.
    pub fn parse_v1(line: &str) -> Result<DeviceRule, AclError> {
        let bad = || AclError::DevicesList {
            line: line.to_owned(),
        };
        let mut words = line.split_whitespace();
        let (Some(t), Some(nums), Some(acl), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return Err(bad());
        };
        let types = match t {
            "c" => DevTypes::Char,
            "b" => DevTypes::Block,
            "a" => DevTypes::All,
            _ => return Err(bad()),
        };
        let (maj, min) = nums.split_once(':').ok_or_else(bad)?;
        let num = |s: &str| -> Result<Option<u32>, AclError> {
            match s {
                "*" => Ok(None),
                _ => s.parse().map(Some).map_err(|_| bad()),
            }
        };
        Ok(DeviceRule {
            types,
            major: num(maj)?,
            minor: num(min)?,
            acl: acl.parse().map_err(|_| bad())?,
        })
    }

    /// The kernel's entries after applying `rules` in order: [`Rule::DenyAll`] clears, an allow
    /// of the same type and numbers as an earlier one adds its rights to it (as cgroup v1
    /// does). Sorted, as `VmCgroup::kernel_rules` returns them. Pass the rules that
    /// applied successfully: a failed one changed nothing.
    pub fn effective<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Vec<DeviceRule> {
        let mut held: BTreeMap<(DevTypes, Option<u32>, Option<u32>), Acl> = BTreeMap::new();
        for r in rules {
            match r.device_rule() {
                None => held.clear(),
                Some(d) => {
                    let acl = held.entry((d.types, d.major, d.minor)).or_default();
                    *acl = acl.union(d.acl);
                }
            }
        }
        held.into_iter()
            .map(|((types, major, minor), acl)| DeviceRule {
                types,
                major,
                minor,
                acl,
            })
            .collect()
    }
}

impl fmt::Display for DeviceRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let num = |n: Option<u32>| n.map_or_else(|| "*".to_owned(), |n| n.to_string());
        write!(
            f,
            "{} {}:{} {}",
            self.types.letter(),
            num(self.major),
            num(self.minor),
            self.acl
        )
    }
}

/// Device type of a [`Decision`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionDev {
    Char,
    Block,
    /// Type bits the program does not know (never seen: the kernel passes char or block).
    Other(u32),
}

impl DecisionDev {
    /// The device kind, if char or block.
    pub const fn kind(self) -> Option<DevKind> {
        match self {
            Self::Char => Some(DevKind::Char),
            Self::Block => Some(DevKind::Block),
            Self::Other(_) => None,
        }
    }
}

/// Which map entry allowed an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchedEntry {
    /// `major:minor`.
    Exact,
    /// `major:*`.
    Major,
    /// `*:minor`.
    Minor,
    /// `*:*`.
    All,
}

/// One device access decision of the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Kernel CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// cgroup v2 id of the process that asked (`VmCgroup::cgroup_id` for the VM's).
    pub cgroup_id: u64,
    pub tgid: u32,
    pub dev: DecisionDev,
    pub major: u32,
    pub minor: u32,
    /// Requested rights (`BPF_DEVCG_ACC_*`), e.g. rw for an O_RDWR open.
    pub access: Acl,
    pub allowed: bool,
    /// The entry that allowed it (None when denied).
    pub matched: Option<MatchedEntry>,
}

impl Decision {
    /// Decodes ring-buffer bytes (which need not be aligned); None if too short or malformed.
    pub fn decode(bytes: &[u8]) -> Option<Decision> {
        if bytes.len() < devcg::RawDecision::SIZE {
            return None;
        }
        // SAFETY: the length is checked above; the struct is plain old data (every bit pattern
        // is valid) and read_unaligned makes no alignment assumption.
        let raw = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<devcg::RawDecision>()) };
        let matched = match raw.matched {
            Matched::NONE => None,
            Matched::EXACT => Some(MatchedEntry::Exact),
            Matched::MAJOR => Some(MatchedEntry::Major),
            Matched::MINOR => Some(MatchedEntry::Minor),
            Matched::ALL => Some(MatchedEntry::All),
            _ => return None,
        };
        Some(Decision {
            ts_ns: raw.ts_ns,
            cgroup_id: raw.cgroup_id,
            tgid: raw.tgid,
            dev: match raw.dev_type {
                DEV_CHAR => DecisionDev::Char,
                DEV_BLOCK => DecisionDev::Block,
                other => DecisionDev::Other(other),
            },
            major: raw.major,
            minor: raw.minor,
            access: Acl::from_bits(raw.access)?,
            allowed: raw.allowed != 0,
            matched,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tun() -> Rule {
        Rule::path_rdev("/dev/net/tun", DevKind::Char, 10, 200, Acl::RW).unwrap()
    }

    #[test]
    fn acl_prints_in_rwm_order_and_parses_any_order() {
        assert_eq!(Acl::RWM.to_string(), "rwm");
        assert_eq!("mwr".parse::<Acl>().unwrap(), Acl::RWM);
        assert_eq!("wr".parse::<Acl>().unwrap().to_string(), "rw");
        assert_eq!("m".parse::<Acl>().unwrap().bits(), 1);
        for bad in ["", "rr", "x", "rw "] {
            assert!(bad.parse::<Acl>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rules_display_as_cgroup_v1_lines() {
        let pty = Rule::major(DevKind::Char, PTY_MAJOR, PTY_CATEGORY, Acl::RW).unwrap();
        assert_eq!(pty.to_string(), "c 136:* rw");
        assert_eq!(tun().to_string(), "c 10:200 rw");
        assert_eq!(Rule::DenyAll.to_string(), "a");
        let blk = Rule::path_rdev("/dev/sda", DevKind::Block, 8, 0, Acl::READ).unwrap();
        assert_eq!(blk.to_string(), "b 8:0 r");
        assert_eq!(
            (pty.class(), tun().class(), Rule::DenyAll.class()),
            ("major", "path", "all")
        );
        assert_eq!((pty.reason(), Rule::DenyAll.reason()), ("allow", "deny"));
    }

    #[test]
    fn map_entries_are_libvirts() {
        // virCgroupV2DevicesGetKey / GetPerms: key major << 32 | minor, -1 = 0xffffffff;
        // value perms << 16 | type (c = 2, b = 1, a = 3); r = 2, w = 4, m = 1.
        let (k, v) = tun().device_rule().unwrap().bpf_entry();
        assert_eq!((k, v), (0x0000_000a_0000_00c8, (6 << 16) | 2));
        let pty = Rule::major(DevKind::Char, 136, "pty", Acl::RW).unwrap();
        let (k, v) = pty.device_rule().unwrap().bpf_entry();
        assert_eq!((k, v), (0x0000_0088_ffff_ffff, 0x0006_0002));
        let all = DeviceRule {
            types: DevTypes::All,
            major: None,
            minor: None,
            acl: Acl::RWM,
        };
        assert_eq!(all.bpf_entry(), (u64::MAX, 0x0007_0003));
        let blk_m = DeviceRule {
            types: DevTypes::Block,
            major: None,
            minor: Some(5),
            acl: Acl::MKNOD,
        };
        assert_eq!(blk_m.bpf_entry(), (0xffff_ffff_0000_0005, 0x0001_0001));
        for d in [all, blk_m, pty.device_rule().unwrap()] {
            let (k, v) = d.bpf_entry();
            assert_eq!(DeviceRule::from_bpf_entry(k, v), Some(d));
        }
        assert_eq!(DeviceRule::from_bpf_entry(0, 0x0008_0002), None);
        assert_eq!(DeviceRule::from_bpf_entry(0, 0x0002_0000), None);
        assert_eq!(DeviceRule::from_bpf_entry(0, 0x0000_0002), None);
    }

    #[test]
    fn devices_list_lines_parse_and_print_back() {
        for line in ["c 1:3 rw", "c 136:* rw", "a *:* rwm", "b 8:0 m", "c *:5 r"] {
            assert_eq!(DeviceRule::parse_v1(line).unwrap().to_string(), line);
        }
        let d = DeviceRule::parse_v1("c 136:* rw").unwrap();
        assert_eq!(
            (d.types, d.major, d.minor),
            (DevTypes::Char, Some(136), None)
        );
        for bad in [
            "",
            "c 1:3",
            "x 1:3 rw",
            "c 1-3 rw",
            "c 1:3 rwx",
            "c 1:3 rw extra",
        ] {
            assert!(DeviceRule::parse_v1(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn constructors_validate() {
        assert!(matches!(
            Rule::major(DevKind::Char, 136, "p ty", Acl::RW),
            Err(AclError::BadCategory { .. })
        ));
        assert!(Rule::major(DevKind::Char, 136, "", Acl::RW).is_err());
        assert!(Rule::major(DevKind::Char, ANY, "x", Acl::RW).is_err());
        assert!(Rule::major(DevKind::Char, 1, "x", Acl::default()).is_err());
        assert!(Rule::path_rdev("dev/null", DevKind::Char, 1, 3, Acl::RW).is_err());
        assert!(matches!(
            Rule::path("/", Acl::RW),
            Err(AclError::NotADevice { .. })
        ));
        assert!(matches!(
            Rule::path("/nonexistent/dev", Acl::RW),
            Err(AclError::Stat { .. })
        ));
        // /dev/null is 1:3 on every Linux.
        let null = Rule::path("/dev/null", Acl::RW).unwrap();
        assert_eq!(null.to_string(), "c 1:3 rw");
    }

    #[test]
    fn defaults_are_libvirts_and_skip_missing_devices() {
        let rules = Rule::defaults_with(|p| {
            if p == Path::new("/dev/kvm") {
                return Err(AclError::Stat {
                    path: p.to_owned(),
                    source: std::io::Error::from(ErrorKind::NotFound),
                });
            }
            Rule::path_rdev(p, DevKind::Char, 1, 3, Acl::RW)
        });
        assert_eq!(rules.first(), Some(&Rule::DenyAll));
        let paths: Vec<_> = rules
            .iter()
            .filter_map(|r| match r {
                Rule::Path { path, .. } => Some(path.to_str().unwrap()),
                _ => None,
            })
            .collect();
        assert_eq!(paths, DEFAULT_PATHS[..6]);
        assert_eq!(rules.last().unwrap().to_string(), "c 136:* rw");
        assert!(rules.iter().skip(1).all(|r| r.acl() == Some(Acl::RW)));
    }

    #[test]
    fn effective_clears_on_deny_all_and_merges_rights() {
        let null_r = Rule::path_rdev("/dev/null", DevKind::Char, 1, 3, Acl::READ).unwrap();
        let null_w = Rule::path_rdev("/dev/null", DevKind::Char, 1, 3, Acl::WRITE).unwrap();
        let rules = [tun(), Rule::DenyAll, null_r, null_w];
        let eff = DeviceRule::effective(&rules);
        let lines: Vec<_> = eff.iter().map(ToString::to_string).collect();
        assert_eq!(lines, ["c 1:3 rw"]);
    }

    fn bytes(d: &devcg::RawDecision) -> Vec<u8> {
        let mut v = vec![0u8; 1];
        // SAFETY: reading the bytes of a plain-old-data struct with no padding.
        v.extend_from_slice(unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(d).cast::<u8>(), devcg::RawDecision::SIZE)
        });
        v
    }

    #[test]
    fn decisions_decode_from_unaligned_bytes() {
        let raw = devcg::RawDecision {
            ts_ns: 7,
            cgroup_id: 42,
            tgid: 1234,
            major: 10,
            minor: 200,
            access: devcg::ACC_READ | devcg::ACC_WRITE,
            dev_type: DEV_CHAR,
            allowed: 0,
            matched: Matched::NONE,
            _pad: 0,
        };
        let b = bytes(&raw);
        let d = Decision::decode(&b[1..]).unwrap();
        assert_eq!(
            d,
            Decision {
                ts_ns: 7,
                cgroup_id: 42,
                tgid: 1234,
                dev: DecisionDev::Char,
                major: 10,
                minor: 200,
                access: Acl::RW,
                allowed: false,
                matched: None,
            }
        );
        assert_eq!(Decision::decode(&b[1..b.len() - 1]), None);
        let mut bad = raw;
        bad.matched = 9;
        assert_eq!(Decision::decode(&bytes(&bad)[1..]), None);
        let mut ok = raw;
        ok.allowed = 1;
        ok.matched = Matched::MAJOR;
        ok.dev_type = DEV_BLOCK;
        let d = Decision::decode(&bytes(&ok)[1..]).unwrap();
        assert_eq!(
            (d.allowed, d.matched, d.dev),
            (true, Some(MatchedEntry::Major), DecisionDev::Block)
        );
    }
}
