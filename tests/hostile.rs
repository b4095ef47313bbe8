//! Broken and hostile GGUF files, written here: each must give one line on stderr that says what
//! is wrong, a non-zero exit status, no panic, and (checked in-process with a counting allocator)
//! no single allocation larger than the file.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use ggrun::gguf::{Array, GgufWriter, Model, Value};
use ggrun::info::ModelInfo;
use ggrun_quants::GgmlType;

/// Records the largest single allocation made by a thread while its `TRACK` flag is set.
struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static TRACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if TRACK.with(|t| t.get()) {
            LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        }
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if TRACK.with(|t| t.get()) {
            LARGEST.fetch_max(n, Ordering::Relaxed);
        }
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A little-endian byte builder for files the writer would refuse to make.
#[derive(Clone, Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut r = Raw(b"GGUF".to_vec());
        r.u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.str(k).u32(4).u32(v)
    }
    /// A tensor record.
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for d in dims {
            self.u64(*d);
        }
        self.u32(ty).u64(offset)
    }
    /// Pads to 32 and appends `n` data bytes.
    fn data(&mut self, n: usize) -> &mut Self {
        while !self.0.len().is_multiple_of(32) {
            self.0.push(0);
        }
        self.0.extend(std::iter::repeat_n(0x11u8, n));
        self
    }
}

/// A small valid model: architecture, an array of strings, two F32 tensors.
fn valid() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::str("llama"))
        .kv("llama.block_count", Value::U32(1))
        .kv("tokenizer.ggml.tokens", Value::strs(&["a", "b", "c"]))
        .tensor_f32("token_embd.weight", &[32, 3], &[0.5; 96])
        .tensor_f32("output_norm.weight", &[32], &[1.0; 32]);
    w
}

/// (name, bytes, a fragment the error message must contain)
fn corpus() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let mut v: Vec<(&'static str, Vec<u8>, &'static str)> = Vec::new();
    let good = valid().to_bytes();
    v.push(("empty", vec![], "empty (0 bytes)"));
    v.push(("truncated magic", b"GGU".to_vec(), "too short"));
    v.push(("bad magic", b"GGML\x03\0\0\0".to_vec(), "not a GGUF file"));
    v.push(("version 1", Raw::header(1, 0, 0).0, "version 1"));
    v.push((
        "version 99",
        Raw::header(99, 0, 0).0,
        "unsupported GGUF version 99",
    ));
    v.push((
        "big endian",
        Raw::header(3u32.swap_bytes(), 0, 0).0,
        "big-endian",
    ));
    v.push(("truncated header", good[..20].to_vec(), "file ends"));
    v.push((
        "tensor count 2^60",
        Raw::header(3, 1 << 60, 0).0,
        "tensor count",
    ));
    v.push((
        "kv count 2^60",
        Raw::header(3, 0, 1 << 60).0,
        "metadata count",
    ));
    let mut r = Raw::header(3, 0, 1);
    r.u64(1 << 40).0.extend_from_slice(&[b'a'; 20]);
    v.push(("key length past EOF", r.0, "file ends"));
    let mut r = Raw::header(3, 0, 1);
    r.str("general.name").u32(8).u64(u64::MAX);
    v.push(("string length past EOF", r.0, "general.name"));
    let mut r = Raw::header(3, 0, 1);
    r.str("tokenizer.ggml.scores").u32(9).u32(6).u64(1 << 60);
    v.push(("array count 2^60", r.0, "cannot fit"));
    let mut r = Raw::header(3, 0, 1);
    r.str("nested").u32(9);
    for _ in 0..12 {
        r.u32(9).u64(1);
    }
    r.u32(4).u64(1).u32(7);
    v.push(("arrays nested 12 deep", r.0, "nested deeper"));
    let mut r = Raw::header(3, 0, 1);
    r.str("general.x").u32(99).u32(0);
    v.push(("unknown value type", r.0, "unknown value type 99"));
    let mut r = Raw::header(3, 0, 1);
    r.str("general.x").u32(9).u32(77).u64(1);
    v.push((
        "unknown array element type",
        r.0,
        "unknown array element type 77",
    ));
    let mut r = Raw::header(3, 0, 1);
    r.str("general.flag").u32(7).0.push(2);
    v.push(("bool byte 2", r.0, "bool byte is 2"));
    let mut r = Raw::header(3, 0, 2);
    r.kv_u32("llama.block_count", 1)
        .kv_u32("llama.block_count", 2);
    v.push(("duplicate key", r.0, "duplicate metadata key"));
    let mut r = Raw::header(3, 0, 1);
    r.u64(2).0.extend_from_slice(&[0xff, 0xfe]);
    r.u32(4).u32(1);
    v.push(("key not UTF-8", r.0, "not valid UTF-8"));
    let mut r = Raw::header(3, 0, 1);
    r.str("general.alignment").u32(8).str("32");
    v.push((
        "alignment is a string",
        r.0,
        "general.alignment: expected u32, found string",
    ));
    let mut r = Raw::header(3, 0, 1);
    r.kv_u32("general.alignment", 24);
    v.push(("alignment not a power of two", r.0, "not a power of two"));
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[32], 0, 0)
        .tensor("a", &[32], 0, 128)
        .data(256);
    v.push(("duplicate tensor name", r.0, "duplicate tensor name a"));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[1, 1, 1, 1, 1], 0, 0).data(32);
    v.push(("five dimensions", r.0, "5 dimensions"));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[1 << 63], 0, 0).data(32);
    v.push(("negative dimension", r.0, "negative"));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[1 << 40, 1 << 40], 0, 0).data(32);
    v.push(("dimension product overflow", r.0, "overflow"));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[32], 4, 0).data(32);
    v.push(("removed type id 4", r.0, "unknown tensor type id 4"));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[32], 1000, 0).data(32);
    v.push(("unknown type id 1000", r.0, "unknown tensor type id 1000"));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[33], GgmlType::Q4_0.id(), 0).data(64);
    v.push((
        "row not whole blocks",
        r.0,
        "not a multiple of the Q4_0 block size",
    ));
    // An i-quant row of 300 elements (super-blocks are 256), and an IQ1_M tensor whose
    // super-blocks would end past the file.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[300], GgmlType::IQ2_XXS.id(), 0).data(128);
    v.push((
        "i-quant row not whole blocks",
        r.0,
        "not a multiple of the IQ2_XXS block size",
    ));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[256, 1 << 20], GgmlType::IQ1_M.id(), 0)
        .data(64);
    v.push(("i-quant tensor past EOF", r.0, "past the end"));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[32], 0, 1 << 20).data(128);
    v.push(("offset past EOF", r.0, "past the end"));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[32], 0, u64::MAX - 63).data(128);
    v.push(("offset + size overflows", r.0, "past the end"));
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[64], 0, 0)
        .tensor("b", &[32], 0, 128)
        .data(512);
    v.push(("overlapping tensors", r.0, "overlap"));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[8], 0, 4).data(128);
    v.push(("misaligned offset", r.0, "not a multiple of the alignment"));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("a", &[0], 0, 0).0.push(0x11);
    v.push((
        "empty tensor, data section past EOF",
        r.0,
        "data section would start",
    ));
    v.push((
        "data section truncated",
        good[..good.len() - 100].to_vec(),
        "past the end",
    ));
    let mut r = Raw::header(3, 0, 1);
    r.kv_u32("general.architecture", 7);
    v.push((
        "architecture not a string",
        r.0,
        "general.architecture: expected string, found u32",
    ));
    let mut r = Raw::header(3, 0, 0);
    r.0.truncate(12);
    v.push(("header cut inside counts", r.0, "file ends"));
    let mut w = valid();
    w.kv("split.count", Value::U16(3));
    v.push((
        "split.count without split name",
        w.to_bytes(),
        "split.count is 3",
    ));
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::str("nemotron_h_moe"))
        .kv("nemotron_h_moe.block_count", Value::U32(4))
        .kv("nemotron_h_moe.attention.head_count", Value::U32(4))
        .kv(
            "nemotron_h_moe.attention.head_count_kv",
            Value::u32s(&[0, 2]),
        )
        .kv(
            "nemotron_h_moe.feed_forward_length",
            Value::u32s(&[0, 0, 0, 0]),
        );
    v.push((
        "per-layer array too short",
        w.to_bytes(),
        "one entry per layer",
    ));
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::str("llama"))
        .kv("llama.block_count", Value::U64(1 << 40))
        .kv("llama.attention.head_count", Value::U32(1 << 31))
        .kv("llama.embedding_length", Value::U64(u64::MAX));
    v.push((
        "block_count 2^40",
        w.to_bytes(),
        "llama.block_count: value 1099511627776 is out of range",
    ));
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::str("nemotron_h"))
        .kv("nemotron_h.block_count", Value::U32(2))
        .kv("nemotron_h.attention.head_count", Value::U32(1))
        .kv("nemotron_h.attention.head_count_kv", Value::u32s(&[0, 0]))
        .kv("nemotron_h.feed_forward_length", Value::u32s(&[0, 0]))
        .kv("nemotron_h.ssm.conv_kernel", Value::U64(u64::MAX))
        .kv("nemotron_h.ssm.inner_size", Value::U64(u64::MAX))
        .kv("nemotron_h.ssm.state_size", Value::U64(u64::MAX))
        .kv("nemotron_h.ssm.group_count", Value::I32(-1));
    v.push((
        "negative ssm.group_count",
        w.to_bytes(),
        "nemotron_h.ssm.group_count: value -1 is out of range",
    ));
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::str("llama"))
        .kv("llama.block_count", Value::strs(&["x"]));
    v.push((
        "block_count is an array",
        w.to_bytes(),
        "llama.block_count: expected integer, found array of string",
    ));
    v
}

fn open_and_describe(path: &Path) -> Result<(), String> {
    let m = Model::open(path).map_err(|e| e.to_string())?;
    ModelInfo::from_model(&m).map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn corpus_has_at_least_25_distinct_breakages() {
    let c = corpus();
    // GGRUN_WRITE_FUZZ_SEEDS=DIR also writes the corpus and a valid file there, as fuzzing seeds.
    if let Some(dir) = std::env::var_os("GGRUN_WRITE_FUZZ_SEEDS") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("valid.gguf"), valid().to_bytes()).unwrap();
        for (i, (_, bytes, _)) in c.iter().enumerate() {
            std::fs::write(dir.join(format!("case{i}.gguf")), bytes).unwrap();
        }
    }
    assert!(c.len() >= 25, "{}", c.len());
    let names: std::collections::HashSet<_> = c.iter().map(|x| x.0).collect();
    assert_eq!(names.len(), c.len());
}

#[test]
fn every_broken_file_is_a_one_line_error_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (name, bytes, want)) in corpus().into_iter().enumerate() {
        let p = dir.path().join(format!("case{i}.gguf"));
        std::fs::write(&p, &bytes).unwrap();
        let out = common::ggrun().arg("info").arg(&p).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name}: status {:?}, stderr {err}",
            out.status
        );
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(err.starts_with("error: "), "{name}: {err}");
        assert!(err.contains(want), "{name}: expected '{want}' in: {err}");
        assert!(out.stdout.is_empty(), "{name}: printed to stdout");
    }
}

#[test]
fn no_allocation_exceeds_the_file_size() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (name, bytes, _)) in corpus().into_iter().enumerate() {
        let p = dir.path().join(format!("alloc{i}.gguf"));
        std::fs::write(&p, &bytes).unwrap();
        LARGEST.store(0, Ordering::SeqCst); // only this test sets TRACK
        TRACK.with(|t| t.set(true));
        let r = open_and_describe(&p);
        TRACK.with(|t| t.set(false));
        assert!(r.is_err(), "{name} opened");
        // Path buffers and error strings are small; 4 KiB of slack covers them.
        let largest = LARGEST.load(Ordering::SeqCst);
        assert!(
            largest <= bytes.len() + 4096,
            "{name}: allocated {largest} bytes for a {}-byte file",
            bytes.len()
        );
    }
}

#[test]
fn every_prefix_of_a_valid_file_fails_cleanly() {
    let good = valid().to_bytes();
    assert!(ggrun::gguf::parse(&good, Path::new("x")).is_ok());
    for n in 0..good.len() {
        let r = ggrun::gguf::parse(&good[..n], Path::new("x"));
        assert!(r.is_err(), "prefix {n} of {} parsed", good.len());
    }
}

#[test]
fn every_single_byte_corruption_of_the_header_is_handled() {
    // Flip each header/metadata byte to a few values: must parse or fail, never panic.
    let good = valid().to_bytes();
    let header_len = good.len() - 32 * 4 - 96 * 4;
    for i in 0..header_len {
        for v in [0x00u8, 0xff, 0x80, 0x7f] {
            let mut b = good.clone();
            b[i] = v;
            let _ = ggrun::gguf::parse(&b, Path::new("x"));
        }
    }
}

#[test]
fn a_split_model_opens_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let mk = |no: u16, tensors: &[(&str, f32)]| {
        let mut w = GgufWriter::new();
        w.kv("split.no", Value::U16(no))
            .kv("split.count", Value::U16(3));
        if no == 0 {
            w.kv("general.architecture", Value::str("llama"))
                .kv("split.tensors.count", Value::I32(4));
        }
        for (n, x) in tensors {
            w.tensor_f32(n, &[32], &[*x; 32]);
        }
        w.to_bytes()
    };
    let parts = [
        mk(0, &[("a", 1.0)]),
        mk(1, &[("b", 2.0), ("c", 3.0)]),
        mk(2, &[("d", 4.0)]),
    ];
    for (i, p) in parts.iter().enumerate() {
        std::fs::write(dir.path().join(format!("m-{:05}-of-00003.gguf", i + 1)), p).unwrap();
    }
    // Any part opens the set.
    let m = Model::open(&dir.path().join("m-00002-of-00003.gguf")).unwrap();
    assert_eq!(m.parts.len(), 3);
    assert_eq!(m.tensor_count(), 4);
    for (n, x) in [("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0)] {
        assert_eq!(m.tensor(n).unwrap().to_f32().unwrap(), vec![x; 32], "{n}");
    }
    // A missing part is a clear error.
    std::fs::remove_file(dir.path().join("m-00003-of-00003.gguf")).unwrap();
    let e = Model::open(&dir.path().join("m-00001-of-00003.gguf"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("m-00003-of-00003.gguf"), "{e}");
}

#[test]
fn huge_sizes_in_metadata_are_reported_not_overflowed() {
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::str("nemotron_h"))
        .kv("nemotron_h.block_count", Value::U32(2))
        .kv("nemotron_h.attention.head_count", Value::U64(u64::MAX))
        .kv(
            "nemotron_h.attention.head_count_kv",
            Value::Array(Array::U64(vec![0, u64::MAX])),
        )
        .kv("nemotron_h.attention.key_length", Value::U64(u64::MAX))
        .kv("nemotron_h.feed_forward_length", Value::u32s(&[0, 0]))
        .kv("nemotron_h.ssm.conv_kernel", Value::U64(u64::MAX))
        .kv("nemotron_h.ssm.inner_size", Value::U64(u64::MAX))
        .kv("nemotron_h.ssm.state_size", Value::U64(u64::MAX))
        .kv("nemotron_h.ssm.group_count", Value::U64(u64::MAX));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("huge.gguf");
    w.write(&p).unwrap();
    let info = ModelInfo::from_model(&Model::open(&p).unwrap()).unwrap();
    assert_eq!(info.layer_pattern.as_deref(), Some("M*"));
    assert_eq!(info.recurrent_state_bytes, u64::MAX);
    assert_eq!(info.kv_bytes_per_1k, Some(u64::MAX));
}

#[test]
fn writer_round_trips_every_value_type() {
    let vals = vec![
        ("u8", Value::U8(200)),
        ("i8", Value::I8(-5)),
        ("u16", Value::U16(60000)),
        ("i16", Value::I16(-30000)),
        ("u32", Value::U32(4_000_000_000)),
        ("i32", Value::I32(-2_000_000_000)),
        ("f32", Value::F32(1.5)),
        ("bool", Value::Bool(true)),
        ("str", Value::str("héllo")),
        ("u64", Value::U64(u64::MAX)),
        ("i64", Value::I64(i64::MIN)),
        ("f64", Value::F64(-2.25)),
        ("arr", Value::f32s(&[1.0, 2.0])),
        (
            "arr2",
            Value::Array(Array::Array(vec![
                Array::U32(vec![1, 2]),
                Array::String(["x"].into_iter().collect()),
            ])),
        ),
    ];
    let mut w = GgufWriter::new();
    for (k, v) in &vals {
        w.kv(k, v.clone());
    }
    w.tensor("q", &[64, 2], GgmlType::Q8_0, vec![0; 136]);
    let g = ggrun::gguf::parse(&w.to_bytes(), Path::new("x")).unwrap();
    for (k, v) in &vals {
        assert_eq!(g.metadata.get(k), Some(v), "{k}");
    }
    assert_eq!(g.metadata.get_u32("u32").unwrap(), 4_000_000_000);
    assert_eq!(
        g.metadata.get_u32("str").unwrap_err().to_string(),
        "str: expected u32, found string"
    );
    assert_eq!(
        g.metadata
            .get_usize("nemotron_h_moe.ssm.state_size")
            .unwrap_err()
            .to_string(),
        "nemotron_h_moe.ssm.state_size: missing"
    );
    assert_eq!(g.tensors[0].size_bytes, 136);
}

/// Peak resident memory of `ggrun ARGS` in bytes, read by Python from the child's rusage
/// (RUSAGE_CHILDREN of a process whose only child is ggrun).
fn peak_rss(args: &[&std::ffi::OsStr]) -> u64 {
    let script = "import resource, subprocess, sys\n\
                  r = subprocess.run(sys.argv[1:], capture_output=True)\n\
                  assert r.returncode == 0, r.stderr\n\
                  print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)";
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_ggrun"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn a_100_mb_metadata_array_costs_info_less_than_twice_the_file() {
    // One u8 array, and one array of one-byte strings (9 bytes each in the file), of 100 MB.
    let dir = tempfile::tempdir().unwrap();
    let n = 100 << 20;
    let mut u8s = Raw::header(3, 0, 2);
    u8s.str("general.architecture").u32(8).str("llama");
    u8s.str("general.blob").u32(9).u32(0).u64(n as u64);
    u8s.0.resize(u8s.0.len() + n, 7);
    let count = n / 9;
    let mut strs = Raw::header(3, 0, 2);
    strs.str("general.architecture").u32(8).str("llama");
    strs.str("tokenizer.ggml.tokens")
        .u32(9)
        .u32(8)
        .u64(count as u64);
    strs.0.reserve(n);
    for i in 0..count {
        strs.str(["a", "b", "c"][i % 3]);
    }
    for (name, raw) in [("u8", u8s), ("strings", strs)] {
        let p = dir.path().join(format!("{name}.gguf"));
        std::fs::write(&p, &raw.0).unwrap();
        let size = raw.0.len() as u64;
        drop(raw);
        let rss = peak_rss(&["info".as_ref(), p.as_os_str()]);
        assert!(
            rss < 2 * size,
            "{name}: info peaked at {rss} bytes for a {size}-byte file"
        );
    }
}

#[test]
fn key_and_tensor_counts_beyond_any_real_file_are_refused() {
    let mut r = Raw::header(3, 0, 70_000);
    r.0.resize(r.0.len() + 70_000 * 14, 0);
    let e = ggrun::gguf::parse(&r.0, Path::new("x"))
        .err()
        .unwrap()
        .to_string();
    assert_eq!(e, "70000 metadata keys (at most 65536 are read)");
    let mut r = Raw::header(3, 1_100_000, 0);
    r.0.resize(r.0.len() + 1_100_000 * 24, 0);
    let e = ggrun::gguf::parse(&r.0, Path::new("x"))
        .err()
        .unwrap()
        .to_string();
    assert_eq!(e, "1100000 tensors (at most 1048576 are read)");
}

#[test]
fn hostile_chat_templates_end_within_five_seconds_with_one_line_errors() {
    // Each hostile template, and the limit its error must name.
    let cases = [
        (
            "macro fan-out (2^40 calls)",
            "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
            "instructions (--template-fuel)",
        ),
        (
            "nested range(100000) loops",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "instructions (--template-fuel)",
        ),
        (
            "a string doubled 64 times",
            "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
            "512 MiB of memory (--template-max-memory)",
        ),
        (
            "a gigabyte of output",
            "{% for i in range(100) %}{{ 'x' * 10000000 }}{% endfor %}",
            "64 MiB (--template-max-output)",
        ),
        (
            "endless recursion",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "recursion limit",
        ),
        ("range(1e9)", "{% for i in range(1000000000) %}{% endfor %}", "range"),
        ("'x' * 1e11", "{{ 'x' * 100000000000 }}", "too large"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let model = common::fixtures().join("nemo-tiny-q8_0.gguf");
    for (i, (name, source, want)) in cases.iter().enumerate() {
        let t = dir.path().join(format!("t{i}.jinja"));
        std::fs::write(&t, source).unwrap();
        for cmd in ["template", "run"] {
            let start = std::time::Instant::now();
            let out = common::ggrun()
                .args([cmd, "-m"])
                .arg(&model)
                .arg("--chat-template")
                .arg(&t)
                .args(if cmd == "run" {
                    &["-q", "-p", "hi", "-n", "1"][..]
                } else {
                    &[]
                })
                .output()
                .unwrap();
            let secs = start.elapsed().as_secs_f64();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{name} ({cmd}): {err}");
            assert_eq!(err.lines().count(), 1, "{name} ({cmd}): {err}");
            assert!(
                err.contains(want),
                "{name} ({cmd}): expected {want:?} in {err}"
            );
            assert!(secs < 5.0, "{name} ({cmd}): {secs:.1} s");
        }
    }
}

/// Runs `ggrun ARGS` to completion: (exit status, stderr).
fn ggrun_err(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let out = common::ggrun().args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn oversized_contexts_and_thread_counts_get_one_line_answers() {
    let m = common::smollm2();
    let run = |extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec!["run".as_ref(), "-m".as_ref(), m.as_os_str()];
        args.extend(["-p", "hi", "-n", "1", "--temp", "0"].map(std::ffi::OsStr::new));
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        ggrun_err(&args)
    };
    let (code, err) = run(&["-c", "1000000000"]);
    assert_eq!(code, Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].starts_with("warning: -c 1000000000 is above the 8192 tokens"),
        "{err}"
    );
    assert!(
        lines[1].starts_with("error: the KV cache of 1000000000 tokens needs")
            && lines[1].ends_with("(lower -c/--ctx-size)"),
        "{err}"
    );
    let (code, err) = run(&["-t", "100000"]);
    assert_eq!(code, Some(0), "{err}");
    let warning = err.lines().next().unwrap();
    assert!(
        warning.starts_with("warning: -t 100000 is more than the ") && warning.contains("; using "),
        "{err}"
    );
}

#[test]
fn a_directory_or_a_fifo_as_the_model_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.gguf");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for (path, want) in [
        (dir.path().to_path_buf(), "a directory, not a GGUF file"),
        (fifo, "not a regular file"),
    ] {
        let t0 = std::time::Instant::now();
        let (code, err) = ggrun_err(&["info".as_ref(), path.as_os_str()]);
        assert_eq!(code, Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(want), "{err}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    }
}

/// A tiny model of `arch` in `dir` with `patch` applied to its bytes.
fn patched(arch: &str, dir: &Path, name: &str, patch: impl Fn(&mut Vec<u8>)) -> std::path::PathBuf {
    let p = dir.join(format!("{name}.gguf"));
    ggrun::synth::decoder::write_tiny(arch, ggrun::synth::decoder::TinyMix::F32, 1, false, &p)
        .unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    patch(&mut bytes);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Overwrites the f32 value of metadata key `key` (type id 6 right after the key).
fn set_meta_f32(bytes: &mut [u8], key: &str, v: f32) {
    let at = bytes
        .windows(key.len())
        .position(|w| w == key.as_bytes())
        .unwrap_or_else(|| panic!("{key} not in the file"))
        + key.len();
    assert_eq!(
        &bytes[at..at + 4],
        &6u32.to_le_bytes(),
        "{key} is not an f32"
    );
    bytes[at + 4..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// `ggrun run -q -p hi` on `model`: (exit status, stderr).
fn run_quietly(model: &Path) -> (Option<i32>, String) {
    ggrun_err(&[
        "run".as_ref(),
        "-m".as_ref(),
        model.as_os_str(),
        "-p".as_ref(),
        "hi".as_ref(),
        "-q".as_ref(),
    ])
}

#[test]
fn nan_or_nonpositive_hyperparameters_fail_to_load_and_nan_logits_stop_generation() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "qwen3",
            "attention.layer_norm_rms_epsilon",
            f32::NAN,
            "must be a finite number",
        ),
        (
            "qwen3",
            "attention.layer_norm_rms_epsilon",
            0.0,
            "must be above zero",
        ),
        (
            "qwen3",
            "rope.freq_base",
            f32::NAN,
            "must be a finite number",
        ),
        ("qwen3", "rope.freq_base", -1.0, "must be above zero"),
        (
            "gemma3",
            "final_logit_softcapping",
            -30.0,
            "must not be negative",
        ),
        (
            "gpt-oss",
            "rope.scaling.factor",
            f32::INFINITY,
            "must be a finite number",
        ),
    ];
    for (i, (arch, key, v, want)) in cases.iter().enumerate() {
        let key = format!("{arch}.{key}");
        let p = patched(arch, dir.path(), &format!("bad{i}"), |b| {
            set_meta_f32(b, &key, *v)
        });
        let (code, err) = run_quietly(&p);
        assert_eq!(code, Some(1), "{key}={v}: {err}");
        assert_eq!(err.lines().count(), 1, "{key}={v}: {err}");
        assert!(err.contains(&key) && err.contains(want), "{key}={v}: {err}");
    }
    // NaN weights: the final norm's, so every logit is NaN.
    let p = patched("qwen3", dir.path(), "nan-weights", |_| {});
    let g = ggrun::gguf::parse(&std::fs::read(&p).unwrap(), &p).unwrap();
    let t = g
        .tensors
        .iter()
        .find(|t| t.name == "output_norm.weight")
        .unwrap();
    let at = (g.data_offset + t.offset) as usize;
    let mut bytes = std::fs::read(&p).unwrap();
    for f in bytes[at..at + t.size_bytes as usize].chunks_exact_mut(4) {
        f.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(&p, bytes).unwrap();
    let (code, err) = run_quietly(&p);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("NaN logits"), "{err}");
}
