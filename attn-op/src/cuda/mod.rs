//! The CUDA side of the fused ops: launches the kernels of the `attn-kernels` crate (PTX built by
//! bindgen_cuda) through Candle's cudarc.
//!
//! - [`Backend::Flash`]: FlashAttention-2 on tensor cores (sm80+, f16/bf16, head dims that are
//!   multiples of 8 up to 256 with `E == Ev`, no mask). The forward takes 128-row query tiles up
//!   to head dim 128 on sequences longer than 64 (FlashAttention-2's tiling), 64-row ones
//!   otherwise (`ATTN_OP_CUDA_FWD_ROWS=64` or `128` forces one, to compare). Backward on tensor
//!   cores up to head dim 128, with double-buffered query tiles; above, the efficient backward.
//! - [`Backend::Efficient`]: SIMT kernels with f32 arithmetic for f32, f16 and bf16, additive or
//!   boolean masks, any head dims up to 256. From sm80 on they run on tensor cores instead
//!   (efficient_tc.cu: f16/bf16 as the flash kernels with masks, f32 with each product as three
//!   TF32 `mma.sync` products, 3xTF32, which keeps f32's accuracy, its forward tiled as the
//!   flash forward; forward for every head dim, backward up to 128) unless
//!   `ATTN_OP_CUDA_EFFICIENT_SIMT=1` asks for the SIMT kernels.
//!
//! Both read q, k and v through the segment table of [`Geometry`] (dense, strided, GQA and packed
//! inputs alike), produce the CPU implementation's row logsumexp, and draw dropout from the same
//! Philox stream as the CPU. dQ is accumulated with f32 atomics, or, with the environment variable
//! `ATTN_OP_CUDA_DETERMINISTIC=1`, by a separate pass per query tile that needs no atomics (run to
//! run identical results). That pass recomputes the scores and dP and forms dS·K: three of the
//! backward's five products once more, on CUDA cores (the efficient kernels' code), so for flash
//! inputs it costs more than the tensor-core backward it completes.
//!
//! Besides attention: [`dropout_keep`], the mask of `nn::dropout` made on the GPU (Philox, the
//! CPU's mask bit for bit), so a training step does not draw and copy masks from the host.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{
    bail, CudaDevice, CudaStorage, DType, Device, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use half::{bf16, f16};

use crate::config::AttnConfig;
use crate::geometry::Geometry;
use crate::kernel_plan::{
    backward_launches, dense, deterministic, dropout_launch, forward_launch, refusal_for,
    segment_tables, Call, DropoutLaunch, KernelKind, KernelParams, Launch, DROPOUT_THREADS,
    THREADS,
};
use crate::Backend;

// SAFETY: plain `#[repr(C)]` data of integers and floats, passed to kernels by value.
unsafe impl DeviceRepr for KernelParams {}

const FLASH_FWD_MODULE: &str = "attn_op_flash_fwd";
const FLASH_BWD_MODULE: &str = "attn_op_flash_bwd";
const EFFICIENT_MODULE: &str = "attn_op_efficient";
const EFFICIENT_TC_MODULE: &str = "attn_op_efficient_tc";
const DROPOUT_MODULE: &str = "attn_op_dropout";

/// Compute capability as `major * 10 + minor`, and the opt-in shared memory per block.
fn device_caps(device: &CudaDevice) -> Result<(u32, usize)> {
    let stream = device.cuda_stream();
    let ctx = stream.context();
    let (major, minor) = ctx.compute_capability().w()?;
    let smem = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .w()?;
    Ok(((major * 10 + minor).max(0) as u32, smem.max(0) as usize))
}

/// Why `backend` (Flash or Efficient) cannot run this problem on this CUDA device, or `None`.
pub(crate) fn refusal(
    backend: Backend,
    dtype: DType,
    e: usize,
    ev: usize,
    has_mask: bool,
    device: &CudaDevice,
) -> Option<String> {
    match device_caps(device) {
        Ok((cc, smem)) => {
            not_built_for(cc).or_else(|| refusal_for(backend, dtype, e, ev, has_mask, cc, smem))
        }
        Err(err) => Some(format!("cannot query the CUDA device: {err}")),
    }
}

/// Why the kernels cannot run on a device of capability `cc` at all (built for a newer one).
fn not_built_for(cc: u32) -> Option<String> {
    let built = attn_kernels::COMPUTE_CAP;
    (cc < built).then(|| {
        format!(
            "the CUDA kernels were built for sm_{built} (CUDA_COMPUTE_CAP) and this device is sm_{cc}; \
             rebuild with CUDA_COMPUTE_CAP={cc}"
        )
    })
}

/// The device's capability and shared memory per block, once the kernels are known to fit it.
fn checked_caps(dev: &CudaDevice, what: &str) -> Result<(u32, usize)> {
    let (cc, smem) = device_caps(dev)?;
    if let Some(why) = not_built_for(cc) {
        bail!("{what}: {why}");
    }
    Ok((cc, smem))
}

/// A CUDA tensor's storage, or an error naming it.
fn cuda_of<'a>(s: &'a Storage, name: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => bail!("attention (CUDA): {name} is not on the CUDA device like the query"),
    }
}

/// The mask's storage as the kernels take it: bias and boolean slices (placeholders where
/// absent; the parameter block says which one to read).
struct MaskArgs<'a> {
    bias: &'a CudaSlice<f32>,
    boolean: &'a CudaSlice<u8>,
}

/// One-element stand-ins for the mask arguments of a call without a mask of that kind.
struct Placeholders {
    bias: CudaSlice<f32>,
    boolean: CudaSlice<u8>,
}

impl Placeholders {
    fn new(device: &CudaDevice) -> Result<Self> {
        Ok(Self {
            bias: device.alloc_zeros::<f32>(1)?,
            boolean: device.alloc_zeros::<u8>(1)?,
        })
    }

    /// The kernel arguments for `mask` (the storage of the broadcast mask, when there is one).
    fn args<'a>(&'a self, mask: Option<&'a Storage>) -> Result<MaskArgs<'a>> {
        let Some(s) = mask else {
            return Ok(MaskArgs {
                bias: &self.bias,
                boolean: &self.boolean,
            });
        };
        let s = cuda_of(s, "attn_mask")?;
        Ok(match s.dtype() {
            DType::U8 => MaskArgs {
                bias: &self.bias,
                boolean: s.as_cuda_slice::<u8>()?,
            },
            _ => MaskArgs {
                bias: s.as_cuda_slice::<f32>()?,
                boolean: &self.boolean,
            },
        })
    }
}

/// Loads the kernel of `launch` and allows it the launch's dynamic shared memory.
fn function(dev: &CudaDevice, launch: &Launch) -> Result<CudaFunction> {
    let (module, ptx) = match launch.kind {
        KernelKind::FlashFwd => (FLASH_FWD_MODULE, attn_kernels::FLASH_FWD),
        KernelKind::FlashBwd => (FLASH_BWD_MODULE, attn_kernels::FLASH_BWD),
        KernelKind::EffTcFwd | KernelKind::EffTcBwd => {
            (EFFICIENT_TC_MODULE, attn_kernels::EFFICIENT_TC)
        }
        _ => (EFFICIENT_MODULE, attn_kernels::EFFICIENT),
    };
    let f = dev
        .get_or_load_custom_func(&launch.name, module, ptx)?
        .into_cuda_function();
    if launch.smem > 48 * 1024 {
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            launch.smem as i32,
        )
        .w()?;
    }
    Ok(f)
}

fn config(launch: &Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (launch.grid.0, launch.grid.1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: launch.smem as u32,
    }
}

/// Forward of a fused op on CUDA. Returns the output storage (contiguous, q's shape with the last
/// dim of v, dtype of q) and the row logsumexp as a 1-D f32 tensor on the same device, one value
/// per output row (`+inf` for a row that sees no key, whose output is 0).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    kind: Backend,
    cfg: &AttnConfig,
    q: &CudaStorage,
    ql: &Layout,
    k: &CudaStorage,
    kl: &Layout,
    v: &CudaStorage,
    vl: &Layout,
) -> Result<(CudaStorage, Shape, Tensor)> {
    let dtype = q.dtype();
    if k.dtype() != dtype || v.dtype() != dtype {
        bail!(
            "attention (CUDA): q, k, v must share a dtype, got {dtype:?}, {:?}, {:?}",
            k.dtype(),
            v.dtype()
        );
    }
    let dev = q.device().clone();
    let what = "attention (CUDA)";
    let (cc, smem) = checked_caps(&dev, what)?;
    let gpu = Device::Cuda(dev.clone());
    let call = Call::new(what, kind, cfg, dtype, (ql, kl, vl), &gpu, cc, smem)?;
    let g = &call.g;
    let mask_guard = call.mask.as_ref().map(|m| m.storage_and_layout());
    let shape = call.out_shape(ql);
    let placeholders = Placeholders::new(&dev)?;
    let margs = placeholders.args(mask_guard.as_ref().map(|(s, _)| &**s))?;
    let launch = forward_launch(kind, dtype, g, call.params, (cc, smem))?;
    let (qs, ks) = segment_tables(g)?;
    let (qs, ks) = (dev.clone_htod(&qs)?, dev.clone_htod(&ks)?);
    // Dense inputs cover every row; packed ones may leave rows past the last sequence, whose
    // logsumexp stays +inf as on the CPU.
    let mut lse = if cfg.varlen.is_some() {
        dev.clone_htod(&vec![f32::INFINITY; g.q_rows])?
    } else {
        dev.alloc_zeros::<f32>(g.q_rows)?
    };
    let run = Fwd {
        dev: &dev,
        g,
        launch: launch.as_ref(),
        qs: &qs,
        ks: &ks,
        mask: &margs,
    };
    let out = match dtype {
        DType::F32 => {
            CudaStorage::wrap_cuda_slice(run.launch::<f32>(q, k, v, &mut lse)?, dev.clone())
        }
        DType::F16 => {
            CudaStorage::wrap_cuda_slice(run.launch::<f16>(q, k, v, &mut lse)?, dev.clone())
        }
        DType::BF16 => {
            CudaStorage::wrap_cuda_slice(run.launch::<bf16>(q, k, v, &mut lse)?, dev.clone())
        }
        d => bail!("attention (CUDA): dtype {d:?} is not supported (f32, f16, bf16)"),
    };
    drop(mask_guard);
    let n = g.q_rows;
    let lse = Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(lse, dev)),
        n,
        BackpropOp::none(),
        false,
    );
    Ok((out, shape, lse))
}

/// One forward call's launch state.
struct Fwd<'a> {
    dev: &'a CudaDevice,
    g: &'a Geometry,
    launch: Option<&'a Launch>,
    qs: &'a CudaSlice<i64>,
    ks: &'a CudaSlice<i64>,
    mask: &'a MaskArgs<'a>,
}

impl Fwd<'_> {
    fn launch<T: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType>(
        &self,
        q: &CudaStorage,
        k: &CudaStorage,
        v: &CudaStorage,
        lse: &mut CudaSlice<f32>,
    ) -> Result<CudaSlice<T>> {
        let mut o = self.dev.alloc_zeros::<T>(self.g.q_rows * self.g.ev)?;
        let Some(launch) = self.launch else {
            return Ok(o);
        };
        let (q, k, v) = (
            q.as_cuda_slice::<T>()?,
            k.as_cuda_slice::<T>()?,
            v.as_cuda_slice::<T>()?,
        );
        let f = function(self.dev, launch)?;
        let stream = self.dev.cuda_stream();
        {
            let mut b = stream.launch_builder(&f);
            b.arg(q).arg(k).arg(v);
            if matches!(launch.kind, KernelKind::EffFwd | KernelKind::EffTcFwd) {
                b.arg(self.mask.bias).arg(self.mask.boolean);
            }
            b.arg(&mut o)
                .arg(lse)
                .arg(self.qs)
                .arg(self.ks)
                .arg(&launch.params);
            // SAFETY: the argument list matches flash_fwd_*'s, eff_fwd_*'s or eff_tc_fwd_*'s signature (see
            // KernelKind); every access is bounded by the segment tables built from the layouts
            // of these very storages, and the mask offsets come from its broadcast layout.
            unsafe { b.launch(config(launch)) }.w()?;
        }
        Ok(o)
    }
}

/// A contiguous f32 row space as a tensor of `shape` in `dtype`.
fn grad_tensor(
    buf: CudaSlice<f32>,
    dev: &CudaDevice,
    shape: &Shape,
    dtype: DType,
) -> Result<Tensor> {
    let t = Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(buf, dev.clone())),
        shape.clone(),
        BackpropOp::none(),
        false,
    );
    t.to_dtype(dtype)
}

/// Backward: given the op inputs, the output `o`, its gradient `dout` (any layout) and the
/// forward's lse tensor, returns `(dq, dk, dv)` as contiguous tensors shaped like q, k, v, dtype of q.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    kind: Backend,
    cfg: &AttnConfig,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    dout: &Tensor,
    lse: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dtype = q.dtype();
    let dev = match q.device() {
        Device::Cuda(d) => d.clone(),
        d => bail!("attention backward (CUDA): q is on {:?}", d.location()),
    };
    let (o, dout, lse) = (
        dense(o, dtype)?,
        dense(dout, dtype)?,
        dense(lse, DType::F32)?,
    );
    let (qs_, ql) = q.storage_and_layout();
    let (ks_, kl) = k.storage_and_layout();
    let (vs_, vl) = v.storage_and_layout();
    let (cq, ck, cv) = (
        cuda_of(&qs_, "query")?,
        cuda_of(&ks_, "key")?,
        cuda_of(&vs_, "value")?,
    );
    if ck.dtype() != dtype || cv.dtype() != dtype {
        bail!("attention backward (CUDA): q, k, v must share a dtype");
    }
    let what = "attention backward (CUDA)";
    let (cc, smem) = checked_caps(&dev, what)?;
    let call = Call::new(what, kind, cfg, dtype, (ql, kl, vl), q.device(), cc, smem)?;
    call.check_backward(what, &o, &dout, &lse)?;
    let g = &call.g;
    let mask_guard = call.mask.as_ref().map(|m| m.storage_and_layout());
    let placeholders = Placeholders::new(&dev)?;
    let margs = placeholders.args(mask_guard.as_ref().map(|(s, _)| &**s))?;
    let launches = backward_launches(kind, dtype, g, call.params, deterministic(), (cc, smem))?;
    let (qs, ks) = segment_tables(g)?;
    let (qs, ks) = (dev.clone_htod(&qs)?, dev.clone_htod(&ks)?);
    let mut dq = dev.alloc_zeros::<f32>(g.q_rows * g.e)?;
    let mut dk = dev.alloc_zeros::<f32>(g.kv_rows * g.e)?;
    let mut dv = dev.alloc_zeros::<f32>(g.kv_rows * g.ev)?;
    {
        let (os, _) = o.storage_and_layout();
        let (ds, _) = dout.storage_and_layout();
        let (ls, _) = lse.storage_and_layout();
        let run = Bwd {
            dev: &dev,
            g,
            launches: &launches,
            qs: &qs,
            ks: &ks,
            mask: &margs,
            lse: cuda_of(&ls, "logsumexp")?.as_cuda_slice::<f32>()?,
        };
        let (co, cd) = (cuda_of(&os, "output")?, cuda_of(&ds, "output gradient")?);
        let mut grads = Grads {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
        };
        match dtype {
            DType::F32 => run.launch::<f32>(cq, ck, cv, co, cd, &mut grads)?,
            DType::F16 => run.launch::<f16>(cq, ck, cv, co, cd, &mut grads)?,
            DType::BF16 => run.launch::<bf16>(cq, ck, cv, co, cd, &mut grads)?,
            d => bail!("attention backward (CUDA): dtype {d:?} is not supported (f32, f16, bf16)"),
        }
    }
    drop(mask_guard);
    drop((qs_, ks_, vs_));
    Ok((
        grad_tensor(dq, &dev, q.shape(), dtype)?,
        grad_tensor(dk, &dev, k.shape(), dtype)?,
        grad_tensor(dv, &dev, v.shape(), dtype)?,
    ))
}

/// The f32 gradient buffers a backward fills (contiguous row spaces).
struct Grads<'a> {
    dq: &'a mut CudaSlice<f32>,
    dk: &'a mut CudaSlice<f32>,
    dv: &'a mut CudaSlice<f32>,
}

/// One backward call's launch state.
struct Bwd<'a> {
    dev: &'a CudaDevice,
    g: &'a Geometry,
    launches: &'a [Launch],
    qs: &'a CudaSlice<i64>,
    ks: &'a CudaSlice<i64>,
    mask: &'a MaskArgs<'a>,
    lse: &'a CudaSlice<f32>,
}

impl Bwd<'_> {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType>(
        &self,
        q: &CudaStorage,
        k: &CudaStorage,
        v: &CudaStorage,
        o: &CudaStorage,
        dout: &CudaStorage,
        grads: &mut Grads,
    ) -> Result<()> {
        let g = self.g;
        if self.launches.is_empty() {
            return Ok(());
        }
        let (q, k, v) = (
            q.as_cuda_slice::<T>()?,
            k.as_cuda_slice::<T>()?,
            v.as_cuda_slice::<T>()?,
        );
        let (o, dout) = (o.as_cuda_slice::<T>()?, dout.as_cuda_slice::<T>()?);
        let mut delta = self.dev.alloc_zeros::<f32>(g.q_rows)?;
        let (rows, ev) = (g.q_rows as i64, g.ev as i32);
        for launch in self.launches {
            let f = function(self.dev, launch)?;
            let stream = self.dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let with_dq = i32::from(launch.with_dq);
            match launch.kind {
                KernelKind::Delta => {
                    b.arg(o).arg(dout).arg(&mut delta).arg(&rows).arg(&ev);
                }
                KernelKind::FlashBwd => {
                    b.arg(q).arg(k).arg(v).arg(dout).arg(self.lse).arg(&delta);
                    b.arg(&mut *grads.dq)
                        .arg(&mut *grads.dk)
                        .arg(&mut *grads.dv);
                    b.arg(self.qs)
                        .arg(self.ks)
                        .arg(&launch.params)
                        .arg(&with_dq);
                }
                KernelKind::EffBwd | KernelKind::EffTcBwd | KernelKind::EffDq => {
                    b.arg(q)
                        .arg(k)
                        .arg(v)
                        .arg(self.mask.bias)
                        .arg(self.mask.boolean)
                        .arg(dout);
                    b.arg(self.lse).arg(&delta).arg(&mut *grads.dq);
                    if launch.kind != KernelKind::EffDq {
                        b.arg(&mut *grads.dk).arg(&mut *grads.dv);
                    }
                    b.arg(self.qs).arg(self.ks).arg(&launch.params);
                    if launch.kind != KernelKind::EffDq {
                        b.arg(&with_dq);
                    }
                }
                KernelKind::FlashFwd | KernelKind::EffFwd | KernelKind::EffTcFwd => {
                    bail!(
                        "attention backward (CUDA): {} is not a backward kernel",
                        launch.name
                    )
                }
            }
            // SAFETY: each argument list matches its kernel's signature (see KernelKind);
            // attn_delta_* reads q_rows rows of ev from o and dout, both that long; the other
            // accesses are bounded by the segment tables built from these storages' layouts.
            unsafe { b.launch(config(launch)) }.w()?;
        }
        Ok(())
    }
}

/// The multipliers of `nn::dropout` for `rows` rows of `cols` elements, made on the GPU by
/// `dropout_keep_*` (the CPU's mask bit for bit), as a `(rows, cols)` tensor of `dtype`.
pub(crate) fn dropout_keep(
    dev: &CudaDevice,
    rows: usize,
    cols: usize,
    p: f64,
    seed: u64,
    dtype: DType,
) -> Result<Tensor> {
    let Some(l) = dropout_launch(rows, cols, p, seed, dtype)? else {
        return Tensor::zeros((rows, cols), dtype, &Device::Cuda(dev.clone()));
    };
    checked_caps(dev, "dropout (CUDA)")?;
    let f = dev
        .get_or_load_custom_func(&l.name, DROPOUT_MODULE, attn_kernels::DROPOUT)?
        .into_cuda_function();
    let storage = match dtype {
        DType::F32 => CudaStorage::wrap_cuda_slice(launch_keep::<f32>(dev, &f, &l)?, dev.clone()),
        DType::F16 => CudaStorage::wrap_cuda_slice(launch_keep::<f16>(dev, &f, &l)?, dev.clone()),
        _ => CudaStorage::wrap_cuda_slice(launch_keep::<bf16>(dev, &f, &l)?, dev.clone()),
    };
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        (rows, cols),
        BackpropOp::none(),
        false,
    ))
}

fn launch_keep<T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    f: &CudaFunction,
    l: &DropoutLaunch,
) -> Result<CudaSlice<T>> {
    let mut keep = dev.alloc_zeros::<T>((l.rows * l.cols) as usize)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(f);
    b.arg(&mut keep)
        .arg(&l.rows)
        .arg(&l.cols)
        .arg(&l.seed[0])
        .arg(&l.seed[1])
        .arg(&l.threshold)
        .arg(&l.scale);
    let cfg = LaunchConfig {
        grid_dim: (l.blocks, 1, 1),
        block_dim: (DROPOUT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments follow dropout_keep_*'s signature, T is its element type, and the
    // kernel writes rows * cols elements, the buffer's length.
    unsafe { b.launch(cfg) }.w()?;
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_built_for_a_newer_device_are_refused() {
        let cap = attn_kernels::COMPUTE_CAP;
        assert!(not_built_for(cap.saturating_sub(5))
            .unwrap()
            .contains("rebuild"));
        assert!(not_built_for(cap).is_none());
    }
}
