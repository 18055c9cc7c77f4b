//! `churn`: the churn harness. Runs an embedded master and `--peers` worker
//! processes (`pccl-worker`, the canonical loop: update topology, sync shared
//! state, all-reduce with retry, deterministic state update) for
//! `--duration`, and meanwhile, at random moments drawn from `--seed`:
//! SIGKILLs peers, SIGSTOPs them (then SIGCONTs or SIGKILLs them after
//! 0.5–2 × `--peer-timeout-ms`), stops them gracefully (SIGTERM: the worker
//! closes its communicator and exits 0) and spawns new ones. Most SIGKILLs
//! and SIGSTOPs are aimed: the harness waits for the victim's next all-reduce
//! (or sync) to begin (the workers run with `--trace`) and strikes a random
//! moment into it, so failures land inside collectives, not only between
//! them. A destructive action is only taken while at least two other
//! stepping peers stay, so the swarm always keeps its state and can always
//! make progress.
//!
//! It checks, and reports at the end: ops completed, failures recovered,
//! joins, evictions, the longest time a survivor waited on a failed op, and
//! that every peer's shared-state hash agreed after every successful sync.
//! It exits non-zero on a hang (no step for more than `--max-wait-ms` while
//! two or more joined peers run, or a join/graceful leave slower than that),
//! a hash mismatch, an inexact all-reduce, or a crashed peer. The last line
//! is `churn: PASS ...` or `churn: FAIL ...`.
//!
//! ```text
//! cargo run --release -p pccl-stress --bin churn -- --peers 4 --duration 90s --seed 7
//! ```
//!
//! See `stress/README.md` for the short and the long (30 minute) runs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use pccl_core::{DataType, QuantizationAlgorithm};
use pccl_stress::swarm::driver::{DriverConfig, Event, PeerState, Swarm};
use pccl_stress::swarm::worker::{parse_quant_algo, parse_quant_type, quantized_sum_bound};
use pccl_stress::swarm::{human_bytes, parse_duration, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Parser, Debug)]
#[command(about = "Churn harness: kill, freeze, stop and add PCCL peers while they train")]
struct Args {
    /// Peers to keep around (the population varies from 3 to peers + 2).
    #[arg(long, default_value_t = 4)]
    peers: usize,
    /// How long to churn (e.g. 90s, 2m, 30m).
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of the action schedule (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Hang bound in ms: no step for longer than this (with ≥ 2 peers running) fails the run.
    #[arg(long, default_value_t = 20_000)]
    max_wait_ms: u64,
    /// The master evicts a peer silent for this long (ms).
    #[arg(long, default_value_t = 3_000)]
    peer_timeout_ms: u64,
    /// f32 elements all-reduced per step.
    #[arg(long, default_value_t = 1 << 20)]
    elems: usize,
    /// Shared-state size in MiB.
    #[arg(long, default_value_t = 8.0)]
    state_mib: f64,
    /// Connections per ring neighbour.
    #[arg(long, default_value_t = 2)]
    pool: u32,
    /// Quantize the all-reduce: `none` (exact f32 sums, checked exactly),
    /// `minmax` or `zps`. Quantized results are checked to be bit-identical
    /// on every peer of a step and within the documented error bound.
    #[arg(long, default_value = "none", value_parser = parse_quant_algo)]
    quant: QuantizationAlgorithm,
    /// Code type with `--quant`: u8, i8, u16 or i16.
    #[arg(long, default_value = "u8", value_parser = parse_quant_type)]
    quant_type: DataType,
    /// Pause after each step (ms), emulating compute.
    #[arg(long, default_value_t = 0)]
    step_sleep_ms: u64,
    /// Shortest and longest pause between two churn actions (ms).
    #[arg(long, default_value_t = 1_500)]
    min_gap_ms: u64,
    #[arg(long, default_value_t = 4_000)]
    max_gap_ms: u64,
    /// The worker executable (default: `pccl-worker` next to this binary).
    #[arg(long)]
    worker: Option<PathBuf>,
    /// Folder for each peer's stderr (`p<N>.log`).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Log filter passed to the workers (e.g. `info`).
    #[arg(long)]
    worker_log: Option<String>,
    /// Print every step summary, not only a progress line every 5 s.
    #[arg(long)]
    verbose: bool,
    /// Keep churning after a failure instead of stopping at the first one.
    #[arg(long)]
    keep_going: bool,
    /// Start the workers without `--trace` (no BEGIN lines; a hang report
    /// then cannot tell which call each peer waits in).
    #[arg(long)]
    no_trace: bool,
    /// Run a `cpu-hog` process with this many busy threads beside the run
    /// (0: none). Healthy peers must still never be evicted: an eviction of
    /// a peer that was never SIGSTOPped fails the run (docs/reliability.md).
    #[arg(long, default_value_t = 0)]
    cpu_hog: usize,
}

/// A scheduled follow-up of a SIGSTOP.
struct Followup {
    at: Instant,
    peer: usize,
    kill: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    pccl_core::logging::init(None);
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("churn: {e}");
            println!("churn: FAIL error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<bool> {
    if args.peers < 3 {
        return Err("--peers must be at least 3 (two survivors plus one to churn)".into());
    }
    if args.min_gap_ms == 0 || args.max_gap_ms < args.min_gap_ms {
        return Err("need 0 < --min-gap-ms <= --max-gap-ms".into());
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let mut rng = StdRng::seed_from_u64(seed);
    let worker = match &args.worker {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name("pccl-worker"),
    };
    if !worker.exists() {
        return Err(format!(
            "worker executable {} not found (build it: cargo build -p pccl-stress --bin pccl-worker, or pass --worker)",
            worker.display()
        )
        .into());
    }
    let _hog = if args.cpu_hog > 0 {
        let exe = worker.with_file_name("cpu-hog");
        let hog = pccl_stress::hog::CpuHog::spawn(&exe, args.cpu_hog)
            .with_context(|| format!("starting {}", exe.display()))?;
        println!(
            "churn: cpu-hog (pid {}) runs {} busy threads beside the run ({} cores)",
            hog.pid(),
            args.cpu_hog,
            pccl_stress::hog::cores()
        );
        Some(hog)
    } else {
        None
    };
    let mut worker_args = vec![
        "--elems".to_string(),
        args.elems.to_string(),
        "--state-mib".into(),
        args.state_mib.to_string(),
        "--pool".into(),
        args.pool.to_string(),
        "--step-sleep-ms".into(),
        args.step_sleep_ms.to_string(),
    ];
    if let Some(l) = &args.worker_log {
        worker_args.extend(["--log".to_string(), l.clone()]);
    }
    let quant_type = match args.quant {
        QuantizationAlgorithm::None => None,
        algo => {
            worker_args.extend([
                "--quant".to_string(),
                quant_algo_name(algo).into(),
                "--quant-type".into(),
                args.quant_type.name().into(),
            ]);
            Some(args.quant_type)
        }
    };
    let cfg = DriverConfig {
        peer_timeout_ms: args.peer_timeout_ms,
        hang_bound: Duration::from_millis(args.max_wait_ms),
        program: worker,
        leading_args: Vec::new(),
        worker_args,
        log_dir: args.log_dir.clone(),
        trace: !args.no_trace,
        quant_type,
    };
    let mut swarm = Swarm::start(cfg)?;
    println!(
        "churn: seed {seed}, {} peers, {:.0} s, master {}, all-reduce {} x f32 ({}), state {} MiB, pool {}, peer timeout {} ms, hang bound {} ms",
        args.peers,
        args.duration.as_secs_f64(),
        swarm.master_addr(),
        args.elems,
        human_bytes(args.elems as u64 * 4),
        args.state_mib,
        args.pool,
        args.peer_timeout_ms,
        args.max_wait_ms
    );
    if let Some(qt) = quant_type {
        println!(
            "churn: all-reduces quantized ({} > {}): results checked bit-identical per step and within {:.3e} (world 4) of the exact sum",
            quant_algo_name(args.quant),
            qt.name(),
            quantized_sum_bound(4, qt)
        );
    }
    let mut failures: Vec<String> = Vec::new();
    for _ in 0..args.peers {
        let (_, ev) = swarm.spawn(&[])?;
        report(&swarm, &ev, args.verbose, &mut failures);
    }

    // Warm-up: wait for two stepping peers.
    let warm_deadline = Instant::now() + Duration::from_millis(args.max_wait_ms.max(30_000));
    while swarm.steppers().len() < 2 {
        if Instant::now() > warm_deadline {
            failures.push("the swarm did not take its first steps in time".into());
            break;
        }
        let ev = swarm.poll(Duration::from_millis(100));
        report(&swarm, &ev, args.verbose, &mut failures);
    }

    let t0 = Instant::now();
    let end = t0 + args.duration;
    let mut next_action = t0 + gap(&mut rng, args);
    let mut followups: Vec<Followup> = Vec::new();
    let mut aimed: Option<Aimed> = None;
    let mut op_ms: std::collections::HashMap<usize, (f64, f64)> = Default::default();
    let mut aimed_hits: std::collections::BTreeMap<&str, u32> = Default::default();
    let mut next_progress = t0 + Duration::from_secs(5);
    while Instant::now() < end && (failures.is_empty() || args.keep_going) {
        let ev = swarm.poll(Duration::from_millis(100));
        report(&swarm, &ev, args.verbose, &mut failures);
        let now = Instant::now();

        // Follow-ups of SIGSTOPs.
        let due: Vec<Followup> = {
            let (due, later): (Vec<_>, Vec<_>) = followups.drain(..).partition(|f| f.at <= now);
            followups = later;
            due
        };
        for f in due {
            if swarm.peers[f.peer].state != PeerState::Stopped {
                continue;
            }
            let ev = if f.kill {
                swarm.kill(f.peer)?
            } else {
                swarm.cont(f.peer)?
            };
            report(&swarm, &ev, args.verbose, &mut failures);
        }

        // Remember how long the peers' syncs and all-reduces take, to aim.
        for e in &ev {
            if let Event::Step { peer, rec } = e {
                op_ms.insert(*peer, (rec.ar_ms, rec.sync_ms));
            }
        }
        if let Some(a) = &aimed {
            let entered = ev.iter().any(
                |e| matches!(e, Event::Begin { peer, op, .. } if *peer == a.victim && op == a.op),
            );
            let usable = swarm.peers[a.victim].state == PeerState::Running;
            if entered || !usable || a.since.elapsed() > Duration::from_secs(3) {
                let (kill, victim, op) = (a.kill, a.victim, a.op);
                aimed = None;
                if usable && swarm.steppers().len() >= 3 {
                    if entered {
                        let (ar, sync) = op_ms.get(&victim).copied().unwrap_or((20.0, 5.0));
                        let typical = if op == "allreduce" { ar } else { sync };
                        let ms = rng.gen_range(0.0..typical.clamp(1.0, 300.0));
                        std::thread::sleep(Duration::from_secs_f64(ms / 1e3));
                        *aimed_hits.entry(op).or_insert(0u32) += 1;
                    }
                    let ev = if kill {
                        swarm.kill(victim)?
                    } else {
                        stop_with_followup(&mut swarm, &mut rng, args, &mut followups, victim)?
                    };
                    report(&swarm, &ev, args.verbose, &mut failures);
                }
            }
        }
        if now >= next_action && aimed.is_none() {
            next_action = now + gap(&mut rng, args);
            if let Some(ev) = act(&mut swarm, &mut rng, args, &mut followups, &mut aimed)? {
                report(&swarm, &ev, args.verbose, &mut failures);
            }
        }
        if now >= next_progress {
            next_progress = now + Duration::from_secs(5);
            let s = &swarm.stats;
            println!(
                "[{:7.1}s] progress: {} steps, {} ops, {} retries, {} joins, {} evictions, {} running, {} stopped, {} mismatches",
                swarm.started.elapsed().as_secs_f64(),
                swarm.audit.steps(),
                s.ops,
                s.retries,
                s.joins,
                s.evictions,
                swarm.in_state(PeerState::Running).len(),
                swarm.in_state(PeerState::Stopped).len(),
                s.mismatches
            );
        }
    }
    let churn_secs = t0.elapsed().as_secs_f64();
    let ev = swarm.shutdown(Duration::from_millis(args.max_wait_ms));
    report(&swarm, &ev, args.verbose, &mut failures);

    let s = swarm.stats.clone();
    let a = &swarm.audit;
    println!();
    println!(
        "churn summary (seed {seed}, {churn_secs:.1} s of churn, target {} peers)",
        args.peers
    );
    println!(
        "  ops completed              {:>8}   (STEP lines; {} distinct steps, {} compared across >= 2 peers)",
        s.ops,
        a.steps(),
        a.compared_steps()
    );
    println!(
        "  failures recovered         {:>8}   (all-reduce retries after a lost peer; {} skipped steps, {} rejoins)",
        s.retries, s.skips, s.rejoins
    );
    println!("  longest wait on failed op  {:>8} ms", s.max_retry_wait_ms);
    println!(
        "  joins                      {:>8}   ({} processes spawned, {} rejoins after eviction or failed sync)",
        s.joins, s.spawned, s.rejoins
    );
    println!(
        "  evictions                  {:>8}   ({})",
        s.evictions,
        if s.max_eviction_ms > 0 {
            format!(
                "slowest: survivors stepped without the frozen peer {} ms after SIGSTOP",
                s.max_eviction_ms
            )
        } else {
            "seen only when thawed peers found themselves evicted; not timed".into()
        }
    );
    println!(
        "  SIGKILL/SIGSTOP/SIGCONT    {:>8}   {} / {} / {} ({} aimed into an all-reduce, {} into a sync)",
        "",
        s.kills,
        s.stops,
        s.conts,
        aimed_hits.get("allreduce").copied().unwrap_or(0),
        aimed_hits.get("sync").copied().unwrap_or(0)
    );
    println!(
        "  graceful leaves            {:>8}   (of {} SIGTERMs, shutdown included)",
        s.graceful_leaves, s.terms
    );
    println!(
        "  bytes all-reduced          {:>8}   (per peer, summed); shared state fetched {}",
        human_bytes(s.bytes_reduced),
        human_bytes(s.sync_rx_bytes)
    );
    println!(
        "  hash mismatches            {:>8}   ({} hash reports)",
        s.mismatches,
        a.reports()
    );
    if let Some(qt) = quant_type {
        println!(
            "  quantized result mismatches {:>7}   ({} result hashes; {} > {} codes)",
            s.result_mismatches,
            swarm.result_audit.reports(),
            quant_algo_name(args.quant),
            qt.name()
        );
        println!(
            "  results beyond error bound {:>8}   (bound at world 4: {:.3e})",
            s.inexact,
            quantized_sum_bound(4, qt)
        );
    } else {
        println!("  inexact all-reduces        {:>8}", s.inexact);
    }
    println!(
        "  crashes / fatal errors     {:>8}   {} / {}",
        "", s.crashes, s.fatals
    );
    println!(
        "  hangs > {} ms            {:>8}   (longest gap without a step {} ms; slow joins {}, stuck leaves {})",
        args.max_wait_ms, s.hangs, s.longest_gap_ms, s.slow_joins, s.stuck_leaves
    );
    let live = swarm.liveness();
    let healthy_evicted = swarm.healthy_evictions();
    println!("  master liveness            {}", live.summary());
    println!(
        "  healthy peers evicted      {:>8}   (never SIGSTOPped, yet evicted for silence)",
        healthy_evicted.len()
    );
    if !healthy_evicted.is_empty() {
        failures.push(format!(
            "the master evicted healthy (never frozen) peers: {healthy_evicted:?}"
        ));
    }
    if s.ops == 0 {
        failures.push("no step completed".into());
    }
    if s.failures() > 0 && failures.is_empty() {
        failures.push(format!("{} failure events", s.failures()));
    }
    let figures = format!(
        "seed={seed} ops={} steps={} retries={} joins={} evictions={} max_wait_ms={} mismatches={} result_mismatches={} crashes={} hangs={}",
        s.ops,
        a.steps(),
        s.retries,
        s.joins,
        s.evictions,
        s.max_retry_wait_ms,
        s.mismatches,
        s.result_mismatches,
        s.crashes,
        s.hangs
    );
    if failures.is_empty() {
        println!("churn: PASS {figures}");
        Ok(true)
    } else {
        for f in &failures {
            println!("  failure: {f}");
        }
        println!("churn: FAIL {figures}");
        Ok(false)
    }
}

fn gap(rng: &mut StdRng, args: &Args) -> Duration {
    Duration::from_millis(rng.gen_range(args.min_gap_ms..=args.max_gap_ms))
}

/// A destructive action waiting for its victim to enter a collective.
struct Aimed {
    kill: bool,
    victim: usize,
    /// `allreduce` or `sync`.
    op: &'static str,
    since: Instant,
}

/// Picks one churn action: spawns and graceful stops happen at once; a
/// SIGKILL or SIGSTOP is, four times out of five, aimed at the victim's next
/// all-reduce (three in four) or sync, striking a random moment into it.
fn act(
    swarm: &mut Swarm,
    rng: &mut StdRng,
    args: &Args,
    followups: &mut Vec<Followup>,
    aimed: &mut Option<Aimed>,
) -> Result<Option<Vec<Event>>> {
    let steppers = swarm.steppers();
    let alive = swarm.alive();
    let stopped = swarm.in_state(PeerState::Stopped).len();
    // (weight, action)
    let mut choices: Vec<(u32, u8)> = Vec::new();
    if alive < args.peers + 2 {
        choices.push((if alive < args.peers { 6 } else { 1 }, b's'));
    }
    if steppers.len() >= 3 {
        choices.push((3, b'k'));
        choices.push((2, b't'));
        if stopped == 0 {
            choices.push((2, b'z'));
        }
    }
    let total: u32 = choices.iter().map(|c| c.0).sum();
    if total == 0 {
        return Ok(None);
    }
    let mut pick = rng.gen_range(0..total);
    let mut action = b's';
    for (w, a) in &choices {
        if pick < *w {
            action = *a;
            break;
        }
        pick -= w;
    }
    let victim = if steppers.is_empty() {
        0
    } else {
        steppers[rng.gen_range(0..steppers.len())]
    };
    let ev = match action {
        b's' => swarm.spawn(&[])?.1,
        b't' => swarm.terminate(victim)?,
        _ if !args.no_trace && rng.gen_bool(0.8) => {
            *aimed = Some(Aimed {
                kill: action == b'k',
                victim,
                op: if rng.gen_bool(0.75) {
                    "allreduce"
                } else {
                    "sync"
                },
                since: Instant::now(),
            });
            Vec::new()
        }
        b'k' => swarm.kill(victim)?,
        _ => stop_with_followup(swarm, rng, args, followups, victim)?,
    };
    Ok(Some(ev))
}

fn stop_with_followup(
    swarm: &mut Swarm,
    rng: &mut StdRng,
    args: &Args,
    followups: &mut Vec<Followup>,
    victim: usize,
) -> Result<Vec<Event>> {
    let ev = swarm.stop(victim)?;
    let ms = args.peer_timeout_ms as f64 * rng.gen_range(0.5..2.0);
    followups.push(Followup {
        at: Instant::now() + Duration::from_millis(ms as u64),
        peer: victim,
        kill: rng.gen_bool(0.5),
    });
    Ok(ev)
}

/// Prints events and collects failures.
fn report(swarm: &Swarm, events: &[Event], verbose: bool, failures: &mut Vec<String>) {
    let t = swarm.started.elapsed().as_secs_f64();
    let name = |p: usize| swarm.name(p).to_string();
    for ev in events {
        let line = match ev {
            Event::Spawned { peer } => Some(format!("{} spawned", name(*peer))),
            Event::Joined {
                peer,
                session,
                world,
                connect_ms,
            } => Some(format!(
                "{} joined (session {session}, world {world}, admitted after {connect_ms} ms)",
                name(*peer)
            )),
            Event::Step { .. } | Event::Begin { .. } => None,
            Event::StepDone(s) => verbose.then(|| {
                format!(
                    "step {} world {} reporters {} hash {:016x}{} ar {:.1} ms busbw {:.3} GB/s{}",
                    s.step,
                    s.world,
                    s.reporters,
                    s.hash,
                    if s.agree { "" } else { " DISAGREE" },
                    s.ar_ms,
                    s.busbw,
                    if s.sync_rx > 0 {
                        format!(" (newcomer fetched {})", human_bytes(s.sync_rx))
                    } else {
                        String::new()
                    }
                )
            }),
            Event::Retry { peer, rec } => Some(format!(
                "{} recovered: {} of step {} failed with {} after {} ms (attempt {}, buffer restored: {})",
                name(*peer),
                rec.op,
                rec.step,
                rec.err,
                rec.wait_ms,
                rec.attempt,
                rec.restored
            )),
            Event::Skip { peer, step } => Some(format!(
                "{} skipped step {step}: too few peers",
                name(*peer)
            )),
            Event::Rejoin { peer, reason, msg } => {
                Some(format!("{} rejoins ({reason}: {msg})", name(*peer)))
            }
            Event::OpError { peer, op, err, msg } => {
                Some(format!("{} {op} failed on all peers: {err}: {msg}", name(*peer)))
            }
            Event::Mismatch(m) => {
                failures.push(format!("hash mismatch: {m}"));
                Some(format!("HASH MISMATCH {m}"))
            }
            Event::ResultMismatch(m) => {
                failures.push(format!("quantized result mismatch: {m}"));
                Some(format!("RESULT MISMATCH {m}"))
            }
            Event::Inexact { peer, step } => {
                failures.push(format!("{} inexact all-reduce at step {step}", name(*peer)));
                Some(format!("{} INEXACT all-reduce result at step {step}", name(*peer)))
            }
            Event::Killed { peer } => Some(format!("SIGKILL {}", name(*peer))),
            Event::Stopped { peer } => Some(format!("SIGSTOP {}", name(*peer))),
            Event::Continued { peer } => Some(format!("SIGCONT {}", name(*peer))),
            Event::Terminating { peer } => Some(format!("SIGTERM {} (graceful leave)", name(*peer))),
            Event::Evicted {
                peer,
                after_ms,
                world,
            } => Some(format!(
                "{} evicted: survivors stepped with world {world} {after_ms} ms after SIGSTOP",
                name(*peer)
            )),
            Event::Left { peer, steps } => {
                Some(format!("{} left gracefully after {steps} steps", name(*peer)))
            }
            Event::Exited {
                peer,
                status,
                expected,
            } => {
                if *expected {
                    Some(format!("{} exited ({status})", name(*peer)))
                } else {
                    failures.push(format!(
                        "{} crashed ({status}); stderr tail:\n{}",
                        name(*peer),
                        swarm.stderr_tail(*peer)
                    ));
                    Some(format!("{} CRASHED ({status})", name(*peer)))
                }
            }
            Event::Fatal { peer, msg } => {
                failures.push(format!("{} fatal: {msg}", name(*peer)));
                Some(format!("{} FATAL: {msg}", name(*peer)))
            }
            Event::BadLine { peer, err } => {
                failures.push(format!("{} printed a malformed line: {err}", name(*peer)));
                Some(format!("{} malformed line: {err}", name(*peer)))
            }
            Event::Hang { silent_ms } => {
                let at = swarm.whereabouts();
                failures.push(format!("hang: no step for {silent_ms} ms; peers:\n{at}"));
                Some(format!("HANG: no step for {silent_ms} ms; peers:\n{at}"))
            }
            Event::SlowJoin { peer, waited_ms } => {
                failures.push(format!("{} not admitted after {waited_ms} ms", name(*peer)));
                Some(format!("{} SLOW JOIN ({waited_ms} ms)", name(*peer)))
            }
            Event::StuckLeave { peer, waited_ms } => {
                failures.push(format!(
                    "{} did not leave within {waited_ms} ms of SIGTERM",
                    name(*peer)
                ));
                Some(format!("{} STUCK LEAVING ({waited_ms} ms)", name(*peer)))
            }
        };
        if let Some(l) = line {
            println!("[{t:7.1}s] {l}");
        }
    }
}

/// The worker's `--quant` name of an algorithm.
fn quant_algo_name(algo: QuantizationAlgorithm) -> &'static str {
    match algo {
        QuantizationAlgorithm::MinMax => "minmax",
        QuantizationAlgorithm::ZeroPointScale => "zps",
        _ => "none",
    }
}
