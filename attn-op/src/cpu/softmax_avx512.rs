//! The softmax rows of the tiled kernels written with AVX-512 intrinsics, for CPUs that have
//! AVX-512F (chosen at run time by [`super::simd`]). `e^x` here reduces its range with
//! `vrndscaleps` and rebuilds `2^n` with `vscalefps`: 11 vector operations per 16 lanes against 21
//! for the portable version (Cephes' `expf`), with about the same accuracy (2 ulp). At head dim
//! 32 the exponentials cost about half as much as the two products, so this matters.

use std::arch::x86_64::*;

use super::lanes;

const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// A degree-5 fit of `e^r` on `[-ln 2 / 2, ln 2 / 2]` with constant term exactly 1, so `e^0 = 1`
/// (relative error 9e-8 there; 1.8e-7 for the whole `e^y` in f32), highest degree first.
const POLY: [f32; 6] = [
    8.290_315e-3,
    4.189_793e-2,
    1.666_763_6e-1,
    4.999_915e-1,
    9.999_997e-1,
    1.0,
];

/// `e^y` on 16 lanes: 0 below -87, NaN stays NaN, `+inf` past `ln(f32::MAX)`. With `y = n·ln 2 + r`
/// (`n` rounded, `ln 2` split in two for an exact product), `e^y = 2^n · e^r`: eleven vector
/// operations, `vscalefps` building `2^n` and zeroing the lanes below -87 in one.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp16(y: __m512) -> __m512 {
    // Lanes at or above -87, and NaN lanes (unordered compares are true), keep their value.
    let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(y, _mm512_set1_ps(-87.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(y, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), y);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(POLY[0]);
    for c in &POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
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
    let (a, nb) = (_mm512_set1_ps(a), _mm512_set1_ps(-b));
    let mut sum = _mm512_setzero_ps();
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        // SAFETY: a chunk holds 16 elements.
        unsafe {
            let e = exp16(_mm512_fmadd_ps(a, _mm512_loadu_ps(c.as_ptr()), nb));
            _mm512_storeu_ps(c.as_mut_ptr(), e);
            sum = _mm512_add_ps(sum, e);
        }
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let k = lanes(tail.len());
        // SAFETY: the masked load and store touch only the tail's elements.
        unsafe {
            let e = exp16(_mm512_fmadd_ps(
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
    let rows = s.chunks_exact_mut(cols.max(1));
    let n = alpha.len().min(m.len()).min(l.len()).min(rows.len());
    let mut rows = rows.take(n);
    // Sixteen rows at a time, so that their rescalings e^(m_old - m_new) are one vector exp.
    for g0 in (0..n).step_by(16) {
        let g = (n - g0).min(16);
        let (mut expo, mut sums) = ([0f32; 16], [0f32; 16]);
        for i in 0..g {
            let Some(row) = rows.next() else { break };
            let m = &mut m[g0 + i];
            let m_new = m.max(mul * row_max(row));
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
        unsafe { _mm512_storeu_ps(a.as_mut_ptr(), exp16(_mm512_loadu_ps(expo.as_ptr()))) };
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

    /// `x = e^x` in place.
    #[target_feature(enable = "avx512f")]
    fn exp_in_place(x: &mut [f32]) {
        for c in x.chunks_mut(16) {
            let k = lanes(c.len());
            // SAFETY: the masked load and store touch only the chunk's `c.len()` elements.
            unsafe {
                let e = exp16(_mm512_maskz_loadu_ps(k, c.as_ptr()));
                _mm512_mask_storeu_ps(c.as_mut_ptr(), k, e);
            }
        }
    }

    #[test]
    fn exp16_matches_f64() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 87.9 {
            let xs: Vec<f32> = (0..16).map(|i| x + i as f32 * 1e-3).collect();
            let mut got = xs.clone();
            // SAFETY: the CPU has AVX-512F (checked above).
            unsafe { exp_in_place(&mut got) };
            for (g, x) in got.iter().zip(&xs) {
                let want = (*x as f64).exp();
                worst = worst.max(((*g as f64 - want) / want).abs());
            }
            x += 0.0137;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        let mut special = [
            f32::NEG_INFINITY,
            -1000.0,
            -87.5,
            f32::NAN,
            0.0,
            100.0,
            88.0,
        ];
        // SAFETY: as above.
        unsafe { exp_in_place(&mut special) };
        assert_eq!(&special[..3], &[0.0, 0.0, 0.0]);
        assert!(special[3].is_nan());
        assert_eq!(special[4], 1.0);
        assert_eq!(special[5], f32::INFINITY);
        assert!(special[6].is_finite() && special[6] > 1e38);
    }
}
