//! Architecture hyper-parameters, read from GGUF metadata or a Hugging Face config.json.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Model families the runtime can run. Each has its own file in `model/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Qwen2,
}

impl Family {
    /// From GGUF `general.architecture` or config.json `model_type`.
    pub fn from_name(name: &str) -> Result<Family> {
        match name {
            "llama" => Ok(Family::Llama),
            "qwen2" => Ok(Family::Qwen2),
            other => bail!(
                "unsupported architecture '{other}': outlierlab runs llama and qwen2 models \
                 (SmolLM2, Llama, Qwen2/2.5); a new family needs its own file in src/model/"
            ),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
        }
    }
}

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
}

impl Config {
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
        let cfg = Config {
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
                .and_then(|x| x.as_f64())
                .unwrap_or(10000.0),
            vocab_size: get("vocab_size")?,
            context_length: get("max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config.json that Hugging Face transformers needs to load an exported model.
    pub fn to_hf_json(&self, bos: Option<u32>, eos: Option<u32>) -> serde_json::Value {
        let (arch, model_type) = match self.family {
            Family::Llama => ("LlamaForCausalLM", "llama"),
            Family::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        };
        serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
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
            "attention_bias": self.family == Family::Qwen2,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        })
    }
}
