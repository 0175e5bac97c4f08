//! Random-weight Llama checkpoints written as a Hugging Face folder (bf16 safetensors in shards
//! with their index, config.json): realistic shapes without a download, for the loading
//! benchmark and for tests of what a user's checkpoint goes through.

use anyhow::{Context, Result};
use rand_xoshiro::rand_core::{RngCore, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::Path;

/// A Llama checkpoint's shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub tied: bool,
}

/// Llama-3.2-1B's shape (1.24 B parameters, tied head).
pub const LLAMA_3_2_1B: Shape = Shape {
    hidden: 2048,
    intermediate: 8192,
    layers: 16,
    heads: 32,
    kv_heads: 8,
    vocab: 128_256,
    tied: true,
};

impl Shape {
    /// Every tensor's Hugging Face name and shape, in file order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (d, ff, hd) = (self.hidden, self.intermediate, self.hidden / self.heads);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, d])];
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            for (name, shape) in [
                ("input_layernorm.weight", vec![d]),
                ("self_attn.q_proj.weight", vec![self.heads * hd, d]),
                ("self_attn.k_proj.weight", vec![self.kv_heads * hd, d]),
                ("self_attn.v_proj.weight", vec![self.kv_heads * hd, d]),
                ("self_attn.o_proj.weight", vec![d, self.heads * hd]),
                ("post_attention_layernorm.weight", vec![d]),
                ("mlp.gate_proj.weight", vec![ff, d]),
                ("mlp.up_proj.weight", vec![ff, d]),
                ("mlp.down_proj.weight", vec![d, ff]),
            ] {
                out.push((format!("{p}.{name}"), shape));
            }
        }
        out.push(("model.norm.weight".to_string(), vec![d]));
        if !self.tied {
            out.push(("lm_head.weight".to_string(), vec![self.vocab, d]));
        }
        out
    }

    pub fn parameters(&self) -> usize {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden / self.heads,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": self.tied,
            "torch_dtype": "bfloat16",
        })
    }
}

/// Writes `shape` with seeded random bf16 weights (norms at 1, matrices uniform in ±0.03) into
/// `dir` as shards of about `shard_bytes`, with `model.safetensors.index.json` and config.json.
/// Returns the bytes of tensor data written.
pub fn write_llama(dir: &Path, shape: &Shape, seed: u64, shard_bytes: usize) -> Result<u64> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Shards planned by size first (their names carry the count), then generated and written
    // one at a time, so that at most one shard is in memory.
    let mut plan: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut size = 0usize;
    for (name, dims) in shape.tensors() {
        let bytes = 2 * dims.iter().product::<usize>();
        if size > 0 && size + bytes > shard_bytes {
            plan.push(Vec::new());
            size = 0;
        }
        size += bytes;
        plan.last_mut().expect("a shard").push((name, dims));
    }
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
    let count = plan.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (i, shard) in plan.iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        let data: Vec<Vec<u8>> = shard
            .iter()
            .map(|(name, dims)| random_bf16(&mut rng, dims.iter().product(), name))
            .collect();
        let views: Vec<(&str, TensorView)> = shard
            .iter()
            .zip(&data)
            .map(|((n, d), b)| {
                total += b.len() as u64;
                weight_map.insert(n.clone(), file.clone());
                Ok((n.as_str(), TensorView::new(Dtype::BF16, d.clone(), b)?))
            })
            .collect::<Result<_>>()?;
        safetensors::serialize_to_file(views, None, &dir.join(&file))
            .with_context(|| format!("cannot write {}", dir.join(&file).display()))?;
    }
    let index = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    crate::fs::write_atomic(
        &dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?.as_bytes(),
    )?;
    crate::fs::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&shape.config_json())?.as_bytes(),
    )?;
    Ok(total)
}

/// `n` bf16 values, little-endian: ones for a norm, else uniform in ±0.03.
fn random_bf16(rng: &mut impl RngCore, n: usize, name: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(2 * n);
    for _ in 0..n {
        let x = if name.ends_with("norm.weight") {
            1.0
        } else {
            0.06 * ((rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32) - 0.03
        };
        bytes.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes());
    }
    bytes
}

/// The tiny Llama-3-style checkpoint the rotary-scaling reference was made on
/// (tests/fixtures/reference/scripts/llama3_rope.py): 2 layers, width 64, `rope_type: llama3`
/// with an original context of 32 (so that every band of the rescaling is reached), seed 11.
pub fn write_llama3_reference(dir: &Path) -> Result<()> {
    let shape = Shape {
        hidden: 64,
        intermediate: 128,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: 256,
        tied: false,
    };
    write_llama(dir, &shape, 11, usize::MAX)?;
    let mut config = shape.config_json();
    config["rope_theta"] = 10000.0.into();
    config["max_position_embeddings"] = 256.into();
    config["rope_scaling"] = serde_json::json!({
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    });
    crate::fs::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )
}

/// A random-weight model of any family from a config.json's text: every tensor the family's
/// file asks for, made from `seed` and the tensor's name (so a tensor's values do not depend
/// on the order it is read in), rounded to bf16 so that the checkpoint written from it holds
/// exactly these values. Norm weights lie around the family's identity (1, or 0 under Gemma's
/// 1 + w), matrices uniform in ±√(3 / inputs) (unit-variance outputs), biases in ±0.1.
pub fn tiny_model(config_json: &str, seed: u64) -> Result<crate::model::Model> {
    use crate::model::{Config, Model, Weights};
    let config = Config::from_hf_json(config_json)?;
    let gemma = config.family.arch().gemma_conventions;
    let make = move |name: &str, dims: &[usize]| -> Result<candle_core::Tensor> {
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed ^ fnv1a(name));
        let n: usize = dims.iter().product();
        let mut uniform =
            |a: f32| 2.0 * a * ((rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32) - a;
        let values: Vec<f32> = (0..n)
            .map(|_| {
                let x = if name.ends_with("norm.weight") {
                    let centre = if gemma { 0.0 } else { 1.0 };
                    centre + uniform(0.25)
                } else if name.ends_with(".bias") {
                    uniform(0.1)
                } else {
                    uniform((3.0 / *dims.last().unwrap_or(&1) as f32).sqrt())
                };
                half::bf16::from_f32(x).to_f32()
            })
            .collect();
        Ok(candle_core::Tensor::from_vec(
            values,
            dims,
            &candle_core::Device::Cpu,
        )?)
    };
    let mut make: crate::model::TensorMaker = Box::new(make);
    // The embeddings (and an untied head) are read without a shape; made here.
    let (v, d) = (config.vocab_size, config.hidden_size);
    let mut tensors = std::collections::HashMap::new();
    tensors.insert(
        "model.embed_tokens.weight".to_string(),
        make("model.embed_tokens.weight", &[v, d])?,
    );
    if !config.tie_word_embeddings {
        tensors.insert(
            "lm_head.weight".to_string(),
            make("lm_head.weight", &[v, d])?,
        );
    }
    let w = Weights::making(tensors, make, "a random-weight checkpoint".into());
    Model::new(config, w)
}

/// FNV-1a of a name: a tensor's own seed.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes `model` as a Hugging Face folder's weights (`model.safetensors`, in `dtype`) and
/// `config_json` beside them, as given (a config transformers' own config class wrote).
pub fn write_model(
    model: &crate::model::Model,
    config_json: &str,
    dir: &Path,
    dtype: candle_core::DType,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    crate::model::export::write_weights(model, &dir.join("model.safetensors"), dtype)?;
    crate::fs::write_atomic(&dir.join("config.json"), config_json.as_bytes())
}

/// Copies a model folder's tokenizer files (tokenizer.json, its config with the chat template,
/// a separate chat template) into `dir`, so that a random-weight checkpoint can be prompted.
pub fn copy_tokenizer(from: &Path, dir: &Path) -> Result<()> {
    if !from.join("tokenizer.json").is_file() {
        anyhow::bail!("{} has no tokenizer.json to copy", from.display());
    }
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
    ] {
        let src = from.join(f);
        if src.is_file() {
            std::fs::copy(&src, dir.join(f))
                .with_context(|| format!("cannot copy {} into {}", src.display(), dir.display()))?;
        }
    }
    Ok(())
}
