//! The control socket of a running `vmaudit run` (`/run/vmaudit/<name>/control.sock`, mode
//! 0600): one JSON request per connection, one JSON answer.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use super::spec::Backend;

/// What a client asks.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
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
            code: crate::exit::OK,
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

/// The control socket's path for VM `name`.
pub fn socket_path(name: &str) -> PathBuf {
    crate::paths::vm_run_dir(name).join("control.sock")
}

/// Binds the control socket, readable and writable by its owner only.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Reads one request from a connection.
pub async fn read_request(stream: &mut tokio::net::UnixStream) -> Result<Request, String> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    reader
        .read_line(&mut line)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&line).map_err(|e| format!("bad request: {e}"))
}

/// Writes the answer.
pub async fn write_response(stream: &mut tokio::net::UnixStream, r: &Response) {
    let mut line = serde_json::to_string(r).unwrap_or_default();
    line.push('\n');
    let _ = stream.write_all(line.as_bytes()).await;
}

/// Client side: sends `req` to VM `name` and returns the answer.
pub async fn request(name: &str, req: &Request) -> Result<Response, String> {
    let path = socket_path(name);
    let mut s = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
        format!(
            "no VM named {name:?} runs under vmaudit ({}: {e})",
            path.display()
        )
    })?;
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    s.write_all(line.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&answer)
        .map_err(|e| format!("bad answer from vmaudit run: {e}: {answer:?}"))
}
