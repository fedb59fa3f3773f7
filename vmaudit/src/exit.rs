//! Exit codes of the `vmaudit` binary. Each failure class has its own code so that scripts
//! (and the verifier's users) can tell "found a problem" from "could not look".

/// Finished normally (for `watch`: stopped by SIGINT/SIGTERM).
pub const OK: u8 = 0;
/// An unexpected internal error (a bug, or an I/O error with no better class).
pub const INTERNAL: u8 = 1;
/// The command line was malformed (clap's own code).
pub const USAGE: u8 = 2;
/// The process named by `--pid` does not exist (or is a thread, not a process).
pub const NO_SUCH_PROCESS: u8 = 3;
/// Missing privileges (capabilities) for what was asked.
pub const PRIVILEGES: u8 = 4;
/// The kernel lacks a feature vmaudit needs (tracefs, a tracepoint, BPF program type).
pub const KERNEL_FEATURE: u8 = 5;
/// Every watched process exited while being watched (the summary is still printed).
pub const TARGET_EXITED: u8 = 6;

/// The table printed by `vmaudit --help` and the README.
pub const TABLE: &[(u8, &str)] = &[
    (OK, "finished normally (watch: stopped by SIGINT/SIGTERM)"),
    (INTERNAL, "internal error"),
    (USAGE, "malformed command line"),
    (NO_SUCH_PROCESS, "no such process (or the pid is a thread)"),
    (PRIVILEGES, "missing privileges"),
    (
        KERNEL_FEATURE,
        "kernel feature missing (tracefs, tracepoint, BPF)",
    ),
    (
        TARGET_EXITED,
        "the watched process(es) exited while watched",
    ),
];
