//! The real thing to compare with: Debian's libvirt 9.0 (`libvirtd`, `virtlogd`, `virsh`)
//! starting small QEMU domains with ethernet (tap) interfaces, and Debian's `auditd` capturing
//! the VIRT_* records libvirt writes to the kernel audit subsystem.
//!
//! Every daemon, domain and tap device made here is undone by a guard, whatever happens to the
//! test. Declare them in this order, so that they are dropped in the reverse one:
//! [`AuditCapture`], then [`Libvirt`], then its [`Domain`]s.
//!
//! Needs what `cargo xtask setup` installs: the Debian packages, the `libvirt-qemu` user and
//! groups, and `/dev/kvm` usable by group `kvm`.

use std::{
    fs,
    io::{BufRead as _, BufReader, ErrorKind},
    os::unix::{fs::MetadataExt as _, fs::PermissionsExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Mutex,
        mpsc::{Receiver, RecvTimeoutError, channel},
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{ChildGuard, PATIENCE, TempDir, require_root, sh};

/// The libvirt connection the tests use: the system QEMU driver of our own `libvirtd`.
pub const URI: &str = "qemu:///system";

/// How long a daemon may take to report READY=1 (they take about 40 ms here).
const STARTUP: Duration = Duration::from_secs(60);

/// How long one `virsh` command may take. The first connection on a new machine makes libvirtd
/// probe QEMU's capabilities (about 12 s here); `detach-device` of a NIC no guest acknowledges
/// waits libvirt's own 5 s unplug timeout. Only a bound on a hang.
const VIRSH_TIMEOUT: Duration = Duration::from_secs(180);

/// Where libvirt keeps the pid file of each running QEMU domain.
const QEMU_RUN_DIR: &str = "/run/libvirt/qemu";

// ---------------------------------------------------------------------------------------------
// Daemons

/// A daemon started in the foreground as our child, stopped (SIGTERM, then SIGKILL) on drop.
///
/// A thread waits on the child, so that its exit is an event: it is sent on a channel and, as a
/// datagram `EXITED=...`, to the notify socket the start-up waits on, so a daemon that dies
/// while starting wakes that wait at once.
struct Daemon {
    name: &'static str,
    pid: Pid,
    exited: Receiver<ExitStatus>,
    status: Option<ExitStatus>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `program args`, output to `log`, with `NOTIFY_SOCKET=notify` if given (the
    /// sd_notify protocol, which libvirtd and virtlogd speak without systemd).
    fn spawn(
        name: &'static str,
        program: &str,
        args: &[&str],
        log: PathBuf,
        notify: Option<&Path>,
    ) -> Self {
        let out = fs::File::create(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = out.try_clone().expect("dup log fd");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env_remove("NOTIFY_SOCKET");
        if let Some(notify) = notify {
            cmd.env("NOTIFY_SOCKET", notify);
        }
        let mut child: Child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e} (run `cargo xtask setup`)"));
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
        let (tx, exited) = channel();
        let notify = notify.map(Path::to_path_buf);
        thread::spawn(move || {
            let status = child.wait().expect("wait for daemon");
            if let Some(notify) = notify
                && let Ok(sock) = UnixDatagram::unbound()
            {
                let _ = sock.send_to(format!("EXITED={name} {status}").as_bytes(), notify);
            }
            let _ = tx.send(status);
        });
        Self {
            name,
            pid,
            exited,
            status: None,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    /// How it ended, if it has.
    fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.exited.try_recv().ok();
        }
        self.status
    }

    /// The end of its output, for failure messages.
    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Asks it to stop and waits until it has (SIGKILL if it will not within [`PATIENCE`]).
    /// Returns its exit status.
    fn stop(&mut self) -> Option<ExitStatus> {
        if self.exit_status().is_some() {
            return self.status;
        }
        // It had not exited when checked just above; at worst the waiter thread reaped it an
        // instant ago, far too soon for the kernel to hand its pid to another process.
        let _ = kill(self.pid, Signal::SIGTERM);
        self.status = match self.exited.recv_timeout(PATIENCE) {
            Ok(status) => Some(status),
            Err(_) => {
                eprintln!("{} ignored SIGTERM for {PATIENCE:?}: SIGKILL", self.name);
                let _ = kill(self.pid, Signal::SIGKILL);
                self.exited.recv_timeout(PATIENCE).ok()
            }
        };
        self.status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A bound datagram socket that daemons started with `NOTIFY_SOCKET` report READY=1 on.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(path: PathBuf) -> Self {
        let _ = fs::remove_file(&path);
        let sock =
            UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        Self { sock, path }
    }

    /// Waits for `daemon` to say READY=1: the event a daemon that supports sd_notify gives when
    /// it is serving, so no polling. Fails at once if it exits instead.
    fn wait_ready(&self, daemon: &mut Daemon) {
        let deadline = Instant::now() + STARTUP;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "{} did not report READY=1 within {STARTUP:?}; its output:\n{}",
                    daemon.name,
                    daemon.log_tail()
                );
            }
            self.sock
                .set_read_timeout(Some(left))
                .expect("set_read_timeout");
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    if text.lines().any(|l| l == "READY=1") {
                        return;
                    }
                    if text.starts_with(&format!("EXITED={} ", daemon.name)) {
                        panic!(
                            "{} exited while starting ({}); its output:\n{}",
                            daemon.name,
                            text.trim_start_matches("EXITED="),
                            daemon.log_tail()
                        );
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("notify socket: {e}"),
            }
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Pids of running processes whose command name is `comm`.
fn processes_named(comm: &str) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm)
        })
        .collect()
}

/// Fails unless `program` is installed (in PATH).
fn require_program(program: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    assert!(
        found,
        "{program} is not installed: run `cargo xtask setup` (it installs libvirt and auditd)"
    );
}

// ---------------------------------------------------------------------------------------------
// libvirt

/// Our own `virtlogd` and `libvirtd`, started in the background and stopped on drop, after
/// every domain defined through this guard has been destroyed and undefined.
pub struct Libvirt {
    dir: TempDir,
    // Dropped in this order by hand in `drop`: libvirtd first (it talks to virtlogd).
    libvirtd: Mutex<Daemon>,
    virtlogd: Daemon,
    /// Domains defined through this guard and not yet undone: (name, qemu pid once running).
    domains: Mutex<Vec<(String, Option<u32>)>>,
    restarts: std::sync::atomic::AtomicU32,
}

impl Libvirt {
    /// Starts virtlogd, then libvirtd, and returns once `virsh -c qemu:///system version`
    /// answers. Fails if a libvirtd or virtlogd is already running: the tests never share one.
    pub fn start() -> Self {
        require_root();
        for program in ["libvirtd", "virtlogd", "virsh"] {
            require_program(program);
        }
        for daemon in ["libvirtd", "virtlogd"] {
            let running = processes_named(daemon);
            assert!(
                running.is_empty(),
                "{daemon} is already running (pid {running:?}): these tests start their own \
                 libvirt and never share one; stop it first"
            );
        }
        check_qemu_user();

        let dir = TempDir::new("libvirt");
        let notify = NotifySocket::bind(dir.0.join("notify.sock"));
        // Without systemd, both daemons run in the foreground as our children; they complain
        // about D-Bus, udev, dmidecode and dnsmasq, which do not matter here.
        let mut virtlogd = Daemon::spawn(
            "virtlogd",
            "virtlogd",
            &[],
            dir.0.join("virtlogd.log"),
            Some(&notify.path),
        );
        notify.wait_ready(&mut virtlogd);
        let mut libvirtd = Daemon::spawn(
            "libvirtd",
            "libvirtd",
            &[],
            dir.0.join("libvirtd.log"),
            Some(&notify.path),
        );
        notify.wait_ready(&mut libvirtd);
        let lv = Self {
            dir,
            libvirtd: Mutex::new(libvirtd),
            virtlogd,
            domains: Mutex::new(Vec::new()),
            restarts: Default::default(),
        };
        // libvirtd says READY=1 before its drivers have initialised, but holds connections until
        // they have: this one command returns once the QEMU driver answers (on a new machine,
        // after it has probed QEMU's capabilities), with no polling.
        lv.virsh_ok(&["version"]);
        lv
    }

    /// Stops libvirtd and starts another (its running domains keep running, as with
    /// `systemctl restart libvirtd`); returns once the new one answers, with its pid.
    pub fn restart_libvirtd(&self) -> u32 {
        self.daemon().stop();
        let n = self
            .restarts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let notify = NotifySocket::bind(self.dir.0.join(format!("notify-{n}.sock")));
        let mut libvirtd = Daemon::spawn(
            "libvirtd",
            "libvirtd",
            &[],
            self.dir.0.join(format!("libvirtd-{n}.log")),
            Some(&notify.path),
        );
        notify.wait_ready(&mut libvirtd);
        let pid = libvirtd.pid();
        *self.daemon() = libvirtd;
        self.virsh_ok(&["version"]);
        pid
    }

    fn daemon(&self) -> std::sync::MutexGuard<'_, Daemon> {
        self.libvirtd.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The temporary directory for this libvirt's logs and XML files.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// libvirtd's pid (the `pid=` of the audit records it writes).
    pub fn libvirtd_pid(&self) -> u32 {
        self.daemon().pid()
    }

    /// Runs `virsh -c qemu:///system ARGS` (bounded by [`VIRSH_TIMEOUT`]): Ok(stdout) or
    /// Err(stderr, with libvirtd's last lines if it died).
    pub fn virsh(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("timeout")
            .args(["--kill-after=5", &VIRSH_TIMEOUT.as_secs().to_string()])
            .args(["virsh", "-c", URI])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run virsh");
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let mut err = format!(
            "virsh {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
        if out.status.code() == Some(124) {
            err.push_str(&format!(" (no answer within {VIRSH_TIMEOUT:?})"));
        }
        Err(err)
    }

    /// [`Self::virsh`] that must succeed.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        self.virsh(args).unwrap_or_else(|err| {
            panic!(
                "{err}\nlibvirtd's last output:\n{}",
                self.daemon().log_tail()
            )
        })
    }

    fn register(&self, name: &str) {
        self.domains
            .lock()
            .expect("domains")
            .push((name.to_owned(), None));
    }

    fn set_pid(&self, name: &str, pid: u32) {
        for entry in self.domains.lock().expect("domains").iter_mut() {
            if entry.0 == name {
                entry.1 = Some(pid);
            }
        }
    }

    fn unregister(&self, name: &str) {
        self.domains
            .lock()
            .expect("domains")
            .retain(|(n, _)| n != name);
    }

    /// Destroys and undefines a domain, whatever state it is in; kills its qemu if libvirt
    /// could not. Errors are ignored: this runs in guards.
    fn undo_domain(&self, name: &str, pid: Option<u32>) {
        let _ = self.virsh(&["destroy", name]);
        let _ = self.virsh(&["undefine", name]);
        if let Some(pid) = pid
            && Path::new(&format!("/proc/{pid}")).exists()
            && let Ok(pid) = i32::try_from(pid)
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        let left = std::mem::take(&mut *self.domains.lock().unwrap_or_else(|e| e.into_inner()));
        for (name, pid) in left {
            self.undo_domain(&name, pid);
        }
        let stopped = self.daemon().stop();
        if let Some(status) = stopped
            && !status.success()
            && !std::thread::panicking()
        {
            eprintln!(
                "libvirtd ended with {status}; its output:\n{}",
                self.daemon().log_tail()
            );
        }
        self.virtlogd.stop();
    }
}

/// Fails with a clear message unless the user libvirt runs qemu as exists and can use /dev/kvm
/// (otherwise libvirt re-probes QEMU on every call: 40 s to define a domain).
fn check_qemu_user() {
    let user = Command::new("getent")
        .args(["passwd", "libvirt-qemu"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        user,
        "no user libvirt-qemu (libvirt runs qemu as it): run `cargo xtask setup`"
    );
    if let Ok(meta) = fs::metadata("/dev/kvm") {
        let kvm = sh("getent", &["group", "kvm"]);
        let kvm: Option<u32> = kvm.split(':').nth(2).and_then(|g| g.trim().parse().ok());
        assert!(
            Some(meta.gid()) == kvm && meta.permissions().mode() & 0o060 == 0o060,
            "/dev/kvm is not read-write for group kvm, so libvirt finds its QEMU capabilities \
             stale on every call: run `cargo xtask setup` (it does what udev would)"
        );
    }
}

/// An `<interface type='ethernet'>`: a tap device libvirt creates, opens and passes to qemu.
#[derive(Clone, Debug)]
pub struct Nic {
    /// Lower-case MAC, `52:54:00:...`.
    pub mac: String,
    /// The tap device's name (`<target dev='...'/>`), unique per test.
    pub dev: String,
}

impl Nic {
    pub fn new(mac: &str, dev: &str) -> Self {
        Self {
            mac: mac.to_owned(),
            dev: dev.to_owned(),
        }
    }

    pub fn xml(&self) -> String {
        format!(
            "<interface type='ethernet'><mac address='{}'/><target dev='{}'/>\
             <model type='virtio'/></interface>",
            self.mac, self.dev
        )
    }
}

/// A domain defined and started through [`Libvirt`]: TCG (`type='qemu'`), machine `pc` with
/// ACPI (without it the PCI bus refuses hot-plug), 64 MiB, ethernet NICs, and no disk unless
/// [`Domain::build`] gives it other devices. Destroyed,
/// undefined and its taps deleted on drop.
pub struct Domain<'a> {
    lv: &'a Libvirt,
    pub name: String,
    pub uuid: String,
    /// Every NIC ever given to it (at start or attached), for cleaning up their taps.
    nics: Vec<Nic>,
    pid: Option<u32>,
}

impl<'a> Domain<'a> {
    /// Defines and starts `name` with `uuid` and `nics`, with no guest OS. A domain or taps of
    /// the same names left by an earlier, killed run are removed first (the names belong to the
    /// test).
    pub fn start(lv: &'a Libvirt, name: &str, uuid: &str, nics: &[Nic]) -> Self {
        Self::build(lv, name, uuid).nics(nics).start()
    }

    /// A domain to start with more than NICs: `Domain::build(..).device(XML)...start()`.
    pub fn build(lv: &'a Libvirt, name: &str, uuid: &str) -> DomainSpec<'a> {
        DomainSpec {
            lv,
            name: name.to_owned(),
            uuid: uuid.to_owned(),
            nics: Vec::new(),
            devices: String::new(),
        }
    }

    /// As [`Domain::start`], booting the test guest ([`crate::guest::GuestImage`]) with its
    /// console (ttyS0) written to `serial_log`: a guest that answers hot-unplug.
    pub fn start_guest(
        lv: &'a Libvirt,
        name: &str,
        uuid: &str,
        nics: &[Nic],
        guest: &crate::guest::GuestImage,
        serial_log: &Path,
    ) -> Self {
        let boot = format!(
            "<kernel>{}</kernel><initrd>{}</initrd><cmdline>console=ttyS0</cmdline>",
            path_str(&guest.kernel),
            path_str(&guest.initrd)
        );
        let serial = format!(
            "<serial type='file'><source path='{}'/><target port='0'/></serial>",
            path_str(serial_log)
        );
        Self::start_with(lv, name, uuid, nics, 128, &boot, &serial)
    }

    fn start_with(
        lv: &'a Libvirt,
        name: &str,
        uuid: &str,
        nics: &[Nic],
        mib: u32,
        boot: &str,
        devices: &str,
    ) -> Self {
        let _ = lv.virsh(&["destroy", name]);
        let _ = lv.virsh(&["undefine", name]);
        for nic in nics {
            delete_link(&nic.dev);
        }
        let interfaces: String = nics.iter().map(Nic::xml).collect();
        let xml = format!(
            "<domain type='qemu'>\n\
             \x20 <name>{name}</name>\n\
             \x20 <uuid>{uuid}</uuid>\n\
             \x20 <memory unit='MiB'>{mib}</memory>\n\
             \x20 <vcpu>1</vcpu>\n\
             \x20 <os><type arch='x86_64' machine='pc'>hvm</type>{boot}</os>\n\
             \x20 <features><acpi/></features>\n\
             \x20 <devices>{interfaces}{devices}</devices>\n\
             </domain>\n"
        );
        let file = lv.dir().join(format!("{name}.xml"));
        fs::write(&file, xml).expect("write domain XML");
        lv.register(name);
        let mut dom = Self {
            lv,
            name: name.to_owned(),
            uuid: uuid.to_owned(),
            nics: nics.to_vec(),
            pid: None,
        };
        lv.virsh_ok(&["define", path_str(&file)]);
        lv.virsh_ok(&["start", name]);
        let pid = dom.read_pid();
        lv.set_pid(name, pid);
        dom.pid = Some(pid);
        dom
    }

    /// qemu's pid, from libvirt's pid file (written before `virsh start` returns).
    pub fn pid(&self) -> u32 {
        self.pid.expect("domain is running")
    }

    fn read_pid(&self) -> u32 {
        let file = Path::new(QEMU_RUN_DIR).join(format!("{}.pid", self.name));
        let text = fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e} (is the domain running?)", file.display()));
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{}: not a pid: {text:?}", file.display()))
    }

    /// `virsh attach-device NAME FILE --live` of another NIC; returns virsh's answer.
    pub fn attach(&mut self, nic: &Nic) -> String {
        delete_link(&nic.dev);
        self.nics.push(nic.clone());
        let file = self.nic_file(nic);
        self.lv
            .virsh_ok(&["attach-device", &self.name, path_str(&file), "--live"])
    }

    /// `virsh detach-device NAME FILE --live`; returns virsh's answer. With no guest OS to
    /// acknowledge the unplug this takes libvirt's 5 s timeout, says "Device detached
    /// successfully", and nothing is detached.
    pub fn detach(&mut self, nic: &Nic) -> String {
        let file = self.nic_file(nic);
        self.lv
            .virsh_ok(&["detach-device", &self.name, path_str(&file), "--live"])
    }

    fn nic_file(&self, nic: &Nic) -> PathBuf {
        let file = self.lv.dir().join(format!("{}-{}.xml", self.name, nic.dev));
        fs::write(&file, nic.xml()).expect("write interface XML");
        file
    }

    /// `virsh destroy`: libvirt kills qemu and returns once it has gone.
    pub fn destroy(&mut self) -> String {
        let out = self.lv.virsh_ok(&["destroy", &self.name]);
        self.pid = None;
        out
    }
}

/// What [`Domain::build`] starts: its NICs and other devices' XML, no guest OS.
pub struct DomainSpec<'a> {
    lv: &'a Libvirt,
    name: String,
    uuid: String,
    nics: Vec<Nic>,
    devices: String,
}

impl<'a> DomainSpec<'a> {
    pub fn nics(mut self, nics: &[Nic]) -> Self {
        self.nics.extend_from_slice(nics);
        self
    }

    /// One more element inside `<devices>` (a `<disk>`, `<rng>`, `<serial>`, `<channel>`...).
    pub fn device(mut self, xml: &str) -> Self {
        self.devices.push_str(xml);
        self
    }

    /// Defines and starts it, as [`Domain::start`] does.
    pub fn start(self) -> Domain<'a> {
        Domain::start_with(
            self.lv,
            &self.name,
            &self.uuid,
            &self.nics,
            64,
            "",
            &self.devices,
        )
    }
}

impl Drop for Domain<'_> {
    fn drop(&mut self) {
        self.lv.undo_domain(&self.name, self.pid);
        self.lv.unregister(&self.name);
        for nic in &self.nics {
            delete_link(&nic.dev);
        }
    }
}

/// Deletes a network link if it exists (a tap left behind).
fn delete_link(name: &str) {
    if Path::new("/sys/class/net").join(name).exists() {
        let _ = Command::new("ip").args(["link", "del", name]).output();
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// How many fds of `pid` are open on `/dev/net/tun` (read by the test itself from /proc).
pub fn tun_fds(pid: u32) -> usize {
    let dir = format!("/proc/{pid}/fd");
    fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target == Path::new("/dev/net/tun"))
        .count()
}

// ---------------------------------------------------------------------------------------------
// Capturing audit records

/// The kernel's audit state, from `auditctl -s`.
#[derive(Clone, Copy, Debug)]
pub struct AuditStatus {
    /// 0 off, 1 on, 2 on and locked.
    pub enabled: u32,
    /// The registered audit daemon, 0 for none.
    pub pid: u32,
    /// How many records the kernel queues for the daemon before it makes senders wait.
    pub backlog_limit: u32,
}

pub fn audit_status() -> AuditStatus {
    let out = sh("auditctl", &["-s"]);
    let field = |name: &str| -> u32 {
        out.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in `auditctl -s`: {out}"))
    };
    AuditStatus {
        enabled: field("enabled"),
        pid: field("pid"),
        backlog_limit: field("backlog_limit"),
    }
}

/// Debian's `auditd` in the foreground (`-n`) with a temporary configuration whose `log_file` is
/// a temporary file in RAW format (the records exactly as the kernel sent them), and a reader
/// that follows that file line by line as auditd writes it (`tail -F`, which waits on inotify:
/// lines arriving are the events the waits below wait on).
///
/// Auditing is turned on while it runs and the previous state restored on drop, after auditd
/// has stopped.
pub struct AuditCapture {
    dir: TempDir,
    log: PathBuf,
    previous: AuditStatus,
    auditd: Daemon,
    tail: ChildGuard,
    lines: Receiver<String>,
    /// Every line of the log read so far, in order.
    pub seen: Vec<String>,
    /// Waits look at lines from here on: each wait consumes up to its match.
    cursor: usize,
    markers: u32,
}

impl AuditCapture {
    /// Turns auditing on, starts auditd and returns once a marker sent through the kernel has
    /// come back in the log (so the whole path kernel -> auditd -> file works).
    pub fn start() -> Self {
        require_root();
        for program in ["auditd", "auditctl", "ausearch", "tail"] {
            require_program(program);
        }
        let previous = audit_status();
        assert!(
            previous.pid == 0 && processes_named("auditd").is_empty(),
            "an audit daemon is already registered with the kernel (pid {}): stop it first; \
             the kernel sends records to one daemon only",
            previous.pid
        );
        if previous.enabled == 0 {
            sh("auditctl", &["-e", "1"]);
        }
        // The default backlog (64) fills up with the BPF/SYSCALL records of every program
        // load on a busy host, and records then wait or are lost: room for bursts.
        sh("auditctl", &["-b", "8192"]);
        let dir = TempDir::new("auditd");
        let log = dir.0.join("audit.log");
        let plugins = dir.0.join("plugins.d");
        fs::create_dir(&plugins).expect("mkdir plugins.d");
        let conf = dir.0.join("auditd.conf");
        fs::write(&conf, auditd_conf(&log, &plugins)).expect("write auditd.conf");
        // auditd refuses a configuration writable by group or others.
        fs::set_permissions(&conf, fs::Permissions::from_mode(0o640)).expect("chmod");
        fs::write(&log, "").expect("create log");
        fs::set_permissions(&log, fs::Permissions::from_mode(0o600)).expect("chmod");

        let mut tail = Command::new("tail")
            .args(["-F", "-n", "+1"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tail");
        let stdout = tail.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        // `-s nochange`: auditd leaves the enabled flag alone (we set and restore it ourselves;
        // auditd 3.0.9 left it on after SIGTERM here, whatever its manual says).
        let auditd = Daemon::spawn(
            "auditd",
            "auditd",
            &["-n", "-s", "nochange", "-c", path_str(&dir.0)],
            dir.0.join("auditd.out"),
            None,
        );
        let mut capture = Self {
            dir,
            log,
            previous,
            auditd,
            tail: ChildGuard(tail),
            lines,
            seen: Vec::new(),
            cursor: 0,
            markers: 0,
        };
        let pid = capture.auditd.pid();
        capture.wait_for("auditd's DAEMON_START", |l| {
            l.starts_with("type=DAEMON_START ") && l.contains(&format!(" pid={pid} "))
        });
        // auditd logs its start before it registers with the kernel; a marker sent in between
        // goes to printk, not to auditd. The registration gives no event to wait on: poll the
        // kernel's status, with a short backoff.
        let deadline = Instant::now() + PATIENCE;
        let mut pause = Duration::from_millis(2);
        while audit_status().pid != pid {
            assert!(
                Instant::now() < deadline,
                "auditd (pid {pid}) did not register with the kernel within {PATIENCE:?}"
            );
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        capture.sync();
        capture
    }

    /// The log file (the same file `ausearch -if` reads).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Sends a marker through the kernel (`auditctl -m`, an AUDIT_USER record) and waits until it
    /// is in the log. The kernel queues records in order and auditd writes them in order, so
    /// every record sent before this call is in `seen` when it returns.
    pub fn sync(&mut self) {
        self.markers += 1;
        let marker = format!("vmaudit-test-sync-{}-{}", std::process::id(), self.markers);
        sh("auditctl", &["-m", &marker]);
        let line = self.wait_for(&format!("marker {marker}"), |l| l.contains(&marker));
        assert!(
            line.starts_with("type=USER "),
            "marker in an unexpected record: {line}"
        );
    }

    /// Waits for the next line after the previous match that satisfies `pred` (keeping every
    /// line in `seen`); fails after [`PATIENCE`].
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        if let Some(i) = self.seen[self.cursor..].iter().position(|l| pred(l)) {
            self.cursor += i + 1;
            return self.seen[self.cursor - 1].clone();
        }
        self.cursor = self.seen.len();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    self.cursor = self.seen.len();
                    if pred(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let auditd = self.auditd.exit_status();
                    // Another process (a test run elsewhere) may have turned auditing off:
                    // the kernel then drops every record.
                    let now = audit_status();
                    panic!(
                        "no audit log line for {what} within {PATIENCE:?} (kernel audit now \
                         {now:?}; auditd exited: {auditd:?}; its output: {}); last lines:\n{}",
                        self.auditd.log_tail(),
                        self.seen[self.seen.len().saturating_sub(10)..].join("\n")
                    )
                }
                Err(RecvTimeoutError::Disconnected) => panic!("tail -F of the audit log ended"),
            }
        }
    }

    /// Waits for the next record of type `kind` about domain `uuid` whose fields include every
    /// `key=value` in `fields` (values as written, quotes included).
    pub fn wait_record(&mut self, kind: &str, uuid: &str, fields: &[(&str, &str)]) -> Record {
        let what = format!("{kind} uuid={uuid} {fields:?}");
        let line = self.wait_for(&what, |l| {
            Record::parse(l)
                .is_some_and(|r| r.kind == kind && r.raw("uuid") == Some(uuid) && r.has_all(fields))
        });
        Record::parse(&line).expect("parsed above")
    }

    /// Every VIRT_* record seen so far about domain `uuid`, in order.
    pub fn virt_records(&self, uuid: &str) -> Vec<Record> {
        self.seen
            .iter()
            .filter_map(|l| Record::parse(l))
            .filter(|r| r.kind.starts_with("VIRT_") && r.raw("uuid") == Some(uuid))
            .collect()
    }

    /// The directory of auditd's configuration and output.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }
}

impl Drop for AuditCapture {
    fn drop(&mut self) {
        self.auditd.stop();
        let _ = Command::new("auditctl")
            .args(["-b", &self.previous.backlog_limit.to_string()])
            .output();
        if self.previous.enabled == 0 {
            let _ = Command::new("auditctl").args(["-e", "0"]).output();
        }
        // Stop following the log before its directory goes (the guard then reaps `tail`).
        let _ = self.tail.0.kill();
    }
}

/// auditd.conf for a capture into `log`: RAW lines, every record flushed to the file as it
/// comes, no rotation, no space actions, no plugins.
fn auditd_conf(log: &Path, plugins: &Path) -> String {
    format!(
        "local_events = yes\n\
         write_logs = yes\n\
         log_file = {}\n\
         log_format = RAW\n\
         flush = DATA\n\
         max_log_file = 0\n\
         max_log_file_action = IGNORE\n\
         num_logs = 0\n\
         space_left = 2\n\
         space_left_action = IGNORE\n\
         admin_space_left = 1\n\
         admin_space_left_action = IGNORE\n\
         disk_full_action = IGNORE\n\
         disk_error_action = IGNORE\n\
         plugin_dir = {}\n\
         name_format = NONE\n\
         q_depth = 2000\n\
         overflow_action = IGNORE\n",
        log.display(),
        plugins.display()
    )
}

/// One line of an audit log in RAW format, split into fields:
/// `type=KIND msg=audit(STAMP): pid=.. uid=.. auid=.. ses=.. msg='k=v k="v" ...'`.
/// Values never contain spaces (audit encodes them), so fields split on spaces.
#[derive(Clone, Debug)]
pub struct Record {
    pub line: String,
    pub kind: String,
    /// `SECONDS.MILLIS:SERIAL`.
    pub stamp: String,
    /// The kernel's fields, then the text's, in order, values as written.
    pub fields: Vec<(String, String)>,
}

impl Record {
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("type=")?;
        let (kind, rest) = rest.split_once(' ')?;
        let rest = rest.strip_prefix("msg=audit(")?;
        let (stamp, rest) = rest.split_once("): ")?;
        let (outer, text) = match rest.split_once(" msg='") {
            Some((outer, text)) => (outer, text.strip_suffix('\'')?),
            None => (rest, ""),
        };
        let fields = outer
            .split(' ')
            .chain(text.split(' '))
            .filter(|w| !w.is_empty())
            .map(|w| {
                let (k, v) = w.split_once('=').unwrap_or((w, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect();
        Some(Self {
            line: line.to_owned(),
            kind: kind.to_owned(),
            stamp: stamp.to_owned(),
            fields,
        })
    }

    /// A field's value as written (quotes included).
    pub fn raw(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A field's value without its quotes.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.raw(key).map(|v| {
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v)
        })
    }

    /// Whether every `key=value` in `fields` is one of its fields (values as written).
    pub fn has_all(&self, fields: &[(&str, &str)]) -> bool {
        fields.iter().all(|(k, v)| self.raw(k) == Some(*v))
    }

    /// The record with what changes from run to run and machine to machine replaced by `*`:
    /// the stamp, the sender's pid, auid and ses (the login of whoever started libvirtd), a
    /// non-zero vm-pid, the cgroup directory (its `qemu-N-` counter and the cgroup layout) and
    /// the uid:gid of libvirt's qemu user. What is left must not change between runs.
    pub fn normalized(&self) -> String {
        let fields: Vec<String> = self
            .fields
            .iter()
            .map(|(k, v)| {
                let v = match k.as_str() {
                    "pid" | "auid" | "ses" | "cgroup" | "vm-ctx" | "img-ctx" => "*",
                    "vm-pid" if v != "0" => "*",
                    _ => v.as_str(),
                };
                format!("{k}={v}")
            })
            .collect();
        format!("type={} {}", self.kind, fields.join(" "))
    }
}

/// `%02X:%02X` of a device node's major:minor, as libvirt writes `rdev`.
pub fn rdev_of(path: &str) -> String {
    let rdev = fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .rdev();
    format!(
        "{:02X}:{:02X}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    )
}
