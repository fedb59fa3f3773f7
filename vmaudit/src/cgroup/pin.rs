//! The device program's link pinned in bpffs, so that a VM's device ACL outlives the vmaudit
//! that set it: a bpf link belongs to the process holding its fd, and the program would detach
//! the moment that process died, leaving whatever runs in the cgroup unconfined. Pinned, the
//! link is the kernel's until the pin is removed (by the run's own teardown, or by the next run
//! of the VM, which removes what a dead run left). cgroup v1 needs nothing of the kind: the
//! devices controller's lists are the cgroup's own.

use std::{
    fs,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use super::CgroupError;
use crate::{mountinfo, paths};

/// bpffs: where it is mounted, mounting it at `/sys/fs/bpf` when it is nowhere.
pub fn bpffs() -> Result<PathBuf, CgroupError> {
    let mounts = mountinfo::read_lenient(Path::new(paths::SELF_MOUNTINFO)).map_err(|source| {
        CgroupError::Read {
            path: paths::SELF_MOUNTINFO.into(),
            source,
        }
    })?;
    let default = Path::new(paths::BPFFS_DEFAULT);
    let mounted: Vec<&Path> = mountinfo::mount_points(&mounts, "bpf").collect();
    if let Some(m) = mounted.iter().find(|m| **m == default).or(mounted.first()) {
        return Ok(m.to_path_buf());
    }
    nix::mount::mount(
        Some("bpf"),
        default,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| CgroupError::Mount {
        path: default.to_owned(),
        source: errno.into(),
    })?;
    log::debug!("mounted bpffs at {}", default.display());
    Ok(default.to_owned())
}

/// Where the device program's link of VM `name` is pinned.
pub fn vm_pin(bpffs: &Path, name: &str) -> PathBuf {
    bpffs.join(paths::BPFFS_DIR).join(name).join("devcg-link")
}

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_CGROUP_DEVICE: u32 = 6;

/// `union bpf_attr`, as large as any command here reads; zeroed beyond what each sets.
#[repr(C)]
#[derive(Default)]
struct Attr {
    a: u32,
    b: u32,
    c: u32,
    d: u32,
    rest: [u64; 14],
}
const _: () = assert!(std::mem::size_of::<Attr>() == 128);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, zero-padded bpf_attr of the size passed; the kernel reads
    // (and for some commands writes) only within it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Attaches `prog` to the cgroup directory `cgroup` with a bpf link and pins the link at
/// `pin` (its directory is made). Returns the link's fd.
pub fn attach_pinned(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    pin: &Path,
) -> Result<OwnedFd, CgroupError> {
    let err = |source| CgroupError::Pin {
        path: pin.to_owned(),
        source,
    };
    let mut attr = Attr {
        a: prog.as_raw_fd() as u32,
        b: cgroup.as_raw_fd() as u32,
        c: BPF_CGROUP_DEVICE,
        ..Attr::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr).map_err(err)?;
    // SAFETY: BPF_LINK_CREATE returned a new fd that nothing else owns.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let c_path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).map_err(|_| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a NUL in the pin path",
        ))
    })?;
    let ptr = c_path.as_ptr() as u64;
    // Another VM's teardown may remove the (then empty) directory between the two: try again.
    for _ in 0..3 {
        if let Some(dir) = pin.parent() {
            fs::create_dir_all(dir).map_err(err)?;
        }
        let mut attr = Attr {
            a: ptr as u32,
            b: (ptr >> 32) as u32,
            c: link.as_fd().as_raw_fd() as u32,
            ..Attr::default()
        };
        match bpf(BPF_OBJ_PIN, &mut attr) {
            Ok(_) => return Ok(link),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(err(e)),
        }
    }
    Err(err(std::io::Error::from(std::io::ErrorKind::NotFound)))
}

/// Removes a pin (and the directories above it up to bpffs, those left empty); its link (and
/// the program attached by it) goes once no fd holds it. A pin already gone is not an error.
pub fn unpin(pin: &Path) -> Result<bool, CgroupError> {
    match fs::remove_file(pin) {
        Ok(()) => {
            // The VM's directory, then vmaudit's: each stays if another pin is in it.
            for dir in pin.ancestors().skip(1).take(2) {
                if fs::remove_dir(dir).is_err() {
                    break;
                }
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CgroupError::Pin {
            path: pin.to_owned(),
            source,
        }),
    }
}
