//! The VM's start (its emulator is this process) and stop (its emulator is gone).

use super::{Found, Ledger};
use crate::{
    claim::{Claim, ClaimKind},
    verdict::Evidence,
    view::KernelView,
};

/// A record may be written up to this long after the process it names started, as the clocks
/// of the record and of /proc go.
const START_SLACK_NS: u64 = 1_000_000_000;

pub(super) fn judge_start(
    l: &mut Ledger,
    c: &Claim,
    view: &dyn KernelView,
    last: bool,
) -> Option<Found> {
    let ClaimKind::VmStart { pid } = c.kind else {
        unreachable!("judge_start takes start claims")
    };
    let process = view.process(pid);
    if let Some(p) = &process
        && p.start_unix_ns > c.record_ts_ns + START_SLACK_NS
    {
        l.stats.pid_reuse += 1;
        if let Some(vm) = l.vms.get_mut(&c.uuid) {
            vm.running = false;
        }
        return Some(Found::unknown(format!(
            "pid {pid} now belongs to a process started after the record: pid reuse"
        )));
    }
    if let Some(fork) = l.log.forks.get(&pid).copied() {
        let held = view.table(pid).map_or(0, |t| t.fds.len());
        let mut e = Evidence::new(pid, "fork").at(fork).detail(format!(
            "followed by the tracker from its fork by the manager; holds {held} fds"
        ));
        if let Some(p) = &process {
            e = e.path(p.exe.clone());
        }
        return Some(
            Found::confirmed(format!("the emulator runs as pid {pid}"), vec![e]).on([pid]),
        );
    }
    let Some(p) = process else {
        let exited = view.table(pid).is_some_and(|t| t.exited);
        return (last || exited).then(|| {
            Found::violated(
                format!(
                    "the manager says the emulator runs as pid {pid}, but no such process exists"
                ),
                vec![],
            )
        });
    };
    let found = match started_by_manager(l, c, pid, view) {
        Some(how) => Found::confirmed(
            format!("the emulator runs as pid {pid} ({})", p.exe),
            vec![
                Evidence::new(pid, "process")
                    .path(p.exe.clone())
                    .detail(how),
            ],
        ),
        None => Found::violated(
            format!(
                "vm-pid {pid} ({}) is no process the manager started: not its descendant, not in the VM's cgroup",
                p.exe
            ),
            vec![
                Evidence::new(pid, "process")
                    .path(p.exe.clone())
                    .detail(format!(
                        "parent pid {}; cgroup {}",
                        p.ppid,
                        view.cgroup_of(pid)
                            .map_or_else(|| "?".to_owned(), |c| c.display().to_string())
                    )),
            ],
        ),
    };
    Some(found.on([pid]))
}

/// How `pid`, started before vmaudit watched, is known to be the manager's: a descendant of
/// a manager (its parent chain, read now), or in the cgroup the manager set up for the VM.
fn started_by_manager(l: &Ledger, c: &Claim, pid: u32, view: &dyn KernelView) -> Option<String> {
    let mut chain = vec![pid];
    let mut at = pid;
    while let Some(parent) = view.process(at).map(|p| p.ppid).filter(|p| *p > 1) {
        chain.push(parent);
        if l.managers.contains(&parent) {
            let path: Vec<String> = chain.iter().map(u32::to_string).collect();
            return Some(format!(
                "read from /proc: a descendant of the manager (pid {})",
                path.join(" <- ")
            ));
        }
        if chain.len() > 64 {
            break;
        }
        at = parent;
    }
    let vm_cgroup = l.vms.get(&c.uuid)?.cgroup.as_ref()?;
    let cg = view.cgroup_of(pid)?;
    cg.starts_with(vm_cgroup).then(|| {
        format!(
            "read from /proc: in the VM's cgroup {} that the manager set up",
            cg.display()
        )
    })
}

pub(super) fn judge_stop(
    l: &mut Ledger,
    c: &Claim,
    view: &dyn KernelView,
    last: bool,
) -> Option<Found> {
    let ClaimKind::VmStop { pid, .. } = &c.kind else {
        unreachable!("judge_stop takes stop claims")
    };
    let Some(pid) = pid.or_else(|| l.vms.get(&c.uuid).and_then(|v| v.pid)) else {
        l.stats.unknown_vm += 1;
        return Some(Found::unknown(
            "no start record for this VM was seen: its emulator is not known",
        ));
    };
    if l.log.exited(pid, view) || view.process(pid).is_none() {
        let mut e = Evidence::new(pid, "exit");
        if let Some(ts) = l.log.exits.get(&pid) {
            e = e.at(*ts);
        }
        if let Some(t) = view.table(pid) {
            e = e.detail(format!("its table holds {} fds", t.fds.len()));
        }
        return Some(
            Found::confirmed(
                format!("the emulator (pid {pid}) is gone; it holds nothing"),
                vec![e],
            )
            .on([pid]),
        );
    }
    last.then(|| {
        Found::violated(
            format!(
                "the manager says VM {} stopped, but the emulator (pid {pid}) still runs",
                c.vm_name
            ),
            vec![Evidence::new(pid, "process")],
        )
    })
}
