//! Where each attention problem lives in the (possibly strided) q, k, v buffers: the segment
//! tables that both the CPU kernels and the CUDA kernels walk.
//!
//! A call is a list of query segments (one per batch·head, or per packed sequence·head), each
//! attending one key/value segment. Several query segments share a key/value segment under
//! grouped-query attention. Outputs (o, lse, dq, dk, dv) are contiguous "row spaces": a segment's
//! rows start at its `row0`.

use std::ops::Range;

use candle_core::{bail, Layout, Result};

use crate::config::{Band, Bounds, Varlen};

/// One (batch, head) query block.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct QSeg {
    /// Element offset of row 0 in q's storage.
    pub q: usize,
    /// First row in the contiguous output row space (o, lse, dq).
    pub row0: usize,
    pub len: usize,
    /// Index of the key/value segment it attends.
    pub kv: usize,
    /// Dropout stream: batch·heads + head.
    pub stream: usize,
    /// Element offset of row 0 of its mask block (0 without a mask).
    pub mask: usize,
    /// Keys each row sees (causal mask, sliding window).
    pub band: Bounds,
    /// ALiBi slope of the segment's head (0 without ALiBi) and the diagonal it measures the
    /// distance from: `-slope·|i + diag - j|` is added to the scaled score of row `i`, key `j`.
    pub slope: f32,
    pub diag: isize,
}

/// One (batch, head) key/value block and the query segments that read it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct KvSeg {
    pub k: usize,
    pub v: usize,
    /// First row in the contiguous dk/dv row space.
    pub row0: usize,
    pub len: usize,
    pub members: Range<usize>,
    /// With a paged cache: the entries of [`Pages::blocks`] that hold this segment's keys.
    pub pages: Option<Range<usize>>,
}

/// The query segments of packed sequence `s`, one per query head: queries `[q0, q0 + lq)` of q
/// `(hq, total_q, E)` against the sequence's `lk` keys (kv heads `hkv`), as the packed and paged
/// layouts both lay them out.
fn packed_q_segs<'a>(
    q: &'a Layout,
    (hq, hkv, total_q): (usize, usize, usize),
    (s, q0, lq, lk): (usize, usize, usize, usize),
    band: Option<Band>,
    alibi: Option<&'a [f32]>,
) -> impl Iterator<Item = QSeg> + 'a {
    let group = hq / hkv;
    (0..hq).map(move |h| QSeg {
        q: q.start_offset() + h * q.stride()[0] + q0 * q.stride()[1],
        row0: h * total_q + q0,
        len: lq,
        kv: s * hkv + h / group,
        stream: s * hq + h,
        mask: 0,
        band: band.map_or_else(Bounds::default, |b| b.offsets(lq, lk)),
        slope: alibi.map_or(0.0, |a| a[h]),
        diag: lk as isize - lq as isize,
    })
}

/// Keys and values in fixed-size blocks of a cache (paged KV): key `t` of a segment is row
/// `t % page` of block `blocks[pages.start + t / page]`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Pages {
    pub page: usize,
    /// Block strides of k and v.
    pub k_bs: usize,
    pub v_bs: usize,
    pub blocks: Vec<usize>,
}

/// The whole call's layout.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Geometry {
    pub q_segs: Vec<QSeg>,
    pub kv_segs: Vec<KvSeg>,
    pub e: usize,
    pub ev: usize,
    /// Row strides of q, k and v in their storage (the last dim has stride 1).
    pub q_rs: usize,
    pub k_rs: usize,
    pub v_rs: usize,
    /// Row and column strides of the mask, when there is one.
    pub mask_rs: usize,
    pub mask_cs: usize,
    /// Rows of the contiguous q-shaped (o, dq) and k-shaped (dk, dv) spaces.
    pub q_rows: usize,
    pub kv_rows: usize,
    /// Keys and values in the blocks of a paged cache (the forward reads them there; the backward
    /// gathers them into packed rows, see `Fused::paged_backward`).
    pub pages: Option<Pages>,
}

/// Offset of the element at multi-index `idx` (row-major over `dims`) with `strides`.
fn offset_of(mut n: usize, dims: &[usize], strides: &[usize]) -> usize {
    let mut off = 0;
    for (d, s) in dims.iter().zip(strides).rev() {
        if *d > 0 {
            off += (n % d) * s;
            n /= d;
        }
    }
    off
}

fn last_dim_unit(name: &str, l: &Layout) -> Result<()> {
    let r = l.dims().len();
    if l.dims()[r - 1] > 1 && l.stride()[r - 1] != 1 {
        bail!(
            "attention: {name} must have a contiguous last dim (stride 1), got strides {:?}",
            l.stride()
        );
    }
    Ok(())
}

fn check_slopes(alibi: Option<&[f32]>, hq: usize) -> Result<()> {
    match alibi {
        Some(a) if a.len() != hq => {
            bail!("attention: {} ALiBi slopes for {hq} query heads", a.len())
        }
        _ => Ok(()),
    }
}

impl Geometry {
    /// Dense `(..., H, L, D)` inputs: q `(..., Hq, Lq, E)`, k `(..., Hkv, Lk, E)`, v `(..., Hkv, Lk, Ev)`,
    /// and a mask already broadcast to `(..., Hq, Lq, Lk)`.
    pub fn dense(
        q: &Layout,
        k: &Layout,
        v: &Layout,
        mask: Option<&Layout>,
        band: Option<Band>,
        alibi: Option<&[f32]>,
    ) -> Result<Self> {
        for (name, l) in [("query", q), ("key", k), ("value", v)] {
            last_dim_unit(name, l)?;
        }
        let r = q.dims().len();
        let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
        let (lq, e, lk, ev) = (qd[r - 2], qd[r - 1], kd[r - 2], vd[r - 1]);
        let (hq, hkv) = (qd[r - 3], kd[r - 3]);
        if k.dims().len() != r
            || v.dims().len() != r
            || hkv == 0
            || !hq.is_multiple_of(hkv)
            || kd[r - 1] != e
        {
            bail!("attention: inconsistent shapes q {qd:?}, k {kd:?}, v {vd:?}");
        }
        check_slopes(alibi, hq)?;
        let group = hq / hkv;
        let n_q: usize = qd[..r - 2].iter().product();
        let n_kv: usize = kd[..r - 2].iter().product();
        let bounds = band.map_or_else(Bounds::default, |b| b.offsets(lq, lk));
        let (mask_rs, mask_cs) = match mask {
            Some(m) => (m.stride()[r - 2], m.stride()[r - 1]),
            None => (0, 0),
        };
        let q_segs = (0..n_q)
            .map(|n| QSeg {
                q: q.start_offset() + offset_of(n, &qd[..r - 2], &q.stride()[..r - 2]),
                row0: n * lq,
                len: lq,
                kv: (n / hq) * hkv + (n % hq) / group,
                stream: n,
                mask: mask.map_or(0, |m| {
                    m.start_offset() + offset_of(n, &qd[..r - 2], &m.stride()[..r - 2])
                }),
                band: bounds,
                slope: alibi.map_or(0.0, |a| a[n % hq]),
                diag: lk as isize - lq as isize,
            })
            .collect();
        let kv_segs = (0..n_kv)
            .map(|n| KvSeg {
                k: k.start_offset() + offset_of(n, &kd[..r - 2], &k.stride()[..r - 2]),
                v: v.start_offset() + offset_of(n, &vd[..r - 2], &v.stride()[..r - 2]),
                row0: n * lk,
                len: lk,
                members: (n / hkv) * hq + (n % hkv) * group..(n / hkv) * hq + (n % hkv + 1) * group,
                pages: None,
            })
            .collect();
        Ok(Self {
            q_segs,
            kv_segs,
            e,
            ev,
            q_rs: q.stride()[r - 2],
            k_rs: k.stride()[r - 2],
            v_rs: v.stride()[r - 2],
            mask_rs,
            mask_cs,
            q_rows: n_q * lq,
            kv_rows: n_kv * lk,
            pages: None,
        })
    }

    /// Packed inputs seen head-major: q `(Hq, total_q, E)`, k `(Hkv, total_k, E)`,
    /// v `(Hkv, total_k, Ev)` (views of the `(total, H, D)` tensors), split by `varlen`.
    pub fn packed(
        q: &Layout,
        k: &Layout,
        v: &Layout,
        varlen: &Varlen,
        band: Option<Band>,
        alibi: Option<&[f32]>,
    ) -> Result<Self> {
        for (name, l) in [("query", q), ("key", k), ("value", v)] {
            last_dim_unit(name, l)?;
            if l.dims().len() != 3 {
                bail!(
                    "attention: packed {name} must be (heads, total, dim), got {:?}",
                    l.dims()
                );
            }
        }
        let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
        let (hq, total_q, e) = (qd[0], qd[1], qd[2]);
        let (hkv, total_k, ev) = (kd[0], kd[1], vd[2]);
        if hkv == 0 || !hq.is_multiple_of(hkv) || kd[2] != e || vd[..2] != kd[..2] {
            bail!("attention: inconsistent packed shapes q {qd:?}, k {kd:?}, v {vd:?}");
        }
        let Varlen { cu_q, cu_k } = varlen;
        let b = cu_q.len().saturating_sub(1);
        if cu_k.len() != b + 1 || cu_q.last() > Some(&total_q) || cu_k.last() > Some(&total_k) {
            bail!("attention: cumulative lengths {cu_q:?} / {cu_k:?} do not fit {total_q} / {total_k} packed rows");
        }
        check_slopes(alibi, hq)?;
        let group = hq / hkv;
        let mut q_segs = Vec::with_capacity(b * hq);
        let mut kv_segs = Vec::with_capacity(b * hkv);
        for s in 0..b {
            let (q0, lq) = (cu_q[s], cu_q[s + 1] - cu_q[s]);
            let (k0, lk) = (cu_k[s], cu_k[s + 1] - cu_k[s]);
            q_segs.extend(packed_q_segs(
                q,
                (hq, hkv, total_q),
                (s, q0, lq, lk),
                band,
                alibi,
            ));
            for h in 0..hkv {
                kv_segs.push(KvSeg {
                    k: k.start_offset() + h * k.stride()[0] + k0 * k.stride()[1],
                    v: v.start_offset() + h * v.stride()[0] + k0 * v.stride()[1],
                    row0: h * total_k + k0,
                    len: lk,
                    members: s * hq + h * group..s * hq + (h + 1) * group,
                    pages: None,
                });
            }
        }
        Ok(Self {
            q_segs,
            kv_segs,
            e,
            ev,
            q_rs: q.stride()[1],
            k_rs: k.stride()[1],
            v_rs: v.stride()[1],
            mask_rs: 0,
            mask_cs: 0,
            q_rows: hq * total_q,
            kv_rows: hkv * total_k,
            pages: None,
        })
    }

    /// Packed queries against a paged cache: q `(Hq, total_q, E)` (a view of `(total, H, E)`),
    /// k and v `(num_blocks, page, Hkv, D)`; `blocks[s]` lists the blocks of sequence `s` in
    /// order. Forward only: there is no dk/dv row space for the blocks.
    pub fn paged(
        q: &Layout,
        k: &Layout,
        v: &Layout,
        varlen: &Varlen,
        blocks: &[Vec<usize>],
        band: Option<Band>,
        alibi: Option<&[f32]>,
    ) -> Result<Self> {
        for (name, l, rank) in [("query", q, 3), ("key", k, 4), ("value", v, 4)] {
            last_dim_unit(name, l)?;
            if l.dims().len() != rank {
                bail!(
                    "attention: paged {name} has shape {:?}; expected rank {rank}",
                    l.dims()
                );
            }
        }
        let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
        let (hq, total_q, e) = (qd[0], qd[1], qd[2]);
        let (n_blocks, page, hkv, ev) = (kd[0], kd[1], kd[2], vd[3]);
        if hkv == 0 || !hq.is_multiple_of(hkv) || kd[3] != e || vd[..3] != kd[..3] || page == 0 {
            bail!("attention: inconsistent paged shapes q {qd:?}, k {kd:?}, v {vd:?}");
        }
        check_slopes(alibi, hq)?;
        let Varlen { cu_q, cu_k } = varlen;
        let b = cu_q.len().saturating_sub(1);
        if cu_k.len() != b + 1 || blocks.len() != b || cu_q.last() > Some(&total_q) {
            bail!("attention: paged lengths {cu_q:?} / {cu_k:?} do not fit {total_q} queries and {} block lists", blocks.len());
        }
        let group = hq / hkv;
        let total_k = cu_k[b];
        let mut table = Vec::new();
        let (mut q_segs, mut kv_segs) = (Vec::new(), Vec::new());
        for s in 0..b {
            let (q0, lq) = (cu_q[s], cu_q[s + 1] - cu_q[s]);
            let (k0, lk) = (cu_k[s], cu_k[s + 1] - cu_k[s]);
            let used = &blocks[s][..lk.div_ceil(page).min(blocks[s].len())];
            if used.len() * page < lk || used.iter().any(|&blk| blk >= n_blocks) {
                bail!("attention: the blocks {used:?} of sequence {s} do not hold its {lk} keys in {n_blocks} blocks of {page}");
            }
            let pages = table.len()..table.len() + used.len();
            table.extend_from_slice(used);
            q_segs.extend(packed_q_segs(
                q,
                (hq, hkv, total_q),
                (s, q0, lq, lk),
                band,
                alibi,
            ));
            for h in 0..hkv {
                kv_segs.push(KvSeg {
                    k: k.start_offset() + h * k.stride()[2],
                    v: v.start_offset() + h * v.stride()[2],
                    row0: h * total_k + k0,
                    len: lk,
                    members: s * hq + h * group..s * hq + (h + 1) * group,
                    pages: Some(pages.clone()),
                });
            }
        }
        Ok(Self {
            q_segs,
            kv_segs,
            e,
            ev,
            q_rs: q.stride()[1],
            k_rs: k.stride()[1],
            v_rs: v.stride()[1],
            mask_rs: 0,
            mask_cs: 0,
            q_rows: hq * total_q,
            kv_rows: hkv * total_k,
            pages: Some(Pages {
                page,
                k_bs: k.stride()[0],
                v_bs: v.stride()[0],
                blocks: table,
            }),
        })
    }

    /// Storage offsets of key and value row `t` of segment `kv`.
    #[inline]
    pub fn kv_row(&self, kv: &KvSeg, t: usize) -> (usize, usize) {
        match (&self.pages, &kv.pages) {
            (Some(p), Some(r)) => {
                let blk = p.blocks[r.start + t / p.page];
                let row = t % p.page;
                (
                    kv.k + blk * p.k_bs + row * self.k_rs,
                    kv.v + blk * p.v_bs + row * self.v_rs,
                )
            }
            _ => (kv.k + t * self.k_rs, kv.v + t * self.v_rs),
        }
    }

    /// The end of the run of key rows from `t` on that are evenly strided in storage: the end
    /// of `t`'s block in a paged cache, else the segment's end.
    #[inline]
    pub fn run_end(&self, kv: &KvSeg, t: usize) -> usize {
        match &self.pages {
            Some(p) if kv.pages.is_some() => ((t / p.page + 1) * p.page).min(kv.len),
            _ => kv.len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CausalAlign;
    use candle_core::Shape;

    #[test]
    fn dense_gqa_and_strides() {
        // q (2, 4, 5, 8) seen through a transpose of (2, 5, 4, 8): strides (160, 8, 32, 1).
        let q = Layout::contiguous(Shape::from((2, 5, 4, 8)))
            .transpose(1, 2)
            .unwrap();
        let k = Layout::contiguous(Shape::from((2, 2, 3, 8)));
        let v = Layout::contiguous_with_offset(Shape::from((2, 2, 3, 6)), 10);
        let band = Band::causal(CausalAlign::BottomRight);
        let g = Geometry::dense(&q, &k, &v, None, Some(band), None).unwrap();
        assert_eq!(g.q_segs.len(), 8);
        assert_eq!(g.kv_segs.len(), 4);
        assert_eq!(g.q_rs, 32);
        let s = &g.q_segs[5]; // batch 1, head 1
        assert_eq!((s.q, s.row0, s.kv, s.band.hi), (160 + 8, 25, 2, Some(-2)));
        assert_eq!(g.kv_segs[3].members, 6..8);
        assert_eq!(g.kv_segs[3].v, 10 + 3 * 18);
    }

    #[test]
    fn packed_segments() {
        let q = Layout::contiguous(Shape::from((7, 2, 4)))
            .transpose(0, 1)
            .unwrap();
        let k = Layout::contiguous(Shape::from((9, 1, 4)))
            .transpose(0, 1)
            .unwrap();
        let varlen = Varlen {
            cu_q: vec![0, 3, 7],
            cu_k: vec![0, 5, 9],
        };
        let g = Geometry::packed(&q, &k, &k, &varlen, None, None).unwrap();
        assert_eq!(g.q_segs.len(), 4);
        let s = &g.q_segs[3]; // sequence 1, head 1
        assert_eq!(
            (s.q, s.row0, s.len, s.kv, s.stream),
            (4 + 3 * 8, 7 + 3, 4, 1, 3)
        );
        assert_eq!(g.kv_segs[1].k, 5 * 4);
        assert_eq!(g.kv_segs[1].members, 2..4);
    }
}
