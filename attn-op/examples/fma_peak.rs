//! This CPU's measured f32 peak, the denominator of `scripts/vs-pytorch-sdpa.sh`'s "% of peak":
//! every core runs twelve independent chains of the widest fused multiply-add it has (512-bit
//! with AVX-512F, else 256-bit with FMA) for about a second, at whatever clock the chip holds
//! under that load. A nominal figure (cores × the MHz `/proc/cpuinfo` reports × FLOPs per cycle)
//! misses turbo clocks and FMA units that run 512-bit operations as two halves (AMD Zen 4).
//!
//!     cargo run --release -p attn-op --example fma_peak
//!
//! Prints `peak_gflops <all cores> per_core <one core's share> width <bits>`.

use std::time::Instant;

/// FMAs each chain runs per loop iteration, and loop iterations per timing.
const CHAINS: u64 = 12;
const ITERS: u64 = 100_000_000;

/// Runs `ITERS` iterations of twelve independent FMAs and returns FMAs per second and the
/// vector width in bits (0 where neither width is available).
fn fmas_per_second() -> (f64, u32) {
    #[cfg(target_arch = "x86_64")]
    {
        let t = Instant::now();
        let width = if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the loop touches only the registers it names.
            unsafe { x86::chains_512(ITERS) };
            512
        } else if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX and FMA; as above.
            unsafe { x86::chains_256(ITERS) };
            256
        } else {
            return (0.0, 0);
        };
        ((CHAINS * ITERS) as f64 / t.elapsed().as_secs_f64(), width)
    }
    #[cfg(not(target_arch = "x86_64"))]
    (0.0, 0)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;

    macro_rules! chains {
        ($name:ident, $feat:literal, $reg:literal) => {
            /// Twelve independent FMA chains on registers 2-13, `iters` times.
            ///
            /// # Safety
            /// The CPU must have the function's target features.
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(iters: u64) {
                // SAFETY: only the named registers and the counter change.
                unsafe {
                    asm!(
                        concat!("vxorps ", $reg, "0, ", $reg, "0, ", $reg, "0"),
                        concat!("vxorps ", $reg, "1, ", $reg, "1, ", $reg, "1"),
                        "2:",
                        concat!("vfmadd231ps ", $reg, "2, ", $reg, "0, ", $reg, "1"),
                        concat!("vfmadd231ps ", $reg, "3, ", $reg, "0, ", $reg, "1"),
                        concat!("vfmadd231ps ", $reg, "4, ", $reg, "0, ", $reg, "1"),
                        concat!("vfmadd231ps ", $reg, "5, ", $reg, "0, ", $reg, "1"),
                        concat!("vfmadd231ps ", $reg, "6, ", $reg, "0, ", $reg, "1"),
                        concat!("vfmadd231ps ", $reg, "7, ", $reg, "0, ", $reg, "1"),
                        concat!("vfmadd231ps ", $reg, "8, ", $reg, "0, ", $reg, "1"),
                        concat!("vfmadd231ps ", $reg, "9, ", $reg, "0, ", $reg, "1"),
                        concat!("vfmadd231ps ", $reg, "10, ", $reg, "0, ", $reg, "1"),
                        concat!("vfmadd231ps ", $reg, "11, ", $reg, "0, ", $reg, "1"),
                        concat!("vfmadd231ps ", $reg, "12, ", $reg, "0, ", $reg, "1"),
                        concat!("vfmadd231ps ", $reg, "13, ", $reg, "0, ", $reg, "1"),
                        "dec {n}",
                        "jnz 2b",
                        n = inout(reg) iters => _,
                        out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                        out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                        out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
                        out("xmm12") _, out("xmm13") _,
                        options(nostack, nomem),
                    );
                }
            }
        };
    }

    chains!(chains_512, "avx512f", "zmm");
    chains!(chains_256, "avx,fma", "ymm");
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // All cores at once, as the benchmarks run: the clock under full load is what counts.
    let runs: Vec<_> = (0..cores)
        .map(|_| std::thread::spawn(fmas_per_second))
        .collect();
    let results: Vec<_> = runs.into_iter().map(|r| r.join().unwrap()).collect();
    let width = results.first().map_or(0, |r| r.1);
    let flops_per_fma = 2.0 * f64::from(width) / 32.0;
    let total: f64 = results.iter().map(|r| r.0 * flops_per_fma).sum::<f64>() / 1e9;
    println!(
        "peak_gflops {total:.0} per_core {:.1} width {width}",
        total / cores as f64
    );
}
