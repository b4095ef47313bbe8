//! `gpt-oss` (GPT-OSS-20B/120B): attention with q/k/v/o biases, a learned sink logit per head,
//! sliding-window (128) on even layers and full attention on odd ones, neox RoPE with YaRN
//! scaling (factor 32 over a trained 4096); after attention a norm (`post_attention_norm`) feeds
//! 32 experts routed by top-4 of the router's logits (with a bias) and a softmax over those four;
//! experts have biases and a clamped SwiGLU (α 1.702, limit 7). Expert weights are MXFP4 in the
//! released files. The forward pass is the shared [`Decoder`]'s.

use anyhow::Result;

use super::decoder::{Act, Decoder, Gating, Hyper, Layer};
use super::Tensors;

pub fn load<'a>(t: &Tensors<'a>) -> Result<Decoder<'a>> {
    let h = Hyper::read(t, "gpt-oss")?;
    let md = t.gguf.metadata();
    let window = md.get_usize(&h.key("attention.sliding_window"))?;
    let rope = h.rope(t, h.freq_base, true)?;
    // Even layers windowed, odd ones full (llama.cpp's pattern 2).
    let swa = h.swa_layers(t, 2)?;
    let scale = 1.0 / (h.head_dim as f32).sqrt();
    let act = Act::SwigluOai {
        alpha: 1.702,
        limit: 7.0,
    };
    let layers = (0..h.n_layer)
        .map(|i| {
            let p = |n: &str| format!("blk.{i}.{n}");
            let win = swa[i].then_some(window);
            Ok(Layer {
                attn_norm: t.vector(&p("attn_norm.weight"), h.n_embd)?,
                attn: h.attention(t, i, rope.clone(), win, scale, false, true)?,
                attn_post_norm: None,
                ffn_norm: t.vector(&p("post_attention_norm.weight"), h.n_embd)?,
                ffn: h.moe(t, i, Gating::SoftmaxSelected, act)?,
                ffn_post_norm: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    h.decoder(t, layers, None)
}
