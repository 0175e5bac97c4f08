//! Command implementations that are more than a few lines; `main.rs` only parses arguments.

use crate::detect::{self, config::DetectConfig, scan::Source};
use crate::model::{self, HiddenConvention};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct DetectArgs {
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
    #[arg(long, default_value = DEFAULT_SYSTEM_PROMPT_STR)]
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
    let mut lm = model::load(&a.model)?;
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

/// The arguments `abliterate` and `export` share.
#[derive(Debug, Clone, clap::Args)]
pub struct VariantArgs {
    /// Model alias, path, or hf:ORG/NAME[@REVISION].
    #[arg(long, default_value = "qwen2.5-coder-0.5b-instruct")]
    pub model: String,
    /// How massive activations are handled, `+`-joined: none, winsorize:Q, winsorize-global:Q,
    /// zero-residual-dims, protect-output-rows, random-dims[:SEED], random-rotation:Q[:SEED].
    #[arg(long, default_value = "none")]
    pub handling: String,
    /// Detection preset for handlings that need detected dims.
    #[arg(long, default_value = "pr154")]
    pub detect_preset: String,
    /// Detection overrides, e.g. --set median_ratio=400.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub detect_set: Vec<String>,
    /// Harmless prompt set (built-in name or file).
    #[arg(long, default_value = "harmless-outlierlab")]
    pub good: String,
    /// Harmful prompt set (built-in name or file).
    #[arg(long, default_value = "advbench")]
    pub bad: String,
    /// Direction prompts per side (the first N of each set).
    #[arg(long, default_value_t = 128)]
    pub direction_prompts: usize,
    /// Evaluation prompts per side (the N after the direction prompts: disjoint by construction).
    #[arg(long, default_value_t = 100)]
    pub eval_prompts: usize,
    /// A float between layers (0-based; heretic's direction_index), or "per-layer".
    #[arg(long)]
    pub direction_index: Option<String>,
    #[arg(long)]
    pub attn_max_weight: Option<f64>,
    #[arg(long)]
    pub attn_max_weight_position: Option<f64>,
    #[arg(long)]
    pub attn_min_weight: Option<f64>,
    #[arg(long)]
    pub attn_min_weight_distance: Option<f64>,
    #[arg(long)]
    pub mlp_max_weight: Option<f64>,
    #[arg(long)]
    pub mlp_max_weight_position: Option<f64>,
    #[arg(long)]
    pub mlp_min_weight: Option<f64>,
    #[arg(long)]
    pub mlp_min_weight_distance: Option<f64>,
    /// none, pre, full (renormalises every row exactly) or full-lowrank:R (heretic's default,
    /// R = 3: the exact change of full stored as a rank-R approximation, as heretic does).
    #[arg(long, default_value = "full-lowrank:3")]
    pub row_norm: String,
    /// Do not orthogonalise the refusal direction against the harmless mean.
    #[arg(long)]
    pub no_orthogonalize: bool,
    #[arg(long, default_value = DEFAULT_SYSTEM_PROMPT_STR)]
    pub system: String,
    /// Longest reply to a harmful prompt, in tokens (heretic's max_response_length).
    #[arg(long, default_value_t = 100)]
    pub max_response_tokens: usize,
    /// Tokens of each harmless reply checked for over-refusal (0 = skip).
    #[arg(long, default_value_t = 24)]
    pub over_refusal_tokens: usize,
    /// heretic's refusal markers: heretic-master, heretic-1.4, heretic-1.3 (32 markers, before
    /// "disclaimer"), or a file with one marker per line.
    #[arg(long, default_value = "heretic-master")]
    pub markers: String,
    /// Prompts per batch (decoding gets faster with larger batches).
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
}

pub const DEFAULT_SYSTEM_PROMPT_STR: &str = crate::model::chat::DEFAULT_SYSTEM_PROMPT;

impl VariantArgs {
    pub fn variant(&self, lm: &crate::model::LoadedModel) -> Result<crate::pipeline::Variant> {
        use crate::ablate::RowNorm;
        let handlings = crate::direction::Handling::parse_list(&self.handling)?;
        let mut detect_cfg = detect::preset(&self.detect_preset)?;
        for s in &self.detect_set {
            detect_cfg.set(s)?;
        }
        let mut ab = crate::pipeline::default_ablation(lm);
        match self.direction_index.as_deref() {
            None => {}
            Some("per-layer") => ab.direction_index = None,
            Some(x) => {
                ab.direction_index =
                    Some(x.parse().with_context(|| {
                        format!("--direction-index {x}: a number or 'per-layer'")
                    })?)
            }
        }
        let set = |dst: &mut f64, v: Option<f64>| {
            if let Some(v) = v {
                *dst = v;
            }
        };
        set(&mut ab.attn.max_weight, self.attn_max_weight);
        set(
            &mut ab.attn.max_weight_position,
            self.attn_max_weight_position,
        );
        set(&mut ab.attn.min_weight, self.attn_min_weight);
        set(
            &mut ab.attn.min_weight_distance,
            self.attn_min_weight_distance,
        );
        set(&mut ab.mlp.max_weight, self.mlp_max_weight);
        set(
            &mut ab.mlp.max_weight_position,
            self.mlp_max_weight_position,
        );
        set(&mut ab.mlp.min_weight, self.mlp_min_weight);
        set(
            &mut ab.mlp.min_weight_distance,
            self.mlp_min_weight_distance,
        );
        ab.row_norm =
            RowNorm::parse(&self.row_norm).map_err(|e| anyhow::anyhow!("--row-norm: {e}"))?;
        Ok(crate::pipeline::Variant {
            name: crate::direction::label_list(&handlings),
            handlings,
            detect: Some(detect_cfg),
            ablation: ab,
            orthogonalize: !self.no_orthogonalize,
            search: None,
            tune: None,
            dims: None,
            null_draw_of: None,
        })
    }
}

/// Direction and evaluation prompts, disjoint by construction and checked.
pub struct PromptSplit {
    pub good_dir: Vec<String>,
    pub bad_dir: Vec<String>,
    pub good_eval: Vec<String>,
    pub bad_eval: Vec<String>,
}

pub fn split_prompts(good: &str, bad: &str, n_dir: usize, n_eval: usize) -> Result<PromptSplit> {
    let g = crate::datasets::load(good)?;
    let b = crate::datasets::load(bad)?;
    let take = |v: &[String], n: usize, off: usize, what: &str| {
        crate::datasets::take(v, n, off, None).with_context(|| format!("{what} prompts"))
    };
    let s = PromptSplit {
        good_dir: take(&g, n_dir, 0, "harmless direction")?,
        bad_dir: take(&b, n_dir, 0, "harmful direction")?,
        good_eval: take(&g, n_eval, n_dir, "harmless evaluation")?,
        bad_eval: take(&b, n_eval, n_dir, "harmful evaluation")?,
    };
    for (dir, eval, what) in [
        (&s.good_dir, &s.good_eval, "harmless"),
        (&s.bad_dir, &s.bad_eval, "harmful"),
    ] {
        let set: std::collections::HashSet<&String> = dir.iter().collect();
        if let Some(p) = eval.iter().find(|p| set.contains(p)) {
            bail!("{what} direction and evaluation prompts overlap (e.g. {p:?}); the set holds duplicates, use another offset or set");
        }
    }
    Ok(s)
}

use crate::util::progress_bar as bar;

fn pct(r: &crate::stats::Rate) -> String {
    format!(
        "{}/{} {:>5.1}% [{:.1}%, {:.1}%]",
        r.k,
        r.n,
        100.0 * r.rate,
        100.0 * r.lo,
        100.0 * r.hi
    )
}

/// One pass over the direction prompts: residuals, and the detection scan when the variant's
/// handling needs detected dims.
fn direction_pass(
    a: &VariantArgs,
    lm: &model::LoadedModel,
    split: &PromptSplit,
    v: &crate::pipeline::Variant,
) -> Result<crate::pipeline::DirectionData> {
    let system = (!a.system.is_empty()).then_some(a.system.as_str());
    let cfg = v.detect.clone().unwrap_or_default();
    let scan = v
        .needs_dims()
        .then(|| detect::ScanSettings::for_config(&cfg));
    let trigger = cfg.sources.trigger.clone().filter(|_| scan.is_some());
    let n = split.good_dir.len() + split.bad_dir.len() + usize::from(trigger.is_some());
    let pb = bar(n as u64, "direction prompts");
    let data = crate::pipeline::direction_data(
        lm,
        &split.good_dir,
        &split.bad_dir,
        trigger.as_deref(),
        system,
        HiddenConvention::Transformers,
        scan,
        a.batch_size,
        |n| pb.inc(n as u64),
    )?;
    pb.finish_and_clear();
    Ok(data)
}

pub fn abliterate(a: &VariantArgs, json: bool, compare_none: bool) -> Result<()> {
    use crate::evaluate::compare::{self, StatsSettings};
    use crate::evaluate::{EvalOptions, Evaluator};
    use crate::pipeline as variant;
    let split = split_prompts(&a.good, &a.bad, a.direction_prompts, a.eval_prompts)?;
    let mut lm = model::load(&a.model)?;
    let v = a.variant(&lm)?;
    let system = if a.system.is_empty() {
        None
    } else {
        Some(a.system.as_str())
    };
    let opts = EvalOptions {
        batch_size: a.batch_size,
        max_response_tokens: a.max_response_tokens,
        over_refusal_tokens: a.over_refusal_tokens,
        markers: crate::evaluate::MarkerList::resolve(&a.markers)?,
        ..EvalOptions::default()
    };

    let pb = bar((split.good_eval.len()) as u64, "reference (unedited)");
    let ev = Evaluator::new(&lm, &split.good_eval, &split.bad_eval, system, opts)?;
    pb.finish_and_clear();
    let score_bar = |name: &str, ev: &Evaluator| bar(ev.work(), name);
    let pb = score_bar("scoring unedited", &ev);
    let base = ev.score(&lm.model, &lm.tokenizer, |_, n| pb.inc(n as u64))?;
    pb.finish_and_clear();

    let data = direction_pass(a, &lm, &split, &v)?;

    let mut rows: Vec<(String, crate::evaluate::Outcome, Vec<u32>)> =
        vec![("unedited".into(), base, vec![])];
    let mut variants = vec![v.clone()];
    if compare_none && !v.handlings.is_empty() {
        variants.insert(
            0,
            crate::pipeline::Variant {
                name: "none".into(),
                handlings: vec![],
                ..v.clone()
            },
        );
    }
    for var in &variants {
        let prep = variant::prepare(var, &data)?;
        let pb = score_bar(&format!("scoring {}", var.name), &ev);
        let out = variant::score(&mut lm, &ev, var, &prep, |_, n| pb.inc(n as u64))?;
        pb.finish_and_clear();
        eprintln!(
            "scored {} in {:.0} s: refusals {}, KL {:.4}",
            var.name,
            out.seconds,
            pct(&out.refusal_rate()),
            out.kl_mean()
        );
        rows.push((var.name.clone(), out, prep.dims));
    }
    // The family here: every variant against the unedited model and against `none`.
    let st = StatsSettings {
        references: vec!["unedited".into(), "none".into()],
        ..StatsSettings::default()
    };
    // Rows: the unedited model (a reference by name), then each variant.
    let items: Vec<_> = rows
        .iter()
        .enumerate()
        .map(|(i, (name, o, _))| {
            let hs = if i == 0 {
                vec![]
            } else {
                variants[i - 1].handlings.clone()
            };
            (name.clone(), hs, 0u64, format!("row{i}"), o)
        })
        .collect();
    let fam = compare::family(
        compare::arms(&items, &st),
        &st,
        &compare::Units::SharedByPosition,
    );
    if json {
        let v = serde_json::json!({
            "model": a.model,
            "variant": v,
            "results": rows.iter().map(|(n, o, dims)| serde_json::json!({
                "name": n, "dims": dims, "refusals": o.refusal_rate(), "kl_mean": o.kl_mean(),
                "over_refusals": o.over_refusal_rate(), "seconds": o.seconds,
                "per_prompt": {"refused": o.refused, "replies": o.replies, "kl": o.kl, "over_refused": o.over_refused},
            })).collect::<Vec<_>>(),
            "comparisons": fam.comparisons.iter().map(|c| serde_json::json!({
                "variant": fam.arms[c.variant].names, "reference": fam.arms[c.reference].names,
                "refusals": c.refusals, "kl": c.kl, "discordant": c.mcnemar,
            })).collect::<Vec<_>>(),
            "family": {"tests": fam.tests, "correction": st.correction, "alpha": st.alpha, "sign_flip_resamples": fam.reps},
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "model {} | {} direction + {} evaluation prompts per side | direction index {:?}",
        a.model,
        split.good_dir.len(),
        split.good_eval.len(),
        v.ablation.direction_index
    );
    println!(
        "{:<28} {:<30} {:<22} {:<30} dims",
        "variant", "refusals [95% Wilson]", "KL mean", "over-refusals"
    );
    for (name, o, dims) in &rows {
        println!(
            "{:<28} {:<30} {:<22} {:<30} {:?}",
            name,
            pct(&o.refusal_rate()),
            format!("{:.4}", o.kl_mean()),
            if o.over_refused.is_empty() {
                "-".into()
            } else {
                pct(&o.over_refusal_rate())
            },
            dims
        );
    }
    println!(
        "comparisons ({} tests, {} at alpha {}; intervals at each test's adjusted level; lower is better):",
        fam.tests,
        st.correction.describe(),
        st.alpha
    );
    for c in &fam.comparisons {
        let (r, k) = (&c.refusals, &c.kl);
        println!(
            "  {} vs {}: refusals {:+.1} pts [{:+.1}, {:+.1}] (only variant {}, only reference {}; McNemar p {:.3}, adj {:.3}) -> {}; KL {:+.4} [{:+.4}, {:+.4}] (sign-flip p {:.2e}, adj {:.2e}) -> {}",
            fam.arms[c.variant].label(), fam.arms[c.reference].label(),
            100.0 * r.estimate, 100.0 * r.lo, 100.0 * r.hi, c.mcnemar.b, c.mcnemar.c, r.p, r.p_adjusted, r.verdict.label(),
            k.estimate, k.lo, k.hi, k.p, k.p_adjusted, k.verdict.label()
        );
    }
    for i in &fam.identical {
        println!(
            "  {} vs {}: identical (the same score)",
            i.variant, i.reference
        );
    }
    Ok(())
}

pub fn export(a: &VariantArgs, out: &std::path::Path) -> Result<()> {
    use crate::pipeline as variant;
    let split = split_prompts(&a.good, &a.bad, a.direction_prompts, 0)?;
    let mut lm = model::load(&a.model)?;
    let v = a.variant(&lm)?;
    let data = direction_pass(a, &lm, &split, &v)?;
    let prep = variant::prepare(&v, &data)?;
    let summary =
        crate::ablate::abliterate(&mut lm.model, &prep.directions, &v.ablation, &prep.protect)?;
    crate::model::export::write_hf_folder(&lm, out)?;
    let meta = serde_json::json!({"tool": "outlierlab", "version": env!("CARGO_PKG_VERSION"), "source_model": a.model,
        "variant": v, "dims": prep.dims, "edited": summary.edited});
    std::fs::write(
        out.join("outlierlab.json"),
        serde_json::to_string_pretty(&meta)?,
    )?;
    eprintln!(
        "wrote {} ({} matrices edited)",
        out.display(),
        summary.edited.len()
    );
    Ok(())
}

#[derive(clap::Args, Debug, Clone)]
pub struct PowerArgs {
    /// A finished run directory (optional).
    pub run_dir: Option<std::path::PathBuf>,
    /// The refusal-rate difference to detect, in points.
    #[arg(long)]
    pub refusal_points: Option<f64>,
    /// The KL difference to detect.
    #[arg(long)]
    pub kl: Option<f64>,
    /// Without a run: prompts per arm.
    #[arg(long)]
    pub prompts: Option<usize>,
    /// Without a run: share of prompts whose refusal outcome differs between the arms.
    #[arg(long, default_value_t = 0.2)]
    pub discordance: f64,
    /// Without a run: standard deviation of the per-prompt KL differences.
    #[arg(long, default_value_t = 0.02)]
    pub kl_sd: f64,
    #[arg(long, default_value_t = 0.05)]
    pub alpha: f64,
    /// Without a run: tests in the family (the level is alpha / tests).
    #[arg(long, default_value_t = 1)]
    pub tests: usize,
    #[arg(long, default_value_t = 0.8)]
    pub power: f64,
}

fn fmt_prompts(n: Option<f64>) -> String {
    n.map_or("–".into(), |n| format!("{:.0}", n.ceil()))
}

/// `outlierlab power`: what a run could detect, or what a planned study would need.
pub fn power(a: &PowerArgs) -> Result<()> {
    use crate::stats::power as pw;
    if !(a.power > 0.5 && a.power < 1.0) {
        bail!("--power must lie in (0.5, 1), got {}", a.power);
    }
    if !(a.alpha > 0.0 && a.alpha <= 0.5) {
        bail!("--alpha must lie in (0, 0.5], got {}", a.alpha);
    }
    let Some(dir) = &a.run_dir else {
        let n = a.prompts.ok_or_else(|| {
            anyhow::anyhow!("give a run directory, or --prompts N for a study not yet run")
        })?;
        if a.tests == 0 {
            bail!("--tests must be at least 1");
        }
        let level = a.alpha / a.tests as f64;
        let nf = n as f64;
        println!(
            "{n} prompts per arm, level {level:.3e} (alpha {} / {} tests), power {:.0}%:",
            a.alpha,
            a.tests,
            100.0 * a.power
        );
        let mdd = pw::mcnemar_mdd(a.discordance, nf, level, a.power);
        println!(
            "  refusals (discordance {:.0}%): smallest detectable difference {}",
            100.0 * a.discordance,
            mdd.map_or("– (more than the discordance)".into(), |m| format!(
                "{:.1} points",
                100.0 * m
            ))
        );
        if let Some(d) = a.refusal_points {
            println!(
                "  {d} refusal points need {} prompts per arm",
                fmt_prompts(pw::mcnemar_prompts_needed(
                    d / 100.0,
                    a.discordance,
                    level,
                    a.power
                ))
            );
        }
        println!(
            "  KL (sd of differences {}): smallest detectable difference {:.4}",
            a.kl_sd,
            pw::mean_mdd(a.kl_sd, nf, level, a.power)
        );
        if let Some(k) = a.kl {
            println!(
                "  a KL difference of {k} needs {} prompts per arm",
                fmt_prompts(pw::mean_prompts_needed(k, a.kl_sd, level, a.power))
            );
        }
        return Ok(());
    };
    let r = crate::study::rundir::read_results(dir)?;
    // The run's own settings; alpha and power are this command's.
    let st = crate::report::settings(
        dir,
        &crate::report::Overrides {
            alpha: Some(a.alpha),
            power: Some(a.power),
            correction: None,
        },
    )?
    .stats;
    let fam = crate::report::run_family(&r, &st);
    let want_r = a.refusal_points.unwrap_or(st.margins.refusals) / 100.0;
    let want_k = a.kl.unwrap_or(st.margins.kl);
    println!(
        "{}: {} comparisons, {} tests, {} at alpha {}; power {:.0}%; each at the level its correction held it to",
        dir.display(),
        fam.comparisons.len(),
        fam.tests,
        st.correction.describe(),
        st.alpha,
        100.0 * a.power
    );
    println!(
        "  (prompts needed are distinct prompts per arm; 'for {:.1} pts' / 'for KL {}' are the differences asked for)",
        100.0 * want_r,
        want_k
    );
    let units = |t: &crate::evaluate::compare::MetricTest, draws: usize| {
        if draws > 1 {
            format!("{} prompts x {draws} draws ({} pairs)", t.prompts, t.n)
        } else {
            format!("{} prompts", t.prompts)
        }
    };
    for c in &fam.comparisons {
        let (rt, kt) = (&c.refusals, &c.kl);
        let pi = c.mcnemar.discordance();
        println!(
            "{} vs {}:\n  refusals: {}, discordance {:.1}%, observed {:+.1} pts ({}), MDD {}, prompts for {:.1} pts: {}, for the observed: {}\n  KL: {}, sd {:.4}, observed {:+.4} ({}), MDD {}, prompts for {}: {}, for the observed: {}",
            fam.arms[c.variant].label(),
            fam.arms[c.reference].label(),
            units(rt, c.replicates.len()),
            100.0 * pi,
            100.0 * rt.estimate,
            rt.verdict.label(),
            rt.mdd.map_or("– (more than the discordance)".into(), |m| format!("{:.1} pts", 100.0 * m)),
            100.0 * want_r,
            fmt_prompts(match rt.unit_sd {
                Some(sd) => pw::mean_prompts_needed(want_r, sd, rt.level, a.power),
                None => pw::mcnemar_prompts_needed(want_r, pi.max(want_r), rt.level, a.power),
            }),
            fmt_prompts(rt.prompts_needed),
            units(kt, c.replicates.len()),
            c.kl_sd,
            kt.estimate,
            kt.verdict.label(),
            kt.mdd.map_or("–".into(), |m| format!("{m:.4}")),
            want_k,
            fmt_prompts(pw::mean_prompts_needed(want_k, c.kl_sd, kt.level, a.power)),
            fmt_prompts(kt.prompts_needed),
        );
        // With several direction draws: what the draw-level reading would need.
        for (what, t, want, scale, unit) in [
            ("refusals", rt, want_r, 100.0, " pts"),
            ("KL", kt, want_k, 1.0, ""),
        ] {
            let Some(w) = &t.over_draws else { continue };
            let draws = |d: f64| {
                w.reading
                    .draws_needed(d, w.level, a.power)
                    .map_or("– (more prompts first)".to_string(), |n| n.to_string())
            };
            println!(
                "  {what} over {} draws: spread (sd of the per-draw estimates) {:.4}{unit}, {} ({}); draws for {}{unit}: {}, for the observed: {}",
                w.reading.draws,
                w.reading.spread * scale,
                w.verdict.label(),
                if t.prompts < t.n { "prompts repeat over draws" } else { "each draw its own prompts" },
                want * scale,
                draws(want),
                if t.estimate == 0.0 { "–".into() } else { draws(t.estimate) },
            );
        }
    }
    Ok(())
}

/// `outlierlab generate`: greedy replies, batched with left padding.
pub fn generate(
    model: &str,
    system: &str,
    max_new_tokens: usize,
    batch_size: usize,
    json: bool,
    raw: bool,
    prompts: Vec<String>,
) -> Result<()> {
    use crate::model::generate::{self, GenerateOptions};
    let prompts = read_prompts(prompts)?;
    let mut lm = model::load(model)?;
    lm.raw = raw;
    let system = if system.is_empty() {
        None
    } else {
        Some(system)
    };
    let encoded = prompts
        .iter()
        .map(|p| lm.encode_chat(system, p))
        .collect::<Result<Vec<_>>>()?;
    for (i, e) in encoded.iter().enumerate() {
        if e.ids.len() + max_new_tokens > lm.model.config.context_length {
            bail!(
                "prompt {} has {} tokens; with --max-new-tokens {max_new_tokens} that exceeds the model's context of {}; shorten it or lower --max-new-tokens",
                i + 1,
                e.ids.len(),
                lm.model.config.context_length
            );
        }
    }
    let opts = GenerateOptions {
        max_new_tokens,
        stop_ids: lm.tokenizer.stop_ids.clone(),
        pad_id: lm.tokenizer.pad_id,
        use_cache: true,
    };
    let pb = crate::util::progress_bar(encoded.len() as u64, "generating");
    for chunk in encoded.chunks(batch_size.max(1)) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|e| e.ids.clone()).collect();
        let outs = generate::greedy(&lm.model, &ids, &opts)?;
        pb.inc(chunk.len() as u64);
        for (e, out) in chunk.iter().zip(outs) {
            let reply = lm.tokenizer.decode(&out)?;
            pb.suspend(|| {
                if json {
                    let v = serde_json::json!({
                        "prompt": e.prompt, "rendered": e.rendered,
                        "input_ids": e.ids, "output_ids": out, "reply": reply,
                    });
                    println!("{v}");
                } else {
                    println!("### {}\n{}\n", e.prompt, reply.trim_end());
                }
            });
        }
    }
    pb.finish_and_clear();
    Ok(())
}

fn read_prompts(prompts: Vec<String>) -> Result<Vec<String>> {
    let prompts = if prompts.len() == 1 && prompts[0] == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s.lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect()
    } else {
        prompts
    };
    if prompts.is_empty() {
        bail!("no prompts given; pass them as arguments, or \"-\" to read one per line from stdin");
    }
    if let Some(i) = prompts.iter().position(|p| p.trim().is_empty()) {
        bail!("prompt {} is empty; every prompt needs some text", i + 1);
    }
    Ok(prompts)
}

/// One model alias, one built-in prompt set, or every built-in prompt set (`datasets`).
pub fn fetch_one(name: &str) -> Result<()> {
    use crate::assets;
    if let Some(a) = assets::find_model_asset(name) {
        let p = assets::ensure(&a, "models")?;
        println!("{}", p.display());
        return Ok(());
    }
    let sets: Vec<crate::datasets::Manifest> = if name == "datasets" {
        crate::datasets::manifests()
    } else {
        crate::datasets::manifest(name).into_iter().collect()
    };
    if sets.is_empty() {
        let aliases: Vec<String> = assets::model_assets()
            .iter()
            .map(|a| a.alias.clone())
            .collect();
        bail!(
            "'{name}' is neither a model alias ({}) nor a built-in prompt set ({}), nor `datasets`",
            aliases.join(", "),
            crate::datasets::names().join(", ")
        );
    }
    for m in sets {
        let prompts = crate::datasets::load_manifest(&m)?;
        println!("{}: {} prompts", m.name, prompts.len());
    }
    Ok(())
}

/// `--shard I/N`.
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("--shard {s}: expected I/N, e.g. 0/4"))?;
    let (i, n): (usize, usize) = (
        i.trim()
            .parse()
            .with_context(|| format!("--shard {s}: I must be a number"))?,
        n.trim()
            .parse()
            .with_context(|| format!("--shard {s}: N must be a number"))?,
    );
    if n == 0 || i >= n {
        bail!("--shard {s}: I must be below N (0-based)");
    }
    Ok((i, n))
}

/// `outlierlab validate`: the study file, and its plan against the model's own layer count,
/// read from its header (no weights loaded).
/// `outlierlab validate`: the study checked and planned; with `power = Some((discordance,
/// kl_sd))` also what it can detect.
pub fn validate(file: &std::path::Path, power: Option<(f64, f64)>) -> Result<()> {
    let study = crate::study::spec::load(file)?;
    let layers = crate::model::source::layer_count(&study.file.model)?;
    let plan = crate::study::plan::plan(&study, layers)?;
    for w in crate::study::spec::warnings(&study) {
        eprintln!("warning: {w}");
    }
    println!(
        "{}: ok — study '{}', {} variant(s) x {} replicate(s) on {} ({layers} layers)",
        file.display(),
        study.name,
        plan.variants.len(),
        plan.replicates.len(),
        study.file.model
    );
    if let Some((discordance, kl_sd)) = power {
        print!("{}", power_in_advance(&study, &plan, discordance, kl_sd)?);
    }
    Ok(())
}

/// The smallest refusal and KL differences a study can detect, before it runs: its pooled
/// prompt counts, its family at most as large as every planned variant against every reference
/// (variants that end up sharing a score are tested once, so the run's family can only be
/// smaller), the strictest level its correction applies (α / tests, the first step of Holm and
/// of Benjamini-Hochberg), and its power.
pub fn power_in_advance(
    study: &crate::study::spec::Study,
    plan: &crate::study::plan::Plan,
    discordance: f64,
    kl_sd: f64,
) -> Result<String> {
    use crate::stats::family::Correction;
    use crate::stats::power;
    use std::fmt::Write;
    if !(0.0..=1.0).contains(&discordance) || discordance == 0.0 {
        bail!("--discordance {discordance}: expected a share in (0, 1]");
    }
    if kl_sd.is_nan() || kl_sd <= 0.0 {
        bail!("--kl-sd {kl_sd}: expected a positive standard deviation");
    }
    let st = &study.file.statistics;
    let Some(d) = &study.file.datasets else {
        bail!("the study has no `datasets:` block, so it scores nothing to power");
    };
    let ranks: Vec<Option<usize>> = plan
        .variants
        .iter()
        .map(|v| st.reference_rank(&v.variant.name, &v.variant.handlings))
        .collect();
    // The family's pairs as the report forms them, before shared scores merge arms.
    let pairs = crate::evaluate::compare::comparison_pairs(&ranks).len();
    let tests = 2 * pairs;
    let reps = plan.replicates.len().max(1);
    let (n_bad, n_good) = (
        (d.evaluation.bad.count() * reps) as f64,
        (d.evaluation.good.count() * reps) as f64,
    );
    let level = match st.correction {
        Correction::None => st.alpha,
        _ => st.alpha / tests.max(1) as f64,
    };
    let mut out = String::new();
    writeln!(
        out,
        "power in advance: {pairs} comparisons at most ({tests} tests), {} at α = {}: the strictest level is {level:.2e}; \
         {} harmful and {} harmless prompts per arm pooled over {reps} replicate(s); power {}",
        st.correction.describe(),
        st.alpha,
        n_bad,
        n_good,
        st.power
    )?;
    if tests == 0 {
        writeln!(
            out,
            "  no comparisons: the study names no reference among its variants"
        )?;
        return Ok(out);
    }
    let mdd_refusal = power::mcnemar_mdd(discordance, n_bad, level, st.power);
    let mdd_kl = power::mean_mdd(kl_sd, n_good, level, st.power);
    let need_refusal =
        power::mcnemar_prompts_needed(st.margins.refusals / 100.0, discordance, level, st.power);
    let need_kl = power::mean_prompts_needed(st.margins.kl, kl_sd, level, st.power);
    let pts = |x: Option<f64>| {
        x.map_or(
            "none (even every discordant prompt one way falls short)".into(),
            |v| format!("{:.1} points", 100.0 * v),
        )
    };
    writeln!(
        out,
        "  refusals: smallest detectable difference {} (assumed discordance {discordance}); the margin of {} points needs {} prompts per arm",
        pts(mdd_refusal),
        st.margins.refusals,
        need_refusal.map_or("–".into(), |n| format!("{:.0}", n.ceil()))
    )?;
    writeln!(
        out,
        "  KL: smallest detectable difference {mdd_kl:.4} (assumed sd of per-prompt differences {kl_sd}); the margin of {} needs {} prompts per arm",
        st.margins.kl,
        need_kl.map_or("–".into(), |n| format!("{:.0}", n.ceil()))
    )?;
    if mdd_refusal.is_none_or(|m| 100.0 * m > st.margins.refusals) {
        writeln!(
            out,
            "warning: this study cannot detect a refusal difference as large as its equivalence margin ({} points) at power {}: \
             a real difference of that size would most often read \"cannot tell\"",
            st.margins.refusals, st.power
        )?;
    }
    if mdd_kl > st.margins.kl {
        writeln!(
            out,
            "warning: this study cannot detect a KL difference as large as its equivalence margin ({}) at power {}",
            st.margins.kl, st.power
        )?;
    }
    Ok(out)
}

fn run_name(dir: &std::path::Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "run".into())
}

/// The report folder a run directory renders into by default: reports/<run-name>.
pub fn default_report_dir(run_dir: &std::path::Path) -> PathBuf {
    PathBuf::from("reports").join(run_name(run_dir))
}

/// `outlierlab run`: the study, then (unless sharded) its report.
pub fn run_study(
    file: &std::path::Path,
    out: Option<PathBuf>,
    shard: Option<&str>,
    report_dir: Option<PathBuf>,
    precision: Option<crate::model::Precision>,
) -> Result<()> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("cannot read study file {}: {e}", file.display()))?;
    let study = crate::study::spec::parse(&text, &file.display().to_string())?;
    // The file is what the run directory keeps, so it alone says which precision ran: a flag
    // that silently lost to it (or won over it) would leave results that say otherwise.
    if let Some(p) = precision.filter(|&p| p != study.file.precision) {
        bail!(
            "{} runs in {} (its `precision:`, f32 when absent), and --precision asks for {}; add `precision: {}` to the study file (or a copy of it), or drop --precision",
            file.display(),
            study.file.precision.name(),
            p.name(),
            p.name()
        );
    }
    for w in crate::study::spec::warnings(&study) {
        eprintln!("warning: {w}");
    }
    let out = out
        .or_else(|| study.file.output.clone().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("runs").join(&study.name));
    let shard = shard.map(parse_shard).transpose()?;
    crate::study::runner::run(
        &study,
        &text,
        &crate::study::runner::RunOptions {
            out: out.clone(),
            shard,
        },
    )?;
    if shard.is_none() {
        let dir = report_dir.unwrap_or_else(|| default_report_dir(&out));
        let p = crate::report::render(&out, &dir)?;
        println!("report: {}", p.display());
    }
    Ok(())
}

/// `outlierlab merge`.
pub fn merge(into: &std::path::Path, shards: &[PathBuf], allow_partial: bool) -> Result<()> {
    if shards.is_empty() {
        bail!("no shard directories given");
    }
    let missing = crate::study::rundir::merge(into, shards, allow_partial)?;
    if missing.is_empty() {
        println!("merged {} shard(s) into {}", shards.len(), into.display());
    } else {
        println!(
            "merged {} shard(s) into {} — PARTIAL: {} planned score(s) missing (listed in {})",
            shards.len(),
            into.display(),
            missing.len(),
            into.join("partial.json").display()
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug, Clone)]
pub struct LabelArgs {
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// The corpus: a built-in prompt set or a file, NAME or NAME:COUNT (repeatable).
    #[arg(long, default_value = "harmless-outlierlab:16")]
    pub dataset: Vec<String>,
    #[arg(long, default_value = DEFAULT_SYSTEM_PROMPT_STR)]
    pub system: String,
    /// Raw text (BOS + prompt) instead of chat turns, for base models.
    #[arg(long)]
    pub raw: bool,
    /// Candidates: entries at least this many times their position's median.
    #[arg(long, default_value_t = 100.0)]
    pub candidate_ratio: f32,
    #[arg(long, default_value_t = 24)]
    pub max_candidates: usize,
    /// Massive: zeroing does at least this mean KL (nats) at the later positions ...
    #[arg(long, default_value_t = 1.0)]
    pub zero_kl: f64,
    /// ... and holding at the mean at most this.
    #[arg(long, default_value_t = 0.1)]
    pub mean_kl: f64,
    /// Median scopes the criteria subsets are scored under (position, layer).
    #[arg(long, value_delimiter = ',', default_value = "position,layer")]
    pub median_scope: Vec<String>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Write everything (candidates, every configuration's scores) as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `outlierlab label`: which dims are massive activations by intervention, and every preset,
/// threshold and criteria subset scored against those labels. A study's
/// `detection_validation:` block runs the same and renders it in the report.
pub fn label(a: &LabelArgs) -> Result<()> {
    use crate::detect::config::MedianScope;
    use crate::detect::validate::{self, CorpusSet, ValidationSpec};
    let median_scope = a
        .median_scope
        .iter()
        .map(|s| match s.as_str() {
            "position" => Ok(MedianScope::Position),
            "layer" => Ok(MedianScope::Layer),
            o => bail!("--median-scope: unknown scope '{o}'; expected position or layer"),
        })
        .collect::<Result<Vec<_>>>()?;
    let spec = ValidationSpec {
        corpus: a.dataset.iter().map(|d| CorpusSet::parse(d)).collect(),
        candidate_ratio: a.candidate_ratio,
        max_candidates: a.max_candidates,
        zero_kl: a.zero_kl,
        mean_kl: a.mean_kl,
        median_scope,
        persistence_mode: vec![crate::detect::config::PersistenceMode::Consecutive],
        curves: validate::CURVES.iter().map(|c| c.to_string()).collect(),
        batch_size: a.batch_size,
    };
    spec.check()
        .map_err(|(k, m)| anyhow::anyhow!("--{}: {m}", k.replace('_', "-")))?;
    let mut lm = model::load(&a.model)?;
    lm.raw = a.raw;
    let system = (!a.system.is_empty()).then_some(a.system.as_str());
    let pb = crate::util::progress_bar(0, "interventions");
    let v = validate::run(&lm, system, &spec, Vec::new(), |_, done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    print!("{}", crate::report::validation::markdown(&v, 1));
    if let Some(path) = &a.json {
        crate::study::rundir::write_atomic(path, serde_json::to_string_pretty(&v)?.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
