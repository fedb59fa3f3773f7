//! The fd tracker: syscall, sched and io_uring tracepoints feeding the `EVENTS` ring buffer.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    cty::c_void,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_user,
        bpf_probe_read_user_str_bytes,
        generated::{bpf_get_current_task_btf, bpf_loop, bpf_task_pt_regs},
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::debug;
use vmaudit_common::{
    DEFAULT_RING_BYTES, Event, EventFlags, EventKind, EventWithPath, FileInfo, IFNAMSIZ,
    INFLIGHT_ENTRIES, LossCause, PATH_REUSE_NS, PATH_SLOT, PATHS_SENT_SLOTS, PathTail, Unseen,
    UringOffsets, WAKEUP_BYTES, WATCH_FILTER_SLOTS, WATCHED_ENTRIES, WatchFlags, nr, uring,
};

use crate::kfile;

#[map]
static WATCHED: HashMap<u32, u32> = HashMap::with_max_entries(WATCHED_ENTRIES, 0);

/// Slot 0: [`vmaudit_sys_exit_watched`], where [`vmaudit_sys_exit`] jumps for a process that may
/// be watched (set by the loader before the hook is attached).
#[map]
static SYS_EXIT_WATCHED: ProgramArray = ProgramArray::with_max_entries(1, 0);

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

/// Slot 0 is set to 1 by the consumer just before it waits; the next submit wakes it and clears
/// it. Other submits do not wake anyone, so a busy producer pays no wake-up per event. Slot 1 is
/// set to 1 once `IGNORED_TIDS` has an entry: until then a watched syscall skips that hash
/// lookup (an array read is inlined, a hash lookup is a call).
#[map]
static CONSUMER: Array<u32> = Array::with_max_entries(2, 0);

/// Changed after every removal from `WATCHED` (at a process's exit; userspace only adds):
/// see [`watched`].
#[map]
static WATCH_GEN: Array<u64> = Array::with_max_entries(1, 0);

/// Per CPU: the process this CPU last found in `WATCHED`, and `WATCH_GEN` then.
#[map]
static LAST_WATCHED: PerCpuArray<LastWatched> = PerCpuArray::with_max_entries(1, 0);

#[derive(Clone, Copy)]
#[repr(C)]
struct LastWatched {
    tgid: u32,
    generation: u64,
}

/// io_uring request address -> `tgid << 8 | opcode`, from submission to completion.
#[map]
static URING_REQS: HashMap<u64, u64> = HashMap::with_max_entries(INFLIGHT_ENTRIES, 0);

/// seccomp notification id -> the thread it stopped (as SECCOMP_IOCTL_NOTIF_RECV told the
/// supervisor), until the supervisor answers it: an ADDFD on that id puts an fd in that
/// thread's table. LRU: a supervisor that never answers cannot fill it.
#[map]
static NOTIF_TARGETS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(1024, 0);

/// The path last sent for a device inode, by slot (`PATHS_SENT_SLOTS`): a later gain of the
/// same inode, dentry and mount within `PATH_REUSE_NS` skips the walk and says so
/// (`EventFlags::PATH_REUSED`); userspace names it with the path it kept. An array, so the
/// look-up is inlined; the addresses stay in the kernel (userspace never reads this map).
#[map]
static PATHS_SENT: Array<PathSent> = Array::with_max_entries(PATHS_SENT_SLOTS, 0);

#[derive(Clone, Copy)]
#[repr(C)]
struct PathSent {
    ino: u64,
    dev: u64,
    at: kfile::FilePath,
    ts_ns: u64,
}

/// Written by userspace before loading: pending bytes past which a submit wakes the consumer
/// even when it did not ask.
#[unsafe(no_mangle)]
static VMAUDIT_WAKEUP_BYTES: u64 = WAKEUP_BYTES;

/// Written by userspace before loading: the io_uring tracepoints' field offsets.
#[unsafe(no_mangle)]
static VMAUDIT_URING: UringOffsets = UringOffsets {
    submit_req: 0,
    submit_opcode: 0,
    complete_req: 0,
    complete_res: 0,
};

// x86_64 `struct pt_regs`: a syscall's arguments are in di, si, dx, r10, its number in orig_ax;
// a 32-bit compat syscall's arguments are in bx, cx, dx, si. A syscall leaves these saved user
// registers as they were, so the exit sees the arguments of the entry. The 8-byte words from
// bx (at 40) to orig_ax (at 120) are loaded directly (see `saved_regs`).
const PT_REGS_WINDOW_OFF: u64 = 40;
const PT_REGS_WINDOW_WORDS: usize = 11;
/// Word indices in that window: di (112), si (104), dx (96), r10 (56); bx (40), cx (88), dx,
/// si; orig_ax (120).
const PT_REGS_ARG_WORD: [usize; 4] = [9, 8, 7, 2];
const PT_REGS_COMPAT_ARG_WORD: [usize; 4] = [0, 6, 7, 8];
const PT_REGS_ORIG_AX_WORD: usize = 10;
/// `thread_info.status` bit of a task inside a 32-bit syscall (x86).
const TS_COMPAT: u32 = 0x0002;
// sched_process_exit: `bool group_dead` at 32.
const EXIT_GROUP_DEAD_OFF: usize = 32;

// x86_64 `struct msghdr`: msg_control at 32, msg_controllen at 40; `struct mmsghdr` is 64 bytes.
const MSGHDR_CONTROL_OFF: u64 = 32;
const MSGHDR_CONTROLLEN_OFF: u64 = 40;
const MMSGHDR_SIZE: u64 = 64;
const CMSG_HDR_LEN: u64 = 16;
const SOL_SOCKET: u64 = 1;
const SCM_RIGHTS: u64 = 1;
/// A pidfd of the sender, installed by recvmsg on a socket with SO_PASSPIDFD.
const SCM_PIDFD: u64 = 4;
/// bpf_loop's most iterations, and what its callback returns to go on or to stop.
const BPF_MAX_LOOPS: u64 = 1 << 23;
const LOOP_CONTINUE: i64 = 0;
const LOOP_BREAK: i64 = 1;

const F_DUPFD: u64 = 0;
const F_SETFD: u64 = 2;
const F_DUPFD_CLOEXEC: u64 = 1030;
const FD_CLOEXEC: u64 = 1;
const CLOSE_RANGE_CLOEXEC: u64 = 1 << 2;
const EBADF: i64 = 9;
const CLONE_PIDFD: u64 = 0x1000;
/// `struct seccomp_notif_addfd`: `id` at 0, `srcfd` at 12, `newfd_flags` at 20.
const ADDFD_SRCFD_OFF: u64 = 12;
const ADDFD_NEWFD_FLAGS_OFF: u64 = 20;
/// `struct seccomp_notif`: `pid` at 8.
const NOTIF_PID_OFF: u64 = 8;
const O_CLOEXEC: u32 = 0o2000000;
/// `struct clone_args`: `pidfd` (a pointer to an int) at 8.
const CLONE_ARGS_PIDFD_OFF: u64 = 8;
/// `struct kvm_create_device`: `fd` at 4, `flags` at 8 (KVM_CREATE_DEVICE_TEST creates none).
const KVM_CREATE_DEVICE_FD_OFF: u64 = 4;
const KVM_CREATE_DEVICE_FLAGS_OFF: u64 = 8;
const KVM_CREATE_DEVICE_TEST: u32 = 1;
/// bpf(2) commands that return a new fd.
const BPF_FD_CMDS: [u64; 13] = [0, 5, 7, 13, 14, 17, 18, 19, 28, 30, 32, 33, 36];

#[inline(always)]
fn now() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

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

/// Whether `tgid` is in `WATCHED`, as [`is_watched`] says, without its hash look-up when this
/// CPU found the same process watched last and nothing was removed since (`WATCH_GEN` is
/// unchanged): a watched process's syscalls come in runs on one CPU, and inlined array reads
/// cost far less than a hash look-up. The generation is read before the look-up, so a removal
/// that races with it changes the generation after and the memory is not trusted again.
#[inline(always)]
fn watched(tgid: u32) -> bool {
    let Some(gen_slot) = WATCH_GEN.get_ptr(0) else {
        return is_watched(tgid).is_some();
    };
    // SAFETY: a live array slot of 8 bytes; other CPUs change it atomically.
    let generation = unsafe { core::ptr::read_volatile(gen_slot) };
    let Some(last) = LAST_WATCHED.get_ptr_mut(0) else {
        return is_watched(tgid).is_some();
    };
    // SAFETY: this CPU's slot, written only here and by no other CPU.
    unsafe {
        if (*last).tgid == tgid && (*last).generation == generation {
            return true;
        }
        if is_watched(tgid).is_none() {
            return false;
        }
        *last = LastWatched { tgid, generation };
    }
    true
}

/// Changes `WATCH_GEN` after a removal from `WATCHED`: to a value never written before (the
/// clock and this CPU's number), so that racing writers cannot put back one a CPU remembers.
#[inline(always)]
fn watch_removed() {
    if let Some(p) = WATCH_GEN.get_ptr_mut(0) {
        // SAFETY: the helper has no preconditions.
        let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
        // SAFETY: a live array slot of 8 bytes.
        unsafe { *p = now() << 8 | (cpu & 0xff) };
    }
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

/// The submit flags for a record of `size` bytes: wake the consumer when it asked (it is about
/// to wait), or when this record takes the pending bytes past the threshold (which cuts short
/// the consumer's pause between drains). Only the crossing wakes: a consumer already past it is
/// awake and draining, and a wake-up per submit above the threshold (an irq_work self-IPI, a VM
/// exit under virtualisation) would slow the producer and the consumer alike.
#[inline(always)]
fn wake_flags(size: u64) -> u64 {
    if let Some(c) = CONSUMER.get_ptr_mut(0) {
        // SAFETY: a live array slot of 4 bytes; a racing producer at worst wakes it twice.
        unsafe {
            if *c != 0 {
                *c = 0;
                return BPF_RB_FORCE_WAKEUP as u64;
            }
        }
    }
    // SAFETY: a static of the object, replaced by the loader.
    let threshold = unsafe { core::ptr::read_volatile(&VMAUDIT_WAKEUP_BYTES) };
    // The pending bytes count this record and its 8-byte ring header.
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    if pending >= threshold && pending < threshold + size + 8 {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// The words of the running task's saved user registers from bx to orig_ax (see
/// `PT_REGS_WINDOW_OFF`), loaded directly: the helper returns a typed `pt_regs` pointer and
/// each load is at a fixed field offset, which the verifier checks against the kernel's BTF.
#[inline(always)]
fn saved_regs() -> [u64; PT_REGS_WINDOW_WORDS] {
    let mut w = [0u64; PT_REGS_WINDOW_WORDS];
    // SAFETY: the helpers return the running task and its saved registers, valid for the
    // program's whole run; every load is of an 8-byte register field of `struct pt_regs`.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u64;
        let first = (PT_REGS_WINDOW_OFF / 8) as usize;
        for (i, word) in w.iter_mut().enumerate() {
            *word = core::ptr::read_volatile(regs.add(first + i));
        }
    }
    w
}

/// What every event of one syscall exit shares.
#[derive(Clone, Copy)]
struct Head {
    tgid: u32,
    tid: u32,
    nr: u16,
    flags: u8,
}

impl Head {
    /// The head of an event that no syscall number describes (sched events, io_uring).
    #[inline(always)]
    fn plain(tgid: u32, tid: u32) -> Self {
        Self {
            tgid,
            tid,
            nr: 0,
            flags: 0,
        }
    }
}

#[inline(always)]
fn event(h: &Head, kind: EventKind, fd: i32, aux: u64) -> Event {
    Event {
        ts_ns: 0,
        tgid: h.tgid,
        tid: h.tid,
        kind: kind as u8,
        flags: h.flags,
        nr: h.nr,
        fd,
        aux,
        file: FileInfo::default(),
    }
}

/// Sends a 64-byte event.
#[inline(never)]
fn send(ev: &Event) {
    send_at(ev, now());
}

/// Sends a 64-byte event stamped `ts_ns`.
#[inline(always)]
fn send_at(ev: &Event, ts_ns: u64) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        lose(LossCause::RingFull, ev.tgid);
        return;
    };
    let mut e = *ev;
    e.ts_ns = ts_ns;
    entry.write(e);
    entry.submit(wake_flags(size_of::<Event>() as u64));
}

/// The `PATHS_SENT` slot of an inode.
#[inline(always)]
fn path_slot(info: &FileInfo) -> u32 {
    let h = (info.ino ^ ((info.dev as u64) << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 32) as u32 % PATHS_SENT_SLOTS
}

/// Whether the path sent last for this inode, dentry and mount still stands at `ts_ns`.
#[inline(always)]
fn path_sent(info: &FileInfo, at: &kfile::FilePath, ts_ns: u64) -> bool {
    PATHS_SENT.get(path_slot(info)).is_some_and(|p| {
        p.ino == info.ino
            && p.dev == info.dev as u64
            && p.at == *at
            && ts_ns.wrapping_sub(p.ts_ns) < PATH_REUSE_NS
    })
}

/// Remembers the path just submitted (after the submit, so that a gain that finds it is
/// behind it in the ring).
#[inline(always)]
fn remember_path(info: &FileInfo, at: &kfile::FilePath, ts_ns: u64) {
    if let Some(p) = PATHS_SENT.get_ptr_mut(path_slot(info)) {
        // SAFETY: a live array slot; a racing writer can at worst leave a slot that matches no
        // file, which costs one walk.
        unsafe {
            *p = PathSent {
                ino: info.ino,
                dev: info.dev as u64,
                at: *at,
                ts_ns,
            };
        }
    }
}

/// `fd` is now in the current task's table: reads the file behind it and sends a Gain (with
/// `walk`, the dentry names of a device file). The walk is verified once per call site, so it
/// is asked for at one site only (the syscall's single new fd); fds that come in numbers (pipes,
/// SCM_RIGHTS) go without, and userspace names them.
#[inline(never)]
fn gain(h: &Head, fd: i32, aux: u64, walk: bool) {
    let mut ev = event(h, EventKind::Gain, fd, aux);
    let file = match kfile::current_file_at(fd) {
        None => {
            lose(LossCause::KernelRead, h.tgid);
            return;
        }
        Some((file, cloexec)) => {
            if cloexec {
                ev.flags |= EventFlags::CLOEXEC;
            }
            file
        }
    };
    let ts_ns = now();
    if file == 0 {
        send_at(&ev, ts_ns);
        return;
    }
    let Some(at) = kfile::file_info(file, &mut ev.file) else {
        lose(LossCause::KernelRead, h.tgid);
        return;
    };
    ev.flags |= EventFlags::FILE;
    if !walk || !kfile::is_device(ev.file.mode) {
        send_at(&ev, ts_ns);
        return;
    }
    // A tun fd's interface is read at every gain; an attached one is not in the path memory.
    if ev.file.rdev != kfile::TUN_RDEV && path_sent(&ev.file, &at, ts_ns) {
        ev.flags |= EventFlags::PATH_REUSED;
        send_at(&ev, ts_ns);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<EventWithPath>(0) else {
        lose(LossCause::RingFull, h.tgid);
        return;
    };
    let p = entry.as_mut_ptr();
    ev.flags |= EventFlags::PATH;
    ev.ts_ns = ts_ns;
    // SAFETY: `p` points at a reserved, writable ring-buffer slot of size_of::<EventWithPath>();
    // the event is written whole and the walk writes every field of the tail it reports.
    unsafe {
        (*p).event = ev;
        kfile::walk_path(&at, &mut (*p).path);
        kfile::tun_iface(file, ev.file.rdev, &mut (*p).path.iface);
    }
    entry.submit(wake_flags(size_of::<EventWithPath>() as u64));
    remember_path(&ev.file, &at, ts_ns);
}

/// TUNSETIFF/TUNSETQUEUE attached tun fd `fd` to an interface: an Iface event with its name,
/// read from the kernel.
#[inline(never)]
fn attached(h: &Head, fd: i32) {
    let Some((file, _)) = kfile::current_file_at(fd) else {
        lose(LossCause::KernelRead, h.tgid);
        return;
    };
    let Some(mut entry) = EVENTS.reserve::<EventWithPath>(0) else {
        lose(LossCause::RingFull, h.tgid);
        return;
    };
    let p = entry.as_mut_ptr();
    let mut ev = event(h, EventKind::Iface, fd, 0);
    ev.flags |= EventFlags::PATH;
    ev.ts_ns = now();
    let rdev = if file != 0 && kfile::file_info(file, &mut ev.file).is_some() {
        ev.flags |= EventFlags::FILE;
        ev.file.rdev
    } else {
        0
    };
    // SAFETY: as in `gain`; the tail's form, depth and first slot are written before the
    // interface, so the record is whole.
    unsafe {
        (*p).event = ev;
        (*p).path.form = PathTail::COMPONENTS;
        (*p).path.depth = 0;
        (*p).path.complete = 0;
        kfile::tun_iface(file, rdev, &mut (*p).path.iface);
    }
    entry.submit(wake_flags(size_of::<EventWithPath>() as u64));
}

/// A failed open-family call: the event and the name the caller gave.
#[inline(never)]
fn failed_open(h: &Head, errno: u64, user_path: u64) {
    let Some(mut entry) = EVENTS.reserve::<EventWithPath>(0) else {
        lose(LossCause::RingFull, h.tgid);
        return;
    };
    let p = entry.as_mut_ptr();
    let mut ev = event(h, EventKind::Failed, -1, errno);
    ev.flags |= EventFlags::PATH;
    ev.ts_ns = now();
    // SAFETY: as in `gain`; the string read is bounded by the slots' size.
    unsafe {
        (*p).event = ev;
        (*p).path.form = PathTail::STRING;
        (*p).path.depth = 0;
        (*p).path.complete = 1;
        (*p).path.iface = [0; IFNAMSIZ];
        let buf = &mut *((&mut (*p).path.slots) as *mut _ as *mut [u8; PATH_SLOT * 6]);
        if bpf_probe_read_user_str_bytes(user_path as *const u8, buf).is_err() {
            buf[0] = 0;
        }
    }
    entry.submit(wake_flags(size_of::<EventWithPath>() as u64));
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

/// `raw_syscalls/sys_exit` (a raw tracepoint: `struct pt_regs *regs, long ret`), run for every
/// syscall of every process: an unwatched process costs the pid and an inlined array read. The
/// rest is another program, entered by a tail call (a direct jump), so that this one stays
/// small: the JIT saves and restores only the registers a program uses, and the whole tracker
/// uses them all, which every syscall on the host would pay for.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn vmaudit_sys_exit(ctx: RawTracePointContext) -> i32 {
    let (tgid, _) = ids();
    if !maybe_watched(tgid) {
        return 0;
    }
    // SAFETY: the slot holds a raw tracepoint program, which takes this context.
    unsafe { SYS_EXIT_WATCHED.tail_call(&ctx, 0) };
    // Only an empty slot comes back here (the loader fills it before attaching): counted.
    lose(LossCause::KernelRead, tgid);
    0
}

/// The tracker's `sys_exit`, for a process [`vmaudit_sys_exit`] found possibly watched: a
/// watched process's tracked syscall is reported with its result and, for each fd it gained,
/// the file read from its fd table. Never attached itself.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn vmaudit_sys_exit_watched(ctx: RawTracePointContext) -> i32 {
    let (tgid, tid) = ids();
    let w = saved_regs();
    let raw_nr = w[PT_REGS_ORIG_AX_WORD];
    // SAFETY: the helper has no preconditions.
    let compat = kfile::current_ti_status() & TS_COMPAT != 0;
    let nr = if compat {
        match nr::i386::to_x86_64(raw_nr) {
            Some(n) => n as u64,
            None => {
                if nr::i386::changes_fds_undecoded(raw_nr) && watched(tgid) {
                    debug!(
                        &ctx,
                        "pid {} made 32-bit syscall {}, not decoded: its table is checked",
                        tgid,
                        raw_nr
                    );
                    let h = Head {
                        tgid,
                        tid,
                        nr: raw_nr as u16,
                        flags: EventFlags::COMPAT,
                    };
                    send(&event(&h, EventKind::Unseen, -1, Unseen::Compat as u64));
                }
                return 0;
            }
        }
    } else {
        raw_nr
    };
    if !nr::is_traced(nr) || !watched(tgid) {
        return 0;
    }
    // vmaudit's own consumer thread, when vmaudit watches itself: its reads would otherwise
    // feed back into the ring forever.
    let ignoring = CONSUMER.get(1).is_some_and(|v| *v != 0);
    // SAFETY: only the presence of the key is read.
    if ignoring && unsafe { IGNORED_TIDS.get(tid) }.is_some() {
        return 0;
    }
    // Constant indices in each branch: the verifier sees fixed stack offsets.
    let args = if compat {
        let i = PT_REGS_COMPAT_ARG_WORD;
        [w[i[0]], w[i[1]], w[i[2]], w[i[3]]]
    } else {
        let i = PT_REGS_ARG_WORD;
        [w[i[0]], w[i[1]], w[i[2]], w[i[3]]]
    };
    let ret: i64 = ctx.arg(1);
    let h = Head {
        tgid,
        tid,
        nr: nr as u16,
        flags: if compat { EventFlags::COMPAT } else { 0 },
    };
    // One call site of the walking gain (see `gain`).
    if let Some((fd, aux)) = exit_of(&h, nr as u32, &args, ret) {
        gain(&h, fd, aux, true);
    }
    0
}

/// Reports what syscall `nr` with `args`, returning `ret`, did to the table; returns the one
/// new fd (and its `aux`) for the caller to report, if there is exactly one.
#[inline(never)]
fn exit_of(h: &Head, nr: u32, args: &[u64; 4], ret: i64) -> Option<(i32, u64)> {
    let a = *args;
    match nr {
        nr::CLONE | nr::CLONE3 | nr::FORK | nr::VFORK => {
            if ret > 0 {
                return clone_pidfd(h, nr, &a);
            }
            return None;
        }
        // Filter requests that cannot change the fd table here, not in userspace: qemu issues
        // millions of ioctls and fcntls.
        nr::IOCTL if !nr::ioctl::is_tracked(a[1]) => return None,
        nr::FCNTL if !matches!(a[1], F_DUPFD | F_DUPFD_CLOEXEC | F_SETFD) => return None,
        // Only these forms return an fd or change who shares the table.
        nr::SECCOMP
            if a[0] != nr::SECCOMP_SET_MODE_FILTER
                || a[1] & nr::SECCOMP_FILTER_FLAG_NEW_LISTENER == 0 =>
        {
            return None;
        }
        // With flags, it returns the ABI version or errata, not an fd.
        nr::LANDLOCK_CREATE_RULESET if a[2] != 0 => return None,
        nr::UNSHARE if a[0] & nr::CLONE_FILES == 0 => return None,
        _ => {}
    }
    if ret < 0 {
        failed(h, nr, &a, ret);
        return None;
    }
    match nr {
        nr::CLOSE => send(&event(h, EventKind::Close, a[0] as i32, 0)),
        nr::CLOSE_RANGE => {
            let mut ev = event(
                h,
                EventKind::CloseRange,
                -1,
                (a[0] & 0xffff_ffff) | (a[1] << 32),
            );
            if a[2] & CLOSE_RANGE_CLOEXEC != 0 {
                ev.flags |= EventFlags::CLOEXEC;
            }
            if a[2] & nr::CLOSE_RANGE_UNSHARE != 0 {
                ev.flags |= EventFlags::UNSHARE;
            }
            send(&ev);
        }
        nr::UNSHARE => send(&event(h, EventKind::Unshare, -1, a[0])),
        nr::FCNTL if a[1] == F_SETFD => set_cloexec(h, a[0] as i32, a[2] & FD_CLOEXEC != 0),
        nr::DUP | nr::FCNTL => return Some((ret as i32, a[0])),
        nr::DUP2 | nr::DUP3 => {
            if a[0] != a[1] {
                return Some((a[1] as i32, a[0]));
            }
        }
        nr::IOCTL => return ioctl(h, &a, ret),
        nr::RECVMSG | nr::SENDMSG => scm_rights(h, a[1]),
        nr::RECVMMSG | nr::SENDMMSG => mmsg_rights(h, a[1], ret as u64),
        nr::PIPE | nr::PIPE2 | nr::SOCKETPAIR => {
            let ptr = if nr == nr::SOCKETPAIR { a[3] } else { a[0] };
            match read_user::<[i32; 2]>(ptr) {
                Some(fds) => {
                    gain(h, fds[0], u64::MAX, false);
                    gain(h, fds[1], u64::MAX, false);
                }
                None => lose(LossCause::UserRead, h.tgid),
            }
        }
        nr::SIGNALFD | nr::SIGNALFD4 if a[0] as i32 != -1 => {}
        nr::BPF => {
            let mut i = 0;
            while i < BPF_FD_CMDS.len() {
                if BPF_FD_CMDS[i] == a[0] {
                    return Some((ret as i32, u64::MAX));
                }
                i += 1;
            }
        }
        _ => return Some((ret as i32, u64::MAX)),
    }
    None
}

#[inline(always)]
fn set_cloexec(h: &Head, fd: i32, on: bool) {
    let mut ev = event(h, EventKind::SetCloexec, fd, 0);
    if on {
        ev.flags |= EventFlags::CLOEXEC;
    }
    send(&ev);
}

/// A failed syscall: close still releases the fd unless it was not open (EBADF).
#[inline(never)]
fn failed(h: &Head, nr: u32, a: &[u64; 4], ret: i64) {
    let errno = (-ret) as u64;
    match nr {
        // A failed unshare gains nothing and leaves the table shared; a failed ioctl that
        // returns no fd is no attempt to gain one.
        nr::UNSHARE => {}
        nr::IOCTL
            if !nr::ioctl::returns_fd(nr::ioctl::req(a[1]))
                && nr::ioctl::req(a[1]) != nr::ioctl::KVM_CREATE_DEVICE => {}
        nr::CLOSE if ret != -EBADF => send(&event(h, EventKind::Close, a[0] as i32, 0)),
        nr::CLOSE => send(&event(h, EventKind::Failed, a[0] as i32, errno)),
        nr::DUP2 | nr::DUP3 => send(&event(h, EventKind::Failed, a[1] as i32, errno)),
        nr::OPEN | nr::CREAT => failed_open(h, errno, a[0]),
        nr::OPENAT | nr::OPENAT2 => failed_open(h, errno, a[1]),
        _ => send(&event(h, EventKind::Failed, -1, errno)),
    }
}

#[inline(never)]
fn ioctl(h: &Head, a: &[u64; 4], ret: i64) -> Option<(i32, u64)> {
    match nr::ioctl::req(a[1]) {
        nr::ioctl::FIOCLEX => set_cloexec(h, a[0] as i32, true),
        nr::ioctl::FIONCLEX => set_cloexec(h, a[0] as i32, false),
        nr::ioctl::KVM_CREATE_DEVICE => {
            let test = read_user::<u32>(a[2] + KVM_CREATE_DEVICE_FLAGS_OFF)
                .is_some_and(|f| f & KVM_CREATE_DEVICE_TEST != 0);
            if test {
                return None;
            }
            match read_user::<u32>(a[2] + KVM_CREATE_DEVICE_FD_OFF) {
                Some(fd) => return Some((fd as i32, u64::MAX)),
                None => lose(LossCause::UserRead, h.tgid),
            }
        }
        nr::ioctl::TUNSETIFF | nr::ioctl::TUNSETQUEUE => attached(h, a[0] as i32),
        nr::ioctl::SECCOMP_IOCTL_NOTIF_RECV => {
            if let (Some(id), Some(pid)) = (
                read_user::<u64>(a[2]),
                read_user::<u32>(a[2] + NOTIF_PID_OFF),
            ) {
                let _ = NOTIF_TARGETS.insert(id, pid, 0);
            }
        }
        nr::ioctl::SECCOMP_IOCTL_NOTIF_SEND => {
            if let Some(id) = read_user::<u64>(a[2]) {
                let _ = NOTIF_TARGETS.remove(id);
            }
        }
        nr::ioctl::SECCOMP_IOCTL_NOTIF_ADDFD => addfd(h, a[2], ret as i32),
        _ => return Some((ret as i32, u64::MAX)),
    }
    None
}

/// SECCOMP_IOCTL_NOTIF_ADDFD put the supervisor's `srcfd` at `fd` in the table of the
/// notification's target: an AddFd event with the file read from the supervisor's table (the
/// same open file). A notification received before watching began names no target: then the
/// table it changed is found by the periodic check.
#[inline(never)]
fn addfd(h: &Head, arg: u64, fd: i32) {
    let target = read_user::<u64>(arg).and_then(|id| {
        // SAFETY: copied out at once.
        unsafe { NOTIF_TARGETS.get(id) }.copied()
    });
    let (Some(target), Some(srcfd), Some(newfd_flags)) = (
        target,
        read_user::<u32>(arg + ADDFD_SRCFD_OFF),
        read_user::<u32>(arg + ADDFD_NEWFD_FLAGS_OFF),
    ) else {
        debug!(
            &(),
            "pid {} put fd {} into the process of a notification it received before vmaudit watched",
            h.tgid,
            fd
        );
        send(&event(
            h,
            EventKind::Unseen,
            -1,
            Unseen::SeccompAddfd as u64 | ((fd as u32 as u64) << 32),
        ));
        return;
    };
    let mut ev = event(h, EventKind::AddFd, fd, target as u64);
    if newfd_flags & O_CLOEXEC != 0 {
        ev.flags |= EventFlags::CLOEXEC;
    }
    if let Some((file, _)) = kfile::current_file_at(srcfd as i32)
        && file != 0
        && kfile::file_info(file, &mut ev.file).is_some()
    {
        ev.flags |= EventFlags::FILE;
    }
    send(&ev);
}

/// clone/clone3 with CLONE_PIDFD put a pidfd of the child in the parent's table.
#[inline(never)]
fn clone_pidfd(h: &Head, nr: u32, a: &[u64; 4]) -> Option<(i32, u64)> {
    let (flags, ptr) = match nr {
        // clone(flags, stack, parent_tid, child_tid, tls): the pidfd goes where parent_tid points.
        nr::CLONE => (a[0], a[2]),
        nr::CLONE3 => match (
            read_user::<u64>(a[0]),
            read_user::<u64>(a[0] + CLONE_ARGS_PIDFD_OFF),
        ) {
            (Some(f), Some(p)) => (f, p),
            _ => {
                lose(LossCause::UserRead, h.tgid);
                return None;
            }
        },
        _ => return None,
    };
    if flags & CLONE_PIDFD == 0 {
        return None;
    }
    let fd = read_user::<i32>(ptr);
    if fd.is_none() {
        lose(LossCause::UserRead, h.tgid);
    }
    fd.map(|fd| (fd, u64::MAX))
}

/// What one `bpf_loop` over the messages of a recvmmsg/sendmmsg carries.
struct Mmsgs {
    h: Head,
    /// The `struct mmsghdr` array.
    vec: u64,
}

/// Every message the kernel transferred (`n`, the syscall's result, at most UIO_MAXIOV),
/// in order. Inlined, as `scm_rights` is: each call frame counts against the verifier's eight
/// (here: the program, `exit_of`, two loop steps, `gain`, `send`, `lose`).
#[inline(always)]
fn mmsg_rights(h: &Head, vec: u64, n: u64) {
    let mut m = Mmsgs { h: *h, vec };
    // SAFETY: the callback has the signature bpf_loop calls, and `m` outlives the call.
    let r = unsafe {
        bpf_loop(
            n as u32,
            mmsg_step as *mut c_void,
            &mut m as *mut Mmsgs as *mut c_void,
            0,
        )
    };
    if r < 0 {
        lose(LossCause::TooManyFds, h.tgid);
    }
}

extern "C" fn mmsg_step(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Mmsgs` that `mmsg_rights` passed, alive for the whole loop.
    let m = unsafe { &*(ctx as *const Mmsgs) };
    scm_rights(&m.h, m.vec + i * MMSGHDR_SIZE);
    LOOP_CONTINUE
}

/// Where a walk of one message's control buffer is, from one `bpf_loop` step to the next.
struct Cmsgs {
    h: Head,
    recv: bool,
    control: u64,
    controllen: u64,
    /// Offset of the next control message's header.
    off: u64,
    /// The next fd of the SCM_RIGHTS message being read, and how many are left in it.
    fd_at: u64,
    fds_left: u64,
    done: bool,
}

/// One event per fd carried in the `struct msghdr` at `msg`: SCM_RIGHTS (every fd of every
/// control message), and SCM_PIDFD on receipt. A Gain (recvmsg family, the file read from the
/// table) or a SendFd, in buffer order, which is the order the kernel installed them.
#[inline(always)]
fn scm_rights(h: &Head, msg: u64) {
    let (Some(control), Some(controllen)) = (
        read_user::<u64>(msg + MSGHDR_CONTROL_OFF),
        read_user::<u64>(msg + MSGHDR_CONTROLLEN_OFF),
    ) else {
        lose(LossCause::UserRead, h.tgid);
        return;
    };
    if control == 0 || controllen < CMSG_HDR_LEN {
        return;
    }
    let mut c = Cmsgs {
        h: *h,
        recv: matches!(h.nr as u32, nr::RECVMSG | nr::RECVMMSG),
        control,
        controllen,
        off: 0,
        fd_at: 0,
        fds_left: 0,
        done: false,
    };
    // A step reads a header, an fd, or both: a control message of `len` bytes takes at most
    // `len / 4` steps (its 16-byte header, then one per 4-byte fd), plus one that finds the
    // end.
    let steps = (controllen / 4 + 1).min(BPF_MAX_LOOPS);
    // SAFETY: the callback has the signature bpf_loop calls, and `c` outlives the call.
    let r = unsafe {
        bpf_loop(
            steps as u32,
            cmsg_step as *mut c_void,
            &mut c as *mut Cmsgs as *mut c_void,
            0,
        )
    };
    // Only a buffer of more than 32 MiB (more than the kernel accepts) can outlast the steps.
    if r < 0 || !c.done {
        lose(LossCause::TooManyFds, h.tgid);
    }
}

extern "C" fn cmsg_step(_: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Cmsgs` that `scm_rights` passed, alive for the whole loop and
    // touched by nothing else meanwhile.
    let c = unsafe { &mut *(ctx as *mut Cmsgs) };
    if c.fds_left == 0 && !next_cmsg(c) {
        c.done = true;
        return LOOP_BREAK;
    }
    if c.fds_left > 0 {
        received_or_sent(c, c.fd_at);
        c.fd_at += 4;
        c.fds_left -= 1;
    }
    // Finding the end in the same step leaves the usual message (one control message, one
    // fd) to a single step.
    if c.fds_left == 0 && c.off + CMSG_HDR_LEN > c.controllen {
        c.done = true;
        return LOOP_BREAK;
    }
    LOOP_CONTINUE
}

/// Reads the control message header at `c.off` and moves past it: an SCM_RIGHTS one leaves
/// its fds to be read, an SCM_PIDFD one is received at once. False at the end of the buffer.
#[inline(always)]
fn next_cmsg(c: &mut Cmsgs) -> bool {
    let off = c.off;
    if off + CMSG_HDR_LEN > c.controllen {
        return false;
    }
    let Some(hdr) = read_user::<[u64; 2]>(c.control + off) else {
        lose(LossCause::UserRead, c.h.tgid);
        return false;
    };
    let len = hdr[0];
    if len < CMSG_HDR_LEN || off + len > c.controllen {
        return false;
    }
    let level = hdr[1] & 0xffff_ffff;
    let ty = hdr[1] >> 32;
    if level == SOL_SOCKET && ty == SCM_RIGHTS {
        c.fd_at = c.control + off + CMSG_HDR_LEN;
        c.fds_left = (len - CMSG_HDR_LEN) / 4;
    } else if level == SOL_SOCKET && ty == SCM_PIDFD && c.recv && len >= CMSG_HDR_LEN + 4 {
        received_or_sent(c, c.control + off + CMSG_HDR_LEN);
    }
    c.off = off + ((len + 7) & !7);
    true
}

/// The fd at user address `at` in a control message: gained (received) or sent.
#[inline(always)]
fn received_or_sent(c: &Cmsgs, at: u64) {
    match read_user::<i32>(at) {
        Some(fd) if c.recv => gain(&c.h, fd, u64::MAX, false),
        Some(fd) => send(&event(&c.h, EventKind::SendFd, fd, 0)),
        None => lose(LossCause::UserRead, c.h.tgid),
    }
}

/// `sched_process_fork`, a raw tracepoint (`struct task_struct *parent, *child`): runs in the
/// parent, inside its clone or fork. A new process of a watched process that follows its
/// children is watched before it runs; a new thread is not an event. The child's own task says
/// which it is (its tgid is its pid) and whether it shares the parent's fd table (CLONE_FILES),
/// so no syscall entry is hooked for the clone flags: such a hook would run for every syscall
/// of every process on the host. 32-bit clones are followed alike.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn vmaudit_sched_fork(ctx: RawTracePointContext) -> i32 {
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
    let (parent, task): (u64, u64) = (ctx.arg(0), ctx.arg(1));
    let Some((child, child_tgid)) = kfile::task_ids(task) else {
        lose(LossCause::ForkRead, tgid);
        return 0;
    };
    if child_tgid != child {
        return 0;
    }
    let Some(shares_files) = kfile::shares_files(parent, task) else {
        lose(LossCause::ForkRead, tgid);
        return 0;
    };
    if WATCHED.insert(child, flags, 0).is_err() {
        lose(LossCause::WatchFull, tgid);
        return 0;
    }
    debug!(
        &ctx,
        "pid {} forked {} (sharing its fd table: {}): followed", tgid, child, shares_files as u8
    );
    if let Some(slot) = WATCH_FILTER.get_ptr_mut(child % WATCH_FILTER_SLOTS) {
        // SAFETY: a live array slot of 4 bytes; any racing writer also writes 1.
        unsafe { *slot = 1 };
    }
    let shared = if shares_files { nr::CLONE_FILES } else { 0 };
    send(&event(
        &Head::plain(tgid, tid),
        EventKind::Fork,
        child as i32,
        shared,
    ));
    0
}

/// `sched/sched_process_exec`: the exec succeeded and close-on-exec fds are gone.
#[tracepoint]
pub fn vmaudit_sched_exec(_ctx: TracePointContext) -> u32 {
    let (tgid, tid) = ids();
    if !maybe_watched(tgid) || is_watched(tgid).is_none() {
        return 0;
    }
    let h = Head::plain(tgid, tid);
    send(&event(&h, EventKind::Exec, -1, 0));
    0
}

/// `sched/sched_process_exit`: a thread exits; with `group_dead` the process's fds are gone.
#[tracepoint]
pub fn vmaudit_sched_exit(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = ids();
    if !maybe_watched(tgid) || is_watched(tgid).is_none() {
        return 0;
    }
    if read_ctx::<u8>(&ctx, EXIT_GROUP_DEAD_OFF).unwrap_or(0) == 0 {
        return 0;
    }
    let _ = WATCHED.remove(tgid);
    watch_removed();
    let h = Head::plain(tgid, tid);
    send(&event(&h, EventKind::Exit, -1, 0));
    0
}

#[inline(always)]
fn uring_off() -> UringOffsets {
    // SAFETY: a static of the object, replaced by the loader.
    unsafe { core::ptr::read_volatile(&VMAUDIT_URING) }
}

/// `io_uring/io_uring_submit_req`: remembers a watched process's fd-changing requests.
#[tracepoint]
pub fn vmaudit_uring_submit(ctx: TracePointContext) -> u32 {
    let (tgid, _) = ids();
    if !maybe_watched(tgid) || is_watched(tgid).is_none() {
        return 0;
    }
    let o = uring_off();
    let Some(op) = read_ctx::<u8>(&ctx, o.submit_opcode as usize) else {
        return 0;
    };
    if !uring::changes_fds(op) {
        return 0;
    }
    let Some(req) = read_ctx::<u64>(&ctx, o.submit_req as usize) else {
        return 0;
    };
    if URING_REQS
        .insert(req, ((tgid as u64) << 8) | op as u64, 0)
        .is_err()
    {
        lose(LossCause::InflightFull, tgid);
    }
    0
}

/// `io_uring/io_uring_complete`: an fd-changing request of a watched process completed; the
/// table is checked against the kernel's (the request's fd is not in the record).
#[tracepoint]
pub fn vmaudit_uring_complete(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = ids();
    if !maybe_watched(tgid) {
        return 0;
    }
    let o = uring_off();
    let Some(req) = read_ctx::<u64>(&ctx, o.complete_req as usize) else {
        return 0;
    };
    // SAFETY: copied out at once.
    let Some(v) = (unsafe { URING_REQS.get(req) }).copied() else {
        return 0;
    };
    let _ = URING_REQS.remove(req);
    let res = read_ctx::<i32>(&ctx, o.complete_res as usize).unwrap_or(0);
    debug!(
        &ctx,
        "pid {}: io_uring opcode {} completed with {}: its table is checked",
        (v >> 8) as u32,
        (v & 0xff) as u8,
        res
    );
    let h = Head::plain((v >> 8) as u32, tid);
    let aux = Unseen::IoUring as u64 | ((v & 0xff) << 8) | ((res as u32 as u64) << 32);
    send(&event(&h, EventKind::Unseen, -1, aux));
    0
}

/// Written by userspace before loading: the process `vmaudit_emit_floor` sends events for.
#[unsafe(no_mangle)]
static VMAUDIT_FLOOR_PID: u32 = 0;

/// For `vmaudit noop-hook --emit-for PID`: one 64-byte event (the clock, pid and tid) per
/// syscall exit of one process, through the same ring buffer and wake-up rule as the tracker,
/// reading nothing of the syscall or its file: what sending an event costs on this hook, the
/// floor under any tracer that reports every fd change (see BENCHMARKS.md).
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn vmaudit_emit_floor(_ctx: RawTracePointContext) -> i32 {
    let (tgid, tid) = ids();
    // SAFETY: a static of the object, replaced by the loader.
    if tgid != unsafe { core::ptr::read_volatile(&VMAUDIT_FLOOR_PID) } {
        return 0;
    }
    let h = Head::plain(tgid, tid);
    send(&event(&h, EventKind::Unseen, -1, 0));
    0
}

/// A program that does nothing, for `vmaudit noop-hook`: what merely hooking every syscall's
/// exit costs on this kernel, the floor under `vmaudit_sys_exit` (see BENCHMARKS.md).
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn vmaudit_noop(_ctx: RawTracePointContext) -> i32 {
    0
}
