//! `moe-trainer`: with no arguments, compares global against micro-batch
//! load balancing on a local swarm with churn; `--peers N` runs one local
//! swarm; `--master HOST:PORT` joins a swarm on other machines as one peer.
//! See `docs/moe-trainer.md`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use moe_trainer::balance::Balance;
use moe_trainer::cli::Cli;
use moe_trainer::local::{self, RunPlan};
use moe_trainer::peer::{self, Output};

fn main() -> ExitCode {
    let cli = Cli::parse();
    pccl_core::logging::init(None);
    let r = if cli.master.is_some() {
        peer_mode(&cli)
    } else {
        local_mode(&cli)
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if cli.json {
                println!(
                    "{}{}",
                    peer::EVENT_PREFIX,
                    serde_json::json!({"ev": "fatal", "peer": cli.peer_index, "error": e})
                );
            }
            eprintln!("moe-trainer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn peer_mode(cli: &Cli) -> Result<(), String> {
    let out = if cli.json {
        Output::Json
    } else {
        Output::Human
    };
    peer::run(&cli.peer_config(), out)
}

fn local_mode(cli: &Cli) -> Result<(), String> {
    let compare = cli.compare || cli.peers.is_none();
    let peers = cli.peers.unwrap_or(3);
    let base = cli.peer_config();
    base.validate()?;
    let (kill_at, join_at) = if cli.no_churn {
        (None, None)
    } else if compare || cli.kill_at.is_some() || cli.join_at.is_some() {
        // Defaults: the kill in the middle of an outer step at 40% of the
        // run, the restart at 60%.
        let total = cli.inner_steps;
        let h = cli.sync_every;
        let mid = |frac: f64| ((total as f64 * frac) as u64 / h) * h + h / 2;
        (
            Some(cli.kill_at.unwrap_or_else(|| mid(0.4).max(1))),
            Some(cli.join_at.unwrap_or_else(|| mid(0.6))),
        )
    } else {
        (None, None)
    };
    if peers < 2 && kill_at.is_some() {
        return Err("churn needs at least 2 peers (or pass --no-churn)".into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
    let balances: Vec<Balance> = if compare {
        vec![Balance::Global, Balance::Micro]
    } else {
        vec![cli.lbl]
    };
    let mut runs = Vec::new();
    for lbl in balances {
        let mut cfg = base.clone();
        cfg.lbl = lbl;
        let plan = RunPlan {
            name: lbl.name().into(),
            peers,
            kill: kill_at.map(|s| (s, cli.kill_peer)),
            join_at,
            leave: if cli.no_churn {
                None
            } else {
                cli.leave_at.map(|s| (s, cli.leave_peer))
            },
            peer: cfg,
            timeout: Duration::from_secs(cli.timeout_s),
        };
        runs.push(local::run(&plan, &exe)?);
    }
    println!();
    println!("{}", local::summary(&runs));
    for r in &runs {
        for (l, counts) in r.spec.iter().enumerate() {
            print!(
                "{}",
                moe_trainer::stats::specialization_table(
                    &format!(
                        "{} LBL, layer {l}: expert selection frequency per domain",
                        r.lbl
                    ),
                    &moe_trainer::data::DOMAINS,
                    counts,
                )
            );
        }
    }
    let config = serde_json::json!({
        "peers": peers, "kill_at": kill_at, "kill_peer": cli.kill_peer, "join_at": join_at,
        "inner_steps": cli.inner_steps, "sync_every": cli.sync_every, "mode": format!("{:?}", cli.mode),
        "quant": format!("{:?}", cli.quant), "lbl_weight": cli.lbl_weight,
        "lbl_sync": format!("{:?}", cli.lbl_sync), "experts": cli.experts, "top_k": cli.top_k,
        "layers": cli.layers, "d_model": cli.d_model, "expert_hidden": cli.expert_hidden,
        "shared_expert": cli.shared_expert, "seq_len": cli.seq_len, "batch": cli.batch,
        "domain_skew": cli.domain_skew, "seed": cli.seed,
        "params": base.model.param_count(),
    });
    let (json_path, png) = moe_trainer::report::write(&cli.out, &runs, config, !cli.no_plot)?;
    println!("figures: {}", json_path.display());
    if let Some(p) = png {
        println!("plot:    {}", p.display());
    }
    let bad: Vec<String> = runs
        .iter()
        .filter_map(|r| {
            let mut why = Vec::new();
            if r.shared && !r.hashes_identical() {
                why.push("the peers' final states differ".to_string());
            }
            if !r.counts_mismatches.is_empty() {
                why.push(r.counts_mismatches.join("; "));
            }
            if r.joiner_got_state == Some(false) {
                why.push("the joiner did not receive the group's state".into());
            }
            (!why.is_empty()).then(|| format!("{}: {}", r.name, why.join("; ")))
        })
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("\n"))
    }
}
