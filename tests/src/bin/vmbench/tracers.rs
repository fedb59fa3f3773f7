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
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    thread::{self, JoinHandle},
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
}

/// Reads `from` to its end in large chunks: counts lines, keeps the last one and those that
/// `keep` selects, and sends a message on `marker` for each line that contains its text.
fn drain_lines(
    mut from: impl Read,
    keep: fn(&str) -> bool,
    marker: Option<(String, std::sync::mpsc::Sender<()>)>,
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
            if let Some((text, tx)) = &marker
                && line.contains(text.as_str())
            {
                out.markers += 1;
                let _ = tx.send(());
            }
            out.last.clear();
            out.last.push_str(&line);
            partial.clear();
        }
        partial.extend_from_slice(chunk);
    }
    out
}

/// Sends `signal` to the guarded child and reaps it.
fn signal_and_wait(guard: &mut ChildGuard, signal: libc::c_int) {
    let pid = guard.0.id() as i32;
    // SAFETY: kill(2) on the pid of our own, not yet reaped, child.
    unsafe { libc::kill(pid, signal) };
    let _ = guard.0.wait();
}

/// A running `vmaudit` subcommand, its stdout read by a thread.
pub struct Vmaudit {
    guard: ChildGuard,
    reader: Option<JoinHandle<Captured>>,
}

impl Vmaudit {
    /// Starts `vmaudit ARGS` and returns once its stderr says `ready`. Fails loudly (with what
    /// vmaudit said) if it exits first.
    pub fn start(bins: &Bins, args: &[&str], ready: &str) -> Self {
        let mut child = Command::new(&bins.vmaudit)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmaudit");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let guard = ChildGuard(child);
        let mut lines = BufReader::new(stderr).lines();
        let mut said = Vec::new();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains(ready) => break,
                Some(Ok(l)) => said.push(l),
                _ => panic!(
                    "vmaudit {} did not start (no {ready:?} on stderr); it said:\n{}",
                    args.join(" "),
                    said.join("\n")
                ),
            }
        }
        // Keep draining stderr so vmaudit never blocks on it.
        thread::spawn(move || for _ in lines {});
        let reader = thread::spawn(move || drain_lines(stdout, |_| false, None));
        Self {
            guard,
            reader: Some(reader),
        }
    }

    pub fn pid(&self) -> u32 {
        self.guard.0.id()
    }

    /// SIGTERM (vmaudit drains what is left and prints its summary), then what it wrote.
    pub fn stop(mut self) -> Captured {
        signal_and_wait(&mut self.guard, libc::SIGTERM);
        self.reader
            .take()
            .expect("reader")
            .join()
            .expect("reader thread")
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
    reader: Option<JoinHandle<Captured>>,
    stderr: Option<JoinHandle<Vec<String>>>,
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
        let mut child = Command::new("bpftrace")
            .args(["-B", "none", "-e", program])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start bpftrace ({e}): `cargo xtask setup` installs Debian's")
            });
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let guard = ChildGuard(child);
        let stderr = thread::spawn(move || {
            BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        });
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match stdout.read_line(&mut line) {
                Ok(n) if n > 0 && line.starts_with("Attaching ") => break,
                Ok(n) if n > 0 => {}
                _ => {
                    drop(guard);
                    let said = stderr.join().unwrap_or_default().join("\n");
                    panic!("bpftrace did not attach `{program}`; it said:\n{said}");
                }
            }
        }
        let (marker_tx, marker_rx) = channel();
        let text = marker.to_owned();
        let reader =
            thread::spawn(move || drain_lines(stdout, bpftrace_meta, Some((text, marker_tx))));
        let mut bt = Self {
            guard,
            reader: Some(reader),
            stderr: Some(stderr),
            marker: marker_rx,
            programs: BTreeSet::new(),
        };
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
        signal_and_wait(&mut self.guard, libc::SIGINT);
        let out = self
            .reader
            .take()
            .expect("reader")
            .join()
            .expect("reader thread");
        let err = self
            .stderr
            .take()
            .expect("stderr")
            .join()
            .expect("stderr thread");
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
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command (which may hold spaces) start after the last ')': state is
    // field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    ticks * 1_000_000_000 / hz
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
        let c = drain_lines(text, bpftrace_meta, Some(("Lost".into(), tx)));
        assert_eq!((c.lines, c.markers), (4, 1));
        assert_eq!(c.kept, ["@[1]: 2", "Lost 3 events"]);
        assert_eq!(c.last, "last");
        assert!(rx.try_recv().is_ok());
    }
}
