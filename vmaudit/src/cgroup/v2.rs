//! cgroup v2: vmaudit's `BPF_PROG_TYPE_CGROUP_DEVICE` program on a VM's cgroup directory, its
//! rule map (libvirt's layout) and the stream of decisions it reports.

use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    path::Path,
    ptr,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupDevice},
};
use vmaudit_common::devcg::{self, DEV_BLOCK, DEV_CHAR, DecisionLoss, Matched, maps, programs};

use super::{
    CgroupError,
    acl::{Acl, DevKind, DeviceRule, Rule},
};

/// The device program's object, built by build.rs.
static DEVCG_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vmaudit-devcg"));

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> CgroupError {
    move |source| CgroupError::Map { name, source }
}

/// The loaded program, attached (with a bpf link) to one cgroup directory.
pub(super) struct DeviceProgram {
    /// Owns the program and its link: dropping it detaches the program.
    ebpf: Ebpf,
    rules: HashMap<MapData, u64, u32>,
    losses: PerCpuArray<MapData, u64>,
}

impl DeviceProgram {
    /// Loads the program and attaches it to `dir` (an open cgroup v2 directory). The map is
    /// empty: every access is denied until rules are applied.
    pub(super) fn attach(
        dir: &File,
        dir_path: &Path,
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
        // Single: no program below this cgroup can override the VM's ACL.
        prog.attach(dir, CgroupAttachMode::Single)
            .map_err(|source| CgroupError::Attach {
                path: dir_path.to_owned(),
                source,
            })?;
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(CgroupError::MissingObject { name })
        };
        let rules = HashMap::try_from(take(maps::RULES)?).map_err(map_err(maps::RULES))?;
        let losses = PerCpuArray::try_from(take(maps::LOSSES)?).map_err(map_err(maps::LOSSES))?;
        let ring = RingBuf::try_from(take(maps::EVENTS)?).map_err(map_err(maps::EVENTS))?;
        Ok((
            Self {
                ebpf,
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

    /// Detaches the program (closes its link) and unloads it.
    pub(super) fn detach(self) {
        drop(self.ebpf);
    }
}

/// Device type of a [`Decision`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionDev {
    Char,
    Block,
    /// Type bits the program does not know (never seen: the kernel passes char or block).
    Other(u32),
}

impl DecisionDev {
    /// The device kind, if char or block.
    pub const fn kind(self) -> Option<DevKind> {
        match self {
            Self::Char => Some(DevKind::Char),
            Self::Block => Some(DevKind::Block),
            Self::Other(_) => None,
        }
    }
}

/// Which map entry allowed an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchedEntry {
    /// `major:minor`.
    Exact,
    /// `major:*`.
    Major,
    /// `*:minor`.
    Minor,
    /// `*:*`.
    All,
}

/// One device access decision of the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Kernel CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// cgroup v2 id of the process that asked ([`super::VmCgroup::cgroup_id`] for the VM's).
    pub cgroup_id: u64,
    pub tgid: u32,
    pub dev: DecisionDev,
    pub major: u32,
    pub minor: u32,
    /// Requested rights (`BPF_DEVCG_ACC_*`), e.g. rw for an O_RDWR open.
    pub access: Acl,
    pub allowed: bool,
    /// The entry that allowed it (None when denied).
    pub matched: Option<MatchedEntry>,
}

impl Decision {
    /// Decodes ring-buffer bytes (which need not be aligned); None if too short or malformed.
    pub fn decode(bytes: &[u8]) -> Option<Decision> {
        if bytes.len() < devcg::RawDecision::SIZE {
            return None;
        }
        // SAFETY: the length is checked above; the struct is plain old data (every bit pattern
        // is valid) and read_unaligned makes no alignment assumption.
        let raw = unsafe { ptr::read_unaligned(bytes.as_ptr().cast::<devcg::RawDecision>()) };
        let matched = match raw.matched {
            Matched::NONE => None,
            Matched::EXACT => Some(MatchedEntry::Exact),
            Matched::MAJOR => Some(MatchedEntry::Major),
            Matched::MINOR => Some(MatchedEntry::Minor),
            Matched::ALL => Some(MatchedEntry::All),
            _ => return None,
        };
        Some(Decision {
            ts_ns: raw.ts_ns,
            cgroup_id: raw.cgroup_id,
            tgid: raw.tgid,
            dev: match raw.dev_type {
                DEV_CHAR => DecisionDev::Char,
                DEV_BLOCK => DecisionDev::Block,
                other => DecisionDev::Other(other),
            },
            major: raw.major,
            minor: raw.minor,
            access: Acl::from_bits(raw.access)?,
            allowed: raw.allowed != 0,
            matched,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(d: &devcg::RawDecision) -> Vec<u8> {
        let mut v = vec![0u8; 1];
        // SAFETY: reading the bytes of a plain-old-data struct with no padding.
        v.extend_from_slice(unsafe {
            std::slice::from_raw_parts(ptr::from_ref(d).cast::<u8>(), devcg::RawDecision::SIZE)
        });
        v
    }

    #[test]
    fn decisions_decode_from_unaligned_bytes() {
        let raw = devcg::RawDecision {
            ts_ns: 7,
            cgroup_id: 42,
            tgid: 1234,
            major: 10,
            minor: 200,
            access: devcg::ACC_READ | devcg::ACC_WRITE,
            dev_type: DEV_CHAR,
            allowed: 0,
            matched: Matched::NONE,
            _pad: 0,
        };
        let b = bytes(&raw);
        let d = Decision::decode(&b[1..]).unwrap();
        assert_eq!(
            d,
            Decision {
                ts_ns: 7,
                cgroup_id: 42,
                tgid: 1234,
                dev: DecisionDev::Char,
                major: 10,
                minor: 200,
                access: Acl::RW,
                allowed: false,
                matched: None,
            }
        );
        assert_eq!(Decision::decode(&b[1..b.len() - 1]), None);
        let mut bad = raw;
        bad.matched = 9;
        assert_eq!(Decision::decode(&bytes(&bad)[1..]), None);
        let mut ok = raw;
        ok.allowed = 1;
        ok.matched = Matched::MAJOR;
        ok.dev_type = DEV_BLOCK;
        let d = Decision::decode(&bytes(&ok)[1..]).unwrap();
        assert_eq!(
            (d.allowed, d.matched, d.dev),
            (true, Some(MatchedEntry::Major), DecisionDev::Block)
        );
    }
}
