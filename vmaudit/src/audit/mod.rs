//! libvirt-compatible audit records: formatting, the kernel audit subsystem sink, the journal.
//!
//! vmaudit writes the same `VIRT_*` records libvirt writes, byte for byte (libvirt's fields in
//! libvirt's order, then libaudit's ` exe=... hostname=? addr=? terminal=? res=...` suffix), so
//! that `ausearch`, `aureport --virt` and every rule written for libvirt hosts read them
//! unchanged. What vmaudit knows beyond libvirt (the fd numbers) goes in extra `vmaudit-*`
//! fields after the suffix.
//!
//! The format itself (building, encoding and parsing records) is the core's
//! ([`vmaudit_core::audit`]); this module sends records and keeps them:
//! - [`kernel`]: the kernel audit subsystem over NETLINK_AUDIT: status, enable, send.
//! - [`reader`]: a multicast [`Reader`] of what the kernel logged.
//! - [`journal`]: vmaudit's own append-only JSON-lines journal, fsync'd per record.
//! - [`chain`]: the journal's hash chain (every line's `seq` and `prev`), and its check.
//! - [`sink`]: where records go ([`AuditMode`]): journal, kernel, or both.

pub mod chain;
pub mod journal;
pub mod kernel;
pub mod reader;
pub mod sink;

pub use journal::{Journal, JournalError};
pub use kernel::{AuditStatus, KernelAudit, KernelError, SendStatus};
pub use reader::Reader;
pub use sink::{AuditMode, AuditSink, EmitOutcome, KernelPort, SinkError};
// The record format lives in the core; these paths keep reading `audit::record`.
pub use vmaudit_core::audit::{
    Acl, AuditType, CgroupClass, CgroupReason, ControlOp, JournalEntry, KernelOutcome,
    KernelRecord, NetChange, Record, RecordBuilder, RecordError, RecordFields, StartReason,
    StopReason, Uuid, VmIdent, encode, entry, logfmt, parse, record, virt, vocab,
};
