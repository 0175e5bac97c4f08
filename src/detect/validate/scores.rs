//! In-sample scores: every configuration against the labels on the whole corpus (shown for
//! comparison; the reported scores are held out), and how the dim labels move with their
//! thresholds.

use super::{Candidate, ValidationSettings, SUBSETS};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Precision, recall and F1 of a detection against the labels.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Score {
    pub detected: usize,
    /// Exact for dims; for entries, estimated from the labelled sample (weighted).
    pub true_positives: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub precision: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub recall: f64,
    pub f1: f64,
}

/// JSON has no NaN: serde_json writes it as null, and an undefined ratio reads back as NaN.
pub(crate) fn nan_if_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl Score {
    /// Against a set of truths: precision is undefined (NaN) when nothing is detected, recall
    /// when nothing is true; F1 is 0 when no detection is true.
    fn of<T: Ord>(detected: &BTreeSet<T>, truth: &BTreeSet<T>) -> Score {
        let tp = detected.intersection(truth).count();
        let precision = if detected.is_empty() {
            f64::NAN
        } else {
            tp as f64 / detected.len() as f64
        };
        let recall = if truth.is_empty() {
            f64::NAN
        } else {
            tp as f64 / truth.len() as f64
        };
        let f1 = if tp == 0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        };
        Score {
            detected: detected.len(),
            true_positives: tp as f64,
            precision,
            recall,
            f1,
        }
    }
}

/// Dim-level score: a detected dim is right when it is labelled massive.
pub fn score(detected: &[u32], cands: &[Candidate]) -> Score {
    let massive: BTreeSet<u32> = cands.iter().filter(|c| c.massive).map(|c| c.dim).collect();
    Score::of(&detected.iter().copied().collect(), &massive)
}

impl Score {
    /// An entry-level score from the weighted estimator over some prompts.
    pub fn from_entries(p: &crate::detect::heldout::Prf, detected: usize) -> Score {
        Score {
            detected,
            true_positives: p.tp,
            precision: p.precision,
            recall: p.recall,
            f1: p.f1,
        }
    }
}

/// One configuration's detections and scores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scored {
    pub name: String,
    pub group: String,
    pub threshold: Option<f64>,
    pub dims: Vec<u32>,
    pub dim: Score,
    pub ptd: Score,
}

/// What one group of criteria subsets says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupSummary {
    pub group: String,
    pub best_f1: f64,
    /// The subsets (fewest criteria first) reaching the best dim-level F1.
    pub smallest: Vec<String>,
    pub best_f1_ptd: f64,
}

/// How many candidates are labelled massive as the two label thresholds move: a reader sees
/// whether the labels hang on the chosen values.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelSensitivity {
    pub zero_kl: f64,
    pub mean_kl: f64,
    pub massive: Vec<u32>,
}

/// Per group of criteria subsets, in sample: the best F1 and the smallest subsets that reach it.
/// (Redundancy is judged held out: `detect::heldout`.)
pub fn summarise(scored: &[Scored]) -> Vec<GroupSummary> {
    let set_of = crate::detect::heldout::criteria_of;
    let mut groups: Vec<&str> = scored
        .iter()
        .filter(|s| s.group.starts_with(SUBSETS))
        .map(|s| s.group.as_str())
        .collect();
    groups.dedup();
    groups
        .into_iter()
        .map(|g| {
            let mine: Vec<&Scored> = scored.iter().filter(|s| s.group == g).collect();
            let best_f1 = mine.iter().map(|s| s.dim.f1).fold(0.0, f64::max);
            let best_f1_ptd = mine.iter().map(|s| s.ptd.f1).fold(0.0, f64::max);
            let mut at_best: Vec<&Scored> = mine
                .iter()
                .copied()
                .filter(|s| best_f1 > 0.0 && s.dim.f1 == best_f1)
                .collect();
            at_best.sort_by_key(|s| (set_of(&s.name).len(), s.name.clone()));
            let fewest = at_best.first().map(|s| set_of(&s.name).len());
            let smallest = at_best
                .iter()
                .filter(|s| Some(set_of(&s.name).len()) == fewest)
                .map(|s| s.name.clone())
                .collect();
            GroupSummary {
                group: g.to_string(),
                best_f1,
                smallest,
                best_f1_ptd,
            }
        })
        .collect()
}

/// The labels under zero_kl × {1/3, 1, 3} and mean_kl × {1/3, 1, 3} of the chosen values.
pub fn sensitivity(cands: &[Candidate], s: &ValidationSettings) -> Vec<LabelSensitivity> {
    let mut out = Vec::new();
    for fz in [1.0 / 3.0, 1.0, 3.0] {
        for fm in [1.0 / 3.0, 1.0, 3.0] {
            let (z, m) = (s.zero_kl * fz, s.mean_kl * fm);
            out.push(LabelSensitivity {
                zero_kl: z,
                mean_kl: m,
                massive: cands
                    .iter()
                    .filter(|c| c.damage.zero_kl >= z && c.damage.mean_kl <= m)
                    .map(|c| c.dim)
                    .collect(),
            });
        }
    }
    out
}
