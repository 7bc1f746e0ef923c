//! The training loop of nanoGPT's `train.py`: evaluate and checkpoint every `eval-interval`
//! iterations, accumulate gradients over micro-batches, clip, step AdamW on a warmup + cosine
//! schedule, and report loss, ms/iter, tokens/s and MFU. [`train`] reads top to bottom as the
//! loop; each step it calls is a method of `Run` below it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};

use attn_op::profile::sync_if_profiling;

use crate::checkpoint::{self, Checkpoint, Meta};
use crate::config::{InitFrom, TrainConfig};
use crate::data::{self, Dataset, PrepareOptions, Split};
use crate::interrupt::Interrupted;
use crate::memory;
use crate::model::{init_weights, Gpt, ModelConfig};
use crate::optim::{clip_factor, learning_rate, AdamW};
use crate::out_dir::{self, OutDirLock};
use crate::plot::{LossLog, Record};
use crate::rng::Rng;
use crate::tokenizer::TokenizerKind;

/// Generator streams derived from the seed.
const INIT_STREAM: u64 = 0;
const TRAIN_STREAM: u64 = 1;
const EVAL_STREAM: u64 = 1 << 32;

/// How to run `train`, beyond the configuration.
pub struct TrainOptions {
    /// The run's knobs.
    pub config: TrainConfig,
    /// Where to train.
    pub device: Device,
    /// Activation precision.
    pub dtype: DType,
    /// Draw the progress bar (when stderr is a terminal); otherwise print a line per log interval.
    pub progress: bool,
    /// Let a fresh run replace the checkpoint and loss history of an earlier run in `out-dir`
    /// (without it, that is an error).
    pub overwrite: bool,
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Iteration reached.
    pub iter: usize,
    /// `(iteration, train, val)` of every evaluation of this run.
    pub evals: Vec<(usize, f64, f64)>,
    /// The loss of every training batch of this run.
    pub batch_losses: Vec<f32>,
    /// Best val loss (the checkpoint's).
    pub best_val_loss: f64,
    /// Median milliseconds of a training iteration (forward, backward, optimizer step).
    pub median_ms: f64,
}

/// Trains as `opts` says; see the module docs.
pub fn train(opts: &TrainOptions) -> Result<TrainSummary> {
    let cfg = &opts.config;
    let (dataset, model_cfg) = load_data(opts)?;
    // The out-dir is this run's until it returns.
    let _lock = OutDirLock::acquire(&cfg.out_dir)?;
    let mut run = Run::init_or_resume(opts, dataset, model_cfg)?;
    // On the CPU the pool's workers spin between parallel pieces; on CUDA they would only burn
    // cores while the GPU works.
    let _awake = opts
        .device
        .is_cpu()
        .then(crate::runtime::WorkersAwake::start);
    for iter in run.start..=cfg.max_iters {
        run.summary.iter = iter;
        run.stop_if_interrupted(iter)?;
        if run.eval_due(iter) {
            run.evaluate_and_checkpoint(iter)?;
        }
        if iter == cfg.max_iters {
            break;
        }

        // One optimizer step over gradient-accumulation-steps micro-batches.
        let t0 = Instant::now();
        let step_span = tracing::debug_span!("train_step", iter).entered();
        let lr = learning_rate(iter, cfg);
        let (loss, grads) = run.forward_backward()?;
        let grad_scale = run.clip(&grads)?;
        run.optimizer_step(&grads, lr, grad_scale)?;
        drop(step_span);
        if !loss.is_finite() {
            bail!("the loss became {loss} at iteration {iter}; try a lower learning-rate or a grad-clip");
        }
        run.log_step(iter, loss, lr, t0.elapsed().as_secs_f64() * 1e3)?;
    }
    run.finish()
}

/// Checks the configuration and the memory it needs, prepares the data folder when it is not
/// yet, and loads it; returns it with the model's shape (its vocabulary is the data's).
fn load_data(opts: &TrainOptions) -> Result<(Dataset, ModelConfig)> {
    let cfg = &opts.config;
    cfg.validate()?;
    // Before preparing data: a run too large even for a one-token vocabulary stops here.
    check_memory(&ModelConfig::from_train(cfg, 1), cfg, opts)?;
    if !data::is_prepared(&cfg.data_dir) {
        eprintln!(
            "{} is not prepared yet; preparing it first",
            cfg.data_dir.display()
        );
        let summary = data::prepare(&PrepareOptions {
            input: std::env::var_os(data::INPUT_ENV).map(Into::into),
            data_dir: cfg.data_dir.clone(),
            tokenizer: TokenizerKind::Char,
            vocab_size: None,
        })?;
        eprintln!("{summary}");
    }
    let dataset = Dataset::load(&cfg.data_dir, cfg.block_size)?;
    let model_cfg = ModelConfig::from_train(cfg, dataset.tokenizer.vocab_size());
    check_memory(&model_cfg, cfg, opts)?;
    Ok((dataset, model_cfg))
}

/// A training run in progress: the model, its optimizer, the generator, and what is logged.
struct Run<'a> {
    cfg: &'a TrainConfig,
    device: &'a Device,
    dtype: DType,
    dataset: Dataset,
    tokenizer_json: String,
    model_cfg: ModelConfig,
    varmap: VarMap,
    model: Gpt,
    opt: AdamW,
    /// The training batches' and dropout's generator.
    rng: Rng,
    ckpt_path: PathBuf,
    /// The first iteration of this run (the checkpoint's when resuming).
    start: usize,
    best_val_loss: f64,
    /// Whether the evaluation at `start` is still to do (a resumed run's checkpoint was saved
    /// after it unless the run was interrupted before it).
    eval_pending: bool,
    log: LossLog,
    bar: ProgressBar,
    flops_per_iter: f64,
    peak_flops: f64,
    step_ms: Vec<f64>,
    /// Smoothed model-FLOPs utilisation; negative until the first 5 iterations are behind.
    running_mfu: f64,
    summary: TrainSummary,
}

impl<'a> Run<'a> {
    /// Builds the model and its optimizer, then initialises them from the seed or, with
    /// `init-from = resume`, restores them from the out-dir's checkpoint.
    fn init_or_resume(
        opts: &'a TrainOptions,
        dataset: Dataset,
        model_cfg: ModelConfig,
    ) -> Result<Self> {
        let (cfg, device) = (&opts.config, &opts.device);
        let tokenizer_json = dataset.tokenizer.to_json()?;
        let ckpt_path = checkpoint::path_in(&cfg.out_dir);
        let resume = match cfg.init_from {
            InitFrom::Scratch => {
                if out_dir::prepare_fresh(&cfg.out_dir, opts.overwrite)? {
                    eprintln!(
                        "--overwrite: replacing the earlier run in {}",
                        cfg.out_dir.display()
                    );
                }
                None
            }
            InitFrom::Resume => Some(checkpoint::load(&ckpt_path, device)?),
        };
        if let Some(ckpt) = &resume {
            check_compatible(ckpt, &model_cfg, &tokenizer_json)?;
        }
        let varmap = VarMap::new();
        let model = Gpt::new(
            &model_cfg,
            VarBuilder::from_varmap(&varmap, DType::F32, device),
            cfg.fused,
        )?;
        let mut opt = AdamW::new(&varmap, cfg, model.fused())?;
        let (rng, start, best_val_loss, eval_pending) = match &resume {
            None => {
                let mut init_rng = Rng::new(cfg.seed, INIT_STREAM);
                init_weights(&varmap, cfg.n_layer, &mut init_rng)?;
                let seeds: Vec<u64> = (0..cfg.n_layer).map(|_| init_rng.next_u64()).collect();
                model.set_attn_seed_states(&seeds)?;
                (Rng::new(cfg.seed, TRAIN_STREAM), 0, f64::INFINITY, true)
            }
            Some(ckpt) => {
                ckpt.restore_params(&varmap)?;
                opt.load_state(&ckpt.optimizer_tensors(&varmap)?, ckpt.meta.optim_step)?;
                model
                    .set_attn_seed_states(&ckpt.meta.attn_seeds)
                    .with_context(|| format!("{} has bad attention seeds", ckpt_path.display()))?;
                let rng = Rng::from_state_string(&ckpt.meta.rng_state).with_context(|| {
                    format!("{} has a bad generator state", ckpt_path.display())
                })?;
                (
                    rng,
                    ckpt.meta.iter_num,
                    ckpt.meta.best_val_loss,
                    ckpt.meta.eval_pending,
                )
            }
        };
        let num_params = model.num_params(&varmap);
        let [(nd, pd), (nn, pn)] = opt.group_sizes();
        eprintln!("number of parameters: {:.2}M", num_params as f64 / 1e6);
        eprintln!("decayed parameter tensors: {nd}, with {pd} parameters; non-decayed: {nn}, with {pn} parameters");
        if let Some(ckpt) = &resume {
            eprintln!(
                "resuming from {} at iteration {}",
                ckpt_path.display(),
                ckpt.meta.iter_num
            );
        }
        drop(resume);

        let log = match cfg.init_from {
            InitFrom::Scratch => LossLog::create(&cfg.out_dir)?,
            InitFrom::Resume => LossLog::resume(&cfg.out_dir, start, !eval_pending)?,
        };
        Ok(Self {
            flops_per_iter: model.flops_per_token(num_params) * cfg.tokens_per_iter() as f64,
            peak_flops: crate::device::peak_flops(device, opts.dtype),
            bar: progress_bar(opts.progress, cfg.max_iters, start),
            summary: TrainSummary {
                iter: start,
                evals: Vec::new(),
                batch_losses: Vec::new(),
                best_val_loss,
                median_ms: f64::NAN,
            },
            cfg,
            device,
            dtype: opts.dtype,
            dataset,
            tokenizer_json,
            model_cfg,
            varmap,
            model,
            opt,
            rng,
            ckpt_path,
            start,
            best_val_loss,
            eval_pending,
            log,
            step_ms: Vec::new(),
            running_mfu: -1.0,
        })
    }

    /// After SIGINT/SIGTERM: stops before `iter`'s evaluation, saving a checkpoint unless
    /// nothing changed since the start.
    fn stop_if_interrupted(&mut self, iter: usize) -> Result<()> {
        let Some(signal) = crate::interrupt::received() else {
            return Ok(());
        };
        self.bar.finish_and_clear();
        let saved = iter > self.start;
        if saved {
            self.checkpoint(iter, self.eval_due(iter))?;
        }
        let at = Interrupted::at(signal, iter, saved.then_some(&self.ckpt_path), self.cfg);
        Err(at.into())
    }

    /// Whether `iter` evaluates: every `eval-interval` and at the end, except where a resumed
    /// run's checkpoint already did.
    fn eval_due(&self, iter: usize) -> bool {
        let due = iter.is_multiple_of(self.cfg.eval_interval) || iter == self.cfg.max_iters;
        let done_before = iter == self.start && !self.eval_pending;
        due && !done_before
    }

    /// Estimates the train and val losses, logs them, and saves a checkpoint when the val loss
    /// is the best so far (or always, with `always-save-checkpoint`).
    fn evaluate_and_checkpoint(&mut self, iter: usize) -> Result<()> {
        let (train_loss, val_loss) = {
            let _span = tracing::debug_span!("eval").entered();
            estimate_loss(
                &self.model,
                &self.dataset,
                self.cfg,
                iter,
                self.device,
                self.dtype,
            )?
        };
        self.say(format!(
            "step {iter}: train loss {train_loss:.4}, val loss {val_loss:.4}"
        ));
        self.log.push(eval_record(iter, "train", train_loss))?;
        self.log.push(eval_record(iter, "val", val_loss))?;
        self.summary.evals.push((iter, train_loss, val_loss));
        if val_loss < self.best_val_loss || self.cfg.always_save_checkpoint {
            self.best_val_loss = self.best_val_loss.min(val_loss);
            if iter > 0 {
                self.checkpoint(iter, false)?;
                self.say(format!("saving checkpoint to {}", self.ckpt_path.display()));
                // A signal during the save: that save is the one to stop with.
                if let Some(signal) = crate::interrupt::received() {
                    self.bar.finish_and_clear();
                    let at = Interrupted::at(signal, iter, Some(&self.ckpt_path), self.cfg);
                    return Err(at.into());
                }
            }
        }
        Ok(())
    }

    /// Saves the model, the optimizer and the generator at `iter`; `eval_pending` says whether
    /// `iter`'s evaluation is still to do when resuming.
    fn checkpoint(&self, iter: usize, eval_pending: bool) -> Result<()> {
        let meta = Meta {
            train_config: self.cfg.clone(),
            model_config: self.model_cfg.clone(),
            iter_num: iter,
            best_val_loss: self.best_val_loss,
            optim_step: self.opt.step_count(),
            rng_state: self.rng.to_state_string(),
            attn_seeds: self.model.attn_seed_states(),
            tokenizer: self.tokenizer_json.clone(),
            eval_pending,
        };
        let _span = tracing::debug_span!("checkpoint").entered();
        checkpoint::save(&self.ckpt_path, &self.varmap, self.opt.state()?, &meta)
    }

    /// The next training batch (nanoGPT's `get_batch('train')`).
    fn get_batch(&mut self) -> Result<(Tensor, Tensor)> {
        let _span = tracing::debug_span!("get_batch").entered();
        let cfg = self.cfg;
        self.dataset.batch(
            Split::Train,
            cfg.batch_size,
            cfg.block_size,
            &mut self.rng,
            self.device,
        )
    }

    /// Forward and backward over `gradient-accumulation-steps` micro-batches: the mean loss, and
    /// the gradients of the mean, in the optimizer's order.
    fn forward_backward(&mut self) -> Result<(f32, Vec<Tensor>)> {
        let micro = self.cfg.gradient_accumulation_steps;
        let mut grads: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0f32;
        for _ in 0..micro {
            let (x, y) = self.get_batch()?;
            let loss = self.model.loss(&x, &y, self.dtype, Some(&mut self.rng))?;
            loss_sum += loss.to_scalar::<f32>()?;
            let g = {
                let _span = tracing::debug_span!("backward").entered();
                let g = self.opt.grads(&(loss / micro as f64)?.backward()?)?;
                sync_if_profiling(self.device)?;
                g
            };
            grads = Some(match grads {
                None => g,
                Some(acc) => acc
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        let grads = grads.expect("at least one micro-batch");
        Ok((loss_sum / micro as f32, grads))
    }

    /// The factor that clips the gradients' global norm to `grad-clip` (1 without clipping); the
    /// optimizer step applies it.
    fn clip(&self, grads: &[Tensor]) -> Result<f64> {
        if self.cfg.grad_clip <= 0.0 {
            return Ok(1.0);
        }
        let _span = tracing::debug_span!("clip_grad_norm").entered();
        let (_, scale) = clip_factor(grads, self.cfg.grad_clip)?;
        sync_if_profiling(self.device)?;
        Ok(scale)
    }

    /// One AdamW step at learning rate `lr` on the gradients times `grad_scale`.
    fn optimizer_step(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        let _span = tracing::debug_span!("optimizer_step").entered();
        self.opt.step_scaled(grads, lr, grad_scale)?;
        sync_if_profiling(self.device)?;
        Ok(())
    }

    /// Records iteration `iter` (its loss, learning rate and `ms`) in loss.csv and the
    /// summary, and reports it with tokens/s and MFU on the progress bar or, every
    /// `log-interval`, as a line.
    fn log_step(&mut self, iter: usize, loss: f32, lr: f64, ms: f64) -> Result<()> {
        self.step_ms.push(ms);
        self.summary.batch_losses.push(loss);
        self.log.push(Record {
            iter,
            split: "batch".into(),
            loss: loss as f64,
            lr: Some(lr),
            ms: Some(ms),
        })?;
        // The first iterations include warm-up (allocations, the pool starting).
        if self.step_ms.len() >= 5 {
            let mfu = self.flops_per_iter / (ms / 1e3) / self.peak_flops;
            self.running_mfu = if self.running_mfu < 0.0 {
                mfu
            } else {
                0.9 * self.running_mfu + 0.1 * mfu
            };
        }
        let tok_s = self.cfg.tokens_per_iter() as f64 / (ms / 1e3);
        let mfu = if self.running_mfu < 0.0 {
            "-".to_string()
        } else {
            format!("{:.2}%", self.running_mfu * 100.0)
        };
        self.bar.set_position(iter as u64 + 1);
        self.bar.set_message(format!(
            "loss {loss:.4} | {ms:.1} ms/iter | {tok_s:.0} tok/s | MFU {mfu}"
        ));
        if self.bar.is_hidden() && iter.is_multiple_of(self.cfg.log_interval) {
            println!("iter {iter}: loss {loss:.4}, time {ms:.2}ms, {tok_s:.0} tok/s, mfu {mfu}");
        }
        Ok(())
    }

    /// Prints `line` above the progress bar, or on stdout without one.
    fn say(&self, line: String) {
        if self.bar.is_hidden() {
            println!("{line}")
        } else {
            self.bar.println(line)
        }
    }

    /// Plots the losses and reports the run.
    fn finish(mut self) -> Result<TrainSummary> {
        self.bar.finish_and_clear();
        let cfg = self.cfg;
        let mut summary = self.summary;
        summary.best_val_loss = self.best_val_loss;
        summary.median_ms = median(&mut self.step_ms);
        let png = crate::plot::plot(self.log.records(), &cfg.out_dir.join("loss.png"))?;
        println!(
            "done at iteration {}: median {:.1} ms/iter over {} iterations ({:.0} tok/s), best val loss {:.4}; losses in {} and {}",
            summary.iter,
            summary.median_ms,
            self.step_ms.len(),
            cfg.tokens_per_iter() as f64 / (summary.median_ms / 1e3),
            summary.best_val_loss,
            cfg.out_dir.join("loss.csv").display(),
            png.display()
        );
        Ok(summary)
    }
}

/// Errors when training `model` as `cfg` says would need more memory than the machine has
/// (checked on the CPU; a GPU's memory is not known here), or sizes that overflow.
fn check_memory(model: &ModelConfig, cfg: &TrainConfig, opts: &TrainOptions) -> Result<()> {
    let need = memory::training(model, cfg.batch_size, opts.dtype.size_in_bytes())?;
    if opts.device.is_cpu() {
        memory::check_fits("this training run", &need, memory::available())?;
    }
    Ok(())
}

/// Mean loss over `eval-iters` batches of each split, without dropout. The batches depend only
/// on the seed and the iteration, so a resumed run evaluates exactly as the original.
fn estimate_loss(
    model: &Gpt,
    data: &Dataset,
    cfg: &TrainConfig,
    iter: usize,
    device: &Device,
    dtype: DType,
) -> Result<(f64, f64)> {
    let mut out = [0f64; 2];
    for (slot, split) in out.iter_mut().zip([Split::Train, Split::Val]) {
        let mut rng = Rng::new(cfg.seed, EVAL_STREAM + iter as u64);
        let mut total = 0f64;
        for _ in 0..cfg.eval_iters {
            let (x, y) = data.batch(split, cfg.batch_size, cfg.block_size, &mut rng, device)?;
            total += model.loss(&x, &y, dtype, None)?.to_scalar::<f32>()? as f64;
        }
        *slot = total / cfg.eval_iters as f64;
    }
    Ok((out[0], out[1]))
}

/// Errors unless the checkpoint's model can continue as `want` on this data.
fn check_compatible(ckpt: &Checkpoint, want: &ModelConfig, tokenizer_json: &str) -> Result<()> {
    let have = &ckpt.meta.model_config;
    if ckpt.meta.tokenizer != tokenizer_json {
        bail!(
            "incompatible checkpoint: it was trained with a different tokenizer ({} tokens) than the data in this data-dir ({} tokens)",
            have.vocab_size,
            want.vocab_size
        );
    }
    for (name, h, w) in [
        ("n-layer", have.n_layer, want.n_layer),
        ("n-head", have.n_head, want.n_head),
        ("n-embd", have.n_embd, want.n_embd),
        ("bias", have.bias as usize, want.bias as usize),
    ] {
        if h != w {
            bail!("incompatible checkpoint: it has {name} = {h} but the configuration asks for {w}; drop the override to resume");
        }
    }
    if want.block_size > have.block_size {
        bail!(
            "block-size {} is larger than the checkpoint's {}; a model cannot grow its context, use block-size <= {}",
            want.block_size,
            have.block_size,
            have.block_size
        );
    }
    Ok(())
}

fn eval_record(iter: usize, split: &str, loss: f64) -> Record {
    Record {
        iter,
        split: split.into(),
        loss,
        lr: None,
        ms: None,
    }
}

fn progress_bar(visible: bool, max_iters: usize, start: usize) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(max_iters as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_position(start as u64);
    bar
}

/// The median of `xs` (NaN when empty).
pub fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}
