//! Decoding ring-buffer bytes into what happened to a process's fd table.

use std::ptr;

use thiserror::Error;
use vmaudit_common::{EventKind, PATH_CAP, RawEvent, nr};

/// A ring-buffer record that is not a well-formed event.
#[derive(Debug, Error, PartialEq)]
pub enum DecodeError {
    #[error("event of {got} bytes, expected {expected}")]
    Length { got: usize, expected: usize },
    #[error("unknown event kind {0}")]
    Kind(u32),
}

/// Copies a [`RawEvent`] out of ring-buffer bytes, which need not be aligned.
pub fn parse_raw(bytes: &[u8]) -> Result<RawEvent, DecodeError> {
    if bytes.len() < RawEvent::SIZE {
        return Err(DecodeError::Length {
            got: bytes.len(),
            expected: RawEvent::SIZE,
        });
    }
    // SAFETY: the length is checked above; RawEvent is plain old data (every bit pattern is
    // valid) and read_unaligned makes no alignment assumption.
    Ok(unsafe { ptr::read_unaligned(bytes.as_ptr().cast::<RawEvent>()) })
}

/// How an fd was gained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gain {
    Open,
    Dup,
    RecvFd,
    PidfdGetfd,
    /// Any other syscall that returns a new fd (socket, pipe, eventfd, ...).
    New,
}

/// One change to a process's fd table, as decoded from an event.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// `fd` is now open. `cloexec` None: the syscall's arguments do not say (read fdinfo).
    /// `from`: the fd it duplicates, whose identity it shares. `replaces`: dup2/dup3 closed
    /// whatever `fd` was before.
    Gain {
        fd: i32,
        how: Gain,
        cloexec: Option<bool>,
        from: Option<i32>,
        path: Option<String>,
    },
    /// `fd` was closed.
    Close { fd: i32 },
    /// Every fd in `first..=last` was closed (close_range).
    CloseRange { first: u32, last: u32 },
    /// close-on-exec set or cleared on `fd` (fcntl F_SETFD, FIOCLEX/FIONCLEX).
    SetCloexec { fd: i32, on: bool },
    /// close-on-exec set on every fd in `first..=last` (close_range CLOSE_RANGE_CLOEXEC).
    CloexecRange { first: u32, last: u32 },
    /// A followed child was forked; its table starts as a copy of this process's.
    Fork { child: u32, clone_flags: u64 },
    /// exec succeeded: every close-on-exec fd is gone.
    Exec { filename: Option<String> },
    /// The process exited: every fd is gone.
    Exit,
    /// `fd` was sent to another process through SCM_RIGHTS (the sender keeps it).
    SendFd { fd: i32 },
    /// The syscall failed: nothing changed.
    Failed {
        errno: i32,
        fd: Option<i32>,
        path: Option<String>,
    },
    /// The syscall changes no fd (a bpf command that returns no fd, signalfd on an existing fd).
    Nothing,
}

/// A decoded event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub ts_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    /// The syscall (or sched event) that reported it.
    pub source: &'static str,
    pub changes: Vec<Change>,
}

const O_CLOEXEC: u64 = libc::O_CLOEXEC as u64;
const SOCK_CLOEXEC: u64 = libc::SOCK_CLOEXEC as u64;
const MSG_CMSG_CLOEXEC: u64 = libc::MSG_CMSG_CLOEXEC as u64;
const MFD_CLOEXEC: u64 = libc::MFD_CLOEXEC as u64;
const FAN_CLOEXEC: u64 = 1;
const CLOSE_RANGE_CLOEXEC: u64 = 1 << 2;
const F_DUPFD: u64 = libc::F_DUPFD as u64;
const F_DUPFD_CLOEXEC: u64 = libc::F_DUPFD_CLOEXEC as u64;
const F_SETFD: u64 = libc::F_SETFD as u64;
const FD_CLOEXEC: u64 = libc::FD_CLOEXEC as u64;

/// bpf(2) commands that return a new fd (every bpf fd is close-on-exec).
const BPF_FD_CMDS: &[u64] = &[0, 5, 7, 13, 14, 17, 18, 19, 28, 30, 32, 33, 36];

/// The syscall's name, for output.
pub fn syscall_name(n: u32) -> &'static str {
    nr::TRACED
        .iter()
        .find(|(x, _)| *x == n)
        .map(|(_, name)| *name)
        .unwrap_or("unknown")
}

fn path_of(raw: &RawEvent) -> Option<String> {
    let len = (raw.path_len as usize).min(PATH_CAP);
    if len == 0 {
        return None;
    }
    let bytes = &raw.path[..len];
    // bpf_probe_read_*_str counts the terminating NUL.
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    Some(String::from_utf8_lossy(bytes).into_owned())
}

fn flag(args: u64, bit: u64) -> Option<bool> {
    Some(args & bit != 0)
}

/// Decodes a raw event into table changes.
pub fn decode(raw: &RawEvent) -> Result<Event, DecodeError> {
    let kind = EventKind::try_from(raw.kind).map_err(DecodeError::Kind)?;
    let a = raw.args;
    let ret = raw.ret;
    let path = path_of(raw);
    let (source, changes) = match kind {
        EventKind::Fork => (
            "fork",
            vec![Change::Fork {
                child: a[0] as u32,
                clone_flags: a[1],
            }],
        ),
        EventKind::Exec => ("exec", vec![Change::Exec { filename: path }]),
        EventKind::Exit => ("exit", vec![Change::Exit]),
        EventKind::RecvFd => {
            let flags = if raw.nr == nr::RECVMMSG { a[3] } else { a[2] };
            (
                syscall_name(raw.nr),
                vec![Change::Gain {
                    fd: raw.fds[0],
                    how: Gain::RecvFd,
                    cloexec: flag(flags, MSG_CMSG_CLOEXEC),
                    from: None,
                    path: None,
                }],
            )
        }
        EventKind::SendFd => (
            syscall_name(raw.nr),
            vec![Change::SendFd { fd: raw.fds[0] }],
        ),
        EventKind::Syscall => (
            syscall_name(raw.nr),
            decode_syscall(raw.nr, a, ret, raw.fds, path),
        ),
    };
    Ok(Event {
        ts_ns: raw.ts_ns,
        tgid: raw.tgid,
        tid: raw.tid,
        source,
        changes,
    })
}

fn decode_syscall(
    n: u32,
    a: [u64; 4],
    ret: i64,
    fds: [i32; 2],
    path: Option<String>,
) -> Vec<Change> {
    let fd_arg = |i: usize| a[i] as i32;
    if ret < 0 {
        let fd = match n {
            nr::CLOSE | nr::DUP2 | nr::DUP3 => Some(fd_arg(if n == nr::CLOSE { 0 } else { 1 })),
            _ => None,
        };
        // close() releases the fd even when it reports an error, unless the fd was not open.
        if n == nr::CLOSE && ret != -(libc::EBADF as i64) {
            return vec![Change::Close { fd: fd_arg(0) }];
        }
        return vec![Change::Failed {
            errno: (-ret) as i32,
            fd,
            path,
        }];
    }
    let new = ret as i32;
    let gain = |how: Gain, cloexec: Option<bool>, from: Option<i32>, path: Option<String>| {
        vec![Change::Gain {
            fd: new,
            how,
            cloexec,
            from,
            path,
        }]
    };
    let pair = |cloexec: bool| {
        fds.iter()
            .filter(|fd| **fd >= 0)
            .map(|&fd| Change::Gain {
                fd,
                how: Gain::New,
                cloexec: Some(cloexec),
                from: None,
                path: None,
            })
            .collect()
    };
    match n {
        nr::OPEN => gain(Gain::Open, flag(a[1], O_CLOEXEC), None, path),
        nr::OPENAT => gain(Gain::Open, flag(a[2], O_CLOEXEC), None, path),
        // openat2's flags are in a struct in user memory; fdinfo tells.
        nr::OPENAT2 => gain(Gain::Open, None, None, path),
        nr::CREAT => gain(Gain::Open, Some(false), None, path),
        nr::OPEN_BY_HANDLE_AT => gain(Gain::Open, flag(a[2], O_CLOEXEC), None, None),
        nr::DUP => gain(Gain::Dup, Some(false), Some(fd_arg(0)), None),
        nr::DUP2 | nr::DUP3 => {
            let (old, target) = (fd_arg(0), fd_arg(1));
            if old == target {
                vec![Change::Nothing]
            } else {
                let cloexec = if n == nr::DUP3 {
                    a[2] & O_CLOEXEC != 0
                } else {
                    false
                };
                vec![Change::Gain {
                    fd: target,
                    how: Gain::Dup,
                    cloexec: Some(cloexec),
                    from: Some(old),
                    path: None,
                }]
            }
        }
        nr::FCNTL => match a[1] {
            F_DUPFD => gain(Gain::Dup, Some(false), Some(fd_arg(0)), None),
            F_DUPFD_CLOEXEC => gain(Gain::Dup, Some(true), Some(fd_arg(0)), None),
            F_SETFD => vec![Change::SetCloexec {
                fd: fd_arg(0),
                on: a[2] & FD_CLOEXEC != 0,
            }],
            _ => vec![Change::Nothing],
        },
        nr::IOCTL => match a[1] & 0xffff_ffff {
            nr::ioctl::FIOCLEX => vec![Change::SetCloexec {
                fd: fd_arg(0),
                on: true,
            }],
            nr::ioctl::FIONCLEX => vec![Change::SetCloexec {
                fd: fd_arg(0),
                on: false,
            }],
            // KVM creates its fds with O_CLOEXEC.
            _ => gain(Gain::New, Some(true), None, None),
        },
        nr::PIDFD_GETFD => gain(Gain::PidfdGetfd, Some(true), None, None),
        nr::PIDFD_OPEN | nr::IO_URING_SETUP => gain(Gain::New, Some(true), None, None),
        nr::SOCKET => gain(Gain::New, flag(a[1], SOCK_CLOEXEC), None, None),
        nr::ACCEPT => gain(Gain::New, Some(false), None, None),
        nr::ACCEPT4 => gain(Gain::New, flag(a[3], SOCK_CLOEXEC), None, None),
        nr::SOCKETPAIR => pair(a[1] & SOCK_CLOEXEC != 0),
        nr::PIPE => pair(false),
        nr::PIPE2 => pair(a[1] & O_CLOEXEC != 0),
        nr::EVENTFD | nr::EPOLL_CREATE | nr::INOTIFY_INIT => {
            gain(Gain::New, Some(false), None, None)
        }
        nr::SIGNALFD if fd_arg(0) == -1 => gain(Gain::New, Some(false), None, None),
        nr::SIGNALFD4 if fd_arg(0) == -1 => gain(Gain::New, flag(a[3], O_CLOEXEC), None, None),
        nr::SIGNALFD | nr::SIGNALFD4 => vec![Change::Nothing],
        nr::EVENTFD2 => gain(Gain::New, flag(a[1], O_CLOEXEC), None, None),
        nr::EPOLL_CREATE1 | nr::INOTIFY_INIT1 | nr::MEMFD_SECRET | nr::USERFAULTFD => {
            gain(Gain::New, flag(a[0], O_CLOEXEC), None, None)
        }
        nr::TIMERFD_CREATE => gain(Gain::New, flag(a[1], O_CLOEXEC), None, None),
        nr::MEMFD_CREATE => gain(Gain::New, flag(a[1], MFD_CLOEXEC), None, None),
        nr::FANOTIFY_INIT => gain(Gain::New, flag(a[0], FAN_CLOEXEC), None, None),
        // PERF_FLAG_FD_CLOEXEC is the fifth argument, which is not captured.
        nr::PERF_EVENT_OPEN => gain(Gain::New, None, None, None),
        nr::BPF if BPF_FD_CMDS.contains(&a[0]) => gain(Gain::New, Some(true), None, None),
        nr::BPF => vec![Change::Nothing],
        nr::CLOSE => vec![Change::Close { fd: fd_arg(0) }],
        nr::CLOSE_RANGE => {
            let (first, last) = (a[0] as u32, a[1] as u32);
            if a[2] & CLOSE_RANGE_CLOEXEC != 0 {
                vec![Change::CloexecRange { first, last }]
            } else {
                vec![Change::CloseRange { first, last }]
            }
        }
        _ => vec![Change::Nothing],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(kind: EventKind, n: u32, args: [u64; 4], ret: i64) -> RawEvent {
        RawEvent {
            ts_ns: 10,
            ret,
            args,
            tgid: 7,
            tid: 8,
            kind: kind as u32,
            nr: n,
            fds: [-1, -1],
            path_len: 0,
            _pad: 0,
            path: [0; PATH_CAP],
        }
    }

    fn bytes(r: &RawEvent) -> Vec<u8> {
        // SAFETY: RawEvent is plain old data without padding; the slice covers exactly it.
        unsafe { std::slice::from_raw_parts((r as *const RawEvent).cast::<u8>(), RawEvent::SIZE) }
            .to_vec()
    }

    #[test]
    fn syscall_numbers_match_libc() {
        let pairs: &[(u32, libc::c_long)] = &[
            (nr::OPEN, libc::SYS_open),
            (nr::OPENAT, libc::SYS_openat),
            (nr::OPENAT2, libc::SYS_openat2),
            (nr::CREAT, libc::SYS_creat),
            (nr::DUP, libc::SYS_dup),
            (nr::DUP2, libc::SYS_dup2),
            (nr::DUP3, libc::SYS_dup3),
            (nr::FCNTL, libc::SYS_fcntl),
            (nr::IOCTL, libc::SYS_ioctl),
            (nr::RECVMSG, libc::SYS_recvmsg),
            (nr::RECVMMSG, libc::SYS_recvmmsg),
            (nr::SENDMSG, libc::SYS_sendmsg),
            (nr::SENDMMSG, libc::SYS_sendmmsg),
            (nr::PIDFD_GETFD, libc::SYS_pidfd_getfd),
            (nr::PIDFD_OPEN, libc::SYS_pidfd_open),
            (nr::SOCKET, libc::SYS_socket),
            (nr::SOCKETPAIR, libc::SYS_socketpair),
            (nr::ACCEPT, libc::SYS_accept),
            (nr::ACCEPT4, libc::SYS_accept4),
            (nr::PIPE, libc::SYS_pipe),
            (nr::PIPE2, libc::SYS_pipe2),
            (nr::EVENTFD, libc::SYS_eventfd),
            (nr::EVENTFD2, libc::SYS_eventfd2),
            (nr::EPOLL_CREATE, libc::SYS_epoll_create),
            (nr::EPOLL_CREATE1, libc::SYS_epoll_create1),
            (nr::MEMFD_CREATE, libc::SYS_memfd_create),
            (nr::MEMFD_SECRET, libc::SYS_memfd_secret),
            (nr::SIGNALFD, libc::SYS_signalfd),
            (nr::SIGNALFD4, libc::SYS_signalfd4),
            (nr::TIMERFD_CREATE, libc::SYS_timerfd_create),
            (nr::INOTIFY_INIT, libc::SYS_inotify_init),
            (nr::INOTIFY_INIT1, libc::SYS_inotify_init1),
            (nr::FANOTIFY_INIT, libc::SYS_fanotify_init),
            (nr::USERFAULTFD, libc::SYS_userfaultfd),
            (nr::PERF_EVENT_OPEN, libc::SYS_perf_event_open),
            (nr::IO_URING_SETUP, libc::SYS_io_uring_setup),
            (nr::BPF, libc::SYS_bpf),
            (nr::OPEN_BY_HANDLE_AT, libc::SYS_open_by_handle_at),
            (nr::CLOSE, libc::SYS_close),
            (nr::CLOSE_RANGE, libc::SYS_close_range),
            (nr::CLONE, libc::SYS_clone),
            (nr::CLONE3, libc::SYS_clone3),
            (nr::FORK, libc::SYS_fork),
            (nr::VFORK, libc::SYS_vfork),
        ];
        for (ours, libc_nr) in pairs {
            assert_eq!(*ours as libc::c_long, *libc_nr, "{}", syscall_name(*ours));
        }
        assert_eq!(pairs.len(), nr::TRACED.len());
    }

    #[test]
    fn short_and_unknown_records_are_rejected() {
        assert_eq!(
            parse_raw(&[0; 10]).unwrap_err(),
            DecodeError::Length {
                got: 10,
                expected: RawEvent::SIZE
            }
        );
        let mut r = raw(EventKind::Exit, 0, [0; 4], 0);
        r.kind = 99;
        let parsed = parse_raw(&bytes(&r)).unwrap();
        assert_eq!(decode(&parsed).unwrap_err(), DecodeError::Kind(99));
    }

    #[test]
    fn unaligned_bytes_decode() {
        let mut r = raw(EventKind::Syscall, nr::OPENAT, [0, 0, O_CLOEXEC, 0], 5);
        r.path[..10].copy_from_slice(b"/dev/null\0");
        r.path_len = 10;
        let mut buf = vec![0u8];
        buf.extend(bytes(&r));
        let e = decode(&parse_raw(&buf[1..]).unwrap()).unwrap();
        assert_eq!(e.source, "openat");
        assert_eq!(
            e.changes,
            vec![Change::Gain {
                fd: 5,
                how: Gain::Open,
                cloexec: Some(true),
                from: None,
                path: Some("/dev/null".into())
            }]
        );
    }

    #[test]
    fn failures_and_close_semantics() {
        let e = decode(&raw(EventKind::Syscall, nr::OPENAT, [0; 4], -2)).unwrap();
        assert!(matches!(e.changes[0], Change::Failed { errno: 2, .. }));
        // close with EINTR still released the fd; with EBADF there was none.
        let e = decode(&raw(
            EventKind::Syscall,
            nr::CLOSE,
            [4, 0, 0, 0],
            -(libc::EINTR as i64),
        ))
        .unwrap();
        assert_eq!(e.changes, vec![Change::Close { fd: 4 }]);
        let e = decode(&raw(
            EventKind::Syscall,
            nr::CLOSE,
            [4, 0, 0, 0],
            -(libc::EBADF as i64),
        ))
        .unwrap();
        assert!(matches!(e.changes[0], Change::Failed { fd: Some(4), .. }));
    }

    #[test]
    fn dups_fcntl_and_ranges() {
        let d = |n, a, r| decode(&raw(EventKind::Syscall, n, a, r)).unwrap().changes;
        assert!(matches!(d(nr::DUP2, [3, 3, 0, 0], 3)[0], Change::Nothing));
        assert_eq!(
            d(nr::DUP3, [3, 9, O_CLOEXEC, 0], 9),
            vec![Change::Gain {
                fd: 9,
                how: Gain::Dup,
                cloexec: Some(true),
                from: Some(3),
                path: None
            }]
        );
        assert!(matches!(
            d(nr::FCNTL, [3, F_DUPFD_CLOEXEC, 10, 0], 10)[0],
            Change::Gain {
                fd: 10,
                cloexec: Some(true),
                from: Some(3),
                ..
            }
        ));
        assert_eq!(
            d(nr::FCNTL, [3, F_SETFD, 1, 0], 0),
            vec![Change::SetCloexec { fd: 3, on: true }]
        );
        assert_eq!(
            d(nr::CLOSE_RANGE, [3, u32::MAX as u64, 0, 0], 0),
            vec![Change::CloseRange {
                first: 3,
                last: u32::MAX
            }]
        );
        assert_eq!(
            d(nr::CLOSE_RANGE, [3, 5, CLOSE_RANGE_CLOEXEC, 0], 0),
            vec![Change::CloexecRange { first: 3, last: 5 }]
        );
        assert_eq!(d(nr::BPF, [1, 0, 0, 0], 0), vec![Change::Nothing]);
        assert!(matches!(
            d(nr::BPF, [5, 0, 0, 0], 6)[0],
            Change::Gain { fd: 6, .. }
        ));
    }

    #[test]
    fn pipes_and_received_fds() {
        let mut r = raw(EventKind::Syscall, nr::PIPE2, [0, O_CLOEXEC, 0, 0], 0);
        r.fds = [4, 5];
        let e = decode(&r).unwrap();
        assert_eq!(e.changes.len(), 2);
        assert!(matches!(
            e.changes[1],
            Change::Gain {
                fd: 5,
                cloexec: Some(true),
                ..
            }
        ));
        let mut r = raw(
            EventKind::RecvFd,
            nr::RECVMSG,
            [3, 0, MSG_CMSG_CLOEXEC, 0],
            10,
        );
        r.fds = [6, -1];
        let e = decode(&r).unwrap();
        assert_eq!(e.source, "recvmsg");
        assert!(matches!(
            e.changes[0],
            Change::Gain {
                fd: 6,
                how: Gain::RecvFd,
                cloexec: Some(true),
                ..
            }
        ));
        let e = decode(&raw(EventKind::Fork, nr::CLONE, [99, 17, 0, 0], 0)).unwrap();
        assert_eq!(
            e.changes,
            vec![Change::Fork {
                child: 99,
                clone_flags: 17
            }]
        );
    }
}
