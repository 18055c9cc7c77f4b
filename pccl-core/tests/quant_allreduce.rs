//! Quantized ring all-reduce over real loopback sockets, for every
//! quantization algorithm × quantized type × source type, with 2, 3 and 4
//! in-process peers.
//!
//! Every run checks, against quantities the test computes on its own from
//! the inputs (nothing is taken from the library but the result):
//!
//! 1. every peer's receive buffer is bit-identical to every other peer's;
//! 2. each element is within the error bound of `docs/quantization.md`
//!    ("A bound in terms of the inputs") of the exact result computed in
//!    `f64`, the bound being a function of the per-block ranges of the
//!    peers' inputs over the ring's quantization blocks;
//! 3. blocks in which every peer's input is constant come back exactly (bit
//!    for bit), and a NaN/±inf anywhere in a block at any peer makes that
//!    whole block the canonical NaN on every peer, without touching other
//!    blocks;
//! 4. `tx_bytes` / `rx_bytes` equal the wire volume of the ring schedule
//!    exactly (segments, 512 KiB sub-chunks aligned to 1024-element blocks,
//!    40-byte frame headers, `encoded_len` payloads).
//!
//! Inputs come from a seeded splitmix64 generator, so every run is the same.

mod common;

use std::sync::Arc;

use common::*;
use half::{bf16, f16};
use pccl_core::{
    Communicator, DataType, Error, QuantizationAlgorithm, QuantizationOptions, ReduceDescriptor,
    ReduceInfo, ReduceOp,
};

/// Elements per quantization block (docs/quantization.md, "Byte layout").
const BLOCK: usize = 1024;
/// Bytes of the header in front of every data frame.
const FRAME_HEADER: u64 = 40;

const ALGOS: [QuantizationAlgorithm; 2] = [
    QuantizationAlgorithm::MinMax,
    QuantizationAlgorithm::ZeroPointScale,
];
const QTYPES: [DataType; 4] = [DataType::U8, DataType::I8, DataType::U16, DataType::I16];
const SOURCES: [DataType; 4] = [DataType::F32, DataType::F64, DataType::F16, DataType::BF16];
const OPS: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min];
/// Odd element counts run for every combination (plus one large count
/// whose segments span more than one sub-chunk).
const SMALL_COUNTS: [usize; 4] = [1, 3, 1023, 1025];

// ---------------------------------------------------------------------------
// Deterministic random numbers
// ---------------------------------------------------------------------------

/// splitmix64: tiny, fast, and fixed forever (unlike a library RNG).
struct SplitMix(u64);

impl SplitMix {
    fn new(seed: u64) -> Self {
        let mut r = SplitMix(seed ^ 0x5851_f42d_4c95_7f2d);
        r.next_u64();
        r
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [a, b).
    fn range(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * self.unit()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit(); // (0, 1]
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

fn mix(a: u64, b: u64) -> u64 {
    SplitMix::new(a.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ b).next_u64()
}

// ---------------------------------------------------------------------------
// Source types
// ---------------------------------------------------------------------------

/// Rounds `x` to the source type (values the test feeds are exactly these).
fn round_src(src: DataType, x: f64) -> f64 {
    match src {
        DataType::F16 => f16::from_f64(x).to_f64(),
        DataType::BF16 => bf16::from_f64(x).to_f64(),
        DataType::F32 => x as f32 as f64,
        DataType::F64 => x,
        _ => unreachable!(),
    }
}

fn to_bytes(src: DataType, xs: &[f64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() * src.size());
    for &x in xs {
        match src {
            DataType::F16 => out.extend(f16::from_f64(x).to_ne_bytes()),
            DataType::BF16 => out.extend(bf16::from_f64(x).to_ne_bytes()),
            DataType::F32 => out.extend((x as f32).to_ne_bytes()),
            DataType::F64 => out.extend(x.to_ne_bytes()),
            _ => unreachable!(),
        }
    }
    out
}

/// Element `i` of a source-type buffer, as f64, and its raw bits.
fn elem(src: DataType, b: &[u8], i: usize) -> (f64, u64) {
    let s = src.size();
    let c = &b[i * s..(i + 1) * s];
    match src {
        DataType::F16 => {
            let v = f16::from_ne_bytes([c[0], c[1]]);
            (v.to_f64(), v.to_bits() as u64)
        }
        DataType::BF16 => {
            let v = bf16::from_ne_bytes([c[0], c[1]]);
            (v.to_f64(), v.to_bits() as u64)
        }
        DataType::F32 => {
            let v = f32::from_ne_bytes(c.try_into().unwrap());
            (v as f64, v.to_bits() as u64)
        }
        DataType::F64 => {
            let v = f64::from_ne_bytes(c.try_into().unwrap());
            (v, v.to_bits())
        }
        _ => unreachable!(),
    }
}

/// Bits of `x` (exactly representable) in the source type.
fn src_bits(src: DataType, x: f64) -> u64 {
    match src {
        DataType::F16 => f16::from_f64(x).to_bits() as u64,
        DataType::BF16 => bf16::from_f64(x).to_bits() as u64,
        DataType::F32 => (x as f32).to_bits() as u64,
        DataType::F64 => x.to_bits(),
        _ => unreachable!(),
    }
}

/// The canonical NaN a non-finite block decodes to (docs: "NaN and infinity").
fn canonical_nan(src: DataType) -> u64 {
    match src {
        DataType::F16 => 0x7e00,
        DataType::BF16 => 0x7fc0,
        DataType::F32 => 0x7fc0_0000,
        DataType::F64 => 0x7ff8_0000_0000_0000,
        _ => unreachable!(),
    }
}

/// Largest magnitude the test lets a single input reach, so that no sum of
/// up to four peers overflows the source type.
fn input_cap(src: DataType) -> f64 {
    match src {
        DataType::F16 => 8000.0,
        DataType::BF16 | DataType::F32 => 1e36,
        _ => 1e300,
    }
}

/// (explicit mantissa bits, minimum normal exponent) of a float type.
fn fmt_of(t: DataType) -> (i32, i32) {
    match t {
        DataType::F16 => (10, -14),
        DataType::BF16 => (7, -126),
        DataType::F32 => (23, -126),
        DataType::F64 => (52, -1022),
        _ => unreachable!(),
    }
}

/// 2^e for any e a float format needs (subnormal powers included).
fn pow2(e: i32) -> f64 {
    if e >= -1022 {
        f64::from_bits(((e + 1023) as u64) << 52)
    } else {
        f64::from_bits(1u64 << (e + 1074))
    }
}

/// Unit in the last place of magnitudes up to `m` in format `t` (an upper
/// bound: the ulp of the binade just above `m`).
fn ulp(t: DataType, m: f64) -> f64 {
    let (mant, min_exp) = fmt_of(t);
    let e = if m > 0.0 && m.is_finite() {
        (((m.to_bits() >> 52) & 0x7ff) as i32 - 1023).max(min_exp)
    } else {
        min_exp
    };
    pow2(e - mant)
}

// ---------------------------------------------------------------------------
// Ring geometry (mirrors the schedule described in collectives.rs / the docs)
// ---------------------------------------------------------------------------

/// Segment `s` of `w` covers elements [s*n/w, (s+1)*n/w).
fn seg_range(n: usize, w: usize, s: usize) -> (usize, usize) {
    let f = |k: usize| (k as u128 * n as u128 / w as u128) as usize;
    (f(s), f(s + 1))
}

/// Elements per sub-chunk of an `n`-element op of `w` peers, as the ring
/// cuts it (`collectives::pipelined_chunk_elems`): the segment in 16, but
/// no less than 64 KiB and no more than `chunk_bytes` of source elements,
/// rounded down to whole quantization blocks (at least one block).
fn chunk_elems(src: DataType, chunk_bytes: usize, n: usize, w: usize) -> usize {
    let cap = (chunk_bytes / src.size()).max(1);
    let floor = ((64 << 10) / src.size()).max(1);
    let e = n.div_ceil(w).div_ceil(16).max(floor).min(cap);
    (e / BLOCK).max(1) * BLOCK
}

/// Sub-chunks of segment `s`: (first element, element count).
fn chunks(n: usize, w: usize, ce: usize, s: usize) -> Vec<(usize, usize)> {
    let (a, b) = seg_range(n, w, s);
    (a..b).step_by(ce).map(|c| (c, ce.min(b - c))).collect()
}

/// The quantization blocks of the ring: each sub-chunk is encoded on its
/// own, so blocks start at every sub-chunk start and every 1024 elements
/// after it.
fn ring_blocks(n: usize, w: usize, ce: usize) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for s in 0..w {
        for (c0, m) in chunks(n, w, ce, s) {
            for b in (0..m).step_by(BLOCK) {
                v.push((c0 + b, BLOCK.min(m - b)));
            }
        }
    }
    assert_eq!(
        v.iter().map(|b| b.1).sum::<usize>(),
        n,
        "blocks cover the buffer"
    );
    v
}

/// Encoded bytes of `m` elements: per block two metadata values of the
/// compute type (f64 for f64 sources, f32 otherwise), then one code each.
fn encoded_len(src: DataType, q: DataType, m: usize) -> u64 {
    let meta = if src == DataType::F64 { 16 } else { 8 };
    (m.div_ceil(BLOCK) * meta + m * q.size()) as u64
}

/// Wire bytes of one transmission of segment `s`: a frame per sub-chunk.
fn segment_wire(n: usize, w: usize, ce: usize, src: DataType, q: DataType, s: usize) -> u64 {
    chunks(n, w, ce, s)
        .iter()
        .map(|&(_, m)| FRAME_HEADER + encoded_len(src, q, m))
        .sum()
}

/// Expected (tx, rx) bytes of each rank. Textbook ring: in reduce-scatter
/// step k (0..w-1) rank r sends segment r-k and receives r-1-k; in
/// all-gather step j (0..w-1) it sends r+1-j and receives r-j (mod w).
fn expected_traffic(n: usize, w: usize, ce: usize, src: DataType, q: DataType) -> Vec<(u64, u64)> {
    let seg = |s: usize| segment_wire(n, w, ce, src, q, s);
    let m = |x: isize| x.rem_euclid(w as isize) as usize;
    (0..w as isize)
        .map(|r| {
            let mut tx = 0;
            let mut rx = 0;
            for k in 0..w as isize - 1 {
                tx += seg(m(r - k)) + seg(m(r + 1 - k));
                rx += seg(m(r - 1 - k)) + seg(m(r - k));
            }
            (tx, rx)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Normal,
    Uniform,
    /// Normal with 1 % of the elements 1000 times larger.
    HeavyTailed,
    /// Every peer's block is constant (a different constant per peer).
    AllEqual,
    /// Normal, with one or two NaN/±inf elements at some peer(s).
    NonFinite,
}

const KINDS: [Kind; 5] = [
    Kind::Normal,
    Kind::Uniform,
    Kind::HeavyTailed,
    Kind::AllEqual,
    Kind::NonFinite,
];

#[derive(Debug, Clone, Copy)]
struct Case {
    src: DataType,
    q: DataType,
    algo: QuantizationAlgorithm,
    op: ReduceOp,
    n: usize,
    seed: u64,
    /// Kind of the first block (later blocks cycle through `KINDS`).
    kind0: usize,
}

/// A scale for the run's values, varied per seed and kept far from the
/// source type's limits.
fn scale_of(src: DataType, seed: u64) -> f64 {
    let opts: &[f64] = match src {
        DataType::F16 => &[0.01, 0.5, 1.0],
        DataType::BF16 | DataType::F32 => &[1e-3, 1.0, 3e4],
        _ => &[1e-6, 1.0, 1e12],
    };
    opts[(seed % opts.len() as u64) as usize]
}

/// Per-peer inputs (exact source-type values) and the kind of each block.
fn gen_inputs(c: &Case, w: usize, blocks: &[(usize, usize)]) -> (Vec<Vec<f64>>, Vec<Kind>) {
    let mut xs = vec![vec![0f64; c.n]; w];
    let mut kinds = Vec::with_capacity(blocks.len());
    let s = scale_of(c.src, c.seed);
    let cap = input_cap(c.src);
    for (bi, &(b0, m)) in blocks.iter().enumerate() {
        let kind = KINDS[(bi + c.kind0) % KINDS.len()];
        kinds.push(kind);
        let mut rng = SplitMix::new(mix(c.seed, bi as u64));
        // A third of the blocks sit off zero (ZeroPointScale's wide case).
        let offset = if rng.below(3) == 0 {
            s * rng.range(-20.0, 20.0)
        } else {
            0.0
        };
        match kind {
            Kind::AllEqual => {
                // Constants m·2^e with |m| < 16 and a per-block e: every
                // partial sum of up to 4 peers is exact in every source type.
                let e = match c.src {
                    DataType::F16 => rng.below(13) as i32 - 8,
                    _ => rng.below(41) as i32 - 20,
                };
                let zero = rng.below(8) == 0;
                for x in xs.iter_mut() {
                    let v = if zero {
                        if rng.below(2) == 0 {
                            0.0
                        } else {
                            -0.0
                        }
                    } else {
                        (rng.below(31) as f64 - 15.0) * pow2(e)
                    };
                    x[b0..b0 + m].fill(v);
                }
            }
            _ => {
                for x in xs.iter_mut() {
                    for v in &mut x[b0..b0 + m] {
                        let r = match kind {
                            Kind::Uniform => offset + s * rng.range(-1.0, 1.0),
                            Kind::HeavyTailed => {
                                let k = if rng.below(100) == 0 { 1000.0 } else { 1.0 };
                                offset + s * k * rng.normal()
                            }
                            _ => offset + s * rng.normal(),
                        };
                        *v = round_src(c.src, r.clamp(-cap, cap));
                    }
                }
                if kind == Kind::NonFinite {
                    let bad = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
                    for _ in 0..1 + rng.below(2) {
                        let p = rng.below(w);
                        let i = b0 + rng.below(m);
                        xs[p][i] = bad[rng.below(3)];
                    }
                }
            }
        }
    }
    (xs, kinds)
}

// ---------------------------------------------------------------------------
// The documented error bound, in terms of the inputs
// ---------------------------------------------------------------------------

/// Per-peer statistics of one block: (lo, hi) range as the algorithm sees
/// it (ZeroPointScale widens it to contain 0) and the largest magnitude.
#[derive(Clone, Copy)]
struct PeerBlock {
    lo: f64,
    hi: f64,
    mag: f64,
}

/// Statistics of the finite elements of one peer's block (`None` if it has
/// none; non-finite elements only reach here when Max/Min absorb them).
fn peer_block(xs: &[f64], algo: QuantizationAlgorithm) -> Option<PeerBlock> {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for &x in xs.iter().filter(|x| x.is_finite()) {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if lo > hi {
        return None;
    }
    if algo == QuantizationAlgorithm::ZeroPointScale {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
    }
    Some(PeerBlock {
        lo,
        hi,
        mag: lo.abs().max(hi.abs()),
    })
}

/// The single-quantization bound of quant.rs / docs ("Error bound per
/// element") for a block of range at most `r` and magnitude at most `m`:
/// Δ/2 + 8·ε_C·M + qmax·τ_C (+ ½ ulp_src(M + Δ) for 16-bit sources).
fn quant_err(src: DataType, q: DataType, r: f64, m: f64) -> f64 {
    if q.size() >= 4 {
        // Wide codes (quant.rs, "Wide codes"): f64 arithmetic, qmax 2^32 − 1
        // or 2^53 − 1, doubled for f32 sources by the rounding to f32.
        let qmax = if q.size() == 4 {
            u32::MAX as f64
        } else {
            ((1u64 << 53) - 1) as f64
        };
        let e = r / qmax / 2.0 + 8.0 * pow2(-53) * m + qmax * pow2(-1074);
        return if src == DataType::F32 { 2.0 * e } else { e };
    }
    let qmax = if q.size() == 1 { 255.0 } else { 65535.0 };
    let delta = r / qmax;
    let (eps, tau) = if src == DataType::F64 {
        (pow2(-53), pow2(-1074))
    } else {
        (pow2(-24), pow2(-149))
    };
    let mut e = delta / 2.0 + 8.0 * eps * m + qmax * tau;
    if src.size() == 2 {
        e += 0.5 * ulp(src, m + delta);
    }
    e
}

/// Rounding of a reduction result of magnitude up to `m` back to the source
/// type (16-bit types are computed in f32 first: two roundings).
fn op_rounding(src: DataType, m: f64) -> f64 {
    let mut e = 0.5 * ulp(src, m);
    if src.size() == 2 {
        e += 0.5 * ulp(DataType::F32, m);
    }
    e
}

/// Bound on |result − exact| for every element of one block, given each
/// peer's block statistics (docs/quantization.md, "A bound in terms of the
/// inputs"). It holds whatever the ring order, so the test does not need to
/// know which peer got which rank.
fn block_bound(c: &Case, w: usize, pb: &[PeerBlock]) -> f64 {
    let (src, q) = (c.src, c.q);
    let wf = w as f64;
    let mut err = 0.0; // bound on |P_k − S_k| of the partial result held
    let (r_final, m_final) = match c.op {
        ReduceOp::Sum | ReduceOp::Avg => {
            // A partial result of k peers has range ≤ the k largest ranges
            // summed, magnitude ≤ the k largest magnitudes summed.
            let mut ranges: Vec<f64> = pb.iter().map(|p| p.hi - p.lo).collect();
            let mut mags: Vec<f64> = pb.iter().map(|p| p.mag).collect();
            ranges.sort_by(|a, b| b.total_cmp(a));
            mags.sort_by(|a, b| b.total_cmp(a));
            let top = |v: &[f64], k: usize| v[..k].iter().sum::<f64>();
            for k in 1..w {
                // Hop k: the partial of k peers is quantized, decoded, and
                // combined with the next peer's input (rounded to the source type).
                let d = err + quant_err(src, q, top(&ranges, k) + 2.0 * err, top(&mags, k) + err);
                err = d + op_rounding(src, top(&mags, k + 1) + d);
            }
            let (mut r, mut m) = (top(&ranges, w), top(&mags, w));
            if c.op == ReduceOp::Avg {
                r /= wf;
                m /= wf;
                err = err / wf + op_rounding(src, m + err / wf);
            }
            (r, m)
        }
        _ => {
            // Max/Min: every partial result lies in the envelope of all inputs.
            let lo = pb.iter().map(|p| p.lo).fold(f64::INFINITY, f64::min);
            let hi = pb.iter().map(|p| p.hi).fold(f64::NEG_INFINITY, f64::max);
            let (r, m) = (hi - lo, lo.abs().max(hi.abs()));
            for _ in 1..w {
                err += quant_err(src, q, r + 2.0 * err, m + err);
            }
            (r, m)
        }
    };
    // The owner quantizes the final value once more for the all-gather.
    err += quant_err(src, q, r_final + 2.0 * err, m_final + err);
    // The f64 reference itself rounds (only visible for f64 sources).
    let reference = wf * pow2(-52) * pb.iter().map(|p| p.mag).sum::<f64>();
    (err + reference) * (1.0 + pow2(-40))
}

/// The exact result of combining `xs` (finite) with `op`, in f64.
fn exact(op: ReduceOp, xs: &[f64]) -> f64 {
    // An explicit fold: the sign of a sum of zeros must not depend on the
    // start value `Iterator::sum` picks.
    let sum = || xs[1..].iter().fold(xs[0], |a, b| a + b);
    match op {
        ReduceOp::Sum => sum(),
        ReduceOp::Avg => sum() / xs.len() as f64,
        // −0.0 < +0.0, as the kernels order them.
        ReduceOp::Max => *xs.iter().max_by(|a, b| a.total_cmp(b)).unwrap(),
        ReduceOp::Min => *xs.iter().min_by(|a, b| a.total_cmp(b)).unwrap(),
        ReduceOp::Prod => unreachable!(),
    }
}

/// What an all-equal block must come back as: the exact result, which is
/// representable (Sum/Max/Min), or the exact sum divided by the world size
/// the way `finalize_avg` does it (in f32 for f32/f16/bf16, then rounded).
fn exact_all_equal(src: DataType, op: ReduceOp, xs: &[f64]) -> u64 {
    let v = match op {
        ReduceOp::Avg => {
            let s = exact(ReduceOp::Sum, xs);
            let w = xs.len();
            match src {
                DataType::F64 => s / w as f64,
                _ => (s as f32 / w as f32) as f64,
            }
        }
        _ => exact(op, xs),
    };
    src_bits(src, v)
}

// ---------------------------------------------------------------------------
// Running and checking one case
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Stats {
    runs: usize,
    exact_blocks: usize,
    nan_blocks: usize,
    /// Blocks whose −inf (Max) / +inf (Min) inputs were absorbed.
    absorbed_blocks: usize,
    bounded_blocks: usize,
    /// Largest |error| / bound seen.
    worst_ratio: f64,
}

fn desc_of(c: &Case) -> ReduceDescriptor {
    ReduceDescriptor::new(c.n, c.src, c.op).with_quantization(QuantizationOptions {
        quantized_datatype: c.q,
        algorithm: c.algo,
    })
}

fn all_reduce_bytes(
    comm: &Communicator,
    send: &[u8],
    recv: &mut [u8],
    desc: &ReduceDescriptor,
) -> Result<ReduceInfo, Error> {
    assert_eq!(send.len(), desc.count * desc.datatype.size());
    assert_eq!(recv.len(), send.len());
    // SAFETY: both buffers hold count * size bytes for the whole call.
    unsafe { comm.all_reduce_raw(send.as_ptr(), recv.as_mut_ptr(), desc) }
}

fn run_case(peers: &[Arc<Communicator>], c: Case, stats: &mut Stats) {
    let w = peers.len();
    let what = format!(
        "{}->{} {:?} {:?} n={} w={w} seed={}",
        c.src.name(),
        c.q.name(),
        c.algo,
        c.op,
        c.n,
        c.seed
    );
    let ce = chunk_elems(c.src, peers[0].config().chunk_bytes, c.n, w);
    let blocks = ring_blocks(c.n, w, ce);
    let (xs, kinds) = gen_inputs(&c, w, &blocks);
    let inputs: Arc<Vec<Vec<u8>>> = Arc::new(xs.iter().map(|x| to_bytes(c.src, x)).collect());
    let desc = desc_of(&c);
    let ins = inputs.clone();
    let results = on_all(peers, move |i, comm| {
        // Garbage in the receive buffer: every byte must be written.
        let mut recv = vec![0xa5u8; ins[i].len()];
        let info = all_reduce_bytes(comm, &ins[i], &mut recv, &desc);
        (info, recv)
    });

    // (4) Traffic: the multiset of (tx, rx) over peers is the schedule's.
    let mut want = expected_traffic(c.n, w, ce, c.src, c.q);
    let mut got = Vec::new();
    for (i, (info, _)) in results.iter().enumerate() {
        let info = match info {
            Ok(info) => info,
            Err(e) => panic!("{what}: peer {i} failed: {e}"),
        };
        assert_eq!(info.local_world_size as usize, w, "{what}");
        got.push((info.tx_bytes, info.rx_bytes));
    }
    want.sort();
    got.sort();
    assert_eq!(got, want, "{what}: (tx, rx) bytes per peer");

    // (1) Bit-identical everywhere.
    let r0 = &results[0].1;
    for (i, (_, r)) in results.iter().enumerate().skip(1) {
        if r != r0 {
            let k = r.iter().zip(r0).position(|(a, b)| a != b).unwrap() / c.src.size();
            panic!("{what}: peer {i} differs from peer 0 at element {k}");
        }
    }

    // (2), (3) Per block.
    let nan_bits = canonical_nan(c.src);
    for (bi, &(b0, m)) in blocks.iter().enumerate() {
        let finite = xs
            .iter()
            .all(|x| x[b0..b0 + m].iter().all(|v| v.is_finite()));
        if !finite {
            assert_eq!(kinds[bi], Kind::NonFinite);
            // docs/quantization.md, "NaN and infinity": a NaN/±inf input
            // makes the whole ring block the canonical NaN on every peer.
            // The one exception: −inf under Max (+inf under Min) is
            // absorbed by the peers' finite values unless it is quantized
            // on its own, i.e. unless its peer starts the segment's chain
            // (or every peer has it): then the block is NaN, otherwise the
            // block is as if that element were not there. Which one happens
            // depends on the ring order, so both are accepted then.
            let absorbed = |v: f64| match c.op {
                ReduceOp::Max => v == f64::NEG_INFINITY,
                ReduceOp::Min => v == f64::INFINITY,
                _ => false,
            };
            let may_absorb = xs
                .iter()
                .all(|x| x[b0..b0 + m].iter().all(|&v| v.is_finite() || absorbed(v)))
                && (b0..b0 + m).all(|i| xs.iter().any(|x| x[i].is_finite()));
            let (_, first) = elem(c.src, r0, b0);
            if !may_absorb || first == nan_bits {
                for i in b0..b0 + m {
                    let (_, bits) = elem(c.src, r0, i);
                    assert_eq!(
                        bits,
                        nan_bits,
                        "{what}: block {bi} [{b0}, {}) has a non-finite input, element {i} \
                         must be the canonical NaN",
                        b0 + m
                    );
                }
                stats.nan_blocks += 1;
                continue;
            }
            stats.absorbed_blocks += 1;
        }
        let mut col = [0f64; 8];
        let column = |col: &mut [f64; 8], i: usize| {
            for (p, x) in xs.iter().enumerate() {
                col[p] = x[i];
            }
        };
        if kinds[bi] == Kind::AllEqual {
            for i in b0..b0 + m {
                column(&mut col, i);
                let col = &col[..w];
                let (y, bits) = elem(c.src, r0, i);
                let want = exact_all_equal(c.src, c.op, col);
                assert_eq!(
                    bits, want,
                    "{what}: all-equal block {bi}, element {i}: got {y:e}, inputs {col:?}"
                );
            }
            stats.exact_blocks += 1;
            continue;
        }
        let pb: Vec<PeerBlock> = xs
            .iter()
            .filter_map(|x| peer_block(&x[b0..b0 + m], c.algo))
            .collect();
        let bound = block_bound(&c, w, &pb);
        for i in b0..b0 + m {
            column(&mut col, i);
            let col = &col[..w];
            let e = exact(c.op, col);
            let (y, _) = elem(c.src, r0, i);
            let err = (y - e).abs();
            assert!(
                y.is_finite() && err <= bound,
                "{what}: block {bi} [{b0}, {}) element {i}: got {y:e}, exact {e:e}, \
                 error {err:e} > bound {bound:e} (inputs {col:?})",
                b0 + m
            );
            if bound > 0.0 {
                stats.worst_ratio = stats.worst_ratio.max(err / bound);
            }
        }
        stats.bounded_blocks += 1;
    }
    stats.runs += 1;
}

/// A count whose segments each hold `chunk_bytes` of elements plus
/// 1500-odd, so every segment is sent as several frames and the last ends
/// in a partial block.
fn large_count(src: DataType, w: usize, chunk_bytes: usize) -> usize {
    let cap = (chunk_bytes / src.size()).max(1);
    w * ((cap / BLOCK).max(1) * BLOCK + 1501) + 7
}

fn valid(src: DataType, q: DataType) -> bool {
    q.size() < src.size()
}

/// PCCL 1.0's extra combinations: MinMax from f32/f64 to u32/u64.
const WIDE: [(DataType, DataType); 4] = [
    (DataType::F32, DataType::U32),
    (DataType::F32, DataType::U64),
    (DataType::F64, DataType::U32),
    (DataType::F64, DataType::U64),
];

fn wide_valid(algo: QuantizationAlgorithm, q: DataType, src: DataType) -> bool {
    algo == QuantizationAlgorithm::MinMax && WIDE.contains(&(src, q))
}

/// All (algorithm, quantized type, source type) combinations, in a fixed order.
fn matrix() -> Vec<(QuantizationAlgorithm, DataType, DataType)> {
    let mut v = Vec::new();
    for a in ALGOS {
        for q in QTYPES {
            for s in SOURCES {
                v.push((a, q, s));
            }
        }
    }
    v
}

/// World sizes a valid combination runs with: each combination gets one of
/// 2, 3, 4 in rotation, and every fourth one a second size too.
fn worlds_of(idx: usize) -> Vec<usize> {
    let mut v = vec![2 + idx % 3];
    if idx.is_multiple_of(4) {
        v.push(2 + (idx + 1) % 3);
    }
    v
}

/// Runs every valid combination assigned to world size `w`.
fn matrix_for_world(w: usize) {
    let m = master();
    let peers = connect_peers(m.local_addr(), w, |_| 0);
    let chunk_bytes = peers[0].config().chunk_bytes;
    let t0 = std::time::Instant::now();
    let mut stats = Stats::default();
    let mut combos = 0;
    let valid_combos: Vec<_> = matrix()
        .into_iter()
        .filter(|&(_, q, s)| valid(s, q))
        .collect();
    assert_eq!(valid_combos.len(), 24);
    for (idx, &(algo, q, src)) in valid_combos.iter().enumerate() {
        if !worlds_of(idx).contains(&w) {
            continue;
        }
        combos += 1;
        for (oi, &op) in OPS.iter().enumerate() {
            let seed = mix(idx as u64 * 31 + oi as u64, w as u64);
            let mut counts = SMALL_COUNTS.to_vec();
            counts.push(large_count(src, w, chunk_bytes));
            for (ni, &n) in counts.iter().enumerate() {
                let c = Case {
                    src,
                    q,
                    algo,
                    op,
                    n,
                    seed: seed.wrapping_add(ni as u64),
                    kind0: idx + oi + ni,
                };
                run_case(&peers, c, &mut stats);
            }
        }
    }
    println!(
        "world {w}: {combos} combinations, {} runs in {:.1} s: {} blocks within bound \
         (worst error {:.3} of the bound), {} all-equal blocks exact, {} NaN blocks, \
         {} blocks with absorbed infinities",
        stats.runs,
        t0.elapsed().as_secs_f64(),
        stats.bounded_blocks,
        stats.worst_ratio,
        stats.exact_blocks,
        stats.nan_blocks,
        stats.absorbed_blocks
    );
    assert!(combos > 0);
    assert!(stats.exact_blocks > 0 && stats.nan_blocks > 0 && stats.bounded_blocks > 0);
}

#[test]
fn every_world_size_is_used_and_every_combination_runs() {
    let valid_combos: Vec<_> = matrix()
        .into_iter()
        .filter(|&(_, q, s)| valid(s, q))
        .collect();
    let mut used = [false; 5];
    for idx in 0..valid_combos.len() {
        let ws = worlds_of(idx);
        assert!(!ws.is_empty());
        for w in ws {
            used[w] = true;
        }
    }
    assert_eq!(used, [false, false, true, true, true]);
    // The geometry mirror agrees with the library's own encoded length.
    for (a, q, s) in valid_combos {
        for m in [0, 1, 1023, 1024, 1025, 131_072 + 1501] {
            assert_eq!(
                encoded_len(s, q, m),
                pccl_core::quant::encoded_len(s, q, a, m) as u64
            );
        }
    }
    assert_eq!(
        FRAME_HEADER as usize,
        pccl_core::wire::DataHeader::LEN,
        "frame header size"
    );
}

#[test]
fn quantized_matrix_two_peers() {
    matrix_for_world(2);
}

#[test]
fn quantized_matrix_three_peers() {
    matrix_for_world(3);
}

#[test]
fn quantized_matrix_four_peers() {
    matrix_for_world(4);
}

/// MinMax to u32/u64 from f32/f64 (PCCL 1.0 accepts it) with 3 peers:
/// the same checks as the matrix (bit-identical results on every peer,
/// error within the documented bound, all-equal blocks exact, NaN blocks,
/// wire volume) for every op and count.
#[test]
fn wide_minmax_codes_three_peers() {
    let w = 3;
    let m = master();
    let peers = connect_peers(m.local_addr(), w, |_| 0);
    let chunk_bytes = peers[0].config().chunk_bytes;
    let mut stats = Stats::default();
    for (idx, &(src, q)) in WIDE.iter().enumerate() {
        for (oi, &op) in OPS.iter().enumerate() {
            let seed = mix(1000 + idx as u64 * 31 + oi as u64, w as u64);
            let mut counts = SMALL_COUNTS.to_vec();
            counts.push(large_count(src, w, chunk_bytes));
            for (ni, &n) in counts.iter().enumerate() {
                let c = Case {
                    src,
                    q,
                    algo: QuantizationAlgorithm::MinMax,
                    op,
                    n,
                    seed: seed.wrapping_add(ni as u64),
                    kind0: idx + oi + ni,
                };
                run_case(&peers, c, &mut stats);
            }
        }
    }
    println!(
        "wide codes, world {w}: {} runs: {} blocks within bound (worst error {:.3} of the \
         bound), {} all-equal blocks exact, {} NaN blocks",
        stats.runs, stats.bounded_blocks, stats.worst_ratio, stats.exact_blocks, stats.nan_blocks
    );
    assert_eq!(
        stats.runs,
        WIDE.len() * OPS.len() * (SMALL_COUNTS.len() + 1)
    );
    assert!(stats.exact_blocks > 0 && stats.nan_blocks > 0 && stats.bounded_blocks > 0);
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

/// Asserts that `desc` is refused with InvalidArgument before anything is
/// touched (the receive buffer keeps its bytes).
fn assert_refused(comm: &Communicator, desc: &ReduceDescriptor, what: &str) {
    let len = desc.count * desc.datatype.size();
    let send = vec![0x3cu8; len];
    let mut recv = vec![0x77u8; len];
    match all_reduce_bytes(comm, &send, &mut recv, desc) {
        Err(Error::InvalidArgument(_)) => {}
        Err(e) => panic!("{what}: expected InvalidArgument, got {e}"),
        Ok(_) => panic!("{what}: expected InvalidArgument, the all-reduce ran"),
    }
    assert!(recv.iter().all(|&b| b == 0x77), "{what}: recv was written");
}

#[test]
fn invalid_quantized_requests_are_refused() {
    let m = master();
    let peers = connect_peers(m.local_addr(), 2, |_| 0);
    let c = &peers[0];
    let n = 1025;
    let mut refused = 0;
    for algo in ALGOS {
        for q in DataType::ALL {
            for src in DataType::ALL {
                let code = QTYPES.contains(&q);
                for op in ReduceOp::ALL {
                    let mut d = ReduceDescriptor::new(n, src, op);
                    d.quantization = QuantizationOptions {
                        quantized_datatype: q,
                        algorithm: algo,
                    };
                    let what = format!("{}->{} {algo:?} {op:?}", src.name(), q.name());
                    let ok = ((src.is_float() && code && valid(src, q))
                        || wide_valid(algo, q, src))
                        && op != ReduceOp::Prod;
                    if !ok {
                        // Prod; integer sources; a quantized type that is not
                        // an 8/16-bit integer or not narrower than the source.
                        assert_refused(c, &d, &what);
                        refused += 1;
                    }
                }
            }
        }
    }
    // Explicitly: Prod for every valid combination, and the 16-bit codes of
    // the 16-bit sources (as wide as the source).
    for (algo, q, src) in matrix() {
        let d = |op| {
            ReduceDescriptor::new(n, src, op).with_quantization(QuantizationOptions {
                quantized_datatype: q,
                algorithm: algo,
            })
        };
        assert_refused(c, &d(ReduceOp::Prod), "Prod");
        if !valid(src, q) {
            for op in OPS {
                assert_refused(c, &d(op), "16-bit codes of a 16-bit source");
            }
        }
    }
    // 2 algos × (12 q × 12 src × 5 ops) minus the 2 × 12 × 4 accepted ones
    // and the 4 × 4 wide MinMax ones.
    assert_eq!(refused, 2 * (12 * 12 * 5 - 12 * 4) - 4 * 4);
    // Wide codes: Prod, ZeroPointScale, and the 16-bit sources are refused.
    for (src, q) in WIDE {
        let d = |op, algorithm| {
            ReduceDescriptor::new(n, src, op).with_quantization(QuantizationOptions {
                quantized_datatype: q,
                algorithm,
            })
        };
        assert_refused(
            c,
            &d(ReduceOp::Prod, QuantizationAlgorithm::MinMax),
            "wide Prod",
        );
        assert_refused(
            c,
            &d(ReduceOp::Sum, QuantizationAlgorithm::ZeroPointScale),
            "wide ZeroPointScale",
        );
    }
    for src in [DataType::F16, DataType::BF16] {
        let d =
            ReduceDescriptor::new(n, src, ReduceOp::Sum).with_quantization(QuantizationOptions {
                quantized_datatype: DataType::U32,
                algorithm: QuantizationAlgorithm::MinMax,
            });
        assert_refused(c, &d, "u32 codes of a 16-bit source");
    }
    // The refusals were local: the swarm still runs a quantized op.
    let mut stats = Stats::default();
    run_case(
        &peers,
        Case {
            src: DataType::F32,
            q: DataType::U8,
            algo: QuantizationAlgorithm::MinMax,
            op: ReduceOp::Sum,
            n,
            seed: 99,
            kind0: 0,
        },
        &mut stats,
    );
    assert_eq!(stats.runs, 1);
}
