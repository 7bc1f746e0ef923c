//! The CPU fast path: the same GPT as [`crate::model`], on the CPU in f32 without biases, as a
//! handful of fused ops with hand-written backward passes. [`crate::model::Gpt::new`] decides
//! whether a model runs here; nothing in this folder knows the model's types.
//!
//! Why: every node of Candle's autograd graph costs its backward pass a zero-filled gradient
//! buffer and an addition as large as its output, and the plain model has dozens per block.
//! Here each half of a block is one node (`attention.rs`, `mlp.rs`), and so are the embedding
//! (`embedding.rs`), the lm_head with `ln_f` folded in (`normed_linear.rs`) and the loss
//! (`loss.rs`). Each file holds one op, its forward, its backward and a test against the plain
//! layers (values and gradients). `matmul.rs` cuts their products into blocks of rows for
//! rayon's pool, `normalize.rs` is LayerNorm's normalisation row by row, `gelu.rs` and `exp.rs`
//! the element-wise functions, and `cpu_data.rs` reads and writes Candle's CPU storage.

mod attention;
mod cpu_data;
mod embedding;
mod exp;
mod gelu;
mod loss;
mod matmul;
mod mlp;
mod normalize;
mod normed_linear;
mod scale_columns;

pub(crate) use attention::attention_residual;
pub(crate) use cpu_data::{with_data, with_data_mut};
pub use embedding::embed;
pub use loss::cross_entropy;
pub(crate) use mlp::mlp_residual;
pub(crate) use normed_linear::normed_linear;
