//! [`QkvAttention`]: causal self-attention read straight from a fused `c_attn` output, the token
//! rows `(B·T, 3·C)`, and written straight as the rows `(B·T, C)` that `c_proj` takes, on the CPU.
//!
//! Splitting q, k and v with `narrow`, or reshaping between `(B·T, ·)` and `(B, T, ·)`, costs
//! Candle's backward a zero-filled full-size buffer and an addition per node; this op takes and
//! returns token rows and gives the gradient of the packed tensor in one piece.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::fused::{to_storage, Fused};
use crate::config::AttnConfig;
use crate::cpu::forward::forward;
use crate::Backend;

/// Attention over the heads of packed `(B·T, 3·C)` q|k|v token rows (sequences of `seq_len`
/// tokens one after the other), as [`crate::FlashAttention`] computes it, with output `(B·T, C)`.
pub(crate) struct QkvAttention {
    fused: Fused,
    n_head: usize,
    seq_len: usize,
}

/// `(B, T, H, D)` of packed `(B·T, 3·H·D)` rows in sequences of `seq_len` = T tokens.
fn dims(shape: &[usize], n_head: usize, seq_len: usize) -> Result<(usize, usize, usize, usize)> {
    match *shape {
        [n, c3] if n_head > 0 && c3 % (3 * n_head) == 0 && seq_len > 0 && n % seq_len == 0 => {
            Ok((n / seq_len, seq_len, n_head, c3 / (3 * n_head)))
        }
        _ => bail!(
            "qkv attention: expected (B·T, 3·C) rows with T = {seq_len} > 0 dividing B·T and C a \
             multiple of {n_head} heads, got {shape:?}"
        ),
    }
}

/// Copies `(B·H, T, D)` rows (head-major) into `(B, T, H, D)` order (token-major).
fn heads_to_tokens(rows: &[f32], h: usize, t: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows.len()];
    out.par_chunks_mut(h * d)
        .enumerate()
        .for_each(|(bt, token)| {
            let (bi, ti) = (bt / t, bt % t);
            for (hi, dst) in token.chunks_exact_mut(d).enumerate() {
                let src = ((bi * h + hi) * t + ti) * d;
                dst.copy_from_slice(&rows[src..src + d]);
            }
        });
    out
}

/// Copies token rows `(B·T, H·D)` into `(B, H, T, D)` order (head-major).
fn tokens_to_heads_fn(
    b: usize,
    t: usize,
    h: usize,
    d: usize,
) -> impl Fn(&[f32]) -> Result<Vec<f32>> {
    move |rows| {
        let mut out = vec![0f32; b * h * t * d];
        out.par_chunks_mut((t * d).max(1))
            .enumerate()
            .for_each(|(bh, head)| {
                let (bi, hi) = (bh / h, bh % h);
                for (ti, dst) in head.chunks_exact_mut(d).enumerate() {
                    let src = ((bi * t + ti) * h + hi) * d;
                    dst.copy_from_slice(&rows[src..src + d]);
                }
            });
        Ok(out)
    }
}

/// Packs the `(B, H, T, D)` gradients of q, k and v into the token rows `(B·T, 3·H·D)` of the
/// packed tensor.
fn pack_heads(grads: [&[f32]; 3], b: usize, t: usize, h: usize, d: usize) -> Vec<f32> {
    let c = h * d;
    let mut out = vec![0f32; b * t * 3 * c];
    out.par_chunks_mut((3 * c).max(1))
        .enumerate()
        .for_each(|(bt, token)| {
            let (bi, ti) = (bt / t, bt % t);
            for (part, grad) in token.chunks_exact_mut(c).zip(grads) {
                for (hi, dst) in part.chunks_exact_mut(d).enumerate() {
                    let src = ((bi * h + hi) * t + ti) * d;
                    dst.copy_from_slice(&grad[src..src + d]);
                }
            }
        });
    out
}

/// Runs `f` on the elements of `x` as contiguous f32 CPU data (converted and copied only when
/// they are not).
fn with_f32_rows<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => {
            let start = layout.start_offset();
            f(&data[start..start + x.elem_count()])
        }
        _ => bail!("qkv attention: expected a CPU tensor"),
    }
}

impl QkvAttention {
    pub fn new(cfg: AttnConfig, n_head: usize, seq_len: usize) -> Self {
        Self {
            fused: Fused::new(cfg),
            n_head,
            seq_len,
        }
    }

    /// Layouts of the q, k and v heads `(B, H, T, D)` inside the packed tensor.
    fn head_layouts(&self, l: &Layout) -> Result<[Layout; 3]> {
        let (b, t, h, d) = dims(l.dims(), self.n_head, self.seq_len)?;
        if !l.is_contiguous() {
            bail!("qkv attention: the packed q|k|v tensor must be contiguous");
        }
        let c = h * d;
        let stride = vec![t * 3 * c, d, 3 * c, 1];
        Ok([0, 1, 2].map(|i| {
            Layout::new(
                Shape::from((b, h, t, d)),
                stride.clone(),
                l.start_offset() + i * c,
            )
        }))
    }

    /// q, k, v as `(B, H, T, D)` views of the packed tensor.
    fn head_views(&self, qkv: &Tensor) -> Result<[Tensor; 3]> {
        let (b, t, h, d) = dims(qkv.dims(), self.n_head, self.seq_len)?;
        let x = qkv.reshape((b, t, 3, h, d))?;
        let view = |i: usize| x.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
        Ok([view(0)?, view(1)?, view(2)?])
    }
}

impl CustomOp1 for QkvAttention {
    fn name(&self) -> &'static str {
        "qkv-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _span = tracing::debug_span!("flash_attention.forward").entered();
        let (b, t, h, d) = dims(l.dims(), self.n_head, self.seq_len)?;
        let [lq, lk, lv] = self.head_layouts(l)?;
        let (rows, lse) = self.fused.with_sources(s, &lq, s, &lk, s, &lv, |g, src| {
            Ok(forward(g, src, &self.fused.params()))
        })?;
        let n = lse.len();
        self.fused
            .keep_lse(Tensor::from_vec(lse, n, &candle_core::Device::Cpu)?);
        let y = heads_to_tokens(&rows, h, t, d);
        Ok((to_storage(y, s.dtype())?, Shape::from((b * t, h * d))))
    }

    fn bwd(&self, qkv: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _span = tracing::debug_span!("flash_attention.backward").entered();
        let (b, t, h, d) = dims(qkv.dims(), self.n_head, self.seq_len)?;
        let [q, k, v] = self.head_views(qkv)?;
        let dev = qkv.device();
        // Token rows to (B, H, T, D) heads and back in one parallel pass each, not Candle's
        // single-threaded strided copies, stack and reshape.
        let heads = |x: &Tensor| -> Result<Tensor> {
            let rows = with_f32_rows(x, tokens_to_heads_fn(b, t, h, d))?;
            Tensor::from_vec(rows, (b, h, t, d), dev)?.to_dtype(x.dtype())
        };
        let lse = self.fused.lse(Backend::Flash, &q, &k, &v)?;
        let (dq, dk, dv) =
            self.fused
                .cpu_backward(&q, &k, &v, &heads(res)?, &heads(grad)?, &lse)?;
        let (dq, dk, dv) = (
            dq.to_dtype(DType::F32)?,
            dk.to_dtype(DType::F32)?,
            dv.to_dtype(DType::F32)?,
        );
        let packed = with_f32_rows(&dq, |dq| {
            with_f32_rows(&dk, |dk| {
                with_f32_rows(&dv, |dv| Ok(pack_heads([dq, dk, dv], b, t, h, d)))
            })
        })?;
        Ok(Some(
            Tensor::from_vec(packed, (b * t, 3 * h * d), dev)?.to_dtype(qkv.dtype())?,
        ))
    }
}
