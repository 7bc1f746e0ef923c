//! The soft cap and the ALiBi bias of the tiled kernels' scores written with AVX-512 intrinsics,
//! for CPUs that have AVX-512F (chosen at run time by [`super::simd::softcap_rows`] and
//! [`super::simd::alibi_rows`]). `tanh` comes from the softmax's base-2 exponential,
//! `tanh|x| = 1 - 2/(e^(2|x|) + 1)` with `vrcp14ps` and one Newton step for the division: nine
//! multiply-adds among 17 operations per 16 lanes, where the portable code's rational function
//! ([`super::simd::tanh`]) takes thirteen among 16. On Zen 4 both passes ran equally fast (bound
//! by the issue rate of 512-bit operations, not by the FMA pipes); without the exponential's
//! underflow mask, which `t >= 0` does not need, the new one is a little faster. The bias
//! `-slope·|diag - j|` comes from a vector of `diag - j` stepped by 16, not from converting each
//! `j`; with a soft cap it is added in the same pass.

use std::arch::x86_64::*;
use std::f32::consts::LOG2_E;

use super::lanes;
use super::softmax_avx512::exp2_16_nonneg;

/// `c·tanh(x)` on 16 lanes, `c > 0` and `c2 = 2c`, to an absolute error of about `3e-7·c`
/// (the exponential's 1.1e-7 and the roundings): `±(c - 2c/(e^(2|x|) + 1))`, with `x`'s sign
/// put back by a bitwise or. NaN stays NaN; `±inf` gives `±c`.
#[inline]
#[target_feature(enable = "avx512f")]
fn scaled_tanh16(x: __m512, c: __m512, c2: __m512) -> __m512 {
    let sign = _mm512_set1_epi32(i32::MIN);
    let a = _mm512_abs_ps(x);
    // `2|x|·log₂e`, at most 64, past which `tanh` rounds to 1 and `e^(2|x|)` would overflow.
    // (`vminps` returns its second operand when either is NaN: NaN stays NaN.)
    let t = _mm512_min_ps(
        _mm512_set1_ps(64.0),
        _mm512_mul_ps(a, _mm512_set1_ps(2.0 * LOG2_E)),
    );
    let d = _mm512_add_ps(exp2_16_nonneg(t), _mm512_set1_ps(1.0));
    // d >= 1, so 1/d is finite: 14 bits from `vrcp14ps`, about 28 after one Newton step.
    let r = _mm512_rcp14_ps(d);
    let r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.0)), r);
    // c - 2c·r >= 0: or-ing in x's sign bit gives c·tanh(x).
    let m = _mm512_fnmadd_ps(c2, r, c);
    let x_sign = _mm512_and_si512(_mm512_castps_si512(x), sign);
    _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(m), x_sign))
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
    // Storing `tanh`, the cap multiplies it afterwards; otherwise it goes into `scaled_tanh16`.
    let c = if T { 1.0 } else { f };
    let (cv, c2v) = (_mm512_set1_ps(c), _mm512_set1_ps(2.0 * c));
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
                    scaled_tanh16(u, cv, c2v)
                } else if C {
                    let th = scaled_tanh16(u, cv, c2v);
                    _mm512_mask_storeu_ps(t_row.as_mut_ptr().add(j), m, th);
                    _mm512_mul_ps(fv, th)
                } else if f == 1.0 {
                    // (The products took the scale: `forward_task`'s key tile.)
                    u
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
