//! candle-flash-attn's eleven entry points with its signatures and semantics, on our flash op:
//! dense ([`dense`]), packed variable-length ([`varlen`]) and paged-KV ([`paged`]) inputs, with
//! causal masks, sliding windows, ALiBi and logit soft-capping; differentiable, on
//! the CPU in every float dtype.
//!
//! Windows are aligned bottom-right as in FlashAttention-2: query `i` sees key `j` when
//! `i + Lk - Lq - left <= j <= i + Lk - Lq + right` (`None` unlimited; `(None, Some(0))` is
//! causal). ALiBi adds `-slope·|i + Lk - Lq - j|` to the scaled score; a soft cap `c` replaces the
//! scaled score `x` by `c·tanh(x / c)` before the ALiBi bias and the mask. A query that sees no key
//! gets zeros.
//!
//! Where candle-flash-attn is lenient, these are strict: a window wider than the keys
//! (candle-flash-attn: unlimited) and a soft cap of 0 (candle-flash-attn: none) are errors.

mod dense;
mod paged;
mod varlen;

pub use dense::{
    flash_attn, flash_attn_alibi, flash_attn_alibi_windowed, flash_attn_alibi_windowed_softcap,
    flash_attn_windowed,
};
pub use paged::flash_attn_varlen_paged_windowed;
pub use varlen::{
    flash_attn_varlen, flash_attn_varlen_alibi, flash_attn_varlen_alibi_windowed,
    flash_attn_varlen_alibi_windowed_softcap, flash_attn_varlen_windowed,
};

use candle_core::{bail, DType, Result, Tensor};

use crate::config::{AttnConfig, Band, CausalAlign};
use crate::dispatch::refusal;
use crate::validate::{check_sdpa, check_softcap, Problem};
use crate::{Backend, SdpaOptions};

/// What a call adds to plain attention: ALiBi slopes, a window, a soft cap.
#[derive(Clone, Copy, Default)]
struct Extras<'a> {
    alibi: Option<&'a Tensor>,
    left: Option<usize>,
    right: Option<usize>,
    softcap: Option<f32>,
}

impl<'a> Extras<'a> {
    /// A causal mask or none.
    fn causal(causal: bool) -> Self {
        Self::window(None, causal.then_some(0))
    }

    fn window(left: Option<usize>, right: Option<usize>) -> Self {
        Self {
            left,
            right,
            ..Default::default()
        }
    }

    fn with_alibi(self, alibi: Option<&'a Tensor>) -> Self {
        Self { alibi, ..self }
    }

    fn with_softcap(self, softcap: f32) -> Self {
        Self {
            softcap: Some(softcap),
            ..self
        }
    }

    /// Checks the extras against the problem (`lk`: the longest key sequence) and turns them
    /// into the op's configuration.
    fn config(&self, api: &str, p: &Problem, lk: usize, scale: f32) -> Result<AttnConfig> {
        for (name, w) in [
            ("window_size_left", self.left),
            ("window_size_right", self.right),
        ] {
            if let Some(w) = w.filter(|&w| w > lk) {
                bail!("{api}: {name} = {w} is larger than the {lk} keys; use None for an unlimited side");
            }
        }
        if let Some(c) = self.softcap {
            check_softcap(api, c as f64)?;
        }
        let mut cfg = AttnConfig::new(scale, None);
        if self.left.is_some() || self.right.is_some() {
            cfg.band = Some(Band {
                align: CausalAlign::BottomRight,
                left: self.left,
                right: self.right,
            });
        }
        cfg.softcap = self.softcap;
        cfg.alibi = self.alibi.map(|a| slopes(api, a, p.hq)).transpose()?;
        Ok(cfg)
    }
}

/// Reads and checks ALiBi slopes: f32, shape `(num_heads_q,)`, finite.
fn slopes(api: &str, t: &Tensor, hq: usize) -> Result<Vec<f32>> {
    if t.dtype() != DType::F32 || t.dims() != [hq] {
        bail!(
            "{api}: alibi_slopes must be an f32 tensor of shape ({hq},) (one slope per query head), got {:?} {:?}",
            t.dtype(),
            t.dims()
        );
    }
    let s = t.to_vec1::<f32>()?;
    if let Some(bad) = s.iter().find(|x| !x.is_finite()) {
        bail!("{api}: alibi_slopes holds {bad}; slopes must be finite");
    }
    Ok(s)
}

/// Validates the `(heads, L, D)` views for `api` and checks the flash backend takes them.
fn check_flash(
    api: &str,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    softmax_scale: f32,
) -> Result<Problem> {
    let opts = SdpaOptions {
        enable_gqa: true,
        scale: Some(softmax_scale as f64),
        ..Default::default()
    };
    let p = check_sdpa(api, q, k, v, &opts)?;
    if let Some(reason) = refusal(Backend::Flash, &p, false, q.device()) {
        bail!("{api}: {reason}");
    }
    Ok(p)
}

/// Checks that `q`, `k` and `v` have rank `rank` with the layout `what`.
fn check_rank(api: &str, rank: usize, what: &str, qkv: [(&str, &Tensor); 3]) -> Result<()> {
    for (name, t) in qkv {
        if t.rank() != rank {
            bail!(
                "{api}: {name} has shape {:?}; expected rank {rank}, {what}",
                t.dims()
            );
        }
    }
    Ok(())
}
