//! The AVX2 kernel for `f32` blocks with 8-bit codes: encodes (and, for
//! `quantize_adopt`, decodes in place) 32 elements per step and decodes 8
//! per step, bit for bit what the portable kernels of [`super::scalar`]
//! compute. Only reached through [`super::simd`], after the CPU check.
//!
//! Imports nothing of `quant` but the `QFloat` constants of
//! [`super::element`]; works on raw `f32`/`u8` pointers and slices.

use std::arch::x86_64::*;

/// A block's encoder or decoder in `f32` (see [`super::simd::Kern`],
/// [`super::scalar::Decoder`]): MinMax uses `a = lo`, `b = hi`, `d = step`;
/// ZeroPointScale `a = b = zp`, `d = scale`; `f` and `div` describe the
/// encoder's scaling (the decoder ignores them). The `Option`s are all
/// `Some` for an `f32` block.
pub(super) struct Op {
    pub minmax: bool,
    pub div: bool,
    pub a: Option<f32>,
    pub b: Option<f32>,
    pub f: Option<f32>,
    pub d: Option<f32>,
    pub cap: Option<f32>,
    pub mask: u8,
}

/// See [`super::simd::simd_prefix`]; returns how many elements were done.
///
/// # Safety
///
/// The CPU supports AVX2; `xs` is valid for `cs.len()` reads, `ys` is
/// null or valid for `cs.len()` writes (it may equal `xs`).
#[target_feature(enable = "avx2")]
pub(super) unsafe fn encode(op: &Op, xs: *const f32, ys: *mut f32, cs: &mut [u8]) -> usize {
    let Some(p) = params(op) else {
        return 0;
    };
    let adopt = !ys.is_null();
    // SAFETY (all arms): forwarded from this function's contract.
    unsafe {
        match (op.minmax, op.div, adopt) {
            (true, false, false) => run::<true, false, false>(&p, xs, ys, cs),
            (true, false, true) => run::<true, false, true>(&p, xs, ys, cs),
            (true, true, false) => run::<true, true, false>(&p, xs, ys, cs),
            (true, true, true) => run::<true, true, true>(&p, xs, ys, cs),
            (false, false, false) => run::<false, false, false>(&p, xs, ys, cs),
            (false, false, true) => run::<false, false, true>(&p, xs, ys, cs),
            (false, true, false) => run::<false, true, false>(&p, xs, ys, cs),
            (false, true, true) => run::<false, true, true>(&p, xs, ys, cs),
        }
    }
}

/// See [`super::simd::simd_decode_prefix`]; returns how many elements were done.
///
/// # Safety
///
/// The CPU supports AVX2; `ys` is valid for `cs.len()` writes and `acc`
/// null or valid for `cs.len()` reads (it may equal `ys`). `op.f` and
/// `op.div` are not used (decoding needs `d` only).
#[target_feature(enable = "avx2")]
pub(super) unsafe fn decode(op: &Op, cs: &[u8], acc: *const f32, ys: *mut f32) -> usize {
    let Some(p) = params(op) else {
        return 0;
    };
    // SAFETY (all arms): forwarded from this function's contract.
    unsafe {
        match (op.minmax, !acc.is_null()) {
            (true, false) => run_decode::<true, false>(&p, cs, acc, ys),
            (true, true) => run_decode::<true, true>(&p, cs, acc, ys),
            (false, false) => run_decode::<false, false>(&p, cs, acc, ys),
            (false, true) => run_decode::<false, true>(&p, cs, acc, ys),
        }
    }
}

/// The decoder, 8 elements at a time; returns how many were done.
///
/// # Safety
///
/// As [`decode`].
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn run_decode<const MM: bool, const ADD: bool>(
    p: &Params,
    cs: &[u8],
    acc: *const f32,
    ys: *mut f32,
) -> usize {
    let mut i = 0;
    while i + 8 <= cs.len() {
        // SAFETY: `i + 8 <= cs.len()`: 8 readable bytes (no alignment needed).
        let c = unsafe { _mm_loadl_epi64(cs.as_ptr().add(i).cast::<__m128i>()) };
        let u = _mm256_xor_si256(_mm256_cvtepu8_epi32(c), p.mask32);
        let mut y = decode8::<MM>(p, u);
        if ADD {
            // SAFETY: `acc` is valid for `cs.len()` reads; `loadu` needs no alignment.
            let a = unsafe { _mm256_loadu_ps(acc.add(i)) };
            // `a + decoded`, the operand order of the `Sum` kernels.
            y = _mm256_add_ps(a, y);
        }
        // SAFETY: `ys` is valid for `cs.len()` writes; `storeu` needs no alignment.
        unsafe { _mm256_storeu_ps(ys.add(i), y) };
        i += 8;
    }
    i
}

/// Broadcast operands (see [`Op`]).
struct Params {
    a: __m256,
    b: __m256,
    f: __m256,
    d: __m256,
    cap: __m256,
    neg_cap: __m256,
    /// The code mask in each byte (encoder) and in each 32-bit lane (decoder).
    mask: __m256i,
    mask32: __m256i,
}

/// The operands of `op`, broadcast; `None` unless all are present.
#[inline]
#[target_feature(enable = "avx2")]
fn params(op: &Op) -> Option<Params> {
    Some(Params {
        a: _mm256_set1_ps(op.a?),
        b: _mm256_set1_ps(op.b?),
        f: _mm256_set1_ps(op.f?),
        d: _mm256_set1_ps(op.d?),
        cap: _mm256_set1_ps(op.cap?),
        neg_cap: _mm256_set1_ps(-op.cap?),
        mask: _mm256_set1_epi8(op.mask as i8),
        mask32: _mm256_set1_epi32(i32::from(op.mask)),
    })
}

/// `x * f` or `x / f`.
#[inline]
#[target_feature(enable = "avx2")]
fn scale<const DIV: bool>(x: __m256, f: __m256) -> __m256 {
    if DIV {
        _mm256_div_ps(x, f)
    } else {
        _mm256_mul_ps(x, f)
    }
}

/// Codes (`0..=255`, as `i32`, before the mask) of 8 values: the
/// operations of `minmax_code` / the ZeroPointScale closure and
/// `clamp_round`, in the same order. `max_ps(t, 0)` is `t > 0 ? t : 0`
/// and `min_ps(t, qmax)` is `t < qmax ? t : qmax`, as in `clamp_round`.
#[inline]
#[target_feature(enable = "avx2")]
fn codes8<const MM: bool, const DIV: bool>(p: &Params, x: __m256) -> __m256i {
    let qmax = _mm256_set1_ps(255.0);
    let t = if MM {
        let dl = _mm256_sub_ps(x, p.a);
        let dh = _mm256_sub_ps(p.b, x);
        let lo_side = _mm256_cmp_ps::<_CMP_LE_OQ>(dl, dh);
        let tl = scale::<DIV>(dl, p.f);
        let th = _mm256_sub_ps(qmax, scale::<DIV>(dh, p.f));
        _mm256_blendv_ps(th, tl, lo_side)
    } else {
        _mm256_add_ps(scale::<DIV>(x, p.f), p.a)
    };
    let t = _mm256_max_ps(t, _mm256_setzero_ps());
    let t = _mm256_min_ps(t, qmax);
    let r = _mm256_add_ps(t, _mm256_set1_ps(<f32 as super::element::QFloat>::MAGIC));
    _mm256_and_si256(_mm256_castps_si256(r), _mm256_set1_epi32(0xffff))
}

/// Decoded values of 8 codes `u` (before the mask): `decode_minmax_one`
/// / `decode_zps_one` and `clamp_abs`, in the same order.
/// `max_ps(-cap, v)` is `v < -cap ? -cap : v` and `min_ps(cap, v)` is
/// `v > cap ? cap : v`, as in `clamp_abs`.
///
/// MinMax computes `base + kf * step` with `kf = -(float(-k))`: the
/// same value as `float(k)` except that `k == 0` gives `-0.0`, so the
/// product is `-0.0` (`step > 0` is finite here) and `base + -0.0` is
/// `base` exactly, even for `base == -0.0`: the scalar code's
/// `if k == 0 { base }` without a second blend.
#[inline]
#[target_feature(enable = "avx2")]
fn decode8<const MM: bool>(p: &Params, u: __m256i) -> __m256 {
    let v = if MM {
        let hi_side = _mm256_cmpgt_epi32(u, _mm256_set1_epi32(127));
        let base = _mm256_blendv_ps(p.a, p.b, _mm256_castsi256_ps(hi_side));
        // -k: qmax - u on the hi side, -u on the lo side.
        let neg_k = _mm256_sub_epi32(_mm256_and_si256(hi_side, _mm256_set1_epi32(255)), u);
        let kf = _mm256_xor_ps(_mm256_cvtepi32_ps(neg_k), _mm256_set1_ps(-0.0));
        _mm256_add_ps(base, _mm256_mul_ps(kf, p.d))
    } else {
        _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(u), p.a), p.d)
    };
    _mm256_min_ps(p.cap, _mm256_max_ps(p.neg_cap, v))
}

/// The kernel, 32 elements at a time; returns how many were done.
///
/// # Safety
///
/// As [`encode`].
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn run<const MM: bool, const DIV: bool, const ADOPT: bool>(
    p: &Params,
    xs: *const f32,
    ys: *mut f32,
    cs: &mut [u8],
) -> usize {
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut i = 0;
    for out in cs.chunks_exact_mut(32) {
        let mut u = [_mm256_setzero_si256(); 4];
        for (j, u) in u.iter_mut().enumerate() {
            // SAFETY: `i + 32 <= cs.len()`, and `xs` is valid for
            // `cs.len()` reads (`loadu` needs no alignment).
            let x = unsafe { _mm256_loadu_ps(xs.add(i + 8 * j)) };
            *u = codes8::<MM, DIV>(p, x);
            if ADOPT {
                let y = decode8::<MM>(p, *u);
                // SAFETY: `ys` is valid for `cs.len()` writes; this
                // element was read just above and is not read again.
                unsafe { _mm256_storeu_ps(ys.add(i + 8 * j), y) };
            }
        }
        // Codes fit in 0..=255: the saturating packs are exact. Per
        // 128-bit lane they interleave the four vectors in groups of
        // four; `order` puts the groups back in element order.
        let ab = _mm256_packs_epi32(u[0], u[1]);
        let cd = _mm256_packs_epi32(u[2], u[3]);
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
        let bytes = _mm256_xor_si256(bytes, p.mask);
        // SAFETY: `out` is 32 writable bytes (`storeu` needs no alignment).
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast::<__m256i>(), bytes) };
        i += 32;
    }
    i
}
