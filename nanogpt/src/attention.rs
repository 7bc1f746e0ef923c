//! The attention half of a pre-LayerNorm block, `x + c_proj(attn(c_attn(ln_1(x))))`.
//!
//! attn-op's [`CausalSelfAttention`] computes it from nanoGPT's weights as five nodes of Candle's
//! autograd graph (`c_attn` with `ln_1` folded in, the attention, `c_proj`, the residual
//! addition), each of which costs Candle's backward pass a zero-filled buffer and an addition
//! as large as its input: the packed q|k|v rows `(B·T, 3·C)` most of all. On the CPU in f32
//! without biases, [`Attention`] is one op instead: it normalises its input, projects it to
//! q|k|v, runs attn-op's flash attention on those rows in place ([`attn_op::rows::QkvRows`]),
//! projects and adds the residual, and keeps what its backward pass needs. LayerNorm's weight
//! is folded into `c_attn`'s (`LN(x)·Wᵀ = x̂·(W·diag γ)ᵀ`) as in the MLP. Dropout draws its
//! seeds from attn-op's layer and its masks as the layer does, so a run is the same whichever
//! path it takes. Elsewhere (biases, other devices and dtypes, the KV cache of sampling)
//! attn-op's layer runs over the same weights, in the model's dtype.

use std::sync::OnceLock;

use attn_op::nn::{dropout_multipliers, AttentionConfig, CausalSelfAttention, Causality, KvCache};
use attn_op::rows::{QkvForward, QkvRows};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::cpu_data::{assume_written, f32_slice, through_dropout, with_data, Unwritten};
use crate::layer_norm::{normalize_backward, normalize_rows, LayerNorm};
use crate::linear::{dims2, fused, Linear, NormedLinear, ScaleColumns};
use crate::matmul::{matmul_to, product_jobs, residual_matmul, row_blocks, run_jobs, View};

/// nanoGPT's causal self-attention with its `ln_1` in front and the residual around it.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use nanogpt::attention::Attention;
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let attn = Attention::new(32, 4, false, 0.0, vb.pp("h.0"))?;
/// // Two sequences of 10 tokens as rows (B·T, C).
/// let x = Tensor::randn(0f32, 1., (2 * 10, 32), &Device::Cpu)?;
/// let y = attn.forward_residual(&x, 10, true)?;
/// assert_eq!(y.dims(), &[20, 32]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct Attention {
    ln_1: LayerNorm,
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    dropout: f64,
    /// attn-op's layer over the same weights.
    layer: CausalSelfAttention,
}

impl Attention {
    /// The weights `ln_1.*` and `attn.{c_attn, c_proj}.*` of a block under `vb`.
    pub fn new(
        n_embd: usize,
        n_head: usize,
        bias: bool,
        dropout: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let ln_1 = LayerNorm::new(n_embd, bias, vb.pp("ln_1"))?;
        let c_attn = Linear::new(n_embd, 3 * n_embd, bias, vb.pp("attn.c_attn"))?;
        let c_proj = Linear::new(n_embd, n_embd, bias, vb.pp("attn.c_proj"))?;
        let layer = CausalSelfAttention::with_projections(
            AttentionConfig {
                n_embd,
                n_head,
                bias,
                dropout,
                causality: Causality::Always,
            },
            // attn-op's layer over this crate's fused Linear (parallel on the CPU).
            NormedLinear::new(ln_1.clone(), c_attn.clone()),
            c_proj.clone(),
        )?;
        Ok(Self {
            ln_1,
            c_attn,
            c_proj,
            n_head,
            dropout,
            layer,
        })
    }

    /// `x + attn(ln_1(x))` for the residual stream `x` `(B·T, C)` of sequences of `seq_len`
    /// tokens; `train` turns dropout on.
    pub fn forward_residual(&self, x: &Tensor, seq_len: usize, train: bool) -> Result<Tensor> {
        let _span = tracing::debug_span!("attention").entered();
        if self.fuses(x) {
            let (n, c) = x.dims2()?;
            if seq_len == 0 || !n.is_multiple_of(seq_len) {
                candle_core::bail!(
                    "attention: seq_len = {seq_len} must be positive and divide the {n} rows"
                );
            }
            let mut rows = QkvRows::new(self.n_head, c / self.n_head, seq_len, true)?;
            let mut keep = None;
            if train {
                // The seeds attn-op's layer would draw: the attention weights' (always in
                // training), then the output's when there is dropout.
                let seed = self.layer.draw_seed();
                if self.dropout > 0.0 {
                    rows = rows.with_dropout(self.dropout, seed)?;
                    let seed = self.layer.draw_seed();
                    keep = Some(dropout_multipliers(n, c, self.dropout, seed)?);
                }
            }
            let w_attn = self
                .c_attn
                .weight
                .apply_op2(self.ln_1.weight(), ScaleColumns)?;
            let op = AttentionOp {
                rows,
                keep,
                saved: OnceLock::new(),
            };
            return x.contiguous()?.apply_op3(&w_attn, &self.c_proj.weight, op);
        }
        // attn-op's layer in the model's dtype: its projections (this crate's Linear) cast the
        // f32 weights to it, as autocast does, so bf16/f16 on CUDA run the flash kernels.
        x + self.layer.forward_rows(x, seq_len, train)?
    }

    /// Whether [`Self::forward_residual`] runs the fused op: on the CPU in f32, without biases.
    fn fuses(&self, x: &Tensor) -> bool {
        let no_bias =
            self.c_attn.bias.is_none() && self.c_proj.bias.is_none() && self.ln_1.bias().is_none();
        let weights = [
            Some(&self.c_attn.weight),
            Some(&self.c_proj.weight),
            Some(self.ln_1.weight()),
        ];
        no_bias && fused(x, &weights)
    }

    /// `x + attn(ln_1(x))` for `x` `(B, T, C)` that continues the sequences in `cache`.
    pub fn forward_cached(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        x + self.layer.forward_cached(x, cache)?
    }

    /// Where the layer is in its sequence of dropout seeds.
    pub fn seed_state(&self) -> u64 {
        self.layer.seed_state()
    }

    /// Restores a [`Self::seed_state`].
    pub fn set_seed_state(&self, state: u64) {
        self.layer.set_seed_state(state)
    }
}

/// `x + attn(x̂ · W_attnᵀ) · W_projᵀ`, `x̂` the rows of `x` normalised, `W_attn` with LayerNorm's
/// weight folded in; with dropout (in `rows` and `keep`), `x + keep ⊙ (attn(·) · W_projᵀ)`. Keeps
/// what the backward pass needs from the forward pass.
struct AttentionOp {
    rows: QkvRows,
    /// Dropout multipliers of the output projection, one per output element.
    keep: Option<Vec<f32>>,
    saved: OnceLock<Saved>,
}

/// `x̂` and each row's `rstd`, the packed q|k|v rows, and the attention's output and logsumexp.
struct Saved {
    xhat: Vec<f32>,
    rstd: Vec<f32>,
    qkv: Vec<f32>,
    attn: QkvForward,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "nanogpt-residual-attention"
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
        let _span = tracing::debug_span!("attention.forward").entered();
        let (x, w_attn, w_proj) = (
            f32_slice(s1, l1, "attention")?,
            f32_slice(s2, l2, "attention")?,
            f32_slice(s3, l3, "attention")?,
        );
        let (n, c) = dims2(l1, "attention input")?;
        if c == 0 || l2.dims() != [3 * c, c] || l3.dims() != [c, c] {
            candle_core::bail!(
                "attention: input {:?} needs a c_attn weight ({}, {c}) and a c_proj weight \
                 ({c}, {c}), got {:?} and {:?}",
                l1.dims(),
                3 * c,
                l2.dims(),
                l3.dims()
            );
        }
        let w_attn_t = View::row_major(w_attn, 3 * c, c)?.t();
        let w_proj_t = View::row_major(w_proj, c, c)?.t();
        // Blocks of rows: x̂ = normalise(x), qkv = x̂ W_attnᵀ, each block on one thread.
        let mut xhat = Unwritten::new(n * c);
        let mut rstd = Unwritten::new(n);
        let mut qkv = Unwritten::new(n * 3 * c);
        let block = row_blocks(n);
        let jobs = qkv
            .slots()
            .chunks_mut((block * 3 * c).max(1))
            .zip(xhat.slots().chunks_mut((block * c).max(1)))
            .zip(rstd.slots().chunks_mut(block.max(1)))
            .enumerate()
            .map(|(i, ((qkv, xhat), rstd))| {
                Box::new(move || {
                    let rows = rstd.len();
                    let first = i * block;
                    normalize_rows(&x[first * c..(first + rows) * c], c, xhat, rstd);
                    // SAFETY: `normalize_rows` wrote all `rows` rows of `xhat` (and `rstd`).
                    let xhat = View::row_major(unsafe { assume_written(xhat) }, rows, c)?;
                    matmul_to(qkv, xhat, w_attn_t).map(drop)
                }) as Box<dyn FnOnce() -> Result<()> + Send>
            })
            .collect();
        run_jobs(jobs)?;
        // SAFETY: the blocks cover `xhat`, `rstd` and `qkv` (`n` rows each), and every job wrote
        // its rows of all three (all returned `Ok`).
        let (xhat, rstd, qkv) = unsafe {
            (
                xhat.assume_written(),
                rstd.assume_written(),
                qkv.assume_written(),
            )
        };
        let attn = {
            let _span = tracing::debug_span!("flash_attention.forward").entered();
            self.rows.forward(&qkv)?
        };
        // out = x + y W_projᵀ (x + keep ⊙ (y W_projᵀ) with dropout), by blocks of rows.
        if self.keep.as_ref().is_some_and(|k| k.len() != n * c) {
            candle_core::bail!("attention: one dropout multiplier per output element needed");
        }
        let keep = self.keep.as_deref();
        let mut out = Unwritten::new(n * c);
        let yv = View::row_major(&attn.y, n, c)?;
        let jobs = out
            .slots()
            .chunks_mut((block * c).max(1))
            .enumerate()
            .map(|(i, out)| {
                Box::new(move || {
                    // This block's elements of x (and keep).
                    let span = i * block * c..i * block * c + out.len();
                    let y_rows = yv.rows(i * block, out.len() / c)?;
                    let keep = keep.map(|k| &k[span.clone()]);
                    residual_matmul(out, &x[span], y_rows, w_proj_t, keep)
                }) as Box<dyn FnOnce() -> Result<()> + Send + '_>
            })
            .collect();
        run_jobs(jobs)?;
        // SAFETY: the blocks cover `out`, and each job wrote all its rows (all returned `Ok`).
        let out = unsafe { out.assume_written() };
        // Only the first forward of this op object stores its results; a second one cannot
        // happen (each call of `Attention::forward_residual` makes a new op).
        let _ = self.saved.set(Saved {
            xhat,
            rstd,
            qkv,
            attn,
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w_attn: &Tensor,
        w_proj: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _span = tracing::debug_span!("attention.backward").entered();
        let Some(Saved {
            xhat,
            rstd,
            qkv,
            attn,
        }) = self.saved.get()
        else {
            candle_core::bail!("attention backward: the forward pass did not run on the CPU");
        };
        let g = grad.contiguous()?;
        let (n, c) = x.dims2()?;
        let (dx, dw_attn, dw_proj) = with_data(&[w_attn, w_proj, &g], "attention backward", |d| {
            let w_attn = View::row_major(d[0], 3 * c, c)?;
            let w_proj = View::row_major(d[1], c, c)?;
            // The gradient of the projection's output: g, times the dropout multipliers if any.
            let g_proj = through_dropout(d[2], self.keep.as_deref());
            let gv = View::row_major(&g_proj, n, c)?;
            // dy = g W_proj and dW_proj = gᵀ y.
            let mut dy = Unwritten::new(n * c);
            let mut dw_proj = Unwritten::new(c * c);
            let mut jobs = product_jobs(dy.slots(), gv, w_proj);
            jobs.extend(product_jobs(
                dw_proj.slots(),
                gv.t(),
                View::row_major(&attn.y, n, c)?,
            ));
            run_jobs(jobs)?;
            // SAFETY: the product jobs wrote all of both (they all returned `Ok`).
            let (dy, dw_proj) = unsafe { (dy.assume_written(), dw_proj.assume_written()) };
            let dqkv = {
                let _span = tracing::debug_span!("flash_attention.backward").entered();
                self.rows.backward(qkv, &attn.y, &attn.lse, &dy)?
            };
            // dx̂ = dqkv W_attn and dW_attn = dqkvᵀ x̂.
            let dqkv = View::row_major(&dqkv, n, 3 * c)?;
            let mut dx = Unwritten::new(n * c);
            let mut dw_attn = Unwritten::new(3 * c * c);
            let mut jobs = product_jobs(dx.slots(), dqkv, w_attn);
            jobs.extend(product_jobs(
                dw_attn.slots(),
                dqkv.t(),
                View::row_major(xhat, n, c)?,
            ));
            run_jobs(jobs)?;
            // SAFETY: the product jobs wrote all of both (they all returned `Ok`).
            let (mut dx, dw_attn) = unsafe { (dx.assume_written(), dw_attn.assume_written()) };
            // dx holds dL/dx̂; the normalisation's backward and the residual make it dL/dx.
            normalize_backward(xhat, rstd, Some(d[2]), c, &mut dx);
            Ok((dx, dw_attn, dw_proj))
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (n, c), dev)?),
            Some(Tensor::from_vec(dw_attn, (3 * c, c), dev)?),
            Some(Tensor::from_vec(dw_proj, (c, c), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attn_op::{scaled_dot_product_attention, sdpa_kernel, Backend, SdpaOptions};
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    use crate::rng::Rng;
    use crate::test_util::{assert_close, output_and_grads, set_random};

    /// The reference: Candle's LayerNorm and products, and attn-op's math backend (plain Candle
    /// ops) on q, k, v split out of the packed rows.
    fn composed(attn: &Attention, x: &Tensor, t: usize) -> Result<Tensor> {
        let (n, c) = x.dims2()?;
        let (h, b) = (attn.n_head, n / t);
        let qkv = attn
            .c_attn
            .forward_composed(&attn.ln_1.forward_composed(x)?)?
            .reshape((b, t, 3, h, c / h))?;
        let head = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
        let _math = sdpa_kernel(&[Backend::Math]);
        let opts = SdpaOptions {
            is_causal: true,
            ..Default::default()
        };
        let y = scaled_dot_product_attention(&head(0)?, &head(1)?, &head(2)?, &opts)?
            .transpose(1, 2)?
            .reshape((n, c))?;
        x + attn.c_proj.forward_composed(&y)?
    }

    /// A random input `x` `(n, c)` (a variable) and a random probe of the output, from `seed`.
    fn inputs(n: usize, c: usize, seed: u64) -> Result<(Var, Tensor)> {
        let mut rng = Rng::new(seed, 0);
        let x = Var::from_vec(rng.normal_vec(n * c, 1.0), (n, c), &Device::Cpu)?;
        let probe = Tensor::from_vec(rng.normal_vec(n * c, 1.0), (n, c), &Device::Cpu)?;
        Ok((x, probe))
    }

    fn layer(c: usize, h: usize, bias: bool, map: &VarMap) -> Result<Attention> {
        let vb = VarBuilder::from_varmap(map, DType::F32, &Device::Cpu);
        let attn = Attention::new(c, h, bias, 0.0, vb)?;
        set_random(map, &mut Rng::new(21, 0), 0.4)?;
        Ok(attn)
    }

    /// The fused op against the composed reference and its autograd: random LayerNorm weight,
    /// rows that split into uneven blocks, a sequence length that is not a multiple of the
    /// attention's tiles; in training and in evaluation.
    #[test]
    fn fused_matches_composed() -> Result<()> {
        for (b, t, c, h) in [(10, 13, 24, 3), (1, 5, 8, 2), (2, 64, 32, 4)] {
            let map = VarMap::new();
            let attn = layer(c, h, false, &map)?;
            let (x, probe) = inputs(b * t, c, 22)?;
            let params = [
                attn.c_attn.weight.clone(),
                attn.c_proj.weight.clone(),
                attn.ln_1.weight().clone(),
            ];
            let reference = output_and_grads(&composed(&attn, &x, t)?, &probe, &x, &params)?;
            for train in [true, false] {
                assert!(attn.fuses(&x));
                let y = attn.forward_residual(&x, t, train)?;
                let fused = output_and_grads(&y, &probe, &x, &params)?;
                assert_close(&fused, &reference, 2e-5);
            }
        }
        Ok(())
    }

    /// With biases attn-op's layer runs (over the same weights), and matches the reference too.
    #[test]
    fn biases_use_attn_ops_layer() -> Result<()> {
        let (b, t, c, h) = (2, 7, 16, 2);
        let map = VarMap::new();
        let attn = layer(c, h, true, &map)?;
        let (x, probe) = inputs(b * t, c, 23)?;
        let params: Vec<Tensor> = map
            .all_vars()
            .iter()
            .map(|v| v.as_tensor().clone())
            .collect();
        assert!(!attn.fuses(&x));
        let y = attn.forward_residual(&x, t, true)?;
        let got = output_and_grads(&y, &probe, &x, &params)?;
        let reference = output_and_grads(&composed(&attn, &x, t)?, &probe, &x, &params)?;
        assert_close(&got, &reference, 2e-5);
        Ok(())
    }

    /// With dropout in training, the fused op draws the same seeds and masks as attn-op's layer:
    /// the same output and gradients as the layer from the same seed state, a different output
    /// from another seed state, and the same seed state afterwards.
    #[test]
    fn dropout_matches_attn_ops_layer() -> Result<()> {
        let (b, t, c, h) = (3, 16, 32, 4);
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let attn = Attention::new(c, h, false, 0.3, vb)?;
        set_random(&map, &mut Rng::new(24, 0), 0.4)?;
        let (x, probe) = inputs(b * t, c, 25)?;
        let params: Vec<Tensor> = map
            .all_vars()
            .iter()
            .map(|v| v.as_tensor().clone())
            .collect();
        let run = |fused: bool, state: u64| -> Result<(Vec<Vec<f32>>, u64)> {
            attn.set_seed_state(state);
            let y = if fused {
                attn.forward_residual(&x, t, true)?
            } else {
                (x.as_tensor() + attn.layer.forward_rows(&x, t, true)?)?
            };
            Ok((
                output_and_grads(&y, &probe, &x, &params)?,
                attn.seed_state(),
            ))
        };
        let (fused, fused_state) = run(true, 7)?;
        let (layer, layer_state) = run(false, 7)?;
        assert_eq!(fused_state, layer_state);
        assert_close(&fused, &layer, 2e-5);
        let (other, _) = run(true, 8)?;
        let diff = fused[0]
            .iter()
            .zip(&other[0])
            .filter(|(a, b)| a != b)
            .count();
        assert!(diff > 0, "another seed drops other weights");
        Ok(())
    }

    #[test]
    fn a_sequence_length_that_does_not_divide_the_rows_is_an_error() -> Result<()> {
        let map = VarMap::new();
        let attn = layer(8, 2, false, &map)?;
        let x = Tensor::ones((6, 8), DType::F32, &Device::Cpu)?;
        for t in [0, 4] {
            let err = attn.forward_residual(&x, t, false).unwrap_err().to_string();
            assert!(err.contains("seq_len"), "{err}");
        }
        Ok(())
    }
}
