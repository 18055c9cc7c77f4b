//! Unit tests of the quantization codecs: layout, error bounds, non-finite
//! blocks, total decoding of arbitrary bytes, and the SIMD kernels against
//! the portable ones (`NO_SIMD` turns the SIMD prefix off).

use super::buffer::*;
use super::element::*;
use super::scalar::*;
use super::*;
use crate::kernels::reduce_into;
use half::{bf16, f16};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SOURCES: [DataType; 4] = [DataType::F16, DataType::BF16, DataType::F32, DataType::F64];
const CODES: [DataType; 4] = [DataType::U8, DataType::I8, DataType::U16, DataType::I16];
const ALGOS: [QuantizationAlgorithm; 2] = [
    QuantizationAlgorithm::MinMax,
    QuantizationAlgorithm::ZeroPointScale,
];

/// Every valid (source, code, algorithm) combination.
fn combos() -> Vec<(DataType, DataType, QuantizationAlgorithm)> {
    let mut v = Vec::new();
    for s in SOURCES {
        for q in CODES {
            for a in ALGOS {
                if q.size() < s.size() {
                    v.push((s, q, a));
                }
            }
        }
    }
    v
}

fn to_src(dtype: DataType, xs: &[f64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() * dtype.size());
    for &x in xs {
        match dtype {
            DataType::F16 => out.extend(f16::from_f32(x as f32).to_ne_bytes()),
            DataType::BF16 => out.extend(bf16::from_f32(x as f32).to_ne_bytes()),
            DataType::F32 => out.extend((x as f32).to_ne_bytes()),
            DataType::F64 => out.extend(x.to_ne_bytes()),
            _ => unreachable!(),
        }
    }
    out
}

fn from_src(dtype: DataType, b: &[u8]) -> Vec<f64> {
    b.chunks_exact(dtype.size())
        .map(|c| match dtype {
            DataType::F16 => f16::from_ne_bytes(c.try_into().unwrap()).to_f64(),
            DataType::BF16 => bf16::from_ne_bytes(c.try_into().unwrap()).to_f64(),
            DataType::F32 => f32::from_ne_bytes(c.try_into().unwrap()) as f64,
            DataType::F64 => f64::from_ne_bytes(c.try_into().unwrap()),
            _ => unreachable!(),
        })
        .collect()
}

fn roundtrip(s: DataType, q: DataType, a: QuantizationAlgorithm, src: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let n = src.len() / s.size();
    let mut enc = vec![0u8; encoded_len(s, q, a, n)];
    quantize(s, q, a, src, &mut enc).unwrap();
    let mut dec = vec![0u8; src.len()];
    dequantize_into(s, q, a, None, &enc, &mut dec).unwrap();
    (enc, dec)
}

/// Unit in the last place of `m` in the 16-bit source formats.
fn ulp_src(s: DataType, m: f64) -> f64 {
    let (mant, min_exp) = match s {
        DataType::F16 => (10, -14),
        DataType::BF16 => (7, -126),
        _ => return 0.0,
    };
    let e = if m > 0.0 {
        m.log2().floor() as i32
    } else {
        min_exp
    };
    2f64.powi(e.max(min_exp) - mant)
}

/// The documented per-element bound for one block (see module docs).
fn block_bound(s: DataType, q: DataType, a: QuantizationAlgorithm, xs: &[f64]) -> f64 {
    let lo = xs.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let (l, h) = match a {
        QuantizationAlgorithm::ZeroPointScale => (lo.min(0.0), hi.max(0.0)),
        _ => (lo, hi),
    };
    let qmax = if q.size() == 1 { 255.0 } else { 65535.0 };
    let delta = h / qmax - l / qmax;
    let m = l.abs().max(h.abs());
    let (eps, tau) = if s == DataType::F64 {
        (2f64.powi(-53), f64::from_bits(1))
    } else {
        (2f64.powi(-24), f32::from_bits(1) as f64)
    };
    delta / 2.0 + 8.0 * eps * m + qmax * tau + 0.5 * ulp_src(s, m + delta)
}

fn check_bound(s: DataType, q: DataType, a: QuantizationAlgorithm, xs: &[f64], ys: &[f64]) {
    for (b, (xb, yb)) in xs.chunks(B).zip(ys.chunks(B)).enumerate() {
        let bound = block_bound(s, q, a, xb);
        for (i, (&x, &y)) in xb.iter().zip(yb).enumerate() {
            let err = (y - x).abs();
            assert!(
                err <= bound,
                "{}->{} {:?} block {b} elem {i}: x={x:e} y={y:e} err={err:e} bound={bound:e}",
                s.name(),
                q.name(),
                a
            );
        }
    }
}

fn normal(rng: &mut StdRng) -> f64 {
    // Box-Muller.
    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Test data in one of several distributions, scaled to the source type's range.
fn gen_data(s: DataType, dist: u8, n: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    // Log-uniform scale that keeps f16 values well inside its range.
    let (lo_e, hi_e) = match s {
        DataType::F16 => (-4, 2),
        DataType::BF16 => (-20, 20),
        DataType::F32 => (-30, 30),
        _ => (-100, 100),
    };
    let scale = 10f64.powf(rng.gen_range(lo_e as f64..hi_e as f64));
    let offset = if rng.gen_bool(0.3) {
        scale * rng.gen_range(-20.0..20.0)
    } else {
        0.0
    };
    let mut v: Vec<f64> = match dist % 6 {
        // normal
        0 => (0..n).map(|_| offset + scale * normal(&mut rng)).collect(),
        // uniform
        1 => (0..n)
            .map(|_| offset + scale * rng.gen_range(-1.0..1.0))
            .collect(),
        // heavy-tailed: normal with 1 % outliers 1000x larger
        2 => (0..n)
            .map(|_| {
                let k = if rng.gen_bool(0.01) { 1000.0 } else { 1.0 };
                offset + scale * k * normal(&mut rng)
            })
            .collect(),
        // Cauchy (clamped so the values stay finite in f16)
        3 => (0..n)
            .map(|_| {
                let c = (std::f64::consts::PI * (rng.gen::<f64>() - 0.5)).tan();
                scale * c.clamp(-1e3, 1e3)
            })
            .collect(),
        // all-equal blocks (a different constant per block)
        4 => {
            let mut v = Vec::with_capacity(n);
            while v.len() < n {
                let c = offset + scale * normal(&mut rng);
                v.extend(std::iter::repeat_n(c, B.min(n - v.len())));
            }
            v
        }
        // sparse: 90 % exact zeros
        _ => (0..n)
            .map(|_| {
                if rng.gen_bool(0.9) {
                    0.0
                } else {
                    scale * normal(&mut rng)
                }
            })
            .collect(),
    };
    // Stay finite in the source type, then round to it so `v` holds
    // exactly the values encoded.
    let cap = match s {
        DataType::F16 => 30000.0,
        DataType::BF16 | DataType::F32 => 1e38,
        _ => 1e307,
    };
    for x in v.iter_mut() {
        *x = x.clamp(-cap, cap);
    }
    v = from_src(s, &to_src(s, &v));
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, .. ProptestConfig::default() })]

    #[test]
    fn roundtrip_error_within_documented_bound(
        combo in 0usize..16, dist in 0u8..6, seed in any::<u64>(), n in 0usize..3300,
    ) {
        let all = combos();
        let (s, q, a) = all[combo % all.len()];
        let xs = gen_data(s, dist, n, seed);
        let src = to_src(s, &xs);
        let (_, dec) = roundtrip(s, q, a, &src);
        let ys = from_src(s, &dec);
        check_bound(s, q, a, &xs, &ys);
        if dist == 4 {
            // All-equal blocks decode bit-exactly.
            prop_assert_eq!(&dec, &src);
        }
        if a == QuantizationAlgorithm::ZeroPointScale {
            for (x, y) in xs.iter().zip(&ys) {
                if *x == 0.0 {
                    prop_assert_eq!(*y, 0.0);
                }
            }
        }
    }

    #[test]
    fn dequantize_never_panics_on_arbitrary_bytes(
        combo in 0usize..16, seed in any::<u64>(), n in 0usize..2200, off in 0usize..4, opi in 0usize..5,
    ) {
        let all = combos();
        let (s, q, a) = all[combo % all.len()];
        let mut rng = StdRng::seed_from_u64(seed);
        let enc: Vec<u8> = (0..encoded_len(s, q, a, n)).map(|_| rng.gen()).collect();
        let mut dst = vec![0u8; n * s.size() + off];
        let op = [None, Some(ReduceOp::Sum), Some(ReduceOp::Avg), Some(ReduceOp::Max), Some(ReduceOp::Min)][opi];
        dequantize_into(s, q, a, op, &enc, &mut dst[off..]).unwrap();
        // Deterministic on arbitrary input too (decode twice, same bits),
        // and the portable build agrees with the dispatched one.
        let mut again = vec![0u8; n * s.size()];
        dequantize_into(s, q, a, None, &enc, &mut again).unwrap();
        let mut portable = vec![0u8; n * s.size()];
        dequantize_portable_any(s, q, a, &enc, &mut portable);
        prop_assert_eq!(&again, &portable);
    }
}

/// Calls the non-dispatched (baseline ISA) decoder directly.
fn dequantize_portable_any(
    s: DataType,
    q: DataType,
    a: QuantizationAlgorithm,
    enc: &[u8],
    dst: &mut [u8],
) {
    let mask = sign_mask(q);
    match (s, q.size()) {
        (DataType::F16, 1) => dequantize_portable::<F16Src, u8>(a, mask, None, enc, dst),
        (DataType::BF16, 1) => dequantize_portable::<Bf16Src, u8>(a, mask, None, enc, dst),
        (DataType::F32, 1) => dequantize_portable::<F32Src, u8>(a, mask, None, enc, dst),
        (DataType::F32, 2) => dequantize_portable::<F32Src, u16>(a, mask, None, enc, dst),
        (DataType::F64, 1) => dequantize_portable::<F64Src, u8>(a, mask, None, enc, dst),
        (DataType::F64, 2) => dequantize_portable::<F64Src, u16>(a, mask, None, enc, dst),
        _ => unreachable!(),
    }
}

fn quantize_portable_any(
    s: DataType,
    q: DataType,
    a: QuantizationAlgorithm,
    src: &[u8],
    out: &mut [u8],
) {
    let mask = sign_mask(q);
    match (s, q.size()) {
        (DataType::F16, 1) => quantize_portable::<F16Src, u8>(a, mask, src, out),
        (DataType::BF16, 1) => quantize_portable::<Bf16Src, u8>(a, mask, src, out),
        (DataType::F32, 1) => quantize_portable::<F32Src, u8>(a, mask, src, out),
        (DataType::F32, 2) => quantize_portable::<F32Src, u16>(a, mask, src, out),
        (DataType::F64, 1) => quantize_portable::<F64Src, u8>(a, mask, src, out),
        (DataType::F64, 2) => quantize_portable::<F64Src, u16>(a, mask, src, out),
        _ => unreachable!(),
    }
}

/// xorshift64* (integer-only, so the known-answer data below does not
/// depend on any libm).
struct Xs(u64);
impl Xs {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [0, 1), exact.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo) as u64) as i64
    }
}

/// Source bytes of one element: a value (rounded to the source type) or raw bits.
fn push_elem(s: DataType, out: &mut Vec<u8>, v: f64, bits: Option<u64>) {
    match (s, bits) {
        (DataType::F16 | DataType::BF16, Some(b)) => out.extend((b as u16).to_ne_bytes()),
        (DataType::F32, Some(b)) => out.extend((b as u32).to_ne_bytes()),
        (DataType::F64, Some(b)) => out.extend(b.to_ne_bytes()),
        _ => out.extend(to_src(s, &[v])),
    }
}

/// Deterministic, libm-free test data with one kind of block after
/// another: smooth, all-equal, random bits (NaN/inf included),
/// subnormal, huge range, sparse, with an infinity, with a NaN, narrow
/// range far from zero. Integer PRNG and exact float operations only.
fn kat_data(s: DataType, n: usize, seed: u64) -> Vec<u8> {
    let mut r = Xs(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let (emin, emax, tiny, big) = match s {
        DataType::F16 => (-10, 4, 2f64.powi(-24), 65504.0),
        DataType::BF16 => (-60, 60, 2f64.powi(-133), bf16::MAX.to_f64()),
        DataType::F32 => (-60, 60, 2f64.powi(-149), f32::MAX as f64),
        _ => (-300, 300, f64::from_bits(1), f64::MAX),
    };
    let mut out = Vec::with_capacity(n * s.size());
    let mut b = 0usize;
    while out.len() < n * s.size() {
        let m = B.min(n - out.len() / s.size());
        let kind = (b as u64 + seed) % 9;
        let scale = 2f64.powi(r.int(emin, emax) as i32);
        let offset = if r.next().is_multiple_of(3) {
            scale * r.int(-20, 20) as f64
        } else {
            0.0
        };
        let konst = offset + scale * (r.unit() - 0.5);
        let special = r.int(0, m as i64) as usize;
        for i in 0..m {
            let g = offset + scale * (r.unit() + r.unit() + r.unit() + r.unit() - 2.0);
            let (v, bits) = match kind {
                0 => (g, None),
                1 => (konst, None),
                2 => (0.0, Some(r.next())),
                3 => (tiny * r.int(-100, 100) as f64, None),
                4 if i == special => (if r.next() & 1 == 0 { big } else { -big }, None),
                4 => (big * (2.0 * r.unit() - 1.0), None),
                5 if !r.next().is_multiple_of(10) => {
                    (if r.next() & 1 == 0 { 0.0 } else { -0.0 }, None)
                }
                5 => (g, None),
                6 if i == special => (f64::INFINITY * (1 - 2 * (r.next() & 1) as i64) as f64, None),
                7 if i == special => (f64::NAN, None),
                8 => (1000.0 + r.int(0, 512) as f64 / 512.0, None),
                _ => (g, None),
            };
            push_elem(s, &mut out, v, bits);
        }
        b += 1;
    }
    out
}

fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Known answers: FNV-1a of the encoding and of the decoding of
/// `kat_data` (9 blocks of every kind plus a short one), per entry of
/// `combos()`. Captured before the kernels were optimized; any change
/// to the encoded or decoded bits fails here.
const KAT: [(u64, u64); 24] = [
    (0xa189_16ef_9fea_8ac9, 0xd835_5e22_e813_f674),
    (0x951f_5afa_03f0_ee7f, 0x5adc_54a3_499d_c206),
    (0x6d8b_665e_1609_3906, 0x54bb_ce70_3a13_21bf),
    (0xcb21_81dd_c934_62fb, 0x75dd_8106_fb43_8459),
    (0x6f2e_f0ec_8284_07d1, 0x47c2_3a25_c2cf_e9bd),
    (0x7b67_4c62_dfec_a55d, 0x01a0_c6c3_ecbd_2b5b),
    (0x49f6_a141_4029_96e2, 0xd4b2_9aa0_3800_68bc),
    (0xe7f7_bfa5_9ae0_fae9, 0xc439_a19d_119c_f254),
    (0xaf55_fa02_93eb_5a15, 0x4fc1_3a81_272d_89d0),
    (0x0424_52c6_5d00_89e9, 0xd590_67a4_de2a_5058),
    (0x311e_13f5_6d40_993b, 0xac4b_3c8c_82e4_e01d),
    (0x3799_8e85_d355_3eba, 0xe918_e215_a83a_0865),
    (0x9bd1_f40d_a7d7_0644, 0x7903_ed77_8f2d_7f06),
    (0x5db7_3d76_29fc_b753, 0xd5de_3e72_d35d_3421),
    (0x3464_0912_8e8d_0301, 0x9aed_f04c_1f60_34c2),
    (0x8c28_9759_5dca_a3dc, 0xf421_813d_642f_c635),
    (0x9fcf_09b1_1269_777c, 0x5f83_58fa_ccbd_dba5),
    (0x799c_250d_a631_b000, 0x9fe3_7cd3_defa_e3ad),
    (0x5c3e_617c_88ab_b151, 0x2ce2_54b1_b4cc_fdc7),
    (0x9ca0_ca35_c482_ba0a, 0x52d5_159d_086e_320c),
    (0x3f6f_773c_beb4_21d2, 0x8615_44f3_93de_303e),
    (0xe05a_7595_8dd4_88a6, 0x3c91_3268_c2f9_40e9),
    (0x6c35_96df_ca33_f05e, 0x3367_7c27_aab4_6c19),
    (0xe892_2506_f3a3_d893, 0x90a0_d520_15fd_0479),
];

#[test]
fn known_answer_encodings_are_unchanged() {
    let mut got = Vec::new();
    for (i, (s, q, a)) in combos().into_iter().enumerate() {
        let src = kat_data(s, 9 * B + 333, 5 + i as u64);
        let (enc, dec) = roundtrip(s, q, a, &src);
        let off = 0xcbf2_9ce4_8422_2325;
        got.push((fnv1a(off, &enc), fnv1a(off, &dec)));
    }
    if got[..] != KAT[..] {
        let table: Vec<String> = got
            .iter()
            .map(|(e, d)| format!("({e:#018x}, {d:#018x}),"))
            .collect();
        panic!("known answers changed; now:\n{}", table.join("\n"));
    }
}

const FUSED_LENS: [usize; 6] = [0, 1, B - 1, B, B + 1, 5000];
const OPS: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min];

/// `bytes` copied to offset `off` of a fresh buffer (for unaligned slices).
fn at_offset(bytes: &[u8], off: usize) -> Vec<u8> {
    let mut v = vec![0xa5u8; bytes.len() + off];
    v[off..].copy_from_slice(bytes);
    v
}

/// Checks `quantize_adopt` against `quantize` + `dequantize_into(None)`
/// for one input, at data offset `doff` and output offset `eoff`.
fn check_adopt(
    s: DataType,
    q: DataType,
    a: QuantizationAlgorithm,
    src: &[u8],
    doff: usize,
    eoff: usize,
) {
    let (enc, dec) = roundtrip(s, q, a, src);
    let mut data = at_offset(src, doff);
    let mut out = vec![0x5au8; enc.len() + eoff];
    quantize_adopt(s, q, a, &mut data[doff..], &mut out[eoff..]).unwrap();
    let n = src.len() / s.size();
    let what = format!(
        "{}->{} {a:?} n={n} doff={doff} eoff={eoff}",
        s.name(),
        q.name()
    );
    assert!(out[eoff..] == enc[..], "encoding differs: {what}");
    assert!(data[doff..] == dec[..], "adopted values differ: {what}");
}

/// Checks `dequantize_reduce_from` against a copy + `dequantize_into(Some(op))`.
#[allow(clippy::too_many_arguments)]
fn check_reduce_from(
    s: DataType,
    q: DataType,
    al: QuantizationAlgorithm,
    op: ReduceOp,
    a: &[u8],
    enc: &[u8],
    aoff: usize,
    doff: usize,
) {
    let mut want = a.to_vec();
    dequantize_into(s, q, al, Some(op), enc, &mut want).unwrap();
    let abuf = at_offset(a, aoff);
    let mut dst = vec![0x33u8; a.len() + doff];
    dequantize_reduce_from(s, q, al, op, &abuf[aoff..], enc, &mut dst[doff..]).unwrap();
    let n = a.len() / s.size();
    // Equal bits, except that any NaN matches any NaN (which payload a
    // NaN + NaN keeps is up to the hardware).
    let same = dst[doff..]
        .chunks(s.size())
        .zip(want.chunks(s.size()))
        .all(|(g, w)| {
            g == w
                || (crate::kernels::tests::is_nan_bytes(s, g)
                    && crate::kernels::tests::is_nan_bytes(s, w))
        });
    assert!(
        same,
        "{}->{} {al:?} {op:?} n={n} aoff={aoff} doff={doff}",
        s.name(),
        q.name()
    );
}

thread_local! {
    /// Set by a test to run the scalar encoder only (no SIMD kernel).
    pub(super) static NO_SIMD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `quantize` and `quantize_adopt` of `src`, with or without the SIMD kernel.
fn encode_both(
    s: DataType,
    q: DataType,
    a: QuantizationAlgorithm,
    src: &[u8],
    simd: bool,
) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    NO_SIMD.with(|c| c.set(!simd));
    let n = src.len() / s.size();
    let mut enc = vec![0u8; encoded_len(s, q, a, n)];
    quantize(s, q, a, src, &mut enc).unwrap();
    let mut data = src.to_vec();
    let mut enc2 = vec![0u8; enc.len()];
    quantize_adopt(s, q, a, &mut data, &mut enc2).unwrap();
    NO_SIMD.with(|c| c.set(false));
    (enc, enc2, data)
}

#[test]
fn simd_encoder_matches_the_scalar_loop() {
    // Blocks that stress the kernel: ties of the rounding, signed zeros
    // at either end, ranges that overflow, tiny steps (the division
    // paths), all at lengths around multiples of 32.
    let mut rng = StdRng::seed_from_u64(77);
    let mut sets: Vec<Vec<f32>> = Vec::new();
    for len in [31, 32, 33, 63, 64, 65, 100, B - 1, B, B + 40] {
        sets.push(
            (0..len)
                .map(|i| (i % 256) as f32 + 0.5 * (i % 3) as f32)
                .collect(),
        );
        sets.push((0..len).map(|i| -((i % 511) as f32) * 0.5).collect());
        let mut v: Vec<f32> = (0..len).map(|_| rng.gen_range(0.0..3.0)).collect();
        v[len / 2] = -0.0;
        sets.push(v);
        let mut v: Vec<f32> = (0..len).map(|_| rng.gen_range(-3.0..0.0)).collect();
        v[len / 3] = -0.0;
        v[len / 2] = 0.0;
        sets.push(v);
        let mut v: Vec<f32> = (0..len)
            .map(|_| rng.gen_range(-1.0..1.0) * f32::MAX)
            .collect();
        v[0] = f32::MAX;
        v[len - 1] = -f32::MAX;
        sets.push(v);
        let tiny = |k: u32| f32::from_bits(k);
        sets.push((0..len).map(|i| tiny(i as u32 % 700)).collect());
        sets.push((0..len).map(|i| -tiny(i as u32 % 70_000)).collect());
        sets.push(
            (0..len)
                .map(|_| rng.gen_range(-1.0e-36f32..2.0e-36))
                .collect(),
        );
        sets.push(
            (0..len)
                .map(|_| f32::from_bits(rng.gen::<u32>() & 0xbfff_ffff))
                .collect(),
        );
    }
    for dist in 0..6 {
        sets.push(
            gen_data(DataType::F32, dist, 3 * B + 45, 9 + dist as u64)
                .iter()
                .map(|&x| x as f32)
                .collect(),
        );
    }
    for q in [DataType::U8, DataType::I8] {
        for a in ALGOS {
            for xs in &sets {
                let src: Vec<u8> = xs.iter().flat_map(|x| x.to_ne_bytes()).collect();
                let want = encode_both(DataType::F32, q, a, &src, false);
                let got = encode_both(DataType::F32, q, a, &src, true);
                assert!(want == got, "{q:?} {a:?} n={}", xs.len());
                // The decoder, on what the encoder wrote and on the same
                // codes under every kind of block metadata.
                for s in [DataType::F32, DataType::F16, DataType::BF16] {
                    let n = xs.len();
                    let enc = encode_both(s, q, a, &to_src(s, &as_f64(xs)), false).0;
                    let acc = to_src(s, &gen_data(s, 0, n, n as u64));
                    for meta in 0..5 {
                        let enc = with_meta(s, q, &enc, n, meta);
                        let want = decode_all(s, q, a, &enc, &acc, false);
                        let got = decode_all(s, q, a, &enc, &acc, true);
                        assert!(want == got, "decode {s:?} {q:?} {a:?} n={n} meta={meta}");
                    }
                }
            }
        }
    }
}

fn as_f64(xs: &[f32]) -> Vec<f64> {
    xs.iter().map(|&x| x as f64).collect()
}

/// `enc` (of `n` elements of `s`) with each block's metadata replaced:
/// 0 keeps it, 1 swaps the two values (MinMax: `lo > hi`), 2 scales them
/// past any finite source range, 3 makes them equal, 4 makes the first
/// infinite.
fn with_meta(s: DataType, q: DataType, enc: &[u8], n: usize, meta: u32) -> Vec<u8> {
    let mut out = enc.to_vec();
    let ml = meta_len(s);
    let mut off = 0;
    let mut left = n;
    while left > 0 {
        let m = left.min(B);
        let half = ml / 2;
        let (x, y) = out[off..off + ml].split_at_mut(half);
        let rd = |b: &[u8]| {
            if half == 4 {
                f32::from_le_bytes(b.try_into().unwrap()) as f64
            } else {
                f64::from_le_bytes(b.try_into().unwrap())
            }
        };
        let (v0, v1) = (rd(x), rd(y));
        let (w0, w1) = match meta {
            0 => (v0, v1),
            1 => (v1, v0),
            2 => (v0 * 1e30, v1 * 1e30 + 1e35),
            3 => (v1, v1),
            _ => (f64::INFINITY, v1),
        };
        let wr = |b: &mut [u8], v: f64| {
            if half == 4 {
                b.copy_from_slice(&(v as f32).to_le_bytes())
            } else {
                b.copy_from_slice(&v.to_le_bytes())
            }
        };
        wr(x, w0);
        wr(y, w1);
        off += ml + m * q.size();
        left -= m;
    }
    out
}

/// `dequantize_into` without and with a `Sum` into `acc`, and
/// `dequantize_reduce_from` (`Sum`, `acc` as the operand), with or
/// without the SIMD kernels; all at a misaligned destination.
fn decode_all(
    s: DataType,
    q: DataType,
    a: QuantizationAlgorithm,
    enc: &[u8],
    acc: &[u8],
    simd: bool,
) -> Vec<u8> {
    NO_SIMD.with(|c| c.set(!simd));
    let len = acc.len();
    let mut out = Vec::new();
    let mut buf = vec![0u8; len + 1];
    dequantize_into(s, q, a, None, enc, &mut buf[1..]).unwrap();
    out.extend_from_slice(&buf[1..]);
    buf[1..].copy_from_slice(acc);
    dequantize_into(s, q, a, Some(ReduceOp::Sum), enc, &mut buf[1..]).unwrap();
    out.extend_from_slice(&buf[1..]);
    dequantize_reduce_from(s, q, a, ReduceOp::Sum, acc, enc, &mut buf[1..]).unwrap();
    out.extend_from_slice(&buf[1..]);
    NO_SIMD.with(|c| c.set(false));
    out
}

#[test]
fn quantize_adopt_is_quantize_then_dequantize() {
    for (ci, (s, q, a)) in combos().into_iter().enumerate() {
        for n in FUSED_LENS {
            // kat_data starts at block kind `seed % 9`: nine seeds put every
            // kind (NaN, inf, all-equal, subnormal, huge, ...) in every block.
            for seed in 0..9u64 {
                let src = kat_data(s, n, seed + 100 * ci as u64);
                let (doff, eoff) = [(0, 0), (1, 1), (3, 2), (0, 1)][seed as usize % 4];
                check_adopt(s, q, a, &src, doff, eoff);
            }
        }
        // Random data of every gen_data distribution.
        for dist in 0..6 {
            let src = to_src(s, &gen_data(s, dist, 2 * B + 77, 50 + dist as u64));
            check_adopt(s, q, a, &src, 0, 0);
            check_adopt(s, q, a, &src, 2, 3);
        }
    }
}

#[test]
fn dequantize_reduce_from_is_copy_then_reducing_dequantize() {
    let mut rng = StdRng::seed_from_u64(99);
    for (ci, (s, q, al)) in combos().into_iter().enumerate() {
        for n in FUSED_LENS {
            for seed in 0..9u64 {
                let x = kat_data(s, n, seed + 100 * ci as u64);
                let a = kat_data(s, n, seed * 7 + 3 + 100 * ci as u64);
                let (enc, _) = roundtrip(s, q, al, &x);
                // Arbitrary encoded bytes too (corrupt / non-finite metadata).
                let junk: Vec<u8> = (0..enc.len()).map(|_| rng.gen()).collect();
                let op = OPS[seed as usize % 4];
                let (aoff, doff) = [(0, 0), (1, 3), (2, 0), (0, 1)][(seed as usize / 4) % 4];
                check_reduce_from(s, q, al, op, &a, &enc, aoff, doff);
                check_reduce_from(
                    s,
                    q,
                    al,
                    OPS[(seed as usize + 1) % 4],
                    &a,
                    &junk,
                    doff,
                    aoff,
                );
            }
        }
        for op in OPS {
            let x = to_src(s, &gen_data(s, rng.gen(), 3 * B + 5, rng.gen()));
            let a = to_src(s, &gen_data(s, rng.gen(), 3 * B + 5, rng.gen()));
            let (enc, _) = roundtrip(s, q, al, &x);
            check_reduce_from(s, q, al, op, &a, &enc, 0, 0);
            check_reduce_from(s, q, al, op, &a, &enc, 1, 2);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    #[test]
    fn fused_kernels_match_the_composed_ones(
        combo in 0usize..24, seed in any::<u64>(), n in 0usize..3300,
        offs in 0usize..64, opi in 0usize..4,
    ) {
        let (s, q, a) = combos()[combo];
        let src = kat_data(s, n, seed);
        check_adopt(s, q, a, &src, offs % 8, offs / 8);
        let other = kat_data(s, n, seed ^ 0x55);
        let (enc, _) = roundtrip(s, q, a, &src);
        check_reduce_from(s, q, a, OPS[opi], &other, &enc, offs / 8, offs % 8);
    }
}

#[test]
fn fused_bad_arguments_are_errors_and_write_nothing() {
    use DataType::*;
    let mm = QuantizationAlgorithm::MinMax;
    let src = to_src(F32, &gen_data(F32, 0, 10, 1));
    let (enc, _) = roundtrip(F32, U8, mm, &src);
    // quantize_adopt: wrong output length, partial element, bad combos.
    let cases: [(DataType, DataType, QuantizationAlgorithm, usize, usize); 6] = [
        (F32, U8, mm, 0, 1),
        (F32, U8, mm, 1, 0),
        (F32, I32, mm, 0, 0),
        (I32, U8, mm, 0, 0),
        (F16, U16, mm, 0, 0),
        (F32, U8, QuantizationAlgorithm::None, 0, 0),
    ];
    for (s, q, a, dcut, ecut) in cases {
        let mut data = src.clone();
        let mut out = vec![0xeeu8; enc.len()];
        let r = quantize_adopt(s, q, a, &mut data[dcut..], &mut out[ecut..]);
        assert!(
            matches!(r, Err(Error::InvalidArgument(_))),
            "{s:?} {q:?} {a:?}"
        );
        assert_eq!(data, src);
        assert!(out.iter().all(|&b| b == 0xee));
    }
    // dequantize_reduce_from.
    let a = to_src(F32, &gen_data(F32, 1, 10, 2));
    let bad: [(DataType, ReduceOp, usize, usize, usize); 6] = [
        (F32, ReduceOp::Prod, 0, 0, 0),
        (F32, ReduceOp::Sum, 0, 1, 0), // enc too short
        (F32, ReduceOp::Sum, 0, 0, 4), // dst shorter than a
        (F32, ReduceOp::Sum, 4, 0, 0), // a shorter than dst
        (F32, ReduceOp::Sum, 1, 0, 1), // partial elements
        (F16, ReduceOp::Sum, 0, 0, 0), // enc length wrong for f16
    ];
    for (s, op, acut, ecut, dcut) in bad {
        let mut dst = vec![0x77u8; a.len()];
        let r = dequantize_reduce_from(s, U8, mm, op, &a[acut..], &enc[ecut..], &mut dst[dcut..]);
        assert!(
            matches!(r, Err(Error::InvalidArgument(_))),
            "{s:?} {op:?} {acut} {ecut} {dcut}"
        );
        assert!(dst.iter().all(|&b| b == 0x77));
    }
    // Empty input is fine.
    assert!(quantize_adopt(F32, U8, mm, &mut [], &mut []).is_ok());
    assert!(dequantize_reduce_from(F32, U8, mm, ReduceOp::Sum, &[], &[], &mut []).is_ok());
}

#[test]
fn validate_accepts_exactly_the_meaningful_combinations() {
    let algos = [
        QuantizationAlgorithm::None,
        QuantizationAlgorithm::MinMax,
        QuantizationAlgorithm::ZeroPointScale,
    ];
    let mut accepted = 0;
    for s in DataType::ALL {
        for q in DataType::ALL {
            for a in algos {
                for op in ReduceOp::ALL {
                    let narrow = CODES.contains(&q) && q.size() < s.size();
                    // PCCL 1.0's extra combinations: MinMax, f32/f64 -> u32/u64.
                    let wide = WIDE_CODES.contains(&q)
                        && matches!(s, DataType::F32 | DataType::F64)
                        && a == QuantizationAlgorithm::MinMax;
                    let expect = s.is_float()
                        && (narrow || wide)
                        && a != QuantizationAlgorithm::None
                        && op != ReduceOp::Prod;
                    let got = validate(s, q, a, op);
                    assert_eq!(
                        got.is_ok(),
                        expect,
                        "{} {} {:?} {:?}",
                        s.name(),
                        q.name(),
                        a,
                        op
                    );
                    if let Err(e) = got {
                        assert!(matches!(e, Error::InvalidArgument(_)));
                    } else {
                        accepted += 1;
                    }
                }
            }
        }
    }
    // f16, bf16: u8, i8; f32, f64: u8, i8, u16, i16 -> 12 x 2 algos x 4 ops;
    // plus f32, f64 -> u32, u64 with MinMax: 4 x 4 ops.
    assert_eq!(accepted, 12 * 2 * 4 + 4 * 4);
    assert_eq!(wide_combos().len(), 4);
    assert_eq!(combos().len(), 24);
}

#[test]
fn block_stats_match_a_naive_fold() {
    let mut rng = StdRng::seed_from_u64(21);
    for _ in 0..2000 {
        let n = rng.gen_range(1..40);
        let xs: Vec<f32> = (0..n)
            .map(|_| match rng.gen_range(0..6) {
                0 => f32::from_bits(rng.gen()),
                1 => [0.0, -0.0, f32::MIN_POSITIVE, -f32::MAX, f32::MAX][rng.gen_range(0..5)],
                _ => rng.gen_range(-10.0..10.0),
            })
            .collect();
        let (lo, hi, finite) = block_stats(&xs);
        assert_eq!(finite, xs.iter().all(|x| x.is_finite()));
        if finite {
            let min = xs.iter().cloned().fold(f32::INFINITY, f32::min);
            let max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(lo, min);
            assert_eq!(hi, max);
        }
        let xd: Vec<f64> = xs.iter().map(|&x| x as f64).collect();
        let (lo64, hi64, finite64) = block_stats(&xd);
        assert_eq!(finite64, finite);
        if finite {
            assert_eq!((lo64, hi64), (lo as f64, hi as f64));
        }
    }
    // -0.0 sorts below +0.0.
    let (lo, hi, _) = block_stats(&[0.0f32, -0.0]);
    assert_eq!((lo.to_bits(), hi.to_bits()), ((-0.0f32).to_bits(), 0));
}

#[test]
fn float_constants_have_the_intended_bits() {
    assert_eq!(<f32 as QFloat>::TINY.to_bits(), 1);
    assert_eq!(<f64 as QFloat>::TINY.to_bits(), 1);
    assert_eq!(Bf16Src::MAX.to_bits(), 0x7f7f_0000);
    assert_eq!(Bf16Src::MAX, bf16::MAX.to_f32());
    assert_eq!(F16Src::MAX, f16::MAX.to_f32());
    assert_eq!(<f32 as QFloat>::MAGIC, 1.5 * 2f32.powi(23));
    assert_eq!(<f64 as QFloat>::MAGIC, 1.5 * 2f64.powi(52));
}

#[test]
fn encoded_len_layout() {
    use DataType::*;
    let mm = QuantizationAlgorithm::MinMax;
    assert_eq!(encoded_len(F32, U8, mm, 0), 0);
    assert_eq!(encoded_len(F32, U8, mm, 1), 8 + 1);
    assert_eq!(encoded_len(F32, U8, mm, B), 8 + B);
    assert_eq!(encoded_len(F32, I16, mm, B + 1), 2 * 8 + 2 * (B + 1));
    assert_eq!(encoded_len(F64, U8, mm, 3 * B), 3 * 16 + 3 * B);
    assert_eq!(encoded_len(BF16, I8, mm, 5), 8 + 5);
    assert_eq!(encoded_len(F32, U8, QuantizationAlgorithm::None, 5), 20);
    assert_eq!(encoded_len(F64, U16, mm, usize::MAX), usize::MAX);
}

#[test]
fn explicit_layout_minmax_f32_u8() {
    // 3 elements: min 1.0, max 2.0; 1.5 sits exactly between codes 127 and 128.
    let xs = [1.0f32, 2.0, 1.25];
    let src: Vec<u8> = xs.iter().flat_map(|x| x.to_ne_bytes()).collect();
    let mut enc = vec![
        0u8;
        encoded_len(
            DataType::F32,
            DataType::U8,
            QuantizationAlgorithm::MinMax,
            3
        )
    ];
    quantize(
        DataType::F32,
        DataType::U8,
        QuantizationAlgorithm::MinMax,
        &src,
        &mut enc,
    )
    .unwrap();
    assert_eq!(&enc[0..4], &1.0f32.to_le_bytes());
    assert_eq!(&enc[4..8], &2.0f32.to_le_bytes());
    // 0.25 * 255 = 63.75 -> 64
    assert_eq!(&enc[8..], &[0, 255, 64]);
    // Signed: the same codes with the top bit flipped.
    let mut enc_i = enc.clone();
    quantize(
        DataType::F32,
        DataType::I8,
        QuantizationAlgorithm::MinMax,
        &src,
        &mut enc_i,
    )
    .unwrap();
    assert_eq!(&enc_i[..8], &enc[..8]);
    assert_eq!(&enc_i[8..], &[0x80, 0x7f, 64 ^ 0x80]);
    let mut dec = vec![0u8; 12];
    dequantize_into(
        DataType::F32,
        DataType::I8,
        QuantizationAlgorithm::MinMax,
        None,
        &enc_i,
        &mut dec,
    )
    .unwrap();
    let ys: Vec<f32> = dec
        .chunks_exact(4)
        .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(ys[0], 1.0);
    assert_eq!(ys[1], 2.0);
    assert_eq!(ys[2], 1.0 + 64.0 * (1.0 / 255.0f32));
}

#[test]
fn explicit_layout_zps_f32_u16() {
    let xs = [-1.0f32, 3.0, 0.0, 1.0];
    let src: Vec<u8> = xs.iter().flat_map(|x| x.to_ne_bytes()).collect();
    let a = QuantizationAlgorithm::ZeroPointScale;
    let mut enc = vec![0u8; encoded_len(DataType::F32, DataType::U16, a, 4)];
    quantize(DataType::F32, DataType::U16, a, &src, &mut enc).unwrap();
    let scale = 4.0f32 / 65535.0;
    let zp = (1.0f32 / scale).round();
    assert_eq!(&enc[0..4], &scale.to_le_bytes());
    assert_eq!(&enc[4..8], &zp.to_le_bytes());
    let codes: Vec<u16> = enc[8..]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert_eq!(codes[0], 0);
    assert_eq!(codes[2], zp as u16);
    let (_, dec) = roundtrip(DataType::F32, DataType::U16, a, &src);
    let ys: Vec<f32> = dec
        .chunks_exact(4)
        .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(ys[2], 0.0);
}

#[test]
fn all_equal_blocks_decode_bit_exactly() {
    let specials = [
        0.0f64,
        -0.0,
        1.0,
        -1.0,
        0.1,
        -3.7e-5,
        12345.678,
        65504.0,
        -65504.0,
        6e-8,
        1e-30,
        -3e38,
        3.4e38,
        1e300,
        f64::MIN_POSITIVE,
        f64::from_bits(1),
    ];
    for (s, q, a) in combos() {
        for &v in &specials {
            let n = B + 100;
            let src = to_src(s, &vec![v; n]);
            if from_src(s, &src).iter().any(|x| !x.is_finite()) {
                continue; // out of the source type's range
            }
            let (_, dec) = roundtrip(s, q, a, &src);
            assert_eq!(dec, src, "{}->{} {:?} v={v:e}", s.name(), q.name(), a);
        }
    }
}

#[test]
fn non_finite_values_poison_exactly_their_block() {
    for (s, q, a) in combos() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let n = 3 * B + 10;
            let mut xs = gen_data(s, 0, n, 11);
            xs[B + 17] = bad;
            xs[3 * B + 9] = bad; // in the short last block
            let src = to_src(s, &xs);
            let (enc, dec) = roundtrip(s, q, a, &src);
            let ys = from_src(s, &dec);
            for (i, y) in ys.iter().enumerate() {
                let poisoned = (B..2 * B).contains(&i) || i >= 3 * B;
                assert_eq!(
                    y.is_nan(),
                    poisoned,
                    "{}->{} {:?} i={i}",
                    s.name(),
                    q.name(),
                    a
                );
            }
            // Canonical NaN bits in the decoded source type.
            let nan_bits: &[u8] = match s {
                DataType::F16 => &[0x00, 0x7e],
                DataType::BF16 => &[0xc0, 0x7f],
                DataType::F32 => &[0, 0, 0xc0, 0x7f],
                _ => &[0, 0, 0, 0, 0, 0, 0xf8, 0x7f],
            };
            let sz = s.size();
            assert_eq!(&dec[B * sz..(B + 1) * sz], nan_bits);
            // Healthy blocks are within the bound.
            check_bound(s, q, a, &xs[..B], &ys[..B]);
            check_bound(s, q, a, &xs[2 * B..3 * B], &ys[2 * B..3 * B]);
            // Metadata of the poisoned block is NaN.
            let ml = meta_len(s);
            let blk = ml + B * q.size();
            let meta = &enc[blk..blk + ml];
            let m0 = if s == DataType::F64 {
                f64::from_le_bytes(meta[..8].try_into().unwrap())
            } else {
                f32::from_le_bytes(meta[..4].try_into().unwrap()) as f64
            };
            assert!(m0.is_nan());
        }
    }
}

#[test]
fn extreme_ranges_do_not_overflow() {
    for (s, q, a) in combos() {
        let big = match s {
            DataType::F16 => 65504.0,
            DataType::BF16 => bf16::MAX.to_f64(),
            DataType::F64 => f64::MAX,
            _ => f32::MAX as f64,
        };
        let mut rng = StdRng::seed_from_u64(3);
        let mut xs: Vec<f64> = (0..B).map(|_| big * rng.gen_range(-1.0..1.0)).collect();
        xs[0] = big;
        xs[1] = -big;
        xs[2] = 0.0;
        let xs = from_src(s, &to_src(s, &xs));
        let (_, dec) = roundtrip(s, q, a, &to_src(s, &xs));
        let ys = from_src(s, &dec);
        assert!(
            ys.iter().all(|y| y.is_finite()),
            "{}->{} {:?}",
            s.name(),
            q.name(),
            a
        );
        check_bound(s, q, a, &xs, &ys);
        if a == QuantizationAlgorithm::MinMax {
            assert_eq!(ys[0], big);
            assert_eq!(ys[1], -big);
        }
    }
}

#[test]
fn tiny_and_subnormal_ranges() {
    for (s, q, a) in combos() {
        let tiny = match s {
            DataType::F16 => 6e-8,
            DataType::F64 => f64::from_bits(1),
            _ => f32::from_bits(1) as f64,
        };
        for k in [1.0, 3.0, 200.0, 1e5] {
            let xs: Vec<f64> = (0..700)
                .map(|i| tiny * k * ((i % 7) as f64 - 3.0))
                .collect();
            let xs = from_src(s, &to_src(s, &xs));
            let (_, dec) = roundtrip(s, q, a, &to_src(s, &xs));
            check_bound(s, q, a, &xs, &from_src(s, &dec));
        }
        // A narrow range far from zero (ZeroPointScale's worst case).
        let xs: Vec<f64> = (0..500).map(|i| 1000.0 + i as f64 / 512.0).collect();
        let xs = from_src(s, &to_src(s, &xs));
        let (_, dec) = roundtrip(s, q, a, &to_src(s, &xs));
        check_bound(s, q, a, &xs, &from_src(s, &dec));
    }
}

#[test]
fn deterministic_and_isa_independent() {
    for (s, q, a) in combos() {
        for dist in 0..6 {
            let xs = gen_data(s, dist, 2 * B + 333, 1000 + dist as u64);
            let src = to_src(s, &xs);
            let (enc1, dec1) = roundtrip(s, q, a, &src);
            let (enc2, dec2) = roundtrip(s, q, a, &src);
            assert_eq!(enc1, enc2);
            assert_eq!(dec1, dec2);
            let mut enc3 = vec![0u8; enc1.len()];
            quantize_portable_any(s, q, a, &src, &mut enc3);
            assert_eq!(enc1, enc3, "{}->{} {:?}", s.name(), q.name(), a);
            let mut dec3 = vec![0u8; dec1.len()];
            dequantize_portable_any(s, q, a, &enc1, &mut dec3);
            assert_eq!(dec1, dec3, "{}->{} {:?}", s.name(), q.name(), a);
            // Idempotent on already-decoded data for all-equal blocks only;
            // in general a second round trip stays within the bound.
            let (_, dec4) = roundtrip(s, q, a, &dec1);
            check_bound(s, q, a, &from_src(s, &dec1), &from_src(s, &dec4));
        }
    }
}

#[test]
fn chunks_encode_independently_at_block_boundaries() {
    for (s, q, a) in combos() {
        let xs = gen_data(s, 0, 3 * B + 77, 42);
        let src = to_src(s, &xs);
        let (whole, _) = roundtrip(s, q, a, &src);
        let cut = 2 * B * s.size();
        let (e1, _) = roundtrip(s, q, a, &src[..cut]);
        let (e2, _) = roundtrip(s, q, a, &src[cut..]);
        assert_eq!(whole, [e1, e2].concat());
    }
}

#[test]
fn reducing_dequantize_equals_decode_then_reduce_into() {
    let mut rng = StdRng::seed_from_u64(8);
    for (s, q, a) in combos() {
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
            let n = B + 500;
            let xs = gen_data(s, rng.gen(), n, rng.gen());
            let base = to_src(s, &gen_data(s, 0, n, rng.gen()));
            let (enc, dec) = roundtrip(s, q, a, &to_src(s, &xs));
            let mut expect = base.clone();
            reduce_into(s, op, &mut expect, &dec);
            // Unaligned destination.
            let mut buf = vec![0u8; base.len() + 1];
            buf[1..].copy_from_slice(&base);
            dequantize_into(s, q, a, Some(op), &enc, &mut buf[1..]).unwrap();
            assert_eq!(
                &buf[1..],
                &expect[..],
                "{}->{} {:?} {:?}",
                s.name(),
                q.name(),
                a,
                op
            );
        }
    }
}

#[test]
fn unaligned_source_and_output() {
    for (s, q, a) in combos() {
        let xs = gen_data(s, 1, B + 3, 77);
        let src = to_src(s, &xs);
        let (enc, dec) = roundtrip(s, q, a, &src);
        let mut sbuf = vec![0u8; src.len() + 3];
        sbuf[3..].copy_from_slice(&src);
        let mut ebuf = vec![0u8; enc.len() + 1];
        quantize(s, q, a, &sbuf[3..], &mut ebuf[1..]).unwrap();
        assert_eq!(&ebuf[1..], &enc[..]);
        let mut dbuf = vec![0u8; dec.len() + 5];
        dequantize_into(s, q, a, None, &ebuf[1..], &mut dbuf[5..]).unwrap();
        assert_eq!(&dbuf[5..], &dec[..]);
    }
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    use DataType::*;
    let mm = QuantizationAlgorithm::MinMax;
    let src = vec![0u8; 40];
    let mut out = vec![0u8; encoded_len(F32, U8, mm, 10)];
    assert!(quantize(F32, U8, mm, &src, &mut out).is_ok());
    // Wrong output length.
    assert!(quantize(F32, U8, mm, &src, &mut out[1..]).is_err());
    // Source not a whole number of elements.
    assert!(quantize(F32, U8, mm, &src[1..], &mut out).is_err());
    // Invalid combinations.
    assert!(quantize(F32, I32, mm, &src, &mut out).is_err());
    assert!(quantize(
        F32,
        U32,
        QuantizationAlgorithm::ZeroPointScale,
        &src,
        &mut out
    )
    .is_err());
    assert!(quantize(F16, U32, mm, &src[..20], &mut out).is_err());
    assert!(quantize(I32, U8, mm, &src, &mut out).is_err());
    assert!(quantize(F16, U16, mm, &src[..20], &mut out).is_err());
    assert!(quantize(F32, U8, QuantizationAlgorithm::None, &src, &mut out).is_err());
    let mut dst = vec![0u8; 40];
    assert!(dequantize_into(F32, U8, mm, None, &out, &mut dst).is_ok());
    assert!(dequantize_into(F32, U8, mm, Some(ReduceOp::Prod), &out, &mut dst).is_err());
    assert!(dequantize_into(F32, U8, mm, None, &out[1..], &mut dst).is_err());
    assert!(dequantize_into(F32, U8, mm, None, &out, &mut dst[1..]).is_err());
    assert!(dequantize_into(F32, U8, mm, None, &out, &mut dst[4..]).is_err());
    // Empty input is fine.
    assert!(quantize(F32, U8, mm, &[], &mut []).is_ok());
    assert!(dequantize_into(F32, U8, mm, Some(ReduceOp::Sum), &[], &mut []).is_ok());
}

// ---------------------------------------------------------------------------
// Wide codes: MinMax, f32/f64 -> u32/u64 (PCCL 1.0's extra combinations)
// ---------------------------------------------------------------------------

const WIDE_CODES: [DataType; 2] = [DataType::U32, DataType::U64];

/// Every valid wide (source, code) combination.
fn wide_combos() -> Vec<(DataType, DataType)> {
    let mut v = Vec::new();
    for s in [DataType::F32, DataType::F64] {
        for q in WIDE_CODES {
            v.push((s, q));
        }
    }
    v
}

fn wide_qmax(q: DataType) -> f64 {
    match q {
        DataType::U32 => u32::MAX as f64,
        _ => ((1u64 << 53) - 1) as f64,
    }
}

/// The documented per-element bound of a wide block (module docs, "Wide
/// codes"): `Δ/2 + 8·2^-53·M + qmax·2^-1074`, doubled for `f32` sources
/// (the final rounding to `f32`).
fn wide_block_bound(s: DataType, q: DataType, xs: &[f64]) -> f64 {
    let lo = xs.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let qmax = wide_qmax(q);
    let delta = hi / qmax - lo / qmax;
    let m = lo.abs().max(hi.abs());
    let e = delta / 2.0 + 8.0 * 2f64.powi(-53) * m + qmax * f64::from_bits(1);
    if s == DataType::F32 {
        2.0 * e
    } else {
        e
    }
}

const MM: QuantizationAlgorithm = QuantizationAlgorithm::MinMax;

#[test]
fn wide_roundtrip_error_within_documented_bound() {
    let mut worst: f64 = 0.0;
    let mut exact = 0usize;
    let mut total = 0usize;
    for (ci, (s, q)) in wide_combos().into_iter().enumerate() {
        for seed in 0..60u64 {
            let dist = (seed % 6) as u8;
            let n = [0, 1, 5, 1023, 1024, 1025, 3000][(seed % 7) as usize];
            let xs = gen_data(s, dist, n, seed * 16 + ci as u64);
            let src = to_src(s, &xs);
            let (enc, dec) = roundtrip(s, q, MM, &src);
            assert_eq!(enc.len(), encoded_len(s, q, MM, n));
            let ys = from_src(s, &dec);
            for (xb, yb) in xs.chunks(B).zip(ys.chunks(B)) {
                let bound = wide_block_bound(s, q, xb);
                for (&x, &y) in xb.iter().zip(yb) {
                    let err = (y - x).abs();
                    assert!(
                        err <= bound,
                        "{}->{} seed {seed}: x={x:e} y={y:e} err={err:e} bound={bound:e}",
                        s.name(),
                        q.name()
                    );
                    if bound > 0.0 {
                        worst = worst.max(err / bound);
                    }
                    exact += (err == 0.0) as usize;
                    total += 1;
                }
            }
            if dist == 4 {
                assert_eq!(dec, src, "all-equal blocks decode bit-exactly");
            }
            // quantize_adopt = quantize + dequantize, bit for bit.
            check_adopt(s, q, MM, &src, 0, 0);
            check_adopt(s, q, MM, &src, 3, 1);
        }
    }
    assert!(worst <= 1.0);
    // f32 -> u32 / u64 and f64 -> u64 return most values exactly.
    assert!(exact * 2 > total, "{exact} of {total} exact");
}

#[test]
fn wide_explicit_layout_f32_u32_and_f64_u64() {
    // f32 -> u32: lo, hi as f32 LE, then u32 LE codes; lo -> 0, hi -> qmax.
    let xs = [1.0f64, -2.0, 0.5, 4.0];
    let src = to_src(DataType::F32, &xs);
    let (enc, dec) = roundtrip(DataType::F32, DataType::U32, MM, &src);
    assert_eq!(enc.len(), 8 + 4 * 4);
    assert_eq!(&enc[0..4], &(-2.0f32).to_le_bytes());
    assert_eq!(&enc[4..8], &4.0f32.to_le_bytes());
    let code = |i: usize| u32::from_le_bytes(enc[8 + 4 * i..12 + 4 * i].try_into().unwrap());
    assert_eq!(code(1), 0);
    assert_eq!(code(3), u32::MAX);
    // 1.0 is half-way: (1 - -2) / 6 * (2^32 - 1) = 2147483647.5 (give or
    // take the rounding of the step).
    assert!((2_147_483_647..=2_147_483_648).contains(&code(0)));
    assert_eq!(dec, src, "f32 -> u32 is exact on these values");
    // f64 -> u64: 16 bytes of metadata, codes below 2^53.
    let xs = [0.1f64, 0.2, 0.3];
    let src = to_src(DataType::F64, &xs);
    let (enc, dec) = roundtrip(DataType::F64, DataType::U64, MM, &src);
    assert_eq!(enc.len(), 16 + 3 * 8);
    assert_eq!(&enc[0..8], &0.1f64.to_le_bytes());
    assert_eq!(&enc[8..16], &0.3f64.to_le_bytes());
    let code = |i: usize| u64::from_le_bytes(enc[16 + 8 * i..24 + 8 * i].try_into().unwrap());
    assert_eq!((code(0), code(2)), (0, (1 << 53) - 1));
    let ys = from_src(DataType::F64, &dec);
    assert!((ys[1] - 0.2).abs() <= 4.0 * f64::EPSILON);
    // A stored code above qmax decodes as qmax (the block maximum).
    let mut bad = enc.clone();
    bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut out = vec![0u8; src.len()];
    dequantize_into(DataType::F64, DataType::U64, MM, None, &bad, &mut out).unwrap();
    assert_eq!(from_src(DataType::F64, &out)[0], 0.3);
    // u64 codes of f32: twice the source's size, still exact metadata.
    assert_eq!(
        encoded_len(DataType::F32, DataType::U64, MM, 1025),
        2 * 8 + 1025 * 8
    );
}

#[test]
fn wide_non_finite_blocks_are_canonical_nan_and_others_untouched() {
    for (s, q) in wide_combos() {
        let mut xs = gen_data(s, 0, 3 * B, 7);
        xs[B + 17] = f64::NAN;
        xs[2 * B + 5] = f64::INFINITY;
        let src = to_src(s, &xs);
        let (_, dec) = roundtrip(s, q, MM, &src);
        let nan: &[u8] = match s {
            DataType::F32 => &0x7fc0_0000u32.to_ne_bytes(),
            _ => &0x7ff8_0000_0000_0000u64.to_ne_bytes(),
        };
        for (i, y) in dec.chunks(s.size()).enumerate() {
            assert_eq!(y == nan, i >= B, "{}->{} element {i}", s.name(), q.name());
        }
        check_bound_wide(s, q, &xs[..B], &from_src(s, &dec[..B * s.size()]));
    }
}

fn check_bound_wide(s: DataType, q: DataType, xs: &[f64], ys: &[f64]) {
    let bound = wide_block_bound(s, q, xs);
    for (&x, &y) in xs.iter().zip(ys) {
        assert!((y - x).abs() <= bound, "{x:e} {y:e} {bound:e}");
    }
}

#[test]
fn wide_extreme_ranges_do_not_overflow() {
    for (s, q) in wide_combos() {
        let max = if s == DataType::F32 {
            f32::MAX as f64
        } else {
            f64::MAX
        };
        let xs = [-max, max, 0.0, max / 3.0, -max / 7.0, -0.0];
        let src = to_src(s, &xs);
        let (_, dec) = roundtrip(s, q, MM, &src);
        let ys = from_src(s, &dec);
        assert!(ys.iter().all(|y| y.is_finite()));
        assert_eq!((ys[0], ys[1]), (-max, max));
        check_bound_wide(s, q, &xs, &ys);
    }
}

#[test]
fn wide_reducing_decoders_match_decode_then_reduce() {
    for (s, q) in wide_combos() {
        for seed in 0..6u64 {
            let n = [1, 1024, 2500][(seed % 3) as usize];
            let a = to_src(s, &gen_data(s, seed as u8, n, seed + 100));
            let b = to_src(s, &gen_data(s, seed as u8 + 1, n, seed + 200));
            let (enc, dec) = roundtrip(s, q, MM, &b);
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
                // dequantize_into(Some(op)) == decode + reduce_into.
                let mut want = a.clone();
                reduce_into(s, op, &mut want, &dec);
                let mut got = a.clone();
                dequantize_into(s, q, MM, Some(op), &enc, &mut got).unwrap();
                assert_eq!(got, want, "{}->{} {op:?}", s.name(), q.name());
                // dequantize_reduce_from == copy + dequantize_into(Some(op)).
                check_reduce_from(s, q, MM, op, &a, &enc, 0, 0);
                check_reduce_from(s, q, MM, op, &a, &enc, 1, 3);
            }
            assert!(dequantize_into(s, q, MM, Some(ReduceOp::Prod), &enc, &mut a.clone()).is_err());
        }
    }
}

#[test]
fn wide_decoding_arbitrary_bytes_is_total_and_deterministic() {
    let mut rng = StdRng::seed_from_u64(5);
    for (s, q) in wide_combos() {
        for n in [0usize, 1, 7, 1024, 1500] {
            let enc: Vec<u8> = (0..encoded_len(s, q, MM, n)).map(|_| rng.gen()).collect();
            let mut d1 = vec![0u8; n * s.size() + 1];
            dequantize_into(s, q, MM, None, &enc, &mut d1[1..]).unwrap();
            let mut d2 = vec![0u8; n * s.size()];
            dequantize_into(s, q, MM, None, &enc, &mut d2).unwrap();
            assert_eq!(&d1[1..], &d2[..]);
            let mut d3 = d2.clone();
            dequantize_into(s, q, MM, Some(ReduceOp::Max), &enc, &mut d3).unwrap();
        }
    }
}
