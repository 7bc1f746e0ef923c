//! Layers built on the attention ops: [`CausalSelfAttention`], the multi-head self-attention of
//! GPT (and of PyTorch's SDPA tutorial), and a seeded [`dropout`].

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{bail, DType, Module, ModuleT, Result, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::config::Varlen;
use crate::config::{AttnConfig, CausalAlign, Dropout};
use crate::dispatch::{reasons, select};
use crate::ops::qkv::QkvAttention;
use crate::philox::DropoutMask;
use crate::rows::QkvRows;
use crate::sdpa::span;
use crate::validate::check_sdpa;
use crate::{
    scaled_dot_product_attention, select_backend, Backend, EfficientAttention, FlashAttention,
    SdpaOptions,
};

/// Dropout with a mask drawn from `seed` (Philox), so that runs are reproducible: keeps each
/// element with probability `1 - p` and scales kept ones by `1 / (1 - p)`. Differentiable in `x`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::ones((4, 100), candle_core::DType::F32, &Device::Cpu)?;
/// let a = attn_op::nn::dropout(&x, 0.5, 7)?;
/// let b = attn_op::nn::dropout(&x, 0.5, 7)?;
/// assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?); // same seed, same mask
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        bail!("dropout: p = {p} is outside [0, 1)");
    }
    if p == 0.0 || x.elem_count() == 0 {
        return Ok(x.clone());
    }
    let cols = x.dims().last().copied().unwrap_or(1).max(1);
    let keep = dropout_keep(x.elem_count() / cols, cols, p, seed, x.dtype(), x.device())?;
    x * keep.reshape(x.shape())?
}

/// [`dropout_multipliers`] as a `(rows, cols)` tensor of `dtype` on `device`: made on the GPU by
/// a kernel on CUDA (f32, f16, bf16), on the host elsewhere.
fn dropout_keep(
    rows: usize,
    cols: usize,
    p: f64,
    seed: u64,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    if matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = device {
            return crate::cuda::dropout_keep(dev, rows, cols, p, seed, dtype);
        }
        #[cfg(feature = "cuda-emu")]
        if device.is_cpu() && crate::emu::is_emulating() {
            return crate::emu::dropout_keep(rows, cols, p, seed, dtype);
        }
    }
    Tensor::from_vec(
        dropout_multipliers(rows, cols, p, seed)?,
        (rows, cols),
        device,
    )?
    .to_dtype(dtype)
}

/// The multipliers [`dropout`] applies to a `(rows, cols)` tensor: 0 for a dropped element,
/// `1/(1-p)` (as f32) for a kept one, row by row, the mask drawn from `seed` (Philox). For
/// callers that apply the same dropout inside an op of their own.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::ones((3, 8), candle_core::DType::F32, &Device::Cpu)?;
/// let keep = attn_op::nn::dropout_multipliers(3, 8, 0.25, 7)?;
/// let y = attn_op::nn::dropout(&x, 0.25, 7)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, keep);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn dropout_multipliers(rows: usize, cols: usize, p: f64, seed: u64) -> Result<Vec<f32>> {
    if !(0.0..1.0).contains(&p) {
        bail!("dropout: p = {p} is outside [0, 1)");
    }
    let scale = (1.0 / (1.0 - p)) as f32;
    let n = crate::validate::checked_elems("dropout_multipliers", "the mask", &[rows, cols], 4)?;
    if p == 0.0 {
        return Ok(vec![scale; n]);
    }
    let mask = DropoutMask::new(p, seed);
    let mut keep = vec![0f32; n];
    // Rows in parallel: each row's mask depends only on the seed and the row.
    keep.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            mask.fill_row(0, r, 0, row);
            for k in row {
                // Rounded as Candle's `affine` rounds `keep * scale`.
                *k = *k * scale + 0.0;
            }
        });
    Ok(keep)
}

/// When a [`CausalSelfAttention`] masks the future.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Causality {
    /// In training and in evaluation (a language model: nanoGPT's behaviour).
    Always,
    /// Only in training, as the module of PyTorch's SDPA tutorial.
    TrainingOnly,
    /// Never.
    Never,
}

/// Sizes and regularisation of a [`CausalSelfAttention`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionConfig {
    /// Embedding width (C); a multiple of `n_head`.
    pub n_embd: usize,
    /// Number of attention heads.
    pub n_head: usize,
    /// Whether the two Linear layers have a bias.
    pub bias: bool,
    /// Dropout on the attention weights and on the output (training only).
    pub dropout: f64,
    /// When the future is masked.
    pub causality: Causality,
}

/// Keys and values seen so far, for incremental decoding with
/// [`CausalSelfAttention::forward_cached`]: `(B, T, H, D)` each.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    kv: Option<(Tensor, Tensor)>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dim(1).unwrap_or(0))
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Multi-head causal self-attention with one fused `c_attn` projection to q, k, v, attention by
/// [`scaled_dot_product_attention`] (so [`crate::sdpa_kernel`] picks the backend), `c_proj`, and
/// dropout on the attention weights and the output in training.
///
/// Dropout masks come from a seed sequence owned by the module ([`Self::set_seed_state`]), so a
/// training run is reproducible and can be resumed exactly.
///
/// ```
/// use attn_op::nn::{AttentionConfig, Causality, CausalSelfAttention};
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let cfg = AttentionConfig { n_embd: 32, n_head: 4, bias: false, dropout: 0.1, causality: Causality::Always };
/// let attn = CausalSelfAttention::new(cfg, vb.pp("attn"))?;
/// let x = Tensor::randn(0f32, 1., (2, 10, 32), &Device::Cpu)?;
/// assert_eq!(attn.forward_t(&x, true)?.dims(), &[2, 10, 32]);
/// println!("{attn}");
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct CausalSelfAttention {
    c_attn: Projection,
    c_proj: Projection,
    cfg: AttentionConfig,
    seeds: AtomicU64,
}

/// The dropout seeds of one training forward pass of a [`CausalSelfAttention`], drawn by
/// [`CausalSelfAttention::draw_training_seeds`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrainingSeeds {
    /// The attention weights' mask (drawn whatever the dropout probability).
    pub attention: u64,
    /// The output's mask, drawn second; `None` when the layer has no dropout.
    pub output: Option<u64>,
}

/// SplitMix64: the next seed of a sequence.
fn splitmix64(state: &AtomicU64) -> u64 {
    let mut z = state
        .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A projection layer of [`CausalSelfAttention`]: any Candle module (so that a model can bring
/// its own Linear, fused or quantized).
type Projection = Box<dyn Module + Send + Sync>;

impl CausalSelfAttention {
    /// Creates the layer's weights through `vb` (`c_attn.weight` `(3C, C)`, `c_proj.weight`
    /// `(C, C)`, and biases when `cfg.bias`) as Candle's `Linear` layers.
    pub fn new(cfg: AttentionConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.n_embd;
        let c_attn = candle_nn::linear_b(c, 3 * c, cfg.bias, vb.pp("c_attn"))?;
        let c_proj = candle_nn::linear_b(c, c, cfg.bias, vb.pp("c_proj"))?;
        Self::with_projections(cfg, c_attn, c_proj)
    }

    /// The layer over projections of the caller's: `c_attn` maps `(..., C)` to `(..., 3·C)`
    /// (q, k, v one after the other) and `c_proj` maps `(..., C)` to `(..., C)`, for C =
    /// `cfg.n_embd`. A model whose own Linear layer is faster on its device (nanogpt's fused
    /// CPU op, say) passes that; `cfg.bias` only describes them when the layer prints itself.
    ///
    /// ```
    /// use attn_op::nn::{AttentionConfig, Causality, CausalSelfAttention};
    /// use candle_core::{DType, Device, ModuleT, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// let vm = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    /// let cfg = AttentionConfig { n_embd: 32, n_head: 4, bias: false, dropout: 0.0, causality: Causality::Always };
    /// let (c_attn, c_proj) = (
    ///     candle_nn::linear_no_bias(32, 96, vb.pp("c_attn"))?,
    ///     candle_nn::linear_no_bias(32, 32, vb.pp("c_proj"))?,
    /// );
    /// let attn = CausalSelfAttention::with_projections(cfg, c_attn, c_proj)?;
    /// let x = Tensor::randn(0f32, 1., (2, 10, 32), &Device::Cpu)?;
    /// assert_eq!(attn.forward_t(&x, false)?.dims(), &[2, 10, 32]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_projections(
        cfg: AttentionConfig,
        c_attn: impl Module + Send + Sync + 'static,
        c_proj: impl Module + Send + Sync + 'static,
    ) -> Result<Self> {
        if cfg.n_head == 0 || !cfg.n_embd.is_multiple_of(cfg.n_head) {
            bail!(
                "CausalSelfAttention: n_embd = {} must be a positive multiple of n_head = {}",
                cfg.n_embd,
                cfg.n_head
            );
        }
        if !(0.0..1.0).contains(&cfg.dropout) {
            bail!(
                "CausalSelfAttention: dropout = {} is outside [0, 1)",
                cfg.dropout
            );
        }
        Ok(Self {
            c_attn: Box::new(c_attn),
            c_proj: Box::new(c_proj),
            cfg,
            seeds: AtomicU64::new(0),
        })
    }

    /// The layer's configuration.
    pub fn config(&self) -> &AttentionConfig {
        &self.cfg
    }

    /// Draws the dropout seeds of one training forward pass, in the order the layer's own
    /// forward passes draw them: for callers that fuse the layer's work into an op of their
    /// own ([`crate::rows::QkvRows`], [`dropout_multipliers`]) and must draw the same masks as
    /// the layer would. Every training forward of the layer draws its seeds here.
    pub fn draw_training_seeds(&self) -> TrainingSeeds {
        let attention = splitmix64(&self.seeds);
        let output = (self.cfg.dropout > 0.0).then(|| splitmix64(&self.seeds));
        TrainingSeeds { attention, output }
    }

    /// State of the dropout seed sequence (save it with a checkpoint).
    pub fn seed_state(&self) -> u64 {
        self.seeds.load(Ordering::Relaxed)
    }

    /// Restarts the dropout seed sequence from `state`.
    pub fn set_seed_state(&self, state: u64) {
        self.seeds.store(state, Ordering::Relaxed);
    }

    fn head_dim(&self) -> usize {
        self.cfg.n_embd / self.cfg.n_head
    }

    /// The `c_attn` projection `(..., 3·C)` of `x` `(..., C)`, whose width it checks.
    fn qkv(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.dim(D::Minus1)?;
        if c != self.cfg.n_embd {
            bail!(
                "CausalSelfAttention: input has {c} features, expected n_embd = {}",
                self.cfg.n_embd
            );
        }
        let qkv = self.c_attn.forward(x)?;
        let width = qkv.dim(D::Minus1)?;
        if width != 3 * c {
            bail!(
                "CausalSelfAttention: c_attn returned {width} features, expected 3·n_embd = {}",
                3 * c
            );
        }
        Ok(qkv)
    }

    /// q, k, v as `(B, T, H, D)` views of the packed `c_attn` output, no copies.
    fn heads(&self, qkv: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = qkv.dims3()?;
        let x = qkv.reshape((b, t, 3, self.cfg.n_head, self.head_dim()))?;
        Ok((
            x.narrow(2, 0, 1)?.squeeze(2)?,
            x.narrow(2, 1, 1)?.squeeze(2)?,
            x.narrow(2, 2, 1)?.squeeze(2)?,
        ))
    }

    /// `c_proj` and residual dropout (seeded by `dropout_seed`, none without) of the attention
    /// output `(B, T, H, D)`, as `(B, T, C)`.
    fn project(&self, y: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let (b, t, _, _) = y.dims4()?;
        self.project_rows(&y.reshape((b * t, self.cfg.n_embd))?, dropout_seed)?
            .reshape((b, t, self.cfg.n_embd))
    }

    /// `c_proj` and residual dropout (seeded by `dropout_seed`, none without) of attention
    /// output rows `(N, C)`.
    fn project_rows(&self, y: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let y = self.c_proj.forward(y)?;
        let width = y.dim(D::Minus1)?;
        if width != self.cfg.n_embd {
            bail!(
                "CausalSelfAttention: c_proj returned {width} features, expected n_embd = {}",
                self.cfg.n_embd
            );
        }
        match dropout_seed {
            Some(seed) => dropout(&y, self.cfg.dropout, seed),
            None => Ok(y),
        }
    }

    /// The layer on token rows `x` `(B·T, C)`, sequences of `seq_len` = T tokens one after the
    /// other: [`ModuleT::forward_t`] of `x` reshaped to `(B, T, C)`, returned as rows `(B·T, C)`.
    /// For models that keep their residual stream as a matrix (nanogpt does): on the CPU no
    /// reshape enters the autograd graph, where each node costs Candle's backward a zero-filled
    /// buffer and an addition.
    ///
    /// ```
    /// use attn_op::nn::{AttentionConfig, Causality, CausalSelfAttention};
    /// use candle_core::{DType, Device, ModuleT, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// let vm = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    /// let cfg = AttentionConfig { n_embd: 32, n_head: 4, bias: false, dropout: 0.0, causality: Causality::Always };
    /// let attn = CausalSelfAttention::new(cfg, vb)?;
    /// let x = Tensor::randn(0f32, 1., (2 * 10, 32), &Device::Cpu)?;
    /// let rows = attn.forward_rows(&x, 10, true)?;
    /// let batched = attn.forward_t(&x.reshape((2, 10, 32))?, true)?;
    /// assert_eq!(rows.to_vec2::<f32>()?, batched.reshape((20, 32))?.to_vec2::<f32>()?);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn forward_rows(&self, x: &Tensor, seq_len: usize, train: bool) -> Result<Tensor> {
        let (n, _) = x.dims2()?;
        if seq_len == 0 || !n.is_multiple_of(seq_len) {
            bail!(
                "CausalSelfAttention::forward_rows: seq_len = {seq_len} must be positive and divide the {n} rows"
            );
        }
        self.attend_rows(x, n / seq_len, seq_len, train)
    }

    /// Rows `(B·T, C)` to rows `(B·T, C)`.
    fn attend_rows(&self, x: &Tensor, b: usize, t: usize, train: bool) -> Result<Tensor> {
        let _span = tracing::debug_span!("CausalSelfAttention").entered();
        let c = self.cfg.n_embd;
        x.dims2()?;
        // A 2-D product: no reshape nodes.
        let qkv = self.qkv(x)?;
        let seeds = train.then(|| self.draw_training_seeds());
        let (q, k, v) = self.heads(&qkv.reshape((b, t, 3 * c))?)?;
        let (q, k, v) = (q.transpose(1, 2)?, k.transpose(1, 2)?, v.transpose(1, 2)?);
        let opts = SdpaOptions {
            is_causal: self.causal(train),
            dropout_p: if train { self.cfg.dropout } else { 0.0 },
            seed: seeds.map(|s| s.attention),
            ..Default::default()
        };
        let backend = select_backend(&q, &k, &v, &opts)?.backend;
        let y = if x.device().is_cpu() && !emulating_cuda() && backend != Backend::Math && t > 0 {
            // Straight from the packed projection rows: backward returns one gradient for them
            // instead of three zero-padded pieces (the views above are not used). The CUDA
            // emulator takes the views, as a GPU does.
            let _span = span(backend).entered();
            let rows = QkvRows::new(self.cfg.n_head, self.head_dim(), t, opts.is_causal)?
                .with_dropout(opts.dropout_p, opts.seed.unwrap_or(0))?;
            qkv.contiguous()?.apply_op1(QkvAttention::new(rows))?
        } else {
            scaled_dot_product_attention(&q, &k, &v, &opts)?
                .transpose(1, 2)?
                .reshape((b * t, c))?
        };
        self.project_rows(&y, seeds.and_then(|s| s.output))
    }

    fn causal(&self, train: bool) -> bool {
        match self.cfg.causality {
            Causality::Always => true,
            Causality::TrainingOnly => train,
            Causality::Never => false,
        }
    }

    /// Incremental decoding: `x` `(B, T_new, C)` holds the positions after those in `cache`,
    /// which grows by them. Causal with the new queries aligned to the end of the cache
    /// (bottom-right), so the result equals the full forward's last `T_new` positions. Evaluation
    /// mode (no dropout).
    pub fn forward_cached(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let _span = tracing::debug_span!("CausalSelfAttention").entered();
        let (q, k, v) = self.heads(&self.qkv(x)?)?;
        let (k, v) = match cache.kv.take() {
            Some((k0, v0)) => (Tensor::cat(&[&k0, &k], 1)?, Tensor::cat(&[&v0, &v], 1)?),
            None => (k.contiguous()?, v.contiguous()?),
        };
        let (lq, lk) = (q.dim(1)?, k.dim(1)?);
        // The new queries end where the keys end. With one query (a decoding step) the causal
        // mask hides nothing, and with as many queries as keys (the first call) it is SDPA's
        // top-left one; only several new queries after a cache need it spelt out.
        let causal = self.causal(false) && lq > 1;
        let opts = SdpaOptions {
            is_causal: causal && lq == lk,
            attn_mask: if causal && lq != lk {
                Some(bottom_right_mask(lq, lk, x.device())?)
            } else {
                None
            },
            ..Default::default()
        };
        // Through the dispatcher, so that each device gets a kernel that takes the dtype (on
        // CUDA, f32 goes to the efficient kernels, f16/bf16 to flash).
        let y = scaled_dot_product_attention(
            &q.transpose(1, 2)?,
            &k.transpose(1, 2)?,
            &v.transpose(1, 2)?,
            &opts,
        )?
        .transpose(1, 2)?;
        cache.kv = Some((k, v));
        self.project(&y, None)
    }

    /// Packed variable-length sequences: `x` `(total, C)` holds the sequences one after the
    /// other, `cu_seqlens` (u32, `batch + 1` values from 0) their cumulative lengths. Equals
    /// running [`ModuleT::forward_t`] on each sequence alone, without padding.
    pub fn forward_packed(&self, x: &Tensor, cu_seqlens: &Tensor, train: bool) -> Result<Tensor> {
        let _span = tracing::debug_span!("CausalSelfAttention").entered();
        let (total, _) = x.dims2()?;
        let (q, k, v) = self.heads(&self.qkv(&x.unsqueeze(0)?)?)?;
        let (q, k, v) = (q.squeeze(0)?, k.squeeze(0)?, v.squeeze(0)?);
        if cu_seqlens.dtype() != DType::U32 || cu_seqlens.rank() != 1 {
            bail!("CausalSelfAttention::forward_packed: cu_seqlens must be a 1-D u32 tensor");
        }
        let cu: Vec<usize> = cu_seqlens
            .to_vec1::<u32>()?
            .into_iter()
            .map(|c| c as usize)
            .collect();
        if cu.first() != Some(&0) || cu.windows(2).any(|w| w[1] < w[0]) || cu.last() != Some(&total)
        {
            bail!("CausalSelfAttention::forward_packed: cu_seqlens {cu:?} must rise from 0 to the {total} packed tokens");
        }
        let scale = 1.0 / (self.head_dim() as f32).sqrt();
        let mut cfg = AttnConfig::new(
            scale,
            self.causal(train).then_some(CausalAlign::BottomRight),
        );
        let seeds = train.then(|| self.draw_training_seeds());
        if let Some(seeds) = seeds {
            cfg.dropout = Dropout::new(self.cfg.dropout, seeds.attention);
        }
        let varlen = Varlen {
            cu_q: cu.clone(),
            cu_k: cu,
        };
        let (qt, kt, vt) = (q.transpose(0, 1)?, k.transpose(0, 1)?, v.transpose(0, 1)?);
        // Flash, or the efficient op where the flash kernels refuse the problem (on CUDA: f32,
        // below sm80) or `sdpa_kernel` disables flash; both read the packed sequences alike.
        let what = "CausalSelfAttention::forward_packed";
        let opts = SdpaOptions {
            scale: Some(f64::from(scale)),
            ..Default::default()
        };
        let p = check_sdpa(what, &qt, &kt, &vt, &opts)?;
        let y = match select(&p, &opts, x.device()) {
            Ok(s) if s.backend == Backend::Flash => {
                qt.apply_op3(&kt, &vt, FlashAttention::from_config(cfg).packed(varlen))?
            }
            Ok(s) if s.backend == Backend::Efficient => qt.apply_op3(
                &kt,
                &vt,
                EfficientAttention::from_config(cfg).packed(varlen),
            )?,
            Ok(s) => bail!(
                "{what}: packed sequences need the flash or efficient backend ({})",
                reasons(&s.refused)
            ),
            Err(e) => bail!("{what}: {e}"),
        };
        self.project(
            &y.transpose(0, 1)?.unsqueeze(0)?,
            seeds.and_then(|s| s.output),
        )?
        .squeeze(0)
    }
}

/// Whether the CUDA emulator stands in for a GPU on this thread (feature `cuda-emu`).
fn emulating_cuda() -> bool {
    #[cfg(feature = "cuda-emu")]
    return crate::emu::is_emulating();
    #[cfg(not(feature = "cuda-emu"))]
    false
}

/// The boolean mask `(lq, lk)` (u8, 1 = may attend) of causal attention aligned bottom-right:
/// query `i` sees keys `j <= i + lk - lq`.
fn bottom_right_mask(lq: usize, lk: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<u8> = (0..lq)
        .flat_map(|i| (0..lk).map(move |j| u8::from(j + lq <= i + lk)))
        .collect();
    Tensor::from_vec(mask, (lq, lk), device)
}

impl ModuleT for CausalSelfAttention {
    /// `x` `(B, T, C)` to `(B, T, C)`; dropout only when `train`.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        self.attend_rows(&x.reshape((b * t, c))?, b, t, train)?
            .reshape((b, t, c))
    }
}

impl fmt::Display for CausalSelfAttention {
    /// Printed as PyTorch prints the tutorial's module.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.cfg.n_embd;
        let bias = if self.cfg.bias { "True" } else { "False" };
        writeln!(f, "CausalSelfAttention(")?;
        writeln!(
            f,
            "  (c_attn): Linear(in_features={c}, out_features={}, bias={bias})",
            3 * c
        )?;
        writeln!(
            f,
            "  (c_proj): Linear(in_features={c}, out_features={c}, bias={bias})"
        )?;
        writeln!(
            f,
            "  (resid_dropout): Dropout(p={}, inplace=False)",
            self.cfg.dropout
        )?;
        write!(f, ")")
    }
}
