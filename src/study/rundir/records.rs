//! The run's records: the plan check, score and reference records, provenance, tuning and
//! search results, assignments.

use super::*;

/// Writes the plan, or checks that the directory holds this plan's results.
pub fn write_or_check_plan(run: &RunDir, plan: &Plan) -> Result<()> {
    let out = run.root();
    let plan_json = serde_json::to_vec_pretty(plan)?;
    let plan_path = run.plan();
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
pub(super) fn plans_share_scores(a: &[u8], b: &[u8]) -> bool {
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
    /// The CPU's vector paths and the bf16 micro-kernel the run used (absent: runs before
    /// 2026-12-07).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vector_paths: Option<String>,
}

/// Where one `run` invocation's wall time went, phase by phase in the order they ran (work found
/// in the run's caches takes little). Written as the run goes, so an interrupted run keeps it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timings {
    pub phases: Vec<PhaseTime>,
    /// Wall time from the start of the run to its last phase.
    pub total_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseTime {
    /// What ran: `load`, `r<seed> direction pass`, `r<seed> unedited`, `r<seed> tune <name>`, …
    pub phase: String,
    /// The kind the benchmark totals by: load, validation, direction, unedited, tune, stored,
    /// score, search and score, tables.
    pub kind: String,
    pub seconds: f64,
}

impl Timings {
    /// Records that `phase` (of `kind`) ran from `since` until now.
    pub fn push(&mut self, kind: &str, phase: impl Into<String>, since: std::time::Instant) {
        self.phases.push(PhaseTime {
            phase: phase.into(),
            kind: kind.into(),
            seconds: since.elapsed().as_secs_f64(),
        });
    }

    /// Writes the phases so far to `path`, with the wall time since `t0`.
    pub fn save(&mut self, path: &std::path::Path, t0: std::time::Instant) -> anyhow::Result<()> {
        self.total_seconds = t0.elapsed().as_secs_f64();
        super::write_record(path, self)
    }

    /// Seconds per kind, in the order each kind first ran.
    pub fn by_kind(&self) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = Vec::new();
        for p in &self.phases {
            match out.iter_mut().find(|(k, _)| *k == p.kind) {
                Some((_, s)) => *s += p.seconds,
                None => out.push((p.kind.clone(), p.seconds)),
            }
        }
        out
    }
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
            vector_paths: None,
        }
    }
}

pub(super) fn git_revision() -> Option<String> {
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
