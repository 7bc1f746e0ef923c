//! candle-flash-attn's entry points, [`flash_attn`] and [`flash_attn_varlen`], on our flash op.

use candle_core::{bail, DType, Result, Tensor};

use crate::config::Varlen;
use crate::config::{AttnConfig, CausalAlign};
use crate::dispatch::refusal;
use crate::sdpa::unit_last_dim;
use crate::validate::{check_sdpa, Problem};
use crate::{Backend, FlashAttention, SdpaOptions};

/// Validates the `(heads, L, D)` views for `api` and checks the flash backend takes them.
fn check_flash(
    api: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
) -> Result<Problem> {
    let opts = SdpaOptions {
        enable_gqa: true,
        scale: Some(softmax_scale as f64),
        ..Default::default()
    };
    let p = check_sdpa(api, q, k, v, &opts)?;
    if let Some(reason) = refusal(Backend::Flash, &p, false, q.device()) {
        bail!("{api}: {reason}");
    }
    Ok(p)
}

/// FlashAttention with candle-flash-attn's signature: q `(B, Sq, Hq, D)`, k `(B, Sk, Hkv, D)`,
/// v `(B, Sk, Hkv, Dv)` with `Hkv` dividing `Hq` (multi/grouped-query attention), output
/// `(B, Sq, Hq, Dv)`. Differentiable.
///
/// With `causal`, the mask is aligned bottom-right as in candle-flash-attn: query `i` sees keys
/// `j <= i + Sk - Sq`, so a single new query (decoding with a KV cache) sees the whole cache.
/// (`scaled_dot_product_attention`'s `is_causal` is aligned top-left, as PyTorch's.) A query
/// that sees no key (when `Sq > Sk`) gets zeros.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1., (1, 1, 4, 16), &Device::Cpu)?; // one new token
/// let kv = Tensor::randn(0f32, 1., (1, 9, 2, 16), &Device::Cpu)?; // cache of 9, 2 kv heads
/// let y = attn_op::flash_attn(&q, &kv, &kv, 0.25, true)?;
/// assert_eq!(y.dims(), &[1, 1, 4, 16]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn flash_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.rank() != 4 {
            bail!(
                "flash_attn: {name} has shape {:?}; expected rank 4, (batch, seq, heads, head_dim)",
                t.dims()
            );
        }
    }
    let (qt, kt, vt) = (q.transpose(1, 2)?, k.transpose(1, 2)?, v.transpose(1, 2)?);
    let p = check_flash("flash_attn", &qt, &kt, &vt, softmax_scale)?;
    if p.lq == 0 || p.lk == 0 {
        return Tensor::zeros(p.out_shape(), p.dtype, q.device())?.transpose(1, 2);
    }
    let op = FlashAttention::new(softmax_scale, causal.then_some(CausalAlign::BottomRight));
    let (qt, kt, vt) = (
        unit_last_dim(&qt)?,
        unit_last_dim(&kt)?,
        unit_last_dim(&vt)?,
    );
    qt.apply_op3(&kt, &vt, op)?.transpose(1, 2)
}

/// Reads and checks cumulative sequence lengths.
fn cumulative(name: &str, t: &Tensor, total: usize, max_len: usize) -> Result<Vec<usize>> {
    if t.dtype() != DType::U32 || t.rank() != 1 || t.dim(0)? == 0 {
        bail!(
            "flash_attn_varlen: {name} must be a non-empty 1-D u32 tensor of cumulative lengths, got {:?} {:?}",
            t.dtype(),
            t.dims()
        );
    }
    let cu: Vec<usize> = t
        .to_vec1::<u32>()?
        .into_iter()
        .map(|x| x as usize)
        .collect();
    for w in cu.windows(2) {
        if w[1] < w[0] {
            bail!("flash_attn_varlen: {name} = {cu:?} must be non-decreasing");
        }
        if w[1] - w[0] > max_len {
            bail!("flash_attn_varlen: {name} = {cu:?} has a sequence of {} > its max_seqlen {max_len}", w[1] - w[0]);
        }
    }
    if cu[cu.len() - 1] > total {
        bail!("flash_attn_varlen: {name} = {cu:?} ends past the {total} packed rows");
    }
    Ok(cu)
}

/// FlashAttention over packed variable-length sequences, with candle-flash-attn's signature:
/// q `(total_q, Hq, D)`, k `(total_k, Hkv, D)`, v `(total_k, Hkv, Dv)` hold the sequences one
/// after the other; `seqlens_q`/`seqlens_k` are their cumulative lengths (u32, `batch + 1`
/// values, starting at 0); `max_seqlen_*` bound the lengths. Output `(total_q, Hq, Dv)`,
/// differentiable. Causal masks are aligned bottom-right per sequence, as [`flash_attn`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let q = Tensor::randn(0f32, 1., (7, 2, 8), &dev)?; // sequences of 3 and 4 tokens
/// let cu = Tensor::new(&[0u32, 3, 7], &dev)?;
/// let y = attn_op::flash_attn_varlen(&q, &q, &q, &cu, &cu, 4, 4, 0.35, true)?;
/// assert_eq!(y.dims(), &[7, 2, 8]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.rank() != 3 {
            bail!("flash_attn_varlen: {name} has shape {:?}; expected rank 3, (total_tokens, heads, head_dim)", t.dims());
        }
    }
    let (qt, kt, vt) = (q.transpose(0, 1)?, k.transpose(0, 1)?, v.transpose(0, 1)?);
    let p = check_flash("flash_attn_varlen", &qt, &kt, &vt, softmax_scale)?;
    let cu_q = cumulative("seqlens_q", seqlens_q, p.lq, max_seqlen_q)?;
    let cu_k = cumulative("seqlens_k", seqlens_k, p.lk, max_seqlen_k)?;
    if cu_q.len() != cu_k.len() {
        bail!(
            "flash_attn_varlen: seqlens_q has {} entries but seqlens_k has {}; both are batch + 1",
            cu_q.len(),
            cu_k.len()
        );
    }
    if p.lq == 0 {
        return Tensor::zeros(p.out_shape(), p.dtype, q.device())?.transpose(0, 1);
    }
    let op = FlashAttention::from_config(AttnConfig::new(
        softmax_scale,
        causal.then_some(CausalAlign::BottomRight),
    ))
    .packed(Varlen { cu_q, cu_k });
    let (qt, kt, vt) = (
        unit_last_dim(&qt)?,
        unit_last_dim(&kt)?,
        unit_last_dim(&vt)?,
    );
    qt.apply_op3(&kt, &vt, op)?.transpose(0, 1)
}
