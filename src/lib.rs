//! ggrun: a GGUF-native LLM runner for large sparse MoE and hybrid models.
//!
//! Layers (dependencies point down; nothing imports `cli` or `serve`): `cli` → `serve`,
//! `tune` → `engine` → `chat`, `generate`, `model` → `backend` → `gguf`, `tokenizer`,
//! `ggrun_quants`; `sample` → `grammar` → `tokenizer`.

pub mod backend;
pub mod bench;
pub mod chat;
pub mod cli;
pub mod engine;
pub mod generate;
pub mod gguf;
pub mod grammar;
pub mod info;
pub mod library;
pub mod model;
pub mod profile;
pub mod routing;
pub mod sample;
pub mod serve;
pub mod synth;
pub mod tokenizer;
pub mod tune;
