//! The periodic check of each tracked table against the kernel's (the task_file iterator):
//! whatever path the probes missed shows as a difference.
//!
//! The snapshot and the events are not read at one instant: a change made during the read may
//! be in the snapshot while its event is still on its way, or the reverse. So a difference is
//! first only suspected. It is a miss when the next check finds the same fd different again and
//! no event touched that fd in between; a busy process is checked like an idle one, fd by fd.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use vmaudit_core::fd::{FdIdentity, ProcTable};

use super::event::Change;

/// Processes checked per period at most (the rest wait for the next periods, in turn), so that
/// a host with many watched processes pays a bounded cost per period.
pub const PER_PERIOD: usize = 64;

/// What the checker remembers between periods.
#[derive(Debug, Default)]
pub struct Checker {
    /// Per process: fds that differed at its last check and that no event has touched since.
    suspects: HashMap<u32, BTreeSet<i32>>,
    /// Per process: the kernel time of the last check (or read of the whole table) that found
    /// its table as the kernel has it: a miss found later lies after it.
    agreed_at: BTreeMap<u32, u64>,
    /// The pid the next period starts from.
    cursor: u32,
}

/// The fds in which a tracked table and a kernel snapshot (fd -> identity, close-on-exec)
/// differ: present in one only, another open file, or another close-on-exec flag.
pub fn differences(table: &ProcTable, snap: &BTreeMap<i32, (FdIdentity, bool)>) -> BTreeSet<i32> {
    let mut out: BTreeSet<i32> = snap
        .keys()
        .filter(|fd| !table.fds.contains_key(fd))
        .copied()
        .collect();
    for (fd, e) in &table.fds {
        match snap.get(fd) {
            Some((id, cloexec)) if id.same_inode(&e.id) && *cloexec == e.cloexec => {}
            _ => {
                out.insert(*fd);
            }
        }
    }
    out
}

/// The fds a change touches, `first..=last` (None: it touches none of the process's fds).
fn touched(change: &Change) -> Option<(i32, i32)> {
    let range = |first: u32, last: u32| {
        (
            first.min(i32::MAX as u32) as i32,
            last.min(i32::MAX as u32) as i32,
        )
    };
    match *change {
        Change::Gain { fd, .. } | Change::Close { fd } | Change::SetCloexec { fd, .. } => {
            Some((fd, fd))
        }
        Change::CloseRange { first, last } | Change::CloexecRange { first, last } => {
            Some(range(first, last))
        }
        Change::Exec | Change::Exit | Change::Unseen { .. } => Some((0, i32::MAX)),
        // An AddFd is the supervisor's; the watcher applies it as the target's gain.
        Change::Fork { .. }
        | Change::SendFd { .. }
        | Change::Failed { .. }
        | Change::Unshare
        | Change::Iface { .. }
        | Change::AddFd { .. } => None,
    }
}

impl Checker {
    /// `pid`'s table was read whole from the kernel at `ts`.
    pub fn agreed(&mut self, pid: u32, ts: u64) {
        self.suspects.remove(&pid);
        self.agreed_at.insert(pid, ts);
    }

    /// An event of `pid` was applied: it clears the suspicion on the fds it touches. Costs
    /// one map look-up per event while nothing is suspected.
    pub fn touch(&mut self, pid: u32, change: &Change) {
        if self.suspects.is_empty() {
            return;
        }
        let Some(set) = self.suspects.get_mut(&pid) else {
            return;
        };
        if let Some((first, last)) = touched(change) {
            let hit: Vec<i32> = set.range(first..=last).copied().collect();
            for fd in hit {
                set.remove(&fd);
            }
        }
    }

    /// The next processes to check, at most [`PER_PERIOD`], in turn from where the last period
    /// stopped.
    pub fn round(&mut self, mut pids: Vec<u32>) -> Vec<u32> {
        pids.sort_unstable();
        let start = pids.partition_point(|p| *p < self.cursor);
        let n = pids.len().min(PER_PERIOD);
        let out: Vec<u32> = pids.iter().cycle().skip(start).take(n).copied().collect();
        self.cursor = out.last().map_or(0, |p| p.wrapping_add(1));
        out
    }

    /// The result of checking `pid` at kernel time `ts`, with `diffs` its differences: Some(the
    /// start of the window in which the table went wrong) when a miss is confirmed (the caller
    /// reads the table again and calls [`Checker::agreed`]); None when it agrees, or a
    /// difference is only suspected so far.
    pub fn judge(&mut self, pid: u32, ts: u64, diffs: BTreeSet<i32>) -> Option<u64> {
        if diffs.is_empty() {
            self.agreed(pid, ts);
            return None;
        }
        let confirmed = self
            .suspects
            .get(&pid)
            .is_some_and(|s| s.intersection(&diffs).next().is_some());
        if confirmed {
            self.suspects.remove(&pid);
            return Some(self.agreed_at.get(&pid).copied().unwrap_or(0));
        }
        self.suspects.insert(pid, diffs);
        None
    }

    /// `pid` is no longer tracked.
    pub fn forget(&mut self, pid: u32) {
        self.suspects.remove(&pid);
        self.agreed_at.remove(&pid);
    }
}

#[cfg(test)]
mod tests {
    use vmaudit_core::fd::{FdEntry, FileKind, Op, Source};

    use super::*;

    fn id(ofd: u64) -> FdIdentity {
        FdIdentity {
            ofd: Some(ofd),
            ..FdIdentity::named("x", FileKind::Regular, Source::Kernel)
        }
    }

    fn table(fds: &[(i32, u64, bool)]) -> ProcTable {
        let mut t = ProcTable::default();
        for &(fd, ofd, cloexec) in fds {
            t.fds.insert(
                fd,
                Box::new(FdEntry {
                    fd,
                    id: id(ofd),
                    cloexec,
                    since_ns: 0,
                    via: Op::Seed,
                }),
            );
        }
        t
    }

    fn snap(fds: &[(i32, u64, bool)]) -> BTreeMap<i32, (FdIdentity, bool)> {
        fds.iter()
            .map(|&(fd, ofd, cloexec)| (fd, (id(ofd), cloexec)))
            .collect()
    }

    #[test]
    fn differences_by_fd_open_file_and_cloexec() {
        let t = table(&[(0, 1, false), (3, 2, false), (4, 3, true)]);
        assert!(differences(&t, &snap(&[(0, 1, false), (3, 2, false), (4, 3, true)])).is_empty());
        let s = snap(&[(0, 1, false), (3, 9, false), (4, 3, false), (7, 4, false)]);
        assert_eq!(differences(&t, &s), BTreeSet::from([3, 4, 7]));
        assert_eq!(differences(&t, &snap(&[])), BTreeSet::from([0, 3, 4]));
    }

    #[test]
    fn a_difference_is_a_miss_only_when_it_persists_untouched() {
        let mut c = Checker::default();
        c.agreed(7, 100);
        assert_eq!(c.judge(7, 200, BTreeSet::new()), None);
        // Suspected at 300, confirmed at 400: the window starts at the last agreement.
        assert_eq!(c.judge(7, 300, BTreeSet::from([5])), None);
        assert_eq!(c.judge(7, 400, BTreeSet::from([5])), Some(200));
        c.agreed(7, 410);
        // An event on the fd between two checks clears it: a change on its way, not a miss.
        assert_eq!(c.judge(7, 500, BTreeSet::from([5, 6])), None);
        c.touch(7, &Change::Close { fd: 5 });
        c.touch(7, &Change::CloseRange { first: 6, last: 9 });
        assert_eq!(c.judge(7, 600, BTreeSet::from([5, 6])), None);
        // Another fd of the same process, or another process's event, does not clear it.
        c.touch(7, &Change::SetCloexec { fd: 4, on: true });
        c.touch(8, &Change::Close { fd: 5 });
        assert_eq!(c.judge(7, 700, BTreeSet::from([5])), Some(410));
        // A new difference is only suspected, and an agreement forgets old suspicions.
        assert_eq!(c.judge(7, 800, BTreeSet::from([9])), None);
        assert_eq!(c.judge(7, 900, BTreeSet::new()), None);
        assert_eq!(c.judge(7, 1000, BTreeSet::from([9])), None);
        c.touch(7, &Change::Exec);
        assert_eq!(c.judge(7, 1100, BTreeSet::from([9])), None);
    }

    #[test]
    fn rounds_take_turns_over_many_processes() {
        let mut c = Checker::default();
        let pids: Vec<u32> = (1..=PER_PERIOD as u32 + 10).collect();
        let first = c.round(pids.clone());
        assert_eq!(first, (1..=PER_PERIOD as u32).collect::<Vec<_>>());
        let second = c.round(pids.clone());
        assert_eq!(
            second[..10],
            (PER_PERIOD as u32 + 1..=PER_PERIOD as u32 + 10).collect::<Vec<_>>()[..]
        );
        assert_eq!(second[10], 1, "wraps around");
        assert_eq!(
            c.round(vec![3, 4]),
            vec![3, 4],
            "fewer than a round: every one"
        );
    }
}
