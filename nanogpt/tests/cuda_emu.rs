//! nanoGPT's model with its attention on attn-op's CUDA kernels, run on the CPU by attn-kernels'
//! emulator (feature `cuda-emu`): what a GPU run hands the kernels (q, k and v as strided views
//! of the packed projection, bf16 by default, f32 on request), in training (forward and
//! backward, with dropout) and in KV-cache decoding, against the CPU implementation.
#![cfg(feature = "cuda-emu")]

use attn_op::emu::emulate_cuda;
use attn_op::{sdpa_kernel, Backend};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use nanogpt::model::{init_weights, Gpt, ModelConfig};
use nanogpt::rng::Rng;

const VOCAB: usize = 40;

/// Two blocks of two heads of 32; attention weights larger than nanoGPT's initialisation, so
/// that the attention is far from uniform.
fn model(bias: bool) -> Result<(VarMap, Gpt)> {
    let cfg = ModelConfig {
        vocab_size: VOCAB,
        block_size: 32,
        n_layer: 2,
        n_head: 2,
        n_embd: 64,
        dropout: 0.1,
        bias,
    };
    let map = VarMap::new();
    let gpt = Gpt::new(
        &cfg,
        VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
        true,
    )?;
    let mut rng = Rng::new(11, 0);
    init_weights(&map, cfg.n_layer, &mut rng)?;
    for (name, var) in map.data().lock().unwrap().iter() {
        if name.contains("c_attn") && name.ends_with("weight") {
            let values = rng.normal_vec(var.elem_count(), 0.25);
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
        }
    }
    Ok((map, gpt))
}

fn tokens(rng: &mut Rng, b: usize, t: usize) -> Result<Tensor> {
    let ids: Vec<u32> = (0..b * t).map(|_| rng.below(VOCAB as u64) as u32).collect();
    Tensor::from_vec(ids, (b, t), &Device::Cpu)
}

/// The loss of a training step (dropout on) and every parameter's gradient, by name.
fn step(map: &VarMap, gpt: &Gpt, dtype: DType) -> Result<(f32, Vec<(String, Tensor)>)> {
    let mut rng = Rng::new(5, 0);
    let (x, y) = (tokens(&mut rng, 3, 29)?, tokens(&mut rng, 3, 29)?);
    gpt.set_attn_seed_states(&[17, 23])?;
    let loss = gpt.loss(&x, &y, dtype, Some(&mut rng))?;
    let grads = loss.backward()?;
    let mut named: Vec<(String, Tensor)> = map
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| (name.clone(), grads.get(var).expect(name).clone()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((loss.to_scalar::<f32>()?, named))
}

fn max_abs(t: &Tensor) -> Result<f32> {
    t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// The training step in `dtype` on the CPU and in the emulator, each against the CPU in f32:
/// the emulator's loss and gradients are as close to f32 as the CPU's own `dtype` step is
/// (twice its error at most), give or take `floor` of each parameter's largest gradient.
fn compare_step(bias: bool, dtype: DType, floor: f32) -> Result<()> {
    let (map, gpt) = model(bias)?;
    let (loss_f32, want) = step(&map, &gpt, DType::F32)?;
    let (loss_cpu, cpu) = step(&map, &gpt, dtype)?;
    let (loss_emu, emu) = {
        let _emulate = emulate_cuda();
        step(&map, &gpt, dtype)?
    };
    let (err_cpu, err_emu) = ((loss_cpu - loss_f32).abs(), (loss_emu - loss_f32).abs());
    assert!(
        err_emu <= 2.0 * err_cpu + floor * loss_f32,
        "{dtype:?}: loss {loss_f32} in f32, {loss_cpu} on the CPU, {loss_emu} in the emulator"
    );
    for ((name, g), ((_, g_cpu), (_, g_emu))) in want.iter().zip(cpu.iter().zip(&emu)) {
        let scale = max_abs(g)?;
        let (err_cpu, err_emu) = (max_abs(&(g - g_cpu)?)?, max_abs(&(g - g_emu)?)?);
        eprintln!(
            "GRAD {dtype:?} {name} {} {}",
            err_cpu / scale,
            err_emu / scale
        );
        assert!(
            scale > 0.0 && err_emu <= 2.0 * err_cpu + floor * scale,
            "{dtype:?}: gradient of {name} off f32 by {err_emu} in the emulator, {err_cpu} on \
             the CPU (largest {scale})"
        );
    }
    Ok(())
}

/// bf16, as `nanogpt train --device cuda` runs by default: the flash kernels.
#[test]
fn bf16_training_step_on_the_flash_kernels() -> Result<()> {
    compare_step(false, DType::BF16, 0.005)
}

/// f32 with biases: the efficient kernels (the dispatcher's choice on a GPU, where flash takes
/// f16/bf16 only). Flash alone refuses it, in the emulator as on a GPU.
#[test]
fn f32_training_step_on_the_efficient_kernels() -> Result<()> {
    {
        let (map, gpt) = model(true)?;
        let _emulate = emulate_cuda();
        let _flash = sdpa_kernel(&[Backend::Flash]);
        let e = step(&map, &gpt, DType::F32).unwrap_err().to_string();
        assert!(
            e.contains("f32 is not supported by the CUDA flash kernels"),
            "{e}"
        );
    }
    let _efficient = sdpa_kernel(&[Backend::Efficient]);
    compare_step(true, DType::F32, 1e-4)
}

/// KV-cache decoding in bf16: a prompt, two tokens at once, then one at a time, through the
/// emulated kernels, as close to the CPU's f32 logits as the CPU's own bf16 decoding is.
#[test]
fn bf16_decoding_on_the_kernels() -> Result<()> {
    let (_, gpt) = model(false)?;
    let idx = tokens(&mut Rng::new(9, 0), 2, 12)?;
    let decode = |dtype| -> Result<Tensor> {
        let mut caches = gpt.new_caches();
        let mut logits = Vec::new();
        for (start, len) in [(0, 7), (7, 2), (9, 1), (10, 1), (11, 1)] {
            let x = idx.narrow(1, start, len)?;
            logits.push(
                gpt.forward(&x, start, dtype, None, Some(&mut caches))?
                    .reshape((2, len, VOCAB))?,
            );
        }
        Tensor::cat(&logits, 1)
    };
    let want = decode(DType::F32)?;
    let cpu = decode(DType::BF16)?;
    let emu = {
        let _emulate = emulate_cuda();
        decode(DType::BF16)?
    };
    let (err_cpu, err_emu) = (max_abs(&(&cpu - &want)?)?, max_abs(&(&emu - &want)?)?);
    let scale = max_abs(&want)?;
    assert!(
        err_emu <= 2.0 * err_cpu + 0.005 * scale,
        "logits off f32 by {err_emu} in the emulator, {err_cpu} on the CPU (largest {scale})"
    );
    Ok(())
}
