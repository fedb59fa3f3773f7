//! Hot-plug and hot-unplug of network interfaces on the running VM, over QMP, audited fd by
//! fd and verified.
//!
//! attach: open the devices (one `reason=open` record per fd), hand each fd to qemu with
//! `getfd` (SCM_RIGHTS), `netdev_add`, `device_add`; `reason=attach`, whose claim names the
//! emulator's fds (found by kcmp). Any failure rolls back (`netdev_del`, `closefd`) and is
//! audited, which libvirt does not do.
//! detach: `device_del`, wait (bounded) for the guest's DEVICE_DELETED, `netdev_del`;
//! `reason=detach` naming the fds, whose release the verifier holds to the kernel. When the guest
//! never acknowledges, vmaudit claims no detach: the answer says so, and which fds qemu still
//! holds.

use std::{cell::RefCell, os::fd::AsFd as _, time::Duration};

use super::{
    control::{Checked, Response},
    devices::{self, Hooks, Made, NetDevice, OpenAttempt},
    qmp::Qmp,
    rundir::{LinkNote, RunDir},
    spec::{Interface, Mac},
    trail::Trail,
};
use crate::{
    audit::record::{NetChange, Record},
    exit,
    verify::{ClaimKind, Handed},
};

/// Takes what an interface made out of the run directory's state once it is gone (a state
/// that cannot be written is logged: the interface is gone either way).
pub fn forget_made(dir: &RefCell<RunDir>, dev: &NetDevice) {
    let made = dev.made();
    let forgotten = dir.borrow_mut().note(|s| {
        for m in &made {
            match m {
                Made::Link { name, .. } => s.links.retain(|l| &l.name != name),
                Made::Node(p) => s.nodes.retain(|n| n != p),
                Made::Tap(t) => s.taps.retain(|x| x != t),
            }
        }
    });
    if let Err(e) = forgotten {
        log::error!("{}", chain(&e));
    }
}

/// Notes what is about to be made in the run directory's state.
pub fn note_made(dir: &RefCell<RunDir>, m: &Made) -> Result<(), super::rundir::RunDirError> {
    dir.borrow_mut().note(|s| match m {
        Made::Link { name, parent, mac } => s.links.push(LinkNote {
            name: name.clone(),
            parent: parent.clone(),
            mac: mac.clone(),
        }),
        Made::Node(p) => s.nodes.push(p.clone()),
        Made::Tap(t) => s.taps.push(t.clone()),
    })
}

/// An interface the VM has now.
pub struct Nic {
    pub mac: Mac,
    pub netdev_id: String,
    pub device_id: String,
    /// Its fds in the emulator.
    pub emulator_fds: Vec<i32>,
    /// What vmaudit made for it (a macvtap link); its fds are closed once passed.
    pub dev: Option<NetDevice>,
}

/// The running VM's interfaces and QMP connection.
pub struct Live {
    pub qmp: Option<Qmp>,
    pub nics: Vec<Nic>,
    pub emulator_pid: u32,
    next: u32,
}

impl Live {
    pub fn new(qmp: Option<Qmp>, nics: Vec<Nic>, emulator_pid: u32) -> Self {
        Self {
            qmp,
            nics,
            emulator_pid,
            next: 0,
        }
    }

    /// Takes every device vmaudit made, for the teardown.
    pub fn take_devices(&mut self) -> Vec<NetDevice> {
        self.nics.iter_mut().filter_map(|n| n.dev.take()).collect()
    }

    /// Carries out a checked request; everything it writes goes to `trail`, everything it
    /// is about to make is noted in `dir` first.
    pub async fn handle(
        &mut self,
        trail: &Trail<'_>,
        dir: &RefCell<RunDir>,
        req: Checked,
    ) -> Response {
        match req {
            Checked::Attach(iface) => self.attach(trail, dir, iface).await,
            Checked::Detach { mac, timeout } => self.detach(trail, dir, &mac, timeout).await,
        }
    }

    async fn attach(
        &mut self,
        trail: &Trail<'_>,
        dir: &RefCell<RunDir>,
        iface: Interface,
    ) -> Response {
        if self.qmp.is_none() {
            return Response::err(
                exit::REQUEST_FAILED,
                "the emulator has no QMP socket (custom emulator arguments): nothing can be hot-plugged",
            );
        }
        if self.nics.iter().any(|n| n.mac == iface.mac) {
            return Response::err(
                exit::REQUEST_FAILED,
                format!("the VM already has an interface with MAC {}", iface.mac),
            );
        }
        if let Some(name) = &iface.ifname
            && (self
                .nics
                .iter()
                .any(|n| n.dev.as_ref().is_some_and(|d| &d.ifname == name))
                || std::path::Path::new("/sys/class/net").join(name).exists())
        {
            return Response::err(
                exit::REQUEST_FAILED,
                format!("ifname: an interface named {name} exists already"),
            );
        }
        let mac = iface.mac.to_string();
        self.next += 1;
        let (netdev_id, device_id) = (
            format!("vmhp{}", self.next),
            format!("vmhpnic{}", self.next),
        );
        let default_name = match iface.backend {
            super::spec::Backend::Tap => "vmtap%d".to_owned(),
            super::spec::Backend::Macvtap => format!("vmvthp{}", self.next),
        };
        // Open, with one record (and claim) per fd.
        let mut failed: Option<String> = None;
        let hooks = Hooks {
            record: &mut |a: OpenAttempt<'_>| {
                if failed.is_some() {
                    return;
                }
                if let Err(e) = trail.record_open(&mac, &a, false) {
                    failed = Some(chain(&e));
                }
            },
            note: &mut |m: &Made| note_made(dir, m),
        };
        let opened = devices::open_interface(&iface, &default_name, hooks).await;
        let mut dev = match opened {
            Ok(d) => d,
            Err(e) => {
                return self
                    .attach_failed(trail, &mac, "open", &chain(&e), &[])
                    .await;
            }
        };
        if let Some(e) = failed {
            forget_made(dir, &dev);
            dev.teardown().await;
            return Response::err(exit::JOURNAL, e);
        }
        // Hand each fd over, then the netdev, then the NIC; undo on any refusal.
        let qmp = self.qmp.as_mut().expect("checked above");
        let mut given: Vec<String> = Vec::new();
        let mut step_err = None;
        for (i, f) in dev.taps().enumerate() {
            let name = format!("{netdev_id}-{i}");
            match qmp.getfd(&name, f.fd.as_fd()).await {
                Ok(()) => given.push(name),
                Err(e) => {
                    step_err = Some(("getfd", chain(&e)));
                    break;
                }
            }
        }
        if step_err.is_none()
            && let Err(e) = qmp.netdev_add_tap(&netdev_id, &given, &[]).await
        {
            step_err = Some(("netdev_add", chain(&e)));
        }
        let mut undone = vec![];
        if step_err.is_none()
            && let Err(e) = qmp.device_add_nic(&device_id, &netdev_id, &mac).await
        {
            match qmp.netdev_del(&netdev_id).await {
                // netdev_del closed the fds it took.
                Ok(()) => {
                    given.clear();
                    undone.push(format!("netdev_del {netdev_id}"));
                }
                Err(d) => undone.push(format!("netdev_del {netdev_id} failed: {}", chain(&d))),
            }
            step_err = Some(("device_add", chain(&e)));
        }
        if let Some((step, msg)) = step_err {
            let qmp = self.qmp.as_mut().expect("checked above");
            for name in &given {
                match qmp.closefd(name).await {
                    Ok(()) => undone.push(format!("closefd {name}")),
                    Err(e) => undone.push(format!("closefd {name} failed: {}", chain(&e))),
                }
            }
            forget_made(dir, &dev);
            dev.teardown().await;
            return self.attach_failed(trail, &mac, step, &msg, &undone).await;
        }
        // Which fds qemu now holds for it: the same open files as ours, by kcmp.
        let pid = self.emulator_pid;
        let me = std::process::id();
        let qemu_fds = match crate::procfs::ProcFs::default().fd_numbers(pid) {
            Ok(f) => f,
            Err(e) => {
                // The record then names no emulator fd (-1), and the verifier says what it saw.
                log::warn!("the emulator's fds (pid {pid}): {e}");
                Vec::new()
            }
        };
        let passed: Vec<Handed> = dev
            .taps()
            .map(|f| {
                use std::os::fd::AsRawFd as _;
                let n = f.fd.as_raw_fd();
                let emu = qemu_fds
                    .iter()
                    .copied()
                    .find(|q| crate::kcmp::same_file(me, n, pid, *q).unwrap_or(false));
                Handed {
                    fd: n,
                    emulator_fd: emu.unwrap_or(-1),
                    same_at_handoff: emu.map(|_| true),
                    rdev: f.rdev,
                    path: f.path.display().to_string(),
                }
            })
            .collect();
        let emulator_fds: Vec<i32> = passed.iter().map(|p| p.emulator_fd).collect();
        let list = emulator_fds
            .iter()
            .map(i32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let b =
            Record::net(&trail.vm, NetChange::Attach, &mac).extra("vmaudit-emulator-fds", &list);
        let claim = ClaimKind::NetUp {
            mac: mac.clone(),
            attach: true,
            emulator_pid: Some(pid),
            handed: passed,
        };
        if let Err(e) = trail.emit_claim(b, claim) {
            return Response::err(exit::JOURNAL, chain(&e));
        }
        dev.fds.clear();
        self.nics.push(Nic {
            mac: iface.mac,
            netdev_id,
            device_id,
            emulator_fds: emulator_fds.clone(),
            dev: Some(dev),
        });
        Response::ok(
            format!("attached {mac}: qemu holds fd {list}"),
            emulator_fds,
        )
    }

    async fn attach_failed(
        &mut self,
        trail: &Trail<'_>,
        mac: &str,
        step: &str,
        msg: &str,
        undone: &[String],
    ) -> Response {
        let mut b = Record::net(&trail.vm, NetChange::Attach, mac)
            .success(false)
            .extra("vmaudit-step", step);
        if !undone.is_empty() {
            b = b.extra("vmaudit-rollback", &undone.join(","));
        }
        let failed = format!("attach {mac} failed at {step}: {msg}");
        match trail.emit(b) {
            Ok(_) => Response::err(exit::REQUEST_FAILED, failed),
            Err(e) => Response::err(
                exit::JOURNAL,
                format!("{failed}; and its failure record: {}", chain(&e)),
            ),
        }
    }

    async fn detach(
        &mut self,
        trail: &Trail<'_>,
        dir: &RefCell<RunDir>,
        mac: &Mac,
        timeout: Duration,
    ) -> Response {
        let mac_text = mac.to_string();
        let mac = mac_text.as_str();
        let Some(i) = self.nics.iter().position(|n| n.mac.to_string() == mac) else {
            return Response::err(
                exit::REQUEST_FAILED,
                format!("the VM has no interface with MAC {mac}"),
            );
        };
        let Some(qmp) = self.qmp.as_mut() else {
            return Response::err(
                exit::REQUEST_FAILED,
                "the emulator has no QMP socket: nothing can be hot-unplugged",
            );
        };
        let nic = &self.nics[i];
        let (device_id, netdev_id) = (nic.device_id.clone(), nic.netdev_id.clone());
        let fds = nic.emulator_fds.clone();
        let list = fds.iter().map(i32::to_string).collect::<Vec<_>>().join(",");
        // A failed detach is audited; a failure to write that record is the answer's error.
        let fail = |why: &str, mut r: Response| {
            let b = Record::net(&trail.vm, NetChange::Detach, mac)
                .success(false)
                .extra("vmaudit-emulator-fds", &list)
                .extra("vmaudit-why", why);
            if let Err(e) = trail.emit(b) {
                r.code = exit::JOURNAL;
                r.message = format!("{}; and its failure record: {}", r.message, chain(&e));
            }
            r
        };
        if let Err(e) = qmp.device_del(&device_id).await {
            return fail(
                "device_del refused",
                Response::err(exit::REQUEST_FAILED, format!("detach {mac}: {}", chain(&e))),
            );
        }
        if !qmp.wait_deleted(&device_id, timeout).await {
            // No guest acknowledged the unplug: the NIC is still there and qemu holds its fds.
            // vmaudit does not claim a detach it cannot prove.
            let mut r = Response::err(
                exit::DETACH_UNACKNOWLEDGED,
                format!(
                    "detach {mac} not done: the guest did not acknowledge the unplug within {timeout:?}; qemu still holds fd {list}"
                ),
            );
            r.emulator_fds = fds;
            return fail("the guest did not acknowledge the unplug", r);
        }
        if let Err(e) = qmp.netdev_del(&netdev_id).await {
            return fail(
                "netdev_del refused",
                Response::err(
                    exit::REQUEST_FAILED,
                    format!("detach {mac}: the device is gone but {}", chain(&e)),
                ),
            );
        }
        let b = Record::net(&trail.vm, NetChange::Detach, mac).extra("vmaudit-emulator-fds", &list);
        let claim = ClaimKind::NetDetach {
            mac: mac.to_owned(),
            emulator_pid: Some(self.emulator_pid),
            fds: Some(fds.clone()),
        };
        let recorded = trail.emit_claim(b, claim);
        let nic = self.nics.remove(i);
        if let Some(dev) = nic.dev {
            forget_made(dir, &dev);
            dev.teardown().await;
        }
        match recorded {
            Ok(_) => Response::ok(format!("detached {mac}: qemu released fd {list}"), fds),
            Err(e) => Response::err(exit::JOURNAL, chain(&e)),
        }
    }
}

/// An error and its causes, on one line.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}
