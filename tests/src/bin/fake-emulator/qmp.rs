//! The stand-in's QMP: just enough of qemu's monitor for vmaudit's hot-plug (greeting,
//! `qmp_capabilities`, `getfd` with the fd in SCM_RIGHTS, `closefd`, `netdev_add` of a tap,
//! `netdev_del`, `device_add`, `device_del` answered by `DEVICE_DELETED` as a guest would), on
//! the listening socket vmaudit hands over. It can misbehave on purpose: a late greeting, a
//! slow `device_add`, an unplug no guest acknowledges. Labelled as a stand-in: real qemu with a
//! real guest does the same (tests/tests/hotplug.rs), at a second per unplug, too slow for a
//! soak of thousands of cycles.

use std::{
    collections::HashMap,
    io::{IoSliceMut, Write as _},
    os::{
        fd::{FromRawFd as _, OwnedFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    time::Duration,
};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use serde_json::{Value, json};

/// How the monitor misbehaves.
#[derive(Clone, Copy, Debug, Default)]
pub struct Behaviour {
    /// The greeting comes this late (vmaudit is then waiting for the emulator to be up).
    pub greeting_delay: Duration,
    /// `device_add` answers this late (a hot-plug is then in flight).
    pub device_add_delay: Duration,
    /// `device_del` is never acknowledged (no guest answers the unplug).
    pub no_unplug_ack: bool,
}

/// What the monitor holds.
#[derive(Default)]
struct State {
    /// getfd's fds by name.
    fds: HashMap<String, OwnedFd>,
    /// netdevs and the fds they took.
    netdevs: HashMap<String, Vec<OwnedFd>>,
    /// devices and their netdev.
    devices: HashMap<String, String>,
    /// fds received and not yet named by a getfd.
    received: Vec<OwnedFd>,
}

/// Serves QMP on the listening socket `fd`, one client after another, on a thread of its own.
pub fn spawn(fd: RawFd, b: Behaviour) {
    // SAFETY: the fd was handed to this process as its QMP socket and nothing else owns it.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    std::thread::spawn(move || {
        let mut state = State::default();
        for conn in listener.incoming() {
            match conn {
                Ok(c) => {
                    if let Err(e) = serve(c, &mut state, b) {
                        eprintln!("fake-emulator: QMP: {e}");
                    }
                }
                Err(e) => {
                    eprintln!("fake-emulator: QMP accept: {e}");
                    return;
                }
            }
        }
    });
}

fn send(conn: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    conn.write_all(format!("{v}\n").as_bytes())
}

fn serve(mut conn: UnixStream, state: &mut State, b: Behaviour) -> std::io::Result<()> {
    std::thread::sleep(b.greeting_delay);
    send(
        &mut conn,
        &json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake-emulator"}, "capabilities": []}}),
    )?;
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let mut buf = [0u8; 4096];
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let n = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                std::os::fd::AsRawFd::as_raw_fd(&conn),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    // SAFETY: fds just received with SCM_RIGHTS belong to nobody else.
                    state
                        .received
                        .extend(fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                }
            }
            msg.bytes
        };
        if n == 0 {
            return Ok(());
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|c| *c == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let Ok(cmd) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            let (answer, event) = execute(state, &cmd, b);
            let mut answer = answer;
            if let Some(id) = cmd.get("id") {
                answer["id"] = id.clone();
            }
            send(&mut conn, &answer)?;
            if let Some(e) = event {
                send(&mut conn, &e)?;
            }
        }
    }
}

fn error(desc: String) -> Value {
    json!({"error": {"class": "GenericError", "desc": desc}})
}

fn ok() -> Value {
    json!({"return": {}})
}

/// One command: its answer, and an event to send after it.
fn execute(state: &mut State, cmd: &Value, b: Behaviour) -> (Value, Option<Value>) {
    let args = &cmd["arguments"];
    let s = |k: &str| args[k].as_str().unwrap_or_default().to_owned();
    match cmd["execute"].as_str().unwrap_or_default() {
        "qmp_capabilities" => (ok(), None),
        "getfd" => match (!state.received.is_empty()).then(|| state.received.remove(0)) {
            Some(fd) => {
                state.fds.insert(s("fdname"), fd);
                (ok(), None)
            }
            None => (
                error("No file descriptor supplied via SCM_RIGHTS".into()),
                None,
            ),
        },
        "closefd" => match state.fds.remove(&s("fdname")) {
            Some(_) => (ok(), None),
            None => (
                error(format!("File descriptor named '{}' not found", s("fdname"))),
                None,
            ),
        },
        "netdev_add" => {
            let names: Vec<String> = match (args["fd"].as_str(), args["fds"].as_str()) {
                (Some(f), _) => vec![f.to_owned()],
                (None, Some(l)) => l.split(':').map(str::to_owned).collect(),
                _ => return (error("tap: no fd".into()), None),
            };
            if let Some(missing) = names.iter().find(|n| !state.fds.contains_key(*n)) {
                return (
                    error(format!(
                        "File descriptor named '{missing}' has not been found"
                    )),
                    None,
                );
            }
            let fds = names.iter().filter_map(|n| state.fds.remove(n)).collect();
            state.netdevs.insert(s("id"), fds);
            (ok(), None)
        }
        "netdev_del" => match state.netdevs.remove(&s("id")) {
            Some(_) => (ok(), None),
            None => (error(format!("Device '{}' not found", s("id"))), None),
        },
        "device_add" => {
            eprintln!("fake-emulator: qmp device_add {}", s("id"));
            std::thread::sleep(b.device_add_delay);
            if !state.netdevs.contains_key(&s("netdev")) {
                return (
                    error(format!(
                        "Property 'netdev' can't find value '{}'",
                        s("netdev")
                    )),
                    None,
                );
            }
            state.devices.insert(s("id"), s("netdev"));
            (ok(), None)
        }
        "device_del" => {
            let id = s("id");
            eprintln!("fake-emulator: qmp device_del {id}");
            if !state.devices.contains_key(&id) {
                return (error(format!("Device '{id}' not found")), None);
            }
            if b.no_unplug_ack {
                return (ok(), None);
            }
            state.devices.remove(&id);
            let event = json!({
                "event": "DEVICE_DELETED",
                "data": {"device": id, "path": format!("/machine/peripheral/{id}")},
                "timestamp": {"seconds": 0, "microseconds": 0},
            });
            (ok(), Some(event))
        }
        other => (
            json!({"error": {"class": "CommandNotFound", "desc": format!("The command {other} has not been found")}}),
            None,
        ),
    }
}
