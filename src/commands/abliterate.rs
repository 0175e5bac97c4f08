//! `outlierlab abliterate`: one handling, one edit, scored against the unedited model and the
//! same edit without handling. Also the arguments `export` shares.

use crate::detect;
use crate::evaluate::EvalOptions;
use crate::model::chat::DEFAULT_SYSTEM_PROMPT;
use crate::model::{self, Precision};
use crate::pipeline::Variant;
use crate::study::replicate;
use crate::study::rundir::Timings;
use crate::study::spec::{DatasetsSpec, PairSpec, Redraw, SetList, SetSpec};
use crate::util::progress_bar as bar;
use anyhow::{Context, Result};
use std::collections::BTreeMap;

/// Abliterate with one handling of massive activations and score it against the unedited
/// model (and against the same edit without handling), with intervals and verdicts.
///
/// Refusal rate: greedy replies to held-out harmful prompts, heretic's refusal markers
/// (a reply stops as soon as a marker appears). KL: first-token distributions on held-out
/// harmless prompts against the unedited model. Rates carry Wilson 95% intervals;
/// comparisons use exact McNemar tests (refusals) and sign-flip tests with their inverted
/// intervals (KL), Holm-corrected over the table; a verdict is better, worse, negligible (a real
/// difference inside the margin), equivalent or cannot tell.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub variant: VariantArgs,
    /// Do not also score the same edit without handling.
    #[arg(long)]
    pub no_compare_none: bool,
    #[arg(long)]
    pub json: bool,
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
    #[arg(long, default_value = DEFAULT_SYSTEM_PROMPT)]
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

/// The arguments as a one-replicate study: the first `direction_prompts` of each set for the
/// direction, the next `eval_prompts` for evaluation (disjoint by construction, and checked as a
/// study's splits are), no selection split, nothing drawn at random.
pub struct OneVariant {
    pub datasets: DatasetsSpec,
    pub sets: BTreeMap<String, Vec<String>>,
    pub evaluation: EvalOptions,
}

impl VariantArgs {
    pub fn one_variant(&self, eval_prompts: usize) -> Result<OneVariant> {
        let set = |name: &str, count: usize, offset: usize| {
            SetList(vec![SetSpec {
                name: name.to_string(),
                count,
                offset,
                sample: false,
            }])
        };
        let pair = |count: usize, offset: usize| PairSpec {
            good: set(&self.good, count, offset),
            bad: set(&self.bad, count, offset),
        };
        let mut sets = BTreeMap::new();
        for name in [&self.good, &self.bad] {
            if !sets.contains_key(name) {
                sets.insert(name.clone(), crate::datasets::load(name)?);
            }
        }
        Ok(OneVariant {
            datasets: DatasetsSpec {
                direction: pair(self.direction_prompts, 0),
                evaluation: pair(eval_prompts, self.direction_prompts),
                selection: None,
            },
            sets,
            evaluation: EvalOptions {
                batch_size: self.batch_size,
                max_response_tokens: self.max_response_tokens,
                over_refusal_tokens: self.over_refusal_tokens,
                markers: crate::evaluate::MarkerList::resolve(&self.markers)?,
                ..EvalOptions::default()
            },
        })
    }

    fn system(&self) -> Option<&str> {
        (!self.system.is_empty()).then_some(self.system.as_str())
    }
}

impl OneVariant {
    /// The settings a study's replicate would be prepared with, for these variants. The
    /// detection is the one `VariantArgs::variant` resolved (preset and `--set`), not resolved
    /// again here.
    pub fn settings<'a>(
        &'a self,
        a: &'a VariantArgs,
        variants: &[&'a Variant],
    ) -> replicate::Settings<'a> {
        let detection = variants
            .iter()
            .find_map(|v| v.detect.clone())
            .unwrap_or_default();
        replicate::Settings {
            datasets: &self.datasets,
            base_seed: 0,
            redraw: Redraw::All,
            system: a.system(),
            detection,
            evaluation: self.evaluation.clone(),
            variants: variants.to_vec(),
        }
    }
}

pub(super) fn pct(r: &crate::stats::Rate) -> String {
    format!(
        "{}/{} {:>5.1}% [{:.1}%, {:.1}%]",
        r.k,
        r.n,
        100.0 * r.rate,
        100.0 * r.lo,
        100.0 * r.hi
    )
}

pub fn run(args: &Args, precision: Precision) -> Result<()> {
    let (a, json, compare_none) = (&args.variant, args.json, !args.no_compare_none);
    use crate::evaluate::compare::{self, StatsSettings};
    use crate::pipeline as variant;
    let one = a.one_variant(a.eval_prompts)?;
    let mut lm = model::load_with(&a.model, precision)?;
    let v = a.variant(&lm)?;
    let mut variants = vec![v.clone()];
    if compare_none && !v.handlings.is_empty() {
        variants.insert(
            0,
            Variant {
                name: "none".into(),
                handlings: vec![],
                ..v.clone()
            },
        );
    }
    let settings = one.settings(a, &variants.iter().collect::<Vec<_>>());
    let rep = replicate::prepare(
        &settings,
        &lm,
        0,
        &one.sets,
        replicate::Store::Nothing,
        &mut Timings::default(),
        false,
        "",
    )?;
    let (ev, data) = (&rep.evaluator, &rep.data);
    let score_bar = |name: &str, ev: &crate::evaluate::Evaluator| bar(ev.work(), name);
    let mut rows: Vec<(String, crate::evaluate::Outcome, Vec<u32>)> =
        vec![("unedited".into(), rep.base.clone(), vec![])];
    for var in &variants {
        let prep = variant::prepare_with_dims(data, var, &rep.dims_for(var)?)?;
        let pb = score_bar(&format!("scoring {}", var.name), ev);
        let out = variant::score(&mut lm, ev, var, &prep, |_, n| pb.inc(n as u64))?;
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
        a.direction_prompts,
        rep.evaluator.good_text.len(),
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
