//! GELU (the exact, erf-based one of `nn.GELU()`), element by element, for the fused MLP's
//! forward and backward; tested against Candle's `gelu_erf`, which the plain model uses.

use std::mem::MaybeUninit;

use multiversion::multiversion;

use super::exp::{exp_neg, horner};

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/sqrt(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

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

/// `h = gelu(u)` and `g *= gelu'(u)` element by element (the fused MLP's backward).
#[multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
pub(crate) fn forward_backward_in_place(u: &[f32], h: &mut [MaybeUninit<f32>], g: &mut [f32]) {
    for ((h, g), &u) in h.iter_mut().zip(g.iter_mut()).zip(u) {
        let (cdf, pdf) = cdf_pdf(u);
        h.write(u * cdf);
        *g *= u.mul_add(pdf, cdf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Result, Tensor, Var};

    /// Forward and gradient agree with Candle's `gelu_erf` (computed in f64).
    #[test]
    fn matches_candle_gelu_erf() -> Result<()> {
        let xs: Vec<f32> = (-1200..=1200).map(|i| i as f32 / 100.0).collect();
        let n = xs.len();
        let mut dx: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
        let probe = Tensor::from_vec(dx.clone(), n, &Device::Cpu)?;
        let mut y = vec![MaybeUninit::uninit(); n];
        forward(&xs, &mut y);
        let mut h = vec![MaybeUninit::uninit(); n];
        forward_backward_in_place(&xs, &mut h, &mut dx);
        // SAFETY: both functions write every element.
        let y: Vec<f32> = y.iter().map(|v| unsafe { v.assume_init() }).collect();
        let h: Vec<f32> = h.iter().map(|v| unsafe { v.assume_init() }).collect();
        assert_eq!(y, h, "the forward and the backward's forward agree");
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
        let y64 = y64.to_vec1::<f64>()?;
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
