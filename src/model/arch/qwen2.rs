//! Qwen2 / Qwen2.5: the Llama block with biases on the q, k and v projections and, in most
//! sizes, an output head separate from the embeddings.

use crate::model::arch::{self, Arch, Family};
use crate::model::llama::{LlamaLayer, LlamaOptions};
use crate::model::Config;
use anyhow::Result;
use serde_json::{Map, Value};

pub const ARCH: Arch = Arch {
    family: Family::Qwen2,
    name: "qwen2",
    model_types: &["qwen2"],
    hf_class: "Qwen2ForCausalLM",
    hf_model_type: "qwen2",
    gemma_conventions: false,
    read_hf,
    write_hf,
    load_layer: |cfg, w, i| {
        let o = LlamaOptions {
            qkv_bias: true,
            ..LlamaOptions::default()
        };
        Ok(Box::new(LlamaLayer::load(cfg, w, i, o)?))
    },
    gguf: Some(arch::Gguf {
        norm_names: arch::LLAMA_GGUF_NORMS,
        rope_interleaved: false,
        norm_plus_one: false,
        read_meta: arch::no_gguf_meta,
    }),
};

fn read_hf(v: &Value, cfg: &mut Config) -> Result<()> {
    crate::model::llama::read_silu(v)?;
    // Qwen2's `sliding_window` applies only with `use_sliding_window: true`, which no released
    // checkpoint sets.
    if v.get("use_sliding_window").and_then(|x| x.as_bool()) == Some(true) {
        anyhow::bail!("config.json: `use_sliding_window: true` is not implemented for qwen2");
    }
    arch::read_rope_scaling(v, cfg)
}

fn write_hf(cfg: &Config, j: &mut Map<String, Value>) {
    j.insert("attention_bias".into(), true.into());
    arch::write_rope_scaling(cfg, j);
}
