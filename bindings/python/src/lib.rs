//! `pccl._native`: the native half of the `pccl` Python package.
//!
//! This module is private. The public API (`pccl.Communicator`,
//! `pccl.MasterNode`, tensor helpers, enums) is written in Python on top of
//! it, in `python/pccl/`. The Python layer turns NumPy arrays and PyTorch
//! tensors into raw `(address, element count, data type)` triples, checks
//! them, and hands this module the owning Python objects as well ("keep"
//! objects): this module holds those references until the Rust core has
//! finished with the memory, even when the Python caller has moved on
//! (interrupted wait, dropped handle).
//!
//! Every blocking call runs on a helper thread while the calling thread
//! waits *without the GIL*, waking every [`POLL`] to run Python's signal
//! handlers, so Ctrl-C raises `KeyboardInterrupt` within a fraction of a
//! second. An interrupted membership call or synchronous collective closes
//! the communicator (the core finishes the call in the background, then
//! leaves the swarm); an interrupted `AsyncReduceHandle.wait()` leaves both
//! the handle and the communicator usable.
//!
//! Argument and state errors are raised at the call, with the C API's
//! result codes (`pccl-ffi/src/comm.rs`): a collective (all-reduce,
//! broadcast, all-gather, reduce-scatter) in a group of one is
//! `TOO_FEW_PEERS` when it is started (not at `wait()`), a tag still used by
//! an async collective that was not awaited is `INVALID_ARGUMENT`, as are a
//! broadcast root outside the group and buffer sizes that do not fit the
//! group's size; topology and shared-state calls while async collectives
//! are not awaited are `PENDING_ASYNC_OPS`, and `optimize_topology` with
//! fewer than two peers in the run is `INVALID_USAGE`.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use pccl_core::{
    Attribute, CollectiveInfo, CollectiveKind, Communicator, CommunicatorConfig, DataType,
    DeviceType, DistributionHint, MasterConfig, MasterNode, QuantizationAlgorithm,
    QuantizationOptions, RawReduceOp, ReduceDescriptor, ReduceInfo, ReduceOp, SharedState,
    SharedTensor, SyncStrategy,
};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// How long a blocking call sleeps without the GIL between signal checks.
const POLL: Duration = Duration::from_millis(50);

type CoreResult<T> = pccl_core::Result<T>;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Turns a core error into `pccl.PCCLError` (built by the Python layer so it
/// carries a `pccl.Result` member); falls back to `RuntimeError` should the
/// Python side be unavailable (interpreter shutting down).
fn pccl_err(py: Python<'_>, func: &str, e: &pccl_core::Error) -> PyErr {
    let make = || -> PyResult<PyErr> {
        let module = py.import("pccl._errors")?;
        let exc = module
            .getattr("PCCLError")?
            .call_method1("_from_native", (e.code(), func, e.message()))?;
        Ok(PyErr::from_value(exc))
    };
    match make() {
        Ok(err) => err,
        Err(_) => PyRuntimeError::new_err(format!("{func} failed: {e} (code {})", e.code())),
    }
}

fn internal(msg: impl Into<String>) -> pccl_core::Error {
    pccl_core::Error::Internal(msg.into())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it;
    // the data here (options, flags) stays consistent, so carry on.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------
// Background tasks with an interruptible, GIL-free wait
// ---------------------------------------------------------------------------

/// The result of work running on a helper thread.
struct Slot<T> {
    value: Mutex<Option<T>>,
    cv: Condvar,
    done: AtomicBool,
}

impl<T> Slot<T> {
    fn new() -> Arc<Self> {
        Arc::new(Slot {
            value: Mutex::new(None),
            cv: Condvar::new(),
            done: AtomicBool::new(false),
        })
    }

    fn put(&self, v: T) {
        *lock(&self.value) = Some(v);
        self.done.store(true, Ordering::Release);
        self.cv.notify_all();
    }

    fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Waits up to `timeout`; takes the value if it is there.
    fn take_timeout(&self, timeout: Duration) -> Option<T> {
        let guard = lock(&self.value);
        let (mut guard, _) = self
            .cv
            .wait_timeout_while(guard, timeout, |v| v.is_none())
            .unwrap_or_else(|p| p.into_inner());
        guard.take()
    }
}

/// Runs `f` on a new thread; its result (or a panic, as an internal error)
/// lands in the returned slot.
fn spawn_task<T, F>(name: &str, f: F) -> CoreResult<Arc<Slot<CoreResult<T>>>>
where
    T: Send + 'static,
    F: FnOnce() -> CoreResult<T> + Send + 'static,
{
    let slot = Slot::new();
    let out = slot.clone();
    std::thread::Builder::new()
        .name(format!("pccl-py-{name}"))
        .spawn(move || {
            let r = std::panic::catch_unwind(AssertUnwindSafe(f))
                .unwrap_or_else(|_| Err(internal("the pccl core panicked")));
            out.put(r);
        })
        .map_err(|e| internal(format!("cannot start a helper thread: {e}")))?;
    Ok(slot)
}

/// Waits for a slot without holding the GIL, running Python signal handlers
/// every [`POLL`]. Returns `Err` (typically `KeyboardInterrupt`) when a
/// handler raised; the slot is left untouched then.
fn wait_slot<T: Send>(py: Python<'_>, slot: &Slot<T>) -> PyResult<T> {
    loop {
        if let Some(v) = py.detach(|| slot.take_timeout(POLL)) {
            return Ok(v);
        }
        py.check_signals()?;
    }
}

/// Python objects whose memory the core may still be using after their
/// Python-side owner went away; dropped once the work is done.
struct Orphan {
    done: Arc<dyn Fn() -> bool + Send + Sync>,
    // Held only to keep the objects (and their memory) alive.
    _keep: Py<PyAny>,
}

static ORPHANS: Mutex<Vec<Orphan>> = Mutex::new(Vec::new());

fn adopt_orphan(done: Arc<dyn Fn() -> bool + Send + Sync>, keep: Py<PyAny>) {
    lock(&ORPHANS).push(Orphan { done, _keep: keep });
}

/// Releases the references of finished orphans. The references are dropped
/// after the lock is released: freeing a tensor may run arbitrary Python.
fn prune_orphans(_py: Python<'_>) {
    let finished: Vec<Orphan> = {
        let mut all = lock(&ORPHANS);
        let (done, pending): (Vec<Orphan>, Vec<Orphan>) = all.drain(..).partition(|o| (o.done)());
        *all = pending;
        done
    };
    drop(finished);
}

// ---------------------------------------------------------------------------
// Argument conversion
// ---------------------------------------------------------------------------

/// Resolves `"ip:port"` / `"host:port"` / `"[v6]:port"` (a name lookup may
/// block, so without the GIL).
fn resolve(py: Python<'_>, addr: &str) -> PyResult<SocketAddr> {
    let resolved = py.detach(|| addr.to_socket_addrs().map(|it| it.collect::<Vec<_>>()));
    let mut it = resolved.map(|v| v.into_iter()).map_err(|e| {
        PyValueError::new_err(format!(
            "invalid address {addr:?} (expected \"ip:port\" or \"host:port\"): {e}"
        ))
    })?;
    it.next()
        .ok_or_else(|| PyValueError::new_err(format!("address {addr:?} resolves to nothing")))
}

/// A reduce descriptor as the Python layer passes it:
/// `(count, datatype, op, tag, distribution_hint, quantized_datatype, quantization_algorithm)`.
type DescTuple = (usize, u32, u32, u64, u32, u32, u32);

fn descriptor(py: Python<'_>, func: &str, d: DescTuple) -> PyResult<ReduceDescriptor> {
    let (count, dtype, op, tag, hint, qdtype, qalgo) = d;
    let conv = || -> CoreResult<ReduceDescriptor> {
        let datatype = DataType::from_raw(dtype)?;
        let algorithm = QuantizationAlgorithm::from_raw(qalgo)?;
        let quantized_datatype = if algorithm == QuantizationAlgorithm::None {
            // Ignored by the core; PCCL 1.0 callers pass the operand type here.
            DataType::from_raw(qdtype).unwrap_or(DataType::U8)
        } else {
            DataType::from_raw(qdtype)?
        };
        Ok(ReduceDescriptor {
            count,
            op: ReduceOp::from_raw(op)?,
            tag,
            datatype,
            distribution_hint: DistributionHint::from_raw(hint)?,
            quantization: QuantizationOptions {
                quantized_datatype,
                algorithm,
            },
        })
    };
    conv().map_err(|e| pccl_err(py, func, &e))
}

fn info_tuple(i: ReduceInfo) -> (u32, u64, u64) {
    (i.local_world_size, i.tx_bytes, i.rx_bytes)
}

/// `(world_size, rank, tx_bytes, rx_bytes, algorithm name)`.
type CollTuple = (u32, u32, u64, u64, &'static str);

fn coll_tuple(i: CollectiveInfo) -> CollTuple {
    (
        i.world_size,
        i.rank,
        i.tx_bytes,
        i.rx_bytes,
        i.algorithm.name(),
    )
}

/// A collective kind as the Python layer passes it (1 broadcast, 2
/// all-gather, 3 reduce-scatter; all-reduce has its own methods).
fn collective_kind(kind: u8) -> CoreResult<CollectiveKind> {
    match CollectiveKind::from_raw(kind)? {
        CollectiveKind::AllReduce => Err(pccl_core::Error::InvalidArgument(
            "use all_reduce for an all-reduce".into(),
        )),
        k => Ok(k),
    }
}

fn kind_func(kind: CollectiveKind, is_async: bool) -> &'static str {
    match (kind, is_async) {
        (CollectiveKind::Broadcast, false) => "pcclBroadcast",
        (CollectiveKind::Broadcast, true) => "pcclBroadcastAsync",
        (CollectiveKind::AllGather, false) => "pcclAllGather",
        (CollectiveKind::AllGather, true) => "pcclAllGatherAsync",
        (CollectiveKind::ReduceScatter, false) => "pcclReduceScatter",
        (CollectiveKind::ReduceScatter, true) => "pcclReduceScatterAsync",
        (CollectiveKind::AllReduce, false) => "pcclAllReduce",
        (CollectiveKind::AllReduce, true) => "pcclAllReduceAsync",
    }
}

/// Reports whether an operation is over.
type DoneFn = Arc<dyn Fn() -> bool + Send + Sync>;

/// Tags of async collectives started on one communicator and not awaited
/// yet, as the C API tracks them: `None` while a handle is alive and not
/// awaited, `Some(done)` once the handle was dropped without `wait()` (the
/// tag stays taken until the operation is over).
#[derive(Default)]
struct AsyncTags(Mutex<HashMap<u64, Option<DoneFn>>>);

impl AsyncTags {
    fn live(&self) -> MutexGuard<'_, HashMap<u64, Option<DoneFn>>> {
        let mut m = lock(&self.0);
        m.retain(|_, dropped| dropped.as_ref().is_none_or(|done| !done()));
        m
    }

    /// `InvalidArgument` if `tag` belongs to an async collective not awaited yet.
    fn ensure_free(&self, tag: u64) -> CoreResult<()> {
        if self.live().contains_key(&tag) {
            return Err(pccl_core::Error::InvalidArgument(format!(
                "tag {tag} is used by an async collective that has not been awaited"
            )));
        }
        Ok(())
    }

    /// `PendingAsyncOps` while async collectives are not awaited.
    fn ensure_none(&self) -> CoreResult<()> {
        let n = self.live().len();
        if n > 0 {
            return Err(pccl_core::Error::PendingAsyncOps(format!(
                "{n} async collective(s) must be awaited first"
            )));
        }
        Ok(())
    }

    fn insert(&self, tag: u64) {
        lock(&self.0).insert(tag, None);
    }

    fn release(&self, tag: u64) {
        lock(&self.0).remove(&tag);
    }

    fn orphan(&self, tag: u64, done: DoneFn) {
        lock(&self.0).insert(tag, Some(done));
    }
}

// ---------------------------------------------------------------------------
// Communicator
// ---------------------------------------------------------------------------

/// Native communicator; see `pccl.Communicator` for the public API.
#[pyclass(frozen, module = "pccl._native")]
struct NativeCommunicator {
    inner: Mutex<Option<Arc<Communicator>>>,
    tags: Arc<AsyncTags>,
}

impl NativeCommunicator {
    fn get(&self, py: Python<'_>, func: &str) -> PyResult<Arc<Communicator>> {
        lock(&self.inner).clone().ok_or_else(|| {
            pccl_err(
                py,
                func,
                &pccl_core::Error::InvalidUsage("the communicator is closed".into()),
            )
        })
    }

    /// `INVALID_USAGE` if closed (or not connected), then `PENDING_ASYNC_OPS`
    /// while async collectives are not awaited (the C API's order).
    fn ensure_no_async_ops(&self, py: Python<'_>, func: &str) -> PyResult<()> {
        let comm = self.get(py, func)?;
        comm.world()
            .and_then(|_| self.tags.ensure_none())
            .map_err(|e| pccl_err(py, func, &e))
    }

    /// Drops this object's reference; the core leaves the swarm once the
    /// last helper thread using it is done.
    fn close_inner(&self, py: Python<'_>) {
        let comm = lock(&self.inner).take();
        if let Some(comm) = comm {
            // Dropping the last reference sends `Leave` and stops the runtime.
            py.detach(move || drop(comm));
        }
    }

    /// Runs a blocking call on a helper thread; Ctrl-C closes the communicator.
    fn blocking<T, F>(
        &self,
        py: Python<'_>,
        func: &str,
        keep: Option<Py<PyAny>>,
        f: F,
    ) -> PyResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Communicator) -> CoreResult<T> + Send + 'static,
    {
        prune_orphans(py);
        let comm = self.get(py, func)?;
        let slot = spawn_task(func, move || f(&comm)).map_err(|e| pccl_err(py, func, &e))?;
        match wait_slot(py, &slot) {
            Ok(r) => {
                drop(keep);
                r.map_err(|e| pccl_err(py, func, &e))
            }
            Err(interrupt) => {
                if let Some(keep) = keep {
                    let s = slot.clone();
                    adopt_orphan(Arc::new(move || s.is_done()), keep);
                }
                self.close_inner(py);
                Err(interrupt)
            }
        }
    }

    /// Starts an all-reduce; the returned slot fills when it is over.
    fn start_all_reduce(
        &self,
        py: Python<'_>,
        func: &str,
        send: usize,
        recv: usize,
        desc: DescTuple,
    ) -> PyResult<Arc<Slot<CoreResult<CollectiveInfo>>>> {
        prune_orphans(py);
        let desc = descriptor(py, func, desc)?;
        // The C API's order: descriptor and buffers, connection, tag, peers.
        let check_buffers = || -> CoreResult<()> {
            let bytes = pccl_core::comm::validate_descriptor(&desc)?;
            if send == 0 || recv == 0 {
                return Err(pccl_core::Error::InvalidArgument(
                    "send and receive buffers must not be NULL".into(),
                ));
            }
            if send != recv
                && send < recv.saturating_add(bytes)
                && recv < send.saturating_add(bytes)
            {
                return Err(pccl_core::Error::InvalidArgument(
                    "send and receive buffers overlap without being identical".into(),
                ));
            }
            Ok(())
        };
        check_buffers().map_err(|e| pccl_err(py, func, &e))?;
        let comm = self.get(py, func)?;
        let check_state = || -> CoreResult<()> {
            let world = comm.attribute(Attribute::PeerGroupWorldSize)?;
            self.tags.ensure_free(desc.tag)?;
            if world < 2 {
                return Err(pccl_core::Error::TooFewPeers(format!(
                    "the peer group has {world} accepted peer(s); an all-reduce needs two"
                )));
            }
            Ok(())
        };
        check_state().map_err(|e| pccl_err(py, func, &e))?;
        // SAFETY: the Python layer derived `send`/`recv` from live, contiguous,
        // CPU-resident buffers of at least `desc.count` elements of
        // `desc.datatype` (checked there) and passed the owning objects as
        // `keep`, which the caller holds (directly, or via the orphan list)
        // until the returned slot is filled, i.e. until the core is done with
        // the memory. A null or overlapping pair is rejected by the core.
        let handle =
            unsafe { comm.all_reduce_async_raw(send as *const u8, recv as *mut u8, &desc) }
                .map_err(|e| pccl_err(py, func, &e))?;
        spawn_task("await", move || comm.await_collective(handle))
            .map_err(|e| pccl_err(py, func, &e))
    }

    /// Starts a broadcast, all-gather or reduce-scatter; the returned slot
    /// fills when it is over. `send_count` / `recv_count` are the buffers'
    /// element counts as the Python layer measured them; they are checked
    /// here against the group's size, so the core never touches memory
    /// past either buffer.
    #[allow(clippy::too_many_arguments)]
    fn start_collective(
        &self,
        py: Python<'_>,
        func: &str,
        kind: CollectiveKind,
        send: usize,
        send_count: usize,
        recv: usize,
        recv_count: usize,
        desc: DescTuple,
        root: u32,
    ) -> PyResult<Arc<Slot<CoreResult<CollectiveInfo>>>> {
        prune_orphans(py);
        let desc = descriptor(py, func, desc)?;
        let check_args = || -> CoreResult<()> {
            pccl_core::comm::validate_descriptor(&desc)?;
            if kind != CollectiveKind::ReduceScatter
                && desc.quantization.algorithm != QuantizationAlgorithm::None
            {
                return Err(pccl_core::Error::InvalidArgument(format!(
                    "{} does not quantize (it moves each peer's bytes unchanged)",
                    kind.name()
                )));
            }
            if send == 0 || recv == 0 {
                return Err(pccl_core::Error::InvalidArgument(
                    "send and receive buffers must not be NULL".into(),
                ));
            }
            Ok(())
        };
        check_args().map_err(|e| pccl_err(py, func, &e))?;
        let comm = self.get(py, func)?;
        let check_state = || -> CoreResult<()> {
            let world = comm.attribute(Attribute::PeerGroupWorldSize)?;
            self.tags.ensure_free(desc.tag)?;
            if world < 2 {
                return Err(pccl_core::Error::TooFewPeers(format!(
                    "the peer group has {world} accepted peer(s); a {} needs two",
                    kind.name()
                )));
            }
            let w = world as usize;
            let (want_send, want_recv) = match kind {
                CollectiveKind::Broadcast => (desc.count, desc.count),
                CollectiveKind::AllGather => (desc.count, desc.count.saturating_mul(w)),
                _ => (desc.count.saturating_mul(w), desc.count),
            };
            if send_count != want_send || recv_count != want_recv {
                return Err(pccl_core::Error::InvalidArgument(format!(
                    "a {} of {} element(s) per peer over {world} peers needs buffers of {want_send} \
                     (send) and {want_recv} (recv) elements, got {send_count} and {recv_count}",
                    kind.name(),
                    desc.count
                )));
            }
            if kind == CollectiveKind::Broadcast && root >= world {
                return Err(pccl_core::Error::InvalidArgument(format!(
                    "root {root} is not a rank of the peer group (world size {world})"
                )));
            }
            Ok(())
        };
        check_state().map_err(|e| pccl_err(py, func, &e))?;
        // SAFETY: the Python layer derived `send`/`recv` from live,
        // contiguous, CPU-resident buffers of `send_count`/`recv_count`
        // elements of `desc.datatype` (`recv` writable), checked above
        // against the sizes the op uses for the group's current size, and
        // passed the owning objects as `keep`, which the caller holds
        // (directly, or via the orphan list) until the returned slot is
        // filled, i.e. until the core is done with the memory. Overlapping
        // buffers are rejected by the core.
        let handle = unsafe {
            match kind {
                CollectiveKind::Broadcast => comm.broadcast_async_raw(recv as *mut u8, &desc, root),
                CollectiveKind::AllGather => {
                    comm.all_gather_async_raw(send as *const u8, recv as *mut u8, &desc)
                }
                _ => comm.reduce_scatter_async_raw(send as *const u8, recv as *mut u8, &desc),
            }
        }
        .map_err(|e| pccl_err(py, func, &e))?;
        spawn_task("await", move || comm.await_collective(handle))
            .map_err(|e| pccl_err(py, func, &e))
    }

    /// Waits for a started operation as a blocking call does: Ctrl-C
    /// orphans `keep` until the operation is over and closes the communicator.
    fn finish_blocking<T>(
        &self,
        py: Python<'_>,
        func: &str,
        slot: Arc<Slot<CoreResult<T>>>,
        keep: Py<PyAny>,
    ) -> PyResult<T>
    where
        T: Send + 'static,
    {
        match wait_slot(py, &slot) {
            Ok(r) => {
                drop(keep);
                r.map_err(|e| pccl_err(py, func, &e))
            }
            Err(interrupt) => {
                let s = slot.clone();
                adopt_orphan(Arc::new(move || s.is_done()), keep);
                self.close_inner(py);
                Err(interrupt)
            }
        }
    }

    fn handle(
        &self,
        tag: u64,
        slot: Arc<Slot<CoreResult<CollectiveInfo>>>,
        keep: Py<PyAny>,
    ) -> NativeHandle {
        self.tags.insert(tag);
        NativeHandle {
            tag,
            slot,
            keep: Mutex::new(Some(keep)),
            outcome: Mutex::new(None),
            tags: self.tags.clone(),
        }
    }
}

#[pymethods]
impl NativeCommunicator {
    /// `NativeCommunicator(master_addr, peer_group, p2p_connection_pool_size,
    /// shared_state_port, p2p_port, benchmark_port, advertised_ip=None,
    /// on_sync_progress=None, progress_interval_s=None)`; a port of 0 means
    /// "any free port". `on_sync_progress(received_bytes, total_bytes,
    /// elapsed_s, done)` is called during shared-state fetches (see
    /// `CommunicatorConfig::on_sync_progress`), from a library thread with
    /// the GIL taken; an exception it raises is printed and ignored.
    #[new]
    #[pyo3(signature = (master_addr, peer_group=0, p2p_connection_pool_size=0, shared_state_port=pccl_core::DEFAULT_SHARED_STATE_PORT, p2p_port=pccl_core::DEFAULT_P2P_PORT, benchmark_port=pccl_core::DEFAULT_BENCHMARK_PORT, advertised_ip=None, on_sync_progress=None, progress_interval_s=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        master_addr: &str,
        peer_group: u32,
        p2p_connection_pool_size: u32,
        shared_state_port: u16,
        p2p_port: u16,
        benchmark_port: u16,
        advertised_ip: Option<&str>,
        on_sync_progress: Option<Py<PyAny>>,
        progress_interval_s: Option<f64>,
    ) -> PyResult<Self> {
        let addr = resolve(py, master_addr)?;
        let mut cfg = CommunicatorConfig::new(addr);
        cfg.peer_group = peer_group;
        cfg.p2p_connection_pool_size = p2p_connection_pool_size.max(1);
        cfg.shared_state_port = shared_state_port;
        cfg.p2p_port = p2p_port;
        cfg.benchmark_port = benchmark_port;
        if let Some(ip) = advertised_ip {
            cfg.advertised_ip = Some(ip.parse().map_err(|e| {
                PyValueError::new_err(format!("invalid advertised_ip {ip:?}: {e}"))
            })?);
        }
        if let Some(secs) = progress_interval_s {
            if !(secs.is_finite() && secs >= 0.0) {
                return Err(PyValueError::new_err(format!(
                    "progress_interval_s must be a non-negative number of seconds, got {secs}"
                )));
            }
            cfg.progress_interval = Duration::from_secs_f64(secs);
        }
        if let Some(cb) = on_sync_progress {
            if !cb.bind(py).is_callable() {
                return Err(PyValueError::new_err("on_sync_progress must be callable"));
            }
            cfg.on_sync_progress = Some(pccl_core::SyncProgressCallback::new(
                move |p: pccl_core::SyncProgress| {
                    Python::attach(|py| {
                        let args = (
                            p.received_bytes,
                            p.total_bytes,
                            p.elapsed.as_secs_f64(),
                            p.done,
                        );
                        if let Err(e) = cb.bind(py).call1(args) {
                            e.print(py);
                        }
                    })
                },
            ));
        }
        let comm =
            Communicator::new(cfg).map_err(|e| pccl_err(py, "pcclCreateCommunicator", &e))?;
        Ok(NativeCommunicator {
            inner: Mutex::new(Some(Arc::new(comm))),
            tags: Arc::new(AsyncTags::default()),
        })
    }

    /// Registers with the master; blocks until the existing peers accept us.
    fn connect(&self, py: Python<'_>) -> PyResult<()> {
        self.blocking(py, "pcclConnect", None, |c| c.connect())
    }

    fn update_topology(&self, py: Python<'_>) -> PyResult<()> {
        let func = "pcclUpdateTopology";
        self.ensure_no_async_ops(py, func)?;
        self.blocking(py, func, None, |c| c.update_topology())
    }

    fn are_peers_pending(&self, py: Python<'_>) -> PyResult<bool> {
        self.blocking(py, "pcclArePeersPending", None, |c| c.are_peers_pending())
    }

    /// As `pcclOptimizeTopology`: `INVALID_USAGE` when not connected or
    /// alone in the run, `PENDING_ASYNC_OPS` with async all-reduces not awaited.
    fn optimize_topology(&self, py: Python<'_>) -> PyResult<()> {
        let func = "pcclOptimizeTopology";
        self.ensure_no_async_ops(py, func)?;
        let comm = self.get(py, func)?;
        let alone = comm
            .attribute(Attribute::GlobalWorldSize)
            .map_err(|e| pccl_err(py, func, &e))?
            < 2;
        if alone {
            return Err(pccl_err(
                py,
                func,
                &pccl_core::Error::InvalidUsage(
                    "topology optimization needs at least two peers in the run".into(),
                ),
            ));
        }
        self.blocking(py, func, None, |c| c.optimize_topology())
    }

    fn get_attribute(&self, py: Python<'_>, attribute: u32) -> PyResult<u32> {
        let func = "pcclGetAttribute";
        let comm = self.get(py, func)?;
        Attribute::from_raw(attribute)
            .and_then(|a| comm.attribute(a))
            .map_err(|e| pccl_err(py, func, &e))
    }

    /// Blocking all-reduce; returns `(local_world_size, tx_bytes, rx_bytes)`.
    fn all_reduce(
        &self,
        py: Python<'_>,
        send: usize,
        recv: usize,
        desc: DescTuple,
        keep: Py<PyAny>,
    ) -> PyResult<(u32, u64, u64)> {
        let func = "pcclAllReduce";
        let slot = self.start_all_reduce(py, func, send, recv, desc)?;
        let info = self.finish_blocking(py, func, slot, keep)?;
        Ok(info_tuple(info.into()))
    }

    /// Blocking broadcast (`kind` 1), all-gather (2) or reduce-scatter (3);
    /// returns `(world_size, rank, tx_bytes, rx_bytes, algorithm)`.
    #[allow(clippy::too_many_arguments)]
    fn collective(
        &self,
        py: Python<'_>,
        kind: u8,
        send: usize,
        send_count: usize,
        recv: usize,
        recv_count: usize,
        desc: DescTuple,
        root: u32,
        keep: Py<PyAny>,
    ) -> PyResult<CollTuple> {
        let kind = collective_kind(kind).map_err(|e| pccl_err(py, "pcclCollective", &e))?;
        let func = kind_func(kind, false);
        let slot = self.start_collective(
            py, func, kind, send, send_count, recv, recv_count, desc, root,
        )?;
        let info = self.finish_blocking(py, func, slot, keep)?;
        Ok(coll_tuple(info))
    }

    /// Starts a broadcast, all-gather or reduce-scatter and returns a handle.
    #[allow(clippy::too_many_arguments)]
    fn collective_async(
        &self,
        py: Python<'_>,
        kind: u8,
        send: usize,
        send_count: usize,
        recv: usize,
        recv_count: usize,
        desc: DescTuple,
        root: u32,
        keep: Py<PyAny>,
    ) -> PyResult<NativeHandle> {
        let kind = collective_kind(kind).map_err(|e| pccl_err(py, "pcclCollectiveAsync", &e))?;
        let func = kind_func(kind, true);
        let tag = desc.3;
        let slot = self.start_collective(
            py, func, kind, send, send_count, recv, recv_count, desc, root,
        )?;
        Ok(self.handle(tag, slot, keep))
    }

    /// Starts an all-reduce and returns a handle at once.
    fn all_reduce_async(
        &self,
        py: Python<'_>,
        send: usize,
        recv: usize,
        desc: DescTuple,
        keep: Py<PyAny>,
    ) -> PyResult<NativeHandle> {
        let tag = desc.3;
        let slot = self.start_all_reduce(py, "pcclAllReduceAsync", send, recv, desc)?;
        Ok(self.handle(tag, slot, keep))
    }

    /// Many all-reduces with retry; `ops` holds `(send, recv, descriptor)`.
    fn all_reduce_multiple_with_retry(
        &self,
        py: Python<'_>,
        ops: Vec<(usize, usize, DescTuple)>,
        max_in_flight: usize,
        keep: Py<PyAny>,
    ) -> PyResult<(u32, u64, u64)> {
        let func = "pcclAllReduceMultipleWithRetry";
        let mut raw: Vec<(usize, usize, ReduceDescriptor)> = Vec::with_capacity(ops.len());
        for (send, recv, d) in ops {
            raw.push((send, recv, descriptor(py, func, d)?));
        }
        let _ = self.get(py, func)?;
        for (_, _, d) in &raw {
            self.tags
                .ensure_free(d.tag)
                .map_err(|e| pccl_err(py, func, &e))?;
        }
        let info = self.blocking(py, func, Some(keep), move |c| {
            let ops: Vec<RawReduceOp> = raw
                .iter()
                .map(|&(send, recv, desc)| RawReduceOp {
                    send: send as *const u8,
                    recv: recv as *mut u8,
                    desc,
                })
                .collect();
            // SAFETY: as for `start_all_reduce`: every pointer comes from a
            // live buffer the Python layer checked, whose owner is in `keep`,
            // held until this task ends (or by the orphan list on Ctrl-C).
            unsafe { c.all_reduce_multiple_with_retry_raw(&ops, max_in_flight) }
        })?;
        Ok(info_tuple(info))
    }

    /// Shared-state sync. `tensors` holds `(name, address, count, datatype,
    /// device_type, allow_content_inequality)`; returns
    /// `(revision, tx_bytes, rx_bytes)`.
    #[allow(clippy::type_complexity)]
    fn sync_shared_state(
        &self,
        py: Python<'_>,
        tensors: Vec<(String, usize, usize, u32, u32, bool)>,
        revision: u64,
        strategy: u32,
        keep: Py<PyAny>,
    ) -> PyResult<(u64, u64, u64)> {
        let func = "pcclSynchronizeSharedState";
        let check =
            || -> CoreResult<(SyncStrategy, Vec<(String, usize, usize, DataType, bool)>)> {
                let strategy = SyncStrategy::from_raw(strategy)?;
                let mut out = Vec::with_capacity(tensors.len());
                for (name, ptr, count, dtype, device, allow) in tensors {
                    let dtype = DataType::from_raw(dtype)?;
                    if DeviceType::from_raw(device)? != DeviceType::Cpu {
                        return Err(pccl_core::Error::InvalidArgument(format!(
                        "tensor {name:?} lives on a CUDA device; this build of pccl supports CPU memory only"
                    )));
                    }
                    if ptr == 0 || count == 0 {
                        return Err(pccl_core::Error::InvalidArgument(format!(
                            "tensor {name:?} is empty or has no data pointer"
                        )));
                    }
                    count.checked_mul(dtype.size()).ok_or_else(|| {
                        pccl_core::Error::InvalidArgument(format!("tensor {name:?} is too large"))
                    })?;
                    out.push((name, ptr, count, dtype, allow));
                }
                Ok((strategy, out))
            };
        let (strategy, tensors) = check().map_err(|e| pccl_err(py, func, &e))?;
        self.ensure_no_async_ops(py, func)?;
        self.blocking(py, func, Some(keep), move |c| {
            let shared: Vec<SharedTensor<'_>> = tensors
                .iter()
                .map(|(name, ptr, count, dtype, allow)| {
                    // SAFETY: the Python layer derived each address from a
                    // live, writable, contiguous CPU buffer of `count`
                    // elements of `dtype` (checked there) whose owner is in
                    // `keep`, held until this task ends.
                    unsafe {
                        SharedTensor::from_raw(
                            name.clone(),
                            *ptr as *mut u8,
                            *count,
                            *dtype,
                            DeviceType::Cpu,
                        )
                    }
                    .allow_content_inequality(*allow)
                })
                .collect();
            let mut state = SharedState::new(revision, shared);
            let info = c.sync_shared_state(&mut state, strategy)?;
            Ok((state.revision, info.tx_bytes, info.rx_bytes))
        })
    }

    /// Leaves the swarm (gracefully) and releases the communicator.
    fn close(&self, py: Python<'_>) {
        self.close_inner(py);
    }

    #[getter]
    fn closed(&self) -> bool {
        lock(&self.inner).is_none()
    }

    /// This peer's identity as assigned by the master (`None` before connect).
    #[getter]
    fn peer_id(&self) -> Option<String> {
        let comm = lock(&self.inner).clone()?;
        let id = comm.peer_id();
        (id != pccl_core::wire::PeerId::default())
            .then(|| id.0.iter().map(|b| format!("{b:02x}")).collect())
    }
}

// ---------------------------------------------------------------------------
// Async handle
// ---------------------------------------------------------------------------

/// `(is_success, result code, world_size, tx_bytes, rx_bytes, message,
/// rank, algorithm)`.
type Outcome = (bool, i32, u32, u64, u64, String, u32, &'static str);

/// A collective in flight; see `pccl.AsyncReduceHandle` and
/// `pccl.AsyncCollectiveHandle`.
#[pyclass(frozen, module = "pccl._native")]
struct NativeHandle {
    tag: u64,
    slot: Arc<Slot<CoreResult<CollectiveInfo>>>,
    keep: Mutex<Option<Py<PyAny>>>,
    outcome: Mutex<Option<Outcome>>,
    /// The communicator's table of tags not awaited yet.
    tags: Arc<AsyncTags>,
}

#[pymethods]
impl NativeHandle {
    #[getter]
    fn tag(&self) -> u64 {
        self.tag
    }

    /// Whether the operation is over (`wait()` will not block).
    fn is_finished(&self) -> bool {
        lock(&self.outcome).is_some() || self.slot.is_done()
    }

    /// Blocks (without the GIL) until the operation is over. Ctrl-C raises
    /// `KeyboardInterrupt` and leaves the handle waitable.
    fn wait(&self, py: Python<'_>) -> PyResult<Outcome> {
        loop {
            if let Some(o) = lock(&self.outcome).clone() {
                return Ok(o);
            }
            // Another thread may take the value first; it then stores the
            // outcome, which the next round sees.
            if let Some(r) = py.detach(|| self.slot.take_timeout(POLL)) {
                let outcome = match r {
                    Ok(i) => (
                        true,
                        0,
                        i.world_size,
                        i.tx_bytes,
                        i.rx_bytes,
                        String::new(),
                        i.rank,
                        i.algorithm.name(),
                    ),
                    Err(e) => (false, e.code(), 0, 0, 0, e.message().to_string(), 0, ""),
                };
                *lock(&self.outcome) = Some(outcome.clone());
                self.tags.release(self.tag);
                let keep = lock(&self.keep).take();
                drop(keep);
                return Ok(outcome);
            }
            py.check_signals()?;
        }
    }
}

impl Drop for NativeHandle {
    fn drop(&mut self) {
        if lock(&self.outcome).is_none() {
            // Dropped without wait(): the tag stays taken until the op is over.
            let s = self.slot.clone();
            self.tags.orphan(self.tag, Arc::new(move || s.is_done()));
        }
        let keep = lock(&self.keep).take();
        if let Some(keep) = keep {
            if !self.slot.is_done() {
                let s = self.slot.clone();
                adopt_orphan(Arc::new(move || s.is_done()), keep);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Master
// ---------------------------------------------------------------------------

/// Native master; see `pccl.MasterNode`.
#[pyclass(frozen, module = "pccl._native")]
struct NativeMaster {
    inner: Mutex<Option<MasterNode>>,
    local_addr: SocketAddr,
    running: AtomicBool,
    stop: Arc<Slot<()>>,
}

impl NativeMaster {
    fn with<T>(
        &self,
        py: Python<'_>,
        func: &str,
        f: impl FnOnce(&mut MasterNode) -> CoreResult<T>,
    ) -> PyResult<T> {
        let mut guard = lock(&self.inner);
        match guard.as_mut() {
            Some(m) => f(m).map_err(|e| pccl_err(py, func, &e)),
            None => Err(pccl_err(
                py,
                func,
                &pccl_core::Error::InvalidUsage("the master was closed".into()),
            )),
        }
    }
}

#[pymethods]
impl NativeMaster {
    /// Binds the listening socket at once (a taken port fails here).
    #[new]
    #[pyo3(signature = (listen_address, peer_timeout_ms=None))]
    fn new(py: Python<'_>, listen_address: &str, peer_timeout_ms: Option<u64>) -> PyResult<Self> {
        let addr = resolve(py, listen_address)?;
        let mut cfg = MasterConfig::default();
        if let Some(t) = peer_timeout_ms {
            cfg.peer_timeout_ms = t.max(1);
        }
        let node = MasterNode::bind(addr, cfg).map_err(|e| pccl_err(py, "pcclCreateMaster", &e))?;
        Ok(NativeMaster {
            local_addr: node.local_addr(),
            inner: Mutex::new(Some(node)),
            running: AtomicBool::new(false),
            stop: Slot::new(),
        })
    }

    /// Starts serving in the background; returns at once.
    fn run(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, "pcclRunMaster", |m| m.run())?;
        self.running.store(true, Ordering::Release);
        Ok(())
    }

    /// Asks the master to stop; returns at once.
    fn interrupt(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, "pcclInterruptMaster", |m| {
            m.interrupt();
            Ok(())
        })?;
        self.stop.put(());
        Ok(())
    }

    /// Blocks (without the GIL; Ctrl-C raises `KeyboardInterrupt`) until
    /// `interrupt()` was called and the master has stopped.
    fn await_termination(&self, py: Python<'_>) -> PyResult<()> {
        let func = "pcclMasterAwaitTermination";
        if !self.running.load(Ordering::Acquire) {
            return Err(pccl_err(
                py,
                func,
                &pccl_core::Error::InvalidUsage("the master is not running".into()),
            ));
        }
        loop {
            if self.stop.is_done() {
                break;
            }
            py.detach(|| self.stop.take_timeout(POLL));
            if self.stop.is_done() {
                break;
            }
            py.check_signals()?;
        }
        let node = lock(&self.inner).take();
        if let Some(mut node) = node {
            self.running.store(false, Ordering::Release);
            let r = py.detach(move || {
                let r = node.await_termination();
                drop(node);
                r
            });
            r.map_err(|e| pccl_err(py, func, &e))?;
        }
        Ok(())
    }

    /// Stops the master (if running) and frees its resources.
    fn close(&self, py: Python<'_>) {
        let node = lock(&self.inner).take();
        self.stop.put(());
        if let Some(node) = node {
            py.detach(move || drop(node));
        }
    }

    /// The address actually bound, as `"ip:port"`.
    #[getter]
    fn local_addr(&self) -> String {
        self.local_addr.to_string()
    }

    #[getter]
    fn port(&self) -> u16 {
        self.local_addr.port()
    }

    #[getter]
    fn closed(&self) -> bool {
        lock(&self.inner).is_none()
    }
}

// ---------------------------------------------------------------------------
// Module
// ---------------------------------------------------------------------------

/// Installs the stderr logger (`PCCL_LOG`/`RUST_LOG`, default
/// `pccl_core::logging::DEFAULT_FILTER`: `warn` plus the progress lines of
/// long waits), or
/// changes its level when `level` is given (`"info"`, `"pccl_core=debug"`...).
#[pyfunction]
#[pyo3(signature = (level=None))]
fn init_logging(level: Option<&str>) {
    pccl_core::logging::init(level);
}

/// Number of Python objects still held for operations whose owners went away.
#[pyfunction]
fn _orphan_count(py: Python<'_>) -> usize {
    prune_orphans(py);
    lock(&ORPHANS).len()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeCommunicator>()?;
    m.add_class::<NativeHandle>()?;
    m.add_class::<NativeMaster>()?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    m.add_function(wrap_pyfunction!(_orphan_count, m)?)?;
    m.add("DEFAULT_MASTER_PORT", pccl_core::DEFAULT_MASTER_PORT)?;
    m.add(
        "DEFAULT_SHARED_STATE_PORT",
        pccl_core::DEFAULT_SHARED_STATE_PORT,
    )?;
    m.add("DEFAULT_P2P_PORT", pccl_core::DEFAULT_P2P_PORT)?;
    m.add("DEFAULT_BENCHMARK_PORT", pccl_core::DEFAULT_BENCHMARK_PORT)?;
    // No CUDA code exists yet, so this is `false` in every build (see
    // `pccl_core::CUDA_SUPPORT`); CUDA tensors are rejected by the Python layer.
    m.add("HAS_CUDA_SUPPORT", pccl_core::CUDA_SUPPORT)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
