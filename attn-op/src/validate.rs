//! Checks of the inputs every backend shares, giving clear errors for bad input.

use candle_core::{bail, DType, Result, Tensor};

use crate::config::{Band, CausalAlign};

use crate::SdpaOptions;

/// The sizes of one attention call, once its inputs passed the checks.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Problem {
    /// q's dims before `(Lq, E)`: the output keeps them.
    pub lead: Vec<usize>,
    /// Query heads (dim -3) and key/value heads (equal unless GQA).
    pub hq: usize,
    pub hkv: usize,
    pub lq: usize,
    pub lk: usize,
    pub e: usize,
    pub ev: usize,
    pub scale: f64,
    pub dtype: DType,
}

impl Problem {
    /// Shape of `(..., Lq, Lk)`, the scores and what `attn_mask` broadcasts to.
    pub fn scores_shape(&self) -> Vec<usize> {
        let mut s = self.lead.clone();
        s.extend([self.lq, self.lk]);
        s
    }

    /// Shape of the output `(..., Lq, Ev)`.
    pub fn out_shape(&self) -> Vec<usize> {
        let mut s = self.lead.clone();
        s.extend([self.lq, self.ev]);
        s
    }
}

pub(crate) fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
}

/// Validates q, k, v and the options as [`crate::scaled_dot_product_attention`] takes them.
/// `api` names the public function in the messages.
pub(crate) fn check_sdpa(
    api: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &SdpaOptions,
) -> Result<Problem> {
    for (name, t) in [("query", q), ("key", k), ("value", v)] {
        if t.rank() < 3 {
            bail!(
                "{api}: {name} has shape {:?} (rank {}); expected rank >= 3, (..., L, E)",
                t.dims(),
                t.rank()
            );
        }
    }
    if q.rank() != k.rank() || q.rank() != v.rank() {
        bail!(
            "{api}: query {:?}, key {:?} and value {:?} must have the same rank",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        bail!(
            "{api}: mixed dtypes query {:?}, key {:?}, value {:?}; all three must be the same",
            q.dtype(),
            k.dtype(),
            v.dtype()
        );
    }
    if !is_float(q.dtype()) {
        bail!(
            "{api}: dtype {:?} is not supported; expected f32, f16, bf16 or f64",
            q.dtype()
        );
    }
    if !k.device().same_device(q.device()) || !v.device().same_device(q.device()) {
        bail!(
            "{api}: query is on {:?}, key on {:?}, value on {:?}; all three must be on one device",
            q.device().location(),
            k.device().location(),
            v.device().location()
        );
    }
    let r = q.rank();
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    let (lq, e) = (qd[r - 2], qd[r - 1]);
    let (lk, ek) = (kd[r - 2], kd[r - 1]);
    let (lv, ev) = (vd[r - 2], vd[r - 1]);
    if ek != e {
        bail!("{api}: query has E = {e} but key has E = {ek} (shapes {qd:?} and {kd:?}); they must match");
    }
    if lv != lk {
        bail!("{api}: key has Lk = {lk} but value has {lv} rows (shapes {kd:?} and {vd:?}); they must match");
    }
    if kd[..r - 2] != vd[..r - 2] {
        bail!("{api}: key {kd:?} and value {vd:?} must have the same leading dims");
    }
    let (hq, hkv) = (qd[r - 3], kd[r - 3]);
    if qd[..r - 3] != kd[..r - 3] {
        bail!("{api}: query {qd:?} and key {kd:?} have different leading (batch) dims; they must be equal");
    }
    if hq != hkv {
        if !opts.enable_gqa {
            bail!(
                "{api}: query has {hq} heads (dim -3) but key/value have {hkv}; they must match, or set enable_gqa"
            );
        }
        if hkv == 0 || !hq.is_multiple_of(hkv) {
            bail!(
                "{api}: enable_gqa needs key/value heads to divide query heads, got {hq} query heads and {hkv} key/value heads"
            );
        }
    }
    for (name, dims) in [("query", qd), ("key", kd), ("value", vd)] {
        checked_elems(api, name, dims, q.dtype().size_in_bytes())?;
    }
    let scale = check_common(e, opts.dropout_p, opts.scale)?;
    let problem = Problem {
        lead: qd[..r - 2].to_vec(),
        hq,
        hkv,
        lq,
        lk,
        e,
        ev,
        scale,
        dtype: q.dtype(),
    };
    checked_elems(api, "the output", &problem.out_shape(), 4)?;
    check_window(api, opts, &problem)?;
    if let Some(mask) = &opts.attn_mask {
        if opts.is_causal {
            bail!("{api}: attn_mask and is_causal cannot both be set (PyTorch raises the same); put the causal mask into attn_mask");
        }
        check_mask(api, mask, q, &problem)?;
    }
    Ok(problem)
}

/// Checks the sliding window and soft cap of `opts`.
fn check_window(api: &str, opts: &SdpaOptions, p: &Problem) -> Result<()> {
    if opts.is_causal && opts.window_right.is_some() {
        bail!("{api}: window_right and is_causal cannot both be set (is_causal is window_right = Some(0))");
    }
    for (name, w) in [
        ("window_left", opts.window_left),
        ("window_right", opts.window_right),
    ] {
        if let Some(w) = w.filter(|&w| w > p.lk) {
            bail!(
                "{api}: {name} = {w} is larger than the {} keys; use None for an unlimited side",
                p.lk
            );
        }
    }
    if let Some(c) = opts.softcap {
        check_softcap(api, c)?;
    }
    Ok(())
}

/// A soft cap must be finite and positive.
pub(crate) fn check_softcap(api: &str, c: f64) -> Result<()> {
    if !(c.is_finite() && c > 0.0) {
        bail!("{api}: softcap = {c} must be finite and positive");
    }
    Ok(())
}

/// The band of keys SDPA's options let each query see (top-left aligned), if limited.
pub(crate) fn sdpa_band(opts: &SdpaOptions) -> Option<Band> {
    let right = if opts.is_causal {
        Some(0)
    } else {
        opts.window_right
    };
    (right.is_some() || opts.window_left.is_some()).then_some(Band {
        align: CausalAlign::TopLeft,
        left: opts.window_left,
        right,
    })
}

/// The number of elements of a tensor of shape `dims`, or an error when that number, or its
/// size in bytes at `elem_bytes` each (f32 intermediates counted as 4), overflows what one
/// allocation can hold (`isize::MAX` bytes). A shape built with wrapping arithmetic would
/// otherwise reach the kernels.
pub(crate) fn checked_elems(
    api: &str,
    name: &str,
    dims: &[usize],
    elem_bytes: usize,
) -> Result<usize> {
    let elems = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    match elems {
        Some(n) if n.checked_mul(elem_bytes.max(4)).is_some_and(|b| b <= isize::MAX as usize) => Ok(n),
        _ => bail!(
            "{api}: {name} of shape {dims:?} has more elements than memory can hold ({} bytes at most)",
            isize::MAX
        ),
    }
}

/// Checks dropout and scale, returning the scale to use (`1/sqrt(E)` by default).
pub(crate) fn check_common(e: usize, dropout_p: f64, scale: Option<f64>) -> Result<f64> {
    if !(0.0..1.0).contains(&dropout_p) {
        bail!("attention: dropout_p = {dropout_p} is outside [0, 1)");
    }
    match scale {
        Some(s) if !s.is_finite() || s <= 0.0 => {
            bail!("attention: scale = {s} must be finite and positive")
        }
        Some(s) => Ok(s),
        None => Ok(1.0 / (e.max(1) as f64).sqrt()),
    }
}

fn check_mask(api: &str, mask: &Tensor, q: &Tensor, p: &Problem) -> Result<()> {
    let target = p.scores_shape();
    if mask.dtype() != DType::U8 && !is_float(mask.dtype()) {
        bail!(
            "{api}: attn_mask has dtype {:?}; expected u8 (boolean, nonzero = may attend) or a float bias",
            mask.dtype()
        );
    }
    if !mask.device().same_device(q.device()) {
        bail!(
            "{api}: attn_mask is on {:?} but query is on {:?}",
            mask.device().location(),
            q.device().location()
        );
    }
    let md = mask.dims();
    let fits = md.len() <= target.len()
        && md
            .iter()
            .rev()
            .zip(target.iter().rev())
            .all(|(&m, &t)| m == t || m == 1);
    if !fits {
        bail!("{api}: attn_mask of shape {md:?} does not broadcast to (..., Lq, Lk) = {target:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(dims: &[usize]) -> Tensor {
        Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap()
    }

    fn err(q: &[usize], k: &[usize], v: &[usize], opts: &SdpaOptions) -> String {
        check_sdpa("sdpa", &t(q), &t(k), &t(v), opts)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn shape_errors_name_the_argument() {
        let o = SdpaOptions::default();
        assert!(err(&[4, 8], &[4, 8], &[4, 8], &o).contains("query has shape [4, 8] (rank 2)"));
        assert!(err(&[2, 3, 4, 8], &[2, 3, 4, 9], &[2, 3, 4, 8], &o).contains("key has E = 9"));
        assert!(err(&[2, 3, 4, 8], &[2, 3, 5, 8], &[2, 3, 6, 8], &o).contains("value has 6 rows"));
        assert!(
            err(&[2, 3, 4, 8], &[3, 3, 5, 8], &[3, 3, 5, 8], &o).contains("leading (batch) dims")
        );
        assert!(err(&[2, 4, 4, 8], &[2, 2, 5, 8], &[2, 2, 5, 8], &o).contains("set enable_gqa"));
        let gqa = SdpaOptions {
            enable_gqa: true,
            ..Default::default()
        };
        assert!(err(&[2, 4, 4, 8], &[2, 3, 5, 8], &[2, 3, 5, 8], &gqa).contains("divide"));
        let p = check_sdpa(
            "sdpa",
            &t(&[2, 4, 4, 8]),
            &t(&[2, 2, 5, 8]),
            &t(&[2, 2, 5, 6]),
            &gqa,
        )
        .unwrap();
        assert_eq!((p.hq, p.hkv, p.lq, p.lk, p.e, p.ev), (4, 2, 4, 5, 8, 6));
        assert_eq!(p.out_shape(), vec![2, 4, 4, 6]);
    }

    #[test]
    fn sizes_that_overflow_are_errors() {
        let huge = [1, 1, (1usize << 62) + 1, 4];
        let e = checked_elems("sdpa", "query", &huge, 4)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("query of shape [1, 1, 4611686018427387905, 4] has more elements"),
            "{e}"
        );
        assert!(checked_elems("sdpa", "key", &[1 << 32, 1 << 32], 2).is_err());
        assert!(checked_elems("sdpa", "key", &[1 << 31, 1 << 31], 4).is_err());
        assert!(checked_elems("sdpa", "key", &[1 << 30, 1 << 30], 4).is_ok());
        assert_eq!(checked_elems("sdpa", "value", &[2, 3, 4], 2).unwrap(), 24);
        assert_eq!(
            checked_elems("sdpa", "value", &[0, usize::MAX], 2).unwrap(),
            0
        );
    }

    /// Broadcast views have any shape without memory behind them: the public entry points
    /// refuse the ones whose sizes overflow instead of letting a kernel allocate for them.
    #[test]
    fn public_calls_refuse_overflowing_views() {
        let one = t(&[1, 1, 1, 4]);
        for dims in [
            [1, 1, (1usize << 62) + 1, 4],
            [1 << 32, 1 << 32, 1, 4],
            [1, 1, 1 << 61, 4],
        ] {
            let q = one.broadcast_as(&dims[..]).unwrap();
            let opts = SdpaOptions::default();
            let e = crate::scaled_dot_product_attention(&q, &q, &q, &opts).unwrap_err();
            assert!(
                e.to_string()
                    .contains("has more elements than memory can hold"),
                "{e}"
            );
            let e = crate::bench::sweep(&q, &q, &q, &opts, false, Default::default()).unwrap_err();
            assert!(e.to_string().contains("has more elements"), "{e}");
            let e = crate::flash_attn(&q, &q, &q, 0.5, true).unwrap_err();
            assert!(e.to_string().contains("has more elements"), "{e}");
        }
        for p in [0.0, 0.1] {
            assert!(crate::nn::dropout_multipliers(usize::MAX, 2, p, 1).is_err());
        }
    }

    #[test]
    fn option_errors() {
        let s = [2, 3, 8];
        let bad_p = SdpaOptions {
            dropout_p: 1.0,
            ..Default::default()
        };
        assert!(err(&s, &s, &s, &bad_p).contains("dropout_p = 1 is outside [0, 1)"));
        let bad_scale = SdpaOptions {
            scale: Some(f64::NAN),
            ..Default::default()
        };
        assert!(err(&s, &s, &s, &bad_scale).contains("must be finite and positive"));
        let bad_scale = SdpaOptions {
            scale: Some(0.0),
            ..Default::default()
        };
        assert!(err(&s, &s, &s, &bad_scale).contains("must be finite and positive"));
        let both = SdpaOptions {
            attn_mask: Some(t(&[3, 3])),
            is_causal: true,
            ..Default::default()
        };
        assert!(err(&s, &s, &s, &both).contains("cannot both be set"));
        let bad_mask = SdpaOptions {
            attn_mask: Some(t(&[4, 3])),
            ..Default::default()
        };
        assert!(err(&s, &s, &s, &bad_mask).contains("does not broadcast"));
        let ok_mask = SdpaOptions {
            attn_mask: Some(t(&[1, 3])),
            ..Default::default()
        };
        assert!(check_sdpa("sdpa", &t(&s), &t(&s), &t(&s), &ok_mask).is_ok());
        let q = t(&s);
        let half = q.to_dtype(DType::F16).unwrap();
        let e = check_sdpa("sdpa", &q, &half, &q, &SdpaOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("mixed dtypes"), "{e}");
        let ints = q.to_dtype(DType::U32).unwrap();
        let e = check_sdpa("sdpa", &ints, &ints, &ints, &SdpaOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("dtype U32 is not supported"), "{e}");
    }
}
