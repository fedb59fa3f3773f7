//! The host reads behind the resource claims: what a record's path names (stat, never open),
//! a pty master's index, the unix sockets bound to a path, every fd on given files, and the
//! device node of a host device by its bus address.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use vmaudit_core::{
    fd::{DevNum, FileKind},
    view::{FdRef, FileId, Holder},
};

use crate::paths::Roots;

/// What `path` names, following links, without opening it (a FIFO or a device would block or
/// act), without triggering an automount, and from the attributes the kernel has cached (a
/// network filesystem is not asked).
pub fn stat(path: &Path) -> Result<FileId, String> {
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path", path.display()));
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{} holds a NUL byte", path.display()))?;
    let mut buf = std::mem::MaybeUninit::<libc::statx>::zeroed();
    let flags = libc::AT_NO_AUTOMOUNT | libc::AT_STATX_DONT_SYNC;
    let mask = libc::STATX_TYPE | libc::STATX_INO;
    // SAFETY: `c` is a NUL-terminated path that outlives the call and `buf` is a statx buffer
    // the kernel fills.
    let rc = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), flags, mask, buf.as_mut_ptr()) };
    if rc != 0 {
        return Err(format!(
            "{}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: statx returned 0: it filled the buffer (zeroed before, so every byte is set).
    let st = unsafe { buf.assume_init() };
    let kind = match u32::from(st.stx_mode) & libc::S_IFMT {
        libc::S_IFCHR => FileKind::Char,
        libc::S_IFBLK => FileKind::Block,
        libc::S_IFREG => FileKind::Regular,
        libc::S_IFDIR => FileKind::Dir,
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        _ => FileKind::Unknown,
    };
    Ok(FileId {
        kind,
        dev: DevNum::new(st.stx_dev_major, st.stx_dev_minor),
        ino: st.stx_ino,
        rdev: matches!(kind, FileKind::Char | FileKind::Block)
            .then(|| DevNum::new(st.stx_rdev_major, st.stx_rdev_minor)),
    })
}

/// `tty-index:` of a pty master's fdinfo.
pub fn tty_index(fdinfo: &str) -> Option<u32> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("tty-index:")?.trim().parse().ok())
}

/// The inodes of the sockets bound to `path` in a `/proc/net/unix` table (`Num RefCount
/// Protocol Flags Type St Inode Path`). Parsed here: the procfs crate cuts a path at its first
/// blank and fails the whole table on a path that is not UTF-8.
pub fn unix_sockets_at(table: &str, path: &Path) -> Vec<u64> {
    let want = path.as_os_str().as_bytes();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut cols = l.splitn(8, ' ');
            let inode = cols.nth(6)?.parse().ok()?;
            (cols.next()?.as_bytes() == want).then_some(inode)
        })
        .collect()
}

/// Every fd of every process whose file is one of `files` (device, inode). Walked here: the
/// procfs crate's fd listing gives no stat of the open file.
pub fn holders(roots: &Roots, files: &[(DevNum, u64)]) -> Vec<Holder> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir(&roots.proc) else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(roots.fd_dir(pid)) else {
            continue;
        };
        for f in fds.flatten() {
            let Some(fd) = f.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            // stat through the magic link reaches the open file, and opens nothing.
            let Ok(m) = std::fs::metadata(f.path()) else {
                continue;
            };
            let file = (DevNum::from_raw(m.dev()), m.ino());
            if files.contains(&file) {
                let comm = std::fs::read_to_string(roots.pid_dir(pid).join("comm"))
                    .map(|c| c.trim().to_owned())
                    .unwrap_or_default();
                out.push(Holder {
                    at: FdRef::new(pid, fd),
                    file,
                    comm,
                });
            }
        }
    }
    out
}

/// The device node the emulator opens for a host device (see
/// [`vmaudit_core::view::KernelView::host_device`]), found in sysfs.
pub fn host_device(roots: &Roots, bus: &str, address: &str) -> Result<PathBuf, String> {
    // A name from a record, never a path of its own.
    if address.is_empty()
        || !address
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
        || address.starts_with('.')
    {
        return Err(format!("{bus} device {address:?} is not an address"));
    }
    let devices = roots.sys.join("bus").join(bus).join("devices");
    match bus {
        "pci" | "mdev" => {
            let link = devices.join(address).join("iommu_group");
            let group =
                std::fs::read_link(&link).map_err(|e| format!("{}: {e}", link.display()))?;
            let n = group
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| format!("{}: not an IOMMU group", link.display()))?;
            Ok(PathBuf::from("/dev/vfio").join(n))
        }
        "usb" => {
            let (b, d) = address
                .split_once('.')
                .ok_or_else(|| format!("usb device {address} is not BUS.DEVICE"))?;
            Ok(PathBuf::from("/dev/bus/usb").join(b).join(d))
        }
        "scsi" => {
            let hbtl = address
                .strip_prefix("scsi_host")
                .ok_or_else(|| format!("scsi device {address} names no scsi_host adapter"))?;
            let dir = devices.join(hbtl).join("scsi_generic");
            let sg = std::fs::read_dir(&dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?
                .flatten()
                .find_map(|e| e.file_name().to_str().map(str::to_owned))
                .ok_or_else(|| format!("{}: no sg device", dir.display()))?;
            Ok(PathBuf::from("/dev").join(sg))
        }
        _ => Err(format!("bus {bus} names no device node")),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::{fs::MetadataExt as _, net::UnixListener};

    use super::*;

    #[test]
    fn a_fifo_is_stated_without_blocking_and_a_missing_path_says_why() {
        let dir = std::env::temp_dir().join(format!("vmaudit-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let id = stat(&fifo).unwrap();
        let meta = std::fs::metadata(&fifo).unwrap();
        assert_eq!(
            (id.kind, id.ino, id.dev),
            (FileKind::Fifo, meta.ino(), DevNum::from_raw(meta.dev()))
        );
        let null = stat(Path::new("/dev/null")).unwrap();
        assert_eq!(
            (null.kind, null.rdev),
            (FileKind::Char, Some(DevNum::new(1, 3)))
        );
        let e = stat(&dir.join("nothing")).unwrap_err();
        assert!(e.contains("nothing") && e.contains("No such file"), "{e}");
        assert!(stat(Path::new("relative")).is_err());
        // A bound socket is found in /proc/net/unix by its path.
        let sock = dir.join("s.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let table = std::fs::read_to_string("/proc/net/unix").unwrap();
        let inodes = unix_sockets_at(&table, &sock);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
        let m = std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap();
        assert_eq!(inodes, vec![m.ino()]);
        // Every fd on it is found, this process's among them.
        let found = holders(&Roots::default(), &[(DevNum::from_raw(m.dev()), m.ino())]);
        assert!(
            found
                .iter()
                .any(|h| h.at == FdRef::new(std::process::id(), fd)),
            "{found:?}"
        );
        drop(l);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fdinfo_and_addresses_are_read_strictly() {
        assert_eq!(tty_index("pos:\t0\nflags:\t02\ntty-index:\t7\n"), Some(7));
        assert_eq!(tty_index("pos:\t0\n"), None);
        let roots = Roots::default();
        for bad in ["", "../../etc", "0000:00/1f.0", ".."] {
            assert!(host_device(&roots, "pci", bad).is_err(), "{bad}");
        }
        assert_eq!(
            host_device(&roots, "usb", "001.004").unwrap(),
            PathBuf::from("/dev/bus/usb/001/004")
        );
        assert!(host_device(&roots, "scsi_host", "naa.1").is_err());
    }
}
