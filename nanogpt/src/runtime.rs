//! How the `nanogpt` binary sets up the process for training on the CPU (the examples that time
//! it do the same): the allocator, Candle's element-wise threads, and the rayon pool the work
//! runs on.

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
