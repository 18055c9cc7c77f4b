//! The peer's control channel to the master: one writer thread (which also
//! sends the heartbeats, see [`super::liveness`]), one reader task that
//! routes each master message to whichever call is waiting for it, and the
//! handling of "establish" rounds (connecting to the ring neighbour when the
//! master says so).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncRead;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::collectives;
use crate::comm::p2p::{Frame, OpRoute, P2p};
use crate::error::{Error, Result};
use crate::net::{self, FrameError, SendHalf};
use crate::types::{Algorithm, CollectiveKind};
use crate::wire::{MasterMsg, PeerEntry, PeerId, PeerMsg, WorldInfo};

/// Which call a master message answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum WaitKey {
    Register,
    Topology,
    Pending,
    Optimize,
    Collective(u64),
    Sync,
}

/// A routed master message; "commence" also carries the op's inbox.
pub(crate) enum Routed {
    Msg(MasterMsg),
    Commence {
        op_id: u64,
        ring: Vec<PeerId>,
        algorithm: Algorithm,
        /// Every participant's buffer, for a relayed all-reduce.
        contributions: Vec<Vec<u8>>,
        route: Arc<OpRoute>,
        inbox: mpsc::Receiver<Frame>,
    },
}

use super::liveness::Out;

/// Shared state of the control channel.
pub(crate) struct Control {
    /// To the writer thread.
    out: std::sync::mpsc::Sender<Out>,
    /// Heartbeat interval of the writer thread (0: none yet).
    heartbeat_ms: Arc<AtomicU64>,
    waiters: Mutex<HashMap<WaitKey, mpsc::UnboundedSender<Routed>>>,
    dead: Mutex<Option<String>>,
    /// Set when this peer leaves on purpose, so the closing is not a warning.
    leaving: std::sync::atomic::AtomicBool,
    pub world: Mutex<WorldInfo>,
    /// Peers of this peer's group from the last establish round.
    pub directory: Mutex<HashMap<PeerId, PeerEntry>>,
    pub me: Mutex<PeerId>,
    p2p: Arc<P2p>,
    shutdown: CancellationToken,
    establish_task: Mutex<Option<tokio::task::AbortHandle>>,
    /// Kind and root of each collective this peer waits on, by tag: what
    /// "commence" needs to know whom the op receives from and sends to.
    collectives: Mutex<HashMap<u64, (CollectiveKind, u32)>>,
}

/// A registered wait; unregisters itself when dropped.
pub(crate) struct Waiter {
    key: WaitKey,
    rx: mpsc::UnboundedReceiver<Routed>,
    ctl: Arc<Control>,
}

impl Waiter {
    /// Next message for this call; `MasterConnectionFailed` if the master is gone.
    pub async fn recv(&mut self) -> Result<Routed> {
        match self.rx.recv().await {
            Some(m) => Ok(m),
            None => Err(self.ctl.dead_error()),
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Ok(mut w) = self.ctl.waiters.lock() {
            w.remove(&self.key);
        }
        if let WaitKey::Collective(tag) = self.key {
            if let Ok(mut c) = self.ctl.collectives.lock() {
                c.remove(&tag);
            }
        }
    }
}

impl Control {
    /// Starts the reader task and the writer thread on the halves of an
    /// established, greeted connection.
    pub fn start<R, W>(rd: R, wr: W, p2p: Arc<P2p>, shutdown: CancellationToken) -> Arc<Control>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: SendHalf,
    {
        let (out_tx, out_rx) = std::sync::mpsc::channel();
        let heartbeat_ms = Arc::new(AtomicU64::new(0));
        let progress = p2p.rx_progress.clone();
        let ctl = Arc::new(Control {
            out: out_tx,
            heartbeat_ms: heartbeat_ms.clone(),
            waiters: Mutex::new(HashMap::new()),
            dead: Mutex::new(None),
            leaving: std::sync::atomic::AtomicBool::new(false),
            world: Mutex::new(WorldInfo::default()),
            directory: Mutex::new(HashMap::new()),
            me: Mutex::new(PeerId::default()),
            p2p,
            shutdown,
            establish_task: Mutex::new(None),
            collectives: Mutex::new(HashMap::new()),
        });
        let stop = ctl.shutdown.clone();
        super::liveness::spawn_writer(wr, out_rx, ctl.clone(), heartbeat_ms, progress, stop);
        tokio::spawn(reader_task(rd, ctl.clone()));
        ctl
    }

    pub fn me(&self) -> PeerId {
        self.me.lock().map(|m| *m).unwrap_or_default()
    }

    pub fn world(&self) -> WorldInfo {
        self.world.lock().map(|w| *w).unwrap_or_default()
    }

    pub fn is_dead(&self) -> bool {
        self.dead.lock().map(|d| d.is_some()).unwrap_or(true)
    }

    fn dead_error(&self) -> Error {
        let why = self
            .dead
            .lock()
            .ok()
            .and_then(|d| d.clone())
            .unwrap_or_else(|| "connection to the master closed".into());
        Error::MasterConnectionFailed(why)
    }

    pub(crate) fn mark_dead(&self, why: String) {
        if let Ok(mut d) = self.dead.lock() {
            if d.is_none() {
                if self.leaving.load(std::sync::atomic::Ordering::Relaxed) {
                    tracing::debug!(peer = %self.me(), "control connection closed after leaving: {why}");
                } else {
                    tracing::warn!(peer = %self.me(), "lost the master: {why}");
                }
                *d = Some(why);
            }
        }
        // Dropping the senders wakes every waiting call with an error.
        if let Ok(mut w) = self.waiters.lock() {
            w.clear();
        }
    }

    pub fn set_leaving(&self) {
        self.leaving
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn send(&self, msg: &PeerMsg) -> Result<()> {
        if self.is_dead() {
            return Err(self.dead_error());
        }
        self.out
            .send(Out::Frame(msg.to_frame()))
            .map_err(|_| self.dead_error())
    }

    /// Waits until everything sent so far has been written to the socket.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.out.send(Out::Flush(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        }
    }

    /// Registers interest in the answer to `key`.
    pub fn wait(self: &Arc<Self>, key: WaitKey) -> Result<Waiter> {
        if self.is_dead() {
            return Err(self.dead_error());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut w = self
            .waiters
            .lock()
            .map_err(|_| Error::Internal("waiter table poisoned".into()))?;
        if w.contains_key(&key) {
            return Err(Error::InvalidUsage(match key {
                WaitKey::Collective(tag) => {
                    format!("an all-reduce with tag {tag} is already in flight")
                }
                k => format!("a {k:?} call is already in progress on this communicator"),
            }));
        }
        w.insert(key, tx);
        Ok(Waiter {
            key,
            rx,
            ctl: self.clone(),
        })
    }

    /// Registers interest in the verdict on the collective with `tag`,
    /// which is a `kind` (rooted at `root` for a broadcast).
    pub fn wait_collective(
        self: &Arc<Self>,
        tag: u64,
        kind: CollectiveKind,
        root: u32,
    ) -> Result<Waiter> {
        let waiter = self.wait(WaitKey::Collective(tag))?;
        if let Ok(mut c) = self.collectives.lock() {
            c.insert(tag, (kind, root));
        }
        Ok(waiter)
    }

    fn route(&self, key: WaitKey, msg: Routed) -> bool {
        let tx = self.waiters.lock().ok().and_then(|w| w.get(&key).cloned());
        match tx {
            Some(tx) => tx.send(msg).is_ok(),
            None => false,
        }
    }

    fn dispatch(self: &Arc<Self>, msg: MasterMsg) {
        let me = self.me();
        match msg {
            MasterMsg::RegisterAck { id, .. } => {
                // Before anything else is dispatched: an establish round can
                // follow at once, and its dials greet with this identity.
                if let Ok(mut me) = self.me.lock() {
                    *me = id;
                }
                self.p2p.set_me(id);
                self.route(WaitKey::Register, Routed::Msg(msg));
            }
            MasterMsg::Establish { round, ring, peers } => self.on_establish(round, ring, peers),
            MasterMsg::TopologyUpdated { world } => {
                self.set_world(world);
                self.route(WaitKey::Topology, Routed::Msg(msg));
            }
            MasterMsg::TopologyFailed { .. } => {
                self.route(WaitKey::Topology, Routed::Msg(msg));
            }
            MasterMsg::World { world } => self.set_world(world),
            MasterMsg::PendingAnswer { .. } => {
                self.route(WaitKey::Pending, Routed::Msg(msg));
            }
            MasterMsg::OptimizeDone { .. } => {
                self.route(WaitKey::Optimize, Routed::Msg(msg));
            }
            MasterMsg::CollectiveCommence {
                tag,
                op_id,
                ring,
                algorithm,
                contributions,
            } => {
                let n = ring.len();
                let pos = ring.iter().position(|p| *p == me);
                let meta = self
                    .collectives
                    .lock()
                    .ok()
                    .and_then(|c| c.get(&tag).copied());
                let algo = Algorithm::from_raw(algorithm)
                    .ok()
                    .filter(|a| *a != Algorithm::Auto);
                let (Some(rank), true, Some((kind, root)), Some(algorithm)) =
                    (pos, n >= 2, meta, algo)
                else {
                    tracing::warn!(peer = %me, tag, op_id, algorithm,
                        "commence without this peer in the ring, for no call of ours, or with an unknown algorithm");
                    self.p2p.note_commenced(op_id);
                    return;
                };
                let (sources, sinks) =
                    collectives::route_peers(&ring, rank, kind, algorithm, root as usize);
                let (tx, inbox) = mpsc::channel(super::p2p::INBOX_CAPACITY);
                let route = Arc::new(OpRoute::new(sources, sinks, tx));
                // Register before acknowledging, so early frames find their op.
                self.p2p.register_op(op_id, route.clone());
                let delivered = self.route(
                    WaitKey::Collective(tag),
                    Routed::Commence {
                        op_id,
                        ring,
                        algorithm,
                        contributions,
                        route,
                        inbox,
                    },
                );
                if !delivered {
                    tracing::warn!(peer = %me, tag, op_id, "commence for an all-reduce nobody waits for");
                    self.p2p.unregister_op(op_id);
                }
            }
            MasterMsg::CollectiveResult { tag, .. } => {
                self.route(WaitKey::Collective(tag), Routed::Msg(msg));
            }
            MasterMsg::SyncPlan { .. } | MasterMsg::SyncResult { .. } => {
                self.route(WaitKey::Sync, Routed::Msg(msg));
            }
            MasterMsg::Kick { reason } => {
                tracing::error!(peer = %me, "the master closed our connection: {reason}");
                self.mark_dead(format!("kicked by the master: {reason}"));
            }
        }
    }

    fn set_world(&self, world: WorldInfo) {
        if let Ok(mut w) = self.world.lock() {
            *w = world;
        }
    }

    /// Connects to the new right neighbour and reports to the master.
    fn on_establish(self: &Arc<Self>, round: u64, ring: Vec<PeerId>, peers: Vec<PeerEntry>) {
        if let Ok(mut d) = self.directory.lock() {
            *d = peers.iter().map(|p| (p.id, p.clone())).collect();
        }
        let this = self.clone();
        let task = tokio::spawn(async move {
            let me = this.me();
            let ok = match right_neighbour(&ring, me) {
                None => {
                    this.p2p.retain_pools(&[]);
                    true
                }
                Some(right) => {
                    this.p2p.retain_pools(&ring);
                    match this.addr_of(right) {
                        Err(e) => {
                            tracing::warn!(peer = %me, "establish round {round}: {e}");
                            false
                        }
                        Ok(addr) => match this.p2p.ensure_pool(right, addr).await {
                            Ok(_) => true,
                            Err(e) => {
                                tracing::warn!(peer = %me, "establish round {round}: {e}");
                                false
                            }
                        },
                    }
                }
            };
            let _ = this.send(&PeerMsg::ConnectionsEstablished { round, ok });
            if ok && ring.len() > 2 && ring.len() <= crate::types::DIRECT_MAX_WORLD {
                // Small ops may run the direct algorithm, which sends to every
                // peer: dial the rest of the mesh now rather than in the first
                // such op. Best effort: an op dials whatever is still missing.
                let others = ring
                    .iter()
                    .filter(|p| **p != me && Some(**p) != right_neighbour(&ring, me));
                for peer in others {
                    if let Ok(addr) = this.addr_of(*peer) {
                        if let Err(e) = this.p2p.ensure_mesh_pool(*peer, addr).await {
                            tracing::debug!(peer = %me, to = %peer, "mesh connection not up yet: {e}");
                        }
                    }
                }
            }
        });
        if let Ok(mut t) = self.establish_task.lock() {
            if let Some(prev) = t.replace(task.abort_handle()) {
                prev.abort();
            }
        }
    }

    /// The p2p address of a peer of this group.
    pub fn addr_of(&self, peer: PeerId) -> Result<SocketAddr> {
        self.directory
            .lock()
            .ok()
            .and_then(|d| d.get(&peer).map(|e| SocketAddr::new(e.ip, e.p2p_port)))
            .ok_or_else(|| Error::RankConnectionFailed(format!("no address known for peer {peer}")))
    }
}

pub(crate) fn right_neighbour(ring: &[PeerId], me: PeerId) -> Option<PeerId> {
    let n = ring.len();
    if n < 2 {
        return None;
    }
    ring.iter()
        .position(|p| *p == me)
        .map(|i| ring[(i + 1) % n])
}

async fn reader_task<R: AsyncRead + Unpin>(mut rd: R, ctl: Arc<Control>) {
    let why = loop {
        let frame = tokio::select! {
            _ = ctl.shutdown.cancelled() => break "communicator closed".to_string(),
            f = net::read_control_frame(&mut rd) => f,
        };
        match frame {
            Ok(body) => match MasterMsg::decode(&body) {
                Ok(msg) => ctl.dispatch(msg),
                Err(e) => break format!("malformed message from the master: {e}"),
            },
            Err(FrameError::Closed) => break "the master closed the connection".to_string(),
            Err(e) => break format!("control connection error: {e}"),
        }
    };
    ctl.mark_dead(why);
}

/// Starts heartbeats every `interval` (sent by the control writer thread
/// until the channel dies or the communicator closes).
pub(crate) fn spawn_heartbeat(ctl: Arc<Control>, interval: Duration) {
    let ms = (interval.as_millis() as u64).max(1);
    ctl.heartbeat_ms
        .store(ms, std::sync::atomic::Ordering::Relaxed);
}
