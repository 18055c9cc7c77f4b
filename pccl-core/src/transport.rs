//! TCP plumbing shared by the master and the peers: socket tuning, listeners
//! that bump to the next free port, dialing with a deadline, greetings and
//! control-frame I/O.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wire::{check_control_len, Hello, WireError};

/// Socket options applied to every TCP connection, dialed or accepted.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketTuning {
    /// Explicit `SO_SNDBUF`/`SO_RCVBUF`. `None` keeps kernel autotuning,
    /// which grows up to `net.ipv4.tcp_{w,r}mem` max; an explicit size turns
    /// autotuning off and is capped by `net.core.{w,r}mem_max`.
    pub buffer_bytes: Option<usize>,
    /// TCP congestion control (`TCP_CONGESTION`, Linux) for every data
    /// connection, e.g. `bbr` or `cubic`. `None` keeps the system default.
    /// Unprivileged processes may only pick algorithms listed in
    /// `net.ipv4.tcp_allowed_congestion_control`.
    pub congestion: Option<CongestionControl>,
}

/// A congestion-control algorithm name as the kernel takes it (at most 15
/// bytes of `[A-Za-z0-9_-]`). Stored inline so tuning stays `Copy`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CongestionControl {
    name: [u8; 16],
    len: u8,
}

impl CongestionControl {
    /// Checks and stores `name`.
    pub fn new(name: &str) -> Result<Self, String> {
        let ok = !name.is_empty()
            && name.len() < 16
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(format!(
                "'{name}' is not a TCP congestion control name (1-15 of [A-Za-z0-9_-])"
            ));
        }
        let mut buf = [0u8; 16];
        buf[..name.len()].copy_from_slice(name.as_bytes());
        Ok(CongestionControl {
            name: buf,
            len: name.len() as u8,
        })
    }

    /// From the `PCCL_TCP_CONGESTION` environment variable, if set and valid.
    pub fn from_env() -> Option<Self> {
        let v = std::env::var(CONGESTION_ENV).ok()?;
        match Self::new(v.trim()) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!("ignoring {CONGESTION_ENV}: {e}");
                None
            }
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.name[..self.len as usize]).unwrap_or("")
    }
}

impl std::fmt::Debug for CongestionControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Environment variable that picks the congestion control of data connections.
pub const CONGESTION_ENV: &str = "PCCL_TCP_CONGESTION";

impl SocketTuning {
    /// No-delay, keepalive and the configured buffers. Failures are logged,
    /// not fatal: a connection without tuning still works.
    pub fn apply(&self, s: &TcpStream) {
        if let Err(e) = s.set_nodelay(true) {
            tracing::warn!("could not set TCP_NODELAY: {e}");
        }
        let sock = SockRef::from(s);
        let ka = TcpKeepalive::new()
            .with_time(Duration::from_secs(10))
            .with_interval(Duration::from_secs(2))
            .with_retries(3);
        if let Err(e) = sock.set_tcp_keepalive(&ka) {
            tracing::debug!("could not enable keepalive: {e}");
        }
        if let Some(n) = self.buffer_bytes {
            let _ = sock.set_send_buffer_size(n);
            let _ = sock.set_recv_buffer_size(n);
        }
        if let Some(cc) = self.congestion {
            set_congestion(&sock, cc);
        }
    }
}

#[cfg(target_os = "linux")]
fn set_congestion(sock: &SockRef<'_>, cc: CongestionControl) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = sock.set_tcp_congestion(cc.as_str().as_bytes()) {
        // Once per process: the same refusal would repeat for every socket.
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "could not set TCP congestion control '{}': {e} (unprivileged processes may \
                 only use net.ipv4.tcp_allowed_congestion_control)",
                cc.as_str()
            );
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn set_congestion(_sock: &SockRef<'_>, cc: CongestionControl) {
    tracing::debug!(
        "TCP congestion control '{}' is only settable on Linux",
        cc.as_str()
    );
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

/// Accepts connections on `listener` until `stop`, handing each to `on_conn`
/// in its own task. Accept errors (e.g. out of descriptors) are logged and
/// retried after a short pause.
pub fn spawn_accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    stop: tokio_util::sync::CancellationToken,
    what: &'static str,
    on_conn: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok((stream, remote)) => {
                        tokio::spawn(on_conn(stream, remote));
                    }
                    Err(e) => {
                        tracing::warn!("{what} accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
    });
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

/// Errors of framed I/O.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("malformed: {0}")]
    Wire(#[from] WireError),
    #[error("connection closed")]
    Closed,
    #[error("timed out")]
    TimedOut,
}

/// Reads a greeting within `timeout`.
pub async fn read_hello<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> Result<Hello, FrameError> {
    let mut b = [0u8; Hello::LEN];
    match tokio::time::timeout(timeout, r.read_exact(&mut b)).await {
        Err(_) => Err(FrameError::TimedOut),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(FrameError::Closed),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(_)) => Ok(Hello::decode(&b)?),
    }
}

pub async fn write_hello<W: AsyncWrite + Unpin>(w: &mut W, h: &Hello) -> io::Result<()> {
    w.write_all(&h.encode()).await
}

/// Reads one control frame body (type + payload). A clean EOF between frames
/// is [`FrameError::Closed`].
pub async fn read_control_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let n = check_control_len(u32::from_le_bytes(len))?;
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).await?;
    Ok(body)
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

    #[test]
    fn congestion_names_are_checked() {
        assert_eq!(CongestionControl::new("cubic").unwrap().as_str(), "cubic");
        for bad in ["", "a name", "sixteen_chars_xx", "bbr\0", "é"] {
            assert!(CongestionControl::new(bad).is_err(), "{bad:?}");
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn congestion_control_is_applied_to_both_ends() {
        // `reno` is always built in and always allowed.
        let tuning = SocketTuning {
            congestion: Some(CongestionControl::new("reno").unwrap()),
            ..SocketTuning::default()
        };
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (dialed, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        let (dialed, (accepted, _)) = (dialed.unwrap(), accepted.unwrap());
        for s in [&dialed, &accepted] {
            tuning.apply(s);
            let got = SockRef::from(s).tcp_congestion().unwrap();
            assert_eq!(got.split(|b| *b == 0).next().unwrap(), b"reno");
            assert!(s.nodelay().unwrap());
        }
    }
}
