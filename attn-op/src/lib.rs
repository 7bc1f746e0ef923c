//! PyTorch-style scaled-dot-product attention for [Candle](https://github.com/huggingface/candle),
//! with three backends that all train: FlashAttention-2 ([`Backend::Flash`]), memory-efficient
//! attention with masks ([`Backend::Efficient`]), both fused `CustomOp3`s with forward and
//! backward, and a plain composition of Candle ops ([`Backend::Math`]).
//!
//! ```
//! use attn_op::{scaled_dot_product_attention, sdpa_kernel, Backend, SdpaOptions};
//! use candle_core::{Device, Tensor};
//! let q = Tensor::randn(0f32, 1., (2, 3, 8), &Device::Cpu)?;
//! let y = scaled_dot_product_attention(&q, &q, &q, &SdpaOptions { is_causal: true, ..Default::default() })?;
//! {
//!     let _only_flash = sdpa_kernel(&[Backend::Flash]); // scoped, per thread, nestable
//!     let y = scaled_dot_product_attention(&q, &q, &q, &SdpaOptions::default())?;
//! }
//! let y = attn_op::flash_attn(&q.unsqueeze(0)?, &q.unsqueeze(0)?, &q.unsqueeze(0)?, 0.35, true)?;
//! # Ok::<(), candle_core::Error>(())
//! ```

#![warn(missing_docs)]

#[cfg(feature = "bench")]
pub mod bench;
mod config;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod dispatch;
#[cfg(feature = "cuda-emu")]
pub mod emu;
mod flash_api;
mod geometry;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
mod kernel_plan;
mod math;
pub mod nn;
mod ops;
mod options;
pub mod philox;
pub mod profile;
#[cfg(feature = "profile")]
mod profiler;
// The packed-rows attention is what the layer runs on the CPU; the feature makes it public.
#[cfg(feature = "rows")]
pub mod rows;
#[cfg(not(feature = "rows"))]
#[allow(dead_code, unreachable_pub)]
mod rows;
mod sdpa;
mod validate;
pub mod varlen;

pub use config::CausalAlign;
pub use dispatch::{enabled_backends, sdpa_kernel, select_backend, SdpaKernelGuard, Selection};
pub use flash_api::{
    flash_attn, flash_attn_alibi, flash_attn_alibi_windowed, flash_attn_alibi_windowed_softcap,
    flash_attn_varlen, flash_attn_varlen_alibi, flash_attn_varlen_alibi_windowed,
    flash_attn_varlen_alibi_windowed_softcap, flash_attn_varlen_paged_windowed,
    flash_attn_varlen_windowed, flash_attn_windowed,
};
pub use math::masked_softmax_last_dim;
pub use ops::{EfficientAttention, FlashAttention};
pub use options::{Backend, SdpaOptions};
pub use sdpa::scaled_dot_product_attention;
