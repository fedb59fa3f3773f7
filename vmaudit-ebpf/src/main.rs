//! vmaudit's kernel programs: the fd tracker.
//!
//! One raw tracepoint on every syscall's exit (the arguments are still in the saved user
//! registers; each new fd's file is read from the task's fd table there), classic tracepoints
//! on the clone-family entries, the sched fork, exec and exit tracepoints and the io_uring
//! submit/complete tracepoints report every way a watched process gains or loses a file
//! descriptor; a task_file iterator reads a whole table for the periodic check. A
//! process that is not watched costs one inlined array read and emits nothing. Every event
//! that cannot be delivered is counted per cause, and per process, so that userspace resyncs
//! exactly the affected tables.
#![no_std]
#![no_main]

mod fdtrack;
mod iter;
mod kfile;
mod prelude;
