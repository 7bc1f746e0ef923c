//! FlashAttention-2 forward on the CPU: each task takes a tile of query rows through all the
//! key/value tiles it can see, with the online softmax, and never holds more than one
//! `BQ × BK` tile of scores.

use rayon::prelude::*;

use super::matmul::{gemm, transpose_into, MatRef};
use super::{simd, split_rows, MaskSrc, OutElem, Src};
use crate::config::Dropout;
use crate::geometry::{Geometry, QSeg};

/// Query rows per block of the backward's tiles that the causal mask does not cut, and the unit
/// of the forward's task sizes.
pub(crate) const BQ: usize = 64;
/// Keys per score tile.
pub(crate) const BK: usize = 128;
/// Query rows per block of a tile that the causal mask cuts: small enough that the tiles on the
/// diagonal skip most of their masked triangle, large enough for the register-blocked products.
pub(crate) const CAUSAL_ROWS: usize = 16;

/// Query rows per block of the forward's tiles that the causal mask does not cut: a multiple of
/// the matrix kernel's six rows, and few enough that the block's scores, its queries and the key
/// tile (18 + 4.5 + 16 KiB at head dim 32) stay in a 48 KiB L1 cache.
const FWD_ROWS: usize = 36;

/// Tasks of at most this many query rows compute their scores as dot products with the key rows.
const FEW_ROWS: usize = 2;

/// Forward tasks wanted per thread: enough for rayon to balance uneven (causal) work.
const TASKS_PER_THREAD: usize = 8;

/// Query rows per forward task: as many as leave every thread enough tasks, since each packed key
/// tile serves all the rows of its task.
fn rows_per_task(g: &Geometry) -> usize {
    let max_len = g.q_segs.iter().map(|s| s.len).max().unwrap_or(0);
    let want = TASKS_PER_THREAD * rayon::current_num_threads();
    let blocks_per_seg = want
        .div_ceil(g.q_segs.len().max(1))
        .clamp(1, max_len.div_ceil(BQ).max(1));
    max_len.div_ceil(blocks_per_seg).div_ceil(BQ).max(1) * BQ
}

/// The inputs of one call, read through the geometry's offsets.
pub(crate) struct Sources<'a> {
    pub q: Src<'a>,
    pub k: Src<'a>,
    pub v: Src<'a>,
    pub mask: Option<MaskSrc<'a>>,
}

/// Scale and dropout of one call.
#[derive(Clone, Copy)]
pub(crate) struct Params {
    pub scale: f32,
    pub dropout: Option<Dropout>,
}

/// Causal limit: the number of keys visible from query row `row` (clamped to `[0, lk]`).
#[inline]
pub(crate) fn visible_keys(causal: Option<isize>, row: usize, lk: usize) -> usize {
    match causal {
        Some(off) => (row as isize + off + 1).clamp(0, lk as isize) as usize,
        None => lk,
    }
}

/// Prepares a tile of rows of `q·kᵀ` for the softmax: `s` holds rows `row0, row0 + 1, ...` of
/// query segment `seg`, `cols` wide, keys from `c0` on. Sets keys past each row's causal limit
/// to `-inf` and applies the mask (scaling first, then returning 1), or leaves the scaling to
/// the caller (returning the scale): the scores are `returned multiplier × s`, the same
/// multiplier for every row.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn prepare_scores(
    g: &Geometry,
    seg: &QSeg,
    src: &Sources,
    p: &Params,
    row0: usize,
    c0: usize,
    lk: usize,
    s: &mut [f32],
    cols: usize,
) -> f32 {
    for (i, s) in s.chunks_exact_mut(cols.max(1)).enumerate() {
        let row = row0 + i;
        let visible = visible_keys(seg.causal, row, lk)
            .saturating_sub(c0)
            .min(s.len());
        s[visible..].fill(f32::NEG_INFINITY);
        if let Some(mask) = &src.mask {
            simd::scale(s, p.scale);
            mask.apply(seg.mask + row * g.mask_rs + c0 * g.mask_cs, g.mask_cs, s);
        }
    }
    if src.mask.is_some() {
        1.0
    } else {
        p.scale
    }
}

/// Runs the forward pass: returns the output (contiguous rows of `ev`) and the row logsumexp of
/// the scaled scores (`+inf` for a row that sees no key, whose output is zero).
pub(crate) fn forward(g: &Geometry, src: &Sources, p: &Params) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0f32; g.q_rows * g.ev];
    let lse = forward_into(g, src, p, &mut out);
    (out, lse)
}

/// [`forward`] into `out` (`q_rows × ev`, any [`OutElem`]), each output row written once: never
/// read, so fresh zero pages are not first mapped for reading and then copied on write.
/// Returns the row logsumexp.
pub(crate) fn forward_into<T: OutElem>(
    g: &Geometry,
    src: &Sources,
    p: &Params,
    out: &mut [T],
) -> Vec<f32> {
    let mut lse = vec![f32::INFINITY; g.q_rows];
    let ranges: Vec<_> = g.q_segs.iter().map(|s| (s.row0, s.len)).collect();
    let outs = split_rows(out, g.ev, &ranges);
    let lses = split_rows(&mut lse, 1, &ranges);
    let block = rows_per_task(g);
    let mut tasks = Vec::new();
    for ((seg, mut o), mut l) in g.q_segs.iter().zip(outs).zip(lses) {
        for r0 in (0..seg.len).step_by(block) {
            let rows = block.min(seg.len - r0);
            let (o_tile, o_rest) = o.split_at_mut(rows * g.ev);
            let (l_tile, l_rest) = l.split_at_mut(rows);
            tasks.push((seg, r0, o_tile, l_tile));
            (o, l) = (o_rest, l_rest);
        }
    }
    tasks
        .into_par_iter()
        .for_each_init(Scratch::default, |scratch, (seg, r0, o, l)| {
            forward_block(g, src, p, seg, r0, o, l, scratch)
        });
    lse
}

/// Buffers a forward task reuses.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    /// The task's output rows in f32, written to the output once at the end.
    o: Vec<f32>,
    /// The task's query rows, the key tile and the value tile, converted (f16, bf16 inputs).
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    kt: Vec<f32>,
    /// Key or value rows of a few-row task, converted (f16 inputs).
    few_rows: Vec<f32>,
    keep: Vec<f32>,
    /// Each row's output rescaling of the current key tile.
    alpha: Vec<f32>,
}

/// Rows `[r0, r0 + lse.len())` of one query segment through every key tile they can see.
#[allow(clippy::too_many_arguments)]
fn forward_block<T: OutElem>(
    g: &Geometry,
    src: &Sources,
    p: &Params,
    seg: &QSeg,
    r0: usize,
    out: &mut [T],
    lse: &mut [f32],
    scratch: &mut Scratch,
) {
    let rows = lse.len();
    let (e, ev) = (g.e, g.ev);
    let kv = &g.kv_segs[seg.kv];
    let kend = visible_keys(seg.causal, r0 + rows - 1, kv.len);
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows];
    let Scratch {
        scores,
        o,
        q,
        k,
        v,
        kt,
        few_rows,
        keep,
        alpha,
    } = scratch;
    scores.resize(FWD_ROWS.max(CAUSAL_ROWS) * BK, 0.0);
    keep.resize(BK, 0.0);
    alpha.resize(FWD_ROWS.max(CAUSAL_ROWS), 0.0);
    o.clear();
    o.resize(rows * ev, 0.0);
    let q_task = src.q.rows(seg.q + r0 * g.q_rs, rows, e, g.q_rs, q);
    // A task of a few rows (decoding one token against a KV cache) reads each key once: dot
    // products with the key rows where they are cost less than transposing the key tile.
    let few = rows <= FEW_ROWS;
    for c0 in (0..kend).step_by(BK) {
        let cols = BK.min(kend - c0);
        let (k_off, v_off) = (kv.k + c0 * g.k_rs, kv.v + c0 * g.v_rs);
        // Few rows read keys and values where they are (`Src::dots`, `Src::accumulate`).
        let tiles = (!few).then(|| {
            let kt = transpose_into(src.k.rows(k_off, cols, e, g.k_rs, k), kt);
            (kt, src.v.rows(v_off, cols, ev, g.v_rs, v))
        });
        let mut s0 = 0;
        while s0 < rows {
            // Causal blocks are short where the mask cuts the tile (the masked triangle is
            // skipped) and FWD_ROWS long where every row of the block sees the whole tile.
            let sees_all = visible_keys(seg.causal, r0 + s0, kv.len) >= c0 + cols;
            let srows = if sees_all { FWD_ROWS } else { CAUSAL_ROWS }.min(rows - s0);
            let next = s0 + srows;
            // Keys of this tile that the sub-tile's last row can see (causal skipping).
            let scols = visible_keys(seg.causal, r0 + s0 + srows - 1, kv.len)
                .saturating_sub(c0)
                .min(cols);
            if scols == 0 {
                s0 = next;
                continue;
            }
            let q = MatRef::rows(&q_task.data[s0 * q_task.rs..], srows, e, q_task.rs);
            let s = &mut scores[..srows * scols];
            match &tiles {
                Some((kt, _)) => gemm(s, scols, q, MatRef { cols: scols, ..*kt }, false, 1.0),
                None => {
                    for (i, s_row) in s.chunks_exact_mut(scols).enumerate() {
                        let q_row = &q.data[i * q.rs..i * q.rs + e];
                        src.k.dots(k_off, g.k_rs, q_row, s_row, few_rows);
                    }
                }
            }
            let mul = prepare_scores(g, seg, src, p, r0 + s0, c0, kv.len, s, scols);
            let sub = s0..s0 + srows;
            let alpha = &mut alpha[..srows];
            simd::online_softmax_rows(s, scols, mul, &mut m[sub.clone()], &mut l[sub], alpha);
            simd::scale_rows(&mut o[s0 * ev..(s0 + srows) * ev], ev, alpha);
            if let Some(d) = &p.dropout {
                for (i, row) in s.chunks_exact_mut(scols).enumerate() {
                    let keep = &mut keep[..scols];
                    d.mask.fill_row(seg.stream, r0 + s0 + i, c0, keep);
                    simd::scale(keep, d.keep_scale());
                    simd::mul(row, keep);
                }
            }
            let o_sub = &mut o[s0 * ev..(s0 + srows) * ev];
            match &tiles {
                Some((_, vt)) => gemm(
                    o_sub,
                    ev,
                    MatRef::rows(s, srows, scols, scols),
                    MatRef { rows: scols, ..*vt },
                    true,
                    1.0,
                ),
                None => {
                    for (p_row, o_row) in s.chunks_exact(scols).zip(o_sub.chunks_exact_mut(ev)) {
                        src.v.accumulate(v_off, g.v_rs, p_row, o_row, few_rows);
                    }
                }
            }
            s0 = next;
        }
    }
    for i in 0..rows {
        let row = &mut o[i * ev..(i + 1) * ev];
        if l[i] > 0.0 {
            simd::scale(row, 1.0 / l[i]);
            lse[i] = m[i] + l[i].ln();
        } else {
            row.fill(0.0);
            lse[i] = f32::INFINITY;
        }
        T::store(row, &mut out[i * ev..(i + 1) * ev]);
    }
}
