//! What a dead run of a VM left, found by the next run of the same VM (which holds the VM's
//! lock, so the dead run is really dead) and removed before anything new is made. Nothing is
//! adopted: nobody watched while the run was dead, so vmaudit cannot vouch for anything it
//! left. The emulator died with it (its parent-death signal is SIGKILL); whatever the emulator
//! forked is still confined in the cgroup (the device program's link is pinned on cgroup v2;
//! the devices lists are the cgroup's own on v1) until it is killed here.
//!
//! Each thing is removed only if it is recognisably the dead run's: the emulator by pid and
//! start time, the cgroup by vmaudit's mark (or the dead run's own note of it), a macvtap link
//! by name, MAC and parent, a device node only if it is one.

use std::{
    fs,
    os::unix::fs::FileTypeExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{
    netlink,
    rundir::{self, RunDirError, State},
    vmcgroup,
};
use crate::{cgroup::pin, paths};

/// What was found and what was done about it.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The dead run's state (None: a directory without one, or only stray pieces).
    pub dead: Option<State>,
    /// One line per thing found, and what became of it.
    pub did: Vec<String>,
}

impl Recovery {
    /// The journal event's fields.
    pub fn fields(&self) -> Value {
        json!({
            "dead_run": self.dead.as_ref().and_then(|s| s.owner),
            "emulator": self.dead.as_ref().and_then(|s| s.emulator),
            "journal": self.dead.as_ref().and_then(|s| s.journal.clone()),
            "did": self.did,
        })
    }

    /// The dead run's emulator pid, when it had started one (its stop record names it).
    pub fn emulator_pid(&self) -> Option<u32> {
        self.dead.as_ref()?.emulator.map(|e| e.pid)
    }
}

/// The places a dead run of VM `name` may have left something.
pub struct Where<'a> {
    pub name: &'a str,
    pub uuid: &'a str,
    /// The cgroup this run's spec names (the dead run's may differ: its state says).
    pub cgroup: &'a Path,
    /// Where the device program's link of this VM is pinned (cgroup v2).
    pub pin: Option<&'a Path>,
}

/// Finds and removes what a dead run of the VM left; None when there was nothing.
pub async fn recover(at: &Where<'_>) -> Result<Option<Recovery>, RunDirError> {
    let dir = paths::vm_run_dir(at.name);
    let mut r = Recovery::default();
    if dir.exists() {
        r.dead = rundir::read_state(&dir);
        if let Some(owner) = r.dead.as_ref().and_then(|s| s.owner)
            && owner.alive()
        {
            return Err(RunDirError::Running {
                name: at.name.to_owned(),
                owner: owner.pid.to_string(),
            });
        }
        if r.dead.is_none() {
            r.did.push(format!(
                "run directory {} without a state (an older vmaudit's)",
                dir.display()
            ));
        }
    }
    let state = r.dead.clone().unwrap_or_default();
    if let Some(emu) = state.emulator
        && emu.alive()
    {
        // SAFETY: kill with the pid of the very process the dead run started (pid and start
        // time checked just now).
        unsafe { libc::kill(emu.pid as i32, libc::SIGKILL) };
        let gone = wait_gone(emu);
        r.did.push(format!(
            "emulator pid {} was still running: killed{}",
            emu.pid,
            if gone { "" } else { " (still there after 2 s)" }
        ));
    }
    let mut cgroups: Vec<PathBuf> = state.cgroup.iter().cloned().collect();
    if !cgroups.iter().any(|c| c == at.cgroup) {
        cgroups.push(at.cgroup.to_owned());
    }
    for c in cgroups.iter().filter(|c| c.is_dir()) {
        let noted = state.cgroup.as_deref() == Some(c.as_path());
        if !vmcgroup::is_ours(c, at.uuid) && !noted {
            continue;
        }
        let killed = vmcgroup::kill_all(c);
        match fs::remove_dir(c) {
            Ok(()) => r.did.push(format!(
                "cgroup {}: killed {killed} process(es) inside, removed",
                c.display()
            )),
            Err(e) => r
                .did
                .push(format!("cgroup {}: cannot remove: {e}", c.display())),
        }
    }
    let pins: Vec<&Path> = state.pin.as_deref().into_iter().chain(at.pin).collect();
    for p in pins {
        match pin::unpin(p) {
            Ok(true) => r.did.push(format!(
                "the device program's pinned link {}: unpinned",
                p.display()
            )),
            Ok(false) => {}
            Err(e) => r.did.push(format!("{e}")),
        }
    }
    for l in &state.links {
        if netlink::is_macvtap_of(&l.name, &l.parent, &l.mac) {
            match netlink::delete(&l.name).await {
                Ok(()) => r.did.push(format!("macvtap link {}: removed", l.name)),
                Err(e) => r.did.push(format!("macvtap link {}: {e}", l.name)),
            }
        }
    }
    for n in &state.nodes {
        if fs::symlink_metadata(n).is_ok_and(|m| m.file_type().is_char_device()) {
            match fs::remove_file(n) {
                Ok(()) => r.did.push(format!("device node {}: removed", n.display())),
                Err(e) => r.did.push(format!("device node {}: {e}", n.display())),
            }
        }
    }
    for t in &state.taps {
        if Path::new("/sys/class/net").join(t).exists() {
            r.did.push(format!(
                "tap {t} is still there (held by a process outside the VM's cgroup?)"
            ));
        }
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|source| RunDirError::Io {
            path: dir.clone(),
            source,
        })?;
        r.did
            .push(format!("run directory {}: removed", dir.display()));
    }
    Ok((!r.did.is_empty() || r.dead.is_some()).then_some(r))
}

/// Waits until a killed process is gone (it may be another's child, not ours to reap).
fn wait_gone(p: rundir::ProcessId) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while p.alive() {
        if Instant::now() > deadline {
            return false;
        }
        // Only its parent learns of its end: look again shortly.
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}
