//! The f32 data of CPU storage, as the fused CPU ops (Linear, MLP, attention, GELU, LayerNorm,
//! AdamW) read and write it, and the element-wise dropout steps those ops share.

use std::borrow::Cow;
use std::cell::RefCell;
use std::mem::MaybeUninit;

use candle_core::{CpuStorage, InplaceOp1, Layout, Result, Storage, Tensor};

/// The elements of a contiguous f32 CPU tensor; `what` names the op in the error otherwise.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: expected a contiguous f32 CPU tensor"),
    }
}

/// Runs `f` on the contiguous f32 data of CPU tensors (the backward passes of the fused ops,
/// which get their inputs as tensors); `what` names the op in the errors.
pub(crate) fn with_data<R>(
    tensors: &[&Tensor],
    what: &str,
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(tensors.len());
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cpu(s) => slices.push(f32_slice(s, layout, what)?),
            _ => candle_core::bail!("{what}: expected CPU tensors"),
        }
    }
    f(&slices)
}

/// Runs `f` on the contiguous f32 data of the CPU tensor `t`, mutably and in place (Candle's
/// in-place op, so nothing else reads or writes it meanwhile); `what` names the op in the
/// errors. Nested calls hold several tensors at once (the AdamW update writes a parameter and
/// both its moments in one pass).
pub(crate) fn with_data_mut<R>(
    t: &Tensor,
    what: &'static str,
    f: impl FnOnce(&mut [f32]) -> Result<R>,
) -> Result<R> {
    /// The in-place op that hands the storage to `f` (taken on the first and only call).
    struct InPlace<F> {
        f: RefCell<Option<F>>,
        what: &'static str,
    }
    impl<F: FnOnce(&mut [f32]) -> Result<()>> InplaceOp1 for InPlace<F> {
        fn name(&self) -> &'static str {
            self.what
        }

        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
            let Some(f) = self.f.borrow_mut().take() else {
                candle_core::bail!("{}: the in-place op ran twice", self.what);
            };
            f(f32_slice_mut(s, l, self.what)?)
        }
    }
    if !t.device().is_cpu() {
        candle_core::bail!("{what}: expected a CPU tensor");
    }
    let mut out = None;
    t.inplace_op1(&InPlace {
        f: RefCell::new(Some(|data: &mut [f32]| {
            out = Some(f(data)?);
            Ok(())
        })),
        what,
    })?;
    out.ok_or_else(|| candle_core::Error::Msg(format!("{what}: the in-place op did not run")))
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

/// A buffer of `f32` that is written in full before anything reads it, allocated without
/// zero-filling it first. The fused ops' outputs are overwritten by matrix products anyway:
/// filling them with zeros beforehand wrote every output twice and cost about 2 ms of a
/// 31 ms step of the CPU recipe.
pub(crate) struct Unwritten {
    buf: Vec<f32>,
    len: usize,
}

impl Unwritten {
    /// Room for `len` elements, none written yet.
    pub(crate) fn new(len: usize) -> Self {
        Self {
            buf: Vec::with_capacity(len),
            len,
        }
    }

    /// The elements, to be written.
    pub(crate) fn slots(&mut self) -> &mut [MaybeUninit<f32>] {
        &mut self.buf.spare_capacity_mut()[..self.len]
    }

    /// The vector of the written elements.
    ///
    /// # Safety
    ///
    /// Every element of [`Unwritten::slots`] has been written.
    pub(crate) unsafe fn assume_written(mut self) -> Vec<f32> {
        // SAFETY: the capacity holds `len` elements, which the caller has initialised.
        unsafe { self.buf.set_len(self.len) };
        self.buf
    }
}

/// `slots` as the values written into them.
///
/// # Safety
///
/// Every element of `slots` has been written.
pub(crate) unsafe fn assume_written(slots: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and the caller promises that every
    // element is initialised.
    unsafe { &mut *(slots as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// The gradient `g` through dropout multipliers `keep` (`g ⊙ keep`), or `g` itself without them.
pub(crate) fn through_dropout<'a>(g: &'a [f32], keep: Option<&[f32]>) -> Cow<'a, [f32]> {
    match keep {
        Some(keep) => g.iter().zip(keep).map(|(g, k)| g * k).collect(),
        None => Cow::Borrowed(g),
    }
}
/// `(rows, cols)` of a matrix layout.
pub(crate) fn dims2(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.dims() {
        &[r, c] => Ok((r, c)),
        d => candle_core::bail!("{what}: expected a matrix, got shape {d:?}"),
    }
}
