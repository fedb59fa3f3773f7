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
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .expect("read the answer");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

pub fn run(bins: &Bins, o: &Opts, quick: bool) -> String {
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
    let mut t = report(
        o,
        quick,
        took,
        &samples,
        records,
        &status_count,
        status.code(),
    );
    if let Some(first) = violations.first() {
        let _ = writeln!(
            t,
            "The verifier found {} violation(s); the first: `{}`\n",
            violations.len(),
            first.trim_start_matches("vmaudit: VIOLATION: ")
        );
    }
    t
}

fn report(
    o: &Opts,
    quick: bool,
    took: Duration,
    samples: &[Sample],
    records: usize,
    verdicts: &std::collections::BTreeMap<String, usize>,
    exit: Option<i32>,
) -> String {
    let mut t = header(
        &format!(
            "{} attach/detach cycles of one tap on the stand-in emulator (QMP acknowledging each \
             unplug at once), over the control socket, with the verifier on and the journal on \
             disk",
            o.cycles
        ),
        &machine(),
        took,
        quick,
    );
    let _ = writeln!(
        t,
        "| cycle | elapsed | vmaudit fds | vmaudit RSS (MiB) | emulator fds | emulator RSS (MiB) |"
    );
    let _ = writeln!(t, "|---:|---:|---:|---:|---:|---:|");
    for s in samples {
        let _ = writeln!(
            t,
            "| {} | {:.1} s | {} | {:.1} | {} | {:.1} |",
            s.cycle,
            s.at.as_secs_f64(),
            s.vmaudit_fds,
            s.vmaudit_rss_kib as f64 / 1024.0,
            s.emulator_fds,
            s.emulator_rss_kib as f64 / 1024.0
        );
    }
    let (first, last) = (
        samples[1.min(samples.len() - 1)],
        samples[samples.len() - 1],
    );
    let growth = |a: u64, b: u64| (b as f64 - a as f64) / 1024.0;
    let v: Vec<String> = verdicts.iter().map(|(k, n)| format!("{n} {k}")).collect();
    let _ = writeln!(
        t,
        "\n{:.0} cycles/s; {records} records and {} verdicts ({}) journaled; `vmaudit run` exited \
         {}. fds from cycle {} to {}: vmaudit {} → {}, emulator {} → {} (equal, or the run \
         fails). RSS from cycle {} to {}: vmaudit {:+.1} MiB, emulator {:+.1} MiB.\n",
        o.cycles as f64 / took.as_secs_f64(),
        verdicts.values().sum::<usize>(),
        v.join(", "),
        exit.map_or_else(|| "by a signal".to_owned(), |c| c.to_string()),
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
    t
}
