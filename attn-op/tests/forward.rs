//! Forward of every backend against a float64 reference, over dtypes, shapes, masks, causality,
//! dropout and input layouts, on fresh random inputs.

mod common;

use attn_op::{scaled_dot_product_attention, sdpa_kernel, select_backend, Backend};
use candle_core::{DType, Result};
use common::{inputs, options, reference, rel_err, tolerance, variants, Case, MaskKind};

/// Shapes with odd lengths, Lq != Lk, Ev != E, GQA and head dims from 8 to 256.
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
        Case::new(1, 2, 257, 257, 80),
        Case::new(1, 1, 33, 257, 128),
        // Decoding: tasks of one or two query rows take the dot-product path over several key tiles.
        Case::new(1, 2, 2, 300, 64),
        Case {
            hkv: 1,
            ..Case::new(1, 2, 17, 9, 256)
        },
    ]
}

fn check_backend(backend: Backend) -> Result<()> {
    let _only = sdpa_kernel(&[backend]);
    let mut failures = Vec::new();
    let mut checked = 0;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for base in shapes() {
            for case in variants(&base) {
                let inp = inputs(&case, dtype)?;
                let seed = 1000 + checked as u64;
                let opts = options(&case, &inp, seed);
                if backend == Backend::Flash && case.mask != MaskKind::None {
                    let err = select_backend(&inp.q, &inp.k, &inp.v, &opts)
                        .unwrap_err()
                        .to_string();
                    assert!(err.contains("flash: attn_mask is not supported"), "{err}");
                    continue;
                }
                let out = scaled_dot_product_attention(&inp.q, &inp.k, &inp.v, &opts)?;
                assert_eq!(out.dims(), &[case.b, case.hq, case.lq, case.ev]);
                assert_eq!(out.dtype(), dtype);
                let err = rel_err(&out, &reference(&case, &inp, seed)?)?;
                checked += 1;
                if err > tolerance(dtype) {
                    failures.push(format!("{dtype:?} {case:?}: relative error {err:.3e}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{backend}: {} of {checked} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked > 100);
    Ok(())
}

#[test]
fn flash_forward_matches_reference() -> Result<()> {
    check_backend(Backend::Flash)
}

#[test]
fn efficient_forward_matches_reference() -> Result<()> {
    check_backend(Backend::Efficient)
}

#[test]
fn math_forward_matches_reference() -> Result<()> {
    check_backend(Backend::Math)
}

/// The tutorial's 3-D inputs `(2, 3, 8)` go through every backend.
#[test]
fn three_dimensional_inputs() -> Result<()> {
    let case = Case::new(1, 2, 3, 3, 8);
    let inp = inputs(&case, DType::F32)?;
    let (q, k, v) = (inp.q.squeeze(0)?, inp.k.squeeze(0)?, inp.v.squeeze(0)?);
    let want = reference(&case, &inp, 0)?;
    for backend in Backend::ALL {
        let _only = sdpa_kernel(&[backend]);
        let out = scaled_dot_product_attention(&q, &k, &v, &Default::default())?;
        assert_eq!(out.dims(), &[2, 3, 8]);
        assert!(rel_err(&out, &want)? < 1e-5, "{backend}");
    }
    Ok(())
}

/// Five-dimensional inputs: extra leading dims are batch dims.
#[test]
fn five_dimensional_inputs() -> Result<()> {
    let case = Case {
        causal: true,
        ..Case::new(6, 2, 9, 9, 16)
    };
    let inp = inputs(&case, DType::F32)?;
    let want = reference(&case, &inp, 0)?;
    let r5 = |t: &candle_core::Tensor| t.reshape((2, 3, 2, t.dim(2).unwrap(), t.dim(3).unwrap()));
    for backend in Backend::ALL {
        let _only = sdpa_kernel(&[backend]);
        let opts = options(&case, &inp, 0);
        let out = scaled_dot_product_attention(&r5(&inp.q)?, &r5(&inp.k)?, &r5(&inp.v)?, &opts)?;
        assert_eq!(out.dims(), &[2, 3, 2, 9, 16]);
        assert!(rel_err(&out, &want)? < 1e-5, "{backend}");
    }
    Ok(())
}
