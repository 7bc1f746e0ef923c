//! [`FlashAttention`]: FlashAttention-2 as a Candle op.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::fused::Fused;
use crate::config::{AttnConfig, CausalAlign, Dropout};
use crate::cpu::geometry::Varlen;
use crate::validate::check_common;
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

    /// Drops attention weights with probability `p` (`0 <= p < 1`), the mask drawn from `seed`.
    pub fn with_dropout(mut self, p: f64, seed: u64) -> Result<Self> {
        check_common(1, p, None)?;
        self.0.cfg.dropout = Dropout::new(p, seed);
        Ok(self)
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = tracing::debug_span!("flash_attention.forward").entered();
        self.0.cpu_fwd(s1, l1, s2, l2, s3, l3)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let _span = tracing::debug_span!("flash_attention.forward").entered();
        self.0.cuda_fwd(Backend::Flash, s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _span = tracing::debug_span!("flash_attention.backward").entered();
        self.0.bwd(Backend::Flash, q, k, v, res, grad)
    }
}
