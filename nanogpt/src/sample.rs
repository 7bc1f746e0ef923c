//! Text generation from a checkpoint, one token at a time with a KV cache.
//!
//! While the context fits the model's block size, each new token runs through the model alone
//! and attends to the cached keys and values. Beyond it, the context is cropped to the last
//! block-size tokens as nanoGPT does; absolute position embeddings then shift, so each step
//! recomputes that window (and the tokens equal nanoGPT's for the same draws).

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::checkpoint;
use crate::model::Gpt;
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;

/// How to pick each next token.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    /// Divides the logits; 0 picks the most likely token (greedy).
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens.
    pub top_k: Option<usize>,
}

/// A trained model ready to generate.
pub struct Generator {
    model: Gpt,
    /// The checkpoint's tokenizer.
    pub tokenizer: Tokenizer,
    device: Device,
    dtype: DType,
}

impl Generator {
    /// Loads the checkpoint of `out_dir`.
    pub fn load(out_dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let ckpt = checkpoint::load(&checkpoint::path_in(out_dir), device)?;
        let varmap = VarMap::new();
        let model = Gpt::new(
            &ckpt.meta.model_config,
            VarBuilder::from_varmap(&varmap, DType::F32, device),
            true,
        )?;
        ckpt.restore_params(&varmap)?;
        Ok(Self {
            model,
            tokenizer: Tokenizer::from_json(&ckpt.meta.tokenizer)?,
            device: device.clone(),
            dtype,
        })
    }

    /// The shape of the model.
    pub fn model_config(&self) -> &crate::model::ModelConfig {
        self.model.config()
    }

    /// A generator around an existing model (tests).
    pub fn new(model: Gpt, tokenizer: Tokenizer, device: &Device, dtype: DType) -> Self {
        Self {
            model,
            tokenizer,
            device: device.clone(),
            dtype,
        }
    }

    /// Appends `max_new_tokens` tokens to `prompt`, calling `on_token` with each; returns the
    /// new tokens. `use_cache: false` recomputes the whole (cropped) context every step, as
    /// nanoGPT does; both give the same tokens.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        sampling: Sampling,
        rng: &mut Rng,
        use_cache: bool,
        mut on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            bail!("the prompt is empty; give at least one character with --start");
        }
        if !(sampling.temperature >= 0.0 && sampling.temperature.is_finite()) {
            bail!(
                "--temperature {} must be a finite number >= 0",
                sampling.temperature
            );
        }
        if sampling.top_k == Some(0) {
            bail!("--top-k 0 keeps no token; use a value >= 1 or leave it out");
        }
        let block = self.model.config().block_size;
        let mut tokens = prompt.to_vec();
        let mut caches = self.model.new_caches();
        let mut cached = 0; // tokens whose keys and values are in `caches`
        let mut out = Vec::new();
        for _ in 0..max_new_tokens {
            let _span = tracing::debug_span!("next_token").entered();
            let logits = if use_cache && tokens.len() <= block {
                // Feed what the cache lacks: the whole prompt first, then one token a step.
                let new = &tokens[cached..];
                let x = Tensor::new(new, &self.device)?.unsqueeze(0)?;
                let logits = self
                    .model
                    .forward(&x, cached, self.dtype, None, Some(&mut caches))?;
                cached = tokens.len();
                logits
            } else {
                let window = &tokens[tokens.len().saturating_sub(block)..];
                let x = Tensor::new(window, &self.device)?.unsqueeze(0)?;
                self.model.forward(&x, 0, self.dtype, None, None)?
            };
            let rows = logits.dim(0)?;
            let last: Vec<f32> = logits.get(rows - 1)?.to_vec1()?;
            let next = pick(&last, sampling, rng);
            on_token(next)?;
            tokens.push(next);
            out.push(next);
        }
        Ok(out)
    }
}

/// Samples a token from `logits` with temperature and top-k, in f64 for reproducibility.
fn pick(logits: &[f32], s: Sampling, rng: &mut Rng) -> u32 {
    let argmax = || {
        (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
            .unwrap_or(0) as u32
    };
    if s.temperature == 0.0 || s.top_k == Some(1) {
        return argmax();
    }
    let mut scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / s.temperature).collect();
    if let Some(k) = s.top_k.filter(|&k| k < scaled.len()) {
        let mut sorted = scaled.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[k - 1];
        for v in scaled.iter_mut().filter(|v| **v < kth) {
            *v = f64::NEG_INFINITY;
        }
    }
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scaled.iter().map(|v| (v - max).exp()).collect();
    let mut u = rng.uniform() * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    argmax()
}
