//! `llama` (SmolLM2, Llama 2/3, Mistral): pre-norm attention with RoPE ("normal" mode: adjacent
//! pairs rotate) and a SwiGLU feed-forward; output tied to the embedding when `output.weight` is
//! absent. Llama 3.1's `rope_freqs.weight` divides the rotation frequencies when present. The
//! forward pass is the shared [`Decoder`]'s.

use anyhow::Result;

use super::decoder::{Act, Decoder, Hyper, Layer};
use super::Tensors;

pub fn load<'a>(t: &Tensors<'a>) -> Result<Decoder<'a>> {
    let h = Hyper::read(t, "llama")?;
    let md = t.gguf.metadata();
    let ff = md.get_usize(&h.key("feed_forward_length"))?;
    let mut rope = h.rope(t, h.freq_base, false)?;
    rope.freq_factors = t.opt_vector("rope_freqs.weight", h.n_rot / 2)?;
    let scale = 1.0 / (h.head_dim as f32).sqrt();
    let layers = (0..h.n_layer)
        .map(|i| {
            let p = |n: &str| format!("blk.{i}.{n}");
            Ok(Layer {
                attn_norm: t.vector(&p("attn_norm.weight"), h.n_embd)?,
                attn: h.attention(t, i, rope.clone(), None, scale, false, false)?,
                attn_post_norm: None,
                ffn_norm: t.vector(&p("ffn_norm.weight"), h.n_embd)?,
                ffn: h.gated(t, i, ff, Act::Silu)?,
                ffn_post_norm: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    h.decoder(t, layers, None)
}
