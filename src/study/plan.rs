//! From a study file to concrete variants with stable ids: sweeps expanded, settings resolved.

use super::spec::{Study, Subsets, SweepSpec, CRITERIA};
use super::variant::Variant;
use crate::detect::config::MedianScope;
use crate::detect::DetectConfig;
use crate::direction::{self, Handling};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedVariant {
    /// A hash of the resolved settings (not of the name): the same settings get the same id in
    /// any study, so results can be reused and merged.
    pub id: String,
    pub variant: Variant,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub variants: Vec<PlannedVariant>,
    pub replicates: Vec<u64>,
}

pub fn variant_id(v: &Variant) -> String {
    let mut canon = v.clone();
    canon.name = String::new();
    if !canon.needs_dims() {
        // Detection settings that no handling uses do not change the result.
        canon.detect = None;
    }
    let json = serde_json::to_string(&canon).expect("variants serialise");
    let h = Sha256::digest(json.as_bytes());
    h.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn criteria_off(c: &mut DetectConfig, keep: &[&str]) {
    for criterion in CRITERIA.iter().filter(|x| !keep.contains(x)) {
        c.switch_off(criterion);
    }
}

fn subsets(s: &Subsets) -> Vec<Vec<&str>> {
    match s {
        Subsets::All(_) => (0..32u32)
            .map(|mask| {
                CRITERIA
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, c)| *c)
                    .collect()
            })
            .collect(),
        Subsets::Listed(list) => list
            .iter()
            .map(|l| l.iter().map(String::as_str).collect())
            .collect(),
    }
}

fn expand_sweep(
    sw: &SweepSpec,
    base: &DetectConfig,
    ablation: &crate::ablate::AblationParams,
    orth: bool,
) -> Result<Vec<Variant>> {
    let mut out = Vec::new();
    let prefix = sw.name.clone().unwrap_or_else(|| "sweep".into());
    for q in &sw.winsorize {
        out.push(Variant {
            name: format!("winsorize-{q}"),
            handlings: vec![Handling::Winsorize { q: *q }],
            detect: None,
            ablation: ablation.clone(),
            orthogonalize: orth,
            search: None,
            tune: None,
        });
    }
    let detection_sweep =
        sw.criteria_subsets.is_some() || sw.median_scope.is_some() || !sw.thresholds.is_empty();
    if !detection_sweep {
        return Ok(out);
    }
    let handlings = Handling::parse_list(&sw.handling)?;
    let base = match &sw.detection {
        Some(d) => d.resolve()?,
        None => base.clone(),
    };
    let subs: Vec<Option<Vec<&str>>> = match &sw.criteria_subsets {
        Some(s) => subsets(s).into_iter().map(Some).collect(),
        None => vec![None],
    };
    let scopes: Vec<Option<&str>> = match &sw.median_scope {
        Some(v) => v.iter().map(|s| Some(s.as_str())).collect(),
        None => vec![None],
    };
    // The cartesian product of the threshold grids.
    let mut grids: Vec<Vec<(String, f64)>> = vec![Vec::new()];
    for (k, g) in &sw.thresholds {
        let vals = g.values()?;
        grids = grids
            .into_iter()
            .flat_map(|combo| {
                vals.iter().map(move |v| {
                    let mut c = combo.clone();
                    c.push((k.clone(), *v));
                    c
                })
            })
            .collect();
    }
    for sub in &subs {
        for scope in &scopes {
            for combo in &grids {
                let mut c = base.clone();
                let mut label = vec![prefix.clone()];
                for (k, v) in combo {
                    c.set(&format!("{k}={v}"))?;
                    label.push(format!("{k}={v}"));
                }
                if let Some(sub) = sub {
                    criteria_off(&mut c, sub);
                    label.push(if sub.is_empty() {
                        "no-criteria".into()
                    } else {
                        sub.join("+")
                    });
                }
                if let Some(scope) = scope {
                    c.median_scope = if *scope == "layer" {
                        MedianScope::Layer
                    } else {
                        MedianScope::Position
                    };
                    label.push(format!("scope={scope}"));
                }
                out.push(Variant {
                    name: label.join(" "),
                    handlings: handlings.clone(),
                    detect: Some(c),
                    ablation: ablation.clone(),
                    orthogonalize: orth,
                    search: None,
                    tune: None,
                });
            }
        }
    }
    Ok(out)
}

/// Expands a study into its variants. `layers` is the model's layer count (ablation defaults
/// depend on it).
pub fn plan(study: &Study, layers: usize) -> Result<Plan> {
    let f = &study.file;
    let base = f.detection.resolve()?;
    let (ablation, orth) = f.ablation.resolve(layers)?;
    let mut variants = Vec::new();
    for v in &f.variants {
        let handlings = Handling::parse_list(&v.handling)?;
        let detect = match &v.detection {
            Some(d) => d.resolve()?,
            None => base.clone(),
        };
        variants.push(Variant {
            name: v.name.clone(),
            handlings,
            detect: Some(detect),
            ablation: ablation.clone(),
            orthogonalize: orth,
            search: None,
            tune: None,
        });
    }
    for sw in &f.sweeps {
        variants.extend(expand_sweep(sw, &base, &ablation, orth)?);
    }
    for t in &f.tune {
        let detect = match &t.detection {
            Some(d) => d.resolve()?,
            None => base.clone(),
        };
        variants.push(Variant {
            name: t.name.clone(),
            handlings: Handling::parse_list(&t.handling)?,
            detect: Some(detect),
            ablation: ablation.clone(),
            orthogonalize: orth,
            search: None,
            tune: Some(t.clone()),
        });
    }
    for v in &mut variants {
        v.search = f.ablation.search.clone();
    }
    // The same settings twice are one variant (the first name wins).
    let mut seen = std::collections::HashSet::new();
    let mut planned = Vec::new();
    for v in variants {
        let id = variant_id(&v);
        if seen.insert(id.clone()) {
            planned.push(PlannedVariant { id, variant: v });
        }
    }
    let replicates = if f.replicates.is_empty() {
        vec![f.seed]
    } else {
        f.replicates.clone()
    };
    Ok(Plan {
        variants: planned,
        replicates,
    })
}

/// Label of a variant's handlings, for tables.
pub fn handling_label(v: &Variant) -> String {
    direction::label_list(&v.handlings)
}
