//! The GPT of nanoGPT's `model.py`, written plainly in Candle ops that Candle differentiates:
//! LayerNorm, Linear, attention (attn-op's [`CausalSelfAttention`]), the MLP, the Block and the
//! GPT (forward, loss, generation's KV caches), top to bottom. This is the model's mathematics;
//! [`crate::fused`] computes the same on the CPU, faster, and [`Gpt::new`] decides which runs.

use attn_op::nn::{AttentionConfig, CausalSelfAttention, Causality, KvCache};
use attn_op::profile::synced;
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::rng::Rng;

/// The shape of a GPT (nanoGPT's `GPTConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ModelConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Longest context.
    pub block_size: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Embedding width.
    pub n_embd: usize,
    /// Dropout probability in training.
    pub dropout: f64,
    /// Biases in Linear and LayerNorm layers.
    pub bias: bool,
}

impl ModelConfig {
    /// The model that the training settings `cfg` describe, over `vocab_size` tokens.
    ///
    /// ```
    /// use nanogpt::config::{TrainConfig, CPU_RECIPE};
    /// use nanogpt::model::ModelConfig;
    /// let cfg = TrainConfig::from_toml(CPU_RECIPE)?;
    /// let model = ModelConfig::from_train(&cfg, 65);
    /// assert_eq!((model.vocab_size, model.n_layer, model.n_embd), (65, 4, 128));
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn from_train(cfg: &TrainConfig, vocab_size: usize) -> Self {
        Self {
            vocab_size,
            block_size: cfg.block_size,
            n_layer: cfg.n_layer,
            n_head: cfg.n_head,
            n_embd: cfg.n_embd,
            dropout: cfg.dropout,
            bias: cfg.bias,
        }
    }
}

/// LayerNorm with an optional bias (PyTorch's has no such switch), over the last dimension.
/// Composed from Candle ops, all of which Candle differentiates: `candle_nn`'s LayerNorm may
/// take a fused kernel without a backward pass, and the weights would silently stop learning.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// The scale `γ`.
    pub weight: Tensor,
    /// The shift `β`, when the layer has one.
    pub bias: Option<Tensor>,
}

impl LayerNorm {
    /// A LayerNorm of width `dim` whose `weight` (and `bias`) live under `vb`.
    pub fn new(dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: if bias {
                Some(vb.get(dim, "bias")?)
            } else {
                None
            },
        })
    }

    /// `(x - mean) / sqrt(var + 1e-5) · weight + bias`, in f32 for half-precision input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let in_dtype = x.dtype();
        let x = match in_dtype {
            DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        let y = normed.broadcast_mul(&self.weight.to_dtype(normed.dtype())?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        };
        y.to_dtype(in_dtype)
    }
}

/// A Linear layer `y = x Wᵀ + b` over the last dimension, `W` stored `(out, in)` as PyTorch
/// does. The f32 weights are cast to the input's dtype, as autocast does.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `W`, `(out, in)`.
    pub weight: Tensor,
    /// `b`, `(out)`, when the layer has one.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// A `d_in -> d_out` layer whose `weight` (and `bias`) live under `vb`.
    pub fn new(d_in: usize, d_out: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get((d_out, d_in), "weight")?,
            bias: if bias {
                Some(vb.get(d_out, "bias")?)
            } else {
                None
            },
        })
    }
}

impl Module for Linear {
    /// Any rank: the leading dimensions are flattened into rows for one matrix product.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&d_in, lead)) = dims.split_last() else {
            candle_core::bail!("linear: expected at least one dimension, got a scalar");
        };
        let rows = x.reshape((lead.iter().product::<usize>(), d_in))?;
        let mut y = rows.matmul(&self.weight.to_dtype(x.dtype())?.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(y.dtype())?)?;
        }
        let mut out = lead.to_vec();
        out.push(y.dim(1)?);
        y.reshape(out)
    }
}

/// Zeroes each element of `x` with probability `p` and scales the rest by `1/(1-p)`: attn-op's
/// Philox dropout seeded from `rng`; the identity when `rng` is `None` (evaluation) or `p` is 0.
pub fn dropout(x: &Tensor, p: f64, rng: Option<&mut Rng>) -> Result<Tensor> {
    match rng {
        Some(rng) if p > 0.0 => attn_op::nn::dropout(x, p, rng.next_u64()),
        _ => Ok(x.clone()),
    }
}

/// The 4x feed-forward network: `dropout(c_proj(gelu(c_fc(x))))`.
#[derive(Clone, Debug)]
pub struct Mlp {
    /// `n_embd -> 4·n_embd`.
    pub c_fc: Linear,
    /// `4·n_embd -> n_embd`.
    pub c_proj: Linear,
    dropout: f64,
}

impl Mlp {
    /// An MLP of width `n_embd` whose layers live under `vb` (`c_fc`, `c_proj`).
    pub fn new(n_embd: usize, bias: bool, dropout: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            c_fc: Linear::new(n_embd, 4 * n_embd, bias, vb.pp("c_fc"))?,
            c_proj: Linear::new(4 * n_embd, n_embd, bias, vb.pp("c_proj"))?,
            dropout,
        })
    }

    /// The MLP on `x`; `rng` is `Some` in training (dropout on).
    pub fn forward(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let h = self.c_fc.forward(x)?.gelu_erf()?;
        dropout(&self.c_proj.forward(&h)?, self.dropout, rng)
    }
}

/// One transformer block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
pub struct Block {
    /// LayerNorm before the attention.
    pub ln_1: LayerNorm,
    /// Causal self-attention (attn-op's layer) over `c_attn` and `c_proj`.
    pub attn: CausalSelfAttention,
    /// The attention's q|k|v projection, as `attn` runs it (kept for [`crate::fused`]).
    pub c_attn: Linear,
    /// The attention's output projection, as `attn` runs it (kept for [`crate::fused`]).
    pub c_proj: Linear,
    /// LayerNorm before the MLP.
    pub ln_2: LayerNorm,
    /// The MLP.
    pub mlp: Mlp,
}

impl Block {
    /// The block's layers under `vb`, named as nanoGPT's (`ln_1`, `attn.c_attn`, ...).
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.n_embd;
        let c_attn = Linear::new(c, 3 * c, cfg.bias, vb.pp("attn.c_attn"))?;
        let c_proj = Linear::new(c, c, cfg.bias, vb.pp("attn.c_proj"))?;
        let attn_cfg = AttentionConfig {
            n_embd: c,
            n_head: cfg.n_head,
            bias: cfg.bias,
            dropout: cfg.dropout,
            causality: Causality::Always,
        };
        Ok(Self {
            ln_1: LayerNorm::new(c, cfg.bias, vb.pp("ln_1"))?,
            attn: CausalSelfAttention::with_projections(attn_cfg, c_attn.clone(), c_proj.clone())?,
            c_attn,
            c_proj,
            ln_2: LayerNorm::new(c, cfg.bias, vb.pp("ln_2"))?,
            mlp: Mlp::new(c, cfg.bias, cfg.dropout, vb.pp("mlp"))?,
        })
    }

    /// `x + attn(ln_1(x))` for the residual stream `x` `(B·T, C)` of sequences of `seq_len`
    /// tokens; `train` turns dropout on.
    pub fn attention_residual(&self, x: &Tensor, seq_len: usize, train: bool) -> Result<Tensor> {
        let _span = tracing::debug_span!("attention").entered();
        synced(
            (x + self
                .attn
                .forward_rows(&self.ln_1.forward(x)?, seq_len, train)?)?,
        )
    }

    /// `x + mlp(ln_2(x))`; `rng` is `Some` in training (dropout on).
    pub fn mlp_residual(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let _span = tracing::debug_span!("mlp").entered();
        synced((x + self.mlp.forward(&self.ln_2.forward(x)?, rng)?)?)
    }

    /// The block on `x` `(B·T, C)`, `b` sequences; with `cache`, `x` continues its sequences.
    fn forward(
        &self,
        x: &Tensor,
        b: usize,
        rng: Option<&mut Rng>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (n, c) = x.dims2()?;
        let x = match cache {
            Some(cache) => {
                let h = self.ln_1.forward(&x.reshape((b, n / b, c))?)?;
                (x + self.attn.forward_cached(&h, cache)?.reshape((n, c))?)?
            }
            None => self.attention_residual(x, n / b, rng.is_some())?,
        };
        self.mlp_residual(&x, rng)
    }
}

/// The GPT language model.
pub struct Gpt {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    cfg: ModelConfig,
    /// Whether the run takes the CPU fast path (the `fused` setting, on the CPU): the model's
    /// f32 passes without bias or KV cache ([`Self::runs_fused`]) and the optimizer's update.
    fused: bool,
}

impl Gpt {
    /// Builds the model with its parameters under `vb`, named as nanoGPT's state dict
    /// (`transformer.h.0.attn.c_attn.weight`, ...). Their values are whatever `vb` holds: call
    /// [`init_weights`] for a fresh model. With `fused` (the `fused` setting), a model on the
    /// CPU runs on the fast path of [`crate::fused`] where it can ([`Self::runs_fused`]) and its
    /// optimizer takes the in-place update ([`Self::fused`]): this is the one place that decides.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder, fused: bool) -> Result<Self> {
        if cfg.n_head == 0 || !cfg.n_embd.is_multiple_of(cfg.n_head) {
            candle_core::bail!(
                "n-embd = {} is not divisible by n-head = {}",
                cfg.n_embd,
                cfg.n_head
            );
        }
        let fused = fused && vb.device().is_cpu();
        let vb = vb.pp("transformer");
        Ok(Self {
            wte: vb.get((cfg.vocab_size, cfg.n_embd), "wte.weight")?,
            wpe: vb.get((cfg.block_size, cfg.n_embd), "wpe.weight")?,
            blocks: (0..cfg.n_layer)
                .map(|i| Block::new(cfg, vb.pp("h").pp(i)))
                .collect::<Result<_>>()?,
            ln_f: LayerNorm::new(cfg.n_embd, cfg.bias, vb.pp("ln_f"))?,
            cfg: cfg.clone(),
            fused,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Whether the run takes the CPU fast path: what [`AdamW::new`](crate::optim::AdamW::new)
    /// is given for its update.
    pub fn fused(&self) -> bool {
        self.fused
    }

    /// Whether a pass in `dtype` runs on [`crate::fused`] (whose ops are f32 and take no
    /// biases).
    pub fn runs_fused(&self, dtype: DType) -> bool {
        self.fused && !self.cfg.bias && dtype == DType::F32
    }

    /// Logits `(B·T, vocab)` (row `b·T + t` for sequence `b`, position `t`) for token ids `idx`
    /// `(B, T)` at positions `pos..pos + T`, computed in `dtype`. `rng` is `Some` in training
    /// (dropout on); `caches` (one per block) enables incremental decoding, with `pos` the
    /// number of tokens already cached. The residual stream stays a `(B·T, C)` matrix
    /// throughout: Candle's backward pass pays two full passes over every intermediate
    /// tensor, reshapes included.
    pub fn forward(
        &self,
        idx: &Tensor,
        pos: usize,
        dtype: DType,
        mut rng: Option<&mut Rng>,
        mut caches: Option<&mut [KvCache]>,
    ) -> Result<Tensor> {
        let _span = tracing::debug_span!("forward").entered();
        let (b, t) = idx.dims2()?;
        if b == 0 || t == 0 {
            candle_core::bail!("cannot forward an empty batch of {b} sequences of {t} tokens");
        }
        if pos + t > self.cfg.block_size {
            candle_core::bail!(
                "cannot forward a sequence of {} tokens: the model's block-size is only {}",
                pos + t,
                self.cfg.block_size
            );
        }
        if self.runs_fused(dtype) && caches.is_none() {
            return self.forward_fused(idx, rng);
        }
        let mut x = {
            let _span = tracing::debug_span!("embedding").entered();
            let positions: Vec<u32> = (0..b).flat_map(|_| pos as u32..(pos + t) as u32).collect();
            let positions = Tensor::from_vec(positions, b * t, idx.device())?;
            let tok = self.wte.index_select(&idx.flatten_all()?, 0)?;
            let x = (tok + self.wpe.index_select(&positions, 0)?)?.to_dtype(dtype)?;
            synced(dropout(&x, self.cfg.dropout, rng.as_deref_mut())?)?
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let _span = tracing::debug_span!("block", index = i).entered();
            let cache = caches.as_deref_mut().map(|c| &mut c[i]);
            x = block.forward(&x, b, rng.as_deref_mut(), cache)?;
        }
        let _span = tracing::debug_span!("lm_head").entered();
        // lm_head shares the token embedding's weight (weight tying).
        let x = self.ln_f.forward(&x)?;
        synced(
            x.matmul(&self.wte.to_dtype(dtype)?.t()?)?
                .to_dtype(DType::F32)?,
        )
    }

    /// [`Self::forward`] on [`crate::fused`]'s ops over the same weights, from position 0
    /// without a cache; random draws in the same order.
    fn forward_fused(&self, idx: &Tensor, mut rng: Option<&mut Rng>) -> Result<Tensor> {
        let t = idx.dim(1)?;
        let mut x = {
            let _span = tracing::debug_span!("embedding").entered();
            let x = crate::fused::embed(&self.wte, &self.wpe, idx, 0)?;
            synced(dropout(&x, self.cfg.dropout, rng.as_deref_mut())?)?
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let _span = tracing::debug_span!("block", index = i).entered();
            x = {
                let _span = tracing::debug_span!("attention").entered();
                let weights = [
                    &block.ln_1.weight,
                    &block.c_attn.weight,
                    &block.c_proj.weight,
                ];
                let train = rng.is_some();
                synced(crate::fused::attention_residual(
                    &x,
                    weights,
                    &block.attn,
                    t,
                    train,
                )?)?
            };
            x = {
                let _span = tracing::debug_span!("mlp").entered();
                let dropout = match rng.as_deref_mut() {
                    Some(rng) if self.cfg.dropout > 0.0 => Some((self.cfg.dropout, rng.next_u64())),
                    _ => None,
                };
                let (mlp, ln_2) = (&block.mlp, &block.ln_2.weight);
                synced(crate::fused::mlp_residual(
                    &x,
                    ln_2,
                    &mlp.c_fc.weight,
                    &mlp.c_proj.weight,
                    dropout,
                )?)?
            };
        }
        let _span = tracing::debug_span!("lm_head").entered();
        synced(crate::fused::normed_linear(
            &x,
            &self.ln_f.weight,
            &self.wte,
        )?)
    }

    /// Mean cross-entropy of predicting `targets` `(B, T)` from `idx` `(B, T)`.
    pub fn loss(
        &self,
        idx: &Tensor,
        targets: &Tensor,
        dtype: DType,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let logits = self.forward(idx, 0, dtype, rng, None)?;
        let _span = tracing::debug_span!("loss").entered();
        let targets = targets.flatten_all()?;
        synced(if self.runs_fused(dtype) {
            crate::fused::cross_entropy(&logits, &targets)?
        } else {
            candle_nn::loss::cross_entropy(&logits, &targets)?
        })
    }

    /// Parameters, not counting the position embedding (nanoGPT's `get_num_params`).
    pub fn num_params(&self, varmap: &VarMap) -> usize {
        let all: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
        all - self.wpe.elem_count()
    }

    /// nanoGPT's estimate of the FLOPs of one forward and backward pass, per token.
    pub fn flops_per_token(&self, num_params: usize) -> f64 {
        let c = &self.cfg;
        6.0 * num_params as f64
            + 12.0 * (c.n_layer * c.n_head * (c.n_embd / c.n_head) * c.block_size) as f64
    }

    /// Empty KV caches, one per block.
    pub fn new_caches(&self) -> Vec<KvCache> {
        vec![KvCache::default(); self.blocks.len()]
    }

    /// Where each block's attention is in its sequence of dropout seeds.
    pub fn attn_seed_states(&self) -> Vec<u64> {
        self.blocks.iter().map(|b| b.attn.seed_state()).collect()
    }

    /// Restores the attention dropout seed sequences saved by [`Gpt::attn_seed_states`].
    pub fn set_attn_seed_states(&self, states: &[u64]) -> Result<()> {
        if states.len() != self.blocks.len() {
            candle_core::bail!(
                "{} attention seed states for {} blocks",
                states.len(),
                self.blocks.len()
            );
        }
        for (block, &s) in self.blocks.iter().zip(states) {
            block.attn.set_seed_state(s);
        }
        Ok(())
    }
}

/// nanoGPT's initialisation: N(0, 0.02) for Linear and embedding weights, N(0, 0.02/sqrt(2·n_layer))
/// for the residual projections (`c_proj`), zeros for biases and ones for LayerNorm weights.
/// Parameters are drawn in name order, so a seed fixes every value.
pub fn init_weights(varmap: &VarMap, n_layer: usize, rng: &mut Rng) -> Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let (n, shape, dev) = (var.elem_count(), var.shape().clone(), var.device().clone());
        let value = if name.ends_with(".bias") {
            Tensor::zeros(shape, DType::F32, &dev)?
        } else if name.contains(".ln_") {
            Tensor::ones(shape, DType::F32, &dev)?
        } else {
            let std = if name.ends_with("c_proj.weight") {
                0.02 / (2.0 * n_layer as f64).sqrt()
            } else {
                0.02
            };
            Tensor::from_vec(rng.normal_vec(n, std), shape, &dev)?
        };
        var.set(&value.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::config::{TrainConfig, CPU_RECIPE};
    use crate::optim::AdamW;
    use crate::test_util::{assert_gradients_match_finite_differences, set_random};

    /// LayerNorm's gradients (input, weight, bias) match central finite differences (f64).
    #[test]
    fn layer_norm_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let ln = LayerNorm::new(5, true, VarBuilder::from_varmap(&map, DType::F64, &dev))?;
        let mut rng = Rng::new(3, 0);
        set_random(&map, &mut rng, 1.0)?;
        let f64s = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<_>>();
        let x = Var::from_vec(f64s(rng.normal_vec(15, 1.0)), (3, 5), &dev)?;
        let probe = Tensor::from_vec(f64s(rng.normal_vec(15, 1.0)), (3, 5), &dev)?;
        assert_gradients_match_finite_differences(&map, &x, || {
            (ln.forward(&x)? * &probe)?.sum_all()
        })
    }

    /// The MLP's gradients (with biases) match central finite differences (f64).
    #[test]
    fn mlp_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let mlp = Mlp::new(
            3,
            true,
            0.0,
            VarBuilder::from_varmap(&map, DType::F64, &dev),
        )?;
        let mut rng = Rng::new(13, 0);
        set_random(&map, &mut rng, 0.7)?;
        let f64s = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<_>>();
        let x = Var::from_vec(f64s(rng.normal_vec(12, 1.0)), (4, 3), &dev)?;
        let probe = Tensor::from_vec(f64s(rng.normal_vec(12, 1.0)), (4, 3), &dev)?;
        assert_gradients_match_finite_differences(&map, &x, || {
            (mlp.forward(&x, None)? * &probe)?.sum_all()
        })
    }

    #[test]
    fn layer_norm_normalises_rows() -> Result<()> {
        let dev = Device::Cpu;
        let ln = LayerNorm {
            weight: Tensor::ones(4, DType::F32, &dev)?,
            bias: None,
        };
        let x = Tensor::new(&[[1f32, 2., 3., 4.], [10., 10., 10., 14.]], &dev)?;
        let y = ln.forward(&x)?;
        let mean = y.mean_keepdim(1)?.flatten_all()?.to_vec1::<f32>()?;
        let var = y.sqr()?.mean_keepdim(1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(mean.iter().all(|m| m.abs() < 1e-5), "{mean:?}");
        assert!(var.iter().all(|v| (v - 1.0).abs() < 1e-3), "{var:?}");
        Ok(())
    }

    /// The plain model and the fused one, from the same weights and seeds, train alike: the
    /// same losses over a few AdamW steps with dropout, and the same weights after them.
    #[test]
    fn plain_and_fused_models_train_alike() -> Result<()> {
        let dev = Device::Cpu;
        let mut cfg = TrainConfig::from_toml(CPU_RECIPE).map_err(candle_core::Error::wrap)?;
        (
            cfg.n_layer,
            cfg.n_head,
            cfg.n_embd,
            cfg.block_size,
            cfg.dropout,
        ) = (2, 2, 32, 16, 0.1);
        let model_cfg = ModelConfig::from_train(&cfg, 20);
        let ids: Vec<u32> = (0..4 * 17).map(|i| (i * 7 % 20) as u32).collect();
        let batch = Tensor::from_vec(ids, (4, 17), &dev)?;
        let (x, y) = (batch.narrow(1, 0, 16)?, batch.narrow(1, 1, 16)?);
        let run = |fused: bool| -> Result<(Vec<f32>, Vec<f32>)> {
            let map = VarMap::new();
            let gpt = Gpt::new(
                &model_cfg,
                VarBuilder::from_varmap(&map, DType::F32, &dev),
                fused,
            )?;
            assert_eq!(gpt.runs_fused(DType::F32), fused);
            init_weights(&map, model_cfg.n_layer, &mut Rng::new(1, 0))?;
            let mut opt = AdamW::new(&map, &cfg, gpt.fused()).map_err(candle_core::Error::wrap)?;
            let mut rng = Rng::new(2, 0);
            let mut losses = Vec::new();
            for _ in 0..4 {
                let loss = gpt.loss(&x, &y, DType::F32, Some(&mut rng))?;
                losses.push(loss.to_scalar::<f32>()?);
                let grads = opt
                    .grads(&loss.backward()?)
                    .map_err(candle_core::Error::wrap)?;
                opt.step(&grads, 1e-2).map_err(candle_core::Error::wrap)?;
            }
            let data = map.data().lock().expect("varmap lock");
            let mut names: Vec<&String> = data.keys().collect();
            names.sort();
            let weights = names
                .iter()
                .map(|n| data[*n].flatten_all()?.to_vec1::<f32>())
                .collect::<Result<Vec<_>>>()?;
            Ok((losses, weights.concat()))
        };
        let (plain, fused) = (run(false)?, run(true)?);
        for (a, b) in plain.0.iter().zip(&fused.0) {
            assert!(
                (a - b).abs() < 1e-4 * a.abs(),
                "losses {:?} vs {:?}",
                plain.0,
                fused.0
            );
        }
        assert!(plain.0[3] < plain.0[0], "it learns: {:?}", plain.0);
        let worst = plain
            .1
            .iter()
            .zip(&fused.1)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "weights differ by {worst}");
        Ok(())
    }
}
