//! (c) Claim-to-verdict latency, measured from outside: `vmaudit run` of a VM with 16 tap
//! interfaces and the stand-in emulator (which is up at once), stopped as soon as it runs,
//! several times, while this process follows the journal (inotify) and notes when each line
//! appears. A verdict's latency is from the later of its record's line appearing and the
//! kernel event that decided it (the evidence's kernel time) to its verdict's line appearing.
//! vmaudit's own `latency_ns` is shown beside it.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Instant,
};

use vmaudit_tests::{Bins, ChildGuard};

use crate::report::{header, machine, quantile};

pub struct Opts {
    pub runs: usize,
}

/// Removes the benchmark's scratch folder, whatever happened.
struct ScratchDir(std::path::PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where a configuration keeps the journals: the disk (every record and verdict fsync'd), or
/// tmpfs, where an fsync returns at once; the difference is what the fsyncs cost.
const JOURNAL_DIRS: [(&str, &str); 2] = [
    ("journal on disk (ext4 or what the temp dir is)", ""),
    (
        "journal on tmpfs (/dev/shm: fsync costs nothing)",
        "/dev/shm",
    ),
];

/// The latencies of one configuration.
#[derive(Default)]
struct Latencies {
    /// Measured from outside (see the module's text).
    all: Vec<u64>,
    /// vmaudit's own `latency_ns` of the same verdicts.
    inside: Vec<u64>,
    verdicts: usize,
    // By claim kind, and by which came last: the claim (it waited for the verifier thread)
    // or the kernel event (the verifier waited for it to be read from the ring).
    by_kind: BTreeMap<String, Vec<u64>>,
    by_last: BTreeMap<&'static str, Vec<u64>>,
    /// The verifier thread's time runnable but waiting for a CPU, and how often it ran.
    run_delay_ns: u64,
    slices: u64,
}

impl Latencies {
    /// Adds the verdicts of one run's journal, each with the times its lines appeared.
    fn add_journal(&mut self, lines: &[Seen], offset: i128) {
        let mut record_seen = std::collections::HashMap::new();
        for l in lines {
            if l.line["type"] != "verdict" {
                if let Some(ts) = l.line["ts_ns"].as_u64() {
                    record_seen.insert(ts, l.at);
                }
                continue;
            }
            self.verdicts += 1;
            let v = &l.line;
            // Only verdicts a kernel event decided (vmaudit gives those a latency).
            let Some(inside) = v["latency_ns"].as_u64() else {
                continue;
            };
            let record = v["claim"]["record_ts_ns"]
                .as_u64()
                .and_then(|ts| record_seen.get(&ts))
                .copied()
                .expect("a verdict whose record line was not seen before it");
            let event = v["evidence"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["ts"].as_u64())
                .max()
                .unwrap_or(0);
            let from = record.max(event);
            let n = l.at.saturating_sub(from);
            self.all.push(n);
            self.inside.push(inside);
            let kind = v["claim"]["kind"].as_str().unwrap_or("?").to_owned();
            self.by_kind.entry(kind).or_default().push(n);
            self.by_last
                .entry(last_came(v, offset))
                .or_default()
                .push(n);
        }
    }
}

/// A journal line and when this process saw it appear (CLOCK_MONOTONIC ns, the kernel's
/// event clock).
struct Seen {
    at: u64,
    line: serde_json::Value,
}

fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Follows a file as it grows: a thread woken by inotify reads each new line and notes when
/// it appeared, until told to stop.
struct Tail {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Seen>>,
}

impl Tail {
    fn follow(path: &std::path::Path) -> Self {
        use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
        std::fs::File::create(path).expect("create the journal");
        // SAFETY: inotify_init1 takes flags only.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the fd was just created and is owned here.
        let ino = unsafe { OwnedFd::from_raw_fd(fd) };
        let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path and a live inotify fd.
        let wd =
            unsafe { libc::inotify_add_watch(ino.as_raw_fd(), cpath.as_ptr(), libc::IN_MODIFY) };
        assert!(
            wd >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
        let mut file = std::fs::File::open(path).expect("open the journal");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            use std::io::Read as _;
            let mut out = Vec::new();
            let mut partial = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                // Read what is there, then wait for more (bounded, so that a stop is seen).
                loop {
                    let n = file.read(&mut buf).expect("read the journal");
                    if n == 0 {
                        break;
                    }
                    let at = monotonic_ns();
                    partial.extend_from_slice(&buf[..n]);
                    while let Some(nl) = partial.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = partial.drain(..=nl).collect();
                        let line = serde_json::from_slice(&line).expect("a journal line");
                        out.push(Seen { at, line });
                    }
                }
                if stopping.load(std::sync::atomic::Ordering::Acquire) {
                    return out;
                }
                let mut pfd = libc::pollfd {
                    fd: ino.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one live pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 100) } > 0 {
                    let mut ev = [0u8; 4096];
                    // SAFETY: reads inotify events into a buffer owned here (their content
                    // does not matter: the file is read again).
                    unsafe { libc::read(ino.as_raw_fd(), ev.as_mut_ptr().cast(), ev.len()) };
                }
            }
        });
        Self { stop, thread }
    }

    /// Every line seen, once the file is complete.
    fn finish(self) -> Vec<Seen> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.join().expect("the journal tail")
    }
}

fn spec(bins: &Bins) -> String {
    let mut text = format!(
        "name = \"vmaudit-vbench\"\nuuid = \"0b0b0b0b-1c1c-4d2d-8e3e-4f4f4f4f4f4f\"\n[emulator]\npath = \"{}\"\nargs = [\"--mode\", \"hold\"]\n",
        bins.fake_emulator.display()
    );
    for i in 0..16 {
        let _ = write!(
            text,
            "[[interface]]\nmac = \"52:54:00:be:00:{i:02x}\"\nifname = \"vmab{i}\"\n"
        );
    }
    text
}

/// The verifier thread's scheduler statistics (`/proc/PID/task/TID/schedstat`: time on a CPU,
/// time runnable and waiting for one, times it ran), as (waiting ns, times ran).
fn verifier_schedstat(pid: u32) -> Option<(u64, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.filter_map(Result::ok).find_map(|t| {
        let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
        if comm.trim() != "vmaudit-verify" {
            return None;
        }
        let stat = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
        let f: Vec<u64> = stat
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        Some((*f.get(1)?, *f.get(2)?))
    })
}

/// One `vmaudit run`, stopped once the emulator is up; returns its journal and the verifier
/// thread's scheduler statistics.
fn one_run(
    bins: &Bins,
    spec: &std::path::Path,
    journal: &std::path::Path,
) -> (Vec<Seen>, Option<(u64, u64)>) {
    let tail = Tail::follow(journal);
    let mut child = Command::new(&bins.vmaudit)
        .arg("run")
        .arg(spec)
        .args(["--audit", "journal", "--journal"])
        .arg(journal)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmaudit run");
    let stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut guard = ChildGuard(child);
    let mut said = Vec::new();
    let mut up = false;
    for line in stderr.lines().map_while(Result::ok) {
        if line.contains("emulator pid") {
            up = true;
            break;
        }
        said.push(line);
    }
    assert!(
        up,
        "vmaudit run did not start the VM; it said:\n{}",
        said.join("\n")
    );
    let sched = verifier_schedstat(guard.0.id());
    // SAFETY: kill(2) on the pid of our own, not yet reaped, child.
    unsafe { libc::kill(guard.0.id() as i32, libc::SIGTERM) };
    let _ = guard.0.wait();
    (tail.finish(), sched)
}

pub fn run(bins: &Bins, o: &Opts, quick: bool) -> String {
    let machine = machine();
    let started = Instant::now();
    let name = format!("vmaudit-verdictbench-{}", std::process::id());
    let dirs: Vec<ScratchDir> = JOURNAL_DIRS
        .iter()
        .map(|(_, d)| {
            let base = if d.is_empty() {
                std::env::temp_dir()
            } else {
                d.into()
            };
            let dir = ScratchDir(base.join(&name));
            std::fs::create_dir_all(&dir.0).expect("bench dir");
            dir
        })
        .collect();
    let spec_path = dirs[0].0.join("vm.toml");
    std::fs::write(&spec_path, spec(bins)).expect("spec");
    let offset = realtime_minus_monotonic();
    let mut lat: Vec<Latencies> = JOURNAL_DIRS.iter().map(|_| Latencies::default()).collect();
    for run in 0..o.runs {
        // Interleaved, so that drift on the machine hits both alike.
        for (dir, l) in dirs.iter().zip(&mut lat) {
            let journal = dir.0.join(format!("j{run}.jsonl"));
            let (lines, sched) = one_run(bins, &spec_path, &journal);
            l.add_journal(&lines, offset);
            if let Some((wait, ran)) = sched {
                l.run_delay_ns += wait;
                l.slices += ran;
            }
        }
    }
    for (l, (what, _)) in lat.iter_mut().zip(JOURNAL_DIRS) {
        assert!(
            !l.all.is_empty(),
            "{what}: no verdict carried a latency: the journals are not what this benchmark reads"
        );
        l.all.sort_unstable();
        l.inside.sort_unstable();
    }
    let disk = &lat[0];
    let mut t = header(
        &format!(
            "{} runs of `vmaudit run` with 16 tap interfaces and the stand-in emulator per configuration, interleaved; {} verdicts with the journal on disk, {} of them decided by a kernel event",
            o.runs,
            disk.verdicts,
            disk.all.len()
        ),
        &machine,
        started.elapsed(),
        quick,
    );
    let _ = writeln!(
        t,
        "| µs, from the later of the record's line and the kernel event to the verdict's line | {} | {} | vmaudit's own `latency_ns`, journal on disk | goal |",
        JOURNAL_DIRS[0].0, JOURNAL_DIRS[1].0
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|");
    for (q, what, goal) in [(0.5, "p50", ""), (0.99, "p99", "≤ 1000"), (1.0, "max", "")] {
        let us = |v: &[u64]| quantile(v, q) as f64 / 1e3;
        let _ = writeln!(
            t,
            "| {what} | {:.0} | {:.0} | {:.0} | {goal} |",
            us(&lat[0].all),
            us(&lat[1].all),
            us(&lat[0].inside)
        );
    }
    let p99 = quantile(&lat[0].all, 0.99);
    let _ = writeln!(
        t,
        "\nGoal in this run (p99 ≤ 1 ms measured from outside, journal on disk): {:.0} µs: {}.",
        p99 as f64 / 1e3,
        crate::report::goal(p99 <= 1_000_000)
    );
    for (l, (what, _)) in lat.iter().zip(JOURNAL_DIRS) {
        let _ = writeln!(
            t,
            "\n{what}: the verifier thread waited for a CPU {:.0} µs on average each time it \
             was woken, {:.1} ms in all over the runs (`/proc/PID/task/TID/schedstat`, read as \
             the emulator came up).",
            l.run_delay_ns as f64 / l.slices.max(1) as f64 / 1e3,
            l.run_delay_ns as f64 / 1e6
        );
    }
    let _ = writeln!(
        t,
        "\nThe journal-on-disk latencies split by claim kind, and by what came last (µs):\n"
    );
    let _ = writeln!(t, "| verdicts of | count | p50 | p99 | max |");
    let _ = writeln!(t, "|---|---:|---:|---:|---:|");
    let groups = disk
        .by_kind
        .iter()
        .map(|(k, v)| (format!("`{k}` claims"), v))
        .chain(disk.by_last.iter().map(|(k, v)| (k.to_string(), v)));
    for (what, v) in groups {
        let mut v = v.clone();
        v.sort_unstable();
        let us = |q: f64| quantile(&v, q) as f64 / 1e3;
        let _ = writeln!(
            t,
            "| {what} | {} | {:.0} | {:.0} | {:.0} |",
            v.len(),
            us(0.5),
            us(0.99),
            us(1.0)
        );
    }
    print!("{t}");
    t
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC now, in ns: turns the kernel's event times (monotonic)
/// into the journal's record times (wall clock).
fn realtime_minus_monotonic() -> i128 {
    let ns = |id| {
        let t = nix::time::clock_gettime(id).expect("clock_gettime");
        t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128
    };
    ns(nix::time::ClockId::CLOCK_REALTIME) - ns(nix::time::ClockId::CLOCK_MONOTONIC)
}

/// Whether the claim's record or its latest kernel evidence came last.
fn last_came(verdict: &serde_json::Value, offset: i128) -> &'static str {
    let record = verdict["claim"]["record_ts_ns"].as_u64().map(i128::from);
    let event = verdict["evidence"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["ts"].as_u64())
        .max()
        .map(|t| i128::from(t) + offset);
    match (record, event) {
        (Some(r), Some(e)) if e > r => "the kernel event came after the claim's record",
        (Some(_), Some(_)) => "the claim came after its kernel event",
        _ => "(no time to compare)",
    }
}
