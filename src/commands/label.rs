//! `outlierlab label`: massive activations labelled by intervention, and detections scored.

use crate::model::{self, Precision};
use anyhow::{bail, Result};
use std::path::PathBuf;

/// Which dims are massive activations, by intervention, and every detection scored on it.
///
/// Scans the trigger prompt and a corpus, takes as candidates the dims that stand out (or
/// that a scored configuration detects), holds each at zero and at its corpus mean from the
/// hidden state where it first appears, and labels it massive when zeroing damages the later
/// positions' predictions (KL) and mean-setting does not (Sun et al. 2024); then labels a
/// sample of each dim's instances (prompt, position) one by one the same way. Splits the corpus
/// by prompt, chooses thresholds and criteria subsets on one half and scores the presets, every
/// criteria subset of pr154 and a threshold sweep on the other: precision, recall, F1 with
/// bootstrap intervals over prompts, each criterion's redundancy, and each dim's share of the
/// refusal direction (harmful sets count as `bad`, e.g. `--dataset advbench:50`).
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// The corpus: a built-in prompt set or a file, NAME or NAME:COUNT (repeatable).
    #[arg(long, default_value = "harmless-outlierlab:16")]
    pub dataset: Vec<String>,
    #[arg(long, default_value = crate::model::chat::DEFAULT_SYSTEM_PROMPT)]
    pub system: String,
    /// Raw text (BOS + prompt) instead of chat turns, for base models.
    #[arg(long)]
    pub raw: bool,
    /// Candidates: entries at least this many times their position's median.
    #[arg(long, default_value_t = 100.0)]
    pub candidate_ratio: f32,
    #[arg(long, default_value_t = 24)]
    pub max_candidates: usize,
    /// Massive: zeroing does at least this mean KL (nats) at the later positions ...
    #[arg(long, default_value_t = 1.0)]
    pub zero_kl: f64,
    /// ... and holding at the mean at most this.
    #[arg(long, default_value_t = 0.1)]
    pub mean_kl: f64,
    /// Median scopes the criteria subsets are scored under (position, layer).
    #[arg(long, value_delimiter = ',', default_value = "position,layer")]
    pub median_scope: Vec<String>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// A dim's label holds it in at most this many prompts (a seeded sample).
    #[arg(long, default_value_t = 16)]
    pub label_prompts: usize,
    /// Entry labels: at most this many instances per dim, each held alone (a seeded sample).
    #[arg(long, default_value_t = 32)]
    pub entries_per_dim: usize,
    /// Seeds the samples, the selection/held-out split of the corpus and the bootstrap.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Bootstrap draws over the held-out prompts.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Write everything (candidates, every configuration's scores) as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `outlierlab label`: which dims are massive activations by intervention, and every preset,
/// threshold and criteria subset scored against those labels. A study's
/// `detection_validation:` block runs the same and renders it in the report.
pub fn run(a: &Args, precision: Precision) -> Result<()> {
    use crate::detect::config::MedianScope;
    use crate::detect::validate::{self, CorpusSet, ValidationSpec};
    let median_scope = a
        .median_scope
        .iter()
        .map(|s| match s.as_str() {
            "position" => Ok(MedianScope::Position),
            "layer" => Ok(MedianScope::Layer),
            o => bail!("--median-scope: unknown scope '{o}'; expected position or layer"),
        })
        .collect::<Result<Vec<_>>>()?;
    let spec = ValidationSpec {
        corpus: a.dataset.iter().map(|d| CorpusSet::parse(d)).collect(),
        candidate_ratio: a.candidate_ratio,
        max_candidates: a.max_candidates,
        zero_kl: a.zero_kl,
        mean_kl: a.mean_kl,
        median_scope,
        persistence_mode: vec![crate::detect::config::PersistenceMode::Consecutive],
        curves: validate::CURVES.iter().map(|c| c.to_string()).collect(),
        batch_size: a.batch_size,
        label_prompts: a.label_prompts,
        entries_per_dim: a.entries_per_dim,
        seed: a.seed,
        bootstrap: a.bootstrap,
    };
    spec.check()
        .map_err(|(k, m)| anyhow::anyhow!("--{}: {m}", k.replace('_', "-")))?;
    let mut lm = model::load_with(&a.model, precision)?;
    lm.raw = a.raw;
    let system = (!a.system.is_empty()).then_some(a.system.as_str());
    let pb = crate::util::progress_bar(0, "hidden states");
    let v = validate::run(
        &lm,
        system,
        &spec,
        Vec::new(),
        None,
        |phase, done, total| {
            pb.set_message(phase);
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        },
    )?;
    pb.finish_and_clear();
    print!("{}", crate::report::validation::markdown(&v, 1));
    if let Some(path) = &a.json {
        crate::fs::write_atomic(path, serde_json::to_string_pretty(&v)?.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
