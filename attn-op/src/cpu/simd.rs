//! The element-wise row work of the tiled kernels, compiled for AVX-512 and AVX2 as well as the
//! baseline and picked at run time (`multiversion`).

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
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn exp_affine_sum(x: &mut [f32], a: f32, b: f32) -> f32 {
    let fma = target_cfg_f!(target_feature = "fma");
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

/// `x *= y` element-wise.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn mul(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a *= *b;
    }
}

/// `dp = p * (dp - d)`: the softmax backward of one row.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn softmax_bwd(p: &[f32], dp: &mut [f32], d: f32) {
    for (g, pv) in dp.iter_mut().zip(p) {
        *g = pv * (*g - d);
    }
}

/// Dot product.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let cx = x.chunks_exact(LANES);
    let cy = y.chunks_exact(LANES);
    let tail: f32 = cx
        .remainder()
        .iter()
        .zip(cy.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in cx.zip(cy) {
        for l in 0..LANES {
            acc[l] += a[l] * b[l];
        }
    }
    reduce(acc, |a, b| a + b) + tail
}

/// `y += x`.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn add(y: &mut [f32], x: &[f32]) {
    for (a, b) in y.iter_mut().zip(x) {
        *a += *b;
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
