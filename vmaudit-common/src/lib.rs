//! Types shared by vmaudit's kernel programs and its userspace.
//!
//! Everything here crosses the kernel boundary as raw bytes, so every struct is
//! `#[repr(C)]`, `Copy`, free of implicit padding, and has its size asserted.
//! `aya::Pod` is implemented only behind the `user` feature, so the eBPF crate
//! does not pull aya in.
#![no_std]

use core::mem::size_of;

pub mod devcg;
pub mod nr;

/// Map names, as the eBPF object declares them.
pub mod maps {
    /// tgid -> [`crate::WatchFlags`]: the processes being watched.
    pub const WATCHED: &str = "WATCHED";
    /// The program array `vmaudit_sys_exit` tail-calls (slot 0: `vmaudit_sys_exit_watched`).
    pub const SYS_EXIT_WATCHED: &str = "SYS_EXIT_WATCHED";
    /// The ring buffer of [`crate::RawEvent`]s.
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU counters of events the kernel side could not deliver, indexed by [`crate::LossCause`].
    pub const LOSSES: &str = "LOSSES";
    /// tgid -> number of events lost for that process (so only its table is resynced).
    pub const LOST_TGIDS: &str = "LOST_TGIDS";
    /// tid -> 1: threads whose own syscalls are not reported (vmaudit's consumer thread).
    pub const IGNORED_TIDS: &str = "IGNORED_TIDS";
    /// Array pre-filter in front of `WATCHED`, indexed by `tgid % WATCH_FILTER_SLOTS`.
    pub const WATCH_FILTER: &str = "WATCH_FILTER";
    /// One slot, set to 1 by the consumer before it sleeps: the next submit wakes it.
    pub const CONSUMER: &str = "CONSUMER";
    /// io_uring request -> (tgid, opcode): fd-changing requests of watched processes in flight.
    pub const URING_REQS: &str = "URING_REQS";
    /// seccomp notification id -> the thread it stopped: the target of an ADDFD on it.
    pub const NOTIF_TARGETS: &str = "NOTIF_TARGETS";
}

/// Program names, as the eBPF object declares them.
pub mod programs {
    /// `raw_syscalls/sys_exit` raw tracepoint: the filter, which jumps to
    /// [`SYS_EXIT_WATCHED`] for a process that may be watched.
    pub const SYS_EXIT: &str = "vmaudit_sys_exit";
    /// The tracker's `sys_exit` proper: reports a watched process's tracked syscalls.
    pub const SYS_EXIT_WATCHED: &str = "vmaudit_sys_exit_watched";
    /// Does nothing: the cost floor of a `raw_syscalls/sys_exit` hook (`vmaudit noop-hook`).
    pub const NOOP: &str = "vmaudit_noop";
    /// Sends a bare event per syscall exit of one process, reading nothing: the cost floor of
    /// any tracer that sends an event per fd change (`vmaudit noop-hook --emit-for PID`).
    pub const EMIT_FLOOR: &str = "vmaudit_emit_floor";
    /// `sched_process_fork` raw tracepoint (the parent's and the child's `task_struct`).
    pub const SCHED_FORK: &str = "vmaudit_sched_fork";
    /// `sched/sched_process_exec`.
    pub const SCHED_EXEC: &str = "vmaudit_sched_exec";
    /// `sched/sched_process_exit`.
    pub const SCHED_EXIT: &str = "vmaudit_sched_exit";
    /// `io_uring/io_uring_submit_req`.
    pub const URING_SUBMIT: &str = "vmaudit_uring_submit";
    /// `io_uring/io_uring_complete`.
    pub const URING_COMPLETE: &str = "vmaudit_uring_complete";
    /// task_file iterator: one [`crate::IterRecord`] per fd of the process it is linked to.
    pub const ITER_TASK_FILE: &str = "vmaudit_iter_task_file";
}

/// Default size of the event ring buffer, in bytes (a power-of-two multiple of the page size).
pub const DEFAULT_RING_BYTES: u32 = 1 << 24;
/// Bytes pending in the ring buffer whose crossing wakes the consumer: the submit that takes the
/// pending bytes past it wakes the consumer once. Other events are submitted with
/// `BPF_RB_NO_WAKEUP`, and the consumer's periodic drain picks them up: a busy producer then
/// costs one wake-up per crossing, not one per event.
pub const WAKEUP_BYTES: u64 = 64 * 1024;
/// Entries in the `URING_REQS` map (fd-changing io_uring requests of watched processes in
/// flight).
pub const INFLIGHT_ENTRIES: u32 = 16384;
/// Slots of the `WATCH_FILTER` array (256 KiB).
pub const WATCH_FILTER_SLOTS: u32 = 65536;
/// Entries in the `WATCHED` map.
pub const WATCHED_ENTRIES: u32 = 16384;

/// Flags stored as the value of the `WATCHED` map.
pub struct WatchFlags;
impl WatchFlags {
    /// Also watch children forked by this process (not threads), transitively.
    pub const FOLLOW_CHILDREN: u32 = 1;
}

/// What an [`Event`] reports.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `fd` is now in the table, holding `file` (read from the task's fd table at the
    /// syscall's exit). `nr` says how it came; `aux`: the fd it duplicates (dup family), or
    /// -1. [`EventFlags::CLOEXEC`] is the table's close-on-exec bit.
    Gain = 1,
    /// `fd` was closed.
    Close = 2,
    /// Every fd in `aux as u32 ..= (aux >> 32) as u32` was closed, or with
    /// [`EventFlags::CLOEXEC`] made close-on-exec (close_range).
    CloseRange = 3,
    /// close-on-exec set ([`EventFlags::CLOEXEC`]) or cleared on `fd`.
    SetCloexec = 4,
    /// The syscall `nr` failed with errno `aux`; `fd` is the fd it named (close, dup2), or -1.
    Failed = 5,
    /// A watched process forked child `fd` (a pid), now watched too; `aux`: `CLONE_FILES` when
    /// the child shares its fd table, else 0.
    Fork = 6,
    /// A watched process called exec successfully (close-on-exec fds are gone).
    Exec = 7,
    /// The last thread of a watched process exited: every fd is released.
    Exit = 8,
    /// `fd` was sent through SCM_RIGHTS by sendmsg/sendmmsg (the sender keeps it).
    SendFd = 9,
    /// The process did something that may change its table in a way the probes do not follow
    /// (an [`Unseen`] reason in `aux`): userspace checks the table against the kernel's.
    Unseen = 10,
    /// The process stopped sharing its table with other processes (unshare(CLONE_FILES)):
    /// it now has a copy of its own.
    Unshare = 11,
    /// SECCOMP_IOCTL_NOTIF_ADDFD put `file` at `fd` in the table of another process: `aux` is
    /// that process's thread id as the notification named it (`tgid`/`tid`: the supervisor);
    /// [`EventFlags::CLOEXEC`] as the supervisor asked.
    AddFd = 12,
    /// The tun fd `fd` was attached to an interface (TUNSETIFF, TUNSETQUEUE): its name is the
    /// [`PathTail::iface`] that follows.
    Iface = 13,
}

impl TryFrom<u8> for EventKind {
    type Error = u8;
    fn try_from(v: u8) -> Result<Self, u8> {
        Ok(match v {
            1 => Self::Gain,
            2 => Self::Close,
            3 => Self::CloseRange,
            4 => Self::SetCloexec,
            5 => Self::Failed,
            6 => Self::Fork,
            7 => Self::Exec,
            8 => Self::Exit,
            9 => Self::SendFd,
            10 => Self::Unseen,
            11 => Self::Unshare,
            12 => Self::AddFd,
            13 => Self::Iface,
            other => return Err(other),
        })
    }
}

/// Bits of [`Event::flags`].
pub struct EventFlags;
impl EventFlags {
    /// Gain: the fd is close-on-exec. SetCloexec: set (not cleared). CloseRange: only made
    /// close-on-exec (CLOSE_RANGE_CLOEXEC).
    pub const CLOEXEC: u8 = 1;
    /// `file` was read from the kernel (a Gain whose fd slot was empty again, because another
    /// thread closed it first, has no file).
    pub const FILE: u8 = 2;
    /// A [`PathTail`] follows the event in the same record.
    pub const PATH: u8 = 4;
    /// The syscall was a 32-bit compat one (`int 0x80`); `nr` is already in x86_64 numbering.
    pub const COMPAT: u8 = 8;
    /// CloseRange: the caller's table was unshared first (CLOSE_RANGE_UNSHARE).
    pub const UNSHARE: u8 = 16;
    /// Gain of a device file whose dentry and mount are those of the last path sent for the
    /// same inode (`file.dev`, `file.ino`) less than [`PATH_REUSE_NS`] ago: no [`PathTail`]
    /// follows, the path is that one.
    pub const PATH_REUSED: u8 = 32;
}

/// How long a device file's path, once sent, stands for later gains of the same dentry and
/// mount: a rename within it is seen at the first gain after it ends.
pub const PATH_REUSE_NS: u64 = 1_000_000_000;
/// Slots of the programs' memory of the paths they sent (`PATHS_SENT`), indexed by inode.
pub const PATHS_SENT_SLOTS: u32 = 1024;

/// Why an [`EventKind::Unseen`] was sent.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unseen {
    /// io_uring submitted a request that may install or close an fd.
    IoUring = 1,
    /// A 32-bit compat syscall that the tracker does not decode.
    Compat = 2,
    /// More messages or fds in one call than the probe reads.
    TooMany = 3,
    /// SECCOMP_IOCTL_NOTIF_ADDFD put an fd into the table of the notifier's target (`aux >>
    /// 32`: the fd number there), a process the probe cannot name.
    SeccompAddfd = 4,
}

impl Unseen {
    pub const fn name(v: u64) -> &'static str {
        match v {
            1 => "io_uring",
            2 => "compat_syscall",
            3 => "too_many_fds",
            4 => "seccomp_addfd",
            _ => "unknown",
        }
    }
}

/// Why the kernel side could not deliver an event. Index into the `LOSSES` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossCause {
    /// The ring buffer was full.
    RingFull = 0,
    /// No room in `URING_REQS` to remember an fd-changing io_uring request until it completes:
    /// its completion is not checked.
    InflightFull = 1,
    /// Reading the fds a syscall wrote to user memory (pipe, socketpair, SCM_RIGHTS) failed.
    UserRead = 2,
    /// A message's control buffer is longer than one `bpf_loop` can read (more than 32 MiB,
    /// which no kernel accepts), or bpf_loop refused: its fds were not read.
    TooManyFds = 3,
    /// A followed child could not be added to `WATCHED`.
    WatchFull = 4,
    /// Reading the task's fd table or the file behind a new fd failed.
    KernelRead = 5,
    /// The child's pid, tgid or fd table could not be read at `sched_process_fork`: the child
    /// is not followed.
    ForkRead = 6,
}

impl LossCause {
    pub const COUNT: u32 = 7;
    pub const ALL: [LossCause; 7] = [
        Self::RingFull,
        Self::InflightFull,
        Self::UserRead,
        Self::TooManyFds,
        Self::WatchFull,
        Self::KernelRead,
        Self::ForkRead,
    ];
    pub const fn name(self) -> &'static str {
        match self {
            Self::RingFull => "ring_full",
            Self::InflightFull => "inflight_full",
            Self::UserRead => "user_read",
            Self::TooManyFds => "too_many_fds",
            Self::WatchFull => "watch_full",
            Self::KernelRead => "kernel_read",
            Self::ForkRead => "fork_read",
        }
    }
}

/// What the kernel says about the file behind an fd, read at the hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileInfo {
    /// `inode->i_ino`.
    pub ino: u64,
    /// The open file description's id: the `struct file`'s address hashed with a per-boot
    /// secret key ([`ofd::id`]), so no kernel address leaves the kernel.
    pub ofd: u64,
    /// `inode->i_rdev`, kernel encoding (major << 20 | minor).
    pub rdev: u32,
    /// `inode->i_sb->s_dev`, kernel encoding.
    pub dev: u32,
    /// `file->f_flags` (open flags; O_CLOEXEC is not among them: see [`EventFlags::CLOEXEC`]).
    pub flags: u32,
    /// `inode->i_mode` (file type and permissions).
    pub mode: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<FileInfo>() == 32);

/// One event from the kernel side: 64 bytes, followed by a [`PathTail`] when
/// [`EventFlags::PATH`] is set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    /// An [`EventKind`].
    pub kind: u8,
    /// [`EventFlags`] bits.
    pub flags: u8,
    /// Syscall number (x86_64 numbering, see [`nr`]); 0 for sched events.
    pub nr: u16,
    /// The fd concerned, or -1; Fork: the child's pid.
    pub fd: i32,
    /// Kind-specific (see [`EventKind`]).
    pub aux: u64,
    pub file: FileInfo,
}
const _: () = assert!(size_of::<Event>() == 64);

impl Event {
    pub const SIZE: usize = size_of::<Event>();
}

/// Path components of a device file (leaf first, each NUL-padded), or one name (a failed
/// open's path as the caller gave it, an exec's filename) in the first [`PATH_SLOT`]s joined.
pub const PATH_SLOTS: usize = 6;
/// Bytes of one path component slot.
pub const PATH_SLOT: usize = 48;

/// What follows an [`Event`] with [`EventFlags::PATH`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PathTail {
    /// [`PathTail::COMPONENTS`] (a device file's dentries, leaf first, in `slots`) or
    /// [`PathTail::STRING`] (one string across the slots).
    pub form: u32,
    /// Components written (COMPONENTS); whether the walk reached the root is `depth <
    /// PATH_SLOTS` or the root flag.
    pub depth: u16,
    /// 1 when the walk reached the root of the mount tree (the path is complete).
    pub complete: u16,
    pub slots: [[u8; PATH_SLOT]; PATH_SLOTS],
    /// The network interface of a tun/tap fd, NUL-padded (empty when it has none yet), read
    /// from the kernel: the file's `tun_file` → `tun_struct` → `net_device.name`.
    pub iface: [u8; IFNAMSIZ],
}
const _: () = assert!(size_of::<PathTail>() == 8 + PATH_SLOT * PATH_SLOTS + IFNAMSIZ);

/// Bytes of a network interface's name, its NUL included.
pub const IFNAMSIZ: usize = 16;

impl PathTail {
    pub const COMPONENTS: u32 = 1;
    pub const STRING: u32 = 2;
}

/// An event and its path, as reserved in the ring buffer for device files.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventWithPath {
    pub event: Event,
    pub path: PathTail,
}
const _: () = assert!(size_of::<EventWithPath>() == 64 + size_of::<PathTail>());

/// Offsets (bytes) of the kernel fields the programs read, from the running kernel's BTF;
/// written by userspace into the programs' read-only data before loading, so that one object
/// serves every kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.files`
    pub task_files: u32,
    /// `files_struct.fdt`
    pub files_fdt: u32,
    /// `fdtable.max_fds`
    pub fdt_max_fds: u32,
    /// `fdtable.fd`
    pub fdt_fd: u32,
    /// `fdtable.close_on_exec`
    pub fdt_close_on_exec: u32,
    /// `file.f_inode`
    pub file_inode: u32,
    /// `file.f_flags`
    pub file_flags: u32,
    /// `file.f_path.dentry`
    pub file_dentry: u32,
    /// `file.f_path.mnt`
    pub file_mnt: u32,
    /// `inode.i_mode`
    pub inode_mode: u32,
    /// `inode.i_ino`
    pub inode_ino: u32,
    /// `inode.i_rdev`
    pub inode_rdev: u32,
    /// `inode.i_sb`
    pub inode_sb: u32,
    /// `super_block.s_dev`
    pub sb_dev: u32,
    /// `dentry.d_name.name`
    pub dentry_name: u32,
    /// `dentry.d_parent`
    pub dentry_parent: u32,
    /// `mount.mnt`: where the `vfsmount` sits inside its `struct mount`.
    pub mount_mnt: u32,
    /// `mount.mnt_parent`
    pub mount_parent: u32,
    /// `mount.mnt_mountpoint`
    pub mount_mountpoint: u32,
    /// `vfsmount.mnt_root`
    pub vfsmount_root: u32,
    /// `task_struct.thread_info.status` (x86: `TS_COMPAT` tells a 32-bit syscall).
    pub task_ti_status: u32,
    /// `task_struct.pid` (the thread's id)
    pub task_pid: u32,
    /// `task_struct.tgid` (the process's id)
    pub task_tgid: u32,
    /// `file.private_data` (a tun fd's `struct tun_file`).
    pub file_private: u32,
    /// `tun_file.tun`: the `tun_struct` the fd is attached to (NULL before TUNSETIFF).
    pub tun_file_tun: u32,
    /// `tun_struct.dev`
    pub tun_dev: u32,
    /// `net_device.name`
    pub netdev_name: u32,
    /// Non-zero when the tun offsets above are known (a kernel without tun has no such types).
    pub tun_ready: u32,
    /// Non-zero once userspace has filled this in (a program loaded without it reads nothing).
    pub ready: u32,
}
const _: () = assert!(size_of::<KernelOffsets>() == 116);

impl KernelOffsets {
    /// What the object is built with; the loader replaces it.
    pub const ZERO: Self = Self {
        task_files: 0,
        files_fdt: 0,
        fdt_max_fds: 0,
        fdt_fd: 0,
        fdt_close_on_exec: 0,
        file_inode: 0,
        file_flags: 0,
        file_dentry: 0,
        file_mnt: 0,
        inode_mode: 0,
        inode_ino: 0,
        inode_rdev: 0,
        inode_sb: 0,
        sb_dev: 0,
        dentry_name: 0,
        dentry_parent: 0,
        mount_mnt: 0,
        mount_parent: 0,
        mount_mountpoint: 0,
        vfsmount_root: 0,
        task_ti_status: 0,
        task_pid: 0,
        task_tgid: 0,
        file_private: 0,
        tun_file_tun: 0,
        tun_dev: 0,
        netdev_name: 0,
        tun_ready: 0,
        ready: 0,
    };
}

/// Offsets of the io_uring tracepoint fields the programs read (from tracefs's format files).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UringOffsets {
    /// `io_uring_submit_req`: `req`.
    pub submit_req: u32,
    /// `io_uring_submit_req`: `opcode` (u8).
    pub submit_opcode: u32,
    /// `io_uring_complete`: `req`.
    pub complete_req: u32,
    /// `io_uring_complete`: `res` (int).
    pub complete_res: u32,
}
const _: () = assert!(size_of::<UringOffsets>() == 16);

/// One fd of a task_file iterator snapshot (written by the iterator program, 64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IterRecord {
    pub tgid: u32,
    pub fd: i32,
    /// 1 when close-on-exec.
    pub cloexec: u32,
    pub _pad: u32,
    pub file: FileInfo,
    /// A tun/tap fd's interface (see [`PathTail::iface`]).
    pub iface: [u8; IFNAMSIZ],
}
const _: () = assert!(size_of::<IterRecord>() == 64);

/// io_uring opcodes that install or close an fd of the process's table.
pub mod uring {
    pub const ACCEPT: u8 = 13;
    pub const OPENAT: u8 = 18;
    pub const CLOSE: u8 = 19;
    pub const OPENAT2: u8 = 28;
    pub const SOCKET: u8 = 45;
    pub const FIXED_FD_INSTALL: u8 = 54;
    pub const fn changes_fds(op: u8) -> bool {
        matches!(
            op,
            ACCEPT | OPENAT | CLOSE | OPENAT2 | SOCKET | FIXED_FD_INSTALL
        )
    }
}

/// Names of the programs' global data, set by userspace at load.
pub mod globals {
    /// [`crate::KernelOffsets`].
    pub const OFFSETS: &str = "VMAUDIT_OFFSETS";
    /// `[u64; 2]`: the per-boot secret key of [`crate::ofd::id`].
    pub const OFD_KEY: &str = "VMAUDIT_OFD_KEY";
    /// `u64`: [`crate::WAKEUP_BYTES`], or another threshold.
    pub const WAKEUP_BYTES: &str = "VMAUDIT_WAKEUP_BYTES";
    /// [`crate::UringOffsets`].
    pub const URING: &str = "VMAUDIT_URING";
    /// `u32`: the one process the floor program sends events for.
    pub const FLOOR_PID: &str = "VMAUDIT_FLOOR_PID";
}

pub mod ofd {
    //! Open-file-description ids: SipHash-2-4 of a `struct file`'s address under a 128-bit
    //! secret key. SipHash is a keyed pseudo-random function, so ids compare equal exactly when
    //! the files are the same (up to a 2^-64 collision) and say nothing about the address.

    #[inline(always)]
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13);
        v[1] ^= v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16);
        v[3] ^= v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21);
        v[3] ^= v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17);
        v[1] ^= v[2];
        v[2] = v[2].rotate_left(32);
    }

    /// SipHash-2-4 of the 8 bytes of `addr` (little-endian) under `key`.
    #[inline(always)]
    pub fn id(key: [u64; 2], addr: u64) -> u64 {
        let mut v = [
            key[0] ^ 0x736f_6d65_7073_6575,
            key[1] ^ 0x646f_7261_6e64_6f6d,
            key[0] ^ 0x6c79_6765_6e65_7261,
            key[1] ^ 0x7465_6462_7974_6573,
        ];
        let m = addr;
        v[3] ^= m;
        round(&mut v);
        round(&mut v);
        v[0] ^= m;
        // The last block holds only the message length (8) in its top byte.
        let b: u64 = 8 << 56;
        v[3] ^= b;
        round(&mut v);
        round(&mut v);
        v[0] ^= b;
        v[2] ^= 0xff;
        round(&mut v);
        round(&mut v);
        round(&mut v);
        round(&mut v);
        v[0] ^ v[1] ^ v[2] ^ v[3]
    }
}

/// A kernel `dev_t` (major << 20 | minor) split into (major, minor).
pub const fn kdev_split(dev: u32) -> (u32, u32) {
    (dev >> 20, dev & 0xf_ffff)
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, `Copy`, only integer fields and no implicit padding (sizes asserted).
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UringOffsets {}
}
