//! The detection-validation section: which candidates the interventions label massive, the
//! damages that decided it, and every scored configuration's precision, recall and F1. The same
//! Markdown is what `outlierlab label` prints and what a study's report embeds.

use crate::detect::heldout::{
    Basis, Estimate, HeldOut, HeldOutScore, Reading, Recommendation, RedundancyRow, MATCH,
};
use crate::detect::validate::{Candidate, LabelAgreement, Score, Scored, Validation, SUBSETS};
use crate::detect::Source;
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
        if s.true_positives.fract() == 0.0 {
            format!("{:.0}", s.true_positives)
        } else {
            format!("≈{:.1}", s.true_positives)
        },
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
    markdown_with(v, h, None)
}

/// As [`markdown`], with how its labels agree with another run's (bf16 against f32).
pub fn markdown_with(v: &Validation, h: usize, agreement: Option<&LabelAgreement>) -> String {
    let hh = "#".repeat(h);
    let mut md = String::new();
    let massive: Vec<&Candidate> = v.candidates.iter().filter(|c| c.massive).collect();
    let _ = writeln!(md, "{hh} Which dims are massive activations: {}\n", v.model);
    setup_md(&mut md, v);
    if let Some(ho) = &v.heldout {
        let _ = writeln!(md, "{hh}# The PR thread's questions, answered\n");
        answers_md(&mut md, v, ho);
    }
    let _ = writeln!(md, "{hh}# Labels\n");
    labels_md(&mut md, v);
    if massive.is_empty() {
        let _ = writeln!(
            md,
            "**No candidate is labelled massive** with these thresholds: the interventions do not separate a fixed \
             bias from the other large values here (see the damages above), so recall is undefined and no criterion \
             can be judged redundant on this model.\n"
        );
    }
    if let Some(a) = agreement {
        let _ = writeln!(
            md,
            "{hh}# {} against {}\n",
            v.precision.as_deref().unwrap_or("this run"),
            a.other_precision.as_deref().unwrap_or("the other run")
        );
        agreement_md(&mut md, a);
    }
    if let Some(ho) = &v.heldout {
        let _ = writeln!(md, "{hh}# Held-out scores\n");
        heldout_md(&mut md, ho, &hh);
        let _ = writeln!(md, "{hh}# Redundancy, held out\n");
        redundancy_md(&mut md, ho);
    }
    let _ = writeln!(
        md,
        "{hh}# In-sample scores (all prompts; for comparison only)\n\nEvery configuration on the whole corpus, \
         nothing held out: *dims* counts detected dims against the massive ones; *entries* estimates, from the \
         labelled sample, how many of a configuration's (prompt, position, dim)s are massive instances (TP is \
         that weighted estimate). Precision is – when nothing is detected, recall when nothing is massive.\n"
    );
    scores_md(&mut md, v, &format!("{hh}#"), massive.is_empty());
    let _ = writeln!(
        md,
        "{hh}# How the dim labels move with their thresholds\n\nMassive dims under each pair of thresholds:\n"
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
    md
}

fn est(e: &Estimate) -> String {
    if e.point.is_nan() {
        "–".into()
    } else if e.lo.is_nan() {
        format!("{:.2}", e.point)
    } else {
        format!("{:.2} [{:.2}, {:.2}]", e.point, e.lo, e.hi)
    }
}

fn signed(e: &Estimate) -> String {
    if e.point.is_nan() {
        "–".into()
    } else {
        format!("{:+.3} [{:+.3}, {:+.3}]", e.point, e.lo, e.hi)
    }
}

fn thr(x: f64) -> String {
    format!("{x:.0}x")
}

fn setup_md(md: &mut String, v: &Validation) {
    let count = |s: Source| v.sources.iter().filter(|x| **x == s).count();
    let sets: Vec<String> = v
        .spec
        .corpus
        .iter()
        .map(|c| {
            format!(
                "{} {}{}{}",
                c.name,
                c.count.map_or("(all)".to_string(), |n| n.to_string()),
                c.seed
                    .map_or(String::new(), |s| format!(" drawn with seed {s}")),
                if c.source() == Source::Bad {
                    " (bad)"
                } else {
                    " (good)"
                }
            )
        })
        .collect();
    let _ = writeln!(
        md,
        "Corpus: {} prompts — PR #154's trigger, {} harmful (*bad*) and {} harmless (*good*): {}; {}. Model in {}.\n",
        v.corpus.len(),
        count(Source::Bad),
        count(Source::Good),
        sets.join(", "),
        if v.raw { "raw text (BOS + text)" } else { "in the chat template" },
        v.precision.as_deref().unwrap_or("f32"),
    );
    let _ = writeln!(
        md,
        "**Candidates** ({}): every dim at least {}x its position's median somewhere, and every dim a scored \
         configuration finds among at most 8; a candidate's *instances* are the (prompt, position)s where it stands \
         within 10x of its peak. **Dim labels**: all its instances held at **zero**, and at their **mean** (per token, \
         over the corpus), from the first hidden state where it stands out, in a seeded sample of at most {} of the \
         prompts where it has instances. **Entry labels**: a seeded simple random sample of at most {} instances per \
         dim, each held alone in its prompt the same two ways; each weighs (its dim's instances) / (those labelled), \
         the inverse of its inclusion probability. {} instances at a prompt's last position are not labelled and not \
         scored (no later position shows their damage). Damage: mean KL(unmodified ‖ held) of the next-token \
         distributions at the positions after the held one, and the change in mean log-likelihood of the prompt's \
         own next tokens. **Massive** = zeroing costs ≥ {} nats and holding at the mean ≤ {}.\n",
        v.candidates.len(),
        v.spec.candidate_ratio,
        v.spec.label_prompts,
        v.spec.entries_per_dim,
        v.last_position_instances,
        v.spec.zero_kl,
        v.spec.mean_kl,
    );
    if let Some(ho) = &v.heldout {
        let _ = writeln!(
            md,
            "**Held out**: the corpus split by prompt with seed {} — {} prompts select (thresholds, best subsets), {} \
             are held out and scored, with 95% bootstrap percentile intervals over the held-out prompts ({} draws; \
             each interval on its own, not corrected for the many rows). Entry-level precision and recall are ratio \
             estimators over the labelled sample; dim-level ones count the dims detected on the prompts drawn.\n",
            ho.split.seed,
            ho.split.selection.len(),
            ho.split.heldout.len(),
            ho.bootstrap
        );
    }
    type Phase = (String, f64);
    let (stored, now): (Vec<&Phase>, Vec<&Phase>) =
        v.phases.iter().partition(|(n, _)| n.ends_with(" (stored)"));
    let list = |p: &[&Phase]| -> String {
        p.iter()
            .map(|(n, s)| format!("{} {s:.0} s", n.trim_end_matches(" (stored)")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        md,
        "Wall time {:.0} s{}{}.\n",
        v.seconds,
        if now.is_empty() {
            String::new()
        } else {
            format!(" ({})", list(&now))
        },
        if stored.is_empty() {
            String::new()
        } else {
            format!(
                "; the labels were stored by an earlier run of the same study, which spent {} on them",
                list(&stored)
            )
        }
    );
}

fn find<'a>(ho: &'a HeldOut, group: &str, name: &str) -> Option<&'a HeldOutScore> {
    ho.scores
        .iter()
        .find(|s| s.group == group && s.name == name)
}

fn answers_md(md: &mut String, v: &Validation, ho: &HeldOut) {
    labels_answer(md, v, ho.basis);
    criteria_answer(md, ho);
    median_answer(md, ho);
    direction_answer(md, v);
    let _ = writeln!(md);
}

/// Do the labels separate?
fn labels_answer(md: &mut String, v: &Validation, basis: Basis) {
    let massive: Vec<&Candidate> = v.candidates.iter().filter(|c| c.massive).collect();
    let labelled = v.entries.len();
    let w_all: f64 = v.entries.iter().map(|e| e.weight).sum();
    let w_massive: f64 = v
        .entries
        .iter()
        .filter(|e| e.massive)
        .map(|e| e.weight)
        .sum::<f64>()
        + 0.0; // an empty sum is −0.0
    if massive.is_empty() {
        let top = v
            .candidates
            .iter()
            .filter(|c| c.damage.zero_kl.is_finite())
            .max_by(|a, b| a.damage.zero_kl.total_cmp(&b.damage.zero_kl));
        let _ = writeln!(
            md,
            "- **Do the labels separate massive activations here?** No: no candidate dim is labelled massive{}. \
             Without a truth to find, recall is undefined and no criterion can be judged on this model; the tables \
             below are shown for completeness.",
            top.map_or(String::new(), |c| format!(
                " — the most damaging to zero is dim {} ({:.3} nats zeroed, {:.4} held at its mean, against {} and {})",
                c.dim, c.damage.zero_kl, c.damage.mean_kl, v.spec.zero_kl, v.spec.mean_kl
            ))
        );
    } else {
        let _ = writeln!(
            md,
            "- **Do the labels separate?** Yes: {} of {} candidate dims are labelled massive ({}); of the {} \
             instances labelled one by one, {} are massive, standing for an estimated {:.0}% of all candidate \
             instances{}.",
            massive.len(),
            v.candidates.len(),
            massive
                .iter()
                .map(|c| format!("dim {} ({:.1} nats zeroed, {:.4} at its mean)", c.dim, c.damage.zero_kl, c.damage.mean_kl))
                .collect::<Vec<_>>()
                .join(", "),
            labelled,
            v.entries.iter().filter(|e| e.massive).count(),
            100.0 * w_massive / w_all.max(f64::MIN_POSITIVE),
            {
                let split: Vec<String> = massive
                    .iter()
                    .filter(|c| c.entries_massive.is_finite() && c.entries_massive < 0.5)
                    .map(|c| format!("dim {} is massive held everywhere at once but only {:.0}% of its instances are when held alone", c.dim, 100.0 * c.entries_massive))
                    .collect();
                if split.is_empty() { String::new() } else { format!("; {}", split.join("; ")) }
            }
        );
        if basis == Basis::Dims {
            let _ = writeln!(
                md,
                "  Fewer than {} instances per half are massive held alone (the damage shows when a dim's \
                 instances are held together; one held alone leaves the others in place), so an entry-level F1 \
                 would rest on a handful of instances: the choices and readings below use the dim-level F1.",
                crate::detect::heldout::MIN_MASSIVE_ENTRIES
            );
        }
    }
}

/// Which criteria matter, which are redundant given which.
fn criteria_answer(md: &mut String, ho: &HeldOut) {
    let _ = writeln!(
        md,
        "- **Which criteria change held-out detection, and which are redundant given which?** A criterion is \
         redundant given the others when switching it off changes no detected entry on any held-out prompt. \
         With PR #154's median per position and consecutive persistence:"
    );
    // PR #154's code: the position median and consecutive persistence; the other scopes and
    // counts are in the redundancy table.
    let primary = |g: &str| g.ends_with("median per position, persistence consecutive");
    for g in ho.groups.iter().filter(|g| primary(&g.group)) {
        let at = g
            .group
            .trim_start_matches(SUBSETS)
            .split(',')
            .next()
            .unwrap_or("")
            .trim();
        let thresholds = if at.is_empty() {
            "at PR #154's thresholds".to_string()
        } else {
            format!(
                "with median_ratio and mad_ratio {} (the pr154 curve's choice)",
                at.trim_start_matches("at ")
            )
        };
        for from in ["full", "best"] {
            let rows: Vec<&RedundancyRow> = ho
                .redundancy
                .iter()
                .filter(|r| r.group == g.group && r.from == from)
                .collect();
            let Some(first) = rows.first() else {
                if from == "best" && g.best.is_none() {
                    let _ = writeln!(
                        md,
                        "  - {thresholds}: no smaller set finds anything on the selection half."
                    );
                }
                continue;
            };
            let which = if from == "full" {
                format!("from PR #154's five `{}`", first.with)
            } else {
                format!("from the best smaller set `{}`", first.with)
            };
            if first.entries_with == 0 && first.dims_with.is_empty() {
                let _ = writeln!(
                    md,
                    "  - {thresholds}, {which}: the set detects nothing on the held-out prompts, so switching a criterion off is redundant only trivially."
                );
                continue;
            }
            let red: Vec<String> = rows
                .iter()
                .filter(|r| r.redundant())
                .map(|r| format!("`{}`", r.criterion))
                .collect();
            let matter: Vec<String> = rows
                .iter()
                .filter(|r| !r.redundant())
                .map(|r| {
                    format!(
                        "`{}` ({} entries change: {} with it, {} without; {} ΔF1 {})",
                        r.criterion,
                        r.entries_changed,
                        r.entries_with,
                        r.entries_without,
                        ho.basis.name(),
                        signed(ho.basis.pick(&r.d_entry_f1, &r.d_dim_f1))
                    )
                })
                .collect();
            let _ = writeln!(
                md,
                "  - {thresholds}, {which} ({} held-out entries, {} F1 {}): {}{}.",
                first.entries_with,
                ho.basis.name(),
                find(ho, &g.group, &first.with).map_or("–".into(), |s| est(&ho.basis.heldout(s))),
                if matter.is_empty() {
                    "switching any one off changes nothing".to_string()
                } else {
                    format!("switching off changes detection for {}", matter.join(", "))
                },
                if red.is_empty() {
                    String::new()
                } else {
                    format!("; redundant given the others: {}", red.join(", "))
                }
            );
        }
        if g.floor_only_excluded > 0 {
            let _ = writeln!(
                md,
                "  - {thresholds}: {} comparison(s) left out because the set without the criterion bounds no value (floor only).",
                g.floor_only_excluded
            );
        }
    }
    let _ = writeln!(
        md,
        "  - The other median scopes and persistence counts: the redundancy table below."
    );
}

/// Median-ratio alone, and the thresholds chosen.
fn median_answer(md: &mut String, ho: &HeldOut) {
    let chosen = |c: &str| ho.curves.iter().find(|x| x.curve == c);
    if let Some(m) = chosen("median-only") {
        let ms = find(ho, "curve median-only", &m.chosen_name);
        let cmp: Vec<String> = ho
            .comparisons
            .iter()
            .map(|c| {
                let d = ho.basis.pick(&c.d_entry_f1, &c.d_dim_f1);
                format!(
                    "{} `{}` (held-out {} F1 {}; ΔF1 {})",
                    Reading::of(d).word(),
                    c.b,
                    ho.basis.name(),
                    ho.scores
                        .iter()
                        .find(|s| s.name == c.b)
                        .map_or("–".into(), |s| est(&ho.basis.heldout(s))),
                    signed(d)
                )
            })
            .collect();
        let _ = writeln!(
            md,
            "- **Is the median-ratio criterion alone enough?** At its threshold chosen on the selection half ({}), \
             median-ratio alone has held-out {} F1 {}: it {}. (*Matches* = the whole interval of the difference \
             within ±{}.)",
            thr(m.chosen),
            ho.basis.name(),
            ms.map_or("–".into(), |s| est(&ho.basis.heldout(s))),
            cmp.join("; it "),
            MATCH
        );
    }
    let th: Vec<String> = ho
        .curves
        .iter()
        .map(|c| {
            format!(
                "{} {} (the held-out half's own optimum, in-sample there: {})",
                c.curve,
                thr(c.chosen),
                thr(c.heldout_best)
            )
        })
        .collect();
    if !th.is_empty() {
        let _ = writeln!(
            md,
            "- **What threshold, on this model?** Chosen on the selection half by {} F1 (the higher threshold \
             among ties): {}.",
            ho.basis.name(),
            th.join("; ")
        );
    }
}

/// The maintainer's hypothesis: does a dim far above the median dominate the direction?
fn direction_answer(md: &mut String, v: &Validation) {
    let massive: Vec<&Candidate> = v.candidates.iter().filter(|c| c.massive).collect();
    if let Some(st) = v.direction_state {
        let top = v
            .candidates
            .iter()
            .filter(|c| c.direction_share.is_finite())
            .max_by(|a, b| a.direction_share.total_cmp(&b.direction_share));
        let dims: Vec<String> = massive
            .iter()
            .map(|c| {
                format!(
                    "dim {} (peak {:.0}x its median) is {:.1}% of the residual's squared norm where it fires but {:.2}% of \
                     the squared norm of the difference of means",
                    c.dim,
                    c.peak_ratio,
                    100.0 * c.residual_share,
                    100.0 * c.direction_share
                )
            })
            .collect();
        let _ = writeln!(
            md,
            "- **Does a dim far above the median dominate the computation?** At hidden state {st} (the direction's \
             layer), {}{}.",
            if dims.is_empty() { "no dim is labelled massive".to_string() } else { dims.join("; ") },
            top.map_or(String::new(), |c| format!(
                "; the candidate with the largest share of the difference of means is dim {} at {:.2}%",
                c.dim,
                100.0 * c.direction_share
            ))
        );
    }
}

fn labels_md(md: &mut String, v: &Validation) {
    let _ = writeln!(
        md,
        "| dim | from state | peak abs | ratio | zero KL | mean KL | zero Δll | mean Δll | instances | held in | label | entries labelled | massive entries | residual share | direction share | tokens |"
    );
    let _ = writeln!(
        md,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"
    );
    let pct = |x: f64| {
        if x.is_nan() {
            "–".to_string()
        } else {
            format!("{:.1}%", 100.0 * x)
        }
    };
    for c in &v.candidates {
        let mut toks = c.tokens.clone();
        toks.sort();
        toks.dedup();
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {:.0}x | {:.3} | {:.4} | {:.3} | {:.4} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.dim,
            c.first_state,
            c.peak_abs,
            c.peak_ratio,
            c.damage.zero_kl,
            c.damage.mean_kl,
            c.damage.zero_dll,
            c.damage.mean_dll,
            c.positions.len(),
            c.label_rows,
            if c.massive { "**massive**" } else { "–" },
            c.entries_labelled,
            pct(c.entries_massive),
            pct(c.residual_share),
            pct(c.direction_share),
            toks.iter()
                .take(4)
                .map(|t| format!("`{}`", t.replace('|', "\\|").replace('\n', "\\n")))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let _ = writeln!(
        md,
        "\n*held in*: prompts the dim label held it in. *massive entries*: share of its labelled instances that are \
         massive held alone. *residual share*: its a² / ‖h‖² at the direction's hidden state, mean over its \
         instances. *direction share*: its share of ‖mean(bad) − mean(good)‖² at the last prompt position, same \
         state.\n"
    );
}

fn agreement_md(md: &mut String, a: &LabelAgreement) {
    let _ = writeln!(
        md,
        "The same study run in {}: dim labels agree on {} of the {} candidates both runs have (massive here: {}; \
         there: {}); entry labels agree on {} of the {} instances both labelled.{}{}\n",
        a.other_precision.as_deref().unwrap_or("the other precision"),
        a.dims_agree,
        a.dims_common,
        dims(&a.massive_here),
        dims(&a.massive_there),
        a.entries_agree,
        a.entries_common,
        if a.only_here.is_empty() { String::new() } else { format!(" Candidates only here: {}.", dims(&a.only_here)) },
        if a.only_there.is_empty() { String::new() } else { format!(" Candidates only there: {}.", dims(&a.only_there)) },
    );
}

const HO_HEAD: &str = "| sel. F1 | dims | entries | entry precision | entry recall | entry F1 | dim precision | dim recall | dim F1 |";
const HO_RULE: &str = "|---:|---|---:|---:|---:|---:|---:|---:|---:|";

fn ho_row(md: &mut String, first: &str, s: &HeldOutScore, basis: Basis) {
    let _ = writeln!(
        md,
        "| {first} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        num(basis.selection(s)),
        dims(&s.dims),
        s.entries,
        est(&s.entry_precision),
        est(&s.entry_recall),
        est(&s.entry_f1),
        est(&s.dim_precision),
        est(&s.dim_recall),
        est(&s.dim_f1)
    );
}

fn heldout_md(md: &mut String, ho: &HeldOut, hh: &str) {
    let _ = writeln!(
        md,
        "Every configuration applied to each half alone; *sel. F1* is the selection half's {} F1 (what choices are \
         made on), the rest is the held-out half's with its interval. top-k and llm-int8 choose their dims over the \
         whole half; their intervals hold that choice fixed; top-k's dims, confirmed at no entry, count on \
         every prompt.\n",
        ho.basis.name()
    );
    let _ = writeln!(md, "{hh}## Presets at their defaults\n");
    let _ = writeln!(md, "| configuration {HO_HEAD}");
    let _ = writeln!(md, "|---{HO_RULE}");
    for s in ho.scores.iter().filter(|s| s.group == "presets") {
        ho_row(md, &s.name, s, ho.basis);
    }
    let _ = writeln!(md);
    if !ho.curves.is_empty() {
        let _ = writeln!(
            md,
            "{hh}## Threshold curves\n\n`median-only` and `sun2024` sweep median_ratio, `pr154` sweeps median_ratio and \
             mad_ratio together, each with its other criteria at their defaults. **Bold**: the threshold chosen on \
             the selection half.\n"
        );
        let _ = writeln!(md, "| curve | threshold {HO_HEAD}");
        let _ = writeln!(md, "|---|---:{HO_RULE}");
        for c in &ho.curves {
            for s in ho
                .scores
                .iter()
                .filter(|s| s.group == format!("curve {}", c.curve))
            {
                let t = s.threshold.unwrap_or(f64::NAN);
                let first = if s.name == c.chosen_name {
                    format!("{} | **{}**", c.curve, thr(t))
                } else {
                    format!("{} | {}", c.curve, thr(t))
                };
                ho_row(md, &first, s, ho.basis);
            }
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(
        md,
        "{hh}## pr154's criteria subsets\n\nPer median scope and persistence count: PR #154's five, and the best \
         smaller set (the best selection-half entry F1 among the subsets of fewer criteria that bound a value; ties \
         to fewer criteria). Every subset's held-out scores are in `validation/validation.json`.\n"
    );
    let _ = writeln!(md, "| group | set {HO_HEAD}");
    let _ = writeln!(md, "|---|---{HO_RULE}");
    let all5 = crate::detect::config::CRITERIA.join("+");
    for g in &ho.groups {
        let mut names = vec![all5.clone()];
        names.extend(g.best.clone());
        for n in names {
            if let Some(s) = find(ho, &g.group, &n) {
                let short = g.group.trim_start_matches(SUBSETS).trim_start_matches(", ");
                ho_row(md, &format!("{short} | `{n}`"), s, ho.basis);
            }
        }
    }
    let _ = writeln!(md);
    let study: Vec<&HeldOutScore> = ho.scores.iter().filter(|s| s.group == "study").collect();
    if !study.is_empty() {
        let _ = writeln!(md, "{hh}## The study's own detections\n");
        let _ = writeln!(md, "| variant {HO_HEAD}");
        let _ = writeln!(md, "|---{HO_RULE}");
        for s in study {
            ho_row(md, &s.name, s, ho.basis);
        }
        let _ = writeln!(md);
    }
}

fn redundancy_md(md: &mut String, ho: &HeldOut) {
    let _ = writeln!(
        md,
        "Each criterion switched off from PR #154's five (*full*) and from the best smaller set (*best*), on the \
         held-out prompts: the entries detected with and without it, how many differ, and the change of F1 \
         (without − with; paired over the same bootstrap draws). **Redundant** = no detected entry changes.\n"
    );
    let _ = writeln!(md, "| group | from | criterion | with | without | entries with | without | changed | entry ΔF1 | dim ΔF1 | |");
    let _ = writeln!(md, "|---|---|---|---|---|---:|---:|---:|---:|---:|---|");
    for r in &ho.redundancy {
        let _ = writeln!(
            md,
            "| {} | {} | `{}` | `{}` | `{}` | {} | {} | {} | {} | {} | {} |",
            r.group.trim_start_matches(SUBSETS).trim_start_matches(", "),
            r.from,
            r.criterion,
            r.with,
            r.without,
            r.entries_with,
            r.entries_without,
            r.entries_changed,
            signed(&r.d_entry_f1),
            signed(&r.d_dim_f1),
            if r.redundant() { "**redundant**" } else { "" }
        );
    }
    let excluded: usize = ho.groups.iter().map(|g| g.floor_only_excluded).sum();
    let _ = writeln!(
        md,
        "\n{excluded} comparison(s) left out: the set without the criterion would bound no value (the scan floor alone).\n"
    );
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
            "In-sample best F1 (dims): {:.2}, reached with fewest criteria by {}. Best F1 (entries): {:.2}.\n",
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
        let _ = writeln!(md, "| criteria {SCORE_HEAD}");
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

/// Several models' validations side by side: the thread's questions per model, and the
/// recommended default with its held-out scores beside PR #154's and Sun et al.'s.
pub fn across_markdown(
    runs: &[(String, Validation)],
    dirs: &[std::path::PathBuf],
    rec: Option<&Recommendation>,
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Which criteria find massive activations: {} models\n",
        runs.len()
    );
    let _ = writeln!(
        md,
        "Rendered by outlierlab {} from {}. Each model's report (its folder here) has the labels, every \
         configuration's held-out scores and the redundancy table; this page puts the answers side by side. All \
         numbers are held-out: thresholds and sets chosen on each model's selection half, scored on its held-out \
         half, 95% bootstrap intervals over held-out prompts.\n",
        env!("CARGO_PKG_VERSION"),
        dirs.iter().map(|d| format!("`{}`", d.display())).collect::<Vec<_>>().join(", ")
    );
    md.push_str(&per_model_md(runs));
    let _ = writeln!(md, "## The answers, per model\n");
    for (name, v) in runs {
        let Some(ho) = &v.heldout else { continue };
        let _ = writeln!(md, "### {name}\n");
        answers_md(&mut md, v, ho);
    }
    md.push_str(&recommendation_md(rec));
    md
}

/// What README pastes from several validations: the per-model table and the recommendation.
pub fn across_summary(runs: &[(String, Validation)], rec: Option<&Recommendation>) -> String {
    let mut md = per_model_md(runs);
    md.push_str(&recommendation_md(rec));
    md
}

fn per_model_md(runs: &[(String, Validation)]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## Per model\n");
    let _ = writeln!(md, "| model | prompts | precision | massive dims | F1 on | PR #154 (defaults) F1 | median-only: chosen threshold | its F1 | pr154 curve: chosen threshold | its F1 | sun2024 (defaults) F1 | time, all phases |");
    let _ = writeln!(
        md,
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (name, v) in runs {
        let Some(ho) = &v.heldout else { continue };
        let curve = |c: &str| ho.curves.iter().find(|x| x.curve == c);
        let f1 =
            |g: &str, n: &str| find(ho, g, n).map_or("–".into(), |s| est(&ho.basis.heldout(s)));
        let massive: Vec<u32> = v
            .candidates
            .iter()
            .filter(|c| c.massive)
            .map(|c| c.dim)
            .collect();
        // Labels stored by an earlier run count at what they cost then.
        let cost = v.phases.iter().map(|p| p.1).sum::<f64>();
        if massive.is_empty() {
            // No truth to score against: every F1 would read 0 whatever the criteria did.
            let none = "– (no massive dim)";
            let _ = writeln!(
                md,
                "| {name} | {} | {} | none | – | {none} | – | {none} | – | {none} | {none} | {cost:.0} s |",
                v.corpus.len(),
                v.precision.as_deref().unwrap_or("f32"),
            );
            continue;
        }
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {cost:.0} s |",
            v.corpus.len(),
            v.precision.as_deref().unwrap_or("f32"),
            dims(&massive),
            ho.basis.plural(),
            f1("presets", "pr154 (defaults)"),
            curve("median-only").map_or("–".into(), |c| thr(c.chosen)),
            curve("median-only").map_or("–".into(), |c| f1("curve median-only", &c.chosen_name)),
            curve("pr154").map_or("–".into(), |c| thr(c.chosen)),
            curve("pr154").map_or("–".into(), |c| f1("curve pr154", &c.chosen_name)),
            f1("presets", "sun2024 (defaults)"),
        );
    }
    let _ = writeln!(md);
    md
}

fn recommendation_md(rec: Option<&Recommendation>) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## A recommended default\n");
    match rec {
        None => {
            let _ = writeln!(
                md,
                "No model's labels find a massive dim: nothing to recommend.\n"
            );
        }
        Some(r) => {
            let _ = writeln!(
                md,
                "The configuration with the best mean selection-half F1 ({:.2}; each model on its basis) over the models whose labels find \
                 a massive dim: **`{}`** ({}). Chosen on selection halves only; its held-out scores below are the \
                 evidence. Thresholds each model's selection half chose, for comparison: {}.\n",
                r.mean_selection_f1,
                r.name,
                r.group,
                r.models
                    .iter()
                    .zip(&r.thresholds)
                    .enumerate()
                    .filter(|(i, _)| r.usable.get(*i) != Some(&false))
                    .map(|(_, (m, t))| format!(
                        "{m}: {}",
                        t.iter().map(|c| format!("{} {}", c.curve, thr(c.chosen))).collect::<Vec<_>>().join(", ")
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            let left: Vec<&str> = r
                .models
                .iter()
                .zip(&r.usable)
                .filter(|(_, u)| !**u)
                .map(|(m, _)| m.as_str())
                .collect();
            if !left.is_empty() {
                let _ = writeln!(
                    md,
                    "Left out of the choice, their labels finding no massive dim (so no F1 of theirs means anything): {}.\n",
                    left.join(", ")
                );
            }
            let _ = writeln!(md, "| model | recommended entry F1 | dim F1 | PR #154 defaults entry F1 | dim F1 | Sun et al. entry F1 | dim F1 |");
            let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
            for (i, m) in r.models.iter().enumerate() {
                if r.usable.get(i) == Some(&false) {
                    let none = "– (no massive dim)";
                    let _ = writeln!(md, "| {m} | {none} | – | {none} | – | {none} | – |");
                    continue;
                }
                // A model whose basis is dims has too few massive entries for an entry F1.
                let dims_only = r.bases.get(i) == Some(&Basis::Dims);
                let c = |x: &Option<HeldOutScore>| -> (String, String) {
                    x.as_ref().map_or(("–".into(), "–".into()), |s| {
                        let e = if dims_only {
                            "– (too few massive entries)".into()
                        } else {
                            est(&s.entry_f1)
                        };
                        (e, est(&s.dim_f1))
                    })
                };
                let (a, b) = c(&r.recommended[i]);
                let (p, q) = c(&r.pr154[i]);
                let (x, y) = c(&r.sun2024[i]);
                let _ = writeln!(md, "| {m} | {a} | {b} | {p} | {q} | {x} | {y} |");
            }
            let _ = writeln!(md);
        }
    }
    md
}
