//! PTX of attn-op's CUDA attention kernels, compiled from `src/*.cu` by `build.rs` with
//! [bindgen_cuda](https://crates.io/crates/bindgen_cuda) when the `cuda` feature is on.
//!
//! - `FLASH_FWD`, `FLASH_BWD`: FlashAttention-2 forward and backward on tensor cores
//!   (`mma.sync` m16n8k16, `ldmatrix`, `cp.async`; sm80+), f16 and bf16.
//! - `EFFICIENT`: memory-efficient attention forward and backward without tensor-core
//!   instructions (f32, f16, bf16, masks, any head dim up to 256), and the small helpers.
//! - `EFFICIENT_TC`: the efficient backend on tensor cores (sm80+) for the same problems: f32
//!   as 3xTF32 `mma.sync` m16n8k8 (f32 accuracy), f16/bf16 as the flash kernels with masks.
//! - `DROPOUT`: seeded dropout multipliers (Philox 4x32-10, the CPU's mask bit for bit).
//!
//! The kernels target `COMPUTE_CAP` (`CUDA_COMPUTE_CAP` at build time). Without the `cuda`
//! feature this crate has no PTX (and none of these items), so a CPU-only build needs no CUDA
//! toolkit. With the `emu` feature the same sources run on the CPU in an emulator (module
//! `emu`), for tests.

#[cfg(feature = "emu")]
pub mod emu;

#[cfg(feature = "cuda")]
mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

#[cfg(feature = "cuda")]
pub use ptx::{DROPOUT, EFFICIENT, EFFICIENT_TC, FLASH_BWD, FLASH_FWD};

/// The compute capability the PTX was built for, as `CUDA_COMPUTE_CAP` spells it (`90` = sm_90).
/// A device below it cannot load the kernels.
#[cfg(feature = "cuda")]
pub const COMPUTE_CAP: u32 = parse_cap(env!("ATTN_KERNELS_COMPUTE_CAP"));

#[cfg(feature = "cuda")]
const fn parse_cap(s: &str) -> u32 {
    let b = s.as_bytes();
    let mut i = 0;
    let mut v = 0u32;
    while i < b.len() {
        assert!(
            b[i].is_ascii_digit(),
            "ATTN_KERNELS_COMPUTE_CAP must be digits"
        );
        v = v * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    v
}
