//! Helpers shared by the integration tests: a synthetic corpus and tiny configurations.

#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device};
use nanogpt::config::{TrainConfig, CPU_RECIPE};
use nanogpt::data::{prepare, PrepareOptions};
use nanogpt::tokenizer::TokenizerKind;
use nanogpt::train::{train, TrainOptions, TrainSummary};

/// The flags of a one-layer model 16 wide over 8-token windows, in batches of 4, on the CPU: a
/// training run the command-line tests finish in a moment.
pub const TINY_MODEL: &[&str] = &[
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "16",
    "--block-size",
    "8",
    "--batch-size",
    "4",
    "--device",
    "cpu",
];

/// `train --out-dir OUT --init-from resume` on the CPU.
pub fn resume_args(out: &str) -> [&str; 7] {
    [
        "train",
        "--device",
        "cpu",
        "--out-dir",
        out,
        "--init-from",
        "resume",
    ]
}

/// Runs the `nanogpt` binary in `dir` with `args` (ignoring any `NANOGPT_INPUT` of the caller).
pub fn nanogpt(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nanogpt"))
        .current_dir(dir)
        .env_remove("NANOGPT_INPUT")
        .args(args)
        .output()
        .unwrap()
}

/// Runs `nanogpt` and expects success; returns (stdout, stderr).
pub fn succeeds(dir: &Path, args: &[&str]) -> (String, String) {
    let out = nanogpt(dir, args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "{args:?} failed:\n{stderr}");
    (stdout, stderr)
}

/// Runs `nanogpt` and expects failure with `needle` in stderr, and no panic.
pub fn fails_with(dir: &Path, args: &[&str], needle: &str) {
    let out = nanogpt(dir, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(
        err.contains(needle),
        "{args:?}: expected `{needle}` in:\n{err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
}

/// A corpus with learnable structure: a few sentences in a repeating, seeded order.
pub fn corpus() -> String {
    let lines = [
        "the quick brown fox jumps over the lazy dog.\n",
        "a stitch in time saves nine.\n",
        "all that glitters is not gold.\n",
        "to be or not to be, that is the question.\n",
    ];
    let mut rng = nanogpt::rng::Rng::new(5, 0);
    (0..400).map(|_| lines[rng.below(4) as usize]).collect()
}

/// Writes the corpus to `dir/input.txt` and prepares `dir/data` with the char tokenizer.
pub fn prepared_data(dir: &Path) -> PathBuf {
    let input = dir.join("input.txt");
    std::fs::write(&input, corpus()).unwrap();
    let data_dir = dir.join("data");
    prepare(&PrepareOptions {
        input: Some(input),
        data_dir: data_dir.clone(),
        tokenizer: TokenizerKind::Char,
        vocab_size: None,
    })
    .unwrap();
    data_dir
}

/// A tiny model and short schedule on `data_dir`, writing to `out_dir`.
pub fn tiny_config(data_dir: &Path, out_dir: &Path) -> TrainConfig {
    let mut c = TrainConfig::from_toml(CPU_RECIPE).unwrap();
    c.data_dir = data_dir.to_path_buf();
    c.out_dir = out_dir.to_path_buf();
    c.n_layer = 2;
    c.n_head = 2;
    c.n_embd = 32;
    c.block_size = 16;
    c.batch_size = 8;
    c.max_iters = 40;
    c.eval_interval = 20;
    c.eval_iters = 4;
    c.log_interval = 1000;
    c.learning_rate = 1e-2;
    c.min_lr = 1e-3;
    c.warmup_iters = 5;
    c.lr_decay_iters = 100;
    c.seed = 42;
    c
}

/// Trains `config` on the CPU in f32 without a progress bar.
pub fn run(config: &TrainConfig) -> TrainSummary {
    run_in(config, DType::F32)
}

/// Trains `config` on the CPU with activations and products in `dtype`.
pub fn run_in(config: &TrainConfig, dtype: DType) -> TrainSummary {
    train(&TrainOptions {
        config: config.clone(),
        device: Device::Cpu,
        dtype,
        progress: false,
        overwrite: false,
    })
    .unwrap()
}
