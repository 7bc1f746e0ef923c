//! Where a training step of the CPU recipe spends its time: forward (with the loss), backward,
//! gradient clipping and AdamW, as median wall-clock and CPU milliseconds over 50 steps on
//! random tokens.
//!
//!     cargo run --release -p nanogpt --example step_breakdown
//!     RAYON_NUM_THREADS=1 cargo run --release -p nanogpt --example step_breakdown
//!
//! As the binary, element-wise ops run on one thread unless `CANDLE_NUM_THREADS` is set.
//! CPU time is the process's (all threads): with one thread it is what the step would take on
//! an idle core even when other programs share the machine.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use nanogpt::config::{TrainConfig, CPU_RECIPE};
use nanogpt::model::{init_weights, Gpt, ModelConfig};
use nanogpt::optim::{clip_factor, AdamW};
use nanogpt::rng::Rng;
use nanogpt::train::median;

/// The process's CPU time in milliseconds.
fn cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

fn main() -> Result<()> {
    // The binary's allocator, thread settings and pool (see nanogpt::runtime).
    nanogpt::runtime::run(breakdown)
}

fn breakdown() -> Result<()> {
    let cfg = TrainConfig::from_toml(CPU_RECIPE)?;
    let dev = Device::Cpu;
    let model_cfg = ModelConfig::from_train(&cfg, 65);
    let varmap = VarMap::new();
    let model = Gpt::new(
        &model_cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        true,
    )?;
    let mut rng = Rng::new(1337, 0);
    init_weights(&varmap, cfg.n_layer, &mut rng)?;
    let mut opt = AdamW::new(&varmap, &cfg, model.fused())?;
    let n_tok = cfg.batch_size * cfg.block_size;
    let phases = ["forward + loss", "backward", "grad clip", "AdamW", "step"];
    let mut wall = vec![Vec::new(); phases.len()];
    let mut cpu = vec![Vec::new(); phases.len()];
    let _awake = nanogpt::runtime::WorkersAwake::start();
    for step in 0..55 {
        let tokens = |rng: &mut Rng| -> Result<Tensor> {
            let ids: Vec<u32> = (0..n_tok).map(|_| rng.below(65) as u32).collect();
            Ok(Tensor::from_vec(
                ids,
                (cfg.batch_size, cfg.block_size),
                &dev,
            )?)
        };
        let (x, y) = (tokens(&mut rng)?, tokens(&mut rng)?);
        let mut marks = vec![(Instant::now(), cpu_ms())];
        let loss = model.loss(&x, &y, DType::F32, Some(&mut rng))?;
        loss.to_scalar::<f32>()?;
        marks.push((Instant::now(), cpu_ms()));
        let grads = opt.grads(&loss.backward()?)?;
        marks.push((Instant::now(), cpu_ms()));
        let (_, grad_scale) = clip_factor(&grads, cfg.grad_clip)?;
        marks.push((Instant::now(), cpu_ms()));
        opt.step_scaled(&grads, cfg.learning_rate, grad_scale)?;
        marks.push((Instant::now(), cpu_ms()));
        if step < 5 {
            continue; // warm-up
        }
        for i in 0..4 {
            wall[i].push((marks[i + 1].0 - marks[i].0).as_secs_f64() * 1e3);
            cpu[i].push(marks[i + 1].1 - marks[i].1);
        }
        wall[4].push((marks[4].0 - marks[0].0).as_secs_f64() * 1e3);
        cpu[4].push(marks[4].1 - marks[0].1);
    }
    println!(
        "CPU recipe step ({} threads), median of 50 steps:",
        candle_core::utils::get_num_threads()
    );
    println!("{:<16} {:>9} {:>9}", "phase", "wall ms", "cpu ms");
    for (i, name) in phases.iter().enumerate() {
        println!(
            "{name:<16} {:>9.1} {:>9.1}",
            median(&mut wall[i]),
            median(&mut cpu[i])
        );
    }
    Ok(())
}
