//! The soft cap and the ALiBi bias of the tiled kernels' scores written with AVX-512 intrinsics,
//! for CPUs that have AVX-512F (chosen at run time by [`super::simd`]). `tanh` is the portable
//! code's rational function ([`super::simd::tanh`]) with the cap folded into its numerator and
//! one `vdivps`: on Zen 4 its eleven multiply-class operations ran faster than the exponential
//! form `1 - 2/(e^(2|x|) + 1)`, whose seventeen operations mix both pipes, since beside the
//! products' FMA pipe what limits a pass there is the number of 512-bit operations, about 1.6
//! per cycle (measured: BENCHMARKS.md, 2026-12-07 night).
//! The forward's pass ([`cap_bias_rows`]) also finds each row's maximum and applies the band, so
//! that the softmax skips its own pass over the scores, and reads the ALiBi bias from a table
//! of `-slope·|d|` indexed by `j - i`: one load and one add per 16 scores.

use std::arch::x86_64::*;

use super::lanes;
use super::simd::{TANH_CLAMP, TANH_P, TANH_Q};
use super::softmax_avx512::reduce16;

/// `tanh(x)/x` on `|x| <= SMALL`, a polynomial in `x²` (highest degree first) fitted by
/// iteratively reweighted least squares in float64: `x·p(x²)` is within 7e-8 of `tanh` there.
const SMALL_P: [f32; 6] = [
    -4.493_349_7e-3,
    1.923_709_4e-2,
    -5.314_919e-2,
    1.332_057_9e-1,
    -3.333_247e-1,
    9.999_998e-1,
];
/// Where [`SMALL_P`] holds.
const SMALL: f32 = 0.75;

/// `c·tanh` on 16 lanes: the coefficients as vectors, the numerators' multiplied by `c`.
struct Tanh16 {
    small: [__m512; 6],
    p: [__m512; 5],
    q: [__m512; 5],
}

impl Tanh16 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn new(c: f32) -> Self {
        Self {
            small: SMALL_P.map(|k| _mm512_set1_ps(k * c)),
            p: TANH_P.map(|k| _mm512_set1_ps(k * c)),
            q: TANH_Q.map(|k| _mm512_set1_ps(k)),
        }
    }

    /// `c·tanh(x)` on 16 lanes, to 3.4e-7·c: where every lane has `|x| <= SMALL` (scores
    /// within `±0.75·c`, as nearly all are in practice), `x·c·p(x²)` by [`SMALL_P`] (seven
    /// multiply-class operations and a compare); otherwise [`Self::rational`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn eval(&self, x: __m512) -> __m512 {
        let z = _mm512_mul_ps(x, x);
        // (NaN compares false: the rational keeps it.)
        if _mm512_cmp_ps_mask::<_CMP_LE_OQ>(z, _mm512_set1_ps(SMALL * SMALL)) != 0xffff {
            return self.rational(x);
        }
        let mut p = self.small[0];
        for k in &self.small[1..] {
            p = _mm512_fmadd_ps(p, z, *k);
        }
        _mm512_mul_ps(x, p)
    }

    /// `c·tanh(x)` on 16 lanes, to 3.4e-7·c: `x·c·p(x²) / q(x²)`, `x` clamped to
    /// `[-TANH_CLAMP, TANH_CLAMP]` (`vmaxps`/`vminps` return their second operand when either
    /// is NaN: NaN stays NaN; `±inf` gives `±c`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn rational(&self, x: __m512) -> __m512 {
        let x = _mm512_max_ps(_mm512_set1_ps(-TANH_CLAMP), x);
        let x = _mm512_min_ps(_mm512_set1_ps(TANH_CLAMP), x);
        let z = _mm512_mul_ps(x, x);
        let (mut p, mut q) = (self.p[0], self.q[0]);
        for k in 1..5 {
            p = _mm512_fmadd_ps(p, z, self.p[k]);
            q = _mm512_fmadd_ps(q, z, self.q[k]);
        }
        _mm512_div_ps(_mm512_mul_ps(x, p), q)
    }
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
    let tanh = Tanh16::new(if T { 1.0 } else { f });
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
                    tanh.eval(u)
                } else if C {
                    let th = tanh.eval(u);
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

/// Rows of the bias table [`cap_bias_rows`] builds at a time, and the columns it covers with
/// them: the table (`BIAS_ROWS - 1 + BIAS_COLS` values) lives on the stack.
const BIAS_ROWS: usize = 16;
const BIAS_COLS: usize = 256;

/// [`super::simd::cap_bias_rows`].
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn cap_bias_rows(
    x: &mut [f32],
    cols: usize,
    cap: Option<f32>,
    alibi: Option<(f32, f32)>,
    band: impl Fn(usize) -> (usize, usize),
    row_max: &mut [f32],
) {
    match (cap, alibi) {
        (Some(c), Some(b)) => fused::<true, true>(x, cols, c, b, band, row_max),
        (Some(c), None) => fused::<true, false>(x, cols, c, (0.0, 0.0), band, row_max),
        (None, Some(b)) => fused::<false, true>(x, cols, 0.0, b, band, row_max),
        (None, None) => fused::<false, false>(x, cols, 0.0, (0.0, 0.0), band, row_max),
    }
}

/// [`cap_bias_rows`] with the choices made at compile time: `C` the cap, `B` the bias.
#[inline]
#[target_feature(enable = "avx512f")]
fn fused<const C: bool, const B: bool>(
    x: &mut [f32],
    cols: usize,
    cap: f32,
    (slope, diag0): (f32, f32),
    band: impl Fn(usize) -> (usize, usize),
    row_max: &mut [f32],
) {
    let cols = cols.max(1);
    let rows = (x.len() / cols).min(row_max.len());
    let tanh = Tanh16::new(cap);
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let nslope = _mm512_set1_ps(-slope);
    let iota = _mm512_setr_ps(
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    );
    // `table[w] = -slope·|diag0 + i0 + BIAS_ROWS - 1 - (j0 + w)|`: row `i0 + r`'s bias at key
    // `j0 + j` is `table[BIAS_ROWS - 1 - r + j]`.
    let mut table = [0f32; BIAS_ROWS - 1 + BIAS_COLS];
    for i0 in (0..rows).step_by(BIAS_ROWS) {
        let group = BIAS_ROWS.min(rows - i0);
        // Each row's band, clipped to the tile, and its running maximum.
        let bands: [(usize, usize); BIAS_ROWS] = std::array::from_fn(|r| {
            if r < group {
                let (first, end) = band(i0 + r);
                let first = first.min(cols);
                (first, end.clamp(first, cols))
            } else {
                (0, 0)
            }
        });
        let mut acc = [ninf; BIAS_ROWS];
        for j0 in (0..cols).step_by(BIAS_COLS) {
            let width = BIAS_COLS.min(cols - j0);
            if B {
                // `diag0 + i0 + BIAS_ROWS - 1 - j0 - w` for 16 values of `w` at a time, exact
                // for the small integers of a tile.
                let mut d = _mm512_sub_ps(
                    _mm512_set1_ps(diag0 + (i0 + BIAS_ROWS - 1) as f32 - j0 as f32),
                    iota,
                );
                for w in (0..BIAS_ROWS - 1 + width).step_by(16) {
                    let y = _mm512_mul_ps(nslope, _mm512_abs_ps(d));
                    // SAFETY: the mask covers the table's lanes `w..min(w + 16, table.len())`.
                    unsafe {
                        let m = lanes(table.len() - w);
                        _mm512_mask_storeu_ps(table.as_mut_ptr().add(w), m, y)
                    };
                    d = _mm512_sub_ps(d, _mm512_set1_ps(16.0));
                }
            }
            for (r, &(first, end)) in bands.iter().enumerate().take(group) {
                let row = &mut x[(i0 + r) * cols..(i0 + r + 1) * cols];
                // The row's keys in this block of columns, relative to `j0`.
                let (lo, hi) = (
                    first.clamp(j0, j0 + width) - j0,
                    end.clamp(j0, j0 + width) - j0,
                );
                let bias = &table[BIAS_ROWS - 1 - r..];
                let y = |u: __m512, b: __m512| {
                    let y = if C { tanh.eval(u) } else { u };
                    if B {
                        _mm512_add_ps(y, b)
                    } else {
                        y
                    }
                };
                // Whole vectors unmasked (masked loads and stores cost Zen 4 about two cycles
                // more per 16 scores), then the tail.
                let mut j = lo;
                while j + 16 <= hi {
                    // SAFETY: lanes `j..j + 16`, `j + 16 <= hi <= width`: in the row
                    // (`j0 + hi <= cols`) and in the table (`BIAS_ROWS - 1 - r + hi <=
                    // BIAS_ROWS - 1 + BIAS_COLS`).
                    unsafe {
                        let p = row.as_mut_ptr().add(j0 + j);
                        let v = y(_mm512_loadu_ps(p), _mm512_loadu_ps(bias.as_ptr().add(j)));
                        acc[r] = _mm512_max_ps(acc[r], v);
                        _mm512_storeu_ps(p, v);
                    }
                    j += 16;
                }
                if j < hi {
                    let m = lanes(hi - j);
                    // SAFETY: as above, the mask covering lanes `j..hi`.
                    unsafe {
                        let p = row.as_mut_ptr().add(j0 + j);
                        let b = _mm512_maskz_loadu_ps(m, bias.as_ptr().add(j));
                        let v = y(_mm512_maskz_loadu_ps(m, p), b);
                        acc[r] = _mm512_mask_max_ps(acc[r], m, acc[r], v);
                        _mm512_mask_storeu_ps(p, m, v);
                    }
                }
            }
        }
        // Outside its band a row's scores are `-inf`.
        for (r, &(first, end)) in bands.iter().enumerate().take(group) {
            let row = &mut x[(i0 + r) * cols..(i0 + r + 1) * cols];
            row[..first].fill(f32::NEG_INFINITY);
            row[end..].fill(f32::NEG_INFINITY);
        }
        let maxima = reduce16(&acc, |a, b| _mm512_max_ps(a, b));
        // SAFETY: the mask covers the group's `group <= row_max.len() - i0` rows.
        unsafe { _mm512_mask_storeu_ps(row_max.as_mut_ptr().add(i0), lanes(group), maxima) };
    }
}
