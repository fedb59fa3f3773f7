//! Per-process fd tables, kept exact by applying decoded kernel events in order.
//!
//! Every change yields [`FdRecord`]s (one per fd gained, lost or changed), which are what
//! `vmaudit watch` prints. A new fd's identity is the file the kernel program read from the
//! task's fd table at the syscall's exit; a table's seed and its resyncs come from the kernel's
//! task_file iterator. /proc (through a [`Resolver`]) only names things for people: the path
//! of a file that is not a device, an anonymous inode's type, a tun/tap fd's interface.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
};

use compact_str::CompactString;
use vmaudit_common::{FileInfo, kdev_split, nr};

use super::event::{Change, Event, Gain, KernelFile};
pub use vmaudit_core::fd::{FdEntry, FdRecord, Op, Outcome, ProcTable};

use crate::procfs::{
    DevNum, FdIdentity, FileKind, O_CLOEXEC, ProcFs, Source, identity_from_syscall,
};

/// Where identities of fds come from when the kernel does not give them (/proc in production,
/// a fake in unit tests), and names for people.
pub trait Resolver {
    fn identity(&self, pid: u32, fd: i32) -> io::Result<FdIdentity>;
    fn snapshot(&self, pid: u32) -> io::Result<BTreeMap<i32, FdIdentity>>;
    /// Fills in what people read and the kernel program did not give (`path`, `iface`) of fd
    /// `fd` of `pid`, which holds the file `id` describes now.
    fn name(&self, _pid: u32, _fd: i32, _id: &mut FdIdentity) {}
}

impl Resolver for ProcFs {
    fn identity(&self, pid: u32, fd: i32) -> io::Result<FdIdentity> {
        ProcFs::identity(self, pid, fd)
    }
    fn snapshot(&self, pid: u32) -> io::Result<BTreeMap<i32, FdIdentity>> {
        ProcFs::snapshot(self, pid)
    }
    fn name(&self, pid: u32, fd: i32, id: &mut FdIdentity) {
        ProcFs::name(self, pid, fd, id)
    }
}

/// An fd's identity from what the kernel program read (`path`: a device's, from its dentries).
pub fn kernel_identity(info: &FileInfo, path: Option<String>, iface: Option<String>) -> FdIdentity {
    let name = match FileKind::of_mode(info.mode as u32) {
        FileKind::Fifo => compact_str::format_compact!("pipe:[{}]", info.ino),
        FileKind::Socket => compact_str::format_compact!("socket:[{}]", info.ino),
        _ => path.map(CompactString::from).unwrap_or_default(),
    };
    named_kernel_identity(info, name, iface)
}

/// [`kernel_identity`] with the name already known (a dup's, from the fd it copies).
fn named_kernel_identity(
    info: &FileInfo,
    name: CompactString,
    iface: Option<String>,
) -> FdIdentity {
    let kind = FileKind::of_mode(info.mode as u32);
    let dev = |d: u32| {
        let (major, minor) = kdev_split(d);
        DevNum { major, minor }
    };
    FdIdentity {
        path: name,
        kind,
        rdev: matches!(kind, FileKind::Char | FileKind::Block).then(|| dev(info.rdev)),
        dev: Some(dev(info.dev)),
        ino: Some(info.ino),
        flags: Some(info.flags),
        mode: Some(info.mode as u32),
        ofd: Some(info.ofd),
        iface,
        source: Source::Kernel,
    }
}

/// The tables of every watched process.
pub struct Tables<R> {
    resolver: R,
    procs: BTreeMap<u32, ProcTable>,
    /// Processes that share one fd table (a child cloned with CLONE_FILES), each mapped to
    /// every member of its group, itself included. A change any member makes is applied to
    /// each member's table, so that each reads as the one table the kernel has.
    peers: BTreeMap<u32, BTreeSet<u32>>,
}

/// Whether a change made through one member of a shared table is a change of the others'.
fn shared_change(c: &Change) -> bool {
    matches!(
        c,
        Change::Gain { .. }
            | Change::Close { .. }
            | Change::CloseRange { .. }
            | Change::SetCloexec { .. }
            | Change::CloexecRange { .. }
            | Change::Iface { .. }
    )
}

fn cloexec_of(id: &FdIdentity) -> bool {
    id.flags.is_some_and(|f| f & O_CLOEXEC != 0)
}

impl<R: Resolver> Tables<R> {
    pub fn new(resolver: R) -> Self {
        Self {
            resolver,
            procs: BTreeMap::new(),
            peers: BTreeMap::new(),
        }
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

    /// Starts a table from the resolver's snapshot (the tests' fake table). Returns the seed
    /// records.
    #[cfg(test)]
    pub fn seed(&mut self, pid: u32) -> io::Result<Vec<FdRecord>> {
        let snap = self.resolver.snapshot(pid)?;
        let snap = snap
            .into_iter()
            .map(|(fd, id)| {
                let cloexec = cloexec_of(&id);
                (fd, (id, cloexec))
            })
            .collect();
        Ok(self.seed_from(pid, snap))
    }

    /// Starts a table from a kernel snapshot (fd -> identity, close-on-exec). Returns the seed
    /// records.
    pub fn seed_from(
        &mut self,
        pid: u32,
        snap: BTreeMap<i32, (FdIdentity, bool)>,
    ) -> Vec<FdRecord> {
        let mut table = ProcTable::default();
        let mut out = Vec::new();
        for (fd, (mut id, cloexec)) in snap {
            self.resolver.name(pid, fd, &mut id);
            let entry = FdEntry {
                fd,
                cloexec,
                id,
                since_ns: 0,
                via: Op::Seed,
            };
            out.push(record(
                0,
                pid,
                pid,
                Op::Seed,
                "iter",
                Some(fd),
                Some(&entry),
            ));
            table.fds.insert(fd, Box::new(entry));
        }
        self.procs.insert(pid, table);
        out
    }

    /// Re-reads a table from /proc after events were lost, and reports the difference.
    pub fn resync(&mut self, pid: u32, ts: u64) -> Vec<FdRecord> {
        if self.procs.get(&pid).is_none_or(|t| t.exited) {
            return Vec::new();
        }
        // An error means the process is gone; its exit event may have been among the lost.
        let snap = self.resolver.snapshot(pid).ok().map(|s| {
            s.into_iter()
                .map(|(fd, id)| {
                    let cloexec = cloexec_of(&id);
                    (fd, (id, cloexec))
                })
                .collect()
        });
        self.resync_from(pid, ts, snap)
    }

    /// Makes a table what a kernel snapshot says (None: the process is gone), and reports the
    /// difference: fds gone or holding another open file (`resync_remove`), fds new or
    /// replaced (`resync_add`).
    pub fn resync_from(
        &mut self,
        pid: u32,
        ts: u64,
        snap: Option<BTreeMap<i32, (FdIdentity, bool)>>,
    ) -> Vec<FdRecord> {
        if self.procs.get(&pid).is_none_or(|t| t.exited) {
            return Vec::new();
        }
        let gone = snap.is_none();
        let mut snap = snap.unwrap_or_default();
        for (fd, (id, _)) in snap.iter_mut() {
            if self
                .procs
                .get(&pid)
                .and_then(|t| t.fds.get(fd))
                .is_none_or(|e| !e.id.same_inode(id))
            {
                self.resolver.name(pid, *fd, id);
            }
        }
        let table = self.table(pid);
        let mut out = Vec::new();
        let stale: Vec<i32> = table
            .fds
            .iter()
            .filter(|(fd, e)| snap.get(fd).is_none_or(|(id, _)| !id.same_inode(&e.id)))
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
        for (fd, (id, cloexec)) in snap {
            if let Some(e) = table.fds.get_mut(&fd) {
                e.cloexec = cloexec;
                continue;
            }
            let entry = FdEntry {
                fd,
                cloexec,
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
            table.fds.insert(fd, Box::new(entry));
        }
        table.exited = gone;
        out
    }

    /// The other processes that share `pid`'s table.
    pub fn peers(&self, pid: u32) -> impl Iterator<Item = u32> + '_ {
        self.peers
            .get(&pid)
            .into_iter()
            .flatten()
            .copied()
            .filter(move |p| *p != pid)
    }

    /// `child` shares `parent`'s table from now on.
    fn join(&mut self, parent: u32, child: u32) {
        let mut group = self.peers.get(&parent).cloned().unwrap_or_default();
        group.extend([parent, child]);
        for m in &group {
            self.peers.insert(*m, group.clone());
        }
    }

    /// `pid` has a table of its own from now on (unshare, exec, exit); the others keep theirs.
    fn leave(&mut self, pid: u32) {
        let Some(mut group) = self.peers.remove(&pid) else {
            return;
        };
        group.remove(&pid);
        for m in &group {
            if group.len() == 1 {
                self.peers.remove(m);
            } else {
                self.peers.insert(*m, group.clone());
            }
        }
    }

    /// Applies one event to the table of its process (and of every process sharing it); the
    /// records go to `out`, each under the process whose table changed.
    pub fn apply(&mut self, ev: &Event, out: &mut Vec<FdRecord>) {
        if ev.unshare || matches!(ev.change, Change::Unshare | Change::Exec | Change::Exit) {
            self.leave(ev.tgid);
        }
        self.apply_one(ev, out);
        if shared_change(&ev.change) && self.peers.contains_key(&ev.tgid) {
            let peers: Vec<u32> = self.peers(ev.tgid).collect();
            for peer in peers {
                let e = Event {
                    tgid: peer,
                    ..ev.clone()
                };
                self.apply_one(&e, out);
            }
        }
    }

    fn apply_one(&mut self, ev: &Event, out: &mut Vec<FdRecord>) {
        let (pid, tid, ts, sys) = (ev.tgid, ev.tid, ev.ts_ns, ev.source);
        match &ev.change {
            Change::Gain {
                fd,
                how,
                cloexec,
                from,
                file,
            } => self.gain(ev, *fd, *how, *cloexec, *from, file.as_ref(), out),
            Change::Close { fd } => {
                let old = self.table(pid).fds.remove(fd);
                out.push(record_of_removed(
                    ts,
                    pid,
                    tid,
                    Op::Close,
                    sys,
                    Some(*fd),
                    old,
                ));
            }
            Change::CloseRange { first, last } => {
                self.remove_where(pid, tid, ts, sys, Op::CloseRange, out, |fd, _| {
                    in_range(fd, *first, *last)
                });
            }
            Change::SetCloexec { fd, on } => {
                let op = if *on { Op::CloexecOn } else { Op::CloexecOff };
                let entry = self.table(pid).fds.get_mut(fd).map(|e| {
                    e.cloexec = *on;
                    &**e
                });
                out.push(record(ts, pid, tid, op, sys, Some(*fd), entry));
            }
            Change::CloexecRange { first, last } => {
                for (fd, e) in self.table(pid).fds.iter_mut() {
                    if in_range(*fd, *first, *last) {
                        e.cloexec = true;
                        out.push(record(ts, pid, tid, Op::CloexecOn, sys, Some(*fd), Some(e)));
                    }
                }
            }
            Change::Fork { child, clone_flags } => {
                if clone_flags & nr::CLONE_FILES != 0 {
                    self.join(pid, *child);
                }
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
            Change::Exec => {
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
                let entry = self.table(pid).fds.get(fd).map(Box::as_ref);
                out.push(record(ts, pid, tid, Op::SendFd, sys, Some(*fd), entry));
            }
            // The watcher checks the table against the kernel's; nothing to apply here.
            Change::Unseen { .. } => {}
            // `apply` has made the table the process's own; its fds stay as they are.
            Change::Unshare => {}
            Change::Iface { fd, name } => {
                if let Some(e) = self.table(pid).fds.get_mut(fd) {
                    e.id.iface = name.clone();
                }
            }
            // The watcher applies it as a gain of the target process.
            Change::AddFd { .. } => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn gain(
        &mut self,
        ev: &Event,
        fd: i32,
        how: Gain,
        cloexec: bool,
        from: Option<i32>,
        file: Option<&KernelFile>,
        out: &mut Vec<FdRecord>,
    ) {
        let (pid, tid, ts, sys) = (ev.tgid, ev.tid, ev.ts_ns, ev.source);
        let via = match how {
            Gain::Open => Op::Open,
            Gain::Dup => Op::Dup,
            Gain::RecvFd => Op::RecvFd,
            Gain::PidfdGetfd => Op::PidfdGetfd,
            Gain::New => Op::New,
            Gain::AddFd => Op::Addfd,
        };
        let source_entry = from.and_then(|src| self.table(pid).fds.get(&src));
        let id = match file {
            Some(f) => {
                // A dup shares the open file: its names are those already known.
                match source_entry.filter(|e| e.id.ofd == Some(f.info.ofd)) {
                    Some(e) => {
                        named_kernel_identity(&f.info, e.id.path.clone(), e.id.iface.clone())
                    }
                    None => {
                        let mut id = kernel_identity(&f.info, f.path.clone(), f.iface.clone());
                        self.resolver.name(pid, fd, &mut id);
                        id
                    }
                }
            }
            // The fd was closed by another thread before the program read it: a close event
            // follows. A dup's source still says what it was.
            None => source_entry.map_or_else(
                || FdIdentity::named("?", FileKind::Unknown, Source::Kernel),
                |e| FdIdentity {
                    source: Source::Table,
                    ..e.id.clone()
                },
            ),
        };
        let table = self.table(pid);
        if let Some(old) = table.fds.remove(&fd) {
            out.push(record_of_removed(
                ts,
                pid,
                tid,
                Op::Replaced,
                sys,
                Some(fd),
                Some(old),
            ));
        }
        let entry = Box::new(FdEntry {
            fd,
            id,
            cloexec,
            since_ns: ts,
            via,
        });
        let mut r = record(ts, pid, tid, via, sys, Some(fd), Some(&entry));
        r.from_fd = from;
        out.push(r);
        table.fds.insert(fd, entry);
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
                out.push(record_of_removed(ts, pid, tid, op, sys, Some(fd), Some(e)));
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

/// [`record`] of an entry the table no longer holds: its identity moves into the record
/// rather than being copied (one allocation less per close).
fn record_of_removed(
    ts: u64,
    pid: u32,
    tid: u32,
    op: Op,
    syscall: &'static str,
    fd: Option<i32>,
    entry: Option<Box<FdEntry>>,
) -> FdRecord {
    let cloexec = entry.as_ref().map(|e| e.cloexec);
    FdRecord {
        cloexec,
        file: entry.map(|e| e.id),
        ..record(ts, pid, tid, op, syscall, fd, None)
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::HashMap};

    use super::*;

    /// A /proc stand-in: what each (pid, fd) looks like "now".
    #[derive(Default)]
    struct Fake(RefCell<HashMap<(u32, i32), FdIdentity>>);

    impl Fake {
        fn put(&self, pid: u32, fd: i32, path: &str, ino: u64) {
            self.0.borrow_mut().insert((pid, fd), ident(path, ino));
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
            mode: None,
            ofd: None,
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
        fn name(&self, pid: u32, fd: i32, id: &mut FdIdentity) {
            if id.path.is_empty()
                && let Some(p) = self.0.borrow().get(&(pid, fd))
            {
                id.path = p.path.clone();
            }
        }
    }

    fn ev(pid: u32, source: &'static str, change: Change) -> Event {
        Event {
            ts_ns: 100,
            tgid: pid,
            tid: pid,
            source,
            change,
            unshare: false,
        }
    }

    /// A file as the kernel program reads it: a character device 10:200 unless `mode` says.
    fn kfile(ino: u64, ofd: u64, mode: u16, path: Option<&str>) -> KernelFile {
        KernelFile {
            info: FileInfo {
                ino,
                ofd,
                rdev: 10 << 20 | 200,
                dev: 5,
                flags: 2,
                mode,
                _pad: 0,
            },
            path: path.map(str::to_owned),
            iface: None,
        }
    }

    const CHR: u16 = 0o020666;

    fn gain(fd: i32, how: Gain, cloexec: bool, from: Option<i32>, file: KernelFile) -> Change {
        Change::Gain {
            fd,
            how,
            cloexec,
            from,
            file: Some(file),
        }
    }

    fn apply(t: &mut Tables<&Fake>, e: Event) -> Vec<FdRecord> {
        let mut out = Vec::new();
        t.apply(&e, &mut out);
        out
    }

    fn fds(t: &Tables<&Fake>, pid: u32) -> Vec<i32> {
        t.get(pid).unwrap().fds.keys().copied().collect()
    }

    #[test]
    fn open_dup_close_exec_exit_from_kernel_files() {
        let fake = Fake::default();
        fake.put(1, 0, "/dev/null", 1);
        let mut t = Tables::new(&fake);
        assert_eq!(t.seed(1).unwrap().len(), 1);

        let tun = kfile(9, 0xa1, CHR, Some("/dev/net/tun"));
        let r = apply(
            &mut t,
            ev(1, "openat", gain(3, Gain::Open, false, None, tun.clone())),
        );
        assert_eq!(r[0].op, Op::Open);
        let f = r[0].file.as_ref().unwrap();
        assert_eq!(
            (f.source, f.path.as_str(), f.rdev, f.ofd),
            (
                Source::Kernel,
                "/dev/net/tun",
                Some(DevNum::new(10, 200)),
                Some(0xa1)
            )
        );

        // A dup holds the same open file: the kernel says so, the name comes from the table.
        let mut dup = tun.clone();
        dup.path = None;
        let r = apply(
            &mut t,
            ev(1, "fcntl", gain(4, Gain::Dup, true, Some(3), dup)),
        );
        assert_eq!(r[0].from_fd, Some(3));
        let f = r[0].file.as_ref().unwrap();
        assert_eq!(
            (f.path.as_str(), f.ofd, r[0].cloexec),
            ("/dev/net/tun", Some(0xa1), Some(true))
        );

        // dup2 onto an open fd reports the implicit close first.
        let r = apply(
            &mut t,
            ev(1, "dup2", gain(0, Gain::Dup, false, Some(3), tun.clone())),
        );
        assert_eq!(
            r.iter().map(|r| r.op).collect::<Vec<_>>(),
            vec![Op::Replaced, Op::Dup]
        );
        assert_eq!(fds(&t, 1), vec![0, 3, 4]);

        let r = apply(&mut t, ev(1, "exec", Change::Exec));
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].op, r[0].fd), (Op::ExecCloexec, Some(4)));

        let r = apply(&mut t, ev(1, "close", Change::Close { fd: 3 }));
        assert_eq!(r[0].file.as_ref().unwrap().path, "/dev/net/tun");

        let r = apply(&mut t, ev(1, "exit", Change::Exit));
        assert_eq!(r.len(), 1);
        assert!(t.get(1).unwrap().exited && t.all_exited());
    }

    #[test]
    fn pipes_and_sockets_are_named_from_the_kernel_and_others_by_the_resolver() {
        let fake = Fake::default();
        fake.put(1, 0, "/dev/null", 1);
        fake.put(1, 6, "/tmp/data", 77);
        let mut t = Tables::new(&fake);
        t.seed(1).unwrap();
        let r = apply(
            &mut t,
            ev(
                1,
                "pipe2",
                gain(5, Gain::New, true, None, kfile(42, 1, 0o010600, None)),
            ),
        );
        let f = r[0].file.as_ref().unwrap();
        assert_eq!(
            (f.kind, f.path.as_str(), f.rdev),
            (FileKind::Fifo, "pipe:[42]", None)
        );
        let r = apply(
            &mut t,
            ev(
                1,
                "openat",
                gain(6, Gain::Open, false, None, kfile(77, 2, 0o100600, None)),
            ),
        );
        assert_eq!(r[0].file.as_ref().unwrap().path, "/tmp/data");
        // The slot was empty again when the program looked: unknown, and a close follows.
        let r = apply(
            &mut t,
            ev(
                1,
                "openat",
                Change::Gain {
                    fd: 7,
                    how: Gain::Open,
                    cloexec: false,
                    from: None,
                    file: None,
                },
            ),
        );
        assert_eq!(r[0].file.as_ref().unwrap().path, "?");
    }

    #[test]
    fn ranges_cloexec_and_fork() {
        let fake = Fake::default();
        for fd in 0..6 {
            fake.put(1, fd, "/dev/null", fd as u64);
        }
        let mut t = Tables::new(&fake);
        t.seed(1).unwrap();
        apply(
            &mut t,
            ev(1, "fcntl", Change::SetCloexec { fd: 1, on: true }),
        );
        let r = apply(
            &mut t,
            ev(1, "close_range", Change::CloexecRange { first: 4, last: 4 }),
        );
        assert_eq!(r.len(), 1);
        let r = apply(
            &mut t,
            ev(
                1,
                "fork",
                Change::Fork {
                    child: 2,
                    clone_flags: 17,
                },
            ),
        );
        assert_eq!(r.len(), 6);
        assert!(r.iter().all(|r| r.pid == 2 && r.op == Op::Inherit));
        let r = apply(
            &mut t,
            ev(
                2,
                "close_range",
                Change::CloseRange {
                    first: 3,
                    last: u32::MAX,
                },
            ),
        );
        assert_eq!(
            r.iter().map(|r| r.fd.unwrap()).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        let r = apply(&mut t, ev(2, "exec", Change::Exec));
        assert_eq!(r.iter().map(|r| r.fd.unwrap()).collect::<Vec<_>>(), vec![1]);
        assert_eq!(fds(&t, 2), vec![0, 2]);
        assert_eq!(fds(&t, 1).len(), 6, "the parent's table is its own");
    }

    #[test]
    fn a_table_shared_by_clone_files_changes_for_every_member() {
        let fake = Fake::default();
        for fd in 0..3 {
            fake.put(1, fd, "/dev/null", fd as u64);
        }
        let mut t = Tables::new(&fake);
        t.seed(1).unwrap();
        let fork = |child| Change::Fork {
            child,
            clone_flags: nr::CLONE_FILES | 17,
        };
        apply(&mut t, ev(1, "clone", fork(2)));
        apply(&mut t, ev(2, "clone", fork(3)));
        // The child's open is the parent's and the grandchild's too, each under its own pid.
        let r = apply(
            &mut t,
            ev(
                2,
                "openat",
                gain(5, Gain::Open, false, None, kfile(9, 90, CHR, None)),
            ),
        );
        let mut pids: Vec<(u32, u32)> = r.iter().map(|r| (r.pid, r.tid)).collect();
        pids.sort();
        assert_eq!(pids, vec![(1, 2), (2, 2), (3, 2)]);
        assert!(r.iter().all(|r| r.op == Op::Open && r.fd == Some(5)));
        assert_eq!(fds(&t, 1), vec![0, 1, 2, 5]);
        // The grandchild unshares (close_range with CLOSE_RANGE_UNSHARE): its close is its own.
        let mut e = ev(3, "close_range", Change::CloseRange { first: 0, last: 2 });
        e.unshare = true;
        let r = apply(&mut t, e);
        assert!(r.iter().all(|r| r.pid == 3), "{r:?}");
        assert_eq!((fds(&t, 3), fds(&t, 1)), (vec![5], vec![0, 1, 2, 5]));
        // The child's exec gives it its own table: the parent keeps fd 5 and nothing is shared.
        apply(&mut t, ev(2, "exec", Change::Exec));
        assert_eq!(t.peers(1).count(), 0);
        let r = apply(&mut t, ev(1, "close", Change::Close { fd: 5 }));
        assert_eq!(r.len(), 1);
        assert_eq!((fds(&t, 1), fds(&t, 2)), (vec![0, 1, 2], vec![0, 1, 2, 5]));
        // A plain fork copies; unshare(CLONE_FILES) leaves a group.
        apply(&mut t, ev(1, "clone", fork(4)));
        apply(&mut t, ev(4, "unshare", Change::Unshare));
        let r = apply(&mut t, ev(4, "close", Change::Close { fd: 0 }));
        assert_eq!(r.len(), 1);
        assert_eq!(fds(&t, 1), vec![0, 1, 2]);
    }

    #[test]
    fn failed_attempts_are_reported_and_change_nothing() {
        let fake = Fake::default();
        fake.put(1, 0, "/dev/null", 1);
        let mut t = Tables::new(&fake);
        t.seed(1).unwrap();
        let r = apply(
            &mut t,
            ev(
                1,
                "openat",
                Change::Failed {
                    errno: libc::ENOENT,
                    fd: None,
                    path: Some("/nope".into()),
                },
            ),
        );
        assert_eq!(
            (r[0].op, r[0].result.to_string().as_str()),
            (Op::Open, "ENOENT")
        );
        assert_eq!(r[0].file.as_ref().unwrap().path, "/nope");
        assert_eq!(fds(&t, 1), vec![0]);
    }

    #[test]
    fn resync_reports_the_gap_both_ways_by_open_file() {
        let fake = Fake::default();
        let mut t = Tables::new(&fake);
        let k = |ino, ofd| {
            (
                kernel_identity(
                    &kfile(ino, ofd, CHR, Some("/dev/x")).info,
                    Some("/dev/x".into()),
                    None,
                ),
                false,
            )
        };
        t.seed_from(
            1,
            BTreeMap::from([(0, k(1, 10)), (5, k(5, 50)), (6, k(6, 60))]),
        );
        // Lost: close(5), open(7), fd 0 replaced by another open of the same inode, fd 6 made
        // close-on-exec.
        let mut six = k(6, 60);
        six.1 = true;
        let snap = BTreeMap::from([(0, k(1, 11)), (6, six), (7, k(7, 70))]);
        let r = t.resync_from(1, 500, Some(snap));
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
        assert_eq!(fds(&t, 1), vec![0, 6, 7]);
        assert!(t.get(1).unwrap().fds[&6].cloexec);
        // The process is gone: everything is removed and it is marked exited.
        let r = t.resync_from(1, 600, None);
        assert_eq!(r.len(), 3);
        assert!(t.get(1).unwrap().exited);
    }
}
