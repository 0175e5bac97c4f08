//! What README and a pull request quote: the summary, the comment, the CSV of comparisons.

use super::*;

/// What a reader checks first against heretic and the PR: the edit's row normalisation, the
/// marker list, and how the detection's scan was made.
pub(super) fn setup_line(r: &RunResults) -> String {
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
        && crate::study::rundir::RunDir::at(dir)
            .read_plan()?
            .variants
            .is_empty()
    {
        anyhow::bail!(
            "{} is a detection validation with no variants, so it has no variant table; render it with `outlierlab report {}`",
            dir.display(),
            dir.display()
        );
    }
    let r = read_results(dir)?;
    let decided = settings(dir, overrides)?;
    let against = super::against::of_run(&r, dir, &decided, overrides)?;
    let Decided {
        stats: st,
        headline,
        ..
    } = decided;
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
    if let Some(a) = &against {
        writeln!(md, "\n{}", a.sentence())?;
    }
    Ok(md)
}

/// `report --summary` of a run over several direction draws: the answer's short form, the
/// verdict counts, and each arm's score per draw (the between-draw spread).
pub(super) fn draws_summary(r: &RunResults, fam: &Family, rows: &[Row]) -> Result<String> {
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
pub(super) fn run_name(dir: &Path, study: &str) -> String {
    crate::study::spec::parse_stored(study, "study.yaml")
        .ok()
        .and_then(|f| f.name)
        .unwrap_or_else(|| crate::study::rundir::RunDir::at(dir).name())
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
    let file = crate::study::spec::parse_stored(
        &d.study,
        &crate::study::rundir::RunDir::at(dir)
            .study_file()
            .display()
            .to_string(),
    )
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
