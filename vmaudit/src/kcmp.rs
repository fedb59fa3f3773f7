//! `kcmp(KCMP_FILE)`: are two fds, in two processes, the same open file description?
//!
//! The only exact answer: two opens of the same path are different descriptions, and one
//! description passed by SCM_RIGHTS or inherited keeps its identity under any fd number.

use std::io;

const KCMP_FILE: libc::c_int = 0;

/// Whether `fd1` in `pid1` and `fd2` in `pid2` refer to the same open file description.
pub fn same_file(pid1: u32, fd1: i32, pid2: u32, fd2: i32) -> io::Result<bool> {
    // SAFETY: kcmp takes only integers and touches no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid1 as libc::pid_t,
            pid2 as libc::pid_t,
            KCMP_FILE,
            fd1 as libc::c_ulong,
            fd2 as libc::c_ulong,
        )
    };
    match r {
        0 => Ok(true),
        1..=3 => Ok(false),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use std::{fs::File, os::fd::AsRawFd as _};

    use super::*;

    #[test]
    fn dup_is_same_two_opens_are_not() {
        let me = std::process::id();
        let a = File::open("/dev/null").unwrap();
        let b = a.try_clone().unwrap();
        let c = File::open("/dev/null").unwrap();
        assert!(same_file(me, a.as_raw_fd(), me, b.as_raw_fd()).unwrap());
        assert!(!same_file(me, a.as_raw_fd(), me, c.as_raw_fd()).unwrap());
    }
}
