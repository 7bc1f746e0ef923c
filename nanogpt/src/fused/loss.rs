//! Cross-entropy of logits against target ids, as one CPU op with its backward.
//!
//! `candle_nn::loss::cross_entropy` is `log_softmax`, a gather and a mean: about ten graph nodes
//! over the `(B·T, vocab)` logits, each a pass and, in the backward pass, a zero-filled buffer
//! and an addition. Here the forward keeps each row's logsumexp and the backward is one pass:
//! `dlogits = (softmax - onehot(target)) · grad / N`.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use multiversion::multiversion;

use super::cpu_data::{f32_slice, with_data, Unwritten};

/// Mean over rows of `logsumexp(logits_i) - logits_i[targets_i]`, a scalar; `logits` `(N, V)`,
/// `targets` `(N)` of ids below `V`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let logits = Tensor::new(&[[0f32, 0.], [2., 0.]], &dev)?;
/// let targets = Tensor::new(&[1u32, 0], &dev)?;
/// let loss = nanogpt::fused::cross_entropy(&logits, &targets)?.to_scalar::<f32>()?;
/// let want = (2f32.ln() + (1.0 + (-2f32).exp()).ln()) / 2.0;
/// assert!((loss - want).abs() < 1e-6);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    logits.contiguous()?.apply_op1(CrossEntropy {
        targets,
        lse: Default::default(),
    })
}

/// The fused op: the targets live in the op (they take no gradient), and the forward pass
/// leaves each row's logsumexp for the backward pass.
struct CrossEntropy {
    targets: Vec<u32>,
    lse: std::sync::OnceLock<Vec<f32>>,
}

impl CrossEntropy {
    /// `(N, V)` of the logits, checked against the targets.
    fn check(&self, l: &Layout) -> Result<(usize, usize)> {
        let &[n, v] = l.dims() else {
            candle_core::bail!(
                "cross-entropy: expected logits (N, vocab), got {:?}",
                l.dims()
            );
        };
        if self.targets.len() != n || n == 0 || v == 0 {
            candle_core::bail!(
                "cross-entropy: {} targets for logits {:?} (one per row, at least one of each)",
                self.targets.len(),
                l.dims()
            );
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("cross-entropy: target {t} is outside the vocabulary of {v}");
        }
        Ok((n, v))
    }
}

/// `logsumexp(row)`, writing `exp(row - max)` into `exps` on the way.
#[multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn logsumexp(row: &[f32], exps: &mut [f32]) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for (e, &v) in exps.iter_mut().zip(row) {
        *e = super::exp::exp_neg(v - max);
    }
    max + exps.iter().sum::<f32>().ln()
}

/// `d = exp(row - lse) · scale`, the softmax of a row times the gradient's scale.
#[multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn softmax_rows(row: &[f32], lse: f32, scale: f32, d: &mut [MaybeUninit<f32>]) {
    for (slot, &x) in d.iter_mut().zip(row) {
        slot.write(super::exp::exp_neg(x - lse) * scale);
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "nanogpt-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "cross-entropy")?;
        let (n, v) = self.check(l)?;
        let mut exps = vec![0f32; v];
        let mut lse = Vec::with_capacity(n);
        let mut total = 0f64;
        for (row, &t) in x.chunks_exact(v).zip(&self.targets) {
            let l = logsumexp(row, &mut exps);
            lse.push(l);
            total += f64::from(l - row[t as usize]);
        }
        let _ = self.lse.set(lse);
        Ok((
            CpuStorage::F32(vec![(total / n as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(&self, logits: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let Some(lse) = self.lse.get() else {
            candle_core::bail!("cross-entropy backward: the forward pass did not run on the CPU");
        };
        let (n, v) = self.check(logits.layout())?;
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()? / n as f32;
        let d = with_data(&[logits], "cross-entropy backward", |x| {
            let x = x[0];
            let mut d = Unwritten::new(n * v);
            for (((drow, row), &l), &t) in d
                .slots()
                .chunks_exact_mut(v)
                .zip(x.chunks_exact(v))
                .zip(lse)
                .zip(&self.targets)
            {
                softmax_rows(row, l, scale, drow);
                // The target's element: (p - 1) · scale.
                let t = t as usize;
                drow[t].write((super::exp::exp_neg(row[t] - l) - 1.0) * scale);
            }
            // SAFETY: `check` made `x` `n` rows of `v` with one target each, so the loops
            // wrote all `n · v` elements.
            Ok(unsafe { d.assume_written() })
        })?;
        Ok(Some(Tensor::from_vec(d, (n, v), logits.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::rng::Rng;

    /// Loss and gradient agree with `candle_nn::loss::cross_entropy` and its autograd.
    #[test]
    fn matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(18, 0);
        let (n, v) = (37, 65);
        let logits = Var::from_vec(rng.normal_vec(n * v, 3.0), (n, v), &dev)?;
        let targets: Vec<u32> = (0..n).map(|i| (i * 11 % v) as u32).collect();
        let targets = Tensor::from_vec(targets, n, &dev)?;
        let run = |loss: Tensor| -> Result<(f32, Vec<f32>)> {
            let g = (&loss * 1.7)?.backward()?;
            let d = g.get(&logits).unwrap().flatten_all()?.to_vec1()?;
            Ok((loss.to_scalar()?, d))
        };
        let (loss, grad) = run(cross_entropy(&logits, &targets)?)?;
        let (want, want_grad) = run(candle_nn::loss::cross_entropy(&logits, &targets)?)?;
        assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");
        for (a, b) in grad.iter().zip(&want_grad) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        Ok(())
    }

    /// A target outside the vocabulary and a count that does not match are errors.
    #[test]
    fn bad_targets_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let e = cross_entropy(&logits, &Tensor::new(&[0u32, 3], &dev)?).unwrap_err();
        assert!(e.to_string().contains("target 3"), "{e}");
        let e = cross_entropy(&logits, &Tensor::new(&[0u32], &dev)?).unwrap_err();
        assert!(e.to_string().contains("1 targets"), "{e}");
        Ok(())
    }
}
