//! A listener on the kernel's audit log: every record the kernel logs, as auditd would
//! receive it, from multicast group AUDIT_NLGRP_READLOG.

use std::{
    collections::VecDeque,
    os::fd::{AsFd, BorrowedFd},
    time::{Duration, Instant},
};

use netlink_packet_audit::AUDIT_NLGRP_READLOG;
use netlink_packet_core::NetlinkBuffer;
use netlink_sys::{Socket, protocols::NETLINK_AUDIT};

use super::{
    KernelRecord,
    kernel::{KernelError, RECV_BUF, split, wait_readable},
};

/// A listener on the kernel's audit log (multicast group AUDIT_NLGRP_READLOG; needs
/// CAP_AUDIT_READ). It sees every record the kernel logs from the moment it is open.
pub struct Reader {
    sock: Socket,
    buf: Vec<u8>,
    pending: VecDeque<KernelRecord>,
}

impl Reader {
    pub fn open() -> Result<Self, KernelError> {
        let open = |source| KernelError::Open { source };
        let mut sock = Socket::new(NETLINK_AUDIT).map_err(open)?;
        sock.bind_auto().map_err(open)?;
        sock.add_membership(AUDIT_NLGRP_READLOG).map_err(open)?;
        // Room for bursts; the kernel caps it at net.core.rmem_max.
        let _ = sock.set_rx_buf_sz(4 * 1024 * 1024);
        Ok(Self {
            sock,
            buf: Vec::with_capacity(RECV_BUF),
            pending: VecDeque::new(),
        })
    }

    /// The next record, waiting at most `timeout` (`None`: it passed with nothing).
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<KernelRecord>, KernelError> {
        const OP: &str = "reading the audit log";
        let deadline = Instant::now() + timeout;
        while self.pending.is_empty() {
            let io = |call| {
                move |source| KernelError::Io {
                    op: OP,
                    call,
                    source,
                }
            };
            if !wait_readable(self.sock.as_fd(), deadline).map_err(io("poll"))? {
                return Ok(None);
            }
            self.buf.clear();
            match self.sock.recv_from(&mut self.buf, 0) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Err(KernelError::Overrun);
                }
                Err(e) => return Err(io("recvfrom")(e)),
            }
            for msg in split(&self.buf) {
                let nl = NetlinkBuffer::new(msg);
                let payload = nl.payload();
                let text = payload.strip_suffix(b"\0").unwrap_or(payload);
                self.pending.push_back(KernelRecord {
                    kind: nl.message_type(),
                    text: String::from_utf8_lossy(text).into_owned(),
                });
            }
        }
        Ok(self.pending.pop_front())
    }
}

impl AsFd for Reader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}
