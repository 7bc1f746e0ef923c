//! What the kernels receive besides the tensors: the scalar parameter block and the segment
//! tables, both built from a [`Geometry`] and an [`AttnConfig`].

use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::{bail, Result};

use crate::config::AttnConfig;
use crate::cpu::geometry::Geometry;

/// The scalar launch parameters; mirrors `struct AttnParams` in `kernels/src/attn_common.cuh`
/// field by field (8-byte fields first, so neither side has padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct KernelParams {
    pub q_rs: i64,
    pub k_rs: i64,
    pub v_rs: i64,
    pub mask_rs: i64,
    pub mask_cs: i64,
    pub e: i32,
    pub ev: i32,
    pub n_qseg: i32,
    pub n_kvseg: i32,
    pub tiles: i32,
    pub mask_kind: i32,
    pub scale: f32,
    pub keep_scale: f32,
    pub seed_lo: u32,
    pub seed_hi: u32,
    pub threshold: u32,
    pub dropout: i32,
    pub vec_ok: i32,
    pub pad: i32,
}

const _: () = assert!(std::mem::size_of::<KernelParams>() == 96);

// SAFETY: plain `#[repr(C)]` data of integers and floats, passed to kernels by value.
unsafe impl DeviceRepr for KernelParams {}

/// How the kernels read the mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MaskKind {
    None = 0,
    Bias = 1,
    Bool = 2,
}

/// Int64 fields per query segment (`QSEG_FIELDS` in the kernels).
pub(crate) const QSEG_FIELDS: usize = 8;
/// Int64 fields per key/value segment (`KVSEG_FIELDS` in the kernels).
pub(crate) const KVSEG_FIELDS: usize = 6;
/// The largest grid.y the kernels are launched with.
const MAX_GRID_Y: usize = 65_535;

fn i32_of(what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).or_else(|_| {
        bail!(
            "attention (CUDA): {what} = {x} is above the kernels' limit {}",
            i32::MAX
        )
    })
}

fn i64_of(x: usize) -> Result<i64> {
    i64::try_from(x).or_else(|_| bail!("attention (CUDA): offset {x} does not fit in 64 bits"))
}

/// The segment tables: `QSEG_FIELDS` int64 per query segment, `KVSEG_FIELDS` per key/value one.
pub(crate) fn segment_tables(g: &Geometry) -> Result<(Vec<i64>, Vec<i64>)> {
    let mut qs = Vec::with_capacity(g.q_segs.len() * QSEG_FIELDS);
    for s in &g.q_segs {
        i32_of("query length", s.len)?;
        i32_of("dropout stream", s.stream)?;
        let coff = s.causal.unwrap_or(0);
        qs.extend_from_slice(&[
            i64_of(s.q)?,
            i64_of(s.row0)?,
            i64_of(s.len)?,
            i64_of(s.kv)?,
            i64_of(s.stream)?,
            i64_of(s.mask)?,
            coff as i64,
            i64::from(s.causal.is_some()),
        ]);
    }
    let mut ks = Vec::with_capacity(g.kv_segs.len() * KVSEG_FIELDS);
    for s in &g.kv_segs {
        i32_of("key length", s.len)?;
        i32_of("query segment index", s.members.end)?;
        ks.extend_from_slice(&[
            i64_of(s.k)?,
            i64_of(s.v)?,
            i64_of(s.row0)?,
            i64_of(s.len)?,
            i64_of(s.members.start)?,
            i64_of(s.members.end)?,
        ]);
    }
    Ok((qs, ks))
}

/// Tiles of `rows` rows needed by the longest segment: the grid's y extent.
pub(crate) fn tiles(longest: usize, rows: usize) -> Result<usize> {
    let t = longest.div_ceil(rows);
    if t > MAX_GRID_Y {
        bail!(
            "attention (CUDA): a sequence of {longest} rows needs {t} tiles of {rows}, above the grid limit {MAX_GRID_Y}"
        );
    }
    Ok(t)
}

/// Whether every row start of q, k and v is 16-byte aligned for 2-byte elements (offsets and
/// strides multiples of 8 elements), so tiles can move with 16-byte copies.
pub(crate) fn rows_aligned(g: &Geometry) -> bool {
    let a = |x: usize| x.is_multiple_of(8);
    a(g.e)
        && a(g.ev)
        && a(g.q_rs)
        && a(g.k_rs)
        && a(g.v_rs)
        && g.q_segs.iter().all(|s| a(s.q))
        && g.kv_segs.iter().all(|s| a(s.k) && a(s.v))
}

/// The parameter block of one call; `tiles` is set per launch.
pub(crate) fn kernel_params(
    cfg: &AttnConfig,
    g: &Geometry,
    mask: MaskKind,
) -> Result<KernelParams> {
    let (seed, threshold, keep_scale) = match &cfg.dropout {
        Some(d) => (d.mask.key(), d.mask.threshold(), d.keep_scale()),
        None => ([0, 0], 0, 1.0),
    };
    Ok(KernelParams {
        q_rs: i64_of(g.q_rs)?,
        k_rs: i64_of(g.k_rs)?,
        v_rs: i64_of(g.v_rs)?,
        mask_rs: i64_of(g.mask_rs)?,
        mask_cs: i64_of(g.mask_cs)?,
        e: i32_of("head dim", g.e)?,
        ev: i32_of("value head dim", g.ev)?,
        n_qseg: i32_of("query segments", g.q_segs.len())?,
        n_kvseg: i32_of("key/value segments", g.kv_segs.len())?,
        tiles: 0,
        mask_kind: mask as i32,
        scale: cfg.scale,
        keep_scale,
        seed_lo: seed[0],
        seed_hi: seed[1],
        threshold,
        dropout: i32::from(cfg.dropout.is_some()),
        vec_ok: i32::from(rows_aligned(g)),
        pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CausalAlign, Dropout};
    use candle_core::{Layout, Shape};

    #[test]
    fn tables_follow_the_geometry() {
        let q = Layout::contiguous(Shape::from((2, 4, 5, 8)));
        let k = Layout::contiguous(Shape::from((2, 2, 3, 8)));
        let g = Geometry::dense(&q, &k, &k, None, Some(CausalAlign::BottomRight)).unwrap();
        let (qs, ks) = segment_tables(&g).unwrap();
        assert_eq!(qs.len(), 8 * QSEG_FIELDS);
        assert_eq!(ks.len(), 4 * KVSEG_FIELDS);
        // batch 1, head 3: reads key/value segment 3, causal offset 3 - 5.
        assert_eq!(
            &qs[7 * QSEG_FIELDS..8 * QSEG_FIELDS],
            &[7 * 40, 35, 5, 3, 7, 0, -2, 1]
        );
        assert_eq!(&ks[3 * KVSEG_FIELDS..], &[72, 72, 9, 3, 6, 8]);
        assert!(rows_aligned(&g));
        let mut cfg = AttnConfig::new(0.5, None);
        cfg.dropout = Dropout::new(0.25, 0x1234_5678_9abc_def0);
        let p = kernel_params(&cfg, &g, MaskKind::None).unwrap();
        assert_eq!(
            (p.seed_lo, p.seed_hi, p.threshold, p.dropout),
            (0x9abc_def0, 0x1234_5678, 1 << 30, 1)
        );
        assert_eq!((p.e, p.ev, p.n_qseg, p.n_kvseg, p.vec_ok), (8, 8, 8, 4, 1));
    }

    #[test]
    fn unaligned_rows_and_huge_grids_are_seen() {
        let q = Layout::contiguous(Shape::from((1, 1, 5, 6)));
        let g = Geometry::dense(&q, &q, &q, None, None).unwrap();
        assert!(!rows_aligned(&g));
        assert_eq!(tiles(65, 64).unwrap(), 2);
        assert!(tiles(64 * 70_000, 64).is_err());
    }
}
