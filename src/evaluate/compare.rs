//! From per-prompt outcomes to verdicts. An *arm* is one distinct score: every variant whose
//! edit gave the same score (in every replicate) belongs to one arm, so variants that share a
//! score share their comparisons and are never tested twice. A *comparison* is a pair of
//! distinct arms on the same prompts, one of them a reference; replicates are pooled into it
//! (strata of one paired test). The *family* is every comparison's two tests (refusals, KL),
//! corrected together; each test's interval is computed at the level its correction held it to.

use super::Outcome;
use crate::direction::Handling;
use crate::stats::family::{decide, Correction, Verdict};
use crate::stats::paired::{reps_for, McNemar, SignFlip};
use crate::stats::power;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// What a study's `statistics:` block sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsSettings {
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub correction: Correction,
    /// Which variants are references: a handling kind (`none`, `winsorize`, `winsorize-global`,
    /// `zero-residual-dims`, …), a full handling (`winsorize:0.95`) or a variant's name.
    #[serde(default = "d_references")]
    pub references: Vec<String>,
    #[serde(default)]
    pub margins: Margins,
    /// Power at which minimum detectable differences are computed.
    #[serde(default = "d_power")]
    pub power: f64,
}

/// Equivalence margins: a difference whose adjusted interval lies within ± the margin is
/// "equivalent".
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Margins {
    /// Refusal-rate points (5 = five percentage points).
    #[serde(default = "d_margin_refusals")]
    pub refusals: f64,
    #[serde(default = "d_margin_kl")]
    pub kl: f64,
}

fn d_alpha() -> f64 {
    0.05
}
fn d_power() -> f64 {
    0.8
}
fn d_references() -> Vec<String> {
    ["none", "winsorize", "winsorize-global"]
        .map(String::from)
        .to_vec()
}
fn d_margin_refusals() -> f64 {
    5.0
}
fn d_margin_kl() -> f64 {
    0.01
}

impl Default for Margins {
    fn default() -> Self {
        Margins {
            refusals: d_margin_refusals(),
            kl: d_margin_kl(),
        }
    }
}

impl Default for StatsSettings {
    fn default() -> Self {
        StatsSettings {
            alpha: d_alpha(),
            correction: Correction::default(),
            references: d_references(),
            margins: Margins::default(),
            power: d_power(),
        }
    }
}

impl StatsSettings {
    /// What is wrong with these settings, if anything (field, message).
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if !(self.alpha > 0.0 && self.alpha <= 0.5) {
            return Some((
                "alpha",
                format!("alpha must lie in (0, 0.5], got {}", self.alpha),
            ));
        }
        if !(self.power > 0.5 && self.power < 1.0) {
            return Some((
                "power",
                format!("power must lie in (0.5, 1), got {}", self.power),
            ));
        }
        if !(self.margins.refusals > 0.0 && self.margins.refusals < 100.0) {
            return Some((
                "margins.refusals",
                format!(
                    "the refusal margin is in rate points and must lie in (0, 100), got {}",
                    self.margins.refusals
                ),
            ));
        }
        if self.margins.kl <= 0.0 || !self.margins.kl.is_finite() {
            return Some((
                "margins.kl",
                format!("the KL margin must be positive, got {}", self.margins.kl),
            ));
        }
        if self.references.is_empty() {
            return Some((
                "references",
                "name at least one reference (a handling kind such as `none`, or a variant name)"
                    .into(),
            ));
        }
        None
    }

    /// The rank of the first reference selector that `name`/`handlings` matches.
    pub fn reference_rank(&self, name: &str, handlings: &[Handling]) -> Option<usize> {
        self.references
            .iter()
            .position(|sel| selector_matches(sel, name, handlings))
    }
}

/// A selector matches a variant by name, by its full handling, or by its handling's kind when
/// the variant has exactly one handling (`none` also matches no handling at all).
pub fn selector_matches(sel: &str, name: &str, handlings: &[Handling]) -> bool {
    if sel == name {
        return true;
    }
    let hs: Vec<&Handling> = handlings
        .iter()
        .filter(|h| !matches!(h, Handling::None))
        .collect();
    match hs.as_slice() {
        [] => sel == "none",
        [h] => {
            let label = h.label();
            label == sel || label.split(':').next() == Some(sel)
        }
        _ => false,
    }
}

/// Whether `sel` can match any variant at all: a handling kind or full handling.
pub fn is_handling_selector(sel: &str) -> bool {
    sel == "none" || Handling::parse(sel).is_ok() || Handling::parse(&format!("{sel}:0.5")).is_ok()
}

/// One distinct score: the variants that share it and its outcome per replicate.
#[derive(Debug, Clone)]
pub struct Arm<'a> {
    pub names: Vec<String>,
    pub reference_rank: Option<usize>,
    /// replicate → (score key, outcome).
    pub outcomes: BTreeMap<u64, (String, &'a Outcome)>,
}

impl Arm<'_> {
    pub fn label(&self) -> String {
        match self.names.len() {
            0 => "?".into(),
            1 => self.names[0].clone(),
            2..=3 => self.names.join(", "),
            k => format!("{}, {} (+{} more)", self.names[0], self.names[1], k - 2),
        }
    }
}

/// One of a comparison's two tests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricTest {
    /// Variant − reference (a rate difference for refusals, a mean difference for KL).
    pub estimate: f64,
    pub p: f64,
    pub p_adjusted: f64,
    /// The level the correction held this test to; the interval has confidence 1 − level.
    pub level: f64,
    pub lo: f64,
    pub hi: f64,
    pub verdict: Verdict,
    /// The smallest |difference| this comparison detects with the study's power at `level`.
    pub mdd: Option<f64>,
    /// Prompts (per arm, pooled over replicates) needed to detect the observed difference.
    pub prompts_needed: Option<f64>,
    /// The estimate in each replicate (the between-replicate spread).
    pub per_replicate: Vec<f64>,
    pub n: usize,
    /// Refusals: the share of prompts on which the two arms' outcomes differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discordance: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub variant: usize,
    pub reference: usize,
    pub replicates: Vec<u64>,
    pub mcnemar: McNemar,
    pub refusals: MetricTest,
    pub kl_sd: f64,
    pub kl: MetricTest,
}

/// Variants whose score *is* a reference's: reported, not tested.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identity {
    pub variant: String,
    pub reference: String,
}

pub struct Family<'a> {
    pub settings: StatsSettings,
    pub arms: Vec<Arm<'a>>,
    pub comparisons: Vec<Comparison>,
    pub identical: Vec<Identity>,
    /// Tests in the family (two per comparison).
    pub tests: usize,
    /// Sign-flip resamples per KL test.
    pub reps: usize,
}

fn seed_of(a: &Arm, b: &Arm) -> u64 {
    let mut h = Sha256::new();
    for arm in [a, b] {
        for (rep, (key, _)) in &arm.outcomes {
            h.update(format!("{rep}:{key};"));
        }
        h.update(b"|");
    }
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The (variant, reference) pairs a family compares, by position, given each arm's reference
/// rank (None: not a reference): every arm against every reference arm; two reference arms once,
/// the one whose selector is listed later (or, tied, that comes later) as the variant.
pub fn comparison_pairs(ranks: &[Option<usize>]) -> Vec<(usize, usize)> {
    let mut pairs = Vec::new();
    for (i, ra) in ranks.iter().enumerate() {
        for (j, rb) in ranks.iter().enumerate() {
            let Some(rb) = *rb else { continue };
            if i != j && ra.is_none_or(|ra| ra > rb || (ra == rb && i > j)) {
                pairs.push((i, j));
            }
        }
    }
    pairs
}

/// Builds and decides the family over `arms`.
pub fn family<'a>(arms: Vec<Arm<'a>>, settings: &StatsSettings) -> Family<'a> {
    // `arms` puts a reference's name first in its arm; the others share its score.
    let identical = arms
        .iter()
        .filter(|a| a.reference_rank.is_some())
        .flat_map(|a| {
            a.names[1..].iter().map(|n| Identity {
                variant: n.clone(),
                reference: a.names[0].clone(),
            })
        })
        .collect();
    let ranks: Vec<Option<usize>> = arms.iter().map(|a| a.reference_rank).collect();
    let pairs: Vec<(usize, usize)> = comparison_pairs(&ranks)
        .into_iter()
        .filter(|&(i, j)| {
            let (a, b) = (&arms[i], &arms[j]);
            a.outcomes.keys().any(|k| b.outcomes.contains_key(k))
        })
        .collect();
    let tests = 2 * pairs.len();
    let reps = reps_for(tests, settings.alpha);
    struct Raw {
        pair: (usize, usize),
        replicates: Vec<u64>,
        mc: McNemar,
        rep_refusals: Vec<f64>,
        flip: SignFlip,
        rep_kl: Vec<f64>,
        n_good: usize,
    }
    let raws: Vec<Raw> = pairs
        .iter()
        .map(|&(i, j)| {
            let (a, b) = (&arms[i], &arms[j]);
            let mut parts = Vec::new();
            let mut d = Vec::new();
            let mut replicates = Vec::new();
            let (mut rep_refusals, mut rep_kl) = (Vec::new(), Vec::new());
            for (rep, (_, oa)) in &a.outcomes {
                let Some((_, ob)) = b.outcomes.get(rep) else {
                    continue;
                };
                replicates.push(*rep);
                let mc = McNemar::new(&oa.refused, &ob.refused);
                rep_refusals.push(mc.estimate());
                parts.push(mc);
                let here: Vec<f64> = oa.kl.iter().zip(&ob.kl).map(|(x, y)| x - y).collect();
                rep_kl.push(here.iter().sum::<f64>() / here.len().max(1) as f64);
                d.extend(here);
            }
            let n_good = d.len();
            Raw {
                pair: (i, j),
                replicates,
                mc: McNemar::pooled(&parts),
                rep_refusals,
                flip: SignFlip::new(&d, reps, seed_of(a, b)),
                rep_kl,
                n_good,
            }
        })
        .collect();
    let ps: Vec<f64> = raws.iter().flat_map(|r| [r.mc.p(), r.flip.p()]).collect();
    let decisions = decide(&ps, settings.correction, settings.alpha);
    let margin_r = settings.margins.refusals / 100.0;
    let comparisons = raws
        .into_iter()
        .enumerate()
        .map(|(k, r)| {
            let (dr, dk) = (decisions[2 * k], decisions[2 * k + 1]);
            let (lo, hi) = r.mc.interval(dr.level);
            let est = r.mc.estimate();
            let pi = r.mc.discordance();
            let n = r.mc.n as f64;
            let refusals = MetricTest {
                estimate: est,
                p: dr.p,
                p_adjusted: dr.p_adjusted,
                level: dr.level,
                lo,
                hi,
                verdict: Verdict::from_interval(dr.rejected, lo, hi, margin_r),
                mdd: power::mcnemar_mdd(pi, n, dr.level, settings.power),
                prompts_needed: power::mcnemar_prompts_needed(est, pi, dr.level, settings.power),
                per_replicate: r.rep_refusals,
                n: r.mc.n,
                discordance: Some(pi),
            };
            let (lo, hi) = r.flip.interval(dk.level);
            let kl = MetricTest {
                estimate: r.flip.estimate,
                p: dk.p,
                p_adjusted: dk.p_adjusted,
                level: dk.level,
                lo,
                hi,
                verdict: Verdict::from_interval(dk.rejected, lo, hi, settings.margins.kl),
                mdd: (r.flip.sd > 0.0)
                    .then(|| power::mean_mdd(r.flip.sd, r.n_good as f64, dk.level, settings.power)),
                prompts_needed: power::mean_prompts_needed(
                    r.flip.estimate,
                    r.flip.sd,
                    dk.level,
                    settings.power,
                ),
                per_replicate: r.rep_kl,
                n: r.n_good,
                discordance: None,
            };
            Comparison {
                variant: r.pair.0,
                reference: r.pair.1,
                replicates: r.replicates,
                mcnemar: r.mc,
                refusals,
                kl_sd: r.flip.sd,
                kl,
            }
        })
        .collect();
    Family {
        settings: settings.clone(),
        arms,
        comparisons,
        identical,
        tests,
        reps,
    }
}

/// One scored variant in one replicate: (variant name, handlings, replicate, score key, outcome).
pub type Scored<'a> = (String, Vec<Handling>, u64, String, &'a Outcome);

/// A variant's outcomes by replicate: (name, handlings, replicate → (score key, outcome)).
type PerVariant<'a> = (String, Vec<Handling>, BTreeMap<u64, (String, &'a Outcome)>);

/// Groups named outcomes into arms: variants whose (replicate, score key) sets are equal share
/// an arm.
pub fn arms<'a>(items: &[Scored<'a>], settings: &StatsSettings) -> Vec<Arm<'a>> {
    let mut per_variant: Vec<PerVariant<'a>> = Vec::new();
    for (name, hs, rep, key, o) in items {
        match per_variant.iter_mut().find(|v| &v.0 == name) {
            Some(v) => {
                v.2.insert(*rep, (key.clone(), *o));
            }
            None => {
                let mut m = BTreeMap::new();
                m.insert(*rep, (key.clone(), *o));
                per_variant.push((name.clone(), hs.clone(), m));
            }
        }
    }
    let mut out: Vec<Arm<'a>> = Vec::new();
    for (name, hs, m) in per_variant {
        let rank = settings.reference_rank(&name, &hs);
        let keys: Vec<(&u64, &String)> = m.iter().map(|(r, (k, _))| (r, k)).collect();
        let found = out.iter_mut().find(|a| {
            a.outcomes.len() == keys.len()
                && a.outcomes
                    .iter()
                    .zip(&keys)
                    .all(|((r, (k, _)), (r2, k2))| r == *r2 && k == *k2)
        });
        match found {
            Some(a) => {
                // A reference's name leads its arm, so the arm reads as that reference.
                match (rank, a.reference_rank) {
                    (Some(r), None) => {
                        a.names.insert(0, name);
                        a.reference_rank = Some(r);
                    }
                    (Some(r), Some(ar)) if r < ar => {
                        a.names.insert(0, name);
                        a.reference_rank = Some(r);
                    }
                    _ => a.names.push(name),
                }
            }
            None => out.push(Arm {
                names: vec![name],
                reference_rank: rank,
                outcomes: m,
            }),
        }
    }
    out
}
