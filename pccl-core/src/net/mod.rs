//! The net layer: how bytes get between two processes. Every connection
//! kind of the library (control connections to the master, p2p data
//! connections, shared-state transfers) is dialed, accepted and driven
//! through the traits of this module; no module outside `net/` names a
//! socket type, a raw file descriptor or a socket syscall
//! (`pccl-core/tests/layers.rs` checks it).
//!
//! # What lives here
//!
//! - [`Transport`]: dials a [`Conn`] and binds a [`Listener`] (with the
//!   library's port fallback). A transport value carries its tuning, so
//!   dialed and accepted connections are configured alike.
//! - [`Listener`]: accepts connections, tuned like dialed ones.
//! - [`Conn`]: a reliable, ordered, bidirectional byte stream (tokio's
//!   [`AsyncRead`] + [`AsyncWrite`]) that splits into a receive half and a
//!   [`SendHalf`].
//! - [`SendHalf`]: sends a data frame (header and payload) as one write,
//!   aborts the stream synchronously (so a receiver never mistakes a
//!   truncated frame for a whole one), and writes control frames from a
//!   thread outside any runtime (the control writer thread,
//!   `comm::liveness`).
//! - `frame`: the transport-agnostic framing every connection starts with
//!   and control connections carry: the greeting ([`read_hello`],
//!   [`write_hello`]) and length-prefixed control frames
//!   ([`read_control_frame`]). Data frames are a [`crate::wire::DataHeader`]
//!   and a payload, read with [`AsyncRead`] so the p2p layer can land them in
//!   place.
//! - [`spawn_accept_loop`]: the accept loop of every listener.
//! - `tcp/`: the TCP implementation ([`tcp::Tcp`]): `socket2` tuning
//!   (no-delay, keepalive, buffer sizes, congestion control), listeners
//!   that bump to the next free port, and the vectored `sendmsg` data path.
//! - `mem.rs` (tests only): an in-memory transport over `tokio::io::duplex`
//!   pipes, on which the p2p data plane and the master driver are tested
//!   too, so the layers above are known to depend on the traits alone.
//!
//! [`Net`] names the transport the library runs on, and the aliases after
//! it its types. The layers above are generic over these traits where a
//! connection is handled ([`Conn`], [`SendHalf`], [`Listener`]) and hold
//! the aliases where a connection is stored, so every call is static (no
//! `dyn`, no boxing on the data path): the transport is chosen at compile
//! time, in one line.
//!
//! # What it may import
//!
//! `wire` (the greeting and the control-frame length bound), std, tokio,
//! `socket2` and `libc`. Nothing of the peer or master side.
//!
//! # How other transports fit
//!
//! - **TLS over TCP** (e.g. `tokio-rustls`): a `Transport` whose `dial`
//!   dials [`tcp::Tcp`] and runs the client handshake, and whose listener
//!   wraps a TCP listener and runs the server handshake in `accept`. The TLS
//!   stream is `AsyncRead + AsyncWrite`; its halves come from
//!   `tokio::io::split`. `send_frame` writes header and payload through the
//!   TLS writer (one record when they fit), `abort` shuts the underlying TCP
//!   socket down, and `send_blocking` writes through a lock shared with the
//!   async half (TLS records must not interleave).
//! - **QUIC** (`quinn`, streams on one UDP socket): the transport owns one
//!   `quinn::Endpoint` for both directions; `dial` opens a connection (or
//!   reuses the one to that address) and a bidirectional stream, the
//!   listener accepts connections and their streams, so each `Conn` is one
//!   QUIC stream and a pool of connections to a neighbour is a pool of
//!   streams on one connection. `RecvStream`/`SendStream` are tokio
//!   `AsyncRead`/`AsyncWrite` already; `send_frame` is a `write_all_chunks`
//!   of header and payload, `abort` is `SendStream::reset` plus
//!   `RecvStream::stop` (the peer sees the stream end at once), and
//!   `send_blocking` hands the frame to the endpoint's driver and waits for
//!   its write to complete. Keepalive and congestion control are the QUIC
//!   transport config's, set where the transport is built.

mod frame;
#[cfg(test)]
pub(crate) mod mem;
pub mod tcp;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

pub use frame::{read_control_frame, read_hello, write_hello, FrameError};

/// The transport the library runs on.
pub type Net = tcp::Tcp;
/// A listener of [`Net`].
pub type NetListener = <Net as Transport>::Listener;
/// A connection of [`Net`].
pub type NetConn = <Net as Transport>::Conn;
/// The receive half of a [`NetConn`].
pub type NetRecvHalf = <NetConn as Conn>::RecvHalf;
/// The send half of a [`NetConn`].
pub type NetSendHalf = <NetConn as Conn>::SendHalf;

/// Dials connections and binds listeners.
pub trait Transport: Clone + Send + Sync + 'static {
    type Conn: Conn;
    type Listener: Listener<Conn = Self::Conn>;

    /// Binds a listener on `ip:port`, trying `port+1`, `port+2`, ... up to
    /// `attempts` ports when taken; port 0 asks for any free port. Must be
    /// called within a tokio runtime.
    fn listen(&self, ip: IpAddr, port: u16, attempts: u16) -> io::Result<Self::Listener>;

    /// Binds exactly `addr` (no fallback: a taken address fails with
    /// `AddrInUse`). Must be called within a tokio runtime.
    fn listen_exact(&self, addr: SocketAddr) -> io::Result<Self::Listener>;

    /// Connects to `addr` within `timeout` (`TimedOut` after it).
    fn dial(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> impl Future<Output = io::Result<Self::Conn>> + Send;
}

/// Accepts connections.
pub trait Listener: Send + Sync + 'static {
    type Conn: Conn;

    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// The next connection and the address it came from, tuned like a
    /// dialed one. Cancel-safe: dropping the future loses no connection.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Conn, SocketAddr)>> + Send;
}

/// One connection: a reliable, ordered byte stream in both directions.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static {
    type RecvHalf: AsyncRead + Unpin + Send + Sync + 'static;
    type SendHalf: SendHalf;

    /// The local address of the connection (what the master reports back
    /// to a peer as the address it saw).
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// Splits the connection into halves that can be used from different
    /// tasks (and the send half from a plain thread, see [`SendHalf`]).
    fn into_halves(self) -> (Self::RecvHalf, Self::SendHalf);
}

/// The sending half of a connection. Every method takes `&mut self`, so an
/// implementation needs no locking of its own (the caller serializes: the
/// p2p pools hold each half under a lock, the control writer thread owns
/// its half).
pub trait SendHalf: AsyncWrite + Unpin + Send + Sync + 'static {
    /// Writes `header ++ payload` as one frame, with as few system calls as
    /// the transport allows (one, normally), so a frame leaves as one
    /// stream of segments instead of a lone header and then the payload.
    /// Never raises `SIGPIPE`. A future dropped half-way leaves a
    /// truncated frame: call [`abort`](Self::abort) then.
    fn send_frame(
        &mut self,
        header: &[u8],
        payload: &[u8],
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Ends the connection now, synchronously and in both directions: the
    /// receiver sees the stream end rather than whatever would follow a
    /// truncated frame. The half stays valid (later writes fail).
    fn abort(&mut self);

    /// Writes all of `buf` from a thread outside any runtime, blocking.
    /// While the transport cannot take more, waits in steps of at most
    /// `step` and asks `give_up` between them. Returns `Ok(false)` when it
    /// gave up with part of `buf` unwritten. Never raises `SIGPIPE`.
    fn send_blocking(
        &mut self,
        buf: &[u8],
        step: Duration,
        give_up: &dyn Fn() -> bool,
    ) -> io::Result<bool>;
}

/// Accepts connections on `listener` until `stop`, handing each to `on_conn`
/// in its own task. Accept errors (e.g. out of descriptors) are logged and
/// retried after a short pause.
pub fn spawn_accept_loop<L, F, Fut>(
    listener: L,
    stop: CancellationToken,
    what: &'static str,
    on_conn: F,
) where
    L: Listener,
    F: Fn(L::Conn, SocketAddr) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok((conn, remote)) => {
                        tokio::spawn(on_conn(conn, remote));
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

/// A connected pair on loopback: (dialed, accepted).
#[cfg(test)]
pub(crate) async fn loopback_pair<T: Transport>(t: &T) -> (T::Conn, T::Conn) {
    let l = t
        .listen(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0, 1)
        .expect("listen on loopback");
    let addr = l.local_addr().expect("local addr");
    let (dialed, accepted) = tokio::join!(t.dial(addr, Duration::from_secs(5)), l.accept());
    (dialed.expect("dial"), accepted.expect("accept").0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// The trait surface end to end on [`Net`]: greeting, a control frame,
    /// a data frame, and an abort the other end sees as the stream's end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_cross_a_connection_and_abort_ends_it() {
        let net = Net::default();
        let (a, mut b) = loopback_pair(&net).await;
        let hello = crate::wire::Hello {
            kind: crate::wire::ConnKind::P2pData,
            from: crate::wire::PeerId([1; 16]),
            to: crate::wire::PeerId([2; 16]),
        };
        let (_ra, mut wa) = a.into_halves();
        write_hello(&mut wa, &hello).await.unwrap();
        assert_eq!(
            read_hello(&mut b, Duration::from_secs(5)).await.unwrap(),
            hello
        );
        let frame = crate::wire::PeerMsg::Heartbeat.to_frame();
        assert!(wa
            .send_blocking(&frame, Duration::from_millis(10), &|| false)
            .unwrap());
        let body = read_control_frame(&mut b).await.unwrap();
        assert_eq!(
            crate::wire::PeerMsg::decode(&body).unwrap(),
            crate::wire::PeerMsg::Heartbeat
        );
        let payload: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        wa.send_frame(b"head", &payload).await.unwrap();
        let mut got = vec![0u8; 4 + payload.len()];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..4], b"head");
        assert!(got[4..] == payload[..]);
        wa.abort();
        let mut rest = Vec::new();
        assert_eq!(b.read_to_end(&mut rest).await.unwrap_or(0), 0);
    }
}
