//! The GPT's input: token embedding plus position embedding, `wte[idx] + wpe[pos]`.
//!
//! Built from Candle ops it is two `index_select`s and an addition, three `(B·T, C)` tensors
//! that Candle's backward pays each with a zero-filled buffer and an addition. On the CPU in f32
//! it is one op here, whose backward adds the gradient rows into the two tables directly.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::cpu_data::{f32_slice, with_data, Unwritten};

/// `wte[ids[i]] + wpe[positions[i]]` for every row `i`: `(ids.len(), C)` from the tables
/// `wte` `(vocab, C)` and `wpe` `(block_size, C)`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let wte = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev)?;
/// let wpe = Tensor::new(&[[10f32, 20.], [30., 40.]], &dev)?;
/// let ids = Tensor::new(&[[2u32, 0]], &dev)?;
/// let x = nanogpt::fused::embed(&wte, &wpe, &ids, 0)?;
/// assert_eq!(x.to_vec2::<f32>()?, [[15., 26.], [31., 42.]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// `ids` is `(B, T)`; the positions are `pos..pos + T` for every sequence. Ids outside the
/// vocabulary and positions past `wpe` are errors.
pub fn embed(wte: &Tensor, wpe: &Tensor, ids: &Tensor, pos: usize) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let positions: Vec<u32> = (0..b).flat_map(|_| pos as u32..(pos + t) as u32).collect();
    let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    wte.contiguous()?
        .apply_op2(&wpe.contiguous()?, Embedding { ids, positions })
}

/// The fused op of [`embed`]: the row indices live in the op (they take no gradient).
struct Embedding {
    ids: Vec<u32>,
    positions: Vec<u32>,
}

impl Embedding {
    /// `(vocab, block_size, C)` of the tables, checked against each other and the indices.
    fn check(&self, l_wte: &Layout, l_wpe: &Layout) -> Result<(usize, usize, usize)> {
        let (&[vocab, c], &[block, c2]) = (l_wte.dims(), l_wpe.dims()) else {
            candle_core::bail!(
                "embedding: expected two tables (rows, C), got {:?} and {:?}",
                l_wte.dims(),
                l_wpe.dims()
            );
        };
        if c != c2 {
            candle_core::bail!("embedding: tables of widths {c} and {c2}");
        }
        if let Some(&id) = self.ids.iter().find(|&&id| id as usize >= vocab) {
            candle_core::bail!("embedding: token id {id} is outside the vocabulary of {vocab}");
        }
        if let Some(&p) = self.positions.iter().find(|&&p| p as usize >= block) {
            candle_core::bail!("embedding: position {p} is past the {block} position embeddings");
        }
        Ok((vocab, block, c))
    }
}

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "nanogpt-embedding"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (wte, wpe) = (
            f32_slice(s1, l1, "embedding")?,
            f32_slice(s2, l2, "embedding")?,
        );
        let (_, _, c) = self.check(l1, l2)?;
        let n = self.ids.len();
        let mut x = Unwritten::new(n * c);
        for ((row, &id), &p) in x
            .slots()
            .chunks_exact_mut(c.max(1))
            .zip(&self.ids)
            .zip(&self.positions)
        {
            let (tok, at) = (&wte[id as usize * c..][..c], &wpe[p as usize * c..][..c]);
            for ((slot, &a), &b) in row.iter_mut().zip(tok).zip(at) {
                slot.write(a + b);
            }
        }
        // SAFETY: `ids` and `positions` have one entry per row (built together in `embed`), so
        // the loop wrote all `n` rows of `c` (nothing when `c = 0`).
        Ok((
            CpuStorage::F32(unsafe { x.assume_written() }),
            Shape::from((n, c)),
        ))
    }

    fn bwd(
        &self,
        wte: &Tensor,
        wpe: &Tensor,
        _x: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (vocab, block, c) = self.check(wte.layout(), wpe.layout())?;
        let grad = grad.contiguous()?;
        let (dwte, dwpe) = with_data(&[&grad], "embedding backward", |d| {
            let g = d[0];
            if g.len() != self.ids.len() * c {
                candle_core::bail!(
                    "embedding backward: {} gradient elements for {} rows of {c}",
                    g.len(),
                    self.ids.len()
                );
            }
            // Rows added in order: the same sums however the work is split.
            let mut dwte = vec![0f32; vocab * c];
            let mut dwpe = vec![0f32; block * c];
            for ((row, &id), &p) in g.chunks_exact(c.max(1)).zip(&self.ids).zip(&self.positions) {
                for (d, &v) in dwte[id as usize * c..][..c].iter_mut().zip(row) {
                    *d += v;
                }
                for (d, &v) in dwpe[p as usize * c..][..c].iter_mut().zip(row) {
                    *d += v;
                }
            }
            Ok((dwte, dwpe))
        })?;
        let dev = wte.device();
        Ok((
            Some(Tensor::from_vec(dwte, (vocab, c), dev)?),
            Some(Tensor::from_vec(dwpe, (block, c), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::rng::Rng;

    /// The fused op against Candle's `index_select` and addition, values and gradients, with
    /// repeated ids (their gradients add up) and an offset position.
    #[test]
    fn matches_index_select() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(17, 0);
        let (vocab, block, c, b, t, pos) = (11, 9, 6, 3, 5, 2);
        let wte = Var::from_vec(rng.normal_vec(vocab * c, 1.0), (vocab, c), &dev)?;
        let wpe = Var::from_vec(rng.normal_vec(block * c, 1.0), (block, c), &dev)?;
        let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % 4) as u32).collect();
        let ids = Tensor::from_vec(ids, (b, t), &dev)?;
        let probe = Tensor::from_vec(rng.normal_vec(b * t * c, 1.0), (b * t, c), &dev)?;
        let run = |x: Tensor| -> Result<Vec<Vec<f32>>> {
            let grads = (&x * &probe)?.sum_all()?.backward()?;
            Ok(vec![
                x.flatten_all()?.to_vec1()?,
                grads.get(&wte).unwrap().flatten_all()?.to_vec1()?,
                grads.get(&wpe).unwrap().flatten_all()?.to_vec1()?,
            ])
        };
        let fused = run(embed(&wte, &wpe, &ids, pos)?)?;
        let positions: Vec<u32> = (0..b).flat_map(|_| pos as u32..(pos + t) as u32).collect();
        let positions = Tensor::from_vec(positions, b * t, &dev)?;
        let composed =
            (wte.index_select(&ids.flatten_all()?, 0)? + wpe.index_select(&positions, 0)?)?;
        let reference = run(composed)?;
        for (a, r) in fused.iter().zip(&reference) {
            for (x, y) in a.iter().zip(r) {
                assert!((x - y).abs() < 1e-6, "{x} vs {y}");
            }
        }
        Ok(())
    }

    /// Out-of-range ids and positions are errors naming the value.
    #[test]
    fn bad_indices_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let wte = Tensor::zeros((4, 3), DType::F32, &dev)?;
        let wpe = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let e = embed(&wte, &wpe, &Tensor::new(&[[1u32, 4]], &dev)?, 0).unwrap_err();
        assert!(e.to_string().contains("token id 4"), "{e}");
        let e = embed(&wte, &wpe, &Tensor::new(&[[1u32, 2]], &dev)?, 1).unwrap_err();
        assert!(e.to_string().contains("position 2"), "{e}");
        Ok(())
    }
}
