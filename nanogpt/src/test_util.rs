//! Checks shared by the unit tests.

use candle_core::{Result, Tensor, Var};
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
