//! Exit codes of the `vmaudit` binary. Each failure class has its own code so that scripts
//! (and the verifier's users) can tell "found a problem" from "could not look".

/// Finished normally (for `watch`: stopped by SIGINT/SIGTERM; for `run`: the VM was stopped
/// on SIGINT/SIGTERM or shut down by itself).
pub const OK: u8 = 0;
/// An unexpected internal error (a bug, or an I/O error with no better class).
pub const INTERNAL: u8 = 1;
/// The command line was malformed (clap's own code).
pub const USAGE: u8 = 2;
/// The process named by `--pid` does not exist (or is a thread, not a process).
pub const NO_SUCH_PROCESS: u8 = 3;
/// Missing privileges (capabilities) for what was asked; `attach-net`/`detach-net`: the control
/// socket refused the caller.
pub const PRIVILEGES: u8 = 4;
/// The kernel lacks a feature vmaudit needs (tracefs, a tracepoint, BPF program type).
pub const KERNEL_FEATURE: u8 = 5;
/// Every watched process exited while being watched (the summary is still printed).
pub const TARGET_EXITED: u8 = 6;

/// The verifier found a violation (`verify`, `run` and `monitor`; `run --strict` stops the VM at
/// the first).
pub const VIOLATED: u8 = 7;
/// The verifier could not confirm everything (`verify`, `run` and `monitor`): a claim is
/// unconfirmed (deadline passed without evidence), unknown (events lost) or unverified (no
/// verdict in the journal); nothing violated.
pub const UNCONFIRMED: u8 = 8;

/// `vmaudit run`: the spec is malformed or names something the host lacks (the message names
/// the field): unknown key, bad MAC or uuid, duplicate MAC, missing parent link or emulator.
pub const SPEC: u8 = 10;
/// A journal cannot be read, written or opened, or is not one, whatever the command: `run` and
/// `monitor` (the journal they write; `run --audit kernel`: the kernel's audit socket), `verify`,
/// `search` (an input: journal or audit.log) and `forward` (the journals they read).
pub const JOURNAL: u8 = 11;
/// `vmaudit run`: a device could not be opened (its failure record was written; everything
/// opened before it was closed).
pub const DEVICE: u8 = 12;
/// `vmaudit run`: the VM's cgroup or its device ACL could not be set up.
pub const CGROUP: u8 = 13;
/// `vmaudit run`: the emulator could not be started, or exited before it was up.
pub const EMULATOR_FAILED: u8 = 14;
/// `vmaudit run`: the emulator crashed or exited with an error while running.
pub const EMULATOR_CRASHED: u8 = 15;

/// `attach-net`/`detach-net`: the request was refused (unknown MAC, duplicate MAC, qemu refused
/// a command or is gone), or no answer came; the failure is audited and nothing is left.
pub const REQUEST_FAILED: u8 = 16;
/// `detach-net`: the guest did not acknowledge the unplug in time; no detach is claimed and
/// qemu still holds the interface's fds.
pub const DETACH_UNACKNOWLEDGED: u8 = 17;

/// `--serve`: the address does not parse, or cannot be listened on (in use, not local, no
/// permission); nothing was started.
pub const SERVE: u8 = 18;
/// `search`: nothing matched (grep's convention: found is 0, nothing found is its own code).
pub const NO_MATCH: u8 = 19;
/// `monitor`: the audit records cannot be read (the audit.log is missing or unreadable, or the
/// kernel's audit multicast group cannot be joined), or the source failed while read.
pub const AUDIT_SOURCE: u8 = 20;

/// `run`: the VM is already running under vmaudit (another `vmaudit run` of it holds its lock),
/// or what a dead run of it left cannot be removed.
pub const VM_RUNNING: u8 = 21;

/// `forward`: the `--to` address does not parse or resolve, or the `--state` file cannot be
/// read (or is not one) or written.
pub const FORWARD: u8 = 22;

/// Standard output could not be written (its reader left, or the file it goes to is full):
/// `watch` stops, as the records after the failed write reach nobody; `search` stops mid-answer.
pub const OUTPUT: u8 = 23;

/// The table printed by `vmaudit --help` and the README.
pub const TABLE: &[(u8, &str)] = &[
    (OK, "finished normally (watch: stopped by SIGINT/SIGTERM)"),
    (INTERNAL, "internal error"),
    (USAGE, "malformed command line"),
    (NO_SUCH_PROCESS, "no such process (or the pid is a thread)"),
    (
        PRIVILEGES,
        "missing privileges (attach-net/detach-net: the control socket refused the caller)",
    ),
    (
        KERNEL_FEATURE,
        "kernel feature missing (tracefs, tracepoint, BPF)",
    ),
    (
        TARGET_EXITED,
        "the watched process(es) exited while watched",
    ),
    (VIOLATED, "a claim was violated (verify, run, monitor)"),
    (
        UNCONFIRMED,
        "a claim is unconfirmed, unknown or unverified, nothing violated (verify, run, monitor)",
    ),
    (
        SPEC,
        "run: malformed spec, or it names something the host lacks",
    ),
    (
        JOURNAL,
        "a journal cannot be opened, read or written, or is not one (every command; run --audit kernel: the audit socket)",
    ),
    (DEVICE, "run: a device could not be opened"),
    (CGROUP, "run: the VM's cgroup could not be set up"),
    (EMULATOR_FAILED, "run: the emulator could not be started"),
    (
        EMULATOR_CRASHED,
        "run: the emulator crashed or failed while running",
    ),
    (
        REQUEST_FAILED,
        "attach-net/detach-net: the request was refused",
    ),
    (
        DETACH_UNACKNOWLEDGED,
        "detach-net: the guest did not acknowledge the unplug",
    ),
    (SERVE, "--serve: bad address, or it cannot be listened on"),
    (NO_MATCH, "search: nothing matched"),
    (AUDIT_SOURCE, "monitor: the audit records cannot be read"),
    (
        VM_RUNNING,
        "run: the VM already runs under vmaudit, or a dead run's leftovers cannot be removed",
    ),
    (
        FORWARD,
        "forward: bad --to address, or the --state file cannot be read or written",
    ),
    (
        OUTPUT,
        "stdout cannot be written (its reader left, or it is full)",
    ),
];
