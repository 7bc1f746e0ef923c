//! AdamW with nanoGPT's two parameter groups (weight decay on the 2-D weights only), the
//! warmup + cosine learning-rate schedule, and global-norm gradient clipping.

use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::{backprop::GradStore, DType, Tensor, Var};
use candle_nn::VarMap;

use crate::config::TrainConfig;

/// One parameter and its Adam moments.
struct Param {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// PyTorch's AdamW (decoupled weight decay, bias-corrected moments, eps = 1e-8).
pub struct AdamW {
    params: Vec<Param>,
    step: usize,
    beta1: f64,
    beta2: f64,
    weight_decay: f64,
}

const EPS: f64 = 1e-8;

impl AdamW {
    /// An optimizer over every variable of `varmap`, in name order. Tensors of rank >= 2
    /// (matmul weights and embeddings) are decayed; biases and LayerNorm weights are not.
    pub fn new(varmap: &VarMap, cfg: &TrainConfig) -> Result<Self> {
        let data = varmap.data().lock().expect("varmap lock");
        let mut params = data
            .iter()
            .map(|(name, var)| {
                Ok(Param {
                    name: name.clone(),
                    var: var.clone(),
                    decay: var.rank() >= 2,
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        params.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            params,
            step: 0,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            weight_decay: cfg.weight_decay,
        })
    }

    /// `(tensors, parameters)` in the decayed group and in the other group.
    pub fn group_sizes(&self) -> [(usize, usize); 2] {
        let count = |decay: bool| {
            let ps = self.params.iter().filter(|p| p.decay == decay);
            (ps.clone().count(), ps.map(|p| p.var.elem_count()).sum())
        };
        [count(true), count(false)]
    }

    /// The gradient of each parameter in `store`, in the optimizer's order.
    pub fn grads(&self, store: &GradStore) -> Result<Vec<Tensor>> {
        self.params
            .iter()
            .map(|p| match store.get(p.var.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => bail!("parameter {} received no gradient", p.name),
            })
            .collect()
    }

    /// One AdamW step at learning rate `lr` with `grads` from [`AdamW::grads`].
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let step_size = lr / (1.0 - b1.powi(t));
        let v_scale = 1.0 / (1.0 - b2.powi(t)).sqrt();
        for (p, g) in self.params.iter_mut().zip(grads) {
            p.m = ((&p.m * b1)? + (g * (1.0 - b1))?)?;
            p.v = ((&p.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let decay = if p.decay {
                1.0 - lr * self.weight_decay
            } else {
                1.0
            };
            let denom = ((p.v.sqrt()? * v_scale)? + EPS)?;
            let update = ((&p.m / denom)? * step_size)?;
            p.var.set(&((p.var.as_tensor() * decay)? - update)?)?;
        }
        Ok(())
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The moments as named tensors (`optim.m.NAME`, `optim.v.NAME`), for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .flat_map(|p| {
                [
                    (format!("optim.m.{}", p.name), p.m.clone()),
                    (format!("optim.v.{}", p.name), p.v.clone()),
                ]
            })
            .collect()
    }

    /// Restores moments saved by [`AdamW::state`] after `step` steps.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for p in &mut self.params {
            for (kind, slot) in [("m", &mut p.m), ("v", &mut p.v)] {
                let key = format!("optim.{kind}.{}", p.name);
                let Some(t) = tensors.get(&key) else {
                    bail!("the checkpoint has no optimizer state `{key}`");
                };
                if t.shape() != p.var.shape() {
                    bail!(
                        "optimizer state `{key}` has shape {:?} but the parameter has {:?}",
                        t.dims(),
                        p.var.dims()
                    );
                }
                *slot = t.to_dtype(DType::F32)?.to_device(p.var.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The learning rate at iteration `it`: linear warmup, cosine decay to `min_lr` at
/// `lr_decay_iters`, then `min_lr` (constant `learning_rate` when `decay_lr` is off).
pub fn learning_rate(it: usize, cfg: &TrainConfig) -> f64 {
    if !cfg.decay_lr {
        return cfg.learning_rate;
    }
    if it < cfg.warmup_iters {
        return cfg.learning_rate * (it + 1) as f64 / (cfg.warmup_iters + 1) as f64;
    }
    if it > cfg.lr_decay_iters {
        return cfg.min_lr;
    }
    let ratio =
        (it - cfg.warmup_iters) as f64 / (cfg.lr_decay_iters - cfg.warmup_iters).max(1) as f64;
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
    cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)
}

/// Scales `grads` so that their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sum_sq = 0f64;
    for g in grads.iter() {
        sum_sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sum_sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{TrainConfig, CPU_RECIPE};
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays() {
        let cfg = TrainConfig::from_toml(CPU_RECIPE).unwrap();
        assert!((learning_rate(0, &cfg) - 1e-3 / 101.0).abs() < 1e-12);
        assert!((learning_rate(100, &cfg) - 1e-3).abs() < 1e-12);
        assert!((learning_rate(1050, &cfg) - 5.5e-4).abs() < 1e-9);
        assert!((learning_rate(2000, &cfg) - 1e-4).abs() < 1e-12);
        assert!((learning_rate(5000, &cfg) - 1e-4).abs() < 1e-12);
    }

    #[test]
    fn clipping_bounds_the_global_norm() -> Result<()> {
        let dev = Device::Cpu;
        let mut g = vec![Tensor::new(&[3f32, 0.], &dev)?, Tensor::new(&[4f32], &dev)?];
        assert!((clip_grad_norm(&mut g, 1.0)? - 5.0).abs() < 1e-6);
        assert!((clip_grad_norm(&mut g, 1.0)? - 1.0).abs() < 1e-5);
        Ok(())
    }

    /// One step against PyTorch's formula, for a decayed matrix and an undecayed vector.
    #[test]
    fn adamw_matches_the_reference_formula() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&map, DType::F32, &dev);
        vb.get_with_hints((1, 2), "w", candle_nn::Init::Const(1.0))?;
        vb.get_with_hints(1, "b", candle_nn::Init::Const(1.0))?;
        let mut cfg = TrainConfig::from_toml(CPU_RECIPE).unwrap();
        cfg.weight_decay = 0.5;
        let mut opt = AdamW::new(&map, &cfg)?;
        assert_eq!(opt.group_sizes(), [(1, 2), (1, 1)]);
        // Order is by name: b, then w.
        let grads = [
            Tensor::new(&[2f32], &dev)?,
            Tensor::new(&[[0.5f32, -1.0]], &dev)?,
        ];
        opt.step(&grads, 0.1)?;
        // After one step m̂ = g and v̂ = g², so the update is lr·g/(|g| + eps) = ±lr.
        let w = map.data().lock().unwrap()["w"]
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = map.data().lock().unwrap()["b"]
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!((b[0] - 0.9).abs() < 1e-6, "{b:?}");
        assert!(
            (w[0] - (0.95 - 0.1)).abs() < 1e-6 && (w[1] - (0.95 + 0.1)).abs() < 1e-6,
            "{w:?}"
        );
        Ok(())
    }
}
