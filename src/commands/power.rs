//! `outlierlab power`: what a finished run could detect, or what a planned study would need.

use anyhow::{bail, Result};

/// How many prompts a difference needs, and what a finished run could detect.
///
/// With a run directory: for every distinct comparison of its report, the smallest refusal
/// and KL difference it could detect at the given power (at the level its correction held it
/// to), and the prompts that --refusal-points / --kl (default: the study's margins) and the
/// observed differences would need. Without one: a calculator for --prompts pairs at
/// --discordance (share of prompts on which the two arms' refusal outcomes differ) and
/// --kl-sd (standard deviation of per-prompt KL differences), at level --alpha / --tests
/// (Bonferroni: Holm's strictest step).
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// A finished run directory (optional).
    pub run_dir: Option<std::path::PathBuf>,
    /// The refusal-rate difference to detect, in points.
    #[arg(long)]
    pub refusal_points: Option<f64>,
    /// The KL difference to detect.
    #[arg(long)]
    pub kl: Option<f64>,
    /// Without a run: prompts per arm.
    #[arg(long)]
    pub prompts: Option<usize>,
    /// Without a run: share of prompts whose refusal outcome differs between the arms.
    #[arg(long, default_value_t = 0.2)]
    pub discordance: f64,
    /// Without a run: standard deviation of the per-prompt KL differences.
    #[arg(long, default_value_t = 0.02)]
    pub kl_sd: f64,
    #[arg(long, default_value_t = 0.05)]
    pub alpha: f64,
    /// Without a run: tests in the family (the level is alpha / tests).
    #[arg(long, default_value_t = 1)]
    pub tests: usize,
    #[arg(long, default_value_t = 0.8)]
    pub power: f64,
}

fn fmt_prompts(n: Option<f64>) -> String {
    n.map_or("–".into(), |n| format!("{:.0}", n.ceil()))
}

pub fn run(a: &Args) -> Result<()> {
    use crate::stats::power as pw;
    if !(a.power > 0.5 && a.power < 1.0) {
        bail!("--power must lie in (0.5, 1), got {}", a.power);
    }
    if !(a.alpha > 0.0 && a.alpha <= 0.5) {
        bail!("--alpha must lie in (0, 0.5], got {}", a.alpha);
    }
    let Some(dir) = &a.run_dir else {
        let n = a.prompts.ok_or_else(|| {
            anyhow::anyhow!("give a run directory, or --prompts N for a study not yet run")
        })?;
        if a.tests == 0 {
            bail!("--tests must be at least 1");
        }
        let level = a.alpha / a.tests as f64;
        let nf = n as f64;
        println!(
            "{n} prompts per arm, level {level:.3e} (alpha {} / {} tests), power {:.0}%:",
            a.alpha,
            a.tests,
            100.0 * a.power
        );
        let mdd = pw::mcnemar_mdd(a.discordance, nf, level, a.power);
        println!(
            "  refusals (discordance {:.0}%): smallest detectable difference {}",
            100.0 * a.discordance,
            mdd.map_or("– (more than the discordance)".into(), |m| format!(
                "{:.1} points",
                100.0 * m
            ))
        );
        if let Some(d) = a.refusal_points {
            println!(
                "  {d} refusal points need {} prompts per arm",
                fmt_prompts(pw::mcnemar_prompts_needed(
                    d / 100.0,
                    a.discordance,
                    level,
                    a.power
                ))
            );
        }
        println!(
            "  KL (sd of differences {}): smallest detectable difference {:.4}",
            a.kl_sd,
            pw::mean_mdd(a.kl_sd, nf, level, a.power)
        );
        if let Some(k) = a.kl {
            println!(
                "  a KL difference of {k} needs {} prompts per arm",
                fmt_prompts(pw::mean_prompts_needed(k, a.kl_sd, level, a.power))
            );
        }
        return Ok(());
    };
    let r = crate::study::rundir::read_results(dir)?;
    // The run's own settings; alpha and power are this command's.
    let st = crate::report::settings(
        dir,
        &crate::report::Overrides {
            alpha: Some(a.alpha),
            power: Some(a.power),
            correction: None,
            against: None,
        },
    )?
    .stats;
    let fam = crate::report::run_family(&r, &st);
    let want_r = a.refusal_points.unwrap_or(st.margins.refusals) / 100.0;
    let want_k = a.kl.unwrap_or(st.margins.kl);
    println!(
        "{}: {} comparisons, {} tests, {} at alpha {}; power {:.0}%; each at the level its correction held it to",
        dir.display(),
        fam.comparisons.len(),
        fam.tests,
        st.correction.describe(),
        st.alpha,
        100.0 * a.power
    );
    println!(
        "  (prompts needed are distinct prompts per arm; 'for {:.1} pts' / 'for KL {}' are the differences asked for)",
        100.0 * want_r,
        want_k
    );
    let units = |t: &crate::evaluate::compare::MetricTest, draws: usize| {
        if draws > 1 {
            format!("{} prompts x {draws} draws ({} pairs)", t.prompts, t.n)
        } else {
            format!("{} prompts", t.prompts)
        }
    };
    for c in &fam.comparisons {
        let (rt, kt) = (&c.refusals, &c.kl);
        let pi = c.mcnemar.discordance();
        println!(
            "{} vs {}:\n  refusals: {}, discordance {:.1}%, observed {:+.1} pts ({}), MDD {}, prompts for {:.1} pts: {}, for the observed: {}\n  KL: {}, sd {:.4}, observed {:+.4} ({}), MDD {}, prompts for {}: {}, for the observed: {}",
            fam.arms[c.variant].label(),
            fam.arms[c.reference].label(),
            units(rt, c.replicates.len()),
            100.0 * pi,
            100.0 * rt.estimate,
            rt.verdict.label(),
            rt.mdd.map_or("– (more than the discordance)".into(), |m| format!("{:.1} pts", 100.0 * m)),
            100.0 * want_r,
            fmt_prompts(match rt.unit_sd {
                Some(sd) => pw::mean_prompts_needed(want_r, sd, rt.level, a.power),
                None => pw::mcnemar_prompts_needed(want_r, pi.max(want_r), rt.level, a.power),
            }),
            fmt_prompts(rt.prompts_needed),
            units(kt, c.replicates.len()),
            c.kl_sd,
            kt.estimate,
            kt.verdict.label(),
            kt.mdd.map_or("–".into(), |m| format!("{m:.4}")),
            want_k,
            fmt_prompts(pw::mean_prompts_needed(want_k, c.kl_sd, kt.level, a.power)),
            fmt_prompts(kt.prompts_needed),
        );
        // With several direction draws: what the draw-level reading would need.
        for (what, t, want, scale, unit) in [
            ("refusals", rt, want_r, 100.0, " pts"),
            ("KL", kt, want_k, 1.0, ""),
        ] {
            let Some(w) = &t.over_draws else { continue };
            let draws = |d: f64| {
                w.reading
                    .draws_needed(d, w.level, a.power)
                    .map_or("– (more prompts first)".to_string(), |n| n.to_string())
            };
            println!(
                "  {what} over {} draws: spread (sd of the per-draw estimates) {:.4}{unit}, {} ({}); draws for {}{unit}: {}, for the observed: {}",
                w.reading.draws,
                w.reading.spread * scale,
                w.verdict.label(),
                if t.prompts < t.n { "prompts repeat over draws" } else { "each draw its own prompts" },
                want * scale,
                draws(want),
                if t.estimate == 0.0 { "–".into() } else { draws(t.estimate) },
            );
        }
    }
    Ok(())
}
