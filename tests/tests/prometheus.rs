//! A real Prometheus (Debian's) scraping `vmaudit run --serve` with the shipped alert rules
//! loaded: the violation alert is inactive while every claim holds, and fires once the stand-in
//! emulator (close-later mode: it closes its passed tap fd on SIGUSR1) breaks one. The shipped
//! Grafana dashboard's queries run against the same Prometheus and name only metrics vmaudit
//! exports.
//!
//! Every wait polls Prometheus' HTTP API until a deadline: its scrapes and rule evaluations
//! happen on its own clock, with no event to wait on from outside.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc::channel,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use vmaudit_tests::{ChildGuard, PATIENCE, TempDir, bins, require_root, vmrun::VmRun};

const UUID: &str = "5a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c5e";
const MAC: &str = "52:54:00:00:59:01";

/// Metrics the shipped rules read that `vmaudit run --serve` does not export (the monitor's
/// audit-stream gauge): every other `vmaudit_*` name in the rules must be on /metrics.
const NOT_FROM_RUN: &[&str] = &["vmaudit_audit_last_record_timestamp_seconds"];

/// How long between two questions to Prometheus (it scrapes and evaluates every second).
const POLL: Duration = Duration::from_millis(200);

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmaudit/packaging")
}

/// A port no one listens on now, for Prometheus' web server.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Debian's Prometheus with a configuration of its own (1 s scrapes and evaluations, the
/// shipped rules, one target), its storage in `dir`, killed on drop.
struct Prometheus {
    _child: ChildGuard,
    addr: String,
}

impl Prometheus {
    fn start(dir: &Path, target: &str, rules: &Path) -> Self {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: vmaudit\n    static_configs:\n      \
                 - targets: [\"{target}\"]\n",
                rules.display()
            ),
        )
        .expect("write prometheus.yml");
        let addr = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("prometheus (cargo xtask setup installs Debian's prometheus)");
        let stderr = child.stderr.take().expect("stderr");
        let child = ChildGuard(child);
        let (tx, lines) = channel();
        thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        // Its own word that it serves: the line it logs once the rules are loaded and the
        // web server listens.
        let deadline = Instant::now() + PATIENCE;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if l.contains("Server is ready to receive web requests") => break,
                Ok(l) => seen.push(l),
                Err(e) => panic!("prometheus did not get ready ({e:?}): {seen:#?}"),
            }
        }
        // The rest of its log is not read; the thread keeps draining it.
        Self {
            _child: child,
            addr,
        }
    }

    fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let mut req = ureq::get(format!("http://{}/api/v1/{path}", self.addr));
        for (k, v) in query {
            req = req.query(*k, *v);
        }
        let body = req
            .call()
            .unwrap_or_else(|e| panic!("GET /api/v1/{path} {query:?}: {e}"))
            .into_body()
            .read_to_string()
            .expect("body");
        let v: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(v["status"], "success", "/api/v1/{path} {query:?}: {v:#}");
        v["data"].clone()
    }

    fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("query", &[("query", expr)]);
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// Asks `what` until it answers Some, or fails after [`PATIENCE`].
    fn until<T>(&self, what: &str, mut ask: impl FnMut(&Self) -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(t) = ask(self) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus: no {what} within {PATIENCE:?}"
            );
            thread::sleep(POLL);
        }
    }

    /// The rule named `name` of the loaded groups.
    fn rule(&self, name: &str) -> Value {
        let data = self.api("rules", &[]);
        data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no rule {name} loaded: {data:#}"))
    }
}

/// The address from `vmaudit: serving http://ADDR/ (metrics at /metrics)`.
fn serving(vm: &mut VmRun) -> String {
    let l = vm.stderr_line("`serving`", |l| l.starts_with("vmaudit: serving http://"));
    let rest = l.strip_prefix("vmaudit: serving http://").unwrap();
    rest.split('/').next().unwrap().to_owned()
}

/// The metric names a /metrics page has samples of.
fn exported(addr: &str) -> BTreeSet<String> {
    let text = ureq::get(format!("http://{addr}/metrics"))
        .call()
        .expect("GET /metrics")
        .into_body()
        .read_to_string()
        .expect("body");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The `vmaudit_*` names a PromQL expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("vmaudit_"))
        .map(str::to_owned)
        .collect()
}

/// Every `expr` of the dashboard's panels, with Grafana's variables given values.
fn dashboard_queries() -> Vec<String> {
    let path = packaging().join("grafana/vmaudit-dashboard.json");
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("JSON");
    let panels = dash["panels"].as_array().expect("panels");
    let exprs: Vec<String> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .expect("expr")
                .replace("$instance", ".*")
                .replace("$__rate_interval", "1m")
                .replace("$__range", "5m")
        })
        .collect();
    assert!(exprs.len() >= panels.len(), "a query per panel");
    exprs
}

#[test]
fn prometheus_fires_the_shipped_violation_alert_on_a_real_violation() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("prometheus");
    let rules = packaging().join("prometheus/vmaudit-rules.yml");
    let name = "vmaudit-prom";
    let body = format!(
        "[emulator]\npath = \"{}\"\nargs = [\"--mode\", \"close-later\"]\n\
         [[interface]]\nmac = \"{MAC}\"\nifname = \"vmprom0\"\n",
        bins.fake_emulator.display()
    );
    let mut vm = VmRun::start(&bins, name, UUID, &body, &["--serve", "127.0.0.1:0"]);
    let target = serving(&mut vm);
    let emu = vm.emulator_pid();
    vm.json("net-start confirmed", |v| {
        v["type"] == "verdict" && v["claim"]["kind"] == "net-start" && v["status"] == "confirmed"
    });

    let prom = Prometheus::start(&tmp.0, &target, &rules);
    // The rules loaded as shipped: no parse error, and the violation rule has no `for:` (it
    // fires at the first evaluation that sees the increase).
    let rule = prom.rule("VmauditViolation");
    assert_eq!(rule["duration"], 0, "{rule:#}");
    // Scraped, and the rules evaluated after that scrape: still inactive, as nothing is
    // violated yet.
    let scraped = prom.until("successful scrape of vmaudit", |p| {
        let up = p.query(&format!("up{{job=\"vmaudit\",instance=\"{target}\"}}"));
        let confirmed = p.query("vmaudit_verdicts_total{status=\"confirmed\",kind=\"net-start\"}");
        (up.first()?["value"][1] == "1" && confirmed.first()?["value"][1] == "1")
            .then(|| up[0]["value"][0].as_f64().expect("a time"))
    });
    prom.until("an evaluation of the rules after that scrape", |p| {
        let r = p.rule("VmauditViolation");
        let evaluated = r["lastEvaluation"].as_str()?;
        let at =
            time::OffsetDateTime::parse(evaluated, &time::format_description::well_known::Rfc3339)
                .ok()?;
        (at.unix_timestamp() as f64 > scraped).then_some(())
    });
    let rule = prom.rule("VmauditViolation");
    assert_eq!(rule["state"], "inactive", "nothing violated yet: {rule:#}");
    assert_eq!(rule["health"], "ok", "{rule:#}");

    // The dashboard's queries run, and read only what vmaudit exports; the rules too, but for
    // the monitor's gauge.
    let names = exported(&target);
    for expr in dashboard_queries() {
        prom.query(&expr);
        for m in metric_names(&expr) {
            assert!(
                names.contains(&m),
                "the dashboard reads {m}, not exported: {names:?}"
            );
        }
    }
    // The monitor's audit-stream gauges are not `run`'s: at 0 they would fire the silent-stream
    // alert for a target that has no audit stream.
    for m in NOT_FROM_RUN {
        assert!(!names.contains(*m), "run --serve exports {m}");
    }
    let shipped = std::fs::read_to_string(&rules).expect("rules");
    for m in metric_names(&shipped) {
        assert!(
            names.contains(&m) || NOT_FROM_RUN.contains(&m.as_str()),
            "the rules read {m}, not exported: {names:?}"
        );
    }

    // The violation: the stand-in closes its passed fd.
    // SAFETY: SIGUSR1 to the stand-in, which handles it once ready.
    unsafe { libc::kill(emu as i32, libc::SIGUSR1) };
    vm.json("the violation", |v| {
        v["type"] == "verdict" && v["status"] == "violated"
    });
    let alert = prom.until("firing VmauditViolation", |p| {
        let data = p.api("alerts", &[]);
        data["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == "VmauditViolation" && a["state"] == "firing")
            .cloned()
    });
    let labels = &alert["labels"];
    assert_eq!(
        (
            labels["severity"].as_str(),
            labels["job"].as_str(),
            labels["instance"].as_str(),
            labels["status"].as_str(),
            labels["kind"].as_str(),
        ),
        (
            Some("critical"),
            Some("vmaudit"),
            Some(target.as_str()),
            Some("violated"),
            Some("net-start")
        ),
        "{alert:#}"
    );
    assert_eq!(
        alert["annotations"]["summary"],
        format!("{target}: violation (net-start)"),
        "{alert:#}"
    );
    drop(prom);

    let (code, _) = vm.stop();
    assert_eq!(code, 7, "a violation was found");
}
