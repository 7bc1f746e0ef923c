//! [`scaled_dot_product_attention`]: PyTorch's SDPA with automatic backend dispatch.

use candle_core::{Result, Tensor};

use crate::config::{AttnConfig, Dropout};
use crate::dispatch::select;
use crate::ops::efficient::prepare_mask;
use crate::philox::fresh_seed;
use crate::validate::{check_sdpa, Problem};
use crate::{math, Backend, EfficientAttention, FlashAttention, SdpaOptions};

/// Scaled dot-product attention, `softmax(q·kᵀ·scale + mask) · v` with optional dropout, as
/// PyTorch's `torch.nn.functional.scaled_dot_product_attention`.
///
/// q is `(..., Lq, E)`, k `(..., Lk, E)`, v `(..., Lk, Ev)` with equal leading dims (except,
/// with `enable_gqa`, the heads at dim -3); the output is `(..., Lq, Ev)`. The first backend
/// enabled by [`crate::sdpa_kernel`] (all, by default) that supports the inputs runs, in the
/// order flash, efficient, math; [`crate::select_backend`] tells which and why.
/// All three backends are differentiable.
///
/// A query row that may attend to no key (every key masked out) gives zeros, and zero
/// gradients, never NaN. `Lq = 0` gives an empty output; `Lk = 0` gives zeros.
///
/// ```
/// use attn_op::{scaled_dot_product_attention, sdpa_kernel, Backend, SdpaOptions};
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let (q, k, v) = (
///     Tensor::randn(0f32, 1., (2, 4, 16, 32), &dev)?,
///     Tensor::randn(0f32, 1., (2, 4, 16, 32), &dev)?,
///     Tensor::randn(0f32, 1., (2, 4, 16, 32), &dev)?,
/// );
/// let y = scaled_dot_product_attention(&q, &k, &v, &SdpaOptions { is_causal: true, ..Default::default() })?;
/// let reference = {
///     let _only_math = sdpa_kernel(&[Backend::Math]);
///     scaled_dot_product_attention(&q, &k, &v, &SdpaOptions { is_causal: true, ..Default::default() })?
/// };
/// let diff = (y - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-5);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &SdpaOptions,
) -> Result<Tensor> {
    let p = check_sdpa("scaled_dot_product_attention", q, k, v, opts)?;
    let selection = select(&p, opts, q.device())?;
    run(selection.backend, q, k, v, opts, &p)
}

/// The tensor itself when its last dim is contiguous, a contiguous copy otherwise.
pub(crate) fn unit_last_dim(t: &Tensor) -> Result<Tensor> {
    let r = t.rank();
    if t.dims()[r - 1] <= 1 || t.stride()[r - 1] == 1 {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// The profiler span of one attention call on `backend`.
pub(crate) fn span(backend: Backend) -> tracing::Span {
    match backend {
        Backend::Flash => tracing::debug_span!("sdpa.flash"),
        Backend::Efficient => tracing::debug_span!("sdpa.efficient"),
        Backend::Math => tracing::debug_span!("sdpa.math"),
    }
}

/// Runs `backend` on validated inputs.
pub(crate) fn run(
    backend: Backend,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &SdpaOptions,
    p: &Problem,
) -> Result<Tensor> {
    if p.lq == 0 || p.lk == 0 {
        return Tensor::zeros(p.out_shape(), p.dtype, q.device());
    }
    let _entered = span(backend).entered();
    let y = run_backend(backend, q, k, v, opts, p)?;
    crate::profile::sync_if_profiling(y.device())?;
    Ok(y)
}

fn run_backend(
    backend: Backend,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &SdpaOptions,
    p: &Problem,
) -> Result<Tensor> {
    let seed = opts.seed.unwrap_or_else(fresh_seed);
    if backend == Backend::Math {
        return math::attention(q, k, v, opts, p, seed);
    }
    let cfg = AttnConfig {
        scale: p.scale as f32,
        band: crate::validate::sdpa_band(opts),
        dropout: Dropout::new(opts.dropout_p, seed),
        mask: opts.attn_mask.as_ref().map(prepare_mask).transpose()?,
        varlen: None,
        alibi: None,
        softcap: opts.softcap.map(|c| c as f32),
        pages: None,
    };
    let (q, k, v) = (unit_last_dim(q)?, unit_last_dim(k)?, unit_last_dim(v)?);
    match backend {
        Backend::Flash => q.apply_op3(&k, &v, FlashAttention::from_config(cfg)),
        _ => q.apply_op3(&k, &v, EfficientAttention::from_config(cfg)),
    }
}
