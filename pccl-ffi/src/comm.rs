//! The communicator functions of the C API (`pcclCreateCommunicator` ...
//! `pcclSynchronizeSharedState`) and the communicator extensions
//! (`pcclSetCommunicatorTimeouts`, `pcclSetCommunicatorPorts`).
//!
//! A `pcclComm_t *` is the address of a [`CommHandle`] recorded in [`COMMS`].
//! The handle holds the configuration and, once `pcclConnect` has succeeded,
//! a `pccl_core::Communicator` (created at connect time, so configuration
//! extensions apply until then and a failed connect can simply be retried
//! with a fresh one).
//!
//! Every call takes the handle's mutex with `try_lock`: a call that would
//! overlap another call on the same communicator (from another thread)
//! returns `pcclInvalidUsage` at once and changes nothing. Async all-reduces
//! in flight are not calls; their tags are tracked here so that the header's
//! rules (distinct tags, `pcclPendingAsyncOps` for topology/sync calls,
//! `pcclInvalidArgument` for an unknown handle) hold exactly.

use std::collections::HashSet;
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use pccl_core::comm::validate_descriptor;
use pccl_core::{
    AsyncReduceHandle, Attribute, CollectiveKind, Communicator, CommunicatorConfig, DataType,
    Error, RawReduceOp, ReduceDescriptor, ReduceInfo, ReduceOp, Result, SharedState, SharedTensor,
};

use crate::boundary::{call, ensure_initialized, OutPtr};
use crate::registry::Registry;
use crate::types::*;

/// Live communicators.
pub(crate) static COMMS: Registry<CommHandle> = Registry::new("communicator");

/// Environment variable read by `pcclCreateCommunicator`: first port of the
/// peer's listeners (shared state = base, p2p = base + 1, benchmark =
/// base + 2); `0` lets the OS pick free ports.
pub(crate) const PORT_BASE_ENV: &str = "PCCL_PEER_PORT_BASE";

/// State behind a `pcclComm_t *`.
pub(crate) struct CommHandle {
    inner: Mutex<CommInner>,
}

struct CommInner {
    cfg: CommunicatorConfig,
    comm: Option<Communicator>,
    /// Tags of async collectives (all-reduce, broadcast, all-gather,
    /// reduce-scatter) started and not yet awaited.
    async_tags: HashSet<u64>,
    destroyed: bool,
}

impl CommInner {
    fn connected(&self) -> Result<&Communicator> {
        self.comm.as_ref().ok_or_else(|| {
            Error::InvalidUsage("the communicator is not connected (call pcclConnect first)".into())
        })
    }

    fn ensure_no_async_ops(&self) -> Result<()> {
        if self.async_tags.is_empty() {
            Ok(())
        } else {
            Err(Error::PendingAsyncOps(format!(
                "{} async collective(s) must be awaited first",
                self.async_tags.len()
            )))
        }
    }

    fn ensure_not_connected(&self, what: &str) -> Result<()> {
        if self.comm.is_some() {
            return Err(Error::InvalidUsage(format!(
                "{what} must be set before pcclConnect"
            )));
        }
        Ok(())
    }
}

impl CommHandle {
    /// Locks the communicator for one call; `InvalidUsage` if another call
    /// holds it, `InvalidArgument` if it was destroyed meanwhile.
    fn enter(&self) -> Result<MutexGuard<'_, CommInner>> {
        let g = match self.inner.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                return Err(Error::InvalidUsage(
                    "another call on this communicator is in progress; calls on one \
                     communicator must not overlap"
                        .into(),
                ))
            }
        };
        if g.destroyed {
            return Err(Error::InvalidArgument(
                "the communicator was destroyed".into(),
            ));
        }
        Ok(g)
    }
}

fn comm_of(p: *const pcclComm_t) -> Result<Arc<CommHandle>> {
    COMMS.get(p as usize)
}

/// Applies `PCCL_PEER_PORT_BASE` to `cfg` (ignored with a warning if invalid).
fn apply_port_env(cfg: &mut CommunicatorConfig) {
    let Ok(v) = std::env::var(PORT_BASE_ENV) else {
        return;
    };
    match v.trim().parse::<u16>() {
        Ok(0) => *cfg = cfg.clone().with_ephemeral_ports(),
        Ok(base) if base <= u16::MAX - 2 => {
            cfg.shared_state_port = base;
            cfg.p2p_port = base + 1;
            cfg.benchmark_port = base + 2;
        }
        _ => tracing::warn!("ignoring {PORT_BASE_ENV}={v:?}: expected 0 or a port up to 65533"),
    }
}

/// Creates an unconnected communicator.
///
/// # Safety
/// `params` must be NULL or point to a valid `pcclCommCreateParams_t`;
/// `comm_out` must be NULL or valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn pcclCreateCommunicator(
    params: *const pcclCommCreateParams_t,
    comm_out: *mut *mut pcclComm_t,
) -> pcclResult_t {
    call("pcclCreateCommunicator", || {
        let out = OutPtr::optional(comm_out, "comm_out");
        if let Ok(Some(o)) = &out {
            // SAFETY: non-NULL and aligned; valid for writes per the contract.
            unsafe { o.write(std::ptr::null_mut()) };
        }
        ensure_initialized()?;
        let out = out?.ok_or_else(|| Error::InvalidArgument("comm_out is NULL".into()))?;
        // SAFETY: NULL/alignment are checked by ref_arg; validity is the caller's contract.
        let params = unsafe { ref_arg(params, "params") }?;
        let master = socket_addr_from_raw(&params.master_address)?;
        if master.port() == 0 {
            return Err(Error::InvalidArgument("master_address.port is 0".into()));
        }
        let mut cfg = CommunicatorConfig::new(master);
        cfg.peer_group = params.peer_group;
        cfg.p2p_connection_pool_size = params.effective_pool_size();
        apply_port_env(&mut cfg);
        let handle = Arc::new(CommHandle {
            inner: Mutex::new(CommInner {
                cfg,
                comm: None,
                async_tags: HashSet::new(),
                destroyed: false,
            }),
        });
        let key = COMMS.insert(handle);
        // SAFETY: as above.
        unsafe { out.write(key as *mut pcclComm_t) };
        Ok(())
    })
}

/// Extension: timeouts of a communicator, before `pcclConnect`.
///
/// # Safety
/// Any pointer value is accepted (handles are looked up, never dereferenced).
#[no_mangle]
pub unsafe extern "C" fn pcclSetCommunicatorTimeouts(
    comm: *mut pcclComm_t,
    peer_liveness_timeout_ms: u32,
    connect_timeout_ms: u32,
) -> pcclResult_t {
    call("pcclSetCommunicatorTimeouts", || {
        ensure_initialized()?;
        let h = comm_of(comm)?;
        let mut g = h.enter()?;
        g.ensure_not_connected("timeouts")?;
        if connect_timeout_ms != 0 {
            g.cfg.connect_timeout = Duration::from_millis(u64::from(connect_timeout_ms));
        }
        if peer_liveness_timeout_ms != 0 {
            // Collectives: the master's peer timeout decides; here it bounds
            // how long a shared-state transfer may stall before failover.
            g.cfg.shared_state_stall_timeout =
                Duration::from_millis(u64::from(peer_liveness_timeout_ms));
        }
        Ok(())
    })
}

/// Extension: first ports of the communicator's listeners, before `pcclConnect`.
///
/// # Safety
/// Any pointer value is accepted (handles are looked up, never dereferenced).
#[no_mangle]
pub unsafe extern "C" fn pcclSetCommunicatorPorts(
    comm: *mut pcclComm_t,
    shared_state_port: u16,
    p2p_port: u16,
    benchmark_port: u16,
) -> pcclResult_t {
    call("pcclSetCommunicatorPorts", || {
        ensure_initialized()?;
        let h = comm_of(comm)?;
        let mut g = h.enter()?;
        g.ensure_not_connected("ports")?;
        g.cfg.shared_state_port = shared_state_port;
        g.cfg.p2p_port = p2p_port;
        g.cfg.benchmark_port = benchmark_port;
        Ok(())
    })
}

/// Reads a communicator attribute.
///
/// # Safety
/// `p_attribute_out` must be NULL or valid for writing an `int`.
#[no_mangle]
pub unsafe extern "C" fn pcclGetAttribute(
    communicator: *const pcclComm_t,
    attribute: pcclAttribute_t,
    p_attribute_out: *mut std::ffi::c_int,
) -> pcclResult_t {
    call("pcclGetAttribute", || {
        ensure_initialized()?;
        let attr = attribute_from_raw(attribute)?;
        let out = OutPtr::required(p_attribute_out, "p_attribute_out")?;
        let h = comm_of(communicator)?;
        let g = h.enter()?;
        let v = g.connected()?.attribute(attr)?;
        // SAFETY: non-NULL and aligned; valid for writes per the contract.
        unsafe { out.write(std::ffi::c_int::try_from(v).unwrap_or(std::ffi::c_int::MAX)) };
        Ok(())
    })
}

/// Destroys a communicator, leaving the run gracefully if connected.
///
/// # Safety
/// Any pointer value is accepted (handles are looked up, never dereferenced).
#[no_mangle]
pub unsafe extern "C" fn pcclDestroyCommunicator(communicator: *mut pcclComm_t) -> pcclResult_t {
    call("pcclDestroyCommunicator", || {
        ensure_initialized()?;
        let h = comm_of(communicator)?;
        let mut g = h.enter()?;
        g.destroyed = true;
        COMMS.remove(communicator as usize)?;
        g.async_tags.clear();
        if let Some(c) = g.comm.take() {
            // Leaves the run and stops every background task of the
            // communicator before returning (the lock is still held, so a
            // racing call sees "in progress" or "destroyed").
            c.close();
        }
        Ok(())
    })
}

/// Connects to the master and joins the run.
///
/// # Safety
/// Any pointer value is accepted (handles are looked up, never dereferenced).
#[no_mangle]
pub unsafe extern "C" fn pcclConnect(communicator: *mut pcclComm_t) -> pcclResult_t {
    call("pcclConnect", || {
        ensure_initialized()?;
        let h = comm_of(communicator)?;
        let mut g = h.enter()?;
        if g.comm.is_some() {
            return Err(Error::InvalidUsage(
                "the communicator is already connected".into(),
            ));
        }
        // A fresh core communicator per attempt: a failed attempt is dropped
        // whole (its runtime and listeners stop), so retrying starts clean.
        let comm = Communicator::new(g.cfg.clone())?;
        comm.connect()?;
        g.comm = Some(comm);
        Ok(())
    })
}

/// Admits pending peers and rewires the ring (collective).
///
/// # Safety
/// Any pointer value is accepted (handles are looked up, never dereferenced).
#[no_mangle]
pub unsafe extern "C" fn pcclUpdateTopology(communicator: *mut pcclComm_t) -> pcclResult_t {
    call("pcclUpdateTopology", || {
        ensure_initialized()?;
        let h = comm_of(communicator)?;
        let g = h.enter()?;
        let c = g.connected()?;
        g.ensure_no_async_ops()?;
        c.update_topology()
    })
}

/// Whether peers wait to be admitted (collective).
///
/// # Safety
/// `pending_out` must be NULL or valid for writing a `bool`.
#[no_mangle]
pub unsafe extern "C" fn pcclArePeersPending(
    communicator: *const pcclComm_t,
    pending_out: *mut bool,
) -> pcclResult_t {
    call("pcclArePeersPending", || {
        ensure_initialized()?;
        let out = OutPtr::required(pending_out, "pending_out")?;
        let h = comm_of(communicator)?;
        let g = h.enter()?;
        let pending = g.connected()?.are_peers_pending()?;
        // SAFETY: non-NULL and aligned; valid for writes per the contract.
        unsafe { out.write(pending) };
        Ok(())
    })
}

/// Optimizes the ring order (collective).
///
/// # Safety
/// Any pointer value is accepted (handles are looked up, never dereferenced).
#[no_mangle]
pub unsafe extern "C" fn pcclOptimizeTopology(communicator: *const pcclComm_t) -> pcclResult_t {
    call("pcclOptimizeTopology", || {
        ensure_initialized()?;
        let h = comm_of(communicator)?;
        let g = h.enter()?;
        let c = g.connected()?;
        g.ensure_no_async_ops()?;
        if c.attribute(Attribute::GlobalWorldSize)? < 2 {
            return Err(Error::InvalidUsage(
                "topology optimization needs at least two peers in the run".into(),
            ));
        }
        c.optimize_topology()
    })
}

/// A validated all-reduce request.
struct ReduceArgs {
    send: *const u8,
    recv: *mut u8,
    desc: ReduceDescriptor,
}

/// Validates one all-reduce's descriptor and buffers (nothing is read).
///
/// # Safety
/// `descriptor` must be NULL or point to a valid `pcclReduceDescriptor_t`.
unsafe fn reduce_args(
    send: *const c_void,
    recv: *mut c_void,
    descriptor: *const pcclReduceDescriptor_t,
    what: &str,
) -> Result<ReduceArgs> {
    // SAFETY: NULL/alignment checked by ref_arg; validity is the caller's contract.
    let raw = unsafe { ref_arg(descriptor, what) }?;
    let desc = reduce_descriptor_from_raw(raw)?;
    let bytes = validate_descriptor(&desc)?;
    check_reduce_buffers(send, recv, bytes)?;
    Ok(ReduceArgs {
        send: send.cast(),
        recv: recv.cast(),
        desc,
    })
}

fn ensure_two_peers(c: &Communicator) -> Result<u32> {
    let world = c.attribute(Attribute::PeerGroupWorldSize)?;
    if world < 2 {
        return Err(Error::TooFewPeers(format!(
            "the peer group has {world} accepted peer(s); a collective needs two"
        )));
    }
    Ok(world)
}

fn ensure_tag_free(g: &CommInner, tag: u64) -> Result<()> {
    if g.async_tags.contains(&tag) {
        return Err(Error::InvalidArgument(format!(
            "tag {tag} is used by an async collective that has not been awaited"
        )));
    }
    Ok(())
}

/// Blocking all-reduce (collective).
///
/// # Safety
/// The buffers must be valid for `count` elements as documented in pccl.h;
/// `descriptor` and `reduce_info_out` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn pcclAllReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    descriptor: *const pcclReduceDescriptor_t,
    communicator: *const pcclComm_t,
    reduce_info_out: *mut pcclReduceInfo_t,
) -> pcclResult_t {
    call("pcclAllReduce", || {
        ensure_initialized()?;
        // SAFETY: descriptor validity is the caller's contract.
        let a = unsafe { reduce_args(sendbuff, recvbuff, descriptor, "descriptor") }?;
        let out = OutPtr::optional(reduce_info_out, "reduce_info_out")?;
        let h = comm_of(communicator)?;
        let g = h.enter()?;
        let c = g.connected()?;
        ensure_tag_free(&g, a.desc.tag)?;
        ensure_two_peers(c)?;
        // SAFETY: the caller guarantees the buffers hold `count` elements for
        // the duration of the call; they were checked non-NULL and either
        // identical or disjoint.
        let info = unsafe { c.all_reduce_raw(a.send, a.recv, &a.desc) }?;
        if let Some(o) = out {
            // SAFETY: non-NULL and aligned; valid for writes per the contract.
            unsafe { o.write(info.into()) };
        }
        Ok(())
    })
}

/// Starts an async all-reduce (collective).
///
/// # Safety
/// The buffers must stay valid until the operation is awaited; pointers must
/// be NULL or valid as documented in pccl.h.
#[no_mangle]
pub unsafe extern "C" fn pcclAllReduceAsync(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    descriptor: *const pcclReduceDescriptor_t,
    communicator: *const pcclComm_t,
    reduce_handle_out: *mut pcclAsyncReduceOp_t,
) -> pcclResult_t {
    call("pcclAllReduceAsync", || {
        ensure_initialized()?;
        // SAFETY: descriptor validity is the caller's contract.
        let a = unsafe { reduce_args(sendbuff, recvbuff, descriptor, "descriptor") }?;
        let out = OutPtr::required(reduce_handle_out, "reduce_handle_out")?;
        let h = comm_of(communicator)?;
        let mut g = h.enter()?;
        let c = g.connected()?;
        ensure_tag_free(&g, a.desc.tag)?;
        ensure_two_peers(c)?;
        // SAFETY: the caller keeps the buffers valid until pcclAwaitAsyncReduce
        // (or pcclDestroyCommunicator, which stops the operation) returns.
        unsafe { c.all_reduce_async_tagged(a.send, a.recv, &a.desc) }?;
        g.async_tags.insert(a.desc.tag);
        // SAFETY: non-NULL and aligned; valid for writes per the contract.
        unsafe {
            out.write(pcclAsyncReduceOp_t {
                comm: communicator.cast_mut(),
                tag: a.desc.tag,
            })
        };
        Ok(())
    })
}

/// Awaits an async all-reduce.
///
/// # Safety
/// `reduce_handle` and `reduce_info_out` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn pcclAwaitAsyncReduce(
    reduce_handle: *const pcclAsyncReduceOp_t,
    reduce_info_out: *mut pcclReduceInfo_t,
) -> pcclResult_t {
    call("pcclAwaitAsyncReduce", || {
        ensure_initialized()?;
        // SAFETY: NULL/alignment checked by ref_arg; validity is the caller's contract.
        let handle = *unsafe { ref_arg(reduce_handle, "reduce_handle") }?;
        let out = OutPtr::optional(reduce_info_out, "reduce_info_out")?;
        if handle.comm.is_null() {
            return Err(Error::InvalidArgument("reduce_handle->comm is NULL".into()));
        }
        let h = comm_of(handle.comm)?;
        let mut g = h.enter()?;
        g.connected()?;
        if !g.async_tags.remove(&handle.tag) {
            return Err(Error::InvalidArgument(format!(
                "no async collective with tag {} is in flight (never started, or already awaited)",
                handle.tag
            )));
        }
        let info = g.connected()?.await_async(handle.tag)?;
        if let Some(o) = out {
            // SAFETY: non-NULL and aligned; valid for writes per the contract.
            unsafe { o.write(info.into()) };
        }
        Ok(())
    })
}

/// Extension: the all-reduce algorithm this peer asks for, before `pcclConnect`.
///
/// # Safety
/// Any pointer value is accepted (handles are looked up, never dereferenced).
#[no_mangle]
pub unsafe extern "C" fn pcclSetAllReduceAlgorithm(
    comm: *mut pcclComm_t,
    algorithm: pcclAlgorithm_t,
) -> pcclResult_t {
    call("pcclSetAllReduceAlgorithm", || {
        ensure_initialized()?;
        let algorithm = algorithm_from_raw(algorithm)?;
        let h = comm_of(comm)?;
        let mut g = h.enter()?;
        g.ensure_not_connected("the all-reduce algorithm")?;
        g.cfg.algorithm = algorithm;
        Ok(())
    })
}

/// A validated broadcast, all-gather or reduce-scatter request (nothing
/// started, nothing read).
struct CollectiveArgs {
    kind: CollectiveKind,
    send: *const u8,
    recv: *mut u8,
    desc: ReduceDescriptor,
    root: u32,
}

/// A descriptor for an unreduced collective: `count` elements of `datatype`
/// (checked: known datatype, count > 0, byte size fits in `isize`).
fn plain_descriptor(count: usize, datatype: pcclDataType_t, tag: u64) -> Result<ReduceDescriptor> {
    let datatype: DataType = datatype_from_raw(datatype)?;
    if count == 0 {
        return Err(Error::InvalidArgument("count is 0".into()));
    }
    checked_byte_len(count, datatype)?;
    Ok(ReduceDescriptor::new(count, datatype, ReduceOp::Sum).with_tag(tag))
}

fn broadcast_args(
    buf: *mut c_void,
    count: usize,
    datatype: pcclDataType_t,
    root: u32,
    tag: u64,
) -> Result<CollectiveArgs> {
    let desc = plain_descriptor(count, datatype, tag)?;
    if buf.is_null() {
        return Err(Error::InvalidArgument("buf is NULL".into()));
    }
    Ok(CollectiveArgs {
        kind: CollectiveKind::Broadcast,
        send: buf.cast_const().cast(),
        recv: buf.cast(),
        desc,
        root,
    })
}

fn all_gather_args(
    send: *const c_void,
    recv: *mut c_void,
    sendcount: usize,
    datatype: pcclDataType_t,
    tag: u64,
) -> Result<CollectiveArgs> {
    let desc = plain_descriptor(sendcount, datatype, tag)?;
    non_null_pair(send, recv)?;
    Ok(CollectiveArgs {
        kind: CollectiveKind::AllGather,
        send: send.cast(),
        recv: recv.cast(),
        desc,
        root: 0,
    })
}

/// # Safety
/// `descriptor` must be NULL or point to a valid `pcclReduceDescriptor_t`.
unsafe fn reduce_scatter_args(
    send: *const c_void,
    recv: *mut c_void,
    descriptor: *const pcclReduceDescriptor_t,
) -> Result<CollectiveArgs> {
    // SAFETY: NULL/alignment checked by ref_arg; validity is the caller's contract.
    let raw = unsafe { ref_arg(descriptor, "descriptor") }?;
    let desc = reduce_descriptor_from_raw(raw)?;
    validate_descriptor(&desc)?;
    non_null_pair(send, recv)?;
    Ok(CollectiveArgs {
        kind: CollectiveKind::ReduceScatter,
        send: send.cast(),
        recv: recv.cast(),
        desc,
        root: 0,
    })
}

fn non_null_pair(send: *const c_void, recv: *mut c_void) -> Result<()> {
    if send.is_null() {
        return Err(Error::InvalidArgument("send buffer is NULL".into()));
    }
    if recv.is_null() {
        return Err(Error::InvalidArgument("receive buffer is NULL".into()));
    }
    Ok(())
}

/// Checks what can be checked against the communicator before starting:
/// a free tag, at least two peers, and a broadcast root inside the group.
fn ensure_startable(g: &CommInner, a: &CollectiveArgs) -> Result<()> {
    let c = g.connected()?;
    ensure_tag_free(g, a.desc.tag)?;
    let world = ensure_two_peers(c)?;
    if a.kind == CollectiveKind::Broadcast && a.root >= world {
        return Err(Error::InvalidArgument(format!(
            "root {} is not a rank of the peer group (world size {world})",
            a.root
        )));
    }
    Ok(())
}

/// Starts `a` on `c` and returns its handle (the blocking calls' path).
///
/// # Safety
/// The buffers must be valid as the matching pccl.h function documents,
/// until the handle is awaited.
unsafe fn start_collective(c: &Communicator, a: &CollectiveArgs) -> Result<AsyncReduceHandle> {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        match a.kind {
            CollectiveKind::Broadcast => c.broadcast_async_raw(a.recv, &a.desc, a.root),
            CollectiveKind::AllGather => c.all_gather_async_raw(a.send, a.recv, &a.desc),
            CollectiveKind::ReduceScatter => c.reduce_scatter_async_raw(a.send, a.recv, &a.desc),
            CollectiveKind::AllReduce => c.all_reduce_async_raw(a.send, a.recv, &a.desc),
        }
    }
}

/// The body of the blocking collective calls.
///
/// # Safety
/// As for [`start_collective`], for the duration of the call.
unsafe fn run_blocking(
    a: CollectiveArgs,
    communicator: *const pcclComm_t,
    info_out: *mut pcclCollectiveInfo_t,
) -> Result<()> {
    let out = OutPtr::optional(info_out, "info_out")?;
    let h = comm_of(communicator)?;
    let g = h.enter()?;
    ensure_startable(&g, &a)?;
    let c = g.connected()?;
    // SAFETY: the caller keeps the buffers valid for the call, which awaits
    // the operation before returning.
    let handle = unsafe { start_collective(c, &a) }?;
    let info = c.await_collective(handle)?;
    if let Some(o) = out {
        // SAFETY: non-NULL and aligned; valid for writes per the contract.
        unsafe { o.write(info.into()) };
    }
    Ok(())
}

/// The body of the async collective calls: the handle is kept by tag.
///
/// # Safety
/// As for [`start_collective`], until the operation is awaited.
unsafe fn run_async(
    a: CollectiveArgs,
    communicator: *const pcclComm_t,
    handle_out: *mut pcclAsyncReduceOp_t,
) -> Result<()> {
    let out = OutPtr::required(handle_out, "handle_out")?;
    let h = comm_of(communicator)?;
    let mut g = h.enter()?;
    ensure_startable(&g, &a)?;
    let c = g.connected()?;
    // SAFETY: the caller keeps the buffers valid until the operation is
    // awaited (or pcclDestroyCommunicator, which stops it, returns).
    unsafe { c.collective_async_tagged(a.kind, a.send, a.recv, &a.desc, a.root) }?;
    g.async_tags.insert(a.desc.tag);
    // SAFETY: non-NULL and aligned; valid for writes per the contract.
    unsafe {
        out.write(pcclAsyncReduceOp_t {
            comm: communicator.cast_mut(),
            tag: a.desc.tag,
        })
    };
    Ok(())
}

/// Extension: blocking broadcast from rank `root` (collective).
///
/// # Safety
/// `buf` must be valid for reads and writes of `count` elements for the
/// call; `info_out` NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn pcclBroadcast(
    buf: *mut c_void,
    count: usize,
    datatype: pcclDataType_t,
    root: u32,
    tag: u64,
    communicator: *const pcclComm_t,
    info_out: *mut pcclCollectiveInfo_t,
) -> pcclResult_t {
    call("pcclBroadcast", || {
        ensure_initialized()?;
        let a = broadcast_args(buf, count, datatype, root, tag)?;
        // SAFETY: buffer validity is the caller's contract.
        unsafe { run_blocking(a, communicator, info_out) }
    })
}

/// Extension: starts a broadcast (collective).
///
/// # Safety
/// `buf` must stay valid until the operation is awaited; `handle_out` NULL
/// or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn pcclBroadcastAsync(
    buf: *mut c_void,
    count: usize,
    datatype: pcclDataType_t,
    root: u32,
    tag: u64,
    communicator: *const pcclComm_t,
    handle_out: *mut pcclAsyncReduceOp_t,
) -> pcclResult_t {
    call("pcclBroadcastAsync", || {
        ensure_initialized()?;
        let a = broadcast_args(buf, count, datatype, root, tag)?;
        // SAFETY: buffer validity is the caller's contract.
        unsafe { run_async(a, communicator, handle_out) }
    })
}

/// Extension: blocking all-gather (collective).
///
/// # Safety
/// `sendbuff` readable for `sendcount` elements and `recvbuff` writable for
/// world × `sendcount` elements for the call; `info_out` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn pcclAllGather(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    sendcount: usize,
    datatype: pcclDataType_t,
    tag: u64,
    communicator: *const pcclComm_t,
    info_out: *mut pcclCollectiveInfo_t,
) -> pcclResult_t {
    call("pcclAllGather", || {
        ensure_initialized()?;
        let a = all_gather_args(sendbuff, recvbuff, sendcount, datatype, tag)?;
        // SAFETY: buffer validity is the caller's contract.
        unsafe { run_blocking(a, communicator, info_out) }
    })
}

/// Extension: starts an all-gather (collective).
///
/// # Safety
/// As for [`pcclAllGather`], until the operation is awaited.
#[no_mangle]
pub unsafe extern "C" fn pcclAllGatherAsync(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    sendcount: usize,
    datatype: pcclDataType_t,
    tag: u64,
    communicator: *const pcclComm_t,
    handle_out: *mut pcclAsyncReduceOp_t,
) -> pcclResult_t {
    call("pcclAllGatherAsync", || {
        ensure_initialized()?;
        let a = all_gather_args(sendbuff, recvbuff, sendcount, datatype, tag)?;
        // SAFETY: buffer validity is the caller's contract.
        unsafe { run_async(a, communicator, handle_out) }
    })
}

/// Extension: blocking reduce-scatter (collective).
///
/// # Safety
/// `sendbuff` readable for world × `descriptor->count` elements and
/// `recvbuff` writable for `descriptor->count` elements for the call;
/// `descriptor` and `info_out` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn pcclReduceScatter(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    descriptor: *const pcclReduceDescriptor_t,
    communicator: *const pcclComm_t,
    info_out: *mut pcclCollectiveInfo_t,
) -> pcclResult_t {
    call("pcclReduceScatter", || {
        ensure_initialized()?;
        // SAFETY: descriptor validity is the caller's contract.
        let a = unsafe { reduce_scatter_args(sendbuff, recvbuff, descriptor) }?;
        // SAFETY: buffer validity is the caller's contract.
        unsafe { run_blocking(a, communicator, info_out) }
    })
}

/// Extension: starts a reduce-scatter (collective).
///
/// # Safety
/// As for [`pcclReduceScatter`], until the operation is awaited.
#[no_mangle]
pub unsafe extern "C" fn pcclReduceScatterAsync(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    descriptor: *const pcclReduceDescriptor_t,
    communicator: *const pcclComm_t,
    handle_out: *mut pcclAsyncReduceOp_t,
) -> pcclResult_t {
    call("pcclReduceScatterAsync", || {
        ensure_initialized()?;
        // SAFETY: descriptor validity is the caller's contract.
        let a = unsafe { reduce_scatter_args(sendbuff, recvbuff, descriptor) }?;
        // SAFETY: buffer validity is the caller's contract.
        unsafe { run_async(a, communicator, handle_out) }
    })
}

/// Extension: awaits any async collective (all-reduce included).
///
/// # Safety
/// `handle` and `info_out` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn pcclAwaitAsyncCollective(
    handle: *const pcclAsyncReduceOp_t,
    info_out: *mut pcclCollectiveInfo_t,
) -> pcclResult_t {
    call("pcclAwaitAsyncCollective", || {
        ensure_initialized()?;
        // SAFETY: NULL/alignment checked by ref_arg; validity is the caller's contract.
        let handle = *unsafe { ref_arg(handle, "handle") }?;
        let out = OutPtr::optional(info_out, "info_out")?;
        if handle.comm.is_null() {
            return Err(Error::InvalidArgument("handle->comm is NULL".into()));
        }
        let h = comm_of(handle.comm)?;
        let mut g = h.enter()?;
        g.connected()?;
        if !g.async_tags.remove(&handle.tag) {
            return Err(Error::InvalidArgument(format!(
                "no async collective with tag {} is in flight (never started, or already awaited)",
                handle.tag
            )));
        }
        let info = g.connected()?.await_async_collective(handle.tag)?;
        if let Some(o) = out {
            // SAFETY: non-NULL and aligned; valid for writes per the contract.
            unsafe { o.write(info.into()) };
        }
        Ok(())
    })
}

/// Runs `ops`, at most `max_in_flight` at a time, retrying those that fail
/// because a peer was lost until all succeed or fewer than two peers remain.
/// Every started operation is awaited before this returns, whatever happens.
/// Returns the outcome and the totals (world size of the last operation, or
/// the current one; bytes summed over successful operations).
///
/// # Safety
/// Each op's buffers must be valid for the whole call.
unsafe fn all_reduce_with_retry(
    c: &Communicator,
    ops: &[RawReduceOp],
    max_in_flight: usize,
) -> (Result<()>, ReduceInfo) {
    let mut total = ReduceInfo::default();
    let mut todo: Vec<usize> = (0..ops.len()).collect();
    let mut round = 0u32;
    while !todo.is_empty() {
        match c.attribute(Attribute::PeerGroupWorldSize) {
            Ok(world) => {
                total.local_world_size = world;
                if world < 2 {
                    let e = Error::TooFewPeers(format!(
                        "{} of {} all-reduce(s) unfinished and the peer group has {world} peer(s)",
                        todo.len(),
                        ops.len()
                    ));
                    return (Err(e), total);
                }
            }
            Err(e) => return (Err(e), total),
        }
        if round > 0 {
            // Give the master a moment to settle the membership change.
            std::thread::sleep(Duration::from_millis((5u64 << round.min(6)).min(200)));
        }
        let mut failed = Vec::new();
        let mut fatal: Option<Error> = None;
        for batch in todo.chunks(max_in_flight.max(1)) {
            let started: Vec<(usize, Result<AsyncReduceHandle>)> = batch
                .iter()
                .map(|&i| {
                    let op = &ops[i];
                    // SAFETY: buffers valid for the whole call (this function's contract).
                    (i, unsafe {
                        c.all_reduce_async_raw(op.send, op.recv, &op.desc)
                    })
                })
                .collect();
            // Await every started operation before deciding anything, so no
            // operation outlives this call.
            for (i, started) in started {
                match started.and_then(|h| c.await_handle(h)) {
                    Ok(info) => {
                        total.tx_bytes += info.tx_bytes;
                        total.rx_bytes += info.rx_bytes;
                        total.local_world_size = info.local_world_size;
                    }
                    Err(
                        e @ (Error::RankConnectionLost(_)
                        | Error::RankConnectionFailed(_)
                        | Error::TooFewPeers(_)),
                    ) => {
                        tracing::info!(
                            tag = ops[i].desc.tag,
                            "all-reduce failed ({e}); will retry"
                        );
                        failed.push(i);
                    }
                    Err(e) => {
                        fatal.get_or_insert(e);
                    }
                }
            }
            if fatal.is_some() {
                break;
            }
        }
        if let Some(e) = fatal {
            return (Err(e), total);
        }
        todo = failed;
        round += 1;
    }
    (Ok(()), total)
}

/// Many all-reduces with retry (collective).
///
/// # Safety
/// `descriptors` must be NULL or point to `count` valid descriptors whose
/// buffers are valid as documented in pccl.h; `reduce_info_out` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn pcclAllReduceMultipleWithRetry(
    descriptors: *const pcclReduceOpDescriptor_t,
    count: usize,
    communicator: *const pcclComm_t,
    reduce_info_out: *mut pcclReduceInfo_t,
    max_in_flight: std::ffi::c_int,
) -> pcclResult_t {
    call("pcclAllReduceMultipleWithRetry", || {
        ensure_initialized()?;
        if descriptors.is_null() {
            return Err(Error::InvalidArgument("descriptors is NULL".into()));
        }
        if count == 0 {
            return Err(Error::InvalidArgument("count is 0".into()));
        }
        let max_in_flight = usize::try_from(max_in_flight)
            .ok()
            .filter(|&m| m > 0)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("max_in_flight is {max_in_flight}; must be > 0"))
            })?;
        // SAFETY: NULL/alignment/size checked by slice_arg; validity is the caller's contract.
        let raw = unsafe { slice_arg(descriptors, count, "descriptors") }?;
        let mut ops = Vec::with_capacity(raw.len());
        let mut tags = HashSet::with_capacity(raw.len());
        for (i, d) in raw.iter().enumerate() {
            let what = format!("descriptors[{i}]");
            // SAFETY: `&d.descriptor` is a valid reference into the caller's array.
            let a = unsafe { reduce_args(d.sendbuf, d.recvbuf, &d.descriptor, &what) }
                .map_err(|e| prefix(e, &what))?;
            if !tags.insert(a.desc.tag) {
                return Err(Error::InvalidArgument(format!(
                    "{what}: tag {} appears more than once",
                    a.desc.tag
                )));
            }
            ops.push(RawReduceOp {
                send: a.send,
                recv: a.recv,
                desc: a.desc,
            });
        }
        let out = OutPtr::optional(reduce_info_out, "reduce_info_out")?;
        let h = comm_of(communicator)?;
        let g = h.enter()?;
        let c = g.connected()?;
        for op in &ops {
            ensure_tag_free(&g, op.desc.tag)?;
        }
        // SAFETY: the caller guarantees every buffer is valid for the call.
        let (result, info) = unsafe { all_reduce_with_retry(c, &ops, max_in_flight) };
        if matches!(result, Ok(()) | Err(Error::TooFewPeers(_))) {
            if let Some(o) = out {
                // SAFETY: non-NULL and aligned; valid for writes per the contract.
                unsafe { o.write(info.into()) };
            }
        }
        result
    })
}

/// Adds context to an `InvalidArgument` message.
fn prefix(e: Error, what: &str) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("{what}: {m}")),
        e => e,
    }
}

/// Synchronizes the shared state (collective).
///
/// # Safety
/// `shared_state` must be NULL or valid, its `infos` array and every tensor
/// as documented in pccl.h; `sync_info_out` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn pcclSynchronizeSharedState(
    communicator: *const pcclComm_t,
    shared_state: *mut pcclSharedState_t,
    strategy: pcclSharedStateSyncStrategy_t,
    sync_info_out: *mut pcclSharedStateSyncInfo_t,
) -> pcclResult_t {
    call("pcclSynchronizeSharedState", || {
        ensure_initialized()?;
        // SAFETY: NULL/alignment checked by ref_arg; validity is the caller's
        // contract. The struct is copied; the reference is not kept.
        let state = *unsafe { ref_arg(shared_state.cast_const(), "shared_state") }?;
        let strategy = sync_strategy_from_raw(strategy)?;
        // SAFETY: NULL/alignment/size checked by slice_arg; validity is the caller's contract.
        let infos =
            unsafe { slice_arg(state.infos.cast_const(), state.count, "shared_state->infos") }?;
        let mut names = HashSet::with_capacity(infos.len());
        let mut tensors = Vec::with_capacity(infos.len());
        for (i, t) in infos.iter().enumerate() {
            let what = format!("shared_state->infos[{i}]");
            let spec = tensor_spec_from_raw(t).map_err(|e| prefix(e, &what))?;
            // SAFETY: non-NULL checked by tensor_spec_from_raw and cstr_arg;
            // NUL termination is the caller's contract.
            let name = unsafe { cstr_arg(t.name, "name") }?
                .to_str()
                .map_err(|_| Error::InvalidArgument(format!("{what}.name is not UTF-8")))?;
            if !names.insert(name) {
                return Err(Error::InvalidArgument(format!(
                    "{what}.name '{name}' appears more than once"
                )));
            }
            let ptr = if spec.count == 0 {
                NonNull::<u64>::dangling().as_ptr().cast::<u8>()
            } else {
                t.data.cast::<u8>()
            };
            // SAFETY: the caller guarantees `data` is valid for reads and
            // writes of `count` elements during the call (checked non-NULL
            // unless count is 0, where an aligned dangling pointer is used).
            let tensor = unsafe {
                SharedTensor::from_raw(name, ptr, spec.count, spec.datatype, spec.device_type)
            }
            .allow_content_inequality(spec.allow_content_inequality);
            tensors.push(tensor);
        }
        let out = OutPtr::optional(sync_info_out, "sync_info_out")?;
        let h = comm_of(communicator)?;
        let g = h.enter()?;
        let c = g.connected()?;
        g.ensure_no_async_ops()?;
        let mut ss = SharedState::new(state.revision, tensors);
        let info = c.sync_shared_state(&mut ss, strategy)?;
        // SAFETY: `shared_state` is non-NULL and aligned (checked above) and
        // valid for writes per the contract; only the revision field is written.
        unsafe { std::ptr::addr_of_mut!((*shared_state).revision).write(ss.revision) };
        if let Some(o) = out {
            // SAFETY: non-NULL and aligned; valid for writes per the contract.
            unsafe { o.write(info.into()) };
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_env() {
        let base = CommunicatorConfig::new("127.0.0.1:1".parse().expect("literal"));
        // The variable is process-wide; this is the only test touching it.
        std::env::set_var(PORT_BASE_ENV, "0");
        let mut c = base.clone();
        apply_port_env(&mut c);
        assert_eq!(
            (c.shared_state_port, c.p2p_port, c.benchmark_port),
            (0, 0, 0)
        );
        std::env::set_var(PORT_BASE_ENV, "50000");
        let mut c = base.clone();
        apply_port_env(&mut c);
        assert_eq!(
            (c.shared_state_port, c.p2p_port, c.benchmark_port),
            (50000, 50001, 50002)
        );
        std::env::set_var(PORT_BASE_ENV, "65535");
        let mut c = base.clone();
        apply_port_env(&mut c);
        assert_eq!(c.p2p_port, base.p2p_port);
        std::env::remove_var(PORT_BASE_ENV);
    }
}
