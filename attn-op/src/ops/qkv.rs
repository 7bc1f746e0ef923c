//! [`QkvAttention`]: causal self-attention read straight from a fused `c_attn` output, the token
//! rows `(B·T, 3·C)`, and written straight as the rows `(B·T, C)` that `c_proj` takes, on the CPU.
//!
//! Splitting q, k and v with `narrow`, or reshaping between `(B·T, ·)` and `(B, T, ·)`, costs
//! Candle's backward a zero-filled full-size buffer and an addition per node; this op takes and
//! returns token rows and gives the gradient of the packed tensor in one piece.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

use super::fused::to_storage;
use crate::cpu::Whole;
use crate::rows::{QkvForward, QkvRows};

/// Attention over the heads of packed `(B·T, 3·C)` q|k|v token rows (sequences of `seq_len`
/// tokens one after the other), as [`crate::FlashAttention`] computes it, with output `(B·T, C)`.
pub(crate) struct QkvAttention {
    rows: QkvRows,
    /// The logsumexp of the forward pass, when this op ran exactly one.
    saved: Mutex<(usize, Option<Vec<f32>>)>,
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
    pub fn new(rows: QkvRows) -> Self {
        Self {
            rows,
            saved: Mutex::new((0, None)),
        }
    }
}

impl CustomOp1 for QkvAttention {
    fn name(&self) -> &'static str {
        "qkv-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _span = tracing::debug_span!("flash_attention.forward").entered();
        let (n, width) = l.shape().dims2()?;
        if !l.is_contiguous() {
            bail!("qkv attention: the packed q|k|v tensor must be contiguous");
        }
        // The packed rows as f32, borrowed when they already are.
        let src = Whole::new(s, l)?;
        let qkv = &src.at(l.start_offset())[..l.shape().elem_count()];
        let QkvForward { y, lse } = self.rows.forward(qkv)?;
        let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        *saved = (saved.0 + 1, Some(lse));
        Ok((to_storage(y, s.dtype())?, Shape::from((n, width / 3))))
    }

    fn bwd(&self, qkv: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _span = tracing::debug_span!("flash_attention.backward").entered();
        let dims = qkv.dims().to_vec();
        let packed = with_f32_rows(qkv, |qkv| {
            // The forward's logsumexp, or a new forward's when this op ran more than one
            // (shared with `apply_op1_arc`) and the kept one may not be this call's.
            let kept = match &*self.saved.lock().unwrap_or_else(|e| e.into_inner()) {
                (1, Some(lse)) => Some(lse.clone()),
                _ => None,
            };
            let lse = match kept {
                Some(lse) => lse,
                None => self.rows.forward(qkv)?.lse,
            };
            with_f32_rows(res, |y| {
                with_f32_rows(grad, |dy| self.rows.backward(qkv, y, &lse, dy))
            })
        })?;
        Ok(Some(
            Tensor::from_vec(packed, dims, qkv.device())?.to_dtype(qkv.dtype())?,
        ))
    }
}
