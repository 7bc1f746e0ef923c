//! The dense entry points: q `(B, Sq, Hq, D)`, k `(B, Sk, Hkv, D)`, v `(B, Sk, Hkv, Dv)` with
//! `Hkv` dividing `Hq` (multi/grouped-query attention), output `(B, Sq, Hq, Dv)`.

use candle_core::{Result, Tensor};

use super::{check_flash, check_rank, Extras};
use crate::sdpa::unit_last_dim;
use crate::FlashAttention;

/// The dense call behind the five public functions.
fn dense(
    api: &str,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    softmax_scale: f32,
    extras: Extras,
) -> Result<Tensor> {
    let what = "(batch, seq, heads, head_dim)";
    check_rank(api, 4, what, [("q", q), ("k", k), ("v", v)])?;
    let (qt, kt, vt) = (q.transpose(1, 2)?, k.transpose(1, 2)?, v.transpose(1, 2)?);
    let p = check_flash(api, (&qt, &kt, &vt), softmax_scale)?;
    let cfg = extras.config(api, &p, p.lk, softmax_scale)?;
    if p.lq == 0 || p.lk == 0 {
        return Tensor::zeros(p.out_shape(), p.dtype, q.device())?.transpose(1, 2);
    }
    let op = FlashAttention::from_config(cfg);
    let (qt, kt, vt) = (
        unit_last_dim(&qt)?,
        unit_last_dim(&kt)?,
        unit_last_dim(&vt)?,
    );
    qt.apply_op3(&kt, &vt, op)?.transpose(1, 2)
}

/// FlashAttention with candle-flash-attn's signature: `softmax(q·kᵀ·softmax_scale)·v` per
/// head, differentiable. With `causal`, query `i` sees keys `j <= i + Sk - Sq` (aligned
/// bottom-right, so one new query decoding with a KV cache sees the whole cache). A query that
/// sees no key (when `Sq > Sk`) gets zeros.
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
    dense(
        "flash_attn",
        (q, k, v),
        softmax_scale,
        Extras::causal(causal),
    )
}

/// [`flash_attn`] with a sliding window: query `i` sees key `j` when
/// `i + Sk - Sq - window_size_left <= j <= i + Sk - Sq + window_size_right`, `None` meaning
/// unlimited on that side; `(None, Some(0))` is causal, `(Some(w), Some(0))` Mistral's causal
/// window of `w + 1` keys. A window wider than the `Sk` keys is an error (pass `None`).
/// Time grows with the keys each query sees, not with `Sk`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1., (1, 64, 2, 16), &Device::Cpu)?;
/// let y = attn_op::flash_attn_windowed(&q, &q, &q, 0.25, Some(8), Some(0))?;
/// assert_eq!(y.dims(), &[1, 64, 2, 16]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn flash_attn_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    let extras = Extras::window(window_size_left, window_size_right);
    dense("flash_attn_windowed", (q, k, v), softmax_scale, extras)
}

/// [`flash_attn`] with ALiBi: `alibi_slopes` (f32, shape `(Hq,)`) adds
/// `-slope[h]·|i + Sk - Sq - j|` to the scaled score of query `i`, key `j` in head `h`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1., (1, 10, 2, 16), &Device::Cpu)?;
/// let slopes = Tensor::new(&[0.5f32, 0.25], &Device::Cpu)?;
/// let y = attn_op::flash_attn_alibi(&q, &q, &q, &slopes, 0.25, true)?;
/// assert_eq!(y.dims(), &[1, 10, 2, 16]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn flash_attn_alibi(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let extras = Extras::causal(causal).with_alibi(Some(alibi_slopes));
    dense("flash_attn_alibi", (q, k, v), softmax_scale, extras)
}

/// [`flash_attn_alibi`] with the window of [`flash_attn_windowed`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1., (1, 10, 2, 16), &Device::Cpu)?;
/// let slopes = Tensor::new(&[0.5f32, 0.25], &Device::Cpu)?;
/// let y = attn_op::flash_attn_alibi_windowed(&q, &q, &q, &slopes, 0.25, Some(4), Some(0))?;
/// assert_eq!(y.dims(), &[1, 10, 2, 16]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn flash_attn_alibi_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    let extras = Extras::window(window_size_left, window_size_right).with_alibi(Some(alibi_slopes));
    dense(
        "flash_attn_alibi_windowed",
        (q, k, v),
        softmax_scale,
        extras,
    )
}

/// [`flash_attn_alibi_windowed`] with optional slopes and Gemma 2's logit soft cap: the scaled
/// score `x` becomes `softcap·tanh(x / softcap)` before the ALiBi bias and the window's mask.
/// `softcap` must be finite and positive.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1., (1, 10, 2, 16), &Device::Cpu)?;
/// let y = attn_op::flash_attn_alibi_windowed_softcap(&q, &q, &q, None, 0.25, None, Some(0), 50.0)?;
/// assert_eq!(y.dims(), &[1, 10, 2, 16]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_alibi_windowed_softcap(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: Option<&Tensor>,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
    softcap: f32,
) -> Result<Tensor> {
    let extras = Extras::window(window_size_left, window_size_right)
        .with_alibi(alibi_slopes)
        .with_softcap(softcap);
    let api = "flash_attn_alibi_windowed_softcap";
    dense(api, (q, k, v), softmax_scale, extras)
}
