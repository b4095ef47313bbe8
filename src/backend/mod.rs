//! Compute backends. `cpu` holds the thread pool, matrix products and element-wise ops;
//! `attention` and `ssm` are the sequence-mixing ops with their per-sequence state; `cuda` is the
//! GPU device, its kernels and the matrix products on it; `placement` decides which weights go
//! there; `state` is a sequence's state as they keep it.

pub mod attention;
pub mod cpu;
pub mod cuda;
pub mod placement;
pub mod ssm;
pub mod state;
