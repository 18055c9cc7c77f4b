//! Tests of the master's state machine with simulated peers: no sockets, no
//! clocks. Unit tests pin the exact messages of each consensus round; the
//! property test at the end drives random interleavings of joins, calls,
//! leaves, deaths and time with peers that follow the protocol, and checks
//! the invariants the micro-consensus promises.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use proptest::prelude::*;

use super::*;
use crate::types::{Algorithm, CollectiveKind};
use crate::wire::{
    CollectiveSpec, FetchItem, MasterMsg, PeerEntry, PeerId, PeerMsg, TensorMeta, WorldInfo,
};

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

const MASTER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);

/// Result codes (see `crate::Error::code`).
const INVALID_ARGUMENT: u8 = 3;
const INVALID_USAGE: u8 = 4;
const TOO_FEW_PEERS: u8 = 5;
const RANK_CONNECTION_LOST: u8 = 8;
const NO_SHARED_STATE: u8 = 9;

const ENFORCE_POPULAR: u8 = 0;
const RECEIVE_ONLY: u8 = 1;
const SEND_ONLY: u8 = 2;

fn pid(conn: ConnId) -> PeerId {
    let mut b = [0u8; 16];
    b[0] = 0xAB;
    b[8..].copy_from_slice(&conn.to_be_bytes());
    PeerId(b)
}

fn peer_ip(conn: ConnId) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 1, conn as u8))
}

fn connected_from(conn: ConnId, remote: IpAddr) -> Event {
    Event::Connected {
        conn,
        id: pid(conn),
        remote: SocketAddr::new(remote, 40_000 + conn as u16),
        local: SocketAddr::new(IpAddr::V4(MASTER_IP), 48148),
    }
}

fn register_msg(conn: ConnId, group: u32) -> PeerMsg {
    PeerMsg::Register {
        group,
        p2p_port: 50_000 + conn as u16,
        ss_port: 51_000 + conn as u16,
        bench_port: 52_000 + conn as u16,
        advertised_ip: None,
    }
}

fn entry(conn: ConnId, group: u32) -> PeerEntry {
    PeerEntry {
        id: pid(conn),
        group,
        ip: peer_ip(conn),
        p2p_port: 50_000 + conn as u16,
        ss_port: 51_000 + conn as u16,
        bench_port: 52_000 + conn as u16,
    }
}

fn world(global_world: u32, group_world: u32, num_groups: u32, largest_group: u32) -> WorldInfo {
    WorldInfo {
        global_world,
        group_world,
        num_groups,
        largest_group,
    }
}

fn spec(count: u64) -> CollectiveSpec {
    CollectiveSpec {
        kind: 0,
        algorithm: 0,
        root: 0,
        count,
        datatype: 10,
        op: 0,
        quant_datatype: 0,
        quant_algorithm: 0,
        chunk_bytes: 512 << 10,
        pipeline_chunks: 16,
    }
}

fn init(tag: u64) -> PeerMsg {
    PeerMsg::CollectiveInit {
        tag,
        spec: spec(1024),
        payload: Vec::new(),
    }
}

fn done(tag: u64, op_id: u64, ok: bool) -> PeerMsg {
    PeerMsg::CollectiveDone { tag, op_id, ok }
}

fn established(round: u64, ok: bool) -> PeerMsg {
    PeerMsg::ConnectionsEstablished { round, ok }
}

fn tm(name: &str, hash: u64, allow_content_inequality: bool) -> TensorMeta {
    TensorMeta {
        name: name.into(),
        datatype: 10,
        count: 4,
        hash,
        allow_content_inequality,
    }
}

/// Shared state of three tensors; "c" may differ in content between peers.
fn tensors(h: [u64; 3]) -> Vec<TensorMeta> {
    vec![
        tm("a", h[0], false),
        tm("b", h[1], false),
        tm("c", h[2], true),
    ]
}

fn vote(revision: u64, h: [u64; 3], strategy: u8) -> PeerMsg {
    PeerMsg::SyncVote {
        revision,
        strategy,
        tensors: tensors(h),
    }
}

fn transfer_done(sync_id: u64, ok: bool) -> PeerMsg {
    PeerMsg::SyncTransferDone {
        sync_id,
        ok,
        failed_source: None,
    }
}

fn fetch(name: &str, expected_hash: u64) -> FetchItem {
    FetchItem {
        name: name.into(),
        expected_hash,
    }
}

/// Messages sent to `conn`, in order.
fn to(acts: &[Action], conn: ConnId) -> Vec<MasterMsg> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Send { conn: c, msg } if *c == conn => Some(msg.clone()),
            _ => None,
        })
        .collect()
}

/// The single message sent to `conn`.
fn only(acts: &[Action], conn: ConnId) -> MasterMsg {
    let msgs = to(acts, conn);
    assert_eq!(
        msgs.len(),
        1,
        "expected one message to {conn}, got {acts:#?}"
    );
    msgs.into_iter().next().unwrap_or_else(|| unreachable!())
}

/// Connections the actions close.
fn closed(acts: &[Action]) -> Vec<ConnId> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Close { conn, .. } => Some(*conn),
            _ => None,
        })
        .collect()
}

/// Connections that receive at least one message.
fn recipients(acts: &[Action]) -> BTreeSet<ConnId> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Send { conn, .. } => Some(*conn),
            _ => None,
        })
        .collect()
}

/// The round of the Establish messages in `acts` (all must agree).
fn establish_round(acts: &[Action]) -> u64 {
    let rounds: BTreeSet<u64> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                msg: MasterMsg::Establish { round, .. },
                ..
            } => Some(*round),
            _ => None,
        })
        .collect();
    assert_eq!(rounds.len(), 1, "expected one establish round in {acts:#?}");
    rounds.into_iter().next().unwrap_or_default()
}

fn establish_targets(acts: &[Action]) -> Vec<ConnId> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Send {
                conn,
                msg: MasterMsg::Establish { .. },
            } => Some(*conn),
            _ => None,
        })
        .collect()
}

/// (tag, op_id, ok, code) of a collective result; failures carry a reason.
fn verdict(msg: &MasterMsg) -> (u64, u64, bool, u8) {
    match msg {
        MasterMsg::CollectiveResult {
            tag,
            op_id,
            ok,
            code,
            reason,
        } => {
            assert_eq!(*ok, reason.is_empty(), "reason iff failure: {msg:?}");
            (*tag, *op_id, *ok, *code)
        }
        other => panic!("expected a collective result, got {other:?}"),
    }
}

/// (sync_id, ok, code) of a sync result.
fn sync_verdict(msg: &MasterMsg) -> (u64, bool, u8) {
    match msg {
        MasterMsg::SyncResult {
            sync_id, ok, code, ..
        } => (*sync_id, *ok, *code),
        other => panic!("expected a sync result, got {other:?}"),
    }
}

/// (tag, op_id, ring) of a commence message.
fn commence(msg: &MasterMsg) -> (u64, u64, Vec<PeerId>) {
    match msg {
        MasterMsg::CollectiveCommence {
            tag, op_id, ring, ..
        } => (*tag, *op_id, ring.clone()),
        other => panic!("expected a commence, got {other:?}"),
    }
}

/// (sync_id, revision, fetch, sources) of a sync plan.
fn plan(msg: &MasterMsg) -> (u64, u64, Vec<FetchItem>, Vec<PeerEntry>) {
    match msg {
        MasterMsg::SyncPlan {
            sync_id,
            revision,
            fetch,
            sources,
        } => (*sync_id, *revision, fetch.clone(), sources.clone()),
        other => panic!("expected a sync plan, got {other:?}"),
    }
}

fn conn_of(id: &PeerId) -> ConnId {
    let mut b = [0u8; 8];
    b.copy_from_slice(&id.0[8..]);
    ConnId::from_be_bytes(b)
}

fn ids(conns: &[ConnId]) -> Vec<PeerId> {
    conns.iter().map(|c| pid(*c)).collect()
}

/// A master driven by hand.
struct M {
    m: MasterState,
}

impl M {
    fn new() -> Self {
        Self::with(MasterConfig::default())
    }

    fn with(cfg: MasterConfig) -> Self {
        M {
            m: MasterState::new(cfg),
        }
    }

    fn ev(&mut self, e: Event) -> Vec<Action> {
        self.m.handle(e)
    }

    fn join(&mut self, conn: ConnId) -> Vec<Action> {
        self.ev(connected_from(conn, peer_ip(conn)))
    }

    fn msg(&mut self, conn: ConnId, msg: PeerMsg) -> Vec<Action> {
        self.ev(Event::Message { conn, msg })
    }

    /// Connects and registers; returns the actions of the registration.
    fn register(&mut self, conn: ConnId, group: u32) -> Vec<Action> {
        assert!(self.join(conn).is_empty());
        self.msg(conn, register_msg(conn, group))
    }

    fn disconnect(&mut self, conn: ConnId) -> Vec<Action> {
        self.ev(Event::Disconnected { conn })
    }

    /// Time passes until `now_ms`, in ticks no further apart than
    /// `max_tick_step_ms` (a punctual driver); returns all their actions.
    fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        let step = self.m.cfg.max_tick_step_ms;
        let mut t = self.m.clock.real_ms();
        let mut out = Vec::new();
        while t + step < now_ms {
            t += step;
            out.extend(self.ev(Event::Tick { now_ms: t }));
        }
        out.extend(self.ev(Event::Tick { now_ms }));
        out
    }

    fn accepted(&self) -> BTreeSet<ConnId> {
        self.m
            .peers
            .iter()
            .filter(|(_, p)| p.phase == Phase::Accepted)
            .map(|(c, _)| *c)
            .collect()
    }

    /// Every conn in `voters` votes update topology, then every recipient of
    /// the establish round reports success. Returns the last report's actions.
    fn update_topology(&mut self, voters: &[ConnId]) -> Vec<Action> {
        let mut acts = Vec::new();
        for &c in voters {
            acts = self.msg(c, PeerMsg::VoteUpdateTopology);
        }
        let round = establish_round(&acts);
        let mut last = Vec::new();
        for c in establish_targets(&acts) {
            last = self.msg(c, established(round, true));
        }
        last
    }

    /// An accepted swarm: conn `i + 1` in group `groups[i]`, ring in conn order.
    fn swarm(groups: &[u32]) -> Self {
        let mut m = M::new();
        let acts = m.register(1, groups[0]);
        let round = establish_round(&acts);
        m.msg(1, established(round, true));
        for (i, &g) in groups.iter().enumerate().skip(1) {
            m.register(i as u64 + 1, g);
        }
        if groups.len() > 1 {
            m.update_topology(&[1]);
        }
        assert_eq!(m.m.accepted_count(), groups.len());
        assert_eq!(m.m.pending_count(), 0);
        m
    }

    /// Runs one all-reduce of `tag` over `conns` to success; returns its op id.
    fn all_reduce_ok(&mut self, tag: u64, conns: &[ConnId]) -> u64 {
        let mut acts = Vec::new();
        for &c in conns {
            acts = self.msg(c, init(tag));
        }
        let (_, op_id, _) = commence(&only(&acts, conns[0]));
        for &c in conns {
            acts = self.msg(c, done(tag, op_id, true));
        }
        for &c in conns {
            assert_eq!(verdict(&only(&acts, c)), (tag, op_id, true, 0));
        }
        op_id
    }
}

// ---------------------------------------------------------------------------
// 1. Registration
// ---------------------------------------------------------------------------

#[test]
fn register_ack_carries_the_id_from_connected() {
    let mut m = M::new();
    let id = PeerId([7; 16]);
    let acts = m.ev(Event::Connected {
        conn: 9,
        id,
        remote: SocketAddr::new(peer_ip(9), 4000),
        local: SocketAddr::new(IpAddr::V4(MASTER_IP), 48148),
    });
    assert!(acts.is_empty());
    assert_eq!(m.m.peer_id(9), None, "no identity before registering");
    let acts = m.msg(9, register_msg(9, 0));
    assert_eq!(
        to(&acts, 9)[0],
        MasterMsg::RegisterAck {
            id,
            heartbeat_interval_ms: MasterConfig::default().heartbeat_interval_ms(),
        }
    );
    assert_eq!(MasterConfig::default().heartbeat_interval_ms(), 1_000);
    assert_eq!(m.m.peer_id(9), Some(id));
}

#[test]
fn message_before_register_is_kicked_and_closed() {
    for msg in [
        PeerMsg::VoteUpdateTopology,
        PeerMsg::Heartbeat,
        init(1),
        PeerMsg::Leave,
    ] {
        let mut m = M::new();
        assert!(m.join(1).is_empty());
        let acts = m.msg(1, msg.clone());
        assert_eq!(acts.len(), 2, "{msg:?}: {acts:#?}");
        match &acts[0] {
            Action::Send {
                conn: 1,
                msg: MasterMsg::Kick { reason },
            } => assert!(reason.contains("before registration"), "{reason}"),
            other => panic!("expected a kick, got {other:?}"),
        }
        assert!(matches!(&acts[1], Action::Close { conn: 1, .. }));
        // The connection is forgotten: later messages do nothing.
        assert!(m.msg(1, register_msg(1, 0)).is_empty());
        assert_eq!(m.m.peers.len(), 0);
    }
}

#[test]
fn double_register_is_a_violation() {
    // Twice while pending.
    let mut m = M::swarm(&[0, 0]);
    m.register(3, 0);
    let acts = m.msg(3, register_msg(3, 0));
    assert!(matches!(
        &acts[0],
        Action::Send { conn: 3, msg: MasterMsg::Kick { reason } } if reason.contains("twice")
    ));
    assert_eq!(closed(&acts), vec![3]);
    assert_eq!(m.m.pending_count(), 0);

    // Twice once accepted: kicked, and the others learn the new world size.
    let acts = m.msg(2, register_msg(2, 0));
    assert!(matches!(
        &acts[0],
        Action::Send {
            conn: 2,
            msg: MasterMsg::Kick { .. }
        }
    ));
    assert_eq!(closed(&acts), vec![2]);
    assert_eq!(
        only(&acts, 1),
        MasterMsg::World {
            world: world(1, 1, 1, 1)
        }
    );
    assert_eq!(m.accepted(), BTreeSet::from([1]));
}

#[test]
fn unknown_connection_events_are_ignored() {
    let mut m = M::swarm(&[0, 0]);
    assert!(m.msg(42, PeerMsg::VoteUpdateTopology).is_empty());
    assert!(m.disconnect(42).is_empty());
}

// ---------------------------------------------------------------------------
// 2. Bootstrap
// ---------------------------------------------------------------------------

#[test]
fn first_peer_is_accepted_at_once() {
    let mut m = M::new();
    let acts = m.register(1, 0);
    assert_eq!(acts.len(), 2, "{acts:#?}");
    assert!(matches!(
        &acts[0],
        Action::Send {
            conn: 1,
            msg: MasterMsg::RegisterAck { .. }
        }
    ));
    assert_eq!(
        acts[1],
        Action::Send {
            conn: 1,
            msg: MasterMsg::Establish {
                round: 1,
                ring: ids(&[1]),
                peers: vec![entry(1, 0)],
            }
        }
    );
    let acts = m.msg(1, established(1, true));
    assert_eq!(
        acts,
        vec![Action::Send {
            conn: 1,
            msg: MasterMsg::TopologyUpdated {
                world: world(1, 1, 1, 1)
            }
        }]
    );
}

#[test]
fn peers_registering_during_the_bootstrap_round_stay_pending() {
    let mut m = M::new();
    m.register(1, 0);
    let acts = m.register(2, 0);
    assert_eq!(acts.len(), 1, "only the ack: {acts:#?}");
    assert_eq!(m.m.pending_count(), 1);
    let acts = m.msg(1, established(1, true));
    assert_eq!(recipients(&acts), BTreeSet::from([1]));
    assert_eq!(m.m.pending_count(), 1, "admission needs a vote");
}

#[test]
fn bootstrap_accepts_every_pending_peer_together() {
    let mut m = M::new();
    m.register(1, 0); // accepted alone, establish round 1 open
    m.register(2, 0);
    m.register(3, 1);
    m.register(4, 0);
    assert_eq!(m.m.pending_count(), 3);
    // The first peer dies before its round completes: nobody is accepted any
    // more, so the three pending peers are accepted together.
    let acts = m.disconnect(1);
    assert!(closed(&acts).is_empty(), "the driver closed it already");
    assert_eq!(m.m.pending_count(), 0);
    assert_eq!(m.accepted(), BTreeSet::from([2, 3, 4]));
    assert_eq!(
        only(&acts, 2),
        MasterMsg::Establish {
            round: 2,
            ring: ids(&[2, 4]),
            peers: vec![entry(2, 0), entry(4, 0)],
        }
    );
    assert_eq!(
        only(&acts, 4),
        MasterMsg::Establish {
            round: 2,
            ring: ids(&[2, 4]),
            peers: vec![entry(2, 0), entry(4, 0)],
        }
    );
    assert_eq!(
        only(&acts, 3),
        MasterMsg::Establish {
            round: 2,
            ring: ids(&[3]),
            peers: vec![entry(3, 1)],
        }
    );
    // A report for the stale round is ignored.
    assert!(m.msg(2, established(1, true)).is_empty());
    assert!(m.msg(3, established(1, true)).is_empty());
    assert!(m.msg(4, established(1, true)).is_empty());
    assert!(m.msg(2, established(2, true)).is_empty());
    assert!(m.msg(3, established(2, true)).is_empty());
    let acts = m.msg(4, established(2, true));
    assert_eq!(acts.len(), 3);
    for (c, w) in [
        (2, world(3, 2, 2, 2)),
        (3, world(3, 1, 2, 2)),
        (4, world(3, 2, 2, 2)),
    ] {
        assert_eq!(only(&acts, c), MasterMsg::TopologyUpdated { world: w });
    }
}

// ---------------------------------------------------------------------------
// 3. Admission
// ---------------------------------------------------------------------------

#[test]
fn admission_waits_for_every_accepted_vote() {
    let mut m = M::swarm(&[0, 0]);
    let acts = m.register(3, 0);
    assert_eq!(acts.len(), 1);
    assert!(matches!(only(&acts, 3), MasterMsg::RegisterAck { .. }));
    assert!(m.msg(1, PeerMsg::VoteUpdateTopology).is_empty());
    assert_eq!(m.m.pending_count(), 1);
    let acts = m.msg(2, PeerMsg::VoteUpdateTopology);
    let round = establish_round(&acts);
    for c in [1, 2, 3] {
        assert_eq!(
            only(&acts, c),
            MasterMsg::Establish {
                round,
                ring: ids(&[1, 2, 3]),
                peers: vec![entry(1, 0), entry(2, 0), entry(3, 0)],
            }
        );
    }
    assert!(m.msg(1, established(round, true)).is_empty());
    assert!(m.msg(3, established(round, true)).is_empty());
    let acts = m.msg(2, established(round, true));
    assert_eq!(acts.len(), 3);
    for c in [1, 2, 3] {
        assert_eq!(
            only(&acts, c),
            MasterMsg::TopologyUpdated {
                world: world(3, 3, 1, 3)
            }
        );
    }
    // Votes are reset: a new round needs everyone again.
    assert!(m.msg(1, PeerMsg::VoteUpdateTopology).is_empty());
    assert!(m.msg(2, PeerMsg::VoteUpdateTopology).is_empty());
    let acts = m.msg(3, PeerMsg::VoteUpdateTopology);
    assert_eq!(establish_targets(&acts), vec![1, 2, 3]);
}

#[test]
fn admission_without_pending_peers_still_runs_a_round() {
    let mut m = M::swarm(&[0, 1]);
    let acts = m.update_topology(&[1, 2]);
    assert_eq!(
        only(&acts, 1),
        MasterMsg::TopologyUpdated {
            world: world(2, 1, 2, 1)
        }
    );
    assert_eq!(
        only(&acts, 2),
        MasterMsg::TopologyUpdated {
            world: world(2, 1, 2, 1)
        }
    );
}

#[test]
fn failed_establish_is_retried_then_topology_fails() {
    let mut m = M::swarm(&[0, 0]);
    m.register(3, 0);
    m.msg(1, PeerMsg::VoteUpdateTopology);
    let mut acts = m.msg(2, PeerMsg::VoteUpdateTopology);
    let attempts = MasterConfig::default().max_establish_attempts;
    assert_eq!(attempts, 3);
    let mut rounds = Vec::new();
    for attempt in 0..attempts {
        let round = establish_round(&acts);
        rounds.push(round);
        assert_eq!(establish_targets(&acts), vec![1, 2, 3]);
        assert!(m.msg(1, established(round, true)).is_empty());
        assert!(m.msg(2, established(round, false)).is_empty());
        acts = m.msg(3, established(round, true));
        if attempt + 1 < attempts {
            // A stale report of the previous round changes nothing.
            let next = establish_round(&acts);
            assert!(m.msg(2, established(round, true)).is_empty());
            assert_ne!(next, round);
        }
    }
    assert_eq!(rounds.len(), 3);
    assert_eq!(acts.len(), 3, "{acts:#?}");
    for c in [1, 2, 3] {
        assert!(matches!(only(&acts, c), MasterMsg::TopologyFailed { .. }));
    }
    // Votes were reset: one vote is not enough for a new round.
    assert!(m.msg(1, PeerMsg::VoteUpdateTopology).is_empty());
    assert!(m.msg(2, PeerMsg::VoteUpdateTopology).is_empty());
    let acts = m.msg(3, PeerMsg::VoteUpdateTopology);
    assert_eq!(establish_targets(&acts), vec![1, 2, 3]);
}

#[test]
fn establish_succeeds_on_a_retry() {
    let mut m = M::swarm(&[0, 0]);
    m.register(3, 0);
    m.msg(1, PeerMsg::VoteUpdateTopology);
    let acts = m.msg(2, PeerMsg::VoteUpdateTopology);
    let r1 = establish_round(&acts);
    m.msg(1, established(r1, false));
    m.msg(2, established(r1, true));
    let acts = m.msg(3, established(r1, true));
    let r2 = establish_round(&acts);
    m.msg(1, established(r2, true));
    m.msg(2, established(r2, true));
    let acts = m.msg(3, established(r2, true));
    for c in [1, 2, 3] {
        assert_eq!(
            only(&acts, c),
            MasterMsg::TopologyUpdated {
                world: world(3, 3, 1, 3)
            }
        );
    }
}

#[test]
fn death_during_establish_restarts_the_round_with_the_survivors() {
    let mut m = M::swarm(&[0, 0]);
    m.register(3, 0);
    m.msg(1, PeerMsg::VoteUpdateTopology);
    let acts = m.msg(2, PeerMsg::VoteUpdateTopology);
    let r1 = establish_round(&acts);
    m.msg(1, established(r1, true));
    m.msg(3, established(r1, true));
    let acts = m.disconnect(2);
    let r2 = establish_round(&acts);
    assert_ne!(r1, r2);
    for c in [1, 3] {
        let msgs = to(&acts, c);
        assert_eq!(
            msgs,
            vec![
                MasterMsg::World {
                    world: world(2, 2, 1, 2)
                },
                MasterMsg::Establish {
                    round: r2,
                    ring: ids(&[1, 3]),
                    peers: vec![entry(1, 0), entry(3, 0)],
                }
            ]
        );
    }
    assert!(m.msg(1, established(r1, true)).is_empty(), "stale round");
    assert!(m.msg(1, established(r2, true)).is_empty());
    let acts = m.msg(3, established(r2, true));
    assert_eq!(recipients(&acts), BTreeSet::from([1, 3]));
}

#[test]
fn a_voter_dying_lets_the_remaining_votes_admit() {
    let mut m = M::swarm(&[0, 0]);
    m.register(3, 0);
    assert!(m.msg(1, PeerMsg::VoteUpdateTopology).is_empty());
    let acts = m.disconnect(2);
    assert_eq!(establish_targets(&acts), vec![1, 3]);
}

#[test]
fn pending_peer_calls_are_violations() {
    for msg in [
        PeerMsg::VoteUpdateTopology,
        PeerMsg::VoteArePeersPending,
        init(0),
        vote(1, [1, 2, 3], ENFORCE_POPULAR),
        established(1, true),
    ] {
        let mut m = M::swarm(&[0]);
        m.register(2, 0);
        let acts = m.msg(2, msg.clone());
        assert!(
            matches!(
                &acts[0],
                Action::Send {
                    conn: 2,
                    msg: MasterMsg::Kick { .. }
                }
            ),
            "{msg:?}: {acts:#?}"
        );
        assert_eq!(closed(&acts), vec![2]);
        assert_eq!(m.m.pending_count(), 0);
    }
}

#[test]
fn addresses_never_hand_out_loopback_to_remote_peers() {
    let mut m = M::new();
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let adv = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
    m.ev(connected_from(1, lo));
    let r = establish_round(&m.msg(1, register_msg(1, 0)));
    m.msg(1, established(r, true));
    m.ev(connected_from(2, peer_ip(2)));
    m.msg(2, register_msg(2, 0));
    m.ev(connected_from(3, lo));
    m.msg(
        3,
        PeerMsg::Register {
            group: 0,
            p2p_port: 1,
            ss_port: 2,
            bench_port: 3,
            advertised_ip: Some(adv),
        },
    );
    let acts = m.msg(1, PeerMsg::VoteUpdateTopology);
    let ips = |c: ConnId| -> Vec<IpAddr> {
        match only(&acts, c) {
            MasterMsg::Establish { peers, .. } => peers.iter().map(|p| p.ip).collect(),
            other => panic!("{other:?}"),
        }
    };
    // The remote peer sees the local one at the master's address.
    assert_eq!(ips(2), vec![IpAddr::V4(MASTER_IP), peer_ip(2), adv]);
    // A loopback peer may dial another loopback peer on loopback.
    assert_eq!(ips(1), vec![lo, peer_ip(2), adv]);
    assert_eq!(ips(3), vec![lo, peer_ip(2), adv]);
}

// ---------------------------------------------------------------------------
// 4. Are peers pending / optimize topology
// ---------------------------------------------------------------------------

#[test]
fn are_peers_pending_answers_everyone_alike() {
    let mut m = M::swarm(&[0, 0, 1]);
    assert!(m.msg(1, PeerMsg::VoteArePeersPending).is_empty());
    assert!(m.msg(3, PeerMsg::VoteArePeersPending).is_empty());
    let acts = m.msg(2, PeerMsg::VoteArePeersPending);
    assert_eq!(acts.len(), 3);
    for c in [1, 2, 3] {
        assert_eq!(only(&acts, c), MasterMsg::PendingAnswer { pending: false });
    }
    // Someone registers: the next answer is true, again for everyone.
    m.register(4, 1);
    assert!(m.msg(1, PeerMsg::VoteArePeersPending).is_empty());
    assert!(m.msg(2, PeerMsg::VoteArePeersPending).is_empty());
    let acts = m.msg(3, PeerMsg::VoteArePeersPending);
    assert_eq!(acts.len(), 3);
    for c in [1, 2, 3] {
        assert_eq!(only(&acts, c), MasterMsg::PendingAnswer { pending: true });
    }
    assert!(to(&acts, 4).is_empty(), "pending peers do not vote");
}

#[test]
fn are_peers_pending_completes_when_a_non_voter_dies() {
    let mut m = M::swarm(&[0, 0, 0]);
    m.msg(1, PeerMsg::VoteArePeersPending);
    m.msg(2, PeerMsg::VoteArePeersPending);
    let acts = m.disconnect(3);
    for c in [1, 2] {
        assert_eq!(
            to(&acts, c),
            vec![
                MasterMsg::World {
                    world: world(2, 2, 1, 2)
                },
                MasterMsg::PendingAnswer { pending: false }
            ]
        );
    }
}

#[test]
fn optimize_topology_is_a_vote_of_all() {
    let mut m = M::swarm(&[0, 1]);
    assert!(m.msg(1, PeerMsg::VoteOptimizeTopology).is_empty());
    let acts = m.msg(2, PeerMsg::VoteOptimizeTopology);
    for c in [1, 2] {
        assert_eq!(only(&acts, c), MasterMsg::OptimizeDone { ok: true });
    }
}

// ---------------------------------------------------------------------------
// 5. Collectives
// ---------------------------------------------------------------------------

#[test]
fn commence_waits_for_every_group_member() {
    let mut m = M::swarm(&[0, 0, 0]);
    assert!(m.msg(1, init(5)).is_empty());
    assert!(m.msg(3, init(5)).is_empty());
    let acts = m.msg(2, init(5));
    assert_eq!(acts.len(), 3);
    for c in [1, 2, 3] {
        assert_eq!(
            only(&acts, c),
            MasterMsg::CollectiveCommence {
                tag: 5,
                op_id: 1,
                ring: ids(&[1, 2, 3]),
                algorithm: Algorithm::Direct as u8,
                contributions: Vec::new(),
            }
        );
    }
}

#[test]
fn all_done_succeeds_for_everyone_only_after_the_last_report() {
    let mut m = M::swarm(&[0, 0, 0]);
    for c in [1, 2, 3] {
        m.msg(c, init(0));
    }
    assert!(m.msg(1, done(0, 1, true)).is_empty());
    assert!(m.msg(3, done(0, 1, true)).is_empty());
    let acts = m.msg(2, done(0, 1, true));
    assert_eq!(acts.len(), 3);
    for c in [1, 2, 3] {
        assert_eq!(
            only(&acts, c),
            MasterMsg::CollectiveResult {
                tag: 0,
                op_id: 1,
                ok: true,
                code: 0,
                reason: String::new(),
            }
        );
    }
    // The tag is free again; op ids are never reused.
    assert_eq!(m.all_reduce_ok(0, &[1, 2, 3]), 2);
}

#[test]
fn groups_are_isolated() {
    let mut m = M::swarm(&[0, 1, 0, 1]);
    assert!(m.msg(1, init(5)).is_empty());
    assert!(m.msg(2, init(5)).is_empty());
    let acts = m.msg(4, init(5));
    assert_eq!(recipients(&acts), BTreeSet::from([2, 4]));
    for c in [2, 4] {
        assert_eq!(commence(&only(&acts, c)), (5, 1, ids(&[2, 4])));
    }
    let acts = m.msg(3, init(5));
    assert_eq!(recipients(&acts), BTreeSet::from([1, 3]));
    for c in [1, 3] {
        assert_eq!(commence(&only(&acts, c)), (5, 2, ids(&[1, 3])));
    }
    // A failure in group 1 does not touch group 0's op with the same tag.
    let acts = m.msg(2, done(5, 1, false));
    assert_eq!(recipients(&acts), BTreeSet::from([2, 4]));
    m.msg(1, done(5, 2, true));
    let acts = m.msg(3, done(5, 2, true));
    for c in [1, 3] {
        assert_eq!(verdict(&only(&acts, c)), (5, 2, true, 0));
    }
}

#[test]
fn several_tags_in_flight_at_once() {
    let mut m = M::swarm(&[0, 0]);
    m.msg(1, init(1));
    m.msg(1, init(2));
    let a2 = m.msg(2, init(2));
    let a1 = m.msg(2, init(1));
    let (_, op2, _) = commence(&only(&a2, 1));
    let (_, op1, _) = commence(&only(&a1, 1));
    assert_ne!(op1, op2);
    // Reports for one tag do not complete the other.
    m.msg(1, done(1, op1, true));
    let acts = m.msg(2, done(1, op1, true));
    assert_eq!(verdict(&only(&acts, 2)), (1, op1, true, 0));
    // Are-peers-pending may overlap an async all-reduce.
    m.msg(1, PeerMsg::VoteArePeersPending);
    let acts = m.msg(2, PeerMsg::VoteArePeersPending);
    assert_eq!(recipients(&acts), BTreeSet::from([1, 2]));
    m.msg(2, done(2, op2, true));
    let acts = m.msg(1, done(2, op2, true));
    assert_eq!(verdict(&only(&acts, 1)), (2, op2, true, 0));
}

#[test]
fn spec_mismatch_fails_every_voter_with_invalid_usage() {
    let mut m = M::swarm(&[0, 0, 0]);
    assert!(m.msg(1, init(3)).is_empty());
    let acts = m.msg(
        2,
        PeerMsg::CollectiveInit {
            tag: 3,
            spec: spec(99),
            payload: Vec::new(),
        },
    );
    assert_eq!(recipients(&acts), BTreeSet::from([1, 2]));
    assert_eq!(verdict(&only(&acts, 1)), (3, 0, false, INVALID_USAGE));
    assert_eq!(verdict(&only(&acts, 2)), (3, 0, false, INVALID_USAGE));
    // The tag is free again.
    assert_eq!(m.all_reduce_ok(3, &[1, 2, 3]), 1);
}

#[test]
fn duplicate_tag_is_invalid_usage() {
    let mut m = M::swarm(&[0, 0]);
    m.msg(1, init(7));
    let acts = m.msg(1, init(7));
    assert_eq!(acts.len(), 1);
    assert_eq!(verdict(&only(&acts, 1)), (7, 0, false, INVALID_USAGE));
    // The first init still counts.
    let acts = m.msg(2, init(7));
    let (_, op_id, ring) = commence(&only(&acts, 1));
    assert_eq!(ring, ids(&[1, 2]));
    // The same tag again while it runs.
    let acts = m.msg(2, init(7));
    assert_eq!(verdict(&only(&acts, 2)), (7, 0, false, INVALID_USAGE));
    m.msg(1, done(7, op_id, true));
    let acts = m.msg(2, done(7, op_id, true));
    assert_eq!(verdict(&only(&acts, 1)), (7, op_id, true, 0));
}

#[test]
fn single_member_group_is_too_few_peers() {
    let mut m = M::swarm(&[0, 1, 0]);
    let acts = m.msg(2, init(1));
    assert_eq!(acts.len(), 1);
    assert_eq!(verdict(&only(&acts, 2)), (1, 0, false, TOO_FEW_PEERS));
    // Nothing is left behind: the same call fails the same way again.
    let acts = m.msg(2, init(1));
    assert_eq!(verdict(&only(&acts, 2)), (1, 0, false, TOO_FEW_PEERS));
}

#[test]
fn one_failed_report_fails_every_participant() {
    let mut m = M::swarm(&[0, 0, 0]);
    for c in [1, 2, 3] {
        m.msg(c, init(0));
    }
    assert!(m.msg(1, done(0, 1, true)).is_empty());
    let acts = m.msg(2, done(0, 1, false));
    assert_eq!(acts.len(), 3);
    for c in [1, 2, 3] {
        assert_eq!(
            verdict(&only(&acts, c)),
            (0, 1, false, RANK_CONNECTION_LOST)
        );
    }
    // Late reports of the decided op are ignored.
    assert!(m.msg(3, done(0, 1, true)).is_empty());
    assert!(m.msg(3, done(0, 1, false)).is_empty());
}

#[test]
fn reports_for_unknown_ops_are_ignored() {
    let mut m = M::swarm(&[0, 0]);
    assert!(m.msg(1, done(0, 1, true)).is_empty());
    m.msg(1, init(0));
    assert!(m.msg(1, done(0, 1, false)).is_empty(), "not commenced yet");
    let acts = m.msg(2, init(0));
    let (_, op_id, _) = commence(&only(&acts, 1));
    assert!(m.msg(1, done(0, op_id + 7, false)).is_empty());
    assert!(m.msg(1, done(9, op_id, false)).is_empty());
}

#[test]
fn participant_death_fails_the_survivors_at_once() {
    let mut m = M::swarm(&[0, 0, 0, 1]);
    for c in [1, 2, 3] {
        m.msg(c, init(4));
    }
    m.msg(1, done(4, 1, true));
    let acts = m.disconnect(2);
    assert!(closed(&acts).is_empty());
    for c in [1, 3] {
        let msgs = to(&acts, c);
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert_eq!(verdict(&msgs[0]), (4, 1, false, RANK_CONNECTION_LOST));
        assert_eq!(
            msgs[1],
            MasterMsg::World {
                world: world(3, 2, 2, 2)
            }
        );
    }
    assert_eq!(
        to(&acts, 4),
        vec![MasterMsg::World {
            world: world(3, 1, 2, 2)
        }]
    );
    // A retry among the survivors succeeds.
    assert_eq!(m.all_reduce_ok(4, &[1, 3]), 2);
}

#[test]
fn death_during_gathering_commences_with_the_survivors() {
    let mut m = M::swarm(&[0, 0, 0]);
    m.msg(1, init(2));
    m.msg(3, init(2));
    let acts = m.disconnect(2);
    for c in [1, 3] {
        let msgs = to(&acts, c);
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert_eq!(commence(&msgs[0]), (2, 1, ids(&[1, 3])));
        assert!(matches!(msgs[1], MasterMsg::World { .. }));
    }
    m.msg(1, done(2, 1, true));
    let acts = m.msg(3, done(2, 1, true));
    assert_eq!(verdict(&only(&acts, 1)), (2, 1, true, 0));
}

#[test]
fn death_during_gathering_leaving_one_peer_is_too_few_peers() {
    let mut m = M::swarm(&[0, 0]);
    m.msg(1, init(2));
    let acts = m.disconnect(2);
    let msgs = to(&acts, 1);
    assert_eq!(verdict(&msgs[0]), (2, 0, false, TOO_FEW_PEERS));
}

#[test]
fn death_of_the_only_voter_drops_the_gathering() {
    let mut m = M::swarm(&[0, 0, 0]);
    m.msg(1, init(2));
    m.disconnect(1);
    assert!(m.m.collectives.is_empty());
    m.msg(2, init(2));
    let acts = m.msg(3, init(2));
    assert_eq!(commence(&only(&acts, 2)).2, ids(&[2, 3]));
}

// ---------------------------------------------------------------------------
// 6. Liveness
// ---------------------------------------------------------------------------

#[test]
fn silent_peer_is_evicted_and_its_ops_fail() {
    let mut m = M::swarm(&[0, 0, 0]);
    for c in [1, 2, 3] {
        m.msg(c, init(0));
    }
    assert!(m.tick(4_000).is_empty());
    m.msg(1, PeerMsg::Heartbeat);
    m.msg(2, done(0, 1, true)); // any message counts as a sign of life
    assert!(
        m.tick(5_000).is_empty(),
        "exactly the timeout is still alive"
    );
    let acts = m.tick(5_001);
    assert!(matches!(&acts[0], Action::Close { conn: 3, reason } if reason.contains("evicted")));
    for c in [1, 2] {
        let msgs = to(&acts, c);
        assert_eq!(verdict(&msgs[0]), (0, 1, false, RANK_CONNECTION_LOST));
        assert_eq!(
            msgs[1],
            MasterMsg::World {
                world: world(2, 2, 1, 2)
            }
        );
    }
    assert_eq!(m.accepted(), BTreeSet::from([1, 2]));
    // Heartbeats keep the others alive for as long as they come.
    for t in (6_000..30_000).step_by(1_000) {
        m.msg(1, PeerMsg::Heartbeat);
        m.msg(2, PeerMsg::Heartbeat);
        assert!(m.tick(t).is_empty());
    }
    assert_eq!(m.accepted(), BTreeSet::from([1, 2]));
}

#[test]
fn unregistered_and_pending_connections_time_out_too() {
    let mut m = M::swarm(&[0]);
    m.register(2, 0); // pending
    assert!(m.join(3).is_empty()); // never registers
    let acts = m.tick(6_000);
    assert_eq!(closed(&acts), vec![1, 2, 3]);
    assert!(m.m.peers.is_empty());
    // Time never runs backwards.
    let mut m = M::swarm(&[0]);
    m.tick(4_000);
    m.msg(1, PeerMsg::Heartbeat);
    assert!(m.tick(1_000).is_empty());
    assert!(m.tick(9_000).is_empty());
    assert_eq!(closed(&m.tick(9_001)), vec![1]);
}

/// A stall of the master itself (its tick comes seconds late) never evicts
/// peers: only `max_tick_step_ms` of a late tick's gap counts.
#[test]
fn a_stalled_master_does_not_evict_its_peers() {
    let mut m = M::swarm(&[0, 0, 0]);
    m.tick(1_000);
    for c in [1, 2, 3] {
        m.msg(c, PeerMsg::Heartbeat);
    }
    // The master's process was starved for 8 s (timeout 5 s): its next tick
    // comes at 9 s, after the heartbeats that queued up meanwhile.
    for c in [1, 2, 3] {
        m.m.observe_time(9_000);
        m.msg(c, PeerMsg::Heartbeat);
    }
    assert!(m.ev(Event::Tick { now_ms: 9_000 }).is_empty());
    // Even with the queued heartbeats handled after the late tick.
    let mut m2 = M::swarm(&[0, 0]);
    m2.tick(1_000);
    m2.msg(1, PeerMsg::Heartbeat);
    m2.msg(2, PeerMsg::Heartbeat);
    assert!(m2.ev(Event::Tick { now_ms: 20_000 }).is_empty());
    assert_eq!(m2.accepted(), BTreeSet::from([1, 2]));
    let l = m2.m.liveness();
    assert_eq!(l.late_ticks, 1);
    assert_eq!(l.max_tick_late_ms, 19_000 - 100);
    assert!(l.evictions.is_empty());
    // A peer that really is silent is still evicted, on punctual ticks,
    // once the timeout has passed on the judged clock.
    m2.msg(1, PeerMsg::Heartbeat);
    assert!(
        m2.tick(24_900).is_empty(),
        "judged silence of 2 is exactly the timeout"
    );
    m2.msg(1, PeerMsg::Heartbeat);
    let acts = m2.tick(25_000);
    assert_eq!(closed(&acts), vec![2]);
    let ev = &m2.m.liveness().evictions;
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].peer, pid(2));
    assert_eq!((ev[0].silent_ms, ev[0].at_ms), (5_100, 25_000));
}

/// A peer whose ring neighbour reports data bytes from it is alive even
/// when its own heartbeats do not come; zero bytes, bytes from a peer of
/// another group, or a report from a pending peer do not count.
#[test]
fn data_plane_progress_is_a_sign_of_life() {
    let mut m = M::swarm(&[0, 0, 0]);
    let progress = |c: ConnId, n: u64| PeerMsg::DataProgress {
        from: vec![(pid(c), n)],
    };
    for t in (1_000..=12_000).step_by(1_000) {
        m.msg(1, progress(3, 1 << 20));
        m.msg(2, progress(1, 0)); // 2 is alive itself; reports no bytes
        assert!(m.tick(t).is_empty(), "at {t} ms");
    }
    assert_eq!(m.m.liveness().progress_credits, 12);
    assert_eq!(m.accepted(), BTreeSet::from([1, 2, 3]));
    // The bytes stop (3 froze): 3 is evicted after the timeout.
    for t in (13_000..=16_000).step_by(1_000) {
        m.msg(1, PeerMsg::Heartbeat);
        m.msg(2, PeerMsg::Heartbeat);
        assert!(m.tick(t).is_empty(), "at {t} ms");
    }
    m.msg(1, PeerMsg::Heartbeat);
    m.msg(2, PeerMsg::Heartbeat);
    assert_eq!(closed(&m.tick(16_100)), vec![3]);

    // Another group's bytes, or a pending peer's report, vouch for nobody.
    let mut m = M::swarm(&[0, 1]);
    m.register(3, 1); // pending
    for t in (1_000..=5_000).step_by(1_000) {
        m.msg(1, progress(2, 100));
        m.msg(3, progress(2, 100));
        m.msg(3, PeerMsg::Heartbeat);
        assert!(m.tick(t).is_empty());
    }
    m.msg(1, PeerMsg::Heartbeat);
    m.msg(3, PeerMsg::Heartbeat);
    assert_eq!(closed(&m.tick(5_100)), vec![2]);
    assert_eq!(m.m.liveness().progress_credits, 0);
}

/// The master records the gaps between each peer's heartbeats (real time,
/// refined by `observe_time` between ticks).
#[test]
fn heartbeat_gaps_are_recorded_per_peer() {
    let mut m = M::swarm(&[0, 0]);
    for (t, c) in [(1_000, 1), (1_010, 2), (2_000, 1), (2_250, 2), (3_050, 1)] {
        m.m.observe_time(t);
        m.msg(c, PeerMsg::Heartbeat);
    }
    m.msg(2, PeerMsg::VoteArePeersPending); // not a heartbeat
    let l = m.m.liveness();
    assert_eq!(l.gap_count(), 3);
    assert_eq!(
        l.heartbeat_gaps,
        std::collections::BTreeMap::from([(1_000, 1), (1_050, 1), (1_240, 1)])
    );
    assert_eq!(l.max_gap_ms(), 1_240);
}

// ---------------------------------------------------------------------------
// 7. Graceful leave
// ---------------------------------------------------------------------------

#[test]
fn leave_before_an_op_starts_is_not_an_error_for_the_others() {
    let mut m = M::swarm(&[0, 0, 0, 1]);
    m.msg(1, init(6));
    m.msg(2, init(6));
    let acts = m.msg(3, PeerMsg::Leave);
    assert!(matches!(&acts[0], Action::Close { conn: 3, reason } if reason.contains("left")));
    assert!(to(&acts, 3).is_empty());
    for c in [1, 2] {
        let msgs = to(&acts, c);
        assert_eq!(
            msgs,
            vec![
                MasterMsg::CollectiveCommence {
                    tag: 6,
                    op_id: 1,
                    ring: ids(&[1, 2]),
                    algorithm: Algorithm::Direct as u8,
                    contributions: Vec::new(),
                },
                MasterMsg::World {
                    world: world(3, 2, 2, 2)
                }
            ]
        );
    }
    assert_eq!(
        to(&acts, 4),
        vec![MasterMsg::World {
            world: world(3, 1, 2, 2)
        }]
    );
}

#[test]
fn leave_of_a_non_voter_lets_later_calls_proceed() {
    let mut m = M::swarm(&[0, 0, 0]);
    m.msg(1, init(6));
    let acts = m.msg(3, PeerMsg::Leave);
    assert_eq!(closed(&acts), vec![3]);
    assert!(to(&acts, 1)
        .iter()
        .all(|m| matches!(m, MasterMsg::World { .. })));
    let acts = m.msg(2, init(6));
    assert_eq!(commence(&only(&acts, 1)).2, ids(&[1, 2]));
}

#[test]
fn leave_of_a_running_participant_fails_the_op() {
    let mut m = M::swarm(&[0, 0]);
    m.msg(1, init(6));
    m.msg(2, init(6));
    let acts = m.msg(2, PeerMsg::Leave);
    assert_eq!(
        verdict(&to(&acts, 1)[0]),
        (6, 1, false, RANK_CONNECTION_LOST)
    );
}

#[test]
fn leave_of_a_pending_peer_tells_nobody() {
    let mut m = M::swarm(&[0, 0]);
    m.register(3, 0);
    let acts = m.msg(3, PeerMsg::Leave);
    assert_eq!(acts.len(), 1);
    assert_eq!(closed(&acts), vec![3]);
    m.msg(1, PeerMsg::VoteArePeersPending);
    let acts = m.msg(2, PeerMsg::VoteArePeersPending);
    assert_eq!(only(&acts, 1), MasterMsg::PendingAnswer { pending: false });
}

// ---------------------------------------------------------------------------
// 8. Shared-state sync
// ---------------------------------------------------------------------------

const H: [u64; 3] = [11, 22, 33];

/// Runs a sync where everyone holds the same content at `revision`.
fn sync_all_equal(m: &mut M, conns: &[ConnId], revision: u64) -> u64 {
    let mut acts = Vec::new();
    for &c in conns {
        acts = m.msg(c, vote(revision, H, ENFORCE_POPULAR));
    }
    let mut sync_id = 0;
    for &c in conns {
        let msgs = to(&acts, c);
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        let (id, rev, fetch, _) = plan(&msgs[0]);
        assert_eq!((rev, fetch), (revision, vec![]));
        assert_eq!(sync_verdict(&msgs[1]), (id, true, 0));
        sync_id = id;
    }
    sync_id
}

#[test]
fn up_to_date_peers_get_empty_plans_and_succeed_at_once() {
    let mut m = M::swarm(&[0, 0, 0]);
    assert!(m.msg(1, vote(1, H, ENFORCE_POPULAR)).is_empty());
    assert!(m.msg(2, vote(1, H, ENFORCE_POPULAR)).is_empty());
    let acts = m.msg(3, vote(1, H, ENFORCE_POPULAR));
    for c in [1u64, 2, 3] {
        let others: Vec<PeerEntry> = [1u64, 2, 3]
            .into_iter()
            .filter(|o| *o != c)
            .map(|o| entry(o, 0))
            .collect();
        assert_eq!(
            to(&acts, c),
            vec![
                MasterMsg::SyncPlan {
                    sync_id: 1,
                    revision: 1,
                    fetch: vec![],
                    sources: others,
                },
                MasterMsg::SyncResult {
                    sync_id: 1,
                    ok: true,
                    code: 0,
                    reason: String::new(),
                }
            ]
        );
    }
    assert_eq!(sync_all_equal(&mut m, &[1, 2, 3], 2), 2);
}

#[test]
fn popular_content_wins_and_the_outlier_fetches_exactly_the_differing_tensor() {
    let mut m = M::swarm(&[0, 0, 0]);
    m.msg(1, vote(1, H, ENFORCE_POPULAR));
    m.msg(2, vote(1, [11, 99, 33], ENFORCE_POPULAR));
    let acts = m.msg(3, vote(1, H, ENFORCE_POPULAR));
    assert_eq!(
        to(&acts, 2),
        vec![MasterMsg::SyncPlan {
            sync_id: 1,
            revision: 1,
            fetch: vec![fetch("b", 22)],
            sources: vec![entry(1, 0), entry(3, 0)],
        }]
    );
    assert_eq!(plan(&only(&acts, 1)).3, vec![entry(3, 0)]);
    assert_eq!(plan(&only(&acts, 3)).3, vec![entry(1, 0)]);
    assert!(plan(&only(&acts, 1)).2.is_empty());
    // Nobody succeeds before the receiver reports.
    assert!(
        m.msg(1, transfer_done(1, true)).is_empty(),
        "not a receiver"
    );
    assert!(m.msg(2, transfer_done(7, true)).is_empty(), "wrong sync id");
    let acts = m.msg(2, transfer_done(1, true));
    assert_eq!(acts.len(), 3);
    for c in [1, 2, 3] {
        assert_eq!(sync_verdict(&only(&acts, c)), (1, true, 0));
    }
    // Everyone synced at revision 1 and must now vote 2.
    sync_all_equal(&mut m, &[1, 2, 3], 2);
}

#[test]
fn a_failed_transfer_fails_the_sync_for_the_whole_group() {
    let mut m = M::swarm(&[0, 0, 0]);
    m.msg(1, vote(1, H, ENFORCE_POPULAR));
    m.msg(2, vote(1, [0, 0, 33], ENFORCE_POPULAR));
    let acts = m.msg(3, vote(1, H, ENFORCE_POPULAR));
    assert_eq!(
        plan(&only(&acts, 2)).2,
        vec![fetch("a", 11), fetch("b", 22)]
    );
    let acts = m.msg(2, transfer_done(1, false));
    for c in [1u64, 2, 3] {
        assert_eq!(
            sync_verdict(&only(&acts, c)),
            (1, false, RANK_CONNECTION_LOST)
        );
    }
    // Nobody advanced: everyone retries revision 1 together.
    m.msg(1, vote(1, H, ENFORCE_POPULAR));
    m.msg(2, vote(1, [0, 0, 33], ENFORCE_POPULAR));
    let acts = m.msg(3, vote(1, H, ENFORCE_POPULAR));
    assert_eq!(
        plan(&only(&acts, 2)).2,
        vec![fetch("a", 11), fetch("b", 22)]
    );
    let acts = m.msg(2, transfer_done(2, true));
    for c in [1u64, 2, 3] {
        assert_eq!(sync_verdict(&only(&acts, c)), (2, true, 0));
    }
    // Now everyone synced at 1 and must vote 2; all are up to date.
    m.msg(1, vote(2, H, ENFORCE_POPULAR));
    m.msg(2, vote(2, H, ENFORCE_POPULAR));
    let acts = m.msg(3, vote(2, H, ENFORCE_POPULAR));
    for c in [1u64, 2, 3] {
        let msgs = to(&acts, c);
        assert_eq!(plan(&msgs[0]).2, vec![]);
        assert!(sync_verdict(&msgs[1]).1);
    }
}

#[test]
fn receive_only_peers_never_vote() {
    let mut m = M::swarm(&[0, 0, 0]);
    let other = [1, 2, 3];
    m.msg(1, vote(1, H, ENFORCE_POPULAR));
    m.msg(2, vote(1, other, RECEIVE_ONLY));
    let acts = m.msg(3, vote(1, other, RECEIVE_ONLY));
    for c in [2, 3] {
        let (_, rev, fetch_list, sources) = plan(&only(&acts, c));
        assert_eq!(rev, 1);
        assert_eq!(fetch_list, vec![fetch("a", 11), fetch("b", 22)]);
        assert_eq!(sources, vec![entry(1, 0)], "receive-only peers never send");
    }
    let (_, _, fetch_list, sources) = plan(&only(&acts, 1));
    assert!(fetch_list.is_empty());
    assert!(sources.is_empty());
    m.msg(2, transfer_done(1, true));
    let acts = m.msg(3, transfer_done(1, true));
    assert_eq!(recipients(&acts), BTreeSet::from([1, 2, 3]));
}

#[test]
fn receive_only_peer_already_up_to_date_succeeds() {
    let mut m = M::swarm(&[0, 0]);
    m.msg(1, vote(1, H, ENFORCE_POPULAR));
    let acts = m.msg(2, vote(1, H, RECEIVE_ONLY));
    assert_eq!(sync_verdict(&to(&acts, 2)[1]), (1, true, 0));
}

#[test]
fn send_only_with_unpopular_content_fails_with_invalid_usage() {
    let mut m = M::swarm(&[0, 0, 0]);
    m.msg(1, vote(1, H, ENFORCE_POPULAR));
    m.msg(2, vote(1, [5, 22, 33], SEND_ONLY));
    let acts = m.msg(3, vote(1, H, ENFORCE_POPULAR));
    assert_eq!(sync_verdict(&only(&acts, 2)), (1, false, INVALID_USAGE));
    for c in [1, 3] {
        let msgs = to(&acts, c);
        assert_eq!(plan(&msgs[0]).2, vec![]);
        assert_eq!(sync_verdict(&msgs[1]), (1, true, 0));
    }
}

#[test]
fn send_only_with_popular_content_succeeds_and_serves() {
    let mut m = M::swarm(&[0, 0]);
    m.msg(1, vote(1, H, SEND_ONLY));
    let acts = m.msg(2, vote(1, [0, 22, 33], RECEIVE_ONLY));
    let (_, _, f, sources) = plan(&only(&acts, 2));
    assert_eq!((f, sources), (vec![fetch("a", 11)], vec![entry(1, 0)]));
    let acts = m.msg(2, transfer_done(1, true));
    assert_eq!(sync_verdict(&only(&acts, 1)), (1, true, 0));
}

#[test]
fn revision_must_advance_by_exactly_one() {
    for bad in [0u64, 1, 3, 100] {
        let mut m = M::swarm(&[0, 0, 0]);
        sync_all_equal(&mut m, &[1, 2, 3], 1);
        m.msg(1, vote(2, H, ENFORCE_POPULAR));
        m.msg(2, vote(2, H, ENFORCE_POPULAR));
        let acts = m.msg(3, vote(bad, H, ENFORCE_POPULAR));
        let (_, ok, code) = sync_verdict(&only(&acts, 3));
        assert_eq!((ok, code), (false, INVALID_USAGE), "revision {bad}");
        for c in [1, 2] {
            let msgs = to(&acts, c);
            assert_eq!(plan(&msgs[0]).1, 2);
            assert!(sync_verdict(&msgs[1]).1);
        }
        // Peer 3 last synced at 1, so it must vote 2 even though the others
        // are at 2 now; it then catches up to the popular revision 3.
        m.msg(1, vote(3, H, ENFORCE_POPULAR));
        m.msg(2, vote(3, H, ENFORCE_POPULAR));
        let acts = m.msg(3, vote(2, H, ENFORCE_POPULAR));
        let msgs = to(&acts, 3);
        let (_, rev, f, _) = plan(&msgs[0]);
        assert_eq!((rev, f), (3, vec![]));
        assert!(sync_verdict(&msgs[1]).1);
        sync_all_equal(&mut m, &[1, 2, 3], 4);
    }
}

/// A peer whose part failed at planning time has its answer while the
/// others still fetch. Its next sync call is a vote for the next round, not
/// a second vote in a round it already left ("already in progress").
#[test]
fn a_peer_failed_at_planning_may_vote_for_the_next_round_at_once() {
    let mut m = M::swarm(&[0, 0, 0, 0]);
    m.msg(1, vote(1, H, ENFORCE_POPULAR));
    m.msg(2, vote(1, [5, 22, 33], SEND_ONLY));
    m.msg(3, vote(1, [0, 22, 33], ENFORCE_POPULAR));
    let acts = m.msg(4, vote(1, H, ENFORCE_POPULAR));
    assert_eq!(sync_verdict(&only(&acts, 2)), (1, false, INVALID_USAGE));
    assert_eq!(plan(&only(&acts, 3)).2, vec![fetch("a", 11)]);
    // Peer 2 retries while peer 3 still fetches: no answer yet.
    assert!(m.msg(2, vote(1, [5, 22, 33], ENFORCE_POPULAR)).is_empty());
    // A member of the running round still cannot vote twice.
    let acts = m.msg(1, vote(2, H, ENFORCE_POPULAR));
    assert_eq!(sync_verdict(&only(&acts, 1)), (0, false, INVALID_USAGE));
    // The round ends for 1, 3 and 4 only.
    let acts = m.msg(3, transfer_done(1, true));
    assert_eq!(recipients(&acts), BTreeSet::from([1, 3, 4]));
    // The next round counts peer 2's early vote.
    m.msg(1, vote(2, H, ENFORCE_POPULAR));
    m.msg(3, vote(2, H, ENFORCE_POPULAR));
    let acts = m.msg(4, vote(2, H, ENFORCE_POPULAR));
    let (sync_id, rev, f, _) = plan(&only(&acts, 2));
    assert_eq!((sync_id, rev, f), (2, 2, vec![fetch("a", 11)]));
    let acts = m.msg(2, transfer_done(2, true));
    for c in [1, 2, 3, 4] {
        assert_eq!(sync_verdict(&only(&acts, c)), (2, true, 0));
    }
    assert!(m.m.syncs.is_empty());
}

/// When everyone else of the running round dies, the early voter's round
/// starts at once instead of waiting for votes that will never come.
#[test]
fn an_early_sync_vote_starts_its_round_when_the_others_die() {
    let mut m = M::swarm(&[0, 0, 0, 0]);
    m.msg(1, vote(1, H, ENFORCE_POPULAR));
    m.msg(2, vote(1, [5, 22, 33], SEND_ONLY));
    m.msg(3, vote(1, [0, 22, 33], ENFORCE_POPULAR));
    m.msg(4, vote(1, H, ENFORCE_POPULAR));
    assert!(m.msg(2, vote(1, [5, 22, 33], ENFORCE_POPULAR)).is_empty());
    m.disconnect(1);
    m.disconnect(4);
    let acts = m.disconnect(3);
    let msgs = to(&acts, 2);
    assert_eq!(msgs.len(), 3, "{msgs:?}");
    let (_, rev, f, sources) = plan(&msgs[0]);
    assert_eq!((rev, f, sources), (1, vec![], vec![]));
    assert_eq!(sync_verdict(&msgs[1]), (2, true, 0));
    assert_eq!(
        msgs[2],
        MasterMsg::World {
            world: world(1, 1, 1, 1)
        }
    );
    assert!(m.m.syncs.is_empty());
}

/// An early vote whose peer dies is forgotten with it.
#[test]
fn an_early_sync_vote_dies_with_its_peer() {
    let mut m = M::swarm(&[0, 0, 0, 0]);
    m.msg(1, vote(1, H, ENFORCE_POPULAR));
    m.msg(2, vote(1, [5, 22, 33], SEND_ONLY));
    m.msg(3, vote(1, [0, 22, 33], ENFORCE_POPULAR));
    m.msg(4, vote(1, H, ENFORCE_POPULAR));
    m.msg(2, vote(1, H, ENFORCE_POPULAR));
    m.disconnect(2);
    let acts = m.msg(3, transfer_done(1, true));
    assert_eq!(recipients(&acts), BTreeSet::from([1, 3, 4]));
    assert!(m.m.syncs.is_empty(), "{:?}", m.m.syncs);
    sync_all_equal(&mut m, &[1, 3, 4], 2);
}

#[test]
fn a_newcomer_adopts_the_group_revision() {
    let mut m = M::swarm(&[0, 0]);
    sync_all_equal(&mut m, &[1, 2], 5);
    m.register(3, 0);
    let acts = m.update_topology(&[1, 2]);
    assert_eq!(recipients(&acts), BTreeSet::from([1, 2, 3]));
    m.msg(1, vote(6, H, ENFORCE_POPULAR));
    m.msg(2, vote(6, H, ENFORCE_POPULAR));
    let acts = m.msg(3, vote(0, [1, 2, 3], ENFORCE_POPULAR));
    let (sync_id, rev, f, sources) = plan(&only(&acts, 3));
    assert_eq!(rev, 6);
    // The revision differs, so even the content-unequal tensor is fetched.
    assert_eq!(f, vec![fetch("a", 11), fetch("b", 22), fetch("c", 33)]);
    assert_eq!(sources, vec![entry(1, 0), entry(2, 0)]);
    let acts = m.msg(3, transfer_done(sync_id, true));
    assert_eq!(sync_verdict(&only(&acts, 3)), (sync_id, true, 0));
    // It synced at 6 now: the revision rule applies to it too.
    sync_all_equal(&mut m, &[1, 2, 3], 7);
}

#[test]
fn newcomers_cannot_outvote_the_synced_group() {
    // One peer has history; two fresh newcomers hold identical, different content.
    let mut m = M::swarm(&[0]);
    sync_all_equal(&mut m, &[1], 5);
    m.register(2, 0);
    m.register(3, 0);
    m.update_topology(&[1]);
    assert_eq!(m.m.accepted_count(), 3);
    m.msg(1, vote(6, H, ENFORCE_POPULAR));
    m.msg(2, vote(0, [7, 8, 9], ENFORCE_POPULAR));
    let acts = m.msg(3, vote(0, [7, 8, 9], ENFORCE_POPULAR));
    // The synced peer's content wins: it fetches nothing, the newcomers adopt it.
    assert_eq!(plan(&to(&acts, 1)[0]).2, vec![]);
    for c in [2u64, 3] {
        let (_, rev, f, sources) = plan(&to(&acts, c)[0]);
        assert_eq!(rev, 6);
        assert_eq!(f, vec![fetch("a", 11), fetch("b", 22), fetch("c", 33)]);
        assert_eq!(sources, vec![entry(1, 0)]);
    }
}

#[test]
fn content_inequality_is_allowed_only_at_the_same_revision() {
    let mut m = M::swarm(&[0, 0, 0]);
    m.msg(1, vote(1, H, ENFORCE_POPULAR));
    m.msg(2, vote(1, H, ENFORCE_POPULAR));
    let acts = m.msg(3, vote(1, [11, 22, 77], ENFORCE_POPULAR));
    let msgs = to(&acts, 3);
    assert_eq!(plan(&msgs[0]).2, vec![], "c may differ");
    assert!(sync_verdict(&msgs[1]).1);
    // c does not split the election either: with three different c's, the
    // strict tensors decide.
    m.msg(1, vote(2, [11, 22, 1], ENFORCE_POPULAR));
    m.msg(2, vote(2, [11, 22, 2], ENFORCE_POPULAR));
    let acts = m.msg(3, vote(2, [11, 5, 3], ENFORCE_POPULAR));
    assert_eq!(plan(&to(&acts, 3)[0]).2, vec![fetch("b", 22)]);
}

#[test]
fn mismatched_tensor_sets_are_invalid_arguments() {
    let mut m = M::swarm(&[0, 0, 0]);
    m.msg(1, vote(1, H, ENFORCE_POPULAR));
    m.msg(2, vote(1, H, ENFORCE_POPULAR));
    let acts = m.msg(
        3,
        PeerMsg::SyncVote {
            revision: 1,
            strategy: ENFORCE_POPULAR,
            tensors: vec![tm("a", 11, false)],
        },
    );
    assert_eq!(sync_verdict(&only(&acts, 3)), (1, false, INVALID_ARGUMENT));
}

#[test]
fn all_receive_only_is_no_shared_state_available() {
    let mut m = M::swarm(&[0, 0]);
    m.msg(1, vote(1, H, RECEIVE_ONLY));
    let acts = m.msg(2, vote(1, H, RECEIVE_ONLY));
    assert_eq!(acts.len(), 2);
    for c in [1, 2] {
        let (_, ok, code) = sync_verdict(&only(&acts, c));
        assert_eq!((ok, code), (false, NO_SHARED_STATE));
    }
    assert!(m.m.syncs.is_empty());
    // A later sync works.
    sync_all_equal(&mut m, &[1, 2], 1);
}

#[test]
fn receiver_death_does_not_hang_the_round() {
    let mut m = M::swarm(&[0, 0, 0]);
    m.msg(1, vote(1, H, ENFORCE_POPULAR));
    m.msg(2, vote(1, H, ENFORCE_POPULAR));
    m.msg(3, vote(1, [0, 22, 33], ENFORCE_POPULAR));
    let acts = m.disconnect(3);
    for c in [1, 2] {
        let msgs = to(&acts, c);
        assert_eq!(sync_verdict(&msgs[0]), (1, true, 0));
        assert!(matches!(msgs[1], MasterMsg::World { .. }));
    }
}

#[test]
fn distributor_death_does_not_hang_the_round() {
    let mut m = M::swarm(&[0, 0, 0]);
    m.msg(1, vote(1, H, ENFORCE_POPULAR));
    m.msg(2, vote(1, H, ENFORCE_POPULAR));
    m.msg(3, vote(1, [0, 22, 33], ENFORCE_POPULAR));
    // A holder dies: the receiver fetches from the other one.
    let acts = m.disconnect(1);
    assert!(acts.iter().all(|a| matches!(
        a,
        Action::Send {
            msg: MasterMsg::World { .. },
            ..
        }
    )));
    let acts = m.msg(3, transfer_done(1, true));
    assert_eq!(recipients(&acts), BTreeSet::from([2, 3]));
    assert!(sync_verdict(&only(&acts, 3)).1);

    // The only holder dies: the receiver reports failure, nobody hangs.
    let mut m = M::swarm(&[0, 0, 0]);
    m.msg(1, vote(1, H, ENFORCE_POPULAR));
    m.msg(2, vote(1, [0, 22, 33], RECEIVE_ONLY));
    m.msg(3, vote(1, [0, 0, 33], RECEIVE_ONLY));
    m.disconnect(1);
    assert!(m.msg(2, transfer_done(1, false)).is_empty());
    let acts = m.msg(3, transfer_done(1, false));
    for c in [2, 3] {
        let (_, ok, code) = sync_verdict(&only(&acts, c));
        assert_eq!((ok, code), (false, RANK_CONNECTION_LOST));
    }
    assert!(m.m.syncs.is_empty());
}

#[test]
fn death_during_sync_voting_lets_the_others_proceed() {
    let mut m = M::swarm(&[0, 0, 0]);
    m.msg(1, vote(1, H, ENFORCE_POPULAR));
    m.msg(2, vote(1, H, ENFORCE_POPULAR));
    let acts = m.disconnect(3);
    for c in [1, 2] {
        let msgs = to(&acts, c);
        assert!(matches!(msgs[0], MasterMsg::SyncPlan { .. }));
        assert!(sync_verdict(&msgs[1]).1);
    }
    // The only voter dying drops the round.
    let mut m = M::swarm(&[0, 0, 0]);
    m.msg(1, vote(1, H, ENFORCE_POPULAR));
    m.disconnect(1);
    assert!(m.m.syncs.is_empty());
}

#[test]
fn sync_is_per_group_and_rejects_a_second_vote() {
    let mut m = M::swarm(&[0, 1, 0, 1]);
    m.msg(2, vote(1, H, ENFORCE_POPULAR));
    let acts = m.msg(2, vote(1, H, ENFORCE_POPULAR));
    assert_eq!(sync_verdict(&only(&acts, 2)), (0, false, INVALID_USAGE));
    let acts = m.msg(4, vote(9, [1, 1, 1], ENFORCE_POPULAR));
    assert_eq!(recipients(&acts), BTreeSet::from([2, 4]));
    sync_all_equal(&mut m, &[1, 3], 1);
}

// ---------------------------------------------------------------------------
// 9. Random interleavings with simulated peers
// ---------------------------------------------------------------------------

/// One collective call of the program every accepted peer runs, in order.
/// Newcomers join the program right after the update topology that admitted
/// them, so correct peers always make the same calls.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    UpdateTopology,
    ArePeersPending,
    OptimizeTopology,
    /// Async all-reduces with these tags in flight at once, optionally
    /// overlapped with an are-peers-pending vote.
    AllReduce {
        tags: Vec<u64>,
        with_pending: bool,
    },
    Sync,
}

/// One random event; the selectors pick among the peers it applies to.
#[derive(Debug, Clone)]
enum Op {
    /// A new peer connects (its registration is queued behind it).
    Join(u8),
    /// One step of progress, chosen among everything that can happen now:
    /// the master reads a peer's message, a peer reads the master's, a peer
    /// finishes local work (ring connections, an all-reduce, a fetch) and
    /// reports it, or an idle peer makes its next call. (choice, roll): the
    /// roll decides outcomes (a failed report) and a call's details.
    Act(u16, u8),
    /// An idle peer leaves gracefully.
    Leave(u8),
    /// A peer's connection breaks (its unsent messages are delivered
    /// first or lost, by the selector's parity).
    Crash(u8),
    /// A peer hangs: it stops reading, working and heartbeating.
    Freeze(u8),
    /// Time passes; live peers heartbeat first.
    Tick(u16),
}

/// One enabled step of progress (indices into the simulated peers).
#[derive(Debug, Clone, Copy)]
enum Micro {
    ToMaster(usize),
    ToPeer(usize),
    Progress(usize, u8),
    Start(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SimPhase {
    /// Register sent, no ack yet.
    Registering,
    /// Acked, waiting to be accepted (inside `connect`).
    Connecting,
    Established,
    /// Leave sent; ignores everything until closed.
    Leaving,
    Dead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagState {
    WaitCommence,
    Running(u64),
}

#[derive(Debug, Clone)]
enum SyncState {
    WaitPlan {
        send_only: bool,
    },
    WaitResult {
        sync_id: u64,
        revision: u64,
        fetch: Vec<FetchItem>,
    },
}

/// What a peer waits for inside its current call.
#[derive(Debug, Default)]
struct Call {
    topology: bool,
    pending: bool,
    optimize: bool,
    tags: BTreeMap<u64, TagState>,
    sync: Option<SyncState>,
}

impl Call {
    fn finished(&self) -> bool {
        !self.topology
            && !self.pending
            && !self.optimize
            && self.tags.is_empty()
            && self.sync.is_none()
    }
}

/// Local work a peer does between messages.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Work {
    Establish { round: u64, alone: bool },
    Done { tag: u64, op_id: u64 },
    Transfer { sync_id: u64 },
}

#[derive(Debug)]
struct SimPeer {
    conn: ConnId,
    group: u32,
    phase: SimPhase,
    frozen: bool,
    acked: bool,
    /// Index of the next (or current) program step.
    pc: u64,
    /// Where the program starts for this peer, fixed when it is admitted.
    start_pc: Option<u64>,
    call: Option<Call>,
    outbox: VecDeque<PeerMsg>,
    inbox: VecDeque<MasterMsg>,
    work: Vec<Work>,
    /// Revision of the last successful sync.
    synced: Option<u64>,
    hashes: [u64; 3],
}

impl SimPeer {
    fn alive(&self) -> bool {
        self.phase != SimPhase::Dead
    }

    fn idle(&self) -> bool {
        self.phase == SimPhase::Established
            && !self.frozen
            && self.call.is_none()
            && self.work.is_empty()
    }
}

#[derive(Debug)]
struct OpInfo {
    group: u32,
    tag: u64,
    participants: BTreeSet<ConnId>,
    verdict: Option<(bool, u8)>,
    told: BTreeSet<ConnId>,
}

/// How much of the protocol a run exercised.
#[derive(Debug, Default, Clone)]
struct Stats {
    admitted: u64,
    topology_failed: u64,
    pending_true: u64,
    commenced: u64,
    succeeded: u64,
    failed_ops: u64,
    too_few: u64,
    syncs_ok: u64,
    syncs_failed: u64,
    send_only_failed: u64,
    fetches: u64,
    evicted: u64,
    left: u64,
    crashed: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.admitted += o.admitted;
        self.topology_failed += o.topology_failed;
        self.pending_true += o.pending_true;
        self.commenced += o.commenced;
        self.succeeded += o.succeeded;
        self.failed_ops += o.failed_ops;
        self.too_few += o.too_few;
        self.syncs_ok += o.syncs_ok;
        self.syncs_failed += o.syncs_failed;
        self.send_only_failed += o.send_only_failed;
        self.fetches += o.fetches;
        self.evicted += o.evicted;
        self.left += o.left;
        self.crashed += o.crashed;
    }
}

const SIM_TIMEOUT_MS: u64 = 5_000;
const MAX_PEERS: usize = 6;
/// A quiet choice for the drain: every report succeeds, nobody diverges.
const CALM: u8 = 3;

struct Sim {
    m: MasterState,
    program: Vec<Step>,
    groups: u32,
    now: u64,
    next_conn: ConnId,
    peers: Vec<SimPeer>,
    /// Connections the master may still talk to.
    open: BTreeSet<ConnId>,
    /// Op running per (group, tag), from commence to verdict.
    running: BTreeMap<(u32, u64), u64>,
    ops: BTreeMap<u64, OpInfo>,
    /// (revision, strict hashes) every successful member of a sync ends with.
    sync_content: BTreeMap<u64, (u64, [u64; 2])>,
    stats: Stats,
}

impl Sim {
    fn new(program: Vec<Step>, groups: u32) -> Self {
        Sim {
            m: MasterState::new(MasterConfig {
                peer_timeout_ms: SIM_TIMEOUT_MS,
                max_establish_attempts: 3,
                ..MasterConfig::default()
            }),
            program,
            groups,
            now: 0,
            next_conn: 1,
            peers: Vec::new(),
            open: BTreeSet::new(),
            running: BTreeMap::new(),
            ops: BTreeMap::new(),
            sync_content: BTreeMap::new(),
            stats: Stats::default(),
        }
    }

    fn idx(&self, conn: ConnId) -> usize {
        self.peers
            .iter()
            .position(|p| p.conn == conn)
            .unwrap_or_else(|| panic!("unknown conn {conn}"))
    }

    fn pick(&self, sel: u8, f: impl Fn(&SimPeer) -> bool) -> Option<usize> {
        let c: Vec<usize> = (0..self.peers.len())
            .filter(|i| f(&self.peers[*i]))
            .collect();
        (!c.is_empty()).then(|| c[sel as usize % c.len()])
    }

    fn step_at(&self, pc: u64) -> Step {
        self.program[(pc % self.program.len() as u64) as usize].clone()
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Join(sel) => {
                if self.peers.iter().filter(|p| p.alive()).count() >= MAX_PEERS {
                    return;
                }
                let conn = self.next_conn;
                self.next_conn += 1;
                let group = sel as u32 % self.groups;
                self.peers.push(SimPeer {
                    conn,
                    group,
                    phase: SimPhase::Registering,
                    frozen: false,
                    acked: false,
                    pc: 0,
                    start_pc: None,
                    call: None,
                    outbox: VecDeque::from([register_msg(conn, group)]),
                    inbox: VecDeque::new(),
                    work: Vec::new(),
                    synced: None,
                    // Newcomers often start from the same initial content.
                    hashes: [(sel / 2 % 2) as u64, 0, conn],
                });
                self.handle(connected_from(conn, peer_ip(conn)));
            }
            Op::Act(choice, roll) => {
                let enabled = self.enabled();
                if !enabled.is_empty() {
                    match enabled[choice as usize % enabled.len()] {
                        Micro::ToMaster(i) => self.deliver_to_master(i),
                        Micro::ToPeer(i) => self.deliver_to_peer(i),
                        Micro::Progress(i, w) => self.progress(i, w, roll),
                        Micro::Start(i) => self.start(i, roll),
                    }
                }
            }
            Op::Leave(sel) => {
                if let Some(i) = self.pick(sel, SimPeer::idle) {
                    let p = &mut self.peers[i];
                    p.outbox.push_back(PeerMsg::Leave);
                    p.phase = SimPhase::Leaving;
                    self.stats.left += 1;
                }
            }
            Op::Crash(sel) => {
                if let Some(i) = self.pick(sel, SimPeer::alive) {
                    // What it wrote before dying may or may not arrive.
                    if sel % 2 == 0 {
                        while !self.peers[i].outbox.is_empty() && self.peers[i].alive() {
                            self.deliver_to_master(i);
                        }
                    }
                    if self.peers[i].alive() {
                        self.crash(i);
                    }
                }
            }
            Op::Freeze(sel) => {
                let frozen = self.peers.iter().filter(|p| p.alive() && p.frozen).count();
                // Rarer than the other faults: a hung peer stalls everyone
                // until it is evicted.
                if frozen < 2 && sel % 3 == 0 {
                    if let Some(i) = self.pick(sel, |p| p.alive() && !p.frozen) {
                        self.peers[i].frozen = true;
                    }
                }
            }
            Op::Tick(delta) => self.tick(delta as u64),
        }
    }

    /// Everything that can happen next without a fault or a clock.
    fn enabled(&self) -> Vec<Micro> {
        let mut out = Vec::new();
        for (i, p) in self.peers.iter().enumerate() {
            if !p.alive() {
                continue;
            }
            if !p.outbox.is_empty() {
                out.push(Micro::ToMaster(i));
            }
            if p.frozen {
                continue;
            }
            if !p.inbox.is_empty() {
                out.push(Micro::ToPeer(i));
            }
            out.extend((0..p.work.len()).map(|w| Micro::Progress(i, w as u8)));
            if p.idle() {
                out.push(Micro::Start(i));
            }
        }
        out
    }

    /// Time passes in steps of at most a heartbeat interval; live peers
    /// heartbeat at every step, hung ones do not.
    fn tick(&mut self, delta: u64) {
        let mut left = delta;
        loop {
            let beating: Vec<ConnId> = self
                .peers
                .iter()
                .filter(|p| p.alive() && p.acked && !p.frozen)
                .map(|p| p.conn)
                .collect();
            for conn in beating {
                self.handle(Event::Message {
                    conn,
                    msg: PeerMsg::Heartbeat,
                });
            }
            let step = left.min(1_000);
            left -= step;
            // A punctual driver: ticks no further apart than the master counts.
            let end = self.now + step;
            while self.now < end {
                self.now = (self.now + MasterConfig::default().max_tick_step_ms).min(end);
                self.handle(Event::Tick { now_ms: self.now });
            }
            if left == 0 {
                break;
            }
        }
    }

    fn crash(&mut self, i: usize) {
        let p = &mut self.peers[i];
        p.phase = SimPhase::Dead;
        p.call = None;
        p.work.clear();
        p.inbox.clear();
        p.outbox.clear();
        let conn = p.conn;
        self.stats.crashed += 1;
        self.handle(Event::Disconnected { conn });
    }

    fn deliver_to_master(&mut self, i: usize) {
        let conn = self.peers[i].conn;
        if let Some(msg) = self.peers[i].outbox.pop_front() {
            self.handle(Event::Message { conn, msg });
        }
    }

    fn handle(&mut self, ev: Event) {
        match &ev {
            Event::Connected { conn, .. } => {
                self.open.insert(*conn);
            }
            Event::Disconnected { conn } => {
                self.open.remove(conn);
            }
            _ => {}
        }
        let acts = self.m.handle(ev);
        self.check(&acts);
        for a in acts {
            match a {
                Action::Send { conn, msg } => {
                    let i = self.idx(conn);
                    self.peers[i].inbox.push_back(msg);
                }
                Action::Close { conn, reason } => {
                    let i = self.idx(conn);
                    let p = &mut self.peers[i];
                    p.phase = SimPhase::Dead;
                    p.call = None;
                    p.work.clear();
                    p.inbox.clear();
                    p.outbox.clear();
                    if reason.contains("evicted") {
                        self.stats.evicted += 1;
                    }
                }
            }
        }
    }

    fn accepted_of(&self, group: Option<u32>) -> BTreeSet<ConnId> {
        self.m
            .peers
            .iter()
            .filter(|(_, p)| p.phase == Phase::Accepted && group.is_none_or(|g| p.group == g))
            .map(|(c, _)| *c)
            .collect()
    }

    fn expected_world(&self, group: u32) -> WorldInfo {
        let mut sizes: BTreeMap<u32, u32> = BTreeMap::new();
        for (_, p) in self
            .m
            .peers
            .iter()
            .filter(|(_, p)| p.phase == Phase::Accepted)
        {
            *sizes.entry(p.group).or_default() += 1;
        }
        world(
            sizes.values().sum(),
            sizes.get(&group).copied().unwrap_or(0),
            sizes.len() as u32,
            sizes.values().copied().max().unwrap_or(0),
        )
    }

    /// Invariants over one batch of actions, checked right after `handle`.
    fn check(&mut self, acts: &[Action]) {
        let closed_now: BTreeSet<ConnId> = closed(acts).into_iter().collect();
        let mut answers: BTreeMap<ConnId, bool> = BTreeMap::new();
        let mut updated: Vec<ConnId> = Vec::new();
        let mut decided: Vec<u64> = Vec::new();
        for a in acts {
            match a {
                Action::Close { conn, .. } => {
                    assert!(self.open.remove(conn), "close of unknown conn {conn}");
                }
                Action::Send { conn, msg } => {
                    assert!(
                        self.open.contains(conn),
                        "message to an unknown or closed conn {conn}: {msg:?}"
                    );
                    let group = self.peers[self.idx(*conn)].group;
                    match msg {
                        MasterMsg::Kick { reason } => {
                            panic!("a correct peer {conn} was kicked: {reason}")
                        }
                        MasterMsg::CollectiveCommence {
                            tag, op_id, ring, ..
                        } => self.check_commence(*conn, group, *tag, *op_id, ring, &closed_now),
                        MasterMsg::CollectiveResult {
                            tag,
                            op_id,
                            ok,
                            code,
                            reason,
                        } => {
                            assert_eq!(*ok, reason.is_empty());
                            assert_eq!(*ok, *code == 0);
                            if *op_id == 0 {
                                assert!(!ok, "success without an op id");
                                assert_eq!(*code, TOO_FEW_PEERS, "{reason}");
                                self.stats.too_few += 1;
                            } else if self.check_result(*conn, group, *tag, *op_id, (*ok, *code)) {
                                decided.push(*op_id);
                            }
                        }
                        MasterMsg::PendingAnswer { pending } => {
                            assert!(answers.insert(*conn, *pending).is_none());
                        }
                        MasterMsg::TopologyUpdated { world } => {
                            updated.push(*conn);
                            assert_eq!(*world, self.expected_world(group));
                        }
                        _ => {}
                    }
                }
            }
        }
        for op_id in decided {
            // Every surviving participant learns the verdict in the same batch.
            let info = &self.ops[&op_id];
            for c in &info.participants {
                if self.m.peers.contains_key(c) {
                    assert!(
                        info.told.contains(c),
                        "participant {c} of op {op_id} not told"
                    );
                }
            }
        }
        if !answers.is_empty() {
            let values: BTreeSet<bool> = answers.values().copied().collect();
            assert_eq!(
                values.len(),
                1,
                "different are-peers-pending answers: {answers:?}"
            );
            // Every accepted peer gets the answer (peers closed later in the
            // batch were still there; peers accepted later by a bootstrap in
            // the same batch were not).
            let established: BTreeSet<ConnId> = self
                .accepted_of(None)
                .into_iter()
                .filter(|c| self.peers[self.idx(*c)].phase == SimPhase::Established)
                .collect();
            assert_eq!(
                answers
                    .keys()
                    .copied()
                    .filter(|c| !closed_now.contains(c))
                    .collect::<BTreeSet<_>>(),
                established,
                "are-peers-pending answers every accepted peer"
            );
            if closed_now.is_empty() {
                assert_eq!(values.contains(&true), self.m.pending_count() > 0);
            }
        }
        if !updated.is_empty() {
            self.assign_start(&updated);
        }
    }

    /// A commence lists the group's accepted peers in ring order. Peers
    /// evicted later in the same batch (several stale at one tick) were
    /// still members when it was sent.
    fn check_commence(
        &mut self,
        conn: ConnId,
        group: u32,
        tag: u64,
        op_id: u64,
        ring: &[PeerId],
        closed_now: &BTreeSet<ConnId>,
    ) {
        let ring_conns: Vec<ConnId> = ring.iter().map(conn_of).collect();
        let survivors: Vec<ConnId> = self.m.rings.get(&group).cloned().unwrap_or_default();
        let accepted = self.accepted_of(Some(group));
        assert_eq!(
            survivors.iter().copied().collect::<BTreeSet<_>>(),
            accepted,
            "the ring holds exactly the group's accepted peers"
        );
        assert_eq!(survivors.len(), accepted.len(), "no duplicates in the ring");
        assert_eq!(
            ring_conns
                .iter()
                .copied()
                .filter(|c| !closed_now.contains(c))
                .collect::<Vec<_>>(),
            survivors,
            "commence ring is the group's ring, in order"
        );
        let members: BTreeSet<ConnId> = ring_conns.iter().copied().collect();
        assert_eq!(members.len(), ring_conns.len(), "no duplicates in the ring");
        for c in members.difference(&accepted) {
            assert!(
                closed_now.contains(c),
                "commence ring lists {c}, not a member"
            );
            assert_eq!(self.peers[self.idx(*c)].group, group);
        }
        assert!(ring.len() >= 2);
        assert!(members.contains(&conn));
        match self.ops.get(&op_id) {
            None => {
                assert!(
                    !self.running.contains_key(&(group, tag)),
                    "two ops for group {group} tag {tag} at once"
                );
                self.running.insert((group, tag), op_id);
                self.ops.insert(
                    op_id,
                    OpInfo {
                        group,
                        tag,
                        participants: members,
                        verdict: None,
                        told: BTreeSet::new(),
                    },
                );
                self.stats.commenced += 1;
            }
            Some(info) => {
                assert_eq!((info.group, info.tag), (group, tag));
                assert_eq!(info.participants, members, "one world per op");
                assert_eq!(self.running.get(&(group, tag)), Some(&op_id));
            }
        }
    }

    /// Records a verdict; true when it is the op's first.
    fn check_result(
        &mut self,
        conn: ConnId,
        group: u32,
        tag: u64,
        op_id: u64,
        v: (bool, u8),
    ) -> bool {
        let info = self
            .ops
            .get_mut(&op_id)
            .unwrap_or_else(|| panic!("verdict for op {op_id}, which never commenced"));
        assert_eq!((info.group, info.tag), (group, tag));
        assert!(
            info.participants.contains(&conn),
            "verdict to a non-participant"
        );
        assert!(
            info.told.insert(conn),
            "two verdicts for op {op_id} to {conn}"
        );
        match info.verdict {
            Some(prev) => {
                assert_eq!(prev, v, "participants of op {op_id} got different verdicts");
                false
            }
            None => {
                if !v.0 {
                    assert_eq!(v.1, RANK_CONNECTION_LOST);
                }
                info.verdict = Some(v);
                self.running.remove(&(group, tag));
                if v.0 {
                    self.stats.succeeded += 1;
                } else {
                    self.stats.failed_ops += 1;
                }
                true
            }
        }
    }

    /// Newcomers start the program right after the update topology that
    /// admitted them (at 0 when they bootstrap the swarm).
    fn assign_start(&mut self, updated: &[ConnId]) {
        let mut old_steps = BTreeSet::new();
        for &c in updated {
            let p = &self.peers[self.idx(c)];
            if p.phase == SimPhase::Established {
                assert!(
                    p.call.as_ref().is_some_and(|call| call.topology),
                    "topology updated for a peer not updating topology: {p:?}"
                );
                old_steps.insert(p.pc);
            }
        }
        assert!(
            old_steps.len() <= 1,
            "old peers at different steps: {old_steps:?}"
        );
        let start = old_steps.first().map_or(0, |k| k + 1);
        for &c in updated {
            let i = self.idx(c);
            let p = &mut self.peers[i];
            if matches!(p.phase, SimPhase::Registering | SimPhase::Connecting) {
                assert!(p.start_pc.is_none(), "admitted twice: {p:?}");
                p.start_pc = Some(start);
                self.stats.admitted += 1;
            }
        }
    }

    /// A peer reacts to one message from the master like a real one would;
    /// anything it does not expect at this point fails the test.
    fn deliver_to_peer(&mut self, i: usize) {
        let Some(msg) = self.peers[i].inbox.pop_front() else {
            return;
        };
        let mut connect_failed = false;
        let p = &mut self.peers[i];
        if p.phase == SimPhase::Leaving {
            return;
        }
        let me = pid(p.conn);
        let in_topology = p.call.as_ref().is_some_and(|c| c.topology);
        let unexpected = |p: &SimPeer, msg: &MasterMsg| -> String {
            format!("peer {} did not expect {msg:?} in state {p:#?}", p.conn)
        };
        match &msg {
            MasterMsg::RegisterAck { id, .. } => {
                assert_eq!(p.phase, SimPhase::Registering, "{}", unexpected(p, &msg));
                assert_eq!(*id, me);
                p.phase = SimPhase::Connecting;
                p.acked = true;
            }
            MasterMsg::Establish { round, ring, peers } => {
                assert!(
                    p.phase == SimPhase::Connecting || in_topology,
                    "{}",
                    unexpected(p, &msg)
                );
                assert!(ring.contains(&me));
                assert_eq!(&peers.iter().map(|e| e.id).collect::<Vec<_>>(), ring);
                assert!(peers.iter().all(|e| e.group == p.group));
                // A new round replaces the previous one's work.
                p.work.retain(|w| !matches!(w, Work::Establish { .. }));
                p.work.push(Work::Establish {
                    round: *round,
                    alone: ring.len() == 1,
                });
            }
            MasterMsg::TopologyUpdated { .. } | MasterMsg::TopologyFailed { .. } => {
                assert!(
                    !p.work.iter().any(|w| matches!(w, Work::Establish { .. })),
                    "topology decided before this peer reported: {}",
                    unexpected(p, &msg)
                );
                let ok = matches!(msg, MasterMsg::TopologyUpdated { .. });
                if !ok {
                    self.stats.topology_failed += 1;
                }
                if p.phase == SimPhase::Connecting {
                    if ok {
                        p.phase = SimPhase::Established;
                        p.pc = p.start_pc.unwrap_or_else(|| panic!("no start for {p:?}"));
                    } else {
                        // `connect` failed: the user drops the communicator.
                        connect_failed = true;
                    }
                } else {
                    assert!(in_topology, "{}", unexpected(p, &msg));
                    if let Some(c) = p.call.as_mut() {
                        c.topology = false;
                    }
                }
            }
            MasterMsg::World { .. } => {
                assert!(p.acked, "{}", unexpected(p, &msg));
            }
            MasterMsg::PendingAnswer { pending } => {
                let call = p.call.as_mut().filter(|c| c.pending);
                let Some(call) = call else {
                    panic!("{}", unexpected(p, &msg))
                };
                call.pending = false;
                if *pending {
                    self.stats.pending_true += 1;
                }
            }
            MasterMsg::OptimizeDone { ok } => {
                assert!(*ok);
                let call = p.call.as_mut().filter(|c| c.optimize);
                let Some(call) = call else {
                    panic!("{}", unexpected(p, &msg))
                };
                call.optimize = false;
            }
            MasterMsg::CollectiveCommence { tag, op_id, .. } => {
                let state = p.call.as_ref().and_then(|c| c.tags.get(tag)).copied();
                assert_eq!(
                    state,
                    Some(TagState::WaitCommence),
                    "{}",
                    unexpected(p, &msg)
                );
                if let Some(c) = p.call.as_mut() {
                    c.tags.insert(*tag, TagState::Running(*op_id));
                }
                p.work.push(Work::Done {
                    tag: *tag,
                    op_id: *op_id,
                });
            }
            MasterMsg::CollectiveResult { tag, op_id, ok, .. } => {
                let state = p.call.as_ref().and_then(|c| c.tags.get(tag)).copied();
                match state {
                    Some(TagState::WaitCommence) => {
                        assert!(!ok && *op_id == 0, "{}", unexpected(p, &msg))
                    }
                    Some(TagState::Running(o)) => {
                        assert_eq!(o, *op_id, "{}", unexpected(p, &msg))
                    }
                    None => panic!("{}", unexpected(p, &msg)),
                }
                if let Some(c) = p.call.as_mut() {
                    c.tags.remove(tag);
                }
                // A verdict before our report: the ring is aborted, no report.
                p.work
                    .retain(|w| !matches!(w, Work::Done { tag: t, .. } if t == tag));
            }
            MasterMsg::SyncPlan {
                sync_id,
                revision,
                fetch,
                sources,
            } => {
                let waiting = p
                    .call
                    .as_ref()
                    .is_some_and(|c| matches!(c.sync, Some(SyncState::WaitPlan { .. })));
                let send_only = p.call.as_ref().is_some_and(|c| {
                    matches!(c.sync, Some(SyncState::WaitPlan { send_only: true }))
                });
                assert!(waiting, "{}", unexpected(p, &msg));
                assert!(
                    sources.iter().all(|s| s.id != me),
                    "a peer is its own source"
                );
                assert!(sources.iter().all(|s| s.group == p.group));
                if !fetch.is_empty() {
                    assert!(!send_only, "a send-only peer never receives");
                    assert!(!sources.is_empty(), "something to fetch but nobody to ask");
                    p.work.push(Work::Transfer { sync_id: *sync_id });
                    self.stats.fetches += 1;
                }
                if let Some(c) = p.call.as_mut() {
                    c.sync = Some(SyncState::WaitResult {
                        sync_id: *sync_id,
                        revision: *revision,
                        fetch: fetch.clone(),
                    });
                }
            }
            MasterMsg::SyncResult {
                sync_id, ok, code, ..
            } => {
                let state = p.call.as_mut().and_then(|c| c.sync.take());
                match state {
                    Some(SyncState::WaitPlan { send_only }) => {
                        assert!(!ok, "{}", unexpected(p, &msg));
                        // Correct peers fail at planning only when nobody
                        // offers state, or when send-only without the
                        // popular content.
                        if send_only && *code == INVALID_USAGE {
                            self.stats.send_only_failed += 1;
                        } else {
                            assert_eq!(*code, NO_SHARED_STATE, "{}", unexpected(p, &msg));
                        }
                        self.stats.syncs_failed += 1;
                    }
                    Some(SyncState::WaitResult {
                        sync_id: expected,
                        revision,
                        fetch,
                    }) => {
                        assert_eq!(*sync_id, expected);
                        assert!(
                            !p.work.iter().any(|w| matches!(w, Work::Transfer { .. })),
                            "sync decided before this receiver reported"
                        );
                        if *ok {
                            for f in &fetch {
                                let k = match f.name.as_str() {
                                    "a" => 0,
                                    "b" => 1,
                                    _ => 2,
                                };
                                p.hashes[k] = f.expected_hash;
                            }
                            p.synced = Some(revision);
                            let content = (revision, [p.hashes[0], p.hashes[1]]);
                            let agreed = *self.sync_content.entry(*sync_id).or_insert(content);
                            assert_eq!(
                                agreed, content,
                                "sync {sync_id} left peers with different state"
                            );
                            self.stats.syncs_ok += 1;
                        } else {
                            assert_eq!(*code, RANK_CONNECTION_LOST);
                            self.stats.syncs_failed += 1;
                        }
                    }
                    None => panic!("{}", unexpected(p, &msg)),
                }
            }
            MasterMsg::Kick { reason } => panic!("kicked: {reason}"),
        }
        if p.call.as_ref().is_some_and(Call::finished) {
            p.call = None;
            p.pc += 1;
        }
        if connect_failed {
            self.crash(i);
        }
    }

    fn progress(&mut self, i: usize, which: u8, roll: u8) {
        let p = &mut self.peers[i];
        if p.work.is_empty() {
            return;
        }
        let w = p.work.remove(which as usize % p.work.len());
        let msg = match w {
            Work::Establish { round, alone } => PeerMsg::ConnectionsEstablished {
                round,
                ok: alone || !roll.is_multiple_of(6),
            },
            Work::Done { tag, op_id } => PeerMsg::CollectiveDone {
                tag,
                op_id,
                ok: !roll.is_multiple_of(10),
            },
            Work::Transfer { sync_id } => PeerMsg::SyncTransferDone {
                sync_id,
                ok: !roll.is_multiple_of(10),
                failed_source: None,
            },
        };
        p.outbox.push_back(msg);
    }

    /// An idle peer makes the next call of the program.
    fn start(&mut self, i: usize, roll: u8) {
        let step = self.step_at(self.peers[i].pc);
        let p = &mut self.peers[i];
        let mut call = Call::default();
        match step {
            Step::UpdateTopology => {
                p.outbox.push_back(PeerMsg::VoteUpdateTopology);
                call.topology = true;
            }
            Step::ArePeersPending => {
                p.outbox.push_back(PeerMsg::VoteArePeersPending);
                call.pending = true;
            }
            Step::OptimizeTopology => {
                p.outbox.push_back(PeerMsg::VoteOptimizeTopology);
                call.optimize = true;
            }
            Step::AllReduce {
                mut tags,
                with_pending,
            } => {
                // Each peer launches its async ops in its own order.
                let n = tags.len();
                tags.rotate_left(roll as usize % n);
                for (k, tag) in tags.into_iter().enumerate() {
                    p.outbox.push_back(PeerMsg::CollectiveInit {
                        tag,
                        spec: spec(1_000 + tag),
                        payload: Vec::new(),
                    });
                    call.tags.insert(tag, TagState::WaitCommence);
                    if with_pending && k == (roll as usize / 3) % n {
                        p.outbox.push_back(PeerMsg::VoteArePeersPending);
                        call.pending = true;
                    }
                }
            }
            Step::Sync => {
                let strategy = if roll.is_multiple_of(6) {
                    RECEIVE_ONLY
                } else if roll % 12 == 9 {
                    SEND_ONLY
                } else {
                    ENFORCE_POPULAR
                };
                // A newcomer may hold any revision; others advance by one.
                let revision = p.synced.map_or(roll as u64 / 6 % 3, |r| r + 1);
                if roll % 7 == 1 {
                    p.hashes[0] ^= 1; // local divergence: must be repaired
                }
                if roll % 5 == 2 {
                    p.hashes[2] = p.hashes[2].wrapping_add(1); // allowed to differ
                }
                p.outbox.push_back(vote(revision, p.hashes, strategy));
                call.sync = Some(SyncState::WaitPlan {
                    send_only: strategy == SEND_ONLY,
                });
            }
        }
        p.call = Some(call);
    }

    /// Highest step any live peer has reached or is in, counting where
    /// admitted newcomers will start (their admitters may be hung).
    fn frontier(&self) -> u64 {
        self.peers
            .iter()
            .filter(|p| p.alive())
            .filter_map(|p| match p.phase {
                SimPhase::Established if !p.frozen => Some(p.pc + p.call.is_some() as u64),
                SimPhase::Registering | SimPhase::Connecting => p.start_pc,
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// The step just after the first update topology at or after `from`.
    fn barrier_after(&self, from: u64) -> u64 {
        let mut t = from;
        while self.step_at(t) != Step::UpdateTopology {
            t += 1;
        }
        t + 1
    }

    /// Stops the chaos and lets every peer finish: all messages are
    /// delivered, all work reports success, hung peers are evicted, idle
    /// peers catch up to the furthest one and then pass one more update
    /// topology (admitting whoever waits). Then nobody may still wait.
    fn drain(&mut self) {
        let mut target = self.barrier_after(self.frontier());
        for _ in 0..10_000 {
            // Newcomers admitted meanwhile by a peer that then hung start
            // after the step it admitted them in; the others follow them.
            let newest = self
                .peers
                .iter()
                .filter(|p| p.alive())
                .filter_map(|p| p.start_pc);
            target = newest.fold(target, u64::max);
            let mut moved = false;
            for i in 0..self.peers.len() {
                while self.peers[i].alive() && !self.peers[i].outbox.is_empty() {
                    self.deliver_to_master(i);
                    moved = true;
                }
            }
            for i in 0..self.peers.len() {
                while self.peers[i].alive()
                    && !self.peers[i].frozen
                    && !self.peers[i].inbox.is_empty()
                {
                    self.deliver_to_peer(i);
                    moved = true;
                }
            }
            for i in 0..self.peers.len() {
                while self.peers[i].alive()
                    && !self.peers[i].frozen
                    && !self.peers[i].work.is_empty()
                {
                    self.progress(i, 0, CALM);
                    moved = true;
                }
            }
            for i in 0..self.peers.len() {
                if self.peers[i].idle() && self.peers[i].pc < target {
                    self.start(i, CALM);
                    moved = true;
                }
            }
            if moved {
                continue;
            }
            if self.peers.iter().any(|p| p.alive() && p.frozen) {
                self.tick(SIM_TIMEOUT_MS + 1);
                continue;
            }
            // Someone still waits to join: everyone passes one more update
            // topology (unless they are stuck, which the checks below report).
            let all_idle = self
                .peers
                .iter()
                .filter(|p| p.alive() && p.phase == SimPhase::Established)
                .all(|p| p.idle() && p.pc == target);
            if self.m.pending_count() > 0 && all_idle {
                target = self.barrier_after(target);
                continue;
            }
            break;
        }

        let alive: BTreeSet<ConnId> = self
            .peers
            .iter()
            .filter(|p| p.alive())
            .map(|p| p.conn)
            .collect();
        for p in self.peers.iter().filter(|p| p.alive()) {
            assert!(
                p.phase == SimPhase::Established
                    && p.call.is_none()
                    && p.work.is_empty()
                    && p.inbox.is_empty()
                    && p.outbox.is_empty(),
                "peer still waits for an answer: {p:#?}"
            );
            assert_eq!(p.pc, target, "peer {} fell out of step", p.conn);
        }
        assert_eq!(
            self.accepted_of(None),
            alive,
            "master and peers agree on members"
        );
        assert_eq!(self.m.pending_count(), 0);
        assert!(self.m.collectives.is_empty(), "{:?}", self.m.collectives);
        assert!(self.m.syncs.is_empty(), "{:?}", self.m.syncs);
        assert!(self.m.establishing.is_none());
        assert!(
            self.running.is_empty(),
            "ops without verdict: {:?}",
            self.running
        );
        for (op_id, info) in &self.ops {
            assert!(info.verdict.is_some(), "op {op_id} never decided");
            for c in info.participants.intersection(&alive) {
                assert!(
                    info.told.contains(c),
                    "survivor {c} never told about op {op_id}"
                );
            }
        }
    }
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => Just(Step::UpdateTopology),
        1 => Just(Step::ArePeersPending),
        1 => Just(Step::OptimizeTopology),
        4 => (prop::collection::btree_set(0u64..3, 1..=3), any::<bool>()).prop_map(
            |(tags, with_pending)| Step::AllReduce {
                tags: tags.into_iter().collect(),
                with_pending,
            }
        ),
        3 => Just(Step::Sync),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u8>().prop_map(Op::Join),
        100 => (any::<u16>(), any::<u8>()).prop_map(|(a, b)| Op::Act(a, b)),
        1 => any::<u8>().prop_map(Op::Leave),
        1 => any::<u8>().prop_map(Op::Crash),
        1 => any::<u8>().prop_map(Op::Freeze),
        3 => (0u16..4_000).prop_map(Op::Tick),
    ]
}

/// (program, number of groups, events). The first peers join up front.
fn scenario_strategy() -> impl Strategy<Value = (Vec<Step>, u32, Vec<Op>)> {
    (
        prop::collection::vec(step_strategy(), 2..8).prop_map(|mut v| {
            v.insert(0, Step::UpdateTopology);
            v
        }),
        1u32..=2,
        prop::collection::vec(any::<u8>().prop_map(Op::Join), 1..=5),
        prop::collection::vec(op_strategy(), 50..200),
    )
        .prop_map(|(program, groups, mut joins, ops)| {
            joins.extend(ops);
            (program, groups, joins)
        })
}

/// Runs one scenario; returns what its random phase exercised.
fn run_scenario(program: Vec<Step>, groups: u32, ops: Vec<Op>) -> Stats {
    let mut sim = Sim::new(program, groups);
    for op in ops {
        sim.apply(op);
    }
    let chaos = sim.stats.clone();
    sim.drain();
    chaos
}

proptest! {
    #![proptest_config(ProptestConfig {
        // PROPTEST_CASES=N overrides the count for a longer soak.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_interleavings_keep_the_consensus_invariants(
        (program, groups, ops) in scenario_strategy()
    ) {
        run_scenario(program, groups, ops);
    }
}

/// The random runs are only worth something if they reach every round:
/// admissions, commences, successes and failures, syncs with fetches,
/// evictions, leaves and crashes.
#[test]
fn random_interleavings_exercise_every_round() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let strategy = scenario_strategy();
    let mut total = Stats::default();
    for _ in 0..100 {
        let tree = strategy
            .new_tree(&mut runner)
            .unwrap_or_else(|e| panic!("strategy: {e}"));
        let (program, groups, ops) = tree.current();
        total.add(&run_scenario(program, groups, ops));
    }
    let s = &total;
    for (what, n) in [
        ("admitted", s.admitted),
        ("topology_failed", s.topology_failed),
        ("pending_true", s.pending_true),
        ("commenced", s.commenced),
        ("succeeded", s.succeeded),
        ("failed_ops", s.failed_ops),
        ("too_few", s.too_few),
        ("syncs_ok", s.syncs_ok),
        ("syncs_failed", s.syncs_failed),
        ("send_only_failed", s.send_only_failed),
        ("fetches", s.fetches),
        ("evicted", s.evicted),
        ("left", s.left),
        ("crashed", s.crashed),
    ] {
        assert!(n > 0, "no run exercised {what}: {total:#?}");
    }
    if std::env::var_os("PCCL_SIM_STATS").is_some() {
        eprintln!("{total:#?}");
    }
}

// ---------------------------------------------------------------------------
// 10. Arbitrary (misbehaving) input never breaks the master
// ---------------------------------------------------------------------------

fn any_peer_msg() -> impl Strategy<Value = PeerMsg> {
    prop_oneof![
        (0u32..3, any::<bool>()).prop_map(|(group, adv)| PeerMsg::Register {
            group,
            p2p_port: 1,
            ss_port: 2,
            bench_port: 3,
            advertised_ip: adv.then_some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
        }),
        Just(PeerMsg::Heartbeat),
        (1u64..7, 0u64..3).prop_map(|(c, n)| PeerMsg::DataProgress {
            from: vec![(pid(c), n)],
        }),
        Just(PeerMsg::Leave),
        Just(PeerMsg::VoteUpdateTopology),
        (0u64..6, any::<bool>())
            .prop_map(|(round, ok)| PeerMsg::ConnectionsEstablished { round, ok }),
        Just(PeerMsg::VoteArePeersPending),
        Just(PeerMsg::VoteOptimizeTopology),
        (
            0u64..3,
            0u64..3,
            proptest::collection::vec(any::<u8>(), 0..12)
        )
            .prop_map(|(tag, count, payload)| PeerMsg::CollectiveInit {
                tag,
                spec: spec(count),
                payload,
            }),
        (0u64..3, 0u64..6, any::<bool>()).prop_map(|(tag, op_id, ok)| PeerMsg::CollectiveDone {
            tag,
            op_id,
            ok
        }),
        (0u64..4, 0u8..4, prop::collection::vec(0u64..3, 0..4)).prop_map(
            |(revision, strategy, hashes)| PeerMsg::SyncVote {
                revision,
                strategy,
                tensors: hashes
                    .iter()
                    .enumerate()
                    .map(|(i, h)| tm(["a", "b", "c", "a"][i], *h, i == 2))
                    .collect(),
            }
        ),
        (0u64..5, any::<bool>()).prop_map(|(sync_id, ok)| transfer_done(sync_id, ok)),
    ]
}

#[derive(Debug, Clone)]
enum RawEvent {
    Connect(ConnId),
    Message(ConnId, PeerMsg),
    Disconnect(ConnId),
    Tick(u16),
}

fn raw_event() -> impl Strategy<Value = RawEvent> {
    prop_oneof![
        2 => (1u64..7).prop_map(RawEvent::Connect),
        12 => (1u64..7, any_peer_msg()).prop_map(|(c, m)| RawEvent::Message(c, m)),
        1 => (1u64..7).prop_map(RawEvent::Disconnect),
        1 => (0u16..3_000).prop_map(RawEvent::Tick),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Any message at any time from any connection: the master never
    /// panics, only ever talks to open connections, and kicks by closing.
    #[test]
    fn arbitrary_input_never_breaks_the_master(
        events in prop::collection::vec(raw_event(), 50..200)
    ) {
        let mut m = MasterState::new(MasterConfig::default());
        let mut open: BTreeSet<ConnId> = BTreeSet::new();
        let mut now = 0u64;
        for ev in events {
            let ev = match ev {
                RawEvent::Connect(conn) => {
                    if !open.insert(conn) {
                        continue; // the driver never reuses a live conn id
                    }
                    connected_from(conn, peer_ip(conn))
                }
                RawEvent::Message(conn, msg) => Event::Message { conn, msg },
                RawEvent::Disconnect(conn) => {
                    open.remove(&conn);
                    Event::Disconnected { conn }
                }
                RawEvent::Tick(d) => {
                    now += d as u64;
                    Event::Tick { now_ms: now }
                }
            };
            let acts = m.handle(ev);
            for (k, a) in acts.iter().enumerate() {
                match a {
                    Action::Send { conn, msg } => {
                        prop_assert!(open.contains(conn), "send to closed {conn}: {msg:?}");
                        if let MasterMsg::Kick { .. } = msg {
                            prop_assert!(
                                matches!(acts.get(k + 1), Some(Action::Close { conn: c, .. }) if c == conn),
                                "a kick is followed by its close"
                            );
                        }
                    }
                    Action::Close { conn, .. } => {
                        prop_assert!(open.remove(conn), "close of closed {conn}");
                    }
                }
            }
            // The master's books only name open connections.
            prop_assert!(m.peers.keys().all(|c| open.contains(c)));
            for ring in m.rings.values() {
                prop_assert!(ring.iter().all(|c| m.peers.get(c).is_some_and(|p| p.phase == Phase::Accepted)));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Algorithm choice
// ---------------------------------------------------------------------------

fn spec_of_kind(kind: CollectiveKind, algorithm: Algorithm, count: u64) -> CollectiveSpec {
    CollectiveSpec {
        kind: kind as u8,
        algorithm: algorithm as u8,
        ..spec(count)
    }
}

#[test]
fn small_op_threshold_follows_the_cost_model() {
    // 1 ms one-way and 1 Gbit/s: a·b = 125 000 bytes.
    let (a, b) = (1_000, 1_000_000_000);
    assert_eq!(small_op_threshold(2, a, b), DIRECT_MAX_BYTES);
    // (2w-3)·w·ab / ((w-1)(w-2)): w=3 gives 4.5·ab, capped.
    assert_eq!(small_op_threshold(3, a, b), DIRECT_MAX_BYTES);
    // Loopback-like: 20 µs, 10 Gbit/s → ab = 25 000; w = 4: 10/3·ab,
    // past the cap.
    assert_eq!(small_op_threshold(4, 20, 10_000_000_000), DIRECT_MAX_BYTES);
    assert_eq!(small_op_threshold(4, 10, 10_000_000_000), 41_666);
    // w = 8: 13·8/(7·6)·ab.
    assert_eq!(small_op_threshold(8, 20, 10_000_000_000), 61_904);
    // Larger worlds have a smaller threshold; none outside 2..=16.
    assert!(small_op_threshold(16, 20, 10_000_000_000) < 61_904);
    assert_eq!(small_op_threshold(1, a, b), 0);
    assert_eq!(small_op_threshold(DIRECT_MAX_WORLD + 1, a, b), 0);
    // A WAN link (50 ms one-way, 100 Mbit/s: a·b = 625 000 bytes) is past
    // the LAN cap: w = 4 gives 10/3·ab; w = 2 the WAN bound.
    let (a, b) = (50_000, 100_000_000);
    assert_eq!(small_op_threshold(4, a, b), 2_083_333);
    assert_eq!(small_op_threshold(2, a, b), WAN_DIRECT_MAX_BYTES);
    assert_eq!(small_op_threshold(16, a, b), 1_380_952);
    // Just under the WAN latency the LAN cap still holds.
    assert_eq!(
        small_op_threshold(4, WAN_LATENCY_US - 1, b),
        DIRECT_MAX_BYTES
    );
    // A very fat WAN link is bounded by what a peer stages.
    assert_eq!(
        small_op_threshold(4, 100_000, 100_000_000_000),
        WAN_DIRECT_MAX_BYTES
    );
}

#[test]
fn the_master_chooses_direct_only_for_small_all_reduces() {
    let cfg = MasterConfig {
        small_op_max_bytes: Some(1024),
        ..MasterConfig::default()
    };
    let ar = |count, algo| spec_of_kind(CollectiveKind::AllReduce, algo, count);
    // f32: 256 elements are 1024 bytes.
    assert_eq!(
        choose_algorithm(&ar(256, Algorithm::Auto), 4, false, &cfg),
        Ok(Algorithm::Direct)
    );
    assert_eq!(
        choose_algorithm(&ar(257, Algorithm::Auto), 4, false, &cfg),
        Ok(Algorithm::Ring)
    );
    // Quantized to u8: 1024 elements are 1024 bytes on the wire.
    let q = CollectiveSpec {
        quant_datatype: 0,
        quant_algorithm: 1,
        ..ar(1024, Algorithm::Auto)
    };
    assert_eq!(choose_algorithm(&q, 4, false, &cfg), Ok(Algorithm::Direct));
    // A request is honoured either way.
    assert_eq!(
        choose_algorithm(&ar(1 << 30, Algorithm::Direct), 4, false, &cfg),
        Ok(Algorithm::Direct)
    );
    assert_eq!(
        choose_algorithm(&ar(1, Algorithm::Ring), 4, false, &cfg),
        Ok(Algorithm::Ring)
    );
    // Too many peers for a full mesh.
    assert_eq!(
        choose_algorithm(&ar(1, Algorithm::Auto), DIRECT_MAX_WORLD + 1, false, &cfg),
        Ok(Algorithm::Ring)
    );
    assert!(matches!(
        choose_algorithm(&ar(1, Algorithm::Direct), DIRECT_MAX_WORLD + 1, false, &cfg),
        Err(Error::InvalidArgument(_))
    ));
    // The other collectives run on the ring; direct is refused.
    for kind in [
        CollectiveKind::Broadcast,
        CollectiveKind::AllGather,
        CollectiveKind::ReduceScatter,
    ] {
        assert_eq!(
            choose_algorithm(&spec_of_kind(kind, Algorithm::Auto, 1), 4, false, &cfg),
            Ok(Algorithm::Ring)
        );
        assert!(matches!(
            choose_algorithm(&spec_of_kind(kind, Algorithm::Direct, 1), 4, false, &cfg),
            Err(Error::InvalidArgument(_))
        ));
    }
    // Unknown kinds or algorithms are invalid arguments, never a panic.
    let bad = CollectiveSpec { kind: 9, ..spec(1) };
    assert!(matches!(
        choose_algorithm(&bad, 4, false, &cfg),
        Err(Error::InvalidArgument(_))
    ));
    let bad = CollectiveSpec {
        algorithm: 9,
        ..spec(1)
    };
    assert!(matches!(
        choose_algorithm(&bad, 4, false, &cfg),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn commence_carries_the_chosen_algorithm_and_bad_roots_fail() {
    let mut m = M::swarm(&[0, 0, 0]);
    // A 4 KiB all-reduce is under the automatic threshold: direct.
    for c in [1, 2] {
        assert!(m.msg(c, init(5)).is_empty());
    }
    let acts = m.msg(3, init(5));
    let MasterMsg::CollectiveCommence { algorithm, .. } = only(&acts, 3) else {
        panic!("expected a commence");
    };
    assert_eq!(algorithm, Algorithm::Direct as u8);
    // A 1 MiB one is past it: the ring.
    let big = PeerMsg::CollectiveInit {
        tag: 6,
        spec: spec(1 << 18),
        payload: Vec::new(),
    };
    for c in [1, 2] {
        assert!(m.msg(c, big.clone()).is_empty());
    }
    let acts = m.msg(3, big);
    let MasterMsg::CollectiveCommence { algorithm, .. } = only(&acts, 3) else {
        panic!("expected a commence");
    };
    assert_eq!(algorithm, Algorithm::Ring as u8);
    // A broadcast from a root past the world fails every voter.
    let bcast = |root| PeerMsg::CollectiveInit {
        tag: 9,
        spec: CollectiveSpec {
            kind: CollectiveKind::Broadcast as u8,
            root,
            ..spec(10)
        },
        payload: Vec::new(),
    };
    assert!(m.msg(1, bcast(3)).is_empty());
    assert!(m.msg(2, bcast(3)).is_empty());
    let acts = m.msg(3, bcast(3));
    for c in [1, 2, 3] {
        let (tag, op_id, ok, code) = verdict(&only(&acts, c));
        assert_eq!((tag, op_id, ok, code), (9, 0, false, INVALID_ARGUMENT));
    }
}

#[test]
fn tiny_all_reduces_are_relayed_and_decided_at_commence() {
    let mut m = M::swarm(&[0, 0, 0]);
    let relay_init = |conn: ConnId| PeerMsg::CollectiveInit {
        tag: 4,
        spec: spec(2),
        payload: vec![conn as u8; 8],
    };
    assert!(m.msg(1, relay_init(1)).is_empty());
    assert!(m.msg(2, relay_init(2)).is_empty());
    let acts = m.msg(3, relay_init(3));
    for c in [1, 2, 3] {
        let MasterMsg::CollectiveCommence {
            tag,
            ring,
            algorithm,
            contributions,
            ..
        } = only(&acts, c)
        else {
            panic!("expected a commence");
        };
        assert_eq!((tag, algorithm), (4, Algorithm::Relay as u8));
        // Every buffer, in ring order.
        let want: Vec<Vec<u8>> = ring.iter().map(|p| vec![conn_of(p) as u8; 8]).collect();
        assert_eq!(contributions, want);
    }
    // Decided: the tag is free again at once, and late reports are ignored.
    assert!(m.msg(1, done(4, 1, true)).is_empty());
    assert!(m.msg(1, relay_init(1)).is_empty());
    // A missing payload means no relay.
    let plain = PeerMsg::CollectiveInit {
        tag: 4,
        spec: spec(2),
        payload: Vec::new(),
    };
    assert!(m.msg(2, plain).is_empty());
    let acts = m.msg(3, relay_init(3));
    let MasterMsg::CollectiveCommence { algorithm, .. } = only(&acts, 3) else {
        panic!("expected a commence");
    };
    assert_ne!(algorithm, Algorithm::Relay as u8);
}

#[test]
fn relay_requests_past_the_bound_are_invalid() {
    let cfg = MasterConfig::default();
    let ask = CollectiveSpec {
        algorithm: Algorithm::Relay as u8,
        ..spec(2)
    };
    assert_eq!(choose_algorithm(&ask, 3, true, &cfg), Ok(Algorithm::Relay));
    assert!(matches!(
        choose_algorithm(&ask, 3, false, &cfg),
        Err(Error::InvalidArgument(_))
    ));
    let auto = spec(2);
    assert_eq!(choose_algorithm(&auto, 3, true, &cfg), Ok(Algorithm::Relay));
    assert_eq!(
        choose_algorithm(&auto, 3, false, &cfg),
        Ok(Algorithm::Direct)
    );
}
