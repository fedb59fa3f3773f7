//! (c) Claim-to-verdict latency: `vmaudit run` of a VM with 16 tap interfaces and the stand-in
//! emulator (which is up at once), stopped as soon as it runs, several times; every verdict's
//! `latency_ns` (from the moment both the claim and the kernel event that decided it existed,
//! to the verdict) collected from the journals.

use std::{
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

pub fn run(bins: &Bins, o: &Opts, quick: bool) -> String {
    let machine = machine();
    let started = Instant::now();
    let dir = ScratchDir(
        std::env::temp_dir().join(format!("vmaudit-verdictbench-{}", std::process::id())),
    );
    std::fs::create_dir_all(&dir.0).expect("bench dir");
    let mut lat: Vec<u64> = Vec::new();
    let mut verdicts = 0usize;
    for run in 0..o.runs {
        let spec = dir.0.join("vm.toml");
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
        std::fs::write(&spec, text).expect("spec");
        let journal = dir.0.join(format!("j{run}.jsonl"));
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
        // SAFETY: kill(2) on the pid of our own, not yet reaped, child.
        unsafe { libc::kill(guard.0.id() as i32, libc::SIGTERM) };
        let _ = guard.0.wait();
        let text = std::fs::read_to_string(&journal).expect("read the run's journal");
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).expect("journal line");
            if v["type"] == "verdict" {
                verdicts += 1;
                if let Some(n) = v["latency_ns"].as_u64() {
                    lat.push(n);
                }
            }
        }
    }
    assert!(
        !lat.is_empty(),
        "no verdict carried a latency: the journals are not what this benchmark reads"
    );
    lat.sort_unstable();
    let us = |q: f64| quantile(&lat, q) as f64 / 1e3;
    let mut t = header(
        &format!(
            "{} runs of `vmaudit run` with 16 tap interfaces and the stand-in emulator; {verdicts} verdicts, {} of them decided by a kernel event",
            o.runs,
            lat.len()
        ),
        &machine,
        started.elapsed(),
        quick,
    );
    let _ = writeln!(t, "| kernel event to verdict | µs | goal |");
    let _ = writeln!(t, "|---|---:|---:|");
    let _ = writeln!(t, "| p50 | {:.0} | |", us(0.5));
    let _ = writeln!(t, "| p99 | {:.0} | ≤ 1000 |", us(0.99));
    let _ = writeln!(t, "| max | {:.0} | |", us(1.0));
    print!("{t}");
    t
}
