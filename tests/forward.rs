//! The CPU forward pass against llama.cpp's goldens and the float64 reference, with the
//! tolerances ../shared/fixtures/README.md gives:
//! - exact mode (weights dequantized, f32 activations) vs `X.ref.f32`: every row ≤ 1e-3 rel-RMS,
//!   top-1 100% (decode rows fed llama.cpp's greedy tokens, as the reference was);
//! - normal mode (llama.cpp's activation roundings) vs `X.logits.f32`: median row ≤ 0.03, top-1
//!   ≥ 0.9 (F32 models: every row ≤ 1e-3);
//! - state: one batch, chunks of 1/3/7 and token by token agree; a saved state continues exactly.

mod common;

use common::{compare, golden, ids, median, read_f32, read_json, rel_rms, run, Golden};
use ggrun::backend::cpu::{Cpu, Precision};
use ggrun::gguf::Model;
use ggrun::model;
use ggrun::sample::argmax;
use ggrun::tokenizer::Tokenizer;

const NEMO: [&str; 7] = [
    "nemo-tiny-f32",
    "nemo-tiny-q8_0",
    "nemo-tiny-q4_0",
    "nemo-tiny-q4_k_m",
    "nemo-tiny-q3_k_m",
    "nemo-dense-tiny-f32",
    "nemo-dense-tiny-q4_k_m",
];

#[test]
fn prompts_tokenize_to_the_golden_ids() {
    for name in NEMO.iter().copied().chain(["smollm2"]) {
        let g = if name == "smollm2" {
            smollm2_golden()
        } else {
            golden(name)
        };
        let gg = Model::open(&g.model).unwrap();
        let tok = Tokenizer::from_metadata(gg.metadata()).unwrap();
        assert_eq!(
            tok.encode(&g.prompt, true).unwrap(),
            g.prompt_tokens,
            "{name}"
        );
    }
}

#[test]
fn exact_mode_matches_the_float64_reference() {
    let cpu = Cpu::new(2, Precision::Exact).unwrap();
    for name in NEMO {
        let g = golden(name);
        let gg = Model::open(&g.model).unwrap();
        let m = model::load(&gg).unwrap();
        let (rows, _) = run(
            m.as_ref(),
            &cpu,
            &g.prompt_tokens,
            g.generated.len(),
            Some(&g.generated),
        );
        let (errs, top1) = compare(&rows, g.reference.as_ref().unwrap(), g.n_vocab);
        let worst = errs.iter().cloned().fold(0.0, f64::max);
        eprintln!("{name} exact vs ref: worst {worst:.2e} top1 {top1}");
        assert!(worst <= 1e-3, "{name}: worst row {worst}");
        assert_eq!(top1, 1.0, "{name}");
    }
}

#[test]
fn normal_mode_matches_llama_cpp() {
    let cpu = Cpu::new(2, Precision::Normal).unwrap();
    // Both weight layouts: packed eight-row copies (the default where the CPU has their
    // kernels) and the file's rows.
    for (name, repack) in NEMO.iter().flat_map(|n| [(*n, true), (*n, false)]) {
        let g = golden(name);
        let gg = Model::open(&g.model).unwrap();
        let m = model::load_with(
            &gg,
            model::LoadOptions {
                repack,
                ..Default::default()
            },
        )
        .unwrap();
        let packed_kernel = gg
            .tensors()
            .any(|t| ggrun_quants::kernels(t.ty).and_then(|k| k.packed).is_some());
        assert_eq!(
            gg.derived_bytes() > 0,
            repack && packed_kernel,
            "{name}: packed copies made iff asked and the CPU has kernels for a tensor type"
        );
        let (rows, gen) = run(m.as_ref(), &cpu, &g.prompt_tokens, g.generated.len(), None);
        let (errs, top1) = compare(&rows, &g.logits, g.n_vocab);
        let worst = errs.iter().cloned().fold(0.0, f64::max);
        eprintln!("{name} repack={repack} normal vs llama.cpp: median {:.2e} worst {worst:.2e} top1 {top1:.3} generated {}", median(&errs), gen == g.generated);
        assert!(median(&errs) <= 0.03, "{name}: median {}", median(&errs));
        assert!(top1 >= 0.9, "{name}: top1 {top1}");
        if name.ends_with("f32") {
            assert!(worst <= 1e-3, "{name}: worst {worst}");
        }
    }
}

fn smollm2_golden() -> Golden {
    let j = read_json(&common::fixtures().join("smollm2.golden.json"));
    Golden {
        model: common::smollm2(),
        prompt: j["prompt"].as_str().unwrap().to_string(),
        prompt_tokens: ids(&j, "prompt_tokens"),
        generated: ids(&j, "generated"),
        n_vocab: j["n_vocab"].as_u64().unwrap() as usize,
        logits: j["last_prompt_row"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect(),
        reference: None,
    }
}

#[test]
fn smollm2_agrees_with_llama_cpp_top1_and_continuation() {
    let g = smollm2_golden();
    let j = read_json(&common::fixtures().join("smollm2.golden.json"));
    let top: Vec<u32> = j["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0][0].as_u64().unwrap() as u32)
        .collect();
    let gg = Model::open(&g.model).unwrap();
    let m = model::load(&gg).unwrap();
    for precision in [Precision::Exact, Precision::Normal] {
        let cpu = Cpu::new(2, precision).unwrap();
        // Teacher-forced rows (decode fed llama.cpp's tokens), so every row compares like with like.
        let (rows, _) = run(
            m.as_ref(),
            &cpu,
            &g.prompt_tokens,
            g.generated.len(),
            Some(&g.generated),
        );
        let nv = g.n_vocab;
        let agree = top
            .iter()
            .enumerate()
            .filter(|(r, &t)| argmax(&rows[r * nv..(r + 1) * nv]) as u32 == t)
            .count();
        let rate = agree as f64 / top.len() as f64;
        let last = g.prompt_tokens.len() - 1;
        let e = rel_rms(&rows[last * nv..(last + 1) * nv], &g.logits);
        let (_, gen) = run(m.as_ref(), &cpu, &g.prompt_tokens, g.generated.len(), None);
        let same = gen
            .iter()
            .zip(&g.generated)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!("smollm2 {precision:?}: top1 {rate:.3}, last prompt row rel-RMS {e:.2e}, continuation agrees for {same} tokens");
        assert!(rate >= 0.95, "{precision:?}: top1 {rate}");
        assert!(e <= 0.05, "{precision:?}: last prompt row {e}");
        // The README's bar (16 tokens) holds in normal precision, which rounds as llama.cpp does
        // (all 32 agree on x86); exact precision parts at a near-tie after ~10 tokens.
        let llama_order = ggrun_quants::isa::active().is_x86();
        let need = if precision == Precision::Normal && llama_order {
            16
        } else {
            8
        };
        assert!(
            same >= need,
            "{precision:?}: continuation agrees for {same}"
        );
    }
}

/// Mean KL(p || q) over rows of `nv` logits.
fn mean_kl(p: &[f32], q: &[f32], nv: usize) -> f64 {
    let log_softmax = |x: &[f32]| {
        let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let z = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        x.iter().map(|&v| v as f64 - m - z).collect::<Vec<f64>>()
    };
    let rows = p.len() / nv;
    let total: f64 = (0..rows)
        .map(|r| {
            let (lp, lq) = (
                log_softmax(&p[r * nv..(r + 1) * nv]),
                log_softmax(&q[r * nv..(r + 1) * nv]),
            );
            lp.iter()
                .zip(&lq)
                .map(|(a, b)| a.exp() * (a - b))
                .sum::<f64>()
        })
        .sum();
    total / rows as f64
}

/// q8_0 and q4_0 KV caches (rotated as llama.cpp's) on the real SmolLM2, teacher-forced over
/// the golden prompt and continuation: the logits stay near the f16 cache's (mean KL within
/// 0.02 for q8_0 and 0.2 for q4_0, top-1 agreement at least 0.9 and 0.65; llama.cpp's own
/// q8_0 and q4_0 caches sit at 0.005 and 0.054 from its f16 one on real text,
/// scripts/kv-kl.py), and chunked prefill and a restored state behave as with f16.
#[test]
fn block_kv_caches_stay_near_the_f16_cache() {
    use ggrun::backend::state::{KvType, KvTypes};
    let g = smollm2_golden();
    let gg = Model::open(&g.model).unwrap();
    let m = model::load(&gg).unwrap();
    let nv = g.n_vocab;
    let f16 = Cpu::new(2, Precision::Normal).unwrap();
    let steps = g.generated.len();
    let (want, _) = run(
        m.as_ref(),
        &f16,
        &g.prompt_tokens,
        steps,
        Some(&g.generated),
    );
    for (k, v, kl_max, top1_min) in [
        (KvType::Q8_0, KvType::Q8_0, 0.02, 0.9),
        (KvType::Q8_0, KvType::F16, 0.02, 0.9),
        (KvType::Q4_0, KvType::Q4_0, 0.2, 0.65),
    ] {
        let cpu = Cpu::new(2, Precision::Normal)
            .unwrap()
            .with_kv_types(KvTypes { k, v });
        let (rows, _) = run(
            m.as_ref(),
            &cpu,
            &g.prompt_tokens,
            steps,
            Some(&g.generated),
        );
        let kl = mean_kl(&want, &rows, nv);
        let n = rows.len() / nv;
        let agree = (0..n)
            .filter(|r| argmax(&rows[r * nv..(r + 1) * nv]) == argmax(&want[r * nv..(r + 1) * nv]))
            .count() as f64
            / n as f64;
        eprintln!("smollm2 K {k:?} V {v:?}: mean KL {kl:.4} from f16, top-1 {agree:.3}");
        assert!(
            kl <= kl_max && agree >= top1_min,
            "K {k:?} V {v:?}: KL {kl}, top-1 {agree}"
        );
        assert!(kl > 0.0, "K {k:?} V {v:?}: the same logits as f16?");
        common::check_chunks_and_restore(m.as_ref(), &cpu, &g.prompt_tokens, 0.05, "smollm2 q");
    }
}

#[test]
fn chunked_prefill_equals_one_batch_and_state_restores_exactly() {
    let cpu = Cpu::new(2, Precision::Exact).unwrap();
    for name in ["nemo-tiny-q4_k_m", "nemo-dense-tiny-f32"] {
        let g = golden(name);
        let gg = Model::open(&g.model).unwrap();
        let m = model::load(&gg).unwrap();
        common::check_chunks_and_restore(m.as_ref(), &cpu, &g.prompt_tokens, 1e-5, name);
    }
}

#[test]
fn a_prompt_longer_than_the_context_is_a_clear_error() {
    let g = golden("nemo-tiny-q4_0");
    let out = common::ggrun()
        .args(["logits", "-m"])
        .arg(&g.model)
        .args(["--tokens", "1,2,3,4,5", "-c", "4", "--out", "/dev/null"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("do not fit in a context of 4"), "{err}");
    // A token outside the vocabulary.
    let out = common::ggrun()
        .args(["logits", "-m"])
        .arg(&g.model)
        .args(["--tokens", "1,99999", "--out", "/dev/null"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("outside the vocabulary"), "{err}");
}

#[test]
fn logits_cli_writes_rows_and_generated_ids() {
    let g = golden("nemo-tiny-q8_0");
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("o.f32");
    let toks: Vec<String> = g.prompt_tokens.iter().map(|t| t.to_string()).collect();
    let v = common::json_output(
        common::ggrun()
            .args(["logits", "-m"])
            .arg(&g.model)
            .args([
                "--tokens",
                &toks.join(","),
                "--decode",
                "4",
                "-t",
                "2",
                "--out",
            ])
            .arg(&out_path),
    );
    assert_eq!(
        v["rows"].as_u64().unwrap() as usize,
        g.prompt_tokens.len() + 4
    );
    let gen: Vec<u32> = v["generated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(gen, g.generated[..4]);
    let rows = read_f32(&out_path);
    assert_eq!(rows.len(), (g.prompt_tokens.len() + 4) * g.n_vocab);
    let (errs, _) = compare(&rows, &g.logits, g.n_vocab);
    assert!(median(&errs) <= 0.03);
}

/// A batched step (decode tokens of some sequences and a prefill chunk of another, their
/// products sharing one pass over the weights) gives each sequence the logits it gets alone:
/// within 1e-6 rel-RMS in exact mode (per-token arithmetic is the same), within 1e-3 in normal
/// mode (other kernels sum the quantized products in other orders), on the MoE, dense and llama
/// models.
#[test]
fn a_batched_step_equals_each_sequence_alone() {
    let mut models: Vec<std::path::PathBuf> = ["nemo-tiny-q4_k_m", "nemo-dense-tiny-f32"]
        .iter()
        .map(|n| golden(n).model)
        .collect();
    models.push(common::smollm2());
    let prompts: [&[u32]; 3] = [&[1, 5, 9, 33, 7], &[2, 8], &[40, 41, 42, 43, 44, 45, 46]];
    let next: [&[u32]; 3] = [&[11], &[12, 20, 21, 22], &[13]];
    for path in models {
        let gg = Model::open(&path).unwrap();
        let m = model::load(&gg).unwrap();
        common::check_batch_equals_alone(
            m.as_ref(),
            &prompts,
            &next,
            &path.display().to_string(),
            1e-3,
        );
    }
}
