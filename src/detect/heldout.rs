//! Held-out scoring of detection configurations against labels by intervention.
//!
//! The corpus is split by prompt: thresholds and "best" criteria subsets are chosen on the
//! *selection* half, and precision, recall and F1 are reported on the *held-out* half with
//! bootstrap intervals over its prompts (the prompt is the unit). Entry-level truths come from a
//! sample of labelled instances per dim, each weighted by the inverse of its inclusion
//! probability, so the entry-level precision and recall are ratio estimators over that design.

use super::apply::Detection;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// The corpus split by prompt (global prompt indices).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Split {
    pub seed: u64,
    pub selection: Vec<u32>,
    pub heldout: Vec<u32>,
}

impl Split {
    /// A seeded permutation of the prompts: the first half (rounded up) selects, the rest is held
    /// out. No prompt is in both.
    pub fn new(n: usize, seed: u64) -> Split {
        let mut idx: Vec<u32> = (0..n as u32).collect();
        crate::stats::Rng::new(seed ^ 0x5EED_5911).shuffle(&mut idx);
        let cut = n.div_ceil(2);
        let mut selection = idx[..cut].to_vec();
        let mut heldout = idx[cut..].to_vec();
        selection.sort_unstable();
        heldout.sort_unstable();
        Split {
            seed,
            selection,
            heldout,
        }
    }
}

/// What the labels say, in the terms the estimators need.
pub struct Truth {
    /// Labelled instances: (prompt, position, dim) → (weight, massive).
    labelled: HashMap<(u32, u32, u32), (f64, bool)>,
    /// Every candidate instance (labelled or not).
    instances: HashSet<(u32, u32, u32)>,
    /// Per prompt: the weighted count of massive labelled instances, and their number.
    massive: HashMap<u32, (f64, usize)>,
    /// Per prompt: the dims labelled massive (dim level) with an instance there.
    massive_dims: HashMap<u32, BTreeSet<u32>>,
    /// (prompt, position)s left out of the entry scores: each prompt's last position, where no
    /// later position can show an entry's damage.
    skip: HashSet<(u32, u32)>,
}

impl Truth {
    /// `entries`: (prompt, position, dim, weight, massive) of each labelled instance;
    /// `instances`: every candidate instance; `massive_dims`: the dims labelled massive; `skip`:
    /// (prompt, position)s no entry score counts.
    pub fn new(
        entries: impl IntoIterator<Item = (u32, u32, u32, f64, bool)>,
        instances: impl IntoIterator<Item = (u32, u32, u32)>,
        massive_dims: &BTreeSet<u32>,
        skip: HashSet<(u32, u32)>,
    ) -> Truth {
        let mut labelled = HashMap::new();
        let mut massive: HashMap<u32, (f64, usize)> = HashMap::new();
        for (p, t, d, w, y) in entries {
            labelled.insert((p, t, d), (w, y));
            if y {
                let m = massive.entry(p).or_default();
                m.0 += w;
                m.1 += 1;
            }
        }
        let instances: HashSet<(u32, u32, u32)> = instances
            .into_iter()
            .filter(|&(p, t, _)| !skip.contains(&(p, t)))
            .collect();
        let mut md: HashMap<u32, BTreeSet<u32>> = HashMap::new();
        for &(p, _, d) in &instances {
            if massive_dims.contains(&d) {
                md.entry(p).or_default().insert(d);
            }
        }
        Truth {
            labelled,
            instances,
            massive,
            massive_dims: md,
            skip,
        }
    }

    /// Labelled instances massive held alone, on `prompts`.
    pub fn massive_entries_on(&self, prompts: &[u32]) -> usize {
        prompts
            .iter()
            .map(|p| self.massive.get(p).map_or(0, |m| m.1))
            .sum()
    }
}

/// Entry-level scores decide only where each half has at least this many labelled instances
/// that are massive held alone: with fewer, an entry F1 rests on a handful of instances.
pub const MIN_MASSIVE_ENTRIES: usize = 10;

/// Which F1 the choices and readings use: the entries', or the dims' where too few entries are
/// massive held alone (a dim can be massive only as a set of instances: one held alone, the
/// others still carry it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Basis {
    #[default]
    Entries,
    Dims,
}

impl Basis {
    /// Entries where each half has at least [`MIN_MASSIVE_ENTRIES`] massive labelled instances.
    pub fn of(truth: &Truth, split: &Split) -> Basis {
        let enough = |p: &[u32]| truth.massive_entries_on(p) >= MIN_MASSIVE_ENTRIES;
        if enough(&split.selection) && enough(&split.heldout) {
            Basis::Entries
        } else {
            Basis::Dims
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Basis::Entries => "entry",
            Basis::Dims => "dim",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Basis::Entries => "entries",
            Basis::Dims => "dims",
        }
    }

    /// The selection half's F1 on this basis.
    pub fn selection(self, s: &HeldOutScore) -> f64 {
        self.pick(&s.selection_entry, &s.selection_dim).f1
    }

    /// The held-out F1 on this basis.
    pub fn heldout(self, s: &HeldOutScore) -> Estimate {
        *self.pick(&s.entry_f1, &s.dim_f1)
    }

    /// Of an entry-level and a dim-level value, the one on this basis.
    pub fn pick<'a, T>(self, entry: &'a T, dim: &'a T) -> &'a T {
        match self {
            Basis::Entries => entry,
            Basis::Dims => dim,
        }
    }
}

/// One configuration on one prompt.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub dims: BTreeSet<u32>,
    pub entries: BTreeSet<(u32, u32)>,
    /// Weighted detected instances labelled massive, and weighted detected labelled instances.
    a: f64,
    b: f64,
    /// Detected entries that are no candidate instance: not massive by the instance rule.
    other: usize,
}

/// What a detection found, as the scores see it: its dims, and per prompt the (position, dim)s
/// it confirmed at any hidden state. Kept instead of the detection's hits (one per layer), which
/// for a broad configuration over hundreds of prompts run to millions.
#[derive(Debug, Clone, Default)]
pub struct Found {
    pub dims: Vec<u32>,
    /// Dims it names without a confirmed entry (top-k alone): claimed on every prompt.
    pub unplaced: Vec<u32>,
    pub by_prompt: BTreeMap<u32, BTreeSet<(u32, u32)>>,
}

impl Found {
    pub fn of(d: &Detection) -> Found {
        let mut by_prompt: BTreeMap<u32, BTreeSet<(u32, u32)>> = BTreeMap::new();
        for h in &d.hits {
            by_prompt
                .entry(h.prompt)
                .or_default()
                .insert((h.position, h.dim));
        }
        let placed: BTreeSet<u32> = d.hits.iter().map(|h| h.dim).collect();
        let dims = d.dim_ids();
        Found {
            unplaced: dims
                .iter()
                .copied()
                .filter(|x| !placed.contains(x))
                .collect(),
            dims,
            by_prompt,
        }
    }

    /// The same with its prompts renamed by `global` (a half's local index → the corpus's).
    pub fn renamed(mut self, global: &[u32]) -> Found {
        self.by_prompt = self
            .by_prompt
            .into_iter()
            .map(|(p, e)| (global[p as usize], e))
            .collect();
        self
    }
}

/// Per prompt, what `d` found there (every prompt of `prompts` gets a tally, empty or not).
pub fn tallies(d: &Found, truth: &Truth, prompts: &[u32]) -> BTreeMap<u32, Tally> {
    let mut out: BTreeMap<u32, Tally> = prompts
        .iter()
        .map(|&p| {
            let mut t = Tally::default();
            t.dims.extend(d.unplaced.iter().copied());
            (p, t)
        })
        .collect();
    for (p, found) in &d.by_prompt {
        if let Some(t) = out.get_mut(p) {
            for &(pos, dim) in found {
                t.dims.insert(dim);
                if !truth.skip.contains(&(*p, pos)) {
                    t.entries.insert((pos, dim));
                }
            }
        }
    }
    for (p, t) in out.iter_mut() {
        for &(pos, dim) in &t.entries {
            let k = (*p, pos, dim);
            if let Some(&(w, y)) = truth.labelled.get(&k) {
                t.b += w;
                if y {
                    t.a += w;
                }
            } else if !truth.instances.contains(&k) {
                t.other += 1;
            }
        }
    }
    out
}

/// Dim- and entry-level precision, recall and F1 of one configuration over some prompts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Prf {
    /// True positives and detections (weighted estimates at the entry level).
    pub tp: f64,
    pub detected: f64,
    #[serde(deserialize_with = "super::validate::nan_if_null")]
    pub precision: f64,
    #[serde(deserialize_with = "super::validate::nan_if_null")]
    pub recall: f64,
    pub f1: f64,
}

fn prf(tp: f64, detected: f64, truth: f64) -> Prf {
    let precision = if detected > 0.0 {
        tp / detected
    } else {
        f64::NAN
    };
    let recall = if truth > 0.0 { tp / truth } else { f64::NAN };
    let f1 = if tp > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    Prf {
        tp,
        detected,
        precision,
        recall,
        f1,
    }
}

/// The scores of one configuration over `prompts` (a multiset: a bootstrap draw repeats some).
pub fn score(t: &BTreeMap<u32, Tally>, truth: &Truth, prompts: &[u32]) -> (Prf, Prf) {
    let (mut a, mut b, mut o, mut tw) = (0.0, 0.0, 0usize, 0.0);
    let mut dims: BTreeSet<u32> = BTreeSet::new();
    let mut massive: BTreeSet<u32> = BTreeSet::new();
    for p in prompts {
        let x = &t[p];
        a += x.a;
        b += x.b;
        o += x.other;
        tw += truth.massive.get(p).map_or(0.0, |m| m.0);
        dims.extend(x.dims.iter().copied());
        if let Some(m) = truth.massive_dims.get(p) {
            massive.extend(m.iter().copied());
        }
    }
    let tp = dims.intersection(&massive).count() as f64;
    (
        prf(tp, dims.len() as f64, massive.len() as f64),
        prf(a, b + o as f64, tw),
    )
}

/// A point estimate with a 95% bootstrap percentile interval over prompts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Estimate {
    #[serde(deserialize_with = "super::validate::nan_if_null")]
    pub point: f64,
    #[serde(deserialize_with = "super::validate::nan_if_null")]
    pub lo: f64,
    #[serde(deserialize_with = "super::validate::nan_if_null")]
    pub hi: f64,
}

impl Estimate {
    fn of(point: f64, mut draws: Vec<f64>) -> Estimate {
        draws.retain(|x| x.is_finite());
        draws.sort_by(f64::total_cmp);
        Estimate {
            point,
            lo: crate::stats::quantile_sorted(&draws, 0.025),
            hi: crate::stats::quantile_sorted(&draws, 0.975),
        }
    }
}

/// Resampled held-out prompt lists, shared by every configuration so that differences are paired.
pub struct Bootstrap {
    draws: Vec<Vec<u32>>,
}

impl Bootstrap {
    pub fn new(prompts: &[u32], reps: usize, seed: u64) -> Bootstrap {
        let mut rng = crate::stats::Rng::new(seed ^ 0xB007_57A9);
        let draws = (0..reps)
            .map(|_| {
                (0..prompts.len())
                    .map(|_| prompts[rng.below(prompts.len())])
                    .collect()
            })
            .collect();
        Bootstrap { draws }
    }

    /// The (dim, entry) scores on each draw.
    fn run(&self, t: &BTreeMap<u32, Tally>, truth: &Truth) -> Vec<(Prf, Prf)> {
        self.draws.iter().map(|d| score(t, truth, d)).collect()
    }
}

/// One configuration's scores on the two halves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldOutScore {
    pub name: String,
    pub group: String,
    pub threshold: Option<f64>,
    /// Chosen on: selection-half point scores (dims, entries).
    pub selection_dim: Prf,
    pub selection_entry: Prf,
    /// Reported: held-out scores with intervals.
    pub dims: Vec<u32>,
    pub entries: usize,
    pub dim_precision: Estimate,
    pub dim_recall: Estimate,
    pub dim_f1: Estimate,
    pub entry_precision: Estimate,
    pub entry_recall: Estimate,
    pub entry_f1: Estimate,
}

/// Switching one criterion off, from a given set, on the held-out prompts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedundancyRow {
    pub group: String,
    pub criterion: String,
    /// "full" (PR #154's five) or "best" (the best smaller set, chosen on the selection half).
    pub from: String,
    pub with: String,
    pub without: String,
    /// Held-out entries detected with and without it, and how many differ (either way).
    pub entries_with: usize,
    pub entries_without: usize,
    pub entries_changed: usize,
    pub dims_with: Vec<u32>,
    pub dims_without: Vec<u32>,
    /// F1(without) − F1(with), held out, paired over the same bootstrap draws.
    pub d_entry_f1: Estimate,
    pub d_dim_f1: Estimate,
}

impl RedundancyRow {
    /// Redundant given the others: switching it off changes no detected entry on any held-out
    /// prompt.
    pub fn redundant(&self) -> bool {
        self.entries_changed == 0
    }
}

/// One threshold curve's choice on the selection half, and the held-out optimum (in-sample on
/// the held-out half, shown for comparison only).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CurveChoice {
    pub curve: String,
    pub chosen: f64,
    pub chosen_name: String,
    pub heldout_best: f64,
}

/// Held-out F1 of one configuration against another, paired.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    /// F1(a) − F1(b).
    pub d_entry_f1: Estimate,
    pub d_dim_f1: Estimate,
}

/// A criteria-subsets group's choices: the best smaller set and the floor-only sides excluded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupChoice {
    pub group: String,
    pub best: Option<String>,
    pub floor_only_excluded: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldOut {
    /// Which F1 the choices and readings use.
    #[serde(default)]
    pub basis: Basis,
    pub split: Split,
    pub bootstrap: usize,
    pub scores: Vec<HeldOutScore>,
    pub groups: Vec<GroupChoice>,
    pub redundancy: Vec<RedundancyRow>,
    pub curves: Vec<CurveChoice>,
    pub comparisons: Vec<Comparison>,
}

/// The criteria of a subset's name (`min_abs+cluster`), the floor aside.
pub fn criteria_of(name: &str) -> BTreeSet<String> {
    name.split('+')
        .filter(|c| *c != "floor")
        .map(String::from)
        .collect()
}

fn floor_only(name: &str) -> bool {
    !criteria_of(name)
        .iter()
        .any(|c| ["min_abs", "median_ratio", "mad_ratio"].contains(&c.as_str()))
}

/// The one configuration to report for `curve`: the threshold with the best selection-half
/// entry F1 (the highest threshold among ties: the stricter claim).
fn choose_curve(scores: &[HeldOutScore], curve: &str, basis: Basis) -> Option<CurveChoice> {
    let pts: Vec<&HeldOutScore> = scores.iter().filter(|s| s.group == curve).collect();
    let best = |f: &dyn Fn(&HeldOutScore) -> f64| -> Option<&HeldOutScore> {
        pts.iter()
            .copied()
            .fold(None, |acc: Option<&HeldOutScore>, s| match acc {
                Some(a) if f(a) > f(s) || (f(a) == f(s) && a.threshold >= s.threshold) => Some(a),
                _ => Some(s),
            })
    };
    let chosen = best(&|s| basis.selection(s))?;
    let held = best(&|s| basis.heldout(s).point)?;
    Some(CurveChoice {
        curve: curve.trim_start_matches("curve ").to_string(),
        chosen: chosen.threshold.unwrap_or(f64::NAN),
        chosen_name: chosen.name.clone(),
        heldout_best: held.threshold.unwrap_or(f64::NAN),
    })
}

/// The threshold of `curve` with the best selection-half F1 on the truth's basis (the highest
/// among ties).
pub fn choose_on_selection(
    names: &[super::validate::Named],
    selection: &[Found],
    truth: &Truth,
    split: &Split,
    curve: &str,
) -> Option<f64> {
    let mut best: Option<(f64, f64)> = None;
    for (n, d) in names.iter().zip(selection) {
        let (Some(t), true) = (n.threshold, n.group == curve) else {
            continue;
        };
        let (dim, e) = score(
            &tallies(d, truth, &split.selection),
            truth,
            &split.selection,
        );
        let f1 = Basis::of(truth, split).pick(&e, &dim).f1;
        if best.is_none_or(|(f, bt)| f1 > f || (f1 == f && t > bt)) {
            best = Some((f1, t));
        }
    }
    best.filter(|b| b.0 > 0.0).map(|b| b.1)
}

/// The configurations in one place: what each detected on each half, and the bootstrap.
pub struct Inputs<'a> {
    pub names: &'a [super::validate::Named],
    pub selection: &'a [Found],
    pub heldout: &'a [Found],
}

/// Every configuration's held-out scores with their bootstrap draws, for the paired readings.
struct Table<'a> {
    basis: Basis,
    scores: Vec<HeldOutScore>,
    draws: Vec<Vec<(Prf, Prf)>>,
    held: Vec<BTreeMap<u32, Tally>>,
    split: &'a Split,
}

impl Table<'_> {
    fn index(&self, group: &str, name: &str) -> Option<usize> {
        self.scores
            .iter()
            .position(|s| s.group == group && s.name == name)
    }

    /// F1(a) − F1(b), entries and dims, paired over the same draws.
    fn diff(&self, a: usize, b: usize) -> (Estimate, Estimate) {
        let pairs = || self.draws[a].iter().zip(&self.draws[b]);
        let de: Vec<f64> = pairs().map(|(x, y)| x.1.f1 - y.1.f1).collect();
        let dd: Vec<f64> = pairs().map(|(x, y)| x.0.f1 - y.0.f1).collect();
        let (sa, sb) = (&self.scores[a], &self.scores[b]);
        (
            Estimate::of(sa.entry_f1.point - sb.entry_f1.point, de),
            Estimate::of(sa.dim_f1.point - sb.dim_f1.point, dd),
        )
    }

    /// Held-out entries detected by one and not the other.
    fn changed(&self, a: usize, b: usize) -> usize {
        self.split
            .heldout
            .iter()
            .map(|p| {
                self.held[a][p]
                    .entries
                    .symmetric_difference(&self.held[b][p].entries)
                    .count()
            })
            .sum()
    }

    /// One criteria-subsets group: the best smaller set (best selection-half F1 among the
    /// subsets of fewer than five criteria that bound a value; ties to fewer criteria, then the
    /// name), and each criterion switched off from the five and from that set.
    fn group(&self, g: &str) -> (GroupChoice, Vec<RedundancyRow>) {
        let scores = &self.scores;
        let mine: Vec<usize> = (0..scores.len())
            .filter(|&i| scores[i].group == g)
            .collect();
        let find = |set: &BTreeSet<String>| {
            mine.iter()
                .copied()
                .find(|&i| criteria_of(&scores[i].name) == *set)
        };
        let size = |i: usize| criteria_of(&scores[i].name).len();
        let best = mine
            .iter()
            .copied()
            .filter(|&i| size(i) < 5 && !floor_only(&scores[i].name))
            .filter(|&i| self.basis.selection(&scores[i]) > 0.0)
            .min_by(|&a, &b| {
                let f = |i: usize| self.basis.selection(&scores[i]);
                f(b).total_cmp(&f(a))
                    .then(size(a).cmp(&size(b)))
                    .then(scores[a].name.cmp(&scores[b].name))
            });
        let all5: BTreeSet<String> = super::config::CRITERIA
            .iter()
            .map(|c| c.to_string())
            .collect();
        let (mut rows, mut excluded) = (Vec::new(), 0);
        for (from, base) in [("full", find(&all5)), ("best", best)] {
            let Some(base) = base else { continue };
            let on = criteria_of(&scores[base].name);
            for crit in super::config::CRITERIA.iter().filter(|c| on.contains(**c)) {
                let mut off = on.clone();
                off.remove(*crit);
                let Some(other) = find(&off) else { continue };
                if floor_only(&scores[other].name) {
                    excluded += 1;
                    continue;
                }
                let (de, dd) = self.diff(other, base);
                rows.push(RedundancyRow {
                    group: g.to_string(),
                    criterion: crit.to_string(),
                    from: from.into(),
                    with: scores[base].name.clone(),
                    without: scores[other].name.clone(),
                    entries_with: scores[base].entries,
                    entries_without: scores[other].entries,
                    entries_changed: self.changed(base, other),
                    dims_with: scores[base].dims.clone(),
                    dims_without: scores[other].dims.clone(),
                    d_entry_f1: de,
                    d_dim_f1: dd,
                });
            }
        }
        let choice = GroupChoice {
            group: g.to_string(),
            best: best.map(|i| scores[i].name.clone()),
            floor_only_excluded: excluded,
        };
        (choice, rows)
    }

    /// The thread's comparisons: median-ratio alone (at its chosen threshold) against PR #154's
    /// five at their defaults and at their own chosen threshold, and against Sun et al.
    fn comparisons(&self, curves: &[CurveChoice]) -> Vec<Comparison> {
        let chosen = |curve: &str| {
            curves
                .iter()
                .find(|c| c.curve == curve)
                .and_then(|c| self.index(&format!("curve {curve}"), &c.chosen_name))
        };
        let Some(m) = chosen("median-only") else {
            return Vec::new();
        };
        let pr = self.index("presets", "pr154 (defaults)");
        let sun = self.index("presets", "sun2024 (defaults)");
        [pr, chosen("pr154"), sun]
            .into_iter()
            .flatten()
            .map(|other| {
                let (de, dd) = self.diff(m, other);
                Comparison {
                    a: self.scores[m].name.clone(),
                    b: self.scores[other].name.clone(),
                    d_entry_f1: de,
                    d_dim_f1: dd,
                }
            })
            .collect()
    }
}

/// The groups of `scores` whose names start with `prefix`, in order.
fn groups_of(scores: &[HeldOutScore], prefix: &str) -> Vec<String> {
    let mut g: Vec<String> = scores
        .iter()
        .filter(|s| s.group.starts_with(prefix))
        .map(|s| s.group.clone())
        .collect();
    g.dedup();
    g
}

/// Scores every configuration on both halves, chooses on the selection half, and reports
/// redundancy, curves and the comparisons the PR thread asks for on the held-out half.
pub fn evaluate(x: &Inputs, truth: &Truth, split: &Split, reps: usize) -> HeldOut {
    let boot = Bootstrap::new(&split.heldout, reps, split.seed);
    let held: Vec<BTreeMap<u32, Tally>> = x
        .heldout
        .iter()
        .map(|d| tallies(d, truth, &split.heldout))
        .collect();
    let draws: Vec<Vec<(Prf, Prf)>> = held.iter().map(|t| boot.run(t, truth)).collect();
    let mut scores = Vec::new();
    for (i, n) in x.names.iter().enumerate() {
        let sel_t = tallies(&x.selection[i], truth, &split.selection);
        let (sd, se) = score(&sel_t, truth, &split.selection);
        let (hd, he) = score(&held[i], truth, &split.heldout);
        let col = |f: &dyn Fn(&(Prf, Prf)) -> f64| draws[i].iter().map(f).collect::<Vec<f64>>();
        scores.push(HeldOutScore {
            name: n.name.clone(),
            group: n.group.clone(),
            threshold: n.threshold,
            selection_dim: sd,
            selection_entry: se,
            dims: x.heldout[i].dims.clone(),
            entries: held[i].values().map(|t| t.entries.len()).sum(),
            dim_precision: Estimate::of(hd.precision, col(&|d| d.0.precision)),
            dim_recall: Estimate::of(hd.recall, col(&|d| d.0.recall)),
            dim_f1: Estimate::of(hd.f1, col(&|d| d.0.f1)),
            entry_precision: Estimate::of(he.precision, col(&|d| d.1.precision)),
            entry_recall: Estimate::of(he.recall, col(&|d| d.1.recall)),
            entry_f1: Estimate::of(he.f1, col(&|d| d.1.f1)),
        });
    }
    let basis = Basis::of(truth, split);
    let table = Table {
        basis,
        scores,
        draws,
        held,
        split,
    };
    let (mut groups, mut redundancy) = (Vec::new(), Vec::new());
    for g in groups_of(&table.scores, super::validate::SUBSETS) {
        let (choice, rows) = table.group(&g);
        groups.push(choice);
        redundancy.extend(rows);
    }
    let curves: Vec<CurveChoice> = groups_of(&table.scores, "curve ")
        .iter()
        .filter_map(|c| choose_curve(&table.scores, c, basis))
        .collect();
    let comparisons = table.comparisons(&curves);
    HeldOut {
        basis,
        split: split.clone(),
        bootstrap: reps,
        scores: table.scores,
        groups,
        redundancy,
        curves,
        comparisons,
    }
}

/// Two held-out F1s within this of each other (the whole interval of the difference inside
/// ±MATCH) *match*.
pub const MATCH: f64 = 0.05;

/// How a held-out difference of F1 reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reading {
    /// The interval lies inside ±[`MATCH`].
    Matches,
    Better,
    Worse,
    CannotTell,
}

impl Reading {
    pub fn of(d: &Estimate) -> Reading {
        if d.lo.is_nan() || d.hi.is_nan() {
            Reading::CannotTell
        } else if d.lo >= -MATCH && d.hi <= MATCH {
            Reading::Matches
        } else if d.lo > 0.0 {
            Reading::Better
        } else if d.hi < 0.0 {
            Reading::Worse
        } else {
            Reading::CannotTell
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Reading::Matches => "matches",
            Reading::Better => "is better than",
            Reading::Worse => "is worse than",
            Reading::CannotTell => "cannot be told apart from",
        }
    }
}

/// One configuration across models: its selection-half entry F1 on each, their mean.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recommendation {
    pub name: String,
    pub group: String,
    pub mean_selection_f1: f64,
    /// Per model (in the order given): the held-out scores of the recommendation, of PR #154's
    /// defaults and of Sun et al.'s.
    pub models: Vec<String>,
    /// Each model's basis: where it is dims, its entry-level F1 is undefined.
    #[serde(default)]
    pub bases: Vec<Basis>,
    /// Per model: whether its labels find a massive dim (where not, it has no truth to score
    /// against and took no part in the choice).
    #[serde(default)]
    pub usable: Vec<bool>,
    pub recommended: Vec<Option<HeldOutScore>>,
    pub pr154: Vec<Option<HeldOutScore>>,
    pub sun2024: Vec<Option<HeldOutScore>>,
    /// Per model, each curve's threshold chosen on that model's selection half.
    pub thresholds: Vec<Vec<CurveChoice>>,
}

/// The configuration with the best mean selection-half F1 (each on its model's basis) over the models whose labels
/// find something massive (ties: fewer criteria, then the name); chosen on selection halves
/// only, so its held-out scores are honest on every model.
pub fn recommend(models: &[(String, &HeldOut, bool)]) -> Option<Recommendation> {
    let usable: Vec<&(String, &HeldOut, bool)> = models.iter().filter(|m| m.2).collect();
    let first = usable.first()?;
    let mut best: Option<(f64, &HeldOutScore)> = None;
    for s in &first.1.scores {
        if s.group == "study" {
            continue;
        }
        let mut sum = 0.0;
        let mut all = true;
        for m in &usable {
            match m
                .1
                .scores
                .iter()
                .find(|x| x.group == s.group && x.name == s.name)
            {
                Some(x) => sum += m.1.basis.selection(x),
                None => all = false,
            }
        }
        if !all {
            continue;
        }
        let mean = sum / usable.len() as f64;
        let size = |x: &HeldOutScore| criteria_of(&x.name).len();
        best = match best {
            Some((m, b)) if m > mean || (m == mean && (size(b), &b.name) <= (size(s), &s.name)) => {
                Some((m, b))
            }
            _ => Some((mean, s)),
        };
    }
    let (mean, b) = best?;
    let pick = |h: &HeldOut, group: &str, name: &str| {
        h.scores
            .iter()
            .find(|x| x.group == group && x.name == name)
            .cloned()
    };
    Some(Recommendation {
        name: b.name.clone(),
        group: b.group.clone(),
        mean_selection_f1: mean,
        models: models.iter().map(|m| m.0.clone()).collect(),
        bases: models.iter().map(|m| m.1.basis).collect(),
        usable: models.iter().map(|m| m.2).collect(),
        recommended: models
            .iter()
            .map(|m| pick(m.1, &b.group, &b.name))
            .collect(),
        pr154: models
            .iter()
            .map(|m| pick(m.1, "presets", "pr154 (defaults)"))
            .collect(),
        sun2024: models
            .iter()
            .map(|m| pick(m.1, "presets", "sun2024 (defaults)"))
            .collect(),
        thresholds: models.iter().map(|m| m.1.curves.clone()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::apply::Hit;
    use super::super::scan::Source;
    use super::super::validate::{Named, SUBSETS};
    use super::*;

    fn det(entries: &[(u32, u32, u32)]) -> Detection {
        Detection {
            dims: vec![],
            hits: entries
                .iter()
                .map(|&(p, t, d)| Hit {
                    layer: 1,
                    prompt: p,
                    source: Source::Good,
                    position: t,
                    token: String::new(),
                    dim: d,
                    value: 0.0,
                    abs: 0.0,
                    ratio_position: 0.0,
                    ratio_layer: 0.0,
                    mad_z: 0.0,
                })
                .collect(),
            near_misses: vec![],
            n_candidate_ptd: 0,
            n_confirmed_ptd: 0,
            non_finite: 0,
        }
    }

    #[test]
    fn a_criterion_is_redundant_only_when_no_held_out_entry_changes() {
        let split = Split {
            seed: 0,
            selection: vec![0, 1],
            heldout: vec![2, 3],
        };
        // Dim 1 at position 0 is massive on every prompt; dim 2 at position 1 is not.
        let entries: Vec<_> = (0..4)
            .flat_map(|p| [(p, 0, 1, 1.0, true), (p, 1, 2, 1.0, false)])
            .collect();
        let inst: Vec<_> = (0..4).flat_map(|p| [(p, 0, 1), (p, 1, 2)]).collect();
        let truth = Truth::new(entries, inst, &BTreeSet::from([1]), HashSet::new());
        let good: Vec<(u32, u32, u32)> = (0..4).map(|p| (p, 0, 1)).collect();
        let mut noisy = good.clone();
        noisy.push((3, 1, 2)); // one more entry, on a held-out prompt only
        let mut sel_noisy = good.clone();
        sel_noisy.push((0, 1, 2)); // ... and one on a selection prompt only
        let g = format!("{SUBSETS}, test");
        let full = "min_abs+median_ratio+mad_ratio+cluster+persistence";
        // (name, what it detects on the selection half, on the held-out half)
        type Entries<'a> = &'a [(u32, u32, u32)];
        let rows: Vec<(&str, Entries, Entries)> = vec![
            (full, &good, &good),
            ("median_ratio+mad_ratio+cluster+persistence", &good, &good),
            ("min_abs+mad_ratio+cluster+persistence", &good, &good),
            ("min_abs+median_ratio+cluster+persistence", &good, &good),
            ("min_abs+median_ratio+mad_ratio+persistence", &good, &noisy),
            ("min_abs+median_ratio+mad_ratio+cluster", &sel_noisy, &good),
            ("median_ratio", &good, &good),
            ("cluster+floor", &[], &[]),
        ];
        let names: Vec<Named> = rows
            .iter()
            .map(|(n, _, _)| Named {
                name: n.to_string(),
                group: g.clone(),
                threshold: None,
                config: Default::default(),
            })
            .collect();
        let sel: Vec<Found> = rows.iter().map(|r| Found::of(&det(r.1))).collect();
        let held: Vec<Found> = rows.iter().map(|r| Found::of(&det(r.2))).collect();
        let ho = evaluate(
            &Inputs {
                names: &names,
                selection: &sel,
                heldout: &held,
            },
            &truth,
            &split,
            50,
        );
        let row = |from: &str, c: &str| {
            ho.redundancy
                .iter()
                .find(|r| r.from == from && r.criterion == c)
                .unwrap_or_else(|| panic!("no row {from} {c}: {:?}", ho.redundancy))
        };
        // Switching cluster off adds one held-out entry: not redundant, and F1 falls.
        let c = row("full", "cluster");
        assert_eq!((c.entries_changed, c.redundant()), (1, false));
        assert!(c.d_entry_f1.point < 0.0, "{c:?}");
        // Persistence changes an entry on a selection prompt only: redundant on held-out ones.
        let p = row("full", "persistence");
        assert_eq!((p.entries_changed, p.redundant()), (0, true));
        assert!(row("full", "min_abs").redundant());
        // The best smaller set is chosen on the selection half: median_ratio alone (F1 1 there,
        // fewest criteria); switching its only criterion off leaves nothing: not compared.
        let best = ho.groups[0].best.as_deref();
        assert_eq!(best, Some("median_ratio"));
        assert!(ho.redundancy.iter().all(|r| r.from == "full"));
        // PR #154's five: every criterion has a row.
        assert_eq!(ho.redundancy.len(), 5);
    }

    #[test]
    fn the_split_puts_every_prompt_in_exactly_one_half() {
        for n in [1, 2, 7, 201] {
            let s = Split::new(n, 3);
            let a: BTreeSet<u32> = s.selection.iter().copied().collect();
            let b: BTreeSet<u32> = s.heldout.iter().copied().collect();
            assert!(a.is_disjoint(&b));
            assert_eq!(a.len() + b.len(), n);
            assert_eq!(a.len(), n.div_ceil(2));
            assert_eq!(Split::new(n, 3), s, "seeded");
        }
        assert_ne!(Split::new(201, 3), Split::new(201, 4));
    }

    #[test]
    fn weighted_entry_scores_estimate_the_instances_behind_the_sample() {
        // Dim 1: 4 instances (prompts 0..4, position 0), 2 labelled (weight 2), both massive.
        // Dim 2: 2 instances, both labelled (weight 1), not massive.
        let entries = vec![
            (0, 0, 1, 2.0, true),
            (1, 0, 1, 2.0, true),
            (0, 1, 2, 1.0, false),
            (1, 1, 2, 1.0, false),
        ];
        let inst = vec![
            (0, 0, 1),
            (1, 0, 1),
            (2, 0, 1),
            (3, 0, 1),
            (0, 1, 2),
            (1, 1, 2),
        ];
        let truth = Truth::new(entries, inst, &BTreeSet::from([1]), HashSet::new());
        let all = [0, 1, 2, 3];
        // Finds dim 1 everywhere: the two labelled ones stand for the four.
        let d = Found::of(&det(&[(0, 0, 1), (1, 0, 1), (2, 0, 1), (3, 0, 1)]));
        let (dim, e) = score(&tallies(&d, &truth, &all), &truth, &all);
        assert_eq!((dim.precision, dim.recall), (1.0, 1.0));
        assert_eq!((e.precision, e.recall, e.f1), (1.0, 1.0, 1.0));
        // Adds dim 2's labelled instances and one entry that is no instance at all.
        let hits = [
            (0, 0, 1),
            (1, 0, 1),
            (2, 0, 1),
            (3, 0, 1),
            (0, 1, 2),
            (1, 1, 2),
            (2, 5, 9),
        ];
        let (dim, e) = score(
            &tallies(&Found::of(&det(&hits)), &truth, &all),
            &truth,
            &all,
        );
        assert_eq!(dim.precision, 1.0 / 3.0);
        assert!((e.precision - 4.0 / 7.0).abs() < 1e-12, "{e:?}");
        assert_eq!(e.recall, 1.0);
        // Only prompt 0's instance of dim 1: a quarter of the massive weight.
        let (_, e) = score(
            &tallies(&Found::of(&det(&[(0, 0, 1)])), &truth, &all),
            &truth,
            &all,
        );
        assert_eq!(
            e.recall, 0.5,
            "prompt 0's labelled instance carries weight 2 of 4"
        );
        // Nothing detected: precision undefined, F1 zero.
        let (dim, e) = score(&tallies(&Found::of(&det(&[])), &truth, &all), &truth, &all);
        assert!(dim.precision.is_nan() && e.precision.is_nan());
        assert_eq!((dim.f1, e.f1), (0.0, 0.0));
    }

    #[test]
    fn the_dim_level_decides_where_no_entry_held_alone_is_massive() {
        let split = Split {
            seed: 0,
            selection: vec![0, 1],
            heldout: vec![2, 3],
        };
        // Dim 1 is massive as a dim, but none of its instances is when held alone.
        let entries: Vec<_> = (0..4).map(|p| (p, 0, 1, 1.0, false)).collect();
        let inst: Vec<_> = (0..4).flat_map(|p| [(p, 0, 1), (p, 1, 2)]).collect();
        let truth = Truth::new(entries, inst, &BTreeSet::from([1]), HashSet::new());
        assert_eq!(truth.massive_entries_on(&[0, 1, 2, 3]), 0);
        let one: Vec<(u32, u32, u32)> = (0..4).map(|p| (p, 0, 1)).collect();
        let two: Vec<(u32, u32, u32)> = (0..4).map(|p| (p, 1, 2)).collect();
        // The higher threshold finds the wrong dim: only the dim level tells them apart.
        let names: Vec<Named> = [(100.0, "curve median-only"), (1000.0, "curve median-only")]
            .iter()
            .map(|&(t, g)| Named {
                name: format!("median-only at {t:.0}"),
                group: g.to_string(),
                threshold: Some(t),
                config: Default::default(),
            })
            .collect();
        let found = vec![Found::of(&det(&one)), Found::of(&det(&two))];
        let ho = evaluate(
            &Inputs {
                names: &names,
                selection: &found,
                heldout: &found,
            },
            &truth,
            &split,
            20,
        );
        assert_eq!(ho.basis, Basis::Dims);
        assert_eq!(ho.curves[0].chosen, 100.0, "{:?}", ho.curves);
        assert_eq!(
            choose_on_selection(&names, &found, &truth, &split, "curve median-only"),
            Some(100.0)
        );
        assert_eq!(ho.scores[0].dim_f1.point, 1.0);
    }
}
