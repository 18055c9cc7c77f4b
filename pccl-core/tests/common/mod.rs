//! Helpers for in-process multi-peer tests on loopback.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use pccl_core::{Algorithm, Communicator, CommunicatorConfig, MasterConfig, MasterNode};

pub fn master() -> MasterNode {
    master_with(MasterConfig::default())
}

pub fn master_with(cfg: MasterConfig) -> MasterNode {
    pccl_core::logging::init(None);
    let mut m = MasterNode::bind("127.0.0.1:0".parse().unwrap(), cfg).expect("bind master");
    m.run().expect("run master");
    m
}

/// A loopback peer's config. It asks for the ring: these suites assert the
/// ring's exact traffic and error bounds (`collectives.rs` covers the
/// master's choice and the direct algorithm).
pub fn config(master: SocketAddr) -> CommunicatorConfig {
    config_with(master, Algorithm::Ring)
}

pub fn config_with(master: SocketAddr, algorithm: Algorithm) -> CommunicatorConfig {
    let mut c = CommunicatorConfig::new(master).with_ephemeral_ports();
    c.bind_ip = "127.0.0.1".parse().unwrap();
    c.connect_timeout = Duration::from_secs(5);
    c.algorithm = algorithm;
    c
}

/// Builds a swarm of `n` peers: the first is accepted at once, each later
/// one is admitted by the existing peers' update-topology calls.
pub fn connect_peers(
    master: SocketAddr,
    n: usize,
    group_of: impl Fn(usize) -> u32,
) -> Vec<Arc<Communicator>> {
    connect_peers_with(master, n, group_of, Algorithm::Ring)
}

/// [`connect_peers`] with peers that ask for `algorithm`.
pub fn connect_peers_with(
    master: SocketAddr,
    n: usize,
    group_of: impl Fn(usize) -> u32,
    algorithm: Algorithm,
) -> Vec<Arc<Communicator>> {
    connect_peers_tuned(master, n, algorithm, |i, cfg| cfg.peer_group = group_of(i))
}

/// [`connect_peers_with`], with each peer's config adjusted by `tune`.
pub fn connect_peers_tuned(
    master: SocketAddr,
    n: usize,
    algorithm: Algorithm,
    tune: impl Fn(usize, &mut CommunicatorConfig),
) -> Vec<Arc<Communicator>> {
    let mut peers: Vec<Arc<Communicator>> = Vec::new();
    for i in 0..n {
        let mut cfg = config_with(master, algorithm);
        tune(i, &mut cfg);
        let joiner = thread::spawn(move || {
            let c = Communicator::new(cfg).expect("new communicator");
            c.connect().expect("connect");
            Arc::new(c)
        });
        let target = i as u32 + 1;
        on_all(&peers, move |_, c| admit_until(c, target));
        peers.push(joiner.join().expect("connect thread"));
    }
    peers
}

/// Existing peers run the admission loop until the global world reaches `target`.
pub fn admit_until(c: &Communicator, target: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while c.world().expect("world").global_world < target {
        assert!(std::time::Instant::now() < deadline, "admission timed out");
        if c.are_peers_pending().expect("are_peers_pending") {
            c.update_topology().expect("update_topology");
        } else {
            thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Runs `f(i, peer)` on every peer in its own thread and collects the results.
pub fn on_all<T: Send + 'static>(
    peers: &[Arc<Communicator>],
    f: impl Fn(usize, &Communicator) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let handles: Vec<_> = peers
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, c)| {
            let f = f.clone();
            thread::spawn(move || f(i, &c))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("peer thread"))
        .collect()
}
