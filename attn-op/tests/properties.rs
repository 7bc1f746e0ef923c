//! Property test: on random shapes and options no backend panics, invalid input is an error,
//! and every backend that accepts the input agrees with the math backend.

use attn_op::{scaled_dot_product_attention, sdpa_kernel, Backend, SdpaOptions};
use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Input {
    lead: Vec<usize>,
    hkv_div: usize,
    lq: usize,
    lk: usize,
    e: usize,
    ev: usize,
    causal: bool,
    mask: u8,
    dropout: f64,
    gqa: bool,
    dtype: u8,
    transpose: bool,
    /// `window_left`, `window_right` and `softcap` (windows may exceed the keys: an error).
    left: Option<usize>,
    right: Option<usize>,
    softcap: Option<f64>,
}

fn input() -> impl Strategy<Value = Input> {
    (
        prop::collection::vec(1usize..4, 0..3),
        1usize..3,
        0usize..40,
        0usize..40,
        1usize..48,
        1usize..48,
        any::<bool>(),
        0u8..3,
        prop_oneof![Just(0.0), Just(0.25)],
        any::<bool>(),
        0u8..3,
        any::<bool>(),
    )
        .prop_flat_map(|t| {
            (
                Just(t),
                prop::option::weighted(0.3, 0usize..45),
                prop::option::weighted(0.2, 0usize..45),
                prop::option::weighted(0.3, 0.5f64..8.0),
            )
        })
        .prop_map(
            |(
                (lead, hkv_div, lq, lk, e, ev, causal, mask, dropout, gqa, dtype, transpose),
                left,
                right,
                softcap,
            )| Input {
                lead,
                hkv_div,
                lq,
                lk,
                e,
                ev,
                causal,
                mask,
                dropout,
                gqa,
                dtype,
                transpose,
                left,
                right,
                softcap,
            },
        )
}

fn run(inp: &Input) -> Result<(), TestCaseError> {
    let dev = Device::Cpu;
    let dtype = [DType::F32, DType::F16, DType::BF16][inp.dtype as usize];
    let heads = 2 * inp.hkv_div.max(1);
    let hkv = if inp.gqa { 2 } else { heads };
    let dims = |h: usize, l: usize, d: usize| {
        let mut v = inp.lead.clone();
        v.extend([h, l, d]);
        v
    };
    let mk = |d: Vec<usize>| -> Tensor {
        if inp.transpose {
            // A view: the last two dims swapped twice leaves a strided but equal tensor.
            let r = d.len();
            let mut t = d.clone();
            t.swap(r - 3, r - 2);
            Tensor::randn(0f32, 1., t, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .transpose(r - 3, r - 2)
                .unwrap()
        } else {
            Tensor::randn(0f32, 1., d, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        }
    };
    let q = mk(dims(heads, inp.lq, inp.e));
    let k = mk(dims(hkv, inp.lk, inp.e));
    let v = mk(dims(hkv, inp.lk, inp.ev));
    let attn_mask = match inp.mask {
        1 => Some(
            Tensor::rand(0f32, 1., (inp.lq, inp.lk), &dev)
                .unwrap()
                .ge(0.3)
                .unwrap(),
        ),
        2 => Some(Tensor::randn(0f32, 1., (1, inp.lk), &dev).unwrap()),
        _ => None,
    };
    let opts = SdpaOptions {
        attn_mask,
        dropout_p: inp.dropout,
        is_causal: inp.causal,
        scale: None,
        enable_gqa: inp.gqa,
        seed: Some(3),
        window_left: inp.left,
        window_right: inp.right,
        softcap: inp.softcap,
    };
    let results: Vec<_> = Backend::ALL
        .iter()
        .map(|&b| {
            let _g = sdpa_kernel(&[b]);
            (b, scaled_dot_product_attention(&q, &k, &v, &opts))
        })
        .collect();
    let wide = |w: Option<usize>| w.is_some_and(|w| w > inp.lk);
    let invalid =
        (inp.causal && (inp.mask > 0 || inp.right.is_some())) || wide(inp.left) || wide(inp.right);
    let math = &results[2].1;
    prop_assert_eq!(math.is_err(), invalid, "math: {:?}", math.as_ref().err());
    if let Ok(want) = math {
        let want = want.to_dtype(DType::F32).unwrap();
        for (b, r) in &results[..2] {
            let refused = *b == Backend::Flash && inp.mask > 0;
            prop_assert_eq!(r.is_err(), refused, "{}: {:?}", b, r.as_ref().err());
            if let Ok(got) = r {
                prop_assert_eq!(got.dims(), want.dims());
                let diff = (got.to_dtype(DType::F32).unwrap() - &want)
                    .unwrap()
                    .abs()
                    .unwrap();
                let diff = diff
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .map(|d| d.to_scalar::<f32>().unwrap())
                    .unwrap_or(0.0);
                let tol = if dtype == DType::F32 { 1e-4 } else { 5e-2 };
                prop_assert!(diff <= tol, "{}: max difference {} from math", b, diff);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn backends_agree_and_never_panic(inp in input()) {
        run(&inp)?;
    }
}
