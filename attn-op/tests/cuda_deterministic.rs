//! `ATTN_OP_CUDA_DETERMINISTIC=1` replaces the f32 atomics of dQ by a separate pass: gradients
//! are then identical from run to run and agree with the atomic version. A test binary of its
//! own, since it sets the process environment.
//!
//! Built only with `--features cuda`; without a CUDA device it prints `SKIP` and passes.
#![cfg(feature = "cuda")]

use attn_op::{scaled_dot_product_attention, sdpa_kernel, Backend, SdpaOptions};
use candle_core::{DType, Device, Result, Tensor, Var};

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
    let gpu = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            assert!(
                std::env::var_os("ATTN_OP_REQUIRE_GPU").is_none(),
                "ATTN_OP_REQUIRE_GPU is set but no CUDA device opens: {e}"
            );
            eprintln!(
                "SKIP: no CUDA device ({})",
                e.to_string().lines().next().unwrap_or("")
            );
            return Ok(());
        }
    };
    for (backend, dtype) in [
        (Backend::Flash, DType::BF16),
        (Backend::Efficient, DType::F32),
    ] {
        let mk = |h: usize, l: usize| -> Result<Var> {
            Var::from_tensor(&Tensor::randn(0f32, 1., (2, h, l, 64), &gpu)?.to_dtype(dtype)?)
        };
        let (q, k, v) = (mk(8, 300)?, mk(2, 300)?, mk(2, 300)?);
        let dout = Tensor::randn(0f32, 1., (2, 8, 300, 64), &gpu)?;
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
