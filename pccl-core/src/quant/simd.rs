//! Glue between the portable block kernels and the AVX2 kernel of
//! [`super::avx2`]: `simd_prefix` (encode) and `simd_decode_prefix` (decode)
//! check at run time that the block is `f32` with 8-bit codes and that the
//! CPU has AVX2, translate the block's operands (`Kern`, `Decoder`) into
//! [`super::avx2`]'s `Op`, and return how many elements the kernel did (0
//! elsewhere, or when the tests turn SIMD off).
//!
//! Imports [`super::element`], [`super::scalar`]'s `Decoder` and
//! [`super::avx2`].

#[cfg(target_arch = "x86_64")]
use super::avx2;
use super::element::{Code, QFloat};
use super::scalar::Decoder;

/// Decodes the longest prefix of a block (finite metadata) that the SIMD
/// kernel handles (a multiple of 8 elements; `f32` values, 8-bit codes,
/// AVX2) and returns its length: `ys[i] = dec(cs[i] ^ mask)`, or
/// `ys[i] = acc[i] + dec(cs[i] ^ mask)` when `acc` is not null, bit for bit
/// what [`decode_block`] (and a `Sum` reduce) computes. The caller does the
/// rest.
///
/// # Safety
///
/// `ys` is valid for `cs.len()` writes and `acc` null or valid for
/// `cs.len()` reads (it may equal `ys`); nothing else accesses that memory
/// meanwhile. Neither needs any alignment.
#[inline(always)]
#[allow(unused_variables)]
pub(super) unsafe fn simd_decode_prefix<C: QFloat, Q: Code>(
    dec: &Decoder<C>,
    cap: C,
    mask: u32,
    cs: &[Q],
    acc: *const C,
    ys: *mut C,
) -> usize {
    #[cfg(test)]
    if super::tests::NO_SIMD.with(|c| c.get()) {
        return 0;
    }
    #[cfg(target_arch = "x86_64")]
    if C::BYTES == 4 && size_of::<Q>() == 1 && cs.len() >= 8 && crate::kernels::has_avx2() {
        // `C` is `f32` (the only 4-byte compute type) and `Q` is `u8`: the casts succeed.
        let f = |v: C| bytemuck::try_cast::<C, f32>(v).ok();
        let op = match *dec {
            // The kernel's `k == 0` shortcut relies on `step >= 0`, which
            // holds for every block an encoder writes (`lo <= hi`); others
            // (corrupt metadata) take the scalar loop.
            Decoder::MinMax { lo, hi, step } if lo <= hi => avx2::Op {
                minmax: true,
                div: false,
                f: f(step),
                a: f(lo),
                b: f(hi),
                d: f(step),
                cap: f(cap),
                mask: mask as u8,
            },
            Decoder::MinMax { .. } => return 0,
            Decoder::Zps { scale, zp } => avx2::Op {
                minmax: false,
                div: false,
                f: f(scale),
                a: f(zp),
                b: f(zp),
                d: f(scale),
                cap: f(cap),
                mask: mask as u8,
            },
        };
        let cs = bytemuck::cast_slice::<Q, u8>(cs);
        // SAFETY: the CPU has AVX2 (checked above); `acc` and `ys` are
        // valid for `cs.len()` elements (this function's contract), and `C`
        // is `f32` so the pointer casts keep the element size.
        return unsafe { avx2::decode(&op, cs, acc.cast::<f32>(), ys.cast::<f32>()) };
    }
    0
}

// ---------------------------------------------------------------------------
// AVX2 kernel for f32 -> 8-bit codes
// ---------------------------------------------------------------------------

/// The operands of a block's encoder (and decoder), for the SIMD kernel: the
/// very values the scalar closures of [`encode_block`] use.
#[derive(Clone, Copy)]
pub(super) enum Kern<C> {
    /// MinMax: `t = dl <= dh ? s(dl) : qmax - s(dh)` with `s(d) = d * f`,
    /// or `d / f` when `div`; decoded with [`decode_minmax_one`] (`step`).
    MinMax {
        lo: C,
        hi: C,
        f: C,
        div: bool,
        step: C,
    },
    /// ZeroPointScale: `t = s(v) + zp`, `s` as above; decoded with
    /// [`decode_zps_one`] (`scale`, `zp`).
    Zps { f: C, div: bool, scale: C, zp: C },
}

/// Encodes the longest prefix of the block that the SIMD kernel handles (a
/// multiple of 32 elements; `f32` values, 8-bit codes, AVX2) and returns its
/// length: `cs[i] = enc(xs[i]) ^ mask` and, when `ys` is not null,
/// `ys[i] = dec(enc(xs[i]))`, bit for bit what the scalar loop computes. The
/// caller does the rest of the block.
///
/// # Safety
///
/// `xs` is valid for `cs.len()` reads and `ys` is null or valid for
/// `cs.len()` writes (it may equal `xs`; nothing else may access that
/// memory meanwhile).
#[inline(always)]
#[allow(unused_variables)]
pub(super) unsafe fn simd_prefix<C: QFloat, Q: Code>(
    kern: Option<Kern<C>>,
    cap: C,
    mask: u32,
    xs: *const C,
    ys: *mut C,
    cs: &mut [Q],
) -> usize {
    #[cfg(test)]
    if super::tests::NO_SIMD.with(|c| c.get()) {
        return 0;
    }
    #[cfg(target_arch = "x86_64")]
    if C::BYTES == 4 && size_of::<Q>() == 1 && cs.len() >= 32 && crate::kernels::has_avx2() {
        // `C` is `f32` (the only 4-byte compute type) and `Q` is `u8`: the casts succeed.
        let f = |v: C| bytemuck::try_cast::<C, f32>(v).ok();
        let op = match kern {
            Some(Kern::MinMax {
                lo,
                hi,
                f: g,
                div,
                step,
            }) => avx2::Op {
                minmax: true,
                div,
                a: f(lo),
                b: f(hi),
                f: f(g),
                d: f(step),
                cap: f(cap),
                mask: mask as u8,
            },
            Some(Kern::Zps {
                f: g,
                div,
                scale,
                zp,
            }) => avx2::Op {
                minmax: false,
                div,
                a: f(zp),
                b: f(zp),
                f: f(g),
                d: f(scale),
                cap: f(cap),
                mask: mask as u8,
            },
            None => return 0,
        };
        let cs = bytemuck::cast_slice_mut::<Q, u8>(cs);
        // SAFETY: the CPU has AVX2 (checked above); `xs`, `ys` and `cs`
        // are valid for `cs.len()` elements (this function's contract), and
        // `C` is `f32` so the pointer casts keep the element size.
        return unsafe { avx2::encode(&op, xs.cast::<f32>(), ys.cast::<f32>(), cs) };
    }
    0
}
