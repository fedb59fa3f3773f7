//! A stand-in emulator for `vmaudit run` that misbehaves on purpose.
//!
//! vmaudit launches it as it would launch qemu (`[emulator] path = ".../fake-emulator"` and
//! `args = ["--mode", "...", ...]` in the spec), appending one `-netdev`/`-device` pair per
//! interface. It collects the fds named on the `-netdev` values, does what its mode says with
//! them (keep them, close them, leak them into a child, send them to a stranger, ...), says
//! `fake-emulator: ready pid=PID fds=N,M,...` on stderr (and atomically in `--ready-file`),
//! then waits for SIGTERM or SIGINT and exits 0. The tests of the fd verifier check that it
//! sees exactly what each mode did.

use std::{
    ffi::OsString,
    io::{IoSlice, Write as _},
    os::{
        fd::{AsRawFd as _, IntoRawFd as _, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
};

use nix::sys::{
    signal::{SigHandler, SigSet, Signal},
    socket::{ControlMessage, MsgFlags, sendmsg},
};

mod probe;
mod qmp;

const USAGE: &str = "\
usage: fake-emulator [--mode MODE] [--to PATH] [--ready-file PATH] [--device PATH]
                     [--suid PATH] [--qmp-fd N [--greeting-delay-ms MS]
                     [--device-add-delay-ms MS] [--no-unplug-ack]] [--] [QEMU ARGS...]

A stand-in for qemu. Its own options come first (each `--NAME VALUE`); everything after is
ignored except the values of `-netdev`, whose fd=N, fds=A:B:..., vhostfd=N and vhostfds=...
name the fds it was passed, in that order.

When the mode's work is done it writes one line on stderr, and atomically (PATH.tmp, then
rename) to the --ready-file PATH if given:
  fake-emulator: ready pid=PID fds=N,M,... [missing=...] [MODE KEYS...]
fds= lists the passed fds it still holds; missing= (only if any) the passed fds that were not
open when it started. Then it waits for SIGTERM or SIGINT and exits 0.

Modes:
  hold              keep every passed fd, like a well-behaved qemu (the default)
  close-passed      close every passed fd before saying ready
  close-later       keep them; on SIGUSR1 close them all and say
                    `fake-emulator: closed fds=N,M,...` (stderr and the ready file)
  leak-child        fork a child holding a dup of the first passed fd (and none of the passed
                    numbers) until it is killed; keys: child=PID child-fd=FD. On SIGTERM or
                    SIGINT the child is killed and reaped. The child dies with the parent.
  send-stranger     connect to the unix stream socket --to PATH and send it the first passed
                    fd (SCM_RIGHTS, one byte of data), keeping its own copy; key: sent=FD
  open-tun          open /dev/net/tun (or --device PATH) itself and keep it; key: extra=FD
  dup-passed        dup2 the first passed fd to fd 100 and keep both; key: dup=100
  ignore-term       keep the fds and ignore SIGTERM and SIGINT: only SIGKILL ends it
  exit-now N        say ready, then exit at once with status N (0-255)
  linger-term       keep the fds; on SIGTERM say `fake-emulator: term` and keep running: only
                    SIGKILL ends it (vmaudit is then in its stop phase)
  probe             try what an emulator must not be able to do and say what happened: open
                    --device PATH (default /dev/tty), write its pid to the cgroup root's and
                    its parent cgroup's cgroup.procs, make a cgroup below its own, setuid(0),
                    raise an ambient capability, run --suid PATH (a set-uid copy of this
                    program); keys: probe-open= probe-escape-root= probe-escape-parent=
                    probe-mkdir-cgroup= probe-setuid= probe-ambient= [probe-suid=euid=N,capeff=X]
                    (ok, or the errno), and open=FD,... (every fd it holds)
  whoami            print `euid=N,capeff=HEX` on stdout and exit (for probe's --suid)

With --qmp-fd N (vmaudit's listening QMP socket, `{qmp-fd}` in a spec) it serves enough of QMP
for hot-plug: getfd/closefd, netdev_add/netdev_del of a tap, device_add, and device_del
acknowledged with DEVICE_DELETED as a guest would (unless --no-unplug-ack); the greeting and
device_add can be made late (--greeting-delay-ms, --device-add-delay-ms).

Exit status: 0 after SIGTERM/SIGINT, N in exit-now, 2 for a bad command line, 1 when the
mode's work fails; every error is one line on stderr.
";

/// The fd `dup-passed` copies the first passed fd to.
const DUP_TARGET: RawFd = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Hold,
    ClosePassed,
    CloseLater,
    LeakChild,
    SendStranger,
    OpenTun,
    DupPassed,
    /// Open and close /dev/null this many times before saying ready (to overflow a small ring).
    Flood(u64),
    IgnoreTerm,
    ExitNow(u8),
    LingerTerm,
    Probe,
    Whoami,
}

#[derive(Debug)]
struct Options {
    mode: Mode,
    to: Option<PathBuf>,
    ready_file: Option<PathBuf>,
    /// The device `open-tun` and `probe` open.
    device: Option<String>,
    /// `probe`: a set-uid copy of this program to run.
    suid: Option<String>,
    /// vmaudit's QMP socket, and how its monitor behaves.
    qmp_fd: Option<RawFd>,
    qmp: qmp::Behaviour,
    /// The fds named on the `-netdev` values, in order, without repeats.
    passed: Vec<RawFd>,
}

/// Writes `fake-emulator: MSG` on stderr and exits with `code`.
fn fail(code: i32, msg: &str) -> ! {
    say(&format!("fake-emulator: {msg}"));
    std::process::exit(code);
}

/// One line on stderr in a single write, so that it is not interleaved with vmaudit's.
fn say(line: &str) {
    let mut out = std::io::stderr().lock();
    let _ = out.write_all(format!("{line}\n").as_bytes());
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut opts = Options {
        mode: Mode::Hold,
        to: None,
        ready_file: None,
        device: None,
        suid: None,
        qmp_fd: None,
        qmp: qmp::Behaviour::default(),
        passed: Vec::new(),
    };
    let ms = |v: &str, name: &str| -> Result<std::time::Duration, String> {
        v.parse()
            .map(std::time::Duration::from_millis)
            .map_err(|_| format!("{name}: bad milliseconds {v:?}"))
    };
    let mut i = 0;
    let value = |i: usize, name: &str| -> Result<&String, String> {
        args.get(i + 1)
            .ok_or_else(|| format!("{name} needs a value"))
    };
    // Own options: every leading `--NAME`; the first other argument (or `--`) ends them.
    while let Some(arg) = args.get(i).filter(|a| a.starts_with("--")) {
        match arg.as_str() {
            "--" => {
                i += 1;
                break;
            }
            "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "--mode" => {
                let m = value(i, "--mode")?;
                opts.mode = match m.as_str() {
                    "hold" => Mode::Hold,
                    "close-passed" => Mode::ClosePassed,
                    "close-later" => Mode::CloseLater,
                    "leak-child" => Mode::LeakChild,
                    "send-stranger" => Mode::SendStranger,
                    "open-tun" => Mode::OpenTun,
                    "dup-passed" => Mode::DupPassed,
                    "ignore-term" => Mode::IgnoreTerm,
                    "linger-term" => Mode::LingerTerm,
                    "probe" => Mode::Probe,
                    "whoami" => Mode::Whoami,
                    "flood" => {
                        let n = args.get(i + 2).ok_or("--mode flood needs a count")?;
                        i += 1;
                        Mode::Flood(n.parse().map_err(|_| format!("flood: bad count {n:?}"))?)
                    }
                    "exit-now" => {
                        let n = args.get(i + 2).ok_or("--mode exit-now needs a status")?;
                        i += 1;
                        Mode::ExitNow(
                            n.parse()
                                .map_err(|_| format!("exit-now: bad status {n:?} (0-255)"))?,
                        )
                    }
                    other => return Err(format!("unknown mode {other:?} (see --help)")),
                };
                i += 2;
            }
            "--to" => {
                opts.to = Some(value(i, "--to")?.into());
                i += 2;
            }
            "--ready-file" => {
                opts.ready_file = Some(value(i, "--ready-file")?.into());
                i += 2;
            }
            "--device" => {
                opts.device = Some(value(i, "--device")?.clone());
                i += 2;
            }
            "--suid" => {
                opts.suid = Some(value(i, "--suid")?.clone());
                i += 2;
            }
            "--qmp-fd" => {
                let v = value(i, "--qmp-fd")?;
                opts.qmp_fd = Some(v.parse().map_err(|_| format!("--qmp-fd: bad fd {v:?}"))?);
                i += 2;
            }
            "--greeting-delay-ms" => {
                opts.qmp.greeting_delay =
                    ms(value(i, "--greeting-delay-ms")?, "--greeting-delay-ms")?;
                i += 2;
            }
            "--device-add-delay-ms" => {
                opts.qmp.device_add_delay =
                    ms(value(i, "--device-add-delay-ms")?, "--device-add-delay-ms")?;
                i += 2;
            }
            "--no-unplug-ack" => {
                opts.qmp.no_unplug_ack = true;
                i += 1;
            }
            other => return Err(format!("unknown option {other:?} (see --help)")),
        }
    }
    // The rest is qemu's command line: only -netdev values matter.
    while let Some(arg) = args.get(i) {
        if arg == "-netdev" || arg == "--netdev" {
            let v = args.get(i + 1).ok_or("-netdev needs a value")?;
            for fd in netdev_fds(v)? {
                if !opts.passed.contains(&fd) {
                    opts.passed.push(fd);
                }
            }
            i += 1;
        }
        i += 1;
    }
    Ok(opts)
}

/// The fds a `-netdev` value names, in order: `fd=N`, `fds=A:B`, `vhostfd=N`, `vhostfds=A:B`.
fn netdev_fds(value: &str) -> Result<Vec<RawFd>, String> {
    let mut fds = Vec::new();
    for part in value.split(',') {
        let Some((key, list)) = part.split_once('=') else {
            continue;
        };
        if !matches!(key, "fd" | "fds" | "vhostfd" | "vhostfds") {
            continue;
        }
        for n in list.split(':') {
            let fd: RawFd = n
                .parse()
                .ok()
                .filter(|fd| *fd >= 0)
                .ok_or_else(|| format!("-netdev {value:?}: bad fd {n:?} in {key}="))?;
            fds.push(fd);
        }
    }
    Ok(fds)
}

fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the fd's flags; any number is allowed.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

fn close_raw(fd: RawFd) {
    // SAFETY: the fd was inherited (or made here) as a bare number; nothing in this process
    // owns it, so closing it cannot invalidate an OwnedFd or File.
    unsafe { libc::close(fd) };
}

fn join(fds: &[RawFd]) -> String {
    fds.iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Says `line` on stderr and, atomically, in the ready file.
fn announce(line: &str, ready_file: Option<&Path>) {
    say(line);
    if let Some(path) = ready_file {
        let mut tmp = OsString::from(path.as_os_str());
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        if let Err(e) =
            std::fs::write(&tmp, format!("{line}\n")).and_then(|()| std::fs::rename(&tmp, path))
        {
            fail(1, &format!("writing {}: {e}", path.display()));
        }
    }
}

fn first(passed: &[RawFd]) -> RawFd {
    match passed.first() {
        Some(fd) => *fd,
        None => fail(1, "this mode needs a passed fd, and -netdev named none"),
    }
}

/// Forks the `leak-child` child: it keeps the dup of the first passed fd made before the call
/// and closes every passed fd, then waits until it is killed (or its parent dies). Returns its pid once
/// it has closed them.
fn leak_child(passed: &[RawFd], waited: &SigSet) -> libc::pid_t {
    let mut pipe = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array, which lives for the call.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        fail(1, &format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: this program is single-threaded, so the child may run any code; it still only
    // makes plain syscalls below.
    match unsafe { libc::fork() } {
        -1 => fail(1, &format!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            // SAFETY: plain syscalls on numbers and a one-byte buffer owned by this frame.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(0);
                }
                libc::close(pipe[0]);
            }
            for &fd in passed {
                close_raw(fd);
            }
            let _ = waited.thread_unblock();
            // SAFETY: see above.
            unsafe {
                libc::write(pipe[1], b"x".as_ptr().cast(), 1);
                libc::close(pipe[1]);
            }
            loop {
                nix::unistd::pause();
            }
        }
        pid => {
            close_raw(pipe[1]);
            let mut b = [0u8; 1];
            // SAFETY: reads at most one byte into a buffer owned by this frame.
            let n = unsafe { libc::read(pipe[0], b.as_mut_ptr().cast(), 1) };
            close_raw(pipe[0]);
            if n != 1 {
                fail(1, "the leak-child child died before it was ready");
            }
            pid
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = parse(&args).unwrap_or_else(|e| fail(2, &e));
    if opts.mode == Mode::Whoami {
        println!("{}", probe::whoami());
        return;
    }
    if opts.mode == Mode::SendStranger && opts.to.is_none() {
        fail(2, "--mode send-stranger needs --to PATH");
    }

    // Signals first, so that a SIGTERM right after the ready line is never lost.
    let mut waited = SigSet::empty();
    waited.add(Signal::SIGTERM);
    waited.add(Signal::SIGINT);
    if opts.mode == Mode::CloseLater {
        waited.add(Signal::SIGUSR1);
    }
    if let Some(fd) = opts.qmp_fd {
        // Before the signal mask below: the monitor's thread inherits it.
        qmp::spawn(fd, opts.qmp);
    }
    let handler = if opts.mode == Mode::IgnoreTerm {
        SigHandler::SigIgn
    } else {
        SigHandler::SigDfl
    };
    for sig in waited.iter() {
        // SAFETY: installs SIG_IGN or SIG_DFL, no handler function. SIG_DFL undoes an ignored
        // disposition inherited through exec, which would discard the signal before sigwait.
        if let Err(e) = unsafe { nix::sys::signal::signal(sig, handler) } {
            fail(1, &format!("signal {sig}: {e}"));
        }
    }
    if opts.mode != Mode::IgnoreTerm
        && let Err(e) = waited.thread_block()
    {
        fail(1, &format!("blocking signals: {e}"));
    }

    let passed = opts.passed.clone();
    let missing: Vec<RawFd> = passed.iter().copied().filter(|f| !is_open(*f)).collect();
    let mut keys: Vec<String> = Vec::new();
    let mut child: Option<libc::pid_t> = None;
    match opts.mode {
        Mode::Hold | Mode::CloseLater | Mode::IgnoreTerm | Mode::ExitNow(_) | Mode::LingerTerm => {}
        Mode::Whoami => unreachable!("answered first"),
        Mode::Probe => {
            keys.extend(probe::run(
                opts.device.as_deref().unwrap_or("/dev/tty"),
                opts.suid.as_deref(),
            ));
            let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
                .map(|d| {
                    d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            let mut open: Vec<RawFd> = open.into_iter().filter(|f| is_open(*f)).collect();
            open.sort_unstable();
            keys.push(format!("open={}", join(&open)));
        }
        Mode::Flood(n) => {
            for _ in 0..n {
                drop(std::fs::File::open("/dev/null"));
            }
            keys.push(format!("flood={n}"));
        }
        Mode::ClosePassed => passed.iter().for_each(|f| close_raw(*f)),
        Mode::LeakChild => {
            let fd = first(&passed);
            // SAFETY: F_DUPFD on a number; the new fd is owned by nobody but this code.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            if dup < 0 {
                fail(1, &format!("dup {fd}: {}", std::io::Error::last_os_error()));
            }
            let pid = leak_child(&passed, &waited);
            // The parent keeps the passed fds, not the dup: only the child holds that.
            close_raw(dup);
            child = Some(pid);
            keys.push(format!("child={pid}"));
            keys.push(format!("child-fd={dup}"));
        }
        Mode::SendStranger => {
            let fd = first(&passed);
            let to = opts.to.as_deref().unwrap_or(Path::new(""));
            let sock = UnixStream::connect(to)
                .unwrap_or_else(|e| fail(1, &format!("connecting to {}: {e}", to.display())));
            let fds = [fd];
            if let Err(e) = sendmsg::<()>(
                sock.as_raw_fd(),
                &[IoSlice::new(b"x")],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            ) {
                fail(1, &format!("sendmsg to {}: {e}", to.display()));
            }
            // The fd stays queued on the socket for the receiver after this end is closed.
            drop(sock);
            keys.push(format!("sent={fd}"));
        }
        Mode::OpenTun => {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(opts.device.as_deref().unwrap_or("/dev/net/tun"))
                .unwrap_or_else(|e| fail(1, &format!("opening the device: {e}")));
            // Kept until exit.
            keys.push(format!("extra={}", f.into_raw_fd()));
        }
        Mode::DupPassed => {
            let fd = first(&passed);
            if is_open(DUP_TARGET) {
                fail(1, &format!("fd {DUP_TARGET} is already open"));
            }
            // SAFETY: dup2 onto a number checked to be free; nothing owns either fd.
            if unsafe { libc::dup2(fd, DUP_TARGET) } < 0 {
                fail(
                    1,
                    &format!(
                        "dup2 {fd} {DUP_TARGET}: {}",
                        std::io::Error::last_os_error()
                    ),
                );
            }
            keys.push(format!("dup={DUP_TARGET}"));
        }
    }

    let held: Vec<RawFd> = passed.iter().copied().filter(|f| is_open(*f)).collect();
    let mut line = format!(
        "fake-emulator: ready pid={} fds={}",
        std::process::id(),
        join(&held)
    );
    if !missing.is_empty() {
        line.push_str(&format!(" missing={}", join(&missing)));
    }
    for k in &keys {
        line.push(' ');
        line.push_str(k);
    }
    let ready_file = opts.ready_file.as_deref();
    announce(&line, ready_file);

    match opts.mode {
        Mode::ExitNow(n) => std::process::exit(n.into()),
        Mode::IgnoreTerm => loop {
            // No handler is installed, so pause never returns: only SIGKILL (or another
            // signal's default action) ends the process.
            nix::unistd::pause();
        },
        _ => {}
    }
    let mut closed = false;
    loop {
        let sig = waited
            .wait()
            .unwrap_or_else(|e| fail(1, &format!("sigwait: {e}")));
        match sig {
            Signal::SIGTERM if opts.mode == Mode::LingerTerm => {
                announce("fake-emulator: term", ready_file);
            }
            Signal::SIGUSR1 => {
                if !closed {
                    closed = true;
                    let now: Vec<RawFd> = held.iter().copied().filter(|f| is_open(*f)).collect();
                    now.iter().for_each(|f| close_raw(*f));
                    announce(
                        &format!("fake-emulator: closed fds={}", join(&now)),
                        ready_file,
                    );
                }
            }
            _ => {
                if let Some(pid) = child {
                    // SAFETY: kill and waitpid on our own child's pid; status is a local.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                        let mut status = 0;
                        libc::waitpid(pid, &mut status, 0);
                    }
                }
                std::process::exit(0);
            }
        }
    }
}
