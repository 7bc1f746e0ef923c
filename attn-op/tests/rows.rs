//! `attn_op::rows::QkvRows` against the math backend in f64, forward and backward.

use attn_op::rows::QkvRows;
use attn_op::{scaled_dot_product_attention, sdpa_kernel, Backend, SdpaOptions};
use candle_core::{DType, Device, Result, Tensor, Var};

/// Output rows `(B·T, C)` and the gradient of `Σ y ⊙ w` with respect to the packed rows, by the
/// math backend in f64.
fn math_reference(
    qkv: &[f32],
    w: &[f32],
    (b, t, h, d): (usize, usize, usize, usize),
    causal: bool,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let c = h * d;
    let x = Var::from_tensor(
        &Tensor::from_slice(qkv, (b * t, 3 * c), &Device::Cpu)?.to_dtype(DType::F64)?,
    )?;
    let packed = x.reshape((b, t, 3, h, d))?;
    let head = |i: usize| -> Result<Tensor> {
        packed
            .narrow(2, i, 1)?
            .squeeze(2)?
            .transpose(1, 2)?
            .contiguous()
    };
    let _math = sdpa_kernel(&[Backend::Math]);
    let opts = SdpaOptions {
        is_causal: causal,
        ..Default::default()
    };
    let y = scaled_dot_product_attention(&head(0)?, &head(1)?, &head(2)?, &opts)?
        .transpose(1, 2)?
        .reshape((b * t, c))?;
    let w = Tensor::from_slice(w, (b * t, c), &Device::Cpu)?.to_dtype(DType::F64)?;
    let grads = (&y * &w)?.sum_all()?.backward()?;
    let dx = grads.get(&x).expect("gradient of the packed rows");
    Ok((y.flatten_all()?.to_vec1()?, dx.flatten_all()?.to_vec1()?))
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    // A small LCG: fresh, non-trivial values without another dependency.
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn max_rel(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max)
        / scale
}

#[test]
fn matches_math_backend_in_f64() -> Result<()> {
    // Lengths that are not multiples of the tiles, one head dim of 32 and one odd one.
    for (i, &(b, t, h, d, causal)) in [
        (2, 13, 3, 8, true),
        (3, 64, 4, 32, true),
        (1, 37, 2, 5, false),
    ]
    .iter()
    .enumerate()
    {
        let attn = QkvRows::new(h, d, t, causal)?;
        let qkv: Vec<f32> = random(b * t * 3 * h * d, 2 * i as u64 + 1)
            .iter()
            .map(|v| 2.0 * v)
            .collect();
        let w = random(b * t * h * d, 2 * i as u64 + 2);
        let (y_ref, dqkv_ref) = math_reference(&qkv, &w, (b, t, h, d), causal)?;
        let out = attn.forward(&qkv)?;
        assert!(max_rel(&out.y, &y_ref) < 1e-5, "case {i}: forward");
        let dqkv = attn.backward(&qkv, &out.y, &out.lse, &w)?;
        assert!(max_rel(&dqkv, &dqkv_ref) < 1e-4, "case {i}: backward");
        assert!(dqkv.iter().any(|v| *v != 0.0));
    }
    Ok(())
}

#[test]
fn dropout_is_reproducible_and_changes_the_output() -> Result<()> {
    let (b, t, h, d) = (2, 16, 2, 8);
    let qkv = random(b * t * 3 * h * d, 9);
    let plain = QkvRows::new(h, d, t, true)?.forward(&qkv)?;
    let drop = |seed| {
        QkvRows::new(h, d, t, true)?
            .with_dropout(0.3, seed)?
            .forward(&qkv)
    };
    let (a, again, other) = (drop(5)?, drop(5)?, drop(6)?);
    assert_eq!(a.y, again.y);
    assert_ne!(a.y, plain.y);
    assert_ne!(a.y, other.y);
    Ok(())
}

#[test]
fn bad_sizes_are_errors() -> Result<()> {
    for (h, d, t) in [(0, 8, 4), (2, 0, 4), (2, 8, 0)] {
        let err = QkvRows::new(h, d, t, true).unwrap_err().to_string();
        assert!(err.contains("must be positive"), "{err}");
    }
    let err = QkvRows::new(1 << 32, 1 << 32, 2, true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has more elements than memory can hold"),
        "{err}"
    );
    let attn = QkvRows::new(2, 4, 5, true)?;
    // 7 rows are not whole sequences of 5; 100 elements are not whole rows of 24.
    for len in [7 * 24, 100] {
        let err = attn.forward(&vec![0.5; len]).unwrap_err().to_string();
        assert!(err.contains("qkv rows"), "{err}");
    }
    let qkv = random(10 * 24, 3);
    let out = attn.forward(&qkv)?;
    let err = attn
        .backward(&qkv, &out.y, &out.lse[1..], &out.y)
        .unwrap_err()
        .to_string();
    assert!(err.contains("logsumexps"), "{err}");
    let err = QkvRows::new(2, 4, 5, true)?
        .with_dropout(1.0, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("dropout"), "{err}");
    Ok(())
}
