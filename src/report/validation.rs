//! The detection-validation section: which candidates the interventions label massive, the
//! damages that decided it, and every scored configuration's precision, recall and F1. The same
//! Markdown is what `outlierlab label` prints and what a study's report embeds.

use crate::detect::validate::{Score, Scored, Validation, SUBSETS};
use std::fmt::Write;

fn num(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else {
        format!("{x:.2}")
    }
}

fn cells(s: &Score) -> String {
    format!(
        "{} | {} | {} | {} | {}",
        s.detected,
        s.true_positives,
        num(s.precision),
        num(s.recall),
        num(s.f1)
    )
}

fn dims(d: &[u32]) -> String {
    if d.len() > 8 {
        format!(
            "{} … ({} dims)",
            d[..6]
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            d.len()
        )
    } else if d.is_empty() {
        "–".into()
    } else {
        d.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
    }
}

const SCORE_HEAD: &str =
    "| dims | found | TP | precision | recall | F1 | entries | TP | precision | recall | F1 |";
const SCORE_RULE: &str = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

fn score_row(md: &mut String, first: &str, s: &Scored) {
    let _ = writeln!(
        md,
        "| {first} | {} | {} | {} |",
        dims(&s.dims),
        cells(&s.dim),
        cells(&s.ptd)
    );
}

/// The whole validation as Markdown, headed at level `h` (2 in a report of its own).
pub fn markdown(v: &Validation, h: usize) -> String {
    let hh = "#".repeat(h);
    let mut md = String::new();
    let massive: Vec<&crate::detect::validate::Candidate> =
        v.candidates.iter().filter(|c| c.massive).collect();
    let _ = writeln!(md, "{hh} Which dims are massive activations: {}\n", v.model);
    let _ = writeln!(
        md,
        "Corpus: {} prompts (PR #154's trigger + {}), {}. {} candidates: every dim at least {}x its position's median \
         somewhere, and every dim a scored configuration finds among at most 8. Each candidate is held at **zero** and \
         at its **mean** (per token, over the corpus) at every position where it stands within 10x of its peak, from \
         the first hidden state where it stands out onward. Damage: mean KL(unmodified ‖ held) of the next-token \
         distributions at the later positions, and the change in mean log-likelihood of the prompt's own next tokens. \
         **Massive** = zeroing costs ≥ {} nats and holding at the mean ≤ {}. {:.0} s.\n",
        v.corpus.len(),
        v.corpus.len() - 1,
        if v.raw { "raw text (BOS + text)" } else { "in the chat template" },
        v.candidates.len(),
        v.spec.candidate_ratio,
        v.spec.zero_kl,
        v.spec.mean_kl,
        v.seconds
    );
    let _ = writeln!(
        md,
        "| dim | from state | peak abs | ratio | zero KL | mean KL | zero Δll | mean Δll | instances | label | tokens |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
    for c in &v.candidates {
        let mut toks = c.tokens.clone();
        toks.sort();
        toks.dedup();
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {:.0}x | {:.3} | {:.4} | {:.3} | {:.4} | {} | {} | {} |",
            c.dim,
            c.first_state,
            c.peak_abs,
            c.peak_ratio,
            c.zero_kl,
            c.mean_kl,
            c.zero_dll,
            c.mean_dll,
            c.positions.len(),
            if c.massive { "**massive**" } else { "–" },
            toks.iter()
                .take(4)
                .map(|t| format!("`{}`", t.replace('|', "\\|").replace('\n', "\\n")))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let _ = writeln!(
        md,
        "\nHow the labels move with their thresholds (massive dims under each pair):\n"
    );
    let _ = writeln!(md, "| zero KL ≥ | mean KL ≤ | massive dims |");
    let _ = writeln!(md, "|---:|---:|---|");
    for s in &v.sensitivity {
        let _ = writeln!(
            md,
            "| {:.2} | {:.3} | {} |",
            s.zero_kl,
            s.mean_kl,
            dims(&s.massive)
        );
    }
    let _ = writeln!(md);
    if massive.is_empty() {
        let _ = writeln!(
            md,
            "**No candidate is labelled massive** with these thresholds: the interventions do not separate a fixed \
             bias from the other large values here (see the damages above), so recall is undefined and no criterion \
             can be judged redundant on this model.\n"
        );
    }
    let _ = writeln!(
        md,
        "Scores: *dims* counts detected dims against the massive ones; *entries* counts the (prompt, position, dim)s a \
         configuration confirms at any hidden state against the instances of the massive dims. Precision is – when \
         nothing is detected, recall when nothing is massive.\n"
    );
    scores_md(&mut md, v, &hh, massive.is_empty());
    md
}

/// The configurations scored against the labels: presets, criteria subsets per group (with each
/// criterion's redundancy), threshold curves and the study's own detections.
fn scores_md(md: &mut String, v: &Validation, hh: &str, none_massive: bool) {
    let _ = writeln!(md, "{hh}# Presets at their defaults\n");
    let _ = writeln!(md, "| configuration {SCORE_HEAD}");
    let _ = writeln!(md, "|---{SCORE_RULE}");
    for s in v.scored.iter().filter(|s| s.group == "presets") {
        score_row(md, &s.name, s);
    }
    let _ = writeln!(md);
    for g in &v.groups {
        let _ = writeln!(md, "{hh}# {}\n", g.group);
        if none_massive {
            let _ = writeln!(md, "Nothing is massive: not scored.\n");
            continue;
        }
        let _ = writeln!(
            md,
            "Best F1 (dims): {:.2}, reached with fewest criteria by {}. Best F1 (entries): {:.2}.\n",
            g.best_f1,
            if g.smallest.is_empty() {
                "none".into()
            } else {
                g.smallest
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            g.best_f1_ptd
        );
        for r in &g.redundancy {
            let _ = writeln!(
                md,
                "- `{}`: switching it off changes precision or recall in {} of {} subset pairs{}",
                r.criterion,
                r.changed,
                r.pairs,
                if r.redundant() {
                    " — **redundant** on these labels"
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(md, "\n| criteria {SCORE_HEAD}");
        let _ = writeln!(md, "|---{SCORE_RULE}");
        for s in v.scored.iter().filter(|s| s.group == g.group) {
            score_row(md, &s.name, s);
        }
        let _ = writeln!(md);
    }
    let curves: Vec<&str> = {
        let mut c: Vec<&str> = v
            .scored
            .iter()
            .filter(|s| s.group.starts_with("curve "))
            .map(|s| s.group.as_str())
            .collect();
        c.dedup();
        c
    };
    if !curves.is_empty() {
        let _ = writeln!(
            md,
            "{hh}# Threshold curves\n\n`median-only` and `sun2024` sweep median_ratio, `pr154` sweeps median_ratio and \
             mad_ratio together, each with its other criteria at their defaults.\n"
        );
        let _ = writeln!(md, "| curve | threshold {SCORE_HEAD}");
        let _ = writeln!(md, "|---|---:{SCORE_RULE}");
        for c in &curves {
            for s in v.scored.iter().filter(|s| s.group == *c) {
                let first = format!(
                    "{} | {:.0}",
                    c.trim_start_matches("curve "),
                    s.threshold.unwrap_or(f64::NAN)
                );
                score_row(md, &first, s);
            }
        }
        let _ = writeln!(md);
    }
    let other: Vec<&Scored> = v
        .scored
        .iter()
        .filter(|s| {
            s.group != "presets" && !s.group.starts_with(SUBSETS) && !s.group.starts_with("curve ")
        })
        .collect();
    if !other.is_empty() {
        let _ = writeln!(md, "{hh}# The study's own detections\n");
        let _ = writeln!(md, "| variant {SCORE_HEAD}");
        let _ = writeln!(md, "|---{SCORE_RULE}");
        for s in other {
            score_row(md, &s.name, s);
        }
        let _ = writeln!(md);
    }
}
