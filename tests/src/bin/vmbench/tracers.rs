//! The tracers under test, each a child process started until it says it is attached and
//! stopped by a signal: `vmaudit` (`watch`, `noop-hook`) and Debian's `bpftrace`. Every child
//! is held by a [`ChildGuard`], so a failing benchmark leaves no process behind.
//!
//! Their output is read by a thread that counts lines and keeps only what the benchmark needs
//! (the last line, bpftrace's maps and loss reports), so that reading costs as little as
//! possible on the machine being measured.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Read},
    process::{Command, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel},
    thread,
    time::{Duration, Instant},
};

use vmaudit_tests::{Bins, ChildGuard, PATIENCE};

/// How long one poke may take to show in bpftrace's output before the next is sent.
const POKE_ANSWER: Duration = Duration::from_millis(50);

/// What a reader thread kept of a child's stdout.
#[derive(Debug, Default)]
pub struct Captured {
    /// Non-empty lines seen after the ready line (marker lines included).
    pub lines: u64,
    /// Lines that held the marker text.
    pub markers: u64,
    /// Lines that match the caller's `keep` filter, in order.
    pub kept: Vec<String>,
    /// The last complete line.
    pub last: String,
    /// The child's CPU time (user + system, ns) when it ended, read from its zombie's
    /// /proc/PID/stat before it was reaped (0 when unreadable).
    pub cpu_ns: u64,
}

/// Reads `from` to its end in large chunks: counts lines, keeps the last one and those that
/// `keep` selects, and sends a message on `marker` for each line that contains its text.
fn drain_lines(
    mut from: impl Read,
    keep: fn(&str) -> bool,
    markers: Vec<(String, Sender<()>)>,
) -> Captured {
    let mut out = Captured::default();
    let mut buf = vec![0u8; 1 << 16];
    let mut partial: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = &buf[..n];
        while let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
            partial.extend_from_slice(&chunk[..nl]);
            chunk = &chunk[nl + 1..];
            if partial.is_empty() {
                continue;
            }
            out.lines += 1;
            let line = String::from_utf8_lossy(&partial);
            if keep(&line) {
                out.kept.push(line.to_string());
            }
            for (text, tx) in &markers {
                if line.contains(text.as_str()) {
                    out.markers += 1;
                    let _ = tx.send(());
                }
            }
            out.last.clear();
            out.last.push_str(&line);
            partial.clear();
        }
        partial.extend_from_slice(chunk);
    }
    out
}

/// How long a tracer may take to attach, or to exit once told to: bounds on a hang, not
/// synchronisation (each wait returns as soon as its line or its end comes). bpftrace compiles
/// its program with LLVM first, which takes seconds on a loaded machine.
const START_PATIENCE: Duration = Duration::from_secs(120);

/// `Command` for a tracer: stdout and stderr piped, and killed by the kernel if this process
/// dies (even by SIGKILL, when no guard runs), so a benchmark never leaves one behind.
fn tracer_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(program);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// A child's stdout read to its end by a thread, whose result arrives on a channel.
struct Reader(Receiver<Captured>);

impl Reader {
    fn spawn(
        from: impl Read + Send + 'static,
        keep: fn(&str) -> bool,
        markers: Vec<(String, Sender<()>)>,
    ) -> Self {
        let (tx, rx) = channel();
        thread::spawn(move || {
            let _ = tx.send(drain_lines(from, keep, markers));
        });
        Self(rx)
    }
}

/// Sends `signal` to the guarded child and waits (bounded) until its stdout closes, then
/// reaps it. A child that does not exit is killed and the benchmark fails, naming it.
///
/// The signal is sent again while nothing comes: bpftrace has been seen to miss a SIGINT that
/// arrives while its output is busy. The child's CPU time in all is read from its zombie.
fn stop_child(
    guard: &mut ChildGuard,
    reader: &Reader,
    signal: libc::c_int,
    what: &str,
) -> Captured {
    let pid = guard.0.id() as i32;
    let deadline = Instant::now() + START_PATIENCE;
    let out = loop {
        // SAFETY: kill(2) on the pid of our own, not yet reaped, child.
        unsafe { libc::kill(pid, signal) };
        match reader.0.recv_timeout(RESIGNAL) {
            Ok(out) => break Ok(out),
            Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(e) => break Err(e),
        }
    };
    let cpu = out
        .is_ok()
        .then(|| zombie_cpu_ns(pid))
        .flatten()
        .unwrap_or(0);
    let _ = guard.0.kill();
    let _ = guard.0.wait();
    let mut out = out.unwrap_or_else(|e| {
        panic!("{what} did not exit within {START_PATIENCE:?} of signal {signal} ({e})")
    });
    out.cpu_ns = cpu;
    out
}

/// How long a stopping child may stay silent before it is signalled again.
const RESIGNAL: Duration = Duration::from_secs(5);

/// The CPU time a child that closed its stdout used in all, read once it is a zombie (it is
/// not reaped here); None if it does not exit within a moment.
fn zombie_cpu_ns(pid: i32) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child; WNOWAIT leaves it to be reaped, WNOHANG returns at
        // once; it writes `info` only.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
            )
        };
        // SAFETY: si_pid is set by waitid when a child changed state (0 otherwise).
        if r == 0 && unsafe { info.si_pid() } == pid {
            return read_cpu_ns(pid as u32);
        }
        if r != 0 || Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// A running `vmaudit` subcommand, its stdout read by a thread.
pub struct Vmaudit {
    guard: ChildGuard,
    reader: Reader,
    what: String,
}

impl Vmaudit {
    /// Starts `vmaudit ARGS` and returns once its stderr says `ready`. Fails loudly (with what
    /// vmaudit said) if it exits first or does not get ready in time.
    pub fn start(bins: &Bins, args: &[&str], ready: &str) -> Self {
        let what = format!("vmaudit {}", args.join(" "));
        let mut child = tracer_command(&bins.vmaudit)
            .args(args)
            .spawn()
            .expect("spawn vmaudit");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let guard = ChildGuard(child);
        // stdout is drained from the start: vmaudit writes its first records before it says
        // it is ready, and must never block on a full pipe.
        let reader = Reader::spawn(stdout, |_| false, Vec::new());
        let (tx, rx) = channel();
        // stderr too, for as long as vmaudit runs.
        thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let deadline = Instant::now() + START_PATIENCE;
        let mut said = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(ready) => break,
                Ok(l) => said.push(l),
                Err(e) => panic!(
                    "{what} did not start (no {ready:?} on stderr: {e}); it said:\n{}",
                    said.join("\n")
                ),
            }
        }
        Self {
            guard,
            reader,
            what,
        }
    }

    pub fn pid(&self) -> u32 {
        self.guard.0.id()
    }

    /// SIGTERM (vmaudit drains what is left and prints its summary), then what it wrote.
    pub fn stop(mut self) -> Captured {
        stop_child(&mut self.guard, &self.reader, libc::SIGTERM, &self.what)
    }
}

/// `vmaudit watch --pid PID [--ring-buffer-bytes N]`, its JSON to a pipe this process drains.
pub fn watch(bins: &Bins, pid: u32, ring_bytes: Option<u32>) -> Vmaudit {
    let pid = pid.to_string();
    let ring = ring_bytes.map(|r| r.to_string());
    let mut args = vec!["watch", "--pid", &pid];
    if let Some(r) = &ring {
        args.extend(["--ring-buffer-bytes", r]);
    }
    Vmaudit::start(bins, &args, "watching pid")
}

/// `vmaudit noop-hook`: a program that returns at once, on the hook vmaudit uses.
pub fn noop_hook(bins: &Bins) -> Vmaudit {
    Vmaudit::start(bins, &["noop-hook"], "no-op hook attached")
}

/// `vmaudit noop-hook --emit-for PID`: a bare event per syscall exit of `pid`, drained and
/// discarded.
pub fn emit_floor(bins: &Bins, pid: u32) -> Vmaudit {
    let pid = pid.to_string();
    Vmaudit::start(
        bins,
        &["noop-hook", "--emit-for", &pid],
        "floor hook attached",
    )
}

/// The summary line `vmaudit watch` ends with.
pub struct WatchSummary {
    /// Kernel events vmaudit received.
    pub events: u64,
    /// Events the kernel side could not deliver (all causes).
    pub lost: u64,
    /// Table resyncs from /proc after losses.
    pub gaps: u64,
}

impl WatchSummary {
    pub fn parse(last_line: &str) -> Self {
        let v: serde_json::Value = serde_json::from_str(last_line).unwrap_or_else(|e| {
            panic!("vmaudit's last line is not its summary ({e}): {last_line:?}")
        });
        assert_eq!(v["type"], "summary", "vmaudit's last line: {last_line}");
        let n = |k: &str| {
            v[k].as_u64()
                .unwrap_or_else(|| panic!("summary has no {k}: {last_line}"))
        };
        Self {
            events: n("events"),
            lost: n("lost_total"),
            gaps: n("gaps"),
        }
    }
}

/// A running `bpftrace -e PROGRAM`, attached.
pub struct Bpftrace {
    guard: ChildGuard,
    reader: Reader,
    stderr: Receiver<Vec<String>>,
    marker: Receiver<()>,
    /// The ids of the programs it loaded.
    pub programs: BTreeSet<u32>,
}

/// What bpftrace said after attaching.
#[derive(Debug)]
pub struct BpftraceOutput {
    /// Lines on stdout after "Attaching ...", other than markers, maps and loss reports.
    pub lines: u64,
    /// Map entries printed at exit, `@[KEY]: VALUE` as (KEY, VALUE).
    pub map: Vec<(String, u64)>,
    /// The sum of its "Lost N events" reports (stdout and stderr).
    pub lost: u64,
}

/// What bpftrace prints once its program is compiled, before it attaches it.
const ATTACHING: &str = "Attaching ";

/// Lines bpftrace writes that are not events: map entries and loss reports.
fn bpftrace_meta(line: &str) -> bool {
    line.starts_with('@') || line.starts_with("Lost ")
}

/// `Lost N events` → N.
fn lost_events(line: &str) -> Option<u64> {
    line.trim()
        .strip_prefix("Lost ")?
        .strip_suffix(" events")?
        .parse()
        .ok()
}

/// `@[1234]: 56` → ("1234", 56).
fn map_entry(line: &str) -> Option<(String, u64)> {
    let rest = line.strip_prefix("@[")?;
    let (key, value) = rest.split_once("]: ")?;
    Some((key.to_owned(), value.trim().parse().ok()?))
}

impl Bpftrace {
    /// Starts bpftrace with output unbuffered; returns once it has printed `Attaching N
    /// probes...` and `poke` has made its program print `marker`.
    ///
    /// bpftrace prints "Attaching" before it attaches, and runs BEGIN before the other probes
    /// are attached (`BPFtrace::run`), so neither says the probes are live: the program must
    /// print `marker` for an event only the benchmark causes (`poke`), and this pokes until it
    /// does. Fails loudly if bpftrace is missing, exits, or never shows the marker.
    pub fn start(program: &str, marker: &str, mut poke: impl FnMut()) -> Self {
        let before = bpf_program_ids();
        let mut child = tracer_command("bpftrace")
            .args(["-B", "none", "-e", program])
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start bpftrace ({e}): `cargo xtask setup` installs Debian's")
            });
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let guard = ChildGuard(child);
        let (err_tx, err_rx) = channel();
        thread::spawn(move || {
            let lines = BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
                .collect();
            let _ = err_tx.send(lines);
        });
        let (attaching_tx, attaching) = channel();
        let (marker_tx, marker_rx) = channel();
        let reader = Reader::spawn(
            stdout,
            bpftrace_meta,
            vec![
                (ATTACHING.to_owned(), attaching_tx),
                (marker.to_owned(), marker_tx),
            ],
        );
        let mut bt = Self {
            guard,
            reader,
            stderr: err_rx,
            marker: marker_rx,
            programs: BTreeSet::new(),
        };
        if let Err(e) = attaching.recv_timeout(START_PATIENCE) {
            let out = bt.stop();
            panic!("bpftrace did not start `{program}` ({e}): {out:?}");
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            poke();
            // A bounded wait for the line the poke causes, not a sleep: it returns as soon as
            // the line comes; only a poke made before the probe was live goes unanswered.
            match bt.marker.recv_timeout(POKE_ANSWER) {
                Ok(()) => break,
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => {
                    let out = bt.stop();
                    panic!("bpftrace never showed {marker:?} for `{program}` ({out:?})");
                }
            }
        }
        bt.programs = bpf_program_ids().difference(&before).copied().collect();
        bt
    }

    /// Pokes until the marker shows again: every event caused before the poke has then been
    /// read or reported lost (bounded by [`PATIENCE`], a bound on a hang).
    pub fn sync(&mut self, mut poke: impl FnMut()) {
        while self.marker.try_recv().is_ok() {}
        let deadline = Instant::now() + PATIENCE;
        loop {
            poke();
            match self.marker.recv_timeout(POKE_ANSWER) {
                Ok(()) => return,
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(e) => panic!("bpftrace stopped answering the marker ({e:?})"),
            }
        }
    }

    /// SIGINT (bpftrace prints its maps and exits), then what it printed.
    pub fn stop(mut self) -> BpftraceOutput {
        let out = stop_child(&mut self.guard, &self.reader, libc::SIGINT, "bpftrace");
        let err = self.stderr.recv().unwrap_or_default();
        let meta = out.kept.len() as u64 + out.markers;
        BpftraceOutput {
            lines: out.lines.saturating_sub(meta),
            map: out.kept.iter().filter_map(|l| map_entry(l)).collect(),
            lost: out
                .kept
                .iter()
                .chain(&err)
                .filter_map(|l| lost_events(l))
                .sum(),
        }
    }
}

/// A bpftrace program that sends to its reader, for every exit of syscall `gains` or `close` by
/// `pid`, what vmaudit's event carries: the time, pid, tid, syscall and result, and for a new fd
/// the file read from the task's fd table (inode, rdev, the superblock's dev, mode, flags, and
/// the file's address where vmaudit sends a keyed hash of it). `close(-1)` prints `mark`.
pub fn bpftrace_emit(pid: u32, gains: i64, close: i64, mark: &str) -> String {
    format!(
        "tracepoint:raw_syscalls:sys_exit /pid == {pid} && (args->id == {gains} || args->id == \
         {close})/ {{ if (args->id == {close} && args->ret == -9) {{ printf(\"{mark}\\n\"); }} \
         else if (args->id == {gains} && args->ret >= 0) {{ \
         $f = *(curtask->files->fdt->fd + args->ret); \
         printf(\"%lu %d %d %ld %ld %lu %u %u %u %u %lu\\n\", nsecs, pid, tid, args->id, \
         args->ret, $f->f_inode->i_ino, $f->f_inode->i_rdev, $f->f_inode->i_sb->s_dev, \
         $f->f_inode->i_mode, $f->f_flags, $f); }} \
         else {{ printf(\"%lu %d %d %ld %ld\\n\", nsecs, pid, tid, args->id, args->ret); }} }}"
    )
}

/// Ids of every BPF program loaded on the host.
pub fn bpf_program_ids() -> BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .collect()
}

/// Run time and run count of programs, summed, while `kernel.bpf_stats_enabled` is on.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProgStats {
    pub run_ns: u64,
    pub runs: u64,
}

impl std::ops::Sub for ProgStats {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self {
            run_ns: self.run_ns.saturating_sub(o.run_ns),
            runs: self.runs.saturating_sub(o.runs),
        }
    }
}

/// The summed stats of the programs whose ids `select` accepts.
pub fn prog_stats(select: impl Fn(u32, Option<&str>) -> bool) -> ProgStats {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| select(p.id(), p.name_as_str()))
        .fold(ProgStats::default(), |s, p| ProgStats {
            run_ns: s.run_ns + p.run_time().as_nanos() as u64,
            runs: s.runs + p.run_count(),
        })
}

/// CPU time (user + system) a process has used so far, in ns, from /proc/PID/stat.
pub fn cpu_ns(pid: u32) -> u64 {
    read_cpu_ns(pid).expect("read /proc/PID/stat")
}

fn read_cpu_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')': state is
    // field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Some(ticks * 1_000_000_000 / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bpftrace_reports() {
        assert_eq!(lost_events("Lost 1234 events"), Some(1234));
        assert_eq!(lost_events("123 3 0"), None);
        assert_eq!(map_entry("@[4242]: 400012"), Some(("4242".into(), 400012)));
        assert_eq!(map_entry("4242 32 5"), None);
    }

    #[test]
    fn counts_lines_and_keeps_the_last() {
        let text = b"a\n\n@[1]: 2\nLost 3 events\nlast\n".as_slice();
        let (tx, rx) = channel();
        let c = drain_lines(text, bpftrace_meta, vec![("Lost".into(), tx)]);
        assert_eq!((c.lines, c.markers), (4, 1));
        assert_eq!(c.kept, ["@[1]: 2", "Lost 3 events"]);
        assert_eq!(c.last, "last");
        assert!(rx.try_recv().is_ok());
    }
}
