//! Conversations: messages and the API shapes they come in (`message`), chat templates
//! (`template`) rendered under limits, in a child process where memory is limited too (`sandbox`), and the turn logic that keeps a model's state
//! across turns so each turn processes only its new tokens (`session`).

pub mod message;
pub mod sandbox;
pub mod session;
pub mod template;
