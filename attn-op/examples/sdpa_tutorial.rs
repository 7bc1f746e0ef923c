//! PyTorch's tutorial "Implementing High-Performance Transformers with Scaled Dot Product
//! Attention", step by step with attn-op, sized to finish in under a minute on a CPU.
//!
//! `cargo run --release --example sdpa_tutorial -p attn-op [-- --full]` (`--full`: the
//! tutorial's own sizes).

use std::time::Duration;

use attn_op::bench::{overhead, random_lengths, sweep, varlen_comparison};
use attn_op::nn::{AttentionConfig, CausalSelfAttention, Causality};
use attn_op::profile::Profiler;
use attn_op::{scaled_dot_product_attention, SdpaOptions};
use candle_core::{DType, Device, ModuleT, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn layer(
    causality: Causality,
    dropout: f64,
    device: &Device,
) -> Result<(CausalSelfAttention, VarMap)> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, device);
    let cfg = AttentionConfig {
        n_embd: 512,
        n_head: 8,
        bias: false,
        dropout,
        causality,
    };
    Ok((CausalSelfAttention::new(cfg, vb)?, vm))
}

fn main() -> Result<()> {
    let full = std::env::args().any(|a| a == "--full");
    let device = Device::cuda_if_available(0)?;
    let min_time = Duration::from_millis(if full { 2000 } else { 500 });
    // The tutorial: (32, 32, 1024, 32) for the sweep, batch 32 of up to 512 tokens for the layer.
    let (b, h, l, e) = if full {
        (32, 32, 1024, 32)
    } else {
        (4, 8, 512, 32)
    };
    let batch = if full { 32 } else { 8 };

    println!("== 1. The three backends");
    // The tutorial's first call: 3-D (2, 3, 8) inputs.
    let q = Tensor::randn(0f32, 1., (2, 3, 8), &device)?;
    let y = scaled_dot_product_attention(&q, &q, &q, &SdpaOptions::default())?;
    println!(
        "scaled_dot_product_attention on (2, 3, 8) -> {:?}",
        y.dims()
    );
    let q = Tensor::randn(0f32, 1., (b, h, l, e), &device)?;
    let (k, v) = (
        Tensor::randn(0f32, 1., (b, h, l, e), &device)?,
        Tensor::randn(0f32, 1., (b, h, l, e), &device)?,
    );
    println!(
        "{}",
        sweep(&q, &k, &v, &SdpaOptions::default(), false, min_time)?
    );

    println!("== 2. CausalSelfAttention");
    let (attn, _vm) = layer(Causality::TrainingOnly, 0.1, &device)?;
    println!("{attn}");
    let x = Tensor::randn(0f32, 1., (batch, 512, 512), &device)?;
    let t = attn_op::bench::time(&device, min_time, || attn.forward_t(&x, true).map(drop))?;
    println!(
        "forward (training mode) on {:?}: {:.2} ms\n",
        x.dims(),
        t.median.as_secs_f64() * 1e3
    );

    println!("== 3. Variable-length batches: packed vs padded");
    let (causal_attn, _vm2) = layer(Causality::Always, 0.0, &device)?;
    let lens = random_lengths(batch, 512, 5)?;
    println!(
        "{}\n",
        varlen_comparison(&causal_attn, &lens, 512, &device, min_time)?
    );

    println!("== 4. Eager vs compiled: time outside the attention kernel");
    let o = overhead(10, || causal_attn.forward_t(&x, false).map(drop))?;
    println!(
        "layer {:.2} ms, attention {:.2} ms: {:.1}% of the layer's time is outside attention (what a graph compiler could fuse)\n",
        o.layer.as_secs_f64() * 1e3,
        o.attention.as_secs_f64() * 1e3,
        100.0 * o.share_outside()
    );

    println!("== 5. Profiler");
    let trace = std::env::temp_dir().join("sdpa_tutorial_trace.json");
    let profiler = Profiler::start(Some(&trace))?;
    for _ in 0..3 {
        let _step = tracing::debug_span!("train_step").entered();
        let y = attn.forward_t(&x, true)?;
        y.sqr()?.mean_all()?.backward()?;
    }
    let report = profiler.finish();
    println!("{report}");
    println!(
        "Chrome trace written to {} (open in chrome://tracing or Perfetto)",
        trace.display()
    );
    Ok(())
}
