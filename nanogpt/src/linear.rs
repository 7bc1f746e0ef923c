//! Linear layers and the GPT's MLP as fused CPU ops whose matrix products run on every core.
//!
//! Built from Candle ops, `x · Wᵀ + b` is a transpose, a matrix product and a broadcast add: three
//! graph nodes, each of which Candle's backward pass pays with a zero-filled gradient buffer and
//! an addition, and a product whose backward transposes its results again. Here a Linear layer is
//! one node with a hand-written backward (`dx = dy · W`, `dW = dyᵀ · x`, `db = Σ dy`), and the MLP
//! (`c_fc`, GELU, `c_proj`) is one node as well. A LayerNorm in front of either folds into it:
//! its weight scales the columns of the next weight (`ScaleColumns`) and the op normalises its
//! input itself (`NormedLinear`, `Mlp::forward_residual`, which adds the residual too). Each
//! product is cut into blocks of output rows and every block is one single-threaded call of the
//! `gemm` crate on rayon's pool, one block per thread. `gemm` computes each output element by the same sequence of operations however
//! the rows are cut, so the results are the same bits on one thread or many (a test checks
//! 1, 2, 3 and 5 threads).
//!
//! The fused ops run on the CPU in f32; other devices and dtypes use the composed Candle ops
//! (also the reference the fused ops are tested against).

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::cpu_data::{assume_written, f32_slice, through_dropout, with_data, Unwritten};
use crate::layer_norm::LayerNorm;
use crate::matmul::{
    for_row_blocks, matmul_add, matmul_to, product_jobs, residual_matmul, row_blocks, run_jobs,
    View,
};

/// A Linear layer `y = x Wᵀ + b` over the last dimension, `W` stored `(out, in)` as PyTorch does.
#[derive(Clone, Debug)]
pub struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
}

impl Linear {
    /// A `d_in -> d_out` layer whose `weight` (and `bias`) live under `vb`.
    pub fn new(d_in: usize, d_out: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get((d_out, d_in), "weight")?,
            bias: if bias {
                Some(vb.get(d_out, "bias")?)
            } else {
                None
            },
        })
    }

    /// A layer over existing tensors (a tied weight, say).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Applies the layer to the rows of `x` `(N, d_in)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !fused(x, &[Some(&self.weight), self.bias.as_ref()]) {
            return self.forward_composed(x);
        }
        let x = x.contiguous()?;
        match &self.bias {
            None => x.apply_op2(&self.weight, LinearOp),
            Some(b) => x.apply_op3(&self.weight, b, LinearOp),
        }
    }

    /// The reference: Candle's matrix product and broadcast add.
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.to_dtype(x.dtype())?.t()?)?;
        match &self.bias {
            Some(bias) => y.broadcast_add(&bias.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }
}

/// Any rank: the last dimension is the features, the others are flattened into rows (how
/// attn-op's attention layer calls its projections).
impl candle_core::Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        over_rows(x, |rows| Linear::forward(self, rows))
    }
}

/// `f` applied to the rows of `x`: its last dimension is the features, the others are
/// flattened into rows for `f` and restored in its result.
fn over_rows(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if x.rank() == 2 {
        return f(x);
    }
    let dims = x.dims().to_vec();
    let Some((&d_in, lead)) = dims.split_last() else {
        candle_core::bail!("linear: expected at least one dimension, got a scalar");
    };
    let y = f(&x.reshape((lead.iter().product::<usize>(), d_in))?)?;
    let mut out = lead.to_vec();
    out.push(y.dim(1)?);
    y.reshape(out)
}

/// A LayerNorm then a Linear layer, `linear(ln(x))` (a pre-LayerNorm block's `ln_1` and the
/// attention's `c_attn`). On the CPU in f32 without biases it is one fused op: the LayerNorm
/// weight `γ` scales the columns of the Linear weight (`LN(x)·Wᵀ = x̂·(W·diag γ)ᵀ`), and the op
/// normalises and multiplies, so the LayerNorm's output is not a node of the graph.
#[derive(Clone, Debug)]
pub struct NormedLinear {
    ln: LayerNorm,
    linear: Linear,
}

impl NormedLinear {
    /// `linear(ln(x))`.
    pub fn new(ln: LayerNorm, linear: Linear) -> Self {
        Self { ln, linear }
    }

    /// Applies the layers to the rows of `x` `(N, d_in)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let no_bias = self.linear.bias.is_none() && self.ln.bias().is_none();
        if no_bias && fused(x, &[Some(&self.linear.weight), Some(self.ln.weight())]) {
            let w = self
                .linear
                .weight
                .apply_op2(self.ln.weight(), ScaleColumns)?;
            return x.contiguous()?.apply_op2(&w, NormedLinearOp::default());
        }
        self.linear.forward(&self.ln.forward(x)?)
    }

    /// The reference: the composed LayerNorm and Candle's product.
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        self.linear.forward_composed(&self.ln.forward_composed(x)?)
    }
}

/// Any rank, as [`Linear`]'s `Module`.
impl candle_core::Module for NormedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        over_rows(x, |rows| NormedLinear::forward(self, rows))
    }
}

/// Whether the fused CPU ops apply: a CPU f32 matrix `x` and f32 parameters.
pub(crate) fn fused(x: &Tensor, params: &[Option<&Tensor>]) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && x.rank() == 2
        && params.iter().flatten().all(|p| p.dtype() == DType::F32)
}

/// nanoGPT's MLP: `c_proj(gelu(c_fc(x)))`.
#[derive(Clone, Debug)]
pub struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
}

impl Mlp {
    /// An `n_embd -> 4·n_embd -> n_embd` MLP whose layers live under `vb` (`c_fc`, `c_proj`).
    pub fn new(n_embd: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            c_fc: Linear::new(n_embd, 4 * n_embd, bias, vb.pp("c_fc"))?,
            c_proj: Linear::new(4 * n_embd, n_embd, bias, vb.pp("c_proj"))?,
        })
    }

    /// Applies the MLP to the rows of `x` `(N, n_embd)`: one fused op on the CPU in f32 without
    /// biases, two fused Linear ops and the fused GELU with biases, Candle's ops elsewhere.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let no_bias = self.c_fc.bias.is_none() && self.c_proj.bias.is_none();
        let params = [Some(&self.c_fc.weight), Some(&self.c_proj.weight)];
        if no_bias && fused(x, &params) {
            return x.contiguous()?.apply_op3(
                &self.c_fc.weight,
                &self.c_proj.weight,
                MlpOp::default(),
            );
        }
        let h = crate::gelu::gelu(&self.c_fc.forward(x)?)?;
        self.c_proj.forward(&h)
    }

    /// `x + mlp(ln(x))`, a pre-LayerNorm block's second half, on the rows of `x` `(N, n_embd)`.
    /// On the CPU in f32 without biases it is one fused op: LayerNorm's weight `γ` scales the
    /// columns of `c_fc`'s weight (`LN(x)·W_fcᵀ = x̂·(W_fc·diag γ)ᵀ`, a small op that carries
    /// γ's gradient), and the op normalises, runs the MLP and adds the residual,
    /// so the LayerNorm output, the MLP output and the addition are not nodes of the graph
    /// (each would cost Candle's backward a zero-filled buffer and an addition).
    ///
    /// `dropout`, when given as `(p, seed)`, is dropout on the MLP's output with the mask of
    /// [`attn_op::nn::dropout`]: `x + dropout(mlp(ln(x)), p, seed)` (the mask made on the GPU
    /// on CUDA).
    pub fn forward_residual(
        &self,
        x: &Tensor,
        ln: &LayerNorm,
        dropout: Option<(f64, u64)>,
    ) -> Result<Tensor> {
        let no_bias = self.c_fc.bias.is_none() && self.c_proj.bias.is_none() && ln.bias().is_none();
        let params = [
            Some(&self.c_fc.weight),
            Some(&self.c_proj.weight),
            Some(ln.weight()),
        ];
        if no_bias && fused(x, &params) {
            let (n, c) = x.dims2()?;
            let keep = dropout
                .map(|(p, seed)| attn_op::nn::dropout_multipliers(n, c, p, seed))
                .transpose()?;
            let w_fc = self.c_fc.weight.apply_op2(ln.weight(), ScaleColumns)?;
            return x.contiguous()?.apply_op3(
                &w_fc,
                &self.c_proj.weight,
                MlpOp {
                    normed_residual: true,
                    keep,
                    ..MlpOp::default()
                },
            );
        }
        let h = self.forward(&ln.forward(x)?)?;
        match dropout {
            Some((p, seed)) => x + attn_op::nn::dropout(&h, p, seed)?,
            None => x + h,
        }
    }

    /// The reference: Candle's matrix products and `gelu_erf`.
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.c_fc.forward_composed(x)?.gelu_erf()?;
        self.c_proj.forward_composed(&h)
    }
}

// ---------------------------------------------------------------------------------------------
// Storage access.

/// `(rows, cols)` of a matrix layout.
pub(crate) fn dims2(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.dims() {
        &[r, c] => Ok((r, c)),
        d => candle_core::bail!("{what}: expected a matrix, got shape {d:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The Linear op.

/// `x · Wᵀ (+ b)`: a [`CustomOp2`] without bias, a [`CustomOp3`] with one.
struct LinearOp;

impl LinearOp {
    fn forward(
        x: &[f32],
        lx: &Layout,
        w: &[f32],
        lw: &Layout,
        b: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let (n, d_in) = dims2(lx, "linear input")?;
        let (d_out, w_in) = dims2(lw, "linear weight")?;
        if w_in != d_in || b.is_some_and(|b| b.len() != d_out) {
            candle_core::bail!(
                "linear: input {:?}, weight {:?} and bias of {:?} elements do not match",
                lx.dims(),
                lw.dims(),
                b.map(<[f32]>::len)
            );
        }
        let (xv, wt) = (
            View::row_major(x, n, d_in)?,
            View::row_major(w, d_out, d_in)?.t(),
        );
        let mut y = Unwritten::new(n * d_out);
        for_row_blocks(y.slots(), d_out, |first, rows| {
            let x_rows = xv.rows(first, rows.len() / d_out)?;
            match b {
                None => matmul_to(rows, x_rows, wt).map(drop),
                Some(b) => {
                    for (slot, &v) in rows.iter_mut().zip(b.iter().cycle()) {
                        slot.write(v);
                    }
                    // SAFETY: the loop wrote every element (`rows` is whole rows of `d_out`).
                    matmul_add(unsafe { assume_written(rows) }, x_rows, wt)
                }
            }
        })?;
        // SAFETY: the row blocks cover `y`, and each wrote its rows (all returned `Ok`).
        Ok(unsafe { y.assume_written() })
    }

    /// `(dx, dW, db)` for the gradient `g` of the output.
    fn backward(
        x: &Tensor,
        w: &Tensor,
        bias: bool,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let _span = tracing::debug_span!("linear.backward").entered();
        let g = g.contiguous()?;
        let (n, d_in) = x.dims2()?;
        let (d_out, _) = w.dims2()?;
        let (dx, dw, db) = with_data(&[x, w, &g], "linear backward", |d| {
            Self::backward_rows(d[0], d[1], d[2], (n, d_in, d_out), bias)
        })?;
        let dev = x.device();
        Ok((
            Tensor::from_vec(dx, (n, d_in), dev)?,
            Tensor::from_vec(dw, (d_out, d_in), dev)?,
            if bias {
                Some(Tensor::from_vec(db, d_out, dev)?)
            } else {
                None
            },
        ))
    }

    /// `(dx, dW, db)` of `y = x · Wᵀ (+ b)` for the output gradient `g`, all row-major slices of
    /// the shapes `(n, d_in, d_out)` say; `db` is empty without `bias`.
    fn backward_rows(
        x: &[f32],
        w: &[f32],
        g: &[f32],
        (n, d_in, d_out): (usize, usize, usize),
        bias: bool,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (xv, wv, gv) = (
            View::row_major(x, n, d_in)?,
            View::row_major(w, d_out, d_in)?,
            View::row_major(g, n, d_out)?,
        );
        let mut dx = Unwritten::new(n * d_in);
        let mut dw = Unwritten::new(d_out * d_in);
        let mut db = vec![0f32; if bias { d_out } else { 0 }];
        // dx = g · W and dW = gᵀ · x, cut by rows of their outputs; db = Σ_rows g.
        let mut jobs = product_jobs(dx.slots(), gv, wv);
        jobs.extend(product_jobs(dw.slots(), gv.t(), xv));
        if bias {
            let db = &mut db;
            jobs.push(Box::new(move || {
                column_sums(g, d_out, db);
                Ok(())
            }));
        }
        run_jobs(jobs)?;
        // SAFETY: the product jobs wrote all of `dx` and `dw` (they all returned `Ok`).
        Ok(unsafe { (dx.assume_written(), dw.assume_written(), db) })
    }
}

/// `x̂ · Wᵀ`, `x̂` the rows of `x` normalised ([`NormedLinear`]'s fused op). Keeps `x̂` and each
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
        let mut xhat = Unwritten::new(n * c);
        let mut rstd = Unwritten::new(n);
        crate::layer_norm::normalize(x, c, xhat.slots(), rstd.slots());
        // SAFETY: `x` is `n` rows of `c`, so `normalize` wrote every element of both.
        let (xhat, rstd) = unsafe { (xhat.assume_written(), rstd.assume_written()) };
        let y = LinearOp::forward(&xhat, l1, w, l2, None)?;
        let _ = self.saved.set((xhat, rstd));
        Ok((CpuStorage::F32(y), Shape::from((n, l2.dims()[0]))))
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
        let (mut dx, dw, _) = with_data(&[w, &g], "linear backward", |d| {
            LinearOp::backward_rows(xhat, d[0], d[1], (n, c, d_out), false)
        })?;
        // dx holds dL/dx̂; the normalisation's backward makes it dL/dx.
        crate::layer_norm::normalize_backward(xhat, rstd, None, c, &mut dx);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (n, c), dev)?),
            Some(Tensor::from_vec(dw, (d_out, c), dev)?),
        ))
    }
}

/// `out[j] = Σ_i m[i·out.len() + j]`, rows added in order.
fn column_sums(m: &[f32], width: usize, out: &mut [f32]) {
    out.fill(0.0);
    for row in m.chunks_exact(width) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "nanogpt-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32_slice(s1, l1, "linear")?, f32_slice(s2, l2, "linear")?);
        let y = Self::forward(x, l1, w, l2, None)?;
        Ok((
            CpuStorage::F32(y),
            Shape::from((l1.dims()[0], l2.dims()[0])),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Self::backward(x, w, false, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "nanogpt-linear-bias"
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
        let (x, w, b) = (
            f32_slice(s1, l1, "linear")?,
            f32_slice(s2, l2, "linear")?,
            f32_slice(s3, l3, "linear")?,
        );
        let y = Self::forward(x, l1, w, l2, Some(b))?;
        Ok((
            CpuStorage::F32(y),
            Shape::from((l1.dims()[0], l2.dims()[0])),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = Self::backward(x, w, true, grad)?;
        Ok((Some(dx), Some(dw), db))
    }
}

// ---------------------------------------------------------------------------------------------
// The MLP op.

/// `gelu(x · W_fcᵀ) · W_projᵀ`, or with `normed_residual` `x + gelu(x̂ · W_fcᵀ) · W_projᵀ` where
/// `x̂` is `x` normalised row by row (a pre-LayerNorm block's MLP with the LayerNorm weight
/// folded into `W_fc`). Keeps what the backward pass needs from the forward pass.
#[derive(Default)]
struct MlpOp {
    normed_residual: bool,
    /// With `normed_residual`: dropout multipliers of the MLP's output, `x + keep ⊙ mlp(x̂)`.
    keep: Option<Vec<f32>>,
    saved: OnceLock<MlpSaved>,
}

/// The pre-activation `u = x · W_fcᵀ`, and with `normed_residual` `x̂` and each row's `rstd`.
struct MlpSaved {
    u: Vec<f32>,
    xhat: Vec<f32>,
    rstd: Vec<f32>,
}

impl CustomOp3 for MlpOp {
    fn name(&self) -> &'static str {
        if self.normed_residual {
            "nanogpt-residual-mlp"
        } else {
            "nanogpt-mlp"
        }
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
        if fc_in != c || proj_in != hidden || (self.normed_residual && proj_out != c) {
            candle_core::bail!(
                "mlp: input {:?}, c_fc weight {:?} and c_proj weight {:?} do not chain",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        if self
            .keep
            .as_ref()
            .is_some_and(|k| !self.normed_residual || k.len() != n * c)
        {
            candle_core::bail!("mlp: dropout multipliers need the residual MLP and one per output");
        }
        let (normed, keep) = (self.normed_residual, self.keep.as_deref());
        let xv = View::row_major(x, n, c)?;
        let w_fc_t = View::row_major(w_fc, hidden, c)?.t();
        let w_proj_t = View::row_major(w_proj, proj_out, hidden)?.t();
        let mut u = Unwritten::new(n * hidden);
        let mut y = Unwritten::new(n * proj_out);
        let (xhat_len, rstd_len) = if normed { (n * c, n) } else { (0, 0) };
        let (mut xhat, mut rstd) = (Unwritten::new(xhat_len), Unwritten::new(rstd_len));
        // Blocks of rows: (x̂ =) normalise(x), u = x W_fcᵀ, h = gelu(u), y = (x +) h W_projᵀ,
        // each block on one thread.
        let block = row_blocks(n);
        let jobs = u
            .slots()
            .chunks_mut((block * hidden).max(1))
            .zip(y.slots().chunks_mut((block * proj_out).max(1)))
            .zip(chunks_or_empty(xhat.slots(), block * c))
            .zip(chunks_or_empty(rstd.slots(), block))
            .enumerate()
            .map(|(i, (((u, y), xhat), rstd))| {
                Box::new(move || {
                    let rows = u.len() / hidden.max(1);
                    let first = i * block;
                    let input = if normed {
                        crate::layer_norm::normalize_rows(
                            &x[first * c..(first + rows) * c],
                            c,
                            xhat,
                            rstd,
                        );
                        // SAFETY: `normalize_rows` wrote all `rows` rows of both.
                        View::row_major(unsafe { assume_written(xhat) }, rows, c)?
                    } else {
                        xv.rows(first, rows)?
                    };
                    let u = matmul_to(u, input, w_fc_t)?;
                    let mut h = Unwritten::new(u.len());
                    crate::gelu::forward(u, h.slots());
                    // SAFETY: `gelu::forward` writes every element of `h`, as long as `u`.
                    let h = unsafe { h.assume_written() };
                    let h = View::row_major(&h, rows, hidden)?;
                    if normed {
                        // The residual: y = x + (keep ⊙) h W_projᵀ.
                        let span = first * c..(first + rows) * c;
                        let keep = keep.map(|k| &k[span.clone()]);
                        residual_matmul(y, &x[span], h, w_proj_t, keep)
                    } else {
                        matmul_to(y, h, w_proj_t).map(drop)
                    }
                }) as Box<dyn FnOnce() -> Result<()> + Send>
            })
            .collect();
        run_jobs(jobs)?;
        // SAFETY: the blocks cover `u`, `y` (and `xhat`, `rstd`), and each job wrote its rows of
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
        // happen (each call of `Mlp::forward` makes a new op).
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
        let normed = self.normed_residual;
        let g = grad.contiguous()?;
        let (n, c) = x.dims2()?;
        let (hidden, _) = w_fc.dims2()?;
        let (out, _) = w_proj.dims2()?;
        let (dx, dw_fc, dw_proj) = with_data(&[x, w_fc, w_proj, &g], "mlp backward", |d| {
            // The product's input: x, or x̂ with `normed_residual`.
            let input = View::row_major(if normed { xhat } else { d[0] }, n, c)?;
            let w_fc = View::row_major(d[1], hidden, c)?;
            let w_proj = View::row_major(d[2], out, hidden)?;
            // The gradient of the MLP's output: g, times the dropout multipliers if any.
            let g_mlp = through_dropout(d[3], self.keep.as_deref());
            let gv = View::row_major(&g_mlp, n, out)?;
            let mut h = Unwritten::new(n * hidden);
            let mut du = Unwritten::new(n * hidden);
            let mut dx = Unwritten::new(n * c);
            // Blocks of rows: dh = g W_proj, du = dh ⊙ gelu'(u) (and h = gelu(u) for dW_proj),
            // d(input) = du W_fc; with `normed_residual`, dx = g + the normalisation's backward.
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
                        crate::gelu::forward_backward_in_place(u, h, du);
                        let dx = matmul_to(dx, View::row_major(du, rows, hidden)?, w_fc)?;
                        if normed {
                            let rows = first..first + rows;
                            crate::layer_norm::normalize_backward_rows(
                                &xhat[rows.start * c..rows.end * c],
                                &rstd[rows.clone()],
                                Some(&d[3][rows.start * c..rows.end * c]),
                                c,
                                dx,
                            );
                        }
                        Ok(())
                    }) as Box<dyn FnOnce() -> Result<()> + Send>
                })
                .collect();
            run_jobs(jobs)?;
            // SAFETY: the blocks cover `h`, `du` and `dx`; each job wrote its rows of all three
            // (`forward_backward_in_place` writes every element of `h`; all returned `Ok`).
            let (h, du, dx) =
                unsafe { (h.assume_written(), du.assume_written(), dx.assume_written()) };
            // dW_proj = gᵀ h and dW_fc = duᵀ · input, cut by rows of their outputs.
            let mut dw_proj = Unwritten::new(out * hidden);
            let mut dw_fc = Unwritten::new(hidden * c);
            let mut jobs = product_jobs(dw_proj.slots(), gv.t(), View::row_major(&h, n, hidden)?);
            jobs.extend(product_jobs(
                dw_fc.slots(),
                View::row_major(&du, n, hidden)?.t(),
                input,
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

/// `W · diag(γ)`: column `j` of the matrix `W` times `γ[j]`, with its backward (Candle's
/// `broadcast_mul` differentiates through a strided reduction over rows that is many times
/// slower).
pub(crate) struct ScaleColumns;

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

/// `slots` in chunks of `size`, or endless empty chunks when `slots` is empty (an optional
/// buffer zipped with the others).
fn chunks_or_empty(
    slots: &mut [MaybeUninit<f32>],
    size: usize,
) -> impl Iterator<Item = &mut [MaybeUninit<f32>]> {
    let empty = slots.is_empty();
    slots
        .chunks_mut(size.max(1))
        .chain(std::iter::repeat_with(|| &mut [][..]).take_while(move |_| empty))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    use crate::rng::Rng;
    use crate::test_util::{assert_close, output_and_grads, set_random};

    /// Fused Linear (with and without bias; shapes that split into several uneven blocks) against
    /// Candle's matrix product and its autograd.
    #[test]
    fn linear_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (bias, n, d_in, d_out) in [(false, 300, 40, 72), (true, 211, 33, 129), (true, 3, 5, 7)]
        {
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            let layer = Linear::new(d_in, d_out, bias, vb)?;
            let mut rng = Rng::new(11, 0);
            set_random(&map, &mut rng, 1.0)?;
            let x = Var::from_vec(rng.normal_vec(n * d_in, 1.0), (n, d_in), &dev)?;
            let probe = Tensor::from_vec(rng.normal_vec(n * d_out, 1.0), (n, d_out), &dev)?;
            let mut params = vec![layer.weight.clone()];
            params.extend(layer.bias.clone());
            let fused = output_and_grads(&layer.forward(&x)?, &probe, &x, &params)?;
            let reference = output_and_grads(&layer.forward_composed(&x)?, &probe, &x, &params)?;
            assert_close(&fused, &reference, 1e-5);
        }
        Ok(())
    }

    /// As a `Module` (how attn-op's attention layer calls it), any rank maps over the last
    /// dimension: the same values as the fused op on the flattened rows, gradients included.
    #[test]
    fn module_forward_takes_any_rank() -> Result<()> {
        use candle_core::Module;
        let dev = Device::Cpu;
        let map = VarMap::new();
        let layer = Linear::new(6, 9, true, VarBuilder::from_varmap(&map, DType::F32, &dev))?;
        let mut rng = Rng::new(5, 0);
        set_random(&map, &mut rng, 1.0)?;
        let x = Var::from_vec(rng.normal_vec(2 * 3 * 6, 1.0), (2, 3, 6), &dev)?;
        let probe = Tensor::from_vec(rng.normal_vec(2 * 3 * 9, 1.0), (6, 9), &dev)?;
        let params = [layer.weight.clone(), layer.bias.clone().expect("a bias")];
        let y = Module::forward(&layer, &x)?;
        assert_eq!(y.dims(), &[2, 3, 9]);
        let batched = output_and_grads(&y.reshape((6, 9))?, &probe, &x, &params)?;
        let rows = output_and_grads(&layer.forward(&x.reshape((6, 6))?)?, &probe, &x, &params)?;
        assert_close(&batched, &rows, 0.0);
        let e = Module::forward(&layer, &Tensor::new(1f32, &dev)?).unwrap_err();
        assert!(e.to_string().contains("got a scalar"), "{e}");
        Ok(())
    }

    /// Fused MLP against the composed Candle ops (matrix products, `gelu_erf`) and their autograd.
    #[test]
    fn mlp_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (n, c) in [(257, 24), (2, 8)] {
            let map = VarMap::new();
            let mlp = Mlp::new(c, false, VarBuilder::from_varmap(&map, DType::F32, &dev))?;
            let mut rng = Rng::new(12, 0);
            set_random(&map, &mut rng, 0.3)?;
            let x = Var::from_vec(rng.normal_vec(n * c, 1.0), (n, c), &dev)?;
            let probe = Tensor::from_vec(rng.normal_vec(n * c, 1.0), (n, c), &dev)?;
            let params = [mlp.c_fc.weight.clone(), mlp.c_proj.weight.clone()];
            let fused = output_and_grads(&mlp.forward(&x)?, &probe, &x, &params)?;
            let reference = output_and_grads(&mlp.forward_composed(&x)?, &probe, &x, &params)?;
            assert_close(&fused, &reference, 2e-5);
        }
        Ok(())
    }

    /// The fused residual MLP (`x + mlp(ln(x))`, LayerNorm weight folded into `c_fc`) against
    /// the composed LayerNorm, MLP and addition, with a random LayerNorm weight, on shapes that
    /// split into uneven blocks, without and with dropout multipliers on the MLP's output.
    #[test]
    fn residual_mlp_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (n, c, p) in [(257, 24, 0.0), (2, 8, 0.0), (257, 24, 0.3), (3, 8, 0.5)] {
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            let mlp = Mlp::new(c, false, vb.pp("mlp"))?;
            let ln = LayerNorm::new(c, false, vb.pp("ln"))?;
            let mut rng = Rng::new(15, 0);
            set_random(&map, &mut rng, 0.5)?;
            let x = Var::from_vec(rng.normal_vec(n * c, 1.0), (n, c), &dev)?;
            let probe = Tensor::from_vec(rng.normal_vec(n * c, 1.0), (n, c), &dev)?;
            let params = [
                mlp.c_fc.weight.clone(),
                mlp.c_proj.weight.clone(),
                ln.weight().clone(),
            ];
            let dropout = (p > 0.0).then_some((p, 99));
            let y = mlp.forward_residual(&x, &ln, dropout)?;
            let fused = output_and_grads(&y, &probe, &x, &params)?;
            let mut h = mlp.forward_composed(&ln.forward_composed(&x)?)?;
            if p > 0.0 {
                let keep = attn_op::nn::dropout_multipliers(n, c, p, 99)?;
                assert!(keep.contains(&0.0), "some outputs dropped");
                h = (h * Tensor::from_vec(keep, (n, c), &dev)?)?;
            }
            let reference = output_and_grads(&(x.as_tensor() + h)?, &probe, &x, &params)?;
            assert_close(&fused, &reference, 2e-5);
        }
        Ok(())
    }

    /// The fused LayerNorm + Linear (weight folded into the Linear's) against the composed
    /// layers, with a random LayerNorm weight, through the `Module` (rank 3) as attn-op calls it.
    #[test]
    fn normed_linear_matches_candle() -> Result<()> {
        use candle_core::Module;
        let dev = Device::Cpu;
        for (n, c, d_out) in [(130, 24, 72), (3, 8, 5)] {
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            let layer = NormedLinear::new(
                LayerNorm::new(c, false, vb.pp("ln"))?,
                Linear::new(c, d_out, false, vb.pp("lin"))?,
            );
            let mut rng = Rng::new(16, 0);
            set_random(&map, &mut rng, 0.5)?;
            let x = Var::from_vec(rng.normal_vec(n * c, 1.0), (1, n, c), &dev)?;
            let probe = Tensor::from_vec(rng.normal_vec(n * d_out, 1.0), (1, n, d_out), &dev)?;
            let params = [layer.linear.weight.clone(), layer.ln.weight().clone()];
            let y = Module::forward(&layer, &x)?;
            assert_eq!(y.dims(), &[1, n, d_out]);
            let fused = output_and_grads(&y, &probe, &x, &params)?;
            let composed = layer.forward_composed(&x.reshape((n, c))?)?;
            let reference = output_and_grads(&composed.unsqueeze(0)?, &probe, &x, &params)?;
            assert_close(&fused, &reference, 2e-5);
        }
        Ok(())
    }

    /// The composed reference's gradients match central finite differences (in f64), so the
    /// fused ops, which match the reference, have the right gradients.
    #[test]
    fn composed_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F64, &dev);
        let mlp = Mlp::new(3, true, vb)?;
        let mut rng = Rng::new(13, 0);
        set_random(&map, &mut rng, 0.7)?;
        let x = Var::from_vec(
            rng.normal_vec(4 * 3, 1.0)
                .into_iter()
                .map(f64::from)
                .collect::<Vec<_>>(),
            (4, 3),
            &dev,
        )?;
        let probe = Tensor::from_vec(
            rng.normal_vec(4 * 3, 1.0)
                .into_iter()
                .map(f64::from)
                .collect::<Vec<_>>(),
            (4, 3),
            &dev,
        )?;
        crate::test_util::assert_gradients_match_finite_differences(&map, &x, || {
            (mlp.forward_composed(&x)? * &probe)?.sum_all()
        })
    }

    /// One thread or two: the same bits (the blocks depend on the shapes only).
    #[test]
    fn results_do_not_depend_on_the_thread_count() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let mlp = Mlp::new(32, false, vb.pp("mlp"))?;
        let lin = Linear::new(32, 48, true, vb.pp("lin"))?;
        let mut rng = Rng::new(14, 0);
        set_random(&map, &mut rng, 0.2)?;
        let x = Var::from_vec(rng.normal_vec(300 * 32, 1.0), (300, 32), &dev)?;
        let probe = Tensor::from_vec(rng.normal_vec(300 * 48, 1.0), (300, 48), &dev)?;
        let params = [
            mlp.c_fc.weight.clone(),
            mlp.c_proj.weight.clone(),
            lin.weight.clone(),
            lin.bias.clone().unwrap(),
        ];
        let run = |threads: usize| -> Result<Vec<Vec<f32>>> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(candle_core::Error::wrap)?;
            pool.install(|| {
                let y = lin.forward(&mlp.forward(&x)?)?;
                output_and_grads(&y, &probe, &x, &params)
            })
        };
        let one = run(1)?;
        for threads in [2, 3, 5] {
            assert_eq!(one, run(threads)?, "{threads} threads");
        }
        Ok(())
    }
}
