//! What a report needs to know about a scan, computed while the scan is in memory and kept as a
//! small JSON: where the activations peak per layer, which criteria flag which dims, and how
//! many dims each threshold finds. Reports then need neither the model nor the scan.

use super::apply::{apply, DimReport};
use super::config::DetectConfig;
pub use super::config::CRITERIA;
use super::scan::Scan;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerPeak {
    /// Hidden state index (0 = embedding output).
    pub layer: u32,
    pub peak_abs: f32,
    pub peak_abs_dim: u32,
    /// Largest |a| / median(|h|) of its position.
    pub peak_ratio: f32,
    pub peak_ratio_dim: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeatCell {
    pub layer: u32,
    pub dim: u32,
    /// Largest |a| / position median at this layer and dim.
    pub peak_ratio: f32,
    /// Entries above the scan floor (prompt × position).
    pub count: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub states: usize,
    pub hidden_size: usize,
    pub floor_ratio: f32,
    /// The study's detection (whose thresholds the plots mark).
    pub base: DetectConfig,
    pub base_dims: Vec<u32>,
    pub per_layer: Vec<LayerPeak>,
    pub heat: Vec<HeatCell>,
    /// Dims flagged by each criterion alone (the four others off).
    pub single_criterion: BTreeMap<String, Vec<u32>>,
    /// "threshold (alone)" and "threshold (with the rest)" → (value, dims found): the threshold
    /// varied with the other criteria off, and with them as in `base`.
    pub sweeps: BTreeMap<String, Vec<(f64, usize)>>,
    /// Where each dim detected by any of the run's detections fired (from the first detection
    /// that found it).
    pub dims: BTreeMap<u32, DimReport>,
}

/// `base` with only `criterion` switched on.
pub fn only(base: &DetectConfig, criterion: &str) -> DetectConfig {
    let mut c = base.clone();
    // A criterion the study has off is switched on at the proposal's default.
    match criterion {
        "min_abs" => c.min_abs = c.min_abs.or(Some(100.0)),
        "median_ratio" => c.median_ratio = c.median_ratio.or(Some(1000.0)),
        "mad_ratio" => c.mad_ratio = c.mad_ratio.or(Some(1000.0)),
        "cluster" => c.max_cluster_size = c.max_cluster_size.or(Some(3)),
        _ => c.persistence = c.persistence.or(Some(0.25)),
    }
    for other in CRITERIA.iter().filter(|o| **o != criterion) {
        c.switch_off(other);
    }
    // Cluster or persistence alone bound no value: the scan floor is named as theirs.
    if !c.has_value_criterion() {
        c.floor = Some(super::config::FLOOR);
    }
    c
}

fn log_grid(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| lo * (hi / lo).powf(i as f64 / (n - 1) as f64))
        .collect()
}

/// Summarises `scan` for a report. `configs` are the run's detections (for the dims table).
pub fn summarise(scan: &Scan, base: &DetectConfig, configs: &[&DetectConfig]) -> Result<Summary> {
    let mut per_layer: BTreeMap<u32, LayerPeak> = BTreeMap::new();
    let mut cells: BTreeMap<(u32, u32), (f32, u32)> = BTreeMap::new();
    let mut dim_peak: BTreeMap<u32, f32> = BTreeMap::new();
    for e in scan.entries.iter().filter(|e| e.valid) {
        let p = per_layer.entry(e.layer).or_insert(LayerPeak {
            layer: e.layer,
            peak_abs: 0.0,
            peak_abs_dim: e.dim,
            peak_ratio: 0.0,
            peak_ratio_dim: e.dim,
        });
        if e.abs > p.peak_abs {
            p.peak_abs = e.abs;
            p.peak_abs_dim = e.dim;
        }
        if e.ratio_position > p.peak_ratio {
            p.peak_ratio = e.ratio_position;
            p.peak_ratio_dim = e.dim;
        }
        let c = cells.entry((e.layer, e.dim)).or_insert((0.0, 0));
        c.0 = c.0.max(e.ratio_position);
        c.1 += 1;
        let d = dim_peak.entry(e.dim).or_insert(0.0);
        *d = d.max(e.ratio_position);
    }
    use rayon::prelude::*;
    let found: Vec<_> = std::iter::once(base)
        .chain(configs.iter().copied())
        .collect::<Vec<_>>()
        .par_iter()
        .map(|c| apply(c, scan))
        .collect::<Result<_>>()?;
    let base_dims = found[0].dim_ids();
    let mut dims: BTreeMap<u32, DimReport> = BTreeMap::new();
    for f in found {
        for mut d in f.dims {
            // One position per distinct token is what a report shows; all of them would make
            // the summary megabytes for loose detections that flag hundreds of dims.
            let mut seen = std::collections::HashSet::new();
            d.positions.retain(|p| seen.insert(p.2.clone()));
            d.prompts.truncate(16);
            dims.entry(d.dim).or_insert(d);
        }
    }
    // The heatmap shows the dims with the largest peaks, and every detected one.
    let mut ranked: Vec<(u32, f32)> = dim_peak.into_iter().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut shown: Vec<u32> = ranked.iter().take(12).map(|x| x.0).collect();
    shown.extend(
        base_dims
            .iter()
            .filter(|d| !shown.contains(d))
            .collect::<Vec<_>>(),
    );
    // Then the other detected dims, strongest first, up to 24 rows.
    for (d, _) in &ranked {
        if shown.len() >= 24 {
            break;
        }
        if dims.contains_key(d) && !shown.contains(d) {
            shown.push(*d);
        }
    }
    let heat = cells
        .into_iter()
        .filter(|((_, d), _)| shown.contains(d))
        .map(|((layer, dim), (peak_ratio, count))| HeatCell {
            layer,
            dim,
            peak_ratio,
            count,
        })
        .collect();
    let single: BTreeMap<String, Vec<u32>> = CRITERIA
        .par_iter()
        .map(|c| Ok((c.to_string(), apply(&only(base, c), scan)?.dim_ids())))
        .collect::<Result<_>>()?;
    let floor = scan.floor.min_ratio as f64;
    // Every point of every curve (150 detections over the whole scan), run on all cores: they
    // are independent, and one after another they were most of the direction pass's tail.
    let mut points: Vec<(String, f64, DetectConfig)> = Vec::new();
    for (name, lo, hi) in [
        ("min_abs", 1.0, 1e4),
        ("median_ratio", floor, 1e5),
        ("mad_ratio", floor, 1e5),
    ] {
        // Alone, the criterion's own reach; with the rest, what the study's detection would do.
        for (tag, start) in [("alone", only(base, name)), ("with the rest", base.clone())] {
            for v in log_grid(lo, hi, 25) {
                let mut c = start.clone();
                c.set(&format!("{name}={v}"))?;
                points.push((format!("{name} ({tag})"), v, c));
            }
        }
    }
    let counts: Vec<usize> = points
        .par_iter()
        .map(|(_, _, c)| apply(c, scan).map(|d| d.dims.len()))
        .collect::<Result<_>>()?;
    let mut sweeps: BTreeMap<String, Vec<(f64, usize)>> = BTreeMap::new();
    for ((curve, v, _), n) in points.into_iter().zip(counts) {
        sweeps.entry(curve).or_default().push((v, n));
    }
    Ok(Summary {
        states: scan.num_states,
        hidden_size: scan.hidden_size,
        floor_ratio: scan.floor.min_ratio,
        base: base.clone(),
        base_dims,
        per_layer: per_layer.into_values().collect(),
        heat,
        single_criterion: single,
        sweeps,
        dims,
    })
}
