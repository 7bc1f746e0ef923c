//! `W · diag(γ)` as one CPU op: how the fused ops fold a LayerNorm's weight `γ` into the
//! weight of the product after it (`LN(x)·Wᵀ = x̂·(W·diag γ)ᵀ`), carrying `γ`'s gradient.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::cpu_data::{dims2, f32_slice, with_data, Unwritten};

/// `W · diag(γ)`: column `j` of the matrix `W` times `γ[j]`, with its backward (Candle's
/// `broadcast_mul` differentiates through a strided reduction over rows that is many times
/// slower).
pub(super) struct ScaleColumns;

impl CustomOp2 for ScaleColumns {
    fn name(&self) -> &'static str {
        "nanogpt-scale-columns"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (w, gamma) = (
            f32_slice(s1, l1, "scale columns")?,
            f32_slice(s2, l2, "scale columns")?,
        );
        let (_, cols) = dims2(l1, "scale columns")?;
        if gamma.len() != cols {
            candle_core::bail!(
                "scale columns: a matrix {:?} and {} scales",
                l1.dims(),
                gamma.len()
            );
        }
        Ok((CpuStorage::F32(scale_columns(w, gamma)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        w: &Tensor,
        gamma: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let (rows, cols) = w.dims2()?;
        let (dw, dgamma) = with_data(&[w, gamma, &g], "scale columns backward", |d| {
            let (w, gamma, g) = (d[0], d[1], d[2]);
            let mut dgamma = vec![0f32; cols];
            for (w_row, g_row) in w.chunks_exact(cols.max(1)).zip(g.chunks_exact(cols.max(1))) {
                for ((dg, w), g) in dgamma.iter_mut().zip(w_row).zip(g_row) {
                    *dg += g * w;
                }
            }
            Ok((scale_columns(g, gamma), dgamma))
        })?;
        let dev = w.device();
        Ok((
            Some(Tensor::from_vec(dw, (rows, cols), dev)?),
            Some(Tensor::from_vec(dgamma, cols, dev)?),
        ))
    }
}

/// The rows of `m` (`scales.len()` wide) times `scales`, element by element.
fn scale_columns(m: &[f32], scales: &[f32]) -> Vec<f32> {
    let cols = scales.len().max(1);
    let mut out = Unwritten::new(m.len() / cols * cols);
    for (out, row) in out.slots().chunks_exact_mut(cols).zip(m.chunks_exact(cols)) {
        for ((o, &v), &s) in out.iter_mut().zip(row).zip(scales) {
            o.write(v * s);
        }
    }
    // SAFETY: the loop wrote every row of `out` (it holds whole rows of `cols` only).
    unsafe { out.assume_written() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::rng::Rng;
    use crate::test_util::{assert_close, output_and_grads};

    /// Against Candle's `broadcast_mul` and its autograd (values and both gradients).
    #[test]
    fn matches_broadcast_mul() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(19, 0);
        let (rows, cols) = (7, 5);
        let w = Var::from_vec(rng.normal_vec(rows * cols, 1.0), (rows, cols), &dev)?;
        let gamma = Var::from_vec(rng.normal_vec(cols, 1.0), cols, &dev)?;
        let probe = Tensor::from_vec(rng.normal_vec(rows * cols, 1.0), (rows, cols), &dev)?;
        let params = [gamma.as_tensor().clone()];
        let y = w.apply_op2(&gamma, ScaleColumns)?;
        let fused = output_and_grads(&y, &probe, &w, &params)?;
        let plain = w.broadcast_mul(&gamma)?;
        let reference = output_and_grads(&plain, &probe, &w, &params)?;
        assert_close(&fused, &reference, 1e-6);
        Ok(())
    }
}
