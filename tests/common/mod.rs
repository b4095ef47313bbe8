//! Paths to the shared fixtures and fetched models, and small helpers shared by the tests.
#![allow(dead_code)]

use std::path::PathBuf;

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

pub fn ggrun() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_ggrun"))
}
