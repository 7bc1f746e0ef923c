//! The binary's error messages for bad input, and a short prepare → train → sample run.

mod common;

use common::{fails_with, nanogpt, TINY_MODEL};

/// [`TINY_MODEL`] for five iterations, evaluated on two batches at the end, always saved.
fn tiny() -> Vec<&'static str> {
    let run = [
        "--eval-iters",
        "2",
        "--eval-interval",
        "5",
        "--max-iters",
        "5",
        "--always-save-checkpoint",
        "true",
    ];
    [TINY_MODEL, &run].concat()
}

#[test]
fn prepare_train_sample_and_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("input.txt"), common::corpus()).unwrap();

    fails_with(
        d,
        &["prepare", "--input", "missing.txt"],
        "cannot read the corpus missing.txt",
    );
    fails_with(
        d,
        &["prepare", "--input", "input.txt", "--vocab-size", "99"],
        "--vocab-size only applies to --tokenizer bpe",
    );
    let out = nanogpt(d, &["prepare", "--input", "input.txt"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut args = vec!["train"];
    args.extend(tiny());
    fails_with(
        d,
        &["train", "--n-head", "4", "--n-embd", "18"],
        "n-embd = 18 is not divisible by n-head = 4",
    );
    fails_with(d, &["train", "--device", "cuda"], "--device cuda");
    fails_with(
        d,
        &["train", "--attn", "fast"],
        "expected flash, efficient or math, or auto",
    );
    std::fs::write(d.join("bad.toml"), "n-layers = 2\n").unwrap();
    fails_with(
        d,
        &["train", "--config", "bad.toml"],
        "unknown key `n-layers`",
    );
    fails_with(
        d,
        &["sample", "--device", "cpu"],
        "no checkpoint at out-shakespeare-char/ckpt.safetensors",
    );

    let out = nanogpt(d, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("step 5: train loss"), "{stdout}");
    for f in ["ckpt.safetensors", "loss.csv", "loss.png"] {
        assert!(d.join("out-shakespeare-char").join(f).is_file(), "{f}");
    }

    let sample = [
        "sample",
        "--device",
        "cpu",
        "--num-samples",
        "2",
        "--max-new-tokens",
        "12",
        "--start",
        "the ",
    ];
    let out = nanogpt(d, &sample);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(text.matches("---------------").count(), 2, "{text}");
    assert_eq!(
        nanogpt(d, &sample).stdout,
        out.stdout,
        "the same seed must give the same text"
    );
    fails_with(
        d,
        &["sample", "--device", "cpu", "--start", "Zebra"],
        "characters outside the model's vocabulary: 'Z'",
    );
    fails_with(
        d,
        &["sample", "--device", "cpu", "--start-file", "nope.txt"],
        "cannot read --start-file nope.txt",
    );

    // Resuming without --config continues the checkpoint's own configuration.
    let resume = ["train", "--device", "cpu", "--init-from", "resume"];
    fails_with(
        d,
        &[&resume[..], &["--block-size", "9"]].concat(),
        "block-size 9 is larger than the checkpoint's 8",
    );
    let out = nanogpt(d, &[&resume[..], &["--max-iters", "7"]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("done at iteration 7"),
        "{stdout}"
    );
}

#[test]
fn missing_and_corrupt_data_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("input.txt"), common::corpus()).unwrap();
    let out = nanogpt(
        d,
        &["prepare", "--input", "input.txt", "--data-dir", "data"],
    );
    assert!(out.status.success());
    let mut args = vec!["train", "--data-dir", "data"];
    args.extend(tiny());

    let train_bin = d.join("data/train.bin");
    let good = std::fs::read(&train_bin).unwrap();
    std::fs::write(&train_bin, &good[..good.len() - 2]).unwrap();
    fails_with(
        d,
        &args,
        &format!(
            "has {} bytes but meta.json records {}",
            good.len() - 2,
            good.len()
        ),
    );
    let mut bad = good.clone();
    bad[10] = 0xff;
    bad[11] = 0xff;
    std::fs::write(&train_bin, &bad).unwrap();
    fails_with(
        d,
        &args,
        "train.bin does not match the sha256 that meta.json records",
    );
    std::fs::remove_file(&train_bin).unwrap();
    fails_with(d, &args, "run `nanogpt prepare`");

    // A meta.json from another corpus's prepare does not describe these bins.
    std::fs::write(&train_bin, &good).unwrap();
    std::fs::write(d.join("other.txt"), common::corpus().replace("the", "a")).unwrap();
    let out = nanogpt(
        d,
        &["prepare", "--input", "other.txt", "--data-dir", "other"],
    );
    assert!(out.status.success());
    std::fs::copy(d.join("other/meta.json"), d.join("data/meta.json")).unwrap();
    fails_with(d, &args, "are not from one prepare");
    // One without the records (an older nanogpt's) is not trusted either.
    std::fs::write(
        d.join("data/meta.json"),
        r#"{"kind": "char", "chars": "abc"}"#,
    )
    .unwrap();
    fails_with(d, &args, "records no length and checksum of train.bin");
    std::fs::write(d.join("data/meta.json"), "{oops").unwrap();
    fails_with(d, &args, "meta.json is corrupt");
}

#[test]
fn prepare_replaces_the_folder_whole_and_keeps_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("input.txt"), common::corpus()).unwrap();
    let prepare = ["prepare", "--input", "input.txt", "--data-dir", "data"];
    assert!(nanogpt(d, &prepare).status.success());
    std::fs::write(d.join("data/notes.txt"), "mine").unwrap();
    // A temporary folder that a killed prepare left (its pid is no process's).
    let stale = d.join(format!(".data.{}.0.tmp", u32::MAX));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("train.bin"), "half").unwrap();
    std::fs::write(d.join("input.txt"), common::corpus().replace('a', "A")).unwrap();
    let out = nanogpt(d, &prepare);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(d.join("data/notes.txt")).unwrap(),
        "mine"
    );
    assert!(std::fs::read_to_string(d.join("data/meta.json"))
        .unwrap()
        .contains('A'));
    let mut names: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["data", "input.txt"], "no temporary folders left");
    // A prepare that fails leaves the folder as it was.
    std::fs::write(d.join("input.txt"), "too short").unwrap();
    fails_with(d, &prepare, "needs at least 100");
    assert!(std::fs::read_to_string(d.join("data/meta.json"))
        .unwrap()
        .contains('A'));
}

#[test]
fn bpe_prepare_train_sample() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("input.txt"), common::corpus()).unwrap();
    let prepare = [
        "prepare",
        "--input",
        "input.txt",
        "--tokenizer",
        "bpe",
        "--vocab-size",
        "300",
        "--data-dir",
        "bpe",
    ];
    let out = nanogpt(d, &prepare);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("vocabulary of 300 tokens"));
    let mut args = vec!["train", "--data-dir", "bpe", "--out-dir", "out-bpe"];
    args.extend(tiny());
    let out = nanogpt(d, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Byte-level BPE encodes any text, even characters the corpus never had.
    let sample = [
        "sample",
        "--device",
        "cpu",
        "--out-dir",
        "out-bpe",
        "--num-samples",
        "1",
        "--max-new-tokens",
        "8",
        "--start",
        "Zürich ",
    ];
    let out = nanogpt(d, &sample);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Zürich "));
}
