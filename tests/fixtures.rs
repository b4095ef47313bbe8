//! `ggrun info` and the reader against every fixture and SmolLM2, checked with an independent
//! reader (gguf-py, through tests/tools/gguf_py_dump.py); and the reference quantizers against the
//! bytes llama-quantize wrote into the quantized fixtures.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use ggrun::gguf::Model;
use ggrun::info::ModelInfo;
use ggrun_quants::{reference_quantize_fn, GgmlType};

fn gguf_py(model: &Path) -> (serde_json::Value, Vec<f32>) {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("dump");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/gguf_py_dump.py");
    let st = std::process::Command::new("python3")
        .arg(script)
        .arg(model)
        .arg(&prefix)
        .status()
        .expect("python3 with gguf and numpy (pip install gguf numpy)");
    assert!(
        st.success(),
        "gguf_py_dump.py failed on {}",
        model.display()
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(prefix.with_extension("json")).unwrap())
            .unwrap();
    let raw = std::fs::read(prefix.with_extension("f32")).unwrap();
    let vals = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (json, vals)
}

fn check_against_gguf_py(path: &Path) {
    let m = Model::open(path).unwrap();
    let info = ModelInfo::from_model(&m).unwrap();
    let (py, values) = gguf_py(path);
    assert_eq!(
        info.tensor_count as u64,
        py["tensor_count"].as_u64().unwrap()
    );
    assert_eq!(info.parameters, py["parameters"].as_u64().unwrap());
    let py_types: BTreeMap<String, (u64, u64)> = py["types"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (v["count"].as_u64().unwrap(), v["bytes"].as_u64().unwrap()),
            )
        })
        .collect();
    let ours: BTreeMap<String, (u64, u64)> = info
        .types
        .iter()
        .map(|(k, v)| (k.clone(), (v.count as u64, v.bytes)))
        .collect();
    assert_eq!(ours, py_types, "{}", path.display());
    // Dequantized values, tensor by tensor in file order, bit for bit.
    let mut off = 0usize;
    for (t, pt) in m.tensors().zip(py["tensors"].as_array().unwrap()) {
        assert_eq!(t.name, pt["name"].as_str().unwrap());
        assert_eq!(t.ty.name(), pt["type"].as_str().unwrap());
        let n = t.elements() as usize;
        let want = &values[off..off + n];
        off += n;
        let got = m.tensor(&t.name).unwrap().to_f32().unwrap();
        let bad = got
            .iter()
            .zip(want)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(
            bad.is_none(),
            "{} {}: element {} is {} (gguf-py {})",
            path.display(),
            t.name,
            bad.unwrap(),
            got[bad.unwrap()],
            want[bad.unwrap()]
        );
    }
    assert_eq!(off, values.len());
}

#[test]
fn reader_and_info_agree_with_gguf_py_on_every_fixture() {
    for p in common::fixture_models() {
        check_against_gguf_py(&p);
    }
}

/// A xorshift generator seeded from the clock (the seed printed, so a failure can be replayed).
fn clock_seeded() -> impl FnMut() -> u64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut state = seed | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// IQ4_XS (issue 26's first i-quant): our dequantizer against gguf-py's, bit for bit, on
/// tensors our reference quantizer wrote from fresh random values and on raw random blocks
/// (every scale and code pattern; the f16 scale kept finite).
#[test]
fn iq4_xs_dequantizes_as_gguf_py_does() {
    use ggrun::gguf::{GgufWriter, Value};
    let mut next = clock_seeded();
    let (rows, cols) = (8usize, 1024usize);
    let x: Vec<f32> = (0..rows * cols)
        .map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0)
        .collect();
    let ty = GgmlType::IQ4_XS;
    let mut quantized = vec![0u8; ty.row_bytes((rows * cols) as u64).unwrap() as usize];
    reference_quantize_fn(ty).unwrap()(&x, &mut quantized);
    let mut raw: Vec<u8> = (0..quantized.len()).map(|_| next() as u8).collect();
    for block in raw.chunks_mut(136) {
        // A finite f16 scale: exponent bits below all-ones.
        block[1] &= 0xbb;
    }
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::str("llama"))
        .tensor("quantized", &[cols as u64, rows as u64], ty, quantized)
        .tensor("raw", &[cols as u64, rows as u64], ty, raw);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("iq4_xs.gguf");
    w.write(&path).unwrap();
    check_against_gguf_py(&path);
}

/// The grid i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M): our dequantizers
/// against gguf-py's, bit for bit, on random blocks (every
/// grid row, sign and scale pattern; the f16 scale kept finite).
#[test]
fn grid_iquants_dequantize_as_gguf_py_does() {
    use ggrun::gguf::{GgufWriter, Value};
    let mut next = clock_seeded();
    let (rows, cols) = (16u64, 2048u64);
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::str("llama"));
    for ty in [
        GgmlType::IQ2_XXS,
        GgmlType::IQ2_XS,
        GgmlType::IQ2_S,
        GgmlType::IQ3_XXS,
        GgmlType::IQ3_S,
        GgmlType::IQ1_S,
        GgmlType::IQ1_M,
    ] {
        let mut raw: Vec<u8> = (0..ty.row_bytes(rows * cols).unwrap())
            .map(|_| next() as u8)
            .collect();
        let bb = ty.type_size();
        // Bit 14 of the f16 scale cleared: at bytes 0-1, or for IQ1_M in the top nibble of the
        // last of its four scale words.
        let hi = if ty == GgmlType::IQ1_M { bb - 1 } else { 1 };
        for block in raw.chunks_mut(bb) {
            block[hi] &= 0xbf;
        }
        w.tensor(&ty.name().to_lowercase(), &[cols, rows], ty, raw);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grid-iquants.gguf");
    w.write(&path).unwrap();
    check_against_gguf_py(&path);
}

#[test]
fn reader_and_info_agree_with_gguf_py_on_smollm2() {
    check_against_gguf_py(&common::smollm2());
}

#[test]
fn info_json_has_the_documented_keys_on_every_model() {
    let mut models = common::fixture_models();
    models.push(common::smollm2());
    for p in models {
        let out = common::ggrun()
            .arg("info")
            .arg("--json")
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(stdout.lines().count(), 1, "one JSON object on one line");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        for k in ["architecture", "tensor_count", "parameters", "types"] {
            assert!(v.get(k).is_some(), "{}: no {k}", p.display());
        }
        let text = common::ggrun().arg("info").arg(&p).output().unwrap();
        assert!(text.status.success());
    }
}

#[test]
fn info_reports_nemotron_layer_patterns_and_state() {
    for p in common::fixture_models() {
        let info = ModelInfo::from_model(&Model::open(&p).unwrap()).unwrap();
        let name = p.file_name().unwrap().to_str().unwrap();
        // Patterns from the fixtures README.
        let want = if name.starts_with("nemo-dense-tiny") {
            "M-M*-M"
        } else {
            "MEM*EM*E"
        };
        assert_eq!(info.layer_pattern.as_deref(), Some(want), "{name}");
        // 2 kv heads × (32 + 32) dims × 2 bytes (f16) × 1024 tokens per attention layer.
        let attn = want.matches('*').count() as u64;
        assert_eq!(info.kv_bytes_per_1k, Some(attn * 2 * 64 * 2 * 1024));
        // conv 3 × (512 + 2·2·32) f32 + SSM 512 × 32 f32 per Mamba layer.
        let mamba = want.matches('M').count() as u64;
        assert_eq!(
            info.recurrent_state_bytes,
            mamba * (3 * 640 * 4 + 512 * 32 * 4)
        );
        let moe = want.matches('E').count();
        assert_eq!(info.expert_bytes_per_layer.len(), moe);
        assert_eq!(
            info.non_expert_bytes + info.expert_bytes,
            info.types.values().map(|t| t.bytes).sum::<u64>()
        );
    }
}

/// Re-quantizing the F32 fixture's tensors with our reference quantizers reproduces, byte for
/// byte, what llama-quantize wrote into each quantized fixture.
#[test]
fn reference_quantizers_reproduce_llama_quantize_bytes() {
    let dir = common::fixtures();
    let pairs = [
        ("nemo-tiny-f32.gguf", "nemo-tiny-q4_0.gguf"),
        ("nemo-tiny-f32.gguf", "nemo-tiny-q8_0.gguf"),
        ("nemo-tiny-f32.gguf", "nemo-tiny-q4_k_m.gguf"),
        ("nemo-tiny-f32.gguf", "nemo-tiny-q3_k_m.gguf"),
        ("nemo-dense-tiny-f32.gguf", "nemo-dense-tiny-q4_k_m.gguf"),
    ];
    let mut report = Vec::new();
    let mut checked = BTreeMap::<GgmlType, usize>::new();
    for (src, dst) in pairs {
        let f = Model::open(&dir.join(src)).unwrap();
        let q = Model::open(&dir.join(dst)).unwrap();
        for t in q.tensors() {
            if t.ty == GgmlType::F32 {
                continue;
            }
            let x = f.tensor(&t.name).unwrap().to_f32().unwrap();
            let mut out = vec![0u8; t.size_bytes as usize];
            let quant = reference_quantize_fn(t.ty).unwrap();
            let row = t.row_len() as usize;
            let rb = out.len() / t.rows() as usize;
            for (xr, or) in x.chunks(row).zip(out.chunks_mut(rb)) {
                quant(xr, or);
            }
            *checked.entry(t.ty).or_default() += 1;
            let want = q.tensor(&t.name).unwrap().data;
            if out != want {
                let diff = out.iter().zip(want).filter(|(a, b)| a != b).count();
                report.push(format!(
                    "{dst} {} ({}): {diff} of {} bytes differ",
                    t.name,
                    t.ty,
                    want.len()
                ));
            }
        }
    }
    eprintln!("checked: {checked:?}");
    assert!(report.is_empty(), "{}", report.join("\n"));
}
