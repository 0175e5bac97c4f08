//! From per-prompt outcomes to verdicts. An *arm* is one distinct score: every variant whose
//! edit gave the same score (in every replicate) belongs to one arm, so variants that share a
//! score share their comparisons and are never tested twice. A *comparison* is a pair of
//! distinct arms on the same prompts, one of them a reference. The *family* is every
//! comparison's two tests (refusals, KL), corrected together; each test's interval is computed
//! at the level its correction held it to.
//!
//! The prompt is the unit of evidence. With one replicate (or replicates whose prompts are all
//! distinct) a refusal comparison is exact McNemar over the pairs; when a prompt is scored under
//! several direction draws its differences are averaged over them first and the test runs over
//! prompts (sign-flip on the per-prompt means, for refusals as for KL). Each test also carries a
//! *draw-level* reading, with the draws as a random factor ([`crate::stats::clustered`]),
//! corrected as a family of its own.

use super::Outcome;
use crate::direction::Handling;
use crate::stats::clustered::{cluster, Clustered, DrawReading};
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

/// Which prompt each outcome position is, so a prompt scored in several replicates counts once.
#[derive(Debug, Clone, Default)]
pub enum Units {
    /// Position i is the same prompt in every replicate (one evaluation split for all of them,
    /// as with `redraw: direction`, or a single replicate).
    #[default]
    SharedByPosition,
    /// Every (replicate, position) is a prompt of its own.
    Distinct,
    /// The prompts themselves, per replicate: (harmless, harmful) prompt ids in scoring order.
    Ids(BTreeMap<u64, (Vec<u64>, Vec<u64>)>),
}

/// The harmless (`good`) or harmful side of the evaluation split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Good,
    Bad,
}

impl Units {
    /// Ids from each replicate's prompt texts (the same text is the same prompt).
    pub fn from_texts<'t>(
        by_replicate: impl IntoIterator<Item = (u64, &'t [String], &'t [String])>,
    ) -> Units {
        let id = |p: &String| {
            let d = Sha256::digest(p.as_bytes());
            u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
        };
        Units::Ids(
            by_replicate
                .into_iter()
                .map(|(rep, good, bad)| {
                    (
                        rep,
                        (good.iter().map(id).collect(), bad.iter().map(id).collect()),
                    )
                })
                .collect(),
        )
    }

    fn id(&self, side: Side, rep: u64, i: usize) -> u64 {
        let distinct = || (rep << 32) ^ (i as u64) ^ 0x5A5A_0000_0000_0000;
        match self {
            Units::SharedByPosition => i as u64,
            Units::Distinct => distinct(),
            Units::Ids(m) => m
                .get(&rep)
                .and_then(|(g, b)| match side {
                    Side::Good => g.get(i),
                    Side::Bad => b.get(i),
                })
                .copied()
                .unwrap_or_else(distinct),
        }
    }
}

/// The KL difference `variant` − `reference` as a comparison estimates it: each prompt's
/// difference averaged over the replicates both scored, then averaged over prompts. None when
/// they share no replicate.
pub fn kl_estimate(
    variant: &BTreeMap<u64, &Outcome>,
    reference: &BTreeMap<u64, &Outcome>,
    units: &Units,
) -> Option<f64> {
    let mut d = Vec::new();
    let mut draws = 0;
    for (rep, a) in variant {
        let Some(b) = reference.get(rep) else {
            continue;
        };
        push_kl_differences(units, *rep, draws, a, b, &mut d);
        draws += 1;
    }
    let c = cluster(&d, draws);
    (!c.units.is_empty()).then(|| c.units.iter().sum::<f64>() / c.units.len() as f64)
}

/// Appends each harmless prompt's KL difference `a` − `b` in replicate `rep` (draw `draw`) as a
/// unit's observation, and returns that draw's mean difference.
fn push_kl_differences(
    units: &Units,
    rep: u64,
    draw: usize,
    a: &Outcome,
    b: &Outcome,
    out: &mut Vec<(u64, usize, f64)>,
) -> f64 {
    let n = out.len();
    for (i, (x, y)) in a.kl.iter().zip(&b.kl).enumerate() {
        out.push((units.id(Side::Good, rep, i), draw, x - y));
    }
    let here = &out[n..];
    here.iter().map(|(_, _, d)| d).sum::<f64>() / here.len().max(1) as f64
}

/// A comparison's draw-level reading of one metric: the draws as a random factor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrawTest {
    pub reading: DrawReading,
    pub p: f64,
    pub p_adjusted: f64,
    pub level: f64,
    pub lo: f64,
    pub hi: f64,
    pub verdict: Verdict,
    /// Direction draws (with these prompts) for the study's power at the observed estimate.
    pub draws_needed: Option<usize>,
}

impl DrawTest {
    pub fn estimate_is_zero(&self) -> bool {
        self.reading.estimate == 0.0
    }
}

/// One of a comparison's two tests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricTest {
    /// Variant − reference (a rate difference for refusals, a mean difference for KL), the mean
    /// over prompts of each prompt's mean over the draws it appears in.
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
    /// Prompts (per arm) needed to detect the observed difference.
    pub prompts_needed: Option<f64>,
    /// The estimate in each replicate (the between-replicate spread).
    pub per_replicate: Vec<f64>,
    /// (prompt, replicate) pairs.
    pub n: usize,
    /// Distinct prompts: the units the test runs over.
    #[serde(default)]
    pub prompts: usize,
    /// `mcnemar` (exact, over pairs) or `sign-flip` (over per-prompt means).
    #[serde(default)]
    pub test: String,
    /// Sign-flip: the standard deviation of the per-prompt differences (the test's units).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_sd: Option<f64>,
    /// Refusals: the share of (prompt, replicate) pairs on which the two arms' outcomes differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discordance: Option<f64>,
    /// With two or more replicates: the reading over draws.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over_draws: Option<DrawTest>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub variant: usize,
    pub reference: usize,
    pub replicates: Vec<u64>,
    /// The discordant pairs summed over replicates (descriptive when prompts repeat).
    pub mcnemar: McNemar,
    pub refusals: MetricTest,
    /// Standard deviation of the per-prompt KL differences (the test's units).
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
    /// Tests in the draw-level family (two per comparison over two or more replicates).
    pub draw_tests: usize,
    /// Sign-flip resamples per test.
    pub reps: usize,
}

impl Family<'_> {
    /// The most direction draws any comparison ran over (1 for a single replicate).
    pub fn draws(&self) -> usize {
        self.comparisons
            .iter()
            .map(|c| c.replicates.len())
            .max()
            .unwrap_or(0)
    }

    /// Whether some prompt was scored in more than one replicate of some comparison.
    pub fn prompts_repeat(&self) -> bool {
        self.comparisons
            .iter()
            .any(|c| c.refusals.test == "sign-flip" || c.kl.prompts < c.kl.n)
    }
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

/// One comparison's data, gathered before the family is decided.
struct Raw {
    pair: (usize, usize),
    replicates: Vec<u64>,
    mc: McNemar,
    rep_refusals: Vec<f64>,
    refusal_units: Clustered,
    /// Some when prompts repeat over draws: the refusal test over per-prompt means; None: exact
    /// McNemar on `mc`.
    refusal_flip: Option<SignFlip>,
    kl_units: Clustered,
    flip: SignFlip,
    rep_kl: Vec<f64>,
}

fn gather(pair: (usize, usize), a: &Arm, b: &Arm, units: &Units, reps: usize) -> Raw {
    let mut parts = Vec::new();
    let (mut refusal_d, mut kl_d) = (Vec::new(), Vec::new());
    let mut replicates = Vec::new();
    let (mut rep_refusals, mut rep_kl) = (Vec::new(), Vec::new());
    for (rep, (_, oa)) in &a.outcomes {
        let Some((_, ob)) = b.outcomes.get(rep) else {
            continue;
        };
        let draw = replicates.len();
        replicates.push(*rep);
        let mc = McNemar::new(&oa.refused, &ob.refused);
        rep_refusals.push(mc.estimate());
        parts.push(mc);
        for (i, (x, y)) in oa.refused.iter().zip(&ob.refused).enumerate() {
            let d = *x as i32 as f64 - *y as i32 as f64;
            refusal_d.push((units.id(Side::Bad, *rep, i), draw, d));
        }
        rep_kl.push(push_kl_differences(units, *rep, draw, oa, ob, &mut kl_d));
    }
    let draws = replicates.len();
    let refusal_units = cluster(&refusal_d, draws);
    let kl_units = cluster(&kl_d, draws);
    let mc = McNemar::pooled(&parts);
    let seed = seed_of(a, b);
    // McNemar is the exact test when every pair is a prompt of its own; repeated prompts make
    // the pairs dependent, and the test runs over per-prompt means instead.
    let refusal_flip = refusal_units
        .repeated
        .then(|| SignFlip::new(&refusal_units.units, reps, seed ^ 0x7265_6675_7361_6c73));
    let flip = SignFlip::new(&kl_units.units, reps, seed);
    Raw {
        pair,
        replicates,
        mc,
        rep_refusals,
        refusal_units,
        refusal_flip,
        kl_units,
        flip,
        rep_kl,
    }
}

/// Builds and decides the family over `arms`, `units` saying which outcomes are the same prompt.
pub fn family<'a>(arms: Vec<Arm<'a>>, settings: &StatsSettings, units: &Units) -> Family<'a> {
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
    let raws: Vec<Raw> = pairs
        .iter()
        .map(|&(i, j)| gather((i, j), &arms[i], &arms[j], units, reps))
        .collect();
    let ps: Vec<f64> = raws
        .iter()
        .flat_map(|r| {
            [
                r.refusal_flip.as_ref().map_or(r.mc.p(), SignFlip::p),
                r.flip.p(),
            ]
        })
        .collect();
    let decisions = decide(&ps, settings.correction, settings.alpha);
    // The draw-level family: the readings of comparisons over two or more draws.
    let readings: Vec<[Option<DrawReading>; 2]> = raws
        .iter()
        .map(|r| {
            [
                DrawReading::new(&r.refusal_units),
                DrawReading::new(&r.kl_units),
            ]
        })
        .collect();
    let draw_ps: Vec<f64> = readings.iter().flatten().flatten().map(|w| w.p()).collect();
    let draw_decisions = decide(&draw_ps, settings.correction, settings.alpha);
    let mut next_draw = draw_decisions.iter();
    let margin_r = settings.margins.refusals / 100.0;
    let mut over_draws = |w: Option<DrawReading>, margin: f64| {
        let w = w?;
        let d = next_draw.next().expect("one decision per reading");
        let (lo, hi) = w.interval(d.level);
        Some(DrawTest {
            reading: w,
            p: d.p,
            p_adjusted: d.p_adjusted,
            level: d.level,
            lo,
            hi,
            verdict: Verdict::from_interval(d.rejected, lo, hi, margin),
            draws_needed: w.draws_needed(w.estimate, d.level, settings.power),
        })
    };
    let mut comparisons = Vec::with_capacity(raws.len());
    for (k, (r, [wr, wk])) in raws.into_iter().zip(readings).enumerate() {
        let (dr, dk) = (decisions[2 * k], decisions[2 * k + 1]);
        let pi = r.mc.discordance();
        let refusals = match &r.refusal_flip {
            None => {
                let mc = &r.mc;
                let (lo, hi) = mc.interval(dr.level);
                let est = mc.estimate();
                let n = mc.n as f64;
                MetricTest {
                    estimate: est,
                    p: dr.p,
                    p_adjusted: dr.p_adjusted,
                    level: dr.level,
                    lo,
                    hi,
                    verdict: Verdict::from_interval(dr.rejected, lo, hi, margin_r),
                    mdd: power::mcnemar_mdd(pi, n, dr.level, settings.power),
                    prompts_needed: power::mcnemar_prompts_needed(
                        est,
                        pi,
                        dr.level,
                        settings.power,
                    ),
                    per_replicate: r.rep_refusals,
                    n: mc.n,
                    prompts: r.refusal_units.units.len(),
                    test: "mcnemar".into(),
                    unit_sd: None,
                    discordance: Some(pi),
                    over_draws: over_draws(wr, margin_r),
                }
            }
            Some(f) => flip_test(
                f,
                dr,
                margin_r,
                settings.power,
                r.rep_refusals,
                r.refusal_units.pairs,
                Some(pi),
                over_draws(wr, margin_r),
            ),
        };
        let kl = flip_test(
            &r.flip,
            dk,
            settings.margins.kl,
            settings.power,
            r.rep_kl,
            r.kl_units.pairs,
            None,
            over_draws(wk, settings.margins.kl),
        );
        comparisons.push(Comparison {
            variant: r.pair.0,
            reference: r.pair.1,
            replicates: r.replicates,
            mcnemar: r.mc,
            refusals,
            kl_sd: r.flip.sd,
            kl,
        });
    }
    Family {
        settings: settings.clone(),
        arms,
        comparisons,
        identical,
        tests,
        draw_tests: draw_ps.len(),
        reps,
    }
}

/// A decided sign-flip test over per-prompt values.
#[allow(clippy::too_many_arguments)]
fn flip_test(
    f: &SignFlip,
    d: crate::stats::family::Decision,
    margin: f64,
    power_: f64,
    per_replicate: Vec<f64>,
    pairs: usize,
    discordance: Option<f64>,
    over_draws: Option<DrawTest>,
) -> MetricTest {
    let (lo, hi) = f.interval(d.level);
    MetricTest {
        estimate: f.estimate,
        p: d.p,
        p_adjusted: d.p_adjusted,
        level: d.level,
        lo,
        hi,
        verdict: Verdict::from_interval(d.rejected, lo, hi, margin),
        mdd: (f.sd > 0.0).then(|| power::mean_mdd(f.sd, f.n as f64, d.level, power_)),
        prompts_needed: power::mean_prompts_needed(f.estimate, f.sd, d.level, power_),
        per_replicate,
        n: pairs,
        prompts: f.n,
        test: "sign-flip".into(),
        unit_sd: Some(f.sd),
        discordance,
        over_draws,
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
