//! What the flash and efficient ops share: the CPU forward and backward over a [`Geometry`], and
//! the logsumexp kept from forward for backward.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Shape, Storage, Tensor};
use half::slice::HalfFloatSliceExt;

use crate::config::{paged_rows, AttnConfig, Band, CausalAlign, Dropout};
use crate::cpu::backward::{backward, Grads};
use crate::cpu::forward::{forward, forward_into, Params, Sources};
use crate::cpu::{unsupported, MaskSrc, Src, Whole};
use crate::geometry::Geometry;
use crate::validate::{check_common, check_softcap};
use crate::Backend;

#[derive(Default)]
struct Stash {
    forwards: usize,
    lse: Option<Tensor>,
}

/// The state of one fused attention op: its configuration and the logsumexp of its forward.
pub(crate) struct Fused {
    pub cfg: AttnConfig,
    stash: Mutex<Stash>,
}

pub(crate) fn to_storage(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::F16 => {
            let mut out = vec![half::f16::ZERO; v.len()];
            out.convert_from_f32_slice(&v);
            CpuStorage::F16(out)
        }
        DType::BF16 => {
            let mut out = vec![half::bf16::ZERO; v.len()];
            crate::cpu::simd::f32_to_bf16(&v, &mut out);
            CpuStorage::BF16(out)
        }
        d => bail!("{}", unsupported(d)),
    })
}

/// A 16-bit float type whose zero is all zero bits.
trait Half16: Sized {}
impl Half16 for half::f16 {}
impl Half16 for half::bf16 {}

/// `n` zeros of a 16-bit float type in memory the allocator hands out zeroed, which nothing writes
/// before the kernel does (the pages are mapped on its first write).
fn zeroed_halves<T: Half16>(n: usize) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(vec![0u16; n]);
    // SAFETY: `half::f16` and `half::bf16` are `repr(transparent)` over `u16` (same size and
    // alignment, every bit pattern valid, zero bits = +0.0); the allocation moves over whole.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<T>(), v.len(), v.capacity()) }
}

/// A CPU tensor of `like`'s shape and dtype holding `data` (contiguous, untracked).
fn plain_tensor(data: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    let storage = Storage::Cpu(to_storage(data, like.dtype())?);
    Ok(Tensor::from_storage(
        storage,
        like.shape(),
        BackpropOp::none(),
        false,
    ))
}

fn cpu<'a>(s: &'a Storage, name: &str) -> Result<&'a CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => bail!("attention: {name} is not on the CPU like the other inputs"),
    }
}

/// The output shape: q's with the last dim replaced by v's.
fn out_shape(ql: &Layout, vl: &Layout) -> Shape {
    let mut dims = ql.dims().to_vec();
    let r = dims.len();
    dims[r - 1] = vl.dims()[vl.dims().len() - 1];
    Shape::from(dims)
}

impl Fused {
    pub fn new(cfg: AttnConfig) -> Self {
        Self {
            cfg,
            stash: Mutex::new(Stash::default()),
        }
    }

    /// Which keys each query sees: `i + off - left <= j <= i + off + right` (replacing the
    /// causal setting), `off` from `align`.
    pub fn set_window(&mut self, align: CausalAlign, left: Option<usize>, right: Option<usize>) {
        self.cfg.band = (left.is_some() || right.is_some()).then_some(Band { align, left, right });
    }

    /// Caps the scaled scores at `±cap` with `cap·tanh(x / cap)`.
    pub fn set_softcap(&mut self, cap: f32) -> Result<()> {
        check_softcap("attention", cap as f64)?;
        self.cfg.softcap = Some(cap);
        Ok(())
    }

    /// ALiBi slopes, one per query head (checked against the heads when the op runs).
    pub fn set_alibi(&mut self, slopes: &[f32]) -> Result<()> {
        if let Some(bad) = slopes.iter().find(|x| !x.is_finite()) {
            bail!("attention: ALiBi slope {bad} is not finite");
        }
        self.cfg.alibi = Some(slopes.to_vec());
        Ok(())
    }

    /// Drops attention weights with probability `p`, the mask drawn from `seed`.
    pub fn set_dropout(&mut self, p: f64, seed: u64) -> Result<()> {
        check_common(1, p, None)?;
        self.cfg.dropout = Dropout::new(p, seed);
        Ok(())
    }

    fn alibi(&self) -> Option<&[f32]> {
        self.cfg.alibi.as_deref()
    }

    pub(crate) fn params(&self) -> Params {
        Params {
            scale: self.cfg.scale,
            softcap: self.cfg.softcap,
            dropout: self.cfg.dropout,
        }
    }

    /// The mask broadcast to the scores shape `(..., Hq, Lq, Lk)` of these inputs.
    fn broadcast_mask(&self, ql: &Layout, kl: &Layout) -> Result<Option<Tensor>> {
        let Some(mask) = &self.cfg.mask else {
            return Ok(None);
        };
        let mut dims = ql.dims().to_vec();
        let r = dims.len();
        dims[r - 1] = kl.dims()[r - 2];
        Ok(Some(mask.broadcast_as(dims)?))
    }

    fn geometry(
        &self,
        ql: &Layout,
        kl: &Layout,
        vl: &Layout,
        mask: Option<&Layout>,
    ) -> Result<Geometry> {
        let (band, alibi) = (self.cfg.band, self.alibi());
        match (&self.cfg.varlen, &self.cfg.pages) {
            (Some(varlen), Some(blocks)) => {
                Geometry::paged(ql, kl, vl, varlen, blocks, band, alibi)
            }
            (Some(varlen), None) => Geometry::packed(ql, kl, vl, varlen, band, alibi),
            (None, _) => Geometry::dense(ql, kl, vl, mask, band, alibi),
        }
    }

    /// Runs `f` on the geometry and f32 sources of these CPU inputs (and the mask).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn with_sources<R>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
        f: impl FnOnce(&Geometry, &Sources) -> Result<R>,
    ) -> Result<R> {
        let mask = self.broadcast_mask(l1, l2)?;
        let mask_storage = mask.as_ref().map(|m| m.storage_and_layout());
        let (mask_src, mask_layout) = match &mask_storage {
            Some((s, l)) => (Some(MaskSrc::new(cpu(s, "attn_mask")?, l)?), Some(*l)),
            None => (None, None),
        };
        let g = self.geometry(l1, l2, l3, mask_layout)?;
        let src = Sources {
            q: Src::new(s1)?,
            k: Src::new(s2)?,
            v: Src::new(s3)?,
            mask: mask_src,
        };
        f(&g, &src)
    }

    /// The CPU forward: output in q's dtype, its shape, and the row logsumexp.
    fn cpu_forward(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape, Vec<f32>)> {
        let (out, lse) = self.with_sources(s1, l1, s2, l2, s3, l3, |g, src| {
            let p = self.params();
            let n = g.q_rows * g.ev;
            Ok(match s1.dtype() {
                DType::F32 => {
                    let (out, lse) = forward(g, src, &p);
                    (CpuStorage::F32(out), lse)
                }
                DType::F16 => {
                    let mut out = zeroed_halves::<half::f16>(n);
                    let lse = forward_into(g, src, &p, &mut out);
                    (CpuStorage::F16(out), lse)
                }
                DType::BF16 => {
                    let mut out = zeroed_halves::<half::bf16>(n);
                    let lse = forward_into(g, src, &p, &mut out);
                    (CpuStorage::BF16(out), lse)
                }
                d => bail!("{}", unsupported(d)),
            })
        })?;
        Ok((out, out_shape(l1, l3), lse))
    }

    pub(crate) fn keep_lse(&self, lse: Tensor) {
        let mut stash = self.stash.lock().unwrap_or_else(|e| e.into_inner());
        stash.forwards += 1;
        stash.lse = Some(lse);
    }

    /// The forward on CPU tensors: the CPU implementation, or under `emu::emulate_cuda` the
    /// CUDA kernels of `backend` in the emulator.
    #[allow(clippy::too_many_arguments)]
    pub fn cpu_fwd(
        &self,
        backend: Backend,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        #[cfg(feature = "cuda-emu")]
        if crate::emu::is_emulating() {
            let (out, shape, lse) =
                crate::emu::forward(backend, &self.cfg, s1, l1, s2, l2, s3, l3)?;
            self.keep_lse(lse);
            return Ok((out, shape));
        }
        let _ = backend;
        let (out, shape, lse) = self.cpu_forward(s1, l1, s2, l2, s3, l3)?;
        let n = lse.len();
        self.keep_lse(Tensor::from_vec(lse, n, &Device::Cpu)?);
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    pub fn cuda_fwd(
        &self,
        backend: Backend,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (out, shape, lse) = crate::cuda::forward(backend, &self.cfg, s1, l1, s2, l2, s3, l3)?;
        self.keep_lse(lse);
        Ok((out, shape))
    }

    /// The forward's logsumexp: kept from the forward, or computed again when this op instance
    /// ran more than one forward (shared with `apply_op3_arc`) and the kept one may not match.
    pub(crate) fn lse(
        &self,
        backend: Backend,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        {
            let stash = self.stash.lock().unwrap_or_else(|e| e.into_inner());
            if let (1, Some(lse)) = (stash.forwards, &stash.lse) {
                return Ok(lse.clone());
            }
        }
        let (s1, l1) = q.storage_and_layout();
        let (s2, l2) = k.storage_and_layout();
        let (s3, l3) = v.storage_and_layout();
        match (&*s1, &*s2, &*s3) {
            #[cfg(feature = "cuda-emu")]
            (Storage::Cpu(c1), Storage::Cpu(c2), Storage::Cpu(c3))
                if crate::emu::is_emulating() =>
            {
                Ok(crate::emu::forward(backend, &self.cfg, c1, l1, c2, l2, c3, l3)?.2)
            }
            (Storage::Cpu(c1), Storage::Cpu(c2), Storage::Cpu(c3)) => {
                let (_, _, lse) = self.cpu_forward(c1, l1, c2, l2, c3, l3)?;
                let n = lse.len();
                Tensor::from_vec(lse, n, &Device::Cpu)
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(c1), Storage::Cuda(c2), Storage::Cuda(c3)) => {
                Ok(crate::cuda::forward(backend, &self.cfg, c1, l1, c2, l2, c3, l3)?.2)
            }
            _ => {
                let _ = backend;
                bail!(
                    "attention backward: q, k, v must be on one supported device, got {:?}",
                    q.device().location()
                )
            }
        }
    }

    /// Gradients of q, k and v.
    pub fn bwd(
        &self,
        backend: Backend,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse(backend, q, k, v)?;
        if let Some(blocks) = &self.cfg.pages {
            let (dq, dk, dv) = self.paged_backward(q, k, v, res, grad, &lse, blocks)?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let grads = match q.device() {
            #[cfg(feature = "cuda-emu")]
            Device::Cpu if crate::emu::is_emulating() => {
                crate::emu::backward(backend, &self.cfg, q, k, v, res, grad, &lse)?
            }
            Device::Cpu => self.cpu_backward(q, k, v, res, grad, &lse)?,
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => crate::cuda::backward(backend, &self.cfg, q, k, v, res, grad, &lse)?,
            d => bail!(
                "attention backward: device {:?} is not supported",
                d.location()
            ),
        };
        crate::profile::sync_if_profiling(q.device())?;
        let (dq, dk, dv) = grads;
        Ok((Some(dq), Some(dk), Some(dv)))
    }

    pub(crate) fn cpu_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
        lse: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let grads = self.cpu_backward_rows(q, k, v, res, grad, lse)?;
        Ok((
            plain_tensor(grads.dq, q)?,
            plain_tensor(grads.dk, k)?,
            plain_tensor(grads.dv, v)?,
        ))
    }

    /// The paged op's gradients (CPU): the blocks' keys and values gathered into packed rows,
    /// the packed backward on them, and dK, dV added back into the blocks they came from (a
    /// block that several sequences share gets the sum; a block none uses, zeros).
    #[allow(clippy::too_many_arguments)]
    fn paged_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
        lse: &Tensor,
        blocks: &[Vec<usize>],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let Some(varlen) = &self.cfg.varlen else {
            bail!("attention backward: a paged cache without sequence lengths");
        };
        let page = k.dims4()?.1;
        let rows = paged_rows(&varlen.cu_k, blocks, page);
        let ids: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let ids = Tensor::new(ids, &Device::Cpu)?;
        let gather = |t: &Tensor| -> Result<Tensor> {
            let (n, page, h, d) = t.dims4()?;
            t.detach()
                .reshape((n * page, h, d))?
                .index_select(&ids, 0)?
                .transpose(0, 1)
        };
        let (kp, vp) = (gather(k)?, gather(v)?);
        let packed = Fused::new(AttnConfig {
            pages: None,
            ..self.cfg.clone()
        });
        let g = packed.cpu_backward_rows(q, &kp, &vp, res, grad, lse)?;
        // `d` holds (heads, packed rows, dim) in order; the result has the cache's shape.
        let scatter = |d: Vec<f32>, cache: &Tensor| -> Result<Tensor> {
            let (n, page, h, e) = cache.dims4()?;
            let mut out = vec![0f32; n * page * h * e];
            for (i, &r) in rows.iter().enumerate() {
                for head in 0..h {
                    let src = &d[(head * rows.len() + i) * e..][..e];
                    let dst = &mut out[(r * h + head) * e..][..e];
                    for (o, x) in dst.iter_mut().zip(src) {
                        *o += x;
                    }
                }
            }
            plain_tensor(out, cache)
        };
        Ok((plain_tensor(g.dq, q)?, scatter(g.dk, k)?, scatter(g.dv, v)?))
    }

    /// [`Fused::cpu_backward`]'s gradients as f32 rows in q's, k's and v's contiguous order,
    /// for callers that lay them out themselves.
    pub(crate) fn cpu_backward_rows(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
        lse: &Tensor,
    ) -> Result<Grads> {
        // o, dO and lse as contiguous f32 rows, read in place where they already are.
        let (res, grad) = (res.contiguous()?, grad.contiguous()?);
        let (so, lo) = res.storage_and_layout();
        let (sd, ld) = grad.storage_and_layout();
        let (sl, ll) = lse.storage_and_layout();
        let o_src = Whole::new(cpu(&so, "output")?, lo)?;
        let dout_src = Whole::new(cpu(&sd, "output gradient")?, ld)?;
        let lse_src = Whole::new(cpu(&sl, "logsumexp")?, ll)?;
        let o = &o_src.at(lo.start_offset())[..res.elem_count()];
        let dout = &dout_src.at(ld.start_offset())[..grad.elem_count()];
        let lse = &lse_src.at(ll.start_offset())[..lse.elem_count()];
        let (s1, l1) = q.storage_and_layout();
        let (s2, l2) = k.storage_and_layout();
        let (s3, l3) = v.storage_and_layout();
        let (c1, c2, c3) = (cpu(&s1, "query")?, cpu(&s2, "key")?, cpu(&s3, "value")?);
        self.with_sources(c1, l1, c2, l2, c3, l3, |g, src| {
            if o.len() != g.q_rows * g.ev || dout.len() != o.len() || lse.len() != g.q_rows {
                bail!("attention backward: output, gradient or logsumexp do not match the inputs");
            }
            Ok(backward(g, src, &self.params(), o, dout, lse))
        })
    }
}
