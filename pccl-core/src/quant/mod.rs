//! Block quantization for the quantized all-reduce.
//!
//! A float tensor (`f16`, `bf16`, `f32`, `f64`) is cut into blocks of
//! [`QUANT_BLOCK_ELEMS`] elements (the last block may be shorter); each block
//! carries its own two metadata values and one integer code per element
//! (`u8`/`i8`/`u16`/`i16`; with MinMax from `f32`/`f64` also `u32`/`u64`,
//! see "Wide codes"). [`quantize`] encodes, [`dequantize_into`] decodes
//! and either overwrites or reduces into a destination. Decoding is a pure,
//! deterministic function of the encoded bytes (plain IEEE-754 arithmetic, no
//! FMA, no hardware-dependent conversions), so every peer decoding the same
//! bytes gets the same bits — the property the all-gather phase relies on.
//!
//! # Byte layout
//!
//! Let `C` be the *compute type*: `f64` for `f64` sources, `f32` for the
//! others (`f16`/`bf16` values are exact in `f32`). The encoding of `n`
//! elements is the concatenation of `ceil(n / QUANT_BLOCK_ELEMS)` blocks; block
//! `b` covers elements `b*QUANT_BLOCK_ELEMS ..` and holds `m` elements
//! (`QUANT_BLOCK_ELEMS`, or the remainder for the last block):
//!
//! ```text
//! offset 0            : meta0, C, little-endian   (MinMax: min   | ZeroPointScale: scale)
//! offset size_of::<C> : meta1, C, little-endian   (MinMax: max   | ZeroPointScale: zero point)
//! offset 2*size_of::<C>: m codes, 1 or 2 bytes each, little-endian
//! ```
//!
//! so [`encoded_len`] is `nblocks * 2 * size_of::<C>() + n * q.size()`. A
//! buffer whose element count is a multiple of `QUANT_BLOCK_ELEMS` encodes to
//! whole blocks, hence `encode(a ++ b) == encode(a) ++ encode(b)` whenever
//! `a`'s length is such a multiple: chunks can be encoded independently.
//!
//! Codes: every block works with an unsigned code `u` in `0..=qmax`,
//! `qmax = 2^bits - 1`. Unsigned types (`u8`, `u16`) store `u`; signed types
//! (`i8`, `i16`) store `u - 2^(bits-1)` as two's complement (that is, `u` with
//! its top bit flipped). Signed and unsigned targets therefore have identical
//! accuracy; only the stored bits differ.
//!
//! ## MinMax
//!
//! `meta0 = lo` and `meta1 = hi` are the block's minimum and maximum (exact,
//! in `C`). With `step = (hi - lo) / qmax` (computed as
//! `hi / qmax - lo / qmax` when `hi - lo` overflows) the decoder computes,
//! with `h = qmax / 2` (integer division),
//!
//! ```text
//! u <= h : x = lo + u * step            (x = lo exactly when u == 0)
//! u >  h : x = hi - (qmax - u) * step   (x = hi exactly when u == qmax)
//! ```
//!
//! Measuring from the nearer end never overflows, decodes both extremes
//! exactly, and makes an all-equal block decode to its value bit for bit.
//!
//! ## ZeroPointScale
//!
//! The block range is widened to contain zero, `lo' = min(lo, 0)`,
//! `hi' = max(hi, 0)`; `meta0 = scale = (hi' - lo') / qmax` and
//! `meta1 = zp = round(-lo' / scale)`, an integer in `0..=qmax` stored as `C`.
//! The decoder computes `x = (u - zp) * scale`, so **zero is represented
//! exactly** (sparse gradients stay sparse), at the price of a wider range for
//! blocks that do not straddle zero. An all-equal block of value `v` is stored
//! as `scale = |v|`, `zp = 0, u = 1` (`v > 0`) or `zp = 1, u = 0` (`v < 0`),
//! or `scale = v, zp = 0, u = 0` (`v = ±0`), which decodes exactly.
//!
//! ## Rounding, error bound
//!
//! Codes are chosen by rounding to nearest (ties to even) and clamping to
//! `0..=qmax`. For every element of a block without NaN/inf, with
//! `(l, h) = (lo, hi)` (MinMax) or `(lo', hi')` (ZeroPointScale),
//! `Δ = (h - l) / qmax` and `M = max(|l|, |h|)`:
//!
//! ```text
//! |decode(encode(x)) - x| <= Δ/2 + 8·ε_C·M + qmax·τ_C  (+ ½ ulp of the source type at M + Δ for f16/bf16)
//! ```
//!
//! where `ε_C` is the unit roundoff of `C` (2^-24 or 2^-53) and `τ_C` its
//! smallest subnormal (the last term only matters for blocks whose whole
//! range is subnormal). See `docs/quantization.md` for how this accumulates
//! over the ring.
//!
//! ## Non-finite values
//!
//! A block containing any NaN or ±infinity is encoded with both metadata
//! values set to the canonical quiet NaN (`0x7fc00000` / `0x7ff8000000000000`)
//! and all codes `u = 0`; it decodes to NaN for **every** element of the
//! block. Non-finite input therefore never turns into plausible finite
//! numbers; it spreads, visibly, to at most `QUANT_BLOCK_ELEMS` neighbours.
//!
//! The decoder treats any block whose metadata is not finite the same way
//! (every element becomes the canonical NaN, rounded to the source type:
//! `f16` `0x7e00`, `bf16` `0x7fc0`), so it never computes with NaN or
//! infinite operands and its output bits do not depend on how a CPU
//! propagates NaN payloads. With finite metadata every operation is an
//! ordinary IEEE operation on finite values, and decoded values are clamped
//! to the source type's finite range (this only bites for a ZeroPointScale
//! grid point just past the type's largest value, e.g. near ±65504 in
//! `f16`), so finite metadata always decodes to finite values. Decoding
//! arbitrary bytes never panics.
//!
//! ## Wide codes (`u32`, `u64`)
//!
//! PCCL 1.0 accepts MinMax to `u32`/`u64` from `f32`/`f64` (even `u64`
//! codes of `f32`, twice the source's size), so this module does too. The
//! layout is the one above (metadata `lo`, `hi` in `C`, then 4- or 8-byte
//! little-endian codes), but the block is encoded and decoded in `f64`
//! whatever the source, by a scalar kernel (`wide.rs`): `qmax = 2^32 − 1`
//! for `u32` and `qmax = 2^53 − 1` for `u64` (an `f64` cannot resolve more
//! codes; a stored code above `qmax` decodes as `qmax`). Decoding is the
//! MinMax formula above in `f64`, clamped to the source's finite range,
//! then rounded to the source type. The bound is the one above with
//! `ε = 2^-53`, `τ = 2^-1074`, and, for `f32` sources, the final rounding
//! to `f32` (at most doubling it, since `x` itself is an `f32` candidate):
//! `2·(Δ/2 + 8·2^-53·M + qmax·2^-1074)`. `f32` → `u32` therefore returns
//! almost every value bit-exactly. ZeroPointScale and signed wide codes
//! are refused, as in PCCL 1.0.
//!
//! ## Block size
//!
//! [`QUANT_BLOCK_ELEMS`] = 1024. The metadata then costs under 1 % of the
//! payload for 8-bit codes of `f32` data (8 bytes per 1024) and 1.6 % for `f64`
//! sources; a smaller block would tighten the range only slightly for smooth
//! data (the expected range of 1024 normal samples is about 6.5σ, against
//! 5.6σ for 256 samples) while costing 4x the metadata, and a larger one
//! lets a single outlier degrade more elements. A block of `f64` is 8 KiB, so
//! each block is scanned for its range and encoded while it sits in L1.

mod buffer;
mod element;
mod scalar;
mod simd;
mod wide;

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(test)]
mod tests;

use crate::error::{Error, Result};
use crate::kernels::multiversion;
use crate::types::{DataType, QuantizationAlgorithm, ReduceOp};
use buffer::{
    dequantize_from_portable, dequantize_portable, quantize_adopt_portable, quantize_portable,
};
use element::{Bf16Src, Code, F16Src, F32Src, F64Src, Source};

/// Elements per quantization block (each block has its own metadata).
pub const QUANT_BLOCK_ELEMS: usize = 1024;

const B: usize = QUANT_BLOCK_ELEMS;

/// Checks that quantizing `src` to `q` with `algo` and reducing with `op`
/// is meaningful.
///
/// Requirements: `src` is `f16`, `bf16`, `f32` or `f64`; `q` is `u8`, `i8`,
/// `u16` or `i16` and strictly narrower than `src`, or (MinMax only, as
/// PCCL 1.0) `q` is `u32` or `u64` and `src` is `f32` or `f64`; `algo` is not `None`;
/// `op` is not `Prod` (a product's relative error is unbounded once factors
/// are quantized). `Sum`, `Avg`, `Max` and `Min` are accepted.
pub fn validate(
    src: DataType,
    q: DataType,
    algo: QuantizationAlgorithm,
    op: ReduceOp,
) -> Result<()> {
    check_combo(src, q, algo)?;
    if op == ReduceOp::Prod {
        return Err(Error::InvalidArgument(
            "quantized all-reduce does not support Prod (quantization error of a product is unbounded)"
                .into(),
        ));
    }
    Ok(())
}

fn check_combo(src: DataType, q: DataType, algo: QuantizationAlgorithm) -> Result<()> {
    if algo == QuantizationAlgorithm::None {
        return Err(Error::InvalidArgument(
            "quantization algorithm is None; nothing to quantize".into(),
        ));
    }
    if !src.is_float() {
        return Err(Error::InvalidArgument(format!(
            "quantization needs a floating-point source, got {}",
            src.name()
        )));
    }
    if wide::is_wide(q) {
        // PCCL 1.0's MinMax accepts u32/u64 codes of f32/f64 sources (even
        // u64 codes of f32, wider than the source); so do we.
        if algo != QuantizationAlgorithm::MinMax {
            return Err(Error::InvalidArgument(format!(
                "quantized data type {} needs the MinMax algorithm (ZeroPointScale takes u8, i8, u16 or i16)",
                q.name()
            )));
        }
        if !matches!(src, DataType::F32 | DataType::F64) {
            return Err(Error::InvalidArgument(format!(
                "quantized data type {} needs an f32 or f64 source, got {}",
                q.name(),
                src.name()
            )));
        }
        return Ok(());
    }
    if !matches!(
        q,
        DataType::U8 | DataType::I8 | DataType::U16 | DataType::I16
    ) {
        return Err(Error::InvalidArgument(format!(
            "quantized data type must be u8, i8, u16 or i16 (or u32/u64 with MinMax from f32/f64), got {}",
            q.name()
        )));
    }
    if q.size() >= src.size() {
        return Err(Error::InvalidArgument(format!(
            "quantized data type {} is not narrower than the source type {}",
            q.name(),
            src.name()
        )));
    }
    Ok(())
}

/// Bytes of metadata per block: two values of the compute type.
const fn meta_len(src: DataType) -> usize {
    match src {
        DataType::F64 => 16,
        _ => 8,
    }
}

/// Number of encoded bytes for `n` source elements (metadata of every block
/// plus the codes). With `algo == None` this is the raw size
/// `n * src.size()`. Saturates instead of overflowing for absurd `n`; the
/// value is only meaningful for combinations [`validate`] accepts.
pub fn encoded_len(src: DataType, q: DataType, algo: QuantizationAlgorithm, n: usize) -> usize {
    if algo == QuantizationAlgorithm::None {
        return n.saturating_mul(src.size());
    }
    let blocks = n.div_ceil(B);
    blocks
        .saturating_mul(meta_len(src))
        .saturating_add(n.saturating_mul(q.size()))
}

/// Calls the kernel `$f::<S, Q>(args)` monomorphized for the (source type,
/// code width) pair; every pair [`check_combo`] accepts has an arm.
macro_rules! by_types {
    ($what:literal, $src:expr, $q:expr, $f:ident($($arg:expr),*)) => {{
        match ($src, $q.size()) {
            (DataType::F16, 1) => $f::<F16Src, u8>($($arg),*),
            (DataType::BF16, 1) => $f::<Bf16Src, u8>($($arg),*),
            (DataType::F32, 1) => $f::<F32Src, u8>($($arg),*),
            (DataType::F32, 2) => $f::<F32Src, u16>($($arg),*),
            (DataType::F64, 1) => $f::<F64Src, u8>($($arg),*),
            (DataType::F64, 2) => $f::<F64Src, u16>($($arg),*),
            _ => {
                return Err(Error::Internal(
                    concat!($what, ": unhandled type combination").into(),
                ))
            }
        }
        Ok(())
    }};
}

/// Encodes the `src.len() / src_dtype.size()` elements of `src` (native byte
/// order, any alignment) into `out`, which must be exactly
/// [`encoded_len`] bytes long.
///
/// Errors (`InvalidArgument`, nothing written): a combination
/// [`validate`] refuses (ignoring the op), `src.len()` not a multiple of the
/// element size, or a wrong `out` length.
pub fn quantize(
    src_dtype: DataType,
    q: DataType,
    algo: QuantizationAlgorithm,
    src: &[u8],
    out: &mut [u8],
) -> Result<()> {
    check_combo(src_dtype, q, algo)?;
    checked_elems("quantize", src_dtype, q, algo, src.len(), out.len())?;
    if wide::is_wide(q) {
        wide::quantize(src_dtype, q, src, out);
        return Ok(());
    }
    let mask = sign_mask(q);
    by_types!(
        "quantize",
        src_dtype,
        q,
        quantize_impl(algo, mask, src, out)
    )
}

/// Decodes `enc` (the encoding of `dst.len() / src_dtype.size()` elements)
/// and writes the values into `dst` (`op == None`) or reduces them into it
/// (`dst[i] = op(dst[i], decoded[i])`, `op` applied exactly as
/// [`crate::kernels::reduce_into`] does, `Avg` accumulating like `Sum`).
///
/// Decoded values are first rounded to the source type (`f16`/`bf16`:
/// nearest-even), so `dequantize_into(Some(op))` gives the same bits as
/// decoding into a scratch buffer and calling `reduce_into`. `dst` may be
/// unaligned. Arbitrary `enc` bytes of the right length never panic.
///
/// Errors (`InvalidArgument`, `dst` untouched): a combination [`validate`]
/// refuses, `dst.len()` not a multiple of the element size, or `enc.len()`
/// different from [`encoded_len`].
pub fn dequantize_into(
    src_dtype: DataType,
    q: DataType,
    algo: QuantizationAlgorithm,
    op: Option<ReduceOp>,
    enc: &[u8],
    dst: &mut [u8],
) -> Result<()> {
    match op {
        Some(op) => validate(src_dtype, q, algo, op)?,
        None => check_combo(src_dtype, q, algo)?,
    }
    checked_elems("dequantize", src_dtype, q, algo, dst.len(), enc.len())?;
    if wide::is_wide(q) {
        wide::dequantize_into(src_dtype, q, op, enc, dst);
        return Ok(());
    }
    let mask = sign_mask(q);
    by_types!(
        "dequantize",
        src_dtype,
        q,
        dequantize_impl(algo, mask, op, enc, dst)
    )
}

/// [`quantize`] and adopt the result in one pass: encodes `data` into `out`
/// (exactly the bytes [`quantize`] writes) and overwrites `data` with
/// exactly the bits `dequantize_into(src_dtype, q, algo, None, out, data)`
/// would write afterwards. Block by block, each decoded value is computed
/// right after its code is chosen, while the block is in registers / L1,
/// instead of a second pass that re-reads and unpacks the codes.
///
/// This is what a segment owner does before sending its final (quantized)
/// values: it keeps exactly what every other peer will decode. `data` may
/// be unaligned.
///
/// Errors (`InvalidArgument`, neither buffer written): as for [`quantize`].
pub fn quantize_adopt(
    src_dtype: DataType,
    q: DataType,
    algo: QuantizationAlgorithm,
    data: &mut [u8],
    out: &mut [u8],
) -> Result<()> {
    check_combo(src_dtype, q, algo)?;
    checked_elems("quantize_adopt", src_dtype, q, algo, data.len(), out.len())?;
    if wide::is_wide(q) {
        wide::quantize_adopt(src_dtype, q, data, out);
        return Ok(());
    }
    let mask = sign_mask(q);
    by_types!(
        "quantize_adopt",
        src_dtype,
        q,
        quantize_adopt_impl(algo, mask, data, out)
    )
}

/// `dst[i] = op(a[i], decoded[i])`, where `decoded` is the decoding of
/// `enc` (`dst.len() / src_dtype.size()` elements): the same values as
/// `dst.copy_from_slice(a)` followed by
/// `dequantize_into(src_dtype, q, algo, Some(op), enc, dst)` (`a` is the
/// destination operand of [`crate::kernels::reduce_into`]: same operand
/// order, NaN rules and `Avg`-accumulates-like-`Sum`), without the copy.
/// The bits are the same too, except which NaN payload a float sum or
/// product of two NaNs keeps (left to the hardware, as in the kernels).
/// Works block by block, so each decoded block is reduced while in L1.
/// `a` and `dst` may be unaligned. Arbitrary `enc` bytes never panic.
///
/// Errors (`InvalidArgument`, `dst` untouched): as for [`dequantize_into`],
/// or `a.len() != dst.len()`.
pub fn dequantize_reduce_from(
    src_dtype: DataType,
    q: DataType,
    algo: QuantizationAlgorithm,
    op: ReduceOp,
    a: &[u8],
    enc: &[u8],
    dst: &mut [u8],
) -> Result<()> {
    validate(src_dtype, q, algo, op)?;
    if a.len() != dst.len() {
        return Err(Error::InvalidArgument(format!(
            "dequantize_reduce_from: operand is {} bytes, destination {}",
            a.len(),
            dst.len()
        )));
    }
    checked_elems(
        "dequantize_reduce_from",
        src_dtype,
        q,
        algo,
        dst.len(),
        enc.len(),
    )?;
    if wide::is_wide(q) {
        wide::dequantize_reduce_from(src_dtype, q, op, a, enc, dst);
        return Ok(());
    }
    let mask = sign_mask(q);
    by_types!(
        "dequantize_reduce_from",
        src_dtype,
        q,
        dequantize_from_impl(algo, mask, op, a, enc, dst)
    )
}

/// The number of elements in a values buffer of `values_len` bytes, after
/// checking that it is a whole number of `src_dtype` elements and that the
/// encoded buffer has the matching [`encoded_len`]; `what` names the call in
/// the errors.
fn checked_elems(
    what: &str,
    src_dtype: DataType,
    q: DataType,
    algo: QuantizationAlgorithm,
    values_len: usize,
    enc_len: usize,
) -> Result<usize> {
    if !values_len.is_multiple_of(src_dtype.size()) {
        return Err(Error::InvalidArgument(format!(
            "{what}: {values_len} bytes is not a whole number of {} elements",
            src_dtype.name()
        )));
    }
    let n = values_len / src_dtype.size();
    let need = encoded_len(src_dtype, q, algo, n);
    if enc_len != need {
        return Err(Error::InvalidArgument(format!(
            "{what}: encoded buffer is {enc_len} bytes, {n} elements need {need}"
        )));
    }
    Ok(n)
}

/// XOR applied to the unsigned code to get the stored bits (flips the top bit
/// for signed targets).
const fn sign_mask(q: DataType) -> u32 {
    match q {
        DataType::I8 => 0x80,
        DataType::I16 => 0x8000,
        _ => 0,
    }
}

multiversion!(fn quantize_impl<S: Source, Q: Code>(
    algo: QuantizationAlgorithm,
    mask: u32,
    src: &[u8],
    out: &mut [u8],
) => quantize_portable);

multiversion!(fn quantize_adopt_impl<S: Source, Q: Code>(
    algo: QuantizationAlgorithm,
    mask: u32,
    data: &mut [u8],
    out: &mut [u8],
) => quantize_adopt_portable);

multiversion!(fn dequantize_impl<S: Source, Q: Code>(
    algo: QuantizationAlgorithm,
    mask: u32,
    op: Option<ReduceOp>,
    enc: &[u8],
    dst: &mut [u8],
) => dequantize_portable);

multiversion!(fn dequantize_from_impl<S: Source, Q: Code>(
    algo: QuantizationAlgorithm,
    mask: u32,
    op: ReduceOp,
    a: &[u8],
    enc: &[u8],
    dst: &mut [u8],
) => dequantize_from_portable);
