//! The soft cap and the ALiBi bias of the tiled kernels' scores written with AVX-512 intrinsics,
//! for CPUs that have AVX-512F (chosen at run time by [`super::simd::softcap_rows`] and
//! [`super::simd::alibi_rows`]). The same rational `tanh` as the portable code, but the division
//! by `q(x²)` is `vrcp14ps` and one Newton step: `vdivps` on 512 bits issues once per ~10
//! cycles, and the compiled portable loop waited on it. The bias `-slope·|diag - j|` comes from
//! a vector of `diag - j` stepped by 16, not from converting each `j`; with a soft cap it is added
//! in the same pass.

use std::arch::x86_64::*;

use super::lanes;

use super::simd::{TANH_CLAMP, TANH_P, TANH_Q};

/// `c·tanh(x)` on 16 lanes, to the portable [`super::simd::tanh`]'s accuracy, with `pc` the
/// numerator's coefficients times `c` (so the product by `c` costs nothing); NaN stays NaN.
#[inline]
#[target_feature(enable = "avx512f")]
fn scaled_tanh16(x: __m512, pc: &[__m512; TANH_P.len()]) -> __m512 {
    // `vmaxps`/`vminps` return their second operand when either is NaN: keep `x` there.
    let x = _mm512_max_ps(_mm512_set1_ps(-TANH_CLAMP), x);
    let x = _mm512_min_ps(_mm512_set1_ps(TANH_CLAMP), x);
    let z = _mm512_mul_ps(x, x);
    let mut p = pc[0];
    for c in &pc[1..] {
        p = _mm512_fmadd_ps(p, z, *c);
    }
    let mut q = _mm512_set1_ps(TANH_Q[0]);
    for c in &TANH_Q[1..] {
        q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(*c));
    }
    // q >= 1, so 1/q is finite: 14 bits from `vrcp14ps`, about 28 after one Newton step.
    let r = _mm512_rcp14_ps(q);
    let r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(1.0)), r);
    _mm512_mul_ps(_mm512_mul_ps(x, p), r)
}

/// [`super::simd::softcap_rows`]: `x[i][j] = cap·tanh(x[i][j]) - slope·|diag0 + i - j|` (no
/// bias without `alibi`) for the rows of `x`, `cols` wide, `tanh(x[i][j])` stored in `t` when
/// given.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn softcap_rows(
    x: &mut [f32],
    cols: usize,
    cap: f32,
    t: Option<&mut [f32]>,
    alibi: Option<(f32, f32)>,
) {
    match (t, alibi) {
        (Some(t), Some(b)) => tile::<true, true, true>(x, cols, cap, t, b),
        (Some(t), None) => tile::<true, true, false>(x, cols, cap, t, (0.0, 0.0)),
        (None, Some(b)) => tile::<true, false, true>(x, cols, cap, &mut [], b),
        (None, None) => tile::<true, false, false>(x, cols, cap, &mut [], (0.0, 0.0)),
    }
}

/// [`super::simd::alibi_rows`]: `x[i][j] = a·x[i][j] - slope·|diag0 + i - j|` for the rows of
/// `x`, `cols` wide.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn alibi_rows(x: &mut [f32], cols: usize, a: f32, slope: f32, diag0: f32) {
    tile::<false, false, true>(x, cols, a, &mut [], (slope, diag0))
}

/// The scores' transforms with the choices made at compile time: `x = f·tanh(x)` (`C`, the soft
/// cap, `f` the cap) or `x = f·x` (`f` the scale); `T` stores `tanh(x)` in `t` (as long as `x`),
/// `B` adds the bias.
#[inline]
#[target_feature(enable = "avx512f")]
fn tile<const C: bool, const T: bool, const B: bool>(
    x: &mut [f32],
    cols: usize,
    f: f32,
    t: &mut [f32],
    (slope, diag0): (f32, f32),
) {
    assert!(
        !T || t.len() >= x.len(),
        "tanh buffer shorter than the tile"
    );
    let (fv, nslope) = (_mm512_set1_ps(f), _mm512_set1_ps(-slope));
    // Storing `tanh`, the cap multiplies it afterwards; otherwise it goes into the numerator.
    let pc = TANH_P.map(|c| _mm512_set1_ps(if T { c } else { c * f }));
    let iota = _mm512_setr_ps(
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    );
    let cols = cols.max(1);
    for (i, row) in x.chunks_exact_mut(cols).enumerate() {
        // `diag0 + i - j` for the 16 lanes, exact for the small integers of a tile.
        let mut d = _mm512_sub_ps(_mm512_set1_ps(diag0 + i as f32), iota);
        let t_row = if T {
            &mut t[i * cols..(i + 1) * cols]
        } else {
            &mut [][..]
        };
        let mut j = 0;
        // One step of 16 lanes (`m` masks the row's tail).
        let mut step = |j: usize, m: __mmask16| {
            // SAFETY: the mask covers only lanes `j..min(j + 16, cols)` of the row (and of its
            // `tanh` row).
            unsafe {
                let u = _mm512_maskz_loadu_ps(m, row.as_ptr().add(j));
                let mut y = if C && !T {
                    scaled_tanh16(u, &pc)
                } else if C {
                    let th = scaled_tanh16(u, &pc);
                    _mm512_mask_storeu_ps(t_row.as_mut_ptr().add(j), m, th);
                    _mm512_mul_ps(fv, th)
                } else {
                    _mm512_mul_ps(fv, u)
                };
                if B {
                    y = _mm512_fmadd_ps(nslope, _mm512_abs_ps(d), y);
                    d = _mm512_sub_ps(d, _mm512_set1_ps(16.0));
                }
                _mm512_mask_storeu_ps(row.as_mut_ptr().add(j), m, y);
            }
        };
        while j + 16 <= cols {
            step(j, 0xffff);
            j += 16;
        }
        if j < cols {
            step(j, lanes(cols - j));
        }
    }
}
