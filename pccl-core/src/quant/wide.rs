//! MinMax with 32- and 64-bit codes (`u32`, `u64`) from `f32` / `f64`
//! sources: the combinations PCCL 1.0 accepts beyond the 8/16-bit ones.
//!
//! Scalar only. Same block layout as the narrow codes (metadata `lo`, `hi`
//! in the source's compute type — `f32` for `f32`, `f64` for `f64` — then
//! one little-endian code per element), but every block is analysed,
//! encoded and decoded in `f64`, whatever the source:
//!
//! * `u32`: `qmax = 2^32 − 1`;
//! * `u64`: `qmax = 2^53 − 1`. An `f64` cannot tell more codes apart (its
//!   significand has 53 bits), so the codes stay below 2^53; on decode a
//!   stored value above `qmax` is read as `qmax`.
//!
//! With `step = minmax_step(lo, hi, qmax)` (in `f64`) and `h = qmax / 2`, a
//! code decodes to `lo + u·step` (`u ≤ h`) or `hi − (qmax − u)·step`
//! (`u > h`), `u = 0` → `lo` and `u = qmax` → `hi` exactly, clamped to the
//! source type's finite range, then rounded to the source type (`f32`:
//! nearest-even). Plain IEEE-754 operations on finite values only, so
//! every peer decodes the same bytes to the same bits. Non-finite blocks
//! are handled as for the narrow codes (canonical-NaN metadata, codes 0,
//! every element decodes to the canonical NaN).

use super::element::QFloat;
use super::scalar::minmax_step;
use super::B;
use crate::types::{DataType, ReduceOp};

/// A source type of the wide codes (`f32` or `f64`).
pub(super) trait WSrc {
    const SIZE: usize;
    const DTYPE: DataType;
    /// Largest finite value, as `f64`.
    const CAP: f64;
    /// Loads the element at the start of `b` (native order) as `f64`.
    fn load(b: &[u8]) -> f64;
    /// Rounds `v` to the source type and stores it (native order).
    fn store(v: f64, out: &mut [u8]);
    /// Stores the canonical quiet NaN (native order).
    fn store_nan(out: &mut [u8]);
    /// Reads one metadata value (little-endian, source width).
    fn read_meta(b: &[u8]) -> f64;
    /// Writes one metadata value (exact in the source type) or the
    /// canonical NaN (little-endian).
    fn write_meta(v: f64, out: &mut [u8]);
}

impl WSrc for f32 {
    const SIZE: usize = 4;
    const DTYPE: DataType = DataType::F32;
    const CAP: f64 = f32::MAX as f64;
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        f32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as f64
    }
    #[inline(always)]
    fn store(v: f64, out: &mut [u8]) {
        out[..4].copy_from_slice(&(v as f32).to_ne_bytes());
    }
    fn store_nan(out: &mut [u8]) {
        out[..4].copy_from_slice(&f32::from_bits(0x7fc0_0000).to_ne_bytes());
    }
    fn read_meta(b: &[u8]) -> f64 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64
    }
    fn write_meta(v: f64, out: &mut [u8]) {
        let bits = if v.is_nan() {
            0x7fc0_0000
        } else {
            (v as f32).to_bits()
        };
        out[..4].copy_from_slice(&bits.to_le_bytes());
    }
}

impl WSrc for f64 {
    const SIZE: usize = 8;
    const DTYPE: DataType = DataType::F64;
    const CAP: f64 = f64::MAX;
    #[inline(always)]
    fn load(b: &[u8]) -> f64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        f64::from_ne_bytes(a)
    }
    #[inline(always)]
    fn store(v: f64, out: &mut [u8]) {
        out[..8].copy_from_slice(&v.to_ne_bytes());
    }
    fn store_nan(out: &mut [u8]) {
        out[..8].copy_from_slice(&f64::from_bits(0x7ff8_0000_0000_0000).to_ne_bytes());
    }
    fn read_meta(b: &[u8]) -> f64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        f64::from_le_bytes(a)
    }
    fn write_meta(v: f64, out: &mut [u8]) {
        let bits = if v.is_nan() {
            0x7ff8_0000_0000_0000
        } else {
            v.to_bits()
        };
        out[..8].copy_from_slice(&bits.to_le_bytes());
    }
}

/// A wide code type (`u32` or `u64`), little-endian on the wire.
pub(super) trait WCode {
    const SIZE: usize;
    /// Largest code used (and decoded).
    const QMAX: u64;
    fn read(b: &[u8]) -> u64;
    fn write(u: u64, out: &mut [u8]);
}

pub(super) struct W32;
pub(super) struct W64;

impl WCode for W32 {
    const SIZE: usize = 4;
    const QMAX: u64 = u32::MAX as u64;
    #[inline(always)]
    fn read(b: &[u8]) -> u64 {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64
    }
    #[inline(always)]
    fn write(u: u64, out: &mut [u8]) {
        out[..4].copy_from_slice(&(u as u32).to_le_bytes());
    }
}

impl WCode for W64 {
    const SIZE: usize = 8;
    const QMAX: u64 = (1 << 53) - 1;
    #[inline(always)]
    fn read(b: &[u8]) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        u64::from_le_bytes(a)
    }
    #[inline(always)]
    fn write(u: u64, out: &mut [u8]) {
        out[..8].copy_from_slice(&u.to_le_bytes());
    }
}

/// The decoder of one block with finite metadata.
#[derive(Clone, Copy)]
struct Block {
    lo: f64,
    hi: f64,
    step: f64,
    qmax: u64,
}

impl Block {
    #[inline(always)]
    fn new(lo: f64, hi: f64, qmax: u64) -> Self {
        Block {
            lo,
            hi,
            step: minmax_step(lo, hi, qmax as f64),
            qmax,
        }
    }

    /// The code of `x` (finite, in `[lo, hi]`): measured from the nearer
    /// end, rounded to nearest (ties to even) and clamped to `0..=qmax`.
    #[inline(always)]
    fn encode(&self, x: f64) -> u64 {
        let (dl, dh) = (x - self.lo, self.hi - x);
        let qmax = self.qmax as f64;
        if self.step == 0.0 {
            return if dl <= dh { 0 } else { self.qmax };
        }
        let t = if dl <= dh {
            dl / self.step
        } else {
            qmax - dh / self.step
        };
        let t = if t > 0.0 { t } else { 0.0 };
        let t = if t < qmax { t } else { qmax };
        t.round_ties_even() as u64
    }

    /// The value of code `u` (any `u`; above `qmax` reads as `qmax`),
    /// clamped to `[-cap, cap]`.
    #[inline(always)]
    fn decode(&self, u: u64, cap: f64) -> f64 {
        let u = u.min(self.qmax);
        let v = if u <= self.qmax / 2 {
            if u == 0 {
                self.lo
            } else {
                self.lo + u as f64 * self.step
            }
        } else if u == self.qmax {
            self.hi
        } else {
            self.hi - (self.qmax - u) as f64 * self.step
        };
        let v = if v < -cap { -cap } else { v };
        if v > cap {
            cap
        } else {
            v
        }
    }
}

/// Bytes of one encoded block of `m` elements.
#[inline(always)]
fn block_len<S: WSrc, Q: WCode>(m: usize) -> usize {
    2 * S::SIZE + m * Q::SIZE
}

/// Encodes the elements of `data` into `out` (exactly `encoded_len` bytes);
/// with `adopt`, also overwrites `data` with what the encoding decodes to.
fn encode<S: WSrc, Q: WCode>(data: &mut [u8], out: &mut [u8], adopt: bool) {
    let mut xs = [0f64; B];
    let mut rest: &mut [u8] = out;
    for chunk in data.chunks_mut(B * S::SIZE) {
        let m = chunk.len() / S::SIZE;
        let (blk, tail) = std::mem::take(&mut rest).split_at_mut(block_len::<S, Q>(m));
        rest = tail;
        let (meta, codes) = blk.split_at_mut(2 * S::SIZE);
        for (x, b) in xs.iter_mut().zip(chunk.chunks_exact(S::SIZE)) {
            *x = S::load(b);
        }
        let (lo, hi, finite) = <f64 as QFloat>::stats(&xs[..m]);
        if !finite {
            S::write_meta(f64::NAN, &mut meta[..S::SIZE]);
            S::write_meta(f64::NAN, &mut meta[S::SIZE..]);
            codes.fill(0);
            if adopt {
                for b in chunk.chunks_exact_mut(S::SIZE) {
                    S::store_nan(b);
                }
            }
            continue;
        }
        S::write_meta(lo, &mut meta[..S::SIZE]);
        S::write_meta(hi, &mut meta[S::SIZE..]);
        let blk = Block::new(lo, hi, Q::QMAX);
        for (i, c) in codes.chunks_exact_mut(Q::SIZE).enumerate() {
            let u = blk.encode(xs[i]);
            Q::write(u, c);
            if adopt {
                S::store(
                    blk.decode(u, S::CAP),
                    &mut chunk[i * S::SIZE..(i + 1) * S::SIZE],
                );
            }
        }
    }
}

/// Decodes the next block of `m` elements off `rest` into `ys` (source
/// bytes, native order, `m * S::SIZE` long).
#[inline(always)]
fn decode_block<S: WSrc, Q: WCode>(rest: &mut &[u8], m: usize, ys: &mut [u8]) {
    let (blk, tail) = rest.split_at(block_len::<S, Q>(m));
    *rest = tail;
    let (meta, codes) = blk.split_at(2 * S::SIZE);
    let (lo, hi) = (
        S::read_meta(&meta[..S::SIZE]),
        S::read_meta(&meta[S::SIZE..]),
    );
    if !(lo.is_finite() && hi.is_finite()) {
        for y in ys.chunks_exact_mut(S::SIZE) {
            S::store_nan(y);
        }
        return;
    }
    let blk = Block::new(lo, hi, Q::QMAX);
    for (c, y) in codes
        .chunks_exact(Q::SIZE)
        .zip(ys.chunks_exact_mut(S::SIZE))
    {
        S::store(blk.decode(Q::read(c), S::CAP), y);
    }
}

fn quantize_typed<S: WSrc, Q: WCode>(src: &[u8], out: &mut [u8]) {
    // Read-only: encode each source block from a copy.
    let mut buf = [0u8; B * 8];
    let mut rest: &mut [u8] = out;
    for chunk in src.chunks(B * S::SIZE) {
        let m = chunk.len() / S::SIZE;
        let (blk, tail) = std::mem::take(&mut rest).split_at_mut(block_len::<S, Q>(m));
        rest = tail;
        let tmp = &mut buf[..chunk.len()];
        tmp.copy_from_slice(chunk);
        encode::<S, Q>(tmp, blk, false);
    }
}

fn dequantize_typed<S: WSrc, Q: WCode>(op: Option<ReduceOp>, enc: &[u8], dst: &mut [u8]) {
    let mut buf = [0u8; B * 8];
    let mut rest = enc;
    for dchunk in dst.chunks_mut(B * S::SIZE) {
        let m = dchunk.len() / S::SIZE;
        match op {
            None => decode_block::<S, Q>(&mut rest, m, dchunk),
            Some(op) => {
                let ys = &mut buf[..dchunk.len()];
                decode_block::<S, Q>(&mut rest, m, ys);
                crate::kernels::reduce_into(S::DTYPE, op, dchunk, ys);
            }
        }
    }
}

fn dequantize_from_typed<S: WSrc, Q: WCode>(op: ReduceOp, a: &[u8], enc: &[u8], dst: &mut [u8]) {
    let mut buf = [0u8; B * 8];
    let mut rest = enc;
    for (dchunk, achunk) in dst.chunks_mut(B * S::SIZE).zip(a.chunks(B * S::SIZE)) {
        let m = dchunk.len() / S::SIZE;
        let ys = &mut buf[..dchunk.len()];
        decode_block::<S, Q>(&mut rest, m, ys);
        crate::kernels::reduce_from(S::DTYPE, op, dchunk, achunk, ys);
    }
}

/// Calls `$f::<S, Q>(args)` for the (source, code) pair; the caller has
/// validated it (`f32`/`f64` × `u32`/`u64`).
macro_rules! by_wide_types {
    ($src:expr, $q:expr, $f:ident($($arg:expr),*)) => {
        match ($src, $q) {
            (DataType::F32, DataType::U32) => $f::<f32, W32>($($arg),*),
            (DataType::F32, _) => $f::<f32, W64>($($arg),*),
            (_, DataType::U32) => $f::<f64, W32>($($arg),*),
            _ => $f::<f64, W64>($($arg),*),
        }
    };
}

/// Whether `q` is a wide code type (handled by this module).
pub(super) fn is_wide(q: DataType) -> bool {
    matches!(q, DataType::U32 | DataType::U64)
}

/// [`super::quantize`] for a validated wide combination and checked lengths.
pub(super) fn quantize(src_dtype: DataType, q: DataType, src: &[u8], out: &mut [u8]) {
    by_wide_types!(src_dtype, q, quantize_typed(src, out))
}

/// [`super::quantize_adopt`] for a validated wide combination.
pub(super) fn quantize_adopt(src_dtype: DataType, q: DataType, data: &mut [u8], out: &mut [u8]) {
    fn adopt<S: WSrc, Q: WCode>(data: &mut [u8], out: &mut [u8]) {
        encode::<S, Q>(data, out, true)
    }
    by_wide_types!(src_dtype, q, adopt(data, out))
}

/// [`super::dequantize_into`] for a validated wide combination.
pub(super) fn dequantize_into(
    src_dtype: DataType,
    q: DataType,
    op: Option<ReduceOp>,
    enc: &[u8],
    dst: &mut [u8],
) {
    by_wide_types!(src_dtype, q, dequantize_typed(op, enc, dst))
}

/// [`super::dequantize_reduce_from`] for a validated wide combination.
pub(super) fn dequantize_reduce_from(
    src_dtype: DataType,
    q: DataType,
    op: ReduceOp,
    a: &[u8],
    enc: &[u8],
    dst: &mut [u8],
) {
    by_wide_types!(src_dtype, q, dequantize_from_typed(op, a, enc, dst))
}
