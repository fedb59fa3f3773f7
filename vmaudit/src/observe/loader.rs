//! Loading and attaching the fd tracker, and access to its maps.
//!
//! Dropping a [`Tracker`] detaches every program and frees every map: nothing outlives it.

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{RawTracePoint, TracePoint},
};
use vmaudit_common::{LossCause, WATCH_FILTER_SLOTS, WatchFlags, maps, programs};

use super::ObserveError;

/// Syscalls whose entry is hooked (classic tracepoints) to learn clone flags.
pub const CLONE_SYSCALLS: [&str; 4] = ["clone", "clone3", "fork", "vfork"];

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

/// The loaded and attached fd tracker.
pub struct Tracker {
    /// Owns the programs and their links; dropped last.
    _ebpf: Ebpf,
    ring: Option<RingBuf<MapData>>,
    watched: HashMap<MapData, u32, u32>,
    losses: PerCpuArray<MapData, u64>,
    lost_tgids: HashMap<MapData, u32, u64>,
    filter: Array<MapData, u32>,
}

fn map_err(what: &'static str) -> impl FnOnce(aya::maps::MapError) -> ObserveError {
    move |source| ObserveError::Map { what, source }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, ObserveError> {
    ebpf.take_map(name)
        .ok_or(ObserveError::MissingObject { name })
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

fn attach_raw(ebpf: &mut Ebpf, name: &'static str, tracepoint: &str) -> Result<(), ObserveError> {
    let prog = ebpf
        .program_mut(name)
        .ok_or(ObserveError::MissingObject { name })?;
    let tp: &mut RawTracePoint = prog
        .try_into()
        .map_err(|source| ObserveError::Program { name, source })?;
    tp.load()
        .map_err(|source| ObserveError::Program { name, source })?;
    tp.attach(tracepoint)
        .map_err(|source| ObserveError::Attach {
            tracepoint: format!("raw_syscalls/{tracepoint}"),
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
    attach_raw(&mut ebpf, programs::NOOP, "sys_exit")?;
    Ok(ebpf)
}

impl Tracker {
    /// Loads the programs and attaches them.
    pub fn load(opts: &TrackerOptions) -> Result<Self, ObserveError> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::EVENTS, opts.ring_bytes)
            .load(EBPF_OBJECT)
            .map_err(|source| ObserveError::Load {
                source: Box::new(source),
            })?;
        // One raw tracepoint sees every syscall's exit, with the arguments still in the saved
        // registers; it keeps only watched processes and tracked syscall numbers. Per-syscall
        // tracepoints would cost a perf buffer per call, and an entry hook a second program run
        // per syscall, for every process on the host (see BENCHMARKS.md). Only clone-family
        // entries are hooked, to tell a forked process from a thread.
        attach_raw(&mut ebpf, programs::SYS_EXIT, "sys_exit")?;
        let clone_enter = tracepoint(&mut ebpf, programs::CLONE_ENTER)?;
        for name in CLONE_SYSCALLS {
            attach(clone_enter, "syscalls", &format!("sys_enter_{name}"))?;
        }
        for (prog, event) in [
            (programs::SCHED_FORK, "sched_process_fork"),
            (programs::SCHED_EXEC, "sched_process_exec"),
            (programs::SCHED_EXIT, "sched_process_exit"),
        ] {
            attach(tracepoint(&mut ebpf, prog)?, "sched", event)?;
        }
        let ring =
            RingBuf::try_from(take_map(&mut ebpf, maps::EVENTS)?).map_err(map_err("EVENTS"))?;
        let watched =
            HashMap::try_from(take_map(&mut ebpf, maps::WATCHED)?).map_err(map_err("WATCHED"))?;
        let losses =
            PerCpuArray::try_from(take_map(&mut ebpf, maps::LOSSES)?).map_err(map_err("LOSSES"))?;
        let filter = Array::try_from(take_map(&mut ebpf, maps::WATCH_FILTER)?)
            .map_err(map_err("WATCH_FILTER"))?;
        let lost_tgids = HashMap::try_from(take_map(&mut ebpf, maps::LOST_TGIDS)?)
            .map_err(map_err("LOST_TGIDS"))?;
        Ok(Self {
            _ebpf: ebpf,
            ring: Some(ring),
            watched,
            losses,
            lost_tgids,
            filter,
        })
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
        map.insert(tid, 1, 0).map_err(map_err("IGNORED_TIDS"))
    }

    fn ebpf_map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, ObserveError> {
        self._ebpf
            .map_mut(name)
            .ok_or(ObserveError::MissingObject { name })
    }

    /// Stops watching a process; a missing entry (it exited) is not an error.
    pub fn unwatch(&mut self, tgid: u32) {
        let _ = self.watched.remove(&tgid);
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
