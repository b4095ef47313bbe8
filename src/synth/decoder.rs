//! Synthetic decoder models (`qwen2`, `qwen3`, `qwen3moe`, `gemma3`, `gpt-oss`): random weights,
//! but each arch's metadata keys, tensor names, tokenizer kind and chat format as llama.cpp reads
//! them, so that llama.cpp runs the same file. Two kinds: the tiny fixtures (n_embd 64; with
//! `dequantized`, every weight written as F32 holding its quantized values, the exact math of
//! the quantized file), and presets with a real model's widths, head layout, expert counts and
//! vocabulary size (`qwen3moe-30b-a3b`, `gpt-oss-20b`) whose tensor types are the ones
//! llama-quantize picks for the mix (tests/data/mixes/*.tsv are its `--dry-run` on the real
//! shapes; scripts/mix-dry-run.sh derives them again).

use std::path::Path;

use anyhow::{bail, Result};
use ggrun_quants::GgmlType;

use super::{add_rows, byte_alphabet, fallback, more_bits, Init};
use crate::gguf::{GgufWriter, Value};

/// The tiny decoder architectures the generator writes.
pub const ARCHS: [&str; 5] = ["qwen2", "qwen3", "qwen3moe", "gemma3", "gpt-oss"];

/// The real-width presets: (name, architecture).
pub const PRESETS: [(&str, &str); 2] =
    [("qwen3moe-30b-a3b", "qwen3moe"), ("gpt-oss-20b", "gpt-oss")];

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

/// llama-quantize's mixes for the real-width presets (`general.file_type` in parentheses):
/// `f32` (0), `f16` (1), `q8_0` (7), `q4_0` (2), `q4_k_m` (15), `mxfp4` (38, MXFP4_MOE: routed
/// experts MXFP4, every other matrix Q8_0, as gpt-oss is published).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresetMix {
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4KM,
    Mxfp4,
    Iq4Xs,
    Iq3Xxs,
    Iq2Xxs,
}

impl PresetMix {
    pub fn parse(s: &str) -> Result<PresetMix> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => PresetMix::F32,
            "f16" => PresetMix::F16,
            "q8_0" => PresetMix::Q8_0,
            "q4_0" => PresetMix::Q4_0,
            "q4_k_m" => PresetMix::Q4KM,
            "mxfp4" => PresetMix::Mxfp4,
            "iq4_xs" => PresetMix::Iq4Xs,
            "iq3_xxs" => PresetMix::Iq3Xxs,
            "iq2_xxs" => PresetMix::Iq2Xxs,
            _ => bail!(
                "unknown mix {s} for this preset (f32, f16, q8_0, q4_0, q4_k_m, mxfp4, iq4_xs, \
                 iq3_xxs, iq2_xxs)"
            ),
        })
    }

    fn file_type(self) -> u32 {
        match self {
            PresetMix::F32 => 0,
            PresetMix::F16 => 1,
            PresetMix::Q8_0 => 7,
            PresetMix::Q4_0 => 2,
            PresetMix::Q4KM => 15,
            PresetMix::Mxfp4 => 38,
            PresetMix::Iq4Xs => 30,
            PresetMix::Iq3Xxs => 23,
            PresetMix::Iq2Xxs => 19,
        }
    }

    /// The type llama-quantize picks for a matrix of `role` with rows of `ne0` in a model of
    /// `n_layer` layers (routers are never quantized, see [`Role::Router`]).
    fn pick(self, role: Role, ne0: u64, n_layer: usize) -> GgmlType {
        use GgmlType::*;
        let expert = matches!(role, Role::ExpGate | Role::ExpUp | Role::ExpDown { .. });
        let want = match self {
            PresetMix::F32 => return F32,
            PresetMix::F16 => return F16,
            PresetMix::Q8_0 => Q8_0,
            PresetMix::Mxfp4 if expert => MXFP4,
            PresetMix::Mxfp4 => Q8_0,
            PresetMix::Q4_0 => match role {
                Role::Output => Q6_K,
                _ => Q4_0,
            },
            PresetMix::Q4KM => match role {
                Role::Output => Q6_K,
                Role::AttnV { layer } if more_bits(layer, n_layer) => Q6_K,
                Role::FfnDown { layer } | Role::ExpDown { layer } if more_bits(layer, n_layer) => {
                    Q6_K
                }
                _ => Q4_K,
            },
            // Measured (tests/data/mixes/*-IQ4_XS.tsv): attn_v and the first eighth of the
            // layers' down projections get Q5_K, the output Q6_K.
            PresetMix::Iq4Xs => match role {
                Role::Output => Q6_K,
                Role::AttnV { .. } => Q5_K,
                Role::FfnDown { layer } | Role::ExpDown { layer } if layer < n_layer / 8 => Q5_K,
                _ => IQ4_XS,
            },
            // Measured (tests/data/mixes/*-IQ3_XXS.tsv, *-IQ2_XXS.tsv); an output whose rows
            // are not whole 256-blocks gets Q8_0 in every mix.
            PresetMix::Iq3Xxs | PresetMix::Iq2Xxs if role == Role::Output => {
                return if ne0.is_multiple_of(256) { Q5_K } else { Q8_0 };
            }
            PresetMix::Iq3Xxs => match role {
                Role::TokenEmbd | Role::AttnOut => IQ3_S,
                Role::Attn => IQ2_S,
                Role::AttnV { .. } => Q4_K,
                Role::FfnDown { layer } | Role::ExpDown { layer } if layer < n_layer / 8 => Q4_K,
                Role::FfnDown { .. } | Role::ExpDown { .. } => Q3_K,
                _ => IQ3_XXS,
            },
            PresetMix::Iq2Xxs => match role {
                Role::TokenEmbd => Q2_K,
                Role::AttnV { .. } => Q4_K,
                Role::FfnDown { layer } | Role::ExpDown { layer } if layer < n_layer / 8 => Q2_K,
                _ => IQ2_XXS,
            },
        };
        fallback(want, ne0)
    }
}

/// What a weight matrix is, for choosing its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    TokenEmbd,
    Output,
    /// attn_q, attn_k.
    Attn,
    AttnOut,
    AttnV {
        layer: usize,
    },
    FfnGateUp,
    FfnDown {
        layer: usize,
    },
    /// Stacked routed experts (3-D).
    ExpGate,
    ExpUp,
    ExpDown {
        layer: usize,
    },
    /// `ffn_gate_inp`: llama-quantize leaves routers as converted (F32).
    Router,
}

/// How a file's weight types are chosen.
#[derive(Clone, Copy, Debug)]
enum Types {
    Tiny(TinyMix),
    Preset(PresetMix),
}

impl Types {
    fn of(self, role: Role, ne0: u64, n_layer: usize) -> GgmlType {
        match (self, role) {
            (_, Role::Router) => GgmlType::F32,
            (Types::Tiny(m), Role::TokenEmbd | Role::Output) => m.ty(false, true),
            (Types::Tiny(m), Role::ExpGate | Role::ExpUp | Role::ExpDown { .. }) => {
                m.ty(true, false)
            }
            (Types::Tiny(m), _) => m.ty(false, false),
            (Types::Preset(m), r) => m.pick(r, ne0, n_layer),
        }
    }
}

/// Sizes of a decoder file.
#[derive(Clone, Debug)]
pub struct Shape {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Dense feed-forward rows (the metadata's `feed_forward_length` for MoE models).
    pub n_ff: usize,
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub expert_ff: usize,
    pub n_vocab: usize,
    pub window: usize,
    pub n_ctx_train: usize,
    pub eps: f32,
}

impl Shape {
    /// The tiny fixtures' sizes for `arch`.
    fn tiny(arch: &str) -> Shape {
        Shape {
            n_layer: if arch == "gemma3" { 6 } else { 4 },
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 16,
            // MoE fixtures name their expert width as the dense one.
            n_ff: if matches!(arch, "qwen3moe" | "gpt-oss") {
                64
            } else {
                96
            },
            n_expert: 8,
            n_expert_used: 2,
            expert_ff: 64,
            n_vocab: 512,
            window: 8,
            n_ctx_train: 4096,
            eps: if arch == "gemma3" { 1e-6 } else { 1e-5 },
        }
    }

    /// A preset's real sizes with its first `layers` layers (None: all), and its architecture.
    pub fn preset(name: &str, layers: Option<usize>) -> Result<(Shape, &'static str)> {
        let (shape, arch) = match name {
            // Qwen3-30B-A3B: 48 layers, 32 q / 4 kv heads of 128, 128 experts of 768 (top 8).
            "qwen3moe-30b-a3b" => (
                Shape {
                    n_layer: 48,
                    n_embd: 2048,
                    n_head: 32,
                    n_head_kv: 4,
                    head_dim: 128,
                    n_ff: 6144,
                    n_expert: 128,
                    n_expert_used: 8,
                    expert_ff: 768,
                    n_vocab: 151_936,
                    window: 0,
                    n_ctx_train: 40_960,
                    eps: 1e-6,
                },
                "qwen3moe",
            ),
            // GPT-OSS-20B: 24 layers, 64 q / 8 kv heads of 64, 32 experts of 2880 (top 4),
            // windows of 128 on even layers.
            "gpt-oss-20b" => (
                Shape {
                    n_layer: 24,
                    n_embd: 2880,
                    n_head: 64,
                    n_head_kv: 8,
                    head_dim: 64,
                    n_ff: 2880,
                    n_expert: 32,
                    n_expert_used: 4,
                    expert_ff: 2880,
                    n_vocab: 201_088,
                    window: 128,
                    n_ctx_train: 131_072,
                    eps: 1e-5,
                },
                "gpt-oss",
            ),
            _ => bail!(
                "unknown preset {name} ({})",
                PRESETS.map(|p| p.0).join(", ")
            ),
        };
        let n_layer = match layers {
            None => shape.n_layer,
            Some(n) if (1..=shape.n_layer).contains(&n) => n,
            Some(n) => bail!("--layers {n}: {name} has 1 to {} layers", shape.n_layer),
        };
        Ok((Shape { n_layer, ..shape }, arch))
    }
}

/// Collects the tensors, quantizing (or round-tripping, see [`add_rows`]) as the file is
/// written.
struct Writer {
    w: GgufWriter,
    seed: u64,
    dequantized: bool,
    types: Types,
    n_layer: usize,
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

    /// A weight matrix of `role`, typed as the file's mix says.
    fn matrix(&mut self, name: &str, dims: &[u64], role: Role, init: Init) {
        let ty = self.types.of(role, dims[0], self.n_layer);
        self.add(name, dims, ty, init);
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
    let name = format!("tiny synthetic {arch} ({mix:?})");
    let w = writer(
        arch,
        &Shape::tiny(arch),
        &name,
        None,
        Types::Tiny(mix),
        seed,
        dequantized,
    );
    w.write(path)?;
    Ok(())
}

/// Writes preset `name` (one of [`PRESETS`]) with its first `layers` layers (None: all) in
/// `mix`; with `skeleton`, only the header, the data left as a hole of the file's size (the
/// input of llama-quantize's `--dry-run`, which reads no weight).
pub fn write_preset(
    name: &str,
    layers: Option<usize>,
    mix: PresetMix,
    seed: u64,
    skeleton: bool,
    path: &Path,
) -> Result<()> {
    let (shape, arch) = Shape::preset(name, layers)?;
    let title = format!(
        "synthetic {name} widths, {} layers ({mix:?})",
        shape.n_layer
    );
    let w = writer(
        arch,
        &shape,
        &title,
        Some(mix.file_type()),
        Types::Preset(mix),
        seed,
        false,
    );
    if skeleton {
        w.write_skeleton(path)?;
    } else {
        w.write(path)?;
    }
    Ok(())
}

/// The file of `arch` at `sh`'s sizes, its tensors typed by `types` (made while it is written).
fn writer(
    arch: &str,
    sh: &Shape,
    name: &str,
    file_type: Option<u32>,
    types: Types,
    seed: u64,
    dequantized: bool,
) -> GgufWriter {
    let moe = matches!(arch, "qwen3moe" | "gpt-oss");
    let n_layer = sh.n_layer;
    let key = |k: &str| format!("{arch}.{k}");
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::str(arch))
        .kv("general.name", Value::str(name));
    if let Some(ft) = file_type {
        w.kv("general.file_type", Value::U32(ft));
    }
    w.kv("general.quantization_version", Value::U32(2))
        .kv(&key("block_count"), Value::U32(n_layer as u32))
        .kv(&key("context_length"), Value::U32(sh.n_ctx_train as u32))
        .kv(&key("embedding_length"), Value::U32(sh.n_embd as u32))
        .kv(&key("feed_forward_length"), Value::U32(sh.n_ff as u32))
        .kv(&key("attention.head_count"), Value::U32(sh.n_head as u32))
        .kv(
            &key("attention.head_count_kv"),
            Value::U32(sh.n_head_kv as u32),
        )
        .kv(&key("attention.key_length"), Value::U32(sh.head_dim as u32))
        .kv(
            &key("attention.value_length"),
            Value::U32(sh.head_dim as u32),
        )
        .kv(&key("rope.dimension_count"), Value::U32(sh.head_dim as u32))
        .kv(&key("attention.layer_norm_rms_epsilon"), Value::F32(sh.eps));
    match arch {
        "qwen2" | "qwen3" | "qwen3moe" => {
            w.kv(&key("rope.freq_base"), Value::F32(1_000_000.0));
        }
        "gemma3" => {
            w.kv(&key("rope.freq_base"), Value::F32(1_000_000.0))
                .kv(
                    &key("attention.sliding_window"),
                    Value::U32(sh.window as u32),
                )
                .kv(&key("final_logit_softcapping"), Value::F32(8.0))
                .kv(&key("rope.scaling.type"), Value::str("linear"))
                .kv(&key("rope.scaling.factor"), Value::F32(8.0));
        }
        _ => {
            w.kv(&key("rope.freq_base"), Value::F32(150_000.0))
                .kv(
                    &key("attention.sliding_window"),
                    Value::U32(sh.window as u32),
                )
                .kv(&key("rope.scaling.type"), Value::str("yarn"))
                .kv(&key("rope.scaling.factor"), Value::F32(32.0))
                .kv(
                    &key("rope.scaling.original_context_length"),
                    Value::U32(4096),
                );
        }
    }
    if moe {
        w.kv(&key("expert_count"), Value::U32(sh.n_expert as u32))
            .kv(
                &key("expert_used_count"),
                Value::U32(sh.n_expert_used as u32),
            )
            .kv(
                &key("expert_feed_forward_length"),
                Value::U32(sh.expert_ff as u32),
            );
    }
    vocabulary(&mut w, arch, sh.n_vocab);

    let mut wr = Writer {
        w,
        seed,
        dequantized,
        types,
        n_layer,
    };
    let (e, v) = (sh.n_embd as u64, sh.n_vocab as u64);
    let std_in = |n: usize| Init::Std(1.0 / (n as f32).sqrt());
    let one = Init::Around(1.0, 0.1);
    let small = Init::Std(0.1);
    let embd_std = if arch == "gemma3" { 0.125 } else { 1.0 };
    wr.matrix(
        "token_embd.weight",
        &[e, v],
        Role::TokenEmbd,
        Init::Std(embd_std),
    );
    wr.add("output_norm.weight", &[e], GgmlType::F32, one);
    if arch != "gemma3" {
        wr.matrix("output.weight", &[e, v], Role::Output, std_in(sh.n_embd));
    }
    let (qd, kd) = (
        (sh.n_head * sh.head_dim) as u64,
        (sh.n_head_kv * sh.head_dim) as u64,
    );
    for i in 0..n_layer {
        let b = |s: &str| format!("blk.{i}.{s}");
        wr.add(&b("attn_norm.weight"), &[e], GgmlType::F32, one);
        wr.matrix(&b("attn_q.weight"), &[e, qd], Role::Attn, std_in(sh.n_embd));
        wr.matrix(&b("attn_k.weight"), &[e, kd], Role::Attn, std_in(sh.n_embd));
        wr.matrix(
            &b("attn_v.weight"),
            &[e, kd],
            Role::AttnV { layer: i },
            std_in(sh.n_embd),
        );
        wr.matrix(
            &b("attn_output.weight"),
            &[qd, e],
            Role::AttnOut,
            std_in(qd as usize),
        );
        if matches!(arch, "qwen2" | "gpt-oss") {
            wr.add(&b("attn_q.bias"), &[qd], GgmlType::F32, small);
            wr.add(&b("attn_k.bias"), &[kd], GgmlType::F32, small);
            wr.add(&b("attn_v.bias"), &[kd], GgmlType::F32, small);
        }
        if arch == "gpt-oss" {
            wr.add(&b("attn_output.bias"), &[e], GgmlType::F32, small);
            wr.add(
                &b("attn_sinks.weight"),
                &[sh.n_head as u64],
                GgmlType::F32,
                Init::Std(1.0),
            );
        }
        if matches!(arch, "qwen3" | "qwen3moe" | "gemma3") {
            let hd = sh.head_dim as u64;
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
            let (ne, ff) = (sh.n_expert as u64, sh.expert_ff as u64);
            wr.matrix(
                &b("ffn_gate_inp.weight"),
                &[e, ne],
                Role::Router,
                std_in(sh.n_embd),
            );
            wr.matrix(
                &b("ffn_gate_exps.weight"),
                &[e, ff, ne],
                Role::ExpGate,
                std_in(sh.n_embd),
            );
            wr.matrix(
                &b("ffn_up_exps.weight"),
                &[e, ff, ne],
                Role::ExpUp,
                std_in(sh.n_embd),
            );
            wr.matrix(
                &b("ffn_down_exps.weight"),
                &[ff, e, ne],
                Role::ExpDown { layer: i },
                std_in(sh.expert_ff),
            );
            if arch == "gpt-oss" {
                wr.add(&b("ffn_gate_inp.bias"), &[ne], GgmlType::F32, small);
                wr.add(&b("ffn_gate_exps.bias"), &[ff, ne], GgmlType::F32, small);
                wr.add(&b("ffn_up_exps.bias"), &[ff, ne], GgmlType::F32, small);
                wr.add(&b("ffn_down_exps.bias"), &[e, ne], GgmlType::F32, small);
            }
        } else {
            let ff = sh.n_ff as u64;
            wr.matrix(
                &b("ffn_gate.weight"),
                &[e, ff],
                Role::FfnGateUp,
                std_in(sh.n_embd),
            );
            wr.matrix(
                &b("ffn_up.weight"),
                &[e, ff],
                Role::FfnGateUp,
                std_in(sh.n_embd),
            );
            wr.matrix(
                &b("ffn_down.weight"),
                &[ff, e],
                Role::FfnDown { layer: i },
                std_in(sh.n_ff),
            );
        }
    }
    wr.w
}

/// The tokenizer and chat template of each family: byte-level BPE (`gpt2`, pre `qwen2` or
/// `gpt-4o`) with the family's control tokens for Qwen and gpt-oss; a SentencePiece (`llama`)
/// vocabulary with byte fallback and Gemma's turn tokens for gemma3. Filler tokens pad the
/// vocabulary to its size; there are no merges, so text tokenizes to bytes or characters.
fn vocabulary(w: &mut GgufWriter, arch: &str, n_vocab: usize) {
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
        while tokens.len() < n_vocab {
            tokens.push(format!("<unused{}>", tokens.len()));
            types.push(5);
        }
        let scores: Vec<f32> = (0..n_vocab).map(|i| -(i as f32)).collect();
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
    while tokens.len() < n_vocab {
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
