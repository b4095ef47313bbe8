//! ggrun: a GGUF-native LLM runner for large sparse MoE and hybrid models.
//!
//! Layers (dependencies point down): `cli` → `info` → `gguf` → `ggrun_quants`.

pub mod cli;
pub mod gguf;
pub mod info;
