//! The device cgroup program: libvirt's lookup, plus a report of every decision.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    },
    macros::{cgroup_device, map},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::DeviceContext,
};
use vmaudit_common::devcg::{
    ANY, DecisionLoss, Matched, RING_BYTES, RULES_ENTRIES, RawDecision, key, split_value,
};

/// libvirt's rule map: `(major << 32) | minor` -> `(access << 16) | types`.
#[map]
static DEVCG_RULES: HashMap<u64, u32> = HashMap::with_max_entries(RULES_ENTRIES, 0);

#[map]
static DEVCG_EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[map]
static DEVCG_LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(DecisionLoss::COUNT, 0);

/// Whether the entry at `key` holds every bit of `access_type` (its type bit and every
/// requested access bit), as libvirt's program tests it.
#[inline(always)]
fn permits(key: u64, access_type: u32) -> bool {
    // SAFETY: the value is copied out at once; a concurrent update can only make it stale.
    match unsafe { DEVCG_RULES.get(key) } {
        Some(v) => *v & access_type == access_type,
        None => false,
    }
}

/// Decides a device access check and reports it. 1 allows, 0 denies (EPERM).
#[cgroup_device]
pub fn vmaudit_devcg(ctx: DeviceContext) -> i32 {
    // SAFETY: the kernel passes a valid, readable `struct bpf_cgroup_dev_ctx`; the verifier
    // checks each field read against its layout.
    let (access_type, major, minor) = unsafe {
        let dev = &*ctx.device;
        (dev.access_type, dev.major, dev.minor)
    };
    let matched = if permits(key(major, minor), access_type) {
        Matched::EXACT
    } else if permits(key(major, ANY), access_type) {
        Matched::MAJOR
    } else if permits(key(ANY, minor), access_type) {
        Matched::MINOR
    } else if permits(key(ANY, ANY), access_type) {
        Matched::ALL
    } else {
        Matched::NONE
    };
    let allowed = (matched != Matched::NONE) as u32;
    let (access, dev_type) = split_value(access_type);
    match DEVCG_EVENTS.reserve::<RawDecision>(0) {
        Some(mut entry) => {
            // SAFETY: helpers without arguments, allowed in cgroup device programs.
            let (ts_ns, cgroup_id) = unsafe { (bpf_ktime_get_ns(), bpf_get_current_cgroup_id()) };
            entry.write(RawDecision {
                ts_ns,
                cgroup_id,
                tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
                major,
                minor,
                access,
                dev_type,
                allowed,
                matched,
                _pad: 0,
            });
            entry.submit(0);
        }
        None => {
            if let Some(c) = DEVCG_LOSSES.get_ptr_mut(DecisionLoss::RingFull as u32) {
                // SAFETY: a per-CPU slot, so no other CPU writes it; the pointer comes from the
                // map.
                unsafe { *c += 1 };
            }
        }
    }
    allowed as i32
}
