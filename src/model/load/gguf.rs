//! GGUF checkpoints: metadata → `Config`, tensors dequantised to f32 under Hugging Face names,
//! and the vocabulary and chat template the file carries.
//!
//! Dequantising once at load is deliberate: f32 matmuls run far faster than quantised ones on a
//! CPU, and abliteration rewrites the weights anyway.

use crate::model::arch::{Gguf, ARCHES, GGUF_PROJECTIONS};
use crate::model::{Config, Family, Weights};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

/// What the GGUF says about its tokenizer (`tokenizer.ggml.*`).
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// `general.architecture`: how a sentencepiece vocabulary is turned into a tokenizer depends on it.
    pub arch: String,
    pub model: String,
    pub pre: String,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
}

pub struct GgufModel {
    pub config: Config,
    pub weights: Weights,
    pub vocab: GgufVocab,
    pub chat_template: Option<String>,
    pub name: Option<String>,
}

/// Tensor types we dequantise (everything candle can dequantise; the list is a subset).
fn supported(t: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(
        t,
        F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K | Q8K
    )
}

pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

fn meta<'a>(m: &'a HashMap<String, Value>, key: &str) -> Option<&'a Value> {
    m.get(key)
}

fn meta_u(m: &HashMap<String, Value>, key: &str) -> Result<usize> {
    let v = meta(m, key).with_context(|| format!("GGUF metadata has no '{key}'"))?;
    let n = match v {
        Value::U8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I32(x) if *x >= 0 => *x as u64,
        Value::I64(x) if *x >= 0 => *x as u64,
        other => bail!("GGUF metadata '{key}' is {other:?}, expected an unsigned integer"),
    };
    Ok(n as usize)
}

fn meta_f(m: &HashMap<String, Value>, key: &str) -> Option<f64> {
    match meta(m, key)? {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        _ => None,
    }
}

fn meta_str(m: &HashMap<String, Value>, key: &str) -> Option<String> {
    meta(m, key).and_then(|v| v.to_string().ok()).cloned()
}

fn meta_id(m: &HashMap<String, Value>, key: &str) -> Option<u32> {
    meta_u(m, key).ok().map(|x| x as u32)
}

fn string_array(m: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    let v = meta(m, key).with_context(|| format!("GGUF metadata has no '{key}'"))?;
    v.to_vec()?
        .iter()
        .map(|x| Ok(x.to_string()?.clone()))
        .collect::<candle_core::Result<Vec<_>>>()
        .with_context(|| format!("GGUF metadata '{key}' is not a list of strings"))
}

/// A llama.cpp tensor name in transformers' naming, by the family's own table.
fn hf_name(gguf: &str, names: &Gguf) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = tail.rsplit_once('.')?;
    let (_, hf) = names
        .norm_names
        .iter()
        .chain(GGUF_PROJECTIONS)
        .find(|(g, _)| *g == part)?;
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// llama.cpp's converter interleaves the two rotary halves of each Llama q/k head; undo that so
/// the weights are in transformers' layout and the half-rotation rope applies.
fn unpermute_rope(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    Ok(w.reshape((heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?)
}

pub fn load(path: &Path) -> Result<GgufModel> {
    let shown = path.display().to_string();
    let mut f = File::open(path).with_context(|| format!("cannot open model file {shown}"))?;
    if !is_gguf(path) {
        bail!("{shown} is not a GGUF file (it does not start with the GGUF magic); pass a .gguf file, a Hugging Face folder, or a model alias");
    }
    let content = match Content::read(&mut f) {
        Ok(c) => c,
        Err(e) if e.to_string().contains("unknown dtype") => bail!(
            "{shown} holds a tensor type outlierlab cannot dequantise ({e}); use a GGUF with Q4_0/Q4_1/Q4_K/Q5_0/Q6_K/Q8_0/F16/F32 tensors"
        ),
        Err(e) => bail!("{shown} is truncated or corrupt (cannot read its GGUF header: {e}); delete it and fetch it again"),
    };
    let m = &content.metadata;
    let arch = meta_str(m, "general.architecture")
        .context("GGUF metadata has no 'general.architecture'")?;
    let family = Family::from_name(&arch)?;
    let Some(gguf) = family.arch().gguf.as_ref() else {
        let read: Vec<&str> = ARCHES
            .iter()
            .filter(|a| a.gguf.is_some())
            .map(|a| a.name)
            .collect();
        bail!(
            "{shown}: GGUF files of the {} family are not read ({} are); load its Hugging Face folder (config.json and *.safetensors) instead",
            family.name(),
            read.join(", ")
        );
    };
    let a = |k: &str| format!("{arch}.{k}");
    let hidden_size = meta_u(m, &a("embedding_length"))?;
    let num_heads = meta_u(m, &a("attention.head_count"))?;
    let num_kv_heads = meta_u(m, &a("attention.head_count_kv")).unwrap_or(num_heads);
    let tokens = string_array(m, "tokenizer.ggml.tokens")?;
    let config = Config {
        family,
        hidden_size,
        intermediate_size: meta_u(m, &a("feed_forward_length"))?,
        num_layers: meta_u(m, &a("block_count"))?,
        num_heads,
        num_kv_heads,
        head_dim: meta_u(m, &a("attention.key_length")).unwrap_or(hidden_size / num_heads),
        rms_norm_eps: meta_f(m, &a("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        rope_theta: meta_f(m, &a("rope.freq_base")).unwrap_or(10000.0),
        vocab_size: tokens.len(),
        context_length: meta_u(m, &a("context_length")).unwrap_or(4096),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        sliding_window: None,
        sliding_pattern: 0,
        rope_local_theta: None,
        query_pre_attn_scalar: None,
        final_logit_softcapping: meta_f(m, &a("final_logit_softcapping")),
        attn_logit_softcapping: meta_f(m, &a("attn_logit_softcapping")),
        rope_scaling: None,
        all_sliding: false,
        attention_bias: false,
    };
    let mut config = config;
    let number = |k: &str| {
        let k = a(k);
        meta_u(m, &k)
            .ok()
            .map(|x| x as f64)
            .or_else(|| meta_f(m, &k))
    };
    (gguf.read_meta)(&number, &mut config);
    config.validate()?;

    let token_types = match meta(m, "tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()?
            .iter()
            .map(|x| x.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let vocab = GgufVocab {
        arch: arch.clone(),
        model: meta_str(m, "tokenizer.ggml.model").unwrap_or_else(|| "gpt2".into()),
        pre: meta_str(m, "tokenizer.ggml.pre").unwrap_or_else(|| "default".into()),
        merges: string_array(m, "tokenizer.ggml.merges").unwrap_or_default(),
        tokens,
        token_types,
        bos: meta_id(m, "tokenizer.ggml.bos_token_id"),
        eos: meta_id(m, "tokenizer.ggml.eos_token_id"),
        pad: meta_id(m, "tokenizer.ggml.padding_token_id"),
    };

    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for n in &names {
        let t = content.tensor_infos[*n].ggml_dtype;
        if !supported(t) {
            bail!("{shown}: tensor '{n}' has type {t:?}, which outlierlab cannot dequantise; use a GGUF with Q4_0/Q4_1/Q4_K/Q5_0/Q6_K/Q8_0/F16/F32 tensors");
        }
    }
    // Each tensor is dequantised when the model takes it (a bf16 model packs each layer as it
    // is built), so the whole checkpoint is never held in f32 at once.
    let by_hf: HashMap<String, String> = names
        .iter()
        .filter_map(|n| hf_name(n, gguf).map(|h| (h, n.to_string())))
        .collect();
    let chat_template = meta_str(m, "tokenizer.chat_template");
    let name = meta_str(m, "general.name");
    let origin = shown.clone();
    let reader = move |hf: &str| -> Result<Option<Tensor>> {
        let Some(n) = by_hf.get(hf) else {
            return Ok(None);
        };
        let q = content.tensor(&mut f, n, &Device::Cpu).with_context(|| {
            format!("{origin} is truncated or corrupt (tensor '{n}'); delete it and fetch it again")
        })?;
        let mut t = q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
        if gguf.rope_interleaved {
            if hf.ends_with("q_proj.weight") {
                t = unpermute_rope(&t, num_heads)?;
            } else if hf.ends_with("k_proj.weight") {
                t = unpermute_rope(&t, num_kv_heads)?;
            }
        }
        if gguf.norm_plus_one && hf.ends_with("norm.weight") {
            t = (t - 1.0)?;
        }
        if t.dims().contains(&0) {
            bail!("{origin}: tensor '{n}' is empty");
        }
        let values_ok = t.flatten_all()?.sum_all()?.to_scalar::<f32>()?.is_finite();
        if !values_ok {
            bail!("{origin}: tensor '{n}' holds NaN or infinite values; the file is corrupt");
        }
        Ok(Some(t))
    };
    Ok(GgufModel {
        config,
        weights: Weights::reading(Box::new(reader), shown),
        vocab,
        chat_template,
        name,
    })
}

/// The layer count from a GGUF header alone (no tensor data read).
pub fn layer_count(path: &Path) -> Result<usize> {
    let shown = path.display().to_string();
    let mut f = File::open(path).with_context(|| format!("cannot open model file {shown}"))?;
    if !is_gguf(path) {
        bail!("{shown} is not a GGUF file (it does not start with the GGUF magic)");
    }
    let content = Content::read(&mut f)
        .map_err(|e| anyhow::anyhow!("{shown}: cannot read its GGUF header: {e}"))?;
    let m = &content.metadata;
    let arch = meta_str(m, "general.architecture")
        .context("GGUF metadata has no 'general.architecture'")?;
    meta_u(m, &format!("{arch}.block_count"))
}
