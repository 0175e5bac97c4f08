//! Gemma 2: Gemma 3's block without the query and key norms — norms that scale by (1 + w)
//! before and after attention and the MLP, GeGLU, queries scaled by `query_pre_attn_scalar`^−½,
//! attention logits soft-capped (`attn_logit_softcapping`, 50) and so are the output logits
//! (`final_logit_softcapping`, 30); every other layer (the first, third, …) attends within the
//! sliding window, with the same rotary base as the global ones. Embeddings scaled by √d.

use crate::model::arch::{Arch, Family};
use crate::model::gemma3::{read_gemma_attention, write_gemma_attention, Gemma3Layer};
use crate::model::Config;
use anyhow::Result;
use serde_json::{Map, Value};

pub const ARCH: Arch = Arch {
    family: Family::Gemma2,
    name: "gemma2",
    model_types: &["gemma2"],
    hf_class: "Gemma2ForCausalLM",
    hf_model_type: "gemma2",
    gemma_conventions: true,
    read_hf,
    write_hf,
    load_layer: |cfg, w, i| Ok(Box::new(Gemma3Layer::load(cfg, w, i, false)?)),
    gguf: None,
};

/// Gemma 2 alternates: layer 1 local, layer 2 global, …
const SLIDING_PATTERN: usize = 2;

fn read_hf(v: &Value, cfg: &mut Config) -> Result<()> {
    read_gemma_attention(v, cfg, SLIDING_PATTERN);
    if v.get("use_bidirectional_attention")
        .and_then(|x| x.as_bool())
        == Some(true)
    {
        anyhow::bail!("config.json: `use_bidirectional_attention: true` (an encoder) is not a causal language model");
    }
    Ok(())
}

fn write_hf(cfg: &Config, j: &mut Map<String, Value>) {
    write_gemma_attention(cfg, j);
}
