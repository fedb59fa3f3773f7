//! The fd tracker: syscall and sched tracepoints feeding the `EVENTS` ring buffer.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes, bpf_probe_read_user, bpf_probe_read_user_str_bytes,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use vmaudit_common::{
    DEFAULT_RING_BYTES, EventKind, INFLIGHT_ENTRIES, Inflight, LossCause, MAX_CMSGS, MAX_MMSGS,
    MAX_RIGHTS_PER_CMSG, RawEvent, WATCH_FILTER_SLOTS, WATCHED_ENTRIES, WatchFlags, nr,
};

#[map]
static WATCHED: HashMap<u32, u32> = HashMap::with_max_entries(WATCHED_ENTRIES, 0);

#[map]
static INFLIGHT: HashMap<u32, Inflight> = HashMap::with_max_entries(INFLIGHT_ENTRIES, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

#[map]
static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(LossCause::COUNT, 0);

#[map]
static LOST_TGIDS: HashMap<u32, u64> = HashMap::with_max_entries(WATCHED_ENTRIES, 0);

/// Threads of watched processes whose own syscalls are not reported (vmaudit's consumer).
#[map]
static IGNORED_TIDS: HashMap<u32, u8> = HashMap::with_max_entries(64, 0);

/// A pre-filter in front of `WATCHED`: slot `tgid % WATCH_FILTER_SLOTS` is non-zero when a
/// watched process may hash there. Array reads are inlined by the verifier, so an unwatched
/// process pays no helper call. Slots are set (by userspace, and here for followed children)
/// and never cleared: a stale slot only costs one hash lookup.
#[map]
static WATCH_FILTER: Array<u32> = Array::with_max_entries(WATCH_FILTER_SLOTS, 0);

// x86_64 `struct pt_regs`: the syscall arguments are in di, si, dx, r10 (then r8, r9), the
// syscall number in orig_ax. A syscall leaves these saved user registers as they were, so the
// exit sees the arguments of the entry.
const PT_REGS_ARG_OFF: [u64; 4] = [112, 104, 96, 56];
const PT_REGS_ORIG_AX_OFF: u64 = 120;
// Classic syscall tracepoint records (events/syscalls/*/format): `int __syscall_nr` at 8, the
// arguments as 8 bytes each from 16.
const SYSCALL_NR_OFF: usize = 8;
const SYSCALL_ARG0_OFF: usize = 16;
// sched_process_fork: `pid_t child_pid` at 20. sched_process_exec: `__data_loc char[] filename`
// at 8. sched_process_exit: `bool group_dead` at 32.
const FORK_CHILD_PID_OFF: usize = 20;
const EXEC_FILENAME_LOC_OFF: usize = 8;
const EXIT_GROUP_DEAD_OFF: usize = 32;

// x86_64 `struct msghdr`: msg_control at 32, msg_controllen at 40; `struct mmsghdr` is 64 bytes.
const MSGHDR_CONTROL_OFF: u64 = 32;
const MSGHDR_CONTROLLEN_OFF: u64 = 40;
const MMSGHDR_SIZE: u64 = 64;
const CMSG_HDR_LEN: u64 = 16;
const SOL_SOCKET: u64 = 1;
const SCM_RIGHTS: u64 = 1;

const F_DUPFD: u64 = 0;
const F_SETFD: u64 = 2;
const F_DUPFD_CLOEXEC: u64 = 1030;
const CLONE_VM: u64 = 0x100;
const CLONE_VFORK: u64 = 0x4000;
const CLONE_THREAD: u64 = 0x10000;
const SIGCHLD: u64 = 17;

#[inline(always)]
fn ids() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

#[inline(always)]
fn maybe_watched(tgid: u32) -> bool {
    WATCH_FILTER
        .get(tgid % WATCH_FILTER_SLOTS)
        .is_some_and(|v| *v != 0)
}

#[inline(always)]
fn is_watched(tgid: u32) -> Option<u32> {
    // SAFETY: the value is copied out at once; a concurrent delete can only make it stale.
    unsafe { WATCHED.get(tgid) }.copied()
}

/// Counts one undeliverable event, globally by cause and for the process it concerned.
#[inline(never)]
fn lose(cause: LossCause, tgid: u32) {
    if let Some(c) = LOSSES.get_ptr_mut(cause as u32) {
        // SAFETY: per-CPU slot, so no other CPU writes it; the pointer comes from the map.
        unsafe { *c += 1 };
    }
    match LOST_TGIDS.get_ptr_mut(tgid) {
        Some(p) => {
            // SAFETY: the pointer is a live map value of 8 bytes. Two CPUs may race on it and
            // undercount; what matters is that the entry exists (the global per-CPU counters
            // are exact).
            unsafe { *p += 1 };
        }
        None => {
            // Losing this insert loses nothing more: the global counter above already forces a
            // resync of every table when the per-process map cannot say which one.
            let _ = LOST_TGIDS.insert(tgid, 1, 0);
        }
    }
}

// Where the `path` of an event comes from. Plain integers, not an enum with payload: a BPF
// subprogram call must have every argument register initialised, and a payload-less variant
// leaves one unset.
const PATH_NONE: u64 = 0;
const PATH_USER: u64 = 1;
const PATH_KERNEL: u64 = 2;

struct Emit {
    kind: EventKind,
    tgid: u32,
    tid: u32,
    nr: u32,
    ret: i64,
    args: [u64; 4],
    fds: [i32; 2],
    /// One of PATH_NONE, PATH_USER, PATH_KERNEL.
    path_src: u64,
    path_ptr: u64,
}

#[inline(never)]
fn emit(e: &Emit) {
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        lose(LossCause::RingFull, e.tgid);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, writable ring-buffer slot of size_of::<RawEvent>();
    // every field is written before submit.
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).ret = e.ret;
        (*ev).args = e.args;
        (*ev).tgid = e.tgid;
        (*ev).tid = e.tid;
        (*ev).kind = e.kind as u32;
        (*ev).nr = e.nr;
        (*ev).fds = e.fds;
        (*ev)._pad = 0;
        (*ev).path_len = 0;
        let buf = &mut (*ev).path;
        let got = match e.path_src {
            PATH_USER => bpf_probe_read_user_str_bytes(e.path_ptr as *const u8, buf).ok(),
            PATH_KERNEL => bpf_probe_read_kernel_str_bytes(e.path_ptr as *const u8, buf).ok(),
            _ => None,
        };
        if let Some(s) = got {
            (*ev).path_len = s.len() as u32;
        }
    }
    entry.submit(0);
}

#[inline(always)]
fn read_ctx<T>(ctx: &TracePointContext, off: usize) -> Option<T> {
    // SAFETY: read_at copies with bpf_probe_read_kernel, which tolerates any address.
    unsafe { ctx.read_at::<T>(off) }.ok()
}

#[inline(always)]
fn read_user<T>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_user copies from user memory and fails cleanly on a bad address.
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// `syscalls/sys_enter_{clone,clone3,fork,vfork}`: remembers a watched thread's clone flags for
/// `sched_process_fork`, which needs them to tell a child process from a thread. Per-syscall
/// tracepoints run only for these (rare) syscalls.
#[tracepoint]
pub fn vmaudit_clone_enter(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = ids();
    if !maybe_watched(tgid) || is_watched(tgid).is_none() {
        return 0;
    }
    let nr = read_ctx::<i32>(&ctx, SYSCALL_NR_OFF).unwrap_or(-1) as u64;
    let arg0 = read_ctx::<u64>(&ctx, SYSCALL_ARG0_OFF).unwrap_or(0);
    let inflight = Inflight {
        nr,
        args: [arg0, 0, 0, 0],
    };
    if INFLIGHT.insert(tid, inflight, 0).is_err() {
        lose(LossCause::InflightFull, tgid);
    }
    0
}

/// `raw_syscalls/sys_exit` (a raw tracepoint: `struct pt_regs *regs, long ret`), run for every
/// syscall of every process. An unwatched process costs an inlined array read; a watched
/// process's tracked syscall is reported with its arguments (still in the saved user
/// registers at exit) and its result.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn vmaudit_sys_exit(ctx: RawTracePointContext) -> i32 {
    let (tgid, tid) = ids();
    if !maybe_watched(tgid) {
        return 0;
    }
    let regs: u64 = ctx.arg(0);
    // SAFETY: bpf_probe_read_kernel copies from kernel memory and fails cleanly.
    let nr = unsafe { bpf_probe_read_kernel((regs + PT_REGS_ORIG_AX_OFF) as *const u64) }
        .unwrap_or(u64::MAX);
    if !nr::is_traced(nr) || is_watched(tgid).is_none() {
        return 0;
    }
    // vmaudit's own consumer thread, when vmaudit watches itself: its reads of /proc would
    // otherwise feed back into the ring forever.
    // SAFETY: only the presence of the key is read.
    if unsafe { IGNORED_TIDS.get(tid) }.is_some() {
        return 0;
    }
    let nr = nr as u32;
    if matches!(nr, nr::CLONE | nr::CLONE3 | nr::FORK | nr::VFORK) {
        // sched_process_fork has used the entry (in the parent); the child has none.
        let _ = INFLIGHT.remove(tid);
        return 0;
    }
    let mut args = [0u64; 4];
    let mut i = 0;
    while i < 4 {
        // SAFETY: as above.
        args[i] = unsafe { bpf_probe_read_kernel((regs + PT_REGS_ARG_OFF[i]) as *const u64) }
            .unwrap_or(0);
        i += 1;
    }
    // Filter requests that cannot change the fd table here, not in userspace: qemu issues
    // millions of ioctls and fcntls.
    if nr == nr::IOCTL && !nr::ioctl::is_tracked(args[1]) {
        return 0;
    }
    if nr == nr::FCNTL && !matches!(args[1], F_DUPFD | F_DUPFD_CLOEXEC | F_SETFD) {
        return 0;
    }
    let inf = Inflight {
        nr: nr as u64,
        args,
    };
    let ret: i64 = ctx.arg(1);
    let nr = inf.nr as u32;
    let mut e = Emit {
        kind: EventKind::Syscall,
        tgid,
        tid,
        nr,
        ret,
        args: inf.args,
        fds: [-1, -1],
        path_src: PATH_NONE,
        path_ptr: 0,
    };
    match nr {
        nr::RECVMSG | nr::SENDMSG => {
            if ret >= 0 {
                e.kind = if nr == nr::RECVMSG {
                    EventKind::RecvFd
                } else {
                    EventKind::SendFd
                };
                scm_rights(&mut e, inf.args[1]);
            }
            return 0;
        }
        nr::RECVMMSG | nr::SENDMMSG => {
            e.kind = if nr == nr::RECVMMSG {
                EventKind::RecvFd
            } else {
                EventKind::SendFd
            };
            let mut i: u64 = 0;
            while i < MAX_MMSGS as u64 {
                if (i as i64) >= ret {
                    break;
                }
                scm_rights(&mut e, inf.args[1] + i * MMSGHDR_SIZE);
                i += 1;
            }
            return 0;
        }
        nr::PIPE | nr::PIPE2 | nr::SOCKETPAIR => {
            if ret == 0 {
                let ptr = if nr == nr::SOCKETPAIR {
                    inf.args[3]
                } else {
                    inf.args[0]
                };
                match read_user::<[i32; 2]>(ptr) {
                    Some(fds) => e.fds = fds,
                    None => lose(LossCause::UserRead, tgid),
                }
            }
        }
        nr::OPEN | nr::CREAT => (e.path_src, e.path_ptr) = (PATH_USER, inf.args[0]),
        nr::OPENAT | nr::OPENAT2 => (e.path_src, e.path_ptr) = (PATH_USER, inf.args[1]),
        _ => {}
    }
    emit(&e);
    0
}

/// Emits one event (`e.kind`: RecvFd or SendFd) per fd carried by SCM_RIGHTS in the `struct msghdr` at `msg`.
#[inline(never)]
fn scm_rights(e: &mut Emit, msg: u64) {
    let (Some(control), Some(controllen)) = (
        read_user::<u64>(msg + MSGHDR_CONTROL_OFF),
        read_user::<u64>(msg + MSGHDR_CONTROLLEN_OFF),
    ) else {
        lose(LossCause::UserRead, e.tgid);
        return;
    };
    let mut off: u64 = 0;
    let mut c = 0;
    while c < MAX_CMSGS {
        c += 1;
        if control == 0 || off + CMSG_HDR_LEN > controllen {
            return;
        }
        let Some(hdr) = read_user::<[u64; 2]>(control + off) else {
            lose(LossCause::UserRead, e.tgid);
            return;
        };
        let len = hdr[0];
        if len < CMSG_HDR_LEN || off + len > controllen {
            return;
        }
        let level = hdr[1] & 0xffff_ffff;
        let ty = hdr[1] >> 32;
        if level == SOL_SOCKET && ty == SCM_RIGHTS {
            let n = (len - CMSG_HDR_LEN) / 4;
            let mut i: u64 = 0;
            while i < MAX_RIGHTS_PER_CMSG as u64 {
                if i >= n {
                    break;
                }
                match read_user::<i32>(control + off + CMSG_HDR_LEN + 4 * i) {
                    Some(fd) => {
                        e.fds = [fd, -1];
                        emit(e);
                    }
                    None => lose(LossCause::UserRead, e.tgid),
                }
                i += 1;
            }
            if n > MAX_RIGHTS_PER_CMSG as u64 {
                lose(LossCause::TooManyFds, e.tgid);
            }
        }
        off += (len + 7) & !7;
    }
    if off + CMSG_HDR_LEN <= controllen {
        lose(LossCause::TooManyFds, e.tgid);
    }
}

/// `sched/sched_process_fork`: runs in the parent, inside its clone/fork syscall.
#[tracepoint]
pub fn vmaudit_sched_fork(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = ids();
    if !maybe_watched(tgid) {
        return 0;
    }
    let Some(flags) = is_watched(tgid) else {
        return 0;
    };
    if flags & WatchFlags::FOLLOW_CHILDREN == 0 {
        return 0;
    }
    // SAFETY: copied out at once.
    let Some(inf) = (unsafe { INFLIGHT.get(tid) }).copied() else {
        // The clone's entry was not recorded (INFLIGHT full, counted then): the child is lost.
        lose(LossCause::WatchFull, tgid);
        return 0;
    };
    let clone_flags = match inf.nr as u32 {
        nr::CLONE => inf.args[0],
        nr::CLONE3 => match read_user::<u64>(inf.args[0]) {
            Some(f) => f,
            None => {
                lose(LossCause::UserRead, tgid);
                return 0;
            }
        },
        nr::FORK => SIGCHLD,
        nr::VFORK => CLONE_VFORK | CLONE_VM | SIGCHLD,
        _ => return 0,
    };
    if clone_flags & CLONE_THREAD != 0 {
        return 0;
    }
    let Some(child) = read_ctx::<i32>(&ctx, FORK_CHILD_PID_OFF) else {
        return 0;
    };
    let child = child as u32;
    if WATCHED.insert(child, flags, 0).is_err() {
        lose(LossCause::WatchFull, tgid);
        return 0;
    }
    if let Some(slot) = WATCH_FILTER.get_ptr_mut(child % WATCH_FILTER_SLOTS) {
        // SAFETY: a live array slot of 4 bytes; any racing writer also writes 1.
        unsafe { *slot = 1 };
    }
    let e = Emit {
        kind: EventKind::Fork,
        tgid,
        tid,
        nr: inf.nr as u32,
        ret: 0,
        args: [child as u64, clone_flags, 0, 0],
        fds: [-1, -1],
        path_src: PATH_NONE,
        path_ptr: 0,
    };
    emit(&e);
    0
}

/// `sched/sched_process_exec`: the exec succeeded and close-on-exec fds are gone.
#[tracepoint]
pub fn vmaudit_sched_exec(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = ids();
    if !maybe_watched(tgid) || is_watched(tgid).is_none() {
        return 0;
    }
    let loc = read_ctx::<u32>(&ctx, EXEC_FILENAME_LOC_OFF).unwrap_or(0);
    let off = (loc & 0xffff) as usize;
    let e = Emit {
        kind: EventKind::Exec,
        tgid,
        tid,
        nr: 0,
        ret: 0,
        args: [0; 4],
        fds: [-1, -1],
        // `off` is the __data_loc offset of the filename inside this record.
        path_src: if off == 0 { PATH_NONE } else { PATH_KERNEL },
        path_ptr: ctx.as_ptr() as u64 + off as u64,
    };
    emit(&e);
    0
}

/// `sched/sched_process_exit`: a thread exits; with `group_dead` the process's fds are gone.
#[tracepoint]
pub fn vmaudit_sched_exit(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = ids();
    if !maybe_watched(tgid) || is_watched(tgid).is_none() {
        return 0;
    }
    // A thread killed inside a syscall never reaches its sys_exit.
    let _ = INFLIGHT.remove(tid);
    if read_ctx::<u8>(&ctx, EXIT_GROUP_DEAD_OFF).unwrap_or(0) == 0 {
        return 0;
    }
    let _ = WATCHED.remove(tgid);
    let e = Emit {
        kind: EventKind::Exit,
        tgid,
        tid,
        nr: 0,
        ret: 0,
        args: [0; 4],
        fds: [-1, -1],
        path_src: PATH_NONE,
        path_ptr: 0,
    };
    emit(&e);
    0
}

/// A program that does nothing, for `vmaudit noop-hook`: what merely hooking every syscall's
/// exit costs on this kernel, the floor under `vmaudit_sys_exit` (see BENCHMARKS.md).
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn vmaudit_noop(_ctx: RawTracePointContext) -> i32 {
    0
}
