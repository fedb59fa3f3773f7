//! Where messages go: `udp://HOST:PORT`, `tcp://HOST:PORT` (octet-counting framing, RFC 6587
//! 3.4.1) or `unix:///PATH` (a datagram socket such as /dev/log), and the connection to it.

use std::{
    fmt, io,
    net::{SocketAddr, ToSocketAddrs as _},
    path::PathBuf,
};

use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpStream, UdpSocket, UnixDatagram},
};

/// A receiver, its address resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Udp(SocketAddr),
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    #[error("--to {0:?}: not udp://HOST:PORT, tcp://HOST:PORT or unix:///PATH")]
    Form(String),
    #[error("--to {0:?}: {1} does not resolve")]
    Resolve(String, String, #[source] io::Error),
}

impl Target {
    /// Parses and resolves `--to` (the first address a host name resolves to is used).
    pub fn parse(s: &str) -> Result<Self, AddrError> {
        let form = || AddrError::Form(s.to_owned());
        let (scheme, rest) = s.split_once("://").ok_or_else(form)?;
        if scheme == "unix" {
            return if rest.starts_with('/') && rest.len() > 1 {
                Ok(Self::Unix(PathBuf::from(rest)))
            } else {
                Err(form())
            };
        }
        // HOST:PORT with a port, and nothing after it (no path, no user).
        let port_ok = rest
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok || rest.contains(['/', '@']) {
            return Err(form());
        }
        let addr = rest
            .to_socket_addrs()
            .map_err(|e| AddrError::Resolve(s.to_owned(), rest.to_owned(), e))?
            .next()
            .ok_or_else(|| {
                AddrError::Resolve(
                    s.to_owned(),
                    rest.to_owned(),
                    io::ErrorKind::NotFound.into(),
                )
            })?;
        match scheme {
            "udp" => Ok(Self::Udp(addr)),
            "tcp" => Ok(Self::Tcp(addr)),
            _ => Err(form()),
        }
    }

    /// Whether a send error is known for sure, so the message can be sent again (TCP, a unix
    /// socket); a UDP datagram's loss mostly is not.
    pub fn retries(&self) -> bool {
        !matches!(self, Self::Udp(_))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Udp(a) => write!(f, "udp://{a}"),
            Self::Tcp(a) => write!(f, "tcp://{a}"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Unix(UnixDatagram),
}

/// Sends messages to a target, connecting (again) when needed.
pub struct Sender {
    target: Target,
    conn: Option<Conn>,
}

impl Sender {
    pub fn new(target: Target) -> Self {
        Self { target, conn: None }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Sends one message. After an error a TCP connection or unix socket is dropped and the
    /// next send makes a new one; a UDP socket is kept, so that the kernel goes on reporting
    /// what it learns of the receiver (a port unreachable) on later sends.
    pub async fn send(&mut self, msg: &str) -> io::Result<()> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => self.conn.insert(connect(&self.target).await?),
        };
        let sent = match conn {
            Conn::Udp(s) => s.send(msg.as_bytes()).await.map(drop),
            Conn::Unix(s) => s.send(msg.as_bytes()).await.map(drop),
            Conn::Tcp(s) => match closed_by_peer(s) {
                Ok(()) => s.write_all(format!("{} {msg}", msg.len()).as_bytes()).await,
                Err(e) => Err(e),
            },
        };
        if sent.is_err() && self.target.retries() {
            self.conn = None;
        }
        sent
    }
}

async fn connect(target: &Target) -> io::Result<Conn> {
    Ok(match target {
        Target::Udp(addr) => {
            let local: SocketAddr = if addr.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                ([0u16; 8], 0).into()
            };
            let s = UdpSocket::bind(local).await?;
            // Connected: the kernel reports the port unreachable (ICMP) on a later send.
            s.connect(addr).await?;
            Conn::Udp(s)
        }
        Target::Tcp(addr) => Conn::Tcp(TcpStream::connect(addr).await?),
        Target::Unix(path) => {
            let s = UnixDatagram::unbound()?;
            s.connect(path)?;
            Conn::Unix(s)
        }
    })
}

/// A syslog receiver never writes on the connection: anything readable is its end (it closed,
/// or reset), found before a message is written into a connection that is gone.
fn closed_by_peer(s: &TcpStream) -> io::Result<()> {
    let mut byte = [0u8; 1];
    match s.try_read(&mut byte) {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the receiver closed the connection",
        )),
        // Data from a receiver that should send none: ignored.
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_say_which_form_they_need() {
        assert_eq!(
            Target::parse("udp://127.0.0.1:514").unwrap(),
            Target::Udp("127.0.0.1:514".parse().unwrap())
        );
        assert_eq!(
            Target::parse("tcp://[::1]:601").unwrap(),
            Target::Tcp("[::1]:601".parse().unwrap())
        );
        assert!(matches!(
            Target::parse("tcp://localhost:601").unwrap(),
            Target::Tcp(a) if a.ip().is_loopback() && a.port() == 601
        ));
        assert_eq!(
            Target::parse("unix:///dev/log").unwrap(),
            Target::Unix("/dev/log".into())
        );
        for bad in [
            "127.0.0.1:514",
            "udp://127.0.0.1",
            "udp://127.0.0.1:99999",
            "tcp://:514",
            "http://127.0.0.1:80",
            "unix://dev/log",
            "unix://",
            "tcp://127.0.0.1:514/x",
        ] {
            let e = Target::parse(bad).unwrap_err();
            assert!(matches!(e, AddrError::Form(_)), "{bad}: {e}");
        }
        assert!(matches!(
            Target::parse("udp://no-such-host.invalid:514"),
            Err(AddrError::Resolve(..))
        ));
    }

    #[tokio::test]
    async fn tcp_frames_count_octets() {
        use tokio::io::AsyncReadExt as _;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut s = Sender::new(Target::Tcp(l.local_addr().unwrap()));
        s.send("<14>1 - - - - - - héllo").await.unwrap();
        s.send("x").await.unwrap();
        drop(s);
        let (mut c, _) = l.accept().await.unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "24 <14>1 - - - - - - héllo1 x");
    }
}
