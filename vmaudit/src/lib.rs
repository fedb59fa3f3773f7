//! vmaudit: holds a VM manager's claims about the devices its emulator holds to what the
//! kernel saw.
//!
//! The library core; the `vmaudit` binary is a thin CLI over it.
//! - [`observe`]: the eBPF fd tracker and the per-process fd tables it keeps exact.
//! - [`procfs`]: fd identities read from /proc (seeding, resyncing, `vmaudit fds`).
//! - [`kcmp`]: whether two fds in two processes are the same open file description.
//! - [`exit`]: the documented exit codes.
//! - [`follow`]: a file followed by name across rotation (audit.log, journals).
//! - [`forward`]: journals forwarded as RFC 5424 syslog.

#[cfg(not(target_arch = "x86_64"))]
compile_error!("vmaudit's syscall tables are x86_64 only for now");

pub mod audit;
pub mod cgroup;
pub use vmaudit_core::exit;
pub mod follow;
pub mod forward;
pub mod kcmp;
pub mod logging;
pub mod monitor;
pub mod mountinfo;
pub mod observe;
pub mod paths;
pub mod procfs;
pub mod runtime;
pub mod search;
pub mod serve;
pub mod verify;
