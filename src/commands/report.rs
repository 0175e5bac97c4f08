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
    #[arg(required_unless_present = "across")]
    pub run_dir: Option<std::path::PathBuf>,
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
    /// A detection validation's report also says how its labels agree with those of RUN (the
    /// same study in another precision, e.g. f32 against bf16).
    #[arg(long, value_name = "RUN")]
    pub compare_labels: Option<std::path::PathBuf>,
    /// Compare with RUN, another run folder of the same study (another precision, another
    /// commit): a section *Against RUN* (dims, refusals and flipped labels, KL, tuned
    /// thresholds, verdicts), and a closing sentence under --summary. Replaces the study's
    /// `compare_with:`.
    #[arg(long, value_name = "RUN")]
    pub against: Option<std::path::PathBuf>,
    /// Put several detection validations side by side (one per model) with the recommended
    /// default, into --out (default reports/detection-validation).
    /// With --summary, print what README pastes from them instead.
    #[arg(long, num_args = 1.., value_name = "RUN", conflicts_with_all = ["run_dir", "comment", "csv", "compare_labels"])]
    pub across: Vec<std::path::PathBuf>,
}

pub fn run(args: &Args) -> Result<()> {
    if !args.across.is_empty() && args.summary {
        print!("{}", crate::report::across_summary(&args.across)?);
        return Ok(());
    }
    if !args.across.is_empty() {
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| std::path::PathBuf::from("reports/detection-validation"));
        println!(
            "{}",
            crate::report::render_across(&args.across, &out)?.display()
        );
        return Ok(());
    }
    let run_dir = args
        .run_dir
        .as_ref()
        .expect("clap requires RUN_DIR without --across");
    let overrides = crate::report::Overrides {
        alpha: args.alpha,
        correction: args
            .correction
            .as_deref()
            .and_then(crate::stats::family::Correction::parse),
        power: None,
        against: args.against.clone(),
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
        let p = crate::report::render_compared(
            run_dir,
            &dir,
            &overrides,
            args.compare_labels.as_deref(),
        )?;
        println!("{}", p.display());
    }
    Ok(())
}
