//! `outlierlab run`: a study, every variant scored, then its report.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// Run a study: every variant scored, results written as they finish, then the report.
///
/// Running the same file again resumes: finished scores, tunings and searches are not
/// redone. Variants whose settings lead to the same detected dims and edit are scored once.
/// `tune` entries and `ablation.search` optimise on the study's selection split first; what
/// they choose is then scored on the evaluation prompts. --shard I/N runs every N-th score
/// (merge the shard folders with `outlierlab merge`).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    pub file: std::path::PathBuf,
    /// Run directory (default: the study's `output`, else runs/<name>).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Run every N-th score, starting at I (0-based), e.g. --shard 0/4.
    #[arg(long)]
    pub shard: Option<String>,
    /// Report folder (default reports/<run-name>).
    #[arg(long)]
    pub report_dir: Option<std::path::PathBuf>,
}

pub fn run(args: Args, precision: Option<crate::model::PrecisionSetting>) -> Result<()> {
    run_study(
        &args.file,
        args.out,
        args.shard.as_deref(),
        args.report_dir,
        precision,
    )
}

/// `--shard I/N`.
fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("--shard {s}: expected I/N, e.g. 0/4"))?;
    let (i, n): (usize, usize) = (
        i.trim()
            .parse()
            .with_context(|| format!("--shard {s}: I must be a number"))?,
        n.trim()
            .parse()
            .with_context(|| format!("--shard {s}: N must be a number"))?,
    );
    if n == 0 || i >= n {
        bail!("--shard {s}: I must be below N (0-based)");
    }
    Ok((i, n))
}

/// The report folder a run directory renders into by default: reports/<run-name>.
pub fn default_report_dir(run_dir: &std::path::Path) -> PathBuf {
    PathBuf::from("reports").join(crate::study::rundir::RunDir::at(run_dir).name())
}

/// `outlierlab run`: the study, then (unless sharded) its report.
fn run_study(
    file: &std::path::Path,
    out: Option<PathBuf>,
    shard: Option<&str>,
    report_dir: Option<PathBuf>,
    precision: Option<crate::model::PrecisionSetting>,
) -> Result<()> {
    let (study, text) = read_study(file, precision)?;
    let out = out
        .or_else(|| study.file.output.clone().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("runs").join(&study.name));
    let shard = shard.map(parse_shard).transpose()?;
    crate::study::runner::run(
        &study,
        &text,
        &crate::study::runner::RunOptions {
            out: out.clone(),
            shard,
        },
    )?;
    if shard.is_none() {
        let dir = report_dir.unwrap_or_else(|| default_report_dir(&out));
        let p = crate::report::render(&out, &dir)?;
        println!("report: {}", p.display());
    }
    Ok(())
}

/// A study file parsed, with `--precision` settled against its `precision:`; and its text.
pub fn read_study(
    file: &std::path::Path,
    precision: Option<crate::model::PrecisionSetting>,
) -> Result<(crate::study::spec::Study, String)> {
    use crate::model::PrecisionSetting;
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("cannot read study file {}: {e}", file.display()))?;
    let mut study = crate::study::spec::parse(&text, &file.display().to_string())?;
    // A file that names its precision decides it: a flag that silently lost to it (or won over
    // it) would leave results that say otherwise. With `auto` the flag picks, and the run
    // records the precision used.
    match (study.file.precision, precision) {
        (_, None) => {}
        (PrecisionSetting::Auto, Some(p)) => study.file.precision = p,
        (f, Some(p)) if f != p => bail!(
            "{} runs in {} (its `precision:`), and --precision asks for {}; set `precision: {}` (or auto) in the study file (or a copy of it), or drop --precision",
            file.display(),
            f.name(),
            p.name(),
            p.name()
        ),
        _ => {}
    }
    for w in crate::study::spec::warnings(&study) {
        eprintln!("warning: {w}");
    }
    Ok((study, text))
}
