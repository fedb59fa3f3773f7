//! cgroup v2: vmaudit's `BPF_PROG_TYPE_CGROUP_DEVICE` program on a VM's cgroup directory, its
//! rule map (libvirt's layout) and the stream of decisions it reports.

use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupDevice},
};
use vmaudit_common::devcg::{self, DecisionLoss, maps, programs};

use super::{CgroupError, Decision, DeviceRule, Rule};

/// The device program's object, built by build.rs.
static DEVCG_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vmaudit-devcg"));

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> CgroupError {
    move |source| CgroupError::Map { name, source }
}

/// The loaded program, attached (with a bpf link) to one cgroup directory.
pub(super) struct DeviceProgram {
    /// Owns the program and (unpinned) its link: dropping it detaches the program. Held, never
    /// read.
    _ebpf: Ebpf,
    /// A pinned link: its fd, and the pin, removed on detach.
    pinned: Option<(std::os::fd::OwnedFd, std::path::PathBuf)>,
    rules: HashMap<MapData, u64, u32>,
    losses: PerCpuArray<MapData, u64>,
}

impl DeviceProgram {
    /// Loads the program and attaches it to `dir` (an open cgroup v2 directory). The map is
    /// empty: every access is denied until rules are applied.
    pub(super) fn attach(
        dir: &File,
        dir_path: &Path,
        pin: Option<&Path>,
    ) -> Result<(Self, DecisionStream), CgroupError> {
        let mut ebpf =
            EbpfLoader::new()
                .load(DEVCG_OBJECT)
                .map_err(|source| CgroupError::Load {
                    source: Box::new(source),
                })?;
        let name = programs::DEVICE;
        let prog: &mut CgroupDevice = ebpf
            .program_mut(name)
            .ok_or(CgroupError::MissingObject { name })?
            .try_into()
            .map_err(|source| CgroupError::Program { name, source })?;
        prog.load()
            .map_err(|source| CgroupError::Program { name, source })?;
        let pinned = match pin {
            Some(pin) => {
                let prog_fd = prog
                    .fd()
                    .map_err(|source| CgroupError::Program { name, source })?;
                let link = super::pin::attach_pinned(prog_fd.as_fd(), dir.as_fd(), pin)?;
                Some((link, pin.to_owned()))
            }
            None => {
                // Single: no program below this cgroup can override the VM's ACL.
                prog.attach(dir, CgroupAttachMode::Single)
                    .map_err(|source| CgroupError::Attach {
                        path: dir_path.to_owned(),
                        source,
                    })?;
                None
            }
        };
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(CgroupError::MissingObject { name })
        };
        let rules = HashMap::try_from(take(maps::RULES)?).map_err(map_err(maps::RULES))?;
        let losses = PerCpuArray::try_from(take(maps::LOSSES)?).map_err(map_err(maps::LOSSES))?;
        let ring = RingBuf::try_from(take(maps::EVENTS)?).map_err(map_err(maps::EVENTS))?;
        Ok((
            Self {
                _ebpf: ebpf,
                pinned,
                rules,
                losses,
            },
            DecisionStream { ring },
        ))
    }

    /// Applies one rule to the map: [`Rule::DenyAll`] removes every entry; an allow adds its
    /// rights to an entry of the same numbers and type. libvirt's map holds one entry per
    /// `major:minor`, so an allow whose numbers are held for the other device type fails
    /// rather than widen that entry.
    pub(super) fn apply(&mut self, rule: &Rule) -> Result<(), CgroupError> {
        let Some(dev) = rule.device_rule() else {
            let keys: Vec<u64> = self
                .rules
                .keys()
                .collect::<Result<_, _>>()
                .map_err(map_err(maps::RULES))?;
            for k in keys {
                match self.rules.remove(&k) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(maps::RULES)(e)),
                }
            }
            return Ok(());
        };
        let (key, mut value) = dev.bpf_entry();
        match self.rules.get(&key, 0) {
            Ok(old) => {
                let (_, old_types) = devcg::split_value(old);
                let (_, new_types) = devcg::split_value(value);
                if old_types != new_types {
                    return Err(CgroupError::KeyConflict {
                        rule: rule.to_string(),
                        held: DeviceRule::from_bpf_entry(key, old)
                            .map_or_else(|| format!("{old:#x}"), |d| d.to_string()),
                    });
                }
                value |= old;
            }
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(maps::RULES)(e)),
        }
        self.rules
            .insert(key, value, 0)
            .map_err(map_err(maps::RULES))
    }

    /// Every map entry as a rule, sorted.
    pub(super) fn rules(&self) -> Result<Vec<DeviceRule>, CgroupError> {
        let mut out = Vec::new();
        for item in self.rules.iter() {
            let (key, value) = item.map_err(map_err(maps::RULES))?;
            out.push(
                DeviceRule::from_bpf_entry(key, value)
                    .ok_or(CgroupError::MapEntry { key, value })?,
            );
        }
        out.sort();
        Ok(out)
    }

    /// Decisions the program could not report (ring buffer full), summed over CPUs.
    pub(super) fn lost(&self) -> Result<u64, CgroupError> {
        let per_cpu = self
            .losses
            .get(&(DecisionLoss::RingFull as u32), 0)
            .map_err(map_err(maps::LOSSES))?;
        Ok(per_cpu.iter().sum())
    }

    /// Detaches the program (closes its link, removes its pin) and unloads it.
    pub(super) fn detach(mut self) -> Result<(), CgroupError> {
        match self.pinned.take() {
            Some((_link, pin)) => super::pin::unpin(&pin).map(|_| ()),
            None => Ok(()),
        }
    }
}

impl Drop for DeviceProgram {
    fn drop(&mut self) {
        if let Some((_link, pin)) = self.pinned.take()
            && let Err(e) = super::pin::unpin(&pin)
        {
            log::warn!("{e}");
        }
    }
}

/// The program's decisions, in the order it made them. Poll its fd for readability (e.g.
/// tokio's `AsyncFd`), then [`DecisionStream::drain`].
pub struct DecisionStream {
    ring: RingBuf<MapData>,
}

impl DecisionStream {
    /// Appends every decision available now to `out`; returns how many records it read,
    /// including malformed ones, which are skipped (and logged).
    pub fn drain_into(&mut self, out: &mut Vec<Decision>) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            n += 1;
            match Decision::decode(&item) {
                Some(d) => out.push(d),
                None => log::warn!("malformed device decision of {} bytes", item.len()),
            }
        }
        n
    }

    /// Every decision available now.
    pub fn drain(&mut self) -> Vec<Decision> {
        let mut out = Vec::new();
        self.drain_into(&mut out);
        out
    }
}

impl AsFd for DecisionStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for DecisionStream {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}
