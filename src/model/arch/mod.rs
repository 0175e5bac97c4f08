//! One file per model family, holding everything the runtime knows of it: the `model_type`s that
//! name it, the config.json keys it reads and writes, its layer as the checkpoint lays it out
//! (tensor names, norms, rope), and its forward pass. A new family is one file and one line in
//! [`ARCHES`]. A family that can be read from a GGUF file says so in [`Arch::gguf`], with
//! llama.cpp's names for its tensors and what llama.cpp's converter changed in them.

pub mod gemma2;
pub mod gemma3;
pub mod llama;
pub mod mistral;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;

use crate::model::{Config, DecoderLayer, Weights};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Model families the runtime can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Qwen2,
    Gemma3,
    Mistral,
    Qwen3,
    Gemma2,
    Phi3,
}

/// What a family's file tells the rest of the runtime.
pub struct Arch {
    pub family: Family,
    /// The name outlierlab writes (run records, `models`).
    pub name: &'static str,
    /// config.json `model_type`s (and GGUF `general.architecture`) that mean this family.
    pub model_types: &'static [&'static str],
    /// transformers' class and `model_type` for an exported folder.
    pub hf_class: &'static str,
    pub hf_model_type: &'static str,
    /// Gemma's conventions: every norm multiplies by (1 + w), embeddings are scaled by √d, the
    /// head is tied to the embeddings unless config.json says otherwise.
    pub gemma_conventions: bool,
    /// Reads the family's own config.json keys (after the ones every family shares).
    pub read_hf: fn(&Value, &mut Config) -> Result<()>,
    /// Writes them for an exported folder (after the shared ones).
    pub write_hf: fn(&Config, &mut Map<String, Value>),
    /// Builds layer `i` from the checkpoint's tensors.
    pub load_layer: fn(&Config, &mut Weights, usize) -> Result<Box<dyn DecoderLayer>>,
    /// How llama.cpp lays the family out in a GGUF file; `None`: GGUF files of it are refused.
    pub gguf: Option<Gguf>,
}

/// A family as llama.cpp's converter writes it.
pub struct Gguf {
    /// A block's norm tensors, llama.cpp's name (`blk.N.<this>.weight`) → transformers'
    /// (`model.layers.N.<this>.weight`); the projections are named as [`GGUF_PROJECTIONS`].
    pub norm_names: &'static [(&'static str, &'static str)],
    /// The converter interleaved the two rotary halves of each q/k head (Llama).
    pub rope_interleaved: bool,
    /// Norm weights are stored as 1 + w (Gemma); transformers holds w.
    pub norm_plus_one: bool,
    /// Fills in what the family's config needs beyond the shared metadata, from the numbers
    /// under `<architecture>.` (a key's suffix in, its value out).
    pub read_meta: fn(&GgufNumber, &mut Config),
}

/// A GGUF metadata number by its key under `<architecture>.`, if the file has it.
pub type GgufNumber<'a> = dyn Fn(&str) -> Option<f64> + 'a;

/// llama.cpp's names for the Llama block's norms (and Qwen2's, which adds only biases).
pub(crate) const LLAMA_GGUF_NORMS: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// llama.cpp's names for the projections of every family it is read for.
pub const GGUF_PROJECTIONS: &[(&str, &str)] = &[
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

pub(crate) fn no_gguf_meta(_: &GgufNumber, _: &mut Config) {}

/// Every family, in the order `--help` and errors list them.
pub const ARCHES: [&Arch; 7] = [
    &llama::ARCH,
    &mistral::ARCH,
    &qwen2::ARCH,
    &qwen3::ARCH,
    &gemma2::ARCH,
    &gemma3::ARCH,
    &phi3::ARCH,
];

impl Family {
    /// From config.json `model_type` or GGUF `general.architecture`.
    pub fn from_name(name: &str) -> Result<Family> {
        if let Some(a) = ARCHES.iter().find(|a| a.model_types.contains(&name)) {
            return Ok(a.family);
        }
        let known: Vec<&str> = ARCHES.iter().map(|a| a.model_types[0]).collect();
        bail!(
            "unsupported architecture '{name}': outlierlab runs {} (text) models; a new family needs its own file in src/model/arch/",
            known.join(", ")
        )
    }

    pub fn arch(self) -> &'static Arch {
        ARCHES
            .iter()
            .find(|a| a.family == self)
            .expect("every family is listed in ARCHES")
    }

    pub fn name(self) -> &'static str {
        self.arch().name
    }
}

/// Reads `key` as a number, if config.json has it.
pub(crate) fn number(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(|x| x.as_f64())
}

/// `sliding_window` (null or absent: none).
pub(crate) fn sliding_window(v: &Value) -> Option<usize> {
    v.get("sliding_window")
        .and_then(|x| x.as_u64())
        .map(|x| x as usize)
}

/// For families whose every layer attends within `sliding_window` when one is set (Mistral,
/// Phi-3), as transformers builds their masks.
pub(crate) fn read_window_on_every_layer(v: &Value, cfg: &mut Config) {
    cfg.sliding_window = sliding_window(v);
    cfg.all_sliding = cfg.sliding_window.is_some();
}

pub(crate) fn write_window(cfg: &Config, j: &mut Map<String, Value>) {
    j.insert("sliding_window".into(), cfg.sliding_window.into());
}

/// config.json's `attention_bias`: biases on the q, k, v and o projections (Llama, Qwen3).
pub(crate) fn read_attention_bias(v: &Value, cfg: &mut Config) -> Result<()> {
    cfg.attention_bias = v
        .get("attention_bias")
        .and_then(|x| x.as_bool())
        .unwrap_or(false);
    if v.get("mlp_bias").and_then(|x| x.as_bool()) == Some(true) {
        bail!("config.json: `mlp_bias: true` (biases on the MLP's projections) is not implemented");
    }
    Ok(())
}

/// The rotary scaling every Llama-like family may carry (only `llama3` is implemented).
pub(crate) fn read_rope_scaling(v: &Value, cfg: &mut Config) -> Result<()> {
    cfg.rope_scaling = llama::Llama3Rope::from_hf(v)?;
    Ok(())
}

pub(crate) fn write_rope_scaling(cfg: &Config, j: &mut Map<String, Value>) {
    if let Some(r) = &cfg.rope_scaling {
        j.insert("rope_scaling".into(), r.to_hf());
    }
}
