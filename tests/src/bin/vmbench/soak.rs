//! (e) Soak: `vmaudit run` of a VM on the stand-in emulator (its QMP acknowledges each unplug
//! at once, as a guest would: a real guest takes about a second per unplug), put through N
//! attach/detach cycles over the control socket, every record journaled and every claim judged.
//! Sampled as it goes: the fds and RSS of vmaudit and of the emulator. The fd counts must come
//! back to where they started (a difference fails the run: a leak); RSS is reported.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use vmaudit::runtime::control::{Request, Response};
use vmaudit_tests::{Bins, ChildGuard};

use crate::report::{header, machine};

pub struct Opts {
    pub cycles: usize,
}

const NAME: &str = "vmaudit-soak";

/// Removes the benchmark's scratch folder, whatever happened.
struct ScratchDir(std::path::PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What one process holds at a moment.
#[derive(Clone, Copy, Debug)]
struct Sample {
    cycle: usize,
    at: Duration,
    vmaudit_fds: usize,
    vmaudit_rss_kib: u64,
    emulator_fds: usize,
    emulator_rss_kib: u64,
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}

/// One request over the control socket, as `vmaudit attach-net`/`detach-net` sends it.
fn ask(req: &Request) -> Response {
    let mut s = UnixStream::connect(format!("/run/vmaudit/{NAME}/control.sock"))
        .expect("the control socket");
    let mut line = serde_json::to_string(req).expect("a request");
    line.push('\n');
    s.write_all(line.as_bytes()).expect("send the request");
    // To the end: once the server has closed its side, its fd is gone too, and the sample
    // after the cycle counts no connection still being closed.
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut BufReader::new(s), &mut answer).expect("read the answer");
    serde_json::from_str(answer.trim()).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

/// What one configuration gave.
struct Soaked {
    took: Duration,
    samples: Vec<Sample>,
    records: usize,
    verdicts: std::collections::BTreeMap<String, usize>,
    exit: Option<i32>,
    violations: Vec<String>,
}

/// The configurations, each run for every cycle: the verifier's memory is told apart from the
/// runtime's.
const CONFIGS: [(&str, &[&str]); 2] = [
    ("with the verifier (the default)", &[]),
    ("the runtime alone (`--no-verify`)", &["--no-verify"]),
];

pub fn run(bins: &Bins, o: &Opts, quick: bool) -> String {
    let start = Instant::now();
    let soaked: Vec<Soaked> = CONFIGS
        .iter()
        .map(|(what, flags)| {
            eprintln!("   {what}");
            soak(bins, o, flags)
        })
        .collect();
    let mut t = header(
        &format!(
            "{} attach/detach cycles of one tap on the stand-in emulator (QMP acknowledging each \
             unplug at once), over the control socket, the journal on disk; once with the \
             verifier, once without",
            o.cycles
        ),
        &machine(),
        start.elapsed(),
        quick,
    );
    for ((what, _), s) in CONFIGS.iter().zip(&soaked) {
        let _ = writeln!(t, "{}", report(what, o, s));
    }
    t
}

fn soak(bins: &Bins, o: &Opts, flags: &[&str]) -> Soaked {
    let dir = ScratchDir(std::env::temp_dir().join(format!("vmaudit-soak-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("scratch dir");
    let spec = dir.0.join("vm.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"{NAME}\"\nuuid = \"5e5e5e5e-6f6f-4a7a-8b8b-9c9c9c9c9c9c\"\n\
             [emulator]\npath = \"{}\"\nargs = [\"--qmp-fd\", \"{{qmp-fd}}\"]\n\
             [[interface]]\nmac = \"52:54:00:5a:00:01\"\nifname = \"vmsoak0\"\n",
            bins.fake_emulator.display()
        ),
    )
    .expect("spec");
    let journal = dir.0.join("journal.jsonl");
    let mut child = Command::new(&bins.vmaudit)
        .arg("run")
        .arg(&spec)
        .args(["--audit", "journal", "--journal"])
        .arg(&journal)
        .args(flags)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmaudit run");
    let stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let child = ChildGuard(child);
    let vmaudit = child.0.id();
    let mut lines = stderr.lines().map_while(Result::ok);
    let emulator: u32 = lines
        .by_ref()
        .find_map(|l| {
            l.split("emulator pid ")
                .nth(1)
                .and_then(|p| p.trim().parse().ok())
        })
        .expect("vmaudit run never said the VM runs");
    // Its later stderr (violations) is read on a thread of its own, so that vmaudit never
    // blocks on a full pipe.
    let violations = std::thread::spawn(move || {
        lines
            .filter(|l| l.contains("VIOLATION"))
            .collect::<Vec<_>>()
    });
    let sample = |cycle: usize, start: Instant| Sample {
        cycle,
        at: start.elapsed(),
        vmaudit_fds: fds(vmaudit),
        vmaudit_rss_kib: rss_kib(vmaudit),
        emulator_fds: fds(emulator),
        emulator_rss_kib: rss_kib(emulator),
    };
    let every = (o.cycles / 10).max(1);
    let start = Instant::now();
    let mut samples = vec![sample(0, start)];
    for i in 1..=o.cycles {
        let mac = format!("52:54:00:5b:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff);
        let a = ask(&Request::AttachNet {
            mac: mac.clone(),
            backend: vmaudit::runtime::spec::Backend::Tap,
            parent: None,
            ifname: None,
            queues: 1,
        });
        assert!(a.ok, "cycle {i}: attach: {}", a.message);
        let d = ask(&Request::DetachNet {
            mac,
            timeout_ms: 5000,
        });
        assert!(d.ok, "cycle {i}: detach: {}", d.message);
        if i % every == 0 {
            samples.push(sample(i, start));
        }
    }
    let took = start.elapsed();
    // SAFETY: SIGTERM to the vmaudit this benchmark started.
    unsafe { libc::kill(vmaudit as i32, libc::SIGTERM) };
    let mut child = child;
    let status = child.0.wait().expect("wait vmaudit");
    let violations = violations.join().expect("stderr reader");
    let text = std::fs::read_to_string(&journal).expect("journal");
    let mut status_count = std::collections::BTreeMap::<String, usize>::new();
    let mut records = 0;
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).expect("journal line");
        if v["type"] == "verdict" {
            *status_count
                .entry(v["status"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
        } else if v["text"].is_string() {
            records += 1;
        }
    }
    let first = samples[1.min(samples.len() - 1)];
    let last = *samples.last().expect("samples");
    assert_eq!(
        (first.vmaudit_fds, first.emulator_fds),
        (last.vmaudit_fds, last.emulator_fds),
        "fds leaked over {} cycles: {samples:#?}",
        o.cycles
    );
    Soaked {
        took,
        samples,
        records,
        verdicts: status_count,
        exit: status.code(),
        violations,
    }
}

fn report(what: &str, o: &Opts, s: &Soaked) -> String {
    let mut t = format!("**{what}**\n\n");
    let _ = writeln!(
        t,
        "| cycle | elapsed | vmaudit fds | vmaudit RSS (MiB) | emulator fds | emulator RSS (MiB) |"
    );
    let _ = writeln!(t, "|---:|---:|---:|---:|---:|---:|");
    for x in &s.samples {
        let _ = writeln!(
            t,
            "| {} | {:.1} s | {} | {:.1} | {} | {:.1} |",
            x.cycle,
            x.at.as_secs_f64(),
            x.vmaudit_fds,
            x.vmaudit_rss_kib as f64 / 1024.0,
            x.emulator_fds,
            x.emulator_rss_kib as f64 / 1024.0
        );
    }
    let (first, last) = (
        s.samples[1.min(s.samples.len() - 1)],
        s.samples[s.samples.len() - 1],
    );
    let growth = |a: u64, b: u64| (b as f64 - a as f64) / 1024.0;
    let v: Vec<String> = s.verdicts.iter().map(|(k, n)| format!("{n} {k}")).collect();
    let _ = writeln!(
        t,
        "\n{:.0} cycles/s; {} records and {} verdicts ({}) journaled; `vmaudit run` exited \
         {}. fds from cycle {} to {}: vmaudit {} → {}, emulator {} → {} (equal, or the run \
         fails). RSS from cycle {} to {}: vmaudit {:+.1} MiB, emulator {:+.1} MiB.\n",
        o.cycles as f64 / s.took.as_secs_f64(),
        s.records,
        s.verdicts.values().sum::<usize>(),
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        },
        s.exit
            .map_or_else(|| "by a signal".to_owned(), |c| c.to_string()),
        first.cycle,
        last.cycle,
        first.vmaudit_fds,
        last.vmaudit_fds,
        first.emulator_fds,
        last.emulator_fds,
        first.cycle,
        last.cycle,
        growth(first.vmaudit_rss_kib, last.vmaudit_rss_kib),
        growth(first.emulator_rss_kib, last.emulator_rss_kib),
    );
    if let Some(v) = s.violations.first() {
        let _ = writeln!(
            t,
            "The verifier found {} violation(s); the first: `{}`\n",
            s.violations.len(),
            v.split_once("VIOLATION: ")
                .map_or(v.as_str(), |(_, rest)| rest)
        );
    }
    t
}
