//! The softmax rows of the tiled kernels written with AVX-512 intrinsics, for CPUs that have
//! AVX-512F (chosen at run time by [`super::simd`]). Exponentials are taken in base 2:
//! `e^(a·x - b) = 2^t` with `t = x·(a·log₂e) - b·log₂e` formed by one multiply-add, `t` split
//! into its nearest integer `n` (`vrndscaleps`) and `f = t - n` (exact), `2^f` by a polynomial and
//! `2^n` rebuilt by `vscalefps`: seven multiply-class operations per 16 lanes. The products and
//! these compete for the same FMA pipes, and at head dim 32 the exponentials cost about a
//! fifth as much as the two products, so each one counts (base e took ten: the scale, the range
//! reduction's product and its two-part `ln 2` correction).

use std::arch::x86_64::*;

use std::f32::consts::LOG2_E;

use super::lanes;

/// A degree-5 fit of `2^f` on `[-1/2, 1/2]` with constant term exactly 1, so `2^0 = 1`, highest
/// degree first (relative error 1.1e-7): the fit of `e^r` on `[-ln 2 / 2, ln 2 / 2]` used before,
/// its coefficient of degree `k` times `(ln 2)^k`.
const POLY: [f32; 6] = [
    1.326_472_7e-3,
    9.671_513e-3,
    5.550_733_6e-2,
    2.402_224_2e-1,
    6.931_469_4e-1,
    1.0,
];

/// `2^t` on 16 lanes: 0 below -126 (where results would be subnormal), NaN stays NaN, `+inf` past
/// 128. `2^t = 2^n · 2^f` with `n` the nearest integer and `f = t - n` in `[-1/2, 1/2]`,
/// `vscalefps` building `2^n` and zeroing the lanes below -126 in one.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp2_16(t: __m512) -> __m512 {
    // Lanes at or above -126, and NaN lanes (unordered compares are true), keep their value.
    let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(t, _mm512_set1_ps(-126.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let f = _mm512_sub_ps(t, n);
    let mut p = _mm512_set1_ps(POLY[0]);
    for c in &POLY[1..] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
    }
    _mm512_maskz_scalef_ps(keep, p, n)
}

/// Largest element of `x` (`-inf` when empty).
#[inline]
#[target_feature(enable = "avx512f")]
fn row_max(x: &[f32]) -> f32 {
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut acc = ninf;
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        // SAFETY: a chunk holds 16 elements.
        acc = _mm512_max_ps(acc, unsafe { _mm512_loadu_ps(c.as_ptr()) });
    }
    // SAFETY: the masked load reads only the tail's elements.
    let t = unsafe { _mm512_mask_loadu_ps(ninf, lanes(tail.len()), tail.as_ptr()) };
    _mm512_reduce_max_ps(_mm512_max_ps(acc, t))
}

/// `x = e^(a·x - b)`, returning the sum of the new values.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp_affine_sum(x: &mut [f32], a: f32, b: f32) -> f32 {
    let (a, nb) = (_mm512_set1_ps(a * LOG2_E), _mm512_set1_ps(-b * LOG2_E));
    let mut sum = _mm512_setzero_ps();
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        // SAFETY: a chunk holds 16 elements.
        unsafe {
            let e = exp2_16(_mm512_fmadd_ps(a, _mm512_loadu_ps(c.as_ptr()), nb));
            _mm512_storeu_ps(c.as_mut_ptr(), e);
            sum = _mm512_add_ps(sum, e);
        }
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let k = lanes(tail.len());
        // SAFETY: the masked load and store touch only the tail's elements.
        unsafe {
            let e = exp2_16(_mm512_fmadd_ps(
                a,
                _mm512_maskz_loadu_ps(k, tail.as_ptr()),
                nb,
            ));
            _mm512_mask_storeu_ps(tail.as_mut_ptr(), k, e);
            sum = _mm512_mask_add_ps(sum, k, sum, e);
        }
    }
    _mm512_reduce_add_ps(sum)
}

/// [`super::simd::online_softmax_rows`] (same contract).
#[target_feature(enable = "avx512f")]
pub(super) fn online_softmax_rows(
    s: &mut [f32],
    cols: usize,
    mul: f32,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
) {
    let cols = cols.max(1);
    let n = alpha.len().min(m.len()).min(l.len()).min(s.len() / cols);
    // Sixteen rows at a time, so that their rescalings e^(m_old - m_new) are one vector exp.
    for (g0, group) in (0..n).step_by(16).zip(s.chunks_mut(16 * cols)) {
        let g = (n - g0).min(16);
        let (mut expo, mut sums, mut maxes) = ([0f32; 16], [0f32; 16], [0f32; 16]);
        // Every row's maximum first: their reductions are independent, so they overlap, where
        // each row's exponentials would otherwise wait for its own.
        for (mx, row) in maxes.iter_mut().zip(group.chunks_exact(cols)).take(g) {
            *mx = row_max(row);
        }
        for (i, row) in group.chunks_exact_mut(cols).take(g).enumerate() {
            let m = &mut m[g0 + i];
            let m_new = m.max(mul * maxes[i]);
            if m_new == f32::NEG_INFINITY {
                // No key seen yet: zeros, and m, l unchanged (e^0 = 1, sum 0).
                row.fill(0.0);
                continue;
            }
            expo[i] = *m - m_new;
            sums[i] = exp_affine_sum(row, mul, m_new);
            *m = m_new;
        }
        let mut a = [0f32; 16];
        // SAFETY: 16-element arrays, full-width loads and stores.
        unsafe {
            let t = _mm512_mul_ps(_mm512_loadu_ps(expo.as_ptr()), _mm512_set1_ps(LOG2_E));
            _mm512_storeu_ps(a.as_mut_ptr(), exp2_16(t));
        }
        for i in 0..g {
            alpha[g0 + i] = a[i];
            l[g0 + i] = l[g0 + i] * a[i] + sums[i];
        }
    }
}

/// [`super::simd::exp_rows`] (same contract).
#[target_feature(enable = "avx512f")]
pub(super) fn exp_rows(s: &mut [f32], cols: usize, mul: f32, b: &[f32]) {
    for (row, &b) in s.chunks_exact_mut(cols.max(1)).zip(b) {
        exp_affine_sum(row, mul, b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x = 2^x` in place.
    #[target_feature(enable = "avx512f")]
    fn exp2_in_place(x: &mut [f32]) {
        for c in x.chunks_mut(16) {
            let k = lanes(c.len());
            // SAFETY: the masked load and store touch only the chunk's `c.len()` elements.
            unsafe {
                let e = exp2_16(_mm512_maskz_loadu_ps(k, c.as_ptr()));
                _mm512_mask_storeu_ps(c.as_mut_ptr(), k, e);
            }
        }
    }

    #[test]
    fn exp2_16_matches_f64() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut worst = 0f64;
        let mut t = -126.0f32;
        while t < 127.9 {
            let ts: Vec<f32> = (0..16).map(|i| t + i as f32 * 1e-3).collect();
            let mut got = ts.clone();
            // SAFETY: the CPU has AVX-512F (checked above).
            unsafe { exp2_in_place(&mut got) };
            for (g, t) in got.iter().zip(&ts) {
                let want = (*t as f64).exp2();
                worst = worst.max(((*g as f64 - want) / want).abs());
            }
            t += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        let mut special = [
            f32::NEG_INFINITY,
            -1000.0,
            -126.5,
            f32::NAN,
            0.0,
            200.0,
            127.5,
        ];
        // SAFETY: as above.
        unsafe { exp2_in_place(&mut special) };
        assert_eq!(&special[..3], &[0.0, 0.0, 0.0]);
        assert!(special[3].is_nan());
        assert_eq!(special[4], 1.0);
        assert_eq!(special[5], f32::INFINITY);
        assert!(special[6].is_finite() && special[6] > 1e38);
    }

    /// `e^(a·x - b)` and the row's sum against f64, over the range of scaled scores a softmax
    /// row meets (the argument's rounding in f32 bounds the error: ~|t|·2⁻²⁴).
    #[test]
    fn exp_affine_sum_matches_f64() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let (a, b) = (0.125f32, 12.0f32);
        let xs: Vec<f32> = (0..1001).map(|i| -100.0 + i as f32 * 0.2003).collect();
        let mut got = xs.clone();
        // SAFETY: the CPU has AVX-512F (checked above).
        let sum = unsafe { exp_affine_sum(&mut got, a, b) };
        let mut want_sum = 0f64;
        for (g, x) in got.iter().zip(&xs) {
            let want = (a as f64 * *x as f64 - b as f64).exp();
            want_sum += want;
            assert!(
                ((*g as f64 - want) / want).abs() < 2e-6,
                "e^({a}·{x} - {b})"
            );
        }
        assert!(((sum as f64 - want_sum) / want_sum).abs() < 2e-6);
    }
}
