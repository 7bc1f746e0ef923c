//! Memory estimates, made before anything large is allocated: sizes from flags, config files and
//! checkpoints are multiplied with checked arithmetic, and a run that would need more memory
//! than the machine has is refused with both figures, instead of aborting in the allocator.

use anyhow::{bail, Result};

use crate::model::ModelConfig;

/// Bytes a run needs, and what they are for (for the message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Estimate {
    /// Bytes needed.
    pub bytes: u64,
    /// What they hold, e.g. "parameters, AdamW state, activations".
    pub what: &'static str,
}

/// `a · b · ...` or an error saying which sizes overflow, in the words of `what`.
pub fn product(what: &str, factors: &[u64]) -> Result<u64> {
    factors
        .iter()
        .try_fold(1u64, |acc, &f| acc.checked_mul(f))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{what}: {} is too large to count (more than 2^64)",
                factors
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" x ")
            )
        })
}

/// `a + b + ...` with the same check.
pub fn sum(what: &str, terms: &[u64]) -> Result<u64> {
    terms
        .iter()
        .try_fold(0u64, |acc, &t| acc.checked_add(t))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{what}: {} is too large to count (more than 2^64)",
                terms
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" + ")
            )
        })
}

fn u(x: usize) -> u64 {
    x as u64
}

/// The number of parameters of a GPT of this shape (position embedding included), as
/// [`crate::model::Gpt::new`] creates them.
pub fn param_count(cfg: &ModelConfig) -> Result<u64> {
    let what = "the model's parameter count";
    let c = u(cfg.n_embd);
    let bias = u64::from(cfg.bias);
    // Per block: ln_1 and ln_2, c_attn (C x 3C), attention c_proj (C x C), mlp c_fc (C x 4C)
    // and c_proj (4C x C), with their biases.
    let c2 = product(what, &[c, c])?;
    let block = sum(
        what,
        &[
            product(what, &[12, c2])?,
            product(what, &[2 * (1 + bias), c])?,
            product(what, &[bias, 9, c])?,
        ],
    )?;
    sum(
        what,
        &[
            product(what, &[u(cfg.vocab_size), c])?,
            product(what, &[u(cfg.block_size), c])?,
            product(what, &[u(cfg.n_layer), block])?,
            product(what, &[1 + bias, c])?,
        ],
    )
}

/// What training a model of shape `cfg` on micro-batches of `batch_size` sequences needs:
/// f32 parameters, their gradients and the accumulated gradients, AdamW's two moments, and the
/// activations kept for the backward pass (in `dtype_bytes` per element, f32 logits).
pub fn training(cfg: &ModelConfig, batch_size: usize, dtype_bytes: usize) -> Result<Estimate> {
    let what = "the training run's memory";
    let params = param_count(cfg)?;
    let tokens = product(what, &[u(batch_size), u(cfg.block_size)])?;
    // Per token and block: LayerNorm outputs, q|k|v, attention output, projections, the MLP's
    // 4C hidden layer before and after GELU, residuals: about 20 C values, and their gradients.
    let per_token = sum(
        what,
        &[
            product(what, &[u(cfg.n_layer), 40, u(cfg.n_embd)])?,
            product(what, &[4, u(cfg.n_embd)])?,
        ],
    )?;
    let activations = sum(
        what,
        &[
            product(what, &[tokens, per_token, u(dtype_bytes)])?,
            // Logits, their softmax and gradient, in f32.
            product(what, &[tokens, u(cfg.vocab_size), 3, 4])?,
        ],
    )?;
    Ok(Estimate {
        bytes: sum(what, &[product(what, &[params, 5 * 4])?, activations])?,
        what: "parameters, gradients, AdamW state, activations",
    })
}

/// What sampling `max_new_tokens` tokens after a `prompt_len`-token prompt needs: the weights,
/// the checkpoint's tensors while loading, the KV cache of one sequence, and the tokens and
/// their text.
pub fn sampling(cfg: &ModelConfig, prompt_len: usize, max_new_tokens: usize) -> Result<Estimate> {
    let what = "sampling's memory";
    let params = param_count(cfg)?;
    let kv_cache = product(
        what,
        &[u(cfg.n_layer), 2, u(cfg.block_size), u(cfg.n_embd), 4],
    )?;
    let tokens = sum(
        "the prompt's tokens + --max-new-tokens",
        &[u(prompt_len), u(max_new_tokens)],
    )?;
    // Each token is kept three times as a u32 (context, output, the printed ids) and decoded
    // into text of up to 16 bytes.
    let per_token = 3 * 4 + 16;
    Ok(Estimate {
        bytes: sum(
            what,
            &[
                product(what, &[params, 4, 2])?,
                kv_cache,
                product(what, &[u(cfg.block_size), u(cfg.vocab_size), 4, 2])?,
                product(what, &[tokens, per_token])?,
            ],
        )?,
        what: "weights, KV cache, generated tokens",
    })
}

/// Bytes of memory the machine can give this process now: `MemAvailable` of `/proc/meminfo`
/// (or `MemTotal` on kernels without it); `None` where there is no such file.
pub fn available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        kib.checked_mul(1024)
    };
    field("MemAvailable:").or_else(|| field("MemTotal:"))
}

/// Bytes as a short decimal figure, e.g. "120.3 GB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut x = bytes as f64;
    let mut unit = 0;
    while x >= 1000.0 && unit < UNITS.len() - 1 {
        x /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{x:.1} {}", UNITS[unit])
    }
}

/// Errors, with both figures, when `need` is more than `available` bytes; `context` says what
/// would run (e.g. "this training run"). Without a figure for the machine it lets the run go.
pub fn check_fits(context: &str, need: &Estimate, available: Option<u64>) -> Result<()> {
    if let Some(have) = available {
        if need.bytes > have {
            bail!(
                "{context} needs about {} ({}), this machine has {} available; choose smaller sizes",
                human(need.bytes),
                need.what,
                human(have)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    fn shape(n_embd: usize, bias: bool) -> ModelConfig {
        ModelConfig {
            vocab_size: 65,
            block_size: 64,
            n_layer: 3,
            n_head: 4,
            n_embd,
            dropout: 0.0,
            bias,
        }
    }

    #[test]
    fn parameter_count_matches_the_model() {
        for bias in [false, true] {
            let cfg = shape(32, bias);
            let varmap = VarMap::new();
            crate::model::Gpt::new(
                &cfg,
                VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
                true,
            )
            .unwrap();
            let real: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
            assert_eq!(param_count(&cfg).unwrap(), real as u64, "bias {bias}");
        }
    }

    #[test]
    fn overflow_is_an_error_and_big_runs_are_refused() {
        let e = param_count(&shape(usize::MAX / 2, false)).unwrap_err();
        assert!(e.to_string().contains("too large to count"), "{e}");
        let need = training(&shape(100_000, false), 12, 4).unwrap();
        assert!(need.bytes > 1 << 40, "{need:?}");
        let e = check_fits("this training run", &need, Some(23_400_000_000)).unwrap_err();
        assert!(
            e.to_string().contains("this machine has 23.4 GB available"),
            "{e}"
        );
        let small = training(&shape(32, true), 4, 4).unwrap();
        check_fits("this training run", &small, Some(1 << 30)).unwrap();
        assert!(sampling(&shape(32, true), 1, usize::MAX).is_err());
        assert_eq!(human(120_300_000_000), "120.3 GB");
        assert_eq!(human(999), "999 B");
        assert!(available().is_none_or(|b| b > 0));
    }
}
