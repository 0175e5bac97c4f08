//! Writing a (possibly edited) model as a Hugging Face folder: model.safetensors, config.json,
//! tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json.

use crate::model::{LoadedModel, Model};
use anyhow::{anyhow, Context, Result};
use candle_core::DType;
use std::collections::HashMap;
use std::path::Path;

/// Every tensor of `model` under its Hugging Face name, in `dtype`, as `file` (safetensors).
pub fn write_weights(model: &Model, file: &Path, dtype: DType) -> Result<()> {
    let tensors: HashMap<String, candle_core::Tensor> = model
        .named_tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(dtype)?.contiguous()?)))
        .collect::<Result<_>>()?;
    crate::fs::write_atomic_at(file, |tmp| {
        Ok(candle_core::safetensors::save(&tensors, tmp)?)
    })
}

pub fn write_hf_folder(lm: &LoadedModel, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_weights(&lm.model, &out.join("model.safetensors"), DType::F32)?;
    let tok = &lm.tokenizer;
    let id = |t: &Option<String>| t.as_deref().and_then(|s| tok.inner.token_to_id(s));
    let eos = tok.stop_ids.first().copied().or(id(&tok.eos_token));
    let config = lm.model.config.to_hf_json(id(&tok.bos_token), eos);
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    tok.inner
        .save(out.join("tokenizer.json"), false)
        .map_err(|e| anyhow!("cannot write tokenizer.json: {e}"))?;
    let tcfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.inner.id_to_token(tok.pad_id),
        "padding_side": "left",
        "add_bos_token": false,
        "chat_template": lm.chat.source(),
    });
    std::fs::write(
        out.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tcfg)?,
    )?;
    let gen = serde_json::json!({"eos_token_id": tok.stop_ids, "pad_token_id": tok.pad_id, "do_sample": false});
    std::fs::write(
        out.join("generation_config.json"),
        serde_json::to_string_pretty(&gen)?,
    )?;
    Ok(())
}
