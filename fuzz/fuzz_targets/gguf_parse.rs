//! Fuzzes the GGUF parser and everything `ggrun info` does with what it parsed: any input must
//! give a value or an error, never a panic, hang or huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = ggrun::gguf::GgufFile::from_bytes(data.to_vec(), Path::new("fuzz.gguf")) else {
        return;
    };
    let Ok(model) = ggrun::gguf::Model::from_parts(vec![file]) else {
        return;
    };
    let names: Vec<String> = model.tensors().map(|t| t.name.clone()).collect();
    for n in names {
        let v = model.tensor(&n).unwrap();
        let _ = v.to_f32();
    }
    if let Ok(info) = ggrun::info::ModelInfo::from_model(&model) {
        let _ = info.to_json();
        let _ = info.to_text();
    }
});
