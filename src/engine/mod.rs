//! The engine below the commands: a model loaded for a run with its options (`load`).

pub mod load;
