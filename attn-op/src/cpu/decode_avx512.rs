//! One query row against keys and values read once (decoding against a KV cache), and the
//! widening of f16/bf16 tiles, written with AVX-512 intrinsics for CPUs that have AVX-512F, BW
//! and VL (chosen at run time by [`super::Src`]). This work streams the cache from memory; the
//! compiler's own vectorisation of the portable loops used 128-bit loads and a product per key,
//! so a core kept too few loads in flight. Here four keys share each load of the query, the output row stays
//! in registers across a whole tile of values, and bf16 is widened as it is loaded.

use std::arch::x86_64::*;

use super::lanes;

/// An element type of the cache: 16 of them from `p` (lanes outside `m` read as 0) as f32.
pub(crate) trait Elem: Copy {
    /// # Safety
    /// The CPU must have AVX-512F, BW and VL, and the lanes of `m` must be readable from `p`.
    unsafe fn load16(p: *const Self, m: __mmask16) -> __m512;
}

impl Elem for f32 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const f32, m: __mmask16) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe { _mm512_maskz_loadu_ps(m, p) }
    }
}

impl Elem for half::bf16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const half::bf16, m: __mmask16) -> __m512 {
        // bf16 bits are the high half of the f32's: widen to 32 bits and shift, exactly.
        // SAFETY: the caller's contract (16-bit lanes of `m`).
        let h = unsafe { _mm256_maskz_loadu_epi16(m, p.cast()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

impl Elem for half::f16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const half::f16, m: __mmask16) -> __m512 {
        // SAFETY: the caller's contract (16-bit lanes of `m`).
        _mm512_cvtph_ps(unsafe { _mm256_maskz_loadu_epi16(m, p.cast()) })
    }
}

/// `dst = src` widened to f32 (exactly), 16 elements per instruction.
///
/// # Safety
/// The CPU must have AVX-512F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn widen<T: Elem>(src: &[T], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    for c in (0..n).step_by(16) {
        let m = lanes(n - c);
        // SAFETY: lanes `c..min(c + 16, n)` of both slices.
        unsafe {
            _mm512_mask_storeu_ps(
                dst.as_mut_ptr().add(c),
                m,
                T::load16(src.as_ptr().add(c), m),
            )
        };
    }
}

/// `out[j] = x · k_j` for the rows `k_j = k[off + j·rs..][..x.len()]`, `j < out.len()`.
///
/// # Safety
/// The CPU must have AVX-512F, BW and VL. Panics if a row is out of bounds of `k`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn dots<T: Elem>(x: &[f32], k: &[T], off: usize, rs: usize, out: &mut [f32]) {
    let e = x.len();
    let n = out.len();
    if n == 0 {
        return;
    }
    // Every row read below lies in `k`: the last one ends here.
    assert!(off + (n - 1) * rs + e <= k.len(), "key rows out of bounds");
    let row = |j: usize| k[off + j * rs..].as_ptr();
    let mut j = 0;
    while j < n {
        let g = (n - j).min(4);
        let r = [
            row(j),
            row(j + 1.min(g - 1)),
            row(j + 2.min(g - 1)),
            row(j + 3.min(g - 1)),
        ];
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut c = 0;
        while c < e {
            let m = lanes(e - c);
            // SAFETY: lanes `c..min(c + 16, e)` of `x` and of each row (in bounds, above).
            unsafe {
                let xv = _mm512_maskz_loadu_ps(m, x.as_ptr().add(c));
                for (a, r) in acc.iter_mut().zip(&r) {
                    *a = _mm512_fmadd_ps(xv, T::load16(r.add(c), m), *a);
                }
            }
            c += 16;
        }
        for (i, a) in acc.iter().take(g).enumerate() {
            out[j + i] = _mm512_reduce_add_ps(*a);
        }
        j += g;
    }
}

/// `y += Σ_j p[j]·v_j` for the rows `v_j = v[off + j·rs..][..y.len()]`, `j < p.len()`.
///
/// # Safety
/// The CPU must have AVX-512F, BW and VL. Panics if a row is out of bounds of `v`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn accumulate<T: Elem>(p: &[f32], v: &[T], off: usize, rs: usize, y: &mut [f32]) {
    let ev = y.len();
    let n = p.len();
    if n == 0 {
        return;
    }
    assert!(
        off + (n - 1) * rs + ev <= v.len(),
        "value rows out of bounds"
    );
    // Up to 128 output lanes at a time, held in (at most) eight registers through every key.
    for c0 in (0..ev).step_by(128) {
        let (y, off) = (&mut y[c0..(c0 + 128).min(ev)], off + c0);
        // SAFETY: the CPU features are the caller's; the rows are in bounds (above).
        unsafe {
            match y.len().div_ceil(16) {
                1 => held::<T, 1>(p, v, off, rs, y),
                2 => held::<T, 2>(p, v, off, rs, y),
                3 => held::<T, 3>(p, v, off, rs, y),
                4 => held::<T, 4>(p, v, off, rs, y),
                5 => held::<T, 5>(p, v, off, rs, y),
                6 => held::<T, 6>(p, v, off, rs, y),
                7 => held::<T, 7>(p, v, off, rs, y),
                _ => held::<T, 8>(p, v, off, rs, y),
            }
        }
    }
}

/// [`accumulate`] for `y` of at most `16·R` lanes, held in `R` registers.
///
/// # Safety
/// As [`accumulate`], with every row `j < p.len()` in bounds.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn held<T: Elem, const R: usize>(p: &[f32], v: &[T], off: usize, rs: usize, y: &mut [f32]) {
    let ev = y.len();
    let masks: [__mmask16; R] = std::array::from_fn(|i| lanes(ev.saturating_sub(16 * i)));
    let mut acc = [_mm512_setzero_ps(); R];
    for (i, a) in acc.iter_mut().enumerate() {
        // SAFETY: the lanes of `masks[i]` are `16·i..min(16·i + 16, ev)` of `y`.
        *a = unsafe { _mm512_maskz_loadu_ps(masks[i], y.as_ptr().add(16 * i)) };
    }
    for (j, &pj) in p.iter().enumerate() {
        let pv = _mm512_set1_ps(pj);
        let r = v[off + j * rs..].as_ptr();
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: lanes of row `j` within its `ev` elements (in bounds: the caller).
            *a = _mm512_fmadd_ps(pv, unsafe { T::load16(r.add(16 * i), masks[i]) }, *a);
        }
    }
    for (i, a) in acc.iter().enumerate() {
        // SAFETY: as the loads above.
        unsafe { _mm512_mask_storeu_ps(y.as_mut_ptr().add(16 * i), masks[i], *a) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.754 + seed).sin() * 3.0)
            .collect()
    }

    /// Both kernels against float64 sums, over head dims around the 16 lanes and the 128 held
    /// lanes, key counts around the groups of four, strided rows from an offset, f32 and bf16.
    #[test]
    fn dots_and_accumulate_match_f64() {
        if !super::super::use_avx512() {
            return;
        }
        for e in [1, 15, 16, 33, 128, 129, 200, 300] {
            for n in [1, 3, 4, 5, 13] {
                let (off, rs) = (7, e + 5);
                let data = values(off + n * rs, 0.3);
                let bf: Vec<half::bf16> = data.iter().map(|&x| half::bf16::from_f32(x)).collect();
                let hf: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                let wide: Vec<f32> = bf.iter().map(|b| b.to_f32()).collect();
                let wide16: Vec<f32> = hf.iter().map(|b| b.to_f32()).collect();
                // SAFETY (here and below): the CPU has AVX-512F, BW and VL (checked above).
                let mut w = vec![f32::NAN; data.len()];
                unsafe { widen(&hf, &mut w) };
                assert_eq!(w, wide16, "widened f16");
                unsafe { widen(&bf, &mut w) };
                assert_eq!(w, wide, "widened bf16");
                let x = values(e, 1.1);
                let p = values(n, 2.2);
                let y0 = values(e, 3.3);
                for (name, rows) in [("f32", &data), ("f16", &wide16), ("bf16", &wide)] {
                    let (mut out, mut y) = (vec![f32::NAN; n], y0.clone());
                    unsafe {
                        match name {
                            "f32" => {
                                dots(&x, &data, off, rs, &mut out);
                                accumulate(&p, &data, off, rs, &mut y);
                            }
                            "f16" => {
                                dots(&x, &hf, off, rs, &mut out);
                                accumulate(&p, &hf, off, rs, &mut y);
                            }
                            _ => {
                                dots(&x, &bf, off, rs, &mut out);
                                accumulate(&p, &bf, off, rs, &mut y);
                            }
                        }
                    }
                    let row = |j: usize| &rows[off + j * rs..][..e];
                    for (j, &got) in out.iter().enumerate() {
                        let want: f64 = row(j)
                            .iter()
                            .zip(&x)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum();
                        assert!(
                            (got as f64 - want).abs() < 1e-5 * (e as f64),
                            "{name} dots e={e} n={n} j={j}"
                        );
                    }
                    for (c, &got) in y.iter().enumerate() {
                        let want = y0[c] as f64
                            + (0..n).map(|j| p[j] as f64 * row(j)[c] as f64).sum::<f64>();
                        assert!(
                            (got as f64 - want).abs() < 1e-5 * (n as f64),
                            "{name} acc e={e} n={n} c={c}"
                        );
                    }
                }
            }
        }
    }
}
