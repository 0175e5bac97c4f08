//! Greedy decoding of a left-padded batch, with a KV cache, each sequence stopped at its own EOS.
//! Finished sequences leave the batch, so a batch where most replies end early costs little.

use super::{Batch, KvCache, Logits, Model};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

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

/// New tokens for each prompt (stop token included when one was produced).
pub fn greedy(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<Vec<Vec<u32>>> {
    greedy_until(model, prompts, opts, &|_: &[u32]| false)
}

/// As `greedy`, and a sequence also stops as soon as `decided(tokens so far)` says its outcome
/// is settled (e.g. a refusal marker has appeared).
pub fn greedy_until(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    decided: &dyn Fn(&[u32]) -> bool,
) -> Result<Vec<Vec<u32>>> {
    Ok(greedy_with_first_logits(model, prompts, opts, decided)?.0)
}

/// As `greedy_until`, also returning the logits of the first generated token `[batch, vocab]`
/// (the prefill's output), so a caller that needs both pays for one prefill.
pub fn greedy_with_first_logits(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    decided: &dyn Fn(&[u32]) -> bool,
) -> Result<(Vec<Vec<u32>>, Option<Tensor>)> {
    if prompts.is_empty() {
        return Ok((Vec::new(), None));
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
    let n = prompts.len();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
    let batch = Batch::left_padded(prompts, opts.pad_id);
    // Rows still running, as indices into `prompts`; the tensors below hold only these rows.
    let mut active: Vec<usize> = (0..n).collect();
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
    let first_logits = first.logits.expect("asked for logits");
    if opts.max_new_tokens == 0 {
        return Ok((out, Some(first_logits)));
    }
    let mut logits = argmax_rows(&first_logits)?;
    let mut next_pos: Vec<u32> = positions
        .iter()
        .map(|p| p.last().copied().unwrap_or(0) + 1)
        .collect();
    for step in 0..opts.max_new_tokens {
        let mut tokens = Vec::with_capacity(active.len());
        let mut keep = Vec::with_capacity(active.len());
        for (row, &b) in active.iter().enumerate() {
            let t = logits[row];
            out[b].push(t);
            tokens.push(t);
            let finished = opts.stop_ids.contains(&t) || decided(&out[b]);
            if !finished {
                keep.push(row);
            }
        }
        if keep.is_empty() || step + 1 == opts.max_new_tokens {
            break;
        }
        if keep.len() < active.len() {
            // Drop finished rows from every per-row structure and from the KV caches.
            let pick = |v: &mut Vec<Vec<u32>>| {
                *v = keep.iter().map(|&r| std::mem::take(&mut v[r])).collect()
            };
            pick(&mut ids);
            pick(&mut positions);
            mask = keep.iter().map(|&r| std::mem::take(&mut mask[r])).collect();
            tokens = keep.iter().map(|&r| tokens[r]).collect();
            next_pos = keep.iter().map(|&r| next_pos[r]).collect();
            active = keep.iter().map(|&r| active[r]).collect();
            if opts.use_cache {
                let idx = Tensor::from_vec(
                    keep.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                    keep.len(),
                    &Device::Cpu,
                )?;
                for c in caches.iter_mut() {
                    if let (Some(k), Some(v)) = (&c.k, &c.v) {
                        c.k = Some(k.index_select(&idx, 0)?);
                        c.v = Some(v.index_select(&idx, 0)?);
                    }
                }
            }
        }
        for m in mask.iter_mut() {
            m.push(1);
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
            for (row, r) in ids.iter_mut().enumerate() {
                r.push(tokens[row]);
                positions[row].push(next_pos[row]);
            }
            model.step(&ids, &positions, &mask, None, false, Logits::Last)?
        };
        logits = argmax_rows(&res.logits.expect("asked for logits"))?;
        for p in next_pos.iter_mut() {
            *p += 1;
        }
    }
    Ok((out, Some(first_logits)))
}

/// The greedy token of each row of `[batch, vocab]` logits, without copying the logits out.
fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?)
}
