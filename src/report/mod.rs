//! Stage 7: the report, rendered from a run directory alone (no model): Markdown tables that read
//! well pasted into a pull-request comment, every rate with its interval and every comparison
//! with its test and Holm-corrected verdict.

use crate::evaluate::{compare, finish_comparisons, Comparison, Outcome};
use crate::stats::{self, Rate};
use crate::study::runner::{read_results, RunResults};
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
    replicate: u64,
    dims: Vec<u32>,
    shared: usize,
    outcome: &'a Outcome,
}

fn rows(r: &RunResults) -> Vec<Row<'_>> {
    let names: BTreeMap<&str, &str> = r
        .plan
        .variants
        .iter()
        .map(|v| (v.id.as_str(), v.variant.name.as_str()))
        .collect();
    let mut out = Vec::new();
    for pv in &r.plan.variants {
        for a in r.assignments.iter().filter(|a| a.variant_id == pv.id) {
            if let Some(s) = r.scores.get(&(a.replicate, a.key.clone())) {
                out.push(Row {
                    name: names
                        .get(a.variant_id.as_str())
                        .copied()
                        .unwrap_or("?")
                        .to_string(),
                    replicate: a.replicate,
                    dims: a.dims.clone(),
                    shared: s.variant_ids.len(),
                    outcome: &s.outcome,
                });
            }
        }
    }
    out
}

fn verdict_cell(c: &Comparison) -> String {
    format!(
        "{:+.0} pts, p={:.3} → **{}**; KL {:+.3} [{:+.3}, {:+.3}], p={:.3} → **{}**",
        100.0 * c.refusals.diff,
        c.refusals_p_adj,
        c.refusals_verdict.label(),
        c.kl.estimate,
        c.kl.lo,
        c.kl.hi,
        c.kl_p_adj,
        c.kl_verdict.label()
    )
}

/// Renders `report.md` for the run in `dir` into `out`; returns its path.
pub fn render(dir: &Path, out: &Path) -> Result<PathBuf> {
    let r = read_results(dir)?;
    let study = std::fs::read_to_string(dir.join("study.yaml")).unwrap_or_default();
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "run".into());
    let rows = rows(&r);
    let mut md = String::new();
    writeln!(md, "# {name}\n")?;
    writeln!(
        md,
        "Rendered by outlierlab {} from `{}` ({} variants, {} replicate(s), {} distinct scores). \
         Lower is better for refusals and KL. Intervals are 95% (Wilson for rates, paired bootstrap for KL). \
         Verdicts compare each variant with `none` and with the winsorisation baseline on the same prompts \
         (exact McNemar for refusals, paired bootstrap for KL), Holm-corrected over every comparison in the table, α = 0.05; \
         *cannot tell* means the data do not separate the two.\n",
        env!("CARGO_PKG_VERSION"),
        dir.display(),
        r.plan.variants.len(),
        r.plan.replicates.len(),
        r.scores.len()
    )?;
    for (&seed, base) in &r.references {
        let here: Vec<&Row> = rows.iter().filter(|x| x.replicate == seed).collect();
        let none = here.iter().find(|x| x.name == "none");
        let winsor = here.iter().find(|x| x.name.starts_with("winsorize"));
        let mut comps: Vec<Comparison> = Vec::new();
        let mut index: Vec<(usize, Option<usize>, Option<usize>)> = Vec::new();
        for (i, row) in here.iter().enumerate() {
            let a = none.filter(|n| n.name != row.name).map(|n| {
                comps.push(compare(
                    (&row.name, row.outcome),
                    ("none", n.outcome),
                    7 + i as u64,
                ));
                comps.len() - 1
            });
            let b = winsor
                .filter(|w| w.name != row.name && row.name != "none")
                .map(|w| {
                    comps.push(compare(
                        (&row.name, row.outcome),
                        (&w.name, w.outcome),
                        1007 + i as u64,
                    ));
                    comps.len() - 1
                });
            index.push((i, a, b));
        }
        finish_comparisons(&mut comps, 0.05);
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
        writeln!(md, "| variant | detected dims | refusals | KL (mean, 95% CI) | over-refusals | vs none | vs {} | shared score |", winsor.map_or("winsorize".into(), |w| w.name.clone()))?;
        writeln!(md, "|---|---|---|---|---|---|---|---|")?;
        for (i, a, b) in index {
            let row = here[i];
            let kl = mean_ci(&row.outcome.kl, seed + i as u64);
            writeln!(
                md,
                "| {} | {} | {} | {:.3} [{:.3}, {:.3}] | {} | {} | {} | {} |",
                row.name,
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
                a.map_or("–".into(), |j| verdict_cell(&comps[j])),
                b.map_or("–".into(), |j| verdict_cell(&comps[j])),
                if row.shared > 1 {
                    format!("{} variants", row.shared)
                } else {
                    "–".into()
                },
            )?;
        }
        writeln!(md)?;
    }
    tuning_section(&mut md, &r, &rows)?;
    search_section(&mut md, &r)?;
    writeln!(md, "## How to read the verdicts\n")?;
    writeln!(
        md,
        "Each verdict asks one question: on these prompts, is the variant's refusal rate (or KL) lower than the reference's by more than chance allows? \
         *better*/*worse* need a Holm-adjusted p below 0.05; with 100 prompts, 3 vs 6 refusals (p ≈ 0.5) is *cannot tell*. \
         A variant that is *better* on refusals and *worse* on KL moved along the trade-off rather than past it.\n"
    )?;
    writeln!(md, "## Study file\n\n```yaml\n{}\n```", study.trim_end())?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let path = out.join("report.md");
    crate::study::runner::write_atomic(&path, md.as_bytes())?;
    Ok(path)
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
    writeln!(md, "| variant | replicate | chosen thresholds | dims | selection objective | trials (distinct dim sets scored) | held-out refusals | held-out KL |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    for t in &r.tunes {
        let held = rows
            .iter()
            .find(|x| x.name == t.name && x.replicate == t.replicate);
        writeln!(
            md,
            "| {} | {} | {} | {} | {:.4} | {} ({}) | {} | {} |",
            t.name,
            t.replicate,
            fmt_params(&t.thresholds),
            dims_cell(&t.dims),
            t.objective,
            t.trials.len(),
            t.trials.iter().filter(|x| x.scored).count(),
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
        "Each distinct edit's kernel was searched on the selection split (heretic's ranges and objective); \
         the tables above score the best one on the evaluation prompts.\n"
    )?;
    writeln!(md, "| variants | replicate | trials | selection objective | direction index | attn max/pos/min/dist | mlp max/pos/min/dist |")?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    for s in &r.searches {
        let k = |k: &crate::ablate::Kernel| {
            format!(
                "{:.2} / {:.1} / {:.2} / {:.1}",
                k.max_weight, k.max_weight_position, k.min_weight, k.min_weight_distance
            )
        };
        writeln!(
            md,
            "| {} | {} | {} | {:.4} | {} | {} | {} |",
            s.variant_ids
                .iter()
                .map(|i| names.get(i.as_str()).copied().unwrap_or("?"))
                .collect::<Vec<_>>()
                .join(", "),
            s.replicate,
            s.trials.len(),
            s.objective,
            s.params
                .direction_index
                .map_or("per layer".into(), |d| format!("{d:.2}")),
            k(&s.params.attn),
            k(&s.params.mlp),
        )?;
    }
    writeln!(md)?;
    Ok(())
}

fn dims_cell(d: &[u32]) -> String {
    if d.is_empty() {
        "–".into()
    } else {
        crate::study::runner::dims_summary(d)
    }
}
