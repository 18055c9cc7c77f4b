//! The portable per-block kernels: a block's range analysis, its encoder
//! (`encode_block`, which hands the longest prefix it can to the SIMD kernel
//! of [`super::simd`]) and its decoder (`decode_block`, `Decoder`). These
//! define the byte layout and the bits every peer decodes (module docs of
//! [`super`]); the SIMD kernels must match them bit for bit.
//!
//! Imports the element traits of [`super::element`] and the SIMD glue of
//! [`super::simd`]; nothing else of `quant`.

use super::element::{Code, QFloat};
use super::simd::{simd_decode_prefix, simd_prefix, Kern};
use crate::types::QuantizationAlgorithm;

// ---------------------------------------------------------------------------
// Block analysis and encoding
// ---------------------------------------------------------------------------

/// Minimum, maximum, and whether every element is finite.
#[inline(always)]
pub(super) fn block_stats<C: QFloat>(xs: &[C]) -> (C, C, bool) {
    C::stats(xs)
}

/// `(hi - lo) / qmax`, without overflowing when `hi - lo` does. Shared by the
/// encoder and the decoder, so both use the same step bit for bit.
#[inline(always)]
pub(super) fn minmax_step<C: QFloat>(lo: C, hi: C, qmax: C) -> C {
    let r = hi - lo;
    if r.is_finite() {
        r / qmax
    } else {
        hi / qmax - lo / qmax
    }
}

#[inline(always)]
pub(super) fn clamp_round<C: QFloat>(t: C, qmax: C) -> u32 {
    let t = if t > C::ZERO { t } else { C::ZERO };
    let t = if t < qmax { t } else { qmax };
    t.round_code()
}

#[inline(always)]
pub(super) fn fill_codes<Q: Code>(cs: &mut [Q], stored: u32) {
    let v = Q::from_u32(stored);
    for c in cs.iter_mut() {
        *c = v;
    }
}

/// A block being encoded: read-only (`&[C]`, [`quantize`]) or adopting
/// (`&mut [C]`, [`quantize_adopt`]: each value is replaced by the decoding
/// of its code, computed right after the code is chosen).
pub(super) trait EncBlock<C: QFloat> {
    fn xs(&self) -> &[C];
    /// `cs[i] = enc(x[i]) ^ mask`; adopting: also `x[i] = dec(enc(x[i]))`.
    /// `kern`, when given, describes `enc` and `dec` (and `cap` their
    /// clamp) for the SIMD kernel, which then does a prefix of the block.
    fn encode<Q: Code>(
        self,
        cs: &mut [Q],
        mask: u32,
        kern: Option<Kern<C>>,
        cap: C,
        enc: impl Fn(C) -> u32,
        dec: impl Fn(u32) -> C,
    );
    /// Adopting: decode `cs` (filled another way) into the block.
    fn adopt<Q: Code>(self, algo: QuantizationAlgorithm, m0: C, m1: C, cs: &[Q], mask: u32, cap: C);
}

impl<C: QFloat> EncBlock<C> for &[C] {
    #[inline(always)]
    fn xs(&self) -> &[C] {
        self
    }
    #[inline(always)]
    fn encode<Q: Code>(
        self,
        cs: &mut [Q],
        mask: u32,
        kern: Option<Kern<C>>,
        cap: C,
        enc: impl Fn(C) -> u32,
        _dec: impl Fn(u32) -> C,
    ) {
        let m = self.len().min(cs.len());
        let (xs, cs) = (&self[..m], &mut cs[..m]);
        // SAFETY: `xs` is valid for `cs.len()` reads; no values are written.
        let k = unsafe { simd_prefix(kern, cap, mask, xs.as_ptr(), std::ptr::null_mut(), cs) };
        let (xs, cs) = (&xs[k..], &mut cs[k..]);
        for (&x, c) in xs.iter().zip(cs.iter_mut()) {
            *c = Q::from_u32(enc(x) ^ mask);
        }
    }
    #[inline(always)]
    fn adopt<Q: Code>(self, _: QuantizationAlgorithm, _: C, _: C, _: &[Q], _: u32, _: C) {}
}

impl<C: QFloat> EncBlock<C> for &mut [C] {
    #[inline(always)]
    fn xs(&self) -> &[C] {
        self
    }
    #[inline(always)]
    fn encode<Q: Code>(
        self,
        cs: &mut [Q],
        mask: u32,
        kern: Option<Kern<C>>,
        cap: C,
        enc: impl Fn(C) -> u32,
        dec: impl Fn(u32) -> C,
    ) {
        let m = self.len().min(cs.len());
        let (xs, cs) = (&mut self[..m], &mut cs[..m]);
        let p = xs.as_mut_ptr();
        // SAFETY: `xs` is valid for `cs.len()` reads and writes, and no
        // reference to it is used while the kernel runs.
        let k = unsafe { simd_prefix(kern, cap, mask, p, p, cs) };
        let (xs, cs) = (&mut xs[k..], &mut cs[k..]);
        for (x, c) in xs.iter_mut().zip(cs.iter_mut()) {
            let u = enc(*x);
            *c = Q::from_u32(u ^ mask);
            *x = dec(u);
        }
    }
    #[inline(always)]
    fn adopt<Q: Code>(
        self,
        algo: QuantizationAlgorithm,
        m0: C,
        m1: C,
        cs: &[Q],
        mask: u32,
        cap: C,
    ) {
        decode_block(algo, m0, m1, cs, self, mask, cap);
    }
}

/// Code of `x` (MinMax): measured from the nearer end (mirrors the
/// decoder; never overflows).
#[inline(always)]
pub(super) fn minmax_code<C: QFloat>(x: C, lo: C, hi: C, qmax: C, scale: impl Fn(C) -> C) -> u32 {
    let dl = x - lo;
    let dh = hi - x;
    let t = if dl <= dh {
        scale(dl)
    } else {
        qmax - scale(dh)
    };
    clamp_round(t, qmax)
}

/// Encodes one block into codes; returns the two metadata values. An
/// adopting block (`&mut [C]`) ends up holding exactly what
/// [`decode_block`] makes of the codes and metadata.
#[inline(always)]
pub(super) fn encode_block<C: QFloat, Q: Code, X: EncBlock<C>>(
    algo: QuantizationAlgorithm,
    x: X,
    cs: &mut [Q],
    mask: u32,
    cap: C,
) -> (C, C) {
    let qmax_i = Q::QMAX as i32;
    let qmax = C::from_i32(qmax_i);
    let (lo, hi, finite) = block_stats(x.xs());
    if !finite {
        fill_codes(cs, mask);
        x.adopt(algo, C::NAN, C::NAN, cs, mask, cap);
        return (C::NAN, C::NAN);
    }
    match algo {
        QuantizationAlgorithm::ZeroPointScale => {
            if lo == hi {
                // All equal: pick (scale, zp, code) so that (u - zp) * scale == v exactly.
                let v = lo;
                let (scale, zp, u) = if v > C::ZERO {
                    (v, C::ZERO, 1)
                } else if v < C::ZERO {
                    (-v, C::from_i32(1), 0)
                } else {
                    (v, C::ZERO, 0)
                };
                fill_codes(cs, u ^ mask);
                x.adopt(algo, scale, zp, cs, mask, cap);
                return (scale, zp);
            }
            let lo2 = if lo < C::ZERO { lo } else { C::ZERO };
            let hi2 = if hi > C::ZERO { hi } else { C::ZERO };
            let mut scale = minmax_step(lo2, hi2, qmax);
            if scale == C::ZERO {
                // The whole range is a few subnormals: the smallest step covers it.
                scale = C::TINY;
            }
            let zp = C::from_i32(clamp_round(-lo2 / scale, qmax) as i32);
            let inv = C::from_i32(1) / scale;
            let dec = |u: u32| decode_zps_one(u as i32, scale, zp, cap);
            if inv.is_finite() {
                let k = Kern::Zps {
                    f: inv,
                    div: false,
                    scale,
                    zp,
                };
                x.encode(
                    cs,
                    mask,
                    Some(k),
                    cap,
                    |v| clamp_round(v * inv + zp, qmax),
                    dec,
                );
            } else {
                let k = Kern::Zps {
                    f: scale,
                    div: true,
                    scale,
                    zp,
                };
                x.encode(
                    cs,
                    mask,
                    Some(k),
                    cap,
                    |v| clamp_round(v / scale + zp, qmax),
                    dec,
                );
            }
            (scale, zp)
        }
        // MinMax (None is refused before we get here; encode it as MinMax).
        _ => {
            let step = minmax_step(lo, hi, qmax);
            let half = (Q::QMAX / 2) as i32;
            let dec = |u: u32| decode_minmax_one(u as i32, lo, hi, step, qmax_i, half, cap);
            if step == C::ZERO {
                if lo == hi {
                    fill_codes(cs, mask);
                    x.adopt(algo, lo, hi, cs, mask, cap);
                } else {
                    // Range below qmax subnormals: codes 0 and qmax decode to lo and hi.
                    let enc = |v| minmax_code(v, lo, hi, qmax, |_| C::ZERO);
                    x.encode(cs, mask, None, cap, enc, dec);
                }
            } else {
                let inv = C::from_i32(1) / step;
                if inv.is_finite() {
                    let k = Kern::MinMax {
                        lo,
                        hi,
                        f: inv,
                        div: false,
                        step,
                    };
                    let enc = |v| minmax_code(v, lo, hi, qmax, |d| d * inv);
                    x.encode(cs, mask, Some(k), cap, enc, dec);
                } else {
                    let k = Kern::MinMax {
                        lo,
                        hi,
                        f: step,
                        div: true,
                        step,
                    };
                    let enc = |v| minmax_code(v, lo, hi, qmax, |d| d / step);
                    x.encode(cs, mask, Some(k), cap, enc, dec);
                }
            }
            (lo, hi)
        }
    }
}

/// Clamps `v` to `[-cap, cap]` (a no-op for well-formed blocks, except
/// where a ZeroPointScale grid point lies past the source type's largest
/// value).
#[inline(always)]
pub(super) fn clamp_abs<C: QFloat>(v: C, cap: C) -> C {
    let v = if v < -cap { -cap } else { v };
    if v > cap {
        cap
    } else {
        v
    }
}

/// Decoded value of code `u` (MinMax; `step = minmax_step(lo, hi, qmax)`,
/// `half = qmax / 2`).
#[inline(always)]
pub(super) fn decode_minmax_one<C: QFloat>(
    u: i32,
    lo: C,
    hi: C,
    step: C,
    qmax_i: i32,
    half: i32,
    cap: C,
) -> C {
    let hi_side = u > half;
    let base = if hi_side { hi } else { lo };
    let k = if hi_side { u - qmax_i } else { u };
    let v = base + C::from_i32(k) * step;
    // k == 0 returns the endpoint itself (keeps -0.0 and exactness).
    clamp_abs(if k == 0 { base } else { v }, cap)
}

/// Decoded value of code `u` (ZeroPointScale).
#[inline(always)]
pub(super) fn decode_zps_one<C: QFloat>(u: i32, scale: C, zp: C, cap: C) -> C {
    clamp_abs((C::from_i32(u) - zp) * scale, cap)
}

/// Decodes one block's codes into `ys` given its metadata; results are
/// clamped to `[-cap, cap]` (the source type's finite range).
#[inline(always)]
pub(super) fn decode_block<C: QFloat, Q: Code>(
    algo: QuantizationAlgorithm,
    m0: C,
    m1: C,
    cs: &[Q],
    ys: &mut [C],
    mask: u32,
    cap: C,
) {
    let qmax_i = Q::QMAX as i32;
    let m = cs.len().min(ys.len());
    let (cs, ys) = (&cs[..m], &mut ys[..m]);
    if !(m0.is_finite() && m1.is_finite()) {
        // Non-finite block (or corrupt metadata): canonical NaN everywhere.
        // Computing with NaN/inf metadata would let the hardware pick NaN
        // bits, which differ between architectures.
        for y in ys.iter_mut() {
            *y = C::NAN;
        }
        return;
    }
    let dec = Decoder::new::<Q>(algo, m0, m1);
    // SAFETY: `ys` is valid for `cs.len()` writes; no accumulator is read.
    let k = unsafe { simd_decode_prefix(&dec, cap, mask, cs, std::ptr::null(), ys.as_mut_ptr()) };
    let (cs, ys) = (&cs[k..], &mut ys[k..]);
    match dec {
        Decoder::Zps { scale, zp } => {
            for (&c, y) in cs.iter().zip(ys.iter_mut()) {
                *y = decode_zps_one((c.to_u32() ^ mask) as i32, scale, zp, cap);
            }
        }
        Decoder::MinMax { lo, hi, step } => {
            let half = (Q::QMAX / 2) as i32;
            for (&c, y) in cs.iter().zip(ys.iter_mut()) {
                let u = (c.to_u32() ^ mask) as i32;
                *y = decode_minmax_one(u, lo, hi, step, qmax_i, half, cap);
            }
        }
    }
}

/// A block's decoder: the metadata, and the MinMax step derived from it.
#[derive(Clone, Copy)]
pub(super) enum Decoder<C> {
    MinMax { lo: C, hi: C, step: C },
    Zps { scale: C, zp: C },
}

impl<C: QFloat> Decoder<C> {
    /// The decoder of a block with finite metadata `(m0, m1)`.
    #[inline(always)]
    pub(super) fn new<Q: Code>(algo: QuantizationAlgorithm, m0: C, m1: C) -> Self {
        match algo {
            QuantizationAlgorithm::ZeroPointScale => Decoder::Zps { scale: m0, zp: m1 },
            _ => Decoder::MinMax {
                lo: m0,
                hi: m1,
                step: minmax_step(m0, m1, C::from_i32(Q::QMAX as i32)),
            },
        }
    }
}
