//! The rarer paths into and out of a table: io_uring, fd-returning ioctls, a table
//! shared through CLONE_FILES, a seccomp supervisor's ADDFD, and the mount, message-queue and
//! landlock syscalls that return fds.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _, OwnedFd, RawFd},
};

use io_uring::{IoUring, opcode, types};

use crate::{check, cpath, int};

/// Runs command `cmd`; the reply line.
pub fn run(cmd: &str, words: &[&str], child: &mut Option<(i32, RawFd)>) -> Result<String, String> {
    let fds: Vec<i64> = match cmd {
        "ioctl_fd" => vec![ioctl_fd(words)?],
        "pidfd_self" => {
            // SAFETY: pidfd_open with this process's pid and no flags.
            vec![check(unsafe {
                libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0)
            })?]
        }
        "kvm_device" => kvm_device()?,
        "uring_open" => vec![uring(UringOp::Open(cpath(words, 1)?))?],
        "uring_close" => vec![uring(UringOp::Close(int(words, 1)? as RawFd))?],
        "clone_files_open" => clone_files_open(&cpath(words, 1)?)?,
        "addfd" => addfd(&cpath(words, 1)?, child)?,
        "newfds" => newfds()?,
        other => return Err(format!("unknown command {other}")),
    };
    let words: Vec<String> = fds.iter().map(i64::to_string).collect();
    Ok(format!("ok {}", words.join(" ")))
}

/// `ioctl_fd FD REQ`: ioctl(FD, REQ (hex), 0), a request that returns a new fd.
fn ioctl_fd(words: &[&str]) -> Result<i64, String> {
    let fd = int(words, 1)?;
    let req = words.get(2).ok_or("missing request")?;
    let req = u64::from_str_radix(req.trim_start_matches("0x"), 16).map_err(|e| e.to_string())?;
    // SAFETY: an ioctl whose argument is unused (0); it reads or writes no memory of ours.
    check(unsafe { libc::syscall(libc::SYS_ioctl, fd, req, 0) })
}

/// /dev/kvm, a VM (KVM_CREATE_VM), and a VFIO pseudo-device of it (KVM_CREATE_DEVICE, whose fd
/// the kernel writes into the struct, not the return value): `kvm vm device`.
fn kvm_device() -> Result<Vec<i64>, String> {
    const KVM_CREATE_VM: u64 = 0xAE01;
    const KVM_CREATE_DEVICE: u64 = 0xC00C_AEE0;
    const KVM_DEV_TYPE_VFIO: u32 = 4;
    let path = CString::new("/dev/kvm").unwrap();
    // SAFETY: openat with a NUL-terminated path owned by this frame.
    let kvm = check(unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::O_RDWR,
            0,
        )
    })?;
    // SAFETY: KVM_CREATE_VM takes the machine type (0) by value.
    let vm = check(unsafe { libc::syscall(libc::SYS_ioctl, kvm, KVM_CREATE_VM, 0) })?;
    // struct kvm_create_device { u32 type; u32 fd; u32 flags; }
    let mut dev = [KVM_DEV_TYPE_VFIO, 0, 0];
    // SAFETY: the kernel reads and writes the 12-byte struct owned by this frame.
    check(unsafe { libc::syscall(libc::SYS_ioctl, vm, KVM_CREATE_DEVICE, dev.as_mut_ptr()) })?;
    Ok(vec![kvm, vm, i64::from(dev[1])])
}

enum UringOp {
    Open(CString),
    Close(RawFd),
}

/// One openat or close through a new io_uring (the ring's own fd is closed after).
fn uring(op: UringOp) -> Result<i64, String> {
    let mut ring = IoUring::new(4).map_err(|e| e.to_string())?;
    let entry = match &op {
        UringOp::Open(path) => opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .flags(libc::O_RDONLY | libc::O_CLOEXEC)
            .build(),
        UringOp::Close(fd) => opcode::Close::new(types::Fd(*fd)).build(),
    };
    // SAFETY: the path the entry points at lives in `op` until the completion is reaped below.
    unsafe { ring.submission().push(&entry) }.map_err(|e| e.to_string())?;
    ring.submit_and_wait(1).map_err(|e| e.to_string())?;
    let cqe = ring.completion().next().ok_or("no completion")?;
    if cqe.result() < 0 {
        return Err(std::io::Error::from_raw_os_error(-cqe.result()).to_string());
    }
    Ok(i64::from(cqe.result()))
}

/// A child cloned with CLONE_FILES (one table for both) opens `path` and exits: the fd is
/// now in this process's table though this process never opened it. `child fd`.
fn clone_files_open(path: &CString) -> Result<Vec<i64>, String> {
    // SAFETY: a fork-like clone (no CLONE_VM, no new stack) of a single-threaded process; the
    // child only makes raw syscalls and _exits with the fd it got.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_FILES | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match pid {
        0 => {
            // SAFETY: see above.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    libc::O_RDONLY,
                    0,
                )
            };
            // SAFETY: see above.
            unsafe { libc::_exit(fd.clamp(0, 255) as i32) }
        }
        p if p < 0 => Err(std::io::Error::last_os_error().to_string()),
        p => {
            let mut status = 0;
            // SAFETY: waits for our own child.
            unsafe { libc::waitpid(p as i32, &mut status, 0) };
            Ok(vec![p, i64::from(libc::WEXITSTATUS(status))])
        }
    }
}

/// A seccomp supervisor's ADDFD. A forked child (the target) installs a filter that sends its
/// getppid to a user notifier, hands the notifier's fd to this process (the supervisor) and
/// calls getppid; this process receives the notification, opens `path` and puts it into the
/// child's table (SECCOMP_IOCTL_NOTIF_ADDFD, close-on-exec), then answers. The child stays
/// until `reap`. `child fd-in-child`.
fn addfd(path: &CString, child: &mut Option<(i32, RawFd)>) -> Result<Vec<i64>, String> {
    const SECCOMP_IOCTL_NOTIF_RECV: u64 = 0xC050_2100;
    const SECCOMP_IOCTL_NOTIF_SEND: u64 = 0xC018_2101;
    const SECCOMP_IOCTL_NOTIF_ADDFD: u64 = 0x4018_2103;
    let (sup, target) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| e.to_string())?;
    let (release_r, release_w) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    // SAFETY: single-threaded program; the child makes raw syscalls only, then _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        drop(sup);
        drop(release_w);
        // SAFETY: see above.
        unsafe { addfd_target(target.as_raw_fd(), release_r.as_raw_fd()) }
    }
    if pid < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    drop(target);
    drop(release_r);
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = nix::sys::socket::recvmsg::<()>(
        sup.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::empty(),
    )
    .map_err(|e| e.to_string())?;
    let listener = msg
        .cmsgs()
        .map_err(|e| e.to_string())?
        .find_map(|c| match c {
            nix::sys::socket::ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
            _ => None,
        })
        .ok_or("the target sent no notifier fd")?;
    // SAFETY: the fd was just received and is owned here.
    let listener = unsafe { OwnedFd::from_raw_fd(listener) };
    // struct seccomp_notif (80 bytes, zeroed as the kernel requires): id at 0.
    let mut notif = [0u8; 80];
    // SAFETY: the kernel writes the 80-byte struct owned by this frame.
    check(unsafe {
        libc::syscall(
            libc::SYS_ioctl,
            listener.as_raw_fd(),
            SECCOMP_IOCTL_NOTIF_RECV,
            notif.as_mut_ptr(),
        )
    })?;
    let id = u64::from_ne_bytes(notif[..8].try_into().unwrap());
    let file = std::fs::File::open(path.to_str().unwrap()).map_err(|e| e.to_string())?;
    // struct seccomp_notif_addfd { u64 id; u32 flags; u32 srcfd; u32 newfd; u32 newfd_flags; }
    let mut add = [0u8; 24];
    add[..8].copy_from_slice(&id.to_ne_bytes());
    add[12..16].copy_from_slice(&(file.as_raw_fd() as u32).to_ne_bytes());
    add[20..24].copy_from_slice(&(libc::O_CLOEXEC as u32).to_ne_bytes());
    // SAFETY: the kernel reads the 24-byte struct owned by this frame.
    let got = check(unsafe {
        libc::syscall(
            libc::SYS_ioctl,
            listener.as_raw_fd(),
            SECCOMP_IOCTL_NOTIF_ADDFD,
            add.as_ptr(),
        )
    })?;
    // struct seccomp_notif_resp { u64 id; s64 val; s32 error; u32 flags; }: getppid returns 0.
    let mut resp = [0u8; 24];
    resp[..8].copy_from_slice(&id.to_ne_bytes());
    // SAFETY: the kernel reads the 24-byte struct owned by this frame.
    check(unsafe {
        libc::syscall(
            libc::SYS_ioctl,
            listener.as_raw_fd(),
            SECCOMP_IOCTL_NOTIF_SEND,
            resp.as_ptr(),
        )
    })?;
    // The child says when getppid has returned (the fd is in its table by then).
    nix::unistd::read(&sup, &mut byte).map_err(|e| e.to_string())?;
    *child = Some((pid, release_w.into_raw_fd()));
    Ok(vec![i64::from(pid), got])
}

/// The target of [`addfd`]: installs the filter, sends the notifier fd on `sock`, calls
/// getppid (answered by the supervisor), says so, and waits for `release` to close.
///
/// # Safety
/// Call only in a freshly forked child of a single-threaded process; it never returns.
unsafe fn addfd_target(sock: RawFd, release: RawFd) -> ! {
    #[repr(C)]
    struct SockFilter {
        code: u16,
        jt: u8,
        jf: u8,
        k: u32,
    }
    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const SockFilter,
    }
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const SECCOMP_RET_USER_NOTIF: u32 = 0x7FC0_0000;
    const SECCOMP_RET_ALLOW: u32 = 0x7FFF_0000;
    let f = |code, jt, jf, k| SockFilter { code, jt, jf, k };
    // getppid of x86_64 goes to the notifier; everything else is allowed.
    let filter = [
        f(LD_W_ABS, 0, 0, 4),
        f(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        f(LD_W_ABS, 0, 0, 0),
        f(JEQ_K, 0, 1, libc::SYS_getppid as u32),
        f(RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),
        f(RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ];
    let prog = SockFprog {
        len: filter.len() as u16,
        filter: filter.as_ptr(),
    };
    // SAFETY: raw syscalls on fds and structs owned by this frame; the caller guarantees a
    // forked child, which may end with _exit.
    unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        let listener = libc::syscall(
            libc::SYS_seccomp,
            1, // SECCOMP_SET_MODE_FILTER
            8, // SECCOMP_FILTER_FLAG_NEW_LISTENER
            &prog,
        );
        if listener < 0 {
            libc::_exit(1);
        }
        let fds = [listener as RawFd];
        let iov = [std::io::IoSlice::new(b"l")];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        if nix::sys::socket::sendmsg::<()>(
            sock,
            &iov,
            &cmsg,
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .is_err()
        {
            libc::_exit(2);
        }
        libc::close(listener as RawFd);
        libc::syscall(libc::SYS_getppid);
        libc::write(sock, b"d".as_ptr().cast(), 1);
        let mut b = [0u8; 1];
        libc::read(release, b.as_mut_ptr().cast(), 1);
        libc::_exit(0)
    }
}

/// fds from the syscalls that return one without opening a path: mq_open, fsopen, open_tree
/// and landlock_create_ruleset. `mq fs tree ruleset`.
fn newfds() -> Result<Vec<i64>, String> {
    // The syscall takes the name without the leading slash libc's mq_open strips.
    let name = CString::new(format!("vmaudit-test-{}", std::process::id())).unwrap();
    let slashed = CString::new(format!("/{}", name.to_str().unwrap())).unwrap();
    // SAFETY: mq_open with a NUL-terminated name owned by this frame and default attributes.
    let mq = check(unsafe {
        libc::syscall(
            libc::SYS_mq_open,
            name.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC,
            0o600,
            0usize,
        )
    })?;
    // SAFETY: as above; the queue's name goes, the fd stays.
    unsafe { libc::mq_unlink(slashed.as_ptr()) };
    let tmpfs = CString::new("tmpfs").unwrap();
    // SAFETY: fsopen with a NUL-terminated filesystem name; FSOPEN_CLOEXEC.
    let fs = check(unsafe { libc::syscall(libc::SYS_fsopen, tmpfs.as_ptr(), 1) })?;
    let tmp = CString::new("/tmp").unwrap();
    // SAFETY: open_tree with a NUL-terminated path; OPEN_TREE_CLOEXEC.
    let tree = check(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            tmp.as_ptr(),
            libc::O_CLOEXEC,
        )
    })?;
    // struct landlock_ruleset_attr { u64 handled_access_fs; ... }: one right handled.
    let attr: [u64; 1] = [1];
    // SAFETY: the kernel reads the 8-byte struct owned by this frame.
    let ruleset = check(unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            attr.as_ptr(),
            size_of_val(&attr),
            0,
        )
    })?;
    Ok(vec![mq, fs, tree, ruleset])
}
