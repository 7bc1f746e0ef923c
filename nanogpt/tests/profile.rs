//! `train --profile` and `sample --profile`: a Chrome trace with a span per module and per
//! attention call, and the top-spans table.

mod common;

use std::collections::HashMap;

use common::succeeds;

#[test]
fn train_and_sample_profiles_are_chrome_traces_with_module_spans() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("input.txt"), common::corpus()).unwrap();
    succeeds(d, &["prepare", "--input", "input.txt"]);
    let (_, err) = succeeds(
        d,
        &[
            "train",
            "--device",
            "cpu",
            "--n-layer",
            "2",
            "--n-head",
            "2",
            "--n-embd",
            "16",
            "--block-size",
            "8",
            "--batch-size",
            "4",
            "--eval-iters",
            "1",
            "--eval-interval",
            "2",
            "--max-iters",
            "3",
            "--grad-clip",
            "1.0",
            "--always-save-checkpoint",
            "true",
            "--profile",
            "trace.json",
        ],
    );
    assert!(err.contains("Self ms") && err.contains("Total ms"), "{err}");
    assert!(err.contains("Chrome trace written to trace.json"), "{err}");

    let trace = std::fs::read_to_string(d.join("trace.json")).unwrap();
    let events: Vec<serde_json::Value> = serde_json::from_str(&trace).expect("the trace is JSON");
    // Every span that began ended: count begin (B) and end (E) events per name.
    let mut open: HashMap<String, (usize, usize)> = HashMap::new();
    for e in &events {
        let (Some(name), Some(ph)) = (e["name"].as_str(), e["ph"].as_str()) else {
            continue;
        };
        let n = open.entry(name.to_string()).or_default();
        match ph {
            "B" => n.0 += 1,
            "E" => n.1 += 1,
            _ => {}
        }
    }
    for name in [
        "train_step",
        "get_batch",
        "forward",
        "embedding",
        "block",
        // Each half of a block is one fused op on the CPU, the LayerNorms folded into the
        // products after them (ln_1 into c_attn, ln_2 into the MLP, ln_f into lm_head): no
        // `layer_norm` spans of their own.
        "attention",
        "attention.forward",
        "flash_attention.forward",
        "mlp",
        "mlp.forward",
        "lm_head",
        "loss",
        "backward",
        "attention.backward",
        "flash_attention.backward",
        "linear.backward",
        "mlp.backward",
        "clip_grad_norm",
        "optimizer_step",
        "eval",
    ] {
        let (begun, ended) = open.get(name).copied().unwrap_or_default();
        assert!(
            begun > 0,
            "no `{name}` span in the trace; it has {:?}",
            open.keys()
        );
        assert_eq!(begun, ended, "`{name}`: {begun} begun, {ended} ended");
    }
    // 3 steps of 2 blocks, and 3 evaluations (iterations 0, 2, 3) of 2 batches (train, val).
    assert_eq!(open["train_step"].0, 3);
    assert_eq!(open["block"].0, 2 * (3 + 3 * 2));
    // Block spans carry their index.
    assert!(events
        .iter()
        .any(|e| e["name"] == "block" && e["args"]["index"] == "1"));

    // Sampling: a span per generated token around the model's.
    let (text, err) = succeeds(
        d,
        &[
            "sample",
            "--device",
            "cpu",
            "--num-samples",
            "1",
            "--max-new-tokens",
            "4",
            "--profile",
            "sample.json",
        ],
    );
    assert!(text.contains("---------------"), "{text}");
    assert!(err.contains("next_token"), "{err}");
    let trace = std::fs::read_to_string(d.join("sample.json")).unwrap();
    let events: Vec<serde_json::Value> = serde_json::from_str(&trace).expect("the trace is JSON");
    for name in ["next_token", "block", "flash_attention.forward"] {
        assert_eq!(
            events
                .iter()
                .filter(|e| e["name"] == name && e["ph"] == "B")
                .count(),
            events
                .iter()
                .filter(|e| e["name"] == name && e["ph"] == "E")
                .count(),
        );
        assert!(events.iter().any(|e| e["name"] == name), "no `{name}` span");
    }
}
