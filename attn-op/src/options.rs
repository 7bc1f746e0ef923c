//! The arguments of [`crate::scaled_dot_product_attention`] beyond q, k and v.

use candle_core::Tensor;

/// Options of [`crate::scaled_dot_product_attention`], named as PyTorch's arguments.
///
/// ```
/// use attn_op::SdpaOptions;
/// let opts = SdpaOptions { is_causal: true, dropout_p: 0.1, seed: Some(7), ..Default::default() };
/// assert!(opts.attn_mask.is_none() && opts.scale.is_none());
/// // Causal attention over the last 256 keys, logits capped at 50 (Gemma 2's local layers).
/// let local = SdpaOptions { is_causal: true, window_left: Some(256), softcap: Some(50.0), ..Default::default() };
/// ```
#[derive(Clone, Debug, Default)]
pub struct SdpaOptions {
    /// A mask broadcastable to `(..., Lq, Lk)`: either boolean (dtype `u8`, nonzero = may attend)
    /// or an additive float bias (any float dtype) added to the scaled scores.
    /// Not allowed together with `is_causal`.
    pub attn_mask: Option<Tensor>,
    /// Probability of dropping an attention weight, in `[0, 1)`. Kept weights are scaled by
    /// `1 / (1 - dropout_p)`. The caller decides when to apply it (training only), as in PyTorch.
    pub dropout_p: f64,
    /// Causal attention with PyTorch's top-left alignment: query `i` attends keys `j <= i`.
    /// (With `Lq != Lk` that is `torch.ones(Lq, Lk).tril()`; see [`crate::flash_attn`] for the
    /// bottom-right alignment that KV-cache decoding needs.)
    pub is_causal: bool,
    /// Multiplier of `q·k`; `1 / sqrt(E)` when `None`.
    pub scale: Option<f64>,
    /// Grouped-query attention: k and v may have fewer heads (dim -3) than q, as long as that
    /// number divides q's; query head `h` reads key/value head `h / (Hq / Hkv)`.
    pub enable_gqa: bool,
    /// Seed of the dropout mask. The same seed gives the same mask on every backend; `None`
    /// draws a fresh seed per call.
    pub seed: Option<u64>,
    /// Sliding-window (local) attention: query `i` sees at most `window_left` keys before key
    /// `i` (`None`: all of them). Aligned top-left like `is_causal`; with `is_causal` it is the
    /// causal sliding window of Mistral-style models (`i - window_left <= j <= i`).
    pub window_left: Option<usize>,
    /// Query `i` sees at most `window_right` keys after key `i` (`None`: all of them;
    /// `Some(0)` is `is_causal`). Not allowed together with `is_causal`.
    pub window_right: Option<usize>,
    /// Logit soft-capping (Gemma 2): scores become `softcap·tanh(scale·q·k / softcap)` before
    /// `attn_mask` is added. Must be finite and positive.
    pub softcap: Option<f64>,
}

/// An implementation of scaled-dot-product attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Backend {
    /// FlashAttention-2: tiled with online softmax, no `Lq × Lk` storage, no arbitrary mask.
    Flash,
    /// Memory-efficient attention (xformers style): tiled like flash, plus `attn_mask` and any
    /// head dim.
    Efficient,
    /// Plain composition of Candle ops; supports everything, holds the `Lq × Lk` scores.
    Math,
}

impl Backend {
    /// Every backend, in the order automatic dispatch tries them.
    pub const ALL: [Backend; 3] = [Backend::Flash, Backend::Efficient, Backend::Math];

    /// The lower-case name used in messages and on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Flash => "flash",
            Backend::Efficient => "efficient",
            Backend::Math => "math",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Backend::ALL
            .into_iter()
            .find(|b| b.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown attention backend `{s}`: expected flash, efficient or math")
            })
    }
}
