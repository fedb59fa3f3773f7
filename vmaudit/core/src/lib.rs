//! vmaudit's core: what a VM manager claims, what the kernel showed, and the verdict that joins
//! them, with libvirt's audit record format.
//!
//! No aya, tokio or axum here, and no I/O in the judging code: the ledger reads the kernel only
//! through [`view::KernelView`], which tests fake.
//! - [`fd`]: device numbers, fd identities and fd table changes, as the kernel reports them.
//! - [`acl`]: device ACLs: the rules a manager applies, what the kernel holds, its decisions.
//! - [`time`]: the audit stamp and RFC 3339 times.
//! - [`audit`]: libvirt's records, built and read back byte for byte.
//! - [`claim`]: what a record claims, with what its source knows.
//! - [`verdict`]: statuses, evidence, verdicts.
//! - [`view`]: the one seam to the kernel and the host ([`view::KernelView`]).
//! - [`ledger`]: the rules, one set for vmaudit's runtime and for libvirt's records.
//! - [`exit`]: the documented exit codes.

pub mod acl;
pub mod audit;
pub mod claim;
pub mod exit;
pub mod fd;
pub mod ledger;
pub mod time;
pub mod verdict;
pub mod view;
