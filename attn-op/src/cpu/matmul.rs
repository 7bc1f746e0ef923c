//! Bounds-checked strided matrix products on top of the `gemm` crate.

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

    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
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
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(
        rhs.rows == k && lhs.in_bounds() && rhs.in_bounds(),
        "gemm: operand out of bounds"
    );
    if m == 0 || n == 0 {
        return;
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
        return;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_product_matches_loops() {
        let a: Vec<f32> = (0..40).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..40).map(|i| (i as f32).cos()).collect();
        let lhs = MatRef::rows(&a, 3, 4, 10); // 3×4 with row stride 10
        let rhs = MatRef::rows(&b, 5, 4, 8).t(); // 4×5, transposed view
        let mut dst = vec![1.0f32; 3 * 6];
        gemm(&mut dst, 6, lhs, rhs, true, 2.0);
        for r in 0..3 {
            for c in 0..5 {
                let want: f32 =
                    1.0 + 2.0 * (0..4).map(|k| a[r * 10 + k] * b[c * 8 + k]).sum::<f32>();
                assert!((dst[r * 6 + c] - want).abs() < 1e-4, "{r} {c}");
            }
            assert_eq!(dst[r * 6 + 5], 1.0);
        }
    }
}
