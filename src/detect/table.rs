//! A scan as a polars DataFrame: one row per (layer, prompt, position, dim) above the floor, with
//! every criterion's value, saved to parquet so sweeps and reports need no model.

use super::scan::Scan;
use anyhow::{anyhow, Context, Result};
use polars::prelude::*;
use std::collections::HashSet;
use std::path::Path;

/// The candidate-score table. `run_length` counts the consecutive hidden states, from this one
/// on, in which the same (prompt, position, dim) is in the table.
pub fn candidate_table(scan: &Scan) -> Result<DataFrame> {
    let present: HashSet<(u32, u32, u32, u32)> = scan
        .entries
        .iter()
        .map(|e| (e.layer, e.prompt, e.position, e.dim))
        .collect();
    let n = scan.entries.len();
    let mut layer = Vec::with_capacity(n);
    let mut prompt = Vec::with_capacity(n);
    let mut source = Vec::with_capacity(n);
    let mut position = Vec::with_capacity(n);
    let mut valid = Vec::with_capacity(n);
    let mut token = Vec::with_capacity(n);
    let mut dim = Vec::with_capacity(n);
    let mut value = Vec::with_capacity(n);
    let mut abs = Vec::with_capacity(n);
    let mut median_position = Vec::with_capacity(n);
    let mut ratio_position = Vec::with_capacity(n);
    let mut median_layer = Vec::with_capacity(n);
    let mut ratio_layer = Vec::with_capacity(n);
    let mut mad_z_position = Vec::with_capacity(n);
    let mut mad_z_layer = Vec::with_capacity(n);
    let mut deviation_rank: Vec<Option<u32>> = Vec::with_capacity(n);
    let mut cluster_gap_index = Vec::with_capacity(n);
    let mut cluster_max_log_gap = Vec::with_capacity(n);
    let mut cluster_intra_spread = Vec::with_capacity(n);
    let mut run_length = Vec::with_capacity(n);
    for e in &scan.entries {
        let ps = scan
            .position_stats(e.layer, e.prompt, e.position)
            .context("scan is inconsistent")?;
        let ls = scan
            .layer_stats(e.layer, e.prompt)
            .context("scan is inconsistent")?;
        layer.push(e.layer);
        prompt.push(e.prompt);
        source.push(scan.prompts[e.prompt as usize].source.name());
        position.push(e.position);
        valid.push(e.valid);
        token.push(scan.token(e.prompt, e.position).to_string());
        dim.push(e.dim);
        value.push(e.value);
        abs.push(e.abs);
        median_position.push(ps.median_abs);
        ratio_position.push(e.ratio_position);
        median_layer.push(ls.median_abs);
        ratio_layer.push(e.ratio_layer);
        mad_z_position.push(e.mad_z_position);
        mad_z_layer.push(e.mad_z_layer);
        deviation_rank.push(e.deviation_rank.map(u32::from));
        cluster_gap_index.push(ps.cluster.gap_index);
        cluster_max_log_gap.push(ps.cluster.max_log_gap);
        cluster_intra_spread.push(ps.cluster.intra_spread);
        let mut run = 0u32;
        while present.contains(&(e.layer + run, e.prompt, e.position, e.dim)) {
            run += 1;
        }
        run_length.push(run);
    }
    let cols: Vec<Column> = vec![
        Column::new("layer".into(), layer),
        Column::new("prompt".into(), prompt),
        Column::new("source".into(), source),
        Column::new("position".into(), position),
        Column::new("valid".into(), valid),
        Column::new("token".into(), token),
        Column::new("dim".into(), dim),
        Column::new("value".into(), value),
        Column::new("abs".into(), abs),
        Column::new("median_position".into(), median_position),
        Column::new("ratio_position".into(), ratio_position),
        Column::new("median_layer".into(), median_layer),
        Column::new("ratio_layer".into(), ratio_layer),
        Column::new("mad_z_position".into(), mad_z_position),
        Column::new("mad_z_layer".into(), mad_z_layer),
        Column::new("deviation_rank".into(), deviation_rank),
        Column::new("cluster_gap_index".into(), cluster_gap_index),
        Column::new("cluster_max_log_gap".into(), cluster_max_log_gap),
        Column::new("cluster_intra_spread".into(), cluster_intra_spread),
        Column::new("run_length".into(), run_length),
    ];
    Ok(DataFrame::new(n, cols)?)
}

/// Writes `df` to `path` atomically (temporary file, then rename).
pub fn write_parquet(df: &mut DataFrame, path: &Path) -> Result<()> {
    crate::fs::write_atomic_with(path, |f| {
        ParquetWriter::new(f)
            .finish(df)
            .map_err(|e| anyhow!("{e}"))?;
        Ok(())
    })
}

pub fn read_parquet(path: &Path) -> Result<DataFrame> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    ParquetReader::new(f)
        .finish()
        .map_err(|e| anyhow!("{} is not a readable parquet file: {e}", path.display()))
}
