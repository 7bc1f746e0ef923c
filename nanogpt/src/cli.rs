//! The command line: `nanogpt prepare`, `nanogpt train`, `nanogpt sample` and `nanogpt bench`.

use std::path::PathBuf;

use attn_op::Backend;
use clap::{Args, Parser, Subcommand};

use crate::config::ConfigOverrides;
use crate::device::{DeviceArg, DtypeArg};
use crate::tokenizer::TokenizerKind;

/// A char-level GPT in Candle, after Karpathy's nanoGPT.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Cli {
    #[allow(missing_docs)] // a doc comment here would become clap's help text
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing would only obscure the clap derive
pub enum Command {
    /// Tokenize a corpus (tiny Shakespeare by default) into train.bin/val.bin.
    Prepare(PrepareArgs),
    /// Train a GPT (preparing the data first if needed).
    Train(TrainArgs),
    /// Generate text from a checkpoint.
    Sample(SampleArgs),
    /// Time attention as PyTorch's SDPA tutorial does.
    Bench(BenchArgs),
}

/// `nanogpt prepare`.
#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Text corpus to use instead of downloading tiny Shakespeare.
    #[arg(long, env = "NANOGPT_INPUT")]
    pub input: Option<PathBuf>,
    /// Where train.bin, val.bin and meta.json go.
    #[arg(long, default_value = "data/shakespeare_char")]
    pub data_dir: PathBuf,
    /// One token per character, or a byte-level BPE trained on the corpus.
    #[arg(long, value_enum, default_value = "char")]
    pub tokenizer: TokenizerKind,
    /// BPE vocabulary size [default: 1024].
    #[arg(long)]
    pub vocab_size: Option<usize>,
}

/// `nanogpt train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// TOML file of settings (kebab-case keys, as in configs/); flags override it. Without it,
    /// configs/shakespeare_char_cpu.toml on the CPU and configs/shakespeare_char.toml on CUDA.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where to train.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Precision of activations and matrix products [default: f32 on CPU, bf16 on CUDA].
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Attention backend: auto (attn-op's dispatch), flash, efficient or math.
    #[arg(long, default_value = "auto", value_parser = parse_attn)]
    pub attn: AttnChoice,
    /// Write a Chrome trace of the run's spans to this file and print the top spans at the end.
    #[arg(long, value_name = "FILE.json")]
    pub profile: Option<PathBuf>,
    /// Let a fresh run replace the checkpoint and loss history of an earlier run in out-dir.
    #[arg(long)]
    pub overwrite: bool,
    #[allow(missing_docs)] // a doc comment here would become clap's help text
    #[command(flatten)]
    pub overrides: ConfigOverrides,
}

/// `nanogpt sample`.
#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Folder of the checkpoint.
    #[arg(long, default_value = "out-shakespeare-char")]
    pub out_dir: PathBuf,
    /// Prompt text.
    #[arg(long, default_value = "\n", conflicts_with = "start_file")]
    pub start: String,
    /// Read the prompt from this file.
    #[arg(long)]
    pub start_file: Option<PathBuf>,
    /// Samples to draw.
    #[arg(long, default_value_t = 10)]
    pub num_samples: usize,
    /// Tokens per sample.
    #[arg(long, default_value_t = 500)]
    pub max_new_tokens: usize,
    /// < 1 is more conservative, > 1 more random; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Sample only among the k most likely tokens.
    #[arg(long, default_value_t = 200)]
    pub top_k: usize,
    /// Seed of the draws.
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Where to run.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Precision [default: f32 on CPU, bf16 on CUDA].
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Write a Chrome trace of the run's spans to this file and print the top spans at the end.
    #[arg(long, value_name = "FILE.json")]
    pub profile: Option<PathBuf>,
}

/// `nanogpt bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[allow(missing_docs)] // a doc comment here would become clap's help text
    #[command(subcommand)]
    pub which: BenchCommand,
}

/// What `nanogpt bench` times.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// The default dispatch and each attention backend alone on random q, k, v (or why a backend
    /// refuses them); defaults are the tutorial's shapes.
    Sdpa(SdpaArgs),
    /// The model's causal self-attention layer on random-length sequences, padded and packed.
    Varlen(VarlenArgs),
}

/// `nanogpt bench sdpa`.
#[derive(Args, Debug)]
pub struct SdpaArgs {
    /// Where to run.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Precision of q, k, v [default: f32 on CPU, f16 on CUDA as the tutorial].
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 32)]
    pub heads: usize,
    /// Sequence length (of the queries).
    #[arg(long, default_value_t = 1024)]
    pub seq: usize,
    /// Key/value sequence length [default: --seq]; `--seq 1 --kv-seq 4096` times a KV-cache
    /// decoding step.
    #[arg(long)]
    pub kv_seq: Option<usize>,
    /// Head dimension.
    #[arg(long, default_value_t = 32)]
    pub head_dim: usize,
    /// Mask the future.
    #[arg(long)]
    pub causal: bool,
    /// What to time, in order: `default` (the automatic dispatch) and backends alone.
    #[arg(long, value_delimiter = ',', value_parser = parse_sweep_row,
          default_value = "default,flash,efficient,math")]
    pub backends: Vec<SweepRowArg>,
    /// Time forward and backward instead of forward alone.
    #[arg(long)]
    pub backward: bool,
    /// Least milliseconds spent timing each backend (as blocked_autorange's min_run_time).
    #[arg(long, default_value_t = 200)]
    pub min_time_ms: u64,
    /// Write a Chrome trace of the run's spans to this file and print the top spans at the end.
    #[arg(long, value_name = "FILE.json")]
    pub profile: Option<PathBuf>,
}

/// `nanogpt bench varlen`.
#[derive(Args, Debug)]
pub struct VarlenArgs {
    /// Where to run.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Sequences in the batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Longest sequence; lengths are uniform in [1, max-len] (about 50% padding).
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
    /// Embedding width of the attention layer.
    #[arg(long, default_value_t = 512)]
    pub n_embd: usize,
    /// Attention heads of the layer.
    #[arg(long, default_value_t = 8)]
    pub n_head: usize,
    /// Seed of the sequence lengths.
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Least milliseconds spent timing each layout.
    #[arg(long, default_value_t = 200)]
    pub min_time_ms: u64,
    /// Write a Chrome trace of the run's spans to this file and print the top spans at the end.
    #[arg(long, value_name = "FILE.json")]
    pub profile: Option<PathBuf>,
}

/// One row of `bench sdpa --backends`: a backend alone, or `None` for the automatic dispatch.
#[derive(Clone, Copy, Debug)]
pub struct SweepRowArg(pub Option<Backend>);

fn parse_sweep_row(s: &str) -> Result<SweepRowArg, String> {
    if s.eq_ignore_ascii_case("default") {
        Ok(SweepRowArg(None))
    } else {
        s.parse()
            .map(|b| SweepRowArg(Some(b)))
            .map_err(|e| format!("{e}, or default"))
    }
}

/// `--attn`: one attn-op backend, or `None` for its automatic dispatch.
#[derive(Clone, Copy, Debug)]
pub struct AttnChoice(pub Option<Backend>);

fn parse_attn(s: &str) -> Result<AttnChoice, String> {
    if s.eq_ignore_ascii_case("auto") {
        Ok(AttnChoice(None))
    } else {
        s.parse()
            .map(|b| AttnChoice(Some(b)))
            .map_err(|e| format!("{e}, or auto"))
    }
}
