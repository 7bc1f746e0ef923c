//! `nanogpt bench sdpa` and `nanogpt bench varlen` on tiny sizes: tables, refusals, agreement.

mod common;

use common::{fails_with, succeeds};

const TINY_SDPA: &[&str] = &[
    "bench",
    "sdpa",
    "--device",
    "cpu",
    "--batch",
    "1",
    "--heads",
    "2",
    "--seq",
    "16",
    "--min-time-ms",
    "2",
];

/// The table row of `backend`, e.g. `| flash | 12 | 3.40x |`.
fn row<'a>(table: &'a str, backend: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(&format!("| {backend} |")))
        .unwrap_or_else(|| panic!("no row for {backend} in:\n{table}"))
}

/// The median of a timed row, failing on a refusal.
fn median_us(table: &str, backend: &str) -> f64 {
    let r = row(table, backend);
    r.split('|')
        .nth(2)
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or_else(|| panic!("{backend} was not timed: {r}"))
}

#[test]
fn sdpa_sweep_times_each_backend_or_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Flash takes head dims up to 256 on the CPU; the others any.
    let (out, _) = succeeds(d, &[TINY_SDPA, &["--head-dim", "300"]].concat());
    assert!(out.contains("q [1, 2, 16, 300]"), "{out}");
    assert_eq!(
        row(&out, "flash"),
        "| flash | refused: head dim 300 is above 256 | - |"
    );
    assert!(row(&out, "default (efficient)").contains('x'), "{out}");
    assert!(median_us(&out, "efficient") > 0.0);
    assert!(median_us(&out, "math") > 0.0);

    // Every backend runs these; forward and backward, causal, in bf16, under the profiler.
    let args = [
        TINY_SDPA,
        &[
            "--head-dim",
            "8",
            "--causal",
            "--backward",
            "--dtype",
            "bf16",
            "--profile",
            "sdpa.json",
        ],
    ]
    .concat();
    let (out, err) = succeeds(d, &args);
    assert!(out.contains("BF16, causal, forward+backward"), "{out}");
    assert!(row(&out, "default (flash)").contains('x'), "{out}");
    for backend in ["flash", "efficient", "math"] {
        assert!(median_us(&out, backend) > 0.0);
    }
    for span in [
        "sdpa.flash",
        "sdpa.efficient",
        "sdpa.math",
        "efficient_attention.backward",
    ] {
        assert!(
            err.contains(span),
            "{span} missing from the profile:\n{err}"
        );
    }
    let trace = std::fs::read_to_string(d.join("sdpa.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&trace).expect("the trace is JSON");

    fails_with(
        d,
        &["bench", "sdpa", "--dtype", "f64"],
        "possible values: f32, bf16, f16",
    );
    fails_with(
        d,
        &["bench", "sdpa", "--seq", "0"],
        "--seq 0: it must be at least 1",
    );
    fails_with(d, &["bench", "sdpa", "--device", "cuda"], "--device cuda");
}

#[test]
fn sdpa_times_the_chosen_rows_and_kv_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Queries against 40 keys, the default dispatch and flash only, in that order.
    let args = [
        TINY_SDPA,
        &["--kv-seq", "40", "--backends", "flash,default"],
    ]
    .concat();
    let (out, _) = succeeds(d, &args);
    assert!(out.contains("q [1, 2, 16, 32], k [1, 2, 40, 32]"), "{out}");
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| backend"))
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(
        rows[0].starts_with("| flash |") && rows[1].starts_with("| default (flash) |"),
        "{out}"
    );
    assert!(median_us(&out, "flash") > 0.0);
    fails_with(
        d,
        &["bench", "sdpa", "--backends", "flash,fastest"],
        "or default",
    );
    fails_with(
        d,
        &["bench", "sdpa", "--kv-seq", "0"],
        "--kv-seq 0: it must be at least 1",
    );
}

#[test]
fn varlen_packed_agrees_with_padded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (out, _) = succeeds(
        d,
        &[
            "bench",
            "varlen",
            "--device",
            "cpu",
            "--batch",
            "5",
            "--max-len",
            "24",
            "--n-embd",
            "32",
            "--n-head",
            "4",
            "--seed",
            "3",
            "--min-time-ms",
            "2",
        ],
    );
    assert!(out.contains("batch 5, max length 24"), "{out}");
    assert!(out.contains("| padded dense | 120 |"), "{out}");
    assert!(out.contains("| packed (varlen) |"), "{out}");
    let diff: f32 = out
        .lines()
        .find_map(|l| l.strip_prefix("max |packed - padded| on valid tokens: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no difference line in:\n{out}"));
    assert!(diff <= 1e-4, "{out}");
    assert!(out.contains("packed and padded agree"), "{out}");

    fails_with(
        d,
        &["bench", "varlen", "--n-embd", "30", "--n-head", "4"],
        "--n-embd 30 is not divisible by --n-head 4",
    );
}
