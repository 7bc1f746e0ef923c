//! The efficient backend has two sets of CUDA kernels: `eff_tc_*` on the tensor cores (the
//! default from sm80 on; f32 as 3xTF32, f16/bf16 as the flash kernels with masks) and `eff_fwd_*`
//! / `eff_bwd_*` on the CUDA cores (`ATTN_OP_CUDA_EFFICIENT_SIMT=1`, and every device below sm80).
//! Both are checked here (the tensor-core f32 forward on both its tilings, 128-row query tiles
//! and `ATTN_OP_CUDA_FWD_ROWS=64`), forward and gradients, against a float64 reference (the math
//! backend on the CPU and Candle's autograd, on the same inputs rounded to the dtype) on fresh
//! random inputs:
//! f32 to f32's accuracy (one TF32 product per term instead of three is off by about 3e-4 and
//! fails), bf16 to its rounding. A test binary of its own, since it sets the process environment.
//!
//! Built with `--features cuda` (without a CUDA device it prints `SKIP` and passes) or
//! `--features cuda-emu` (the kernels in the CPU emulator).
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

mod kernel_target;

use attn_op::{scaled_dot_product_attention, sdpa_kernel, Backend, SdpaOptions};
use candle_core::{DType, Device, Result, Tensor, Var};
use kernel_target::Target;

/// Largest error allowed in `dtype`: of the output relative to the reference's largest output,
/// of dq, dk and dv relative to the reference's largest gradient.
/// Worst seen in the emulator over 5 runs of the cases below: f32 1.4e-6, bf16 4.8e-3; one TF32
/// product instead of three gives 3e-4, a mask read one column off 0.2 and more.
fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-5
    } else {
        2e-2
    }
}

struct Case {
    lq: usize,
    lk: usize,
    e: usize,
    ev: usize,
    causal: bool,
    /// 0: none, 1: boolean, 2: additive.
    mask: u8,
}

fn sdpa(
    backend: Backend,
    c: &Case,
    [q, k, v]: [&Tensor; 3],
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let _only = sdpa_kernel(&[backend]);
    let opts = SdpaOptions {
        attn_mask: mask.map(|m| m.to_device(q.device())).transpose()?,
        is_causal: c.causal,
        enable_gqa: true,
        ..Default::default()
    };
    scaled_dot_product_attention(q, k, v, &opts)
}

fn max_abs(t: &Tensor) -> Result<f64> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()
}

/// Output and (dq, dk, dv) of `sum(sdpa(q, k, v) * dout)` for CPU inputs, run on `dev` in `dtype`.
fn value_and_grads(
    backend: Backend,
    c: &Case,
    inputs: [&Tensor; 4],
    mask: Option<&Tensor>,
    dev: &Device,
    dtype: DType,
) -> Result<[Tensor; 4]> {
    let [q, k, v, dout] = inputs.map(|t| t.to_dtype(dtype).and_then(|t| t.to_device(dev)));
    let vars = [
        Var::from_tensor(&q?)?,
        Var::from_tensor(&k?)?,
        Var::from_tensor(&v?)?,
    ];
    let mask = match mask {
        Some(m) if m.dtype() != DType::U8 => Some(m.to_dtype(dtype)?),
        m => m.cloned(),
    };
    let y = sdpa(
        backend,
        c,
        [
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
        ],
        mask.as_ref(),
    )?;
    let grads = (&y * dout?)?.sum_all()?.backward()?;
    let g = |v: &Var| {
        grads
            .get(v.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("missing gradient".into()))
    };
    Ok([y, g(&vars[0])?, g(&vars[1])?, g(&vars[2])?])
}

/// The errors of the efficient kernels on `target` (as the environment selects them) in `dtype`
/// for the case against its float64 reference: output, dq, dk, dv (see [`tolerance`]).
fn errors(c: &Case, dtype: DType, target: &Target) -> Result<[f64; 4]> {
    let cpu = Device::Cpu;
    // Random f32 values rounded to `dtype`, so that the reference sees the kernels' very inputs.
    let rand = |shape: (usize, usize, usize, usize)| -> Result<Tensor> {
        Tensor::randn(0f32, 1., shape, &cpu)?
            .to_dtype(dtype)?
            .to_dtype(DType::F32)
    };
    let q = rand((2, 4, c.lq, c.e))?;
    let k = rand((2, 2, c.lk, c.e))?;
    let v = rand((2, 2, c.lk, c.ev))?;
    let dout = rand((2, 4, c.lq, c.ev))?;
    let mask = match c.mask {
        0 => None,
        1 => Some(Tensor::rand(0f32, 1., (4, c.lq, c.lk), &cpu)?.ge(0.2)?),
        _ => Some(rand((1, 1, c.lq, c.lk))?.squeeze(0)?),
    };
    let inputs = [&q, &k, &v, &dout];
    let reference = value_and_grads(Backend::Math, c, inputs, mask.as_ref(), &cpu, DType::F64)?;
    let out = {
        let _running = target.run();
        value_and_grads(
            Backend::Efficient,
            c,
            inputs,
            mask.as_ref(),
            &target.device(),
            dtype,
        )?
    };
    let grad_scale = max_abs(&reference[1])?
        .max(max_abs(&reference[2])?)
        .max(max_abs(&reference[3])?);
    let mut errs = [0.0; 4];
    for i in 0..4 {
        let scale = if i == 0 {
            max_abs(&reference[0])?
        } else {
            grad_scale
        };
        let diff = max_abs(&(out[i].to_device(&cpu)?.to_dtype(DType::F64)? - &reference[i])?)?;
        errs[i] = if diff.is_finite() {
            diff / scale.max(1e-3)
        } else {
            f64::INFINITY
        };
    }
    Ok(errs)
}

#[test]
fn tensor_core_and_cuda_core_kernels_match_float64() -> Result<()> {
    let Some(target) = Target::get() else {
        return Ok(());
    };
    // Head-dim buckets 64, 128 (different q/k and v dims), 256; tails of every tile size;
    // causal, boolean and additive masks; GQA (4 query heads on 2 key/value heads).
    let mut cases = vec![
        Case {
            lq: 65,
            lk: 63,
            e: 64,
            ev: 64,
            causal: true,
            mask: 0,
        },
        Case {
            lq: 70,
            lk: 129,
            e: 40,
            ev: 72,
            causal: false,
            mask: 1,
        },
        Case {
            lq: 7,
            lk: 33,
            e: 200,
            ev: 200,
            causal: false,
            mask: 2,
        },
        Case {
            lq: 130,
            lk: 70,
            e: 8,
            ev: 8,
            causal: true,
            mask: 0,
        },
    ];
    // On a GPU also a longer causal case (several key tiles per block, heavy tiles first).
    let long = Case {
        lq: 300,
        lk: 1000,
        e: 128,
        ev: 128,
        causal: true,
        mask: 0,
    };
    if !target.emulated() {
        cases.push(long);
    }
    // The tensor-core kernels with their default forward tiling (128-row query tiles past 64
    // rows: the cases of 65, 70 and 130 rows), with 64-row tiles (`ATTN_OP_CUDA_FWD_ROWS=64`),
    // then the CUDA-core kernels.
    let modes = [
        ("tensor cores", None),
        (
            "tensor cores, 64-row forward",
            Some(("ATTN_OP_CUDA_FWD_ROWS", "64")),
        ),
        ("CUDA cores", Some(("ATTN_OP_CUDA_EFFICIENT_SIMT", "1"))),
    ];
    let mut failures = Vec::new();
    for (what, env) in modes {
        if let Some((key, value)) = env {
            std::env::set_var(key, value);
        }
        for dtype in [DType::F32, DType::BF16] {
            for c in &cases {
                let errs = errors(c, dtype, &target)?;
                let shown = errs.map(|e| format!("{e:.2e}")).join(", ");
                let what = format!("{what} {dtype:?}");
                eprintln!(
                    "{what}: lq {} lk {} e {} ev {} causal {} mask {}: out, dq, dk, dv {shown}",
                    c.lq, c.lk, c.e, c.ev, c.causal, c.mask
                );
                if errs.iter().any(|&e| e > tolerance(dtype)) {
                    failures.push(format!("{what}, e {} ev {}: {shown}", c.e, c.ev));
                }
            }
        }
        if let Some((key, _)) = env {
            std::env::remove_var(key);
        }
    }
    assert!(failures.is_empty(), "above the tolerance: {failures:?}");
    Ok(())
}
