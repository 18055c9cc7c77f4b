//! Peer-to-peer data plane: the listener that accepts ring connections from
//! left neighbours, the reader tasks that route received frames to running
//! operations by op id, and the pools of outgoing connections to right
//! neighbours over which operations stripe their frames.
//!
//! Generic over the [`Transport`] (by default [`Net`]): connections are
//! dialed, accepted, framed and aborted through the `net` traits only.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::bufpool::{BufPool, PooledBuf};
use crate::collectives::Landing;
use crate::error::{Error, Result};
use crate::net::{self, Conn, Net, NetSendHalf, SendHalf, Transport};
use crate::wire::{ConnKind, DataHeader, Hello, PeerId};

/// Capacity of an operation's inbound frame queue (backpressure on readers).
pub(crate) const INBOX_CAPACITY: usize = 256;
/// How long a reader holds a frame for an op the master has not announced yet.
const EARLY_FRAME_WAIT: Duration = Duration::from_secs(30);

/// A received data frame.
pub struct Frame {
    /// The peer that sent it.
    pub from: PeerId,
    pub header: DataHeader,
    /// Empty when the reader landed a raw payload in the op's buffer; for a
    /// landed quantized frame, the encoded bytes (already decoded there).
    pub payload: PooledBuf,
    /// Whether the frame's values were written straight into the op's result buffer.
    pub landed: bool,
}

/// What a reader delivers to a running operation.
pub struct OpRoute {
    /// Peers whose frames the op accepts (for the ring: the left neighbour).
    pub sources: Vec<PeerId>,
    /// Peers the op sends to (for the ring: the right neighbour).
    pub sinks: Vec<PeerId>,
    pub tx: mpsc::Sender<Frame>,
    /// Cancelled when a connection the op depends on breaks.
    pub lost: CancellationToken,
    pub lost_reason: Arc<Mutex<Option<String>>>,
    /// Where readers may write all-gather payloads directly (set by the ring).
    pub landing: std::sync::OnceLock<Arc<Landing>>,
}

impl OpRoute {
    pub fn new(sources: Vec<PeerId>, sinks: Vec<PeerId>, tx: mpsc::Sender<Frame>) -> Self {
        OpRoute {
            sources,
            sinks,
            tx,
            lost: CancellationToken::new(),
            lost_reason: Arc::new(Mutex::new(None)),
            landing: std::sync::OnceLock::new(),
        }
    }

    pub(crate) fn set_landing(&self, landing: Arc<Landing>) {
        let _ = self.landing.set(landing);
    }

    fn fail(&self, reason: String) {
        if let Ok(mut r) = self.lost_reason.lock() {
            r.get_or_insert(reason);
        }
        self.lost.cancel();
    }
}

/// The send half of a connection of transport `T`.
type SendHalfOf<T> = <<T as Transport>::Conn as Conn>::SendHalf;

/// One outgoing data connection.
pub struct OutConn<W: SendHalf = NetSendHalf> {
    /// The peer at the other end.
    peer: PeerId,
    writer: tokio::sync::Mutex<W>,
    broken: AtomicBool,
    closed: CancellationToken,
}

/// Holds a connection's writer for one frame and marks the connection
/// broken if the write is abandoned half-way, so no later frame is written
/// after a truncated one.
struct WriteGuard<'a, W: SendHalf> {
    conn: &'a OutConn<W>,
    writer: tokio::sync::MutexGuard<'a, W>,
    done: bool,
}

impl<W: SendHalf> Drop for WriteGuard<'_, W> {
    fn drop(&mut self) {
        if !self.done {
            self.conn.broken.store(true, Ordering::SeqCst);
            self.conn.closed.cancel();
            // The receiver must see the stream end now, not a truncated frame
            // followed by whatever the next op writes.
            self.writer.abort();
        }
    }
}

impl<W: SendHalf> OutConn<W> {
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Writes one whole frame; the connection is shared frame by frame
    /// between concurrent operations.
    pub async fn write_frame(&self, header: &[u8], payload: &[u8]) -> io::Result<()> {
        let writer = self.writer.lock().await;
        if self.is_broken() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection marked broken",
            ));
        }
        let mut guard = WriteGuard {
            conn: self,
            writer,
            done: false,
        };
        guard.writer.send_frame(header, payload).await?;
        guard.done = true;
        Ok(())
    }
}

/// The pool of connections to one right neighbour.
pub struct OutPool<W: SendHalf = NetSendHalf> {
    pub conns: Vec<Arc<OutConn<W>>>,
}

impl<W: SendHalf> OutPool<W> {
    pub fn healthy(&self) -> bool {
        !self.conns.is_empty() && self.conns.iter().all(|c| !c.is_broken())
    }
}

impl<W: SendHalf> Drop for OutPool<W> {
    fn drop(&mut self) {
        for c in &self.conns {
            c.closed.cancel();
        }
    }
}

/// The data plane of one communicator.
pub struct P2p<T: Transport = Net> {
    me: Mutex<PeerId>,
    pool_size: usize,
    /// Dials the data connections (and carries their tuning).
    net: T,
    connect_timeout: Duration,
    pub bufs: Arc<BufPool>,
    out_pools: Mutex<HashMap<PeerId, Arc<OutPool<SendHalfOf<T>>>>>,
    /// Serializes dialing so concurrent ops share one new pool.
    dial_lock: tokio::sync::Mutex<()>,
    ops: Mutex<HashMap<u64, Arc<OpRoute>>>,
    last_commenced: watch::Sender<u64>,
    shutdown: CancellationToken,
    conn_seq: AtomicU64,
    /// The in-place input copy of the last in-place op, kept for the next
    /// (allocating and faulting in a large buffer per op is costly).
    scratch: Mutex<Option<Vec<u8>>>,
    /// Data bytes received per ring peer, reported in heartbeats.
    pub(crate) rx_progress: Arc<super::liveness::RxProgress>,
}

impl<T: Transport> P2p<T> {
    pub fn new(
        pool_size: usize,
        net: T,
        connect_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(P2p {
            me: Mutex::new(PeerId::default()),
            pool_size: pool_size.max(1),
            net,
            connect_timeout,
            bufs: BufPool::new(),
            out_pools: Mutex::new(HashMap::new()),
            dial_lock: tokio::sync::Mutex::new(()),
            ops: Mutex::new(HashMap::new()),
            last_commenced: watch::channel(0).0,
            shutdown,
            conn_seq: AtomicU64::new(0),
            scratch: Mutex::new(None),
            rx_progress: Arc::default(),
        })
    }

    /// A buffer of at least `len` bytes (contents unspecified).
    pub fn take_scratch(&self, len: usize) -> Vec<u8> {
        let cached = self.scratch.lock().ok().and_then(|mut s| s.take());
        match cached {
            Some(v) if v.len() >= len => v,
            // Zeroed pages from the allocator; the caller overwrites them.
            _ => vec![0u8; len],
        }
    }

    /// Keeps `buf` for the next in-place op (the larger of it and the cached one).
    pub fn put_scratch(&self, buf: Vec<u8>) {
        if let Ok(mut s) = self.scratch.lock() {
            if s.as_ref().is_none_or(|cur| cur.len() < buf.len()) {
                *s = Some(buf);
            }
        }
    }

    pub fn set_me(&self, id: PeerId) {
        if let Ok(mut me) = self.me.lock() {
            *me = id;
        }
    }

    pub fn me(&self) -> PeerId {
        self.me.lock().map(|m| *m).unwrap_or_default()
    }

    /// Accepts ring connections until `stop`.
    pub fn spawn_listener<L: net::Listener>(
        self: &Arc<Self>,
        listener: L,
        stop: CancellationToken,
    ) {
        let this = self.clone();
        net::spawn_accept_loop(listener, stop, "p2p", move |conn, remote| {
            this.clone().accept_one(conn, remote)
        });
    }

    /// Greets an accepted connection (tuned by the listener) and reads its frames.
    async fn accept_one<C: Conn>(self: Arc<Self>, mut stream: C, remote: SocketAddr) {
        let me = self.me();
        let hello = match net::read_hello(&mut stream, self.connect_timeout).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(peer = %me, %remote, "refusing p2p connection: {e}");
                return;
            }
        };
        if hello.kind != ConnKind::P2pData || hello.to != me {
            tracing::warn!(peer = %me, %remote, kind = ?hello.kind, to = %hello.to,
                "refusing p2p connection not meant for this peer");
            return;
        }
        if net::write_hello(&mut stream, &hello).await.is_err() {
            return;
        }
        let (rd, _wr) = stream.into_halves();
        tracing::debug!(peer = %me, from = %hello.from, "accepted ring connection");
        let reason = self.clone().read_frames(rd, hello.from).await;
        tracing::debug!(peer = %me, from = %hello.from, "ring connection closed: {reason}");
        self.fail_ops_with(
            |r| r.sources.contains(&hello.from),
            &format!("connection from peer {} lost: {reason}", hello.from),
        );
    }

    /// Reads frames until the connection ends; returns why it ended.
    async fn read_frames<R: AsyncRead + Unpin>(self: Arc<Self>, mut rd: R, from: PeerId) -> String {
        let me = self.me();
        loop {
            let mut hb = [0u8; DataHeader::LEN];
            let r = tokio::select! {
                _ = self.shutdown.cancelled() => return "shutting down".into(),
                r = rd.read_exact(&mut hb) => r,
            };
            if let Err(e) = r {
                return if e.kind() == io::ErrorKind::UnexpectedEof {
                    "closed by peer".into()
                } else {
                    e.to_string()
                };
            }
            let header = match DataHeader::decode(&hb) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(peer = %me, from = %from, "malformed data frame ({e}); closing the connection");
                    return format!("malformed data frame: {e}");
                }
            };
            let route = match self.resolve(from, &header).await {
                Ok(r) => r,
                Err(why) => {
                    tracing::warn!(peer = %me, from = %from, "{why}; closing the connection");
                    return why;
                }
            };
            let landing = route
                .as_ref()
                .and_then(|r| r.landing.get())
                .and_then(|l| Some((l, l.target(&header)?)));
            let frame = match self.read_payload(&mut rd, from, header, landing).await {
                Ok(f) => f,
                Err(why) => return why,
            };
            let n = DataHeader::LEN as u64 + u64::from(header.payload_len);
            self.rx_progress.note(from, n);
            if let (Some(route), Some(frame)) = (route, frame) {
                // A closed inbox means the op just ended; the frame is not needed.
                let _ = route.tx.send(frame).await;
            }
        }
    }

    /// Reads a frame's payload: into a pool buffer, or, for an all-gather
    /// frame its op's landing accepted (`landing` = the landing and the
    /// frame's range in the result buffer), straight into the op's buffer
    /// (raw) or into a pool buffer decoded there (quantized). `None` when
    /// the op ended while the frame was arriving.
    async fn read_payload<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        from: PeerId,
        header: DataHeader,
        landing: Option<(&Arc<Landing>, (usize, usize))>,
    ) -> std::result::Result<Option<Frame>, String> {
        let len = header.payload_len as usize;
        let frame = |payload, landed| Frame {
            from,
            header,
            payload,
            landed,
        };
        match landing {
            Some((landing, (off, _))) if !landing.is_quantized() => {
                match read_into_landing(rd, landing, off, len, &self.bufs).await {
                    // The op only needs to hear of it.
                    Ok(true) => Ok(Some(frame(PooledBuf::empty(), true))),
                    Ok(false) => Ok(None),
                    Err(e) => Err(format!("truncated frame: {e}")),
                }
            }
            landing => {
                let mut payload = self.bufs.get(len);
                rd.read_exact(&mut payload)
                    .await
                    .map_err(|e| format!("truncated frame: {e}"))?;
                let Some((landing, (off, dst_len))) = landing else {
                    return Ok(Some(frame(payload, false)));
                };
                // Decoded here, off the op's task; the encoded bytes go on
                // to the op for forwarding.
                match landing.decode(off, dst_len, &payload) {
                    Some(Ok(())) => Ok(Some(frame(payload, true))),
                    Some(Err(e)) => {
                        tracing::warn!(peer = %self.me(), "undecodable frame ({e}); closing the connection");
                        Err(format!("undecodable frame: {e}"))
                    }
                    None => Ok(None),
                }
            }
        }
    }

    /// Finds the operation a frame belongs to (waiting briefly for its
    /// announcement); `None` for frames of finished ops.
    async fn resolve(
        &self,
        from: PeerId,
        header: &DataHeader,
    ) -> std::result::Result<Option<Arc<OpRoute>>, String> {
        let op_id = header.op_id;
        if op_id > *self.last_commenced.borrow() {
            // The left neighbour heard "commence" before we did; wait for ours.
            let mut rx = self.last_commenced.subscribe();
            let announced = tokio::time::timeout(EARLY_FRAME_WAIT, async {
                rx.wait_for(|last| *last >= op_id).await.is_ok()
            })
            .await;
            if announced != Ok(true) {
                return Err(format!("frame for op {op_id} that was never announced"));
            }
        }
        let route = self
            .ops
            .lock()
            .ok()
            .and_then(|ops| ops.get(&op_id).cloned());
        let Some(route) = route else {
            return Ok(None);
        };
        if !route.sources.contains(&from) {
            return Err(format!(
                "peer {from} sent data for op {op_id}, which takes none from it"
            ));
        }
        Ok(Some(route))
    }

    /// Registers an op before the master's "commence" is acknowledged, so its
    /// frames are routed from the first byte.
    pub fn register_op(&self, op_id: u64, route: Arc<OpRoute>) {
        if let Ok(mut ops) = self.ops.lock() {
            ops.insert(op_id, route);
        }
        self.last_commenced
            .send_modify(|last| *last = (*last).max(op_id));
    }

    pub fn unregister_op(&self, op_id: u64) {
        if let Ok(mut ops) = self.ops.lock() {
            ops.remove(&op_id);
        }
    }

    /// Marks the announcement of `op_id` as seen without routing anything to
    /// it (e.g. when the op was failed before it could start).
    pub fn note_commenced(&self, op_id: u64) {
        self.last_commenced
            .send_modify(|last| *last = (*last).max(op_id));
    }

    fn fail_ops_with(&self, pred: impl Fn(&OpRoute) -> bool, reason: &str) {
        let routes: Vec<Arc<OpRoute>> = self
            .ops
            .lock()
            .map(|ops| ops.values().filter(|r| pred(r)).cloned().collect())
            .unwrap_or_default();
        for r in routes {
            r.fail(reason.to_owned());
        }
    }

    /// Forgets pools to peers other than `keep`.
    pub fn retain_pools(&self, keep: &[PeerId]) {
        if let Ok(mut pools) = self.out_pools.lock() {
            pools.retain(|p, _| keep.contains(p));
        }
    }

    /// Returns a healthy pool to `peer` (a ring neighbour: the configured
    /// pool size), dialing `addr` if needed.
    pub async fn ensure_pool(
        self: &Arc<Self>,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Result<Arc<OutPool<SendHalfOf<T>>>> {
        self.ensure_pool_of(peer, addr, self.pool_size).await
    }

    /// Returns a healthy pool to `peer` of any size, dialing one
    /// connection if there is none: what one-hop algorithms use to reach
    /// peers that are not ring neighbours.
    pub async fn ensure_mesh_pool(
        self: &Arc<Self>,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Result<Arc<OutPool<SendHalfOf<T>>>> {
        self.ensure_pool_of(peer, addr, 1).await
    }

    async fn ensure_pool_of(
        self: &Arc<Self>,
        peer: PeerId,
        addr: SocketAddr,
        size: usize,
    ) -> Result<Arc<OutPool<SendHalfOf<T>>>> {
        if let Some(p) = self.healthy_pool(peer, size) {
            return Ok(p);
        }
        let _dialing = self.dial_lock.lock().await;
        if let Some(p) = self.healthy_pool(peer, size) {
            return Ok(p);
        }
        let me = self.me();
        let dials = (0..size).map(|_| self.dial_one(peer, addr));
        let results = futures_join_all(dials).await;
        let mut conns = Vec::with_capacity(size);
        for r in results {
            conns.push(r?);
        }
        tracing::debug!(peer = %me, to = %peer, %addr, n = conns.len(), "ring connection pool up");
        let pool = Arc::new(OutPool { conns });
        if let Ok(mut pools) = self.out_pools.lock() {
            pools.insert(peer, pool.clone());
        }
        Ok(pool)
    }

    /// A healthy pool of at least `size` connections to `peer` (a smaller
    /// one, dialed for a one-hop op, is replaced by a full one).
    fn healthy_pool(&self, peer: PeerId, size: usize) -> Option<Arc<OutPool<SendHalfOf<T>>>> {
        let mut pools = self.out_pools.lock().ok()?;
        match pools.get(&peer) {
            Some(p) if p.healthy() && p.conns.len() >= size => Some(p.clone()),
            Some(p) if p.healthy() => None,
            Some(_) => {
                pools.remove(&peer);
                None
            }
            None => None,
        }
    }

    async fn dial_one(
        self: &Arc<Self>,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Result<Arc<OutConn<SendHalfOf<T>>>> {
        let me = self.me();
        let fail = |e: String| {
            Error::RankConnectionFailed(format!("cannot connect to peer {peer} at {addr}: {e}"))
        };
        let mut s = self
            .net
            .dial(addr, self.connect_timeout)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let hello = Hello {
            kind: ConnKind::P2pData,
            from: me,
            to: peer,
        };
        net::write_hello(&mut s, &hello)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let echo = net::read_hello(&mut s, self.connect_timeout)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if echo != hello {
            return Err(fail("peer answered with a different greeting".into()));
        }
        let (mut rd, wr) = s.into_halves();
        let closed = self.shutdown.child_token();
        let conn = Arc::new(OutConn {
            peer,
            writer: tokio::sync::Mutex::new(wr),
            broken: AtomicBool::new(false),
            closed: closed.clone(),
        });
        // The acceptor never writes after the greeting: any read result means
        // the neighbour closed or died, which fails the ops sending to it.
        let this = self.clone();
        let watched = conn.clone();
        let seq = self.conn_seq.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut b = [0u8; 1];
            let why = tokio::select! {
                _ = closed.cancelled() => return,
                r = rd.read(&mut b) => match r {
                    Ok(0) => "closed by peer".to_string(),
                    Ok(_) => "unexpected bytes from the receiving side".to_string(),
                    Err(e) => e.to_string(),
                },
            };
            watched.broken.store(true, Ordering::SeqCst);
            tracing::debug!(peer = %me, to = %peer, seq, "ring connection lost: {why}");
            this.fail_ops_with(
                |r| r.sinks.contains(&peer),
                &format!("connection to peer {peer} lost: {why}"),
            );
        });
        Ok(conn)
    }
}

/// Awaits all futures concurrently (a tiny `join_all`).
async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut out = Vec::with_capacity(set.len());
    // Drive them together: poll all by awaiting a joined future.
    let joined = std::future::poll_fn(|cx| {
        let mut all_ready = true;
        for (i, f) in set.iter_mut().enumerate() {
            if out.len() <= i {
                out.push(None);
            }
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => all_ready = false,
                }
            }
        }
        if all_ready {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    });
    joined.await;
    out.into_iter().flatten().collect()
}

/// Reads a `len`-byte payload straight into the op's result buffer at
/// `off`. Each `recv` runs under the landing's lock; if the op closes its
/// landing half-way, the rest of the payload is read and discarded so the
/// stream stays framed. Returns whether the whole payload landed.
async fn read_into_landing<R: AsyncRead + Unpin>(
    rd: &mut R,
    landing: &Landing,
    off: usize,
    len: usize,
    bufs: &Arc<BufPool>,
) -> io::Result<bool> {
    use std::task::Poll;
    use tokio::io::ReadBuf;
    let mut done = 0;
    while done < len {
        let step = std::future::poll_fn(|cx| {
            let polled = landing.with_dst(off, len, |dst| {
                let mut rb = ReadBuf::new(&mut dst[done..]);
                match std::pin::Pin::new(&mut *rd).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            });
            match polled {
                Some(Poll::Ready(r)) => Poll::Ready(r.map(Some)),
                Some(Poll::Pending) => Poll::Pending,
                None => Poll::Ready(Ok(None)),
            }
        })
        .await?;
        match step {
            Some(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Some(n) => done += n,
            None => {
                // The op ended: drop the rest of this frame.
                let mut rest = bufs.get(len - done);
                rd.read_exact(&mut rest).await?;
                return Ok(false);
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::mem::Mem;
    use crate::net::Listener;
    use crate::wire::Encoding;

    /// The data plane on a transport other than TCP: a pool dialed over
    /// in-memory pipes carries a frame to the op it belongs to, and the
    /// connection's end fails the op.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_reach_their_op_over_any_transport() {
        let mem = Mem::default();
        let stop = CancellationToken::new();
        let (a, b) = (PeerId([1; 16]), PeerId([2; 16]));
        let timeout = Duration::from_secs(5);
        let sender = P2p::new(1, mem.clone(), timeout, stop.clone());
        let receiver = P2p::new(1, mem.clone(), timeout, stop.clone());
        sender.set_me(a);
        receiver.set_me(b);
        let l = mem.listen("127.0.0.1".parse().unwrap(), 0, 1).unwrap();
        let addr = l.local_addr().unwrap();
        receiver.spawn_listener(l, stop.clone());
        let (tx, mut inbox) = mpsc::channel(INBOX_CAPACITY);
        let route = Arc::new(OpRoute::new(vec![a], vec![], tx));
        receiver.register_op(7, route.clone());

        let pool = sender.ensure_pool(b, addr).await.unwrap();
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let header = DataHeader {
            op_id: 7,
            step: 0,
            encoding: Encoding::Raw,
            segment: 0,
            chunk: 0,
            elem_offset: 0,
            elems: payload.len() as u32,
            payload_len: payload.len() as u32,
        };
        pool.conns[0]
            .write_frame(&header.encode(), &payload)
            .await
            .unwrap();
        let f = tokio::time::timeout(timeout, inbox.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((f.from, f.header, f.landed), (a, header, false));
        assert!(f.payload[..] == payload[..]);

        // Dropping the sender's pool closes the pipe: the op that takes
        // frames from it fails.
        sender.retain_pools(&[]);
        drop(pool);
        tokio::time::timeout(timeout, route.lost.cancelled())
            .await
            .expect("the op did not fail when its source's connection ended");
        stop.cancel();
    }
}
