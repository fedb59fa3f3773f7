//! `vmaudit fds`: a process's current fd table.

use std::{fmt::Write as _, io::IsTerminal as _};

use vmaudit::{exit, procfs::ProcFs};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The process whose table to print.
    #[arg(long)]
    pid: u32,
    /// JSON (an array of fd objects) instead of a table; the default when stdout is not a terminal.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> u8 {
    let procfs = ProcFs::default();
    if !procfs.exists(args.pid) {
        vmaudit::failure!("no such process: {}", args.pid);
        return exit::NO_SUCH_PROCESS;
    }
    let snap = match procfs.snapshot(args.pid) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            vmaudit::failure!(
                "cannot read the fds of pid {}: {e} (needs CAP_SYS_PTRACE or the same user)",
                args.pid
            );
            return exit::PRIVILEGES;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            vmaudit::failure!("no such process: {}", args.pid);
            return exit::NO_SUCH_PROCESS;
        }
        Err(e) => {
            vmaudit::failure!("reading /proc/{}/fd: {e}", args.pid);
            return exit::INTERNAL;
        }
    };
    let flags_cloexec = |f: Option<u32>| f.is_some_and(|f| f & vmaudit::procfs::O_CLOEXEC != 0);
    if args.json || !std::io::stdout().is_terminal() {
        let rows: Vec<serde_json::Value> = snap
            .iter()
            .map(|(fd, id)| {
                let mut v = serde_json::to_value(id).unwrap_or_default();
                v["fd"] = (*fd).into();
                v["cloexec"] = flags_cloexec(id.flags).into();
                v
            })
            .collect();
        return match super::print_json(&serde_json::Value::Array(rows)) {
            Ok(()) => exit::OK,
            Err(e) => super::output_failed(&e),
        };
    }
    let mut text = format!(
        "{:>4}  {:<7}  {:<7}  {:>8}  {:>10}  {:<8}  PATH\n",
        "FD", "CLOEXEC", "KIND", "RDEV", "INODE", "IFACE"
    );
    for (fd, id) in &snap {
        let kind = serde_json::to_value(id.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        writeln!(
            text,
            "{:>4}  {:<7}  {:<7}  {:>8}  {:>10}  {:<8}  {}",
            fd,
            if flags_cloexec(id.flags) { "yes" } else { "no" },
            kind,
            id.rdev.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
            id.ino.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
            id.iface.as_deref().unwrap_or("-"),
            id.path
        )
        .expect("a String takes any text");
    }
    match super::print_text(&text) {
        Ok(()) => exit::OK,
        Err(e) => super::output_failed(&e),
    }
}
