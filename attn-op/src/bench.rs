//! Timing helpers: a `blocked_autorange`-style timer and the backend sweep of PyTorch's SDPA
//! tutorial, for any project that wants to find its fastest backend.

use std::fmt;
use std::time::{Duration, Instant};

use candle_core::{Device, Result, Tensor};

use crate::dispatch::{refusal, select};
use crate::validate::check_sdpa;
use crate::{scaled_dot_product_attention, sdpa_kernel, Backend, SdpaOptions};

/// Statistics of repeated runs of one piece of work.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// Median time of one run.
    pub median: Duration,
    /// Fastest block mean.
    pub min: Duration,
    /// Slowest block mean.
    pub max: Duration,
    /// Runs timed (excluding warm-up).
    pub runs: usize,
}

impl Timing {
    /// Median in microseconds.
    pub fn median_us(&self) -> f64 {
        self.median.as_secs_f64() * 1e6
    }
}

/// Times `f` like PyTorch's `blocked_autorange`: one warm-up run, then blocks of runs sized so a
/// block takes at least a tenth of `min_time`, until `min_time` has passed and at least three
/// blocks ran. The device is synchronised at the end of every block, so GPU work is counted.
/// Returns the median (and range) of the per-run block means.
///
/// ```
/// use attn_op::bench::time;
/// use candle_core::Device;
/// let t = time(&Device::Cpu, std::time::Duration::from_millis(20), || Ok(()))?;
/// assert!(t.runs >= 3);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn time(
    device: &Device,
    min_time: Duration,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Timing> {
    let start = Instant::now();
    f()?;
    device.synchronize()?;
    let first = start.elapsed().max(Duration::from_nanos(1));
    let per_block = ((min_time.as_secs_f64() / 10.0) / first.as_secs_f64())
        .ceil()
        .max(1.0) as usize;
    let mut means = Vec::new();
    let begin = Instant::now();
    while means.len() < 3 || begin.elapsed() < min_time {
        let t = Instant::now();
        for _ in 0..per_block {
            f()?;
        }
        device.synchronize()?;
        means.push(t.elapsed() / per_block as u32);
    }
    means.sort();
    Ok(Timing {
        median: means[means.len() / 2],
        min: means[0],
        max: means[means.len() - 1],
        runs: means.len() * per_block,
    })
}

/// One line of a backend sweep.
#[derive(Clone, Debug)]
pub struct SweepRow {
    /// `None` for the default dispatch, else the backend run alone.
    pub backend: Option<Backend>,
    /// The backend the default dispatch picked (for the default row), else `backend`.
    pub ran: Option<Backend>,
    /// The timing, or why the backend cannot run these inputs here.
    pub result: std::result::Result<Timing, String>,
}

/// A backend sweep: the default dispatch and each backend alone.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// What was timed, e.g. the shape.
    pub title: String,
    /// The rows, default dispatch first.
    pub rows: Vec<SweepRow>,
}

/// Times `scaled_dot_product_attention(q, k, v, opts)` with the default dispatch and with each
/// backend alone (restricted with [`sdpa_kernel`]), like the first step of PyTorch's SDPA tutorial.
/// A backend that refuses the inputs gets its reason instead of a time. With `backward`, each run
/// also backpropagates `sum(output)` (q, k, v should then be `Var`s).
pub fn sweep(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &SdpaOptions,
    backward: bool,
    min_time: Duration,
) -> Result<Sweep> {
    let mut rows = vec![None];
    rows.extend(Backend::ALL.map(Some));
    sweep_rows(q, k, v, opts, backward, min_time, &rows)
}

/// [`sweep`] over chosen rows, in the order given: `None` times the default dispatch, `Some(b)`
/// backend `b` alone, so a sweep need not wait for a slow backend.
///
/// ```
/// use attn_op::bench::sweep_rows;
/// use attn_op::{Backend, SdpaOptions};
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1., (1, 2, 16, 8), &Device::Cpu)?;
/// let min_time = std::time::Duration::from_millis(5);
/// let s = sweep_rows(&q, &q, &q, &SdpaOptions::default(), false, min_time, &[None, Some(Backend::Flash)])?;
/// assert_eq!(s.rows.len(), 2);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn sweep_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &SdpaOptions,
    backward: bool,
    min_time: Duration,
    which: &[Option<Backend>],
) -> Result<Sweep> {
    let p = check_sdpa("bench::sweep", q, k, v, opts)?;
    let run = || -> Result<()> {
        let y = scaled_dot_product_attention(q, k, v, opts)?;
        if backward {
            y.sum_all()?.backward()?;
        }
        Ok(())
    };
    let mut rows = Vec::new();
    for &backend in which {
        let row = match backend {
            None => {
                let default = select(&p, opts, q.device()).map(|s| s.backend);
                SweepRow {
                    backend: None,
                    ran: default.as_ref().ok().copied(),
                    result: match default {
                        Ok(_) => time(q.device(), min_time, run).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                }
            }
            Some(backend) => SweepRow {
                backend: Some(backend),
                ran: Some(backend),
                result: match refusal(backend, &p, opts.attn_mask.is_some(), q.device()) {
                    Some(reason) => Err(reason),
                    None => {
                        let _only = sdpa_kernel(&[backend]);
                        time(q.device(), min_time, run).map_err(|e| e.to_string())
                    }
                },
            },
        };
        rows.push(row);
    }
    let title = format!(
        "q {:?}, k {:?}, v {:?}, {:?}{}{}",
        q.dims(),
        k.dims(),
        v.dims(),
        q.dtype(),
        if opts.is_causal { ", causal" } else { "" },
        if backward {
            ", forward+backward"
        } else {
            ", forward"
        }
    );
    Ok(Sweep { title, rows })
}

impl fmt::Display for Sweep {
    /// A table: backend, median time, and the speed relative to the math backend.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let math = self
            .rows
            .iter()
            .find(|r| r.backend == Some(Backend::Math))
            .and_then(|r| r.result.as_ref().ok().map(|t| t.median_us()));
        writeln!(f, "{}", self.title)?;
        writeln!(f, "| backend | median (us) | vs math |")?;
        writeln!(f, "|---|---:|---:|")?;
        for r in &self.rows {
            let name = match (r.backend, r.ran) {
                (None, Some(b)) => format!("default ({b})"),
                (None, None) => "default".to_string(),
                (Some(b), _) => b.to_string(),
            };
            match &r.result {
                Ok(t) => {
                    let ratio =
                        math.map_or("-".to_string(), |m| format!("{:.2}x", m / t.median_us()));
                    writeln!(f, "| {name} | {:.0} | {ratio} |", t.median_us())?;
                }
                Err(reason) => writeln!(f, "| {name} | refused: {reason} | - |")?,
            }
        }
        Ok(())
    }
}

/// Packed variable-length attention against the padded dense batch (the NestedTensor section of
/// PyTorch's SDPA tutorial).
#[derive(Clone, Debug)]
pub struct VarlenComparison {
    /// The sequence lengths.
    pub lens: Vec<usize>,
    /// The padded length.
    pub max_len: usize,
    /// [`crate::nn::CausalSelfAttention`] on the zero-padded `(B, max_len, C)` batch.
    pub padded: Timing,
    /// The same layer's `forward_packed` on the `(total, C)` tokens.
    pub packed: Timing,
    /// Largest difference between the two on the valid tokens.
    pub max_abs_diff: f32,
}

impl VarlenComparison {
    /// Fraction of the padded batch that is padding.
    pub fn padding(&self) -> f64 {
        let total: f64 = self.lens.iter().map(|&l| l as f64).sum();
        1.0 - total / (self.lens.len() as f64 * self.max_len as f64).max(1.0)
    }

    /// How many times faster packed is than padded.
    pub fn speedup(&self) -> f64 {
        self.padded.median.as_secs_f64() / self.packed.median.as_secs_f64()
    }
}

impl fmt::Display for VarlenComparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: u128 = self.lens.iter().map(|&l| l as u128).sum();
        writeln!(
            f,
            "batch {}, max length {}, {:.0}% padding, causal self-attention forward",
            self.lens.len(),
            self.max_len,
            100.0 * self.padding()
        )?;
        writeln!(f, "| layout | tokens | median (ms) | speedup |")?;
        writeln!(f, "|---|---:|---:|---:|")?;
        let ms = |t: &Timing| t.median.as_secs_f64() * 1e3;
        writeln!(
            f,
            "| padded dense | {} | {:.2} | 1.00x |",
            self.lens.len() as u128 * self.max_len as u128,
            ms(&self.padded)
        )?;
        writeln!(
            f,
            "| packed (varlen) | {total} | {:.2} | {:.2}x |",
            ms(&self.packed),
            self.speedup()
        )?;
        write!(
            f,
            "max |packed - padded| on valid tokens: {:.2e}",
            self.max_abs_diff
        )
    }
}

/// Sequence lengths uniform in `[1, max_len]` from `seed` (about 50% padding); an error when
/// `batch` lengths cannot be held in memory.
pub fn random_lengths(batch: usize, max_len: usize, seed: u64) -> Result<Vec<usize>> {
    let mut lens = Vec::new();
    lens.try_reserve_exact(batch).map_err(|_| {
        candle_core::Error::Msg(format!(
            "random_lengths: cannot hold {batch} lengths in memory"
        ))
    })?;
    let mut state = seed;
    lens.extend((0..batch).map(|_| {
        // SplitMix64.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        1 + (z % max_len.max(1) as u64) as usize
    }));
    Ok(lens)
}

/// Times `layer` (causal in evaluation: build it with [`crate::nn::Causality::Always`]) on
/// `lens` random sequences padded to `max_len`, and packed, and checks that both agree on the
/// valid tokens.
pub fn varlen_comparison(
    layer: &crate::nn::CausalSelfAttention,
    lens: &[usize],
    max_len: usize,
    device: &Device,
    min_time: Duration,
) -> Result<VarlenComparison> {
    let c = layer.config().n_embd;
    if lens.iter().any(|&l| l > max_len) {
        candle_core::bail!("varlen_comparison: a length exceeds max_len = {max_len}");
    }
    // The padded batch (B, max_len, C) bounds every tensor made here.
    crate::validate::checked_elems(
        "varlen_comparison",
        "the padded batch",
        &[lens.len(), max_len, c, 3],
        4,
    )?;
    let seqs: Vec<Tensor> = lens
        .iter()
        .map(|&l| Tensor::randn(0f32, 1., (l, c), device))
        .collect::<Result<_>>()?;
    let padded_x = Tensor::stack(
        &seqs
            .iter()
            .map(|s| s.pad_with_zeros(0, 0, max_len - s.dim(0)?))
            .collect::<Result<Vec<_>>>()?,
        0,
    )?;
    let packed = crate::varlen::Packed::new(&seqs)?;
    let padded_y = candle_core::ModuleT::forward_t(layer, &padded_x, false)?;
    let packed_y = layer.forward_packed(&packed.data, &packed.cu_seqlens, false)?;
    let mut max_abs_diff = 0f32;
    for (b, part) in packed.unpack(&packed_y)?.iter().enumerate() {
        if part.dim(0)? > 0 {
            let want = padded_y.get(b)?.narrow(0, 0, part.dim(0)?)?;
            let d = (part - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            max_abs_diff = max_abs_diff.max(d);
        }
    }
    let padded = time(device, min_time, || {
        candle_core::ModuleT::forward_t(layer, &padded_x, false).map(drop)
    })?;
    let packed_t = time(device, min_time, || {
        layer
            .forward_packed(&packed.data, &packed.cu_seqlens, false)
            .map(drop)
    })?;
    Ok(VarlenComparison {
        lens: lens.to_vec(),
        max_len,
        padded,
        packed: packed_t,
        max_abs_diff,
    })
}

/// How much of a layer's time is spent outside attention: what a graph compiler (the tutorial's
/// `torch.compile`) could remove around the fused kernel.
#[derive(Clone, Copy, Debug)]
pub struct Overhead {
    /// Mean time of one call of the layer.
    pub layer: Duration,
    /// Mean time of the attention inside it.
    pub attention: Duration,
}

impl Overhead {
    /// Share of the layer's time outside attention (projections, reshapes, framework overhead).
    pub fn share_outside(&self) -> f64 {
        1.0 - self.attention.as_secs_f64() / self.layer.as_secs_f64().max(1e-12)
    }
}

/// Runs `f` (one call of a layer that uses [`crate::scaled_dot_product_attention`]) `runs`
/// times under a [`crate::profile::Profiler`] and splits the time into attention and the rest.
pub fn overhead(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Overhead> {
    f()?; // warm-up
    let profiler = crate::profile::Profiler::start(None)?;
    let start = std::time::Instant::now();
    for _ in 0..runs.max(1) {
        f()?;
    }
    let wall = start.elapsed();
    let report = profiler.finish();
    let attention: Duration = report
        .ops
        .iter()
        .filter(|(name, _)| name.starts_with("sdpa."))
        .map(|(_, s)| s.total)
        .sum();
    let n = runs.max(1) as u32;
    Ok(Overhead {
        layer: wall / n,
        attention: attention / n,
    })
}
