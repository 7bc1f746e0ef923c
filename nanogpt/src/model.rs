//! The GPT of nanoGPT's `model.py`: token and position embeddings, pre-LayerNorm blocks of causal
//! self-attention and a 4x GELU MLP, a final LayerNorm, and an lm_head tied to the token embedding.

use attn_op::nn::KvCache;
use attn_op::profile::sync_if_profiling;
use candle_core::{DType, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::attention::Attention;
use crate::config::TrainConfig;
use crate::layer_norm::LayerNorm;
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

pub use crate::linear::{Linear, NormedLinear};

/// Returns `t` once the device has computed it when a profiler runs, so that the span that ends
/// here is timed truly on CUDA (kernels are asynchronous); free otherwise.
pub fn synced(t: Tensor) -> Result<Tensor> {
    sync_if_profiling(t.device())?;
    Ok(t)
}

/// Zeroes each element of `x` with probability `p` and scales the rest by `1/(1-p)`: attn-op's
/// Philox dropout (the mask made on the GPU on CUDA), seeded from `rng`; the identity when `rng`
/// is `None` (evaluation) or `p` is 0.
pub fn dropout(x: &Tensor, p: f64, rng: Option<&mut Rng>) -> Result<Tensor> {
    match rng {
        Some(rng) if p > 0.0 => attn_op::nn::dropout(x, p, rng.next_u64()),
        _ => Ok(x.clone()),
    }
}

/// The 4x feed-forward network with GELU, then dropout.
#[derive(Clone, Debug)]
struct Mlp {
    mlp: crate::linear::Mlp,
    dropout: f64,
}

impl Mlp {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            mlp: crate::linear::Mlp::new(cfg.n_embd, cfg.bias, vb)?,
            dropout: cfg.dropout,
        })
    }

    /// `x + dropout(mlp(ln(x)))`: one fused op on the CPU.
    fn forward_residual(
        &self,
        x: &Tensor,
        ln: &LayerNorm,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let _span = tracing::debug_span!("mlp").entered();
        let dropout = match rng {
            Some(rng) if self.dropout > 0.0 => Some((self.dropout, rng.next_u64())),
            _ => None,
        };
        synced(self.mlp.forward_residual(x, ln, dropout)?)
    }
}

/// One transformer block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`, each half one fused op
/// on the CPU.
struct Block {
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attn: Attention::new(cfg.n_embd, cfg.n_head, cfg.bias, cfg.dropout, vb.clone())?,
            ln_2: LayerNorm::new(cfg.n_embd, cfg.bias, vb.pp("ln_2"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    /// `x` is the residual stream `(B·T, C)` of `b` sequences.
    fn forward(
        &self,
        x: &Tensor,
        b: usize,
        rng: Option<&mut Rng>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (n, c) = x.dims2()?;
        let x = match cache {
            Some(cache) => self
                .attn
                .forward_cached(&x.reshape((b, n / b, c))?, cache)?
                .reshape((n, c))?,
            // Token rows in and out: no reshape nodes in the autograd graph.
            None => synced(self.attn.forward_residual(x, n / b, rng.is_some())?)?,
        };
        self.mlp.forward_residual(&x, &self.ln_2, rng)
    }
}

/// The GPT language model.
pub struct Gpt {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    cfg: ModelConfig,
}

impl Gpt {
    /// Builds the model with its parameters under `vb`, named as nanoGPT's state dict
    /// (`transformer.h.0.attn.c_attn.weight`, ...). Their values are whatever `vb` holds: call
    /// [`init_weights`] for a fresh model.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.n_head == 0 || !cfg.n_embd.is_multiple_of(cfg.n_head) {
            candle_core::bail!(
                "n-embd = {} is not divisible by n-head = {}",
                cfg.n_embd,
                cfg.n_head
            );
        }
        let vb = vb.pp("transformer");
        Ok(Self {
            wte: vb.get((cfg.vocab_size, cfg.n_embd), "wte.weight")?,
            wpe: vb.get((cfg.block_size, cfg.n_embd), "wpe.weight")?,
            blocks: (0..cfg.n_layer)
                .map(|i| Block::new(cfg, vb.pp("h").pp(i)))
                .collect::<Result<_>>()?,
            ln_f: LayerNorm::new(cfg.n_embd, cfg.bias, vb.pp("ln_f"))?,
            cfg: cfg.clone(),
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Logits `(B·T, vocab)` (row `b·T + t` for sequence `b`, position `t`) for token ids `idx`
    /// `(B, T)` at positions `pos..pos + T`. `rng` is `Some` in training (dropout on); `caches`
    /// (one per block) enables incremental decoding, with `pos` the number of tokens already
    /// cached. The residual stream stays a `(B·T, C)` matrix throughout: Candle's backward pass
    /// pays two full passes over every intermediate tensor, reshapes included.
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
        let mut x = {
            let _span = tracing::debug_span!("embedding").entered();
            let x = crate::embedding::embed(&self.wte, &self.wpe, idx, pos)?.to_dtype(dtype)?;
            synced(dropout(&x, self.cfg.dropout, rng.as_deref_mut())?)?
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let _span = tracing::debug_span!("block", index = i).entered();
            let cache = caches.as_deref_mut().map(|c| &mut c[i]);
            x = block.forward(&x, b, rng.as_deref_mut(), cache)?;
        }
        let _span = tracing::debug_span!("lm_head").entered();
        // lm_head shares the token embedding's weight; ln_f is folded into it (one fused op on
        // the CPU).
        let lm_head = NormedLinear::new(
            self.ln_f.clone(),
            Linear::from_weights(self.wte.to_dtype(dtype)?, None),
        );
        synced(lm_head.forward(&x)?.to_dtype(DType::F32)?)
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
        synced(crate::loss::cross_entropy(
            &logits,
            &targets.flatten_all()?,
        )?)
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
