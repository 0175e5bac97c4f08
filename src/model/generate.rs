//! Greedy decoding of a left-padded batch, with a KV cache, each sequence stopped at its own EOS.

use super::{Batch, KvCache, Logits, Model};
use anyhow::{bail, Result};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Token ids that end a sequence (kept in its output, as transformers does).
    pub stop_ids: Vec<u32>,
    pub pad_id: u32,
    /// Recompute the whole sequence at every step instead of caching keys and values. Slow;
    /// exists so tests can prove the cache changes nothing.
    pub use_cache: bool,
}

fn argmax(row: &[f32]) -> u32 {
    // First index of the maximum, as torch.argmax.
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// New tokens for each prompt (stop token included when one was produced).
pub fn greedy(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<Vec<Vec<u32>>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        bail!("prompt {i} has no tokens");
    }
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    if longest + opts.max_new_tokens > model.config.context_length {
        bail!(
            "a prompt of {longest} tokens plus {} new tokens exceeds the model's context of {}; shorten the prompt or lower --max-new-tokens",
            opts.max_new_tokens,
            model.config.context_length
        );
    }
    let batch = Batch::left_padded(prompts, opts.pad_id);
    let n = batch.len();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut done = vec![false; n];
    if opts.max_new_tokens == 0 {
        return Ok(out);
    }
    let mut caches: Vec<KvCache> = model.new_caches();
    let mut ids = batch.ids.clone();
    let mut mask = batch.mask.clone();
    let mut positions = batch.positions();
    let first = model.step(
        &ids,
        &positions,
        &mask,
        if opts.use_cache {
            Some(&mut caches)
        } else {
            None
        },
        false,
        Logits::Last,
    )?;
    let mut logits = first.logits.expect("asked for logits").to_vec2::<f32>()?;
    let mut next_pos: Vec<u32> = positions
        .iter()
        .map(|p| p.last().copied().unwrap_or(0) + 1)
        .collect();
    for step in 0..opts.max_new_tokens {
        let mut tokens = vec![opts.pad_id; n];
        for b in 0..n {
            if done[b] {
                continue;
            }
            let t = argmax(&logits[b]);
            tokens[b] = t;
            out[b].push(t);
            if opts.stop_ids.contains(&t) {
                done[b] = true;
            }
        }
        if done.iter().all(|&d| d) || step + 1 == opts.max_new_tokens {
            break;
        }
        for (b, m) in mask.iter_mut().enumerate() {
            // Finished rows keep running (batch shapes stay fixed) but nothing reads them.
            m.push(if done[b] { 0 } else { 1 });
        }
        let res = if opts.use_cache {
            let step_ids: Vec<Vec<u32>> = tokens.iter().map(|&t| vec![t]).collect();
            let step_pos: Vec<Vec<u32>> = next_pos.iter().map(|&p| vec![p]).collect();
            model.step(
                &step_ids,
                &step_pos,
                &mask,
                Some(&mut caches),
                false,
                Logits::Last,
            )?
        } else {
            for (b, row) in ids.iter_mut().enumerate() {
                row.push(tokens[b]);
                positions[b].push(next_pos[b]);
            }
            model.step(&ids, &positions, &mask, None, false, Logits::Last)?
        };
        logits = res.logits.expect("asked for logits").to_vec2::<f32>()?;
        for p in next_pos.iter_mut() {
            *p += 1;
        }
    }
    Ok(out)
}
