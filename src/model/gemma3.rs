//! `gemma3`: embeddings scaled by √n_embd; four RMSNorms a layer (before and after attention,
//! before and after the feed-forward; the converter stores Gemma's (1 + w) weights already
//! added); per-head q/k RMSNorm; neox RoPE; sliding-window attention on every layer but each
//! `sliding_window_pattern`-th (6: layers 5, 11, …), the windowed layers with RoPE base
//! `rope.freq_base_swa` (10000) and no context scaling, the global ones with `rope.freq_base`
//! and the file's scaling (linear ×8 from 4B up); a GELU-tanh gated
//! feed-forward; attention scale 1/√key_length (27B: 1/√(n_embd/n_head)); tied output;
//! logits soft-capped when `final_logit_softcapping` is set. The forward pass is the shared
//! [`Decoder`]'s.

use anyhow::Result;

use super::decoder::{Act, Decoder, Hyper, Layer, Rope};
use super::Tensors;

pub fn load<'a>(t: &Tensors<'a>) -> Result<Decoder<'a>> {
    let h = Hyper::read(t, "gemma3")?;
    let md = t.gguf.metadata();
    let ff = md.get_usize(&h.key("feed_forward_length"))?;
    let window = md
        .get_usize(&h.key("attention.sliding_window"))
        .ok()
        .filter(|&w| w > 0);
    let swa = h.swa_layers(t, 6)?;
    let base_swa = match md.get(&h.key("rope.freq_base_swa")) {
        Some(_) => md.get_positive_f32(&h.key("rope.freq_base_swa"))?,
        None => 10000.0,
    };
    // Gemma 3 27B (62 layers) scales by its query_pre_attn_scalar, n_embd / n_head.
    let scale = if h.n_layer == 62 {
        1.0 / ((h.n_embd / h.n_head) as f32).sqrt()
    } else {
        1.0 / (h.head_dim as f32).sqrt()
    };
    let layers = (0..h.n_layer)
        .map(|i| {
            let p = |n: &str| format!("blk.{i}.{n}");
            // The file's context scaling (4B and up: linear ×8) is the global layers'; the
            // windowed ones rotate unscaled at their own base, as llama.cpp does.
            let (win, rope) = if window.is_some() && swa[i] {
                (window, Rope::plain(h.n_rot, base_swa, true))
            } else {
                (None, h.rope(t, h.freq_base, true)?)
            };
            Ok(Layer {
                attn_norm: t.vector(&p("attn_norm.weight"), h.n_embd)?,
                attn: h.attention(t, i, rope, win, scale, true, false)?,
                attn_post_norm: Some(t.vector(&p("post_attention_norm.weight"), h.n_embd)?),
                ffn_norm: t.vector(&p("ffn_norm.weight"), h.n_embd)?,
                ffn: h.gated(t, i, ff, Act::GeluTanh)?,
                ffn_post_norm: Some(t.vector(&p("post_ffw_norm.weight"), h.n_embd)?),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut d = h.decoder(t, layers, Some((h.n_embd as f32).sqrt()))?;
    d.logit_softcap = md
        .opt_scale(&h.key("final_logit_softcapping"))?
        .filter(|&c| c > 0.0);
    Ok(d)
}
