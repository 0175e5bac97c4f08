//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// Reference values made with transformers and PR #154's code, committed in
/// tests/fixtures/reference (their README says how each was made); OUTLIERLAB_FIXTURES points
/// elsewhere, e.g. at a newer set to compare against.
pub fn fixtures_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("OUTLIERLAB_FIXTURES") {
        return PathBuf::from(d);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")
}

pub fn fixture(name: &str) -> serde_json::Value {
    let p = fixtures_dir().join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| {
        panic!(
            "cannot read fixture {}: {e} (set OUTLIERLAB_FIXTURES)",
            p.display()
        )
    });
    serde_json::from_str(&text).expect("fixture is JSON")
}

pub fn as_u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("int") as u32)
        .collect()
}

pub fn as_f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_outlierlab")
}

/// Deterministic pseudo-random numbers in [-scale, scale).
pub fn noise(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Writes a tiny Llama (2 layers, d=16, byte-level vocabulary) as a Hugging Face folder:
/// config.json, model.safetensors, tokenizer.json, tokenizer_config.json.
pub fn write_tiny_llama(dir: &std::path::Path) {
    use candle_core::{Device, Tensor};
    use outlierlab::model::gguf::GgufVocab;
    use outlierlab::model::tokenizer::TextTokenizer;
    std::fs::create_dir_all(dir).unwrap();
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort();
    let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    let mut types = vec![1; tokens.len()];
    for special in ["<|im_start|>", "<|im_end|>"] {
        tokens.push(special.to_string());
        types.push(3);
    }
    let vocab = tokens.len();
    let eos = (vocab - 1) as u32;
    let tok = TextTokenizer::from_gguf(&GgufVocab {
        arch: "llama".into(),
        model: "gpt2".into(),
        pre: "gpt2".into(),
        tokens,
        token_types: types,
        merges: vec![],
        bos: None,
        eos: Some(eos),
        pad: None,
    })
    .unwrap();
    tok.inner.save(dir.join("tokenizer.json"), false).unwrap();
    let (d, ff, layers, heads, kv, hd) = (16usize, 32usize, 2usize, 4usize, 2usize, 4usize);
    let config = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d,
        "intermediate_size": ff, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": hd, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "vocab_size": vocab, "max_position_embeddings": 256, "tie_word_embeddings": true,
        "eos_token_id": eos,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tcfg = serde_json::json!({
        "eos_token": "<|im_end|>",
        "chat_template": outlierlab::model::chat::CHATML,
    });
    std::fs::write(dir.join("tokenizer_config.json"), tcfg.to_string()).unwrap();
    let mut tensors = std::collections::HashMap::new();
    let mut seed = 1u64;
    let mut put = |name: String, dims: Vec<usize>, scale: f32, ones: bool| {
        let n: usize = dims.iter().product();
        seed += 1;
        let data = if ones {
            vec![1.0f32; n]
        } else {
            noise(n, seed, scale)
        };
        tensors.insert(name, Tensor::from_vec(data, dims, &Device::Cpu).unwrap());
    };
    put(
        "model.embed_tokens.weight".into(),
        vec![vocab, d],
        1.0,
        false,
    );
    put("model.norm.weight".into(), vec![d], 0.0, true);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), vec![d], 0.0, true);
        put(
            format!("{p}.post_attention_layernorm.weight"),
            vec![d],
            0.0,
            true,
        );
        put(
            format!("{p}.self_attn.q_proj.weight"),
            vec![heads * hd, d],
            0.3,
            false,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv * hd, d],
            0.3,
            false,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv * hd, d],
            0.3,
            false,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            vec![d, heads * hd],
            0.3,
            false,
        );
        put(format!("{p}.mlp.gate_proj.weight"), vec![ff, d], 0.3, false);
        put(format!("{p}.mlp.up_proj.weight"), vec![ff, d], 0.3, false);
        put(format!("{p}.mlp.down_proj.weight"), vec![d, ff], 0.3, false);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

/// Largest absolute value of a tensor.
pub fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The bit patterns of a tensor's values, for bit-exact comparisons.
pub fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// Next-token logits at the last position of every row of `batch`.
pub fn last_logits(
    m: &outlierlab::model::Model,
    batch: &outlierlab::model::Batch,
) -> candle_core::Tensor {
    m.forward(batch, false, outlierlab::model::Logits::Last)
        .unwrap()
        .logits
        .unwrap()
}
