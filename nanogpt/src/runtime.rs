//! How the `nanogpt` binary sets up the process for training on the CPU (the examples that time
//! it do the same): the allocator, Candle's element-wise threads, and the rayon pool the work
//! runs on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Applies [`keep_freed_memory`] and [`single_threaded_elementwise_ops`], then runs `work` with
/// [`on_worker_pool`]. Call it first thing in `main`, before any other thread starts.
///
/// ```
/// let answer = nanogpt::runtime::run(|| 6 * 7);
/// assert_eq!(answer, 42);
/// ```
pub fn run<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    keep_freed_memory();
    single_threaded_elementwise_ops();
    on_worker_pool(work)
}

/// Runs `work` on a thread of a rayon pool instead of the calling thread. The parallel parts of
/// a step (matrix products, attention) then run on the pool with that thread taking a share,
/// rather than on the pool's workers while the caller sleeps until they finish: one thread fewer
/// competes for the cores, with fewer sleeps and wake-ups per step. On 2 cores a CPU-recipe step
/// measured about 10% faster this way (BENCHMARKS.md). Without a pool it runs `work` here.
pub fn on_worker_pool<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    // Candle walks the autograd graph recursively: a deep model needs more than rayon's default
    // stack (only address space is reserved until it is used).
    match rayon::ThreadPoolBuilder::new().stack_size(64 << 20).build() {
        Ok(pool) => pool.install(work),
        Err(_) => work(),
    }
}

/// Each training step allocates and frees the same large activation buffers. By default glibc
/// serves them with fresh `mmap`s that the kernel must zero page by page (a fifth of a CPU step);
/// keeping freed memory in the heap lets the next step reuse it. Does nothing elsewhere.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator's thresholds, under the allocator's own lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Candle runs element-wise ops on a pool whose threads meet at a barrier after every op, and
/// busy-wait there. When anything else runs on the machine, a descheduled worker stalls each op:
/// with 2 threads on a loaded 2-core machine a CPU-recipe step took 400 ms instead of 92 ms.
/// These ops are memory-bound at nanoGPT's sizes, so they run on one thread unless
/// `CANDLE_NUM_THREADS` says otherwise; matrix products still use every core (`RAYON_NUM_THREADS`).
/// Call it before any other thread starts (it sets an environment variable).
pub fn single_threaded_elementwise_ops() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// While alive, keeps the other workers of the current rayon pool awake: each spins on
/// [`rayon::yield_now`] and runs any parallel piece (a block of a matrix product, an attention
/// tile) the moment it appears. An idle rayon worker goes to sleep within microseconds, and
/// waking it costs tens of microseconds on a virtual machine (an inter-processor interrupt), once
/// per parallel piece: a CPU-recipe step has hundreds. OpenMP, which PyTorch uses, spins the
/// same way. The price is a busy core while the guard lives, so hold it only around steps.
/// Outside a rayon pool, or in a pool of one thread, it does nothing.
///
/// ```
/// use rayon::prelude::*;
/// let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
/// let sum: u64 = pool.install(|| {
///     let _awake = nanogpt::runtime::WorkersAwake::start();
///     (0..1000u64).into_par_iter().sum()
/// });
/// assert_eq!(sum, 499_500);
/// ```
pub struct WorkersAwake {
    awake: Arc<AtomicBool>,
}

impl WorkersAwake {
    /// Starts one spinning job per other worker of the current pool.
    pub fn start() -> Self {
        let awake = Arc::new(AtomicBool::new(true));
        let helpers = rayon::current_num_threads().saturating_sub(1);
        if rayon::current_thread_index().is_some() {
            for _ in 0..helpers {
                let awake = awake.clone();
                rayon::spawn(move || spin(&awake));
            }
        }
        Self { awake }
    }
}

impl Drop for WorkersAwake {
    fn drop(&mut self) {
        self.awake.store(false, Ordering::Release);
    }
}

/// Runs the pool's pending jobs until `awake` turns false, offering the core to other
/// processes now and then.
fn spin(awake: &AtomicBool) {
    let mut idle = 0u32;
    while awake.load(Ordering::Acquire) {
        if matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
            idle = 0;
        } else {
            idle = idle.wrapping_add(1);
            if idle.is_multiple_of(256) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::time::{Duration, Instant};

    #[test]
    fn spinners_run_pieces_and_stop_with_the_guard() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let awake = pool.install(|| {
            let guard = WorkersAwake::start();
            let sum: u64 = (0..100_000u64).into_par_iter().map(|x| x * x).sum();
            assert_eq!(sum, (0..100_000u64).map(|x| x * x).sum::<u64>());
            guard.awake.clone()
        });
        // The guard is gone: the spinner drops its handle of the flag and returns.
        let t0 = Instant::now();
        while Arc::strong_count(&awake) > 1 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the spinner did not stop"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!awake.load(Ordering::Acquire));
    }

    #[test]
    fn outside_a_pool_it_spawns_nothing() {
        let guard = WorkersAwake::start();
        assert_eq!(Arc::strong_count(&guard.awake), 1);
    }
}
