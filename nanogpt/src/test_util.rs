//! Checks shared by the unit tests.

use candle_core::{Result, Tensor, Var};

use crate::rng::Rng;
use candle_nn::VarMap;

/// Asserts that the autograd gradients of the scalar f64 `loss()` with respect to `x` and to
/// every variable of `map` match central finite differences (step 1e-6, tolerance 1e-6 relative
/// to the gradient plus 1e-6 absolute). `loss` must read the variables' current values.
pub(crate) fn assert_gradients_match_finite_differences(
    map: &VarMap,
    x: &Var,
    loss: impl Fn() -> Result<Tensor>,
) -> Result<()> {
    let grads = loss()?.backward()?;
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
                var.set(&Tensor::from_vec(v, var.shape(), var.device())?)?;
                let l = loss()?.to_scalar::<f64>()?;
                var.set(&Tensor::from_vec(base.clone(), var.shape(), var.device())?)?;
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

/// Sets every variable of `map` to fresh N(0, std) values from `rng`, in name order.
pub(crate) fn set_random(map: &VarMap, rng: &mut Rng, std: f64) -> Result<()> {
    let data = map.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    for name in names {
        let var = &data[&name];
        let values = rng.normal_vec(var.elem_count(), std);
        var.set(&Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Output, then the gradients of `Σ y ⊙ probe` with respect to `x` and each of `params`.
pub(crate) fn output_and_grads(
    y: &Tensor,
    probe: &Tensor,
    x: &Var,
    params: &[Tensor],
) -> Result<Vec<Vec<f32>>> {
    let grads = (y * probe)?.sum_all()?.backward()?;
    let mut out = vec![y.flatten_all()?.to_vec1()?];
    for t in std::iter::once(x.as_tensor()).chain(params) {
        out.push(grads.get(t).expect("a gradient").flatten_all()?.to_vec1()?);
    }
    Ok(out)
}

/// Asserts that each tensor of `fused` is within `tol` (relative to the largest magnitude of
/// the reference tensor) of `reference`'s, element by element.
pub(crate) fn assert_close(fused: &[Vec<f32>], reference: &[Vec<f32>], tol: f32) {
    assert_eq!(fused.len(), reference.len());
    for (k, (a, b)) in fused.iter().zip(reference).enumerate() {
        assert_eq!(a.len(), b.len(), "tensor {k}");
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!(
                (p - q).abs() <= tol * scale,
                "tensor {k}[{i}]: fused {p} vs reference {q} (scale {scale})"
            );
        }
    }
}
