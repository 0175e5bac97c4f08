//! Command implementations that are more than a few lines; `main.rs` only parses arguments.

use crate::detect::{self, config::DetectConfig, scan::Source};
use crate::model::{self, HiddenConvention};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

pub struct DetectArgs {
    pub model: String,
    pub prompts: Vec<String>,
    pub good: Option<PathBuf>,
    pub bad: Option<PathBuf>,
    pub preset: String,
    pub overrides: Vec<String>,
    pub system: String,
    pub hidden: String,
    pub batch_size: usize,
    pub table: Option<PathBuf>,
    pub json: bool,
}

pub fn parse_convention(s: &str) -> Result<HiddenConvention> {
    match s {
        "transformers" => Ok(HiddenConvention::Transformers),
        "residual" => Ok(HiddenConvention::Residual),
        other => bail!("--hidden {other}: expected 'transformers' or 'residual'"),
    }
}

/// One prompt per non-empty line.
pub fn read_prompt_lines(path: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read prompt file {}", path.display()))?;
    let v: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if v.is_empty() {
        bail!(
            "{} holds no prompts (one per line expected)",
            path.display()
        );
    }
    Ok(v)
}

pub fn detect(a: DetectArgs) -> Result<()> {
    let mut cfg: DetectConfig = detect::preset(&a.preset)?;
    for o in &a.overrides {
        cfg.set(o)?;
    }
    let convention = parse_convention(&a.hidden)?;
    let mut prompts: Vec<(Source, String)> = Vec::new();
    if a.prompts.is_empty() {
        if let Some(t) = &cfg.sources.trigger {
            prompts.push((Source::Trigger, t.clone()));
        }
    } else {
        for p in &a.prompts {
            if p.trim().is_empty() {
                bail!("--prompt is empty; give it some text");
            }
            prompts.push((Source::Trigger, p.clone()));
        }
        cfg.sources.trigger = Some(a.prompts[0].clone());
    }
    if let Some(p) = &a.good {
        prompts.extend(read_prompt_lines(p)?.into_iter().map(|t| (Source::Good, t)));
    }
    if let Some(p) = &a.bad {
        prompts.extend(read_prompt_lines(p)?.into_iter().map(|t| (Source::Bad, t)));
    }
    if prompts.is_empty() {
        bail!("nothing to scan: the preset has no trigger prompt; pass --prompt, --good or --bad");
    }
    let lm = model::load(&a.model)?;
    let system = if a.system.is_empty() {
        None
    } else {
        Some(a.system.as_str())
    };
    let pb = indicatif::ProgressBar::new(prompts.len() as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "scanning hidden states [{bar:30}] {pos}/{len} prompts eta {eta}",
        )
        .expect("valid template"),
    );
    let floor = detect::floor_for(&cfg);
    let mut scan: Option<detect::Scan> = None;
    // Scan batch by batch so the hidden states of a large prompt set never sit in memory at once.
    for chunk in prompts.chunks(a.batch_size.max(1) * 4) {
        let states = detect::collect_states(&lm, chunk, system, convention, a.batch_size, |n| {
            pb.inc(n as u64)
        })?;
        let part = detect::scan(&states, cfg.median_kind, floor);
        match &mut scan {
            None => scan = Some(part),
            Some(s) => s.merge(part),
        }
    }
    pb.finish_and_clear();
    let scan = scan.expect("at least one prompt");
    if let Some(path) = &a.table {
        let mut df = detect::table::candidate_table(&scan)?;
        detect::table::write_parquet(&mut df, path)?;
        eprintln!("wrote {} candidate rows to {}", df.height(), path.display());
    }
    let det = detect::apply(&cfg, &scan)?;
    if a.json {
        let v = serde_json::json!({
            "model": a.model,
            "preset": a.preset,
            "config": cfg,
            "dims": det.dims,
            "hits": det.hits,
            "near_misses": det.near_misses,
            "non_finite": det.non_finite,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_detection(&a, &cfg, &scan, &det);
    Ok(())
}

fn print_detection(
    a: &DetectArgs,
    cfg: &DetectConfig,
    scan: &detect::Scan,
    det: &detect::Detection,
) {
    println!(
        "model {} | preset {} | criteria: {} | median scope {:?} | {} prompt(s), {} hidden states",
        a.model,
        a.preset,
        cfg.active_criteria().join(", "),
        cfg.median_scope,
        scan.prompts.len(),
        scan.num_states
    );
    if det.non_finite > 0 {
        println!(
            "warning: {} NaN or infinite values in the hidden states (never counted as detections)",
            det.non_finite
        );
    }
    if det.dims.is_empty() {
        println!("no massive dims detected.");
    } else {
        println!(
            "detected dims: {:?}",
            det.dims.iter().map(|d| d.dim).collect::<Vec<_>>()
        );
        for d in &det.dims {
            let toks: Vec<String> = d
                .positions
                .iter()
                .take(6)
                .map(|(p, t, tok)| format!("prompt {p} pos {t} {tok:?}"))
                .collect();
            println!(
                "  dim {:>5}: peak |a| {:.1} at layer {} ({:.0}x position median, {:.0}x layer median); layers {}; {}{}",
                d.dim,
                d.peak_abs,
                d.peak_layer,
                d.peak_ratio_position,
                d.peak_ratio_layer,
                ranges(&d.layers),
                toks.join(", "),
                if d.positions.len() > 6 { format!(" … ({} positions)", d.positions.len()) } else { String::new() }
            );
        }
    }
    if !det.near_misses.is_empty() {
        println!("strongest near-misses:");
        for m in &det.near_misses {
            println!(
                "  dim {:>5}: |a| {:.1} at layer {} prompt {} pos {} {:?} ({:.0}x position median, {:.0}x layer median) — rejected by {}",
                m.dim, m.abs, m.layer, m.prompt, m.position, m.token, m.ratio_position, m.ratio_layer,
                m.rejected_by.join("; ")
            );
        }
    }
}

/// "12-21, 25" from a sorted list.
pub fn ranges(v: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}-{}", v[i], v[j])
        });
        i = j + 1;
    }
    out.join(", ")
}
