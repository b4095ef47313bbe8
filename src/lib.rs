//! ggrun: a GGUF-native LLM runner for large sparse MoE and hybrid models.
//!
//! Layers (dependencies point down): `cli` → `info`, `model` → `backend` → `gguf`,
//! `ggrun_quants`.

pub mod backend;
pub mod bench;
pub mod chat;
pub mod cli;
pub mod generate;
pub mod gguf;
pub mod info;
pub mod model;
pub mod profile;
pub mod routing;
pub mod sample;
pub mod serve;
pub mod synth;
pub mod tokenizer;
pub mod tune;
