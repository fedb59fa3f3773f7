//! (f) The dashboard at 1,000 VMs × 4 fds: the time the page takes to apply one update and to
//! render it, in Debian's headless Chromium.
//!
//! A hub (`vmaudit::serve`) is served from this process and fed by it: what the page does
//! depends only on the events it receives, so the events are made here, a stand-in for the
//! verifier: 1,000 running VMs, each an emulator holding 4 fds, the tap's claim tagged on its
//! fd and confirmed. The page loads the state; then, one update at a time, this process makes
//! the update and waits, through the page's `dashboard.waitSeq`, for the frame that painted it,
//! whose timings (the page's own `performance.now()`) are the figures: `apply` (the events and
//! the DOM writes), `frame` (through style, layout and paint: until a task posted from the frame
//! runs), `latency` (from the event's arrival to that point). Last, a burst of 4,000 fd events
//! at once: how many frames the page spreads it over, and the longest.
//!
//! Size: 200 updates of each kind (`--quick`: 40).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use headless_chrome::{
    Browser, LaunchOptions, Tab, protocol::cdp::Page::CaptureScreenshotFormatOption,
};
use serde_json::Value;
use vmaudit::{
    observe::table::{FdRecord, Op, Outcome},
    procfs::{DevNum, FdIdentity, FileKind, Source},
    serve::Hub,
    verify::{
        Claim, ClaimKind, ClaimRef, Evidence, Handed, Status, Verdict,
        observer::{Observer as _, VmInfo},
    },
};
use vmaudit_tests::Bins;

use crate::report;

const VMS: u32 = 1000;
/// A device number: major, minor.
type Rdev = Option<(u32, u32)>;
/// The fds of each stand-in emulator: the tap (claimed), vhost-net, kvm, the disk image.
const FDS: [(i32, &str, Rdev); 4] = [
    (3, "/dev/net/tun", Some((10, 200))),
    (4, "/dev/vhost-net", Some((10, 238))),
    (5, "/dev/kvm", Some((10, 232))),
    (6, "/var/lib/vms/disk.img", None),
];
/// The fd the updates close and open again.
const MOVING_FD: usize = 3;
const PATIENCE: Duration = Duration::from_secs(60);

fn pid(vm: u32) -> u32 {
    400_000 + vm
}

fn name(vm: u32) -> String {
    format!("bench-vm-{vm:04}")
}

fn uuid(vm: u32) -> String {
    format!("da5b0a2d-0000-4000-8000-{vm:012}")
}

fn record(vm: u32, op: Op, i: usize) -> FdRecord {
    let (fd, path, rdev) = FDS[i];
    FdRecord {
        ty: "fd",
        ts: vmaudit::observe::monotonic_ns(),
        pid: pid(vm),
        tid: pid(vm),
        op,
        syscall: if op == Op::Close { "close" } else { "openat" },
        fd: Some(fd),
        result: Outcome::Ok,
        cloexec: Some(false),
        from_fd: None,
        file: Some(FdIdentity {
            path: path.into(),
            kind: if rdev.is_some() {
                FileKind::Char
            } else {
                FileKind::Regular
            },
            rdev: rdev.map(|(major, minor)| DevNum { major, minor }),
            dev: None,
            ino: None,
            flags: None,
            mode: None,
            ofd: None,
            iface: (i == 0).then(|| format!("vmtap{vm}")),
            source: Source::Kernel,
        }),
    }
}

fn verdict(vm: u32, status: Status) -> Verdict {
    let claim = ClaimRef {
        id: u64::from(vm) + 1,
        kind: "net-start".into(),
        ..ClaimRef::default()
    };
    let ev = Evidence {
        pid: pid(vm),
        fd: Some(FDS[0].0),
        what: "inherit".into(),
        path: Some(FDS[0].1.into()),
        ..Evidence::default()
    };
    Verdict::new(claim, status, "the emulator holds the tap", vec![ev])
}

/// What the verifier would have told the hub of 1,000 VMs started and confirmed.
fn populate(hub: &Hub) {
    for vm in 0..VMS {
        for i in 0..FDS.len() {
            hub.fd(&record(vm, Op::Inherit, i));
        }
        let claim = Claim {
            id: u64::from(vm) + 1,
            kind: ClaimKind::NetUp {
                mac: format!("52:54:00:00:{:02x}:{:02x}", vm >> 8, vm & 0xff),
                attach: false,
                emulator_pid: Some(pid(vm)),
                handed: vec![Handed {
                    fd: 30,
                    emulator_fd: FDS[0].0,
                    same_at_handoff: Some(true),
                    rdev: None,
                    path: FDS[0].1.into(),
                }],
            },
            vm_name: name(vm),
            uuid: uuid(vm),
            success: true,
            sender: None,
            text: String::new(),
            record_ts_ns: 0,
            made_ns: 0,
            historic: false,
        };
        hub.claim(&claim);
        hub.vm(&VmInfo {
            name: name(vm),
            uuid: uuid(vm),
            pid: pid(vm),
            state: "running",
        });
        hub.verdict(&verdict(vm, Status::Confirmed));
    }
}

/// Serves `hub` on loopback from a thread of its own (a current-thread tokio runtime).
fn serve(hub: Arc<Hub>) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        rt.block_on(async move {
            let server =
                vmaudit::serve::start("127.0.0.1:0".parse().unwrap(), hub).expect("serve the hub");
            tx.send(server.local_addr()).unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv_timeout(PATIENCE).expect("the server's address")
}

/// Evaluates `js`, a promise of JSON text, and parses it.
fn eval_json(tab: &Tab, js: &str) -> Value {
    let v = tab
        .evaluate(js, true)
        .unwrap_or_else(|e| panic!("{js}: {e}"))
        .value
        .unwrap_or_else(|| panic!("{js}: no value"));
    serde_json::from_str(v.as_str().unwrap_or_else(|| panic!("{js}: {v}")))
        .unwrap_or_else(|e| panic!("{js}: {e}"))
}

/// The frame that painted event `seq`.
fn painted(tab: &Tab, seq: u64) -> Value {
    eval_json(
        tab,
        &format!("dashboard.waitSeq({seq}).then(f => JSON.stringify(f))"),
    )
}

/// The count of elements matching `selector`.
fn count(tab: &Tab, selector: &str) -> u64 {
    tab.evaluate(
        &format!("document.querySelectorAll({selector:?}).length"),
        false,
    )
    .expect("evaluate")
    .value
    .and_then(|v| v.as_u64())
    .expect("a count")
}

/// Timings of one update kind: (apply, frame, latency) per update, ms.
#[derive(Default)]
struct Kind {
    apply: Vec<f64>,
    frame: Vec<f64>,
    latency: Vec<f64>,
    events: Vec<f64>,
}

impl Kind {
    fn push(&mut self, f: &Value) {
        let ms = |k: &str| f[k].as_f64().unwrap_or_else(|| panic!("{k} in {f}"));
        self.apply.push(ms("apply_ms"));
        self.frame.push(ms("frame_ms"));
        self.latency.push(ms("latency_ms"));
        self.events.push(ms("events"));
    }
}

/// `p50 / p99 / max` of `v`, ms.
fn dist(v: &[f64]) -> String {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let q = |p: f64| s[((s.len() as f64 - 1.0) * p).round() as usize];
    format!("{:.1} / {:.1} / {:.1}", q(0.5), q(0.99), s[s.len() - 1])
}

/// Makes `rounds` updates with `update(round)`, each waited for until painted.
fn measure(tab: &Tab, hub: &Hub, rounds: u32, update: impl Fn(u32)) -> Kind {
    let mut k = Kind::default();
    for r in 0..rounds {
        update(r);
        k.push(&painted(tab, hub.seq()));
    }
    k
}

pub fn run(bins: &Bins, quick: bool) -> String {
    let rounds = if quick { 40 } else { 200 };
    let started = Instant::now();
    let machine = report::machine();
    let hub = Hub::new();
    populate(&hub);
    let addr = serve(hub.clone());
    let state_bytes = ureq::get(format!("http://{addr}/api/state"))
        .call()
        .and_then(|r| r.into_body().read_to_string())
        .expect("/api/state")
        .len();

    let browser = Browser::new(LaunchOptions {
        path: Some("/usr/bin/chromium".into()),
        headless: true,
        // As root, chromium runs only without its sandbox.
        sandbox: false,
        window_size: Some((1400, 1000)),
        args: vec![std::ffi::OsStr::new("--disable-gpu")],
        idle_browser_timeout: PATIENCE * 10,
        ..LaunchOptions::default()
    })
    .expect("headless chromium (cargo xtask setup installs Debian's chromium)");
    let tab = browser.new_tab().expect("a tab");
    tab.set_default_timeout(PATIENCE);
    tab.navigate_to(&format!("http://{addr}/"))
        .and_then(|t| t.wait_until_navigated())
        .expect("the dashboard loads");
    painted(&tab, hub.seq());
    let load = eval_json(&tab, "Promise.resolve(JSON.stringify(dashboard.load))");
    let rows = count(&tab, "section.fdtable tr.fd");
    assert_eq!(
        rows,
        u64::from(VMS) * FDS.len() as u64,
        "every fd of every VM on the page"
    );
    assert_eq!(count(&tab, "#vm-rows tr.vm"), u64::from(VMS));

    let vm_of = |r: u32| (r * 7919) % VMS;
    let closed = measure(&tab, &hub, rounds, |r| {
        hub.fd(&record(vm_of(r), Op::Close, MOVING_FD))
    });
    assert_eq!(
        count(&tab, "section.fdtable tr.fd"),
        rows - u64::from(rounds)
    );
    let opened = measure(&tab, &hub, rounds, |r| {
        hub.fd(&record(vm_of(r), Op::Open, MOVING_FD))
    });
    assert_eq!(count(&tab, "section.fdtable tr.fd"), rows);
    let verdicts = measure(&tab, &hub, rounds, |r| {
        hub.verdict(&verdict(vm_of(r), Status::Violated))
    });
    assert_eq!(
        count(&tab, "#verdict-rows tr.verdict.violated"),
        u64::from(rounds)
    );

    // The burst: every VM's moving fd closed and opened again, twice.
    let first = hub.seq() + 1;
    for _ in 0..2 {
        for vm in 0..VMS {
            hub.fd(&record(vm, Op::Close, MOVING_FD));
            hub.fd(&record(vm, Op::Open, MOVING_FD));
        }
    }
    let last = hub.seq();
    painted(&tab, last);
    let frames = eval_json(
        &tab,
        &format!(
            "Promise.resolve(JSON.stringify(dashboard.frames.filter(f => f.seq >= {first} && f.events > 0)))"
        ),
    );
    let frames = frames.as_array().expect("frames");
    let burst_events: f64 = frames.iter().map(|f| f["events"].as_f64().unwrap()).sum();
    assert_eq!(
        burst_events as u64,
        last - first + 1,
        "every burst event applied: {frames:?}"
    );
    let burst_frames: Vec<f64> = frames
        .iter()
        .map(|f| f["frame_ms"].as_f64().unwrap())
        .collect();
    let longest = frames
        .iter()
        .max_by(|a, b| {
            a["frame_ms"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["frame_ms"].as_f64().unwrap())
        })
        .expect("a frame");
    let burst_ms = frames
        .iter()
        .map(|f| f["end"].as_f64().unwrap())
        .fold(0.0, f64::max)
        - frames
            .iter()
            .map(|f| f["first_rx"].as_f64().unwrap())
            .fold(f64::INFINITY, f64::min);
    // Frames that only moved the time axis (the plots redrawn once a second).
    let ticks = eval_json(
        &tab,
        "Promise.resolve(JSON.stringify(dashboard.frames.filter(f => f.events === 0 && f.plots > 0).map(f => f.frame_ms)))",
    );
    let ticks: Vec<f64> = ticks
        .as_array()
        .expect("tick frames")
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();

    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .expect("screenshot");
    let shot = bins
        .vmaudit
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("vmaudit-dashboard-1000.png");
    std::fs::write(&shot, png).expect("write the screenshot");
    eprintln!("dashboard: screenshot {}", shot.display());

    let mut body = report::header(
        "`vmbench` serves a hub it feeds itself (a stand-in for the verifier: 1,000 running VMs, each an emulator with 4 fds, the tap claimed and confirmed) to Debian's headless Chromium (1400×1000, no GPU), makes one update at a time and reads the page's own timings of the frame that painted it",
        &machine,
        started.elapsed(),
        quick,
    );
    let ms = |k: &str| load[k].as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(
        body,
        "Page load: `/api/state` {:.1} MiB, fetched and parsed in {:.0} ms, rendered ({} VM rows, {rows} fd rows, 1,000 verdicts kept, 500 shown) in {:.0} ms, painted {:.0} ms after the fetch.\n",
        state_bytes as f64 / (1024.0 * 1024.0),
        ms("fetch_ms"),
        VMS,
        ms("render_ms"),
        ms("painted_ms"),
    );
    let _ = writeln!(
        body,
        "| update ({rounds} each) | apply, ms (p50 / p99 / max) | frame, ms | arrival to painted, ms |\n|---|---:|---:|---:|"
    );
    for (what, k) in [
        (
            "an fd closed (its row removed, the VM's count, two plots)",
            &closed,
        ),
        ("an fd opened (its row inserted in order)", &opened),
        (
            "a verdict (its row, the fd's claim tag, the VM's counts, the verdict plot)",
            &verdicts,
        ),
    ] {
        let _ = writeln!(
            body,
            "| {what} | {} | {} | {} |",
            dist(&k.apply),
            dist(&k.frame),
            dist(&k.latency)
        );
    }
    if !ticks.is_empty() {
        let _ = writeln!(
            body,
            "| nothing: the time axis moves (the 4 plots redrawn, once a second; {} frames) | | {} | |",
            ticks.len(),
            dist(&ticks)
        );
    }
    let _ = writeln!(
        body,
        "\nBurst: {} fd events at once (every VM's fd closed and opened, twice): applied over {} frames, frame {} ms (p50 / p99 / max; the longest applied {} events in {:.1} ms, and parsed {:.1} ms of events arriving meanwhile); {:.0} ms from the first event's arrival to the last painted.",
        last - first + 1,
        frames.len(),
        dist(&burst_frames),
        longest["events"],
        longest["apply_ms"].as_f64().unwrap(),
        longest["parse_ms"].as_f64().unwrap(),
        burst_ms
    );
    body
}
