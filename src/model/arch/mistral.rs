//! Mistral (7B v0.1–v0.3, Nemo, Small): the Llama block; where config.json sets
//! `sliding_window`, every layer attends within it (v0.1's 4,096), as transformers masks it.

use crate::model::arch::{self, Arch, Family};
use crate::model::Config;
use anyhow::Result;
use serde_json::{Map, Value};

pub const ARCH: Arch = Arch {
    family: Family::Mistral,
    name: "mistral",
    model_types: &["mistral"],
    hf_class: "MistralForCausalLM",
    hf_model_type: "mistral",
    gemma_conventions: false,
    read_hf,
    write_hf,
    load_layer: crate::model::llama::load_layer,
    gguf: None,
};

fn read_hf(v: &Value, cfg: &mut Config) -> Result<()> {
    crate::model::llama::read_silu(v)?;
    arch::read_rope_scaling(v, cfg)?;
    arch::read_window_on_every_layer(v, cfg);
    Ok(())
}

fn write_hf(cfg: &Config, j: &mut Map<String, Value>) {
    arch::write_window(cfg, j);
    arch::write_rope_scaling(cfg, j);
}
