//! (d) Scale of monitor mode: N stand-in emulators with 4 tap fds each, one `vmaudit monitor`.
//!
//! This process plays the manager: for each VM it opens 4 taps (named, with libvirt's host-side
//! address), starts a stand-in emulator (`sleep`) that inherits them, closes its own copies, and
//! writes libvirt's records for it (4
//! `reason=open`, 4 `reason=start`, the VIRT_CONTROL start) to an audit.log that `vmaudit
//! monitor --audit-log` follows, watching this process and its children. Measured per N: the
//! time from the records being written to the last of the N x 9 verdicts, and from the first
//! kernel event (the first tap opened) to it; the monitor's CPU time for the kernel events and
//! for the whole; every verdict's status (all must come, or the run fails); the monitor's peak
//! RSS and the kernel memory of its BPF maps.
//!
//! Sizes: 10, 100 and 1000 VMs (`--quick`: 10 and 100; `--vms N,N,...` to choose).

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

const IFACES: usize = 4;
const CLAIMS_PER_VM: usize = 2 * IFACES + 1;

struct Outcome {
    vms: usize,
    elapsed: Duration,
    /// From the first kernel event to the last verdict.
    from_events: Duration,
    /// The monitor's CPU time while the VMs were made (their kernel events), and in all.
    cpu_events: Duration,
    cpu_all: Duration,
    verdicts: usize,
    confirmed: usize,
    hwm_kib: u64,
    map_kib: u64,
}

fn field_kib(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Sum of `memlock:` over the BPF maps process `pid` holds (the kernel's own accounting).
fn map_memory_kib(pid: u32) -> u64 {
    let mut total = 0u64;
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    for f in fds.flatten() {
        let Ok(info) = std::fs::read_to_string(f.path()) else {
            continue;
        };
        if !info.contains("map_type:") {
            continue;
        }
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total / 1024
}

fn run_one(bins: &Bins, vms: usize) -> Outcome {
    let dir = std::env::temp_dir().join(format!("vmaudit-scalebench-{}-{vms}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let log = dir.join("audit.log");
    File::create(&log).expect("audit.log");
    let me = std::process::id().to_string();
    let mut child = Command::new(&bins.vmaudit)
        .args(["monitor", "--manager", &me, "--audit-log"])
        .arg(&log)
        .arg("--journal")
        .arg(dir.join("journal.jsonl"))
        .args(["--deadline-ms", "30000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmaudit monitor");
    let mon_pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let monitor = ChildGuard(child);
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if l.contains("monitoring manager pid") {
                let _ = ready_tx.send(());
            } else if l.starts_with("vmaudit: warning: ") {
                eprintln!("[monitor] {l}");
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the monitor never said it was watching");
    let (vtx, vrx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
            if v["status"] != "confirmed" {
                eprintln!(
                    "scalebench: not confirmed: {} {}: {}",
                    v["claim"]["kind"], v["status"], v["reason"]
                );
            }
            if vtx
                .send(v["status"].as_str().unwrap_or("?").to_owned())
                .is_err()
            {
                return;
            }
        }
    });

    // The VMs: 4 tun fds each, inherited by a stand-in emulator.
    // As libvirt does: the manager opens each tap (named, with the host-side address libvirt
    // gives it: the guest MAC with first byte 0xfe), passes it to the emulator and closes its
    // own copy. The monitor finds each NIC's fd in the emulator by that address.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("a socket for SIOCSIFHWADDR");
    let cpu0 = crate::tracers::cpu_ns(mon_pid);
    let first_event = Instant::now();
    let mut emulators: Vec<ChildGuard> = Vec::new();
    let mut text = String::new();
    let mut serial = 0u64;
    for i in 0..vms {
        let macs: Vec<[u8; 6]> = (0..IFACES)
            .map(|k| [0x52, 0x54, 0x00, (i >> 8) as u8, (i & 0xff) as u8, k as u8])
            .collect();
        let fds: Vec<File> = macs
            .iter()
            .map(|mac| manager::tap(&sock, "vsb%d", mac))
            .collect();
        let passed: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut cmd = Command::new("sleep");
        cmd.arg("3600").stdin(Stdio::null()).stdout(Stdio::null());
        // SAFETY: only fcntl (async-signal-safe) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &passed {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let em = cmd.spawn().expect("spawn the stand-in emulator");
        drop(fds);
        let pid = em.id();
        emulators.push(ChildGuard(em));
        let macs: Vec<String> = macs
            .iter()
            .map(|m| {
                m.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            })
            .collect();
        let name = format!("vsb{i}");
        let uuid = format!("5ca1ab1e-0000-4000-8000-{i:012x}");
        for mac in &macs {
            text.push_str(&manager::record(
                "VIRT_RESOURCE",
                &mut serial,
                &format!("resrc=net reason=open vm=\"{name}\" uuid={uuid} net={mac} path=\"/dev/net/tun\" rdev=0A:C8"),
            ));
        }
        for mac in &macs {
            text.push_str(&manager::record(
                "VIRT_RESOURCE",
                &mut serial,
                &format!("resrc=net reason=start vm=\"{name}\" uuid={uuid} old-net=\"?\" new-net=\"{mac}\""),
            ));
        }
        text.push_str(&manager::record(
            "VIRT_CONTROL",
            &mut serial,
            &format!("op=start reason=booted vm=\"{name}\" uuid={uuid} vm-pid={pid}"),
        ));
    }
    let want = vms * CLAIMS_PER_VM;
    let cpu_events = crate::tracers::cpu_ns(mon_pid) - cpu0;
    let t0 = Instant::now();
    let mut f = OpenOptions::new().append(true).open(&log).expect("append");
    f.write_all(text.as_bytes()).expect("write records");
    f.flush().expect("flush");
    let mut confirmed = 0;
    let mut verdicts = 0;
    while verdicts < want {
        match vrx.recv_timeout(Duration::from_secs(60)) {
            Ok(s) => {
                verdicts += 1;
                confirmed += usize::from(s == "confirmed");
            }
            Err(e) => panic!(
                "{vms} VMs: {verdicts} of {want} claims judged, then nothing for 60 s ({e:?})"
            ),
        }
    }
    let elapsed = t0.elapsed();
    let from_events = first_event.elapsed();
    let cpu_all = crate::tracers::cpu_ns(mon_pid) - cpu0;
    let status = std::fs::read_to_string(format!("/proc/{mon_pid}/status")).unwrap_or_default();
    let hwm_kib = field_kib(&status, "VmHWM:");
    let map_kib = map_memory_kib(mon_pid);
    // SAFETY: kill with our own child's pid.
    unsafe { libc::kill(mon_pid as i32, libc::SIGTERM) };
    drop(monitor);
    drop(emulators);
    if std::env::var_os("VMBENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Outcome {
        vms,
        elapsed,
        from_events,
        cpu_events: Duration::from_nanos(cpu_events),
        cpu_all: Duration::from_nanos(cpu_all),
        verdicts,
        confirmed,
        hwm_kib,
        map_kib,
    }
}

pub struct Opts {
    pub vms: Vec<usize>,
}

pub fn run(bins: &Bins, opts: &Opts, quick: bool) -> String {
    // 4 fds per VM stay open here for the whole run.
    let lim = libc::rlimit {
        rlim_cur: 65536,
        rlim_max: 65536,
    };
    // SAFETY: setrlimit with a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    let started = Instant::now();
    let mut rows = Vec::new();
    for &n in &opts.vms {
        let o = run_one(bins, n);
        eprintln!(
            "scale: {} VMs: {} of {} verdicts ({} confirmed) in {:?}, VmHWM {} KiB, maps {} KiB",
            o.vms,
            o.verdicts,
            o.vms * CLAIMS_PER_VM,
            o.confirmed,
            o.elapsed,
            o.hwm_kib,
            o.map_kib
        );
        rows.push(o);
    }
    let mut body = report::header(
        "one `vmaudit monitor --audit-log` watching the driver as the manager; per VM 4 taps (TUNSETIFF, libvirt's host-side address) inherited by a stand-in emulator (`sleep`), the manager's copies closed, and 9 libvirt records: 4 open, 4 start, the VIRT_CONTROL start, written at once",
        &report::machine(),
        started.elapsed(),
        quick,
    );
    let _ = writeln!(
        body,
        "| VMs × interfaces | claims | judged | confirmed | records written → last verdict | first kernel event → last verdict | monitor CPU: kernel events / in all | monitor peak RSS | kernel map memory | goal |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for o in &rows {
        let goal = if o.vms == 1000 {
            "≤ 2 s, RSS ≤ 64 MiB"
        } else {
            ""
        };
        let _ = writeln!(
            body,
            "| {} × {IFACES} | {} | {} | {} | {:.3} s | {:.3} s | {:.3} s / {:.3} s | {:.1} MiB | {:.1} MiB | {goal} |",
            o.vms,
            o.vms * CLAIMS_PER_VM,
            o.verdicts,
            o.confirmed,
            o.elapsed.as_secs_f64(),
            o.from_events.as_secs_f64(),
            o.cpu_events.as_secs_f64(),
            o.cpu_all.as_secs_f64(),
            o.hwm_kib as f64 / 1024.0,
            o.map_kib as f64 / 1024.0
        );
    }
    if let Some(o) = rows.iter().find(|o| o.vms == 1000) {
        let met = o.elapsed <= Duration::from_secs(2) && o.hwm_kib <= 64 * 1024;
        let _ = writeln!(
            body,
            "\nGoal in this run (1000 VMs judged in ≤ 2 s from the records, RSS ≤ 64 MiB): {:.3} s, {:.1} MiB: {}.",
            o.elapsed.as_secs_f64(),
            o.hwm_kib as f64 / 1024.0,
            crate::report::goal(met)
        );
    }
    body
}
