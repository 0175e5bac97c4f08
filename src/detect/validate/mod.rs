//! Which detected dims *are* massive activations: labels by intervention (Sun et al. 2024,
//! Table 3) and every detection configuration scored against them.
//!
//! A massive activation acts as a fixed bias: holding it at **zero** from the hidden state where
//! it first appears wrecks the model's predictions at the later positions, holding it at its
//! **mean** over the corpus barely changes them. Each candidate dim (found by a loose scan of the
//! corpus) is held both ways at every position where it stands out, and the damage is measured at
//! the positions after the first one: the mean KL(unmodified ‖ intervened) of the next-token
//! distributions, and the change in mean log-likelihood of the prompt's own next tokens.
//!
//! Here: the settings and the corpus, and [`run`], the validation's steps in the order they run.
//! `labels` holds the interventions, `configs` what is scored, `scores` the in-sample scores,
//! `agreement` two runs' labels compared; the held-out scoring is `detect::heldout`.

mod agreement;
mod configs;
mod labels;
mod scores;

pub use agreement::LabelAgreement;
pub use configs::{configurations, curve_grid, subsets, Named, SUBSETS};
pub use labels::{candidates, label, label_entries, Candidate, EntryLabel, INSTANCE_FACTOR};
pub(crate) use scores::nan_if_null;
pub use scores::{score, sensitivity, summarise, GroupSummary, LabelSensitivity, Score, Scored};

use super::apply;
use super::config::{MedianScope, PersistenceMode};
use super::heldout::Found;
use super::scan::{PromptStates, Scan, Source};
use crate::model::LoadedModel;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationSettings {
    /// An entry is a candidate when its |a| is at least this many times its position's median.
    pub candidate_ratio: f32,
    /// At most this many candidate dims (the largest peaks first).
    pub max_candidates: usize,
    /// Massive: zeroing does at least this much damage (mean KL, nats) ...
    pub zero_kl: f64,
    /// ... and holding at the mean at most this much.
    pub mean_kl: f64,
    /// A dim's label holds all its instances in at most this many prompts (a seeded sample of
    /// those where it stands out).
    pub label_prompts: usize,
    /// Entry labels: at most this many instances per dim, a seeded simple random sample, each
    /// held alone.
    pub entries_per_dim: usize,
    /// Seeds the samples, the split and the bootstrap.
    pub seed: u64,
}

impl Default for ValidationSettings {
    fn default() -> Self {
        ValidationSettings {
            candidate_ratio: 100.0,
            max_candidates: 24,
            zero_kl: 1.0,
            mean_kl: 0.1,
            label_prompts: 16,
            entries_per_dim: 32,
            seed: 0,
        }
    }
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
    /// Draw `count` prompts with this seed instead of taking the first ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// `good` (harmless) or `bad` (harmful); a built-in set's kind when absent, else `good`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub side: Option<Source>,
}

impl CorpusSet {
    /// `NAME` or `NAME:COUNT`, as the command line takes it.
    pub fn parse(s: &str) -> CorpusSet {
        let (name, count) = match s.rsplit_once(':') {
            Some((n, c)) if c.parse::<usize>().is_ok() => (n, c.parse().ok()),
            _ => (s, None),
        };
        CorpusSet {
            name: name.to_string(),
            count,
            offset: 0,
            seed: None,
            side: None,
        }
    }

    /// Its prompts: in file order, or drawn with its seed.
    pub fn prompts(&self) -> Result<Vec<String>> {
        let all = crate::datasets::load(&self.name)?;
        let n = self.count.unwrap_or(all.len().saturating_sub(self.offset));
        crate::datasets::take(&all, n, self.offset, self.seed)
    }

    /// Which side of the direction its prompts count on.
    pub fn source(&self) -> Source {
        self.side
            .unwrap_or_else(|| match crate::datasets::manifest(&self.name) {
                Some(m) if m.kind == crate::datasets::Kind::Harmful => Source::Bad,
                _ => Source::Good,
            })
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
    /// A dim's label holds it in at most this many prompts ...
    #[serde(default = "d_label_prompts")]
    pub label_prompts: usize,
    /// ... and at most this many of its instances are labelled one by one.
    #[serde(default = "d_entries_per_dim")]
    pub entries_per_dim: usize,
    /// Seeds the label samples, the selection/held-out split and the bootstrap.
    #[serde(default)]
    pub seed: u64,
    /// Bootstrap draws over the held-out prompts.
    #[serde(default = "d_bootstrap")]
    pub bootstrap: usize,
}

fn d_label_prompts() -> usize {
    ValidationSettings::default().label_prompts
}
fn d_entries_per_dim() -> usize {
    ValidationSettings::default().entries_per_dim
}
fn d_bootstrap() -> usize {
    1000
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
            label_prompts: self.label_prompts,
            entries_per_dim: self.entries_per_dim,
            seed: self.seed,
        }
    }

    /// What a value means, checked without a model; `Err((key, message))`.
    pub fn check(&self) -> std::result::Result<(), (String, String)> {
        if self.corpus.is_empty() {
            return Err(("corpus".into(), "the corpus is empty: name at least one prompt set, e.g. [{name: harmless-outlierlab, count: 16}]".into()));
        }
        for (i, c) in self.corpus.iter().enumerate() {
            if c.side == Some(Source::Trigger) {
                return Err((
                    format!("corpus[{i}].side"),
                    "side is good or bad; the trigger prompt is always scanned first on its own"
                        .into(),
                ));
            }
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
        for (key, v) in [
            ("max_candidates", self.max_candidates),
            ("batch_size", self.batch_size),
            ("label_prompts", self.label_prompts),
            ("entries_per_dim", self.entries_per_dim),
            ("bootstrap", self.bootstrap),
        ] {
            if v == 0 {
                return Err((key.into(), format!("{key} must be at least 1")));
            }
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

/// Everything one validation found: the file `validation.json` of a run and `label --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Validation {
    pub model: String,
    pub raw: bool,
    /// The precision the model ran in (`f32`, `bf16`).
    #[serde(default)]
    pub precision: Option<String>,
    pub spec: ValidationSpec,
    pub corpus: Vec<String>,
    /// Each corpus prompt's side (trigger, good, bad).
    #[serde(default)]
    pub sources: Vec<Source>,
    pub candidates: Vec<Candidate>,
    /// Every configuration on the whole corpus: in-sample, for comparison only.
    pub scored: Vec<Scored>,
    pub groups: Vec<GroupSummary>,
    pub sensitivity: Vec<LabelSensitivity>,
    /// The labelled instances, and how many instances the last-position rule left out.
    #[serde(default)]
    pub entries: Vec<EntryLabel>,
    #[serde(default)]
    pub last_position_instances: usize,
    /// The hidden state the direction shares are taken at (heretic's default direction index
    /// plus one: state 0 is the embedding output).
    #[serde(default)]
    pub direction_state: Option<usize>,
    #[serde(default)]
    pub heldout: Option<super::heldout::HeldOut>,
    /// Seconds per phase, in the order they ran.
    #[serde(default)]
    pub phases: Vec<(String, f64)>,
    pub seconds: f64,
}

/// What labels depend on: a stored label file is used only when all of it matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LabelKey {
    model: String,
    precision: String,
    raw: bool,
    system: Option<String>,
    corpus: Vec<String>,
    settings: ValidationSettings,
    dims: Vec<u32>,
}

/// `validation/labels.json`: the interventions' results, written as soon as they are done, so
/// that scoring can be redone (or a run resumed) without them.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LabelCache {
    key: LabelKey,
    candidates: Vec<Candidate>,
    entries: Vec<EntryLabel>,
    phases: Vec<(String, f64)>,
}

/// The validation's scan of some prompts (the whole corpus, or one half alone).
fn scan_of(states: &[PromptStates]) -> Scan {
    super::scan(
        states,
        super::config::MedianKind::Average,
        super::Floor::default(),
    )
}

/// Applies every configuration to one half's scan and names the hits by their prompts' global
/// indices.
fn detect_on(scan: &Scan, global: &[u32], configs: &[Named]) -> Result<Vec<Found>> {
    configs
        .iter()
        .map(|n| Ok(Found::of(&apply(&n.config, scan)?).renamed(global)))
        .collect()
}

/// The corpus: PR #154's trigger first, then each set on its side.
fn corpus(spec: &ValidationSpec) -> Result<Vec<(Source, String)>> {
    let mut prompts = vec![(Source::Trigger, super::config::PR154_TRIGGER.to_string())];
    for set in &spec.corpus {
        let side = set.source();
        prompts.extend(set.prompts()?.into_iter().map(|t| (side, t)));
    }
    Ok(prompts)
}

/// Seconds per phase, in the order they ran.
struct Phases {
    list: Vec<(String, f64)>,
    last: std::time::Instant,
}

impl Phases {
    fn new() -> Phases {
        Phases {
            list: Vec::new(),
            last: std::time::Instant::now(),
        }
    }

    fn lap(&mut self, name: &str) {
        self.list
            .push((name.to_string(), self.last.elapsed().as_secs_f64()));
        self.last = std::time::Instant::now();
    }
}

/// The labels stored in `path` by an earlier run, when everything they depend on matches.
fn stored_labels(path: Option<&std::path::Path>, key: &LabelKey) -> Result<Option<LabelCache>> {
    let Some(p) = path.filter(|p| p.exists()) else {
        return Ok(None);
    };
    let text =
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    Ok(serde_json::from_str::<LabelCache>(&text)
        .ok()
        .filter(|c| c.key == *key))
}

/// The truths the scores count: the entry labels with their weights, every candidate instance,
/// the dims labelled massive; each prompt's last position left out (nothing later shows an
/// entry's damage there). Also how many instances that rule leaves out.
fn truth_of(
    states: &[PromptStates],
    cands: &[Candidate],
    entries: &[EntryLabel],
) -> (super::heldout::Truth, usize) {
    let skip: std::collections::HashSet<(u32, u32)> = states
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u32, p.last_position() as u32))
        .collect();
    let left_out = cands
        .iter()
        .flat_map(|c| c.positions.iter())
        .filter(|k| skip.contains(k))
        .count();
    let massive: BTreeSet<u32> = cands.iter().filter(|c| c.massive).map(|c| c.dim).collect();
    let truth = super::heldout::Truth::new(
        entries
            .iter()
            .filter(|e| e.damage.known())
            .map(|e| (e.prompt, e.position, e.dim, e.weight, e.massive)),
        cands
            .iter()
            .flat_map(|c| c.positions.iter().map(move |&(p, t)| (p, t, c.dim))),
        &massive,
        skip,
    );
    (truth, left_out)
}

/// Every configuration on the whole corpus, against the labels: in-sample, for comparison.
fn in_sample(
    configs: &[Named],
    detections: &[Found],
    truth: &super::heldout::Truth,
    cands: &[Candidate],
    n: usize,
) -> Vec<Scored> {
    let everyone: Vec<u32> = (0..n as u32).collect();
    configs
        .iter()
        .zip(detections)
        .map(|(c, d)| {
            let t = super::heldout::tallies(d, truth, &everyone);
            let (_, e) = super::heldout::score(&t, truth, &everyone);
            let n_entries = t.values().map(|x| x.entries.len()).sum();
            Scored {
                name: c.name.clone(),
                group: c.group.clone(),
                threshold: c.threshold,
                dims: d.dims.clone(),
                dim: score(&d.dims, cands),
                ptd: Score::from_entries(&e, n_entries),
            }
        })
        .collect()
}

/// The corpus split by prompt, each half scanned alone, every configuration applied to both and
/// scored held out. At PR #154's thresholds its five may find nothing, and switching one off
/// from nothing says nothing: the subsets are scored again at the pr154 curve's threshold
/// chosen on the selection half.
fn held_out(
    states: Vec<PromptStates>,
    spec: &ValidationSpec,
    mut configs: Vec<Named>,
    truth: &super::heldout::Truth,
) -> Result<super::heldout::HeldOut> {
    let split = super::heldout::Split::new(states.len(), spec.seed);
    let mut slots: Vec<Option<PromptStates>> = states.into_iter().map(Some).collect();
    let mut half = |which: &[u32]| -> Scan {
        let s: Vec<PromptStates> = which
            .iter()
            .map(|&i| slots[i as usize].take().expect("each prompt in one half"))
            .collect();
        scan_of(&s)
    };
    let (sel_scan, held_scan) = (half(&split.selection), half(&split.heldout));
    let mut selection = detect_on(&sel_scan, &split.selection, &configs)?;
    let mut heldout = detect_on(&held_scan, &split.heldout, &configs)?;
    if let Some(t) =
        super::heldout::choose_on_selection(&configs, &selection, truth, &split, "curve pr154")
    {
        let more = subsets(spec, Some(t))?;
        selection.extend(detect_on(&sel_scan, &split.selection, &more)?);
        heldout.extend(detect_on(&held_scan, &split.heldout, &more)?);
        configs.extend(more);
    }
    drop((sel_scan, held_scan));
    Ok(super::heldout::evaluate(
        &super::heldout::Inputs {
            names: &configs,
            selection: &selection,
            heldout: &heldout,
        },
        truth,
        &split,
        spec.bootstrap,
    ))
}

/// Runs the validation: scan the corpus (trigger first), label the candidates by intervention
/// (per dim and per entry; stored in `labels_cache` and reused from it when everything they
/// depend on matches), measure their weight in the direction, and score the spec's
/// configurations and `extra` (e.g. a study's own detections) on the held-out half, chosen on
/// the selection half.
pub fn run(
    lm: &LoadedModel,
    system: Option<&str>,
    spec: &ValidationSpec,
    extra: Vec<Named>,
    labels_cache: Option<&std::path::Path>,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<Validation> {
    let t0 = std::time::Instant::now();
    let mut phases = Phases::new();
    let settings = spec.settings();
    let prompts = corpus(spec)?;
    // The residual convention: the states the interventions hold are the residual stream.
    let (n_prompts, mut scanned) = (prompts.len(), 0);
    let states = super::collect_states(
        lm,
        &prompts,
        system,
        super::HiddenConvention::Residual,
        spec.batch_size,
        crate::model::PadRows::SelfOnly,
        |n| {
            scanned += n;
            progress("hidden states", scanned, n_prompts)
        },
    )?;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|(_, p)| Ok(lm.encode_chat(system, p)?.ids))
        .collect::<Result<_>>()?;
    let scan = scan_of(&states);
    let mut configs = configurations(spec)?;
    configs.extend(extra);
    let detections: Vec<Found> = configs
        .iter()
        .map(|n| Ok(Found::of(&apply(&n.config, &scan)?)))
        .collect::<Result<_>>()?;
    // A configuration's dims are candidates whatever their ratio, so that each one it finds is
    // labelled; those that find more than a handful are broad sweeps, not claims.
    let also: BTreeSet<u32> = detections
        .iter()
        .map(|d| d.dims.clone())
        .filter(|d| d.len() <= 8)
        .flatten()
        .collect();
    let mut cands = candidates(&scan, &settings, &also);
    drop(scan);
    phases.lap("hidden states and scan");
    let key = LabelKey {
        model: lm.spec.clone(),
        precision: lm.model.precision().name().to_string(),
        raw: lm.raw,
        system: system.map(String::from),
        corpus: prompts.iter().map(|p| p.1.clone()).collect(),
        settings: settings.clone(),
        dims: cands.iter().map(|c| c.dim).collect(),
    };
    let mut entries = match stored_labels(labels_cache, &key)? {
        Some(c) => {
            cands = c.candidates;
            let stored = c
                .phases
                .into_iter()
                .map(|(n, s)| (format!("{n} (stored)"), s));
            phases.list.extend(stored);
            c.entries
        }
        None => {
            let (total, mut done) = (cands.len(), 0);
            label(lm, &states, &ids, &mut cands, &settings, |n| {
                done += n;
                progress("dim labels", done, total)
            })?;
            phases.lap("dim labels");
            let entries = label_entries(lm, &states, &ids, &mut cands, &settings, |done, n| {
                progress("entry labels", done, n)
            })?;
            phases.lap("entry labels");
            if let Some(p) = labels_cache {
                let c = LabelCache {
                    key,
                    candidates: cands.clone(),
                    entries: entries.clone(),
                    phases: phases.list[phases.list.len() - 2..].to_vec(),
                };
                crate::fs::write_atomic(p, serde_json::to_string(&c)?.as_bytes())?;
            }
            entries
        }
    };
    let direction_state = Some(crate::direction::default_index(lm.model.num_layers()) + 1)
        .filter(|&s| s < lm.model.num_layers() + 1);
    if let Some(st) = direction_state {
        let d = lm.model.hidden_size();
        labels::direction_shares(&states, st, d, &mut cands, &mut entries);
    }
    let (truth, last_position_instances) = truth_of(&states, &cands, &entries);
    let scored = in_sample(&configs, &detections, &truth, &cands, states.len());
    drop(detections);
    let sources: Vec<Source> = states.iter().map(|p| p.source).collect();
    let heldout = held_out(states, spec, configs, &truth)?;
    phases.lap("scores");
    Ok(Validation {
        model: lm.spec.clone(),
        raw: lm.raw,
        precision: Some(lm.model.precision().name().to_string()),
        spec: spec.clone(),
        corpus: prompts.into_iter().map(|p| p.1).collect(),
        sources,
        groups: summarise(&scored),
        sensitivity: sensitivity(&cands, &settings),
        candidates: cands,
        scored,
        entries,
        last_position_instances,
        direction_state,
        heldout: Some(heldout),
        phases: phases.list,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
