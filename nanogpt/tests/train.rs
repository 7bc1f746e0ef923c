//! Training end to end on a tiny model: learning, determinism, checkpoints and exact resume.

mod common;

use candle_core::{DType, Device};
use common::{prepared_data, run, run_in, tiny_config};
use nanogpt::checkpoint;
use nanogpt::config::InitFrom;

#[test]
fn loss_decreases() {
    let dir = tempfile::tempdir().unwrap();
    let data = prepared_data(dir.path());
    let mut cfg = tiny_config(&data, &dir.path().join("out"));
    cfg.max_iters = 60;
    let s = run(&cfg);
    let (first, last) = (s.evals.first().unwrap(), s.evals.last().unwrap());
    assert_eq!((first.0, last.0), (0, 60));
    // From about ln(27) ≈ 3.3 for a uniform guess to well under 2.
    assert!(
        first.2 > 3.0 && last.2 < 2.0,
        "val loss went {} -> {}",
        first.2,
        last.2
    );
    assert!(dir.path().join("out/loss.csv").is_file());
    assert!(dir.path().join("out/loss.png").is_file());
    assert!(checkpoint::path_in(&cfg.out_dir).is_file());
}

/// bf16 (what CUDA runs by default) through the same code as the CPU's f32: every op of the
/// model, attention included, in bf16 with f32 weights; it learns as f32 does.
#[test]
fn loss_decreases_in_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let data = prepared_data(dir.path());
    let mut cfg = tiny_config(&data, &dir.path().join("out"));
    cfg.max_iters = 60;
    cfg.dropout = 0.1;
    let s = run_in(&cfg, DType::BF16);
    let (first, last) = (s.evals.first().unwrap(), s.evals.last().unwrap());
    assert!(
        first.2 > 3.0 && last.2 < 2.0,
        "val loss went {} -> {}",
        first.2,
        last.2
    );
}

#[test]
fn same_seed_same_run_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = prepared_data(dir.path());
    let mut cfg = tiny_config(&data, &dir.path().join("a"));
    cfg.max_iters = 8;
    cfg.dropout = 0.1;
    let a = run(&cfg);
    cfg.out_dir = dir.path().join("b");
    let b = run(&cfg);
    assert_eq!(a.batch_losses, b.batch_losses);
    cfg.seed += 1;
    cfg.out_dir = dir.path().join("c");
    let c = run(&cfg);
    assert_ne!(a.batch_losses, c.batch_losses);
}

/// Stop at iteration 20, resume to 40: the same losses and the same final checkpoint, bit for
/// bit, as one run to 40 (with dropout, so the generator state matters too).
#[test]
fn resume_equals_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = prepared_data(dir.path());
    let mut whole = tiny_config(&data, &dir.path().join("whole"));
    whole.dropout = 0.1;
    whole.gradient_accumulation_steps = 2;
    whole.always_save_checkpoint = true;
    let full = run(&whole);

    let mut first = whole.clone();
    first.out_dir = dir.path().join("split");
    first.max_iters = 20;
    let head = run(&first);
    let mut second = first.clone();
    second.init_from = InitFrom::Resume;
    second.max_iters = 40;
    let tail = run(&second);

    let joined: Vec<f32> = head
        .batch_losses
        .iter()
        .chain(&tail.batch_losses)
        .copied()
        .collect();
    assert_eq!(joined, full.batch_losses);
    assert_eq!(tail.evals, full.evals[2..].to_vec());
    let a = checkpoint::load(&checkpoint::path_in(&whole.out_dir), &Device::Cpu).unwrap();
    let b = checkpoint::load(&checkpoint::path_in(&second.out_dir), &Device::Cpu).unwrap();
    assert_eq!(a.meta.iter_num, 40);
    assert_eq!(a.meta.rng_state, b.meta.rng_state);
    assert_eq!(a.meta.attn_seeds, b.meta.attn_seeds);
    assert_eq!(a.meta.optim_step, b.meta.optim_step);
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, t) in &a.tensors {
        let u = &b.tensors[name];
        let (x, y) = (
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            u.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{name} differs"
        );
    }
    // The CSV of the resumed run holds the whole history once.
    let csv = std::fs::read_to_string(second.out_dir.join("loss.csv")).unwrap();
    assert_eq!(csv.lines().filter(|l| l.contains(",batch,")).count(), 40);
}
