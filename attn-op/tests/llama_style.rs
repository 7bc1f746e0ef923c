//! A small decoder written the way candle-transformers' llama calls candle-flash-attn (q, k, v
//! transposed to `(B, S, H, D)`, `flash_attn(q, k, v, scale, seq_len > 1)`, a KV cache grown by
//! concatenation, one query row per decoding step), with grouped-query heads: it trains, and
//! decoding with the cache gives the logits of the full forward pass. The same with Mistral's
//! sliding window (`flash_attn_windowed(.., Some(w), Some(0))`).

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::{embedding, linear_no_bias, Embedding, Linear, Optimizer, VarBuilder, VarMap};

const VOCAB: usize = 24;
const DIM: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = DIM / HEADS;
const LAYERS: usize = 2;

/// Root-mean-square norm from differentiable ops (Candle's fused `rms_norm` has no backward).
fn rms_norm(x: &Tensor) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + 1e-5)?.sqrt()?)
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    window: Option<usize>,
}

/// Keys and values of the tokens so far, `(B, Hkv, S, D)` per layer.
type Cache = Vec<Option<(Tensor, Tensor)>>;

impl Attention {
    fn new(vb: VarBuilder, window: Option<usize>) -> Result<Self> {
        Ok(Self {
            q: linear_no_bias(DIM, HEADS * HEAD_DIM, vb.pp("q"))?,
            k: linear_no_bias(DIM, KV_HEADS * HEAD_DIM, vb.pp("k"))?,
            v: linear_no_bias(DIM, KV_HEADS * HEAD_DIM, vb.pp("v"))?,
            o: linear_no_bias(HEADS * HEAD_DIM, DIM, vb.pp("o"))?,
            window,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut Option<(Tensor, Tensor)>) -> Result<Tensor> {
        let (b, seq_len, _) = x.dims3()?;
        let heads = |t: Tensor, h: usize| t.reshape((b, seq_len, h, HEAD_DIM))?.transpose(1, 2);
        let q = heads(self.q.forward(x)?, HEADS)?;
        let mut k = heads(self.k.forward(x)?, KV_HEADS)?;
        let mut v = heads(self.v.forward(x)?, KV_HEADS)?;
        if let Some((ck, cv)) = cache.as_ref() {
            k = Tensor::cat(&[ck, &k], 2)?;
            v = Tensor::cat(&[cv, &v], 2)?;
        }
        *cache = Some((k.clone(), v.clone()));
        // As llama.rs: to (B, S, H, D), causal only when more than one query.
        let (q, k, v) = (q.transpose(1, 2)?, k.transpose(1, 2)?, v.transpose(1, 2)?);
        let scale = 1.0 / (HEAD_DIM as f32).sqrt();
        let causal = seq_len > 1;
        let y = match self.window {
            // A window wider than the keys so far means every key.
            Some(w) if w < k.dim(1)? => {
                attn_op::flash_attn_windowed(&q, &k, &v, scale, Some(w), Some(0))?
            }
            _ => attn_op::flash_attn(&q, &k, &v, scale, causal)?,
        };
        self.o.forward(&y.reshape((b, seq_len, DIM))?)
    }
}

struct Block {
    attn: Attention,
    up: Linear,
    down: Linear,
}

struct Model {
    embed: Embedding,
    blocks: Vec<Block>,
    head: Linear,
}

impl Model {
    fn new(vb: VarBuilder, window: Option<usize>) -> Result<Self> {
        let blocks = (0..LAYERS)
            .map(|i| {
                let vb = vb.pp(format!("layer{i}"));
                Ok(Block {
                    attn: Attention::new(vb.pp("attn"), window)?,
                    up: linear_no_bias(DIM, 2 * DIM, vb.pp("up"))?,
                    down: linear_no_bias(2 * DIM, DIM, vb.pp("down"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            embed: embedding(VOCAB, DIM, vb.pp("embed"))?,
            blocks,
            head: linear_no_bias(DIM, VOCAB, vb.pp("head"))?,
        })
    }

    /// Logits `(B, S, VOCAB)` of `tokens` following the cached ones.
    fn forward(&self, tokens: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let mut x = self.embed.forward(tokens)?;
        for (block, c) in self.blocks.iter().zip(cache.iter_mut()) {
            x = (&x + block.attn.forward(&rms_norm(&x)?, c)?)?;
            let h = block.up.forward(&rms_norm(&x)?)?.silu()?;
            x = (&x + block.down.forward(&h)?)?;
        }
        self.head.forward(&rms_norm(&x)?)
    }
}

fn train_and_decode(window: Option<usize>) -> Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = Model::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), window)?;
    // Sequences whose next token is a fixed function of the previous two: learnable.
    let (b, t) = (4, 20);
    let mut data = Vec::new();
    for s in 0..b {
        let (mut x0, mut x1) = (s as u32, (3 * s + 1) as u32 % VOCAB as u32);
        for _ in 0..=t {
            data.push(x0);
            (x0, x1) = (x1, (x0 + 2 * x1 + 1) % VOCAB as u32);
        }
    }
    let data = Tensor::from_vec(data, (b, t + 1), &dev)?;
    let (inputs, targets) = (data.i((.., ..t))?, data.i((.., 1..))?);
    let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-2)?;
    let loss_of = |model: &Model| -> Result<Tensor> {
        let logits = model.forward(&inputs, &mut vec![None; LAYERS])?;
        candle_nn::loss::cross_entropy(&logits.reshape((b * t, VOCAB))?, &targets.flatten_all()?)
    };
    let first = loss_of(&model)?.to_scalar::<f32>()?;
    for _ in 0..60 {
        opt.backward_step(&loss_of(&model)?)?;
    }
    let last = loss_of(&model)?.to_scalar::<f32>()?;
    assert!(
        last < 0.3 * first,
        "window {window:?}: loss {first} -> {last} after 60 steps"
    );

    // Decoding: a prompt of 5 tokens, then one token at a time against the KV cache, gives the
    // logits of the full forward pass at every position.
    let full = model.forward(&inputs, &mut vec![None; LAYERS])?;
    let mut cache: Cache = vec![None; LAYERS];
    let mut steps = vec![model.forward(&inputs.i((.., ..5))?, &mut cache)?];
    for pos in 5..t {
        steps.push(model.forward(&inputs.i((.., pos..pos + 1))?, &mut cache)?);
    }
    let decoded = Tensor::cat(&steps, 1)?;
    let diff = (decoded - &full)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let size = full.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(
        diff <= 1e-4 * size.max(1.0),
        "window {window:?}: decoding differs by {diff}"
    );
    Ok(())
}

#[test]
fn llama_style_model_trains_and_decodes_with_a_kv_cache() -> Result<()> {
    train_and_decode(None)
}

#[test]
fn mistral_style_sliding_window_trains_and_decodes() -> Result<()> {
    train_and_decode(Some(6))
}
