//! Running a plan: the model loaded once, direction data and reference scores cached by content,
//! each distinct (dims, handling, edit) scored once, every finished score written at once and
//! atomically. Running again resumes; a second run on the same directory is refused.

use super::optimize::{self, SearchResult, Selection, TuneResult};
use super::plan::{plan, Plan, PlannedVariant};
use super::spec::{SetSpec, Study};
use super::variant::{self, DirectionData, Variant};
use crate::ablate::AblationParams;
use crate::detect;
use crate::direction::Residuals;
use crate::evaluate::{Evaluator, Outcome, RefusalClassifier};
use crate::model::{self, HiddenConvention, LoadedModel};
use crate::util::progress_bar;
use anyhow::{bail, Context, Result};
use polars::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out: PathBuf,
    /// (index, count): run every count-th score, starting at index.
    pub shard: Option<(usize, usize)>,
}

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn hash_json<T: Serialize>(v: &T) -> String {
    sha_hex(serde_json::to_string(v).expect("serialisable").as_bytes())[..16].to_string()
}

/// Writes `bytes` to `path` through a temporary file and a rename: a reader never sees half a
/// file, and a killed run leaves no partial result behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Holds the run directory for this process; dropped, the lock goes with it.
pub struct RunLock {
    _file: File,
}

pub fn lock_run_dir(dir: &Path) -> Result<RunLock> {
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create run directory {}", dir.display()))?;
    let path = dir.join(".lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    match f.try_lock() {
        Ok(()) => Ok(RunLock { _file: f }),
        Err(_) => bail!(
            "run directory {} is in use by another outlierlab run; wait for it to finish or use another output folder",
            dir.display()
        ),
    }
}

fn pick(prompts: &[String], s: &SetSpec, seed: u64) -> Result<Vec<String>> {
    crate::datasets::take(prompts, s.count, s.offset, s.sample.then_some(seed))
        .with_context(|| format!("dataset {}", s.name))
}

/// The result of scoring one distinct edit on one replicate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoreRecord {
    pub key: String,
    pub replicate: u64,
    pub dims: Vec<u32>,
    pub variant_ids: Vec<String>,
    pub outcome: Outcome,
    /// The edit's parameters when they were searched (otherwise the variant's own).
    #[serde(default)]
    pub ablation: Option<AblationParams>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Provenance {
    pub tool_version: String,
    pub git_revision: Option<String>,
    pub model: String,
    pub model_sha256: Option<String>,
    pub study_sha256: String,
    pub datasets: BTreeMap<String, String>,
    pub seeds: Vec<u64>,
    pub machine: String,
    pub threads: usize,
}

fn git_revision() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Per replicate: the prompts, the direction data (cached) and the unedited model's score.
struct Replicate {
    seed: u64,
    data: DirectionData,
    /// Detected dims by detection-config hash.
    dims: BTreeMap<String, Vec<u32>>,
    evaluator: Evaluator,
    base: Outcome,
    selection: Option<Selection>,
}

fn cache_dir(out: &Path, shard: Option<(usize, usize)>) -> PathBuf {
    match shard {
        Some((i, n)) => out.join(format!("cache-shard-{i}-of-{n}")),
        None => out.join("cache"),
    }
}

fn save_residuals(path: &Path, r: &Residuals) -> Result<()> {
    let mut bytes = Vec::with_capacity(24 + r.data.len() * 4);
    for v in [r.n as u64, r.states as u64, r.d as u64] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    for x in &r.data {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    write_atomic(path, &bytes)
}

fn load_residuals(path: &Path) -> Result<Residuals> {
    let b = fs::read(path)?;
    if b.len() < 24 {
        bail!("{} is truncated", path.display());
    }
    let u =
        |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes")) as usize;
    let (n, states, d) = (u(0), u(1), u(2));
    if b.len() != 24 + n * states * d * 4 {
        bail!("{} is truncated", path.display());
    }
    let data = b[24..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    Ok(Residuals { n, states, d, data })
}

#[allow(clippy::too_many_arguments)]
fn prepare_replicate(
    study: &Study,
    lm: &LoadedModel,
    plan: &Plan,
    seed: u64,
    cache: &Path,
    sets: &BTreeMap<String, Vec<String>>,
    provenance: &mut Provenance,
    keep_scan: bool,
    out_dir: &Path,
) -> Result<Replicate> {
    let f = &study.file;
    let d = &f.datasets;
    let good_dir = pick(&sets[&d.direction.good.name], &d.direction.good, seed)?;
    let bad_dir = pick(&sets[&d.direction.bad.name], &d.direction.bad, seed)?;
    let good_eval = pick(&sets[&d.evaluation.good.name], &d.evaluation.good, seed)?;
    let bad_eval = pick(&sets[&d.evaluation.bad.name], &d.evaluation.bad, seed)?;
    let (good_sel, bad_sel) = match &d.selection {
        Some(sel) => (
            pick(&sets[&sel.good.name], &sel.good, seed)?,
            pick(&sets[&sel.bad.name], &sel.bad, seed)?,
        ),
        None => (Vec::new(), Vec::new()),
    };
    for (a, b, what) in [
        (&good_dir, &good_eval, "harmless direction and evaluation"),
        (&bad_dir, &bad_eval, "harmful direction and evaluation"),
        (&good_sel, &good_eval, "harmless selection and evaluation"),
        (&bad_sel, &bad_eval, "harmful selection and evaluation"),
        (&good_sel, &good_dir, "harmless selection and direction"),
        (&bad_sel, &bad_dir, "harmful selection and direction"),
    ] {
        let set: std::collections::HashSet<&String> = a.iter().collect();
        if let Some(p) = b.iter().find(|p| set.contains(p)) {
            bail!("replicate {seed}: {what} prompts overlap (e.g. {p:?})");
        }
    }
    let system = (!f.system_prompt.is_empty()).then_some(f.system_prompt.as_str());
    let model_key = lm
        .sha256
        .clone()
        .unwrap_or_else(|| lm.path.display().to_string());

    // Which detection scans are needed: one per (median kind, floor); all detection configs of
    // this plan share the trigger prompt and sources of the study's base detection.
    let needs_scan = plan.variants.iter().any(|v| v.variant.needs_dims());
    let base_cfg = f.detection.resolve()?;
    let mut floor = detect::Floor::default();
    for v in plan.variants.iter().filter(|v| v.variant.needs_dims()) {
        if let Some(c) = &v.variant.loosest_detect()? {
            let fl = detect::floor_for(c);
            floor.min_ratio = floor.min_ratio.min(fl.min_ratio);
            if let Some(m) = fl.min_abs {
                floor.min_abs = Some(floor.min_abs.map_or(m, |x: f32| x.min(m)));
            }
        }
    }
    let dir_key = hash_json(&(
        &model_key,
        &good_dir,
        &bad_dir,
        system,
        needs_scan,
        &base_cfg.sources.trigger,
        base_cfg.median_kind,
        floor,
    ));
    let dir_path = cache.join(format!("direction-{dir_key}"));
    // Detected dims per detection config, the only thing the runner needs from a scan; the scan
    // itself (hundreds of MB for a few hundred prompts) is not kept, its candidate table is.
    let configs: BTreeMap<String, detect::DetectConfig> = plan
        .variants
        .iter()
        .filter(|v| v.variant.needs_dims() && v.variant.tune.is_none())
        .filter_map(|v| v.variant.detect.clone())
        .map(|c| (hash_json(&c), c))
        .collect();
    let dims_path = dir_path.join("dims.json");
    let cached_dims: BTreeMap<String, Vec<u32>> = fs::read(&dims_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let have_all = configs.keys().all(|k| cached_dims.contains_key(k));
    let have_summary = !needs_scan || dir_path.join("detection.json").exists();
    let (data, dims) = if dir_path.join("done").exists() && have_all && have_summary && !keep_scan {
        let data = DirectionData {
            good: load_residuals(&dir_path.join("good.f32"))?,
            bad: load_residuals(&dir_path.join("bad.f32"))?,
            scan: None,
        };
        (data, cached_dims)
    } else {
        let pb = progress_bar(
            (good_dir.len() + bad_dir.len()) as u64,
            &format!("replicate {seed}: direction prompts"),
        );
        let mut data = variant::direction_data(
            lm,
            &good_dir,
            &bad_dir,
            base_cfg.sources.trigger.as_deref(),
            system,
            HiddenConvention::Transformers,
            needs_scan.then_some((base_cfg.median_kind, floor)),
            f.evaluation.batch_size,
            |n| pb.inc(n as u64),
        )?;
        pb.finish_and_clear();
        save_residuals(&dir_path.join("good.f32"), &data.good)?;
        save_residuals(&dir_path.join("bad.f32"), &data.bad)?;
        let mut dims = cached_dims;
        if let Some(scan) = &data.scan {
            for (k, c) in &configs {
                dims.insert(k.clone(), detect::apply(c, scan)?.dim_ids());
            }
            let mut df = detect::table::candidate_table(scan)?;
            detect::table::write_parquet(&mut df, &dir_path.join("candidates.parquet"))?;
            let cfgs: Vec<&detect::DetectConfig> = configs.values().collect();
            let summary = detect::summary::summarise(scan, &base_cfg, &cfgs)?;
            write_atomic(
                &dir_path.join("detection.json"),
                &serde_json::to_vec(&summary)?,
            )?;
        }
        if !keep_scan {
            data.scan = None;
        }
        write_atomic(&dims_path, &serde_json::to_vec_pretty(&dims)?)?;
        write_atomic(&dir_path.join("done"), b"ok\n")?;
        (data, dims)
    };
    // The report reads the detection summary from the results, not from the cache.
    if let Ok(b) = fs::read(dir_path.join("detection.json")) {
        write_atomic(
            &out_dir
                .join("results")
                .join(format!("r{seed}"))
                .join("detection.json"),
            &b,
        )?;
    }
    provenance.datasets.insert(
        format!("r{seed}:direction"),
        hash_json(&(&good_dir, &bad_dir)),
    );
    provenance.datasets.insert(
        format!("r{seed}:evaluation"),
        hash_json(&(&good_eval, &bad_eval)),
    );

    let opts = f.evaluation.options();
    let (evaluator, base) = scored_reference(
        lm,
        (&good_eval, &bad_eval),
        system,
        &opts,
        (&model_key, cache),
        &format!("replicate {seed}: unedited model"),
    )?;
    let selection = if good_sel.is_empty() {
        None
    } else {
        provenance.datasets.insert(
            format!("r{seed}:selection"),
            hash_json(&(&good_sel, &bad_sel)),
        );
        let (evaluator, base) = scored_reference(
            lm,
            (&good_sel, &bad_sel),
            system,
            &opts,
            (&model_key, cache),
            &format!("replicate {seed}: unedited model, selection split"),
        )?;
        Some(Selection { evaluator, base })
    };
    Ok(Replicate {
        seed,
        data,
        dims,
        evaluator,
        base,
        selection,
    })
}

/// An evaluator for `(good, bad)` and the unedited model's score on it, cached by content.
fn scored_reference(
    lm: &LoadedModel,
    (good, bad): (&[String], &[String]),
    system: Option<&str>,
    opts: &crate::evaluate::EvalOptions,
    (model_key, cache): (&str, &Path),
    label: &str,
) -> Result<(Evaluator, Outcome)> {
    let evaluator = Evaluator::new(
        lm,
        good,
        bad,
        system,
        opts.clone(),
        RefusalClassifier::default(),
    )?;
    let key = hash_json(&(model_key, good, bad, system, opts));
    let path = cache.join(format!("reference-{key}.json"));
    if let Some(o) = fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        return Ok((evaluator, o));
    }
    let pb = progress_bar((good.len() * 2 + bad.len()) as u64, label);
    let o = evaluator.score(&lm.model, &lm.tokenizer, |_, n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    write_atomic(&path, &serde_json::to_vec(&o)?)?;
    Ok((evaluator, o))
}

/// The key of a distinct score: what the edit depends on, nothing else.
fn score_key(v: &Variant, dims: &[u32], replicate: u64) -> String {
    let mut canon = v.clone();
    canon.name = String::new();
    canon.detect = None;
    // A tuned variant's edit depends on the dims it ended with, not on how they were found.
    canon.tune = None;
    if dims.is_empty() {
        // With nothing detected, zeroing or protecting dims is exactly `none` (tested), so such
        // variants share `none`'s score.
        canon.handlings.retain(|h| !h.uses_dims());
    }
    hash_json(&(&canon, dims, replicate))
}

pub fn result_path(out: &Path, replicate: u64, key: &str) -> PathBuf {
    out.join("results")
        .join(format!("r{replicate}"))
        .join(format!("{key}.json"))
}

fn tune_path(out: &Path, replicate: u64, variant_id: &str) -> PathBuf {
    out.join("tune")
        .join(format!("r{replicate}"))
        .join(format!("{variant_id}.json"))
}

fn search_path(out: &Path, replicate: u64, key: &str) -> PathBuf {
    out.join("search")
        .join(format!("r{replicate}"))
        .join(format!("{key}.json"))
}

/// Dims for a one-line summary: all of them when few, else the first few and the count.
pub fn dims_summary(dims: &[u32]) -> String {
    if dims.len() <= 8 {
        format!("{dims:?}")
    } else {
        let head: Vec<String> = dims[..6].iter().map(|d| d.to_string()).collect();
        format!("[{}, … {} dims]", head.join(", "), dims.len())
    }
}

/// Runs (or resumes) a study. Returns the number of scores computed now.
pub fn run(study: &Study, study_text: &str, opts: &RunOptions) -> Result<usize> {
    let _lock = lock_run_dir(&opts.out)?;
    let t0 = Instant::now();
    // Sets are loaded (and fetched) before the model, so a bad dataset fails fast.
    let mut sets: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let d = &study.file.datasets;
    for s in [
        &d.direction.good,
        &d.direction.bad,
        &d.evaluation.good,
        &d.evaluation.bad,
    ] {
        if !sets.contains_key(&s.name) {
            sets.insert(s.name.clone(), crate::datasets::load(&s.name)?);
        }
    }
    let mut lm = model::load(&study.file.model)?;
    let plan = plan(study, lm.model.num_layers())?;
    let plan_json = serde_json::to_vec_pretty(&plan)?;
    let plan_path = opts.out.join("plan.json");
    match fs::read(&plan_path) {
        Ok(old) if old != plan_json => bail!(
            "{} holds the results of a different plan (the study changed); use another output folder or delete it",
            opts.out.display()
        ),
        Ok(_) => {}
        Err(_) => write_atomic(&plan_path, &plan_json)?,
    }
    write_atomic(&opts.out.join("study.yaml"), study_text.as_bytes())?;
    let cache = cache_dir(&opts.out, opts.shard);
    let mut prov = Provenance {
        tool_version: env!("CARGO_PKG_VERSION").into(),
        git_revision: git_revision(),
        model: study.file.model.clone(),
        model_sha256: lm.sha256.clone(),
        study_sha256: sha_hex(study_text.as_bytes()),
        datasets: BTreeMap::new(),
        seeds: plan.replicates.clone(),
        machine: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    eprintln!(
        "study {}: {} variants x {} replicate(s) on {} (loaded in {:.1} s)",
        study.name,
        plan.variants.len(),
        plan.replicates.len(),
        study.file.model,
        lm.load_seconds
    );
    let mut computed = 0;
    let mut assignments: Vec<Assignment> = Vec::new();
    for &seed in &plan.replicates {
        let tuned_variants: Vec<&PlannedVariant> = plan
            .variants
            .iter()
            .filter(|v| v.variant.tune.is_some())
            .collect();
        let keep_scan = tuned_variants
            .iter()
            .any(|v| !tune_path(&opts.out, seed, &v.id).exists());
        let mut rep = prepare_replicate(
            study, &lm, &plan, seed, &cache, &sets, &mut prov, keep_scan, &opts.out,
        )?;
        // Tuning first: its chosen dims decide which scores the tuned variants share.
        let mut tuned: BTreeMap<String, TuneResult> = BTreeMap::new();
        for pv in &tuned_variants {
            let path = tune_path(&opts.out, seed, &pv.id);
            let r: TuneResult = match fs::read(&path) {
                Ok(b) => serde_json::from_slice(&b)
                    .with_context(|| format!("{} is unreadable", path.display()))?,
                Err(_) => {
                    let spec = pv.variant.tune.as_ref().expect("tuned");
                    let sel = rep
                        .selection
                        .as_ref()
                        .context("tuning needs datasets.selection")?;
                    let scan = rep.data.scan.as_ref().context("tuning needs the scan")?;
                    eprintln!(
                        "tuning {} on the selection split ({} trials)",
                        pv.variant.name, spec.trials
                    );
                    let mut memo = optimize::Memo::load(&path.with_extension("partial"));
                    let r = optimize::tune_thresholds(
                        &mut lm,
                        sel,
                        &pv.variant,
                        &pv.id,
                        seed,
                        scan,
                        &rep.data,
                        spec,
                        &mut memo,
                    )?;
                    write_atomic(&path, &serde_json::to_vec_pretty(&r)?)?;
                    memo.remove();
                    eprintln!(
                        "tuned {} r{seed}: {} -> dims {} (selection objective {:.4}; {} distinct dim sets scored, {:.0} s)",
                        pv.variant.name,
                        r.thresholds
                            .iter()
                            .map(|(k, v)| format!("{k}={v:.1}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        dims_summary(&r.dims),
                        r.objective,
                        r.trials.iter().filter(|t| t.scored).count(),
                        r.seconds
                    );
                    r
                }
            };
            tuned.insert(pv.id.clone(), r);
        }
        rep.data.scan = None;
        write_atomic(
            &opts
                .out
                .join("results")
                .join(format!("r{seed}"))
                .join("reference.json"),
            &serde_json::to_vec(&rep.base)?,
        )?;
        // Resolve every variant to its dims, then group by what the edit depends on.
        let mut groups: BTreeMap<String, (Vec<u32>, Vec<&PlannedVariant>)> = BTreeMap::new();
        for pv in &plan.variants {
            let dims =
                match (&pv.variant.detect, pv.variant.needs_dims()) {
                    (_, true) if pv.variant.tune.is_some() => tuned[&pv.id].dims.clone(),
                    (Some(c), true) => rep.dims.get(&hash_json(c)).cloned().with_context(|| {
                        format!("no detected dims for variant {}", pv.variant.name)
                    })?,
                    _ => Vec::new(),
                };
            let key = score_key(&pv.variant, &dims, seed);
            groups
                .entry(key)
                .or_insert_with(|| (dims, Vec::new()))
                .1
                .push(pv);
        }
        let keys: Vec<String> = groups.keys().cloned().collect();
        for (i, key) in keys.iter().enumerate() {
            let (dims, members) = &groups[key];
            for pv in members {
                assignments.push(Assignment {
                    replicate: seed,
                    variant_id: pv.id.clone(),
                    key: key.clone(),
                    dims: dims.clone(),
                });
            }
            if let Some((si, sn)) = opts.shard {
                if i % sn != si {
                    continue;
                }
            }
            let path = result_path(&opts.out, seed, key);
            if path.exists() {
                continue;
            }
            let t = Instant::now();
            let data = variant::prepare_with_dims(&rep.data, &members[0].variant, dims)?;
            let mut searched = None;
            if let Some(spec) = &members[0].variant.search {
                let spath = search_path(&opts.out, seed, key);
                let sr: SearchResult = match fs::read(&spath) {
                    Ok(b) => serde_json::from_slice(&b)
                        .with_context(|| format!("{} is unreadable", spath.display()))?,
                    Err(_) => {
                        let sel = rep
                            .selection
                            .as_ref()
                            .context("ablation.search needs datasets.selection")?;
                        let t = Instant::now();
                        let label = format!("r{seed} {}", trunc(&members[0].variant.name, 24));
                        let mut memo = optimize::Memo::load(&spath.with_extension("partial"));
                        let (params, objective, base_refusals, trials) = optimize::search_edit(
                            &mut lm,
                            sel,
                            &members[0].variant,
                            &data,
                            spec,
                            &label,
                            &mut memo,
                        )?;
                        let sr = SearchResult {
                            key: key.clone(),
                            replicate: seed,
                            variant_ids: members.iter().map(|m| m.id.clone()).collect(),
                            params,
                            objective,
                            base_refusals,
                            trials,
                            seconds: t.elapsed().as_secs_f64(),
                        };
                        write_atomic(&spath, &serde_json::to_vec_pretty(&sr)?)?;
                        memo.remove();
                        sr
                    }
                };
                searched = Some(sr.params);
            }
            let mut vv = members[0].variant.clone();
            if let Some(p) = &searched {
                vv.ablation = p.clone();
            }
            let v = &vv;
            let pb = progress_bar(
                (rep.evaluator.good.len() * 2 + rep.evaluator.bad.len()) as u64,
                &format!("r{seed} {}", trunc(&v.name, 34)),
            );
            let out = variant::score(&mut lm, &rep.evaluator, v, &data, |_, n| pb.inc(n as u64))?;
            pb.finish_and_clear();
            let rec = ScoreRecord {
                key: key.clone(),
                replicate: seed,
                dims: dims.clone(),
                variant_ids: members.iter().map(|m| m.id.clone()).collect(),
                outcome: out,
                ablation: searched,
            };
            write_atomic(&path, &serde_json::to_vec(&rec)?)?;
            computed += 1;
            let names: Vec<&str> = members.iter().map(|m| m.variant.name.as_str()).collect();
            eprintln!(
                "[{}/{}] r{seed} {:<40} refusals {:>3}/{:<3} KL {:.4} dims {} ({:.0} s{})",
                i + 1,
                keys.len(),
                trunc(&names.join(" | "), 40),
                rec.outcome.refused.iter().filter(|x| **x).count(),
                rec.outcome.refused.len(),
                rec.outcome.kl_mean(),
                dims_summary(dims),
                t.elapsed().as_secs_f64(),
                if names.len() > 1 {
                    format!(", shared by {} variants", names.len())
                } else {
                    String::new()
                }
            );
        }
        let _ = rep.seed;
    }
    let shard_tag = opts
        .shard
        .map(|(i, n)| format!("-shard-{i}-of-{n}"))
        .unwrap_or_default();
    write_atomic(
        &opts.out.join(format!("assignments{shard_tag}.json")),
        &serde_json::to_vec_pretty(&assignments)?,
    )?;
    write_atomic(
        &opts.out.join(format!("provenance{shard_tag}.json")),
        &serde_json::to_vec_pretty(&prov)?,
    )?;
    if opts.shard.is_none() {
        write_tables(&opts.out)?;
    }
    eprintln!(
        "study {} finished: {computed} score(s) computed now, {:.0} s",
        study.name,
        t0.elapsed().as_secs_f64()
    );
    Ok(computed)
}

fn trunc(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// Which score each (replicate, variant) maps to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Assignment {
    pub replicate: u64,
    pub variant_id: String,
    pub key: String,
    pub dims: Vec<u32>,
}

/// Everything a report needs, read back from a run directory.
pub struct RunResults {
    pub plan: Plan,
    pub assignments: Vec<Assignment>,
    pub scores: BTreeMap<(u64, String), ScoreRecord>,
    pub references: BTreeMap<u64, Outcome>,
    pub tunes: Vec<TuneResult>,
    pub searches: Vec<SearchResult>,
    /// The detection summary of each replicate (runs with detection only).
    pub detections: BTreeMap<u64, detect::summary::Summary>,
}

/// Every JSON file under `dir/<sub>/r*/`, parsed.
fn read_json_tree<T: serde::de::DeserializeOwned>(dir: &Path, sub: &str) -> Result<Vec<T>> {
    let mut out = Vec::new();
    let root = dir.join(sub);
    if !root.is_dir() {
        return Ok(out);
    }
    let mut files = Vec::new();
    for rep in fs::read_dir(&root)? {
        let rep = rep?.path();
        if rep.is_dir() {
            for f in fs::read_dir(&rep)? {
                let p = f?.path();
                if p.extension().is_some_and(|x| x == "json") {
                    files.push(p);
                }
            }
        }
    }
    // Sorted, so reports do not depend on the order the file system lists files in.
    files.sort();
    for p in files {
        out.push(
            serde_json::from_slice(&fs::read(&p)?)
                .with_context(|| format!("{} is unreadable", p.display()))?,
        );
    }
    Ok(out)
}

pub fn read_results(dir: &Path) -> Result<RunResults> {
    let plan: Plan =
        serde_json::from_slice(&fs::read(dir.join("plan.json")).with_context(|| {
            format!("{} is not a run directory (no plan.json)", dir.display())
        })?)?;
    let mut assignments: Vec<Assignment> = Vec::new();
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    entries.sort();
    for p in entries {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("assignments") && name.ends_with(".json") {
            let a: Vec<Assignment> = serde_json::from_slice(&fs::read(&p)?)?;
            for x in a {
                if !assignments.contains(&x) {
                    assignments.push(x);
                }
            }
        }
    }
    let mut scores = BTreeMap::new();
    let mut references = BTreeMap::new();
    let mut detections = BTreeMap::new();
    let results = dir.join("results");
    if results.is_dir() {
        for rep in fs::read_dir(&results)? {
            let rep = rep?.path();
            // Per-replicate files are named for their replicate's folder, r<seed>.
            let seed: u64 = rep
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix('r'))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            for f in fs::read_dir(&rep)? {
                let p = f?.path();
                if !p.extension().is_some_and(|x| x == "json") {
                    continue;
                }
                let bytes = fs::read(&p)?;
                let unreadable = || format!("{} is unreadable", p.display());
                match p.file_name().and_then(|n| n.to_str()) {
                    Some("detection.json") => {
                        detections.insert(
                            seed,
                            serde_json::from_slice(&bytes).with_context(unreadable)?,
                        );
                    }
                    Some("reference.json") => {
                        references.insert(
                            seed,
                            serde_json::from_slice(&bytes).with_context(unreadable)?,
                        );
                    }
                    _ => {
                        let r: ScoreRecord =
                            serde_json::from_slice(&bytes).with_context(unreadable)?;
                        scores.insert((r.replicate, r.key.clone()), r);
                    }
                }
            }
        }
    }
    Ok(RunResults {
        plan,
        assignments,
        scores,
        references,
        detections,
        tunes: read_json_tree(dir, "tune")?,
        searches: read_json_tree(dir, "search")?,
    })
}

/// variants.parquet (one row per variant and replicate) and outcomes.parquet (one row per
/// prompt and score), rebuilt from the stored results.
pub fn write_tables(dir: &Path) -> Result<()> {
    let r = read_results(dir)?;
    let names: BTreeMap<&str, &PlannedVariant> =
        r.plan.variants.iter().map(|v| (v.id.as_str(), v)).collect();
    let (mut id, mut name, mut handling, mut rep, mut key, mut dims, mut shared) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut k, mut n, mut rate, mut lo, mut hi, mut kl, mut over, mut secs) = (
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
    );
    for a in &r.assignments {
        let Some(s) = r.scores.get(&(a.replicate, a.key.clone())) else {
            continue;
        };
        let Some(pv) = names.get(a.variant_id.as_str()) else {
            continue;
        };
        let rr = s.outcome.refusal_rate();
        id.push(a.variant_id.clone());
        name.push(pv.variant.name.clone());
        handling.push(super::plan::handling_label(&pv.variant));
        rep.push(a.replicate);
        key.push(a.key.clone());
        dims.push(format!("{:?}", a.dims));
        shared.push(s.variant_ids.len() as u32);
        k.push(rr.k as u32);
        n.push(rr.n as u32);
        rate.push(rr.rate);
        lo.push(rr.lo);
        hi.push(rr.hi);
        kl.push(s.outcome.kl_mean());
        over.push(s.outcome.over_refusal_rate().rate);
        secs.push(s.outcome.seconds);
    }
    let height = id.len();
    let mut df = DataFrame::new(
        height,
        vec![
            Column::new("variant_id".into(), id),
            Column::new("name".into(), name),
            Column::new("handling".into(), handling),
            Column::new("replicate".into(), rep),
            Column::new("score_key".into(), key),
            Column::new("dims".into(), dims),
            Column::new("shared_by".into(), shared),
            Column::new("refusals".into(), k),
            Column::new("n_bad".into(), n),
            Column::new("refusal_rate".into(), rate),
            Column::new("refusal_lo".into(), lo),
            Column::new("refusal_hi".into(), hi),
            Column::new("kl_mean".into(), kl),
            Column::new("over_refusal_rate".into(), over),
            Column::new("seconds".into(), secs),
        ],
    )?;
    detect::table::write_parquet(&mut df, &dir.join("variants.parquet"))?;
    let (mut skey, mut srep, mut set, mut idx, mut refused, mut reply, mut klv, mut overv) = (
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
    );
    for s in r.scores.values() {
        for (i, (rf, rp)) in s.outcome.refused.iter().zip(&s.outcome.replies).enumerate() {
            skey.push(s.key.clone());
            srep.push(s.replicate);
            set.push("bad");
            idx.push(i as u32);
            refused.push(Some(*rf));
            reply.push(Some(rp.clone()));
            klv.push(None::<f64>);
            overv.push(None::<bool>);
        }
        for (i, x) in s.outcome.kl.iter().enumerate() {
            skey.push(s.key.clone());
            srep.push(s.replicate);
            set.push("good");
            idx.push(i as u32);
            refused.push(None);
            reply.push(None);
            klv.push(Some(*x));
            overv.push(s.outcome.over_refused.get(i).copied());
        }
    }
    let h = skey.len();
    let mut df = DataFrame::new(
        h,
        vec![
            Column::new("score_key".into(), skey),
            Column::new("replicate".into(), srep),
            Column::new("set".into(), set),
            Column::new("prompt_index".into(), idx),
            Column::new("refused".into(), refused),
            Column::new("reply".into(), reply),
            Column::new("kl".into(), klv),
            Column::new("over_refused".into(), overv),
        ],
    )?;
    detect::table::write_parquet(&mut df, &dir.join("outcomes.parquet"))?;
    Ok(())
}

/// Combines shard runs into `into`: their scores, assignments and references, after checking
/// they ran the same plan.
pub fn merge(into: &Path, shards: &[PathBuf]) -> Result<()> {
    let _lock = lock_run_dir(into)?;
    let mut plan: Option<Vec<u8>> = fs::read(into.join("plan.json")).ok();
    for s in shards {
        let p = fs::read(s.join("plan.json"))
            .with_context(|| format!("{} is not a run directory (no plan.json)", s.display()))?;
        match &plan {
            Some(existing) if *existing != p => bail!(
                "{} ran a different plan than {}; only shards of one study merge",
                s.display(),
                into.display()
            ),
            Some(_) => {}
            None => {
                write_atomic(&into.join("plan.json"), &p)?;
                plan = Some(p);
            }
        }
        for f in ["study.yaml"] {
            if let Ok(b) = fs::read(s.join(f)) {
                write_atomic(&into.join(f), &b)?;
            }
        }
        for e in fs::read_dir(s)? {
            let p = e?.path();
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string();
            if (name.starts_with("assignments") || name.starts_with("provenance"))
                && name.ends_with(".json")
                && s != into
            {
                write_atomic(&into.join(&name), &fs::read(&p)?)?;
            }
        }
        for sub in ["results", "tune", "search"] {
            let res = s.join(sub);
            if !res.is_dir() {
                continue;
            }
            for rep in fs::read_dir(&res)? {
                let rep = rep?.path();
                let rname = rep.file_name().expect("dir").to_owned();
                for f in fs::read_dir(&rep)? {
                    let p = f?.path();
                    let target = into
                        .join(sub)
                        .join(&rname)
                        .join(p.file_name().expect("file"));
                    if !target.exists() {
                        write_atomic(&target, &fs::read(&p)?)?;
                    }
                }
            }
        }
    }
    write_tables(into)
}

/// Writes the run's provenance when it did not exist (used by tests).
pub fn plan_of(dir: &Path) -> Result<Plan> {
    Ok(serde_json::from_slice(&fs::read(dir.join("plan.json"))?)?)
}
