//! Text ↔ token ids. Uses tokenizer.json when the model ships one; otherwise builds the same
//! byte-level BPE from the vocabulary, merges and token types inside the GGUF.

use crate::model::gguf::GgufVocab;
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Map, Value};
use std::path::Path;
use tokenizers::Tokenizer;

pub struct TextTokenizer {
    pub inner: Tokenizer,
    /// Tokens that end a reply (the GGUF/config EOS plus the chat end-of-turn markers).
    pub stop_ids: Vec<u32>,
    pub pad_id: u32,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

/// GGUF token types (llama.cpp): 3 = control, 4 = user-defined.
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// The pre-tokenizer regex of Qwen2 (tokenizer.json `pre_tokenizer.pretokenizers[0]`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's (llama-bpe), for GGUFs that name it.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The GGUF's control tokens as special added tokens and its user-defined ones (those the
/// vocabulary spells as the file does) as plain ones, so neither is cut into pieces — as
/// transformers adds them.
fn added_tokens(v: &GgufVocab, vocab: &Map<String, Value>) -> Vec<Value> {
    v.tokens
        .iter()
        .enumerate()
        .filter_map(|(id, tok)| {
            let ty = v.token_types.get(id).copied().unwrap_or(1);
            (ty == CONTROL || (ty == USER_DEFINED && vocab.contains_key(tok))).then(|| {
                json!({
                    "id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == CONTROL,
                })
            })
        })
        .collect()
}

impl TextTokenizer {
    pub fn from_gguf(v: &GgufVocab) -> Result<TextTokenizer> {
        if v.model == "llama" && v.arch.starts_with("gemma") {
            return Self::gemma_from_gguf(v);
        }
        if v.model != "gpt2" {
            bail!(
                "GGUF tokenizer model '{}' is not supported (only byte-level BPE, 'gpt2'); \
                 put a tokenizer.json beside the model and load it as a Hugging Face folder",
                v.model
            );
        }
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": use_regex});
        let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
        let (normalizer, pre) = match v.pre.as_str() {
            // SmolLM2: digits one by one, then GPT-2's byte-level split.
            "smollm" => (
                Value::Null,
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            ),
            "qwen2" => (
                json!({"type": "NFC"}),
                json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
            ),
            "llama-bpe" | "llama3" => (
                Value::Null,
                json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
            ),
            "gpt2" | "default" => (Value::Null, byte_level(true)),
            other => bail!(
                "GGUF pre-tokenizer '{other}' is not supported (smollm, qwen2, llama-bpe, gpt2 are); \
                 put a tokenizer.json beside the model and load it as a Hugging Face folder"
            ),
        };
        let mut vocab = Map::with_capacity(v.tokens.len());
        for (id, tok) in v.tokens.iter().enumerate() {
            vocab.insert(tok.clone(), json!(id));
        }
        let added = added_tokens(v, &vocab);
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": v.merges,
            },
        });
        Self::from_gguf_spec(v, spec)
    }

    /// The tokenizer a tokenizer.json-shaped `spec` describes, with the GGUF's special tokens.
    fn from_gguf_spec(v: &GgufVocab, spec: Value) -> Result<TextTokenizer> {
        let inner: Tokenizer = serde_json::from_value(spec).map_err(|e| {
            anyhow!(
                "cannot build a tokenizer from the GGUF vocabulary ({}): {e}",
                v.arch
            )
        })?;
        let name = |id: Option<u32>| id.and_then(|i| v.tokens.get(i as usize).cloned());
        let mut t = TextTokenizer {
            inner,
            stop_ids: Vec::new(),
            pad_id: v.pad.or(v.eos).unwrap_or(0),
            bos_token: name(v.bos),
            eos_token: name(v.eos),
        };
        t.stop_ids = t.default_stop_ids(v.eos);
        Ok(t)
    }

    /// Gemma's sentencepiece vocabulary as a byte-fallback BPE, built as transformers builds it
    /// from a GGUF (which lists no merges): tokens made only of spaces respelled with "▁", and
    /// merges recovered from the vocabulary — every split of a token into two tokens, ordered by
    /// the token's position in the file (earlier first), then by the longer left piece.
    fn gemma_from_gguf(v: &GgufVocab) -> Result<TextTokenizer> {
        let tokens: Vec<String> = v
            .tokens
            .iter()
            .map(|t| {
                if !t.is_empty() && t.chars().all(|c| c == ' ') {
                    "\u{2581}".repeat(t.chars().count())
                } else {
                    t.clone()
                }
            })
            .collect();
        // A token spelled twice keeps its last id (as a Python dict does), but its first place.
        let mut id_of: std::collections::HashMap<&str, usize> = Default::default();
        let mut order: Vec<&str> = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            if id_of.insert(t.as_str(), i).is_none() {
                order.push(t.as_str());
            }
        }
        // (score = −id of the merged token, len left, len right, left, right), best first.
        let mut merges: Vec<(i64, usize, usize, &str, &str)> = Vec::new();
        for tok in &order {
            let score = -(id_of[tok] as i64);
            let cuts: Vec<usize> = tok.char_indices().map(|(i, _)| i).skip(1).collect();
            let mut local: Vec<(usize, usize, &str, &str)> = Vec::new();
            for c in cuts {
                let (l, r) = tok.split_at(c);
                if let (Some(&il), Some(&ir)) = (id_of.get(l), id_of.get(r)) {
                    local.push((il, ir, l, r));
                }
            }
            local.sort_by_key(|x| (x.0, x.1));
            for (_, _, l, r) in local {
                merges.push((score, l.chars().count(), r.chars().count(), l, r));
            }
        }
        // Python's stable sort with reverse=True: descending keys, equal keys in first order.
        merges.sort_by_key(|m| std::cmp::Reverse((m.0, m.1, m.2)));
        let merges: Vec<Value> = merges.iter().map(|m| json!([m.3, m.4])).collect();
        let mut vocab = Map::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), json!(i));
        }
        let added = added_tokens(v, &vocab);
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
            "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"}
            ]},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": "<unk>",
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        });
        Self::from_gguf_spec(v, spec)
    }

    /// tokenizer.json plus the special tokens named in tokenizer_config.json / config.json.
    pub fn from_hf_folder(dir: &Path) -> Result<TextTokenizer> {
        let path = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
        let tcfg: Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null);
        let cfg: Value = std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null);
        let token_str = |key: &str| -> Option<String> {
            match tcfg.get(key)? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content")?.as_str().map(String::from),
                _ => None,
            }
        };
        let bos_token = token_str("bos_token");
        let eos_token = token_str("eos_token");
        let eos_id = eos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .or_else(|| {
                cfg.get("eos_token_id")
                    .and_then(|x| x.as_u64())
                    .map(|x| x as u32)
            });
        let pad_id = token_str("pad_token")
            .and_then(|t| inner.token_to_id(&t))
            .or(eos_id)
            .unwrap_or(0);
        let mut t = TextTokenizer {
            inner,
            stop_ids: Vec::new(),
            pad_id,
            bos_token,
            eos_token,
        };
        t.stop_ids = t.default_stop_ids(eos_id);
        Ok(t)
    }

    fn default_stop_ids(&self, eos: Option<u32>) -> Vec<u32> {
        let mut ids: Vec<u32> = eos.into_iter().collect();
        for marker in [
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "<end_of_turn>",
            "</s>",
        ] {
            if let Some(id) = self.inner.token_to_id(marker) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// Encodes already-rendered chat text. Special tokens in the text are matched; nothing is
    /// added (the chat template writes any BOS itself).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes a reply, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("decoding failed: {e}"))
    }

    pub fn token_text(&self, id: u32) -> String {
        self.inner
            .decode(&[id], false)
            .unwrap_or_else(|_| self.inner.id_to_token(id).unwrap_or_default())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
