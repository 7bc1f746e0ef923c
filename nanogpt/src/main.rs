//! `nanogpt`: prepare tiny Shakespeare, train a GPT on it, and sample text.

mod cli;

use std::io::{IsTerminal, Write};

use anyhow::{Context, Result};
use clap::Parser;

use cli::{Cli, Command, PrepareArgs, SampleArgs, TrainArgs};
use nanogpt::config::{InitFrom, TrainConfig, CPU_RECIPE, GPU_RECIPE};
use nanogpt::data::{self, PrepareOptions};
use nanogpt::rng::Rng;
use nanogpt::sample::{Generator, Sampling};
use nanogpt::train::{train, TrainOptions};
use nanogpt::{checkpoint, device};

fn main() {
    keep_freed_memory();
    single_threaded_elementwise_ops();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Prepare(args) => prepare(args),
        Command::Train(args) => train_cmd(args),
        Command::Sample(args) => sample(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Each training step allocates and frees the same large activation buffers. By default glibc
/// serves them with fresh `mmap`s that the kernel must zero page by page (a fifth of a CPU step);
/// keeping freed memory in the heap lets the next step reuse it.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator's thresholds; it is called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Candle runs element-wise ops on a pool whose threads meet at a barrier after every op, and
/// busy-wait there. When anything else runs on the machine, a descheduled worker stalls each op:
/// with 2 threads on a loaded 2-core machine a CPU-recipe step took 400 ms instead of 92 ms.
/// These ops are memory-bound at nanoGPT's sizes, so they run on one thread unless
/// `CANDLE_NUM_THREADS` says otherwise; matrix products still use every core (`RAYON_NUM_THREADS`).
fn single_threaded_elementwise_ops() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Safe here: no other thread exists yet to read the environment concurrently.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

fn prepare(args: PrepareArgs) -> Result<()> {
    let summary = data::prepare(&PrepareOptions {
        input: args.input,
        data_dir: args.data_dir,
        tokenizer: args.tokenizer,
        vocab_size: args.vocab_size,
    })?;
    println!("{summary}");
    Ok(())
}

fn train_cmd(args: TrainArgs) -> Result<()> {
    let device = device::select(args.device)?;
    let recipe = if device.is_cuda() {
        GPU_RECIPE
    } else {
        CPU_RECIPE
    };
    let recipe = TrainConfig::from_toml(recipe).expect("the built-in recipes parse");
    let mut config = TrainConfig::layered(&recipe, args.config.as_deref(), &args.overrides)?;
    if config.init_from == InitFrom::Resume && args.config.is_none() {
        // Resuming without a config file continues the checkpoint's own configuration.
        let ckpt = checkpoint::load(
            &checkpoint::path_in(&config.out_dir),
            &candle_core::Device::Cpu,
        )?;
        config = TrainConfig::layered(&ckpt.meta.train_config, None, &args.overrides)?;
    }
    let dtype = device::dtype(args.dtype, &device);
    // Scoped to this thread, which runs the whole training loop.
    let _backend = args.attn.0.map(|b| attn_op::sdpa_kernel(&[b]));
    let attn = args.attn.0.map_or("auto".to_string(), |b| b.to_string());
    eprintln!(
        "training on {:?} in {dtype:?}, attention backend {attn}",
        device.location()
    );
    train(&TrainOptions {
        config,
        device,
        dtype,
        progress: std::io::stderr().is_terminal(),
    })?;
    Ok(())
}

fn sample(args: SampleArgs) -> Result<()> {
    let device = device::select(args.device)?;
    let dtype = device::dtype(args.dtype, &device);
    let start = match &args.start_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --start-file {}", path.display()))?,
        None => args.start.clone(),
    };
    let generator = Generator::load(&args.out_dir, &device, dtype)?;
    let prompt = generator
        .tokenizer
        .encode(&start)
        .context("the prompt cannot be encoded")?;
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: Some(args.top_k),
    };
    let mut rng = Rng::new(args.seed, 0);
    let mut stdout = std::io::stdout().lock();
    for _ in 0..args.num_samples {
        write!(stdout, "{start}")?;
        // Decode the whole continuation each step and print what is new, so that BPE tokens
        // that end inside a UTF-8 character print once complete.
        let mut ids = Vec::new();
        let mut printed = 0;
        generator.generate(
            &prompt,
            args.max_new_tokens,
            sampling,
            &mut rng,
            true,
            |t| {
                ids.push(t);
                let text = generator.tokenizer.decode(&ids)?;
                match text.get(printed..) {
                    Some(new) if !new.is_empty() && !new.ends_with('\u{FFFD}') => {
                        write!(stdout, "{new}")?;
                        stdout.flush()?;
                        printed = text.len();
                    }
                    _ => {}
                }
                Ok(())
            },
        )?;
        writeln!(stdout, "\n---------------")?;
    }
    Ok(())
}
