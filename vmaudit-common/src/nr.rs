//! x86_64 syscall numbers of the syscalls vmaudit traces.
//!
//! The eBPF side is compiled for `bpfel-unknown-none` and cannot ask libc for the host's
//! numbering, so the numbers live here; a userspace unit test checks them against
//! `libc::SYS_*`. Only x86_64 is supported for now (the userspace crate refuses other targets).

pub const IOCTL: u32 = 16;
pub const OPEN: u32 = 2;
pub const CLOSE: u32 = 3;
pub const PIPE: u32 = 22;
pub const DUP: u32 = 32;
pub const DUP2: u32 = 33;
pub const SOCKET: u32 = 41;
pub const ACCEPT: u32 = 43;
pub const SENDMSG: u32 = 46;
pub const RECVMSG: u32 = 47;
pub const SOCKETPAIR: u32 = 53;
pub const CLONE: u32 = 56;
pub const FORK: u32 = 57;
pub const VFORK: u32 = 58;
pub const FCNTL: u32 = 72;
pub const CREAT: u32 = 85;
pub const EPOLL_CREATE: u32 = 213;
pub const INOTIFY_INIT: u32 = 253;
pub const OPENAT: u32 = 257;
pub const SIGNALFD: u32 = 282;
pub const TIMERFD_CREATE: u32 = 283;
pub const EVENTFD: u32 = 284;
pub const ACCEPT4: u32 = 288;
pub const SIGNALFD4: u32 = 289;
pub const EVENTFD2: u32 = 290;
pub const EPOLL_CREATE1: u32 = 291;
pub const DUP3: u32 = 292;
pub const PIPE2: u32 = 293;
pub const INOTIFY_INIT1: u32 = 294;
pub const PERF_EVENT_OPEN: u32 = 298;
pub const RECVMMSG: u32 = 299;
pub const SENDMMSG: u32 = 307;
pub const FANOTIFY_INIT: u32 = 300;
pub const OPEN_BY_HANDLE_AT: u32 = 304;
pub const MEMFD_CREATE: u32 = 319;
pub const BPF: u32 = 321;
pub const USERFAULTFD: u32 = 323;
pub const IO_URING_SETUP: u32 = 425;
pub const PIDFD_OPEN: u32 = 434;
pub const CLONE3: u32 = 435;
pub const CLOSE_RANGE: u32 = 436;
pub const OPENAT2: u32 = 437;
pub const PIDFD_GETFD: u32 = 438;
pub const MEMFD_SECRET: u32 = 447;
pub const MQ_OPEN: u32 = 240;
pub const UNSHARE: u32 = 272;
pub const SECCOMP: u32 = 317;
pub const OPEN_TREE: u32 = 428;
pub const FSOPEN: u32 = 430;
pub const FSMOUNT: u32 = 432;
pub const FSPICK: u32 = 433;
pub const LANDLOCK_CREATE_RULESET: u32 = 444;
pub const OPEN_TREE_ATTR: u32 = 467;

/// `seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, ..)` returns a notifier
/// fd; other seccomp calls return none.
pub const SECCOMP_SET_MODE_FILTER: u64 = 1;
pub const SECCOMP_FILTER_FLAG_NEW_LISTENER: u64 = 1 << 3;
/// `unshare(CLONE_FILES)` and `close_range(.., CLOSE_RANGE_UNSHARE)` give the caller a table
/// of its own (a copy of the one it shared).
pub const CLONE_FILES: u64 = 0x400;
pub const CLOSE_RANGE_UNSHARE: u64 = 1 << 1;

/// ioctl requests that matter to an fd table; every other ioctl is filtered out in the kernel
/// (qemu issues millions of KVM_RUN ioctls).
pub mod ioctl {
    /// Set close-on-exec.
    pub const FIOCLEX: u64 = 0x5451;
    /// Clear close-on-exec.
    pub const FIONCLEX: u64 = 0x5450;
    /// Returns a new VM fd.
    pub const KVM_CREATE_VM: u64 = 0xAE01;
    /// Returns a new vCPU fd.
    pub const KVM_CREATE_VCPU: u64 = 0xAE41;
    /// Returns a new stats fd.
    pub const KVM_GET_STATS_FD: u64 = 0xAECE;
    /// Writes a new device fd into `struct kvm_create_device.fd` (offset 4) and returns 0.
    pub const KVM_CREATE_DEVICE: u64 = 0xC00C_AEE0;
    /// Returns an fd of the tun device's network namespace.
    pub const TUNGETDEVNETNS: u64 = 0x54E3;
    /// Returns an fd of a socket's network namespace.
    pub const SIOCGSKNS: u64 = 0x894C;
    /// Return an fd of a namespace's owning user namespace / parent namespace.
    pub const NS_GET_USERNS: u64 = 0xB701;
    pub const NS_GET_PARENT: u64 = 0xB702;
    /// Return an fd of the next / previous mount namespace.
    pub const NS_MNT_GET_NEXT: u64 = 0x8010_B70C;
    pub const NS_MNT_GET_PREV: u64 = 0x8010_B70D;
    /// Returns an fd of the pty's peer.
    pub const TIOCGPTPEER: u64 = 0x5441;
    /// Returns a VFIO device fd.
    pub const VFIO_GROUP_GET_DEVICE_FD: u64 = 0x3B6A;
    /// Installs an fd in *another* process (a seccomp notifier's target) and returns its number
    /// there.
    pub const SECCOMP_IOCTL_NOTIF_ADDFD: u64 = 0x4018_2103;
    /// Receives a seccomp notification: `struct seccomp_notif { u64 id; u32 pid; .. }`, the
    /// target an ADDFD on that id puts an fd into.
    pub const SECCOMP_IOCTL_NOTIF_RECV: u64 = 0xC050_2100;
    /// Answers a notification (`struct seccomp_notif_resp { u64 id; .. }`): no ADDFD follows.
    pub const SECCOMP_IOCTL_NOTIF_SEND: u64 = 0xC018_2101;
    /// Attach a tun fd to an interface (by name, `%d` numbered by the kernel), or a queue of
    /// a multiqueue one.
    pub const TUNSETIFF: u64 = 0x4004_54CA;
    pub const TUNSETQUEUE: u64 = 0x4004_54D9;
    /// Returns a guest_memfd fd of the VM.
    pub const KVM_CREATE_GUEST_MEMFD: u64 = 0xC040_AED4;
    /// `PIDFD_GET_*_NAMESPACE` (`_IO(0xFF, 1..=10)`): return a namespace fd.
    pub const PIDFD_GET_NS_FIRST: u64 = 0xFF01;
    pub const PIDFD_GET_NS_LAST: u64 = 0xFF0A;

    /// The request number as the kernel sees it (an `unsigned int`; glibc passes it
    /// zero-extended).
    #[inline(always)]
    pub const fn req(arg: u64) -> u64 {
        arg & 0xffff_ffff
    }

    /// Whether a successful ioctl with this request returns a new fd of the caller.
    #[inline(always)]
    pub const fn returns_fd(req: u64) -> bool {
        matches!(
            req,
            KVM_CREATE_VM
                | KVM_CREATE_VCPU
                | KVM_GET_STATS_FD
                | KVM_CREATE_GUEST_MEMFD
                | TUNGETDEVNETNS
                | SIOCGSKNS
                | NS_GET_USERNS
                | NS_GET_PARENT
                | NS_MNT_GET_NEXT
                | NS_MNT_GET_PREV
                | TIOCGPTPEER
                | VFIO_GROUP_GET_DEVICE_FD
        ) || (req >= PIDFD_GET_NS_FIRST && req <= PIDFD_GET_NS_LAST)
    }

    #[inline(always)]
    pub const fn is_tracked(arg: u64) -> bool {
        let r = req(arg);
        returns_fd(r)
            || matches!(
                r,
                FIOCLEX
                    | FIONCLEX
                    | KVM_CREATE_DEVICE
                    | SECCOMP_IOCTL_NOTIF_ADDFD
                    | SECCOMP_IOCTL_NOTIF_RECV
                    | SECCOMP_IOCTL_NOTIF_SEND
                    | TUNSETIFF
                    | TUNSETQUEUE
            )
    }
}

/// 32-bit compat (`int 0x80`) syscalls: their numbers are i386's, their arguments in ebx, ecx,
/// edx, esi, edi.
pub mod i386 {
    /// The x86_64 number of an i386 syscall the tracker decodes the same way (its arguments
    /// are integers, or pointers it reads the same way).
    #[inline(always)]
    pub const fn to_x86_64(nr: u64) -> Option<u32> {
        Some(match nr {
            5 => super::OPEN,
            6 => super::CLOSE,
            8 => super::CREAT,
            41 => super::DUP,
            42 => super::PIPE,
            54 => super::IOCTL,
            55 | 221 => super::FCNTL,
            63 => super::DUP2,
            295 => super::OPENAT,
            323 => super::EVENTFD,
            328 => super::EVENTFD2,
            330 => super::DUP3,
            331 => super::PIPE2,
            356 => super::MEMFD_CREATE,
            359 => super::SOCKET,
            // From 403 on, both tables share their numbers.
            425 => super::IO_URING_SETUP,
            434 => super::PIDFD_OPEN,
            436 => super::CLOSE_RANGE,
            437 => super::OPENAT2,
            438 => super::PIDFD_GETFD,
            447 => super::MEMFD_SECRET,
            _ => return None,
        })
    }

    /// i386 syscalls that change an fd table and are not decoded: socketcall, socketpair,
    /// accept4, the msg family, epoll_create(1), inotify_init(1), signalfd(4), timerfd_create,
    /// fanotify_init, perf_event_open, open_by_handle_at, bpf, userfaultfd, recvmmsg_time64.
    #[inline(always)]
    pub const fn changes_fds_undecoded(nr: u64) -> bool {
        matches!(
            nr,
            102 | 254
                | 291
                | 321
                | 322
                | 327
                | 329
                | 332
                | 336
                | 337
                | 338
                | 342
                | 345
                | 357
                | 360
                | 364
                | 370
                | 372
                | 374
                | 417
        )
    }
}

/// Every syscall vmaudit follows, with its name.
pub const TRACED: &[(u32, &str)] = &[
    (OPEN, "open"),
    (OPENAT, "openat"),
    (OPENAT2, "openat2"),
    (CREAT, "creat"),
    (OPEN_BY_HANDLE_AT, "open_by_handle_at"),
    (DUP, "dup"),
    (DUP2, "dup2"),
    (DUP3, "dup3"),
    (FCNTL, "fcntl"),
    (IOCTL, "ioctl"),
    (RECVMSG, "recvmsg"),
    (RECVMMSG, "recvmmsg"),
    (SENDMSG, "sendmsg"),
    (SENDMMSG, "sendmmsg"),
    (PIDFD_GETFD, "pidfd_getfd"),
    (PIDFD_OPEN, "pidfd_open"),
    (SOCKET, "socket"),
    (SOCKETPAIR, "socketpair"),
    (ACCEPT, "accept"),
    (ACCEPT4, "accept4"),
    (PIPE, "pipe"),
    (PIPE2, "pipe2"),
    (EVENTFD, "eventfd"),
    (EVENTFD2, "eventfd2"),
    (EPOLL_CREATE, "epoll_create"),
    (EPOLL_CREATE1, "epoll_create1"),
    (MEMFD_CREATE, "memfd_create"),
    (MEMFD_SECRET, "memfd_secret"),
    (SIGNALFD, "signalfd"),
    (SIGNALFD4, "signalfd4"),
    (TIMERFD_CREATE, "timerfd_create"),
    (INOTIFY_INIT, "inotify_init"),
    (INOTIFY_INIT1, "inotify_init1"),
    (FANOTIFY_INIT, "fanotify_init"),
    (USERFAULTFD, "userfaultfd"),
    (PERF_EVENT_OPEN, "perf_event_open"),
    (IO_URING_SETUP, "io_uring_setup"),
    (BPF, "bpf"),
    (MQ_OPEN, "mq_open"),
    (SECCOMP, "seccomp"),
    (OPEN_TREE, "open_tree"),
    (OPEN_TREE_ATTR, "open_tree_attr"),
    (FSOPEN, "fsopen"),
    (FSMOUNT, "fsmount"),
    (FSPICK, "fspick"),
    (LANDLOCK_CREATE_RULESET, "landlock_create_ruleset"),
    (UNSHARE, "unshare"),
    (CLOSE, "close"),
    (CLOSE_RANGE, "close_range"),
    (CLONE, "clone"),
    (CLONE3, "clone3"),
    (FORK, "fork"),
    (VFORK, "vfork"),
];

/// Bitmap of the syscall numbers in [`TRACED`], for an O(1) check in the kernel.
pub const TRACED_BITS: [u64; 8] = {
    let mut bits = [0u64; 8];
    let mut i = 0;
    while i < TRACED.len() {
        let n = TRACED[i].0 as usize;
        bits[n / 64] |= 1 << (n % 64);
        i += 1;
    }
    bits
};

/// Whether syscall `nr` is one vmaudit follows.
#[inline(always)]
pub fn is_traced(nr: u64) -> bool {
    nr < 512 && TRACED_BITS[(nr / 64) as usize] & (1 << (nr % 64)) != 0
}
