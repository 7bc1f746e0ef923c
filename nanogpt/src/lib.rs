//! nanogpt: Karpathy's nanoGPT in Candle, with attention from `attn-op`.
//!
//! Where things are, one file each:
//! - the model's mathematics (LayerNorm, attention, MLP, Block, GPT, loss): [`model`]
//!   (`model.rs`, nanoGPT's `model.py`); the attention itself is attn-op's
//!   `CausalSelfAttention`;
//! - the CPU fast path, the same model as fused ops, one op per file with its backward and a
//!   test against the plain layer: [`fused`] (`fused/`); [`model::Gpt::new`] decides which runs
//!   (the `fused` setting);
//! - the optimizer step (AdamW, the learning-rate schedule, gradient clipping): [`optim`];
//! - the training loop (nanoGPT's `train.py`): [`train`];
//! - sampling: [`sample`]; data preparation: [`data`], [`tokenizer`]; settings: [`config`],
//!   [`cli`]; checkpoints: [`checkpoint`]; the attention benchmarks: [`mod@bench`].
//!
//! Everything random draws from the seeded generator in [`rng`], so a CPU run is
//! reproducible bit for bit and resumes exactly. [`runtime`] is how the binary sets up the
//! process (allocator, threads) for CPU training. Sizes are checked against the machine's
//! memory before anything large is allocated ([`memory`]); kept files are written atomically
//! ([`files`]); an out-dir belongs to one run at a time ([`out_dir`]); SIGINT/SIGTERM stop
//! training with a checkpoint ([`interrupt`]); [`plot`] draws the loss curves.

#![warn(missing_docs)]

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod files;
pub mod fused;
pub mod interrupt;
pub mod memory;
pub mod model;
pub mod optim;
pub mod out_dir;
pub mod plot;
pub mod rng;
pub mod runtime;
pub mod sample;
#[cfg(test)]
mod test_util;
pub mod tokenizer;
pub mod train;
