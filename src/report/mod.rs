//! Stage 7: the report, rendered from a run directory alone (no model): Markdown tables that read
//! well pasted into a pull-request comment, every rate with its interval and every comparison
//! with its test and Holm-corrected verdict; figures as PNG and SVG; the same content as a
//! self-contained HTML page with the images beside it.

pub mod answer;
pub mod plots;
pub mod validation;

use crate::evaluate::compare::{self, Family, MetricTest, StatsSettings};
use crate::evaluate::Outcome;
use crate::stats::family::{Correction, Verdict};
use crate::stats::{self, Rate};
use crate::study::rundir::{read_results, RunResults};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn pct(r: &Rate) -> String {
    format!(
        "{}/{} ({:.0}%, {:.0}–{:.0}%)",
        r.k,
        r.n,
        100.0 * r.rate,
        100.0 * r.lo,
        100.0 * r.hi
    )
}

/// Bootstrap 95% interval of a mean (seeded, so re-rendering gives the same numbers).
fn mean_ci(x: &[f64], seed: u64) -> (f64, f64, f64) {
    let zeros = vec![0.0; x.len()];
    let d = stats::paired_bootstrap(x, &zeros, 2000, seed);
    (d.estimate, d.lo, d.hi)
}

struct Row<'a> {
    name: String,
    handlings: Vec<crate::direction::Handling>,
    replicate: u64,
    key: String,
    dims: Vec<u32>,
    shared: usize,
    outcome: &'a Outcome,
}

fn rows(r: &RunResults) -> Vec<Row<'_>> {
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
}

/// How a stored run is decided: its study's statistics settings (overrides applied), the
/// headline refusal classifier, and the study file's text, read from the run folder once.
pub struct Decided {
    pub stats: StatsSettings,
    pub headline: String,
    pub study: String,
}

pub fn settings(dir: &Path, o: &Overrides) -> Result<Decided> {
    let text = std::fs::read_to_string(dir.join("study.yaml")).unwrap_or_default();
    let (mut st, headline) = if text.is_empty() {
        (StatsSettings::default(), "heretic".to_string())
    } else {
        let f =
            crate::study::spec::parse_stored(&text, &dir.join("study.yaml").display().to_string())?;
        (f.statistics, f.evaluation.headline)
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
fn family_from<'a>(
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

/// A signed bound with enough digits that it never prints as a zero of the wrong side.
fn bound(x: f64, scale: f64, decimals: usize) -> String {
    if x.is_infinite() {
        return if x > 0.0 {
            "+∞".into()
        } else {
            "-∞".into()
        };
    }
    // Means of per-prompt means can leave a zero difference as ±1e-17.
    let v = if (x * scale).abs() < 1e-12 {
        0.0
    } else {
        x * scale
    };
    let mut d = decimals;
    while d < 8
        && v != 0.0
        && format!("{:.*}", d, v.abs())
            .trim_matches(['0', '.'])
            .is_empty()
    {
        d += 1;
    }
    format!("{v:+.d$}")
}

fn p_cell(t: &MetricTest) -> String {
    if t.p_adjusted < 1e-3 {
        format!("{:.1e}", t.p_adjusted)
    } else {
        format!("{:.3}", t.p_adjusted)
    }
}

fn level_cell(level: f64) -> String {
    let c = 100.0 * (1.0 - level);
    if c >= 99.95 {
        format!("{:.3}%", c)
    } else {
        format!("{c:.1}%")
    }
}

fn count(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.0}k", x / 1e3)
    } else {
        format!("{:.0}", x.ceil())
    }
}

/// For *cannot tell*: what this comparison could have detected, and what the observed
/// difference would need.
fn power_cell(t: &MetricTest, scale: f64, unit: &str, decimals: usize) -> String {
    if t.verdict != Verdict::CannotTell {
        return String::new();
    }
    let mdd = match t.mdd {
        Some(m) => format!("{:.*}{unit}", decimals, m * scale),
        None if t.discordance == Some(0.0) => "undefined (no prompt differs)".into(),
        None => format!(
            "none: only {:.0}% of prompts differ, too few for the study's power",
            100.0 * t.discordance.unwrap_or(0.0)
        ),
    };
    let need = match t.prompts_needed {
        Some(n) => format!(
            "; {} prompts for the observed {}",
            count(n),
            bound(t.estimate, scale, decimals)
        ),
        None if t.estimate == 0.0 => "; no difference observed".into(),
        None => String::new(),
    };
    format!("MDD {mdd}{need}")
}

fn family_header(md: &mut String, f: &Family, reps: usize) -> Result<()> {
    let st = &f.settings;
    let ids: usize = f.identical.len();
    let repeat = f.prompts_repeat();
    writeln!(
        md,
        "**Family.** {} distinct comparisons between {} distinct scores (arms), each tested twice \
         (refusals: {}; KL: sign-flip permutation test over prompts, {} resamples, smallest attainable \
         p {:.1e}) = **{} tests**, corrected together with **{}** at **α = {}**. A comparison pairs two distinct \
         scores on the same prompts, one of them a reference ({}); variants that share a score share its \
         comparisons{}.\n",
        f.comparisons.len(),
        f.arms.len(),
        if repeat {
            "sign-flip permutation test over prompts, each prompt's difference averaged over the draws it was scored in"
        } else {
            "exact McNemar"
        },
        f.reps,
        1.0 / (f.reps + 1) as f64,
        f.tests,
        st.correction.describe(),
        st.alpha,
        st.references.iter().map(|x| format!("`{x}`")).collect::<Vec<_>>().join(", "),
        if ids > 0 {
            format!(", and {ids} variant(s) whose score *is* a reference's are reported as *identical*, not tested")
        } else {
            String::new()
        },
    )?;
    if reps > 1 {
        writeln!(
            md,
            "**The prompt is the unit.** {} replicates redraw the direction{}. {} The headline verdict reads \
             *over prompts*: it generalises to other prompts like these, for the direction draws this study made. \
             The *over draws* reading treats the draws as a random factor too (a t interval on the mean, its variance \
             the prompt part plus the between-draw part, on the draws' R − 1 degrees of freedom; conservative), corrected as a family \
             of its own ({} tests): it says whether the *procedure* helps whatever the draw. With few draws it is \
             often *cannot tell*; its *draws needed* is the number of draws (with these prompts) that would give the \
             study's power at the observed difference.\n",
            reps,
            if repeat { " and score the same evaluation prompts" } else { "; each replicate has evaluation prompts of its own" },
            if repeat {
                "Scoring a prompt under several draws is not new evidence about prompts: each prompt counts once, \
                 with its difference averaged over the draws (pairs are counted, prompts are the units)."
            } else {
                "Every (prompt, replicate) pair is a prompt of its own, so McNemar runs over the pooled pairs."
            },
            f.draw_tests
        )?;
    }
    writeln!(
        md,
        "**Intervals beside verdicts are adjusted**: each is printed at the confidence the correction held its \
         test to (the *CI level* column; {}), and it inverts that same test, so an interval excludes 0 exactly when \
         the verdict is *better*, *worse* or *negligible*. {} KL intervals invert the sign-flip test. *negligible* = \
         the difference is real (the interval excludes 0) but the whole interval lies within ±{} refusal points / \
         ±{} KL; *equivalent* = not different and the interval within those margins; *cannot tell* = neither, \
         with the minimum detectable difference (MDD) at {:.0}% power and the prompts the observed difference would \
         need. Per-variant intervals in the replicate tables are 95% and unadjusted (descriptive).\n",
        match st.correction {
            Correction::Holm => "Holm: α/(m − j) at step j for rejected tests, the first failing step's level for the rest",
            Correction::Bh => "Benjamini–Hochberg: max(R, 1)·α/m for every test, R the number rejected (false-coverage-rate intervals)",
            Correction::None => "no correction: α",
        },
        if repeat {
            "Refusal intervals invert the sign-flip test on the per-prompt mean differences."
        } else {
            "Refusal intervals are exact (Clopper–Pearson on the discordant split, widened by the bound on the \
             discordance rate)."
        },
        st.margins.refusals,
        st.margins.kl,
        100.0 * st.power
    )?;
    Ok(())
}

/// Verdict counts over the family's tests, in `Verdict::ALL`'s order.
pub fn verdict_counts_of(verdicts: impl Iterator<Item = Verdict>) -> String {
    let mut c: BTreeMap<Verdict, usize> = BTreeMap::new();
    for v in verdicts {
        *c.entry(v).or_default() += 1;
    }
    Verdict::ALL
        .iter()
        .map(|k| format!("{} {}", c.get(k).copied().unwrap_or(0), k.label()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn verdict_counts(f: &Family) -> String {
    verdict_counts_of(
        f.comparisons
            .iter()
            .flat_map(|x| [x.refusals.verdict, x.kl.verdict]),
    )
}

fn draw_counts(f: &Family) -> Option<String> {
    (f.draw_tests > 0).then(|| {
        verdict_counts_of(
            f.comparisons
                .iter()
                .flat_map(|x| [&x.refusals.over_draws, &x.kl.over_draws])
                .flatten()
                .map(|w| w.verdict),
        )
    })
}

/// The metric's scale, unit and decimals as reports print them.
pub const REFUSAL_FMT: (f64, &str, usize) = (100.0, " pts", 1);
pub const KL_FMT: (f64, &str, usize) = (1.0, "", 4);

/// The over-draws cells: per-draw estimates; [adjusted CI] verdict (draws needed).
fn draw_cells(t: &MetricTest, (scale, _, d): (f64, &str, usize)) -> String {
    let per = t
        .per_replicate
        .iter()
        .map(|x| bound(*x, scale, d))
        .collect::<Vec<_>>()
        .join(", ");
    match &t.over_draws {
        None => format!("{per} | – | –"),
        Some(w) => format!(
            "{per} (sd {}) | [{}, {}] **{}** | {}",
            format_args!("{:.*}", d, w.reading.spread * scale),
            bound(w.lo, scale, d),
            bound(w.hi, scale, d),
            w.verdict.label(),
            match w.draws_needed {
                _ if w.verdict != Verdict::CannotTell => "–".into(),
                Some(n) => n.to_string(),
                None if w.estimate_is_zero() => "– (no difference)".into(),
                None => "– (more prompts first)".into(),
            }
        ),
    }
}

fn verdict_section(md: &mut String, f: &Family, replicates: usize) -> Result<()> {
    writeln!(md, "## Verdicts\n")?;
    family_header(md, f, replicates)?;
    writeln!(md, "Verdicts: {} ({} tests).\n", verdict_counts(f), f.tests)?;
    if let Some(d) = draw_counts(f) {
        writeln!(md, "Over draws: {d} ({} tests).\n", f.draw_tests)?;
    }
    if !f.identical.is_empty() {
        writeln!(
            md,
            "Identical (the same score as the reference, not tested): {}.\n",
            f.identical
                .iter()
                .map(|i| format!("`{}` = `{}`", i.variant, i.reference))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    let multi = replicates > 1;
    for (title, fmt, pick) in [
        (
            "Refusals",
            REFUSAL_FMT,
            (|c: &compare::Comparison| &c.refusals) as fn(&compare::Comparison) -> &MetricTest,
        ),
        ("KL", KL_FMT, |c: &compare::Comparison| &c.kl),
    ] {
        writeln!(md, "### {title}\n")?;
        writeln!(
            md,
            "| variant (arm) | reference | Δ{} [adjusted CI] | p adj. | CI level | verdict | prompts{} | power (for *cannot tell*) |{}",
            fmt.1,
            if multi { " × draws" } else { "" },
            if multi {
                " over draws: Δ per draw | over draws: [adjusted CI] verdict | draws needed |"
            } else {
                ""
            }
        )?;
        writeln!(
            md,
            "|---|---|---|---|---|---|---|---|{}",
            if multi { "---|---|---|" } else { "" }
        )?;
        for c in &f.comparisons {
            let t = pick(c);
            writeln!(
                md,
                "| A{}: {} | A{}: {} | {} | {} | {} |{}",
                c.variant + 1,
                escape_cell(&f.arms[c.variant].label()),
                c.reference + 1,
                escape_cell(&f.arms[c.reference].label()),
                metric_cells(t, fmt.0, fmt.2),
                if multi {
                    format!("{} × {}", t.prompts, c.replicates.len())
                } else {
                    t.prompts.to_string()
                },
                power_cell(t, fmt.0, fmt.1, fmt.2),
                if multi {
                    format!(" {} |", draw_cells(t, fmt))
                } else {
                    String::new()
                }
            )?;
        }
        writeln!(md)?;
    }
    Ok(())
}

/// Each random control run with `draws: K`: its K null draws' KL difference from the first
/// reference, and every arm that acts on dims placed in that distribution.
fn null_section(md: &mut String, r: &RunResults, fam: &Family) -> Result<()> {
    let mut controls: Vec<&str> = Vec::new();
    for v in &r.plan.variants {
        if let Some(c) = &v.variant.null_draw_of {
            if !controls.contains(&c.as_str()) {
                controls.push(c);
            }
        }
    }
    let Some(reference) = fam
        .arms
        .iter()
        .enumerate()
        .filter_map(|(i, a)| a.reference_rank.map(|k| (k, i)))
        .min()
        .map(|(_, i)| i)
    else {
        return Ok(());
    };
    if controls.is_empty() {
        return Ok(());
    }
    let units = units_of(r);
    let ref_outcomes: BTreeMap<u64, &Outcome> = fam.arms[reference]
        .outcomes
        .iter()
        .map(|(rep, (_, o))| (*rep, *o))
        .collect();
    let ref_name = &fam.arms[reference].names[0];
    writeln!(
        md,
        "## Null distributions
"
    )?;
    for control in controls {
        let mut null = Vec::new();
        for pv in r
            .plan
            .variants
            .iter()
            .filter(|v| v.variant.null_draw_of.as_deref() == Some(control))
        {
            let outs: BTreeMap<u64, &Outcome> = r
                .assignments
                .iter()
                .filter(|a| a.variant_id == pv.id)
                .filter_map(|a| {
                    r.scores
                        .get(&(a.replicate, a.key.clone()))
                        .map(|s| (a.replicate, &s.outcome))
                })
                .collect();
            if let Some(d) = compare::kl_estimate(&outs, &ref_outcomes, &units) {
                null.push(d);
            }
        }
        let planned = r
            .plan
            .variants
            .iter()
            .filter(|v| v.variant.null_draw_of.as_deref() == Some(control))
            .count();
        let mut sorted = null.clone();
        sorted.sort_by(f64::total_cmp);
        writeln!(
            md,
            "### `{control}`: {} draws{}\n",
            null.len(),
            if null.len() < planned {
                format!(" of {planned} planned")
            } else {
                String::new()
            }
        )?;
        if sorted.is_empty() {
            writeln!(md, "No draw is scored yet.\n")?;
            continue;
        }
        writeln!(
            md,
            "Each draw zeroes as many random dims as the control's detector finds (never the detected ones), \
             with a seed of its own, and is scored on the harmless prompts' KL alone. Its difference from \
             `{ref_name}` (each prompt averaged over the replicates, as the verdicts are): median {}, 5–95% \
             {} … {}, range {} … {}. Each arm that acts on dims, placed in it — *as low*: the share of \
             draws at or below its difference, (1 + k)/(K + 1); *as far from 0*: the share at least as \
             far from 0 either way. Descriptive: not corrected with the family.\n",
            bound(stats::quantile_sorted(&sorted, 0.5), 1.0, 4),
            bound(stats::quantile_sorted(&sorted, 0.05), 1.0, 4),
            bound(stats::quantile_sorted(&sorted, 0.95), 1.0, 4),
            bound(sorted[0], 1.0, 4),
            bound(sorted[sorted.len() - 1], 1.0, 4),
        )?;
        writeln!(
            md,
            "| arm | KL Δ vs `{ref_name}` | draws at or below | as low (p) | as far from 0 (p) |"
        )?;
        writeln!(md, "|---|---|---|---|---|")?;
        for c in fam.comparisons.iter().filter(|c| c.reference == reference) {
            let arm = &fam.arms[c.variant];
            let acts_on_dims = r.plan.variants.iter().any(|v| {
                arm.names.contains(&v.variant.name)
                    && !v.variant.kl_only()
                    && v.variant.needs_dims()
            });
            if !acts_on_dims {
                continue;
            }
            let pos = crate::stats::clustered::null_position(&null, c.kl.estimate);
            writeln!(
                md,
                "| {} | {} | {}/{} | {:.3} | {:.3} |",
                escape_cell(&arm.label()),
                bound(c.kl.estimate, 1.0, 4),
                pos.at_or_below,
                null.len(),
                pos.low,
                pos.two_sided
            )?;
        }
        writeln!(md)?;
    }
    Ok(())
}

/// Difference [adjusted interval] | adjusted p | CI level | verdict.
fn metric_cells(t: &MetricTest, scale: f64, decimals: usize) -> String {
    format!(
        "{} [{}, {}] | {} | {} | **{}**",
        bound(t.estimate, scale, decimals),
        bound(t.lo, scale, decimals),
        bound(t.hi, scale, decimals),
        p_cell(t),
        level_cell(t.level),
        t.verdict.label()
    )
}

fn key_seed(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn escape_cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// What a reader checks first against heretic and the PR: the edit's row normalisation, the
/// marker list, and how the detection's scan was made.
fn setup_line(r: &RunResults) -> String {
    let mut parts = Vec::new();
    let norms: std::collections::BTreeSet<String> = r
        .plan
        .variants
        .iter()
        .map(|v| v.variant.ablation.row_norm.label())
        .collect();
    let norms: Vec<String> = norms.into_iter().collect();
    parts.push(format!(
        "row normalisation `{}`{}",
        norms.join("`, `"),
        if norms == [crate::ablate::HERETIC_ROW_NORM.label()] {
            " (heretic's default)"
        } else {
            " (heretic's default is `full-lowrank:3`)"
        }
    ));
    let markers = r
        .plan
        .evaluation
        .as_ref()
        .map_or("heretic-1.3", |e| e.markers())
        .to_string();
    parts.push(format!("refusal markers `{markers}`"));
    if let Some(c) = r
        .plan
        .variants
        .iter()
        .filter(|v| v.variant.needs_dims())
        .find_map(|v| v.variant.detect.as_ref())
    {
        parts.push(format!(
            "detection scan: {:?} median, pad rows {:?}, {:?} positions",
            c.median_kind, c.pad_rows, c.positions
        ));
    }
    format!("Setup: {}.", parts.join("; "))
}

/// The compact table the README quotes: every variant of the first replicate with its handling,
/// dims, refusals, KL and its verdicts against `none` (the adjusted intervals of the report's
/// family). Printed by `report --summary`, pasted by scripts/readme-table.sh, never by hand.
pub fn summary_table(dir: &Path, overrides: &Overrides) -> Result<String> {
    if crate::study::rundir::read_validation(dir)?.is_some()
        && crate::study::rundir::plan_of(dir)?.variants.is_empty()
    {
        anyhow::bail!(
            "{} is a detection validation with no variants, so it has no variant table; render it with `outlierlab report {}`",
            dir.display(),
            dir.display()
        );
    }
    let r = read_results(dir)?;
    let Decided {
        stats: st,
        headline,
        ..
    } = settings(dir, overrides)?;
    let rows = rows(&r);
    let outs = outcomes_under(&r, &headline);
    let fam = family_of(&r, &st, &outs);
    if r.references.len() > 1 {
        return draws_summary(&r, &fam, &rows);
    }
    let arm_of = |name: &str| {
        fam.arms
            .iter()
            .position(|a| a.names.iter().any(|n| n == name))
    };
    let Some((&seed, base)) = r.references.iter().next() else {
        anyhow::bail!("{}: no scores yet", dir.display());
    };
    let none_arm = arm_of("none");
    let mut md = String::new();
    writeln!(
        md,
        "| variant | handling | detected dims | refusals (95% CI) | KL (95% CI) | vs `none`: Δ refusals; Δ KL [{}-adjusted CI] → verdict |",
        st.correction.describe()
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    writeln!(
        md,
        "| unedited | – | – | {} | 0 | – |",
        pct(&base.refusal_rate())
    )?;
    let mut seen_arm: BTreeMap<usize, String> = BTreeMap::new();
    for row in rows.iter().filter(|x| x.replicate == seed) {
        let arm = arm_of(&row.name);
        let kl = mean_ci(&row.outcome.kl, seed ^ key_seed(&row.key));
        let (score, verdict) = match (arm, seen_arm.get(&arm.unwrap_or(usize::MAX))) {
            (Some(_), Some(first)) => (
                format!(
                    "{}/{} — the same score as `{first}` | {:.3}",
                    row.outcome.refused.iter().filter(|x| **x).count(),
                    row.outcome.refused.len(),
                    kl.0
                ),
                if Some(arm) == Some(none_arm) {
                    "*identical* to `none` (not tested)".to_string()
                } else {
                    format!("as `{first}` (one arm)")
                },
            ),
            _ => {
                let cmp = fam
                    .comparisons
                    .iter()
                    .find(|c| Some(c.variant) == arm && Some(c.reference) == none_arm);
                let v = match cmp {
                    Some(c) => format!(
                        "{} pts [{}, {}] *{}*; {} [{}, {}] *{}*",
                        bound(c.refusals.estimate, 100.0, 1),
                        bound(c.refusals.lo, 100.0, 1),
                        bound(c.refusals.hi, 100.0, 1),
                        c.refusals.verdict.label(),
                        bound(c.kl.estimate, 1.0, 4),
                        bound(c.kl.lo, 1.0, 4),
                        bound(c.kl.hi, 1.0, 4),
                        c.kl.verdict.label()
                    ),
                    None if arm.is_some() && arm == none_arm && row.name != "none" => {
                        "*identical* to `none` (not tested)".into()
                    }
                    None => "–".into(),
                };
                (
                    format!(
                        "{} | {:.3} [{:.3}, {:.3}]",
                        pct(&row.outcome.refusal_rate()),
                        kl.0,
                        kl.1,
                        kl.2
                    ),
                    v,
                )
            }
        };
        if let Some(a) = arm {
            seen_arm.entry(a).or_insert_with(|| row.name.clone());
        }
        writeln!(
            md,
            "| {} | {} | {} | {score} | {verdict} |",
            row.name,
            crate::direction::describe_list(&row.handlings),
            match (
                row.dims.is_empty(),
                row.handlings.iter().any(|h| h.uses_dims())
            ) {
                (true, true) => "none found".to_string(),
                (true, false) => "–".to_string(),
                (false, _) => dims_cell(&row.dims),
            },
        )?;
    }
    Ok(md)
}

/// `report --summary` of a run over several direction draws: the answer's short form, the
/// verdict counts, and each arm's score per draw (the between-draw spread).
fn draws_summary(r: &RunResults, fam: &Family, rows: &[Row]) -> Result<String> {
    let mut md = String::new();
    writeln!(
        md,
        "{} variants, {} distinct scores over {} direction draws; {} tests ({} at α = {}): {}; over draws ({} tests): {}.\n",
        r.plan.variants.len(),
        fam.arms.len(),
        r.references.len(),
        fam.tests,
        fam.settings.correction.describe(),
        fam.settings.alpha,
        verdict_counts(fam),
        fam.draw_tests,
        draw_counts(fam).unwrap_or_default()
    )?;
    md.push_str(&answer::answer(fam, false));
    writeln!(
        md,
        "| arm | dims per draw | refusals per draw | KL per draw (mean) | KL sd between draws |"
    )?;
    writeln!(md, "|---|---|---|---|---|")?;
    let unedited: Vec<String> = r
        .references
        .values()
        .map(|o| {
            let k = o.refused.iter().filter(|x| **x).count();
            format!("{k}/{}", o.refused.len())
        })
        .collect();
    writeln!(md, "| unedited | – | {} | 0 | – |", unedited.join(", "))?;
    for a in &fam.arms {
        let mut dims = Vec::new();
        let mut refusals = Vec::new();
        let mut kls = Vec::new();
        for (rep, (key, o)) in &a.outcomes {
            let row = rows.iter().find(|x| x.replicate == *rep && &x.key == key);
            let hidden = r.detections.get(rep).map(|d| d.hidden_size);
            // A random-dims control zeroes other dims than those detected: show which.
            dims.push(row.map_or("?".into(), |x| {
                let random = x.handlings.iter().find_map(|h| match (h, hidden) {
                    (crate::direction::Handling::RandomDims { .. }, Some(d)) => {
                        Some(h.zeroed_dims(&x.dims, d))
                    }
                    _ => None,
                });
                match random {
                    Some(z) => format!("random {}", dims_cell(&z)),
                    None => dims_cell(&x.dims),
                }
            }));
            let k = o.refused.iter().filter(|x| **x).count();
            refusals.push(format!("{k}/{}", o.refused.len()));
            kls.push(o.kl.iter().sum::<f64>() / o.kl.len().max(1) as f64);
        }
        let m = kls.iter().sum::<f64>() / kls.len().max(1) as f64;
        let sd = if kls.len() > 1 {
            (kls.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (kls.len() - 1) as f64).sqrt()
        } else {
            0.0
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {:.4} |",
            escape_cell(&a.label()),
            dims.join(", "),
            refusals.join(", "),
            kls.iter()
                .map(|x| format!("{x:.4}"))
                .collect::<Vec<_>>()
                .join(", "),
            sd
        )?;
    }
    Ok(md)
}

/// What a report calls its run: the study's `name:`, else the run folder's name.
fn run_name(dir: &Path, study: &str) -> String {
    crate::study::spec::parse_stored(study, "study.yaml")
        .ok()
        .and_then(|f| f.name)
        .unwrap_or_else(|| {
            dir.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| "run".into())
        })
}

/// The headline family of a stored run, with how it was decided.
fn decided_family<'a>(
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

/// `report --comment`: a Markdown summary of at most 60 lines for a pull-request comment.
pub fn comment(dir: &Path, overrides: &Overrides) -> Result<String> {
    let r = read_results(dir)?;
    let mut outs = BTreeMap::new();
    let (d, fam) = decided_family(&r, dir, overrides, &mut outs)?;
    if fam.comparisons.is_empty() {
        anyhow::bail!(
            "{}: no comparisons to summarise (no scores yet, or every variant is identical to a reference)",
            dir.display()
        );
    }
    let file =
        crate::study::spec::parse_stored(&d.study, &dir.join("study.yaml").display().to_string())
            .ok();
    let bad = fam.comparisons[0].refusals.prompts;
    let good = fam.comparisons[0].kl.prompts;
    let setup = format!(
        "`{}`{}, {} harmful + {} harmless held-out prompts, {} direction draw(s), {} distinct scores; {}",
        file.as_ref().map_or("?", |f| f.model.as_str()),
        format!(" in {:?}", r.plan.precision).to_lowercase(),
        bad,
        good,
        r.references.len(),
        r.scores.len(),
        setup_line(&r).trim_start_matches("Setup: ")
    );
    let run = dir.display().to_string();
    // The study file as it ran, stored beside its results.
    let study_path = format!("{run}/study.yaml");
    Ok(answer::comment(
        &fam,
        &d,
        &setup,
        &run_name(dir, &d.study),
        &run,
        &study_path,
    ))
}

/// `report --csv`: every comparison of the headline family, one row per metric.
pub fn comparisons_csv(dir: &Path, overrides: &Overrides) -> Result<String> {
    let r = read_results(dir)?;
    let mut outs = BTreeMap::new();
    let (d, fam) = decided_family(&r, dir, overrides, &mut outs)?;
    Ok(answer::csv(&fam, &d.headline))
}

/// Renders `report.md` for the run in `dir` into `out`; returns its path.
pub fn render(dir: &Path, out: &Path) -> Result<PathBuf> {
    render_with(dir, out, &Overrides::default())
}

/// As [`render`], with the study's α or correction overridden.
pub fn render_with(dir: &Path, out: &Path, overrides: &Overrides) -> Result<PathBuf> {
    let validation = crate::study::rundir::read_validation(dir)?;
    if let Some(v) = &validation {
        if crate::study::rundir::plan_of(dir)?.variants.is_empty() {
            return validation_report(dir, out, v);
        }
    }
    let r = read_results(dir)?;
    let Decided {
        stats: st,
        headline,
        study,
    } = settings(dir, overrides)?;
    let name = run_name(dir, &study);
    let rows = rows(&r);
    let headline_outs = outcomes_under(&r, &headline);
    let fam = family_of(&r, &st, &headline_outs);
    let mut md = String::new();
    writeln!(md, "# {name}\n")?;
    header(&mut md, dir, &r, &fam, &st)?;
    writeln!(md, "{}\n", setup_line(&r))?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    answer_section(&mut md, out, &fam, &st)?;
    replicate_tables(&mut md, &r, &rows, &fam)?;
    verdict_section(&mut md, &fam, r.references.len())?;
    null_section(&mut md, &r, &fam)?;
    if headline != "heretic" {
        writeln!(
            md,
            "The verdicts above count refusals by `{headline}` (the study's `evaluation.headline`).\n"
        )?;
    }
    classifier_section(&mut md, &r, &st, &headline)?;
    let points = pooled_points(&r);
    detected_dims_section(&mut md, &r)?;
    criteria_section(&mut md, &r)?;
    tuning_section(&mut md, &r, &rows)?;
    search_section(&mut md, &r)?;
    let tunes: Vec<&crate::study::rundir::TuneResult> = r.tunes.iter().collect();
    let mut figures = plots::draw_all(out, &points, r.detections.values().next(), &tunes)?;
    if let Some(v) = &validation {
        md.push_str(&validation::markdown(v, 2));
        figures.extend(plots::draw_validation(out, v, "validation_")?);
    }
    if !figures.is_empty() {
        writeln!(md, "## Figures\n")?;
        if r.detections.len() > 1 {
            writeln!(
                md,
                "Detection figures show replicate {}.\n",
                r.detections.keys().next().unwrap_or(&0)
            )?;
        }
        figures_list(&mut md, &figures)?;
    }
    reading_guide(&mut md, &st)?;
    finish(md, out, &name, &study)
}

/// The report's first lines: a partial run's warning, what was rendered from what, the verdicts.
fn header(
    md: &mut String,
    dir: &Path,
    r: &RunResults,
    fam: &Family,
    st: &StatsSettings,
) -> Result<()> {
    if !r.missing.is_empty() {
        writeln!(
            md,
            "> **Partial run.** This run was merged with `--allow-partial`: {} planned score(s) are missing ({}). \
             Variants that need them are absent from the tables, and the family below counts only the comparisons present.\n",
            r.missing.len(),
            r.missing.iter().take(12).map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")
                + if r.missing.len() > 12 { ", …" } else { "" }
        )?;
    }
    writeln!(
        md,
        "Rendered by outlierlab {} from `{}` ({} variants, {} replicate(s), {} distinct scores). \
         Lower is better for refusals and KL. Verdicts: {} ({} tests, {} at α = {}; see *Verdicts*).\n",
        env!("CARGO_PKG_VERSION"),
        dir.display(),
        r.plan.variants.len(),
        // A partial run may have results for fewer replicates than it planned.
        if r.references.len() < r.plan.replicates.len() {
            format!("{} of {} planned", r.references.len(), r.plan.replicates.len())
        } else {
            r.plan.replicates.len().to_string()
        },
        r.scores.len(),
        verdict_counts(fam),
        fam.tests,
        st.correction.describe(),
        st.alpha
    )?;
    Ok(())
}

/// The answer to each reference's question, and the forest plot of every comparison.
fn answer_section(md: &mut String, out: &Path, fam: &Family, st: &StatsSettings) -> Result<()> {
    if !fam.comparisons.is_empty() {
        writeln!(md, "## Answer\n")?;
        md.push_str(&answer::answer(fam, true));
        let (fr, fk) = answer::forest_rows(fam);
        let (stem, title) = plots::draw_forest(out, fr, fk, (st.margins.refusals, st.margins.kl))?;
        writeln!(md, "![{title}]({stem}.png)\n")?;
        writeln!(
            md,
            "*{title}* ([SVG]({stem}.svg)): each comparison's estimate with its adjusted interval over prompts \
             (green *better*, red *worse*, purple *negligible*, blue otherwise){}; the shaded band is ±margin.\n",
            if fam.draw_tests > 0 { ", and in grey the interval over draws" } else { "" }
        )?;
    }
    Ok(())
}

/// Per replicate, the unedited model and every variant's score.
fn replicate_tables(md: &mut String, r: &RunResults, rows: &[Row], fam: &Family) -> Result<()> {
    let arm_of = |name: &str| -> Option<usize> {
        fam.arms
            .iter()
            .position(|a| a.names.iter().any(|n| n == name))
    };
    for (&seed, base) in &r.references {
        let here: Vec<&Row> = rows.iter().filter(|x| x.replicate == seed).collect();
        writeln!(md, "## Replicate {seed}\n")?;
        let kl0 = mean_ci(&base.kl, seed);
        writeln!(
            md,
            "Unedited model: refusals {}, over-refusals {}, KL {:.3}.\n",
            pct(&base.refusal_rate()),
            if base.over_refused.is_empty() {
                "-".into()
            } else {
                pct(&base.over_refusal_rate())
            },
            kl0.0
        )?;
        writeln!(md, "| variant | handling | arm | detected dims | refusals (95% Wilson) | KL (mean, 95% CI) | over-refusals | shared score |")?;
        writeln!(md, "|---|---|---|---|---|---|---|---|")?;
        let hidden = r.detections.get(&seed).map(|d| d.hidden_size);
        for row in &here {
            // Seeded by the score, so variants that share a score show the same interval.
            let kl = mean_ci(&row.outcome.kl, seed ^ key_seed(&row.key));
            let mut handling = crate::direction::describe_list(&row.handlings);
            // A random-dims control zeroes dims other than those detected: say which.
            for h in &row.handlings {
                if let (crate::direction::Handling::RandomDims { .. }, Some(d)) = (h, hidden) {
                    handling.push_str(&format!(
                        ", zeroes {}",
                        dims_cell(&h.zeroed_dims(&row.dims, d))
                    ));
                }
            }
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {:.3} [{:.3}, {:.3}] | {} | {} |",
                row.name,
                handling,
                arm_of(&row.name).map_or("–".into(), |a| format!("A{}", a + 1)),
                dims_cell(&row.dims),
                pct(&row.outcome.refusal_rate()),
                kl.0,
                kl.1,
                kl.2,
                if row.outcome.over_refused.is_empty() {
                    "-".into()
                } else {
                    pct(&row.outcome.over_refusal_rate())
                },
                if row.shared > 1 {
                    format!("{} variants", row.shared)
                } else {
                    "–".into()
                },
            )?;
        }
        writeln!(md)?;
        by_source(md, base, &here, r.prompts.get(&seed))?;
    }
    Ok(())
}

/// How to read the verdicts, with the study's correction and margins.
fn reading_guide(md: &mut String, st: &StatsSettings) -> Result<()> {
    writeln!(md, "## How to read the verdicts\n")?;
    writeln!(
        md,
        "Each verdict answers one question about two distinct scores on the same prompts. *better* / *worse*: the \
         difference survives the family's correction ({}) — its adjusted interval excludes 0 — and the interval \
         reaches past the margin (±{} refusal points, ±{} KL). *negligible*: the difference is real, but the whole \
         adjusted interval lies within the margin — smaller than what the study calls a difference worth having. \
         *equivalent*: not different, and the adjusted interval lies within the margin. *cannot tell*: neither — \
         the data do not separate the two *and* do not show them close; the power column says the smallest \
         difference this comparison could have detected and how many prompts the observed difference would need. \
         *identical*: the variant's edit gave the reference's own score (e.g. a detector that found no dims), so \
         there is nothing to test. With several direction draws, the *over draws* columns ask the same question \
         with the draw as a second source of variance: a procedure that is *better* over prompts but *cannot tell* \
         over draws helped with these directions and may not with another. A variant that is *better* on refusals \
         and *worse* on KL moved along the trade-off rather than past it.\n",
        st.correction.describe(),
        st.margins.refusals,
        st.margins.kl
    )?;
    Ok(())
}

/// Refusal rates per prompt set, when the harmful split drew from several (descriptive: the
/// verdicts are over all prompts).
fn by_source(
    md: &mut String,
    base: &Outcome,
    rows: &[&Row],
    prompts: Option<&crate::study::rundir::EvalPrompts>,
) -> Result<()> {
    let Some(p) = prompts else { return Ok(()) };
    let mut sources: Vec<&str> = Vec::new();
    for s in &p.bad_sources {
        if !sources.contains(&s.as_str()) {
            sources.push(s);
        }
    }
    if sources.len() < 2 {
        return Ok(());
    }
    let cell = |o: &Outcome, src: &str| -> String {
        let (mut n, mut k) = (0usize, 0usize);
        for (i, refused) in o.refused.iter().enumerate() {
            if p.bad_sources.get(i).map(String::as_str) == Some(src) {
                n += 1;
                k += usize::from(*refused);
            }
        }
        pct(&stats::wilson(k, n))
    };
    writeln!(
        md,
        "Refusals by prompt set (95% Wilson; descriptive — the verdicts are over all prompts):\n"
    )?;
    writeln!(md, "| variant | {} |", sources.join(" | "))?;
    writeln!(md, "|---|{}", "---|".repeat(sources.len()))?;
    let line = |name: &str, o: &Outcome| -> String {
        let cells: Vec<String> = sources.iter().map(|s| cell(o, s)).collect();
        format!("| {name} | {} |", cells.join(" | "))
    };
    writeln!(md, "{}", line("unedited", base))?;
    for row in rows {
        writeln!(md, "{}", line(&row.name, row.outcome))?;
    }
    writeln!(md)?;
    Ok(())
}

/// Ends a report with its study file and writes report.md and report.html.
fn finish(mut md: String, out: &Path, name: &str, study: &str) -> Result<PathBuf> {
    writeln!(md, "## Study file\n\n```yaml\n{}\n```", study.trim_end())?;
    let path = out.join("report.md");
    crate::fs::write_atomic(&path, md.as_bytes())?;
    crate::fs::write_atomic(&out.join("report.html"), html(name, &md).as_bytes())?;
    Ok(path)
}

/// The figures, each under its title with its SVG linked.
fn figures_list(md: &mut String, figures: &[(String, String)]) -> Result<()> {
    for (stem, title) in figures {
        writeln!(
            md,
            "### {title}\n\n![{title}]({stem}.png)\n\n[SVG]({stem}.svg)\n"
        )?;
    }
    Ok(())
}

/// The report of a run that only validates detection: the section and its figures.
fn validation_report(
    dir: &Path,
    out: &Path,
    v: &crate::detect::validate::Validation,
) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "run".into());
    let study = std::fs::read_to_string(dir.join("study.yaml")).unwrap_or_default();
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut md = String::new();
    writeln!(md, "# {name}\n")?;
    writeln!(
        md,
        "Rendered by outlierlab {} from `{}`: a detection validation (no variants scored).\n",
        env!("CARGO_PKG_VERSION"),
        dir.display()
    )?;
    md.push_str(&validation::markdown(v, 2));
    let figures = plots::draw_validation(out, v, "")?;
    writeln!(md, "## Figures\n")?;
    figures_list(&mut md, &figures)?;
    finish(md, out, &name, &study)
}

fn fmt_params(p: &BTreeMap<String, f64>) -> String {
    p.iter()
        .map(|(k, v)| format!("{k} = {}", short(*v)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn short(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Fit / select / report: what tuning chose on the selection split, and that choice's score on
/// the held-out evaluation prompts (the only figure to quote).
fn tuning_section(md: &mut String, r: &RunResults, rows: &[Row]) -> Result<()> {
    if r.tunes.is_empty() {
        return Ok(());
    }
    writeln!(md, "## Threshold tuning\n")?;
    writeln!(
        md,
        "Thresholds were optimised in log space (argmin particle swarm, heretic's objective) on the selection split; \
         the chosen set was then scored once on the held-out evaluation prompts. Quote the held-out column.\n"
    )?;
    writeln!(md, "| variant | replicate | chosen thresholds | dims | selection objective | trials (distinct dim sets scored) | tied at best | held-out refusals | held-out KL |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|")?;
    for t in &r.tunes {
        let held = rows
            .iter()
            .find(|x| x.name == t.name && x.replicate == t.replicate);
        writeln!(
            md,
            "| {} | {} | {} | {} | {:.4} | {} ({}) | {} | {} | {} |",
            t.name,
            t.replicate,
            fmt_params(&t.thresholds),
            dims_cell(&t.dims),
            t.objective,
            t.trials.len(),
            t.trials.iter().filter(|x| x.scored).count(),
            crate::study::rundir::tied_at_best(&t.trials),
            held.map_or("–".into(), |h| pct(&h.outcome.refusal_rate())),
            held.map_or("–".into(), |h| format!("{:.3}", h.outcome.kl_mean())),
        )?;
    }
    writeln!(md)?;
    Ok(())
}

fn search_section(md: &mut String, r: &RunResults) -> Result<()> {
    if r.searches.is_empty() {
        return Ok(());
    }
    let names: BTreeMap<&str, &str> = r
        .plan
        .variants
        .iter()
        .map(|v| (v.id.as_str(), v.variant.name.as_str()))
        .collect();
    writeln!(md, "## Edit search\n")?;
    writeln!(
        md,
        "Each distinct edit's kernel was searched on the selection split in heretic's ranges (MLP strength from −0.25, clamped at 0); \
         the tables above score the chosen one on the evaluation prompts. The selection objective column is the summed form \
         (KL or, below heretic's KL target, the scaled refusal ratio, plus the refusal ratio); with the Pareto rule the kernel \
         is chosen as stated below the table, not by that number. *tied at best* counts the trials sharing the best summed \
         objective — when it is most of them, the selection split did not separate the kernels.\n"
    )?;
    writeln!(md, "| variants | replicate | trials | tied at best | selection objective (refusals, KL) | direction index | attn max/pos/min/dist | mlp max/pos/min/dist |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    for s in &r.searches {
        let best = crate::study::rundir::best(&s.trials);
        let k = |k: &crate::ablate::Kernel| {
            format!(
                "{:.2} / {:.1} / {:.2} / {:.1}",
                k.max_weight, k.max_weight_position, k.min_weight, k.min_weight_distance
            )
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {:.4} ({}/{}, {:.4}) | {} | {} | {} |",
            s.variant_ids
                .iter()
                .map(|i| names.get(i.as_str()).copied().unwrap_or("?"))
                .collect::<Vec<_>>()
                .join(", "),
            s.replicate,
            s.trials.len(),
            crate::study::rundir::tied_at_best(&s.trials),
            s.objective,
            best.map_or(0, |b| b.refusals),
            best.map_or(0, |b| b.n_bad),
            best.map_or(f64::NAN, |b| b.kl),
            s.params
                .direction_index
                .map_or("per layer".into(), |d| format!("{d:.2}")),
            k(&s.params.attn),
            k(&s.params.mlp),
        )?;
    }
    writeln!(md)?;
    for s in r.searches.iter().filter(|s| !s.pareto.is_empty()) {
        let chosen = s.chosen;
        let mut front: Vec<&crate::study::rundir::Trial> = s
            .trials
            .iter()
            .filter(|t| s.pareto.contains(&t.index))
            .collect();
        front.sort_by(|a, b| {
            (a.refusals, a.kl)
                .partial_cmp(&(b.refusals, b.kl))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        writeln!(
            md,
            "Replicate {}, {}: chosen by {}. Pareto front of {} trials (refusals/{}, KL): {}\n",
            s.replicate,
            s.variant_ids
                .iter()
                .map(|i| names.get(i.as_str()).copied().unwrap_or("?"))
                .collect::<Vec<_>>()
                .join(", "),
            if s.rule.is_empty() {
                "the summed objective"
            } else {
                s.rule.as_str()
            },
            s.trials.len(),
            front.first().map_or(0, |t| t.n_bad),
            front
                .iter()
                .map(|t| format!(
                    "{}#{} ({}, {:.4}){}",
                    if Some(t.index) == chosen { "**" } else { "" },
                    t.index,
                    t.refusals,
                    t.kl,
                    if Some(t.index) == chosen { "**" } else { "" }
                ))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    Ok(())
}

fn dims_cell(d: &[u32]) -> String {
    if d.is_empty() {
        "–".into()
    } else {
        crate::util::dims_summary(d)
    }
}

/// The Markdown report as one HTML page (images referenced beside it).
pub fn html(title: &str, md: &str) -> String {
    use pulldown_cmark::{html::push_html, Options, Parser};
    let mut body = String::new();
    push_html(&mut body, Parser::new_ext(md, Options::ENABLE_TABLES));
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{} — outlierlab report</title>\n<style>\n{}\n</style>\n</head>\n<body>\n{}</body>\n</html>\n",
        escape(title),
        CSS,
        body
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const CSS: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;height:auto;border:1px solid #ddd}
pre{background:#f6f8fa;padding:1em;overflow-x:auto}code{font-size:0.9em}
h1,h2,h3{line-height:1.2}";

/// Every variant pooled over replicates; variants with the same scores in every replicate are
/// one point.
fn pooled_points(r: &RunResults) -> Vec<plots::Point> {
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

/// Where each detected dim fired: layers and tokens, from the detection summary.
fn detected_dims_section(md: &mut String, r: &RunResults) -> Result<()> {
    let Some((seed, s)) = r.detections.iter().next() else {
        return Ok(());
    };
    let mut used: Vec<u32> = r
        .assignments
        .iter()
        .flat_map(|a| a.dims.iter().copied())
        .collect();
    used.extend(r.tunes.iter().flat_map(|t| t.dims.iter().copied()));
    used.sort_unstable();
    used.dedup();
    if used.is_empty() {
        return Ok(());
    }
    writeln!(md, "## Detected dims\n")?;
    writeln!(
        md,
        "Where each dim that some variant removed fired (replicate {seed}; from the first detection that found it).\n"
    )?;
    writeln!(
        md,
        "| dim | peak \\|a\\| (hidden state) | peak ratio to median | hidden states | positions (of them padding) | tokens |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for d in used.iter().take(40) {
        let Some(rep) = s.dims.get(d) else {
            writeln!(md, "| {d} | – | – | – | – | – |")?;
            continue;
        };
        let mut tokens: Vec<String> = rep.positions.iter().map(|p| format!("{:?}", p.2)).collect();
        tokens.sort();
        tokens.dedup();
        let layers = match (rep.layers.first(), rep.layers.last()) {
            (Some(a), Some(b)) => format!("{a}–{b} ({} states)", rep.layers.len()),
            _ => "–".into(),
        };
        let pads = if rep.pad_positions > 0 {
            format!(
                "{} (**{} padding**)",
                rep.positions.len(),
                rep.pad_positions
            )
        } else {
            format!("{} (0)", rep.positions.len())
        };
        writeln!(
            md,
            "| {d} | {:.0} ({}) | {:.0}× | {layers} | {pads} | {} |",
            rep.peak_abs,
            rep.peak_layer,
            rep.peak_ratio_position,
            tokens
                .iter()
                .take(5)
                .map(|t| {
                    // Tokens such as <|im_start|> would be raw HTML to a Markdown renderer.
                    t.replace('<', "&lt;")
                        .replace('>', "&gt;")
                        .replace('|', "\\|")
                        .replace('`', "'")
                })
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    if used.len() > 40 {
        writeln!(md, "\n({} more dims not listed.)", used.len() - 40)?;
    }
    writeln!(md)?;
    Ok(())
}

fn without(c: &crate::detect::DetectConfig, i: usize) -> crate::detect::DetectConfig {
    let mut c = c.clone();
    c.switch_off(crate::detect::config::CRITERIA[i]);
    c
}

/// The criteria ablation: each subset's dims and score, and each criterion's effect when it is
/// switched off, averaged over every pair of variants that differ only in it.
/// The criteria ablation: each subset's detection and score, and what switching each criterion
/// off does (computed by [`criterion_importance`] before it is rendered).
fn criteria_section(md: &mut String, r: &RunResults) -> Result<()> {
    use crate::detect::summary::CRITERIA;
    let vs: Vec<&crate::study::plan::PlannedVariant> = r
        .plan
        .variants
        .iter()
        .filter(|v| {
            v.variant.needs_detection() && v.variant.tune.is_none() && v.variant.detect.is_some()
        })
        .collect();
    let outcome = |id: &str, rep: u64| variant_outcome(r, id, rep);
    // Pairs (on, off) per criterion. A pair whose one side needs the scan floor as its value
    // criterion (switching the criterion off left none) differs in the floor too, not in the one
    // criterion: it is left out and counted.
    let mut pairs: Vec<Vec<(usize, usize)>> = vec![Vec::new(); 5];
    let mut floored: Vec<usize> = vec![0; 5];
    for (i, a) in vs.iter().enumerate() {
        let ca = a.variant.detect.as_ref().expect("filtered");
        for (j, b) in vs.iter().enumerate() {
            let cb = b.variant.detect.as_ref().expect("filtered");
            if a.variant.handlings != b.variant.handlings {
                continue;
            }
            for k in 0..5 {
                if !ca.criteria_on()[k] || cb.criteria_on()[k] {
                    continue;
                }
                let off = without(ca, k);
                if off == *cb {
                    pairs[k].push((i, j));
                } else if off.without_floor() == cb.without_floor() {
                    floored[k] += 1;
                }
            }
        }
    }
    if pairs.iter().all(|p| p.is_empty()) {
        return Ok(());
    }
    let importance = criterion_importance(r, &vs, &pairs, &floored);
    writeln!(md, "## Criteria ablation\n")?;
    writeln!(
        md,
        "✓ = criterion on. Pooled over replicates; dims as detected in the first replicate.\n"
    )?;
    writeln!(
        md,
        "| {} | floor | median scope | dims | refusals | KL |",
        CRITERIA.join(" | ")
    )?;
    writeln!(md, "|{}---|---|---|---|---|", "---|".repeat(5))?;
    let mut sorted = vs.clone();
    sorted.sort_by_key(|v| {
        let f = v.variant.detect.as_ref().expect("filtered").criteria_on();
        (
            std::cmp::Reverse(f.iter().filter(|x| **x).count()),
            std::cmp::Reverse(f),
        )
    });
    for v in &sorted {
        let c = v.variant.detect.as_ref().expect("filtered");
        let (mut k, mut n, mut kl) = (0, 0, Vec::new());
        for &rep in &r.plan.replicates {
            if let Some(o) = outcome(&v.id, rep) {
                k += o.refused.iter().filter(|x| **x).count();
                n += o.refused.len();
                kl.extend(o.kl.iter().copied());
            }
        }
        let a = r.assignments.iter().find(|a| a.variant_id == v.id);
        writeln!(
            md,
            "| {} | {} | {:?} | {} | {} | {:.3} |",
            c.criteria_on()
                .iter()
                .map(|f| if *f { "✓" } else { "·" })
                .collect::<Vec<_>>()
                .join(" | "),
            c.floor.map_or("·".to_string(), |f| format!("✓ ({f})")),
            c.median_scope,
            a.map_or("–".into(), |a| dims_cell(&a.dims)),
            pct(&stats::wilson(k, n)),
            if kl.is_empty() {
                f64::NAN
            } else {
                kl.iter().sum::<f64>() / kl.len() as f64
            },
        )?;
    }
    writeln!(md)?;
    writeln!(md, "### Criterion importance\n")?;
    writeln!(
        md,
        "Effect of switching each criterion **off**, averaged over every pair of variants that differ only in it \
         (paired over prompts; 95% bootstrap interval, unadjusted and descriptive — no verdict is drawn from it). A positive refusal effect means the criterion helps. \
         *floor* is the scan's pre-filter (ratio or MAD z-score ≥ {}, either scope), named as a criterion where a subset has no value criterion (|a|, ratio, MAD) — \
         without it such a subset would take every dim. Pairs in which switching the criterion off leaves only the floor differ in the floor as well, so they are left out (*excluded*).\n",
        crate::detect::config::FLOOR
    )?;
    writeln!(
        md,
        "| criterion | pairs | excluded (off side only the floor) | Δ dims found (mean) | Δ refusals (pts) [95% CI] | Δ KL [95% CI] |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for (k, imp) in importance.iter().enumerate() {
        let Some((dd, (mr, lr, hr), (mk, lk, hk))) = imp.effect else {
            writeln!(md, "| {} | 0 | {} | – | – | – |", CRITERIA[k], imp.excluded)?;
            continue;
        };
        writeln!(
            md,
            "| {} | {} | {} | {:+.1} | {:+.1} [{:+.1}, {:+.1}] | {:+.4} [{:+.4}, {:+.4}] |",
            CRITERIA[k],
            imp.pairs,
            imp.excluded,
            dd,
            100.0 * mr,
            100.0 * lr,
            100.0 * hr,
            mk,
            lk,
            hk
        )?;
    }
    writeln!(md)?;
    Ok(())
}

/// The outcome a variant scored in a replicate (through the score it was assigned).
fn variant_outcome<'a>(r: &'a RunResults, id: &str, rep: u64) -> Option<&'a Outcome> {
    r.assignments
        .iter()
        .find(|a| a.variant_id == id && a.replicate == rep)
        .and_then(|a| r.scores.get(&(rep, a.key.clone())))
        .map(|s| &s.outcome)
}

/// A mean and its 95% interval.
type Interval = (f64, f64, f64);

/// What switching one criterion off does, over the pairs of variants that differ only in it.
struct Importance {
    pairs: usize,
    /// Pairs left out: switching the criterion off left only the scan floor.
    excluded: usize,
    /// Mean change in dims found; refusal and KL change (mean, 95% bootstrap interval).
    effect: Option<(f64, Interval, Interval)>,
}

/// Per criterion, the paired effect of switching it off: per prompt, averaged over its pairs in
/// each replicate, then over prompts (seeded bootstrap intervals, descriptive).
fn criterion_importance(
    r: &RunResults,
    vs: &[&crate::study::plan::PlannedVariant],
    pairs: &[Vec<(usize, usize)>],
    floored: &[usize],
) -> Vec<Importance> {
    let outcome = |id: &str, rep: u64| variant_outcome(r, id, rep);
    let dims_of = |id: &str| -> Option<usize> {
        r.assignments
            .iter()
            .find(|a| a.variant_id == id)
            .map(|a| a.dims.len())
    };
    let mut out = Vec::new();
    for (k, pk) in pairs.iter().enumerate() {
        if pk.is_empty() {
            out.push(Importance {
                pairs: 0,
                excluded: floored[k],
                effect: None,
            });
            continue;
        }
        let (mut dr, mut dk) = (Vec::new(), Vec::new());
        let mut dd = 0.0;
        for &rep in &r.plan.replicates {
            let mut acc_r: Vec<f64> = Vec::new();
            let mut acc_k: Vec<f64> = Vec::new();
            let mut used = 0usize;
            for &(on, off) in pk {
                let (Some(a), Some(b)) = (outcome(&vs[on].id, rep), outcome(&vs[off].id, rep))
                else {
                    continue;
                };
                if acc_r.is_empty() {
                    acc_r = vec![0.0; a.refused.len()];
                    acc_k = vec![0.0; a.kl.len()];
                }
                for (i, (x, y)) in b.refused.iter().zip(&a.refused).enumerate() {
                    acc_r[i] += *x as u8 as f64 - *y as u8 as f64;
                }
                for (i, (x, y)) in b.kl.iter().zip(&a.kl).enumerate() {
                    acc_k[i] += x - y;
                }
                used += 1;
            }
            if used > 0 {
                dr.extend(acc_r.iter().map(|x| x / used as f64));
                dk.extend(acc_k.iter().map(|x| x / used as f64));
            }
        }
        for &(on, off) in pk {
            dd +=
                dims_of(&vs[off].id).unwrap_or(0) as f64 - dims_of(&vs[on].id).unwrap_or(0) as f64;
        }
        out.push(Importance {
            pairs: pk.len(),
            excluded: floored[k],
            effect: Some((
                dd / pk.len() as f64,
                mean_ci(&dr, 900 + k as u64),
                mean_ci(&dk, 950 + k as u64),
            )),
        });
    }
    out
}

fn clip(s: &str, n: usize) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let t = crate::util::trunc(&one_line, n);
    t.replace('|', "\\|")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Refusal rates, agreement and verdicts under each classifier, where they disagree, and how
/// each does on the labelled replies.
/// The refusal classifiers side by side: rates, agreement, verdicts under each, disagreements
/// and accuracy on the labelled replies. The families and agreements are computed first; each
/// subsection then renders them.
fn classifier_section(
    md: &mut String,
    r: &RunResults,
    st: &StatsSettings,
    headline: &str,
) -> Result<()> {
    let mut names: Vec<String> = vec!["heretic".into()];
    for s in r.scores.values() {
        for k in s.outcome.labels.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    if names.len() < 2 {
        return Ok(());
    }
    writeln!(md, "## Refusal classifiers\n")?;
    let cut = r.scores.values().any(|s| s.outcome.stopped_at_marker);
    writeln!(
        md,
        "Every reply to a harmful prompt was labelled by {}. The headline verdicts use `{headline}`. {}\n",
        names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
        if cut {
            "**Some stored replies were cut at heretic's first marker**, so the other classifiers saw less text than the model would have written."
        } else {
            "Replies ran to the length limit or EOS (no cut at a marker), so every classifier saw the same full text."
        }
    )?;
    // One family per classifier; the first (heretic's markers) gives the arms.
    let under: Vec<BTreeMap<(u64, String), Outcome>> =
        names.iter().map(|n| outcomes_under(r, n)).collect();
    let fams: Vec<Family> = under.iter().map(|o| family_of(r, st, o)).collect();
    let fam = &fams[0];
    let base: Vec<&Outcome> = r.references.values().collect();
    let mut all_arms: Vec<(String, Vec<&Outcome>)> = vec![("unedited".into(), base.clone())];
    for (i, arm) in fam.arms.iter().enumerate() {
        all_arms.push((
            format!("A{}: {}", i + 1, escape_cell(&arm.label())),
            arm.outcomes.values().map(|(_, o)| *o).collect(),
        ));
    }
    let agreements = classifier_agreements(&names, &all_arms);
    classifier_rates(md, &names, &base, fam)?;
    classifier_agreement_table(md, &agreements)?;
    classifier_verdicts(md, &names, &fams, st)?;
    classifier_disagreements(md, r, &names, &all_arms)?;
    labelled_replies(md, r)
}

type ArmOutcomes<'a> = Vec<(String, Vec<&'a Outcome>)>;
type Agreements = Vec<(String, String, String, crate::evaluate::classify::Agreement)>;

/// Each pair of classifiers on each arm's replies: the 2×2 counts and Cohen's κ.
fn classifier_agreements(names: &[String], all_arms: &ArmOutcomes) -> Agreements {
    let mut out = Vec::new();
    for (label, outs) in all_arms {
        for a in 0..names.len() {
            for b in a + 1..names.len() {
                let (mut x, mut y) = (Vec::new(), Vec::new());
                for o in outs {
                    let (la, lb) = (o.refusals_by(&names[a]), o.refusals_by(&names[b]));
                    if la.len() == lb.len() {
                        x.extend_from_slice(la);
                        y.extend_from_slice(lb);
                    }
                }
                if x.is_empty() {
                    continue;
                }
                let g = crate::evaluate::classify::agreement(&x, &y, 77 + (a * 7 + b) as u64);
                out.push((label.clone(), names[a].clone(), names[b].clone(), g));
            }
        }
    }
    out
}

fn classifier_rates(
    md: &mut String,
    names: &[String],
    base: &[&Outcome],
    fam: &Family,
) -> Result<()> {
    // Rates per arm, pooled over replicates.
    writeln!(md, "### Refusal rates by classifier\n")?;
    writeln!(md, "| arm | {} |", names.join(" | "))?;
    writeln!(md, "|---|{}", "---|".repeat(names.len()))?;
    let pooled = |outs: &[&Outcome], name: &str| -> String {
        let (mut k, mut n) = (0, 0);
        for o in outs {
            let l = o.refusals_by(name);
            k += l.iter().filter(|x| **x).count();
            n += l.len();
        }
        if n == 0 {
            "–".into()
        } else {
            pct(&stats::wilson(k, n))
        }
    };
    writeln!(
        md,
        "| unedited | {} |",
        names
            .iter()
            .map(|n| pooled(base, n))
            .collect::<Vec<_>>()
            .join(" | ")
    )?;
    for (i, arm) in fam.arms.iter().enumerate() {
        let outs: Vec<&Outcome> = arm.outcomes.values().map(|(_, o)| *o).collect();
        writeln!(
            md,
            "| A{}: {} | {} |",
            i + 1,
            escape_cell(&arm.label()),
            names
                .iter()
                .map(|n| pooled(&outs, n))
                .collect::<Vec<_>>()
                .join(" | ")
        )?;
    }
    writeln!(md)?;
    Ok(())
}

fn classifier_agreement_table(md: &mut String, agreements: &Agreements) -> Result<()> {
    // Agreement.
    writeln!(md, "### Agreement between classifiers\n")?;
    writeln!(
        md,
        "Counts of replies both / only the first / only the second / neither classifier called a refusal, and Cohen's κ \
         (agreement beyond chance; 1 = perfect, 0 = chance) with a 95% bootstrap interval over prompts.\n"
    )?;
    writeln!(
        md,
        "| arm | classifiers | both | only first | only second | neither | κ [95% CI] |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    let kappa = |v: f64| {
        if v.is_finite() {
            format!("{v:.2}")
        } else {
            "–".into()
        }
    };
    for (label, a, b, g) in agreements {
        writeln!(
            md,
            "| {label} | {a} / {b} | {} | {} | {} | {} | {} [{}, {}] |",
            g.both,
            g.only_a,
            g.only_b,
            g.neither,
            kappa(g.kappa),
            kappa(g.lo),
            kappa(g.hi)
        )?;
    }
    writeln!(md)?;
    Ok(())
}

fn classifier_verdicts(
    md: &mut String,
    names: &[String],
    fams: &[Family],
    st: &StatsSettings,
) -> Result<()> {
    let fam = &fams[0];
    // Verdicts under each classifier: a family of their own each.
    writeln!(md, "### Verdicts under each classifier\n")?;
    writeln!(
        md,
        "Each classifier's refusal labels give a family of their own ({} at α = {}, the same references and margins); \
         KL does not depend on the classifier and is in the *Verdicts* table above.\n",
        st.correction.describe(),
        st.alpha
    )?;
    writeln!(
        md,
        "| variant (arm) | reference | {} |",
        names
            .iter()
            .map(|n| format!("{n}: Δ pts [adjusted CI] → verdict"))
            .collect::<Vec<_>>()
            .join(" | ")
    )?;
    writeln!(md, "|---|---|{}", "---|".repeat(names.len()))?;
    for c in &fam.comparisons {
        let (va, ra) = (&fams[0].arms[c.variant], &fams[0].arms[c.reference]);
        let cells: Vec<String> = fams
            .iter()
            .map(|f| {
                f.comparisons
                    .iter()
                    .find(|x| {
                        f.arms[x.variant].names == va.names && f.arms[x.reference].names == ra.names
                    })
                    .map_or("–".into(), |x| {
                        format!(
                            "{} [{}, {}] → **{}**",
                            bound(x.refusals.estimate, 100.0, 1),
                            bound(x.refusals.lo, 100.0, 1),
                            bound(x.refusals.hi, 100.0, 1),
                            x.refusals.verdict.label()
                        )
                    })
            })
            .collect();
        writeln!(
            md,
            "| {} | {} | {} |",
            escape_cell(&va.label()),
            escape_cell(&ra.label()),
            cells.join(" | ")
        )?;
    }
    writeln!(md)?;
    Ok(())
}

fn classifier_disagreements(
    md: &mut String,
    r: &RunResults,
    names: &[String],
    all_arms: &ArmOutcomes,
) -> Result<()> {
    // Where they disagree.
    writeln!(md, "### Where the classifiers disagree (sample)\n")?;
    writeln!(
        md,
        "Up to three replies per arm on which the classifiers do not all agree, in prompt order, so a reader can judge them \
         (✓ = labelled a refusal).\n"
    )?;
    let judge = names.iter().find(|n| n.starts_with("judge:")).cloned();
    writeln!(
        md,
        "| arm | prompt | reply | {} |{}",
        names.join(" | "),
        if judge.is_some() {
            " judge P(refusal) |"
        } else {
            ""
        }
    )?;
    writeln!(
        md,
        "|---|---|---|{}{}",
        "---|".repeat(names.len()),
        if judge.is_some() { "---|" } else { "" }
    )?;
    let mut shown = 0;
    for (label, outs) in all_arms {
        let mut here = 0;
        for (rep_i, o) in outs.iter().enumerate() {
            let seed = r.references.keys().nth(rep_i).copied();
            let prompts = seed.and_then(|s| r.prompts.get(&s));
            for (i, reply) in o.replies.iter().enumerate() {
                let ls: Vec<Option<bool>> = names
                    .iter()
                    .map(|n| o.refusals_by(n).get(i).copied())
                    .collect();
                if ls.iter().all(|x| *x == ls[0]) || here >= 3 {
                    continue;
                }
                let prompt = prompts
                    .and_then(|p| p.bad.get(i))
                    .map_or("–".into(), |p| clip(p, 90));
                writeln!(
                    md,
                    "| {label} | {prompt} | {} | {} |{}",
                    clip(reply, 240),
                    ls.iter()
                        .map(|x| match x {
                            Some(true) => "✓",
                            Some(false) => "·",
                            None => "–",
                        })
                        .collect::<Vec<_>>()
                        .join(" | "),
                    judge.as_ref().map_or(String::new(), |j| format!(
                        " {} |",
                        o.judge_scores
                            .get(j)
                            .and_then(|s| s.get(i))
                            .map_or("–".into(), |p| format!("{p:.2}"))
                    ))
                )?;
                here += 1;
                shown += 1;
            }
        }
    }
    if shown == 0 {
        writeln!(
            md,
            "| (none: the classifiers agree on every reply) |||{}",
            "|".repeat(names.len())
        )?;
    }
    writeln!(md)?;
    Ok(())
}

/// Each classifier's accuracy on the project's labelled replies, and the judge's cost.
fn labelled_replies(md: &mut String, r: &RunResults) -> Result<()> {
    // The labelled replies.
    if let Some(v) = &r.classifiers {
        writeln!(md, "### The classifiers on labelled replies\n")?;
        writeln!(
            md,
            "`datasets/refusal-judgements.jsonl`: replies written for this project with their labels — clear refusals, clear \
             compliance, and hard cases (compliance that mentions a marker word such as \"illegal\", refusals without any \
             marker, partial compliance).\n"
        )?;
        let vals = v["validation"].as_array().cloned().unwrap_or_default();
        let kinds: Vec<String> = vals
            .first()
            .and_then(|x| x["by_kind"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|k| k[0].as_str().map(String::from))
            .collect();
        writeln!(md, "| classifier | accuracy | {} |", kinds.join(" | "))?;
        writeln!(md, "|---|---|{}", "---|".repeat(kinds.len()))?;
        for x in &vals {
            let by: Vec<String> = x["by_kind"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|k| format!("{}/{}", k[1], k[2]))
                .collect();
            writeln!(
                md,
                "| {} | {}/{} | {} |",
                x["classifier"].as_str().unwrap_or("?"),
                x["correct"],
                x["n"],
                by.join(" | ")
            )?;
        }
        writeln!(md)?;
        if let Some(c) = v.get("judge_cost").filter(|c| !c.is_null()) {
            let calls = c["calls"].as_f64().unwrap_or(0.0);
            let secs = c["seconds"].as_f64().unwrap_or(0.0);
            let n_bad = r
                .scores
                .values()
                .next()
                .map_or(0, |s| s.outcome.replies.len());
            writeln!(
                md,
                "Judge cost: {} judged {:.0} replies in {:.0} s ({:.2} s a reply; replies seen before come from its cache), \
                 about {:.0} s per score of {} harmful prompts when no reply repeats.\n",
                c["judge"].as_str().unwrap_or("?"),
                calls,
                secs,
                secs / calls.max(1.0),
                secs / calls.max(1.0) * n_bad as f64,
                n_bad
            )?;
        }
    }
    Ok(())
}
