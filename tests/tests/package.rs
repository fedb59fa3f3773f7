//! The Debian package of `cargo xtask dist`, installed on this machine with dpkg: its units pass
//! `systemd-analyze verify`, its alert rules their promtool tests, its logrotate file logrotate
//! itself; the installed `/usr/bin/vmaudit`, with exactly the capabilities its unit grants,
//! monitors the real libvirt and confirms a VM's start; and `dpkg --purge` leaves nothing.
//!
//! Runs as root: `cargo test -p vmaudit-tests --test package -- --test-threads=1`, after
//! `cargo xtask dist` (`cargo xtask test` runs both).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;
use vmaudit_tests::{
    AuditEnabledGuard, TempDir, Watch, bins,
    libvirt::{Domain, Libvirt, Nic},
    require_root, vmaudit_programs_gone,
};

const PACKAGE: &str = "vmaudit";
const MONITOR_UNIT: &str = "/usr/lib/systemd/system/vmaudit-monitor.service";
const RUN_UNIT: &str = "/usr/lib/systemd/system/vmaudit-run@.service";
const JOURNAL_DIR: &str = "/var/log/vmaudit";

/// The .deb `cargo xtask dist` left in `target/debian`.
fn built_deb() -> PathBuf {
    let bins = bins!();
    let target = bins
        .vmaudit
        .parent()
        .and_then(Path::parent)
        .expect("target");
    let deb = target.join("debian").join(format!(
        "{PACKAGE}_{}-1_amd64.deb",
        env!("CARGO_PKG_VERSION")
    ));
    assert!(
        deb.is_file(),
        "{} missing: run `cargo xtask dist` first (cargo xtask test does)",
        deb.display()
    );
    deb
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (cargo xtask setup installs it)"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn installed() -> bool {
    let out = run("dpkg-query", &["-W", "-f=${Status}", PACKAGE]);
    out.status.success() && out.stdout == b"install ok installed"
}

/// The package installed for the test, purged on drop whatever happens.
struct Installed {
    files: Vec<PathBuf>,
}

impl Installed {
    fn install(deb: &Path) -> Self {
        assert!(
            !installed(),
            "{PACKAGE} is already installed on this machine: this test installs and purges its \
             own; `dpkg --purge {PACKAGE}` first"
        );
        let out = run("dpkg", &["-i", deb.to_str().unwrap()]);
        // From here on, whatever dpkg managed to do is undone on drop.
        let mut guard = Self { files: Vec::new() };
        assert!(out.status.success(), "dpkg -i: {}", text(&out));
        let list = run("dpkg", &["-L", PACKAGE]);
        guard.files = String::from_utf8_lossy(&list.stdout)
            .lines()
            .map(PathBuf::from)
            .filter(|p| !p.is_dir())
            .collect();
        guard
    }

    fn purge(&mut self) -> Output {
        self.files.clear();
        run("dpkg", &["--purge", PACKAGE])
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if installed() {
            let _ = self.purge();
        }
    }
}

/// `systemd-analyze verify` of an installed unit: no systemd runs here, and the tool needs
/// none; it exits 0 on keys it does not know, so its output must not mention the unit either.
fn verify_unit(unit: &str) {
    let out = run("systemd-analyze", &["verify", unit]);
    let said = text(&out);
    let about_us: Vec<&str> = said.lines().filter(|l| l.contains("vmaudit")).collect();
    assert!(
        out.status.success() && about_us.is_empty(),
        "systemd-analyze verify {unit}: {}\n{said}",
        out.status
    );
}

/// A `KEY=` value of a unit file, split on whitespace.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    std::fs::read_to_string(unit)
        .unwrap_or_else(|e| panic!("{unit}: {e}"))
        .lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}

/// Capability numbers (linux/capability.h) of the names the monitor's unit may grant.
fn cap_number(name: &str) -> u32 {
    match name {
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_PTRACE" => 19,
        "CAP_SYS_ADMIN" => 21,
        "CAP_AUDIT_WRITE" => 29,
        "CAP_AUDIT_CONTROL" => 30,
        "CAP_AUDIT_READ" => 37,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("{other}: add its number (linux/capability.h) to this test"),
    }
}

/// A capability set of /proc/PID/status (`CapEff`, `CapBnd`, ...), as a mask.
fn proc_caps(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(":"))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    u64::from_str_radix(hex.trim(), 16).expect("a hex mask")
}

#[test]
fn the_package_installs_checks_out_monitors_the_real_libvirt_and_purges_clean() {
    require_root();
    let deb = built_deb();
    let journal_dir_before = Path::new(JOURNAL_DIR).exists();
    let mut pkg = Installed::install(&deb);
    let installed_files = pkg.files.clone();

    // What the package holds: the binary, a man page per visible subcommand, completions, the
    // units, the logrotate file, the rules and the dashboard.
    for f in [
        "/usr/bin/vmaudit",
        "/usr/share/man/man1/vmaudit.1.gz",
        "/usr/share/man/man1/vmaudit-monitor.1.gz",
        "/usr/share/man/man1/vmaudit-run.1.gz",
        "/usr/share/man/man1/vmaudit-search-fds.1.gz",
        "/usr/share/bash-completion/completions/vmaudit",
        "/usr/share/zsh/vendor-completions/_vmaudit",
        "/usr/share/fish/vendor_completions.d/vmaudit.fish",
        MONITOR_UNIT,
        RUN_UNIT,
        "/etc/logrotate.d/vmaudit",
        "/etc/default/vmaudit",
        "/usr/share/vmaudit/prometheus/vmaudit-rules.yml",
        "/usr/share/vmaudit/grafana/vmaudit-dashboard.json",
    ] {
        assert!(
            installed_files.iter().any(|p| p == Path::new(f)),
            "{f} not in the package: {installed_files:#?}"
        );
    }
    assert!(
        Path::new(JOURNAL_DIR).is_dir(),
        "postinst makes {JOURNAL_DIR}"
    );
    // The generate command stays out of sight.
    let help = run("/usr/bin/vmaudit", &["--help"]);
    assert!(help.status.success() && !text(&help).contains("generate"));
    // The top page states the exit codes and the units' contract.
    let page = run("zcat", &["/usr/share/man/man1/vmaudit.1.gz"]);
    let page = text(&page);
    assert!(
        page.contains(".SH \"EXIT STATUS\"") || page.contains(".SH EXIT STATUS"),
        "{page}"
    );
    assert!(page.contains(".SH SYSTEMD"), "{page}");
    // bash loads the completion and registers it.
    let bash = run(
        "bash",
        &[
            "-c",
            "source /usr/share/bash-completion/completions/vmaudit && complete -p vmaudit",
        ],
    );
    assert!(
        bash.status.success() && text(&bash).contains("vmaudit"),
        "bash completion: {}",
        text(&bash)
    );

    verify_unit(MONITOR_UNIT);
    verify_unit(RUN_UNIT);

    let rules = run(
        "promtool",
        &[
            "test",
            "rules",
            "/usr/share/vmaudit/prometheus/vmaudit-rules.test.yml",
        ],
    );
    assert!(rules.status.success(), "promtool: {}", text(&rules));

    let tmp = TempDir::new("package");
    let state = tmp.0.join("logrotate.state");
    let lr = run(
        "logrotate",
        &[
            "--debug",
            "--state",
            state.to_str().unwrap(),
            "/etc/logrotate.d/vmaudit",
        ],
    );
    let said = text(&lr);
    assert!(
        lr.status.success()
            && said.contains("rotating pattern: /var/log/vmaudit/*.jsonl")
            && !said.to_lowercase().contains("error"),
        "logrotate: {said}"
    );

    monitor_with_the_units_capabilities(&tmp);

    let out = pkg.purge();
    assert!(out.status.success(), "dpkg --purge: {}", text(&out));
    assert!(!installed());
    let left: Vec<&PathBuf> = installed_files.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    assert_eq!(
        Path::new(JOURNAL_DIR).exists(),
        journal_dir_before,
        "{JOURNAL_DIR} after purge"
    );
    let helper_state: Vec<PathBuf> = [
        "/var/lib/systemd/deb-systemd-helper-enabled",
        "/var/lib/systemd/deb-systemd-helper-masked",
    ]
    .iter()
    .filter_map(|d| std::fs::read_dir(d).ok())
    .flat_map(|d| d.filter_map(Result::ok).map(|e| e.path()))
    .filter(|p| p.to_string_lossy().contains("vmaudit"))
    .collect();
    assert!(
        helper_state.is_empty(),
        "left after purge: {helper_state:?}"
    );
}

/// The installed binary, run as the monitor unit runs it: only the unit's capabilities (its
/// bounding set, so root keeps no other), no new privileges, against the real libvirt.
fn monitor_with_the_units_capabilities(tmp: &TempDir) {
    let caps = unit_values(MONITOR_UNIT, "CapabilityBoundingSet");
    assert_eq!(
        caps,
        unit_values(MONITOR_UNIT, "AmbientCapabilities"),
        "the bounding and ambient sets are the same list"
    );
    let mask = caps.iter().fold(0u64, |m, c| m | 1 << cap_number(c));
    let setpriv_caps: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let bounding = format!("-all,{}", setpriv_caps.join(","));

    let _audit = AuditEnabledGuard::set(true);
    let lv = Libvirt::start();
    let journal = tmp.0.join("monitor.jsonl");
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set",
        &bounding,
    ])
    .args(["/usr/bin/vmaudit", "monitor", "--manager"])
    .arg(lv.libvirtd_pid().to_string())
    .arg("--journal")
    .arg(&journal)
    .args(["--deadline-ms", "3000"]);
    let mut m = Watch::start_command(cmd, "monitoring manager pid");
    assert_eq!(
        (proc_caps(m.pid(), "CapEff"), proc_caps(m.pid(), "CapBnd")),
        (mask, mask),
        "the monitor holds exactly {caps:?}"
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/exe", m.pid())).unwrap(),
        Path::new("/usr/bin/vmaudit")
    );

    let nic = Nic::new("52:54:00:1c:0d:01", "vmpkg0n0");
    let mut dom = Domain::start(
        &lv,
        "vmpkg0",
        "7e57c0de-0000-4000-8000-00000000d001",
        std::slice::from_ref(&nic),
    );
    let qemu = dom.pid();
    let verdict = |m: &mut Watch, kind: &str| -> Value {
        m.wait_for(kind, |v| {
            v["type"] == "verdict" && v["claim"]["kind"] == kind
        })
    };
    let start = verdict(&mut m, "vm-start");
    assert_eq!(start["status"], "confirmed", "{start:#}");
    assert_eq!(start["evidence"][0]["pid"], qemu, "{start:#}");
    let net = verdict(&mut m, "net-start");
    assert_eq!(net["status"], "confirmed", "{net:#}");
    dom.destroy();
    let stop = verdict(&mut m, "vm-stop");
    assert_eq!(stop["status"], "confirmed", "{stop:#}");
    let (code, seen) = m.stop();
    // Every claim, the cgroup ones included (BPF_PROG_QUERY and the device map read by id),
    // was confirmed with only those capabilities.
    let statuses: BTreeSet<(String, String)> = seen
        .iter()
        .filter(|v| v["type"] == "verdict")
        .map(|v| {
            (
                v["claim"]["kind"].as_str().unwrap().to_owned(),
                v["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        statuses.contains(&("cgroup".into(), "confirmed".into()))
            && statuses.iter().all(|(_, s)| s == "confirmed"),
        "{statuses:?}"
    );
    assert_eq!(code, 0);
    vmaudit_programs_gone().unwrap();
}
