//! CPU benchmarks of the shapes: each backend side by side in one run (compare ratios,
//! not absolute times, on a shared machine). `cargo bench -p attn-op --bench cpu_attention`.

use attn_op::{scaled_dot_product_attention, sdpa_kernel, Backend, SdpaOptions};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::attention::{flash_attn as candle_flash_attn, AttnMask};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;
use std::time::Duration;

// glibc's malloc returns large freed blocks to the kernel, and every call then pays page faults
// and TLB shootdowns (a third of the time of small shapes on our VM); every backend here runs
// under mimalloc instead, as an application would choose.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn randn(shape: (usize, usize, usize, usize)) -> Tensor {
    Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap()
}

fn sdpa(b: Backend, q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Tensor {
    let _only = sdpa_kernel(&[b]);
    let opts = SdpaOptions {
        is_causal: causal,
        ..Default::default()
    };
    scaled_dot_product_attention(q, k, v, &opts).unwrap()
}

/// Forward `(4, 8, 1024, 64)`, causal and not: our backends and Candle's own CPU flash attention.
fn forward(c: &mut Criterion) {
    let shape = (4, 8, 1024, 64);
    let (q, k, v) = (randn(shape), randn(shape), randn(shape));
    // candle_nn's flash_attn takes (B, S, H, D).
    let (qt, kt, vt) = [&q, &k, &v]
        .map(|t| t.transpose(1, 2).unwrap().contiguous().unwrap())
        .into();
    let mut g = c.benchmark_group("forward_4x8x1024x64");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    for causal in [false, true] {
        let mode = if causal { "causal" } else { "full" };
        for b in Backend::ALL {
            g.bench_function(BenchmarkId::new(b.name(), mode), |bench| {
                bench.iter(|| black_box(sdpa(b, &q, &k, &v, causal)))
            });
        }
        let mask = if causal {
            AttnMask::causal()
        } else {
            AttnMask::None
        };
        g.bench_function(BenchmarkId::new("candle_nn_flash_attn", mode), |bench| {
            bench.iter(|| {
                black_box(
                    candle_flash_attn::<f32>(&qt, &kt, &vt, 0.125, mask.clone(), None, None)
                        .unwrap(),
                )
            })
        });
    }
    g.finish();
}

/// Forward and backward, causal: nanoGPT's CPU shape and a mid-size one.
fn forward_backward(c: &mut Criterion) {
    for shape in [(12, 4, 64, 32), (8, 8, 256, 64)] {
        let name = format!(
            "fwd_bwd_{}x{}x{}x{}_causal",
            shape.0, shape.1, shape.2, shape.3
        );
        let mut g = c.benchmark_group(name);
        g.sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(4));
        let vars = [
            Var::from_tensor(&randn(shape)).unwrap(),
            Var::from_tensor(&randn(shape)).unwrap(),
            Var::from_tensor(&randn(shape)).unwrap(),
        ];
        let w = randn(shape);
        for b in Backend::ALL {
            g.bench_function(b.name(), |bench| {
                bench.iter(|| {
                    let y = sdpa(b, &vars[0], &vars[1], &vars[2], true);
                    black_box((y * &w).unwrap().sum_all().unwrap().backward().unwrap())
                })
            });
        }
        g.finish();
    }
}

/// Long sequences forward: `(1, 8, 4096, 64)`.
fn long_forward(c: &mut Criterion) {
    let shape = (1, 8, 4096, 64);
    let (q, k, v) = (randn(shape), randn(shape), randn(shape));
    let mut g = c.benchmark_group("forward_1x8x4096x64");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    for b in Backend::ALL {
        g.bench_function(b.name(), |bench| {
            bench.iter(|| black_box(sdpa(b, &q, &k, &v, false)))
        });
    }
    g.finish();
}

/// Half precision inputs, forward `(4, 8, 1024, 64)`: conversion included.
fn half_forward(c: &mut Criterion) {
    let shape = (4, 8, 1024, 64);
    let mut g = c.benchmark_group("forward_4x8x1024x64_bf16");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    let (q, k, v) = [randn(shape), randn(shape), randn(shape)]
        .map(|t| t.to_dtype(DType::BF16).unwrap())
        .into();
    for b in Backend::ALL {
        g.bench_function(b.name(), |bench| {
            bench.iter(|| black_box(sdpa(b, &q, &k, &v, false)))
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    forward,
    forward_backward,
    long_forward,
    half_forward
);
criterion_main!(benches);
