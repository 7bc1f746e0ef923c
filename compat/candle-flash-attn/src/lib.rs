//! [candle-flash-attn](https://crates.io/crates/candle-flash-attn) 0.11.1's functions, with the
//! same names and signatures, computed by [attn-op](https://crates.io/crates/attn-op): a Candle
//! project swaps this crate in for the crates.io one with `[patch.crates-io]` (see the README)
//! and its code is unchanged.
//!
//! Unlike the crates.io crate these run on the CPU as well as on CUDA, in f32 as well as f16 and
//! bf16, and are differentiable. The CUDA kernels come with the `cuda` feature, on by default as
//! the crates.io crate always builds for CUDA; `default-features = false` gives a CPU-only build
//! that refuses CUDA tensors with an error.
//!
//! Not provided: the `FlashAttn` struct (the crates.io crate's `CustomOp3`); use the functions,
//! or `attn_op::FlashAttention`.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! // (batch, seq, heads, head_dim): 5 new queries against a cache of 8 keys in 2 heads.
//! let q = Tensor::randn(0f32, 1., (1, 5, 4, 32), &Device::Cpu)?;
//! let kv = Tensor::randn(0f32, 1., (1, 8, 2, 32), &Device::Cpu)?;
//! let y = candle_flash_attn::flash_attn(&q, &kv, &kv, 32f32.powf(-0.5), true)?;
//! assert_eq!(y.dims(), &[1, 5, 4, 32]);
//! # Ok::<(), candle_core::Error>(())
//! ```

//! Where candle-flash-attn is lenient these follow it, not attn-op's stricter functions: a
//! window wider than the keys (`k.dim(1)`, or `max_seqlen_k` for the packed and paged functions)
//! is unlimited, and a soft cap of 0 or below means no cap.

use candle_core::{Result, Tensor};

#[doc(inline)]
pub use attn_op::{flash_attn, flash_attn_alibi, flash_attn_varlen, flash_attn_varlen_alibi};

/// candle-flash-attn's reading of a window side: one wider than the keys is unlimited.
fn window(w: Option<usize>, keys: usize) -> Option<usize> {
    w.filter(|&w| w <= keys)
}

/// The key length of a `(batch, seq, heads, dim)` tensor (a bad rank is attn-op's error).
fn keys(k: &Tensor) -> usize {
    k.dims().get(1).copied().unwrap_or(usize::MAX)
}

/// candle-flash-attn's reading of a soft cap: 0 or below is none (NaN stays, for attn-op's error).
fn cap(softcap: f32) -> Option<f32> {
    (softcap > 0.0 || softcap.is_nan()).then_some(softcap)
}

/// [`attn_op::flash_attn_windowed`], a window wider than the keys unlimited.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1., (1, 6, 2, 8), &Device::Cpu)?;
/// let wide = candle_flash_attn::flash_attn_windowed(&q, &q, &q, 0.3, Some(100), Some(0))?;
/// let causal = candle_flash_attn::flash_attn(&q, &q, &q, 0.3, true)?;
/// let diff = (wide - causal)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-5); // a window of 100 over 6 keys is every key
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
    let n = keys(k);
    let (l, r) = (window(window_size_left, n), window(window_size_right, n));
    attn_op::flash_attn_windowed(q, k, v, softmax_scale, l, r)
}

/// [`attn_op::flash_attn_alibi_windowed`], a window wider than the keys unlimited.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1., (1, 6, 2, 8), &Device::Cpu)?;
/// let slopes = Tensor::new(&[0.5f32, 0.25], &Device::Cpu)?;
/// let y = candle_flash_attn::flash_attn_alibi_windowed(&q, &q, &q, &slopes, 0.3, Some(2), Some(0))?;
/// assert_eq!(y.dims(), &[1, 6, 2, 8]);
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
    let n = keys(k);
    let (l, r) = (window(window_size_left, n), window(window_size_right, n));
    attn_op::flash_attn_alibi_windowed(q, k, v, alibi_slopes, softmax_scale, l, r)
}

/// [`attn_op::flash_attn_alibi_windowed_softcap`], a window wider than the keys unlimited and
/// a soft cap of 0 or below none.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1., (1, 6, 2, 8), &Device::Cpu)?;
/// let y = candle_flash_attn::flash_attn_alibi_windowed_softcap(&q, &q, &q, None, 0.3, None, Some(0), 0.0)?;
/// assert_eq!(y.dims(), &[1, 6, 2, 8]);
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
    let n = keys(k);
    let (l, r) = (window(window_size_left, n), window(window_size_right, n));
    match (cap(softcap), alibi_slopes) {
        (Some(c), a) => {
            attn_op::flash_attn_alibi_windowed_softcap(q, k, v, a, softmax_scale, l, r, c)
        }
        (None, Some(a)) => attn_op::flash_attn_alibi_windowed(q, k, v, a, softmax_scale, l, r),
        (None, None) => attn_op::flash_attn_windowed(q, k, v, softmax_scale, l, r),
    }
}

/// [`attn_op::flash_attn_varlen_windowed`], a window wider than `max_seqlen_k` unlimited.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1., (7, 2, 8), &Device::Cpu)?;
/// let cu = Tensor::new(&[0u32, 3, 7], &Device::Cpu)?;
/// let y = candle_flash_attn::flash_attn_varlen_windowed(&q, &q, &q, &cu, &cu, 4, 4, 0.3, Some(9), Some(0))?;
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
    let (l, r) = (
        window(window_size_left, max_seqlen_k),
        window(window_size_right, max_seqlen_k),
    );
    let (sq, sk, mq, mk) = (seqlens_q, seqlens_k, max_seqlen_q, max_seqlen_k);
    attn_op::flash_attn_varlen_windowed(q, k, v, sq, sk, mq, mk, softmax_scale, l, r)
}

/// [`attn_op::flash_attn_varlen_alibi_windowed`], a window wider than `max_seqlen_k`
/// unlimited.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1., (7, 2, 8), &Device::Cpu)?;
/// let cu = Tensor::new(&[0u32, 3, 7], &Device::Cpu)?;
/// let slopes = Tensor::new(&[0.5f32, 0.25], &Device::Cpu)?;
/// let y = candle_flash_attn::flash_attn_varlen_alibi_windowed(&q, &q, &q, &slopes, &cu, &cu, 4, 4, 0.3, Some(1), Some(0))?;
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
    let (l, r) = (
        window(window_size_left, max_seqlen_k),
        window(window_size_right, max_seqlen_k),
    );
    let (sq, sk, mq, mk) = (seqlens_q, seqlens_k, max_seqlen_q, max_seqlen_k);
    attn_op::flash_attn_varlen_alibi_windowed(
        q,
        k,
        v,
        alibi_slopes,
        sq,
        sk,
        mq,
        mk,
        softmax_scale,
        l,
        r,
    )
}

/// [`attn_op::flash_attn_varlen_alibi_windowed_softcap`], a window wider than `max_seqlen_k`
/// unlimited and a soft cap of 0 or below none.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1., (7, 2, 8), &Device::Cpu)?;
/// let cu = Tensor::new(&[0u32, 3, 7], &Device::Cpu)?;
/// let y = candle_flash_attn::flash_attn_varlen_alibi_windowed_softcap(&q, &q, &q, None, &cu, &cu, 4, 4, 0.3, None, Some(0), 20.0)?;
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
    let (l, r) = (
        window(window_size_left, max_seqlen_k),
        window(window_size_right, max_seqlen_k),
    );
    let (sq, sk, mq, mk, s) = (
        seqlens_q,
        seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
    );
    match (cap(softcap), alibi_slopes) {
        (Some(c), a) => attn_op::flash_attn_varlen_alibi_windowed_softcap(
            q, k, v, a, sq, sk, mq, mk, s, l, r, c,
        ),
        (None, Some(a)) => {
            attn_op::flash_attn_varlen_alibi_windowed(q, k, v, a, sq, sk, mq, mk, s, l, r)
        }
        (None, None) => attn_op::flash_attn_varlen_windowed(q, k, v, sq, sk, mq, mk, s, l, r),
    }
}

/// [`attn_op::flash_attn_varlen_paged_windowed`], a window wider than `max_seqlen_k`
/// unlimited and a soft cap of 0 or below none.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let cache = Tensor::randn(0f32, 1., (2, 32, 1, 8), &dev)?;
/// let q = Tensor::randn(0f32, 1., (1, 2, 8), &dev)?;
/// let (cu_q, cu_k) = (Tensor::new(&[0u32, 1], &dev)?, Tensor::new(&[0u32, 40], &dev)?);
/// let table = Tensor::new(&[[1u32, 0]], &dev)?;
/// let y = candle_flash_attn::flash_attn_varlen_paged_windowed(
///     &q, &cache, &cache, &cu_q, &cu_k, &table, None, 1, 40, 0.3, None, Some(0), 32, Some(0.0),
/// )?;
/// assert_eq!(y.dims(), &[1, 2, 8]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_paged_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    block_table: &Tensor,
    mm_prefix_ranges: Option<&Tensor>,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
    page_block_size: usize,
    softcap: Option<f32>,
) -> Result<Tensor> {
    let (l, r) = (
        window(window_size_left, max_seqlen_k),
        window(window_size_right, max_seqlen_k),
    );
    let (sq, sk, mq, mk, s) = (
        seqlens_q,
        seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
    );
    let c = softcap.and_then(cap);
    attn_op::flash_attn_varlen_paged_windowed(
        q,
        k,
        v,
        sq,
        sk,
        block_table,
        mm_prefix_ranges,
        mq,
        mk,
        s,
        l,
        r,
        page_block_size,
        c,
    )
}
