//! Syscall overhead of the fd tracker, side by side in one run.
//!
//! The cost of an openat+close loop (in an `fdhelper` process, timed by the helper's own round
//! trip) in three configurations, interleaved round by round so that drift on the machine hits
//! all three alike:
//! - `bare`: nothing attached;
//! - `unwatched`: `vmaudit watch` running (every program attached) but watching another process;
//! - `watched`: the looping process is the one watched.
//!
//! Usage: `fdbench [--rounds R] [--iterations N] [--write BENCHMARKS.md]` (as root; `cargo xtask
//! bench -- ...` builds and runs it). With `--write`, the table between the `fdbench` markers
//! in the file is replaced.

use std::{
    fmt::Write as _,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use vmaudit_tests::{Bins, ChildGuard, Helper, require_root};

struct Opts {
    rounds: usize,
    iterations: u64,
    verdict_runs: usize,
    write: Option<PathBuf>,
}

fn parse() -> Opts {
    let mut o = Opts {
        rounds: 11,
        iterations: 200_000,
        verdict_runs: 20,
        write: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--rounds" => o.rounds = val().parse().expect("--rounds N"),
            "--iterations" => o.iterations = val().parse().expect("--iterations N"),
            "--write" => o.write = Some(PathBuf::from(val())),
            "--verdict-runs" => o.verdict_runs = val().parse().expect("--verdict-runs N"),
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

/// ns per openat+close pair, timed around one `flood` command.
fn time_loop(h: &mut Helper, n: u64) -> f64 {
    let t = Instant::now();
    h.fd(&format!("flood {n}"));
    t.elapsed().as_nanos() as f64 / n as f64
}

/// Starts `vmaudit ARGS`, its output to /dev/null, and waits for `ready` on its stderr.
fn start_vmaudit(bins: &Bins, args: &[&str], ready: &str) -> ChildGuard {
    use std::io::{BufRead as _, BufReader};
    let mut child = std::process::Command::new(&bins.vmaudit)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmaudit");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(ready) => break,
            Some(Ok(_)) => {}
            _ => panic!("vmaudit did not start"),
        }
    }
    // Keep draining stderr so vmaudit never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    ChildGuard(child)
}

fn stop(mut g: ChildGuard) {
    // SAFETY: kill with the pid of our own child.
    unsafe { libc::kill(g.0.id() as i32, libc::SIGTERM) };
    let _ = g.0.wait();
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{} CPUs ({cpu}), kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    )
}

fn main() {
    require_root();
    let o = parse();
    let exe = std::env::current_exe().expect("current exe");
    let helper = exe.parent().expect("bin dir").join("fdhelper");
    let bins = Bins::new(helper.to_str().expect("utf-8 path"));
    let mut watched = Helper::spawn(&bins);
    let mut unwatched = Helper::spawn(&bins);
    // Warm up caches and the page cache of /dev/null's inode.
    time_loop(&mut unwatched, o.iterations / 10);
    let (mut bare, mut noop, mut unw, mut wat) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let started = Instant::now();
    for round in 0..o.rounds {
        bare.push(time_loop(&mut unwatched, o.iterations));
        let g = start_vmaudit(&bins, &["noop-hook"], "no-op hook attached");
        noop.push(time_loop(&mut unwatched, o.iterations));
        stop(g);
        let pid = watched.pid().to_string();
        let g = start_vmaudit(&bins, &["watch", "--pid", &pid], "watching pid");
        // Alternate which goes first, so neither always follows vmaudit's start-up.
        if round % 2 == 0 {
            unw.push(time_loop(&mut unwatched, o.iterations));
            wat.push(time_loop(&mut watched, o.iterations));
        } else {
            wat.push(time_loop(&mut watched, o.iterations));
            unw.push(time_loop(&mut unwatched, o.iterations));
        }
        stop(g);
        eprintln!(
            "round {}: bare {:.0} ns, no-op hook {:.0} ns, unwatched {:.0} ns, watched {:.0} ns",
            round + 1,
            bare[round],
            noop[round],
            unw[round],
            wat[round]
        );
    }
    let (b, n, u, w) = (
        median(&mut bare),
        median(&mut noop),
        median(&mut unw),
        median(&mut wat),
    );
    let mut table = String::new();
    let _ = writeln!(
        table,
        "Command: `cargo xtask bench` (fdbench: {} rounds × {} openat+close pairs per configuration, interleaved; medians).",
        o.rounds, o.iterations
    );
    let _ = writeln!(
        table,
        "Machine: {}. Run took {:.0?}.\n",
        machine(),
        Duration::from_secs(started.elapsed().as_secs())
    );
    let _ = writeln!(
        table,
        "| configuration | ns per openat+close | ratio to bare | goal |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|");
    let _ = writeln!(table, "| bare (nothing attached) | {b:.0} | 1.000 | |");
    let _ = writeln!(
        table,
        "| no-op program on raw_syscalls/sys_exit (the floor of any syscall hook) | {n:.0} | {:.3} | |",
        n / b
    );
    let _ = writeln!(
        table,
        "| unwatched (vmaudit attached, another pid watched) | {u:.0} | {:.3} | ≤ 1.02 |",
        u / b
    );
    let _ = writeln!(table, "| watched | {w:.0} | {:.3} | ≤ 1.15 |", w / b);
    print!("{table}");
    let verdicts = verdict_latency(&bins, o.verdict_runs);
    if let Some(path) = o.write {
        write_section(&path, "fdbench", &table);
        write_section(&path, "verdictbench", &verdicts);
        eprintln!("wrote {}", path.display());
    }
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` (appends it).
fn write_section(path: &std::path::Path, name: &str, body: &str) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (begin, end) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    );
    let new = match (text.find(&begin), text.find(&end)) {
        (Some(a), Some(z)) if a < z => format!("{}{begin}\n{body}{}", &text[..a], &text[z..]),
        _ => format!("{text}\n{begin}\n{body}{end}\n"),
    };
    std::fs::write(path, new).expect("write benchmarks file");
}

/// Claim-to-verdict latency: `runs` runs of a VM with 16 tap interfaces (the stand-in
/// emulator, which is up at once), each verdict's `latency_ns` (from the kernel event that
/// decided it to the verdict) collected from the journals.
fn verdict_latency(bins: &Bins, runs: usize) -> String {
    use std::io::{BufRead as _, BufReader};
    let dir = std::env::temp_dir().join(format!("vmaudit-verdictbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let mut lat: Vec<u64> = Vec::new();
    let mut verdicts = 0usize;
    for run in 0..runs {
        let spec = dir.join("vm.toml");
        let mut text = format!(
            "name = \"vmaudit-vbench\"\nuuid = \"0b0b0b0b-1c1c-4d2d-8e3e-4f4f4f4f4f4f\"\n[emulator]\npath = \"{}\"\nargs = [\"--mode\", \"hold\"]\n",
            bins.fake_emulator.display()
        );
        for i in 0..16 {
            text.push_str(&format!(
                "[[interface]]\nmac = \"52:54:00:be:00:{i:02x}\"\nifname = \"vmab{i}\"\n"
            ));
        }
        std::fs::write(&spec, text).expect("spec");
        let journal = dir.join(format!("j{run}.jsonl"));
        let mut child = std::process::Command::new(&bins.vmaudit)
            .arg("run")
            .arg(&spec)
            .args(["--audit", "journal", "--journal"])
            .arg(&journal)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vmaudit run");
        let stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let guard = ChildGuard(child);
        for line in stderr.lines().map_while(Result::ok) {
            if line.contains("emulator pid") {
                break;
            }
        }
        stop(guard);
        for l in std::fs::read_to_string(&journal)
            .unwrap_or_default()
            .lines()
        {
            let v: serde_json::Value = serde_json::from_str(l).expect("journal line");
            if v["type"] == "verdict" {
                verdicts += 1;
                if let Some(n) = v["latency_ns"].as_u64() {
                    lat.push(n);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1e3
    };
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Command: `cargo xtask bench` ({runs} runs of `vmaudit run` with 16 tap interfaces and the stand-in emulator; {verdicts} verdicts, {} of them decided by a kernel event).",
        lat.len()
    );
    let _ = writeln!(t, "Machine: {}.\n", machine());
    let _ = writeln!(t, "| kernel event to verdict | µs | goal |");
    let _ = writeln!(t, "|---|---:|---:|");
    let _ = writeln!(t, "| p50 | {:.0} | |", pct(0.5));
    let _ = writeln!(t, "| p99 | {:.0} | ≤ 1000 |", pct(0.99));
    let _ = writeln!(t, "| max | {:.0} | |", pct(1.0));
    print!("{t}");
    t
}
