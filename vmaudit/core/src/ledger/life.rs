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
    if let Some(t) = view.table(pid) {
        let fork = l.log.forks.get(&pid).copied();
        let mut e =
            Evidence::new(pid, if fork.is_some() { "fork" } else { "process" }).detail(format!(
                "{}; holds {} fds",
                if fork.is_some() {
                    "followed by the tracker from its fork by the manager"
                } else {
                    "watched by the tracker since the record named it"
                },
                t.fds.len()
            ));
        if let Some(ts) = fork {
            e = e.at(ts);
        }
        if let Some(p) = &process {
            e = e.path(p.exe.clone());
        }
        return Some(
            Found::confirmed(format!("the emulator runs as pid {pid}"), vec![e]).on([pid]),
        );
    }
    match process {
        Some(p) => Some(Found::confirmed(
            format!("the emulator runs as pid {pid} ({})", p.exe),
            vec![
                Evidence::new(pid, "process")
                    .path(p.exe.clone())
                    .detail("read from /proc"),
            ],
        )),
        None => last.then(|| {
            Found::violated(
                format!(
                    "the manager says the emulator runs as pid {pid}, but no such process exists"
                ),
                vec![],
            )
        }),
    }
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
