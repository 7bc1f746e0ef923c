//! `ATTN_OP_CUDA_DETERMINISTIC=1` replaces the f32 atomics of dQ by a separate pass: gradients
//! are then identical from run to run and agree with the atomic version. A test binary of its
//! own, since it sets the process environment.
//!
//! Built with `--features cuda` (without a CUDA device it prints `SKIP` and passes) or
//! `--features cuda-emu` (the kernels in the CPU emulator, on a shorter sequence).
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

mod kernel_target;

use attn_op::{scaled_dot_product_attention, sdpa_kernel, Backend, SdpaOptions};
use candle_core::{DType, Result, Tensor, Var};
use kernel_target::Target;

fn grads(backend: Backend, q: &Var, k: &Var, v: &Var, dout: &Tensor) -> Result<Vec<Vec<f32>>> {
    let _only = sdpa_kernel(&[backend]);
    let opts = SdpaOptions {
        is_causal: true,
        dropout_p: 0.1,
        seed: Some(3),
        enable_gqa: true,
        ..Default::default()
    };
    let y = scaled_dot_product_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &opts)?;
    let g = (y.to_dtype(DType::F32)? * dout)?.sum_all()?.backward()?;
    [q, k, v]
        .iter()
        .map(|x| {
            g.get(x.as_tensor())
                .expect("gradient")
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()
        })
        .collect()
}

#[test]
fn deterministic_dq_is_reproducible() -> Result<()> {
    let Some(target) = Target::get() else {
        return Ok(());
    };
    let gpu = target.device();
    let _running = target.run();
    let l = if target.emulated() { 100 } else { 300 };
    for (backend, dtype) in [
        (Backend::Flash, DType::BF16),
        (Backend::Efficient, DType::F32),
    ] {
        let mk = |h: usize, l: usize| -> Result<Var> {
            Var::from_tensor(&Tensor::randn(0f32, 1., (2, h, l, 64), &gpu)?.to_dtype(dtype)?)
        };
        let (q, k, v) = (mk(8, l)?, mk(2, l)?, mk(2, l)?);
        let dout = Tensor::randn(0f32, 1., (2, 8, l, 64), &gpu)?;
        std::env::remove_var("ATTN_OP_CUDA_DETERMINISTIC");
        let atomic = grads(backend, &q, &k, &v, &dout)?;
        std::env::set_var("ATTN_OP_CUDA_DETERMINISTIC", "1");
        let first = grads(backend, &q, &k, &v, &dout)?;
        let second = grads(backend, &q, &k, &v, &dout)?;
        std::env::remove_var("ATTN_OP_CUDA_DETERMINISTIC");
        assert_eq!(
            first, second,
            "{backend:?}: deterministic gradients differ between runs"
        );
        for (i, (a, d)) in atomic.iter().zip(&first).enumerate() {
            let scale = a.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
            let diff = a.iter().zip(d).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            let tol = if dtype == DType::F32 { 1e-4 } else { 3e-2 };
            assert!(
                diff / scale <= tol,
                "{backend:?}: gradient {i} atomic vs deterministic {:.2e}",
                diff / scale
            );
        }
    }
    Ok(())
}
