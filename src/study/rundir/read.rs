//! Reading a run back: every stored result, for the report and the tables.

use super::*;

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
pub(super) fn read_json_tree<T: serde::de::DeserializeOwned>(
    dir: &Path,
    sub: &str,
) -> Result<Vec<T>> {
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
    let run = RunDir::at(dir);
    let plan = run.read_plan()?;
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
    let results = run.results();
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
        missing: read_record::<serde_json::Value>(&run.partial())?
            .and_then(|v| serde_json::from_value(v["missing"].clone()).ok())
            .unwrap_or_default(),
        prompts,
        classifiers: read_record(&run.classifiers())?,
    })
}
