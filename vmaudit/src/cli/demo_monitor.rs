//! `vmaudit demo --monitor`: monitor mode against the libvirt running on this host. A transient
//! domain with one ethernet NIC is created and destroyed with virsh while `vmaudit monitor`
//! reads libvirt's records from the kernel and prints each verdict as it comes.

use std::{
    process::Command,
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use vmaudit::{
    audit::kernel::KernelAudit,
    exit,
    monitor::{MANAGER_EXES, MonitorOptions, monitor, source::Source},
    procfs::ProcFs,
    verify::{
        Verdict,
        observer::{Observer, Observers},
    },
};

const NAME: &str = "vmaudit-demo-lv";
const UUID: &str = "6d2c1f0e-8b7a-4c3d-9e5f-a1b2c3d4e5f7";
const MAC: &str = "52:54:00:de:10:01";
const IFNAME: &str = "vmaudit-dlv0";

fn say(line: &str) {
    println!("{line}");
}

struct Forward(Mutex<mpsc::Sender<Verdict>>);

impl Observer for Forward {
    fn verdict(&self, v: &Verdict) {
        if let Ok(tx) = self.0.lock() {
            let _ = tx.send(v.clone());
        }
    }
}

fn virsh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .map_err(|e| format!("virsh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Restores the audit subsystem's enabled flag.
struct AuditRestore(Option<bool>);

impl Drop for AuditRestore {
    fn drop(&mut self) {
        if let (Some(was), Ok(mut k)) = (self.0, KernelAudit::open()) {
            let _ = k.set_enabled(was);
        }
    }
}

fn show(v: &Verdict) {
    say(&format!(
        "   {:<11} {:<10} {}",
        v.status.as_str(),
        v.claim.kind,
        v.reason
    ));
}

pub fn run() -> u8 {
    let exes: Vec<std::path::PathBuf> = MANAGER_EXES.iter().map(Into::into).collect();
    let managers = ProcFs::default().running(&exes);
    if managers.is_empty() {
        vmaudit::failure!(
            "demo --monitor: no libvirtd or virtqemud is running (install and start libvirt first)"
        );
        return exit::NO_SUCH_PROCESS;
    }
    // libvirt's records reach the kernel's log only while auditing is enabled.
    let mut restore = AuditRestore(None);
    match KernelAudit::open().and_then(|mut k| k.status().map(|s| (k, s))) {
        Ok((mut k, s)) if !s.is_enabled() => {
            if let Err(e) = k.set_enabled(true) {
                return super::fail(&e, exit::PRIVILEGES);
            }
            restore.0 = Some(false);
        }
        Ok(_) => {}
        Err(e) => return super::fail(&e, exit::PRIVILEGES),
    }
    say(&format!(
        "== vmaudit demo --monitor: libvirt (pid {managers:?}) runs VM {NAME:?}; vmaudit monitor holds its records to the kernel"
    ));
    let (vtx, vrx) = mpsc::channel();
    let mut observers = Observers::default();
    observers.push(Arc::new(Forward(Mutex::new(vtx))));
    let opts = MonitorOptions {
        source: Source::Kernel,
        managers,
        manager_exes: exes,
        journal: None,
        journal_records: false,
        reopen: None,
        deadline: Duration::from_secs(3),
        echo: false,
        tracker: Default::default(),
        observers,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(monitor(
            opts,
            async {
                let _ = stop_rx.await;
            },
            move |_| {
                let _ = ready_tx.send(());
            },
        ))
        .map_err(|e| e.to_string())
    });
    if ready_rx.recv().is_err() {
        let e = worker.join().ok().and_then(Result::err).unwrap_or_default();
        vmaudit::failure!("demo --monitor: {e}");
        return exit::INTERNAL;
    }
    let _ = virsh(&["destroy", NAME]);
    let _ = Command::new("ip").args(["link", "del", IFNAME]).output();
    let xml = format!(
        "<domain type='qemu'><name>{NAME}</name><uuid>{UUID}</uuid><memory unit='MiB'>64</memory>\
         <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>\
         <devices><interface type='ethernet'><mac address='{MAC}'/><target dev='{IFNAME}'/>\
         <model type='virtio'/></interface></devices></domain>"
    );
    let file = std::env::temp_dir().join(format!("vmaudit-demo-lv-{}.xml", std::process::id()));
    let wait_for = |kind: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match vrx.recv_timeout(left) {
                Ok(v) => {
                    show(&v);
                    if v.claim.kind == kind {
                        return;
                    }
                }
                Err(_) => {
                    say(&format!("   (no {kind} verdict within 20 s)"));
                    return;
                }
            }
        }
    };
    let created = std::fs::write(&file, xml)
        .map_err(|e| e.to_string())
        .and_then(|()| virsh(&["create", &file.to_string_lossy()]));
    let _ = std::fs::remove_file(&file);
    match created {
        Ok(out) => {
            say(&format!("\n== virsh create: {out}"));
            say("== verdicts as libvirt's records arrive:");
            wait_for("vm-start");
            wait_for("net-start");
            say(&format!("\n== virsh destroy {NAME}"));
            if let Err(e) = virsh(&["destroy", NAME]) {
                say(&format!("   virsh destroy: {e}"));
            }
            wait_for("vm-stop");
        }
        Err(e) => say(&format!("\n== virsh create failed: {e}")),
    }
    let _ = stop_tx.send(());
    match worker.join() {
        Ok(Ok(o)) => {
            while let Ok(v) = vrx.try_recv() {
                show(&v);
            }
            say(&format!(
                "\n== {} confirmed, {} violated, {} unconfirmed, {} unknown",
                o.totals.confirmed, o.totals.violated, o.totals.unconfirmed, o.totals.unknown
            ));
            exit::OK
        }
        Ok(Err(e)) => {
            vmaudit::failure!("demo --monitor: {e}");
            exit::INTERNAL
        }
        Err(_) => exit::INTERNAL,
    }
}
