//! The holder's side of a shared-state sync: [`SharedStateServer`] accepts
//! [`ConnKind::SharedState`] connections and answers each
//! [`TensorRequest`] with a [`TensorResponseHead`] and the range's bytes
//! (codec in [`crate::wire`]), paced by an optional upload limit
//! (`UploadLimiter`, [`super::UPLOAD_LIMIT_ENV`]). A sync makes its tensors
//! available with `begin` before its vote and withdraws them with `end`.
//!
//! Imports `net`, `wire` and the shared items of [`super`]; nothing of
//! [`super::fetch`] (the fetching side). Connections arrive through a
//! [`Listener`] of any transport, tuned by it.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, RwLock};
use tokio_util::sync::CancellationToken;

use super::{nanos, parse_upload_limit, UPLOAD_LIMIT_ENV};
use crate::net::{self, Conn, Listener};
use crate::wire::{ConnKind, PeerId, TensorRequest, TensorRequestHead, TensorResponseHead};

/// How long a server waits for its own plan when a request arrives early.
const PLAN_WAIT: Duration = Duration::from_secs(10);

pub(super) struct ServedTensor {
    pub(super) ptr: usize,
    pub(super) len: usize,
    pub(super) hash: u64,
}

struct Serving {
    sync_id: u64,
    tensors: HashMap<String, ServedTensor>,
    cancel: CancellationToken,
    tx_bytes: Arc<AtomicU64>,
    serve_ns: Arc<AtomicU64>,
}

/// Paces a server's uploads to a byte rate, over all its connections
/// together: each piece reserves the next free slot of a virtual link and
/// is written when its slot begins, so there is no burst beyond one piece.
///
/// A piece is at most 10 ms of the link (one byte below 100 B/s), and a
/// connection holds at most one reservation at a time, so a connection
/// waits at most about (connections sharing the limit) x 10 ms between two
/// pieces: a fetching peer sees bytes arrive steadily, and its stall
/// deadline ([`super::DEFAULT_STALL_TIMEOUT`]) never mistakes a rate-limited
/// holder for a frozen one (that would take ~500 connections on one
/// limited holder for a 5 s deadline).
#[derive(Debug)]
struct UploadLimiter {
    bytes_per_sec: u64,
    /// When the virtual link is free again.
    next_free: Mutex<Instant>,
}

impl UploadLimiter {
    fn new(bytes_per_sec: u64) -> Self {
        UploadLimiter {
            bytes_per_sec: bytes_per_sec.max(1),
            next_free: Mutex::new(Instant::now()),
        }
    }

    /// Bytes written at once: ~10 ms worth, between 1 byte and 1 MiB (so
    /// never more than 10 ms of the link above 100 B/s, see the type's docs).
    fn piece(&self) -> usize {
        (self.bytes_per_sec / 100).clamp(1, 1 << 20) as usize
    }

    /// Reserves the link for `n` bytes; returns when they may be written.
    fn reserve(&self, n: usize) -> Instant {
        let now = Instant::now();
        let took = Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
        let Ok(mut next) = self.next_free.lock() else {
            return now;
        };
        let start = (*next).max(now);
        *next = start + took;
        start
    }

    async fn write<W: AsyncWrite + Unpin>(&self, s: &mut W, data: &[u8]) -> io::Result<()> {
        for piece in data.chunks(self.piece()) {
            tokio::time::sleep_until(self.reserve(piece.len()).into()).await;
            s.write_all(piece).await?;
        }
        Ok(())
    }
}

/// Serves this peer's shared-state tensors during a sync.
pub(crate) struct SharedStateServer {
    current: watch::Sender<u64>,
    serving: RwLock<Option<Serving>>,
    shutdown: CancellationToken,
    timeout: Duration,
    /// Deadline for the small reads and writes around a range (the rest of
    /// a request, a refusal); zero: none. Ranges themselves are not under it
    /// (see `serve_conn`).
    stall: Duration,
    me: Mutex<PeerId>,
    upload_limit: Option<UploadLimiter>,
}

/// Awaits a socket operation of the server, failing with `TimedOut` if it
/// completes nothing within `stall` (zero: no deadline).
async fn within<T>(
    stall: Duration,
    op: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    if stall.is_zero() {
        return op.await;
    }
    tokio::time::timeout(stall, op).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the fetching peer made no progress for {stall:?}"),
        ))
    })
}

impl SharedStateServer {
    /// A server; its upload limit comes from [`UPLOAD_LIMIT_ENV`].
    pub fn new(shutdown: CancellationToken, timeout: Duration, stall: Duration) -> Arc<Self> {
        let limit = match std::env::var(UPLOAD_LIMIT_ENV) {
            Ok(v) => parse_upload_limit(&v).unwrap_or_else(|e| {
                tracing::warn!("ignoring {UPLOAD_LIMIT_ENV}: {e}");
                None
            }),
            Err(_) => None,
        };
        Self::with_upload_limit(shutdown, timeout, stall, limit)
    }

    /// A server uploading at most `bytes_per_sec` (None: unlimited).
    pub fn with_upload_limit(
        shutdown: CancellationToken,
        timeout: Duration,
        stall: Duration,
        bytes_per_sec: Option<u64>,
    ) -> Arc<Self> {
        if let Some(bps) = bytes_per_sec {
            tracing::info!(bytes_per_sec = bps, "shared-state uploads are rate-limited");
        }
        Arc::new(SharedStateServer {
            current: watch::channel(0).0,
            serving: RwLock::new(None),
            shutdown,
            timeout,
            stall,
            me: Mutex::new(PeerId::default()),
            upload_limit: bytes_per_sec.map(UploadLimiter::new),
        })
    }

    pub fn set_me(&self, id: PeerId) {
        if let Ok(mut me) = self.me.lock() {
            *me = id;
        }
    }

    fn me(&self) -> PeerId {
        self.me.lock().map(|m| *m).unwrap_or_default()
    }

    /// Serves fetch requests until `stop`.
    pub fn spawn_listener<L: Listener>(self: &Arc<Self>, listener: L, stop: CancellationToken) {
        let this = self.clone();
        net::spawn_accept_loop(listener, stop, "shared-state", move |s, remote| {
            let this = this.clone();
            async move {
                let me = this.me();
                if let Err(e) = this.serve_conn(s).await {
                    tracing::debug!(peer = %me, %remote, "shared-state connection ended: {e}");
                }
            }
        });
    }

    /// Makes `tensors` available before the vote is sent.
    pub(super) async fn begin(
        &self,
        tensors: HashMap<String, ServedTensor>,
    ) -> (CancellationToken, Arc<AtomicU64>, Arc<AtomicU64>) {
        let cancel = self.shutdown.child_token();
        let tx = Arc::new(AtomicU64::new(0));
        let serve_ns = Arc::new(AtomicU64::new(0));
        *self.serving.write().await = Some(Serving {
            sync_id: 0,
            tensors,
            cancel: cancel.clone(),
            tx_bytes: tx.clone(),
            serve_ns: serve_ns.clone(),
        });
        (cancel, tx, serve_ns)
    }

    pub(super) async fn set_sync_id(&self, sync_id: u64) {
        if let Some(s) = self.serving.write().await.as_mut() {
            s.sync_id = sync_id;
        }
        self.current.send_modify(|c| *c = (*c).max(sync_id));
    }

    /// Stops serving; returns once no server task reads the tensors any more.
    pub(super) async fn end(&self, cancel: &CancellationToken) {
        cancel.cancel();
        *self.serving.write().await = None;
    }

    async fn serve_conn<C: Conn>(self: Arc<Self>, mut s: C) -> io::Result<()> {
        let me = self.me();
        let hello = net::read_hello(&mut s, self.timeout)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        if hello.kind != ConnKind::SharedState || hello.to != me {
            tracing::warn!(peer = %me, "refusing shared-state connection not meant for this peer");
            return Ok(());
        }
        net::write_hello(&mut s, &hello).await?;
        loop {
            let mut head = [0u8; TensorRequestHead::LEN];
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                r = s.read_exact(&mut head) => { r?; }
            }
            // The only refusal of a head is an oversized name.
            let Ok(head) = TensorRequestHead::decode(&head) else {
                tracing::warn!(peer = %me, from = %hello.from, "oversized tensor name in request; closing");
                return Ok(());
            };
            let mut name = vec![0u8; head.name_len];
            within(self.stall, s.read_exact(&mut name)).await?;
            let TensorRequest {
                sync_id,
                offset,
                len,
                name,
            } = head.with_name(&name);
            // A request may beat our own plan from the master by a little.
            let mut cur = self.current.subscribe();
            let _ = tokio::time::timeout(PLAN_WAIT, cur.wait_for(|c| *c >= sync_id)).await;
            let guard = self.serving.read().await;
            let found = match guard.as_ref() {
                Some(sv) if sv.sync_id == sync_id => match sv.tensors.get(&name) {
                    Some(t) => {
                        let ok = offset
                            .checked_add(len)
                            .is_some_and(|end| end <= t.len as u64);
                        if ok {
                            Ok((sv, t.hash, t.ptr, t.len))
                        } else {
                            Err(TensorResponseHead::BAD_RANGE)
                        }
                    }
                    None => Err(TensorResponseHead::UNKNOWN_TENSOR),
                },
                _ => Err(TensorResponseHead::NOT_SERVING),
            };
            let (sv, hash, ptr, tlen) = match found {
                Ok(f) => f,
                Err(status) => {
                    // A refusal is written without the serving lock, so a
                    // peer that stopped reading cannot hold up `begin` or
                    // `end` of this peer's own syncs.
                    drop(guard);
                    let resp = TensorResponseHead {
                        status,
                        hash: 0,
                        body_len: 0,
                    }
                    .encode();
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Ok(()),
                        r = within(self.stall, s.write_all(&resp)) => r?,
                    }
                    continue;
                }
            };
            debug_assert!(offset as usize + len as usize <= tlen);
            // SAFETY: the tensor stays registered (and its memory valid) while
            // we hold the read guard; `end` cancels this write before it takes
            // the write lock and lets the sync return.
            let data = unsafe {
                std::slice::from_raw_parts((ptr + offset as usize) as *const u8, len as usize)
            };
            tracing::debug!(peer = %me, to = %hello.from, tensor = %name, offset, len,
                "serving a shared-state range");
            let resp = TensorResponseHead {
                status: TensorResponseHead::OK,
                hash,
                body_len: len,
            }
            .encode();
            let t0 = Instant::now();
            // Everything written while the read guard is held, header
            // included, is cancelled by `end` (a peer that stopped reading
            // can fill the socket buffer at any byte): a frozen receiver
            // never blocks this peer's own sync. There is no progress
            // deadline here: how long a live receiver's kernel takes to make
            // room in a large send buffer is not a sign of life on this side
            // (the receiver's own stall deadline and the master's peer
            // timeout are), and the write ends with the sync anyway.
            let send = async {
                s.write_all(&resp).await?;
                match &self.upload_limit {
                    Some(limit) => limit.write(&mut s, data).await,
                    None => s.write_all(data).await,
                }
            };
            tokio::select! {
                _ = sv.cancel.cancelled() => return Ok(()),
                r = send => r?,
            }
            sv.serve_ns
                .fetch_add(nanos(t0.elapsed()), Ordering::Relaxed);
            sv.tx_bytes
                .fetch_add(len + TensorResponseHead::LEN as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::DEFAULT_STALL_TIMEOUT;
    use super::*;
    use crate::net::tcp::SocketTuning;
    use crate::net::{Net, Transport};
    use crate::wire::Hello;

    #[test]
    fn upload_limiter_paces_pieces_back_to_back() {
        // 1 MB/s: pieces of 10 kB (10 ms each) get consecutive slots, shared
        // by every caller; an idle link grants no credit for the past.
        let l = UploadLimiter::new(1_000_000);
        assert_eq!(l.piece(), 10_000);
        let t0 = Instant::now();
        let a = l.reserve(10_000);
        let b = l.reserve(10_000);
        let c = l.reserve(5_000);
        let d = l.reserve(1);
        assert!(a >= t0 && a <= Instant::now());
        assert_eq!(b - a, Duration::from_millis(10));
        assert_eq!(c - b, Duration::from_millis(10));
        assert_eq!(d - c, Duration::from_millis(5));
        // Pieces stay within [1 B, 1 MiB], and at most 10 ms of the link
        // from 100 B/s up: a slow limit never leaves a connection silent for
        // long (the fetch's stall deadline must not trip on it).
        assert_eq!(UploadLimiter::new(1).piece(), 1);
        assert_eq!(UploadLimiter::new(10_000_000_000).piece(), 1 << 20);
        for bps in [
            100,
            1_000,
            4_095,
            50_000,
            409_600,
            1 << 20,
            100 << 20,
            1 << 30,
        ] {
            let l = UploadLimiter::new(bps);
            let slot = Duration::from_secs_f64(l.piece() as f64 / bps as f64);
            assert!(slot <= Duration::from_millis(10), "{bps} B/s: {slot:?}");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn upload_limiter_holds_the_rate_on_a_socket() {
        let (mut s, mut r) = net::loopback_pair(&Net::default()).await;
        let reader = tokio::spawn(async move {
            let mut buf = Vec::new();
            r.read_to_end(&mut buf).await.unwrap();
            buf
        });
        // 200 kB at 1 MB/s: at least ~190 ms (the first piece goes at once).
        let limiter = UploadLimiter::new(1_000_000);
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let t0 = Instant::now();
        limiter.write(&mut s, &data).await.unwrap();
        let took = t0.elapsed();
        drop(s);
        assert_eq!(reader.await.unwrap(), data);
        assert!(took >= Duration::from_millis(185), "took {took:?}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }

    fn peer(b: u8) -> PeerId {
        PeerId([b; 16])
    }

    /// A fetching peer pipelines requests for `range`-byte ranges and never
    /// reads: the holder's writes fill the socket buffers and block. Ending
    /// the sync must not wait for them, and the next sync must begin.
    async fn receiver_stops_reading(range: u64, tuning: SocketTuning) {
        let data = vec![5u8; 64 << 20];
        let server = SharedStateServer::with_upload_limit(
            CancellationToken::new(),
            Duration::from_secs(5),
            DEFAULT_STALL_TIMEOUT,
            None,
        );
        server.set_me(peer(2));
        // The holder's connections carry `tuning` (small buffers: it blocks
        // sooner), and so does the fetching side's.
        let net = Net::new(tuning);
        let l = net.listen("127.0.0.1".parse().unwrap(), 0, 1).unwrap();
        let addr = l.local_addr().unwrap();
        server.spawn_listener(l, CancellationToken::new());
        let served = HashMap::from([(
            "w".to_string(),
            ServedTensor {
                ptr: data.as_ptr() as usize,
                len: data.len(),
                hash: 1,
            },
        )]);
        let (cancel, tx, _) = server.begin(served).await;
        server.set_sync_id(7).await;
        let mut s = net.dial(addr, Duration::from_secs(5)).await.unwrap();
        let hello = Hello {
            kind: ConnKind::SharedState,
            from: peer(0),
            to: peer(2),
        };
        net::write_hello(&mut s, &hello).await.unwrap();
        net::read_hello(&mut s, Duration::from_secs(5))
            .await
            .unwrap();
        let (_rd, mut wr) = s.into_halves();
        // Requests go out until the holder stops reading them.
        let writer = tokio::spawn(async move {
            for k in 0.. {
                let mut req = Vec::new();
                for j in 0..64u64 {
                    let r = TensorRequest {
                        sync_id: 7,
                        offset: ((k * 64 + j) * range) % (64 << 20),
                        len: range,
                        name: "w".into(),
                    };
                    req.extend_from_slice(&r.encode());
                }
                if wr.write_all(&req).await.is_err() {
                    return;
                }
            }
        });
        // Let the holder fill the buffers and block: wait until it has
        // served nothing more for half a second (the kernel may still take
        // a few small writes while it compacts a tiny receive buffer).
        let (mut last, mut still) = (u64::MAX, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while still < 5 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let served = tx.load(Ordering::Relaxed);
            if served == last {
                still += 1;
            } else {
                (last, still) = (served, 0);
            }
        }
        let t0 = Instant::now();
        tokio::time::timeout(Duration::from_secs(2), server.end(&cancel))
            .await
            .expect("ending the sync waited for a receiver that stopped reading");
        let (next, _, _) =
            tokio::time::timeout(Duration::from_secs(2), server.begin(HashMap::new()))
                .await
                .expect("the next sync could not begin");
        server.end(&next).await;
        assert!(t0.elapsed() < Duration::from_secs(2));
        writer.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receiver_that_stops_reading_does_not_hold_up_the_holder() {
        // Blocked inside 4 MiB ranges.
        receiver_stops_reading(4 << 20, SocketTuning::default()).await;
        // Empty ranges and small buffers: blocked on writing response heads.
        let small = SocketTuning {
            buffer_bytes: Some(4096),
            ..SocketTuning::default()
        };
        receiver_stops_reading(0, small).await;
    }
}
