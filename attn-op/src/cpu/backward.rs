//! FlashAttention-2 backward on the CPU. Scores are recomputed tile by tile from the forward's
//! logsumexp; each task owns a range of key tiles of one key/value segment (so dK and dV are
//! written once, without atomics) and accumulates its share of dQ privately; the shares are
//! summed at the end in a fixed order, so results do not depend on scheduling.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::bf16_pairs;
use super::forward::{prepare_scores, product_scale, sub_block, Params, Sources, BK, BQ};
#[cfg(target_arch = "x86_64")]
use super::matmul::gemm_bf16_pairs;
use super::matmul::{gemm, transpose_into, MatRef};
use super::{simd, split_rows};
use crate::geometry::{Geometry, KvSeg};

/// Gradients of q, k and v in the contiguous row spaces of the geometry.
pub(crate) struct Grads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

/// A task: key rows `[c_start, c_end)` of one key/value segment.
struct Task<'a> {
    kv: &'a KvSeg,
    c_start: usize,
    c_end: usize,
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

/// Backward of attention given the output `o` and its gradient `dout` (both contiguous rows of
/// `ev` in the q row space) and the forward's logsumexp.
pub(crate) fn backward(
    g: &Geometry,
    src: &Sources,
    p: &Params,
    o: &[f32],
    dout: &[f32],
    lse: &[f32],
) -> Grads {
    let (e, ev) = (g.e, g.ev);
    // D_i = dO_i · O_i, the softmax-backward row term (dropout does not change it).
    let mut delta = vec![0f32; g.q_rows];
    delta.par_iter_mut().enumerate().for_each(|(r, d)| {
        *d = simd::dot(&dout[r * ev..(r + 1) * ev], &o[r * ev..(r + 1) * ev]);
    });

    let mut dk = vec![0f32; g.kv_rows * e];
    let mut dv = vec![0f32; g.kv_rows * ev];
    let ranges: Vec<_> = g.kv_segs.iter().map(|s| (s.row0, s.len)).collect();
    let dks = split_rows(&mut dk, e, &ranges);
    let dvs = split_rows(&mut dv, ev, &ranges);
    // Enough tasks to keep every thread busy, each a whole number of key tiles.
    let want = (4 * rayon::current_num_threads()).div_ceil(g.kv_segs.len().max(1));
    let mut tasks = Vec::new();
    // Tasks of key/value segment `i` are `tasks[first_task[i]..first_task[i + 1]]`.
    let mut first_task = Vec::with_capacity(g.kv_segs.len() + 1);
    for ((kv, mut dk), mut dv) in g.kv_segs.iter().zip(dks).zip(dvs) {
        first_task.push(tasks.len());
        let tiles = kv.len.div_ceil(BK);
        let per = tiles.div_ceil(want.clamp(1, tiles.max(1))).max(1) * BK;
        let mut c_start = 0;
        while c_start < kv.len {
            let c_end = (c_start + per).min(kv.len);
            let (a, rest_k) = dk.split_at_mut((c_end - c_start) * e);
            let (b, rest_v) = dv.split_at_mut((c_end - c_start) * ev);
            tasks.push(Task {
                kv,
                c_start,
                c_end,
                dk: a,
                dv: b,
            });
            (dk, dv) = (rest_k, rest_v);
            c_start = c_end;
        }
    }
    first_task.push(tasks.len());
    let shares: Vec<Vec<f32>> = tasks
        .into_par_iter()
        .map_init(Scratch::default, |scratch, t| {
            key_range(g, src, p, dout, lse, &delta, t, scratch)
        })
        .collect();

    // dQ of each query segment: the sum of the shares of its key/value segment's tasks, in order.
    let mut dq = vec![0f32; g.q_rows * e];
    let q_ranges: Vec<_> = g.q_segs.iter().map(|s| (s.row0, s.len)).collect();
    split_rows(&mut dq, e, &q_ranges)
        .into_par_iter()
        .zip(&g.q_segs)
        .enumerate()
        .for_each(|(qi, (dq_seg, seg))| {
            let kv = &g.kv_segs[seg.kv];
            let member = qi - kv.members.start;
            let block = seg.len * e;
            // The first share is copied, not added: reading the fresh zero pages of `dq` before
            // writing them would map each from the shared zero page and then copy it on write.
            let seg_shares = &shares[first_task[seg.kv]..first_task[seg.kv + 1]];
            for (i, share) in seg_shares.iter().enumerate() {
                let share = &share[member * block..(member + 1) * block];
                if i == 0 {
                    dq_seg.copy_from_slice(share);
                } else {
                    simd::add(dq_seg, share);
                }
            }
        });
    Grads { dq, dk, dv }
}

/// Tiles a backward task overwrites before reading them, reused by the tasks of a thread.
#[derive(Default)]
struct Scratch {
    /// Probabilities P.
    s: Vec<f32>,
    /// P with dropout applied (only with dropout; otherwise P itself is used).
    pd: Vec<f32>,
    /// dP, then dS.
    dp: Vec<f32>,
    /// The dropout multipliers.
    z: Vec<f32>,
    /// `tanh` of the capped scores (only with a soft cap).
    tanh: Vec<f32>,
    /// Kᵀ and Vᵀ of the key tile.
    k_buf: Vec<f32>,
    v_buf: Vec<f32>,
    /// The key tile, the value tile and a block of query rows, converted (f16, bf16 inputs).
    k_rows: Vec<f32>,
    v_rows: Vec<f32>,
    q_rows: Vec<f32>,
    /// bf16 pairs (`bf16_pairs`): the query block and dO paired across rows, dO along rows, and
    /// one of P, dS paired for the product at hand.
    #[cfg(target_arch = "x86_64")]
    pairs: PairBufs,
}

/// The backward's bf16-pair scratch ([`Scratch::pairs`]).
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct PairBufs {
    q_across: Vec<f32>,
    do_across: Vec<f32>,
    do_along: Vec<f32>,
    ds: Vec<f32>,
}

/// A key tile ready for the products: f32 rows, or for bf16 inputs on a CPU with AVX512_BF16
/// bf16 pairs (`bf16_pairs`; the products run on `vdpbf16ps`, P and dS rounded to bf16 as
/// PyTorch's CPU kernel does for bf16 inputs).
#[derive(Clone, Copy)]
enum KeyTile<'a> {
    /// K (keys × e), Kᵀ and Vᵀ.
    F32 {
        k: MatRef<'a>,
        kt: MatRef<'a>,
        vt: MatRef<'a>,
    },
    /// K paired across keys, Kᵀ and Vᵀ paired along the head dimension, and q's storage.
    #[cfg(target_arch = "x86_64")]
    Bf16 {
        k: MatRef<'a>,
        kt: MatRef<'a>,
        vt: MatRef<'a>,
        q: &'a [half::bf16],
    },
}

/// The operands of one block's products: the key tile's, the block's query rows, and for bf16
/// pairs the query rows and dO paired across rows and dO along them.
#[derive(Clone, Copy)]
enum Ops<'a> {
    F32 {
        q: MatRef<'a>,
        k: MatRef<'a>,
        kt: MatRef<'a>,
        vt: MatRef<'a>,
    },
    #[cfg(target_arch = "x86_64")]
    Bf16 {
        q: MatRef<'a>,
        q_across: MatRef<'a>,
        do_along: MatRef<'a>,
        do_across: MatRef<'a>,
        k: MatRef<'a>,
        kt: MatRef<'a>,
        vt: MatRef<'a>,
    },
}

/// Gradients from key rows `[c_start, c_end)`: fills the task's dK/dV rows and returns its dQ
/// share for every member query segment (`members × len × e`).
#[allow(clippy::too_many_arguments)]
fn key_range(
    g: &Geometry,
    src: &Sources,
    p: &Params,
    dout: &[f32],
    lse: &[f32],
    delta: &[f32],
    t: Task,
    scratch: &mut Scratch,
) -> Vec<f32> {
    let (e, ev) = (g.e, g.ev);
    let kv = t.kv;
    let members = &g.q_segs[kv.members.clone()];
    let lq = members.first().map_or(0, |s| s.len);
    let mut dq = vec![0f32; members.len() * lq * e];
    // Written before the products accumulate into them, for the reason in `backward`.
    t.dk.fill(0.0);
    t.dv.fill(0.0);
    // Tiles of at most BQ rows by the task's widest key tile; Pd and the dropout mask only with
    // dropout. Every tile element a product reads was written first in this task.
    let tile = BQ.min(lq) * BK.min(t.c_end - t.c_start);
    let dropout_tile = if p.dropout.is_some() { tile } else { 0 };
    let cap_tile = if p.softcap.is_some() { tile } else { 0 };
    let Scratch {
        s,
        pd,
        dp,
        z,
        tanh,
        k_buf,
        v_buf,
        k_rows,
        v_rows,
        q_rows,
        #[cfg(target_arch = "x86_64")]
        pairs,
    } = scratch;
    #[cfg(target_arch = "x86_64")]
    let bf16 = bf16_pairs::storage(src.q, src.k, src.v);
    #[cfg(not(target_arch = "x86_64"))]
    let bf16: Option<()> = None;
    for (buf, len) in [
        (&mut *s, tile),
        (&mut *dp, tile),
        (&mut *pd, dropout_tile),
        (&mut *z, dropout_tile),
        (&mut *tanh, cap_tile),
    ] {
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
    }
    for c0 in (t.c_start..t.c_end).step_by(BK) {
        let tile_cols = BK.min(t.c_end - c0);
        let (k_off, v_off) = (kv.k + c0 * g.k_rs, kv.v + c0 * g.v_rs);
        let tile = match bf16 {
            #[cfg(target_arch = "x86_64")]
            Some((qd, kd, vd)) => KeyTile::Bf16 {
                k: bf16_pairs::across_rows(kd, k_off, tile_cols, e, g.k_rs, k_rows),
                kt: bf16_pairs::keys_t(kd, k_off, tile_cols, e, g.k_rs, v_rows, k_buf),
                vt: bf16_pairs::keys_t(vd, v_off, tile_cols, ev, g.v_rs, v_rows, v_buf),
                q: qd,
            },
            _ => {
                let k = src.k.rows(k_off, tile_cols, e, g.k_rs, k_rows);
                let v = src.v.rows(v_off, tile_cols, ev, g.v_rs, v_rows);
                // Kᵀ and Vᵀ with contiguous rows, the right-hand sides of S = QKᵀ, dP = dO Vᵀ.
                KeyTile::F32 {
                    k,
                    kt: transpose_into(k, k_buf),
                    vt: transpose_into(v, v_buf),
                }
            }
        };
        let dk_tile = &mut t.dk[(c0 - t.c_start) * e..(c0 - t.c_start + tile_cols) * e];
        let dv_tile = &mut t.dv[(c0 - t.c_start) * ev..(c0 - t.c_start + tile_cols) * ev];
        for (mi, seg) in members.iter().enumerate() {
            // Only the rows `[first_row, end_row)` see keys of this tile.
            let first_row = seg.band.rows(c0, seg.len).0;
            let end_row = seg.band.rows(c0 + tile_cols - 1, seg.len).1;
            let mut r0 = first_row;
            while r0 < end_row {
                // Blocks are BQ rows where every row sees the whole tile, so the dK and dV
                // products run over BQ rows, and short where the band cuts the tile, so most of
                // its masked part is skipped; only the keys `[k0, k1)` the block sees count.
                let (rows, k0, k1) = sub_block(seg, kv.len, r0, end_row - r0, (c0, tile_cols), BQ);
                let next = r0 + rows;
                let cols = k1 - k0;
                if cols == 0 {
                    r0 = next;
                    continue;
                }
                let at = k0 - c0;
                let dk_t = &mut dk_tile[at * e..(at + cols) * e];
                let dv_t = &mut dv_tile[at * ev..(at + cols) * ev];
                let q_off = seg.q + r0 * g.q_rs;
                let row0 = seg.row0 + r0;
                let dot = MatRef::rows(&dout[row0 * ev..(row0 + rows) * ev], rows, ev, ev);
                let ops = match tile {
                    KeyTile::F32 { k, kt, vt } => Ops::F32 {
                        q: src.q.rows(q_off, rows, e, g.q_rs, q_rows),
                        k,
                        kt,
                        vt,
                    },
                    #[cfg(target_arch = "x86_64")]
                    KeyTile::Bf16 { k, kt, vt, q: qd } => Ops::Bf16 {
                        q: bf16_pairs::along_rows(qd, q_off, rows, e, g.q_rs, q_rows),
                        q_across: bf16_pairs::across_rows(
                            qd,
                            q_off,
                            rows,
                            e,
                            g.q_rs,
                            &mut pairs.q_across,
                        ),
                        do_along: bf16_pairs::along_rows_f32(dot.data, ev, 0, &mut pairs.do_along),
                        do_across: bf16_pairs::across_rows_f32(
                            dot.data,
                            rows,
                            ev,
                            &mut pairs.do_across,
                        ),
                        k,
                        kt,
                        vt,
                    },
                };
                let n = rows * cols;
                let n_dropout = if p.dropout.is_some() { n } else { 0 };
                let n_cap = if p.softcap.is_some() { n } else { 0 };
                let (s, dp) = (&mut s[..n], &mut dp[..n]);
                let (pd, z) = (&mut pd[..n_dropout], &mut z[..n_dropout]);
                let tanh = &mut tanh[..n_cap];
                // P = exp(scores - lse); Pd = P with dropout applied.
                match ops {
                    Ops::F32 { q, kt, .. } => {
                        gemm(s, cols, q, kt.cols_from(at, cols), false, product_scale(p))
                    }
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `Ops::Bf16` comes from a `KeyTile::Bf16`, built only where
                    // `bf16_pairs::available`.
                    Ops::Bf16 { q, kt, .. } => unsafe {
                        let kt = kt.cols_from(at, cols);
                        gemm_bf16_pairs(s, cols, q, kt, false, product_scale(p))
                    },
                }
                let t = p.softcap.is_some().then_some(&mut *tanh);
                let mul = prepare_scores(g, seg, src, p, r0, k0, kv.len, s, cols, t);
                simd::exp_rows(s, cols, mul, &lse[row0..row0 + rows]);
                if let Some(d) = &p.dropout {
                    for (i, row) in s.chunks_exact(cols).enumerate() {
                        let pd_row = &mut pd[i * cols..(i + 1) * cols];
                        pd_row.copy_from_slice(row);
                        let z_row = &mut z[i * cols..(i + 1) * cols];
                        d.mask.fill_row(seg.stream, r0 + i, k0, z_row);
                        simd::scale(z_row, d.keep_scale());
                        simd::mul(pd_row, z_row);
                    }
                }
                // dV += Pdᵀ dO (Pd = P without dropout)
                let pd = if p.dropout.is_some() { &*pd } else { &*s };
                match ops {
                    Ops::F32 { vt, .. } => {
                        let pd = MatRef::rows(pd, rows, cols, cols);
                        gemm(dv_t, ev, pd.t(), dot, true, 1.0);
                        // dP = dO Vᵀ
                        gemm(dp, cols, dot, vt.cols_from(at, cols), false, 1.0);
                    }
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    Ops::Bf16 {
                        vt,
                        do_along,
                        do_across,
                        ..
                    } => unsafe {
                        let pd = bf16_pairs::across_rows_f32(pd, rows, cols, &mut pairs.ds);
                        gemm_bf16_pairs(dv_t, ev, pd.t(), do_across, true, 1.0);
                        let vt = vt.cols_from(at, cols);
                        gemm_bf16_pairs(dp, cols, do_along, vt, false, 1.0);
                    },
                }
                // (∘ dropout), dS = P ∘ (dP - D)
                if p.dropout.is_some() {
                    for (dp_row, z_row) in dp.chunks_exact_mut(cols).zip(z.chunks_exact(cols)) {
                        simd::mul(dp_row, z_row);
                    }
                }
                simd::softmax_bwd_rows(s, dp, cols, &delta[row0..row0 + rows]);
                // Through the soft cap: d(c·tanh(scale·x / c))/dx = scale·(1 - tanh²).
                if p.softcap.is_some() {
                    simd::tanh_grad(dp, tanh);
                }
                let dq_rows = &mut dq[(mi * lq + r0) * e..(mi * lq + r0 + rows) * e];
                // dK += scale · dSᵀ Q, dQ += scale · dS K
                match ops {
                    Ops::F32 { q, k, .. } => {
                        let ds = MatRef::rows(dp, rows, cols, cols);
                        gemm(dk_t, e, ds.t(), q, true, p.scale);
                        gemm(dq_rows, e, ds, k.rows_from(at, cols), true, p.scale);
                    }
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    Ops::Bf16 { q_across, k, .. } => unsafe {
                        let ds = bf16_pairs::across_rows_f32(dp, rows, cols, &mut pairs.ds);
                        gemm_bf16_pairs(dk_t, e, ds.t(), q_across, true, p.scale);
                        // Key pairs start at an even key of the tile: an odd first key gets a
                        // zero before it.
                        let ds = bf16_pairs::along_rows_f32(dp, cols, at % 2, &mut pairs.ds);
                        let k = k.rows_from(at / 2, ds.cols);
                        gemm_bf16_pairs(dq_rows, e, ds, k, true, p.scale);
                    },
                }
                r0 = next;
            }
        }
    }
    dq
}
