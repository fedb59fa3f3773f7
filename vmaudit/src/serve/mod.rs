//! `--serve`: what the verifier sees, over HTTP, for people and for Prometheus.
//!
//! - [`hub`]: the [`Hub`], an observer of the verifier (or of `watch`'s tracker) that keeps
//!   the live state (VMs or processes, fd tables with the claim behind each fd, recent
//!   verdicts), the history and the metrics.
//! - [`history`]: the bounded per-second history the dashboard plots.
//! - [`view`]: the JSON of the snapshot and of the events.
//! - [`metrics`]: the Prometheus metrics (prometheus-client).
//! - [`http`]: the endpoints (axum): `/` the dashboard, `/metrics`, `/api/state`, `/events`.
//!
//! The server runs on the caller's tokio runtime. It is bound before anything else starts, so
//! that a bad address or a port in use stops a command before it has done anything.

pub mod history;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod view;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

pub use self::hub::Hub;
use crate::{exit, verify::observer::Observers};

/// Where `--serve` listens when given no address: loopback, Prometheus' port range.
pub const DEFAULT_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);

/// Why the server could not start (exit code [`exit::SERVE`]).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("--serve: `{given}` is not an address (IP:PORT, [IPv6]:PORT, or a PORT on 127.0.0.1)")]
    Addr { given: String },
    #[error("--serve: cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl ServeError {
    pub fn exit_code(&self) -> u8 {
        exit::SERVE
    }
}

/// Parses `--serve`'s address: `IP:PORT`, `[IPv6]:PORT`, or a bare `PORT` (on 127.0.0.1).
/// Host names are refused: what is listened on must not depend on a resolver.
pub fn parse_addr(s: &str) -> Result<SocketAddr, ServeError> {
    let err = || ServeError::Addr {
        given: s.to_owned(),
    };
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<u16>()
        .map(|port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        .map_err(|_| err())
}

/// A running server; it stops when dropped.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    hub: Arc<Hub>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// The address it listens on (with the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Open event streams never end by themselves: no graceful wait for them.
        self.task.abort();
    }
}

/// Binds `addr` now and serves `hub` on the current tokio runtime (panics outside one).
pub fn start(addr: SocketAddr, hub: Arc<Hub>) -> Result<Server, ServeError> {
    let bind_err = |source| ServeError::Bind { addr, source };
    // std's listener is close-on-exec: the emulator, launched later, does not inherit it.
    let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(bind_err)?;
    let app = http::router(hub.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            log::error!("HTTP server on {local}: {e}");
        }
    });
    Ok(Server {
        addr: local,
        hub,
        task,
    })
}

/// A command's `--serve [ADDR]`: parses the address, binds it, serves `hub` and says on
/// stderr where. Call it before the command starts anything, on the tokio runtime the command
/// runs on; keep the [`Server`] for as long as it should serve.
pub fn serve(addr: &str, hub: Arc<Hub>) -> Result<Server, ServeError> {
    let addr = parse_addr(addr)?;
    let server = start(addr, hub)?;
    crate::notice!(
        "serving http://{}/ (metrics at /metrics)",
        server.local_addr()
    );
    Ok(server)
}

/// [`serve`] for a command whose verifier tells `observers`: `hub` (of VMs) joins them.
pub fn serve_observers(
    addr: &str,
    hub: Arc<Hub>,
    observers: &mut Observers,
) -> Result<Server, ServeError> {
    let server = serve(addr, hub)?;
    observers.push(server.hub().clone());
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_addr("127.0.0.1:0").unwrap(),
            "127.0.0.1:0".parse().unwrap()
        );
        assert_eq!(parse_addr("[::1]:9464").unwrap().port(), 9464);
        assert_eq!(parse_addr("9464").unwrap(), DEFAULT_ADDR);
        for bad in [
            "",
            "localhost:9464",
            "127.0.0.1",
            "127.0.0.1:99999",
            "1.2.3.4.5:1",
        ] {
            assert!(
                matches!(parse_addr(bad), Err(ServeError::Addr { .. })),
                "{bad}"
            );
        }
    }
}
