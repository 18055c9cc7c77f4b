//! The master's agreement logic as a deterministic, sans-IO state machine.
//!
//! [`MasterState::handle`] takes one [`Event`] (a connection opened, a decoded
//! message, a disconnect, or the passage of time) and returns the [`Action`]s
//! the driver must perform (send a message, close a connection). No clocks,
//! sockets or randomness live here, so every interleaving of joins, leaves and
//! deaths can be replayed in tests.
//!
//! Consensus rounds kept here:
//! - admission: the first peers are accepted at once; later ones when every
//!   accepted peer votes *update topology*, followed by an *establish* round in
//!   which peers connect to their ring neighbours and report back;
//! - *are peers pending* and *optimize topology* votes;
//! - collectives, per (peer group, tag): gather every group member's init,
//!   commence with a fixed world and a master-assigned op id, then succeed only
//!   if every surviving participant reports success;
//! - shared-state sync, per group: revision check, hash election, fetch plans.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use super::liveness::{Clock, Eviction, LivenessStats};
use crate::error::Error;
use crate::types::{
    Algorithm, CollectiveKind, DataType, DIRECT_MAX_WORLD, RELAY_MAX_BYTES, RELAY_MAX_TOTAL,
};
use crate::wire::{
    CollectiveSpec, FailCode, FetchItem, MasterMsg, PeerEntry, PeerId, PeerMsg, TensorMeta,
    WorldInfo,
};

/// Identifies one control connection inside the driver.
pub type ConnId = u64;

/// Input to the state machine.
#[derive(Debug, Clone)]
pub enum Event {
    /// A control connection passed its greeting. `id` is the identity the
    /// peer will get if it registers (chosen by the driver, so tests can fix it).
    Connected {
        conn: ConnId,
        id: PeerId,
        /// The peer's address as the master sees it.
        remote: SocketAddr,
        /// The master's own address on this connection.
        local: SocketAddr,
    },
    Message {
        conn: ConnId,
        msg: PeerMsg,
    },
    /// The connection closed or broke.
    Disconnected {
        conn: ConnId,
    },
    /// Time passes (milliseconds on any monotonic clock).
    Tick {
        now_ms: u64,
    },
}

/// Output of the state machine, performed by the driver in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send {
        conn: ConnId,
        msg: MasterMsg,
    },
    /// Close the connection (after flushing what was sent before).
    Close {
        conn: ConnId,
        reason: String,
    },
}

#[derive(Debug, Clone)]
pub struct MasterConfig {
    /// A peer that shows no sign of life for this long is evicted. Signs of
    /// life: any message of its own (heartbeats come from a dedicated thread
    /// every `peer_timeout_ms / 5`), and a ring neighbour's report of data
    /// bytes received from it. Measured on the judged clock, which discounts
    /// the master's own scheduling delay (see `max_tick_step_ms`).
    pub peer_timeout_ms: u64,
    /// Establish rounds that may fail in a row before update topology fails.
    pub max_establish_attempts: u32,
    /// Largest all-reduce (bytes on the wire per contribution) that runs
    /// the one-hop direct algorithm when the peers leave the choice to the
    /// master. `None`: derived per world size from `link_latency_us` and
    /// `link_bandwidth_bps` ([`small_op_threshold`]).
    pub small_op_max_bytes: Option<u64>,
    /// One-way latency between peers the automatic threshold assumes.
    pub link_latency_us: u64,
    /// Per-peer bandwidth the automatic threshold assumes.
    pub link_bandwidth_bps: u64,
    /// The most of the gap between two ticks that counts against peers. The
    /// driver ticks every 50 ms; a longer gap means the master itself did
    /// not run (starved), and the excess is not held against anyone.
    pub max_tick_step_ms: u64,
}

impl Default for MasterConfig {
    fn default() -> Self {
        MasterConfig {
            peer_timeout_ms: 5_000,
            max_establish_attempts: 3,
            small_op_max_bytes: None,
            link_latency_us: 1_000,
            link_bandwidth_bps: 1_000_000_000,
            max_tick_step_ms: 100,
        }
    }
}

/// Upper bound of the automatic threshold. The direct algorithm stages
/// every contribution, (w-1) buffers, on each peer, and each peer reduces
/// the whole buffer where the ring splits that work w ways: past a few
/// ten KiB the CPU time can outweigh the hops saved (measured on loopback
/// with 4 peers on 2 cores: even at 16 KiB, 0.70× the ring at 256 KiB;
/// docs/benchmarks.md).
pub const DIRECT_MAX_BYTES: u64 = 64 << 10;

/// The largest all-reduce (bytes per contribution) for which the direct
/// algorithm beats the ring, from a latency/bandwidth cost model:
/// direct takes `a + (w-1)·n/b` (one hop, w-1 copies of the buffer out of
/// each peer), the ring `2(w-1)·a + 2(w-1)/w·n/b`, so direct wins for
/// `n < (2w-3)·w·a·b / ((w-1)(w-2))`; at w = 2 it always does (the same
/// bytes in one hop instead of two). Capped at [`DIRECT_MAX_BYTES`] on
/// links under [`WAN_LATENCY_US`], where the direct algorithm's extra CPU
/// shows; on slower links the model alone decides (measured on wan-emu,
/// 4 peers, 50 ms one-way, 100 Mbit/s: direct took 0.62-0.66x the ring's
/// time at 256 KiB and 0.86-0.95x at 1 MiB, and 2x at 4 MiB; the model
/// puts the crossover at 2.08 MB).
pub fn small_op_threshold(world: usize, latency_us: u64, bandwidth_bps: u64) -> u64 {
    if !(2..=DIRECT_MAX_WORLD).contains(&world) {
        return 0;
    }
    let cap = if latency_us >= WAN_LATENCY_US {
        u64::MAX as u128
    } else {
        DIRECT_MAX_BYTES as u128
    };
    if world == 2 {
        // Always cheaper in bytes and hops; bounded by what a peer stages.
        return cap.min(WAN_DIRECT_MAX_BYTES as u128) as u64;
    }
    let w = world as u128;
    // a·b in bytes: latency (s) × bandwidth (bytes/s).
    let ab = latency_us as u128 * (bandwidth_bps as u128 / 8) / 1_000_000;
    let n = (2 * w - 3) * w * ab / ((w - 1) * (w - 2));
    n.min(cap).min(WAN_DIRECT_MAX_BYTES as u128) as u64
}

/// One-way latency (µs) from which a link counts as a WAN for the
/// automatic threshold: round trips then cost far more than the direct
/// algorithm's extra copies and reductions.
pub const WAN_LATENCY_US: u64 = 10_000;

/// The automatic threshold's bound on WAN links: the direct algorithm
/// stages w-1 contributions on every peer.
pub const WAN_DIRECT_MAX_BYTES: u64 = 16 << 20;

/// Whether every member sent its buffer with its init, each of the op's
/// size, within the relay's bounds ([`Algorithm::Relay`]).
fn relayable(
    spec: &CollectiveSpec,
    payloads: &BTreeMap<ConnId, Vec<u8>>,
    members: &BTreeSet<ConnId>,
) -> bool {
    let bytes = wire_bytes(spec) as usize;
    spec.quant_algorithm == 0
        && bytes <= RELAY_MAX_BYTES
        && bytes.saturating_mul(members.len()) <= RELAY_MAX_TOTAL
        && members
            .iter()
            .all(|c| payloads.get(c).is_some_and(|p| p.len() == bytes))
}

/// The algorithm an op of `spec` over `world` peers runs: the peers'
/// common request, or the master's choice when they leave it open.
/// `relayable`: every peer sent its buffer along (see [`relayable`]).
/// `Err` when the request cannot be honoured.
pub fn choose_algorithm(
    spec: &CollectiveSpec,
    world: usize,
    relayable: bool,
    cfg: &MasterConfig,
) -> Result<Algorithm, Error> {
    let kind = CollectiveKind::from_raw(spec.kind)?;
    let asked = Algorithm::from_raw(spec.algorithm)?;
    if kind != CollectiveKind::AllReduce {
        return match asked {
            Algorithm::Auto | Algorithm::Ring => Ok(Algorithm::Ring),
            Algorithm::Direct | Algorithm::Relay => Err(Error::InvalidArgument(format!(
                "the {} algorithm is for all-reduce only, not {}",
                asked.name(),
                kind.name()
            ))),
        };
    }
    match asked {
        Algorithm::Auto | Algorithm::Relay if relayable => Ok(Algorithm::Relay),
        Algorithm::Relay => Err(Error::InvalidArgument(format!(
            "the relay algorithm takes unquantized all-reduces of at most {RELAY_MAX_BYTES} bytes per peer and {RELAY_MAX_TOTAL} in all"
        ))),
        Algorithm::Ring => Ok(Algorithm::Ring),
        Algorithm::Direct if world <= DIRECT_MAX_WORLD => Ok(Algorithm::Direct),
        Algorithm::Direct => Err(Error::InvalidArgument(format!(
            "the direct algorithm runs in groups of at most {DIRECT_MAX_WORLD} peers, this one has {world}"
        ))),
        Algorithm::Auto => {
            // An explicit threshold is the user's to set, beyond the cap too.
            let threshold = match cfg.small_op_max_bytes {
                Some(t) if world <= DIRECT_MAX_WORLD => t,
                Some(_) => 0,
                None => small_op_threshold(world, cfg.link_latency_us, cfg.link_bandwidth_bps),
            };
            Ok(if wire_bytes(spec) <= threshold {
                Algorithm::Direct
            } else {
                Algorithm::Ring
            })
        }
    }
}

/// Bytes of one whole contribution on the wire (quantized: the code type's
/// size per element, ignoring the small per-block metadata).
fn wire_bytes(spec: &CollectiveSpec) -> u64 {
    let size = |raw: u8| {
        DataType::from_raw(raw as u32)
            .map(|d| d.size() as u64)
            .unwrap_or(8)
    };
    let elem = if spec.quant_algorithm != 0 {
        size(spec.quant_datatype)
    } else {
        size(spec.datatype)
    };
    spec.count.saturating_mul(elem)
}

impl MasterConfig {
    /// How often peers are asked to send heartbeats.
    pub fn heartbeat_interval_ms(&self) -> u32 {
        (self.peer_timeout_ms / 5).clamp(20, 5_000) as u32
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connected,
    Pending,
    Accepted,
}

#[derive(Debug, Clone)]
struct PeerRec {
    id: PeerId,
    phase: Phase,
    group: u32,
    remote: SocketAddr,
    local: SocketAddr,
    advertised: Option<IpAddr>,
    p2p_port: u16,
    ss_port: u16,
    bench_port: u16,
    /// Judged time of the last sign of life.
    last_seen_ms: u64,
    /// Real time of the last heartbeat, for the gap statistics.
    last_beat_ms: Option<u64>,
    voted_topology: bool,
    voted_pending: bool,
    voted_optimize: bool,
    /// Revision of the last successful shared-state sync of this peer.
    synced_revision: Option<u64>,
}

#[derive(Debug)]
struct EstablishRound {
    round: u64,
    reported: BTreeSet<ConnId>,
    all_ok: bool,
    attempts: u32,
}

#[derive(Debug)]
struct Running {
    op_id: u64,
    participants: BTreeSet<ConnId>,
    done: BTreeSet<ConnId>,
}

#[derive(Debug)]
struct Collective {
    spec: CollectiveSpec,
    voters: BTreeSet<ConnId>,
    /// Voters' buffers for a relayed all-reduce (see [`Algorithm::Relay`]).
    payloads: BTreeMap<ConnId, Vec<u8>>,
    running: Option<Running>,
}

#[derive(Debug, Clone)]
struct SyncVoteRec {
    revision: u64,
    strategy: u8,
    tensors: Vec<TensorMeta>,
}

#[derive(Debug)]
struct Distributing {
    sync_id: u64,
    /// Everyone in the round, waiting for the result.
    members: BTreeSet<ConnId>,
    /// Receivers whose transfer has not finished yet.
    receivers: BTreeSet<ConnId>,
    /// Peers whose own part failed, with the code and reason.
    failed: BTreeMap<ConnId, (FailCode, String)>,
    revision: u64,
}

#[derive(Debug, Default)]
struct SyncRound {
    votes: BTreeMap<ConnId, SyncVoteRec>,
    distributing: Option<Distributing>,
}

/// Strategy values as sent on the wire (see [`crate::SyncStrategy`]).
const STRATEGY_RECEIVE_ONLY: u8 = 1;
const STRATEGY_SEND_ONLY: u8 = 2;

fn code(e: Error) -> (FailCode, String) {
    (e.code() as FailCode, e.message().to_owned())
}

/// The master's whole state.
#[derive(Debug)]
pub struct MasterState {
    cfg: MasterConfig,
    clock: Clock,
    stats: LivenessStats,
    peers: BTreeMap<ConnId, PeerRec>,
    /// Ring order per peer group.
    rings: BTreeMap<u32, Vec<ConnId>>,
    establishing: Option<EstablishRound>,
    next_round: u64,
    next_op_id: u64,
    next_sync_id: u64,
    collectives: BTreeMap<(u32, u64), Collective>,
    syncs: BTreeMap<u32, SyncRound>,
    out: Vec<Action>,
}

impl MasterState {
    pub fn new(cfg: MasterConfig) -> Self {
        MasterState {
            clock: Clock::new(cfg.max_tick_step_ms),
            stats: LivenessStats::default(),
            cfg,
            peers: BTreeMap::new(),
            rings: BTreeMap::new(),
            establishing: None,
            next_round: 1,
            next_op_id: 1,
            next_sync_id: 1,
            collectives: BTreeMap::new(),
            syncs: BTreeMap::new(),
            out: Vec::new(),
        }
    }

    pub fn config(&self) -> &MasterConfig {
        &self.cfg
    }

    /// What the master saw of its peers' liveness so far.
    pub fn liveness(&self) -> &LivenessStats {
        &self.stats
    }

    /// Real time (same clock as [`Event::Tick`]) seen when an event arrives
    /// between ticks; refines the heartbeat-gap statistics, judges nobody.
    pub fn observe_time(&mut self, now_ms: u64) {
        self.clock.observe(now_ms);
    }

    /// Number of accepted peers (all groups).
    pub fn accepted_count(&self) -> usize {
        self.accepted().count()
    }

    /// Number of peers waiting to be accepted.
    pub fn pending_count(&self) -> usize {
        self.peers
            .values()
            .filter(|p| p.phase == Phase::Pending)
            .count()
    }

    /// Identity of the peer on a connection, once it has one.
    pub fn peer_id(&self, conn: ConnId) -> Option<PeerId> {
        self.peers
            .get(&conn)
            .filter(|p| p.phase != Phase::Connected)
            .map(|p| p.id)
    }

    /// Feeds one event; returns what to do.
    pub fn handle(&mut self, ev: Event) -> Vec<Action> {
        match ev {
            Event::Connected {
                conn,
                id,
                remote,
                local,
            } => {
                self.peers.insert(
                    conn,
                    PeerRec {
                        id,
                        phase: Phase::Connected,
                        group: 0,
                        remote,
                        local,
                        advertised: None,
                        p2p_port: 0,
                        ss_port: 0,
                        bench_port: 0,
                        last_seen_ms: self.clock.judged_ms(),
                        last_beat_ms: None,
                        voted_topology: false,
                        voted_pending: false,
                        voted_optimize: false,
                        synced_revision: None,
                    },
                );
            }
            Event::Message { conn, msg } => {
                if let Some(p) = self.peers.get_mut(&conn) {
                    p.last_seen_ms = self.clock.judged_ms();
                    if matches!(msg, PeerMsg::Heartbeat | PeerMsg::DataProgress { .. }) {
                        let now = self.clock.real_ms();
                        if let Some(prev) = p.last_beat_ms.replace(now) {
                            self.stats.record_gap(now.saturating_sub(prev));
                        }
                    }
                    self.on_message(conn, msg);
                }
            }
            Event::Disconnected { conn } => {
                if self.peers.contains_key(&conn) {
                    self.remove_peer(conn, "connection closed", false);
                }
            }
            Event::Tick { now_ms } => self.on_tick(now_ms),
        }
        std::mem::take(&mut self.out)
    }

    fn send(&mut self, conn: ConnId, msg: MasterMsg) {
        self.out.push(Action::Send { conn, msg });
    }

    fn accepted(&self) -> impl Iterator<Item = (&ConnId, &PeerRec)> {
        self.peers
            .iter()
            .filter(|(_, p)| p.phase == Phase::Accepted)
    }

    fn accepted_conns(&self) -> Vec<ConnId> {
        self.accepted().map(|(c, _)| *c).collect()
    }

    fn group_members(&self, group: u32) -> BTreeSet<ConnId> {
        self.accepted()
            .filter(|(_, p)| p.group == group)
            .map(|(c, _)| *c)
            .collect()
    }

    fn world_for(&self, group: u32) -> WorldInfo {
        let mut sizes: BTreeMap<u32, u32> = BTreeMap::new();
        for (_, p) in self.accepted() {
            *sizes.entry(p.group).or_default() += 1;
        }
        WorldInfo {
            global_world: sizes.values().sum(),
            group_world: sizes.get(&group).copied().unwrap_or(0),
            num_groups: sizes.len() as u32,
            largest_group: sizes.values().copied().max().unwrap_or(0),
        }
    }

    /// The address `viewer` should dial to reach `target`.
    fn addr_for(viewer: &PeerRec, target: &PeerRec) -> IpAddr {
        if let Some(ip) = target.advertised {
            return ip;
        }
        let t = target.remote.ip();
        if t.is_loopback() && !viewer.remote.ip().is_loopback() {
            // The target runs on the master's host: hand out the master's
            // address as the viewer reached it, never a loopback address.
            return viewer.local.ip();
        }
        t
    }

    fn entry_for(&self, viewer: ConnId, target: ConnId) -> Option<PeerEntry> {
        let v = self.peers.get(&viewer)?;
        let t = self.peers.get(&target)?;
        Some(PeerEntry {
            id: t.id,
            group: t.group,
            ip: Self::addr_for(v, t),
            p2p_port: t.p2p_port,
            ss_port: t.ss_port,
            bench_port: t.bench_port,
        })
    }

    fn protocol_violation(&mut self, conn: ConnId, what: &str) {
        let reason = format!("protocol violation: {what}");
        if let Some(p) = self.peers.get(&conn) {
            tracing::warn!(peer = %p.id, "{reason}; closing its connection");
        }
        self.send(
            conn,
            MasterMsg::Kick {
                reason: reason.clone(),
            },
        );
        self.remove_peer(conn, &reason, true);
    }

    fn on_message(&mut self, conn: ConnId, msg: PeerMsg) {
        let phase = match self.peers.get(&conn) {
            Some(p) => p.phase,
            None => return,
        };
        match (phase, msg) {
            (
                Phase::Connected,
                PeerMsg::Register {
                    group,
                    p2p_port,
                    ss_port,
                    bench_port,
                    advertised_ip,
                },
            ) => {
                let hb = self.cfg.heartbeat_interval_ms();
                let Some(p) = self.peers.get_mut(&conn) else {
                    return;
                };
                p.phase = Phase::Pending;
                p.group = group;
                p.p2p_port = p2p_port;
                p.ss_port = ss_port;
                p.bench_port = bench_port;
                p.advertised = advertised_ip;
                let id = p.id;
                tracing::info!(peer = %id, group, "peer registered, pending admission");
                self.send(
                    conn,
                    MasterMsg::RegisterAck {
                        id,
                        heartbeat_interval_ms: hb,
                    },
                );
                self.maybe_bootstrap();
            }
            (Phase::Connected, _) => self.protocol_violation(conn, "message before registration"),
            (_, PeerMsg::Register { .. }) => self.protocol_violation(conn, "registered twice"),
            (_, PeerMsg::Heartbeat) => {}
            (_, PeerMsg::DataProgress { from }) => self.on_data_progress(conn, &from),
            (_, PeerMsg::Leave) => {
                self.remove_peer(conn, "left gracefully", true);
            }
            (Phase::Pending, PeerMsg::ConnectionsEstablished { .. }) => {
                self.protocol_violation(conn, "establish report from a pending peer")
            }
            (Phase::Pending, _) => {
                self.protocol_violation(conn, "collective call before admission")
            }
            (Phase::Accepted, m) => self.on_accepted_message(conn, m),
        }
    }

    fn on_accepted_message(&mut self, conn: ConnId, msg: PeerMsg) {
        match msg {
            PeerMsg::VoteUpdateTopology => {
                if let Some(p) = self.peers.get_mut(&conn) {
                    p.voted_topology = true;
                }
                self.check_topology_votes();
            }
            PeerMsg::ConnectionsEstablished { round, ok } => {
                if let Some(est) = self.establishing.as_mut() {
                    if est.round == round {
                        est.reported.insert(conn);
                        est.all_ok &= ok;
                        self.check_establish_complete();
                    }
                }
            }
            PeerMsg::VoteArePeersPending => {
                if let Some(p) = self.peers.get_mut(&conn) {
                    p.voted_pending = true;
                }
                self.check_pending_votes();
            }
            PeerMsg::VoteOptimizeTopology => {
                if let Some(p) = self.peers.get_mut(&conn) {
                    p.voted_optimize = true;
                }
                self.check_optimize_votes();
            }
            PeerMsg::CollectiveInit { tag, spec, payload } => {
                self.on_collective_init(conn, tag, spec, payload)
            }
            PeerMsg::CollectiveDone { tag, op_id, ok } => {
                self.on_collective_done(conn, tag, op_id, ok)
            }
            PeerMsg::SyncVote {
                revision,
                strategy,
                tensors,
            } => self.on_sync_vote(
                conn,
                SyncVoteRec {
                    revision,
                    strategy,
                    tensors,
                },
            ),
            PeerMsg::SyncTransferDone { sync_id, ok, .. } => {
                self.on_sync_transfer_done(conn, sync_id, ok)
            }
            PeerMsg::Register { .. }
            | PeerMsg::Heartbeat
            | PeerMsg::DataProgress { .. }
            | PeerMsg::Leave => {}
        }
    }

    // -- liveness -----------------------------------------------------------

    /// Time passes: peers silent for longer than the timeout on the judged
    /// clock are evicted. A late tick (the master itself starved) advances
    /// the judged clock by at most `max_tick_step_ms`.
    fn on_tick(&mut self, now_ms: u64) {
        let late = self.clock.tick(now_ms);
        self.stats.record_tick(late);
        if late > 0 {
            tracing::debug!(
                late_ms = late,
                "master tick late; that time is not held against peers"
            );
        }
        let now = self.clock.judged_ms();
        let timeout = self.cfg.peer_timeout_ms;
        let stale: Vec<(ConnId, PeerId, u64)> = self
            .peers
            .iter()
            .map(|(c, p)| (*c, p.id, now.saturating_sub(p.last_seen_ms)))
            .filter(|(_, _, silent)| *silent > timeout)
            .collect();
        for (conn, peer, silent_ms) in stale {
            self.stats.evictions.push(Eviction {
                peer,
                silent_ms,
                at_ms: self.clock.real_ms(),
            });
            let reason = format!("no sign of life for more than {timeout} ms; evicted");
            self.remove_peer(conn, &reason, true);
        }
    }

    /// A peer reports data bytes received from ring peers: each listed peer
    /// of its group with bytes > 0 is alive (it is sending).
    fn on_data_progress(&mut self, conn: ConnId, from: &[(PeerId, u64)]) {
        let Some(group) = self
            .peers
            .get(&conn)
            .filter(|p| p.phase == Phase::Accepted)
            .map(|p| p.group)
        else {
            return;
        };
        let now = self.clock.judged_ms();
        for (id, bytes) in from {
            if *bytes == 0 {
                continue;
            }
            let sender = self.peers.iter_mut().find(|(c, p)| {
                **c != conn && p.id == *id && p.group == group && p.phase == Phase::Accepted
            });
            if let Some((_, p)) = sender {
                p.last_seen_ms = now;
                self.stats.progress_credits += 1;
            }
        }
    }

    // -- membership -------------------------------------------------------

    /// With nobody accepted, every pending peer is accepted at once.
    fn maybe_bootstrap(&mut self) {
        if self.establishing.is_some() || self.accepted().next().is_some() {
            return;
        }
        let pending: Vec<ConnId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.phase == Phase::Pending)
            .map(|(c, _)| *c)
            .collect();
        if pending.is_empty() {
            return;
        }
        self.admit(&pending);
        self.start_establish(0);
    }

    fn admit(&mut self, conns: &[ConnId]) {
        for c in conns {
            if let Some(p) = self.peers.get_mut(c) {
                p.phase = Phase::Accepted;
                tracing::info!(peer = %p.id, group = p.group, "peer accepted");
                let g = p.group;
                self.rings.entry(g).or_default().push(*c);
            }
        }
    }

    fn check_topology_votes(&mut self) {
        if self.establishing.is_some() {
            return;
        }
        let accepted = self.accepted_conns();
        if accepted.is_empty() || !accepted.iter().all(|c| self.peers[c].voted_topology) {
            return;
        }
        let pending: Vec<ConnId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.phase == Phase::Pending)
            .map(|(c, _)| *c)
            .collect();
        self.admit(&pending);
        self.start_establish(0);
    }

    fn start_establish(&mut self, attempts: u32) {
        let accepted = self.accepted_conns();
        if accepted.is_empty() {
            self.establishing = None;
            return;
        }
        let round = self.next_round;
        self.next_round += 1;
        for &viewer in &accepted {
            let group = self.peers[&viewer].group;
            let ring_conns = self.rings.get(&group).cloned().unwrap_or_default();
            let ring: Vec<PeerId> = ring_conns.iter().map(|c| self.peers[c].id).collect();
            let peers: Vec<PeerEntry> = ring_conns
                .iter()
                .filter_map(|t| self.entry_for(viewer, *t))
                .collect();
            self.send(viewer, MasterMsg::Establish { round, ring, peers });
        }
        self.establishing = Some(EstablishRound {
            round,
            reported: BTreeSet::new(),
            all_ok: true,
            attempts,
        });
    }

    fn check_establish_complete(&mut self) {
        let accepted = self.accepted_conns();
        let Some(est) = self.establishing.as_ref() else {
            return;
        };
        if !accepted.iter().all(|c| est.reported.contains(c)) {
            return;
        }
        let (all_ok, attempts) = (est.all_ok, est.attempts);
        if all_ok {
            self.establishing = None;
            for c in &accepted {
                let g = self.peers[c].group;
                let world = self.world_for(g);
                if let Some(p) = self.peers.get_mut(c) {
                    p.voted_topology = false;
                }
                self.send(*c, MasterMsg::TopologyUpdated { world });
            }
            // Votes that arrived meanwhile (none expected) are re-examined.
            self.check_pending_votes();
        } else if attempts + 1 < self.cfg.max_establish_attempts {
            tracing::warn!(attempts = attempts + 1, "ring connections failed; retrying");
            self.start_establish(attempts + 1);
        } else {
            self.establishing = None;
            let reason = format!(
                "peers could not connect to their ring neighbours after {} attempts",
                attempts + 1
            );
            for c in &accepted {
                if let Some(p) = self.peers.get_mut(c) {
                    p.voted_topology = false;
                }
                self.send(
                    *c,
                    MasterMsg::TopologyFailed {
                        reason: reason.clone(),
                    },
                );
            }
        }
    }

    fn check_pending_votes(&mut self) {
        let accepted = self.accepted_conns();
        if accepted.is_empty() || !accepted.iter().all(|c| self.peers[c].voted_pending) {
            return;
        }
        let pending = self.pending_count() > 0;
        for c in accepted {
            if let Some(p) = self.peers.get_mut(&c) {
                p.voted_pending = false;
            }
            self.send(c, MasterMsg::PendingAnswer { pending });
        }
    }

    fn check_optimize_votes(&mut self) {
        let accepted = self.accepted_conns();
        if accepted.is_empty() || !accepted.iter().all(|c| self.peers[c].voted_optimize) {
            return;
        }
        for c in accepted {
            if let Some(p) = self.peers.get_mut(&c) {
                p.voted_optimize = false;
            }
            self.send(c, MasterMsg::OptimizeDone { ok: true });
        }
    }

    /// Removes a peer for any reason and lets every round it took part in move on.
    fn remove_peer(&mut self, conn: ConnId, reason: &str, close: bool) {
        let Some(rec) = self.peers.remove(&conn) else {
            return;
        };
        if close {
            self.out.push(Action::Close {
                conn,
                reason: reason.to_owned(),
            });
        }
        if rec.phase == Phase::Accepted {
            tracing::info!(peer = %rec.id, group = rec.group, "peer removed: {reason}");
        } else {
            tracing::debug!(peer = %rec.id, "unadmitted peer removed: {reason}");
        }
        if rec.phase != Phase::Accepted {
            return;
        }
        if let Some(ring) = self.rings.get_mut(&rec.group) {
            ring.retain(|c| *c != conn);
            if ring.is_empty() {
                self.rings.remove(&rec.group);
            }
        }
        // Collectives of its group: a running one fails, a gathering one may be complete now.
        let keys: Vec<(u32, u64)> = self
            .collectives
            .keys()
            .filter(|(g, _)| *g == rec.group)
            .copied()
            .collect();
        for key in keys {
            let Some(coll) = self.collectives.get_mut(&key) else {
                continue;
            };
            coll.voters.remove(&conn);
            coll.payloads.remove(&conn);
            let was_participant = coll
                .running
                .as_mut()
                .map(|run| run.participants.remove(&conn));
            match was_participant {
                Some(true) => {
                    let msg = format!("peer {} left the operation: {reason}", rec.id);
                    self.fail_collective(key, Error::RankConnectionLost(msg));
                }
                Some(false) => {}
                None => self.check_collective_ready(key),
            }
        }
        self.sync_member_removed(rec.group, conn, &rec.id, reason);
        // World sizes changed for everyone.
        let accepted = self.accepted_conns();
        for c in &accepted {
            let world = self.world_for(self.peers[c].group);
            self.send(*c, MasterMsg::World { world });
        }
        if self.establishing.is_some() {
            let attempts = self.establishing.as_ref().map_or(0, |e| e.attempts);
            // The ring changed under the round: start it again with the survivors.
            self.start_establish(attempts);
        } else {
            self.check_topology_votes();
        }
        self.check_pending_votes();
        self.check_optimize_votes();
        self.maybe_bootstrap();
    }

    // -- collectives --------------------------------------------------------

    fn result(&mut self, conn: ConnId, tag: u64, op_id: u64, outcome: Result<(), Error>) {
        let (ok, code, reason) = match outcome {
            Ok(()) => (true, 0, String::new()),
            Err(e) => (false, e.code() as FailCode, e.message().to_owned()),
        };
        self.send(
            conn,
            MasterMsg::CollectiveResult {
                tag,
                op_id,
                ok,
                code,
                reason,
            },
        );
    }

    fn on_collective_init(
        &mut self,
        conn: ConnId,
        tag: u64,
        spec: CollectiveSpec,
        payload: Vec<u8>,
    ) {
        let group = self.peers[&conn].group;
        let key = (group, tag);
        match self.collectives.get_mut(&key) {
            Some(coll) if coll.voters.contains(&conn) || coll.running.is_some() => {
                let e = Error::InvalidUsage(format!("tag {tag} is already in flight"));
                self.result(conn, tag, 0, Err(e));
            }
            Some(coll) if coll.spec != spec => {
                let e = Error::InvalidUsage(format!(
                    "peers disagree on the collective with tag {tag}: {} (chunk_bytes and \
                     pipeline_chunks must be equal on every peer of a group)",
                    coll.spec.differences(&spec)
                ));
                self.result(conn, tag, 0, Err(e.clone()));
                self.fail_collective(key, e);
            }
            Some(coll) => {
                coll.voters.insert(conn);
                if !payload.is_empty() {
                    coll.payloads.insert(conn, payload);
                }
                self.check_collective_ready(key);
            }
            None => {
                let payloads = if payload.is_empty() {
                    BTreeMap::new()
                } else {
                    BTreeMap::from([(conn, payload)])
                };
                self.collectives.insert(
                    key,
                    Collective {
                        spec,
                        voters: BTreeSet::from([conn]),
                        payloads,
                        running: None,
                    },
                );
                self.check_collective_ready(key);
            }
        }
    }

    fn check_collective_ready(&mut self, key: (u32, u64)) {
        let members = self.group_members(key.0);
        let Some(coll) = self.collectives.get(&key) else {
            return;
        };
        if coll.running.is_none() && coll.voters.is_empty() {
            self.collectives.remove(&key);
            return;
        }
        if coll.running.is_some() || coll.voters != members {
            return;
        }
        let kind = CollectiveKind::from_raw(coll.spec.kind)
            .map(CollectiveKind::name)
            .unwrap_or("collective");
        if members.len() < 2 {
            self.fail_collective(
                key,
                Error::TooFewPeers(format!(
                    "{kind} needs at least 2 peers in group {}, have {}",
                    key.0,
                    members.len()
                )),
            );
            return;
        }
        let relayable = relayable(&coll.spec, &coll.payloads, &members);
        let algorithm = match choose_algorithm(&coll.spec, members.len(), relayable, &self.cfg) {
            Ok(a) => a,
            Err(e) => {
                self.fail_collective(key, e);
                return;
            }
        };
        if coll.spec.kind == CollectiveKind::Broadcast as u8
            && coll.spec.root as usize >= members.len()
        {
            self.fail_collective(
                key,
                Error::InvalidArgument(format!(
                    "broadcast root {} is not a rank of the {} peers of group {}",
                    coll.spec.root,
                    members.len(),
                    key.0
                )),
            );
            return;
        }
        let op_id = self.next_op_id;
        self.next_op_id += 1;
        let ring_conns: Vec<ConnId> = self
            .rings
            .get(&key.0)
            .map(|r| r.iter().filter(|c| members.contains(c)).copied().collect())
            .unwrap_or_default();
        let ring: Vec<PeerId> = ring_conns
            .iter()
            .filter_map(|c| self.peers.get(c).map(|p| p.id))
            .collect();
        // A relayed op is complete once the master hands out every buffer:
        // every peer computes its result from the commence alone.
        let relayed = algorithm == Algorithm::Relay;
        let contributions: Vec<Vec<u8>> = match relayed.then(|| self.collectives.remove(&key)) {
            Some(Some(mut coll)) => ring_conns
                .iter()
                .map(|c| coll.payloads.remove(c).unwrap_or_default())
                .collect(),
            _ => Vec::new(),
        };
        for c in &members {
            self.send(
                *c,
                MasterMsg::CollectiveCommence {
                    tag: key.1,
                    op_id,
                    ring: ring.clone(),
                    algorithm: algorithm as u8,
                    contributions: contributions.clone(),
                },
            );
        }
        if relayed {
            return;
        }
        if let Some(coll) = self.collectives.get_mut(&key) {
            coll.running = Some(Running {
                op_id,
                participants: members,
                done: BTreeSet::new(),
            });
        }
    }

    /// Fails the collective on every remaining voter or participant.
    fn fail_collective(&mut self, key: (u32, u64), e: Error) {
        let Some(coll) = self.collectives.remove(&key) else {
            return;
        };
        let (op_id, targets) = match coll.running {
            Some(run) => (run.op_id, run.participants),
            None => (0, coll.voters),
        };
        for c in targets {
            self.result(c, key.1, op_id, Err(e.clone()));
        }
    }

    fn on_collective_done(&mut self, conn: ConnId, tag: u64, op_id: u64, ok: bool) {
        let group = self.peers[&conn].group;
        let key = (group, tag);
        let Some(run) = self
            .collectives
            .get_mut(&key)
            .and_then(|c| c.running.as_mut())
            .filter(|r| r.op_id == op_id && r.participants.contains(&conn))
        else {
            return; // late report of an op already decided
        };
        if !ok {
            let who = self.peers[&conn].id;
            self.fail_collective(
                key,
                Error::RankConnectionLost(format!("peer {who} lost a ring connection")),
            );
            return;
        }
        run.done.insert(conn);
        if run.done == run.participants {
            let parts: Vec<ConnId> = run.participants.iter().copied().collect();
            self.collectives.remove(&key);
            for c in parts {
                self.result(c, tag, op_id, Ok(()));
            }
        }
    }

    // -- shared state -------------------------------------------------------

    fn sync_result(&mut self, conn: ConnId, sync_id: u64, outcome: Option<(FailCode, String)>) {
        let (ok, code, reason) = match outcome {
            None => (true, 0, String::new()),
            Some((code, reason)) => (false, code, reason),
        };
        self.send(
            conn,
            MasterMsg::SyncResult {
                sync_id,
                ok,
                code,
                reason,
            },
        );
    }

    fn on_sync_vote(&mut self, conn: ConnId, vote: SyncVoteRec) {
        let group = self.peers[&conn].group;
        let round = self.syncs.entry(group).or_default();
        // A peer whose part of a running round already failed (at planning)
        // has its answer: its new vote counts for the next round.
        let in_round = round
            .distributing
            .as_ref()
            .is_some_and(|d| d.members.contains(&conn));
        if in_round || round.votes.contains_key(&conn) {
            let (code, reason) = code(Error::InvalidUsage(
                "a shared-state sync is already in progress for this peer".into(),
            ));
            self.sync_result(conn, 0, Some((code, reason)));
            return;
        }
        round.votes.insert(conn, vote);
        self.check_sync_ready(group);
    }

    fn check_sync_ready(&mut self, group: u32) {
        let members = self.group_members(group);
        let Some(round) = self.syncs.get(&group) else {
            return;
        };
        if round.distributing.is_some()
            || round.votes.is_empty()
            || round.votes.keys().copied().collect::<BTreeSet<_>>() != members
        {
            return;
        }
        let votes = round.votes.clone();
        let sync_id = self.next_sync_id;
        self.next_sync_id += 1;
        let mut failed: BTreeMap<ConnId, (FailCode, String)> = BTreeMap::new();

        // Revision rule: a peer that synced before must advance by exactly one.
        for (c, v) in &votes {
            if let Some(last) = self.peers[c].synced_revision {
                if v.revision != last.wrapping_add(1) {
                    failed.insert(
                        *c,
                        code(Error::InvalidUsage(format!(
                            "shared-state revision must advance by exactly one per sync: \
                             last synced {last}, got {}",
                            v.revision
                        ))),
                    );
                }
            }
        }

        // Election among voters (receive-only peers never vote).
        type Key = (u64, Vec<(String, u8, u64, Option<u64>)>);
        let key_of = |v: &SyncVoteRec| -> Key {
            let mut t: Vec<(String, u8, u64, Option<u64>)> = v
                .tensors
                .iter()
                .map(|t| {
                    let h = (!t.allow_content_inequality).then_some(t.hash);
                    (t.name.clone(), t.datatype, t.count, h)
                })
                .collect();
            t.sort();
            (v.revision, t)
        };
        let mut tally: BTreeMap<Key, (usize, ConnId)> = BTreeMap::new();
        // Newcomers adopt the group's state: while any voter has synced
        // before, only such peers vote (fresh peers cannot outvote history).
        let any_history = votes.keys().any(|c| {
            self.peers
                .get(c)
                .is_some_and(|p| p.synced_revision.is_some())
        });
        for (c, v) in &votes {
            if v.strategy == STRATEGY_RECEIVE_ONLY || failed.contains_key(c) {
                continue;
            }
            if any_history
                && self
                    .peers
                    .get(c)
                    .is_some_and(|p| p.synced_revision.is_none())
            {
                continue;
            }
            let e = tally.entry(key_of(v)).or_insert((0, *c));
            e.0 += 1;
        }
        // Most votes wins; ties go to the higher revision, then to the first key.
        let popular = tally
            .iter()
            .max_by(|a, b| {
                (a.1 .0, a.0 .0)
                    .cmp(&(b.1 .0, b.0 .0))
                    .then_with(|| b.0.cmp(a.0))
            })
            .map(|(k, (_, first))| (k.clone(), *first));

        let Some((popular_key, reference_conn)) = popular else {
            for c in votes.keys() {
                failed.entry(*c).or_insert_with(|| {
                    code(Error::NoSharedStateAvailable(
                        "no peer offers shared state (all are receive-only)".into(),
                    ))
                });
            }
            self.finish_sync_immediately(group, sync_id, failed);
            return;
        };
        let popular_revision = popular_key.0;
        let reference = votes[&reference_conn].clone();
        let holders: Vec<ConnId> = votes
            .iter()
            .filter(|(c, v)| {
                v.strategy != STRATEGY_RECEIVE_ONLY
                    && !failed.contains_key(c)
                    && key_of(v) == popular_key
            })
            .map(|(c, _)| *c)
            .collect();

        let mut plans: BTreeMap<ConnId, Vec<FetchItem>> = BTreeMap::new();
        for (c, v) in &votes {
            if failed.contains_key(c) {
                continue;
            }
            match fetch_list(&reference, v) {
                Err(e) => {
                    failed.insert(*c, code(e));
                }
                Ok(list) if !list.is_empty() && v.strategy == STRATEGY_SEND_ONLY => {
                    failed.insert(
                        *c,
                        code(Error::InvalidUsage(format!(
                            "send-only peer does not hold the popular shared state \
                             ({} tensors differ)",
                            list.len()
                        ))),
                    );
                }
                Ok(list) => {
                    plans.insert(*c, list);
                }
            }
        }

        let mut receivers = BTreeSet::new();
        for (c, list) in &plans {
            let sources: Vec<PeerEntry> = holders
                .iter()
                .filter(|h| *h != c)
                .filter_map(|h| self.entry_for(*c, *h))
                .collect();
            if !list.is_empty() {
                receivers.insert(*c);
            }
            self.send(
                *c,
                MasterMsg::SyncPlan {
                    sync_id,
                    revision: popular_revision,
                    fetch: list.clone(),
                    sources,
                },
            );
        }
        for (c, f) in &failed {
            self.sync_result(*c, sync_id, Some(f.clone()));
        }
        let members: BTreeSet<ConnId> = plans.keys().copied().collect();
        if let Some(round) = self.syncs.get_mut(&group) {
            round.votes.clear();
            round.distributing = Some(Distributing {
                sync_id,
                members,
                receivers,
                failed: BTreeMap::new(),
                revision: popular_revision,
            });
        }
        self.check_sync_complete(group);
    }

    fn finish_sync_immediately(
        &mut self,
        group: u32,
        sync_id: u64,
        failed: BTreeMap<ConnId, (FailCode, String)>,
    ) {
        self.syncs.remove(&group);
        for (c, f) in failed {
            self.sync_result(c, sync_id, Some(f));
        }
    }

    fn on_sync_transfer_done(&mut self, conn: ConnId, sync_id: u64, ok: bool) {
        let group = self.peers[&conn].group;
        let Some(dist) = self
            .syncs
            .get_mut(&group)
            .and_then(|r| r.distributing.as_mut())
            .filter(|d| d.sync_id == sync_id)
        else {
            return;
        };
        if !dist.receivers.remove(&conn) {
            return;
        }
        if !ok {
            dist.failed.insert(
                conn,
                code(Error::RankConnectionLost(
                    "could not fetch the popular shared state from any holder".into(),
                )),
            );
        }
        self.check_sync_complete(group);
    }

    fn check_sync_complete(&mut self, group: u32) {
        let Some(dist) = self.syncs.get(&group).and_then(|r| r.distributing.as_ref()) else {
            return;
        };
        if !dist.receivers.is_empty() {
            return;
        }
        let Some(round) = self.syncs.remove(&group) else {
            return;
        };
        let Some(dist) = round.distributing else {
            return;
        };
        // A receiver that could not get the state fails the sync for every
        // member, like a failed collective: nobody advances, so all of them
        // can retry the same revision together instead of splitting into
        // different collectives.
        let group_failure = dist.failed.values().next().map(|(code, reason)| {
            (
                *code,
                format!("a peer of the group could not fetch the shared state: {reason}"),
            )
        });
        for c in &dist.members {
            let f = dist
                .failed
                .get(c)
                .cloned()
                .or_else(|| group_failure.clone());
            if f.is_none() {
                if let Some(p) = self.peers.get_mut(c) {
                    p.synced_revision = Some(dist.revision);
                }
            }
            self.sync_result(*c, dist.sync_id, f);
        }
        // Votes for the next round that arrived meanwhile.
        if !round.votes.is_empty() {
            self.syncs.insert(
                group,
                SyncRound {
                    votes: round.votes,
                    distributing: None,
                },
            );
            self.check_sync_ready(group);
        }
    }

    fn sync_member_removed(&mut self, group: u32, conn: ConnId, id: &PeerId, reason: &str) {
        let Some(round) = self.syncs.get_mut(&group) else {
            return;
        };
        round.votes.remove(&conn);
        if let Some(dist) = round.distributing.as_mut() {
            dist.members.remove(&conn);
            dist.receivers.remove(&conn);
            dist.failed.remove(&conn);
            tracing::debug!(peer = %id, "left a shared-state sync: {reason}");
            self.check_sync_complete(group);
        } else if round.votes.is_empty() {
            self.syncs.remove(&group);
        } else {
            self.check_sync_ready(group);
        }
    }
}

/// Tensors `mine` must fetch to match `popular`, or why it cannot.
fn fetch_list(popular: &SyncVoteRec, mine: &SyncVoteRec) -> Result<Vec<FetchItem>, Error> {
    let revision_differs = popular.revision != mine.revision;
    let mut out = Vec::new();
    for p in &popular.tensors {
        let Some(m) = mine.tensors.iter().find(|t| t.name == p.name) else {
            return Err(Error::InvalidArgument(format!(
                "shared state lacks tensor '{}' that the popular state has",
                p.name
            )));
        };
        if m.datatype != p.datatype || m.count != p.count {
            return Err(Error::InvalidArgument(format!(
                "tensor '{}' has type {} x {} here but {} x {} in the popular state",
                p.name, m.datatype, m.count, p.datatype, p.count
            )));
        }
        let skip_inequality = p.allow_content_inequality && !revision_differs;
        if m.hash != p.hash && !skip_inequality {
            out.push(FetchItem {
                name: p.name.clone(),
                expected_hash: p.hash,
            });
        }
    }
    if mine.tensors.len() != popular.tensors.len() {
        return Err(Error::InvalidArgument(format!(
            "shared state has {} tensors, the popular state {}",
            mine.tensors.len(),
            popular.tensors.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
