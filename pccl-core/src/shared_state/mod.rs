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
pub const RANGE_BYTES: usize = 64 * hash::LEAF_SIZE;
/// Requests a fetching connection keeps outstanding: the next range is
/// already queued at the holder while the current one streams in, so no
/// round trip is spent idle between ranges.
const PIPELINE_DEPTH: usize = 2;
/// Most bytes read from the socket in one call, so that the leaves a read
/// completes are hashed while still in the CPU cache.
const RECV_PIECE: usize = 4 * hash::LEAF_SIZE;
/// How long a server waits for its own plan when a request arrives early.
const PLAN_WAIT: Duration = Duration::from_secs(10);

/// Default of [`crate::CommunicatorConfig::shared_state_stall_timeout`]: how
/// long a fetch connection with requests outstanding may receive no byte at
/// all before its source is given up and its ranges are requested from the
/// next holder.
///
/// The same as the master's default peer timeout (5 s), so a holder that
/// stays connected but stops sending (frozen, swapped out, wedged) costs a
/// fetching peer about what a silent peer costs a collective, instead of
/// waiting on TCP: a stopped process's kernel keeps acknowledging and
/// answering keepalive probes, so the connection never breaks by itself, and
/// even a vanished host is only detected after ~16 s of keepalive. It leaves
/// room for what a live holder can do: a few consecutive retransmission
/// timeouts on a lossy path (200 ms, 400 ms, 800 ms, 1.6 s ...), and the
/// pauses of an upload limit (at most 10 ms per connection sharing it,
/// [`UPLOAD_LIMIT_ENV`]). A false alarm only costs re-requesting at most
/// two ranges (`PIPELINE_DEPTH`) from another holder.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(5);

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
///
/// A piece is at most 10 ms of the link (one byte below 100 B/s), and a
/// connection holds at most one reservation at a time, so a connection
/// waits at most about (connections sharing the limit) x 10 ms between two
/// pieces: a fetching peer sees bytes arrive steadily, and its stall
/// deadline ([`DEFAULT_STALL_TIMEOUT`]) never mistakes a rate-limited
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
    pub fn new(
        shutdown: CancellationToken,
        tuning: SocketTuning,
        timeout: Duration,
        stall: Duration,
    ) -> Arc<Self> {
        let limit = match std::env::var(UPLOAD_LIMIT_ENV) {
            Ok(v) => parse_upload_limit(&v).unwrap_or_else(|e| {
                tracing::warn!("ignoring {UPLOAD_LIMIT_ENV}: {e}");
                None
            }),
            Err(_) => None,
        };
        Self::with_upload_limit(shutdown, tuning, timeout, stall, limit)
    }

    /// A server uploading at most `bytes_per_sec` (None: unlimited).
    pub fn with_upload_limit(
        shutdown: CancellationToken,
        tuning: SocketTuning,
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
            tuning,
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
            within(self.stall, s.read_exact(&mut name)).await?;
            let name = String::from_utf8_lossy(&name).into_owned();
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
                            Err(STATUS_BAD_RANGE)
                        }
                    }
                    None => Err(STATUS_UNKNOWN_TENSOR),
                },
                _ => Err(STATUS_NOT_SERVING),
            };
            let (sv, hash, ptr, tlen) = match found {
                Ok(f) => f,
                Err(status) => {
                    // A refusal is written without the serving lock, so a
                    // peer that stopped reading cannot hold up `begin` or
                    // `end` of this peer's own syncs.
                    drop(guard);
                    let resp = response_head(status, 0, 0);
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
            let resp = response_head(STATUS_OK, hash, len);
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
            sv.tx_bytes.fetch_add(len + 17, Ordering::Relaxed);
        }
    }
}

/// The head of a response: status, the holder's hash of the tensor, body length.
fn response_head(status: u8, hash: u64, body_len: u64) -> [u8; 17] {
    let mut resp = [0u8; 17];
    resp[0] = status;
    resp[1..9].copy_from_slice(&hash.to_le_bytes());
    resp[9..17].copy_from_slice(&body_len.to_le_bytes());
    resp
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
        // A frozen holder's kernel still completes the TCP handshake: its
        // missing echo is a stall like any other.
        let greet = match self.stall.is_zero() {
            true => self.timeout,
            false => self.timeout.min(self.stall),
        };
        let echo = transport::read_hello(&mut s, greet)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        if echo != hello {
            return Err(io::Error::other("unexpected greeting"));
        }
        Ok(s)
    }

    async fn send_request(&self, s: &mut TcpStream, r: &Range) -> Result<(), RangeError> {
        let t = &self.targets[r.target];
        let mut req = Vec::with_capacity(28 + t.name.len());
        req.extend_from_slice(&self.sync_id.to_le_bytes());
        req.extend_from_slice(&(r.offset as u64).to_le_bytes());
        req.extend_from_slice(&(r.len as u64).to_le_bytes());
        req.extend_from_slice(&(t.name.len() as u32).to_le_bytes());
        req.extend_from_slice(t.name.as_bytes());
        progress(self.stall, s.write_all(&req)).await
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
        let head = progress(self.stall, s.read_exact(&mut resp)).await;
        recv_ns += nanos(t0.elapsed());
        if let Err(e) = head {
            self.recv_ns.fetch_add(recv_ns, Ordering::Relaxed);
            return Err(e);
        }
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

/// How transfers connect: parallel connections, socket options, deadlines.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TransferOpts {
    pub parallel: usize,
    pub tuning: SocketTuning,
    /// Connect and greeting deadline.
    pub timeout: Duration,
    /// Progress deadline of a fetch connection ([`DEFAULT_STALL_TIMEOUT`]).
    pub stall: Duration,
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
        stall,
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
        stall,
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
            SocketTuning::default(),
            Duration::from_secs(5),
            stall,
            None,
        );
        server.set_me(id);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
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
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut conns = Vec::new();
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let hello = transport::read_hello(&mut s, Duration::from_secs(5))
                    .await
                    .unwrap();
                transport::write_hello(&mut s, &hello).await.unwrap();
                let mut head = [0u8; 28];
                s.read_exact(&mut head).await.unwrap();
                let offset = u64::from_le_bytes(head[8..16].try_into().unwrap()) as usize;
                let len = u64::from_le_bytes(head[16..24].try_into().unwrap()) as usize;
                let name_len = u32::from_le_bytes(head[24..28].try_into().unwrap()) as usize;
                let mut name = vec![0u8; name_len];
                s.read_exact(&mut name).await.unwrap();
                let h = hash::tensor_hash(&data);
                s.write_all(&response_head(STATUS_OK, h, len as u64))
                    .await
                    .unwrap();
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
            tuning: SocketTuning::default(),
            timeout: Duration::from_secs(5),
            stall,
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
            tuning: SocketTuning::default(),
            timeout: Duration::from_secs(5),
            stall,
        };
        let mut tm = SyncTimings::default();
        let t0 = Instant::now();
        let got = fetch_tensors(peer(0), 7, &state, &items, sources, opts, &mut tm).await;
        let took = t0.elapsed();
        assert!(matches!(got, Err(Error::RankConnectionLost(_))), "{got:?}");
        assert_eq!(tm.failed_sources, 2);
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }

    /// A fetching peer pipelines requests for `range`-byte ranges and never
    /// reads: the holder's writes fill the socket buffers and block. Ending
    /// the sync must not wait for them, and the next sync must begin.
    async fn receiver_stops_reading(range: u64, tuning: SocketTuning) {
        let data = vec![5u8; 64 << 20];
        let server = SharedStateServer::with_upload_limit(
            CancellationToken::new(),
            tuning,
            Duration::from_secs(5),
            DEFAULT_STALL_TIMEOUT,
            None,
        );
        server.set_me(peer(2));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
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
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(n) = tuning.buffer_bytes {
            sock.set_recv_buffer_size(n as u32).unwrap();
        }
        let mut s = sock.connect(addr).await.unwrap();
        let hello = Hello {
            kind: ConnKind::SharedState,
            from: peer(0),
            to: peer(2),
        };
        transport::write_hello(&mut s, &hello).await.unwrap();
        transport::read_hello(&mut s, Duration::from_secs(5))
            .await
            .unwrap();
        let (_rd, mut wr) = s.into_split();
        // Requests go out until the holder stops reading them.
        let writer = tokio::spawn(async move {
            for k in 0.. {
                let mut req = Vec::new();
                for j in 0..64u64 {
                    req.extend_from_slice(&7u64.to_le_bytes());
                    req.extend_from_slice(&(((k * 64 + j) * range) % (64 << 20)).to_le_bytes());
                    req.extend_from_slice(&range.to_le_bytes());
                    req.extend_from_slice(&1u32.to_le_bytes());
                    req.push(b'w');
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
