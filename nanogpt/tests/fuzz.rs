//! Property tests: generated command lines, config files, meta.json files and checkpoint
//! headers give a value or a clear error, never a panic, and never an allocation that the
//! sizes in them ask for before those sizes are checked.
//!
//! Each property runs 256 cases; `PROPTEST_CASES=10000` runs more.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device};
use clap::Parser;
use proptest::prelude::*;

use nanogpt::bench::{sdpa_memory, varlen_memory, SdpaBench, VarlenBench};
use nanogpt::cli::{BenchCommand, Cli, Command};
use nanogpt::config::{ConfigOverrides, TrainConfig, CPU_RECIPE};
use nanogpt::data::{Dataset, PrepareOptions};
use nanogpt::memory::{self, check_fits};
use nanogpt::model::ModelConfig;

/// A machine of 24 GB, so that the checks behave the same everywhere.
const MACHINE: Option<u64> = Some(24_000_000_000);

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Values at the edges of every type a flag or key takes, and some junk.
fn value() -> impl Strategy<Value = String> {
    let edge = prop::sample::select(vec![
        "0",
        "1",
        "-1",
        "4294967296",
        "4611686018427387905",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551615",
        "18446744073709551616",
        "nan",
        "inf",
        "-0.0",
        "1e308",
        "true",
        "false",
        "char",
        "bpe",
        "resume",
        "",
    ]);
    prop_oneof![
        3 => edge.prop_map(String::from),
        3 => (0u64..100_000).prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => (0.0..1.0f64).prop_map(|x| x.to_string()),
        1 => any::<f64>().prop_map(|x| x.to_string()),
        1 => "[a-z0-9.,_-]{0,12}",
        1 => any::<String>(),
    ]
}

const FLAGS: &[&str] = &[
    "--seed",
    "--eval-interval",
    "--eval-iters",
    "--log-interval",
    "--always-save-checkpoint",
    "--gradient-accumulation-steps",
    "--batch-size",
    "--block-size",
    "--n-layer",
    "--n-head",
    "--n-embd",
    "--dropout",
    "--bias",
    "--learning-rate",
    "--max-iters",
    "--weight-decay",
    "--beta1",
    "--beta2",
    "--grad-clip",
    "--decay-lr",
    "--warmup-iters",
    "--lr-decay-iters",
    "--min-lr",
    "--init-from",
    "--device",
    "--dtype",
    "--attn",
    "--overwrite",
    "--num-samples",
    "--max-new-tokens",
    "--temperature",
    "--top-k",
    "--batch",
    "--heads",
    "--seq",
    "--head-dim",
    "--causal",
    "--backward",
    "--min-time-ms",
    "--max-len",
    "--tokenizer",
    "--vocab-size",
    "--start",
    "--bogus",
];

/// The flags of each command (a slice of [`FLAGS`]), so that most generated lines parse and
/// reach the checks behind the parser; any flag may still be added to any command.
fn command_line() -> impl Strategy<Value = Vec<String>> {
    const SAMPLE: &[&str] = &[
        "--num-samples",
        "--max-new-tokens",
        "--temperature",
        "--top-k",
        "--seed",
        "--device",
        "--dtype",
        "--start",
    ];
    const SDPA: &[&str] = &[
        "--batch",
        "--heads",
        "--seq",
        "--head-dim",
        "--causal",
        "--backward",
        "--min-time-ms",
        "--dtype",
        "--device",
    ];
    const VARLEN: &[&str] = &[
        "--batch",
        "--max-len",
        "--n-embd",
        "--n-head",
        "--seed",
        "--min-time-ms",
        "--device",
    ];
    let command = prop_oneof![
        Just((vec!["prepare"], &["--tokenizer", "--vocab-size"][..])),
        Just((vec!["train"], &FLAGS[..28])),
        Just((vec!["sample"], SAMPLE)),
        Just((vec!["bench", "sdpa"], SDPA)),
        Just((vec!["bench", "varlen"], VARLEN)),
        Just((vec!["bench"], &FLAGS[..0])),
        Just((vec!["frobnicate"], &FLAGS[..0])),
    ];
    let flag = (
        any::<prop::sample::Index>(),
        prop::bool::weighted(0.05),
        value(),
        prop::bool::weighted(0.95),
    );
    (command, prop::collection::vec(flag, 0..6)).prop_map(|((command, own), flags)| {
        let mut args = vec!["nanogpt".to_string()];
        args.extend(command.iter().map(|s| s.to_string()));
        for (which, anywhere, value, with_value) in flags {
            let from = if anywhere || own.is_empty() {
                FLAGS
            } else {
                own
            };
            args.push(which.get(from).to_string());
            if with_value {
                args.push(value);
            }
        }
        args
    })
}

fn recipe() -> TrainConfig {
    TrainConfig::from_toml(CPU_RECIPE).unwrap()
}

/// What `train` checks of a configuration before it allocates (the model's vocabulary from
/// the tiny corpus, and the largest u16 one).
fn check_training(cfg: &TrainConfig) {
    for vocab in [27, 65_536] {
        let model = ModelConfig::from_train(cfg, vocab);
        if let Ok(need) = memory::training(&model, cfg.batch_size, 4) {
            let _ = check_fits("training", &need, MACHINE);
        }
    }
    for iter in [0, 1, cfg.warmup_iters, cfg.lr_decay_iters, cfg.max_iters] {
        let lr = nanogpt::optim::learning_rate(iter, cfg);
        assert!(!lr.is_nan(), "learning rate NaN at {iter} for {cfg:?}");
    }
    let _ = cfg.tokens_per_iter();
}

/// A folder with the tiny corpus prepared, shared by the cases.
fn corpus_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        common::prepared_data(dir.path());
        dir
    })
    .path()
}

/// Parses `args` as the binary does and runs the checks that come before any allocation;
/// false when clap refuses the line.
fn check_command_line(args: &[String]) -> bool {
    let Ok(cli) = Cli::try_parse_from(args) else {
        return false;
    };
    match cli.command {
        Command::Train(t) => {
            if let Ok(cfg) = TrainConfig::layered(&recipe(), None, &t.overrides) {
                check_training(&cfg);
            }
        }
        Command::Sample(s) => {
            let model = ModelConfig::from_train(&recipe(), 65);
            if let Ok(need) = memory::sampling(&model, s.start.len(), s.max_new_tokens) {
                let _ = check_fits("sampling", &need, MACHINE);
            }
        }
        Command::Bench(b) => match b.which {
            BenchCommand::Sdpa(a) => {
                let bench = SdpaBench {
                    device: Device::Cpu,
                    dtype: DType::F32,
                    batch: a.batch,
                    heads: a.heads,
                    seq: a.seq,
                    kv_seq: a.kv_seq.unwrap_or(a.seq),
                    head_dim: a.head_dim,
                    causal: a.causal,
                    backward: a.backward,
                    backends: a.backends.iter().map(|b| b.0).collect(),
                    min_time: std::time::Duration::ZERO,
                };
                if let Ok(need) = sdpa_memory(&bench) {
                    let _ = check_fits("bench", &need, MACHINE);
                }
            }
            BenchCommand::Varlen(a) => {
                let bench = VarlenBench {
                    device: Device::Cpu,
                    batch: a.batch,
                    max_len: a.max_len,
                    n_embd: a.n_embd,
                    n_head: a.n_head,
                    seed: a.seed,
                    min_time: std::time::Duration::ZERO,
                };
                let fits =
                    varlen_memory(&bench).and_then(|need| check_fits("bench", &need, MACHINE));
                if fits.is_ok() && a.batch <= 100_000 {
                    attn_op::bench::random_lengths(a.batch, a.max_len, a.seed).unwrap();
                }
            }
        },
        Command::Prepare(p) => {
            // The corpus and folder are the test's own: no download, nothing in the tree.
            let dir = tempfile::tempdir().unwrap();
            let _ = nanogpt::data::prepare(&PrepareOptions {
                input: Some(corpus_dir().join("input.txt")),
                data_dir: dir.path().join("data"),
                tokenizer: p.tokenizer,
                vocab_size: p.vocab_size.filter(|&v| v <= 300),
            });
        }
    }
    true
}

#[test]
fn command_lines_parse_or_fail_cleanly() {
    let parsed = std::sync::atomic::AtomicUsize::new(0);
    let mut runner = proptest::test_runner::TestRunner::new(config());
    runner
        .run(&command_line(), |args| {
            if check_command_line(&args) {
                parsed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        })
        .unwrap();
    let (parsed, cases) = (parsed.into_inner(), config().cases as usize);
    eprintln!("{cases} command lines, {parsed} parsed and checked");
    assert!(
        parsed * 16 >= cases,
        "only {parsed} of {cases} command lines parsed"
    );
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn config_files_load_or_fail_cleanly(
        entries in prop::collection::vec(
            (prop::sample::select(&FLAGS[..24]), value(), 0u8..4),
            0..8,
        ),
        junk in prop::option::of(any::<String>()),
    ) {
        let mut text = String::new();
        for (flag, value, form) in entries {
            let key = flag.trim_start_matches("--");
            // The value as a TOML integer/float/boolean where it reads as one, else a string.
            let literal = match form {
                0 => value.clone(),
                1 => format!("{value:?}"),
                2 => format!("[{value}]"),
                _ => "true".to_string(),
            };
            text.push_str(&format!("{key} = {literal}\n"));
        }
        if let Some(junk) = junk {
            text.push_str(&junk);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).unwrap();
        if let Ok(cfg) = TrainConfig::layered(&recipe(), Some(&path), &ConfigOverrides::default()) {
            check_training(&cfg);
            TrainConfig::from_toml(&cfg.to_toml().unwrap()).unwrap();
        }
    }

    #[test]
    fn meta_json_files_load_or_fail_cleanly(
        kind in prop::sample::select(vec!["char", "bpe", "word", ""]),
        chars in "[ -~]{0,30}",
        records in prop::collection::vec((value(), value(), any::<bool>()), 0..3),
        block_size in 1usize..64,
        junk in prop::option::of(any::<String>()),
    ) {
        let src = corpus_dir().join("data");
        let dir = tempfile::tempdir().unwrap();
        for bin in ["train.bin", "val.bin"] {
            std::fs::copy(src.join(bin), dir.path().join(bin)).unwrap();
        }
        let files: serde_json::Map<String, serde_json::Value> = records
            .iter()
            .zip(["train.bin", "val.bin", "test.bin"])
            .map(|((bytes, sha, numeric), name)| {
                let bytes = match bytes.parse::<u64>() {
                    Ok(n) if *numeric => serde_json::json!(n),
                    _ => serde_json::json!(bytes),
                };
                (name.to_string(), serde_json::json!({"bytes": bytes, "sha256": sha}))
            })
            .collect();
        let text = match junk {
            Some(junk) => junk,
            None => serde_json::json!({"kind": kind, "chars": chars, "files": files}).to_string(),
        };
        std::fs::write(dir.path().join("meta.json"), text).unwrap();
        prop_assert!(Dataset::load(dir.path(), block_size).is_err(), "forged records must not match");
    }

    #[test]
    fn checkpoint_headers_load_or_fail_cleanly(
        edits in prop::collection::vec((0usize..10, value()), 0..4),
        model in prop::option::of((value(), value(), value(), value(), value())),
        cut in prop::option::of(any::<prop::sample::Index>()),
        flip in prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
    ) {
        let (good, mut md) = checkpoint_parts();
        let keys = ["format", "train_config", "model_config", "iter_num", "best_val_loss",
            "optim_step", "rng", "attn_seeds", "tokenizer", "eval_pending"];
        for (key, value) in edits {
            if value.is_empty() {
                md.remove(keys[key]);
            } else {
                md.insert(keys[key].to_string(), value);
            }
        }
        if let Some((vocab, block, layers, heads, embd)) = model {
            md.insert(
                "model_config".into(),
                format!(
                    r#"{{"vocab-size":{vocab},"block-size":{block},"n-layer":{layers},"n-head":{heads},"n-embd":{embd},"dropout":0.0,"bias":false}}"#
                ),
            );
        }
        let tensors = candle_core::safetensors::load_buffer(good, &Device::Cpu).unwrap();
        let mut bytes = safetensors::serialize(tensors, Some(md)).unwrap();
        if let Some(at) = cut {
            bytes.truncate(at.index(bytes.len()));
        }
        if let Some((at, byte)) = flip {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ckpt.safetensors"), &bytes).unwrap();
        let _ = nanogpt::sample::Generator::load(dir.path(), &Device::Cpu, DType::F32);
    }
}

/// A real checkpoint's bytes and metadata, made once.
fn checkpoint_parts() -> (&'static [u8], HashMap<String, String>) {
    static PARTS: OnceLock<(Vec<u8>, HashMap<String, String>)> = OnceLock::new();
    let (bytes, md) = PARTS.get_or_init(|| {
        let root = tempfile::tempdir().unwrap();
        let mut cfg = common::tiny_config(&corpus_dir().join("data"), &root.path().join("out"));
        cfg.max_iters = 2;
        cfg.eval_interval = 2;
        cfg.eval_iters = 1;
        cfg.n_layer = 1;
        cfg.n_embd = 8;
        common::run(&cfg);
        let bytes = std::fs::read(nanogpt::checkpoint::path_in(&cfg.out_dir)).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let md = header.metadata().clone().unwrap();
        (bytes, md)
    });
    (bytes, md.clone())
}
