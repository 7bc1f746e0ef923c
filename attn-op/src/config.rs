//! What the fused ops need to know besides q, k and v.

use candle_core::Tensor;

use crate::philox::DropoutMask;

/// How a causal mask lines up queries and keys when `Lq != Lk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CausalAlign {
    /// Query `i` sees keys `j <= i` (PyTorch's `is_causal`, `ones(Lq, Lk).tril()`).
    TopLeft,
    /// Query `i` sees keys `j <= i + Lk - Lq`: the last query sees every key
    /// (candle-flash-attn and FlashAttention-2, what KV-cache decoding needs).
    BottomRight,
}

impl CausalAlign {
    /// The diagonal offset: key `j` is visible from query `i` iff `j <= i + offset`.
    pub fn offset(self, lq: usize, lk: usize) -> isize {
        match self {
            CausalAlign::TopLeft => 0,
            CausalAlign::BottomRight => lk as isize - lq as isize,
        }
    }
}

/// Dropout of the attention weights: drop probability and the seed of the Philox stream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Dropout {
    pub p: f32,
    pub mask: DropoutMask,
}

impl Dropout {
    pub fn new(p: f64, seed: u64) -> Option<Self> {
        (p > 0.0).then(|| Self {
            p: p as f32,
            mask: DropoutMask::new(p, seed),
        })
    }

    /// Scale of kept weights, `1 / (1 - p)`.
    pub fn keep_scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }
}

/// Everything an attention op applies to its q, k, v inputs.
#[derive(Clone, Debug)]
pub(crate) struct AttnConfig {
    pub scale: f32,
    pub causal: Option<CausalAlign>,
    pub dropout: Option<Dropout>,
    /// Bias (f32) or boolean (u8) mask, broadcast to `(..., Hq, Lq, Lk)`.
    pub mask: Option<Tensor>,
    /// Packed sequences; `None` for dense `(..., H, L, D)` inputs.
    pub varlen: Option<Varlen>,
}

impl AttnConfig {
    /// Plain attention: no dropout, mask or packing.
    pub fn new(scale: f32, causal: Option<CausalAlign>) -> Self {
        Self {
            scale,
            causal,
            dropout: None,
            mask: None,
            varlen: None,
        }
    }
}

/// Packed variable-length sequences: cumulative lengths, `cu[0] = 0`, `cu[b+1] - cu[b]` the
/// length of sequence `b`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Varlen {
    pub cu_q: Vec<usize>,
    pub cu_k: Vec<usize>,
}
