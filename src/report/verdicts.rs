//! The verdicts: the family stated, the tables over prompts and over draws, the null distributions.

use super::*;

pub(super) fn family_header(md: &mut String, f: &Family, reps: usize) -> Result<()> {
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

pub(super) fn verdict_section(md: &mut String, f: &Family, replicates: usize) -> Result<()> {
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
pub(super) fn null_section(md: &mut String, r: &RunResults, fam: &Family) -> Result<()> {
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
