//! Peak memory of one attention forward: how much the process's peak resident set grows beyond
//! what it held with the inputs allocated (Linux `/proc/self/status`).
//!
//! `cargo run --release -p attn-op --example memory -- flash 1,8,16384,64`

use attn_op::{scaled_dot_product_attention, sdpa_kernel, Backend, SdpaOptions};
use candle_core::{Device, Tensor};

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status (Linux only)");
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: memory <flash|efficient|math> B,H,L,D [causal]";
    let backend: Backend = args.get(1).expect(usage).parse().expect(usage);
    let dims: Vec<usize> = args
        .get(2)
        .expect(usage)
        .split(',')
        .map(|x| x.parse().expect(usage))
        .collect();
    let causal = args.get(3).is_some_and(|a| a == "causal");
    let shape = (dims[0], dims[1], dims[2], dims[3]);
    let dev = Device::Cpu;
    let (q, k, v) = (
        Tensor::randn(0f32, 1., shape, &dev)?,
        Tensor::randn(0f32, 1., shape, &dev)?,
        Tensor::randn(0f32, 1., shape, &dev)?,
    );
    let before = status_kib("VmRSS:");
    let _only = sdpa_kernel(&[backend]);
    let start = std::time::Instant::now();
    let y = scaled_dot_product_attention(
        &q,
        &k,
        &v,
        &SdpaOptions {
            is_causal: causal,
            ..Default::default()
        },
    )?;
    let secs = start.elapsed().as_secs_f64();
    let peak = status_kib("VmHWM:");
    let out_mib = y.elem_count() as f64 * 4.0 / 1048576.0;
    println!(
        "{backend} {dims:?} causal={causal}: {:.0} ms, peak RSS grew by {:.1} MiB (the output itself is {out_mib:.1} MiB)",
        secs * 1e3,
        (peak.saturating_sub(before)) as f64 / 1024.0
    );
    Ok(())
}
