//! Holding claims to the kernel's evidence.
//!
//! The ledger sees, in kernel order, every fd record of vmaudit and its followed children (the
//! emulator and anything it forks), every claim once the events before it have been applied,
//! the cgroup program's decisions and the device map. It gives each claim a verdict as soon as
//! the evidence is there, `unconfirmed` when a deadline passes without it, and reports as
//! violations what no claim accounts for.

use std::collections::{HashMap, HashSet};

use super::{
    ClaimRef, Evidence, Status, Verdict,
    claims::{Claim, ClaimKind},
};
use crate::{
    cgroup::{Decision, DevTypes, DeviceRule},
    observe::table::{FdRecord, Op},
    procfs::{DevNum, FileKind},
};

/// tun/tap (10:200) and vhost-net (10:238) are opened by the manager and passed, never by the
/// emulator itself.
const TUN: DevNum = DevNum {
    major: 10,
    minor: 200,
};
const VHOST_NET: DevNum = DevNum {
    major: 10,
    minor: 238,
};

#[derive(Clone, Debug)]
struct Passed {
    claim: ClaimRef,
    mac: String,
    emulator_pid: u32,
    emulator_fd: i32,
    rdev: Option<DevNum>,
    /// A detach (or stop) claim released it: its closing is no longer a violation.
    released: bool,
}

#[derive(Clone, Debug)]
struct Seen {
    ts: u64,
    path: Option<String>,
    rdev: Option<DevNum>,
    op: Op,
}

/// How long after a passed fd is closed without a detach the emulator may take to exit: a
/// close on the way out (qemu closes its taps when it quits) is not a violation.
const RELEASE_GRACE_NS: u64 = 500_000_000;

/// The verifier's state. `now` arguments are CLOCK_MONOTONIC ns.
pub struct Ledger {
    vmaudit_pid: u32,
    deadline_ns: u64,
    emulator: Option<u32>,
    pending: Vec<(Claim, u64)>,
    opened: Vec<Claim>,
    passed_vm_fds: HashSet<i32>,
    passed: Vec<Passed>,
    claimed_acl: Vec<DeviceRule>,
    /// Gains, closes and failures seen, by (pid, fd).
    gains: HashMap<(u32, i32), Seen>,
    closes: HashMap<(u32, i32), Seen>,
    failed_opens: Vec<(u32, String, String, u64)>,
    forks: HashMap<u32, u64>,
    exits: HashMap<u32, (u64, usize)>,
    lost: HashMap<u32, u64>,
    reported: HashSet<String>,
    /// Releases with no detach claimed, waiting to see whether the emulator is exiting.
    early_releases: Vec<(u32, u64, Verdict)>,
    /// SCM_RIGHTS sends seen before the claims that name their fds.
    early_sends: Vec<(FdRecord, i32)>,
    /// fds the emulator received (getfd) before a claim named them, with a deadline.
    early_recvs: Vec<(FdRecord, i32, u64)>,
}

fn ev(pid: u32, fd: Option<i32>, seen: Option<&Seen>, what: &str) -> Evidence {
    Evidence {
        pid,
        fd,
        ts: seen.map(|s| s.ts),
        what: what.to_owned(),
        path: seen.and_then(|s| s.path.clone()),
        rdev: seen.and_then(|s| s.rdev).map(|r| r.to_string()),
        detail: None,
    }
}

fn op_name(op: Op) -> String {
    serde_json::to_value(op)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Whether the claimed ACL lets a `kind` device `dev` be accessed with `access` (r, w, m).
pub fn acl_allows(
    acl: &[DeviceRule],
    block: bool,
    dev: DevNum,
    access: crate::cgroup::Acl,
) -> bool {
    acl.iter().any(|r| {
        let type_ok = match r.types {
            DevTypes::All => true,
            DevTypes::Char => !block,
            DevTypes::Block => block,
        };
        type_ok
            && r.major.is_none_or(|m| m == dev.major)
            && r.minor.is_none_or(|m| m == dev.minor)
            && r.acl.contains(access)
    })
}

impl Ledger {
    pub fn new(vmaudit_pid: u32, deadline_ns: u64) -> Self {
        Self {
            vmaudit_pid,
            deadline_ns,
            emulator: None,
            pending: Vec::new(),
            opened: Vec::new(),
            passed_vm_fds: HashSet::new(),
            passed: Vec::new(),
            claimed_acl: Vec::new(),
            gains: HashMap::new(),
            closes: HashMap::new(),
            failed_opens: Vec::new(),
            forks: HashMap::new(),
            exits: HashMap::new(),
            lost: HashMap::new(),
            reported: HashSet::new(),
            early_releases: Vec::new(),
            early_sends: Vec::new(),
            early_recvs: Vec::new(),
        }
    }

    /// Events the kernel could not deliver for `pid`.
    pub fn on_gap(&mut self, pid: u32, lost: u64) {
        *self.lost.entry(pid).or_default() += lost.max(1);
    }

    fn lost_for(&self, pids: &[u32]) -> Option<String> {
        crate::verify::lost_reason(&self.lost, pids)
    }

    /// One fd record of a watched process, in kernel order.
    pub fn on_record(&mut self, r: &FdRecord, out: &mut Vec<Verdict>) {
        let file = r.file.as_ref();
        let seen = Seen {
            ts: r.ts,
            path: file.map(|f| f.path.clone()),
            rdev: file.and_then(|f| f.rdev),
            op: r.op,
        };
        match (r.op, r.fd) {
            (_, None) => {
                if !r.result.is_ok() && r.op == Op::Open {
                    let path = file.map(|f| f.path.clone()).unwrap_or_default();
                    self.failed_opens
                        .push((r.pid, path, r.result.to_string(), r.ts));
                }
                return;
            }
            (
                Op::Close
                | Op::CloseRange
                | Op::Replaced
                | Op::ExecCloexec
                | Op::Exit
                | Op::ResyncRemove,
                Some(fd),
            ) => {
                self.closes.insert((r.pid, fd), seen.clone());
                if r.op == Op::Exit {
                    let e = self.exits.entry(r.pid).or_insert((r.ts, 0));
                    e.1 += 1;
                }
                if r.op != Op::Exit {
                    self.check_release(r, fd);
                }
            }
            (Op::SendFd, Some(fd)) => self.check_send(r, fd, out),
            (Op::CloexecOn | Op::CloexecOff, _) => {}
            (_, Some(fd)) => {
                if r.op == Op::Inherit {
                    self.forks.entry(r.pid).or_insert(r.ts);
                }
                self.gains.insert((r.pid, fd), seen);
                self.check_gain(r, fd, out);
            }
        }
        if r.op == Op::Exit {
            self.exits.entry(r.pid).or_insert((r.ts, 0));
        }
    }

    fn passed_by_emulator_fd(&self, pid: u32, fd: i32) -> Option<&Passed> {
        self.passed
            .iter()
            .find(|p| p.emulator_pid == pid && p.emulator_fd == fd)
    }

    fn report(&mut self, key: String, v: Verdict, out: &mut Vec<Verdict>) {
        if self.reported.insert(key) {
            out.push(v);
        }
    }

    fn check_release(&mut self, r: &FdRecord, fd: i32) {
        let Some(p) = self.passed_by_emulator_fd(r.pid, fd).cloned() else {
            return;
        };
        if p.released {
            return;
        }
        let mut e = ev(
            r.pid,
            Some(fd),
            self.closes.get(&(r.pid, fd)),
            &op_name(r.op),
        );
        e.detail = Some(format!("interface {}", p.mac));
        let v = Verdict::new(
            p.claim.clone(),
            Status::Violated,
            format!(
                "the emulator released fd {fd} of interface {} ({}) with no detach claimed",
                p.mac,
                op_name(r.op)
            ),
            vec![e],
        );
        if self.reported.insert(format!("release {} {fd}", r.pid)) {
            self.early_releases
                .push((r.pid, r.ts + RELEASE_GRACE_NS, v));
        }
    }

    /// vmaudit is stopping the emulator: what it closes from now on is released by the stop.
    pub fn on_stopping(&mut self, pid: u32) {
        for p in self.passed.iter_mut().filter(|p| p.emulator_pid == pid) {
            p.released = true;
        }
        self.early_releases.retain(|(p, _, _)| *p != pid);
    }

    /// Received fds no claim has named by their deadline are judged as devices no claim gave.
    fn settle_recvs(&mut self, now: u64, out: &mut Vec<Verdict>) {
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early_recvs)
            .into_iter()
            .partition(|(_, _, d)| *d <= now);
        self.early_recvs = keep;
        for (r, fd, _) in due {
            let Some(file) = r.file.clone() else { continue };
            let emu = r.pid;
            if self
                .passed
                .iter()
                .any(|p| p.emulator_pid == emu && p.emulator_fd == fd && !p.released)
            {
                continue;
            }
            self.check_device(emu, fd, &file, r.ts, "recv_fd", out);
        }
    }

    /// Early releases whose process did not exit within the grace period are violations.
    fn settle_releases(&mut self, now_kernel: u64, out: &mut Vec<Verdict>) {
        let exits = &self.exits;
        self.early_releases
            .retain(|(pid, _, _)| !exits.contains_key(pid));
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early_releases)
            .into_iter()
            .partition(|(_, d, _)| *d <= now_kernel);
        self.early_releases = keep;
        out.extend(due.into_iter().map(|(_, _, v)| v));
    }

    fn check_send(&mut self, r: &FdRecord, fd: i32, out: &mut Vec<Verdict>) {
        let Some(p) = self.passed_by_emulator_fd(r.pid, fd).cloned() else {
            // Perhaps a passed fd whose claim has not arrived yet: look again then.
            if r.pid != self.vmaudit_pid && self.early_sends.len() < 1024 {
                self.early_sends.push((r.clone(), fd));
            }
            return;
        };
        let mut e = ev(
            r.pid,
            Some(fd),
            Some(&Seen {
                ts: r.ts,
                path: r.file.as_ref().map(|f| f.path.clone()),
                rdev: p.rdev,
                op: r.op,
            }),
            "send_fd",
        );
        e.detail = Some(format!("sendmsg SCM_RIGHTS by pid {}", r.pid));
        let v = Verdict::new(
            p.claim.clone(),
            Status::Violated,
            format!(
                "the emulator sent fd {fd} of interface {} to another process through SCM_RIGHTS",
                p.mac
            ),
            vec![e],
        );
        self.report(format!("send {} {fd} {}", r.pid, r.ts), v, out);
    }

    fn check_gain(&mut self, r: &FdRecord, fd: i32, out: &mut Vec<Verdict>) {
        let Some(emu) = self.emulator else {
            return;
        };
        let Some(file) = r.file.as_ref() else {
            return;
        };
        // A passed fd in any process but vmaudit and the emulator: escaped.
        if r.pid != emu && r.pid != self.vmaudit_pid {
            let escaped: Vec<Passed> = self
                .passed
                .iter()
                .filter(|p| !p.released && p.rdev.is_some() && p.rdev == file.rdev)
                .filter(|p| {
                    crate::kcmp::same_file(r.pid, fd, p.emulator_pid, p.emulator_fd)
                        .unwrap_or(false)
                })
                .cloned()
                .collect();
            for p in escaped {
                let mut e = ev(
                    r.pid,
                    Some(fd),
                    self.gains.get(&(r.pid, fd)),
                    &op_name(r.op),
                );
                e.detail = Some(format!(
                    "kcmp: the same open file as the emulator's fd {}",
                    p.emulator_fd
                ));
                let v = Verdict::new(
                    p.claim.clone(),
                    Status::Violated,
                    format!(
                        "fd {} of interface {} escaped from the emulator into pid {} ({})",
                        p.emulator_fd,
                        p.mac,
                        r.pid,
                        op_name(r.op)
                    ),
                    vec![e],
                );
                self.report(format!("escape {} {fd} {}", r.pid, p.emulator_fd), v, out);
            }
            return;
        }
        if r.pid != emu || r.op == Op::Inherit || r.op == Op::Seed {
            return;
        }
        if r.op == Op::RecvFd && self.early_recvs.len() < 1024 {
            // Most likely a getfd of a hot-plug whose attach claim comes next: judge it then,
            // or at the deadline.
            self.early_recvs
                .push((r.clone(), fd, r.ts + self.deadline_ns));
            return;
        }
        if r.op == Op::Dup
            && r.from_fd
                .is_some_and(|f| self.passed_by_emulator_fd(emu, f).is_some())
        {
            return;
        }
        self.check_device(emu, fd, file, r.ts, &op_name(r.op), out);
    }

    /// Passed fds already held by another process when the claim is made (a child the
    /// emulator forked before the claim reached the verifier).
    fn scan_escapes<R: crate::observe::table::Resolver>(
        &mut self,
        tables: &crate::observe::table::Tables<R>,
        out: &mut Vec<Verdict>,
    ) {
        let Some(emu) = self.emulator else {
            return;
        };
        let mut found = Vec::new();
        for pid in tables
            .pids()
            .filter(|p| *p != emu && *p != self.vmaudit_pid)
        {
            let Some(t) = tables.get(pid) else { continue };
            if t.exited {
                continue;
            }
            for e in t.fds.values() {
                found.push(FdRecord {
                    ty: "fd",
                    ts: e.since_ns,
                    pid,
                    tid: pid,
                    op: e.via,
                    syscall: "table",
                    fd: Some(e.fd),
                    result: vmaudit_core::fd::Outcome::Ok,
                    cloexec: Some(e.cloexec),
                    from_fd: None,
                    file: Some(e.id.clone()),
                });
            }
        }
        for r in found {
            if let Some(fd) = r.fd {
                self.check_gain(&r, fd, out);
            }
        }
    }

    /// A device fd the emulator holds that no claim gave it.
    fn check_device(
        &mut self,
        emu: u32,
        fd: i32,
        file: &crate::procfs::FdIdentity,
        ts: u64,
        how: &str,
        out: &mut Vec<Verdict>,
    ) {
        let block = file.kind == FileKind::Block;
        if !(block || file.kind == FileKind::Char) {
            return;
        }
        let Some(rdev) = file.rdev else {
            return;
        };
        if self.passed_by_emulator_fd(emu, fd).is_some() {
            return;
        }
        let manager_only = rdev == TUN || rdev == VHOST_NET || file.path.starts_with("/dev/tap");
        let allowed = acl_allows(&self.claimed_acl, block, rdev, crate::cgroup::Acl::READ);
        if !manager_only && allowed {
            return;
        }
        let why = if manager_only {
            "a network device only the manager opens and passes"
        } else {
            "a device the claimed ACL does not allow"
        };
        let mut e = ev(
            emu,
            Some(fd),
            Some(&Seen {
                ts,
                path: Some(file.path.clone()),
                rdev: Some(rdev),
                op: Op::Open,
            }),
            how,
        );
        e.detail = Some(why.to_owned());
        let v = Verdict::new(
            ClaimRef {
                kind: "unclaimed".into(),
                text: format!("emulator pid {emu} holds fd {fd} on {} ({rdev})", file.path),
                ..Default::default()
            },
            Status::Violated,
            format!(
                "the emulator holds {} (fd {fd}, {rdev}), {why}, and no claim gave it",
                file.path
            ),
            vec![e],
        );
        self.report(format!("device {emu} {fd} {rdev}"), v, out);
    }

    /// A claim, once the kernel events before it have been applied.
    pub fn on_claim<R: crate::observe::table::Resolver>(
        &mut self,
        claim: Claim,
        tables: &crate::observe::table::Tables<R>,
        now: u64,
        out: &mut Vec<Verdict>,
    ) {
        match &claim.kind {
            ClaimKind::NetOpen { success: true, .. } => self.opened.push(claim.clone()),
            ClaimKind::NetStart {
                emulator_pid,
                fds,
                mac,
            } => {
                self.emulator = Some(*emulator_pid);
                for f in fds {
                    // A number reused by a new attach: what happened to the old file is history.
                    self.closes.remove(&(*emulator_pid, f.emulator_fd));
                    self.reported
                        .remove(&format!("release {emulator_pid} {}", f.emulator_fd));
                    self.passed.retain(|p| {
                        !(p.emulator_pid == *emulator_pid && p.emulator_fd == f.emulator_fd)
                    });
                    self.passed_vm_fds.insert(f.fd);
                    self.passed.push(Passed {
                        claim: claim.claim_ref(),
                        mac: mac.clone(),
                        emulator_pid: *emulator_pid,
                        emulator_fd: f.emulator_fd,
                        rdev: f.rdev,
                        released: false,
                    });
                }
            }
            ClaimKind::VmStart { pid } => self.emulator = Some(*pid),
            ClaimKind::NetDetach {
                emulator_fds,
                emulator_pid,
                ..
            } => {
                // The closes came before the record (netdev_del first): they were this detach's.
                self.early_releases.retain(|(pid, _, v)| {
                    !(*pid == *emulator_pid
                        && v.evidence
                            .iter()
                            .any(|e| e.fd.is_some_and(|fd| emulator_fds.contains(&fd))))
                });
                for fd in emulator_fds {
                    self.reported
                        .remove(&format!("release {emulator_pid} {fd}"));
                }
                for p in self.passed.iter_mut().filter(|p| {
                    p.emulator_pid == *emulator_pid && emulator_fds.contains(&p.emulator_fd)
                }) {
                    p.released = true;
                }
            }
            ClaimKind::VmStop { pid } => {
                for p in self.passed.iter_mut().filter(|p| p.emulator_pid == *pid) {
                    p.released = true;
                }
            }
            ClaimKind::Cgroup { claimed, .. } => self.claimed_acl.clone_from(claimed),
            ClaimKind::NetOpen { .. } => {}
        }
        if let ClaimKind::NetStart { .. } = &claim.kind {
            // What happened between the fork and this claim: escapes and sends.
            self.scan_escapes(tables, out);
            for (r, fd) in std::mem::take(&mut self.early_sends) {
                self.check_send(&r, fd, out);
            }
        }
        if let ClaimKind::VmStart { pid: emulator_pid } = &claim.kind {
            // What the emulator holds once every interface's start is claimed (they come
            // before the VM's start): devices no claim gave it.
            if let Some(t) = tables.get(*emulator_pid) {
                let held: Vec<(i32, crate::procfs::FdIdentity, u64)> = t
                    .fds
                    .values()
                    .map(|e| (e.fd, e.id.clone(), e.since_ns))
                    .collect();
                for (fd, id, since) in held {
                    self.check_device(*emulator_pid, fd, &id, since, "held", out);
                }
            }
        }
        match self.evaluate(&claim, tables, now) {
            Some(v) => out.push(v),
            None => self.pending.push((claim, now + self.deadline_ns)),
        }
    }

    /// Re-evaluates pending claims; a passed deadline makes a claim `unconfirmed`.
    pub fn on_tick<R: crate::observe::table::Resolver>(
        &mut self,
        tables: &crate::observe::table::Tables<R>,
        now: u64,
        out: &mut Vec<Verdict>,
    ) {
        self.settle_releases(now, out);
        self.settle_recvs(now, out);
        let pending = std::mem::take(&mut self.pending);
        for (claim, deadline) in pending {
            if let Some(v) = self.evaluate(&claim, tables, now) {
                out.push(v);
            } else if now >= deadline {
                out.push(self.unconfirmed(&claim, tables));
            } else {
                self.pending.push((claim, deadline));
            }
        }
    }

    /// At the end of the run: every pending claim gets its last look, and every fd opened
    /// but never passed must be closed and held by nobody.
    pub fn finish<R: crate::observe::table::Resolver>(
        &mut self,
        tables: &crate::observe::table::Tables<R>,
        now: u64,
        out: &mut Vec<Verdict>,
    ) {
        self.settle_releases(u64::MAX, out);
        self.settle_recvs(u64::MAX, out);
        let pending = std::mem::take(&mut self.pending);
        for (claim, _) in pending {
            out.push(
                self.evaluate(&claim, tables, now)
                    .unwrap_or_else(|| self.unconfirmed(&claim, tables)),
            );
        }
        let opened = std::mem::take(&mut self.opened);
        for claim in opened {
            let ClaimKind::NetOpen {
                fd: Some(fd), path, ..
            } = &claim.kind
            else {
                continue;
            };
            if self.passed_vm_fds.contains(fd) {
                continue;
            }
            let me = self.vmaudit_pid;
            if let Some(why) = self.lost_for(&[me]) {
                out.push(Verdict::new(
                    claim.claim_ref(),
                    Status::Unknown,
                    why,
                    vec![],
                ));
                continue;
            }
            let still = tables
                .get(me)
                .and_then(|t| t.fds.get(fd))
                .filter(|e| e.since_ns >= self.gains.get(&(me, *fd)).map_or(0, |g| g.ts));
            let v = match (self.closes.get(&(me, *fd)), still) {
                (Some(c), None) => {
                    let mut v = Verdict::new(
                        claim.claim_ref(),
                        Status::Confirmed,
                        format!(
                            "opened, not passed: vmaudit closed fd {fd} ({path}) and no watched process holds it"
                        ),
                        vec![ev(me, Some(*fd), Some(c), &op_name(c.op))],
                    );
                    v.latency_ns = now.checked_sub(c.ts.max(claim.made_ns));
                    v
                }
                _ => Verdict::new(
                    claim.claim_ref(),
                    Status::Violated,
                    format!("opened, not passed, and fd {fd} ({path}) is still held by vmaudit"),
                    vec![ev(me, Some(*fd), self.gains.get(&(me, *fd)), "held")],
                ),
            };
            out.push(v);
        }
    }

    fn unconfirmed<R: crate::observe::table::Resolver>(
        &self,
        claim: &Claim,
        tables: &crate::observe::table::Tables<R>,
    ) -> Verdict {
        let detail = match &claim.kind {
            ClaimKind::NetDetach {
                emulator_pid,
                emulator_fds,
                ..
            } => {
                let held: Vec<String> = emulator_fds
                    .iter()
                    .filter(|fd| {
                        tables
                            .get(*emulator_pid)
                            .is_some_and(|t| t.fds.contains_key(fd))
                    })
                    .map(i32::to_string)
                    .collect();
                format!("; the emulator still holds fd {}", held.join(", "))
            }
            _ => String::new(),
        };
        Verdict::new(
            claim.claim_ref(),
            Status::Unconfirmed,
            format!("the deadline passed without kernel evidence{detail}"),
            vec![],
        )
    }

    /// The verdict a claim has now, or None while the evidence may still come.
    fn evaluate<R: crate::observe::table::Resolver>(
        &self,
        claim: &Claim,
        tables: &crate::observe::table::Tables<R>,
        now: u64,
    ) -> Option<Verdict> {
        let me = self.vmaudit_pid;
        let cref = claim.claim_ref();
        let confirmed = |reason: String, evidence: Vec<Evidence>| {
            let mut v = Verdict::new(cref.clone(), Status::Confirmed, reason, evidence);
            // From the moment both the claim and its deciding kernel event existed.
            v.latency_ns = v
                .evidence
                .iter()
                .filter_map(|e| e.ts)
                .max()
                .map(|t| t.max(claim.made_ns))
                .and_then(|t| now.checked_sub(t));
            v
        };
        match &claim.kind {
            ClaimKind::NetOpen {
                fd: Some(fd),
                success: true,
                path,
                rdev,
                ..
            } => {
                if let Some(why) = self.lost_for(&[me]) {
                    return Some(Verdict::new(cref, Status::Unknown, why, vec![]));
                }
                let g = self
                    .gains
                    .get(&(me, *fd))
                    .filter(|g| g.ts <= claim.made_ns && (rdev.is_none() || g.rdev == *rdev))?;
                Some(confirmed(
                    format!("vmaudit holds fd {fd} on {path}, opened in the kernel"),
                    vec![ev(me, Some(*fd), Some(g), &op_name(g.op))],
                ))
            }
            ClaimKind::NetOpen {
                success: false,
                path,
                ..
            } => {
                let (_, _, errno, ts) = self
                    .failed_opens
                    .iter()
                    .rev()
                    .find(|(pid, p, _, _)| *pid == me && p == path)?;
                let mut e = ev(me, None, None, "open");
                e.ts = Some(*ts);
                e.path = Some(path.clone());
                e.detail = Some(errno.clone());
                Some(confirmed(
                    format!("the kernel refused to open {path} ({errno})"),
                    vec![e],
                ))
            }
            ClaimKind::NetOpen { .. } => None,
            ClaimKind::NetStart {
                emulator_pid,
                fds,
                mac,
            } => {
                if let Some(why) = self.lost_for(&[me, *emulator_pid]) {
                    return Some(Verdict::new(cref, Status::Unknown, why, vec![]));
                }
                let mut evidence = Vec::new();
                for f in fds {
                    if f.kcmp_same == Some(false) {
                        return Some(Verdict::new(
                            cref,
                            Status::Violated,
                            format!(
                                "the emulator's fd {} is not the open file vmaudit opened as fd {} (kcmp)",
                                f.emulator_fd, f.fd
                            ),
                            vec![],
                        ));
                    }
                    let held = tables
                        .get(*emulator_pid)
                        .and_then(|t| t.fds.get(&f.emulator_fd));
                    match held {
                        Some(e) if f.kcmp_same == Some(true) => {
                            let mut x = ev(
                                *emulator_pid,
                                Some(f.emulator_fd),
                                Some(&Seen {
                                    ts: e.since_ns,
                                    path: Some(e.id.path.clone()),
                                    rdev: e.id.rdev,
                                    op: e.via,
                                }),
                                &op_name(e.via),
                            );
                            x.detail = Some(format!(
                                "kcmp: the same open file description as vmaudit's fd {}",
                                f.fd
                            ));
                            evidence.push(x);
                        }
                        _ => {
                            if let Some(c) = self.closes.get(&(*emulator_pid, f.emulator_fd)) {
                                return Some(Verdict::new(
                                    cref,
                                    Status::Violated,
                                    format!(
                                        "the emulator does not hold fd {} of interface {mac}: it was closed ({})",
                                        f.emulator_fd,
                                        op_name(c.op)
                                    ),
                                    vec![ev(
                                        *emulator_pid,
                                        Some(f.emulator_fd),
                                        Some(c),
                                        &op_name(c.op),
                                    )],
                                ));
                            }
                            return None;
                        }
                    }
                }
                let list: Vec<String> = fds.iter().map(|f| f.emulator_fd.to_string()).collect();
                Some(confirmed(
                    format!(
                        "the emulator (pid {emulator_pid}) holds fd {} of interface {mac}, the same open files vmaudit opened",
                        list.join(", ")
                    ),
                    evidence,
                ))
            }
            ClaimKind::NetDetach {
                emulator_pid,
                emulator_fds,
                mac,
            } => {
                if let Some(why) = self.lost_for(&[*emulator_pid]) {
                    return Some(Verdict::new(cref, Status::Unknown, why, vec![]));
                }
                let mut evidence = Vec::new();
                for fd in emulator_fds {
                    let c = self.closes.get(&(*emulator_pid, *fd))?;
                    evidence.push(ev(*emulator_pid, Some(*fd), Some(c), &op_name(c.op)));
                }
                Some(confirmed(
                    format!("the emulator released every fd of interface {mac}"),
                    evidence,
                ))
            }
            ClaimKind::VmStart { pid } => {
                if let Some(why) = self.lost_for(&[me, *pid]) {
                    return Some(Verdict::new(cref, Status::Unknown, why, vec![]));
                }
                let t = tables.get(*pid)?;
                let fork = self.forks.get(pid).copied();
                let mut e = ev(*pid, None, None, "fork");
                e.ts = fork;
                e.detail = Some(format!(
                    "forked by vmaudit (pid {me}); holds {} fds",
                    t.fds.len()
                ));
                fork?;
                Some(confirmed(
                    format!("pid {pid} is vmaudit's child, followed from its fork"),
                    vec![e],
                ))
            }
            ClaimKind::VmStop { pid } => {
                if let Some(why) = self.lost_for(&[*pid]) {
                    return Some(Verdict::new(cref, Status::Unknown, why, vec![]));
                }
                let (ts, n) = self
                    .exits
                    .get(pid)
                    .copied()
                    .or_else(|| tables.get(*pid).filter(|t| t.exited).map(|_| (0, 0)))?;
                let mut e = ev(*pid, None, None, "exit");
                e.ts = (ts > 0).then_some(ts);
                e.detail = Some(format!("{n} fds released at exit"));
                Some(confirmed(
                    format!("the emulator (pid {pid}) exited; it holds nothing"),
                    vec![e],
                ))
            }
            ClaimKind::Cgroup {
                deny_all,
                rule,
                success,
                claimed,
                kernel,
            } => {
                let kernel = match kernel {
                    Ok(k) => k,
                    Err(e) => {
                        return Some(Verdict::new(
                            cref,
                            Status::Unconfirmed,
                            format!("the device map could not be read: {e}"),
                            vec![],
                        ));
                    }
                };
                let map_ev = |detail: String| Evidence {
                    what: "map".into(),
                    detail: Some(detail),
                    ..Default::default()
                };
                Some(match (deny_all, rule, success) {
                    (true, _, true) => {
                        let extra: Vec<String> = kernel
                            .iter()
                            .filter(|k| !claimed.contains(k))
                            .map(|k| k.to_string())
                            .collect();
                        if extra.is_empty() {
                            confirmed(
                                format!(
                                    "the kernel allows nothing beyond the {} claimed rules",
                                    claimed.len()
                                ),
                                vec![map_ev(format!("{} entries", kernel.len()))],
                            )
                        } else {
                            Verdict::new(
                                cref,
                                Status::Violated,
                                format!(
                                    "the kernel allows what no claim does: {}",
                                    extra.join("; ")
                                ),
                                vec![map_ev(extra.join("; "))],
                            )
                        }
                    }
                    (false, Some(r), true) => {
                        if kernel.contains(r) {
                            confirmed(
                                format!("the kernel's device map holds the claimed rule {r}"),
                                vec![map_ev(format!("{:?}", r.bpf_entry()))],
                            )
                        } else {
                            Verdict::new(
                                cref,
                                Status::Violated,
                                format!("the claimed rule {r} is missing from the kernel"),
                                vec![map_ev(format!("{} entries", kernel.len()))],
                            )
                        }
                    }
                    (_, r, false) => {
                        if r.as_ref().is_some_and(|r| kernel.contains(r)) {
                            Verdict::new(
                                cref,
                                Status::Violated,
                                "the change is recorded as failed, yet the kernel holds it",
                                vec![],
                            )
                        } else {
                            confirmed(
                                "the change failed, and the kernel does not hold it".into(),
                                vec![map_ev(format!("{} entries", kernel.len()))],
                            )
                        }
                    }
                    (false, None, true) => confirmed("no device rule to check".into(), vec![]),
                })
            }
        }
    }

    /// A device access decision of the VM's cgroup program.
    pub fn on_decision(&mut self, d: &Decision, out: &mut Vec<Verdict>) {
        let block = matches!(d.dev, crate::cgroup::DecisionDev::Block);
        let dev = DevNum {
            major: d.major,
            minor: d.minor,
        };
        let claimed = acl_allows(&self.claimed_acl, block, dev, d.access);
        if claimed == d.allowed {
            return;
        }
        let what = if d.allowed {
            "the kernel allowed a device access the claimed ACL does not"
        } else {
            "the kernel denied a device access the claimed ACL allows"
        };
        let e = Evidence {
            pid: d.tgid,
            ts: Some(d.ts_ns),
            what: "decision".into(),
            rdev: Some(dev.to_string()),
            detail: Some(format!(
                "{} {} access {}",
                if block { "block" } else { "char" },
                dev,
                d.access
            )),
            ..Default::default()
        };
        let v = Verdict::new(
            ClaimRef {
                kind: "unclaimed".into(),
                text: format!(
                    "device {dev} access {} by pid {}: {}",
                    d.access,
                    d.tgid,
                    if d.allowed { "allowed" } else { "denied" }
                ),
                ..Default::default()
            },
            Status::Violated,
            format!("{what}: {dev} {} by pid {}", d.access, d.tgid),
            vec![e],
        );
        self.report(format!("decision {dev} {} {}", d.access, d.allowed), v, out);
    }

    /// The device map as read now (taken periodically): claimed rules missing, or rules no
    /// claim made, are violations.
    pub fn on_kernel_rules(&mut self, kernel: &[DeviceRule], out: &mut Vec<Verdict>) {
        if self.claimed_acl.is_empty() {
            return;
        }
        let missing: Vec<DeviceRule> = self
            .claimed_acl
            .iter()
            .filter(|c| !kernel.contains(c))
            .cloned()
            .collect();
        let extra: Vec<DeviceRule> = kernel
            .iter()
            .filter(|k| !self.claimed_acl.contains(k))
            .cloned()
            .collect();
        for (rule, what) in missing
            .iter()
            .map(|r| (r, "missing from"))
            .chain(extra.iter().map(|r| (r, "in")))
        {
            let text = if what == "in" {
                format!("the kernel's device map holds {rule}, which no claim made")
            } else {
                format!("the claimed rule {rule} is missing from the kernel's device map")
            };
            let v = Verdict::new(
                ClaimRef {
                    kind: "unclaimed".into(),
                    text: text.clone(),
                    ..Default::default()
                },
                Status::Violated,
                text,
                vec![Evidence {
                    what: "map".into(),
                    detail: Some(format!("{:?}", rule.bpf_entry())),
                    ..Default::default()
                }],
            );
            self.report(format!("map {what} {rule}"), v, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{Acl, DevTypes};

    #[test]
    fn acl_matching_follows_libvirts_lookup() {
        let acl = vec![
            DeviceRule {
                types: DevTypes::Char,
                major: Some(1),
                minor: Some(3),
                acl: Acl::RW,
            },
            DeviceRule {
                types: DevTypes::Char,
                major: Some(136),
                minor: None,
                acl: Acl::RW,
            },
        ];
        let d = |ma, mi| DevNum {
            major: ma,
            minor: mi,
        };
        assert!(acl_allows(&acl, false, d(1, 3), Acl::RW));
        assert!(
            !acl_allows(&acl, true, d(1, 3), Acl::READ),
            "a block device is not a char rule's"
        );
        assert!(acl_allows(&acl, false, d(136, 7), Acl::WRITE));
        assert!(!acl_allows(&acl, false, d(10, 200), Acl::READ));
        assert!(!acl_allows(&acl, false, d(1, 3), Acl::MKNOD));
    }

    #[test]
    fn lost_events_make_verdicts_unknown() {
        let mut l = Ledger::new(1, 1_000);
        assert!(l.lost_for(&[1]).is_none());
        l.on_gap(1, 5);
        assert!(l.lost_for(&[1, 2]).unwrap().contains("5 for pid 1"));
    }

    /// A /proc stand-in: each pid's table as given.
    struct FakeProc(HashMap<u32, std::collections::BTreeMap<i32, crate::procfs::FdIdentity>>);

    impl crate::observe::table::Resolver for FakeProc {
        fn identity(&self, pid: u32, fd: i32) -> std::io::Result<crate::procfs::FdIdentity> {
            self.0
                .get(&pid)
                .and_then(|t| t.get(&fd))
                .cloned()
                .ok_or_else(|| std::io::ErrorKind::NotFound.into())
        }
        fn snapshot(
            &self,
            pid: u32,
        ) -> std::io::Result<std::collections::BTreeMap<i32, crate::procfs::FdIdentity>> {
            self.0
                .get(&pid)
                .cloned()
                .ok_or_else(|| std::io::ErrorKind::NotFound.into())
        }
    }

    fn tun() -> crate::procfs::FdIdentity {
        crate::procfs::FdIdentity {
            path: "/dev/net/tun".into(),
            kind: FileKind::Char,
            rdev: Some(TUN),
            dev: None,
            ino: Some(1),
            flags: None,
            mode: None,
            ofd: None,
            iface: None,
            source: crate::procfs::Source::Proc,
        }
    }

    fn rec(pid: u32, op: Op, fd: i32, ts: u64) -> FdRecord {
        FdRecord {
            ty: "fd",
            ts,
            pid,
            tid: pid,
            op,
            syscall: "test",
            fd: Some(fd),
            result: vmaudit_core::fd::Outcome::Ok,
            cloexec: Some(false),
            from_fd: None,
            file: Some(tun()),
        }
    }

    fn claim(id: u64, kind: ClaimKind, made_ns: u64) -> Claim {
        Claim {
            id,
            kind,
            text: "t".into(),
            record_ts_ns: id,
            made_ns,
        }
    }

    const ME: u32 = 10;
    const EMU: u32 = 20;

    fn start_claim(fd: i32) -> ClaimKind {
        ClaimKind::NetStart {
            mac: "52:54:00:00:00:01".into(),
            emulator_pid: EMU,
            fds: vec![super::super::claims::PassedFd {
                fd,
                emulator_fd: fd,
                kcmp_same: Some(true),
                rdev: Some(TUN),
                path: "/dev/net/tun".into(),
            }],
        }
    }

    #[test]
    fn open_start_release_and_detach() {
        let tables_src = FakeProc(HashMap::from([(
            EMU,
            std::collections::BTreeMap::from([(7, tun())]),
        )]));
        let mut tables = crate::observe::table::Tables::new(tables_src);
        tables.seed(EMU).unwrap();
        let mut l = Ledger::new(ME, 1_000);
        let mut out = Vec::new();
        // vmaudit opened fd 7 at t=100: the open claim made at t=150 is confirmed by it.
        l.on_record(&rec(ME, Op::Open, 7, 100), &mut out);
        let open = ClaimKind::NetOpen {
            mac: "m".into(),
            path: "/dev/net/tun".into(),
            rdev: Some(TUN),
            fd: Some(7),
            success: true,
        };
        l.on_claim(claim(1, open, 150), &tables, 160, &mut out);
        assert_eq!(out.pop().unwrap().status, Status::Confirmed);
        // The emulator holds it (kcmp same): the start is confirmed.
        l.on_claim(claim(2, start_claim(7), 200), &tables, 210, &mut out);
        let v = out.pop().unwrap();
        assert_eq!(v.status, Status::Confirmed, "{}", v.reason);
        // A close with no detach: a violation once the grace passes without an exit.
        l.on_record(&rec(EMU, Op::Close, 7, 300), &mut out);
        l.on_tick(&tables, 300 + RELEASE_GRACE_NS / 2, &mut out);
        assert!(out.is_empty(), "within the grace period");
        l.on_tick(&tables, 300 + RELEASE_GRACE_NS, &mut out);
        let v = out.pop().unwrap();
        assert_eq!(v.status, Status::Violated);
        assert!(v.reason.contains("with no detach claimed"), "{}", v.reason);
        // A detach claim after the close (netdev_del first) is confirmed by that close.
        let detach = ClaimKind::NetDetach {
            mac: "m".into(),
            emulator_pid: EMU,
            emulator_fds: vec![7],
        };
        l.on_claim(claim(3, detach, 400), &tables, 410, &mut out);
        assert_eq!(out.pop().unwrap().status, Status::Confirmed);
    }

    #[test]
    fn a_detach_cancels_the_release_it_explains_and_a_missing_close_is_unconfirmed() {
        let mut tables = crate::observe::table::Tables::new(FakeProc(HashMap::from([(
            EMU,
            std::collections::BTreeMap::from([(7, tun()), (8, tun())]),
        )])));
        tables.seed(EMU).unwrap();
        let mut l = Ledger::new(ME, 1_000);
        let mut out = Vec::new();
        l.on_claim(claim(1, start_claim(7), 10), &tables, 20, &mut out);
        l.on_claim(claim(2, start_claim(8), 10), &tables, 20, &mut out);
        out.clear();
        l.on_record(&rec(EMU, Op::Close, 7, 30), &mut out);
        let detach = ClaimKind::NetDetach {
            mac: "m".into(),
            emulator_pid: EMU,
            emulator_fds: vec![7, 8],
        };
        l.on_claim(claim(3, detach, 40), &tables, 50, &mut out);
        assert!(
            out.is_empty(),
            "fd 8 is not closed yet: pending, not violated"
        );
        l.on_tick(&tables, 50 + 1_000, &mut out);
        let v = out.pop().unwrap();
        assert_eq!(v.status, Status::Unconfirmed);
        // (This stand-in table is not updated by the records, so it lists fd 7 too.)
        assert!(
            v.reason.contains("the emulator still holds fd") && v.reason.ends_with("8"),
            "{}",
            v.reason
        );
        l.on_tick(&tables, u64::MAX / 2, &mut out);
        assert!(
            out.is_empty(),
            "the release of fd 7 was the detach's, not a violation"
        );
    }
}
