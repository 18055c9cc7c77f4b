//! `pccl-bench`: an nccl-tests style all-reduce benchmark for PCCL-rs.
//!
//! One binary, three roles:
//!
//! - **launcher** (default): binds an embedded master on loopback (or uses
//!   `--master`), measures the raw loopback TCP ring bandwidth with `N` probe
//!   processes ([`probe`]), then spawns `N` peer processes (copies of itself
//!   with `--role peer`), collects their per-iteration timings over stdout
//!   ([`proto`]) and prints one table row per size ([`report`]) and a summary
//!   as its last line. Every child is killed and reaped when the launcher
//!   leaves, on error or panic included ([`launcher::Children`]).
//! - **peer** (`--role peer`, or `--peer-only`): joins a master, waits until
//!   the world holds `N` peers, agrees on ranks, then sweeps sizes: fills its
//!   buffers deterministically from (rank, size) ([`data`]), runs warm-up and
//!   timed all-reduces and verifies every result exactly ([`peer`]). Started
//!   by hand (e.g. one per network namespace with `ip netns exec`) it prints
//!   its own table.
//! - **probe** (`--role probe`, internal): one process of the ring-bandwidth
//!   probe, driven by the launcher over stdin/stdout.
//!
//! Bandwidths follow nccl-tests and `DESIGN.md`: `algbw = bytes / time` and
//! `busbw = algbw · 2(N−1)/N`, in GB/s (10^9 bytes per second); with
//! `--collective` the factor is nccl-tests' for that collective (broadcast
//! 1, all-gather and reduce-scatter (N−1)/N, [`Collective::bus_factor`]).

pub mod data;
pub mod launcher;
pub mod peer;
pub mod probe;
pub mod proto;
pub mod report;

use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};

use clap::{Parser, ValueEnum};
use pccl_core::{Algorithm, DataType, QuantizationAlgorithm, ReduceOp};

/// Errors of the benchmark: any error, with context added on the way up.
pub type Error = Box<dyn std::error::Error + Send + Sync + 'static>;
/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Adds a description of what failed to an error (a tiny `anyhow::Context`).
pub trait Context<T> {
    fn context(self, what: impl Display) -> Result<T>;
    fn with_context<D: Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl Display) -> Result<T> {
        self.map_err(|e| format!("{what}: {e}").into())
    }
    fn with_context<D: Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| format!("{}: {e}", what()).into())
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl Display) -> Result<T> {
        self.ok_or_else(|| what.to_string().into())
    }
    fn with_context<D: Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.ok_or_else(|| what().to_string().into())
    }
}

/// What this process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Start a master (unless `--master`), the probe and the peers; print the table.
    Launcher,
    /// Join a master and run the sweep.
    Peer,
    /// One process of the ring-bandwidth probe (spawned by the launcher).
    Probe,
}

/// Quantization algorithms selectable with `--quant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantArg {
    /// Min-max block quantization.
    Minmax,
    /// Zero-point/scale block quantization.
    Zps,
}

impl QuantArg {
    pub fn algorithm(self) -> QuantizationAlgorithm {
        match self {
            QuantArg::Minmax => QuantizationAlgorithm::MinMax,
            QuantArg::Zps => QuantizationAlgorithm::ZeroPointScale,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            QuantArg::Minmax => "minmax",
            QuantArg::Zps => "zps",
        }
    }
}

/// The collective a run measures (`--collective`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Collective {
    #[default]
    AllReduce,
    Broadcast,
    AllGather,
    ReduceScatter,
}

impl Collective {
    pub fn name(self) -> &'static str {
        match self {
            Collective::AllReduce => "all-reduce",
            Collective::Broadcast => "broadcast",
            Collective::AllGather => "all-gather",
            Collective::ReduceScatter => "reduce-scatter",
        }
    }

    /// nccl-tests' bus-bandwidth factor for `world` peers (`busbw = algbw ·
    /// factor`, algbw from the whole buffer): all-reduce 2(N−1)/N,
    /// broadcast 1, all-gather and reduce-scatter (N−1)/N.
    pub fn bus_factor(self, world: u32) -> f64 {
        let w = world.max(1) as f64;
        match self {
            Collective::AllReduce => 2.0 * (w - 1.0) / w,
            Collective::Broadcast => 1.0,
            Collective::AllGather | Collective::ReduceScatter => (w - 1.0) / w,
        }
    }
}

/// Parses `--algorithm`: auto, ring or direct.
pub fn parse_algorithm(s: &str) -> std::result::Result<Algorithm, String> {
    s.parse().map_err(|e: pccl_core::Error| e.to_string())
}

/// Command line of every role (the launcher forwards what the peers need).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "pccl-bench",
    about = "All-reduce benchmark for PCCL-rs in the style of nccl-tests",
    long_about = "All-reduce benchmark for PCCL-rs in the style of nccl-tests.\n\n\
By default it starts an embedded master on 127.0.0.1, measures the loopback TCP ring \
bandwidth with N probe processes, spawns N peer processes, sweeps sizes, verifies every \
result and prints median time, algbw and busbw per size; the last line summarizes.\n\n\
--collective broadcast|all-gather|reduce-scatter measures those instead; a size is then \
the whole buffer (a broadcast's buffer, an all-gather's receive buffer, a reduce-scatter's \
send buffer: N shares) and busbw = algbw times nccl-tests' factor: all-reduce 2(N-1)/N, \
broadcast 1, all-gather and reduce-scatter (N-1)/N.\n\n\
WAN mode: start a master elsewhere (pccl-master), then one `pccl-bench --peer-only \
--master ADDR -n N` per host or network namespace (e.g. with `ip netns exec`)."
)]
pub struct Args {
    /// Role of this process.
    #[arg(long, value_enum, default_value_t = Role::Launcher)]
    pub role: Role,
    /// Shorthand for `--role peer`: join `--master` and run the sweep, printing a table.
    #[arg(long)]
    pub peer_only: bool,
    /// World size N: the number of peers taking part.
    #[arg(short = 'n', long = "peers", default_value_t = 2)]
    pub peers: u32,
    /// Peers the launcher spawns on this machine (default: all N); the others
    /// join the same master from elsewhere.
    #[arg(long)]
    pub local_peers: Option<u32>,
    /// Master to join. The launcher then starts no master of its own.
    #[arg(long)]
    pub master: Option<SocketAddr>,
    /// Where the launcher's embedded master listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub master_bind: SocketAddr,
    /// Rank of this peer (0..N-1, distinct); without it the peers agree on
    /// ranks through a few small all-reduces.
    #[arg(long)]
    pub rank_hint: Option<u32>,
    /// Peer group to join.
    #[arg(long, default_value_t = 0)]
    pub peer_group: u32,
    /// Smallest size of the sweep (bytes; K/M/G suffixes are powers of 1024).
    #[arg(short = 'b', long, default_value = "4", value_parser = parse_size)]
    pub min_bytes: u64,
    /// Largest size of the sweep.
    #[arg(short = 'e', long, default_value = "256M", value_parser = parse_size)]
    pub max_bytes: u64,
    /// Multiplication factor between sizes of the sweep.
    #[arg(short = 'f', long, default_value_t = 2)]
    pub step_factor: u64,
    /// Explicit sizes, comma separated (e.g. `4,1M,16M,128M`); overrides the sweep.
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub sizes: Option<Vec<u64>>,
    /// Element type: u8 i8 u16 i16 u32 i32 u64 i64 f16 bf16 f32 f64.
    #[arg(short = 'd', long, default_value = "f32", value_parser = parse_dtype)]
    pub dtype: DataType,
    /// Reduce operation: sum avg prod max min.
    #[arg(short = 'o', long, default_value = "sum", value_parser = parse_op)]
    pub op: ReduceOp,
    /// Timed iterations per size.
    #[arg(long, default_value_t = 20)]
    pub iters: u32,
    /// Untimed warm-up iterations per size.
    #[arg(short = 'w', long, default_value_t = 5)]
    pub warmup: u32,
    /// Verify every K-th iteration (1: all; the last one is always verified; 0: none).
    #[arg(long, default_value_t = 1)]
    pub verify_every: u32,
    /// Connections per ring neighbour; a list runs the sweep once per value.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub pool_size: Vec<u32>,
    /// All-reduces in flight at once (distinct tags); a list sweeps them.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub concurrency: Vec<u32>,
    /// Pipelined sub-chunk size (`CommunicatorConfig::chunk_bytes`; library default if absent).
    #[arg(long, value_parser = parse_size)]
    pub chunk_bytes: Option<u64>,
    /// Worker threads of each communicator's runtime (library default if absent).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Quantize the all-reduce (float dtypes only).
    #[arg(long, value_enum)]
    pub quant: Option<QuantArg>,
    /// Quantized element type: u8 i8 u16 i16.
    #[arg(long, default_value = "u8", value_parser = parse_dtype)]
    pub quant_dtype: DataType,
    /// The collective to measure: all-reduce, broadcast (from rank 0),
    /// all-gather or reduce-scatter. A size is the whole buffer (an
    /// all-gather's result, a reduce-scatter's input: N shares of size/N);
    /// busbw = algbw × 2(N−1)/N for all-reduce, × 1 for broadcast,
    /// × (N−1)/N for all-gather and reduce-scatter (nccl-tests' factors).
    #[arg(long, value_enum, default_value_t = Collective::AllReduce)]
    pub collective: Collective,
    /// The all-reduce algorithm the peers ask the master for: auto (the
    /// master chooses by size: direct for small ops, the ring above), ring
    /// or direct. Default: `$PCCL_ALGORITHM`, else auto. A list (e.g.
    /// `ring,direct`) runs the whole sweep once per value, one after the
    /// other (fresh master and peers), so they compare within one run.
    #[arg(long, value_delimiter = ',', value_parser = parse_algorithm)]
    pub algorithm: Vec<Algorithm>,
    /// Skip the ring-bandwidth probe.
    #[arg(long)]
    pub no_probe: bool,
    /// Run only the probes (ring bandwidth, and `--reference` if given), no
    /// library peers.
    #[arg(long)]
    pub probe: bool,
    /// MiB each probe process sends to its right neighbour per round.
    #[arg(long, default_value_t = 1024)]
    pub probe_mib: u64,
    /// Probe rounds (the median is the reference figure).
    #[arg(long, default_value_t = 5)]
    pub probe_rounds: u32,
    /// Connections per link for the probe (default: the pool sizes).
    #[arg(long, value_delimiter = ',')]
    pub probe_conns: Option<Vec<u32>>,
    /// Size of each probe write/read.
    #[arg(long, default_value = "512K", value_parser = parse_size)]
    pub probe_buf: u64,
    /// Sizes of the buffer each probe process sends from (and of the one it
    /// receives into), split between its connections and walked in
    /// `--probe-buf` steps; one probe per value. `512K`
    /// stays in the CPU cache: the raw TCP figure (the reference of the
    /// summary's ratio). `max` is the sweep's largest size: the probe then
    /// streams tensors from and to memory as the all-reduce must.
    #[arg(long, value_delimiter = ',', default_value = "512K,max")]
    pub probe_span: Vec<String>,
    /// Also run a reference ring all-reduce without the library (blocking
    /// threads, one connection per link, same sub-chunk size and reduce
    /// kernel) on `--probe-mib` MiB of f32: the best this machine does with
    /// the same algorithm.
    #[arg(long)]
    pub reference: bool,
    /// Do not re-synchronize peers (untimed 4-byte all-reduce) after a verified iteration.
    #[arg(long)]
    pub no_barrier: bool,
    /// Measure control-plane latencies (are_peers_pending, 4-byte all-reduce) before the sweep.
    #[arg(long, default_value_t = 200)]
    pub latency_samples: u32,
    /// Seconds a peer waits to connect and for the world to reach N.
    #[arg(long, default_value_t = 120)]
    pub join_timeout_s: u64,
    /// The launcher aborts when no child reports anything for this many seconds.
    #[arg(long, default_value_t = 600)]
    pub idle_timeout_s: u64,
    /// IP the peer's listeners bind (default: 127.0.0.1 when the master is on loopback, else any).
    #[arg(long)]
    pub bind_ip: Option<IpAddr>,
    /// IP other peers should dial to reach this peer (NAT, several interfaces).
    #[arg(long)]
    pub advertise_ip: Option<IpAddr>,
    /// Internal: report machine-readable lines to a launcher (set by the launcher).
    #[arg(long, hide = true)]
    pub machine: bool,
    /// Internal: connections per link of one probe process.
    #[arg(long, hide = true, default_value_t = 1)]
    pub probe_conns_one: u32,
    /// Internal: the reference all-reduce skips the up-front copy of the
    /// input into the result (sends its own segment from the input and
    /// copies each received chunk's input part in just before reducing).
    #[arg(long, hide = true)]
    pub reference_no_copy: bool,
    /// Internal: this probe process runs the reference all-reduce as rank R of N (`R/N`).
    #[arg(long, hide = true)]
    pub reference_rank: Option<String>,
}

impl Args {
    /// The role, `--peer-only` folded in.
    pub fn effective_role(&self) -> Role {
        if self.peer_only {
            Role::Peer
        } else {
            self.role
        }
    }

    /// Sizes to run, in bytes, before rounding to whole elements.
    pub fn size_list(&self) -> Result<Vec<u64>> {
        if let Some(s) = &self.sizes {
            if s.is_empty() {
                return Err("--sizes is empty".into());
            }
            return Ok(s.clone());
        }
        if self.min_bytes == 0 || self.max_bytes < self.min_bytes {
            return Err(format!(
                "invalid sweep: --min-bytes {} --max-bytes {}",
                self.min_bytes, self.max_bytes
            )
            .into());
        }
        if self.step_factor < 2 {
            return Err("--step-factor must be at least 2".into());
        }
        let mut v = Vec::new();
        let mut s = self.min_bytes;
        while s <= self.max_bytes {
            v.push(s);
            match s.checked_mul(self.step_factor) {
                Some(n) => s = n,
                None => break,
            }
        }
        Ok(v)
    }

    /// `--probe-span` in bytes (`max`: the largest size), at least `--probe-buf`, deduplicated.
    pub fn probe_spans(&self) -> Result<Vec<u64>> {
        let max = self.size_list()?.into_iter().max().unwrap_or(0);
        let mut v = Vec::new();
        for s in &self.probe_span {
            let b = if s.trim().eq_ignore_ascii_case("max") {
                max
            } else {
                parse_size(s)?
            }
            .max(self.probe_buf);
            if !v.contains(&b) {
                v.push(b);
            }
        }
        if v.is_empty() {
            return Err("--probe-span is empty".into());
        }
        Ok(v)
    }

    /// Checks option combinations common to all roles.
    pub fn validate(&self) -> Result<()> {
        if self.peers < 1 {
            return Err("-n/--peers must be at least 1".into());
        }
        if self.pool_size.is_empty() || self.pool_size.contains(&0) {
            return Err("--pool-size values must be at least 1".into());
        }
        if self.concurrency.is_empty() || self.concurrency.contains(&0) {
            return Err("--concurrency values must be at least 1".into());
        }
        if self.collective != Collective::AllReduce {
            if self.quant.is_some() || self.concurrency.iter().any(|&c| c != 1) {
                return Err(format!(
                    "--collective {} runs without --quant and with --concurrency 1",
                    self.collective.name()
                )
                .into());
            }
            if self.algorithm.contains(&Algorithm::Direct) {
                return Err(format!(
                    "--algorithm direct is for all-reduce only, not {}",
                    self.collective.name()
                )
                .into());
            }
        }
        if let Some(q) = self.quant {
            pccl_core::quant::validate(self.dtype, self.quant_dtype, q.algorithm(), self.op)
                .context("invalid quantization options")?;
        }
        self.probe_spans()?;
        if self.probe_rounds == 0 || self.probe_mib == 0 || self.probe_buf == 0 {
            return Err("--probe-rounds, --probe-mib and --probe-buf must be positive".into());
        }
        self.size_list().map(|_| ())
    }
}

/// Parses `4`, `64K`, `1M`, `1.5G`, `256MiB`, `1KB` (powers of 1024).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, mult) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 1u64 << 10),
        Some('m') => (&stripped[..stripped.len() - 1], 1 << 20),
        Some('g') => (&stripped[..stripped.len() - 1], 1 << 30),
        _ => (stripped, 1),
    };
    let num = num.trim();
    let bytes = if let Ok(n) = num.parse::<u64>() {
        n.checked_mul(mult)
    } else if let Ok(f) = num.parse::<f64>() {
        let b = f * mult as f64;
        (f.is_finite() && f >= 0.0 && b < u64::MAX as f64).then_some(b.round() as u64)
    } else {
        None
    };
    bytes.ok_or_else(|| format!("invalid size {s:?} (examples: 4, 64K, 1M, 256M, 1G)"))
}

/// Parses a data type name.
pub fn parse_dtype(s: &str) -> std::result::Result<DataType, String> {
    let l = s.trim().to_ascii_lowercase();
    let alias = match l.as_str() {
        "float" | "float32" => "f32",
        "double" | "float64" => "f64",
        "half" | "float16" => "f16",
        "bfloat16" => "bf16",
        "uint8" => "u8",
        "int8" => "i8",
        "uint16" => "u16",
        "int16" => "i16",
        "uint32" => "u32",
        "int32" => "i32",
        "uint64" => "u64",
        "int64" => "i64",
        other => other,
    };
    DataType::ALL
        .into_iter()
        .find(|d| d.name() == alias)
        .ok_or_else(|| format!("unknown data type {s:?}"))
}

/// Parses a reduce operation name.
pub fn parse_op(s: &str) -> std::result::Result<ReduceOp, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "sum" => Ok(ReduceOp::Sum),
        "avg" | "mean" => Ok(ReduceOp::Avg),
        "prod" => Ok(ReduceOp::Prod),
        "max" => Ok(ReduceOp::Max),
        "min" => Ok(ReduceOp::Min),
        _ => Err(format!("unknown reduce op {s:?} (sum avg prod max min)")),
    }
}

/// Lower-case name of a reduce operation.
pub fn op_name(op: ReduceOp) -> &'static str {
    match op {
        ReduceOp::Sum => "sum",
        ReduceOp::Avg => "avg",
        ReduceOp::Prod => "prod",
        ReduceOp::Max => "max",
        ReduceOp::Min => "min",
    }
}

/// CPU time (user + system, all threads) this process has used, in µs;
/// NaN when the kernel does not say.
pub fn process_cpu_us() -> f64 {
    // SAFETY: `getrusage` only writes the struct we pass, which is plain data
    // valid when zeroed.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a `rusage` we own.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// `1.5 MiB`-style rendering of a byte count.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 && (b >> (10 * (u + 1))) << (10 * (u + 1)) == b {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 && b >= 1024 {
        // Not a whole number of KiB: show a fraction.
        let mut v = b as f64;
        let mut u = 0;
        while v >= 1024.0 && u < UNITS.len() - 1 {
            v /= 1024.0;
            u += 1;
        }
        return format!("{v:.2} {}", UNITS[u]);
    }
    format!("{v} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4"), Ok(4));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert!(parse_size("x").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn sweep() {
        let a = Args::parse_from(["pccl-bench", "-b", "4", "-e", "64"]);
        assert_eq!(a.size_list().unwrap(), vec![4, 8, 16, 32, 64]);
        let a = Args::parse_from(["pccl-bench", "--sizes", "4,1M"]);
        assert_eq!(a.size_list().unwrap(), vec![4, 1 << 20]);
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(4), "4 B");
        assert_eq!(human_bytes(1 << 20), "1 MiB");
        assert_eq!(human_bytes(128 << 20), "128 MiB");
        assert_eq!(human_bytes(1536), "1.50 KiB");
    }
}
