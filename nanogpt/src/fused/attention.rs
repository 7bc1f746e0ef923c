//! `x + c_proj(attn(c_attn(ln_1(x))))`, the attention half of a pre-LayerNorm block, as one CPU
//! op with its backward.
//!
//! attn-op's [`CausalSelfAttention`] (the plain model's) computes it as five nodes of Candle's
//! autograd graph (`ln_1`, `c_attn`, the attention, `c_proj`, the residual addition), each of
//! which costs Candle's backward pass a zero-filled buffer and an addition as large as its
//! input: the packed q|k|v rows `(B·T, 3·C)` most of all. Here the op normalises its input,
//! projects it to q|k|v, runs attn-op's flash attention on those rows in place
//! ([`attn_op::rows::QkvRows`]), projects and adds the residual, and keeps what its backward
//! pass needs. `ln_1`'s weight is folded into `c_attn`'s ([`super::scale_columns`]). Dropout
//! takes its seeds from the layer ([`CausalSelfAttention::draw_training_seeds`]), so the masks
//! are the layer's.

use std::sync::OnceLock;

use attn_op::nn::{dropout_multipliers, CausalSelfAttention};
use attn_op::rows::{QkvForward, QkvRows};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::cpu_data::{assume_written, dims2, f32_slice, through_dropout, with_data, Unwritten};
use super::matmul::{matmul_to, product_jobs, residual_matmul, row_blocks, run_jobs, View};
use super::normalize::{normalize_backward, normalize_rows};
use super::scale_columns::ScaleColumns;

/// `x + layer(ln_1(x))` for the residual stream `x` `(B·T, C)` of sequences of `seq_len`
/// tokens, from the weights of `ln_1` `(C)`, `c_attn` `(3C, C)` and `c_proj` `(C, C)` (no
/// biases) that `layer` was built over; `train` turns dropout on.
pub(crate) fn attention_residual(
    x: &Tensor,
    [ln_1, c_attn, c_proj]: [&Tensor; 3],
    layer: &CausalSelfAttention,
    seq_len: usize,
    train: bool,
) -> Result<Tensor> {
    let (n, c) = x.dims2()?;
    if seq_len == 0 || !n.is_multiple_of(seq_len) {
        candle_core::bail!(
            "attention: seq_len = {seq_len} must be positive and divide the {n} rows"
        );
    }
    let cfg = layer.config();
    let mut rows = QkvRows::new(cfg.n_head, c / cfg.n_head, seq_len, true)?;
    let mut keep = None;
    if train {
        let seeds = layer.draw_training_seeds();
        if let Some(output) = seeds.output {
            rows = rows.with_dropout(cfg.dropout, seeds.attention)?;
            keep = Some(dropout_multipliers(n, c, cfg.dropout, output)?);
        }
    }
    let w_attn = c_attn.apply_op2(ln_1, ScaleColumns)?;
    let op = AttentionOp {
        rows,
        keep,
        saved: OnceLock::new(),
    };
    x.contiguous()?.apply_op3(&w_attn, c_proj, op)
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
        // happen (each call of `attention_residual` makes a new op).
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
    use candle_core::{DType, Device, Var};
    use candle_nn::{VarBuilder, VarMap};

    use crate::model::{Block, ModelConfig};
    use crate::rng::Rng;
    use crate::test_util::{assert_close, output_and_grads, set_random};

    /// A block of width `c`, `h` heads and dropout `p`, with random weights.
    fn block(c: usize, h: usize, p: f64, map: &VarMap) -> Result<Block> {
        let cfg = ModelConfig {
            vocab_size: 1,
            block_size: 64,
            n_layer: 1,
            n_head: h,
            n_embd: c,
            dropout: p,
            bias: false,
        };
        let block = Block::new(&cfg, VarBuilder::from_varmap(map, DType::F32, &Device::Cpu))?;
        set_random(map, &mut Rng::new(21, 0), 0.4)?;
        Ok(block)
    }

    /// A random input `x` `(n, c)` (a variable) and a random probe of the output, from `seed`.
    fn inputs(n: usize, c: usize, seed: u64) -> Result<(Var, Tensor)> {
        let mut rng = Rng::new(seed, 0);
        let x = Var::from_vec(rng.normal_vec(n * c, 1.0), (n, c), &Device::Cpu)?;
        let probe = Tensor::from_vec(rng.normal_vec(n * c, 1.0), (n, c), &Device::Cpu)?;
        Ok((x, probe))
    }

    fn fused(block: &Block, x: &Tensor, t: usize, train: bool) -> Result<Tensor> {
        let w = [
            &block.ln_1.weight,
            &block.c_attn.weight,
            &block.c_proj.weight,
        ];
        attention_residual(x, w, &block.attn, t, train)
    }

    /// The fused op against the plain block's attention half (attn-op's layer over Candle's
    /// LayerNorm and products) and its autograd: random LayerNorm weight, rows that split into
    /// uneven blocks, sequence lengths that are not multiples of the attention's tiles; in
    /// training and in evaluation, without and with dropout (then from the same seed state
    /// of the layer, which both leave in the same place; another seed state drops others).
    #[test]
    fn matches_the_plain_layers() -> Result<()> {
        for (b, t, c, h, p) in [
            (10, 13, 24, 3, 0.0),
            (1, 5, 8, 2, 0.0),
            (2, 64, 32, 4, 0.0),
            (3, 16, 32, 4, 0.3),
        ] {
            let map = VarMap::new();
            let block = block(c, h, p, &map)?;
            let (x, probe) = inputs(b * t, c, 22)?;
            let params: Vec<Tensor> = [
                &block.c_attn.weight,
                &block.c_proj.weight,
                &block.ln_1.weight,
            ]
            .map(|t| t.clone())
            .to_vec();
            for train in [true, false] {
                block.attn.set_seed_state(7);
                let plain = block.attention_residual(&x, t, train)?;
                let plain_state = block.attn.seed_state();
                let reference = output_and_grads(&plain, &probe, &x, &params)?;
                block.attn.set_seed_state(7);
                let y = fused(&block, &x, t, train)?;
                assert_eq!(block.attn.seed_state(), plain_state);
                let got = output_and_grads(&y, &probe, &x, &params)?;
                assert_close(&got, &reference, 2e-5);
                if train && p > 0.0 {
                    block.attn.set_seed_state(8);
                    let other = fused(&block, &x, t, train)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    assert!(
                        other.iter().zip(&got[0]).any(|(a, b)| a != b),
                        "another seed drops other weights"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_sequence_length_that_does_not_divide_the_rows_is_an_error() -> Result<()> {
        let map = VarMap::new();
        let block = block(8, 2, 0.0, &map)?;
        let x = Tensor::ones((6, 8), DType::F32, &Device::Cpu)?;
        for t in [0, 4] {
            let err = fused(&block, &x, t, false).unwrap_err().to_string();
            assert!(err.contains("seq_len"), "{err}");
        }
        Ok(())
    }
}
