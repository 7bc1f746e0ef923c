//! `nn::CausalSelfAttention`: equal to a plain composition of its parts, and its packed and
//! KV-cache forwards equal to the plain one.

use attn_op::nn::{dropout, AttentionConfig, CausalSelfAttention, Causality, KvCache};
use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

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

fn layer(causality: Causality, dropout: f64, bias: bool) -> Result<(CausalSelfAttention, VarMap)> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let cfg = AttentionConfig {
        n_embd: 32,
        n_head: 4,
        bias,
        dropout,
        causality,
    };
    Ok((CausalSelfAttention::new(cfg, vb)?, vm))
}

fn weight(vm: &VarMap, name: &str) -> Tensor {
    vm.data()
        .lock()
        .unwrap()
        .get(name)
        .unwrap()
        .as_tensor()
        .clone()
}

/// The layer by hand: Linear, split heads, masked softmax attention, merge heads, Linear.
fn by_hand(vm: &VarMap, x: &Tensor, causal: bool) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    let (h, d) = (4, c / 4);
    let qkv = x
        .broadcast_matmul(&weight(vm, "c_attn.weight").t()?)?
        .broadcast_add(&weight(vm, "c_attn.bias"))?;
    let heads = |i: usize| {
        qkv.narrow(2, i * c, c)?
            .reshape((b, t, h, d))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
    let mut s = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
    if causal {
        let m: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        s = s.broadcast_add(&Tensor::from_vec(m, (t, t), x.device())?)?;
    }
    let p = candle_nn::ops::softmax(&s, 3)?;
    let y = p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
    y.broadcast_matmul(&weight(vm, "c_proj.weight").t()?)?
        .broadcast_add(&weight(vm, "c_proj.bias"))
}

#[test]
fn equals_composition_of_parts() -> Result<()> {
    let x = Tensor::randn(0f32, 1., (2, 11, 32), &Device::Cpu)?;
    for causality in [Causality::Always, Causality::TrainingOnly, Causality::Never] {
        let (attn, vm) = layer(causality, 0.0, true)?;
        for train in [false, true] {
            let causal =
                causality == Causality::Always || (causality == Causality::TrainingOnly && train);
            let got = attn.forward_t(&x, train)?;
            assert!(
                max_diff(&got, &by_hand(&vm, &x, causal)?) < 1e-5,
                "{causality:?} train {train}"
            );
        }
    }
    Ok(())
}

#[test]
fn dropout_only_in_training_and_reproducible() -> Result<()> {
    let x = Tensor::randn(0f32, 1., (2, 9, 32), &Device::Cpu)?;
    let (attn, _) = layer(Causality::Always, 0.2, false)?;
    let eval1 = attn.forward_t(&x, false)?;
    assert_eq!(max_diff(&eval1, &attn.forward_t(&x, false)?), 0.0);
    attn.set_seed_state(42);
    let a = attn.forward_t(&x, true)?;
    let b = attn.forward_t(&x, true)?;
    assert!(
        max_diff(&a, &b) > 0.0,
        "consecutive training calls draw new masks"
    );
    attn.set_seed_state(42);
    assert_eq!(
        max_diff(&a, &attn.forward_t(&x, true)?),
        0.0,
        "a restored seed state repeats the masks"
    );
    assert!(max_diff(&a, &eval1) > 0.0);
    Ok(())
}

#[test]
fn packed_equals_per_sequence() -> Result<()> {
    let (attn, _) = layer(Causality::Always, 0.0, true)?;
    let lens = [5usize, 1, 12];
    let seqs: Vec<Tensor> = lens
        .iter()
        .map(|&l| Tensor::randn(0f32, 1., (l, 32), &Device::Cpu))
        .collect::<Result<_>>()?;
    let x = Var::from_tensor(&Tensor::cat(&seqs, 0)?)?;
    let cu = Tensor::new(&[0u32, 5, 6, 18], &Device::Cpu)?;
    let y = attn.forward_packed(&x, &cu, false)?;
    let mut start = 0;
    for l in lens {
        let want = attn
            .forward_t(&x.narrow(0, start, l)?.unsqueeze(0)?, false)?
            .squeeze(0)?;
        assert!(max_diff(&y.narrow(0, start, l)?, &want) < 1e-5);
        start += l;
    }
    let g = y.sum_all()?.backward()?;
    assert!(g.get(&x).is_some());
    let e = attn
        .forward_packed(&x, &Tensor::new(&[0u32, 5, 7], &Device::Cpu)?, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("must rise from 0 to the 18 packed tokens"),
        "{e}"
    );
    Ok(())
}

#[test]
fn kv_cache_decoding_equals_full_forward() -> Result<()> {
    let (attn, _) = layer(Causality::Always, 0.0, true)?;
    let x = Tensor::randn(0f32, 1., (2, 10, 32), &Device::Cpu)?;
    let full = attn.forward_t(&x, false)?;
    let mut cache = KvCache::default();
    let first = attn.forward_cached(&x.narrow(1, 0, 6)?, &mut cache)?;
    assert_eq!(cache.len(), 6);
    // Then two new tokens at once (the causal mask aligned to the end of the cache), then one
    // at a time.
    let mut outs = vec![first, attn.forward_cached(&x.narrow(1, 6, 2)?, &mut cache)?];
    for t in 8..10 {
        outs.push(attn.forward_cached(&x.narrow(1, t, 1)?, &mut cache)?);
    }
    assert_eq!(cache.len(), 10);
    assert!(max_diff(&Tensor::cat(&outs, 1)?, &full) < 1e-5);
    Ok(())
}

/// A bias-free projection that keeps f32 weights and computes in its input's dtype, as
/// mixed-precision training does.
struct Autocast(Tensor);

impl Module for Autocast {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_matmul(&self.0.to_dtype(x.dtype())?.t()?)
    }
}

/// The layer in bf16 agrees with f32 to bf16's precision, in training (gradients reach the f32
/// weights) and in KV-cache decoding.
#[test]
fn runs_in_bf16() -> Result<()> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let w_attn = vb.get_with_hints((96, 32), "c_attn", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    let w_proj = vb.get_with_hints((32, 32), "c_proj", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    let cfg = AttentionConfig {
        n_embd: 32,
        n_head: 4,
        bias: false,
        dropout: 0.0,
        causality: Causality::Always,
    };
    let attn = CausalSelfAttention::with_projections(cfg, Autocast(w_attn), Autocast(w_proj))?;
    let x = Tensor::randn(0f32, 1., (2, 10, 32), &Device::Cpu)?;
    let want = attn.forward_t(&x, true)?;
    let xb = x.to_dtype(DType::BF16)?;
    let y = attn.forward_t(&xb, true)?;
    assert_eq!(y.dtype(), DType::BF16);
    // Relative to the largest output: over 60 runs of random layers the worst was 0.013 (an
    // absolute bound of 0.05 failed 2 of them, outputs reaching 4.3).
    let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let err = max_diff(&y.to_dtype(DType::F32)?, &want) / scale;
    assert!(
        err < 0.03,
        "bf16 differs from f32 by {err} of the largest output"
    );
    let grads = y.to_dtype(DType::F32)?.sqr()?.sum_all()?.backward()?;
    for var in vm.all_vars() {
        let g = grads.get(&var).expect("a gradient for every weight");
        assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    }
    let mut cache = KvCache::default();
    let mut outs = vec![attn.forward_cached(&xb.narrow(1, 0, 7)?, &mut cache)?];
    for t in 7..10 {
        outs.push(attn.forward_cached(&xb.narrow(1, t, 1)?, &mut cache)?);
    }
    let err = max_diff(&Tensor::cat(&outs, 1)?.to_dtype(DType::F32)?, &want) / scale;
    assert!(
        err < 0.03,
        "bf16 decoding differs from f32 by {err} of the largest output"
    );
    Ok(())
}

#[test]
fn prints_like_pytorch_and_rejects_bad_config() -> Result<()> {
    let (attn, _) = layer(Causality::TrainingOnly, 0.1, false)?;
    let want = "CausalSelfAttention(\n  (c_attn): Linear(in_features=32, out_features=96, bias=False)\n  (c_proj): Linear(in_features=32, out_features=32, bias=False)\n  (resid_dropout): Dropout(p=0.1, inplace=False)\n)";
    assert_eq!(attn.to_string(), want);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let cfg = AttentionConfig {
        n_embd: 30,
        n_head: 4,
        bias: false,
        dropout: 0.0,
        causality: Causality::Always,
    };
    let e = CausalSelfAttention::new(cfg, vb).err().unwrap().to_string();
    assert!(
        e.contains("n_embd = 30 must be a positive multiple of n_head = 4"),
        "{e}"
    );
    let e = attn
        .forward_t(&Tensor::zeros((1, 3, 16), DType::F32, &Device::Cpu)?, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("input has 16 features, expected n_embd = 32"),
        "{e}"
    );
    Ok(())
}

#[test]
fn seeded_dropout_statistics() -> Result<()> {
    let x = Tensor::ones((200, 500), DType::F32, &Device::Cpu)?;
    let y = dropout(&x, 0.25, 9)?;
    let vals = y.flatten_all()?.to_vec1::<f32>()?;
    let kept = vals.iter().filter(|&&v| v != 0.0).count() as f64 / vals.len() as f64;
    assert!((kept - 0.75).abs() < 0.01, "{kept}");
    assert!(vals
        .iter()
        .all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    assert!(max_diff(&y, &dropout(&x, 0.25, 10)?) > 0.0);
    assert!(dropout(&x, 1.0, 0).is_err());
    Ok(())
}

/// On the CPU the layer attends straight from the packed projection; its output and every
/// gradient equal those of the plain path (forced by restricting dispatch to math), dropout too.
#[test]
fn packed_projection_path_equals_plain_path() -> Result<()> {
    let (attn, vm) = layer(Causality::Always, 0.2, true)?;
    let x = Var::randn(0f32, 1., (3, 13, 32), &Device::Cpu)?;
    let run = |only: Option<attn_op::Backend>| -> Result<Vec<Tensor>> {
        let _g = only.map(|b| attn_op::sdpa_kernel(&[b]));
        attn.set_seed_state(7);
        let y = attn.forward_t(&x, true)?;
        let w = Tensor::ones(y.shape(), DType::F32, &Device::Cpu)?.cumsum(2)?;
        let grads = (y.clone() * w)?.sum_all()?.backward()?;
        let mut out = vec![y, grads.get(&x).unwrap().clone()];
        for name in ["c_attn.weight", "c_attn.bias", "c_proj.weight"] {
            let var = vm.data().lock().unwrap().get(name).unwrap().clone();
            out.push(grads.get(var.as_tensor()).unwrap().clone());
        }
        Ok(out)
    };
    let fused = run(None)?;
    let plain = run(Some(attn_op::Backend::Math))?;
    for (i, (a, b)) in fused.iter().zip(&plain).enumerate() {
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
        assert!(
            max_diff(a, b) / scale < 1e-5,
            "tensor {i}: {}",
            max_diff(a, b)
        );
    }
    Ok(())
}

/// `forward_rows` on `(B·T, C)` token rows equals `forward_t` on `(B, T, C)`, bit for bit, with
/// the same gradients, on the fused CPU path and on the math backend, dropout included; a
/// sequence length that does not divide the rows is an error.
#[test]
fn token_rows_equal_batched_forward() -> Result<()> {
    let (attn, vm) = layer(Causality::Always, 0.2, true)?;
    let (b, t, c) = (3, 13, 32);
    let x = Var::randn(0f32, 1., (b * t, c), &Device::Cpu)?;
    for only in [None, Some(attn_op::Backend::Math)] {
        let run = |rows: bool| -> Result<Vec<Tensor>> {
            let _g = only.map(|b| attn_op::sdpa_kernel(&[b]));
            attn.set_seed_state(11);
            let y = if rows {
                attn.forward_rows(&x, t, true)?
            } else {
                attn.forward_t(&x.reshape((b, t, c))?, true)?
                    .reshape((b * t, c))?
            };
            let w = Tensor::ones(y.shape(), DType::F32, &Device::Cpu)?.cumsum(1)?;
            let grads = (y.clone() * w)?.sum_all()?.backward()?;
            let mut out = vec![y, grads.get(&x).unwrap().clone()];
            for name in [
                "c_attn.weight",
                "c_attn.bias",
                "c_proj.weight",
                "c_proj.bias",
            ] {
                let var = vm.data().lock().unwrap().get(name).unwrap().clone();
                out.push(grads.get(var.as_tensor()).unwrap().clone());
            }
            Ok(out)
        };
        let (rows, batched) = (run(true)?, run(false)?);
        assert!(max_diff(&rows[0], &Tensor::zeros_like(&rows[0])?) > 0.0);
        for (i, (a, b)) in rows.iter().zip(&batched).enumerate() {
            assert_eq!(max_diff(a, b), 0.0, "{only:?}, tensor {i}");
        }
    }
    for bad in [0, 5] {
        let err = attn.forward_rows(&x, bad, false).unwrap_err().to_string();
        assert!(err.contains("seq_len"), "{err}");
    }
    let err = attn
        .forward_rows(&Tensor::zeros((4, 16), DType::F32, &Device::Cpu)?, 2, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected n_embd = 32"), "{err}");
    Ok(())
}

/// A projection that counts its calls, around a Candle Linear.
struct Counted {
    inner: candle_nn::Linear,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl candle_core::Module for Counted {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.forward(x)
    }
}

#[test]
fn caller_projections_are_used_and_checked() -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let (plain, vm) = layer(Causality::Always, 0.0, true)?;
    let cfg = *plain.config();
    let linear = |name: &str| {
        candle_nn::Linear::new(
            weight(&vm, &format!("{name}.weight")),
            Some(weight(&vm, &format!("{name}.bias"))),
        )
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = |name: &str| Counted {
        inner: linear(name),
        calls: calls.clone(),
    };
    let own = CausalSelfAttention::with_projections(cfg, counted("c_attn"), counted("c_proj"))?;
    let x = Tensor::randn(0f32, 1., (2, 7, 32), &Device::Cpu)?;
    let (want, got) = (plain.forward_t(&x, true)?, own.forward_t(&x, true)?);
    assert_eq!(calls.load(Ordering::Relaxed), 2);
    assert_eq!(max_diff(&want, &got), 0.0);
    let rows = own.forward_rows(&x.reshape((14, 32))?, 7, true)?;
    assert_eq!(max_diff(&want.reshape((14, 32))?, &rows), 0.0);

    // Projections of the wrong width are named in the error.
    let narrow = CausalSelfAttention::with_projections(cfg, linear("c_proj"), linear("c_proj"))?;
    let e = narrow.forward_t(&x, false).unwrap_err().to_string();
    assert!(
        e.contains("c_attn returned 32 features, expected 3·n_embd = 96"),
        "{e}"
    );
    let wide = CausalSelfAttention::with_projections(cfg, linear("c_attn"), linear("c_attn"))?;
    let e = wide
        .forward_rows(&x.reshape((14, 32))?, 7, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("c_proj returned 96 features, expected n_embd = 32"),
        "{e}"
    );
    Ok(())
}
