//! Two validations of one corpus (bf16 against f32) compared label by label.

use super::Validation;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// How two validations of one corpus (e.g. bf16 against f32) agree on their labels.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelAgreement {
    pub other_precision: Option<String>,
    /// Candidate dims in both, and those whose dim label is the same.
    pub dims_common: usize,
    pub dims_agree: usize,
    /// Dims that are candidates in only one of them.
    pub only_here: Vec<u32>,
    pub only_there: Vec<u32>,
    /// Instances labelled in both, and those whose entry label is the same.
    pub entries_common: usize,
    pub entries_agree: usize,
    /// The dims labelled massive in each.
    pub massive_here: Vec<u32>,
    pub massive_there: Vec<u32>,
}

impl LabelAgreement {
    pub fn of(here: &Validation, there: &Validation) -> LabelAgreement {
        let dims =
            |v: &Validation| -> BTreeSet<u32> { v.candidates.iter().map(|c| c.dim).collect() };
        let (a, b) = (dims(here), dims(there));
        let label =
            |v: &Validation, d: u32| v.candidates.iter().find(|c| c.dim == d).map(|c| c.massive);
        let common: Vec<u32> = a.intersection(&b).copied().collect();
        let entry = |v: &Validation| -> BTreeMap<(u32, u32, u32), bool> {
            v.entries
                .iter()
                .map(|e| ((e.prompt, e.position, e.dim), e.massive))
                .collect()
        };
        let (ea, eb) = (entry(here), entry(there));
        let shared: Vec<(&(u32, u32, u32), &bool)> =
            ea.iter().filter(|(k, _)| eb.contains_key(*k)).collect();
        let massive = |v: &Validation| -> Vec<u32> {
            v.candidates
                .iter()
                .filter(|c| c.massive)
                .map(|c| c.dim)
                .collect()
        };
        LabelAgreement {
            other_precision: there.precision.clone(),
            dims_common: common.len(),
            dims_agree: common
                .iter()
                .filter(|&&d| label(here, d) == label(there, d))
                .count(),
            only_here: a.difference(&b).copied().collect(),
            only_there: b.difference(&a).copied().collect(),
            entries_common: shared.len(),
            entries_agree: shared.iter().filter(|(k, y)| eb[*k] == **y).count(),
            massive_here: massive(here),
            massive_there: massive(there),
        }
    }
}
