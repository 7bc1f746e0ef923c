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

/// Which keys each query row sees: a band around the diagonal that `align` lines up. Query `i`
/// sees key `j` iff `i + off - left <= j <= i + off + right`, `off = align.offset(Lq, Lk)`, a
/// missing side unlimited: causal attention is `right = Some(0)` with no `left`, a sliding window
/// of `w` keys back `left = Some(w)` too (FlashAttention-2's local attention).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Band {
    pub align: CausalAlign,
    pub left: Option<usize>,
    pub right: Option<usize>,
}

impl Band {
    /// Causal masking: query `i` sees keys `j <= i + off`.
    pub fn causal(align: CausalAlign) -> Self {
        Self {
            align,
            left: None,
            right: Some(0),
        }
    }

    /// The band of a query segment of `lq` rows against `lk` keys, as offsets from the row index.
    pub fn offsets(self, lq: usize, lk: usize) -> Bounds {
        let off = self.align.offset(lq, lk);
        Bounds {
            lo: self.left.map(|l| off - l as isize),
            hi: self.right.map(|r| off + r as isize),
        }
    }
}

/// A band as offsets from the query row: row `i` sees key `j` iff `i + lo <= j <= i + hi`, a
/// missing bound unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Bounds {
    pub lo: Option<isize>,
    pub hi: Option<isize>,
}

impl Bounds {
    /// The keys `[first, end)` row `row` sees among `lk` (empty when `first >= end`).
    #[inline]
    pub fn keys(self, row: usize, lk: usize) -> (usize, usize) {
        let clamp = |x: isize| x.clamp(0, lk as isize) as usize;
        let first = self.lo.map_or(0, |lo| clamp(row as isize + lo));
        let end = self.hi.map_or(lk, |hi| clamp(row as isize + hi + 1));
        (first, end)
    }

    /// The rows `[first, end)` among `lq` that see key `col`.
    #[inline]
    pub fn rows(self, col: usize, lq: usize) -> (usize, usize) {
        let clamp = |x: isize| x.clamp(0, lq as isize) as usize;
        let first = self.hi.map_or(0, |hi| clamp(col as isize - hi));
        let end = self.lo.map_or(lq, |lo| clamp(col as isize - lo + 1));
        (first, end)
    }

    /// Whether any row is limited (the kernels skip the band bookkeeping otherwise).
    pub fn is_full(self) -> bool {
        self.lo.is_none() && self.hi.is_none()
    }
}

/// Everything an attention op applies to its q, k, v inputs.
#[derive(Clone, Debug)]
pub(crate) struct AttnConfig {
    pub scale: f32,
    /// Causal mask or sliding window; `None` for every key.
    pub band: Option<Band>,
    pub dropout: Option<Dropout>,
    /// Bias (f32) or boolean (u8) mask, broadcast to `(..., Hq, Lq, Lk)`.
    pub mask: Option<Tensor>,
    /// Packed sequences; `None` for dense `(..., H, L, D)` inputs.
    pub varlen: Option<Varlen>,
    /// ALiBi slopes, one per query head: `-slope·|i + Lk - Lq - j|` added to the scaled score.
    pub alibi: Option<Vec<f32>>,
    /// Logit soft-capping (Gemma 2): scores become `c·tanh(scale·q·k / c)`, `c > 0`.
    pub softcap: Option<f32>,
    /// With `varlen`: keys and values in the blocks of a paged cache, each sequence's blocks in
    /// order (CPU only).
    pub pages: Option<Vec<Vec<usize>>>,
}

impl AttnConfig {
    /// Plain attention: no dropout, mask or packing.
    pub fn new(scale: f32, causal: Option<CausalAlign>) -> Self {
        Self {
            scale,
            band: causal.map(Band::causal),
            dropout: None,
            mask: None,
            varlen: None,
            alibi: None,
            softcap: None,
            pages: None,
        }
    }
}

/// The physical row (`block · page + offset`) of every key of a paged cache, sequence after
/// sequence: key `t` of sequence `b` (of `cu_k[b + 1] - cu_k[b]`) is row `t % page` of block
/// `blocks[b][t / page]`.
pub(crate) fn paged_rows(cu_k: &[usize], blocks: &[Vec<usize>], page: usize) -> Vec<usize> {
    cu_k.windows(2)
        .zip(blocks)
        .flat_map(|(w, mine)| (0..w[1] - w[0]).map(move |t| mine[t / page] * page + t % page))
        .collect()
}

/// Packed variable-length sequences: cumulative lengths, `cu[0] = 0`, `cu[b+1] - cu[b]` the
/// length of sequence `b`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Varlen {
    pub cu_q: Vec<usize>,
    pub cu_k: Vec<usize>,
}
