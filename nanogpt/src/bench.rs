//! `nanogpt bench`: the measurements of PyTorch's SDPA tutorial, with attn-op's helpers.
//!
//! [`sdpa`] times the default dispatch and each attention backend alone on random q, k, v (the
//! tutorial's first step); [`varlen`] times the attention layer nanogpt uses on a batch of
//! random-length sequences, padded and packed (its NestedTensor section).

use std::time::Duration;

use anyhow::{bail, Result};
use attn_op::bench::{random_lengths, sweep_rows, varlen_comparison, Sweep, VarlenComparison};
use attn_op::nn::{AttentionConfig, CausalSelfAttention, Causality};
use attn_op::{Backend, SdpaOptions};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::memory::{self, Estimate};

/// Largest `|packed - padded|` on the valid tokens for the two layouts to count as equal: both
/// compute the same f32 sums, in a different order.
pub const VARLEN_TOLERANCE: f32 = 1e-4;

/// What [`sdpa`] times.
#[derive(Clone, Debug)]
pub struct SdpaBench {
    /// Where to run.
    pub device: Device,
    /// Precision of q, k and v.
    pub dtype: DType,
    /// Batch size.
    pub batch: usize,
    /// Attention heads.
    pub heads: usize,
    /// Query sequence length.
    pub seq: usize,
    /// Key/value sequence length.
    pub kv_seq: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Mask the future.
    pub causal: bool,
    /// Time forward and backward of `sum(output)` instead of forward alone.
    pub backward: bool,
    /// What to time, in order: `None` the default dispatch, `Some(b)` backend `b` alone.
    pub backends: Vec<Option<Backend>>,
    /// Least time spent timing each backend.
    pub min_time: Duration,
}

/// Times attention on random `(batch, heads, seq, head_dim)` inputs with the default dispatch and
/// with each backend alone; a backend that cannot take these inputs here gets its reason instead.
pub fn sdpa(b: &SdpaBench) -> Result<Sweep> {
    for (name, value) in [
        ("batch", b.batch),
        ("heads", b.heads),
        ("seq", b.seq),
        ("kv-seq", b.kv_seq),
        ("head-dim", b.head_dim),
    ] {
        if value == 0 {
            bail!("--{name} 0: it must be at least 1");
        }
    }
    if b.device.is_cpu() {
        memory::check_fits("this benchmark", &sdpa_memory(b)?, memory::available())?;
    } else {
        sdpa_memory(b)?;
    }
    let input = |seq: usize| -> Result<Tensor> {
        let shape = (b.batch, b.heads, seq, b.head_dim);
        let t = Tensor::randn(0f32, 1., shape, &b.device)?.to_dtype(b.dtype)?;
        // Backward needs variables to differentiate against.
        Ok(if b.backward {
            Var::from_tensor(&t)?.into_inner()
        } else {
            t
        })
    };
    let (q, k, v) = (input(b.seq)?, input(b.kv_seq)?, input(b.kv_seq)?);
    let opts = SdpaOptions {
        is_causal: b.causal,
        ..Default::default()
    };
    Ok(sweep_rows(
        &q,
        &k,
        &v,
        &opts,
        b.backward,
        b.min_time,
        &b.backends,
    )?)
}

/// What [`sdpa`] allocates at most: q, k, v (drawn in f32, then cast), the output, with
/// `backward` the gradients, and when the math backend is timed its score matrices.
pub fn sdpa_memory(b: &SdpaBench) -> Result<Estimate> {
    let what = "bench sdpa's memory";
    let (batch, heads, d) = (b.batch as u64, b.heads as u64, b.head_dim as u64);
    let q = memory::product(
        "--batch x --heads x --seq x --head-dim",
        &[batch, heads, b.seq as u64, d],
    )?;
    let kv = memory::product(
        "--batch x --heads x --kv-seq x --head-dim",
        &[batch, heads, b.kv_seq as u64, d],
    )?;
    let scores = memory::product(
        "--batch x --heads x --seq x --kv-seq",
        &[batch, heads, b.seq as u64, b.kv_seq as u64],
    )?;
    let size = b.dtype.size_in_bytes() as u64;
    let qkv = memory::sum(what, &[q, kv, kv])?;
    // Per element of q, k and v: the f32 draw and its cast, and with backward two gradients
    // (Candle's zero-filled accumulator and ours); per element of the output: it and its
    // gradient in f32. The math backend holds two score matrices (four with backward).
    let (per_qkv, per_out, per_score) = if b.backward {
        (3 * (4 + size), 2 * 4, 4 * 4)
    } else {
        (4 + size, 2 * 4, 2 * 4)
    };
    let math = b.backends.contains(&Some(Backend::Math));
    Ok(Estimate {
        bytes: memory::sum(
            what,
            &[
                memory::product(what, &[qkv, per_qkv])?,
                memory::product(what, &[q, per_out])?,
                if math {
                    memory::product(what, &[scores, per_score])?
                } else {
                    0
                },
            ],
        )?,
        what: "q, k, v, outputs, gradients, the math backend's scores",
    })
}

/// What [`varlen`] times.
#[derive(Clone, Debug)]
pub struct VarlenBench {
    /// Where to run.
    pub device: Device,
    /// Sequences in the batch.
    pub batch: usize,
    /// Longest sequence, the padded length.
    pub max_len: usize,
    /// Embedding width of the layer.
    pub n_embd: usize,
    /// Attention heads of the layer.
    pub n_head: usize,
    /// Seed of the sequence lengths.
    pub seed: u64,
    /// Least time spent timing each layout.
    pub min_time: Duration,
}

/// Times a causal [`CausalSelfAttention`] (no bias, no dropout: evaluation) on `batch` sequences of
/// lengths uniform in `[1, max_len]`, zero-padded to `max_len` and packed, and checks that both
/// give the same output on the valid tokens (within [`VARLEN_TOLERANCE`]).
pub fn varlen(b: &VarlenBench) -> Result<VarlenComparison> {
    for (name, value) in [
        ("batch", b.batch),
        ("max-len", b.max_len),
        ("n-embd", b.n_embd),
        ("n-head", b.n_head),
    ] {
        if value == 0 {
            bail!("--{name} 0: it must be at least 1");
        }
    }
    if !b.n_embd.is_multiple_of(b.n_head) {
        bail!(
            "--n-embd {} is not divisible by --n-head {}",
            b.n_embd,
            b.n_head
        );
    }
    if b.device.is_cpu() {
        memory::check_fits("this benchmark", &varlen_memory(b)?, memory::available())?;
    } else {
        varlen_memory(b)?;
    }
    let varmap = VarMap::new();
    let layer = CausalSelfAttention::new(
        AttentionConfig {
            n_embd: b.n_embd,
            n_head: b.n_head,
            bias: false,
            dropout: 0.0,
            causality: Causality::Always,
        },
        VarBuilder::from_varmap(&varmap, DType::F32, &b.device),
    )?;
    let lens = random_lengths(b.batch, b.max_len, b.seed)?;
    let cmp = varlen_comparison(&layer, &lens, b.max_len, &b.device, b.min_time)?;
    if cmp.max_abs_diff.is_nan() || cmp.max_abs_diff > VARLEN_TOLERANCE {
        bail!(
            "{cmp}\npacked and padded outputs differ by {:e} on the valid tokens (tolerance {VARLEN_TOLERANCE:e})",
            cmp.max_abs_diff
        );
    }
    Ok(cmp)
}

/// What [`varlen`] allocates at most: the sequences, padded and packed, each through the
/// layer (q|k|v, attention output, projection), and the layer's weights.
pub fn varlen_memory(b: &VarlenBench) -> Result<Estimate> {
    let what = "bench varlen's memory";
    let tokens = memory::product(
        "--batch x --max-len x --n-embd",
        &[b.batch as u64, b.max_len as u64, b.n_embd as u64],
    )?;
    let c = b.n_embd as u64;
    Ok(Estimate {
        bytes: memory::sum(
            what,
            &[
                memory::product(what, &[tokens, 13, 4])?,
                memory::product(what, &[c, c, 4, 4])?,
                memory::product(what, &[b.batch as u64, 16])?,
            ],
        )?,
        what: "sequences padded and packed, q|k|v, outputs, weights",
    })
}
