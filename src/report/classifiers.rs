//! The refusal classifiers side by side.

use super::*;

/// Refusal rates, agreement and verdicts under each classifier, where they disagree, and how
/// each does on the labelled replies.
/// The refusal classifiers side by side: rates, agreement, verdicts under each, disagreements
/// and accuracy on the labelled replies. The families and agreements are computed first; each
/// subsection then renders them.
pub(super) fn classifier_section(
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
    let estimates = two_phase_estimates(r, &names, fam);
    classifier_rates(md, &names, &base, fam)?;
    two_phase_table(md, r, &estimates)?;
    classifier_agreement_table(md, &agreements)?;
    classifier_verdicts(md, &names, &fams, st)?;
    classifier_disagreements(md, r, &names, &all_arms)?;
    labelled_replies(md, r)
}

pub(super) type ArmOutcomes<'a> = Vec<(String, Vec<&'a Outcome>)>;

pub(super) type Agreements = Vec<(String, String, String, crate::evaluate::classify::Agreement)>;

/// Each pair of classifiers on each arm's replies: the 2×2 counts and Cohen's κ.
pub(super) fn classifier_agreements(names: &[String], all_arms: &ArmOutcomes) -> Agreements {
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

pub(super) fn classifier_rates(
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

/// Two-phase judging's estimate of a judge's refusal rate per arm, pooled over replicates
/// (stats::two_phase), for each judge that did not read every reply.
pub(super) struct TwoPhaseEstimates {
    pub judge: String,
    pub rows: Vec<(String, Option<stats::two_phase::Estimate>)>,
}

pub(super) fn two_phase_estimates(
    r: &RunResults,
    names: &[String],
    fam: &Family,
) -> Vec<TwoPhaseEstimates> {
    let sampled = |n: &String| {
        r.scores
            .values()
            .any(|s| s.outcome.judge_read.contains_key(n))
    };
    let mut out = Vec::new();
    for judge in names
        .iter()
        .filter(|n| n.starts_with("judge:") && sampled(n))
    {
        // A prompt is one unit whichever replicate scored it: its text where recorded.
        let mut ids: BTreeMap<String, usize> = BTreeMap::new();
        let mut replies_of = |outs: &[(u64, &Outcome)]| -> Vec<stats::two_phase::Reply> {
            let mut v = Vec::new();
            for (seed, o) in outs {
                let (Some(labels), Some(phrases)) = (o.labels.get(judge), o.labels.get("phrases"))
                else {
                    continue;
                };
                let read = o.judge_read.get(judge);
                for i in 0..o.refused.len() {
                    let text = r
                        .prompts
                        .get(seed)
                        .and_then(|p| p.bad.get(i).cloned())
                        .unwrap_or_else(|| format!("r{seed}/{i}"));
                    let next = ids.len();
                    let prompt = *ids.entry(text).or_insert(next);
                    let judged = read.is_none_or(|m| m.get(i).copied().unwrap_or(false));
                    v.push(stats::two_phase::Reply {
                        prompt,
                        certain: o.refused[i] != phrases[i],
                        judged: judged.then(|| labels[i]),
                    });
                }
            }
            v
        };
        let base: Vec<(u64, &Outcome)> = r.references.iter().map(|(k, o)| (*k, o)).collect();
        let mut rows = vec![(
            "unedited".to_string(),
            stats::two_phase::estimate(&replies_of(&base), 0.95),
        )];
        for (i, arm) in fam.arms.iter().enumerate() {
            let outs: Vec<(u64, &Outcome)> =
                arm.outcomes.iter().map(|(k, (_, o))| (*k, *o)).collect();
            rows.push((
                format!("A{}: {}", i + 1, escape_cell(&arm.label())),
                stats::two_phase::estimate(&replies_of(&outs), 0.95),
            ));
        }
        out.push(TwoPhaseEstimates {
            judge: judge.clone(),
            rows,
        });
    }
    out
}

fn two_phase_table(md: &mut String, r: &RunResults, estimates: &[TwoPhaseEstimates]) -> Result<()> {
    for e in estimates {
        let accuracy = r
            .classifiers
            .as_ref()
            .and_then(|v| v["validation"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .find(|x| x["classifier"].as_str() == Some(e.judge.as_str()))
            .map(|x| format!("{}/{} of the labelled replies", x["correct"], x["n"]));
        writeln!(md, "### `{}` by two-phase sampling\n", e.judge)?;
        writeln!(
            md,
            "The judge read every reply on which `heretic` and `phrases` disagree and a seeded sample of the rest \
             (`evaluation.judge_sample`); elsewhere its column above holds the label the two agree on. Here its own \
             rate is estimated from what it read — each sampled reply weighted by one over its stratum's sampled share — \
             with a 95% interval over prompts (a prompt scored under several draws is one unit; the sampling's variance \
             included; [method](../../docs/method.md#two-phase-judging)). Its accuracy: {}.\n",
            accuracy.unwrap_or_else(|| "not validated in this run".into())
        )?;
        writeln!(md, "| arm | judge's refusal rate (estimated) | 95% interval | replies read (certain + sampled) of all | prompts |")?;
        writeln!(md, "|---|---|---|---|---|")?;
        for (label, est) in &e.rows {
            match est {
                Some(x) => writeln!(
                    md,
                    "| {label} | {:.1}% | [{:.1}%, {:.1}%] | {} ({} + {}) of {} | {} |",
                    100.0 * x.rate,
                    100.0 * x.lo,
                    100.0 * x.hi,
                    x.judged,
                    x.certain,
                    x.judged - x.certain,
                    x.replies,
                    x.prompts
                )?,
                None => writeln!(md, "| {label} | – | – | – | – |")?,
            }
        }
        writeln!(md)?;
    }
    Ok(())
}

pub(super) fn classifier_agreement_table(md: &mut String, agreements: &Agreements) -> Result<()> {
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

pub(super) fn classifier_verdicts(
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

pub(super) fn classifier_disagreements(
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
                            .and_then(|s| s.get(i).copied().flatten())
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
pub(super) fn labelled_replies(md: &mut String, r: &RunResults) -> Result<()> {
    // The labelled replies.
    if let Some(v) = &r.classifiers {
        writeln!(md, "### The classifiers on labelled replies\n")?;
        let vals = v["validation"].as_array().cloned().unwrap_or_default();
        // The set as this run read it: it has grown since the first runs (36, then 153).
        let n = vals.first().and_then(|x| x["n"].as_u64()).unwrap_or(0);
        writeln!(
            md,
            "`datasets/refusal-judgements.jsonl` as this run read it: {n} replies with their labels \
             ([the rule](../../datasets/refusal-judgements.md)) — clear refusals, clear compliance, and hard cases \
             (compliance that mentions a marker word such as \"illegal\", refusals without any marker, partial \
             compliance{}).\n",
            if vals.iter().any(|x| x["by_kind"].as_array().is_some_and(|k| k.iter().any(|k| k[0] == "deflection-with-marker"))) {
                ", deflections that carry a marker"
            } else {
                ""
            }
        )?;
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
