//! Packing sequences of different lengths for [`crate::flash_attn_varlen`] and
//! [`crate::nn::CausalSelfAttention::forward_packed`]: the Candle counterpart of the NestedTensor
//! section of PyTorch's SDPA tutorial, without padding.

use candle_core::{bail, Result, Tensor};

/// Sequences concatenated along their first dim, with their cumulative lengths.
#[derive(Clone, Debug)]
pub struct Packed {
    /// The sequences one after the other: `(total, ...)`.
    pub data: Tensor,
    /// Cumulative lengths, u32, `batch + 1` values starting at 0.
    pub cu_seqlens: Tensor,
    /// The longest sequence.
    pub max_seqlen: usize,
    lens: Vec<usize>,
}

impl Packed {
    /// Packs `seqs`, each `(L_i, ...)` with equal trailing dims, dtype and device.
    ///
    /// ```
    /// use attn_op::varlen::Packed;
    /// use candle_core::{Device, Tensor};
    /// let a = Tensor::randn(0f32, 1., (3, 2, 8), &Device::Cpu)?; // 3 tokens, 2 heads, dim 8
    /// let b = Tensor::randn(0f32, 1., (5, 2, 8), &Device::Cpu)?;
    /// let p = Packed::new(&[a.clone(), b])?;
    /// assert_eq!(p.data.dims(), &[8, 2, 8]);
    /// let y = attn_op::flash_attn_varlen(&p.data, &p.data, &p.data, &p.cu_seqlens, &p.cu_seqlens,
    ///                                    p.max_seqlen, p.max_seqlen, 0.35, true)?;
    /// let outs = p.unpack(&y)?;
    /// assert_eq!(outs[1].dims(), &[5, 2, 8]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn new(seqs: &[Tensor]) -> Result<Self> {
        let Some(first) = seqs.first() else {
            bail!("Packed::new: no sequences to pack");
        };
        for (i, s) in seqs.iter().enumerate() {
            if s.rank() == 0 || s.dims()[1..] != first.dims()[1..] || s.dtype() != first.dtype() {
                bail!(
                    "Packed::new: sequence {i} is {:?} {:?}, but sequence 0 is {:?} {:?}; they may differ only in their first dim",
                    s.dtype(),
                    s.dims(),
                    first.dtype(),
                    first.dims()
                );
            }
        }
        let lens: Vec<usize> = seqs.iter().map(|s| s.dim(0)).collect::<Result<_>>()?;
        let mut cu = Vec::with_capacity(lens.len() + 1);
        cu.push(0u32);
        for l in &lens {
            let end = u32::try_from(*l)
                .ok()
                .and_then(|l| cu[cu.len() - 1].checked_add(l))
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "Packed::new: the sequences hold more than {} tokens, the most u32 cumulative lengths count",
                        u32::MAX
                    ))
                })?;
            cu.push(end);
        }
        Ok(Self {
            data: Tensor::cat(seqs, 0)?,
            cu_seqlens: Tensor::new(cu.as_slice(), first.device())?,
            max_seqlen: lens.iter().copied().max().unwrap_or(0),
            lens,
        })
    }

    /// The lengths of the packed sequences.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Splits a packed result `(total, ...)` back into one tensor per sequence (views).
    pub fn unpack(&self, packed: &Tensor) -> Result<Vec<Tensor>> {
        let total: usize = self.lens.iter().sum();
        if packed.rank() == 0 || packed.dim(0)? != total {
            bail!(
                "Packed::unpack: expected {total} packed rows, got shape {:?}",
                packed.dims()
            );
        }
        let mut start = 0;
        self.lens
            .iter()
            .map(|&l| {
                let part = packed.narrow(0, start, l);
                start += l;
                part
            })
            .collect()
    }
}
