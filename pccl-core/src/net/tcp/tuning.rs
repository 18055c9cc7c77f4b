//! Socket options of every TCP connection, dialed or accepted: no-delay,
//! keepalive, explicit buffer sizes and the congestion-control algorithm.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

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

#[cfg(test)]
mod tests {
    use super::*;

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
