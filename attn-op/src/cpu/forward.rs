//! FlashAttention-2 forward on the CPU: each task takes a tile of query rows through all the
//! key/value tiles it can see, with the online softmax, and never holds more than one
//! `BQ × BK` tile of scores.

use std::f32::consts::{LN_2, LOG2_E};

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::bf16_pairs;
#[cfg(target_arch = "x86_64")]
use super::matmul::gemm_bf16_pairs;
use super::matmul::{gemm, transpose_scaled_into, MatRef};
#[cfg(target_arch = "x86_64")]
use super::softmax_avx512;
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

/// Rows of the next key and value tiles prefetched per block of rows of the current one.
const PREFETCH_ROWS: usize = 8;

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

/// Scale, soft cap and dropout of one call.
#[derive(Clone, Copy)]
pub(crate) struct Params {
    pub scale: f32,
    pub softcap: Option<f32>,
    pub dropout: Option<Dropout>,
}

/// What the products `q·kᵀ` of the score tiles are multiplied by as they are computed, before
/// [`prepare_scores`]: the soft cap's `scale / cap`, so that its pass skips a multiply; 1
/// otherwise (the softmax or the bias takes the scale).
pub(crate) fn product_scale(p: &Params) -> f32 {
    p.softcap.map_or(1.0, |cap| p.scale / cap)
}

/// Whether [`prepare_scores`] transforms the scores of `seg` (soft cap, ALiBi, mask) beyond
/// the band's `-inf`; without, the scores go to the softmax as the products leave them.
fn transforms_scores(src: &Sources, p: &Params, seg: &QSeg) -> bool {
    src.mask.is_some() || p.softcap.is_some() || seg.slope != 0.0
}

/// Row `row` of `seg`'s keys `[first, end)` counted from key `c0`, a tile's first column (not
/// clipped to the tile's width).
fn tile_keys(seg: &QSeg, row: usize, lk: usize, c0: usize) -> (usize, usize) {
    let (first, end) = seg.band.keys(row, lk);
    (first.saturating_sub(c0), end.saturating_sub(c0))
}

/// The tile column of row `row0`'s diagonal, ALiBi's zero (row `row0 + i`'s is `i` further),
/// the tile's first column being key `c0`.
fn tile_diag(seg: &QSeg, row0: usize, c0: usize) -> f32 {
    (row0 as isize + seg.diag - c0 as isize) as f32
}

/// Prepares a tile of rows of `q·kᵀ` (times [`product_scale`]) for the softmax: `s` holds rows
/// `row0, row0 + 1, ...` of query segment `seg`, `cols` wide, keys from `c0` on. Sets the keys
/// outside each row's band (causal mask, window) to `-inf`. With a soft cap, ALiBi or a mask,
/// transforms the scores in place (soft cap or scale, then the ALiBi bias, then the mask) and
/// returns 1; otherwise leaves the scaling to the caller and returns the scale: the scores are
/// `returned multiplier × s`, the same multiplier for every row. With a soft cap, `tanh` (when
/// given, as long as `s`) receives each score's `tanh(scale·q·k / c)`, which the backward needs.
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
    tanh: Option<&mut [f32]>,
) -> f32 {
    let transform = transforms_scores(src, p, seg);
    if !transform && seg.band.is_full() {
        return p.scale;
    }
    let diag0 = tile_diag(seg, row0, c0);
    if let Some(cap) = p.softcap {
        // The products applied `scale / cap` (`product_scale`); the bias comes after the cap.
        let alibi = (seg.slope != 0.0).then_some((seg.slope, diag0));
        simd::softcap_rows(s, cols, cap, tanh, alibi);
    } else if seg.slope != 0.0 {
        simd::alibi_rows(s, cols, p.scale, seg.slope, diag0);
    }
    for (i, s) in s.chunks_exact_mut(cols.max(1)).enumerate() {
        let row = row0 + i;
        if transform {
            // (The soft cap or the bias scaled the scores above.)
            if p.softcap.is_none() && seg.slope == 0.0 && p.scale != 1.0 {
                simd::scale(s, p.scale);
            }
            if let Some(mask) = &src.mask {
                mask.apply(seg.mask + row * g.mask_rs + c0 * g.mask_cs, g.mask_cs, s);
            }
        }
        if !seg.band.is_full() {
            let (first, end) = tile_keys(seg, row, lk, c0);
            let first = first.min(s.len());
            let end = end.clamp(first, s.len());
            s[..first].fill(f32::NEG_INFINITY);
            s[end..].fill(f32::NEG_INFINITY);
        }
    }
    if transform {
        1.0
    } else {
        p.scale
    }
}

/// The block of at most `rows` query rows from `r0` of `seg` against the key tile
/// `[c0, c0 + cols)`: how many rows it takes (`full_rows`, or `CAUSAL_ROWS` where the band cuts
/// the tile, so that most of the cut part's products are skipped) and the keys `[k0, k1)` of
/// the tile that any of those rows sees (empty when none does).
pub(crate) fn sub_block(
    seg: &QSeg,
    lk: usize,
    r0: usize,
    rows: usize,
    (c0, cols): (usize, usize),
    full_rows: usize,
) -> (usize, usize, usize) {
    let full = full_rows.min(rows);
    let band = seg.band;
    if band.is_full() {
        return (full, c0, c0 + cols);
    }
    let sees_all = band.keys(r0, lk).1 >= c0 + cols && band.keys(r0 + full - 1, lk).0 <= c0;
    let n = if sees_all {
        full
    } else {
        CAUSAL_ROWS.min(rows)
    };
    let k0 = band.keys(r0, lk).0.clamp(c0, c0 + cols);
    let k1 = band.keys(r0 + n - 1, lk).1.clamp(k0, c0 + cols);
    (n, k0, k1)
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
    let mut tasks: Vec<Vec<QueryBlock<T>>> = Vec::new();
    // Segments of a few rows (decoding) that share a key/value segment (grouped-query heads)
    // go through it together, each key tile read from memory once for all of them, in groups
    // small enough to leave every thread several tasks.
    let few_segs = g.q_segs.iter().filter(|s| s.len <= FEW_ROWS).count();
    let want = TASKS_PER_THREAD * rayon::current_num_threads();
    let group = few_segs.div_ceil(want).max(1);
    let mut open: Option<(usize, usize)> = None;
    for ((seg, mut o), mut l) in g.q_segs.iter().zip(outs).zip(lses) {
        if seg.len <= FEW_ROWS {
            let blk = QueryBlock {
                seg,
                r0: 0,
                out: o,
                lse: l,
            };
            match open {
                Some((kv, n)) if kv == seg.kv && n < group => {
                    tasks.last_mut().expect("an open task").push(blk);
                    open = Some((kv, n + 1));
                }
                _ => {
                    tasks.push(vec![blk]);
                    open = Some((seg.kv, 1));
                }
            }
            continue;
        }
        open = None;
        for r0 in (0..seg.len).step_by(block) {
            let rows = block.min(seg.len - r0);
            let (o_tile, o_rest) = o.split_at_mut(rows * g.ev);
            let (l_tile, l_rest) = l.split_at_mut(rows);
            tasks.push(vec![QueryBlock {
                seg,
                r0,
                out: o_tile,
                lse: l_tile,
            }]);
            (o, l) = (o_rest, l_rest);
        }
    }
    tasks
        .into_par_iter()
        .for_each_init(Scratch::default, |scratch, blocks| {
            forward_task(g, src, p, blocks, scratch)
        });
    lse
}

/// Rows `[r0, r0 + lse.len())` of query segment `seg`, with their output rows and logsumexps.
struct QueryBlock<'a, T> {
    seg: &'a QSeg,
    r0: usize,
    out: &'a mut [T],
    lse: &'a mut [f32],
}

/// Buffers a forward task reuses.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    /// Each query block's output rows in f32, written to the output once at the end.
    o: Vec<Vec<f32>>,
    /// Each query block's rows, converted (f16, bf16 inputs).
    q: Vec<Vec<f32>>,
    /// The key tile and the value tile, converted (f16, bf16 inputs).
    k: Vec<f32>,
    v: Vec<f32>,
    kt: Vec<f32>,
    /// Key or value rows of a few-row task, converted (f16 inputs).
    few_rows: Vec<f32>,
    keep: Vec<f32>,
    /// Each row's output rescaling of the current key tile.
    alpha: Vec<f32>,
    /// Each row's largest score in the current key tile (from `simd::cap_bias_rows`).
    row_max: Vec<f32>,
    /// The probabilities as bf16 pairs (bf16 products).
    #[cfg(target_arch = "x86_64")]
    probs: Vec<f32>,
}

/// The key and value tiles of a task of more than a few rows: f32, or bf16 pairs for
/// `gemm_bf16_pairs` (`bf16_pairs`: keys transposed by pairs along the head dimension, values by
/// pairs of rows).
enum Tiles<'a> {
    F32 {
        kt: MatRef<'a>,
        v: MatRef<'a>,
    },
    #[cfg(target_arch = "x86_64")]
    Bf16 {
        kt: MatRef<'a>,
        v: MatRef<'a>,
    },
}

/// Query blocks through every key tile they can see: one block of many rows, or several blocks
/// of a few rows each that read the same key/value segment (decoding grouped-query heads), tile
/// by tile so that each tile is read from memory once for all of them.
fn forward_task<T: OutElem>(
    g: &Geometry,
    src: &Sources,
    p: &Params,
    mut blocks: Vec<QueryBlock<T>>,
    scratch: &mut Scratch,
) {
    let (e, ev) = (g.e, g.ev);
    let kv = &g.kv_segs[blocks[0].seg.kv];
    // A task of a few rows (decoding one token against a KV cache) reads each key once: dot
    // products with the key rows where they are cost less than transposing the key tile.
    let few = blocks.iter().all(|b| b.lse.len() <= FEW_ROWS);
    assert!(
        (few || blocks.len() == 1) && blocks.iter().all(|b| b.seg.kv == blocks[0].seg.kv),
        "forward task: several blocks must be few-row blocks of one key/value segment"
    );
    // The keys any row of the task sees: the band's bounds grow with the row.
    let kstart = blocks.iter().map(|b| b.seg.band.keys(b.r0, kv.len).0).min();
    let kend = blocks
        .iter()
        .map(|b| b.seg.band.keys(b.r0 + b.lse.len() - 1, kv.len).1)
        .max();
    let (kstart, kend) = (kstart.unwrap_or(0), kend.unwrap_or(0));
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
        row_max,
        #[cfg(target_arch = "x86_64")]
        probs,
    } = scratch;
    scores.resize(FWD_ROWS.max(CAUSAL_ROWS) * BK, 0.0);
    keep.resize(BK, 0.0);
    alpha.resize(FWD_ROWS.max(CAUSAL_ROWS), 0.0);
    row_max.resize(FWD_ROWS.max(CAUSAL_ROWS), 0.0);
    o.resize_with(blocks.len(), Vec::new);
    q.resize_with(blocks.len(), Vec::new);
    // bf16 inputs on a CPU with AVX512_BF16: products on bf16 pairs (`vdpbf16ps`, twice the f32
    // FMA's work per instruction), the probabilities rounded to bf16 for `p·v` as PyTorch's CPU
    // kernel does.
    #[cfg(target_arch = "x86_64")]
    let bf16 = bf16_pairs::storage(src.q, src.k, src.v).filter(|_| !few);
    #[cfg(not(target_arch = "x86_64"))]
    let bf16: Option<()> = None;
    // The f32 path multiplies the key tile as it transposes it, which spares the score tiles a
    // multiply each. Without a transform of the scores (soft cap, ALiBi, mask), by `scale·log₂e`,
    // so that the scores come out in the base-2 units of the softmax, which then subtracts where
    // it would multiply-add; with the soft cap by its `product_scale`; with ALiBi alone by
    // `scale·log₂e` as well; with a mask by the scale, which its transform then leaves out
    // (`p_f32`). (A task of several blocks is a few-row one, which builds no key tile.)
    let plain = !transforms_scores(src, p, blocks[0].seg);
    // The soft cap and ALiBi without a mask take one pass that also finds the rows' maxima, in
    // base 2 (`simd::cap_bias_rows`); the bf16 and few-row products then carry `scale·log₂e`
    // for ALiBi alone too.
    let fused = !plain && src.mask.is_none();
    let (kt_factor, p_f32) = match p.softcap {
        _ if plain || (fused && p.softcap.is_none()) => (p.scale * LOG2_E, *p),
        Some(_) => (product_scale(p), *p),
        None => (p.scale, Params { scale: 1.0, ..*p }),
    };
    let mult = if fused && p.softcap.is_none() {
        p.scale * LOG2_E
    } else {
        product_scale(p)
    };
    // Each block's running maxima and sums, output rows and query rows.
    let mut state: Vec<_> = blocks
        .iter()
        .zip(o.iter_mut())
        .zip(q.iter_mut())
        .map(|((b, o), q)| {
            let rows = b.lse.len();
            o.clear();
            o.resize(rows * ev, 0.0);
            let q_off = b.seg.q + b.r0 * g.q_rs;
            let q_rows = match bf16 {
                #[cfg(target_arch = "x86_64")]
                Some((qd, _, _)) => bf16_pairs::along_rows(qd, q_off, rows, e, g.q_rs, q),
                _ => src.q.rows(q_off, rows, e, g.q_rs, q),
            };
            (vec![f32::NEG_INFINITY; rows], vec![0f32; rows], o, q_rows)
        })
        .collect();
    let mut c0 = kstart;
    while c0 < kend {
        // A tile never crosses a block of a paged cache, so its rows are evenly strided.
        let cols = BK.min(kend - c0).min(g.run_end(kv, c0) - c0);
        let (k_tile, v_tile) = g.kv_row(kv, c0);
        // Few rows read keys and values where they are (`Src::dots`, `Src::accumulate`).
        let tiles = match bf16 {
            _ if few => None,
            #[cfg(target_arch = "x86_64")]
            Some((_, kd, vd)) => Some(Tiles::Bf16 {
                kt: bf16_pairs::keys_t(kd, k_tile, cols, e, g.k_rs, k, kt),
                v: bf16_pairs::across_rows(vd, v_tile, cols, ev, g.v_rs, v),
            }),
            _ => Some(Tiles::F32 {
                kt: transpose_scaled_into(src.k.rows(k_tile, cols, e, g.k_rs, k), kt_factor, kt),
                v: src.v.rows(v_tile, cols, ev, g.v_rs, v),
            }),
        };
        // The next tile's key and value rows, asked of the caches a few rows per block of
        // this tile, so that its transpose and products find them there.
        let next = (tiles.is_some() && c0 + cols < kend).then(|| {
            let n0 = c0 + cols;
            let (k_off, v_off) = g.kv_row(kv, n0);
            (k_off, v_off, BK.min(kend - n0).min(g.run_end(kv, n0) - n0))
        });
        let mut prefetched = 0;
        for (b, (m, l, o, q_rows)) in blocks.iter().zip(state.iter_mut()) {
            let (seg, r0, rows) = (b.seg, b.r0, b.lse.len());
            let mut s0 = 0;
            while s0 < rows {
                if let Some((k_off, v_off, n)) = next {
                    let r = PREFETCH_ROWS.min(n - prefetched);
                    src.k.prefetch(k_off + prefetched * g.k_rs, r, e, g.k_rs);
                    src.v.prefetch(v_off + prefetched * g.v_rs, r, ev, g.v_rs);
                    prefetched += r;
                }
                // Blocks are FWD_ROWS long where every row sees the whole tile and short where
                // the band cuts it; only the keys `[k0, k1)` some row of the block sees are
                // computed.
                let (srows, k0, k1) =
                    sub_block(seg, kv.len, r0 + s0, rows - s0, (c0, cols), FWD_ROWS);
                let next = s0 + srows;
                let scols = k1 - k0;
                if scols == 0 {
                    s0 = next;
                    continue;
                }
                let (k_off, v_off) = g.kv_row(kv, k0);
                let q = q_rows.rows_from(s0, srows);
                let s = &mut scores[..srows * scols];
                match &tiles {
                    Some(Tiles::F32 { kt, .. }) => {
                        // (The key tile holds the multiplier.)
                        let kt = kt.cols_from(k0 - c0, scols);
                        gemm(s, scols, q, kt, false, 1.0)
                    }
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `Tiles::Bf16` is built only where `bf16_pairs::available`.
                    Some(Tiles::Bf16 { kt, .. }) => unsafe {
                        let kt = kt.cols_from(k0 - c0, scols);
                        gemm_bf16_pairs(s, scols, q, kt, false, mult)
                    },
                    None => {
                        for (i, s_row) in s.chunks_exact_mut(scols).enumerate() {
                            let q_row = &q.data[i * q.rs..i * q.rs + e];
                            src.k.dots(k_off, g.k_rs, q_row, s_row, few_rows);
                            if mult != 1.0 {
                                simd::scale(s_row, mult);
                            }
                        }
                    }
                }
                let (row, lk) = (r0 + s0, kv.len);
                let (mul, known_max) = if fused {
                    // Row `row + i`'s keys among the tile's columns `[k0, k1)`.
                    let band = |i: usize| tile_keys(seg, row + i, lk, k0);
                    let diag0 = tile_diag(seg, row, k0);
                    let alibi = (seg.slope != 0.0).then_some((seg.slope * LOG2_E, diag0));
                    let cap = p.softcap.map(|c| c * LOG2_E);
                    let rm = &mut row_max[..srows];
                    simd::cap_bias_rows(s, scols, cap, alibi, band, rm);
                    (1.0, Some(&row_max[..srows]))
                } else {
                    let mul = match &tiles {
                        Some(Tiles::F32 { .. }) => {
                            let mul =
                                prepare_scores(g, seg, src, &p_f32, row, k0, lk, s, scols, None);
                            if plain {
                                1.0
                            } else {
                                mul * LOG2_E
                            }
                        }
                        _ => prepare_scores(g, seg, src, p, row, k0, lk, s, scols, None) * LOG2_E,
                    };
                    (mul, None)
                };
                let sub = s0..s0 + srows;
                let alpha = &mut alpha[..srows];
                let (m, l) = (&mut m[sub.clone()], &mut l[sub]);
                // Value pairs start at an even key of the tile: an odd first key gets a zero
                // probability before it.
                let lead = (k0 - c0) % 2;
                // Without dropout, the bf16 products' probabilities are rounded to bf16 pairs
                // by the softmax itself.
                #[cfg(target_arch = "x86_64")]
                let rounded: Option<MatRef> = match &tiles {
                    Some(Tiles::Bf16 { .. }) if p.dropout.is_none() => {
                        let mut pr = bf16_pairs::ProbRows::new(probs, srows, scols, lead);
                        // SAFETY: a `ProbRows` exists only where `bf16_pairs::available`, which
                        // implies AVX-512F.
                        unsafe {
                            softmax_avx512::online_softmax_rows(
                                s,
                                scols,
                                mul,
                                known_max,
                                m,
                                l,
                                alpha,
                                Some(&mut pr),
                            )
                        };
                        Some(pr.into_matrix())
                    }
                    _ => None,
                };
                #[cfg(not(target_arch = "x86_64"))]
                let rounded: Option<MatRef> = None;
                if rounded.is_none() {
                    simd::online_softmax_rows(s, scols, mul, known_max, m, l, alpha);
                }
                simd::scale_rows(&mut o[s0 * ev..(s0 + srows) * ev], ev, alpha);
                if let Some(d) = &p.dropout {
                    for (i, row) in s.chunks_exact_mut(scols).enumerate() {
                        let keep = &mut keep[..scols];
                        d.mask.fill_row(seg.stream, r0 + s0 + i, k0, keep);
                        simd::scale(keep, d.keep_scale());
                        simd::mul(row, keep);
                    }
                }
                let o_sub = &mut o[s0 * ev..(s0 + srows) * ev];
                match &tiles {
                    Some(Tiles::F32 { v, .. }) => {
                        let v = v.rows_from(k0 - c0, scols);
                        let probs = MatRef::rows(s, srows, scols, scols);
                        gemm(o_sub, ev, probs, v, true, 1.0)
                    }
                    #[cfg(target_arch = "x86_64")]
                    Some(Tiles::Bf16 { v, .. }) => {
                        let pw = match rounded {
                            Some(pw) => pw,
                            None => bf16_pairs::along_rows_f32(s, scols, lead, probs),
                        };
                        let v = v.rows_from((k0 - c0) / 2, pw.cols);
                        // SAFETY: `Tiles::Bf16` is built only where `bf16_pairs::available`.
                        unsafe { gemm_bf16_pairs(o_sub, ev, pw, v, true, 1.0) }
                    }
                    None => {
                        for (p_row, o_row) in s.chunks_exact(scols).zip(o_sub.chunks_exact_mut(ev))
                        {
                            src.v.accumulate(v_off, g.v_rs, p_row, o_row, few_rows);
                        }
                    }
                }
                s0 = next;
            }
        }
        c0 += cols;
    }
    for (b, (m, l, o, _)) in blocks.iter_mut().zip(state) {
        for i in 0..b.lse.len() {
            let row = &mut o[i * ev..(i + 1) * ev];
            let out = &mut b.out[i * ev..(i + 1) * ev];
            if l[i] > 0.0 {
                T::store_scaled(row, 1.0 / l[i], out);
                b.lse[i] = m[i] * LN_2 + l[i].ln();
            } else {
                row.fill(0.0);
                T::store(row, out);
                b.lse[i] = f32::INFINITY;
            }
        }
    }
}
