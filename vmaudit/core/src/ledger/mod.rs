//! The ledger: every claim held to the kernel's evidence, the same rules in both modes.
//!
//! In, in kernel order: the fd records of the watched processes (the managers and everything
//! they fork: the emulators), losses, and claims once the events before them are in. Out:
//! verdicts. A claim gets its verdict as soon as its evidence is there; a claim still waiting
//! at its deadline is `unconfirmed` (or `violated`, where the kernel shows the opposite of the
//! claim); what no claim accounts for is a finding (`unclaimed`, or against the claim whose fd
//! it concerns). Every read of the kernel goes through [`KernelView`]; the ledger does no I/O.
//!
//! - [`kernel`]: what the fd records said (opens, releases, network fds' lives, exits).
//! - [`vm`]: what is known of each VM: emulator, NICs and their fds, cgroup, claimed ACL.
//! - [`net`]: the NIC claims (open, start/attach, detach), with what monitor mode infers.
//! - [`acl`]: the cgroup claims, and holding the device policy to them.
//! - [`life`]: the VM's start and stop.
//! - [`resource`]: the other resources' claims (disk, chardev, rng, hostdev, tpm, shmem,
//!   evdev), and their releases with no detach.
//! - [`findings`]: what no claim accounts for: releases with no detach, copies of an
//!   emulator's fds, devices no claim gave it, device decisions the ACL does not explain.
//! - [`loss`]: lost events and their windows.

mod acl;
mod findings;
mod kernel;
mod life;
pub mod loss;
mod net;
mod resource;
mod vm;

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use self::{findings::Finding, kernel::KernelLog, loss::Losses, vm::Vm};
pub use self::{
    loss::Loss,
    vm::{acl_allows, host_mac_matches},
};
use crate::{
    acl::Decision,
    claim::{Claim, ClaimKind},
    fd::FdRecord,
    verdict::{ClaimRef, Evidence, Status, Verdict},
    view::KernelView,
};

/// What the ledger counted besides verdicts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerStats {
    /// Claims taken up.
    pub claims: u64,
    /// Claims written before vmaudit watched.
    pub historic: u64,
    /// Claims about VMs whose start was never seen.
    pub unknown_vm: u64,
    /// Start records whose pid now belongs to a later process.
    pub pid_reuse: u64,
}

/// A judgement before it is sealed into a verdict: the window it rests on decides whether lost
/// events make it `unknown`.
#[derive(Clone, Debug)]
struct Found {
    status: Status,
    reason: String,
    evidence: Vec<Evidence>,
    /// The processes whose events it rests on.
    pids: Vec<u32>,
    /// The earliest kernel time it rests on.
    from: u64,
    /// The fd the claim turned out to be about (a NIC's first fd), for the verdict's claim.
    fd: Option<i32>,
    /// It rests on a record not arriving (a detach, a claim giving a device): audit records
    /// lost in its window make it `unknown`.
    absence: bool,
}

impl Found {
    fn new(status: Status, reason: impl Into<String>, evidence: Vec<Evidence>) -> Self {
        let from = evidence
            .iter()
            .filter_map(|e| e.ts)
            .min()
            .unwrap_or(u64::MAX);
        Self {
            status,
            reason: reason.into(),
            evidence,
            pids: Vec::new(),
            from,
            fd: None,
            absence: false,
        }
    }

    fn confirmed(reason: impl Into<String>, evidence: Vec<Evidence>) -> Self {
        Self::new(Status::Confirmed, reason, evidence)
    }

    fn violated(reason: impl Into<String>, evidence: Vec<Evidence>) -> Self {
        Self::new(Status::Violated, reason, evidence)
    }

    fn unconfirmed(reason: impl Into<String>) -> Self {
        Self::new(Status::Unconfirmed, reason, Vec::new())
    }

    fn unknown(reason: impl Into<String>) -> Self {
        Self::new(Status::Unknown, reason, Vec::new())
    }

    /// The processes whose events it rests on.
    fn on(mut self, pids: impl IntoIterator<Item = u32>) -> Self {
        self.pids.extend(pids);
        self
    }

    /// The fd the claim turned out to be about.
    fn about(mut self, fd: Option<i32>) -> Self {
        self.fd = fd;
        self
    }

    /// It rests on a record not arriving.
    fn absent_record(mut self) -> Self {
        self.absence = true;
        self
    }
}

#[derive(Clone, Debug)]
struct Pending {
    claim: Claim,
    due: u64,
}

/// The verifier's state. `now` arguments are CLOCK_MONOTONIC ns, the clock of the kernel's
/// event times.
pub struct Ledger {
    deadline_ns: u64,
    managers: HashSet<u32>,
    vms: HashMap<String, Vm>,
    log: KernelLog,
    losses: Losses,
    /// Windows in which audit records were lost (arrival time, CLOCK_MONOTONIC).
    record_losses: Losses,
    pending: Vec<Pending>,
    watches: Vec<findings::Watch>,
    resources: resource::Resources,
    reported: HashSet<Finding>,
    historic: Vec<Claim>,
    /// Emulators the manager is stopping: their releases from now on are the stop's.
    stopping: HashSet<u32>,
    /// Something arrived since pending claims were last judged.
    dirty: bool,
    pub stats: LedgerStats,
}

impl Ledger {
    /// A ledger whose claims wait `deadline_ns` for their evidence (and a release as long for
    /// the detach that explains it), for claims of `managers`.
    pub fn new(deadline_ns: u64, managers: impl IntoIterator<Item = u32>) -> Self {
        Self {
            deadline_ns,
            managers: managers.into_iter().collect(),
            vms: HashMap::new(),
            log: KernelLog::default(),
            losses: Losses::default(),
            record_losses: Losses::default(),
            pending: Vec::new(),
            watches: Vec::new(),
            resources: Default::default(),
            reported: HashSet::new(),
            historic: Vec::new(),
            stopping: HashSet::new(),
            dirty: false,
            stats: LedgerStats::default(),
        }
    }

    pub fn managers(&self) -> &HashSet<u32> {
        &self.managers
    }

    pub fn add_manager(&mut self, pid: u32) {
        self.managers.insert(pid);
    }

    /// A manager is gone: its pid may be reused by anything.
    pub fn remove_manager(&mut self, pid: u32) {
        self.managers.remove(&pid);
    }

    /// VMs the ledger holds state for (evicted once their stop is judged).
    pub fn vms(&self) -> usize {
        self.vms.len()
    }

    /// The emulator pids of running VMs.
    pub fn emulators(&self) -> Vec<u32> {
        self.vms
            .values()
            .filter(|v| v.running)
            .filter_map(|v| v.pid)
            .collect()
    }

    /// Claims still waiting for their evidence.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Judge every pending claim at the next tick, whatever arrived (evidence outside the
    /// tracker, a device map, can change without an fd event).
    pub fn touch(&mut self) {
        self.dirty = true;
    }

    /// Events lost for a process.
    pub fn on_loss(&mut self, loss: Loss) {
        self.dirty = true;
        self.losses.add(loss);
    }

    /// Audit records lost between `from_ns` and `to_ns` (their arrival times): what rests on a
    /// record not arriving in that window is `unknown`.
    pub fn on_record_loss(&mut self, from_ns: u64, to_ns: u64, lost: u64) {
        self.dirty = true;
        self.record_losses.add(Loss {
            pid: 0,
            from_ns,
            to_ns,
            lost,
        });
    }

    /// One fd record of a watched process, in kernel order.
    pub fn on_fd(&mut self, r: &FdRecord, view: &dyn KernelView, out: &mut Vec<Verdict>) {
        self.dirty = true;
        let change = self.log.apply(r, &self.managers, view);
        findings::on_change(self, change, r, view, out);
        resource::on_fd(self, r);
    }

    /// The manager is stopping emulator `pid`: what it releases from now on is the stop's.
    pub fn on_stopping(&mut self, pid: u32) {
        self.stopping.insert(pid);
        findings::release_all(self, pid);
    }

    /// A device access decision of VM `uuid`'s cgroup program.
    pub fn on_decision(&mut self, uuid: &str, d: &Decision, now: u64, out: &mut Vec<Verdict>) {
        findings::on_decision(self, uuid, d, now, out);
    }

    /// A claim, once the kernel events before it have been applied.
    pub fn on_claim(&mut self, c: Claim, view: &dyn KernelView, now: u64, out: &mut Vec<Verdict>) {
        self.dirty = true;
        self.stats.claims += 1;
        let vm = self.vms.entry(c.uuid.clone()).or_default();
        if vm.name.is_empty() {
            vm.name.clone_from(&c.vm_name);
        }
        if c.historic {
            self.stats.historic += 1;
            self.historic.push(c);
            return;
        }
        self.take_up(c, view, now, out);
    }

    fn take_up(&mut self, c: Claim, view: &dyn KernelView, now: u64, out: &mut Vec<Verdict>) {
        self.note(&c);
        match self.judge(&c, view, now, false) {
            Some(v) => self.conclude(&c, v, view, now, out),
            None => self.pending.push(Pending {
                due: now + self.deadline_ns,
                claim: c,
            }),
        }
    }

    /// What a claim changes whatever its verdict: the VM's emulator, its claimed ACL, the
    /// NIC fds a detach releases, the VM's end.
    fn note(&mut self, c: &Claim) {
        let vm = self.vms.entry(c.uuid.clone()).or_default();
        match &c.kind {
            ClaimKind::VmStart { pid } => {
                vm.pid = Some(*pid);
                vm.running = true;
                vm.settled = false;
            }
            ClaimKind::NetUp {
                emulator_pid: Some(pid),
                ..
            } => {
                vm.pid.get_or_insert(*pid);
            }
            ClaimKind::Cgroup { cgroup, change } if c.success => {
                vm.claim_acl(*change);
                if cgroup.is_some() {
                    vm.cgroup.clone_from(cgroup);
                }
            }
            ClaimKind::NetDetach { mac, fds, .. } if c.success => {
                net::note_detach(self, (c.id, c.made_ns), &c.uuid, mac, fds.as_deref());
            }
            ClaimKind::Resource { .. } if c.success => resource::note(self, c),
            _ => {}
        }
    }

    /// A claim's verdict now, or None while its evidence may still come (never None when
    /// `last`).
    fn judge(&mut self, c: &Claim, view: &dyn KernelView, now: u64, last: bool) -> Option<Verdict> {
        let found = match &c.kind {
            ClaimKind::NetOpen { .. } => net::judge_open(self, c, last),
            ClaimKind::NetUp { .. } => net::judge_up(self, c, view, last),
            ClaimKind::NetDetach { .. } => net::judge_detach(self, c, view, last),
            ClaimKind::Cgroup { .. } => acl::judge(self, c, view, last),
            ClaimKind::VmStart { .. } => life::judge_start(self, c, view, last),
            ClaimKind::VmStop { .. } => life::judge_stop(self, c, view, last),
            ClaimKind::Resource { .. } => resource::judge(self, c, view, last),
        }?;
        Some(self.seal(c.claim_ref(), found, c.made_ns, now))
    }

    /// What follows a verdict: a start's emulator is checked for devices no claim gave it; a
    /// stop settles everything left of its VM.
    fn conclude(
        &mut self,
        c: &Claim,
        v: Verdict,
        view: &dyn KernelView,
        now: u64,
        out: &mut Vec<Verdict>,
    ) {
        let confirmed = v.status == Status::Confirmed;
        out.push(v);
        match c.kind {
            ClaimKind::NetUp { ref mac, .. } if confirmed => {
                // Copies made before the claim named the NIC (a child forked at launch); the
                // NICs named before were scanned when they were named, and later gains are
                // checked as they come.
                let against = findings::Against::Nic { uuid: &c.uuid, mac };
                findings::scan_watched(self, against, view, now, out);
            }
            ClaimKind::VmStart { pid } => {
                // The VM's NIC claims waited for its emulator: judge them now.
                self.judge_pending_of(&c.uuid, view, now, out);
                findings::watch_devices_of(self, pid, view, now);
            }
            ClaimKind::VmStop { .. } => self.settle_vm(&c.uuid, view, now, out),
            _ => {}
        }
    }

    /// The verdict: `unknown` when events of its processes were lost in its window (which
    /// starts a deadline before the claim, or at the earliest event it rests on).
    fn seal(&self, mut claim: ClaimRef, f: Found, made_ns: u64, now: u64) -> Verdict {
        if f.fd.is_some() {
            claim.fd = f.fd;
        }
        let from = f.from.min(made_ns.saturating_sub(self.deadline_ns));
        let lost = self.losses.within(&f.pids, from, now);
        if !lost.is_empty() && f.status != Status::Unknown {
            let mut evidence = f.evidence;
            evidence.extend(lost.iter().map(Loss::evidence));
            let n: u64 = lost.iter().map(|l| l.lost).sum();
            let reason = format!(
                "kernel events were lost ({n}) in this claim's window: nothing can be said (it would have been {}: {})",
                f.status, f.reason
            );
            return Verdict::new(claim, Status::Unknown, reason, evidence);
        }
        let gone = if f.absence {
            self.record_losses.within(&[], from, now)
        } else {
            Vec::new()
        };
        if !gone.is_empty() && f.status != Status::Unknown {
            let n: u64 = gone.iter().map(|l| l.lost).sum();
            let reason = format!(
                "audit records were lost ({n}) in this finding's window, and it rests on a record that did not arrive: nothing can be said (it would have been {}: {})",
                f.status, f.reason
            );
            return Verdict::new(claim, Status::Unknown, reason, f.evidence);
        }
        let confirmed = f.status == Status::Confirmed;
        let mut v = Verdict::new(claim, f.status, f.reason, f.evidence);
        if confirmed {
            // From the moment both the claim and its deciding kernel event existed.
            v.latency_ns = v
                .evidence
                .iter()
                .filter_map(|e| e.ts)
                .max()
                .map(|t| t.max(made_ns))
                .and_then(|t| now.checked_sub(t));
        }
        v
    }

    /// Re-judges pending claims (when something arrived, or for good at their deadline) and
    /// settles the findings whose time has come.
    pub fn on_tick(&mut self, view: &dyn KernelView, now: u64, out: &mut Vec<Verdict>) {
        let dirty = std::mem::take(&mut self.dirty);
        for p in std::mem::take(&mut self.pending) {
            let settled = self.vms.get(&p.claim.uuid).is_some_and(|v| v.settled);
            let last = now >= p.due || settled;
            if !dirty && !last {
                self.pending.push(p);
                continue;
            }
            match self.judge(&p.claim, view, now, last) {
                Some(v) => self.conclude(&p.claim, v, view, now, out),
                None => self.pending.push(p),
            }
        }
        findings::settle(self, view, now, out);
        resource::settle(self, view, now, out);
        self.prune(view, now);
    }

    /// Drops what no claim can consult any more, so that a long run stays flat: the NICs
    /// detached with every fd released and nothing of their VM pending, and the network fds
    /// released before the window of the oldest pending claim.
    fn prune(&mut self, view: &dyn KernelView, now: u64) {
        let oldest = self.pending.iter().map(|p| p.claim.made_ns).min();
        let horizon = oldest.unwrap_or(now).saturating_sub(2 * self.deadline_ns);
        self.log.prune_released(horizon);
        let waiting: HashSet<&str> = self.pending.iter().map(|p| p.claim.uuid.as_str()).collect();
        let held_now = |h: &vm::HeldFd| {
            view.table(h.at.pid)
                .and_then(|t| t.fds.get(&h.at.fd))
                .is_some_and(|e| e.since_ns == h.since)
        };
        for (uuid, vm) in &mut self.vms {
            if waiting.contains(uuid.as_str()) {
                continue;
            }
            vm.nics.retain(|_, n| !n.done(horizon, held_now));
            for n in vm.nics.values_mut() {
                n.held
                    .retain(|h| !h.released || h.since >= horizon || held_now(h));
            }
        }
    }

    /// How much the ledger holds: (VMs, NICs, network fd lives, pending claims, watches).
    pub fn footprint(&self) -> (usize, usize, usize, usize, usize) {
        (
            self.vms.len(),
            self.vms.values().map(|v| v.nics.len()).sum(),
            self.log.net.len(),
            self.pending.len(),
            self.watches.len(),
        )
    }

    /// Whether a start or attach of NIC `mac` of VM `uuid` waits for its evidence.
    fn up_pending(&self, uuid: &str, mac: &str) -> bool {
        self.pending.iter().any(|p| {
            p.claim.uuid == uuid
                && matches!(&p.claim.kind, ClaimKind::NetUp { mac: m, .. } if m == mac)
        })
    }

    /// Judges the pending claims of VM `uuid` now (none is final before its deadline).
    fn judge_pending_of(
        &mut self,
        uuid: &str,
        view: &dyn KernelView,
        now: u64,
        out: &mut Vec<Verdict>,
    ) {
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.claim.uuid == uuid);
        self.pending = rest;
        for p in mine {
            match self.judge(&p.claim, view, now, now >= p.due) {
                Some(v) => self.conclude(&p.claim, v, view, now, out),
                None => self.pending.push(p),
            }
        }
    }

    /// The slow checks, every few hundred ms: the device policies held to what was confirmed,
    /// and every process's network fds compared with the emulators'.
    pub fn recheck(&mut self, view: &dyn KernelView, now: u64, out: &mut Vec<Verdict>) {
        self.dirty = true;
        acl::recheck(self, view, now, out);
        findings::scan_copies(self, view, now, out);
    }

    /// A VM's stop was judged: its other claims are judged for good, the opens it never passed
    /// are held to the manager's table, and what was watched for it ends.
    fn settle_vm(&mut self, uuid: &str, view: &dyn KernelView, now: u64, out: &mut Vec<Verdict>) {
        let Some(vm) = self.vms.get_mut(uuid) else {
            return;
        };
        vm.running = false;
        vm.settled = true;
        let pid = vm.pid;
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.claim.uuid == uuid);
        self.pending = rest;
        for p in mine {
            let v = self
                .judge(&p.claim, view, now, true)
                .expect("a last judgement always gives a verdict");
            out.push(v);
        }
        net::judge_unpassed(self, uuid, view, now, out);
        if let Some(pid) = pid {
            findings::release_all(self, pid);
            self.log.forget(&[pid]);
            self.reported.retain(|f| !f.about(pid));
        }
        // Nothing of the VM is judged any more: its state goes (a restart makes it anew).
        self.vms.remove(uuid);
    }

    /// The log's past has been read: claims a later record superseded are `unknown` (their
    /// moment is gone); the others are judged against what the kernel holds now.
    pub fn caught_up(&mut self, view: &dyn KernelView, now: u64, out: &mut Vec<Verdict>) {
        let past = std::mem::take(&mut self.historic);
        let later = superseders(&past);
        for (c, l) in past.iter().zip(later) {
            match l.map(|i| &past[i]) {
                Some(l) => out.push(Verdict::new(
                    c.claim_ref(),
                    Status::Unknown,
                    format!(
                        "written before vmaudit watched, and superseded by a later record ({} claim {}): its moment is past",
                        l.kind.name(),
                        l.id
                    ),
                    vec![],
                )),
                None if matches!(c.kind, ClaimKind::NetOpen { .. }) => out.push(Verdict::new(
                    c.claim_ref(),
                    Status::Unknown,
                    "written before vmaudit watched: the open itself was not seen",
                    vec![],
                )),
                None => self.take_up(c.clone(), view, now, out),
            }
        }
    }

    /// Everything still open, judged for good.
    pub fn finish(&mut self, view: &dyn KernelView, now: u64, out: &mut Vec<Verdict>) {
        if !self.historic.is_empty() {
            self.caught_up(view, now, out);
        }
        for p in self.pending.iter_mut() {
            p.due = now;
        }
        self.dirty = true;
        self.on_tick(view, now, out);
        findings::settle(self, view, u64::MAX, out);
        resource::settle(self, view, u64::MAX, out);
        let uuids: Vec<String> = self.vms.keys().cloned().collect();
        for uuid in uuids {
            net::judge_unpassed(self, &uuid, view, now, out);
        }
    }

    /// Reports a finding once.
    fn report(
        &mut self,
        key: Finding,
        claim: ClaimRef,
        found: Found,
        at: u64,
        now: u64,
        out: &mut Vec<Verdict>,
    ) {
        if self.reported.insert(key) {
            out.push(self.seal(claim, found, at, now));
        }
    }

    /// The VM whose emulator is `pid`.
    fn vm_of_pid(&self, pid: u32) -> Option<(&String, &Vm)> {
        self.vms.iter().find(|(_, v)| v.pid == Some(pid))
    }

    /// The managers that may have made `c`'s record's kernel events: its sender if it is one,
    /// else every manager.
    fn managers_of(&self, c: &Claim) -> Vec<u32> {
        match c.sender.filter(|s| self.managers.contains(s)) {
            Some(s) => vec![s],
            None => self.managers.iter().copied().collect(),
        }
    }
}

/// For each past claim, the index of the first later record that makes its moment gone: a stop
/// ends everything of that boot, a later start the earlier start, a detach the NIC's open and
/// start. One pass from the end, so a long past costs linear time.
fn superseders(past: &[Claim]) -> Vec<Option<usize>> {
    let mut stop: HashMap<&str, usize> = HashMap::new();
    let mut start: HashMap<&str, usize> = HashMap::new();
    let mut detach: HashMap<(&str, &str), usize> = HashMap::new();
    let mut out = vec![None; past.len()];
    for (i, c) in past.iter().enumerate().rev() {
        let uuid = c.uuid.as_str();
        let by_stop = stop.get(uuid).copied();
        out[i] = match &c.kind {
            ClaimKind::VmStart { .. } => min_some(by_stop, start.get(uuid).copied()),
            ClaimKind::NetUp { mac, .. } | ClaimKind::NetOpen { mac, .. } => {
                min_some(by_stop, detach.get(&(uuid, mac.as_str())).copied())
            }
            _ => by_stop,
        };
        match &c.kind {
            ClaimKind::VmStop { .. } => {
                stop.insert(uuid, i);
            }
            ClaimKind::VmStart { .. } => {
                start.insert(uuid, i);
            }
            ClaimKind::NetDetach { mac, .. } => {
                detach.insert((uuid, mac.as_str()), i);
            }
            _ => {}
        }
    }
    out
}

fn min_some(a: Option<usize>, b: Option<usize>) -> Option<usize> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests;
