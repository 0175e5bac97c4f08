//! Getting a model in and out: GGUF and Hugging Face checkpoints, the tokenizer and chat
//! template they carry, model names (alias, path, Hub), and export as a Hugging Face folder.

pub mod chat;
pub mod export;
pub mod gguf;
pub mod hf;
pub mod source;
pub mod synth;
pub mod tokenizer;
