//! Shared pieces of the attention tests: random inputs in every layout, and a float64 reference.
#![allow(dead_code)]

use attn_op::philox::DropoutMask;
use attn_op::SdpaOptions;
use candle_core::{DType, Device, Result, Tensor};

/// The kind of `attn_mask` a case uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    None,
    /// u8, nonzero = may attend; one query row masked entirely.
    Bool,
    /// Additive float bias with a few `-inf`.
    Bias,
}

/// One attention problem: sizes and options.
#[derive(Clone, Debug)]
pub struct Case {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub lq: usize,
    pub lk: usize,
    pub e: usize,
    pub ev: usize,
    pub causal: bool,
    pub mask: MaskKind,
    pub dropout: f64,
    /// Inputs as views: q a transpose of `(B, L, H, E)`, k and v narrowed from one tensor.
    pub strided: bool,
}

impl Case {
    pub fn new(b: usize, hq: usize, lq: usize, lk: usize, e: usize) -> Self {
        Self {
            b,
            hq,
            hkv: hq,
            lq,
            lk,
            e,
            ev: e,
            causal: false,
            mask: MaskKind::None,
            dropout: 0.0,
            strided: false,
        }
    }
}

/// Every option combination on a base shape: causal or not, no/boolean/bias mask (not with
/// causal), dropout 0 and 0.3, contiguous or strided inputs.
pub fn variants(base: &Case) -> Vec<Case> {
    let mut out = Vec::new();
    for (causal, mask) in [
        (false, MaskKind::None),
        (true, MaskKind::None),
        (false, MaskKind::Bool),
        (false, MaskKind::Bias),
    ] {
        for dropout in [0.0, 0.3] {
            for strided in [false, true] {
                out.push(Case {
                    causal,
                    mask,
                    dropout,
                    strided,
                    ..base.clone()
                });
            }
        }
    }
    out
}

/// Random inputs of a case, in `dtype`, with the layout the case asks for.
pub struct Inputs {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub mask: Option<Tensor>,
}

/// The tensors the inputs of a case are views of: `[q, k, v]`, or with `strided`,
/// `[q as (B, Lq, H, E), k and v side by side as (B, H, Lk, E + Ev)]`.
pub fn random_bases(c: &Case, dtype: DType) -> Result<Vec<Tensor>> {
    let dev = Device::Cpu;
    let shapes: Vec<(usize, usize, usize, usize)> = if c.strided {
        vec![(c.b, c.lq, c.hq, c.e), (c.b, c.hkv, c.lk, c.e + c.ev)]
    } else {
        vec![
            (c.b, c.hq, c.lq, c.e),
            (c.b, c.hkv, c.lk, c.e),
            (c.b, c.hkv, c.lk, c.ev),
        ]
    };
    shapes
        .into_iter()
        .map(|s| Tensor::randn(0f32, 1., s, &dev)?.to_dtype(dtype))
        .collect()
}

/// q, k, v of a case from its bases (views, no copies, when `strided`).
pub fn views(c: &Case, bases: &[Tensor]) -> Result<(Tensor, Tensor, Tensor)> {
    if c.strided {
        Ok((
            bases[0].transpose(1, 2)?,
            bases[1].narrow(3, 0, c.e)?,
            bases[1].narrow(3, c.e, c.ev)?,
        ))
    } else {
        Ok((bases[0].clone(), bases[1].clone(), bases[2].clone()))
    }
}

pub fn inputs(c: &Case, dtype: DType) -> Result<Inputs> {
    let (q, k, v) = views(c, &random_bases(c, dtype)?)?;
    Ok(Inputs {
        q,
        k,
        v,
        mask: random_mask(c, dtype)?,
    })
}

/// The mask of a case, if any.
pub fn random_mask(c: &Case, dtype: DType) -> Result<Option<Tensor>> {
    let dev = Device::Cpu;
    let mask = match c.mask {
        MaskKind::None => None,
        MaskKind::Bool => {
            // (B, 1, Lq, Lk), broadcast over heads; 3 in 4 keys visible, but row 0 of batch 0
            // sees nothing.
            let r: Vec<f32> = Tensor::rand(0f32, 1., c.b * c.lq * c.lk, &dev)?.to_vec1()?;
            let m: Vec<u8> = r
                .iter()
                .enumerate()
                .map(|(i, x)| u8::from(*x >= 0.25 && i >= c.lk))
                .collect();
            Some(Tensor::from_vec(m, (c.b, 1, c.lq, c.lk), &dev)?)
        }
        MaskKind::Bias => {
            // (Hq, Lq, Lk), broadcast over the batch; every 7th element is -inf.
            let r = Tensor::randn(0f32, 1., (c.hq, c.lq, c.lk), &dev)?;
            let idx: Vec<f32> = (0..c.hq * c.lq * c.lk)
                .map(|i| if i % 7 == 3 { f32::NEG_INFINITY } else { 0.0 })
                .collect();
            Some((r + Tensor::from_vec(idx, (c.hq, c.lq, c.lk), &dev)?)?.to_dtype(dtype)?)
        }
    };
    Ok(mask)
}

/// The options of a case (dropout seeded by `seed`).
pub fn options(c: &Case, inp: &Inputs, seed: u64) -> SdpaOptions {
    SdpaOptions {
        attn_mask: inp.mask.clone(),
        dropout_p: c.dropout,
        is_causal: c.causal,
        scale: None,
        enable_gqa: c.hq != c.hkv,
        seed: Some(seed),
        ..Default::default()
    }
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// Attention in float64 by the definition, one loop nest: `(B, Hq, Lq, Ev)` flattened.
pub fn reference(c: &Case, inp: &Inputs, seed: u64) -> Result<Vec<f64>> {
    let (q, k, v) = (to_f64(&inp.q)?, to_f64(&inp.k)?, to_f64(&inp.v)?);
    let mask = match &inp.mask {
        Some(m) => Some(to_f64(&m.broadcast_as((c.b, c.hq, c.lq, c.lk))?)?),
        None => None,
    };
    let drop = DropoutMask::new(c.dropout, seed);
    let scale = 1.0 / (c.e as f64).sqrt();
    let group = c.hq / c.hkv;
    let mut out = vec![0f64; c.b * c.hq * c.lq * c.ev];
    let mut s = vec![0f64; c.lk];
    for b in 0..c.b {
        for h in 0..c.hq {
            let n = b * c.hq + h;
            let kvh = b * c.hkv + h / group;
            for i in 0..c.lq {
                for (j, sj) in s.iter_mut().enumerate() {
                    let dot: f64 = (0..c.e)
                        .map(|d| q[(n * c.lq + i) * c.e + d] * k[(kvh * c.lk + j) * c.e + d])
                        .sum();
                    *sj = dot * scale;
                    match (c.mask, &mask) {
                        (MaskKind::Bool, Some(m)) if m[(n * c.lq + i) * c.lk + j] == 0.0 => {
                            *sj = f64::NEG_INFINITY
                        }
                        (MaskKind::Bias, Some(m)) => *sj += m[(n * c.lq + i) * c.lk + j],
                        _ => {}
                    }
                    if c.causal && j > i {
                        *sj = f64::NEG_INFINITY;
                    }
                }
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue; // no key visible: zeros
                }
                let sum: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for j in 0..c.lk {
                    let mut p = (s[j] - m).exp() / sum;
                    if c.dropout > 0.0 {
                        p = if drop.keep(n, i, j) {
                            p / (1.0 - c.dropout)
                        } else {
                            0.0
                        };
                    }
                    for d in 0..c.ev {
                        out[(n * c.lq + i) * c.ev + d] += p * v[(kvh * c.lk + j) * c.ev + d];
                    }
                }
            }
        }
    }
    Ok(out)
}

/// `max |got - want| / max(1, max |want|)`.
pub fn rel_err(got: &Tensor, want: &[f64]) -> Result<f64> {
    let got = to_f64(got)?;
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    let err = got.iter().zip(want).fold(0.0f64, |m, (a, b)| {
        if a.is_nan() || b.is_nan() {
            f64::INFINITY
        } else {
            m.max((a - b).abs())
        }
    });
    Ok(err / scale)
}

/// Tolerance of [`rel_err`] per dtype.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2e-5,
        DType::F16 => 3e-3,
        DType::BF16 => 2e-2,
        _ => 1e-10,
    }
}

/// The failures of a test's cases, gathered so that one run reports every case that fails.
#[derive(Default)]
pub struct Failures(Vec<String>);

impl Failures {
    /// Records the error of `result`, if it is one.
    pub fn check<E: std::fmt::Display>(&mut self, result: std::result::Result<(), E>) {
        if let Err(e) = result {
            self.0.push(e.to_string());
        }
    }

    pub fn push(&mut self, failure: String) {
        self.0.push(failure);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Panics listing every failure, if there is one.
    pub fn assert_none(&self) {
        assert!(
            self.0.is_empty(),
            "{} failures:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}
