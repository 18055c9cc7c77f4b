//! The element types of a quantized buffer: the compute type blocks are
//! analysed in (`QFloat`: `f32`, `f64`), the source types it widens from and
//! rounds back to (`Source`: `f16`, `bf16`, `f32`, `f64`) and the code types
//! (`Code`: 8- or 16-bit, little-endian on the wire).
//!
//! Leaf of `quant`: imports only `crate::kernels` (the half-float formats),
//! `crate::types` and `bytemuck`, nothing from its sibling modules.

use super::B;
use crate::kernels::{Bf16Fmt, F16Fmt, HalfFmt};
use crate::types::DataType;
use bytemuck::{Pod, Zeroable};
use std::ops::{Add, Div, Mul, Neg, Sub};

// ---------------------------------------------------------------------------
// Compute type
// ---------------------------------------------------------------------------

/// The float type blocks are analysed, encoded and decoded in.
pub(super) trait QFloat:
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
pub(super) trait Source {
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
pub(super) fn aligned_for<T>(bytes: &[u8]) -> bool {
    (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
}

pub(super) struct F16Src;
pub(super) struct Bf16Src;
pub(super) struct F32Src;
pub(super) struct F64Src;

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
pub(super) trait Code: Pod + Zeroable {
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
