//! The CUDA kernels against the CPU implementation of the same backend, forward and backward, on
//! fresh random inputs: every dtype and head dim the kernels take, causal or not, boolean and
//! additive masks, dropout (the GPU must drop exactly the CPU's elements), GQA, odd lengths,
//! strided views, the bottom-right causal alignment of `flash_attn` and packed sequences.
//!
//! Built with `--features cuda` (`scripts/gpu-check.sh` runs them on a GPU; without a CUDA device
//! each test prints `SKIP` and passes) or `--features cuda-emu`, where the same checks run the
//! kernels in the CPU emulator (`attn_op::emu`; the test command does this, on fewer lengths).
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

mod common;
mod kernel_target;

use attn_op::{
    flash_attn, flash_attn_varlen, scaled_dot_product_attention, sdpa_kernel, Backend, SdpaOptions,
};
use candle_core::{DType, Device, Result, Tensor, Var};
use common::Failures;
use kernel_target::Target;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mask {
    None,
    Bool,
    Bias,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    hq: usize,
    hkv: usize,
    lq: usize,
    lk: usize,
    e: usize,
    ev: usize,
    causal: bool,
    mask: Mask,
    dropout: f64,
    /// q, k, v as transposes of `(B, L, H, D)` tensors (row stride H·D, no copy).
    strided: bool,
}

/// Relative error bound per dtype (forward, backward) of GPU against CPU.
fn tolerance(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (2e-4, 1e-3),
        DType::F16 => (4e-3, 2e-2),
        _ => (2e-2, 8e-2),
    }
}

fn max_abs(t: &Tensor) -> Result<f32> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}

/// `max |a - b| / scale` over all elements, infinite when `a` has a NaN or infinity.
fn rel_err(a: &Tensor, b: &Tensor, scale: f32) -> Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let diff = max_abs(&(&a - &b)?)?;
    if !diff.is_finite() {
        return Ok(f32::INFINITY);
    }
    Ok(diff / scale.max(1e-3))
}

/// A random input of `(B, H, L, D)` on the CPU in `dtype`, stored as `(B, L, H, D)` when strided
/// (see [`view`]).
fn input(b: usize, h: usize, l: usize, d: usize, dtype: DType, strided: bool) -> Result<Tensor> {
    let t = if strided {
        Tensor::randn(0f32, 1., (b, l, h, d), &Device::Cpu)?
    } else {
        Tensor::randn(0f32, 1., (b, h, l, d), &Device::Cpu)?
    };
    t.to_dtype(dtype)
}

fn view(t: &Tensor, strided: bool) -> Result<Tensor> {
    if strided {
        t.transpose(1, 2)
    } else {
        Ok(t.clone())
    }
}

/// Output and (dq, dk, dv) of one backend, for the inputs given on the CPU: on the kernels'
/// target, or with `None` by the CPU implementation.
fn run(
    backend: Backend,
    c: &Case,
    inputs: [&Tensor; 3],
    mask: Option<&Tensor>,
    dout: &Tensor,
    target: Option<&Target>,
) -> Result<[Tensor; 4]> {
    let sdpa = |q: &Tensor, k: &Tensor, v: &Tensor| {
        let opts = SdpaOptions {
            attn_mask: mask.map(|m| m.to_device(q.device())).transpose()?,
            dropout_p: c.dropout,
            is_causal: c.causal,
            scale: None,
            enable_gqa: c.hq != c.hkv,
            seed: Some(0x5eed_0000_1234_5678),
            ..Default::default()
        };
        let _only = sdpa_kernel(&[backend]);
        let (q, k, v) = (
            view(q, c.strided)?,
            view(k, c.strided)?,
            view(v, c.strided)?,
        );
        scaled_dot_product_attention(&q, &k, &v, &opts)
    };
    value_and_grads(sdpa, inputs, dout, target)
}

fn check(backend: Backend, dtype: DType, c: Case, target: &Target) -> Result<()> {
    let q = input(c.b, c.hq, c.lq, c.e, dtype, c.strided)?;
    let k = input(c.b, c.hkv, c.lk, c.e, dtype, c.strided)?;
    let v = input(c.b, c.hkv, c.lk, c.ev, dtype, c.strided)?;
    let mask = match c.mask {
        Mask::None => None,
        // Broadcast over batch: (Hq, Lq, Lk); about a fifth of the entries masked, some rows fully.
        Mask::Bool => {
            let r = Tensor::rand(0f32, 1., (c.hq, c.lq, c.lk), &Device::Cpu)?;
            Some(r.ge(0.2)?)
        }
        Mask::Bias => Some(Tensor::randn(0f32, 1., (1, c.lq, c.lk), &Device::Cpu)?),
    };
    let dout = Tensor::randn(0f32, 1., (c.b, c.hq, c.lq, c.ev), &Device::Cpu)?;
    let inputs = [&q, &k, &v];
    let cpu = run(backend, &c, inputs, mask.as_ref(), &dout, None)?;
    let cuda = run(backend, &c, inputs, mask.as_ref(), &dout, Some(target))?;
    compare(&format!("{backend:?} {dtype:?} {c:?}"), dtype, &cuda, &cpu)
}

/// Checks the kernels' output and (dq, dk, dv) against the CPU's, within [`tolerance`].
fn compare(what: &str, dtype: DType, kernels: &[Tensor; 4], cpu: &[Tensor; 4]) -> Result<()> {
    let (tf, tb) = tolerance(dtype);
    // Gradients are measured against the largest of the three: a gradient that is zero in exact
    // arithmetic (dq and dk with one visible key) is rounding noise of the size of the others'
    // rounding in both implementations, not something either computes to any relative accuracy.
    let grad_scale = max_abs(&cpu[1])?
        .max(max_abs(&cpu[2])?)
        .max(max_abs(&cpu[3])?);
    for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
        let (scale, tol) = if i == 0 {
            (max_abs(&cpu[0])?, tf)
        } else {
            (grad_scale, tb)
        };
        let err = rel_err(&kernels[i], &cpu[i], scale)?;
        if err > tol {
            candle_core::bail!("{what}: {name} relative error {err:.2e} > {tol:.0e}");
        }
    }
    Ok(())
}

/// `f(q, k, v)` and the gradients of `sum(f(q, k, v) * dout)` for inputs given on the CPU: on the
/// kernels' target, or with `None` by the CPU implementation.
fn value_and_grads(
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    inputs: [&Tensor; 3],
    dout: &Tensor,
    target: Option<&Target>,
) -> Result<[Tensor; 4]> {
    let dev = &target.map_or(Device::Cpu, Target::device);
    let _running = target.map(Target::run);
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(dev)?))
        .collect::<Result<_>>()?;
    let y = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    )?;
    let grads = (y.to_dtype(DType::F32)? * dout.to_device(dev)?)?
        .sum_all()?
        .backward()?;
    let g = |v: &Var| {
        grads
            .get(v.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("missing gradient".into()))
    };
    Ok([y, g(&vars[0])?, g(&vars[1])?, g(&vars[2])?])
}

/// Runs every case, reporting all failures at once; `lens` (query, key lengths) defaults to a
/// set of short and odd ones.
fn check_all(
    backend: Backend,
    dtypes: &[DType],
    dims: &[(usize, usize)],
    masks: &[Mask],
    lens: Option<&[(usize, usize)]>,
) {
    let Some(target) = Target::get() else { return };
    // The emulator runs fewer lengths unless ATTN_EMU_FULL is set (minutes instead of one).
    let lens: &[(usize, usize)] = match lens {
        Some(lens) => lens,
        None if target.emulated() && std::env::var_os("ATTN_EMU_FULL").is_none() => {
            &[(1, 1), (7, 7), (65, 63), (70, 129)]
        }
        None => &[(1, 1), (7, 7), (65, 63), (130, 257), (257, 130), (64, 128)],
    };
    let mut failures = Failures::default();
    let mut n = 0;
    for &dtype in dtypes {
        for (di, &(e, ev)) in dims.iter().enumerate() {
            for (li, &(lq, lk)) in lens.iter().enumerate() {
                let i = di + li;
                let c = Case {
                    b: 2,
                    hq: 4,
                    hkv: if i % 3 == 0 { 2 } else { 4 },
                    lq,
                    lk,
                    e,
                    ev,
                    causal: i % 2 == 0 && masks[i % masks.len()] == Mask::None,
                    mask: masks[i % masks.len()],
                    dropout: if i % 4 == 1 { 0.3 } else { 0.0 },
                    strided: i % 3 == 1,
                };
                n += 1;
                failures.check(check(backend, dtype, c, &target));
            }
        }
    }
    eprintln!(
        "{backend:?}: {} of {n} cases agree with the CPU",
        n - failures.len()
    );
    failures.assert_none();
}

/// Both flash forward tilings, forced by `ATTN_OP_CUDA_FWD_ROWS`: 128-row query tiles (the
/// default up to head dim 128 past 64 rows), then the 64-row ones, each also on lengths that
/// span several query tiles. The only test that sets the variable: others running meanwhile get
/// either tiling, which gives them the same results.
#[test]
fn flash_matches_cpu() {
    let dims = [
        (8, 8),
        (32, 32),
        (64, 64),
        (80, 80),
        (96, 96),
        (128, 128),
        (256, 256),
    ];
    // Two 128-row query tiles or three 64-row ones.
    let long: &[(usize, usize)] = &[(150, 100)];
    let long_dims = [(64, 64), (128, 128)];
    let flash = Backend::Flash;
    let none = &[Mask::None];
    std::env::set_var("ATTN_OP_CUDA_FWD_ROWS", "128");
    check_all(flash, &[DType::F16, DType::BF16], &dims, none, None);
    check_all(flash, &[DType::BF16], &long_dims, none, Some(long));
    std::env::set_var("ATTN_OP_CUDA_FWD_ROWS", "64");
    check_all(
        flash,
        &[DType::F16],
        &[(32, 32), (80, 80), (128, 128)],
        none,
        None,
    );
    check_all(flash, &[DType::BF16], &long_dims, none, Some(long));
    std::env::remove_var("ATTN_OP_CUDA_FWD_ROWS");
}

#[test]
fn efficient_matches_cpu() {
    let dims = [(8, 8), (13, 7), (64, 64), (128, 96), (130, 130), (256, 256)];
    check_all(
        Backend::Efficient,
        &[DType::F32, DType::F16, DType::BF16],
        &dims,
        &[Mask::None, Mask::Bool, Mask::Bias],
        None,
    );
}

/// Dropout with the same seed drops the same elements on CPU and GPU, in every row and column
/// position (checked through the output with v = identity-like values).
#[test]
fn dropout_masks_are_the_cpus() -> Result<()> {
    let Some(target) = Target::get() else {
        return Ok(());
    };
    for backend in [Backend::Flash, Backend::Efficient] {
        let dtype = if backend == Backend::Flash {
            DType::F16
        } else {
            DType::F32
        };
        let c = Case {
            b: 1,
            hq: 3,
            hkv: 3,
            lq: 70,
            lk: 70,
            e: 64,
            ev: 64,
            causal: false,
            mask: Mask::None,
            dropout: 0.5,
            strided: false,
        };
        check(backend, dtype, c, &target)?;
    }
    Ok(())
}

/// `CausalSelfAttention::forward_packed` on the efficient kernels (what CUDA runs in f32, where
/// flash refuses it): packed sequences of 3, 70 and 1 tokens, output and input gradient, against
/// the CPU. Flash alone refuses f32 there, naming the reason.
#[test]
fn packed_layer_on_efficient_kernels_matches_cpu() -> Result<()> {
    use attn_op::nn::{AttentionConfig, CausalSelfAttention, Causality};
    let Some(target) = Target::get() else {
        return Ok(());
    };
    let (c, cu) = (64, [0u32, 3, 73, 74]);
    let w_attn = Tensor::randn(0f32, 0.2, (3 * c, c), &Device::Cpu)?;
    let w_proj = Tensor::randn(0f32, 0.2, (c, c), &Device::Cpu)?;
    let x = Tensor::randn(0f32, 1., (74, c), &Device::Cpu)?;
    let probe = Tensor::randn(0f32, 1., (74, c), &Device::Cpu)?;
    let run = |dev: &Device| -> Result<(Tensor, Tensor)> {
        let cfg = AttentionConfig {
            n_embd: c,
            n_head: 4,
            bias: false,
            dropout: 0.0,
            causality: Causality::Always,
        };
        let layer = CausalSelfAttention::with_projections(
            cfg,
            candle_nn::Linear::new(w_attn.to_device(dev)?, None),
            candle_nn::Linear::new(w_proj.to_device(dev)?, None),
        )?;
        let x = Var::from_tensor(&x.to_device(dev)?)?;
        let y = layer.forward_packed(x.as_tensor(), &Tensor::new(&cu, dev)?, false)?;
        let grads = (&y * probe.to_device(dev)?)?.sum_all()?.backward()?;
        let dx = grads.get(x.as_tensor()).expect("a gradient for x").clone();
        Ok((y.to_device(&Device::Cpu)?, dx.to_device(&Device::Cpu)?))
    };
    let (want_y, want_dx) = run(&Device::Cpu)?;
    let _running = target.run();
    {
        let _flash = sdpa_kernel(&[Backend::Flash]);
        let e = run(&target.device()).unwrap_err().to_string();
        assert!(
            e.contains("f32 is not supported by the CUDA flash kernels"),
            "{e}"
        );
    }
    let _efficient = sdpa_kernel(&[Backend::Efficient]);
    let (y, dx) = run(&target.device())?;
    for (name, got, want) in [("output", &y, &want_y), ("dx", &dx, &want_dx)] {
        let err = rel_err(got, want, max_abs(want)?)?;
        assert!(err <= 1e-4, "packed {name}: relative error {err:.2e}");
    }
    Ok(())
}

/// `nn::dropout` on the target makes its mask with the `dropout_keep_*` kernel: the CPU's mask
/// and result bit for bit, for every dtype, row widths that are not multiples of 4, and p that
/// drops none, some or nearly all.
#[test]
fn dropout_layer_is_the_cpus_bit_for_bit() -> Result<()> {
    let Some(target) = Target::get() else {
        return Ok(());
    };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (shape, p) in [
            (&[3usize, 7][..], 0.3),
            (&[5, 130][..], 0.1),
            (&[2, 3, 33][..], 0.9),
            (&[1, 1][..], 0.5),
        ] {
            let x = Tensor::randn(0f32, 1., shape, &Device::Cpu)?.to_dtype(dtype)?;
            let want = attn_op::nn::dropout(&x, p, 1234)?;
            let got = {
                let _running = target.run();
                attn_op::nn::dropout(&x.to_device(&target.device())?, p, 1234)?
            };
            assert_eq!(got.dims(), shape);
            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                Ok(t.flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|v| v.to_bits())
                    .collect())
            };
            let (want, got) = (bits(&want)?, bits(&got)?);
            let dropped = want.iter().filter(|&&b| b & 0x7fff_ffff == 0).count();
            assert_eq!(got, want, "{dtype:?} {shape:?} p = {p}");
            eprintln!(
                "dropout {dtype:?} {shape:?} p = {p}: {dropped} of {} dropped, the CPU's",
                want.len()
            );
        }
    }
    Ok(())
}

/// `flash_attn` (bottom-right causal alignment, `(B, S, H, D)` views, GQA) and packed sequences,
/// forward and backward.
#[test]
fn flash_attn_layouts_match_cpu() -> Result<()> {
    let Some(target) = Target::get() else {
        return Ok(());
    };
    let randn = |shape: &[usize], dtype: DType| {
        Tensor::randn(0f32, 1., shape, &Device::Cpu)?.to_dtype(dtype)
    };
    let mut failures = Failures::default();
    for dtype in [DType::F16, DType::BF16] {
        for (sq, sk) in [(1, 9), (5, 77), (77, 5), (129, 129)] {
            let q = randn(&[2, sq, 4, 64], dtype)?;
            let k = randn(&[2, sk, 2, 64], dtype)?;
            let v = randn(&[2, sk, 2, 64], dtype)?;
            let dout = Tensor::randn(0f32, 1., (2, sq, 4, 64), &Device::Cpu)?;
            let f = |q: &Tensor, k: &Tensor, v: &Tensor| flash_attn(q, k, v, 0.125, true);
            let cpu = value_and_grads(f, [&q, &k, &v], &dout, None)?;
            let kernels = value_and_grads(f, [&q, &k, &v], &dout, Some(&target))?;
            let what = format!("flash_attn {dtype:?} ({sq}, {sk})");
            failures.check(compare(&what, dtype, &kernels, &cpu));
        }
        // Three sequences of 3, 70 and 1 queries against 5, 64 and 33 keys, and one padding row.
        let (tq, tk) = (3 + 70 + 1 + 1, 5 + 64 + 33);
        let q = randn(&[tq, 4, 32], dtype)?;
        let k = randn(&[tk, 4, 32], dtype)?;
        let v = randn(&[tk, 4, 32], dtype)?;
        let dout = Tensor::randn(0f32, 1., (tq, 4, 32), &Device::Cpu)?;
        let dev = target.device();
        let cu_q = Tensor::new(&[0u32, 3, 73, 74], &dev)?;
        let cu_k = Tensor::new(&[0u32, 5, 69, 102], &dev)?;
        let (cpu_q, cpu_k) = (cu_q.to_device(&Device::Cpu)?, cu_k.to_device(&Device::Cpu)?);
        for causal in [false, true] {
            let varlen = |cq: &Tensor, ck: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor| {
                flash_attn_varlen(q, k, v, cq, ck, 70, 64, 0.2, causal)
            };
            let on_cpu = |q: &Tensor, k: &Tensor, v: &Tensor| varlen(&cpu_q, &cpu_k, q, k, v);
            let on_target = |q: &Tensor, k: &Tensor, v: &Tensor| varlen(&cu_q, &cu_k, q, k, v);
            let cpu = value_and_grads(on_cpu, [&q, &k, &v], &dout, None)?;
            let kernels = value_and_grads(on_target, [&q, &k, &v], &dout, Some(&target))?;
            let what = format!("flash_attn_varlen {dtype:?} causal {causal}");
            failures.check(compare(&what, dtype, &kernels, &cpu));
        }
    }
    failures.assert_none();
    Ok(())
}

/// A row whose keys are all masked gives zeros and zero gradients, never NaN.
#[test]
fn fully_masked_rows_are_zero() -> Result<()> {
    let Some(target) = Target::get() else {
        return Ok(());
    };
    let gpu = target.device();
    let _running = target.run();
    let q = Var::from_tensor(&Tensor::randn(0f32, 1., (1, 2, 5, 16), &gpu)?)?;
    let mut m = vec![1u8; 5 * 7];
    m[2 * 7..3 * 7].fill(0); // row 2 sees nothing
    let mask = Tensor::from_vec(m, (5, 7), &gpu)?;
    let kv = Tensor::randn(0f32, 1., (1, 2, 7, 16), &gpu)?;
    let _only = sdpa_kernel(&[Backend::Efficient]);
    let opts = SdpaOptions {
        attn_mask: Some(mask),
        ..Default::default()
    };
    let y = scaled_dot_product_attention(q.as_tensor(), &kv, &kv, &opts)?;
    let row = y.narrow(2, 2, 1)?.abs()?.sum_all()?.to_scalar::<f32>()?;
    assert_eq!(row, 0.0);
    let g = y.sum_all()?.backward()?;
    let dq = g.get(q.as_tensor()).expect("dq");
    assert_eq!(
        dq.narrow(2, 2, 1)?.abs()?.sum_all()?.to_scalar::<f32>()?,
        0.0
    );
    assert!(dq.abs()?.sum_all()?.to_scalar::<f32>()?.is_finite());
    Ok(())
}

/// What the kernels cannot run is an error naming the reason, not a wrong result: f32 on the
/// flash kernels, a head dim above 256 on the efficient ones.
#[test]
fn refused_problems_are_errors() -> Result<()> {
    let Some(target) = Target::get() else {
        return Ok(());
    };
    let dev = target.device();
    let _running = target.run();
    let opts = SdpaOptions::default();
    let q = Tensor::randn(0f32, 1., (1, 2, 5, 16), &dev)?;
    let flash = {
        let _only = sdpa_kernel(&[Backend::Flash]);
        scaled_dot_product_attention(&q, &q, &q, &opts)
    };
    let why = flash.expect_err("f32 flash ran").to_string();
    assert!(
        why.contains("f32 is not supported by the CUDA flash kernels"),
        "{why}"
    );
    let wide = Tensor::randn(0f32, 1., (1, 2, 5, 300), &dev)?;
    let efficient = {
        let _only = sdpa_kernel(&[Backend::Efficient]);
        scaled_dot_product_attention(&wide, &wide, &wide, &opts)
    };
    let why = efficient.expect_err("head dim 300 ran").to_string();
    assert!(why.contains("head dim 300 is above 256"), "{why}");
    Ok(())
}

/// A problem with windows, ALiBi or a soft cap for the fused ops: lengths, head dim, the window
/// (bottom-right aligned unless `top_left`), the soft cap, ALiBi (slopes per query head, one of
/// them zero), dropout and, for the efficient op, a mask.
#[derive(Clone, Copy, Debug)]
struct Extras {
    lq: usize,
    lk: usize,
    d: usize,
    left: Option<usize>,
    right: Option<usize>,
    top_left: bool,
    softcap: Option<f32>,
    alibi: bool,
    dropout: f64,
    mask: Mask,
}

const EXTRAS: Extras = Extras {
    lq: 0,
    lk: 0,
    d: 0,
    left: None,
    right: None,
    top_left: false,
    softcap: None,
    alibi: false,
    dropout: 0.0,
    mask: Mask::None,
};

/// ALiBi slopes of `hq` heads: large enough to matter over tens of keys; head 2 has none, so a
/// call mixes heads with and without extras when there is no soft cap.
fn slopes(hq: usize) -> Vec<f32> {
    (0..hq).map(|h| [0.2, 0.05, 0.0, 0.5][h % 4]).collect()
}

/// Runs case `c` through `backend`'s op (FlashAttention or EfficientAttention) on the CPU and
/// on the kernels' target, q `(1, 4, lq, d)` against k, v of 2 heads (GQA), and compares values
/// and gradients.
fn check_extras(backend: Backend, dtype: DType, c: Extras, target: &Target) -> Result<()> {
    use attn_op::{CausalAlign, EfficientAttention, FlashAttention};
    let (hq, hkv) = (4, 2);
    let q = input(1, hq, c.lq, c.d, dtype, false)?;
    let k = input(1, hkv, c.lk, c.d, dtype, false)?;
    let v = input(1, hkv, c.lk, c.d, dtype, false)?;
    let mask = match c.mask {
        Mask::None => None,
        Mask::Bool => Some(Tensor::rand(0f32, 1., (hq, c.lq, c.lk), &Device::Cpu)?.ge(0.2)?),
        Mask::Bias => Some(Tensor::randn(0f32, 1., (1, c.lq, c.lk), &Device::Cpu)?),
    };
    let dout = Tensor::randn(0f32, 1., (1, hq, c.lq, c.d), &Device::Cpu)?;
    // A larger scale than 1/sqrt(d), so that the soft cap bends most scores.
    let scale = 3.0 / (c.d as f32).sqrt();
    let align = if c.top_left {
        CausalAlign::TopLeft
    } else {
        CausalAlign::BottomRight
    };
    let windowed = c.left.is_some() || c.right.is_some();
    let f = |q: &Tensor, k: &Tensor, v: &Tensor| {
        let seed = 0x5eed;
        if backend == Backend::Flash {
            let mut op = FlashAttention::new(scale, None);
            if windowed {
                op = op.with_window(align, c.left, c.right);
            }
            if let Some(cap) = c.softcap {
                op = op.with_softcap(cap)?;
            }
            if c.alibi {
                op = op.with_alibi(&slopes(hq))?;
            }
            if c.dropout > 0.0 {
                op = op.with_dropout(c.dropout, seed)?;
            }
            q.apply_op3(k, v, op)
        } else {
            let mut op = EfficientAttention::new(scale, None);
            if windowed {
                op = op.with_window(align, c.left, c.right);
            }
            if let Some(cap) = c.softcap {
                op = op.with_softcap(cap)?;
            }
            if c.alibi {
                op = op.with_alibi(&slopes(hq))?;
            }
            if c.dropout > 0.0 {
                op = op.with_dropout(c.dropout, seed)?;
            }
            if let Some(m) = &mask {
                op = op.with_mask(&m.to_device(q.device())?)?;
            }
            q.apply_op3(k, v, op)
        }
    };
    let cpu = value_and_grads(f, [&q, &k, &v], &dout, None)?;
    let kernels = value_and_grads(f, [&q, &k, &v], &dout, Some(target))?;
    compare(
        &format!("{backend:?} {dtype:?} {c:?}"),
        dtype,
        &kernels,
        &cpu,
    )
}

/// Windows, ALiBi and the soft cap on the flash kernels, forward and backward, against the CPU:
/// windows that cut the key tiles (64 keys, 32 at head dims 96 to 256 in the 128-row tiling) on
/// both sides, start past the first key tiles (skipped), leave rows that see nothing (Lq > Lk,
/// the window ending on the diagonal), either alignment, Lq != Lk, GQA, dropout, both forward
/// tilings (64 and 128 query rows) and head dim 256 (whose backward is the CUDA-core one).
#[test]
fn flash_windows_alibi_softcap_match_cpu() -> Result<()> {
    let Some(target) = Target::get() else {
        return Ok(());
    };
    let e = EXTRAS;
    let cases = [
        Extras {
            lq: 150,
            lk: 150,
            d: 64,
            left: Some(40),
            right: Some(0),
            alibi: true,
            ..e
        },
        Extras {
            lq: 70,
            lk: 130,
            d: 32,
            left: Some(20),
            right: Some(10),
            softcap: Some(2.0),
            dropout: 0.2,
            ..e
        },
        Extras {
            lq: 100,
            lk: 40,
            d: 128,
            left: Some(5),
            right: Some(0),
            softcap: Some(3.0),
            alibi: true,
            ..e
        },
        Extras {
            lq: 60,
            lk: 97,
            d: 64,
            right: Some(3),
            alibi: true,
            ..e
        },
        Extras {
            lq: 50,
            lk: 90,
            d: 96,
            left: Some(3),
            right: Some(0),
            top_left: true,
            softcap: Some(1.5),
            ..e
        },
        Extras {
            lq: 65,
            lk: 70,
            d: 256,
            left: Some(30),
            right: Some(30),
            softcap: Some(2.0),
            alibi: true,
            ..e
        },
    ];
    let mut failures = Failures::default();
    for (i, c) in cases.into_iter().enumerate() {
        let dtype = if i % 2 == 0 { DType::F16 } else { DType::BF16 };
        failures.check(check_extras(Backend::Flash, dtype, c, &target));
    }
    failures.assert_none();
    Ok(())
}

/// The same on the efficient kernels, with and without masks: the tensor-core ones (f32 3xTF32,
/// f16/bf16 the flash templates with masks), the CUDA-core backward at head dim 256 and, with
/// `ATTN_OP_CUDA_EFFICIENT_SIMT`, the CUDA-core forward and backward (this is the only test that
/// sets it: others running meanwhile get either kernel, which gives them the same results).
#[test]
fn efficient_windows_alibi_softcap_match_cpu() -> Result<()> {
    let Some(target) = Target::get() else {
        return Ok(());
    };
    let e = EXTRAS;
    let cases = [
        Extras {
            lq: 100,
            lk: 100,
            d: 64,
            left: Some(30),
            softcap: Some(2.0),
            ..e
        },
        Extras {
            lq: 70,
            lk: 130,
            d: 32,
            left: Some(20),
            right: Some(40),
            alibi: true,
            dropout: 0.2,
            mask: Mask::Bias,
            ..e
        },
        Extras {
            lq: 90,
            lk: 40,
            d: 128,
            left: Some(30),
            right: Some(3),
            softcap: Some(5.0),
            alibi: true,
            mask: Mask::Bool,
            ..e
        },
        Extras {
            lq: 65,
            lk: 97,
            d: 256,
            left: Some(9),
            right: Some(0),
            softcap: Some(3.0),
            ..e
        },
        Extras {
            lq: 40,
            lk: 70,
            d: 13,
            right: Some(0),
            top_left: true,
            softcap: Some(4.0),
            alibi: true,
            mask: Mask::Bias,
            ..e
        },
    ];
    let mut failures = Failures::default();
    for simt in [false, true] {
        if simt {
            std::env::set_var("ATTN_OP_CUDA_EFFICIENT_SIMT", "1");
        }
        for (i, &dtype) in [DType::F32, DType::F16, DType::BF16].iter().enumerate() {
            for (j, &c) in cases.iter().enumerate() {
                // The CUDA-core pass runs each case once, in one of the dtypes.
                if simt && j % 3 != i {
                    continue;
                }
                if let Err(e) = check_extras(Backend::Efficient, dtype, c, &target) {
                    failures.push(format!("simt {simt}: {e}"));
                }
            }
        }
    }
    std::env::remove_var("ATTN_OP_CUDA_EFFICIENT_SIMT");
    failures.assert_none();
    Ok(())
}

/// The varlen windowed and ALiBi/soft-cap functions on the flash kernels: packed sequences of 3,
/// 90 and 1 queries against 5, 100 and 33 keys, windows across the key tiles.
#[test]
fn flash_varlen_windows_alibi_softcap_match_cpu() -> Result<()> {
    let Some(target) = Target::get() else {
        return Ok(());
    };
    let mut failures = Failures::default();
    let (tq, tk, h, d) = (3 + 90 + 1, 5 + 100 + 33, 4, 32);
    let (cu_q, cu_k) = ([0u32, 3, 93, 94], [0u32, 5, 105, 138]);
    for (dtype, left, right, extras) in [
        (DType::F16, Some(30), Some(0), true),
        (DType::BF16, Some(10), Some(5), false),
    ] {
        let randn = |shape: &[usize]| Tensor::randn(0f32, 1., shape, &Device::Cpu)?.to_dtype(dtype);
        let (q, k, v) = (
            randn(&[tq, h, d])?,
            randn(&[tk, h / 2, d])?,
            randn(&[tk, h / 2, d])?,
        );
        let dout = Tensor::randn(0f32, 1., (tq, h, d), &Device::Cpu)?;
        let run = |dev: &Device, q: &Tensor, k: &Tensor, v: &Tensor| {
            let (cq, ck) = (Tensor::new(&cu_q, dev)?, Tensor::new(&cu_k, dev)?);
            if extras {
                let s = Tensor::new(slopes(h), dev)?;
                attn_op::flash_attn_varlen_alibi_windowed_softcap(
                    q,
                    k,
                    v,
                    Some(&s),
                    &cq,
                    &ck,
                    90,
                    100,
                    0.5,
                    left,
                    right,
                    3.0,
                )
            } else {
                attn_op::flash_attn_varlen_windowed(q, k, v, &cq, &ck, 90, 100, 0.5, left, right)
            }
        };
        let dev = target.device();
        let on_cpu = |q: &Tensor, k: &Tensor, v: &Tensor| run(&Device::Cpu, q, k, v);
        let on_target = |q: &Tensor, k: &Tensor, v: &Tensor| run(&dev, q, k, v);
        let cpu = value_and_grads(on_cpu, [&q, &k, &v], &dout, None)?;
        let kernels = value_and_grads(on_target, [&q, &k, &v], &dout, Some(&target))?;
        let what = format!("varlen {dtype:?} window ({left:?}, {right:?}) alibi+softcap {extras}");
        failures.check(compare(&what, dtype, &kernels, &cpu));
    }
    failures.assert_none();
    Ok(())
}
