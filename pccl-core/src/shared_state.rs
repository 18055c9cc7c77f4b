//! Shared state: named tensors plus a revision counter, kept bit-identical
//! across the peers of a group. A sync hashes every tensor, lets the master
//! elect the popular content, and fetches exactly the differing tensors from
//! a peer that holds it, verifying them by hash before returning.

use std::marker::PhantomData;

use crate::comm::Element;
use crate::types::{DataType, DeviceType};

/// One tensor of a shared state. Borrowed mutably for `'a`: a sync may
/// overwrite it with the popular content.
pub struct SharedTensor<'a> {
    pub(crate) name: String,
    pub(crate) ptr: *mut u8,
    pub(crate) count: usize,
    pub(crate) datatype: DataType,
    pub(crate) device: DeviceType,
    pub(crate) allow_content_inequality: bool,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: a SharedTensor is an exclusive borrow of its buffer (or, via
// `from_raw`, a caller promise of the same), so moving it to another thread
// is as safe as moving a `&mut [u8]`.
unsafe impl Send for SharedTensor<'_> {}

impl<'a> SharedTensor<'a> {
    /// A tensor over a typed slice on the CPU.
    pub fn new<T: Element>(name: impl Into<String>, data: &'a mut [T]) -> Self {
        SharedTensor {
            name: name.into(),
            ptr: data.as_mut_ptr() as *mut u8,
            count: data.len(),
            datatype: T::DTYPE,
            device: DeviceType::Cpu,
            allow_content_inequality: false,
            _borrow: PhantomData,
        }
    }

    /// A tensor over raw memory (for the C and Python layers).
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `count * datatype.size()`
    /// bytes for `'a`, and nothing else may access it during a sync.
    pub unsafe fn from_raw(
        name: impl Into<String>,
        ptr: *mut u8,
        count: usize,
        datatype: DataType,
        device: DeviceType,
    ) -> Self {
        SharedTensor {
            name: name.into(),
            ptr,
            count,
            datatype,
            device,
            allow_content_inequality: false,
            _borrow: PhantomData,
        }
    }

    /// Marks the tensor as allowed to differ between peers: it is neither
    /// voted on nor re-sent every step (only to peers whose revision lags).
    pub fn allow_content_inequality(mut self, allow: bool) -> Self {
        self.allow_content_inequality = allow;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn datatype(&self) -> DataType {
        self.datatype
    }

    pub fn byte_len(&self) -> usize {
        self.count * self.datatype.size()
    }

    /// The tensor's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the constructor's contract makes ptr valid for byte_len bytes for 'a.
        unsafe { std::slice::from_raw_parts(self.ptr, self.byte_len()) }
    }
}

/// A revision counter and the tensors it versions.
pub struct SharedState<'a> {
    /// Must advance by exactly one per sync; a newcomer's first sync adopts
    /// the group's revision.
    pub revision: u64,
    pub tensors: Vec<SharedTensor<'a>>,
}

impl<'a> SharedState<'a> {
    pub fn new(revision: u64, tensors: Vec<SharedTensor<'a>>) -> Self {
        SharedState { revision, tensors }
    }
}

// ---------------------------------------------------------------------------
// Serving tensors to peers that fetch them, and fetching them ourselves.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, RwLock};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::hash;
use crate::transport::{self, SocketTuning};
use crate::wire::{ConnKind, Hello, PeerEntry, PeerId, MAX_NAME_LEN};

/// Where the time of one shared-state sync went, as seen by the peer that
/// ran it ([`last_sync_timings`]). Durations marked "summed" add up the
/// parallel connections, so they can exceed the wall time of their phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SyncTimings {
    /// The protocol part of the sync, from sending the vote to the master's
    /// result (the local hash of the tensors before the vote is not in it).
    pub protocol: Duration,
    /// Vote sent until the master's plan arrived: the master waits for every
    /// peer of the group, so this is mostly the slowest peer's hashing.
    pub wait_plan: Duration,
    /// Plan received until every fetched tensor was in and verified (zero
    /// when nothing was fetched).
    pub fetch: Duration,
    /// Summed: time spent waiting for and reading response bytes.
    pub fetch_recv: Duration,
    /// Summed: hashing received leaves.
    pub fetch_hash: Duration,
    /// Computing the roots from the leaf hashes and comparing them.
    pub verify: Duration,
    /// Transfer reported (or plan received, when nothing was fetched) until
    /// the master's result: waiting for the group's receivers.
    pub wait_result: Duration,
    /// Parallel connections used for fetching.
    pub fetch_connections: usize,
    /// Sources given up during the fetch (died, refused, wrong content).
    pub failed_sources: usize,
    /// Summed: writing requested ranges to fetching peers (includes any
    /// upload rate limiting).
    pub serve: Duration,
}

thread_local! {
    static LAST_TIMINGS: std::cell::Cell<Option<SyncTimings>> = const { std::cell::Cell::new(None) };
}

/// The timing breakdown of the last shared-state sync that the calling thread
/// ran (successful or not), or `None` if it never ran one. A diagnostic: the
/// same figures are logged at debug level by each sync.
pub fn last_sync_timings() -> Option<SyncTimings> {
    LAST_TIMINGS.with(|t| t.get())
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

/// Bytes fetched per request; a multiple of the hash leaf size so each range
/// hashes independently and ranges can be fetched in parallel.
const RANGE_BYTES: usize = 64 * hash::LEAF_SIZE;
/// Requests a fetching connection keeps outstanding: the next range is
/// already queued at the holder while the current one streams in, so no
/// round trip is spent idle between ranges.
const PIPELINE_DEPTH: usize = 2;
/// Most bytes read from the socket in one call, so that the leaves a read
/// completes are hashed while still in the CPU cache.
const RECV_PIECE: usize = 4 * hash::LEAF_SIZE;
/// How long a server waits for its own plan when a request arrives early.
const PLAN_WAIT: Duration = Duration::from_secs(10);

const STATUS_OK: u8 = 0;
const STATUS_NOT_SERVING: u8 = 1;
const STATUS_UNKNOWN_TENSOR: u8 = 2;
const STATUS_BAD_RANGE: u8 = 3;

struct ServedTensor {
    ptr: usize,
    len: usize,
    hash: u64,
}

struct Serving {
    sync_id: u64,
    tensors: HashMap<String, ServedTensor>,
    cancel: CancellationToken,
    tx_bytes: Arc<AtomicU64>,
    serve_ns: Arc<AtomicU64>,
}

/// Environment variable capping how fast a peer uploads shared state to
/// the peers fetching from it, in bytes per second over all its connections
/// together (see `docs/shared-state.md`). Read when a communicator is
/// created. Unset, empty or `0`: no limit.
pub const UPLOAD_LIMIT_ENV: &str = "PCCL_SHARED_STATE_UPLOAD_BPS";

/// Parses an upload limit: a decimal number of bytes per second, optionally
/// followed by `K`, `M` or `G` (powers of 1000) or `Ki`, `Mi`, `Gi` (powers of
/// 1024). `Ok(None)` means no limit (empty or zero).
pub fn parse_upload_limit(text: &str) -> std::result::Result<Option<u64>, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(None);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: u64 = num
        .parse()
        .map_err(|_| format!("'{text}' is not a number of bytes per second"))?;
    let mult: u64 = match unit.trim() {
        "" => 1,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        u => {
            return Err(format!(
                "unknown unit '{u}' in '{text}' (K, M, G, Ki, Mi, Gi)"
            ))
        }
    };
    let bps = num
        .checked_mul(mult)
        .ok_or_else(|| format!("'{text}' is too large"))?;
    Ok((bps > 0).then_some(bps))
}

/// Paces a server's uploads to a byte rate, over all its connections
/// together: each piece reserves the next free slot of a virtual link and
/// is written when its slot begins, so there is no burst beyond one piece.
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

    /// Bytes written at once: at most ~10 ms worth, between 4 KiB and 1 MiB.
    fn piece(&self) -> usize {
        (self.bytes_per_sec / 100).clamp(4 << 10, 1 << 20) as usize
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

    async fn write(&self, s: &mut TcpStream, data: &[u8]) -> io::Result<()> {
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
    tuning: SocketTuning,
    timeout: Duration,
    me: Mutex<PeerId>,
    upload_limit: Option<UploadLimiter>,
}

impl SharedStateServer {
    /// A server; its upload limit comes from [`UPLOAD_LIMIT_ENV`].
    pub fn new(shutdown: CancellationToken, tuning: SocketTuning, timeout: Duration) -> Arc<Self> {
        let limit = match std::env::var(UPLOAD_LIMIT_ENV) {
            Ok(v) => parse_upload_limit(&v).unwrap_or_else(|e| {
                tracing::warn!("ignoring {UPLOAD_LIMIT_ENV}: {e}");
                None
            }),
            Err(_) => None,
        };
        Self::with_upload_limit(shutdown, tuning, timeout, limit)
    }

    /// A server uploading at most `bytes_per_sec` (None: unlimited).
    pub fn with_upload_limit(
        shutdown: CancellationToken,
        tuning: SocketTuning,
        timeout: Duration,
        bytes_per_sec: Option<u64>,
    ) -> Arc<Self> {
        if let Some(bps) = bytes_per_sec {
            tracing::info!(bytes_per_sec = bps, "shared-state uploads are rate-limited");
        }
        Arc::new(SharedStateServer {
            current: watch::channel(0).0,
            serving: RwLock::new(None),
            shutdown,
            tuning,
            timeout,
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
    pub fn spawn_listener(self: &Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        let this = self.clone();
        transport::spawn_accept_loop(listener, stop, "shared-state", move |s, remote| {
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
    async fn begin(
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

    async fn set_sync_id(&self, sync_id: u64) {
        if let Some(s) = self.serving.write().await.as_mut() {
            s.sync_id = sync_id;
        }
        self.current.send_modify(|c| *c = (*c).max(sync_id));
    }

    /// Stops serving; returns once no server task reads the tensors any more.
    async fn end(&self, cancel: &CancellationToken) {
        cancel.cancel();
        *self.serving.write().await = None;
    }

    async fn serve_conn(self: Arc<Self>, mut s: TcpStream) -> io::Result<()> {
        self.tuning.apply(&s);
        let me = self.me();
        let hello = transport::read_hello(&mut s, self.timeout)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        if hello.kind != ConnKind::SharedState || hello.to != me {
            tracing::warn!(peer = %me, "refusing shared-state connection not meant for this peer");
            return Ok(());
        }
        transport::write_hello(&mut s, &hello).await?;
        loop {
            let mut head = [0u8; 28];
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                r = s.read_exact(&mut head) => { r?; }
            }
            let sync_id = u64::from_le_bytes(head[0..8].try_into().unwrap_or_default());
            let offset = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
            let len = u64::from_le_bytes(head[16..24].try_into().unwrap_or_default());
            let name_len = u32::from_le_bytes(head[24..28].try_into().unwrap_or_default()) as usize;
            if name_len > MAX_NAME_LEN {
                tracing::warn!(peer = %me, from = %hello.from, "oversized tensor name in request; closing");
                return Ok(());
            }
            let mut name = vec![0u8; name_len];
            s.read_exact(&mut name).await?;
            let name = String::from_utf8_lossy(&name).into_owned();
            // A request may beat our own plan from the master by a little.
            let mut cur = self.current.subscribe();
            let _ = tokio::time::timeout(PLAN_WAIT, cur.wait_for(|c| *c >= sync_id)).await;
            let guard = self.serving.read().await;
            let (status, hash, ptr, tlen) = match guard.as_ref() {
                Some(sv) if sv.sync_id == sync_id => match sv.tensors.get(&name) {
                    Some(t) => {
                        let ok = offset
                            .checked_add(len)
                            .is_some_and(|end| end <= t.len as u64);
                        if ok {
                            (STATUS_OK, t.hash, t.ptr, t.len)
                        } else {
                            (STATUS_BAD_RANGE, 0, 0, 0)
                        }
                    }
                    None => (STATUS_UNKNOWN_TENSOR, 0, 0, 0),
                },
                _ => (STATUS_NOT_SERVING, 0, 0, 0),
            };
            let mut resp = [0u8; 17];
            resp[0] = status;
            resp[1..9].copy_from_slice(&hash.to_le_bytes());
            let body_len = if status == STATUS_OK { len } else { 0 };
            resp[9..17].copy_from_slice(&body_len.to_le_bytes());
            s.write_all(&resp).await?;
            let Some(sv) = guard.as_ref().filter(|_| status == STATUS_OK) else {
                continue;
            };
            debug_assert!(offset as usize + len as usize <= tlen);
            // SAFETY: the tensor stays registered (and its memory valid) while
            // we hold the read guard; `end` cancels this write before it takes
            // the write lock and lets the sync return.
            let data = unsafe {
                std::slice::from_raw_parts((ptr + offset as usize) as *const u8, len as usize)
            };
            let t0 = Instant::now();
            let send = async {
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
            sv.tx_bytes.fetch_add(len + 17, Ordering::Relaxed);
        }
    }
}

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

struct FetchJob {
    me: PeerId,
    sync_id: u64,
    targets: Vec<Target>,
    queue: Mutex<VecDeque<Range>>,
    sources: Vec<PeerEntry>,
    failed_sources: Mutex<HashSet<PeerId>>,
    rx_bytes: AtomicU64,
    recv_ns: AtomicU64,
    hash_ns: AtomicU64,
    tuning: SocketTuning,
    timeout: Duration,
}

/// Why a range did not arrive from a source.
enum RangeError {
    /// The connection broke or misbehaved.
    Io(io::Error),
    /// The source answered, but refused the range or holds other content.
    Refused(String),
}

impl From<io::Error> for RangeError {
    fn from(e: io::Error) -> Self {
        RangeError::Io(e)
    }
}

impl FetchJob {
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

    async fn connect(&self, src: &PeerEntry) -> io::Result<TcpStream> {
        let addr = SocketAddr::new(src.ip, src.ss_port);
        let mut s = transport::dial(addr, self.timeout, self.tuning).await?;
        let hello = Hello {
            kind: ConnKind::SharedState,
            from: self.me,
            to: src.id,
        };
        transport::write_hello(&mut s, &hello).await?;
        let echo = transport::read_hello(&mut s, self.timeout)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        if echo != hello {
            return Err(io::Error::other("unexpected greeting"));
        }
        Ok(s)
    }

    async fn send_request(&self, s: &mut TcpStream, r: &Range) -> io::Result<()> {
        let t = &self.targets[r.target];
        let mut req = Vec::with_capacity(28 + t.name.len());
        req.extend_from_slice(&self.sync_id.to_le_bytes());
        req.extend_from_slice(&(r.offset as u64).to_le_bytes());
        req.extend_from_slice(&(r.len as u64).to_le_bytes());
        req.extend_from_slice(&(t.name.len() as u32).to_le_bytes());
        req.extend_from_slice(t.name.as_bytes());
        s.write_all(&req).await
    }

    /// Receives the answer to an already sent request for `r` straight into
    /// the destination tensor, hashing each leaf as soon as it is complete
    /// (while it is still in cache, and overlapped with the other
    /// connections' traffic). Only a range that arrived whole and from a
    /// source declaring the right content has its leaf hashes recorded.
    async fn receive_range(&self, s: &mut TcpStream, r: &Range) -> Result<(), RangeError> {
        let t = &self.targets[r.target];
        let mut recv_ns = 0u64;
        let t0 = Instant::now();
        let mut resp = [0u8; 17];
        s.read_exact(&mut resp).await?;
        recv_ns += nanos(t0.elapsed());
        let status = resp[0];
        let declared = u64::from_le_bytes(resp[1..9].try_into().unwrap_or_default());
        let body = u64::from_le_bytes(resp[9..17].try_into().unwrap_or_default());
        if status != STATUS_OK {
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
            let n = s.read(&mut dst[got..end]).await;
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
        self.rx_bytes
            .fetch_add(r.len as u64 + 17, Ordering::Relaxed);
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
        let mut conn: Option<(PeerEntry, TcpStream)> = None;
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
            }
        }
    }
}

/// How transfers connect: parallel connections, socket options, deadlines.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TransferOpts {
    pub parallel: usize,
    pub tuning: SocketTuning,
    pub timeout: Duration,
}

/// Fetches `items` (name, expected hash) into `state`'s tensors from `sources`.
/// Returns the bytes received.
pub(crate) async fn fetch_tensors(
    me: PeerId,
    sync_id: u64,
    state: &SharedState<'_>,
    items: &[(String, u64)],
    sources: Vec<PeerEntry>,
    opts: TransferOpts,
    timings: &mut SyncTimings,
) -> Result<u64> {
    let TransferOpts {
        parallel,
        tuning,
        timeout,
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
        recv_ns: AtomicU64::new(0),
        hash_ns: AtomicU64::new(0),
        tuning,
        timeout,
    });
    // Spread receivers over holders instead of all starting at the first.
    let spread = me.0[0] as usize;
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        set.spawn(job.clone().worker(spread + w));
    }
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
    result?;
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

/// Runs one sync for `state` (called by [`crate::Communicator::sync_shared_state`]).
pub(crate) async fn run_sync(
    ctl: &Arc<crate::comm::control::Control>,
    server: &Arc<SharedStateServer>,
    state: &mut SharedState<'_>,
    strategy: crate::SyncStrategy,
    hashes: Vec<u64>,
    opts: TransferOpts,
) -> Result<crate::SyncInfo> {
    use crate::comm::control::{Routed, WaitKey};
    use crate::wire::{MasterMsg, PeerMsg, TensorMeta};

    let me = ctl.me();
    let served: HashMap<String, ServedTensor> = if strategy == crate::SyncStrategy::ReceiveOnly {
        HashMap::new()
    } else {
        state
            .tensors
            .iter()
            .zip(&hashes)
            .map(|(t, h)| {
                (
                    t.name.clone(),
                    ServedTensor {
                        ptr: t.ptr as usize,
                        len: t.byte_len(),
                        hash: *h,
                    },
                )
            })
            .collect()
    };
    let mut waiter = ctl.wait(WaitKey::Sync)?;
    let (cancel, tx_bytes, serve_ns) = server.begin(served).await;
    let mut tm = SyncTimings::default();
    let started = Instant::now();
    let outcome = async {
        ctl.send(&PeerMsg::SyncVote {
            revision: state.revision,
            strategy: strategy as u8,
            tensors: state
                .tensors
                .iter()
                .zip(&hashes)
                .map(|(t, h)| TensorMeta {
                    name: t.name.clone(),
                    datatype: t.datatype as u8,
                    count: t.count as u64,
                    hash: *h,
                    allow_content_inequality: t.allow_content_inequality,
                })
                .collect(),
        })?;
        let voted = Instant::now();
        let (sync_id, revision, fetch, sources) = match waiter.recv().await? {
            Routed::Msg(MasterMsg::SyncPlan { sync_id, revision, fetch, sources }) => (sync_id, revision, fetch, sources),
            Routed::Msg(MasterMsg::SyncResult { ok: false, code, reason, .. }) => {
                return Err(crate::comm::error_from_code(code, reason));
            }
            _ => return Err(Error::Internal("unexpected answer to a shared-state vote".into())),
        };
        let planned = Instant::now();
        tm.wait_plan = planned - voted;
        server.set_sync_id(sync_id).await;
        let mut rx = 0;
        if !fetch.is_empty() {
            tracing::info!(peer = %me, sync_id, revision, tensors = fetch.len(), "fetching shared state");
            let items: Vec<(String, u64)> = fetch.into_iter().map(|f| (f.name, f.expected_hash)).collect();
            let fetched = fetch_tensors(me, sync_id, state, &items, sources, opts, &mut tm).await;
            tm.fetch = planned.elapsed();
            let ok = fetched.is_ok();
            ctl.send(&PeerMsg::SyncTransferDone { sync_id, ok, failed_source: None })?;
            rx = fetched?;
        }
        let reported = Instant::now();
        let result = loop {
            match waiter.recv().await? {
                Routed::Msg(MasterMsg::SyncResult { sync_id: id, ok, code, reason }) if id == sync_id || id == 0 => {
                    break (ok, code, reason);
                }
                _ => continue,
            }
        };
        tm.wait_result = reported.elapsed();
        let (ok, code, reason) = result;
        if !ok {
            return Err(crate::comm::error_from_code(code, reason));
        }
        state.revision = revision;
        Ok(rx)
    }
    .await;
    server.end(&cancel).await;
    tm.protocol = started.elapsed();
    tm.serve = Duration::from_nanos(serve_ns.load(Ordering::Relaxed));
    tracing::debug!(peer = %me, ok = outcome.is_ok(), timings = ?tm, "shared-state sync timings");
    LAST_TIMINGS.with(|t| t.set(Some(tm)));
    let rx = outcome?;
    Ok(crate::SyncInfo {
        tx_bytes: tx_bytes.load(Ordering::Relaxed),
        rx_bytes: rx,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_limits_parse() {
        assert_eq!(parse_upload_limit(""), Ok(None));
        assert_eq!(parse_upload_limit("  "), Ok(None));
        assert_eq!(parse_upload_limit("0"), Ok(None));
        assert_eq!(parse_upload_limit("0M"), Ok(None));
        assert_eq!(parse_upload_limit("1500"), Ok(Some(1500)));
        assert_eq!(parse_upload_limit(" 25M "), Ok(Some(25_000_000)));
        assert_eq!(parse_upload_limit("3k"), Ok(Some(3_000)));
        assert_eq!(parse_upload_limit("2G"), Ok(Some(2_000_000_000)));
        assert_eq!(parse_upload_limit("16Mi"), Ok(Some(16 << 20)));
        assert_eq!(parse_upload_limit("64 Ki"), Ok(Some(64 << 10)));
        assert_eq!(parse_upload_limit("1Gi"), Ok(Some(1 << 30)));
        for bad in [
            "M",
            "-5",
            "1.5M",
            "10MB",
            "ten",
            "99999999999999999999",
            "18446744073709551615G",
        ] {
            assert!(
                parse_upload_limit(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }

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
        // Pieces stay within [4 KiB, 1 MiB].
        assert_eq!(UploadLimiter::new(1).piece(), 4 << 10);
        assert_eq!(UploadLimiter::new(10_000_000_000).piece(), 1 << 20);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn upload_limiter_holds_the_rate_on_a_socket() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.unwrap();
            buf
        });
        let mut s = TcpStream::connect(addr).await.unwrap();
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
}
