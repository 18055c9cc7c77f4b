//! The local swarm driver: an embedded master and peer processes on this
//! machine, churn on a schedule (a SIGKILL and a restart), a live line per
//! step, and everything the peers report gathered into a [`RunResult`]:
//! losses, validation per domain, expert selections, bytes, the final state
//! hashes, and the exact check that every all-reduced expert count equals
//! the sum of the peers' local counts.
//!
//! May import: pccl-core's master, pccl-stress's process supervisor, and
//! the crate's cli and peer modules.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pccl_core::{MasterConfig, MasterNode};
use pccl_stress::swarm::procs::{ProcEvent, Procs, Stream};
use serde_json::{json, Value};

use crate::balance::Balance;
use crate::cli::child_args;
use crate::data::DOMAINS;
use crate::peer::{human_bytes, PeerConfig, EVENT_PREFIX};

/// One local run.
#[derive(Debug, Clone)]
pub struct RunPlan {
    pub name: String,
    pub peers: usize,
    /// (inner step, peer index) of the SIGKILL.
    pub kill: Option<(u64, usize)>,
    /// Inner step at which a peer starts late (the killed one again, if any).
    pub join_at: Option<u64>,
    /// (inner step, peer index) after which a peer leaves gracefully.
    pub leave: Option<(u64, usize)>,
    pub peer: PeerConfig,
    pub timeout: Duration,
}

/// One inner step as the reporting peer saw it.
#[derive(Debug, Clone)]
pub struct StepRecord {
    pub step: u64,
    pub world: u64,
    pub loss: f64,
    pub lbl: Option<f64>,
    pub step_ms: f64,
    pub side_ms: f64,
    pub exposed_ms: f64,
}

/// One outer step as the reporting peer saw it.
#[derive(Debug, Clone)]
pub struct OuterRecord {
    pub outer_step: u64,
    pub inner_step: u64,
    pub world: u64,
    pub hash: String,
    pub val: Vec<f64>,
    pub comm_ms: f64,
    pub exposed_ms: f64,
}

/// What a local run measured.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    pub name: String,
    pub lbl: String,
    /// Peers share a model (false: `--mode none`, the no-communication
    /// baseline, where every peer trains alone).
    pub shared: bool,
    pub steps: Vec<StepRecord>,
    pub outer: Vec<OuterRecord>,
    /// (peer index, final state hash) of every peer that finished.
    pub final_hashes: Vec<(usize, String)>,
    /// Layer × domain × expert selections of the final model.
    pub spec: Vec<Vec<Vec<u64>>>,
    /// Bytes sent, summed over every peer's last report.
    pub tx_bytes: u64,
    /// Steps whose global counts were checked against the sum of the local
    /// counts, and the mismatches found (must be none).
    pub counts_checked: usize,
    pub counts_mismatches: Vec<String>,
    /// Side all-reduce latency samples (ms) and how many were hidden.
    pub side_ms: Vec<f64>,
    pub side_hidden: usize,
    pub killed: Vec<usize>,
    pub joined: Vec<usize>,
    pub left: Vec<usize>,
    /// The late joiner received the group's state: its hash on joining
    /// equals the others' after the same outer step.
    pub joiner_got_state: Option<bool>,
    /// Outer steps after which every reporting peer's hash was equal, and
    /// those where they differed.
    pub outer_agreed: usize,
    pub outer_disagreed: Vec<u64>,
    pub wall_s: f64,
}

impl RunResult {
    pub fn first_loss(&self) -> Option<f64> {
        let n = self.steps.len().min(5);
        (n > 0).then(|| self.steps[..n].iter().map(|s| s.loss).sum::<f64>() / n as f64)
    }

    pub fn last_loss(&self) -> Option<f64> {
        let n = self.steps.len().min(5);
        (n > 0).then(|| {
            self.steps[self.steps.len() - n..]
                .iter()
                .map(|s| s.loss)
                .sum::<f64>()
                / n as f64
        })
    }

    pub fn final_val(&self) -> Option<&[f64]> {
        self.outer.last().map(|o| o.val.as_slice())
    }

    /// Every finished peer holds the same state.
    pub fn hashes_identical(&self) -> bool {
        !self.final_hashes.is_empty()
            && self
                .final_hashes
                .iter()
                .all(|(_, h)| *h == self.final_hashes[0].1)
            && self.outer_disagreed.is_empty()
    }

    pub fn mutual_information(&self) -> Vec<f64> {
        self.spec
            .iter()
            .map(crate::stats::mutual_information)
            .collect()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "lbl": self.lbl,
            "shared": self.shared,
            "wall_s": self.wall_s,
            "steps": self.steps.iter().map(|s| json!({
                "step": s.step, "world": s.world, "loss": s.loss, "lbl": s.lbl,
                "step_ms": s.step_ms, "side_ms": s.side_ms, "exposed_ms": s.exposed_ms,
            })).collect::<Vec<_>>(),
            "outer": self.outer.iter().map(|o| json!({
                "outer_step": o.outer_step, "inner_step": o.inner_step, "world": o.world,
                "hash": o.hash, "val": o.val, "comm_ms": o.comm_ms, "exposed_ms": o.exposed_ms,
            })).collect::<Vec<_>>(),
            "final_hashes": self.final_hashes,
            "hashes_identical": self.hashes_identical(),
            "spec": self.spec,
            "mutual_information_bits": self.mutual_information(),
            "max_frequency": self.spec.iter().map(crate::stats::max_frequency).collect::<Vec<_>>(),
            "tx_bytes": self.tx_bytes,
            "counts_checked": self.counts_checked,
            "counts_mismatches": self.counts_mismatches,
            "side_ms_median": crate::stats::median(&self.side_ms),
            "side_hidden": self.side_hidden,
            "side_total": self.side_ms.len(),
            "killed": self.killed,
            "left": self.left,
            "joined": self.joined,
            "joiner_got_state": self.joiner_got_state,
            "outer_agreed": self.outer_agreed,
            "outer_disagreed": self.outer_disagreed,
            "first_loss": self.first_loss(),
            "last_loss": self.last_loss(),
        })
    }
}

/// One peer's report of one step, kept for the count check.
struct CountReport {
    peer: usize,
    local: Vec<Vec<u64>>,
    global: Option<Vec<Vec<u64>>>,
    count_world: u64,
}

fn counts(v: &Value) -> Option<Vec<Vec<u64>>> {
    v.as_array()?
        .iter()
        .map(|row| row.as_array()?.iter().map(Value::as_u64).collect())
        .collect()
}

/// Checks one step: every peer that reported it used the same global
/// counts over all of them, and those are the sum of their local counts.
/// `None`: not checkable (a peer died mid-step, or no all-reduce ran).
fn check_step(step: u64, reports: &[CountReport]) -> Option<Result<(), String>> {
    let first = reports.first()?;
    let global = first.global.as_ref()?;
    if first.count_world as usize != reports.len()
        || reports
            .iter()
            .any(|r| r.count_world != first.count_world || r.global.is_none())
    {
        return None;
    }
    let mut sum = vec![vec![0u64; global.first().map_or(0, Vec::len)]; global.len()];
    for r in reports {
        if r.global.as_ref() != Some(global) {
            return Some(Err(format!(
                "step {step}: peer {} got other global counts than peer {}",
                r.peer, first.peer
            )));
        }
        for (row, l) in sum.iter_mut().zip(&r.local) {
            for (s, c) in row.iter_mut().zip(l) {
                *s += c;
            }
        }
    }
    if &sum != global {
        return Some(Err(format!(
            "step {step}: global counts {global:?} != sum of local counts {sum:?}"
        )));
    }
    Some(Ok(()))
}

/// Runs one local swarm to the end.
pub fn run(plan: &RunPlan, exe: &Path) -> Result<RunResult, String> {
    plan.peer.validate()?;
    if plan.peers == 0 {
        return Err("--peers must be at least 1".into());
    }
    if let Some((at, idx)) = plan.kill {
        if idx >= plan.peers {
            return Err(format!(
                "--kill-peer {idx} is not one of the {} founding peers",
                plan.peers
            ));
        }
        if at == 0 || at >= plan.peer.inner_steps {
            return Err(format!(
                "--kill-at {at} must be inside the run (1..{})",
                plan.peer.inner_steps
            ));
        }
    }
    if let Some((at, who)) = plan.leave {
        if who >= plan.peers || plan.kill.is_some_and(|(_, v)| v == who) {
            return Err(format!(
                "--leave-peer {who} must be one of the {} founding peers and not the killed one",
                plan.peers
            ));
        }
        if at == 0 || at >= plan.peer.inner_steps {
            return Err(format!(
                "--leave-at {at} must be inside the run (1..{})",
                plan.peer.inner_steps
            ));
        }
    }
    if let Some(at) = plan.join_at {
        if at >= plan.peer.inner_steps.saturating_sub(plan.peer.sync_every) {
            return Err(format!(
                "--join-at {at} leaves the joiner no outer step to take part in (the run has {} inner steps, H = {})",
                plan.peer.inner_steps, plan.peer.sync_every
            ));
        }
    }
    let started = Instant::now();
    let mut master = MasterNode::bind(
        "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        MasterConfig::default(),
    )
    .map_err(|e| format!("starting the embedded master: {e}"))?;
    master
        .run()
        .map_err(|e| format!("running the embedded master: {e}"))?;
    let master_addr = master.local_addr();
    let mut procs = Procs::new();
    // Process id → peer index.
    let mut index_of: Vec<usize> = Vec::new();
    let spawn = |procs: &mut Procs, index_of: &mut Vec<usize>, index: usize, min_world: u32| {
        let mut cfg = plan.peer.clone();
        cfg.master = master_addr;
        cfg.bind_ip = std::net::IpAddr::from([127, 0, 0, 1]);
        cfg.peer_index = index;
        cfg.home_domain = index % DOMAINS.len();
        cfg.min_world = min_world;
        cfg.leave_after = plan
            .leave
            .filter(|&(_, who)| who == index && min_world > 1)
            .map(|(at, _)| at);
        let mut cmd = Command::new(exe);
        cmd.args(child_args(&cfg))
            .env("RAYON_NUM_THREADS", "1")
            .env_remove("PCCL_LOG");
        let id = procs
            .spawn(format!("peer{index}"), cmd)
            .map_err(|e| format!("starting peer {index}: {}", e.0))?;
        index_of.push(index);
        Ok::<usize, String>(id)
    };
    println!(
        "[{}] {} peers, balance {}, DiLoCo {:?} H={} over {} inner steps{}{}{}",
        plan.name,
        plan.peers,
        plan.peer.lbl.name(),
        plan.peer.mode,
        plan.peer.sync_every,
        plan.peer.inner_steps,
        plan.kill.map_or(String::new(), |(s, i)| format!(
            ", SIGKILL peer {i} at step {s}"
        )),
        plan.join_at
            .map_or(String::new(), |s| format!(", a peer joins at step {s}")),
        plan.leave.map_or(String::new(), |(s, i)| format!(
            ", peer {i} leaves after step {s}"
        )),
    );
    for i in 0..plan.peers {
        spawn(&mut procs, &mut index_of, i, plan.peers as u32)?;
    }

    let mut res = RunResult {
        name: plan.name.clone(),
        lbl: plan.peer.lbl.name().into(),
        shared: plan.peer.mode != crate::peer::OuterMode::None,
        ..RunResult::default()
    };
    let mut alive: Vec<bool> = vec![true; plan.peers];
    let mut done: Vec<bool> = vec![false; plan.peers];
    let mut reports: BTreeMap<u64, Vec<CountReport>> = BTreeMap::new();
    let mut outer_hashes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut last_tx: BTreeMap<usize, u64> = BTreeMap::new();
    let mut joiner: Option<usize> = None;
    let mut joiner_hash: Option<(u64, String)> = None;
    let mut killed = false;
    let mut join_started = false;
    let mut reporter_step = 0u64;
    let mut failures: Vec<String> = Vec::new();
    let deadline = started + plan.timeout;
    loop {
        if Instant::now() > deadline {
            return Err(format!(
                "[{}] the run did not finish within {} s",
                plan.name,
                plan.timeout.as_secs()
            ));
        }
        let live_unfinished = (0..index_of.len())
            .filter(|&id| alive[id] && !done[id])
            .count();
        if live_unfinished == 0 {
            break;
        }
        let Some(ev) = procs.next(Duration::from_millis(200)) else {
            for id in 0..index_of.len() {
                if alive[id] && !done[id] && !procs.alive(id) {
                    alive[id] = false;
                    failures.push(format!("peer {} exited early", index_of[id]));
                }
            }
            continue;
        };
        let (id, stream, line) = match ev {
            ProcEvent::Line {
                id, stream, line, ..
            } => (id, stream, line),
            ProcEvent::Eof { .. } => continue,
        };
        let index = index_of.get(id).copied().unwrap_or(usize::MAX);
        if stream == Stream::Stderr {
            eprintln!("[{} peer{index}] {line}", plan.name);
            continue;
        }
        let Some(v) = line
            .strip_prefix(EVENT_PREFIX)
            .and_then(|j| serde_json::from_str::<Value>(j).ok())
        else {
            println!("[{} peer{index}] {line}", plan.name);
            continue;
        };
        // The reporter: the lowest-index peer process still running.
        let reporter = (0..index_of.len()).find(|&i| alive[i] && !done[i]);
        match v["ev"].as_str().unwrap_or("") {
            "joined" => {
                let outer = v["outer_step"].as_u64().unwrap_or(0);
                let hash = v["hash"].as_str().unwrap_or("").to_string();
                println!(
                    "[{}] peer {index} joined: world {}, inner step {}, outer step {outer}, waited {} ms",
                    plan.name,
                    v["world"],
                    v["inner_step"],
                    v["wait_ms"]
                );
                if Some(id) == joiner {
                    joiner_hash = Some((outer, hash));
                }
            }
            "step" => {
                let step = v["step"].as_u64().unwrap_or(0);
                if let Some(tx) = v["tx"].as_u64() {
                    last_tx.insert(id, tx);
                }
                let side_ms = v["side_ms"].as_f64().unwrap_or(0.0);
                if v["count_world"].as_u64().unwrap_or(0) > 1 {
                    res.side_ms.push(side_ms);
                    if v["hidden"].as_bool() == Some(true) {
                        res.side_hidden += 1;
                    }
                }
                if let Some(local) = counts(&v["local"]) {
                    reports.entry(step).or_default().push(CountReport {
                        peer: index,
                        local,
                        global: counts(&v["global"]),
                        count_world: v["count_world"].as_u64().unwrap_or(0),
                    });
                }
                if Some(id) == reporter && step > reporter_step {
                    reporter_step = step;
                    let rec = StepRecord {
                        step,
                        world: v["world"].as_u64().unwrap_or(0),
                        loss: v["loss"].as_f64().unwrap_or(f64::NAN),
                        lbl: v["lbl"].as_f64(),
                        step_ms: v["step_ms"].as_f64().unwrap_or(0.0),
                        side_ms,
                        exposed_ms: v["exposed_ms"].as_f64().unwrap_or(0.0),
                    };
                    println!(
                        "[{}] step {:>4}  world {}  loss {:.4}  lbl {}  sent {:>9}  step {:>4.0} ms  counts {}",
                        plan.name,
                        rec.step,
                        rec.world,
                        rec.loss,
                        rec.lbl.map_or("  -   ".into(), |l| format!("{l:.4}")),
                        human_bytes(v["tx"].as_u64().unwrap_or(0)),
                        rec.step_ms,
                        if plan.peer.lbl != Balance::Global {
                            "local".to_string()
                        } else if v["count_world"].as_u64().unwrap_or(0) < 2 {
                            "alone".to_string()
                        } else {
                            format!(
                                "{:.1} ms all-reduce, {}",
                                side_ms,
                                if v["hidden"].as_bool() == Some(true) {
                                    format!("hidden ({:.1} ms waited)", rec.exposed_ms)
                                } else {
                                    "exposed".into()
                                }
                            )
                        }
                    );
                    res.steps.push(rec);
                }
                if let Some((at, victim)) = plan.kill {
                    if !killed && step >= at {
                        if let Some(vid) =
                            (0..index_of.len()).find(|&i| index_of[i] == victim && alive[i])
                        {
                            killed = true;
                            println!("[{}] SIGKILL peer {victim} at step {step}", plan.name);
                            procs.kill(vid).map_err(|e| e.0)?;
                            alive[vid] = false;
                            res.killed.push(victim);
                        }
                    }
                }
                if let Some(at) = plan.join_at {
                    if !join_started && step >= at {
                        join_started = true;
                        let index = match plan.kill {
                            Some((_, victim)) if killed => victim,
                            _ => index_of.len(),
                        };
                        println!(
                            "[{}] peer {index} starts{} at step {step}",
                            plan.name,
                            if killed { " again (restart)" } else { "" }
                        );
                        let nid = spawn(&mut procs, &mut index_of, index, 1)?;
                        alive.push(true);
                        done.push(false);
                        joiner = Some(nid);
                        res.joined.push(index);
                    }
                }
            }
            "outer" => {
                let outer_step = v["outer_step"].as_u64().unwrap_or(0);
                let hash = v["hash"].as_str().unwrap_or("").to_string();
                // An event that applied nothing (async mode: a newcomer's
                // first launch) holds an older step's state.
                if v["applied"].as_bool() != Some(false) {
                    outer_hashes
                        .entry(outer_step)
                        .or_default()
                        .push(hash.clone());
                }
                if let Some(tx) = v["tx"].as_u64() {
                    last_tx.insert(id, tx);
                }
                if Some(id) == reporter
                    && res.outer.last().is_none_or(|o| o.outer_step < outer_step)
                {
                    let val: Vec<f64> = v["val"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_f64).collect())
                        .unwrap_or_default();
                    println!(
                        "[{}] outer step {outer_step} over {} peers: state {hash}, comm {:.0} ms ({:.0} ms exposed); validation {}",
                        plan.name,
                        v["world"],
                        v["comm_ms"].as_f64().unwrap_or(0.0),
                        v["exposed_ms"].as_f64().unwrap_or(0.0),
                        DOMAINS
                            .iter()
                            .zip(&val)
                            .map(|(d, l)| format!("{d} {l:.3}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    res.outer.push(OuterRecord {
                        outer_step,
                        inner_step: v["inner_step"].as_u64().unwrap_or(0),
                        world: v["world"].as_u64().unwrap_or(0),
                        hash,
                        val,
                        comm_ms: v["comm_ms"].as_f64().unwrap_or(0.0),
                        exposed_ms: v["exposed_ms"].as_f64().unwrap_or(0.0),
                    });
                }
            }
            "done" => {
                done[id] = true;
                if let Some(tx) = v["tx"].as_u64() {
                    last_tx.insert(id, tx);
                }
                res.final_hashes
                    .push((index, v["hash"].as_str().unwrap_or("").to_string()));
                if let Some(spec) = v["spec"].as_array() {
                    let spec: Option<Vec<Vec<Vec<u64>>>> = spec.iter().map(counts).collect();
                    if let Some(spec) = spec {
                        if res.spec.is_empty() {
                            res.spec = spec;
                        } else if res.shared && res.spec != spec {
                            failures.push(format!(
                                "peer {index}'s expert selections on the final model differ"
                            ));
                        }
                    }
                }
            }
            "left" => {
                done[id] = true;
                res.left.push(index);
                println!(
                    "[{}] peer {index} left gracefully after step {}",
                    plan.name, v["step"]
                );
            }
            "fatal" => failures.push(format!("peer {index}: {}", v["error"])),
            _ => {}
        }
    }
    for (id, finished) in done.iter().enumerate() {
        if *finished {
            let _ = procs.wait_timeout(id, Duration::from_secs(30));
        }
    }
    drop(procs);
    master.interrupt();
    let _ = master.await_termination();

    for (step, reps) in &reports {
        match check_step(*step, reps) {
            Some(Ok(())) => res.counts_checked += 1,
            Some(Err(e)) => res.counts_mismatches.push(e),
            None => {}
        }
    }
    for (step, hashes) in &outer_hashes {
        if hashes.iter().all(|h| *h == hashes[0]) {
            res.outer_agreed += 1;
        } else {
            res.outer_disagreed.push(*step);
        }
    }
    if let Some((outer, hash)) = &joiner_hash {
        res.joiner_got_state = Some(
            *outer > 0
                && outer_hashes
                    .get(outer)
                    .is_some_and(|hs| hs.iter().any(|h| h == hash)),
        );
    }
    res.tx_bytes = last_tx.values().sum();
    res.wall_s = started.elapsed().as_secs_f64();
    if !failures.is_empty() {
        return Err(format!("[{}] {}", plan.name, failures.join("; ")));
    }
    Ok(res)
}

/// The side-by-side summary of finished runs.
pub fn summary(runs: &[RunResult]) -> String {
    let mut s = String::new();
    let w = 18;
    let row = |s: &mut String, label: &str, cells: Vec<String>| {
        s.push_str(&format!("{label:<34}"));
        for c in cells {
            s.push_str(&format!("{c:>w$}"));
        }
        s.push('\n');
    };
    row(
        &mut s,
        "",
        runs.iter().map(|r| format!("{} LBL", r.lbl)).collect(),
    );
    for (d, name) in DOMAINS.iter().enumerate() {
        row(
            &mut s,
            &format!("validation loss, {name}"),
            runs.iter()
                .map(|r| {
                    r.final_val()
                        .and_then(|v| v.get(d))
                        .map_or("-".into(), |l| format!("{l:.4}"))
                })
                .collect(),
        );
    }
    row(
        &mut s,
        "validation loss, mean",
        runs.iter()
            .map(|r| {
                r.final_val()
                    .filter(|v| !v.is_empty())
                    .map_or("-".into(), |v| {
                        format!("{:.4}", v.iter().sum::<f64>() / v.len() as f64)
                    })
            })
            .collect(),
    );
    row(
        &mut s,
        "train loss, first → last 5 steps",
        runs.iter()
            .map(|r| match (r.first_loss(), r.last_loss()) {
                (Some(a), Some(b)) => format!("{a:.2} → {b:.2}"),
                _ => "-".into(),
            })
            .collect(),
    );
    let layers = runs.iter().map(|r| r.spec.len()).max().unwrap_or(0);
    for l in 0..layers {
        row(
            &mut s,
            &format!("specialization MI, layer {l} (bits)"),
            runs.iter()
                .map(|r| {
                    r.mutual_information()
                        .get(l)
                        .map_or("-".into(), |m| format!("{m:.3}"))
                })
                .collect(),
        );
        row(
            &mut s,
            &format!("max expert frequency, layer {l}"),
            runs.iter()
                .map(|r| {
                    r.spec.get(l).map_or("-".into(), |c| {
                        crate::stats::max_frequency(c)
                            .iter()
                            .map(|f| format!("{f:.2}"))
                            .collect::<Vec<_>>()
                            .join("/")
                    })
                })
                .collect(),
        );
    }
    row(
        &mut s,
        "bytes sent, all peers",
        runs.iter().map(|r| human_bytes(r.tx_bytes)).collect(),
    );
    row(
        &mut s,
        "expert-count all-reduce, median",
        runs.iter()
            .map(|r| crate::stats::median(&r.side_ms).map_or("-".into(), |m| format!("{m:.2} ms")))
            .collect(),
    );
    row(
        &mut s,
        "counts = sum of local counts",
        runs.iter()
            .map(|r| {
                if r.lbl != "global" {
                    "n/a".into()
                } else if r.counts_mismatches.is_empty() {
                    format!("{} steps ok", r.counts_checked)
                } else {
                    format!("{} BAD", r.counts_mismatches.len())
                }
            })
            .collect(),
    );
    row(
        &mut s,
        "peers killed / joined / left",
        runs.iter()
            .map(|r| format!("{} / {} / {}", r.killed.len(), r.joined.len(), r.left.len()))
            .collect(),
    );
    row(
        &mut s,
        "joiner received the state",
        runs.iter()
            .map(|r| match r.joiner_got_state {
                Some(true) => "yes".into(),
                Some(false) => "NO".into(),
                None => "-".into(),
            })
            .collect(),
    );
    row(
        &mut s,
        "wall time",
        runs.iter().map(|r| format!("{:.0} s", r.wall_s)).collect(),
    );
    row(
        &mut s,
        "weights bit-identical across peers",
        runs.iter()
            .map(|r| match (r.shared, r.hashes_identical()) {
                (false, _) => "n/a (alone)".into(),
                (true, true) => "yes".into(),
                (true, false) => "NO".into(),
            })
            .collect(),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(
        peer: usize,
        local: Vec<Vec<u64>>,
        global: Option<Vec<Vec<u64>>>,
        w: u64,
    ) -> CountReport {
        CountReport {
            peer,
            local,
            global,
            count_world: w,
        }
    }

    #[test]
    fn count_check_sums_exactly_and_skips_incomplete_steps() {
        let g = Some(vec![vec![3, 5], vec![4, 4]]);
        let ok = [
            rep(0, vec![vec![1, 2], vec![3, 0]], g.clone(), 2),
            rep(1, vec![vec![2, 3], vec![1, 4]], g.clone(), 2),
        ];
        assert_eq!(check_step(1, &ok), Some(Ok(())));
        // One count off.
        let bad = [
            rep(0, vec![vec![1, 2], vec![3, 0]], g.clone(), 2),
            rep(1, vec![vec![2, 3], vec![1, 3]], g.clone(), 2),
        ];
        assert!(check_step(2, &bad).is_some_and(|r| r.is_err()));
        // Peers that disagree on the global counts.
        let split = [
            rep(0, vec![vec![1, 2], vec![3, 0]], g.clone(), 2),
            rep(
                1,
                vec![vec![2, 3], vec![1, 4]],
                Some(vec![vec![0, 0], vec![0, 0]]),
                2,
            ),
        ];
        assert!(check_step(3, &split).is_some_and(|r| r.is_err()));
        // A peer of the all-reduce died before reporting: not checkable.
        assert_eq!(check_step(4, &ok[..1]), None);
        // No all-reduce ran.
        assert_eq!(check_step(5, &[rep(0, vec![vec![1]], None, 0)]), None);
    }
}
