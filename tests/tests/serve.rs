//! `--serve`: the Prometheus metrics against the journal, the live dashboard in real
//! headless Chromium (tables, plots, filters, pause), `watch --serve` for processes that are
//! no VM's, and bad addresses. Each run uses the stand-in emulator in `close-later` mode,
//! which closes its passed tap fd on SIGUSR1: a violation that arrives when the test says so.
//! Every wait is on a line, a metric, a DOM element or a painted frame, bounded by `PATIENCE`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::TcpListener,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Instant, SystemTime},
};

use headless_chrome::{
    Browser, Element, LaunchOptions, Tab, protocol::cdp::Page::CaptureScreenshotFormatOption,
};
use serde_json::Value;
use vmaudit_tests::{
    Bins, Helper, PATIENCE, TempDir, Watch, bins, proc_fds, require_root, run_vmaudit,
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

const SERVING: &str = "vmaudit: serving http://";

/// The address from `vmaudit: serving http://ADDR/ (metrics at /metrics)`.
fn serving_addr(l: &str) -> String {
    let rest = l.strip_prefix(SERVING).unwrap();
    let addr = rest.split('/').next().unwrap().to_owned();
    assert!(
        rest.ends_with("/ (metrics at /metrics)"),
        "the listening line: {l}"
    );
    assert!(!addr.ends_with(":0"), "the real port, not 0: {l}");
    addr
}

fn serving(vm: &mut VmRun) -> String {
    serving_addr(&vm.stderr_line("`serving`", |l| l.starts_with(SERVING)))
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

/// Debian's headless Chromium.
fn chromium() -> Browser {
    Browser::new(LaunchOptions {
        path: Some("/usr/bin/chromium".into()),
        headless: true,
        // As root, chromium runs only without its sandbox.
        sandbox: false,
        window_size: Some((1400, 1000)),
        args: vec![std::ffi::OsStr::new("--disable-gpu")],
        idle_browser_timeout: PATIENCE * 6,
        ..LaunchOptions::default()
    })
    .expect("headless chromium (cargo xtask setup installs Debian's chromium)")
}

/// The dashboard in a tab.
struct Page {
    tab: Arc<Tab>,
}

/// Colours of the plots' series (dashboard.js).
const VIOLATED_RGB: [u8; 3] = [0xc6, 0x28, 0x28];
const CONFIRMED_RGB: [u8; 3] = [0x2e, 0x7d, 0x32];

impl Page {
    /// Opens the dashboard in a new tab, and waits until its state is painted.
    fn open(browser: &Browser, addr: &str) -> Self {
        let page = Self {
            tab: browser.new_tab().expect("a tab"),
        };
        page.tab.set_default_timeout(PATIENCE);
        page.tab
            .navigate_to(&format!("http://{addr}/"))
            .and_then(|t| t.wait_until_navigated())
            .expect("the dashboard loads");
        // `dashboard.load` is set once the state is painted: a wait on it, not a sleep.
        page.eval(
            "new Promise(r => { const w = () => (dashboard.load ? r(1) : setTimeout(w, 10)); w(); })",
        );
        page
    }

    fn wait(&self, selector: &str) -> Element<'_> {
        self.tab
            .wait_for_element_with_custom_timeout(selector, PATIENCE)
            .unwrap_or_else(|e| panic!("no {selector} on the page: {e}"))
    }

    /// The value of `js` (awaited when it is a promise).
    fn eval(&self, js: &str) -> Value {
        self.tab
            .evaluate(js, true)
            .unwrap_or_else(|e| panic!("{js}: {e}"))
            .value
            .unwrap_or(Value::Null)
    }

    fn count(&self, selector: &str) -> u64 {
        self.eval(&format!("document.querySelectorAll({selector:?}).length"))
            .as_u64()
            .expect("a count")
    }

    /// Waits until the page has painted one more frame (after a filter or a click).
    fn frame(&self) {
        self.eval("new Promise(r => requestAnimationFrame(() => setTimeout(() => r(1))))");
    }

    /// Attribute `attr` (`sum`, `now`) of series `name` in the legend of plot `plot`.
    fn legend(&self, plot: &str, name: &str, attr: &str) -> Option<u64> {
        self.eval(&format!(
            "document.querySelector('#plot-{plot} .series[data-name=\"{name}\"]')?.dataset.{attr}"
        ))
        .as_str()
        .map(|v| v.parse().expect("a number"))
    }

    /// Pixels of plot `plot` drawn in `rgb` (antialiased edges included: the canvas is
    /// transparent, so a line's pixels keep its colour and vary in alpha).
    fn pixels(&self, plot: &str, rgb: [u8; 3]) -> u64 {
        let [r, g, b] = rgb;
        self.eval(&format!(
            "(() => {{ const c = document.querySelector('#plot-{plot} canvas');
               const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
               let n = 0;
               for (let i = 0; i < d.length; i += 4)
                 if (d[i + 3] > 64 && Math.abs(d[i] - {r}) < 12 && Math.abs(d[i + 1] - {g}) < 12 && Math.abs(d[i + 2] - {b}) < 12) n++;
               return n; }})()"
        ))
        .as_u64()
        .expect("a pixel count")
    }

    /// Sets the filters as a person would (the text box's input, the select's change), and
    /// waits for the frame that applies them.
    fn filter(&self, text: &str, status: &str) {
        self.eval(&format!(
            "(() => {{ const t = document.querySelector('#filter-text'); t.value = {text:?};
               t.dispatchEvent(new Event('input'));
               const s = document.querySelector('#filter-status'); s.value = {status:?};
               s.dispatchEvent(new Event('change')); }})()"
        ));
        self.frame();
    }

    /// Whether the element matching `selector` is hidden (by the `hidden` attribute or by
    /// its styles).
    fn hidden(&self, selector: &str) -> bool {
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({selector:?}); return e.hidden || e.offsetParent === null; }})()"
        ))
        .as_bool()
        .unwrap_or_else(|| panic!("no {selector}"))
    }

    fn screenshot(&self, bins: &Bins, name: &str) {
        let png = self
            .tab
            .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
            .expect("screenshot");
        let target = bins.vmaudit.parent().unwrap().parent().unwrap();
        let out = target.join(name);
        std::fs::write(&out, &png).unwrap();
        let saved = std::fs::read(&out).unwrap();
        assert!(
            saved.len() > 1000 && saved.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{} is not a PNG",
            out.display()
        );
        eprintln!("screenshot: {}", out.display());
    }
}

/// The history's sums in `/api/state`: (verdicts by status name, fd events, lost by cause).
fn history_sums(addr: &str) -> (BTreeMap<String, u64>, u64, BTreeMap<String, u64>) {
    let st: Value = serde_json::from_str(&get(addr, "/api/state")).unwrap();
    let h = &st["history"];
    let mut verdicts = BTreeMap::new();
    for bucket in h["verdicts"].as_array().unwrap() {
        for (status, n) in h["statuses"]
            .as_array()
            .unwrap()
            .iter()
            .zip(bucket[1].as_array().unwrap())
        {
            *verdicts
                .entry(status.as_str().unwrap().to_owned())
                .or_default() += n.as_u64().unwrap();
        }
    }
    let events = h["fd_events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b[1][0].as_u64().unwrap())
        .sum();
    let mut lost = BTreeMap::new();
    for bucket in h["lost"].as_array().unwrap() {
        for (cause, n) in bucket[1].as_object().unwrap() {
            *lost.entry(cause.clone()).or_default() += n.as_u64().unwrap();
        }
    }
    (verdicts, events, lost)
}

/// The wall clock, Unix seconds.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The plot's time axis ends now, on the wall clock, and says so in `HH:MM:SS – HH:MM:SS`.
fn assert_wall_clock(page: &Page, plot: &str) {
    let t1: u64 = page
        .eval(&format!(
            "document.querySelector('#plot-{plot}').dataset.t1"
        ))
        .as_str()
        .expect("data-t1")
        .parse()
        .unwrap();
    let now = unix_now();
    assert!(
        t1.abs_diff(now) <= 5,
        "{plot} ends at {t1}, the clock says {now}"
    );
    let range = page
        .eval(&format!(
            "document.querySelector('#plot-{plot} .range').textContent"
        ))
        .as_str()
        .unwrap()
        .to_owned();
    let hms = |s: &str| {
        s.len() == 8
            && s.bytes().enumerate().all(|(i, c)| {
                if i == 2 || i == 5 {
                    c == b':'
                } else {
                    c.is_ascii_digit()
                }
            })
    };
    let (a, b) = range.split_once(" – ").unwrap_or_else(|| panic!("{range}"));
    assert!(hms(a) && hms(b), "wall-clock times: {range}");
}

#[test]
fn the_dashboard_shows_the_vm_its_fds_plots_and_a_live_violation_in_chromium() {
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
    let browser = chromium();
    let page = Page::open(&browser, &addr);
    let section = format!("section.fdtable[data-pid='{emu}']");
    let tap_row = format!("{section} tr.fd[data-fd='{tap}']");

    // The VM, running, with its emulator's pid.
    let row = page.wait(&format!(
        "#vm-rows tr.vm[data-pid='{emu}'][data-state='running']"
    ));
    let text = row.get_inner_text().unwrap();
    assert!(text.contains(name) && text.contains(UUID), "{text}");
    // The emulator's tap fd, with the claim that passed it.
    let fd = page.wait(&format!("{tap_row}[data-claim-kind='net-start']"));
    let text = fd.get_inner_text().unwrap();
    assert!(
        text.contains("/dev/net/tun") && text.contains(MAC),
        "{text}"
    );
    assert_eq!(page.count("tr.verdict.violated"), 0, "no violation yet");
    assert!(page.count("tr.verdict.confirmed") >= 1);

    // The plots: confirmed verdicts and no violation, fd events, the VM's fd count as its
    // table has it, no loss; the time axis on the wall clock.
    assert!(page.legend("verdicts", "confirmed", "sum").unwrap() >= 1);
    assert_eq!(page.legend("verdicts", "violated", "sum"), Some(0));
    assert!(
        page.pixels("verdicts", CONFIRMED_RGB) > 0,
        "the confirmed line is drawn"
    );
    assert_eq!(page.pixels("verdicts", VIOLATED_RGB), 0);
    assert!(page.legend("fd_events", "fd events", "sum").unwrap() >= 1);
    let rows = page.count(&format!("{section} tr.fd"));
    assert_eq!(page.legend("fds", name, "now"), Some(rows));
    for cause in [
        "ring_full",
        "inflight_full",
        "user_read",
        "too_many_fds",
        "watch_full",
    ] {
        assert_eq!(page.legend("lost", cause, "sum"), Some(0), "{cause}");
    }
    for plot in ["verdicts", "fd_events", "lost", "fds"] {
        assert_wall_clock(&page, plot);
    }

    // Paused, the page holds what arrives: the violation waits.
    page.tab.find_element("#pause").unwrap().click().unwrap();
    page.frame();
    assert!(!page.hidden("#buffered"), "the pause says it holds events");
    // SAFETY: SIGUSR1 to the stand-in, which handles it once ready.
    unsafe { libc::kill(emu as i32, libc::SIGUSR1) };
    vm.json("the violation", |v| {
        v["type"] == "verdict" && v["status"] == "violated"
    });
    page.wait("#buffered:not([data-verdicts='0'])");
    page.frame();
    assert_eq!(page.count("tr.verdict.violated"), 0, "held while paused");
    assert_eq!(page.count(&tap_row), 1, "the close is held too");
    assert_eq!(page.legend("verdicts", "violated", "sum"), Some(0));
    assert_eq!(page.pixels("verdicts", VIOLATED_RGB), 0);

    // Resumed: the violation reaches the page, rows and plots.
    page.tab.find_element("#pause").unwrap().click().unwrap();
    let row = page.wait("#verdict-rows tr.verdict.violated[data-claim-kind='net-start']");
    let text = row.get_inner_text().unwrap();
    assert!(text.contains("released fd"), "{text}");
    // Events apply in the kernel's order: the close came before the verdict.
    assert_eq!(page.count(&tap_row), 0, "the closed fd left the table");
    let first = page.eval("document.querySelector('#verdict-rows tr.verdict').dataset.status");
    assert_eq!(first, Value::from("violated"), "newest first");
    let shown = page.wait("#totals .count[data-status='violated']");
    assert_eq!(shown.get_inner_text().unwrap(), "1");
    page.frame();
    assert_eq!(page.legend("verdicts", "violated", "sum"), Some(1));
    assert!(
        page.pixels("verdicts", VIOLATED_RGB) > 0,
        "the violation is drawn"
    );
    assert_eq!(
        page.legend("fds", name, "now"),
        Some(page.count(&format!("{section} tr.fd"))),
        "the fd count follows the table"
    );
    // What the page built from the events is what the hub kept.
    let (verdicts, _, _) = history_sums(&addr);
    for status in ["confirmed", "violated"] {
        assert_eq!(
            page.legend("verdicts", status, "sum"),
            verdicts.get(status).copied(),
            "{status}: the page and /api/state"
        );
    }

    // Filters: by VM (typed), by status; they apply to the tables and the plots.
    page.tab
        .find_element("#filter-text")
        .unwrap()
        .type_into(name)
        .unwrap();
    page.frame();
    assert!(!page.hidden(&format!("#vm-rows tr.vm[data-pid='{emu}']")));
    assert!(!page.hidden(&section));
    assert_eq!(
        page.eval("document.querySelector('#plot-fds').dataset.lines"),
        Value::from("1")
    );
    page.filter("no-such-vm", "");
    assert!(page.hidden(&format!("#vm-rows tr.vm[data-pid='{emu}']")));
    assert!(page.hidden(&section));
    assert_eq!(page.count("#verdict-rows tr.verdict:not([hidden])"), 0);
    assert_eq!(
        page.eval("document.querySelector('#plot-fds').dataset.lines"),
        Value::from("0")
    );
    assert_eq!(page.legend("verdicts", "confirmed", "sum"), Some(0));
    assert_eq!(page.pixels("verdicts", CONFIRMED_RGB), 0);
    page.filter("", "violated");
    assert!(
        !page.hidden(&format!("#vm-rows tr.vm[data-pid='{emu}']")),
        "it has a violation"
    );
    assert!(page.count("#verdict-rows tr.verdict.violated:not([hidden])") >= 1);
    assert_eq!(
        page.count("#verdict-rows tr.verdict:not(.violated):not([hidden])"),
        0
    );
    assert_eq!(
        page.count("#plot-verdicts .series"),
        1,
        "only the violated series"
    );
    assert_eq!(page.pixels("verdicts", CONFIRMED_RGB), 0);
    page.filter("", "");

    // A page opened now draws the same history, from the hub's state alone.
    let later = Page::open(&browser, &addr);
    for status in ["confirmed", "violated"] {
        assert_eq!(
            later.legend("verdicts", status, "sum"),
            page.legend("verdicts", status, "sum"),
            "{status}"
        );
    }
    assert!(later.pixels("verdicts", VIOLATED_RGB) > 0);
    assert_eq!(
        later.legend("fds", name, "now"),
        page.legend("fds", name, "now")
    );
    drop(later);

    page.screenshot(&bins, "vmaudit-dashboard.png");
    drop(page);
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

/// Opens `/dev/full` in `h` until one open is reported as an event (the ring has room again),
/// then once more: once that one is reported, every loss before the first was checked and
/// repaired (vmaudit checks for losses after every batch it reads).
fn drained(w: &mut Watch, h: &mut Helper) {
    let pid = h.pid();
    let seen_as = |w: &mut Watch, fd: i32| {
        w.wait_for("marker", |v| {
            v["pid"] == pid && v["fd"] == fd && (v["op"] == "open" || v["op"] == "resync_add")
        })["op"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let mut rounds = 0;
    while seen_as(w, h.fd("open /dev/full")) != "open" {
        rounds += 1;
        assert!(rounds < 100, "the ring never drained");
    }
    let last = h.fd("open /dev/full");
    seen_as(w, last);
}

#[test]
fn watch_serves_the_dashboard_and_metrics_of_any_process() {
    require_root();
    let bins = bins!();
    let mut a = Helper::spawn(&bins);
    let mut b = Helper::spawn(&bins);
    let (pa, pb) = (a.pid(), b.pid());
    // The smallest ring (one page): floods overflow it.
    let mut w = Watch::start(
        &bins,
        &[
            "--pid",
            &pa.to_string(),
            "--pid",
            &pb.to_string(),
            "--ring-buffer-bytes",
            "4096",
            "--serve",
            "127.0.0.1:0",
        ],
    );
    let addr = serving_addr(
        w.stderr_before_ready
            .iter()
            .find(|l| l.starts_with(SERVING))
            .expect("the serving line before the watching line"),
    );

    // The state and the metrics: both processes, their tables as /proc has them.
    let st: Value = serde_json::from_str(&get(&addr, "/api/state")).unwrap();
    assert_eq!(st["scope"], "processes");
    let table = |st: &Value, pid: u32| -> BTreeSet<i32> {
        let p = st["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pid"] == pid)
            .unwrap_or_else(|| panic!("pid {pid} in {st}"));
        p["fds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["fd"].as_i64().unwrap() as i32)
            .collect()
    };
    for pid in [pa, pb] {
        assert_eq!(table(&st, pid), proc_fds(pid), "pid {pid}");
    }
    let m = parse_metrics(&get(&addr, "/metrics"));
    assert_eq!(
        sum(&m, "vmaudit_process_fds", &[("pid", &pa.to_string())]) as usize,
        proc_fds(pa).len()
    );
    assert!(sum(&m, "vmaudit_fd_events_total", &[("op", "seed")]) >= proc_fds(pa).len() as f64);

    // The page: the processes, their fd tables, the plots; nothing of VMs or verdicts.
    let browser = chromium();
    let page = Page::open(&browser, &addr);
    let section = |pid: u32| format!("section.fdtable[data-pid='{pid}']");
    for pid in [pa, pb] {
        page.wait(&format!("#proc-rows tr.proc[data-pid='{pid}']"));
        for fd in proc_fds(pid) {
            page.wait(&format!("{} tr.fd[data-fd='{fd}']", section(pid)));
        }
    }
    for vm_only in ["#plot-verdicts", "#vms", "#verdicts", "#filter-status"] {
        assert!(page.hidden(vm_only), "{vm_only} is for VMs");
    }
    // A new fd reaches the open page: its row, the process's count, the fd events.
    let null = a.fd("open /dev/null");
    let row = page.wait(&format!("{} tr.fd[data-fd='{null}']", section(pa)));
    assert!(row.get_inner_text().unwrap().contains("/dev/null"));
    page.frame();
    let held = proc_fds(pa).len() as u64;
    assert_eq!(page.legend("fds", &format!("pid {pa}"), "now"), Some(held));
    assert!(page.legend("fd_events", "fd events", "sum").unwrap() >= 1);
    assert_wall_clock(&page, "fds");
    // The filter by pid.
    page.filter(&pb.to_string(), "");
    assert!(page.hidden(&section(pa)) && !page.hidden(&section(pb)));
    assert_eq!(
        page.eval("document.querySelector('#plot-fds').dataset.lines"),
        Value::from("1")
    );
    page.filter("", "");

    // Losses: both flood at once through the one-page ring. Each loss check resyncs every
    // process that lost events, and its host-wide causes count once.
    std::thread::scope(|s| {
        for h in [&mut a, &mut b] {
            s.spawn(move || h.fd("flood 100000"));
        }
    });
    w.wait_for("a gap", |v| v["type"] == "gap");
    drained(&mut w, &mut a);
    drained(&mut w, &mut b);
    let m = parse_metrics(&get(&addr, "/metrics"));
    let ring_full = sum(&m, "vmaudit_lost_events_total", &[("cause", "ring_full")]) as u64;
    assert!(ring_full > 0, "the floods overflowed the ring");
    let (_, _, lost) = history_sums(&addr);
    assert_eq!(
        lost.get("ring_full"),
        Some(&ring_full),
        "the history and the metric"
    );
    // The page shows the same losses (it may have fallen behind and read the state again).
    let deadline = Instant::now() + PATIENCE;
    while page.legend("lost", "ring_full", "sum") != Some(ring_full) {
        assert!(
            Instant::now() < deadline,
            "the page shows {:?} ring_full losses, the hub {ring_full}",
            page.legend("lost", "ring_full", "sum")
        );
        page.frame();
    }
    assert!(
        page.pixels("lost", VIOLATED_RGB) > 0,
        "the ring_full line is drawn"
    );
    // The tables were repaired: as /proc has them.
    let st: Value = serde_json::from_str(&get(&addr, "/api/state")).unwrap();
    for pid in [pa, pb] {
        assert_eq!(table(&st, pid), proc_fds(pid), "pid {pid} after the floods");
    }
    page.screenshot(&bins, "vmaudit-dashboard-watch.png");
    drop(page);
    drop(browser);

    // The watch's own count of lost events is the metric's: nothing counted twice.
    let (code, records) = w.stop();
    assert_eq!(code, 0, "stopped by SIGTERM");
    let summary = records.last().unwrap();
    assert_eq!(summary["type"], "summary");
    assert_eq!(
        summary["lost"]["ring_full"].as_u64(),
        Some(ring_full),
        "{summary}"
    );
    let gaps = records.iter().filter(|v| v["type"] == "gap").count() as u64;
    let checks: BTreeSet<u64> = records
        .iter()
        .filter(|v| v["type"] == "gap")
        .map(|v| v["check"].as_u64().unwrap())
        .collect();
    eprintln!("{gaps} gaps from {} loss checks", checks.len());
}

#[test]
fn watch_refuses_a_bad_serve_address_before_loading_anything() {
    require_root();
    let bins = bins!();
    let h = Helper::spawn(&bins);
    let pid = h.pid().to_string();
    for (addr, msg) in [
        ("nonsense", "`nonsense` is not an address"),
        ("localhost:9464", "is not an address"),
    ] {
        let (code, out, err) = run_vmaudit(&bins, &["watch", "--pid", &pid, "--serve", addr]);
        assert_eq!(code, 18, "{addr}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{addr}: one line: {err}");
        assert!(
            err.contains("--serve") && err.contains(msg),
            "{addr}: {err}"
        );
        assert!(out.is_empty(), "{addr}: {out}");
        vmaudit_programs_gone().unwrap_or_else(|left| panic!("{addr}: {left:?} left loaded"));
    }
    drop(h);
}
