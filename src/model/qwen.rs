//! The Qwen family: `qwen2` (llama's block with q/k/v biases and neox RoPE), `qwen3` (no biases;
//! per-head RMSNorm of q and k before RoPE) and `qwen3moe` (qwen3's attention; the feed-forward
//! is 128 softmax-routed SwiGLU experts of which the top 8 run, their weights renormalised to
//! sum to 1, no shared expert). The forward pass is the shared [`Decoder`]'s.

use anyhow::Result;

use super::decoder::{Act, Decoder, Gating, Hyper, Layer};
use super::Tensors;

/// Loads `qwen2`, `qwen3` or `qwen3moe` (`arch`).
pub fn load<'a>(t: &Tensors<'a>, arch: &str) -> Result<Decoder<'a>> {
    let h = Hyper::read(t, arch)?;
    let md = t.gguf.metadata();
    let qk_norm = arch != "qwen2";
    let rope = h.rope(t, h.freq_base, true)?;
    let scale = 1.0 / (h.head_dim as f32).sqrt();
    let layers = (0..h.n_layer)
        .map(|i| {
            let p = |n: &str| format!("blk.{i}.{n}");
            let ffn = if arch == "qwen3moe" {
                // Qwen3's norm_topk_prob; llama.cpp renormalises for every qwen3moe file.
                h.moe(t, i, Gating::Softmax { norm: true }, Act::Silu)?
            } else {
                let ff = md.get_usize(&h.key("feed_forward_length"))?;
                h.gated(t, i, ff, Act::Silu)?
            };
            Ok(Layer {
                attn_norm: t.vector(&p("attn_norm.weight"), h.n_embd)?,
                attn: h.attention(t, i, rope.clone(), None, scale, qk_norm, false)?,
                attn_post_norm: None,
                ffn_norm: t.vector(&p("ffn_norm.weight"), h.n_embd)?,
                ffn,
                ffn_post_norm: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    h.decoder(t, layers, None)
}
