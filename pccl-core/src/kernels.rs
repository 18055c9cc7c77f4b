//! Element-wise reduce kernels over raw byte buffers.
//!
//! This module holds the arithmetic of the all-reduce data path:
//! [`reduce_into`] (`dst[i] = op(dst[i], src[i])`), its three-operand form
//! [`reduce_from`] (`dst[i] = op(a[i], b[i])`) and [`finalize_avg`]
//! (`dst[i] /= world`), for every [`DataType`] and [`ReduceOp`], plus the
//! bit-exact `f16`/`bf16` <-> `f32` conversions the quantizer shares.
//!
//! # Semantics
//!
//! * Buffers are raw bytes in the host's native byte order; element `i`
//!   occupies bytes `i*size..(i+1)*size`. Slices need not be aligned for the
//!   element type: aligned slices are reinterpreted in place (zero-copy fast
//!   path), unaligned ones are bounced through small aligned stack buffers.
//! * `Avg` accumulates exactly like `Sum`; the division happens once, at the
//!   segment owner, in [`finalize_avg`].
//! * Integers: `Sum`/`Avg` use wrapping addition, `Prod` wrapping
//!   multiplication (two's complement, like C's unsigned arithmetic).
//!   [`finalize_avg`] truncates toward zero.
//! * `f32`/`f64`: plain IEEE-754 operations (no FMA contraction, no
//!   reassociation), so every machine computes the same bits for non-NaN
//!   results. Which NaN *payload* `Sum`/`Prod` yield when an operand is NaN is
//!   left to the hardware; the result is always a NaN.
//! * `f16`/`bf16`: each operation is computed in `f32` and rounded back to
//!   nearest-even. Because `f32` carries at least `2p+2` bits of precision
//!   for both formats (`p` = 11 and 8), this equals the correctly rounded
//!   operation in the narrow format. The conversions are implemented here
//!   (branch-free software; x86 F16C instructions for `f16` when present,
//!   which give the same bits), so results, NaN payloads included, are
//!   identical on every machine. NaNs are quieted on conversion.
//! * `Max`/`Min` on floats follow IEEE-754-2019 `maximum`/`minimum`:
//!   - if either operand is NaN, the result is NaN (the `dst` operand's NaN if
//!     it is one, else the `src` operand's);
//!   - `Max(-0.0, +0.0) = +0.0` and `Min(-0.0, +0.0) = -0.0`, whatever the
//!     operand order.
//!
//! Length mismatches are caller bugs: they trip a `debug_assert!`, and in
//! release builds the kernels process the longest common prefix made of whole
//! elements, so they never panic.
//!
//! # Performance
//!
//! The inner loops are plain loops over typed slices with branch-free element
//! functions, which LLVM auto-vectorizes. Each kernel is compiled twice, for
//! the baseline target and with AVX2, and picked at run time
//! (`multiversion!`); both builds have the same IEEE semantics and produce
//! the same bits. `f16`/`bf16` kernels widen chunks into `f32` staging buffers,
//! combine, and round back; `f16` conversions use the F16C instructions when
//! the CPU has them (bit-identical to the software conversions here). See
//! `docs/quantization.md` for measured throughput.

use crate::types::{DataType, ReduceOp};
use bytemuck::Pod;

// ---------------------------------------------------------------------------
// f16 / bf16 <-> f32 conversions (bit-exact with the `half` crate's software
// conversions, NaN payloads included; branch-free so they vectorize)
// ---------------------------------------------------------------------------

/// Converts IEEE binary16 bits to `f32` (exact; NaNs are quieted, payload kept).
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    // Normal numbers: move exponent+mantissa into place and rebias (127 - 15).
    let normal = (em << 13) + ((127 - 15) << 23);
    // Inf/NaN: all exponent bits set; NaNs also get the quiet bit.
    let quiet = if em > 0x7c00 { 0x0040_0000 } else { 0 };
    let infnan = (em << 13) | 0x7f80_0000 | quiet;
    // Subnormals (and zero): em * 2^-24, exact in f32.
    let sub = ((em as i32) as f32 * (1.0 / 16_777_216.0)).to_bits();
    let bits = if em < 0x0400 {
        sub
    } else if em >= 0x7c00 {
        infnan
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

/// Converts `f32` to IEEE binary16 bits, rounding to nearest-even
/// (overflow gives ±inf; NaNs are quieted, top payload bits kept).
#[inline(always)]
pub fn f32_to_f16_bits(f: f32) -> u16 {
    let x = f.to_bits();
    let sign = (x >> 16) & 0x8000;
    let a = x & 0x7fff_ffff;
    let nan = 0x7e00 | ((a & 0x007f_ffff) >> 13);
    // |f| < 2^-14: result is subnormal (or zero). Adding 0.5 lines the f16
    // subnormal quantum (2^-24) up with the f32 ulp of 0.5, so the FPU does
    // the round-to-nearest-even; the low bits are then the f16 mantissa.
    let sub = (f32::from_bits(a) + 0.5)
        .to_bits()
        .wrapping_sub(0x3f00_0000);
    // Normal range: rebias and round to nearest-even on bit 13.
    let mant_odd = (a >> 13) & 1;
    let normal = a
        .wrapping_sub((127 - 15) << 23)
        .wrapping_add(0x0fff + mant_odd)
        >> 13;
    let r = if a > 0x7f80_0000 {
        nan
    } else if a >= 0x4780_0000 {
        0x7c00 // |f| >= 65536 (or inf): infinity
    } else if a < 0x3880_0000 {
        sub
    } else {
        normal
    };
    (r | sign) as u16
}

/// Converts bfloat16 bits to `f32` (exact; NaNs are quieted, payload kept).
#[inline(always)]
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    let x = (b as u32) << 16;
    let quiet = if (b & 0x7fff) > 0x7f80 {
        0x0040_0000
    } else {
        0
    };
    f32::from_bits(x | quiet)
}

/// Converts `f32` to bfloat16 bits, rounding to nearest-even
/// (overflow gives ±inf; NaNs are quieted, top payload bits kept).
#[inline(always)]
pub fn f32_to_bf16_bits(f: f32) -> u16 {
    let x = f.to_bits();
    let nan = (x >> 16) | 0x0040;
    let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
    let r = if (x & 0x7fff_ffff) > 0x7f80_0000 {
        nan
    } else {
        rounded
    };
    r as u16
}

// ---------------------------------------------------------------------------
// Element trait
// ---------------------------------------------------------------------------

/// One element type the kernels know how to combine. All methods must be
/// branch-free enough to vectorize and must be pure functions of their inputs.
pub(crate) trait Elem: Pod {
    fn add(a: Self, b: Self) -> Self;
    fn mul(a: Self, b: Self) -> Self;
    fn max(a: Self, b: Self) -> Self;
    fn min(a: Self, b: Self) -> Self;
    /// `a / world` (integers truncate; floats divide in their own precision).
    fn div_world(a: Self, world: u32) -> Self;
}

macro_rules! int_elem {
    ($($t:ty => $wide:ty),*) => {$(
        impl Elem for $t {
            #[inline(always)]
            fn add(a: Self, b: Self) -> Self { a.wrapping_add(b) }
            #[inline(always)]
            fn mul(a: Self, b: Self) -> Self { a.wrapping_mul(b) }
            #[inline(always)]
            fn max(a: Self, b: Self) -> Self { if a > b { a } else { b } }
            #[inline(always)]
            fn min(a: Self, b: Self) -> Self { if a < b { a } else { b } }
            #[inline(always)]
            fn div_world(a: Self, world: u32) -> Self {
                // `world` fits every wide type; the quotient's magnitude never
                // exceeds `a`'s, so narrowing back is lossless.
                ((a as $wide) / (world as $wide)) as $t
            }
        }
    )*};
}

int_elem!(u8 => u32, i8 => i64, u16 => u32, i16 => i64, u32 => u32, i32 => i64, u64 => u64, i64 => i64);

/// IEEE-754-2019 `maximum` for `f32`: NaN-propagating, `+0 > -0`.
#[inline(always)]
fn fmax32(a: f32, b: f32) -> f32 {
    // Equal values: AND of the bits clears the sign if either is +0.0
    // (and is the identity for equal non-zero values).
    let eq = f32::from_bits(a.to_bits() & b.to_bits());
    let r = if a > b {
        a
    } else if b > a {
        b
    } else {
        eq
    };
    // Unordered (a NaN is present): dst's NaN wins, else src's.
    if a.is_nan() {
        a
    } else if b.is_nan() {
        b
    } else {
        r
    }
}

/// IEEE-754-2019 `minimum` for `f32`: NaN-propagating, `-0 < +0`.
#[inline(always)]
fn fmin32(a: f32, b: f32) -> f32 {
    let eq = f32::from_bits(a.to_bits() | b.to_bits());
    let r = if a < b {
        a
    } else if b < a {
        b
    } else {
        eq
    };
    if a.is_nan() {
        a
    } else if b.is_nan() {
        b
    } else {
        r
    }
}

#[inline(always)]
fn fmax64(a: f64, b: f64) -> f64 {
    let eq = f64::from_bits(a.to_bits() & b.to_bits());
    let r = if a > b {
        a
    } else if b > a {
        b
    } else {
        eq
    };
    if a.is_nan() {
        a
    } else if b.is_nan() {
        b
    } else {
        r
    }
}

#[inline(always)]
fn fmin64(a: f64, b: f64) -> f64 {
    let eq = f64::from_bits(a.to_bits() | b.to_bits());
    let r = if a < b {
        a
    } else if b < a {
        b
    } else {
        eq
    };
    if a.is_nan() {
        a
    } else if b.is_nan() {
        b
    } else {
        r
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn add(a: Self, b: Self) -> Self {
        a + b
    }
    #[inline(always)]
    fn mul(a: Self, b: Self) -> Self {
        a * b
    }
    #[inline(always)]
    fn max(a: Self, b: Self) -> Self {
        fmax32(a, b)
    }
    #[inline(always)]
    fn min(a: Self, b: Self) -> Self {
        fmin32(a, b)
    }
    #[inline(always)]
    fn div_world(a: Self, world: u32) -> Self {
        a / world as f32
    }
}

impl Elem for f64 {
    #[inline(always)]
    fn add(a: Self, b: Self) -> Self {
        a + b
    }
    #[inline(always)]
    fn mul(a: Self, b: Self) -> Self {
        a * b
    }
    #[inline(always)]
    fn max(a: Self, b: Self) -> Self {
        fmax64(a, b)
    }
    #[inline(always)]
    fn min(a: Self, b: Self) -> Self {
        fmin64(a, b)
    }
    #[inline(always)]
    fn div_world(a: Self, world: u32) -> Self {
        a / world as f64
    }
}

// ---------------------------------------------------------------------------
// Run-time CPU dispatch
// ---------------------------------------------------------------------------

/// Whether the running CPU has AVX2 (std caches the answer).
#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the running CPU has the F16C half-precision conversions.
#[inline]
fn has_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name`, which runs `$portable` (an `#[inline(always)]` generic
/// function) compiled with AVX2 enabled when the CPU has it, and the
/// baseline build otherwise. Both builds have the same IEEE semantics (FMA
/// stays disabled and Rust never contracts or reassociates float
/// operations), so they produce identical bits; AVX2 only widens the vectors.
macro_rules! multiversion {
    ($vis:vis fn $name:ident<$($g:ident: $b:path),+>($($a:ident: $t:ty),* $(,)?) => $portable:ident) => {
        $vis fn $name<$($g: $b),+>($($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            if $crate::kernels::has_avx2() {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2<$($g: $b),+>($($a: $t),*) {
                    $portable::<$($g),+>($($a),*)
                }
                // SAFETY: the CPU supports AVX2 (checked just above); `avx2`
                // has no other precondition.
                unsafe { avx2::<$($g),+>($($a),*) };
                return;
            }
            $portable::<$($g),+>($($a),*)
        }
    };
}
pub(crate) use multiversion;

// ---------------------------------------------------------------------------
// Slice conversions for 16-bit floats
// ---------------------------------------------------------------------------

/// A 16-bit float format stored as `u16` bits, computed in `f32`.
pub(crate) trait HalfFmt {
    /// `dst[i] = to_f32(src[i])` over the common length.
    fn widen(src: &[u16], dst: &mut [f32]);
    /// `dst[i] = round_nearest_even(src[i])` over the common length.
    fn narrow(src: &[f32], dst: &mut [u16]);
}

pub(crate) struct F16Fmt;
pub(crate) struct Bf16Fmt;

impl HalfFmt for F16Fmt {
    #[inline(always)]
    fn widen(src: &[u16], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_f16c() {
            // SAFETY: the CPU supports AVX and F16C (checked just above).
            unsafe { f16c::widen(src, dst) };
            return;
        }
        for (d, &h) in dst.iter_mut().zip(src) {
            *d = f16_bits_to_f32(h);
        }
    }
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [u16]) {
        #[cfg(target_arch = "x86_64")]
        if has_f16c() {
            // SAFETY: the CPU supports AVX and F16C (checked just above).
            unsafe { f16c::narrow(src, dst) };
            return;
        }
        for (d, &f) in dst.iter_mut().zip(src) {
            *d = f32_to_f16_bits(f);
        }
    }
}

impl HalfFmt for Bf16Fmt {
    #[inline(always)]
    fn widen(src: &[u16], dst: &mut [f32]) {
        for (d, &h) in dst.iter_mut().zip(src) {
            *d = bf16_bits_to_f32(h);
        }
    }
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [u16]) {
        for (d, &f) in dst.iter_mut().zip(src) {
            *d = f32_to_bf16_bits(f);
        }
    }
}

/// Hardware `f16` conversions (x86 F16C). IEEE conversions with
/// round-to-nearest-even, so they give exactly the bits of
/// [`f16_bits_to_f32`] / [`f32_to_f16_bits`] (NaNs included: quieted, top
/// payload bits kept); the tests check this exhaustively for `widen`.
#[cfg(target_arch = "x86_64")]
mod f16c {
    use super::{f16_bits_to_f32, f32_to_f16_bits};
    use std::arch::x86_64::{
        __m128i, __m256, _mm256_cvtph_ps, _mm256_cvtps_ph, _MM_FROUND_TO_NEAREST_INT,
    };

    /// # Safety
    /// The CPU must support AVX and F16C.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn widen(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let (src, dst) = (&src[..n], &mut dst[..n]);
        let mut s8 = src.chunks_exact(8);
        let mut d8 = dst.chunks_exact_mut(8);
        for (s, d) in (&mut s8).zip(&mut d8) {
            let h: __m128i = bytemuck::pod_read_unaligned(bytemuck::cast_slice::<u16, u8>(s));
            let f: __m256 = _mm256_cvtph_ps(h);
            d.copy_from_slice(bytemuck::cast_slice::<__m256, f32>(std::slice::from_ref(
                &f,
            )));
        }
        for (d, &h) in d8.into_remainder().iter_mut().zip(s8.remainder()) {
            *d = f16_bits_to_f32(h);
        }
    }

    /// # Safety
    /// The CPU must support AVX and F16C.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn narrow(src: &[f32], dst: &mut [u16]) {
        let n = src.len().min(dst.len());
        let (src, dst) = (&src[..n], &mut dst[..n]);
        let mut s8 = src.chunks_exact(8);
        let mut d8 = dst.chunks_exact_mut(8);
        for (s, d) in (&mut s8).zip(&mut d8) {
            let f: __m256 = bytemuck::pod_read_unaligned(bytemuck::cast_slice::<f32, u8>(s));
            let h: __m128i = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(f);
            d.copy_from_slice(bytemuck::cast_slice::<__m128i, u16>(std::slice::from_ref(
                &h,
            )));
        }
        for (d, &f) in d8.into_remainder().iter_mut().zip(s8.remainder()) {
            *d = f32_to_f16_bits(f);
        }
    }
}

// ---------------------------------------------------------------------------
// Slice drivers
// ---------------------------------------------------------------------------

/// Bytes per aligned bounce buffer used for unaligned slices.
const BOUNCE_BYTES: usize = 4096;

/// Elements per `f32` staging buffer of the 16-bit float kernels.
const HALF_CHUNK: usize = 256;

/// `d[i] = f(d[i], s[i])` over typed slices: the loop LLVM vectorizes.
#[inline(always)]
fn zip_apply<T: Copy>(d: &mut [T], s: &[T], f: impl Fn(T, T) -> T) {
    for (a, &b) in d.iter_mut().zip(s) {
        *a = f(*a, b);
    }
}

/// `d[i] = f(d[i], s[i])` for 16-bit floats: widen both operands into `f32`
/// staging buffers, combine, round back. Three simple loops vectorize better
/// than one fused loop, and the conversions can use F16C.
#[inline(always)]
fn half_zip_apply<H: HalfFmt>(d: &mut [u16], s: &[u16], f: impl Fn(f32, f32) -> f32) {
    let mut a = [0f32; HALF_CHUNK];
    let mut b = [0f32; HALF_CHUNK];
    for (dc, sc) in d.chunks_mut(HALF_CHUNK).zip(s.chunks(HALF_CHUNK)) {
        let n = dc.len().min(sc.len());
        let (a, b) = (&mut a[..n], &mut b[..n]);
        H::widen(dc, a);
        H::widen(sc, b);
        zip_apply(a, b, &f);
        H::narrow(a, dc);
    }
}

#[inline(always)]
fn half_map<H: HalfFmt>(d: &mut [u16], f: impl Fn(f32) -> f32) {
    let mut a = [0f32; HALF_CHUNK];
    for dc in d.chunks_mut(HALF_CHUNK) {
        let a = &mut a[..dc.len()];
        H::widen(dc, a);
        for x in a.iter_mut() {
            *x = f(*x);
        }
        H::narrow(a, dc);
    }
}

/// Runs `kernel` over two byte slices of equal length (a multiple of
/// `size_of::<T>()`) viewed as `[T]`: in place when both are aligned,
/// through aligned stack copies otherwise.
#[inline(always)]
fn binary_bytes<T: Pod>(dst: &mut [u8], src: &[u8], kernel: impl Fn(&mut [T], &[T])) {
    if let (Ok(d), Ok(s)) = (
        bytemuck::try_cast_slice_mut::<u8, T>(dst),
        bytemuck::try_cast_slice::<u8, T>(src),
    ) {
        kernel(d, s);
        return;
    }
    // Unaligned: bounce through u64-aligned stack buffers (every element
    // type has alignment <= 8, and BOUNCE_BYTES is a multiple of every size).
    let mut dbuf = [0u64; BOUNCE_BYTES / 8];
    let mut sbuf = [0u64; BOUNCE_BYTES / 8];
    for (dc, sc) in dst.chunks_mut(BOUNCE_BYTES).zip(src.chunks(BOUNCE_BYTES)) {
        let len = dc.len();
        let db = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut dbuf)[..len];
        let sb = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut sbuf)[..len];
        db.copy_from_slice(dc);
        sb.copy_from_slice(sc);
        // Whole elements (checked by the caller) in 8-aligned buffers: these
        // casts cannot fail.
        kernel(
            bytemuck::cast_slice_mut::<u8, T>(db),
            bytemuck::cast_slice::<u8, T>(sb),
        );
        dc.copy_from_slice(db);
    }
}

/// Runs `kernel` in place over one byte slice viewed as `[T]` (in place when
/// aligned, through an aligned stack copy otherwise).
#[inline(always)]
fn unary_bytes<T: Pod>(dst: &mut [u8], kernel: impl Fn(&mut [T])) {
    if let Ok(d) = bytemuck::try_cast_slice_mut::<u8, T>(dst) {
        kernel(d);
        return;
    }
    let mut dbuf = [0u64; BOUNCE_BYTES / 8];
    for dc in dst.chunks_mut(BOUNCE_BYTES) {
        let len = dc.len();
        let db = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut dbuf)[..len];
        db.copy_from_slice(dc);
        kernel(bytemuck::cast_slice_mut::<u8, T>(db));
        dc.copy_from_slice(db);
    }
}

#[inline(always)]
fn reduce_typed_portable<T: Elem>(op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => {
            binary_bytes::<T>(dst, src, |d, s| zip_apply(d, s, T::add))
        }
        ReduceOp::Prod => binary_bytes::<T>(dst, src, |d, s| zip_apply(d, s, T::mul)),
        ReduceOp::Max => binary_bytes::<T>(dst, src, |d, s| zip_apply(d, s, T::max)),
        ReduceOp::Min => binary_bytes::<T>(dst, src, |d, s| zip_apply(d, s, T::min)),
    }
}

#[inline(always)]
fn reduce_half_portable<H: HalfFmt>(op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => {
            binary_bytes::<u16>(dst, src, |d, s| half_zip_apply::<H>(d, s, |a, b| a + b))
        }
        ReduceOp::Prod => {
            binary_bytes::<u16>(dst, src, |d, s| half_zip_apply::<H>(d, s, |a, b| a * b))
        }
        ReduceOp::Max => binary_bytes::<u16>(dst, src, |d, s| half_zip_apply::<H>(d, s, fmax32)),
        ReduceOp::Min => binary_bytes::<u16>(dst, src, |d, s| half_zip_apply::<H>(d, s, fmin32)),
    }
}

#[inline(always)]
fn avg_typed_portable<T: Elem>(dst: &mut [u8], world: u32) {
    unary_bytes::<T>(dst, |d| {
        for a in d.iter_mut() {
            *a = T::div_world(*a, world);
        }
    });
}

#[inline(always)]
fn avg_half_portable<H: HalfFmt>(dst: &mut [u8], world: u32) {
    // `world as f32` is exact up to 2^24 peers.
    let w = world as f32;
    unary_bytes::<u16>(dst, |d| half_map::<H>(d, |x| x / w));
}

/// `d[i] = f(a[i], b[i])` over typed slices.
#[inline(always)]
fn zip3_apply<T: Copy>(d: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T) {
    for ((x, &p), &q) in d.iter_mut().zip(a).zip(b) {
        *x = f(p, q);
    }
}

/// `d[i] = f(a[i], b[i])` for 16-bit floats, through `f32` staging buffers.
#[inline(always)]
fn half_zip3_apply<H: HalfFmt>(d: &mut [u16], a: &[u16], b: &[u16], f: impl Fn(f32, f32) -> f32) {
    let mut x = [0f32; HALF_CHUNK];
    let mut y = [0f32; HALF_CHUNK];
    for ((dc, ac), bc) in d
        .chunks_mut(HALF_CHUNK)
        .zip(a.chunks(HALF_CHUNK))
        .zip(b.chunks(HALF_CHUNK))
    {
        let n = dc.len().min(ac.len()).min(bc.len());
        let (x, y) = (&mut x[..n], &mut y[..n]);
        H::widen(ac, x);
        H::widen(bc, y);
        zip_apply(x, y, &f);
        H::narrow(x, dc);
    }
}

/// Runs `kernel` over three equally long byte slices viewed as `[T]` if all
/// are aligned for `T`; returns false (doing nothing) otherwise.
#[inline(always)]
fn ternary_aligned<T: Pod>(
    dst: &mut [u8],
    a: &[u8],
    b: &[u8],
    kernel: impl Fn(&mut [T], &[T], &[T]),
) -> bool {
    match (
        bytemuck::try_cast_slice_mut::<u8, T>(dst),
        bytemuck::try_cast_slice::<u8, T>(a),
        bytemuck::try_cast_slice::<u8, T>(b),
    ) {
        (Ok(d), Ok(a), Ok(b)) => {
            kernel(d, a, b);
            true
        }
        _ => false,
    }
}

#[inline(always)]
fn reduce3_typed_portable<T: Elem>(
    op: ReduceOp,
    dst: &mut [u8],
    a: &[u8],
    b: &[u8],
    done: &mut bool,
) {
    *done = match op {
        ReduceOp::Sum | ReduceOp::Avg => {
            ternary_aligned::<T>(dst, a, b, |d, a, b| zip3_apply(d, a, b, T::add))
        }
        ReduceOp::Prod => ternary_aligned::<T>(dst, a, b, |d, a, b| zip3_apply(d, a, b, T::mul)),
        ReduceOp::Max => ternary_aligned::<T>(dst, a, b, |d, a, b| zip3_apply(d, a, b, T::max)),
        ReduceOp::Min => ternary_aligned::<T>(dst, a, b, |d, a, b| zip3_apply(d, a, b, T::min)),
    };
}

#[inline(always)]
fn reduce3_half_portable<H: HalfFmt>(
    op: ReduceOp,
    dst: &mut [u8],
    a: &[u8],
    b: &[u8],
    done: &mut bool,
) {
    let k = |d: &mut [u16], a: &[u16], b: &[u16]| match op {
        ReduceOp::Sum | ReduceOp::Avg => half_zip3_apply::<H>(d, a, b, |x, y| x + y),
        ReduceOp::Prod => half_zip3_apply::<H>(d, a, b, |x, y| x * y),
        ReduceOp::Max => half_zip3_apply::<H>(d, a, b, fmax32),
        ReduceOp::Min => half_zip3_apply::<H>(d, a, b, fmin32),
    };
    *done = ternary_aligned::<u16>(dst, a, b, k);
}

multiversion!(fn reduce3_typed<T: Elem>(op: ReduceOp, dst: &mut [u8], a: &[u8], b: &[u8], done: &mut bool) => reduce3_typed_portable);
multiversion!(fn reduce3_half<H: HalfFmt>(op: ReduceOp, dst: &mut [u8], a: &[u8], b: &[u8], done: &mut bool) => reduce3_half_portable);

multiversion!(fn reduce_typed<T: Elem>(op: ReduceOp, dst: &mut [u8], src: &[u8]) => reduce_typed_portable);
multiversion!(fn reduce_half<H: HalfFmt>(op: ReduceOp, dst: &mut [u8], src: &[u8]) => reduce_half_portable);
multiversion!(fn avg_typed<T: Elem>(dst: &mut [u8], world: u32) => avg_typed_portable);
multiversion!(fn avg_half<H: HalfFmt>(dst: &mut [u8], world: u32) => avg_half_portable);

/// `dst[i] = op(dst[i], src[i])` for every element.
///
/// `dst.len()` must equal `src.len()` and be a multiple of `dtype.size()`;
/// otherwise a `debug_assert!` fires, and release builds process only the
/// common prefix of whole elements. Slices may be unaligned. `Avg`
/// accumulates like `Sum` (see [`finalize_avg`]). Semantics per type are in
/// the module documentation.
pub fn reduce_into(dtype: DataType, op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    debug_assert_eq!(dst.len(), src.len(), "reduce_into: length mismatch");
    debug_assert_eq!(
        dst.len() % dtype.size(),
        0,
        "reduce_into: length is not a whole number of elements"
    );
    let n = dst.len().min(src.len());
    let n = n - n % dtype.size();
    let (dst, src) = (&mut dst[..n], &src[..n]);
    match dtype {
        DataType::U8 => reduce_typed::<u8>(op, dst, src),
        DataType::I8 => reduce_typed::<i8>(op, dst, src),
        DataType::U16 => reduce_typed::<u16>(op, dst, src),
        DataType::I16 => reduce_typed::<i16>(op, dst, src),
        DataType::U32 => reduce_typed::<u32>(op, dst, src),
        DataType::I32 => reduce_typed::<i32>(op, dst, src),
        DataType::U64 => reduce_typed::<u64>(op, dst, src),
        DataType::I64 => reduce_typed::<i64>(op, dst, src),
        DataType::F16 => reduce_half::<F16Fmt>(op, dst, src),
        DataType::BF16 => reduce_half::<Bf16Fmt>(op, dst, src),
        DataType::F32 => reduce_typed::<f32>(op, dst, src),
        DataType::F64 => reduce_typed::<f64>(op, dst, src),
    }
}

/// Bytes per block of [`reduce_from`]'s unaligned path: the copy of `a`
/// into `dst` stays in the L1/L2 cache until the reduction reads it back.
const FROM_BLOCK_BYTES: usize = 32 << 10;

/// `dst[i] = op(a[i], b[i])` for every element: the three-operand form of
/// [`reduce_into`], with the same semantics (`a` is the `dst` operand).
///
/// Aligned slices take one fused pass; unaligned ones go block by block
/// (copy a block of `a`, then reduce `b` into it while it is in cache).
/// All three slices must have the same length (a whole number of elements);
/// otherwise a `debug_assert!` fires and release builds process the common
/// prefix. `dst` must not overlap `a` or `b` (the borrow rules guarantee it).
pub fn reduce_from(dtype: DataType, op: ReduceOp, dst: &mut [u8], a: &[u8], b: &[u8]) {
    debug_assert!(
        dst.len() == a.len() && a.len() == b.len(),
        "reduce_from: length mismatch"
    );
    let n = dst.len().min(a.len()).min(b.len());
    let n = n - n % dtype.size();
    let (dst, a, b) = (&mut dst[..n], &a[..n], &b[..n]);
    // Aligned slices (the usual case): one fused pass.
    let mut done = false;
    match dtype {
        DataType::U8 => reduce3_typed::<u8>(op, dst, a, b, &mut done),
        DataType::I8 => reduce3_typed::<i8>(op, dst, a, b, &mut done),
        DataType::U16 => reduce3_typed::<u16>(op, dst, a, b, &mut done),
        DataType::I16 => reduce3_typed::<i16>(op, dst, a, b, &mut done),
        DataType::U32 => reduce3_typed::<u32>(op, dst, a, b, &mut done),
        DataType::I32 => reduce3_typed::<i32>(op, dst, a, b, &mut done),
        DataType::U64 => reduce3_typed::<u64>(op, dst, a, b, &mut done),
        DataType::I64 => reduce3_typed::<i64>(op, dst, a, b, &mut done),
        DataType::F16 => reduce3_half::<F16Fmt>(op, dst, a, b, &mut done),
        DataType::BF16 => reduce3_half::<Bf16Fmt>(op, dst, a, b, &mut done),
        DataType::F32 => reduce3_typed::<f32>(op, dst, a, b, &mut done),
        DataType::F64 => reduce3_typed::<f64>(op, dst, a, b, &mut done),
    }
    if done {
        return;
    }
    // Unaligned: copy a cache-sized block of `a`, then reduce `b` into it.
    // A multiple of every element size, so blocks hold whole elements.
    for ((d, a), b) in dst
        .chunks_mut(FROM_BLOCK_BYTES)
        .zip(a.chunks(FROM_BLOCK_BYTES))
        .zip(b.chunks(FROM_BLOCK_BYTES))
    {
        d.copy_from_slice(a);
        reduce_into(dtype, op, d, b);
    }
}

/// Final step of `Avg` at the segment owner: `dst[i] = dst[i] / world`.
///
/// Integers divide with truncation toward zero; `f32`/`f64` divide in their
/// own precision (a true division, not a multiplication by `1/world`);
/// `f16`/`bf16` divide in `f32` and round back to nearest-even. `world == 0`
/// is a caller bug (`debug_assert!`) and leaves `dst` untouched in release
/// builds; `world == 1` is a no-op. A trailing partial element is ignored.
pub fn finalize_avg(dtype: DataType, dst: &mut [u8], world: u32) {
    debug_assert!(world > 0, "finalize_avg: world must be positive");
    debug_assert_eq!(
        dst.len() % dtype.size(),
        0,
        "finalize_avg: length is not a whole number of elements"
    );
    if world <= 1 {
        return;
    }
    let n = dst.len() - dst.len() % dtype.size();
    let dst = &mut dst[..n];
    match dtype {
        DataType::U8 => avg_typed::<u8>(dst, world),
        DataType::I8 => avg_typed::<i8>(dst, world),
        DataType::U16 => avg_typed::<u16>(dst, world),
        DataType::I16 => avg_typed::<i16>(dst, world),
        DataType::U32 => avg_typed::<u32>(dst, world),
        DataType::I32 => avg_typed::<i32>(dst, world),
        DataType::U64 => avg_typed::<u64>(dst, world),
        DataType::I64 => avg_typed::<i64>(dst, world),
        DataType::F16 => avg_half::<F16Fmt>(dst, world),
        DataType::BF16 => avg_half::<Bf16Fmt>(dst, world),
        DataType::F32 => avg_typed::<f32>(dst, world),
        DataType::F64 => avg_typed::<f64>(dst, world),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use half::{bf16, f16};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn reduce_from_equals_copy_then_reduce_into() {
        let mut rng = StdRng::seed_from_u64(7);
        for dtype in DataType::ALL {
            for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Max, ReduceOp::Min] {
                // Spans several blocks and ends in a partial one; offset by one
                // byte so the unaligned path runs too.
                for (elems, skew) in [(0usize, 0usize), (1, 0), (70_001, 0), (70_001, 1)] {
                    let len = elems * dtype.size();
                    let a: Vec<u8> = (0..len + skew).map(|_| rng.gen()).collect();
                    let b: Vec<u8> = (0..len + skew).map(|_| rng.gen()).collect();
                    let (a, b) = (&a[skew..], &b[skew..]);
                    let mut want = a.to_vec();
                    reduce_into(dtype, op, &mut want, b);
                    let mut got = vec![0u8; len + skew];
                    reduce_from(dtype, op, &mut got[skew..], a, b);
                    // Which NaN payload a float Sum/Prod yields is up to the
                    // hardware (and operand order); any NaN matches any NaN.
                    let same = got[skew..]
                        .chunks(dtype.size())
                        .zip(want.chunks(dtype.size()))
                        .all(|(g, w)| g == w || (is_nan_bytes(dtype, g) && is_nan_bytes(dtype, w)));
                    assert!(same, "{dtype:?} {op:?} {elems} {skew}");
                }
            }
        }
    }

    // ---- conversions -----------------------------------------------------

    fn same_f32(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits()
    }

    #[test]
    fn f16_widen_matches_half_exhaustively() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let mut wide = vec![0f32; all.len()];
        F16Fmt::widen(&all, &mut wide);
        for (&h, &w) in all.iter().zip(&wide) {
            let expect = f16::from_bits(h).to_f32();
            assert!(same_f32(f16_bits_to_f32(h), expect), "scalar {h:#06x}");
            assert!(same_f32(w, expect), "slice {h:#06x}");
        }
    }

    #[test]
    fn bf16_widen_matches_half_exhaustively() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let mut wide = vec![0f32; all.len()];
        Bf16Fmt::widen(&all, &mut wide);
        for (&h, &w) in all.iter().zip(&wide) {
            let expect = bf16::from_bits(h).to_f32();
            assert!(same_f32(bf16_bits_to_f32(h), expect), "scalar {h:#06x}");
            assert!(same_f32(w, expect), "slice {h:#06x}");
        }
    }

    /// f32 inputs that probe every rounding boundary of the 16-bit formats:
    /// each 16-bit value widened, the midpoints to its neighbours, one f32 ulp
    /// either side, plus random bit patterns.
    fn narrowing_probes(widen: fn(u16) -> f32) -> Vec<f32> {
        let mut v = Vec::new();
        for h in 0..=u16::MAX {
            let x = widen(h);
            let b = x.to_bits();
            for d in [0u32, 1, 2] {
                v.push(f32::from_bits(b.wrapping_add(d)));
                v.push(f32::from_bits(b.wrapping_sub(d)));
            }
            let next = widen(h.wrapping_add(1));
            if x.is_finite() && next.is_finite() {
                let mid = ((x as f64 + next as f64) / 2.0) as f32;
                for d in [0u32, 1] {
                    v.push(f32::from_bits(mid.to_bits().wrapping_add(d)));
                    v.push(f32::from_bits(mid.to_bits().wrapping_sub(d)));
                }
            }
        }
        let mut rng = StdRng::seed_from_u64(7);
        v.extend((0..200_000).map(|_| f32::from_bits(rng.gen())));
        v.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            65504.0,
            65519.99,
            65520.0,
            1e-8,
            f32::from_bits(0x7f80_0001), // signalling NaN
            f32::from_bits(0xffc0_1234),
        ]);
        v
    }

    #[test]
    fn f16_narrow_matches_half() {
        let probes = narrowing_probes(f16_bits_to_f32);
        let mut slice_out = vec![0u16; probes.len()];
        F16Fmt::narrow(&probes, &mut slice_out);
        for (&x, &s) in probes.iter().zip(&slice_out) {
            let expect = f16::from_f32(x).to_bits();
            assert_eq!(f32_to_f16_bits(x), expect, "scalar {:#010x}", x.to_bits());
            assert_eq!(s, expect, "slice {:#010x}", x.to_bits());
        }
    }

    #[test]
    fn bf16_narrow_matches_half() {
        let probes = narrowing_probes(bf16_bits_to_f32);
        let mut slice_out = vec![0u16; probes.len()];
        Bf16Fmt::narrow(&probes, &mut slice_out);
        for (&x, &s) in probes.iter().zip(&slice_out) {
            let expect = bf16::from_f32(x).to_bits();
            assert_eq!(f32_to_bf16_bits(x), expect, "scalar {:#010x}", x.to_bits());
            assert_eq!(s, expect, "slice {:#010x}", x.to_bits());
        }
    }

    /// Every f32 bit pattern: software and slice (F16C) paths agree with
    /// `half`. About a minute in release: `cargo test --release -- --ignored`.
    #[test]
    #[ignore]
    fn narrowing_exhaustive() {
        let mut buf = vec![0f32; 1 << 16];
        let mut out16 = vec![0u16; 1 << 16];
        let mut outb = vec![0u16; 1 << 16];
        for hi in 0..=u16::MAX as u32 {
            for (i, x) in buf.iter_mut().enumerate() {
                *x = f32::from_bits((hi << 16) | i as u32);
            }
            F16Fmt::narrow(&buf, &mut out16);
            Bf16Fmt::narrow(&buf, &mut outb);
            for ((&x, &a), &b) in buf.iter().zip(&out16).zip(&outb) {
                assert_eq!(a, f16::from_f32(x).to_bits(), "f16 {:#010x}", x.to_bits());
                assert_eq!(f32_to_f16_bits(x), a, "f16 scalar {:#010x}", x.to_bits());
                assert_eq!(b, bf16::from_f32(x).to_bits(), "bf16 {:#010x}", x.to_bits());
            }
        }
    }

    // ---- reference semantics ---------------------------------------------

    fn ref_max64(a: f64, b: f64) -> f64 {
        if a.is_nan() {
            a
        } else if b.is_nan() {
            b
        } else if a == b {
            if a.is_sign_positive() {
                a
            } else {
                b
            }
        } else if a > b {
            a
        } else {
            b
        }
    }

    fn ref_min64(a: f64, b: f64) -> f64 {
        if a.is_nan() {
            a
        } else if b.is_nan() {
            b
        } else if a == b {
            if a.is_sign_negative() {
                a
            } else {
                b
            }
        } else if a < b {
            a
        } else {
            b
        }
    }

    /// Reference `op(a, b)` on native-order element bytes, written
    /// independently of the kernels (element by element, via `half` for the
    /// 16-bit floats). Returns the expected bytes.
    fn ref_op(dtype: DataType, op: ReduceOp, a: &[u8], b: &[u8]) -> Vec<u8> {
        macro_rules! int {
            ($t:ty) => {{
                let x = <$t>::from_ne_bytes(a.try_into().unwrap());
                let y = <$t>::from_ne_bytes(b.try_into().unwrap());
                let r = match op {
                    ReduceOp::Sum | ReduceOp::Avg => x.wrapping_add(y),
                    ReduceOp::Prod => x.wrapping_mul(y),
                    ReduceOp::Max => x.max(y),
                    ReduceOp::Min => x.min(y),
                };
                r.to_ne_bytes().to_vec()
            }};
        }
        // Float reference in f64 is exact for max/min; for +,* it is exact
        // after rounding back for f32/f16/bf16 (double rounding is innocuous).
        let fop = |x: f64, y: f64| match op {
            ReduceOp::Sum | ReduceOp::Avg => x + y,
            ReduceOp::Prod => x * y,
            ReduceOp::Max => ref_max64(x, y),
            ReduceOp::Min => ref_min64(x, y),
        };
        match dtype {
            DataType::U8 => int!(u8),
            DataType::I8 => int!(i8),
            DataType::U16 => int!(u16),
            DataType::I16 => int!(i16),
            DataType::U32 => int!(u32),
            DataType::I32 => int!(i32),
            DataType::U64 => int!(u64),
            DataType::I64 => int!(i64),
            DataType::F32 => {
                let x = f32::from_ne_bytes(a.try_into().unwrap());
                let y = f32::from_ne_bytes(b.try_into().unwrap());
                let r = match op {
                    ReduceOp::Sum | ReduceOp::Avg => x + y,
                    ReduceOp::Prod => x * y,
                    _ => fop(x as f64, y as f64) as f32,
                };
                r.to_ne_bytes().to_vec()
            }
            DataType::F64 => {
                let x = f64::from_ne_bytes(a.try_into().unwrap());
                let y = f64::from_ne_bytes(b.try_into().unwrap());
                fop(x, y).to_ne_bytes().to_vec()
            }
            DataType::F16 => {
                let x = f16::from_ne_bytes(a.try_into().unwrap()).to_f64();
                let y = f16::from_ne_bytes(b.try_into().unwrap()).to_f64();
                f16::from_f64(fop(x, y)).to_ne_bytes().to_vec()
            }
            DataType::BF16 => {
                let x = bf16::from_ne_bytes(a.try_into().unwrap()).to_f64();
                let y = bf16::from_ne_bytes(b.try_into().unwrap()).to_f64();
                // bf16 from f64 would round twice through f32 differently:
                // go through f32 like the kernel (exact for +,*: 24 >= 2*8+2).
                bf16::from_f32(fop(x, y) as f32).to_ne_bytes().to_vec()
            }
        }
    }

    /// Whether one element's bytes are a float NaN (false for integers).
    pub(crate) fn is_nan_bytes(dtype: DataType, b: &[u8]) -> bool {
        match dtype {
            DataType::F32 => f32::from_ne_bytes(b.try_into().unwrap()).is_nan(),
            DataType::F64 => f64::from_ne_bytes(b.try_into().unwrap()).is_nan(),
            DataType::F16 => f16::from_ne_bytes(b.try_into().unwrap()).is_nan(),
            DataType::BF16 => bf16::from_ne_bytes(b.try_into().unwrap()).is_nan(),
            _ => false,
        }
    }

    /// Random element bytes: raw bit patterns (all classes: NaN, inf,
    /// subnormals) mixed with ordinary values and signed zeros.
    fn random_elems(dtype: DataType, n: usize, rng: &mut StdRng) -> Vec<u8> {
        let mut v = Vec::with_capacity(n * dtype.size());
        for _ in 0..n {
            let kind = rng.gen_range(0..10);
            let bytes: Vec<u8> = match (dtype, kind) {
                (DataType::F32, 0..=4) => ((rng.gen::<f32>() - 0.5) * 100.0).to_ne_bytes().to_vec(),
                (DataType::F64, 0..=4) => ((rng.gen::<f64>() - 0.5) * 100.0).to_ne_bytes().to_vec(),
                (DataType::F16, 0..=4) => f16::from_f32((rng.gen::<f32>() - 0.5) * 100.0)
                    .to_ne_bytes()
                    .to_vec(),
                (DataType::BF16, 0..=4) => bf16::from_f32((rng.gen::<f32>() - 0.5) * 100.0)
                    .to_ne_bytes()
                    .to_vec(),
                (DataType::F32, 5) => [0.0f32, -0.0][rng.gen_range(0..2)].to_ne_bytes().to_vec(),
                (DataType::F64, 5) => [0.0f64, -0.0][rng.gen_range(0..2)].to_ne_bytes().to_vec(),
                (DataType::F16 | DataType::BF16, 5) => {
                    [0u16, 0x8000][rng.gen_range(0..2)].to_ne_bytes().to_vec()
                }
                _ => (0..dtype.size()).map(|_| rng.gen()).collect(),
            };
            v.extend(bytes);
        }
        v
    }

    fn check_reduce(dtype: DataType, op: ReduceOp, n: usize, doff: usize, soff: usize, seed: u64) {
        let sz = dtype.size();
        let mut rng = StdRng::seed_from_u64(seed);
        let a = random_elems(dtype, n, &mut rng);
        let b = random_elems(dtype, n, &mut rng);
        let mut dbuf = vec![0xAAu8; n * sz + doff + 3];
        let mut sbuf = vec![0x55u8; n * sz + soff + 3];
        dbuf[doff..doff + n * sz].copy_from_slice(&a);
        sbuf[soff..soff + n * sz].copy_from_slice(&b);
        reduce_into(
            dtype,
            op,
            &mut dbuf[doff..doff + n * sz],
            &sbuf[soff..soff + n * sz],
        );
        // Bytes around the slice are untouched.
        assert!(dbuf[..doff].iter().all(|&x| x == 0xAA));
        assert!(dbuf[doff + n * sz..].iter().all(|&x| x == 0xAA));
        let got = &dbuf[doff..doff + n * sz];
        for i in 0..n {
            let r = i * sz..(i + 1) * sz;
            let expect = ref_op(dtype, op, &a[r.clone()], &b[r.clone()]);
            let ok = if is_nan_bytes(dtype, &expect) {
                is_nan_bytes(dtype, &got[r.clone()])
            } else {
                got[r.clone()] == expect[..]
            };
            assert!(
                ok,
                "{} {:?} n={n} doff={doff} soff={soff} i={i}: {:?} op {:?} = {:?}, want {:?}",
                dtype.name(),
                op,
                &a[r.clone()],
                &b[r.clone()],
                &got[r.clone()],
                expect
            );
        }
    }

    #[test]
    fn reduce_matches_reference_all_types_ops_alignments() {
        let mut seed = 0;
        for dtype in DataType::ALL {
            for op in ReduceOp::ALL {
                for n in [0usize, 1, 3, 17, 255, 1000, 2600] {
                    for (doff, soff) in [(0, 0), (1, 0), (0, 3), (5, 2)] {
                        seed += 1;
                        check_reduce(dtype, op, n, doff, soff, seed);
                    }
                }
            }
        }
    }

    #[test]
    fn portable_and_dispatched_paths_agree() {
        let mut rng = StdRng::seed_from_u64(99);
        for dtype in DataType::ALL {
            for op in ReduceOp::ALL {
                let n = 1537;
                let a = random_elems(dtype, n, &mut rng);
                let b = random_elems(dtype, n, &mut rng);
                let mut x = a.clone();
                reduce_into(dtype, op, &mut x, &b);
                let mut y = a.clone();
                match dtype {
                    DataType::F16 => reduce_half_portable::<F16Fmt>(op, &mut y, &b),
                    DataType::BF16 => reduce_half_portable::<Bf16Fmt>(op, &mut y, &b),
                    DataType::F32 => reduce_typed_portable::<f32>(op, &mut y, &b),
                    DataType::F64 => reduce_typed_portable::<f64>(op, &mut y, &b),
                    DataType::I32 => reduce_typed_portable::<i32>(op, &mut y, &b),
                    _ => continue,
                }
                // Bits must agree, except that the payload of a NaN made by
                // Sum/Prod from two NaN operands depends on operand order,
                // which the compiler may choose differently per build.
                let sz = dtype.size();
                for (i, (p, q)) in x.chunks_exact(sz).zip(y.chunks_exact(sz)).enumerate() {
                    let both_nan = is_nan_bytes(dtype, p) && is_nan_bytes(dtype, q);
                    let nan_ok =
                        both_nan && matches!(op, ReduceOp::Sum | ReduceOp::Avg | ReduceOp::Prod);
                    assert!(p == q || nan_ok, "{} {:?} element {i}", dtype.name(), op);
                }
            }
        }
    }

    #[test]
    fn float_max_min_nan_and_signed_zero() {
        let f = |v: &[f32]| v.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
        let back = |b: &[u8]| {
            b.chunks_exact(4)
                .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
                .collect::<Vec<f32>>()
        };
        let nan_a = f32::from_bits(0x7fc0_0001);
        let nan_b = f32::from_bits(0xffc0_0002);
        let a = [0.0, -0.0, 1.0, nan_a, 2.0, nan_a, -0.0];
        let b = [-0.0, 0.0, nan_b, 3.0, nan_b, nan_b, -0.0];
        let mut d = f(&a);
        reduce_into(DataType::F32, ReduceOp::Max, &mut d, &f(&b));
        let r = back(&d);
        assert_eq!(r[0].to_bits(), 0.0f32.to_bits());
        assert_eq!(r[1].to_bits(), 0.0f32.to_bits());
        assert_eq!(r[2].to_bits(), nan_b.to_bits()); // src NaN propagates
        assert_eq!(r[3].to_bits(), nan_a.to_bits()); // dst NaN wins
        assert_eq!(r[4].to_bits(), nan_b.to_bits());
        assert_eq!(r[5].to_bits(), nan_a.to_bits());
        assert_eq!(r[6].to_bits(), (-0.0f32).to_bits());
        let mut d = f(&a);
        reduce_into(DataType::F32, ReduceOp::Min, &mut d, &f(&b));
        let r = back(&d);
        assert_eq!(r[0].to_bits(), (-0.0f32).to_bits());
        assert_eq!(r[1].to_bits(), (-0.0f32).to_bits());
        assert_eq!(r[3].to_bits(), nan_a.to_bits());
        assert_eq!(r[6].to_bits(), (-0.0f32).to_bits());
    }

    // ---- finalize_avg ----------------------------------------------------

    fn ref_avg(dtype: DataType, a: &[u8], w: u32) -> Vec<u8> {
        macro_rules! int {
            ($t:ty) => {{
                let x = <$t>::from_ne_bytes(a.try_into().unwrap()) as i128;
                ((x / w as i128) as $t).to_ne_bytes().to_vec()
            }};
        }
        match dtype {
            DataType::U8 => int!(u8),
            DataType::I8 => int!(i8),
            DataType::U16 => int!(u16),
            DataType::I16 => int!(i16),
            DataType::U32 => int!(u32),
            DataType::I32 => int!(i32),
            DataType::U64 => int!(u64),
            DataType::I64 => int!(i64),
            DataType::F32 => (f32::from_ne_bytes(a.try_into().unwrap()) / w as f32)
                .to_ne_bytes()
                .to_vec(),
            DataType::F64 => (f64::from_ne_bytes(a.try_into().unwrap()) / w as f64)
                .to_ne_bytes()
                .to_vec(),
            DataType::F16 => {
                f16::from_f32(f16::from_ne_bytes(a.try_into().unwrap()).to_f32() / w as f32)
                    .to_ne_bytes()
                    .to_vec()
            }
            DataType::BF16 => {
                bf16::from_f32(bf16::from_ne_bytes(a.try_into().unwrap()).to_f32() / w as f32)
                    .to_ne_bytes()
                    .to_vec()
            }
        }
    }

    #[test]
    fn finalize_avg_matches_reference() {
        let mut rng = StdRng::seed_from_u64(5);
        for dtype in DataType::ALL {
            let sz = dtype.size();
            for world in [1u32, 2, 3, 7, 300, 65_537, u32::MAX] {
                for (n, off) in [(0usize, 0usize), (1, 1), (700, 0), (1100, 3)] {
                    let a = random_elems(dtype, n, &mut rng);
                    let mut buf = vec![0u8; n * sz + off];
                    buf[off..].copy_from_slice(&a);
                    finalize_avg(dtype, &mut buf[off..], world);
                    for i in 0..n {
                        let r = i * sz..(i + 1) * sz;
                        let expect = ref_avg(dtype, &a[r.clone()], world);
                        let got = &buf[off + r.start..off + r.end];
                        if is_nan_bytes(dtype, &expect) {
                            assert!(is_nan_bytes(dtype, got));
                        } else {
                            assert_eq!(got, &expect[..], "{} world={world} i={i}", dtype.name());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn finalize_avg_integer_truncates_toward_zero() {
        let mut d: Vec<u8> = [-7i32, 7, -1, i32::MIN]
            .iter()
            .flat_map(|x| x.to_ne_bytes())
            .collect();
        finalize_avg(DataType::I32, &mut d, 2);
        let r: Vec<i32> = d
            .chunks_exact(4)
            .map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(r, vec![-3, 3, 0, i32::MIN / 2]);
    }

    #[test]
    #[cfg_attr(debug_assertions, should_panic)]
    fn length_mismatch_is_a_debug_assert_and_prefix_in_release() {
        let mut d = [1u8, 2, 3, 4, 5, 6, 7];
        let s = [10u8, 10, 10, 10, 10];
        reduce_into(DataType::U16, ReduceOp::Sum, &mut d, &s);
        // Release: the common whole-element prefix (2 elements) is processed.
        assert_eq!(d, [11, 12, 13, 14, 5, 6, 7]);
    }

    #[test]
    fn sum_of_f32_is_exact_ieee() {
        let a: Vec<f32> = (0..1000).map(|i| i as f32 * 0.1).collect();
        let b: Vec<f32> = (0..1000).map(|i| 1.0 / (i as f32 + 1.0)).collect();
        let mut d: Vec<u8> = bytemuck::cast_slice(&a).to_vec();
        reduce_into(
            DataType::F32,
            ReduceOp::Sum,
            &mut d,
            bytemuck::cast_slice(&b),
        );
        for (i, c) in d.chunks_exact(4).enumerate() {
            assert_eq!(f32::from_ne_bytes(c.try_into().unwrap()), a[i] + b[i]);
        }
    }
}
