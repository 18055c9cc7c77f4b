//! The whole-buffer loops behind the public entry points of [`super`]:
//! they cut a values buffer and its encoding into blocks (`take_block`,
//! `take_block_mut`, `write_meta`) and run the block kernels of
//! [`super::scalar`] on each, while it is in L1. The `*_portable` functions
//! are compiled twice by the `multiversion!` dispatch in [`super`] (plain
//! and with AVX2 enabled).
//!
//! Imports [`super::element`], [`super::scalar`], [`super::simd`] and
//! `crate::kernels` (the reduce kernels).

use super::element::{Code, QFloat, Source};
use super::scalar::{decode_block, encode_block, Decoder};
use super::simd::simd_decode_prefix;
use super::B;
use crate::types::{QuantizationAlgorithm, ReduceOp};

/// Splits the next block (`m` elements) off `rest`: its metadata and payload.
#[inline(always)]
pub(super) fn take_block_mut<'a, C: QFloat, Q: Code>(
    rest: &mut &'a mut [u8],
    m: usize,
) -> (&'a mut [u8], &'a mut [u8]) {
    let ml = 2 * C::BYTES;
    let (blk, tail) = std::mem::take(rest).split_at_mut(ml + m * size_of::<Q>());
    *rest = tail;
    blk.split_at_mut(ml)
}

/// Reads the next block (`m` elements) off `rest`: its metadata and payload.
#[inline(always)]
pub(super) fn take_block<'a, C: QFloat, Q: Code>(
    rest: &mut &'a [u8],
    m: usize,
) -> (C, C, &'a [u8]) {
    let ml = 2 * C::BYTES;
    let (blk, tail) = rest.split_at(ml + m * size_of::<Q>());
    *rest = tail;
    let (meta, payload) = blk.split_at(ml);
    let m0 = C::read_le(&meta[..C::BYTES]);
    let m1 = C::read_le(&meta[C::BYTES..]);
    (m0, m1, payload)
}

#[inline(always)]
pub(super) fn write_meta<C: QFloat>(meta: &mut [u8], m0: C, m1: C) {
    m0.write_le(&mut meta[..C::BYTES]);
    m1.write_le(&mut meta[C::BYTES..]);
}

#[inline(always)]
pub(super) fn quantize_portable<S: Source, Q: Code>(
    algo: QuantizationAlgorithm,
    mask: u32,
    src: &[u8],
    out: &mut [u8],
) {
    let mut xbuf = [S::C::ZERO; B];
    let mut cbuf = [Q::zeroed(); B];
    let mut scratch = [0u16; B];
    let mut rest: &mut [u8] = out;
    for chunk in src.chunks(B * S::SIZE) {
        let m = chunk.len() / S::SIZE;
        let (meta, payload) = take_block_mut::<S::C, Q>(&mut rest, m);
        let xs = S::view(chunk, &mut xbuf[..m], &mut scratch);
        let (cs, staged) = Q::view_out(payload, &mut cbuf[..m]);
        let (m0, m1) = encode_block::<S::C, Q, _>(algo, xs, cs, mask, S::MAX);
        write_meta(meta, m0, m1);
        if staged {
            Q::write_payload(&cbuf[..m], payload);
        }
    }
}

#[inline(always)]
pub(super) fn quantize_adopt_portable<S: Source, Q: Code>(
    algo: QuantizationAlgorithm,
    mask: u32,
    data: &mut [u8],
    out: &mut [u8],
) {
    let mut xbuf = [S::C::ZERO; B];
    let mut cbuf = [Q::zeroed(); B];
    let mut scratch = [0u16; B];
    let mut rest: &mut [u8] = out;
    for chunk in data.chunks_mut(B * S::SIZE) {
        let m = chunk.len() / S::SIZE;
        let (meta, payload) = take_block_mut::<S::C, Q>(&mut rest, m);
        let (xs, staged_x) = S::view_mut(chunk, &mut xbuf[..m], &mut scratch);
        let (cs, staged_c) = Q::view_out(payload, &mut cbuf[..m]);
        let (m0, m1) = encode_block::<S::C, Q, _>(algo, xs, cs, mask, S::MAX);
        write_meta(meta, m0, m1);
        if staged_c {
            Q::write_payload(&cbuf[..m], payload);
        }
        if staged_x {
            chunk.copy_from_slice(S::to_bytes(&xbuf[..m], &mut scratch));
        }
    }
}

#[inline(always)]
pub(super) fn dequantize_portable<S: Source, Q: Code>(
    algo: QuantizationAlgorithm,
    mask: u32,
    op: Option<ReduceOp>,
    enc: &[u8],
    dst: &mut [u8],
) {
    let mut ybuf = [S::C::ZERO; B];
    let mut cbuf = [Q::zeroed(); B];
    let mut scratch = [0u16; B];
    let mut rest = enc;
    // As in `dequantize_from_portable`: a `Sum` into `f32` values is added
    // by the decoder itself, in place.
    let fused_sum = S::SIZE == S::C::BYTES && matches!(op, Some(ReduceOp::Sum | ReduceOp::Avg));
    for dchunk in dst.chunks_mut(B * S::SIZE) {
        let m = dchunk.len() / S::SIZE;
        let (m0, m1, payload) = take_block::<S::C, Q>(&mut rest, m);
        let cs = Q::view(payload, &mut cbuf[..m]);
        let mut k = 0;
        if fused_sum && m0.is_finite() && m1.is_finite() {
            let dec = Decoder::new::<Q>(algo, m0, m1);
            let dp = dchunk.as_mut_ptr().cast::<S::C>();
            // SAFETY: `dchunk` holds `m == cs.len()` source elements, which
            // are `S::C` values (`S::SIZE == S::C::BYTES`); the kernel reads
            // each before writing it and needs no alignment; `dchunk` is
            // borrowed mutably, so nothing else accesses it.
            k = unsafe { simd_decode_prefix(&dec, S::MAX, mask, cs, dp, dp) };
        }
        let (dchunk, cs) = (&mut dchunk[k * S::SIZE..], &cs[k..]);
        let m = m - k;
        if m == 0 {
            continue;
        }
        match op {
            None => {
                let (ys, staged) = S::view_out(dchunk, &mut ybuf[..m]);
                decode_block::<S::C, Q>(algo, m0, m1, cs, ys, mask, S::MAX);
                if staged {
                    dchunk.copy_from_slice(S::to_bytes(&ybuf[..m], &mut scratch));
                }
            }
            Some(op) => {
                let ys = &mut ybuf[..m];
                decode_block::<S::C, Q>(algo, m0, m1, cs, ys, mask, S::MAX);
                let bytes = S::to_bytes(ys, &mut scratch);
                crate::kernels::reduce_into(S::DTYPE, op, dchunk, bytes);
            }
        }
    }
}

#[inline(always)]
pub(super) fn dequantize_from_portable<S: Source, Q: Code>(
    algo: QuantizationAlgorithm,
    mask: u32,
    op: ReduceOp,
    a: &[u8],
    enc: &[u8],
    dst: &mut [u8],
) {
    let mut ybuf = [S::C::ZERO; B];
    let mut cbuf = [Q::zeroed(); B];
    let mut scratch = [0u16; B];
    let mut rest = enc;
    // Sum of `f32` values: the decoder can add `a` itself and write `dst`
    // directly (`S::C` is the source type), one pass with no staging.
    let fused_sum = S::SIZE == S::C::BYTES && matches!(op, ReduceOp::Sum | ReduceOp::Avg);
    for (dchunk, achunk) in dst.chunks_mut(B * S::SIZE).zip(a.chunks(B * S::SIZE)) {
        let m = dchunk.len() / S::SIZE;
        let (m0, m1, payload) = take_block::<S::C, Q>(&mut rest, m);
        let cs = Q::view(payload, &mut cbuf[..m]);
        let mut k = 0;
        if fused_sum && m0.is_finite() && m1.is_finite() {
            let dec = Decoder::new::<Q>(algo, m0, m1);
            let (ap, dp) = (
                achunk.as_ptr().cast::<S::C>(),
                dchunk.as_mut_ptr().cast::<S::C>(),
            );
            // SAFETY: `achunk` and `dchunk` hold `m == cs.len()` source
            // elements, which are `S::C` values (`S::SIZE == S::C::BYTES`),
            // and the kernel needs no alignment; `dchunk` is borrowed
            // mutably, so nothing else accesses it.
            k = unsafe { simd_decode_prefix(&dec, S::MAX, mask, cs, ap, dp) };
        }
        let (dchunk, achunk, cs) = (&mut dchunk[k * S::SIZE..], &achunk[k * S::SIZE..], &cs[k..]);
        let m = m - k;
        if m == 0 {
            continue;
        }
        let ys = &mut ybuf[..m];
        decode_block::<S::C, Q>(algo, m0, m1, cs, ys, mask, S::MAX);
        let bytes = S::to_bytes(ys, &mut scratch);
        // One fused pass: `dst = op(a, decoded)` reads this block of `a`
        // once and writes `dst` once (a copy followed by an in-place reduce
        // would write it twice). Same values as copying `a` and calling
        // `reduce_into`, except which NaN payload a float sum or product of
        // two NaNs keeps (left to the hardware, as in the kernels): the ring
        // re-encodes the owner's result, and a block holding a NaN decodes to
        // the canonical NaN anyway, so every peer still ends bit-identical.
        crate::kernels::reduce_from(S::DTYPE, op, dchunk, achunk, bytes);
    }
}
