//! Synthetic models: valid GGUF files with random weights for a preset, because real Nemotron
//! weights cannot be downloaded here. The `nemotron-3-nano` preset has the real widths (n_embd
//! 2688, 128 experts of ff 1856 with 6 active, shared ff 3712, d_inner 4096 in 64 heads, d_state
//! 128, 8 groups, 32 q / 2 kv heads of 128, vocab 131072) and any number of layers (the first N
//! layers of the real 52-layer pattern by default). Tensor types follow llama-quantize's rules for
//! each mix, including its fallbacks for rows that are not a multiple of 256, so that the file
//! reproduces ../shared/spec/mixes/*.tsv tensor by tensor. Router weights and selection biases
//! are skewed so that expert usage is uneven, as in trained models. Weights are generated and
//! quantized while the file is written, row-parallel, never all in memory; a stack of experts
//! repeats its first [`ROW_POOL`] rows (quantizing every row of a 30B-weight file took minutes
//! on 16 cores, and speed does not depend on the values).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use ggrun_quants::{quantize_fn, GgmlType};
use rayon::prelude::*;

use crate::gguf::{GgufWriter, Value};

pub mod decoder;

/// The real Nemotron 3 Nano layer pattern (M Mamba-2, E MoE, * attention).
pub const NANO_PATTERN: &str = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME";

/// Quant mixes llama-quantize offers that matter for Nemotron.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    F32,
    Q8_0,
    Q4_0,
    Q4KM,
    Q3KM,
}

impl Mix {
    pub fn parse(s: &str) -> Result<Mix> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Mix::F32,
            "q8_0" => Mix::Q8_0,
            "q4_0" => Mix::Q4_0,
            "q4_k_m" => Mix::Q4KM,
            "q3_k_m" => Mix::Q3KM,
            _ => bail!("unknown mix {s} (f32, q8_0, q4_0, q4_k_m, q3_k_m)"),
        })
    }

    fn file_type(self) -> u32 {
        match self {
            Mix::F32 => 0,
            Mix::Q8_0 => 7,
            Mix::Q4_0 => 2,
            Mix::Q4KM => 15,
            Mix::Q3KM => 12,
        }
    }
}

/// What a tensor is, for choosing its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    TokenEmbd,
    Output,
    AttnQK,
    AttnV { index: usize, count: usize },
    AttnOut,
    SsmIn,
    SsmOut,
    FfnUp,
    FfnDown { layer: usize, n_layer: usize },
}

/// llama-quantize's `use_more_bits`.
pub(crate) fn more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64).rem_euclid(3) == 2
}

/// The type llama-quantize picks for a weight of `role` with rows of `ne0` (after its fallback
/// for rows that are not whole 256-blocks).
fn pick_type(mix: Mix, role: Role, ne0: u64) -> GgmlType {
    use GgmlType::*;
    let want = match mix {
        Mix::F32 => return F32,
        Mix::Q8_0 => Q8_0,
        Mix::Q4_0 => match role {
            Role::Output => Q6_K,
            _ => Q4_0,
        },
        Mix::Q4KM => match role {
            Role::Output => Q6_K,
            Role::AttnV { index, count } if more_bits(index, count) => Q6_K,
            Role::FfnDown { layer, n_layer } if more_bits(layer, n_layer) => Q6_K,
            _ => Q4_K,
        },
        Mix::Q3KM => match role {
            Role::Output => Q6_K,
            Role::AttnV { index, .. } => {
                if index < 2 {
                    Q5_K
                } else {
                    Q4_K
                }
            }
            Role::AttnOut => Q4_K,
            Role::FfnDown { layer, n_layer } => {
                if layer < n_layer / 16 {
                    Q5_K
                } else {
                    Q4_K
                }
            }
            _ => Q3_K,
        },
    };
    fallback(want, ne0)
}

/// llama-quantize's fallback for rows of `ne0` that are not whole blocks of `want` (K-quants
/// on rows that are not whole 256-blocks).
pub(crate) fn fallback(want: GgmlType, ne0: u64) -> GgmlType {
    use GgmlType::*;
    if want.block_size() == 256 && !ne0.is_multiple_of(256) {
        match want {
            Q4_K => Q5_0,
            Q5_K => Q5_1,
            Q6_K => Q8_0,
            IQ4_XS | IQ2_XXS | IQ2_XS | IQ2_S | IQ3_XXS | IQ3_S | IQ1_S | IQ1_M => IQ4_NL,
            _ => Q4_0,
        }
    } else {
        want
    }
}

/// Sizes of the Nemotron-H preset.
#[derive(Clone, Debug)]
pub struct NemotronPreset {
    pub pattern: String,
    pub n_embd: usize,
    pub n_vocab: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub d_inner: usize,
    pub d_state: usize,
    pub n_group: usize,
    pub n_ssm_head: usize,
    pub d_conv: usize,
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub ff_exp: usize,
    pub ff_shexp: usize,
}

impl NemotronPreset {
    /// Nemotron 3 Nano's real widths with the first `layers` layers of its pattern (or `pattern`).
    pub fn nano(layers: usize, pattern: Option<&str>) -> Result<NemotronPreset> {
        let pattern = match pattern {
            Some(p) => p.to_string(),
            None => {
                if layers == 0 || layers > NANO_PATTERN.len() {
                    bail!("--layers must be 1..={}", NANO_PATTERN.len());
                }
                NANO_PATTERN[..layers].to_string()
            }
        };
        if pattern.is_empty() || !pattern.chars().all(|c| matches!(c, 'M' | 'E' | '*' | '-')) {
            bail!("pattern {pattern:?}: use M (Mamba-2), E (MoE), * (attention), - (dense MLP)");
        }
        Ok(NemotronPreset {
            pattern,
            n_embd: 2688,
            n_vocab: 131072,
            n_head: 32,
            n_head_kv: 2,
            head_dim: 128,
            d_inner: 4096,
            d_state: 128,
            n_group: 8,
            n_ssm_head: 64,
            d_conv: 4,
            n_expert: 128,
            n_expert_used: 6,
            ff_exp: 1856,
            ff_shexp: 3712,
        })
    }
}

impl NemotronPreset {
    /// The shapes of the nemo-tiny fixtures (n_embd 256, 16 experts of ff 160, top-4): small
    /// enough for tests, with rows that are whole 256-blocks so K-quants are used too.
    pub fn tiny(pattern: &str) -> Result<NemotronPreset> {
        let mut p = NemotronPreset::nano(1, Some(pattern))?;
        p.n_embd = 256;
        p.n_vocab = 1024;
        p.n_head = 8;
        p.n_head_kv = 2;
        p.head_dim = 32;
        p.d_inner = 512;
        p.d_state = 32;
        p.n_group = 2;
        p.n_ssm_head = 16;
        p.n_expert = 16;
        p.n_expert_used = 4;
        p.ff_exp = 160;
        p.ff_shexp = 320;
        Ok(p)
    }
}

/// A deterministic stream of uniform values in [-1, 1) (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: u64, name: &str) -> Rng {
        let mut h = seed ^ 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        Rng(h | 1)
    }
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (v >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy)]
enum Init {
    /// Uniform with this standard deviation.
    Std(f32),
    /// center ± spread
    Around(f32, f32),
}

fn values(seed: u64, name: &str, row: usize, init: Init, out: &mut [f32]) {
    let mut r = Rng::new(seed.wrapping_add(row as u64 * 0x9e37_79b9), name);
    for v in out.iter_mut() {
        *v = match init {
            Init::Std(s) => r.next() * s * 3f32.sqrt(),
            Init::Around(c, s) => c + r.next() * s,
        };
    }
}

/// Rows generated for a stack of experts (a 3-d tensor; they hold nearly all of a MoE file's
/// weights): row r of a taller stack is row r mod ROW_POOL. A prime, so that the experts
/// (whose row counts are multiples of small powers of two) start at different rows of the pool
/// and stay different matrices. Other tensors have every row of their own (an output head of
/// repeating rows would tie its logits).
pub const ROW_POOL: usize = 4099;

/// Adds a tensor whose rows are generated and quantized (row-parallel) while the file is written.
fn add(w: &mut GgufWriter, seed: u64, name: &str, dims: &[u64], ty: GgmlType, init: Init) {
    add_rows(w, seed, name, dims, ty, init, false);
}

/// [`add`], or with `dequantized` the rows' quantized values written as F32 (the exact math
/// of the quantized file).
fn add_rows(
    w: &mut GgufWriter,
    seed: u64,
    name: &str,
    dims: &[u64],
    ty: GgmlType,
    init: Init,
    dequantized: bool,
) {
    let deq = dequantized && ty != GgmlType::F32;
    let out_ty = if deq { GgmlType::F32 } else { ty };
    let ne0 = dims[0] as usize;
    let rows: usize = dims[1..].iter().product::<u64>() as usize;
    let experts = dims.len() == 3;
    let name_owned: Arc<str> = Arc::from(name);
    w.tensor_lazy(
        name,
        dims,
        out_ty,
        Box::new(move || {
            let rb = ty.row_bytes(ne0 as u64).expect("whole blocks") as usize;
            let orb = out_ty.row_bytes(ne0 as u64).expect("whole blocks") as usize;
            let q = quantize_fn(ty).unwrap_or_else(|| panic!("no quantizer for {ty}"));
            let dq = ggrun_quants::dequantize_fn(ty).expect("dequantizable type");
            let mut out = vec![0u8; orb * rows];
            let distinct = if experts { rows.min(ROW_POOL) } else { rows };
            let (pool, rest) = out.split_at_mut(orb * distinct);
            pool.par_chunks_mut(orb).enumerate().for_each(|(r, o)| {
                let mut x = vec![0f32; ne0];
                values(seed, &name_owned, r, init, &mut x);
                if deq {
                    let mut b = vec![0u8; rb];
                    q(&x, &mut b);
                    dq(&b, &mut x);
                    o.copy_from_slice(bytemuck::cast_slice(&x));
                } else {
                    q(&x, o);
                }
            });
            let pool = &*pool;
            rest.par_chunks_mut(orb).enumerate().for_each(|(i, o)| {
                let r = (ROW_POOL + i) % ROW_POOL;
                o.copy_from_slice(&pool[r * orb..(r + 1) * orb]);
            });
            out
        }),
    );
}

/// GPT-2's byte alphabet: the character each byte stands for in a byte-level BPE vocabulary
/// (printable bytes themselves, the others U+0100 + k in order).
fn byte_alphabet() -> Vec<char> {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                b as char
            } else {
                let idx = (0..=b).filter(|&c| !printable(c)).count();
                char::from_u32(255 + idx as u32).unwrap()
            }
        })
        .collect()
}

/// Writes a synthetic Nemotron-H (MoE) model.
pub fn write_nemotron(p: &NemotronPreset, mix: Mix, seed: u64, path: &Path) -> Result<()> {
    let arch = "nemotron_h_moe";
    let n = p.pattern.len();
    let kinds: Vec<char> = p.pattern.chars().collect();
    let key = |k: &str| format!("{arch}.{k}");
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::str(arch))
        .kv(
            "general.name",
            Value::str(&format!(
                "synthetic Nemotron 3 Nano widths, {n} layers {}",
                p.pattern
            )),
        )
        .kv("general.file_type", Value::U32(mix.file_type()))
        .kv("general.quantization_version", Value::U32(2))
        .kv(&key("block_count"), Value::U32(n as u32))
        .kv(&key("context_length"), Value::U32(262_144))
        .kv(&key("embedding_length"), Value::U32(p.n_embd as u32))
        .kv(&key("attention.head_count"), Value::U32(p.n_head as u32))
        .kv(
            &key("attention.head_count_kv"),
            Value::u32s(
                &kinds
                    .iter()
                    .map(|&k| if k == '*' { p.n_head_kv as u32 } else { 0 })
                    .collect::<Vec<_>>(),
            ),
        )
        .kv(
            &key("feed_forward_length"),
            Value::u32s(
                &kinds
                    .iter()
                    .map(|&k| match k {
                        'E' => p.ff_exp as u32,
                        '-' => p.ff_shexp as u32,
                        _ => 0,
                    })
                    .collect::<Vec<_>>(),
            ),
        )
        .kv(&key("attention.key_length"), Value::U32(p.head_dim as u32))
        .kv(
            &key("attention.value_length"),
            Value::U32(p.head_dim as u32),
        )
        .kv(&key("attention.layer_norm_rms_epsilon"), Value::F32(1e-5))
        // llama.cpp reads this one for nemotron_h(_moe); converters write both.
        .kv(&key("attention.layer_norm_epsilon"), Value::F32(1e-5))
        .kv(&key("vocab_size"), Value::U32(p.n_vocab as u32))
        .kv(&key("ssm.conv_kernel"), Value::U32(p.d_conv as u32))
        .kv(&key("ssm.inner_size"), Value::U32(p.d_inner as u32))
        .kv(&key("ssm.state_size"), Value::U32(p.d_state as u32))
        .kv(&key("ssm.time_step_rank"), Value::U32(p.n_ssm_head as u32))
        .kv(&key("ssm.group_count"), Value::U32(p.n_group as u32))
        .kv(&key("expert_count"), Value::U32(p.n_expert as u32))
        .kv(
            &key("expert_used_count"),
            Value::U32(p.n_expert_used as u32),
        )
        .kv(
            &key("expert_feed_forward_length"),
            Value::U32(p.ff_exp as u32),
        )
        .kv(
            &key("expert_shared_feed_forward_length"),
            Value::U32(p.ff_shexp as u32),
        )
        .kv(&key("expert_shared_count"), Value::U32(1))
        .kv(&key("expert_weights_norm"), Value::Bool(true))
        .kv(&key("expert_weights_scale"), Value::F32(2.5))
        .kv(&key("expert_group_count"), Value::U32(1));
    // A byte-level vocabulary: 256 byte tokens, then filler tokens, with BOS/EOS controls.
    let alphabet = byte_alphabet();
    let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    tokens.extend((256..p.n_vocab).map(|i| format!("<t{i}>")));
    tokens[256] = "<s>".into();
    tokens[257] = "</s>".into();
    let mut types = vec![1i32; p.n_vocab];
    types[256] = 3;
    types[257] = 3;
    w.kv("tokenizer.ggml.model", Value::str("gpt2"))
        .kv("tokenizer.ggml.pre", Value::str("default"))
        .kv("tokenizer.ggml.tokens", Value::strs(&tokens))
        .kv("tokenizer.ggml.token_type", Value::i32s(&types))
        .kv("tokenizer.ggml.merges", Value::strs::<&str>(&[]))
        .kv("tokenizer.ggml.bos_token_id", Value::U32(256))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(257))
        .kv("tokenizer.ggml.add_bos_token", Value::Bool(true));

    let (e, v) = (p.n_embd as u64, p.n_vocab as u64);
    let std_in = |n_in: usize| Init::Std(1.0 / (n_in as f32).sqrt());
    let one = Init::Around(1.0, 0.1);
    let ty = |role, ne0: u64| pick_type(mix, role, ne0);
    add(
        &mut w,
        seed,
        "token_embd.weight",
        &[e, v],
        ty(Role::TokenEmbd, e),
        Init::Std(1.0),
    );
    let n_attn = kinds.iter().filter(|&&k| k == '*').count();
    let mut attn_index = 0;
    for (i, &k) in kinds.iter().enumerate() {
        let b = |s: &str| format!("blk.{i}.{s}");
        add(
            &mut w,
            seed,
            &b("attn_norm.weight"),
            &[e],
            GgmlType::F32,
            one,
        );
        match k {
            'M' => {
                let (di, ds, ng, nh) = (
                    p.d_inner as u64,
                    p.d_state as u64,
                    p.n_group as u64,
                    p.n_ssm_head as u64,
                );
                let ch = di + 2 * ng * ds;
                add(
                    &mut w,
                    seed,
                    &b("ssm_in.weight"),
                    &[e, 2 * di + 2 * ng * ds + nh],
                    ty(Role::SsmIn, e),
                    std_in(p.n_embd),
                );
                add(
                    &mut w,
                    seed,
                    &b("ssm_conv1d.weight"),
                    &[p.d_conv as u64, ch],
                    GgmlType::F32,
                    Init::Std(0.3),
                );
                add(
                    &mut w,
                    seed,
                    &b("ssm_conv1d.bias"),
                    &[ch],
                    GgmlType::F32,
                    Init::Std(0.05),
                );
                // dt = softplus(raw + bias) lands around 0.01..0.1.
                add(
                    &mut w,
                    seed,
                    &b("ssm_dt.bias"),
                    &[nh],
                    GgmlType::F32,
                    Init::Around(-3.5, 1.0),
                );
                add(
                    &mut w,
                    seed,
                    &b("ssm_a"),
                    &[1, nh],
                    GgmlType::F32,
                    Init::Around(-8.0, 7.0),
                );
                add(&mut w, seed, &b("ssm_d"), &[1, nh], GgmlType::F32, one);
                add(
                    &mut w,
                    seed,
                    &b("ssm_norm.weight"),
                    &[di / ng, ng],
                    GgmlType::F32,
                    one,
                );
                add(
                    &mut w,
                    seed,
                    &b("ssm_out.weight"),
                    &[di, e],
                    ty(Role::SsmOut, di),
                    std_in(p.d_inner),
                );
            }
            '*' => {
                let (q, kv) = (
                    (p.n_head * p.head_dim) as u64,
                    (p.n_head_kv * p.head_dim) as u64,
                );
                add(
                    &mut w,
                    seed,
                    &b("attn_q.weight"),
                    &[e, q],
                    ty(Role::AttnQK, e),
                    std_in(p.n_embd),
                );
                add(
                    &mut w,
                    seed,
                    &b("attn_k.weight"),
                    &[e, kv],
                    ty(Role::AttnQK, e),
                    std_in(p.n_embd),
                );
                let role = Role::AttnV {
                    index: attn_index,
                    count: n_attn,
                };
                add(
                    &mut w,
                    seed,
                    &b("attn_v.weight"),
                    &[e, kv],
                    ty(role, e),
                    std_in(p.n_embd),
                );
                add(
                    &mut w,
                    seed,
                    &b("attn_output.weight"),
                    &[q, e],
                    ty(Role::AttnOut, q),
                    std_in(p.n_head * p.head_dim),
                );
                attn_index += 1;
            }
            'E' => {
                let (ne, ff, sh) = (p.n_expert as u64, p.ff_exp as u64, p.ff_shexp as u64);
                let down = Role::FfnDown {
                    layer: i,
                    n_layer: n,
                };
                // Router rows of uneven norm plus a selection bias favouring a few experts.
                add(
                    &mut w,
                    seed,
                    &b("ffn_gate_inp.weight"),
                    &[e, ne],
                    GgmlType::F32,
                    std_in(p.n_embd),
                );
                let bias: Vec<f32> = (0..p.n_expert)
                    .map(|x| {
                        let rank = (x * 37 + i * 11) % p.n_expert;
                        0.6 * (-(rank as f32) / (p.n_expert as f32 / 10.0)).exp()
                    })
                    .collect();
                w.tensor_f32(&b("exp_probs_b.bias"), &[ne], &bias);
                add(
                    &mut w,
                    seed,
                    &b("ffn_up_exps.weight"),
                    &[e, ff, ne],
                    ty(Role::FfnUp, e),
                    std_in(p.n_embd),
                );
                add(
                    &mut w,
                    seed,
                    &b("ffn_down_exps.weight"),
                    &[ff, e, ne],
                    ty(down, ff),
                    std_in(p.ff_exp),
                );
                add(
                    &mut w,
                    seed,
                    &b("ffn_up_shexp.weight"),
                    &[e, sh],
                    ty(Role::FfnUp, e),
                    std_in(p.n_embd),
                );
                add(
                    &mut w,
                    seed,
                    &b("ffn_down_shexp.weight"),
                    &[sh, e],
                    ty(down, sh),
                    std_in(p.ff_shexp),
                );
            }
            _ => {
                let ff = p.ff_shexp as u64;
                add(
                    &mut w,
                    seed,
                    &b("ffn_up.weight"),
                    &[e, ff],
                    ty(Role::FfnUp, e),
                    std_in(p.n_embd),
                );
                add(
                    &mut w,
                    seed,
                    &b("ffn_down.weight"),
                    &[ff, e],
                    ty(
                        Role::FfnDown {
                            layer: i,
                            n_layer: n,
                        },
                        ff,
                    ),
                    std_in(p.ff_shexp),
                );
            }
        }
    }
    add(&mut w, seed, "output_norm.weight", &[e], GgmlType::F32, one);
    add(
        &mut w,
        seed,
        "output.weight",
        &[e, v],
        ty(Role::Output, e),
        std_in(p.n_embd),
    );
    w.write(path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::state::KvTypes;

    /// The mix rules reproduce ../shared/spec/mixes/*.tsv for the real 52-layer model.
    #[test]
    fn a_generated_tiny_model_loads_and_runs_in_both_precisions() {
        use crate::backend::cpu::{Cpu, Precision};
        let dir = tempfile::tempdir().unwrap();
        for mix in [Mix::Q4KM, Mix::Q3KM, Mix::Q4_0, Mix::Q8_0, Mix::F32] {
            let path = dir.path().join("t.gguf");
            write_nemotron(&NemotronPreset::tiny("ME*-E").unwrap(), mix, 7, &path).unwrap();
            let g = crate::gguf::Model::open(&path).unwrap();
            let info = crate::info::ModelInfo::from_model(&g).unwrap();
            assert_eq!(info.layer_pattern.as_deref(), Some("ME*-E"));
            let m = crate::model::load(&g).unwrap();
            let mut last = Vec::new();
            for precision in [Precision::Exact, Precision::Normal] {
                let cpu = Cpu::new(1, precision).unwrap();
                let mut st = m.new_state(16, cpu.kv).unwrap();
                let l = m.forward(&cpu, &mut st, &[256, 5, 9, 77], true).unwrap();
                assert_eq!(l.len(), 4 * 1024);
                assert!(l.iter().all(|v| v.is_finite()), "{mix:?}");
                let std = (l.iter().map(|v| v * v).sum::<f32>() / l.len() as f32).sqrt();
                assert!(std > 1e-3 && std < 1e3, "{mix:?}: logit scale {std}");
                last.push(l);
            }
            // Exact and normal precision differ only by activation rounding.
            let num: f32 = last[0]
                .iter()
                .zip(&last[1])
                .map(|(a, b)| (a - b) * (a - b))
                .sum();
            let den: f32 = last[0].iter().map(|a| a * a).sum();
            assert!((num / den).sqrt() < 0.2, "{mix:?}");
        }
    }

    #[test]
    fn expert_usage_is_uneven() {
        use crate::backend::cpu::{Cpu, Precision};
        use crate::model::Forward;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.gguf");
        write_nemotron(&NemotronPreset::tiny("EE").unwrap(), Mix::Q8_0, 3, &path).unwrap();
        let g = crate::gguf::Model::open(&path).unwrap();
        let t = crate::model::Tensors {
            gguf: &g,
            opts: crate::model::LoadOptions {
                repack: true,
                ..Default::default()
            },
        };
        let m = crate::model::nemotron_h::NemotronH::load(&t).unwrap();
        let cpu = Cpu::new(1, Precision::Normal).unwrap();
        let mut st = m.new_state(200, KvTypes::F16).unwrap();
        let toks: Vec<u32> = (0..200u32).map(|i| (i * 7919) % 1024).collect();
        m.forward(&cpu, &mut st, &toks, false).unwrap();
        for (layer, counts) in m.routing_counts().unwrap() {
            let mut c = counts.clone();
            c.sort_unstable_by(|a, b| b.cmp(a));
            let total: u64 = c.iter().sum();
            assert_eq!(total, 200 * 4, "layer {layer}");
            // A uniform router would give the busiest quarter of the experts 25% of the picks.
            let top: u64 = c[..c.len() / 4].iter().sum();
            assert!(top as f64 > 0.4 * total as f64, "layer {layer}: {counts:?}");
        }
    }

    #[test]
    fn mix_rules_reproduce_llama_quantize_tables() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/spec/mixes");
        for (file, mix) in [
            ("nemotron-3-nano-Q4_K_M.tsv", Mix::Q4KM),
            ("nemotron-3-nano-Q3_K_M.tsv", Mix::Q3KM),
            ("nemotron-3-nano-Q4_0.tsv", Mix::Q4_0),
            ("nemotron-3-nano-Q8_0.tsv", Mix::Q8_0),
        ] {
            let text = std::fs::read_to_string(dir.join(file)).expect("shared/spec/mixes");
            let kinds: Vec<char> = NANO_PATTERN.chars().collect();
            let attn_layers: Vec<usize> = (0..kinds.len()).filter(|&i| kinds[i] == '*').collect();
            let mut checked = 0;
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split('\t').collect();
                let (name, ne0, want) = (
                    f[0],
                    f[1].split(',').next().unwrap().parse::<u64>().unwrap(),
                    f[2],
                );
                if want == "f32" {
                    continue;
                }
                let layer = name
                    .strip_prefix("blk.")
                    .and_then(|s| s.split('.').next())
                    .and_then(|s| s.parse::<usize>().ok());
                let role = if name == "token_embd.weight" {
                    Role::TokenEmbd
                } else if name == "output.weight" {
                    Role::Output
                } else if name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight") {
                    Role::AttnQK
                } else if name.ends_with("attn_v.weight") {
                    let l = layer.unwrap();
                    Role::AttnV {
                        index: attn_layers.iter().position(|&a| a == l).unwrap(),
                        count: attn_layers.len(),
                    }
                } else if name.ends_with("attn_output.weight") {
                    Role::AttnOut
                } else if name.ends_with("ssm_in.weight") {
                    Role::SsmIn
                } else if name.ends_with("ssm_out.weight") {
                    Role::SsmOut
                } else if name.contains("ffn_up") {
                    Role::FfnUp
                } else if name.contains("ffn_down") {
                    Role::FfnDown {
                        layer: layer.unwrap(),
                        n_layer: kinds.len(),
                    }
                } else {
                    panic!("unexpected tensor {name}");
                };
                assert_eq!(pick_type(mix, role, ne0).name(), want, "{file} {name}");
                checked += 1;
            }
            assert!(checked > 100, "{file}: {checked}");
        }
    }
}
