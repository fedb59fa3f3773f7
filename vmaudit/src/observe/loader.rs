//! Loading and attaching the fd tracker, and access to its maps.
//!
//! Dropping a [`Tracker`] detaches every program and frees every map: nothing outlives it.

use std::{
    io::Read as _,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{Iter, RawTracePoint, TracePoint},
};
use vmaudit_common::{
    IterRecord, KernelOffsets, LossCause, UringOffsets, WATCH_FILTER_SLOTS, WatchFlags, globals,
    maps, programs,
};

use super::{ObserveError, btf::Btf, key};

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vmaudit-ebpf"));

/// Tunables of the kernel side.
#[derive(Clone, Debug)]
pub struct TrackerOptions {
    /// Ring buffer size in bytes: a power-of-two multiple of the page size.
    pub ring_bytes: u32,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        Self {
            ring_bytes: vmaudit_common::DEFAULT_RING_BYTES,
        }
    }
}

impl TrackerOptions {
    /// Pending bytes whose crossing wakes the consumer even when it did not ask: a quarter of
    /// the ring, at most [`vmaudit_common::WAKEUP_BYTES`].
    pub fn wakeup_bytes(&self) -> u64 {
        (self.ring_bytes as u64 / 4).min(vmaudit_common::WAKEUP_BYTES)
    }
}

/// The io_uring tracepoints the tracker uses, and the fields it reads from each.
const URING_SUBMIT: &str = "io_uring_submit_req";
const URING_COMPLETE: &str = "io_uring_complete";

/// The offset of `field` in a tracepoint's `format` file text.
pub fn format_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|l| {
        let decl = l.trim().strip_prefix("field:")?.split(';').next()?;
        let name = decl.rsplit([' ', '*']).next()?;
        if name != field {
            return None;
        }
        let off = l.split("offset:").nth(1)?.split(';').next()?;
        off.trim().parse().ok()
    })
}

/// The io_uring tracepoints' field offsets, or None when the kernel has no io_uring events
/// (then no process can use io_uring, and nothing needs following).
fn uring_offsets(tracefs: &Path) -> Result<Option<UringOffsets>, ObserveError> {
    let dir = tracefs.join("events").join("io_uring");
    if !dir.exists() {
        return Ok(None);
    }
    let read = |event: &str, field: &str| -> Result<u32, ObserveError> {
        let text = std::fs::read_to_string(dir.join(event).join("format")).unwrap_or_default();
        format_offset(&text, field).ok_or_else(|| ObserveError::Tracepoint {
            name: format!("io_uring/{event} (field {field})"),
        })
    };
    Ok(Some(UringOffsets {
        submit_req: read(URING_SUBMIT, "req")?,
        submit_opcode: read(URING_SUBMIT, "opcode")?,
        complete_req: read(URING_COMPLETE, "req")?,
        complete_res: read(URING_COMPLETE, "res")?,
    }))
}

/// The loaded and attached fd tracker.
pub struct Tracker {
    /// Whether the programs read a tun fd's interface in the kernel (the kernel has tun's
    /// types in its BTF).
    pub tun_named: bool,
    /// Forwards the programs' aya-log records to `log` (RUST_LOG=debug shows them); it must
    /// live as long as the programs that log.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Owns the programs and their links; dropped last.
    _ebpf: Ebpf,
    ring: Option<RingBuf<MapData>>,
    watched: HashMap<MapData, u32, u32>,
    losses: PerCpuArray<MapData, u64>,
    lost_tgids: HashMap<MapData, u32, u64>,
    filter: Array<MapData, u32>,
    consumer: Array<MapData, u32>,
}

fn map_err(what: &'static str) -> impl FnOnce(aya::maps::MapError) -> ObserveError {
    move |source| ObserveError::Map { what, source }
}

/// Takes map `name` out of the object as the map type `T`.
fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, ObserveError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(ObserveError::MissingObject { name })?;
    T::try_from(map).map_err(map_err(name))
}

/// Loads the tracker's `sys_exit` proper and puts it in the slot its filter jumps to, before
/// the filter is attached (the array is the object's: it stays filled while the object lives).
fn fill_sys_exit_jump(ebpf: &mut Ebpf) -> Result<(), ObserveError> {
    let name = programs::SYS_EXIT_WATCHED;
    let fd = load_raw(ebpf, name)?
        .fd()
        .map_err(|source| ObserveError::Program { name, source })?
        .try_clone()
        .map_err(|e| ObserveError::Program {
            name,
            source: aya::programs::ProgramError::IOError(e),
        })?;
    let map = ebpf
        .map_mut(maps::SYS_EXIT_WATCHED)
        .ok_or(ObserveError::MissingObject {
            name: maps::SYS_EXIT_WATCHED,
        })?;
    let mut jumps =
        aya::maps::ProgramArray::try_from(map).map_err(map_err(maps::SYS_EXIT_WATCHED))?;
    jumps
        .set(0, &fd, 0)
        .map_err(map_err(maps::SYS_EXIT_WATCHED))
}

fn tracepoint<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut TracePoint, ObserveError> {
    let prog = ebpf
        .program_mut(name)
        .ok_or(ObserveError::MissingObject { name })?;
    let tp: &mut TracePoint = prog
        .try_into()
        .map_err(|source| ObserveError::Program { name, source })?;
    tp.load()
        .map_err(|source| ObserveError::Program { name, source })?;
    Ok(tp)
}

/// Raw tracepoint program `name` of the object, loaded.
fn load_raw<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut RawTracePoint, ObserveError> {
    let tp: &mut RawTracePoint = ebpf
        .program_mut(name)
        .ok_or(ObserveError::MissingObject { name })?
        .try_into()
        .map_err(|source| ObserveError::Program { name, source })?;
    tp.load()
        .map_err(|source| ObserveError::Program { name, source })?;
    Ok(tp)
}

fn attach_raw(
    ebpf: &mut Ebpf,
    name: &'static str,
    category: &str,
    tracepoint: &str,
) -> Result<(), ObserveError> {
    load_raw(ebpf, name)?
        .attach(tracepoint)
        .map_err(|source| ObserveError::Attach {
            tracepoint: format!("{category}/{tracepoint}"),
            source,
        })?;
    Ok(())
}

fn attach(tp: &mut TracePoint, category: &str, name: &str) -> Result<(), ObserveError> {
    tp.attach(category, name)
        .map_err(|source| ObserveError::Attach {
            tracepoint: format!("{category}/{name}"),
            source,
        })?;
    Ok(())
}

/// Attaches only the no-op program to `raw_syscalls/sys_exit`: the floor any syscall hook costs
/// here, for benchmarks. Detached when the returned object is dropped.
pub fn attach_noop_hook() -> Result<Ebpf, ObserveError> {
    let mut ebpf = EbpfLoader::new()
        .load(EBPF_OBJECT)
        .map_err(|source| ObserveError::Load {
            source: Box::new(source),
        })?;
    attach_raw(&mut ebpf, programs::NOOP, "raw_syscalls", "sys_exit")?;
    Ok(ebpf)
}

/// The floor program, attached to `raw_syscalls/sys_exit` for process `pid`, and its ring
/// buffer and consumer flag (see `programs::EMIT_FLOOR`), for benchmarks. Detached when the
/// returned object is dropped.
pub struct EmitFloor {
    pub ring: RingBuf<MapData>,
    consumer: Array<MapData, u32>,
    _ebpf: Ebpf,
}

impl EmitFloor {
    pub fn attach(pid: u32) -> Result<Self, ObserveError> {
        let mut ebpf = EbpfLoader::new()
            .override_global(globals::FLOOR_PID, &pid, true)
            .load(EBPF_OBJECT)
            .map_err(|source| ObserveError::Load {
                source: Box::new(source),
            })?;
        attach_raw(&mut ebpf, programs::EMIT_FLOOR, "raw_syscalls", "sys_exit")?;
        let ring = take_map(&mut ebpf, maps::EVENTS)?;
        let consumer = take_map(&mut ebpf, maps::CONSUMER)?;
        Ok(Self {
            ring,
            consumer,
            _ebpf: ebpf,
        })
    }

    /// As [`Tracker::consumer_waits`].
    pub fn consumer_waits(&mut self) -> Result<(), ObserveError> {
        self.consumer.set(0, 1, 0).map_err(map_err("CONSUMER"))
    }
}

impl Tracker {
    /// Loads the programs and attaches them. The kernel's field offsets (from its BTF), the
    /// per-boot key of open-file-description ids and the io_uring tracepoints' layout are
    /// written into the programs' read-only data first.
    pub fn load(opts: &TrackerOptions, tracefs: &Path) -> Result<Self, ObserveError> {
        let btf = Btf::from_sys_fs().map_err(|source| ObserveError::Btf { source })?;
        let offsets: KernelOffsets = btf
            .kernel_offsets()
            .map_err(|source| ObserveError::Btf { source })?;
        let key: [u64; 2] = key::ofd_key(Path::new(crate::paths::OFD_KEY))
            .map_err(|source| ObserveError::Key { source })?;
        let uring = uring_offsets(tracefs)?;
        let wakeup = opts.wakeup_bytes();
        let uring_globals = uring.unwrap_or_default();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::EVENTS, opts.ring_bytes)
            .override_global(globals::OFFSETS, &offsets, true)
            .override_global(globals::OFD_KEY, &key, true)
            .override_global(globals::WAKEUP_BYTES, &wakeup, true)
            .override_global(globals::URING, &uring_globals, true)
            // The programs' log statements below the level `log` shows cost a compare only.
            .override_global(aya_log::LEVEL, &(log::max_level() as u8), false)
            .load(EBPF_OBJECT)
            .map_err(|source| ObserveError::Load {
                source: Box::new(source),
            })?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            // An object without log statements has no log map: nothing to forward.
            Err(e) => {
                log::debug!("eBPF logs not forwarded: {e}");
                None
            }
        };
        // One raw tracepoint sees every syscall's exit, with the arguments still in the saved
        // registers; it keeps only watched processes and tracked syscall numbers. Per-syscall
        // tracepoints would cost a perf buffer per call, and any syscall entry hook (even one
        // per-syscall tracepoint, such as clone's) a second probe per syscall, for every
        // process on the host (see BENCHMARKS.md). A fork is told from a thread, and a shared
        // table from a copy, by the child's task at sched_process_fork.
        fill_sys_exit_jump(&mut ebpf)?;
        attach_raw(&mut ebpf, programs::SYS_EXIT, "raw_syscalls", "sys_exit")?;
        attach_raw(
            &mut ebpf,
            programs::SCHED_FORK,
            "sched",
            "sched_process_fork",
        )?;
        for (prog, event) in [
            (programs::SCHED_EXEC, "sched_process_exec"),
            (programs::SCHED_EXIT, "sched_process_exit"),
        ] {
            attach(tracepoint(&mut ebpf, prog)?, "sched", event)?;
        }
        if uring.is_some() {
            for (prog, event) in [
                (programs::URING_SUBMIT, URING_SUBMIT),
                (programs::URING_COMPLETE, URING_COMPLETE),
            ] {
                attach(tracepoint(&mut ebpf, prog)?, "io_uring", event)?;
            }
        }
        let aya_btf = aya::Btf::from_sys_fs().map_err(|e| ObserveError::Btf {
            source: super::btf::BtfError::Read {
                path: crate::paths::KERNEL_BTF.into(),
                message: e.to_string(),
            },
        })?;
        let iter: &mut Iter = ebpf
            .program_mut(programs::ITER_TASK_FILE)
            .ok_or(ObserveError::MissingObject {
                name: programs::ITER_TASK_FILE,
            })?
            .try_into()
            .map_err(|source| ObserveError::Program {
                name: programs::ITER_TASK_FILE,
                source,
            })?;
        iter.load("task_file", &aya_btf)
            .map_err(|source| ObserveError::Program {
                name: programs::ITER_TASK_FILE,
                source,
            })?;
        let ring = take_map(&mut ebpf, maps::EVENTS)?;
        let watched = take_map(&mut ebpf, maps::WATCHED)?;
        let losses = take_map(&mut ebpf, maps::LOSSES)?;
        let filter = take_map(&mut ebpf, maps::WATCH_FILTER)?;
        let lost_tgids = take_map(&mut ebpf, maps::LOST_TGIDS)?;
        let consumer = take_map(&mut ebpf, maps::CONSUMER)?;
        Ok(Self {
            logger,
            consumer,
            tun_named: offsets.tun_ready != 0,
            _ebpf: ebpf,
            ring: Some(ring),
            watched,
            losses,
            lost_tgids,
            filter,
        })
    }

    /// Hands the programs' aya-log records that arrived to `log` (diagnostics, read on the
    /// watcher's tick, never on the event path).
    pub fn flush_logs(&mut self) {
        if let Some(l) = &mut self.logger {
            l.flush();
        }
    }

    /// Says that the consumer is about to wait: the next event submitted wakes it (others are
    /// submitted without a wake-up, see `vmaudit_common::WAKEUP_BYTES`).
    pub fn consumer_waits(&mut self) -> Result<(), ObserveError> {
        self.consumer.set(0, 1, 0).map_err(map_err("CONSUMER"))
    }

    /// Every fd of process `tgid` as the kernel has it now, read by the task_file iterator.
    pub fn snapshot(&self, tgid: u32) -> Result<Vec<IterRecord>, ObserveError> {
        let prog =
            self._ebpf
                .program(programs::ITER_TASK_FILE)
                .ok_or(ObserveError::MissingObject {
                    name: programs::ITER_TASK_FILE,
                })?;
        let prog_fd = prog.fd().map_err(|source| ObserveError::Program {
            name: programs::ITER_TASK_FILE,
            source,
        })?;
        let bytes = iter_read(prog_fd.as_fd().as_raw_fd(), tgid)
            .map_err(|source| ObserveError::Iter { pid: tgid, source })?;
        Ok(parse_iter(&bytes))
    }

    /// Hands the ring buffer to the event loop (once).
    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.ring.take()
    }

    /// Starts watching a process (and its future children with `follow_children`).
    pub fn watch(&mut self, tgid: u32, follow_children: bool) -> Result<(), ObserveError> {
        let flags = if follow_children {
            WatchFlags::FOLLOW_CHILDREN
        } else {
            0
        };
        self.watched
            .insert(tgid, flags, 0)
            .map_err(map_err("WATCHED"))?;
        self.filter
            .set(tgid % WATCH_FILTER_SLOTS, 1, 0)
            .map_err(map_err("WATCH_FILTER"))
    }

    /// Stops reporting the syscalls of thread `tid` of a watched process (vmaudit's own
    /// consumer thread, when vmaudit watches itself).
    pub fn ignore_tid(&mut self, tid: u32) -> Result<(), ObserveError> {
        let mut map: HashMap<&mut MapData, u32, u8> =
            HashMap::try_from(self.ebpf_map_mut(maps::IGNORED_TIDS)?)
                .map_err(map_err("IGNORED_TIDS"))?;
        map.insert(tid, 1, 0).map_err(map_err("IGNORED_TIDS"))?;
        // Set after the entry, so that a program that sees the flag finds the entry.
        self.consumer.set(1, 1, 0).map_err(map_err("CONSUMER"))
    }

    fn ebpf_map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, ObserveError> {
        self._ebpf
            .map_mut(name)
            .ok_or(ObserveError::MissingObject { name })
    }

    /// Events lost so far, per cause (summed over CPUs), indexed by [`LossCause`].
    pub fn losses(&self) -> Result<[u64; LossCause::COUNT as usize], ObserveError> {
        let mut out = [0u64; LossCause::COUNT as usize];
        for cause in LossCause::ALL {
            let per_cpu = self
                .losses
                .get(&(cause as u32), 0)
                .map_err(map_err("LOSSES"))?;
            out[cause as usize] = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// The processes that lost events since the last call, and how many each.
    pub fn take_lost_tgids(&mut self) -> Result<Vec<(u32, u64)>, ObserveError> {
        let mut out = Vec::new();
        for item in self.lost_tgids.iter() {
            out.push(item.map_err(map_err("LOST_TGIDS"))?);
        }
        for (tgid, _) in &out {
            let _ = self.lost_tgids.remove(tgid);
        }
        Ok(out)
    }
}

/// `bpf(2)` commands and the attach type the iterator needs (linux/bpf.h).
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_TRACE_ITER: u32 = 28;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a zeroed `union bpf_attr` prefix of the size given, filled for `cmd`.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Runs the task_file iterator program `prog_fd` over process `tgid` only and returns what it
/// wrote. aya links an iterator over every task; the per-process filter
/// (`bpf_iter_link_info.task.pid`) is given here with BPF_LINK_CREATE, then BPF_ITER_CREATE
/// makes the fd to read, both as linux/bpf.h lays out `union bpf_attr`.
fn iter_read(prog_fd: i32, tgid: u32) -> std::io::Result<Vec<u8>> {
    // union bpf_iter_link_info { struct { u32 tid; u32 pid; u32 pid_fd; } task; ... } (16 bytes)
    let mut info = [0u32; 4];
    info[1] = tgid;
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(prog_fd as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&BPF_TRACE_ITER.to_ne_bytes());
    // link_create.iter_info (a pointer) at 16, iter_info_len at 24.
    attr[16..24].copy_from_slice(&(info.as_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&(size_of_val(&info) as u32).to_ne_bytes());
    let link = bpf(BPF_LINK_CREATE, &mut attr)?;
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    let iter = bpf(BPF_ITER_CREATE, &mut attr)?;
    let mut out = Vec::with_capacity(64 * size_of::<IterRecord>());
    std::fs::File::from(iter).read_to_end(&mut out)?;
    Ok(out)
}

/// The records of an iterator's output (a trailing partial record is ignored).
pub fn parse_iter(bytes: &[u8]) -> Vec<IterRecord> {
    bytes
        .chunks_exact(size_of::<IterRecord>())
        .map(|c| {
            // SAFETY: the chunk is exactly one record's size; IterRecord is plain old data
            // (every bit pattern valid) and read_unaligned makes no alignment assumption.
            unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<IterRecord>()) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracepoint_format_fields() {
        let format = "name: io_uring_submit_req\nformat:\n\
            \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
            \tfield:void * req;\toffset:16;\tsize:8;\tsigned:0;\n\
            \tfield:u8 opcode;\toffset:32;\tsize:1;\tsigned:0;\n\
            \tfield:__data_loc char[] op_str;\toffset:52;\tsize:4;\tsigned:0;\n";
        assert_eq!(format_offset(format, "req"), Some(16));
        assert_eq!(format_offset(format, "opcode"), Some(32));
        assert_eq!(format_offset(format, "op_str"), Some(52));
        assert_eq!(format_offset(format, "res"), None);
    }

    #[test]
    fn wakeup_threshold_follows_the_ring() {
        let o = |ring_bytes| TrackerOptions { ring_bytes }.wakeup_bytes();
        assert_eq!(o(4096), 1024);
        assert_eq!(o(1 << 24), vmaudit_common::WAKEUP_BYTES);
    }
}
