//! Per-process fd tables, kept exact by applying decoded kernel events in order.
//!
//! Every change yields [`FdRecord`]s (one per fd gained, lost or changed), which are what
//! `vmaudit watch` prints. Identities come from the table itself (dup, fork), from /proc
//! through a [`Resolver`] (new fds), or from the syscall's own arguments when /proc can no
//! longer be trusted for that fd.

use std::{
    collections::{BTreeMap, HashMap},
    io,
};

use super::event::{Change, Event, Gain};
pub use vmaudit_core::fd::{FdEntry, FdRecord, Op, Outcome, ProcTable};

use crate::procfs::{FdIdentity, O_CLOEXEC, ProcFs, Source, identity_from_syscall};

/// Where identities of fds come from: /proc in production, a fake in unit tests.
pub trait Resolver {
    fn identity(&self, pid: u32, fd: i32) -> io::Result<FdIdentity>;
    fn snapshot(&self, pid: u32) -> io::Result<BTreeMap<i32, FdIdentity>>;
}

impl Resolver for ProcFs {
    fn identity(&self, pid: u32, fd: i32) -> io::Result<FdIdentity> {
        ProcFs::identity(self, pid, fd)
    }
    fn snapshot(&self, pid: u32) -> io::Result<BTreeMap<i32, FdIdentity>> {
        ProcFs::snapshot(self, pid)
    }
}

/// The tables of every watched process.
pub struct Tables<R> {
    resolver: R,
    procs: HashMap<u32, ProcTable>,
    /// Identities by the name a syscall used, for this batch: a loop opening the same device
    /// costs one stat per batch, not one per open.
    path_cache: HashMap<String, FdIdentity>,
}

fn cloexec_of(id: &FdIdentity) -> bool {
    id.flags.is_some_and(|f| f & O_CLOEXEC != 0)
}

impl<R: Resolver> Tables<R> {
    pub fn new(resolver: R) -> Self {
        Self {
            resolver,
            procs: HashMap::new(),
            path_cache: HashMap::new(),
        }
    }

    /// Starts a batch of events: names may now point at other files.
    pub fn begin_batch(&mut self) {
        self.path_cache.clear();
    }

    fn syscall_identity(&mut self, path: &Option<String>) -> FdIdentity {
        let Some(p) = path else {
            return identity_from_syscall(None);
        };
        self.path_cache
            .entry(p.clone())
            .or_insert_with(|| identity_from_syscall(Some(p.clone())))
            .clone()
    }

    pub fn resolver(&self) -> &R {
        &self.resolver
    }

    pub fn get(&self, pid: u32) -> Option<&ProcTable> {
        self.procs.get(&pid)
    }

    /// Drops the table of a process that exited (its events are all applied).
    pub fn forget_exited(&mut self, pid: u32) {
        if self.procs.get(&pid).is_some_and(|t| t.exited) {
            self.procs.remove(&pid);
        }
    }

    pub fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.procs.keys().copied()
    }

    /// Whether every process ever watched has exited.
    pub fn all_exited(&self) -> bool {
        self.procs.values().all(|t| t.exited)
    }

    /// Starts a table from /proc. Returns the seed records.
    pub fn seed(&mut self, pid: u32) -> io::Result<Vec<FdRecord>> {
        let snap = self.resolver.snapshot(pid)?;
        let mut table = ProcTable::default();
        let mut out = Vec::new();
        for (fd, id) in snap {
            let entry = FdEntry {
                fd,
                cloexec: cloexec_of(&id),
                id,
                since_ns: 0,
                via: Op::Seed,
            };
            out.push(record(
                0,
                pid,
                pid,
                Op::Seed,
                "proc",
                Some(fd),
                Some(&entry),
            ));
            table.fds.insert(fd, entry);
        }
        self.procs.insert(pid, table);
        Ok(out)
    }

    /// Re-reads a table from /proc after events were lost, and reports the difference.
    pub fn resync(&mut self, pid: u32, ts: u64) -> Vec<FdRecord> {
        if self.procs.get(&pid).is_none_or(|t| t.exited) {
            return Vec::new();
        }
        // An error means the process is gone; its exit event may have been among the lost.
        let (snap, gone) = match self.resolver.snapshot(pid) {
            Ok(s) => (s, false),
            Err(_) => (BTreeMap::new(), true),
        };
        let table = self.table(pid);
        let mut out = Vec::new();
        let stale: Vec<i32> = table
            .fds
            .iter()
            .filter(|(fd, e)| snap.get(fd).is_none_or(|id| !id.same_inode(&e.id)))
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            if let Some(e) = table.fds.remove(&fd) {
                out.push(record(
                    ts,
                    pid,
                    pid,
                    Op::ResyncRemove,
                    "resync",
                    Some(fd),
                    Some(&e),
                ));
            }
        }
        for (fd, id) in snap {
            if table.fds.contains_key(&fd) {
                continue;
            }
            let entry = FdEntry {
                fd,
                cloexec: cloexec_of(&id),
                id,
                since_ns: ts,
                via: Op::ResyncAdd,
            };
            out.push(record(
                ts,
                pid,
                pid,
                Op::ResyncAdd,
                "resync",
                Some(fd),
                Some(&entry),
            ));
            table.fds.insert(fd, entry);
        }
        table.exited = gone;
        out
    }

    /// Applies one event. `stale(fd)` says whether a later event already known to the caller
    /// touches `fd` in this process, so /proc no longer shows what this event gained.
    pub fn apply(&mut self, ev: &Event, stale: &dyn Fn(i32) -> bool) -> Vec<FdRecord> {
        let mut out = Vec::new();
        for change in &ev.changes {
            self.apply_one(ev, change, stale, &mut out);
        }
        out
    }

    fn apply_one(
        &mut self,
        ev: &Event,
        change: &Change,
        stale: &dyn Fn(i32) -> bool,
        out: &mut Vec<FdRecord>,
    ) {
        let (pid, tid, ts, sys) = (ev.tgid, ev.tid, ev.ts_ns, ev.source);
        match change {
            Change::Gain {
                fd,
                how,
                cloexec,
                from,
                path,
            } => {
                let via = match how {
                    Gain::Open => Op::Open,
                    Gain::Dup => Op::Dup,
                    Gain::RecvFd => Op::RecvFd,
                    Gain::PidfdGetfd => Op::PidfdGetfd,
                    Gain::New => Op::New,
                };
                let copied =
                    from.and_then(|src| self.table(pid).fds.get(&src))
                        .map(|e| FdIdentity {
                            source: Source::Table,
                            ..e.id.clone()
                        });
                let proc_id = match copied {
                    None if !stale(*fd) => self.resolver.identity(pid, *fd).ok(),
                    _ => None,
                };
                let id = match copied.or(proc_id) {
                    Some(id) => id,
                    None => self.syscall_identity(path),
                };
                let cloexec = cloexec.unwrap_or_else(|| cloexec_of(&id));
                let table = self.table(pid);
                if let Some(old) = table.fds.remove(fd) {
                    out.push(record(
                        ts,
                        pid,
                        tid,
                        Op::Replaced,
                        sys,
                        Some(*fd),
                        Some(&old),
                    ));
                }
                let entry = FdEntry {
                    fd: *fd,
                    id,
                    cloexec,
                    since_ns: ts,
                    via,
                };
                let mut r = record(ts, pid, tid, via, sys, Some(*fd), Some(&entry));
                r.from_fd = *from;
                out.push(r);
                table.fds.insert(*fd, entry);
            }
            Change::Close { fd } => {
                let old = self.table(pid).fds.remove(fd);
                out.push(record(
                    ts,
                    pid,
                    tid,
                    Op::Close,
                    sys,
                    Some(*fd),
                    old.as_ref(),
                ));
            }
            Change::CloseRange { first, last } => {
                self.remove_where(pid, tid, ts, sys, Op::CloseRange, out, |fd, _| {
                    in_range(fd, *first, *last)
                });
            }
            Change::SetCloexec { fd, on } => {
                let op = if *on { Op::CloexecOn } else { Op::CloexecOff };
                let table = self.table(pid);
                let entry = table.fds.get_mut(fd).map(|e| {
                    e.cloexec = *on;
                    e.clone()
                });
                out.push(record(ts, pid, tid, op, sys, Some(*fd), entry.as_ref()));
            }
            Change::CloexecRange { first, last } => {
                for (fd, e) in self.table(pid).fds.iter_mut() {
                    if in_range(*fd, *first, *last) {
                        e.cloexec = true;
                        out.push(record(ts, pid, tid, Op::CloexecOn, sys, Some(*fd), Some(e)));
                    }
                }
            }
            Change::Fork { child, .. } => {
                let parent = self.table(pid).fds.clone();
                let mut table = ProcTable::default();
                for (fd, mut e) in parent {
                    e.id.source = Source::Table;
                    e.since_ns = ts;
                    e.via = Op::Inherit;
                    out.push(record(
                        ts,
                        *child,
                        *child,
                        Op::Inherit,
                        sys,
                        Some(fd),
                        Some(&e),
                    ));
                    table.fds.insert(fd, e);
                }
                self.procs.insert(*child, table);
            }
            Change::Exec { .. } => {
                self.remove_where(pid, tid, ts, sys, Op::ExecCloexec, out, |_, e| e.cloexec);
            }
            Change::Exit => {
                self.remove_where(pid, tid, ts, sys, Op::Exit, out, |_, _| true);
                self.table(pid).exited = true;
            }
            Change::Failed { errno, fd, path } => {
                let op = failed_op(sys);
                let mut r = record(ts, pid, tid, op, sys, *fd, None);
                r.result = Outcome::from_errno(*errno);
                r.file = path.clone().map(|p| identity_from_syscall(Some(p)));
                out.push(r);
            }
            Change::SendFd { fd } => {
                let entry = self.table(pid).fds.get(fd).cloned();
                out.push(record(
                    ts,
                    pid,
                    tid,
                    Op::SendFd,
                    sys,
                    Some(*fd),
                    entry.as_ref(),
                ));
            }
            Change::Nothing => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn remove_where(
        &mut self,
        pid: u32,
        tid: u32,
        ts: u64,
        sys: &'static str,
        op: Op,
        out: &mut Vec<FdRecord>,
        pred: impl Fn(i32, &FdEntry) -> bool,
    ) {
        let table = self.table(pid);
        let gone: Vec<i32> = table
            .fds
            .iter()
            .filter(|(fd, e)| pred(**fd, e))
            .map(|(fd, _)| *fd)
            .collect();
        for fd in gone {
            if let Some(e) = table.fds.remove(&fd) {
                out.push(record(ts, pid, tid, op, sys, Some(fd), Some(&e)));
            }
        }
    }

    fn table(&mut self, pid: u32) -> &mut ProcTable {
        self.procs.entry(pid).or_default()
    }
}

fn in_range(fd: i32, first: u32, last: u32) -> bool {
    fd >= 0 && (fd as u32) >= first && (fd as u32) <= last
}

fn failed_op(syscall: &str) -> Op {
    match syscall {
        "open" | "openat" | "openat2" | "creat" | "open_by_handle_at" => Op::Open,
        "dup" | "dup2" | "dup3" | "fcntl" => Op::Dup,
        "close" => Op::Close,
        "close_range" => Op::CloseRange,
        "pidfd_getfd" => Op::PidfdGetfd,
        _ => Op::New,
    }
}

fn record(
    ts: u64,
    pid: u32,
    tid: u32,
    op: Op,
    syscall: &'static str,
    fd: Option<i32>,
    entry: Option<&FdEntry>,
) -> FdRecord {
    FdRecord {
        ty: "fd",
        ts,
        pid,
        tid,
        op,
        syscall,
        fd,
        result: Outcome::Ok,
        cloexec: entry.map(|e| e.cloexec),
        from_fd: None,
        file: entry.map(|e| e.id.clone()),
    }
}

/// For a batch of events: whether an event later in the batch touches `fd` of `pid` (closes,
/// replaces, or may close it), so that /proc, read now, no longer shows what an earlier event
/// gained. Built once per batch; each question is answered in O(1) (plus the batch's
/// close_range calls, which are few).
#[derive(Debug, Default)]
pub struct Lookahead {
    /// (pid, fd) -> index of the last event that touches that fd.
    last_touch: HashMap<(u32, i32), usize>,
    /// pid -> index of its last exec or exit (which may close any fd).
    last_all: HashMap<u32, usize>,
    /// (index, pid, first, last) of each close_range.
    ranges: Vec<(usize, u32, u32, u32)>,
}

impl Lookahead {
    pub fn new(events: &[Event]) -> Self {
        let mut la = Self::default();
        for (i, e) in events.iter().enumerate() {
            for c in &e.changes {
                match c {
                    Change::Gain { fd, .. } | Change::Close { fd } => {
                        la.last_touch.insert((e.tgid, *fd), i);
                    }
                    Change::CloseRange { first, last } => {
                        la.ranges.push((i, e.tgid, *first, *last))
                    }
                    Change::Exec { .. } | Change::Exit => {
                        la.last_all.insert(e.tgid, i);
                    }
                    _ => {}
                }
            }
        }
        la
    }

    /// Whether an event after index `i` touches `fd` of `pid`.
    pub fn touched_after(&self, i: usize, pid: u32, fd: i32) -> bool {
        self.last_touch.get(&(pid, fd)).is_some_and(|&j| j > i)
            || self.last_all.get(&pid).is_some_and(|&j| j > i)
            || self
                .ranges
                .iter()
                .any(|&(j, p, first, last)| j > i && p == pid && in_range(fd, first, last))
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::procfs::{DevNum, FileKind};

    /// A /proc stand-in: what each (pid, fd) looks like "now".
    #[derive(Default)]
    struct Fake(RefCell<HashMap<(u32, i32), FdIdentity>>);

    impl Fake {
        fn put(&self, pid: u32, fd: i32, path: &str, ino: u64) {
            self.0.borrow_mut().insert((pid, fd), ident(path, ino));
        }
        fn drop_fd(&self, pid: u32, fd: i32) {
            self.0.borrow_mut().remove(&(pid, fd));
        }
    }

    fn ident(path: &str, ino: u64) -> FdIdentity {
        FdIdentity {
            path: path.into(),
            kind: FileKind::Char,
            rdev: Some(DevNum {
                major: 10,
                minor: 200,
            }),
            dev: Some(DevNum { major: 0, minor: 5 }),
            ino: Some(ino),
            flags: Some(0o2),
            iface: None,
            source: Source::Proc,
        }
    }

    impl Resolver for &Fake {
        fn identity(&self, pid: u32, fd: i32) -> io::Result<FdIdentity> {
            self.0
                .borrow()
                .get(&(pid, fd))
                .cloned()
                .ok_or_else(|| io::ErrorKind::NotFound.into())
        }
        fn snapshot(&self, pid: u32) -> io::Result<BTreeMap<i32, FdIdentity>> {
            let m = self.0.borrow();
            if !m.keys().any(|(p, _)| *p == pid) {
                return Err(io::ErrorKind::NotFound.into());
            }
            Ok(m.iter()
                .filter(|((p, _), _)| *p == pid)
                .map(|((_, f), id)| (*f, id.clone()))
                .collect())
        }
    }

    fn ev(pid: u32, source: &'static str, changes: Vec<Change>) -> Event {
        Event {
            ts_ns: 100,
            tgid: pid,
            tid: pid,
            source,
            changes,
        }
    }

    fn gain(fd: i32, how: Gain, cloexec: Option<bool>, from: Option<i32>) -> Change {
        Change::Gain {
            fd,
            how,
            cloexec,
            from,
            path: Some("/dev/net/tun".into()),
        }
    }

    fn fds(t: &Tables<&Fake>, pid: u32) -> Vec<i32> {
        t.get(pid).unwrap().fds.keys().copied().collect()
    }

    const NEVER: &dyn Fn(i32) -> bool = &|_| false;

    #[test]
    fn open_dup_close_exec_exit() {
        let fake = Fake::default();
        fake.put(1, 0, "/dev/null", 1);
        let mut t = Tables::new(&fake);
        assert_eq!(t.seed(1).unwrap().len(), 1);

        fake.put(1, 3, "/dev/net/tun", 9);
        let r = t.apply(
            &ev(1, "openat", vec![gain(3, Gain::Open, Some(false), None)]),
            NEVER,
        );
        assert_eq!(r[0].op, Op::Open);
        assert_eq!(r[0].file.as_ref().unwrap().source, Source::Proc);

        // dup takes the source's identity from the table, whatever /proc says.
        let r = t.apply(
            &ev(1, "fcntl", vec![gain(4, Gain::Dup, Some(true), Some(3))]),
            NEVER,
        );
        assert_eq!(r[0].from_fd, Some(3));
        assert_eq!(r[0].file.as_ref().unwrap().ino, Some(9));
        assert_eq!(r[0].file.as_ref().unwrap().source, Source::Table);

        // dup2 onto an open fd reports the implicit close first.
        let r = t.apply(
            &ev(1, "dup2", vec![gain(0, Gain::Dup, Some(false), Some(3))]),
            NEVER,
        );
        assert_eq!(
            r.iter().map(|r| r.op).collect::<Vec<_>>(),
            vec![Op::Replaced, Op::Dup]
        );
        assert_eq!(fds(&t, 1), vec![0, 3, 4]);

        let r = t.apply(&ev(1, "exec", vec![Change::Exec { filename: None }]), NEVER);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].op, r[0].fd), (Op::ExecCloexec, Some(4)));
        assert_eq!(fds(&t, 1), vec![0, 3]);

        let r = t.apply(&ev(1, "close", vec![Change::Close { fd: 3 }]), NEVER);
        assert_eq!(r[0].file.as_ref().unwrap().path, "/dev/net/tun");

        let r = t.apply(&ev(1, "exit", vec![Change::Exit]), NEVER);
        assert_eq!(r.len(), 1);
        assert!(t.get(1).unwrap().exited && t.all_exited());
    }

    #[test]
    fn stale_gain_uses_syscall_name_not_proc() {
        let fake = Fake::default();
        fake.put(1, 0, "/dev/null", 1);
        let mut t = Tables::new(&fake);
        t.seed(1).unwrap();
        // /proc shows fd 3 as something else already (closed and reused).
        fake.put(1, 3, "/etc/passwd", 77);
        let r = t.apply(
            &ev(1, "openat", vec![gain(3, Gain::Open, Some(false), None)]),
            &|fd| fd == 3,
        );
        let f = r[0].file.as_ref().unwrap();
        assert_eq!(
            (f.path.as_str(), f.source),
            ("/dev/net/tun", Source::Syscall)
        );
    }

    #[test]
    fn ranges_cloexec_and_fork() {
        let fake = Fake::default();
        for fd in 0..6 {
            fake.put(1, fd, "/dev/null", fd as u64);
        }
        let mut t = Tables::new(&fake);
        t.seed(1).unwrap();
        t.apply(
            &ev(1, "fcntl", vec![Change::SetCloexec { fd: 1, on: true }]),
            NEVER,
        );
        let r = t.apply(
            &ev(
                1,
                "close_range",
                vec![Change::CloexecRange { first: 4, last: 4 }],
            ),
            NEVER,
        );
        assert_eq!(r.len(), 1);
        let r = t.apply(
            &ev(
                1,
                "fork",
                vec![Change::Fork {
                    child: 2,
                    clone_flags: 17,
                }],
            ),
            NEVER,
        );
        assert_eq!(r.len(), 6);
        assert!(r.iter().all(|r| r.pid == 2 && r.op == Op::Inherit));
        let r = t.apply(
            &ev(
                2,
                "close_range",
                vec![Change::CloseRange {
                    first: 3,
                    last: u32::MAX,
                }],
            ),
            NEVER,
        );
        assert_eq!(
            r.iter().map(|r| r.fd.unwrap()).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        let r = t.apply(&ev(2, "exec", vec![Change::Exec { filename: None }]), NEVER);
        assert_eq!(r.iter().map(|r| r.fd.unwrap()).collect::<Vec<_>>(), vec![1]);
        assert_eq!(fds(&t, 2), vec![0, 2]);
        assert_eq!(fds(&t, 1).len(), 6, "the parent's table is its own");
    }

    #[test]
    fn failed_attempts_are_reported_and_change_nothing() {
        let fake = Fake::default();
        fake.put(1, 0, "/dev/null", 1);
        let mut t = Tables::new(&fake);
        t.seed(1).unwrap();
        let r = t.apply(
            &ev(
                1,
                "openat",
                vec![Change::Failed {
                    errno: libc::ENOENT,
                    fd: None,
                    path: Some("/nope".into()),
                }],
            ),
            NEVER,
        );
        assert_eq!(
            (r[0].op, r[0].result.to_string().as_str()),
            (Op::Open, "ENOENT")
        );
        assert_eq!(r[0].file.as_ref().unwrap().path, "/nope");
        assert_eq!(fds(&t, 1), vec![0]);
    }

    #[test]
    fn resync_reports_the_gap_both_ways() {
        let fake = Fake::default();
        fake.put(1, 0, "/dev/null", 1);
        fake.put(1, 5, "/dev/null", 5);
        let mut t = Tables::new(&fake);
        t.seed(1).unwrap();
        // Lost: close(5), open(7), and fd 0 replaced by another file.
        fake.drop_fd(1, 5);
        fake.put(1, 7, "/dev/net/tun", 7);
        fake.put(1, 0, "/dev/zero", 2);
        let r = t.resync(1, 500);
        let mut got: Vec<(Op, i32)> = r.iter().map(|r| (r.op, r.fd.unwrap())).collect();
        got.sort_by_key(|(_, fd)| *fd);
        assert_eq!(
            got,
            vec![
                (Op::ResyncRemove, 0),
                (Op::ResyncAdd, 0),
                (Op::ResyncRemove, 5),
                (Op::ResyncAdd, 7)
            ]
        );
        assert_eq!(fds(&t, 1), vec![0, 7]);
    }

    #[test]
    fn lookahead_sees_later_closes() {
        let batch = vec![
            ev(1, "openat", vec![gain(3, Gain::Open, Some(false), None)]),
            ev(1, "close", vec![Change::Close { fd: 3 }]),
            ev(2, "close", vec![Change::Close { fd: 4 }]),
            ev(
                1,
                "close_range",
                vec![Change::CloseRange {
                    first: 10,
                    last: 20,
                }],
            ),
            ev(3, "exit", vec![Change::Exit]),
        ];
        let la = Lookahead::new(&batch);
        assert!(la.touched_after(0, 1, 3));
        assert!(!la.touched_after(1, 1, 3), "the close is not after itself");
        assert!(!la.touched_after(0, 1, 4), "another process's fd 4");
        assert!(la.touched_after(0, 1, 15) && !la.touched_after(0, 1, 21));
        assert!(la.touched_after(0, 3, 99), "exit may close anything");
        assert!(!la.touched_after(4, 3, 99));
    }
}
