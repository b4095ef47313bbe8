//! Compute backends. `cpu` holds the thread pool, matrix products and element-wise ops;
//! `attention` and `ssm` are the sequence-mixing ops with their per-sequence state.

pub mod attention;
pub mod cpu;
pub mod ssm;
