//! The math backend: attention composed of Candle ops, differentiable by Candle's autograd.
//! It supports every option and is the reference the fused backends are checked against.

use candle_core::{DType, Device, Result, Tensor, D};

use crate::config::Band;
use crate::philox::DropoutMask;
use crate::validate::{sdpa_band, Problem};
use crate::SdpaOptions;

/// Softmax over the last dim that gives zeros (and zero gradients) for a row of `-inf`.
/// Built from differentiable ops only (`candle_nn::ops::softmax_last_dim` has no backward).
pub fn masked_softmax_last_dim(scores: &Tensor) -> Result<Tensor> {
    let max = scores.max_keepdim(D::Minus1)?.detach();
    // A fully masked row has max -inf: shift it by a finite number instead so exp gives 0, not NaN.
    let max = max.maximum(f32::MIN)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    // Any visible key contributes e^0 = 1 to the sum, so only an empty row sums to 0: divide
    // it by 1 instead (a constant, so its gradient stays 0 rather than 0/0).
    let empty = sum.eq(0.0)?.to_dtype(sum.dtype())?;
    let sum = (sum + empty)?;
    e.broadcast_div(&sum)
}

/// Keep mask of dropout as a tensor `(..., Lq, Lk)`: `1/(1-p)` where kept, 0 where dropped,
/// the same elements the fused backends drop for this seed.
pub(crate) fn dropout_keep(
    p: &Problem,
    dropout_p: f64,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mask = DropoutMask::new(dropout_p, seed);
    let streams: usize = p.lead.iter().product();
    let scale = (1.0 / (1.0 - dropout_p)) as f32;
    let mut keep = vec![0f32; streams * p.lq * p.lk];
    for (n, block) in keep
        .chunks_exact_mut((p.lq * p.lk).max(1))
        .enumerate()
        .take(streams)
    {
        for (row, r) in block.chunks_exact_mut(p.lk.max(1)).enumerate() {
            mask.fill_row(n, row, 0, r);
        }
        for v in block.iter_mut() {
            *v *= scale;
        }
    }
    Tensor::from_vec(keep, p.scores_shape(), device)?.to_dtype(dtype)
}

/// Repeats each key/value head `group` times along dim -3 (`repeat_interleave`).
fn repeat_heads(x: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(x.clone());
    }
    let r = x.rank();
    let mut dims = x.dims().to_vec();
    let expanded = x.unsqueeze(r - 2)?;
    let mut bdims = expanded.dims().to_vec();
    bdims[r - 2] = group;
    dims[r - 3] *= group;
    expanded.broadcast_as(bdims)?.contiguous()?.reshape(dims)
}

/// The `(Lq, Lk)` mask of a band (causal mask, sliding window), 1 = may attend.
fn band_mask(lq: usize, lk: usize, band: Band, device: &Device) -> Result<Tensor> {
    let b = band.offsets(lq, lk);
    let m: Vec<u8> = (0..lq)
        .flat_map(|i| {
            let (first, end) = b.keys(i, lk);
            (0..lk).map(move |j| u8::from(first <= j && j < end))
        })
        .collect();
    Tensor::from_vec(m, (lq, lk), device)
}

/// `scores` where `mask` is nonzero, `-inf` elsewhere.
fn mask_out(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let neg_inf = Tensor::new(f32::NEG_INFINITY, scores.device())?
        .to_dtype(scores.dtype())?
        .broadcast_as(scores.shape())?;
    mask.broadcast_as(scores.shape())?
        .where_cond(scores, &neg_inf)
}

/// Attention by composition. Half-precision inputs are computed in f32 and the output cast back.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &SdpaOptions,
    p: &Problem,
    seed: u64,
) -> Result<Tensor> {
    let dtype = p.dtype;
    let compute = if matches!(dtype, DType::F16 | DType::BF16) {
        DType::F32
    } else {
        dtype
    };
    let group = p.hq / p.hkv;
    // The scores (..., Lq, Lk) are materialised here.
    crate::validate::checked_elems("attention (math)", "the scores", &p.scores_shape(), 4)?;
    // Candle's batched matmul takes rank-3 operands best: flatten the leading dims.
    let n: usize = p.lead.iter().product();
    let q = q.to_dtype(compute)?.contiguous()?.reshape((n, p.lq, p.e))?;
    let k = repeat_heads(&k.to_dtype(compute)?, group)?
        .contiguous()?
        .reshape((n, p.lk, p.e))?;
    let v = repeat_heads(&v.to_dtype(compute)?, group)?
        .contiguous()?
        .reshape((n, p.lk, p.ev))?;
    let full = |m: &Tensor| -> Result<Tensor> {
        m.broadcast_as(p.scores_shape())?.reshape((n, p.lq, p.lk))
    };
    let mut scores = (q.matmul(&k.t()?)? * p.scale)?;
    if let Some(c) = opts.softcap {
        scores = ((scores / c)?.tanh()? * c)?;
    }
    if let Some(band) = sdpa_band(opts) {
        scores = mask_out(&scores, &band_mask(p.lq, p.lk, band, q.device())?)?;
    }
    match &opts.attn_mask {
        Some(m) if m.dtype() == DType::U8 => scores = mask_out(&scores, &full(m)?)?,
        Some(m) => scores = (scores + full(&m.to_dtype(compute)?)?)?,
        None => {}
    }
    let mut probs = masked_softmax_last_dim(&scores)?;
    if opts.dropout_p > 0.0 {
        probs = (probs * full(&dropout_keep(p, opts.dropout_p, seed, compute, q.device())?)?)?;
    }
    probs.matmul(&v)?.reshape(p.out_shape())?.to_dtype(dtype)
}
