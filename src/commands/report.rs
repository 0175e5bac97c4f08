//! `outlierlab report`: a run directory rendered, summarised, or written as CSV.

use anyhow::Result;

/// Render the report of a run directory (no model needed): report.md, report.html and the
/// figures (PNG and SVG) — the answer first (each variant's verdicts against each reference,
/// with a forest plot of the adjusted intervals), per-variant table with intervals, the
/// verdicts over prompts (each prompt counted once however many direction draws scored it)
/// and over draws,
/// criteria ablation and importance, tuning, searched kernels; refusal vs KL with the Pareto
/// front, per-variant bars, detection heatmap, per-layer peaks against the thresholds,
/// criteria overlap, threshold sweeps, tuning trace. Rendering the same run again gives the
/// same bytes.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    pub run_dir: std::path::PathBuf,
    /// Output folder (default reports/<run-name>).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Override the study's significance level α.
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Override the study's multiplicity correction: holm (family-wise error), bh
    /// (false-discovery rate) or none.
    #[arg(long, value_parser = ["holm", "bh", "none"])]
    pub correction: Option<String>,
    /// Print what README quotes instead of rendering: the compact variant table for one
    /// replicate; the answer, verdict counts and each arm's score per draw for several.
    #[arg(long)]
    pub summary: bool,
    /// Print a Markdown summary of at most 60 lines to paste into a pull-request comment
    /// (question, setup, answer table with adjusted intervals, caveats, how to reproduce)
    /// instead of rendering.
    #[arg(long, conflicts_with = "summary")]
    pub comment: bool,
    /// Write every comparison (arms, metric, prompts, draws, estimate, interval, p, adjusted
    /// level, verdict, the reading over draws) as CSV to FILE (`-` for standard output)
    /// instead of rendering.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["summary", "comment"])]
    pub csv: Option<std::path::PathBuf>,
}

pub fn run(args: &Args) -> Result<()> {
    let run_dir = &args.run_dir;
    let overrides = crate::report::Overrides {
        alpha: args.alpha,
        correction: args
            .correction
            .as_deref()
            .and_then(crate::stats::family::Correction::parse),
        power: None,
    };
    if args.summary {
        print!("{}", crate::report::summary_table(run_dir, &overrides)?);
    } else if args.comment {
        print!("{}", crate::report::comment(run_dir, &overrides)?);
    } else if let Some(path) = &args.csv {
        let text = crate::report::comparisons_csv(run_dir, &overrides)?;
        if path.as_os_str() == "-" {
            print!("{text}");
        } else {
            crate::fs::write_atomic(path, text.as_bytes())?;
            eprintln!("wrote {}", path.display());
        }
    } else {
        let dir = args
            .out
            .clone()
            .unwrap_or_else(|| super::run::default_report_dir(run_dir));
        let p = crate::report::render_with(run_dir, &dir, &overrides)?;
        println!("{}", p.display());
    }
    Ok(())
}
