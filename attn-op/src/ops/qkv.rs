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

/// A `len`-element buffer of rows of `row_len`, each row filled piece by piece (`d` elements at
/// a time) from `piece(row, j)`, rows in parallel: the reorderings between head-major and
/// token-major layouts below.
fn gather<'a>(
    len: usize,
    row_len: usize,
    d: usize,
    piece: impl Fn(usize, usize) -> &'a [f32] + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; len];
    if d == 0 || row_len == 0 {
        return out;
    }
    out.par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(r, row)| {
            for (j, dst) in row.chunks_exact_mut(d).enumerate() {
                dst.copy_from_slice(&piece(r, j)[..d]);
            }
        });
    out
}

/// Copies `(B·H, T, D)` rows (head-major) into `(B, T, H, D)` order (token-major).
fn heads_to_tokens(rows: &[f32], h: usize, t: usize, d: usize) -> Vec<f32> {
    gather(rows.len(), h * d, d, |bt, hi| {
        &rows[(((bt / t) * h + hi) * t + bt % t) * d..]
    })
}

/// Copies token rows `(B·T, H·D)` into `(B, H, T, D)` order (head-major).
fn tokens_to_heads(rows: &[f32], h: usize, t: usize, d: usize) -> Vec<f32> {
    gather(rows.len(), t * d, d, |bh, ti| {
        &rows[(((bh / h) * t + ti) * h + bh % h) * d..]
    })
}

/// Packs the `(B, H, T, D)` gradients of q, k and v into the token rows `(B·T, 3·H·D)` of the
/// packed tensor.
fn pack_heads(grads: [&[f32]; 3], h: usize, t: usize, d: usize) -> Vec<f32> {
    gather(3 * grads[0].len(), 3 * h * d, d, |bt, j| {
        &grads[j / h][(((bt / t) * h + j % h) * t + bt % t) * d..]
    })
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
            let rows = with_f32_rows(x, |rows| Ok(tokens_to_heads(rows, h, t, d)))?;
            Tensor::from_vec(rows, (b, h, t, d), dev)?.to_dtype(x.dtype())
        };
        let lse = self.fused.lse(Backend::Flash, &q, &k, &v)?;
        let grads = self
            .fused
            .cpu_backward_rows(&q, &k, &v, &heads(res)?, &heads(grad)?, &lse)?;
        let packed = pack_heads([&grads.dq, &grads.dk, &grads.dv], h, t, d);
        Ok(Some(
            Tensor::from_vec(packed, (b * t, 3 * h * d), dev)?.to_dtype(qkv.dtype())?,
        ))
    }
}
