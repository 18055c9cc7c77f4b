//! The communicator a peer holds: connection to the master, membership calls
//! (connect, update topology, are peers pending, optimize topology),
//! attributes, and all-reduce (blocking, async, many-with-retry).
//!
//! The public API is blocking; inside, each communicator runs its own tokio
//! runtime. Calls take `&self`, so several threads may use one communicator
//! (e.g. one thread awaits an async all-reduce while another trains).

pub(crate) mod control;
pub(crate) mod liveness;
pub(crate) mod p2p;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::collectives::{self, RawBuf, RingParams, RingPhase};
use crate::error::{Error, Result};
use crate::net::tcp::{CongestionControl, SocketTuning};
use crate::net::{self, Conn, Listener, Net, Transport};
use crate::types::{
    Algorithm, Attribute, CollectiveInfo, CollectiveKind, DataType, QuantizationAlgorithm,
    ReduceDescriptor, ReduceInfo,
};
use crate::wire::{CollectiveSpec, ConnKind, Hello, MasterMsg, PeerId, PeerMsg, WorldInfo};
use control::{Control, Routed, WaitKey};
use p2p::P2p;

/// How long `connect()` waits for admission before it says so at the
/// default log level (a peer admitted at once logs nothing there).
const ADMISSION_QUIET: Duration = Duration::from_millis(200);

/// How to create a [`Communicator`].
#[derive(Debug, Clone)]
pub struct CommunicatorConfig {
    /// Where the master listens.
    pub master_addr: SocketAddr,
    /// Collectives and shared-state sync run among peers of the same group.
    pub peer_group: u32,
    /// Connections per ring neighbour (0 means 1).
    pub p2p_connection_pool_size: u32,
    /// Local address the peer's listeners bind to.
    pub bind_ip: IpAddr,
    /// First port tried for the p2p listener (0 = any free port).
    pub p2p_port: u16,
    /// First port tried for the shared-state listener (0 = any free port).
    pub shared_state_port: u16,
    /// First port tried for the bandwidth-benchmark listener (0 = any free port).
    pub benchmark_port: u16,
    /// How many successive ports are tried when one is taken.
    pub port_attempts: u16,
    /// Address other peers should dial to reach this one (behind NAT or
    /// port forwarding). `None`: the address the master sees.
    pub advertised_ip: Option<IpAddr>,
    /// Deadline for TCP connects and greetings.
    pub connect_timeout: Duration,
    /// Progress deadline of a shared-state fetch: a connection with
    /// requests outstanding that receives no byte for this long gives up its
    /// source and requests its ranges from the next holder (zero: none).
    /// Default [`crate::shared_state::DEFAULT_STALL_TIMEOUT`] (5 s).
    pub shared_state_stall_timeout: Duration,
    /// The largest pipelined sub-chunk on the wire (default 512 KiB). A
    /// ring or broadcast op cuts each step into up to `pipeline_chunks`
    /// sub-chunks of at least 64 KiB and at most this size, so mid-size ops
    /// still pipeline and spread over the pool. 1 byte to 16 MiB. Every
    /// peer of a group must use the same value: it fixes the frame geometry,
    /// and the master refuses the ops of peers that differ
    /// (`InvalidUsage`, naming the field).
    pub chunk_bytes: usize,
    /// How many sub-chunks a ring or broadcast step is cut into, at most
    /// (see `chunk_bytes`). Default `$PCCL_PIPELINE_CHUNKS`, else 16: on a
    /// long-fat link with a connection pool, a mid-size op then pipelines
    /// and spreads over the pool (a 4 MiB all-reduce of 4 peers over 100 ms
    /// took 0.6x the time of one 512 KiB chunk per step). On loopback or a
    /// LAN with pool 1, `1` (one chunk of up to `chunk_bytes` per step)
    /// saves per-frame CPU for ops of 1-4 MiB. 1 to 1024. Must be equal on
    /// every peer of a group, like `chunk_bytes`.
    pub pipeline_chunks: usize,
    /// Worker threads of the communicator's runtime.
    pub worker_threads: usize,
    /// Socket options of data connections (buffers, congestion control;
    /// the latter defaults to `$PCCL_TCP_CONGESTION`).
    pub socket: SocketTuning,
    /// The algorithm this peer asks for in every all-reduce: `Auto` (the
    /// default) lets the master choose by size; every peer of a group must
    /// ask for the same, or the op fails with `InvalidUsage`. Defaults to
    /// `$PCCL_ALGORITHM` (auto, ring or direct).
    pub algorithm: Algorithm,
    /// How often a long wait reports itself at the default log level
    /// (target [`crate::logging::PROGRESS_TARGET`]): `connect()` waiting
    /// for admission logs a line when it starts waiting and one per
    /// interval after; a shared-state fetch logs bytes, rate and ETA once
    /// per interval (so only fetches longer than it log anything) and calls
    /// [`on_sync_progress`](Self::on_sync_progress). Default 3 s; zero
    /// turns the periodic lines and callbacks off.
    pub progress_interval: Duration,
    /// Called with the progress of every shared-state fetch of this peer,
    /// once per [`progress_interval`](Self::progress_interval) while it runs
    /// and once when every byte has arrived (`done`); `None` (the default):
    /// no callback. Runs on the communicator's runtime threads: it must
    /// return quickly and must not call back into the communicator.
    pub on_sync_progress: Option<crate::shared_state::SyncProgressCallback>,
    /// Whether a failed in-place all-reduce gives the buffer back as it was
    /// (so a retry reduces the original input, as
    /// [`Communicator::all_reduce_multiple_with_retry`] does). On (the
    /// default), the op saves each range of the buffer right before it
    /// first overwrites it: up to one more copy of the tensor by the end
    /// of the op. Off, nothing is saved (peak memory: the tensor plus the
    /// sub-chunks in flight), and an op that fails after it started writing
    /// returns [`Error::InPlaceInputLost`] (C: `pcclRankConnectionLost`)
    /// with the buffer's contents unspecified; the retry helper does not
    /// retry such an op. Defaults to `$PCCL_IN_PLACE_RESTORE` (`0` turns it
    /// off).
    pub in_place_restore: bool,
}

impl CommunicatorConfig {
    pub fn new(master_addr: SocketAddr) -> Self {
        CommunicatorConfig {
            master_addr,
            peer_group: 0,
            p2p_connection_pool_size: 1,
            bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            p2p_port: crate::DEFAULT_P2P_PORT,
            shared_state_port: crate::DEFAULT_SHARED_STATE_PORT,
            benchmark_port: crate::DEFAULT_BENCHMARK_PORT,
            port_attempts: 64,
            advertised_ip: None,
            connect_timeout: Duration::from_secs(10),
            shared_state_stall_timeout: crate::shared_state::DEFAULT_STALL_TIMEOUT,
            chunk_bytes: 512 << 10,
            pipeline_chunks: pipeline_chunks_from_env(),
            worker_threads: 2,
            socket: SocketTuning {
                congestion: CongestionControl::from_env(),
                ..SocketTuning::default()
            },
            algorithm: algorithm_from_env(),
            progress_interval: Duration::from_secs(3),
            on_sync_progress: None,
            in_place_restore: in_place_restore_from_env(),
        }
    }

    /// Every listener on a kernel-chosen free port (what tests want).
    pub fn with_ephemeral_ports(mut self) -> Self {
        self.p2p_port = 0;
        self.shared_state_port = 0;
        self.benchmark_port = 0;
        self
    }
}

/// A peer of the swarm.
pub struct Communicator {
    cfg: CommunicatorConfig,
    rt: Option<tokio::runtime::Runtime>,
    shutdown: CancellationToken,
    p2p: Arc<P2p>,
    ctl: Mutex<Option<Arc<Control>>>,
    ss: Arc<crate::shared_state::SharedStateServer>,
    /// (p2p, shared-state) ports actually bound, once connected.
    ports: Mutex<(u16, u16)>,
    async_ops: Mutex<HashMap<u64, tokio::task::JoinHandle<Result<CollectiveInfo>>>>,
    /// Collectives started and not yet finished, however they were started
    /// (blocking, async with a handle, or tagged).
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// [`CommunicatorConfig::in_place_restore`], changeable at run time.
    in_place_restore: std::sync::atomic::AtomicBool,
}

impl Communicator {
    /// Creates a communicator; nothing is contacted until [`connect`](Self::connect).
    pub fn new(cfg: CommunicatorConfig) -> Result<Self> {
        if !(1..=MAX_CHUNK_BYTES).contains(&cfg.chunk_bytes) {
            return Err(Error::InvalidArgument(format!(
                "chunk_bytes is {}, expected 1 to {MAX_CHUNK_BYTES} (an encoded sub-chunk must fit \
                 a data frame)",
                cfg.chunk_bytes
            )));
        }
        if !(1..=MAX_PIPELINE_CHUNKS).contains(&cfg.pipeline_chunks) {
            return Err(Error::InvalidArgument(format!(
                "pipeline_chunks is {}, expected 1 to {MAX_PIPELINE_CHUNKS}",
                cfg.pipeline_chunks
            )));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.worker_threads.max(1))
            .thread_name("pccl-peer")
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start runtime: {e}")))?;
        let shutdown = CancellationToken::new();
        let p2p = P2p::new(
            cfg.p2p_connection_pool_size.max(1) as usize,
            Net::new(cfg.socket),
            cfg.connect_timeout,
            shutdown.clone(),
        );
        let ss = crate::shared_state::SharedStateServer::new(
            shutdown.clone(),
            cfg.connect_timeout,
            cfg.shared_state_stall_timeout,
        );
        let cfg_in_place_restore = cfg.in_place_restore;
        Ok(Communicator {
            cfg,
            rt: Some(rt),
            shutdown,
            p2p,
            ss,
            ports: Mutex::new((0, 0)),
            ctl: Mutex::new(None),
            async_ops: Mutex::new(HashMap::new()),
            in_flight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            in_place_restore: std::sync::atomic::AtomicBool::new(cfg_in_place_restore),
        })
    }

    /// Turns restore-on-failure of in-place all-reduces on or off for the
    /// operations started from now on (see
    /// [`CommunicatorConfig::in_place_restore`]).
    pub fn set_in_place_restore(&self, on: bool) {
        self.in_place_restore
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether in-place all-reduces started now restore their buffer on failure.
    pub fn in_place_restore(&self) -> bool {
        self.in_place_restore
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn config(&self) -> &CommunicatorConfig {
        &self.cfg
    }

    fn rt(&self) -> Result<&tokio::runtime::Runtime> {
        self.rt
            .as_ref()
            .ok_or_else(|| Error::InvalidUsage("communicator is closed".into()))
    }

    /// Runs a future to completion on the communicator's runtime.
    fn block_on<F: std::future::Future>(&self, f: F) -> Result<F::Output> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::InvalidUsage(
                "blocking pccl calls cannot run inside an async runtime; use spawn_blocking".into(),
            ));
        }
        Ok(self.rt()?.block_on(f))
    }

    fn control(&self) -> Result<Arc<Control>> {
        let ctl = self
            .ctl
            .lock()
            .ok()
            .and_then(|c| c.clone())
            .ok_or_else(|| {
                Error::InvalidUsage("communicator is not connected; call connect() first".into())
            })?;
        Ok(ctl)
    }

    /// The (p2p, shared-state) listening ports this peer bound (zeros before `connect`).
    pub fn listen_ports(&self) -> (u16, u16) {
        self.ports.lock().map(|p| *p).unwrap_or_default()
    }

    /// This peer's identity (zero before `connect`).
    pub fn peer_id(&self) -> PeerId {
        self.p2p.me()
    }

    /// Registers with the master and returns once the existing peers have
    /// accepted this one (at once for the first peer) and ring connections are up.
    pub fn connect(&self) -> Result<()> {
        if self.ctl.lock().map(|c| c.is_some()).unwrap_or(true) {
            return Err(Error::InvalidUsage(
                "communicator is already connected".into(),
            ));
        }
        let attempt = self.shutdown.child_token();
        let ctl = match self.block_on(self.connect_async(attempt.clone()))? {
            Ok(ctl) => ctl,
            Err(e) => {
                // Close this attempt's control connection and listeners, so the
                // master forgets us instead of waiting for our votes.
                attempt.cancel();
                return Err(e);
            }
        };
        if let Ok(mut c) = self.ctl.lock() {
            *c = Some(ctl);
        }
        Ok(())
    }

    async fn connect_async(&self, attempt: CancellationToken) -> Result<Arc<Control>> {
        let cfg = &self.cfg;
        let transport = Net::new(cfg.socket);
        let listener = transport
            .listen(cfg.bind_ip, cfg.p2p_port, cfg.port_attempts)
            .map_err(|e| {
                Error::InvalidArgument(format!(
                    "cannot bind the p2p listener from port {}: {e}",
                    cfg.p2p_port
                ))
            })?;
        let p2p_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let ss_listener = transport
            .listen(cfg.bind_ip, cfg.shared_state_port, cfg.port_attempts)
            .map_err(|e| {
                Error::InvalidArgument(format!(
                    "cannot bind the shared-state listener from port {}: {e}",
                    cfg.shared_state_port
                ))
            })?;
        let ss_port = ss_listener.local_addr().map(|a| a.port()).unwrap_or(0);

        let mut stream = transport
            .dial(cfg.master_addr, cfg.connect_timeout)
            .await
            .map_err(|e| {
                Error::MasterConnectionFailed(format!(
                    "cannot reach the master at {}: {e}",
                    cfg.master_addr
                ))
            })?;
        let hello = Hello {
            kind: ConnKind::Control,
            from: PeerId::default(),
            to: PeerId::default(),
        };
        net::write_hello(&mut stream, &hello)
            .await
            .map_err(|e| Error::MasterConnectionFailed(format!("greeting the master: {e}")))?;
        let echo = net::read_hello(&mut stream, cfg.connect_timeout)
            .await
            .map_err(|e| {
                Error::MasterConnectionFailed(format!("the master did not greet back: {e}"))
            })?;
        if echo.kind != ConnKind::Control {
            return Err(Error::MasterConnectionFailed(
                "unexpected greeting from the master".into(),
            ));
        }
        let (rd, wr) = stream.into_halves();
        let ctl = Control::start(rd, wr, self.p2p.clone(), attempt.clone());
        let mut reg = ctl.wait(WaitKey::Register)?;
        let mut topo = ctl.wait(WaitKey::Topology)?;
        ctl.send(&PeerMsg::Register {
            group: cfg.peer_group,
            p2p_port,
            ss_port,
            bench_port: 0,
            advertised_ip: cfg.advertised_ip,
        })?;
        let (id, hb) = match reg.recv().await? {
            Routed::Msg(MasterMsg::RegisterAck {
                id,
                heartbeat_interval_ms,
            }) => (id, heartbeat_interval_ms),
            _ => return Err(Error::Internal("unexpected answer to registration".into())),
        };
        drop(reg);
        if let Ok(mut me) = ctl.me.lock() {
            *me = id;
        }
        self.p2p.set_me(id);
        self.p2p.spawn_listener(listener, attempt.clone());
        self.ss.set_me(id);
        if let Ok(mut p) = self.ports.lock() {
            *p = (p2p_port, ss_port);
        }
        self.ss.spawn_listener(ss_listener, attempt.clone());
        control::spawn_heartbeat(ctl.clone(), Duration::from_millis(hb.max(10) as u64));
        tracing::info!(peer = %id, master = %cfg.master_addr, p2p_port, "registered; waiting for admission");
        // A newcomer blocks here until the accepted peers call
        // update_topology, which may take a while: unless it is admitted at
        // once, say so at the default log level, then every interval.
        let waiting = Instant::now();
        let (answer, announced) = match tokio::time::timeout(ADMISSION_QUIET, topo.recv()).await {
            Ok(m) => (m?, false),
            Err(_) => {
                tracing::info!(
                    target: crate::logging::PROGRESS_TARGET,
                    "peer {id}: registered with the master at {}; waiting for admission \
                     (the peers already in the swarm admit newcomers when they call update_topology)",
                    cfg.master_addr
                );
                let every = cfg.progress_interval;
                let m = loop {
                    if every.is_zero() {
                        break topo.recv().await?;
                    }
                    tokio::select! {
                        m = topo.recv() => break m?,
                        _ = tokio::time::sleep(every) => tracing::info!(
                            target: crate::logging::PROGRESS_TARGET,
                            "peer {id}: still waiting for admission by the swarm at {} ({:.0} s so far)",
                            cfg.master_addr,
                            waiting.elapsed().as_secs_f64()
                        ),
                    }
                };
                (m, true)
            }
        };
        match answer {
            Routed::Msg(MasterMsg::TopologyUpdated { .. }) => {
                if announced {
                    tracing::info!(
                        target: crate::logging::PROGRESS_TARGET,
                        "peer {id}: admitted after {:.1} s (world {})",
                        waiting.elapsed().as_secs_f64(),
                        ctl.world().global_world
                    );
                }
                tracing::info!(peer = %id, world = ?ctl.world(), "accepted into the swarm");
                Ok(ctl)
            }
            Routed::Msg(MasterMsg::TopologyFailed { reason }) => {
                Err(Error::UpdateTopologyFailed(reason))
            }
            _ => Err(Error::Internal("unexpected answer while joining".into())),
        }
    }

    /// `PendingAsyncOps` while any collective is in flight: started with a
    /// handle, by tag, or blocking on another thread. Finished ops that are
    /// not awaited yet do not count.
    fn ensure_no_async_ops(&self) -> Result<()> {
        let running = self.in_flight.load(std::sync::atomic::Ordering::SeqCst);
        if running > 0 {
            return Err(Error::PendingAsyncOps(format!(
                "{running} collective(s) still in flight must be awaited first"
            )));
        }
        Ok(())
    }

    /// Admits pending peers; every accepted peer (all groups) must call it.
    /// Returns when the ring connections of the new topology are up.
    pub fn update_topology(&self) -> Result<()> {
        let ctl = self.control()?;
        self.ensure_no_async_ops()?;
        self.block_on(async {
            let mut w = ctl.wait(WaitKey::Topology)?;
            ctl.send(&PeerMsg::VoteUpdateTopology)?;
            match w.recv().await? {
                Routed::Msg(MasterMsg::TopologyUpdated { .. }) => Ok(()),
                Routed::Msg(MasterMsg::TopologyFailed { reason }) => {
                    Err(Error::UpdateTopologyFailed(reason))
                }
                _ => Err(Error::Internal(
                    "unexpected answer to update topology".into(),
                )),
            }
        })?
    }

    /// Whether peers wait to be admitted; every accepted peer must call it,
    /// and all get the same answer.
    pub fn are_peers_pending(&self) -> Result<bool> {
        let ctl = self.control()?;
        self.block_on(async {
            let mut w = ctl.wait(WaitKey::Pending)?;
            ctl.send(&PeerMsg::VoteArePeersPending)?;
            match w.recv().await? {
                Routed::Msg(MasterMsg::PendingAnswer { pending }) => Ok(pending),
                _ => Err(Error::Internal(
                    "unexpected answer to are-peers-pending".into(),
                )),
            }
        })?
    }

    /// Collective call that may reorder the ring for bandwidth. The current
    /// master keeps the admission order, so this is a consensus no-op.
    pub fn optimize_topology(&self) -> Result<()> {
        let ctl = self.control()?;
        self.ensure_no_async_ops()?;
        let world = ctl.world().global_world;
        if world < 2 {
            // As PCCL 1.0 (and our C and Python faces): nothing to optimize.
            return Err(Error::InvalidUsage(format!(
                "optimize topology needs at least 2 peers in the run, have {world}"
            )));
        }
        self.block_on(async {
            let mut w = ctl.wait(WaitKey::Optimize)?;
            ctl.send(&PeerMsg::VoteOptimizeTopology)?;
            match w.recv().await? {
                Routed::Msg(MasterMsg::OptimizeDone { ok: true }) => Ok(()),
                Routed::Msg(MasterMsg::OptimizeDone { ok: false }) => {
                    Err(Error::TopologyOptimizationFailed(
                        "the master could not optimize the topology".into(),
                    ))
                }
                _ => Err(Error::Internal(
                    "unexpected answer to optimize topology".into(),
                )),
            }
        })?
    }

    /// Membership numbers as of the latest master update.
    pub fn world(&self) -> Result<WorldInfo> {
        Ok(self.control()?.world())
    }

    /// One of the four attributes.
    pub fn attribute(&self, attr: Attribute) -> Result<u32> {
        let w = self.world()?;
        Ok(match attr {
            Attribute::GlobalWorldSize => w.global_world,
            Attribute::PeerGroupWorldSize => w.group_world,
            Attribute::NumDistinctPeerGroups => w.num_groups,
            Attribute::LargestPeerGroupWorldSize => w.largest_group,
        })
    }

    /// All-reduce of typed slices (`send` and `recv` of equal length).
    pub fn all_reduce<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        desc: &ReduceDescriptor,
    ) -> Result<ReduceInfo> {
        check_typed::<T>(send.len(), recv.len(), desc)?;
        // SAFETY: both slices are valid for their whole length during the
        // call, and the call returns only after every task using them ended.
        unsafe {
            self.all_reduce_raw(
                send.as_ptr() as *const u8,
                recv.as_mut_ptr() as *mut u8,
                desc,
            )
        }
    }

    /// In-place all-reduce of a typed slice; on failure the slice is restored.
    pub fn all_reduce_in_place<T: Element>(
        &self,
        data: &mut [T],
        desc: &ReduceDescriptor,
    ) -> Result<ReduceInfo> {
        check_typed::<T>(data.len(), data.len(), desc)?;
        let p = data.as_mut_ptr() as *mut u8;
        // SAFETY: as in `all_reduce`; send == recv is the supported in-place form.
        unsafe { self.all_reduce_raw(p, p, desc) }
    }

    /// All-reduce on raw buffers of `desc.count` elements of `desc.datatype`.
    /// `send == recv` is in place. On failure an in-place buffer is restored
    /// and `send` is never modified.
    ///
    /// # Safety
    /// `send` must be readable and `recv` writable for `count * size` bytes
    /// for the duration of the call, and nothing else may write them meanwhile.
    pub unsafe fn all_reduce_raw(
        &self,
        send: *const u8,
        recv: *mut u8,
        desc: &ReduceDescriptor,
    ) -> Result<ReduceInfo> {
        let h = self.all_reduce_async_raw(send, recv, desc)?;
        self.await_handle(h)
    }

    /// Starts an all-reduce and returns at once; await the handle with
    /// [`AsyncReduceHandle::wait`] (or [`Communicator::await_async`] by tag).
    ///
    /// # Safety
    /// As for [`all_reduce_raw`](Self::all_reduce_raw), until the handle is awaited.
    pub unsafe fn all_reduce_async_raw(
        &self,
        send: *const u8,
        recv: *mut u8,
        desc: &ReduceDescriptor,
    ) -> Result<AsyncReduceHandle> {
        let bytes = validate_descriptor(desc)?;
        self.start_collective(CollectiveKind::AllReduce, 0, send, bytes, recv, bytes, desc)
    }

    /// Validates a collective call's buffers, tells the master, and spawns
    /// the op; the handle's task returns once the master's verdict is in.
    ///
    /// # Safety
    /// `send` readable for `send_bytes` and `recv` writable for
    /// `recv_bytes` bytes until the returned handle is awaited.
    #[allow(clippy::too_many_arguments)]
    unsafe fn start_collective(
        &self,
        kind: CollectiveKind,
        root: u32,
        send: *const u8,
        send_bytes: usize,
        recv: *mut u8,
        recv_bytes: usize,
        desc: &ReduceDescriptor,
    ) -> Result<AsyncReduceHandle> {
        let ctl = self.control()?;
        if send.is_null() || recv.is_null() {
            return Err(Error::InvalidArgument(
                "send and receive buffers must not be NULL".into(),
            ));
        }
        let (s, r) = (send as usize, recv as usize);
        let identical_ok = matches!(kind, CollectiveKind::AllReduce | CollectiveKind::Broadcast);
        let overlap = s < r.saturating_add(recv_bytes) && r < s.saturating_add(send_bytes);
        if overlap && !(identical_ok && s == r && send_bytes == recv_bytes) {
            return Err(Error::InvalidArgument(format!(
                "{} send and receive buffers overlap{}",
                kind.name(),
                if identical_ok {
                    " without being identical"
                } else {
                    ""
                }
            )));
        }
        self.collective_world(kind)?;
        // A tiny all-reduce offers its buffer for the relay (the master
        // decides whether every peer's can ride through it).
        let relay_offer = kind == CollectiveKind::AllReduce
            && desc.quantization.algorithm == QuantizationAlgorithm::None
            && matches!(self.cfg.algorithm, Algorithm::Auto | Algorithm::Relay)
            && send_bytes <= crate::types::RELAY_MAX_BYTES;
        let payload = if relay_offer {
            // SAFETY: the caller guarantees `send` is readable for `send_bytes`.
            unsafe { std::slice::from_raw_parts(send, send_bytes) }.to_vec()
        } else {
            Vec::new()
        };
        let waiter = ctl.wait_collective(desc.tag, kind, root)?;
        ctl.send(&PeerMsg::CollectiveInit {
            tag: desc.tag,
            spec: spec_of(kind, root, &self.cfg, desc),
            payload,
        })?;
        let job = OpJob {
            ctl,
            p2p: self.p2p.clone(),
            kind,
            root,
            send: send as usize,
            send_bytes,
            recv: RawBuf::new(recv, recv_bytes),
            recv_addr: recv as usize,
            recv_bytes,
            desc: *desc,
            chunk_bytes: self.cfg.chunk_bytes,
            pipeline_chunks: self.cfg.pipeline_chunks,
            in_place_restore: self.in_place_restore(),
        };
        let running = InFlight::start(&self.in_flight);
        let handle = self.rt()?.spawn(async move {
            let _running = running;
            run_op(job, waiter).await
        });
        Ok(AsyncReduceHandle {
            tag: desc.tag,
            join: Some(handle),
        })
    }

    /// Blocks until an async all-reduce finishes.
    pub fn await_handle(&self, h: AsyncReduceHandle) -> Result<ReduceInfo> {
        self.await_collective(h).map(ReduceInfo::from)
    }

    /// Blocks until an async collective (of any kind) finishes.
    pub fn await_collective(&self, mut h: AsyncReduceHandle) -> Result<CollectiveInfo> {
        let Some(join) = h.join.take() else {
            return Err(Error::InvalidUsage("handle was already awaited".into()));
        };
        match self.block_on(join)? {
            Ok(r) => r,
            Err(e) => Err(Error::Internal(format!("collective task failed: {e}"))),
        }
    }

    /// Starts an all-reduce whose handle the communicator keeps, to be awaited
    /// by tag with [`await_async`](Self::await_async) (the C API's model).
    ///
    /// # Safety
    /// As for [`all_reduce_async_raw`](Self::all_reduce_async_raw).
    pub unsafe fn all_reduce_async_tagged(
        &self,
        send: *const u8,
        recv: *mut u8,
        desc: &ReduceDescriptor,
    ) -> Result<()> {
        self.keep_tagged(desc.tag, || self.all_reduce_async_raw(send, recv, desc))
    }

    /// Starts the op `start` returns, keeping its handle by `tag`.
    fn keep_tagged(
        &self,
        tag: u64,
        start: impl FnOnce() -> Result<AsyncReduceHandle>,
    ) -> Result<()> {
        {
            let ops = self
                .async_ops
                .lock()
                .map_err(|_| Error::Internal("async op table poisoned".into()))?;
            if ops.contains_key(&tag) {
                return Err(Error::InvalidUsage(format!(
                    "an async collective with tag {tag} is not awaited yet"
                )));
            }
        }
        let mut h = start()?;
        if let (Ok(mut ops), Some(join)) = (self.async_ops.lock(), h.join.take()) {
            ops.insert(tag, join);
        }
        Ok(())
    }

    /// Awaits the async all-reduce started with `tag`.
    pub fn await_async(&self, tag: u64) -> Result<ReduceInfo> {
        self.await_async_collective(tag).map(ReduceInfo::from)
    }

    /// Awaits the async collective (of any kind) started with `tag`.
    pub fn await_async_collective(&self, tag: u64) -> Result<CollectiveInfo> {
        let join = self
            .async_ops
            .lock()
            .map_err(|_| Error::Internal("async op table poisoned".into()))?
            .remove(&tag)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("no async collective with tag {tag} is in flight"))
            })?;
        self.await_collective(AsyncReduceHandle {
            tag,
            join: Some(join),
        })
    }

    /// The group's size as of the latest master update, for sizing
    /// all-gather and reduce-scatter buffers; `TooFewPeers` below two.
    fn collective_world(&self, kind: CollectiveKind) -> Result<usize> {
        let world = self.world()?.group_world as usize;
        if world < 2 {
            return Err(Error::TooFewPeers(format!(
                "{} needs at least 2 peers in the group, have {world}",
                kind.name()
            )));
        }
        Ok(world)
    }

    /// Broadcast of a typed slice from the peer at rank `root`: on success
    /// every peer's `buf` holds the root's bytes. Ranks are ring positions
    /// (see [`CollectiveInfo::rank`]); a failed broadcast leaves the
    /// non-root buffers partly written.
    pub fn broadcast<T: Element>(
        &self,
        buf: &mut [T],
        root: u32,
        tag: u64,
    ) -> Result<CollectiveInfo> {
        let desc = ReduceDescriptor::new(buf.len(), T::DTYPE, crate::ReduceOp::Sum).with_tag(tag);
        // SAFETY: the slice is valid and exclusively ours for the call.
        let h = unsafe { self.broadcast_async_raw(buf.as_mut_ptr() as *mut u8, &desc, root)? };
        self.await_collective(h)
    }

    /// Starts a broadcast of `desc.count` elements of `desc.datatype` in
    /// `buf` from rank `root` (`desc.op` is ignored; quantization refused).
    ///
    /// # Safety
    /// `buf` writable for the whole buffer until the handle is awaited.
    pub unsafe fn broadcast_async_raw(
        &self,
        buf: *mut u8,
        desc: &ReduceDescriptor,
        root: u32,
    ) -> Result<AsyncReduceHandle> {
        let bytes = validate_unreduced(desc, CollectiveKind::Broadcast)?;
        self.start_collective(
            CollectiveKind::Broadcast,
            root,
            buf,
            bytes,
            buf,
            bytes,
            desc,
        )
    }

    /// All-gather of typed slices: `recv` (world × `send.len()` elements)
    /// ends with every peer's `send` in rank order, identical everywhere.
    pub fn all_gather<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        tag: u64,
    ) -> Result<CollectiveInfo> {
        let world = self.collective_world(CollectiveKind::AllGather)?;
        if send.len().checked_mul(world) != Some(recv.len()) {
            return Err(Error::InvalidArgument(format!(
                "all-gather of {} elements over {world} peers needs a receive buffer of {}, not {}",
                send.len(),
                send.len().saturating_mul(world),
                recv.len()
            )));
        }
        let desc = ReduceDescriptor::new(send.len(), T::DTYPE, crate::ReduceOp::Sum).with_tag(tag);
        // SAFETY: both slices are valid for the call, which awaits the op.
        let h = unsafe {
            self.all_gather_async_raw(
                send.as_ptr() as *const u8,
                recv.as_mut_ptr() as *mut u8,
                &desc,
            )?
        };
        self.await_collective(h)
    }

    /// Starts an all-gather of `desc.count` elements per peer; `recv`
    /// must hold world × count elements for the group's current size (an
    /// op that finds the group resized fails with `RankConnectionLost`).
    ///
    /// # Safety
    /// `send` readable and `recv` writable for their sizes until the
    /// handle is awaited; they must not overlap.
    pub unsafe fn all_gather_async_raw(
        &self,
        send: *const u8,
        recv: *mut u8,
        desc: &ReduceDescriptor,
    ) -> Result<AsyncReduceHandle> {
        let bytes = validate_unreduced(desc, CollectiveKind::AllGather)?;
        let world = self.collective_world(CollectiveKind::AllGather)?;
        let recv_bytes = bytes
            .checked_mul(world)
            .ok_or_else(|| Error::InvalidArgument("receive buffer too large".into()))?;
        self.start_collective(
            CollectiveKind::AllGather,
            0,
            send,
            bytes,
            recv,
            recv_bytes,
            desc,
        )
    }

    /// Reduce-scatter of typed slices: `send` holds world × `recv.len()`
    /// elements; `recv` ends with this rank's segment of the reduction.
    pub fn reduce_scatter<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        desc: &ReduceDescriptor,
    ) -> Result<CollectiveInfo> {
        let world = self.collective_world(CollectiveKind::ReduceScatter)?;
        if T::DTYPE != desc.datatype || recv.len() != desc.count {
            return Err(Error::InvalidArgument(format!(
                "reduce-scatter buffers of {} ({} elements) do not match the descriptor's {} ({})",
                T::DTYPE.name(),
                recv.len(),
                desc.datatype.name(),
                desc.count
            )));
        }
        if recv.len().checked_mul(world) != Some(send.len()) {
            return Err(Error::InvalidArgument(format!(
                "reduce-scatter to {} elements over {world} peers needs a send buffer of {}, not {}",
                recv.len(),
                recv.len().saturating_mul(world),
                send.len()
            )));
        }
        // SAFETY: both slices are valid for the call, which awaits the op.
        let h = unsafe {
            self.reduce_scatter_async_raw(
                send.as_ptr() as *const u8,
                recv.as_mut_ptr() as *mut u8,
                desc,
            )?
        };
        self.await_collective(h)
    }

    /// Starts a reduce-scatter: `desc.count` is each rank's share, `send`
    /// holds world × count elements for the group's current size.
    ///
    /// # Safety
    /// `send` readable and `recv` writable for their sizes until the
    /// handle is awaited; they must not overlap.
    pub unsafe fn reduce_scatter_async_raw(
        &self,
        send: *const u8,
        recv: *mut u8,
        desc: &ReduceDescriptor,
    ) -> Result<AsyncReduceHandle> {
        let bytes = validate_descriptor(desc)?;
        let world = self.collective_world(CollectiveKind::ReduceScatter)?;
        let send_bytes = bytes
            .checked_mul(world)
            .ok_or_else(|| Error::InvalidArgument("send buffer too large".into()))?;
        self.start_collective(
            CollectiveKind::ReduceScatter,
            0,
            send,
            send_bytes,
            recv,
            bytes,
            desc,
        )
    }

    /// Tagged (C-style) forms of the three: the handle is kept by tag and
    /// awaited with [`await_async_collective`](Self::await_async_collective).
    ///
    /// # Safety
    /// As for the matching `*_async_raw` call, until awaited.
    pub unsafe fn collective_async_tagged(
        &self,
        kind: CollectiveKind,
        send: *const u8,
        recv: *mut u8,
        desc: &ReduceDescriptor,
        root: u32,
    ) -> Result<()> {
        self.keep_tagged(desc.tag, || match kind {
            CollectiveKind::AllReduce => self.all_reduce_async_raw(send, recv, desc),
            CollectiveKind::Broadcast => {
                if !std::ptr::eq(send, recv) {
                    return Err(Error::InvalidArgument(
                        "a broadcast works in place: send and receive must be the same buffer"
                            .into(),
                    ));
                }
                self.broadcast_async_raw(recv, desc, root)
            }
            CollectiveKind::AllGather => self.all_gather_async_raw(send, recv, desc),
            CollectiveKind::ReduceScatter => self.reduce_scatter_async_raw(send, recv, desc),
        })
    }

    /// Runs many all-reduces, at most `max_in_flight` at once, retrying the
    /// failed ones with the surviving peers until all succeed or fewer than
    /// two peers remain (`TooFewPeers`). Returns the summed traffic and the
    /// world size of the last attempt.
    ///
    /// # Safety
    /// Each op's buffers must be valid as for [`all_reduce_raw`](Self::all_reduce_raw).
    pub unsafe fn all_reduce_multiple_with_retry_raw(
        &self,
        ops: &[RawReduceOp],
        max_in_flight: usize,
    ) -> Result<ReduceInfo> {
        let mut tags = std::collections::HashSet::new();
        for op in ops {
            validate_descriptor(&op.desc)?;
            if !tags.insert(op.desc.tag) {
                return Err(Error::InvalidArgument(format!(
                    "tag {} appears twice",
                    op.desc.tag
                )));
            }
        }
        let max_in_flight = max_in_flight.max(1);
        let mut total = ReduceInfo::default();
        let mut todo: Vec<usize> = (0..ops.len()).collect();
        while !todo.is_empty() {
            let mut failed = Vec::new();
            let mut last_err = None;
            let mut fatal: Option<Error> = None;
            for batch in todo.chunks(max_in_flight) {
                let mut handles = Vec::with_capacity(batch.len());
                for &i in batch {
                    let op = &ops[i];
                    handles.push((i, self.all_reduce_async_raw(op.send, op.recv, &op.desc)));
                }
                // Every started op is awaited, even after a fatal error: the
                // tasks use the caller's buffers until they end.
                for (i, h) in handles {
                    match h.and_then(|h| self.await_handle(h)) {
                        Ok(info) => {
                            total.tx_bytes += info.tx_bytes;
                            total.rx_bytes += info.rx_bytes;
                            total.local_world_size = info.local_world_size;
                        }
                        Err(
                            e @ (Error::RankConnectionLost(_) | Error::RankConnectionFailed(_)),
                        ) => {
                            tracing::info!(peer = %self.peer_id(), tag = ops[i].desc.tag, "all-reduce failed ({e}); will retry");
                            failed.push(i);
                            last_err = Some(e);
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
                return Err(e);
            }
            if !failed.is_empty() {
                let world = self.world()?.group_world;
                if world < 2 {
                    return Err(Error::TooFewPeers(format!(
                        "fewer than two peers remain after: {}",
                        last_err.map(|e| e.to_string()).unwrap_or_default()
                    )));
                }
            }
            todo = failed;
        }
        Ok(total)
    }

    /// Leaves the swarm gracefully: the others' next operations go on without
    /// this peer and see no error.
    pub fn close(mut self) {
        self.shutdown_inner();
    }

    fn shutdown_inner(&mut self) {
        let ctl = self.ctl.lock().ok().and_then(|mut c| c.take());
        if let (Some(ctl), Some(rt)) = (ctl, self.rt.as_ref()) {
            if !ctl.is_dead() && tokio::runtime::Handle::try_current().is_err() {
                ctl.set_leaving();
                let _ = ctl.send(&PeerMsg::Leave);
                rt.block_on(ctl.flush());
            }
        }
        self.shutdown.cancel();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        self.shutdown_inner();
    }
}

/// A typed all-reduce for [`Communicator::all_reduce_multiple_with_retry`]:
/// borrows its buffers for `'a`.
pub struct ReduceBuffers<'a> {
    op: RawReduceOp,
    _borrow: std::marker::PhantomData<&'a mut [u8]>,
}

impl<'a> ReduceBuffers<'a> {
    /// Reduce `data` in place (restored if an attempt fails).
    pub fn in_place<T: Element>(data: &'a mut [T], op: crate::ReduceOp, tag: u64) -> Self {
        let p = data.as_mut_ptr() as *mut u8;
        ReduceBuffers {
            op: RawReduceOp {
                send: p,
                recv: p,
                desc: ReduceDescriptor::new(data.len(), T::DTYPE, op).with_tag(tag),
            },
            _borrow: std::marker::PhantomData,
        }
    }

    /// Reduce `send` into `recv` (equal lengths, else `InvalidArgument` at the call).
    pub fn new<T: Element>(
        send: &'a [T],
        recv: &'a mut [T],
        op: crate::ReduceOp,
        tag: u64,
    ) -> Self {
        let mut desc = ReduceDescriptor::new(send.len(), T::DTYPE, op).with_tag(tag);
        if recv.len() != send.len() {
            desc.count = 0; // refused by validation
        }
        ReduceBuffers {
            op: RawReduceOp {
                send: send.as_ptr() as *const u8,
                recv: recv.as_mut_ptr() as *mut u8,
                desc,
            },
            _borrow: std::marker::PhantomData,
        }
    }

    /// Quantize on the wire (see `docs/quantization.md`).
    pub fn with_quantization(mut self, q: crate::QuantizationOptions) -> Self {
        self.op.desc.quantization = q;
        self
    }
}

impl Communicator {
    /// Safe form of [`all_reduce_multiple_with_retry_raw`](Self::all_reduce_multiple_with_retry_raw).
    pub fn all_reduce_multiple_with_retry(
        &self,
        ops: &mut [ReduceBuffers<'_>],
        max_in_flight: usize,
    ) -> Result<ReduceInfo> {
        let raw: Vec<RawReduceOp> = ops.iter().map(|o| o.op).collect();
        // SAFETY: every ReduceBuffers exclusively borrows its buffers for the
        // duration of this call (we hold `&mut` to all of them).
        unsafe { self.all_reduce_multiple_with_retry_raw(&raw, max_in_flight) }
    }
}

/// One operation of [`Communicator::all_reduce_multiple_with_retry_raw`].
#[derive(Debug, Clone, Copy)]
pub struct RawReduceOp {
    pub send: *const u8,
    pub recv: *mut u8,
    pub desc: ReduceDescriptor,
}

/// An all-reduce in flight.
pub struct AsyncReduceHandle {
    tag: u64,
    join: Option<tokio::task::JoinHandle<Result<CollectiveInfo>>>,
}

impl std::fmt::Debug for AsyncReduceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncReduceHandle")
            .field("tag", &self.tag)
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl AsyncReduceHandle {
    pub fn tag(&self) -> u64 {
        self.tag
    }

    pub fn is_finished(&self) -> bool {
        self.join.as_ref().is_none_or(|j| j.is_finished())
    }
}

/// Element types the typed API accepts.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DataType;
}

macro_rules! element {
    ($t:ty, $d:ident) => {
        impl Element for $t {
            const DTYPE: DataType = DataType::$d;
        }
    };
}
element!(u8, U8);
element!(i8, I8);
element!(u16, U16);
element!(i16, I16);
element!(u32, U32);
element!(i32, I32);
element!(u64, U64);
element!(i64, I64);
element!(half::f16, F16);
element!(half::bf16, BF16);
element!(f32, F32);
element!(f64, F64);

fn check_typed<T: Element>(send: usize, recv: usize, desc: &ReduceDescriptor) -> Result<()> {
    if T::DTYPE != desc.datatype {
        return Err(Error::InvalidArgument(format!(
            "buffer element type {} does not match the descriptor's {}",
            T::DTYPE.name(),
            desc.datatype.name()
        )));
    }
    if send != desc.count || recv != desc.count {
        return Err(Error::InvalidArgument(format!(
            "buffers hold {send} and {recv} elements but the descriptor says {}",
            desc.count
        )));
    }
    Ok(())
}

/// Checks a descriptor; returns its size in bytes.
pub fn validate_descriptor(desc: &ReduceDescriptor) -> Result<usize> {
    if desc.count == 0 {
        return Err(Error::InvalidArgument(
            "element count must be positive".into(),
        ));
    }
    let bytes = desc.byte_len()?;
    if bytes > isize::MAX as usize {
        return Err(Error::InvalidArgument("buffer too large".into()));
    }
    if desc.quantization.algorithm != QuantizationAlgorithm::None {
        crate::quant::validate(
            desc.datatype,
            desc.quantization.quantized_datatype,
            desc.quantization.algorithm,
            desc.op,
        )?;
    }
    Ok(bytes)
}

fn spec_of(
    kind: CollectiveKind,
    root: u32,
    cfg: &CommunicatorConfig,
    desc: &ReduceDescriptor,
) -> CollectiveSpec {
    let algorithm = cfg.algorithm;
    let quant = desc.quantization.algorithm != QuantizationAlgorithm::None;
    let reduces = matches!(
        kind,
        CollectiveKind::AllReduce | CollectiveKind::ReduceScatter
    );
    // The configured algorithm is an all-reduce's; the other collectives
    // leave the choice to the master (it runs them on the ring).
    let algorithm = if kind == CollectiveKind::AllReduce {
        algorithm
    } else {
        Algorithm::Auto
    };
    CollectiveSpec {
        kind: kind as u8,
        algorithm: algorithm as u8,
        root,
        count: desc.count as u64,
        datatype: desc.datatype as u8,
        op: if reduces { desc.op as u8 } else { 0 },
        quant_datatype: if quant {
            desc.quantization.quantized_datatype as u8
        } else {
            0
        },
        quant_algorithm: desc.quantization.algorithm as u8,
        // Both are bounded in `Communicator::new`.
        chunk_bytes: u32::try_from(cfg.chunk_bytes).unwrap_or(u32::MAX),
        pipeline_chunks: u16::try_from(cfg.pipeline_chunks).unwrap_or(u16::MAX),
    }
}

/// The largest `chunk_bytes`: with 8-byte codes of 4-byte elements an
/// encoded sub-chunk is about twice its source, and a data frame carries
/// at most [`crate::wire::MAX_DATA_PAYLOAD`] (64 MiB).
pub(crate) const MAX_CHUNK_BYTES: usize = 16 << 20;

/// The largest `pipeline_chunks`.
pub(crate) const MAX_PIPELINE_CHUNKS: usize = 1024;

/// Checks the descriptor of a collective that moves data without reducing
/// it (broadcast, all-gather): a positive count, no quantization.
fn validate_unreduced(desc: &ReduceDescriptor, kind: CollectiveKind) -> Result<usize> {
    if desc.quantization.algorithm != QuantizationAlgorithm::None {
        return Err(Error::InvalidArgument(format!(
            "{} does not quantize (it moves each peer's bytes unchanged)",
            kind.name()
        )));
    }
    validate_descriptor(desc)
}

/// `$PCCL_IN_PLACE_RESTORE`: on unless set to `0`, `off` or `false`.
fn in_place_restore_from_env() -> bool {
    match std::env::var("PCCL_IN_PLACE_RESTORE") {
        Ok(v) => !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "off" | "false"
        ),
        Err(_) => true,
    }
}

/// `$PCCL_PIPELINE_CHUNKS` (1..=1024), or
/// [`collectives::DEFAULT_PIPELINE_CHUNKS`] when unset or invalid (with a
/// warning).
fn pipeline_chunks_from_env() -> usize {
    let default = collectives::DEFAULT_PIPELINE_CHUNKS;
    match std::env::var("PCCL_PIPELINE_CHUNKS") {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_PIPELINE_CHUNKS).contains(&n) => n,
            _ => {
                tracing::warn!("ignoring PCCL_PIPELINE_CHUNKS={v:?}: expected 1 to 1024");
                default
            }
        },
        Err(_) => default,
    }
}

/// `$PCCL_ALGORITHM`, or auto when unset or unknown (with a warning).
fn algorithm_from_env() -> Algorithm {
    match std::env::var("PCCL_ALGORITHM") {
        Ok(v) => v.parse().unwrap_or_else(|e| {
            tracing::warn!("ignoring PCCL_ALGORITHM: {e}");
            Algorithm::Auto
        }),
        Err(_) => Algorithm::Auto,
    }
}

struct OpJob {
    ctl: Arc<Control>,
    p2p: Arc<P2p>,
    kind: CollectiveKind,
    /// Root rank of a broadcast.
    root: u32,
    send: usize,
    send_bytes: usize,
    recv: RawBuf,
    recv_addr: usize,
    recv_bytes: usize,
    desc: ReduceDescriptor,
    chunk_bytes: usize,
    /// See [`CommunicatorConfig::pipeline_chunks`].
    pipeline_chunks: usize,
    /// See [`CommunicatorConfig::in_place_restore`].
    in_place_restore: bool,
}

/// Maps a master failure code back onto the error enum.
pub(crate) fn error_from_code(code: u8, reason: String) -> Error {
    Error::from_code(code as i32, reason)
}

/// One collective from "init sent" to the master's verdict.
async fn run_op(job: OpJob, mut waiter: control::Waiter) -> Result<CollectiveInfo> {
    let me = job.ctl.me();
    let tag = job.desc.tag;
    let (op_id, ring, algorithm, contributions, route, mut inbox) = loop {
        match waiter.recv().await? {
            Routed::Commence {
                op_id,
                ring,
                algorithm,
                contributions,
                route,
                inbox,
            } => break (op_id, ring, algorithm, contributions, route, inbox),
            // Before "commence" only a refusal (op id 0) can concern this call;
            // a verdict with an op id is a late one for an earlier attempt.
            Routed::Msg(MasterMsg::CollectiveResult {
                ok: false,
                code,
                reason,
                op_id: 0,
                ..
            }) => {
                return Err(error_from_code(code, reason));
            }
            Routed::Msg(_) => continue,
        }
    };
    let _unregister = OpRegistration {
        p2p: job.p2p.clone(),
        op_id,
    };
    let world = ring.len();
    let rank = ring.iter().position(|p| *p == me).unwrap_or(0);
    if algorithm == Algorithm::Relay {
        // The master decided the op when it handed out every buffer: the
        // result follows from the commence alone, with no verdict to wait for.
        let (tx, rx) = collectives::relay::reduce_relayed(
            &contributions,
            rank,
            job.desc.datatype,
            job.desc.op,
            job.recv,
        )?;
        return Ok(CollectiveInfo {
            world_size: world as u32,
            rank: rank as u32,
            algorithm,
            tx_bytes: tx,
            rx_bytes: rx,
        });
    }

    // An all-reduce reads its input from `send` and writes only `recv`. In
    // place, the ring runs in the one buffer (reading each range before it
    // first writes it) and saves only what it overwrites, for a failure to
    // restore (see `collectives::InPlace`). The direct algorithm writes the
    // result while it still sends the input to other peers, so it reads a
    // copy (its ops are small), which is also what a failure restores.
    let in_place = job.kind == CollectiveKind::AllReduce && job.send == job.recv_addr;
    let mut backup: Option<Arc<Vec<u8>>> = None;
    let ring_in_place = (in_place && algorithm != Algorithm::Direct)
        .then(|| collectives::InPlace::new(job.recv, job.in_place_restore));
    let input = if ring_in_place.is_some() {
        job.recv
    } else if in_place {
        let bytes = job.recv_bytes;
        let mut copy = job.p2p.take_scratch(bytes);
        // SAFETY: the caller guarantees `recv` is valid for `bytes` bytes.
        let src = unsafe { std::slice::from_raw_parts(job.recv_addr as *const u8, bytes) };
        // In slices with yields: a whole-buffer copy must not hold a worker.
        liveness::copy_yielding(&mut copy[..bytes], src).await;
        let copy = Arc::new(copy);
        // SAFETY: the op only reads the input; `copy` is kept alive by
        // `backup` and by every sender task that may read it.
        let raw = unsafe { RawBuf::new(copy.as_ptr() as *mut u8, bytes) };
        backup = Some(copy);
        raw
    } else {
        // SAFETY: the caller guarantees `send` is valid for `send_bytes`
        // bytes and does not overlap `recv` unless identical (checked at
        // start; a broadcast works in place); ops only read it.
        unsafe { RawBuf::new(job.send as *mut u8, job.send_bytes) }
    };

    let quant = (job.desc.quantization.algorithm != QuantizationAlgorithm::None).then_some((
        job.desc.quantization.quantized_datatype,
        job.desc.quantization.algorithm,
    ));
    let abort = CancellationToken::new();
    let input_owner = backup.clone();
    let ring_params = |count: usize, phase: RingPhase| RingParams {
        op_id,
        rank,
        world,
        count,
        dtype: job.desc.datatype,
        op: job.desc.op,
        quant,
        chunk_elems: collectives::pipelined_chunk_elems(
            job.desc.datatype,
            quant,
            job.chunk_bytes,
            job.pipeline_chunks,
            count.div_ceil(world.max(1)),
        ),
        phase,
    };
    let exchange = async {
        let right = ring[(rank + 1) % world];
        let per_rank = job.desc.count;
        let ring_phase = match job.kind {
            CollectiveKind::AllReduce => (RingPhase::Full, job.desc.count),
            CollectiveKind::AllGather => {
                check_world_shape(world, job.send_bytes, job.recv_bytes, "all-gather receive")?;
                (RingPhase::AllGather, per_rank * world)
            }
            CollectiveKind::ReduceScatter => {
                check_world_shape(world, job.recv_bytes, job.send_bytes, "reduce-scatter send")?;
                (RingPhase::ReduceScatter, per_rank * world)
            }
            CollectiveKind::Broadcast => (RingPhase::Full, 0),
        };
        match (job.kind, algorithm) {
            (CollectiveKind::AllReduce, Algorithm::Direct) => {
                let mut pools = Vec::with_capacity(world);
                for (r, peer) in ring.iter().enumerate() {
                    if r == rank {
                        pools.push(None);
                        continue;
                    }
                    let addr = job.ctl.addr_of(*peer)?;
                    pools.push(Some(job.p2p.ensure_mesh_pool(*peer, addr).await?));
                }
                let params = collectives::direct::DirectParams {
                    op_id,
                    rank,
                    count: job.desc.count,
                    dtype: job.desc.datatype,
                    op: job.desc.op,
                    quant,
                    chunk_elems: collectives::chunk_elems(
                        job.desc.datatype,
                        quant,
                        job.chunk_bytes,
                    ),
                };
                collectives::direct::run_direct(
                    &params,
                    &ring,
                    input,
                    input_owner.clone(),
                    job.recv,
                    &mut inbox,
                    &route,
                    &abort,
                    pools,
                    &job.p2p.bufs,
                )
                .await
            }
            (CollectiveKind::Broadcast, _) => {
                let params = collectives::broadcast::BroadcastParams {
                    op_id,
                    rank,
                    world,
                    root: job.root as usize,
                    bytes: job.recv_bytes,
                    chunk_bytes: collectives::pipelined_chunk_elems(
                        job.desc.datatype,
                        None,
                        job.chunk_bytes,
                        job.pipeline_chunks,
                        job.recv_bytes / job.desc.datatype.size(),
                    ) * job.desc.datatype.size(),
                };
                let pool = if route.sinks.is_empty() {
                    None
                } else {
                    let addr = job.ctl.addr_of(right)?;
                    Some(job.p2p.ensure_pool(right, addr).await?)
                };
                collectives::broadcast::run_broadcast(
                    &params, job.recv, &mut inbox, &route, &abort, pool,
                )
                .await
            }
            _ => {
                let (phase, count) = ring_phase;
                let params = ring_params(count, phase);
                let addr = job.ctl.addr_of(right)?;
                let pool = job.p2p.ensure_pool(right, addr).await?;
                collectives::run_ring(
                    &params,
                    input,
                    input_owner.clone(),
                    job.recv,
                    ring_in_place.clone(),
                    &mut inbox,
                    &route,
                    &abort,
                    pool,
                    &job.p2p.bufs,
                )
                .await
            }
        }
    };
    tokio::pin!(exchange);
    // The exchange is always driven to completion (never dropped early):
    // its tasks read and write the caller's buffers until they are joined.
    let mut verdict: Option<Result<(bool, u8, String)>> = None;
    let exchanged = tokio::select! {
        r = &mut exchange => r,
        v = next_verdict(&mut waiter, op_id) => {
            // The master decided before we finished (a peer failed or the
            // master is gone): stop the op, then honour the verdict.
            abort.cancel();
            verdict = Some(v);
            (&mut exchange).await
        }
    };
    let outcome: Result<CollectiveInfo> = match exchanged {
        Ok((tx, rx)) => {
            let info = CollectiveInfo {
                world_size: world as u32,
                rank: rank as u32,
                algorithm,
                tx_bytes: tx,
                rx_bytes: rx,
            };
            let v = match verdict {
                Some(v) => v,
                None => match job.ctl.send(&PeerMsg::CollectiveDone {
                    tag,
                    op_id,
                    ok: true,
                }) {
                    Ok(()) => next_verdict(&mut waiter, op_id).await,
                    Err(e) => Err(e),
                },
            };
            match v {
                Ok((true, _, _)) => Ok(info),
                Ok((false, code, reason)) => Err(error_from_code(code, reason)),
                Err(e) => Err(e),
            }
        }
        Err(e) => {
            let reported = verdict.is_none()
                && job
                    .ctl
                    .send(&PeerMsg::CollectiveDone {
                        tag,
                        op_id,
                        ok: false,
                    })
                    .is_ok();
            if reported {
                // The master fails the op for everyone and says why (e.g. the
                // neighbour left): its verdict is the better error.
                verdict = tokio::time::timeout(VERDICT_WAIT, next_verdict(&mut waiter, op_id))
                    .await
                    .ok();
            }
            match verdict {
                Some(Ok((false, code, reason))) => Err(error_from_code(code, reason)),
                Some(Err(master_err)) => Err(master_err),
                _ => Err(e),
            }
        }
    };
    let outcome = match (outcome, &ring_in_place) {
        // SAFETY: the exchange was driven to completion: every task of the
        // op is joined and the landing closed.
        (Err(e), Some(ip)) if !unsafe { ip.restore() }.await => Err(Error::InPlaceInputLost(
            format!("{e}; the in-place buffer was partly overwritten (in-place restore is off)"),
        )),
        (outcome, _) => outcome,
    };
    if let Err(e) = &outcome {
        tracing::debug!(peer = %me, tag, op_id, kind = job.kind.name(), "collective failed: {e}");
        if let Some(b) = &backup {
            // SAFETY: every task of the op has been joined; `recv` is ours
            // again and does not overlap the backup.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(job.recv_addr as *mut u8, job.recv_bytes) };
            liveness::copy_yielding(dst, &b[..job.recv_bytes]).await;
        }
    }
    // Every task is joined here, so this is the last reference; the copy
    // is kept for the next in-place op.
    if let Some(b) = backup.and_then(|b| Arc::try_unwrap(b).ok()) {
        job.p2p.put_scratch(b);
    }
    outcome
}

/// An all-gather's receive buffer (a reduce-scatter's send buffer) holds
/// one share per peer: fails when the group changed size since the call.
fn check_world_shape(world: usize, share: usize, whole: usize, what: &str) -> Result<()> {
    if share.checked_mul(world) != Some(whole) {
        return Err(Error::RankConnectionLost(format!(
            "the group has {world} peers now, but the {what} buffer holds {} shares",
            whole / share.max(1)
        )));
    }
    Ok(())
}

/// How long a peer whose ring failed waits for the master's reason.
const VERDICT_WAIT: Duration = Duration::from_secs(2);

/// Waits for the master's verdict on `op_id`: (ok, code, reason).
async fn next_verdict(waiter: &mut control::Waiter, op_id: u64) -> Result<(bool, u8, String)> {
    loop {
        if let Routed::Msg(MasterMsg::CollectiveResult {
            op_id: id,
            ok,
            code,
            reason,
            ..
        }) = waiter.recv().await?
        {
            if id == op_id {
                return Ok((ok, code, reason));
            }
        }
    }
}

/// Counts one collective as in flight until dropped.
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn start(counter: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

struct OpRegistration {
    p2p: Arc<P2p>,
    op_id: u64,
}

impl Drop for OpRegistration {
    fn drop(&mut self) {
        self.p2p.unregister_op(self.op_id);
    }
}

impl Communicator {
    /// Synchronizes `state` with the other peers of the group (collective):
    /// checks the revision, elects the popular content by hash, and fetches
    /// the tensors that differ from a peer that holds it, verifying them by
    /// hash. On success every peer's tensors hold identical bytes and
    /// `state.revision` is the group's. On failure an error is returned and
    /// each tensor is untouched, or (for a tensor whose transfer broke off)
    /// left partially written, never silently.
    pub fn sync_shared_state(
        &self,
        state: &mut crate::SharedState<'_>,
        strategy: crate::SyncStrategy,
    ) -> Result<crate::SyncInfo> {
        let mut names = std::collections::HashSet::new();
        for t in &state.tensors {
            if t.name.is_empty() || t.name.len() > crate::wire::MAX_NAME_LEN {
                return Err(Error::InvalidArgument(format!(
                    "tensor name '{}' is empty or too long",
                    t.name
                )));
            }
            if !names.insert(t.name.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "tensor name '{}' appears twice",
                    t.name
                )));
            }
            if t.device != crate::DeviceType::Cpu {
                return Err(Error::InvalidArgument(format!(
                    "tensor '{}' is in CUDA memory, which this build does not support",
                    t.name
                )));
            }
            if t.count > 0 && t.ptr.is_null() {
                return Err(Error::InvalidArgument(format!(
                    "tensor '{}' has a NULL data pointer",
                    t.name
                )));
            }
        }
        if state.tensors.len() > crate::wire::MAX_LIST_LEN {
            return Err(Error::InvalidArgument(
                "too many tensors in one shared state".into(),
            ));
        }
        // Entries are checked first, as the C and Python faces do.
        let ctl = self.control()?;
        self.ensure_no_async_ops()?;
        let slices: Vec<&[u8]> = state.tensors.iter().map(|t| t.bytes()).collect();
        let hashes = crate::hash::tensor_hashes(&slices);
        drop(slices);
        let server = self.ss.clone();
        let opts = crate::shared_state::TransferOpts {
            parallel: self.cfg.p2p_connection_pool_size.max(1) as usize,
            net: Net::new(self.cfg.socket),
            timeout: self.cfg.connect_timeout,
            stall: self.cfg.shared_state_stall_timeout,
            progress: crate::shared_state::ProgressOpts {
                interval: self.cfg.progress_interval,
                callback: self.cfg.on_sync_progress.clone(),
            },
        };
        self.block_on(crate::shared_state::run_sync(
            &ctl, &server, state, strategy, hashes, opts,
        ))?
    }
}
