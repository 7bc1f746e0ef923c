//! Matrix products on strided views of f32 slices, cut into blocks of output rows that run on
//! rayon's pool: the building blocks of the fused Linear, MLP and attention ops. Each block is
//! one single-threaded call of the `gemm` crate, which computes each output element by the same
//! sequence of operations however the rows are cut, so results are the same bits on one thread
//! or many.

use std::mem::MaybeUninit;

use candle_core::Result;
use gemm::Parallelism;
use rayon::prelude::*;

use super::cpu_data::assume_written;

/// A strided `rows × cols` matrix in a slice: element `(i, j)` is `data[i·rs + j·cs]`. Every
/// constructor checks that the last element lies inside `data`, which is what makes the `gemm`
/// calls below sound.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    pub(crate) fn new(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        rs: usize,
        cs: usize,
    ) -> Result<Self> {
        let fits = rows == 0
            || cols == 0
            || (rows - 1)
                .checked_mul(rs)
                .and_then(|a| (cols - 1).checked_mul(cs).and_then(|b| a.checked_add(b)))
                .is_some_and(|last| last < data.len());
        if !fits {
            candle_core::bail!(
                "linear: a {rows}×{cols} matrix with strides ({rs}, {cs}) does not fit in {} elements",
                data.len()
            );
        }
        Ok(Self {
            data,
            rows,
            cols,
            rs,
            cs,
        })
    }

    /// A contiguous row-major matrix.
    pub(crate) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            candle_core::bail!("linear: {} elements for a {rows}×{cols} matrix", data.len());
        }
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transpose (no copy).
    pub(crate) fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Rows `start..start + len`.
    pub(crate) fn rows(self, start: usize, len: usize) -> Result<Self> {
        if start + len > self.rows {
            candle_core::bail!("linear: rows {start}..{} of {}", start + len, self.rows);
        }
        if len == 0 {
            return Self::new(&self.data[..0], 0, self.cols, self.rs, self.cs);
        }
        Self::new(
            &self.data[start * self.rs..],
            len,
            self.cols,
            self.rs,
            self.cs,
        )
    }
}

/// `(m, k, n)` of `a · b` into a row-major destination of `dst_len` elements, checked.
fn product_dims(dst_len: usize, a: View, b: View) -> Result<(usize, usize, usize)> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || dst_len != m * n {
        candle_core::bail!(
            "linear: cannot multiply {m}×{k} by {}×{n} into {dst_len} elements",
            b.rows
        );
    }
    Ok((m, k, n))
}

/// `dst = a · b` (or `dst += a · b` when `read_dst`) through raw `dst`, on the calling thread.
///
/// # Safety
///
/// `dst` points to `a.rows · b.cols` writable elements (initialised when `read_dst`) that
/// nothing else accesses during the call.
unsafe fn gemm_raw(dst: *mut f32, a: View, b: View, read_dst: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    // SAFETY: gemm reads lhs elements `a.data[i·a.rs + p·a.cs]` for i < m, p < k, rhs elements
    // `b.data[p·b.rs + j·b.cs]` for p < k, j < n, and writes `dst[i·n + j]` for every i < m,
    // j < n (zeros when k = 0), reading it first only when `read_dst`. `View::new` checked that
    // the last element of each view lies inside its slice, and all strides are non-negative, so
    // every index read is in bounds; the caller vouches for `dst`. The strides fit in `isize`
    // because they index slices, whose lengths do.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            read_dst,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            if read_dst { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// `dst = a · b` into the unwritten row-major `a.rows × b.cols` matrix `dst`, on the calling
/// thread; returns `dst`, now written.
pub(crate) fn matmul_to<'d>(
    dst: &'d mut [MaybeUninit<f32>],
    a: View,
    b: View,
) -> Result<&'d mut [f32]> {
    product_dims(dst.len(), a, b)?;
    // SAFETY: `dst` holds exactly m·n elements and is a unique borrow.
    unsafe { gemm_raw(dst.as_mut_ptr().cast(), a, b, false) };
    // SAFETY: gemm wrote all m·n elements.
    Ok(unsafe { assume_written(dst) })
}

/// `dst += a · b`, `dst` a row-major `a.rows × b.cols` matrix, on the calling thread.
pub(crate) fn matmul_add(dst: &mut [f32], a: View, b: View) -> Result<()> {
    product_dims(dst.len(), a, b)?;
    // SAFETY: `dst` holds exactly m·n initialised elements and is a unique borrow.
    unsafe { gemm_raw(dst.as_mut_ptr(), a, b, true) };
    Ok(())
}

/// `dst = x + a · b`, or `x + keep ⊙ (a · b)` with dropout multipliers `keep`, into the
/// unwritten row-major `a.rows × b.cols` matrix `dst` (`x` and `keep` as long), on the calling
/// thread: a residual connection around a product. With `keep` it is rounded as the composed
/// Candle ops `x + h * keep` round it.
pub(crate) fn residual_matmul(
    dst: &mut [MaybeUninit<f32>],
    x: &[f32],
    a: View,
    b: View,
    keep: Option<&[f32]>,
) -> Result<()> {
    if x.len() != dst.len() || keep.is_some_and(|k| k.len() != dst.len()) {
        candle_core::bail!(
            "linear: a residual of {} elements and {:?} dropout multipliers for {} outputs",
            x.len(),
            keep.map(<[f32]>::len),
            dst.len()
        );
    }
    match keep {
        None => {
            for (slot, &v) in dst.iter_mut().zip(x) {
                slot.write(v);
            }
            // SAFETY: the loop wrote every element of `dst` (`x` is as long).
            matmul_add(unsafe { assume_written(dst) }, a, b)
        }
        Some(keep) => {
            let h = matmul_to(dst, a, b)?;
            for ((h, &x), &k) in h.iter_mut().zip(x).zip(keep) {
                *h = x + *h * k;
            }
            Ok(())
        }
    }
}

/// Rows per block when a product of `rows` output rows is cut into one block per thread of the
/// pool (fewer when a block would have under [`MIN_BLOCK_ROWS`] rows), sizes a multiple of 16
/// except the last. One block per thread rather than more: each block is a separate `gemm`
/// call that packs its operands again (four blocks on two threads were 8% slower per step).
pub(crate) fn row_blocks(rows: usize) -> usize {
    let blocks = (rows / MIN_BLOCK_ROWS).clamp(1, rayon::current_num_threads().max(1));
    (rows.div_ceil(blocks)).next_multiple_of(16).max(1)
}

/// Fewest rows in a block: below this, the per-call packing overhead outweighs a second core.
const MIN_BLOCK_ROWS: usize = 64;

/// Runs `jobs` on rayon's pool (in order on the calling thread when the pool has one thread),
/// returning the first error.
pub(crate) fn run_jobs<'a>(jobs: Vec<Box<dyn FnOnce() -> Result<()> + Send + 'a>>) -> Result<()> {
    if jobs.len() <= 1 || rayon::current_num_threads() <= 1 {
        return jobs.into_iter().try_for_each(|job| job());
    }
    jobs.into_par_iter().map(|job| job()).collect()
}

/// `f(first_row, rows)` for each block of rows of the row-major `out` (`row_len` wide), on
/// rayon's pool.
pub(crate) fn for_row_blocks<T: Send, F>(out: &mut [T], row_len: usize, f: F) -> Result<()>
where
    F: Fn(usize, &mut [T]) -> Result<()> + Sync,
{
    if row_len == 0 || out.is_empty() {
        return Ok(());
    }
    let block = row_blocks(out.len() / row_len);
    let f = &f;
    let jobs = out
        .chunks_mut(block * row_len)
        .enumerate()
        .map(|(i, chunk)| {
            Box::new(move || f(i * block, chunk)) as Box<dyn FnOnce() -> Result<()> + Send>
        })
        .collect();
    run_jobs(jobs)
}

/// Jobs computing `dst = a · b` (`dst` row-major, unwritten) block of rows by block of rows;
/// when they have all returned `Ok`, every element of `dst` is written.
pub(crate) fn product_jobs<'a>(
    dst: &'a mut [MaybeUninit<f32>],
    a: View<'a>,
    b: View<'a>,
) -> Vec<Box<dyn FnOnce() -> Result<()> + Send + 'a>> {
    let n = b.cols;
    if n == 0 || dst.is_empty() {
        return Vec::new();
    }
    let block = row_blocks(a.rows);
    dst.chunks_mut(block * n)
        .enumerate()
        .map(|(i, chunk)| {
            Box::new(move || {
                let rows = chunk.len() / n;
                matmul_to(chunk, a.rows(i * block, rows)?, b).map(drop)
            }) as Box<dyn FnOnce() -> Result<()> + Send + 'a>
        })
        .collect()
}
