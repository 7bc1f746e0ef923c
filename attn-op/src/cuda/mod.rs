//! The CUDA side of the fused ops: launches the kernels of the `attn-kernels` crate (PTX built by
//! bindgen_cuda) through Candle's cudarc.
//!
//! - [`Backend::Flash`]: FlashAttention-2 on tensor cores (sm80+, f16/bf16, head dims that are
//!   multiples of 8 up to 256 with `E == Ev`, no mask). Backward on tensor cores up to head dim 128;
//!   above, the efficient backward kernel.
//! - [`Backend::Efficient`]: SIMT kernels with f32 arithmetic for f32, f16 and bf16, additive or
//!   boolean masks, any head dims up to 256.
//!
//! Both read q, k and v through the segment table of [`Geometry`] (dense, strided, GQA and packed
//! inputs alike), produce the CPU implementation's row logsumexp, and draw dropout from the same
//! Philox stream as the CPU. dQ is accumulated with f32 atomics, or, with the environment variable
//! `ATTN_OP_CUDA_DETERMINISTIC=1`, by a separate pass per query tile that needs no atomics (run to
//! run identical results). That pass recomputes the scores and dP and forms dS·K: three of the
//! backward's five products once more, on CUDA cores (the efficient kernels' code), so for flash
//! inputs it costs more than the tensor-core backward it completes.

mod params;

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

use self::params::{kernel_params, segment_tables, tiles, KernelParams, MaskKind};
use crate::config::AttnConfig;
use crate::cpu::geometry::Geometry;
use crate::Backend;

/// Threads of every attention kernel's block.
const THREADS: u32 = 128;
/// Rows of a flash forward query tile, keys of a flash backward key tile, rows of the efficient tiles.
const FLASH_FWD_ROWS: usize = 64;
const FLASH_BWD_KEYS: usize = 64;
const EFF_ROWS: usize = 32;
/// Largest head dim of the kernels.
const MAX_HEAD_DIM: usize = 256;
/// Largest head dim of the tensor-core backward (larger ones use the efficient backward).
const MAX_FLASH_BWD_HEAD_DIM: usize = 128;

const FLASH_FWD_MODULE: &str = "attn_op_flash_fwd";
const FLASH_BWD_MODULE: &str = "attn_op_flash_bwd";
const EFFICIENT_MODULE: &str = "attn_op_efficient";

/// The head dim a flash kernel is instantiated for: `e` rounded up.
fn flash_bucket(e: usize) -> usize {
    [32, 64, 96, 128, 256]
        .into_iter()
        .find(|&d| d >= e)
        .unwrap_or(usize::MAX)
}

/// Keys per flash forward tile for a head-dim bucket (as instantiated in flash_fwd.cu).
fn flash_fwd_keys(d: usize) -> usize {
    if d == 256 {
        32
    } else {
        64
    }
}

/// Dynamic shared memory of the flash forward: Q tile plus double-buffered K and V tiles.
fn flash_fwd_smem(d: usize) -> usize {
    (FLASH_FWD_ROWS + 4 * flash_fwd_keys(d)) * (d + 8) * 2
}

/// Query rows per flash backward tile for a head-dim bucket (as instantiated in flash_bwd.cu).
fn flash_bwd_rows(d: usize) -> usize {
    if d <= 64 {
        64
    } else {
        32
    }
}

/// Dynamic shared memory of the flash backward: K, V, Q, dO, dS tiles and two row terms.
fn flash_bwd_smem(d: usize) -> usize {
    let bq = flash_bwd_rows(d);
    (2 * FLASH_BWD_KEYS + 2 * bq) * (d + 8) * 2 + bq * (FLASH_BWD_KEYS + 8) * 2 + 2 * bq * 4
}

/// The efficient kernels' head-dim bucket: `max(e, ev)` rounded up to 64, 128 or 256.
fn eff_bucket(e: usize, ev: usize) -> usize {
    [64, 128, 256]
        .into_iter()
        .find(|&d| d >= e.max(ev))
        .unwrap_or(usize::MAX)
}

fn dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => bail!("attention (CUDA): dtype {d:?} is not supported (f32, f16, bf16)"),
    })
}

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
    let (cc, smem) = match device_caps(device) {
        Ok(c) => c,
        Err(err) => return Some(format!("cannot query the CUDA device: {err}")),
    };
    refusal_for(backend, dtype, e, ev, has_mask, cc, smem)
}

/// [`refusal`] for a device of compute capability `cc` (`major * 10 + minor`) with `smem` bytes
/// of opt-in shared memory per block.
fn refusal_for(
    backend: Backend,
    dtype: DType,
    e: usize,
    ev: usize,
    has_mask: bool,
    cc: u32,
    smem: usize,
) -> Option<String> {
    let built = attn_kernels::COMPUTE_CAP;
    if cc < built {
        return Some(format!(
            "the CUDA kernels were built for sm_{built} (CUDA_COMPUTE_CAP) and this device is sm_{cc}; \
             rebuild with CUDA_COMPUTE_CAP={cc}"
        ));
    }
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Some(format!(
            "dtype {dtype:?} is not supported on CUDA (f32, f16, bf16)"
        ));
    }
    match backend {
        Backend::Flash => {
            if has_mask {
                return Some("attn_mask is not supported".into());
            }
            if dtype == DType::F32 {
                return Some("f32 is not supported by the CUDA flash kernels (f16, bf16; efficient takes f32)".into());
            }
            if cc < 80 {
                return Some(format!(
                    "the CUDA flash kernels need sm80 or newer, this device is sm_{cc}"
                ));
            }
            if e != ev {
                return Some(format!(
                    "the CUDA flash kernels need equal q/k and v head dims, got {e} and {ev}"
                ));
            }
            if e == 0 || !e.is_multiple_of(8) || e > MAX_HEAD_DIM {
                return Some(format!(
                    "head dim {e} is not supported by the CUDA flash kernels (multiples of 8 up to {MAX_HEAD_DIM})"
                ));
            }
            let d = flash_bucket(e);
            let need = flash_fwd_smem(d).max(if d <= MAX_FLASH_BWD_HEAD_DIM {
                flash_bwd_smem(d)
            } else {
                0
            });
            if need > smem {
                return Some(format!(
                    "head dim {e} needs {need} bytes of shared memory per block, this device allows {smem}"
                ));
            }
            None
        }
        Backend::Efficient => {
            if e.max(ev) > MAX_HEAD_DIM {
                return Some(format!(
                    "head dim {} is above {MAX_HEAD_DIM} (CUDA efficient kernels)",
                    e.max(ev)
                ));
            }
            None
        }
        Backend::Math => None,
    }
}

/// A CUDA tensor's storage, or an error naming it.
fn cuda_of<'a>(s: &'a Storage, name: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => bail!("attention (CUDA): {name} is not on the CUDA device like the query"),
    }
}

/// The mask broadcast to the scores shape `(..., Hq, Lq, Lk)`, on `device`, as f32 bias or u8.
fn broadcast_mask(
    cfg: &AttnConfig,
    ql: &Layout,
    kl: &Layout,
    device: &CudaDevice,
) -> Result<Option<Tensor>> {
    let Some(mask) = &cfg.mask else {
        return Ok(None);
    };
    if cfg.varlen.is_some() {
        bail!("attention (CUDA): attn_mask is not supported with packed sequences");
    }
    let mut dims = ql.dims().to_vec();
    let r = dims.len();
    dims[r - 1] = kl.dims()[r - 2];
    let mask = match mask.dtype() {
        DType::U8 | DType::F32 => mask.clone(),
        _ => mask.to_dtype(DType::F32)?,
    };
    Ok(Some(
        mask.to_device(&Device::Cuda(device.clone()))?
            .broadcast_as(dims)?,
    ))
}

fn geometry(
    cfg: &AttnConfig,
    ql: &Layout,
    kl: &Layout,
    vl: &Layout,
    mask: Option<&Layout>,
) -> Result<Geometry> {
    match &cfg.varlen {
        Some(varlen) => Geometry::packed(ql, kl, vl, varlen, cfg.causal),
        None => Geometry::dense(ql, kl, vl, mask, cfg.causal),
    }
}

/// The mask's storage as the kernels take it: bias and boolean slices (placeholders where
/// absent) and which one to read.
struct MaskArgs<'a> {
    bias: &'a CudaSlice<f32>,
    boolean: &'a CudaSlice<u8>,
    kind: MaskKind,
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
                kind: MaskKind::None,
            });
        };
        let s = cuda_of(s, "attn_mask")?;
        Ok(match s.dtype() {
            DType::U8 => MaskArgs {
                bias: &self.bias,
                boolean: s.as_cuda_slice::<u8>()?,
                kind: MaskKind::Bool,
            },
            _ => MaskArgs {
                bias: s.as_cuda_slice::<f32>()?,
                boolean: &self.boolean,
                kind: MaskKind::Bias,
            },
        })
    }
}

fn grid(x: usize, y: usize) -> Result<LaunchConfig> {
    let x = u32::try_from(x.max(1))
        .or_else(|_| bail!("attention (CUDA): {x} segments exceed the grid"))?;
    Ok(LaunchConfig {
        grid_dim: (x, y.max(1) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Loads `name` from the PTX module `module` and allows it `smem` bytes of dynamic shared memory.
fn function(
    dev: &CudaDevice,
    name: &str,
    module: &str,
    ptx: &'static str,
    smem: usize,
) -> Result<CudaFunction> {
    let f = dev
        .get_or_load_custom_func(name, module, ptx)?
        .into_cuda_function();
    if smem > 48 * 1024 {
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
    }
    Ok(f)
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
    let mask = broadcast_mask(cfg, ql, kl, &dev)?;
    let mask_guard = mask.as_ref().map(|m| m.storage_and_layout());
    let g = geometry(cfg, ql, kl, vl, mask_guard.as_ref().map(|(_, l)| *l))?;
    let (cc, smem) = device_caps(&dev)?;
    if let Some(why) = refusal_for(kind, dtype, g.e, g.ev, mask.is_some(), cc, smem) {
        bail!("attention (CUDA, {kind:?}): {why}");
    }
    let mut out_dims = ql.dims().to_vec();
    let r = out_dims.len();
    out_dims[r - 1] = g.ev;
    let shape = Shape::from(out_dims);
    let placeholders = Placeholders::new(&dev)?;
    let margs = placeholders.args(mask_guard.as_ref().map(|(s, _)| &**s))?;
    let p = kernel_params(cfg, &g, margs.kind)?;
    let (qs, ks) = segment_tables(&g)?;
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
        g: &g,
        p,
        qs: &qs,
        ks: &ks,
        mask: &margs,
        kind,
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
    p: KernelParams,
    qs: &'a CudaSlice<i64>,
    ks: &'a CudaSlice<i64>,
    mask: &'a MaskArgs<'a>,
    kind: Backend,
}

impl Fwd<'_> {
    fn launch<T: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType>(
        &self,
        q: &CudaStorage,
        k: &CudaStorage,
        v: &CudaStorage,
        lse: &mut CudaSlice<f32>,
    ) -> Result<CudaSlice<T>> {
        let g = self.g;
        let mut o = self.dev.alloc_zeros::<T>(g.q_rows * g.ev)?;
        let longest = g.q_segs.iter().map(|s| s.len).max().unwrap_or(0);
        if longest == 0 {
            return Ok(o);
        }
        let (q, k, v) = (
            q.as_cuda_slice::<T>()?,
            k.as_cuda_slice::<T>()?,
            v.as_cuda_slice::<T>()?,
        );
        let dt = dtype_name(T::DTYPE)?;
        let mut p = self.p;
        match self.kind {
            Backend::Flash => {
                let d = flash_bucket(g.e);
                let smem = flash_fwd_smem(d);
                p.tiles = tiles(longest, FLASH_FWD_ROWS)? as i32;
                let f = function(
                    self.dev,
                    &format!("flash_fwd_{dt}_{d}"),
                    FLASH_FWD_MODULE,
                    attn_kernels::FLASH_FWD,
                    smem,
                )?;
                let mut cfg = grid(g.q_segs.len(), p.tiles as usize)?;
                cfg.shared_mem_bytes = smem as u32;
                let stream = self.dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                b.arg(q)
                    .arg(k)
                    .arg(v)
                    .arg(&mut o)
                    .arg(lse)
                    .arg(self.qs)
                    .arg(self.ks)
                    .arg(&p);
                // SAFETY: the argument list matches flash_fwd_*'s signature; every access is
                // bounded by the segment table built from the layouts of these very storages.
                unsafe { b.launch(cfg) }.w()?;
            }
            _ => {
                let d = eff_bucket(g.e, g.ev);
                p.tiles = tiles(longest, EFF_ROWS)? as i32;
                let f = function(
                    self.dev,
                    &format!("eff_fwd_{dt}_{d}"),
                    EFFICIENT_MODULE,
                    attn_kernels::EFFICIENT,
                    0,
                )?;
                let stream = self.dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                b.arg(q)
                    .arg(k)
                    .arg(v)
                    .arg(self.mask.bias)
                    .arg(self.mask.boolean);
                b.arg(&mut o).arg(lse).arg(self.qs).arg(self.ks).arg(&p);
                // SAFETY: as above, for eff_fwd_*; the mask offsets come from its broadcast layout.
                unsafe { b.launch(grid(g.q_segs.len(), p.tiles as usize)?) }.w()?;
            }
        }
        Ok(o)
    }
}

/// Whether `ATTN_OP_CUDA_DETERMINISTIC` asks for the atomic-free dQ pass.
fn deterministic() -> bool {
    std::env::var("ATTN_OP_CUDA_DETERMINISTIC").is_ok_and(|v| !v.is_empty() && v != "0")
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
    let o = o.to_dtype(dtype)?.contiguous()?;
    let dout = dout.to_dtype(dtype)?.contiguous()?;
    let lse = lse.to_dtype(DType::F32)?.contiguous()?;
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
    let mask = broadcast_mask(cfg, ql, kl, &dev)?;
    let mask_guard = mask.as_ref().map(|m| m.storage_and_layout());
    let g = geometry(cfg, ql, kl, vl, mask_guard.as_ref().map(|(_, l)| *l))?;
    let (cc, smem) = device_caps(&dev)?;
    if let Some(why) = refusal_for(kind, dtype, g.e, g.ev, mask.is_some(), cc, smem) {
        bail!("attention backward (CUDA, {kind:?}): {why}");
    }
    if o.elem_count() != g.q_rows * g.ev
        || dout.elem_count() != o.elem_count()
        || lse.elem_count() != g.q_rows
    {
        bail!(
            "attention backward (CUDA): output ({:?}), its gradient ({:?}) or logsumexp ({:?}) do not match the inputs",
            o.dims(),
            dout.dims(),
            lse.dims()
        );
    }
    let placeholders = Placeholders::new(&dev)?;
    let margs = placeholders.args(mask_guard.as_ref().map(|(s, _)| &**s))?;
    let p = kernel_params(cfg, &g, margs.kind)?;
    let (qs, ks) = segment_tables(&g)?;
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
            g: &g,
            p,
            qs: &qs,
            ks: &ks,
            mask: &margs,
            kind,
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
    p: KernelParams,
    qs: &'a CudaSlice<i64>,
    ks: &'a CudaSlice<i64>,
    mask: &'a MaskArgs<'a>,
    kind: Backend,
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
        if g.q_rows == 0 || g.kv_rows == 0 {
            return Ok(());
        }
        let dt = dtype_name(T::DTYPE)?;
        let (q, k, v) = (
            q.as_cuda_slice::<T>()?,
            k.as_cuda_slice::<T>()?,
            v.as_cuda_slice::<T>()?,
        );
        let (o, dout) = (o.as_cuda_slice::<T>()?, dout.as_cuda_slice::<T>()?);
        let eff =
            |name: &str| function(self.dev, name, EFFICIENT_MODULE, attn_kernels::EFFICIENT, 0);

        // D_i = dO_i . O_i, one warp a row.
        let mut delta = self.dev.alloc_zeros::<f32>(g.q_rows)?;
        {
            let f = eff(&format!("attn_delta_{dt}"))?;
            let rows = g.q_rows as i64;
            let ev = g.ev as i32;
            let warps = (THREADS / 32) as usize;
            let cfg = LaunchConfig {
                grid_dim: (
                    u32::try_from(g.q_rows.div_ceil(warps))
                        .or_else(|_| bail!("attention (CUDA): too many rows"))?,
                    1,
                    1,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let stream = self.dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(o).arg(dout).arg(&mut delta).arg(&rows).arg(&ev);
            // SAFETY: attn_delta_* reads `rows` rows of `ev` from o and dout, both that long.
            unsafe { b.launch(cfg) }.w()?;
        }

        let det = deterministic();
        let with_dq = i32::from(!det);
        let longest_k = g.kv_segs.iter().map(|s| s.len).max().unwrap_or(0);
        let mut p = self.p;
        let flash_bwd = self.kind == Backend::Flash && g.e <= MAX_FLASH_BWD_HEAD_DIM;
        if flash_bwd {
            let d = flash_bucket(g.e);
            let smem = flash_bwd_smem(d);
            p.tiles = tiles(longest_k, FLASH_BWD_KEYS)? as i32;
            let f = function(
                self.dev,
                &format!("flash_bwd_{dt}_{d}"),
                FLASH_BWD_MODULE,
                attn_kernels::FLASH_BWD,
                smem,
            )?;
            let mut cfg = grid(g.kv_segs.len(), p.tiles as usize)?;
            cfg.shared_mem_bytes = smem as u32;
            let stream = self.dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(q).arg(k).arg(v).arg(dout).arg(self.lse).arg(&delta);
            b.arg(&mut *grads.dq)
                .arg(&mut *grads.dk)
                .arg(&mut *grads.dv);
            b.arg(self.qs).arg(self.ks).arg(&p).arg(&with_dq);
            // SAFETY: matches flash_bwd_*'s signature; accesses bounded by the segment tables.
            unsafe { b.launch(cfg) }.w()?;
        } else {
            let d = eff_bucket(g.e, g.ev);
            p.tiles = tiles(longest_k, EFF_ROWS)? as i32;
            let f = eff(&format!("eff_bwd_{dt}_{d}"))?;
            let stream = self.dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(q)
                .arg(k)
                .arg(v)
                .arg(self.mask.bias)
                .arg(self.mask.boolean)
                .arg(dout);
            b.arg(self.lse)
                .arg(&delta)
                .arg(&mut *grads.dq)
                .arg(&mut *grads.dk)
                .arg(&mut *grads.dv);
            b.arg(self.qs).arg(self.ks).arg(&p).arg(&with_dq);
            // SAFETY: matches eff_bwd_*'s signature; accesses bounded by the segment tables.
            unsafe { b.launch(grid(g.kv_segs.len(), p.tiles as usize)?) }.w()?;
        }
        if det {
            let d = eff_bucket(g.e, g.ev);
            let longest_q = g.q_segs.iter().map(|s| s.len).max().unwrap_or(0);
            p.tiles = tiles(longest_q, EFF_ROWS)? as i32;
            let f = eff(&format!("eff_dq_{dt}_{d}"))?;
            let stream = self.dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(q)
                .arg(k)
                .arg(v)
                .arg(self.mask.bias)
                .arg(self.mask.boolean)
                .arg(dout);
            b.arg(self.lse)
                .arg(&delta)
                .arg(&mut *grads.dq)
                .arg(self.qs)
                .arg(self.ks)
                .arg(&p);
            // SAFETY: matches eff_dq_*'s signature; accesses bounded by the segment tables.
            unsafe { b.launch(grid(g.q_segs.len(), p.tiles as usize)?) }.w()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_shared_memory() {
        assert_eq!(flash_bucket(8), 32);
        assert_eq!(flash_bucket(80), 96);
        assert_eq!(flash_bucket(256), 256);
        assert_eq!(eff_bucket(8, 130), 256);
        // The sizes flash_fwd.cu / flash_bwd.cu carve out of dynamic shared memory.
        assert_eq!(flash_fwd_smem(128), 87_040);
        assert_eq!(flash_fwd_smem(256), 101_376);
        assert_eq!(flash_bwd_smem(128), 57_088);
        assert_eq!(flash_bwd_smem(64), 46_592);
    }

    #[test]
    fn refusals_name_the_reason() {
        let cap = attn_kernels::COMPUTE_CAP;
        let big = 227 * 1024;
        let r = |b, dt, e, ev, m, cc| refusal_for(b, dt, e, ev, m, cc, big);
        assert!(r(Backend::Flash, DType::F16, 64, 64, false, cap.max(80)).is_none());
        assert!(r(Backend::Flash, DType::F32, 64, 64, false, cap.max(80))
            .unwrap()
            .contains("f32"));
        assert!(r(Backend::Flash, DType::F16, 64, 64, true, cap.max(80))
            .unwrap()
            .contains("attn_mask"));
        assert!(r(Backend::Flash, DType::BF16, 60, 60, false, cap.max(80))
            .unwrap()
            .contains("multiples of 8"));
        assert!(r(Backend::Flash, DType::BF16, 64, 32, false, cap.max(80))
            .unwrap()
            .contains("equal"));
        assert!(r(Backend::Efficient, DType::F32, 300, 8, true, cap)
            .unwrap()
            .contains("above 256"));
        assert!(r(Backend::Efficient, DType::F32, 13, 7, true, cap).is_none());
        assert!(r(
            Backend::Efficient,
            DType::F32,
            64,
            64,
            false,
            cap.saturating_sub(5)
        )
        .unwrap()
        .contains("rebuild"));
        assert!(refusal_for(
            Backend::Flash,
            DType::F16,
            256,
            256,
            false,
            cap.max(80),
            48 * 1024
        )
        .unwrap()
        .contains("shared memory"));
    }
}
