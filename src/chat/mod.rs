//! Conversations: chat templates (`template`) and the turn logic that keeps a model's state
//! across turns so each turn processes only its new tokens (`session`).

pub mod session;
pub mod template;
