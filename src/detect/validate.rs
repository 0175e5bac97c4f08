//! Which detected dims *are* massive activations: labels by intervention (Sun et al. 2024,
//! Table 3) and every detection configuration scored against them.
//!
//! A massive activation acts as a fixed bias: holding it at **zero** from the hidden state where
//! it first appears wrecks the model's predictions at the later positions, holding it at its
//! **mean** over the corpus barely changes them. Each candidate dim (found by a loose scan of the
//! corpus) is held both ways at every position where it stands out, and the damage is measured at
//! the positions after the first one: the mean KL(unmodified ‖ intervened) of the next-token
//! distributions, and the change in mean log-likelihood of the prompt's own next tokens.

use super::scan::{PromptStates, Scan};
use super::{apply, DetectConfig};
use crate::model::{Batch, Intervention, LoadedModel, Logits};
use anyhow::Result;
use candle_core::{IndexOp, Tensor, D};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ValidationSettings {
    /// An entry is a candidate when its |a| is at least this many times its position's median.
    pub candidate_ratio: f32,
    /// At most this many candidate dims (the largest peaks first).
    pub max_candidates: usize,
    /// Massive: zeroing does at least this much damage (mean KL, nats) ...
    pub zero_kl: f64,
    /// ... and holding at the mean at most this much.
    pub mean_kl: f64,
}

impl Default for ValidationSettings {
    fn default() -> Self {
        ValidationSettings {
            candidate_ratio: 100.0,
            max_candidates: 24,
            zero_kl: 1.0,
            mean_kl: 0.1,
        }
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
    pub zero_kl: f64,
    pub mean_kl: f64,
    /// Change of the mean log-likelihood of the prompt's own later tokens (negative = worse).
    pub zero_dll: f64,
    pub mean_dll: f64,
    pub massive: bool,
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
            zero_kl: f64::NAN,
            mean_kl: f64::NAN,
            zero_dll: f64::NAN,
            mean_dll: f64::NAN,
            massive: false,
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

/// Damage of one intervention on `batch`: mean KL at the later positions and the change in
/// mean log-likelihood of the later tokens. `first[r]` = the first held position of row r.
fn damage(base: &Tensor, with: &Tensor, batch: &Batch, first: &[usize]) -> Result<(f64, f64)> {
    let lb = candle_nn::ops::log_softmax(base, D::Minus1)?;
    let lw = candle_nn::ops::log_softmax(with, D::Minus1)?;
    let kl = (lb.exp()? * (&lb - &lw)?)?.sum(D::Minus1)?; // [b, t]
    let kl: Vec<Vec<f32>> = kl.to_vec2()?;
    let (mut k_sum, mut l_sum, mut n, mut nl) = (0f64, 0f64, 0usize, 0usize);
    for (r, &p) in first.iter().enumerate() {
        let t = batch.seq_len();
        for (pos, k) in kl[r].iter().enumerate().skip(p + 1) {
            if batch.mask[r][pos] == 0 {
                continue;
            }
            k_sum += *k as f64;
            n += 1;
        }
        // log p(x_{pos+1} | ≤ pos) for pos ≥ p: the next tokens the held entry can affect.
        for pos in p..t.saturating_sub(1) {
            let next = batch.ids[r][pos + 1] as usize;
            let a = lw.i((r, pos, next))?.to_scalar::<f32>()? as f64;
            let b = lb.i((r, pos, next))?.to_scalar::<f32>()? as f64;
            l_sum += a - b;
            nl += 1;
        }
    }
    Ok((k_sum / n.max(1) as f64, l_sum / nl.max(1) as f64))
}

/// Labels every candidate by the two interventions on the prompts where it stands out.
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
        let seqs: Vec<Vec<u32>> = rows.iter().map(|&r| ids[r as usize].clone()).collect();
        let batch = Batch::left_padded(&seqs, lm.tokenizer.pad_id);
        let t = batch.seq_len();
        let mut at = Vec::new();
        // The scan's (prompt, position) of each held entry, in the order of `at`.
        let mut order: Vec<(u32, u32)> = Vec::new();
        let mut first = vec![usize::MAX; rows.len()];
        for (i, &r) in rows.iter().enumerate() {
            let pad = t - ids[r as usize].len();
            // Scan positions count the padding of the scanned batch; these ids have none.
            let scanned_pad = prompts[r as usize]
                .valid
                .iter()
                .take_while(|v| !**v)
                .count();
            for &(_, pos) in c.positions.iter().filter(|x| x.0 == r) {
                let at_pos = pad + pos as usize - scanned_pad;
                at.push((i, at_pos));
                order.push((r, pos));
                first[i] = first[i].min(at_pos);
            }
        }
        // Each instance is held at the corpus mean of the dim at the same token, per hidden
        // state from its first on: a massive activation is a fixed value per token, so that
        // mean is what it would be anyway; an ordinary large value is not.
        let from = c.first_state as usize;
        let token_of =
            |p: u32, pos: u32| -> &str { prompts[p as usize].tokens[pos as usize].as_str() };
        let means: Vec<Vec<f32>> = (from..states)
            .map(|st| {
                let mut acc: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
                for &(p, pos) in &c.positions {
                    let v = prompts[p as usize].states[st][pos as usize * d + c.dim as usize];
                    let e = acc.entry(token_of(p, pos)).or_default();
                    e.0 += v as f64;
                    e.1 += 1;
                }
                order
                    .iter()
                    .map(|&(p, pos)| {
                        let (sum, n) = acc[token_of(p, pos)];
                        (sum / n as f64) as f32
                    })
                    .collect()
            })
            .collect();
        let base = lm
            .model
            .forward(&batch, false, Logits::All)?
            .logits
            .expect("asked for logits");
        let shape = (batch.len(), t, d);
        let zero = Intervention::new(shape, &at, c.dim as usize, from, vec![vec![0.0; at.len()]])?;
        let mean = Intervention::new(shape, &at, c.dim as usize, from, means)?;
        let (zk, zl) = damage(
            &base,
            &lm.model.forward_intervened(&batch, &zero)?,
            &batch,
            &first,
        )?;
        let (mk, ml) = damage(
            &base,
            &lm.model.forward_intervened(&batch, &mean)?,
            &batch,
            &first,
        )?;
        c.zero_kl = zk;
        c.zero_dll = zl;
        c.mean_kl = mk;
        c.mean_dll = ml;
        c.massive = zk >= s.zero_kl && mk <= s.mean_kl;
        progress(1);
    }
    Ok(())
}

/// Precision, recall and F1 of a detection against the labels, at the dim level.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Score {
    pub detected: usize,
    pub true_positives: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

pub fn score(detected: &[u32], cands: &[Candidate]) -> Score {
    let massive: BTreeSet<u32> = cands.iter().filter(|c| c.massive).map(|c| c.dim).collect();
    let tp = detected.iter().filter(|d| massive.contains(d)).count();
    let precision = if detected.is_empty() {
        f64::NAN
    } else {
        tp as f64 / detected.len() as f64
    };
    let recall = if massive.is_empty() {
        f64::NAN
    } else {
        tp as f64 / massive.len() as f64
    };
    let f1 = if tp == 0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    };
    Score {
        detected: detected.len(),
        true_positives: tp,
        precision,
        recall,
        f1,
    }
}

/// The dims each configuration detects on the scan.
pub fn detections(
    configs: &[(String, DetectConfig)],
    scan: &Scan,
) -> Result<Vec<(String, Vec<u32>)>> {
    configs
        .iter()
        .map(|(n, c)| Ok((n.clone(), apply(c, scan)?.dim_ids())))
        .collect()
}
