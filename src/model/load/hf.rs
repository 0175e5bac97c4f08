//! Hugging Face folders (config.json, *.safetensors, tokenizer.json) and the Hub route
//! `hf:ORG/NAME[@REVISION]` through hf-hub, which honours HF_ENDPOINT and HF_HOME.

use crate::model::{Config, Weights};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

pub fn is_hf_folder(dir: &Path) -> bool {
    dir.join("config.json").is_file()
}

/// A folder's config and its weights, read one tensor at a time from the memory-mapped
/// safetensors files as the model takes them (each converted to f32 alone, so the checkpoint is
/// never held in f32 whole). With `model.safetensors.index.json`, every shard it names must be
/// there.
pub fn load_folder(dir: &Path) -> Result<(Config, Weights)> {
    let shown = dir.display().to_string();
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let config =
        Config::from_hf_json(&text).with_context(|| format!("in {}", cfg_path.display()))?;
    let files = safetensors_files(dir)?;
    // SAFETY: the files are mapped read-only; a checkpoint rewritten while it loads would give
    // wrong weights, as it would to transformers.
    let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| {
        anyhow!("{shown}: a safetensors file cannot be read (truncated or corrupt?): {e}")
    })?;
    let names: HashSet<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    let origin = shown.clone();
    let reader = move |name: &str| -> Result<Option<Tensor>> {
        if !names.contains(name) {
            return Ok(None);
        }
        let view = st
            .get(name)
            .map_err(|e| anyhow!("{origin}: tensor '{name}': {e}"))?;
        let dtype = view.dtype();
        if !matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            bail!(
                "{origin}: tensor '{name}' is stored as {dtype:?}; outlierlab reads f32, bf16 and f16 safetensors (a quantised checkpoint? use its unquantised original, or a GGUF file)"
            );
        }
        let t = st.load(name, &Device::Cpu).map_err(|e| {
            anyhow!("{origin}: tensor '{name}' cannot be read (truncated or corrupt?): {e}")
        })?;
        Ok(Some(t.to_dtype(DType::F32)?))
    };
    Ok((config, Weights::reading(Box::new(reader), shown)))
}

/// The safetensors files of a folder: those its index names (each must exist), else every
/// `*.safetensors` in it.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let shown = dir.display();
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no `weight_map` object", index.display()))?;
        // Distinct and in name order, as the folder listing below.
        let files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(|f| dir.join(f))
            .collect();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            bail!(
                "{}: shard {} is missing ({} names {} shard(s)); download it again (e.g. `huggingface-cli download` the repository)",
                shown,
                missing.display(),
                index.display(),
                files.len()
            );
        }
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the folder {shown}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{shown} has no *.safetensors weights; a Hugging Face folder needs config.json, *.safetensors and tokenizer.json");
    }
    Ok(files)
}

/// The chat template of a folder: chat_template.jinja, else tokenizer_config.json's
/// `chat_template` (a string, or a list of named templates of which we take "default").
pub fn chat_template(dir: &Path) -> Option<String> {
    if let Ok(s) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return Some(s);
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?)
            .ok()?;
    match v.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(String::from)),
        _ => None,
    }
}

/// Splits `ORG/NAME[@REVISION]`.
pub fn parse_hub_id(spec: &str) -> Result<(String, String)> {
    let (id, rev) = match spec.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (spec, "main"),
    };
    if id.split('/').count() != 2 || id.split('/').any(|p| p.is_empty()) || rev.is_empty() {
        bail!("'hf:{spec}' is not a Hub model id; write hf:ORG/NAME or hf:ORG/NAME@REVISION");
    }
    Ok((id.to_string(), rev.to_string()))
}

/// Downloads (or finds in the HF cache) the files a model folder needs; returns the snapshot dir.
pub fn download(spec: &str) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};
    let (id, rev) = parse_hub_id(spec)?;
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| anyhow!("cannot set up the Hugging Face Hub client: {e}"))?;
    let repo = api.repo(Repo::with_revision(
        id.clone(),
        RepoType::Model,
        rev.clone(),
    ));
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let info = repo.info().map_err(|e| {
        anyhow!("cannot reach the Hugging Face Hub for {id}@{rev} at {endpoint}: {e}; without internet use a model alias (`outlierlab models`) or a local path")
    })?;
    let mut wanted: Vec<String> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.clone())
        .filter(|f| !f.contains('/'))
        .filter(|f| {
            f.ends_with(".safetensors")
                || matches!(
                    f.as_str(),
                    "config.json"
                        | "tokenizer.json"
                        | "tokenizer_config.json"
                        | "chat_template.jinja"
                        | "generation_config.json"
                )
        })
        .collect();
    wanted.sort();
    for need in ["config.json", "tokenizer.json"] {
        if !wanted.iter().any(|f| f == need) {
            bail!("hf:{spec} has no {need}; outlierlab loads Hub models in the safetensors layout");
        }
    }
    let mut dir = None;
    for f in &wanted {
        let p = repo
            .get(f)
            .map_err(|e| anyhow!("downloading {f} of {id}@{rev} from {endpoint} failed: {e}"))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    dir.context("the Hub listed no files")
}
