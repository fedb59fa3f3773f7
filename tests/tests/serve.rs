//! `vmaudit run --serve`: the Prometheus metrics against the journal, the live dashboard in
//! real headless Chromium, and bad addresses. Each run uses the stand-in emulator in
//! `close-later` mode, which closes its passed tap fd on SIGUSR1: a violation that arrives
//! when the test says so. Every wait is on a line, a metric or a DOM element, bounded by
//! `PATIENCE`.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    path::{Path, PathBuf},
    time::Instant,
};

use headless_chrome::{Browser, LaunchOptions, protocol::cdp::Page::CaptureScreenshotFormatOption};
use serde_json::Value;
use vmaudit_tests::{
    Bins, Helper, PATIENCE, TempDir, bins, proc_fds, require_root, run_vmaudit,
    vmaudit_programs_gone, vmrun::VmRun,
};

const UUID: &str = "5a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const MAC: &str = "52:54:00:00:58:01";

/// A one-tap VM on the stand-in emulator in `close-later` mode, with `extra` spec text.
fn start(bins: &Bins, name: &str, extra: &str, flags: &[&str]) -> VmRun {
    let body = format!(
        "[emulator]\npath = \"{}\"\nargs = [\"--mode\", \"close-later\"]\n\
         [[interface]]\nmac = \"{MAC}\"\nifname = \"{}\"\n{extra}",
        bins.fake_emulator.display(),
        &name[..name.len().min(12)]
    );
    VmRun::start(bins, name, UUID, &body, flags)
}

/// The address from `vmaudit: serving http://ADDR/ (metrics at /metrics)`.
fn serving(vm: &mut VmRun) -> String {
    let l = vm.stderr_line("`serving`", |l| l.starts_with("vmaudit: serving http://"));
    let rest = l.strip_prefix("vmaudit: serving http://").unwrap();
    let addr = rest.split('/').next().unwrap().to_owned();
    assert!(
        rest.ends_with("/ (metrics at /metrics)"),
        "the listening line: {l}"
    );
    assert!(!addr.ends_with(":0"), "the real port, not 0: {l}");
    addr
}

fn get(addr: &str, path: &str) -> String {
    ureq::get(format!("http://{addr}{path}"))
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .into_body()
        .read_to_string()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// One sample of the text exposition format.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus/OpenMetrics text format: `name{k="v",...} value`, comments skipped,
/// label values unescaped. Panics on a malformed line: a scraper would reject it too.
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, mut rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => panic!("malformed metric line {line:?}"),
        };
        let mut labels = BTreeMap::new();
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            let end;
            loop {
                // key
                let start = chars.peek().expect("label").0;
                let eq = r[start..].find('=').expect("=") + start;
                let key = r[start..eq].trim_start_matches(',').to_owned();
                while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                    chars.next();
                }
                assert_eq!(chars.next().map(|c| c.1), Some('"'), "{line}");
                let mut value = String::new();
                loop {
                    match chars.next().expect("closing quote").1 {
                        '\\' => match chars.next().expect("escape").1 {
                            'n' => value.push('\n'),
                            c => value.push(c),
                        },
                        '"' => break,
                        c => value.push(c),
                    }
                }
                labels.insert(key, value);
                match chars.next().expect("after a label") {
                    (_, ',') if chars.peek().is_some_and(|c| c.1 == '}') => {
                        end = chars.next().unwrap().0;
                        break;
                    }
                    (_, ',') => {}
                    (i, '}') => {
                        end = i;
                        break;
                    }
                    c => panic!("unexpected {c:?} in {line:?}"),
                }
            }
            rest = &r[end + 1..];
        }
        let value = rest
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value: value
                .parse()
                .unwrap_or_else(|e| panic!("value {value:?} in {line:?}: {e}")),
        });
    }
    assert_eq!(
        text.lines().last(),
        Some("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    out
}

/// The samples named `name` whose labels include every one of `with`.
fn samples<'a>(all: &'a [Sample], name: &str, with: &[(&str, &str)]) -> Vec<&'a Sample> {
    all.iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// The sum of the samples named `name` with those labels.
fn sum(all: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples(all, name, with).iter().map(|s| s.value).sum()
}

/// Verdicts in the journal, counted by (status, claim kind).
fn journal_verdicts(path: &Path) -> BTreeMap<(String, String), u64> {
    let mut m = BTreeMap::new();
    for v in vmaudit_tests::vmrun::journal_lines(path) {
        if v["type"] == "verdict" {
            let key = (
                v["status"].as_str().unwrap().to_owned(),
                v["claim"]["kind"].as_str().unwrap().to_owned(),
            );
            *m.entry(key).or_default() += 1;
        }
    }
    m
}

/// The same counts from `vmaudit_verdicts_total` (series at 0 left out).
fn metric_verdicts(all: &[Sample]) -> BTreeMap<(String, String), u64> {
    samples(all, "vmaudit_verdicts_total", &[])
        .into_iter()
        .filter(|s| s.value > 0.0)
        .map(|s| {
            (
                (s.labels["status"].clone(), s.labels["kind"].clone()),
                s.value as u64,
            )
        })
        .collect()
}

/// The VM's cgroup, from its `resrc=cgroup` records.
fn vm_cgroup(vm: &VmRun) -> PathBuf {
    vm.journal_lines()
        .iter()
        .find_map(|r| r["cgroup"].as_str().map(|c| c.trim_end_matches('/').into()))
        .expect("a cgroup record")
}

/// The tap fd the stand-in holds, from `fake-emulator: ready pid=PID fds=N,...`.
fn ready_fds(vm: &mut VmRun) -> Vec<i32> {
    let l = vm.stderr_line("fake-emulator ready", |l| {
        l.starts_with("fake-emulator: ready")
    });
    l.split_whitespace()
        .find_map(|w| w.strip_prefix("fds="))
        .expect("fds=")
        .split(',')
        .map(|n| n.parse().expect("fd"))
        .collect()
}

#[test]
fn metrics_count_what_the_journal_says() {
    require_root();
    let bins = bins!();
    let name = "vmaudit-s-metrics";
    let mut vm = start(
        &bins,
        name,
        "[[acl]]\npath = \"/dev/net/tun\"\n",
        &["--serve", "127.0.0.1:0"],
    );
    let addr = serving(&mut vm);
    let emu = vm.emulator_pid();
    vm.json("net-start confirmed", |v| {
        v["type"] == "verdict" && v["claim"]["kind"] == "net-start" && v["status"] == "confirmed"
    });
    let passed = ready_fds(&mut vm);

    // Device decisions of the VM's cgroup: one allowed (tun is in the ACL), one denied (a
    // device node the ACL does not name).
    let tmp = TempDir::new("s-metrics");
    let node = tmp.0.join("loop-control");
    vmaudit_tests::sh("mknod", &[node.to_str().unwrap(), "c", "10", "237"]);
    let mut h = Helper::spawn(&bins);
    let cgroup = vm_cgroup(&vm);
    std::fs::write(cgroup.join("cgroup.procs"), h.pid().to_string()).unwrap();
    h.fd("open /dev/net/tun");
    let denied = h
        .try_cmd(&format!("open {}", node.display()))
        .expect_err("the cgroup denies 10:237");
    assert!(denied.contains("Operation not permitted"), "{denied}");
    drop(h);

    // The violation: the stand-in closes its passed fds.
    // SAFETY: SIGUSR1 to the stand-in, which handles it once ready.
    unsafe { libc::kill(emu as i32, libc::SIGUSR1) };
    vm.json("the violation", |v| {
        v["type"] == "verdict" && v["status"] == "violated"
    });

    // Scrape until the metrics and the journal agree verdict by verdict, and the decisions
    // are in: the verifier counts a verdict just before it journals it, so a scrape can be
    // one ahead for a moment, never behind for long.
    let deadline = Instant::now() + PATIENCE;
    let (metrics, journal) = loop {
        let before = journal_verdicts(&vm.journal);
        let m = parse_metrics(&get(&addr, "/metrics"));
        let after = journal_verdicts(&vm.journal);
        let agree = before == after && metric_verdicts(&m) == after;
        let decided = sum(
            &m,
            "vmaudit_cgroup_decisions_total",
            &[("result", "allowed")],
        ) >= 1.0
            && sum(
                &m,
                "vmaudit_cgroup_decisions_total",
                &[("result", "denied")],
            ) >= 1.0;
        if agree && decided {
            break (m, after);
        }
        assert!(
            Instant::now() < deadline,
            "metrics {:?} never matched the journal {after:?} (decisions in: {decided})",
            metric_verdicts(&m)
        );
        std::thread::yield_now();
    };
    let by_status = |s: &str| sum(&metrics, "vmaudit_verdicts_total", &[("status", s)]);
    assert_eq!(
        by_status("violated") as u64,
        journal
            .iter()
            .filter(|((s, _), _)| s == "violated")
            .map(|(_, n)| n)
            .sum::<u64>()
    );
    assert!(by_status("violated") >= 1.0 && by_status("confirmed") >= 1.0);
    assert!(
        journal.contains_key(&("violated".into(), "net-start".into())),
        "{journal:?}"
    );
    // One interface and one start: one claim of each.
    for kind in ["net-start", "vm-start"] {
        assert_eq!(
            sum(&metrics, "vmaudit_claims_total", &[("kind", kind)]),
            1.0,
            "{kind}"
        );
    }
    // The fds the stand-in inherited, and the ones it closed, were counted.
    assert!(sum(&metrics, "vmaudit_fd_events_total", &[("op", "inherit")]) >= passed.len() as f64);
    assert!(sum(&metrics, "vmaudit_fd_events_total", &[("op", "close")]) >= passed.len() as f64);
    // Lost events: a series per cause, even at 0.
    let causes: Vec<&str> = samples(&metrics, "vmaudit_lost_events_total", &[])
        .iter()
        .map(|s| s.labels["cause"].as_str())
        .collect();
    for cause in [
        "ring_full",
        "inflight_full",
        "user_read",
        "too_many_fds",
        "watch_full",
    ] {
        assert!(causes.contains(&cause), "{cause}: {causes:?}");
    }
    // The emulator's fd count is what /proc says it holds (it is idle now).
    let fds = samples(
        &metrics,
        "vmaudit_vm_fds",
        &[("vm", name), ("pid", &emu.to_string())],
    );
    assert_eq!(fds.len(), 1, "{fds:?}");
    assert_eq!(fds[0].value as usize, proc_fds(emu).len());

    // The JSON snapshot knows the VM.
    let state: Value = serde_json::from_str(&get(&addr, "/api/state")).unwrap();
    let vm_state = state["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{state:#}"));
    assert_eq!(
        (
            vm_state["pid"].as_u64(),
            vm_state["uuid"].as_str(),
            vm_state["state"].as_str()
        ),
        (Some(emu as u64), Some(UUID), Some("running"))
    );

    let (code, _) = vm.stop();
    assert_eq!(code, 7, "a violation was found");
}

#[test]
fn the_dashboard_shows_the_vm_its_fds_and_a_live_violation_in_chromium() {
    require_root();
    let bins = bins!();
    let name = "vmaudit-s-dash";
    let mut vm = start(&bins, name, "", &["--serve", "127.0.0.1:0"]);
    let addr = serving(&mut vm);
    let emu = vm.emulator_pid();
    vm.json("net-start confirmed", |v| {
        v["type"] == "verdict" && v["claim"]["kind"] == "net-start" && v["status"] == "confirmed"
    });
    let tap = ready_fds(&mut vm)[0];

    let browser = Browser::new(LaunchOptions {
        path: Some("/usr/bin/chromium".into()),
        headless: true,
        // As root, chromium runs only without its sandbox.
        sandbox: false,
        window_size: Some((1400, 1000)),
        args: vec![std::ffi::OsStr::new("--disable-gpu")],
        idle_browser_timeout: PATIENCE * 3,
        ..LaunchOptions::default()
    })
    .expect("headless chromium (cargo xtask setup installs Debian's chromium)");
    let tab = browser.new_tab().expect("a tab");
    tab.set_default_timeout(PATIENCE);
    tab.navigate_to(&format!("http://{addr}/"))
        .and_then(|t| t.wait_until_navigated())
        .expect("the dashboard loads");
    let wait = |selector: &str| {
        tab.wait_for_element_with_custom_timeout(selector, PATIENCE)
            .unwrap_or_else(|e| panic!("no {selector} on the page: {e}"))
    };
    let count = |selector: &str| -> u64 {
        tab.evaluate(
            &format!("document.querySelectorAll({selector:?}).length"),
            false,
        )
        .expect("evaluate")
        .value
        .and_then(|v| v.as_u64())
        .expect("a count")
    };

    // The VM, running, with its emulator's pid.
    let row = wait(&format!(
        "#vm-rows tr.vm[data-pid='{emu}'][data-state='running']"
    ));
    let text = row.get_inner_text().unwrap();
    assert!(text.contains(name) && text.contains(UUID), "{text}");
    // The emulator's tap fd, with the claim that passed it.
    let fd = wait(&format!(
        "section.fdtable[data-pid='{emu}'] tr.fd[data-fd='{tap}'][data-claim-kind='net-start']"
    ));
    let text = fd.get_inner_text().unwrap();
    assert!(
        text.contains("/dev/net/tun") && text.contains(MAC),
        "{text}"
    );
    assert_eq!(count("tr.verdict.violated"), 0, "no violation yet");
    assert!(count("tr.verdict.confirmed") >= 1);

    // Now the stand-in closes its passed fds: the violation must reach the open page.
    // SAFETY: SIGUSR1 to the stand-in, which handles it once ready.
    unsafe { libc::kill(emu as i32, libc::SIGUSR1) };
    let row = wait("#verdict-rows tr.verdict.violated[data-claim-kind='net-start']");
    let text = row.get_inner_text().unwrap();
    assert!(text.contains("released fd"), "{text}");
    // Events apply in the kernel's order: the close came before the verdict.
    assert_eq!(
        count(&format!(
            "section.fdtable[data-pid='{emu}'] tr.fd[data-fd='{tap}']"
        )),
        0,
        "the closed fd left the table"
    );
    let first = tab
        .evaluate(
            "document.querySelector('#verdict-rows tr.verdict').dataset.status",
            false,
        )
        .unwrap()
        .value;
    assert_eq!(first, Some(Value::from("violated")), "newest first");
    let shown = wait("#totals .count[data-status='violated']");
    assert_eq!(shown.get_inner_text().unwrap(), "1");

    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .expect("screenshot");
    let target = bins.vmaudit.parent().unwrap().parent().unwrap();
    let out = target.join("vmaudit-dashboard.png");
    std::fs::write(&out, &png).unwrap();
    let saved = std::fs::read(&out).unwrap();
    assert!(
        saved.len() > 1000 && saved.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        out.display()
    );
    eprintln!("screenshot: {}", out.display());
    drop(tab);
    drop(browser);

    let (code, _) = vm.stop();
    assert_eq!(code, 7, "a violation was found");
}

#[test]
fn a_bad_serve_address_is_refused_before_anything_starts() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("s-bad");
    let name = "vmaudit-s-bad";
    let ready = tmp.0.join("ready");
    let spec = tmp.0.join("vm.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"{name}\"\nuuid = \"{UUID}\"\n[emulator]\npath = \"{}\"\n\
             args = [\"--ready-file\", \"{}\"]\n[[interface]]\nmac = \"{MAC}\"\nifname = \"vmsbad0\"\n",
            bins.fake_emulator.display(),
            ready.display()
        ),
    )
    .unwrap();
    let journal = tmp.0.join("j.jsonl");
    // A port in use: held by this test.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let in_use = taken.local_addr().unwrap().to_string();
    let cases = [
        ("not an address", "nonsense", "`nonsense` is not an address"),
        ("port out of range", "127.0.0.1:99999", "is not an address"),
        ("host name", "localhost:9464", "is not an address"),
        ("in use", in_use.as_str(), "cannot listen on"),
    ];
    for (what, addr, msg) in cases {
        let (code, out, err) = run_vmaudit(
            &bins,
            &[
                "run",
                spec.to_str().unwrap(),
                "--audit",
                "journal",
                "--journal",
                journal.to_str().unwrap(),
                "--serve",
                addr,
            ],
        );
        assert_eq!(code, 18, "{what}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: one line: {err}");
        assert!(
            err.contains("--serve") && err.contains(msg),
            "{what}: {err}"
        );
        if what == "in use" {
            assert!(err.contains(&in_use) && err.contains("in use"), "{err}");
        }
        assert!(out.is_empty(), "{what}: {out}");
        // Nothing was started: no journal, no run directory, no tap, no cgroup, no emulator,
        // no kernel program.
        assert!(!journal.exists(), "{what}: journaled");
        assert!(!Path::new("/run/vmaudit").join(name).exists(), "{what}");
        assert!(
            !Path::new("/sys/class/net/vmsbad0").exists(),
            "{what}: a tap was made"
        );
        assert_no_cgroup(name);
        assert!(!ready.exists(), "{what}: the emulator ran");
        vmaudit_programs_gone().unwrap_or_else(|left| panic!("{what}: {left:?} left loaded"));
    }
    drop(taken);
}

/// Fails if a cgroup directory named `name` exists anywhere in the first levels of the cgroup
/// hierarchies (where vmaudit makes a VM's).
fn assert_no_cgroup(name: &str) {
    fn walk(dir: &Path, depth: u32, name: &str) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                assert!(e.file_name() != name, "cgroup {} left", e.path().display());
                if depth > 0 {
                    walk(&e.path(), depth - 1, name);
                }
            }
        }
    }
    walk(Path::new("/sys/fs/cgroup"), 3, name);
}
