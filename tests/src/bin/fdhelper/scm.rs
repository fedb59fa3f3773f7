//! `recvmmsg_fds N...`: a batch of datagrams whose fds come in every shape SCM_RIGHTS allows,
//! sent by one sendmmsg and received by one recvmmsg.
//!
//! Message `k` carries `N[k]` fds, alternately of /dev/null and /dev/zero, in SCM_RIGHTS
//! control messages of at most [`PER_CMSG`] fds each (the kernel joins them into one on
//! receipt). The receiving socket asks for two timestamps, the sender's credentials and a
//! pidfd of the sender as well, so each received message holds five control messages and
//! gains a pidfd besides its `N[k]` fds. The sender closes its copies once sent.
//!
//! Reply: `ok cmsgs:C FD:KIND...`: `C` the most control messages any received message held,
//! then every fd received in the order the kernel installed them (buffer order), `KIND` one
//! of `null`, `zero`, `pidfd`.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use crate::check;

/// Fds per SCM_RIGHTS control message sent: several control messages per datagram.
const PER_CMSG: usize = 8;
/// Not in the libc crate yet (Linux 6.5).
const SO_PASSPIDFD: libc::c_int = 76;
const SCM_PIDFD: libc::c_int = 4;
/// Bytes of each received message's control buffer: room for 253 fds (SCM_MAX_FD) and the rest.
const RECV_CONTROL: usize = 2048;

pub fn recvmmsg_fds(counts: &[usize]) -> Result<String, String> {
    let (tx, rx) = pair()?;
    receive_everything(&rx)?;
    // The files each message carries, opened here and closed once sent.
    let files: Vec<Vec<OwnedFd>> = counts
        .iter()
        .map(|&n| (0..n).map(|i| open(DEVICES[i % 2].0)).collect())
        .collect::<Result<_, _>>()?;
    send_all(&tx, &files)?;
    drop(files);
    let (cmsgs, got) = receive_all(&rx, counts.len())?;
    let mut words = vec![format!("cmsgs:{cmsgs}")];
    words.extend(got.iter().map(|(fd, kind)| format!("{fd}:{kind}")));
    Ok(format!("ok {}", words.join(" ")))
}

/// The devices the fds alternate between, and their names in the reply.
const DEVICES: [(&str, &str); 2] = [("/dev/null", "null"), ("/dev/zero", "zero")];

fn open(path: &str) -> Result<OwnedFd, String> {
    Ok(std::fs::File::open(path)
        .map_err(|e| format!("{path}: {e}"))?
        .into())
}

fn pair() -> Result<(OwnedFd, OwnedFd), String> {
    let mut pair = [0i32; 2];
    // SAFETY: socketpair writes two ints into `pair`.
    check(unsafe {
        libc::syscall(
            libc::SYS_socketpair,
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    })?;
    // SAFETY: both fds were just created and are owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) })
}

/// Every ancillary message a unix datagram socket can add to the fds.
fn receive_everything(rx: &OwnedFd) -> Result<(), String> {
    let stamping = (libc::SOF_TIMESTAMPING_SOFTWARE | libc::SOF_TIMESTAMPING_RX_SOFTWARE) as i32;
    for (opt, value) in [
        (libc::SO_TIMESTAMP, 1),
        (libc::SO_TIMESTAMPING, stamping),
        (libc::SO_PASSCRED, 1),
        (SO_PASSPIDFD, 1),
    ] {
        // SAFETY: setsockopt reads one int owned by this frame.
        check(unsafe {
            libc::setsockopt(
                rx.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&value as *const i32).cast(),
                size_of::<i32>() as u32,
            )
        } as libc::c_long)
        .map_err(|e| format!("setsockopt {opt}: {e}"))?;
    }
    Ok(())
}

/// One sendmmsg of every message, each with its fds in control messages of [`PER_CMSG`].
fn send_all(tx: &OwnedFd, files: &[Vec<OwnedFd>]) -> Result<(), String> {
    let mut controls: Vec<Vec<u64>> = files.iter().map(|f| control_of(f)).collect();
    let mut byte = *b"x";
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut msgs: Vec<libc::mmsghdr> = controls
        .iter_mut()
        .map(|c| {
            // SAFETY: an all-zero mmsghdr is valid (null pointers, zero lengths).
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
            if !c.is_empty() {
                m.msg_hdr.msg_control = c.as_mut_ptr().cast();
                m.msg_hdr.msg_controllen = c.len() * 8;
            }
            m
        })
        .collect();
    // SAFETY: every message points at buffers owned by this frame, of the lengths given.
    let sent = check(unsafe {
        libc::syscall(
            libc::SYS_sendmmsg,
            tx.as_raw_fd(),
            msgs.as_mut_ptr(),
            msgs.len(),
            // More datagrams than the receiver queues (net.unix.max_dgram_qlen) fail here,
            // rather than wait for a reader that comes only after.
            libc::MSG_DONTWAIT,
        )
    })?;
    if sent as usize != msgs.len() {
        return Err(format!("sendmmsg sent {sent} of {} messages", msgs.len()));
    }
    Ok(())
}

/// A control buffer (8-byte aligned) of SCM_RIGHTS messages holding `fds`, [`PER_CMSG`] each.
fn control_of(fds: &[OwnedFd]) -> Vec<u64> {
    let chunks: Vec<Vec<RawFd>> = fds
        .chunks(PER_CMSG)
        .map(|c| c.iter().map(|f| f.as_raw_fd()).collect())
        .collect();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = |n: usize| unsafe { libc::CMSG_SPACE((n * size_of::<RawFd>()) as u32) as usize };
    let bytes: usize = chunks.iter().map(|c| space(c.len())).sum();
    let mut buf = vec![0u64; bytes / 8];
    let mut off = 0;
    for c in &chunks {
        let data = std::mem::size_of_val(c.as_slice());
        // SAFETY: `off + space(c.len())` is within `buf`, which is 8-byte aligned as a cmsghdr
        // must be; the header and the data after it are written inside that span.
        unsafe {
            let hdr = buf
                .as_mut_ptr()
                .cast::<u8>()
                .add(off)
                .cast::<libc::cmsghdr>();
            (*hdr).cmsg_len = libc::CMSG_LEN(data as u32) as usize;
            (*hdr).cmsg_level = libc::SOL_SOCKET;
            (*hdr).cmsg_type = libc::SCM_RIGHTS;
            std::ptr::copy_nonoverlapping(c.as_ptr().cast::<u8>(), libc::CMSG_DATA(hdr), data);
        }
        off += space(c.len());
    }
    buf
}

/// Fds received, each with the name of what it holds.
type Received = Vec<(RawFd, &'static str)>;

/// One recvmmsg of `n` messages: the most control messages in one, and each fd received with
/// its kind, in buffer order.
fn receive_all(rx: &OwnedFd, n: usize) -> Result<(usize, Received), String> {
    let mut bytes = vec![[0u8; 1]; n];
    let mut controls = vec![vec![0u64; RECV_CONTROL / 8]; n];
    let mut iovs: Vec<libc::iovec> = bytes
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: 1,
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..n)
        .map(|i| {
            // SAFETY: an all-zero mmsghdr is valid (null pointers, zero lengths).
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = controls[i].as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = RECV_CONTROL;
            m
        })
        .collect();
    // SAFETY: every message points at buffers owned by this frame, of the lengths given.
    let got = check(unsafe {
        libc::syscall(
            libc::SYS_recvmmsg,
            rx.as_raw_fd(),
            msgs.as_mut_ptr(),
            n,
            libc::MSG_DONTWAIT,
            0usize,
        )
    })? as usize;
    if got != n {
        return Err(format!("recvmmsg received {got} of {n} messages"));
    }
    let mut most = 0;
    let mut out = Vec::new();
    for m in &msgs {
        if m.msg_hdr.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err("control data truncated".into());
        }
        most = most.max(walk(&m.msg_hdr, &mut out));
    }
    Ok((most, out))
}

/// Appends the fds of one received message to `out`; returns its number of control messages.
fn walk(hdr: &libc::msghdr, out: &mut Received) -> usize {
    let mut count = 0;
    // SAFETY: the kernel filled the control buffer and set its length; CMSG_FIRSTHDR,
    // CMSG_NXTHDR and CMSG_DATA stay inside it, and each data read is within its cmsg_len.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            count += 1;
            let data = libc::CMSG_DATA(c).cast::<RawFd>();
            let fds = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                    for i in 0..fds {
                        let fd = std::ptr::read_unaligned(data.add(i));
                        out.push((fd, kind_of(fd)));
                    }
                }
                (libc::SOL_SOCKET, SCM_PIDFD) => {
                    out.push((std::ptr::read_unaligned(data), "pidfd"))
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    count
}

/// Which device a received fd holds, from its rdev.
fn kind_of(fd: RawFd) -> &'static str {
    let rdev = std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .map(|m| std::os::unix::fs::MetadataExt::rdev(&m))
        .unwrap_or(0);
    DEVICES
        .iter()
        .find(|(path, _)| {
            std::fs::metadata(path).is_ok_and(|m| std::os::unix::fs::MetadataExt::rdev(&m) == rdev)
        })
        .map_or("unknown", |(_, name)| name)
}
