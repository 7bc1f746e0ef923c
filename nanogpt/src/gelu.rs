//! GELU (the exact, erf-based one of `nn.GELU()`) as one fused CPU op with its backward.
//!
//! Candle's `gelu_erf` calls a scalar `erf` per element and differentiates through half a dozen
//! temporary tensors; in the CPU recipe that was the largest cost after the matrix products.
//! Here the forward and the backward are each one vectorised pass. Other devices and dtypes
//! use Candle's op.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use multiversion::multiversion;

use crate::cpu_data::{f32_slice, Unwritten};

/// `x · Φ(x)`, Φ the standard normal CDF.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let _span = tracing::debug_span!("gelu").entered();
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(GeluErf)
    } else {
        crate::model::synced(x.gelu_erf()?)
    }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/sqrt(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `c[0] + x·(c[1] + x·(c[2] + ...))` with fused multiply-adds (one rounding each; the targets
/// below have FMA, so this is one instruction per coefficient).
#[inline(always)]
fn horner(x: f32, c: &[f32]) -> f32 {
    c.iter()
        .rev()
        .copied()
        .reduce(|acc, c| acc.mul_add(x, c))
        .unwrap_or(0.0)
}

/// `exp(x)` for `x <= 0` to about 2 ulp: `2^n · p(r)` with `r` in `[-ln2/2, ln2/2]`.
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
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

/// `(Φ(x), φ(x))`: the normal CDF by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7
/// in erf) and the normal density.
#[inline(always)]
fn cdf_pdf(x: f32) -> (f32, f32) {
    let z = x.abs() * FRAC_1_SQRT_2;
    let t = 1.0 / 0.327_591_1f32.mul_add(z, 1.0);
    let poly = t * horner(
        t,
        &[
            0.254_829_6,
            -0.284_496_74,
            1.421_413_7,
            -1.453_152_1,
            1.061_405_4,
        ],
    );
    let e = exp_neg(-z * z); // exp(-x²/2)
    let erf_abs = (-poly).mul_add(e, 1.0);
    let erf = if x < 0.0 { -erf_abs } else { erf_abs };
    (0.5 * (1.0 + erf), e * INV_SQRT_2PI)
}

/// `y = gelu(x)` element by element (also the fused MLP's forward).
#[multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
pub(crate) fn forward(x: &[f32], y: &mut [MaybeUninit<f32>]) {
    for (y, &x) in y.iter_mut().zip(x) {
        y.write(x * cdf_pdf(x).0);
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn backward(x: &[f32], grad: &[f32], dx: &mut [MaybeUninit<f32>]) {
    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(grad) {
        let (cdf, pdf) = cdf_pdf(x);
        dx.write(g * x.mul_add(pdf, cdf));
    }
}

/// `h = gelu(u)` and `g *= gelu'(u)` element by element (the fused MLP's backward).
#[multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
pub(crate) fn forward_backward_in_place(u: &[f32], h: &mut [MaybeUninit<f32>], g: &mut [f32]) {
    for ((h, g), &u) in h.iter_mut().zip(g.iter_mut()).zip(u) {
        let (cdf, pdf) = cdf_pdf(u);
        h.write(u * cdf);
        *g *= u.mul_add(pdf, cdf);
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "nanogpt-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "gelu")?;
        let mut y = Unwritten::new(x.len());
        forward(x, y.slots());
        // SAFETY: `forward` wrote every element.
        Ok((
            CpuStorage::F32(unsafe { y.assume_written() }),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _span = tracing::debug_span!("gelu.backward").entered();
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "nanogpt-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32_slice(s1, l1, "gelu")?, f32_slice(s2, l2, "gelu")?);
        if g.len() != x.len() {
            candle_core::bail!(
                "gelu backward: {} gradients for {} inputs",
                g.len(),
                x.len()
            );
        }
        let mut dx = Unwritten::new(x.len());
        backward(x, g, dx.slots());
        // SAFETY: `backward` wrote every element (`g` is as long as `x`).
        Ok((
            CpuStorage::F32(unsafe { dx.assume_written() }),
            l1.shape().clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Forward and gradient agree with Candle's composed `gelu_erf` (computed in f64).
    #[test]
    fn matches_candle_gelu_erf() -> Result<()> {
        let xs: Vec<f32> = (-1200..=1200).map(|i| i as f32 / 100.0).collect();
        let n = xs.len();
        let x = Var::from_vec(xs.clone(), n, &Device::Cpu)?;
        let probe = Tensor::from_vec(
            (0..n).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<_>>(),
            n,
            &Device::Cpu,
        )?;
        let y = gelu(x.as_tensor())?;
        let dx = (&y * &probe)?
            .sum_all()?
            .backward()?
            .get(&x)
            .unwrap()
            .to_vec1::<f32>()?;
        let x64 = Var::from_vec(
            xs.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            n,
            &Device::Cpu,
        )?;
        let y64 = x64.as_tensor().gelu_erf()?;
        let probe64 = probe.to_dtype(DType::F64)?;
        let dx64 = (&y64 * &probe64)?
            .sum_all()?
            .backward()?
            .get(&x64)
            .unwrap()
            .to_vec1::<f64>()?;
        let (y, y64) = (y.to_vec1::<f32>()?, y64.to_vec1::<f64>()?);
        for i in 0..n {
            assert!(
                (y[i] as f64 - y64[i]).abs() < 2e-6 * (1.0 + y64[i].abs()),
                "y({}) = {} vs {}",
                xs[i],
                y[i],
                y64[i]
            );
            assert!(
                (dx[i] as f64 - dx64[i]).abs() < 2e-6 * (1.0 + dx64[i].abs()),
                "dy({}) = {} vs {}",
                xs[i],
                dx[i],
                dx64[i]
            );
        }
        Ok(())
    }
}
