//! What a report says first, and what leaves it for other places: the answer to the study's
//! questions in a few generated lines, the forest plot's rows, a pull-request comment and a CSV
//! of every comparison. All of it is read off the decided [`Family`]; nothing here tests.

use super::{bound, escape_cell, plots::ForestRow, Decided, KL_FMT, REFUSAL_FMT};
use crate::evaluate::compare::{Comparison, Family, MetricTest};
use std::fmt::Write as _;

/// Which comparisons answer which question: grouped by reference, in the family's order.
fn by_reference<'f>(f: &'f Family) -> Vec<(usize, Vec<&'f Comparison>)> {
    let mut out: Vec<(usize, Vec<&Comparison>)> = Vec::new();
    for c in &f.comparisons {
        match out.iter_mut().find(|(r, _)| *r == c.reference) {
            Some((_, v)) => v.push(c),
            None => out.push((c.reference, vec![c])),
        }
    }
    out
}

fn short(t: &MetricTest, (scale, unit, d): (f64, &str, usize)) -> String {
    format!(
        "{}{unit} [{}, {}] *{}*",
        bound(t.estimate, scale, d),
        bound(t.lo, scale, d),
        bound(t.hi, scale, d),
        t.verdict.label()
    )
}

fn over_draws(c: &Comparison) -> Option<String> {
    let (r, k) = (c.refusals.over_draws.as_ref()?, c.kl.over_draws.as_ref()?);
    let need = |w: &crate::evaluate::compare::DrawTest| {
        if w.verdict == crate::stats::family::Verdict::CannotTell {
            w.draws_needed
                .map_or(String::new(), |n| format!(", {n} draws needed"))
        } else {
            String::new()
        }
    };
    Some(format!(
        "over draws: refusals *{}*{}, KL *{}*{}",
        r.verdict.label(),
        need(r),
        k.verdict.label(),
        need(k)
    ))
}

/// The answer, one line per comparison under a heading per reference: the question (does the
/// variant beat this reference?), both verdicts with their adjusted intervals, the population
/// they generalise over, and the draw-level reading where there is one.
pub fn answer(f: &Family, details: bool) -> String {
    let mut md = String::new();
    let draws = f.draws();
    let _ = writeln!(
        md,
        "Each line: variant − reference, refusals in rate points and KL, with the interval adjusted for all {} \
         tests ({} at α = {}), margins ±{} pts / ±{} KL; lower is better. {}\n",
        f.tests,
        f.settings.correction.describe(),
        f.settings.alpha,
        f.settings.margins.refusals,
        f.settings.margins.kl,
        if draws > 1 {
            format!(
                "The verdicts read *over prompts*: they generalise to other prompts like these, for the {draws} \
                 direction draws made here; *over draws* says whether they hold whatever the draw."
            )
        } else {
            "One direction draw: the verdicts generalise over prompts, for this direction.".into()
        }
    );
    for (reference, cs) in by_reference(f) {
        let names = &f.arms[reference].names;
        let _ = writeln!(
            md,
            "**Does a variant beat `{}`?**{}",
            names[0],
            if names.len() > 1 {
                format!(
                    " (the same score as {})",
                    names[1..]
                        .iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            } else {
                String::new()
            }
        );
        let _ = writeln!(md);
        // The short answer first: which variants each verdict names, per metric.
        for (metric, pick) in [
            (
                "refusals",
                (|c: &Comparison| &c.refusals) as fn(&Comparison) -> &MetricTest,
            ),
            ("KL", |c: &Comparison| &c.kl),
        ] {
            let mut parts = Vec::new();
            for v in crate::stats::family::Verdict::ALL {
                let who: Vec<String> = cs
                    .iter()
                    .filter(|c| pick(c).verdict == v)
                    .map(|c| format!("`{}`", f.arms[c.variant].names[0]))
                    .collect();
                if !who.is_empty() {
                    parts.push(format!("*{}*: {}", v.label(), who.join(", ")));
                }
            }
            let _ = writeln!(md, "- {metric} — {}", parts.join("; "));
        }
        if !details {
            let _ = writeln!(md);
            continue;
        }
        let _ = writeln!(md, "\n<details><summary>each comparison</summary>\n");
        for c in cs {
            let _ = writeln!(
                md,
                "- `{}`: refusals {}; KL {} — {} + {} prompts{}{}",
                f.arms[c.variant].label(),
                short(&c.refusals, REFUSAL_FMT),
                short(&c.kl, KL_FMT),
                c.refusals.prompts,
                c.kl.prompts,
                if c.replicates.len() > 1 {
                    format!(" × {} draws", c.replicates.len())
                } else {
                    String::new()
                },
                over_draws(c).map_or(String::new(), |s| format!("; {s}"))
            );
        }
        let _ = writeln!(md, "\n</details>\n");
    }
    if !f.identical.is_empty() {
        let _ = writeln!(
            md,
            "Identical to a reference (the same score, nothing to test): {}.\n",
            f.identical
                .iter()
                .map(|i| format!("`{}` = `{}`", i.variant, i.reference))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    md
}

/// The forest plot's rows: (refusals in points, KL).
pub fn forest_rows(f: &Family) -> (Vec<ForestRow>, Vec<ForestRow>) {
    let row = |c: &Comparison, t: &MetricTest, scale: f64| ForestRow {
        label: format!(
            "{} vs {}",
            f.arms[c.variant].names[0], f.arms[c.reference].names[0]
        ),
        estimate: t.estimate * scale,
        lo: t.lo * scale,
        hi: t.hi * scale,
        draws: t.over_draws.as_ref().map(|w| (w.lo * scale, w.hi * scale)),
        verdict: t.verdict.label().to_string(),
    };
    (
        f.comparisons
            .iter()
            .map(|c| row(c, &c.refusals, 100.0))
            .collect(),
        f.comparisons.iter().map(|c| row(c, &c.kl, 1.0)).collect(),
    )
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else if x.is_nan() {
        String::new()
    } else if x > 0.0 {
        "inf".into()
    } else {
        "-inf".into()
    }
}

/// Every comparison, one row per metric: what people who plot for themselves need.
pub fn csv(f: &Family, headline: &str) -> String {
    let mut out = String::from(
        "variant,reference,metric,classifier,test,prompts,draws,pairs,estimate,lo,hi,p,p_adjusted,level,verdict,\
         mdd,prompts_needed,draws_sd,draws_lo,draws_hi,draws_p_adjusted,draws_level,draws_verdict,draws_needed\n",
    );
    for c in &f.comparisons {
        for (metric, t) in [("refusals", &c.refusals), ("kl", &c.kl)] {
            let w = t.over_draws.as_ref();
            let cells = [
                csv_field(&f.arms[c.variant].names.join(" = ")),
                csv_field(&f.arms[c.reference].names.join(" = ")),
                metric.into(),
                if metric == "kl" {
                    String::new()
                } else {
                    headline.into()
                },
                t.test.clone(),
                t.prompts.to_string(),
                c.replicates.len().to_string(),
                t.n.to_string(),
                num(t.estimate),
                num(t.lo),
                num(t.hi),
                num(t.p),
                num(t.p_adjusted),
                num(t.level),
                t.verdict.label().into(),
                t.mdd.map_or(String::new(), num),
                t.prompts_needed.map_or(String::new(), num),
                w.map_or(String::new(), |w| num(w.reading.spread)),
                w.map_or(String::new(), |w| num(w.lo)),
                w.map_or(String::new(), |w| num(w.hi)),
                w.map_or(String::new(), |w| num(w.p_adjusted)),
                w.map_or(String::new(), |w| num(w.level)),
                w.map_or(String::new(), |w| w.verdict.label().into()),
                w.and_then(|w| w.draws_needed)
                    .map_or(String::new(), |n| n.to_string()),
            ];
            out.push_str(&cells.join(","));
            out.push('\n');
        }
    }
    out
}

/// Lines a pull-request comment may hold.
pub const COMMENT_LINES: usize = 60;

/// A Markdown summary to paste into a pull-request comment: question, setup, the answer table,
/// caveats, how to reproduce; at most [`COMMENT_LINES`] lines (comparisons beyond what fits are
/// counted and left to the report).
pub fn comment(
    f: &Family,
    d: &Decided,
    setup: &str,
    name: &str,
    run: &str,
    study_path: &str,
) -> String {
    let mut head = Vec::new();
    let draws = f.draws();
    head.push(format!("### outlierlab: {name}"));
    head.push(String::new());
    head.push(
        "**Question.** Does a way of detecting and handling massive activations beat the references \
         on refusals and KL (lower is better)?"
            .to_string(),
    );
    head.push(String::new());
    head.push(format!("**Setup.** {setup}"));
    head.push(String::new());
    head.push(format!(
        "**Answer** ({} tests, {} at α = {}; adjusted intervals; margins ±{} pts / ±{} KL; refusals by `{}`; \
         over prompts{}):",
        f.tests,
        f.settings.correction.describe(),
        f.settings.alpha,
        f.settings.margins.refusals,
        f.settings.margins.kl,
        d.headline,
        if draws > 1 {
            format!(", for these {draws} direction draws; the last column treats the draws as random")
        } else {
            String::new()
        }
    ));
    head.push(String::new());
    head.push(format!(
        "| variant | vs | refusals Δ pts [CI] | KL Δ [CI] |{}",
        if draws > 1 {
            " over draws (refusals; KL) |"
        } else {
            ""
        }
    ));
    head.push(format!(
        "|---|---|---|---|{}",
        if draws > 1 { "---|" } else { "" }
    ));
    let mut tail = vec![String::new(), "**Caveats.**".to_string()];
    tail.push(
        "- One model and one edit; refusals are counted by a classifier, not read by a person."
            .into(),
    );
    tail.push(
        "- *negligible*: real (the interval excludes 0) but inside the margin; *equivalent*: not different \
         and inside the margin; *cannot tell*: neither."
            .into(),
    );
    if draws > 1 {
        tail.push(format!(
            "- Each prompt counts once: its difference is averaged over the {draws} draws that scored it."
        ));
    }
    tail.push(String::new());
    tail.push(format!(
        "**Reproduce.** `outlierlab run {study_path}`, then `outlierlab report {run} --comment`; every \
         comparison: `outlierlab report {run} --csv FILE`."
    ));
    let room = COMMENT_LINES.saturating_sub(head.len() + tail.len() + 1);
    let mut rows = Vec::new();
    // The questions in the order the study asks them: every variant against the first
    // reference, then against the next.
    let mut ordered: Vec<&Comparison> = f.comparisons.iter().collect();
    ordered.sort_by_key(|c| (c.reference, c.variant));
    for c in ordered {
        let draws_cell = match (&c.refusals.over_draws, &c.kl.over_draws) {
            (Some(r), Some(k)) => format!(" {}; {} |", r.verdict.label(), k.verdict.label()),
            _ if draws > 1 => " – |".into(),
            _ => String::new(),
        };
        rows.push(format!(
            "| {} | {} | {} | {} |{draws_cell}",
            escape_cell(&f.arms[c.variant].label()),
            escape_cell(&f.arms[c.reference].names[0]),
            short(&c.refusals, (100.0, "", 1)),
            short(&c.kl, (1.0, "", 4)),
        ));
    }
    let left = rows.len().saturating_sub(room);
    rows.truncate(room.min(rows.len()));
    let mut out = head;
    out.extend(rows);
    if left > 0 {
        out.push(format!(
            "| … {left} more comparisons in the report | | | |{}",
            if draws > 1 { " |" } else { "" }
        ));
    }
    out.extend(tail);
    out.join("\n") + "\n"
}
