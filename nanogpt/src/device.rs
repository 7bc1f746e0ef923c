//! Choosing the device and dtype, and the peak FLOP/s that MFU is measured against.

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::ValueEnum;

/// `--device`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// CUDA when this build has it and a GPU is present, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The first CUDA GPU.
    Cuda,
}

/// `--dtype`: the precision of activations and matrix products (weights stay f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// 32-bit floats.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

/// The device `arg` asks for, or an error saying why it is not available.
pub fn select(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Auto if !candle_core::utils::cuda_is_available() => Ok(Device::Cpu),
        DeviceArg::Auto => Ok(Device::new_cuda(0).unwrap_or(Device::Cpu)),
        DeviceArg::Cuda if !candle_core::utils::cuda_is_available() => bail!(
            "--device cuda: this nanogpt was built without CUDA support; rebuild it with `cargo build --release -p nanogpt --features cuda`, or use --device cpu"
        ),
        DeviceArg::Cuda => Device::new_cuda(0).map_err(|e| {
            anyhow::anyhow!("--device cuda: no usable CUDA device ({e}); use --device cpu")
        }),
    }
}

/// The dtype `arg` asks for; f32 on the CPU and bf16 on CUDA when not given.
pub fn dtype(arg: Option<DtypeArg>, device: &Device) -> DType {
    match arg {
        Some(DtypeArg::F32) => DType::F32,
        Some(DtypeArg::Bf16) => DType::BF16,
        Some(DtypeArg::F16) => DType::F16,
        None if device.is_cuda() => DType::BF16,
        None => DType::F32,
    }
}

/// An estimate of the device's peak FLOP/s, the denominator of MFU. On CUDA, nanoGPT's
/// figure (an A100's 312 TFLOP/s in bf16). On the CPU: threads × clock × FMA throughput of the
/// widest vector unit (two FMA ports assumed), from `/proc/cpuinfo`.
pub fn peak_flops(device: &Device, dtype: DType) -> f64 {
    if device.is_cuda() {
        return match dtype {
            DType::F32 => 19.5e12,
            _ => 312e12,
        };
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mhz = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(2500.0);
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or("");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let f32_lanes = if has("avx512f") {
        16.0
    } else if has("avx2") {
        8.0
    } else {
        4.0
    };
    // Two FMA ports, two FLOPs per FMA lane.
    let per_cycle = f32_lanes * 2.0 * 2.0;
    candle_core::utils::get_num_threads() as f64 * mhz * 1e6 * per_cycle
}
