//! `exp(x)` for `x <= 0`, vectorisable, shared by the fused GELU and the fused cross-entropy.
//!
//! attn-op's CPU kernels have an `exp` of their own (Cephes' polynomial, in attn-op's
//! `cpu/simd.rs`); the two differ in their last bits, and moving either crate to the other's
//! would change nanogpt's losses, which are kept bit for bit.

/// `c[0] + x·(c[1] + x·(c[2] + ...))` with fused multiply-adds (one rounding each; the targets
/// below have FMA, so this is one instruction per coefficient).
#[inline(always)]
pub(super) fn horner(x: f32, c: &[f32]) -> f32 {
    c.iter()
        .rev()
        .copied()
        .reduce(|acc, c| acc.mul_add(x, c))
        .unwrap_or(0.0)
}

/// `exp(x)` for `x <= 0` to about 2 ulp: `2^n · p(r)` with `r` in `[-ln2/2, ln2/2]`.
#[inline(always)]
pub(super) fn exp_neg(x: f32) -> f32 {
    let x = x.max(-87.0);
    // Adding 1.5·2^23 rounds x·log2(e) to the nearest integer n (ties to even) and leaves n in
    // the low mantissa bits of `shifted`: the conversion to an integer is a bit shift, not a
    // saturating `as i32` (which LLVM does not vectorise).
    const SHIFTER: f32 = 12_582_912.0;
    let shifted = x.mul_add(std::f32::consts::LOG2_E, SHIFTER);
    let n = shifted - SHIFTER;
    let r = n.mul_add(-1.428_606_8e-6, n.mul_add(-0.693_145_75, x));
    let p = horner(
        r,
        &[
            1.0,
            1.0,
            0.5,
            0.166_666_67,
            0.041_666_52,
            0.008_333_55,
            0.001_394_9,
        ],
    );
    // The low 9 bits of `shifted`'s pattern are n mod 512 (2^22 is a multiple of 512), and
    // n + 127 lies in [1, 127] for x in [-87, 0]: shifting it into the exponent field gives 2^n.
    p * f32::from_bits(shifted.to_bits().wrapping_add(127) << 23)
}
