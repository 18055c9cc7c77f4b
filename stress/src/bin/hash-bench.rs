//! Throughput of the tensor hash (`pccl_core::hash`, see docs/hashing.md).
//!
//! For each size it hashes one buffer repeatedly, single-threaded
//! (`tensor_hash_with_threads(.., 1)`), with N threads, and through the
//! streaming hasher (fed in `--piece` pieces), and prints GB/s (10^9 bytes per
//! second). Repeats run in batches of at least `--batch-ms`; the median and
//! best batch are shown. The same buffer is hashed again and again, so sizes
//! that fit in the CPU caches measure hot-cache speed and large ones memory
//! speed. A last table compares hashing many tensors one by one with
//! `tensor_hashes` (one set of threads for all).
//!
//! ```text
//! cargo run --release -p pccl-stress --bin hash-bench -- --sizes 4K,1M,64M,1G --threads 2
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use clap::Parser;
use pccl_core::hash::{
    tensor_hash, tensor_hash_with_threads, tensor_hashes_with_threads, StreamingTensorHasher,
};

#[derive(Parser, Debug)]
#[command(about = "Measure tensor-hash throughput (GB/s) single-threaded and multi-threaded")]
struct Args {
    /// Buffer sizes, comma separated, with optional K/M/G suffix (powers of 1024).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4K,64K,256K,1M,4M,16M,64M,256M,1G"
    )]
    sizes: Vec<String>,
    /// Threads for the multi-threaded column (default: available parallelism).
    #[arg(long)]
    threads: Option<usize>,
    /// Minimum measuring time per size and mode, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    min_ms: u64,
    /// Minimum duration of one timed batch, in milliseconds.
    #[arg(long, default_value_t = 20)]
    batch_ms: u64,
    /// Piece size fed to the streaming hasher (K/M/G suffix allowed).
    #[arg(long, default_value = "256K")]
    piece: String,
    /// Skip the streaming column.
    #[arg(long)]
    no_stream: bool,
    /// Many-tensor table: total bytes split into `--tensors` equal tensors; 0 to skip.
    #[arg(long, default_value = "256M")]
    batch_total: String,
    /// Number of tensors in the many-tensor table.
    #[arg(long, default_value_t = 256)]
    tensors: usize,
}

fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (digits, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1usize << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    digits
        .trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?}"))
}

fn human(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// Deterministic pseudo-random contents (splitmix64), so runs are comparable.
fn fill(buf: &mut [u8]) {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in buf.chunks_mut(8) {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

/// Runs `f` (which hashes `bytes` bytes) in batches; returns (median, best) GB/s.
fn measure(bytes: usize, min: Duration, batch: Duration, mut f: impl FnMut() -> u64) -> (f64, f64) {
    // Warm up and calibrate the batch length.
    let start = Instant::now();
    black_box(f());
    let once = start.elapsed().max(Duration::from_nanos(1));
    let per_batch = (batch.as_secs_f64() / once.as_secs_f64()).ceil().max(1.0) as u64;
    let mut rates = Vec::new();
    let begin = Instant::now();
    while rates.len() < 3 || begin.elapsed() < min {
        let t = Instant::now();
        for _ in 0..per_batch {
            black_box(f());
        }
        let secs = t.elapsed().as_secs_f64().max(1e-12);
        rates.push(bytes as f64 * per_batch as f64 / secs / 1e9);
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    (rates[rates.len() / 2], rates[rates.len() - 1])
}

fn main() {
    let args = Args::parse();
    let sizes: Vec<usize> = match args.sizes.iter().map(|s| parse_size(s)).collect() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let (piece, batch_total) = match (parse_size(&args.piece), parse_size(&args.batch_total)) {
        (Ok(p), Ok(b)) if p > 0 => (p, b),
        _ => {
            eprintln!("error: bad --piece or --batch-total");
            std::process::exit(2);
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.threads.unwrap_or(cores).max(1);
    let min = Duration::from_millis(args.min_ms);
    let batch = Duration::from_millis(args.batch_ms.max(1));
    let max_size = sizes.iter().copied().max().unwrap_or(0).max(batch_total);
    let mut buf = vec![0u8; max_size];
    fill(&mut buf);

    println!(
        "tensor hash throughput, GB/s = 1e9 bytes/s; available_parallelism = {cores}; N = {threads} threads"
    );
    println!(
        "{:>9} | {:>13} {:>8} | {:>13} {:>8} | {:>13} {:>8} | {:>16}",
        "size",
        "1 thread med",
        "best",
        "N threads med",
        "best",
        "stream med",
        "best",
        "tensor_hash med"
    );
    for &size in &sizes {
        let data = &buf[..size];
        let (m1, b1) = measure(size, min, batch, || tensor_hash_with_threads(data, 1));
        let (mn, bn) = measure(size, min, batch, || tensor_hash_with_threads(data, threads));
        let (ms, bs) = if args.no_stream {
            (f64::NAN, f64::NAN)
        } else {
            measure(size, min, batch, || {
                let mut h = StreamingTensorHasher::new();
                for p in data.chunks(piece) {
                    h.update(p);
                }
                h.finish()
            })
        };
        let (md, _) = measure(size, min, batch, || tensor_hash(data));
        println!(
            "{:>9} | {:>13.2} {:>8.2} | {:>13.2} {:>8.2} | {:>13.2} {:>8.2} | {:>16.2}",
            human(size),
            m1,
            b1,
            mn,
            bn,
            ms,
            bs,
            md
        );
    }

    if batch_total > 0 && args.tensors > 0 {
        let each = batch_total / args.tensors;
        let tensors: Vec<&[u8]> = buf.chunks(each.max(1)).take(args.tensors).collect();
        let total: usize = tensors.iter().map(|t| t.len()).sum();
        println!();
        println!(
            "{} tensors of {} ({} total), N = {threads} threads",
            tensors.len(),
            human(each),
            human(total)
        );
        let (ml, bl) = measure(total, min, batch, || {
            tensors
                .iter()
                .map(|t| tensor_hash_with_threads(t, threads))
                .fold(0, |a, h| a ^ h)
        });
        let (mb, bb) = measure(total, min, batch, || {
            tensor_hashes_with_threads(&tensors, threads)
                .into_iter()
                .fold(0, |a, h| a ^ h)
        });
        println!("  one by one (tensor_hash_with_threads): median {ml:.2} GB/s, best {bl:.2}");
        println!("  batched    (tensor_hashes_with_threads): median {mb:.2} GB/s, best {bb:.2}");
    }
}
