//! Qwen2 / Qwen2.5: the Llama block with biases on the q, k and v projections and, in most
//! sizes, an output head separate from the embeddings.

use crate::model::llama::LlamaLayer;
use crate::model::{Config, DecoderLayer, Weights};
use anyhow::Result;

pub fn load_layer(cfg: &Config, w: &mut Weights, i: usize) -> Result<Box<dyn DecoderLayer>> {
    Ok(Box::new(LlamaLayer::load(cfg, w, i, true)?))
}
