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
    /// tid -> [`crate::Inflight`]: clone flags between the syscall's entry and the fork.
    pub const INFLIGHT: &str = "INFLIGHT";
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
}

/// Program names, as the eBPF object declares them.
pub mod programs {
    /// `syscalls/sys_enter_{clone,clone3,fork,vfork}`: keeps a watched thread's clone flags.
    pub const CLONE_ENTER: &str = "vmaudit_clone_enter";
    /// `raw_syscalls/sys_exit` raw tracepoint: reports a watched process's tracked syscalls.
    pub const SYS_EXIT: &str = "vmaudit_sys_exit";
    /// Does nothing: the cost floor of a `raw_syscalls/sys_exit` hook (`vmaudit noop-hook`).
    pub const NOOP: &str = "vmaudit_noop";
    /// `sched/sched_process_fork`.
    pub const SCHED_FORK: &str = "vmaudit_sched_fork";
    /// `sched/sched_process_exec`.
    pub const SCHED_EXEC: &str = "vmaudit_sched_exec";
    /// `sched/sched_process_exit`.
    pub const SCHED_EXIT: &str = "vmaudit_sched_exit";
}

/// Default size of the event ring buffer, in bytes (a power-of-two multiple of the page size).
pub const DEFAULT_RING_BYTES: u32 = 1 << 24;
/// Entries in the `INFLIGHT` map (threads of watched processes inside a tracked syscall).
pub const INFLIGHT_ENTRIES: u32 = 16384;
/// Slots of the `WATCH_FILTER` array (256 KiB).
pub const WATCH_FILTER_SLOTS: u32 = 65536;
/// Entries in the `WATCHED` map.
pub const WATCHED_ENTRIES: u32 = 16384;
/// Bytes of a path (open-family filename, exec filename) copied into an event.
pub const PATH_CAP: usize = 128;
/// Most SCM_RIGHTS fds read from one control message / one message / one recvmmsg call.
pub const MAX_RIGHTS_PER_CMSG: u32 = 16;
pub const MAX_CMSGS: u32 = 4;
pub const MAX_MMSGS: u32 = 4;

/// Flags stored as the value of the `WATCHED` map.
pub struct WatchFlags;
impl WatchFlags {
    /// Also watch children forked by this process (not threads), transitively.
    pub const FOLLOW_CHILDREN: u32 = 1;
}

/// What a [`RawEvent`] reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A tracked syscall returned: `nr`, `args` (as at entry), `ret`; `path` for the open family;
    /// `fds` for pipe/pipe2/socketpair.
    Syscall = 1,
    /// One fd received through SCM_RIGHTS by recvmsg/recvmmsg: `fds[0]`, `args` of the call.
    RecvFd = 2,
    /// A watched process forked a child that is now watched too: `args[0]` child pid,
    /// `args[1]` clone flags.
    Fork = 3,
    /// A watched process called exec successfully (close-on-exec fds are gone): `path` filename.
    Exec = 4,
    /// The last thread of a watched process exited: every fd is released.
    Exit = 5,
    /// One fd sent through SCM_RIGHTS by sendmsg/sendmmsg: `fds[0]`, `args` of the call.
    SendFd = 6,
}

impl TryFrom<u32> for EventKind {
    type Error = u32;
    fn try_from(v: u32) -> Result<Self, u32> {
        Ok(match v {
            1 => Self::Syscall,
            2 => Self::RecvFd,
            3 => Self::Fork,
            4 => Self::Exec,
            5 => Self::Exit,
            6 => Self::SendFd,
            other => return Err(other),
        })
    }
}

/// Why the kernel side could not deliver an event. Index into the `LOSSES` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossCause {
    /// The ring buffer was full.
    RingFull = 0,
    /// No room in `INFLIGHT` to remember a clone's flags: a followed child may be missed.
    InflightFull = 1,
    /// Reading the fds a syscall wrote to user memory (pipe, socketpair, SCM_RIGHTS) failed.
    UserRead = 2,
    /// More SCM_RIGHTS fds arrived in one call than the kernel side reads.
    TooManyFds = 3,
    /// A followed child could not be added to `WATCHED`.
    WatchFull = 4,
}

impl LossCause {
    pub const COUNT: u32 = 5;
    pub const ALL: [LossCause; 5] = [
        Self::RingFull,
        Self::InflightFull,
        Self::UserRead,
        Self::TooManyFds,
        Self::WatchFull,
    ];
    pub const fn name(self) -> &'static str {
        match self {
            Self::RingFull => "ring_full",
            Self::InflightFull => "inflight_full",
            Self::UserRead => "user_read",
            Self::TooManyFds => "too_many_fds",
            Self::WatchFull => "watch_full",
        }
    }
}

/// A watched thread's clone/fork arguments, kept from the syscall's entry to sched_process_fork
/// (and, inside the exit program, a tracked syscall's number and arguments).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Inflight {
    pub nr: u64,
    pub args: [u64; 4],
}
const _: () = assert!(size_of::<Inflight>() == 40);

/// One event from the kernel side.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RawEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Syscall return value (negative errno on failure); 0 for other kinds.
    pub ret: i64,
    /// Syscall arguments as at entry, or kind-specific values (see [`EventKind`]).
    pub args: [u64; 4],
    pub tgid: u32,
    pub tid: u32,
    /// An [`EventKind`].
    pub kind: u32,
    /// Syscall number (x86_64 numbering, see [`nr`]).
    pub nr: u32,
    /// fds written to user memory (pipe/socketpair), or received (RecvFd: `fds[0]`); -1 if none.
    pub fds: [i32; 2],
    /// Bytes of `path` in use.
    pub path_len: u32,
    pub _pad: u32,
    pub path: [u8; PATH_CAP],
}
const _: () = assert!(size_of::<RawEvent>() == 208);

impl RawEvent {
    pub const SIZE: usize = size_of::<RawEvent>();
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, `Copy`, only integer fields and no implicit padding (sizes asserted).
    unsafe impl aya::Pod for super::Inflight {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RawEvent {}
}
