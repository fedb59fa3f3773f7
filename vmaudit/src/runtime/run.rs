//! `vmaudit run`: the VM's life, each step audited before it is reported done.
//!
//! Order, as libvirt's qemu driver does it: open every device (one `reason=open` record per
//! fd, success or failure), set up the cgroup and its device ACL (one record per change),
//! launch the emulator in the cgroup with exactly the device fds, write `resrc=net
//! reason=start` per interface and VIRT_CONTROL `op=start`, close vmaudit's copies of the
//! fds; then wait for SIGINT/SIGTERM or the emulator's end, write `op=stop` with the reason,
//! and remove everything that was made.

use std::{
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    control,
    devices::{self, NetDevice, OpenAttempt, Role},
    hotplug::{Live, Nic},
    launch,
    qmp::Qmp,
    spec::{Spec, SpecError},
    vmcgroup::{self, VmCgroupHandle},
};
use crate::{
    audit::{
        AuditMode, AuditSink, Journal, JournalEntry,
        record::{ControlOp, NetChange, Record, RecordBuilder, StartReason, StopReason, VmIdent},
    },
    exit,
    observe::{loader::TrackerOptions, monotonic_ns},
    paths,
    verify::{
        Claim, ClaimKind, Handed,
        engine::{Engine, EngineConfig, EngineError, Msg, Outcome},
        publish::Lines,
    },
};

/// Why a run failed, each with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("journal")]
    Journal(#[source] crate::audit::JournalError),
    #[error("audit record")]
    Record(#[from] crate::audit::record::RecordError),
    #[error("writing the audit record")]
    Sink(#[source] crate::audit::SinkError),
    #[error("interface {mac}")]
    Device {
        mac: String,
        #[source]
        source: Box<devices::DeviceError>,
    },
    #[error("cgroup")]
    Cgroup(#[source] Box<vmcgroup::SetupError>),
    #[error("emulator")]
    Launch(#[from] launch::LaunchError),
    #[error("the emulator exited before it was up ({status})")]
    EarlyExit { status: std::process::ExitStatus },
    #[error("run directory {path}")]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for the emulator")]
    Wait(#[source] std::io::Error),
    #[error("verifier")]
    Verify(#[source] EngineError),
}

impl RunError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Spec(_) => exit::SPEC,
            Self::Journal(_) | Self::Sink(_) => exit::JOURNAL,
            Self::Device { .. } => exit::DEVICE,
            Self::Cgroup(_) => exit::CGROUP,
            Self::Launch(_) | Self::EarlyExit { .. } => exit::EMULATOR_FAILED,
            Self::Record(_) | Self::RunDir { .. } | Self::Wait(_) => exit::INTERNAL,
            Self::Verify(e) => e.exit_code(),
        }
    }
}

/// How the VM ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Stopped by vmaudit on SIGINT/SIGTERM.
    Destroyed,
    /// The emulator exited with status 0 by itself.
    Shutdown,
    /// The emulator exited with an error or was killed by someone else.
    Crashed,
    /// `--strict`: stopped at the first violation.
    Violation,
    /// Ended otherwise, but the verifier found a violation on the way.
    ViolationFound,
    /// Ended otherwise, but a claim is unconfirmed or unknown.
    Unconfirmed,
}

impl Ending {
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Destroyed | Self::Shutdown => exit::OK,
            Self::Crashed => exit::EMULATOR_CRASHED,
            Self::Violation | Self::ViolationFound => exit::VIOLATED,
            Self::Unconfirmed => exit::UNCONFIRMED,
        }
    }
}

/// What `vmaudit run` was asked.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub spec: PathBuf,
    pub audit: AuditMode,
    /// Default: `/var/log/vmaudit/<name>.jsonl`.
    pub journal: Option<PathBuf>,
    /// Hold every claim to the kernel's evidence (default).
    pub verify: bool,
    /// Stop the VM at the first violation.
    pub strict: bool,
    /// How long a claim may wait for its evidence.
    pub deadline: Duration,
    /// Print each verdict's journal line on stdout too.
    pub echo_verdicts: bool,
    /// The verifier's tracker options (ring buffer size).
    pub tracker: TrackerOptions,
    /// Told everything the verifier sees (the dashboard and metrics of `--serve`).
    pub observers: crate::verify::observer::Observers,
}

impl RunOptions {
    pub fn new(spec: PathBuf) -> Self {
        Self {
            spec,
            audit: AuditMode::Both,
            journal: None,
            verify: true,
            strict: false,
            deadline: Duration::from_secs(2),
            echo_verdicts: true,
            tracker: TrackerOptions::default(),
            observers: Default::default(),
        }
    }
}

/// The audit trail of one VM: every record goes to the sink (kernel, then the journal,
/// fsync'd), then its journal line to `on_record` (stdout, for the operator).
pub struct Trail<'a> {
    pub vm: VmIdent,
    sink: AuditSink,
    on_record: &'a mut dyn FnMut(&JournalEntry),
    verifier: Option<Engine>,
    claims: u64,
}

impl Trail<'_> {
    pub fn emit(&mut self, b: RecordBuilder) -> Result<Record, RunError> {
        self.emit_entry(b).map(|(rec, _)| rec)
    }

    fn emit_entry(&mut self, b: RecordBuilder) -> Result<(Record, JournalEntry), RunError> {
        let rec = b.build()?;
        let outcome = self.sink.emit(&rec).map_err(RunError::Sink)?;
        (self.on_record)(&outcome.entry);
        Ok((rec, outcome.entry))
    }

    /// Emits a record and hands its claim to the verifier.
    pub fn emit_claim(&mut self, b: RecordBuilder, kind: ClaimKind) -> Result<Record, RunError> {
        let (rec, entry) = self.emit_entry(b)?;
        // The claim exists once its record is written (and fsync'd).
        let made_ns = monotonic_ns();
        if let Some(v) = &self.verifier {
            self.claims += 1;
            v.claim(Claim {
                id: self.claims,
                kind,
                vm_name: self.vm.name.clone(),
                uuid: self.vm.uuid.hyphenated().to_string(),
                success: rec.success,
                sender: Some(std::process::id()),
                text: rec.libvirt_text().to_owned(),
                record_ts_ns: entry.ts_ns,
                made_ns,
                historic: false,
            })
            .map_err(RunError::Verify)?;
        }
        Ok(rec)
    }

    /// The `reason=open` record of one device open (success or failure) and its claim.
    /// `inherited`: the fd reaches the emulator at the same number (launch), so the record
    /// names it; a hot-plugged fd gets its number from qemu's getfd, named by the attach.
    pub fn record_open(
        &mut self,
        mac: &str,
        a: &OpenAttempt<'_>,
        inherited: bool,
    ) -> Result<Record, RunError> {
        let mut b = Record::net_open(&self.vm, mac, a.path, a.rdev).success(a.result.is_ok());
        if let Ok(fd) = a.result {
            b = b.fd(fd);
            if inherited {
                b = b.emulator_fd(fd);
            }
        }
        b = b
            .extra(
                "vmaudit-role",
                if a.role == Role::Tap { "tap" } else { "vhost" },
            )
            .extra("vmaudit-queue", &a.queue.to_string());
        let claim = ClaimKind::NetOpen {
            mac: mac.to_owned(),
            path: a.path.display().to_string(),
            rdev: a.rdev,
            fd: a.result.as_ref().ok().copied(),
        };
        self.emit_claim(b, claim)
    }

    pub fn verifier(&self) -> Option<&Engine> {
        self.verifier.as_ref()
    }
}

/// The run directory, removed on drop.
struct RunDir(PathBuf);

impl RunDir {
    fn create(name: &str) -> Result<Self, RunError> {
        let path = paths::vm_run_dir(name);
        let err = |source| RunError::RunDir {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(paths::RUN_DIR).map_err(err)?;
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let pid = std::fs::read_to_string(path.join("pid"))
                    .ok()
                    .and_then(|p| p.trim().parse::<i32>().ok());
                // SAFETY: kill with signal 0 only checks for the process.
                if pid.is_some_and(|p| unsafe { libc::kill(p, 0) } == 0) {
                    return Err(RunError::RunDir {
                        path: path.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            "a vmaudit run of this VM is alive",
                        ),
                    });
                }
                // A leftover of a run that died: start afresh.
                let _ = std::fs::remove_dir_all(&path);
                std::fs::create_dir(&path).map_err(err)?;
            }
            Err(e) => return Err(err(e)),
        }
        std::fs::write(path.join("pid"), std::process::id().to_string()).map_err(err)?;
        Ok(Self(path))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a VM to its end. `on_record` sees each record once it is journaled; `on_running` is
/// called with the emulator's pid once it is up and every start record is written.
pub async fn run(
    opts: &RunOptions,
    on_record: &mut dyn FnMut(&JournalEntry),
    on_running: &mut dyn FnMut(u32),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Ending, RunError> {
    let spec = Spec::load(&opts.spec)?;
    let journal = match opts.audit {
        AuditMode::Kernel => None,
        AuditMode::Journal | AuditMode::Both => {
            let path = opts
                .journal
                .clone()
                .unwrap_or_else(|| paths::default_journal(&spec.name));
            Some(Journal::open(&path).map_err(RunError::Journal)?)
        }
    };
    let verdict_journal = match (&journal, opts.verify) {
        (Some(j), true) => Some(Journal::open(j.path()).map_err(RunError::Journal)?),
        _ => None,
    };
    let sink = AuditSink::new(opts.audit, journal).map_err(RunError::Sink)?;
    let verifier = if opts.verify {
        Some(start_verifier(opts, verdict_journal)?)
    } else {
        None
    };
    let mut trail = Trail {
        vm: VmIdent::new(spec.emulator.accel.virt(), spec.name.clone(), spec.uuid),
        sink,
        on_record,
        verifier,
        claims: 0,
    };
    let run_dir = RunDir::create(&spec.name)?;

    // Devices, one record per fd.
    let mut devs: Vec<NetDevice> = Vec::new();
    for (i, iface) in spec.interfaces.iter().enumerate() {
        let default_name = match iface.backend {
            super::spec::Backend::Tap => "vmtap%d".to_owned(),
            super::spec::Backend::Macvtap => {
                format!("vmvt{}{i}", &spec.uuid.simple().to_string()[..8])
            }
        };
        let mac = iface.mac.to_string();
        let mut pending: Result<(), RunError> = Ok(());
        let opened = devices::open_interface(iface, &default_name, &mut |a: OpenAttempt<'_>| {
            if pending.is_err() {
                return;
            }
            // Handed over at launch by inheritance: the same number in the emulator.
            pending = trail.record_open(&mac, &a, true).map(|_| ());
        })
        .await;
        match (opened, pending) {
            (Ok(dev), Ok(())) => devs.push(dev),
            (Err(source), _) => {
                teardown(devs).await;
                return Err(RunError::Device {
                    mac,
                    source: Box::new(source),
                });
            }
            (Ok(dev), Err(e)) => {
                dev.teardown().await;
                teardown(devs).await;
                return Err(e);
            }
        }
    }

    // The cgroup and its ACL, one record per change.
    let cgroup = match vmcgroup::setup(&spec, &mut trail) {
        Ok(c) => c,
        Err(e) => {
            teardown(devs).await;
            return Err(e);
        }
    };

    // Launch.
    let qmp = run_dir.0.join("qmp.sock");
    // Custom arguments may name vmaudit's QMP socket as `{qmp}`: vmaudit then waits for it and
    // drives hot-plug through it, as with its default command line.
    let has_qmp = spec
        .emulator
        .args
        .as_ref()
        .is_none_or(|a| a.iter().any(|x| x.contains("{qmp}")));
    let mut args: Vec<String> = match &spec.emulator.args {
        Some(a) => a
            .iter()
            .map(|x| x.replace("{qmp}", &qmp.display().to_string()))
            .collect(),
        None => launch::default_args(&spec, &qmp),
    };
    for (i, (dev, iface)) in devs.iter().zip(&spec.interfaces).enumerate() {
        args.extend(devices::qemu_args(dev, i, iface.queues));
    }
    let keep: Vec<i32> = devs
        .iter()
        .flat_map(|d| d.fds.iter().map(|f| f.fd.as_raw_fd()))
        .collect();
    let program = super::spec::find_program(&spec.emulator.path)
        .unwrap_or_else(|| spec.emulator.path.clone());
    let mut child = match launch::spawn(&program, &args, Some(&cgroup.procs_path()), &keep) {
        Ok(c) => c,
        Err(e) => {
            let _ = trail.emit(
                Record::control(&trail.vm, ControlOp::Stop(StopReason::Failed), 0).success(false),
            );
            finish(devs, cgroup).await;
            return Err(e.into());
        }
    };
    let pid = child.id().unwrap_or(0);
    if has_qmp && let Err(e) = wait_until_up(&mut child, &qmp).await {
        let _ = trail.emit(stop_record(&trail.vm, StopReason::Failed, pid).success(false));
        let _ = child.kill().await;
        finish(devs, cgroup).await;
        return Err(e);
    }
    let me = std::process::id();
    for (dev, iface) in devs.iter().zip(&spec.interfaces) {
        let fds: Vec<String> = dev
            .fds
            .iter()
            .map(|f| f.fd.as_raw_fd().to_string())
            .collect();
        let b = Record::net(&trail.vm, NetChange::Start, &iface.mac.to_string())
            .extra("vmaudit-fds", &fds.join(","))
            .extra("vmaudit-emulator-fds", &fds.join(","));
        // kcmp now, while vmaudit still holds its copies: is the emulator's fd the very open
        // file vmaudit opened?
        let passed = dev
            .fds
            .iter()
            .map(|f| {
                let n = f.fd.as_raw_fd();
                Handed {
                    fd: n,
                    emulator_fd: n,
                    same_at_handoff: crate::kcmp::same_file(me, n, pid, n).ok(),
                    rdev: f.rdev,
                    path: f.path.display().to_string(),
                }
            })
            .collect();
        let claim = ClaimKind::NetUp {
            mac: iface.mac.to_string(),
            attach: false,
            emulator_pid: Some(pid),
            handed: passed,
        };
        trail.emit_claim(b, claim)?;
    }
    trail.emit_claim(
        Record::control(&trail.vm, ControlOp::Start(StartReason::Booted), pid as i64),
        ClaimKind::VmStart { pid },
    )?;
    // The emulator holds the fds now; vmaudit's copies go.
    let mut nics = Vec::new();
    for (i, (mut d, iface)) in devs.drain(..).zip(&spec.interfaces).enumerate() {
        let emulator_fds = d.fds.iter().map(|f| f.fd.as_raw_fd()).collect();
        d.fds.clear();
        nics.push(Nic {
            mac: iface.mac,
            netdev_id: format!("net{i}"),
            device_id: format!("nic{i}"),
            emulator_fds,
            dev: Some(d),
        });
    }
    let qmp_conn = if has_qmp {
        match Qmp::connect(&qmp).await {
            Ok(q) => Some(q),
            Err(e) => {
                log::warn!("no QMP, so no hot-plug: {e}");
                None
            }
        }
    } else {
        None
    };
    let mut live = Live::new(qmp_conn, nics, pid);
    let control = match control::bind(&control::socket_path(&spec.name)) {
        Ok(l) => Some(l),
        Err(e) => {
            log::warn!("no control socket, so no hot-plug: {e}");
            None
        }
    };
    on_running(pid);

    // Until a signal, the emulator's end, or (--strict) a violation.
    let mut violations = trail.verifier().map(|v| v.violations.clone());
    tokio::pin!(shutdown);
    let ending = loop {
        tokio::select! {
            _ = &mut shutdown => {
                if let Some(v) = trail.verifier() {
                    v.send(Msg::Stopping(pid)).map_err(RunError::Verify)?;
                }
                stop_emulator(&mut child).await;
                break Ending::Destroyed;
            }
            status = child.wait() => match status {
                Ok(s) if s.success() => break Ending::Shutdown,
                Ok(_) => break Ending::Crashed,
                Err(e) => {
                    finish(live.take_devices(), cgroup).await;
                    return Err(RunError::Wait(e));
                }
            },
            changed = async { violations.as_mut()?.changed().await.ok() }, if opts.strict && violations.is_some() => {
                if changed.is_some() {
                    log::error!("--strict: stopping the VM at the first violation");
                    if let Some(v) = trail.verifier() {
                        v.send(Msg::Stopping(pid)).map_err(RunError::Verify)?;
                    }
                    stop_emulator(&mut child).await;
                    break Ending::Violation;
                }
                violations = None;
            }
            conn = async { control.as_ref()?.accept().await.ok() }, if control.is_some() => {
                if let Some((mut stream, _)) = conn {
                    let answer = match control::read_request(&mut stream).await {
                        Ok(req) => live.handle(&mut trail, req).await,
                        Err(e) => control::Response::err(exit::REQUEST_FAILED, e),
                    };
                    control::write_response(&mut stream, &answer).await;
                }
            }
        }
    };
    let reason = match ending {
        Ending::Destroyed | Ending::Violation | Ending::ViolationFound | Ending::Unconfirmed => {
            StopReason::Destroyed
        }
        Ending::Shutdown => StopReason::Shutdown,
        Ending::Crashed => StopReason::Crashed,
    };
    let stop = trail.emit_claim(
        stop_record(&trail.vm, reason, pid),
        ClaimKind::VmStop {
            pid: Some(pid),
            reason: ControlOp::Stop(reason).reason().to_owned(),
        },
    );
    finish(devs, cgroup).await;
    drop(run_dir);
    stop?;
    let totals = match trail.verifier.take() {
        Some(v) => Some(v.finish().map_err(RunError::Verify)?),
        None => None,
    };
    Ok(match totals {
        Some(o) => judged(ending, &o),
        None => ending,
    })
}

/// How a run ends once its verdicts are in: `verify`'s exit codes win over a normal end.
fn judged(ending: Ending, o: &Outcome) -> Ending {
    let t = &o.totals;
    log::info!(
        "verdicts: {} confirmed, {} violated, {} unconfirmed, {} unknown",
        t.confirmed,
        t.violated,
        t.unconfirmed,
        t.unknown
    );
    match (ending, t.exit_code()) {
        (Ending::Violation, _) => Ending::Violation,
        (_, exit::VIOLATED) => Ending::ViolationFound,
        (Ending::Destroyed | Ending::Shutdown, exit::UNCONFIRMED) => Ending::Unconfirmed,
        (e, _) => e,
    }
}

/// Starts the verifier thread: verdicts to the journal (fsync'd) and, if asked, stdout.
fn start_verifier(opts: &RunOptions, journal: Option<Journal>) -> Result<Engine, RunError> {
    let me = std::process::id();
    let cfg = EngineConfig {
        deadline: opts.deadline,
        tracker: opts.tracker.clone(),
        observers: opts.observers.clone(),
        watch: vec![me],
        managers: vec![me],
        manager_exes: Vec::new(),
    };
    let publish = Lines {
        journal,
        echo: opts.echo_verdicts,
        reopen: None,
    };
    Engine::start(cfg, Box::new(publish)).map_err(RunError::Verify)
}

/// `op=stop`: libvirt writes `vm-pid=0` there (the domain has no pid any more); the
/// emulator's pid follows in vmaudit's own field.
fn stop_record(vm: &VmIdent, reason: StopReason, pid: u32) -> RecordBuilder {
    Record::control(vm, ControlOp::Stop(reason), 0).extra("vmaudit-vm-pid", &pid.to_string())
}

/// Waits until qemu's QMP socket accepts a connection (qemu is up), or fails if qemu exits
/// first. Bounded: 30 s.
async fn wait_until_up(child: &mut tokio::process::Child, qmp: &Path) -> Result<(), RunError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut delay = Duration::from_millis(2);
    loop {
        if tokio::net::UnixStream::connect(qmp).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait().map_err(RunError::Wait)? {
            return Err(RunError::EarlyExit { status });
        }
        if tokio::time::Instant::now() > deadline {
            return Err(RunError::Wait(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "QMP socket never answered",
            )));
        }
        // qemu gives no other sign of being up than its socket: back off while polling it.
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// SIGTERM, then SIGKILL after 5 s.
async fn stop_emulator(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

async fn teardown(devs: Vec<NetDevice>) {
    for d in devs {
        d.teardown().await;
    }
}

async fn finish(devs: Vec<NetDevice>, cgroup: VmCgroupHandle) {
    teardown(devs).await;
    cgroup.remove();
}
