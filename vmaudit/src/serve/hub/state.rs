//! The hub's state: the VMs, the live fd tables, the recent verdicts and the counts, and how
//! an fd record changes the tables.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::{
    observe::{
        monotonic_ns,
        table::{FdRecord, Op},
    },
    serve::{
        history::History,
        view::{FdRow, Scope, StatusCounts, VerdictView, VmView},
    },
    verify::Verdict,
};

/// How many recent claims the hub remembers the VM of (a verdict on an older claim finds its
/// VM by the emulator pid in its evidence).
const KEPT_CLAIMS: usize = 16_384;

/// Nothing counted (a gap whose loss check was already counted).
pub(super) static NOTHING: BTreeMap<&str, u64> = BTreeMap::new();

/// The dashboard's state.
#[derive(Debug, Default)]
pub(super) struct State {
    /// The sequence number of the last event.
    pub(super) seq: u64,
    /// In the order first heard of.
    pub(super) vms: Vec<VmView>,
    /// Index in `vms` by the VM's key.
    pub(super) vm_index: HashMap<String, usize>,
    /// The VM (index in `vms`) of each running emulator pid.
    pub(super) vm_of_pid: HashMap<u32, usize>,
    pub(super) procs: BTreeMap<u32, BTreeMap<i32, FdRow>>,
    pub(super) verdicts: VecDeque<VerdictView>,
    /// The VM key of each recent claim; `claim_order` is oldest first.
    pub(super) claim_vm: HashMap<u64, String>,
    pub(super) claim_order: VecDeque<u64>,
    pub(super) totals: StatusCounts,
    pub(super) claims: u64,
    pub(super) lost: BTreeMap<&'static str, u64>,
    /// The last loss check whose causes were counted.
    pub(super) last_check: u64,
    pub(super) allowed: u64,
    pub(super) denied: u64,
    pub(super) history: History,
}

impl State {
    /// The history's key for `pid`: its VM's, or (watching processes) its own.
    pub(super) fn subject(&self, scope: Scope, pid: u32) -> Option<String> {
        match scope {
            Scope::Vms => self.vm_of_pid.get(&pid).map(|i| self.vms[*i].key.clone()),
            Scope::Processes => Some(pid.to_string()),
        }
    }

    pub(super) fn fds_of(&self, pid: u32) -> u64 {
        self.procs.get(&pid).map_or(0, |t| t.len() as u64)
    }

    pub(super) fn remember_claim(&mut self, id: u64, vm: String) {
        if self.claim_order.len() == KEPT_CLAIMS
            && let Some(old) = self.claim_order.pop_front()
        {
            self.claim_vm.remove(&old);
        }
        self.claim_order.push_back(id);
        self.claim_vm.insert(id, vm);
    }

    /// The VM a verdict is about: its claim's, or that of an emulator in its evidence.
    pub(super) fn vm_of_verdict(&self, v: &Verdict) -> Option<String> {
        self.claim_vm.get(&v.claim.id).cloned().or_else(|| {
            v.evidence
                .iter()
                .find_map(|e| self.vm_of_pid.get(&e.pid))
                .map(|i| self.vms[*i].key.clone())
        })
    }
}

/// A VM's key: its uuid, or its name when the uuid is unknown.
pub(super) fn vm_key(name: &str, uuid: &str) -> String {
    if uuid.is_empty() { name } else { uuid }.to_owned()
}

/// Applies a successful fd record to the tables. A table exists from its first fd on, and
/// goes once its process has exited holding nothing.
pub(super) fn apply_fd(
    procs: &mut BTreeMap<u32, BTreeMap<i32, FdRow>>,
    r: &FdRecord,
    fd: i32,
    now_ns: u64,
) {
    match r.op {
        op if op.is_gain() => {
            let file = r.file.as_ref();
            // The kernel stamp, moved to the wall clock by how long ago it was.
            let since_unix_ns = match r.ts {
                0 => 0,
                ts => now_ns.saturating_sub(monotonic_ns().saturating_sub(ts)),
            };
            procs.entry(r.pid).or_default().insert(
                fd,
                FdRow {
                    fd,
                    path: file.map(|f| f.path.to_string()).unwrap_or_default(),
                    kind: file.map(|f| f.kind),
                    rdev: file.and_then(|f| f.rdev),
                    iface: file.and_then(|f| f.iface.clone()),
                    cloexec: r.cloexec.unwrap_or(false),
                    via: r.op,
                    since_ns: r.ts,
                    since_unix_ns,
                    claim: None,
                },
            );
        }
        op if op.is_release() => {
            if let Some(table) = procs.get_mut(&r.pid) {
                table.remove(&fd);
                if r.op == Op::Exit && table.is_empty() {
                    procs.remove(&r.pid);
                }
            }
        }
        Op::CloexecOn | Op::CloexecOff => {
            if let Some(row) = procs.get_mut(&r.pid).and_then(|t| t.get_mut(&fd)) {
                row.cloexec = r.op == Op::CloexecOn;
            }
        }
        // SendFd: still held here.
        _ => {}
    }
}
