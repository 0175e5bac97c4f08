//! Which detected dims *are* massive activations: labels by intervention (Sun et al. 2024,
//! Table 3) and every detection configuration scored against them.
//!
//! A massive activation acts as a fixed bias: holding it at **zero** from the hidden state where
//! it first appears wrecks the model's predictions at the later positions, holding it at its
//! **mean** over the corpus barely changes them. Each candidate dim (found by a loose scan of the
//! corpus) is held both ways at every position where it stands out, and the damage is measured at
//! the positions after the first one: the mean KL(unmodified ‖ intervened) of the next-token
//! distributions, and the change in mean log-likelihood of the prompt's own next tokens.

use super::apply::Detection;
use super::config::{MedianScope, PersistenceMode};
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
    #[serde(deserialize_with = "nan_if_null")]
    pub zero_kl: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub mean_kl: f64,
    /// Change of the mean log-likelihood of the prompt's own later tokens (negative = worse).
    #[serde(deserialize_with = "nan_if_null")]
    pub zero_dll: f64,
    #[serde(deserialize_with = "nan_if_null")]
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

/// Precision, recall and F1 of a detection against the labels.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Score {
    pub detected: usize,
    pub true_positives: usize,
    #[serde(deserialize_with = "nan_if_null")]
    pub precision: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub recall: f64,
    pub f1: f64,
}

/// JSON has no NaN: serde_json writes it as null, and an undefined ratio reads back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl Score {
    /// Against a set of truths: precision is undefined (NaN) when nothing is detected, recall
    /// when nothing is true; F1 is 0 when no detection is true.
    fn of<T: Ord>(detected: &BTreeSet<T>, truth: &BTreeSet<T>) -> Score {
        let tp = detected.intersection(truth).count();
        let precision = if detected.is_empty() {
            f64::NAN
        } else {
            tp as f64 / detected.len() as f64
        };
        let recall = if truth.is_empty() {
            f64::NAN
        } else {
            tp as f64 / truth.len() as f64
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

    fn same(&self, o: &Score) -> bool {
        let eq = |x: f64, y: f64| x == y || (x.is_nan() && y.is_nan());
        eq(self.precision, o.precision) && eq(self.recall, o.recall)
    }
}

/// Dim-level score: a detected dim is right when it is labelled massive.
pub fn score(detected: &[u32], cands: &[Candidate]) -> Score {
    let massive: BTreeSet<u32> = cands.iter().filter(|c| c.massive).map(|c| c.dim).collect();
    Score::of(&detected.iter().copied().collect(), &massive)
}

/// (prompt, position, dim)-level score: the truths are the instances of the massive dims (where
/// they stand within [`INSTANCE_FACTOR`] of their peak); a detection's entries are the
/// (prompt, position, dim)s it confirms at any hidden state.
pub fn score_ptd(detection: &Detection, cands: &[Candidate]) -> Score {
    let truth: BTreeSet<(u32, u32, u32)> = cands
        .iter()
        .filter(|c| c.massive)
        .flat_map(|c| c.positions.iter().map(move |&(p, t)| (p, t, c.dim)))
        .collect();
    let found: BTreeSet<(u32, u32, u32)> = detection
        .hits
        .iter()
        .map(|h| (h.prompt, h.position, h.dim))
        .collect();
    Score::of(&found, &truth)
}

/// One prompt set of the validation corpus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusSet {
    /// A built-in set (`outlierlab datasets`) or a file.
    pub name: String,
    /// How many prompts (all when absent).
    #[serde(default)]
    pub count: Option<usize>,
    #[serde(default)]
    pub offset: usize,
}

impl CorpusSet {
    /// `NAME` or `NAME:COUNT`, as the command line takes it.
    pub fn parse(s: &str) -> CorpusSet {
        match s.rsplit_once(':') {
            Some((n, c)) if c.parse::<usize>().is_ok() => CorpusSet {
                name: n.to_string(),
                count: c.parse().ok(),
                offset: 0,
            },
            _ => CorpusSet {
                name: s.to_string(),
                count: None,
                offset: 0,
            },
        }
    }

    /// Its prompts, in file order.
    pub fn prompts(&self) -> Result<Vec<String>> {
        let all = crate::datasets::load(&self.name)?;
        let n = self.count.unwrap_or(all.len().saturating_sub(self.offset));
        crate::datasets::take(&all, n, self.offset, None)
    }
}

/// A study's `detection_validation:` block (and what `outlierlab label` takes as flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationSpec {
    /// The prompts scanned and intervened on; PR #154's trigger prompt is always the first.
    pub corpus: Vec<CorpusSet>,
    #[serde(default = "d_candidate_ratio")]
    pub candidate_ratio: f32,
    #[serde(default = "d_max_candidates")]
    pub max_candidates: usize,
    #[serde(default = "d_zero_kl")]
    pub zero_kl: f64,
    #[serde(default = "d_mean_kl")]
    pub mean_kl: f64,
    /// pr154's 31 criteria subsets are scored under each median scope ...
    #[serde(default = "d_scopes")]
    pub median_scope: Vec<MedianScope>,
    /// ... and each persistence mode.
    #[serde(default = "d_modes")]
    pub persistence_mode: Vec<PersistenceMode>,
    /// Threshold curves (13 ratios from the scan floor, 20, to 10,000): `median-only` and
    /// `sun2024` sweep median_ratio, `pr154` sweeps median_ratio and mad_ratio together.
    #[serde(default = "d_curves")]
    pub curves: Vec<String>,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
}

fn d_candidate_ratio() -> f32 {
    ValidationSettings::default().candidate_ratio
}
fn d_max_candidates() -> usize {
    ValidationSettings::default().max_candidates
}
fn d_zero_kl() -> f64 {
    ValidationSettings::default().zero_kl
}
fn d_mean_kl() -> f64 {
    ValidationSettings::default().mean_kl
}
fn d_scopes() -> Vec<MedianScope> {
    vec![MedianScope::Position, MedianScope::Layer]
}
fn d_modes() -> Vec<PersistenceMode> {
    vec![PersistenceMode::Consecutive]
}
fn d_curves() -> Vec<String> {
    CURVES.iter().map(|s| s.to_string()).collect()
}
fn d_batch() -> usize {
    16
}

/// The presets whose thresholds can be swept as curves.
pub const CURVES: [&str; 3] = ["median-only", "sun2024", "pr154"];

impl ValidationSpec {
    pub fn settings(&self) -> ValidationSettings {
        ValidationSettings {
            candidate_ratio: self.candidate_ratio,
            max_candidates: self.max_candidates,
            zero_kl: self.zero_kl,
            mean_kl: self.mean_kl,
        }
    }

    /// What a value means, checked without a model; `Err((key, message))`.
    pub fn check(&self) -> std::result::Result<(), (String, String)> {
        if self.corpus.is_empty() {
            return Err(("corpus".into(), "the corpus is empty: name at least one prompt set, e.g. [{name: harmless-outlierlab, count: 16}]".into()));
        }
        if self.candidate_ratio.is_nan() || self.candidate_ratio < super::config::FLOOR {
            return Err((
                "candidate_ratio".into(),
                format!(
                    "{} is below the scan floor ({}): entries under it are never scanned",
                    self.candidate_ratio,
                    super::config::FLOOR
                ),
            ));
        }
        if !(self.zero_kl > self.mean_kl && self.mean_kl >= 0.0) {
            return Err((
                "zero_kl".into(),
                format!(
                    "zero_kl ({}) must exceed mean_kl ({}) ≥ 0: massive = zeroing hurts and holding at the mean does not",
                    self.zero_kl, self.mean_kl
                ),
            ));
        }
        if self.max_candidates == 0 || self.batch_size == 0 {
            return Err((
                "max_candidates".into(),
                "max_candidates and batch_size must be at least 1".into(),
            ));
        }
        for (i, c) in self.curves.iter().enumerate() {
            if !CURVES.contains(&c.as_str()) {
                return Err((
                    format!("curves[{i}]"),
                    format!("unknown curve '{c}'; expected one of {}", CURVES.join(", ")),
                ));
            }
        }
        if self.median_scope.is_empty() || self.persistence_mode.is_empty() {
            return Err((
                "median_scope".into(),
                "median_scope and persistence_mode need at least one value each".into(),
            ));
        }
        Ok(())
    }
}

/// One configuration to score and where it belongs: `group` collects the configurations read
/// together (pr154's subsets under one scope and mode; one threshold curve).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Named {
    pub name: String,
    pub group: String,
    /// The swept threshold of a curve's point.
    pub threshold: Option<f64>,
    pub config: DetectConfig,
}

/// The prefix of every criteria-subset group.
pub const SUBSETS: &str = "pr154 subsets";

fn scope_name(s: MedianScope) -> &'static str {
    match s {
        MedianScope::Position => "median per position",
        MedianScope::Layer => "median per layer",
    }
}

fn mode_name(m: PersistenceMode) -> &'static str {
    match m {
        PersistenceMode::Consecutive => "persistence consecutive",
        PersistenceMode::Total => "persistence total",
        PersistenceMode::DimLayers => "persistence dim-layers",
    }
}

/// The configurations the spec asks for: every preset at its defaults, pr154's 31 criteria
/// subsets under each median scope and persistence mode (the floor named where a subset has no
/// value criterion), and the threshold curves. All scan valid positions: the corpus is scored
/// where the labels are.
pub fn configurations(spec: &ValidationSpec) -> Result<Vec<Named>> {
    use super::config::{preset, Positions, CRITERIA, FLOOR, PRESETS};
    let valid = |mut c: DetectConfig| {
        c.positions = Positions::Valid;
        c
    };
    let mut out = Vec::new();
    for (name, _) in PRESETS {
        out.push(Named {
            name: format!("{name} (defaults)"),
            group: "presets".into(),
            threshold: None,
            config: valid(preset(name)?),
        });
    }
    for &scope in &spec.median_scope {
        for &mode in &spec.persistence_mode {
            let group = format!("{SUBSETS}, {}, {}", scope_name(scope), mode_name(mode));
            for mask in 1..(1u32 << CRITERIA.len()) {
                let mut c = valid(preset("pr154")?);
                c.median_scope = scope;
                c.persistence_mode = mode;
                for (i, k) in CRITERIA.iter().enumerate() {
                    if mask & (1 << i) == 0 {
                        c.switch_off(k);
                    }
                }
                if !c.has_value_criterion() {
                    c.floor = Some(FLOOR);
                }
                out.push(Named {
                    name: c.active_criteria().join("+"),
                    group: group.clone(),
                    threshold: None,
                    config: c,
                });
            }
        }
    }
    for curve in &spec.curves {
        for f in curve_grid() {
            let mut c = valid(preset(curve)?);
            c.set(&format!("median_ratio={f:.1}"))?;
            if curve == "pr154" {
                c.set(&format!("mad_ratio={f:.1}"))?;
            }
            out.push(Named {
                name: format!("{curve} at {f:.0}"),
                group: format!("curve {curve}"),
                threshold: Some(f),
                config: c,
            });
        }
    }
    Ok(out)
}

/// From the scan floor (20x) to 10,000x, evenly on a log scale.
pub fn curve_grid() -> Vec<f64> {
    (0..13)
        .map(|i| 20f64 * 500f64.powf(i as f64 / 12.0))
        .collect()
}

/// One configuration's detections and scores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scored {
    pub name: String,
    pub group: String,
    pub threshold: Option<f64>,
    pub dims: Vec<u32>,
    pub dim: Score,
    pub ptd: Score,
}

/// A criterion's effect within one group of criteria subsets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Redundancy {
    pub criterion: String,
    /// Subset pairs that differ in this criterion alone (the floor aside) ...
    pub pairs: usize,
    /// ... and those where switching it off changes precision or recall (dims or entries).
    pub changed: usize,
}

impl Redundancy {
    pub fn redundant(&self) -> bool {
        self.pairs > 0 && self.changed == 0
    }
}

/// What one group of criteria subsets says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupSummary {
    pub group: String,
    pub best_f1: f64,
    /// The subsets (fewest criteria first) reaching the best dim-level F1.
    pub smallest: Vec<String>,
    pub best_f1_ptd: f64,
    pub redundancy: Vec<Redundancy>,
}

/// How many candidates are labelled massive as the two label thresholds move: a reader sees
/// whether the labels hang on the chosen values.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelSensitivity {
    pub zero_kl: f64,
    pub mean_kl: f64,
    pub massive: Vec<u32>,
}

/// Everything one validation found: the file `validation.json` of a run and `label --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Validation {
    pub model: String,
    pub raw: bool,
    pub spec: ValidationSpec,
    pub corpus: Vec<String>,
    pub candidates: Vec<Candidate>,
    pub scored: Vec<Scored>,
    pub groups: Vec<GroupSummary>,
    pub sensitivity: Vec<LabelSensitivity>,
    pub seconds: f64,
}

/// Runs the validation: scan the corpus (trigger first), label the candidates by intervention,
/// score the spec's configurations and `extra` (e.g. a study's own detections) against them.
pub fn run(
    lm: &LoadedModel,
    system: Option<&str>,
    spec: &ValidationSpec,
    extra: Vec<Named>,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<Validation> {
    use super::config::{MedianKind, PR154_TRIGGER};
    use super::{HiddenConvention, Source};
    let t0 = std::time::Instant::now();
    let settings = spec.settings();
    let mut prompts: Vec<(Source, String)> = vec![(Source::Trigger, PR154_TRIGGER.to_string())];
    for set in &spec.corpus {
        prompts.extend(set.prompts()?.into_iter().map(|t| (Source::Good, t)));
    }
    // The residual convention: the states the interventions hold are the residual stream.
    let states = super::collect_states(
        lm,
        &prompts,
        system,
        HiddenConvention::Residual,
        spec.batch_size,
        crate::model::PadRows::SelfOnly,
        |_| {},
    )?;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|(_, p)| Ok(lm.encode_chat(system, p)?.ids))
        .collect::<Result<_>>()?;
    let scan = super::scan(&states, MedianKind::Average, super::Floor::default());
    let mut configs = configurations(spec)?;
    configs.extend(extra);
    let detections: Vec<Detection> = configs
        .iter()
        .map(|n| apply(&n.config, &scan))
        .collect::<Result<_>>()?;
    // A configuration's dims are candidates whatever their ratio, so that each one it finds is
    // labelled; those that find more than a handful are broad sweeps, not claims.
    let also: BTreeSet<u32> = detections
        .iter()
        .map(|d| d.dim_ids())
        .filter(|d| d.len() <= 8)
        .flatten()
        .collect();
    let mut cands = candidates(&scan, &settings, &also);
    let total = cands.len();
    let mut done = 0;
    label(lm, &states, &ids, &mut cands, &settings, |n| {
        done += n;
        progress("interventions", done, total)
    })?;
    let scored: Vec<Scored> = configs
        .iter()
        .zip(&detections)
        .map(|(n, d)| Scored {
            name: n.name.clone(),
            group: n.group.clone(),
            threshold: n.threshold,
            dims: d.dim_ids(),
            dim: score(&d.dim_ids(), &cands),
            ptd: score_ptd(d, &cands),
        })
        .collect();
    let groups = summarise(&scored);
    let sensitivity = sensitivity(&cands, &settings);
    Ok(Validation {
        model: lm.spec.clone(),
        raw: lm.raw,
        spec: spec.clone(),
        corpus: prompts.into_iter().map(|p| p.1).collect(),
        candidates: cands,
        scored,
        groups,
        sensitivity,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Per group of criteria subsets: the best F1, the smallest subsets that reach it, and each
/// criterion's pairs (subsets that differ in it alone) and how many of them it changes.
pub fn summarise(scored: &[Scored]) -> Vec<GroupSummary> {
    let set_of = |k: &str| -> BTreeSet<String> {
        k.split('+')
            .filter(|c| *c != "floor")
            .map(String::from)
            .collect()
    };
    let mut groups: Vec<&str> = scored
        .iter()
        .filter(|s| s.group.starts_with(SUBSETS))
        .map(|s| s.group.as_str())
        .collect();
    groups.dedup();
    groups
        .into_iter()
        .map(|g| {
            let mine: Vec<&Scored> = scored.iter().filter(|s| s.group == g).collect();
            let best_f1 = mine.iter().map(|s| s.dim.f1).fold(0.0, f64::max);
            let best_f1_ptd = mine.iter().map(|s| s.ptd.f1).fold(0.0, f64::max);
            let mut at_best: Vec<&Scored> = mine
                .iter()
                .copied()
                .filter(|s| best_f1 > 0.0 && s.dim.f1 == best_f1)
                .collect();
            at_best.sort_by_key(|s| (set_of(&s.name).len(), s.name.clone()));
            let fewest = at_best.first().map(|s| set_of(&s.name).len());
            let smallest = at_best
                .iter()
                .filter(|s| Some(set_of(&s.name).len()) == fewest)
                .map(|s| s.name.clone())
                .collect();
            let redundancy = super::config::CRITERIA
                .iter()
                .map(|crit| {
                    let (mut pairs, mut changed) = (0, 0);
                    for s in &mine {
                        let on = set_of(&s.name);
                        if !on.contains(*crit) || on.len() == 1 {
                            continue;
                        }
                        let mut off = on.clone();
                        off.remove(*crit);
                        if let Some(t) = mine.iter().find(|t| set_of(&t.name) == off) {
                            pairs += 1;
                            if !(s.dim.same(&t.dim) && s.ptd.same(&t.ptd)) {
                                changed += 1;
                            }
                        }
                    }
                    Redundancy {
                        criterion: crit.to_string(),
                        pairs,
                        changed,
                    }
                })
                .collect();
            GroupSummary {
                group: g.to_string(),
                best_f1,
                smallest,
                best_f1_ptd,
                redundancy,
            }
        })
        .collect()
}

/// The labels under zero_kl × {1/3, 1, 3} and mean_kl × {1/3, 1, 3} of the chosen values.
pub fn sensitivity(cands: &[Candidate], s: &ValidationSettings) -> Vec<LabelSensitivity> {
    let mut out = Vec::new();
    for fz in [1.0 / 3.0, 1.0, 3.0] {
        for fm in [1.0 / 3.0, 1.0, 3.0] {
            let (z, m) = (s.zero_kl * fz, s.mean_kl * fm);
            out.push(LabelSensitivity {
                zero_kl: z,
                mean_kl: m,
                massive: cands
                    .iter()
                    .filter(|c| c.zero_kl >= z && c.mean_kl <= m)
                    .map(|c| c.dim)
                    .collect(),
            });
        }
    }
    out
}
