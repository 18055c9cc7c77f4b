//! Block quantization for the quantized all-reduce.
//!
//! A float tensor (`f16`, `bf16`, `f32`, `f64`) is cut into blocks of
//! [`QUANT_BLOCK_ELEMS`] elements (the last block may be shorter); each block
//! carries its own two metadata values and one integer code per element
//! (`u8`/`i8`/`u16`/`i16`). [`quantize`] encodes, [`dequantize_into`] decodes
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
//! ## Block size
//!
//! [`QUANT_BLOCK_ELEMS`] = 1024. The metadata then costs under 1 % of the
//! payload for 8-bit codes of `f32` data (8 bytes per 1024) and 1.6 % for `f64`
//! sources; a smaller block would tighten the range only slightly for smooth
//! data (the expected range of 1024 normal samples is about 6.5σ, against
//! 5.6σ for 256 samples) while costing 4x the metadata, and a larger one
//! lets a single outlier degrade more elements. A block of `f64` is 8 KiB, so
//! each block is scanned for its range and encoded while it sits in L1.

use crate::error::{Error, Result};
use crate::kernels::{multiversion, Bf16Fmt, F16Fmt, HalfFmt};
use crate::types::{DataType, QuantizationAlgorithm, ReduceOp};
use bytemuck::{Pod, Zeroable};
use std::ops::{Add, Div, Mul, Neg, Sub};

/// Elements per quantization block (each block has its own metadata).
pub const QUANT_BLOCK_ELEMS: usize = 1024;

const B: usize = QUANT_BLOCK_ELEMS;

/// Checks that quantizing `src` to `q` with `algo` and reducing with `op`
/// is meaningful.
///
/// Requirements: `src` is `f16`, `bf16`, `f32` or `f64`; `q` is `u8`, `i8`,
/// `u16` or `i16` and strictly narrower than `src`; `algo` is not `None`;
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
    if !matches!(
        q,
        DataType::U8 | DataType::I8 | DataType::U16 | DataType::I16
    ) {
        return Err(Error::InvalidArgument(format!(
            "quantized data type must be u8, i8, u16 or i16, got {}",
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

// ---------------------------------------------------------------------------
// Compute type
// ---------------------------------------------------------------------------

/// The float type blocks are analysed, encoded and decoded in.
trait QFloat:
    Pod
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    const ZERO: Self;
    const NAN: Self;
    /// Smallest positive subnormal.
    const TINY: Self;
    /// 1.5 * 2^mantissa_bits: adding it to a value in [0, 2^22) leaves the
    /// value rounded to nearest-even in the low mantissa bits.
    const MAGIC: Self;
    const BYTES: usize;
    fn from_i32(i: i32) -> Self;
    /// Low 16 bits of `self + MAGIC`: `round_ties_even(self)` for `self` in `[0, 65535]`.
    fn round_code(self) -> u32;
    fn is_finite(self) -> bool;
    /// Minimum, maximum, and whether every element is finite (a non-empty
    /// slice). NaNs are not ordered (the bool reports them).
    fn stats(xs: &[Self]) -> (Self, Self, bool);
    fn write_le(self, out: &mut [u8]);
    fn read_le(b: &[u8]) -> Self;
}

/// Implements `QFloat::stats` with integer reductions, which LLVM vectorizes
/// far better than float min/max reductions: the bits of a float, with the
/// sign bit flipped for positives and all bits flipped for negatives, sort as
/// unsigned integers in the float's order (-0.0 just below +0.0), and the
/// magnitude bits alone reveal NaN/inf (`>= exponent mask`).
macro_rules! int_key_stats {
    ($f:ty, $u:ty, $i:ty) => {
        #[inline(always)]
        fn stats(xs: &[$f]) -> ($f, $f, bool) {
            const SIGN: $u = 1 << (<$u>::BITS - 1);
            let exp_mask: $u = <$f>::INFINITY.to_bits();
            let mut kmin = <$u>::MAX;
            let mut kmax: $u = 0;
            let mut amax: $u = 0;
            for &x in xs {
                let b = x.to_bits();
                let neg = ((b as $i) >> (<$u>::BITS - 1)) as $u;
                let k = b ^ (neg | SIGN);
                kmin = if k < kmin { k } else { kmin };
                kmax = if k > kmax { k } else { kmax };
                let a = b & !SIGN;
                amax = if a > amax { a } else { amax };
            }
            let unkey = |k: $u| {
                let b = if k & SIGN != 0 { k ^ SIGN } else { !k };
                <$f>::from_bits(b)
            };
            (unkey(kmin), unkey(kmax), amax < exp_mask)
        }
    };
}

impl QFloat for f32 {
    const ZERO: Self = 0.0;
    const NAN: Self = f32::NAN;
    const TINY: Self = 1e-45; // rounds to the smallest subnormal, bits 0x00000001
    const MAGIC: Self = 12_582_912.0;
    const BYTES: usize = 4;
    #[inline(always)]
    fn from_i32(i: i32) -> Self {
        i as f32
    }
    #[inline(always)]
    fn round_code(self) -> u32 {
        (self + Self::MAGIC).to_bits() & 0xffff
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
    int_key_stats!(f32, u32, i32);
    fn write_le(self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.to_le_bytes());
    }
    fn read_le(b: &[u8]) -> Self {
        let mut a = [0u8; 4];
        a.copy_from_slice(&b[..4]);
        f32::from_le_bytes(a)
    }
}

impl QFloat for f64 {
    const ZERO: Self = 0.0;
    const NAN: Self = f64::NAN;
    const TINY: Self = 5e-324; // the smallest subnormal, bits 0x0000000000000001
    const MAGIC: Self = 6_755_399_441_055_744.0;
    const BYTES: usize = 8;
    #[inline(always)]
    fn from_i32(i: i32) -> Self {
        i as f64
    }
    #[inline(always)]
    fn round_code(self) -> u32 {
        ((self + Self::MAGIC).to_bits() & 0xffff) as u32
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
    int_key_stats!(f64, u64, i64);
    fn write_le(self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.to_le_bytes());
    }
    fn read_le(b: &[u8]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        f64::from_le_bytes(a)
    }
}

// ---------------------------------------------------------------------------
// Source types
// ---------------------------------------------------------------------------

/// A source element type: how to widen it into the compute type and round back.
trait Source {
    type C: QFloat;
    const SIZE: usize;
    const DTYPE: DataType;
    /// Largest finite value of the source type, in the compute type.
    const MAX: Self::C;
    /// Fills `out` (len m) from `bytes` (len m * SIZE, native order).
    fn load(bytes: &[u8], out: &mut [Self::C], scratch: &mut [u16; B]);
    /// Rounds `ys` to the source type and returns its native-order bytes.
    fn to_bytes<'a>(ys: &'a [Self::C], scratch: &'a mut [u16; B]) -> &'a [u8];
    /// The values of `bytes` (len m * SIZE) in the compute type: `bytes`
    /// itself when it is already an aligned `[C]`, else loaded into `buf` (len m).
    fn view<'a>(bytes: &'a [u8], buf: &'a mut [Self::C], scratch: &mut [u16; B]) -> &'a [Self::C];
    /// Like [`Source::view`], mutable; `true` when the values live in `buf`
    /// and must be stored back with [`Source::to_bytes`].
    fn view_mut<'a>(
        bytes: &'a mut [u8],
        buf: &'a mut [Self::C],
        scratch: &mut [u16; B],
    ) -> (&'a mut [Self::C], bool);
    /// Where to decode values destined for `bytes`: `bytes` itself when it
    /// is an aligned `[C]`, else `buf` (not loaded; `true`: store back).
    fn view_out<'a>(bytes: &'a mut [u8], buf: &'a mut [Self::C]) -> (&'a mut [Self::C], bool);
}

/// Whether `bytes` is aligned for `T`.
#[inline(always)]
fn aligned_for<T>(bytes: &[u8]) -> bool {
    (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
}

struct F16Src;
struct Bf16Src;
struct F32Src;
struct F64Src;

macro_rules! half_source {
    ($name:ident, $dt:expr, $fmt:ty, $max:expr) => {
        impl Source for $name {
            type C = f32;
            const SIZE: usize = 2;
            const DTYPE: DataType = $dt;
            const MAX: f32 = $max;
            #[inline(always)]
            fn load(bytes: &[u8], out: &mut [f32], scratch: &mut [u16; B]) {
                let bits = &mut scratch[..out.len()];
                bytemuck::cast_slice_mut::<u16, u8>(bits).copy_from_slice(bytes);
                <$fmt>::widen(bits, out);
            }
            #[inline(always)]
            fn to_bytes<'a>(ys: &'a [f32], scratch: &'a mut [u16; B]) -> &'a [u8] {
                let bits = &mut scratch[..ys.len()];
                <$fmt>::narrow(ys, bits);
                bytemuck::cast_slice::<u16, u8>(bits)
            }
            #[inline(always)]
            fn view<'a>(bytes: &'a [u8], buf: &'a mut [f32], scratch: &mut [u16; B]) -> &'a [f32] {
                Self::load(bytes, buf, scratch);
                buf
            }
            #[inline(always)]
            fn view_mut<'a>(
                bytes: &'a mut [u8],
                buf: &'a mut [f32],
                scratch: &mut [u16; B],
            ) -> (&'a mut [f32], bool) {
                Self::load(bytes, buf, scratch);
                (buf, true)
            }
            #[inline(always)]
            fn view_out<'a>(_bytes: &'a mut [u8], buf: &'a mut [f32]) -> (&'a mut [f32], bool) {
                (buf, true)
            }
        }
    };
}

half_source!(F16Src, DataType::F16, F16Fmt, 65504.0);
// bf16::MAX as f32 (bits 0x7f7f0000; checked by a test).
half_source!(Bf16Src, DataType::BF16, Bf16Fmt, 3.389_531_4e38);

macro_rules! wide_source {
    ($name:ident, $dt:expr, $t:ty, $size:expr) => {
        impl Source for $name {
            type C = $t;
            const SIZE: usize = $size;
            const DTYPE: DataType = $dt;
            const MAX: $t = <$t>::MAX;
            #[inline(always)]
            fn load(bytes: &[u8], out: &mut [$t], _scratch: &mut [u16; B]) {
                bytemuck::cast_slice_mut::<$t, u8>(out).copy_from_slice(bytes);
            }
            #[inline(always)]
            fn to_bytes<'a>(ys: &'a [$t], _scratch: &'a mut [u16; B]) -> &'a [u8] {
                bytemuck::cast_slice::<$t, u8>(ys)
            }
            #[inline(always)]
            fn view<'a>(bytes: &'a [u8], buf: &'a mut [$t], _scratch: &mut [u16; B]) -> &'a [$t] {
                if aligned_for::<$t>(bytes) {
                    return bytemuck::cast_slice(bytes);
                }
                bytemuck::cast_slice_mut::<$t, u8>(buf).copy_from_slice(bytes);
                buf
            }
            #[inline(always)]
            fn view_mut<'a>(
                bytes: &'a mut [u8],
                buf: &'a mut [$t],
                _scratch: &mut [u16; B],
            ) -> (&'a mut [$t], bool) {
                if aligned_for::<$t>(bytes) {
                    return (bytemuck::cast_slice_mut(bytes), false);
                }
                bytemuck::cast_slice_mut::<$t, u8>(buf).copy_from_slice(bytes);
                (buf, true)
            }
            #[inline(always)]
            fn view_out<'a>(bytes: &'a mut [u8], buf: &'a mut [$t]) -> (&'a mut [$t], bool) {
                if aligned_for::<$t>(bytes) {
                    return (bytemuck::cast_slice_mut(bytes), false);
                }
                (buf, true)
            }
        }
    };
}

wide_source!(F32Src, DataType::F32, f32, 4);
wide_source!(F64Src, DataType::F64, f64, 8);

// ---------------------------------------------------------------------------
// Code types
// ---------------------------------------------------------------------------

/// Storage of one code (8 or 16 bits, little-endian on the wire).
trait Code: Pod + Zeroable {
    const QMAX: u32;
    fn from_u32(u: u32) -> Self;
    fn to_u32(self) -> u32;
    /// Copies codes to the payload (little-endian).
    fn write_payload(cs: &[Self], payload: &mut [u8]);
    /// Reads codes from the payload (little-endian).
    fn read_payload(payload: &[u8], cs: &mut [Self]);
    /// The codes of `payload`: the payload itself when it can be viewed as
    /// `[Self]` (aligned), else read into `buf`.
    #[inline(always)]
    fn view<'a>(payload: &'a [u8], buf: &'a mut [Self]) -> &'a [Self] {
        if aligned_for::<Self>(payload) {
            return bytemuck::cast_slice(payload);
        }
        Self::read_payload(payload, buf);
        buf
    }
    /// Where to write the codes for `payload`: the payload itself when
    /// aligned, else `buf` (`true`: copy to the payload with `write_payload`).
    #[inline(always)]
    fn view_out<'a>(payload: &'a mut [u8], buf: &'a mut [Self]) -> (&'a mut [Self], bool) {
        if aligned_for::<Self>(payload) {
            return (bytemuck::cast_slice_mut(payload), false);
        }
        (buf, true)
    }
}

impl Code for u8 {
    const QMAX: u32 = 0xff;
    #[inline(always)]
    fn from_u32(u: u32) -> Self {
        u as u8
    }
    #[inline(always)]
    fn to_u32(self) -> u32 {
        self as u32
    }
    fn write_payload(cs: &[Self], payload: &mut [u8]) {
        payload.copy_from_slice(cs);
    }
    fn read_payload(payload: &[u8], cs: &mut [Self]) {
        cs.copy_from_slice(payload);
    }
}

impl Code for u16 {
    const QMAX: u32 = 0xffff;
    #[inline(always)]
    fn from_u32(u: u32) -> Self {
        // Native order in memory, little-endian on the wire (no-op on LE hosts).
        (u as u16).to_le()
    }
    #[inline(always)]
    fn to_u32(self) -> u32 {
        u16::from_le(self) as u32
    }
    fn write_payload(cs: &[Self], payload: &mut [u8]) {
        payload.copy_from_slice(bytemuck::cast_slice(cs));
    }
    fn read_payload(payload: &[u8], cs: &mut [Self]) {
        bytemuck::cast_slice_mut::<u16, u8>(cs).copy_from_slice(payload);
    }
}

// ---------------------------------------------------------------------------
// Block analysis and encoding
// ---------------------------------------------------------------------------

/// Minimum, maximum, and whether every element is finite.
#[inline(always)]
fn block_stats<C: QFloat>(xs: &[C]) -> (C, C, bool) {
    C::stats(xs)
}

/// `(hi - lo) / qmax`, without overflowing when `hi - lo` does. Shared by the
/// encoder and the decoder, so both use the same step bit for bit.
#[inline(always)]
fn minmax_step<C: QFloat>(lo: C, hi: C, qmax: C) -> C {
    let r = hi - lo;
    if r.is_finite() {
        r / qmax
    } else {
        hi / qmax - lo / qmax
    }
}

#[inline(always)]
fn clamp_round<C: QFloat>(t: C, qmax: C) -> u32 {
    let t = if t > C::ZERO { t } else { C::ZERO };
    let t = if t < qmax { t } else { qmax };
    t.round_code()
}

#[inline(always)]
fn fill_codes<Q: Code>(cs: &mut [Q], stored: u32) {
    let v = Q::from_u32(stored);
    for c in cs.iter_mut() {
        *c = v;
    }
}

/// A block being encoded: read-only (`&[C]`, [`quantize`]) or adopting
/// (`&mut [C]`, [`quantize_adopt`]: each value is replaced by the decoding
/// of its code, computed right after the code is chosen).
trait EncBlock<C: QFloat> {
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
fn minmax_code<C: QFloat>(x: C, lo: C, hi: C, qmax: C, scale: impl Fn(C) -> C) -> u32 {
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
fn encode_block<C: QFloat, Q: Code, X: EncBlock<C>>(
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
fn clamp_abs<C: QFloat>(v: C, cap: C) -> C {
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
fn decode_minmax_one<C: QFloat>(
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
fn decode_zps_one<C: QFloat>(u: i32, scale: C, zp: C, cap: C) -> C {
    clamp_abs((C::from_i32(u) - zp) * scale, cap)
}

/// Decodes one block's codes into `ys` given its metadata; results are
/// clamped to `[-cap, cap]` (the source type's finite range).
#[inline(always)]
fn decode_block<C: QFloat, Q: Code>(
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
enum Decoder<C> {
    MinMax { lo: C, hi: C, step: C },
    Zps { scale: C, zp: C },
}

impl<C: QFloat> Decoder<C> {
    /// The decoder of a block with finite metadata `(m0, m1)`.
    #[inline(always)]
    fn new<Q: Code>(algo: QuantizationAlgorithm, m0: C, m1: C) -> Self {
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
unsafe fn simd_decode_prefix<C: QFloat, Q: Code>(
    dec: &Decoder<C>,
    cap: C,
    mask: u32,
    cs: &[Q],
    acc: *const C,
    ys: *mut C,
) -> usize {
    #[cfg(test)]
    if tests::NO_SIMD.with(|c| c.get()) {
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
enum Kern<C> {
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
unsafe fn simd_prefix<C: QFloat, Q: Code>(
    kern: Option<Kern<C>>,
    cap: C,
    mask: u32,
    xs: *const C,
    ys: *mut C,
    cs: &mut [Q],
) -> usize {
    #[cfg(test)]
    if tests::NO_SIMD.with(|c| c.get()) {
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// A block's encoder or decoder in `f32` (see [`super::Kern`],
    /// [`super::Decoder`]): MinMax uses `a = lo`, `b = hi`, `d = step`;
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

    /// See [`super::simd_prefix`]; returns how many elements were done.
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

    /// See [`super::simd_decode_prefix`]; returns how many elements were done.
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
        let r = _mm256_add_ps(t, _mm256_set1_ps(<f32 as super::QFloat>::MAGIC));
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

/// Splits the next block (`m` elements) off `rest`: its metadata and payload.
#[inline(always)]
fn take_block_mut<'a, C: QFloat, Q: Code>(
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
fn take_block<'a, C: QFloat, Q: Code>(rest: &mut &'a [u8], m: usize) -> (C, C, &'a [u8]) {
    let ml = 2 * C::BYTES;
    let (blk, tail) = rest.split_at(ml + m * size_of::<Q>());
    *rest = tail;
    let (meta, payload) = blk.split_at(ml);
    let m0 = C::read_le(&meta[..C::BYTES]);
    let m1 = C::read_le(&meta[C::BYTES..]);
    (m0, m1, payload)
}

#[inline(always)]
fn write_meta<C: QFloat>(meta: &mut [u8], m0: C, m1: C) {
    m0.write_le(&mut meta[..C::BYTES]);
    m1.write_le(&mut meta[C::BYTES..]);
}

#[inline(always)]
fn quantize_portable<S: Source, Q: Code>(
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
fn quantize_adopt_portable<S: Source, Q: Code>(
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
fn dequantize_portable<S: Source, Q: Code>(
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
fn dequantize_from_portable<S: Source, Q: Code>(
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

#[cfg(test)]
mod tests {
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

    fn roundtrip(
        s: DataType,
        q: DataType,
        a: QuantizationAlgorithm,
        src: &[u8],
    ) -> (Vec<u8>, Vec<u8>) {
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
                    6 if i == special => {
                        (f64::INFINITY * (1 - 2 * (r.next() & 1) as i64) as f64, None)
                    }
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
            (F32, U32, mm, 0, 0),
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
            let r =
                dequantize_reduce_from(s, U8, mm, op, &a[acut..], &enc[ecut..], &mut dst[dcut..]);
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
                        let expect = s.is_float()
                            && CODES.contains(&q)
                            && q.size() < s.size()
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
        // f16, bf16: u8, i8; f32, f64: u8, i8, u16, i16 -> 12 x 2 algos x 4 ops.
        assert_eq!(accepted, 12 * 2 * 4);
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
        assert!(quantize(F32, U32, mm, &src, &mut out).is_err());
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
}
