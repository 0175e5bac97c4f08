//! The report's numbers, computed before anything is rendered: the run's rows, the decided
//! settings, the families of comparisons, pooled points for the figures.

use super::*;

/// Bootstrap 95% interval of a mean (seeded, so re-rendering gives the same numbers).
pub(super) fn mean_ci(x: &[f64], seed: u64) -> (f64, f64, f64) {
    let zeros = vec![0.0; x.len()];
    let d = stats::paired_bootstrap(x, &zeros, 2000, seed);
    (d.estimate, d.lo, d.hi)
}

pub(super) struct Row<'a> {
    pub(super) name: String,
    pub(super) handlings: Vec<crate::direction::Handling>,
    pub(super) replicate: u64,
    pub(super) key: String,
    pub(super) dims: Vec<u32>,
    pub(super) shared: usize,
    pub(super) outcome: &'a Outcome,
}

pub(super) fn rows(r: &RunResults) -> Vec<Row<'_>> {
    let mut out = Vec::new();
    // A null draw is not an arm: its KL alone places the arms in the null distribution.
    for pv in r.plan.variants.iter().filter(|v| !v.variant.kl_only()) {
        for a in r.assignments.iter().filter(|a| a.variant_id == pv.id) {
            if let Some(s) = r.scores.get(&(a.replicate, a.key.clone())) {
                out.push(Row {
                    name: pv.variant.name.clone(),
                    handlings: pv.variant.handlings.clone(),
                    replicate: a.replicate,
                    key: a.key.clone(),
                    dims: a.dims.clone(),
                    shared: s.variant_ids.len(),
                    outcome: &s.outcome,
                });
            }
        }
    }
    out
}

/// What `outlierlab report` (and `power`) may override of the study's `statistics:` block.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub alpha: Option<f64>,
    pub correction: Option<Correction>,
    pub power: Option<f64>,
    /// Another run folder of the study to compare with (instead of its `compare_with:`).
    pub against: Option<PathBuf>,
}

/// How a stored run is decided: its study's statistics settings (overrides applied), the
/// headline refusal classifier, and the study file's text, read from the run folder once.
pub struct Decided {
    pub stats: StatsSettings,
    pub headline: String,
    pub study: String,
    /// The study's `compare_with:` run folder.
    pub compare_with: Option<String>,
}

pub fn settings(dir: &Path, o: &Overrides) -> Result<Decided> {
    let text = std::fs::read_to_string(crate::study::rundir::RunDir::at(dir).study_file())
        .unwrap_or_default();
    let (mut st, headline, compare_with) = if text.is_empty() {
        (StatsSettings::default(), "heretic".to_string(), None)
    } else {
        let f = crate::study::spec::parse_stored(
            &text,
            &crate::study::rundir::RunDir::at(dir)
                .study_file()
                .display()
                .to_string(),
        )?;
        (f.statistics, f.evaluation.headline, f.compare_with)
    };
    if let Some(a) = o.alpha {
        st.alpha = a;
    }
    if let Some(c) = o.correction {
        st.correction = c;
    }
    if let Some(p) = o.power {
        st.power = p;
    }
    if let Some((field, msg)) = st.problem() {
        anyhow::bail!("statistics.{field}: {msg}");
    }
    Ok(Decided {
        stats: st,
        headline,
        study: text,
        compare_with,
    })
}

/// Every variant of the run, grouped into arms (one per distinct score), and the family of
/// comparisons between them (refusals by heretic's markers).
pub fn run_family<'a>(r: &'a RunResults, st: &StatsSettings) -> Family<'a> {
    family_from(r, st, |rep, key| {
        r.scores.get(&(rep, key.to_string())).map(|s| &s.outcome)
    })
}

/// Every score's outcome with classifier `name`'s labels as its refusals; scores it did not
/// label are left out.
pub fn outcomes_under(r: &RunResults, name: &str) -> BTreeMap<(u64, String), Outcome> {
    r.scores
        .iter()
        .filter_map(|(k, s)| s.outcome.under(name).map(|o| (k.clone(), o)))
        .collect()
}

/// The family over `outs` (see [`outcomes_under`]).
pub fn family_of<'a>(
    r: &RunResults,
    st: &StatsSettings,
    outs: &'a BTreeMap<(u64, String), Outcome>,
) -> Family<'a> {
    family_from(r, st, |rep, key| outs.get(&(rep, key.to_string())))
}

/// The family of the run's variants, each score's outcome looked up by (replicate, key).
pub(super) fn family_from<'a>(
    r: &RunResults,
    st: &StatsSettings,
    outcome: impl Fn(u64, &str) -> Option<&'a Outcome>,
) -> Family<'a> {
    let items: Vec<_> = rows(r)
        .into_iter()
        .filter_map(|x| {
            let o = outcome(x.replicate, &x.key)?;
            Some((x.name, x.handlings, x.replicate, x.key, o))
        })
        .collect();
    compare::family(compare::arms(&items, st), st, &units_of(r))
}

/// Which stored outcomes are the same prompt: each replicate's recorded evaluation prompts
/// when every replicate has them; otherwise what the plan implies (one evaluation split for
/// every replicate under `redraw: direction`, a split of its own per replicate under `all`).
pub fn units_of(r: &RunResults) -> compare::Units {
    let reps: std::collections::BTreeSet<u64> = r.scores.keys().map(|(rep, _)| *rep).collect();
    if !reps.is_empty() && reps.iter().all(|rep| r.prompts.contains_key(rep)) {
        return compare::Units::from_texts(
            r.prompts
                .iter()
                .map(|(rep, p)| (*rep, p.good.as_slice(), p.bad.as_slice())),
        );
    }
    match r.plan.redraw {
        crate::study::spec::Redraw::Direction => compare::Units::SharedByPosition,
        crate::study::spec::Redraw::All => compare::Units::Distinct,
    }
}

pub(super) fn key_seed(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Every variant pooled over replicates; variants with the same scores in every replicate are
/// one point.
pub(super) fn pooled_points(r: &RunResults) -> Vec<plots::Point> {
    // (replicate, score key) of every score a variant has, its variants' names, and whether
    // any of them is a baseline.
    type Group = (Vec<(u64, String)>, Vec<String>, bool);
    let mut groups: Vec<Group> = Vec::new();
    for pv in r.plan.variants.iter().filter(|v| !v.variant.kl_only()) {
        let mut keys: Vec<(u64, String)> = r
            .assignments
            .iter()
            .filter(|a| {
                a.variant_id == pv.id && r.scores.contains_key(&(a.replicate, a.key.clone()))
            })
            .map(|a| (a.replicate, a.key.clone()))
            .collect();
        if keys.is_empty() {
            continue;
        }
        keys.sort();
        let baseline = pv.variant.handlings.is_empty()
            || pv
                .variant
                .handlings
                .iter()
                .all(|h| matches!(h, crate::direction::Handling::Winsorize { .. }));
        match groups.iter_mut().find(|g| g.0 == keys) {
            Some(g) => {
                g.1.push(pv.variant.name.clone());
                g.2 |= baseline;
            }
            None => groups.push((keys, vec![pv.variant.name.clone()], baseline)),
        }
    }
    groups
        .into_iter()
        .enumerate()
        .map(|(i, (keys, names, baseline))| {
            let mut refused = Vec::new();
            let mut kl = Vec::new();
            for k in &keys {
                let o = &r.scores[k].outcome;
                refused.extend(o.refused.iter().copied());
                kl.extend(o.kl.iter().copied());
            }
            let rate = stats::wilson(refused.iter().filter(|x| **x).count(), refused.len());
            let (m, lo, hi) = mean_ci(&kl, 500 + i as u64);
            plots::Point {
                label: if names.len() > 1 {
                    format!("{} (+{})", names[0], names.len() - 1)
                } else {
                    names[0].clone()
                },
                rate: rate.rate,
                rate_lo: rate.lo,
                rate_hi: rate.hi,
                kl: m,
                kl_lo: lo,
                kl_hi: hi,
                baseline,
            }
        })
        .collect()
}

/// The headline family of a stored run, with how it was decided.
pub(super) fn decided_family<'a>(
    r: &'a RunResults,
    dir: &Path,
    overrides: &Overrides,
    outs: &'a mut BTreeMap<(u64, String), Outcome>,
) -> Result<(Decided, Family<'a>)> {
    let d = settings(dir, overrides)?;
    *outs = outcomes_under(r, &d.headline);
    let fam = family_of(r, &d.stats, outs);
    Ok((d, fam))
}

/// The outcome a variant scored in a replicate (through the score it was assigned).
pub(super) fn variant_outcome<'a>(r: &'a RunResults, id: &str, rep: u64) -> Option<&'a Outcome> {
    r.assignments
        .iter()
        .find(|a| a.variant_id == id && a.replicate == rep)
        .and_then(|a| r.scores.get(&(rep, a.key.clone())))
        .map(|s| &s.outcome)
}
