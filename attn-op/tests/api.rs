//! The public API's contract: dispatch and its reasons, bad input, empty and fully masked inputs,
//! dropout, the candle-flash-attn entry points.

use attn_op::{
    enabled_backends, flash_attn, flash_attn_varlen, scaled_dot_product_attention, sdpa_kernel,
    select_backend, Backend, SdpaOptions,
};
use candle_core::{DType, Device, Result, Tensor, Var};

fn randn(dims: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1., dims, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn sdpa_err(q: &Tensor, k: &Tensor, v: &Tensor, opts: &SdpaOptions) -> String {
    scaled_dot_product_attention(q, k, v, opts)
        .unwrap_err()
        .to_string()
}

#[test]
fn guards_nest_and_restore() {
    assert_eq!(enabled_backends(), Backend::ALL.to_vec());
    {
        let _a = sdpa_kernel(&[Backend::Flash, Backend::Math]);
        {
            let _b = sdpa_kernel(&[Backend::Efficient]);
            assert_eq!(enabled_backends(), vec![Backend::Efficient]);
        }
        assert_eq!(enabled_backends(), vec![Backend::Flash, Backend::Math]);
        // Other threads keep their own setting.
        std::thread::spawn(|| assert_eq!(enabled_backends(), Backend::ALL.to_vec()))
            .join()
            .unwrap();
    }
    assert_eq!(enabled_backends(), Backend::ALL.to_vec());
}

#[test]
fn dispatch_order_and_reasons() -> Result<()> {
    let q = randn(&[1, 2, 4, 8]);
    assert_eq!(
        select_backend(&q, &q, &q, &SdpaOptions::default())?.backend,
        Backend::Flash
    );
    let big = randn(&[1, 1, 4, 300]);
    let sel = select_backend(&big, &big, &big, &SdpaOptions::default())?;
    assert_eq!(sel.backend, Backend::Efficient);
    assert_eq!(
        sel.refused,
        vec![(Backend::Flash, "head dim 300 is above 256".to_string())]
    );
    let q64 = q.to_dtype(DType::F64)?;
    let sel = select_backend(&q64, &q64, &q64, &SdpaOptions::default())?;
    assert_eq!(sel.backend, Backend::Math);
    assert_eq!(sel.refused.len(), 2);
    assert!(sel.refused[0].1.contains("dtype F64 is not supported"));
    let mask = Tensor::ones((4, 4), DType::U8, &Device::Cpu)?;
    let opts = SdpaOptions {
        attn_mask: Some(mask),
        ..Default::default()
    };
    let _g = sdpa_kernel(&[Backend::Flash]);
    let err = sdpa_err(&q, &q, &q, &opts);
    assert!(
        err.contains("flash: attn_mask is not supported; efficient: disabled by sdpa_kernel; math: disabled by sdpa_kernel"),
        "{err}"
    );
    Ok(())
}

#[test]
fn bad_inputs_are_clear_errors() {
    let q = randn(&[2, 4, 5, 8]);
    let o = SdpaOptions::default();
    let cases: Vec<(Tensor, Tensor, Tensor, SdpaOptions, &str)> = vec![
        (
            randn(&[5, 8]),
            randn(&[5, 8]),
            randn(&[5, 8]),
            o.clone(),
            "expected rank >= 3",
        ),
        (
            q.clone(),
            randn(&[2, 4, 5, 9]),
            randn(&[2, 4, 5, 8]),
            o.clone(),
            "key has E = 9",
        ),
        (
            q.clone(),
            randn(&[2, 4, 6, 8]),
            randn(&[2, 4, 7, 8]),
            o.clone(),
            "value has 7 rows",
        ),
        (
            q.clone(),
            randn(&[3, 4, 5, 8]),
            randn(&[3, 4, 5, 8]),
            o.clone(),
            "different leading (batch) dims",
        ),
        (
            q.clone(),
            q.to_dtype(DType::F16).unwrap(),
            q.clone(),
            o.clone(),
            "mixed dtypes",
        ),
        (
            q.clone(),
            randn(&[2, 2, 5, 8]),
            randn(&[2, 2, 5, 8]),
            o.clone(),
            "or set enable_gqa",
        ),
        (
            q.clone(),
            randn(&[2, 3, 5, 8]),
            randn(&[2, 3, 5, 8]),
            SdpaOptions {
                enable_gqa: true,
                ..Default::default()
            },
            "to divide query heads",
        ),
        (
            q.clone(),
            q.clone(),
            q.clone(),
            SdpaOptions {
                dropout_p: -0.1,
                ..Default::default()
            },
            "outside [0, 1)",
        ),
        (
            q.clone(),
            q.clone(),
            q.clone(),
            SdpaOptions {
                scale: Some(f64::INFINITY),
                ..Default::default()
            },
            "finite and positive",
        ),
        (
            q.clone(),
            q.clone(),
            q.clone(),
            SdpaOptions {
                attn_mask: Some(randn(&[3, 5, 5])),
                ..Default::default()
            },
            "does not broadcast",
        ),
        (
            q.clone(),
            q.clone(),
            q.clone(),
            SdpaOptions {
                attn_mask: Some(randn(&[5, 5])),
                is_causal: true,
                ..Default::default()
            },
            "cannot both be set",
        ),
        (
            q.clone(),
            q.clone(),
            q.clone(),
            SdpaOptions {
                attn_mask: Some(Tensor::zeros((5, 5), DType::U32, &Device::Cpu).unwrap()),
                ..Default::default()
            },
            "attn_mask has dtype U32",
        ),
        (
            q.to_dtype(DType::U8).unwrap(),
            q.to_dtype(DType::U8).unwrap(),
            q.to_dtype(DType::U8).unwrap(),
            o.clone(),
            "dtype U8 is not supported",
        ),
    ];
    for (q, k, v, opts, want) in cases {
        let err = sdpa_err(&q, &k, &v, &opts);
        assert!(err.contains(want), "expected `{want}` in `{err}`");
    }
}

#[test]
fn empty_sequences() -> Result<()> {
    for backend in Backend::ALL {
        let _g = sdpa_kernel(&[backend]);
        let y = scaled_dot_product_attention(
            &randn(&[2, 3, 0, 8]),
            &randn(&[2, 3, 4, 8]),
            &randn(&[2, 3, 4, 6]),
            &Default::default(),
        )?;
        assert_eq!(y.dims(), &[2, 3, 0, 6]);
        let y = scaled_dot_product_attention(
            &randn(&[2, 3, 5, 8]),
            &randn(&[2, 3, 0, 8]),
            &randn(&[2, 3, 0, 6]),
            &Default::default(),
        )?;
        assert_eq!(y.dims(), &[2, 3, 5, 6]);
        assert_eq!(y.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    }
    Ok(())
}

/// A query row that may attend to nothing gets zeros and zero gradients, never NaN.
#[test]
fn fully_masked_rows_are_zero() -> Result<()> {
    let dev = Device::Cpu;
    let mut m = vec![1u8; 16];
    m[4..8].fill(0); // row 1 sees nothing
    let bool_mask = Tensor::from_vec(m.clone(), (4, 4), &dev)?;
    let bias: Vec<f32> = m
        .iter()
        .map(|&x| if x == 0 { f32::NEG_INFINITY } else { 0.5 })
        .collect();
    let bias_mask = Tensor::from_vec(bias, (4, 4), &dev)?;
    for mask in [bool_mask, bias_mask] {
        for backend in [Backend::Efficient, Backend::Math] {
            let _g = sdpa_kernel(&[backend]);
            let q = Var::randn(0f32, 1., (1, 2, 4, 8), &dev)?;
            let kv = randn(&[1, 2, 4, 8]);
            let opts = SdpaOptions {
                attn_mask: Some(mask.clone()),
                ..Default::default()
            };
            let y = scaled_dot_product_attention(&q, &kv, &kv, &opts)?;
            let row1 = y.narrow(2, 1, 1)?;
            assert_eq!(row1.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0, "{backend}");
            let g = y.sum_all()?.backward()?;
            let gq = g.get(&q).unwrap();
            assert!(
                gq.flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .all(|x| x.is_finite()),
                "{backend}"
            );
            assert_eq!(
                gq.narrow(2, 1, 1)?.abs()?.sum_all()?.to_scalar::<f32>()?,
                0.0,
                "{backend}"
            );
        }
    }
    // flash_attn with Sq > Sk: the first query rows see no key.
    let q = randn(&[1, 5, 2, 8]);
    let kv = randn(&[1, 3, 2, 8]);
    let y = flash_attn(&q, &kv, &kv, 0.3, true)?;
    assert_eq!(
        y.narrow(1, 0, 2)?.abs()?.sum_all()?.to_scalar::<f32>()?,
        0.0
    );
    assert!(y.narrow(1, 2, 3)?.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    Ok(())
}

#[test]
fn dropout_is_seeded_and_keeps_one_minus_p() -> Result<()> {
    // q = k = 0 gives uniform weights 1/L; v = identity makes out[i][j] = keep(i, j) / (1-p) / L.
    let l = 256;
    let p = 0.3;
    let dev = Device::Cpu;
    let z = Tensor::zeros((1, 4, l, 8), DType::F32, &dev)?;
    let v = Tensor::eye(l, DType::F32, &dev)?
        .broadcast_as((1, 4, l, l))?
        .contiguous()?;
    for backend in Backend::ALL {
        let _g = sdpa_kernel(&[backend]);
        let opts = SdpaOptions {
            dropout_p: p,
            seed: Some(11),
            ..Default::default()
        };
        let y = scaled_dot_product_attention(&z, &z, &v, &opts)?;
        let vals = y.flatten_all()?.to_vec1::<f32>()?;
        let kept = vals.iter().filter(|&&x| x > 0.0).count();
        let rate = kept as f64 / vals.len() as f64;
        let sd = (p * (1.0 - p) / vals.len() as f64).sqrt();
        assert!(
            (rate - (1.0 - p)).abs() < 5.0 * sd,
            "{backend}: keep rate {rate}"
        );
        let want = 1.0 / (1.0 - p as f32) / l as f32;
        assert!(
            vals.iter()
                .all(|&x| x == 0.0 || (x - want).abs() < 1e-6 * want.max(1.0)),
            "{backend}"
        );
        // Same seed, same output; another seed, another mask.
        let again = scaled_dot_product_attention(&z, &z, &v, &opts)?;
        assert_eq!(max_diff(&y, &again), 0.0, "{backend}");
        let other = scaled_dot_product_attention(
            &z,
            &z,
            &v,
            &SdpaOptions {
                seed: Some(12),
                ..opts.clone()
            },
        )?;
        assert!(max_diff(&y, &other) > 0.0, "{backend}");
        // Without a seed every call draws a fresh one.
        let unseeded = SdpaOptions { seed: None, ..opts };
        let a = scaled_dot_product_attention(&z, &z, &v, &unseeded)?;
        let b = scaled_dot_product_attention(&z, &z, &v, &unseeded)?;
        assert!(max_diff(&a, &b) > 0.0, "{backend}");
    }
    Ok(())
}

/// flash_attn in (B, S, H, D) equals SDPA on the transposed tensors, with bottom-right causality.
#[test]
fn flash_attn_matches_sdpa_with_bottom_right_causal() -> Result<()> {
    let dev = Device::Cpu;
    let (sq, sk) = (5, 9);
    let q = randn(&[2, sq, 4, 16]);
    let k = randn(&[2, sk, 2, 16]);
    let v = randn(&[2, sk, 2, 12]);
    let y = flash_attn(&q, &k, &v, 0.25, true)?;
    assert_eq!(y.dims(), &[2, sq, 4, 12]);
    let m: Vec<u8> = (0..sq)
        .flat_map(|i| (0..sk).map(move |j| u8::from(j + sq <= i + sk)))
        .collect();
    let opts = SdpaOptions {
        attn_mask: Some(Tensor::from_vec(m, (sq, sk), &dev)?),
        scale: Some(0.25),
        enable_gqa: true,
        ..Default::default()
    };
    let _math = sdpa_kernel(&[Backend::Math]);
    let want = scaled_dot_product_attention(
        &q.transpose(1, 2)?,
        &k.transpose(1, 2)?,
        &v.transpose(1, 2)?,
        &opts,
    )?
    .transpose(1, 2)?;
    assert!(max_diff(&y, &want) < 1e-5);
    Ok(())
}

#[test]
fn flash_attn_bad_inputs() {
    let q = randn(&[2, 5, 4, 16]);
    let e = flash_attn(&randn(&[5, 4, 16]), &q, &q, 0.25, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("flash_attn: q has shape [5, 4, 16]; expected rank 4"),
        "{e}"
    );
    let e = flash_attn(
        &q,
        &randn(&[2, 5, 3, 16]),
        &randn(&[2, 5, 3, 16]),
        0.25,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("flash_attn:") && e.contains("divide"), "{e}");
    let e = flash_attn(&q, &q, &q, -1.0, false).unwrap_err().to_string();
    assert!(e.contains("finite and positive"), "{e}");
    let d = q.to_dtype(DType::F64).unwrap();
    let e = flash_attn(&d, &d, &d, 0.25, false).unwrap_err().to_string();
    assert!(e.contains("flash_attn: dtype F64 is not supported"), "{e}");
}

/// Packed sequences equal per-sequence calls, forward and backward.
#[test]
fn varlen_matches_per_sequence_calls() -> Result<()> {
    let dev = Device::Cpu;
    let lens = [3usize, 1, 70, 0, 9];
    let total: usize = lens.iter().sum();
    let mut cu = vec![0u32];
    for l in lens {
        cu.push(cu.last().unwrap() + l as u32);
    }
    let cu_t = Tensor::new(cu.as_slice(), &dev)?;
    let q = Var::randn(0f32, 1., (total, 4, 16), &dev)?;
    let k = Var::randn(0f32, 1., (total, 2, 16), &dev)?;
    let v = Var::randn(0f32, 1., (total, 2, 8), &dev)?;
    let w = randn(&[total, 4, 8]);
    for causal in [false, true] {
        let y = flash_attn_varlen(&q, &k, &v, &cu_t, &cu_t, 70, 70, 0.3, causal)?;
        let g = (&y * &w)?.sum_all()?.backward()?;
        let mut parts = Vec::new();
        let mut start = 0;
        for l in lens {
            let s = |t: &Tensor| t.narrow(0, start, l).and_then(|t| t.unsqueeze(0));
            let part = if l == 0 {
                Tensor::zeros((0, 4, 8), DType::F32, &dev)?
            } else {
                flash_attn(&s(&q)?, &s(&k)?, &s(&v)?, 0.3, causal)?.squeeze(0)?
            };
            parts.push(part);
            start += l;
        }
        let want = Tensor::cat(&parts, 0)?;
        assert!(max_diff(&y, &want) < 1e-5);
        let g2 = (&want * &w)?.sum_all()?.backward()?;
        for var in [&q, &k, &v] {
            assert!(max_diff(g.get(var).unwrap(), g2.get(var).unwrap()) < 1e-5);
        }
    }
    let bad = Tensor::new(&[0u32, 5, 3], &dev)?;
    let e = flash_attn_varlen(&q, &k, &v, &bad, &bad, 70, 70, 0.3, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("non-decreasing"), "{e}");
    let e = flash_attn_varlen(&q, &k, &v, &cu_t, &cu_t, 10, 70, 0.3, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_seqlen 10"), "{e}");
    let short = Tensor::new(&[0u32, 5], &dev)?;
    let e = flash_attn_varlen(&q, &k, &v, &cu_t, &short, 70, 70, 0.3, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("seqlens_k has 2"), "{e}");
    Ok(())
}

/// One op value applied twice through an Arc: backward still uses its own call's statistics.
#[test]
fn shared_op_instance_backward() -> Result<()> {
    use std::sync::Arc;
    let dev = Device::Cpu;
    let op: Arc<Box<dyn candle_core::CustomOp3 + Send + Sync>> =
        Arc::new(Box::new(attn_op::FlashAttention::new(0.3, None)));
    let q1 = Var::randn(0f32, 1., (1, 2, 6, 8), &dev)?;
    let q2 = Var::randn(0f32, 3., (1, 2, 6, 8), &dev)?;
    let y1 = q1.apply_op3_arc(&q1, &q1, op.clone())?;
    let _y2 = q2.apply_op3_arc(&q2, &q2, op)?;
    let g = y1.sum_all()?.backward()?;
    let y_ref = attn_op::flash_attn(
        &q1.transpose(1, 2)?,
        &q1.transpose(1, 2)?,
        &q1.transpose(1, 2)?,
        0.3,
        false,
    )?;
    let g_ref = y_ref.sum_all()?.backward()?;
    assert!(max_diff(g.get(&q1).unwrap(), g_ref.get(&q1).unwrap()) < 1e-5);
    Ok(())
}

#[test]
fn packing_helper_round_trip_and_errors() -> Result<()> {
    use attn_op::varlen::Packed;
    let seqs = vec![randn(&[2, 3, 4]), randn(&[0, 3, 4]), randn(&[5, 3, 4])];
    let p = Packed::new(&seqs)?;
    assert_eq!(p.lens(), &[2, 0, 5]);
    assert_eq!(p.max_seqlen, 5);
    assert_eq!(p.cu_seqlens.to_vec1::<u32>()?, vec![0, 2, 2, 7]);
    for (a, b) in p.unpack(&p.data)?.iter().zip(&seqs) {
        assert_eq!(a.dims(), b.dims());
        if a.elem_count() > 0 {
            assert_eq!(max_diff(a, b), 0.0);
        }
    }
    let e = Packed::new(&[randn(&[2, 3, 4]), randn(&[2, 3, 5])])
        .unwrap_err()
        .to_string();
    assert!(e.contains("sequence 1 is F32 [2, 3, 5]"), "{e}");
    assert!(Packed::new(&[]).is_err());
    let e = p.unpack(&randn(&[6, 3, 4])).unwrap_err().to_string();
    assert!(e.contains("expected 7 packed rows"), "{e}");
    Ok(())
}
