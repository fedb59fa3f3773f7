//! `vmaudit run`: the VM's life, each step audited before it is reported done.
//!
//! Named phases, in libvirt's qemu driver's order:
//! 1. [`prepare`]: the spec checked field by field and resolved on this host, the VM's lock
//!    taken, the journal opened (a torn last line repaired), the verifier started. Nothing is
//!    made before this has passed.
//! 2. [`recover_dead`]: what a dead run of the VM left is found, removed and journaled, with the
//!    stop record of its VM.
//! 3. [`start`]: the run directory, every device (one `reason=open` record per fd), the cgroup
//!    and its ACL (one record per change), the control and QMP sockets, the emulator launched
//!    in the cgroup as its unprivileged user with exactly the device fds, `resrc=net
//!    reason=start` per interface and VIRT_CONTROL `op=start`; vmaudit's copies of the fds go.
//! 4. [`serve`]: until SIGINT/SIGTERM/SIGHUP/SIGQUIT, the emulator's end, the verifier's end,
//!    or (`--strict`) a violation; control requests are taken from their connections' tasks
//!    and a hot-plug runs beside the loop, never in its way.
//! 5. [`stop`]: the emulator stopped (SIGTERM, SIGKILL after [`STOP_GRACE`]), `op=stop` with the
//!    reason. Everything made is in one teardown guard, [`Made`], taken down in order on every
//!    path, failures included; should vmaudit itself die, the emulator dies with it and the
//!    next run removes the rest (see [`super::recover`]).

use std::{
    cell::RefCell,
    os::fd::{AsRawFd as _, RawFd},
    path::{Path, PathBuf},
    pin::Pin,
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};

use super::{
    control::{self, Job, Response},
    devices::{self, Hooks, Made as Making, NetDevice, OpenAttempt},
    hotplug::{Live, Nic, chain, note_made},
    launch::{self, Launch},
    qmp::Qmp,
    recover::{self, Where},
    rundir::{ProcessId, RunDir, RunDirError, RunLock, State},
    spec::{Backend, Host, QMP_FD, Spec, SpecError},
    trail::{Trail, TrailError},
    vmcgroup::{self, SetupError, VmCgroupHandle},
};
use crate::{
    audit::{
        AuditMode, AuditSink, Journal, JournalEntry,
        record::{ControlOp, NetChange, Record, RecordBuilder, StartReason, StopReason, VmIdent},
    },
    cgroup::pin,
    exit,
    observe::loader::TrackerOptions,
    paths,
    verify::{
        ClaimKind, Handed,
        engine::{Engine, EngineConfig, Msg, Outcome},
        publish::Lines,
    },
};

/// How long the emulator has to end after SIGTERM before it is killed: short enough that a
/// SIGTERM to vmaudit stops the VM within 5 s whatever the emulator does.
pub const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long one interface's removal (its macvtap link, over netlink) may take at the stop.
const TEARDOWN_WAIT: Duration = Duration::from_secs(1);
/// How long the emulator has to answer on QMP once started.
pub const UP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a run failed, each with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error("journal")]
    Journal(#[source] crate::audit::JournalError),
    #[error(transparent)]
    Trail(#[from] TrailError),
    #[error("opening the kernel audit subsystem")]
    Sink(#[source] crate::audit::SinkError),
    #[error("interface {mac}")]
    Device {
        mac: String,
        #[source]
        source: Box<devices::DeviceError>,
    },
    #[error("cgroup")]
    Cgroup(#[source] Box<SetupError>),
    #[error("the control socket {path}")]
    Control {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("emulator")]
    Launch(#[from] launch::LaunchError),
    #[error("the emulator exited before it was up ({status})")]
    EarlyExit { status: std::process::ExitStatus },
    #[error("the emulator did not answer on QMP")]
    Qmp(#[source] super::qmp::QmpError),
    #[error("waiting for the emulator")]
    Wait(#[source] std::io::Error),
}

impl RunError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Spec(_) => exit::SPEC,
            Self::RunDir(RunDirError::Running { .. }) => exit::VM_RUNNING,
            Self::RunDir(_) | Self::Control { .. } | Self::Wait(_) => exit::INTERNAL,
            Self::Journal(_) | Self::Sink(_) => exit::JOURNAL,
            Self::Trail(e) => e.exit_code(),
            Self::Device { .. } => exit::DEVICE,
            Self::Cgroup(e) => match e.as_ref() {
                SetupError::Trail(t) => t.exit_code(),
                _ => exit::CGROUP,
            },
            Self::Launch(_) | Self::EarlyExit { .. } | Self::Qmp(_) => exit::EMULATOR_FAILED,
        }
    }
}

impl From<SetupError> for RunError {
    fn from(e: SetupError) -> Self {
        match e {
            SetupError::Trail(t) => Self::Trail(t),
            e => Self::Cgroup(Box::new(e)),
        }
    }
}

/// How the VM ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Stopped by vmaudit on a signal (or stopped while it started).
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

    fn stop_reason(self) -> StopReason {
        match self {
            Self::Shutdown => StopReason::Shutdown,
            Self::Crashed => StopReason::Crashed,
            _ => StopReason::Destroyed,
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

/// Everything phase 1 settled.
struct Ctx {
    spec: Spec,
    host: Host,
    lock: RunLock,
    /// The VM's cgroup directory, and whether it is on cgroup v2.
    cgroup: (PathBuf, bool),
    /// Where its device program's link is pinned (cgroup v2).
    pin: Option<PathBuf>,
    journal: Option<PathBuf>,
}

/// Everything a run made, taken down in order by [`Made::teardown`] (or, should the run's task
/// be dropped, by each field's own drop, in declaration order).
#[derive(Default)]
struct Made {
    /// The emulator (killed on drop).
    child: Option<tokio::process::Child>,
    /// The running VM's interfaces and QMP connection, once started.
    live: Option<Live>,
    /// Devices opened and not yet handed over.
    devs: Vec<NetDevice>,
    cgroup: Option<VmCgroupHandle>,
    /// Removed last: it holds the notes of everything above.
    dir: Option<RefCell<RunDir>>,
}

impl Made {
    /// Takes everything down: the emulator (if it still runs), the interfaces' links and nodes,
    /// the cgroup (killing what is left inside, then the pinned program), the run directory.
    async fn teardown(mut self) {
        if let Some(mut child) = self.child.take() {
            stop_emulator(&mut child, Duration::ZERO).await;
        }
        let mut devs = std::mem::take(&mut self.devs);
        if let Some(mut live) = self.live.take() {
            devs.extend(live.take_devices());
        }
        for d in devs {
            let name = d.ifname.clone();
            // Netlink answers at once; a kernel that does not must not hold the stop up.
            if tokio::time::timeout(TEARDOWN_WAIT, d.teardown())
                .await
                .is_err()
            {
                log::error!("removing interface {name}: no answer within {TEARDOWN_WAIT:?}");
            }
        }
        if let Some(c) = self.cgroup.take()
            && let Err(e) = c.remove()
        {
            log::error!("{}", chain(&e));
        }
        drop(self.dir.take());
    }

    fn dir(&self) -> &RefCell<RunDir> {
        self.dir.as_ref().expect("made first in `start`")
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
    let ctx = prepare(opts)?;
    let trail = open_trail(opts, &ctx, on_record)?;
    tokio::pin!(shutdown);
    let mut made = Made::default();
    let ended = async {
        recover_dead(&ctx, &trail).await?;
        let started = tokio::select! {
            r = start(&ctx, &trail, &mut made) => Some(r?),
            () = &mut shutdown => None,
        };
        match started {
            Some((pid, jobs)) => {
                on_running(pid);
                serve(&trail, &mut made, pid, jobs, opts.strict, shutdown).await
            }
            None => abort_start(&trail, &mut made).await,
        }
    }
    .await;
    made.teardown().await;
    drop(ctx);
    let outcome = trail.finish();
    let ending = ended?;
    Ok(match outcome? {
        Some(o) => judged(ending, &o),
        None => ending,
    })
}

/// Phase 1: the spec, the lock, where the cgroup and its pin go. Nothing is made.
fn prepare(opts: &RunOptions) -> Result<Ctx, RunError> {
    let (spec, host) = Spec::load(&opts.spec)?;
    let lock = RunLock::acquire(&spec.name)?;
    let cgroup = vmcgroup::target(&spec)?;
    let pin = if cgroup.1 {
        let fs = pin::bpffs()
            .map_err(|e| RunError::Cgroup(Box::new(SetupError::Create(Box::new(e)))))?;
        Some(pin::vm_pin(&fs, &spec.name))
    } else {
        None
    };
    let journal = match opts.audit {
        AuditMode::Kernel => None,
        AuditMode::Journal | AuditMode::Both => Some(
            opts.journal
                .clone()
                .unwrap_or_else(|| paths::default_journal(&spec.name)),
        ),
    };
    Ok(Ctx {
        spec,
        host,
        lock,
        cgroup,
        pin,
        journal,
    })
}

/// The journal (one file, one chain, shared by records and verdicts), the sink, the verifier.
fn open_trail<'a>(
    opts: &RunOptions,
    ctx: &Ctx,
    on_record: &'a mut dyn FnMut(&JournalEntry),
) -> Result<Trail<'a>, RunError> {
    let journal = ctx
        .journal
        .as_ref()
        .map(Journal::open)
        .transpose()
        .map_err(RunError::Journal)?;
    let verdicts = journal.clone().filter(|_| opts.verify);
    let sink = AuditSink::new(opts.audit, journal).map_err(RunError::Sink)?;
    let verifier = if opts.verify {
        let me = std::process::id();
        let cfg = EngineConfig {
            deadline: opts.deadline,
            tracker: opts.tracker.clone(),
            observers: opts.observers.clone(),
            watch: vec![me],
            managers: vec![me],
            manager_exes: Vec::new(),
        };
        // The journal follows its path by itself (moved, deleted, truncated): no reopen flag.
        let publish = Lines {
            journal: verdicts,
            echo: opts.echo_verdicts,
            reopen: None,
        };
        Some(
            Engine::start(cfg, Box::new(publish))
                .map_err(|e| RunError::Trail(TrailError::Verify(e)))?,
        )
    } else {
        None
    };
    let s = &ctx.spec;
    let vm = VmIdent::new(s.emulator.accel.virt(), s.name.clone(), s.uuid);
    Ok(Trail::new(vm, sink, on_record, verifier))
}

/// Phase 2: what a dead run of this VM left, removed; the recovery journaled, and the stop
/// record of a VM that died with its manager. libvirt, finding on restart that a domain's qemu
/// died while it was down, stops the domain with the shutoff reason `crashed` (its monitor
/// cannot be reconnected; qemuProcessReconnect) and audits nothing on that path; vmaudit writes
/// the `op=stop reason=crashed` record that reason names, so that the dead run's trail ends.
async fn recover_dead(ctx: &Ctx, trail: &Trail<'_>) -> Result<(), RunError> {
    let uuid = ctx.spec.uuid.hyphenated().to_string();
    let at = Where {
        name: &ctx.spec.name,
        uuid: &uuid,
        cgroup: &ctx.cgroup.0,
        pin: ctx.pin.as_deref(),
    };
    let Some(r) = recover::recover(&at).await? else {
        return Ok(());
    };
    log::warn!(
        "a dead run of VM {} left {} thing(s) behind: removed (the journal says what)",
        ctx.spec.name,
        r.did.len()
    );
    trail.event("recovered", r.fields())?;
    if let Some(pid) = r.emulator_pid() {
        let owner = r
            .dead
            .as_ref()
            .and_then(|s| s.owner)
            .map_or_else(|| "?".to_owned(), |o| o.pid.to_string());
        trail.emit(stop_record(&trail.vm, StopReason::Crashed, pid).extra(
            "vmaudit-why",
            &format!("vmaudit pid {owner} died with the VM running"),
        ))?;
    }
    Ok(())
}

/// Phase 3: everything the VM needs, made and audited in order; the emulator's pid once it is
/// up and its start records are written, and the control socket's requests.
async fn start(
    ctx: &Ctx,
    trail: &Trail<'_>,
    made: &mut Made,
) -> Result<(u32, mpsc::Receiver<Job>), RunError> {
    let spec = &ctx.spec;
    let state = State {
        owner: Some(ProcessId::me().map_err(RunError::Wait)?),
        uuid: spec.uuid.hyphenated().to_string(),
        journal: ctx.journal.clone(),
        ..State::default()
    };
    made.dir = Some(RefCell::new(RunDir::create(&ctx.lock, &spec.name, state)?));
    open_devices(spec, trail, made).await?;
    made.dir().borrow_mut().note(|s| {
        s.cgroup = Some(ctx.cgroup.0.clone());
        s.pin = ctx.pin.clone();
    })?;
    let cgroup = vmcgroup::setup(
        (&ctx.cgroup.0, ctx.cgroup.1),
        &ctx.host.rules,
        ctx.pin.as_deref(),
        trail,
    )?;
    made.cgroup = Some(cgroup);
    let control_path = made.dir().borrow().path().join("control.sock");
    let control = control::bind(&control_path).map_err(|source| RunError::Control {
        path: control_path.clone(),
        source,
    })?;
    let qmp = if spec.has_qmp() {
        Some(bind_qmp(&made.dir().borrow().path().join("qmp.sock"))?)
    } else {
        None
    };
    let pid = launch_emulator(ctx, trail, made, qmp.as_ref().map(|q| q.0.as_raw_fd())).await?;
    let qmp = match qmp {
        Some((_listener, client)) => Some(wait_until_up(trail, made, client, pid).await?),
        None => None,
    };
    record_start(spec, trail, made, pid)?;
    hand_over(spec, made, qmp, pid);
    let (tx, rx) = mpsc::channel(control::QUEUE);
    tokio::spawn(control::serve(control, ctx.host.control_owner, tx));
    Ok((pid, rx))
}

/// Opens every interface's devices, one record per fd, each device noted before it is made.
async fn open_devices(spec: &Spec, trail: &Trail<'_>, made: &mut Made) -> Result<(), RunError> {
    for (i, iface) in spec.interfaces.iter().enumerate() {
        let default_name = match iface.backend {
            Backend::Tap => "vmtap%d".to_owned(),
            Backend::Macvtap => format!("vmvt{}{i}", &spec.uuid.simple().to_string()[..8]),
        };
        let mac = iface.mac.to_string();
        let mut pending: Result<(), TrailError> = Ok(());
        let mut recorded = 0;
        let dir = made.dir();
        let hooks = Hooks {
            record: &mut |a: OpenAttempt<'_>| {
                recorded += 1;
                if pending.is_ok() {
                    // Handed over at launch by inheritance: the same number in the emulator.
                    pending = trail.record_open(&mac, &a, true).map(|_| ());
                }
            },
            note: &mut |m: &Making| note_made(dir, m),
        };
        let opened = devices::open_interface(iface, &default_name, hooks).await;
        match (opened, pending) {
            (Ok(dev), Ok(())) => made.devs.push(dev),
            (Err(source), _) => {
                if recorded == 0 {
                    // It failed before any device could be opened (a macvtap link that cannot
                    // be made: its name is taken, its parent refuses): audited as a failed open
                    // of no device.
                    trail.emit(
                        Record::net_open(&trail.vm, &mac, Path::new("?"), None)
                            .success(false)
                            .extra("vmaudit-why", &chain(&source)),
                    )?;
                }
                return Err(RunError::Device {
                    mac,
                    source: Box::new(source),
                });
            }
            (Ok(dev), Err(e)) => {
                dev.teardown().await;
                return Err(e.into());
            }
        }
    }
    Ok(())
}

/// The QMP socket, bound by vmaudit (mode 0600 in the 0700 run directory, so the emulator
/// cannot reach or replace it) and connected at once: the connection waits in the backlog
/// until qemu, handed the listening fd, accepts it. vmaudit never looks the path up again.
fn bind_qmp(
    path: &Path,
) -> Result<(std::os::unix::net::UnixListener, tokio::net::UnixStream), RunError> {
    let err = |source| RunError::Control {
        path: path.to_owned(),
        source,
    };
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(
        path,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .map_err(err)?;
    let client = std::os::unix::net::UnixStream::connect(path).map_err(err)?;
    client.set_nonblocking(true).map_err(err)?;
    let client = tokio::net::UnixStream::from_std(client).map_err(err)?;
    Ok((listener, client))
}

/// The emulator's command line, and its launch; an emulator that cannot be started is audited
/// (`op=stop reason=failed`).
async fn launch_emulator(
    ctx: &Ctx,
    trail: &Trail<'_>,
    made: &mut Made,
    qmp_fd: Option<RawFd>,
) -> Result<u32, RunError> {
    let spec = &ctx.spec;
    let mut args: Vec<String> = match (&spec.emulator.args, qmp_fd) {
        (Some(a), fd) => a
            .iter()
            .map(|x| match fd {
                Some(fd) => x.replace(QMP_FD, &fd.to_string()),
                None => x.clone(),
            })
            .collect(),
        (None, Some(fd)) => launch::default_args(spec, fd),
        (None, None) => unreachable!("the default command line has QMP"),
    };
    for (i, (dev, iface)) in made.devs.iter().zip(&spec.interfaces).enumerate() {
        args.extend(devices::qemu_args(dev, i, iface.queues));
    }
    let mut keep: Vec<RawFd> = made
        .devs
        .iter()
        .flat_map(|d| d.fds.iter().map(|f| f.fd.as_raw_fd()))
        .collect();
    keep.extend(qmp_fd);
    let cgroup = made.cgroup.as_ref().expect("set up before the launch");
    let spawned = launch::spawn(Launch {
        program: &ctx.host.program,
        args: &args,
        cgroup_procs: cgroup.cgroup.procs_fd(),
        keep: &keep,
        identity: &ctx.host.identity,
    });
    let child = match spawned {
        Ok(c) => c,
        Err(e) => {
            trail.emit(
                Record::control(&trail.vm, ControlOp::Stop(StopReason::Failed), 0).success(false),
            )?;
            return Err(e.into());
        }
    };
    let pid = child.id().unwrap_or(0);
    made.child = Some(child);
    let noted = ProcessId::of(pid).map_err(RunError::Wait)?;
    made.dir().borrow_mut().note(|s| s.emulator = Some(noted))?;
    Ok(pid)
}

/// Waits (bounded) for qemu's QMP greeting on the connection made before it started, or fails
/// if qemu exits first; either failure is audited (`op=stop reason=failed`).
async fn wait_until_up(
    trail: &Trail<'_>,
    made: &mut Made,
    client: tokio::net::UnixStream,
    pid: u32,
) -> Result<Qmp, RunError> {
    let child = made.child.as_mut().expect("launched");
    let up = tokio::select! {
        q = tokio::time::timeout(UP_TIMEOUT, Qmp::from_stream(client)) => match q {
            Ok(Ok(q)) => Ok(q),
            Ok(Err(e)) => Err(RunError::Qmp(e)),
            Err(_) => Err(RunError::Wait(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("QMP did not answer within {UP_TIMEOUT:?}"),
            ))),
        },
        status = child.wait() => Err(match status {
            Ok(status) => RunError::EarlyExit { status },
            Err(e) => RunError::Wait(e),
        }),
    };
    if up.is_err() {
        trail.emit(stop_record(&trail.vm, StopReason::Failed, pid).success(false))?;
    }
    up
}

/// `resrc=net reason=start` per interface (naming the emulator's fds, with the kcmp taken while
/// vmaudit still holds its copies), then VIRT_CONTROL `op=start`.
fn record_start(spec: &Spec, trail: &Trail<'_>, made: &Made, pid: u32) -> Result<(), RunError> {
    let me = std::process::id();
    for (dev, iface) in made.devs.iter().zip(&spec.interfaces) {
        let fds: Vec<String> = dev
            .fds
            .iter()
            .map(|f| f.fd.as_raw_fd().to_string())
            .collect();
        let b = Record::net(&trail.vm, NetChange::Start, &iface.mac.to_string())
            .extra("vmaudit-fds", &fds.join(","))
            .extra("vmaudit-emulator-fds", &fds.join(","));
        let handed = dev
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
            handed,
        };
        trail.emit_claim(b, claim)?;
    }
    trail.emit_claim(
        Record::control(&trail.vm, ControlOp::Start(StartReason::Booted), pid as i64),
        ClaimKind::VmStart { pid },
    )?;
    Ok(())
}

/// The emulator holds the fds now: vmaudit's copies go, the interfaces become the live VM's.
fn hand_over(spec: &Spec, made: &mut Made, qmp: Option<Qmp>, pid: u32) {
    let mut nics = Vec::new();
    for (i, (mut d, iface)) in made.devs.drain(..).zip(&spec.interfaces).enumerate() {
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
    made.live = Some(Live::new(qmp, nics, pid));
}

/// Phase 3, cut short by a signal: the emulator (if any) is stopped, and what was claimed is
/// closed with its stop record.
async fn abort_start(trail: &Trail<'_>, made: &mut Made) -> Result<Ending, RunError> {
    log::warn!("stopped while starting");
    if let Some(child) = made.child.as_mut() {
        let pid = child.id().unwrap_or(0);
        trail.tell(Msg::Stopping(pid))?;
        stop_emulator(child, STOP_GRACE).await;
        trail.emit(stop_record(&trail.vm, StopReason::Failed, pid).success(false))?;
    }
    Ok(Ending::Destroyed)
}

/// A hot-plug request being carried out beside the loop: it owns the live VM until it is done.
type Op<'a> =
    Pin<Box<dyn std::future::Future<Output = (Live, Response, oneshot::Sender<Response>)> + 'a>>;

/// Phase 4: the loop. It waits on nothing but itself: requests come from their connections'
/// tasks, a hot-plug runs as [`Op`] beside the other branches, every wait inside is bounded.
async fn serve(
    trail: &Trail<'_>,
    made: &mut Made,
    pid: u32,
    mut jobs: mpsc::Receiver<Job>,
    strict: bool,
    mut shutdown: Pin<&mut impl std::future::Future<Output = ()>>,
) -> Result<Ending, RunError> {
    let mut violations = trail.violations();
    let dir = made.dir.as_ref().expect("made in `start`");
    let child = made.child.as_mut().expect("launched in `start`");
    let mut live = made.live.take();
    let mut op: Option<Op<'_>> = None;
    let ending = loop {
        tokio::select! {
            () = &mut shutdown => break Ok(Ending::Destroyed),
            status = child.wait() => break match status {
                Ok(s) if s.success() => Ok(Ending::Shutdown),
                Ok(_) => Ok(Ending::Crashed),
                Err(e) => Err(RunError::Wait(e)),
            },
            changed = async { violations.as_mut()?.changed().await.ok() }, if violations.is_some() => {
                match changed {
                    Some(()) if strict => {
                        log::error!("--strict: stopping the VM at the first violation");
                        break Ok(Ending::Violation);
                    }
                    Some(()) => {}
                    None => {
                        log::error!("the verifier stopped: stopping the VM (its claims can no longer be judged)");
                        break Ok(Ending::Destroyed);
                    }
                }
            }
            job = jobs.recv(), if op.is_none() && live.is_some() => {
                if let Some(Job { request, answer }) = job {
                    let mut l = live.take().expect("checked by the branch's condition");
                    op = Some(Box::pin(async move {
                        let r = l.handle(trail, dir, request).await;
                        (l, r, answer)
                    }));
                }
            }
            done = async { op.as_mut().expect("checked").await }, if op.is_some() => {
                op = None;
                let (l, response, answer) = done;
                live = Some(l);
                if answer.send(response).is_err() {
                    log::debug!("a control client left before its answer");
                }
            }
        }
    };
    // A hot-plug still in flight is dropped: its devices go with it.
    drop(op);
    jobs.close();
    made.live = live;
    stop(trail, made, pid, ending?).await
}

/// Phase 5: the emulator stopped (unless it ended by itself), and `op=stop` with the reason.
async fn stop(
    trail: &Trail<'_>,
    made: &mut Made,
    pid: u32,
    ending: Ending,
) -> Result<Ending, RunError> {
    let mut told = Ok(());
    if matches!(ending, Ending::Destroyed | Ending::Violation) {
        told = trail.tell(Msg::Stopping(pid));
        if let Some(child) = made.child.as_mut() {
            stop_emulator(child, STOP_GRACE).await;
        }
    }
    let reason = ending.stop_reason();
    trail.emit_claim(
        stop_record(&trail.vm, reason, pid),
        ClaimKind::VmStop {
            pid: Some(pid),
            reason: ControlOp::Stop(reason).reason().to_owned(),
        },
    )?;
    told?;
    Ok(ending)
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

/// `op=stop`: libvirt writes `vm-pid=0` there (the domain has no pid any more); the
/// emulator's pid follows in vmaudit's own field.
fn stop_record(vm: &VmIdent, reason: StopReason, pid: u32) -> RecordBuilder {
    Record::control(vm, ControlOp::Stop(reason), 0).extra("vmaudit-vm-pid", &pid.to_string())
}

/// SIGTERM, then SIGKILL after `grace`; waits for the end (bounded).
async fn stop_emulator(child: &mut tokio::process::Child, grace: Duration) {
    if let Some(pid) = child.id() {
        // SAFETY: kill on our own child's pid, not yet reaped.
        if unsafe { libc::kill(pid as i32, libc::SIGTERM) } < 0 {
            log::warn!(
                "SIGTERM to the emulator (pid {pid}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    if tokio::time::timeout(grace, child.wait()).await.is_ok() {
        return;
    }
    if let Err(e) = child.start_kill() {
        log::warn!("SIGKILL to the emulator: {e}");
    }
    if tokio::time::timeout(Duration::from_secs(1), child.wait())
        .await
        .is_err()
    {
        log::error!("the emulator did not end within 1 s of SIGKILL");
    }
}
