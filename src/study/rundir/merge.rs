//! Shard runs combined into one, everything checked before anything is written.

use super::*;

/// A stored JSON file's content for comparison: wall-clock `seconds` fields differ between two
/// computations of the same result and are left out.
pub(super) fn comparable(bytes: &[u8]) -> Option<serde_json::Value> {
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
    let run = RunDir::at(into);
    let _lock = run.lock()?;
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
        write_atomic(&run.plan(), p)?;
    }
    if let Some((_, y)) = &study {
        write_atomic(&run.study_file(), y)?;
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
    let partial = run.partial();
    if missing.is_empty() {
        let _ = fs::remove_file(&partial);
    } else {
        write_record(&partial, &serde_json::json!({ "missing": missing }))?;
    }
    write_tables(&run)?;
    Ok(missing)
}

pub(super) type Named = Option<(PathBuf, Vec<u8>)>;
/// Result files by their place in the run (with the shard file they came from), and the
/// top-level assignments and provenance files by name.
pub(super) type ShardFiles = (
    BTreeMap<PathBuf, (PathBuf, Vec<u8>)>,
    BTreeMap<String, Vec<u8>>,
);

/// The plan and study file every shard ran (and `into`'s plan, if it has one): one of each.
pub(super) fn one_study(into: &Path, shards: &[PathBuf]) -> Result<(Named, Named)> {
    let read = |p: &Path| fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let into_plan = RunDir::at(into).plan();
    let mut plan: Option<(PathBuf, Vec<u8>)> = fs::read(&into_plan).ok().map(|b| (into_plan, b));
    let mut study: Option<(PathBuf, Vec<u8>)> = None;
    for s in shards {
        let pp = RunDir::at(s).plan();
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
        let sp = RunDir::at(s).study_file();
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
pub(super) fn shard_files(shards: &[PathBuf]) -> Result<ShardFiles> {
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
pub(super) fn missing_scores(
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
        .filter(|(k, _)| !files.contains_key(&RunDir::at("").results().join(format!("{k}.json"))))
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
        // Shard files are keyed by their place in a run: the layout of a run at "".
        let p = RunDir::at("").reference(*r);
        if !files.contains_key(&p) {
            missing.push(format!("r{r}/reference"));
        }
    }
    Ok(missing)
}
