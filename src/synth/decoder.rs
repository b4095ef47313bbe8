//! Tiny synthetic decoder models (`qwen2`, `qwen3`, `qwen3moe`, `gemma3`, `gpt-oss`) for the
//! fixtures: random weights, but each arch's metadata keys, tensor names, tokenizer kind and chat
//! format as llama.cpp reads them, so that llama.cpp runs the same file for goldens. With
//! `dequantized`, every weight is written as F32 holding its quantized values (the exact math of
//! the quantized file, for an exact-mode reference).

use std::path::Path;

use anyhow::{bail, Result};
use ggrun_quants::GgmlType;

use super::{add_rows, byte_alphabet, Init};
use crate::gguf::{GgufWriter, Value};

/// The tiny decoder architectures the generator writes.
pub const ARCHS: [&str; 5] = ["qwen2", "qwen3", "qwen3moe", "gemma3", "gpt-oss"];

/// Weight types of a tiny model: `f32`, `q8_0`, `q4_0` (output Q8_0), or `mxfp4` (experts
/// MXFP4, the rest Q8_0, as gpt-oss ships).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TinyMix {
    F32,
    Q8_0,
    Q4_0,
    Mxfp4,
}

impl TinyMix {
    pub fn parse(s: &str) -> Result<TinyMix> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => TinyMix::F32,
            "q8_0" => TinyMix::Q8_0,
            "q4_0" => TinyMix::Q4_0,
            "mxfp4" => TinyMix::Mxfp4,
            _ => bail!("unknown mix {s} for a tiny decoder (f32, q8_0, q4_0, mxfp4)"),
        })
    }

    fn ty(self, expert: bool, output: bool) -> GgmlType {
        match self {
            TinyMix::F32 => GgmlType::F32,
            TinyMix::Mxfp4 if expert => GgmlType::MXFP4,
            TinyMix::Q4_0 if !output => GgmlType::Q4_0,
            _ => GgmlType::Q8_0,
        }
    }
}

const N_EMBD: usize = 64;
const N_HEAD: usize = 4;
const N_HEAD_KV: usize = 2;
const HEAD_DIM: usize = 16;
const N_FF: usize = 96;
const N_EXPERT: usize = 8;
const N_EXPERT_USED: usize = 2;
const EXPERT_FF: usize = 64;
const N_VOCAB: usize = 512;
const WINDOW: usize = 8;

/// Collects the tensors, quantizing (or round-tripping, see [`add_rows`]) as the file is
/// written.
struct Writer {
    w: GgufWriter,
    seed: u64,
    dequantized: bool,
}

impl Writer {
    fn add(&mut self, name: &str, dims: &[u64], ty: GgmlType, init: Init) {
        add_rows(
            &mut self.w,
            self.seed,
            name,
            dims,
            ty,
            init,
            self.dequantized,
        );
    }
}

/// Writes a tiny model of `arch` (one of [`ARCHS`]).
pub fn write_tiny(
    arch: &str,
    mix: TinyMix,
    seed: u64,
    dequantized: bool,
    path: &Path,
) -> Result<()> {
    if !ARCHS.contains(&arch) {
        bail!("unknown tiny arch {arch} ({})", ARCHS.join(", "));
    }
    let moe = matches!(arch, "qwen3moe" | "gpt-oss");
    let n_layer = if arch == "gemma3" { 6 } else { 4 };
    let key = |k: &str| format!("{arch}.{k}");
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::str(arch))
        .kv(
            "general.name",
            Value::str(&format!("tiny synthetic {arch} ({mix:?})")),
        )
        .kv("general.quantization_version", Value::U32(2))
        .kv(&key("block_count"), Value::U32(n_layer as u32))
        .kv(&key("context_length"), Value::U32(4096))
        .kv(&key("embedding_length"), Value::U32(N_EMBD as u32))
        .kv(
            &key("feed_forward_length"),
            Value::U32(if moe { EXPERT_FF } else { N_FF } as u32),
        )
        .kv(&key("attention.head_count"), Value::U32(N_HEAD as u32))
        .kv(
            &key("attention.head_count_kv"),
            Value::U32(N_HEAD_KV as u32),
        )
        .kv(&key("attention.key_length"), Value::U32(HEAD_DIM as u32))
        .kv(&key("attention.value_length"), Value::U32(HEAD_DIM as u32))
        .kv(&key("rope.dimension_count"), Value::U32(HEAD_DIM as u32))
        .kv(
            &key("attention.layer_norm_rms_epsilon"),
            Value::F32(if arch == "gemma3" { 1e-6 } else { 1e-5 }),
        );
    match arch {
        "qwen2" | "qwen3" | "qwen3moe" => {
            w.kv(&key("rope.freq_base"), Value::F32(1_000_000.0));
        }
        "gemma3" => {
            w.kv(&key("rope.freq_base"), Value::F32(1_000_000.0))
                .kv(&key("attention.sliding_window"), Value::U32(WINDOW as u32))
                .kv(&key("final_logit_softcapping"), Value::F32(8.0))
                .kv(&key("rope.scaling.type"), Value::str("linear"))
                .kv(&key("rope.scaling.factor"), Value::F32(8.0));
        }
        _ => {
            w.kv(&key("rope.freq_base"), Value::F32(150_000.0))
                .kv(&key("attention.sliding_window"), Value::U32(WINDOW as u32))
                .kv(&key("rope.scaling.type"), Value::str("yarn"))
                .kv(&key("rope.scaling.factor"), Value::F32(32.0))
                .kv(
                    &key("rope.scaling.original_context_length"),
                    Value::U32(4096),
                );
        }
    }
    if moe {
        w.kv(&key("expert_count"), Value::U32(N_EXPERT as u32))
            .kv(&key("expert_used_count"), Value::U32(N_EXPERT_USED as u32))
            .kv(
                &key("expert_feed_forward_length"),
                Value::U32(EXPERT_FF as u32),
            );
    }
    vocabulary(&mut w, arch);

    let mut wr = Writer {
        w,
        seed,
        dequantized,
    };
    let (e, v) = (N_EMBD as u64, N_VOCAB as u64);
    let std_in = |n: usize| Init::Std(1.0 / (n as f32).sqrt());
    let one = Init::Around(1.0, 0.1);
    let small = Init::Std(0.1);
    let mat = mix.ty(false, false);
    let embd_std = if arch == "gemma3" { 0.125 } else { 1.0 };
    wr.add(
        "token_embd.weight",
        &[e, v],
        mix.ty(false, true),
        Init::Std(embd_std),
    );
    wr.add("output_norm.weight", &[e], GgmlType::F32, one);
    if arch != "gemma3" {
        wr.add(
            "output.weight",
            &[e, v],
            mix.ty(false, true),
            std_in(N_EMBD),
        );
    }
    let (qd, kd) = ((N_HEAD * HEAD_DIM) as u64, (N_HEAD_KV * HEAD_DIM) as u64);
    for i in 0..n_layer {
        let b = |s: &str| format!("blk.{i}.{s}");
        wr.add(&b("attn_norm.weight"), &[e], GgmlType::F32, one);
        wr.add(&b("attn_q.weight"), &[e, qd], mat, std_in(N_EMBD));
        wr.add(&b("attn_k.weight"), &[e, kd], mat, std_in(N_EMBD));
        wr.add(&b("attn_v.weight"), &[e, kd], mat, std_in(N_EMBD));
        wr.add(&b("attn_output.weight"), &[qd, e], mat, std_in(qd as usize));
        if matches!(arch, "qwen2" | "gpt-oss") {
            wr.add(&b("attn_q.bias"), &[qd], GgmlType::F32, small);
            wr.add(&b("attn_k.bias"), &[kd], GgmlType::F32, small);
            wr.add(&b("attn_v.bias"), &[kd], GgmlType::F32, small);
        }
        if arch == "gpt-oss" {
            wr.add(&b("attn_output.bias"), &[e], GgmlType::F32, small);
            wr.add(
                &b("attn_sinks.weight"),
                &[N_HEAD as u64],
                GgmlType::F32,
                Init::Std(1.0),
            );
        }
        if matches!(arch, "qwen3" | "qwen3moe" | "gemma3") {
            let hd = HEAD_DIM as u64;
            wr.add(&b("attn_q_norm.weight"), &[hd], GgmlType::F32, one);
            wr.add(&b("attn_k_norm.weight"), &[hd], GgmlType::F32, one);
        }
        let ffn_norm = if arch == "gpt-oss" {
            "post_attention_norm.weight"
        } else {
            "ffn_norm.weight"
        };
        wr.add(&b(ffn_norm), &[e], GgmlType::F32, one);
        if arch == "gemma3" {
            wr.add(&b("post_attention_norm.weight"), &[e], GgmlType::F32, one);
            wr.add(&b("post_ffw_norm.weight"), &[e], GgmlType::F32, one);
        }
        if moe {
            let (ne, ff) = (N_EXPERT as u64, EXPERT_FF as u64);
            let exp = mix.ty(true, false);
            wr.add(
                &b("ffn_gate_inp.weight"),
                &[e, ne],
                GgmlType::F32,
                std_in(N_EMBD),
            );
            wr.add(
                &b("ffn_gate_exps.weight"),
                &[e, ff, ne],
                exp,
                std_in(N_EMBD),
            );
            wr.add(&b("ffn_up_exps.weight"), &[e, ff, ne], exp, std_in(N_EMBD));
            wr.add(
                &b("ffn_down_exps.weight"),
                &[ff, e, ne],
                exp,
                std_in(EXPERT_FF),
            );
            if arch == "gpt-oss" {
                wr.add(&b("ffn_gate_inp.bias"), &[ne], GgmlType::F32, small);
                wr.add(&b("ffn_gate_exps.bias"), &[ff, ne], GgmlType::F32, small);
                wr.add(&b("ffn_up_exps.bias"), &[ff, ne], GgmlType::F32, small);
                wr.add(&b("ffn_down_exps.bias"), &[e, ne], GgmlType::F32, small);
            }
        } else {
            let ff = N_FF as u64;
            wr.add(&b("ffn_gate.weight"), &[e, ff], mat, std_in(N_EMBD));
            wr.add(&b("ffn_up.weight"), &[e, ff], mat, std_in(N_EMBD));
            wr.add(&b("ffn_down.weight"), &[ff, e], mat, std_in(N_FF));
        }
    }
    wr.w.write(path)?;
    Ok(())
}

/// The tokenizer and chat template of each family: byte-level BPE (`gpt2`, pre `qwen2` or
/// `gpt-4o`) with the family's control tokens for Qwen and gpt-oss; a SentencePiece (`llama`)
/// vocabulary with byte fallback and Gemma's turn tokens for gemma3. Filler tokens pad the
/// vocabulary to its size; there are no merges, so text tokenizes to bytes or characters.
fn vocabulary(w: &mut GgufWriter, arch: &str) {
    let mut tokens: Vec<String>;
    let mut types: Vec<i32>;
    if arch == "gemma3" {
        tokens = [
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "<start_of_turn>",
            "<end_of_turn>",
        ]
        .map(String::from)
        .to_vec();
        types = vec![3, 3, 3, 2, 3, 3];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        types.extend([6; 256]);
        // Single characters as pieces, the word boundary first.
        for c in std::iter::once('\u{2581}').chain((b'!'..=b'~').map(char::from)) {
            tokens.push(c.to_string());
            types.push(1);
        }
        while tokens.len() < N_VOCAB {
            tokens.push(format!("<unused{}>", tokens.len()));
            types.push(5);
        }
        let scores: Vec<f32> = (0..N_VOCAB).map(|i| -(i as f32)).collect();
        w.kv("tokenizer.ggml.model", Value::str("llama"))
            .kv("tokenizer.ggml.tokens", Value::strs(&tokens))
            .kv("tokenizer.ggml.scores", Value::f32s(&scores))
            .kv("tokenizer.ggml.token_type", Value::i32s(&types))
            .kv("tokenizer.ggml.bos_token_id", Value::U32(2))
            .kv("tokenizer.ggml.eos_token_id", Value::U32(1))
            .kv("tokenizer.ggml.unknown_token_id", Value::U32(3))
            .kv("tokenizer.ggml.padding_token_id", Value::U32(0))
            .kv("tokenizer.ggml.add_bos_token", Value::Bool(true))
            .kv("tokenizer.ggml.add_space_prefix", Value::Bool(false))
            .kv("tokenizer.chat_template", Value::str(GEMMA_TEMPLATE));
        return;
    }
    tokens = byte_alphabet().iter().map(|c| c.to_string()).collect();
    types = vec![1; 256];
    let (controls, user): (&[&str], &[&str]) = if arch == "gpt-oss" {
        (
            &[
                "<|startoftext|>",
                "<|endoftext|>",
                "<|return|>",
                "<|start|>",
                "<|end|>",
                "<|message|>",
                "<|channel|>",
                "<|constrain|>",
                "<|call|>",
            ],
            &[],
        )
    } else {
        (
            &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            &["<think>", "</think>"],
        )
    };
    for c in controls {
        tokens.push(c.to_string());
        types.push(3);
    }
    for u in user {
        tokens.push(u.to_string());
        types.push(4);
    }
    while tokens.len() < N_VOCAB {
        tokens.push(format!("<t{}>", tokens.len()));
        types.push(1);
    }
    let id = |s: &str| tokens.iter().position(|t| t == s).unwrap() as u32;
    let (pre, bos, eos, template) = if arch == "gpt-oss" {
        (
            "gpt-4o",
            id("<|startoftext|>"),
            id("<|return|>"),
            HARMONY_TEMPLATE,
        )
    } else {
        let t = if arch == "qwen2" {
            CHATML_TEMPLATE
        } else {
            QWEN3_TEMPLATE
        };
        ("qwen2", id("<|endoftext|>"), id("<|im_end|>"), t)
    };
    w.kv("tokenizer.ggml.model", Value::str("gpt2"))
        .kv("tokenizer.ggml.pre", Value::str(pre))
        .kv("tokenizer.ggml.tokens", Value::strs(&tokens))
        .kv("tokenizer.ggml.token_type", Value::i32s(&types))
        .kv("tokenizer.ggml.merges", Value::strs::<&str>(&[]))
        .kv("tokenizer.ggml.bos_token_id", Value::U32(bos))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(eos))
        .kv("tokenizer.ggml.add_bos_token", Value::Bool(false))
        .kv("tokenizer.chat_template", Value::str(template));
}

/// ChatML (Qwen2).
const CHATML_TEMPLATE: &str = "{%- for m in messages -%}\
{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}";

/// ChatML with Qwen3's thinking switch: with `enable_thinking` false the assistant turn starts
/// with an empty think block.
const QWEN3_TEMPLATE: &str = "{%- for m in messages -%}\
{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}\
{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}\
{%- endif -%}";

/// Gemma's turns (the model's role is `model`; a system message joins the first user turn).
const GEMMA_TEMPLATE: &str = "{{- bos_token -}}\
{%- if messages[0]['role'] == 'system' -%}\
{%- set sys = messages[0]['content'] + '\\n\\n' -%}{%- set rest = messages[1:] -%}\
{%- else -%}{%- set sys = '' -%}{%- set rest = messages -%}{%- endif -%}\
{%- for m in rest -%}\
{{- '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + (sys if loop.first else '') + m['content'] + '<end_of_turn>\\n' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}";

/// gpt-oss's harmony format: a system message naming the reasoning effort and the channels,
/// messages as `<|start|>role<|message|>…<|end|>`, past assistant answers on the `final`
/// channel, and an open assistant header for the model to continue with a channel.
const HARMONY_TEMPLATE: &str = "{{- '<|start|>system<|message|>You are a helpful assistant.\\nReasoning: ' + (reasoning_effort if reasoning_effort is defined else 'medium') + '\\n\\n# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>' -}}\
{%- for m in messages -%}\
{%- if m['role'] == 'system' -%}{{- '<|start|>developer<|message|># Instructions\\n\\n' + m['content'] + '<|end|>' -}}\
{%- elif m['role'] == 'assistant' -%}{{- '<|start|>assistant<|channel|>final<|message|>' + m['content'] + '<|end|>' -}}\
{%- else -%}{{- '<|start|>' + m['role'] + '<|message|>' + m['content'] + '<|end|>' -}}\
{%- endif -%}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}";
