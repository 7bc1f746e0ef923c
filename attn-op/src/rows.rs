//! Attention straight on the packed q|k|v token rows of a fused `c_attn` projection, as plain f32
//! slices on the CPU: for callers that fuse attention with their own projections, residual or
//! normalisation into one Candle op of their own (each node of Candle's autograd graph costs its
//! backward a zero-filled gradient buffer and an addition).
//!
//! [`QkvRows`] runs the same FlashAttention-2 forward and backward as [`crate::FlashAttention`]
//! (same tiles, same Philox dropout stream), reading q, k and v in place from rows
//! `(B·T, 3·C)` and writing the output as token rows `(B·T, C)`, the layout `c_proj` takes.
//!
//! ```
//! use attn_op::rows::QkvRows;
//! // 2 sequences of 5 tokens, 2 heads of 4: rows of 3·8 = 24.
//! let attn = QkvRows::new(2, 4, 5, true)?;
//! let qkv: Vec<f32> = (0..10 * 24).map(|i| (i as f32 * 0.37).sin()).collect();
//! let out = attn.forward(&qkv)?;
//! assert_eq!((out.y.len(), out.lse.len()), (10 * 8, 2 * 2 * 5));
//! let dy = vec![1f32; out.y.len()];
//! let dqkv = attn.backward(&qkv, &out.y, &out.lse, &dy)?;
//! assert_eq!(dqkv.len(), qkv.len());
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{bail, Layout, Result, Shape};
use rayon::prelude::*;

use crate::config::{Band, CausalAlign, Dropout};
use crate::cpu::backward::backward;
use crate::cpu::forward::{forward, Params, Sources};
use crate::cpu::Src;
use crate::geometry::Geometry;
use crate::validate::check_common;

/// Multi-head self-attention over packed q|k|v token rows: sequences of `seq_len` tokens one
/// after the other, each row the token's q, k and v (`n_head` heads of `head_dim` each, so
/// `3·C = 3·n_head·head_dim` elements), scale `1/sqrt(head_dim)`.
#[derive(Clone, Copy, Debug)]
pub struct QkvRows {
    n_head: usize,
    head_dim: usize,
    seq_len: usize,
    causal: bool,
    dropout: Option<Dropout>,
}

/// What [`QkvRows::forward`] returns: the output rows and what the backward pass needs.
#[derive(Clone, Debug)]
pub struct QkvForward {
    /// The output, token rows `(B·T, C)`.
    pub y: Vec<f32>,
    /// Each query row's logsumexp of the scaled scores, in `(B, H, T)` order.
    pub lse: Vec<f32>,
}

/// A `len`-element buffer of rows of `row_len`, each row filled piece by piece (`d` elements at
/// a time) from `piece(row, j)`, rows in parallel: the reorderings between head-major and
/// token-major layouts below. The buffer is not zero-filled first: every element is written
/// once (zero-filling it too made the backward pass about 20% slower at nanoGPT's CPU shape).
fn gather<'a>(
    len: usize,
    row_len: usize,
    d: usize,
    piece: impl Fn(usize, usize) -> &'a [f32] + Sync,
) -> Vec<f32> {
    if d == 0 || row_len == 0 || !row_len.is_multiple_of(d) || !len.is_multiple_of(row_len) {
        // Nothing to copy (or no whole pieces, which the callers never ask for).
        return vec![0f32; len];
    }
    let mut out: Vec<f32> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(r, row)| {
            for (j, dst) in row.chunks_exact_mut(d).enumerate() {
                let src = &piece(r, j)[..d];
                // SAFETY: `src` and `dst` are `d` elements each, distinct (`dst` is a unique
                // borrow of `out`), and `MaybeUninit<f32>` has the layout of `f32`.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast(), d) };
            }
        });
    // SAFETY: the rows cover `out[..len]` (`len` is a multiple of `row_len`), each row is cut
    // into whole pieces of `d` (`row_len` is a multiple of `d`), and every piece was written in
    // full above (`src` is `d` long: slicing it would have panicked otherwise).
    unsafe { out.set_len(len) };
    out
}

/// Copies `(B·H, T, D)` rows (head-major) into `(B, T, H, D)` order (token-major).
fn heads_to_tokens(rows: &[f32], h: usize, t: usize, d: usize) -> Vec<f32> {
    gather(rows.len(), h * d, d, |bt, hi| {
        &rows[(((bt / t) * h + hi) * t + bt % t) * d..]
    })
}

/// Copies token rows `(B·T, H·D)` into `(B, H, T, D)` order (head-major).
fn tokens_to_heads(rows: &[f32], h: usize, t: usize, d: usize) -> Vec<f32> {
    gather(rows.len(), t * d, d, |bh, ti| {
        &rows[(((bh / h) * t + ti) * h + bh % h) * d..]
    })
}

/// Packs the `(B, H, T, D)` gradients of q, k and v into the token rows `(B·T, 3·H·D)` of the
/// packed tensor.
fn pack_heads(grads: [&[f32]; 3], h: usize, t: usize, d: usize) -> Vec<f32> {
    gather(3 * grads[0].len(), 3 * h * d, d, |bt, j| {
        &grads[j / h][(((bt / t) * h + j % h) * t + bt % t) * d..]
    })
}

impl QkvRows {
    /// Attention of `n_head` heads of `head_dim` over sequences of `seq_len` tokens, each token
    /// seeing only itself and earlier ones when `causal`.
    pub fn new(n_head: usize, head_dim: usize, seq_len: usize, causal: bool) -> Result<Self> {
        if n_head == 0 || head_dim == 0 || seq_len == 0 {
            bail!(
                "qkv rows: n_head = {n_head}, head_dim = {head_dim} and seq_len = {seq_len} must \
                 be positive"
            );
        }
        // One token's q|k|v row, and one sequence of them, must be countable.
        crate::validate::checked_elems(
            "qkv rows",
            "a sequence",
            &[seq_len, 3, n_head, head_dim],
            4,
        )?;
        Ok(Self {
            n_head,
            head_dim,
            seq_len,
            causal,
            dropout: None,
        })
    }

    /// Drops attention weights with probability `p` in `[0, 1)`, the mask drawn from `seed` by
    /// the same Philox stream as [`crate::FlashAttention`].
    pub fn with_dropout(mut self, p: f64, seed: u64) -> Result<Self> {
        check_common(1, p, None)?;
        self.dropout = Dropout::new(p, seed);
        Ok(self)
    }

    /// The geometry of the heads inside the packed rows `qkv`, the call's parameters, its sources
    /// (q, k and v read in place), and the number of token rows.
    fn setup<'a>(&self, qkv: &'a [f32]) -> Result<(Geometry, Params, Sources<'a>, usize)> {
        let (h, d, t) = (self.n_head, self.head_dim, self.seq_len);
        let c = h * d;
        if !qkv.len().is_multiple_of(3 * c) {
            bail!(
                "qkv rows: expected whole rows of 3·C = {} elements (q, k, v of {h} heads of \
                 {d}), got {} elements",
                3 * c,
                qkv.len()
            );
        }
        let n = qkv.len() / (3 * c);
        if !n.is_multiple_of(t) {
            bail!("qkv rows: {n} rows are not whole sequences of {t} tokens");
        }
        let stride = vec![t * 3 * c, d, 3 * c, 1];
        let [lq, lk, lv] =
            [0, 1, 2].map(|i| Layout::new(Shape::from((n / t, h, t, d)), stride.clone(), i * c));
        let band = self.causal.then_some(Band::causal(CausalAlign::TopLeft));
        let g = Geometry::dense(&lq, &lk, &lv, None, band, None)?;
        let params = Params {
            scale: 1.0 / (d as f32).sqrt(),
            softcap: None,
            dropout: self.dropout,
        };
        let src = Sources {
            q: Src::borrowed(qkv),
            k: Src::borrowed(qkv),
            v: Src::borrowed(qkv),
            mask: None,
        };
        Ok((g, params, src, n))
    }

    /// The attention of the packed rows `qkv` (`(B·T, 3·C)`, row-major).
    pub fn forward(&self, qkv: &[f32]) -> Result<QkvForward> {
        let (g, params, src, _) = self.setup(qkv)?;
        let (rows, lse) = forward(&g, &src, &params);
        let (h, t, d) = (self.n_head, self.seq_len, self.head_dim);
        Ok(QkvForward {
            y: heads_to_tokens(&rows, h, t, d),
            lse,
        })
    }

    /// The gradient of the packed rows `qkv` given the forward's output `y` and logsumexp `lse`
    /// ([`QkvForward`]'s) and the gradient `dy` of the output (token rows `(B·T, C)`).
    pub fn backward(&self, qkv: &[f32], y: &[f32], lse: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
        let (g, params, src, n) = self.setup(qkv)?;
        let (h, t, d) = (self.n_head, self.seq_len, self.head_dim);
        if y.len() != n * h * d || dy.len() != y.len() || lse.len() != g.q_rows {
            bail!(
                "qkv rows backward: {n} rows of q|k|v need {} output and gradient elements and {} \
                 logsumexps, got {}, {} and {}",
                n * h * d,
                g.q_rows,
                y.len(),
                dy.len(),
                lse.len()
            );
        }
        let (o, dout) = (tokens_to_heads(y, h, t, d), tokens_to_heads(dy, h, t, d));
        let grads = backward(&g, &src, &params, &o, &dout, lse);
        Ok(pack_heads([&grads.dq, &grads.dk, &grads.dv], h, t, d))
    }
}
