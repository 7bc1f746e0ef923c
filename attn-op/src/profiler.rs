//! The profiler (feature `profile`, re-exported from [`crate::profile`]), in the spirit of `torch.profiler`: spans of [`tracing`] (attn-op marks every
//! attention call, forward and backward; applications add their own, e.g. per module) are written
//! as a Chrome trace (open it in `chrome://tracing` or Perfetto) and summed into a table of the
//! top ops by total time.
//!
//! ```
//! use attn_op::profile::Profiler;
//! use candle_core::{Device, Tensor};
//! let dir = std::env::temp_dir().join(format!("attn-op-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let profiler = Profiler::start(Some(&dir.join("trace.json")))?;
//! let q = Tensor::randn(0f32, 1., (1, 2, 8, 4), &Device::Cpu)?;
//! attn_op::scaled_dot_product_attention(&q, &q, &q, &Default::default())?;
//! let report = profiler.finish();
//! assert!(report.to_string().contains("sdpa.flash"));
//! assert!(std::fs::metadata(dir.join("trace.json"))?.len() > 0);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), candle_core::Error>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Result;
use tracing::span::{Attributes, Id};
use tracing::subscriber::DefaultGuard;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Time of one span name, summed over its calls.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpStats {
    /// Time inside the span, children included.
    pub total: Duration,
    /// Time inside the span minus its child spans.
    pub self_time: Duration,
    /// Number of times the span was closed.
    pub calls: usize,
}

/// What a [`Profiler`] measured: stats per span name.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Stats per span name.
    pub ops: HashMap<String, OpStats>,
    /// Wall time from start to finish.
    pub wall: Duration,
}

impl Report {
    /// The ops sorted by total time, longest first.
    pub fn top(&self) -> Vec<(&str, OpStats)> {
        let mut v: Vec<_> = self.ops.iter().map(|(k, s)| (k.as_str(), *s)).collect();
        v.sort_by(|a, b| b.1.total.cmp(&a.1.total).then(a.0.cmp(b.0)));
        v
    }
}

impl fmt::Display for Report {
    /// `torch.profiler`'s `key_averages().table()`: name, self time, total time, calls, share of
    /// the wall time.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wall = self.wall.as_secs_f64().max(1e-12);
        writeln!(
            f,
            "{:<40} {:>12} {:>12} {:>8} {:>8}",
            "Name", "Self ms", "Total ms", "Calls", "Share"
        )?;
        for (name, s) in self.top() {
            writeln!(
                f,
                "{:<40} {:>12.3} {:>12.3} {:>8} {:>7.1}%",
                name,
                s.self_time.as_secs_f64() * 1e3,
                s.total.as_secs_f64() * 1e3,
                s.calls,
                100.0 * s.total.as_secs_f64() / wall
            )?;
        }
        write!(f, "wall time: {:.3} ms", wall * 1e3)
    }
}

/// Per-span timing kept in the span's extensions.
struct SpanTime {
    entered: Option<Instant>,
    busy: Duration,
    children: Duration,
}

/// A `tracing` layer summing span times per name.
struct StatsLayer {
    ops: Arc<Mutex<HashMap<String, OpStats>>>,
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for StatsLayer {
    fn on_new_span(&self, _attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanTime {
                entered: None,
                busy: Duration::ZERO,
                children: Duration::ZERO,
            });
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(t) = span.extensions_mut().get_mut::<SpanTime>() {
                t.entered = Some(Instant::now());
            }
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let elapsed = {
            let mut ext = span.extensions_mut();
            let Some(t) = ext.get_mut::<SpanTime>() else {
                return;
            };
            let elapsed = t.entered.take().map_or(Duration::ZERO, |e| e.elapsed());
            t.busy += elapsed;
            elapsed
        };
        if let Some(parent) = span.parent() {
            if let Some(t) = parent.extensions_mut().get_mut::<SpanTime>() {
                t.children += elapsed;
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let ext = span.extensions();
        let Some(t) = ext.get::<SpanTime>() else {
            return;
        };
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let s = ops.entry(span.name().to_string()).or_default();
        s.total += t.busy;
        s.self_time += t.busy.saturating_sub(t.children);
        s.calls += 1;
    }
}

/// Records the spans of the current thread until [`Profiler::finish`]: into a Chrome trace file
/// when given a path, and into a [`Report`] always.
pub struct Profiler {
    ops: Arc<Mutex<HashMap<String, OpStats>>>,
    start: Instant,
    flush: Option<tracing_chrome::FlushGuard>,
    _default: DefaultGuard,
}

impl Profiler {
    /// Starts recording this thread's spans; with `trace`, also writes them to that file in
    /// Chrome's trace-event JSON format (completed when the profiler finishes).
    pub fn start(trace: Option<&Path>) -> Result<Self> {
        let ops = Arc::new(Mutex::new(HashMap::new()));
        let stats = StatsLayer { ops: ops.clone() };
        let (chrome, flush) = match trace {
            Some(path) => {
                // Fail early with a clear message rather than inside the trace writer.
                std::fs::File::create(path).map_err(|e| {
                    candle_core::Error::Msg(format!(
                        "profile: cannot write {}: {e}",
                        path.display()
                    ))
                })?;
                let (layer, guard) = tracing_chrome::ChromeLayerBuilder::new()
                    .file(path)
                    .include_args(true)
                    .build();
                (Some(layer), Some(guard))
            }
            None => (None, None),
        };
        let subscriber = tracing_subscriber::registry().with(stats).with(chrome);
        let default = tracing::subscriber::set_default(subscriber);
        crate::profile::ACTIVE.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            ops,
            start: Instant::now(),
            flush,
            _default: default,
        })
    }

    /// Stops recording, completes the trace file, and returns the stats.
    pub fn finish(self) -> Report {
        let wall = self.start.elapsed();
        let ops = self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(flush) = &self.flush {
            flush.flush();
        }
        drop(self);
        Report { ops, wall }
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        crate::profile::ACTIVE.fetch_sub(1, Ordering::Relaxed);
    }
}
