//! Single-core throughput of the all-reduce compute kernels: `reduce_into`,
//! `quantize`, `dequantize_into` and the fused `quantize_adopt` /
//! `dequantize_reduce_from` (next to the compositions they replace). Figures are GB/s of *source* bytes (one
//! operand of `dst[i] = op(dst[i], src[i])`; the float tensor being encoded or
//! decoded), measured on one thread, i.e. per core.
//!
//! ```text
//! cargo run --release -p pccl-stress --bin kernel-bench -- --mib 64 --secs 1
//! cargo run --release -p pccl-stress --bin kernel-bench -- --kib 512 --secs 1 --filter f32
//! ```

use clap::Parser;
use pccl_core::{kernels, quant, DataType, QuantizationAlgorithm, ReduceOp};
use std::hint::black_box;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Per-core throughput of PCCL's reduce and quantization kernels")]
struct Args {
    /// Size of the source buffer of each benchmark, in MiB (use more than the
    /// last-level cache to measure memory bandwidth, e.g. 64).
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Size of the source buffer in KiB instead (e.g. 512, the default ring
    /// sub-chunk); overrides --mib.
    #[arg(long)]
    kib: Option<usize>,
    /// Minimum measuring time per benchmark, in seconds.
    #[arg(long, default_value_t = 1.0)]
    secs: f64,
    /// Only run benchmarks whose name contains this string.
    #[arg(long)]
    filter: Option<String>,
}

/// Deterministic pseudo-random bytes that are valid, finite values of `dtype`
/// (roughly normal around 0 for floats).
fn fill(dtype: DataType, bytes: &mut [u8], seed: u64) {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut gauss = || {
        // Sum of 4 uniforms: cheap, bell-shaped, in [-2, 2).
        (0..4)
            .map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32)
            .sum::<f32>()
            - 2.0
    };
    match dtype {
        DataType::F32 => {
            for c in bytes.chunks_exact_mut(4) {
                c.copy_from_slice(&gauss().to_ne_bytes());
            }
        }
        DataType::F16 => {
            for c in bytes.chunks_exact_mut(2) {
                c.copy_from_slice(&kernels::f32_to_f16_bits(gauss()).to_ne_bytes());
            }
        }
        DataType::BF16 => {
            for c in bytes.chunks_exact_mut(2) {
                c.copy_from_slice(&kernels::f32_to_bf16_bits(gauss()).to_ne_bytes());
            }
        }
        DataType::F64 => {
            for c in bytes.chunks_exact_mut(8) {
                c.copy_from_slice(&(gauss() as f64).to_ne_bytes());
            }
        }
        _ => {
            for b in bytes.iter_mut() {
                *b = (next() >> 56) as u8;
            }
        }
    }
}

/// Runs `f` until `secs` have passed (after one warm-up call); returns GB/s
/// for `bytes` processed per call.
fn measure(bytes: usize, secs: f64, mut f: impl FnMut()) -> f64 {
    f();
    let budget = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < budget || calls < 3 {
        f();
        calls += 1;
    }
    let t = start.elapsed().as_secs_f64();
    (bytes as f64 * calls as f64) / t / 1e9
}

fn report(name: &str, gbps: f64) {
    println!("{name:<40} {gbps:>8.2} GB/s");
}

fn main() {
    let args = Args::parse();
    let (len, size) = match args.kib {
        Some(k) => (k.max(1) << 10, format!("{} KiB", k.max(1))),
        None => (args.mib.max(1) << 20, format!("{} MiB", args.mib.max(1))),
    };
    let wanted = |name: &str| args.filter.as_deref().is_none_or(|f| name.contains(f));
    println!(
        "kernel-bench: {size} source per call, >= {} s per benchmark, 1 thread; GB/s of source bytes",
        args.secs
    );

    if wanted("memcpy") {
        // Reference point: a plain copy of the same size (reads one buffer,
        // writes another), i.e. what "memory bandwidth" means on this core.
        let src = vec![1u8; len];
        let mut dst = vec![0u8; len];
        let gbps = measure(len, args.secs, || {
            black_box(&mut dst).copy_from_slice(black_box(&src));
        });
        report("memcpy (reference)", gbps);
    }

    for (dtype, op) in [
        (DataType::F32, ReduceOp::Sum),
        (DataType::BF16, ReduceOp::Sum),
        (DataType::F16, ReduceOp::Sum),
        (DataType::I32, ReduceOp::Sum),
        (DataType::F32, ReduceOp::Max),
        (DataType::F64, ReduceOp::Sum),
    ] {
        let name = format!("reduce_into {} {:?}", dtype.name(), op);
        if !wanted(&name) {
            continue;
        }
        let mut dst = vec![0u8; len];
        let mut src = vec![0u8; len];
        fill(dtype, &mut dst, 1);
        fill(dtype, &mut src, 2);
        let gbps = measure(len, args.secs, || {
            // Values drift over the repetitions but stay finite for any sane run length.
            kernels::reduce_into(dtype, op, black_box(&mut dst), black_box(&src));
        });
        report(&name, gbps);
    }

    let combos = [
        (DataType::F32, DataType::U8, QuantizationAlgorithm::MinMax),
        (
            DataType::F32,
            DataType::U8,
            QuantizationAlgorithm::ZeroPointScale,
        ),
        (DataType::F32, DataType::U16, QuantizationAlgorithm::MinMax),
        (DataType::BF16, DataType::U8, QuantizationAlgorithm::MinMax),
        (DataType::F16, DataType::U8, QuantizationAlgorithm::MinMax),
        (DataType::F64, DataType::U8, QuantizationAlgorithm::MinMax),
    ];
    for (src_t, q, algo) in combos {
        let tag = format!("{}->{} {:?}", src_t.name(), q.name(), algo);
        let qname = format!("quantize {tag}");
        let dname = format!("dequantize {tag}");
        let dsname = format!("dequantize+sum {tag}");
        // The segment owner's work, composed and fused.
        let qdname = format!("quantize;dequantize {tag}");
        let qaname = format!("quantize_adopt {tag}");
        let cdname = format!("copy;dequantize+sum {tag}");
        let drname = format!("dequantize_reduce_from sum {tag}");
        let names = [&qname, &dname, &dsname, &qdname, &qaname, &cdname, &drname];
        if !names.iter().any(|n| wanted(n)) {
            continue;
        }
        let mut src = vec![0u8; len];
        fill(src_t, &mut src, 3);
        let n = len / src_t.size();
        let mut enc = vec![0u8; quant::encoded_len(src_t, q, algo, n)];
        if let Err(e) = quant::quantize(src_t, q, algo, &src, &mut enc) {
            eprintln!("{qname}: {e}");
            continue;
        }
        if wanted(&qname) {
            let gbps = measure(len, args.secs, || {
                let r = quant::quantize(src_t, q, algo, black_box(&src), black_box(&mut enc));
                black_box(r).ok();
            });
            report(&qname, gbps);
        }
        let mut dst = src.clone();
        if wanted(&dname) {
            let gbps = measure(len, args.secs, || {
                let r = quant::dequantize_into(
                    src_t,
                    q,
                    algo,
                    None,
                    black_box(&enc),
                    black_box(&mut dst),
                );
                black_box(r).ok();
            });
            report(&dname, gbps);
        }
        if wanted(&dsname) {
            let gbps = measure(len, args.secs, || {
                let r = quant::dequantize_into(
                    src_t,
                    q,
                    algo,
                    Some(ReduceOp::Sum),
                    black_box(&enc),
                    black_box(&mut dst),
                );
                black_box(r).ok();
            });
            report(&dsname, gbps);
        }
        if wanted(&qdname) {
            let mut data = src.clone();
            let gbps = measure(len, args.secs, || {
                // Restore the input so every call encodes the same values.
                black_box(&mut data).copy_from_slice(black_box(&src));
                let r = quant::quantize(src_t, q, algo, black_box(&data), black_box(&mut enc));
                black_box(r).ok();
                let r = quant::dequantize_into(src_t, q, algo, None, &enc, black_box(&mut data));
                black_box(r).ok();
            });
            report(&qdname, gbps);
        }
        if wanted(&qaname) {
            let mut data = src.clone();
            let gbps = measure(len, args.secs, || {
                black_box(&mut data).copy_from_slice(black_box(&src));
                let r = quant::quantize_adopt(
                    src_t,
                    q,
                    algo,
                    black_box(&mut data),
                    black_box(&mut enc),
                );
                black_box(r).ok();
            });
            report(&qaname, gbps);
        }
        if wanted(&cdname) {
            let gbps = measure(len, args.secs, || {
                black_box(&mut dst).copy_from_slice(black_box(&src));
                let r = quant::dequantize_into(
                    src_t,
                    q,
                    algo,
                    Some(ReduceOp::Sum),
                    black_box(&enc),
                    black_box(&mut dst),
                );
                black_box(r).ok();
            });
            report(&cdname, gbps);
        }
        if wanted(&drname) {
            let gbps = measure(len, args.secs, || {
                let r = quant::dequantize_reduce_from(
                    src_t,
                    q,
                    algo,
                    ReduceOp::Sum,
                    black_box(&src),
                    black_box(&enc),
                    black_box(&mut dst),
                );
                black_box(r).ok();
            });
            report(&drname, gbps);
        }
    }
}
