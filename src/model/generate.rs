//! Greedy decoding of a left-padded batch, with a KV cache, each sequence stopped at its own EOS.
//! Finished sequences leave the batch, so a batch where most replies end early costs little.

use super::{argmax_rows, Batch, KvCache, Logits, Model};
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
    // Rows still running, as indices into `prompts`; the tensors below hold only these rows.
    let mut active: Vec<usize> = (0..n).collect();
    let mut caches: Vec<KvCache> = model.new_caches();
    let (mut ids, mut mask, mut positions, first_logits) = if opts.use_cache {
        let p = prefill(model, prompts, opts.pad_id, &mut caches)?;
        for c in caches.iter_mut() {
            c.reserve(opts.max_new_tokens)?;
        }
        // With a cache only the key mask and the next positions are read from here on.
        (Vec::new(), p.mask, p.positions, p.logits)
    } else {
        let batch = Batch::left_padded(prompts, opts.pad_id);
        let positions = batch.positions();
        let first = model.step(
            &batch.ids,
            &positions,
            &batch.mask,
            None,
            false,
            Logits::Last,
        )?;
        let logits = first.logits.expect("asked for logits");
        (batch.ids, batch.mask, positions, logits)
    };
    if opts.max_new_tokens == 0 {
        return Ok((out, Some(first_logits)));
    }
    let mut next = argmax_rows(&first_logits)?;
    let mut next_pos: Vec<u32> = positions
        .iter()
        .map(|p| p.last().copied().unwrap_or(0) + 1)
        .collect();
    for step in 0..opts.max_new_tokens {
        let mut tokens = Vec::with_capacity(active.len());
        let mut keep = Vec::with_capacity(active.len());
        for (row, &b) in active.iter().enumerate() {
            let t = next[row];
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
                if !v.is_empty() {
                    *v = keep.iter().map(|&r| std::mem::take(&mut v[r])).collect()
                }
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
                    c.select_rows(&idx)?;
                }
            }
        }
        for m in mask.iter_mut() {
            m.push(1);
        }
        next = if opts.use_cache {
            let step_ids: Vec<Vec<u32>> = tokens.iter().map(|&t| vec![t]).collect();
            let step_pos: Vec<Vec<u32>> = next_pos.iter().map(|&p| vec![p]).collect();
            model
                .step(
                    &step_ids,
                    &step_pos,
                    &mask,
                    Some(&mut caches),
                    false,
                    Logits::LastArgmax,
                )?
                .next
                .expect("asked for the next tokens")
        } else {
            for (row, r) in ids.iter_mut().enumerate() {
                r.push(tokens[row]);
                positions[row].push(next_pos[row]);
            }
            let res = model.step(&ids, &positions, &mask, None, false, Logits::Last)?;
            argmax_rows(&res.logits.expect("asked for logits"))?
        };
        for p in next_pos.iter_mut() {
            *p += 1;
        }
    }
    Ok((out, Some(first_logits)))
}

/// The largest f32 activation one prefill pass makes (rows × padded length × the MLP's width);
/// see `prefill`. Under the 32 MiB above which glibc maps each allocation afresh
/// (`util::keep_freed_memory`): 1,617 positions on Qwen 0.5B, 877 on Qwen 1.5B.
const PREFILL_BYTES: usize = 30 << 20;
/// The bound on a pass never falls below this many positions, so a model whose MLP is wider than
/// 30,720 still gets passes of more than a few rows. How small a pass is worth making under the
/// bound is [`PASS_COST_POSITIONS`]' concern: [`plan_passes`] makes smaller ones where that pays.
const MIN_PREFILL_POSITIONS: usize = 256;

/// What one more prefill pass costs beyond its positions, in positions (its hand-offs to the
/// threads, its copy of the shared prefix, its reading of every weight once); chosen on a score's
/// prefill against smaller and larger costs (CHANGELOG.md, Performance).
const PASS_COST_POSITIONS: usize = 16;

/// Prompts shorter than this share nothing worth a separate pass.
const MIN_SHARED_PREFIX: usize = 4;

/// What a prefill leaves for decoding: each row's key mask over the cache, its prompt's
/// positions (the last one + 1 is where its reply starts), and the last position's logits
/// `[batch, vocab]`.
pub struct Prefilled {
    pub mask: Vec<Vec<u8>>,
    pub positions: Vec<Vec<u32>>,
    pub logits: Tensor,
}

/// Runs `prompts` into fresh `caches`. The tokens every prompt starts with — the chat template's
/// head and system prompt, often a third of a short prompt — are computed once and copied to
/// every row; the rest is left-padded after them, so a row's cache reads [prefix][pads][own
/// tokens], with the pads masked and positions counted over real tokens only, which is what
/// each prompt alone sees (tests/runtime.rs compares against batch size 1).
pub fn prefill(
    model: &Model,
    prompts: &[Vec<u32>],
    pad_id: u32,
    caches: &mut [KvCache],
) -> Result<Prefilled> {
    let per_pass = positions_per_pass(model);
    prefill_in_passes(model, prompts, pad_id, caches, Passes::AtMost(per_pass))
}

/// The bound on the positions of one prefill pass (see `prefill`).
fn positions_per_pass(model: &Model) -> usize {
    let widest = model
        .config
        .intermediate_size
        .max(model.config.hidden_size)
        .max(1);
    (PREFILL_BYTES / (4 * widest)).max(MIN_PREFILL_POSITIONS)
}

/// How `prefill_in_passes` splits its rows into passes.
#[derive(Debug, Clone, Copy)]
pub enum Passes {
    /// Every row in one pass, padded to the longest.
    One,
    /// The split [`plan_passes`] makes, at most this many positions (rows × padded length) in a
    /// pass of more than one row.
    AtMost(usize),
}

/// `prefill`, its rows split into passes as `passes` says.
pub fn prefill_in_passes(
    model: &Model,
    prompts: &[Vec<u32>],
    pad_id: u32,
    caches: &mut [KvCache],
    passes: Passes,
) -> Result<Prefilled> {
    run_passes(model, prompts, pad_id, caches, passes, true)
}

/// The passes of `prefill_in_passes`; with `keep` false the rows' caches are dropped after their
/// pass (only the logits are wanted), so `caches` ends holding the shared prefix alone.
fn run_passes(
    model: &Model,
    prompts: &[Vec<u32>],
    pad_id: u32,
    caches: &mut [KvCache],
    passes: Passes,
    keep: bool,
) -> Result<Prefilled> {
    let shared = shared_prefix(model, prompts);
    let n = prompts.len();
    if shared > 0 {
        let head = &prompts[0][..shared];
        let pos: Vec<u32> = (0..shared as u32).collect();
        model.step(
            &[head.to_vec()],
            &[pos],
            &[vec![1; shared]],
            Some(caches),
            false,
            Logits::None,
        )?;
    }
    let rest: Vec<Vec<u32>> = prompts.iter().map(|p| p[shared..].to_vec()).collect();
    let batch = Batch::left_padded(&rest, pad_id);
    let (positions, mask) = after_prefix(&batch, shared);
    // In passes of rows, longest first, each padded only to its own longest row and holding at
    // most the bound's positions: a whole batch at once makes activations of hundreds of MB,
    // which the allocator maps afresh for every one (page faults), while the kernel is as fast at
    // a thousand rows; and one length for all would compute every short prompt's padding (45%
    // of a 100-prompt AdvBench batch's positions). Rows do not see each other and attention
    // skips masked keys, so a row's values do not depend on its pass.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(rest[i].len()));
    let plan = match passes {
        Passes::One => vec![n],
        Passes::AtMost(per_pass) => {
            let sorted: Vec<usize> = order.iter().map(|&i| rest[i].len()).collect();
            plan_passes(&sorted, per_pass)
        }
    };
    let mut logits = Vec::new();
    let mut parts: Vec<(Vec<KvCache>, usize)> = Vec::new();
    let mut start = 0;
    for rows in plan {
        let pass = &order[start..start + rows];
        start += rows;
        let own: Vec<Vec<u32>> = pass.iter().map(|&i| rest[i].clone()).collect();
        let sub_batch = Batch::left_padded(&own, pad_id);
        let (sub_positions, sub_mask) = after_prefix(&sub_batch, shared);
        // The shared prefix (one row), copied to every row of the pass.
        let mut sub: Vec<KvCache> = caches
            .iter()
            .map(|c| -> Result<KvCache> {
                let Some((k, v)) = c.used()? else {
                    return Ok(KvCache::default());
                };
                let copies = |t: &Tensor| -> Result<Option<Tensor>> {
                    let (_, h, s, d) = t.dims4()?;
                    Ok(Some(t.broadcast_as((rows, h, s, d))?.contiguous()?))
                };
                Ok(KvCache::holding(copies(&k)?, copies(&v)?))
            })
            .collect::<Result<_>>()?;
        let out = model.step(
            &sub_batch.ids,
            &sub_positions,
            &sub_mask,
            Some(&mut sub),
            false,
            Logits::Last,
        )?;
        logits.push(out.logits.expect("asked for logits"));
        if keep {
            parts.push((sub, sub_batch.seq_len()));
        }
    }
    let mut back = vec![0u32; n];
    for (at, &i) in order.iter().enumerate() {
        back[i] = at as u32;
    }
    let back = Tensor::from_vec(back, n, &Device::Cpu)?;
    let logits = Tensor::cat(&logits, 0)?.index_select(&back, 0)?;
    if !keep {
        return Ok(Prefilled {
            mask,
            positions,
            logits,
        });
    }
    // Back to the prompts' order, each pass's caches widened to the batch's length by masked
    // slots between the prefix and the padding ([prefix][pads][own], as `mask` says).
    let longest = batch.seq_len();
    let widen = |t: &Tensor, len: usize| -> Result<Tensor> {
        if len == longest {
            return Ok(t.clone());
        }
        let (rows, heads, _, hd) = t.dims4()?;
        let gap = Tensor::zeros((rows, heads, longest - len, hd), t.dtype(), t.device())?;
        Ok(Tensor::cat(
            &[&t.narrow(2, 0, shared)?, &gap, &t.narrow(2, shared, len)?],
            2,
        )?)
    };
    let join = |ts: &[Tensor]| -> Result<Option<Tensor>> {
        Ok(match ts.len() {
            0 => None,
            _ => Some(Tensor::cat(ts, 0)?.index_select(&back, 0)?),
        })
    };
    for (i, c) in caches.iter_mut().enumerate() {
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for (p, len) in &parts {
            if let Some((k, v)) = p[i].used()? {
                ks.push(widen(&k, *len)?);
                vs.push(widen(&v, *len)?);
            }
        }
        *c = KvCache::holding(join(&ks)?, join(&vs)?);
    }
    Ok(Prefilled {
        mask,
        positions,
        logits,
    })
}

/// How many rows each prefill pass takes, given the rows' lengths longest first: the split into
/// consecutive passes that computes the fewest positions (a pass pads every row to its first),
/// counting [`PASS_COST_POSITIONS`] for each pass and holding at most `per_pass` positions in a
/// pass of more than one row. Filling each pass up to `per_pass` instead computed 2,552 positions
/// for the 1,821 of 100 AdvBench prompts (this split: 1,871).
pub fn plan_passes(sorted: &[usize], per_pass: usize) -> Vec<usize> {
    let n = sorted.len();
    // best[b]: the cheapest plan for rows ..b, and the first row of its last pass.
    let mut best: Vec<(usize, usize)> = vec![(0, 0); n + 1];
    for b in 1..=n {
        let mut pick = (usize::MAX, b - 1);
        for a in (0..b).rev() {
            let positions = (b - a) * sorted[a];
            if b - a > 1 && positions > per_pass {
                break;
            }
            let cost = best[a].0 + positions + PASS_COST_POSITIONS;
            if cost < pick.0 {
                pick = (cost, a);
            }
        }
        best[b] = pick;
    }
    let mut plan = Vec::new();
    let mut b = n;
    while b > 0 {
        let a = best[b].1;
        plan.push(b - a);
        b = a;
    }
    plan.reverse();
    plan
}

/// The positions and key mask of a left-padded batch that follows `shared` prefix tokens in the
/// cache.
fn after_prefix(batch: &Batch, shared: usize) -> (Vec<Vec<u32>>, Vec<Vec<u8>>) {
    let positions = batch
        .positions()
        .into_iter()
        .map(|r| r.into_iter().map(|p| p + shared as u32).collect())
        .collect();
    let mask = batch
        .mask
        .iter()
        .map(|m| {
            std::iter::repeat_n(1u8, shared)
                .chain(m.iter().copied())
                .collect()
        })
        .collect();
    (positions, mask)
}

/// The last position's logits of each prompt `[batch, vocab]`, with the shared prefix computed
/// once and the rows in passes by length (see `prefill`); no cache is kept.
pub fn last_logits(model: &Model, prompts: &[Vec<u32>], pad_id: u32) -> Result<Tensor> {
    if prompts.is_empty() {
        bail!("no prompts to compute logits for");
    }
    let passes = Passes::AtMost(positions_per_pass(model));
    Ok(run_passes(
        model,
        prompts,
        pad_id,
        &mut model.new_caches(),
        passes,
        false,
    )?
    .logits)
}

/// How many leading tokens all prompts share, leaving each at least one of its own. Zero for a
/// single prompt, a short prefix, or a sliding-window model (its window counts cache slots, which
/// the pads after the prefix would shift).
fn shared_prefix(model: &Model, prompts: &[Vec<u32>]) -> usize {
    if prompts.len() < 2 || model.config.sliding_window.is_some() {
        return 0;
    }
    let first = &prompts[0];
    let mut n = prompts
        .iter()
        .map(|p| p.len())
        .min()
        .unwrap_or(0)
        .saturating_sub(1);
    for p in &prompts[1..] {
        n = n.min(first.iter().zip(p).take_while(|(a, b)| a == b).count());
    }
    if n < MIN_SHARED_PREFIX {
        0
    } else {
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Positions plus the per-pass cost of a split of `sorted` (None if a pass holds too many).
    fn cost(sorted: &[usize], plan: &[usize], per_pass: usize) -> Option<usize> {
        let (mut at, mut total) = (0, 0);
        for &rows in plan {
            let positions = rows * sorted[at];
            if rows == 0 || (rows > 1 && positions > per_pass) {
                return None;
            }
            total += positions + PASS_COST_POSITIONS;
            at += rows;
        }
        (at == sorted.len()).then_some(total)
    }

    /// Every split of n rows into consecutive passes.
    fn splits(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        (1..=n)
            .flat_map(|first| {
                splits(n - first).into_iter().map(move |mut rest| {
                    rest.insert(0, first);
                    rest
                })
            })
            .collect()
    }

    #[test]
    fn the_plan_is_the_cheapest_split_within_the_bound() {
        let mut rng = crate::stats::Rng::new(7);
        for case in 0..300 {
            let n = 1 + case % 10;
            let mut sorted: Vec<usize> = (0..n).map(|_| 1 + rng.below(60)).collect();
            sorted.sort_unstable_by(|a, b| b.cmp(a));
            let per_pass = 20 + rng.below(200);
            let plan = plan_passes(&sorted, per_pass);
            let got = cost(&sorted, &plan, per_pass)
                .unwrap_or_else(|| panic!("{plan:?} breaks the bound {per_pass} on {sorted:?}"));
            let best = splits(n)
                .iter()
                .filter_map(|p| cost(&sorted, p, per_pass))
                .min()
                .unwrap();
            assert_eq!(got, best, "{plan:?} on {sorted:?} under {per_pass}");
        }
    }

    #[test]
    fn a_row_longer_than_the_bound_gets_a_pass_of_its_own() {
        assert_eq!(plan_passes(&[500, 40, 40], 100), vec![1, 2]);
        assert_eq!(plan_passes(&[], 100), Vec::<usize>::new());
    }
}
