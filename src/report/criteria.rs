//! The criteria ablation and each criterion's importance.

use super::*;

pub(super) fn without(c: &crate::detect::DetectConfig, i: usize) -> crate::detect::DetectConfig {
    let mut c = c.clone();
    c.switch_off(crate::detect::config::CRITERIA[i]);
    c
}

/// The criteria ablation: each subset's dims and score, and each criterion's effect when it is
/// switched off, averaged over every pair of variants that differ only in it.
/// The criteria ablation: each subset's detection and score, and what switching each criterion
/// off does (computed by [`criterion_importance`] before it is rendered).
pub(super) fn criteria_section(md: &mut String, r: &RunResults) -> Result<()> {
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

/// A mean and its 95% interval.
pub(super) type Interval = (f64, f64, f64);

/// What switching one criterion off does, over the pairs of variants that differ only in it.
pub(super) struct Importance {
    pairs: usize,
    /// Pairs left out: switching the criterion off left only the scan floor.
    excluded: usize,
    /// Mean change in dims found; refusal and KL change (mean, 95% bootstrap interval).
    effect: Option<(f64, Interval, Interval)>,
}

/// Per criterion, the paired effect of switching it off: per prompt, averaged over its pairs in
/// each replicate, then over prompts (seeded bootstrap intervals, descriptive).
pub(super) fn criterion_importance(
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
