//! The CPU implementation shared by the flash and efficient ops: FlashAttention-2's tiled
//! forward and backward, parallel with rayon, f32 arithmetic whatever the input dtype, except the
//! matrix products of bf16 inputs where `bf16_pairs::available` (bf16 pairs, f32 sums).

pub(crate) mod backward;
#[cfg(target_arch = "x86_64")]
mod bf16_pairs;
#[cfg(target_arch = "x86_64")]
mod decode_avx512;
pub(crate) mod forward;
mod matmul;
#[cfg(target_arch = "x86_64")]
pub(crate) mod scores_avx512;
pub(crate) mod simd;
#[cfg(target_arch = "x86_64")]
mod softmax_avx512;

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result};
use half::slice::HalfFloatSliceExt;

use matmul::MatRef;

/// Whether to use the AVX-512 kernels (products, softmax rows, score transforms, decoding): the
/// CPU has AVX-512F, BW and VL (every AVX-512 CPU but the Xeon Phi) and `ATTN_OP_PORTABLE` is not
/// set (that variable selects the portable code, so that it can be tested on any machine).
#[cfg(target_arch = "x86_64")]
pub(crate) fn use_avx512() -> bool {
    static USE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USE.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::env::var_os("ATTN_OP_PORTABLE").is_none()
    })
}

/// The AVX-512 mask of the first `n` (at most 16) lanes, for the kernels' row tails.
#[cfg(target_arch = "x86_64")]
#[inline]
fn lanes(n: usize) -> std::arch::x86_64::__mmask16 {
    ((1u32 << n.min(16)) - 1) as std::arch::x86_64::__mmask16
}

/// f16 widened to f32: AVX-512 where [`use_avx512`], else `half`'s conversion.
fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx512() {
        // SAFETY: the CPU has AVX-512F, BW and VL.
        return unsafe { decode_avx512::widen(src, dst) };
    }
    src.convert_to_f32_slice(dst)
}

/// bf16 widened to f32: AVX-512 where [`use_avx512`], else the portable [`simd::bf16_to_f32`].
fn widen_bf16(src: &[half::bf16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx512() {
        // SAFETY: the CPU has AVX-512F, BW and VL.
        return unsafe { decode_avx512::widen(src, dst) };
    }
    simd::bf16_to_f32(src, dst)
}

/// A tensor's elements as f32, borrowed for f32 storage and converted whole for f16/bf16, for
/// callers that need every element as f32 at once (masks, the backward's output rows).
/// `at(off)` takes the storage offsets of the tensor's layout.
pub(crate) struct Whole<'a> {
    data: Cow<'a, [f32]>,
    base: usize,
}

/// The storage range `[lo, hi)` a layout can touch.
fn span(l: &Layout) -> (usize, usize) {
    let lo = l.start_offset();
    if l.dims().contains(&0) {
        return (lo, lo);
    }
    let hi = lo
        + 1
        + l.dims()
            .iter()
            .zip(l.stride())
            .map(|(d, s)| (d - 1) * s)
            .sum::<usize>();
    (lo, hi)
}

impl<'a> Whole<'a> {
    pub fn new(s: &'a CpuStorage, l: &Layout) -> Result<Self> {
        let (lo, hi) = span(l);
        let data = match s {
            CpuStorage::F32(v) => Cow::Borrowed(&v[lo..hi]),
            CpuStorage::F16(v) => {
                let mut out = vec![0f32; hi - lo];
                widen_f16(&v[lo..hi], &mut out);
                Cow::Owned(out)
            }
            CpuStorage::BF16(v) => {
                let mut out = vec![0f32; hi - lo];
                widen_bf16(&v[lo..hi], &mut out);
                Cow::Owned(out)
            }
            other => bail!("{}", unsupported(other.dtype())),
        };
        Ok(Self { data, base: lo })
    }

    /// The elements from storage offset `off` on.
    #[inline]
    pub fn at(&self, off: usize) -> &[f32] {
        &self.data[off - self.base..]
    }
}

/// The error text for a dtype the fused CPU ops do not take.
pub(crate) fn unsupported(dtype: DType) -> String {
    format!("attention: dtype {dtype:?} is not supported by the fused CPU ops (f32, f16, bf16)")
}

/// An input of the kernels, read as f32 rows: f32 storage in place, f16 and bf16 converted a tile
/// at a time into the kernel's scratch, so no f32 copy of the whole tensor is made. Offsets are
/// storage offsets.
#[derive(Clone, Copy)]
pub(crate) enum Src<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    BF16(&'a [half::bf16]),
}

impl<'a> Src<'a> {
    pub fn new(s: &'a CpuStorage) -> Result<Self> {
        Ok(match s {
            CpuStorage::F32(v) => Src::F32(v),
            CpuStorage::F16(v) => Src::F16(v),
            CpuStorage::BF16(v) => Src::BF16(v),
            other => bail!("{}", unsupported(other.dtype())),
        })
    }

    /// f32 elements whose storage offsets are their indices.
    pub fn borrowed(data: &'a [f32]) -> Self {
        Src::F32(data)
    }

    /// `rows` rows of `cols` elements, row `r` starting at storage offset `off + r·rs`, as an
    /// f32 matrix: in place for f32, converted into `buf` (contiguous rows) for f16 and bf16.
    pub fn rows<'s>(
        &'s self,
        off: usize,
        rows: usize,
        cols: usize,
        rs: usize,
        buf: &'s mut Vec<f32>,
    ) -> MatRef<'s> {
        fn convert<T>(
            d: &[T],
            off: usize,
            rows: usize,
            cols: usize,
            rs: usize,
            buf: &mut Vec<f32>,
            f: impl Fn(&[T], &mut [f32]),
        ) {
            if buf.len() < rows * cols {
                buf.resize(rows * cols, 0.0);
            }
            for (r, out) in buf.chunks_exact_mut(cols.max(1)).take(rows).enumerate() {
                f(&d[off + r * rs..][..cols], out);
            }
        }
        match *self {
            Src::F32(d) => return MatRef::rows(&d[off..], rows, cols, rs),
            Src::F16(d) => convert(d, off, rows, cols, rs, buf, widen_f16),
            Src::BF16(d) => convert(d, off, rows, cols, rs, buf, widen_bf16),
        }
        MatRef::rows(buf, rows, cols, cols)
    }
}

impl Src<'_> {
    /// Asks the caches (L2) for `rows` rows of `cols` elements from storage offset `off` (row
    /// stride `rs`) ahead of their use; a hint only, clipped to the storage, no effect on results.
    pub fn prefetch(&self, off: usize, rows: usize, cols: usize, rs: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
            let (ptr, size, len) = match *self {
                Src::F32(d) => (d.as_ptr().cast::<i8>(), 4, d.len()),
                Src::F16(d) => (d.as_ptr().cast::<i8>(), 2, d.len()),
                Src::BF16(d) => (d.as_ptr().cast::<i8>(), 2, d.len()),
            };
            for r in 0..rows {
                let start = off + r * rs;
                if start >= len {
                    break;
                }
                let bytes = cols.min(len - start) * size;
                for line in (0..bytes).step_by(64) {
                    // SAFETY: SSE is part of x86-64; a prefetch never faults, and the address
                    // is inside the storage anyway (clipped above).
                    unsafe { _mm_prefetch::<_MM_HINT_T1>(ptr.wrapping_add(start * size + line)) };
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (off, rows, cols, rs);
    }

    /// `out[j] = x · k_j` for the rows `k_j` (`x.len()` elements from storage offset
    /// `off + j·rs`), `j < out.len()`: one query row against keys read once, as decoding does.
    /// With AVX-512 every dtype is widened as it is read (`decode_avx512`); otherwise bf16 keys
    /// are, and f16 keys are converted into `buf` first.
    pub fn dots(&self, off: usize, rs: usize, x: &[f32], out: &mut [f32], buf: &mut Vec<f32>) {
        let e = x.len();
        #[cfg(target_arch = "x86_64")]
        if use_avx512() {
            // SAFETY: the CPU has AVX-512F, BW and VL.
            return match *self {
                Src::F32(d) => unsafe { decode_avx512::dots(x, d, off, rs, out) },
                Src::F16(d) => unsafe { decode_avx512::dots(x, d, off, rs, out) },
                Src::BF16(d) => unsafe { decode_avx512::dots(x, d, off, rs, out) },
            };
        }
        match *self {
            Src::F32(d) => {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = simd::dot(x, &d[off + j * rs..][..e]);
                }
            }
            Src::BF16(d) => {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = simd::dot_bf16(x, &d[off + j * rs..][..e]);
                }
            }
            Src::F16(_) => {
                let k = self.rows(off, out.len(), e, rs, buf);
                for (j, o) in out.iter_mut().enumerate() {
                    *o = simd::dot(x, &k.data[j * k.rs..][..e]);
                }
            }
        }
    }

    /// `y += Σ_j p[j]·v_j` for the rows `v_j` (`y.len()` elements from storage offset
    /// `off + j·rs`), `j < p.len()`: one row of probabilities times values read once. With
    /// AVX-512 the output row stays in registers and every dtype is widened as it is read
    /// (`decode_avx512`); otherwise bf16 values are, and f32 and f16 go through the matrix kernel.
    pub fn accumulate(&self, off: usize, rs: usize, p: &[f32], y: &mut [f32], buf: &mut Vec<f32>) {
        let ev = y.len();
        #[cfg(target_arch = "x86_64")]
        if use_avx512() {
            // SAFETY: the CPU has AVX-512F, BW and VL.
            return match *self {
                Src::F32(d) => unsafe { decode_avx512::accumulate(p, d, off, rs, y) },
                Src::F16(d) => unsafe { decode_avx512::accumulate(p, d, off, rs, y) },
                Src::BF16(d) => unsafe { decode_avx512::accumulate(p, d, off, rs, y) },
            };
        }
        if let Src::BF16(d) = *self {
            for (j, &pj) in p.iter().enumerate() {
                simd::axpy_bf16(pj, &d[off + j * rs..][..ev], y);
            }
            return;
        }
        let v = self.rows(off, p.len(), ev, rs, buf);
        matmul::gemm(y, ev, MatRef::rows(p, 1, p.len(), p.len()), v, true, 1.0);
    }
}

/// An output element type of the kernels: rows are computed in f32 and stored once, converted.
pub(crate) trait OutElem: Copy + Send + Sync {
    /// `dst = src` converted (rounding to nearest even).
    fn store(src: &[f32], dst: &mut [Self]);

    /// `dst = factor · src` converted (`src` is scratch, scaled in place where that is how).
    fn store_scaled(src: &mut [f32], factor: f32, dst: &mut [Self]) {
        simd::scale(src, factor);
        Self::store(src, dst);
    }
}

impl OutElem for f32 {
    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    /// One pass where scaling and copying would take two.
    fn store_scaled(src: &mut [f32], factor: f32, dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src.iter()) {
            *d = factor * *s;
        }
    }
}

impl OutElem for half::f16 {
    fn store(src: &[f32], dst: &mut [half::f16]) {
        dst.convert_from_f32_slice(src);
    }
}

impl OutElem for half::bf16 {
    fn store(src: &[f32], dst: &mut [half::bf16]) {
        simd::f32_to_bf16(src, dst);
    }
}

/// An attention mask read through its (broadcast) strides.
pub(crate) enum MaskSrc<'a> {
    /// Added to the scaled scores.
    Bias(Whole<'a>),
    /// Zero means "may not attend".
    Bool(&'a [u8]),
}

impl<'a> MaskSrc<'a> {
    pub fn new(s: &'a CpuStorage, l: &Layout) -> Result<Self> {
        match s {
            CpuStorage::U8(v) => Ok(MaskSrc::Bool(v)),
            _ => Ok(MaskSrc::Bias(Whole::new(s, l)?)),
        }
    }

    /// Applies the mask elements `off + j * cs` to `row[j]`.
    #[inline]
    pub fn apply(&self, off: usize, cs: usize, row: &mut [f32]) {
        match self {
            MaskSrc::Bias(b) => {
                let m = b.at(off);
                if cs == 1 {
                    simd::add(row, &m[..row.len()]);
                } else {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v += m[j * cs];
                    }
                }
            }
            MaskSrc::Bool(b) => {
                for (j, v) in row.iter_mut().enumerate() {
                    if b[off + j * cs] == 0 {
                        *v = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
}

/// Splits `buf` (rows of `width` elements) into the disjoint row ranges `(start, len)`,
/// returned in the order given.
pub(crate) fn split_rows<'a, T>(
    buf: &'a mut [T],
    width: usize,
    ranges: &[(usize, usize)],
) -> Vec<&'a mut [T]> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| ranges[i].0);
    let mut out: Vec<Option<&'a mut [T]>> = (0..ranges.len()).map(|_| None).collect();
    let mut rest = buf;
    let mut pos = 0;
    for i in order {
        let (start, len) = ranges[i];
        assert!(start >= pos, "split_rows: overlapping row ranges");
        let (_, tail) = rest.split_at_mut((start - pos) * width);
        let (mine, tail) = tail.split_at_mut(len * width);
        out[i] = Some(mine);
        rest = tail;
        pos = start + len;
    }
    out.into_iter().map(|s| s.unwrap_or_default()).collect()
}
