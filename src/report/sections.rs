//! The report's other sections, in the order they appear: header, answer, replicate tables,
//! prompt sets, detected dims, tuning, searched kernels, how to read the verdicts.

use super::*;

/// The report's first lines: a partial run's warning, what was rendered from what, the verdicts.
pub(super) fn header(
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
        "Rendered by outlierlab {} from `{}` ({} variants, {} replicate(s), {} distinct scores; the model in {}). \
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
        r.plan.precision.name(),
        verdict_counts(fam),
        fam.tests,
        st.correction.describe(),
        st.alpha
    )?;
    Ok(())
}

/// The answer to each reference's question, and the forest plot of every comparison.
pub(super) fn answer_section(
    md: &mut String,
    out: &Path,
    fam: &Family,
    st: &StatsSettings,
) -> Result<()> {
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
pub(super) fn replicate_tables(
    md: &mut String,
    r: &RunResults,
    rows: &[Row],
    fam: &Family,
) -> Result<()> {
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

/// Refusal rates per prompt set, when the harmful split drew from several (descriptive: the
/// verdicts are over all prompts).
pub(super) fn by_source(
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

/// Where each detected dim fired: layers and tokens, from the detection summary.
pub(super) fn detected_dims_section(md: &mut String, r: &RunResults) -> Result<()> {
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

/// Fit / select / report: what tuning chose on the selection split, and that choice's score on
/// the held-out evaluation prompts (the only figure to quote).
pub(super) fn tuning_section(md: &mut String, r: &RunResults, rows: &[Row]) -> Result<()> {
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

pub(super) fn search_section(md: &mut String, r: &RunResults) -> Result<()> {
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

/// How to read the verdicts, with the study's correction and margins.
pub(super) fn reading_guide(md: &mut String, st: &StatsSettings) -> Result<()> {
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
