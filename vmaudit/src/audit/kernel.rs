//! The kernel audit subsystem over NETLINK_AUDIT: its status, turning it on and off, sending a
//! user record. Reading back what the kernel logged is [`super::reader`].
//!
//! Requests and answers are built and parsed with netlink-packet-core/-audit. A user record is
//! `AuditMessage::Other((2501, text))`, which the crates serialise as the bare text: we add the
//! NUL that libaudit sends (`strlen + 1`), because the kernel overwrites the payload's last
//! byte with a NUL before logging it (`str[data_len - 1] = '\0'`) and would otherwise cut our
//! last character. Records read back are split with `NetlinkBuffer` but decoded here, not with
//! `AuditMessage`, which rejects non-UTF-8 text: other processes' records may carry any bytes.

use std::{
    io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd},
    time::{Duration, Instant},
};

use netlink_packet_audit::{AuditMessage, StatusMessage};
use netlink_packet_core::{
    DecodeError, NLM_F_ACK, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_AUDIT};
use nix::errno::Errno;
use thiserror::Error;

use super::AuditType;

/// The generic user message type (`auditctl -m`).
const AUDIT_USER: u16 = 1005;

/// `AUDIT_STATUS_ENABLED`: the mask bit of `audit_status.enabled` in an AUDIT_SET.
const AUDIT_STATUS_ENABLED: u32 = 1;
/// How long the kernel may take to answer a request (it answers within the send, or from a
/// kernel thread for AUDIT_GET): a bound on a hang, never a wait.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Bigger than any audit record (the kernel's MAX_AUDIT_MESSAGE_LENGTH is 8970).
pub(super) const RECV_BUF: usize = 64 * 1024;

/// What went wrong talking to the kernel audit subsystem.
#[derive(Debug, Error)]
pub enum KernelError {
    #[error("cannot open a NETLINK_AUDIT socket")]
    Open {
        #[source]
        source: io::Error,
    },
    #[error("{op}: netlink {call} failed")]
    Io {
        op: &'static str,
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused {op}")]
    Refused {
        op: &'static str,
        #[source]
        errno: Errno,
    },
    #[error("{op}: no answer from the kernel within {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
    #[error("{op}: malformed answer from the kernel")]
    Decode {
        op: &'static str,
        #[source]
        source: DecodeError,
    },
    #[error("audit text must not contain a NUL byte")]
    Nul,
    #[error("the kernel dropped audit records: the reader fell behind")]
    Overrun,
}

impl KernelError {
    /// The errno behind this error, if there is one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Open { source } | Self::Io { source, .. } => {
                source.raw_os_error().map(Errno::from_raw)
            }
            Self::Refused { errno, .. } => Some(*errno),
            Self::Timeout { .. } => Some(Errno::ETIMEDOUT),
            Self::Overrun => Some(Errno::ENOBUFS),
            Self::Decode { .. } | Self::Nul => None,
        }
    }
}

/// The kernel audit subsystem's state (`auditctl -s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditStatus {
    /// 0 off, 1 on, 2 on and locked until reboot.
    pub enabled: u32,
    pub failure: u32,
    /// The registered audit daemon's pid (0: none).
    pub pid: u32,
    pub rate_limit: u32,
    pub backlog_limit: u32,
    pub lost: u32,
    pub backlog: u32,
    pub backlog_wait_time: u32,
}

impl AuditStatus {
    pub fn is_enabled(&self) -> bool {
        self.enabled != 0
    }

    pub fn is_locked(&self) -> bool {
        self.enabled == 2
    }
}

/// What became of a record sent to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendStatus {
    /// Acknowledged by the kernel, which logs it.
    Accepted,
    /// Auditing is disabled: the kernel would drop the record silently, so it was not sent.
    Disabled,
}

/// A socket to the kernel audit subsystem (O_CLOEXEC, closed on drop).
pub struct KernelAudit {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl KernelAudit {
    /// Opens the socket. Fails with EPROTONOSUPPORT when the kernel has no audit support.
    pub fn open() -> Result<Self, KernelError> {
        let mut sock = Socket::new(NETLINK_AUDIT).map_err(|source| KernelError::Open { source })?;
        sock.bind_auto()
            .map_err(|source| KernelError::Open { source })?;
        Ok(Self {
            sock,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// AUDIT_GET (needs CAP_AUDIT_CONTROL).
    pub fn status(&mut self) -> Result<AuditStatus, KernelError> {
        const OP: &str = "AUDIT_GET";
        let seq = self.request(OP, AuditMessage::GetStatus(None))?;
        // The kernel acks at once but sends the status from a kernel thread: either may come
        // first. Wait for the status; an ack for this sequence number is skipped.
        loop {
            match self.answer(OP, seq)? {
                NetlinkPayload::InnerMessage(AuditMessage::GetStatus(Some(s))) => {
                    return Ok(AuditStatus {
                        enabled: s.enabled,
                        failure: s.failure,
                        pid: s.pid,
                        rate_limit: s.rate_limiting,
                        backlog_limit: s.backlog_limit,
                        lost: s.lost,
                        backlog: s.backlog,
                        backlog_wait_time: s.backlog_wait_time,
                    });
                }
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(refused(OP, e.raw_code()));
                }
                _ => {}
            }
        }
    }

    /// AUDIT_SET of the enabled flag (needs CAP_AUDIT_CONTROL; refused when locked).
    pub fn set_enabled(&mut self, enabled: bool) -> Result<(), KernelError> {
        let mut s = StatusMessage::new();
        s.mask = AUDIT_STATUS_ENABLED;
        s.enabled = u32::from(enabled);
        self.acked("AUDIT_SET", AuditMessage::SetStatus(s))
    }

    /// Sends one user record (needs CAP_AUDIT_WRITE) and checks the kernel's ack.
    ///
    /// When auditing is disabled the kernel acks and drops the record, so the status is read
    /// first and a disabled subsystem is reported as [`SendStatus::Disabled`] (nothing sent).
    /// Without CAP_AUDIT_CONTROL the status cannot be read: the record is sent, and
    /// `Accepted` then means only that the kernel acked it.
    pub fn send(&mut self, kind: AuditType, text: &str) -> Result<SendStatus, KernelError> {
        if text.contains('\0') {
            return Err(KernelError::Nul);
        }
        match self.status() {
            Ok(s) if !s.is_enabled() => return Ok(SendStatus::Disabled),
            Ok(_) => {}
            Err(KernelError::Refused {
                errno: Errno::EPERM,
                ..
            }) => {}
            Err(e) => return Err(e),
        }
        let msg = AuditMessage::Other((kind.id(), format!("{text}\0")));
        self.acked(kind.name(), msg)?;
        Ok(SendStatus::Accepted)
    }

    /// Sends an AUDIT_USER (1005) record, as `auditctl -m` does (needs CAP_AUDIT_WRITE): the
    /// monitor's heartbeat through the kernel's audit stream.
    pub fn send_user(&mut self, text: &str) -> Result<(), KernelError> {
        if text.contains('\0') {
            return Err(KernelError::Nul);
        }
        let msg = AuditMessage::Other((AUDIT_USER, format!("{text}\0")));
        self.acked("AUDIT_USER", msg)
    }

    /// Sends a request that the kernel answers with an ack or an error only.
    fn acked(&mut self, op: &'static str, msg: AuditMessage) -> Result<(), KernelError> {
        let seq = self.request(op, msg)?;
        loop {
            if let NetlinkPayload::Error(e) = self.answer(op, seq)? {
                return match e.code {
                    None => Ok(()),
                    Some(_) => Err(refused(op, e.raw_code())),
                };
            }
        }
    }

    /// Sends `msg` with NLM_F_REQUEST | NLM_F_ACK; returns its sequence number.
    fn request(&mut self, op: &'static str, msg: AuditMessage) -> Result<u32, KernelError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.sock
            .send_to(&bytes, &SocketAddr::new(0, 0), 0)
            .map_err(|source| KernelError::Io {
                op,
                call: "sendto",
                source,
            })?;
        Ok(self.seq)
    }

    /// The next message from the kernel answering sequence number `seq` (others are
    /// skipped: late acks of earlier requests).
    fn answer(
        &mut self,
        op: &'static str,
        seq: u32,
    ) -> Result<NetlinkPayload<AuditMessage>, KernelError> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            if !wait_readable(self.sock.as_fd(), deadline).map_err(|source| KernelError::Io {
                op,
                call: "poll",
                source,
            })? {
                return Err(KernelError::Timeout {
                    op,
                    timeout: ANSWER_TIMEOUT,
                });
            }
            self.buf.clear();
            let (_, from) =
                self.sock
                    .recv_from(&mut self.buf, 0)
                    .map_err(|source| KernelError::Io {
                        op,
                        call: "recvfrom",
                        source,
                    })?;
            if from.port_number() != 0 {
                continue;
            }
            for msg in split(&self.buf) {
                let parsed = NetlinkMessage::<AuditMessage>::deserialize(msg)
                    .map_err(|source| KernelError::Decode { op, source })?;
                if parsed.header.sequence_number == seq {
                    return Ok(parsed.payload);
                }
            }
        }
    }
}

impl AsFd for KernelAudit {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

fn refused(op: &'static str, code: i32) -> KernelError {
    KernelError::Refused {
        op,
        errno: Errno::from_raw(code.abs()),
    }
}

/// The netlink messages in one datagram.
pub(super) fn split(mut buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let len = NetlinkBuffer::new_checked(buf).ok()?.length() as usize;
        let (msg, rest) = buf.split_at(len);
        buf = rest
            .get(len.next_multiple_of(4) - len..)
            .unwrap_or_default();
        Some(msg)
    })
}

/// Waits until `fd` is readable or `deadline` passes (false).
pub(super) fn wait_readable(fd: BorrowedFd<'_>, deadline: Instant) -> io::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call; fd is borrowed, so open.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        match r {
            0 => return Ok(false),
            r if r > 0 => return Ok(true),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    fn nlmsg(kind: u16, payload: &[u8]) -> Vec<u8> {
        let len = 16 + payload.len();
        let mut v = Vec::new();
        v.extend_from_slice(&(len as u32).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(&[0; 10]);
        v.extend_from_slice(payload);
        v.resize(len.next_multiple_of(4), 0);
        v
    }

    #[test]
    fn split_walks_aligned_messages() {
        let mut buf = nlmsg(2501, b"audit(1.002:3): x");
        buf.extend(nlmsg(1320, b"audit(1.002:3): "));
        let msgs: Vec<&[u8]> = split(&buf).collect();
        assert_eq!(msgs.len(), 2);
        assert_eq!(&msgs[0][16..], b"audit(1.002:3): x");
        assert_eq!(&msgs[1][16..], b"audit(1.002:3): ");
        assert_eq!(split(&[0u8; 3]).count(), 0);
    }
}
