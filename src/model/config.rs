//! Architecture hyper-parameters, read from GGUF metadata or a Hugging Face config.json.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use crate::model::arch::llama::Llama3Rope;
pub use crate::model::arch::Family;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub vocab_size: usize,
    pub context_length: usize,
    pub tie_word_embeddings: bool,
    /// Gemma 3: the sliding window of local layers (None = every layer global).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Gemma 3: every n-th layer (1-based) is global, the others local.
    #[serde(default)]
    pub sliding_pattern: usize,
    /// Gemma 3: the rotary base of local layers (None: the global one).
    #[serde(default)]
    pub rope_local_theta: Option<f64>,
    /// Gemma 3: queries are scaled by this^−½ instead of head_dim^−½.
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// Llama 3.x: the rotary frequencies rescaled for a longer context (`rope_type: llama3`).
    #[serde(default)]
    pub rope_scaling: Option<Llama3Rope>,
    /// Mistral, Phi-3: every layer attends within `sliding_window` (not one in a pattern).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_sliding: bool,
    /// Biases on the q, k, v and o projections (config.json `attention_bias`; Qwen2's q, k and
    /// v biases are its family's, not this).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attention_bias: bool,
}

impl Config {
    /// Whether layer `i` attends within a sliding window (with the local rotary base).
    pub fn is_sliding(&self, i: usize) -> bool {
        self.sliding_window.is_some()
            && (self.all_sliding
                || (self.sliding_pattern > 0 && !(i + 1).is_multiple_of(self.sliding_pattern)))
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            bail!(
                "invalid head counts: {} attention heads, {} key/value heads",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!(
                "head dimension {} is odd; rotary embeddings need an even one",
                self.head_dim
            );
        }
        Ok(())
    }

    /// Reads a Hugging Face config.json.
    pub fn from_hf_json(text: &str) -> Result<Config> {
        let v: serde_json::Value =
            serde_json::from_str(text).context("config.json is not valid JSON")?;
        let get = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .with_context(|| format!("config.json has no integer field '{k}'"))
        };
        let model_type = v
            .get("model_type")
            .and_then(|x| x.as_str())
            .context("config.json has no 'model_type'")?;
        let family = Family::from_name(model_type)?;
        let hidden_size = get("hidden_size")?;
        let num_heads = get("num_attention_heads")?;
        let num_kv_heads = get("num_key_value_heads").unwrap_or(num_heads);
        let head_dim = v
            .get("head_dim")
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_heads);
        let arch = family.arch();
        let mut cfg = Config {
            family,
            hidden_size,
            intermediate_size: get("intermediate_size")?,
            num_layers: get("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-6),
            rope_theta: v
                .get("rope_theta")
                .or_else(|| v.pointer("/rope_parameters/rope_theta"))
                .and_then(|x| x.as_f64())
                .unwrap_or(10000.0),
            vocab_size: get("vocab_size")?,
            context_length: get("max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|x| x.as_bool())
                .unwrap_or(arch.gemma_conventions),
            sliding_window: None,
            sliding_pattern: 0,
            rope_local_theta: None,
            query_pre_attn_scalar: None,
            final_logit_softcapping: None,
            attn_logit_softcapping: None,
            rope_scaling: None,
            all_sliding: false,
            attention_bias: false,
        };
        (arch.read_hf)(&v, &mut cfg)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config.json that Hugging Face transformers needs to load an exported model.
    pub fn to_hf_json(&self, bos: Option<u32>, eos: Option<u32>) -> serde_json::Value {
        let arch = self.family.arch();
        let mut j = serde_json::json!({
            "architectures": [arch.hf_class],
            "model_type": arch.hf_model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.context_length,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        });
        if let Some(o) = j.as_object_mut() {
            (arch.write_hf)(self, o);
        }
        j
    }
}
