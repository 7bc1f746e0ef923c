//! The CUDA kernels run on the CPU, for testing them without a GPU (feature `cuda-emu`).
//!
//! While an [`emulate_cuda`] guard lives, the flash and efficient ops on CPU tensors do what they
//! would do on a CUDA device: the same refusals (for an sm_90 device with 227 KiB of shared
//! memory per block), the same parameter block, segment tables and list of launches (the CUDA
//! module's own, from `kernel_plan`), run by `attn_kernels::emu`, which executes the kernels'
//! CUDA C++ compiled for the CPU. Comparing the results with the CPU implementation's checks the
//! kernels' arithmetic and indexing; see `attn_kernels::emu` for what the emulator checks on
//! the way and what it cannot (data races, speed).
//!
//! ```
//! use attn_op::{scaled_dot_product_attention, sdpa_kernel, Backend, SdpaOptions};
//! use candle_core::{DType, Device, Tensor};
//! # fn main() -> candle_core::Result<()> {
//! let q = Tensor::randn(0f32, 1., (1, 2, 9, 32), &Device::Cpu)?.to_dtype(DType::F16)?;
//! let _flash = sdpa_kernel(&[Backend::Flash]);
//! let cpu = scaled_dot_product_attention(&q, &q, &q, &SdpaOptions::default())?;
//! let kernels = {
//!     let _emulate = attn_op::emu::emulate_cuda();
//!     scaled_dot_product_attention(&q, &q, &q, &SdpaOptions::default())?
//! };
//! let diff = (cpu.to_dtype(DType::F32)? - kernels.to_dtype(DType::F32)?)?.abs()?.max_all()?;
//! assert!(diff.to_scalar::<f32>()? < 1e-2);
//! # Ok(())
//! # }
//! ```

use std::cell::Cell;
use std::marker::PhantomData;

use attn_kernels::emu::{Args, Buffer};
use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

use crate::config::AttnConfig;
use crate::kernel_plan::{
    backward_launches, dense, deterministic, dropout_launch, forward_launch, segment_tables, Call,
    KernelKind, Launch, DROPOUT_THREADS, THREADS,
};
use crate::Backend;

/// The device the emulator stands for: compute capability 9.0, 227 KiB of shared memory.
const CC: u32 = 90;
const SMEM: usize = 227 * 1024;
const WHAT: &str = "attention (CUDA emulator)";

thread_local! {
    static EMULATING: Cell<usize> = const { Cell::new(0) };
}

/// While the returned guard lives, flash and efficient attention on CPU tensors (forward and
/// backward) run the CUDA kernels in the emulator on this thread. Guards nest.
pub fn emulate_cuda() -> EmulateCuda {
    EMULATING.with(|c| c.set(c.get() + 1));
    EmulateCuda {
        _thread: PhantomData,
    }
}

/// Whether an [`emulate_cuda`] guard is alive on this thread.
pub fn is_emulating() -> bool {
    EMULATING.with(|c| c.get() > 0)
}

/// The guard of [`emulate_cuda`]; not `Send` (the switch is per thread).
pub struct EmulateCuda {
    _thread: PhantomData<*const ()>,
}

impl Drop for EmulateCuda {
    fn drop(&mut self) {
        EMULATING.with(|c| c.set(c.get() - 1));
    }
}

/// A tensor's whole storage as emulator memory (as `as_cuda_slice` hands a kernel the whole
/// device allocation: offsets into it come from the segment tables).
enum Buf {
    F32(Buffer<f32>),
    F16(Buffer<f16>),
    BF16(Buffer<bf16>),
    U8(Buffer<u8>),
}

impl Buf {
    fn of(s: &CpuStorage) -> Result<Self> {
        Ok(match s {
            CpuStorage::F32(v) => Buf::F32(Buffer::from_slice(v)),
            CpuStorage::F16(v) => Buf::F16(Buffer::from_slice(v)),
            CpuStorage::BF16(v) => Buf::BF16(Buffer::from_slice(v)),
            CpuStorage::U8(v) => Buf::U8(Buffer::from_slice(v)),
            s => bail!(
                "attention (CUDA emulator): dtype {:?} is not supported",
                s.dtype()
            ),
        })
    }

    fn zeros(dtype: DType, n: usize) -> Result<Self> {
        Self::of(&match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; n]),
            DType::F16 => CpuStorage::F16(vec![f16::ZERO; n]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; n]),
            d => bail!("attention (CUDA emulator): dtype {d:?} is not supported"),
        })
    }

    fn push(&self, args: &mut Args) {
        match self {
            Buf::F32(b) => args.buf(b),
            Buf::F16(b) => args.buf(b),
            Buf::BF16(b) => args.buf(b),
            Buf::U8(b) => args.buf(b),
        };
    }

    fn storage(&self) -> CpuStorage {
        match self {
            Buf::F32(b) => CpuStorage::F32(b.to_vec()),
            Buf::F16(b) => CpuStorage::F16(b.to_vec()),
            Buf::BF16(b) => CpuStorage::BF16(b.to_vec()),
            Buf::U8(b) => CpuStorage::U8(b.to_vec()),
        }
    }
}

fn cpu<'a>(s: &'a Storage, name: &str) -> Result<&'a CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => bail!("attention (CUDA emulator): {name} is not a CPU tensor"),
    }
}

/// The mask arguments: bias and boolean buffers (one-element stand-ins where absent; the
/// parameter block says which one to read).
struct MaskBufs {
    bias: Buf,
    boolean: Buf,
}

impl MaskBufs {
    fn new(mask: Option<&Tensor>) -> Result<Self> {
        let mut m = MaskBufs {
            bias: Buf::F32(Buffer::filled(1, 0.0)),
            boolean: Buf::U8(Buffer::filled(1, 0)),
        };
        if let Some(mask) = mask {
            let (s, _) = mask.storage_and_layout();
            let b = Buf::of(cpu(&s, "attn_mask")?)?;
            if mask.dtype() == DType::U8 {
                m.boolean = b;
            } else {
                m.bias = b;
            }
        }
        Ok(m)
    }
}

fn run(launch: &Launch, args: &Args) -> Result<()> {
    // SAFETY: `args` follows the kernel's parameter list for `launch.kind` (see KernelKind),
    // built from these storages and their segment tables as the CUDA module builds them; an
    // access past a buffer's end stops the process with the kernel named.
    unsafe { args.launch(&launch.name, launch.grid, THREADS, launch.smem) }
        .map_err(|e| candle_core::Error::Msg(format!("attention (CUDA emulator): {e}")))
}

/// Forward in the emulator, as `cuda::forward`: output storage, its shape, row logsumexp.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    kind: Backend,
    cfg: &AttnConfig,
    q: &CpuStorage,
    ql: &Layout,
    k: &CpuStorage,
    kl: &Layout,
    v: &CpuStorage,
    vl: &Layout,
) -> Result<(CpuStorage, Shape, Tensor)> {
    let dtype = q.dtype();
    if k.dtype() != dtype || v.dtype() != dtype {
        bail!("attention (CUDA emulator): q, k, v must share a dtype");
    }
    let call = Call::new(WHAT, kind, cfg, dtype, (ql, kl, vl), &Device::Cpu, CC, SMEM)?;
    let g = &call.g;
    let masks = MaskBufs::new(call.mask.as_ref())?;
    let launch = forward_launch(kind, dtype, g, call.params, (CC, SMEM))?;
    let (qs, ks) = segment_tables(g)?;
    let (qs, ks) = (Buffer::from_slice(&qs), Buffer::from_slice(&ks));
    let lse = Buffer::filled(
        g.q_rows,
        if cfg.varlen.is_some() {
            f32::INFINITY
        } else {
            0.0
        },
    );
    let o = Buf::zeros(dtype, g.q_rows * g.ev)?;
    if let Some(launch) = &launch {
        let inputs = [Buf::of(q)?, Buf::of(k)?, Buf::of(v)?];
        let mut args = Args::default();
        for b in &inputs {
            b.push(&mut args);
        }
        if matches!(launch.kind, KernelKind::EffFwd | KernelKind::EffTcFwd) {
            masks.bias.push(&mut args);
            masks.boolean.push(&mut args);
        }
        o.push(&mut args);
        args.buf(&lse).buf(&qs).buf(&ks).val(launch.params);
        run(launch, &args)?;
    }
    let n = g.q_rows;
    Ok((
        o.storage(),
        call.out_shape(ql),
        Tensor::from_vec(lse.to_vec(), n, &Device::Cpu)?,
    ))
}

/// Backward in the emulator, as `cuda::backward`: `(dq, dk, dv)` shaped like q, k, v.
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
    let (o, dout, lse) = (
        dense(o, dtype)?,
        dense(dout, dtype)?,
        dense(lse, DType::F32)?,
    );
    let (qs_, ql) = q.storage_and_layout();
    let (ks_, kl) = k.storage_and_layout();
    let (vs_, vl) = v.storage_and_layout();
    let (cq, ck, cv) = (cpu(&qs_, "query")?, cpu(&ks_, "key")?, cpu(&vs_, "value")?);
    if ck.dtype() != dtype || cv.dtype() != dtype {
        bail!("attention backward (CUDA emulator): q, k, v must share a dtype");
    }
    let what = "attention backward (CUDA emulator)";
    let call = Call::new(what, kind, cfg, dtype, (ql, kl, vl), &Device::Cpu, CC, SMEM)?;
    call.check_backward(what, &o, &dout, &lse)?;
    let g = &call.g;
    let masks = MaskBufs::new(call.mask.as_ref())?;
    let launches = backward_launches(kind, dtype, g, call.params, deterministic(), (CC, SMEM))?;
    let (qs, ks) = segment_tables(g)?;
    let (qs, ks) = (Buffer::from_slice(&qs), Buffer::from_slice(&ks));
    let dq = Buffer::filled(g.q_rows * g.e, 0f32);
    let dk = Buffer::filled(g.kv_rows * g.e, 0f32);
    let dv = Buffer::filled(g.kv_rows * g.ev, 0f32);
    let delta = Buffer::filled(g.q_rows, 0f32);
    let (qb, kb, vb) = (Buf::of(cq)?, Buf::of(ck)?, Buf::of(cv)?);
    let ob = Buf::of(cpu(&o.storage_and_layout().0, "output")?)?;
    let db = Buf::of(cpu(&dout.storage_and_layout().0, "output gradient")?)?;
    let lb = Buf::of(cpu(&lse.storage_and_layout().0, "logsumexp")?)?;
    for launch in &launches {
        let mut a = Args::default();
        match launch.kind {
            KernelKind::Delta => {
                ob.push(&mut a);
                db.push(&mut a);
                a.buf(&delta).val(g.q_rows as i64).val(g.ev as i32);
            }
            KernelKind::FlashBwd => {
                for b in [&qb, &kb, &vb, &db, &lb] {
                    b.push(&mut a);
                }
                a.buf(&delta).buf(&dq).buf(&dk).buf(&dv).buf(&qs).buf(&ks);
                a.val(launch.params).val(i32::from(launch.with_dq));
            }
            KernelKind::EffBwd | KernelKind::EffTcBwd | KernelKind::EffDq => {
                for b in [&qb, &kb, &vb, &masks.bias, &masks.boolean, &db, &lb] {
                    b.push(&mut a);
                }
                a.buf(&delta).buf(&dq);
                if launch.kind != KernelKind::EffDq {
                    a.buf(&dk).buf(&dv);
                }
                a.buf(&qs).buf(&ks).val(launch.params);
                if launch.kind != KernelKind::EffDq {
                    a.val(i32::from(launch.with_dq));
                }
            }
            KernelKind::FlashFwd | KernelKind::EffFwd | KernelKind::EffTcFwd => {
                bail!(
                    "attention backward (CUDA emulator): {} is not a backward kernel",
                    launch.name
                )
            }
        }
        run(launch, &a)?;
    }
    let t = |b: &Buffer<f32>, like: &Tensor| {
        Tensor::from_vec(b.to_vec(), like.shape(), &Device::Cpu)?.to_dtype(dtype)
    };
    Ok((t(&dq, q)?, t(&dk, k)?, t(&dv, v)?))
}

/// The multipliers of `nn::dropout` made by `dropout_keep_*` in the emulator, as `cuda::dropout_keep`.
pub(crate) fn dropout_keep(
    rows: usize,
    cols: usize,
    p: f64,
    seed: u64,
    dtype: DType,
) -> Result<Tensor> {
    let Some(l) = dropout_launch(rows, cols, p, seed, dtype)? else {
        return Tensor::zeros((rows, cols), dtype, &Device::Cpu);
    };
    let keep = Buf::zeros(dtype, rows * cols)?;
    let mut args = Args::default();
    keep.push(&mut args);
    args.val(l.rows)
        .val(l.cols)
        .val(l.seed[0])
        .val(l.seed[1])
        .val(l.threshold)
        .val(l.scale);
    // SAFETY: the arguments follow dropout_keep_*'s signature; the kernel writes rows * cols
    // elements, the buffer's length.
    unsafe { args.launch(&l.name, (l.blocks, 1), DROPOUT_THREADS, 0) }
        .map_err(|e| candle_core::Error::Msg(format!("dropout (CUDA emulator): {e}")))?;
    Ok(Tensor::from_storage(
        Storage::Cpu(keep.storage()),
        (rows, cols),
        BackpropOp::none(),
        false,
    ))
}
