//! The run directory: its layout and every read and write of it. A user can read a run folder
//! with this description and no code.
//!
//! ```text
//! RUN/
//!   study.yaml                  the study file as run (its `statistics:` block decides the report)
//!   plan.json                   the planned variants (ids hash their settings) and replicate seeds
//!   assignments[-shard-I-of-N].json   per replicate and variant: its dims and score key
//!   provenance[-shard-I-of-N].json    tool version, git revision, model sha256, prompt hashes
//!   partial.json                only after `merge --allow-partial` left scores out: which ones
//!   results/r<seed>/
//!     <key>.json                one distinct score: key, dims, variant ids, per-prompt outcome
//!                               (refused, replies, reply tokens, KL, over-refused, seconds), and
//!                               the searched edit when there was a search
//!     reference.json            the unedited model's outcome on the evaluation prompts
//!     prompts.json              the evaluation prompts, harmless and harmful, in scoring order,
//!                               and each one's prompt set
//!     detection.json            the detection summary the report's figures need
//!   results/classifiers.json    with several refusal classifiers: each one's accuracy on the
//!                               labelled replies (datasets/refusal-judgements.jsonl), the judge's cost
//!   tune/r<seed>/<variant id>.json      a tuning: chosen thresholds, dims, every trial
//!   tune/r<seed>/<variant id>.partial   while it runs: the scores so far (the memo)
//!   search/r<seed>/<key>.json   an edit search: best kernel, every trial (.partial while it runs)
//!   cache/ (cache-shard-I-of-N/)  content-addressed caches, safe to delete at any time:
//!     direction-<hash>/         good.f32, bad.f32 (residuals: little-endian u64 n, states, d,
//!                               then n·states·d f32), dims.json, candidates.parquet,
//!                               detection.json, done
//!     reference-<hash>.json     the unedited model's outcome on one prompt split
//!     judge-<model>.json        a judge's P(refusal) by (judge, prompt, reply) hash
//!   validation/                 with `detection_validation:` (run once, before the variants):
//!     validation.json           settings, corpus, every candidate's damages and label, every
//!                               configuration's dims and dim- / entry-level precision, recall, F1
//!     candidates.parquet        one row per candidate (dim, damages, label, instances, tokens)
//!     scores.parquet            one row per scored configuration
//!   variants.parquet            one row per variant and replicate (rebuilt from results/)
//!   outcomes.parquet            one row per prompt and score (rebuilt from results/), with the
//!                               prompt's set as `source`; with several classifiers,
//!                               refused_by_<name> and p_refusal_<judge>
//!   .lock                       held while a run or a merge writes here
//! ```
//!
//! Every file is written through a temporary file and a rename, so a killed run leaves whole
//! files only; a score's file is its completion marker.

use super::plan::{Plan, PlannedVariant};
use crate::ablate::AblationParams;
use crate::detect;
use crate::direction::Residuals;
use crate::evaluate::Outcome;
use crate::fs::write_atomic;
use anyhow::{bail, Context, Result};
use polars::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

pub fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn hash_json<T: Serialize>(v: &T) -> String {
    sha_hex(serde_json::to_string(v).expect("serialisable").as_bytes())[..16].to_string()
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

pub fn cache_dir(out: &Path, shard: Option<(usize, usize)>) -> PathBuf {
    match shard {
        Some((i, n)) => out.join(format!("cache-shard-{i}-of-{n}")),
        None => out.join("cache"),
    }
}

pub fn save_residuals(path: &Path, r: &Residuals) -> Result<()> {
    let mut bytes = Vec::with_capacity(24 + r.data.len() * 4);
    for v in [r.n as u64, r.states as u64, r.d as u64] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    for x in &r.data {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    write_atomic(path, &bytes)
}

pub fn load_residuals(path: &Path) -> Result<Residuals> {
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

/// One direction pass's cache folder: residuals, detected dims per detection config, the
/// candidate table and the detection summary; `done` marks it whole.
pub struct DirectionCache {
    dir: PathBuf,
}

impl DirectionCache {
    pub fn new(cache: &Path, key: &str) -> DirectionCache {
        DirectionCache {
            dir: cache.join(format!("direction-{key}")),
        }
    }

    /// Detected dims by detection-config hash (empty when none are cached).
    pub fn dims(&self) -> BTreeMap<String, Vec<u32>> {
        fs::read(self.dir.join("dims.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Whether a finished pass is here (with its detection summary when the run detects).
    pub fn is_complete(&self, with_summary: bool) -> bool {
        self.dir.join("done").exists()
            && (!with_summary || self.dir.join("detection.json").exists())
    }

    pub fn residuals(&self) -> Result<(Residuals, Residuals)> {
        Ok((
            load_residuals(&self.dir.join("good.f32"))?,
            load_residuals(&self.dir.join("bad.f32"))?,
        ))
    }

    pub fn store(
        &self,
        good: &Residuals,
        bad: &Residuals,
        dims: &BTreeMap<String, Vec<u32>>,
        detected: Option<(DataFrame, detect::summary::Summary)>,
    ) -> Result<()> {
        save_residuals(&self.dir.join("good.f32"), good)?;
        save_residuals(&self.dir.join("bad.f32"), bad)?;
        if let Some((mut table, summary)) = detected {
            detect::table::write_parquet(&mut table, &self.dir.join("candidates.parquet"))?;
            write_atomic(
                &self.dir.join("detection.json"),
                &serde_json::to_vec(&summary)?,
            )?;
        }
        write_atomic(
            &self.dir.join("dims.json"),
            &serde_json::to_vec_pretty(dims)?,
        )?;
        write_atomic(&self.dir.join("done"), b"ok\n")
    }

    /// Copies the detection summary into the replicate's results, where reports read it.
    pub fn publish_summary(&self, replicate_dir: &Path) -> Result<()> {
        if let Ok(b) = fs::read(self.dir.join("detection.json")) {
            write_atomic(&replicate_dir.join("detection.json"), &b)?;
        }
        Ok(())
    }
}

/// Each classifier's accuracy on the labelled replies and the judge's cost.
pub fn classifiers_path(out: &Path) -> PathBuf {
    out.join("results").join("classifiers.json")
}

/// A judge's cache: P(refusal) by (judge, prompt, reply) hash.
pub fn judge_cache_path(cache: &Path, judge: &str) -> PathBuf {
    let safe: String = judge
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    cache.join(format!("judge-{safe}.json"))
}

/// The cached outcome of the unedited model on one prompt split.
pub fn reference_cache_path(cache: &Path, key: &str) -> PathBuf {
    cache.join(format!("reference-{key}.json"))
}

pub fn result_path(out: &Path, replicate: u64, key: &str) -> PathBuf {
    out.join("results")
        .join(format!("r{replicate}"))
        .join(format!("{key}.json"))
}

pub fn tune_path(out: &Path, replicate: u64, variant_id: &str) -> PathBuf {
    out.join("tune")
        .join(format!("r{replicate}"))
        .join(format!("{variant_id}.json"))
}

pub fn search_path(out: &Path, replicate: u64, key: &str) -> PathBuf {
    out.join("search")
        .join(format!("r{replicate}"))
        .join(format!("{key}.json"))
}

/// Where replicate `replicate`'s per-replicate files live.
pub fn replicate_dir(out: &Path, replicate: u64) -> PathBuf {
    out.join("results").join(format!("r{replicate}"))
}

fn shard_tag(shard: Option<(usize, usize)>) -> String {
    shard
        .map(|(i, n)| format!("-shard-{i}-of-{n}"))
        .unwrap_or_default()
}

pub fn assignments_path(out: &Path, shard: Option<(usize, usize)>) -> PathBuf {
    out.join(format!("assignments{}.json", shard_tag(shard)))
}

pub fn provenance_path(out: &Path, shard: Option<(usize, usize)>) -> PathBuf {
    out.join(format!("provenance{}.json", shard_tag(shard)))
}

/// Writes the plan, or checks that the directory holds this plan's results.
pub fn write_or_check_plan(out: &Path, plan: &Plan) -> Result<()> {
    let plan_json = serde_json::to_vec_pretty(plan)?;
    let plan_path = out.join("plan.json");
    match fs::read(&plan_path) {
        Ok(old) if old != plan_json => {
            // Only the refusal classifiers changed: every stored score stays valid (the runner
            // completes cut replies and adds the new labels).
            let parsed = (
                serde_json::from_slice::<Plan>(&old),
                serde_json::from_slice::<Plan>(&plan_json),
            );
            if let (Ok(a), Ok(b)) = &parsed {
                if let Some(n) = a.added_by(b) {
                    eprintln!(
                        "{}: the study added {n} variant(s); stored scores are kept and the new variants are scored",
                        out.display()
                    );
                    return write_atomic(&plan_path, &plan_json);
                }
            }
            if !plans_share_scores(&old, &plan_json) {
                bail!(
                    "{} holds the results of a different plan (the study changed); use another output folder or delete it",
                    out.display()
                );
            }
            eprintln!(
                "{}: the study's refusal classifiers changed; stored scores are kept, replies cut at heretic's markers are completed and relabelled",
                out.display()
            );
            write_atomic(&plan_path, &plan_json)
        }
        Ok(_) => Ok(()),
        Err(_) => write_atomic(&plan_path, &plan_json),
    }
}

/// Whether two `plan.json` files, as bytes, plan the same scores (they differ at most in the
/// refusal classifiers); an unreadable one shares nothing.
fn plans_share_scores(a: &[u8], b: &[u8]) -> bool {
    match (
        serde_json::from_slice::<Plan>(a),
        serde_json::from_slice::<Plan>(b),
    ) {
        (Ok(a), Ok(b)) => a.same_scores(&b),
        _ => false,
    }
}

/// A stored JSON record, or None when it does not exist yet; an unreadable one is an error.
pub fn read_record<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!(
                "{} is unreadable; delete it to recompute it",
                path.display()
            )
        })?)),
        Err(_) => Ok(None),
    }
}

pub fn write_record<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(v)?)
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
    /// The refusal classifiers the study named (`heretic` alone when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classifiers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<JudgeProvenance>,
    /// heretic's marker list the refusals were counted with (absent: runs before 2026-11-29,
    /// which counted with `heretic-1.3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub markers: Option<crate::evaluate::MarkerList>,
    /// The precision the model ran in (absent: f32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<crate::model::Precision>,
}

/// What a judge was asked and how its answer was read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JudgeProvenance {
    pub model: String,
    pub system: String,
    /// The question, with {request} and {reply} where the texts go.
    pub question: String,
    pub threshold: f64,
}

impl Provenance {
    pub fn new(model: &str, model_sha256: Option<String>, study_text: &str, plan: &Plan) -> Self {
        Provenance {
            tool_version: env!("CARGO_PKG_VERSION").into(),
            git_revision: git_revision(),
            model: model.to_string(),
            model_sha256,
            study_sha256: sha_hex(study_text.as_bytes()),
            datasets: BTreeMap::new(),
            seeds: plan.replicates.clone(),
            machine: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
            // What ran, not what the machine has: RAYON_NUM_THREADS / CANDLE_NUM_THREADS set it.
            threads: crate::model::pool::threads(),
            classifiers: Vec::new(),
            judge: None,
            markers: None,
            precision: None,
        }
    }
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

/// One evaluation of the objective.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Trial {
    pub index: usize,
    /// The optimised values (thresholds, or the edit's parameters).
    pub params: BTreeMap<String, f64>,
    /// Dims detected with these thresholds (tuning only).
    #[serde(default)]
    pub dims: Option<Vec<u32>>,
    pub objective: f64,
    pub refusals: usize,
    pub n_bad: usize,
    pub kl: f64,
    /// False when the same dims had been scored before and the score was reused.
    pub scored: bool,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TuneResult {
    pub variant_id: String,
    pub name: String,
    pub replicate: u64,
    pub thresholds: BTreeMap<String, f64>,
    pub dims: Vec<u32>,
    /// The selection-split objective of the chosen thresholds.
    pub objective: f64,
    pub base_refusals: usize,
    pub trials: Vec<Trial>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchResult {
    pub key: String,
    pub replicate: u64,
    pub variant_ids: Vec<String>,
    pub params: AblationParams,
    pub objective: f64,
    pub base_refusals: usize,
    /// Indices of the trials on the (refusals, KL) Pareto front.
    #[serde(default)]
    pub pareto: Vec<usize>,
    /// The index of the kept trial.
    #[serde(default)]
    pub chosen: Option<usize>,
    /// How the kept kernel was chosen (empty in runs before it was recorded: the summed objective).
    #[serde(default)]
    pub rule: String,
    pub trials: Vec<Trial>,
    pub seconds: f64,
}

/// The best trial: lowest objective; among equal objectives the lowest KL (the gentlest edit —
/// below the KL target heretic's objective only sees refusals, so ties are common), then the
/// earliest, so reruns pick the same one.
pub fn best(trials: &[Trial]) -> Option<&Trial> {
    trials.iter().fold(None, |b: Option<&Trial>, t| match b {
        Some(b) if (b.objective, b.kl) <= (t.objective, t.kl) => Some(b),
        _ => Some(t),
    })
}

/// How many trials share the best objective: when it is most of them, the selection split did
/// not separate the candidates.
pub fn tied_at_best(trials: &[Trial]) -> usize {
    let Some(b) = best(trials) else { return 0 };
    trials.iter().filter(|t| t.objective == b.objective).count()
}

/// One objective evaluation's figures.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Scored {
    pub objective: f64,
    pub refusals: usize,
    pub n_bad: usize,
    pub kl: f64,
}

/// The scores an optimisation has computed so far, written after each one. The swarm is seeded,
/// so a rerun after Ctrl-C or kill -9 proposes the same points and takes their scores from here
/// instead of the model.
pub struct Memo {
    path: PathBuf,
    map: BTreeMap<String, Scored>,
}

impl Memo {
    pub fn load(path: &Path) -> Memo {
        let map = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Memo {
            path: path.to_path_buf(),
            map,
        }
    }

    pub fn get(&self, key: &str) -> Option<Scored> {
        self.map.get(key).copied()
    }

    pub fn put(&mut self, key: String, s: Scored) -> Result<()> {
        self.map.insert(key, s);
        write_atomic(&self.path, &serde_json::to_vec(&self.map)?)
    }

    /// The optimisation finished and its result is stored: the memo is no longer needed.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
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
    /// Scores a `merge --allow-partial` left out (`r<seed>/<key>`); empty for a whole run.
    pub missing: Vec<String>,
    /// Each replicate's evaluation prompts (harmless, harmful), when recorded.
    pub prompts: BTreeMap<u64, EvalPrompts>,
    /// results/classifiers.json: the classifiers' accuracy on the labelled replies and the
    /// judge's cost, when the study named several classifiers.
    pub classifiers: Option<serde_json::Value>,
}

/// One replicate's evaluation prompts, in scoring order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalPrompts {
    pub good: Vec<String>,
    pub bad: Vec<String>,
    /// Each prompt's prompt set (absent in runs made before several sets per split).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub good_sources: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bad_sources: Vec<String>,
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
    let mut prompts = BTreeMap::new();
    if results.is_dir() {
        for rep in fs::read_dir(&results)? {
            let rep = rep?.path();
            if !rep.is_dir() {
                continue;
            }
            // Per-replicate files are named for their replicate's folder, r<seed>.
            let seed: u64 = rep
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix('r'))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            for f in fs::read_dir(&rep)? {
                let p = f?.path();
                if p.extension().is_none_or(|x| x != "json") {
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
                    Some("prompts.json") => {
                        prompts.insert(
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
    if assignments.is_empty() {
        // A run folder copied without its assignments (as the decisive study's was committed)
        // still says which variants each score is for: the score records name them.
        for s in scores.values() {
            for id in &s.variant_ids {
                assignments.push(Assignment {
                    replicate: s.replicate,
                    variant_id: id.clone(),
                    key: s.key.clone(),
                    dims: s.dims.clone(),
                });
            }
        }
        let order: BTreeMap<&str, usize> = plan
            .variants
            .iter()
            .enumerate()
            .map(|(i, v)| (v.id.as_str(), i))
            .collect();
        assignments.sort_by_key(|a| (a.replicate, order.get(a.variant_id.as_str()).copied()));
    }
    Ok(RunResults {
        plan,
        assignments,
        scores,
        references,
        detections,
        tunes: read_json_tree(dir, "tune")?,
        searches: read_json_tree(dir, "search")?,
        missing: read_record::<serde_json::Value>(&dir.join("partial.json"))?
            .and_then(|v| serde_json::from_value(v["missing"].clone()).ok())
            .unwrap_or_default(),
        prompts,
        classifiers: read_record(&classifiers_path(dir))?,
    })
}

/// variants.parquet (one row per variant and replicate) and outcomes.parquet (one row per
/// prompt and score), rebuilt from the stored results. No wall-clock figure goes in, so a
/// resumed run's tables equal an uninterrupted run's byte for byte (timings stay in the score
/// files).
pub fn write_tables(dir: &Path) -> Result<()> {
    let r = read_results(dir)?;
    let names: BTreeMap<&str, &PlannedVariant> =
        r.plan.variants.iter().map(|v| (v.id.as_str(), v)).collect();
    let (mut id, mut name, mut handling, mut rep, mut key, mut dims, mut shared) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut k, mut n, mut rate, mut lo, mut hi, mut kl, mut over) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
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
    // The prompt set each prompt came from (None in runs made before it was recorded).
    let mut source: Vec<Option<String>> = Vec::new();
    // Every other classifier's label (and a judge's score) per reply, one column each.
    let classifiers: BTreeSet<&String> = r
        .scores
        .values()
        .flat_map(|s| s.outcome.labels.keys())
        .collect();
    let judges: BTreeSet<&String> = r
        .scores
        .values()
        .flat_map(|s| s.outcome.judge_scores.keys())
        .collect();
    let mut labels: Vec<Vec<Option<bool>>> = vec![Vec::new(); classifiers.len()];
    let mut scores: Vec<Vec<Option<f64>>> = vec![Vec::new(); judges.len()];
    for s in r.scores.values() {
        let n_bad = s.outcome.refused.len();
        for (c, col) in classifiers.iter().zip(labels.iter_mut()) {
            let l = s.outcome.labels.get(*c);
            col.extend((0..n_bad).map(|i| l.and_then(|v| v.get(i)).copied()));
            col.extend(std::iter::repeat_n(None, s.outcome.kl.len()));
        }
        for (j, col) in judges.iter().zip(scores.iter_mut()) {
            let p = s.outcome.judge_scores.get(*j);
            col.extend((0..n_bad).map(|i| p.and_then(|v| v.get(i)).copied()));
            col.extend(std::iter::repeat_n(None, s.outcome.kl.len()));
        }
        let src = r.prompts.get(&s.replicate);
        let source_of = |side: &[String], i: usize| side.get(i).cloned();
        for (i, (rf, rp)) in s.outcome.refused.iter().zip(&s.outcome.replies).enumerate() {
            source.push(src.and_then(|p| source_of(&p.bad_sources, i)));
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
            source.push(src.and_then(|p| source_of(&p.good_sources, i)));
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
    let mut columns = vec![
        Column::new("score_key".into(), skey),
        Column::new("replicate".into(), srep),
        Column::new("set".into(), set),
        Column::new("prompt_index".into(), idx),
        Column::new("source".into(), source),
        Column::new("refused".into(), refused),
        Column::new("reply".into(), reply),
        Column::new("kl".into(), klv),
        Column::new("over_refused".into(), overv),
    ];
    for (c, col) in classifiers.iter().zip(labels) {
        columns.push(Column::new(format!("refused_by_{c}").into(), col));
    }
    for (j, col) in judges.iter().zip(scores) {
        columns.push(Column::new(format!("p_refusal_{j}").into(), col));
    }
    let mut df = DataFrame::new(h, columns)?;
    detect::table::write_parquet(&mut df, &dir.join("outcomes.parquet"))?;
    Ok(())
}

pub fn validation_path(out: &Path) -> PathBuf {
    out.join("validation").join("validation.json")
}

/// The detection validation, if the run has one.
pub fn read_validation(dir: &Path) -> Result<Option<detect::validate::Validation>> {
    read_record(&validation_path(dir))
}

/// The validation's record and its two tables; the JSON is written last, as its completion mark.
pub fn write_validation(out: &Path, v: &detect::validate::Validation) -> Result<()> {
    let dir = out.join("validation");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let c = &v.candidates;
    let n = c.len();
    let mut df = DataFrame::new(
        n,
        vec![
            Column::new("dim".into(), c.iter().map(|x| x.dim).collect::<Vec<_>>()),
            Column::new(
                "first_state".into(),
                c.iter().map(|x| x.first_state).collect::<Vec<_>>(),
            ),
            Column::new(
                "peak_abs".into(),
                c.iter().map(|x| x.peak_abs).collect::<Vec<_>>(),
            ),
            Column::new(
                "peak_ratio".into(),
                c.iter().map(|x| x.peak_ratio).collect::<Vec<_>>(),
            ),
            Column::new(
                "zero_kl".into(),
                c.iter().map(|x| x.zero_kl).collect::<Vec<_>>(),
            ),
            Column::new(
                "mean_kl".into(),
                c.iter().map(|x| x.mean_kl).collect::<Vec<_>>(),
            ),
            Column::new(
                "zero_dll".into(),
                c.iter().map(|x| x.zero_dll).collect::<Vec<_>>(),
            ),
            Column::new(
                "mean_dll".into(),
                c.iter().map(|x| x.mean_dll).collect::<Vec<_>>(),
            ),
            Column::new(
                "massive".into(),
                c.iter().map(|x| x.massive).collect::<Vec<_>>(),
            ),
            Column::new(
                "instances".into(),
                c.iter()
                    .map(|x| x.positions.len() as u32)
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "tokens".into(),
                c.iter()
                    .map(|x| {
                        let mut t = x.tokens.clone();
                        t.sort();
                        t.dedup();
                        t.join("\u{1f}")
                    })
                    .collect::<Vec<_>>(),
            ),
        ],
    )?;
    detect::table::write_parquet(&mut df, &dir.join("candidates.parquet"))?;
    let s = &v.scored;
    let col = |f: &dyn Fn(&detect::validate::Scored) -> f64| s.iter().map(f).collect::<Vec<f64>>();
    let mut df = DataFrame::new(
        s.len(),
        vec![
            Column::new(
                "name".into(),
                s.iter().map(|x| x.name.clone()).collect::<Vec<_>>(),
            ),
            Column::new(
                "group".into(),
                s.iter().map(|x| x.group.clone()).collect::<Vec<_>>(),
            ),
            Column::new(
                "threshold".into(),
                s.iter().map(|x| x.threshold).collect::<Vec<_>>(),
            ),
            Column::new(
                "dims".into(),
                s.iter()
                    .map(|x| {
                        x.dims
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .collect::<Vec<_>>(),
            ),
            Column::new("precision".into(), col(&|x| x.dim.precision)),
            Column::new("recall".into(), col(&|x| x.dim.recall)),
            Column::new("f1".into(), col(&|x| x.dim.f1)),
            Column::new("entries".into(), col(&|x| x.ptd.detected as f64)),
            Column::new("entry_precision".into(), col(&|x| x.ptd.precision)),
            Column::new("entry_recall".into(), col(&|x| x.ptd.recall)),
            Column::new("entry_f1".into(), col(&|x| x.ptd.f1)),
        ],
    )?;
    detect::table::write_parquet(&mut df, &dir.join("scores.parquet"))?;
    write_record(&validation_path(out), v)
}

/// A stored JSON file's content for comparison: wall-clock `seconds` fields differ between two
/// computations of the same result and are left out.
fn comparable(bytes: &[u8]) -> Option<serde_json::Value> {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("seconds");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    strip(&mut v);
    Some(v)
}

/// Combines shard runs into `into`. Everything is checked before anything is written: the
/// shards ran one study file and one plan; no two files for the same result disagree (both
/// paths are named); every planned score of every replicate is present — otherwise the merge
/// fails listing what is missing, or with `allow_partial` writes the run with `partial.json`
/// listing it. Returns the missing scores (`r<seed>/<key>`).
pub fn merge(into: &Path, shards: &[PathBuf], allow_partial: bool) -> Result<Vec<String>> {
    let _lock = lock_run_dir(into)?;
    let (plan, study) = one_study(into, shards)?;
    let (files, top) = shard_files(shards)?;
    let missing = missing_scores(&plan, &files, &top)?;
    if !missing.is_empty() && !allow_partial {
        bail!(
            "{} planned score(s) are in none of the shards: {}{}; run the missing shard(s) and merge again, or pass --allow-partial to write a run marked partial",
            missing.len(),
            missing.iter().take(8).cloned().collect::<Vec<_>>().join(", "),
            if missing.len() > 8 { ", …" } else { "" }
        );
    }
    // Checked: write.
    if let Some((_, p)) = &plan {
        write_atomic(&into.join("plan.json"), p)?;
    }
    if let Some((_, y)) = &study {
        write_atomic(&into.join("study.yaml"), y)?;
    }
    for (name, bytes) in &top {
        write_atomic(&into.join(name), bytes)?;
    }
    for (rel, (_, bytes)) in &files {
        let target = into.join(rel);
        match fs::read(&target) {
            Ok(b) if comparable(&b) != comparable(bytes) => bail!(
                "{} already holds a different result than the shards' {}",
                target.display(),
                rel.display()
            ),
            Ok(_) => {}
            Err(_) => write_atomic(&target, bytes)?,
        }
    }
    let partial = into.join("partial.json");
    if missing.is_empty() {
        let _ = fs::remove_file(&partial);
    } else {
        write_record(&partial, &serde_json::json!({ "missing": missing }))?;
    }
    write_tables(into)?;
    Ok(missing)
}

type Named = Option<(PathBuf, Vec<u8>)>;
/// Result files by their place in the run (with the shard file they came from), and the
/// top-level assignments and provenance files by name.
type ShardFiles = (
    BTreeMap<PathBuf, (PathBuf, Vec<u8>)>,
    BTreeMap<String, Vec<u8>>,
);

/// The plan and study file every shard ran (and `into`'s plan, if it has one): one of each.
fn one_study(into: &Path, shards: &[PathBuf]) -> Result<(Named, Named)> {
    let read = |p: &Path| fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let mut plan: Option<(PathBuf, Vec<u8>)> = fs::read(into.join("plan.json"))
        .ok()
        .map(|b| (into.join("plan.json"), b));
    let mut study: Option<(PathBuf, Vec<u8>)> = None;
    for s in shards {
        let pp = s.join("plan.json");
        let p = fs::read(&pp)
            .with_context(|| format!("{} is not a run directory (no plan.json)", s.display()))?;
        match &plan {
            Some((first, b)) if *b != p => {
                // A shard run before the study named another refusal classifier holds scores
                // without its labels: merging it would leave them out, so it is refused too, but
                // the way out is cheap.
                if plans_share_scores(b, &p) {
                    bail!(
                        "{} and {} differ only in their refusal classifiers; run each shard again with the current study file (its stored scores are kept and relabelled, nothing is rescored), then merge",
                        pp.display(),
                        first.display()
                    );
                }
                bail!(
                    "{} ran a different plan than {}; only shards of one study and plan merge",
                    pp.display(),
                    first.display()
                )
            }
            Some(_) => {}
            None => plan = Some((pp, p)),
        }
        let sp = s.join("study.yaml");
        let y = read(&sp)?;
        match &study {
            Some((first, b)) if *b != y => bail!(
                "{} is a different study file than {}; only shards of one study merge",
                sp.display(),
                first.display()
            ),
            Some(_) => {}
            None => study = Some((sp, y)),
        }
    }
    Ok((plan, study))
}

/// Every result file of the shards; two copies of one result must agree.
fn shard_files(shards: &[PathBuf]) -> Result<ShardFiles> {
    let read = |p: &Path| fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let mut files: BTreeMap<PathBuf, (PathBuf, Vec<u8>)> = BTreeMap::new();
    let mut top: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for s in shards {
        for e in fs::read_dir(s)? {
            let p = e?.path();
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string();
            if (name.starts_with("assignments") || name.starts_with("provenance"))
                && name.ends_with(".json")
            {
                top.insert(name, read(&p)?);
            }
        }
        for sub in ["results", "tune", "search"] {
            let root = s.join(sub);
            if !root.is_dir() {
                continue;
            }
            for rep in fs::read_dir(&root)? {
                let rep = rep?.path();
                if !rep.is_dir() {
                    continue;
                }
                for f in fs::read_dir(&rep)? {
                    let p = f?.path();
                    // An unfinished optimisation's memo belongs to the shard that ran it.
                    if p.extension().is_none_or(|x| x != "json") {
                        continue;
                    }
                    let rel = p.strip_prefix(s).expect("under the shard").to_path_buf();
                    let bytes = read(&p)?;
                    match files.get(&rel) {
                        Some((other, b)) => {
                            if comparable(b) != comparable(&bytes) {
                                bail!(
                                    "{} and {} hold different results for the same {}; the shards did not compute the same thing (another model file or version?) — rerun one of them",
                                    other.display(),
                                    p.display(),
                                    rel.display()
                                );
                            }
                        }
                        None => {
                            files.insert(rel, (p.clone(), bytes));
                        }
                    }
                }
            }
        }
    }
    Ok((files, top))
}

/// What the assignments plan and no shard holds: every planned score of every replicate, each
/// named by its key and the variants that needed it, and replicates no shard began.
fn missing_scores(
    plan: &Named,
    files: &BTreeMap<PathBuf, (PathBuf, Vec<u8>)>,
    top: &BTreeMap<String, Vec<u8>>,
) -> Result<Vec<String>> {
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut replicates: BTreeSet<u64> = BTreeSet::new();
    for (name, bytes) in top {
        if name.starts_with("assignments") {
            let a: Vec<Assignment> = serde_json::from_slice(bytes)
                .with_context(|| format!("{name} in a shard is unreadable"))?;
            for x in a {
                replicates.insert(x.replicate);
                expected
                    .entry(format!("r{}/{}", x.replicate, x.key))
                    .or_default()
                    .insert(x.variant_id);
            }
        }
    }
    if expected.is_empty() {
        bail!(
            "the shards hold no assignments: none of them finished its run; rerun them, then merge"
        );
    }
    let planned: Option<Plan> = match plan {
        Some((_, bytes)) => Some(serde_json::from_slice(bytes).context("plan.json is unreadable")?),
        None => None,
    };
    // A missing score is named by its key and the variants that needed it.
    let name_of = |id: &String| -> String {
        planned
            .as_ref()
            .and_then(|p| p.variants.iter().find(|v| &v.id == id))
            .map_or_else(|| id.clone(), |v| v.variant.name.clone())
    };
    let mut missing: Vec<String> = expected
        .iter()
        .filter(|(k, _)| !files.contains_key(&Path::new("results").join(format!("{k}.json"))))
        .map(|(k, ids)| {
            let names: Vec<String> = ids.iter().map(name_of).collect();
            format!("{k} ({})", names.join(", "))
        })
        .collect();
    // Replicates the plan has but no shard began (a run stopped before reaching them).
    if let Some(planned) = &planned {
        for r in planned
            .replicates
            .iter()
            .filter(|r| !replicates.contains(r))
        {
            missing.push(format!("r{r} (not started)"));
        }
    }
    for r in &replicates {
        let p = Path::new("results")
            .join(format!("r{r}"))
            .join("reference.json");
        if !files.contains_key(&p) {
            missing.push(format!("r{r}/reference"));
        }
    }
    Ok(missing)
}

/// Writes the run's provenance when it did not exist (used by tests).
pub fn plan_of(dir: &Path) -> Result<Plan> {
    Ok(serde_json::from_slice(&fs::read(dir.join("plan.json"))?)?)
}
