//! Deterministic test data and exact verification.
//!
//! Every peer fills its send buffer from (rank, size, slot) with small
//! integers, so each peer can compute the exact expected result of the whole
//! all-reduce by itself: sums, products, maxima and minima of small integers
//! are exact in every data type (floats included) as long as they stay below
//! the type's exact-integer limit, which [`Workload::new`] checks for the
//! world size. The reduction order of the ring therefore cannot change the
//! result, and verification is a byte comparison. `Avg` applies the library's
//! own documented final division ([`pccl_core::kernels::finalize_avg`]) to the
//! exact sum.
//!
//! Concurrent all-reduces (slot `k`) use the data of rank `(r + k) mod N`:
//! every op carries different bytes per peer, but the multiset over peers —
//! hence the expected result — is the same, so one expected buffer serves all
//! slots.
//!
//! Quantized all-reduces cannot be exact; they are checked against the exact
//! result with the error bound of `docs/quantization.md` (worst case,
//! correlated inputs) and for bit-parity across peers (via a hash the
//! launcher compares).

use pccl_core::{kernels, DataType, QuantizationAlgorithm, ReduceOp};

use super::Result;

/// What is reduced and how; fixes the value ranges.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub dtype: DataType,
    pub op: ReduceOp,
    pub world: u32,
    pub quant: Option<(DataType, QuantizationAlgorithm)>,
    /// Value kind per element (see [`Workload::value`]).
    kind: Kind,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Uniform integers in `lo..lo+span`.
    Range { lo: i64, span: u64 },
    /// Factors in {1,2} (unsigned) or {-2,-1,1,2}; `small` keeps {1} / {-1,1}.
    Factors { signed: bool, small: bool },
}

/// Largest integer magnitude every partial result may reach exactly.
fn exact_limit(d: DataType) -> u64 {
    match d {
        DataType::U8 => 255,
        DataType::I8 => 127,
        DataType::U16 => 65_535,
        DataType::I16 => 32_767,
        DataType::U32 => u32::MAX as u64,
        DataType::I32 => i32::MAX as u64,
        DataType::U64 | DataType::I64 => i64::MAX as u64,
        DataType::F16 => 2048,
        DataType::BF16 => 256,
        DataType::F32 => 1 << 24,
        DataType::F64 => 1 << 53,
    }
}

fn is_unsigned(d: DataType) -> bool {
    matches!(
        d,
        DataType::U8 | DataType::U16 | DataType::U32 | DataType::U64
    )
}

impl Workload {
    /// Chooses value ranges so that every result is exact for `world` peers.
    pub fn new(
        dtype: DataType,
        op: ReduceOp,
        world: u32,
        quant: Option<(DataType, QuantizationAlgorithm)>,
    ) -> Result<Self> {
        let world = world.max(1);
        let lim = exact_limit(dtype);
        let w = world as u64;
        let unsigned = is_unsigned(dtype);
        let kind = match op {
            ReduceOp::Sum | ReduceOp::Avg => {
                // |sum| <= amplitude * world must stay exact.
                let a = if unsigned {
                    (lim / w).div_ceil(2)
                } else {
                    lim / w
                }
                .min(8);
                if a == 0 {
                    return Err(format!(
                        "{} peers are too many for an exact {} sum; use a wider --dtype",
                        world,
                        dtype.name()
                    )
                    .into());
                }
                if unsigned {
                    Kind::Range { lo: 0, span: 2 * a }
                } else {
                    Kind::Range {
                        lo: -(a as i64),
                        span: 2 * a,
                    }
                }
            }
            ReduceOp::Prod => Kind::Factors {
                signed: !unsigned,
                small: world >= 63 || (1u64 << world) > lim,
            },
            ReduceOp::Max | ReduceOp::Min => {
                if unsigned {
                    Kind::Range { lo: 0, span: 100 }
                } else {
                    Kind::Range { lo: -50, span: 100 }
                }
            }
        };
        Ok(Workload {
            dtype,
            op,
            world,
            quant,
            kind,
        })
    }

    /// The integer value of element `i` at rank `rank` for a buffer of `seed`.
    #[inline]
    pub fn value(&self, rank: u32, i: usize, seed: u64) -> i64 {
        let mut x = (i as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add((rank as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9))
            .wrapping_add(seed.wrapping_mul(0x94D0_49BB_1331_11EB));
        x ^= x >> 31;
        x = x.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        let h = x >> 32;
        match self.kind {
            Kind::Range { lo, span } => lo + (h % span) as i64,
            Kind::Factors { signed, small } => match (signed, small) {
                (false, true) => 1,
                (false, false) => 1 + (h & 1) as i64,
                (true, true) => {
                    if h & 1 == 0 {
                        1
                    } else {
                        -1
                    }
                }
                (true, false) => [-2, -1, 1, 2][(h & 3) as usize],
            },
        }
    }

    /// Fills `buf` with the data of `rank` for a buffer of `seed`.
    pub fn fill(&self, buf: &mut [u8], rank: u32, seed: u64) {
        write_elems(self.dtype, buf, |i| self.value(rank, i, seed));
    }

    /// The exact result of the all-reduce over ranks `0..world`.
    pub fn expected(&self, buf: &mut [u8], seed: u64) {
        let w = self.world;
        let combine = |i: usize| -> i64 {
            let mut acc = self.value(0, i, seed);
            for r in 1..w {
                let v = self.value(r, i, seed);
                acc = match self.op {
                    ReduceOp::Sum | ReduceOp::Avg => acc + v,
                    ReduceOp::Prod => acc * v,
                    ReduceOp::Max => acc.max(v),
                    ReduceOp::Min => acc.min(v),
                };
            }
            acc
        };
        write_elems(self.dtype, buf, combine);
        if self.op == ReduceOp::Avg {
            kernels::finalize_avg(self.dtype, buf, w);
        }
    }

    /// Worst-case absolute error of a quantized all-reduce for this data
    /// (`docs/quantization.md`, correlated inputs), with a 2x margin.
    pub fn quant_tolerance(&self) -> f64 {
        let Some((q, _)) = self.quant else {
            return 0.0;
        };
        let qmax = ((1u64 << (8 * q.size())) - 1) as f64;
        let (range, mag) = match self.kind {
            Kind::Range { lo, span } => ((span - 1) as f64, (lo.unsigned_abs() + span) as f64),
            Kind::Factors { .. } => (4.0, 2.0),
        };
        let w = self.world as f64;
        let steps = match self.op {
            ReduceOp::Sum | ReduceOp::Avg => range * w * (w + 1.0) / (4.0 * qmax),
            _ => w * range / (2.0 * qmax),
        };
        // Rounding of each partial result to the source type (f16/bf16 matter).
        let rel = match self.dtype {
            DataType::F16 => 1.0 / 2048.0,
            DataType::BF16 => 1.0 / 256.0,
            DataType::F32 => 1.0 / 16_777_216.0,
            _ => 1e-15,
        };
        let round = w * mag * w * rel;
        let avg_div = if self.op == ReduceOp::Avg {
            1.0 / w
        } else {
            1.0
        };
        2.0 * (steps + round) * avg_div + 1e-12
    }
}

/// Writes `f(i)` as element `i` of `buf`, for every whole element.
fn write_elems(dtype: DataType, buf: &mut [u8], f: impl Fn(usize) -> i64) {
    macro_rules! ints {
        ($t:ty) => {{
            const S: usize = std::mem::size_of::<$t>();
            for (i, c) in buf.chunks_exact_mut(S).enumerate() {
                c.copy_from_slice(&(f(i) as $t).to_ne_bytes());
            }
        }};
    }
    match dtype {
        DataType::U8 => ints!(u8),
        DataType::I8 => ints!(i8),
        DataType::U16 => ints!(u16),
        DataType::I16 => ints!(i16),
        DataType::U32 => ints!(u32),
        DataType::I32 => ints!(i32),
        DataType::U64 => ints!(u64),
        DataType::I64 => ints!(i64),
        DataType::F32 => {
            for (i, c) in buf.chunks_exact_mut(4).enumerate() {
                c.copy_from_slice(&(f(i) as f32).to_ne_bytes());
            }
        }
        DataType::F64 => {
            for (i, c) in buf.chunks_exact_mut(8).enumerate() {
                c.copy_from_slice(&(f(i) as f64).to_ne_bytes());
            }
        }
        DataType::F16 => {
            for (i, c) in buf.chunks_exact_mut(2).enumerate() {
                c.copy_from_slice(&kernels::f32_to_f16_bits(f(i) as f32).to_ne_bytes());
            }
        }
        DataType::BF16 => {
            for (i, c) in buf.chunks_exact_mut(2).enumerate() {
                c.copy_from_slice(&kernels::f32_to_bf16_bits(f(i) as f32).to_ne_bytes());
            }
        }
    }
}

/// Element `i` of a float buffer as `f64` (NaN for non-float types).
fn read_float(dtype: DataType, buf: &[u8], i: usize) -> f64 {
    let s = dtype.size();
    let b = &buf[i * s..(i + 1) * s];
    match dtype {
        DataType::F32 => f32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as f64,
        DataType::F64 => f64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        DataType::F16 => kernels::f16_bits_to_f32(u16::from_ne_bytes([b[0], b[1]])) as f64,
        DataType::BF16 => kernels::bf16_bits_to_f32(u16::from_ne_bytes([b[0], b[1]])) as f64,
        _ => f64::NAN,
    }
}

/// Outcome of checking one result buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Check {
    /// Elements that differ from the expected value (beyond the tolerance
    /// for quantized ops).
    pub wrong: u64,
    /// Largest absolute error (quantized ops; 0 for exact ones that match).
    pub max_err: f64,
}

/// Compares `got` with `expected`: byte equality for exact ops, the error
/// bound `tol` for quantized ones.
pub fn check(dtype: DataType, quantized: bool, tol: f64, got: &[u8], expected: &[u8]) -> Check {
    let s = dtype.size();
    if got.len() != expected.len() {
        return Check {
            wrong: (expected.len() / s) as u64,
            max_err: f64::INFINITY,
        };
    }
    if !quantized {
        if got == expected {
            return Check::default();
        }
        let wrong = got
            .chunks_exact(s)
            .zip(expected.chunks_exact(s))
            .filter(|(a, b)| a != b)
            .count() as u64;
        return Check {
            wrong,
            max_err: f64::NAN,
        };
    }
    let mut c = Check::default();
    for i in 0..got.len() / s {
        let a = read_float(dtype, got, i);
        let b = read_float(dtype, expected, i);
        let e = (a - b).abs();
        if e.is_nan() || e > tol {
            c.wrong += 1;
        }
        if e.is_nan() || e > c.max_err {
            c.max_err = e;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reduces the per-rank buffers with the library kernel and compares.
    fn kernel_matches(dtype: DataType, op: ReduceOp, world: u32) {
        let w = Workload::new(dtype, op, world, None).unwrap();
        let n = 4099 * dtype.size();
        let mut acc = vec![0u8; n];
        w.fill(&mut acc, 0, 7);
        for r in 1..world {
            let mut b = vec![0u8; n];
            w.fill(&mut b, r, 7);
            kernels::reduce_into(dtype, op, &mut acc, &b);
        }
        if op == ReduceOp::Avg {
            kernels::finalize_avg(dtype, &mut acc, world);
        }
        let mut exp = vec![0u8; n];
        w.expected(&mut exp, 7);
        assert_eq!(
            check(dtype, false, 0.0, &acc, &exp).wrong,
            0,
            "{dtype:?} {op:?} {world}"
        );
    }

    #[test]
    fn expected_is_exact_for_every_type_and_op() {
        for d in DataType::ALL {
            for op in ReduceOp::ALL {
                for world in [1, 2, 3, 4, 7] {
                    kernel_matches(d, op, world);
                }
            }
        }
    }

    #[test]
    fn data_differs_between_ranks() {
        let w = Workload::new(DataType::F32, ReduceOp::Sum, 2, None).unwrap();
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        w.fill(&mut a, 0, 1);
        w.fill(&mut b, 1, 1);
        assert_ne!(a, b);
    }

    #[test]
    fn too_many_peers_for_u8_sum() {
        assert!(Workload::new(DataType::U8, ReduceOp::Sum, 300, None).is_err());
    }

    #[test]
    fn check_counts_wrong_elements() {
        let e = vec![0u8; 16];
        let mut g = e.clone();
        g[5] = 1;
        assert_eq!(check(DataType::F32, false, 0.0, &g, &e).wrong, 1);
    }
}
