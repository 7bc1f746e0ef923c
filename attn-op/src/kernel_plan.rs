//! How the CUDA kernels are launched, independent of who runs them: the scalar parameter block,
//! the segment tables, the tile and shared-memory sizes of each kernel, which problems the
//! kernels refuse, and the list of launches of a forward or backward call ([`Launch`]). The CUDA
//! module runs these launches through cudarc; the CPU emulator of the kernels (feature
//! `cuda-emu`) runs the very same list, so testing one tests what the other launches.

use candle_core::{bail, DType, Device, Layout, Result, Shape, Tensor};

use crate::config::AttnConfig;
use crate::geometry::Geometry;
use crate::philox::DropoutMask;
use crate::Backend;

/// Threads of every attention kernel's block.
pub(crate) const THREADS: u32 = 128;
/// Keys of a flash backward key tile, rows of the CUDA-core efficient tiles.
const FLASH_BWD_KEYS: usize = 64;
const EFF_ROWS: usize = 32;
/// Keys per block of the tensor-core efficient backward (every dtype).
const EFF_TC_BWD_KEYS: usize = 64;
/// Largest head dim of the kernels.
const MAX_HEAD_DIM: usize = 256;
/// Largest head dim of the tensor-core backward (larger ones use the efficient backward).
const MAX_FLASH_BWD_HEAD_DIM: usize = 128;

/// The head dim a flash kernel is instantiated for: `e` rounded up.
fn flash_bucket(e: usize) -> usize {
    [32, 64, 96, 128, 256]
        .into_iter()
        .find(|&d| d >= e)
        .unwrap_or(usize::MAX)
}

/// A tensor-core forward kernel's tiling: query rows per block (64: 16 per warp, K and V
/// double-buffered; 128: two 16-row m-tiles per warp, one K and one V tile; see flash_fwd.cuh)
/// and keys per tile, of the flash kernels (f16/bf16, rows of `d + 8` halves; flash_fwd.cu) or
/// of the f32 efficient ones (rows of `d + 4` floats; efficient_tc.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FwdTiling {
    rows: usize,
    keys: usize,
    f32: bool,
}

impl FwdTiling {
    /// The 64-row kernels (`flash_fwd_{dtype}_{d}`, `eff_tc_fwd_{dtype}_{d}`).
    fn rows64(d: usize, f32: bool) -> Self {
        let keys = match (f32, d == 256) {
            (false, false) => 64,
            (false, true) | (true, false) => 32,
            (true, true) => 16,
        };
        FwdTiling {
            rows: 64,
            keys,
            f32,
        }
    }

    /// The tiling for head-dim bucket `d` when the longest query segment has `longest` rows:
    /// 128-row tiles up to head dim 128 (`flash_fwd_r128_*`, `eff_tc_fwd_r128_f32_*`;
    /// FlashAttention-2's tiling) for segments longer than 64 rows, 64-row ones otherwise (a
    /// 128-row tile would compute a whole m-tile of padding); [`fwd_rows`] overrides the choice.
    fn choose(d: usize, f32: bool, longest: usize) -> Self {
        let r128 = match fwd_rows() {
            Some(rows) => rows == 128,
            None => longest > 64,
        };
        if d <= 128 && r128 {
            let keys = if !f32 && d <= 64 { 64 } else { 32 };
            FwdTiling {
                rows: 128,
                keys,
                f32,
            }
        } else {
            Self::rows64(d, f32)
        }
    }

    /// The kernel's name: `prefix` ("flash_fwd", "eff_tc_fwd"), dtype `dt`, head-dim bucket `d`.
    fn kernel(self, prefix: &str, dt: &str, d: usize) -> String {
        let r = if self.rows == 128 { "r128_" } else { "" };
        format!("{prefix}_{r}{dt}_{d}")
    }

    /// Dynamic shared memory at head-dim bucket `d`: the Q tile and the K and V tiles (two of
    /// each with 64-row tiles).
    fn smem(self, d: usize) -> usize {
        let kv_tiles = if self.rows == 64 { 4 } else { 2 };
        let (pad, bytes) = if self.f32 { (4, 4) } else { (8, 2) };
        (self.rows + kv_tiles * self.keys) * (d + pad) * bytes
    }

    /// The most shared memory either tiling at head-dim bucket `d` needs.
    fn max_smem(d: usize, f32: bool) -> usize {
        Self::choose(d, f32, 1)
            .smem(d)
            .max(Self::choose(d, f32, usize::MAX).smem(d))
    }
}

/// The most dynamic shared memory a flash forward at head-dim bucket `d` may need.
fn flash_fwd_smem(d: usize) -> usize {
    FwdTiling::max_smem(d, false)
}

/// Query rows per flash backward tile for a head-dim bucket (as instantiated in flash_bwd.cu).
fn flash_bwd_rows(d: usize) -> usize {
    if d <= 64 {
        64
    } else {
        32
    }
}

/// Dynamic shared memory of the flash backward: K and V tiles, double-buffered Q and dO tiles
/// (whose rows carry the row terms in their padding) and the dS tile.
fn flash_bwd_smem(d: usize) -> usize {
    let bq = flash_bwd_rows(d);
    (2 * FLASH_BWD_KEYS + 4 * bq) * (d + 8) * 2 + bq * (FLASH_BWD_KEYS + 8) * 2
}

/// The efficient kernels' head-dim bucket: `max(e, ev)` rounded up to 64, 128 or 256.
fn eff_bucket(e: usize, ev: usize) -> usize {
    [64, 128, 256]
        .into_iter()
        .find(|&d| d >= e.max(ev))
        .unwrap_or(usize::MAX)
}

/// The most dynamic shared memory the tensor-core efficient forward for `dtype` may need (f16
/// and bf16 run the flash forward's code with masks, so its tiles).
fn eff_tc_fwd_smem(dtype: DType, d: usize) -> usize {
    FwdTiling::max_smem(d, dtype == DType::F32)
}

/// Query rows per tile of the tensor-core efficient f32 backward, for the head-dim buckets it has
/// (64 and 128, as instantiated in efficient_tc.cu; 256 runs the CUDA-core backward).
fn eff_tc_bwd_rows(d: usize) -> Option<usize> {
    match d {
        64 => Some(32),
        128 => Some(16),
        _ => None,
    }
}

/// Dynamic shared memory of the tensor-core efficient backward for `dtype`, `None` for a
/// head-dim bucket it does not have (256). f32: K and V tiles of [`EFF_TC_BWD_KEYS`] rows and
/// double-buffered Q and dO tiles (the row terms in their rows' padding, the dS tile over the dO
/// tile), rows of `d + 4` floats; f16/bf16 run the flash backward's code with masks.
fn eff_tc_bwd_smem(dtype: DType, d: usize) -> Option<usize> {
    let bq = eff_tc_bwd_rows(d)?;
    Some(if dtype == DType::F32 {
        (2 * EFF_TC_BWD_KEYS + 4 * bq) * (d + 4) * 4
    } else {
        flash_bwd_smem(d)
    })
}

/// Whether the efficient backend runs a tensor-core kernel of efficient_tc.cu that needs `need`
/// bytes of shared memory: from sm80 on, when that fits the device's `smem` and
/// [`efficient_simt`] does not ask for the CUDA-core kernels.
fn efficient_tc(cc: u32, need: usize, smem: usize) -> bool {
    cc >= 80 && need <= smem && !efficient_simt()
}

/// The kernels' name suffix for `dtype`; `what` names the caller in the error.
fn dtype_name(what: &str, dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => bail!("{what}: dtype {d:?} is not supported (f32, f16, bf16)"),
    })
}

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
    /// Logit soft cap `c`, 0 for none.
    pub softcap: f32,
    /// `2 log2(e) scale / c`, 0 without a soft cap.
    pub cap_u2: f32,
    /// The scale without a soft cap, 0 with one.
    pub cap_lin: f32,
}

const _: () = assert!(std::mem::size_of::<KernelParams>() == 104);

/// How the kernels read the mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MaskKind {
    None = 0,
    Bias = 1,
    Bool = 2,
}

/// Int64 fields per query segment (`QSEG_FIELDS` in the kernels): offsets of q, the output rows
/// and the mask, length, key/value segment, dropout stream, the band (`lo`, `hi`: row `i` sees
/// key `j` iff `i + lo <= j <= i + hi`), the ALiBi slope (f32 bits) and diagonal.
const QSEG_FIELDS: usize = 10;
/// Int64 fields per key/value segment (`KVSEG_FIELDS` in the kernels).
const KVSEG_FIELDS: usize = 6;
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
    if g.pages.is_some() {
        bail!("attention (CUDA): the kernels read no paged cache (flash_attn_varlen_paged_windowed gathers the blocks for them)");
    }
    let mut qs = Vec::with_capacity(g.q_segs.len() * QSEG_FIELDS);
    for s in &g.q_segs {
        i32_of("dropout stream", s.stream)?;
        let lk = g.kv_segs.get(s.kv).map_or(0, |kv| kv.len);
        // The kernels' band arithmetic (row ± offset, in int) stays within len + lk + 1.
        i32_of(
            "query length + key length",
            s.len.saturating_add(lk).saturating_add(1),
        )?;
        let (len, lk) = (s.len as i64, lk as i64);
        // An unlimited side, or one past every key, is the bound that covers every key.
        let lo = s.band.lo.map_or(-len, |lo| (lo as i64).clamp(-len, lk));
        let hi = s.band.hi.map_or(lk, |hi| (hi as i64).clamp(-len - 1, lk));
        qs.extend_from_slice(&[
            i64_of(s.q)?,
            i64_of(s.row0)?,
            len,
            i64_of(s.kv)?,
            i64_of(s.stream)?,
            i64_of(s.mask)?,
            lo,
            hi,
            i64::from(s.slope.to_bits()),
            s.diag as i64,
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
fn tiles(longest: usize, rows: usize) -> Result<usize> {
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
fn rows_aligned(g: &Geometry) -> bool {
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
fn kernel_params(cfg: &AttnConfig, g: &Geometry, mask: MaskKind) -> Result<KernelParams> {
    if let Some(c) = cfg.softcap.filter(|c| !(c.is_finite() && *c > 0.0)) {
        bail!("attention (CUDA): softcap = {c} must be finite and positive");
    }
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
        softcap: cfg.softcap.unwrap_or(0.0),
        cap_u2: cfg.softcap.map_or(0.0, |c| {
            (2.0 * std::f64::consts::LOG2_E * f64::from(cfg.scale) / f64::from(c)) as f32
        }),
        cap_lin: if cfg.softcap.is_some() {
            0.0
        } else {
            cfg.scale
        },
    })
}

/// Why `backend` (Flash or Efficient) cannot run this problem on a CUDA device of compute
/// capability `cc` (`major * 10 + minor`) with `smem` bytes of opt-in shared memory per block,
/// or `None`. (Whether the kernels were built for that device is the CUDA module's question.)
pub(crate) fn refusal_for(
    backend: Backend,
    dtype: DType,
    e: usize,
    ev: usize,
    has_mask: bool,
    cc: u32,
    smem: usize,
) -> Option<String> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Some(format!(
            "dtype {dtype:?} is not supported on CUDA (f32, f16, bf16)"
        ));
    }
    match backend {
        Backend::Flash => {
            if has_mask {
                return Some("attn_mask is not supported".into());
            }
            if dtype == DType::F32 {
                return Some("f32 is not supported by the CUDA flash kernels (f16, bf16; efficient takes f32)".into());
            }
            if cc < 80 {
                return Some(format!(
                    "the CUDA flash kernels need sm80 or newer, this device is sm_{cc}"
                ));
            }
            if e != ev {
                return Some(format!(
                    "the CUDA flash kernels need equal q/k and v head dims, got {e} and {ev}"
                ));
            }
            if e == 0 || !e.is_multiple_of(8) || e > MAX_HEAD_DIM {
                return Some(format!(
                    "head dim {e} is not supported by the CUDA flash kernels (multiples of 8 up to {MAX_HEAD_DIM})"
                ));
            }
            let d = flash_bucket(e);
            let need = flash_fwd_smem(d).max(if d <= MAX_FLASH_BWD_HEAD_DIM {
                flash_bwd_smem(d)
            } else {
                0
            });
            if need > smem {
                return Some(format!(
                    "head dim {e} needs {need} bytes of shared memory per block, this device allows {smem}"
                ));
            }
            None
        }
        Backend::Efficient => {
            if e.max(ev) > MAX_HEAD_DIM {
                return Some(format!(
                    "head dim {} is above {MAX_HEAD_DIM} (CUDA efficient kernels)",
                    e.max(ev)
                ));
            }
            None
        }
        Backend::Math => None,
    }
}

/// The mask broadcast to the scores shape `(..., Hq, Lq, Lk)`, on `device`, as f32 bias or u8.
fn broadcast_mask(
    cfg: &AttnConfig,
    ql: &Layout,
    kl: &Layout,
    device: &Device,
) -> Result<Option<Tensor>> {
    let Some(mask) = &cfg.mask else {
        return Ok(None);
    };
    if cfg.varlen.is_some() {
        bail!("attention (CUDA): attn_mask is not supported with packed sequences");
    }
    let mut dims = ql.dims().to_vec();
    let r = dims.len();
    dims[r - 1] = kl.dims()[r - 2];
    let mask = match mask.dtype() {
        DType::U8 | DType::F32 => mask.clone(),
        _ => mask.to_dtype(DType::F32)?,
    };
    Ok(Some(mask.to_device(device)?.broadcast_as(dims)?))
}

/// Where the segments of this call lie in q, k and v.
fn geometry(
    cfg: &AttnConfig,
    ql: &Layout,
    kl: &Layout,
    vl: &Layout,
    mask: Option<&Layout>,
) -> Result<Geometry> {
    match &cfg.varlen {
        Some(varlen) => Geometry::packed(ql, kl, vl, varlen, cfg.band, cfg.alibi.as_deref()),
        None => Geometry::dense(ql, kl, vl, mask, cfg.band, cfg.alibi.as_deref()),
    }
}

/// Whether `ATTN_OP_CUDA_DETERMINISTIC` asks for the atomic-free dQ pass.
pub(crate) fn deterministic() -> bool {
    std::env::var("ATTN_OP_CUDA_DETERMINISTIC").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The query-tile rows of the tensor-core forwards (flash and efficient) that
/// `ATTN_OP_CUDA_FWD_ROWS` asks for (`64` or `128`; anything else is ignored): to compare the
/// two tilings on a GPU. By default head dims up to 128 run 128-row tiles on sequences longer
/// than 64 (see [`FwdTiling::choose`]).
fn fwd_rows() -> Option<usize> {
    match std::env::var("ATTN_OP_CUDA_FWD_ROWS").as_deref() {
        Ok("64") => Some(64),
        Ok("128") => Some(128),
        _ => None,
    }
}

/// Whether `ATTN_OP_CUDA_EFFICIENT_SIMT` asks for the CUDA-core efficient kernels (`eff_fwd_*`,
/// `eff_bwd_*`) where the tensor-core ones (`eff_tc_*`) would run: to compare the two. Devices
/// below sm80, or without the shared memory the tensor-core kernels need, always run the former.
pub(crate) fn efficient_simt() -> bool {
    std::env::var("ATTN_OP_CUDA_EFFICIENT_SIMT").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `t` in `dtype`, contiguous and starting at the first element of its storage (a kernel is
/// handed the whole allocation, so a view further in is copied out).
pub(crate) fn dense(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let t = t.to_dtype(dtype)?.contiguous()?;
    if t.layout().start_offset() == 0 {
        Ok(t)
    } else {
        t.copy()
    }
}

/// What one forward or backward call on CUDA needs besides the tensors, worked out from the
/// layouts alone: the mask broadcast to the scores shape, the geometry and the parameter block.
/// Fails with `what` (e.g. "attention (CUDA)") when the kernels refuse the problem.
pub(crate) struct Call {
    /// The mask broadcast to `(..., Hq, Lq, Lk)` on the call's device, f32 bias or u8.
    pub mask: Option<Tensor>,
    pub g: Geometry,
    pub params: KernelParams,
}

impl Call {
    /// `device` receives the mask; `cc` and `smem` describe it (see [`refusal_for`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        what: &str,
        kind: Backend,
        cfg: &AttnConfig,
        dtype: DType,
        (ql, kl, vl): (&Layout, &Layout, &Layout),
        device: &Device,
        cc: u32,
        smem: usize,
    ) -> Result<Self> {
        let mask = broadcast_mask(cfg, ql, kl, device)?;
        let g = geometry(cfg, ql, kl, vl, mask.as_ref().map(Tensor::layout))?;
        if let Some(why) = refusal_for(kind, dtype, g.e, g.ev, mask.is_some(), cc, smem) {
            bail!("{what}, {kind:?}: {why}");
        }
        let mask_kind = match mask.as_ref().map(Tensor::dtype) {
            None => MaskKind::None,
            Some(DType::U8) => MaskKind::Bool,
            Some(_) => MaskKind::Bias,
        };
        let params = kernel_params(cfg, &g, mask_kind)?;
        Ok(Self { mask, g, params })
    }

    /// The forward's output shape: q's, with v's head dim last.
    pub fn out_shape(&self, ql: &Layout) -> Shape {
        let mut dims = ql.dims().to_vec();
        let r = dims.len();
        dims[r - 1] = self.g.ev;
        Shape::from(dims)
    }

    /// Checks the backward's output `o`, its gradient and the logsumexp against the geometry.
    pub fn check_backward(
        &self,
        what: &str,
        o: &Tensor,
        dout: &Tensor,
        lse: &Tensor,
    ) -> Result<()> {
        let g = &self.g;
        if o.elem_count() != g.q_rows * g.ev
            || dout.elem_count() != o.elem_count()
            || lse.elem_count() != g.q_rows
        {
            bail!(
                "{what}: output ({:?}), its gradient ({:?}) or logsumexp ({:?}) do not match the inputs",
                o.dims(),
                dout.dims(),
                lse.dims()
            );
        }
        Ok(())
    }
}

/// Which kernel a launch runs; fixes its argument list (see the kernels' signatures).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KernelKind {
    /// `flash_fwd_*(q, k, v, o, lse, qsegs, kvsegs, params)`
    FlashFwd,
    /// `eff_fwd_*(q, k, v, bias, bool_mask, o, lse, qsegs, kvsegs, params)`
    EffFwd,
    /// `eff_tc_fwd_*`: the tensor-core forward, with `EffFwd`'s arguments
    EffTcFwd,
    /// `attn_delta_*(o, dout, delta, rows: i64, ev: i32)`
    Delta,
    /// `flash_bwd_*(q, k, v, dout, lse, delta, dq, dk, dv, qsegs, kvsegs, params, with_dq: i32)`
    FlashBwd,
    /// `eff_bwd_*(q, k, v, bias, bool_mask, dout, lse, delta, dq, dk, dv, qsegs, kvsegs, params,
    /// with_dq: i32)`
    EffBwd,
    /// `eff_tc_bwd_*`: the tensor-core backward, with `EffBwd`'s arguments
    EffTcBwd,
    /// `eff_dq_*(q, k, v, bias, bool_mask, dout, lse, delta, dq, qsegs, kvsegs, params)`
    EffDq,
}

/// One kernel launch: which kernel, its grid of `THREADS`-thread blocks, its dynamic shared
/// memory and parameter block (`tiles` set for this kernel).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Launch {
    pub kind: KernelKind,
    pub name: String,
    pub grid: (u32, u32),
    pub smem: usize,
    pub params: KernelParams,
    /// For the backward kernels: whether they accumulate dQ with atomics (else an `EffDq`
    /// launch follows).
    pub with_dq: bool,
}

fn grid(x: usize, y: usize) -> Result<(u32, u32)> {
    let x = u32::try_from(x.max(1))
        .or_else(|_| bail!("attention (CUDA): {x} segments exceed the grid"))?;
    Ok((x, y.max(1) as u32))
}

/// The launch of a forward call of `kind` on `dtype` inputs, or `None` when there are no rows,
/// on a device of compute capability `cc` with `smem` bytes of opt-in shared memory per block.
/// The efficient backend runs on the tensor cores where [`efficient_tc`] says so.
pub(crate) fn forward_launch(
    kind: Backend,
    dtype: DType,
    g: &Geometry,
    p: KernelParams,
    (cc, smem): (u32, usize),
) -> Result<Option<Launch>> {
    let longest = g.q_segs.iter().map(|s| s.len).max().unwrap_or(0);
    if longest == 0 {
        return Ok(None);
    }
    let dt = dtype_name("attention (CUDA)", dtype)?;
    let mut params = p;
    let launch = if kind == Backend::Flash {
        let d = flash_bucket(g.e);
        let tiling = FwdTiling::choose(d, false, longest);
        params.tiles = tiles(longest, tiling.rows)? as i32;
        Launch {
            kind: KernelKind::FlashFwd,
            name: tiling.kernel("flash_fwd", dt, d),
            grid: grid(g.q_segs.len(), params.tiles as usize)?,
            smem: tiling.smem(d),
            params,
            with_dq: false,
        }
    } else if efficient_tc(cc, eff_tc_fwd_smem(dtype, eff_bucket(g.e, g.ev)), smem) {
        let d = eff_bucket(g.e, g.ev);
        let tiling = FwdTiling::choose(d, dtype == DType::F32, longest);
        params.tiles = tiles(longest, tiling.rows)? as i32;
        Launch {
            kind: KernelKind::EffTcFwd,
            name: tiling.kernel("eff_tc_fwd", dt, d),
            grid: grid(g.q_segs.len(), params.tiles as usize)?,
            smem: tiling.smem(d),
            params,
            with_dq: false,
        }
    } else {
        let d = eff_bucket(g.e, g.ev);
        params.tiles = tiles(longest, EFF_ROWS)? as i32;
        Launch {
            kind: KernelKind::EffFwd,
            name: format!("eff_fwd_{dt}_{d}"),
            grid: grid(g.q_segs.len(), params.tiles as usize)?,
            smem: 0,
            params,
            with_dq: false,
        }
    };
    Ok(Some(launch))
}

/// The launches of a backward call, in order: the row terms `D_i = dO_i . O_i`, the key-tile
/// kernel (dK, dV, and dQ by atomics unless `deterministic`), and with `deterministic` the
/// query-tile dQ pass. Empty when there are no rows. `device` as for [`forward_launch`].
pub(crate) fn backward_launches(
    kind: Backend,
    dtype: DType,
    g: &Geometry,
    p: KernelParams,
    deterministic: bool,
    (cc, smem): (u32, usize),
) -> Result<Vec<Launch>> {
    if g.q_rows == 0 || g.kv_rows == 0 {
        return Ok(Vec::new());
    }
    let dt = dtype_name("attention (CUDA)", dtype)?;
    let warps = (THREADS / 32) as usize;
    let mut out = vec![Launch {
        kind: KernelKind::Delta,
        name: format!("attn_delta_{dt}"),
        grid: (
            u32::try_from(g.q_rows.div_ceil(warps))
                .or_else(|_| bail!("attention (CUDA): too many rows"))?,
            1,
        ),
        smem: 0,
        params: p,
        with_dq: false,
    }];
    let longest_k = g.kv_segs.iter().map(|s| s.len).max().unwrap_or(0);
    let mut params = p;
    if kind == Backend::Flash && g.e <= MAX_FLASH_BWD_HEAD_DIM {
        let d = flash_bucket(g.e);
        params.tiles = tiles(longest_k, FLASH_BWD_KEYS)? as i32;
        out.push(Launch {
            kind: KernelKind::FlashBwd,
            name: format!("flash_bwd_{dt}_{d}"),
            grid: grid(g.kv_segs.len(), params.tiles as usize)?,
            smem: flash_bwd_smem(d),
            params,
            with_dq: !deterministic,
        });
    } else if let Some(need) =
        eff_tc_bwd_smem(dtype, eff_bucket(g.e, g.ev)).filter(|&need| efficient_tc(cc, need, smem))
    {
        let d = eff_bucket(g.e, g.ev);
        params.tiles = tiles(longest_k, EFF_TC_BWD_KEYS)? as i32;
        out.push(Launch {
            kind: KernelKind::EffTcBwd,
            name: format!("eff_tc_bwd_{dt}_{d}"),
            grid: grid(g.kv_segs.len(), params.tiles as usize)?,
            smem: need,
            params,
            with_dq: !deterministic,
        });
    } else {
        let d = eff_bucket(g.e, g.ev);
        params.tiles = tiles(longest_k, EFF_ROWS)? as i32;
        out.push(Launch {
            kind: KernelKind::EffBwd,
            name: format!("eff_bwd_{dt}_{d}"),
            grid: grid(g.kv_segs.len(), params.tiles as usize)?,
            smem: 0,
            params,
            with_dq: !deterministic,
        });
    }
    if deterministic {
        let d = eff_bucket(g.e, g.ev);
        let longest_q = g.q_segs.iter().map(|s| s.len).max().unwrap_or(0);
        params.tiles = tiles(longest_q, EFF_ROWS)? as i32;
        out.push(Launch {
            kind: KernelKind::EffDq,
            name: format!("eff_dq_{dt}_{d}"),
            grid: grid(g.q_segs.len(), params.tiles as usize)?,
            smem: 0,
            params,
            with_dq: false,
        });
    }
    Ok(out)
}

/// Threads of a `dropout_keep_*` block (`DROPOUT_THREADS` in `kernels/src/dropout.cu`).
pub(crate) const DROPOUT_THREADS: u32 = 256;

/// The launch of `dropout_keep_*(keep, rows, cols, seed_lo, seed_hi, threshold, scale)`: the
/// multipliers of [`crate::nn::dropout`] for `rows` rows of `cols` elements, one thread per
/// four columns of a row, in blocks of [`DROPOUT_THREADS`].
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DropoutLaunch {
    pub name: String,
    pub blocks: u32,
    pub rows: u64,
    pub cols: u64,
    pub seed: [u32; 2],
    pub threshold: u32,
    pub scale: f32,
}

/// The launch that makes `dropout_multipliers(rows, cols, p, seed)` in `dtype` (f32, f16 or
/// bf16), or `None` when there are no elements.
pub(crate) fn dropout_launch(
    rows: usize,
    cols: usize,
    p: f64,
    seed: u64,
    dtype: DType,
) -> Result<Option<DropoutLaunch>> {
    let dt = dtype_name("dropout (CUDA)", dtype)?;
    if rows == 0 || cols == 0 {
        return Ok(None);
    }
    let threads = (rows as u64).saturating_mul(cols.div_ceil(4) as u64);
    let blocks = u32::try_from(threads.div_ceil(u64::from(DROPOUT_THREADS))).or_else(|_| {
        bail!("dropout (CUDA): {rows} rows of {cols} elements exceed the kernel's grid")
    })?;
    let mask = DropoutMask::new(p, seed);
    Ok(Some(DropoutLaunch {
        name: format!("dropout_keep_{dt}"),
        blocks,
        rows: rows as u64,
        cols: cols as u64,
        seed: mask.key(),
        threshold: mask.threshold(),
        // As `dropout_multipliers` computes the kept value.
        scale: (1.0 / (1.0 - p)) as f32,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Band, CausalAlign, Dropout};
    use candle_core::{Layout, Shape};

    #[test]
    fn tables_follow_the_geometry() {
        let q = Layout::contiguous(Shape::from((2, 4, 5, 8)));
        let k = Layout::contiguous(Shape::from((2, 2, 3, 8)));
        let band = Band::causal(CausalAlign::BottomRight);
        let g = Geometry::dense(&q, &k, &k, None, Some(band), None).unwrap();
        let (qs, ks) = segment_tables(&g).unwrap();
        assert_eq!(qs.len(), 8 * QSEG_FIELDS);
        assert_eq!(ks.len(), 4 * KVSEG_FIELDS);
        // batch 1, head 3: reads key/value segment 3; causal, so the band is (unlimited: -5,
        // the diagonal 3 - 5), no ALiBi.
        assert_eq!(
            &qs[7 * QSEG_FIELDS..8 * QSEG_FIELDS],
            &[7 * 40, 35, 5, 3, 7, 0, -5, -2, 0, -2]
        );
        // A window of 2 keys back and 1 ahead, ALiBi slopes per query head; a right side past
        // every key reads as unlimited (3 keys).
        let window = |right| Band {
            align: CausalAlign::BottomRight,
            left: Some(2),
            right: Some(right),
        };
        let slopes = [0.5, 0.25, -1.5, 2.0];
        let g = Geometry::dense(&q, &k, &k, None, Some(window(1)), Some(&slopes)).unwrap();
        let (qs, _) = segment_tables(&g).unwrap();
        assert_eq!(
            &qs[7 * QSEG_FIELDS + 6..8 * QSEG_FIELDS],
            &[-4, -1, i64::from(2.0f32.to_bits()), -2]
        );
        let g = Geometry::dense(&q, &k, &k, None, Some(window(100)), None).unwrap();
        let (qs, _) = segment_tables(&g).unwrap();
        assert_eq!(&qs[7 * QSEG_FIELDS + 6..7 * QSEG_FIELDS + 8], &[-4, 3]);
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
        assert_eq!(p.softcap, 0.0);
        assert_eq!((p.cap_u2, p.cap_lin), (0.0, 0.5));
        cfg.softcap = Some(30.0);
        let p = kernel_params(&cfg, &g, MaskKind::None).unwrap();
        assert_eq!((p.softcap, p.cap_lin), (30.0, 0.0));
        assert!((p.cap_u2 - 2.0 * 0.5 / 30.0 / std::f32::consts::LN_2).abs() < 1e-7);
    }

    #[test]
    fn unaligned_rows_and_huge_grids_are_seen() {
        let q = Layout::contiguous(Shape::from((1, 1, 5, 6)));
        let g = Geometry::dense(&q, &q, &q, None, None, None).unwrap();
        assert!(!rows_aligned(&g));
        assert_eq!(tiles(65, 64).unwrap(), 2);
        assert!(tiles(64 * 70_000, 64).is_err());
    }

    #[test]
    fn buckets_and_shared_memory() {
        assert_eq!(flash_bucket(8), 32);
        assert_eq!(flash_bucket(80), 96);
        assert_eq!(flash_bucket(256), 256);
        assert_eq!(eff_bucket(8, 130), 256);
        // The sizes flash_fwd.cu / flash_bwd.cu carve out of dynamic shared memory.
        let (flash, f32) = (false, true);
        assert_eq!(FwdTiling::rows64(128, flash).smem(128), 87_040);
        assert_eq!(FwdTiling::rows64(256, flash).smem(256), 101_376);
        if fwd_rows().is_none() {
            assert_eq!(FwdTiling::choose(128, flash, 65).smem(128), 52_224);
            assert_eq!(FwdTiling::choose(64, flash, 1000).smem(64), 36_864);
            assert_eq!(
                FwdTiling::choose(64, flash, 64),
                FwdTiling::rows64(64, flash)
            );
            assert_eq!(
                FwdTiling::choose(256, flash, 1000),
                FwdTiling::rows64(256, flash)
            );
            assert_eq!(
                FwdTiling::choose(128, f32, 65).kernel("eff_tc_fwd", "f32", 128),
                "eff_tc_fwd_r128_f32_128"
            );
        }
        assert_eq!(flash_fwd_smem(128), 87_040);
        assert_eq!(flash_fwd_smem(256), 101_376);
        assert_eq!(flash_bwd_smem(128), 74_240);
        assert_eq!(flash_bwd_smem(64), 64_512);
        // efficient_tc.cu's: A100 (163 KiB per block) and H100 take every bucket, sm86/sm89
        // (99 KiB = 101,376 bytes) 64 and 128, either tiling.
        for rows in [1, 1000] {
            assert_eq!(FwdTiling::choose(64, f32, rows).smem(64), 52_224);
            assert_eq!(FwdTiling::choose(128, f32, rows).smem(128), 101_376);
            assert_eq!(FwdTiling::choose(256, f32, rows).smem(256), 133_120);
        }
        assert_eq!(eff_tc_bwd_smem(DType::F32, 64), Some(69_632));
        assert_eq!(eff_tc_bwd_smem(DType::F32, 128), Some(101_376));
        assert_eq!(eff_tc_bwd_smem(DType::BF16, 128), Some(flash_bwd_smem(128)));
        assert_eq!(eff_tc_bwd_smem(DType::F16, 256), None);
        assert_eq!(eff_tc_fwd_smem(DType::F16, 128), 87_040);
    }

    #[test]
    fn refusals_name_the_reason() {
        let cap = 90;
        let big = 227 * 1024;
        let r = |b, dt, e, ev, m, cc| refusal_for(b, dt, e, ev, m, cc, big);
        assert!(r(Backend::Flash, DType::F16, 64, 64, false, cap.max(80)).is_none());
        assert!(r(Backend::Flash, DType::F32, 64, 64, false, cap.max(80))
            .unwrap()
            .contains("f32"));
        assert!(r(Backend::Flash, DType::F16, 64, 64, true, cap.max(80))
            .unwrap()
            .contains("attn_mask"));
        assert!(r(Backend::Flash, DType::BF16, 60, 60, false, cap.max(80))
            .unwrap()
            .contains("multiples of 8"));
        assert!(r(Backend::Flash, DType::BF16, 64, 32, false, cap.max(80))
            .unwrap()
            .contains("equal"));
        assert!(r(Backend::Efficient, DType::F32, 300, 8, true, cap)
            .unwrap()
            .contains("above 256"));
        assert!(r(Backend::Efficient, DType::F32, 13, 7, true, cap).is_none());
        assert!(refusal_for(
            Backend::Flash,
            DType::F16,
            256,
            256,
            false,
            cap.max(80),
            48 * 1024
        )
        .unwrap()
        .contains("shared memory"));
    }
}
