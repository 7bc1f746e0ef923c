//! Checkpoints: one safetensors file holding the weights, the AdamW moments, and as metadata
//! the configuration, iteration, best val loss, generator state and tokenizer. Written to a
//! temporary file and renamed over the old one, so an interrupted save never loses a checkpoint.
//! Loading checks the metadata against the tensors before any model is built from it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use crate::config::TrainConfig;
use crate::files;
use crate::memory::{self, Estimate};
use crate::model::ModelConfig;

/// The checkpoint's file name inside `out-dir`.
pub const FILE_NAME: &str = "ckpt.safetensors";
const FORMAT: &str = "nanogpt-checkpoint/1";
const MODEL_PREFIX: &str = "model.";
const POSITION_EMBEDDING: &str = "transformer.wpe.weight";

/// Where the checkpoint of `out_dir` lives.
pub fn path_in(out_dir: &Path) -> PathBuf {
    out_dir.join(FILE_NAME)
}

/// Everything a checkpoint holds besides its tensors.
#[derive(Clone, Debug)]
pub struct Meta {
    /// The run's configuration.
    pub train_config: TrainConfig,
    /// The model's shape, vocabulary size included.
    pub model_config: ModelConfig,
    /// The iteration the run resumes at.
    pub iter_num: usize,
    /// Best val loss so far.
    pub best_val_loss: f64,
    /// AdamW steps taken.
    pub optim_step: usize,
    /// The training generator's state ([`crate::rng::Rng::to_state_string`]).
    pub rng_state: String,
    /// Each attention layer's dropout seed state ([`crate::model::Gpt::attn_seed_states`]).
    pub attn_seeds: Vec<u64>,
    /// The tokenizer ([`crate::tokenizer::Tokenizer::to_json`]).
    pub tokenizer: String,
    /// Whether the evaluation due at `iter_num` has yet to run: true for a checkpoint saved
    /// when a run was interrupted before it, false for the saves that follow an evaluation.
    pub eval_pending: bool,
}

/// A loaded checkpoint.
pub struct Checkpoint {
    /// Its metadata.
    pub meta: Meta,
    /// Its tensors: `model.NAME` weights and `optim.{m,v}.NAME` moments.
    pub tensors: HashMap<String, Tensor>,
}

/// Writes the parameters of `varmap`, the `extra` tensors (optimizer state) and `meta` to
/// `path`, atomically.
pub fn save(path: &Path, varmap: &VarMap, extra: Vec<(String, Tensor)>, meta: &Meta) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(name, var)| (format!("{MODEL_PREFIX}{name}"), var.as_tensor().clone()))
        .collect();
    tensors.extend(extra);
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("train_config".to_string(), meta.train_config.to_toml()?),
        (
            "model_config".to_string(),
            serde_json::to_string(&meta.model_config)?,
        ),
        ("iter_num".to_string(), meta.iter_num.to_string()),
        ("best_val_loss".to_string(), meta.best_val_loss.to_string()),
        ("optim_step".to_string(), meta.optim_step.to_string()),
        ("rng".to_string(), meta.rng_state.clone()),
        (
            "attn_seeds".to_string(),
            meta.attn_seeds
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("tokenizer".to_string(), meta.tokenizer.clone()),
        ("eval_pending".to_string(), meta.eval_pending.to_string()),
    ]);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // In a folder of its own: safetensors makes a temporary of its own beside `tmp`.
    files::write_atomic_in_dir(path, |tmp| {
        safetensors::serialize_to_file(tensors, Some(metadata), tmp)
            .with_context(|| format!("cannot write checkpoint {}", tmp.display()))
    })
}

/// Reads the checkpoint at `path`, its tensors on `device`.
pub fn load(path: &Path, device: &Device) -> Result<Checkpoint> {
    if let Ok(m) = std::fs::metadata(path) {
        // The file's bytes and the tensors made from them.
        let need = Estimate {
            bytes: m.len().saturating_mul(2),
            what: "the checkpoint's bytes and tensors",
        };
        memory::check_fits(
            &format!("loading {}", path.display()),
            &need,
            memory::available(),
        )?;
    }
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "no checkpoint at {}; train one first with `nanogpt train --out-dir {}`",
            path.display(),
            path.parent().unwrap_or(Path::new(".")).display()
        )
    })?;
    let corrupt = |what: String| {
        anyhow!(
            "{} is not a valid nanogpt checkpoint: {what}",
            path.display()
        )
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| corrupt(format!("corrupt or truncated safetensors file ({e})")))?;
    let md = header.metadata().clone().unwrap_or_default();
    let get = |key: &str| -> Result<&String> {
        md.get(key)
            .ok_or_else(|| corrupt(format!("its metadata has no `{key}`")))
    };
    if get("format")? != FORMAT {
        return Err(corrupt(format!(
            "format `{}`, expected `{FORMAT}`",
            get("format")?
        )));
    }
    let number = |key: &str| -> Result<usize> {
        get(key)?
            .parse()
            .ok()
            .filter(|&n| n <= crate::config::MAX_COUNT)
            .ok_or_else(|| {
                corrupt(format!(
                    "`{key}` is not a whole number up to {}",
                    crate::config::MAX_COUNT
                ))
            })
    };
    let meta = Meta {
        train_config: TrainConfig::from_toml(get("train_config")?)
            .map_err(|e| corrupt(format!("bad `train_config` ({e})")))?,
        model_config: serde_json::from_str(get("model_config")?)
            .map_err(|e| corrupt(format!("bad `model_config` ({e})")))?,
        iter_num: number("iter_num")?,
        best_val_loss: get("best_val_loss")?
            .parse()
            .map_err(|_| corrupt("`best_val_loss` is not a number".into()))?,
        optim_step: number("optim_step")?,
        rng_state: get("rng")?.clone(),
        attn_seeds: get("attn_seeds")?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse()
                    .map_err(|_| corrupt("`attn_seeds` are not numbers".into()))
            })
            .collect::<Result<_>>()?,
        tokenizer: get("tokenizer")?.clone(),
        eval_pending: match md.get("eval_pending").map(String::as_str) {
            None | Some("false") => false,
            Some("true") => true,
            Some(_) => return Err(corrupt("`eval_pending` is not true or false".into())),
        },
    };
    let infos = header.tensors();
    let shapes: HashMap<&str, &[usize]> = infos
        .iter()
        .map(|(name, info)| (name.as_str(), info.shape.as_slice()))
        .collect();
    check_model_config(&meta.model_config, &shapes).map_err(|e| corrupt(format!("{e:#}")))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| corrupt(format!("corrupt or truncated safetensors file ({e})")))?;
    Ok(Checkpoint { meta, tensors })
}

/// Checks the model shape the metadata claims against the shapes of the stored weights, so
/// that no model is built from metadata that its tensors do not back: the embeddings give the
/// vocabulary, block size and width, the blocks' indices the depth, ln_f the biases.
fn check_model_config(cfg: &ModelConfig, shapes: &HashMap<&str, &[usize]>) -> Result<()> {
    if cfg.n_head == 0 || !cfg.n_embd.is_multiple_of(cfg.n_head) {
        bail!(
            "`model_config` has n-embd = {} and n-head = {}; n-head must divide n-embd",
            cfg.n_embd,
            cfg.n_head
        );
    }
    if !(0.0..1.0).contains(&cfg.dropout) {
        bail!(
            "`model_config` has dropout = {}, outside [0, 1)",
            cfg.dropout
        );
    }
    let embeddings = [
        ("transformer.wte.weight", [cfg.vocab_size, cfg.n_embd]),
        (POSITION_EMBEDDING, [cfg.block_size, cfg.n_embd]),
    ];
    for (name, want) in embeddings {
        let key = format!("{MODEL_PREFIX}{name}");
        match shapes.get(key.as_str()) {
            Some(have) if *have == want => {}
            Some(have) => bail!(
                "`model_config` (vocab-size {}, block-size {}, n-embd {}) says `{name}` is {want:?}, but it is {have:?}",
                cfg.vocab_size,
                cfg.block_size,
                cfg.n_embd
            ),
            None => bail!("it has no weight `{name}`"),
        }
    }
    let prefix = format!("{MODEL_PREFIX}transformer.h.");
    let blocks = shapes
        .keys()
        .filter_map(|k| {
            k.strip_prefix(&prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|i| i.saturating_add(1))
        .max()
        .unwrap_or(0);
    if blocks != cfg.n_layer {
        bail!(
            "`model_config` says n-layer = {}, but it has weights for {blocks} blocks",
            cfg.n_layer
        );
    }
    let has_bias = shapes.contains_key(format!("{MODEL_PREFIX}transformer.ln_f.bias").as_str());
    if has_bias != cfg.bias {
        bail!(
            "`model_config` says bias = {}, but its weights {} biases",
            cfg.bias,
            if has_bias { "have" } else { "have no" }
        );
    }
    Ok(())
}

impl Checkpoint {
    /// Copies the checkpoint's weights into the variables of `varmap`. A parameter whose
    /// position-embedding rows exceed the model's block size is cropped to it (a smaller
    /// block-size); any other missing, extra or mis-shaped tensor is an error.
    pub fn restore_params(&self, varmap: &VarMap) -> Result<()> {
        let data = varmap.data().lock().expect("varmap lock");
        for (name, var) in data.iter() {
            let key = format!("{MODEL_PREFIX}{name}");
            let Some(t) = self.tensors.get(&key) else {
                bail!("incompatible checkpoint: it has no weight `{name}`");
            };
            let t = crop_rows(name, t, var.dims())
                .ok_or_else(|| {
                    anyhow!(
                        "incompatible checkpoint: weight `{name}` has shape {:?}, the model expects {:?}",
                        t.dims(),
                        var.dims()
                    )
                })??;
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        let extra: Vec<&String> = self
            .tensors
            .keys()
            .filter(|k| {
                k.strip_prefix(MODEL_PREFIX)
                    .is_some_and(|n| !data.contains_key(n))
            })
            .collect();
        if !extra.is_empty() {
            bail!("incompatible checkpoint: the model has no parameters named {extra:?}");
        }
        Ok(())
    }

    /// The optimizer tensors, with position-embedding moments cropped like the weights.
    pub fn optimizer_tensors(&self, varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
        let data = varmap.data().lock().expect("varmap lock");
        let mut out = HashMap::new();
        for (key, t) in &self.tensors {
            let Some(name) = key
                .strip_prefix("optim.m.")
                .or_else(|| key.strip_prefix("optim.v."))
            else {
                continue;
            };
            let t = match data.get(name) {
                Some(var) => crop_rows(name, t, var.dims()).unwrap_or_else(|| Ok(t.clone()))?,
                None => t.clone(),
            };
            out.insert(key.clone(), t);
        }
        Ok(out)
    }
}

/// `t` itself when it has `dims`; for the position embedding `name`, its first rows when it
/// has more (trained with a longer block size); `None` otherwise.
fn crop_rows(name: &str, t: &Tensor, dims: &[usize]) -> Option<candle_core::Result<Tensor>> {
    let td = t.dims();
    if td == dims {
        Some(Ok(t.clone()))
    } else if name == POSITION_EMBEDDING && td.len() == 2 && td[0] > dims[0] && td[1..] == dims[1..]
    {
        Some(t.narrow(0, 0, dims[0]))
    } else {
        None
    }
}
