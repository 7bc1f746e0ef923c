//! FlashAttention-2 forward on the CPU: each task takes a tile of query rows through all the
//! key/value tiles it can see, with the online softmax, and never holds more than one
//! `BQ × BK` tile of scores.

use rayon::prelude::*;

use super::geometry::{Geometry, QSeg};
use super::matmul::{gemm, MatRef};
use super::{simd, split_rows, MaskSrc, Src};
use crate::config::Dropout;

/// Query rows per task.
pub(crate) const BQ: usize = 64;
/// Keys per score tile.
pub(crate) const BK: usize = 128;

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

/// Scores of one tile row: scale, mask and causal limit applied in place.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn prepare_scores(
    g: &Geometry,
    seg: &QSeg,
    src: &Sources,
    p: &Params,
    row: usize,
    c0: usize,
    lk: usize,
    s: &mut [f32],
) {
    simd::scale(s, p.scale);
    if let Some(mask) = &src.mask {
        mask.apply(seg.mask + row * g.mask_rs + c0 * g.mask_cs, g.mask_cs, s);
    }
    let visible = visible_keys(seg.causal, row, lk)
        .saturating_sub(c0)
        .min(s.len());
    s[visible..].fill(f32::NEG_INFINITY);
}

/// Runs the forward pass: returns the output (contiguous rows of `ev`) and the row logsumexp of
/// the scaled scores (`+inf` for a row that sees no key, whose output is zero).
pub(crate) fn forward(g: &Geometry, src: &Sources, p: &Params) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0f32; g.q_rows * g.ev];
    let mut lse = vec![f32::INFINITY; g.q_rows];
    let ranges: Vec<_> = g.q_segs.iter().map(|s| (s.row0, s.len)).collect();
    let outs = split_rows(&mut out, g.ev, &ranges);
    let lses = split_rows(&mut lse, 1, &ranges);
    let mut tasks = Vec::new();
    for ((seg, mut o), mut l) in g.q_segs.iter().zip(outs).zip(lses) {
        for r0 in (0..seg.len).step_by(BQ) {
            let rows = BQ.min(seg.len - r0);
            let (o_tile, o_rest) = o.split_at_mut(rows * g.ev);
            let (l_tile, l_rest) = l.split_at_mut(rows);
            tasks.push((seg, r0, o_tile, l_tile));
            (o, l) = (o_rest, l_rest);
        }
    }
    tasks
        .into_par_iter()
        .for_each_init(Vec::new, |scores, (seg, r0, o, l)| {
            forward_tile(g, src, p, seg, r0, o, l, scores)
        });
    (out, lse)
}

#[allow(clippy::too_many_arguments)]
fn forward_tile(
    g: &Geometry,
    src: &Sources,
    p: &Params,
    seg: &QSeg,
    r0: usize,
    o: &mut [f32],
    lse: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let rows = lse.len();
    let (e, ev) = (g.e, g.ev);
    let kv = &g.kv_segs[seg.kv];
    let kend = visible_keys(seg.causal, r0 + rows - 1, kv.len);
    let q = MatRef::rows(src.q.at(seg.q + r0 * g.q_rs), rows, e, g.q_rs);
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows];
    let mut keep = vec![0f32; BK];
    scores.resize(BQ * BK, 0.0);
    for c0 in (0..kend).step_by(BK) {
        let cols = BK.min(kend - c0);
        let s = &mut scores[..rows * cols];
        let kt = MatRef::rows(src.k.at(kv.k + c0 * g.k_rs), cols, e, g.k_rs).t();
        gemm(s, cols, q, kt, false, 1.0);
        for (i, row) in s.chunks_exact_mut(cols).enumerate() {
            prepare_scores(g, seg, src, p, r0 + i, c0, kv.len, row);
            let m_new = m[i].max(simd::max(row));
            if m_new == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let alpha = (m[i] - m_new).exp();
            l[i] = l[i] * alpha + simd::exp_sub_sum(row, m_new);
            m[i] = m_new;
            if alpha != 1.0 {
                simd::scale(&mut o[i * ev..(i + 1) * ev], alpha);
            }
            if let Some(d) = &p.dropout {
                let keep = &mut keep[..cols];
                d.mask.fill_row(seg.stream, r0 + i, c0, keep);
                simd::scale(keep, d.keep_scale());
                simd::mul(row, keep);
            }
        }
        let vt = MatRef::rows(src.v.at(kv.v + c0 * g.v_rs), cols, ev, g.v_rs);
        gemm(o, ev, MatRef::rows(s, rows, cols, cols), vt, true, 1.0);
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
    }
}
