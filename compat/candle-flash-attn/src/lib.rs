//! [candle-flash-attn](https://crates.io/crates/candle-flash-attn) 0.11.1's functions, with the
//! same names and signatures, computed by [attn-op](https://crates.io/crates/attn-op): a Candle
//! project swaps this crate in for the crates.io one with `[patch.crates-io]` (see the README)
//! and its code is unchanged.
//!
//! Unlike the crates.io crate these run on the CPU as well as on CUDA, in f32 as well as f16 and
//! bf16, and are differentiable. The CUDA kernels come with the `cuda` feature, on by default as
//! the crates.io crate always builds for CUDA; `default-features = false` gives a CPU-only build
//! that refuses CUDA tensors with an error.
//!
//! Not provided: the `FlashAttn` struct (the crates.io crate's `CustomOp3`); use the functions,
//! or `attn_op::FlashAttention`.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! // (batch, seq, heads, head_dim): 5 new queries against a cache of 8 keys in 2 heads.
//! let q = Tensor::randn(0f32, 1., (1, 5, 4, 32), &Device::Cpu)?;
//! let kv = Tensor::randn(0f32, 1., (1, 8, 2, 32), &Device::Cpu)?;
//! let y = candle_flash_attn::flash_attn(&q, &kv, &kv, 32f32.powf(-0.5), true)?;
//! assert_eq!(y.dims(), &[1, 5, 4, 32]);
//! # Ok::<(), candle_core::Error>(())
//! ```

#[doc(inline)]
pub use attn_op::{flash_attn, flash_attn_varlen};

// To add when attn-op has them (issue 17), each with candle-flash-attn's signature:
//   flash_attn_windowed, flash_attn_alibi, flash_attn_alibi_windowed,
//   flash_attn_alibi_windowed_softcap, flash_attn_varlen_windowed, flash_attn_varlen_alibi,
//   flash_attn_varlen_alibi_windowed, flash_attn_varlen_alibi_windowed_softcap,
//   flash_attn_varlen_paged_windowed.
// attn-op refuses a window wider than the keys; candle-flash-attn treats `window_size_left` or
// `window_size_right` greater than the key length (k.dim(1) for the batched functions,
// `max_seqlen_k` for the varlen and paged ones) as `None`, unlimited. So the windowed ones are
// wrappers here that map such a window to `None` and call attn-op; the rest are re-exported.
