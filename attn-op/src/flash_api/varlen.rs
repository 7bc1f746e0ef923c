//! The packed variable-length entry points: q `(total_q, Hq, D)`, k `(total_k, Hkv, D)`,
//! v `(total_k, Hkv, Dv)` hold the sequences one after the other; `seqlens_q`/`seqlens_k` are
//! their cumulative lengths (u32, `batch + 1` values, starting at 0); `max_seqlen_*` bound the
//! lengths. Output `(total_q, Hq, Dv)`. Masks, windows and ALiBi are aligned per sequence.

use candle_core::{bail, DType, Result, Tensor};

use super::{check_flash, check_rank, Extras};
use crate::config::Varlen;
use crate::sdpa::unit_last_dim;
use crate::FlashAttention;

/// Reads and checks cumulative sequence lengths.
pub(super) fn cumulative(
    api: &str,
    name: &str,
    t: &Tensor,
    total: usize,
    max_len: usize,
) -> Result<Vec<usize>> {
    if t.dtype() != DType::U32 || t.rank() != 1 || t.dim(0)? == 0 {
        bail!(
            "{api}: {name} must be a non-empty 1-D u32 tensor of cumulative lengths, got {:?} {:?}",
            t.dtype(),
            t.dims()
        );
    }
    let cu: Vec<usize> = t
        .to_vec1::<u32>()?
        .into_iter()
        .map(|x| x as usize)
        .collect();
    if cu[0] != 0 {
        bail!("{api}: {name} = {cu:?} must start at 0");
    }
    for w in cu.windows(2) {
        if w[1] < w[0] {
            bail!("{api}: {name} = {cu:?} must be non-decreasing");
        }
        if w[1] - w[0] > max_len {
            bail!(
                "{api}: {name} = {cu:?} has a sequence of {} > its max_seqlen {max_len}",
                w[1] - w[0]
            );
        }
    }
    if cu[cu.len() - 1] > total {
        bail!("{api}: {name} = {cu:?} ends past the {total} packed rows");
    }
    Ok(cu)
}

/// The cumulative lengths of q and k, checked against each other.
pub(super) fn lengths(
    api: &str,
    (seqlens_q, total_q, max_q): (&Tensor, usize, usize),
    (seqlens_k, total_k, max_k): (&Tensor, usize, usize),
) -> Result<Varlen> {
    let cu_q = cumulative(api, "seqlens_q", seqlens_q, total_q, max_q)?;
    let cu_k = cumulative(api, "seqlens_k", seqlens_k, total_k, max_k)?;
    if cu_q.len() != cu_k.len() {
        bail!(
            "{api}: seqlens_q has {} entries but seqlens_k has {}; both are batch + 1",
            cu_q.len(),
            cu_k.len()
        );
    }
    Ok(Varlen { cu_q, cu_k })
}

/// The packed call behind the public functions (and the paged one, once its keys are gathered).
#[allow(clippy::too_many_arguments)]
pub(super) fn packed(
    api: &str,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    extras: Extras,
) -> Result<Tensor> {
    let what = "(total_tokens, heads, head_dim)";
    check_rank(api, 3, what, [("q", q), ("k", k), ("v", v)])?;
    let (qt, kt, vt) = (q.transpose(0, 1)?, k.transpose(0, 1)?, v.transpose(0, 1)?);
    let p = check_flash(api, (&qt, &kt, &vt), softmax_scale)?;
    let varlen = lengths(
        api,
        (seqlens_q, p.lq, max_seqlen_q),
        (seqlens_k, p.lk, max_seqlen_k),
    )?;
    let cfg = extras.config(api, &p, max_seqlen_k, softmax_scale)?;
    if p.lq == 0 {
        return Tensor::zeros(p.out_shape(), p.dtype, q.device())?.transpose(0, 1);
    }
    let op = FlashAttention::from_config(cfg).packed(varlen);
    let (qt, kt, vt) = (
        unit_last_dim(&qt)?,
        unit_last_dim(&kt)?,
        unit_last_dim(&vt)?,
    );
    qt.apply_op3(&kt, &vt, op)?.transpose(0, 1)
}

/// FlashAttention over packed variable-length sequences, with candle-flash-attn's signature;
/// differentiable. Causal masks are aligned bottom-right per sequence, as in
/// [`crate::flash_attn`].
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
    let api = "flash_attn_varlen";
    let (sq, sk) = (seqlens_q, seqlens_k);
    let extras = Extras::causal(causal);
    packed(
        api,
        (q, k, v),
        sq,
        sk,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        extras,
    )
}

/// [`flash_attn_varlen`] with the sliding window of [`crate::flash_attn_windowed`], per
/// sequence; a window wider than `max_seqlen_k` is an error.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let q = Tensor::randn(0f32, 1., (7, 2, 8), &dev)?;
/// let cu = Tensor::new(&[0u32, 3, 7], &dev)?;
/// let y = attn_op::flash_attn_varlen_windowed(&q, &q, &q, &cu, &cu, 4, 4, 0.35, Some(1), Some(0))?;
/// assert_eq!(y.dims(), &[7, 2, 8]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    let api = "flash_attn_varlen_windowed";
    let (sq, sk) = (seqlens_q, seqlens_k);
    let extras = Extras::window(window_size_left, window_size_right);
    packed(
        api,
        (q, k, v),
        sq,
        sk,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        extras,
    )
}

/// [`flash_attn_varlen`] with the ALiBi slopes of [`crate::flash_attn_alibi`] (f32, `(Hq,)`).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let q = Tensor::randn(0f32, 1., (7, 2, 8), &dev)?;
/// let cu = Tensor::new(&[0u32, 3, 7], &dev)?;
/// let slopes = Tensor::new(&[0.5f32, 0.25], &dev)?;
/// let y = attn_op::flash_attn_varlen_alibi(&q, &q, &q, &slopes, &cu, &cu, 4, 4, 0.35, true)?;
/// assert_eq!(y.dims(), &[7, 2, 8]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_alibi(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let api = "flash_attn_varlen_alibi";
    let (sq, sk) = (seqlens_q, seqlens_k);
    let extras = Extras::causal(causal).with_alibi(Some(alibi_slopes));
    packed(
        api,
        (q, k, v),
        sq,
        sk,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        extras,
    )
}

/// [`flash_attn_varlen_alibi`] with a sliding window.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let q = Tensor::randn(0f32, 1., (7, 2, 8), &dev)?;
/// let cu = Tensor::new(&[0u32, 3, 7], &dev)?;
/// let slopes = Tensor::new(&[0.5f32, 0.25], &dev)?;
/// let y = attn_op::flash_attn_varlen_alibi_windowed(&q, &q, &q, &slopes, &cu, &cu, 4, 4, 0.35, Some(2), None)?;
/// assert_eq!(y.dims(), &[7, 2, 8]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_alibi_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    let api = "flash_attn_varlen_alibi_windowed";
    let (sq, sk) = (seqlens_q, seqlens_k);
    let extras = Extras::window(window_size_left, window_size_right).with_alibi(Some(alibi_slopes));
    packed(
        api,
        (q, k, v),
        sq,
        sk,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        extras,
    )
}

/// [`flash_attn_varlen_alibi_windowed`] with optional slopes and the soft cap of
/// [`crate::flash_attn_alibi_windowed_softcap`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let q = Tensor::randn(0f32, 1., (7, 2, 8), &dev)?;
/// let cu = Tensor::new(&[0u32, 3, 7], &dev)?;
/// let y = attn_op::flash_attn_varlen_alibi_windowed_softcap(
///     &q, &q, &q, None, &cu, &cu, 4, 4, 0.35, None, Some(0), 30.0,
/// )?;
/// assert_eq!(y.dims(), &[7, 2, 8]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_alibi_windowed_softcap(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: Option<&Tensor>,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
    softcap: f32,
) -> Result<Tensor> {
    let api = "flash_attn_varlen_alibi_windowed_softcap";
    let (sq, sk) = (seqlens_q, seqlens_k);
    let extras = Extras::window(window_size_left, window_size_right)
        .with_alibi(alibi_slopes)
        .with_softcap(softcap);
    packed(
        api,
        (q, k, v),
        sq,
        sk,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        extras,
    )
}
