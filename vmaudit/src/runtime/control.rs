//! The control socket of a running `vmaudit run` (`/run/vmaudit/<name>/control.sock`, mode
//! 0600 in the 0700 run directory): one JSON request per connection, one JSON answer.
//!
//! The run loop never waits on a client. Each connection is served by a task of its own: the
//! peer's credentials are checked (SO_PEERCRED: root, or the spec's `control.owner`), the
//! request is read within [`READ_TIMEOUT`] and [`MAX_REQUEST`] bytes, parsed and checked field
//! by field before anything is made; only then is it handed to the run loop as a [`Job`], whose
//! answer the task writes back within [`WRITE_TIMEOUT`].

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use super::spec::{Backend, Interface, Mac};
use crate::exit;

/// How long a client has to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to take its answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request line.
pub const MAX_REQUEST: usize = 64 * 1024;
/// The longest a detach may wait for the guest.
pub const MAX_DETACH_TIMEOUT_MS: u64 = 60_000;
/// Requests queued for the run loop at most (more are refused as busy).
pub const QUEUE: usize = 8;

/// What a client asks.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    AttachNet {
        mac: String,
        #[serde(default = "tap")]
        backend: Backend,
        #[serde(default)]
        parent: Option<String>,
        #[serde(default)]
        ifname: Option<String>,
        #[serde(default = "one")]
        queues: u32,
    },
    DetachNet {
        mac: String,
        /// How long the guest has to acknowledge the unplug.
        #[serde(default = "five_s")]
        timeout_ms: u64,
    },
}

fn tap() -> Backend {
    Backend::Tap
}
fn one() -> u32 {
    1
}
fn five_s() -> u64 {
    5000
}

/// A request checked field by field.
#[derive(Clone, Debug)]
pub enum Checked {
    Attach(Interface),
    Detach { mac: Mac, timeout: Duration },
}

impl Request {
    /// Checks every field; the error names the field.
    pub fn check(self) -> Result<Checked, String> {
        let mac = |m: &str| m.parse::<Mac>().map_err(|e| format!("mac: {e}"));
        match self {
            Request::AttachNet {
                mac: m,
                backend,
                parent,
                ifname,
                queues,
            } => {
                let iface = Interface {
                    mac: mac(&m)?,
                    backend,
                    ifname,
                    parent,
                    vhost: false,
                    queues,
                };
                iface.check().map_err(|(f, m)| format!("{f}: {m}"))?;
                Ok(Checked::Attach(iface))
            }
            Request::DetachNet { mac: m, timeout_ms } => {
                if timeout_ms == 0 || timeout_ms > MAX_DETACH_TIMEOUT_MS {
                    return Err(format!(
                        "timeout_ms: 1 to {MAX_DETACH_TIMEOUT_MS} (it was {timeout_ms})"
                    ));
                }
                Ok(Checked::Detach {
                    mac: mac(&m)?,
                    timeout: Duration::from_millis(timeout_ms),
                })
            }
        }
    }
}

/// The answer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub message: String,
    /// The emulator's fds for the interface (attached, or still held after a failed detach).
    #[serde(default)]
    pub emulator_fds: Vec<i32>,
    /// The exit code the client should end with.
    pub code: u8,
}

impl Response {
    pub fn ok(message: impl Into<String>, emulator_fds: Vec<i32>) -> Self {
        Self {
            ok: true,
            message: message.into(),
            emulator_fds,
            code: exit::OK,
        }
    }
    pub fn err(code: u8, message: impl Into<String>) -> Self {
        Self {
            ok: false,
            message: message.into(),
            emulator_fds: Vec::new(),
            code,
        }
    }
}

/// A checked request for the run loop, and where its answer goes.
pub struct Job {
    pub request: Checked,
    pub answer: oneshot::Sender<Response>,
}

/// The control socket's path for VM `name`.
pub fn socket_path(name: &str) -> PathBuf {
    crate::paths::vm_run_dir(name).join("control.sock")
}

/// Binds the control socket (mode 0600 whatever the umask; its directory is 0700).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves the socket until the run loop's receiver is gone: one task per connection.
pub async fn serve(listener: UnixListener, owner: Option<u32>, jobs: mpsc::Sender<Job>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("control socket: {e}");
                continue;
            }
        };
        if jobs.is_closed() {
            return;
        }
        tokio::spawn(connection(stream, owner, jobs.clone()));
    }
}

/// One connection, start to end.
async fn connection(mut stream: UnixStream, owner: Option<u32>, jobs: mpsc::Sender<Job>) {
    let answer = match take(&mut stream, owner, &jobs).await {
        Ok(rx) => rx.await.unwrap_or_else(|_| {
            Response::err(exit::REQUEST_FAILED, "the VM is stopping: nothing was done")
        }),
        Err(r) => r,
    };
    let mut line = serde_json::to_string(&answer).expect("a response serialises");
    line.push('\n');
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(line.as_bytes())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::warn!("control socket: the client left before its answer: {e}"),
        Err(_) => {
            log::warn!("control socket: the client did not take its answer in {WRITE_TIMEOUT:?}")
        }
    }
}

/// Checks the peer, reads and checks its request, and queues it for the run loop.
async fn take(
    stream: &mut UnixStream,
    owner: Option<u32>,
    jobs: &mpsc::Sender<Job>,
) -> Result<oneshot::Receiver<Response>, Response> {
    let uid = stream
        .peer_cred()
        .map_err(|e| Response::err(exit::PRIVILEGES, format!("peer credentials: {e}")))?
        .uid();
    if uid != 0 && Some(uid) != owner {
        return Err(Response::err(
            exit::PRIVILEGES,
            format!("permission denied: uid {uid} is neither root nor this VM's control owner"),
        ));
    }
    let request = tokio::time::timeout(READ_TIMEOUT, read_request(stream))
        .await
        .map_err(|_| {
            Response::err(
                exit::REQUEST_FAILED,
                format!("no request within {READ_TIMEOUT:?}"),
            )
        })?
        .map_err(|e| Response::err(exit::REQUEST_FAILED, e))?;
    let request = request
        .check()
        .map_err(|e| Response::err(exit::REQUEST_FAILED, format!("bad request: {e}")))?;
    let (answer, rx) = oneshot::channel();
    jobs.try_send(Job { request, answer })
        .map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Response::err(
                exit::REQUEST_FAILED,
                format!("busy: {QUEUE} requests are already waiting"),
            ),
            mpsc::error::TrySendError::Closed(_) => {
                Response::err(exit::REQUEST_FAILED, "the VM is stopping: nothing was done")
            }
        })?;
    Ok(rx)
}

/// Reads one request line of at most [`MAX_REQUEST`] bytes.
async fn read_request(stream: &mut UnixStream) -> Result<Request, String> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(stream).take(MAX_REQUEST as u64 + 1);
    reader
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| e.to_string())?;
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    let text = std::str::from_utf8(&line).map_err(|_| "bad request: not UTF-8".to_owned())?;
    if text.trim().is_empty() {
        return Err("bad request: empty".to_owned());
    }
    serde_json::from_str(text).map_err(|e| format!("bad request: {e}"))
}

/// How long the client waits for an answer: the longest the server may take.
fn client_timeout(req: &Request) -> Duration {
    let detach = match req {
        Request::DetachNet { timeout_ms, .. } => Duration::from_millis(*timeout_ms),
        Request::AttachNet { .. } => Duration::ZERO,
    };
    detach + Duration::from_secs(60)
}

/// Why a client got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens at the VM's socket (or its run directory does not exist).
    #[error("no VM named {name:?} runs under vmaudit ({}: {source})", path.display())]
    NoSuchVm {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The socket (or its 0700 run directory) is not this user's to use.
    #[error("permission denied: the control socket of VM {name:?} is root's or its control owner's ({}: {source})", path.display())]
    Refused {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Connected, but the exchange failed (sending, a timeout, no answer, a bad answer).
    #[error("{0}")]
    Exchange(String),
}

impl ClientError {
    /// The documented exit code: no such VM (3), refused (4), a failed exchange (16).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NoSuchVm { .. } => exit::NO_SUCH_PROCESS,
            Self::Refused { .. } => exit::PRIVILEGES,
            Self::Exchange(_) => exit::REQUEST_FAILED,
        }
    }

    fn connecting(name: &str, path: PathBuf, source: std::io::Error) -> Self {
        let name = name.to_owned();
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            Self::Refused { name, path, source }
        } else {
            Self::NoSuchVm { name, path, source }
        }
    }
}

/// Client side: sends `req` to VM `name` and returns the answer.
pub async fn request(name: &str, req: &Request) -> Result<Response, ClientError> {
    let path = socket_path(name);
    let mut s = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e) => return Err(ClientError::connecting(name, path, e)),
    };
    exchange(&mut s, req).await.map_err(ClientError::Exchange)
}

/// One request written, one answer read.
async fn exchange(s: &mut UnixStream, req: &Request) -> Result<Response, String> {
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    // A request refused before it is read (the peer check) is answered and the connection
    // closed: the write may then fail, and the answer is still there to read.
    let wrote = s.write_all(line.as_bytes()).await;
    let mut answer = String::new();
    let mut reader = BufReader::new(s);
    let read = tokio::time::timeout(client_timeout(req), reader.read_line(&mut answer))
        .await
        .map_err(|_| {
            format!(
                "no answer from vmaudit run within {:?}",
                client_timeout(req)
            )
        })?;
    match (read, wrote) {
        (Ok(_), _) if !answer.is_empty() => {}
        (_, Err(e)) => return Err(format!("sending the request: {e}")),
        (Err(e), Ok(())) => return Err(format!("reading the answer: {e}")),
        (Ok(_), Ok(())) => return Err("vmaudit run closed the connection without an answer".into()),
    }
    serde_json::from_str(&answer)
        .map_err(|e| format!("bad answer from vmaudit run: {e}: {answer:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str) -> Result<Checked, String> {
        serde_json::from_str::<Request>(json)
            .map_err(|e| e.to_string())?
            .check()
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        assert!(check(r#"{"op":"attach-net","mac":"52:54:00:00:00:01"}"#).is_ok());
        let e =
            check(r#"{"op":"attach-net","mac":"52:54:00:00:00:01","ifname":"sixteen-bytes-xx"}"#)
                .unwrap_err();
        assert!(e.starts_with("ifname: "), "{e}");
        let e = check(r#"{"op":"attach-net","mac":"52:54:00:00:00:01","queues":99}"#).unwrap_err();
        assert_eq!(e, "queues: must be 1 to 16");
        let e = check(r#"{"op":"attach-net","mac":"nope"}"#).unwrap_err();
        assert!(e.starts_with("mac: "), "{e}");
        let e =
            check(r#"{"op":"attach-net","mac":"52:54:00:00:00:01","parent":"eth0"}"#).unwrap_err();
        assert!(e.starts_with("parent: "), "{e}");
        let e = check(r#"{"op":"detach-net","mac":"52:54:00:00:00:01","timeout_ms":3600000}"#)
            .unwrap_err();
        assert!(e.starts_with("timeout_ms: "), "{e}");
        assert!(check(r#"{"op":"attach-net","mac":"52:54:00:00:00:01","x":1}"#).is_err());
    }
}
