//! What a validation scores: the presets, pr154's criteria subsets and the threshold curves.

use super::ValidationSpec;
use crate::detect::config::{MedianScope, PersistenceMode};
use crate::detect::DetectConfig;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// One configuration to score and where it belongs: `group` collects the configurations read
/// together (pr154's subsets under one scope and mode; one threshold curve).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Named {
    pub name: String,
    pub group: String,
    /// The swept threshold of a curve's point.
    pub threshold: Option<f64>,
    pub config: DetectConfig,
}

/// The prefix of every criteria-subset group.
pub const SUBSETS: &str = "pr154 subsets";

fn scope_name(s: MedianScope) -> &'static str {
    match s {
        MedianScope::Position => "median per position",
        MedianScope::Layer => "median per layer",
    }
}

fn mode_name(m: PersistenceMode) -> &'static str {
    match m {
        PersistenceMode::Consecutive => "persistence consecutive",
        PersistenceMode::Total => "persistence total",
        PersistenceMode::DimLayers => "persistence dim-layers",
    }
}

/// The configurations the spec asks for: every preset at its defaults, pr154's 31 criteria
/// subsets under each median scope and persistence mode (the floor named where a subset has no
/// value criterion), and the threshold curves. All scan valid positions: the corpus is scored
/// where the labels are.
pub fn configurations(spec: &ValidationSpec) -> Result<Vec<Named>> {
    use crate::detect::config::{preset, Positions, PRESETS};
    let valid = |mut c: DetectConfig| {
        c.positions = Positions::Valid;
        c
    };
    let mut out = Vec::new();
    for (name, _) in PRESETS {
        out.push(Named {
            name: format!("{name} (defaults)"),
            group: "presets".into(),
            threshold: None,
            config: valid(preset(name)?),
        });
    }
    out.extend(subsets(spec, None)?);
    for curve in &spec.curves {
        for f in curve_grid() {
            let mut c = valid(preset(curve)?);
            c.set(&format!("median_ratio={f:.1}"))?;
            if curve == "pr154" {
                c.set(&format!("mad_ratio={f:.1}"))?;
            }
            out.push(Named {
                name: format!("{curve} at {f:.0}"),
                group: format!("curve {curve}"),
                threshold: Some(f),
                config: c,
            });
        }
    }
    Ok(out)
}

/// pr154's 31 criteria subsets under each median scope and persistence mode, at PR #154's
/// thresholds or with median_ratio and mad_ratio both at `at` (the pr154 curve's chosen point);
/// the floor named where a subset has no value criterion.
pub fn subsets(spec: &ValidationSpec, at: Option<f64>) -> Result<Vec<Named>> {
    use crate::detect::config::{preset, Positions, CRITERIA, FLOOR};
    let mut out = Vec::new();
    for &scope in &spec.median_scope {
        for &mode in &spec.persistence_mode {
            let group = match at {
                None => format!("{SUBSETS}, {}, {}", scope_name(scope), mode_name(mode)),
                Some(t) => format!(
                    "{SUBSETS} at {t:.0}x, {}, {}",
                    scope_name(scope),
                    mode_name(mode)
                ),
            };
            for mask in 1..(1u32 << CRITERIA.len()) {
                let mut c = preset("pr154")?;
                c.positions = Positions::Valid;
                c.median_scope = scope;
                c.persistence_mode = mode;
                if let Some(t) = at {
                    c.set(&format!("median_ratio={t:.1}"))?;
                    c.set(&format!("mad_ratio={t:.1}"))?;
                }
                for (i, k) in CRITERIA.iter().enumerate() {
                    if mask & (1 << i) == 0 {
                        c.switch_off(k);
                    }
                }
                if !c.has_value_criterion() {
                    c.floor = Some(FLOOR);
                }
                out.push(Named {
                    name: c.active_criteria().join("+"),
                    group: group.clone(),
                    threshold: at,
                    config: c,
                });
            }
        }
    }
    Ok(out)
}

/// From the scan floor (20x) to 10,000x, evenly on a log scale.
pub fn curve_grid() -> Vec<f64> {
    (0..13)
        .map(|i| 20f64 * 500f64.powf(i as f64 / 12.0))
        .collect()
}
