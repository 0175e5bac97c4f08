//! One replicate made ready to score: its prompts drawn, its direction pass (residuals, and the
//! detection scan where a variant needs detected dims), and the unedited model's score on its
//! evaluation (and selection) prompts. Studies prepare every replicate here, and so do the
//! one-variant commands (`abliterate`, `export`), as a one-replicate study that keeps nothing.

use super::optimize::Selection;
use super::plan::{draw_splits, Splits};
use super::rundir::{hash_json, read_record, write_record, RunDir, Timings};
use super::spec::{DatasetsSpec, Redraw, Study};
use crate::datasets::Pair;
use crate::detect;
use crate::evaluate::{EvalOptions, Evaluator, Outcome};
use crate::model::{HiddenConvention, LoadedModel};
use crate::pipeline::{self as variant, DirectionData, Variant};
use crate::util::progress_bar;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::time::Instant;

/// What preparing a replicate reads: a study file's settings, or the arguments of a one-variant
/// command mapped onto the same fields.
pub struct Settings<'a> {
    pub datasets: &'a DatasetsSpec,
    /// The study's seed: the evaluation draw of every replicate under `redraw: direction`.
    pub base_seed: u64,
    pub redraw: Redraw,
    pub system: Option<&'a str>,
    /// The study's detection: its trigger, median kind and pad rows are the scan's.
    pub detection: detect::DetectConfig,
    pub evaluation: EvalOptions,
    /// Every variant to be scored on the replicate: which detections the scan must serve.
    pub variants: Vec<&'a Variant>,
}

impl<'a> Settings<'a> {
    pub fn of_study(study: &'a Study, variants: Vec<&'a Variant>) -> Result<Settings<'a>> {
        let f = &study.file;
        let Some(datasets) = &f.datasets else {
            anyhow::bail!("the study has no `datasets:` block, so it has no variants to score");
        };
        Ok(Settings {
            datasets,
            base_seed: f.seed,
            redraw: f.redraw,
            system: (!f.system_prompt.is_empty()).then_some(f.system_prompt.as_str()),
            detection: f.detection.resolve()?,
            evaluation: f.evaluation.options()?,
            variants,
        })
    }
}

/// Where a replicate's caches and published files go: a study's run directory, or nowhere (the
/// one-variant commands write nothing but their output).
#[derive(Clone, Copy)]
pub enum Store<'a> {
    Run(&'a RunDir),
    Nothing,
}

/// Per replicate: the prompts, the direction data and the unedited model's score.
pub struct Replicate {
    pub seed: u64,
    pub data: DirectionData,
    /// Detected dims by detection-config hash.
    pub dims: BTreeMap<String, Vec<u32>>,
    pub evaluator: Evaluator,
    pub base: Outcome,
    pub selection: Option<Selection>,
    /// The prompt set of each harmless and harmful evaluation prompt, in scoring order.
    pub sources: Pair<Vec<String>>,
    /// A hash of each split's prompts, by `r<seed>:<split>`, for the run's provenance.
    pub prompt_hashes: BTreeMap<String, String>,
}

impl Replicate {
    /// The dims `v` edits with on this replicate (a tuned variant's are chosen later).
    pub fn dims_for(&self, v: &Variant) -> Result<Vec<u32>> {
        dims_for(v, &self.dims)
    }
}

/// The dims `v` edits with: none when its handlings use none, its named dims, or the dims its
/// detection found on the replicate's scan (`detected`, by detection-config hash).
pub fn dims_for(v: &Variant, detected: &BTreeMap<String, Vec<u32>>) -> Result<Vec<u32>> {
    if !v.needs_dims() {
        return Ok(Vec::new());
    }
    if let Some(d) = &v.dims {
        let mut d = d.clone();
        d.sort_unstable();
        d.dedup();
        return Ok(d);
    }
    v.detect
        .as_ref()
        .and_then(|c| detected.get(&hash_json(c)))
        .cloned()
        .with_context(|| format!("no detected dims for variant {}", v.name))
}

/// Only the direction pass of replicate `seed`, nothing stored (what `export` needs).
pub fn direction(
    s: &Settings,
    lm: &LoadedModel,
    seed: u64,
    sets: &BTreeMap<String, Vec<String>>,
) -> Result<(DirectionData, BTreeMap<String, Vec<u32>>)> {
    let dir = draw_splits(s.datasets, sets, seed, s.base_seed, s.redraw)?.dir;
    direction_pass(s, lm, (seed, Store::Nothing), &dir, "", false, "")
}

/// Draws replicate `seed`'s prompts, runs its direction pass and scores the unedited model.
/// `keep_scan` keeps the detection scan in memory (tuning reads it); `label` prefixes progress.
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    s: &Settings,
    lm: &LoadedModel,
    seed: u64,
    sets: &BTreeMap<String, Vec<String>>,
    store: Store,
    timings: &mut Timings,
    keep_scan: bool,
    label: &str,
) -> Result<Replicate> {
    let Splits {
        dir,
        eval,
        eval_sources,
        sel,
    } = draw_splits(s.datasets, sets, seed, s.base_seed, s.redraw)?;
    // Cached reference scores depend on the precision too (f32 keys are as before it existed).
    let model_key = lm
        .sha256
        .clone()
        .unwrap_or_else(|| lm.path.display().to_string())
        + lm.model.precision().cache_tag();
    let mut prompt_hashes = BTreeMap::new();

    let t = Instant::now();
    let (data, dims) = direction_pass(s, lm, (seed, store), &dir, &model_key, keep_scan, label)?;
    timings.push(
        "direction",
        format!("r{seed} direction pass and detection"),
        t,
    );
    prompt_hashes.insert(format!("r{seed}:direction"), hash_json(&dir.tuple()));
    prompt_hashes.insert(format!("r{seed}:evaluation"), hash_json(&eval.tuple()));

    let mut reference = |prompts: &Pair<Vec<String>>, split: &str, what: &str| {
        let t = Instant::now();
        let r = scored_reference(
            s,
            lm,
            prompts,
            (&model_key, store),
            &format!("{label}unedited model{what}"),
        )?;
        timings.push(
            "unedited",
            format!("r{seed} unedited model, {split} split"),
            t,
        );
        anyhow::Ok(r)
    };
    let (evaluator, base) = reference(&eval, "evaluation", "")?;
    let selection = if sel.good.is_empty() {
        None
    } else {
        prompt_hashes.insert(format!("r{seed}:selection"), hash_json(&sel.tuple()));
        let (evaluator, base) = reference(&sel, "selection", ", selection split")?;
        Some(Selection { evaluator, base })
    };
    Ok(Replicate {
        seed,
        data,
        dims,
        evaluator,
        base,
        selection,
        sources: eval_sources,
        prompt_hashes,
    })
}

/// One replicate's pass over its direction prompts: residuals and, where a variant needs
/// detected dims, the one scan every detection of the replicate reads (the plan has checked that
/// they share the base detection's trigger, median kind and pad rows; the floor is the loosest
/// needed). In a run directory it is cached by content and the detection summary is published
/// into the replicate's results.
fn direction_pass(
    s: &Settings,
    lm: &LoadedModel,
    (seed, store): (u64, Store),
    dir: &Pair<Vec<String>>,
    model_key: &str,
    keep_scan: bool,
    label: &str,
) -> Result<(DirectionData, BTreeMap<String, Vec<u32>>)> {
    let detecting: Vec<&Variant> = s
        .variants
        .iter()
        .copied()
        .filter(|v| v.needs_detection())
        .collect();
    let needs_scan = !detecting.is_empty();
    let base_cfg = &s.detection;
    let mut floor = detect::Floor::default();
    for v in &detecting {
        if let Some(c) = &v.loosest_detect()? {
            let fl = detect::floor_for(c);
            floor.min_ratio = floor.min_ratio.min(fl.min_ratio);
            if let Some(m) = fl.min_abs {
                floor.min_abs = Some(floor.min_abs.map_or(m, |x: f32| x.min(m)));
            }
        }
    }
    // Detected dims per detection config, the only thing the runner needs from a scan; the scan
    // itself (hundreds of MB for a few hundred prompts) is not kept, its candidate table is.
    let configs: BTreeMap<String, detect::DetectConfig> = detecting
        .iter()
        .filter(|v| v.tune.is_none())
        .filter_map(|v| v.detect.clone())
        .map(|c| (hash_json(&c), c))
        .collect();
    let cache = match store {
        Store::Run(run) => Some(run.direction_cache(&hash_json(&(
            model_key,
            &dir.good,
            &dir.bad,
            s.system,
            needs_scan,
            &base_cfg.sources.trigger,
            base_cfg.median_kind,
            floor,
            base_cfg.pad_rows,
        )))),
        Store::Nothing => None,
    };
    let cached_dims = cache.as_ref().map(|c| c.dims()).unwrap_or_default();
    let have_all = configs.keys().all(|k| cached_dims.contains_key(k));
    let cached = cache
        .as_ref()
        .filter(|c| c.is_complete(needs_scan) && have_all && !keep_scan);
    let (data, dims) = if let Some(c) = cached {
        let (good, bad) = c.residuals()?;
        let data = DirectionData {
            good,
            bad,
            scan: None,
        };
        (data, cached_dims)
    } else {
        // The scan runs the trigger prompt too.
        let trigger = usize::from(needs_scan && base_cfg.sources.trigger.is_some());
        let pb = progress_bar(
            (dir.len() + trigger) as u64,
            &format!("{label}direction prompts"),
        );
        let mut data = variant::direction_data(
            lm,
            &dir.good,
            &dir.bad,
            base_cfg.sources.trigger.as_deref(),
            s.system,
            HiddenConvention::Transformers,
            needs_scan.then_some(detect::ScanSettings {
                median_kind: base_cfg.median_kind,
                floor,
                pad_rows: base_cfg.pad_rows,
            }),
            s.evaluation.batch_size,
            |n| pb.inc(n as u64),
        )?;
        pb.finish_and_clear();
        let mut dims = cached_dims;
        if let Some(scan) = &data.scan {
            for (k, c) in &configs {
                dims.insert(k.clone(), detect::apply(c, scan)?.dim_ids());
            }
        }
        if let Some(c) = &cache {
            // The candidate table and the detection summary are for the report; a command that
            // keeps nothing does not compute them.
            let detected = match &data.scan {
                Some(scan) => {
                    let cfgs: Vec<&detect::DetectConfig> = configs.values().collect();
                    Some((
                        detect::table::candidate_table(scan)?,
                        detect::summary::summarise(scan, base_cfg, &cfgs)?,
                    ))
                }
                None => None,
            };
            c.store(&data.good, &data.bad, &dims, detected)?;
        }
        if !keep_scan {
            data.scan = None;
        }
        (data, dims)
    };
    if let (Some(c), Store::Run(run)) = (&cache, store) {
        // The report reads the detection summary from the results, not from the cache.
        c.publish_summary(&run.replicate(seed))?;
    }
    Ok((data, dims))
}

/// An evaluator for `prompts` and the unedited model's score on it, cached by content in a run
/// directory.
fn scored_reference(
    s: &Settings,
    lm: &LoadedModel,
    prompts: &Pair<Vec<String>>,
    (model_key, store): (&str, Store),
    label: &str,
) -> Result<(Evaluator, Outcome)> {
    let (good, bad, system, opts) = (&prompts.good, &prompts.bad, s.system, &s.evaluation);
    let evaluator = Evaluator::new(lm, good, bad, system, opts.clone())?;
    let score_now = |evaluator: &Evaluator| -> Result<Outcome> {
        let pb = progress_bar(evaluator.work(), label);
        let o = evaluator.score(&lm.model, &lm.tokenizer, |_, n| pb.inc(n as u64))?;
        pb.finish_and_clear();
        Ok(o)
    };
    let Store::Run(run) = store else {
        let o = score_now(&evaluator)?;
        return Ok((evaluator, o));
    };
    let key = hash_json(&(model_key, good, bad, system, opts));
    let path = run.reference_cache(&key);
    // A cache that cannot be read is recomputed, not an error.
    if let Ok(Some(o)) = read_record::<Outcome>(&path) {
        return Ok((evaluator, o));
    }
    // Scored with replies cut at heretic's markers, before the study named other classifiers:
    // completed, not rescored.
    if !opts.early_stop {
        let cut = EvalOptions {
            early_stop: true,
            ..opts.clone()
        };
        let cut_path = run.reference_cache(&hash_json(&(model_key, good, bad, system, &cut)));
        if let Ok(Some(mut o)) = read_record::<Outcome>(&cut_path) {
            let n = evaluator.cut_replies(&o).map_or(0, |c| c.len());
            let pb = progress_bar(n as u64, label);
            let t = Instant::now();
            let (n, changed) =
                evaluator.complete(&lm.model, &lm.tokenizer, &mut o, |_, k| pb.inc(k as u64))?;
            pb.finish_and_clear();
            eprintln!("{label}: completed {n} replies cut at heretic's markers ({changed} label(s) changed, {:.0} s)", t.elapsed().as_secs_f64());
            write_record(&path, &o)?;
            return Ok((evaluator, o));
        }
    }
    let o = score_now(&evaluator)?;
    write_record(&path, &o)?;
    Ok((evaluator, o))
}
