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
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, RwLock};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::hash;
use crate::transport::{self, SocketTuning};
use crate::wire::{ConnKind, Hello, PeerEntry, PeerId, MAX_NAME_LEN};

/// Bytes fetched per request; a multiple of the hash leaf size so each range
/// hashes independently and ranges can be fetched in parallel.
const RANGE_BYTES: usize = 64 * hash::LEAF_SIZE;
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
}

/// Serves this peer's shared-state tensors during a sync.
pub(crate) struct SharedStateServer {
    current: watch::Sender<u64>,
    serving: RwLock<Option<Serving>>,
    shutdown: CancellationToken,
    tuning: SocketTuning,
    timeout: Duration,
    me: Mutex<PeerId>,
}

impl SharedStateServer {
    pub fn new(shutdown: CancellationToken, tuning: SocketTuning, timeout: Duration) -> Arc<Self> {
        Arc::new(SharedStateServer {
            current: watch::channel(0).0,
            serving: RwLock::new(None),
            shutdown,
            tuning,
            timeout,
            me: Mutex::new(PeerId::default()),
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
    ) -> (CancellationToken, Arc<AtomicU64>) {
        let cancel = self.shutdown.child_token();
        let tx = Arc::new(AtomicU64::new(0));
        *self.serving.write().await = Some(Serving {
            sync_id: 0,
            tensors,
            cancel: cancel.clone(),
            tx_bytes: tx.clone(),
        });
        (cancel, tx)
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
            tokio::select! {
                _ = sv.cancel.cancelled() => return Ok(()),
                r = s.write_all(data) => r?,
            }
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
    leaves: Mutex<Vec<u64>>,
    declared: Mutex<Option<u64>>,
}

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
    tuning: SocketTuning,
    timeout: Duration,
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

    /// Fetches one range into its destination; returns the source's declared hash.
    async fn fetch_range(
        &self,
        s: &mut TcpStream,
        r: &Range,
    ) -> io::Result<std::result::Result<u64, String>> {
        let t = &self.targets[r.target];
        let mut req = Vec::with_capacity(28 + t.name.len());
        req.extend_from_slice(&self.sync_id.to_le_bytes());
        req.extend_from_slice(&(r.offset as u64).to_le_bytes());
        req.extend_from_slice(&(r.len as u64).to_le_bytes());
        req.extend_from_slice(&(t.name.len() as u32).to_le_bytes());
        req.extend_from_slice(t.name.as_bytes());
        s.write_all(&req).await?;
        let mut resp = [0u8; 17];
        s.read_exact(&mut resp).await?;
        let status = resp[0];
        let declared = u64::from_le_bytes(resp[1..9].try_into().unwrap_or_default());
        let body = u64::from_le_bytes(resp[9..17].try_into().unwrap_or_default());
        if status != STATUS_OK {
            return Ok(Err(format!(
                "source refused tensor '{}' (status {status})",
                t.name
            )));
        }
        if body != r.len as u64 {
            return Err(io::Error::other("source sent a range of the wrong size"));
        }
        // SAFETY: ranges of one fetch are disjoint, the destination tensor is
        // valid for `len` bytes for the whole sync, and every fetch task is
        // joined before the sync returns.
        let dst = unsafe { std::slice::from_raw_parts_mut((t.ptr + r.offset) as *mut u8, r.len) };
        s.read_exact(dst).await?;
        self.rx_bytes
            .fetch_add(r.len as u64 + 17, Ordering::Relaxed);
        let first_leaf = r.offset / hash::LEAF_SIZE;
        if let Ok(mut leaves) = t.leaves.lock() {
            for (i, chunk) in dst.chunks(hash::LEAF_SIZE).enumerate() {
                leaves[first_leaf + i] = hash::leaf_hash(chunk);
            }
        }
        Ok(Ok(declared))
    }

    async fn worker(self: Arc<Self>, start: usize) -> Result<()> {
        let mut conn: Option<(PeerEntry, TcpStream)> = None;
        loop {
            let Some(range) = self.queue.lock().ok().and_then(|mut q| q.pop_front()) else {
                return Ok(());
            };
            loop {
                if conn.is_none() {
                    let Some(src) = self.next_source(start) else {
                        return Err(Error::RankConnectionLost(
                            "every peer holding the popular shared state failed during the transfer".into(),
                        ));
                    };
                    match self.connect(&src).await {
                        Ok(s) => conn = Some((src, s)),
                        Err(e) => {
                            tracing::warn!(peer = %self.me, from = %src.id, "cannot reach shared-state source: {e}");
                            self.mark_failed(src.id);
                            continue;
                        }
                    }
                }
                let Some((src, s)) = conn.as_mut() else {
                    continue;
                };
                let t = &self.targets[range.target];
                match self.fetch_range(s, &range).await {
                    Ok(Ok(declared)) => {
                        if !t.inequality && declared != t.expected {
                            tracing::warn!(peer = %self.me, from = %src.id, tensor = %t.name,
                                "source does not hold the popular content; trying another");
                            self.mark_failed(src.id);
                            conn = None;
                            continue;
                        }
                        if let Ok(mut d) = t.declared.lock() {
                            *d = Some(declared);
                        }
                        break;
                    }
                    Ok(Err(why)) => {
                        tracing::warn!(peer = %self.me, from = %src.id, "{why}; trying another source");
                        self.mark_failed(src.id);
                        conn = None;
                    }
                    Err(e) => {
                        tracing::warn!(peer = %self.me, from = %src.id, "shared-state transfer broke: {e}; trying another source");
                        self.mark_failed(src.id);
                        conn = None;
                    }
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
    let job = Arc::new(FetchJob {
        me,
        sync_id,
        targets,
        queue: Mutex::new(queue),
        sources,
        failed_sources: Mutex::new(HashSet::new()),
        rx_bytes: AtomicU64::new(0),
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
    result?;
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
    let (cancel, tx_bytes) = server.begin(served).await;
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
        let (sync_id, revision, fetch, sources) = match waiter.recv().await? {
            Routed::Msg(MasterMsg::SyncPlan { sync_id, revision, fetch, sources }) => (sync_id, revision, fetch, sources),
            Routed::Msg(MasterMsg::SyncResult { ok: false, code, reason, .. }) => {
                return Err(crate::comm::error_from_code(code, reason));
            }
            _ => return Err(Error::Internal("unexpected answer to a shared-state vote".into())),
        };
        server.set_sync_id(sync_id).await;
        let mut rx = 0;
        if !fetch.is_empty() {
            tracing::info!(peer = %me, sync_id, revision, tensors = fetch.len(), "fetching shared state");
            let items: Vec<(String, u64)> = fetch.into_iter().map(|f| (f.name, f.expected_hash)).collect();
            let fetched = fetch_tensors(me, sync_id, state, &items, sources, opts).await;
            let ok = fetched.is_ok();
            ctl.send(&PeerMsg::SyncTransferDone { sync_id, ok, failed_source: None })?;
            rx = fetched?;
        }
        loop {
            match waiter.recv().await? {
                Routed::Msg(MasterMsg::SyncResult { sync_id: id, ok, code, reason }) if id == sync_id || id == 0 => {
                    if !ok {
                        return Err(crate::comm::error_from_code(code, reason));
                    }
                    break;
                }
                _ => continue,
            }
        }
        state.revision = revision;
        Ok(rx)
    }
    .await;
    server.end(&cancel).await;
    let rx = outcome?;
    Ok(crate::SyncInfo {
        tx_bytes: tx_bytes.load(Ordering::Relaxed),
        rx_bytes: rx,
    })
}
