//! Gradients: every backend against the math backend's autograd in float64 (itself checked
//! against finite differences), over dtypes, shapes, masks, causality, dropout and layouts.

mod common;

use attn_op::{scaled_dot_product_attention, sdpa_kernel, Backend, SdpaOptions};
use candle_core::{DType, Device, Result, Tensor, Var};
use common::{random_bases, random_mask, rel_err, variants, views, Case, Failures, MaskKind};

/// Output and gradients of `sum(out * w)` with respect to the case's base tensors.
fn gradients(
    case: &Case,
    bases: &[Tensor],
    mask: Option<Tensor>,
    backend: Backend,
    seed: u64,
    w: &Tensor,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars = bases
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<Vec<_>>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (q, k, v) = views(case, &ts)?;
    let opts = SdpaOptions {
        attn_mask: mask,
        dropout_p: case.dropout,
        is_causal: case.causal,
        enable_gqa: case.hq != case.hkv,
        seed: Some(seed),
        ..Default::default()
    };
    let _only = sdpa_kernel(&[backend]);
    let out = scaled_dot_product_attention(&q, &k, &v, &opts)?;
    let loss = (out.to_dtype(DType::F64)? * w)?.sum_all()?;
    let grads = loss.backward()?;
    let g = vars
        .iter()
        .map(|v| {
            grads
                .get(v)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg("missing gradient".into()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((out, g))
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()
}

/// Checks one case: returns a failure description, if any.
fn check(case: &Case, backend: Backend, dtype: DType, seed: u64) -> Result<Option<String>> {
    let bases = random_bases(case, dtype)?;
    let mask = random_mask(case, dtype)?;
    let w = Tensor::randn(0f64, 1., (case.b, case.hq, case.lq, case.ev), &Device::Cpu)?;
    let (_, got) = gradients(case, &bases, mask.clone(), backend, seed, &w)?;
    let bases64 = bases
        .iter()
        .map(|b| b.to_dtype(DType::F64))
        .collect::<Result<Vec<_>>>()?;
    let mask64 = match (&mask, case.mask) {
        (Some(m), MaskKind::Bias) => Some(m.to_dtype(DType::F64)?),
        _ => mask,
    };
    let (_, want) = gradients(case, &bases64, mask64, Backend::Math, seed, &w)?;
    let tol = match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        _ => 6e-2,
    };
    for (i, (g, r)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.dtype(), dtype);
        assert_eq!(g.dims(), bases[i].dims());
        let err = rel_err(g, &to_f64(r)?)?;
        if err > tol {
            return Ok(Some(format!(
                "{backend} {dtype:?} {case:?}: gradient {i} relative error {err:.3e}"
            )));
        }
    }
    Ok(None)
}

fn shapes() -> Vec<Case> {
    vec![
        Case::new(2, 3, 1, 1, 8),
        Case::new(1, 2, 7, 7, 16),
        Case {
            ev: 24,
            ..Case::new(2, 2, 63, 65, 32)
        },
        Case {
            hkv: 2,
            ..Case::new(1, 4, 65, 63, 64)
        },
        Case::new(1, 2, 257, 129, 80),
        Case::new(1, 1, 33, 257, 128),
        Case {
            hkv: 1,
            ..Case::new(1, 2, 17, 9, 256)
        },
    ]
}

fn check_backend(backend: Backend) -> Result<()> {
    let mut failures = Failures::default();
    let mut checked = 0;
    for (si, base) in shapes().into_iter().enumerate() {
        for case in variants(&base) {
            if backend == Backend::Flash && case.mask != MaskKind::None {
                continue;
            }
            // Every variant in f32; half precision on the smaller shapes.
            let dtypes: &[DType] = if si < 4 {
                &[DType::F32, DType::F16, DType::BF16]
            } else {
                &[DType::F32]
            };
            for &dtype in dtypes {
                checked += 1;
                if let Some(f) = check(&case, backend, dtype, 77 + checked as u64)? {
                    failures.push(f);
                }
            }
        }
    }
    eprintln!(
        "{backend:?}: {} of {checked} cases agree",
        checked - failures.len()
    );
    failures.assert_none();
    Ok(())
}

#[test]
fn flash_gradients_match_math_autograd() -> Result<()> {
    check_backend(Backend::Flash)
}

#[test]
fn efficient_gradients_match_math_autograd() -> Result<()> {
    check_backend(Backend::Efficient)
}

#[test]
fn math_gradients_in_half_precision_match_float64() -> Result<()> {
    check_backend(Backend::Math)
}

/// The float64 math backend's autograd against central finite differences, for every option.
#[test]
fn math_autograd_matches_finite_differences() -> Result<()> {
    let base = Case {
        hkv: 1,
        ev: 2,
        ..Case::new(1, 2, 3, 4, 3)
    };
    let variants = [
        Case { ..base.clone() },
        Case {
            causal: true,
            ..base.clone()
        },
        Case {
            mask: MaskKind::Bool,
            ..base.clone()
        },
        Case {
            mask: MaskKind::Bias,
            ..base.clone()
        },
        Case {
            dropout: 0.3,
            ..base.clone()
        },
        Case {
            strided: true,
            causal: true,
            dropout: 0.5,
            ..base.clone()
        },
    ];
    for case in variants {
        let bases = random_bases(&case, DType::F64)?;
        let mask = random_mask(&case, DType::F64)?;
        let w = Tensor::randn(0f64, 1., (case.b, case.hq, case.lq, case.ev), &Device::Cpu)?;
        let (_, grads) = gradients(&case, &bases, mask.clone(), Backend::Math, 5, &w)?;
        let loss = |bs: &[Tensor]| -> Result<f64> {
            let (q, k, v) = views(&case, bs)?;
            let opts = SdpaOptions {
                attn_mask: mask.clone(),
                dropout_p: case.dropout,
                is_causal: case.causal,
                enable_gqa: true,
                seed: Some(5),
                ..Default::default()
            };
            let _only = sdpa_kernel(&[Backend::Math]);
            (scaled_dot_product_attention(&q, &k, &v, &opts)? * &w)?
                .sum_all()?
                .to_scalar::<f64>()
        };
        let h = 1e-6;
        for (bi, base_t) in bases.iter().enumerate() {
            let flat = to_f64(base_t)?;
            let analytic = to_f64(&grads[bi])?;
            for i in 0..flat.len() {
                let bump = |d: f64| -> Result<f64> {
                    let mut x = flat.clone();
                    x[i] += d;
                    let mut bs = bases.clone();
                    bs[bi] = Tensor::from_vec(x, base_t.shape(), &Device::Cpu)?;
                    loss(&bs)
                };
                let fd = (bump(h)? - bump(-h)?) / (2.0 * h);
                assert!(
                    (fd - analytic[i]).abs() <= 1e-6 * analytic[i].abs().max(1.0),
                    "{case:?} base {bi} element {i}: finite difference {fd} vs autograd {}",
                    analytic[i]
                );
            }
        }
    }
    Ok(())
}

/// `loss.backward()` reaches q, k and v through the default dispatch.
#[test]
fn backward_reaches_all_inputs() -> Result<()> {
    let dev = Device::Cpu;
    let q = Var::randn(0f32, 1., (2, 2, 5, 8), &dev)?;
    let k = Var::randn(0f32, 1., (2, 2, 6, 8), &dev)?;
    let v = Var::randn(0f32, 1., (2, 2, 6, 4), &dev)?;
    let y = scaled_dot_product_attention(&q, &k, &v, &SdpaOptions::default())?;
    let grads = y.sqr()?.sum_all()?.backward()?;
    for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.dims(), var.dims());
        assert!(
            g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
            "zero gradient for {name}"
        );
    }
    Ok(())
}
