//! Support for the hardening tests (hostile input, crashes, privileges, the journal):
//! [`Snapshot`], what `vmaudit run` may leave on a host, taken before and after a test to show
//! it left nothing: VM cgroups under vmaudit's parent (v2 and v1), network links
//! (`ip -o link`), `/dev/tap*` nodes, entries under /run/vmaudit and vmaudit's bpffs directory,
//! loaded BPF programs named like vmaudit's, and processes of the emulator's user; and
//! [`run_vmaudit_as`] and [`run_vmaudit_unprivileged`], vmaudit run by another user.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    thread,
    time::Instant,
};

use crate::{Bins, PATIENCE, loaded_vmaudit_programs, sh};

/// Runs `vmaudit ARGS` to completion as `user` (setpriv), with CAP_DAC_OVERRIDE and
/// CAP_DAC_READ_SEARCH so that it reaches the root-only run directory (as a socket bind-mounted
/// into its namespace would be reached): only SO_PEERCRED can refuse it then. Returns (exit
/// code, stdout, stderr).
pub fn run_vmaudit_as(bins: &Bins, user: &str, args: &[&str]) -> (i32, String, String) {
    run_as(bins, user, "+dac_override,+dac_read_search", args)
}

/// Runs `vmaudit ARGS` to completion as `user` with CAP_DAC_READ_SEARCH alone (to reach the
/// binary wherever the checkout is, and the run directory), not CAP_DAC_OVERRIDE: the control
/// socket's mode 0600 refuses the connection itself. Returns (exit code, stdout, stderr).
pub fn run_vmaudit_unprivileged(bins: &Bins, user: &str, args: &[&str]) -> (i32, String, String) {
    run_as(bins, user, "+dac_read_search", args)
}

fn run_as(bins: &Bins, user: &str, caps: &str, args: &[&str]) -> (i32, String, String) {
    let u = nix::unistd::User::from_name(user)
        .expect("user database")
        .unwrap_or_else(|| panic!("no user {user}"));
    let out = std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={}", u.uid),
            &format!("--regid={}", u.gid),
            "--clear-groups",
            &format!("--inh-caps={caps}"),
            &format!("--ambient-caps={caps}"),
            "--",
        ])
        .arg(&bins.vmaudit)
        .args(args)
        .output()
        .expect("setpriv (util-linux)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The unprivileged user `vmaudit run` runs its emulators as by default.
pub const EMULATOR_USER: &str = "vmaudit-qemu";

/// Everything listed, as sorted text (so that a difference prints readably).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub cgroups: BTreeSet<String>,
    pub links: BTreeSet<String>,
    pub tap_nodes: BTreeSet<String>,
    pub run_entries: BTreeSet<String>,
    pub pins: BTreeSet<String>,
    pub programs: usize,
    pub emulator_processes: BTreeSet<u32>,
}

fn walk(dir: &Path, out: &mut BTreeSet<String>, dirs_only: bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir || !dirs_only {
            out.insert(p.display().to_string());
        }
        if is_dir {
            walk(&p, out, dirs_only);
        }
    }
}

/// The cgroup hierarchies' mount points (v2, and v1 with `devices`).
fn cgroup_roots() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let ty = r.next()?;
            let opts = r.nth(1).unwrap_or_default();
            (ty == "cgroup2" || (ty == "cgroup" && opts.split(',').any(|o| o == "devices")))
                .then(|| PathBuf::from(point))
        })
        .collect()
}

/// The uid of the emulator's user.
pub fn emulator_uid() -> u32 {
    nix::unistd::User::from_name(EMULATOR_USER)
        .expect("user database")
        .unwrap_or_else(|| panic!("no user {EMULATOR_USER}: run `cargo xtask setup`"))
        .uid
        .as_raw()
}

/// Processes whose real uid is `uid`.
pub fn processes_of(uid: u32) -> BTreeSet<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Uid:"))
                        .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok())
                })
                == Some(uid)
        })
        .collect()
}

impl Snapshot {
    pub fn take() -> Self {
        let mut cgroups = BTreeSet::new();
        for root in cgroup_roots() {
            walk(&root.join("vmaudit"), &mut cgroups, true);
        }
        let links = sh("ip", &["-o", "link"])
            .lines()
            .filter_map(|l| {
                let name = l.split(": ").nth(1)?;
                Some(name.split('@').next()?.to_owned())
            })
            .collect();
        let tap_nodes = std::fs::read_dir("/dev")
            .expect("/dev")
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| n.starts_with("tap"))
            .collect();
        let mut run_entries = BTreeSet::new();
        walk(Path::new("/run/vmaudit"), &mut run_entries, false);
        let mut pins = BTreeSet::new();
        walk(Path::new("/sys/fs/bpf/vmaudit"), &mut pins, false);
        if Path::new("/sys/fs/bpf/vmaudit").exists() {
            pins.insert("/sys/fs/bpf/vmaudit".into());
        }
        Self {
            cgroups,
            links,
            tap_nodes,
            run_entries,
            pins,
            programs: loaded_vmaudit_programs().len(),
            emulator_processes: processes_of(emulator_uid()),
        }
    }

    /// Whether `self`, taken later, has nothing that `before` did not: the same names, and no
    /// more programs or emulator processes (a previous test's may still have been going when
    /// `before` was taken).
    fn nothing_more_than(&self, before: &Self) -> bool {
        self.cgroups == before.cgroups
            && self.links == before.links
            && self.tap_nodes == before.tap_nodes
            && self.run_entries == before.run_entries
            && self.pins == before.pins
            && self.programs <= before.programs
            && self
                .emulator_processes
                .is_subset(&before.emulator_processes)
    }

    /// Fails, saying what differs, unless the host is back to this snapshot. BPF programs and
    /// processes go a moment after their last holder (an RCU grace period, a reaping): the
    /// comparison is repeated until it holds or `PATIENCE` runs out.
    pub fn assert_back(&self, what: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let now = Self::take();
            if now.nothing_more_than(self) {
                return;
            }
            if Instant::now() > deadline {
                panic!("{what}: left behind:\nbefore: {self:#?}\nafter: {now:#?}");
            }
            thread::yield_now();
        }
    }
}
