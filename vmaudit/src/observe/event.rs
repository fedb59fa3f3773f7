//! Decoding ring-buffer bytes into what happened to a process's fd table.

use std::{collections::HashMap, ptr};

use thiserror::Error;
use vmaudit_common::{
    Event as RawEvent, EventFlags, EventKind, FileInfo, PATH_SLOT, PathTail, Unseen, nr,
};

/// A ring-buffer record that is not a well-formed event.
#[derive(Debug, Error, PartialEq)]
pub enum DecodeError {
    #[error("event of {got} bytes, expected {expected}")]
    Length { got: usize, expected: usize },
    #[error("unknown event kind {0}")]
    Kind(u8),
}

/// What a ring-buffer record holds: the event, and the bytes of the path tail that follows it,
/// if any (their length checked). The tail (over 300 bytes) is copied out only when read, so
/// an event without one costs no copy of it.
#[derive(Clone, Copy, Debug)]
pub struct Raw<'a> {
    pub event: RawEvent,
    tail: Option<&'a [u8]>,
}

impl Raw<'_> {
    /// The path tail that follows the event, if any.
    pub fn path(&self) -> Option<PathTail> {
        // SAFETY: parse_raw checked that the slice holds a whole PathTail, which is plain old
        // data (every bit pattern is valid); read_unaligned makes no alignment assumption.
        self.tail
            .map(|b| unsafe { ptr::read_unaligned(b.as_ptr().cast::<PathTail>()) })
    }
}

/// Copies an event out of ring-buffer bytes, which need not be aligned, and checks that the
/// path tail its flags announce is there.
pub fn parse_raw(bytes: &[u8]) -> Result<Raw<'_>, DecodeError> {
    if bytes.len() < RawEvent::SIZE {
        return Err(DecodeError::Length {
            got: bytes.len(),
            expected: RawEvent::SIZE,
        });
    }
    // SAFETY: the length is checked above; RawEvent is plain old data (every bit pattern is
    // valid) and read_unaligned makes no alignment assumption.
    let event = unsafe { ptr::read_unaligned(bytes.as_ptr().cast::<RawEvent>()) };
    let tail = if event.flags & EventFlags::PATH != 0 {
        let need = RawEvent::SIZE + size_of::<PathTail>();
        if bytes.len() < need {
            return Err(DecodeError::Length {
                got: bytes.len(),
                expected: need,
            });
        }
        Some(&bytes[RawEvent::SIZE..need])
    } else {
        None
    };
    Ok(Raw { event, tail })
}

/// The name in a path tail: a device file's dentries joined from the root (`…/` in front when
/// the walk stopped before it), or the string a caller gave.
pub fn path_of(tail: &PathTail) -> String {
    let slot = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    if tail.form == PathTail::STRING {
        let flat: Vec<u8> = tail.slots.iter().flatten().copied().collect();
        return slot(&flat);
    }
    let depth = (tail.depth as usize).min(tail.slots.len());
    let mut out = String::with_capacity(depth * 8);
    if tail.complete == 0 {
        out.push('…');
    }
    for name in tail.slots[..depth].iter().rev() {
        out.push('/');
        out.push_str(&slot(&name[..PATH_SLOT]));
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// The paths device files were last sent with, by inode (`dev`, `ino`): the kernel side sends a
/// device file's path once and flags later gains of the same dentry and mount
/// ([`EventFlags::PATH_REUSED`]) instead of walking its dentries again.
#[derive(Debug, Default)]
pub struct PathMemory {
    by_inode: HashMap<(u32, u64), String>,
}

impl PathMemory {
    /// Inodes remembered at most; past it the memory starts again (a gain it no longer names
    /// is named from /proc, as a file whose path never arrived is).
    const MAX: usize = 4096;

    /// Remembers the path a gain carries, or names a gain whose path is the one sent before.
    pub fn fill(&mut self, raw: &Raw, ev: &mut Event) {
        let Change::Gain { file: Some(f), .. } = &mut ev.change else {
            return;
        };
        let key = (f.info.dev, f.info.ino);
        match &f.path {
            Some(path) => {
                if self.by_inode.len() >= Self::MAX && !self.by_inode.contains_key(&key) {
                    self.by_inode.clear();
                }
                self.by_inode.insert(key, path.clone());
            }
            None if raw.event.flags & EventFlags::PATH_REUSED != 0 => {
                f.path = self.by_inode.get(&key).cloned();
            }
            None => {}
        }
    }
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
    /// Put there by a seccomp supervisor (SECCOMP_IOCTL_NOTIF_ADDFD).
    AddFd,
}

/// The file behind a new fd, as the kernel program read it.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelFile {
    pub info: FileInfo,
    /// A device file's path (its dentries, read in the kernel).
    pub path: Option<String>,
    /// A tun fd's interface, read in the kernel (None: not attached yet, or not a tun fd).
    pub iface: Option<String>,
}

/// The interface name in a kernel buffer (NUL-padded), if any.
pub fn iface_of(raw: &[u8]) -> Option<String> {
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    (end > 0).then(|| String::from_utf8_lossy(&raw[..end]).into_owned())
}

/// One change to a process's fd table, as decoded from an event.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// `fd` is now open, holding `file` (None: another thread closed the fd before the program
    /// could read it). `from`: the fd it duplicates. dup2/dup3 closed whatever `fd` was before.
    Gain {
        fd: i32,
        how: Gain,
        cloexec: bool,
        from: Option<i32>,
        file: Option<KernelFile>,
    },
    /// `fd` was closed.
    Close { fd: i32 },
    /// Every fd in `first..=last` was closed (close_range).
    CloseRange { first: u32, last: u32 },
    /// close-on-exec set or cleared on `fd` (fcntl F_SETFD, FIOCLEX/FIONCLEX).
    SetCloexec { fd: i32, on: bool },
    /// close-on-exec set on every fd in `first..=last` (close_range CLOSE_RANGE_CLOEXEC).
    CloexecRange { first: u32, last: u32 },
    /// A followed child was forked; its table starts as a copy of this process's (or is the
    /// same table, with CLONE_FILES).
    Fork { child: u32, clone_flags: u64 },
    /// exec succeeded: every close-on-exec fd is gone.
    Exec,
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
    /// The table may have changed in a way no event describes (`reason`: an [`Unseen`] name):
    /// it is checked against the kernel's.
    Unseen { reason: &'static str, detail: u64 },
    /// The process stopped sharing its table (unshare(CLONE_FILES)): it keeps a copy.
    Unshare,
    /// Tun fd `fd` was attached to interface `name` (TUNSETIFF, TUNSETQUEUE).
    Iface { fd: i32, name: Option<String> },
    /// The process (a seccomp supervisor) put `file` at `fd` in the table of thread `target`
    /// (its id as the notification gave it) of another process.
    AddFd {
        target: u32,
        fd: i32,
        cloexec: bool,
        file: Option<KernelFile>,
    },
}

/// A decoded event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub ts_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    /// The syscall (or sched event) that reported it.
    pub source: &'static str,
    pub change: Change,
    /// The process's table was unshared first (close_range's CLOSE_RANGE_UNSHARE): a table it
    /// shared with other processes is theirs alone from now on.
    pub unshare: bool,
}

/// [`nr::TRACED`]'s names indexed by syscall number (every traced number is below 512, as
/// [`nr::TRACED_BITS`] has it): a look-up per event instead of a search.
const NAMES: [&str; 512] = {
    let mut names = ["unknown"; 512];
    let mut i = 0;
    while i < nr::TRACED.len() {
        names[nr::TRACED[i].0 as usize] = nr::TRACED[i].1;
        i += 1;
    }
    names
};

/// The syscall's name, for output.
pub fn syscall_name(n: u32) -> &'static str {
    NAMES.get(n as usize).copied().unwrap_or("unknown")
}

fn how(n: u32) -> Gain {
    match n {
        nr::OPEN | nr::OPENAT | nr::OPENAT2 | nr::CREAT | nr::OPEN_BY_HANDLE_AT => Gain::Open,
        nr::DUP | nr::DUP2 | nr::DUP3 | nr::FCNTL => Gain::Dup,
        nr::RECVMSG | nr::RECVMMSG => Gain::RecvFd,
        nr::PIDFD_GETFD => Gain::PidfdGetfd,
        _ => Gain::New,
    }
}

/// Decodes a raw event into a table change.
pub fn decode(raw: &Raw) -> Result<Event, DecodeError> {
    let e = &raw.event;
    let tail = raw.path();
    let kind = EventKind::try_from(e.kind).map_err(DecodeError::Kind)?;
    let n = e.nr as u32;
    let flag = |f: u8| e.flags & f != 0;
    let (source, change) = match kind {
        EventKind::Gain => {
            let file = flag(EventFlags::FILE).then(|| KernelFile {
                info: e.file,
                path: tail.as_ref().map(path_of),
                iface: tail.as_ref().and_then(|t| iface_of(&t.iface)),
            });
            let how = how(n);
            let from = (how == Gain::Dup).then_some(e.aux as i32);
            (
                syscall_name(n),
                Change::Gain {
                    fd: e.fd,
                    how,
                    cloexec: flag(EventFlags::CLOEXEC),
                    from,
                    file,
                },
            )
        }
        EventKind::Close => (syscall_name(n), Change::Close { fd: e.fd }),
        EventKind::CloseRange => {
            let (first, last) = (e.aux as u32, (e.aux >> 32) as u32);
            let change = if flag(EventFlags::CLOEXEC) {
                Change::CloexecRange { first, last }
            } else {
                Change::CloseRange { first, last }
            };
            (syscall_name(n), change)
        }
        EventKind::SetCloexec => (
            syscall_name(n),
            Change::SetCloexec {
                fd: e.fd,
                on: flag(EventFlags::CLOEXEC),
            },
        ),
        EventKind::Failed => (
            syscall_name(n),
            Change::Failed {
                errno: e.aux as i32,
                fd: (e.fd >= 0).then_some(e.fd),
                path: tail.as_ref().map(path_of),
            },
        ),
        EventKind::Fork => (
            "fork",
            Change::Fork {
                child: e.fd as u32,
                clone_flags: e.aux,
            },
        ),
        EventKind::Unshare => (syscall_name(n), Change::Unshare),
        EventKind::Iface => (
            syscall_name(n),
            Change::Iface {
                fd: e.fd,
                name: tail.as_ref().and_then(|t| iface_of(&t.iface)),
            },
        ),
        EventKind::AddFd => (
            syscall_name(n),
            Change::AddFd {
                target: e.aux as u32,
                fd: e.fd,
                cloexec: flag(EventFlags::CLOEXEC),
                file: flag(EventFlags::FILE).then_some(KernelFile {
                    info: e.file,
                    path: None,
                    iface: None,
                }),
            },
        ),
        EventKind::Exec => ("exec", Change::Exec),
        EventKind::Exit => ("exit", Change::Exit),
        EventKind::SendFd => (syscall_name(n), Change::SendFd { fd: e.fd }),
        EventKind::Unseen => (
            if flag(EventFlags::COMPAT) {
                "compat"
            } else {
                syscall_name(n)
            },
            Change::Unseen {
                reason: Unseen::name(e.aux & 0xff),
                detail: e.aux >> 8,
            },
        ),
    };
    Ok(Event {
        ts_ns: e.ts_ns,
        tgid: e.tgid,
        tid: e.tid,
        source,
        change,
        unshare: flag(EventFlags::UNSHARE),
    })
}

#[cfg(test)]
mod tests {
    use vmaudit_common::{EventWithPath, PATH_SLOTS};

    use super::*;

    fn raw(kind: EventKind, n: u32, fd: i32, aux: u64, flags: u8) -> RawEvent {
        RawEvent {
            ts_ns: 10,
            tgid: 7,
            tid: 8,
            kind: kind as u8,
            flags,
            nr: n as u16,
            fd,
            aux,
            file: FileInfo {
                ino: 5,
                ofd: 0xabc,
                rdev: 10 << 20 | 200,
                dev: 6,
                flags: 2,
                mode: 0o020666,
                _pad: 0,
            },
        }
    }

    fn bytes<T>(r: &T) -> Vec<u8> {
        // SAFETY: the types passed here are plain old data without padding; the slice covers
        // exactly the value.
        unsafe { std::slice::from_raw_parts((r as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    fn dec(r: RawEvent) -> Change {
        decode(&parse_raw(&bytes(&r)).unwrap()).unwrap().change
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
            (nr::MQ_OPEN, libc::SYS_mq_open),
            (nr::SECCOMP, libc::SYS_seccomp),
            (nr::OPEN_TREE, libc::SYS_open_tree),
            // libc has no SYS_open_tree_attr (Linux 6.15) yet.
            (nr::OPEN_TREE_ATTR, 467),
            (nr::FSOPEN, libc::SYS_fsopen),
            (nr::FSMOUNT, libc::SYS_fsmount),
            (nr::FSPICK, libc::SYS_fspick),
            (
                nr::LANDLOCK_CREATE_RULESET,
                libc::SYS_landlock_create_ruleset,
            ),
            (nr::UNSHARE, libc::SYS_unshare),
        ];
        for (ours, libc_nr) in pairs {
            assert_eq!(*ours as libc::c_long, *libc_nr, "{}", syscall_name(*ours));
        }
        assert_eq!(pairs.len(), nr::TRACED.len());
        for (n, name) in nr::TRACED {
            assert_eq!(syscall_name(*n), *name);
        }
        assert_eq!(syscall_name(511), "unknown");
        assert_eq!(syscall_name(u32::MAX), "unknown");
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
        let mut r = raw(EventKind::Exit, 0, -1, 0, 0);
        r.kind = 99;
        let b = bytes(&r);
        let parsed = parse_raw(&b).unwrap();
        assert_eq!(decode(&parsed).unwrap_err(), DecodeError::Kind(99));
        // A path flag with no tail behind it.
        let r = raw(EventKind::Gain, nr::OPENAT, 3, 0, EventFlags::PATH);
        assert!(matches!(
            parse_raw(&bytes(&r)).unwrap_err(),
            DecodeError::Length { got: 64, .. }
        ));
    }

    #[test]
    fn a_device_gain_carries_the_kernel_file_and_its_path() {
        let mut slots = [[0u8; PATH_SLOT]; PATH_SLOTS];
        for (i, name) in ["tun", "net", "dev"].iter().enumerate() {
            slots[i][..name.len()].copy_from_slice(name.as_bytes());
        }
        let ev = EventWithPath {
            event: raw(
                EventKind::Gain,
                nr::OPENAT,
                5,
                u64::MAX,
                EventFlags::FILE | EventFlags::PATH | EventFlags::CLOEXEC,
            ),
            path: PathTail {
                form: PathTail::COMPONENTS,
                depth: 3,
                complete: 1,
                slots,
                iface: *b"vmtap0\0\0\0\0\0\0\0\0\0\0",
            },
        };
        // Unaligned, as ring-buffer bytes may be.
        let mut buf = vec![0u8];
        buf.extend(bytes(&ev));
        let e = decode(&parse_raw(&buf[1..]).unwrap()).unwrap();
        assert_eq!(e.source, "openat");
        let Change::Gain {
            fd,
            how,
            cloexec,
            from,
            file,
        } = e.change
        else {
            panic!("{e:?}")
        };
        assert_eq!((fd, how, cloexec, from), (5, Gain::Open, true, None));
        let file = file.unwrap();
        assert_eq!(file.path.as_deref(), Some("/dev/net/tun"));
        assert_eq!(file.iface.as_deref(), Some("vmtap0"));
        assert_eq!((file.info.ino, file.info.ofd), (5, 0xabc));
    }

    #[test]
    fn a_reused_path_is_the_one_sent_for_the_same_inode() {
        let mut slots = [[0u8; PATH_SLOT]; PATH_SLOTS];
        for (i, name) in ["null", "dev"].iter().enumerate() {
            slots[i][..name.len()].copy_from_slice(name.as_bytes());
        }
        let walked = EventWithPath {
            event: raw(
                EventKind::Gain,
                nr::OPENAT,
                4,
                0,
                EventFlags::FILE | EventFlags::PATH,
            ),
            path: PathTail {
                form: PathTail::COMPONENTS,
                depth: 2,
                complete: 1,
                slots,
                iface: [0; vmaudit_common::IFNAMSIZ],
            },
        };
        let reused = raw(
            EventKind::Gain,
            nr::OPENAT,
            5,
            0,
            EventFlags::FILE | EventFlags::PATH_REUSED,
        );
        let mut other_inode = reused;
        other_inode.file.ino += 1;
        let mut memory = PathMemory::default();
        let mut path_after = |bytes: Vec<u8>| {
            let raw = parse_raw(&bytes).unwrap();
            let mut ev = decode(&raw).unwrap();
            memory.fill(&raw, &mut ev);
            let Change::Gain { file, .. } = ev.change else {
                panic!("{ev:?}")
            };
            file.unwrap().path
        };
        // Before any path was sent for the inode, none is made up.
        assert_eq!(path_after(bytes(&reused)), None);
        assert_eq!(path_after(bytes(&walked)).as_deref(), Some("/dev/null"));
        assert_eq!(path_after(bytes(&reused)).as_deref(), Some("/dev/null"));
        assert_eq!(path_after(bytes(&other_inode)), None);
        // A gain without the flag and without a path is not named from memory.
        let mut plain = reused;
        plain.flags = EventFlags::FILE;
        assert_eq!(path_after(bytes(&plain)), None);
    }

    #[test]
    fn an_incomplete_walk_says_so() {
        let mut slots = [[0u8; PATH_SLOT]; PATH_SLOTS];
        slots[0][..3].copy_from_slice(b"002");
        let tail = PathTail {
            form: PathTail::COMPONENTS,
            depth: 1,
            complete: 0,
            slots,
            iface: [0; vmaudit_common::IFNAMSIZ],
        };
        assert_eq!(path_of(&tail), "…/002");
    }

    #[test]
    fn dups_ranges_failures_and_unseen() {
        assert!(matches!(
            dec(raw(EventKind::Gain, nr::DUP3, 9, 3, EventFlags::FILE)),
            Change::Gain {
                fd: 9,
                how: Gain::Dup,
                from: Some(3),
                cloexec: false,
                ..
            }
        ));
        assert!(matches!(
            dec(raw(EventKind::Gain, nr::RECVMSG, 6, u64::MAX, 0)),
            Change::Gain {
                how: Gain::RecvFd,
                from: None,
                file: None,
                ..
            }
        ));
        assert_eq!(
            dec(raw(
                EventKind::CloseRange,
                nr::CLOSE_RANGE,
                -1,
                3 | (u32::MAX as u64) << 32,
                0
            )),
            Change::CloseRange {
                first: 3,
                last: u32::MAX
            }
        );
        assert_eq!(
            dec(raw(
                EventKind::CloseRange,
                nr::CLOSE_RANGE,
                -1,
                3 | 5 << 32,
                EventFlags::CLOEXEC
            )),
            Change::CloexecRange { first: 3, last: 5 }
        );
        assert_eq!(
            dec(raw(EventKind::Failed, nr::CLOSE, 4, 9, 0)),
            Change::Failed {
                errno: 9,
                fd: Some(4),
                path: None
            }
        );
        assert_eq!(
            dec(raw(EventKind::Fork, nr::CLONE, 99, 17, 0)),
            Change::Fork {
                child: 99,
                clone_flags: 17
            }
        );
        assert_eq!(
            dec(raw(EventKind::Unseen, 0, -1, 1 | 18 << 8 | 7 << 32, 0)),
            Change::Unseen {
                reason: "io_uring",
                detail: 18 | 7 << 24
            }
        );
    }
}
