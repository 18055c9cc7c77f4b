//! TCP, the first implementation of the [`crate::net`] traits: [`Tcp`]
//! dials and binds; its listener ([`TcpAcceptor`]) tunes what it accepts;
//! a connection is a tokio `TcpStream`, split into its owned halves, whose
//! send half implements [`super::SendHalf`] with the vectored `sendmsg` path
//! (`send.rs`). Socket options are in `tuning.rs`.
//!
//! The free functions ([`bind_listener`], [`bind_one`], [`dial`]) are the
//! same operations on std/tokio types, kept for the compatibility module
//! `transport` at the crate root.

mod send;
mod tuning;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

pub use tuning::{CongestionControl, SocketTuning, CONGESTION_ENV};

use super::{Conn, Listener, Transport};

/// TCP with the given socket tuning, applied to every connection it dials
/// or accepts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tcp {
    pub tuning: SocketTuning,
}

impl Tcp {
    pub fn new(tuning: SocketTuning) -> Self {
        Tcp { tuning }
    }
}

impl Transport for Tcp {
    type Conn = TcpStream;
    type Listener = TcpAcceptor;

    fn listen(&self, ip: IpAddr, port: u16, attempts: u16) -> io::Result<TcpAcceptor> {
        TcpAcceptor::from_std(bind_listener(ip, port, attempts)?, self.tuning)
    }

    fn listen_exact(&self, addr: SocketAddr) -> io::Result<TcpAcceptor> {
        TcpAcceptor::from_std(bind_one(addr)?, self.tuning)
    }

    fn dial(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> impl Future<Output = io::Result<TcpStream>> + Send {
        dial(addr, timeout, self.tuning)
    }
}

/// A TCP listener that tunes every connection it accepts.
#[derive(Debug)]
pub struct TcpAcceptor {
    inner: tokio::net::TcpListener,
    tuning: SocketTuning,
}

impl TcpAcceptor {
    fn from_std(l: std::net::TcpListener, tuning: SocketTuning) -> io::Result<Self> {
        Ok(TcpAcceptor {
            inner: tokio::net::TcpListener::from_std(l)?,
            tuning,
        })
    }
}

impl Listener for TcpAcceptor {
    type Conn = TcpStream;

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (s, remote) = self.inner.accept().await?;
        self.tuning.apply(&s);
        Ok((s, remote))
    }
}

impl Conn for TcpStream {
    type RecvHalf = OwnedReadHalf;
    type SendHalf = OwnedWriteHalf;

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpStream::local_addr(self)
    }

    fn into_halves(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        self.into_split()
    }
}

/// Binds a listener on `ip:port`, trying `port+1`, `port+2`, ... up to
/// `attempts` ports when taken. Port 0 asks the kernel for a free one.
pub fn bind_listener(ip: IpAddr, port: u16, attempts: u16) -> io::Result<std::net::TcpListener> {
    let attempts = if port == 0 { 1 } else { attempts.max(1) };
    let mut last_err = None;
    for i in 0..attempts {
        let Some(p) = port.checked_add(i) else { break };
        match bind_one(SocketAddr::new(ip, p)) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::new(io::ErrorKind::AddrInUse, "no free port")))
}

/// Binds exactly `addr` (no bumping): `SO_REUSEADDR` so a restart is not
/// blocked by TIME_WAIT, but never `SO_REUSEPORT`, so a second listener on
/// the same port fails.
pub fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        let _ = sock.set_only_v6(false);
    }
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Dials `addr` within `timeout` and tunes the socket.
pub async fn dial(
    addr: SocketAddr,
    timeout: Duration,
    tuning: SocketTuning,
) -> io::Result<TcpStream> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out"),
            )
        })??;
    tuning.apply(&s);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_ports_are_bumped_upward_and_exact_binds_fail() {
        let first = bind_listener("127.0.0.1".parse().unwrap(), 0, 1).unwrap();
        let port = first.local_addr().unwrap().port();
        // Starting at a taken port finds the next free one.
        let second = bind_listener("127.0.0.1".parse().unwrap(), port, 16).unwrap();
        assert!(second.local_addr().unwrap().port() > port);
        // Binding exactly a taken port (as the master does) fails.
        let e = bind_one(SocketAddr::new("127.0.0.1".parse().unwrap(), port)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    }

    #[tokio::test]
    async fn accepted_and_dialed_connections_are_tuned() {
        let tcp = Tcp::default();
        let (dialed, accepted) = crate::net::loopback_pair(&tcp).await;
        assert!(dialed.nodelay().unwrap());
        assert!(accepted.nodelay().unwrap());
        assert!(socket2::SockRef::from(&accepted).keepalive().unwrap());
    }
}
