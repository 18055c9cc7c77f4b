//! The fetching side of a shared-state sync: [`fetch_tensors`] cuts the
//! tensors the master's plan names into `Range`s (of [`RANGE_BYTES`]) and
//! runs a `FetchJob`: up to 8 connections, each keeping `PIPELINE_DEPTH`
//! [`TensorRequest`]s outstanding at one holder, receiving straight into the
//! destination tensor and hashing leaf by leaf, failing over to the next
//! holder when one refuses, breaks or stalls; the tensors are verified
//! against the elected hashes at the end.
//!
//! Imports `net` (connections are dialed through a [`Transport`]), `hash`,
//! `wire` and the shared items of [`super`]; nothing of [`super::server`]
//! (its tests run one as the holder).

use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{nanos, SharedState, SyncTimings, RANGE_BYTES};
use crate::error::{Error, Result};
use crate::hash;
use crate::net::{self, Net, Transport};
use crate::wire::{ConnKind, Hello, PeerEntry, PeerId, TensorRequest, TensorResponseHead};

/// Requests a fetching connection keeps outstanding: the next range is
/// already queued at the holder while the current one streams in, so no
/// round trip is spent idle between ranges.
const PIPELINE_DEPTH: usize = 2;
/// Most bytes read from the socket in one call, so that the leaves a read
/// completes are hashed while still in the CPU cache.
const RECV_PIECE: usize = 4 * hash::LEAF_SIZE;

/// Destination of one fetched tensor.
struct Target {
    name: String,
    ptr: usize,
    len: usize,
    expected: u64,
    /// Verified against the serving peer's declared hash instead of `expected`.
    inequality: bool,
    /// Leaf hashes of the received bytes, filled in range by range.
    leaves: Mutex<Vec<u64>>,
    declared: Mutex<Option<u64>>,
}

/// A piece of one tensor; starts on a leaf boundary.
#[derive(Clone, Copy)]
struct Range {
    target: usize,
    offset: usize,
    len: usize,
}

struct FetchJob<T: Transport> {
    me: PeerId,
    sync_id: u64,
    targets: Vec<Target>,
    queue: Mutex<VecDeque<Range>>,
    sources: Vec<PeerEntry>,
    failed_sources: Mutex<HashSet<PeerId>>,
    rx_bytes: AtomicU64,
    /// Tensor bytes of the ranges received so far (progress reports).
    received: Arc<AtomicU64>,
    recv_ns: AtomicU64,
    hash_ns: AtomicU64,
    /// Dials the sources (and carries the connections' tuning).
    net: T,
    timeout: Duration,
    /// Progress deadline of a connection with requests outstanding (zero:
    /// none, wait for TCP to break the connection).
    stall: Duration,
}

/// Why a range did not arrive from a source.
enum RangeError {
    /// The connection broke or misbehaved.
    Io(io::Error),
    /// The source answered, but refused the range or holds other content.
    Refused(String),
    /// No byte moved for the stall deadline while requests were outstanding:
    /// the source is frozen or its path is dead (the socket may never break,
    /// e.g. a stopped process's kernel keeps acknowledging).
    Stalled,
}

impl From<io::Error> for RangeError {
    fn from(e: io::Error) -> Self {
        RangeError::Io(e)
    }
}

/// Awaits one socket operation of a fetch, giving up with
/// [`RangeError::Stalled`] if it completes nothing within `stall` (zero: no
/// deadline). Applied to every read and write of a connection with requests
/// outstanding, each of which completes as soon as any byte moves, so it is
/// a deadline on progress: a slow but live source never trips it.
async fn progress<T>(
    stall: Duration,
    op: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, RangeError> {
    if stall.is_zero() {
        return Ok(op.await?);
    }
    match tokio::time::timeout(stall, op).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(RangeError::Stalled),
    }
}

impl<T: Transport> FetchJob<T> {
    fn next_source(&self, start: usize) -> Option<PeerEntry> {
        let failed = self.failed_sources.lock().ok()?;
        let n = self.sources.len();
        (0..n)
            .map(|i| &self.sources[(start + i) % n])
            .find(|s| !failed.contains(&s.id))
            .cloned()
    }

    fn mark_failed(&self, id: PeerId) {
        if let Ok(mut f) = self.failed_sources.lock() {
            f.insert(id);
        }
    }

    fn pop_range(&self) -> Option<Range> {
        self.queue.lock().ok().and_then(|mut q| q.pop_front())
    }

    async fn connect(&self, src: &PeerEntry) -> io::Result<T::Conn> {
        let addr = SocketAddr::new(src.ip, src.ss_port);
        let mut s = self.net.dial(addr, self.timeout).await?;
        let hello = Hello {
            kind: ConnKind::SharedState,
            from: self.me,
            to: src.id,
        };
        net::write_hello(&mut s, &hello).await?;
        // A frozen holder's kernel still completes the TCP handshake: its
        // missing echo is a stall like any other.
        let greet = match self.stall.is_zero() {
            true => self.timeout,
            false => self.timeout.min(self.stall),
        };
        let echo = net::read_hello(&mut s, greet)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        if echo != hello {
            return Err(io::Error::other("unexpected greeting"));
        }
        Ok(s)
    }

    async fn send_request(&self, s: &mut T::Conn, r: &Range) -> Result<(), RangeError> {
        let t = &self.targets[r.target];
        let req = TensorRequest {
            sync_id: self.sync_id,
            offset: r.offset as u64,
            len: r.len as u64,
            name: t.name.clone(),
        }
        .encode();
        progress(self.stall, s.write_all(&req)).await
    }

    /// Receives the answer to an already sent request for `r` straight into
    /// the destination tensor, hashing each leaf as soon as it is complete
    /// (while it is still in cache, and overlapped with the other
    /// connections' traffic). Only a range that arrived whole and from a
    /// source declaring the right content has its leaf hashes recorded.
    async fn receive_range(&self, s: &mut T::Conn, r: &Range) -> Result<(), RangeError> {
        let t = &self.targets[r.target];
        let mut recv_ns = 0u64;
        let t0 = Instant::now();
        let mut resp = [0u8; TensorResponseHead::LEN];
        let head = progress(self.stall, s.read_exact(&mut resp)).await;
        recv_ns += nanos(t0.elapsed());
        if let Err(e) = head {
            self.recv_ns.fetch_add(recv_ns, Ordering::Relaxed);
            return Err(e);
        }
        let TensorResponseHead {
            status,
            hash: declared,
            body_len: body,
        } = TensorResponseHead::decode(&resp);
        if status != TensorResponseHead::OK {
            self.recv_ns.fetch_add(recv_ns, Ordering::Relaxed);
            return Err(RangeError::Refused(format!(
                "source refused tensor '{}' (status {status})",
                t.name
            )));
        }
        if body != r.len as u64 {
            return Err(io::Error::other("source sent a range of the wrong size").into());
        }
        if !t.inequality && declared != t.expected {
            // Do not even read the body: this source holds other content.
            return Err(RangeError::Refused(format!(
                "source does not hold the popular content of tensor '{}'",
                t.name
            )));
        }
        debug_assert_eq!(r.offset % hash::LEAF_SIZE, 0);
        // SAFETY: ranges of one fetch are disjoint (and each is received by
        // one task at a time), the destination tensor is valid for `len`
        // bytes for the whole sync, and every fetch task is joined before
        // the sync returns.
        let dst = unsafe { std::slice::from_raw_parts_mut((t.ptr + r.offset) as *mut u8, r.len) };
        let mut leaves = Vec::with_capacity(r.len.div_ceil(hash::LEAF_SIZE));
        let mut hash_ns = 0u64;
        let (mut got, mut hashed) = (0usize, 0usize);
        while got < r.len {
            let end = (got + RECV_PIECE).min(r.len);
            let t0 = Instant::now();
            let n = progress(self.stall, s.read(&mut dst[got..end])).await;
            let t1 = Instant::now();
            recv_ns += nanos(t1 - t0);
            let n = n?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            got += n;
            let mut hashed_any = false;
            while hashed < got && (got - hashed >= hash::LEAF_SIZE || got == r.len) {
                let leaf_end = (hashed + hash::LEAF_SIZE).min(r.len);
                leaves.push(hash::leaf_hash(&dst[hashed..leaf_end]));
                hashed = leaf_end;
                hashed_any = true;
            }
            if hashed_any {
                hash_ns += nanos(t1.elapsed());
            }
        }
        self.recv_ns.fetch_add(recv_ns, Ordering::Relaxed);
        self.hash_ns.fetch_add(hash_ns, Ordering::Relaxed);
        self.rx_bytes.fetch_add(
            r.len as u64 + TensorResponseHead::LEN as u64,
            Ordering::Relaxed,
        );
        self.received.fetch_add(r.len as u64, Ordering::Relaxed);
        let first_leaf = r.offset / hash::LEAF_SIZE;
        if let Ok(mut all) = t.leaves.lock() {
            if let Some(slots) = all.get_mut(first_leaf..first_leaf + leaves.len()) {
                slots.copy_from_slice(&leaves);
            }
        }
        if let Ok(mut d) = t.declared.lock() {
            *d = Some(declared);
        }
        Ok(())
    }

    /// One connection's loop: takes ranges from the shared queue, keeps up
    /// to [`PIPELINE_DEPTH`] of them requested at its source, and when the
    /// source fails requests the ranges it holds again from the next one.
    async fn worker(self: Arc<Self>, start: usize) -> Result<()> {
        let mut conn: Option<(PeerEntry, T::Conn)> = None;
        // Ranges this worker owns; the first `sent` are requested on `conn`.
        let mut mine: VecDeque<Range> = VecDeque::with_capacity(PIPELINE_DEPTH);
        let mut sent = 0usize;
        loop {
            while mine.len() < PIPELINE_DEPTH {
                match self.pop_range() {
                    Some(r) => mine.push_back(r),
                    None => break,
                }
            }
            let Some(&front) = mine.front() else {
                return Ok(());
            };
            if conn.is_none() {
                sent = 0;
                let Some(src) = self.next_source(start) else {
                    return Err(Error::RankConnectionLost(
                        "every peer holding the popular shared state failed during the transfer"
                            .into(),
                    ));
                };
                match self.connect(&src).await {
                    Ok(s) => conn = Some((src, s)),
                    Err(e) => {
                        tracing::warn!(peer = %self.me, from = %src.id, "cannot reach shared-state source: {e}");
                        self.mark_failed(src.id);
                    }
                }
                continue;
            }
            let Some((src, s)) = conn.as_mut() else {
                continue;
            };
            let outcome = async {
                while sent < mine.len() {
                    self.send_request(s, &mine[sent]).await?;
                    sent += 1;
                }
                self.receive_range(s, &front).await
            }
            .await;
            match outcome {
                Ok(()) => {
                    mine.pop_front();
                    sent -= 1;
                }
                Err(RangeError::Refused(why)) => {
                    tracing::warn!(peer = %self.me, from = %src.id, "{why}; trying another source");
                    self.mark_failed(src.id);
                    conn = None;
                }
                Err(RangeError::Io(e)) => {
                    tracing::warn!(peer = %self.me, from = %src.id, "shared-state transfer broke: {e}; trying another source");
                    self.mark_failed(src.id);
                    conn = None;
                }
                Err(RangeError::Stalled) => {
                    tracing::warn!(
                        peer = %self.me,
                        from = %src.id,
                        "shared-state source stalled: nothing received for {:.1} s with {} ranges outstanding; trying another source",
                        self.stall.as_secs_f64(),
                        mine.len()
                    );
                    self.mark_failed(src.id);
                    conn = None;
                }
            }
        }
    }
}

/// How transfers connect: parallel connections, the transport (and its
/// tuning), deadlines; and how a fetch reports its progress.
#[derive(Debug, Clone)]
pub(crate) struct TransferOpts<T: Transport = Net> {
    pub parallel: usize,
    pub net: T,
    /// Connect and greeting deadline.
    pub timeout: Duration,
    /// Progress deadline of a fetch connection ([`super::DEFAULT_STALL_TIMEOUT`]).
    pub stall: Duration,
    pub progress: super::ProgressOpts,
}

/// Fetches `items` (name, expected hash) into `state`'s tensors from `sources`.
/// Returns the bytes received.
pub(crate) async fn fetch_tensors<T: Transport>(
    me: PeerId,
    sync_id: u64,
    state: &SharedState<'_>,
    items: &[(String, u64)],
    sources: Vec<PeerEntry>,
    opts: TransferOpts<T>,
    timings: &mut SyncTimings,
) -> Result<u64> {
    let TransferOpts {
        parallel,
        net,
        timeout,
        stall,
        progress,
    } = opts;
    if sources.is_empty() {
        return Err(Error::NoSharedStateAvailable(
            "no peer holding the popular shared state is available".into(),
        ));
    }
    let mut targets = Vec::with_capacity(items.len());
    let mut queue = VecDeque::new();
    for (name, expected) in items {
        let Some(t) = state.tensors.iter().find(|t| &t.name == name) else {
            return Err(Error::Internal(format!(
                "the master asked for unknown tensor '{name}'"
            )));
        };
        let len = t.byte_len();
        let idx = targets.len();
        targets.push(Target {
            name: name.clone(),
            ptr: t.ptr as usize,
            len,
            expected: *expected,
            inequality: t.allow_content_inequality,
            leaves: Mutex::new(vec![0; hash::leaf_count(len as u64) as usize]),
            declared: Mutex::new(None),
        });
        // A tensor that may differ between holders comes whole from one source.
        let step = if t.allow_content_inequality {
            len.max(1)
        } else {
            RANGE_BYTES
        };
        let mut off = 0;
        while off < len {
            let n = step.min(len - off);
            queue.push_back(Range {
                target: idx,
                offset: off,
                len: n,
            });
            off += n;
        }
    }
    let total: u64 = targets.iter().map(|t| t.len as u64).sum();
    let workers = parallel.clamp(1, 8).min(queue.len().max(1));
    timings.fetch_connections = workers;
    let job = Arc::new(FetchJob {
        me,
        sync_id,
        targets,
        queue: Mutex::new(queue),
        sources,
        failed_sources: Mutex::new(HashSet::new()),
        rx_bytes: AtomicU64::new(0),
        received: Arc::new(AtomicU64::new(0)),
        recv_ns: AtomicU64::new(0),
        hash_ns: AtomicU64::new(0),
        net,
        timeout,
        stall,
    });
    // Spread receivers over holders instead of all starting at the first.
    let spread = me.0[0] as usize;
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        set.spawn(job.clone().worker(spread + w));
    }
    let started = Instant::now();
    // Stops when dropped: at the end, or if this future is.
    let reporter =
        super::progress::Reporter::spawn(job.received.clone(), total, started, progress.clone());
    let mut result = Ok(());
    while let Some(r) = set.join_next().await {
        let r = match r {
            Ok(r) => r,
            Err(e) => Err(Error::Internal(format!("fetch task failed: {e}"))),
        };
        if let Err(e) = r {
            if result.is_ok() {
                result = Err(e);
                set.abort_all();
            }
        }
    }
    timings.fetch_recv = Duration::from_nanos(job.recv_ns.load(Ordering::Relaxed));
    timings.fetch_hash = Duration::from_nanos(job.hash_ns.load(Ordering::Relaxed));
    timings.failed_sources = job.failed_sources.lock().map(|f| f.len()).unwrap_or(0);
    drop(reporter);
    result?;
    super::progress::report_done(&job.received, total, started, &progress);
    let verify_start = Instant::now();
    for t in &job.targets {
        let leaves = t.leaves.lock().map(|l| l.clone()).unwrap_or_default();
        let got = hash::root_hash(&leaves, t.len as u64);
        let want = if t.inequality {
            t.declared.lock().ok().and_then(|d| *d).unwrap_or(got)
        } else {
            t.expected
        };
        if got != want {
            return Err(Error::InvalidUsage(format!(
                "tensor '{}' failed hash verification after the transfer ({got:016x} != {want:016x})",
                t.name
            )));
        }
    }
    timings.verify = verify_start.elapsed();
    Ok(job.rx_bytes.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::super::server::{ServedTensor, SharedStateServer};
    use super::super::SharedTensor;
    use super::*;
    use crate::net::Listener;
    use crate::wire::TensorRequestHead;
    use std::collections::HashMap;
    use tokio_util::sync::CancellationToken;

    /// A listener on a free loopback port.
    fn listen() -> crate::net::NetListener {
        Net::default()
            .listen("127.0.0.1".parse().unwrap(), 0, 1)
            .unwrap()
    }

    fn peer(b: u8) -> PeerId {
        PeerId([b; 16])
    }

    /// A holder serving `data` as tensor "w" for `sync_id`, on loopback.
    async fn holder(
        id: PeerId,
        data: &[u8],
        sync_id: u64,
        stall: Duration,
    ) -> (Arc<SharedStateServer>, CancellationToken, PeerEntry) {
        let server = SharedStateServer::with_upload_limit(
            CancellationToken::new(),
            Duration::from_secs(5),
            stall,
            None,
        );
        server.set_me(id);
        let l = listen();
        let port = l.local_addr().unwrap().port();
        server.spawn_listener(l, CancellationToken::new());
        let served = HashMap::from([(
            "w".to_string(),
            ServedTensor {
                ptr: data.as_ptr() as usize,
                len: data.len(),
                hash: hash::tensor_hash(data),
            },
        )]);
        let (cancel, _, _) = server.begin(served).await;
        server.set_sync_id(sync_id).await;
        (server, cancel, entry(id, port))
    }

    fn entry(id: PeerId, port: u16) -> PeerEntry {
        PeerEntry {
            id,
            group: 0,
            ip: "127.0.0.1".parse().unwrap(),
            p2p_port: 0,
            ss_port: port,
            bench_port: 0,
        }
    }

    /// A holder that greets, answers the first request with its header and
    /// half the body, then goes silent with the connection open (what a
    /// SIGSTOPped peer looks like: its kernel still acknowledges).
    async fn frozen_holder(id: PeerId, data: Arc<Vec<u8>>) -> PeerEntry {
        let l = listen();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut conns = Vec::new();
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let hello = net::read_hello(&mut s, Duration::from_secs(5))
                    .await
                    .unwrap();
                net::write_hello(&mut s, &hello).await.unwrap();
                let mut head = [0u8; TensorRequestHead::LEN];
                s.read_exact(&mut head).await.unwrap();
                let head = TensorRequestHead::decode(&head).unwrap();
                let (offset, len) = (head.offset as usize, head.len as usize);
                let mut name = vec![0u8; head.name_len];
                s.read_exact(&mut name).await.unwrap();
                let h = hash::tensor_hash(&data);
                let resp = TensorResponseHead {
                    status: TensorResponseHead::OK,
                    hash: h,
                    body_len: len as u64,
                };
                s.write_all(&resp.encode()).await.unwrap();
                s.write_all(&data[offset..offset + len / 2]).await.unwrap();
                conns.push(s);
            }
        });
        entry(id, port)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fetch_fails_over_from_a_stalled_source() {
        // 10 MiB = 3 ranges over one connection, which starts at the frozen
        // holder (sources[0], `me` spreads to index 0).
        let data: Arc<Vec<u8>> =
            Arc::new((0..10 << 20).map(|i: u32| ((i * 7) >> 3) as u8).collect());
        let stall = Duration::from_millis(300);
        let frozen = frozen_holder(peer(1), data.clone()).await;
        let (_server, _cancel, live) = holder(peer(2), &data, 7, stall).await;
        let mut dst = vec![0u8; data.len()];
        let state = SharedState::new(0, vec![SharedTensor::new("w", &mut dst)]);
        let items = vec![("w".to_string(), hash::tensor_hash(&data))];
        let opts = TransferOpts {
            parallel: 1,
            net: Net::default(),
            timeout: Duration::from_secs(5),
            stall,
            progress: Default::default(),
        };
        let mut tm = SyncTimings::default();
        let t0 = Instant::now();
        let got = fetch_tensors(
            peer(0),
            7,
            &state,
            &items,
            vec![frozen, live],
            opts,
            &mut tm,
        )
        .await;
        let took = t0.elapsed();
        drop(state);
        assert_eq!(got.unwrap(), data.len() as u64 + 3 * 17);
        assert!(dst == *data, "fetched bytes differ");
        assert_eq!(tm.failed_sources, 1);
        assert!(took >= stall, "gave up before the deadline: {took:?}");
        assert!(took < Duration::from_secs(3), "took {took:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fetch_without_a_live_source_fails_at_the_deadline() {
        let data: Arc<Vec<u8>> = Arc::new(vec![3u8; 1 << 20]);
        let stall = Duration::from_millis(200);
        let sources = vec![
            frozen_holder(peer(1), data.clone()).await,
            frozen_holder(peer(2), data.clone()).await,
        ];
        let mut dst = vec![0u8; data.len()];
        let state = SharedState::new(0, vec![SharedTensor::new("w", &mut dst)]);
        let items = vec![("w".to_string(), hash::tensor_hash(&data))];
        let opts = TransferOpts {
            parallel: 2,
            net: Net::default(),
            timeout: Duration::from_secs(5),
            stall,
            progress: Default::default(),
        };
        let mut tm = SyncTimings::default();
        let t0 = Instant::now();
        let got = fetch_tensors(peer(0), 7, &state, &items, sources, opts, &mut tm).await;
        let took = t0.elapsed();
        assert!(matches!(got, Err(Error::RankConnectionLost(_))), "{got:?}");
        assert_eq!(tm.failed_sources, 2);
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }
}
