//! Applying a threshold set to a scan: a filter over its entries, then the persistence check.
//! Cheap enough for thousands of combinations.

use super::config::{ClusterTest, DetectConfig, MedianScope, PersistenceMode, Positions};
use super::scan::{Entry, Scan, Source};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One confirmed (layer, prompt, position, dim).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hit {
    pub layer: u32,
    pub prompt: u32,
    pub source: Source,
    pub position: u32,
    pub token: String,
    pub dim: u32,
    pub value: f32,
    pub abs: f32,
    pub ratio_position: f32,
    pub ratio_layer: f32,
    pub mad_z: f32,
}

/// A detected dim with where it fired.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DimReport {
    pub dim: u32,
    pub peak_abs: f32,
    pub peak_layer: u32,
    pub peak_ratio_position: f32,
    pub peak_ratio_layer: f32,
    pub layers: Vec<u32>,
    pub prompts: Vec<u32>,
    /// (prompt, position, decoded token) where it was confirmed.
    pub positions: Vec<(u32, u32, String)>,
    /// How many of those positions are padding (only scanned with `positions: all`).
    #[serde(default)]
    pub pad_positions: usize,
}

/// A strong entry that was not detected, and which criterion turned it down.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NearMiss {
    pub dim: u32,
    pub layer: u32,
    pub prompt: u32,
    pub position: u32,
    pub token: String,
    pub abs: f32,
    pub ratio_position: f32,
    pub ratio_layer: f32,
    pub mad_z: f32,
    pub rejected_by: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Detection {
    pub dims: Vec<DimReport>,
    pub hits: Vec<Hit>,
    pub near_misses: Vec<NearMiss>,
    /// Distinct (prompt, position, dim) that are candidates at ≥ 1 layer, and that are confirmed.
    pub n_candidate_ptd: usize,
    pub n_confirmed_ptd: usize,
    pub non_finite: usize,
}

impl Detection {
    /// The detected dims in ascending order.
    pub fn dim_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.dims.iter().map(|d| d.dim).collect();
        v.sort_unstable();
        v
    }
}

fn source_on(cfg: &DetectConfig, s: Source) -> bool {
    match s {
        Source::Trigger => cfg.sources.trigger.is_some(),
        Source::Good => cfg.sources.good,
        Source::Bad => cfg.sources.bad,
    }
}

/// The ratio to the median and the MAD z-score in the configured median scope.
fn scoped(cfg: &DetectConfig, e: &Entry) -> (f32, f32) {
    match cfg.median_scope {
        MedianScope::Position => (e.ratio_position, e.mad_z_position),
        MedianScope::Layer => (e.ratio_layer, e.mad_z_layer),
    }
}

/// Whether `e` passes criteria 1–4: `failures` without building the explanations, for the
/// hot loop over millions of entries.
fn passes(cfg: &DetectConfig, scan: &Scan, e: &Entry) -> bool {
    let (ratio, z) = scoped(cfg, e);
    if cfg.floor.is_some_and(|f| floor_score(e) < f)
        || cfg.min_abs.is_some_and(|t| e.abs <= t)
        || cfg.median_ratio.is_some_and(|t| ratio <= t)
        || cfg.mad_ratio.is_some_and(|t| z <= t)
    {
        return false;
    }
    if let Some(m) = cfg.max_cluster_size {
        if let Some(ps) = scan.position_stats(e.layer, e.prompt, e.position) {
            let c = &ps.cluster;
            let inside = e.deviation_rank.is_some_and(|r| r as u32 <= c.gap_index);
            if !c.is_small(m) || (cfg.cluster_test == ClusterTest::Member && !inside) {
                return false;
            }
        }
    }
    true
}

/// The largest of the four values the scan floor looks at.
fn floor_score(e: &Entry) -> f32 {
    e.ratio_position
        .max(e.ratio_layer)
        .max(e.mad_z_position)
        .max(e.mad_z_layer)
}

/// The criteria (1–4) that `e` fails; empty = a candidate.
fn failures(cfg: &DetectConfig, scan: &Scan, e: &Entry) -> Vec<String> {
    let mut why = Vec::new();
    let (ratio, z) = scoped(cfg, e);
    if let Some(f) = cfg.floor {
        if floor_score(e) < f {
            why.push(format!(
                "floor: largest ratio or MAD z-score {:.0} < {f}",
                floor_score(e)
            ));
        }
    }
    if let Some(t) = cfg.min_abs {
        if e.abs <= t {
            why.push(format!("min_abs: |a| {:.1} <= {t}", e.abs));
        }
    }
    if let Some(t) = cfg.median_ratio {
        if ratio <= t {
            why.push(format!("median_ratio: {ratio:.0}x <= {t}x"));
        }
    }
    if let Some(t) = cfg.mad_ratio {
        if z <= t {
            why.push(format!("mad_ratio: {z:.0} MADs <= {t}"));
        }
    }
    if let Some(m) = cfg.max_cluster_size {
        if let Some(ps) = scan.position_stats(e.layer, e.prompt, e.position) {
            let c = &ps.cluster;
            let inside = e.deviation_rank.is_some_and(|r| r as u32 <= c.gap_index);
            let member_needed = cfg.cluster_test == ClusterTest::Member;
            if !c.is_small(m) || (member_needed && !inside) {
                why.push(format!(
                    "cluster: largest log gap {:.2} after {} outlier(s) (needs at most {m} outliers, a gap > 1 and > the spread {:.2}{})",
                    c.max_log_gap,
                    c.gap_index + 1,
                    c.intra_spread,
                    if inside || !member_needed { "" } else { "; this dim is outside the cluster" }
                ));
            }
        }
    }
    why
}

/// Checks that the scan kept every entry these thresholds could accept. The scan keeps entries
/// whose ratio or MAD z-score (either scope) reaches its floor, or whose |a| reaches its
/// min_abs. A threshold looser than that floor would silently miss entries, and a criteria set
/// that bounds no value would be decided by the floor alone: both are refused (the floor can be
/// named as a criterion instead, `floor`).
pub fn check_floor(cfg: &DetectConfig, scan: &Scan) -> Result<()> {
    if !cfg.has_value_criterion() {
        bail!(
            "criteria {{{}}} bound no value (|a|, a ratio or a MAD z-score), so they would accept every dim; \
             switch on min_abs, median_ratio or mad_ratio, or name the scan floor as a criterion (floor={})",
            cfg.active_criteria().join(", "),
            super::config::FLOOR
        );
    }
    let f = scan.floor.min_ratio;
    for (name, t) in [
        ("median_ratio", cfg.median_ratio),
        ("mad_ratio", cfg.mad_ratio),
        ("floor", cfg.floor),
    ] {
        if let Some(t) = t {
            if t < f {
                bail!(
                    "{name} {t} is below the scan's floor ({f}): entries between them were not kept; rescan with a lower floor"
                );
            }
        }
    }
    Ok(())
}

pub fn apply(cfg: &DetectConfig, scan: &Scan) -> Result<Detection> {
    if cfg.top_k.is_none() {
        check_floor(cfg, scan)?;
    }
    let s_total = scan.num_states;
    let scoped = |e: &Entry| {
        source_on(cfg, scan.prompts[e.prompt as usize].source)
            && (cfg.positions == Positions::All || e.valid)
    };
    // Candidates: entries passing criteria 1–4, keyed by (prompt, position, dim) → layers.
    let mut cand: BTreeMap<(u32, u32, u32), BTreeSet<u32>> = BTreeMap::new();
    let mut entry_at: HashMap<(u32, u32, u32, u32), &Entry> = HashMap::new();
    let no_row_criteria = cfg.min_abs.is_none()
        && cfg.median_ratio.is_none()
        && cfg.mad_ratio.is_none()
        && cfg.max_cluster_size.is_none();
    if !(no_row_criteria && cfg.top_k.is_some()) {
        for e in scan.entries.iter().filter(|e| scoped(e)) {
            if passes(cfg, scan, e) {
                cand.entry((e.prompt, e.position, e.dim))
                    .or_default()
                    .insert(e.layer);
                entry_at.insert((e.layer, e.prompt, e.position, e.dim), e);
            }
        }
    }
    let mut confirmed = persistent(cfg, s_total, &cand);
    if let Some(frac) = cfg.min_position_fraction {
        let scanned: usize = scan
            .prompts
            .iter()
            .filter(|p| source_on(cfg, p.source))
            .map(|p| {
                if cfg.positions == Positions::All {
                    p.valid.len()
                } else {
                    p.valid.iter().filter(|v| **v).count()
                }
            })
            .sum();
        let mut per_dim: BTreeMap<u32, BTreeSet<(u32, u32)>> = BTreeMap::new();
        for (p, t, d) in confirmed.keys() {
            per_dim.entry(*d).or_default().insert((*p, *t));
        }
        confirmed.retain(|k, _| (per_dim[&k.2].len() as f32) >= frac * scanned as f32);
    }
    let mut dims: BTreeSet<u32> = confirmed.keys().map(|k| k.2).collect();
    if let Some(k) = cfg.top_k {
        let peaks = if cfg.positions == Positions::All {
            &scan.dim_peak_all
        } else {
            &scan.dim_peak_valid
        };
        let mut pool: Vec<u32> = if no_row_criteria {
            (0..peaks.len() as u32).collect()
        } else {
            dims.iter().copied().collect()
        };
        pool.sort_by(|a, b| {
            peaks[*b as usize]
                .total_cmp(&peaks[*a as usize])
                .then(a.cmp(b))
        });
        pool.truncate(k);
        dims = pool.into_iter().collect();
    }

    let mut hits = Vec::new();
    for ((p, t, d), layers) in &confirmed {
        if !dims.contains(d) {
            continue;
        }
        for l in layers {
            let e = entry_at[&(*l, *p, *t, *d)];
            hits.push(hit(cfg, scan, e));
        }
    }
    let reports = dim_reports(cfg, scan, &dims, &hits);

    let near_misses = near_misses(cfg, scan, &dims, &cand, 5);
    Ok(Detection {
        n_candidate_ptd: cand.len(),
        n_confirmed_ptd: confirmed.keys().filter(|k| dims.contains(&k.2)).count(),
        dims: reports,
        hits,
        near_misses,
        non_finite: scan.non_finite.len(),
    })
}

/// Criterion 5: the candidates that persist over enough hidden states, with the layers at which
/// each is confirmed.
fn persistent(
    cfg: &DetectConfig,
    s_total: usize,
    cand: &BTreeMap<(u32, u32, u32), BTreeSet<u32>>,
) -> BTreeMap<(u32, u32, u32), Vec<u32>> {
    let mut confirmed: BTreeMap<(u32, u32, u32), Vec<u32>> = BTreeMap::new();
    match (cfg.persistence, cfg.persistence_mode) {
        (None, _) => {
            for (k, layers) in cand {
                confirmed.insert(*k, layers.iter().copied().collect());
            }
        }
        (Some(f), PersistenceMode::Consecutive) => {
            let n = (s_total as f32 * f).floor() as u32;
            for (k, layers) in cand {
                let ok: Vec<u32> = layers
                    .iter()
                    .copied()
                    .filter(|&l| (l..=l + n).all(|x| layers.contains(&x)))
                    .collect();
                if !ok.is_empty() {
                    confirmed.insert(*k, ok);
                }
            }
        }
        (Some(f), PersistenceMode::Total) => {
            let need = (s_total as f32 * f).ceil() as usize;
            for (k, layers) in cand {
                if layers.len() >= need.max(1) {
                    confirmed.insert(*k, layers.iter().copied().collect());
                }
            }
        }
        (Some(f), PersistenceMode::DimLayers) => {
            let need = (s_total as f32 * f).ceil() as usize;
            let mut per_dim: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
            for ((_, _, d), layers) in cand {
                per_dim
                    .entry(*d)
                    .or_default()
                    .extend(layers.iter().copied());
            }
            for (k, layers) in cand {
                if per_dim[&k.2].len() >= need.max(1) {
                    confirmed.insert(*k, layers.iter().copied().collect());
                }
            }
        }
    }
    confirmed
}

/// Each detected dim's report: its peak, where it fired, how many of its positions were padding;
/// strongest first.
fn dim_reports(
    cfg: &DetectConfig,
    scan: &Scan,
    dims: &BTreeSet<u32>,
    hits: &[Hit],
) -> Vec<DimReport> {
    let scoped = |e: &Entry| {
        source_on(cfg, scan.prompts[e.prompt as usize].source)
            && (cfg.positions == Positions::All || e.valid)
    };
    let mut reports = Vec::new();
    for &d in dims {
        let mine: Vec<&Hit> = hits.iter().filter(|h| h.dim == d).collect();
        let peak = mine.iter().max_by(|a, b| a.abs.total_cmp(&b.abs));
        let (peak_abs, peak_layer, rp, rl) = match peak {
            Some(h) => (h.abs, h.layer, h.ratio_position, h.ratio_layer),
            None => {
                // top-k without row criteria: describe the dim by its strongest scanned entry.
                let best = scan
                    .entries
                    .iter()
                    .filter(|e| e.dim == d && scoped(e))
                    .max_by(|a, b| a.abs.total_cmp(&b.abs));
                let peaks = if cfg.positions == Positions::All {
                    &scan.dim_peak_all
                } else {
                    &scan.dim_peak_valid
                };
                best.map_or((peaks[d as usize], 0, 0.0, 0.0), |e| {
                    (e.abs, e.layer, e.ratio_position, e.ratio_layer)
                })
            }
        };
        let layers: BTreeSet<u32> = mine.iter().map(|h| h.layer).collect();
        let prompts: BTreeSet<u32> = mine.iter().map(|h| h.prompt).collect();
        let positions: BTreeSet<(u32, u32)> = mine.iter().map(|h| (h.prompt, h.position)).collect();
        let pad_positions = positions
            .iter()
            .filter(|(p, t)| !scan.prompts[*p as usize].valid[*t as usize])
            .count();
        reports.push(DimReport {
            pad_positions,
            dim: d,
            peak_abs,
            peak_layer,
            peak_ratio_position: rp,
            peak_ratio_layer: rl,
            layers: layers.into_iter().collect(),
            prompts: prompts.into_iter().collect(),
            positions: positions
                .into_iter()
                .map(|(p, t)| (p, t, scan.token(p, t).to_string()))
                .collect(),
        });
    }
    reports.sort_by(|a, b| b.peak_abs.total_cmp(&a.peak_abs));
    reports
}

fn hit(cfg: &DetectConfig, scan: &Scan, e: &Entry) -> Hit {
    Hit {
        layer: e.layer,
        prompt: e.prompt,
        source: scan.prompts[e.prompt as usize].source,
        position: e.position,
        token: scan.token(e.prompt, e.position).to_string(),
        dim: e.dim,
        value: e.value,
        abs: e.abs,
        ratio_position: e.ratio_position,
        ratio_layer: e.ratio_layer,
        mad_z: scoped(cfg, e).1,
    }
}

/// The strongest undetected entries (one per dim), each with the criteria that rejected it.
fn near_misses(
    cfg: &DetectConfig,
    scan: &Scan,
    detected: &BTreeSet<u32>,
    cand: &BTreeMap<(u32, u32, u32), BTreeSet<u32>>,
    n: usize,
) -> Vec<NearMiss> {
    let mut best: BTreeMap<u32, &Entry> = BTreeMap::new();
    for e in scan.entries.iter().filter(|e| !detected.contains(&e.dim)) {
        if !source_on(cfg, scan.prompts[e.prompt as usize].source) {
            continue;
        }
        let cur = best.entry(e.dim).or_insert(e);
        if e.abs > cur.abs {
            *cur = e;
        }
    }
    let mut v: Vec<&Entry> = best.into_values().collect();
    v.sort_by(|a, b| b.abs.total_cmp(&a.abs));
    v.into_iter()
        .take(n)
        .map(|e| {
            let mut why = failures(cfg, scan, e);
            if cfg.positions == Positions::Valid && !e.valid {
                why.push("positions: padding is not scanned".into());
            }
            if why.is_empty() {
                let layers = cand.get(&(e.prompt, e.position, e.dim)).map_or(0, |l| l.len());
                why.push(match cfg.persistence {
                    Some(f) => format!(
                        "persistence: a candidate in {layers} of {} hidden states ({:?}, needs {f} of them)",
                        scan.num_states, cfg.persistence_mode
                    ),
                    None => "top_k: outranked by other dims".into(),
                });
            }
            NearMiss {
                dim: e.dim,
                layer: e.layer,
                prompt: e.prompt,
                position: e.position,
                token: scan.token(e.prompt, e.position).to_string(),
                abs: e.abs,
                ratio_position: e.ratio_position,
                ratio_layer: e.ratio_layer,
                mad_z: scoped(cfg, e).1,
                rejected_by: why,
            }
        })
        .collect()
}
