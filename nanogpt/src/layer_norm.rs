//! LayerNorm with a backward pass.
//!
//! `candle_nn::LayerNorm` may dispatch to a fused kernel that has no backward pass, so its weights
//! would silently stop learning. Here the reference is built from `mean`, `sub`, `sqr`, `sqrt`,
//! `div`, `mul` and `add`, all of which Candle differentiates (checked against finite
//! differences below). On the CPU in f32 the same computation runs as one fused op with a
//! hand-written backward (checked against the reference): the composed version creates eight
//! tensors per call, and Candle's backward zero-fills and adds a gradient for each of them.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use candle_nn::VarBuilder;
use multiversion::multiversion;
use rayon::prelude::*;

use crate::cpu_data::{f32_slice, Unwritten};

/// The op's name in errors.
const LN: &str = "layer norm";

/// Layer normalisation over the last dimension, with an optional bias (nanoGPT's `LayerNorm`).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// PyTorch's default epsilon.
const EPS: f64 = 1e-5;

impl LayerNorm {
    /// A LayerNorm of width `dim` whose `weight` (and `bias`) live under `vb`.
    pub fn new(dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: if bias {
                Some(vb.get(dim, "bias")?)
            } else {
                None
            },
        })
    }

    /// The scale `γ`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The shift `β`, when the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _span = tracing::debug_span!("layer_norm").entered();
        if !(x.device().is_cpu() && x.dtype() == DType::F32) {
            return crate::model::synced(self.forward_composed(x)?);
        }
        let y = x.contiguous()?.apply_op2(&self.weight, FusedLayerNorm)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The reference: Candle ops only, in f32 for half-precision input.
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let in_dtype = x.dtype();
        let x = match in_dtype {
            DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + EPS)?.sqrt()?)?;
        let y = normed.broadcast_mul(&self.weight.to_dtype(normed.dtype())?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        };
        y.to_dtype(in_dtype)
    }
}

/// `Σ f(a_i, b_i, c_i)` over the length of `a`, in 16 interleaved partial sums added in order,
/// then the tail: written with fixed-size chunks so that the loop vectorises.
#[inline(always)]
fn sum3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let n = a.len();
    let (b, c) = (&b[..n], &c[..n]);
    let (mut ia, mut ib, mut ic) = (a.chunks_exact(16), b.chunks_exact(16), c.chunks_exact(16));
    let mut acc = [0f32; 16];
    for ((ca, cb), cc) in (&mut ia).zip(&mut ib).zip(&mut ic) {
        for j in 0..16 {
            acc[j] += f(ca[j], cb[j], cc[j]);
        }
    }
    let tail: f32 = ia
        .remainder()
        .iter()
        .zip(ib.remainder())
        .zip(ic.remainder())
        .map(|((&x, &y), &z)| f(x, y, z))
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// Mean and `1 / sqrt(var + eps)` of a row.
#[inline(always)]
fn row_stats(x: &[f32]) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum3(x, x, x, |v, _, _| v) / n;
    let var = sum3(x, x, x, |v, _, _| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + EPS as f32).sqrt())
}

/// Rows per parallel block of the fused ops (fixed, so results do not depend on the thread count).
const BLOCK_ROWS: usize = 32;

/// Columns per parallel block of the weight gradient.
const BLOCK_COLS: usize = 32;

#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn forward_rows(x: &[f32], w: &[f32], y: &mut [MaybeUninit<f32>]) {
    let c = w.len();
    for (x, y) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
        let (mean, rstd) = row_stats(x);
        for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
            y.write((x - mean) * rstd * w);
        }
    }
}

/// `x̂ = (x - mean) · rstd` for the rows of `x` (`c` wide), with each row's `rstd` (the
/// normalisation without the weight, for ops that fold the weight into what follows). Writes
/// every element of `xhat` and `rstd` when `x` is `rstd.len()` rows of `c` and `xhat` as long.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn normalize_rows(
    x: &[f32],
    c: usize,
    xhat: &mut [MaybeUninit<f32>],
    rstd: &mut [MaybeUninit<f32>],
) {
    for ((x, xhat), rstd) in x.chunks_exact(c).zip(xhat.chunks_exact_mut(c)).zip(rstd) {
        let (mean, r) = row_stats(x);
        rstd.write(r);
        for (xh, &x) in xhat.iter_mut().zip(x) {
            xh.write((x - mean) * r);
        }
    }
}

/// The backward of [`normalize_rows`], plus a residual gradient when there is one: `d` holds
/// `dL/dx̂` on entry and `dL/dx` (`+ residual`) on return, row by row (`c` wide), where
/// `dL/dx = rstd · (dx̂ - mean(dx̂) - x̂ · mean(dx̂ ⊙ x̂))`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn normalize_backward_rows(
    xhat: &[f32],
    rstd: &[f32],
    residual: Option<&[f32]>,
    c: usize,
    d: &mut [f32],
) {
    for (i, ((xhat, &r), d)) in xhat
        .chunks_exact(c)
        .zip(rstd)
        .zip(d.chunks_exact_mut(c))
        .enumerate()
    {
        let a = sum3(d, d, d, |d, _, _| d) / c as f32;
        let b = sum3(d, xhat, xhat, |d, xh, _| d * xh) / c as f32;
        for (d, &xh) in d.iter_mut().zip(xhat) {
            *d = r * (*d - a - xh * b);
        }
        if let Some(g) = residual {
            for (d, &g) in d.iter_mut().zip(&g[i * c..(i + 1) * c]) {
                *d += g;
            }
        }
    }
}

/// Rows per parallel block of [`normalize`] and [`normalize_backward`].
const NORM_BLOCK_ROWS: usize = 32;

/// [`normalize_rows`] over all rows of `x` (`c` wide), blocks of rows in parallel. Writes every
/// element of `xhat` and `rstd` when `x` is `rstd.len()` rows of `c` and `xhat` as long (rows
/// of width 0 get `rstd = 0`).
pub(crate) fn normalize(
    x: &[f32],
    c: usize,
    xhat: &mut [MaybeUninit<f32>],
    rstd: &mut [MaybeUninit<f32>],
) {
    if c == 0 {
        for r in rstd {
            r.write(0.0);
        }
        return;
    }
    xhat.par_chunks_mut(NORM_BLOCK_ROWS * c)
        .zip(rstd.par_chunks_mut(NORM_BLOCK_ROWS))
        .zip(x.par_chunks(NORM_BLOCK_ROWS * c))
        .for_each(|((xhat, rstd), x)| normalize_rows(x, c, xhat, rstd));
}

/// [`normalize_backward_rows`] over all rows of `d` (`c` wide), blocks of rows in parallel: `d`
/// holds `dL/dx̂` on entry and `dL/dx` (`+ residual`) on return.
pub(crate) fn normalize_backward(
    xhat: &[f32],
    rstd: &[f32],
    residual: Option<&[f32]>,
    c: usize,
    d: &mut [f32],
) {
    if c == 0 {
        return;
    }
    let block = NORM_BLOCK_ROWS * c;
    d.par_chunks_mut(block)
        .zip(xhat.par_chunks(block))
        .zip(rstd.par_chunks(NORM_BLOCK_ROWS))
        .enumerate()
        .for_each(|(i, ((d, xhat), rstd))| {
            let residual = residual.map(|g| &g[i * block..i * block + d.len()]);
            normalize_backward_rows(xhat, rstd, residual, c, d)
        });
}

/// `y` = LayerNorm of the rows of `x` (`w.len()` wide, `w` non-empty), blocks of rows in parallel;
/// writes every element of `y` when `x` is as long as `y` and a whole number of rows.
fn fused_forward(x: &[f32], w: &[f32], y: &mut [MaybeUninit<f32>]) {
    let block = BLOCK_ROWS * w.len();
    y.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .for_each(|(y, x)| forward_rows(x, w, y));
}

/// dx of rows of `x` and `g`, and each row's mean and `1/std` into `stats`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn backward_rows(x: &[f32], w: &[f32], g: &[f32], dx: &mut [f32], stats: &mut [(f32, f32)]) {
    let c = w.len();
    let mut xhat = vec![0f32; c];
    for (((x, g), dx), stat) in x
        .chunks_exact(c)
        .zip(g.chunks_exact(c))
        .zip(dx.chunks_exact_mut(c))
        .zip(stats.iter_mut())
    {
        let (mean, rstd) = row_stats(x);
        *stat = (mean, rstd);
        for (xh, &x) in xhat.iter_mut().zip(x) {
            *xh = (x - mean) * rstd;
        }
        let a = sum3(g, w, w, |g, w, _| g * w) / c as f32;
        let b = sum3(g, w, &xhat, |g, w, xh| g * w * xh) / c as f32;
        for (((dx, &g), &w), &xh) in dx.iter_mut().zip(g).zip(w).zip(&xhat) {
            *dx = rstd * (g * w - a - xh * b);
        }
    }
}

/// `dw[j] = Σ_rows g·x̂` for the columns `first..first + dw.len()`, rows in order.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn weight_grad_cols(x: &[f32], g: &[f32], stats: &[(f32, f32)], first: usize, dw: &mut [f32]) {
    let c = x.len() / stats.len().max(1);
    let cols = first..first + dw.len();
    for ((x, g), &(mean, rstd)) in x.chunks_exact(c).zip(g.chunks_exact(c)).zip(stats) {
        for ((dw, &x), &g) in dw.iter_mut().zip(&x[cols.clone()]).zip(&g[cols.clone()]) {
            let xh = (x - mean) * rstd;
            *dw += g * xh;
        }
    }
}

/// Writes dx into `out[..n·c]` and dw into `out[n·c..]` (`w` non-empty): dx by blocks of rows,
/// then dw by blocks of columns, each summing over the rows in order.
fn fused_backward(x: &[f32], w: &[f32], g: &[f32], out: &mut [f32]) {
    let c = w.len();
    let (dx, dw) = out.split_at_mut(x.len());
    let mut stats = vec![(0f32, 0f32); x.len() / c];
    let block = BLOCK_ROWS * c;
    dx.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .zip(g.par_chunks(block))
        .zip(stats.par_chunks_mut(BLOCK_ROWS))
        .for_each(|(((dx, x), g), stats)| backward_rows(x, w, g, dx, stats));
    dw.par_chunks_mut(BLOCK_COLS)
        .enumerate()
        .for_each(|(i, dw)| weight_grad_cols(x, g, &stats, i * BLOCK_COLS, dw));
}

/// `(x - mean) / sqrt(var + eps) * w` over rows of `x`, with its backward.
struct FusedLayerNorm;

impl CustomOp2 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "nanogpt-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32_slice(s1, l1, LN)?, f32_slice(s2, l2, LN)?);
        if l1.dims().last() != Some(&w.len()) {
            candle_core::bail!(
                "layer norm: input {:?} does not end in the weight's width {}",
                l1.dims(),
                w.len()
            );
        }
        let mut y = Unwritten::new(x.len());
        if !w.is_empty() {
            fused_forward(x, w, y.slots());
        }
        // SAFETY: `fused_forward` wrote every element: `x` is whole rows of `w.len()` (the last
        // dimension, checked above), and is empty when `w` is.
        Ok((
            CpuStorage::F32(unsafe { y.assume_written() }),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _span = tracing::debug_span!("layer_norm.backward").entered();
        let both = x.apply_op3_no_bwd(w, &grad.contiguous()?, &FusedLayerNormGrad)?;
        let n = x.elem_count();
        let dx = both.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = both.narrow(0, n, w.elem_count())?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// dx and dw of [`FusedLayerNorm`], packed in one flat tensor.
struct FusedLayerNormGrad;

impl CustomOp3 for FusedLayerNormGrad {
    fn name(&self) -> &'static str {
        "nanogpt-layer-norm-grad"
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
        let (x, w, g) = (
            f32_slice(s1, l1, LN)?,
            f32_slice(s2, l2, LN)?,
            f32_slice(s3, l3, LN)?,
        );
        if g.len() != x.len() || (!w.is_empty() && !x.len().is_multiple_of(w.len())) {
            candle_core::bail!(
                "layer norm backward: input of {} elements, gradient of {}, width {}",
                x.len(),
                g.len(),
                w.len()
            );
        }
        let mut out = vec![0f32; x.len() + w.len()];
        if !w.is_empty() {
            fused_backward(x, w, g, &mut out);
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    /// The analytic gradients of LayerNorm (input, weight, bias) match central finite differences.
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F64, &dev);
        let ln = LayerNorm::new(5, true, vb)?;
        let mut rng = crate::rng::Rng::new(3, 0);
        let mut randn =
            |n: usize| -> Vec<f64> { rng.normal_vec(n, 1.0).into_iter().map(f64::from).collect() };
        for (name, var) in map.data().lock().unwrap().iter() {
            let values = randn(5);
            var.set(&Tensor::from_vec(values, 5, &dev)?)
                .map_err(|e| e.context(name.clone()))?;
        }
        let x = Var::from_vec(randn(15), (3, 5), &dev)?;
        let probe = Tensor::from_vec(randn(15), (3, 5), &dev)?;
        crate::test_util::assert_gradients_match_finite_differences(&map, &x, || {
            (ln.forward_composed(&x)? * &probe)?.sum_all()
        })
    }

    /// The fused CPU op gives the reference's output and gradients (75 rows, 48 wide: several
    /// blocks of rows and of columns, the last ones partial).
    #[test]
    fn fused_matches_composed() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let ln = LayerNorm::new(48, true, VarBuilder::from_varmap(&map, DType::F32, &dev))?;
        let mut rng = crate::rng::Rng::new(4, 0);
        for var in map.all_vars() {
            var.set(&Tensor::from_vec(rng.normal_vec(48, 1.0), 48, &dev)?)?;
        }
        let x = Var::from_vec(rng.normal_vec(75 * 48, 3.0), (75, 48), &dev)?;
        let probe = Tensor::from_vec(rng.normal_vec(75 * 48, 1.0), (75, 48), &dev)?;
        let run = |fused: bool| -> Result<Vec<Vec<f32>>> {
            let y = if fused {
                ln.forward(&x)?
            } else {
                ln.forward_composed(&x)?
            };
            let grads = (&y * &probe)?.sum_all()?.backward()?;
            let mut out = vec![y.flatten_all()?.to_vec1()?];
            for t in [x.as_tensor(), &ln.weight, ln.bias.as_ref().unwrap()] {
                out.push(grads.get(t).expect("gradient").flatten_all()?.to_vec1()?);
            }
            Ok(out)
        };
        for (a, b) in run(true)?.iter().zip(run(false)?.iter()) {
            for (p, q) in a.iter().zip(b) {
                assert!(
                    (p - q).abs() < 1e-4 * (1.0 + q.abs()),
                    "fused {p} vs composed {q}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn normalises_rows() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let ln = LayerNorm::new(4, false, VarBuilder::from_varmap(&map, DType::F32, &dev))?;
        for var in map.all_vars() {
            var.set(&Tensor::ones(4, DType::F32, &dev)?)?;
        }
        let x = Tensor::new(&[[1f32, 2., 3., 4.], [10., 10., 10., 14.]], &dev)?;
        let y = ln.forward(&x)?;
        let mean = y.mean_keepdim(1)?.flatten_all()?.to_vec1::<f32>()?;
        let var = y.sqr()?.mean_keepdim(1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(mean.iter().all(|m| m.abs() < 1e-5), "{mean:?}");
        assert!(var.iter().all(|v| (v - 1.0).abs() < 1e-3), "{var:?}");
        Ok(())
    }
}
