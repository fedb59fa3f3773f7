//! vmaudit's kernel programs: the fd tracker.
//!
//! One raw tracepoint on every syscall's exit (the arguments are still in the saved user
//! registers), classic tracepoints on the clone-family entries, and the sched fork, exec and
//! exit tracepoints report every way a watched process gains or loses a file descriptor. A
//! process that is not watched costs one inlined array read and emits nothing. Every event
//! that cannot be delivered is counted per cause, and per process, so that userspace resyncs
//! exactly the affected tables.
#![no_std]
#![no_main]

mod fdtrack;
mod prelude;
