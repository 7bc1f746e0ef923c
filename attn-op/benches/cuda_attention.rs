//! Times attn-op's CUDA flash and efficient kernels (forward, forward + backward) on the shapes of
//! the CUDA issue and prints one JSON line per measurement (median of timed runs, each ended by a
//! device synchronization), for `scripts/bench_sdpa.py` to put beside PyTorch's SDPA. The f32
//! efficient runs come twice: `attn-op-efficient` (the tensor-core kernels, 3xTF32, sm80+) and
//! `attn-op-efficient-simt` (the CUDA-core kernels, `ATTN_OP_CUDA_EFFICIENT_SIMT=1`); the bf16
//! flash runs too: `attn-op-flash` (the forward's default tiling, 128-row query tiles up to head
//! dim 128) and `attn-op-flash-r64` (64-row tiles, `ATTN_OP_CUDA_FWD_ROWS=64`), as the f32
//! tensor-core efficient ones (`attn-op-efficient-r64`).
//!
//! `cargo bench -p attn-op --features cuda --bench cuda_attention [-- --quick]`; without a CUDA
//! device it prints `SKIP` and exits 0.

use std::time::Instant;

use attn_op::{scaled_dot_product_attention, sdpa_kernel, Backend, SdpaOptions};
use candle_core::{DType, Device, Result, Tensor, Var};

struct Shape {
    b: usize,
    h: usize,
    l: usize,
    d: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median milliseconds of `f` over `iters` runs after `warmup` runs.
fn time(
    dev: &Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(ms))
}

#[allow(clippy::too_many_arguments)]
fn bench(
    dev: &Device,
    backend: Backend,
    label: &str,
    s: &Shape,
    dtype: DType,
    causal: bool,
    iters: usize,
) -> Result<()> {
    let mk = || -> Result<Var> {
        Var::from_tensor(&Tensor::randn(0f32, 1., (s.b, s.h, s.l, s.d), dev)?.to_dtype(dtype)?)
    };
    let (q, k, v) = (mk()?, mk()?, mk()?);
    let dout = Tensor::randn(0f32, 1., (s.b, s.h, s.l, s.d), dev)?.to_dtype(dtype)?;
    let opts = SdpaOptions {
        is_causal: causal,
        ..Default::default()
    };
    let _only = sdpa_kernel(&[backend]);
    let fwd = || scaled_dot_product_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &opts);
    let flops = 4.0 * (s.b * s.h * s.l * s.l * s.d) as f64 * if causal { 0.5 } else { 1.0 };
    let report = |pass: &str, ms: f64, flops: f64| {
        println!(
            "{{\"impl\":\"attn-op-{label}\",\"shape\":[{},{},{},{}],\"dtype\":\"{}\",\"causal\":{},\"pass\":\"{}\",\"ms\":{:.4},\"tflops\":{:.2}}}",
            s.b,
            s.h,
            s.l,
            s.d,
            dtype.as_str(),
            causal,
            pass,
            ms,
            flops / ms / 1e9
        );
    };
    let ms = time(dev, 3, iters, || fwd().map(|_| ()))?;
    report("fwd", ms, flops);
    let ms = time(dev, 2, iters, || {
        let y = fwd()?;
        // The upstream gradient enters through (y * dout).sum(); that elementwise pass is small
        // next to attention at these lengths.
        let g = (y * &dout)?.sum_all()?.backward()?;
        g.get(q.as_tensor())
            .map(|_| ())
            .ok_or_else(|| candle_core::Error::Msg("no dq".into()))
    })?;
    report("fwd+bwd", ms, flops * 3.5);
    Ok(())
}

fn main() -> Result<()> {
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            assert!(
                std::env::var_os("ATTN_OP_REQUIRE_GPU").is_none(),
                "ATTN_OP_REQUIRE_GPU is set but no CUDA device opens: {e}"
            );
            println!(
                "SKIP: no CUDA device ({})",
                e.to_string().lines().next().unwrap_or("")
            );
            return Ok(());
        }
    };
    let quick = std::env::args().any(|a| a == "--quick");
    let iters = if quick { 5 } else { 15 };
    // The tutorial's shape in fp16.
    let tutorial = Shape {
        b: 32,
        h: 32,
        l: 1024,
        d: 32,
    };
    for backend in [Backend::Flash, Backend::Efficient] {
        for causal in [false, true] {
            bench(
                &dev,
                backend,
                backend.name(),
                &tutorial,
                DType::F16,
                causal,
                iters,
            )?;
        }
    }
    // B·H = 128 in bf16, L in 1k/4k/8k, head dims 64 and 128; efficient also in f32.
    let lens: &[usize] = if quick {
        &[1024, 4096]
    } else {
        &[1024, 4096, 8192]
    };
    for &d in &[64, 128] {
        for &l in lens {
            let s = Shape { b: 16, h: 8, l, d };
            for causal in [false, true] {
                let f = Backend::Flash;
                bench(&dev, f, "flash", &s, DType::BF16, causal, iters)?;
                std::env::set_var("ATTN_OP_CUDA_FWD_ROWS", "64");
                bench(&dev, f, "flash-r64", &s, DType::BF16, causal, iters)?;
                std::env::remove_var("ATTN_OP_CUDA_FWD_ROWS");
                if l <= 4096 {
                    let e = Backend::Efficient;
                    bench(&dev, e, "efficient", &s, DType::F32, causal, iters)?;
                    std::env::set_var("ATTN_OP_CUDA_FWD_ROWS", "64");
                    bench(&dev, e, "efficient-r64", &s, DType::F32, causal, iters)?;
                    std::env::remove_var("ATTN_OP_CUDA_FWD_ROWS");
                    std::env::set_var("ATTN_OP_CUDA_EFFICIENT_SIMT", "1");
                    bench(&dev, e, "efficient-simt", &s, DType::F32, causal, iters)?;
                    std::env::remove_var("ATTN_OP_CUDA_EFFICIENT_SIMT");
                }
            }
        }
    }
    Ok(())
}
