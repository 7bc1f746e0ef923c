//! nanogpt: Karpathy's nanoGPT in Candle, with attention from `attn-op`.
//!
//! `nanogpt prepare` tokenizes a corpus ([`data`], [`tokenizer`]), `nanogpt train` trains the
//! [`model`] ([`train`], [`optim`], [`checkpoint`], [`plot`]), `nanogpt sample` generates text
//! ([`sample`]), `nanogpt bench` times attention as PyTorch's SDPA tutorial does ([`mod@bench`]).
//! Everything random draws from the seeded generator in [`rng`], so a CPU run is
//! reproducible bit for bit and resumes exactly. [`runtime`] is how the binary sets up the
//! process (allocator, threads) for CPU training. [`cli`] is the binary's command line.
//! Sizes are checked against the machine's memory before anything large is allocated
//! ([`memory`]); kept files are written atomically ([`files`]); an out-dir belongs to one run at
//! a time ([`out_dir`]); SIGINT/SIGTERM stop training with a checkpoint ([`interrupt`]).

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
