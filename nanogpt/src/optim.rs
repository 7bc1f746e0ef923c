//! AdamW with nanoGPT's two parameter groups (weight decay on the 2-D weights only), the
//! warmup + cosine learning-rate schedule, and global-norm gradient clipping.

use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::{backprop::GradStore, DType, Tensor, Var};
use candle_nn::VarMap;
use rayon::prelude::*;

use crate::config::TrainConfig;
use crate::fused::{with_data, with_data_mut};

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
    /// Whether the update runs fused, in place on the CPU's f32 data, rather than as composed
    /// Candle ops (the same bits).
    fused: bool,
}

const EPS: f64 = 1e-8;

/// Elements per parallel piece of the in-place updates, element by element (so the result does
/// not depend on the split); tensors smaller than this stay in one piece.
const CHUNK: usize = 1 << 14;

impl AdamW {
    /// An optimizer over every variable of `varmap`, in name order. Tensors of rank >= 2
    /// (matmul weights and embeddings) are decayed; biases and LayerNorm weights are not.
    /// `fused` is the model's decision ([`crate::model::Gpt::fused`]): it holds only for f32
    /// parameters on the CPU.
    pub fn new(varmap: &VarMap, cfg: &TrainConfig, fused: bool) -> Result<Self> {
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
            fused,
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
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`AdamW::step`] with the gradients multiplied by `grad_scale` first (the factor of
    /// [`clip_factor`]): on the CPU the fused update scales each gradient element as it reads
    /// it, instead of a pass that writes scaled copies.
    pub fn step_scaled(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let step_size = lr / (1.0 - b1.powi(t));
        let v_scale = 1.0 / (1.0 - b2.powi(t)).sqrt();
        for (p, g) in self.params.iter_mut().zip(grads) {
            let decay = if p.decay {
                1.0 - lr * self.weight_decay
            } else {
                1.0
            };
            if self.fused {
                // Same arithmetic as below, element by element, in place, in one pass.
                let g = &g.contiguous()?;
                let update = Update {
                    b1: b1 as f32,
                    r1: (1.0 - b1) as f32,
                    b2: b2 as f32,
                    r2: (1.0 - b2) as f32,
                    grad_scale: grad_scale as f32,
                    decay: decay as f32,
                    step_size: step_size as f32,
                    v_scale: v_scale as f32,
                };
                with_data(&[g], "AdamW", |g| {
                    with_data_mut(&p.m, "AdamW", |m| {
                        with_data_mut(&p.v, "AdamW", |v| {
                            with_data_mut(p.var.as_tensor(), "AdamW", |w| {
                                update.apply(w, m, v, g[0])
                            })
                        })
                    })
                })?;
                continue;
            }
            let g = if grad_scale == 1.0 {
                g.clone()
            } else {
                (g * grad_scale)?
            };
            let g = &g;
            p.m = ((&p.m * b1)? + (g * (1.0 - b1))?)?;
            p.v = ((&p.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
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

    /// The moments as named tensors (`optim.m.NAME`, `optim.v.NAME`), for checkpoints: copies,
    /// since [`AdamW::step`] updates the moments in place.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for p in &self.params {
            out.push((format!("optim.m.{}", p.name), p.m.copy()?));
            out.push((format!("optim.v.{}", p.name), p.v.copy()?));
        }
        Ok(out)
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
                // A copy of its own: the moments are updated in place.
                *slot = t.to_dtype(DType::F32)?.to_device(p.var.device())?.copy()?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// One AdamW update of a parameter `w` and its moments `m`, `v` from its gradient `g`, in
/// place, element by element, rounded as the composed Candle ops round it (Candle's `affine`
/// adds 0 after each scalar product; the scalars are f32):
/// `g' = g·s`, `m = m·β₁ + g'·(1-β₁)`, `v = v·β₂ + g'²·(1-β₂)`,
/// `w = w·decay - m / (sqrt(v)·v_scale + eps) · step_size`.
struct Update {
    b1: f32,
    /// `1 - β₁`, rounded from f64 as Candle rounds the scalar.
    r1: f32,
    b2: f32,
    r2: f32,
    grad_scale: f32,
    decay: f32,
    step_size: f32,
    v_scale: f32,
}

impl Update {
    fn apply(
        &self,
        w: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        g: &[f32],
    ) -> candle_core::Result<()> {
        if [m.len(), v.len(), g.len()].iter().any(|&n| n != w.len()) {
            candle_core::bail!(
                "AdamW: a parameter of {} elements with moments of {} and {} and a gradient of {}",
                w.len(),
                m.len(),
                v.len(),
                g.len()
            );
        }
        let scaled = self.grad_scale != 1.0;
        w.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((w, m), v), g)| {
                // One loop per case, so that each vectorises without a branch inside.
                if scaled {
                    self.update(w, m, v, g, |g| g * self.grad_scale + 0.0)
                } else {
                    self.update(w, m, v, g, |g| g)
                }
            });
        Ok(())
    }

    #[inline(always)]
    fn update(
        &self,
        w: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        g: &[f32],
        scale: impl Fn(f32) -> f32,
    ) {
        let (b1, r1, b2, r2) = (self.b1, self.r1, self.b2, self.r2);
        let eps = EPS as f32;
        for (((w, m), v), &g) in w.iter_mut().zip(m).zip(v).zip(g) {
            let g = scale(g);
            *m = (*m * b1 + 0.0) + (g * r1 + 0.0);
            *v = (*v * b2 + 0.0) + ((g * g) * r2 + 0.0);
            let denom = (v.sqrt() * self.v_scale + 0.0) * 1.0 + eps;
            let update = (*m / denom) * self.step_size + 0.0;
            *w = (*w * self.decay + 0.0) - update;
        }
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

/// The global L2 norm of `grads`, and the factor that PyTorch's `clip_grad_norm_` multiplies
/// them by so that it is at most `max_norm`: `max_norm / (norm + 1e-6)`, or 1 when that is
/// larger. The squares are summed in f64, on the CPU straight from f32 data (no squared copy).
pub fn clip_factor(grads: &[Tensor], max_norm: f64) -> Result<(f64, f64)> {
    let mut sum_sq = 0f64;
    for g in grads {
        sum_sq += sum_of_squares(g)?;
    }
    let norm = sum_sq.sqrt();
    Ok((norm, (max_norm / (norm + 1e-6)).min(1.0)))
}

/// Scales `grads` so that their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`); returns the norm before clipping. Training passes [`clip_factor`]'s factor
/// to [`AdamW::step_scaled`] instead, which scales while it updates.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let (norm, scale) = clip_factor(grads, max_norm)?;
    if scale < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// `Σ v²` in f64, in 8 interleaved partial sums (so that the loop vectorises) added in order.
fn squares(c: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut it = c.chunks_exact(8);
    for block in &mut it {
        for (acc, &v) in lanes.iter_mut().zip(block) {
            *acc += f64::from(v) * f64::from(v);
        }
    }
    let tail: f64 = it
        .remainder()
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum();
    lanes.iter().sum::<f64>() + tail
}

/// `Σ g²` over the elements of `g`: in fixed chunks added in order on the CPU (so the same for
/// any thread count), with Candle's ops elsewhere.
fn sum_of_squares(g: &Tensor) -> Result<f64> {
    if g.device().is_cpu() && g.dtype() == DType::F32 && g.is_contiguous() {
        return Ok(with_data(&[g], "gradient norm", |d| {
            let chunks: Vec<f64> = d[0].par_chunks(CHUNK).map(squares).collect();
            Ok(chunks.iter().sum())
        })?);
    }
    Ok(g.sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
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
        let (norm, factor) = clip_factor(&g, 1.0)?;
        assert!((norm - 5.0).abs() < 1e-6 && (factor - 1.0 / (5.0 + 1e-6)).abs() < 1e-12);
        assert_eq!(clip_factor(&g, 10.0)?.1, 1.0);
        assert!((clip_grad_norm(&mut g, 1.0)? - 5.0).abs() < 1e-6);
        assert!((clip_grad_norm(&mut g, 1.0)? - 1.0).abs() < 1e-5);
        // Long enough for several chunks and a tail: the f64 sum of squares.
        let long: Vec<f32> = (0..3 * CHUNK + 5).map(|i| (i % 7) as f32 - 3.0).collect();
        let want: f64 = long.iter().map(|&v| f64::from(v).powi(2)).sum();
        let t = [Tensor::from_vec(long, 3 * CHUNK + 5, &dev)?];
        assert!((clip_factor(&t, 1.0)?.0 - want.sqrt()).abs() < 1e-9 * want.sqrt());
        Ok(())
    }

    /// The fused in-place CPU update gives the composed Candle ops' bits, step after step.
    #[test]
    fn fused_step_matches_composed() -> Result<()> {
        // Wide enough that the weight's update is split into several pieces.
        const COLS: usize = 1000;
        const { assert!(37 * COLS > 2 * CHUNK) };
        let dev = Device::Cpu;
        let cfg = TrainConfig::from_toml(CPU_RECIPE).unwrap();
        let mut rng = crate::rng::Rng::new(5, 0);
        let init_w = rng.normal_vec(37 * COLS, 1.0);
        let init_b = rng.normal_vec(37, 1.0);
        let run = |fused: bool| -> Result<Vec<Vec<f32>>> {
            let map = VarMap::new();
            let vb = candle_nn::VarBuilder::from_varmap(&map, DType::F32, &dev);
            vb.get_with_hints((37, COLS), "w", candle_nn::Init::Const(0.0))?;
            vb.get_with_hints(37, "b", candle_nn::Init::Const(0.0))?;
            map.data().lock().unwrap()["w"].set(&Tensor::from_vec(
                init_w.clone(),
                (37, COLS),
                &dev,
            )?)?;
            map.data().lock().unwrap()["b"].set(&Tensor::from_vec(init_b.clone(), 37, &dev)?)?;
            let mut opt = AdamW::new(&map, &cfg, fused)?;
            let mut grng = crate::rng::Rng::new(6, 0);
            for step in 0..5 {
                let w_grad = grng.normal_vec(37 * COLS, 1.0);
                // A Linear weight's gradient can arrive transposed (not contiguous).
                let w_grad = if step == 3 {
                    Tensor::from_vec(w_grad, (COLS, 37), &dev)?.t()?
                } else {
                    Tensor::from_vec(w_grad, (37, COLS), &dev)?
                };
                let grads = [
                    Tensor::from_vec(grng.normal_vec(37, 1.0), 37, &dev)?,
                    w_grad,
                ];
                // Clipped (scaled) steps and unclipped ones.
                let scale = if step % 2 == 0 { 0.37 } else { 1.0 };
                opt.step_scaled(&grads, 1e-2 * (step + 1) as f64, scale)?;
            }
            let mut out = Vec::new();
            for name in ["b", "w"] {
                out.push(
                    map.data().lock().unwrap()[name]
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                );
            }
            for (_, t) in opt.state()? {
                out.push(t.flatten_all()?.to_vec1::<f32>()?);
            }
            Ok(out)
        };
        assert_eq!(run(true)?, run(false)?);
        Ok(())
    }

    /// One step against PyTorch's formula, for a decayed matrix and an undecayed vector, composed
    /// and fused.
    #[test]
    fn adamw_matches_the_reference_formula() -> Result<()> {
        for fused in [false, true] {
            adamw_step_matches_the_reference_formula(fused)?;
        }
        Ok(())
    }

    fn adamw_step_matches_the_reference_formula(fused: bool) -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&map, DType::F32, &dev);
        vb.get_with_hints((1, 2), "w", candle_nn::Init::Const(1.0))?;
        vb.get_with_hints(1, "b", candle_nn::Init::Const(1.0))?;
        let mut cfg = TrainConfig::from_toml(CPU_RECIPE).unwrap();
        cfg.weight_decay = 0.5;
        let mut opt = AdamW::new(&map, &cfg, fused)?;
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
