//! `ggrun info`: what a GGUF model is and what it needs — architecture, size, tensor types,
//! tokenizer, the layer pattern of hybrid models, and memory by group (non-expert weights,
//! routed experts per MoE layer, KV cache per 1k tokens, recurrent state per sequence).

use std::collections::BTreeMap;

use serde_json::{json, Value as Json};

use crate::backend::state::KvType;
use crate::gguf::{MetaError, Model};

/// Bytes and tensor count of one type.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TypeStats {
    pub count: usize,
    pub bytes: u64,
}

/// Everything `ggrun info` reports.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub architecture: String,
    pub name: Option<String>,
    pub gguf_version: u32,
    pub split_parts: usize,
    pub file_bytes: u64,
    pub tensor_count: usize,
    pub parameters: u64,
    pub types: BTreeMap<String, TypeStats>,
    pub context_length: Option<usize>,
    pub block_count: Option<usize>,
    pub tokenizer_model: Option<String>,
    pub vocab_size: Option<usize>,
    pub chat_template: bool,
    /// One letter per layer for hybrid stacks: M Mamba-2, * attention, E MoE, - dense MLP.
    pub layer_pattern: Option<String>,
    /// The layer structure of decoder-only transformers: attention (heads, RoPE, extras, which
    /// layers see a sliding window) and feed-forward (gated MLP or routed experts).
    pub layer_structure: Option<String>,
    pub non_expert_bytes: u64,
    pub expert_bytes: u64,
    /// Routed-expert bytes of each MoE layer, by layer index.
    pub expert_bytes_per_layer: BTreeMap<usize, u64>,
    /// F16 K and V for 1024 tokens over all attention layers.
    pub kv_bytes_per_1k: Option<u64>,
    /// Conv + SSM state of all Mamba layers for one sequence (independent of context length).
    pub recurrent_state_bytes: u64,
}

/// Sanity bound on `{arch}.block_count` (real models have at most a few hundred layers).
const MAX_LAYERS: usize = 1 << 16;

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Routed-expert tensors: the stacked per-expert weights (`*_exps`), plus their per-expert
/// scales/biases if any.
fn is_routed_expert(name: &str) -> bool {
    name.contains("_exps.")
}

impl ModelInfo {
    pub fn from_model(m: &Model) -> Result<ModelInfo, MetaError> {
        let md = m.metadata();
        let arch = md.get_str("general.architecture")?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let opt_usize = |k: &str| md.get(&key(k)).map(|_| md.get_usize(&key(k))).transpose();

        let mut types: BTreeMap<String, TypeStats> = BTreeMap::new();
        let (mut parameters, mut expert_bytes, mut total) = (0u64, 0u64, 0u64);
        let mut expert_bytes_per_layer = BTreeMap::new();
        for t in m.tensors() {
            let e = types.entry(t.ty.name().to_string()).or_default();
            e.count += 1;
            e.bytes += t.size_bytes;
            parameters += t.elements();
            total += t.size_bytes;
            if is_routed_expert(&t.name) {
                expert_bytes += t.size_bytes;
                if let Some(l) = layer_of(&t.name) {
                    *expert_bytes_per_layer.entry(l).or_insert(0) += t.size_bytes;
                }
            }
        }

        let block_count = opt_usize("block_count")?;
        if let Some(n) = block_count.filter(|&n| n > MAX_LAYERS) {
            return Err(MetaError::OutOfRange {
                key: key("block_count"),
                value: n.to_string(),
                why: "more layers than any model has",
            });
        }
        let layer_pattern = match (arch.as_str(), block_count) {
            ("nemotron_h" | "nemotron_h_moe", Some(n)) => Some(nemotron_pattern(m, &arch, n)?),
            ("mamba" | "mamba2", Some(n)) => Some("M".repeat(n)),
            _ => None,
        };
        let layer_structure = block_count
            .map(|n| decoder_structure(m, &arch, n))
            .transpose()?
            .flatten();
        let (kv_bytes_per_1k, recurrent_state_bytes) =
            state_sizes(m, &arch, block_count, layer_pattern.as_deref())?;

        Ok(ModelInfo {
            name: md
                .get("general.name")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            gguf_version: m.parts[0].version,
            split_parts: m.parts.len(),
            file_bytes: m.file_bytes(),
            tensor_count: m.tensor_count(),
            parameters,
            types,
            context_length: opt_usize("context_length")?,
            block_count,
            tokenizer_model: md
                .get("tokenizer.ggml.model")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            vocab_size: md.array_len("tokenizer.ggml.tokens").ok(),
            chat_template: md.get("tokenizer.chat_template").is_some(),
            layer_pattern,
            layer_structure,
            non_expert_bytes: total - expert_bytes,
            expert_bytes,
            expert_bytes_per_layer,
            kv_bytes_per_1k,
            recurrent_state_bytes,
            architecture: arch,
        })
    }

    pub fn to_json(&self) -> Json {
        let types: serde_json::Map<String, Json> = self
            .types
            .iter()
            .map(|(k, v)| (k.clone(), json!({"count": v.count, "bytes": v.bytes})))
            .collect();
        let per_layer: serde_json::Map<String, Json> = self
            .expert_bytes_per_layer
            .iter()
            .map(|(l, b)| (l.to_string(), json!(b)))
            .collect();
        json!({
            "architecture": self.architecture,
            "name": self.name,
            "gguf_version": self.gguf_version,
            "split_parts": self.split_parts,
            "file_bytes": self.file_bytes,
            "tensor_count": self.tensor_count,
            "parameters": self.parameters,
            "types": types,
            "context_length": self.context_length,
            "block_count": self.block_count,
            "tokenizer": {"model": self.tokenizer_model, "vocab_size": self.vocab_size},
            "chat_template": self.chat_template,
            "layer_pattern": self.layer_pattern,
            "layer_structure": self.layer_structure,
            "memory": {
                "non_expert_bytes": self.non_expert_bytes,
                "expert_bytes": self.expert_bytes,
                "expert_bytes_per_moe_layer": per_layer,
                "kv_cache_bytes_per_1k_tokens": self.kv_bytes_per_1k,
                "kv_cache_bytes_per_1k_tokens_by_type": self.kv_bytes_per_1k.map(|f16| {
                    KvType::NAMED
                        .iter()
                        .map(|&t| (t.name().to_string(), json!(kv_bytes_as(f16, t))))
                        .collect::<serde_json::Map<_, _>>()
                }),
                "recurrent_state_bytes_per_sequence": self.recurrent_state_bytes,
            },
        })
    }

    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:<24}{v}\n"));
        line("architecture", self.architecture.clone());
        if let Some(n) = &self.name {
            line("name", n.clone());
        }
        line(
            "file",
            format!(
                "GGUF v{}, {} part(s), {}",
                self.gguf_version,
                self.split_parts,
                human_bytes(self.file_bytes)
            ),
        );
        line(
            "parameters",
            format!("{} ({})", self.parameters, human_count(self.parameters)),
        );
        line("tensors", self.tensor_count.to_string());
        for (t, st) in &self.types {
            line(
                &format!("  {t}"),
                format!("{:>5} tensors  {:>12}", st.count, human_bytes(st.bytes)),
            );
        }
        line("context length", opt(self.context_length));
        line("layers", opt(self.block_count));
        if let Some(p) = &self.layer_pattern {
            line("layer pattern", p.clone());
        }
        if let Some(p) = &self.layer_structure {
            for (i, part) in p.split("; ").enumerate() {
                line(
                    if i == 0 { "layer structure" } else { "" },
                    part.to_string(),
                );
            }
        }
        line(
            "tokenizer",
            format!(
                "{}, vocab {}",
                self.tokenizer_model.as_deref().unwrap_or("none"),
                opt(self.vocab_size)
            ),
        );
        line(
            "chat template",
            if self.chat_template { "yes" } else { "no" }.into(),
        );
        line("non-expert weights", human_bytes(self.non_expert_bytes));
        if self.expert_bytes > 0 {
            let n = self.expert_bytes_per_layer.len().max(1) as u64;
            line(
                "routed experts",
                format!(
                    "{} in {} MoE layers ({} per layer)",
                    human_bytes(self.expert_bytes),
                    self.expert_bytes_per_layer.len(),
                    human_bytes(self.expert_bytes / n)
                ),
            );
        }
        if let Some(kv) = self.kv_bytes_per_1k {
            let others: Vec<String> = [KvType::Q8_0, KvType::Q4_0]
                .iter()
                .map(|&t| format!("{} {}", t.name(), human_bytes(kv_bytes_as(kv, t))))
                .collect();
            line(
                "KV cache (f16)",
                format!("{} per 1k tokens ({})", human_bytes(kv), others.join(", ")),
            );
        }
        if self.recurrent_state_bytes > 0 {
            line(
                "recurrent state",
                format!("{} per sequence", human_bytes(self.recurrent_state_bytes)),
            );
        }
        s
    }
}

fn opt(v: Option<usize>) -> String {
    v.map_or("unknown".into(), |x| x.to_string())
}

/// 1.5 GiB, 320.0 KiB, ...
pub fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut i = 0;
    while x >= 1024.0 && i < U.len() - 1 {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{x:.2} {}", U[i])
    }
}

fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// The layers of the decoder-only architectures we run (None for others): attention heads,
/// RoPE pairing, biases, q/k norms, sinks and sliding windows, then the feed-forward.
fn decoder_structure(m: &Model, arch: &str, n: usize) -> Result<Option<String>, MetaError> {
    let (rope, window_pattern) = match arch {
        "llama" => ("RoPE", None),
        "qwen2" | "qwen3" | "qwen3moe" => ("RoPE neox", None),
        "gemma3" => ("RoPE neox", Some(6)),
        "gpt-oss" => ("RoPE neox", Some(2)),
        _ => return Ok(None),
    };
    let md = m.metadata();
    let key = |k: &str| format!("{arch}.{k}");
    let n_head = md.get_usize(&key("attention.head_count"))?;
    let n_kv = md
        .get_usize(&key("attention.head_count_kv"))
        .unwrap_or(n_head);
    let n_embd = md.get_usize(&key("embedding_length"))?;
    let hd = md
        .get_usize(&key("attention.key_length"))
        .unwrap_or(n_embd / n_head.max(1));
    let has = |t: &str| m.tensor(&format!("blk.0.{t}")).is_some();
    let mut attn = format!("attention: {n_head} q / {n_kv} kv heads x {hd}, {rope}");
    if md.get_str(&key("rope.scaling.type")).ok() == Some("yarn") {
        let f = md.get_f32(&key("rope.scaling.factor")).unwrap_or(1.0);
        attn += &format!(" (YaRN x{f})");
    }
    for (t, what) in [
        ("attn_q.bias", "qkv bias"),
        ("attn_q_norm.weight", "q/k norm"),
        ("attn_sinks.weight", "sinks"),
        ("post_attention_norm.weight", "post-norms"),
    ] {
        // gpt-oss names its pre-feed-forward norm post_attention_norm.
        if has(t) && !(arch == "gpt-oss" && t.starts_with("post_")) {
            attn += &format!(", {what}");
        }
    }
    let mut parts = vec![attn];
    if let (Some(p), Ok(w)) = (
        window_pattern,
        md.get_usize(&key("attention.sliding_window")),
    ) {
        // Its one error: an array pattern without an entry per layer.
        let swa = crate::model::decoder::swa_layers(md, arch, n, p).map_err(|e| {
            MetaError::OutOfRange {
                key: key("attention.sliding_window_pattern"),
                value: e.to_string(),
                why: "must have one entry per layer",
            }
        })?;
        let full: Vec<String> = (0..n).filter(|&i| !swa[i]).map(|i| i.to_string()).collect();
        parts.push(format!(
            "sliding window {w} on {} layers, full attention on layers {}",
            n - full.len(),
            if full.is_empty() {
                "none".into()
            } else {
                full.join(",")
            }
        ));
    }
    parts.push(if has("ffn_gate_inp.weight") {
        let ne = md.get_usize(&key("expert_count"))?;
        let k = md.get_usize(&key("expert_used_count"))?;
        let ff = md
            .get_usize(&key("expert_feed_forward_length"))
            .unwrap_or(0);
        let rule = if arch == "gpt-oss" {
            "top-k logits then softmax over them, clamped SwiGLU, biases"
        } else {
            "softmax, renormalised, SwiGLU"
        };
        format!("MoE: {ne} experts of ff {ff}, {k} active ({rule})")
    } else {
        let ff = md.get_usize(&key("feed_forward_length")).unwrap_or(0);
        let act = if arch == "gemma3" {
            "GELU-tanh"
        } else {
            "SwiGLU"
        };
        format!("gated MLP: ff {ff} ({act})")
    });
    Ok(Some(parts.join("; ")))
}

/// Nemotron-H layer kinds from the per-layer arrays (the spec's rule).
fn nemotron_pattern(m: &Model, arch: &str, n: usize) -> Result<String, MetaError> {
    let md = m.metadata();
    let kv = md.get_per_layer(&format!("{arch}.attention.head_count_kv"), n)?;
    let ff = md.get_per_layer(&format!("{arch}.feed_forward_length"), n)?;
    Ok((0..n)
        .map(|i| match (kv[i], ff[i]) {
            (0, 0) => 'M',
            (_, 0) => '*',
            _ if m.tensor(&format!("blk.{i}.ffn_gate_inp.weight")).is_some() => 'E',
            _ => '-',
        })
        .collect())
}

/// (KV bytes per 1k tokens, recurrent state bytes per sequence).
fn state_sizes(
    m: &Model,
    arch: &str,
    block_count: Option<usize>,
    pattern: Option<&str>,
) -> Result<(Option<u64>, u64), MetaError> {
    let md = m.metadata();
    let key = |k: &str| format!("{arch}.{k}");
    let Some(n) = block_count else {
        return Ok((None, 0));
    };
    let n_head = md.get_usize(&key("attention.head_count")).unwrap_or(0);
    let n_kv = match md.get(&key("attention.head_count_kv")) {
        Some(_) => md.get_per_layer(&key("attention.head_count_kv"), n)?,
        None => vec![n_head; n],
    };
    let n_embd = md.get_usize(&key("embedding_length")).unwrap_or(0);
    let hd_default = n_embd.checked_div(n_head).unwrap_or(0);
    let k_len = md
        .get_usize(&key("attention.key_length"))
        .unwrap_or(hd_default) as u64;
    let v_len = md
        .get_usize(&key("attention.value_length"))
        .unwrap_or(hd_default) as u64;
    let kinds: Vec<char> = match pattern {
        Some(p) => p.chars().collect(),
        None => vec!['*'; n],
    };
    // u128 so that hostile metadata cannot overflow; clamped when reported.
    let attention = n_head > 0;
    let kv: u128 = (0..n)
        .filter(|&i| kinds[i] == '*' && n_kv[i] > 0)
        .map(|i| {
            (n_kv[i] as u128)
                .saturating_mul(k_len as u128 + v_len as u128)
                // 1024 tokens of f16 values: the CPU cache in normal precision, as llama.cpp's
                // (exact mode and the GPU's device cache hold f32, twice this).
                .saturating_mul(2048)
        })
        .fold(0u128, u128::saturating_add);
    let mut rec = 0u128;
    let mamba_layers = kinds.iter().filter(|&&k| k == 'M').count() as u128;
    if mamba_layers > 0 {
        let d_conv = md.get_usize(&key("ssm.conv_kernel"))? as u128;
        let d_inner = md.get_usize(&key("ssm.inner_size"))? as u128;
        let d_state = md.get_usize(&key("ssm.state_size"))? as u128;
        // Mamba-1 has no groups: B and C are not part of the conv input.
        let n_group = match md.get(&key("ssm.group_count")) {
            Some(_) => md.get_usize(&key("ssm.group_count"))? as u128,
            None => 0,
        };
        let channels = n_group
            .saturating_mul(d_state)
            .saturating_mul(2)
            .saturating_add(d_inner);
        let conv = d_conv
            .saturating_sub(1)
            .saturating_mul(channels)
            .saturating_mul(4);
        let ssm = d_inner.saturating_mul(d_state).saturating_mul(4);
        rec = mamba_layers.saturating_mul(conv.saturating_add(ssm));
    }
    let clamp = |x: u128| x.min(u64::MAX as u128) as u64;
    Ok((attention.then(|| clamp(kv)), clamp(rec)))
}

/// The KV bytes of `f16` bytes' worth of f16 values held as `ty` (bytes per 32 values: f16 64,
/// q8_0 34, q4_0 18).
fn kv_bytes_as(f16: u64, ty: KvType) -> u64 {
    let per_32 = ty.bytes(32, 1).unwrap_or(64);
    (f16 as u128 * per_32 as u128 / 64).min(u64::MAX as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufFile, GgufWriter, Value};
    use std::path::Path;

    fn model(w: &GgufWriter) -> Model {
        let f = GgufFile::from_bytes(w.to_bytes(), Path::new("t.gguf")).unwrap();
        Model::from_parts(vec![f]).unwrap()
    }

    #[test]
    fn pure_mamba2_has_state_but_no_kv_cache() {
        let mut w = GgufWriter::new();
        w.kv("general.architecture", Value::str("mamba2"))
            .kv("mamba2.block_count", Value::U32(3))
            .kv("mamba2.ssm.conv_kernel", Value::U32(4))
            .kv("mamba2.ssm.inner_size", Value::U32(64))
            .kv("mamba2.ssm.state_size", Value::U32(16))
            .kv("mamba2.ssm.group_count", Value::U32(1));
        let info = ModelInfo::from_model(&model(&w)).unwrap();
        assert_eq!(info.layer_pattern.as_deref(), Some("MMM"));
        assert_eq!(info.kv_bytes_per_1k, None);
        assert_eq!(
            info.recurrent_state_bytes,
            3 * (3 * (64 + 32) * 4 + 64 * 16 * 4)
        );
    }

    #[test]
    fn llama_kv_cache_uses_head_count_kv_and_head_dim() {
        let mut w = GgufWriter::new();
        w.kv("general.architecture", Value::str("llama"))
            .kv("llama.block_count", Value::U32(30))
            .kv("llama.embedding_length", Value::U32(576))
            .kv("llama.attention.head_count", Value::U32(9))
            .kv("llama.attention.head_count_kv", Value::U32(3))
            .tensor_f32("blk.0.ffn_up_exps.weight", &[32, 2, 2], &[0.0; 128])
            .tensor_f32("output_norm.weight", &[32], &[1.0; 32]);
        let info = ModelInfo::from_model(&model(&w)).unwrap();
        // 30 layers × 3 kv heads × (64 + 64) dims × 2 bytes × 1024 tokens.
        assert_eq!(info.kv_bytes_per_1k, Some(30 * 3 * 128 * 2 * 1024));
        assert_eq!(info.layer_pattern, None);
        assert_eq!(info.expert_bytes, 512);
        assert_eq!(info.expert_bytes_per_layer.get(&0), Some(&512));
        assert_eq!(info.non_expert_bytes, 128);
        assert_eq!(info.parameters, 160);
    }
}
