//! (g) Monitor mode over many VM lifecycles: does its memory stay flat?
//!
//! One `vmaudit monitor --audit-log` follows this process as the manager. VMs come and go in
//! batches: for each, a tap (TUNSETIFF, libvirt's host-side address) inherited by a stand-in
//! emulator (`sleep`), libvirt's open, start and VIRT_CONTROL start records; once their
//! verdicts are in, the emulators are killed and the stop records written, and their verdicts
//! awaited. The monitor's resident memory is read after every tenth of the run.
//!
//! Size: 10,000 lifecycles in batches of 50 (`--quick`: 1,000).

use std::{
    fmt::Write as _,
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use vmaudit_tests::{Bins, ChildGuard, manager};

use crate::report;

const BATCH: usize = 50;

/// The monitor, its verdicts as they come (status), and its pid.
struct Monitor {
    _child: ChildGuard,
    pid: u32,
    verdicts: mpsc::Receiver<(String, String)>,
}

impl Monitor {
    fn start(bins: &Bins, log: &std::path::Path, journal: &std::path::Path) -> Self {
        let me = std::process::id().to_string();
        let mut child = Command::new(&bins.vmaudit)
            .args(["monitor", "--manager", &me, "--audit-log"])
            .arg(log)
            .arg("--journal")
            .arg(journal)
            .args(["--journal-mode", "verdicts"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmaudit monitor");
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                if l.contains("monitoring manager pid") {
                    let _ = ready_tx.send(());
                } else {
                    eprintln!("[monitor] {l}");
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the monitor never said it was watching");
        let (tx, verdicts) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
                let kind = v["claim"]["kind"].as_str().unwrap_or("?").to_owned();
                let status = v["status"].as_str().unwrap_or("?").to_owned();
                if tx.send((kind, status)).is_err() {
                    return;
                }
            }
        });
        Self {
            _child: ChildGuard(child),
            pid,
            verdicts,
        }
    }

    /// Waits for `n` verdicts; how many were confirmed.
    fn await_verdicts(&self, n: usize) -> usize {
        (0..n)
            .map(|_| {
                let (kind, status) = self
                    .verdicts
                    .recv_timeout(Duration::from_secs(60))
                    .expect("a verdict within 60 s");
                if status != "confirmed" {
                    eprintln!("lifecycles: {kind} {status}");
                }
                usize::from(status == "confirmed")
            })
            .sum()
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .expect("the monitor's VmRSS")
    }
}

/// One batch of VMs, `first..first + BATCH`: their start records, written once their
/// emulators hold their taps.
fn start_batch(first: usize, log: &mut File, serial: &mut u64) -> Vec<ChildGuard> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("a socket for SIOCSIFHWADDR");
    let mut text = String::new();
    let mut emulators = Vec::new();
    for i in first..first + BATCH {
        let mac = [0x52, 0x54, 0x00, (i >> 16) as u8, (i >> 8) as u8, i as u8];
        let tap = manager::tap(&sock, "vlc%d", &mac);
        let fd = tap.as_raw_fd();
        let mut cmd = Command::new("sleep");
        cmd.arg("3600").stdin(Stdio::null()).stdout(Stdio::null());
        // SAFETY: only fcntl (async-signal-safe) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let em = cmd.spawn().expect("spawn the stand-in emulator");
        drop(tap);
        let mac = mac.map(|b| format!("{b:02x}")).join(":");
        let (name, uuid) = (
            format!("vlc{i}"),
            format!("1ec1cc1e-0000-4000-8000-{i:012x}"),
        );
        for (kind, body) in [
            (
                "VIRT_RESOURCE",
                format!(
                    "resrc=net reason=open vm=\"{name}\" uuid={uuid} net={mac} path=\"/dev/net/tun\" rdev=0A:C8"
                ),
            ),
            (
                "VIRT_RESOURCE",
                format!(
                    "resrc=net reason=start vm=\"{name}\" uuid={uuid} old-net=\"?\" new-net=\"{mac}\""
                ),
            ),
            (
                "VIRT_CONTROL",
                format!(
                    "op=start reason=booted vm=\"{name}\" uuid={uuid} vm-pid={}",
                    em.id()
                ),
            ),
        ] {
            text.push_str(&manager::record(kind, serial, &body));
        }
        emulators.push(ChildGuard(em));
    }
    log.write_all(text.as_bytes()).expect("write records");
    emulators
}

/// Kills the batch's emulators, then writes their stop records.
fn stop_batch(first: usize, emulators: Vec<ChildGuard>, log: &mut File, serial: &mut u64) {
    drop(emulators);
    let mut text = String::new();
    for i in first..first + BATCH {
        let (name, uuid) = (
            format!("vlc{i}"),
            format!("1ec1cc1e-0000-4000-8000-{i:012x}"),
        );
        text.push_str(&manager::record(
            "VIRT_CONTROL",
            serial,
            &format!("op=stop reason=destroyed vm=\"{name}\" uuid={uuid} vm-pid=0"),
        ));
    }
    log.write_all(text.as_bytes()).expect("write stop records");
}

pub fn run(bins: &Bins, quick: bool) -> String {
    let total = if quick { 1_000 } else { 10_000 };
    let dir = std::env::temp_dir().join(format!("vmaudit-lifecycles-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let log_path = dir.join("audit.log");
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .expect("audit.log");
    let m = Monitor::start(bins, &log_path, &dir.join("journal.jsonl"));
    let started = Instant::now();
    let mut serial = 0u64;
    let mut confirmed = 0;
    let mut rows: Vec<(usize, u64, Duration)> = vec![(0, m.rss_kib(), Duration::ZERO)];
    for first in (0..total).step_by(BATCH) {
        let emulators = start_batch(first, &mut log, &mut serial);
        confirmed += m.await_verdicts(3 * BATCH);
        stop_batch(first, emulators, &mut log, &mut serial);
        confirmed += m.await_verdicts(BATCH);
        let done = first + BATCH;
        if done.is_multiple_of(total / 10) {
            rows.push((done, m.rss_kib(), started.elapsed()));
            eprintln!(
                "lifecycles: {done} done, monitor RSS {} KiB",
                rows.last().unwrap().1
            );
        }
    }
    let claims = 4 * total;
    if confirmed == claims {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!(
            "lifecycles: not every claim confirmed: the journal is kept in {}",
            dir.display()
        );
    }
    let mut body = report::header(
        "one `vmaudit monitor --audit-log` watching the driver as the manager; VMs in batches of 50, each a tap inherited by a stand-in emulator (`sleep`), its open, start and VIRT_CONTROL start records, then the emulator killed and its stop record; the monitor's VmRSS read after each tenth",
        &report::machine(),
        started.elapsed(),
        quick,
    );
    let _ = writeln!(
        body,
        "{total} lifecycles, {claims} claims, {confirmed} confirmed.\n\n| lifecycles done | monitor RSS | elapsed |\n|---:|---:|---:|"
    );
    for (done, rss, t) in &rows {
        let _ = writeln!(
            body,
            "| {done} | {:.1} MiB | {:.1} s |",
            *rss as f64 / 1024.0,
            t.as_secs_f64()
        );
    }
    body
}
