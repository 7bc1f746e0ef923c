//! Profiling: the device sync that instrumented code calls at the end of its spans (always
//! built, so the op and the models above it can call it), and with the feature `profile` the
//! [`Profiler`] itself, which writes [`tracing`] spans as a Chrome trace and sums them into a
//! table of the top ops (in `profiler.rs`, so a library user without the feature builds neither
//! `tracing-subscriber` nor `tracing-chrome`).

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Device, Result, Tensor};

#[cfg(feature = "profile")]
pub use crate::profiler::{OpStats, Profiler, Report};

/// Number of live profilers: while one runs, instrumented code synchronises the device at the
/// end of its spans so that GPU work is timed where it happens.
pub(crate) static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Waits for `device` when a profiler is running (a no-op otherwise and on the CPU).
pub fn sync_if_profiling(device: &Device) -> Result<()> {
    if ACTIVE.load(Ordering::Relaxed) > 0 {
        device.synchronize()?;
    }
    Ok(())
}

/// Returns `t` once its device has computed it when a profiler runs, so that the span that
/// ends here is timed truly on CUDA (kernels are asynchronous); free otherwise.
pub fn synced(t: Tensor) -> Result<Tensor> {
    sync_if_profiling(t.device())?;
    Ok(t)
}
