//! candle-flash-attn's eleven functions (windows, ALiBi, soft cap, packed and paged inputs)
//! against a float64 reference composed of Candle ops by the definition, values and gradients
//! (the reference's autograd), in f32, f16 and bf16, with odd lengths, `Lq != Lk`, grouped-query
//! heads and windows that cut the 128-key tiles anywhere.

mod common;

use attn_op::masked_softmax_last_dim;
use candle_core::{DType, Device, IndexOp, Result, Tensor, Var};
use common::rel_err;

/// What a call adds to plain attention.
#[derive(Clone, Debug, Default)]
struct Spec {
    left: Option<usize>,
    right: Option<usize>,
    slopes: Option<Vec<f32>>,
    softcap: Option<f32>,
}

/// Attention of one dense batch `(B, S, H, D)` by the definition, in the inputs' dtype (f64 for
/// the reference): scores scaled, capped, biased by ALiBi, masked by the window (aligned
/// bottom-right), softmax (zeros for a row that sees nothing), times v.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, spec: &Spec) -> Result<Tensor> {
    let (b, sq, hq, _) = q.dims4()?;
    let (_, sk, hkv, _) = k.dims4()?;
    let dev = q.device();
    let group = hq / hkv;
    let heads = |t: &Tensor| -> Result<Tensor> {
        // (B, S, Hkv, D) -> (B, Hq, S, D), each kv head repeated for its query heads.
        let (b, s, h, d) = t.dims4()?;
        t.transpose(1, 2)?
            .unsqueeze(2)?
            .broadcast_as((b, h, group, s, d))?
            .reshape((b, h * group, s, d))
    };
    let qt = q.transpose(1, 2)?.contiguous()?;
    let (kt, vt) = (heads(k)?.contiguous()?, heads(v)?.contiguous()?);
    let mut s = (qt.matmul(&kt.t()?)? * scale)?;
    if let Some(c) = spec.softcap {
        s = ((s / c as f64)?.tanh()? * c as f64)?;
    }
    let off = sk as i64 - sq as i64;
    if let Some(slopes) = &spec.slopes {
        let mut bias = Vec::with_capacity(hq * sq * sk);
        for slope in slopes {
            for i in 0..sq as i64 {
                for j in 0..sk as i64 {
                    bias.push(-(*slope as f64) * (i + off - j).abs() as f64);
                }
            }
        }
        let bias = Tensor::from_vec(bias, (1, hq, sq, sk), dev)?.to_dtype(s.dtype())?;
        s = s.broadcast_add(&bias)?;
    }
    let mut keep = Vec::with_capacity(sq * sk);
    for i in 0..sq as i64 {
        for j in 0..sk as i64 {
            let lo = spec.left.is_none_or(|l| j >= i + off - l as i64);
            let hi = spec.right.is_none_or(|r| j <= i + off + r as i64);
            keep.push(u8::from(lo && hi));
        }
    }
    let keep = Tensor::from_vec(keep, (sq, sk), dev)?.broadcast_as(s.shape())?;
    let ninf = Tensor::new(f64::NEG_INFINITY, dev)?
        .to_dtype(s.dtype())?
        .broadcast_as(s.shape())?;
    let p = masked_softmax_last_dim(&keep.where_cond(&s, &ninf)?)?;
    let _ = b;
    p.matmul(&vt)?.transpose(1, 2)
}

/// The dense function that takes `spec` (the most specific one that does).
fn dense(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, spec: &Spec) -> Result<Tensor> {
    let slopes = spec
        .slopes
        .as_ref()
        .map(|s| Tensor::new(s.as_slice(), q.device()))
        .transpose()?;
    let causal = spec.left.is_none() && spec.right == Some(0);
    let plain = spec.left.is_none() && (spec.right.is_none() || causal);
    match (&slopes, spec.softcap) {
        (_, Some(c)) => attn_op::flash_attn_alibi_windowed_softcap(
            q,
            k,
            v,
            slopes.as_ref(),
            scale,
            spec.left,
            spec.right,
            c,
        ),
        (Some(a), None) if plain => attn_op::flash_attn_alibi(q, k, v, a, scale, causal),
        (Some(a), None) => {
            attn_op::flash_attn_alibi_windowed(q, k, v, a, scale, spec.left, spec.right)
        }
        (None, None) if plain => attn_op::flash_attn(q, k, v, scale, causal),
        (None, None) => attn_op::flash_attn_windowed(q, k, v, scale, spec.left, spec.right),
    }
}

/// Output and gradients of `sum(out · w)` with respect to q, k, v.
fn run(
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    qkv: &[Tensor; 3],
    w: &Tensor,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars = qkv
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<Vec<_>>>()?;
    let out = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    )?;
    let loss = (out.to_dtype(DType::F64)? * w)?.sum_all()?;
    let grads = loss.backward()?;
    let g = vars
        .iter()
        .map(|v| grads.get(v).cloned().expect("a gradient for every input"))
        .collect();
    Ok((out, g))
}

fn flat64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()
}

/// Value and gradient tolerances of [`rel_err`] per dtype.
fn tolerances(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (2e-5, 1e-4),
        DType::F16 => (3e-3, 1e-2),
        _ => (2e-2, 6e-2),
    }
}

/// Compares `got` (output, gradients) with `want`; returns the failures.
fn compare(
    what: &str,
    dtype: DType,
    got: &(Tensor, Vec<Tensor>),
    want: &(Tensor, Vec<Tensor>),
) -> Vec<String> {
    let (tv, tg) = tolerances(dtype);
    let mut out = Vec::new();
    let pairs = std::iter::once((&got.0, &want.0, tv, "output".to_string())).chain(
        got.1
            .iter()
            .zip(&want.1)
            .zip(["dq", "dk", "dv"])
            .map(|((g, w), n)| (g, w, tg, n.to_string())),
    );
    for (g, w, tol, name) in pairs {
        assert_eq!(g.dims(), w.dims(), "{what}: {name} shape");
        let err = rel_err(g, &flat64(w).unwrap()).unwrap();
        if err > tol {
            out.push(format!(
                "{what} {dtype:?}: {name} relative error {err:.3e} > {tol:.0e}"
            ));
        }
    }
    out
}

/// [`dense`] against the reference on `qkv` (dense `(B, S, H, D)`, `1/√D` scale): output and
/// gradients of a random weighting of the output; returns the failures.
fn check_dense(what: &str, qkv: &[Tensor; 3], spec: &Spec) -> Result<Vec<String>> {
    let (b, sq, hq, d) = qkv[0].dims4()?;
    let w = Tensor::randn(0f64, 1., (b, sq, hq, d), &Device::Cpu)?;
    let scale = 1.0 / (d as f32).sqrt();
    let got = run(|q, k, v| dense(q, k, v, scale, spec), qkv, &w)?;
    let qkv64 = qkv.clone().map(|t| t.to_dtype(DType::F64).unwrap());
    let want = run(|q, k, v| reference(q, k, v, scale as f64, spec), &qkv64, &w)?;
    Ok(compare(what, qkv[0].dtype(), &got, &want))
}

fn random(dims: (usize, usize, usize, usize), dtype: DType) -> Result<Tensor> {
    Tensor::randn(0f32, 1., dims, &Device::Cpu)?.to_dtype(dtype)
}

/// The windows of a case: causal, a causal window, both sides, only right, empty-ish ones.
fn windows(sk: usize) -> Vec<(Option<usize>, Option<usize>)> {
    vec![
        (None, None),
        (None, Some(0)),
        (Some(sk / 3), Some(0)),
        (Some(0), Some(0)),
        (Some(sk / 5 + 1), Some(sk / 7 + 2)),
        (None, Some(3)),
        (Some(2), None),
    ]
}

#[test]
fn dense_variants_match_the_reference() -> Result<()> {
    let mut failures = Vec::new();
    let mut checked = 0;
    // (B, Sq, Sk, Hq, Hkv, D): odd lengths, Sq < Sk (some rows see nothing with right = 0
    // only when Sq > Sk), Sq > Sk, grouped heads, lengths across several 128-key tiles, decoding
    // (with 128 query heads' rows, enough for the CPU forward to run the heads of a group
    // together on up to 64 threads).
    let shapes = [
        (2, 37, 53, 4, 2, 16),
        (1, 53, 37, 2, 1, 32),
        (1, 300, 300, 2, 2, 32),
        (1, 1, 300, 4, 1, 64),
        (8, 1, 300, 16, 4, 16),
    ];
    for (si, &(b, sq, sk, hq, hkv, d)) in shapes.iter().enumerate() {
        let slopes: Vec<f32> = (0..hq).map(|h| 0.3 / (h + 1) as f32).collect();
        for (wi, (left, right)) in windows(sk).into_iter().enumerate() {
            // Every window plain; ALiBi and the soft cap on some, so each meets every shape.
            let extras = [
                (None, None),
                (Some(slopes.clone()), None),
                (None, Some(2.0)),
                (Some(slopes.clone()), Some(3.5)),
            ];
            for (ei, (alibi, cap)) in extras.into_iter().enumerate() {
                if ei != 0 && (wi + ei) % 2 == 1 {
                    continue;
                }
                let spec = Spec {
                    left,
                    right,
                    slopes: alibi,
                    softcap: cap,
                };
                let dtypes: &[DType] = if si < 2 {
                    &[DType::F32, DType::F16, DType::BF16]
                } else {
                    &[DType::F32, DType::BF16]
                };
                for &dtype in dtypes {
                    checked += 1;
                    let qkv = [
                        random((b, sq, hq, d), dtype)?,
                        random((b, sk, hkv, d), dtype)?,
                        random((b, sk, hkv, d), dtype)?,
                    ];
                    let what = format!("{:?} {spec:?}", shapes[si]);
                    failures.extend(check_dense(&what, &qkv, &spec)?);
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures in {checked} cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

/// A large soft cap with scores far below it, where a softmax that took the cap for the rows'
/// maximum (it bounds every score) would lose the probabilities to underflow: heads whose
/// scores sit near 0, near -12 and near -44 (2^-130 below the cap of 50), and keys mixing both,
/// with and without ALiBi, causal, lengths across several 128-key tiles.
#[test]
fn soft_cap_far_below_its_bound() -> Result<()> {
    let (b, s, h, d) = (1, 300, 4, 32);
    let dev = Device::Cpu;
    // q·k = shift·(d·1.0) + noise for head `h`, with q and k offset along every dimension.
    let offsets = [0.0f32, 1.5, 3.5, 3.5];
    let ones = Tensor::ones((b, s, 1, d), DType::F32, &dev)?;
    let per_head = |sign: f32| -> Result<Tensor> {
        let heads = offsets
            .iter()
            .enumerate()
            .map(|(hi, &o)| {
                let o = if hi == 3 && sign < 0.0 {
                    // Head 3: half of the keys very negative, half near 0.
                    let half: Vec<f32> = (0..s).map(|j| if j % 2 == 0 { o } else { 0.0 }).collect();
                    Tensor::from_vec(half, (b, s, 1, 1), &dev)?.broadcast_mul(&ones)?
                } else {
                    (&ones * o as f64)?
                };
                o * sign as f64
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&heads, 2)
    };
    let noise = |t: Tensor| -> Result<Tensor> { t + (random((b, s, h, d), DType::F32)? * 0.3)? };
    let (q0, k0) = (noise(per_head(1.0)?)?, noise(per_head(-1.0)?)?);
    let v0 = random((b, s, h, d), DType::F32)?;
    let mut failures = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        for slopes in [None, Some(vec![0.05f32, 0.02, 0.01, 0.005])] {
            let spec = Spec {
                left: None,
                right: Some(0),
                slopes,
                softcap: Some(50.0),
            };
            let qkv = [&q0, &k0, &v0].map(|t| t.to_dtype(dtype).unwrap());
            failures.extend(check_dense(&format!("{spec:?}"), &qkv, &spec)?);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// SDPA's `window_left`, `window_right` and `softcap` on every backend: with `Lq = Lk` the
/// top-left alignment SDPA uses is the reference's bottom-right one.
#[test]
fn sdpa_windows_and_softcap_on_every_backend() -> Result<()> {
    use attn_op::{scaled_dot_product_attention, sdpa_kernel, Backend, SdpaOptions};
    let (b, l, h, d) = (2, 150, 2, 16);
    let mut failures = Vec::new();
    let cases = [
        (true, Some(40), None, None),
        (false, Some(5), Some(9), Some(2.0f32)),
        (true, None, None, Some(1.0)),
        (false, None, Some(0), None),
    ];
    for (causal, left, right, cap) in cases {
        let opts = SdpaOptions {
            is_causal: causal,
            window_left: left,
            window_right: right,
            softcap: cap.map(f64::from),
            ..Default::default()
        };
        let spec = Spec {
            left,
            right: if causal { Some(0) } else { right },
            slopes: None,
            softcap: cap,
        };
        for backend in Backend::ALL {
            for dtype in [DType::F32, DType::BF16] {
                let qkv = [
                    random((b, l, h, d), dtype)?,
                    random((b, l, h, d), dtype)?,
                    random((b, l, h, d), dtype)?,
                ];
                let w = Tensor::randn(0f64, 1., (b, l, h, d), &Device::Cpu)?;
                let _only = sdpa_kernel(&[backend]);
                let sdpa = |q: &Tensor, k: &Tensor, v: &Tensor| {
                    let t = |x: &Tensor| x.transpose(1, 2);
                    scaled_dot_product_attention(&t(q)?, &t(k)?, &t(v)?, &opts)?.transpose(1, 2)
                };
                let got = run(sdpa, &qkv, &w)?;
                let qkv64 = qkv.clone().map(|t| t.to_dtype(DType::F64).unwrap());
                let want = run(|q, k, v| reference(q, k, v, 0.25, &spec), &qkv64, &w)?;
                failures.extend(compare(
                    &format!("sdpa {backend} {spec:?}"),
                    dtype,
                    &got,
                    &want,
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Errors name the option.
    let q = Tensor::zeros((1, 2, 4, 8), DType::F32, &Device::Cpu)?;
    for (opts, needle) in [
        (
            SdpaOptions {
                window_left: Some(5),
                ..Default::default()
            },
            "window_left = 5",
        ),
        (
            SdpaOptions {
                is_causal: true,
                window_right: Some(1),
                ..Default::default()
            },
            "window_right and is_causal",
        ),
        (
            SdpaOptions {
                softcap: Some(-2.0),
                ..Default::default()
            },
            "softcap = -2",
        ),
    ] {
        let e = scaled_dot_product_attention(&q, &q, &q, &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e}");
    }
    Ok(())
}

/// Packed sequences: the varlen functions against the reference run per sequence.
#[test]
fn varlen_variants_match_the_reference() -> Result<()> {
    let dev = Device::Cpu;
    let (lens_q, lens_k) = ([3usize, 130, 1, 40], [5usize, 140, 9, 40]);
    let (hq, hkv, d) = (4, 2, 16);
    let cum = |l: &[usize]| -> Vec<u32> {
        std::iter::once(0)
            .chain(l.iter().scan(0, |a, x| {
                *a += *x as u32;
                Some(*a)
            }))
            .collect()
    };
    let (cu_q, cu_k) = (cum(&lens_q), cum(&lens_k));
    let (tq, tk) = (
        *cu_q.last().unwrap() as usize,
        *cu_k.last().unwrap() as usize,
    );
    let (seq_q, seq_k) = (
        Tensor::new(cu_q.as_slice(), &dev)?,
        Tensor::new(cu_k.as_slice(), &dev)?,
    );
    let slopes: Vec<f32> = (0..hq).map(|h| 0.25 / (h + 1) as f32).collect();
    let specs = [
        Spec {
            right: Some(0),
            ..Default::default()
        },
        Spec {
            left: Some(17),
            right: Some(0),
            ..Default::default()
        },
        Spec {
            left: Some(3),
            right: Some(20),
            slopes: Some(slopes.clone()),
            ..Default::default()
        },
        Spec {
            slopes: Some(slopes.clone()),
            right: Some(0),
            ..Default::default()
        },
        Spec {
            left: Some(60),
            right: Some(0),
            softcap: Some(2.5),
            slopes: Some(slopes),
        },
        Spec {
            softcap: Some(1.5),
            ..Default::default()
        },
    ];
    let mut failures = Vec::new();
    for spec in &specs {
        for dtype in [DType::F32, DType::BF16] {
            let qkv = [
                Tensor::randn(0f32, 1., (tq, hq, d), &dev)?.to_dtype(dtype)?,
                Tensor::randn(0f32, 1., (tk, hkv, d), &dev)?.to_dtype(dtype)?,
                Tensor::randn(0f32, 1., (tk, hkv, d), &dev)?.to_dtype(dtype)?,
            ];
            let w = Tensor::randn(0f64, 1., (tq, hq, d), &dev)?;
            let scale = 0.3f32;
            let (mq, mk) = (140, 140);
            let slopes = spec
                .slopes
                .as_ref()
                .map(|s| Tensor::new(s.as_slice(), &dev))
                .transpose()?;
            let causal = spec.left.is_none() && spec.right == Some(0);
            let got = run(
                |q, k, v| match (&slopes, spec.softcap) {
                    (_, Some(c)) => attn_op::flash_attn_varlen_alibi_windowed_softcap(
                        q,
                        k,
                        v,
                        slopes.as_ref(),
                        &seq_q,
                        &seq_k,
                        mq,
                        mk,
                        scale,
                        spec.left,
                        spec.right,
                        c,
                    ),
                    (Some(a), None) if spec.left.is_none() && causal => {
                        attn_op::flash_attn_varlen_alibi(
                            q, k, v, a, &seq_q, &seq_k, mq, mk, scale, true,
                        )
                    }
                    (Some(a), None) => attn_op::flash_attn_varlen_alibi_windowed(
                        q, k, v, a, &seq_q, &seq_k, mq, mk, scale, spec.left, spec.right,
                    ),
                    (None, None) if causal => {
                        attn_op::flash_attn_varlen(q, k, v, &seq_q, &seq_k, mq, mk, scale, true)
                    }
                    (None, None) => attn_op::flash_attn_varlen_windowed(
                        q, k, v, &seq_q, &seq_k, mq, mk, scale, spec.left, spec.right,
                    ),
                },
                &qkv,
                &w,
            )?;
            let qkv64 = qkv.clone().map(|t| t.to_dtype(DType::F64).unwrap());
            let want = run(
                |q, k, v| {
                    let mut outs = Vec::new();
                    for s in 0..lens_q.len() {
                        let (q0, q1) = (cu_q[s] as usize, cu_q[s + 1] as usize);
                        let (k0, k1) = (cu_k[s] as usize, cu_k[s + 1] as usize);
                        let part = |t: &Tensor, a, b| t.i(a..b).unwrap().unsqueeze(0).unwrap();
                        let o = reference(
                            &part(q, q0, q1),
                            &part(k, k0, k1),
                            &part(v, k0, k1),
                            scale as f64,
                            spec,
                        )?;
                        outs.push(o.squeeze(0)?);
                    }
                    Tensor::cat(&outs, 0)
                },
                &qkv64,
                &w,
            )?;
            failures.extend(compare(&format!("varlen {spec:?}"), dtype, &got, &want));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// The paged function: keys scattered over blocks in a random order give what the packed
/// function gives on the same keys in order, values and gradients (through the gather).
#[test]
fn paged_matches_packed() -> Result<()> {
    let dev = Device::Cpu;
    let (page, blocks, hkv, hq, d) = (32, 9, 2, 4, 16);
    let lens_k = [70usize, 1, 64];
    let lens_q = [1usize, 1, 5];
    // Sequence 1's only key lies in block 4, which sequence 0 reads too (a shared prefix): its
    // gradient is the sum of both.
    let table: Vec<Vec<u32>> = vec![vec![4, 0, 7], vec![4, 8, 8], vec![6, 1, 3]];
    let cum = |l: &[usize]| -> Vec<u32> {
        std::iter::once(0)
            .chain(l.iter().scan(0, |a, x| {
                *a += *x as u32;
                Some(*a)
            }))
            .collect()
    };
    let (cu_q, cu_k) = (cum(&lens_q), cum(&lens_k));
    let (seq_q, seq_k) = (
        Tensor::new(cu_q.as_slice(), &dev)?,
        Tensor::new(cu_k.as_slice(), &dev)?,
    );
    let tq = *cu_q.last().unwrap() as usize;
    let cache = [
        random((blocks, page, hkv, d), DType::F32)?,
        random((blocks, page, hkv, d), DType::F32)?,
    ];
    let q = Tensor::randn(0f32, 1., (tq, hq, d), &dev)?;
    let block_table = Tensor::new(table.clone(), &dev)?;
    let w = Tensor::randn(0f64, 1., (tq, hq, d), &dev)?;
    for (left, cap) in [(None, None), (Some(20), Some(4.0f32))] {
        let got = run(
            |q, k, v| {
                attn_op::flash_attn_varlen_paged_windowed(
                    q,
                    k,
                    v,
                    &seq_q,
                    &seq_k,
                    &block_table,
                    None,
                    5,
                    70,
                    0.25,
                    left,
                    Some(0),
                    page,
                    cap,
                )
            },
            &[q.clone(), cache[0].clone(), cache[1].clone()],
            &w,
        )?;
        // The same keys, gathered by hand into packed rows.
        let gather = |t: &Tensor| -> Result<Tensor> {
            let mut rows = Vec::new();
            for (b, len) in lens_k.iter().enumerate() {
                for t in 0..*len {
                    rows.push(t_row(&table[b], t, page));
                }
            }
            t.reshape((blocks * page, hkv, d))?
                .index_select(&Tensor::new(rows, &dev)?, 0)
        };
        let want = run(
            |q, k, v| {
                let (k, v) = (gather(k)?, gather(v)?);
                match cap {
                    Some(c) => attn_op::flash_attn_varlen_alibi_windowed_softcap(
                        q,
                        &k,
                        &v,
                        None,
                        &seq_q,
                        &seq_k,
                        5,
                        70,
                        0.25,
                        left,
                        Some(0),
                        c,
                    ),
                    None => attn_op::flash_attn_varlen_windowed(
                        q,
                        &k,
                        &v,
                        &seq_q,
                        &seq_k,
                        5,
                        70,
                        0.25,
                        left,
                        Some(0),
                    ),
                }
            },
            &[q.clone(), cache[0].clone(), cache[1].clone()],
            &w,
        )?;
        let failures = compare("paged", DType::F32, &got, &want);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        // Without gradients the CPU kernels read the blocks in place: the same output, in every
        // dtype.
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let c = |t: &Tensor| t.to_dtype(dtype).unwrap();
            let in_place = attn_op::flash_attn_varlen_paged_windowed(
                &c(&q),
                &c(&cache[0]),
                &c(&cache[1]),
                &seq_q,
                &seq_k,
                &block_table,
                None,
                5,
                70,
                0.25,
                left,
                Some(0),
                page,
                cap,
            )?;
            let err = rel_err(&in_place, &flat64(&got.0)?)?;
            assert!(err < tolerances(dtype).0, "{dtype:?}: in place {err}");
        }
        // Blocks no sequence uses (2, 5) get no gradient.
        for block in [2, 5] {
            let unused = got.1[1].i(block)?.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert_eq!(unused, 0.0);
        }
    }
    Ok(())
}

fn t_row(blocks: &[u32], t: usize, page: usize) -> u32 {
    blocks[t / page] * page as u32 + (t % page) as u32
}

/// Bad arguments are errors naming the argument.
#[test]
fn bad_arguments_name_the_argument() -> Result<()> {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1., (1, 10, 2, 8), &dev)?;
    let err = |r: Result<Tensor>| r.unwrap_err().to_string();
    let e = err(attn_op::flash_attn_windowed(
        &q,
        &q,
        &q,
        0.3,
        Some(11),
        Some(0),
    ));
    assert!(
        e.contains("window_size_left = 11") && e.contains("10 keys"),
        "{e}"
    );
    let e = err(attn_op::flash_attn_windowed(
        &q,
        &q,
        &q,
        0.3,
        None,
        Some(99),
    ));
    assert!(e.contains("window_size_right = 99"), "{e}");
    let three = Tensor::new(&[0.1f32, 0.2, 0.3], &dev)?;
    let e = err(attn_op::flash_attn_alibi(&q, &q, &q, &three, 0.3, true));
    assert!(e.contains("alibi_slopes") && e.contains("(2,)"), "{e}");
    let f64_slopes = Tensor::new(&[0.1f64, 0.2], &dev)?;
    let e = err(attn_op::flash_attn_alibi(
        &q,
        &q,
        &q,
        &f64_slopes,
        0.3,
        true,
    ));
    assert!(e.contains("alibi_slopes") && e.contains("F64"), "{e}");
    for cap in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let e = err(attn_op::flash_attn_alibi_windowed_softcap(
            &q, &q, &q, None, 0.3, None, None, cap,
        ));
        assert!(e.contains("softcap"), "{e}");
    }
    // Paged: a block out of range, a table too short, a wrong dtype, mm_prefix_ranges.
    let cache = Tensor::randn(0f32, 1., (3, 32, 2, 8), &dev)?;
    let qp = Tensor::randn(0f32, 1., (1, 2, 8), &dev)?;
    let cu_q = Tensor::new(&[0u32, 1], &dev)?;
    let cu_k = Tensor::new(&[0u32, 40], &dev)?;
    let paged = |table: &Tensor, ranges: Option<&Tensor>| {
        attn_op::flash_attn_varlen_paged_windowed(
            &qp,
            &cache,
            &cache,
            &cu_q,
            &cu_k,
            table,
            ranges,
            1,
            40,
            0.3,
            None,
            Some(0),
            32,
            None,
        )
    };
    let e = err(paged(&Tensor::new(&[[0u32, 3]], &dev)?, None));
    assert!(e.contains("block_table[0, 1] = 3"), "{e}");
    let e = err(paged(&Tensor::new(&[[-1i32, 0]], &dev)?, None));
    assert!(e.contains("block_table[0, 0] = -1"), "{e}");
    let e = err(paged(&Tensor::new(&[[0u32]], &dev)?, None));
    assert!(e.contains("40 keys") && e.contains("block_table"), "{e}");
    let e = err(paged(&Tensor::new(&[[0f32, 1.]], &dev)?, None));
    assert!(e.contains("block_table must be"), "{e}");
    let table = Tensor::new(&[[0u32, 1]], &dev)?;
    assert!(paged(&table, None).is_ok());
    let ranges = Tensor::zeros((1, 1, 2), DType::I32, &dev)?;
    let e = err(paged(&table, Some(&ranges)));
    assert!(e.contains("mm_prefix_ranges"), "{e}");
    let e = err(attn_op::flash_attn_varlen_paged_windowed(
        &qp,
        &cache,
        &cache,
        &cu_q,
        &cu_k,
        &table,
        None,
        1,
        40,
        0.3,
        None,
        Some(0),
        16,
        None,
    ));
    assert!(e.contains("page_block_size = 16"), "{e}");
    Ok(())
}

/// The ops' builders (`with_window`, `with_softcap`, `with_alibi`) give what the functions give.
#[test]
fn op_builders_match_the_functions() -> Result<()> {
    use attn_op::{CausalAlign, EfficientAttention, FlashAttention};
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1., (2, 30, 3, 16), &dev)?;
    let k = Tensor::randn(0f32, 1., (2, 41, 3, 16), &dev)?;
    let slopes = [0.4f32, 0.2, 0.1];
    let want = attn_op::flash_attn_alibi_windowed_softcap(
        &q,
        &k,
        &k,
        Some(&Tensor::new(&slopes, &dev)?),
        0.3,
        Some(9),
        Some(2),
        4.0,
    )?;
    let t = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
    let flash = FlashAttention::new(0.3, None)
        .with_window(CausalAlign::BottomRight, Some(9), Some(2))
        .with_softcap(4.0)?
        .with_alibi(&slopes)?;
    let efficient = EfficientAttention::new(0.3, None)
        .with_window(CausalAlign::BottomRight, Some(9), Some(2))
        .with_softcap(4.0)?
        .with_alibi(&slopes)?;
    for got in [
        t(&q).apply_op3(&t(&k), &t(&k), flash)?,
        t(&q).apply_op3(&t(&k), &t(&k), efficient)?,
    ] {
        let diff = (got.transpose(1, 2)? - &want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
    }
    assert!(FlashAttention::new(0.3, None).with_softcap(0.0).is_err());
    assert!(FlashAttention::new(0.3, None)
        .with_alibi(&[f32::NAN])
        .is_err());
    // Slopes that do not match the heads are an error when the op runs.
    let two = FlashAttention::new(0.3, None).with_alibi(&[0.1, 0.2])?;
    let e = t(&q)
        .apply_op3(&t(&k), &t(&k), two)
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 ALiBi slopes for 3 query heads"), "{e}");
    Ok(())
}
