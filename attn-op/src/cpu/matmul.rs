//! Bounds-checked strided matrix products: an AVX-512 register-blocked kernel where the CPU has
//! it, the `gemm` crate elsewhere.
//!
//! The attention tiles are small (tens to hundreds of rows) and each product's right-hand side
//! has contiguous rows, so a kernel that broadcasts left-hand elements and streams right-hand
//! rows (`C[i, :] += A[i, p] · B[p, :]`) needs no packing and reaches most of the FMA peak.

use gemm::Parallelism;

/// A strided view of a matrix: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A matrix whose rows (stride `rs`) are contiguous.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Columns `[c, c + n)` (no copy).
    pub fn cols_from(self, c: usize, n: usize) -> Self {
        Self {
            data: &self.data[c * self.cs..],
            cols: n,
            ..self
        }
    }

    /// Rows `[r, r + n)` (no copy).
    pub fn rows_from(self, r: usize, n: usize) -> Self {
        Self {
            data: &self.data[r * self.rs..],
            rows: n,
            ..self
        }
    }

    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// Copies the transpose of `m` into `out` (`m.cols × m.rows`, contiguous rows) and returns a
/// view of it: right-hand sides of products are read fastest with contiguous rows. `out` is
/// scratch: it is resized (zero-filled) only when its length changes, since every element is
/// overwritten.
pub(crate) fn transpose_into<'a>(m: MatRef, out: &'a mut Vec<f32>) -> MatRef<'a> {
    transpose_scaled_into(m, 1.0, out)
}

/// [`transpose_into`] with every element multiplied by `factor` on the way (a multiply per 16
/// elements copied, where a product's epilogue would spend one per 16 of its outputs).
pub(crate) fn transpose_scaled_into<'a>(
    m: MatRef,
    factor: f32,
    out: &'a mut Vec<f32>,
) -> MatRef<'a> {
    assert!(m.in_bounds(), "transpose: matrix out of bounds");
    if out.len() != m.rows * m.cols {
        out.clear();
        out.resize(m.rows * m.cols, 0.0);
    }
    #[cfg(target_arch = "x86_64")]
    if m.cs == 1 && super::use_avx512() {
        // SAFETY: the CPU has AVX-512F; `m` is in bounds (asserted) and `out` holds its
        // transpose.
        unsafe { avx512::transpose(m, factor, out) };
        return MatRef::rows(out, m.cols, m.rows, m.rows);
    }
    for r in 0..m.rows {
        let dst = out[r..].iter_mut().step_by(m.rows);
        if m.cs == 1 {
            // Contiguous source rows: no index arithmetic or bounds check per element.
            let src = &m.data[r * m.rs..r * m.rs + m.cols];
            dst.zip(src).for_each(|(o, &v)| *o = v * factor);
        } else {
            let src = &m.data[r * m.rs..];
            dst.zip(src.iter().step_by(m.cs))
                .take(m.cols)
                .for_each(|(o, &v)| *o = v * factor);
        }
    }
    MatRef::rows(out, m.cols, m.rows, m.rows)
}

/// `dst = beta * lhs · rhs`, or `dst += beta * lhs · rhs` when `accumulate`; `dst` is
/// `lhs.rows × rhs.cols` with row stride `dst_rs`.
pub(crate) fn gemm(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: MatRef,
    rhs: MatRef,
    accumulate: bool,
    beta: f32,
) {
    if !checked(dst, dst_rs, lhs, rhs, accumulate) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if rhs.cs == 1 && super::use_avx512() {
        // SAFETY: the CPU has AVX-512F, and every index the kernel touches was checked against
        // its slice above (masked loads and stores touch only the `n` columns).
        unsafe { avx512::gemm(dst, dst_rs, lhs, rhs, accumulate, beta) };
        return;
    }
    portable(dst, dst_rs, lhs, rhs, accumulate, beta);
}

/// [`gemm`] on bf16 pairs (`super::bf16_pairs`): each element of `lhs` and `rhs` holds two bf16,
/// those of `lhs` consecutive along its rows and those of `rhs` along its columns, so the
/// product runs over twice `lhs.cols` bf16 with f32 sums (AVX512_BF16's `vdpbf16ps`, which
/// flushes subnormal inputs and results to zero).
///
/// # Safety
/// The CPU must have AVX-512F and AVX512_BF16 ([`super::bf16_pairs::available`]).
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn gemm_bf16_pairs(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: MatRef,
    rhs: MatRef,
    accumulate: bool,
    beta: f32,
) {
    assert!(
        rhs.cs == 1,
        "gemm_bf16_pairs: right-hand rows must be contiguous"
    );
    if checked(dst, dst_rs, lhs, rhs, accumulate) {
        // SAFETY: the caller vouches for the CPU; the indices were checked above.
        unsafe { avx512::gemm_bf16_pairs(dst, dst_rs, lhs, rhs, accumulate, beta) };
    }
}

/// Checks that the product's operands and destination cover its indices (panics otherwise) and
/// handles the empty products: returns whether there is anything left to compute.
fn checked(dst: &mut [f32], dst_rs: usize, lhs: MatRef, rhs: MatRef, accumulate: bool) -> bool {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(
        rhs.rows == k && lhs.in_bounds() && rhs.in_bounds(),
        "gemm: operand out of bounds"
    );
    if m == 0 || n == 0 {
        return false;
    }
    assert!(
        (m - 1) * dst_rs + n <= dst.len(),
        "gemm: destination out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return false;
    }
    true
}

/// The product by the `gemm` crate, for CPUs without AVX-512 (arguments checked by [`gemm`]).
fn portable(dst: &mut [f32], dst_rs: usize, lhs: MatRef, rhs: MatRef, accumulate: bool, beta: f32) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    // SAFETY: every index the product touches was checked against its slice above, and `dst` is
    // borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::lanes;
    use super::MatRef;

    /// Rows per register block.
    const MR: usize = 6;
    /// Columns per register block: four 16-lane vectors.
    const NR: usize = 64;

    /// `out` (`m.cols × m.rows`, contiguous rows) = `factor` × the transpose of `m`, by blocks of 16 × 16
    /// transposed in registers (four rounds of shuffles) instead of one strided store per
    /// element.
    ///
    /// # Safety
    /// AVX-512F must be available; `m` must be in bounds with `m.cs == 1`, and `out` at least
    /// `m.rows · m.cols` long.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose(m: MatRef, factor: f32, out: &mut [f32]) {
        let f = _mm512_set1_ps(factor);
        assert!(m.cs == 1 && out.len() >= m.rows * m.cols);
        let (src, dst) = (m.data.as_ptr(), out.as_mut_ptr());
        for r0 in (0..m.rows).step_by(16) {
            let nr = (m.rows - r0).min(16);
            for c0 in (0..m.cols).step_by(16) {
                let nc = (m.cols - c0).min(16);
                let cm = lanes(nc);
                // Rows past the matrix's end read as zeros and are never stored.
                // SAFETY: lanes `c0..c0 + nc` of rows `r0..r0 + nr`, in bounds (the caller).
                let r: [__m512; 16] = std::array::from_fn(|i| {
                    if i < nr {
                        unsafe { _mm512_maskz_loadu_ps(cm, src.add((r0 + i) * m.rs + c0)) }
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                // Pairs of rows interleaved by 32 and 64 bits: t[4g + c] holds rows 4g..4g+4
                // of columns c, c + 4, c + 8, c + 12 (one per 128-bit lane).
                let mut u = [_mm512_setzero_ps(); 16];
                for g in 0..4 {
                    let (a, b, c, d) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
                    let (lo0, hi0) = (_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
                    let (lo1, hi1) = (_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
                    let pd = |x: __m512, y: __m512, hi: bool| {
                        let (x, y) = (_mm512_castps_pd(x), _mm512_castps_pd(y));
                        _mm512_castpd_ps(if hi {
                            _mm512_unpackhi_pd(x, y)
                        } else {
                            _mm512_unpacklo_pd(x, y)
                        })
                    };
                    u[4 * g] = pd(lo0, lo1, false);
                    u[4 * g + 1] = pd(lo0, lo1, true);
                    u[4 * g + 2] = pd(hi0, hi1, false);
                    u[4 * g + 3] = pd(hi0, hi1, true);
                }
                for c in 0..4 {
                    // Lanes 0, 2 / 1, 3 of groups 0-1 and of groups 2-3, then those merged.
                    let v0 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
                    let w0 = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
                    let v1 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
                    let w1 = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
                    let cols = [
                        (c, _mm512_shuffle_f32x4::<0x88>(v0, v1)),
                        (c + 8, _mm512_shuffle_f32x4::<0xdd>(v0, v1)),
                        (c + 4, _mm512_shuffle_f32x4::<0x88>(w0, w1)),
                        (c + 12, _mm512_shuffle_f32x4::<0xdd>(w0, w1)),
                    ];
                    for (col, x) in cols {
                        if col < nc {
                            // SAFETY: output row `c0 + col`, lanes `r0..r0 + nr`, in `out`.
                            unsafe {
                                _mm512_mask_storeu_ps(
                                    dst.add((c0 + col) * m.rows + r0),
                                    lanes(nr),
                                    _mm512_mul_ps(f, x),
                                )
                            };
                        }
                    }
                }
            }
        }
    }

    /// One `R × (16·V)` block of the product (the last vector masked to `nr` columns).
    struct Block {
        k: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        b_rs: usize,
        c: *mut f32,
        c_rs: usize,
        nr: usize,
        accumulate: bool,
        beta: f32,
    }

    /// A blocked product kernel: `$gemm` splits the product into `Block`s of at most `MR × NR`,
    /// `$run` computes one, with `$step(acc, a, b)` adding one broadcast left-hand element `a`
    /// times one right-hand row vector `b` into `acc`. One body serves the f32 products and the
    /// bf16-pair ones, whose functions need different target features.
    macro_rules! blocked_kernel {
        ($gemm:ident, $run:ident, $feat:literal, |$acc:ident, $a:ident, $b:ident| $step:expr) => {
            /// # Safety
            /// The CPU must have the function's target features; `lhs`, `rhs` and `dst` (with
            /// `dst_rs`) must cover the product's indices and `rhs.cs == 1`.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $gemm(
                dst: &mut [f32],
                dst_rs: usize,
                lhs: MatRef,
                rhs: MatRef,
                accumulate: bool,
                beta: f32,
            ) {
                let (m, n) = (lhs.rows, rhs.cols);
                let c = dst.as_mut_ptr();
                let mut j = 0;
                while j < n {
                    let nr = (n - j).min(NR);
                    let mut i = 0;
                    while i < m {
                        let mr = (m - i).min(MR);
                        let blk = Block {
                            k: lhs.cols,
                            a: lhs.data.as_ptr().add(i * lhs.rs),
                            a_rs: lhs.rs,
                            a_cs: lhs.cs,
                            b: rhs.data.as_ptr().add(j),
                            b_rs: rhs.rs,
                            c: c.add(i * dst_rs + j),
                            c_rs: dst_rs,
                            nr,
                            accumulate,
                            beta,
                        };
                        match (mr, nr.div_ceil(16)) {
                            (6, 4) => blk.$run::<6, 4>(),
                            (6, 3) => blk.$run::<6, 3>(),
                            (6, 2) => blk.$run::<6, 2>(),
                            (6, _) => blk.$run::<6, 1>(),
                            (5, 4) => blk.$run::<5, 4>(),
                            (5, 3) => blk.$run::<5, 3>(),
                            (5, 2) => blk.$run::<5, 2>(),
                            (5, _) => blk.$run::<5, 1>(),
                            (4, 4) => blk.$run::<4, 4>(),
                            (4, 3) => blk.$run::<4, 3>(),
                            (4, 2) => blk.$run::<4, 2>(),
                            (4, _) => blk.$run::<4, 1>(),
                            (3, 4) => blk.$run::<3, 4>(),
                            (3, 3) => blk.$run::<3, 3>(),
                            (3, 2) => blk.$run::<3, 2>(),
                            (3, _) => blk.$run::<3, 1>(),
                            (2, 4) => blk.$run::<2, 4>(),
                            (2, 3) => blk.$run::<2, 3>(),
                            (2, 2) => blk.$run::<2, 2>(),
                            (2, _) => blk.$run::<2, 1>(),
                            (_, 4) => blk.$run::<1, 4>(),
                            (_, 3) => blk.$run::<1, 3>(),
                            (_, 2) => blk.$run::<1, 2>(),
                            (_, _) => blk.$run::<1, 1>(),
                        }
                        i += MR;
                    }
                    j += NR;
                }
            }

            impl Block {
                #[target_feature(enable = $feat)]
                unsafe fn $run<const R: usize, const V: usize>(&self) {
                    let mut mask = [0 as __mmask16; V];
                    for (v, m) in mask.iter_mut().enumerate() {
                        let lanes = self.nr.saturating_sub(16 * v).min(16);
                        *m = ((1u32 << lanes) - 1) as __mmask16;
                    }
                    let mut acc = [[_mm512_setzero_ps(); V]; R];
                    for p in 0..self.k {
                        let bp = self.b.add(p * self.b_rs);
                        let mut bv = [_mm512_setzero_ps(); V];
                        for v in 0..V {
                            bv[v] = _mm512_maskz_loadu_ps(mask[v], bp.add(16 * v));
                        }
                        let ap = self.a.add(p * self.a_cs);
                        for (r, acc_r) in acc.iter_mut().enumerate() {
                            let av = _mm512_set1_ps(*ap.add(r * self.a_rs));
                            for v in 0..V {
                                let ($acc, $a, $b) = (acc_r[v], av, bv[v]);
                                acc_r[v] = $step;
                            }
                        }
                    }
                    // Without a multiplier the epilogue leaves the FMA pipes to the products.
                    let (unit, beta) = (self.beta == 1.0, _mm512_set1_ps(self.beta));
                    for (r, acc_r) in acc.iter().enumerate() {
                        let cp = self.c.add(r * self.c_rs);
                        for v in 0..V {
                            let out = match (self.accumulate, unit) {
                                (true, true) => _mm512_add_ps(
                                    acc_r[v],
                                    _mm512_maskz_loadu_ps(mask[v], cp.add(16 * v)),
                                ),
                                (true, false) => _mm512_fmadd_ps(
                                    acc_r[v],
                                    beta,
                                    _mm512_maskz_loadu_ps(mask[v], cp.add(16 * v)),
                                ),
                                (false, true) => acc_r[v],
                                (false, false) => _mm512_mul_ps(acc_r[v], beta),
                            };
                            _mm512_mask_storeu_ps(cp.add(16 * v), mask[v], out);
                        }
                    }
                }
            }
        };
    }

    blocked_kernel!(gemm, run, "avx512f", |acc, a, b| _mm512_fmadd_ps(a, b, acc));
    // Each 32-bit element holds a pair of bf16 (the even index in the low half): `vdpbf16ps`
    // adds both products of a pair into one f32 lane, twice the f32 FMA's work per instruction.
    // (The pairs travel in `f32` bit patterns; loads, broadcasts and stores keep the bits.)
    blocked_kernel!(
        gemm_bf16_pairs,
        run_bf16_pairs,
        "avx512f,avx512bf16",
        |acc, a, b| _mm512_dpbf16_ps(
            acc,
            std::mem::transmute::<__m512, __m512bh>(a),
            std::mem::transmute::<__m512, __m512bh>(b)
        )
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        m: usize,
        k: usize,
        n: usize,
        lhs_t: bool,
        kernel: fn(&mut [f32], usize, MatRef, MatRef, bool, f32),
    ) {
        let a: Vec<f32> = (0..m * k * 3 + 5)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let b: Vec<f32> = (0..k * n * 2 + 7)
            .map(|i| (i as f32 * 0.11).cos())
            .collect();
        let lhs = if lhs_t {
            MatRef::rows(&a, k, m, m + 2).t()
        } else {
            MatRef::rows(&a, m, k, k + 1)
        };
        let rhs = MatRef::rows(&b, k, n, n + 3);
        let dst_rs = n + 1;
        let mut dst: Vec<f32> = (0..m * dst_rs).map(|i| i as f32).collect();
        let before = dst.clone();
        kernel(&mut dst, dst_rs, lhs, rhs, true, 0.5);
        for r in 0..m {
            for c in 0..n {
                let dot: f32 = (0..k)
                    .map(|p| lhs.data[r * lhs.rs + p * lhs.cs] * rhs.data[p * rhs.rs + c])
                    .sum();
                let want = before[r * dst_rs + c] + 0.5 * dot;
                assert!(
                    (dst[r * dst_rs + c] - want).abs() < 1e-3,
                    "{m}x{k}x{n} ({r}, {c})"
                );
            }
            assert_eq!(
                dst[r * dst_rs + n],
                before[r * dst_rs + n],
                "column past n untouched"
            );
        }
    }

    #[test]
    fn products_match_loops() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 5, 17),
            (13, 64, 64),
            (6, 3, 130),
            (64, 32, 80),
            (5, 0, 3),
        ] {
            for kernel in [gemm, portable] {
                check(m, k, n, false, kernel);
                check(m, k, n, true, kernel);
            }
        }
    }

    #[test]
    fn transposed_copy() {
        let a: Vec<f32> = (0..4000).map(|i| i as f32).collect();
        // One scratch buffer through every shape: stale contents must all be overwritten.
        let mut buf = vec![f32::NAN; 7];
        for &(rows, cols) in &[
            (3, 4),
            (8, 8),
            (17, 11),
            (64, 32),
            (9, 24),
            (64, 32),
            (33, 40),
            (1, 1),
        ] {
            for (rs, cs) in [(cols + 3, 1), (1, rows + 2)] {
                let m = MatRef {
                    data: &a,
                    rows,
                    cols,
                    rs,
                    cs,
                };
                // Alternately plain and scaled (by a power of two: exact).
                let factor = if (rows + cs) % 2 == 0 { 1.0 } else { 0.25 };
                let t = transpose_scaled_into(m, factor, &mut buf);
                assert_eq!((t.rows, t.cols, t.rs), (cols, rows, rows));
                for r in 0..rows {
                    for c in 0..cols {
                        let want = factor * a[r * rs + c * cs];
                        assert_eq!(t.data[c * rows + r], want, "{rows}x{cols}");
                    }
                }
            }
        }
    }
}
