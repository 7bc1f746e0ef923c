//! candle-flash-attn's contract on CPU tensors, against plain Candle ops: (batch, seq, heads,
//! head_dim) layout, grouped-query heads, causal masks aligned bottom-right (query `i` of `Sq`
//! sees keys `j <= i + Sk - Sq`), and packed sequences for the varlen function.

use candle_core::{Device, Result, Tensor, D};

/// softmax(q·kᵀ·scale)·v for one sequence, q `(Sq, Hq, D)`, k and v `(Sk, Hkv, D)`; kv head `h`
/// serves q heads `h·g .. (h+1)·g` with `g = Hq / Hkv`.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let (sq, hq, _) = q.dims3()?;
    let (sk, hkv, d) = k.dims3()?;
    let heads = |t: &Tensor| -> Result<Tensor> {
        t.transpose(0, 1)?
            .unsqueeze(1)?
            .broadcast_as((hkv, hq / hkv, sk, d))?
            .reshape((hq, sk, d))
    };
    let (k, v) = (heads(k)?, heads(v)?);
    let mut scores = (q.transpose(0, 1)?.contiguous()?.matmul(&k.t()?)? * scale)?;
    if causal {
        let allowed: Vec<u8> = (0..sq)
            .flat_map(|i| (0..sk).map(move |j| u8::from(j + sq <= i + sk)))
            .collect();
        let allowed =
            Tensor::from_vec(allowed, (sq, sk), q.device())?.broadcast_as(scores.shape())?;
        let masked = Tensor::full(f32::NEG_INFINITY, scores.shape(), q.device())?;
        scores = allowed.where_cond(&scores, &masked)?;
    }
    candle_nn::ops::softmax_last_dim(&scores)?
        .matmul(&v)?
        .transpose(0, 1)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?
        .abs()?
        .flatten_all()?
        .max(D::Minus1)?
        .to_scalar::<f32>()
}

#[test]
fn flash_attn_matches_plain_candle() -> Result<()> {
    let dev = Device::Cpu;
    let scale = 0.2;
    // Prefill (Sq = Sk), decoding with a cache (Sq < Sk), and Sq > Sk, where the first rows see
    // no key and come back as zeros.
    for (sq, sk) in [(6, 6), (3, 11), (1, 9), (7, 4)] {
        let q = Tensor::randn(0f32, 1., (2, sq, 4, 16), &dev)?;
        let k = Tensor::randn(0f32, 1., (2, sk, 2, 16), &dev)?;
        let v = Tensor::randn(0f32, 1., (2, sk, 2, 16), &dev)?;
        for causal in [false, true] {
            let y = candle_flash_attn::flash_attn(&q, &k, &v, scale, causal)?;
            assert_eq!(y.dims(), &[2, sq, 4, 16]);
            for b in 0..2 {
                let want = reference(&q.get(b)?, &k.get(b)?, &v.get(b)?, scale as f64, causal)?;
                // A row that sees no key: zeros here, NaN (softmax of all -inf) in the reference.
                let want = want.ne(&want)?.where_cond(&want.zeros_like()?, &want)?;
                let err = max_abs_diff(&y.get(b)?, &want)?;
                assert!(
                    err < 1e-5,
                    "Sq {sq} Sk {sk} causal {causal} batch {b}: {err}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn flash_attn_varlen_matches_each_sequence_alone() -> Result<()> {
    let dev = Device::Cpu;
    let scale = 0.3;
    // Two sequences packed one after the other: 3 queries on 5 keys, then 4 on 4.
    let (lens_q, lens_k) = ([3usize, 4], [5usize, 4]);
    let q = Tensor::randn(0f32, 1., (7, 4, 8), &dev)?;
    let k = Tensor::randn(0f32, 1., (9, 1, 8), &dev)?;
    let v = Tensor::randn(0f32, 1., (9, 1, 8), &dev)?;
    let cu_q = Tensor::new(&[0u32, 3, 7], &dev)?;
    let cu_k = Tensor::new(&[0u32, 5, 9], &dev)?;
    for causal in [false, true] {
        let y =
            candle_flash_attn::flash_attn_varlen(&q, &k, &v, &cu_q, &cu_k, 4, 5, scale, causal)?;
        assert_eq!(y.dims(), &[7, 4, 8]);
        let (mut oq, mut ok) = (0, 0);
        for (lq, lk) in lens_q.into_iter().zip(lens_k) {
            let want = reference(
                &q.narrow(0, oq, lq)?,
                &k.narrow(0, ok, lk)?,
                &v.narrow(0, ok, lk)?,
                scale as f64,
                causal,
            )?;
            let err = max_abs_diff(&y.narrow(0, oq, lq)?, &want)?;
            assert!(err < 1e-5, "sequence at {oq}, causal {causal}: {err}");
            (oq, ok) = (oq + lq, ok + lk);
        }
    }
    Ok(())
}
