//! The verifier: every audit record is a claim about what the kernel holds; the fd tracker,
//! kcmp and the cgroup device policies give the kernel's side; each claim gets a verdict with
//! its evidence. The rules are the core's ([`vmaudit_core::ledger`]); this module runs them.
//!
//! - [`engine`]: the verification loop, for `run` and `monitor` alike.
//! - [`host`]: the real [`vmaudit_core::view::KernelView`].
//! - [`files`]: its reads for the resource claims (stat without opening, sockets, sysfs).
//! - [`publish`]: verdicts to the journal and stdout, on a thread of their own.
//! - [`observer`]: hooks for whoever shows what the verifier sees (dashboard, metrics).
//! - [`report`]: `vmaudit verify JOURNAL`.

pub mod engine;
pub mod files;
pub mod host;
pub mod observer;
pub mod publish;
pub mod report;

pub use vmaudit_core::{
    claim::{AclChange, Claim, ClaimKind, Handed},
    verdict::{ClaimRef, Evidence, Status, Totals, Verdict},
};
