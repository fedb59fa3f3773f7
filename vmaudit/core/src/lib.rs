//! vmaudit's core: what a VM manager claims, what the kernel showed, and the verdict that joins
//! them, with libvirt's audit record format.
//!
//! No aya, tokio or axum here, and no I/O in the judging code: the ledger reads the kernel only
//! through [`view::KernelView`], which tests fake.
//! - [`fd`]: device numbers, fd identities and fd table changes, as the kernel reports them.
//! - [`acl`]: device ACLs: the rules a manager applies, what the kernel holds, its decisions.
//! - [`time`]: the audit stamp and RFC 3339 times.
//! - [`audit`]: libvirt's records, built and read back byte for byte.

pub mod acl;
pub mod audit;
pub mod fd;
pub mod time;
