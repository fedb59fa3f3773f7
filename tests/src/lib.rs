//! Support for vmaudit's privileged integration tests: RAII guards for every process the
//! tests start, and a reader of `vmaudit watch` output that waits on records, never on time.
//!
//! These tests need root (CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE) and run one at a time
//! (`--test-threads=1`): `cargo xtask test` does both.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod bpf;
pub mod guest;
pub mod hardening;
pub mod libvirt;
pub mod manager;
pub mod vmrun;

/// How long any single expected record may take before the test fails. A bound on a hang,
/// not a synchronisation: every wait returns as soon as its record arrives.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Fails the test (not skips it) unless running as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "privileged integration tests must run as root (cargo xtask test does)"
    );
}

/// Paths of the binaries the tests run. Made by [`bins!`] in a test, where cargo tells
/// where `fdhelper` was built; `vmaudit` sits beside it.
#[derive(Clone, Debug)]
pub struct Bins {
    pub helper: PathBuf,
    pub vmaudit: PathBuf,
    /// The misbehaving stand-in emulator (`fake-emulator`).
    pub fake_emulator: PathBuf,
}

impl Bins {
    pub fn new(helper: &str) -> Self {
        let helper = PathBuf::from(helper);
        let vmaudit = helper.parent().expect("bin dir").join("vmaudit");
        assert!(
            vmaudit.exists(),
            "{} missing: run `cargo build --workspace --bins` first (cargo xtask test does)",
            vmaudit.display()
        );
        let fake_emulator = helper.parent().expect("bin dir").join("fake-emulator");
        Self {
            helper,
            vmaudit,
            fake_emulator,
        }
    }
}

/// The [`Bins`] of this build (expands where `CARGO_BIN_EXE_fdhelper` is defined: a test).
#[macro_export]
macro_rules! bins {
    () => {
        $crate::Bins::new(env!("CARGO_BIN_EXE_fdhelper"))
    };
}

/// The fds a process holds, read by the test itself from /proc.
pub fn proc_fds(pid: u32) -> BTreeSet<i32> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Names of loaded BPF programs that are vmaudit's (names are cut to 15 bytes by the kernel).
pub fn loaded_vmaudit_programs() -> Vec<String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| p.name_as_str().map(str::to_owned))
        .filter(|n| n.starts_with("vmaudit_"))
        .collect()
}

/// Whether every vmaudit program is gone from the kernel, checked until `PATIENCE` runs out.
/// A program is freed after an RCU grace period once its last fd and link are closed, so it
/// can still be listed for a moment after vmaudit has exited: this polls the kernel's list
/// (the only way to see the free happen), and fails only if the programs stay.
pub fn vmaudit_programs_gone() -> Result<(), Vec<String>> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = loaded_vmaudit_programs();
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(left);
        }
        thread::yield_now();
    }
}

/// A child process killed and reaped on drop, whatever happened to the test.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The fd helper (`fdhelper`), driven line by line.
pub struct Helper {
    child: ChildGuard,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Helper {
    pub fn spawn(bins: &Bins) -> Self {
        Self::spawn_with(bins, |_| {})
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Sends one command and returns the words after `ok`; panics on `err`.
    pub fn cmd(&mut self, line: &str) -> Vec<String> {
        self.try_cmd(line)
            .unwrap_or_else(|reply| panic!("fdhelper answered {reply:?} to {line:?}"))
    }

    /// Sends one command: Ok(words after `ok`) or Err(the whole `err ...` reply).
    pub fn try_cmd(&mut self, line: &str) -> Result<Vec<String>, String> {
        writeln!(self.stdin, "{line}").expect("write to fdhelper");
        self.stdin.flush().expect("flush");
        let reply = self.read_line();
        let mut words = reply.split_whitespace().map(str::to_owned);
        match words.next().as_deref() {
            Some("ok") => Ok(words.collect()),
            _ => Err(reply),
        }
    }

    /// Sends a command and returns its single numeric answer (usually an fd).
    pub fn fd(&mut self, line: &str) -> i32 {
        self.cmd(line)[0].parse().expect("numeric reply")
    }

    /// Reads one line the helper (or its forked child) wrote.
    pub fn read_line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).expect("read fdhelper");
        s.trim_end().to_owned()
    }

    /// Tells the helper to exit and reaps it.
    pub fn exit(mut self) -> ExitStatus {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.stdin.flush();
        self.child.0.wait().expect("wait fdhelper")
    }
}

/// A running `vmaudit watch` whose JSON lines are collected as they come.
pub struct Watch {
    child: ChildGuard,
    lines: Receiver<Value>,
    stderr: Receiver<String>,
    /// Every record received so far, in order.
    pub seen: Vec<Value>,
    /// The stderr lines before (and including) the one that said it was ready.
    pub stderr_before_ready: Vec<String>,
    /// Waits look at records from here on: each wait consumes up to its match.
    cursor: usize,
}

impl Watch {
    /// Starts `vmaudit watch ARGS` and returns once it says it is watching.
    pub fn start(bins: &Bins, args: &[&str]) -> Self {
        Self::start_sub(bins, "watch", args, "watching pid")
    }

    /// Starts `vmaudit SUBCOMMAND ARGS` (any subcommand printing JSON lines on stdout) and
    /// returns once a stderr line contains `ready`.
    pub fn start_sub(bins: &Bins, subcommand: &str, args: &[&str], ready: &str) -> Self {
        let mut cmd = Command::new(&bins.vmaudit);
        cmd.arg(subcommand).args(args);
        Self::start_command(cmd, ready)
    }

    /// Starts `cmd` (a vmaudit command line, possibly behind a wrapper such as `setpriv`) and
    /// returns once a stderr line contains `ready`.
    pub fn start_command(mut cmd: Command, ready: &str) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmaudit");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        let (etx, err_rx) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[vmaudit] {line}");
                if etx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut w = Self {
            child: ChildGuard(child),
            lines,
            stderr: err_rx,
            seen: Vec::new(),
            stderr_before_ready: Vec::new(),
            cursor: 0,
        };
        w.stderr_before_ready = w.stderr_until(|l| l.contains(ready));
        w
    }

    /// The pid of the process started (vmaudit, or the wrapper that execs it).
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Waits for a stderr line matching `pred`, returning it.
    pub fn wait_stderr(&self, pred: impl Fn(&str) -> bool) -> String {
        self.stderr_until(pred).pop().expect("the matching line")
    }

    /// Every stderr line up to and including the first matching `pred`.
    fn stderr_until(&self, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(l) => {
                    let done = pred(&l);
                    lines.push(l);
                    if done {
                        return lines;
                    }
                }
                Err(e) => panic!("vmaudit stderr: no expected line ({e:?}) after {lines:?}"),
            }
        }
    }

    /// A record satisfying `pred`, seen at any time so far or waited for: for verdicts whose
    /// order among themselves is not fixed.
    pub fn wait_any(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        self.wait_for(what, pred)
    }

    /// Waits for the next record after the previous match that satisfies `pred` (keeping
    /// every record in `seen`).
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.seen[self.cursor..].iter().position(&pred) {
            self.cursor += i + 1;
            return self.seen[self.cursor - 1].clone();
        }
        self.cursor = self.seen.len();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    self.cursor = self.seen.len();
                    if pred(&v) {
                        return v;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no record for {what} within {PATIENCE:?}; seen: {:#?}",
                    self.seen
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("vmaudit ended before {what}; seen: {:#?}", self.seen)
                }
            }
        }
    }

    /// Waits for the fd record `op` on `fd` of `pid`.
    pub fn wait_fd(&mut self, pid: u32, op: &str, fd: i32) -> Value {
        self.wait_for(&format!("{op} fd {fd} pid {pid}"), |v| {
            v["type"] == "fd" && v["pid"] == pid && v["op"] == op && v["fd"] == fd
        })
    }

    /// Reads every remaining record until vmaudit exits; returns its exit code.
    pub fn finish(mut self) -> (i32, Vec<Value>) {
        while let Ok(v) = self.lines.recv_timeout(PATIENCE) {
            self.seen.push(v);
        }
        let status = self.child.0.wait().expect("wait vmaudit");
        (status.code().unwrap_or(-1), std::mem::take(&mut self.seen))
    }

    /// The watched helper's exit, then vmaudit's end (exit 6: the watched process exited) and
    /// its summary, which must show nothing lost.
    pub fn finish_clean(self, h: Helper) -> Vec<Value> {
        h.exit();
        let (code, records) = self.finish();
        assert_eq!(code, 6);
        let summary = records.last().expect("the summary").clone();
        assert_eq!(summary["lost_total"], 0, "{summary}");
        records
    }

    /// Asks vmaudit to stop (SIGTERM) and collects the rest.
    pub fn stop(self) -> (i32, Vec<Value>) {
        // SAFETY: kill with a valid pid of our own child.
        unsafe { libc::kill(self.child.0.id() as i32, libc::SIGTERM) };
        self.finish()
    }
}

/// Runs `vmaudit ARGS` to completion and returns (exit code, stdout, stderr).
pub fn run_vmaudit(bins: &Bins, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(&bins.vmaudit)
        .args(args)
        .output()
        .expect("run vmaudit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a command that must succeed (set-up steps of a test).
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A persistent tap (`ip tuntap add`) deleted on drop, even when a test fails.
pub struct TapGuard(pub String);

impl TapGuard {
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["link", "del", name]).output();
        sh("ip", &["tuntap", "add", "dev", name, "mode", "tap"]);
        Self(name.to_owned())
    }
}

impl Drop for TapGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

/// A veth pair (`NAME` and `NAME-p`) deleted on drop, with everything stacked on it.
pub struct VethGuard(pub String);

impl VethGuard {
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["link", "del", name]).output();
        sh(
            "ip",
            &[
                "link",
                "add",
                name,
                "type",
                "veth",
                "peer",
                "name",
                &format!("{name}-p"),
            ],
        );
        Self(name.to_owned())
    }

    /// Adds a macvtap link on this veth and makes its `/dev/tapN` node in `dir` (no udev here).
    /// Returns the node's path.
    pub fn add_macvtap(&self, name: &str, dir: &std::path::Path) -> PathBuf {
        sh(
            "ip",
            &[
                "link", "add", "link", &self.0, "name", name, "type", "macvtap", "mode", "bridge",
            ],
        );
        let ifindex =
            std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex")).expect("ifindex");
        let ifindex = ifindex.trim();
        let dev = std::fs::read_to_string(format!("/sys/class/net/{name}/tap{ifindex}/dev"))
            .expect("tap dev");
        let (major, minor) = dev.trim().split_once(':').expect("MAJ:MIN");
        let node = dir.join(format!("tap{ifindex}"));
        sh("mknod", &[node.to_str().expect("utf-8"), "c", major, minor]);
        node
    }
}

impl Drop for VethGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

/// A temporary directory removed on drop. Mode 1777, as /tmp's: the emulator `vmaudit run`
/// starts runs as an unprivileged user and writes its files (a console log, a ready file) here.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let p = std::env::temp_dir().join(format!("vmaudit-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("mkdir");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A bind mount of `source` on `target` (a file made for it), unmounted on drop.
pub struct BindMount(pub PathBuf);

impl BindMount {
    pub fn new(source: &Path, target: &Path) -> Self {
        std::fs::write(target, b"").expect("the bind mount's target file");
        sh(
            "mount",
            &[
                "--bind",
                &source.to_string_lossy(),
                &target.to_string_lossy(),
            ],
        );
        Self(target.to_owned())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

// ---- Device cgroup tests (tests/tests/cgroup.rs) ----

impl Helper {
    /// [`Helper::spawn`], with `configure` applied to the command first (e.g. a `pre_exec`
    /// that joins a cgroup before the helper runs).
    pub fn spawn_with(bins: &Bins, configure: impl FnOnce(&mut Command)) -> Self {
        let mut cmd = Command::new(&bins.helper);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        configure(&mut cmd);
        let mut child = cmd.spawn().expect("spawn fdhelper");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut h = Self {
            child: ChildGuard(child),
            stdin,
            stdout,
        };
        // spawn returns when the kernel wakes the vfork parent, which is before the exec
        // closes the close-on-exec fds the child still shares with this process: a first
        // answer shows the helper's own table.
        h.cmd("ping");
        h
    }
}

/// Whether no loaded BPF program is named `name`, polled until `PATIENCE` runs out (see
/// [`vmaudit_programs_gone`] for why it polls). Err: how many remain.
pub fn programs_named_gone(name: &str) -> Result<(), usize> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = loaded_vmaudit_programs()
            .iter()
            .filter(|n| *n == name)
            .count();
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(left);
        }
        thread::yield_now();
    }
}

/// The cgroup hierarchies the tests use, as this host has them: cgroup v2, and a cgroup v1
/// `devices` hierarchy, mounted by the test on a host that has none (a pure v2 host leaves the
/// v1 devices controller free) and unmounted on drop. Fails, saying which, when either cannot
/// be had: vmaudit supports both, so both are tested.
pub struct Hierarchies {
    pub v2: PathBuf,
    pub v1_devices: PathBuf,
    mounted: Option<PathBuf>,
}

impl Hierarchies {
    pub fn get() -> Self {
        let layout = vmaudit::cgroup::Layout::detect().expect("read /proc/self/mountinfo");
        let v2 = layout.v2.clone().expect(
            "no cgroup2 mount on this host: vmaudit's device program needs one (mount -t cgroup2)",
        );
        if let Some(v1) = layout.v1_devices {
            return Self {
                v2,
                v1_devices: v1,
                mounted: None,
            };
        }
        let dir = std::env::temp_dir().join(format!("vmaudit-v1-devices-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("make a mount point for a v1 devices hierarchy");
        nix::mount::mount(
            Some("cgroup"),
            &dir,
            Some("cgroup"),
            nix::mount::MsFlags::empty(),
            Some("devices"),
        )
        .unwrap_or_else(|e| {
            panic!(
                "this host has no cgroup v1 devices hierarchy and one cannot be mounted at {} ({e})",
                dir.display()
            )
        });
        Self {
            v2,
            v1_devices: dir.clone(),
            mounted: Some(dir),
        }
    }
}

impl Drop for Hierarchies {
    fn drop(&mut self) {
        if let Some(dir) = self.mounted.take() {
            let _ = nix::mount::umount(&dir);
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

/// A test's own parent directory in a cgroup hierarchy (`<root>/vmaudit-test-TAG-PID`),
/// removed on drop with every cgroup left below it; processes still inside are moved back to
/// the hierarchy's root first (never killed: the tests' [`ChildGuard`]s do that).
pub struct CgroupDirGuard {
    pub root: PathBuf,
    pub dir: PathBuf,
}

impl CgroupDirGuard {
    /// Names the directory, clearing what a crashed run may have left; does not create it.
    pub fn new(root: &std::path::Path, tag: &str) -> Self {
        let dir = root.join(format!("vmaudit-test-{tag}-{}", std::process::id()));
        let g = Self {
            root: root.to_owned(),
            dir,
        };
        g.clear();
        g
    }

    fn clear(&self) {
        if self.dir.exists() {
            remove_cgroup_tree(&self.root, &self.dir);
        }
    }
}

impl Drop for CgroupDirGuard {
    fn drop(&mut self) {
        self.clear();
    }
}

fn remove_cgroup_tree(root: &std::path::Path, dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(root, &e.path());
            }
        }
    }
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.split_whitespace() {
            let _ = std::fs::write(root.join("cgroup.procs"), pid);
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        eprintln!("cleanup: rmdir {}: {e}", dir.display());
    }
}

/// `pid`'s cgroup path in the hierarchy of `controller`, from `/proc/PID/cgroup`: `""` for
/// cgroup v2 (its line is `0::PATH`), `"devices"` for the v1 devices controller.
pub fn proc_cgroup(pid: u32, controller: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrls
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_owned())
    })
}

// ---- end of device cgroup tests ----

/// Kernel auditing set on or off for a test, and put back as it was on drop, whatever
/// happened to the test. Other tests running at the same time may toggle it too: the state is
/// the host's, not the test's.
pub struct AuditEnabledGuard {
    kernel: vmaudit::audit::KernelAudit,
    previous: bool,
}

impl AuditEnabledGuard {
    pub fn set(enabled: bool) -> Self {
        let mut kernel = vmaudit::audit::KernelAudit::open().expect("NETLINK_AUDIT socket");
        let status = kernel.status().expect("AUDIT_GET");
        assert!(
            !status.is_locked(),
            "kernel auditing is locked (enabled=2): tests cannot change it"
        );
        kernel.set_enabled(enabled).expect("AUDIT_SET enabled");
        Self {
            kernel,
            previous: status.is_enabled(),
        }
    }
}

impl Drop for AuditEnabledGuard {
    fn drop(&mut self) {
        if let Err(e) = self.kernel.set_enabled(self.previous) {
            eprintln!(
                "could not restore kernel auditing to {}: {e}",
                self.previous
            );
        }
    }
}

/// A UUID no other test run uses (the kernel's random one).
pub fn fresh_uuid() -> vmaudit::audit::Uuid {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/uuid").expect("random uuid");
    vmaudit::audit::Uuid::parse_str(s.trim()).expect("uuid")
}
