//! The backend sweep: times what runs, gives reasons for what cannot.

use std::time::Duration;

use attn_op::bench::sweep;
use attn_op::{Backend, SdpaOptions};
use candle_core::{DType, Device, Result, Tensor, Var};

#[test]
fn sweep_times_backends_and_reports_refusals() -> Result<()> {
    let q = Tensor::randn(0f32, 1., (1, 2, 16, 8), &Device::Cpu)?;
    let mask = Tensor::ones((16, 16), DType::U8, &Device::Cpu)?;
    let opts = SdpaOptions {
        attn_mask: Some(mask),
        ..Default::default()
    };
    let s = sweep(&q, &q, &q, &opts, false, Duration::from_millis(5))?;
    assert_eq!(s.rows.len(), 4);
    assert_eq!(s.rows[0].ran, Some(Backend::Efficient));
    assert_eq!(
        s.rows[1].result.as_ref().unwrap_err(),
        "attn_mask is not supported"
    );
    for r in [&s.rows[0], &s.rows[2], &s.rows[3]] {
        let t = r.result.as_ref().expect("timed");
        assert!(t.runs >= 3 && t.min <= t.median && t.median <= t.max);
    }
    let table = s.to_string();
    assert!(table.contains("| default (efficient) |"), "{table}");
    assert!(
        table.contains("| flash | refused: attn_mask is not supported | - |"),
        "{table}"
    );
    assert!(
        table.contains("| math |") && table.contains("1.00x"),
        "{table}"
    );
    Ok(())
}

#[test]
fn sweep_with_backward() -> Result<()> {
    let q = Var::randn(0f32, 1., (2, 2, 8, 8), &Device::Cpu)?;
    let opts = SdpaOptions {
        is_causal: true,
        ..Default::default()
    };
    let s = sweep(&q, &q, &q, &opts, true, Duration::from_millis(5))?;
    assert!(s.rows.iter().all(|r| r.result.is_ok()));
    assert!(s.title.contains("forward+backward"));
    let bad = sweep(
        &q,
        &q.narrow(3, 0, 4)?,
        &q,
        &opts,
        false,
        Duration::from_millis(5),
    );
    assert!(bad
        .unwrap_err()
        .to_string()
        .contains("bench::sweep: query has E = 8 but key has E = 4"));
    Ok(())
}

#[test]
fn varlen_comparison_agrees_on_valid_tokens() -> Result<()> {
    use attn_op::bench::{random_lengths, varlen_comparison};
    use attn_op::nn::{AttentionConfig, CausalSelfAttention, Causality};
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let cfg = AttentionConfig {
        n_embd: 32,
        n_head: 4,
        bias: true,
        dropout: 0.0,
        causality: Causality::Always,
    };
    let layer = CausalSelfAttention::new(cfg, vb)?;
    let lens = random_lengths(6, 40, 1)?;
    assert_eq!(lens, random_lengths(6, 40, 1)?, "seeded");
    assert!(random_lengths((1 << 62) + 1, 40, 1).is_err());
    assert!(lens.iter().all(|&l| (1..=40).contains(&l)));
    let c = varlen_comparison(&layer, &lens, 40, &Device::Cpu, Duration::from_millis(5))?;
    assert!(c.max_abs_diff < 1e-5, "{}", c.max_abs_diff);
    assert!((0.0..1.0).contains(&c.padding()));
    assert!(c.to_string().contains("| packed (varlen) |"));
    assert!(varlen_comparison(&layer, &[41], 40, &Device::Cpu, Duration::from_millis(5)).is_err());
    Ok(())
}

#[test]
fn overhead_splits_attention_from_the_rest() -> Result<()> {
    let q = Tensor::randn(0f32, 1., (2, 2, 32, 16), &Device::Cpu)?;
    let o = attn_op::bench::overhead(5, || {
        let y = attn_op::scaled_dot_product_attention(&q, &q, &q, &SdpaOptions::default())?;
        // Work outside attention.
        (y.exp()? * 2.0)?.sum_all().map(drop)
    })?;
    assert!(o.attention > Duration::ZERO && o.attention <= o.layer);
    assert!((0.0..1.0).contains(&o.share_outside()));
    Ok(())
}
