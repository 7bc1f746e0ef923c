//! Philox 4x32-10, the counter-based generator behind attention dropout.
//!
//! Every attention probability `(stream, row, col)` gets its own keep/drop decision, computed from
//! the seed and its coordinates alone. Forward and backward (and the CPU and the CUDA kernels)
//! therefore regenerate exactly the same mask without ever storing it.

use multiversion::multiversion;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = u64::from(a) * u64::from(b);
    ((p >> 32) as u32, p as u32)
}

/// The Philox 4x32 block function with 10 rounds (Salmon et al., SC'11).
#[inline(always)]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    let [mut k0, mut k1] = key;
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c0);
        let (hi1, lo1) = mulhilo(M1, c2);
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    [c0, c1, c2, c3]
}

/// Dropout decisions for one attention problem: which probabilities survive.
///
/// Element `(stream, row, col)` draws word `col % 4` of
/// `philox4x32_10([col / 4, row, stream, 0], [seed_lo, seed_hi])` and is kept when that word is
/// at least `floor(p * 2^32)`, so it is kept with probability `1 - p`. `stream` numbers the
/// (batch, head) pair (for packed sequences: `sequence * heads + head`) and `row`/`col` are the
/// query and key positions inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutMask {
    key: [u32; 2],
    threshold: u32,
}

impl DropoutMask {
    /// A mask dropping with probability `p` (`0 <= p < 1`) for the given seed.
    pub fn new(p: f64, seed: u64) -> Self {
        let threshold = (p.clamp(0.0, 1.0) * 4_294_967_296.0)
            .floor()
            .min(u32::MAX as f64) as u32;
        Self {
            key: [seed as u32, (seed >> 32) as u32],
            threshold,
        }
    }

    /// Writes `keep[c] = 1.0` for each kept column `col0 + c`, `0.0` for dropped ones.
    pub fn fill_row(&self, stream: usize, row: usize, col0: usize, keep: &mut [f32]) {
        fill_row(self, stream as u32, row as u32, col0, keep);
    }

    /// The Philox key `[seed_lo, seed_hi]` (for the CUDA kernels, which draw the same words).
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    pub(crate) fn key(&self) -> [u32; 2] {
        self.key
    }

    /// Elements whose Philox word is at least this are kept.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    pub(crate) fn threshold(&self) -> u32 {
        self.threshold
    }

    /// Whether element `(stream, row, col)` is kept.
    pub fn keep(&self, stream: usize, row: usize, col: usize) -> bool {
        let block = philox4x32_10([(col / 4) as u32, row as u32, stream as u32, 0], self.key);
        block[col % 4] >= self.threshold
    }
}

/// Philox blocks computed side by side by [`fill_row`] (vector lanes).
const LANES: usize = 16;

/// [`philox4x32_10`] of the counters `[ctr0[i], row, stream, 0]`, lane by lane: the same words,
/// written so that the compiler vectorises the 32×32→64-bit products across lanes.
#[inline(always)]
fn philox_lanes(ctr0: [u32; LANES], row: u32, stream: u32, key: [u32; 2]) -> [[u32; LANES]; 4] {
    let (mut c0, mut c1, mut c2, mut c3) = (ctr0, [row; LANES], [stream; LANES], [0; LANES]);
    let [mut k0, mut k1] = key;
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        for i in 0..LANES {
            let (hi0, lo0) = mulhilo(M0, c0[i]);
            let (hi1, lo1) = mulhilo(M1, c2[i]);
            c0[i] = hi1 ^ c1[i] ^ k0;
            c1[i] = lo1;
            c2[i] = hi0 ^ c3[i] ^ k1;
            c3[i] = lo0;
        }
    }
    [c0, c1, c2, c3]
}

/// [`DropoutMask::fill_row`]: the unaligned head block by block, the rest in groups of
/// `4·LANES` columns from vectorised blocks.
#[multiversion(targets("x86_64+avx2+fma+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn fill_row(mask: &DropoutMask, stream: u32, row: u32, col0: usize, keep: &mut [f32]) {
    let decide = |word: u32| if word >= mask.threshold { 1.0 } else { 0.0 };
    // The head: up to the next multiple of 4, within one block.
    let head = ((4 - col0 % 4) % 4).min(keep.len());
    let (first, rest) = keep.split_at_mut(head);
    for (c, k) in first.iter_mut().enumerate() {
        let col = col0 + c;
        *k = decide(philox4x32_10([(col / 4) as u32, row, stream, 0], mask.key)[col % 4]);
    }
    let col = col0 + head;
    // The rest from `LANES` blocks at a time (the last group's unused lanes are wasted).
    for (g, group) in rest.chunks_mut(4 * LANES).enumerate() {
        let block0 = (col / 4 + g * LANES) as u32;
        let words = philox_lanes(
            std::array::from_fn(|i| block0.wrapping_add(i as u32)),
            row,
            stream,
            mask.key,
        );
        for (i, k) in group.chunks_mut(4).enumerate() {
            for (w, k) in k.iter_mut().enumerate() {
                *k = decide(words[w][i]);
            }
        }
    }
}

/// A fresh seed for calls that ask for dropout without one: never the same twice in a process.
pub(crate) fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    RandomState::new().hash_one(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known-answer vectors of Random123's kat_vectors for philox4x32 with 10 rounds.
    #[test]
    fn known_answers() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn fill_row_matches_keep() {
        let mask = DropoutMask::new(0.3, 1234);
        // Rows shorter than a vector group, whole groups with unaligned heads, and long tails.
        for len in [11, 64, 67, 150, 257] {
            for col0 in [0, 1, 2, 3, 4, 5, 1001] {
                let mut keep = vec![0.5f32; len];
                mask.fill_row(3, 7, col0, &mut keep);
                for (c, k) in keep.iter().enumerate() {
                    assert_eq!(
                        *k == 1.0,
                        mask.keep(3, 7, col0 + c),
                        "len {len} col0 {col0} c {c}"
                    );
                    assert!(*k == 1.0 || *k == 0.0);
                }
            }
        }
    }

    #[test]
    fn keep_rate_is_one_minus_p() {
        for &p in &[0.0, 0.1, 0.3, 0.5, 0.9] {
            let mask = DropoutMask::new(p, 42);
            let n = 200_000usize;
            let kept = (0..n)
                .filter(|&i| mask.keep(i % 5, i / 1000, i % 1000))
                .count();
            let rate = kept as f64 / n as f64;
            // 5 standard deviations of a binomial proportion.
            let tol = 5.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-9;
            assert!((rate - (1.0 - p)).abs() <= tol, "p {p}: keep rate {rate}");
        }
    }
}
