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
    let p = check_sdpa("bench::sweep", q, k, v, opts)?;
    let run = || -> Result<()> {
        let y = scaled_dot_product_attention(q, k, v, opts)?;
        if backward {
            y.sum_all()?.backward()?;
        }
        Ok(())
    };
    let mut rows = Vec::new();
    let default = select(&p, opts, q.device()).map(|s| s.backend);
    rows.push(SweepRow {
        backend: None,
        ran: default.as_ref().ok().copied(),
        result: match default {
            Ok(_) => time(q.device(), min_time, run).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
    });
    for backend in Backend::ALL {
        let result = match refusal(backend, &p, opts.attn_mask.is_some(), q.device()) {
            Some(reason) => Err(reason),
            None => {
                let _only = sdpa_kernel(&[backend]);
                time(q.device(), min_time, run).map_err(|e| e.to_string())
            }
        };
        rows.push(SweepRow {
            backend: Some(backend),
            ran: Some(backend),
            result,
        });
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
