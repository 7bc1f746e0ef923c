//! [`FlashAttention`]: FlashAttention-2 as a Candle op.

use super::fused::Fused;
use crate::config::Varlen;
use crate::config::{AttnConfig, CausalAlign};
use crate::Backend;

/// FlashAttention-2 as a `CustomOp3` on `(q, k, v)`, forward and backward.
///
/// Inputs are `(..., H, L, D)` (q `(..., Hq, Lq, E)`, k `(..., Hkv, Lk, E)`, v `(..., Hkv, Lk, Ev)`
/// with `Hkv` dividing `Hq`), read through their strides when the last dim is contiguous;
/// f32, f16 or bf16, computed in f32. The output is `(..., Hq, Lq, Ev)`. Scores are tiled with an
/// online softmax, never stored whole; backward recomputes them from the row logsumexp.
/// Use one op value per call (as `apply_op3` does).
///
/// ```
/// use attn_op::{CausalAlign, FlashAttention};
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1., (2, 4, 16, 32), &Device::Cpu)?;
/// let y = q.apply_op3(&q, &q, FlashAttention::new(0.125, Some(CausalAlign::TopLeft)))?;
/// assert_eq!(y.dims(), &[2, 4, 16, 32]);
/// // Causal over the last 8 keys, capped at 30, with ALiBi (4 heads).
/// let op = FlashAttention::new(0.125, None)
///     .with_window(CausalAlign::BottomRight, Some(8), Some(0))
///     .with_softcap(30.0)?
///     .with_alibi(&[0.5, 0.25, 0.125, 0.0625])?;
/// let y = q.apply_op3(&q, &q, op)?;
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct FlashAttention(pub(crate) Fused);

impl FlashAttention {
    /// Attention with `softmax_scale` multiplying `q·k`, optionally causal.
    pub fn new(softmax_scale: f32, causal: Option<CausalAlign>) -> Self {
        Self::from_config(AttnConfig::new(softmax_scale, causal))
    }

    pub(crate) fn from_config(cfg: AttnConfig) -> Self {
        Self(Fused::new(cfg))
    }

    pub(crate) fn packed(mut self, varlen: Varlen) -> Self {
        self.0.cfg.varlen = Some(varlen);
        self
    }

    /// Packed queries against a paged cache: `blocks[s]` lists sequence `s`'s blocks (CPU).
    pub(crate) fn paged(mut self, varlen: Varlen, blocks: Vec<Vec<usize>>) -> Self {
        self.0.cfg.varlen = Some(varlen);
        self.0.cfg.pages = Some(blocks);
        self
    }
}

fused_op!(
    FlashAttention,
    "flash-attention",
    "flash_attention.forward",
    "flash_attention.backward",
    Backend::Flash
);
