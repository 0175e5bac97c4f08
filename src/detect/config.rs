//! The detector's settings: every criterion a switch (absent = off), every threshold a number,
//! and every choice PR #154 leaves open made explicit.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The trigger prompt of PR #154.
pub const PR154_TRIGGER: &str =
    "Summer is warm, and winter\nfrom here doesn't feel cold of all seasons.";

/// Where the median (and MAD) of criteria 2 and 3 is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MedianScope {
    /// Over the hidden vector of one position (PR #154's code).
    Position,
    /// Over all valid positions of one prompt at one layer (Sun et al. 2024).
    Layer,
}

/// How the median of an even number of values is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MedianKind {
    /// The lower of the two middle values, as `torch.median` (PR #154).
    Lower,
    /// The mean of the two middle values, as `numpy.median`.
    Average,
}

/// Which positions of a padded batch are scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Positions {
    /// Real tokens only.
    Valid,
    /// Padding too, as PR #154's code does.
    All,
}

pub use crate::model::PadRows;

/// The scan's pre-filter as a criterion: an entry whose ratio to the median or MAD z-score, in
/// either scope, reaches this. Only a criteria subset without any value criterion needs it (it
/// would otherwise detect every dim); naming it keeps the floor from deciding silently.
pub const FLOOR: f32 = 20.0;

/// How criterion 5 (persistence) counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PersistenceMode {
    /// The same (prompt, position, dim) is a candidate in this hidden state and each of the next
    /// ⌊S·f⌋ (S hidden states, embedding output included): PR #154's code.
    Consecutive,
    /// The same (prompt, position, dim) is a candidate in at least ⌈S·f⌉ hidden states: PR #154's
    /// description ("for at least 25% of the model's layers").
    Total,
    /// The dim is a candidate (at any prompt and position) in at least ⌈S·f⌉ hidden states:
    /// LLM.int8()'s layer criterion.
    DimLayers,
}

/// What criterion 4 asks of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClusterTest {
    /// Its position's top deviations form a small cluster, whether or not this value is in it:
    /// what PR #154's code checks.
    Position,
    /// The value itself is inside that small cluster: what the PR's description says.
    Member,
}

/// Which prompts are scanned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sources {
    /// Text of the trigger prompt (rendered in the chat template); `None` = no trigger prompt.
    pub trigger: Option<String>,
    pub good: bool,
    pub bad: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// Criterion 1: |a| > min_abs.
    pub min_abs: Option<f32>,
    /// Criterion 2: |a| > median_ratio × median(|h|).
    pub median_ratio: Option<f32>,
    /// Criterion 3: | |a| − median(|h|) | > mad_ratio × 1.4826 × MAD.
    pub mad_ratio: Option<f32>,
    /// Criterion 4: `a` is among a small cluster (≤ this size) of top outliers.
    pub max_cluster_size: Option<usize>,
    pub cluster_test: ClusterTest,
    /// Criterion 5: fraction f of hidden states over which a hit must persist.
    pub persistence: Option<f32>,
    /// The scan floor as an explicit criterion (see [`FLOOR`]); set only where no value
    /// criterion is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<f32>,
    pub persistence_mode: PersistenceMode,
    pub median_scope: MedianScope,
    pub median_kind: MedianKind,
    pub positions: Positions,
    /// How pad positions' hidden states are computed (matters only with `positions: all`).
    #[serde(default)]
    pub pad_rows: PadRows,
    /// LLM.int8(): a dim must be hit at ≥ this fraction of the scanned (prompt, position)s.
    pub min_position_fraction: Option<f32>,
    /// Keep only the k dims with the largest peak |a| among those passing the other criteria.
    pub top_k: Option<usize>,
    pub sources: Sources,
}

impl Default for DetectConfig {
    fn default() -> Self {
        preset("pr154").expect("built-in preset")
    }
}

pub const PRESETS: [(&str, &str); 6] = [
    ("pr154", "PR #154's code: five criteria, position median (averaging, as torch.quantile), trigger alone, padding scanned as transformers computes it, consecutive persistence"),
    ("pr154-described", "PR #154's description: five criteria, valid positions only, value inside the cluster, persistence counted in total"),
    ("sun2024", "Sun et al. 2024: |a| > 100 and > 1000x the layer-wide median"),
    ("median-only", "criterion 2 alone: |a| > 1000x its position's median"),
    ("llm-int8", "Dettmers et al.: |a| >= 6 in >= 25% of layers and >= 6% of positions"),
    ("top-k", "control: the k dims (default 1) with the largest peak |a|"),
];

pub fn preset(name: &str) -> Result<DetectConfig> {
    let all_sources = Sources {
        trigger: Some(PR154_TRIGGER.to_string()),
        good: true,
        bad: true,
    };
    let base = DetectConfig {
        min_abs: Some(100.0),
        median_ratio: Some(1000.0),
        mad_ratio: Some(1000.0),
        max_cluster_size: Some(3),
        cluster_test: ClusterTest::Position,
        persistence: Some(0.25),
        floor: None,
        persistence_mode: PersistenceMode::Consecutive,
        median_scope: MedianScope::Position,
        // torch.quantile(q=0.5), which the PR calls, averages the two middle values.
        median_kind: MedianKind::Average,
        positions: Positions::All,
        pad_rows: PadRows::Transformers,
        min_position_fraction: None,
        top_k: None,
        sources: all_sources,
    };
    let off = DetectConfig {
        min_abs: None,
        median_ratio: None,
        mad_ratio: None,
        max_cluster_size: None,
        persistence: None,
        positions: Positions::Valid,
        pad_rows: PadRows::SelfOnly,
        ..base.clone()
    };
    Ok(match name {
        "pr154" => base,
        "pr154-described" => DetectConfig {
            persistence_mode: PersistenceMode::Total,
            cluster_test: ClusterTest::Member,
            positions: Positions::Valid,
            pad_rows: PadRows::SelfOnly,
            ..base
        },
        "sun2024" => DetectConfig {
            min_abs: Some(100.0),
            median_ratio: Some(1000.0),
            median_scope: MedianScope::Layer,
            ..off
        },
        "median-only" => DetectConfig {
            median_ratio: Some(1000.0),
            ..off
        },
        "llm-int8" => DetectConfig {
            min_abs: Some(6.0),
            persistence: Some(0.25),
            persistence_mode: PersistenceMode::DimLayers,
            min_position_fraction: Some(0.06),
            ..off
        },
        "top-k" => DetectConfig {
            top_k: Some(1),
            ..off
        },
        other => {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
            bail!(
                "unknown detection preset '{other}'; presets: {}",
                names.join(", ")
            )
        }
    })
}

/// The five criteria of the proposal, in the order studies and reports list them.
pub const CRITERIA: [&str; 5] = [
    "min_abs",
    "median_ratio",
    "mad_ratio",
    "cluster",
    "persistence",
];

impl DetectConfig {
    /// Which of the five criteria are on, in `CRITERIA` order.
    pub fn criteria_on(&self) -> [bool; 5] {
        [
            self.min_abs.is_some(),
            self.median_ratio.is_some(),
            self.mad_ratio.is_some(),
            self.max_cluster_size.is_some(),
            self.persistence.is_some(),
        ]
    }

    /// Switches off one criterion, named as in `CRITERIA`.
    pub fn switch_off(&mut self, criterion: &str) {
        match criterion {
            "min_abs" => self.min_abs = None,
            "median_ratio" => self.median_ratio = None,
            "mad_ratio" => self.mad_ratio = None,
            "cluster" => self.max_cluster_size = None,
            "persistence" => self.persistence = None,
            other => unreachable!("not a criterion: {other}"),
        }
    }

    /// Applies `key=value` overrides (the CLI's `--set`). `none`/`off` switches a criterion off.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (key, value) = assignment.split_once('=').with_context(|| {
            format!("--set {assignment}: expected key=value, e.g. --set median_ratio=400")
        })?;
        let (key, value) = (key.trim(), value.trim());
        let off = matches!(value, "none" | "off" | "null" | "");
        let num = |v: &str| -> Result<f32> {
            let x: f32 = v
                .parse()
                .with_context(|| format!("--set {key}={v}: expected a number or 'none'"))?;
            if !x.is_finite() || x < 0.0 {
                bail!("--set {key}={v}: expected a finite, non-negative number");
            }
            Ok(x)
        };
        let int = |v: &str| -> Result<usize> {
            v.parse()
                .with_context(|| format!("--set {key}={v}: expected a whole number or 'none'"))
        };
        let opt_num = |v: &str| -> Result<Option<f32>> {
            if off {
                Ok(None)
            } else {
                num(v).map(Some)
            }
        };
        let bool_of = |v: &str| -> Result<bool> {
            match v {
                "true" | "yes" | "on" | "1" => Ok(true),
                "false" | "no" | "off" | "0" => Ok(false),
                _ => bail!("--set {key}={v}: expected true or false"),
            }
        };
        let enum_of = |v: &str, choices: &[&str]| -> Result<String> {
            if choices.contains(&v) {
                Ok(v.to_string())
            } else {
                bail!("--set {key}={v}: expected one of {}", choices.join(", "))
            }
        };
        match key {
            "min_abs" => self.min_abs = opt_num(value)?,
            "median_ratio" => self.median_ratio = opt_num(value)?,
            "mad_ratio" => self.mad_ratio = opt_num(value)?,
            "max_cluster_size" => {
                self.max_cluster_size = if off { None } else { Some(int(value)?) }
            }
            "persistence" => {
                self.persistence = opt_num(value)?;
                if self.persistence.is_some_and(|p| p > 1.0) {
                    bail!(
                        "--set persistence={value}: a fraction of hidden states, between 0 and 1"
                    );
                }
            }
            "min_position_fraction" => self.min_position_fraction = opt_num(value)?,
            "floor" => self.floor = opt_num(value)?,
            "pad_rows" => {
                self.pad_rows = match enum_of(value, &["self-only", "transformers"])?.as_str() {
                    "transformers" => PadRows::Transformers,
                    _ => PadRows::SelfOnly,
                }
            }
            "top_k" => self.top_k = if off { None } else { Some(int(value)?) },
            "persistence_mode" => {
                self.persistence_mode =
                    match enum_of(value, &["consecutive", "total", "dim-layers"])?.as_str() {
                        "consecutive" => PersistenceMode::Consecutive,
                        "total" => PersistenceMode::Total,
                        _ => PersistenceMode::DimLayers,
                    }
            }
            "cluster_test" => {
                self.cluster_test = match enum_of(value, &["position", "member"])?.as_str() {
                    "position" => ClusterTest::Position,
                    _ => ClusterTest::Member,
                }
            }
            "median_scope" => {
                self.median_scope = match enum_of(value, &["position", "layer"])?.as_str() {
                    "position" => MedianScope::Position,
                    _ => MedianScope::Layer,
                }
            }
            "median_kind" => {
                self.median_kind = match enum_of(value, &["lower", "average"])?.as_str() {
                    "lower" => MedianKind::Lower,
                    _ => MedianKind::Average,
                }
            }
            "positions" => {
                self.positions = match enum_of(value, &["valid", "all"])?.as_str() {
                    "valid" => Positions::Valid,
                    _ => Positions::All,
                }
            }
            "trigger" => self.sources.trigger = if off { None } else { Some(value.to_string()) },
            "good" => self.sources.good = bool_of(value)?,
            "bad" => self.sources.bad = bool_of(value)?,
            other => {
                let keys = [
                    "min_abs",
                    "median_ratio",
                    "mad_ratio",
                    "max_cluster_size",
                    "cluster_test",
                    "persistence",
                    "persistence_mode",
                    "floor",
                    "median_scope",
                    "median_kind",
                    "positions",
                    "pad_rows",
                    "min_position_fraction",
                    "top_k",
                    "trigger",
                    "good",
                    "bad",
                ];
                let hint = crate::util::did_you_mean(other, &keys)
                    .map(|k| format!(" (did you mean '{k}'?)"))
                    .unwrap_or_default();
                bail!(
                    "--set {other}: unknown detection setting{hint}; settings: {}",
                    keys.join(", ")
                )
            }
        }
        Ok(())
    }

    /// Names of the criteria that are on, in the order of the proposal.
    pub fn active_criteria(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.min_abs.is_some() {
            v.push("min_abs");
        }
        if self.median_ratio.is_some() {
            v.push("median_ratio");
        }
        if self.mad_ratio.is_some() {
            v.push("mad_ratio");
        }
        if self.max_cluster_size.is_some() {
            v.push("cluster");
        }
        if self.persistence.is_some() {
            v.push("persistence");
        }
        if self.floor.is_some() {
            v.push("floor");
        }
        v
    }

    /// Whether some criterion bounds a value (|a|, a ratio, a z-score). Without one, the others
    /// (cluster, persistence) would accept every dim of every position.
    pub fn has_value_criterion(&self) -> bool {
        self.min_abs.is_some()
            || self.median_ratio.is_some()
            || self.mad_ratio.is_some()
            || self.floor.is_some()
    }

    /// The same settings with the floor criterion removed (pairs that differ only in a criterion
    /// are matched up to the floor, which a subset gets only when it has no value criterion).
    pub fn without_floor(&self) -> DetectConfig {
        DetectConfig {
            floor: None,
            ..self.clone()
        }
    }
}

/// A detection as a study file names it: a preset and overrides of its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectionSettings {
    #[serde(default = "default_preset")]
    pub preset: String,
    /// Overrides, as `outlierlab detect --set key=value`; `null` switches a criterion off.
    #[serde(default)]
    pub set: BTreeMap<String, serde_yaml::Value>,
}

fn default_preset() -> String {
    "pr154".into()
}

impl Default for DetectionSettings {
    fn default() -> Self {
        DetectionSettings {
            preset: default_preset(),
            set: BTreeMap::new(),
        }
    }
}

impl DetectionSettings {
    pub fn resolve(&self) -> Result<DetectConfig> {
        let mut c = super::preset(&self.preset)?;
        for (k, v) in &self.set {
            c.set(&format!("{k}={}", crate::util::yaml_scalar(v)))?;
        }
        Ok(c)
    }
}
