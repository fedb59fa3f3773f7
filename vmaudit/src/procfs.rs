//! Fd identities read from /proc: what `/proc/PID/fd/N` points at, its device numbers, inode,
//! flags, and for tun/tap and macvtap the network interface.
//!
//! Used to seed a table when watching starts, to resync it after lost events, to resolve a new
//! fd's identity, and by `vmaudit fds`.
//!
//! The fd table is read here, not through the procfs crate: its `Process::fd` opens and
//! lstat()s each link and gives the link's own mode, while vmaudit needs the open file's stat
//! (device numbers, inode, mode), which one stat() through the magic link gives, and fdinfo's
//! `flags:` and `iff:`, which the crate does not read.

use std::{
    collections::{BTreeMap, HashMap},
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::Mutex,
};

use compact_str::CompactString;

use crate::paths::Roots;

pub use vmaudit_core::fd::{DevNum, FdIdentity, FileKind, O_CLOEXEC, Source};

/// A procfs-crate error as the `io::Error` the same read through `std::fs` gives: a process
/// or file that is not there is `NotFound` (ENOENT), a refused read `PermissionDenied`
/// (EACCES), text that does not parse `InvalidData`.
pub fn io_error(e: ::procfs::ProcError) -> io::Error {
    use ::procfs::ProcError;
    match e {
        ProcError::Io(e, _) => e,
        ProcError::NotFound(_) => io::Error::from_raw_os_error(libc::ENOENT),
        ProcError::PermissionDenied(_) => io::Error::from_raw_os_error(libc::EACCES),
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

/// An identity known only by the name a syscall used. An absolute name is stat'ed now, which
/// gives a device node's numbers (what matters for devices) though not the open file's own
/// state.
pub fn identity_from_syscall(path: Option<String>) -> FdIdentity {
    let meta = path
        .as_deref()
        .filter(|p| p.starts_with('/'))
        .and_then(|p| fs::metadata(p).ok());
    let kind = meta
        .as_ref()
        .map_or(FileKind::Unknown, |m| FileKind::of(m.file_type(), ""));
    FdIdentity {
        path: path.map_or_else(|| "?".into(), CompactString::from),
        kind,
        rdev: meta
            .as_ref()
            .filter(|_| matches!(kind, FileKind::Char | FileKind::Block))
            .map(|m| DevNum::from_raw(m.rdev())),
        dev: meta.as_ref().map(|m| DevNum::from_raw(m.dev())),
        ino: meta.as_ref().map(|m| m.ino()),
        flags: None,
        mode: None,
        ofd: None,
        iface: None,
        source: Source::Syscall,
    }
}

/// The parts of `/proc/PID/fdinfo/N` vmaudit uses.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FdInfo {
    pub flags: Option<u32>,
    pub iff: Option<String>,
}

/// Parses fdinfo text: `flags:\t0100002` (octal), `iff:\ttap0` (tun/tap).
pub fn parse_fdinfo(text: &str) -> FdInfo {
    let mut info = FdInfo::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "flags" => info.flags = u32::from_str_radix(value, 8).ok(),
            "iff" if !value.is_empty() => info.iff = Some(value.to_owned()),
            _ => {}
        }
    }
    info
}

/// Reads fd identities from a /proc (and /sys) tree.
#[derive(Debug, Default)]
pub struct ProcFs {
    pub roots: Roots,
    /// The interface (or none) of each device number whose major is statically assigned, so
    /// that naming the millionth /dev/null costs no read of /sys.
    ifaces: Mutex<HashMap<DevNum, Option<String>>>,
    /// The kernel programs give a tun fd's interface (or say it has none): fdinfo, read later,
    /// may describe another file at that number, so it is not read for them.
    pub tun_from_kernel: bool,
}

impl Clone for ProcFs {
    fn clone(&self) -> Self {
        Self {
            tun_from_kernel: self.tun_from_kernel,
            ..Self::new(self.roots.clone())
        }
    }
}

/// Char majors the kernel hands out dynamically (macvtap's among them): their numbers are
/// reused by other devices, so what they name is never cached.
fn dynamic_major(major: u32) -> bool {
    (234..=254).contains(&major) || (384..=511).contains(&major)
}

impl ProcFs {
    pub fn new(roots: Roots) -> Self {
        Self {
            roots,
            ifaces: Mutex::default(),
            tun_from_kernel: false,
        }
    }

    /// Fills in, for people, what the kernel program does not give: a path for files that are
    /// not devices (read from the fd's link while it still holds the same inode, else `?`),
    /// an anonymous inode's type (`anon_inode:[eventfd]`), a device's interface (tun/tap from
    /// fdinfo, macvtap from /sys).
    pub fn name(&self, pid: u32, fd: i32, id: &mut FdIdentity) {
        if id.path.is_empty() {
            let link = self.roots.fd_link(pid, fd);
            let same = fs::metadata(&link).is_ok_and(|m| Some(m.ino()) == id.ino);
            id.path = match fs::read_link(&link) {
                Ok(t) if same || id.kind == FileKind::Anon => t.to_string_lossy().into(),
                _ => "?".into(),
            };
        }
        if id.iface.is_some() || id.kind != FileKind::Char {
            return;
        }
        let Some(rdev) = id.rdev else { return };
        id.iface = if rdev == vmaudit_core::fd::TUN {
            if self.tun_from_kernel && id.source == Source::Kernel {
                return;
            }
            fs::read_to_string(self.roots.fdinfo(pid, fd))
                .ok()
                .and_then(|t| parse_fdinfo(&t).iff)
        } else if dynamic_major(rdev.major) {
            self.macvtap_iface(rdev)
        } else {
            let mut cache = self.ifaces.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .entry(rdev)
                .or_insert_with(|| self.macvtap_iface(rdev))
                .clone()
        };
    }

    /// Whether a process with this pid exists.
    pub fn exists(&self, pid: u32) -> bool {
        self.roots.pid_dir(pid).exists()
    }

    /// The executable process `pid` runs (`/proc/PID/exe`).
    pub fn exe(&self, pid: u32) -> Option<std::path::PathBuf> {
        fs::read_link(self.roots.pid_dir(pid).join("exe")).ok()
    }

    /// The processes running one of `exes`, sorted.
    pub fn running(&self, exes: &[std::path::PathBuf]) -> Vec<u32> {
        let Ok(dir) = fs::read_dir(&self.roots.proc) else {
            return Vec::new();
        };
        let mut out: Vec<u32> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|pid| self.exe(*pid).is_some_and(|x| exes.contains(&x)))
            .collect();
        out.sort_unstable();
        out
    }

    /// The fd numbers a process holds now.
    pub fn fd_numbers(&self, pid: u32) -> io::Result<Vec<i32>> {
        let mut fds = Vec::new();
        for entry in fs::read_dir(self.roots.fd_dir(pid))? {
            let entry = entry?;
            if let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                fds.push(fd);
            }
        }
        fds.sort_unstable();
        Ok(fds)
    }

    /// The identity of one fd, read now.
    pub fn identity(&self, pid: u32, fd: i32) -> io::Result<FdIdentity> {
        let link = self.roots.fd_link(pid, fd);
        let target = fs::read_link(&link)?;
        let path = target.to_string_lossy().into_owned();
        // stat() through the magic link reaches the open file itself, whatever its name.
        let meta = fs::metadata(&link)?;
        let kind = FileKind::of(meta.file_type(), &path);
        let rdev =
            matches!(kind, FileKind::Char | FileKind::Block).then(|| DevNum::from_raw(meta.rdev()));
        // fdinfo can vanish between the two reads if the fd is closed; the identity stands.
        let info = fs::read_to_string(self.roots.fdinfo(pid, fd))
            .map(|t| parse_fdinfo(&t))
            .unwrap_or_default();
        let iface = info.iff.clone().or_else(|| match (kind, rdev) {
            (FileKind::Char, Some(r)) => self.macvtap_iface(r),
            _ => None,
        });
        Ok(FdIdentity {
            path: path.into(),
            kind,
            rdev,
            dev: Some(DevNum::from_raw(meta.dev())),
            ino: Some(meta.ino()),
            flags: info.flags,
            mode: Some(meta.mode()),
            ofd: None,
            iface,
            source: Source::Proc,
        })
    }

    /// A macvtap (or ipvtap) node `/dev/tapN` belongs to the interface whose sysfs directory
    /// holds `tapN`: `/sys/dev/char/MAJ:MIN` links to `.../net/<iface>/tapN`.
    fn macvtap_iface(&self, rdev: DevNum) -> Option<String> {
        let target = fs::read_link(self.roots.sys_dev_char(rdev.major, rdev.minor)).ok()?;
        iface_from_sys_dev_link(&target)
    }

    /// The whole table of a process, read now.
    pub fn snapshot(&self, pid: u32) -> io::Result<BTreeMap<i32, FdIdentity>> {
        let mut table = BTreeMap::new();
        for fd in self.fd_numbers(pid)? {
            match self.identity(pid, fd) {
                Ok(id) => {
                    table.insert(fd, id);
                }
                // Closed between listing and reading: not in the table.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(table)
    }
}

/// `.../devices/virtual/net/mvt0/macvtap/tap5` → `mvt0` (ipvtap has `ipvtap/` there; older
/// kernels nothing); anything that is not a `tapN` under `net/<iface>` (every ordinary
/// device) → None.
pub fn iface_from_sys_dev_link(target: &Path) -> Option<String> {
    let parts: Vec<&str> = target.iter().filter_map(|p| p.to_str()).collect();
    if !parts.last()?.starts_with("tap") {
        return None;
    }
    let net = parts.iter().rposition(|p| *p == "net")?;
    let iface = parts.get(net + 1)?;
    (net + 2 < parts.len()).then(|| (*iface).to_owned())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn crate_errors_read_as_std_errors() {
        let gone = ::procfs::process::Process::new_with_root("/proc/4294967295".into());
        let e = io_error(gone.unwrap_err());
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        let denied = io_error(::procfs::ProcError::PermissionDenied(None));
        assert_eq!(denied.kind(), io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn fdinfo_flags_are_octal_and_iff_is_read() {
        let info = parse_fdinfo("pos:\t0\nflags:\t02004002\nmnt_id:\t25\nino:\t5\niff:\ttap0\n");
        assert_eq!(info.flags, Some(0o2004002));
        assert!(info.flags.unwrap() & O_CLOEXEC != 0);
        assert_eq!(info.iff.as_deref(), Some("tap0"));
        assert_eq!(parse_fdinfo("flags:\tzz\n"), FdInfo::default());
    }

    #[test]
    fn macvtap_link_names_its_interface() {
        let t = Path::new("../../devices/virtual/net/mvt0/macvtap/tap7");
        assert_eq!(iface_from_sys_dev_link(t).as_deref(), Some("mvt0"));
        let old = Path::new("../../devices/virtual/net/mvt1/tap8");
        assert_eq!(iface_from_sys_dev_link(old).as_deref(), Some("mvt1"));
        let bare = Path::new("../../devices/virtual/net/tap9");
        assert_eq!(iface_from_sys_dev_link(bare), None);
        let null = Path::new("../../devices/virtual/mem/null");
        assert_eq!(iface_from_sys_dev_link(null), None);
    }

    /// A fixture /proc tree: fd links to real files in a temp dir, fdinfo text beside them.
    #[test]
    fn snapshot_from_fixture_tree() {
        let dir = tempdir();
        let proc = dir.join("proc");
        let fd_dir = proc.join("42").join("fd");
        let info_dir = proc.join("42").join("fdinfo");
        fs::create_dir_all(&fd_dir).unwrap();
        fs::create_dir_all(&info_dir).unwrap();
        let file = dir.join("data");
        fs::write(&file, b"x").unwrap();
        symlink(&file, fd_dir.join("3")).unwrap();
        symlink("/dev/null", fd_dir.join("7")).unwrap();
        fs::write(info_dir.join("3"), "pos:\t0\nflags:\t02100002\n").unwrap();
        fs::write(info_dir.join("7"), "pos:\t0\nflags:\t0100001\n").unwrap();
        // A dangling entry, as when an fd closes between readdir and readlink.
        symlink(dir.join("gone"), fd_dir.join("9")).unwrap();

        let p = ProcFs::new(Roots {
            proc,
            sys: dir.join("sys"),
        });
        assert!(p.exists(42));
        assert!(!p.exists(43));
        let snap = p.snapshot(42).unwrap();
        assert_eq!(snap.keys().copied().collect::<Vec<_>>(), vec![3, 7]);
        let data = &snap[&3];
        assert_eq!(data.kind, FileKind::Regular);
        assert_eq!(data.path, file.to_string_lossy());
        assert!(data.flags.unwrap() & O_CLOEXEC != 0);
        let null = &snap[&7];
        assert_eq!(null.kind, FileKind::Char);
        assert_eq!(null.rdev, Some(DevNum { major: 1, minor: 3 }));
        assert_eq!(null.rdev.unwrap().to_string(), "1:3");
        assert_eq!(null.source, Source::Proc);
        fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "vmaudit-procfs-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }
}
