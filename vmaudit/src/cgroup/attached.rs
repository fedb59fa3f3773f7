//! Device programs someone else attached to a cgroup (libvirt's, in monitor mode): which are
//! attached, and the rules their map holds.
//!
//! aya's `CgroupDevice::query` hands back links that detach the program when dropped, which
//! must never happen to another manager's program; so the query is one `BPF_PROG_QUERY` of our
//! own (read-only), and the map is read through aya by id.

use std::{
    fs::File,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData};

use super::DeviceRule;

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_CGROUP_DEVICE: u32 = 6;

/// The `query` member of `union bpf_attr` (zero-padded to the size the kernel accepts).
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: [u32; 25],
}

/// Ids of the device programs attached to the cgroup directory `dir` (BPF_PROG_QUERY).
pub fn device_programs(dir: &Path) -> io::Result<Vec<u32>> {
    device_programs_of(File::open(dir)?.as_fd())
}

/// Ids of the device programs attached to the open cgroup directory `cg`.
pub fn device_programs_of(cg: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_fd: cg.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid, zero-padded bpf_attr for BPF_PROG_QUERY whose `prog_ids`
    // points at `ids`, which holds `prog_cnt` u32s and outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ids[..(attr.prog_cnt as usize).min(ids.len())].to_vec())
}

/// A device program's rule map, by libvirt's layout (u64 key, u32 value, hash).
pub struct RuleMap {
    pub prog_id: u32,
    pub map_id: u32,
    map: HashMap<MapData, u64, u32>,
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl RuleMap {
    /// The hash map with 8-byte keys and 4-byte values used by program `prog_id`.
    pub fn of_program(prog_id: u32) -> io::Result<Self> {
        let info = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == prog_id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such program"))?;
        for map_id in info.map_ids().map_err(other)?.unwrap_or_default() {
            let Ok(data) = MapData::from_id(map_id) else {
                continue;
            };
            if let Ok(Map::HashMap(data)) = Map::from_map_data(data)
                && let Ok(map) = HashMap::<MapData, u64, u32>::try_from(Map::HashMap(data))
            {
                return Ok(Self {
                    prog_id,
                    map_id,
                    map,
                });
            }
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("program {prog_id} has no device rule map"),
        ))
    }

    /// The first device program attached to `dir` that has a rule map.
    pub fn of_cgroup(dir: &Path) -> io::Result<Self> {
        let progs = device_programs(dir)?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no device program attached");
        for id in progs {
            match Self::of_program(id) {
                Ok(m) => return Ok(m),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Every entry as a rule, sorted (entries no rule could write are skipped).
    pub fn rules(&self) -> io::Result<Vec<DeviceRule>> {
        let mut out = Vec::new();
        for item in self.map.iter() {
            let (k, v) = item.map_err(other)?;
            if let Some(r) = DeviceRule::from_bpf_entry(k, v) {
                out.push(r);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes the entry of `rule` (tests stage a rule removed behind the manager's back).
    pub fn remove(&mut self, rule: &DeviceRule) -> io::Result<()> {
        let (key, _) = rule.bpf_entry();
        self.map.remove(&key).map_err(other)
    }
}
