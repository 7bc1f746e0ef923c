//! candle-transformers' llama with `use_flash_attn` (its attention through
//! `candle_flash_attn::flash_attn`, patched to attn-op) against the same weights without it, on
//! the CPU: a 6-token prompt, then two tokens decoded with the KV cache. Exits non-zero when the
//! logits differ.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::llama::{Cache, Config, Llama};

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let config = |use_flash_attn| Config {
        hidden_size: 64,
        intermediate_size: 128,
        vocab_size: 50,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        use_flash_attn,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
    };
    // Both models read the same randomly initialised variables.
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
    let (flash, plain) = (config(true), config(false));
    let (flash_model, plain_model) = (Llama::load(vb.clone(), &flash)?, Llama::load(vb, &plain)?);
    let mut flash_cache = Cache::new(true, DType::F32, &flash, &dev)?;
    let mut plain_cache = Cache::new(true, DType::F32, &plain, &dev)?;
    let steps = [(vec![1u32, 7, 3, 22, 9, 41], 0), (vec![5], 6), (vec![17], 7)];
    for (tokens, pos) in steps {
        let x = Tensor::new(tokens.as_slice(), &dev)?.unsqueeze(0)?;
        let a = flash_model.forward(&x, pos, &mut flash_cache)?;
        let b = plain_model.forward(&x, pos, &mut plain_cache)?;
        let err = (a - &b)?.abs()?.flatten_all()?.max(D::Minus1)?.to_scalar::<f32>()?;
        let size = b.abs()?.flatten_all()?.max(D::Minus1)?.to_scalar::<f32>()?;
        println!("llama, {} token(s) at {pos}: flash_attn logits within {err:.1e} of candle's own attention (logits up to {size:.2})", tokens.len());
        if !(err <= 1e-4 * size.max(1.)) {
            candle_core::bail!("llama's flash-attn path disagrees with its own attention by {err}");
        }
    }
    Ok(())
}
