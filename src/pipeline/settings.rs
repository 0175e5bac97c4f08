//! How a variant's edit is searched and its detection thresholds tuned on the selection split:
//! settings of the variant (what the optimisers in `study::optimize` read), written in a study
//! file as `ablation.search` and `tune` entries.

use crate::detect::DetectionSettings;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How the searched kernels are compared on the selection split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SearchObjective {
    /// heretic's form: two objectives (refusals, KL), the Pareto front of the trials, and one
    /// kernel chosen from it by a stated rule (fewest refusals with KL ≤ `max_kl`).
    #[default]
    Pareto,
    /// One number: KL (or, below `kl_target`, the refusal ratio scaled to the target) plus
    /// refusals / refusals of the unedited model — heretic 1.x's two objectives added up.
    Sum,
}

/// How the trials' kernels are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sampler {
    /// Uniform over heretic's ranges, seeded: what heretic's TPE sampler does for its first
    /// `n_startup_trials` (60) trials. (heretic then switches to multivariate TPE, which this
    /// tool does not implement.)
    Random,
    /// argmin's particle swarm on the summed objective, 8 particles per generation.
    Swarm,
}

/// Fewer trials than this and the swarm runs a single generation: 8 random kernels, no search.
pub const MIN_SWARM_TRIALS: usize = 16;
/// A random search of n trials lands one in the best 10% of the space with probability
/// 1 − 0.9ⁿ; 22 trials make that 90%.
pub const MIN_RANDOM_TRIALS: usize = 22;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSettings {
    /// Objective evaluations (each one scores the selection prompts).
    pub trials: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "d_kl_target")]
    pub kl_target: f64,
    #[serde(default = "d_kl_scale")]
    pub kl_scale: f64,
    #[serde(default)]
    pub objective: SearchObjective,
    /// Default: `random` for `pareto`, `swarm` for `sum`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<Sampler>,
    /// The Pareto rule's KL bound on the selection split. heretic warns that KL above 0.5
    /// "usually indicates significant damage".
    #[serde(default = "d_max_kl")]
    pub max_kl: f64,
}

fn d_max_kl() -> f64 {
    0.5
}

impl SearchSettings {
    pub fn sampler(&self) -> Sampler {
        self.sampler.unwrap_or(match self.objective {
            SearchObjective::Pareto => Sampler::Random,
            SearchObjective::Sum => Sampler::Swarm,
        })
    }

    /// The smallest budget that searches at all with this sampler.
    pub fn min_trials(&self) -> usize {
        match self.sampler() {
            Sampler::Random => MIN_RANDOM_TRIALS,
            Sampler::Swarm => MIN_SWARM_TRIALS,
        }
    }
}

fn d_kl_target() -> f64 {
    0.01
}
fn d_kl_scale() -> f64 {
    1.0
}
fn d_tune_trials() -> usize {
    24
}

/// Thresholds to optimise in log space within `[low, high]` bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuneSettings {
    pub name: String,
    #[serde(default = "d_handling_zero")]
    pub handling: String,
    /// Detection whose thresholds are tuned (default: the study's).
    #[serde(default)]
    pub detection: Option<DetectionSettings>,
    /// Setting name -> [low, high].
    pub thresholds: BTreeMap<String, (f64, f64)>,
    /// Threshold sets tried; only the distinct dim sets among them are scored.
    #[serde(default = "d_tune_trials")]
    pub trials: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "d_kl_target")]
    pub kl_target: f64,
    #[serde(default = "d_kl_scale")]
    pub kl_scale: f64,
}

fn d_handling_zero() -> String {
    "zero-residual-dims".into()
}
