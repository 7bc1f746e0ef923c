//! `x + dropout(mlp(ln_2(x)))`, the second half of a pre-LayerNorm block, as one CPU op with
//! its backward: `ln_2` (no bias) normalises, `c_fc`, GELU, `c_proj`, the dropout multipliers of
//! [`attn_op::nn::dropout`] and the residual. Built from Candle ops these are about a dozen
//! graph nodes, each of which Candle's backward pass pays with a zero-filled gradient buffer
//! and an addition. `ln_2`'s weight is folded into `c_fc`'s ([`super::scale_columns`]). The
//! products run by blocks of rows on rayon's pool (see [`super::matmul`]).

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::cpu_data::{assume_written, dims2, f32_slice, through_dropout, with_data, Unwritten};
use super::matmul::{matmul_to, product_jobs, residual_matmul, row_blocks, run_jobs, View};
use super::scale_columns::ScaleColumns;

/// `x + dropout(c_proj(gelu(c_fc(ln_2(x)))))` for the rows of `x` `(N, C)`, from the weights
/// of `ln_2` `(C)`, `c_fc` `(4C, C)` and `c_proj` `(C, 4C)` (no biases). `dropout`, when given
/// as `(p, seed)`, drops the MLP's output with the mask of [`attn_op::nn::dropout`].
pub(crate) fn mlp_residual(
    x: &Tensor,
    ln_2: &Tensor,
    c_fc: &Tensor,
    c_proj: &Tensor,
    dropout: Option<(f64, u64)>,
) -> Result<Tensor> {
    let (n, c) = x.dims2()?;
    let keep = dropout
        .map(|(p, seed)| attn_op::nn::dropout_multipliers(n, c, p, seed))
        .transpose()?;
    let w_fc = c_fc.apply_op2(ln_2, ScaleColumns)?;
    x.contiguous()?.apply_op3(
        &w_fc,
        c_proj,
        MlpOp {
            keep,
            saved: OnceLock::new(),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// The MLP op.

/// `x + gelu(x̂ · W_fcᵀ) · W_projᵀ` where `x̂` is `x` normalised row by row (a pre-LayerNorm
/// block's MLP with the LayerNorm weight folded into `W_fc`). Keeps what the backward pass
/// needs from the forward pass.
struct MlpOp {
    /// Dropout multipliers of the MLP's output, `x + keep ⊙ mlp(x̂)`.
    keep: Option<Vec<f32>>,
    saved: OnceLock<MlpSaved>,
}

/// The pre-activation `u = x̂ · W_fcᵀ`, `x̂` and each row's `rstd`.
struct MlpSaved {
    u: Vec<f32>,
    xhat: Vec<f32>,
    rstd: Vec<f32>,
}

impl CustomOp3 for MlpOp {
    fn name(&self) -> &'static str {
        "nanogpt-residual-mlp"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = tracing::debug_span!("mlp.forward").entered();
        let (x, w_fc, w_proj) = (
            f32_slice(s1, l1, "mlp")?,
            f32_slice(s2, l2, "mlp")?,
            f32_slice(s3, l3, "mlp")?,
        );
        let (n, c) = dims2(l1, "mlp input")?;
        let (hidden, fc_in) = dims2(l2, "mlp c_fc weight")?;
        let (proj_out, proj_in) = dims2(l3, "mlp c_proj weight")?;
        if fc_in != c || proj_in != hidden || proj_out != c {
            candle_core::bail!(
                "mlp: input {:?}, c_fc weight {:?} and c_proj weight {:?} do not chain",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        if self.keep.as_ref().is_some_and(|k| k.len() != n * c) {
            candle_core::bail!("mlp: dropout multipliers need one per output");
        }
        let keep = self.keep.as_deref();
        let w_fc_t = View::row_major(w_fc, hidden, c)?.t();
        let w_proj_t = View::row_major(w_proj, proj_out, hidden)?.t();
        let mut u = Unwritten::new(n * hidden);
        let mut y = Unwritten::new(n * proj_out);
        let (mut xhat, mut rstd) = (Unwritten::new(n * c), Unwritten::new(n));
        // Blocks of rows: x̂ = normalise(x), u = x̂ W_fcᵀ, h = gelu(u), y = x + h W_projᵀ, each
        // block on one thread.
        let block = row_blocks(n);
        let jobs = u
            .slots()
            .chunks_mut((block * hidden).max(1))
            .zip(y.slots().chunks_mut((block * proj_out).max(1)))
            .zip(xhat.slots().chunks_mut((block * c).max(1)))
            .zip(rstd.slots().chunks_mut(block.max(1)))
            .enumerate()
            .map(|(i, (((u, y), xhat), rstd))| {
                Box::new(move || {
                    let rows = u.len() / hidden.max(1);
                    let first = i * block;
                    let span = first * c..(first + rows) * c;
                    super::normalize::normalize_rows(&x[span.clone()], c, xhat, rstd);
                    // SAFETY: `normalize_rows` wrote all `rows` rows of both.
                    let xhat = View::row_major(unsafe { assume_written(xhat) }, rows, c)?;
                    let u = matmul_to(u, xhat, w_fc_t)?;
                    let mut h = Unwritten::new(u.len());
                    super::gelu::forward(u, h.slots());
                    // SAFETY: `gelu::forward` writes every element of `h`, as long as `u`.
                    let h = unsafe { h.assume_written() };
                    let h = View::row_major(&h, rows, hidden)?;
                    // The residual: y = x + (keep ⊙) h W_projᵀ.
                    let keep = keep.map(|k| &k[span.clone()]);
                    residual_matmul(y, &x[span], h, w_proj_t, keep)
                }) as Box<dyn FnOnce() -> Result<()> + Send>
            })
            .collect();
        run_jobs(jobs)?;
        // SAFETY: the blocks cover `u`, `y`, `xhat` and `rstd`, and each job wrote its rows of
        // all of them (all returned `Ok`).
        let (u, y, xhat, rstd) = unsafe {
            (
                u.assume_written(),
                y.assume_written(),
                xhat.assume_written(),
                rstd.assume_written(),
            )
        };
        // Only the first forward of this op object stores its results; a second one cannot
        // happen (each call of `mlp_residual` makes a new op).
        let _ = self.saved.set(MlpSaved { u, xhat, rstd });
        Ok((CpuStorage::F32(y), Shape::from((n, proj_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w_fc: &Tensor,
        w_proj: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _span = tracing::debug_span!("mlp.backward").entered();
        let Some(MlpSaved { u, xhat, rstd }) = self.saved.get() else {
            candle_core::bail!("mlp backward: the forward pass did not run on the CPU");
        };
        let g = grad.contiguous()?;
        let (n, c) = x.dims2()?;
        let (hidden, _) = w_fc.dims2()?;
        let (out, _) = w_proj.dims2()?;
        let (dx, dw_fc, dw_proj) = with_data(&[x, w_fc, w_proj, &g], "mlp backward", |d| {
            // The product's input.
            let xhat_v = View::row_major(xhat, n, c)?;
            let w_fc = View::row_major(d[1], hidden, c)?;
            let w_proj = View::row_major(d[2], out, hidden)?;
            // The gradient of the MLP's output: g, times the dropout multipliers if any.
            let g_mlp = through_dropout(d[3], self.keep.as_deref());
            let gv = View::row_major(&g_mlp, n, out)?;
            let mut h = Unwritten::new(n * hidden);
            let mut du = Unwritten::new(n * hidden);
            let mut dx = Unwritten::new(n * c);
            // Blocks of rows: dh = g W_proj, du = dh ⊙ gelu'(u) (and h = gelu(u) for dW_proj),
            // dx̂ = du W_fc, dx = g + the normalisation's backward of dx̂.
            let block = row_blocks(n);
            let jobs = h
                .slots()
                .chunks_mut((block * hidden).max(1))
                .zip(du.slots().chunks_mut((block * hidden).max(1)))
                .zip(dx.slots().chunks_mut((block * c).max(1)))
                .enumerate()
                .map(|(i, ((h, du), dx))| {
                    Box::new(move || {
                        let rows = h.len() / hidden.max(1);
                        let first = i * block;
                        let u = &u[first * hidden..(first + rows) * hidden];
                        let du = matmul_to(du, gv.rows(first, rows)?, w_proj)?;
                        super::gelu::forward_backward_in_place(u, h, du);
                        let dx = matmul_to(dx, View::row_major(du, rows, hidden)?, w_fc)?;
                        let rows = first..first + rows;
                        super::normalize::normalize_backward_rows(
                            &xhat[rows.start * c..rows.end * c],
                            &rstd[rows.clone()],
                            Some(&d[3][rows.start * c..rows.end * c]),
                            c,
                            dx,
                        );
                        Ok(())
                    }) as Box<dyn FnOnce() -> Result<()> + Send>
                })
                .collect();
            run_jobs(jobs)?;
            // SAFETY: the blocks cover `h`, `du` and `dx`; each job wrote its rows of all three
            // (`forward_backward_in_place` writes every element of `h`; all returned `Ok`).
            let (h, du, dx) =
                unsafe { (h.assume_written(), du.assume_written(), dx.assume_written()) };
            // dW_proj = gᵀ h and dW_fc = duᵀ x̂, cut by rows of their outputs.
            let mut dw_proj = Unwritten::new(out * hidden);
            let mut dw_fc = Unwritten::new(hidden * c);
            let mut jobs = product_jobs(dw_proj.slots(), gv.t(), View::row_major(&h, n, hidden)?);
            jobs.extend(product_jobs(
                dw_fc.slots(),
                View::row_major(&du, n, hidden)?.t(),
                xhat_v,
            ));
            run_jobs(jobs)?;
            // SAFETY: the product jobs wrote all of both (they all returned `Ok`).
            Ok(unsafe { (dx, dw_fc.assume_written(), dw_proj.assume_written()) })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (n, c), dev)?),
            Some(Tensor::from_vec(dw_fc, (hidden, c), dev)?),
            Some(Tensor::from_vec(dw_proj, (out, hidden), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::{VarBuilder, VarMap};

    use crate::model::{LayerNorm, Mlp};
    use crate::rng::Rng;
    use crate::test_util::{assert_close, output_and_grads, set_random};

    /// The fused op against the plain LayerNorm, MLP and addition and their autograd, with a
    /// random LayerNorm weight, on shapes that split into uneven blocks, without and with
    /// dropout (the plain MLP draws its seed from the same generator state).
    #[test]
    fn matches_the_plain_layers() -> Result<()> {
        let dev = Device::Cpu;
        for (n, c, p) in [(257, 24, 0.0), (2, 8, 0.0), (257, 24, 0.3), (3, 8, 0.5)] {
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            let mlp = Mlp::new(c, false, p, vb.pp("mlp"))?;
            let ln = LayerNorm::new(c, false, vb.pp("ln"))?;
            let mut rng = Rng::new(15, 0);
            set_random(&map, &mut rng, 0.5)?;
            let x = Var::from_vec(rng.normal_vec(n * c, 1.0), (n, c), &dev)?;
            let probe = Tensor::from_vec(rng.normal_vec(n * c, 1.0), (n, c), &dev)?;
            let params = [
                mlp.c_fc.weight.clone(),
                mlp.c_proj.weight.clone(),
                ln.weight.clone(),
            ];
            let seed = Rng::new(99, 0).next_u64();
            let dropout = (p > 0.0).then_some((p, seed));
            let y = mlp_residual(&x, &ln.weight, &params[0], &params[1], dropout)?;
            let fused = output_and_grads(&y, &probe, &x, &params)?;
            let h = mlp.forward(&ln.forward(&x)?, Some(&mut Rng::new(99, 0)))?;
            if p > 0.0 {
                let zeros = h.flatten_all()?.to_vec1::<f32>()?;
                assert!(zeros.contains(&0.0), "some outputs dropped");
            }
            let reference = output_and_grads(&(x.as_tensor() + h)?, &probe, &x, &params)?;
            assert_close(&fused, &reference, 2e-5);
        }
        Ok(())
    }

    /// One thread or several: the same bits (the blocks depend on the shapes only).
    #[test]
    fn results_do_not_depend_on_the_thread_count() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(14, 0);
        let (n, c) = (300, 32);
        let ln = Tensor::from_vec(rng.normal_vec(c, 1.0), c, &dev)?;
        let c_fc = Tensor::from_vec(rng.normal_vec(4 * c * c, 0.2), (4 * c, c), &dev)?;
        let c_proj = Tensor::from_vec(rng.normal_vec(4 * c * c, 0.2), (c, 4 * c), &dev)?;
        let x = Var::from_vec(rng.normal_vec(n * c, 1.0), (n, c), &dev)?;
        let probe = Tensor::from_vec(rng.normal_vec(n * 4 * c, 1.0), (n, 4 * c), &dev)?;
        let run = |threads: usize| -> Result<Vec<Vec<f32>>> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(candle_core::Error::wrap)?;
            pool.install(|| {
                let y = mlp_residual(&x, &ln, &c_fc, &c_proj, Some((0.2, 5)))?;
                let y = super::super::normed_linear::normed_linear(&y, &ln, &c_fc)?;
                output_and_grads(&y, &probe, &x, &[])
            })
        };
        let one = run(1)?;
        for threads in [2, 3, 5] {
            assert_eq!(one, run(threads)?, "{threads} threads");
        }
        Ok(())
    }
}
