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
pub struct Args {
    /// Monitor mode instead: a transient domain of the libvirt running here, its records held
    /// to the kernel's evidence by `vmaudit monitor`.
    #[arg(long)]
    monitor: bool,
}

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

/// The tiny real guest `cargo xtask setup` builds (`.tools/guest` of the workspace the binary
/// was built in), when it is there: it acknowledges hot-unplug.
fn guest_image() -> Option<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .map(|a| a.join(".tools").join("guest"))
        .find(|g| g.join("vmlinuz").is_file() && g.join("initrd.gz").is_file())
        .map(|g| (g.join("vmlinuz"), g.join("initrd.gz")))
}

fn spec_text(stand_in: bool, guest: Option<&(PathBuf, PathBuf)>, serial: &Path) -> String {
    let emulator = match (stand_in, guest) {
        // Holds the fds it is given and waits; runs no VM. Only for hosts without qemu.
        (true, _) => "[emulator]\npath = \"/bin/sh\"\nargs = [\"-c\", \"exec sleep infinity\", \"vmaudit-stand-in\"]\n\n".to_owned(),
        (false, Some((kernel, initrd))) => format!(
            "[emulator]\nargs = [\"-accel\", \"tcg\", \"-M\", \"pc\", \"-m\", \"128\", \"-nodefaults\", \"-display\", \"none\", \"-kernel\", \"{}\", \"-initrd\", \"{}\", \"-append\", \"console=ttyS0\", \"-serial\", \"file:{}\", \"-chardev\", \"socket,id=qmp,fd={{qmp-fd}},server=on,wait=off\", \"-mon\", \"chardev=qmp,mode=control\"]\n\n",
            kernel.display(),
            initrd.display(),
            serial.display()
        ),
        (false, None) => String::new(),
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

pub fn run(args: Args) -> u8 {
    if args.monitor {
        return super::demo_monitor::run();
    }
    let stand_in = find_program(Path::new("qemu-system-x86_64")).is_none();
    let dir = std::env::temp_dir().join(format!("vmaudit-demo-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        vmaudit::failure!("demo directory {}: {e}", dir.display());
        return exit::INTERNAL;
    }
    let _cleanup = DirGuard(dir.clone());
    let spec = dir.join("vm.toml");
    let journal = dir.join("journal.jsonl");
    let guest = guest_image();
    let serial = dir.join("serial.log");
    // qemu runs as its unprivileged user: the console log it writes is made for it here.
    let log_made = std::fs::write(&serial, "").and_then(|()| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&serial, std::fs::Permissions::from_mode(0o666))
    });
    if let Err(e) = log_made {
        eprintln!("vmaudit: {}: {e}", serial.display());
        return exit::INTERNAL;
    }
    if let Err(e) = std::fs::write(&spec, spec_text(stand_in, guest.as_ref(), &serial)) {
        vmaudit::failure!("writing {}: {e}", spec.display());
        return exit::INTERNAL;
    }
    let _veth = match Veth::create() {
        Ok(v) => v,
        Err(e) => {
            vmaudit::failure!("demo: cannot create the veth parent for the macvtap: {e}");
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
    } else if guest.is_some() {
        say(
            "== emulator: Debian's qemu-system-x86_64 booting a tiny real guest (Debian's cloud kernel), which acknowledges hot-unplug",
        );
    } else {
        say(
            "== emulator: Debian's qemu-system-x86_64, a paused pc machine with no guest (no hot-unplug can complete)",
        );
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
    let mut operator: Option<std::thread::JoinHandle<()>> = None;
    let booting = guest.is_some() && !stand_in;
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
            let stop = stop_tx.take();
            let serial = serial.clone();
            // The operator: hot-plug and unplug over the control socket while `run` serves it,
            // then stop the VM with the fd tracker watching.
            operator = Some(std::thread::spawn(move || {
                operate(pid, booting.then_some(serial.as_path()));
                say("\n== stopping the VM while the kernel fd tracker watches the emulator:");
                let watcher = start_watcher(pid);
                if let Some(tx) = stop {
                    let _ = tx.send(());
                }
                if let Some(w) = watcher {
                    let _ = w.join();
                }
            }));
        },
        async {
            let _ = stop_rx.await;
        },
    ));
    if let Some(w) = operator {
        let _ = w.join();
    }
    match result {
        Ok(ending) => {
            say(&format!(
                "\n== the VM ended ({ending:?}); its tap, macvtap link and cgroup are gone."
            ));
            print_verdicts(&journal);
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
            vmaudit::failure!("demo: fd tracker: {e}");
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

/// Hot-plugs a NIC and unplugs it, printing vmaudit's answers and what qemu holds.
fn operate(pid: u32, guest_serial: Option<&Path>) {
    use vmaudit::runtime::control::{Request, request};
    if let Some(serial) = guest_serial {
        say("\n== waiting for the guest kernel to boot (its console says when):");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        // A boot gives no event but its console output, written to a plain file: poll it.
        while !std::fs::read_to_string(serial).is_ok_and(|t| t.contains("vmaudit-guest: ready")) {
            if std::time::Instant::now() > deadline {
                say("   the guest did not boot in 90 s");
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        say("   guest ready");
    }
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let ask = |req: Request| match rt.block_on(request(NAME, &req)) {
        Ok(r) => say(&format!("   vmaudit: {} (exit code {})", r.message, r.code)),
        Err(e) => say(&format!("   vmaudit: {e}")),
    };
    say(
        "\n== hot-plug: vmaudit attach-net vmaudit-demo --mac 52:54:00:de:00:03 (getfd over SCM_RIGHTS, netdev_add, device_add)",
    );
    ask(Request::AttachNet {
        mac: "52:54:00:de:00:03".into(),
        backend: vmaudit::runtime::spec::Backend::Tap,
        parent: None,
        ifname: Some("vmaudit-dhp".into()),
        queues: 1,
    });
    print_table(pid);
    say(
        "\n== hot-unplug: vmaudit detach-net vmaudit-demo --mac 52:54:00:de:00:03 (device_del, DEVICE_DELETED, netdev_del)",
    );
    ask(Request::DetachNet {
        mac: "52:54:00:de:00:03".into(),
        timeout_ms: 3000,
    });
}

/// The verdicts of the journal, one line each.
fn print_verdicts(journal: &Path) {
    say("\n== verdicts (vmaudit verify): each claim held to the kernel's evidence");
    let Ok(text) = std::fs::read_to_string(journal) else {
        return;
    };
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["type"] != "verdict" {
            continue;
        }
        say(&format!(
            "   {:<11} {:<10} {}",
            v["status"].as_str().unwrap_or("?"),
            v["claim"]["kind"].as_str().unwrap_or("?"),
            v["reason"].as_str().unwrap_or("")
        ));
    }
}
