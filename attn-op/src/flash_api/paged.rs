//! The paged-KV entry point: keys and values live in fixed-size blocks of a cache, and each
//! sequence lists the blocks that hold its keys, in order (vLLM's paged attention, as
//! candle-flash-attn takes it).

use candle_core::{bail, DType, Result, Tensor};

use super::varlen::{cumulative, lengths, packed};
use super::{check_flash, Extras};
use crate::config::paged_rows;
use crate::sdpa::unit_last_dim;
use crate::FlashAttention;

/// Whether CPU tensors run on the emulated CUDA kernels, which read no paged cache.
fn emulating() -> bool {
    #[cfg(feature = "cuda-emu")]
    if crate::emu::is_emulating() {
        return true;
    }
    false
}

/// The paged call on the CPU kernels, reading each block where it is.
fn in_place(
    api: &str,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (seqlens_q, seqlens_k): (&Tensor, &Tensor),
    (max_seqlen_q, max_seqlen_k): (usize, usize),
    softmax_scale: f32,
    extras: Extras,
    blocks: Vec<Vec<usize>>,
) -> Result<Tensor> {
    if q.rank() != 3 {
        bail!(
            "{api}: q has shape {:?}; expected rank 3, (total_tokens, heads, head_dim)",
            q.dims()
        );
    }
    // Shapes, dtypes and devices are checked on views of the first block.
    let qt = q.transpose(0, 1)?;
    let (k0, v0) = (k.get(0)?.transpose(0, 1)?, v.get(0)?.transpose(0, 1)?);
    let p = check_flash(api, (&qt, &k0, &v0), softmax_scale)?;
    let varlen = lengths(
        api,
        (seqlens_q, p.lq, max_seqlen_q),
        (seqlens_k, usize::MAX, max_seqlen_k),
    )?;
    let cfg = extras.config(api, &p, max_seqlen_k, softmax_scale)?;
    if p.lq == 0 {
        return Tensor::zeros(p.out_shape(), p.dtype, q.device())?.transpose(0, 1);
    }
    let op = FlashAttention::from_config(cfg).paged(varlen, blocks);
    let (qt, k, v) = (unit_last_dim(&qt)?, unit_last_dim(k)?, unit_last_dim(v)?);
    qt.apply_op3(&k, &v, op)?.transpose(0, 1)
}

/// The block table as `batch` rows of physical block numbers, checked against the blocks each
/// sequence needs.
fn block_rows(api: &str, table: &Tensor, batch: usize) -> Result<Vec<Vec<i64>>> {
    let rows: Vec<Vec<i64>> = match (table.dtype(), table.rank()) {
        (DType::U32, 2) => table
            .to_vec2::<u32>()?
            .into_iter()
            .map(|r| r.into_iter().map(i64::from).collect())
            .collect(),
        (DType::I32, 2) => table.to_dtype(DType::I64)?.to_vec2::<i64>()?,
        _ => bail!(
            "{api}: block_table must be a 2-D u32 or i32 tensor (batch, max_blocks), got {:?} {:?}",
            table.dtype(),
            table.dims()
        ),
    };
    if rows.len() != batch {
        bail!(
            "{api}: block_table has {} rows for a batch of {batch} (seqlens_q has batch + 1 entries)",
            rows.len()
        );
    }
    Ok(rows)
}

/// FlashAttention over packed queries against a paged KV cache, with candle-flash-attn's
/// signature: q `(total_q, Hq, D)`; k and v `(num_blocks, page_block_size, Hkv, D)`;
/// `block_table` (u32 or i32, `(batch, max_blocks)`) lists each sequence's blocks in order, so
/// key `t` of sequence `b` is row `t % page_block_size` of block `block_table[b, t /
/// page_block_size]`; `seqlens_k` holds the cumulative key lengths. Windows and the soft cap
/// as in [`crate::flash_attn_varlen_alibi_windowed_softcap`] (`softcap = None`: no cap).
/// Differentiable: the gradients of k and v have the cache's shape (a block several sequences
/// share gets the sum of theirs, an unused block zeros). `mm_prefix_ranges` (ranges that bypass the mask) is not supported:
/// passing it is an error.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let kv = Tensor::randn(0f32, 1., (4, 32, 1, 16), &dev)?; // 4 blocks of 32 tokens
/// let q = Tensor::randn(0f32, 1., (2, 2, 16), &dev)?; // one query for each of 2 sequences
/// let cu_q = Tensor::new(&[0u32, 1, 2], &dev)?;
/// let cu_k = Tensor::new(&[0u32, 40, 50], &dev)?; // 40 and 10 cached tokens
/// let table = Tensor::new(&[[3u32, 0], [1, 2]], &dev)?; // blocks of each sequence
/// let y = attn_op::flash_attn_varlen_paged_windowed(
///     &q, &kv, &kv, &cu_q, &cu_k, &table, None, 1, 40, 0.25, None, Some(0), 32, None,
/// )?;
/// assert_eq!(y.dims(), &[2, 2, 16]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_paged_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    block_table: &Tensor,
    mm_prefix_ranges: Option<&Tensor>,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
    page_block_size: usize,
    softcap: Option<f32>,
) -> Result<Tensor> {
    let api = "flash_attn_varlen_paged_windowed";
    if mm_prefix_ranges.is_some() {
        bail!("{api}: mm_prefix_ranges (ranges that bypass the causal/window mask) is not supported; pass None");
    }
    for (name, t) in [("k", k), ("v", v)] {
        if t.rank() != 4 {
            bail!(
                "{api}: {name} has shape {:?}; expected rank 4, (num_blocks, page_block_size, heads, head_dim)",
                t.dims()
            );
        }
    }
    let (blocks, page) = (k.dim(0)?, k.dim(1)?);
    if page_block_size == 0 || page_block_size != page {
        bail!(
            "{api}: page_block_size = {page_block_size} does not match k's block size {page} (k {:?})",
            k.dims()
        );
    }
    if v.dims()[..3] != k.dims()[..3] {
        bail!(
            "{api}: v {:?} must have k's blocks, block size and heads (k {:?})",
            v.dims(),
            k.dims()
        );
    }
    let cu_k = cumulative(api, "seqlens_k", seqlens_k, usize::MAX, max_seqlen_k)?;
    let table = block_rows(api, block_table, cu_k.len() - 1)?;
    // Each sequence's blocks, as many as its keys fill, checked against the cache.
    let mut used: Vec<Vec<usize>> = Vec::with_capacity(table.len());
    for (b, (w, blocks_of)) in cu_k.windows(2).zip(&table).enumerate() {
        let len = w[1] - w[0];
        if len.div_ceil(page) > blocks_of.len() {
            bail!(
                "{api}: sequence {b} has {len} keys, more than its {} blocks of {page} in block_table",
                blocks_of.len()
            );
        }
        let mut mine = Vec::with_capacity(len.div_ceil(page));
        for (i, &block) in blocks_of.iter().enumerate().take(len.div_ceil(page)) {
            if block < 0 || block as u64 >= blocks as u64 {
                bail!("{api}: block_table[{b}, {i}] = {block} is outside the {blocks} blocks of k and v");
            }
            mine.push(block as usize);
        }
        used.push(mine);
    }
    let mut extras = Extras::window(window_size_left, window_size_right);
    if let Some(c) = softcap {
        extras = extras.with_softcap(c);
    }
    let (sq, sk) = (seqlens_q, seqlens_k);
    // On the CPU the kernels read the blocks where they are (the backward gathers them); the
    // CUDA kernels take the keys gathered into packed rows.
    if q.device().is_cpu() && !emulating() && blocks > 0 {
        return in_place(
            api,
            (q, k, v),
            (sq, sk),
            (max_seqlen_q, max_seqlen_k),
            softmax_scale,
            extras,
            used,
        );
    }
    let rows: Vec<i64> = paged_rows(&cu_k, &used, page)
        .into_iter()
        .map(|r| r as i64)
        .collect();
    let rows = Tensor::new(rows, k.device())?;
    let gather = |t: &Tensor| -> Result<Tensor> {
        let (_, _, h, d) = t.dims4()?;
        t.reshape((blocks * page, h, d))?.index_select(&rows, 0)
    };
    let (k, v) = (gather(k)?, gather(v)?);
    packed(
        api,
        (q, &k, &v),
        sq,
        sk,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        extras,
    )
}
