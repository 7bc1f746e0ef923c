//! LayerNorm written with differentiable Candle ops.
//!
//! `candle_nn::LayerNorm` may dispatch to a fused kernel that has no backward pass, so its weights
//! would silently stop learning; this one is built from `mean`, `sub`, `sqr`, `sqrt`, `div`,
//! `mul` and `add`, all of which Candle differentiates.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

/// Layer normalisation over the last dimension, with an optional bias (nanoGPT's `LayerNorm`).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// PyTorch's default epsilon.
const EPS: f64 = 1e-5;

impl LayerNorm {
    /// A LayerNorm of width `dim` whose `weight` (and `bias`) live under `vb`.
    pub fn new(dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: if bias {
                Some(vb.get(dim, "bias")?)
            } else {
                None
            },
        })
    }

    /// `(x - mean) / sqrt(var + eps) * weight + bias`, computed in f32 for half-precision input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let in_dtype = x.dtype();
        let x = match in_dtype {
            DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + EPS)?.sqrt()?)?;
        let y = normed.broadcast_mul(&self.weight.to_dtype(normed.dtype())?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        };
        y.to_dtype(in_dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    /// The analytic gradients of LayerNorm (input, weight, bias) match central finite differences.
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F64, &dev);
        let ln = LayerNorm::new(5, true, vb)?;
        let mut rng = crate::rng::Rng::new(3, 0);
        let mut randn =
            |n: usize| -> Vec<f64> { rng.normal_vec(n, 1.0).into_iter().map(f64::from).collect() };
        for (name, var) in map.data().lock().unwrap().iter() {
            let values = randn(5);
            var.set(&Tensor::from_vec(values, 5, &dev)?)
                .map_err(|e| e.context(name.clone()))?;
        }
        let x = Var::from_vec(randn(15), (3, 5), &dev)?;
        let probe = Tensor::from_vec(randn(15), (3, 5), &dev)?;
        let loss = |ln: &LayerNorm, x: &Tensor| -> Result<f64> {
            (ln.forward(x)? * &probe)?.sum_all()?.to_scalar::<f64>()
        };
        let grads = (ln.forward(&x)? * &probe)?.sum_all()?.backward()?;
        let mut inputs: Vec<(String, Var)> = map
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        inputs.push(("x".into(), x.clone()));
        let h = 1e-6;
        for (name, var) in &inputs {
            let analytic = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"))
                .flatten_all()?
                .to_vec1::<f64>()?;
            let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
            for (i, &a) in analytic.iter().enumerate() {
                let shifted = |delta: f64| -> Result<f64> {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &dev)?)?;
                    let l = loss(&ln, &x)?;
                    var.set(&Tensor::from_vec(base.clone(), var.shape(), &dev)?)?;
                    Ok(l)
                };
                let numeric = (shifted(h)? - shifted(-h)?) / (2.0 * h);
                assert!(
                    (numeric - a).abs() < 1e-6 * (1.0 + a.abs()),
                    "{name}[{i}]: analytic {a}, finite difference {numeric}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn normalises_rows() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let ln = LayerNorm::new(4, false, VarBuilder::from_varmap(&map, DType::F32, &dev))?;
        for var in map.all_vars() {
            var.set(&Tensor::ones(4, DType::F32, &dev)?)?;
        }
        let x = Tensor::new(&[[1f32, 2., 3., 4.], [10., 10., 10., 14.]], &dev)?;
        let y = ln.forward(&x)?;
        let mean = y.mean_keepdim(1)?.flatten_all()?.to_vec1::<f32>()?;
        let var = y.sqr()?.mean_keepdim(1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(mean.iter().all(|m| m.abs() < 1e-5), "{mean:?}");
        assert!(var.iter().all(|v| (v - 1.0).abs() < 1e-3), "{var:?}");
        Ok(())
    }
}
