//! One file per model family: its layer, as the checkpoint lays it out, and its forward pass.

pub mod gemma3;
pub mod llama;
pub mod qwen2;
