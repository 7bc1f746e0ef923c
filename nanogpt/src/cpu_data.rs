//! The f32 data of CPU storage, as the fused CPU ops (Linear, MLP, GELU, LayerNorm, AdamW) read
//! and write it.

use candle_core::{CpuStorage, Layout, Result};

/// The elements of a contiguous f32 CPU tensor; `what` names the op in the error otherwise.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: expected a contiguous f32 CPU tensor"),
    }
}

/// [`f32_slice`], mutable (for in-place ops).
pub(crate) fn f32_slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{what}: expected a contiguous f32 CPU tensor"),
    }
}
