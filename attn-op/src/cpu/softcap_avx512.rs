//! The soft cap's `tanh` written with AVX-512 intrinsics, for CPUs that have AVX-512F (chosen at
//! run time by [`super::simd::softcap`]). Same rational function as [`super::simd::tanh`], but
//! the quotient is `vrcp14ps` refined by one Newton step: `vdivps` on 16 lanes occupies the divider
//! about as long as the rest of the function takes, and the soft cap runs on every score.

use std::arch::x86_64::*;

use super::simd::{TANH_CLAMP, TANH_P, TANH_Q};
use super::softmax_avx512::lanes;

/// `tanh(x)` on 16 lanes (NaN stays NaN): 16 vector operations, no division.
#[inline]
#[target_feature(enable = "avx512f")]
fn tanh16(x: __m512) -> __m512 {
    // `max`/`min` return their second operand when either is NaN, so NaN lanes pass through.
    let x = _mm512_max_ps(_mm512_set1_ps(-TANH_CLAMP), x);
    let x = _mm512_min_ps(_mm512_set1_ps(TANH_CLAMP), x);
    let z = _mm512_mul_ps(x, x);
    let mut p = _mm512_set1_ps(TANH_P[0]);
    for c in &TANH_P[1..] {
        p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(*c));
    }
    let mut q = _mm512_set1_ps(TANH_Q[0]);
    for c in &TANH_Q[1..] {
        q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(*c));
    }
    // q >= 1 everywhere, so the 14-bit reciprocal is well defined; one Newton step makes it
    // accurate to about 1 ulp: r' = r + r·(1 - q·r).
    let r = _mm512_rcp14_ps(q);
    let r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(1.0)), r);
    _mm512_mul_ps(_mm512_mul_ps(x, p), r)
}

/// [`super::simd::softcap`] (same contract).
#[target_feature(enable = "avx512f")]
pub(super) fn softcap(x: &mut [f32], a: f32, cap: f32, mut t: Option<&mut [f32]>) {
    let (va, vcap) = (_mm512_set1_ps(a), _mm512_set1_ps(cap));
    let n = match &t {
        Some(t) => x.len().min(t.len()),
        None => x.len(),
    };
    for i in (0..n).step_by(16) {
        let k = lanes(n - i);
        // SAFETY: the masked loads and stores touch elements `i .. min(i + 16, n)` of `x` and `t`,
        // both at least `n` long.
        unsafe {
            let th = tanh16(_mm512_mul_ps(
                va,
                _mm512_maskz_loadu_ps(k, x.as_ptr().add(i)),
            ));
            if let Some(t) = t.as_deref_mut() {
                _mm512_mask_storeu_ps(t.as_mut_ptr().add(i), k, th);
            }
            _mm512_mask_storeu_ps(x.as_mut_ptr().add(i), k, _mm512_mul_ps(vcap, th));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softcap_matches_f64() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        // Odd length, so the masked tail is exercised too.
        let mut xs = Vec::new();
        let mut x = -20.0f32;
        while x < 20.0 {
            xs.extend([x, x * 1e-3, x * 1e-6]);
            x += 0.0071;
        }
        xs.extend([0.0, f32::INFINITY, -200.0, f32::NAN, 5.0]);
        let (mut v, mut t) = (xs.clone(), vec![0f32; xs.len()]);
        // SAFETY: the CPU has AVX-512F (checked above).
        unsafe { softcap(&mut v, 0.5, 3.0, Some(&mut t)) };
        let mut worst = 0f64;
        for ((x, v), t) in xs.iter().zip(&v).zip(&t) {
            if x.is_nan() {
                assert!(v.is_nan() && t.is_nan());
                continue;
            }
            let want = (0.5 * *x as f64).tanh();
            worst = worst.max((*t as f64 - want).abs() / want.abs().max(1e-30));
            assert_eq!(*v, 3.0 * *t);
        }
        assert!(worst < 1e-6, "relative error {worst}");
        // Without `t`, the same values.
        let mut w = xs.clone();
        // SAFETY: as above.
        unsafe { softcap(&mut w, 0.5, 3.0, None) };
        for (a, b) in w.iter().zip(&v) {
            assert!(a == b || (a.is_nan() && b.is_nan()));
        }
    }
}
