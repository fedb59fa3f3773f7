//! The test process as a stand-in VM manager (for monitor mode): the taps libvirt would make,
//! and the audit.log lines libvirt's records would be.

use std::{
    fs::{File, OpenOptions},
    os::fd::AsRawFd as _,
};

/// A tap as libvirt makes one for an ethernet NIC: TUNSETIFF with `name` (a `%d` in it lets the
/// kernel pick the first free number: a previous run's taps may still be in teardown), and the
/// host-side address libvirt gives it, the guest MAC `mac` with first byte 0xfe (set through
/// `sock`). The tap lives as long as some process holds its fd.
pub fn tap(sock: &std::net::UdpSocket, name: &str, mac: &[u8; 6]) -> File {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we own.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req) };
    assert!(
        rc == 0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    let mut host = *mac;
    host[0] = 0xfe;
    // SAFETY: writing the hwaddr member of the union we own.
    unsafe {
        req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(host) {
            *d = s as libc::c_char;
        }
    }
    // SAFETY: SIOCSIFHWADDR reads the ifreq we own.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFHWADDR, &req) };
    assert!(
        rc == 0,
        "SIOCSIFHWADDR {name}: {}",
        std::io::Error::last_os_error()
    );
    f
}

/// One line of an auditd log as libvirt's records appear in it, sent by this process:
/// `type=KIND msg=audit(NOW:SERIAL): pid=.. ... msg='virt=kvm TEXT exe=.. ... res=success'`.
pub fn record(kind: &str, serial: &mut u64, text: &str) -> String {
    *serial += 1;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!(
        "type={kind} msg=audit({}.{:03}:{serial}): pid={} uid=0 auid=4294967295 ses=4294967295 msg='virt=kvm {text} exe=\"/usr/sbin/libvirtd\" hostname=? addr=? terminal=? res=success'\n",
        now.as_secs(),
        now.subsec_millis(),
        std::process::id()
    )
}

/// A stand-in emulator (`fake-emulator`) started by this process as its manager, holding
/// `fds` (inherited at their numbers, as libvirt passes them), in `mode`. Killed on drop.
pub struct StandIn {
    child: crate::ChildGuard,
    lines: std::sync::mpsc::Receiver<String>,
}

impl StandIn {
    /// Starts it and returns once it says it is ready.
    pub fn start(bins: &crate::Bins, mode: &[&str], fds: &[&File]) -> Self {
        use std::{
            io::{BufRead as _, BufReader},
            os::unix::process::CommandExt as _,
            process::{Command, Stdio},
        };
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut cmd = Command::new(&bins.fake_emulator);
        cmd.arg("--mode").args(mode).arg("--");
        for fd in &raw {
            cmd.args(["-netdev", &format!("tap,id=n{fd},fd={fd}")]);
        }
        cmd.stdin(Stdio::null()).stderr(Stdio::piped());
        // SAFETY: only fcntl (async-signal-safe) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &raw {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn fake-emulator");
        let err = BufReader::new(child.stderr.take().expect("stderr"));
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let s = Self {
            child: crate::ChildGuard(child),
            lines,
        };
        s.line("fake-emulator: ready");
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Its next stderr line starting with `prefix`.
    fn line(&self, prefix: &str) -> String {
        loop {
            let l = self
                .lines
                .recv_timeout(crate::PATIENCE)
                .unwrap_or_else(|e| panic!("fake-emulator: no {prefix:?} line ({e})"));
            if l.starts_with(prefix) {
                return l;
            }
        }
    }

    /// `close-later`: SIGUSR1, and returns once it says it closed its fds.
    pub fn close_fds(&self) {
        // SAFETY: SIGUSR1 to our own child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGUSR1) };
        self.line("fake-emulator: closed");
    }

    /// SIGTERM, and returns once it has exited.
    pub fn end(mut self) {
        // SAFETY: SIGTERM to our own child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        self.child.0.wait().expect("wait for fake-emulator");
    }
}
