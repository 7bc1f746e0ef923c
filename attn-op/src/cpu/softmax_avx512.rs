//! The softmax rows of the tiled kernels written with AVX-512 intrinsics, for CPUs that have
//! AVX-512F (chosen at run time by [`super::simd`]). Exponentials are taken in base 2:
//! `e^(a·x - b) = 2^t` with `t = x·(a·log₂e) - b·log₂e` formed by one multiply-add, `t` split
//! into its nearest integer `n` (`vrndscaleps`) and `f = t - n` (exact), `2^f` by a polynomial and
//! `2^n` rebuilt by `vscalefps`: seven multiply-class operations per 16 lanes. The products and
//! these compete for the same FMA pipes, and at head dim 32 the exponentials cost about a
//! fifth as much as the two products, so each one counts (base e took ten: the scale, the range
//! reduction's product and its two-part `ln 2` correction). Where the scores come already
//! multiplied by `scale·log₂e` (the forward folds it into the key tile), the first multiply-add
//! is a subtraction, which runs beside the FMAs instead of on them.
//! The rows' maxima and sums are reduced sixteen rows at a time ([`reduce16`]).

use std::arch::x86_64::*;

use std::f32::consts::LOG2_E;

use half::bf16;

use super::bf16_pairs::ProbRows;
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
pub(super) fn exp2_16(t: __m512) -> __m512 {
    // Lanes at or above -126, and NaN lanes (unordered compares are true), keep their value.
    let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(t, _mm512_set1_ps(-126.0));
    let (p, n) = exp2_parts(t);
    _mm512_maskz_scalef_ps(keep, p, n)
}

/// `(2^f, n)` with `n` the nearest integer to `t` and `f = t - n` (exact).
#[inline]
#[target_feature(enable = "avx512f")]
fn exp2_parts(t: __m512) -> (__m512, __m512) {
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let f = _mm512_sub_ps(t, n);
    let mut p = _mm512_set1_ps(POLY[0]);
    for c in &POLY[1..] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
    }
    (p, n)
}

/// Sixteen vectors reduced lane-wise by `op` (an associative, commutative vector operation):
/// lane `i` of the result is `op` over the lanes of `v[i]`. Four rounds of shuffles between
/// vector pairs and one permutation: ~3 operations per vector, where reducing each vector on
/// its own takes ~8 and ends in a chain of dependent steps.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn reduce16(v: &[__m512; 16], op: impl Fn(__m512, __m512) -> __m512) -> __m512 {
    // 16 -> 8: lanes 0-7 of w[i] fold the 256-bit halves of v[2i], lanes 8-15 those of v[2i+1].
    let w: [__m512; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        op(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xee>(a, b),
        )
    });
    // 8 -> 4: 128-bit lane c of x[i] holds four partials of v[4i + c].
    let x: [__m512; 4] = std::array::from_fn(|i| {
        let (a, b) = (w[2 * i], w[2 * i + 1]);
        op(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xdd>(a, b),
        )
    });
    // 4 -> 2 -> 1 inside the 128-bit lanes: lane 4c + k ends up with v[4k + c].
    let y: [__m512; 2] = std::array::from_fn(|i| {
        let (a, b) = (x[2 * i], x[2 * i + 1]);
        op(
            _mm512_shuffle_ps::<0x88>(a, b),
            _mm512_shuffle_ps::<0xdd>(a, b),
        )
    });
    let z = op(
        _mm512_shuffle_ps::<0x88>(y[0], y[1]),
        _mm512_shuffle_ps::<0xdd>(y[0], y[1]),
    );
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_castsi512_ps(_mm512_permutexvar_epi32(order, _mm512_castps_si512(z)))
}

/// Lane-wise maximum of the elements of `x` (`-inf` lanes where it has none).
#[inline]
#[target_feature(enable = "avx512f")]
fn max_lanes(x: &[f32]) -> __m512 {
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
    _mm512_max_ps(acc, t)
}

/// `a·v + nb`, or `v + nb` when `UNIT` (`a` then unused).
#[inline]
#[target_feature(enable = "avx512f")]
fn affine<const UNIT: bool>(v: __m512, a: __m512, nb: __m512) -> __m512 {
    if UNIT {
        _mm512_add_ps(v, nb)
    } else {
        _mm512_fmadd_ps(a, v, nb)
    }
}

/// `x = 2^(a·x - b)` (`2^(x - b)` when `UNIT`, `a` then unused: a subtraction in place of a
/// multiply-add, which leaves the FMA pipes one operation fewer per 16 lanes), returning the
/// lane-wise sums of the new values.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp2_affine_lanes<const UNIT: bool>(x: &mut [f32], a: f32, b: f32) -> __m512 {
    let (a, nb) = (_mm512_set1_ps(a), _mm512_set1_ps(-b));
    let t = |v| affine::<UNIT>(v, a, nb);
    let mut sum = _mm512_setzero_ps();
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        // SAFETY: a chunk holds 16 elements.
        unsafe {
            let e = exp2_16(t(_mm512_loadu_ps(c.as_ptr())));
            _mm512_storeu_ps(c.as_mut_ptr(), e);
            sum = _mm512_add_ps(sum, e);
        }
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let k = lanes(tail.len());
        // SAFETY: the masked load and store touch only the tail's elements.
        unsafe {
            let e = exp2_16(t(_mm512_maskz_loadu_ps(k, tail.as_ptr())));
            _mm512_mask_storeu_ps(tail.as_mut_ptr(), k, e);
            sum = _mm512_mask_add_ps(sum, k, sum, e);
        }
    }
    sum
}

/// [`exp2_affine_lanes`] with the values rounded to bf16 into `dst` (as long as `x`) instead of
/// back into `x`, as `vcvtneps2bf16` rounds (to nearest even).
///
/// # Safety
/// The CPU must have AVX-512F, BW, VL and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn exp2_affine_bf16<const UNIT: bool>(
    x: &[f32],
    a: f32,
    b: f32,
    dst: &mut [bf16],
) -> __m512 {
    assert!(
        dst.len() >= x.len(),
        "bf16 destination shorter than its row"
    );
    let (a, nb) = (_mm512_set1_ps(a), _mm512_set1_ps(-b));
    let t = |v| affine::<UNIT>(v, a, nb);
    let mut sum = _mm512_setzero_ps();
    let n = x.len();
    let mut c0 = 0;
    while c0 + 16 <= n {
        // SAFETY: lanes `c0..c0 + 16` of `x` and `dst` (asserted at least as long).
        unsafe {
            let e = exp2_16(t(_mm512_loadu_ps(x.as_ptr().add(c0))));
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(e));
            _mm256_storeu_si256(dst.as_mut_ptr().add(c0).cast(), h);
            sum = _mm512_add_ps(sum, e);
        }
        c0 += 16;
    }
    if c0 < n {
        let k = lanes(n - c0);
        // SAFETY: the masks cover lanes `c0..n` of `x` and `dst`.
        unsafe {
            let e = exp2_16(t(_mm512_maskz_loadu_ps(k, x.as_ptr().add(c0))));
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(e));
            _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(c0).cast(), k, h);
            sum = _mm512_mask_add_ps(sum, k, sum, e);
        }
    }
    sum
}

/// `x = e^(a·x - b)`, returning the sum of the new values.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp_affine_sum(x: &mut [f32], a: f32, b: f32) -> f32 {
    _mm512_reduce_add_ps(exp2_affine_lanes::<false>(x, a * LOG2_E, b * LOG2_E))
}

/// [`super::simd::online_softmax_rows`] (same contract); with `probs`, the probabilities go,
/// rounded to bf16, to `probs` as they are computed (for the products on bf16 pairs), instead
/// of back to `s` for a rounding pass of their own. (The forward calls this directly with
/// `probs`: a `ProbRows` exists only on x86-64 CPUs with AVX512_BF16.)
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) fn online_softmax_rows(
    s: &mut [f32],
    cols: usize,
    mul: f32,
    known_max: Option<&[f32]>,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
    mut probs: Option<&mut ProbRows>,
) {
    let cols = cols.max(1);
    let mut n = alpha.len().min(m.len()).min(l.len()).min(s.len() / cols);
    if let Some(r) = known_max {
        n = n.min(r.len());
    }
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    // Sixteen rows at a time: their maxima, sums and rescalings are each one vector.
    for (g0, group) in (0..n).step_by(16).zip(s.chunks_mut(16 * cols)) {
        let k = lanes(n - g0);
        let row_max = match known_max {
            // SAFETY: the masked load touches only the group's rows of `known_max` (n <= len).
            Some(r) => unsafe { _mm512_mask_loadu_ps(ninf, k, r.as_ptr().add(g0)) },
            None => {
                let mut lanes16 = [ninf; 16];
                for (v, row) in lanes16
                    .iter_mut()
                    .zip(group.chunks_exact(cols))
                    .take(n - g0)
                {
                    *v = max_lanes(row);
                }
                reduce16(&lanes16, |a, b| _mm512_max_ps(a, b))
            }
        };
        let mut lanes16;
        // SAFETY: the masked loads and stores touch only the group's rows of `m`, `l`, `alpha`;
        // `exp2_affine_bf16` is called with a `ProbRows`, built only where the CPU has what it
        // needs (`bf16_pairs::available`).
        unsafe {
            let m_old = _mm512_mask_loadu_ps(ninf, k, m.as_ptr().add(g0));
            // `vmaxps` returns its second operand when either is NaN: a NaN row keeps its `m`.
            let m_new = _mm512_max_ps(_mm512_mul_ps(_mm512_set1_ps(mul), row_max), m_old);
            let mut m_rows = [0f32; 16];
            _mm512_storeu_ps(m_rows.as_mut_ptr(), m_new);
            lanes16 = [_mm512_setzero_ps(); 16];
            let rows = group.chunks_exact_mut(cols).take(n - g0);
            for (r, ((v, row), &m_row)) in lanes16.iter_mut().zip(rows).zip(&m_rows).enumerate() {
                match probs.as_deref_mut().map(|p| p.row(g0 + r)) {
                    // No key seen yet: zeros, and m, l unchanged (factor 1, sum 0).
                    None if m_row == f32::NEG_INFINITY => row.fill(0.0),
                    Some(dst) if m_row == f32::NEG_INFINITY => dst.fill(bf16::ZERO),
                    None if mul == 1.0 => *v = exp2_affine_lanes::<true>(row, mul, m_row),
                    None => *v = exp2_affine_lanes::<false>(row, mul, m_row),
                    // (In the unsafe block: a `ProbRows` is built only where
                    // `bf16_pairs::available`, which implies AVX-512F, BW, VL and BF16.)
                    Some(dst) if mul == 1.0 => *v = exp2_affine_bf16::<true>(row, mul, m_row, dst),
                    Some(dst) => *v = exp2_affine_bf16::<false>(row, mul, m_row, dst),
                }
            }
            let sums = reduce16(&lanes16, |a, b| _mm512_add_ps(a, b));
            // Rows that had seen no key (m_old = -inf) get the factor 1 (2^0).
            let seen = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(m_old, ninf);
            let a = exp2_16(_mm512_maskz_sub_ps(seen, m_old, m_new));
            _mm512_mask_storeu_ps(alpha.as_mut_ptr().add(g0), k, a);
            let l_old = _mm512_maskz_loadu_ps(k, l.as_ptr().add(g0));
            _mm512_mask_storeu_ps(l.as_mut_ptr().add(g0), k, _mm512_fmadd_ps(l_old, a, sums));
            _mm512_mask_storeu_ps(m.as_mut_ptr().add(g0), k, m_new);
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
