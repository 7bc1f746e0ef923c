//! `ATTN_OP_CUDA_DETERMINISTIC=1` replaces the f32 atomics of dQ by a separate pass: gradients
//! are then identical from run to run and agree with the atomic version. A test binary of its
//! own, since it sets the process environment.
//!
//! Built with `--features cuda` (without a CUDA device it prints `SKIP` and passes) or
//! `--features cuda-emu` (the kernels in the CPU emulator, on a shorter sequence).
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

mod kernel_target;

use attn_op::{
    scaled_dot_product_attention, sdpa_kernel, Backend, CausalAlign, EfficientAttention,
    SdpaOptions,
};
use candle_core::{DType, Result, Tensor, Var};
use kernel_target::Target;

/// Causal attention with dropout through SDPA on `backend`; with `extras` (the efficient op,
/// the only one whose f32 backward runs eff_dq) a sliding window, ALiBi and a soft cap too.
fn grads(
    backend: Backend,
    extras: bool,
    q: &Var,
    k: &Var,
    v: &Var,
    dout: &Tensor,
) -> Result<Vec<Vec<f32>>> {
    let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
    let y = if extras {
        let op = EfficientAttention::new(0.25, None)
            .with_window(CausalAlign::BottomRight, Some(20), Some(0))
            .with_alibi(&[0.2, 0.0, 0.05, 0.5, 0.1, 0.3, 0.0, 1.0])?
            .with_softcap(2.0)?
            .with_dropout(0.1, 3)?;
        q.apply_op3(k, v, op)?
    } else {
        let _only = sdpa_kernel(&[backend]);
        let opts = SdpaOptions {
            is_causal: true,
            dropout_p: 0.1,
            seed: Some(3),
            enable_gqa: true,
            ..Default::default()
        };
        scaled_dot_product_attention(q, k, v, &opts)?
    };
    let g = (y.to_dtype(DType::F32)? * dout)?.sum_all()?.backward()?;
    [q, k, v]
        .iter()
        .map(|x| {
            g.get(x)
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
    for (backend, dtype, extras) in [
        (Backend::Flash, DType::BF16, false),
        (Backend::Efficient, DType::F32, false),
        (Backend::Efficient, DType::F32, true),
    ] {
        let mk = |h: usize, l: usize| -> Result<Var> {
            Var::from_tensor(&Tensor::randn(0f32, 1., (2, h, l, 64), &gpu)?.to_dtype(dtype)?)
        };
        let (q, k, v) = (mk(8, l)?, mk(2, l)?, mk(2, l)?);
        let dout = Tensor::randn(0f32, 1., (2, 8, l, 64), &gpu)?;
        std::env::remove_var("ATTN_OP_CUDA_DETERMINISTIC");
        let atomic = grads(backend, extras, &q, &k, &v, &dout)?;
        std::env::set_var("ATTN_OP_CUDA_DETERMINISTIC", "1");
        let first = grads(backend, extras, &q, &k, &v, &dout)?;
        let second = grads(backend, extras, &q, &k, &v, &dout)?;
        std::env::remove_var("ATTN_OP_CUDA_DETERMINISTIC");
        assert_eq!(
            first, second,
            "{backend:?} extras {extras}: deterministic gradients differ between runs"
        );
        for (i, (a, d)) in atomic.iter().zip(&first).enumerate() {
            let scale = a.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
            let diff = a.iter().zip(d).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            let tol = if dtype == DType::F32 { 1e-4 } else { 3e-2 };
            assert!(
                diff / scale <= tol,
                "{backend:?} extras {extras}: gradient {i} atomic vs deterministic {:.2e}",
                diff / scale
            );
        }
    }
    Ok(())
}
