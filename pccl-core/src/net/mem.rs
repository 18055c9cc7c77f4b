//! An in-memory transport for tests: connections are `tokio::io::duplex`
//! pipes, addresses are loopback ports in a shared hub. It shows that the
//! layers above run on any implementation of the traits, not only TCP
//! (and lets their tests run without sockets).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

use super::{Conn, Listener, SendHalf, Transport};

/// Bytes a pipe buffers in each direction.
const PIPE_BYTES: usize = 256 << 10;

type Backlog = mpsc::UnboundedSender<(MemConn, SocketAddr)>;

/// The hub: listeners by port. Clones share it.
#[derive(Clone, Default)]
pub(crate) struct Mem {
    listeners: Arc<Mutex<HashMap<u16, Backlog>>>,
    next_port: Arc<AtomicU16>,
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

impl Mem {
    fn free_port(&self) -> u16 {
        10_000 + self.next_port.fetch_add(1, Ordering::Relaxed)
    }

    fn bind(&self, port: u16) -> io::Result<MemListener> {
        let mut ls = self
            .listeners
            .lock()
            .map_err(|_| io::Error::other("hub poisoned"))?;
        if ls.get(&port).is_some_and(|b| !b.is_closed()) {
            return Err(io::ErrorKind::AddrInUse.into());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        ls.insert(port, tx);
        Ok(MemListener {
            local: addr(port),
            backlog: tokio::sync::Mutex::new(rx),
        })
    }
}

impl Transport for Mem {
    type Conn = MemConn;
    type Listener = MemListener;

    fn listen(&self, _ip: IpAddr, port: u16, attempts: u16) -> io::Result<MemListener> {
        if port == 0 {
            return self.bind(self.free_port());
        }
        let mut last = io::Error::from(io::ErrorKind::AddrInUse);
        for p in (0..attempts.max(1)).filter_map(|i| port.checked_add(i)) {
            match self.bind(p) {
                Ok(l) => return Ok(l),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn listen_exact(&self, a: SocketAddr) -> io::Result<MemListener> {
        self.bind(a.port())
    }

    fn dial(
        &self,
        to: SocketAddr,
        _timeout: Duration,
    ) -> impl Future<Output = io::Result<MemConn>> + Send {
        let backlog = self
            .listeners
            .lock()
            .ok()
            .and_then(|ls| ls.get(&to.port()).cloned());
        let local = addr(self.free_port());
        async move {
            let backlog = backlog.ok_or(io::ErrorKind::ConnectionRefused)?;
            let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
            backlog
                .send((
                    MemConn {
                        io: theirs,
                        local: to,
                    },
                    local,
                ))
                .map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused))?;
            Ok(MemConn { io: ours, local })
        }
    }
}

pub(crate) struct MemListener {
    local: SocketAddr,
    backlog: tokio::sync::Mutex<mpsc::UnboundedReceiver<(MemConn, SocketAddr)>>,
}

impl Listener for MemListener {
    type Conn = MemConn;

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    async fn accept(&self) -> io::Result<(MemConn, SocketAddr)> {
        let mut rx = self.backlog.lock().await;
        rx.recv()
            .await
            .ok_or_else(|| io::ErrorKind::ConnectionAborted.into())
    }
}

/// One end of a pipe.
pub(crate) struct MemConn {
    io: DuplexStream,
    local: SocketAddr,
}

impl AsyncRead for MemConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for MemConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Conn for MemConn {
    type RecvHalf = ReadHalf<DuplexStream>;
    type SendHalf = MemSend;

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn into_halves(self) -> (Self::RecvHalf, MemSend) {
        let (r, w) = tokio::io::split(self.io);
        (r, MemSend(w))
    }
}

/// The send half of a pipe.
pub(crate) struct MemSend(WriteHalf<DuplexStream>);

impl AsyncWrite for MemSend {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl SendHalf for MemSend {
    async fn send_frame(&mut self, header: &[u8], payload: &[u8]) -> io::Result<()> {
        self.0.write_all(header).await?;
        self.0.write_all(payload).await
    }

    fn abort(&mut self) {
        // A pipe's shutdown completes at once (unless the read half holds
        // the split lock this very moment: good enough for tests).
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let _ = Pin::new(&mut self.0).poll_shutdown(&mut cx);
    }

    fn send_blocking(
        &mut self,
        buf: &[u8],
        _step: Duration,
        _give_up: &dyn Fn() -> bool,
    ) -> io::Result<bool> {
        // Pipes need no reactor: a private current-thread runtime drives the write.
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        rt.block_on(self.0.write_all(buf))?;
        Ok(true)
    }
}
