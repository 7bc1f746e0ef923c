//! Sizes from flags and checkpoints that overflow or would not fit in memory: a clear error
//! before anything is allocated, never a panic or an abort.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{nanogpt, succeeds, TINY_MODEL};

/// What [`TINY_MODEL`] runs: two iterations, evaluated on one batch after the second.
const TINY_RUN: &[&str] = &[
    "--eval-iters",
    "1",
    "--eval-interval",
    "2",
    "--max-iters",
    "2",
];

/// `train` with [`TINY_MODEL`]'s and [`TINY_RUN`]'s flags, `extra` replacing or adding flag
/// values.
fn train_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train"];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(TINY_RUN);
    for pair in extra.chunks(2) {
        match args.iter().position(|a| *a == pair[0]) {
            Some(i) => args[i + 1] = pair[1],
            None => args.extend_from_slice(pair),
        }
    }
    args
}

/// Runs `nanogpt args` and expects exit status 1 (an error, not a panic's 101 or an abort's
/// signal) with `needle` in stderr.
fn refused(dir: &Path, args: &[&str], needle: &str) {
    let out = nanogpt(dir, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: expected `{needle}` in:\n{err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
}

#[test]
fn bench_sizes_that_overflow_or_do_not_fit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sdpa = |sizes: &[&str], needle: &str| {
        let args = [
            &["bench", "sdpa", "--device", "cpu", "--min-time-ms", "1"],
            sizes,
        ]
        .concat();
        refused(d, &args, needle);
    };
    let huge = "4611686018427387905"; // 2^62 + 1
    sdpa(
        &[
            "--batch",
            "1",
            "--heads",
            "1",
            "--seq",
            huge,
            "--head-dim",
            "4",
        ],
        "1 x 1 x 4611686018427387905 x 4 is too large to count",
    );
    sdpa(&["--batch", huge], "is too large to count");
    sdpa(
        &["--batch", "4294967296", "--heads", "4294967296"],
        "is too large to count",
    );
    sdpa(
        &["--batch", "64", "--heads", "64", "--seq", "65536"],
        "this benchmark needs about",
    );
    let varlen = |sizes: &[&str], needle: &str| {
        let args = [
            &["bench", "varlen", "--device", "cpu", "--min-time-ms", "1"],
            sizes,
        ]
        .concat();
        refused(d, &args, needle);
    };
    varlen(&["--batch", huge], "is too large to count");
    varlen(
        &["--batch", "100000", "--max-len", "100000"],
        "this machine has",
    );
}

#[test]
fn train_and_sample_sizes_are_checked_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("input.txt"), common::corpus()).unwrap();
    succeeds(d, &["prepare", "--input", "input.txt"]);
    let train = train_args;

    refused(
        d,
        &train(&["--n-embd", "100000"]),
        "this training run needs about",
    );
    refused(
        d,
        &train(&["--batch-size", "4611686018427387905", "--block-size", "4"]),
        "too large to count",
    );
    let out = nanogpt(d, &train(&["--max-iters", "18446744073709551615"]));
    assert_eq!(out.status.code(), Some(2), "clap refuses the flag");
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be at most 9223372036854775807"));

    // Every u64 is a seed, and it survives the checkpoint.
    succeeds(
        d,
        &train(&[
            "--seed",
            "18446744073709551615",
            "--always-save-checkpoint",
            "true",
        ]),
    );
    let (stdout, _) = succeeds(
        d,
        &[
            "train",
            "--device",
            "cpu",
            "--init-from",
            "resume",
            "--max-iters",
            "4",
        ],
    );
    assert!(stdout.contains("done at iteration 4"), "{stdout}");

    let sample = |n: &'static str| {
        [
            "sample",
            "--device",
            "cpu",
            "--max-new-tokens",
            n,
            "--num-samples",
            "1",
        ]
    };
    refused(d, &sample("18446744073709551615"), "too large to count");
    refused(d, &sample("1000000000000"), "this machine has");
    succeeds(d, &sample("3"));

    // Metadata that claims a far larger model than its tensors: refused before building it.
    let path = d.join("out-shakespeare-char/ckpt.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut md: HashMap<String, String> = header.metadata().clone().unwrap();
    let model = md["model_config"].replace("\"n-embd\":16", "\"n-embd\":100000");
    assert_ne!(model, md["model_config"]);
    md.insert("model_config".into(), model);
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu).unwrap();
    safetensors::serialize_to_file(tensors, Some(md), &path).unwrap();
    refused(d, &sample("3"), "100000], but it is [");
    refused(
        d,
        &["train", "--device", "cpu", "--init-from", "resume"],
        "is not a valid nanogpt checkpoint",
    );
}
