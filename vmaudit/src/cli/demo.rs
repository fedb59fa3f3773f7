//! `vmaudit demo`: a VM with a tap and a macvtap interface, run by vmaudit's runtime.
//!
//! It prints what was opened and audited (each record as it is journaled), what the emulator
//! holds (its fd table, from /proc), then stops the VM while the kernel fd tracker watches the
//! emulator, so the release of every fd is seen from the kernel. Real qemu when it is
//! installed; otherwise a stand-in emulator, labelled as such.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::mpsc,
};

use vmaudit::{
    audit::{AuditMode, JournalEntry},
    exit,
    observe::{Output, WatchOptions},
    procfs::ProcFs,
    runtime::{
        run::{RunOptions, run as run_vm},
        spec::find_program,
    },
};

#[derive(Debug, clap::Args)]
pub struct Args {}

const NAME: &str = "vmaudit-demo";
const UUID: &str = "6d2c1f0e-8b7a-4c3d-9e5f-a1b2c3d4e5f6";
const PARENT: &str = "vmaudit-dm0";

/// The veth pair the macvtap sits on, deleted at the end.
struct Veth;

impl Veth {
    fn create() -> Result<Self, String> {
        let _ = Command::new("ip").args(["link", "del", PARENT]).output();
        let out = Command::new("ip")
            .args([
                "link",
                "add",
                PARENT,
                "type",
                "veth",
                "peer",
                "name",
                "vmaudit-dm1",
            ])
            .output()
            .map_err(|e| format!("ip (iproute2): {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Self)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", PARENT]).output();
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn spec_text(stand_in: bool) -> String {
    let emulator = if stand_in {
        // Holds the fds it is given and waits; runs no VM. Only for hosts without qemu.
        "[emulator]\npath = \"/bin/sh\"\nargs = [\"-c\", \"exec sleep infinity\", \"vmaudit-stand-in\"]\n\n"
    } else {
        ""
    };
    format!(
        "name = \"{NAME}\"\nuuid = \"{UUID}\"\n\n{emulator}\
         [[interface]]\nmac = \"52:54:00:de:00:01\"\nifname = \"vmaudit-dtap\"\n\n\
         [[interface]]\nmac = \"52:54:00:de:00:02\"\nbackend = \"macvtap\"\nparent = \"{PARENT}\"\nifname = \"vmaudit-dmvt\"\n"
    )
}

fn print_table(pid: u32) {
    say(&format!(
        "\n== the emulator (pid {pid}) holds, read from /proc/{pid}/fd:"
    ));
    say(&format!(
        "   {:>4}  {:<14} {:<8} {:<13} PATH",
        "FD", "KIND", "RDEV", "IFACE"
    ));
    match ProcFs::default().snapshot(pid) {
        Ok(table) => {
            for (fd, id) in table {
                let kind = serde_json::to_value(id.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                let rdev = id.rdev.map(|r| r.to_string()).unwrap_or_else(|| "-".into());
                let iface = id.iface.clone().unwrap_or_else(|| "-".into());
                say(&format!(
                    "   {fd:>4}  {kind:<14} {rdev:<8} {iface:<13} {}",
                    id.path
                ));
            }
        }
        Err(e) => say(&format!("   (cannot read: {e})")),
    }
}

pub fn run(_args: Args) -> u8 {
    let stand_in = find_program(Path::new("qemu-system-x86_64")).is_none();
    let dir = std::env::temp_dir().join(format!("vmaudit-demo-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("vmaudit: demo directory {}: {e}", dir.display());
        return exit::INTERNAL;
    }
    let _cleanup = DirGuard(dir.clone());
    let spec = dir.join("vm.toml");
    let journal = dir.join("journal.jsonl");
    if let Err(e) = std::fs::write(&spec, spec_text(stand_in)) {
        eprintln!("vmaudit: writing {}: {e}", spec.display());
        return exit::INTERNAL;
    }
    let _veth = match Veth::create() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vmaudit: demo: cannot create the veth parent for the macvtap: {e}");
            return exit::INTERNAL;
        }
    };
    say(&format!(
        "== vmaudit demo: VM {NAME:?} (uuid {UUID}), a tap and a macvtap (on veth {PARENT})"
    ));
    if stand_in {
        say(
            "== qemu-system-x86_64 is not installed: the emulator is a STAND-IN (`sleep`), which holds the fds but runs no VM",
        );
    } else {
        say("== emulator: Debian's qemu-system-x86_64, a paused pc machine with no guest");
    }
    say(&format!(
        "== spec {}; journal {}; records also go to the kernel audit subsystem when it is enabled",
        spec.display(),
        journal.display()
    ));
    say(
        "\n== audit records, in the order written (libvirt's fields, then libaudit's, then vmaudit's):",
    );

    let mut opts = RunOptions::new(spec.clone());
    opts.audit = AuditMode::Both;
    opts.journal = Some(journal.clone());
    opts.echo_verdicts = false;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut stop_tx = Some(stop_tx);
    let mut watcher: Option<std::thread::JoinHandle<()>> = None;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return super::fail(&e, exit::INTERNAL),
    };
    let result = rt.block_on(run_vm(
        &opts,
        &mut |e: &JournalEntry| {
            say(&format!("   {} {} [kernel: {}]", e.kind, e.text, e.kernel));
        },
        &mut |pid| {
            print_table(pid);
            say("\n== stopping the VM while the kernel fd tracker watches the emulator:");
            watcher = start_watcher(pid);
            if let Some(tx) = stop_tx.take() {
                let _ = tx.send(());
            }
        },
        async {
            let _ = stop_rx.await;
        },
    ));
    if let Some(w) = watcher {
        let _ = w.join();
    }
    match result {
        Ok(ending) => {
            say(&format!(
                "\n== the VM ended ({ending:?}); its tap, macvtap link and cgroup are gone."
            ));
            exit::OK
        }
        Err(e) => super::fail(&e, e.exit_code()),
    }
}

/// Watches `pid` with the kernel tracker in a thread of its own, printing each fd it releases;
/// returns once the tracker is watching.
fn start_watcher(pid: u32) -> Option<std::thread::JoinHandle<()>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let opts = WatchOptions {
            pids: vec![pid],
            ..Default::default()
        };
        let result = super::watch::watch(&opts, &mut |o: Output| {
            if let Output::Fd(r) = &o
                && r.op != vmaudit::observe::table::Op::Seed
            {
                let path = r.file.as_ref().map(|f| f.path.as_str()).unwrap_or("?");
                let iface = r
                    .file
                    .as_ref()
                    .and_then(|f| f.iface.as_deref())
                    .map(|i| format!(" ({i})"))
                    .unwrap_or_default();
                say(&format!(
                    "   kernel: pid {} {:?} fd {} {path}{iface}",
                    r.pid,
                    r.op,
                    r.fd.unwrap_or(-1)
                ));
            }
            let _ = ready_tx.send(());
        });
        if let Err(e) = result {
            eprintln!("vmaudit: demo: fd tracker: {e}");
            let _ = ready_tx.send(());
        }
    });
    // The seed records arrive before the watch is live; one is enough to go on.
    let _ = ready_rx.recv();
    Some(handle)
}

struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
