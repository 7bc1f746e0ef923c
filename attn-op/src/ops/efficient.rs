//! [`EfficientAttention`]: memory-efficient attention (xformers style) as a Candle op.

use candle_core::{bail, DType, Result, Tensor};

use super::fused::Fused;
use crate::config::Varlen;
use crate::config::{AttnConfig, CausalAlign};
use crate::validate::is_float;
use crate::Backend;

/// Memory-efficient attention as a `CustomOp3` on `(q, k, v)`, forward and backward: everything
/// [`crate::FlashAttention`] does, plus an attention mask (additive bias or boolean) and any head
/// dim. Shapes as [`crate::FlashAttention`]. The mask gets no gradient.
///
/// ```
/// use attn_op::EfficientAttention;
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1., (1, 2, 5, 8), &Device::Cpu)?;
/// let bias = Tensor::randn(0f32, 1., (5, 5), &Device::Cpu)?;
/// let op = EfficientAttention::new(0.35, None).with_mask(&bias)?;
/// let y = q.apply_op3(&q, &q, op)?;
/// assert_eq!(y.dims(), &[1, 2, 5, 8]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct EfficientAttention(Fused);

impl EfficientAttention {
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

    /// Adds a mask broadcastable to the scores `(..., Hq, Lq, Lk)`: `u8` (nonzero = may attend)
    /// or a float bias added to the scaled scores.
    pub fn with_mask(mut self, mask: &Tensor) -> Result<Self> {
        self.0.cfg.mask = Some(prepare_mask(mask)?);
        Ok(self)
    }
}

/// A mask as the fused kernels read it: u8 as is, float biases as f32 (no gradient).
pub(crate) fn prepare_mask(mask: &Tensor) -> Result<Tensor> {
    match mask.dtype() {
        DType::U8 => Ok(mask.detach()),
        d if is_float(d) => mask.detach().to_dtype(DType::F32),
        d => bail!("attention: attn_mask dtype {d:?} is not supported; expected u8 (boolean) or a float bias"),
    }
}

fused_op!(
    EfficientAttention,
    "efficient-attention",
    "efficient_attention.forward",
    "efficient_attention.backward",
    Backend::Efficient
);
