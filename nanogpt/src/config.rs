//! The training configuration: nanoGPT's knobs, read from the recipes in `configs/`, a TOML file
//! and command-line flags, in that order of precedence (later wins).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

/// nanoGPT's GPU recipe, `configs/shakespeare_char.toml`.
pub const GPU_RECIPE: &str = include_str!("../../configs/shakespeare_char.toml");
/// nanoGPT's CPU recipe, `configs/shakespeare_char_cpu.toml`.
pub const CPU_RECIPE: &str = include_str!("../../configs/shakespeare_char_cpu.toml");

/// Where the weights of a training run come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum InitFrom {
    /// A new model with nanoGPT's initialisation.
    Scratch,
    /// The checkpoint in `out-dir`, continuing its run exactly.
    Resume,
}

/// Every knob of a training run (nanoGPT's `train.py` globals, in kebab-case).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TrainConfig {
    /// Folder of the checkpoint, the loss CSV and the loss plot.
    pub out_dir: PathBuf,
    /// Folder of `train.bin`, `val.bin` and the tokenizer written by `nanogpt prepare`.
    pub data_dir: PathBuf,
    /// Start from scratch or resume the checkpoint in `out_dir`.
    pub init_from: InitFrom,
    /// Seed of every random draw (init, batches, dropout). TOML integers stop at 2^63 - 1, so
    /// larger seeds are written as strings.
    #[serde(with = "seed_toml")]
    pub seed: u64,
    /// Iterations between loss estimates (and checkpoint saves).
    pub eval_interval: usize,
    /// Batches per loss estimate.
    pub eval_iters: usize,
    /// Iterations between log lines.
    pub log_interval: usize,
    /// Save a checkpoint at every evaluation, not only when the val loss improves.
    pub always_save_checkpoint: bool,
    /// Micro-batches whose gradients are summed into one optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Context length in tokens.
    pub block_size: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads per block.
    pub n_head: usize,
    /// Embedding width.
    pub n_embd: usize,
    /// Dropout probability (training only).
    pub dropout: f64,
    /// Biases in the Linear and LayerNorm layers.
    pub bias: bool,
    /// Whether the CPU fast path ([`crate::fused`]) may run the model; `false` runs the plain
    /// model of [`crate::model`] everywhere. It holds on the CPU only: for the model's f32
    /// passes without biases, and for the AdamW update.
    #[serde(default = "fused_by_default")]
    pub fused: bool,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Total optimizer steps.
    pub max_iters: usize,
    /// AdamW weight decay, applied to the 2-D weights only.
    pub weight_decay: f64,
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// Global gradient-norm clip; 0 disables it.
    pub grad_clip: f64,
    /// Decay the learning rate (linear warmup, then cosine to `min_lr`).
    pub decay_lr: bool,
    /// Warmup steps.
    pub warmup_iters: usize,
    /// Step at which the cosine decay reaches `min_lr`.
    pub lr_decay_iters: usize,
    /// Final learning rate.
    pub min_lr: f64,
}

/// The same knobs as command-line flags; each one given overrides the TOML value.
#[derive(Clone, Debug, Default, Args, Serialize)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)] // each field is documented by its `help`
pub struct ConfigOverrides {
    #[arg(long, help = "Folder for the checkpoint, loss CSV and plot")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_dir: Option<PathBuf>,
    #[arg(long, help = "Folder of train.bin/val.bin and the tokenizer")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[arg(
        long,
        value_enum,
        help = "scratch or resume (from the checkpoint in out-dir)"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<InitFrom>,
    #[arg(long, help = "Seed of init, batches and dropout")]
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "seed_toml::serialize_some"
    )]
    pub seed: Option<u64>,
    #[arg(long, value_parser = parse_count, help = "Iterations between evaluations")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_interval: Option<usize>,
    #[arg(long, value_parser = parse_count, help = "Batches per loss estimate")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_iters: Option<usize>,
    #[arg(long, value_parser = parse_count, help = "Iterations between log lines")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_interval: Option<usize>,
    #[arg(long, help = "Save at every evaluation, not only on improvement")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub always_save_checkpoint: Option<bool>,
    #[arg(long, value_parser = parse_count, help = "Micro-batches per optimizer step")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gradient_accumulation_steps: Option<usize>,
    #[arg(long, value_parser = parse_count, help = "Sequences per micro-batch")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    #[arg(long, value_parser = parse_count, help = "Context length in tokens")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    #[arg(long, value_parser = parse_count, help = "Transformer blocks")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_layer: Option<usize>,
    #[arg(long, value_parser = parse_count, help = "Attention heads")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_head: Option<usize>,
    #[arg(long, value_parser = parse_count, help = "Embedding width (a multiple of n-head)")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_embd: Option<usize>,
    #[arg(long, help = "Dropout probability in [0, 1)")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
    #[arg(long, help = "Biases in Linear and LayerNorm layers")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bias: Option<bool>,
    #[arg(long, help = "The CPU fast path (false: the plain model everywhere)")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fused: Option<bool>,
    #[arg(long, help = "Peak learning rate")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    #[arg(long, value_parser = parse_count, help = "Total optimizer steps")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_iters: Option<usize>,
    #[arg(long, help = "AdamW weight decay (2-D weights only)")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    #[arg(long, help = "AdamW beta1")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f64>,
    #[arg(long, help = "AdamW beta2")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f64>,
    #[arg(long, help = "Global gradient-norm clip (0 = off)")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_clip: Option<f64>,
    #[arg(long, help = "Warmup + cosine learning-rate decay")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decay_lr: Option<bool>,
    #[arg(long, value_parser = parse_count, help = "Linear warmup steps")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_iters: Option<usize>,
    #[arg(long, value_parser = parse_count, help = "Step where the cosine decay reaches min-lr")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_decay_iters: Option<usize>,
    #[arg(long, help = "Final learning rate")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<f64>,
}

/// `fused` when a configuration leaves it out (the recipes before the key existed).
fn fused_by_default() -> bool {
    true
}

impl TrainConfig {
    /// Parses a complete configuration from TOML text.
    pub fn from_toml(text: &str) -> Result<Self> {
        Ok(toml::from_str(text)?)
    }

    /// The TOML text of this configuration (stored in checkpoints).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).context("the configuration cannot be written as TOML")
    }

    /// Layers `file` (a possibly partial TOML file) and then `flags` over `base`, and validates.
    pub fn layered(
        base: &TrainConfig,
        file: Option<&Path>,
        flags: &ConfigOverrides,
    ) -> Result<Self> {
        let mut table = toml::Table::try_from(base)
            .context("the base configuration cannot be written as TOML")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            let file_table: toml::Table = toml::from_str(&text)
                .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
            for (key, value) in file_table {
                if !table.contains_key(&key) {
                    let known: Vec<&str> = table.keys().map(String::as_str).collect();
                    bail!(
                        "config file {}: unknown key `{key}`; known keys: {}",
                        path.display(),
                        known.join(", ")
                    );
                }
                table.insert(key, value);
            }
            let config: TrainConfig = table
                .clone()
                .try_into()
                .with_context(|| format!("config file {} has a bad value", path.display()))?;
            drop(config);
        }
        // Counts go through TOML, whose integers stop at 2^63 - 1: name a flag beyond that.
        if let serde_json::Value::Object(map) = serde_json::to_value(flags)? {
            for (key, value) in map {
                if let Some(n) = value.as_u64().filter(|&n| n > MAX_COUNT as u64) {
                    bail!("--{key} {n} is too large; it must be at most {MAX_COUNT}");
                }
            }
        }
        let flag_table =
            toml::Table::try_from(flags).context("the flags cannot be written as TOML")?;
        table.extend(flag_table);
        let config: TrainConfig = table.try_into()?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every knob, naming the bad one and what it accepts.
    pub fn validate(&self) -> Result<()> {
        // (name, value, whether 0 is refused); every count must also be representable.
        let counts = [
            ("n-layer", self.n_layer, true),
            ("n-head", self.n_head, true),
            ("n-embd", self.n_embd, true),
            ("block-size", self.block_size, true),
            ("batch-size", self.batch_size, true),
            (
                "gradient-accumulation-steps",
                self.gradient_accumulation_steps,
                true,
            ),
            ("eval-interval", self.eval_interval, true),
            ("eval-iters", self.eval_iters, true),
            ("log-interval", self.log_interval, true),
            ("max-iters", self.max_iters, false),
            ("warmup-iters", self.warmup_iters, false),
            ("lr-decay-iters", self.lr_decay_iters, false),
        ];
        for (name, value, positive) in counts {
            if positive && value == 0 {
                bail!("{name} = 0; it must be at least 1");
            }
        }
        for (name, value, _) in counts {
            check_count(name, value)?;
        }
        if self.checked_tokens_per_iter().is_none() {
            bail!(
                "gradient-accumulation-steps x batch-size x block-size = {} x {} x {} is too large to count; use smaller values",
                self.gradient_accumulation_steps,
                self.batch_size,
                self.block_size
            );
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            bail!(
                "n-embd = {} is not divisible by n-head = {}; pick an n-embd that is a multiple of n-head (e.g. {})",
                self.n_embd,
                self.n_head,
                self.n_embd.div_ceil(self.n_head) * self.n_head
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("dropout = {}; it must be in [0, 1)", self.dropout);
        }
        for (name, value) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&value) {
                bail!("{name} = {value}; it must be in [0, 1)");
            }
        }
        for (name, value) in [
            ("learning-rate", self.learning_rate),
            ("min-lr", self.min_lr),
            ("weight-decay", self.weight_decay),
            ("grad-clip", self.grad_clip),
        ] {
            if !value.is_finite() || value < 0.0 {
                bail!("{name} = {value}; it must be a finite number >= 0");
            }
        }
        Ok(())
    }

    /// Tokens in one optimizer step (saturating; [`TrainConfig::validate`] refuses overflow).
    pub fn tokens_per_iter(&self) -> usize {
        self.checked_tokens_per_iter().unwrap_or(usize::MAX)
    }

    fn checked_tokens_per_iter(&self) -> Option<usize> {
        self.gradient_accumulation_steps
            .checked_mul(self.batch_size)?
            .checked_mul(self.block_size)
    }
}

/// The largest count a configuration holds: TOML's largest integer.
pub const MAX_COUNT: usize = i64::MAX as usize;

fn check_count(name: &str, value: usize) -> Result<()> {
    if value > MAX_COUNT {
        bail!("{name} = {value} is too large; it must be at most {MAX_COUNT}");
    }
    Ok(())
}

/// clap's parser of the count flags: a whole number up to [`MAX_COUNT`].
fn parse_count(s: &str) -> std::result::Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number >= 0"))?;
    if n > MAX_COUNT {
        return Err(format!("{n} is too large; it must be at most {MAX_COUNT}"));
    }
    Ok(n)
}

/// Serde for the seed in TOML, whose integers stop at `i64::MAX`: larger seeds are written as
/// decimal strings, and either form is read back.
mod seed_toml {
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(seed: &u64, s: S) -> Result<S::Ok, S::Error> {
        match i64::try_from(*seed) {
            Ok(small) => s.serialize_i64(small),
            Err(_) => s.serialize_str(&seed.to_string()),
        }
    }

    pub fn serialize_some<S: Serializer>(seed: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match seed {
            Some(seed) => serialize(seed, s),
            None => s.serialize_none(),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seed {
        Int(i64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let bad = |what: &dyn std::fmt::Display| {
            de::Error::custom(format!(
                "seed = {what}: expected a whole number from 0 to {}",
                u64::MAX
            ))
        };
        match Seed::deserialize(d)? {
            Seed::Int(n) => u64::try_from(n).map_err(|_| bad(&n)),
            Seed::Text(t) => t.parse().map_err(|_| bad(&format!("{t:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu() -> TrainConfig {
        TrainConfig::from_toml(CPU_RECIPE).unwrap()
    }

    #[test]
    fn recipes_parse() {
        let gpu = TrainConfig::from_toml(GPU_RECIPE).unwrap();
        assert_eq!(
            (gpu.n_layer, gpu.n_head, gpu.n_embd, gpu.block_size),
            (6, 6, 384, 256)
        );
        assert_eq!(
            (gpu.batch_size, gpu.max_iters, gpu.eval_iters),
            (64, 5000, 200)
        );
        let cpu = cpu();
        assert_eq!(
            (cpu.n_layer, cpu.n_head, cpu.n_embd, cpu.block_size),
            (4, 4, 128, 64)
        );
        assert_eq!(
            (cpu.batch_size, cpu.max_iters, cpu.lr_decay_iters),
            (12, 2000, 2000)
        );
        assert_eq!((cpu.dropout, cpu.eval_iters), (0.0, 20));
        assert_eq!(
            TrainConfig::from_toml(&cpu.to_toml().unwrap()).unwrap(),
            cpu
        );
    }

    #[test]
    fn any_u64_seed_round_trips_and_counts_are_bounded() {
        for seed in [0, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
            let flags = ConfigOverrides {
                seed: Some(seed),
                ..Default::default()
            };
            let c = TrainConfig::layered(&cpu(), None, &flags).unwrap();
            assert_eq!(c.seed, seed);
            assert_eq!(TrainConfig::from_toml(&c.to_toml().unwrap()).unwrap(), c);
        }
        let flags = ConfigOverrides {
            max_iters: Some(usize::MAX),
            ..Default::default()
        };
        let e = TrainConfig::layered(&cpu(), None, &flags).unwrap_err();
        assert!(
            e.to_string()
                .contains("--max-iters 18446744073709551615 is too large"),
            "{e}"
        );
        let flags = ConfigOverrides {
            gradient_accumulation_steps: Some(1 << 62),
            ..Default::default()
        };
        let e = TrainConfig::layered(&cpu(), None, &flags).unwrap_err();
        assert!(e.to_string().contains("too large to count"), "{e}");
        assert!(parse_count("9223372036854775808").is_err());
        assert_eq!(parse_count("12"), Ok(12));
        let e =
            TrainConfig::from_toml(&CPU_RECIPE.replace("seed = 1337", "seed = -1")).unwrap_err();
        assert!(format!("{e:#}").contains("seed = -1"), "{e:#}");
    }

    #[test]
    fn flags_override_and_are_validated() {
        let flags = ConfigOverrides {
            n_layer: Some(2),
            max_iters: Some(7),
            ..Default::default()
        };
        let c = TrainConfig::layered(&cpu(), None, &flags).unwrap();
        assert_eq!((c.n_layer, c.max_iters, c.n_head), (2, 7, 4));
        let flags = ConfigOverrides {
            n_embd: Some(130),
            ..Default::default()
        };
        let e = TrainConfig::layered(&cpu(), None, &flags)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("n-embd = 130 is not divisible by n-head = 4"),
            "{e}"
        );
        let flags = ConfigOverrides {
            dropout: Some(1.0),
            ..Default::default()
        };
        let e = TrainConfig::layered(&cpu(), None, &flags)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dropout = 1"), "{e}");
    }

    #[test]
    fn file_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "n-layer = 3\nn-layers = 4\n").unwrap();
        let e = TrainConfig::layered(&cpu(), Some(&path), &ConfigOverrides::default()).unwrap_err();
        assert!(e.to_string().contains("unknown key `n-layers`"), "{e:#}");
        std::fs::write(&path, "n-layer = \"four\"\n").unwrap();
        let e = TrainConfig::layered(&cpu(), Some(&path), &ConfigOverrides::default()).unwrap_err();
        assert!(format!("{e:#}").contains("n-layer"), "{e:#}");
        std::fs::write(&path, "n-layer = 3\n").unwrap();
        let flags = ConfigOverrides {
            n_layer: Some(5),
            ..Default::default()
        };
        let c = TrainConfig::layered(&cpu(), Some(&path), &ConfigOverrides::default()).unwrap();
        assert_eq!(c.n_layer, 3);
        let c = TrainConfig::layered(&cpu(), Some(&path), &flags).unwrap();
        assert_eq!(c.n_layer, 5);
    }
}
