//! A process the integration tests drive through every way of gaining or losing an fd.
//!
//! It reads one command per line on stdin and answers one line on stdout: `ok ...` or
//! `err ...`. The tests watch it with `vmaudit watch` and check vmaudit's records against what
//! it did. Raw syscalls are used where the point is the syscall itself (openat2, close_range,
//! pidfd_getfd, dup3), so that libc cannot substitute another one.

use std::{
    ffi::CString,
    io::{BufRead as _, IoSliceMut, Write as _},
    os::{
        fd::{AsRawFd as _, IntoRawFd as _, OwnedFd, RawFd},
        unix::{net::UnixListener, process::CommandExt as _},
    },
};

use nix::{
    cmsg_space,
    sys::socket::{ControlMessageOwned, MsgFlags, recvmsg},
};

mod paths;
mod scm;

fn main() {
    // After an exec of ourselves, say so: the test waits for it.
    if std::env::args().nth(1).as_deref() == Some("--after-exec") {
        println!("ok exec");
    }
    let stdin = std::io::stdin();
    let mut line = String::new();
    let mut held: Vec<OwnedFd> = Vec::new();
    let mut child_release: Option<(i32, RawFd)> = None;
    loop {
        line.clear();
        if stdin.lock().read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = run(&words, &mut held, &mut child_release);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", reply.unwrap_or_else(|e| format!("err {e}")));
        let _ = out.flush();
    }
}

pub(crate) fn int(words: &[&str], i: usize) -> Result<i64, String> {
    words
        .get(i)
        .ok_or_else(|| format!("missing argument {i}"))?
        .parse()
        .map_err(|e| format!("{e}"))
}

pub(crate) fn check(r: libc::c_long) -> Result<i64, String> {
    if r < 0 {
        Err(std::io::Error::last_os_error().to_string())
    } else {
        Ok(r)
    }
}

pub(crate) fn cpath(words: &[&str], i: usize) -> Result<CString, String> {
    CString::new(*words.get(i).ok_or("missing path")?).map_err(|e| e.to_string())
}

fn run(
    words: &[&str],
    held: &mut Vec<OwnedFd>,
    child: &mut Option<(i32, RawFd)>,
) -> Result<String, String> {
    let cmd = *words.first().ok_or("empty command")?;
    // SAFETY (for every block below): raw syscalls with integer arguments or pointers to live,
    // NUL-terminated strings and properly sized structs owned by this frame.
    let r: i64 = match cmd {
        "open" => {
            let p = cpath(words, 1)?;
            let flags = libc::O_RDWR
                | if words.get(2) == Some(&"cloexec") {
                    libc::O_CLOEXEC
                } else {
                    0
                };
            // SAFETY: see above.
            check(unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, p.as_ptr(), flags, 0) })?
        }
        "open_ro" => {
            let p = cpath(words, 1)?;
            // SAFETY: see above.
            check(unsafe {
                libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    p.as_ptr(),
                    libc::O_RDONLY,
                    0,
                )
            })?
        }
        "openat2" => {
            let p = cpath(words, 1)?;
            // struct open_how { u64 flags; u64 mode; u64 resolve; }
            let how: [u64; 3] = [(libc::O_RDWR | libc::O_CLOEXEC) as u64, 0, 0];
            // SAFETY: see above.
            check(unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    libc::AT_FDCWD,
                    p.as_ptr(),
                    how.as_ptr(),
                    size_of_val(&how),
                )
            })?
        }
        "creat" => {
            let p = cpath(words, 1)?;
            // SAFETY: see above.
            check(unsafe { libc::syscall(libc::SYS_creat, p.as_ptr(), 0o600) })?
        }
        // SAFETY: see above.
        "dup" => check(unsafe { libc::syscall(libc::SYS_dup, int(words, 1)?) })?,
        // SAFETY: see above.
        "dup2" => check(unsafe { libc::syscall(libc::SYS_dup2, int(words, 1)?, int(words, 2)?) })?,
        // SAFETY: see above.
        "dup3" => check(unsafe {
            libc::syscall(
                libc::SYS_dup3,
                int(words, 1)?,
                int(words, 2)?,
                libc::O_CLOEXEC,
            )
        })?,
        // SAFETY: see above.
        "dupfd" => check(unsafe {
            libc::syscall(
                libc::SYS_fcntl,
                int(words, 1)?,
                libc::F_DUPFD,
                int(words, 2)?,
            )
        })?,
        "dupfd_cloexec" => {
            // SAFETY: see above.
            check(unsafe {
                libc::syscall(
                    libc::SYS_fcntl,
                    int(words, 1)?,
                    libc::F_DUPFD_CLOEXEC,
                    int(words, 2)?,
                )
            })?
        }
        "setcloexec" => {
            // SAFETY: see above.
            check(unsafe {
                libc::syscall(
                    libc::SYS_fcntl,
                    int(words, 1)?,
                    libc::F_SETFD,
                    libc::FD_CLOEXEC,
                )
            })?
        }
        // SAFETY: see above.
        "close" => check(unsafe { libc::syscall(libc::SYS_close, int(words, 1)?) })?,
        "close_range" => {
            // SAFETY: see above.
            check(unsafe {
                libc::syscall(libc::SYS_close_range, int(words, 1)?, int(words, 2)?, 0)
            })?
        }
        "pidfd_getfd" => {
            // Take a copy of one of our own fds through a pidfd of ourselves.
            // SAFETY: see above.
            let pidfd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) })?;
            // SAFETY: see above.
            let got =
                check(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, int(words, 1)?, 0) });
            // SAFETY: see above.
            unsafe { libc::close(pidfd as i32) };
            got?
        }
        "listen" => {
            // Bind a unix socket; the reply is the listener's fd. `accept` takes a connection.
            let l = UnixListener::bind(words.get(1).ok_or("missing path")?)
                .map_err(|e| e.to_string())?;
            l.into_raw_fd() as i64
        }
        "accept" => {
            // SAFETY: see above.
            check(unsafe { libc::syscall(libc::SYS_accept4, int(words, 1)?, 0, 0, 0) })?
        }
        "recvfd" => {
            // recvmsg on a connected unix socket; the reply lists the received fds.
            let sock = int(words, 1)? as RawFd;
            let mut buf = [0u8; 16];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = cmsg_space!([RawFd; 4]);
            let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::empty())
                .map_err(|e| e.to_string())?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(|e| e.to_string())? {
                if let ControlMessageOwned::ScmRights(r) = c {
                    fds.extend(r);
                }
            }
            return Ok(format!(
                "ok {}",
                fds.iter()
                    .map(|f| f.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
        "pipe2" => {
            let mut fds = [0i32; 2];
            // SAFETY: see above.
            check(unsafe { libc::syscall(libc::SYS_pipe2, fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
            return Ok(format!("ok {} {}", fds[0], fds[1]));
        }
        "fork" => {
            // The child closes fd `words[1]`, says so on a pipe, waits on another until
            // `reap`, then exits. The reply (the child's pid) comes after its close.
            let close_fd = int(words, 1)? as RawFd;
            let (r, w) = nix::unistd::pipe().map_err(|e| e.to_string())?;
            let (done_r, done_w) = nix::unistd::pipe().map_err(|e| e.to_string())?;
            // SAFETY: single-threaded program; the child only makes async-signal-safe calls.
            match unsafe { libc::fork() } {
                -1 => return Err(std::io::Error::last_os_error().to_string()),
                0 => {
                    drop(w);
                    drop(done_r);
                    let mut b = [0u8; 1];
                    // SAFETY: see above.
                    unsafe {
                        libc::syscall(libc::SYS_close, close_fd);
                        libc::write(done_w.as_raw_fd(), b"x".as_ptr().cast(), 1);
                        libc::read(r.as_raw_fd(), b.as_mut_ptr().cast(), 1);
                        libc::_exit(0);
                    }
                }
                pid => {
                    drop(r);
                    drop(done_w);
                    let mut b = [0u8; 1];
                    // SAFETY: see above.
                    unsafe { libc::read(done_r.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
                    *child = Some((pid, w.into_raw_fd()));
                    pid as i64
                }
            }
        }
        "reap" => {
            let (pid, w) = child.take().ok_or("no child")?;
            // SAFETY: see above; closing the pipe's write end releases the child.
            unsafe { libc::close(w) };
            let mut status = 0;
            // SAFETY: see above.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            i64::from(status)
        }
        "exec" => {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let err = std::process::Command::new(exe).arg("--after-exec").exec();
            return Err(err.to_string());
        }
        "flood" => {
            // Many open/close pairs as fast as one thread can go.
            let n = int(words, 1)?;
            let p = CString::new("/dev/null").unwrap();
            for _ in 0..n {
                // SAFETY: see above.
                let fd = unsafe {
                    libc::syscall(
                        libc::SYS_openat,
                        libc::AT_FDCWD,
                        p.as_ptr(),
                        libc::O_RDONLY,
                        0,
                    )
                };
                // SAFETY: see above.
                unsafe { libc::syscall(libc::SYS_close, fd) };
            }
            n
        }
        "flood_dup" => {
            // Many dup/close pairs of stdin as fast as one thread can go: the cheapest way to
            // gain and lose an fd (no path lookup). The reply is the fd events made: each dup
            // that succeeded and each close that did.
            let n = int(words, 1)?;
            let mut events = 0;
            for _ in 0..n {
                // SAFETY: see above.
                let fd = unsafe { libc::syscall(libc::SYS_dup, 0) };
                // SAFETY: see above.
                let closed = unsafe { libc::syscall(libc::SYS_close, fd) };
                events += i64::from(fd >= 0) + i64::from(closed == 0);
            }
            events
        }
        "hold" => {
            // Open `n` fds on /dev/zero and keep them: state the resync must find.
            let n = int(words, 1)?;
            for _ in 0..n {
                let f = std::fs::File::open("/dev/zero").map_err(|e| e.to_string())?;
                held.push(OwnedFd::from(f));
            }
            held.len() as i64
        }
        "tunsetiff" => {
            // Attach tun fd `words[1]` to a new tap interface named `words[2]` (gone with the fd).
            let fd = int(words, 1)?;
            let name = words.get(2).ok_or("missing name")?.as_bytes();
            // struct ifreq: char ifr_name[16]; short ifr_flags; padding to 40 bytes.
            let mut ifr = [0u8; 40];
            ifr[..name.len().min(15)].copy_from_slice(&name[..name.len().min(15)]);
            let flags: i16 = 0x0002 | 0x1000; // IFF_TAP | IFF_NO_PI
            ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
            const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
            // SAFETY: see above; ifr is a 40-byte struct ifreq owned by this frame.
            check(unsafe { libc::syscall(libc::SYS_ioctl, fd, TUNSETIFF, ifr.as_mut_ptr()) })?
        }
        "compat_dup" => {
            // dup(fd) through the 32-bit compat entry (`int 0x80`, i386 number 41).
            let fd = int(words, 1)?;
            let ret: i64;
            // SAFETY: int 0x80 with eax = 41 (i386 dup) and ebx = an fd touches no memory;
            // the kernel preserves every register but eax. rbx belongs to LLVM, so it is
            // swapped in and out around the call.
            unsafe {
                std::arch::asm!(
                    "xchg {fd}, rbx",
                    "int 0x80",
                    "xchg {fd}, rbx",
                    fd = inout(reg) fd => _,
                    inlateout("rax") 41i64 => ret,
                );
            }
            if ret < 0 {
                return Err(std::io::Error::from_raw_os_error(-ret as i32).to_string());
            }
            ret
        }
        "compat_fork" => {
            // fork through the 32-bit compat entry (`int 0x80`, i386 number 2); answers the
            // child's pid once it has exited.
            let ret: i64;
            // SAFETY: int 0x80 with eax = 2 (i386 fork) reads no memory; the kernel preserves
            // every register but eax. The child only _exits.
            unsafe {
                std::arch::asm!("int 0x80", inlateout("rax") 2i64 => ret);
            }
            match ret {
                // SAFETY: see above.
                0 => unsafe { libc::_exit(0) },
                r if r < 0 => return Err(std::io::Error::from_raw_os_error(-r as i32).to_string()),
                child => {
                    let mut status = 0;
                    // SAFETY: waits for our own child.
                    unsafe { libc::waitpid(child as i32, &mut status, 0) };
                    child
                }
            }
        }
        "clone_pidfd" => {
            // clone(CLONE_PIDFD | SIGCHLD): the parent gets a pidfd of the child in its table.
            let mut pidfd: libc::c_int = -1;
            // SAFETY: a fork-like clone (no CLONE_VM, no new stack); the child only _exits.
            let pid = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    libc::CLONE_PIDFD as libc::c_ulong | libc::SIGCHLD as libc::c_ulong,
                    0usize,
                    &mut pidfd as *mut libc::c_int,
                    0usize,
                    0usize,
                )
            };
            match pid {
                // SAFETY: see above.
                0 => unsafe { libc::_exit(0) },
                p if p < 0 => return Err(std::io::Error::last_os_error().to_string()),
                p => {
                    let mut status = 0;
                    // SAFETY: see above.
                    unsafe { libc::waitpid(p as i32, &mut status, 0) };
                }
            }
            pidfd as i64
        }
        "ptpeer" => {
            // A pty pair: /dev/ptmx, unlocked, and its peer from ioctl(TIOCGPTPEER).
            let p = CString::new("/dev/ptmx").unwrap();
            // SAFETY: see above.
            let master = check(unsafe {
                libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    p.as_ptr(),
                    libc::O_RDWR,
                    0,
                )
            })?;
            let unlock: libc::c_int = 0;
            // SAFETY: see above; TIOCSPTLCK reads an int.
            check(unsafe { libc::syscall(libc::SYS_ioctl, master, libc::TIOCSPTLCK, &unlock) })?;
            const TIOCGPTPEER: libc::c_ulong = 0x5441;
            // SAFETY: see above.
            let peer = check(unsafe {
                libc::syscall(libc::SYS_ioctl, master, TIOCGPTPEER, libc::O_RDWR)
            })?;
            return Ok(format!("ok {master} {peer}"));
        }
        "recvmmsg_fds" => {
            let counts = (1..words.len())
                .map(|i| int(words, i).map(|n| n as usize))
                .collect::<Result<Vec<_>, _>>()?;
            return scm::recvmmsg_fds(&counts);
        }
        "ping" => 0,
        "exit" => std::process::exit(0),
        other => return paths::run(other, words, child),
    };
    Ok(format!("ok {r}"))
}
