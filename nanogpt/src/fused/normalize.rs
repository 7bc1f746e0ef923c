//! LayerNorm's normalisation `x̂ = (x - mean) / sqrt(var + eps)` and its backward, row by
//! row, for the fused ops that fold LayerNorm's weight into the next product (the attention's
//! `c_attn`, the MLP's `c_fc`, the lm_head). Tested through those ops against the plain
//! [`crate::model::LayerNorm`].

use std::mem::MaybeUninit;

use multiversion::multiversion;
use rayon::prelude::*;

/// PyTorch's default epsilon, as the plain LayerNorm's.
const EPS: f32 = 1e-5;

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
    (mean, 1.0 / (var + EPS).sqrt())
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
