//! The VM device cgroup program (`vmaudit-devcg`): its rule map, which uses libvirt's layout
//! exactly, and the decisions it reports.
//!
//! Rule map (`DEVCG_RULES`, a hash map `u64 -> u32`, as libvirt's cgroup v2 device program):
//! key `(major << 32) | minor`, [`ANY`] meaning "any" in either half; value
//! `(access bits << 16) | type bits`. A check of type `T` and access `A` (the kernel passes
//! `(A << 16) | T`, the same layout) is allowed by an entry whose value holds every bit of it.
//! Lookup order: exact, `(major, *)`, `(*, minor)`, `(*, *)`; no entry allows it: denied.

use core::mem::size_of;

/// Map names, as the eBPF object declares them.
pub mod maps {
    /// The rules: libvirt's key and value layout (see the module documentation).
    pub const RULES: &str = "DEVCG_RULES";
    /// The ring buffer of [`super::RawDecision`]s.
    pub const EVENTS: &str = "DEVCG_EVENTS";
    /// Per-CPU counters of decisions the program could not report, indexed by
    /// [`super::DecisionLoss`].
    pub const LOSSES: &str = "DEVCG_LOSSES";
}

/// Program names, as the eBPF object declares them.
pub mod programs {
    /// `BPF_PROG_TYPE_CGROUP_DEVICE`: decides, and reports, every device access check of the
    /// processes in the cgroup it is attached to.
    pub const DEVICE: &str = "vmaudit_devcg";
}

/// `BPF_DEVCG_ACC_MKNOD`.
pub const ACC_MKNOD: u32 = 1;
/// `BPF_DEVCG_ACC_READ`.
pub const ACC_READ: u32 = 2;
/// `BPF_DEVCG_ACC_WRITE`.
pub const ACC_WRITE: u32 = 4;
/// Every access bit.
pub const ACC_ALL: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;
/// `BPF_DEVCG_DEV_BLOCK`.
pub const DEV_BLOCK: u32 = 1;
/// `BPF_DEVCG_DEV_CHAR`.
pub const DEV_CHAR: u32 = 2;
/// Every type bit.
pub const DEV_ALL: u32 = DEV_BLOCK | DEV_CHAR;
/// "Any major" or "any minor" in a key half.
pub const ANY: u32 = 0xffff_ffff;

/// Entries of the rule map (libvirt starts at 64 and grows; a VM needs a few dozen).
pub const RULES_ENTRIES: u32 = 1024;
/// Size of the decision ring buffer, in bytes (a power-of-two multiple of the page size).
pub const RING_BYTES: u32 = 1 << 18;

/// The rule map key of `major:minor` (either may be [`ANY`]).
pub const fn key(major: u32, minor: u32) -> u64 {
    ((major as u64) << 32) | minor as u64
}

/// `(major, minor)` of a rule map key.
pub const fn split_key(key: u64) -> (u32, u32) {
    ((key >> 32) as u32, key as u32)
}

/// The rule map value (and the kernel's `access_type`) of access bits and type bits.
pub const fn value(access: u32, types: u32) -> u32 {
    (access << 16) | (types & 0xffff)
}

/// `(access bits, type bits)` of a rule map value or of a `access_type`.
pub const fn split_value(value: u32) -> (u32, u32) {
    (value >> 16, value & 0xffff)
}

/// Which lookup allowed an access ([`RawDecision::matched`]).
pub struct Matched;
impl Matched {
    /// No entry allowed it: denied.
    pub const NONE: u32 = 0;
    /// `(major, minor)`.
    pub const EXACT: u32 = 1;
    /// `(major, *)`.
    pub const MAJOR: u32 = 2;
    /// `(*, minor)`.
    pub const MINOR: u32 = 3;
    /// `(*, *)`.
    pub const ALL: u32 = 4;
}

/// Why the program could not report a decision. Index into the `DEVCG_LOSSES` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionLoss {
    /// The ring buffer was full.
    RingFull = 0,
}

impl DecisionLoss {
    pub const COUNT: u32 = 1;
}

/// One access decision, as the program made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawDecision {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// `bpf_get_current_cgroup_id()`: the cgroup v2 id (directory inode) of the process.
    pub cgroup_id: u64,
    /// The process (thread group) that asked.
    pub tgid: u32,
    pub major: u32,
    pub minor: u32,
    /// Requested access bits ([`ACC_READ`], [`ACC_WRITE`], [`ACC_MKNOD`]).
    pub access: u32,
    /// Device type bits ([`DEV_CHAR`] or [`DEV_BLOCK`]).
    pub dev_type: u32,
    /// 1: allowed, 0: denied (EPERM).
    pub allowed: u32,
    /// Which lookup allowed it, a [`Matched`] constant.
    pub matched: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<RawDecision>() == 48);

impl RawDecision {
    pub const SIZE: usize = size_of::<RawDecision>();
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, `Copy`, only integer fields and no implicit padding (size asserted).
    unsafe impl aya::Pod for super::RawDecision {}
}
