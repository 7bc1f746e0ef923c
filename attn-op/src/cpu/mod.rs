//! The CPU implementation shared by the flash and efficient ops: FlashAttention-2's tiled
//! forward and backward, parallel with rayon, f32 arithmetic whatever the input dtype.

pub(crate) mod backward;
pub(crate) mod forward;
pub(crate) mod geometry;
mod matmul;
pub(crate) mod simd;

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result};
use half::slice::HalfFloatSliceExt;

/// A tensor's elements as f32, borrowed for f32 storage and converted for f16/bf16.
/// `at(off)` takes the storage offsets of the tensor's layout.
pub(crate) struct Src<'a> {
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

impl<'a> Src<'a> {
    pub fn new(s: &'a CpuStorage, l: &Layout) -> Result<Self> {
        let (lo, hi) = span(l);
        let data = match s {
            CpuStorage::F32(v) => Cow::Borrowed(&v[lo..hi]),
            CpuStorage::F16(v) => Cow::Owned(v[lo..hi].to_f32_vec()),
            CpuStorage::BF16(v) => {
                let mut out = vec![0f32; hi - lo];
                simd::bf16_to_f32(&v[lo..hi], &mut out);
                Cow::Owned(out)
            }
            other => bail!(
                "attention: dtype {:?} is not supported by the fused CPU ops (f32, f16, bf16)",
                other.dtype()
            ),
        };
        Ok(Self { data, base: lo })
    }

    /// f32 elements whose storage offsets are their indices.
    pub fn borrowed(data: &'a [f32]) -> Self {
        Self {
            data: Cow::Borrowed(data),
            base: 0,
        }
    }

    /// The elements from storage offset `off` on.
    #[inline]
    pub fn at(&self, off: usize) -> &[f32] {
        &self.data[off - self.base..]
    }
}

/// An attention mask read through its (broadcast) strides.
pub(crate) enum MaskSrc<'a> {
    /// Added to the scaled scores.
    Bias(Src<'a>),
    /// Zero means "may not attend".
    Bool(&'a [u8]),
}

impl<'a> MaskSrc<'a> {
    pub fn new(s: &'a CpuStorage, l: &Layout) -> Result<Self> {
        match s {
            CpuStorage::U8(v) => Ok(MaskSrc::Bool(v)),
            _ => Ok(MaskSrc::Bias(Src::new(s, l)?)),
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
pub(crate) fn split_rows<'a>(
    buf: &'a mut [f32],
    width: usize,
    ranges: &[(usize, usize)],
) -> Vec<&'a mut [f32]> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| ranges[i].0);
    let mut out: Vec<Option<&'a mut [f32]>> = (0..ranges.len()).map(|_| None).collect();
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
