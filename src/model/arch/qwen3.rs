//! Qwen3 (dense): the Llama block with an RMSNorm over each query and key head before the
//! rotation, no q/k/v biases (unless `attention_bias`), and a head dimension of its own
//! (`head_dim`, not hidden / heads).

use crate::model::arch::{self, Arch, Family};
use crate::model::llama::{LlamaLayer, LlamaOptions};
use crate::model::Config;
use anyhow::Result;
use serde_json::{Map, Value};

pub const ARCH: Arch = Arch {
    family: Family::Qwen3,
    name: "qwen3",
    model_types: &["qwen3"],
    hf_class: "Qwen3ForCausalLM",
    hf_model_type: "qwen3",
    gemma_conventions: false,
    read_hf,
    write_hf,
    load_layer: |cfg, w, i| {
        let o = LlamaOptions {
            qk_norm: true,
            ..LlamaOptions::default()
        };
        Ok(Box::new(LlamaLayer::load(cfg, w, i, o)?))
    },
    gguf: None,
};

fn read_hf(v: &Value, cfg: &mut Config) -> Result<()> {
    crate::model::llama::read_silu(v)?;
    if v.get("use_sliding_window").and_then(|x| x.as_bool()) == Some(true) {
        anyhow::bail!("config.json: `use_sliding_window: true` is not implemented for qwen3");
    }
    arch::read_attention_bias(v, cfg)?;
    arch::read_rope_scaling(v, cfg)
}

fn write_hf(cfg: &Config, j: &mut Map<String, Value>) {
    j.insert("attention_bias".into(), cfg.attention_bias.into());
    arch::write_rope_scaling(cfg, j);
}
