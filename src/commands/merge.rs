//! `outlierlab merge`: shard run directories into one run.

use anyhow::{bail, Result};
use std::path::PathBuf;

/// Combine shard run directories into one run (equal to a single-machine run).
///
/// Every planned score of every replicate must be present in exactly one shard (or in
/// several with the same result): a missing score, a shard of another study or plan, or two
/// shards that disagree on a score are refused, naming the files. A run stopped part-way
/// (one directory, sharded or not) merges with --allow-partial into a run marked partial,
/// whose report covers what it finished; running the study again on the original directory
/// resumes it.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The combined run directory.
    #[arg(long)]
    pub into: PathBuf,
    /// Write the run even when scores are missing; it is marked partial (partial.json
    /// lists what is missing) and its report says so.
    #[arg(long)]
    pub allow_partial: bool,
    pub shards: Vec<PathBuf>,
}

/// `outlierlab merge`.
pub fn run(args: &Args) -> Result<()> {
    let (into, shards, allow_partial) = (args.into.as_path(), &args.shards, args.allow_partial);
    if shards.is_empty() {
        bail!("no shard directories given");
    }
    let missing = crate::study::rundir::merge(into, shards, allow_partial)?;
    if missing.is_empty() {
        println!("merged {} shard(s) into {}", shards.len(), into.display());
    } else {
        println!(
            "merged {} shard(s) into {} — PARTIAL: {} planned score(s) missing (listed in {})",
            shards.len(),
            into.display(),
            missing.len(),
            crate::study::rundir::RunDir::at(into).partial().display()
        );
    }
    Ok(())
}
