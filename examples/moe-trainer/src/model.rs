//! The mixture-of-experts language model, in candle on the CPU (or CUDA
//! behind the `cuda` feature): token and position embeddings, then blocks of
//! causal self-attention and an MoE feed-forward layer (N_E experts, top-k
//! softmax routing, an optional shared expert), then the LM head.
//!
//! The parameters are a flat, named list of tensors ([`Params`]) so that the
//! DiLoCo driver can take them as f32 slices, and [`forward`] runs on any
//! such list: the trainable `Var`s, or the f32 outer parameters for
//! validation. Routing is computed densely (every expert sees every token,
//! weighted by a top-k mask): exact, simple, and cheap at this size.
//!
//! May import: candle, and the crate's `balance` module.

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};

use crate::balance::Balance;

/// Shape of the model. Every peer of a swarm must use the same.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelConfig {
    pub vocab: usize,
    pub seq_len: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    pub n_experts: usize,
    pub top_k: usize,
    pub expert_hidden: usize,
    pub shared_expert: bool,
}

impl ModelConfig {
    /// Checks the shape; the error names the bad value.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab", self.vocab),
            ("seq-len", self.seq_len),
            ("d-model", self.d_model),
            ("heads", self.n_heads),
            ("layers", self.n_layers),
            ("experts", self.n_experts),
            ("top-k", self.top_k),
            ("expert-hidden", self.expert_hidden),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("--{name} must be at least 1"));
            }
        }
        if self.top_k > self.n_experts {
            return Err(format!(
                "--top-k ({}) must not exceed the number of experts ({})",
                self.top_k, self.n_experts
            ));
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(format!(
                "--d-model ({}) must be a multiple of --heads ({})",
                self.d_model, self.n_heads
            ));
        }
        Ok(())
    }

    /// Names and shapes of every parameter, in registration order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, e, h) = (self.d_model, self.n_experts, self.expert_hidden);
        let mut v = vec![
            ("tok_emb".to_string(), vec![self.vocab, d]),
            ("pos_emb".to_string(), vec![self.seq_len, d]),
        ];
        for l in 0..self.n_layers {
            let p = |n: &str| format!("block{l}.{n}");
            v.push((p("attn_norm"), vec![d]));
            for w in ["wq", "wk", "wv", "wo"] {
                v.push((p(w), vec![d, d]));
            }
            v.push((p("moe_norm"), vec![d]));
            v.push((p("router"), vec![d, e]));
            v.push((p("experts_up"), vec![e, d, h]));
            v.push((p("experts_down"), vec![e, h, d]));
            if self.shared_expert {
                v.push((p("shared_up"), vec![d, h]));
                v.push((p("shared_down"), vec![h, d]));
            }
        }
        v.push(("final_norm".to_string(), vec![d]));
        v.push(("lm_head".to_string(), vec![d, self.vocab]));
        v
    }

    /// Number of parameters.
    pub fn param_count(&self) -> usize {
        self.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// The model's parameters as trainable variables, with their names.
pub struct Params {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub vars: Vec<Var>,
}

impl Params {
    /// Deterministic initialization from `seed`: norms at one, matrices
    /// normal with std 0.02 (output projections scaled by 1/√(2·layers)).
    pub fn init(cfg: &ModelConfig, seed: u64, device: &Device) -> candle_core::Result<Params> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let out_scale = 1.0 / ((2 * cfg.n_layers) as f32).sqrt();
        let mut names = Vec::new();
        let mut shapes = Vec::new();
        let mut vars = Vec::new();
        for (name, shape) in cfg.param_shapes() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm") {
                vec![1.0; n]
            } else {
                let std = if name.ends_with("wo") || name.ends_with("down") {
                    0.02 * out_scale
                } else {
                    0.02
                };
                (0..n).map(|_| std * normal(&mut rng)).collect()
            };
            vars.push(Var::from_tensor(&Tensor::from_vec(
                data,
                shape.as_slice(),
                device,
            )?)?);
            names.push(name);
            shapes.push(shape);
        }
        Ok(Params {
            names,
            shapes,
            vars,
        })
    }

    pub fn tensors(&self) -> Vec<Tensor> {
        self.vars.iter().map(|v| v.as_tensor().clone()).collect()
    }

    /// Every parameter as a flat f32 vector (registration order).
    pub fn to_vecs(&self) -> candle_core::Result<Vec<Vec<f32>>> {
        self.vars
            .iter()
            .map(|v| v.as_tensor().flatten_all()?.to_vec1::<f32>())
            .collect()
    }

    /// Overwrites every parameter with `values` (same order and lengths).
    pub fn set_from(&self, values: &[Vec<f32>]) -> candle_core::Result<()> {
        if values.len() != self.vars.len() {
            candle_core::bail!("{} values for {} parameters", values.len(), self.vars.len());
        }
        for ((var, shape), v) in self.vars.iter().zip(&self.shapes).zip(values) {
            let t = Tensor::from_slice(v, shape.as_slice(), var.device())?;
            var.set(&t)?;
        }
        Ok(())
    }
}

/// Tensors built from f32 vectors (e.g. DiLoCo's outer parameters).
pub fn tensors_from(
    shapes: &[Vec<usize>],
    values: &[Vec<f32>],
    device: &Device,
) -> candle_core::Result<Vec<Tensor>> {
    if shapes.len() != values.len() {
        candle_core::bail!("{} values for {} parameters", values.len(), shapes.len());
    }
    shapes
        .iter()
        .zip(values)
        .map(|(s, v)| Tensor::from_slice(v, s.as_slice(), device))
        .collect()
}

/// Routing of one MoE layer for one batch.
pub struct Routing {
    /// Gate probabilities, (tokens, experts), differentiable.
    pub probs: Tensor,
    /// Token slots that chose each expert (top-k selections) in this batch.
    pub counts: Vec<u32>,
    /// The experts each token chose (tokens × top_k), for statistics.
    pub chosen: Vec<Vec<u16>>,
}

/// What a forward pass returns.
pub struct Forward {
    /// (tokens, vocab) logits, tokens = batch · seq_len.
    pub logits: Tensor,
    pub routing: Vec<Routing>,
}

/// Runs the model on `inputs` (batch · seq_len token ids, row-major).
pub fn forward(
    cfg: &ModelConfig,
    params: &[Tensor],
    inputs: &[u32],
    batch: usize,
    device: &Device,
) -> candle_core::Result<Forward> {
    let s = cfg.seq_len;
    let d = cfg.d_model;
    if inputs.len() != batch * s {
        candle_core::bail!("{} input tokens for a batch of {batch} × {s}", inputs.len());
    }
    if params.len() != cfg.param_shapes().len() {
        candle_core::bail!("{} parameter tensors for this model", params.len());
    }
    let mut p = params.iter();
    let mut next = || {
        p.next()
            .ok_or_else(|| candle_core::Error::Msg("too few parameters".into()))
    };
    let ids = Tensor::from_slice(inputs, (batch * s,), device)?;
    let tok = next()?.embedding(&ids)?.reshape((batch, s, d))?;
    let pos = next()?.unsqueeze(0)?;
    let mut x = tok.broadcast_add(&pos)?;
    let mask = causal_mask(s, device)?;
    let mut routing = Vec::with_capacity(cfg.n_layers);
    for _ in 0..cfg.n_layers {
        let attn_norm = next()?;
        let (wq, wk, wv, wo) = (next()?, next()?, next()?, next()?);
        let h = rms_norm(&x, attn_norm)?;
        x = (x + attention(cfg, &h, [wq, wk, wv, wo], &mask, batch)?)?;
        let moe_norm = next()?;
        let (router, up, down) = (next()?, next()?, next()?);
        let shared = if cfg.shared_expert {
            Some((next()?, next()?))
        } else {
            None
        };
        let h = rms_norm(&x, moe_norm)?.reshape((batch * s, d))?;
        let (y, r) = moe(cfg, &h, router, up, down, shared)?;
        x = (x + y.reshape((batch, s, d))?)?;
        routing.push(r);
    }
    let final_norm = next()?;
    let head = next()?;
    let h = rms_norm(&x, final_norm)?.reshape((batch * s, d))?;
    let logits = h.matmul(head)?;
    Ok(Forward { logits, routing })
}

fn causal_mask(s: usize, device: &Device) -> candle_core::Result<Tensor> {
    let m: Vec<f32> = (0..s * s)
        .map(|i| {
            if i % s > i / s {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(m, (s, s), device)
}

fn rms_norm(x: &Tensor, gain: &Tensor) -> candle_core::Result<Tensor> {
    let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?.sqrt()?;
    x.broadcast_div(&rms)?.broadcast_mul(gain)
}

fn attention(
    cfg: &ModelConfig,
    h: &Tensor,
    [wq, wk, wv, wo]: [&Tensor; 4],
    mask: &Tensor,
    batch: usize,
) -> candle_core::Result<Tensor> {
    let (s, d, nh) = (cfg.seq_len, cfg.d_model, cfg.n_heads);
    let dh = d / nh;
    let split = |w: &Tensor| -> candle_core::Result<Tensor> {
        h.broadcast_matmul(w)?
            .reshape((batch, s, nh, dh))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (split(wq)?, split(wk)?, split(wv)?);
    let scores = (q.matmul(&k.t()?.contiguous()?)? / (dh as f64).sqrt())?;
    let att = candle_nn::ops::softmax(&scores.broadcast_add(mask)?, D::Minus1)?;
    let out = att
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((batch, s, d))?;
    out.broadcast_matmul(wo)
}

/// The MoE feed-forward layer on (tokens, d) input.
fn moe(
    cfg: &ModelConfig,
    h: &Tensor,
    router: &Tensor,
    up: &Tensor,
    down: &Tensor,
    shared: Option<(&Tensor, &Tensor)>,
) -> candle_core::Result<(Tensor, Routing)> {
    let e = cfg.n_experts;
    let probs = candle_nn::ops::softmax(&h.matmul(router)?, D::Minus1)?;
    let rows = probs.to_vec2::<f32>()?;
    let mut counts = vec![0u32; e];
    let mut chosen = Vec::with_capacity(rows.len());
    let mut mask = vec![0f32; rows.len() * e];
    for (t, row) in rows.iter().enumerate() {
        let top = top_k(row, cfg.top_k);
        for &i in &top {
            counts[i as usize] += 1;
            mask[t * e + i as usize] = 1.0;
        }
        chosen.push(top);
    }
    let mask = Tensor::from_vec(mask, (rows.len(), e), h.device())?;
    // Top-k gate weights, renormalized over the chosen experts.
    let gated = (&probs * &mask)?;
    let weights = gated.broadcast_div(&gated.sum_keepdim(1)?)?;
    // Every expert on every token: (E, T, hidden) then (E, T, d).
    let hidden = h.broadcast_matmul(up)?.silu()?;
    let outs = hidden.matmul(down)?;
    let w = weights.t()?.unsqueeze(2)?;
    let mut y = outs.broadcast_mul(&w)?.sum(0)?;
    if let Some((su, sd)) = shared {
        y = (y + h.matmul(su)?.silu()?.matmul(sd)?)?;
    }
    Ok((
        y,
        Routing {
            probs,
            counts,
            chosen,
        },
    ))
}

/// Indices of the k largest values, largest first (ties: lower index).
pub fn top_k(row: &[f32], k: usize) -> Vec<u16> {
    let mut idx: Vec<u16> = (0..row.len() as u16).collect();
    idx.sort_by(|&a, &b| {
        row[b as usize]
            .partial_cmp(&row[a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx
}

/// Cross-entropy of the next token, averaged over the batch.
pub fn lm_loss(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    let t = Tensor::from_slice(targets, (targets.len(),), logits.device())?;
    candle_nn::loss::cross_entropy(logits, &t)
}

/// The load-balancing loss of every layer, averaged:
/// LBL = N_E · Σᵢ fᵢ · Pᵢ with fᵢ the (detached) selection fractions the
/// balance mode chose and Pᵢ this batch's mean gate probabilities.
pub fn balance_loss(
    routing: &[Routing],
    fractions: &[Vec<f32>],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (r, f) in routing.iter().zip(fractions) {
        let e = f.len();
        let f = Tensor::from_slice(f, (e,), device)?;
        let p = r.probs.mean(0)?;
        let l = ((p * f)?.sum_all()? * e as f64)?;
        total = Some(match total {
            Some(t) => (t + l)?,
            None => l,
        });
    }
    match total {
        Some(t) => t / routing.len() as f64,
        None => Tensor::zeros((), DType::F32, device),
    }
}

/// Selection fractions fᵢ from counts (uniform when there are none).
pub fn fractions(counts: &[u32]) -> Vec<f32> {
    let total: u64 = counts.iter().map(|&c| c as u64).sum();
    if total == 0 {
        return vec![1.0 / counts.len().max(1) as f32; counts.len()];
    }
    counts
        .iter()
        .map(|&c| (c as f64 / total as f64) as f32)
        .collect()
}

/// Which counts a balance mode uses for fᵢ, per layer.
pub fn balance_fractions(
    balance: Balance,
    local: &[Vec<u32>],
    global: Option<&[Vec<u32>]>,
) -> Option<Vec<Vec<f32>>> {
    match balance {
        Balance::None => None,
        Balance::Micro => Some(local.iter().map(|c| fractions(c)).collect()),
        Balance::Global => Some(
            global
                .unwrap_or(local)
                .iter()
                .map(|c| fractions(c))
                .collect(),
        ),
    }
}

fn normal(rng: &mut impl Rng) -> f32 {
    // Box–Muller: enough for initialization, and deterministic.
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig {
            vocab: 11,
            seq_len: 6,
            d_model: 8,
            n_heads: 2,
            n_layers: 2,
            n_experts: 4,
            top_k: 2,
            expert_hidden: 8,
            shared_expert: true,
        }
    }

    #[test]
    fn init_is_deterministic_and_seeded() {
        let cfg = tiny();
        let a = Params::init(&cfg, 7, &Device::Cpu)
            .unwrap()
            .to_vecs()
            .unwrap();
        let b = Params::init(&cfg, 7, &Device::Cpu)
            .unwrap()
            .to_vecs()
            .unwrap();
        let c = Params::init(&cfg, 8, &Device::Cpu)
            .unwrap()
            .to_vecs()
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let n: usize = a.iter().map(|v| v.len()).sum();
        assert_eq!(n, cfg.param_count());
    }

    #[test]
    fn forward_shapes_counts_and_causality() {
        let cfg = tiny();
        let p = Params::init(&cfg, 1, &Device::Cpu).unwrap();
        let inputs: Vec<u32> = (0..12).map(|i| i % 11).collect();
        let f = forward(&cfg, &p.tensors(), &inputs, 2, &Device::Cpu).unwrap();
        assert_eq!(f.logits.dims(), &[12, 11]);
        assert_eq!(f.routing.len(), 2);
        for r in &f.routing {
            // Every token picks exactly top_k distinct experts.
            assert_eq!(r.counts.iter().sum::<u32>(), 12 * 2);
            assert!(r.chosen.iter().all(|c| c.len() == 2 && c[0] != c[1]));
        }
        // Changing the last token leaves every earlier position's logits as
        // they were (causal attention; routing is per token).
        let mut changed = inputs.clone();
        changed[5] = 3;
        changed[11] = 4;
        let g = forward(&cfg, &p.tensors(), &changed, 2, &Device::Cpu).unwrap();
        let a = f.logits.to_vec2::<f32>().unwrap();
        let b = g.logits.to_vec2::<f32>().unwrap();
        for t in [0, 1, 2, 3, 4, 6, 7, 8, 9, 10] {
            assert_eq!(a[t], b[t], "position {t}");
        }
        assert_ne!(a[5], b[5]);
    }

    #[test]
    fn a_few_adam_steps_lower_the_loss() {
        use candle_nn::Optimizer;
        let cfg = tiny();
        let p = Params::init(&cfg, 3, &Device::Cpu).unwrap();
        let mut opt = candle_nn::AdamW::new_lr(p.vars.clone(), 1e-2).unwrap();
        let inputs: Vec<u32> = (0..12).map(|i| (i * 3) % 11).collect();
        let targets: Vec<u32> = (0..12).map(|i| (i * 3 + 3) % 11).collect();
        let mut first = None;
        let mut last = 0.0;
        for _ in 0..30 {
            let f = forward(&cfg, &p.tensors(), &inputs, 2, &Device::Cpu).unwrap();
            let local: Vec<Vec<u32>> = f.routing.iter().map(|r| r.counts.clone()).collect();
            let fr = balance_fractions(Balance::Micro, &local, None).unwrap();
            let lbl = balance_loss(&f.routing, &fr, &Device::Cpu).unwrap();
            let ce = lm_loss(&f.logits, &targets).unwrap();
            let loss = (&ce + (lbl * 0.01).unwrap()).unwrap();
            opt.backward_step(&loss).unwrap();
            last = ce.to_scalar::<f32>().unwrap();
            first.get_or_insert(last);
        }
        assert!(last < 0.5 * first.unwrap(), "{first:?} -> {last}");
    }

    #[test]
    fn balance_loss_is_one_when_uniform() {
        let probs = Tensor::from_vec(vec![0.25f32; 8], (2, 4), &Device::Cpu).unwrap();
        let r = Routing {
            probs,
            counts: vec![1, 1, 1, 1],
            chosen: vec![],
        };
        let l = balance_loss(&[r], &[fractions(&[1, 1, 1, 1])], &Device::Cpu).unwrap();
        assert!((l.to_scalar::<f32>().unwrap() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn top_k_and_config_errors() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.2], 2), vec![1, 2]);
        let mut c = tiny();
        c.top_k = 5;
        assert!(c.validate().unwrap_err().contains("must not exceed"));
        let mut c = tiny();
        c.n_heads = 3;
        assert!(c.validate().unwrap_err().contains("multiple of --heads"));
        let mut c = tiny();
        c.n_experts = 0;
        assert!(c.validate().unwrap_err().contains("--experts"));
    }
}
