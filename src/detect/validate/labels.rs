//! Labels by intervention: each candidate dim held at zero and at its mean (all its instances
//! at once, and a sample of instances one by one), and each candidate's weight in the
//! direction.

use super::nan_if_null;
use super::ValidationSettings;
use crate::detect::scan::{PromptStates, Scan, Source};
use crate::model::{Batch, Held, Intervention, LoadedModel, Logits};
use anyhow::Result;
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What holding an entry (or a dim's instances) did, at zero and at its mean: the mean KL
/// (unmodified ‖ held) of the next-token distributions at the later positions, and the change
/// of the mean log-likelihood of the prompt's own later tokens (negative = worse).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Damage {
    #[serde(deserialize_with = "nan_if_null")]
    pub zero_kl: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub mean_kl: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub zero_dll: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub mean_dll: f64,
}

impl Damage {
    pub const UNKNOWN: Damage = Damage {
        zero_kl: f64::NAN,
        mean_kl: f64::NAN,
        zero_dll: f64::NAN,
        mean_dll: f64::NAN,
    };

    /// From the two interventions' (KL, Δll).
    fn of(zero: (f64, f64), mean: (f64, f64)) -> Damage {
        Damage {
            zero_kl: zero.0,
            zero_dll: zero.1,
            mean_kl: mean.0,
            mean_dll: mean.1,
        }
    }

    /// Massive: zeroing hurts at least `zero_kl`, holding at the mean at most `mean_kl`.
    pub fn massive(&self, s: &ValidationSettings) -> bool {
        self.zero_kl >= s.zero_kl && self.mean_kl <= s.mean_kl
    }

    pub fn known(&self) -> bool {
        self.zero_kl.is_finite() && self.mean_kl.is_finite()
    }
}

/// One candidate dim and what the two interventions did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Candidate {
    pub dim: u32,
    /// The first hidden state (0 = embeddings) at which it stands out anywhere.
    pub first_state: u32,
    /// (prompt, position) where it stands out at some state, and the tokens there.
    pub positions: Vec<(u32, u32)>,
    pub tokens: Vec<String>,
    pub peak_abs: f32,
    pub peak_ratio: f32,
    #[serde(flatten)]
    pub damage: Damage,
    pub massive: bool,
    /// How many prompts its dim-level label held it in.
    #[serde(default)]
    pub label_rows: usize,
    /// Its share of the squared norm of the difference of means (bad − good, last prompt
    /// position) at the direction's hidden state: does it dominate the direction?
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub direction_share: f64,
    /// Its mean share of the squared norm of the residual at its instances, at that state.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub residual_share: f64,
    /// Entry labels: how many of its instances were labelled, and the weighted share of its
    /// instances labelled massive.
    #[serde(default)]
    pub entries_labelled: usize,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub entries_massive: f64,
}

fn nan() -> f64 {
    f64::NAN
}

/// One candidate instance held alone: the label of a (prompt, position, dim).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryLabel {
    pub prompt: u32,
    pub position: u32,
    pub dim: u32,
    pub token: String,
    /// Instances of the dim over instances labelled: the inverse of its inclusion probability.
    pub weight: f64,
    #[serde(flatten)]
    pub damage: Damage,
    pub massive: bool,
    /// a² / ‖h‖² of this entry at the direction's hidden state.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub residual_share: f64,
}

/// A candidate's instances are where it is within this factor of its peak |a|: Sun et al.'s
/// massive activations sit at a few tokens with nearly the same value, and the mean they are
/// held at is taken over those instances, not over every place the dim is merely large.
pub const INSTANCE_FACTOR: f32 = 0.1;

/// The candidates of a corpus scan: each dim that stands out by `candidate_ratio` at a valid
/// position, plus every dim in `also` (e.g. what the evaluated configurations detect), with its
/// instances (positions within [`INSTANCE_FACTOR`] of its peak) and the first hidden state at
/// which one of them is that large.
pub fn candidates(scan: &Scan, s: &ValidationSettings, also: &BTreeSet<u32>) -> Vec<Candidate> {
    let mut peak: BTreeMap<u32, (f32, f32)> = BTreeMap::new();
    for e in scan.entries.iter().filter(|e| e.valid) {
        if e.ratio_position >= s.candidate_ratio || also.contains(&e.dim) {
            let p = peak.entry(e.dim).or_insert((0.0, 0.0));
            p.0 = p.0.max(e.abs);
            p.1 = p.1.max(e.ratio_position);
        }
    }
    let mut by_dim: BTreeMap<u32, Candidate> = BTreeMap::new();
    for e in scan.entries.iter().filter(|e| e.valid) {
        let Some(&(pk, pr)) = peak.get(&e.dim) else {
            continue;
        };
        if e.abs < INSTANCE_FACTOR * pk {
            continue;
        }
        let c = by_dim.entry(e.dim).or_insert_with(|| Candidate {
            dim: e.dim,
            first_state: e.layer,
            positions: Vec::new(),
            tokens: Vec::new(),
            peak_abs: pk,
            peak_ratio: pr,
            damage: Damage::UNKNOWN,
            massive: false,
            label_rows: 0,
            direction_share: f64::NAN,
            residual_share: f64::NAN,
            entries_labelled: 0,
            entries_massive: f64::NAN,
        });
        c.first_state = c.first_state.min(e.layer);
        if !c.positions.contains(&(e.prompt, e.position)) {
            c.positions.push((e.prompt, e.position));
            c.tokens.push(scan.token(e.prompt, e.position).to_string());
        }
    }
    // It appears where it first stands out at one of its instances, however much it grows later.
    for e in scan
        .entries
        .iter()
        .filter(|e| e.valid && e.ratio_position >= s.candidate_ratio)
    {
        if let Some(c) = by_dim.get_mut(&e.dim) {
            if c.positions.contains(&(e.prompt, e.position)) {
                c.first_state = c.first_state.min(e.layer);
            }
        }
    }
    let mut v: Vec<Candidate> = by_dim.into_values().collect();
    v.sort_by(|a, b| b.peak_abs.total_cmp(&a.peak_abs));
    let (mut keep, rest): (Vec<Candidate>, Vec<Candidate>) =
        v.into_iter().partition(|c| also.contains(&c.dim));
    keep.extend(
        rest.into_iter()
            .take(s.max_candidates.saturating_sub(keep.len())),
    );
    keep.sort_by(|a, b| b.peak_abs.total_cmp(&a.peak_abs));
    keep
}

/// Per row of `with`: the damage of its intervention against row `base_row[r]` of `base` (both
/// over `batch`'s ids): the mean KL(unmodified ‖ held) of the next-token distributions at the
/// valid positions after `first[r]`, and the mean change of log p(next token) from `first[r]` on.
/// One row at a time: a batch's full-vocabulary log-probabilities, several times over, would
/// not fit in memory.
fn damage(
    base: &Tensor,
    with: &Tensor,
    batch: &Batch,
    base_row: &[usize],
    first: &[usize],
) -> Result<Vec<(f64, f64)>> {
    let t = batch.seq_len();
    let mut out = Vec::with_capacity(base_row.len());
    // The unmodified row's log-probabilities and probabilities, once per base row.
    let mut lb_of: Option<(usize, Tensor, Tensor)> = None;
    for (r, (&b, &p)) in base_row.iter().zip(first).enumerate() {
        let (lb, pb) = match &lb_of {
            Some((row, lb, pb)) if *row == b => (lb.clone(), pb.clone()),
            _ => {
                let lb = candle_nn::ops::log_softmax(&base.get(b)?, D::Minus1)?;
                let pb = lb.exp()?;
                lb_of = Some((b, lb.clone(), pb.clone()));
                (lb, pb)
            }
        };
        let lw = candle_nn::ops::log_softmax(&with.get(r)?, D::Minus1)?;
        let kl: Vec<f32> = (pb * (&lb - &lw)?)?.sum(D::Minus1)?.to_vec1()?;
        let next: Vec<u32> = (0..t)
            .map(|q| if q + 1 < t { batch.ids[b][q + 1] } else { 0 })
            .collect();
        let next = Tensor::from_vec(next, (t, 1), base.device())?;
        let gw: Vec<f32> = lw.gather(&next, 1)?.squeeze(1)?.to_vec1()?;
        let gb: Vec<f32> = lb.gather(&next, 1)?.squeeze(1)?.to_vec1()?;
        let mask = &batch.mask[b];
        let (mut k_sum, mut n) = (0f64, 0usize);
        for pos in (p + 1)..t {
            if mask[pos] == 1 {
                k_sum += kl[pos] as f64;
                n += 1;
            }
        }
        // log p(x_{pos+1} | ≤ pos) for pos ≥ p: the next tokens the held entry can affect.
        let (mut l_sum, mut nl) = (0f64, 0usize);
        for pos in p..t.saturating_sub(1) {
            l_sum += (gw[pos] - gb[pos]) as f64;
            nl += 1;
        }
        out.push((k_sum / n.max(1) as f64, l_sum / nl.max(1) as f64));
    }
    Ok(out)
}

/// At most this many logits (rows × positions × vocabulary) in one forward pass's output, so
/// that a long prompt on a large vocabulary still fits: the label passes split their rows by it.
const LOGITS_BUDGET: usize = 120_000_000;

/// How many rows of `len` positions one pass may hold under [`LOGITS_BUDGET`].
fn rows_per_pass(len: usize, vocab: usize) -> usize {
    (LOGITS_BUDGET / (len.max(1) * vocab.max(1))).max(1)
}

/// The padding the scanned batch gave a prompt: scan positions count it, the label batches'
/// positions do not.
fn scanned_pad(states: &PromptStates) -> usize {
    states.valid.iter().take_while(|v| !**v).count()
}

/// Each instance of `c` is held at the corpus mean of the dim at the same token, per hidden
/// state from its first on: a massive activation is a fixed value per token, so that mean is
/// what it would be anyway; an ordinary large value is not. Per token, the means at states
/// `first_state`, `first_state + 1`, …
fn token_means<'a>(
    c: &Candidate,
    prompts: &'a [PromptStates],
    d: usize,
    states: usize,
) -> BTreeMap<&'a str, Vec<f32>> {
    let token_of =
        |p: u32, pos: u32| -> &'a str { prompts[p as usize].tokens[pos as usize].as_str() };
    let mut out: BTreeMap<&str, Vec<f32>> = BTreeMap::new();
    for st in c.first_state as usize..states {
        let mut acc: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
        for &(p, pos) in &c.positions {
            let v = prompts[p as usize].states[st][pos as usize * d + c.dim as usize];
            let e = acc.entry(token_of(p, pos)).or_default();
            e.0 += v as f64;
            e.1 += 1;
        }
        for (tok, (sum, n)) in acc {
            out.entry(tok).or_default().push((sum / n as f64) as f32);
        }
    }
    out
}

/// A seeded simple random sample of `k` of `items` (all of them when there are no more), in
/// their original order.
fn sample<T: Clone>(items: &[T], k: usize, seed: u64) -> Vec<T> {
    if items.len() <= k {
        return items.to_vec();
    }
    let mut idx: Vec<usize> = (0..items.len()).collect();
    crate::stats::Rng::new(seed).shuffle(&mut idx);
    let mut keep: Vec<usize> = idx.into_iter().take(k).collect();
    keep.sort_unstable();
    keep.into_iter().map(|i| items[i].clone()).collect()
}

/// Per row: (mean KL, Δll).
type RowDamages = Vec<(f64, f64)>;

/// All of `c`'s instances in the prompts `rows` held at zero and at their means, in one pass
/// each: per row the two damages and its weight (its positions from the first held one on).
fn hold_dim(
    lm: &LoadedModel,
    prompts: &[PromptStates],
    ids: &[Vec<u32>],
    c: &Candidate,
    tm: &BTreeMap<&str, Vec<f32>>,
    rows: &[u32],
) -> Result<(RowDamages, RowDamages, Vec<f64>)> {
    let d = lm.model.hidden_size();
    let seqs: Vec<Vec<u32>> = rows.iter().map(|&r| ids[r as usize].clone()).collect();
    let batch = Batch::left_padded(&seqs, lm.tokenizer.pad_id);
    let t = batch.seq_len();
    let mut at = Vec::new();
    // The scan's (prompt, position) of each held entry, in the order of `at`.
    let mut order: Vec<(u32, u32)> = Vec::new();
    let mut first = vec![usize::MAX; rows.len()];
    for (i, &r) in rows.iter().enumerate() {
        let pad = t - ids[r as usize].len();
        let sp = scanned_pad(&prompts[r as usize]);
        for &(_, pos) in c.positions.iter().filter(|x| x.0 == r) {
            let at_pos = pad + pos as usize - sp;
            at.push((i, at_pos));
            order.push((r, pos));
            first[i] = first[i].min(at_pos);
        }
    }
    // means[k][i]: entry order[i]'s value at state first_state + k.
    let token = |&(p, pos): &(u32, u32)| prompts[p as usize].tokens[pos as usize].as_str();
    let means: Vec<Vec<f32>> = (0..tm.values().next().map_or(0, Vec::len))
        .map(|k| order.iter().map(|e| tm[token(e)][k]).collect())
        .collect();
    let from = c.first_state as usize;
    let base = lm
        .model
        .forward(&batch, false, Logits::All)?
        .logits
        .expect("asked for logits");
    let shape = (batch.len(), t, d);
    let zero = Intervention::new(shape, &at, c.dim as usize, from, vec![vec![0.0; at.len()]])?;
    let mean = Intervention::new(shape, &at, c.dim as usize, from, means)?;
    let each: Vec<usize> = (0..rows.len()).collect();
    let with = lm.model.forward_intervened(&batch, &zero)?;
    let z = damage(&base, &with, &batch, &each, &first)?;
    drop(with);
    let with = lm.model.forward_intervened(&batch, &mean)?;
    let m = damage(&base, &with, &batch, &each, &first)?;
    let w = first.iter().map(|&f| (t - f).max(1) as f64).collect();
    Ok((z, m, w))
}

/// Labels every candidate dim by the two interventions: all its instances held at once, in a
/// seeded sample of at most `label_prompts` of the prompts where it stands out.
pub fn label(
    lm: &LoadedModel,
    prompts: &[PromptStates],
    ids: &[Vec<u32>],
    cands: &mut [Candidate],
    s: &ValidationSettings,
    mut progress: impl FnMut(usize),
) -> Result<()> {
    let d = lm.model.hidden_size();
    let states = lm.model.num_layers() + 1;
    for c in cands.iter_mut() {
        let rows: BTreeSet<u32> = c.positions.iter().map(|p| p.0).collect();
        let rows: Vec<u32> = rows.into_iter().collect();
        let rows = sample(&rows, s.label_prompts, s.seed ^ 0xD1A5 ^ c.dim as u64);
        let tm = token_means(c, prompts, d, states);
        let longest = rows
            .iter()
            .map(|&r| ids[r as usize].len())
            .max()
            .unwrap_or(1);
        // Every row weighs by its later positions, as one mean over all rows would.
        let (mut sums, mut n) = ([0f64; 4], 0f64);
        for chunk in rows.chunks(rows_per_pass(longest, lm.model.vocab_size())) {
            let (z, m, w) = hold_dim(lm, prompts, ids, c, &tm, chunk)?;
            for r in 0..chunk.len() {
                sums[0] += z[r].0 * w[r];
                sums[1] += z[r].1 * w[r];
                sums[2] += m[r].0 * w[r];
                sums[3] += m[r].1 * w[r];
                n += w[r];
            }
        }
        let (zk, zl, mk, ml) = (sums[0] / n, sums[1] / n, sums[2] / n, sums[3] / n);
        c.damage = Damage::of((zk, zl), (mk, ml));
        c.massive = c.damage.massive(s);
        c.label_rows = rows.len();
        progress(1);
    }
    Ok(())
}

/// Labels a seeded sample of at most `entries_per_dim` instances of every candidate, each held
/// alone (zero and mean, from the dim's first state) in its own prompt. Instances at a prompt's
/// last position are not sampled: no later position can show their damage.
pub fn label_entries(
    lm: &LoadedModel,
    prompts: &[PromptStates],
    ids: &[Vec<u32>],
    cands: &mut [Candidate],
    s: &ValidationSettings,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<EntryLabel>> {
    let d = lm.model.hidden_size();
    let states = lm.model.num_layers() + 1;
    let last = |p: u32| prompts[p as usize].last_position() as u32;
    // (candidate index, prompt, position, weight), grouped by prompt below.
    let mut todo: BTreeMap<u32, Vec<(usize, u32, f64)>> = BTreeMap::new();
    for (ci, c) in cands.iter().enumerate() {
        let pool: Vec<(u32, u32)> = c
            .positions
            .iter()
            .copied()
            .filter(|&(p, t)| t != last(p))
            .collect();
        let picked = sample(
            &pool,
            s.entries_per_dim,
            s.seed ^ 0xE7 ^ ((c.dim as u64) << 8),
        );
        let w = pool.len() as f64 / picked.len().max(1) as f64;
        for (p, t) in picked {
            todo.entry(p).or_default().push((ci, t, w));
        }
    }
    let tms: Vec<BTreeMap<&str, Vec<f32>>> = cands
        .iter()
        .map(|c| token_means(c, prompts, d, states))
        .collect();
    let total: usize = todo.values().map(Vec::len).sum();
    let mut done = 0;
    let mut out = Vec::with_capacity(total);
    for (&p, items) in &todo {
        let batch1 =
            Batch::left_padded(std::slice::from_ref(&ids[p as usize]), lm.tokenizer.pad_id);
        let t = batch1.seq_len();
        let sp = scanned_pad(&prompts[p as usize]);
        let base = lm
            .model
            .forward(&batch1, false, Logits::All)?
            .logits
            .expect("asked for logits");
        // Two rows an instance (zero and mean), at most six instances a pass.
        let per_pass = (rows_per_pass(t, lm.model.vocab_size()) / 2).clamp(1, 6);
        for chunk in items.chunks(per_pass) {
            let k = chunk.len();
            let seqs = vec![ids[p as usize].clone(); 2 * k];
            let batch = Batch::left_padded(&seqs, lm.tokenizer.pad_id);
            // Rows 2i (zero) and 2i + 1 (mean) hold instance i alone.
            let mut held = Vec::with_capacity(2 * k);
            let mut firsts = Vec::with_capacity(2 * k);
            for (i, &(ci, pos, _)) in chunk.iter().enumerate() {
                let c = &cands[ci];
                let at_pos = pos as usize - sp;
                let tok = prompts[p as usize].tokens[pos as usize].as_str();
                let means = tms[ci][tok].clone();
                for (row, values) in [(2 * i, vec![0.0]), (2 * i + 1, means)] {
                    held.push(Held {
                        row,
                        position: at_pos,
                        dim: c.dim as usize,
                        from_state: c.first_state as usize,
                        values,
                    });
                    firsts.push(at_pos);
                }
            }
            let iv = Intervention::held((2 * k, t, d), &held)?;
            let with = lm.model.forward_intervened(&batch, &iv)?;
            let dm = damage(&base, &with, &batch1, &vec![0; 2 * k], &firsts)?;
            for (i, &(ci, pos, w)) in chunk.iter().enumerate() {
                let c = &cands[ci];
                let damage = Damage::of(dm[2 * i], dm[2 * i + 1]);
                out.push(EntryLabel {
                    prompt: p,
                    position: pos,
                    dim: c.dim,
                    token: prompts[p as usize].tokens[pos as usize].clone(),
                    weight: w,
                    damage,
                    massive: damage.massive(s),
                    residual_share: f64::NAN,
                });
            }
            done += k;
            progress(done, total);
        }
    }
    for c in cands.iter_mut() {
        let mine: Vec<&EntryLabel> = out.iter().filter(|e| e.dim == c.dim).collect();
        c.entries_labelled = mine.len();
        c.entries_massive = if mine.is_empty() {
            f64::NAN
        } else {
            mine.iter().filter(|e| e.massive).count() as f64 / mine.len() as f64
        };
    }
    Ok(out)
}

/// Each candidate's share of the squared norm of the difference of means (bad − good, at the
/// last position) at hidden state `state`, and its mean share of the residual's squared norm at
/// its instances; the same residual share for each labelled entry.
pub(super) fn direction_shares(
    prompts: &[PromptStates],
    state: usize,
    d: usize,
    cands: &mut [Candidate],
    entries: &mut [EntryLabel],
) {
    let mut sums = [vec![0f64; d], vec![0f64; d]];
    let mut n = [0usize; 2];
    for p in prompts {
        let side = match p.source {
            Source::Good => 0,
            Source::Bad => 1,
            Source::Trigger => continue,
        };
        let last = p.last_position();
        let h = &p.states[state][last * d..(last + 1) * d];
        sums[side]
            .iter_mut()
            .zip(h)
            .for_each(|(s, x)| *s += *x as f64);
        n[side] += 1;
    }
    let diff: Option<Vec<f64>> = (n[0] > 0 && n[1] > 0).then(|| {
        (0..d)
            .map(|j| sums[1][j] / n[1] as f64 - sums[0][j] / n[0] as f64)
            .collect()
    });
    let norm2: f64 = diff.as_ref().map_or(0.0, |v| v.iter().map(|x| x * x).sum());
    let share = |p: u32, pos: u32, dim: u32| -> f64 {
        let h = &prompts[p as usize].states[state][pos as usize * d..(pos as usize + 1) * d];
        let all: f64 = h.iter().map(|x| (*x as f64).powi(2)).sum();
        (h[dim as usize] as f64).powi(2) / all
    };
    for c in cands.iter_mut() {
        c.direction_share = match &diff {
            Some(v) if norm2 > 0.0 => v[c.dim as usize].powi(2) / norm2,
            _ => f64::NAN,
        };
        let s: Vec<f64> = c
            .positions
            .iter()
            .map(|&(p, t)| share(p, t, c.dim))
            .collect();
        c.residual_share = s.iter().sum::<f64>() / s.len().max(1) as f64;
    }
    for e in entries.iter_mut() {
        e.residual_share = share(e.prompt, e.position, e.dim);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(source: Source, last: [f32; 3]) -> PromptStates {
        // Two positions, three dims; state 0 only. Position 0 holds a large fixed value in dim 0.
        PromptStates {
            source,
            text: String::new(),
            tokens: vec!["a".into(), "b".into()],
            valid: vec![true, true],
            states: vec![vec![100.0, 1.0, 1.0, last[0], last[1], last[2]]],
        }
    }

    fn cand(dim: u32, positions: Vec<(u32, u32)>) -> Candidate {
        Candidate {
            dim,
            first_state: 0,
            tokens: vec![String::new(); positions.len()],
            positions,
            peak_abs: 0.0,
            peak_ratio: 0.0,
            damage: Damage::UNKNOWN,
            massive: false,
            label_rows: 0,
            direction_share: f64::NAN,
            residual_share: f64::NAN,
            entries_labelled: 0,
            entries_massive: f64::NAN,
        }
    }

    #[test]
    fn direction_shares_split_the_difference_of_means_and_the_residual() {
        // good ends at (5, 0, 1), bad at (5, 3, 5): the difference of means is (0, 3, 4).
        let ps = vec![
            prompt(Source::Trigger, [50.0, 50.0, 50.0]),
            prompt(Source::Good, [5.0, 0.0, 1.0]),
            prompt(Source::Good, [5.0, 0.0, 1.0]),
            prompt(Source::Bad, [5.0, 3.0, 5.0]),
        ];
        let mut cands = vec![
            cand(0, vec![(1, 0), (2, 0)]),
            cand(1, vec![(3, 1)]),
            cand(2, vec![(3, 1)]),
        ];
        let mut entries = vec![EntryLabel {
            prompt: 1,
            position: 0,
            dim: 0,
            token: "a".into(),
            weight: 1.0,
            damage: Damage::of((0.0, 0.0), (0.0, 0.0)),
            massive: true,
            residual_share: f64::NAN,
        }];
        direction_shares(&ps, 0, 3, &mut cands, &mut entries);
        // The trigger counts on neither side; a value the same on both sides is no direction.
        assert_eq!(cands[0].direction_share, 0.0);
        assert!((cands[1].direction_share - 9.0 / 25.0).abs() < 1e-12);
        assert!((cands[2].direction_share - 16.0 / 25.0).abs() < 1e-12);
        // Dim 0 at position 0: 100² of 100² + 1 + 1 of the residual's squared norm.
        let r = 10000.0 / 10002.0;
        assert!((cands[0].residual_share - r).abs() < 1e-9);
        assert!((entries[0].residual_share - r).abs() < 1e-9);
        assert!((cands[1].residual_share - 9.0 / 59.0).abs() < 1e-9);
    }

    #[test]
    fn a_sample_is_seeded_in_order_and_whole_when_small() {
        let v: Vec<u32> = (0..100).collect();
        let a = sample(&v, 10, 7);
        assert_eq!(a, sample(&v, 10, 7));
        assert_ne!(a, sample(&v, 10, 8));
        assert_eq!(a.len(), 10);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(sample(&v[..5], 10, 7), v[..5].to_vec());
    }
}
