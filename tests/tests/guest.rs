//! The test guest answers hot-unplug: Debian's cloud kernel, booted under plain qemu (no
//! vmaudit), acknowledges `device_del`, so a tap NIC goes through the whole life a real VM
//! gives it: `getfd` (the tap fd passed over QMP with SCM_RIGHTS), `netdev_add`, `device_add`,
//! `device_del` → `DEVICE_DELETED`, `netdev_del`; and qemu's tap fd is gone. Without a guest OS
//! the `DEVICE_DELETED` never comes (see HOST-FACTS).

use std::{
    fs::File,
    io::{BufRead as _, BufReader, IoSlice, Write as _},
    os::{fd::AsRawFd as _, unix::net::UnixStream},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
use serde_json::{Value, json};
use vmaudit_tests::{
    ChildGuard, PATIENCE, TempDir,
    guest::{GuestImage, READY_LINE, wait_ready},
    proc_fds, require_root,
};

/// Hot-plug cycles run on one boot: the first shows it works, the others that it keeps
/// working (the same ids and slot are reused once the guest has let go of them).
const CYCLES: usize = 3;

#[test]
fn guest_acknowledges_hot_unplug_and_qemu_closes_the_tap() {
    require_root();
    let image = GuestImage::find();
    let tmp = TempDir::new("guest");
    let serial = tmp.0.join("serial.log");
    let qmp_path = tmp.0.join("qmp.sock");
    let args = image.qemu_args(&serial, &qmp_path);
    eprintln!("qemu-system-x86_64 {}", args.join(" "));

    let boot = Instant::now();
    let qemu = ChildGuard(
        Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn qemu-system-x86_64"),
    );
    let qemu_pid = qemu.0.id();
    wait_ready(&serial);
    let boot_time = boot.elapsed();
    eprintln!("boot: guest ready {boot_time:?} after qemu started");

    // qemu made the socket before it started the guest, so it is there by now.
    let mut qmp = Qmp::connect(&qmp_path);
    for cycle in 0..CYCLES {
        let name = format!("vmg{}-{cycle}", std::process::id() % 100_000);
        let t = Instant::now();
        let tun = open_tap(&name);
        let opened = t.elapsed();
        // The command and the fd in one message: qemu takes the fd that comes with `getfd`.
        qmp.execute_with_fd(
            json!({"execute": "getfd", "arguments": {"fdname": "tap-n1"}}),
            &tun,
        );
        qmp.execute(json!({"execute": "netdev_add",
            "arguments": {"type": "tap", "id": "n1", "fd": "tap-n1"}}));
        let held = qemu_fds_on(qemu_pid, &tun);
        assert_eq!(
            held.len(),
            1,
            "qemu should hold exactly one fd on the tap {name}'s open file: {held:?}"
        );
        let link = std::fs::read_link(format!("/proc/{qemu_pid}/fd/{}", held[0])).unwrap();
        assert_eq!(link, Path::new("/dev/net/tun"));
        let fdinfo =
            std::fs::read_to_string(format!("/proc/{qemu_pid}/fdinfo/{}", held[0])).unwrap();
        assert!(
            fdinfo.lines().any(|l| l == format!("iff:\t{name}")),
            "{fdinfo}"
        );
        qmp.execute(json!({"execute": "device_add", "arguments": {
            "driver": "virtio-net-pci", "netdev": "n1", "id": "nic1",
            "mac": format!("52:54:00:76:6d:{cycle:02x}")}}));
        let plugged = t.elapsed();

        let unplug = Instant::now();
        qmp.execute(json!({"execute": "device_del", "arguments": {"id": "nic1"}}));
        let event = qmp.wait_event("DEVICE_DELETED", |e| e["data"]["device"] == "nic1");
        let acknowledged = unplug.elapsed();
        assert_eq!(event["data"]["path"], "/machine/peripheral/nic1", "{event}");
        // The NIC is gone, so nothing holds the netdev: deleting it closes qemu's tap fd.
        qmp.execute(json!({"execute": "netdev_del", "arguments": {"id": "n1"}}));
        let left = qemu_fds_on(qemu_pid, &tun);
        assert!(
            left.is_empty(),
            "qemu still holds the tap {name} after netdev_del: fds {left:?}"
        );
        drop(tun);
        eprintln!(
            "cycle {cycle}: {:?} in all (tap opened {opened:?}; getfd + netdev_add + \
             device_add {:?}; device_del -> DEVICE_DELETED {acknowledged:?}; netdev_del and \
             the /proc check {:?})",
            t.elapsed(),
            plugged - opened,
            unplug.elapsed() - acknowledged,
        );
    }
    let mut qemu = qemu;
    assert!(
        qemu.0.try_wait().expect("try_wait qemu").is_none(),
        "qemu ended during the test"
    );
    eprintln!(
        "the guest's console after it was ready:\n{}",
        after_ready(&serial)
    );
}

/// Opens /dev/net/tun and attaches it to a new tap `name` (gone with the last fd on it).
///
/// Attaching is an ioctl (TUNSETIFF), the one unsafe step; the project's fdhelper already
/// makes it (`tunsetiff`, its safety argued there), so it is lent a duplicate of the fd: a
/// duplicate shares the open file description, which is what TUNSETIFF attaches, and `dup`
/// does not copy FD_CLOEXEC, so the helper inherits it under the same number.
fn open_tap(name: &str) -> File {
    let tun = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    let lent = nix::unistd::dup(&tun).expect("dup the tun fd");
    let lent_fd = lent.as_raw_fd();
    let mut helper = Command::new(env!("CARGO_BIN_EXE_fdhelper"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn fdhelper");
    drop(lent);
    let mut stdin = helper.stdin.take().expect("stdin");
    writeln!(stdin, "tunsetiff {lent_fd} {name}\nexit").expect("write to fdhelper");
    drop(stdin);
    let out = helper.wait_with_output().expect("wait fdhelper");
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(reply.starts_with("ok"), "fdhelper tunsetiff: {reply:?}");
    tun
}

/// qemu's fds on the same open file as `ours` (kcmp: the very file the test passed).
fn qemu_fds_on(qemu_pid: u32, ours: &File) -> Vec<i32> {
    let me = std::process::id();
    proc_fds(qemu_pid)
        .into_iter()
        .filter(|&fd| vmaudit::kcmp::same_file(qemu_pid, fd, me, ours.as_raw_fd()).unwrap_or(false))
        .collect()
}

/// What the guest's console said after its ready line (the kernel's hot-plug messages).
fn after_ready(serial: &Path) -> String {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    text.split_once(READY_LINE)
        .map_or("", |(_, rest)| rest.trim())
        .to_owned()
}

/// A QMP client over a plain `UnixStream`: one JSON object per line each way; events that
/// arrive while a command waits for its reply are kept for [`Qmp::wait_event`].
struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to QMP at {}: {e}", path.display()));
        // A bound on a hang: a read that gets nothing for this long fails the test.
        stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone QMP stream"));
        let mut qmp = Self {
            stream,
            reader,
            events: Vec::new(),
        };
        let greeting = qmp.read();
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        qmp.execute(json!({"execute": "qmp_capabilities"}));
        qmp
    }

    /// Sends `command` and returns its `return`; panics on an `error` reply.
    fn execute(&mut self, command: Value) -> Value {
        let mut line = command.to_string();
        line.push('\n');
        self.stream.write_all(line.as_bytes()).expect("write QMP");
        self.reply(&command)
    }

    /// [`Qmp::execute`], with `fd` passed in the same message (SCM_RIGHTS), as `getfd` wants.
    fn execute_with_fd(&mut self, command: Value, fd: &File) -> Value {
        let mut line = command.to_string();
        line.push('\n');
        let fds = [fd.as_raw_fd()];
        let sent = sendmsg::<UnixAddr>(
            self.stream.as_raw_fd(),
            &[IoSlice::new(line.as_bytes())],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg to QMP");
        assert_eq!(sent, line.len(), "a short sendmsg to QMP");
        self.reply(&command)
    }

    fn reply(&mut self, command: &Value) -> Value {
        loop {
            let msg = self.read();
            if msg.get("event").is_some() {
                self.events.push(msg);
                continue;
            }
            match msg.get("return") {
                Some(r) => return r.clone(),
                None => panic!("QMP {command} failed: {msg}"),
            }
        }
    }

    /// Waits for the event `name` whose message satisfies `pred` (one already received, or
    /// the next ones), for at most [`PATIENCE`].
    fn wait_event(&mut self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let matches = |e: &Value| e["event"] == name && pred(e);
        if let Some(i) = self.events.iter().position(matches) {
            return self.events.remove(i);
        }
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            let msg = self.read();
            if matches(&msg) {
                return msg;
            }
            self.events.push(msg);
        }
        panic!("no {name} within {PATIENCE:?}; events: {:#?}", self.events);
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("read QMP (waited up to {PATIENCE:?}): {e}"));
        assert!(n > 0, "qemu closed QMP");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }
}
