//! Running a plan: the model loaded once, direction data and reference scores cached by content,
//! each distinct (dims, handling, edit) scored once, every finished score written at once and
//! atomically. Running again resumes; a second run on the same directory is refused.

use super::optimize;
use super::plan::{plan, Plan, PlannedVariant};
use super::replicate::{self, Replicate, Store};
use super::rundir::{
    hash_json, read_record, write_or_check_plan, write_record, write_tables, write_validation,
    Assignment, EvalPrompts, JudgeProvenance, Provenance, RunDir, ScoreRecord, Timings, TuneResult,
};
use super::spec::Study;
use crate::detect;
use crate::evaluate::classify::{self, Labeller};
use crate::fs::write_atomic;
use crate::model::{self, LoadedModel};
use crate::pipeline::{self as variant, Variant};
use crate::util::{dims_summary, progress_bar, trunc};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out: PathBuf,
    /// (index, count): run every count-th score, starting at index.
    pub shard: Option<(usize, usize)>,
}

/// The key of a distinct score: what the edit depends on, nothing else.
fn score_key(v: &Variant, dims: &[u32], replicate: u64) -> String {
    let mut canon = v.clone();
    canon.name = String::new();
    canon.detect = None;
    // A tuned variant's edit depends on the dims it ended with, not on how they were found;
    // named dims are the same dims as detected ones.
    canon.tune = None;
    canon.dims = None;
    // A null draw's edit is its control's with another seed; only KL-only scoring sets it
    // apart, and that stays in the key.
    canon.blank_control_name();
    if dims.is_empty() {
        // With nothing detected, zeroing or protecting dims is exactly `none` (tested), so such
        // variants share `none`'s score.
        canon.handlings.retain(|h| !h.uses_dims());
    }
    hash_json(&(&canon, dims, replicate))
}

/// Runs (or resumes) a study. Returns the number of scores computed now.
///
/// The phases, in order: load every split's prompt sets (before the model, so a bad set fails
/// fast); open the run directory (lock, plan, provenance); per replicate, prepare it (prompts,
/// direction pass, detection, unedited scores), tune, group the variants by score key, and score
/// (or search, then score) each group not yet stored; finally write assignments, provenance and
/// tables.
pub fn run(study: &Study, study_text: &str, opts: &RunOptions) -> Result<usize> {
    let run = RunDir::sharded(&opts.out, opts.shard);
    let _lock = run.lock()?;
    let t0 = Instant::now();
    let mut timings = Timings::default();
    let sets = load_sets(study)?;
    let mut lm = model::load_with(&study.file.model, study.file.precision.resolve())?;
    lm.raw = !study.file.chat;
    let plan = plan(study, lm.model.num_layers())?;
    write_or_check_plan(&run, &plan)?;
    write_atomic(&run.study_file(), study_text.as_bytes())?;
    let mut refusal = Labeller::load(
        &study.file.evaluation.classifiers()?,
        study.file.evaluation.judge_threshold,
        Some((study.file.evaluation.judge_sample, study.file.seed)),
        plan.precision,
        |m| run.judge_cache(m),
    )?;
    let mut prov = provenance(study, study_text, &lm, &plan, &refusal)?;
    eprintln!(
        "study {}: {} variants x {} replicate(s) on {} (loaded in {:.1} s)",
        study.name,
        plan.variants.len(),
        plan.replicates.len(),
        study.file.model,
        lm.load_seconds
    );
    timings.push("load", "prompt sets, model, classifiers", t0);
    let timings_file = run.timings();
    if let Some(spec) = &study.file.detection_validation {
        let t = Instant::now();
        validate_detection(study, &lm, &plan, spec, &run)?;
        timings.push("validation", "detection validation", t);
    }
    let mut computed = 0;
    let mut assignments: Vec<Assignment> = Vec::new();
    // A study of detection validation alone has no replicate to draw.
    let replicates: &[u64] = if plan.variants.is_empty() {
        &[]
    } else {
        &plan.replicates
    };
    let settings = (!replicates.is_empty())
        .then(|| {
            replicate::Settings::of_study(study, plan.variants.iter().map(|v| &v.variant).collect())
        })
        .transpose()?;
    for &seed in replicates {
        let Some(settings) = &settings else { break };
        let keep_scan = plan
            .variants
            .iter()
            .any(|v| v.variant.tune.is_some() && !run.tune(seed, &v.id).exists());
        let mut rep = replicate::prepare(
            settings,
            &lm,
            seed,
            &sets,
            Store::Run(&run),
            &mut timings,
            keep_scan,
            &format!("replicate {seed}: "),
        )?;
        prov.datasets.append(&mut rep.prompt_hashes);
        refusal.label(&mut rep.base, &rep.evaluator.bad_text)?;
        write_record(
            &run.prompts(seed),
            &EvalPrompts {
                good_sources: rep.sources.good.clone(),
                bad_sources: rep.sources.bad.clone(),
                good: rep.evaluator.good_text.clone(),
                bad: rep.evaluator.bad_text.clone(),
            },
        )?;
        // Tuning first: its chosen dims decide which scores the tuned variants share.
        let tuned = tune_replicate(&mut lm, &plan, &mut rep, &run, &mut timings)?;
        rep.data.scan = None;
        write_record(&run.reference(seed), &rep.base)?;
        let groups = group_by_score(&plan, &rep, &tuned)?;
        let total = groups.len();
        for (key, (dims, members)) in &groups {
            for pv in members {
                assignments.push(Assignment {
                    replicate: seed,
                    variant_id: pv.id.clone(),
                    key: key.clone(),
                    dims: dims.clone(),
                });
            }
        }
        // Written as each replicate is planned, so a run stopped part-way (a machine's time
        // ran out, Ctrl-C) still merges with --allow-partial into a report of what it finished.
        write_record(&run.assignments(), &assignments)?;
        write_record(&run.provenance(), &prov)?;
        for (i, (key, (dims, members))) in groups.iter().enumerate() {
            if opts.shard.is_some_and(|(si, sn)| i % sn != si) {
                continue;
            }
            let t = Instant::now();
            let names = members
                .iter()
                .map(|m| m.variant.name.as_str())
                .collect::<Vec<_>>()
                .join(" | ");
            if run.result(seed, key).exists() {
                update_stored(&mut lm, &rep, key, dims, members, &run, &mut refusal)?;
                timings.push("stored", format!("r{seed} stored score {names}"), t);
                continue;
            }
            let kind = if members[0].variant.search.is_some() {
                "search and score"
            } else {
                "score"
            };
            score_group(
                &mut lm,
                &rep,
                key,
                dims,
                members,
                &run,
                (i, total),
                &mut refusal,
            )?;
            timings.push(kind, format!("r{seed} {names}"), t);
            timings.save(&timings_file, t0)?;
            computed += 1;
        }
    }
    if refusal.is_labelling() {
        write_record(&run.classifiers(), &refusal.validate()?)?;
    }
    write_record(&run.assignments(), &assignments)?;
    write_record(&run.provenance(), &prov)?;
    if opts.shard.is_none() {
        let t = Instant::now();
        write_tables(&run)?;
        timings.push("tables", "parquet tables", t);
    }
    timings.save(&timings_file, t0)?;
    eprintln!(
        "study {} finished: {computed} score(s) computed now, {:.0} s",
        study.name,
        t0.elapsed().as_secs_f64()
    );
    Ok(computed)
}

/// What the run ran with: the model, the study, the classifiers and markers, the precision and
/// the CPU's vector paths.
fn provenance(
    study: &Study,
    study_text: &str,
    lm: &LoadedModel,
    plan: &Plan,
    refusal: &Labeller,
) -> Result<Provenance> {
    let mut prov = Provenance::new(&study.file.model, lm.sha256.clone(), study_text, plan);
    prov.classifiers = refusal.classifiers.iter().map(|c| c.name()).collect();
    prov.markers = Some(study.file.evaluation.options()?.markers);
    prov.precision = Some(lm.model.precision());
    prov.vector_paths = Some(crate::model::cpu::describe(
        lm.model.precision() == model::Precision::Bf16,
    ));
    if let Some(j) = &refusal.judge {
        prov.judge = Some(JudgeProvenance {
            model: j.name.clone(),
            system: classify::JUDGE_SYSTEM.into(),
            question: classify::judge_question("{request}", "{reply}"),
            threshold: j.threshold,
        });
    }
    Ok(prov)
}

/// The study's detection validation, once per run (not per shard: shard 0 runs it), with every
/// distinct detection of its variants scored beside the spec's configurations.
fn validate_detection(
    study: &Study,
    lm: &LoadedModel,
    plan: &Plan,
    spec: &detect::validate::ValidationSpec,
    run: &RunDir,
) -> Result<()> {
    if run.validation().exists() || run.shard().is_some_and(|(i, _)| i != 0) {
        return Ok(());
    }
    let mut extra: Vec<detect::validate::Named> = Vec::new();
    for pv in &plan.variants {
        // A tuned variant's thresholds are chosen later, on the selection split.
        let Some(c) = pv
            .variant
            .detect
            .as_ref()
            .filter(|_| pv.variant.needs_dims() && pv.variant.tune.is_none())
        else {
            continue;
        };
        let mut c = c.clone();
        // Scored where the labels are: the corpus's valid positions.
        c.positions = detect::config::Positions::Valid;
        if extra.iter().any(|e| e.config == c) {
            continue;
        }
        extra.push(detect::validate::Named {
            name: pv.variant.name.clone(),
            group: "study".into(),
            threshold: None,
            config: c,
        });
    }
    let f = &study.file;
    let system = (f.chat && !f.system_prompt.is_empty()).then_some(f.system_prompt.as_str());
    let t0 = Instant::now();
    let pb = progress_bar(0, "detection validation: hidden states");
    let labels = run.validation_dir().join("labels.json");
    if let Some(d) = labels.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let v = detect::validate::run(
        lm,
        system,
        spec,
        extra,
        Some(&labels),
        |phase, done, total| {
            pb.set_message(&format!("detection validation: {phase}"));
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        },
    )?;
    pb.finish_and_clear();
    write_validation(run, &v)?;
    eprintln!(
        "detection validation: {} candidates, {} massive, {} configurations scored ({:.0} s)",
        v.candidates.len(),
        v.candidates.iter().filter(|c| c.massive).count(),
        v.scored.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Every prompt set any split names, loaded (and fetched) once.
pub(crate) fn load_sets(study: &Study) -> Result<BTreeMap<String, Vec<String>>> {
    let mut sets: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let Some(d) = &study.file.datasets else {
        return Ok(sets);
    };
    let mut splits = vec![&d.direction, &d.evaluation];
    splits.extend(d.selection.as_ref());
    for s in splits.iter().flat_map(|p| p.good.0.iter().chain(&p.bad.0)) {
        if !sets.contains_key(&s.name) {
            sets.insert(s.name.clone(), crate::datasets::load(&s.name)?);
        }
    }
    Ok(sets)
}

/// Each tuned variant's thresholds for this replicate: stored, or optimised now (resuming from
/// its memo after an interruption).
fn tune_replicate(
    lm: &mut LoadedModel,
    plan: &Plan,
    rep: &mut Replicate,
    run: &RunDir,
    timings: &mut Timings,
) -> Result<BTreeMap<String, TuneResult>> {
    let seed = rep.seed;
    let mut tuned = BTreeMap::new();
    for pv in plan.variants.iter().filter(|v| v.variant.tune.is_some()) {
        let path = run.tune(seed, &pv.id);
        let t = Instant::now();
        let r = match read_record::<TuneResult>(&path)? {
            Some(r) => r,
            None => {
                let sel = rep
                    .selection
                    .as_ref()
                    .context("tuning needs datasets.selection")?;
                let scan = rep.data.scan.as_ref().context("tuning needs the scan")?;
                optimize::tune_and_store(lm, sel, pv, seed, scan, &rep.data, &path)?
            }
        };
        timings.push("tune", format!("r{seed} tune {}", pv.variant.name), t);
        tuned.insert(pv.id.clone(), r);
    }
    Ok(tuned)
}

type Groups<'a> = BTreeMap<String, (Vec<u32>, Vec<&'a PlannedVariant>)>;

/// Every variant resolved to its dims, grouped by what its edit depends on (the score key).
fn group_by_score<'a>(
    plan: &'a Plan,
    rep: &Replicate,
    tuned: &BTreeMap<String, TuneResult>,
) -> Result<Groups<'a>> {
    let mut groups: Groups = BTreeMap::new();
    for pv in &plan.variants {
        let dims =
            if pv.variant.needs_dims() && pv.variant.dims.is_none() && pv.variant.tune.is_some() {
                tuned[&pv.id].dims.clone()
            } else {
                rep.dims_for(&pv.variant)?
            };
        let key = score_key(&pv.variant, &dims, rep.seed);
        groups
            .entry(key)
            .or_insert_with(|| (dims, Vec::new()))
            .1
            .push(pv);
    }
    Ok(groups)
}

/// Brings a stored score up to the study's classifiers: replies cut at heretic's first marker
/// are completed under the same edit (when the study now names classifiers that read whole
/// replies), and classifiers missing from it label it. Nothing else in the score changes.
fn update_stored(
    lm: &mut LoadedModel,
    rep: &Replicate,
    key: &str,
    dims: &[u32],
    members: &[&PlannedVariant],
    run: &RunDir,
    refusal: &mut Labeller,
) -> Result<()> {
    let path = run.result(rep.seed, key);
    let Some(mut rec) = read_record::<ScoreRecord>(&path)? else {
        return Ok(());
    };
    // A null draw has no replies to complete or label.
    if members.iter().all(|m| m.variant.kl_only()) {
        return Ok(());
    }
    let cut = rep.evaluator.cut_replies(&rec.outcome).map(|c| c.len());
    let unlabelled = refusal.classifiers.iter().any(|c| {
        *c != classify::Classifier::Heretic && !rec.outcome.labels.contains_key(&c.name())
    });
    if cut.is_none() && !unlabelled {
        return Ok(());
    }
    let t = Instant::now();
    let mut v = members[0].variant.clone();
    if let Some(a) = &rec.ablation {
        v.ablation = a.clone();
    }
    let mut done = String::new();
    if let Some(n) = cut {
        let data = variant::prepare_with_dims(&rep.data, &v, dims)?;
        let pb = progress_bar(
            n as u64,
            &format!("r{} {} (completing)", rep.seed, trunc(&v.name, 22)),
        );
        let (n, changed) =
            variant::complete(lm, &rep.evaluator, &v, &data, &mut rec.outcome, |_, k| {
                pb.inc(k as u64)
            })?;
        pb.finish_and_clear();
        done = format!(
            "completed {n} replies cut at heretic's markers ({changed} label(s) changed), "
        );
    }
    refusal.label(&mut rec.outcome, &rep.evaluator.bad_text)?;
    write_atomic(&path, &serde_json::to_vec(&rec)?)?;
    eprintln!(
        "r{} {:<40} stored score: {done}labelled by {} ({:.0} s)",
        rep.seed,
        trunc(&v.name, 40),
        refusal
            .classifiers
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join(", "),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Scores one distinct edit on the evaluation prompts — after searching its kernel on the
/// selection split when the variant asks for a search — and stores the score.
#[allow(clippy::too_many_arguments)]
fn score_group(
    lm: &mut LoadedModel,
    rep: &Replicate,
    key: &str,
    dims: &[u32],
    members: &[&PlannedVariant],
    run: &RunDir,
    (i, total): (usize, usize),
    refusal: &mut Labeller,
) -> Result<()> {
    let seed = rep.seed;
    let t = Instant::now();
    let first = &members[0].variant;
    let data = variant::prepare_with_dims(&rep.data, first, dims)?;
    let mut searched = None;
    if let Some(spec) = &first.search {
        let sr = optimize::stored_or_searched(
            lm,
            rep.selection.as_ref(),
            first,
            &data,
            spec,
            &run.search(seed, key),
            (key, seed, members.iter().map(|m| m.id.clone()).collect()),
        )?;
        searched = Some(sr.params);
    }
    let mut v = first.clone();
    if let Some(p) = &searched {
        v.ablation = p.clone();
    }
    let work = if v.kl_only() {
        rep.evaluator.kl_work()
    } else {
        rep.evaluator.work()
    };
    let pb = progress_bar(work, &format!("r{seed} {}", trunc(&v.name, 34)));
    let mut outcome = variant::score(lm, &rep.evaluator, &v, &data, |_, n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    if !v.kl_only() {
        refusal.label(&mut outcome, &rep.evaluator.bad_text)?;
    }
    let rec = ScoreRecord {
        key: key.to_string(),
        replicate: seed,
        dims: dims.to_vec(),
        variant_ids: members.iter().map(|m| m.id.clone()).collect(),
        outcome,
        ablation: searched,
    };
    write_atomic(&run.result(seed, key), &serde_json::to_vec(&rec)?)?;
    let names: Vec<&str> = members.iter().map(|m| m.variant.name.as_str()).collect();
    let refusals = if v.kl_only() {
        "(KL only)".to_string()
    } else {
        format!(
            "{:>3}/{:<3}",
            rec.outcome.refused.iter().filter(|x| **x).count(),
            rec.outcome.refused.len()
        )
    };
    eprintln!(
        "[{}/{}] r{seed} {:<40} refusals {refusals} KL {:.4} dims {} ({:.0} s{})",
        i + 1,
        total,
        trunc(&names.join(" | "), 40),
        rec.outcome.kl_mean(),
        dims_summary(dims),
        t.elapsed().as_secs_f64(),
        if names.len() > 1 {
            format!(", shared by {} variants", names.len())
        } else {
            String::new()
        }
    );
    Ok(())
}
