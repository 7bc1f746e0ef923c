//! The fused attention ops, as Candle `CustomOp3`s on (q, k, v).

pub(crate) mod efficient;
mod flash;
pub(crate) mod fused;

pub use efficient::EfficientAttention;
pub use flash::FlashAttention;
