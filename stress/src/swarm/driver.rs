//! A swarm under test: an embedded master and peer processes that run the
//! [`worker`](super::worker) loop, plus the bookkeeping the churn harness and
//! the demo share. The driver turns the children's lines and its own actions
//! (spawn, SIGKILL, SIGSTOP, SIGCONT, SIGTERM) into [`Event`]s and keeps
//! [`Stats`]:
//!
//! - every `STEP` goes through the [`HashAudit`]; a disagreeing hash is a
//!   [`Event::Mismatch`], an inexact all-reduce an [`Event::Inexact`]; in a
//!   quantized run the results' hashes are audited too
//!   ([`Event::ResultMismatch`]) and a result beyond the documented error
//!   bound is an [`Event::Inexact`];
//! - steps are aggregated across peers into [`StepSummary`] events (once
//!   every peer of the step's world reported, or once the step is stale);
//! - a frozen peer counts as evicted when a survivor completes a later step
//!   with a smaller world ([`Event::Evicted`], with the time since SIGSTOP);
//! - a hang is no `STEP` from anyone for longer than the bound while at least
//!   two joined peers run (not stopped, not leaving); a join or a graceful
//!   leave that takes longer than the bound is reported too;
//! - a child that exits without being killed, or exits non-zero after
//!   SIGTERM, is a crash.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use pccl_core::{DataType, MasterConfig, MasterNode};

use super::audit::{HashAudit, Mismatch};
use super::lines::{Record, RetryRec, StepRec};
use super::procs::{describe_status, ProcEvent, Procs, Stream};
use super::worker::quantized_sum_bound;
use super::{Context, Result};

/// How to run the swarm.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// The master evicts a peer silent for this long.
    pub peer_timeout_ms: u64,
    /// Hang bound (see the module docs).
    pub hang_bound: Duration,
    /// Program that runs a worker, and the arguments that come first
    /// (e.g. the demo's own executable and `--role peer`).
    pub program: PathBuf,
    pub leading_args: Vec<String>,
    /// Worker options for every peer (`--elems`, `--state-mib`, ...).
    pub worker_args: Vec<String>,
    /// Where each peer's stderr is written (`<name>.log`); `None`: only kept in memory.
    pub log_dir: Option<PathBuf>,
    /// Start peers with `--trace` (their last line then tells which
    /// collective a stuck peer waits in).
    pub trace: bool,
    /// The code type when the workers run quantized all-reduces (`--quant`,
    /// `--quant-type` in `worker_args`); `None`: exact sums. A quantized
    /// step must carry its result's hash, equal on every peer of the step,
    /// and an error within [`quantized_sum_bound`]; an exact one must be
    /// exact.
    pub quant_type: Option<DataType>,
}

/// Where a peer is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Spawned or rejoining, not admitted yet.
    Starting,
    /// Admitted and running.
    Running,
    /// SIGSTOPped.
    Stopped,
    /// SIGTERM sent; expected to leave gracefully.
    Leaving,
    /// Exited (and reaped).
    Gone,
}

/// One peer process.
#[derive(Debug)]
pub struct PeerSlot {
    pub name: String,
    proc_id: usize,
    pub peer_id: Option<String>,
    /// Identities of all its sessions, in order.
    pub ids: Vec<String>,
    /// Whether it was ever SIGSTOPped (so an eviction of it is expected).
    pub ever_stopped: bool,
    pub state: PeerState,
    pub spawned_at: Instant,
    /// When the current state began.
    pub since: Instant,
    /// Whether the peer completed a step in its current session.
    pub stepped: bool,
    pub steps: u64,
    pub last_step: Option<u64>,
    /// SIGKILLed by the driver (so its end is no crash).
    killed: bool,
    stdout_eof: bool,
    /// The last lines of its stderr.
    pub stderr_tail: VecDeque<String>,
    /// Its last stdout line (with `--trace`, the call it is in).
    pub last_line: Option<(Instant, String)>,
    log: Option<std::fs::File>,
    /// How it ended, in words.
    pub exit: Option<String>,
}

/// Counters of a run.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// STEP lines (successful all-reduce + sync per peer).
    pub ops: u64,
    /// RETRY lines: failed all-reduce attempts survived by retrying.
    pub retries: u64,
    /// The longest time a survivor waited on an all-reduce that then failed.
    pub max_retry_wait_ms: u64,
    /// Admissions (JOINED lines, rejoins included).
    pub joins: u64,
    pub rejoins: u64,
    pub spawned: u64,
    pub kills: u64,
    pub stops: u64,
    pub conts: u64,
    pub terms: u64,
    /// Graceful leaves that ended with BYE and exit 0.
    pub graceful_leaves: u64,
    pub evictions: u64,
    /// The longest time from SIGSTOP until survivors stepped without the peer.
    pub max_eviction_ms: u64,
    pub skips: u64,
    pub op_errors: u64,
    pub mismatches: u64,
    /// Steps whose quantized all-reduce result differed between peers.
    pub result_mismatches: u64,
    pub inexact: u64,
    pub crashes: u64,
    pub fatals: u64,
    pub bad_lines: u64,
    pub hangs: u64,
    pub slow_joins: u64,
    pub stuck_leaves: u64,
    /// The longest stretch without any STEP while at least two joined peers ran.
    pub longest_gap_ms: u64,
    pub max_world: u32,
    /// Bytes all-reduced (per peer, summed over successful ops).
    pub bytes_reduced: u64,
    /// Bytes received by shared-state syncs.
    pub sync_rx_bytes: u64,
}

impl Stats {
    /// Whether anything counts as a failure of the run.
    pub fn failures(&self) -> u64 {
        self.mismatches
            + self.result_mismatches
            + self.inexact
            + self.crashes
            + self.fatals
            + self.bad_lines
            + self.hangs
            + self.slow_joins
            + self.stuck_leaves
    }
}

/// Whether a step's all-reduce result is what the run promises: exact
/// without quantization; with it, reported (hash and error) and within the
/// documented error bound for the step's world.
fn result_within_contract(quant_type: Option<DataType>, s: &StepRec) -> bool {
    match (quant_type, s.ar_hash, s.ar_err) {
        (None, _, _) => s.allreduce_exact,
        (Some(qt), Some(_), Some(err)) => err <= quantized_sum_bound(s.world, qt),
        (Some(_), _, _) => false,
    }
}

/// One step, as all peers reported it.
#[derive(Debug, Clone)]
pub struct StepSummary {
    pub step: u64,
    /// World of the step's all-reduce (largest reported).
    pub world: u32,
    /// Peers that reported the step.
    pub reporters: usize,
    pub hash: u64,
    /// Whether every reporter had the same hash.
    pub agree: bool,
    /// Slowest reporter's all-reduce time and its bus bandwidth.
    pub ar_ms: f64,
    pub busbw: f64,
    pub bytes: u64,
    /// Bytes fetched by syncs in this step (newcomers catching up).
    pub sync_rx: u64,
    pub retries: u32,
}

/// What happened.
#[derive(Debug, Clone)]
pub enum Event {
    Spawned {
        peer: usize,
    },
    /// A peer is about to start a collective call (peers run with `--trace`).
    Begin {
        peer: usize,
        step: u64,
        op: String,
    },
    Joined {
        peer: usize,
        session: u32,
        world: u32,
        connect_ms: u64,
    },
    Step {
        peer: usize,
        rec: StepRec,
    },
    StepDone(StepSummary),
    Retry {
        peer: usize,
        rec: RetryRec,
    },
    Skip {
        peer: usize,
        step: u64,
    },
    Rejoin {
        peer: usize,
        reason: String,
        msg: String,
    },
    OpError {
        peer: usize,
        op: String,
        err: String,
        msg: String,
    },
    Mismatch(Mismatch),
    /// Two peers ended a quantized all-reduce with different bytes.
    ResultMismatch(Mismatch),
    Inexact {
        peer: usize,
        step: u64,
    },
    Killed {
        peer: usize,
    },
    Stopped {
        peer: usize,
    },
    Continued {
        peer: usize,
    },
    Terminating {
        peer: usize,
    },
    /// A frozen peer was evicted: survivors stepped with a smaller world
    /// `after_ms` after SIGSTOP (or, for a peer thawed first, it found its
    /// master connection closed `after_ms` after SIGSTOP).
    Evicted {
        peer: usize,
        after_ms: u64,
        world: u32,
    },
    Left {
        peer: usize,
        steps: u64,
    },
    /// Exited on its own (`expected` after SIGTERM with exit 0 or DONE).
    Exited {
        peer: usize,
        status: String,
        expected: bool,
    },
    Fatal {
        peer: usize,
        msg: String,
    },
    BadLine {
        peer: usize,
        err: String,
    },
    Hang {
        silent_ms: u64,
    },
    SlowJoin {
        peer: usize,
        waited_ms: u64,
    },
    StuckLeave {
        peer: usize,
        waited_ms: u64,
    },
}

struct EvictWatch {
    peer: usize,
    at: Instant,
    world_before: u32,
    step_before: u64,
    /// SIGCONT was sent: a STEP of the peer itself (no rejoin) means it
    /// was not evicted; a REJOIN means it was.
    thawed: bool,
}

struct StepAgg {
    first_at: Instant,
    world: u32,
    reporters: usize,
    hash: u64,
    agree: bool,
    ar_ms: f64,
    busbw: f64,
    bytes: u64,
    sync_rx: u64,
    retries: u32,
}

/// A master and its peer processes.
pub struct Swarm {
    cfg: DriverConfig,
    master: MasterNode,
    procs: Procs,
    pub peers: Vec<PeerSlot>,
    pub audit: HashAudit,
    /// Quantized runs: the all-reduce result hashes per step.
    pub result_audit: HashAudit,
    pub stats: Stats,
    pub started: Instant,
    progress_at: Instant,
    was_live: bool,
    hang_reported: bool,
    last_world: u32,
    max_step: u64,
    evict_watch: Vec<EvictWatch>,
    aggs: BTreeMap<u64, StepAgg>,
}

impl Swarm {
    /// Binds and starts an embedded master on 127.0.0.1 (a free port).
    pub fn start(cfg: DriverConfig) -> Result<Swarm> {
        let mcfg = MasterConfig {
            peer_timeout_ms: cfg.peer_timeout_ms,
            ..MasterConfig::default()
        };
        let addr = "127.0.0.1:0"
            .parse()
            .context("parsing the master address")?;
        let mut master = MasterNode::bind(addr, mcfg).context("binding the master")?;
        master.run().context("starting the master")?;
        if let Some(d) = &cfg.log_dir {
            std::fs::create_dir_all(d)
                .with_context(|| format!("creating the log folder {}", d.display()))?;
        }
        let now = Instant::now();
        Ok(Swarm {
            cfg,
            master,
            procs: Procs::new(),
            peers: Vec::new(),
            audit: HashAudit::new(),
            result_audit: HashAudit::new(),
            stats: Stats::default(),
            started: now,
            progress_at: now,
            was_live: false,
            hang_reported: false,
            last_world: 0,
            max_step: 0,
            evict_watch: Vec::new(),
            aggs: BTreeMap::new(),
        })
    }

    pub fn master_addr(&self) -> std::net::SocketAddr {
        self.master.local_addr()
    }

    pub fn config(&self) -> &DriverConfig {
        &self.cfg
    }

    /// Starts a new peer process; returns its index in [`Swarm::peers`].
    pub fn spawn(&mut self, extra: &[String]) -> Result<(usize, Vec<Event>)> {
        let idx = self.peers.len();
        let name = format!("p{idx}");
        let mut cmd = Command::new(&self.cfg.program);
        cmd.args(&self.cfg.leading_args)
            .arg("--master")
            .arg(self.master_addr().to_string())
            .arg("--exit-on-stdin-eof")
            .arg("--graceful-signals")
            .args(self.cfg.trace.then_some("--trace"))
            .args(&self.cfg.worker_args)
            .args(extra);
        let proc_id = self.procs.spawn(name.clone(), cmd)?;
        let log = match &self.cfg.log_dir {
            Some(d) => {
                let p = d.join(format!("{name}.log"));
                Some(
                    std::fs::File::create(&p)
                        .with_context(|| format!("creating {}", p.display()))?,
                )
            }
            None => None,
        };
        let now = Instant::now();
        self.peers.push(PeerSlot {
            name,
            proc_id,
            peer_id: None,
            ids: Vec::new(),
            ever_stopped: false,
            state: PeerState::Starting,
            spawned_at: now,
            since: now,
            stepped: false,
            steps: 0,
            last_step: None,
            killed: false,
            stdout_eof: false,
            stderr_tail: VecDeque::new(),
            last_line: None,
            log,
            exit: None,
        });
        self.stats.spawned += 1;
        Ok((idx, vec![Event::Spawned { peer: idx }]))
    }

    fn set_state(&mut self, peer: usize, s: PeerState) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.state = s;
            p.since = Instant::now();
        }
    }

    /// SIGKILL (and reap).
    pub fn kill(&mut self, peer: usize) -> Result<Vec<Event>> {
        let p = self.peers.get_mut(peer).context("no such peer")?;
        if p.state == PeerState::Gone {
            return Ok(Vec::new());
        }
        p.killed = true;
        let id = p.proc_id;
        let status = self.procs.kill(id)?;
        self.stats.kills += 1;
        self.evict_watch.retain(|w| w.peer != peer);
        self.set_state(peer, PeerState::Gone);
        if let Some(p) = self.peers.get_mut(peer) {
            p.exit = Some(describe_status(&status));
        }
        Ok(vec![Event::Killed { peer }])
    }

    /// What the embedded master saw of liveness (heartbeat gaps, evictions).
    pub fn liveness(&self) -> pccl_core::master::LivenessStats {
        self.master.liveness()
    }

    /// Master evictions of peers that were never SIGSTOPped (healthy peers
    /// the master took for dead), as their identities.
    pub fn healthy_evictions(&self) -> Vec<String> {
        let healthy: std::collections::BTreeSet<&str> = self
            .peers
            .iter()
            .filter(|p| !p.ever_stopped)
            .flat_map(|p| p.ids.iter().map(String::as_str))
            .collect();
        self.liveness()
            .evictions
            .iter()
            .map(|e| e.peer.to_string())
            .filter(|id| healthy.contains(id.as_str()))
            .collect()
    }

    /// SIGSTOP: the peer freezes, still connected.
    pub fn stop(&mut self, peer: usize) -> Result<Vec<Event>> {
        let id = self.peers.get(peer).context("no such peer")?.proc_id;
        self.procs.signal(id, libc::SIGSTOP)?;
        self.stats.stops += 1;
        self.peers[peer].ever_stopped = true;
        self.set_state(peer, PeerState::Stopped);
        self.evict_watch.push(EvictWatch {
            peer,
            at: Instant::now(),
            world_before: self.last_world,
            step_before: self.max_step,
            thawed: false,
        });
        Ok(vec![Event::Stopped { peer }])
    }

    /// SIGCONT a stopped peer.
    pub fn cont(&mut self, peer: usize) -> Result<Vec<Event>> {
        let id = self.peers.get(peer).context("no such peer")?.proc_id;
        self.procs.signal(id, libc::SIGCONT)?;
        self.stats.conts += 1;
        for w in self.evict_watch.iter_mut().filter(|w| w.peer == peer) {
            w.thawed = true;
        }
        self.set_state(peer, PeerState::Running);
        Ok(vec![Event::Continued { peer }])
    }

    /// SIGTERM: a graceful leave (the worker closes its communicator between steps).
    pub fn terminate(&mut self, peer: usize) -> Result<Vec<Event>> {
        let p = self.peers.get(peer).context("no such peer")?;
        let (id, state) = (p.proc_id, p.state);
        if state == PeerState::Stopped {
            self.procs.signal(id, libc::SIGCONT)?;
            self.evict_watch.retain(|w| w.peer != peer);
        }
        self.procs.signal(id, libc::SIGTERM)?;
        self.stats.terms += 1;
        self.set_state(peer, PeerState::Leaving);
        Ok(vec![Event::Terminating { peer }])
    }

    /// Peers in `state`.
    pub fn in_state(&self, state: PeerState) -> Vec<usize> {
        (0..self.peers.len())
            .filter(|&i| self.peers[i].state == state)
            .collect()
    }

    /// Running peers that completed a step in their current session.
    pub fn steppers(&self) -> Vec<usize> {
        (0..self.peers.len())
            .filter(|&i| self.peers[i].state == PeerState::Running && self.peers[i].stepped)
            .collect()
    }

    /// Peers not gone.
    pub fn alive(&self) -> usize {
        self.peers
            .iter()
            .filter(|p| p.state != PeerState::Gone)
            .count()
    }

    /// Waits up to `timeout` for output, handles everything that arrived,
    /// and runs the periodic checks.
    pub fn poll(&mut self, timeout: Duration) -> Vec<Event> {
        let mut out = Vec::new();
        if let Some(ev) = self.procs.next(timeout) {
            self.handle(ev, &mut out);
            while let Some(ev) = self.procs.try_next() {
                self.handle(ev, &mut out);
            }
        }
        self.check(&mut out);
        out
    }

    fn peer_of(&self, proc_id: usize) -> Option<usize> {
        self.peers.iter().position(|p| p.proc_id == proc_id)
    }

    fn handle(&mut self, ev: ProcEvent, out: &mut Vec<Event>) {
        let Some(peer) = self.peer_of(ev.id()) else {
            return;
        };
        match ev {
            ProcEvent::Line {
                stream: Stream::Stderr,
                line,
                ..
            } => {
                let p = &mut self.peers[peer];
                if let Some(f) = p.log.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                p.stderr_tail.push_back(line);
                if p.stderr_tail.len() > 40 {
                    p.stderr_tail.pop_front();
                }
            }
            ProcEvent::Line {
                stream: Stream::Stdout,
                line,
                at,
                ..
            } => match Record::parse(&line) {
                Ok(Some(rec)) => {
                    self.peers[peer].last_line = Some((at, line));
                    self.on_record(peer, rec, at, out)
                }
                Ok(None) => {}
                Err(e) => {
                    self.stats.bad_lines += 1;
                    out.push(Event::BadLine {
                        peer,
                        err: e.to_string(),
                    });
                }
            },
            ProcEvent::Eof {
                stream: Stream::Stdout,
                ..
            } => self.peers[peer].stdout_eof = true,
            ProcEvent::Eof { .. } => {}
        }
    }

    fn on_record(&mut self, peer: usize, rec: Record, at: Instant, out: &mut Vec<Event>) {
        let name = self.peers[peer].name.clone();
        match rec {
            Record::Hello { .. } => {}
            Record::Begin { step, op, .. } => out.push(Event::Begin { peer, step, op }),
            Record::Joined {
                peer: id,
                session,
                world,
                connect_ms,
            } => {
                self.stats.joins += 1;
                let p = &mut self.peers[peer];
                p.ids.push(id.clone());
                p.peer_id = Some(id);
                p.stepped = false;
                if p.state == PeerState::Starting {
                    self.set_state(peer, PeerState::Running);
                }
                out.push(Event::Joined {
                    peer,
                    session,
                    world,
                    connect_ms,
                });
            }
            Record::Step(s) => {
                self.stats.ops += 1;
                self.stats.bytes_reduced += s.bytes;
                self.stats.sync_rx_bytes += s.sync_rx;
                self.stats.max_world = self.stats.max_world.max(s.world);
                self.progress_at = self.progress_at.max(at);
                self.hang_reported = false;
                self.last_world = s.world;
                self.max_step = self.max_step.max(s.step);
                let p = &mut self.peers[peer];
                p.stepped = true;
                p.steps += 1;
                p.last_step = Some(s.step);
                if let Some(m) = self.audit.record(s.step, s.state_hash, &name) {
                    self.stats.mismatches += 1;
                    out.push(Event::Mismatch(m));
                }
                if let (Some(_), Some(hash)) = (self.cfg.quant_type, s.ar_hash) {
                    if let Some(m) = self.result_audit.record(s.step, hash, &name) {
                        self.stats.result_mismatches += 1;
                        out.push(Event::ResultMismatch(m));
                    }
                }
                if !result_within_contract(self.cfg.quant_type, &s) {
                    self.stats.inexact += 1;
                    out.push(Event::Inexact { peer, step: s.step });
                }
                // A frozen peer is evicted once survivors finish a later step
                // without it; a thawed one that steps on was not.
                let mut evicted = Vec::new();
                self.evict_watch.retain(|w| {
                    if w.peer == peer {
                        !w.thawed
                    } else if s.step > w.step_before && s.world < w.world_before {
                        evicted.push((w.peer, w.at.elapsed().as_millis() as u64, s.world, true));
                        false
                    } else {
                        true
                    }
                });
                self.note_evictions(evicted, out);
                let agg = self.aggs.entry(s.step).or_insert_with(|| StepAgg {
                    first_at: at,
                    world: 0,
                    reporters: 0,
                    hash: s.state_hash,
                    agree: true,
                    ar_ms: 0.0,
                    busbw: 0.0,
                    bytes: s.bytes,
                    sync_rx: 0,
                    retries: 0,
                });
                agg.world = agg.world.max(s.world);
                agg.reporters += 1;
                agg.agree &= agg.hash == s.state_hash;
                if s.ar_ms >= agg.ar_ms {
                    agg.ar_ms = s.ar_ms;
                    agg.busbw = s.busbw;
                }
                agg.sync_rx += s.sync_rx;
                agg.retries = agg.retries.max(s.retries);
                out.push(Event::Step { peer, rec: s });
            }
            Record::Retry(r) => {
                self.stats.retries += 1;
                self.stats.max_retry_wait_ms = self.stats.max_retry_wait_ms.max(r.wait_ms);
                out.push(Event::Retry { peer, rec: r });
            }
            Record::Skip { step, .. } => {
                self.stats.skips += 1;
                out.push(Event::Skip { peer, step });
            }
            Record::Rejoin { reason, msg } => {
                self.stats.rejoins += 1;
                // A thawed peer that lost the master was evicted while frozen.
                let mut evicted = Vec::new();
                let world = self.last_world;
                self.evict_watch.retain(|w| {
                    if w.peer == peer && reason.contains("MasterConnectionFailed") {
                        evicted.push((w.peer, w.at.elapsed().as_millis() as u64, world, false));
                        false
                    } else {
                        w.peer != peer
                    }
                });
                self.note_evictions(evicted, out);
                if self.peers[peer].state == PeerState::Running {
                    self.set_state(peer, PeerState::Starting);
                }
                self.peers[peer].stepped = false;
                out.push(Event::Rejoin { peer, reason, msg });
            }
            Record::Err { op, err, msg } => {
                self.stats.op_errors += 1;
                out.push(Event::OpError { peer, op, err, msg });
            }
            Record::Bye { steps } => {
                out.push(Event::Left { peer, steps });
            }
            Record::Done { .. } => {}
            Record::Fatal { msg } => {
                self.stats.fatals += 1;
                out.push(Event::Fatal { peer, msg });
            }
        }
    }

    /// Counts evictions: (peer, ms since SIGSTOP, world, whether the time is
    /// the survivors' — not when a thawed peer noticed it had been evicted).
    fn note_evictions(&mut self, evicted: Vec<(usize, u64, u32, bool)>, out: &mut Vec<Event>) {
        for (peer, ms, world, timed) in evicted {
            self.stats.evictions += 1;
            if timed {
                self.stats.max_eviction_ms = self.stats.max_eviction_ms.max(ms);
            }
            out.push(Event::Evicted {
                peer,
                after_ms: ms,
                world,
            });
        }
    }

    /// Exits, step aggregation, hang/slow-join/stuck-leave checks.
    fn check(&mut self, out: &mut Vec<Event>) {
        let now = Instant::now();
        // Exits of peers that were not killed by us.
        for peer in 0..self.peers.len() {
            let p = &self.peers[peer];
            if p.state == PeerState::Gone || p.killed {
                continue;
            }
            let id = p.proc_id;
            let Some(status) = self.procs.try_wait(id) else {
                continue;
            };
            // Drain what the child printed before it went.
            while let Some(ev) = self.procs.try_next() {
                self.handle(ev, out);
            }
            let was = self.peers[peer].state;
            let expected = was == PeerState::Leaving && status.success();
            if was == PeerState::Leaving && status.success() {
                self.stats.graceful_leaves += 1;
            } else {
                self.stats.crashes += 1;
            }
            let status = describe_status(&status);
            self.peers[peer].exit = Some(status.clone());
            self.set_state(peer, PeerState::Gone);
            self.evict_watch.retain(|w| w.peer != peer);
            out.push(Event::Exited {
                peer,
                status,
                expected,
            });
        }

        // Steps every reporter has reported, or stale ones.
        let done: Vec<u64> = self
            .aggs
            .iter()
            .filter(|(step, a)| {
                a.reporters as u32 >= a.world
                    || **step + 2 <= self.max_step
                    || now.duration_since(a.first_at) > Duration::from_secs(5)
            })
            .map(|(s, _)| *s)
            .collect();
        for step in done {
            if let Some(a) = self.aggs.remove(&step) {
                out.push(Event::StepDone(StepSummary {
                    step,
                    world: a.world,
                    reporters: a.reporters,
                    hash: a.hash,
                    agree: a.agree,
                    ar_ms: a.ar_ms,
                    busbw: a.busbw,
                    bytes: a.bytes,
                    sync_rx: a.sync_rx,
                    retries: a.retries,
                }));
            }
        }

        // Hang: no STEP while at least two joined peers run.
        let live = self
            .peers
            .iter()
            .filter(|p| p.state == PeerState::Running)
            .count()
            >= 2;
        if live && !self.was_live {
            self.progress_at = now;
        }
        self.was_live = live;
        if live {
            let gap = now.duration_since(self.progress_at);
            self.stats.longest_gap_ms = self.stats.longest_gap_ms.max(gap.as_millis() as u64);
            if gap > self.cfg.hang_bound && !self.hang_reported {
                self.hang_reported = true;
                self.stats.hangs += 1;
                out.push(Event::Hang {
                    silent_ms: gap.as_millis() as u64,
                });
            }
        }
        let bound = self.cfg.hang_bound;
        for peer in 0..self.peers.len() {
            let p = &mut self.peers[peer];
            let waited = now.duration_since(p.since);
            if waited <= bound {
                continue;
            }
            let ms = waited.as_millis() as u64;
            match p.state {
                PeerState::Starting => {
                    // Report once per state entry.
                    p.since = now;
                    self.stats.slow_joins += 1;
                    out.push(Event::SlowJoin {
                        peer,
                        waited_ms: ms,
                    });
                }
                PeerState::Leaving => {
                    p.since = now;
                    self.stats.stuck_leaves += 1;
                    out.push(Event::StuckLeave {
                        peer,
                        waited_ms: ms,
                    });
                }
                _ => {}
            }
        }
    }

    /// Ends the run: stopped peers are killed, the others asked to leave
    /// gracefully; whatever is left after `grace` is killed. Returns the
    /// events of the wind-down.
    pub fn shutdown(&mut self, grace: Duration) -> Vec<Event> {
        let mut out = Vec::new();
        for peer in self.in_state(PeerState::Stopped) {
            if let Ok(ev) = self.kill(peer) {
                out.extend(ev);
            }
        }
        for peer in 0..self.peers.len() {
            if matches!(
                self.peers[peer].state,
                PeerState::Running | PeerState::Starting
            ) {
                if let Ok(ev) = self.terminate(peer) {
                    out.extend(ev);
                }
            }
        }
        let deadline = Instant::now() + grace;
        while self.alive() > 0 && Instant::now() < deadline {
            out.extend(self.poll(Duration::from_millis(50)));
        }
        for peer in 0..self.peers.len() {
            if self.peers[peer].state != PeerState::Gone {
                if self.peers[peer].state == PeerState::Leaving {
                    self.stats.stuck_leaves += 1;
                    out.push(Event::StuckLeave {
                        peer,
                        waited_ms: grace.as_millis() as u64,
                    });
                }
                if let Ok(ev) = self.kill(peer) {
                    out.extend(ev);
                }
            }
        }
        out.extend(self.poll(Duration::from_millis(10)));
        self.master.interrupt();
        out
    }

    /// The last stderr lines of a peer (for failure reports).
    pub fn stderr_tail(&self, peer: usize) -> String {
        self.peers
            .get(peer)
            .map(|p| p.stderr_tail.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// Where every peer not gone is: state and last line, with its age
    /// (with `--trace`, the collective each one waits in).
    pub fn whereabouts(&self) -> String {
        let mut s = String::new();
        for p in self.peers.iter().filter(|p| p.state != PeerState::Gone) {
            let last = p.last_line.as_ref().map_or("-".to_string(), |(at, l)| {
                format!("{l}  ({} ms ago)", at.elapsed().as_millis())
            });
            s.push_str(&format!(
                "    {} {:?} peer {}: {last}\n",
                p.name,
                p.state,
                p.peer_id.as_deref().unwrap_or("?")
            ));
        }
        s
    }

    pub fn name(&self, peer: usize) -> &str {
        self.peers.get(peer).map_or("?", |p| p.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(world: u32, exact: bool, ar: Option<(u64, f64)>) -> StepRec {
        StepRec {
            step: 7,
            world,
            local: 1,
            retries: 0,
            wait_ms: 0,
            state_hash: 1,
            allreduce_exact: exact,
            sync_rx: 0,
            sync_ms: 0.0,
            ar_ms: 1.0,
            bytes: 4,
            busbw: 0.0,
            ar_hash: ar.map(|a| a.0),
            coll: None,
            ar_err: ar.map(|a| a.1),
        }
    }

    #[test]
    fn results_are_held_to_the_runs_contract() {
        // Exact runs: the worker's own exactness check decides.
        assert!(result_within_contract(None, &step(3, true, None)));
        assert!(!result_within_contract(None, &step(3, false, None)));
        // Quantized runs: within the bound for the step's world, and reported.
        let u8 = Some(DataType::U8);
        let b3 = quantized_sum_bound(3, DataType::U8);
        assert!(result_within_contract(u8, &step(3, false, Some((9, b3)))));
        assert!(!result_within_contract(
            u8,
            &step(3, false, Some((9, b3 * 1.001)))
        ));
        assert!(!result_within_contract(u8, &step(3, true, None)));
        // The bound grows with the world and shrinks with wider codes.
        assert!(quantized_sum_bound(4, DataType::U8) > b3);
        assert!(quantized_sum_bound(3, DataType::U16) < b3 / 100.0);
        // ... and is a few 8-bit steps of the final range, not a loose constant.
        for w in 2..=4u32 {
            let per_hop: f64 = (1..=w).map(|k| 6.0 * f64::from(k) / 510.0).sum();
            let b = quantized_sum_bound(w, DataType::U8);
            assert!(
                b >= per_hop && b < 1.01 * per_hop,
                "w {w}: {b} vs {per_hop}"
            );
        }
    }
}
