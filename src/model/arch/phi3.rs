//! Phi-3 / Phi-3.5 / Phi-4-mini's dense block: the Llama block with q, k and v in one
//! `qkv_proj` and gate and up in one `gate_up_proj` (gate first), split at load and fused again
//! on export; the writers into the residual stream are `o_proj` and `down_proj`, as in Llama.
//! Where `sliding_window` is set every layer attends within it. Partial rotary embeddings and
//! `longrope` scaling (the 128k-context checkpoints) are refused by name.

use crate::model::arch::{self, Arch, Family};
use crate::model::llama::{LlamaLayer, LlamaOptions};
use crate::model::Config;
use anyhow::{bail, Result};
use serde_json::{Map, Value};

pub const ARCH: Arch = Arch {
    family: Family::Phi3,
    name: "phi3",
    model_types: &["phi3"],
    hf_class: "Phi3ForCausalLM",
    hf_model_type: "phi3",
    gemma_conventions: false,
    read_hf,
    write_hf,
    load_layer: |cfg, w, i| {
        let o = LlamaOptions {
            fused: true,
            ..LlamaOptions::default()
        };
        Ok(Box::new(LlamaLayer::load(cfg, w, i, o)?))
    },
    gguf: None,
};

fn read_hf(v: &Value, cfg: &mut Config) -> Result<()> {
    crate::model::llama::read_silu(v)?;
    let partial = arch::number(v, "partial_rotary_factor")
        .or_else(|| {
            v.pointer("/rope_parameters/partial_rotary_factor")
                .and_then(|x| x.as_f64())
        })
        .unwrap_or(1.0);
    if partial != 1.0 {
        bail!(
            "config.json: `partial_rotary_factor: {partial}` (rotary embeddings on part of each head) is not implemented"
        );
    }
    arch::read_rope_scaling(v, cfg)?;
    arch::read_window_on_every_layer(v, cfg);
    Ok(())
}

fn write_hf(cfg: &Config, j: &mut Map<String, Value>) {
    // Phi3Config's default pad id (32,000) is an embedding row only in 32k vocabularies; the
    // exported generation_config.json names the pad token.
    j.insert("pad_token_id".into(), Value::Null);
    arch::write_window(cfg, j);
    arch::write_rope_scaling(cfg, j);
}
