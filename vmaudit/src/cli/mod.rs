//! Subcommands, one module each.

mod demo;
mod demo_monitor;
mod fds;
mod forward;
mod generate;
mod hotplug;
mod monitor;
mod noop_hook;
mod run;
mod search;
mod verify;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmaudit::exit;

/// The exit-code table for `--help`, from [`exit::TABLE`].
fn exit_codes() -> String {
    let mut s = String::from("Exit codes:");
    for (code, meaning) in exit::TABLE {
        s.push_str(&format!("\n  {code}  {meaning}"));
    }
    s
}

/// Says, from the kernel itself, which fds a VM's emulator really holds.
#[derive(Debug, Parser)]
#[command(name = "vmaudit", version, after_help = exit_codes())]
struct Cli {
    #[command(flatten)]
    verbosity: clap_verbosity_flag::Verbosity<clap_verbosity_flag::InfoLevel>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Stream every fd a process gains or loses, from the kernel, as JSON lines.
    Watch(watch::Args),
    /// Run a VM from a spec: open its devices, set its device cgroup, launch the emulator,
    /// audit every step (journal lines on stdout).
    Run(run::Args),
    /// Hot-plug a network interface into a VM run by `vmaudit run`.
    AttachNet(hotplug::AttachArgs),
    /// Hot-unplug a network interface (only claimed once the guest acknowledged it).
    DetachNet(hotplug::DetachArgs),
    /// Hold a running libvirt's VIRT_* audit records to the kernel's evidence (verdicts on
    /// stdout and in the journal) until SIGINT/SIGTERM.
    Monitor(monitor::Args),
    /// The claims of a journal and their verdicts, with totals.
    Verify(verify::Args),
    /// Search journals and audit.log files: records and verdicts by MAC, VM, uuid, pid, device,
    /// time, status; `search fds` and `search released` answer which fds the emulator holds or
    /// released for a MAC.
    Search(Box<search::Args>),
    /// Follow journals (across rotation) and send each record, verdict and summary line as
    /// one RFC 5424 syslog message over UDP, TCP or a unix socket, until SIGINT/SIGTERM.
    Forward(forward::Args),
    /// Print a process's current fd table (from /proc).
    Fds(fds::Args),
    /// Run the demo: watch a small workload and print its fd events.
    Demo(demo::Args),
    /// Attach a do-nothing program to every syscall's exit until SIGINT/SIGTERM: the cost
    /// floor of any syscall hook on this kernel (used by the benchmark).
    #[command(hide = true)]
    NoopHook(noop_hook::Args),
    /// Write the man pages or a shell's completions (for packaging).
    #[command(hide = true)]
    Generate(generate::Args),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let v = &cli.verbosity;
    vmaudit::logging::init(v.is_present().then(|| v.log_level_filter()));
    let code = match cli.command {
        Command::Watch(a) => watch::run(a),
        Command::Fds(a) => fds::run(a),
        Command::Run(a) => run::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Monitor(a) => monitor::run(a),
        Command::Search(a) => search::run(*a),
        Command::Forward(a) => forward::run(a),
        Command::AttachNet(a) => hotplug::attach(a),
        Command::DetachNet(a) => hotplug::detach(a),
        Command::Demo(a) => demo::run(a),
        Command::NoopHook(a) => noop_hook::run(a),
        Command::Generate(a) => generate::run(a),
    };
    ExitCode::from(code)
}

/// A duration on the command line: `2s`, `500ms`, `1m 30s` (humantime's syntax); a bare number
/// has no unit and is refused.
fn duration(s: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("a duration longer than zero".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// Writes one JSON object and a newline on stdout, at once.
pub fn print_json(value: &impl serde::Serialize) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Writes `text` on stdout, at once.
pub fn print_text(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// What a command's answer could not be written on stdout says and exits with: its reader left,
/// or the file it goes to is full.
pub fn output_failed(e: &std::io::Error) -> u8 {
    vmaudit::failure!("writing to stdout: {e}");
    exit::OUTPUT
}

/// Prints one clear line for a failure (its cause chain joined) and returns its exit code.
pub fn fail(err: &(dyn std::error::Error + 'static), code: u8) -> u8 {
    // First lines only: a verifier log can run to thousands of lines (RUST_LOG=debug has it).
    let first =
        |e: &dyn std::error::Error| e.to_string().lines().next().unwrap_or_default().to_owned();
    let mut msg = first(err);
    let mut source = err.source();
    while let Some(s) = source {
        log::debug!("{s}");
        msg.push_str(": ");
        msg.push_str(&first(s));
        source = s.source();
    }
    vmaudit::failure!("{msg}");
    debug_assert!(exit::TABLE.iter().any(|(c, _)| *c == code));
    code
}
