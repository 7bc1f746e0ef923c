//! `nanogpt`: prepare tiny Shakespeare, train a GPT on it, sample text, and time attention.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use attn_op::profile::Profiler;
use candle_core::DType;
use clap::Parser;

use nanogpt::bench::{self, SdpaBench, VarlenBench};
use nanogpt::cli::{
    BenchArgs, BenchCommand, Cli, Command, PrepareArgs, SampleArgs, SdpaArgs, TrainArgs, VarlenArgs,
};
use nanogpt::config::{InitFrom, TrainConfig, CPU_RECIPE, GPU_RECIPE};
use nanogpt::data::{self, PrepareOptions};
use nanogpt::interrupt::{self, Interrupted};
use nanogpt::memory;
use nanogpt::rng::Rng;
use nanogpt::sample::{Generator, Sampling};
use nanogpt::train::{train, TrainOptions};
use nanogpt::{checkpoint, device};

fn main() {
    let cli = Cli::parse();
    let result = nanogpt::runtime::run(move || match cli.command {
        Command::Prepare(args) => prepare(args),
        Command::Train(args) => profiled(args.profile.clone().as_deref(), || train_cmd(args)),
        Command::Sample(args) => profiled(args.profile.clone().as_deref(), || sample(args)),
        Command::Bench(BenchArgs {
            which: BenchCommand::Sdpa(args),
        }) => profiled(args.profile.clone().as_deref(), || bench_sdpa(args)),
        Command::Bench(BenchArgs {
            which: BenchCommand::Varlen(args),
        }) => profiled(args.profile.clone().as_deref(), || bench_varlen(args)),
    });
    if let Err(e) = result {
        if let Some(stop) = e.downcast_ref::<Interrupted>() {
            eprintln!("{stop}");
            std::process::exit(stop.exit_code());
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Runs `work`, under a profiler when `--profile` names a trace file: the spans go to that file
/// as a Chrome trace and the top ones by total time to stderr at the end, also when `work` failed.
fn profiled(trace: Option<&Path>, work: impl FnOnce() -> Result<()>) -> Result<()> {
    let Some(path) = trace else {
        return work();
    };
    let profiler = Profiler::start(Some(path))?;
    let result = work();
    let report = profiler.finish();
    eprintln!("{report}");
    eprintln!(
        "Chrome trace written to {} (open it in chrome://tracing or https://ui.perfetto.dev)",
        path.display()
    );
    result
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
    let recipe = TrainConfig::from_toml(recipe).context("a built-in recipe does not parse")?;
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
    interrupt::install().context("cannot install the SIGINT/SIGTERM handlers")?;
    train(&TrainOptions {
        config,
        device,
        dtype,
        progress: std::io::stderr().is_terminal(),
        overwrite: args.overwrite,
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
    if device.is_cpu() {
        let need = memory::sampling(generator.model_config(), prompt.len(), args.max_new_tokens)?;
        memory::check_fits(
            &format!("sampling {} new tokens", args.max_new_tokens),
            &need,
            memory::available(),
        )?;
    }
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

fn bench_sdpa(args: SdpaArgs) -> Result<()> {
    let device = device::select(args.device)?;
    let dtype = match args.dtype {
        None if device.is_cuda() => DType::F16, // the tutorial's
        d => device::dtype(d, &device),
    };
    eprintln!(
        "timing attention on {:?}, at least {} ms per backend",
        device.location(),
        args.min_time_ms
    );
    let sweep = bench::sdpa(&SdpaBench {
        device,
        dtype,
        batch: args.batch,
        heads: args.heads,
        seq: args.seq,
        kv_seq: args.kv_seq.unwrap_or(args.seq),
        head_dim: args.head_dim,
        backends: args.backends.iter().map(|b| b.0).collect(),
        causal: args.causal,
        backward: args.backward,
        min_time: Duration::from_millis(args.min_time_ms),
    })?;
    print!("{sweep}");
    Ok(())
}

fn bench_varlen(args: VarlenArgs) -> Result<()> {
    let device = device::select(args.device)?;
    eprintln!(
        "timing causal self-attention on {:?}, at least {} ms per layout",
        device.location(),
        args.min_time_ms
    );
    let cmp = bench::varlen(&VarlenBench {
        device,
        batch: args.batch,
        max_len: args.max_len,
        n_embd: args.n_embd,
        n_head: args.n_head,
        seed: args.seed,
        min_time: Duration::from_millis(args.min_time_ms),
    })?;
    println!("{cmp}");
    println!(
        "packed and padded agree on the valid tokens (tolerance {:e})",
        bench::VARLEN_TOLERANCE
    );
    Ok(())
}
