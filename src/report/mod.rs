//! Stage 7: the report, rendered from a run directory alone (no model): Markdown tables that read
//! well pasted into a pull-request comment, every rate with its interval and every comparison
//! with its test and Holm-corrected verdict; figures as PNG and SVG; the same content as a
//! self-contained HTML page with the images beside it.

pub mod plots;

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
    let points = pooled_points(&r);
    detected_dims_section(&mut md, &r)?;
    criteria_section(&mut md, &r)?;
    tuning_section(&mut md, &r, &rows)?;
    search_section(&mut md, &r)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let tunes: Vec<&crate::study::optimize::TuneResult> = r.tunes.iter().collect();
    let figures = plots::draw_all(out, &points, r.detections.values().next(), &tunes)?;
    if !figures.is_empty() {
        writeln!(md, "## Figures\n")?;
        if r.detections.len() > 1 {
            writeln!(
                md,
                "Detection figures show replicate {}.\n",
                r.detections.keys().next().unwrap_or(&0)
            )?;
        }
        for (stem, title) in &figures {
            writeln!(
                md,
                "### {title}\n\n![{title}]({stem}.png)\n\n[SVG]({stem}.svg)\n"
            )?;
        }
    }
    writeln!(md, "## How to read the verdicts\n")?;
    writeln!(
        md,
        "Each verdict asks one question: on these prompts, is the variant's refusal rate (or KL) lower than the reference's by more than chance allows? \
         *better*/*worse* need a Holm-adjusted p below 0.05; with 100 prompts, 3 vs 6 refusals (p ≈ 0.5) is *cannot tell*. \
         A variant that is *better* on refusals and *worse* on KL moved along the trade-off rather than past it.\n"
    )?;
    writeln!(md, "## Study file\n\n```yaml\n{}\n```", study.trim_end())?;
    let path = out.join("report.md");
    crate::study::runner::write_atomic(&path, md.as_bytes())?;
    crate::study::runner::write_atomic(&out.join("report.html"), html(&name, &md).as_bytes())?;
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
            crate::study::optimize::tied_at_best(&t.trials),
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
         the tables above score the best one on the evaluation prompts. Ties (common once KL is below heretic's target and \
         refusals are few) go to the lowest KL; *tied at best* counts them — when it is most of the trials, the selection \
         split did not separate the kernels.\n"
    )?;
    writeln!(md, "| variants | replicate | trials | tied at best | selection objective (refusals, KL) | direction index | attn max/pos/min/dist | mlp max/pos/min/dist |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    for s in &r.searches {
        let best = crate::study::optimize::best(&s.trials);
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
            crate::study::optimize::tied_at_best(&s.trials),
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
    Ok(())
}

fn dims_cell(d: &[u32]) -> String {
    if d.is_empty() {
        "–".into()
    } else {
        crate::study::runner::dims_summary(d)
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
    let mut groups: Vec<(Vec<(u64, String)>, Vec<String>, bool)> = Vec::new();
    for pv in &r.plan.variants {
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
        "| dim | peak \\|a\\| (hidden state) | peak ratio to median | hidden states | tokens |"
    )?;
    writeln!(md, "|---|---|---|---|---|")?;
    for d in used.iter().take(40) {
        let Some(rep) = s.dims.get(d) else {
            writeln!(md, "| {d} | – | – | – | – |")?;
            continue;
        };
        let mut tokens: Vec<String> = rep.positions.iter().map(|p| format!("{:?}", p.2)).collect();
        tokens.sort();
        tokens.dedup();
        let layers = match (rep.layers.first(), rep.layers.last()) {
            (Some(a), Some(b)) => format!("{a}–{b} ({} states)", rep.layers.len()),
            _ => "–".into(),
        };
        writeln!(
            md,
            "| {d} | {:.0} ({}) | {:.0}× | {layers} | {} |",
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
fn criteria_section(md: &mut String, r: &RunResults) -> Result<()> {
    use crate::detect::summary::CRITERIA;
    let vs: Vec<&crate::study::plan::PlannedVariant> = r
        .plan
        .variants
        .iter()
        .filter(|v| {
            v.variant.needs_dims() && v.variant.tune.is_none() && v.variant.detect.is_some()
        })
        .collect();
    let outcome = |id: &str, rep: u64| -> Option<&Outcome> {
        r.assignments
            .iter()
            .find(|a| a.variant_id == id && a.replicate == rep)
            .and_then(|a| r.scores.get(&(rep, a.key.clone())))
            .map(|s| &s.outcome)
    };
    let dims_of = |id: &str| -> Option<usize> {
        r.assignments
            .iter()
            .find(|a| a.variant_id == id)
            .map(|a| a.dims.len())
    };
    // Pairs (on, off) per criterion.
    let mut pairs: Vec<Vec<(usize, usize)>> = vec![Vec::new(); 5];
    for (i, a) in vs.iter().enumerate() {
        let ca = a.variant.detect.as_ref().expect("filtered");
        for (j, b) in vs.iter().enumerate() {
            let cb = b.variant.detect.as_ref().expect("filtered");
            for (k, pk) in pairs.iter_mut().enumerate() {
                if ca.criteria_on()[k]
                    && !cb.criteria_on()[k]
                    && without(ca, k) == *cb
                    && a.variant.handlings == b.variant.handlings
                {
                    pk.push((i, j));
                }
            }
        }
    }
    if pairs.iter().all(|p| p.is_empty()) {
        return Ok(());
    }
    writeln!(md, "## Criteria ablation\n")?;
    writeln!(
        md,
        "✓ = criterion on. Pooled over replicates; dims as detected in the first replicate.\n"
    )?;
    writeln!(
        md,
        "| {} | median scope | dims | refusals | KL |",
        CRITERIA.join(" | ")
    )?;
    writeln!(md, "|{}---|---|---|---|", "---|".repeat(5))?;
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
            "| {} | {:?} | {} | {} | {:.3} |",
            c.criteria_on()
                .iter()
                .map(|f| if *f { "✓" } else { "·" })
                .collect::<Vec<_>>()
                .join(" | "),
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
         (paired over prompts; 95% bootstrap interval). A positive refusal effect means the criterion helps.\n"
    )?;
    writeln!(
        md,
        "| criterion | pairs | Δ dims found (mean) | Δ refusals (pts) [95% CI] | Δ KL [95% CI] |"
    )?;
    writeln!(md, "|---|---|---|---|---|")?;
    for (k, pk) in pairs.iter().enumerate() {
        if pk.is_empty() {
            writeln!(md, "| {} | 0 | – | – | – |", CRITERIA[k])?;
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
        let (mr, lr, hr) = mean_ci(&dr, 900 + k as u64);
        let (mk, lk, hk) = mean_ci(&dk, 950 + k as u64);
        writeln!(
            md,
            "| {} | {} | {:+.1} | {:+.1} [{:+.1}, {:+.1}] | {:+.4} [{:+.4}, {:+.4}] |",
            CRITERIA[k],
            pk.len(),
            dd / pk.len() as f64,
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
