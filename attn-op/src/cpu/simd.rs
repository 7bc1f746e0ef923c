//! The element-wise row work of the tiled kernels, compiled for AVX-512 and AVX2 as well as the
//! baseline and picked at run time (`multiversion`).

use std::f32::consts::LN_2;

use multiversion::multiversion;
use multiversion::target::target_cfg_f;

const LANES: usize = 16;

/// `a·b + c`, fused when `fma` (a constant in each compiled version, so the branch folds away).
#[inline(always)]
fn madd(a: f32, b: f32, c: f32, fma: bool) -> f32 {
    if fma {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x` to about 2 ulp for `x` in `[-87, 88]`, 0 below, the same range reduction and polynomial
/// as Cephes' `expf`, written so that the compiler vectorises loops over it. `fma` says whether
/// the caller was compiled with fused multiply-add.
#[inline(always)]
pub(crate) fn exp(x: f32, fma: bool) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer in the low bits
    let xc = x.clamp(-87.0, 88.0);
    let t = madd(xc, LOG2E, ROUND, fma);
    let n = t - ROUND;
    let ni = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = madd(-n, LN2_LO, madd(-n, LN2_HI, xc, fma), fma);
    let mut p = 1.987_569_1e-4_f32;
    p = madd(p, r, 1.398_199_9e-3, fma);
    p = madd(p, r, 8.333_452e-3, fma);
    p = madd(p, r, 4.166_579_6e-2, fma);
    p = madd(p, r, 1.666_666_5e-1, fma);
    p = madd(p, r, 0.5, fma);
    let y = madd(p * r, r, r, fma) + 1.0;
    let res = y * f32::from_bits(((ni + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        res
    }
}

/// Reduces 16 lanes with `f` by halving, which the compiler turns into a few shuffles.
#[inline(always)]
fn reduce(mut acc: [f32; LANES], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] = f(acc[i], acc[i + width]);
        }
        width /= 2;
    }
    acc[0]
}

/// `max` as the `maxps` instruction computes it (no NaN special case; a NaN score reaches the
/// output through the exponentials anyway).
#[inline(always)]
fn fast_max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// Largest element (`-inf` for an empty row).
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn max(x: &[f32]) -> f32 {
    max_of(x)
}

/// [`max`], inlined into the caller's compiled version.
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = fast_max(*a, *v);
        }
    }
    tail.iter()
        .fold(reduce(acc, fast_max), |m, v| fast_max(m, *v))
}

/// `x *= a`.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn scale(x: &mut [f32], a: f32) {
    for v in x {
        *v *= a;
    }
}

/// `x = e^(a·x - b)`, returning the sum of the new values.
#[cfg(test)]
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn exp_affine_sum(x: &mut [f32], a: f32, b: f32) -> f32 {
    exp_affine_sum_of(x, a, b, target_cfg_f!(target_feature = "fma"))
}

/// The online-softmax step of a tile of score rows (AVX-512 intrinsics where the CPU has them,
/// else [`online_softmax_rows_portable`]), `cols` wide, whose keys a row may not see
/// are already `-inf`, with one multiplier `mul > 0` for every score, in base 2 (`mul`
/// includes `log₂ e` for natural units; a caller that folds it into the scores passes 1, which
/// saves a multiply per score). `row_max`, when given, holds each row's maximum (as
/// [`cap_bias_rows`] leaves it), which spares a pass over the scores. For row `i`, with
/// `m_new = max(m[i], mul·max(row))`: the row
/// becomes `2^(mul·row - m_new)`, `alpha[i] = 2^(m[i] - m_new)` (what the row's output so far
/// must be scaled by), `l[i] = l[i]·alpha[i] + Σ row` and `m[i] = m_new`. A row that sees no
/// key yet (`m_new = -inf`) becomes zeros and keeps its `m` and `l`. Where `m[i] = -inf`, the
/// row has seen no key before, so its output and `l[i]` are still 0 and any factor leaves them
/// so: `alpha[i] = 1` there, which [`scale_rows`] skips.
pub(crate) fn online_softmax_rows(
    s: &mut [f32],
    cols: usize,
    mul: f32,
    row_max: Option<&[f32]>,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if super::use_avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe {
            super::softmax_avx512::online_softmax_rows(s, cols, mul, row_max, m, l, alpha, None)
        };
    }
    online_softmax_rows_portable(s, cols, mul, row_max, m, l, alpha)
}

/// [`online_softmax_rows`] in portable code, vectorised by the compiler.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn online_softmax_rows_portable(
    s: &mut [f32],
    cols: usize,
    mul: f32,
    row_max: Option<&[f32]>,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
) {
    let fma = target_cfg_f!(target_feature = "fma");
    let rows = s.chunks_exact_mut(cols.max(1));
    for (i, (((row, m), l), alpha)) in rows.zip(m).zip(l).zip(alpha).enumerate() {
        let row_max = row_max.map_or_else(|| max_of(row), |r| r[i]);
        let m_new = m.max(mul * row_max);
        if m_new == f32::NEG_INFINITY {
            row.fill(0.0);
            *alpha = 1.0;
            continue;
        }
        *alpha = if *m == f32::NEG_INFINITY {
            1.0
        } else {
            ((*m - m_new) * LN_2).exp()
        };
        *l = *l * *alpha + exp_affine_sum_of(row, mul * LN_2, m_new * LN_2, fma);
        *m = m_new;
    }
}

/// `row = e^(mul·row - b[i])` for each row `i` of a tile `cols` wide (the probabilities of the
/// backward pass, `b` the rows' logsumexps).
pub(crate) fn exp_rows(s: &mut [f32], cols: usize, mul: f32, b: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::use_avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { super::softmax_avx512::exp_rows(s, cols, mul, b) };
    }
    exp_rows_portable(s, cols, mul, b)
}

/// [`exp_rows`] in portable code, vectorised by the compiler.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn exp_rows_portable(s: &mut [f32], cols: usize, mul: f32, b: &[f32]) {
    let fma = target_cfg_f!(target_feature = "fma");
    for (row, &b) in s.chunks_exact_mut(cols.max(1)).zip(b) {
        exp_affine_sum_of(row, mul, b, fma);
    }
}

/// `x *= a[i]` for each row `i` of `x` (`cols` wide) whose `a[i]` is not 1.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn scale_rows(x: &mut [f32], cols: usize, a: &[f32]) {
    for (row, &a) in x.chunks_exact_mut(cols.max(1)).zip(a) {
        if a != 1.0 {
            for v in row {
                *v *= a;
            }
        }
    }
}

/// [`exp_affine_sum`], inlined into the caller's compiled version.
#[inline(always)]
fn exp_affine_sum_of(x: &mut [f32], a: f32, b: f32, fma: bool) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (s, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = exp(madd(a, *v, -b, fma), fma);
            *s += *v;
        }
    }
    let mut sum = reduce(acc, |a, b| a + b);
    for v in chunks.into_remainder() {
        *v = exp(madd(a, *v, -b, fma), fma);
        sum += *v;
    }
    sum
}

/// Numerator and denominator of [`tanh`]'s rational function, polynomials in `x²`, highest
/// degree first.
pub(super) const TANH_P: [f32; 5] = [
    1.335_485_6e-8,
    2.060_923_7e-5,
    3.495_598_2e-3,
    1.338_103_4e-1,
    1.0,
];
pub(super) const TANH_Q: [f32; 5] = [
    7.776_642e-7,
    3.285_650_7e-4,
    2.587_702_1e-2,
    4.671_435e-1,
    1.0,
];
/// [`tanh`]'s argument is clamped to `[-TANH_CLAMP, TANH_CLAMP]`, beyond which `tanh` rounds to
/// ±1 in f32.
pub(super) const TANH_CLAMP: f32 = 9.0;

/// `tanh(x)` to 3 ulp (relative error 3.4e-7), written so that loops over it vectorise: the
/// rational function `x·p(x²) / q(x²)` ([`TANH_P`], [`TANH_Q`]: degrees 9 and 8, fitted to
/// `tanh` on `[0, 9]` by iteratively reweighted least squares in float64) with `x` clamped to
/// `[-9, 9]`. Ten multiplications and multiply-adds and one division, no exponential.
#[inline(always)]
pub(crate) fn tanh(x: f32, fma: bool) -> f32 {
    let x = x.clamp(-TANH_CLAMP, TANH_CLAMP);
    let z = x * x;
    let mut p = TANH_P[0];
    for c in &TANH_P[1..] {
        p = madd(p, z, *c, fma);
    }
    let mut q = TANH_Q[0];
    for c in &TANH_Q[1..] {
        q = madd(q, z, *c, fma);
    }
    x * p / q
}

/// Logit soft-capping of a tile of rows `cols` wide whose scores arrive divided by the cap (the
/// products apply `scale / cap`, [`super::forward::product_scale`]): `x[i][j] = cap·tanh(x[i][j])`,
/// then the ALiBi bias `-slope·|diag0 + i - j|` when `alibi = Some((slope, diag0))`; stores
/// `tanh(x[i][j])` in `t` (as long as `x`) when given (the backward's factor).
pub(crate) fn softcap_rows(
    x: &mut [f32],
    cols: usize,
    cap: f32,
    t: Option<&mut [f32]>,
    alibi: Option<(f32, f32)>,
) {
    #[cfg(target_arch = "x86_64")]
    if super::use_avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { super::scores_avx512::softcap_rows(x, cols, cap, t, alibi) };
    }
    softcap_rows_portable(x, cols, cap, t, alibi)
}

/// [`softcap_rows`] in portable code, vectorised by the compiler.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn softcap_rows_portable(
    x: &mut [f32],
    cols: usize,
    cap: f32,
    mut t: Option<&mut [f32]>,
    alibi: Option<(f32, f32)>,
) {
    let fma = target_cfg_f!(target_feature = "fma");
    let (slope, diag0) = alibi.unwrap_or((0.0, 0.0));
    for (i, x) in x.chunks_exact_mut(cols.max(1)).enumerate() {
        let diag = diag0 + i as f32;
        let bias = |j: usize| -slope * (diag - j as f32).abs();
        match t.as_deref_mut() {
            Some(t) => {
                let t = &mut t[i * cols..(i + 1) * cols];
                for (j, (v, t)) in x.iter_mut().zip(t).enumerate() {
                    *t = tanh(*v, fma);
                    *v = madd(cap, *t, bias(j), fma);
                }
            }
            None => {
                for (j, v) in x.iter_mut().enumerate() {
                    *v = madd(cap, tanh(*v, fma), bias(j), fma);
                }
            }
        }
    }
}

/// The forward's transform of a tile of rows `cols` wide, in one pass that also applies each
/// row's band and finds its maximum (so that [`online_softmax_rows`] skips its own): with
/// `cap = Some(c)`, `x[i][j] = c·tanh(x[i][j])` (the products apply `scale / cap`); then, with
/// `alibi = Some((slope, diag0))`, the bias `-slope·|diag0 + i - j|`. `band(i)` gives row `i`'s
/// keys `[first, end)` among the tile's columns (clipped to them): the rest become `-inf`, and
/// `row_max[i]` receives the largest score of the band (`-inf` when it is empty). The caller
/// folds `log₂ e` into `c`, `slope` and the products for the base-2 softmax.
pub(crate) fn cap_bias_rows(
    x: &mut [f32],
    cols: usize,
    cap: Option<f32>,
    alibi: Option<(f32, f32)>,
    band: impl Fn(usize) -> (usize, usize),
    row_max: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if super::use_avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { super::scores_avx512::cap_bias_rows(x, cols, cap, alibi, band, row_max) };
    }
    cap_bias_rows_portable(x, cols, cap, alibi, band, row_max)
}

/// [`cap_bias_rows`] in portable code: [`softcap_rows_portable`] or [`alibi_rows_portable`],
/// then the band and the maxima.
pub(crate) fn cap_bias_rows_portable(
    x: &mut [f32],
    cols: usize,
    cap: Option<f32>,
    alibi: Option<(f32, f32)>,
    band: impl Fn(usize) -> (usize, usize),
    row_max: &mut [f32],
) {
    match (cap, alibi) {
        (Some(c), _) => softcap_rows_portable(x, cols, c, None, alibi),
        (None, Some((slope, diag0))) => alibi_rows_portable(x, cols, 1.0, slope, diag0),
        (None, None) => {}
    }
    for (i, (row, m)) in x.chunks_exact_mut(cols.max(1)).zip(row_max).enumerate() {
        let (first, end) = band(i);
        let first = first.min(row.len());
        let end = end.clamp(first, row.len());
        row[..first].fill(f32::NEG_INFINITY);
        row[end..].fill(f32::NEG_INFINITY);
        *m = max(&row[first..end]);
    }
}

/// A tile of rows `cols` wide scaled by `a` with the ALiBi bias:
/// `x[i][j] = a·x[i][j] - slope·|diag0 + i - j|`.
pub(crate) fn alibi_rows(x: &mut [f32], cols: usize, a: f32, slope: f32, diag0: f32) {
    #[cfg(target_arch = "x86_64")]
    if super::use_avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { super::scores_avx512::alibi_rows(x, cols, a, slope, diag0) };
    }
    alibi_rows_portable(x, cols, a, slope, diag0)
}

/// [`alibi_rows`] in portable code, vectorised by the compiler.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn alibi_rows_portable(x: &mut [f32], cols: usize, a: f32, slope: f32, diag0: f32) {
    let fma = target_cfg_f!(target_feature = "fma");
    for (i, row) in x.chunks_exact_mut(cols.max(1)).enumerate() {
        let diag = diag0 + i as f32;
        for (j, v) in row.iter_mut().enumerate() {
            *v = madd(a, *v, -slope * (diag - j as f32).abs(), fma);
        }
    }
}

/// `g *= 1 - t²` element-wise: the gradient through `tanh` given its values `t`.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn tanh_grad(g: &mut [f32], t: &[f32]) {
    for (g, t) in g.iter_mut().zip(t) {
        *g *= 1.0 - t * t;
    }
}

/// `x *= y` element-wise.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn mul(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a *= *b;
    }
}

/// `dp = p * (dp - d[i])` for each row `i` of a tile `cols` wide: the softmax backward.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn softmax_bwd_rows(p: &[f32], dp: &mut [f32], cols: usize, d: &[f32]) {
    let rows = dp
        .chunks_exact_mut(cols.max(1))
        .zip(p.chunks_exact(cols.max(1)));
    for ((dp, p), &d) in rows.zip(d) {
        for (g, pv) in dp.iter_mut().zip(p) {
            *g = pv * (*g - d);
        }
    }
}

/// Dot product.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn dot(x: &[f32], y: &[f32]) -> f32 {
    dot_of(x, y, |v| *v)
}

/// Dot product of `x` with `y` widened to f32 by `wide`, inlined into the caller's compiled
/// version.
#[inline(always)]
fn dot_of<T>(x: &[f32], y: &[T], wide: impl Fn(&T) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let cx = x.chunks_exact(LANES);
    let cy = y.chunks_exact(LANES);
    let tail: f32 = cx
        .remainder()
        .iter()
        .zip(cy.remainder())
        .map(|(a, b)| a * wide(b))
        .sum();
    for (a, b) in cx.zip(cy) {
        for l in 0..LANES {
            acc[l] += a[l] * wide(&b[l]);
        }
    }
    reduce(acc, |a, b| a + b) + tail
}

/// bf16 to f32, exactly: the bf16 bits are the f32's high half.
#[inline(always)]
fn widen_bf16(b: half::bf16) -> f32 {
    f32::from_bits(u32::from(b.to_bits()) << 16)
}

/// Dot product of f32 `x` with bf16 `y` (each bf16 widened exactly as it is read).
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn dot_bf16(x: &[f32], y: &[half::bf16]) -> f32 {
    dot_of(x, y, |b| widen_bf16(*b))
}

/// `y += a·x` for bf16 `x`.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn axpy_bf16(a: f32, x: &[half::bf16], y: &mut [f32]) {
    let fma = target_cfg_f!(target_feature = "fma");
    for (y, x) in y.iter_mut().zip(x) {
        *y = madd(a, widen_bf16(*x), *y, fma);
    }
}

/// `y += x`.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn add(y: &mut [f32], x: &[f32]) {
    for (a, b) in y.iter_mut().zip(x) {
        *a += *b;
    }
}

/// bf16 to f32 (exact: the bf16 bits are the f32's high half).
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn bf16_to_f32(src: &[half::bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = widen_bf16(*s);
    }
}

/// f32 to bf16, rounding to nearest even (NaN stays NaN), as `half::bf16::from_f32`.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn f32_to_bf16(src: &[f32], dst: &mut [half::bf16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        let x = s.to_bits();
        let rounded = (x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16) as u16;
        let nan = ((x >> 16) as u16) | 0x0040;
        *d = half::bf16::from_bits(if s.is_nan() { nan } else { rounded });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_handles_extremes() {
        for fma in [false, true] {
            let mut worst = 0f64;
            let mut x = -87.0f32;
            while x < 88.0 {
                let got = exp(x, fma) as f64;
                let want = (x as f64).exp();
                worst = worst.max(((got - want) / want).abs());
                x += 0.013;
            }
            assert!(worst < 5e-7, "relative error {worst}");
            assert_eq!(exp(f32::NEG_INFINITY, fma), 0.0);
            assert_eq!(exp(-1000.0, fma), 0.0);
            assert!(exp(f32::NAN, fma).is_nan());
            assert_eq!(exp(0.0, fma), 1.0);
        }
    }

    /// The online softmax in base 2 against float64, through the dispatched kernel and the
    /// portable one: 21 rows (a full group of 16 and a partial one) 37 wide (a masked tail),
    /// multipliers 1 (the subtracting path) and not, rows that have seen no key, rows whose
    /// scores are all `-inf`, and a row whose maximum rises.
    #[test]
    fn online_softmax_rows_match_f64() {
        type Kernel =
            fn(&mut [f32], usize, f32, Option<&[f32]>, &mut [f32], &mut [f32], &mut [f32]);
        let kernels: [(&str, Kernel); 2] = [
            ("dispatched", online_softmax_rows),
            ("portable", online_softmax_rows_portable),
        ];
        let (rows, cols) = (21, 37);
        for ((name, kernel), known) in kernels.into_iter().flat_map(|k| [(k, false), (k, true)]) {
            for mul in [1.0f32, 0.37] {
                let mut x: Vec<f32> = (0..rows * cols)
                    .map(|i| (i * 7919 % 1000) as f32 / 50.0 - 10.0)
                    .collect();
                x[3 * cols..4 * cols].fill(f32::NEG_INFINITY);
                x[5 * cols + 2] = f32::NEG_INFINITY;
                let m0: Vec<f32> = (0..rows)
                    .map(|r| match r % 3 {
                        0 => f32::NEG_INFINITY,
                        1 => 2.5,
                        _ => -30.0,
                    })
                    .collect();
                // (No key seen yet: l = 0.)
                let l0: Vec<f32> = (0..rows)
                    .map(|r| if r % 3 == 0 { 0.0 } else { r as f32 * 0.5 })
                    .collect();
                let (mut s, mut m, mut l) = (x.clone(), m0.clone(), l0.clone());
                let mut alpha = vec![f32::NAN; rows];
                // Maxima given (as `cap_bias_rows` leaves them) or found by the kernel.
                let maxima: Vec<f32> = x
                    .chunks_exact(cols)
                    .map(|r| r.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)))
                    .collect();
                let known = known.then_some(&maxima[..]);
                kernel(&mut s, cols, mul, known, &mut m, &mut l, &mut alpha);
                for r in 0..rows {
                    let row = &x[r * cols..(r + 1) * cols];
                    let mx = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
                    let m_new = (m0[r] as f64).max(mul as f64 * mx);
                    if m_new == f64::NEG_INFINITY {
                        assert!(s[r * cols..(r + 1) * cols].iter().all(|&v| v == 0.0));
                        assert_eq!(
                            (m[r], l[r], alpha[r]),
                            (m0[r], l0[r], 1.0),
                            "{name} row {r}"
                        );
                        continue;
                    }
                    let want_alpha = if m0[r] == f32::NEG_INFINITY {
                        1.0
                    } else {
                        (m0[r] as f64 - m_new).exp2()
                    };
                    // The exponent's rounding to f32 bounds the error: |t|·2⁻²⁴ of ln 2.
                    // (`2^-inf` must be exactly 0.)
                    let close = |got: f32, want: f64, t: f64| {
                        if t == f64::NEG_INFINITY {
                            got == 0.0
                        } else {
                            (got as f64 - want).abs() <= (1e-6 + t.abs() * 6e-8) * want
                        }
                    };
                    let mut sum = 0f64;
                    for (c, &v) in row.iter().enumerate() {
                        let t = mul as f64 * v as f64 - m_new;
                        let want = t.exp2();
                        sum += want;
                        assert!(close(s[r * cols + c], want, t), "{name} {mul} ({r}, {c})");
                    }
                    let want_l = l0[r] as f64 * want_alpha + sum;
                    let t = want_alpha.log2();
                    assert!(close(alpha[r], want_alpha, t), "{name} alpha {r}");
                    assert!(
                        (l[r] as f64 - want_l).abs() <= 1e-6 * want_l,
                        "{name} l {r}"
                    );
                    assert_eq!(m[r] as f64, m_new as f32 as f64, "{name} m {r}");
                }
            }
        }
    }

    #[test]
    fn tanh_is_accurate_everywhere() {
        for fma in [false, true] {
            let mut worst = 0f64;
            let mut x = -20.0f32;
            while x < 20.0 {
                for x in [x, x * 1e-3, x * 1e-6] {
                    let (got, want) = (tanh(x, fma) as f64, (x as f64).tanh());
                    worst = worst.max((got - want).abs() / want.abs().max(1e-30));
                }
                x += 0.0071;
            }
            assert!(worst < 1e-6, "relative error {worst}");
            assert_eq!(tanh(0.0, fma), 0.0);
            assert!((1.0 - tanh(f32::INFINITY, fma)).abs() < 2e-7);
            assert!((1.0 + tanh(-200.0, fma)).abs() < 2e-7);
            assert!(tanh(f32::NAN, fma).is_nan());
        }
        // The soft cap and its gradient factor.
        // Scores arrive divided by the cap: 0.1·v below.
        let mut x = vec![-10.0f32, -0.1, 0.0, 0.05, 0.3];
        let mut t = vec![0f32; 5];
        softcap_rows(&mut x, 5, 10.0, Some(&mut t), None);
        for (i, v) in [-100.0f64, -1.0, 0.0, 0.5, 3.0].into_iter().enumerate() {
            assert!((x[i] as f64 - 10.0 * (0.1 * v).tanh()).abs() < 1e-5);
            assert!((t[i] as f64 - (0.1 * v).tanh()).abs() < 1e-7);
        }
        let mut g = vec![2.0f32; 5];
        tanh_grad(&mut g, &t);
        assert!((g[4] as f64 - 2.0 * (1.0 - (0.3f64).tanh().powi(2))).abs() < 1e-6);
    }

    /// Every implementation of [`softcap_rows`] this CPU has, by name.
    fn softcap_impls() -> Vec<(&'static str, SoftcapRows)> {
        let mut impls: Vec<(&str, SoftcapRows)> = vec![("portable", softcap_rows_portable)];
        #[cfg(target_arch = "x86_64")]
        if super::super::use_avx512() {
            // SAFETY: the CPU has AVX-512F (checked above).
            impls.push(("avx512", |x, c, cap, t, b| unsafe {
                crate::cpu::scores_avx512::softcap_rows(x, c, cap, t, b)
            }));
        }
        impls
    }

    type SoftcapRows = fn(&mut [f32], usize, f32, Option<&mut [f32]>, Option<(f32, f32)>);

    /// Every soft cap implementation's `tanh` over the whole range (its argument past ±20,
    /// where it rounds to ±1, tiny arguments, ±0, ±inf) to an absolute 4e-7 against float64.
    #[test]
    fn softcap_tanh_everywhere() {
        let mut x0: Vec<f32> = (0..3650).map(|i| -25.0 + i as f32 * 0.0137).collect();
        x0.extend([
            1e-7,
            -3e-5,
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
        ]);
        for (name, f) in softcap_impls() {
            let (mut x, mut t) = (x0.clone(), vec![f32::NAN; x0.len()]);
            f(&mut x, x0.len(), 2.0, Some(&mut t), None);
            for ((&got_t, &got_x), &x0) in t.iter().zip(&x).zip(&x0) {
                let want = (x0 as f64).tanh();
                assert!(
                    (got_t as f64 - want).abs() < 4e-7,
                    "{name} tanh({x0}) = {got_t}"
                );
                assert!(
                    (got_x as f64 - 2.0 * want).abs() < 8e-7,
                    "{name} 2·tanh({x0})"
                );
                assert_eq!(
                    got_t.is_sign_negative(),
                    x0.is_sign_negative(),
                    "{name} sign"
                );
            }
        }
    }

    #[test]
    fn softcap_rows_match_f64() {
        // Row widths around the 16 lanes (tails of every kind), with and without the bias and
        // the stored tanh, against float64.
        for (name, f) in softcap_impls() {
            for cols in [1, 5, 16, 17, 37, 64] {
                let rows = 3;
                // Scores as they arrive, divided by the cap: up to ±4 here.
                let x0: Vec<f32> = (0..rows * cols)
                    .map(|i| ((i as f32 * 0.618).fract() - 0.5) * 8.0)
                    .collect();
                for alibi in [None, Some((0.25f32, 7.0f32))] {
                    for with_t in [false, true] {
                        let (mut x, mut t) = (x0.clone(), vec![f32::NAN; x0.len()]);
                        f(&mut x, cols, 30.0, with_t.then_some(&mut t), alibi);
                        for (k, (&got, &x0)) in x.iter().zip(&x0).enumerate() {
                            let (i, j) = (k / cols, k % cols);
                            let th = (x0 as f64).tanh();
                            let bias = alibi.map_or(0.0, |(s, d)| {
                                -(s as f64) * (d as f64 + i as f64 - j as f64).abs()
                            });
                            let want = 30.0 * th + bias;
                            let err = (got as f64 - want).abs();
                            assert!(err < 2e-5 * want.abs().max(1.0), "{name} {cols} {k}: {err}");
                            if with_t {
                                assert!((t[k] as f64 - th).abs() < 4e-7, "{name} tanh {k}");
                            }
                        }
                        assert!(with_t || t.iter().all(|t| t.is_nan()), "{name} wrote t");
                    }
                }
            }
            let mut x = [f32::NAN, 1.0];
            f(&mut x, 2, 5.0, None, None);
            assert!(
                x[0].is_nan() && (x[1] - 5.0 * 1f32.tanh()).abs() < 1e-6,
                "{name} NaN"
            );
        }
    }

    /// The forward's one pass (cap, bias, band, maxima) against float64, dispatched and
    /// portable: groups of 16 rows and a partial one, widths around the 16 lanes and past the
    /// bias table's 256 columns, bands that start and end anywhere (empty ones too), with and
    /// without the cap and the bias.
    #[test]
    fn cap_bias_rows_match_f64() {
        type CapBias = fn(&mut [f32], usize, Option<f32>, Option<(f32, f32)>, &mut [f32]);
        let mut impls: Vec<(&str, CapBias)> = vec![("portable", |x, c, cap, b, m| {
            cap_bias_rows_portable(x, c, cap, b, band_of(c), m)
        })];
        #[cfg(target_arch = "x86_64")]
        if super::super::use_avx512() {
            // SAFETY: the CPU has AVX-512F (checked above).
            impls.push(("avx512", |x, c, cap, b, m| unsafe {
                crate::cpu::scores_avx512::cap_bias_rows(x, c, cap, b, band_of(c), m)
            }));
        }
        // Rows' bands drawn from their index (a `fn`, so that the kernels' `fn`s can call it).
        fn band_of(cols: usize) -> impl Fn(usize) -> (usize, usize) {
            move |i: usize| match i % 4 {
                0 => (0, cols),
                1 => (i % 7, cols.saturating_sub(i % 5)),
                2 => (cols / 2, cols / 2),
                _ => (i, i + 23),
            }
        }
        for (name, f) in impls {
            for (rows, cols) in [(21, 37), (3, 1), (17, 16), (5, 300), (36, 128)] {
                let x0: Vec<f32> = (0..rows * cols)
                    .map(|i| ((i as f32 * 0.618).fract() - 0.5) * 8.0)
                    .collect();
                for cap in [None, Some(30.0f32)] {
                    for alibi in [None, Some((0.25f32, 7.0f32))] {
                        let (mut x, mut m) = (x0.clone(), vec![f32::NAN; rows]);
                        f(&mut x, cols, cap, alibi, &mut m);
                        for i in 0..rows {
                            let (first, end) = band_of(cols)(i);
                            let (first, end) = (first.min(cols), end.clamp(first.min(cols), cols));
                            let mut want_max = f64::NEG_INFINITY;
                            for j in 0..cols {
                                let got = x[i * cols + j];
                                if j < first || j >= end {
                                    assert_eq!(got, f32::NEG_INFINITY, "{name} ({i}, {j}) band");
                                    continue;
                                }
                                let v = x0[i * cols + j] as f64;
                                let bias = alibi.map_or(0.0, |(s, d)| {
                                    -(s as f64) * (d as f64 + i as f64 - j as f64).abs()
                                });
                                let want = cap.map_or(v, |c| c as f64 * v.tanh()) + bias;
                                want_max = want_max.max(want);
                                let err = (got as f64 - want).abs();
                                assert!(err < 2e-5 * want.abs().max(1.0), "{name} ({i}, {j})");
                            }
                            let err = (m[i] as f64 - want_max).abs();
                            assert!(
                                err < 2e-5 * want_max.abs().max(1.0) || m[i] as f64 == want_max,
                                "{name} {rows}x{cols} max of row {i}: {} vs {want_max}",
                                m[i]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn alibi_rows_match_f64() {
        type AlibiRows = fn(&mut [f32], usize, f32, f32, f32);
        let mut impls: Vec<(&str, AlibiRows)> = vec![("portable", alibi_rows_portable)];
        #[cfg(target_arch = "x86_64")]
        if super::super::use_avx512() {
            // SAFETY: the CPU has AVX-512F (checked above).
            impls.push(("avx512", |x, c, a, s, d| unsafe {
                crate::cpu::scores_avx512::alibi_rows(x, c, a, s, d)
            }));
        }
        for (name, f) in impls {
            for cols in [1, 5, 16, 17, 37, 64] {
                let x0: Vec<f32> = (0..3 * cols).map(|i| (i as f32 * 0.37).sin()).collect();
                let mut x = x0.clone();
                f(&mut x, cols, 0.5, 0.25, 20.0);
                for (k, (&got, &x0)) in x.iter().zip(&x0).enumerate() {
                    let (i, j) = ((k / cols) as f64, (k % cols) as f64);
                    let want = 0.5 * x0 as f64 - 0.25 * (20.0 + i - j).abs();
                    assert!((got as f64 - want).abs() < 1e-5, "{name} {cols} {k}");
                }
            }
        }
    }

    #[test]
    fn bf16_conversions_match_half() {
        let xs: Vec<f32> = (0..2000)
            .map(|i| (i as f32 * 0.731).sin() * 10f32.powi(i % 9 - 4))
            .chain([
                f32::from_bits(u32::MAX),
                0.0,
                -0.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MAX,
                1.0039062,
                1.0117188,
            ])
            .collect();
        let mut b = vec![half::bf16::ZERO; xs.len()];
        f32_to_bf16(&xs, &mut b);
        for (x, y) in xs.iter().zip(&b) {
            assert_eq!(y.to_bits(), half::bf16::from_f32(*x).to_bits(), "{x}");
        }
        let mut back = vec![0f32; b.len()];
        bf16_to_f32(&b, &mut back);
        for (y, z) in b.iter().zip(&back) {
            assert_eq!(y.to_f32().to_bits(), z.to_bits());
        }
        let mut n = [half::bf16::ZERO];
        f32_to_bf16(&[f32::NAN], &mut n);
        assert!(n[0].is_nan());
    }

    #[test]
    fn row_helpers() {
        let mut x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let m = max(&x);
        assert_eq!(m, x.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let want: f32 = x.iter().map(|v| (v - m).exp()).sum();
        let s = exp_affine_sum(&mut x, 1.0, m);
        assert!((s - want).abs() < 1e-5 * want);
        let y: Vec<f32> = (0..37).map(|i| i as f32).collect();
        let d: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert!((dot(&x, &y) - d).abs() < 1e-4 * d.abs());
    }
}
