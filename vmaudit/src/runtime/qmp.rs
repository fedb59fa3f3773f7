//! QMP with the `qapi` crates, plus the one thing they cannot do: hand qemu an fd.
//!
//! `getfd` needs the fd in SCM_RIGHTS on the very message that carries the command; qapi writes
//! through any `AsyncWrite`, so the write half here is a unix socket whose next write goes out
//! with `sendmsg` and the pending fd (glue, not a protocol of our own: the JSON is qapi's).

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, RawFd},
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use futures::StreamExt as _;
use qapi::{
    futures::{QapiService, QmpStreamTokio},
    qmp,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::UnixStream,
    sync::mpsc,
};

/// How long qemu may take to answer one command.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(3);

/// A QMP command that failed, or the connection.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("qemu refused {command}: {message}")]
    Refused {
        command: &'static str,
        message: String,
    },
    #[error("QMP connection ({command})")]
    Io {
        command: &'static str,
        #[source]
        source: io::Error,
    },
}

/// One side of the QMP socket (both halves share it).
#[derive(Clone)]
struct Half {
    sock: Arc<UnixStream>,
    pending_fd: Arc<Mutex<Option<RawFd>>>,
}

impl AsyncRead for Half {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            match self.sock.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let unfilled = buf.initialize_unfilled();
            match self.sock.try_read(unfilled) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Half {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.sock.poll_write_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let fd = *self.pending_fd.lock().expect("pending fd lock");
            let res = self.sock.try_io(Interest::WRITABLE, || {
                let iov = [io::IoSlice::new(data)];
                let fds = fd.map(|f| [f]);
                let cmsg: Vec<nix::sys::socket::ControlMessage<'_>> = fds
                    .as_ref()
                    .map(|f| vec![nix::sys::socket::ControlMessage::ScmRights(f)])
                    .unwrap_or_default();
                nix::sys::socket::sendmsg::<()>(
                    self.sock.as_raw_fd(),
                    &iov,
                    &cmsg,
                    nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            });
            match res {
                Ok(n) => {
                    // The fd went with this message; qemu keeps it for the next getfd.
                    *self.pending_fd.lock().expect("pending fd lock") = None;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A QMP connection to the emulator.
pub struct Qmp {
    service: QapiService<QmpStreamTokio<Half>>,
    pending_fd: Arc<Mutex<Option<RawFd>>>,
    deleted: mpsc::UnboundedReceiver<String>,
    events: tokio::task::JoinHandle<()>,
    broken: bool,
}

fn io_err(command: &'static str) -> impl Fn(io::Error) -> QmpError {
    move |source| QmpError::Io { command, source }
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let sock = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        Self::from_stream(sock).await
    }

    /// Negotiates capabilities on a connected socket (one connected before qemu even started:
    /// the greeting comes once qemu accepts it).
    pub async fn from_stream(sock: UnixStream) -> Result<Self, QmpError> {
        let half = Half {
            sock: Arc::new(sock),
            pending_fd: Arc::new(Mutex::new(None)),
        };
        let pending_fd = half.pending_fd.clone();
        let negotiation = QmpStreamTokio::open_split(half.clone(), half)
            .await
            .map_err(io_err("greeting"))?;
        let stream = negotiation
            .negotiate()
            .await
            .map_err(io_err("qmp_capabilities"))?;
        let (service, events) = stream.into_parts();
        let (tx, deleted) = mpsc::unbounded_channel();
        // Events are read by the task below instead of queued for `execute`.
        if let Err(e) = events.release() {
            return Err(QmpError::Io {
                command: "events",
                source: io::Error::other(format!("{e:?}")),
            });
        }
        let events = tokio::spawn(async move {
            let mut events = events;
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(qmp::Event::DEVICE_DELETED { data, .. }) => {
                        if let Some(id) = data.device
                            && tx.send(id).is_err()
                        {
                            // The connection's owner is gone.
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        Ok(Self {
            service,
            pending_fd,
            deleted,
            events,
            broken: false,
        })
    }

    async fn exec<C: qapi::Command + qapi::qmp::QmpCommand>(
        &mut self,
        name: &'static str,
        c: C,
    ) -> Result<C::Ok, QmpError> {
        if self.broken {
            return Err(QmpError::Io {
                command: name,
                source: io::Error::other(
                    "the QMP connection is unusable after an unanswered command",
                ),
            });
        }
        // A stopped or wedged qemu must not hang vmaudit's control loop.
        let answer = tokio::time::timeout(QMP_TIMEOUT, self.service.execute(c)).await;
        let Ok(answer) = answer else {
            // Its late answer would be taken for the next command's: use the connection no more.
            self.broken = true;
            return Err(QmpError::Io {
                command: name,
                source: io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("qemu did not answer in {QMP_TIMEOUT:?}"),
                ),
            });
        };
        match answer {
            Ok(ok) => Ok(ok),
            Err(qapi::ExecuteError::Qapi(e)) => Err(QmpError::Refused {
                command: name,
                message: e.desc,
            }),
            Err(qapi::ExecuteError::Io(e)) => Err(QmpError::Io {
                command: name,
                source: e,
            }),
        }
    }

    /// `getfd NAME` with `fd` in SCM_RIGHTS: qemu now holds its own copy under NAME.
    pub async fn getfd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        *self.pending_fd.lock().expect("pending fd lock") = Some(fd.as_raw_fd());
        let r = self
            .exec(
                "getfd",
                qmp::getfd {
                    fdname: name.to_owned(),
                },
            )
            .await
            .map(|_| ());
        *self.pending_fd.lock().expect("pending fd lock") = None;
        r
    }

    /// `closefd NAME` (rollback of a getfd no netdev took).
    pub async fn closefd(&mut self, name: &str) -> Result<(), QmpError> {
        self.exec(
            "closefd",
            qmp::closefd {
                fdname: name.to_owned(),
            },
        )
        .await
        .map(|_| ())
    }

    /// `netdev_add` of a tap backed by fds received with `getfd` (their names).
    pub async fn netdev_add_tap(
        &mut self,
        id: &str,
        fd_names: &[String],
        vhost_names: &[String],
    ) -> Result<(), QmpError> {
        let mut tap = qmp::NetdevTapOptions::default();
        if fd_names.len() > 1 {
            tap.fds = Some(fd_names.join(":"));
        } else {
            tap.fd = fd_names.first().cloned();
        }
        if !vhost_names.is_empty() {
            tap.vhost = Some(true);
            if vhost_names.len() > 1 {
                tap.vhostfds = Some(vhost_names.join(":"));
            } else {
                tap.vhostfd = vhost_names.first().cloned();
            }
        }
        let netdev = qmp::Netdev::tap {
            id: id.to_owned(),
            tap,
        };
        self.exec("netdev_add", qmp::netdev_add(netdev))
            .await
            .map(|_| ())
    }

    pub async fn netdev_del(&mut self, id: &str) -> Result<(), QmpError> {
        self.exec("netdev_del", qmp::netdev_del { id: id.to_owned() })
            .await
            .map(|_| ())
    }

    /// `device_add virtio-net-pci` on `netdev` with `mac`.
    pub async fn device_add_nic(
        &mut self,
        id: &str,
        netdev: &str,
        mac: &str,
    ) -> Result<(), QmpError> {
        let mut arguments = qapi::Dictionary::new();
        arguments.insert("netdev".into(), netdev.into());
        arguments.insert("mac".into(), mac.into());
        let c = qmp::device_add {
            bus: None,
            id: Some(id.to_owned()),
            driver: "virtio-net-pci".to_owned(),
            arguments,
        };
        self.exec("device_add", c).await.map(|_| ())
    }

    pub async fn device_del(&mut self, id: &str) -> Result<(), QmpError> {
        self.exec("device_del", qmp::device_del { id: id.to_owned() })
            .await
            .map(|_| ())
    }

    /// Waits for DEVICE_DELETED of `id` (the guest acknowledged the unplug), up to `timeout`.
    pub async fn wait_deleted(&mut self, id: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.deleted.recv()).await {
                Ok(Some(d)) if d == id => return true,
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return false,
            }
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.events.abort();
    }
}
