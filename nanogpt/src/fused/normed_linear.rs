//! `x̂ · Wᵀ`, a LayerNorm (no bias) folded into the Linear layer after it, as one CPU op: the
//! model's lm_head, `ln_f` then the tied token embedding. The LayerNorm's weight `γ` scales the
//! columns of the Linear weight (`LN(x)·Wᵀ = x̂·(W·diag γ)ᵀ`, [`super::scale_columns`]) and the op
//! normalises its input itself, so the LayerNorm's output is not a node of Candle's graph.
//! Each product is cut into blocks of output rows, one single-threaded `gemm` call per block
//! on rayon's pool; `gemm` computes each element by the same sequence of operations however
//! the rows are cut, so the results are the same bits on any number of threads.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::cpu_data::{dims2, f32_slice, with_data, Unwritten};
use super::matmul::{for_row_blocks, matmul_to, product_jobs, run_jobs, View};
use super::scale_columns::ScaleColumns;

/// `ln(x) · wᵀ` for the rows of `x` `(N, C)`, `ln` a LayerNorm without bias of weight
/// `ln_weight` `(C)`, `w` `(out, C)`: the fused op with its backward.
pub(crate) fn normed_linear(x: &Tensor, ln_weight: &Tensor, w: &Tensor) -> Result<Tensor> {
    let w = w.apply_op2(ln_weight, ScaleColumns)?;
    x.contiguous()?.apply_op2(&w, NormedLinearOp::default())
}

/// `y = x · Wᵀ` for `x` `(n, d_in)` and `W` `(d_out, d_in)`, row-major, by blocks of rows.
fn linear_forward(
    x: &[f32],
    w: &[f32],
    (n, d_in, d_out): (usize, usize, usize),
) -> Result<Vec<f32>> {
    let (xv, wt) = (
        View::row_major(x, n, d_in)?,
        View::row_major(w, d_out, d_in)?.t(),
    );
    let mut y = Unwritten::new(n * d_out);
    for_row_blocks(y.slots(), d_out, |first, rows| {
        matmul_to(rows, xv.rows(first, rows.len() / d_out)?, wt).map(drop)
    })?;
    // SAFETY: the row blocks cover `y`, and each wrote its rows (all returned `Ok`).
    Ok(unsafe { y.assume_written() })
}

/// `(dx, dW)` of `y = x · Wᵀ` for the output gradient `g`, all row-major slices of the shapes
/// `(n, d_in, d_out)` say.
fn linear_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    (n, d_in, d_out): (usize, usize, usize),
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (xv, wv, gv) = (
        View::row_major(x, n, d_in)?,
        View::row_major(w, d_out, d_in)?,
        View::row_major(g, n, d_out)?,
    );
    let mut dx = Unwritten::new(n * d_in);
    let mut dw = Unwritten::new(d_out * d_in);
    // dx = g · W and dW = gᵀ · x, cut by rows of their outputs.
    let mut jobs = product_jobs(dx.slots(), gv, wv);
    jobs.extend(product_jobs(dw.slots(), gv.t(), xv));
    run_jobs(jobs)?;
    // SAFETY: the product jobs wrote all of `dx` and `dw` (they all returned `Ok`).
    Ok(unsafe { (dx.assume_written(), dw.assume_written()) })
}

/// `x̂ · Wᵀ`, `x̂` the rows of `x` normalised ([`normed_linear`]'s op). Keeps `x̂` and each
/// row's `rstd` for the backward pass.
#[derive(Default)]
struct NormedLinearOp {
    saved: OnceLock<(Vec<f32>, Vec<f32>)>,
}

impl CustomOp2 for NormedLinearOp {
    fn name(&self) -> &'static str {
        "nanogpt-normed-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32_slice(s1, l1, "linear")?, f32_slice(s2, l2, "linear")?);
        let (n, c) = dims2(l1, "linear input")?;
        let (d_out, w_in) = dims2(l2, "linear weight")?;
        if w_in != c {
            candle_core::bail!(
                "linear: input {:?} and weight {:?} do not match",
                l1.dims(),
                l2.dims()
            );
        }
        let mut xhat = Unwritten::new(n * c);
        let mut rstd = Unwritten::new(n);
        super::normalize::normalize(x, c, xhat.slots(), rstd.slots());
        // SAFETY: `x` is `n` rows of `c`, so `normalize` wrote every element of both.
        let (xhat, rstd) = unsafe { (xhat.assume_written(), rstd.assume_written()) };
        let y = linear_forward(&xhat, w, (n, c, d_out))?;
        let _ = self.saved.set((xhat, rstd));
        Ok((CpuStorage::F32(y), Shape::from((n, d_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _span = tracing::debug_span!("linear.backward").entered();
        let Some((xhat, rstd)) = self.saved.get() else {
            candle_core::bail!("linear backward: the forward pass did not run on the CPU");
        };
        let g = grad.contiguous()?;
        let (n, c) = x.dims2()?;
        let (d_out, _) = w.dims2()?;
        let (mut dx, dw) = with_data(&[w, &g], "linear backward", |d| {
            linear_backward(xhat, d[0], d[1], (n, c, d_out))
        })?;
        // dx holds dL/dx̂; the normalisation's backward makes it dL/dx.
        super::normalize::normalize_backward(xhat, rstd, None, c, &mut dx);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (n, c), dev)?),
            Some(Tensor::from_vec(dw, (d_out, c), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Module, Var};
    use candle_nn::{VarBuilder, VarMap};

    use crate::model::{LayerNorm, Linear};
    use crate::rng::Rng;
    use crate::test_util::{assert_close, output_and_grads, set_random};

    /// The fused op against the plain LayerNorm and Linear and their autograd, with a random
    /// LayerNorm weight, on shapes that split into uneven blocks.
    #[test]
    fn matches_the_plain_layers() -> Result<()> {
        let dev = Device::Cpu;
        for (n, c, d_out) in [(130, 24, 72), (3, 8, 5)] {
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            let ln = LayerNorm::new(c, false, vb.pp("ln"))?;
            let lin = Linear::new(c, d_out, false, vb.pp("lin"))?;
            let mut rng = Rng::new(16, 0);
            set_random(&map, &mut rng, 0.5)?;
            let x = Var::from_vec(rng.normal_vec(n * c, 1.0), (n, c), &dev)?;
            let probe = Tensor::from_vec(rng.normal_vec(n * d_out, 1.0), (n, d_out), &dev)?;
            let params = [lin.weight.clone(), ln.weight.clone()];
            let y = normed_linear(&x, &ln.weight, &lin.weight)?;
            let fused = output_and_grads(&y, &probe, &x, &params)?;
            let plain = lin.forward(&ln.forward(&x)?)?;
            let reference = output_and_grads(&plain, &probe, &x, &params)?;
            assert_close(&fused, &reference, 2e-5);
        }
        Ok(())
    }
}
