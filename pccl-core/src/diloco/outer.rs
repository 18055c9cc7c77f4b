//! The pure pieces of DiLoCo, apart from any I/O: the outer optimizer, the
//! split of the parameters into streaming fragments, the streaming
//! schedule, the `diloco.meta` record that travels in the shared state, and
//! the element casts between the model's dtype and the f32 outer state.
//!
//! May import: `crate::{error, types}` only.

use half::{bf16, f16};

use crate::{DataType, Error, Result};

/// One Nesterov (or plain momentum) SGD step, PyTorch's `SGD` with
/// dampening 0: `m = μ·m + g`, `u = g + μ·m` (Nesterov) or `u = m`,
/// `θ = θ − lr·u`. Plain f32 arithmetic in a fixed order (Rust never
/// contracts it into FMAs), so equal inputs give equal bits on every peer.
pub fn outer_sgd_step(
    outer: &mut [f32],
    momentum: &mut [f32],
    grad: &[f32],
    lr: f32,
    mu: f32,
    nesterov: bool,
) {
    for ((p, m), &g) in outer.iter_mut().zip(momentum.iter_mut()).zip(grad) {
        let m_new = mu * *m + g;
        *m = m_new;
        let update = if nesterov { g + mu * m_new } else { m_new };
        *p -= lr * update;
    }
}

/// Splits parameters of the given lengths into `fragments` contiguous,
/// non-empty groups of about equal element counts (fragment f ends at the
/// first tensor that brings the running total to (f + 1)/F of all
/// elements); returns each group's parameter index range.
pub fn split_fragments(lens: &[usize], fragments: usize) -> Result<Vec<std::ops::Range<usize>>> {
    if fragments == 0 || fragments > lens.len() {
        return Err(Error::InvalidArgument(format!(
            "{fragments} fragments for {} parameter tensors: need 1 ≤ fragments ≤ tensors",
            lens.len()
        )));
    }
    let total: u128 = lens.iter().map(|&l| l as u128).sum();
    let mut out = Vec::with_capacity(fragments);
    let mut start = 0usize;
    let mut acc: u128 = 0;
    for f in 0..fragments {
        let left_frags = fragments - f;
        let last_allowed = lens.len() - (left_frags - 1); // leave one tensor per later fragment
        let target = total * (f as u128 + 1) / fragments as u128;
        let mut end = start + 1;
        acc += lens[start] as u128;
        while end < last_allowed && acc < target {
            acc += lens[end] as u128;
            end += 1;
        }
        if f == fragments - 1 {
            while end < lens.len() {
                acc += lens[end] as u128;
                end += 1;
            }
        }
        out.push(start..end);
        start = end;
    }
    Ok(out)
}

/// Inner step at which fragment `f` of `fragments` first launches: the
/// offsets `f·H/F` spread the fragments evenly over the H inner steps.
pub fn fragment_offset(f: usize, fragments: usize, sync_every: u64) -> u64 {
    (f as u128 * sync_every as u128 / fragments as u128) as u64
}

/// The shortest distance in inner steps between two consecutive fragment
/// launches (wrapping around the period H).
pub fn min_launch_gap(fragments: usize, sync_every: u64) -> u64 {
    (0..fragments)
        .map(|f| {
            let next = if f + 1 == fragments {
                sync_every
            } else {
                fragment_offset(f + 1, fragments, sync_every)
            };
            next - fragment_offset(f, fragments, sync_every)
        })
        .min()
        .unwrap_or(sync_every)
}

/// The fragment whose all-reduce launches after inner step `step` (counted
/// from 1), if any: fragment `f` launches at the steps `s > 0` with
/// `s ≡ f·H/F (mod H)`.
pub fn launching_fragment(step: u64, fragments: usize, sync_every: u64) -> Option<usize> {
    if step == 0 || sync_every == 0 {
        return None;
    }
    let phase = step % sync_every;
    (0..fragments).find(|&f| fragment_offset(f, fragments, sync_every) % sync_every == phase)
}

/// Entries of the `diloco.meta` u64 tensor of the shared state.
pub const META_LEN: usize = 12;
/// Version of the meta layout.
pub const META_FORMAT: u64 = 1;
pub const META_INNER_STEP: usize = 10;
pub const META_OUTER_STEP: usize = 11;
/// The first `META_CONFIG_LEN` entries are configuration every peer of a
/// group must share; their names, for error messages.
pub const META_CONFIG_NAMES: [&str; 10] = [
    "format",
    "mode",
    "sync_every (H)",
    "fragments (F)",
    "fragment_sync_delay (tau)",
    "fragment_update_alpha",
    "outer_lr",
    "outer_momentum",
    "nesterov",
    "quantization",
];
pub const META_CONFIG_LEN: usize = META_CONFIG_NAMES.len();

/// The name of the first configuration entry where `ours` and `theirs`
/// differ, with both values.
pub fn config_mismatch(ours: &[u64; META_LEN], theirs: &[u64; META_LEN]) -> Option<String> {
    (0..META_CONFIG_LEN)
        .find(|&i| ours[i] != theirs[i])
        .map(|i| {
            let show = |v: u64| match i {
                5..=7 => format!("{}", f32::from_bits(v as u32)),
                _ => v.to_string(),
            };
            format!(
                "this peer's {} is {} but the group's is {}",
                META_CONFIG_NAMES[i],
                show(ours[i]),
                show(theirs[i])
            )
        })
}

/// Reads element `i` of a model parameter as f32.
pub trait ModelElement: Copy + Send + Sync + 'static {
    const DTYPE: DataType;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl ModelElement for f32 {
    const DTYPE: DataType = DataType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl ModelElement for f16 {
    const DTYPE: DataType = DataType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl ModelElement for bf16 {
    const DTYPE: DataType = DataType::BF16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// `out = f32(cast(outer)) − f32(local)`: the pseudo-gradient measured from
/// the value the model was last reset to, so that rounding the f32 outer
/// state to a 16-bit model dtype does not leak into it.
pub fn pseudo_gradient<T: ModelElement>(outer: &[f32], local: &[T], out: &mut [f32]) {
    for ((o, &p), &l) in out.iter_mut().zip(outer).zip(local) {
        *o = T::from_f32(p).to_f32() - l.to_f32();
    }
}

/// `local = cast(outer)`.
pub fn reset_to<T: ModelElement>(local: &mut [T], outer: &[f32]) {
    for (l, &p) in local.iter_mut().zip(outer) {
        *l = T::from_f32(p);
    }
}

/// `local = lerp(local, outer, α) = local + α·(outer − local)` (α = 1: outer).
pub fn lerp_to<T: ModelElement>(local: &mut [T], outer: &[f32], alpha: f32) {
    if alpha == 1.0 {
        return reset_to(local, outer);
    }
    for (l, &p) in local.iter_mut().zip(outer) {
        let lv = l.to_f32();
        *l = T::from_f32(lv + alpha * (p - lv));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgd_step_matches_pytorch_formulas() {
        let mut p = vec![1.0f32, -2.0];
        let mut m = vec![0.5f32, 0.0];
        let g = [0.25f32, 1.0];
        outer_sgd_step(&mut p, &mut m, &g, 0.7, 0.9, true);
        // m = 0.9·0.5 + 0.25 = 0.7; u = 0.25 + 0.9·0.7 = 0.88; p = 1 − 0.7·0.88
        assert_eq!(m[0], 0.9f32 * 0.5 + 0.25);
        assert_eq!(p[0], 1.0f32 - 0.7 * (0.25f32 + 0.9 * (0.9f32 * 0.5 + 0.25)));
        assert_eq!(m[1], 1.0);
        assert_eq!(p[1], -2.0f32 - 0.7 * (1.0f32 + 0.9));
        let mut p2 = vec![1.0f32];
        let mut m2 = vec![0.5f32];
        outer_sgd_step(&mut p2, &mut m2, &[0.25], 0.7, 0.9, false);
        assert_eq!(p2[0], 1.0f32 - 0.7 * (0.9f32 * 0.5 + 0.25));
    }

    #[test]
    fn fragments_are_contiguous_balanced_and_non_empty() {
        let lens = [100, 1, 1, 100, 50, 50];
        for f in 1..=lens.len() {
            let r = split_fragments(&lens, f).unwrap();
            assert_eq!(r.len(), f);
            assert_eq!(r[0].start, 0);
            assert_eq!(r[f - 1].end, lens.len());
            for w in r.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            assert!(r.iter().all(|x| !x.is_empty()));
        }
        // A fragment ends at the first tensor that brings it to its share.
        let r = split_fragments(&lens, 2).unwrap();
        assert_eq!(r, vec![0..4, 4..6]);
        assert!(split_fragments(&lens, 0).is_err());
        assert!(split_fragments(&lens, 7).is_err());
    }

    #[test]
    fn schedule_launches_each_fragment_once_per_period() {
        let (h, frags) = (12u64, 3usize);
        let mut seen = vec![Vec::new(); frags];
        for s in 1..=36 {
            if let Some(f) = launching_fragment(s, frags, h) {
                seen[f].push(s);
            }
        }
        assert_eq!(seen[0], vec![12, 24, 36]);
        assert_eq!(seen[1], vec![4, 16, 28]);
        assert_eq!(seen[2], vec![8, 20, 32]);
        assert_eq!(launching_fragment(5, 1, 5), Some(0));
        assert_eq!(min_launch_gap(3, 12), 4);
        assert_eq!(min_launch_gap(3, 10), 3);
        assert_eq!(min_launch_gap(1, 7), 7);
        assert_eq!(launching_fragment(3, 1, 5), None);
    }

    #[test]
    fn casts_and_pseudo_gradient() {
        let outer = [1.0f32 + 1e-3, -0.5];
        let local = [bf16::from_f32(0.75), bf16::from_f32(-0.25)];
        let mut g = [0.0f32; 2];
        pseudo_gradient(&outer, &local, &mut g);
        // bf16(1.001) == 1.0: the rounding of the reset value is not a gradient.
        assert_eq!(g, [0.25, -0.25]);
        let mut l = local;
        reset_to(&mut l, &outer);
        assert_eq!(l[0].to_f32(), 1.0);
        let mut x = [0.0f32, 1.0];
        lerp_to(&mut x, &[1.0, 3.0], 0.5);
        assert_eq!(x, [0.5, 2.0]);
    }

    #[test]
    fn config_mismatch_names_the_field() {
        let a = [1u64; META_LEN];
        let mut b = a;
        b[META_INNER_STEP] = 9;
        assert_eq!(config_mismatch(&a, &b), None);
        b[2] = 7;
        let msg = config_mismatch(&a, &b).unwrap();
        assert!(msg.contains("sync_every"), "{msg}");
    }
}
