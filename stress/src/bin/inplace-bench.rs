//! `inplace-bench`: in-place against out-of-place multi-tensor all-reduce
//! (issue #18), in the shape of PCCL 1.0's `basic_reduce_test`: `--peers`
//! peer processes, pool `--pool`, `--tensors` all-reduces of `--mib` MiB
//! each in flight at once via `all_reduce_multiple_with_retry`.
//!
//! ```text
//! cargo run --release -p pccl-stress --bin inplace-bench -- --tensors 32 --mib 64 --rounds 4
//! ```
//!
//! The launcher binds an in-process master and spawns the peers (copies of
//! itself with `--role peer`). Each peer runs `--rounds` rounds; a round
//! runs one step of each mode, alternating which goes first. A step
//! allocates and fills its buffers (in place: the tensors; out of place:
//! send and receive buffers), resets the process's peak RSS
//! (`/proc/self/clear_refs`), passes a one-element barrier all-reduce,
//! times the multi-tensor all-reduce, reads `VmHWM` and verifies every
//! result exactly. It prints, per step, the time and the peak RSS above the
//! buffers (what the op itself allocated: backups, staging), and the
//! launcher prints the medians and the in-place / out-of-place ratios.
//!
//! Three modes: `in-place` (restore on failure, the default: the op saves
//! each range right before it first overwrites it), `in-place-norestore`
//! (`Communicator::set_in_place_restore(false)`: nothing saved) and
//! `out-of-place`. A round runs each once, the first mode rotating.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use pccl_core::{
    Communicator, CommunicatorConfig, MasterConfig, MasterNode, ReduceBuffers, ReduceOp,
};

#[derive(Parser, Debug, Clone)]
#[command(about = "In-place vs out-of-place multi-tensor all-reduce (time and peak RSS)")]
struct Args {
    /// `launcher` (default) or `peer` (internal).
    #[arg(long, default_value = "launcher")]
    role: String,
    #[arg(long)]
    master: Option<SocketAddr>,
    #[arg(long, default_value_t = 0)]
    rank: u32,
    #[arg(long, default_value_t = 2)]
    peers: u32,
    /// All-reduces per step (all in flight at once).
    #[arg(long, default_value_t = 32)]
    tensors: usize,
    /// MiB per tensor (f32).
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Connections per neighbour.
    #[arg(long, default_value_t = 32)]
    pool: u32,
    /// Rounds (one step of each mode per round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A field of /proc/self/status in KiB (`VmRSS`, `VmHWM`).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    InPlace,
    InPlaceNoRestore,
    OutOfPlace,
}

const MODES: [Mode; 3] = [Mode::InPlace, Mode::InPlaceNoRestore, Mode::OutOfPlace];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::InPlace => "in-place",
            Mode::InPlaceNoRestore => "in-place-norestore",
            Mode::OutOfPlace => "out-of-place",
        }
    }

    fn in_place(self) -> bool {
        self != Mode::OutOfPlace
    }
}

fn value(rank: u32, t: usize, j: usize) -> f32 {
    ((j + 3 * t) % 61) as f32 + rank as f32 * 64.0
}

fn peer(a: &Args) -> BoxResult<()> {
    let master = a.master.ok_or("peer needs --master")?;
    let mut cfg = CommunicatorConfig::new(master).with_ephemeral_ports();
    cfg.bind_ip = "127.0.0.1".parse()?;
    cfg.p2p_connection_pool_size = a.pool;
    let c = Communicator::new(cfg)?;
    c.connect()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while c.world()?.global_world < a.peers {
        if Instant::now() > deadline {
            return Err("the other peers did not join".into());
        }
        if c.are_peers_pending()? {
            c.update_topology()?;
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let n = a.mib << 18; // f32 elements per tensor
    let world = a.peers;
    let mut tag = 1u64;
    for round in 0..a.rounds {
        let order = (0..MODES.len()).map(|i| MODES[(round + i) % MODES.len()]);
        for mode in order {
            c.set_in_place_restore(mode != Mode::InPlaceNoRestore);
            let mut data: Vec<Vec<f32>> = (0..a.tensors)
                .map(|t| (0..n).map(|j| value(a.rank, t, j)).collect())
                .collect();
            let mut out: Vec<Vec<f32>> = if mode.in_place() {
                Vec::new()
            } else {
                (0..a.tensors).map(|_| vec![-1.0f32; n]).collect()
            };
            let base = status_kib("VmRSS:");
            // Peak RSS from here on (Linux: "5" resets VmHWM to VmRSS).
            std::fs::write("/proc/self/clear_refs", "5")?;
            let mut one = [1.0f32];
            let mut bar = [ReduceBuffers::in_place(&mut one[..], ReduceOp::Sum, tag)];
            tag += 1;
            c.all_reduce_multiple_with_retry(&mut bar, 1)?;
            let t0 = Instant::now();
            {
                let mut ops: Vec<ReduceBuffers<'_>> = match mode {
                    Mode::InPlace | Mode::InPlaceNoRestore => data
                        .iter_mut()
                        .enumerate()
                        .map(|(i, d)| {
                            ReduceBuffers::in_place(&mut d[..], ReduceOp::Sum, tag + i as u64)
                        })
                        .collect(),
                    Mode::OutOfPlace => data
                        .iter()
                        .zip(out.iter_mut())
                        .enumerate()
                        .map(|(i, (s, r))| {
                            ReduceBuffers::new(&s[..], &mut r[..], ReduceOp::Sum, tag + i as u64)
                        })
                        .collect(),
                };
                c.all_reduce_multiple_with_retry(&mut ops, a.tensors)?;
            }
            let dt = t0.elapsed();
            tag += a.tensors as u64;
            let peak = status_kib("VmHWM:");
            let results = if mode.in_place() { &data } else { &out };
            for (t, r) in results.iter().enumerate() {
                for (j, &y) in r.iter().enumerate() {
                    let want: f32 = (0..world).map(|k| value(k, t, j)).sum();
                    if y != want {
                        return Err(format!(
                            "{} step {round}: tensor {t} element {j} is {y}, want {want}",
                            mode.name()
                        )
                        .into());
                    }
                }
            }
            println!(
                "RESULT rank={} mode={} round={round} step_ms={:.1} buffers_mib={:.0} \
                 base_rss_mib={:.0} peak_rss_mib={:.0} extra_mib={:.0}",
                a.rank,
                mode.name(),
                dt.as_secs_f64() * 1e3,
                (a.tensors * a.mib * if mode.in_place() { 1 } else { 2 }) as f64,
                mib(base),
                mib(peak),
                mib(peak.saturating_sub(base)),
            );
            drop(data);
            drop(out);
        }
    }
    c.close();
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
}

fn launcher(a: &Args) -> BoxResult<()> {
    let mut m = MasterNode::bind("127.0.0.1:0".parse()?, MasterConfig::default())?;
    m.run()?;
    let addr = m.local_addr();
    let exe = std::env::current_exe()?;
    println!(
        "{} peers, pool {}, {} x {} MiB f32 per step ({} MiB), {} rounds (modes alternate)",
        a.peers,
        a.pool,
        a.tensors,
        a.mib,
        a.tensors * a.mib,
        a.rounds
    );
    let mut kids = Vec::new();
    for r in 0..a.peers {
        let child = Command::new(&exe)
            .args(["--role", "peer", "--master", &addr.to_string()])
            .args(["--rank", &r.to_string(), "--peers", &a.peers.to_string()])
            .args([
                "--tensors",
                &a.tensors.to_string(),
                "--mib",
                &a.mib.to_string(),
            ])
            .args([
                "--pool",
                &a.pool.to_string(),
                "--rounds",
                &a.rounds.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()?;
        kids.push(child);
        // Admission order = rank order.
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut lines = Vec::new();
    for k in kids.iter_mut() {
        let out = k.stdout.take().ok_or("stdout")?;
        for l in BufReader::new(out).lines() {
            let l = l?;
            println!("{l}");
            lines.push(l);
        }
    }
    let mut ok = true;
    for mut k in kids {
        ok &= k.wait()?.success();
    }
    if !ok {
        return Err("a peer failed".into());
    }
    let of = |mode: &str, key: &str| -> Vec<f64> {
        lines
            .iter()
            .filter(|l| l.contains(&format!("mode={mode} ")))
            .filter_map(|l| field(l, key))
            .collect()
    };
    let (to, po, eo) = (
        median(of("out-of-place", "step_ms=")),
        median(of("out-of-place", "peak_rss_mib=")),
        median(of("out-of-place", "extra_mib=")),
    );
    println!(
        "SUMMARY out-of-place: median step {to:.0} ms, median peak RSS per peer {po:.0} MiB (op extra {eo:.0})"
    );
    for mode in [Mode::InPlace, Mode::InPlaceNoRestore] {
        let (t, p, e) = (
            median(of(mode.name(), "step_ms=")),
            median(of(mode.name(), "peak_rss_mib=")),
            median(of(mode.name(), "extra_mib=")),
        );
        println!(
            "SUMMARY {}: median step {t:.0} ms (/ out-of-place {:.2}), median peak RSS per peer \
             {p:.0} MiB (/ out-of-place {:.2}, op extra {e:.0})",
            mode.name(),
            t / to,
            p / po
        );
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    pccl_core::logging::init(None);
    let r = if a.role == "peer" {
        peer(&a)
    } else {
        launcher(&a)
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inplace-bench ({}): {e}", a.role);
            std::process::ExitCode::FAILURE
        }
    }
}
