//! `outlierlab validate`: a study file checked and planned without running it.

use anyhow::{bail, Result};

/// Check a study file without running it: syntax, types, unknown keys (with did-you-mean),
/// datasets, handlings, detection settings, and how many variants it expands to.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The study file (YAML).
    pub file: std::path::PathBuf,
    /// Also print, for the study's prompt counts, replicates and family, the smallest
    /// refusal and KL differences it can detect at its power after its correction, and warn
    /// when those exceed its equivalence margins; then its wall time on this machine, phase by
    /// phase, from its token counts and per-token costs measured now (loads the model, and the
    /// judge if it names one, for a short benchmark each).
    #[arg(long)]
    pub power: bool,
    /// With --power: the assumed share of prompts whose refusal outcome differs between
    /// two arms.
    #[arg(long, default_value_t = 0.2)]
    pub discordance: f64,
    /// With --power: the assumed standard deviation of per-prompt KL differences.
    #[arg(long, default_value_t = 0.02)]
    pub kl_sd: f64,
}

/// The study checked and planned against the model's own layer count, read from its header (no
/// weights loaded); with --power also what it can detect.
pub fn run(args: &Args) -> Result<()> {
    let file = args.file.as_path();
    let power = args.power.then_some((args.discordance, args.kl_sd));
    let study = crate::study::spec::load(file)?;
    let layers = crate::model::source::layer_count(&study.file.model)?;
    let plan = crate::study::plan::plan(&study, layers)?;
    for w in crate::study::spec::warnings(&study) {
        eprintln!("warning: {w}");
    }
    println!(
        "{}: ok — study '{}', {} variant(s) x {} replicate(s) on {} ({layers} layers)",
        file.display(),
        study.name,
        plan.variants.len(),
        plan.replicates.len(),
        study.file.model
    );
    if let Some((discordance, kl_sd)) = power {
        print!("{}", power_in_advance(&study, &plan, discordance, kl_sd)?);
        print!("{}", super::cost::cost_in_advance(&study, &plan)?);
    }
    Ok(())
}

/// The smallest refusal and KL differences a study can detect, before it runs: its pooled
/// prompt counts, its family at most as large as every planned variant against every reference
/// (variants that end up sharing a score are tested once, so the run's family can only be
/// smaller), the strictest level its correction applies (α / tests, the first step of Holm and
/// of Benjamini-Hochberg), and its power.
pub fn power_in_advance(
    study: &crate::study::spec::Study,
    plan: &crate::study::plan::Plan,
    discordance: f64,
    kl_sd: f64,
) -> Result<String> {
    use crate::stats::family::Correction;
    use crate::stats::power;
    use std::fmt::Write;
    if !(0.0..=1.0).contains(&discordance) || discordance == 0.0 {
        bail!("--discordance {discordance}: expected a share in (0, 1]");
    }
    if kl_sd.is_nan() || kl_sd <= 0.0 {
        bail!("--kl-sd {kl_sd}: expected a positive standard deviation");
    }
    let st = &study.file.statistics;
    let Some(d) = &study.file.datasets else {
        bail!("the study has no `datasets:` block, so it scores nothing to power");
    };
    let ranks: Vec<Option<usize>> = plan
        .variants
        .iter()
        .map(|v| st.reference_rank(&v.variant.name, &v.variant.handlings))
        .collect();
    // The family's pairs as the report forms them, before shared scores merge arms.
    let pairs = crate::evaluate::compare::comparison_pairs(&ranks).len();
    let tests = 2 * pairs;
    let reps = plan.replicates.len().max(1);
    let (n_bad, n_good) = (
        (d.evaluation.bad.count() * reps) as f64,
        (d.evaluation.good.count() * reps) as f64,
    );
    let level = match st.correction {
        Correction::None => st.alpha,
        _ => st.alpha / tests.max(1) as f64,
    };
    let mut out = String::new();
    writeln!(
        out,
        "power in advance: {pairs} comparisons at most ({tests} tests), {} at α = {}: the strictest level is {level:.2e}; \
         {} harmful and {} harmless prompts per arm pooled over {reps} replicate(s); power {}",
        st.correction.describe(),
        st.alpha,
        n_bad,
        n_good,
        st.power
    )?;
    if tests == 0 {
        writeln!(
            out,
            "  no comparisons: the study names no reference among its variants"
        )?;
        return Ok(out);
    }
    let mdd_refusal = power::mcnemar_mdd(discordance, n_bad, level, st.power);
    let mdd_kl = power::mean_mdd(kl_sd, n_good, level, st.power);
    let need_refusal =
        power::mcnemar_prompts_needed(st.margins.refusals / 100.0, discordance, level, st.power);
    let need_kl = power::mean_prompts_needed(st.margins.kl, kl_sd, level, st.power);
    let pts = |x: Option<f64>| {
        x.map_or(
            "none (even every discordant prompt one way falls short)".into(),
            |v| format!("{:.1} points", 100.0 * v),
        )
    };
    writeln!(
        out,
        "  refusals: smallest detectable difference {} (assumed discordance {discordance}); the margin of {} points needs {} prompts per arm",
        pts(mdd_refusal),
        st.margins.refusals,
        need_refusal.map_or("–".into(), |n| format!("{:.0}", n.ceil()))
    )?;
    writeln!(
        out,
        "  KL: smallest detectable difference {mdd_kl:.4} (assumed sd of per-prompt differences {kl_sd}); the margin of {} needs {} prompts per arm",
        st.margins.kl,
        need_kl.map_or("–".into(), |n| format!("{:.0}", n.ceil()))
    )?;
    if mdd_refusal.is_none_or(|m| 100.0 * m > st.margins.refusals) {
        writeln!(
            out,
            "warning: this study cannot detect a refusal difference as large as its equivalence margin ({} points) at power {}: \
             a real difference of that size would most often read \"cannot tell\"",
            st.margins.refusals, st.power
        )?;
    }
    if mdd_kl > st.margins.kl {
        writeln!(
            out,
            "warning: this study cannot detect a KL difference as large as its equivalence margin ({}) at power {}",
            st.margins.kl, st.power
        )?;
    }
    Ok(out)
}
