//! `outlierlab detect`: the dims a detection preset flags on a few prompts, with provenance.

use crate::detect::{self, config::DetectConfig, scan::Source};
use crate::model::chat::DEFAULT_SYSTEM_PROMPT;
use crate::model::{self, HiddenConvention, Precision};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// Find massive activations: the dims that a detection preset flags, with where they fired.
///
/// Scans the hidden states of the trigger prompt (and of --good/--bad prompt files) at every
/// layer and position, applies the preset's criteria and prints the detected dims with their
/// provenance. When nothing is found it prints the strongest near-misses and the criterion
/// that rejected each.
///
/// Criteria (each off when unset): min_abs (|a| > x), median_ratio (|a| > x times the median
/// |h|), mad_ratio (| |a| - median | > x times 1.4826 MAD), max_cluster_size (a belongs to a
/// cluster of at most x top outliers), persistence (fraction of hidden states). Choices:
/// median_scope position|layer, median_kind lower|average, positions valid|all,
/// persistence_mode consecutive|total|dim-layers, cluster_test position|member,
/// min_position_fraction, top_k.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// Scan this prompt instead of the preset's trigger prompt (repeatable).
    #[arg(long = "prompt")]
    pub prompts: Vec<String>,
    /// Harmless prompts to scan too, one per line.
    #[arg(long)]
    pub good: Option<PathBuf>,
    /// Harmful prompts to scan too, one per line.
    #[arg(long)]
    pub bad: Option<PathBuf>,
    /// A prompt set to scan too: a built-in name (`outlierlab datasets`) or a file, optionally
    /// with a count, e.g. advbench:64. Harmful sets scan as bad prompts, others as good.
    #[arg(long)]
    pub dataset: Vec<String>,
    /// pr154, pr154-described, sun2024, median-only, llm-int8, top-k.
    #[arg(long, default_value = "pr154")]
    pub preset: String,
    /// Override a setting, e.g. --set median_ratio=400 --set persistence=none.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    #[arg(long, default_value = DEFAULT_SYSTEM_PROMPT)]
    pub system: String,
    /// Hidden-state convention: transformers (last state after the final norm, as PR #154)
    /// or residual.
    #[arg(long, default_value = "transformers")]
    pub hidden: String,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Save the candidate-score table (parquet).
    #[arg(long)]
    pub table: Option<PathBuf>,
    /// Print {"dims": [...], "hits": [...], "near_misses": [...]} as JSON.
    #[arg(long)]
    pub json: bool,
    /// Raw text (BOS + prompt) instead of chat turns: for base models such as gemma3-270m,
    /// which have no chat template (the system prompt is then not used).
    #[arg(long)]
    pub raw: bool,
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

pub fn run(a: Args, precision: Precision) -> Result<()> {
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
    for spec in &a.dataset {
        let set = crate::detect::validate::CorpusSet::parse(spec);
        let source = match crate::datasets::manifest(&set.name).map(|m| m.kind) {
            Some(crate::datasets::Kind::Harmful) => Source::Bad,
            _ => Source::Good,
        };
        prompts.extend(set.prompts()?.into_iter().map(|t| (source, t)));
    }
    if prompts.is_empty() {
        bail!("nothing to scan: the preset has no trigger prompt; pass --prompt, --dataset, --good or --bad");
    }
    let mut lm = model::load_with(&a.model, precision)?;
    lm.raw = a.raw;
    let system = if a.system.is_empty() {
        None
    } else {
        Some(a.system.as_str())
    };
    let pb = crate::util::progress_bar(prompts.len() as u64, "scanning hidden states");
    let floor = detect::floor_for(&cfg);
    let mut scan: Option<detect::Scan> = None;
    // Scan batch by batch so the hidden states of a large prompt set never sit in memory at once.
    for chunk in prompts.chunks(a.batch_size.max(1) * 4) {
        let states = detect::collect_states(
            &lm,
            chunk,
            system,
            convention,
            a.batch_size,
            cfg.pad_rows,
            |n| pb.inc(n as u64),
        )?;
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

fn print_detection(a: &Args, cfg: &DetectConfig, scan: &detect::Scan, det: &detect::Detection) {
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
            let pads = if d.pad_positions > 0 {
                format!(
                    "; {} of its {} positions are PADDING (pad rows computed as {:?})",
                    d.pad_positions,
                    d.positions.len(),
                    cfg.pad_rows
                )
            } else {
                String::new()
            };
            println!(
                "  dim {:>5}: peak |a| {:.1} at layer {} ({:.0}x position median, {:.0}x layer median); layers {}; {}{}{pads}",
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
