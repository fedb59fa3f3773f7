//! What the kernel says about fds: device numbers, the identity of an open file, and one
//! change to a process's fd table.

use std::{fmt, os::unix::fs::FileTypeExt as _};

use compact_str::CompactString;
use serde::{Serialize, Serializer};

/// A device number, printed `MAJ:MIN` in decimal (as /proc and the journal write it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

/// `/dev/net/tun`: opened by the manager and passed, never by the emulator itself.
pub const TUN: DevNum = DevNum {
    major: 10,
    minor: 200,
};
/// `/dev/vhost-net`: as [`TUN`].
pub const VHOST_NET: DevNum = DevNum {
    major: 10,
    minor: 238,
};

impl DevNum {
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// From a `dev_t` as stat() gives it.
    pub fn from_raw(dev: u64) -> Self {
        Self {
            major: libc::major(dev),
            minor: libc::minor(dev),
        }
    }

    /// libvirt's `rdev` value: `%02X:%02X` (upper-case hex, at least two digits).
    pub fn libvirt_hex(self) -> String {
        format!("{:02X}:{:02X}", self.major, self.minor)
    }

    /// Parses libvirt's `%02X:%02X` (`0A:C8` is 10:200).
    pub fn parse_libvirt_hex(s: &str) -> Option<Self> {
        Self::parse_with(s, |p| {
            (!p.is_empty() && p.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(p, 16).ok())
                .flatten()
        })
    }

    /// Parses `MAJ:MIN` as a person writes it: decimal (`10:200`, as /proc writes it) unless a
    /// part has a hex letter or `0x` (`0A:C8`, as libvirt writes it).
    pub fn parse_either(s: &str) -> Option<Self> {
        let hex = s.split(':').any(|p| {
            p.starts_with("0x") || p.starts_with("0X") || p.bytes().any(|b| b.is_ascii_alphabetic())
        });
        Self::parse_with(s, |p| {
            let p = p
                .strip_prefix("0x")
                .or_else(|| p.strip_prefix("0X"))
                .unwrap_or(p);
            (!p.is_empty() && p.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(p, if hex { 16 } else { 10 }).ok())
                .flatten()
        })
    }

    fn parse_with(s: &str, num: impl Fn(&str) -> Option<u32>) -> Option<Self> {
        let (maj, min) = s.split_once(':')?;
        Some(Self {
            major: num(maj)?,
            minor: num(min)?,
        })
    }
}

impl fmt::Display for DevNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl Serialize for DevNum {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What kind of file an fd refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    Char,
    Block,
    Regular,
    Dir,
    Fifo,
    Socket,
    Symlink,
    /// An anonymous inode (eventfd, epoll, pidfd, bpf objects, kvm-vm, ...).
    Anon,
    Unknown,
}

/// `S_IFMT` and the file types of an inode's mode.
const S_IFMT: u32 = 0o170000;

impl FileKind {
    pub const ALL: [Self; 9] = [
        Self::Char,
        Self::Block,
        Self::Regular,
        Self::Dir,
        Self::Fifo,
        Self::Socket,
        Self::Symlink,
        Self::Anon,
        Self::Unknown,
    ];

    /// The name serde gives it (a test holds them equal).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Char => "char",
            Self::Block => "block",
            Self::Regular => "regular",
            Self::Dir => "dir",
            Self::Fifo => "fifo",
            Self::Socket => "socket",
            Self::Symlink => "symlink",
            Self::Anon => "anon",
            Self::Unknown => "unknown",
        }
    }

    /// The kind of an inode from its mode, as the kernel has it (an anonymous inode has no
    /// type bits).
    pub fn of_mode(mode: u32) -> Self {
        match mode & S_IFMT {
            0o020000 => Self::Char,
            0o060000 => Self::Block,
            0o100000 => Self::Regular,
            0o040000 => Self::Dir,
            0o010000 => Self::Fifo,
            0o140000 => Self::Socket,
            0o120000 => Self::Symlink,
            0 => Self::Anon,
            _ => Self::Unknown,
        }
    }
}

impl FileKind {
    /// The kind of a file of type `ft` that /proc names `link` (`anon_inode:[...]`).
    pub fn of(ft: std::fs::FileType, link: &str) -> Self {
        if link.starts_with("anon_inode:") {
            Self::Anon
        } else if ft.is_char_device() {
            Self::Char
        } else if ft.is_block_device() {
            Self::Block
        } else if ft.is_file() {
            Self::Regular
        } else if ft.is_dir() {
            Self::Dir
        } else if ft.is_fifo() {
            Self::Fifo
        } else if ft.is_socket() {
            Self::Socket
        } else if ft.is_symlink() {
            Self::Symlink
        } else {
            Self::Unknown
        }
    }
}

/// How an identity was established.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Read from /proc/PID/fd while the fd was open.
    Proc,
    /// Copied from the fd it was duplicated from, or the parent's table at fork.
    Table,
    /// Only the name the syscall used: the fd was already closed or replaced when vmaudit
    /// looked, so /proc could not be trusted for it.
    Syscall,
    /// Read by the kernel programs from the task's fd table at the syscall's exit (or by the
    /// task_file iterator): the file itself, not a name.
    Kernel,
}

impl Source {
    pub const ALL: [Self; 4] = [Self::Proc, Self::Table, Self::Syscall, Self::Kernel];

    /// The name serde gives it (a test holds them equal).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Proc => "proc",
            Self::Table => "table",
            Self::Syscall => "syscall",
            Self::Kernel => "kernel",
        }
    }
}

/// The identity of one fd.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FdIdentity {
    /// What /proc/PID/fd/N points at (`/dev/net/tun`, `socket:[123]`, `anon_inode:[eventfd]`),
    /// or the syscall's name for the file when [`Source::Syscall`].
    pub path: CompactString,
    pub kind: FileKind,
    /// Device number of a character or block device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdev: Option<DevNum>,
    /// Device of the filesystem holding the inode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev: Option<DevNum>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ino: Option<u64>,
    /// Open flags: `flags:` from fdinfo (octal in /proc; with O_CLOEXEC), or the kernel's
    /// `f_flags` (without it: close-on-exec belongs to the fd, not the file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flags: Option<u32>,
    /// The inode's mode (file type and permission bits), from the kernel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// The open file description's id from the kernel (the `struct file`'s address hashed with
    /// a per-boot secret): equal in two fds, of one process or two, exactly when they share
    /// the open file description (what kcmp KCMP_FILE says).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ofd: Option<u64>,
    /// The network interface of a tun/tap fd (`iff:` in fdinfo) or of a macvtap device node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iface: Option<String>,
    pub source: Source,
}

impl FdIdentity {
    /// An identity with only a name and a kind, every kernel fact unknown.
    pub fn named(path: impl Into<CompactString>, kind: FileKind, source: Source) -> Self {
        Self {
            path: path.into(),
            kind,
            rdev: None,
            dev: None,
            ino: None,
            flags: None,
            mode: None,
            ofd: None,
            iface: None,
            source,
        }
    }

    /// Whether both are the same open file description, when both ids are known.
    pub fn same_ofd(&self, other: &FdIdentity) -> Option<bool> {
        Some(self.ofd? == other.ofd?)
    }

    /// Whether the file is the same inode as `other` (identity across resyncs).
    pub fn same_inode(&self, other: &FdIdentity) -> bool {
        if let Some(same) = self.same_ofd(other) {
            return same;
        }
        match (self.ino, other.ino) {
            (Some(a), Some(b)) => a == b && self.dev == other.dev,
            _ => self.path == other.path,
        }
    }

    /// A network device only a manager opens and passes: tun/tap, vhost-net, macvtap.
    pub fn is_net_device(&self) -> bool {
        is_net_device(&self.path, self.rdev)
    }
}

/// Whether a file named `path` with device number `rdev` is a network device a manager opens
/// and passes (tun/tap, vhost-net, a macvtap `/dev/tapN`).
pub fn is_net_device(path: &str, rdev: Option<DevNum>) -> bool {
    rdev == Some(TUN) || rdev == Some(VHOST_NET) || path.starts_with("/dev/tap")
}

/// `O_CLOEXEC` as fdinfo shows it in `flags:`.
pub const O_CLOEXEC: u32 = libc::O_CLOEXEC as u32;

/// What happened to an fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Present when watching started.
    Seed,
    Open,
    Dup,
    RecvFd,
    PidfdGetfd,
    /// Another fd-creating syscall (socket, pipe, eventfd, memfd, kvm ioctls, ...).
    New,
    /// Put into the table by a seccomp supervisor (SECCOMP_IOCTL_NOTIF_ADDFD).
    Addfd,
    /// Inherited by a followed child at fork.
    Inherit,
    Close,
    /// Closed because dup2/dup3 put another file at its number.
    Replaced,
    CloseRange,
    /// Closed by exec because it was close-on-exec.
    ExecCloexec,
    /// Released because the process exited.
    Exit,
    CloexecOn,
    CloexecOff,
    /// Sent to another process through SCM_RIGHTS (still held here too).
    SendFd,
    /// Found in /proc but not in the table after lost events.
    ResyncAdd,
    /// In the table but not in /proc after lost events.
    ResyncRemove,
}

impl Op {
    /// The name `vmaudit watch` and the journal's evidence use (`recv_fd`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Seed => "seed",
            Self::Open => "open",
            Self::Dup => "dup",
            Self::RecvFd => "recv_fd",
            Self::PidfdGetfd => "pidfd_getfd",
            Self::New => "new",
            Self::Addfd => "addfd",
            Self::Inherit => "inherit",
            Self::Close => "close",
            Self::Replaced => "replaced",
            Self::CloseRange => "close_range",
            Self::ExecCloexec => "exec_cloexec",
            Self::Exit => "exit",
            Self::CloexecOn => "cloexec_on",
            Self::CloexecOff => "cloexec_off",
            Self::SendFd => "send_fd",
            Self::ResyncAdd => "resync_add",
            Self::ResyncRemove => "resync_remove",
        }
    }

    /// The fd left the table.
    pub const fn is_release(self) -> bool {
        matches!(
            self,
            Self::Close
                | Self::CloseRange
                | Self::Replaced
                | Self::ExecCloexec
                | Self::Exit
                | Self::ResyncRemove
        )
    }

    /// The fd entered the table.
    pub const fn is_gain(self) -> bool {
        matches!(
            self,
            Self::Seed
                | Self::Open
                | Self::Dup
                | Self::RecvFd
                | Self::PidfdGetfd
                | Self::New
                | Self::Addfd
                | Self::Inherit
                | Self::ResyncAdd
        )
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The outcome of an fd syscall: done, or refused with an errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed(nix::errno::Errno),
}

impl Outcome {
    /// How a success prints.
    pub const OK: &str = "ok";

    /// From a syscall's errno (0: success).
    pub fn from_errno(errno: i32) -> Self {
        if errno == 0 {
            Self::Ok
        } else {
            Self::Failed(nix::errno::Errno::from_raw(errno))
        }
    }

    pub const fn is_ok(self) -> bool {
        matches!(self, Self::Ok)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ok => f.write_str(Self::OK),
            Self::Failed(e) => write!(f, "{e:?}"),
        }
    }
}

impl Serialize for Outcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One line of `vmaudit watch` output: one fd gained, lost or changed, or a failed attempt.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FdRecord {
    #[serde(rename = "type")]
    pub ty: &'static str,
    /// Kernel CLOCK_MONOTONIC nanoseconds of the event (0 for the seed).
    pub ts: u64,
    pub pid: u32,
    pub tid: u32,
    pub op: Op,
    pub syscall: &'static str,
    pub fd: Option<i32>,
    /// `ok`, or the errno name of a failed attempt.
    pub result: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloexec: Option<bool>,
    /// The fd this one duplicates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_fd: Option<i32>,
    #[serde(flatten)]
    pub file: Option<FdIdentity>,
}

impl FdRecord {
    /// Appends the record as one JSON object: the same bytes as `serde_json::to_writer` gives
    /// (a test holds them equal), written without serde's generic map machinery, because `vmaudit
    /// watch` writes one per fd event and serde's path was half of its CPU time per event. Every
    /// field is destructured, so a new field does not compile until it is written here too.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let FdRecord {
            ty,
            ts,
            pid,
            tid,
            op,
            syscall,
            fd,
            result,
            cloexec,
            from_fd,
            file,
        } = self;
        out.extend_from_slice(b"{\"type\":");
        json::name(out, ty);
        out.extend_from_slice(b",\"ts\":");
        json::int(out, *ts);
        out.extend_from_slice(b",\"pid\":");
        json::int(out, *pid);
        out.extend_from_slice(b",\"tid\":");
        json::int(out, *tid);
        out.extend_from_slice(b",\"op\":");
        json::name(out, op.name());
        out.extend_from_slice(b",\"syscall\":");
        json::name(out, syscall);
        out.extend_from_slice(b",\"fd\":");
        match fd {
            Some(fd) => json::int(out, *fd),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"result\":");
        match result {
            Outcome::Ok => json::name(out, Outcome::OK),
            Outcome::Failed(_) => json::value(out, result),
        }
        if let Some(c) = cloexec {
            out.extend_from_slice(b",\"cloexec\":");
            out.extend_from_slice(if *c { b"true" } else { b"false" });
        }
        if let Some(f) = from_fd {
            out.extend_from_slice(b",\"from_fd\":");
            json::int(out, *f);
        }
        if let Some(id) = file {
            id.write_json_fields(out);
        }
        out.push(b'}');
    }
}

impl FdIdentity {
    /// Appends the fields as `,"key":value` pairs, as `#[serde(flatten)]` puts them in a record.
    fn write_json_fields(&self, out: &mut Vec<u8>) {
        let FdIdentity {
            path,
            kind,
            rdev,
            dev,
            ino,
            flags,
            mode,
            ofd,
            iface,
            source,
        } = self;
        out.extend_from_slice(b",\"path\":");
        json::str(out, path);
        out.extend_from_slice(b",\"kind\":");
        json::name(out, kind.name());
        if let Some(d) = rdev {
            out.extend_from_slice(b",\"rdev\":");
            json::dev(out, *d);
        }
        if let Some(d) = dev {
            out.extend_from_slice(b",\"dev\":");
            json::dev(out, *d);
        }
        if let Some(n) = ino {
            out.extend_from_slice(b",\"ino\":");
            json::int(out, *n);
        }
        if let Some(n) = flags {
            out.extend_from_slice(b",\"flags\":");
            json::int(out, *n);
        }
        if let Some(n) = mode {
            out.extend_from_slice(b",\"mode\":");
            json::int(out, *n);
        }
        if let Some(n) = ofd {
            out.extend_from_slice(b",\"ofd\":");
            json::int(out, *n);
        }
        if let Some(i) = iface {
            out.extend_from_slice(b",\"iface\":");
            json::str(out, i);
        }
        out.extend_from_slice(b",\"source\":");
        json::name(out, source.name());
    }
}

/// JSON values as serde_json writes them, into a byte buffer (writing to a `Vec` cannot fail).
mod json {
    use super::DevNum;

    /// A string as serde_json writes it: quoted as it is when nothing in it needs an escape
    /// (serde_json escapes only `"`, `\` and control characters), through serde otherwise.
    pub fn str(out: &mut Vec<u8>, s: &str) {
        if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            out.reserve(s.len() + 2);
            out.push(b'"');
            out.extend_from_slice(s.as_bytes());
            out.push(b'"');
        } else {
            value(out, s);
        }
    }

    /// One of our own names (a record type, op, syscall, kind, source): ASCII letters, digits
    /// and `_`, nothing to escape, so quoted as it is without looking.
    pub fn name(out: &mut Vec<u8>, s: &'static str) {
        debug_assert!(
            s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "{s}"
        );
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }

    pub fn int(out: &mut Vec<u8>, n: impl itoa::Integer) {
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }

    /// A device number as its `Serialize` writes it: the string `MAJ:MIN`.
    pub fn dev(out: &mut Vec<u8>, d: DevNum) {
        out.push(b'"');
        int(out, d.major);
        out.push(b':');
        int(out, d.minor);
        out.push(b'"');
    }

    /// Anything else (strings with their escapes, the unit enums' names, the outcome) through
    /// its own `Serialize`.
    pub fn value(out: &mut Vec<u8>, v: &(impl serde::Serialize + ?Sized)) {
        let _ = serde_json::to_writer(out, v);
    }
}

/// An fd in a table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FdEntry {
    pub fd: i32,
    #[serde(flatten)]
    pub id: FdIdentity,
    pub cloexec: bool,
    /// Kernel timestamp it arrived (0: present when watching started).
    pub since_ns: u64,
    pub via: Op,
}

/// The fd table of one process, as the tracker keeps it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcTable {
    /// Entries boxed: a B-tree moves its values on every insert and removal, and an fd event
    /// inserts or removes one (a pointer moves where a whole entry would).
    pub fds: std::collections::BTreeMap<i32, Box<FdEntry>>,
    pub exited: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct writer gives serde's bytes for every optional field present or absent, and
    /// for strings that need escaping.
    #[test]
    fn record_json_is_serdes() {
        let id = FdIdentity {
            path: "/dev/net/tun \"q\"\\\n\u{1}é".into(),
            kind: FileKind::Char,
            rdev: Some(TUN),
            dev: Some(DevNum::new(0, 6)),
            ino: Some(u64::MAX),
            flags: Some(0o2),
            mode: Some(0o20666),
            ofd: Some(7663531748538699226),
            iface: Some("tap0".into()),
            source: Source::Kernel,
        };
        // Nothing to escape, but not ASCII only: written as it is.
        let bare = FdIdentity::named("/tmp/é ~\u{7f}", FileKind::Fifo, Source::Table);
        let full = FdRecord {
            ty: "fd",
            ts: 13630389060217,
            pid: 1,
            tid: u32::MAX,
            op: Op::RecvFd,
            syscall: "recvmsg",
            fd: Some(-1),
            result: Outcome::Ok,
            cloexec: Some(true),
            from_fd: Some(3),
            file: Some(id),
        };
        let records = [
            full.clone(),
            FdRecord {
                op: Op::Close,
                fd: None,
                result: Outcome::Failed(nix::errno::Errno::EBADF),
                cloexec: Some(false),
                from_fd: None,
                file: Some(bare),
                ..full.clone()
            },
            FdRecord {
                cloexec: None,
                file: None,
                ..full.clone()
            },
        ];
        for r in records {
            let mut fast = Vec::new();
            r.write_json(&mut fast);
            assert_eq!(
                String::from_utf8(fast).unwrap(),
                serde_json::to_string(&r).unwrap()
            );
        }
    }

    #[test]
    fn rdev_forms() {
        let tun = DevNum::new(10, 200);
        assert_eq!(tun.libvirt_hex(), "0A:C8");
        assert_eq!(DevNum::new(1, 3).libvirt_hex(), "01:03");
        assert_eq!(DevNum::new(246, 257).libvirt_hex(), "F6:101");
        assert_eq!(DevNum::parse_libvirt_hex("0A:C8"), Some(tun));
        assert_eq!(DevNum::parse_libvirt_hex("zz:1"), None);
        assert_eq!(DevNum::parse_libvirt_hex("0A:"), None);
        assert_eq!(DevNum::parse_either("10:200"), Some(tun));
        assert_eq!(DevNum::parse_either("0A:C8"), Some(tun));
        assert_eq!(DevNum::parse_either("0xa:0xc8"), Some(tun));
        assert_eq!(DevNum::parse_either("10"), None);
        assert_eq!(DevNum::parse_either("+1:2"), None);
        assert_eq!(DevNum::parse_either("1:2:3"), None);
        assert_eq!(tun.to_string(), "10:200");
    }

    #[test]
    fn kind_and_source_names_match_serde() {
        for k in FileKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap().as_str(), Some(k.name()));
        }
        for s in Source::ALL {
            assert_eq!(serde_json::to_value(s).unwrap().as_str(), Some(s.name()));
        }
    }

    #[test]
    fn op_names_match_serde() {
        // Every variant: the watch output's writer uses these names for serde's. The match
        // does not compile when a variant is added, until it is listed in both.
        let _listed = |op: Op| match op {
            Op::Seed
            | Op::Open
            | Op::Dup
            | Op::RecvFd
            | Op::PidfdGetfd
            | Op::New
            | Op::Addfd
            | Op::Inherit
            | Op::Close
            | Op::Replaced
            | Op::CloseRange
            | Op::ExecCloexec
            | Op::Exit
            | Op::CloexecOn
            | Op::CloexecOff
            | Op::SendFd
            | Op::ResyncAdd
            | Op::ResyncRemove => {}
        };
        for op in [
            Op::Seed,
            Op::Open,
            Op::Dup,
            Op::RecvFd,
            Op::PidfdGetfd,
            Op::New,
            Op::Addfd,
            Op::Inherit,
            Op::Close,
            Op::Replaced,
            Op::CloseRange,
            Op::ExecCloexec,
            Op::Exit,
            Op::CloexecOn,
            Op::CloexecOff,
            Op::SendFd,
            Op::ResyncAdd,
            Op::ResyncRemove,
        ] {
            assert_eq!(
                serde_json::to_value(op).unwrap().as_str(),
                Some(op.name()),
                "{op:?}"
            );
        }
    }

    #[test]
    fn outcomes_print_errno_names() {
        assert_eq!(Outcome::from_errno(0).to_string(), "ok");
        assert_eq!(Outcome::from_errno(libc::EBADF).to_string(), "EBADF");
    }
}
