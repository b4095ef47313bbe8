//! Paths to the shared fixtures and fetched models, and small helpers shared by the tests.
#![allow(dead_code)]

pub mod server;

use std::path::{Path, PathBuf};

use ggrun::backend::cpu::Cpu;
use ggrun::model::{Forward, State};
use ggrun::sample::argmax;

/// `../shared/fixtures` beside the checkout (override with GGRUN_FIXTURES).
pub fn fixtures() -> PathBuf {
    let p = std::env::var_os("GGRUN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    assert!(
        p.is_dir(),
        "fixtures not found at {} (set GGRUN_FIXTURES)",
        p.display()
    );
    p
}

/// Every `*.gguf` among the fixtures.
pub fn fixture_models() -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no .gguf fixtures");
    v
}

/// SmolLM2-135M-Instruct Q4_1, fetched by scripts/fetch-smollm2.sh (override with GGRUN_SMOLLM2).
pub fn smollm2() -> PathBuf {
    let p = std::env::var_os("GGRUN_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        p.is_file(),
        "{} missing: run scripts/fetch-smollm2.sh",
        p.display()
    );
    p
}

/// The chat templates of llama.cpp's source (models/templates), fetched by
/// scripts/fetch-templates.sh (override the directory with GGRUN_TEMPLATES).
pub fn real_template(name: &str) -> PathBuf {
    let dir = std::env::var_os("GGRUN_TEMPLATES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/templates"));
    let p = dir.join(format!("{name}.jinja"));
    assert!(
        p.is_file(),
        "{} missing: run scripts/fetch-templates.sh",
        p.display()
    );
    p
}

pub fn ggrun() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_ggrun"));
    // A cache of the tests' own: profiles that `ggrun tune` saved for a model in the user's
    // cache would otherwise change the threads, batch and placement the tests run with.
    c.env(
        "GGRUN_CACHE_DIR",
        std::env::temp_dir().join("ggrun-tests-cache"),
    );
    c
}

/// Runs `cmd` with `input` on its stdin (then closed); its status, stdout and stderr.
pub fn output_with_stdin(cmd: &mut std::process::Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// Runs `cmd`, which must succeed (its stderr is the failure message); its stdout.
pub fn stdout_of(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `cmd`, which must succeed, and parses its stdout as one JSON value.
pub fn json_output(cmd: &mut std::process::Command) -> serde_json::Value {
    serde_json::from_str(&stdout_of(cmd)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Goldens: llama.cpp's logits and token ids for the fixture models, and how to compare with them.

pub struct Golden {
    pub model: std::path::PathBuf,
    pub prompt: String,
    pub prompt_tokens: Vec<u32>,
    pub generated: Vec<u32>,
    pub n_vocab: usize,
    pub logits: Vec<f32>,
    pub reference: Option<Vec<f32>>,
}

pub fn read_f32(p: &Path) -> Vec<f32> {
    std::fs::read(p)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

pub fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

pub fn ids(j: &serde_json::Value, k: &str) -> Vec<u32> {
    j[k].as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

pub fn golden(name: &str) -> Golden {
    let dir = fixtures();
    let j = read_json(&dir.join(format!("{name}.golden.json")));
    Golden {
        model: dir.join(j["model"].as_str().unwrap()),
        prompt: j["prompt"].as_str().unwrap().to_string(),
        prompt_tokens: ids(&j, "prompt_tokens"),
        generated: ids(&j, "generated"),
        n_vocab: j["n_vocab"].as_u64().unwrap() as usize,
        logits: read_f32(&dir.join(j["logits_file"].as_str().unwrap())),
        reference: j["ref_file"].as_str().map(|f| read_f32(&dir.join(f))),
    }
}

/// Logits of the last token after feeding `tokens` in chunks of `chunk`, and the state.
pub fn chunked(m: &dyn Forward, cpu: &Cpu, tokens: &[u32], chunk: usize) -> (Vec<f32>, State) {
    let mut st = m.new_state(tokens.len() + 8, cpu.kv).unwrap();
    let mut last = Vec::new();
    for c in tokens.chunks(chunk) {
        last = m.forward(cpu, &mut st, c, false).unwrap();
    }
    (last, st)
}

/// The prompt fed in one batch and in chunks of 1, 3 and 7 gives the same last logits within
/// `tol` rel-RMS; a state saved after the prompt and restored into a fresh one continues
/// bit-identically; a state saved for another context size is refused; a used state emptied in
/// place computes the prompt as a fresh one does, bit for bit.
pub fn check_chunks_and_restore(m: &dyn Forward, cpu: &Cpu, toks: &[u32], tol: f64, name: &str) {
    let (one, _) = chunked(m, cpu, toks, toks.len());
    for chunk in [1, 3, 7] {
        let (c, _) = chunked(m, cpu, toks, chunk);
        let e = rel_rms(&c, &one);
        assert!(e <= tol, "{name}: chunks of {chunk}: {e}");
    }
    let (_, st) = chunked(m, cpu, toks, 5);
    let saved = st.to_bytes().unwrap();
    let cont = |mut st: State| {
        let mut out = Vec::new();
        let mut tok = 1u32;
        for _ in 0..4 {
            let r = m.forward(cpu, &mut st, &[tok], false).unwrap();
            tok = argmax(&r) as u32;
            out.extend(r);
        }
        out
    };
    let a = cont(st);
    let mut fresh = m.new_state(toks.len() + 8, cpu.kv).unwrap();
    fresh.restore(&saved).unwrap();
    let b = cont(fresh);
    assert!(
        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
        "{name}: restored state diverged"
    );
    let mut other = m.new_state(toks.len() + 9, cpu.kv).unwrap();
    assert!(
        other.restore(&saved).is_err(),
        "{name}: a foreign state was accepted"
    );
    let (_, mut used) = chunked(m, cpu, toks, 3);
    used.clear().unwrap();
    let again = m.forward(cpu, &mut used, toks, false).unwrap();
    assert!(
        again
            .iter()
            .zip(&one)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "{name}: a cleared state differs from a fresh one"
    );
}

/// Prefill `prompt` in one batch, then one token at a time: `forced` tokens if given, else the
/// greedy choice. Returns all rows and the decoded tokens.
pub fn run(
    m: &dyn Forward,
    cpu: &Cpu,
    prompt: &[u32],
    steps: usize,
    forced: Option<&[u32]>,
) -> (Vec<f32>, Vec<u32>) {
    let mut st = m.new_state(prompt.len() + steps, cpu.kv).unwrap();
    let mut rows = m.forward(cpu, &mut st, prompt, true).unwrap();
    let nv = m.n_vocab();
    let mut gen = Vec::new();
    for k in 0..steps {
        let tok = match forced {
            Some(f) => f[k],
            None => argmax(&rows[rows.len() - nv..]) as u32,
        };
        gen.push(tok);
        rows.extend(m.forward(cpu, &mut st, &[tok], false).unwrap());
    }
    (rows, gen)
}

pub fn rel_rms(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// (per-row rel-RMS, top-1 agreement rate)
pub fn compare(ours: &[f32], theirs: &[f32], nv: usize) -> (Vec<f64>, f64) {
    let rows = ours.len().min(theirs.len()) / nv;
    let mut errs = Vec::new();
    let mut agree = 0;
    for r in 0..rows {
        let (a, b) = (&ours[r * nv..(r + 1) * nv], &theirs[r * nv..(r + 1) * nv]);
        errs.push(rel_rms(a, b));
        agree += (argmax(a) == argmax(b)) as usize;
    }
    (errs, agree as f64 / rows as f64)
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// Several sequences in one pass ([`Forward::forward_seqs`]) compute what each computes alone:
/// each prefilled with its prompt, then `next[i]` run for all of them at once, in exact mode
/// (rel-RMS ≤ 1e-6) and normal mode (≤ `normal_tol`: 1e-3 where one executor runs every
/// product); the states move on as if each had run alone.
pub fn check_batch_equals_alone(
    m: &dyn Forward,
    prompts: &[&[u32]],
    next: &[&[u32]],
    name: &str,
    normal_tol: f64,
) {
    use ggrun::backend::cpu::Precision;
    let n_ctx = prompts
        .iter()
        .zip(next)
        .map(|(p, n)| p.len() + n.len())
        .max()
        .unwrap_or(0)
        + 8;
    for (precision, tol) in [(Precision::Exact, 1e-6), (Precision::Normal, normal_tol)] {
        let cpu = Cpu::new(2, precision).unwrap();
        let prefilled = || -> Vec<State> {
            prompts
                .iter()
                .map(|p| {
                    let mut st = m.new_state(n_ctx, cpu.kv).unwrap();
                    m.forward(&cpu, &mut st, p, false).unwrap();
                    st
                })
                .collect()
        };
        let mut alone = prefilled();
        let want: Vec<Vec<f32>> = alone
            .iter_mut()
            .zip(next)
            .map(|(st, run)| m.forward(&cpu, st, run, false).unwrap())
            .collect();
        let mut batch = prefilled();
        let mut refs: Vec<&mut State> = batch.iter_mut().collect();
        let got = m.forward_seqs(&cpu, &mut refs, next).unwrap();
        assert_eq!(got.len(), next.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = rel_rms(g, w);
            assert!(e <= tol, "{name} {precision:?} sequence {i}: {e}");
        }
        for (a, b) in alone.iter().zip(&batch) {
            assert_eq!(a.pos, b.pos);
        }
    }
}
