//! Holding a libvirt's claims to the kernel's evidence.
//!
//! libvirt's records say less than vmaudit's own: an open record does not say which fd, a
//! start record does not say which fds qemu got, a detach record does not say which fds were
//! released. The ledger infers them from the kernel, and each verdict says what was inferred
//! and from what:
//! - the fd an open record means: the manager's oldest open of that device not yet named by an
//!   earlier record (the tracker follows libvirtd);
//! - the fds qemu holds for a NIC: qemu's tun/tap fds whose interface carries libvirt's host
//!   side MAC for the NIC (the guest MAC with its first byte 0xfe), or that kcmp finds to be
//!   the open file description the manager opened;
//! - the fds a detach released: the closes of those fds in qemu;
//! - the cgroup ACL: the map of the device program attached to the VM's cgroup.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
};

use super::claims::{MClaim, MKind};
use crate::{
    cgroup::{DeviceRule, attached::RuleMap},
    observe::table::{FdRecord, Op, Resolver, Tables},
    procfs::{DevNum, FileKind},
    verify::{ClaimRef, Evidence, Status, Verdict},
};

const TUN: DevNum = DevNum {
    major: 10,
    minor: 200,
};
const VHOST_NET: DevNum = DevNum {
    major: 10,
    minor: 238,
};

/// How long after a NIC's fd is closed without a detach record the emulator may take to exit
/// (qemu closes its taps on the way out).
const RELEASE_GRACE_NS: u64 = 500_000_000;

/// Counts of what the monitor read and could not use, reported at the end.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Lines read.
    pub records: u64,
    /// Records that were claims.
    pub claims: u64,
    /// Records of other types (not VIRT_CONTROL/VIRT_RESOURCE).
    pub other_types: u64,
    /// VIRT_* records about something other than devices (mem, vcpu, disk, ...).
    pub other_resources: u64,
    /// Lines that did not parse, or VIRT_* records missing fields.
    pub malformed: u64,
    /// Claims about VMs never seen to start.
    pub unknown_vm: u64,
    /// Start records whose pid now belongs to a later process.
    pub pid_reuse: u64,
    /// Claims written before vmaudit watched.
    pub historic: u64,
}

/// A manager's open of a network device.
#[derive(Clone, Debug)]
struct MgrOpen {
    pid: u32,
    fd: i32,
    ts: u64,
    path: String,
    rdev: Option<DevNum>,
    named: bool,
}

#[derive(Clone, Debug, Default)]
struct Nic {
    /// The manager's open inferred for it: (pid, fd, ts).
    open: Option<(u32, i32, u64)>,
    /// The emulator's fds found for it.
    held: Vec<i32>,
    /// The start/attach claim that put it there.
    up: Option<ClaimRef>,
    detached: bool,
}

#[derive(Clone, Debug, Default)]
struct Vm {
    name: String,
    pid: Option<u32>,
    running: bool,
    cgroup: Option<PathBuf>,
    /// Rules confirmed in the kernel, with their claim, and whether their removal was reported.
    rules: Vec<(DeviceRule, ClaimRef, bool)>,
    nics: HashMap<String, Nic>,
}

/// A monitor's claims and what the kernel showed.
pub struct MonitorLedger {
    deadline_ns: u64,
    pub managers: HashSet<u32>,
    vms: HashMap<String, Vm>,
    opens: Vec<MgrOpen>,
    failed_opens: Vec<(u32, String, u64)>,
    pending: Vec<(MClaim, u64)>,
    historic: Vec<MClaim>,
    closes: HashMap<(u32, i32), u64>,
    exits: HashMap<u32, u64>,
    lost: HashMap<u32, u64>,
    early_releases: Vec<(u32, u64, Verdict)>,
    reported: HashSet<String>,
    /// Something happened since pending claims were last judged (a record, a claim, a gap).
    dirty: bool,
    pub stats: Stats,
}

fn evidence(pid: u32, fd: Option<i32>, ts: Option<u64>, what: &str) -> Evidence {
    Evidence {
        pid,
        fd,
        ts,
        what: what.to_owned(),
        ..Default::default()
    }
}

/// Whether `host_mac` (a tap's address) is libvirt's host side of guest MAC `mac`: the same,
/// or the same with the first byte 0xfe.
pub fn host_mac_matches(host_mac: &str, mac: &str) -> bool {
    let h = host_mac.trim().to_ascii_lowercase();
    let m = mac.to_ascii_lowercase();
    h == m || (h.len() == 17 && m.len() == 17 && h.starts_with("fe") && h[2..] == m[2..])
}

fn iface_mac(iface: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/sys/class/net").join(iface).join("address")).ok()
}

fn is_net_device(path: &str, rdev: Option<DevNum>) -> bool {
    rdev == Some(TUN) || rdev == Some(VHOST_NET) || path.starts_with("/dev/tap")
}

/// Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat).
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Wall-clock unix ns at which `pid` started.
fn started_wall_ns(pid: u32) -> Option<u64> {
    let ticks = start_ticks(pid)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let btime: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
    Some(btime * 1_000_000_000 + ticks * 1_000_000_000 / hz)
}

impl MonitorLedger {
    pub fn new(deadline_ns: u64, managers: impl IntoIterator<Item = u32>) -> Self {
        Self {
            deadline_ns,
            managers: managers.into_iter().collect(),
            vms: HashMap::new(),
            opens: Vec::new(),
            failed_opens: Vec::new(),
            pending: Vec::new(),
            historic: Vec::new(),
            closes: HashMap::new(),
            exits: HashMap::new(),
            lost: HashMap::new(),
            early_releases: Vec::new(),
            reported: HashSet::new(),
            dirty: false,
            stats: Stats::default(),
        }
    }

    /// Judge every pending claim at the next tick, whatever arrived (evidence outside the
    /// tracker, such as a device map, can change without an fd event).
    pub fn touch(&mut self) {
        self.dirty = true;
    }

    /// Events the kernel could not deliver for `pid`.
    pub fn on_gap(&mut self, pid: u32, lost: u64) {
        self.dirty = true;
        *self.lost.entry(pid).or_default() += lost.max(1);
    }

    fn lost_for(&self, pids: &[u32]) -> Option<String> {
        crate::verify::lost_reason(&self.lost, pids)
    }

    /// The emulator pids of running VMs.
    pub fn emulators(&self) -> Vec<u32> {
        self.vms
            .values()
            .filter(|v| v.running)
            .filter_map(|v| v.pid)
            .collect()
    }

    /// One fd record of a watched process, in kernel order.
    pub fn on_record(&mut self, r: &FdRecord, now: u64) {
        self.dirty = true;
        let path = r.file.as_ref().map(|f| f.path.clone()).unwrap_or_default();
        let rdev = r.file.as_ref().and_then(|f| f.rdev);
        let Some(fd) = r.fd else {
            if self.managers.contains(&r.pid) && !r.result.is_ok() && r.op == Op::Open {
                self.failed_opens.push((r.pid, path, r.ts));
            }
            return;
        };
        match r.op {
            Op::Open if self.managers.contains(&r.pid) && is_net_device(&path, rdev) => {
                self.opens.push(MgrOpen {
                    pid: r.pid,
                    fd,
                    ts: r.ts,
                    path,
                    rdev,
                    named: false,
                });
            }
            Op::Close | Op::CloseRange | Op::Replaced | Op::ExecCloexec | Op::Exit => {
                self.closes.insert((r.pid, fd), r.ts);
                if r.op == Op::Exit {
                    self.exits.insert(r.pid, r.ts);
                    return;
                }
                self.on_release(r.pid, fd, r.ts, now);
            }
            _ => {}
        }
    }

    /// The process `pid` exited (its table says so).
    pub fn on_exit(&mut self, pid: u32, ts: u64) {
        self.exits.entry(pid).or_insert(ts);
    }

    /// An emulator closed `fd`: a NIC's fd closed with no detach claimed is a violation,
    /// unless the emulator exits within the grace period.
    fn on_release(&mut self, pid: u32, fd: i32, ts: u64, now: u64) {
        for vm in self.vms.values() {
            if vm.pid != Some(pid) {
                continue;
            }
            for (mac, nic) in &vm.nics {
                if nic.detached || !nic.held.contains(&fd) {
                    continue;
                }
                let claim = nic.up.clone().unwrap_or_default();
                let mut e = evidence(pid, Some(fd), Some(ts), "close");
                e.detail = Some(format!("NIC {mac}'s fd"));
                let v = Verdict::new(
                    claim,
                    Status::Violated,
                    format!(
                        "qemu (pid {pid}) of VM {} released NIC {mac}'s fd {fd} with no detach record",
                        vm.name
                    ),
                    vec![e],
                );
                self.early_releases.push((pid, now + RELEASE_GRACE_NS, v));
            }
        }
    }

    /// A record's claim, after the kernel events before it were applied.
    pub fn on_claim<R: Resolver>(
        &mut self,
        c: MClaim,
        tables: &Tables<R>,
        now: u64,
        out: &mut Vec<Verdict>,
    ) {
        self.dirty = true;
        self.stats.claims += 1;
        let vm = self.vms.entry(c.uuid.clone()).or_default();
        if vm.name.is_empty() {
            vm.name = c.vm.clone();
        }
        if c.historic {
            self.stats.historic += 1;
            self.historic.push(c);
            return;
        }
        self.take_up(c, tables, now, out);
    }

    fn take_up<R: Resolver>(
        &mut self,
        c: MClaim,
        tables: &Tables<R>,
        now: u64,
        out: &mut Vec<Verdict>,
    ) {
        if let MKind::VmStart { pid } = c.kind {
            let vm = self.vms.entry(c.uuid.clone()).or_default();
            vm.pid = Some(pid);
            vm.running = true;
        }
        match self.judge(&c, tables, false) {
            Some(v) => out.push(v),
            None => {
                let deadline = now + self.deadline_ns;
                self.pending.push((c, deadline));
            }
        }
    }

    /// The log's past has been read: claims a later record superseded are `unknown` (their
    /// moment is gone); the others are judged against what the kernel holds now.
    pub fn caught_up<R: Resolver>(&mut self, tables: &Tables<R>, now: u64, out: &mut Vec<Verdict>) {
        let past = std::mem::take(&mut self.historic);
        for (i, c) in past.iter().enumerate() {
            let later = &past[i + 1..];
            let superseded = later.iter().find(|l| {
                l.uuid == c.uuid
                    && match (&c.kind, &l.kind) {
                        // A stop ends everything of that boot; a later start, the earlier start.
                        (_, MKind::VmStop { .. })
                        | (MKind::VmStart { .. }, MKind::VmStart { .. }) => true,
                        (
                            MKind::NetUp { mac, .. } | MKind::NetOpen { mac, .. },
                            MKind::NetDetach { mac: m },
                        ) => mac == m,
                        _ => false,
                    }
            });
            let before = "written before vmaudit watched";
            if let Some(l) = superseded {
                out.push(Verdict::new(
                    c.claim_ref(),
                    Status::Unknown,
                    format!(
                        "{before}, and superseded by a later record ({} claim {}): its moment is past",
                        l.kind.name(),
                        l.id
                    ),
                    vec![],
                ));
                continue;
            }
            match &c.kind {
                MKind::NetOpen { .. } => out.push(Verdict::new(
                    c.claim_ref(),
                    Status::Unknown,
                    format!("{before}: the open itself was not seen"),
                    vec![],
                )),
                MKind::VmStop { .. } => {
                    // A stop with nothing after it: judged on what runs now.
                    self.take_up(c.clone(), tables, now, out);
                }
                _ => self.take_up(c.clone(), tables, now, out),
            }
        }
    }

    /// Judges pending claims with the evidence now in; past their deadline, for good.
    pub fn on_tick<R: Resolver>(&mut self, tables: &Tables<R>, now: u64, out: &mut Vec<Verdict>) {
        // Pending claims wait for evidence: judge them again only when something arrived, or
        // for good when their deadline passed.
        let dirty = std::mem::take(&mut self.dirty);
        let pending = std::mem::take(&mut self.pending);
        for (c, deadline) in pending {
            let last = now >= deadline;
            if !dirty && !last {
                self.pending.push((c, deadline));
                continue;
            }
            match self.judge(&c, tables, last) {
                Some(v) => out.push(v),
                None => self.pending.push((c, deadline)),
            }
        }
        let releases = std::mem::take(&mut self.early_releases);
        for (pid, until, v) in releases {
            let exited = self.exits.contains_key(&pid)
                || tables.get(pid).is_some_and(|t| t.exited)
                || self
                    .vms
                    .values()
                    .any(|vm| vm.pid == Some(pid) && !vm.running);
            if exited {
                continue;
            }
            if now >= until {
                out.push(v);
            } else {
                self.early_releases.push((pid, until, v));
            }
        }
    }

    /// Everything still pending, judged for good.
    pub fn finish<R: Resolver>(&mut self, tables: &Tables<R>, now: u64, out: &mut Vec<Verdict>) {
        let past = std::mem::take(&mut self.historic);
        if !past.is_empty() {
            self.historic = past;
            self.caught_up(tables, now, out);
        }
        for (_, d) in self.pending.iter_mut() {
            *d = now;
        }
        self.on_tick(tables, now, out);
    }

    /// A verdict for `c`, or None to wait (never None when `last`).
    fn judge<R: Resolver>(
        &mut self,
        c: &MClaim,
        tables: &Tables<R>,
        last: bool,
    ) -> Option<Verdict> {
        let verdict = |status, reason: String, ev: Vec<Evidence>| {
            Some(Verdict::new(c.claim_ref(), status, reason, ev))
        };
        let managers: Vec<u32> = c
            .sender
            .into_iter()
            .chain(self.managers.iter().copied())
            .collect();
        match &c.kind {
            MKind::NetOpen { mac, path, rdev } => {
                if !c.success {
                    if let Some((pid, _, ts)) = self
                        .failed_opens
                        .iter()
                        .find(|(_, p, _)| p == path)
                        .cloned()
                    {
                        let mut e = evidence(pid, None, Some(ts), "open");
                        e.path = Some(path.clone());
                        e.detail = Some("failed".into());
                        return verdict(
                            Status::Confirmed,
                            format!("the manager (pid {pid}) failed to open {path}, as recorded"),
                            vec![e],
                        );
                    }
                    if !last {
                        return None;
                    }
                    return verdict(
                        Status::Unconfirmed,
                        format!("no failed open of {path} by the manager was seen"),
                        vec![],
                    );
                }
                let found = self
                    .opens
                    .iter_mut()
                    .filter(|o| {
                        !o.named
                            && managers.contains(&o.pid)
                            && (o.path == *path || (rdev.is_some() && o.rdev == *rdev))
                    })
                    .min_by_key(|o| o.ts);
                if let Some(o) = found {
                    o.named = true;
                    let o = o.clone();
                    let vm = self.vms.entry(c.uuid.clone()).or_default();
                    vm.nics.entry(mac.clone()).or_default().open = Some((o.pid, o.fd, o.ts));
                    let mut e = evidence(o.pid, Some(o.fd), Some(o.ts), "open");
                    e.path = Some(o.path.clone());
                    e.rdev = o.rdev.map(|r| r.to_string());
                    e.detail = Some(
                        "inferred: the manager's oldest open of this device not named by an earlier record"
                            .into(),
                    );
                    return verdict(
                        Status::Confirmed,
                        format!(
                            "the manager (pid {}) opened {} as fd {} for NIC {mac}",
                            o.pid, o.path, o.fd
                        ),
                        vec![e],
                    );
                }
                if !last {
                    return None;
                }
                if let Some(l) = self.lost_for(&managers) {
                    return verdict(Status::Unknown, l, vec![]);
                }
                verdict(
                    Status::Unconfirmed,
                    format!("the kernel saw no open of {path} by the manager before this record"),
                    vec![],
                )
            }
            MKind::NetUp { mac, attach } => {
                let Some(pid) = self.vms.get(&c.uuid).and_then(|v| v.pid) else {
                    if !last {
                        return None;
                    }
                    self.stats.unknown_vm += 1;
                    return Some(unknown_vm(c));
                };
                let open = self
                    .vms
                    .get(&c.uuid)
                    .and_then(|v| v.nics.get(mac))
                    .and_then(|n| n.open);
                let found = self.nic_fds(pid, mac, open, tables);
                if !found.is_empty() {
                    let fds: Vec<i32> = found.iter().map(|e| e.fd.unwrap_or(-1)).collect();
                    let nic = self
                        .vms
                        .entry(c.uuid.clone())
                        .or_default()
                        .nics
                        .entry(mac.clone())
                        .or_default();
                    nic.held = fds.clone();
                    nic.detached = false;
                    let mut r = c.claim_ref();
                    r.fd = fds.first().copied();
                    nic.up = Some(r.clone());
                    return Some(Verdict::new(
                        r,
                        Status::Confirmed,
                        format!(
                            "qemu (pid {pid}) holds NIC {mac}'s device as fd {}",
                            fds.iter()
                                .map(i32::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        found,
                    ));
                }
                if !last {
                    return None;
                }
                if let Some(l) = self.lost_for(&[pid]) {
                    return verdict(Status::Unknown, l, vec![]);
                }
                let how = if *attach { "attached" } else { "started with" };
                verdict(
                    Status::Violated,
                    format!(
                        "libvirt says VM {} {how} NIC {mac}, but qemu (pid {pid}) holds no fd for it",
                        c.vm
                    ),
                    self.tun_fds(pid, tables),
                )
            }
            MKind::NetDetach { mac } => {
                let Some(pid) = self.vms.get(&c.uuid).and_then(|v| v.pid) else {
                    self.stats.unknown_vm += 1;
                    return Some(unknown_vm(c));
                };
                let held = self
                    .vms
                    .get(&c.uuid)
                    .and_then(|v| v.nics.get(mac))
                    .map(|n| n.held.clone())
                    .unwrap_or_default();
                let still = self.nic_fds(pid, mac, None, tables);
                if still.is_empty() {
                    if let Some(n) = self.vms.get_mut(&c.uuid).and_then(|v| v.nics.get_mut(mac)) {
                        n.detached = true;
                    }
                    let ev: Vec<Evidence> = held
                        .iter()
                        .map(|fd| {
                            let mut e = evidence(
                                pid,
                                Some(*fd),
                                self.closes.get(&(pid, *fd)).copied(),
                                "close",
                            );
                            e.detail = Some(format!("NIC {mac}'s fd, released"));
                            e
                        })
                        .collect();
                    let which = if held.is_empty() {
                        "no fd for it is left".to_owned()
                    } else {
                        format!(
                            "it released fd {}",
                            held.iter()
                                .map(i32::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    };
                    return verdict(
                        Status::Confirmed,
                        format!("qemu (pid {pid}) no longer holds NIC {mac}: {which}"),
                        ev,
                    );
                }
                if !last {
                    return None;
                }
                verdict(
                    Status::Violated,
                    format!(
                        "libvirt says NIC {mac} was detached, but qemu (pid {pid}) still holds it"
                    ),
                    still,
                )
            }
            MKind::CgroupDeny { cgroup } => {
                self.vms.entry(c.uuid.clone()).or_default().cgroup = Some(cgroup.clone());
                match RuleMap::of_cgroup(cgroup) {
                    Ok(m) => {
                        let mut e = evidence(0, None, None, "program");
                        e.path = Some(cgroup.display().to_string());
                        e.detail = Some(format!(
                            "device program {} (map {}) attached: what it does not allow is denied",
                            m.prog_id, m.map_id
                        ));
                        verdict(
                            Status::Confirmed,
                            format!("a device program denies by default on {}", cgroup.display()),
                            vec![e],
                        )
                    }
                    Err(e) if last => verdict(
                        Status::Violated,
                        format!("no device program is attached to {}: {e}", cgroup.display()),
                        vec![],
                    ),
                    Err(_) => None,
                }
            }
            MKind::CgroupAllow { cgroup, rule } => {
                let rules = RuleMap::of_cgroup(cgroup).and_then(|m| m.rules());
                let held = rules.as_ref().ok().and_then(|rs| {
                    rs.iter()
                        .find(|k| same_device(k, rule) && k.acl.contains(rule.acl))
                        .copied()
                });
                match held {
                    Some(k) => {
                        let vm = self.vms.entry(c.uuid.clone()).or_default();
                        vm.cgroup = Some(cgroup.clone());
                        vm.rules.push((*rule, c.claim_ref(), false));
                        let mut e = evidence(0, None, None, "map");
                        e.path = Some(cgroup.display().to_string());
                        e.detail = Some(format!("kernel map entry {k}"));
                        verdict(
                            Status::Confirmed,
                            format!("the device map of {} allows {rule}", cgroup.display()),
                            vec![e],
                        )
                    }
                    None if last => verdict(
                        Status::Violated,
                        format!(
                            "the device map of {} does not allow {rule}: {}",
                            cgroup.display(),
                            match &rules {
                                Ok(rs) => format!(
                                    "it holds {}",
                                    rs.iter()
                                        .map(|r| r.to_string())
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                ),
                                Err(e) => e.to_string(),
                            }
                        ),
                        vec![],
                    ),
                    None => None,
                }
            }
            MKind::VmStart { pid } => {
                let pid = *pid;
                let Some(started) = started_wall_ns(pid) else {
                    if !last && !tables.get(pid).is_some_and(|t| t.exited) {
                        return None;
                    }
                    return verdict(
                        Status::Violated,
                        format!("libvirt says qemu runs as pid {pid}, but no such process exists"),
                        vec![],
                    );
                };
                // The record is written after qemu starts; a process that started later than
                // the record (with a second of slack for the clocks) is another one.
                if started > c.record_ts_ns + 1_000_000_000 {
                    self.stats.pid_reuse += 1;
                    if let Some(vm) = self.vms.get_mut(&c.uuid) {
                        vm.running = false;
                    }
                    return verdict(
                        Status::Unknown,
                        format!(
                            "pid {pid} now belongs to a process started after the record: pid reuse"
                        ),
                        vec![],
                    );
                }
                let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                let followed = tables.get(pid).is_some();
                let mut e = evidence(pid, None, None, if followed { "process" } else { "proc" });
                e.path = Some(exe.clone());
                e.detail = Some(
                    if followed {
                        "followed by the tracker"
                    } else {
                        "read from /proc"
                    }
                    .into(),
                );
                verdict(
                    Status::Confirmed,
                    format!("the emulator runs as pid {pid} ({exe})"),
                    vec![e],
                )
            }
            MKind::VmStop { .. } => {
                let Some(pid) = self.vms.get(&c.uuid).and_then(|v| v.pid) else {
                    self.stats.unknown_vm += 1;
                    return Some(unknown_vm(c));
                };
                let gone = !Path::new(&format!("/proc/{pid}")).exists()
                    || tables.get(pid).is_some_and(|t| t.exited)
                    || self.exits.contains_key(&pid);
                if gone {
                    if let Some(vm) = self.vms.get_mut(&c.uuid) {
                        vm.running = false;
                    }
                    let ts = self.exits.get(&pid).copied();
                    return verdict(
                        Status::Confirmed,
                        format!("qemu (pid {pid}) is gone"),
                        vec![evidence(pid, None, ts, "exit")],
                    );
                }
                if !last {
                    return None;
                }
                verdict(
                    Status::Violated,
                    format!(
                        "libvirt says VM {} stopped, but qemu (pid {pid}) still runs",
                        c.vm
                    ),
                    vec![evidence(pid, None, None, "process")],
                )
            }
        }
    }

    /// The emulator's fds that are NIC `mac`'s device: by the interface's MAC, or by kcmp with
    /// the manager's open.
    fn nic_fds<R: Resolver>(
        &self,
        pid: u32,
        mac: &str,
        open: Option<(u32, i32, u64)>,
        tables: &Tables<R>,
    ) -> Vec<Evidence> {
        let Some(t) = tables.get(pid) else {
            return vec![];
        };
        let mut out = Vec::new();
        for (fd, e) in &t.fds {
            if !is_net_device(&e.id.path, e.id.rdev) || e.id.kind != FileKind::Char {
                continue;
            }
            // The identity was resolved when the fd arrived; a tap fd opened by the manager
            // names its interface only after TUNSETIFF, so read it again now.
            let iface = e.id.iface.clone().or_else(|| {
                crate::procfs::ProcFs::default()
                    .identity(pid, *fd)
                    .ok()
                    .and_then(|i| i.iface)
            });
            let host = iface.as_deref().and_then(iface_mac);
            let by_mac = host.as_deref().is_some_and(|h| host_mac_matches(h, mac));
            // kcmp only when the address does not say.
            let by_kcmp = if by_mac {
                None
            } else {
                open.and_then(|(mp, mfd, _)| {
                    crate::kcmp::same_file(mp, mfd, pid, *fd)
                        .ok()
                        .filter(|s| *s)
                })
            };
            if by_kcmp.is_none() && !by_mac {
                continue;
            }
            let mut ev = evidence(pid, Some(*fd), Some(e.since_ns), "holds");
            ev.path = Some(e.id.path.clone());
            ev.rdev = e.id.rdev.map(|r| r.to_string());
            let mut how = Vec::new();
            if let Some(i) = &iface {
                how.push(format!("interface {i}"));
            }
            if by_mac {
                how.push(format!(
                    "whose address {} is libvirt's host side of {mac}",
                    host.unwrap_or_default().trim()
                ));
            }
            if let Some((mp, mfd, _)) = open.filter(|_| by_kcmp.is_some()) {
                how.push(format!(
                    "kcmp: the open file description the manager (pid {mp}) opened as fd {mfd}"
                ));
            } else if let Some((mp, mfd, _)) = open {
                how.push(format!(
                    "the manager's open (pid {mp}, fd {mfd}) was closed before kcmp could compare"
                ));
            }
            how.push(format!("arrived via {}", op_name(e.via)));
            ev.detail = Some(format!("inferred: {}", how.join("; ")));
            out.push(ev);
        }
        out
    }

    fn tun_fds<R: Resolver>(&self, pid: u32, tables: &Tables<R>) -> Vec<Evidence> {
        tables
            .get(pid)
            .map(|t| {
                t.fds
                    .iter()
                    .filter(|(_, e)| is_net_device(&e.id.path, e.id.rdev))
                    .map(|(fd, e)| {
                        let mut ev = evidence(pid, Some(*fd), Some(e.since_ns), "holds");
                        ev.path = Some(e.id.path.clone());
                        ev.detail = e.id.iface.as_ref().map(|i| format!("interface {i}"));
                        ev
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Re-reads the device map of every running VM: a rule confirmed earlier and now missing
    /// was removed behind the manager's back.
    pub fn recheck_rules(&mut self, out: &mut Vec<Verdict>) {
        for vm in self.vms.values_mut() {
            let (true, Some(cg)) = (vm.running, vm.cgroup.clone()) else {
                continue;
            };
            if vm.rules.iter().all(|r| r.2) {
                continue;
            }
            let Ok(kernel) = RuleMap::of_cgroup(&cg).and_then(|m| m.rules()) else {
                continue;
            };
            for (rule, claim, reported) in vm.rules.iter_mut() {
                if *reported
                    || kernel
                        .iter()
                        .any(|k| same_device(k, rule) && k.acl.contains(rule.acl))
                {
                    continue;
                }
                *reported = true;
                let mut e = evidence(0, None, None, "map");
                e.path = Some(cg.display().to_string());
                e.detail = Some(format!(
                    "the map now holds {}",
                    kernel
                        .iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                out.push(Verdict::new(
                    claim.clone(),
                    Status::Violated,
                    format!(
                        "{rule} is no longer in the device map of VM {}'s cgroup: removed after libvirt set it",
                        vm.name
                    ),
                    vec![e],
                ));
            }
        }
    }

    /// Looks for NIC fds of running emulators held by any other process (an fd copied out of
    /// qemu): every process's tun/tap fds, compared with kcmp.
    pub fn scan_copies(&mut self, out: &mut Vec<Verdict>) {
        let mut held: Vec<(u32, i32, String, String, ClaimRef)> = Vec::new();
        for vm in self.vms.values() {
            let (true, Some(pid)) = (vm.running, vm.pid) else {
                continue;
            };
            for (mac, nic) in &vm.nics {
                if nic.detached {
                    continue;
                }
                for fd in &nic.held {
                    held.push((
                        pid,
                        *fd,
                        mac.clone(),
                        vm.name.clone(),
                        nic.up.clone().unwrap_or_default(),
                    ));
                }
            }
        }
        if held.is_empty() {
            return;
        }
        let emulators: HashSet<u32> = held.iter().map(|h| h.0).collect();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let Some(other) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if emulators.contains(&other) || self.managers.contains(&other) {
                continue;
            }
            let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
                continue;
            };
            for f in fds.flatten() {
                let Some(ofd) = f.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                let Ok(target) = std::fs::read_link(f.path()) else {
                    continue;
                };
                let t = target.to_string_lossy();
                if t != "/dev/net/tun" && !t.starts_with("/dev/tap") && t != "/dev/vhost-net" {
                    continue;
                }
                for (pid, fd, mac, name, claim) in &held {
                    if !crate::kcmp::same_file(other, ofd, *pid, *fd).unwrap_or(false) {
                        continue;
                    }
                    let key = format!("copy {other}:{ofd} {pid}:{fd}");
                    if !self.reported.insert(key) {
                        continue;
                    }
                    let comm =
                        std::fs::read_to_string(format!("/proc/{other}/comm")).unwrap_or_default();
                    let mut e = evidence(other, Some(ofd), None, "kcmp");
                    e.path = Some(t.to_string());
                    e.detail = Some(format!(
                        "{} (pid {other}) fd {ofd} is the same open file description as qemu (pid {pid}) fd {fd}",
                        comm.trim()
                    ));
                    out.push(Verdict::new(
                        claim.clone(),
                        Status::Violated,
                        format!(
                            "NIC {mac} of VM {name}: qemu's fd {fd} is also held by {} (pid {other}) as fd {ofd}",
                            comm.trim()
                        ),
                        vec![e, evidence(*pid, Some(*fd), None, "holds")],
                    ));
                }
            }
        }
    }
}

/// The verdict on a claim about a VM whose start was never seen.
fn unknown_vm(c: &MClaim) -> Verdict {
    Verdict::new(
        c.claim_ref(),
        Status::Unknown,
        "no VIRT_CONTROL start record for this VM was seen: its emulator is not known",
        vec![],
    )
}

/// The same device and type (the ACL is compared apart).
fn same_device(k: &DeviceRule, r: &DeviceRule) -> bool {
    k.major == r.major && k.minor == r.minor && (k.types == r.types || k.types.letter() == 'a')
}

fn op_name(op: Op) -> String {
    serde_json::to_value(op)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirts_host_side_mac_matches_the_guest_mac() {
        assert!(host_mac_matches("fe:54:00:1b:00:01\n", "52:54:00:1b:00:01"));
        assert!(host_mac_matches("52:54:00:1b:00:01", "52:54:00:1b:00:01"));
        assert!(!host_mac_matches("fe:54:00:1b:00:02", "52:54:00:1b:00:01"));
        assert!(!host_mac_matches("", "52:54:00:1b:00:01"));
    }
}
