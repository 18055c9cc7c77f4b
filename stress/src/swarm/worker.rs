//! The canonical fault-tolerant loop of one peer, as `pccl-worker` and the
//! swarm demo's peers run it:
//!
//! 1. connect to the master (retrying while it is unreachable, up to
//!    `--connect-timeout-s`); the call returns once the accepted peers admit us;
//! 2. each step: `are_peers_pending` → `update_topology` when someone waits
//!    (skipped on the first pass after admission: the peers that admitted us
//!    are just returning from `update_topology`, so our next collective must
//!    be theirs, not `are_peers_pending`); with fewer than two peers (or,
//!    before the first step, fewer than `--min-world`) sleep briefly and loop;
//! 3. `sync_shared_state` with revision `last + 1` (a peer's first sync is
//!    *receive only*, so a newcomer adopts the group's state and revision
//!    instead of out-voting a lone survivor; when nobody holds state yet,
//!    e.g. the founding peers, it falls back to *enforce popular*);
//! 4. all-reduce (sum, in place) of a gradient-like buffer that is a
//!    deterministic function of the step, retried after
//!    `RankConnectionLost`/`RankConnectionFailed`; the result must equal
//!    `world × contribution` exactly, which the worker checks itself
//!    (with `--quant` the all-reduce is quantized and the worker reports
//!    the hash of the result and its largest error instead);
//! 5. a deterministic state update from the reduced buffer
//!    (`w[k] += sum[k mod n] / world · 1e-3`), identical on every peer.
//!
//! With `--collective broadcast|all-gather|reduce-scatter` step 4 runs that
//! collective instead (see [`CollectiveArg`]): every peer contributes
//! `mark + grad_value(step, k)`, where `mark` is a small positive integer of
//! its own (from its pid), so the result says whose bytes it holds, and the
//! worker checks it exactly (`allreduce_exact`), prints its hash (`ar_hash`)
//! and the marks it found (`coll=... rank=... marks=...`, see
//! [`lines`](super::lines)). Buffers are sized for the group's world at each
//! attempt; a failed attempt (`RankConnectionLost`/`RankConnectionFailed`,
//! which is also how the core reports a group that changed size between the
//! call and the op) is retried with the survivors, like the all-reduce.
//! The state update of those steps uses `grad_value` alone (a
//! reduce-scatter's segments differ between peers).
//!
//! One [`lines`](super::lines) record per event goes to stdout, flushed at
//! once. Recovery rules:
//!
//! - all-reduce failed with a lost rank: every survivor gets the same error
//!   from the master, restores its buffer and retries with the survivors
//!   (`RETRY` line with the time the failed attempt took); `TooFewPeers` skips
//!   the step's update (`SKIP`). With `PCCL_IN_PLACE_RESTORE=0` an op that
//!   had begun writing its buffer fails with `InPlaceInputLost` instead: the
//!   worker refills the gradient and retries the same way;
//! - the master connection is gone (e.g. this peer was frozen and evicted),
//!   or this peer's own sync failed (a receiver whose sources all died: the
//!   other peers' syncs succeeded and they moved on to the all-reduce, so
//!   retrying the sync would leave this peer in a different collective than
//!   theirs): drop the communicator and join again as a newcomer (`REJOIN`);
//! - update topology failed on every peer alike: log `ERR` and loop;
//! - anything else is unrecoverable: `FATAL` and a non-zero exit.
//!
//! With `--graceful-signals`, SIGTERM/SIGINT set a flag checked between
//! steps: the worker closes its communicator (a graceful leave the others
//! do not notice as an error), prints `BYE` and exits 0.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pccl_core::{
    Algorithm, CollectiveInfo, Communicator, CommunicatorConfig, DataType, Error as PcclError,
    QuantizationAlgorithm, QuantizationOptions, ReduceBuffers, ReduceDescriptor, ReduceOp,
    SharedState, SharedTensor, SyncStrategy,
};

use super::lines::{CollRec, Record, RetryRec, StepRec};
use super::{Error, Result};

/// Options of one worker (flattened into `pccl-worker` and the demo's peer role).
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Address of the master, e.g. 127.0.0.1:48148.
    #[arg(long)]
    pub master: SocketAddr,
    /// Peer group to join.
    #[arg(long, default_value_t = 0)]
    pub group: u32,
    /// Connections per ring neighbour (also the parallelism of shared-state fetches).
    #[arg(long, default_value_t = 1)]
    pub pool: u32,
    /// f32 elements all-reduced per step.
    #[arg(long, default_value_t = 1 << 20)]
    pub elems: usize,
    /// Size of the shared state in MiB (a large tensor plus a small one).
    #[arg(long, default_value_t = 4.0)]
    pub state_mib: f64,
    /// Steps to run before exiting 0 (0 = forever).
    #[arg(long, default_value_t = 0)]
    pub steps: u64,
    /// Do not take the first step before the group holds this many peers.
    #[arg(long, default_value_t = 2)]
    pub min_world: u32,
    /// Pause after each step (emulates compute).
    #[arg(long, default_value_t = 0)]
    pub step_sleep_ms: u64,
    /// Log filter for pccl-core's logs on stderr (e.g. `info`); default: `PCCL_LOG` or `warn`.
    #[arg(long)]
    pub log: Option<String>,
    /// Local address the peer's listeners bind to.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub bind_ip: IpAddr,
    /// Give up connecting after this long while the master is unreachable.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout_s: u64,
    /// SIGTERM/SIGINT: close the communicator between steps and exit 0.
    #[arg(long)]
    pub graceful_signals: bool,
    /// Exit (code 3) when stdin reaches EOF, so a peer never outlives the
    /// harness that spawned it with a piped stdin.
    #[arg(long)]
    pub exit_on_stdin_eof: bool,
    /// After losing the master connection or a failed own sync, join again
    /// as a newcomer instead of exiting non-zero.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub rejoin: bool,
    /// Failed attempts of one all-reduce before the worker rejoins.
    #[arg(long, default_value_t = 20)]
    pub max_retries: u32,
    /// Also print a `BEGIN` line right before each collective call
    /// (are_peers_pending, update_topology, sync, each all-reduce attempt):
    /// lets a test aim a kill at a running operation, and shows where a
    /// stuck peer waits.
    #[arg(long)]
    pub trace: bool,
    /// After a failed all-reduce, check that the in-place buffer was
    /// restored (costs a pass over the buffer before the retry).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub check_restore: bool,
    /// Quantize the all-reduce: `none` (default: exact f32 sum), `minmax`
    /// or `zps` (zero point / scale). A quantized step's STEP line also
    /// carries `ar_hash` (hash of the reduced buffer, equal on every peer)
    /// and `ar_err` (largest |result − world × contribution|);
    /// `allreduce_exact` keeps its meaning (usually 0 when quantized).
    #[arg(long, default_value = "none", value_parser = parse_quant_algo)]
    pub quant: QuantizationAlgorithm,
    /// Quantized data type with `--quant`: u8, i8, u16 or i16.
    #[arg(long, default_value = "u8", value_parser = parse_quant_type)]
    pub quant_type: DataType,
    /// Split the step's all-reduce into this many in-place tensors of
    /// `--elems / tensors` elements (the last may be shorter), reduced
    /// together by `all_reduce_multiple_with_retry` with all of them in
    /// flight (PCCL 1.0's training shape). Retries happen inside that call,
    /// so no `RETRY` lines; each tensor is checked to equal
    /// `w × contribution` exactly for one world size `w` of the step (a
    /// tensor that completed before a peer died keeps the larger world).
    /// 1 (default): one `all_reduce_in_place` with the worker's own retries.
    #[arg(long, default_value_t = 1)]
    pub tensors: usize,
    /// Threads of CPU-saturating compute running beside the loop for the
    /// whole life of the process (liveness under load, docs/reliability.md).
    #[arg(long, default_value_t = 0)]
    pub busy_threads: usize,
    /// The collective of each step: `all-reduce` (default), `broadcast`
    /// (`--elems` f32 from root `step mod 2`), `all-gather` (`--elems` f32
    /// per rank) or `reduce-scatter` (`--elems` f32 per rank's share, sum).
    /// STEP lines then carry `coll=... algo=... rank=... mark=...`.
    #[arg(long, value_enum)]
    pub collective: Option<CollectiveArg>,
    /// The all-reduce algorithm this peer asks the master for: auto (the
    /// master chooses by size), ring or direct. Default: `$PCCL_ALGORITHM`,
    /// else auto. Every peer of the group must ask for the same.
    #[arg(long, value_parser = parse_algorithm)]
    pub algorithm: Option<Algorithm>,
}

/// The collectives a worker step can run (`--collective`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectiveArg {
    AllReduce,
    Broadcast,
    AllGather,
    ReduceScatter,
}

impl CollectiveArg {
    /// The name on the command line and in `coll=` fields.
    pub fn name(self) -> &'static str {
        match self {
            CollectiveArg::AllReduce => "all-reduce",
            CollectiveArg::Broadcast => "broadcast",
            CollectiveArg::AllGather => "all-gather",
            CollectiveArg::ReduceScatter => "reduce-scatter",
        }
    }

    /// The `op=` of its BEGIN and RETRY lines.
    pub fn op(self) -> &'static str {
        match self {
            CollectiveArg::AllReduce => "allreduce",
            CollectiveArg::Broadcast => "broadcast",
            CollectiveArg::AllGather => "allgather",
            CollectiveArg::ReduceScatter => "reducescatter",
        }
    }
}

/// Parses `--algorithm`: auto, ring or direct.
pub fn parse_algorithm(s: &str) -> std::result::Result<Algorithm, String> {
    s.parse().map_err(|e: PcclError| e.to_string())
}

/// The broadcast root of `step`: alternates between ranks 0 and 1, which
/// every group of two or more has. (A root taken modulo the world could
/// differ between survivors right after a failure, while one of them has
/// not yet seen the master's new world size, and peers must agree on it.)
pub fn broadcast_root(step: u64) -> u32 {
    (step % 2) as u32
}

/// The mark of this process: a positive integer below 2^19 from its pid,
/// distinct between the workers a test runs side by side, and small enough
/// that sums of a few marks and gradients stay exact in f32.
pub fn own_mark() -> u32 {
    1 + std::process::id() % (1 << 19)
}

/// Element `k` of the contribution of the peer with `mark` at `step`.
pub fn marked_value(mark: u32, step: u64, k: usize) -> f32 {
    mark as f32 + grad_value(step, k)
}

/// Parses `--quant`: none, minmax or zps.
pub fn parse_quant_algo(s: &str) -> std::result::Result<QuantizationAlgorithm, String> {
    match s {
        "none" => Ok(QuantizationAlgorithm::None),
        "minmax" => Ok(QuantizationAlgorithm::MinMax),
        "zps" | "zeropointscale" => Ok(QuantizationAlgorithm::ZeroPointScale),
        _ => Err(format!("'{s}' is not one of none, minmax, zps")),
    }
}

/// Parses `--quant-type`: u8, i8, u16 or i16.
pub fn parse_quant_type(s: &str) -> std::result::Result<DataType, String> {
    [DataType::U8, DataType::I8, DataType::U16, DataType::I16]
        .into_iter()
        .find(|d| d.name() == s)
        .ok_or_else(|| format!("'{s}' is not one of u8, i8, u16, i16"))
}

/// Elements of the small second tensor of the shared state.
const SMALL_ELEMS: usize = 4096;
/// Rejoins before the worker gives up.
const MAX_REJOINS: u32 = 50;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Routes SIGTERM and SIGINT to a flag ([`stop_requested`]) that the loop
/// checks between steps (harnesses use it too, to wind down on Ctrl-C).
pub fn install_stop_signals() -> Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; the sigaction struct is fully initialized.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(Error(format!(
                "cannot install a handler for signal {sig}: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Whether a graceful stop was requested (SIGTERM/SIGINT with `--graceful-signals`).
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

fn exit_when_stdin_closes() {
    std::thread::spawn(|| {
        let mut sink = [0u8; 256];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut sink) {
                Ok(0) | Err(_) => {
                    eprintln!("pccl-worker: stdin closed (harness gone); exiting");
                    std::process::exit(3);
                }
                Ok(_) => {}
            }
        }
    });
}

/// Prints one record per line on stdout and flushes it. A closed stdout
/// means the harness is gone: exit.
fn emit(r: &Record) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{r}").and_then(|_| out.flush()).is_err() {
        std::process::exit(3);
    }
}

/// The variant name of a pccl error, as printed in `err=` fields.
pub fn err_name(e: &PcclError) -> &'static str {
    match e {
        PcclError::NotInitialized(_) => "NotInitialized",
        PcclError::Internal(_) => "Internal",
        PcclError::InvalidArgument(_) => "InvalidArgument",
        PcclError::InvalidUsage(_) => "InvalidUsage",
        PcclError::TooFewPeers(_) => "TooFewPeers",
        PcclError::MasterConnectionFailed(_) => "MasterConnectionFailed",
        PcclError::RankConnectionFailed(_) => "RankConnectionFailed",
        PcclError::RankConnectionLost(_) => "RankConnectionLost",
        PcclError::InPlaceInputLost(_) => "InPlaceInputLost",
        PcclError::NoSharedStateAvailable(_) => "NoSharedStateAvailable",
        PcclError::PendingAsyncOps(_) => "PendingAsyncOps",
        PcclError::UpdateTopologyFailed(_) => "UpdateTopologyFailed",
        PcclError::TopologyOptimizationFailed(_) => "TopologyOptimizationFailed",
    }
}

/// The gradient every peer contributes at `step`: small integers, so the
/// sum over any number of peers is exact in f32.
pub fn grad_value(step: u64, k: usize) -> f32 {
    (step.wrapping_mul(31).wrapping_add(k as u64) % 7) as f32
}

/// The documented bound (docs/quantization.md, "A bound in terms of the
/// inputs") on |result − exact| of this worker's quantized f32 `Sum` over
/// `world` peers with `quant_type` codes (`u8`/`i8`: qmax 255, 16-bit:
/// 65535). Every peer contributes [`grad_value`], in `0..=6`, so each
/// block's range and magnitude are at most 6, for MinMax and for
/// ZeroPointScale alike (its range includes 0, which these blocks do).
pub fn quantized_sum_bound(world: u32, quant_type: DataType) -> f64 {
    let (r, m) = (6.0, 6.0);
    let qmax = if quant_type.size() == 1 {
        255.0
    } else {
        65535.0
    };
    let eps = f64::from(f32::EPSILON) / 2.0; // 2^-24
    let tau = f64::from(f32::from_bits(1));
    // One quantization round trip of a block of range ≤ rr, magnitude ≤ mm.
    let quant = |rr: f64, mm: f64| rr / (2.0 * qmax) + 8.0 * eps * mm + qmax * tau;
    // Rounding of an f32 sum of magnitude ≤ mm (half an ulp ≤ 2^-24·mm).
    let round = |mm: f64| eps * mm;
    let mut e = 0.0;
    for k in 1..world.max(1) {
        let k = f64::from(k);
        let d = e + quant(k * r + 2.0 * e, k * m + e);
        e = d + round((k + 1.0) * m + d);
    }
    let wf = f64::from(world.max(1));
    e + quant(wf * r + 2.0 * e, wf * m + e)
}

/// The initial content of the large shared tensor (same on every peer).
pub fn initial_weight(k: usize) -> f32 {
    ((k as u32).wrapping_mul(2_654_435_761) >> 20) as f32 * 1e-3
}

/// Elements of the large shared tensor for a state of `mib` MiB.
pub fn state_elems(mib: f64) -> usize {
    let bytes = (mib.max(0.0) * (1 << 20) as f64) as usize;
    (bytes / 4).saturating_sub(SMALL_ELEMS).max(1)
}

/// What one pass of the loop did.
enum Outcome {
    /// Too few peers: nothing happened.
    Waited,
    Stepped,
    /// The sync succeeded but the all-reduce had too few peers.
    Skipped,
}

/// A failed call of the loop.
struct Failure {
    op: &'static str,
    err: PcclError,
}

fn at(op: &'static str) -> impl FnOnce(PcclError) -> Failure {
    move |err| Failure { op, err }
}

/// State of the peer that survives rejoins.
struct Peer {
    w: Vec<f32>,
    small: Vec<f32>,
    grad: Vec<f32>,
    /// The second buffer of an all-gather (receive) or reduce-scatter (send).
    other: Vec<f32>,
    /// This process's mark ([`own_mark`]).
    mark: u32,
    /// Revision of the last successful sync of this session (`None`: the
    /// next sync is this session's first).
    synced: Option<u64>,
    /// Whether this process took a step already (`--min-world` gates only the first).
    started: bool,
    /// Set right after admission: the accepted peers that admitted us are
    /// returning from `update_topology` and go on to the world check, so our
    /// first pass must not start with `are_peers_pending` (a collective they
    /// would not join until their next pass).
    just_admitted: bool,
    local_steps: u64,
}

/// Runs the worker until `--steps` are done (Ok), a graceful stop (Ok) or
/// an unrecoverable error (Err, after a `FATAL` line).
pub fn run(args: &WorkerArgs) -> Result<()> {
    pccl_core::logging::init(args.log.as_deref());
    if args.exit_on_stdin_eof {
        exit_when_stdin_closes();
    }
    if args.graceful_signals {
        install_stop_signals()?;
    }
    let r = run_inner(args);
    if let Err(e) = &r {
        emit(&Record::Fatal { msg: e.0.clone() });
    }
    r
}

fn run_inner(args: &WorkerArgs) -> Result<()> {
    if args.elems == 0 {
        return Err("--elems must be positive".into());
    }
    if args.tensors == 0 || args.tensors > args.elems {
        return Err("--tensors must be between 1 and --elems".into());
    }
    if args.tensors > 1 && args.quant != QuantizationAlgorithm::None {
        return Err("--tensors > 1 supports exact (unquantized) all-reduces only".into());
    }
    if let Some(c) = args.collective.filter(|c| *c != CollectiveArg::AllReduce) {
        if args.quant != QuantizationAlgorithm::None || args.tensors > 1 {
            return Err(format!(
                "--collective {} takes neither --quant nor --tensors",
                c.name()
            )
            .into());
        }
        if args.algorithm == Some(Algorithm::Direct) {
            return Err(format!(
                "--algorithm direct is for all-reduce only, not {}",
                c.name()
            )
            .into());
        }
    }
    crate::hog::spawn_busy_threads(args.busy_threads)
        .map_err(|e| Error(format!("starting --busy-threads: {e}")))?;
    emit(&Record::Hello {
        pid: std::process::id(),
    });
    let n = state_elems(args.state_mib);
    let mut peer = Peer {
        w: (0..n).map(initial_weight).collect(),
        small: vec![0.0; SMALL_ELEMS],
        grad: vec![0.0; args.elems],
        other: Vec::new(),
        mark: own_mark(),
        synced: None,
        started: false,
        just_admitted: false,
        local_steps: 0,
    };
    let mut session = 0u32;
    loop {
        session += 1;
        if session > MAX_REJOINS {
            return Err(Error(format!("gave up after {MAX_REJOINS} rejoins")));
        }
        let t0 = Instant::now();
        let comm = connect(args)?;
        let world = comm.world().map(|w| w.group_world).unwrap_or(0);
        emit(&Record::Joined {
            peer: comm.peer_id().to_string(),
            session,
            world,
            connect_ms: t0.elapsed().as_millis() as u64,
        });
        peer.synced = None;
        peer.just_admitted = true;
        loop {
            if stop_requested() {
                comm.close();
                emit(&Record::Bye {
                    steps: peer.local_steps,
                });
                return Ok(());
            }
            if args.steps > 0 && peer.local_steps >= args.steps {
                comm.close();
                emit(&Record::Done {
                    steps: peer.local_steps,
                });
                return Ok(());
            }
            match step(args, &comm, &mut peer) {
                Ok(Outcome::Waited) => std::thread::sleep(Duration::from_millis(20)),
                Ok(Outcome::Stepped) => {
                    if args.step_sleep_ms > 0 {
                        std::thread::sleep(Duration::from_millis(args.step_sleep_ms));
                    }
                }
                Ok(Outcome::Skipped) => std::thread::sleep(Duration::from_millis(20)),
                Err(f) => {
                    let name = err_name(&f.err);
                    let rejoin = match (&f.err, f.op) {
                        (PcclError::UpdateTopologyFailed(_), _) => {
                            emit(&Record::Err {
                                op: f.op.into(),
                                err: name.into(),
                                msg: f.err.message().into(),
                            });
                            continue;
                        }
                        (PcclError::MasterConnectionFailed(_), _) => true,
                        (
                            PcclError::RankConnectionLost(_)
                            | PcclError::RankConnectionFailed(_)
                            | PcclError::NoSharedStateAvailable(_),
                            "sync" | "allreduce" | "broadcast" | "allgather" | "reducescatter",
                        ) => true,
                        _ => false,
                    };
                    if !(rejoin && args.rejoin) {
                        return Err(Error(format!("{} failed: {}", f.op, f.err)));
                    }
                    emit(&Record::Rejoin {
                        reason: format!("{}:{name}", f.op),
                        msg: f.err.message().into(),
                    });
                    break;
                }
            }
        }
        drop(comm);
    }
}

/// Connects, retrying while the master is unreachable (or admission failed)
/// until the deadline.
fn connect(args: &WorkerArgs) -> Result<Communicator> {
    let deadline = Instant::now() + Duration::from_secs(args.connect_timeout_s);
    loop {
        let mut cfg = CommunicatorConfig::new(args.master).with_ephemeral_ports();
        cfg.bind_ip = args.bind_ip;
        cfg.peer_group = args.group;
        cfg.p2p_connection_pool_size = args.pool.max(1);
        cfg.connect_timeout = Duration::from_secs(5);
        if let Some(a) = args.algorithm {
            cfg.algorithm = a;
        }
        let comm =
            Communicator::new(cfg).map_err(|e| Error(format!("creating a communicator: {e}")))?;
        match comm.connect() {
            Ok(()) => return Ok(comm),
            Err(
                e @ (PcclError::MasterConnectionFailed(_) | PcclError::UpdateTopologyFailed(_)),
            ) if Instant::now() < deadline => {
                tracing::debug!("connect failed ({e}); retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => {
                return Err(Error(format!(
                    "connecting to the master at {}: {e}",
                    args.master
                )))
            }
        }
    }
}

fn step(
    args: &WorkerArgs,
    comm: &Communicator,
    peer: &mut Peer,
) -> std::result::Result<Outcome, Failure> {
    let trace = |op: &str| {
        if args.trace {
            emit(&Record::Begin {
                step: peer.synced.map_or(0, |r| r + 1),
                op: op.into(),
                attempt: 1,
            });
        }
    };
    if std::mem::take(&mut peer.just_admitted) {
        // Same position in the loop as the peers that just admitted us.
    } else {
        trace("are_peers_pending");
        if comm.are_peers_pending().map_err(at("are_peers_pending"))? {
            trace("update_topology");
            comm.update_topology().map_err(at("update_topology"))?;
        }
    }
    let world = comm.world().map_err(at("world"))?.group_world;
    let need = if peer.started {
        2
    } else {
        args.min_world.max(2)
    };
    if world < need {
        return Ok(Outcome::Waited);
    }

    // Shared state: a newcomer's first sync receives, later ones vote.
    let t_sync = Instant::now();
    let (step, sync_rx, state_hash) = {
        let first = peer.synced.is_none();
        let mut st = SharedState::new(
            peer.synced.map_or(0, |r| r + 1),
            vec![
                SharedTensor::new("w", &mut peer.w),
                SharedTensor::new("small", &mut peer.small),
            ],
        );
        if args.trace {
            emit(&Record::Begin {
                step: st.revision,
                op: "sync".into(),
                attempt: 1,
            });
        }
        let strategy = if first {
            SyncStrategy::ReceiveOnly
        } else {
            SyncStrategy::EnforcePopular
        };
        let info = match comm.sync_shared_state(&mut st, strategy) {
            Err(PcclError::NoSharedStateAvailable(_)) if first => {
                // Nobody holds state yet (founding peers): everyone offers its own.
                comm.sync_shared_state(&mut st, SyncStrategy::EnforcePopular)
            }
            r => r,
        }
        .map_err(at("sync"))?;
        let slices: Vec<&[u8]> = st.tensors.iter().map(|t| t.bytes()).collect();
        (st.revision, info.rx_bytes, state_hash_of(&slices))
    };
    peer.synced = Some(step);
    let sync_ms = t_sync.elapsed().as_secs_f64() * 1e3;

    // All-reduce with retry.
    let fill = |g: &mut [f32]| {
        for (k, x) in g.iter_mut().enumerate() {
            *x = grad_value(step, k);
        }
    };
    fill(&mut peer.grad);
    let mut desc = ReduceDescriptor::new(args.elems, DataType::F32, ReduceOp::Sum);
    if args.quant != QuantizationAlgorithm::None {
        desc = desc.with_quantization(QuantizationOptions {
            quantized_datatype: args.quant_type,
            algorithm: args.quant,
        });
    }
    if args.tensors > 1 {
        return multi_allreduce_step(args, comm, peer, step, world, sync_rx, sync_ms, state_hash);
    }
    if let Some(c) = args.collective.filter(|c| *c != CollectiveArg::AllReduce) {
        return collective_step(args, c, comm, peer, step, sync_rx, sync_ms, state_hash);
    }
    let mut retries = 0u32;
    let mut wait_ms = 0u64;
    let (info, ar_ms) = loop {
        if args.trace {
            emit(&Record::Begin {
                step,
                op: "allreduce".into(),
                attempt: retries + 1,
            });
        }
        let t0 = Instant::now();
        match all_reduce_in_place(comm, &mut peer.grad, &desc) {
            Ok(info) => break (info, t0.elapsed().as_secs_f64() * 1e3),
            // InPlaceInputLost (restore off, `PCCL_IN_PLACE_RESTORE=0`): the
            // gradient is recomputed (refilled) before the retry.
            Err(
                e @ (PcclError::RankConnectionLost(_)
                | PcclError::RankConnectionFailed(_)
                | PcclError::InPlaceInputLost(_)),
            ) => {
                let ms = t0.elapsed().as_millis() as u64;
                wait_ms += ms;
                retries += 1;
                let restored = !args.check_restore
                    || peer
                        .grad
                        .iter()
                        .enumerate()
                        .all(|(k, x)| x.to_bits() == grad_value(step, k).to_bits());
                emit(&Record::Retry(RetryRec {
                    step,
                    op: "allreduce".into(),
                    err: err_name(&e).into(),
                    wait_ms: ms,
                    attempt: retries,
                    restored,
                }));
                if !restored {
                    fill(&mut peer.grad);
                }
                if retries >= args.max_retries {
                    return Err(Failure {
                        op: "allreduce",
                        err: e,
                    });
                }
            }
            Err(PcclError::TooFewPeers(_)) => {
                emit(&Record::Skip {
                    step,
                    reason: "TooFewPeers".into(),
                });
                return Ok(Outcome::Skipped);
            }
            Err(e) => {
                return Err(Failure {
                    op: "allreduce",
                    err: e,
                })
            }
        }
    };
    let world = info.world_size.max(1);
    let wf = world as f32;
    let exact = peer
        .grad
        .iter()
        .enumerate()
        .all(|(k, x)| *x == wf * grad_value(step, k));
    let (ar_hash, ar_err) = if args.quant != QuantizationAlgorithm::None {
        let err = peer
            .grad
            .iter()
            .enumerate()
            .map(|(k, x)| (*x as f64 - wf as f64 * grad_value(step, k) as f64).abs())
            .fold(0.0, f64::max);
        (Some(hash_f32(&peer.grad)), Some(err))
    } else {
        (Some(hash_f32(&peer.grad)), None)
    };

    // Deterministic update, identical on every peer.
    let n = peer.grad.len();
    for (k, x) in peer.w.iter_mut().enumerate() {
        *x += peer.grad[k % n] / wf * 1e-3;
    }
    for (k, x) in peer.small.iter_mut().enumerate() {
        *x = 0.9 * *x + peer.grad[k % n] / wf;
    }
    peer.started = true;
    peer.local_steps += 1;
    let bytes = (args.elems * 4) as u64;
    let busbw = if ar_ms > 0.0 && world > 1 {
        2.0 * (world as f64 - 1.0) / world as f64 * bytes as f64 / (ar_ms / 1e3) / 1e9
    } else {
        0.0
    };
    emit(&Record::Step(StepRec {
        step,
        world,
        local: peer.local_steps,
        retries,
        wait_ms,
        state_hash,
        allreduce_exact: exact,
        sync_rx,
        sync_ms,
        ar_ms,
        bytes,
        busbw,
        ar_hash,
        ar_err,
        coll: args.collective.map(|c| CollRec {
            kind: c.name().into(),
            algo: info.algorithm.name().into(),
            rank: info.rank,
            mark: peer.mark,
            root: None,
            marks: Vec::new(),
            mark_sum: None,
        }),
    }));
    Ok(Outcome::Stepped)
}

/// In-place all-reduce of `data` (restored on failure), returning the
/// collective's info (rank, the algorithm the master chose).
fn all_reduce_in_place(
    comm: &Communicator,
    data: &mut [f32],
    desc: &ReduceDescriptor,
) -> std::result::Result<CollectiveInfo, PcclError> {
    if desc.count != data.len() || desc.datatype != DataType::F32 {
        return Err(PcclError::InvalidArgument(format!(
            "descriptor of {} {} for a buffer of {} f32",
            desc.count,
            desc.datatype.name(),
            data.len()
        )));
    }
    let p = data.as_mut_ptr() as *mut u8;
    // SAFETY: `data` is valid for `count` f32 and exclusively ours until the
    // handle is awaited just below; send == recv is the in-place form.
    let h = unsafe { comm.all_reduce_async_raw(p, p, desc) }?;
    comm.await_collective(h)
}

/// The hash of an f32 buffer's bytes.
fn hash_f32(v: &[f32]) -> u64 {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    pccl_core::hash::tensor_hash(&bytes)
}

/// The mark a segment of `share` elements carries when element `j` must be
/// `mark + scale · grad_value(step, base + j)`; `None` unless every element
/// agrees and the mark is a positive integer.
fn segment_mark(seg: &[f32], step: u64, base: usize, scale: f32) -> Option<u64> {
    let first = *seg.first()?;
    let m = first - scale * grad_value(step, base);
    let ok = m >= 1.0
        && m.fract() == 0.0
        && seg
            .iter()
            .enumerate()
            .all(|(j, x)| *x == m + scale * grad_value(step, base + j));
    ok.then_some(m as u64)
}

/// Step 4 with a broadcast, all-gather or reduce-scatter: sized for the
/// group's world at each attempt, retried with the survivors, the result
/// checked exactly from the marks it carries.
#[allow(clippy::too_many_arguments)]
fn collective_step(
    args: &WorkerArgs,
    kind: CollectiveArg,
    comm: &Communicator,
    peer: &mut Peer,
    step: u64,
    sync_rx: u64,
    sync_ms: f64,
    state_hash: u64,
) -> std::result::Result<Outcome, Failure> {
    let op = kind.op();
    let share = args.elems;
    let mark = peer.mark;
    let root = broadcast_root(step);
    let mut retries = 0u32;
    let mut wait_ms = 0u64;
    let (info, ms) = loop {
        let world = comm.world().map_err(at("world"))?.group_world as usize;
        if world < 2 {
            emit(&Record::Skip {
                step,
                reason: "TooFewPeers".into(),
            });
            return Ok(Outcome::Skipped);
        }
        match kind {
            CollectiveArg::Broadcast | CollectiveArg::AllGather => {
                for (k, x) in peer.grad.iter_mut().enumerate() {
                    *x = marked_value(mark, step, k);
                }
                if kind == CollectiveArg::AllGather {
                    peer.other.clear();
                    peer.other.resize(world * share, -1.0);
                }
            }
            _ => {
                peer.other.clear();
                peer.other
                    .extend((0..world * share).map(|k| marked_value(mark, step, k)));
                peer.grad.iter_mut().for_each(|x| *x = -1.0);
            }
        }
        if args.trace {
            emit(&Record::Begin {
                step,
                op: op.into(),
                attempt: retries + 1,
            });
        }
        let t0 = Instant::now();
        let tag = step;
        let r = match kind {
            CollectiveArg::Broadcast => comm.broadcast(&mut peer.grad, root, tag),
            CollectiveArg::AllGather => comm.all_gather(&peer.grad, &mut peer.other, tag),
            _ => comm.reduce_scatter(
                &peer.other,
                &mut peer.grad,
                &ReduceDescriptor::new(share, DataType::F32, ReduceOp::Sum).with_tag(tag),
            ),
        };
        match r {
            Ok(info) => break (info, t0.elapsed().as_secs_f64() * 1e3),
            Err(e @ (PcclError::RankConnectionLost(_) | PcclError::RankConnectionFailed(_))) => {
                let ms = t0.elapsed().as_millis() as u64;
                wait_ms += ms;
                retries += 1;
                // Whether the input is intact: the send buffer of an
                // all-gather or reduce-scatter must be; a broadcast's
                // non-root buffers may be partly overwritten.
                let restored = match kind {
                    CollectiveArg::ReduceScatter => peer
                        .other
                        .iter()
                        .enumerate()
                        .all(|(k, x)| x.to_bits() == marked_value(mark, step, k).to_bits()),
                    _ => peer
                        .grad
                        .iter()
                        .enumerate()
                        .all(|(k, x)| x.to_bits() == marked_value(mark, step, k).to_bits()),
                };
                emit(&Record::Retry(RetryRec {
                    step,
                    op: op.into(),
                    err: err_name(&e).into(),
                    wait_ms: ms,
                    attempt: retries,
                    restored,
                }));
                if retries >= args.max_retries {
                    return Err(Failure { op, err: e });
                }
            }
            Err(PcclError::TooFewPeers(_)) => {
                emit(&Record::Skip {
                    step,
                    reason: "TooFewPeers".into(),
                });
                return Ok(Outcome::Skipped);
            }
            Err(e) => return Err(Failure { op, err: e }),
        }
    };
    let world = info.world_size.max(1);
    let w = world as usize;
    let rank = info.rank as usize;
    let mut coll = CollRec {
        kind: kind.name().into(),
        algo: info.algorithm.name().into(),
        rank: info.rank,
        mark,
        root: None,
        marks: Vec::new(),
        mark_sum: None,
    };
    let (exact, hash, bytes, factor) = match kind {
        CollectiveArg::Broadcast => {
            coll.root = Some(root);
            let src = segment_mark(&peer.grad, step, 0, 1.0);
            coll.marks = src.map(|m| m as u32).into_iter().collect();
            // The root's buffer is its own input; everyone holds the root's.
            // (Marks differ between peers: only the root may find its own.)
            let exact = src.is_some() && (rank == root as usize) == (src == Some(mark as u64));
            (exact, hash_f32(&peer.grad), share * 4, 1.0)
        }
        CollectiveArg::AllGather => {
            let marks: Vec<Option<u64>> = if peer.other.len() == w * share {
                peer.other
                    .chunks(share)
                    .map(|seg| segment_mark(seg, step, 0, 1.0))
                    .collect()
            } else {
                vec![None]
            };
            let distinct = marks
                .iter()
                .enumerate()
                .all(|(i, m)| !marks[..i].contains(m));
            let exact = distinct
                && marks.iter().all(Option::is_some)
                && marks.get(rank).copied().flatten() == Some(mark as u64);
            coll.marks = marks.iter().map(|m| m.unwrap_or(0) as u32).collect();
            let f = (world as f64 - 1.0) / world as f64;
            (exact, hash_f32(&peer.other), w * share * 4, f)
        }
        _ => {
            let sum = segment_mark(&peer.grad, step, rank * share, world as f32);
            coll.mark_sum = sum;
            let exact = sum.is_some_and(|m| m >= mark as u64);
            let f = (world as f64 - 1.0) / world as f64;
            (exact, hash_f32(&peer.grad), w * share * 4, f)
        }
    };
    // Deterministic update, identical on every peer.
    let n = share.max(1);
    for (k, x) in peer.w.iter_mut().enumerate() {
        *x += grad_value(step, k % n) * 1e-3;
    }
    for (k, x) in peer.small.iter_mut().enumerate() {
        *x = 0.9 * *x + grad_value(step, k % n);
    }
    peer.started = true;
    peer.local_steps += 1;
    let busbw = if ms > 0.0 && world > 1 {
        factor * bytes as f64 / (ms / 1e3) / 1e9
    } else {
        0.0
    };
    emit(&Record::Step(StepRec {
        step,
        world,
        local: peer.local_steps,
        retries,
        wait_ms,
        state_hash,
        allreduce_exact: exact,
        sync_rx,
        sync_ms,
        ar_ms: ms,
        bytes: bytes as u64,
        busbw,
        ar_hash: Some(hash),
        ar_err: None,
        coll: Some(coll),
    }));
    Ok(Outcome::Stepped)
}

/// The all-reduce and update of a step with `--tensors` > 1: every tensor in
/// flight at once through `all_reduce_multiple_with_retry`, each checked to
/// be exact for one world size between 2 and the step's `world`.
#[allow(clippy::too_many_arguments)]
fn multi_allreduce_step(
    args: &WorkerArgs,
    comm: &Communicator,
    peer: &mut Peer,
    step: u64,
    world: u32,
    sync_rx: u64,
    sync_ms: f64,
    state_hash: u64,
) -> std::result::Result<Outcome, Failure> {
    // `peer.grad` already holds the step's contribution.
    let per = args.elems.div_ceil(args.tensors);
    if args.trace {
        emit(&Record::Begin {
            step,
            op: "allreduce".into(),
            attempt: 1,
        });
    }
    let t0 = Instant::now();
    let result = {
        let mut bufs: Vec<ReduceBuffers<'_>> = peer
            .grad
            .chunks_mut(per)
            .enumerate()
            .map(|(i, c)| ReduceBuffers::in_place(c, ReduceOp::Sum, i as u64 + 1))
            .collect();
        let n = bufs.len();
        comm.all_reduce_multiple_with_retry(&mut bufs, n)
    };
    let info = match result {
        Ok(info) => info,
        Err(PcclError::TooFewPeers(_)) => {
            emit(&Record::Skip {
                step,
                reason: "TooFewPeers".into(),
            });
            return Ok(Outcome::Skipped);
        }
        Err(e) => {
            return Err(Failure {
                op: "allreduce",
                err: e,
            })
        }
    };
    let ar_ms = t0.elapsed().as_secs_f64() * 1e3;
    // Each tensor's world: the quotient at its first non-zero contribution.
    let worlds: Vec<Option<f32>> = peer
        .grad
        .chunks(per)
        .enumerate()
        .map(|(i, c)| {
            let base = i * per;
            let (j, g) = (0..c.len())
                .map(|j| (j, grad_value(step, base + j)))
                .find(|(_, g)| *g != 0.0)?;
            let w = (c[j] / g).round();
            let exact = w >= 2.0
                && w <= world.max(2) as f32
                && c.iter()
                    .enumerate()
                    .all(|(j, x)| *x == w * grad_value(step, base + j));
            exact.then_some(w)
        })
        .collect();
    let exact = worlds.iter().all(|w| w.is_some());
    let last_world = info.local_world_size.max(1);
    let wf: Vec<f32> = worlds
        .iter()
        .map(|w| w.unwrap_or(last_world as f32))
        .collect();
    // Deterministic update, identical on every peer (each tensor's result
    // is the same on every participant of its successful attempt).
    let n = peer.grad.len();
    for (k, x) in peer.w.iter_mut().enumerate() {
        let j = k % n;
        *x += peer.grad[j] / wf[j / per] * 1e-3;
    }
    for (k, x) in peer.small.iter_mut().enumerate() {
        let j = k % n;
        *x = 0.9 * *x + peer.grad[j] / wf[j / per];
    }
    peer.started = true;
    peer.local_steps += 1;
    let bytes = (args.elems * 4) as u64;
    let busbw = if ar_ms > 0.0 && last_world > 1 {
        let w = last_world as f64;
        2.0 * (w - 1.0) / w * bytes as f64 / (ar_ms / 1e3) / 1e9
    } else {
        0.0
    };
    emit(&Record::Step(StepRec {
        step,
        world: last_world,
        local: peer.local_steps,
        retries: 0,
        wait_ms: 0,
        state_hash,
        allreduce_exact: exact,
        sync_rx,
        sync_ms,
        ar_ms,
        bytes,
        busbw,
        ar_hash: None,
        ar_err: None,
        coll: None,
    }));
    Ok(Outcome::Stepped)
}

/// One hash for the whole shared state: the tensor hash of the tensors'
/// hashes, in order.
pub fn state_hash_of(tensors: &[&[u8]]) -> u64 {
    let hashes = pccl_core::hash::tensor_hashes(tensors);
    let mut cat = Vec::with_capacity(hashes.len() * 8);
    for h in hashes {
        cat.extend_from_slice(&h.to_le_bytes());
    }
    pccl_core::hash::tensor_hash(&cat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_sums_are_exact() {
        for world in 1..=64u32 {
            for k in 0..7 {
                let g = grad_value(5, k);
                let sum: f32 = (0..world).map(|_| g).sum();
                assert_eq!(sum, world as f32 * g);
                assert_eq!(sum / world as f32, g);
            }
        }
    }

    #[test]
    fn state_size() {
        assert_eq!(state_elems(1.0) + SMALL_ELEMS, 1 << 18);
        assert_eq!(state_elems(0.0), 1);
    }
}
