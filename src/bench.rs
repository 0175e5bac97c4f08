//! `outlierlab bench`: throughput figures for the runtime, printed as numbers and as fractions of
//! this machine's measured f32 matmul throughput. Benchmarks, not tests: nothing here asserts a
//! speed.

use crate::model::generate::{self, GenerateOptions};
use crate::model::{Batch, LoadedModel, Logits};
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::time::Instant;

/// Prompts of mixed length, as an evaluation batch would have; benches/torch_baseline.py reads
/// the same file.
pub fn bench_prompts() -> Vec<&'static str> {
    include_str!("../benches/prompts.txt")
        .lines()
        .filter(|l| !l.is_empty())
        .collect()
}

pub struct BenchReport {
    pub matmul_gflops: f64,
    /// The bf16 kernel's rate on the same shape, where the CPU has it.
    pub bf16_matmul_gflops: Option<f64>,
    pub prefill_tokens_per_s: f64,
    pub prefill_gflops: f64,
    /// None when decoding was too short to time against the prefill (a few tokens).
    pub decode_tokens_per_s: Option<f64>,
    pub decode_gflops: Option<f64>,
    pub batch: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
}

/// f32 matmul throughput of this machine through candle (the same gemm the model uses), on a
/// shape like the model's largest projections.
pub fn matmul_gflops(m: usize, k: usize, n: usize) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
    let _ = a.matmul(&b.t()?)?; // warm-up
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = Instant::now();
        let _c = a.matmul(&b.t()?)?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

/// The bf16 kernel's throughput (bf16 weights, f32 in and out) on the same kind of shape.
pub fn bf16_matmul_gflops(m: usize, k: usize, n: usize) -> Option<f64> {
    use crate::model::bf16;
    if !bf16::available() {
        return None;
    }
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let w = bf16::Packed::new(
        &(0..n * k)
            .map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5)
            .collect::<Vec<_>>(),
        n,
        k,
    );
    let _ = bf16::matmul_t(&x, m, &w);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = Instant::now();
        let _ = bf16::matmul_t(&x, m, &w);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Some(2.0 * (m * k * n) as f64 / best / 1e9)
}

/// This process's resident memory (Linux), MB.
pub fn resident_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0 / 1e6)
}

/// FLOPs per token through the decoder weights (two per multiply-add; attention scores are left
/// out, small at these lengths). The output head is counted where it runs: once per sequence in
/// prefill, once per token in decoding.
pub fn flops_per_token(lm: &LoadedModel) -> f64 {
    let c = &lm.model.config;
    let d = c.hidden_size as f64;
    let attn = d * (c.num_heads * c.head_dim) as f64 * 2.0
        + d * (c.num_kv_heads * c.head_dim) as f64 * 2.0;
    let mlp = 3.0 * d * c.intermediate_size as f64;
    2.0 * c.num_layers as f64 * (attn + mlp)
}

pub fn run(
    lm: &LoadedModel,
    batch: usize,
    new_tokens: usize,
    repeats: usize,
) -> Result<BenchReport> {
    let c = &lm.model.config;
    let matmul = matmul_gflops(batch * 32, c.hidden_size, c.intermediate_size)?;
    let bf16_matmul = bf16_matmul_gflops(batch * 32, c.hidden_size, c.intermediate_size);
    let enc = bench_prompts()
        .iter()
        .cycle()
        .take(batch)
        .map(|p| lm.encode_chat(Some(crate::model::chat::DEFAULT_SYSTEM_PROMPT), p))
        .collect::<Result<Vec<_>>>()?;
    let b: Batch = lm.batch(&enc);
    let prompt_tokens: usize = enc.iter().map(|e| e.ids.len()).sum();
    let per_tok = flops_per_token(lm);
    let head = 2.0 * (c.hidden_size * c.vocab_size) as f64;

    let _ = lm.model.forward(&b, false, Logits::Last)?;
    let mut prefill = f64::MAX;
    for _ in 0..repeats {
        let t0 = Instant::now();
        let _ = lm.model.forward(&b, false, Logits::Last)?;
        prefill = prefill.min(t0.elapsed().as_secs_f64());
    }
    // Every sequence runs to the limit (no stop ids), so the count of decoded tokens is exact.
    let opts = GenerateOptions {
        max_new_tokens: new_tokens + 1,
        stop_ids: vec![],
        pad_id: lm.tokenizer.pad_id,
        use_cache: true,
    };
    let ids: Vec<Vec<u32>> = enc.iter().map(|e| e.ids.clone()).collect();
    // Decoding's time is generation's less the prefill generation itself runs — which computes
    // the shared chat-template head once, so it is quicker than the padded forward timed above
    // (the like-for-like prefill figure); subtracting that one would flatter decoding.
    let mut decode = f64::MAX;
    let mut own_prefill_best = f64::MAX;
    for _ in 0..repeats {
        let t0 = Instant::now();
        let _ = generate::prefill(
            &lm.model,
            &ids,
            lm.tokenizer.pad_id,
            &mut lm.model.new_caches(),
        )?;
        let own_prefill = t0.elapsed().as_secs_f64();
        own_prefill_best = own_prefill_best.min(own_prefill);
        let t1 = Instant::now();
        let _ = generate::greedy(&lm.model, &ids, &opts)?;
        decode = decode.min(t1.elapsed().as_secs_f64() - own_prefill);
    }
    let decoded = batch * new_tokens;
    let prefill_tps = prompt_tokens as f64 / prefill;
    // A few tokens' decoding is within the noise of the prefill it is measured against.
    let decode = (decoded > 0 && decode > 0.02 * own_prefill_best).then_some(decode);
    // Padded positions are computed too, but only real tokens count as throughput.
    let padded_tokens = (b.len() * b.seq_len()) as f64;
    Ok(BenchReport {
        matmul_gflops: matmul,
        bf16_matmul_gflops: bf16_matmul,
        prefill_tokens_per_s: prefill_tps,
        prefill_gflops: (padded_tokens * per_tok + batch as f64 * head) / prefill / 1e9,
        decode_tokens_per_s: decode.map(|d| decoded as f64 / d),
        decode_gflops: decode.map(|d| decoded as f64 * (per_tok + head) / d / 1e9),
        batch,
        prompt_tokens,
        new_tokens,
    })
}
