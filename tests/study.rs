//! Study files, plans, and the runner: located errors, stable ids, dedupe, resume after kill -9,
//! shards + merge, the run-directory lock.

mod common;

use common::bin;
use outlierlab::study::{plan, rundir, spec};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn err_of(text: &str) -> String {
    format!("{:#}", spec::parse(text, "s.yaml").unwrap_err())
}

const GOOD: &str = "model: smollm2-135m-instruct
datasets:
  direction:
    good: {name: harmless-outlierlab, count: 8}
    bad: {name: advbench, count: 8}
  evaluation:
    good: {name: harmless-outlierlab, count: 4, offset: 8}
    bad: {name: advbench, count: 4, offset: 8}
variants:
  - name: none
    handling: none
";

#[test]
fn invalid_study_files_give_located_messages() {
    assert!(spec::parse(GOOD, "s.yaml").is_ok());
    let e = err_of(&GOOD.replace("model:", "modle:"));
    assert!(e.starts_with("s.yaml:1:1:"), "{e}");
    assert!(
        e.contains("unknown field `modle`") && e.contains("did you mean 'model'?"),
        "{e}"
    );
    let e = err_of(&GOOD.replace("count: 8}\n    bad", "cout: 8}\n    bad"));
    assert!(
        e.contains("s.yaml:4:")
            && e.contains("`datasets.direction.good.cout`")
            && e.contains("did you mean 'count'?"),
        "{e}"
    );
    let e = err_of(&format!("seed: abc\n{GOOD}"));
    assert!(
        e.starts_with("s.yaml:1:") && e.contains("`seed`") && e.contains("invalid type"),
        "{e}"
    );
    let e = err_of(&GOOD.replace(
        "count: 4, offset: 8}\n    bad: {name: advbench, count: 4, offset: 8}",
        "count: 4, offset: 8}\n    bad: {name: advbench, count: 4, offset: 5}",
    ));
    assert!(
        e.contains("overlap")
            && e.contains("offset of at least 8")
            && e.contains("`datasets.evaluation.bad.offset`"),
        "{e}"
    );
    let e = err_of(&GOOD.replace("name: advbench, count: 8", "name: advbnch, count: 8"));
    assert!(
        e.contains("unknown dataset 'advbnch'")
            && e.contains("did you mean 'advbench'?")
            && e.starts_with("s.yaml:5:"),
        "{e}"
    );
    let e = err_of(&GOOD.replace("handling: none", "handling: winsorise:0.9"));
    assert!(
        e.contains("`variants[0].handling`") && e.contains("did you mean 'winsorize'?"),
        "{e}"
    );
    let e = err_of(&format!(
        "{GOOD}sweeps:\n  - criteria_subsets: [[min_abs, persistance]]\n"
    ));
    assert!(
        e.contains("unknown criterion 'persistance'") && e.contains("did you mean 'persistence'?"),
        "{e}"
    );
    let e = err_of(&format!(
        "{GOOD}detection:\n  preset: pr154\n  set: {{median_ration: 4}}\n"
    ));
    assert!(e.contains("did you mean 'median_ratio'?"), "{e}");
    let e = err_of(&GOOD[..GOOD.find("variants:").unwrap()]);
    assert!(e.contains("nothing to run"), "{e}");
    let e = err_of(&GOOD.replace("smollm2-135m-instruct", "no-such-model"));
    assert!(
        e.contains("`model`") && e.contains("unknown model 'no-such-model'"),
        "{e}"
    );
    let e = err_of(&format!(
        "{GOOD}evaluation: {{refusal: [heretic, 'judge:smollm2-135m-instruct'], judge_sample: 0.2}}\n"
    ));
    assert!(
        e.contains("`evaluation.judge_sample`")
            && e.contains("name both `phrases` and a `judge:MODEL`"),
        "{e}"
    );
    let e = err_of(&format!("{GOOD}evaluation: {{judge_sample: 0}}\n"));
    assert!(e.contains("must lie in (0, 1]"), "{e}");
    // The CLI prints the same, one line, non-zero exit.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.yaml");
    std::fs::write(&p, GOOD.replace("model:", "modle:")).unwrap();
    let out = Command::new(bin())
        .args(["validate", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("bad.yaml:1:1:"), "{err}");
}

#[test]
fn plans_expand_with_stable_ids() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let s = spec::load(&root.join("criteria-ablation.yaml")).unwrap();
    let p = plan::plan(&s, 24).unwrap();
    // none + 32 subsets x 2 scopes + 3 quantiles.
    assert_eq!(p.variants.len(), 1 + 64 + 3);
    let again = plan::plan(
        &spec::load(&root.join("criteria-ablation.yaml")).unwrap(),
        24,
    )
    .unwrap();
    let ids: Vec<&str> = p.variants.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(
        ids,
        again
            .variants
            .iter()
            .map(|v| v.id.as_str())
            .collect::<Vec<_>>()
    );
    let unique: std::collections::HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len());
    // The id depends on the settings, not on the name.
    let mut v = p.variants[3].variant.clone();
    v.name = "renamed".into();
    assert_eq!(plan::variant_id(&v), p.variants[3].id);
    v.handlings
        .push(outlierlab::direction::Handling::ProtectOutputRows);
    assert_ne!(plan::variant_id(&v), p.variants[3].id);
    // Every shipped study validates, and tuned variants become planned variants.
    for e in std::fs::read_dir(&root).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            let st = spec::load(&p).unwrap_or_else(|e| panic!("{e:#}"));
            plan::plan(&st, 24).unwrap();
        }
    }
    let t = plan::plan(&spec::load(&root.join("tune-thresholds.yaml")).unwrap(), 24).unwrap();
    let tuned: Vec<&str> = t
        .variants
        .iter()
        .filter(|v| v.variant.tune.is_some())
        .map(|v| v.variant.name.as_str())
        .collect();
    assert_eq!(tuned, ["pr154-tuned", "sun2024-tuned"]);
    assert!(t.variants.iter().all(|v| v.variant.search.is_some()));
    // A log grid and lists multiply out.
    let text = format!("{GOOD}sweeps:\n  - thresholds: {{median_ratio: {{log: [10, 1000, 3]}}, mad_ratio: [100, 1000]}}\n");
    let p = plan::plan(&spec::parse(&text, "s.yaml").unwrap(), 30).unwrap();
    assert_eq!(p.variants.len(), 1 + 3 * 2);
    assert!(
        p.variants
            .iter()
            .any(|v| v.variant.name.ends_with("median_ratio=100")),
        "{:?}",
        p.variants
            .iter()
            .map(|v| &v.variant.name)
            .collect::<Vec<_>>()
    );
}

const RUN: &str = "name: tiny
model: smollm2-135m-instruct
datasets:
  direction:
    good: {name: harmless-outlierlab, count: 6}
    bad: {name: advbench, count: 6}
  evaluation:
    good: {name: harmless-outlierlab, count: 4, offset: 6}
    bad: [{name: advbench, count: 2, offset: 6}, {name: harmbench, count: 2}]
detection: {preset: pr154, set: {median_ratio: 400, mad_ratio: 400}}
ablation: {direction_index: 17}
evaluation: {max_response_tokens: 6, over_refusal_tokens: 3, batch_size: 8}
variants:
  - {name: none, handling: none}
  - {name: winsorize, handling: 'winsorize:0.95'}
  - {name: zero, handling: zero-residual-dims}
  - {name: protect, handling: protect-output-rows}
sweeps:
  - name: ratio
    thresholds: {median_ratio: [300, 400, 450]}
";

fn run_cli(study: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args([
            "run",
            study.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--report-dir",
        ])
        .arg(out.join("report"))
        .args(extra)
        .output()
        .unwrap()
}

/// `run_cli`, which must succeed (its stderr is the failure message).
fn run_ok(study: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let o = run_cli(study, out, extra);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

/// key → (refused, kl) of every stored score.
fn scores(dir: &Path) -> BTreeMap<String, (Vec<bool>, Vec<f64>)> {
    let r = rundir::read_results(dir).unwrap();
    r.scores
        .into_iter()
        .map(|((rep, k), s)| (format!("{rep}/{k}"), (s.outcome.refused, s.outcome.kl)))
        .collect()
}

#[test]
fn runs_resume_after_kill_and_shards_merge_to_the_same_results() {
    let tmp = tempfile::tempdir().unwrap();
    let study = tmp.path().join("tiny.yaml");
    std::fs::write(&study, RUN).unwrap();

    let full = tmp.path().join("full");
    run_ok(&study, &full, &[]);
    let reference = scores(&full);
    let r = rundir::read_results(&full).unwrap();
    // The run records the CPU's vector paths it ran on, and the precision `auto` chose here:
    // bf16 exactly where this CPU has the kernels.
    let prov: serde_json::Value =
        serde_json::from_slice(&std::fs::read(full.join("provenance.json")).unwrap()).unwrap();
    let bf16 = outlierlab::model::bf16::available();
    assert_eq!(prov["precision"], if bf16 { "bf16" } else { "f32" });
    assert_eq!(
        prov["vector_paths"].as_str(),
        Some(outlierlab::model::cpu::describe(bf16).as_str())
    );
    // Two sets in one split: each prompt keeps its set, in prompts.json and outcomes.parquet.
    let p = &r.prompts[&0];
    assert_eq!(
        p.bad_sources,
        ["advbench", "advbench", "harmbench", "harmbench"]
    );
    assert_eq!(p.good_sources, ["harmless-outlierlab"; 4]);
    let df = outlierlab::detect::table::read_parquet(&full.join("outcomes.parquet")).unwrap();
    let src: Vec<Option<&str>> = df.column("source").unwrap().str().unwrap().iter().collect();
    assert!(src.contains(&Some("harmbench")) && src.contains(&Some("harmless-outlierlab")));
    let md = std::fs::read_to_string(full.join("report/report.md")).unwrap();
    assert!(
        md.contains("Refusals by prompt set") && md.contains("| variant | advbench | harmbench |"),
        "the report breaks refusals down by set"
    );
    assert!(md.contains("| unedited | "), "{md}");
    // 7 variants, 6 after planning (ratio-400 has exactly `zero`'s settings). `zero` and
    // ratio-300 detect the same dims ([507]) with the same handling, so they share one score.
    assert_eq!(r.plan.variants.len(), 6);
    assert_eq!(
        reference.len(),
        4,
        "none, winsorize, zero (shared by the ratio sweep), protect"
    );
    let shared = r
        .scores
        .values()
        .find(|s| s.dims == vec![507] && s.variant_ids.len() > 1)
        .expect("a shared score for dims [507]");
    assert!(
        shared.variant_ids.len() >= 2,
        "zero-residual-dims and the ratio-300 sweep point detect the same dims"
    );
    assert!(full.join("variants.parquet").is_file() && full.join("outcomes.parquet").is_file());
    let report = std::fs::read_to_string(full.join("report/report.md")).unwrap();
    assert!(report.contains("| none |") && report.contains("cannot tell"));

    // kill -9 once at least one *score* is stored (not the detection summary or the reference),
    // then run again: some scores kept, the rest computed, tables equal to the uninterrupted run's.
    let killed = tmp.path().join("killed");
    let mut child = Command::new(bin())
        .args([
            "run",
            study.to_str().unwrap(),
            "--out",
            killed.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let score_files = |dir: &Path| -> usize {
        std::fs::read_dir(dir.join("results/r0"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| {
                        // Score files are named by their hex key; the replicate's other files
                        // (reference, prompts, detection summary) have words for names.
                        let n = e.file_name().to_string_lossy().to_string();
                        n.strip_suffix(".json").is_some_and(|k| {
                            !k.is_empty() && k.chars().all(|c| c.is_ascii_hexdigit())
                        })
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    while score_files(&killed) == 0 && t0.elapsed().as_secs() < 300 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = scores(&killed).len();
    assert!(
        (1..4).contains(&kept),
        "the kill should land after the first score and before the last (kept {kept} of 4)"
    );
    // What a stopped run finished merges, marked partial, into a run a report can read.
    let stopped = tmp.path().join("stopped");
    let out = Command::new(bin())
        .args([
            "merge",
            "--allow-partial",
            "--into",
            stopped.to_str().unwrap(),
        ])
        .arg(&killed)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let partial = std::fs::read_to_string(stopped.join("partial.json")).unwrap();
    assert_eq!(
        partial.matches("r0/").count(),
        4 - kept,
        "partial.json lists the scores the stopped run had not finished: {partial}"
    );
    let out = run_cli(&study, &killed, &[]);
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains(&format!("{} score(s) computed now", 4 - kept)),
        "the resumed run computes only what was missing: {log}"
    );
    assert_eq!(scores(&killed), reference);
    for table in ["variants.parquet", "outcomes.parquet"] {
        assert!(
            std::fs::read(killed.join(table)).unwrap() == std::fs::read(full.join(table)).unwrap(),
            "{table} of the resumed run differs from the uninterrupted run's"
        );
    }

    // Two shards and a merge equal one run.
    let (a, b, merged) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("merged"),
    );
    for (dir, s) in [(&a, "0/2"), (&b, "1/2")] {
        run_ok(&study, dir, &["--shard", s]);
    }
    assert!(scores(&a).len() < 4 && scores(&b).len() < 4);
    let merge = |into: &Path, shards: &[&Path], extra: &[&str]| {
        let out = Command::new(bin())
            .args(["merge", "--into", into.to_str().unwrap()])
            .args(extra)
            .args(shards.iter().map(|s| s.to_str().unwrap()))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = merge(&merged, &[&a, &b], &[]);
    assert!(ok, "{err}");
    assert_eq!(scores(&merged), reference);
    assert!(!merged.join("partial.json").exists());
    let out = Command::new(bin())
        .args([
            "report",
            merged.to_str().unwrap(),
            "--out",
            tmp.path().join("mr").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());

    // A missing shard: refused, listing what is missing; with --allow-partial, a run marked so.
    let half = tmp.path().join("half");
    let (ok, err) = merge(&half, &[&a], &[]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{} planned score(s) are in none of the shards",
            4 - scores(&a).len()
        )) && err.contains("r0/")
            && err.contains("--allow-partial"),
        "{err}"
    );
    assert!(
        !half.join("plan.json").exists(),
        "a refused merge writes nothing"
    );
    let (ok, err) = merge(&half, &[&a], &["--allow-partial"]);
    assert!(ok, "{err}");
    assert!(half.join("partial.json").is_file());
    let out = Command::new(bin())
        .args([
            "report",
            half.to_str().unwrap(),
            "--out",
            tmp.path().join("hr").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let md = std::fs::read_to_string(tmp.path().join("hr/report.md")).unwrap();
    assert!(
        md.contains("**Partial run.**"),
        "the report flags a partial run"
    );

    // A shard of another study (its study file changed) or another plan: refused.
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        let status = Command::new("cp")
            .args(["-r", &format!("{}/.", from.display()), to.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let foreign = tmp.path().join("foreign");
    copy(&b, &foreign);
    let mut y = std::fs::read_to_string(foreign.join("study.yaml")).unwrap();
    y.push_str("# another study\n");
    std::fs::write(foreign.join("study.yaml"), y).unwrap();
    let (ok, err) = merge(&tmp.path().join("m2"), &[&a, &foreign], &[]);
    assert!(
        !ok && err.contains("is a different study file than"),
        "{err}"
    );
    let other_plan = tmp.path().join("other-plan");
    copy(&b, &other_plan);
    let p = std::fs::read_to_string(other_plan.join("plan.json")).unwrap();
    std::fs::write(
        other_plan.join("plan.json"),
        p.replacen("\"none\"", "\"nothing\"", 1),
    )
    .unwrap();
    let (ok, err) = merge(&tmp.path().join("m3"), &[&a, &other_plan], &[]);
    assert!(!ok && err.contains("ran a different plan than"), "{err}");

    // Two shards that disagree on one score: refused, naming both files.
    let conflicting = tmp.path().join("conflicting");
    copy(&b, &conflicting);
    let a_scores = rundir::read_results(&a).unwrap();
    let ((rep, key), rec) = a_scores.scores.iter().next().unwrap();
    let mut altered = rec.clone();
    altered.outcome.kl[0] += 0.5;
    let target = conflicting
        .join(format!("results/r{rep}"))
        .join(format!("{key}.json"));
    std::fs::write(&target, serde_json::to_vec(&altered).unwrap()).unwrap();
    let (ok, err) = merge(&tmp.path().join("m4"), &[&a, &conflicting], &[]);
    assert!(
        !ok && err.contains("hold different results for the same")
            && err.contains(a.to_str().unwrap())
            && err.contains(conflicting.to_str().unwrap()),
        "{err}"
    );

    // A second run on a directory in use is refused.
    let _held = rundir::RunDir::at(&full).lock().unwrap();
    let out = run_cli(&study, &full, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another outlierlab run"));
}

const OPTIMISED: &str = "name: tuned
model: smollm2-135m-instruct
datasets:
  direction:
    good: {name: harmless-outlierlab, count: 6}
    bad: {name: advbench, count: 6}
  evaluation:
    good: {name: harmless-outlierlab, count: 4, offset: 6}
    bad: {name: advbench, count: 4, offset: 6}
  selection:
    good: {name: harmless-outlierlab, count: 5, offset: 10}
    bad: {name: advbench, count: 5, offset: 10}
detection: {preset: pr154}
ablation:
  direction_index: 17
  search: {trials: 3, seed: 1}
evaluation: {max_response_tokens: 6, over_refusal_tokens: 3, batch_size: 8}
variants:
  - {name: none, handling: none}
tune:
  - name: pr154-tuned
    thresholds: {median_ratio: [100, 3000], mad_ratio: [100, 3000]}
    trials: 7
    seed: 2
";

#[test]
fn tuning_and_search_optimise_on_selection_and_report_held_out() {
    // Both need a selection split, disjoint from the other two.
    let no_sel = OPTIMISED.replace("  selection:\n", "  selection_:\n");
    assert!(err_of(&no_sel).contains("did you mean 'selection'?"));
    let cut = OPTIMISED.find("  selection:").unwrap();
    let end = OPTIMISED.find("detection:").unwrap();
    let without = format!("{}{}", &OPTIMISED[..cut], &OPTIMISED[end..]);
    let e = err_of(&without);
    assert!(
        e.contains("`tune`") && e.contains("add datasets.selection"),
        "{e}"
    );
    let e = err_of(&OPTIMISED.replace(
        "count: 5, offset: 10}\n    bad",
        "count: 5, offset: 8}\n    bad",
    ));
    assert!(
        e.contains(
            "evaluation prompts (harmless-outlierlab, offset 6, count 4) and selection prompts"
        ) && e.contains("`datasets.selection.good.offset`"),
        "{e}"
    );
    let e = err_of(&OPTIMISED.replace("[100, 3000], mad", "[0, 3000], mad"));
    assert!(
        e.contains("`tune[0].thresholds.median_ratio`") && e.contains("0 < low < high"),
        "{e}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let study = tmp.path().join("tuned.yaml");
    std::fs::write(&study, OPTIMISED).unwrap();
    let dir = tmp.path().join("run");
    let out = run_cli(&study, &dir, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    let r = rundir::read_results(&dir).unwrap();

    // Tuning: exactly the trial budget, inside the bounds, one scoring per distinct dim set,
    // the chosen thresholds are the best trial's.
    assert_eq!(r.tunes.len(), 1);
    let t = &r.tunes[0];
    assert_eq!(t.trials.len(), 7);
    for tr in &t.trials {
        for v in tr.params.values() {
            assert!((100.0 - 1e-6..=3000.0 + 1e-6).contains(v), "{v}");
        }
        assert_eq!(tr.n_bad, 5, "tuning scores the selection split");
    }
    let distinct: std::collections::BTreeSet<&Vec<u32>> =
        t.trials.iter().map(|x| x.dims.as_ref().unwrap()).collect();
    assert_eq!(t.trials.iter().filter(|x| x.scored).count(), distinct.len());
    let min = t
        .trials
        .iter()
        .map(|x| x.objective)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(t.objective, min);
    // The same dims always give the same objective.
    for a in &t.trials {
        for b in &t.trials {
            if a.dims == b.dims {
                assert_eq!(a.objective, b.objective);
            }
        }
    }
    // The tuned variant is then scored once on the evaluation prompts, with the chosen dims.
    let tuned_id = &r
        .plan
        .variants
        .iter()
        .find(|v| v.variant.name == "pr154-tuned")
        .unwrap()
        .id;
    let a = r
        .assignments
        .iter()
        .find(|a| &a.variant_id == tuned_id)
        .unwrap();
    assert_eq!(a.dims, t.dims);
    let held_out = &r.scores[&(0, a.key.clone())];
    assert_eq!(held_out.outcome.refused.len(), 4);

    // Search: per score, the budget on the selection split; the final score uses the best edit.
    assert_eq!(r.searches.len(), r.scores.len());
    for s in &r.searches {
        assert_eq!(s.trials.len(), 3);
        let best = s
            .trials
            .iter()
            .map(|x| x.objective)
            .fold(f64::INFINITY, f64::min);
        assert_eq!(s.objective, best);
        let rec = &r.scores[&(s.replicate, s.key.clone())];
        assert_eq!(rec.ablation.as_ref(), Some(&s.params));
        let di = s.params.direction_index.unwrap();
        assert!((0.4 * 29.0..=0.9 * 29.0).contains(&di), "{di}");
    }
    let report = std::fs::read_to_string(dir.join("report/report.md")).unwrap();
    assert!(
        report.contains("Threshold tuning") && report.contains("pr154-tuned"),
        "{report}"
    );

    // Running again redoes nothing: neither the tuning nor the searches nor the scores.
    let before = std::fs::read(dir.join("tune/r0").join(format!("{tuned_id}.json"))).unwrap();
    let out = run_cli(&study, &dir, &[]);
    let again = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success() && again.contains("0 score(s) computed now"),
        "{again}"
    );
    assert!(!again.contains("tuning "), "{again}");
    assert_eq!(
        before,
        std::fs::read(dir.join("tune/r0").join(format!("{tuned_id}.json"))).unwrap()
    );
    assert!(!dir
        .join("tune/r0")
        .join(format!("{tuned_id}.partial"))
        .exists());

    // A tuning killed (-9) once its memo holds a score: the code wrote the memo; the rerun
    // replays the seeded swarm, takes the memo's scores instead of scoring again, and ends with
    // the uninterrupted tuning's trials and thresholds.
    let dir2 = tmp.path().join("run2");
    let tune_file = dir2.join("tune/r0").join(format!("{tuned_id}.json"));
    let memo_file = tune_file.with_extension("partial");
    let mut child = Command::new(bin())
        .args([
            "run",
            study.to_str().unwrap(),
            "--out",
            dir2.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let memo_entries = || -> usize {
        std::fs::read(&memo_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(&b).ok())
            .map_or(0, |m| m.len())
    };
    while memo_entries() == 0 && t0.elapsed().as_secs() < 300 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = memo_entries();
    assert!(
        kept >= 1,
        "the memo holds the scores computed before the kill"
    );
    assert!(
        !tune_file.exists(),
        "the kill should land mid-tuning ({} distinct dim sets to score)",
        t.trials.iter().filter(|x| x.scored).count()
    );
    let out = run_cli(&study, &dir2, &[]);
    let resumed = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{resumed}");
    assert!(
        resumed.contains("kept from an interrupted run"),
        "{resumed}"
    );
    let again = rundir::read_results(&dir2).unwrap();
    let t2 = &again.tunes[0];
    let key = |t: &outlierlab::study::rundir::TuneResult| {
        t.trials
            .iter()
            .map(|x| (x.params.clone(), x.dims.clone(), x.objective, x.scored))
            .collect::<Vec<_>>()
    };
    assert_eq!(key(t), key(t2));
    assert_eq!(t.thresholds, t2.thresholds);
    assert!(
        !memo_file.exists(),
        "the memo goes once the tuning is stored"
    );
}

/// A selection split may name a prompt set no other split uses (it used to panic), and
/// `validate` checks layer-dependent settings against the model's own layer count.
#[test]
fn selection_only_dataset_runs_and_validate_checks_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let own = tmp.path().join("own-harmless.txt");
    std::fs::write(
        &own,
        "Name three colours.\nWhat is two plus two?\nDescribe a cat.\nList two fruits.\n",
    )
    .unwrap();
    let text = format!(
        "name: sel
model: smollm2-135m-instruct
datasets:
  direction:
    good: {{name: harmless-outlierlab, count: 4}}
    bad: {{name: advbench, count: 4}}
  evaluation:
    good: {{name: harmless-outlierlab, count: 2, offset: 4}}
    bad: {{name: advbench, count: 2, offset: 4}}
  selection:
    good: {{name: {}, count: 2}}
    bad: {{name: advbench, count: 2, offset: 6}}
ablation: {{direction_index: 17}}
evaluation: {{max_response_tokens: 4, over_refusal_tokens: 0, batch_size: 8, refusal: [heretic, phrases]}}
variants:
  - {{name: none, handling: none}}
",
        own.display()
    );
    let study = tmp.path().join("sel.yaml");
    std::fs::write(&study, &text).unwrap();
    let run = tmp.path().join("run");
    run_ok(&study, &run, &[]);
    // A second classifier's labels are in the outcomes table, per reply, as in the score files.
    {
        use polars::prelude::*;
        let df = ParquetReader::new(std::fs::File::open(run.join("outcomes.parquet")).unwrap())
            .finish()
            .unwrap();
        let col: Vec<Option<bool>> = df
            .column("refused_by_phrases")
            .unwrap()
            .bool()
            .unwrap()
            .iter()
            .collect();
        let r = rundir::read_results(&run).unwrap();
        let want: Vec<Option<bool>> = r
            .scores
            .values()
            .flat_map(|s| {
                let l = s.outcome.labels["phrases"].iter().map(|x| Some(*x));
                l.chain(std::iter::repeat_n(None, s.outcome.kl.len()))
            })
            .collect();
        assert_eq!(col, want);
        assert_eq!(want.iter().filter(|x| x.is_some()).count(), 2);
    }
    let validate = |text: &str| {
        let p = tmp.path().join("v.yaml");
        std::fs::write(&p, text).unwrap();
        let out = Command::new(bin())
            .args(["validate", p.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, msg) = validate(&text);
    assert!(ok && msg.contains("(30 layers)"), "{msg}");
    let (ok, msg) = validate(&text.replace("direction_index: 17", "direction_index: 99"));
    assert!(
        !ok && msg.contains(
            "ablation.direction_index 99 is outside this model's hidden states: it has 30 layers"
        ),
        "{msg}"
    );
    let (ok, msg) = validate(&text.replace(
        "ablation: {direction_index: 17}",
        "ablation: {direction_index: 17, attn: {max_weight: 1.0, max_weight_position: 40, min_weight: 0.5, min_weight_distance: 10}}",
    ));
    assert!(
        !ok && msg.contains("ablation.attn.max_weight_position 40 is outside this model's layers"),
        "{msg}"
    );
}

#[test]
fn validate_power_says_what_the_study_can_detect() {
    use outlierlab::stats::power;
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("p.yaml");
    std::fs::write(
        &file,
        "model: smollm2-135m-instruct
datasets:
  direction:
    good: {name: harmless-outlierlab, count: 8}
    bad: {name: advbench, count: 8}
  evaluation:
    good: {name: harmless-outlierlab, count: 100, offset: 8}
    bad: {name: advbench, count: 100, offset: 8}
variants:
  - {name: none, handling: none}
  - {name: w99, handling: 'winsorize:0.99'}
  - {name: w95, handling: 'winsorize:0.95'}
replicates: [0, 1]
statistics: {references: [none], margins: {refusals: 5, kl: 0.01}}
",
    )
    .unwrap();
    let o = Command::new(bin())
        .args([
            "validate",
            file.to_str().unwrap(),
            "--power",
            "--discordance",
            "0.2",
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Two variants against `none`, two tests each; Holm's first step is α / 4; 200 pairs pooled.
    assert!(out.contains("2 comparisons at most (4 tests)"), "{out}");
    let level = 0.05 / 4.0;
    let mdd = power::mcnemar_mdd(0.2, 200.0, level, 0.8).unwrap();
    assert!(
        out.contains(&format!(
            "smallest detectable difference {:.1} points",
            100.0 * mdd
        )),
        "{out}"
    );
    let kl = power::mean_mdd(0.02, 200.0, level, 0.8);
    assert!(
        out.contains(&format!("smallest detectable difference {kl:.4}")),
        "{out}"
    );
    // ~12 points against a 5-point margin: the study says it cannot see such a difference.
    assert!(
        mdd > 0.05 && out.contains("warning: this study cannot detect a refusal difference"),
        "{out}"
    );
    let need = power::mcnemar_prompts_needed(0.05, 0.2, level, 0.8).unwrap();
    assert!(
        out.contains(&format!("needs {:.0} prompts per arm", need.ceil())),
        "{out}"
    );
    // Then the cost in advance, phase by phase, measured on this machine: the scores are three
    // variants' of two replicates, the unedited model's one per replicate (no selection split,
    // every split redrawn), so the scores cost three times the unedited model.
    let seconds = |what: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(what))
            .unwrap_or_else(|| panic!("no '{what}' line in {out}"));
        let mut w = line.split_whitespace().rev();
        let (unit, v) = (w.next().unwrap(), w.next().unwrap().parse::<f64>().unwrap());
        v * match unit {
            "s" => 1.0,
            "min" => 60.0,
            "h" => 3600.0,
            u => panic!("unit {u} in {line}"),
        }
    };
    assert!(out.contains("cost in advance on this machine"), "{out}");
    let (direction, unedited, scores, total) = (
        seconds("direction passes (2 replicate(s))"),
        seconds("unedited model"),
        seconds("scores (3 variants x 2 replicate(s)"),
        seconds("total"),
    );
    assert!(direction > 0.0 && unedited > 0.0, "{out}");
    assert!((scores / unedited - 3.0).abs() < 0.5, "{out}");
    assert!(
        (total - (direction + unedited + scores)).abs() <= 0.1 * total + 1.0,
        "{out}"
    );
}

#[test]
fn several_sets_per_split_are_checked_for_overlap_with_their_index() {
    let text = GOOD.replace(
        "    bad: {name: advbench, count: 4, offset: 8}",
        "    bad: [{name: harmbench, count: 4}, {name: advbench, count: 4, offset: 6}]",
    );
    let e = err_of(&text);
    assert!(
        e.contains("datasets.evaluation.bad[1].offset") && e.contains("overlap"),
        "{e}"
    );
    let ok = GOOD.replace(
        "    bad: {name: advbench, count: 4, offset: 8}",
        "    bad: [{name: harmbench, count: 4}, {name: advbench, count: 4, offset: 8}]",
    );
    let s = spec::parse(&ok, "s.yaml").unwrap();
    assert_eq!(s.file.datasets.unwrap().evaluation.bad.count(), 8);
}

#[test]
fn redraw_direction_keeps_the_evaluation_prompts_and_redraws_the_rest() {
    use outlierlab::study::spec::Redraw;
    let d: spec::DatasetsSpec = serde_yaml::from_str(
        "direction:
  good: {name: harmless-outlierlab, count: 64, sample: true}
  bad: {name: advbench, count: 64, sample: true}
evaluation:
  good: {name: harmless-outlierlab, count: 100, offset: 64, sample: true}
  bad: {name: advbench, count: 100, offset: 64, sample: true}
selection:
  good: {name: harmless-outlierlab, count: 32, offset: 64, sample: true}
  bad: {name: advbench, count: 32, offset: 64, sample: true}
",
    )
    .unwrap();
    let sets: BTreeMap<String, Vec<String>> = ["harmless-outlierlab", "advbench"]
        .iter()
        .map(|n| (n.to_string(), outlierlab::datasets::load(n).unwrap()))
        .collect();
    let a = plan::draw_splits(&d, &sets, 1, 0, Redraw::Direction).unwrap();
    let b = plan::draw_splits(&d, &sets, 2, 0, Redraw::Direction).unwrap();
    assert_eq!(a.eval.good, b.eval.good);
    assert_eq!(a.eval.bad, b.eval.bad);
    assert_ne!(a.dir.good, b.dir.good);
    assert_ne!(a.sel.bad, b.sel.bad);
    // The evaluation split is the one `seed` 0 draws, and nothing else overlaps it.
    let base = outlierlab::datasets::take(&sets["harmless-outlierlab"], 100, 64, Some(0)).unwrap();
    assert_eq!(a.eval.good, base);
    for s in [&a, &b] {
        for p in s.dir.good.iter().chain(&s.sel.good) {
            assert!(!s.eval.good.contains(p));
        }
        assert!(s.dir.good.iter().all(|p| !s.sel.good.contains(p)));
    }
    // Redrawing everything changes the evaluation prompts between replicates (selection left
    // out: with every split drawn from one permutation its offsets would overlap evaluation's).
    let mut d = d;
    d.selection = None;
    let c1 = plan::draw_splits(&d, &sets, 1, 0, Redraw::All).unwrap();
    let c2 = plan::draw_splits(&d, &sets, 2, 0, Redraw::All).unwrap();
    assert_ne!(c1.eval.good, c2.eval.good);
}

#[test]
fn adding_a_classifier_completes_stored_scores_instead_of_rescoring_them() {
    // Scored first with heretic's markers alone (replies cut at the first marker), then with
    // the phrases too: the stored scores are kept, their cut replies completed, and everything
    // equals a fresh run of the second study.
    let tmp = tempfile::tempdir().unwrap();
    // A marker most replies hold early, so that many are cut (SmolLM2 seldom refuses).
    let markers = tmp.path().join("markers.txt");
    std::fs::write(&markers, "the\n").unwrap();
    let heretic = &format!(
        "name: cut
model: smollm2-135m-instruct
datasets:
  direction:
    good: {{name: harmless-outlierlab, count: 6}}
    bad: {{name: advbench, count: 6}}
  evaluation:
    good: {{name: harmless-outlierlab, count: 3, offset: 6}}
    bad: {{name: advbench, count: 8, offset: 6}}
ablation: {{direction_index: 17}}
evaluation: {{max_response_tokens: 24, over_refusal_tokens: 0, batch_size: 8, markers: {}}}
variants:
  - {{name: none, handling: none}}
  - {{name: winsorize, handling: 'winsorize:0.95'}}
",
        markers.display()
    );
    let both = heretic.replace(
        "batch_size: 8,",
        "batch_size: 8, refusal: [heretic, phrases],",
    );
    let (a, b) = (tmp.path().join("a.yaml"), tmp.path().join("b.yaml"));
    std::fs::write(&a, heretic).unwrap();
    std::fs::write(&b, &both).unwrap();
    let (kept, fresh) = (tmp.path().join("kept"), tmp.path().join("fresh"));
    let ok = |o: std::process::Output| {
        let e = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{e}");
        e
    };
    ok(run_cli(&a, &kept, &[]));
    let first = rundir::read_results(&kept).unwrap();
    let reference = |dir: &Path| -> outlierlab::evaluate::Outcome {
        let f = dir.join("results/r0/reference.json");
        serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap()
    };
    // The test means something only if some reply was cut short at a marker.
    let cut_short = |o: &outlierlab::evaluate::Outcome| {
        o.refused
            .iter()
            .zip(&o.reply_tokens)
            .filter(|(r, n)| **r && **n < 24)
            .count()
    };
    let cut_before: usize = first
        .scores
        .values()
        .map(|s| cut_short(&s.outcome))
        .sum::<usize>()
        + cut_short(&reference(&kept));
    assert!(cut_before > 0, "no reply was cut at a marker");
    // A shard left as it was, to merge with the relabelled one below.
    let stale = tmp.path().join("stale");
    let cp = Command::new("cp")
        .args(["-r", kept.to_str().unwrap(), stale.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(cp.success());

    let e = ok(run_cli(&b, &kept, &[]));
    assert!(
        e.contains("refusal classifiers changed") && e.contains("completed"),
        "{e}"
    );
    assert!(e.contains("0 score(s) computed now"), "{e}");
    ok(run_cli(&b, &fresh, &[]));
    let (k, f) = (
        rundir::read_results(&kept).unwrap(),
        rundir::read_results(&fresh).unwrap(),
    );
    assert_eq!(
        k.scores.keys().collect::<Vec<_>>(),
        f.scores.keys().collect::<Vec<_>>()
    );
    for (key, s) in &k.scores {
        let (o, want) = (&s.outcome, &f.scores[key].outcome);
        assert!(!o.stopped_at_marker && !want.stopped_at_marker);
        assert_eq!(o.replies, want.replies, "{key:?}");
        assert_eq!(o.reply_tokens, want.reply_tokens, "{key:?}");
        assert_eq!(o.refused, want.refused, "{key:?}");
        assert_eq!(o.kl, want.kl, "{key:?}");
        assert_eq!(o.labels["phrases"], want.labels["phrases"], "{key:?}");
        // The heretic labels did not move: a cut reply already held its marker.
        assert_eq!(o.refused, first.scores[key].outcome.refused);
    }
    let (rk, rf) = (reference(&kept), reference(&fresh));
    assert_eq!(rk.replies, rf.replies);
    assert_eq!(rk.refused, rf.refused);
    assert_eq!(rk.labels.get("phrases"), rf.labels.get("phrases"));
    assert_eq!(cut_short(&rk), 0);
    // A shard not yet relabelled does not merge with one that is, and the error says what to do.
    let m = Command::new(bin())
        .args(["merge", "--into"])
        .arg(tmp.path().join("merged"))
        .args([&kept, &stale])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&m.stderr);
    assert!(!m.status.success());
    assert!(
        e.contains("differ only in their refusal classifiers")
            && e.contains("run each shard again"),
        "{e}"
    );
    // A changed edit or reply length is still a different plan.
    let other = both.replace("max_response_tokens: 24", "max_response_tokens: 25");
    std::fs::write(&b, other).unwrap();
    let o = run_cli(&b, &kept, &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("different plan"));
}

/// A variant may name its dims instead of detecting them; such a variant needs no detection,
/// and a named-dims list that cannot mean anything is refused at its key. A study that gains
/// variants resumes (its plan extends the stored one); one that changes a variant does not.
#[test]
fn named_dims_and_plans_that_add_variants() {
    let with = |extra: &str| format!("{GOOD}{extra}");
    let s = spec::parse(
        &with("  - {name: d62, handling: pr154-text, dims: [62]}\n"),
        "s.yaml",
    )
    .unwrap();
    let p = plan::plan(&s, 24).unwrap();
    let v = &p.variants[1].variant;
    assert_eq!(v.dims, Some(vec![62]));
    assert!(v.needs_dims() && !v.needs_detection() && v.detect.is_none());
    // The stored plan of the study without the new arm is extended by it, not contradicted.
    let before = plan::plan(&spec::parse(GOOD, "s.yaml").unwrap(), 24).unwrap();
    assert_eq!(before.added_by(&p), Some(1));
    assert_eq!(
        p.added_by(&before),
        None,
        "dropping a variant is not an extension"
    );
    assert_eq!(before.added_by(&before), None);
    let changed = plan::plan(
        &spec::parse(
            &GOOD.replace("handling: none", "handling: 'winsorize:0.9'"),
            "s.yaml",
        )
        .unwrap(),
        24,
    )
    .unwrap();
    assert_eq!(before.added_by(&changed), None);
    // Through the run directory: the extended plan is accepted, the changed one refused.
    let tmp = tempfile::tempdir().unwrap();
    rundir::write_or_check_plan(&rundir::RunDir::at(tmp.path()), &before).unwrap();
    rundir::write_or_check_plan(&rundir::RunDir::at(tmp.path()), &p).unwrap();
    let e = rundir::write_or_check_plan(&rundir::RunDir::at(tmp.path()), &changed).unwrap_err();
    assert!(format!("{e:#}").contains("different plan"), "{e:#}");
    for (yaml, needle) in [
        (
            "  - {name: d, handling: 'winsorize:0.9', dims: [62]}\n",
            "does not act on dims",
        ),
        (
            "  - {name: d, handling: pr154-code, dims: []}\n",
            "names no dims",
        ),
        (
            "  - {name: d, handling: pr154-code, dims: [62], detection: {preset: sun2024}}\n",
            "drop the other",
        ),
    ] {
        let e = err_of(&with(yaml));
        assert!(
            e.contains(needle) && e.contains("`variants[1].dims`"),
            "{e}"
        );
        assert!(e.starts_with("s.yaml:"), "{e}");
    }
}

/// A random control with `draws: K` becomes K null draws beside it, each with its own seed,
/// scored on KL alone; they are not arms (no verdict, no row in the replicate tables), and the
/// report places the arms that act on dims within their distribution.
#[test]
fn random_controls_with_draws_give_a_null_distribution() {
    // The plan: the control, then its draws; ill-formed draws refused at their key.
    let s = spec::parse(
        &format!("{GOOD}  - {{name: rd, handling: 'random-dims:5', draws: 3}}\n"),
        "s.yaml",
    )
    .unwrap();
    let p = plan::plan(&s, 24).unwrap();
    let names: Vec<&str> = p.variants.iter().map(|v| v.variant.name.as_str()).collect();
    assert_eq!(names, ["none", "rd", "rd~1", "rd~2", "rd~3"]);
    for (j, v) in p.variants[2..].iter().enumerate() {
        assert!(v.variant.kl_only() && v.variant.null_draw_of.as_deref() == Some("rd"));
        assert_eq!(
            v.variant.handlings,
            [outlierlab::direction::Handling::RandomDims { seed: 6 + j as u64 }]
        );
    }
    assert!(!p.variants[1].variant.kl_only());
    for (yaml, needle) in [
        (
            "  - {name: d, handling: pr154-text, draws: 3}\n",
            "not a random control",
        ),
        (
            "  - {name: d, handling: random-dims, draws: 1}\n",
            "2..=1000",
        ),
    ] {
        let e = err_of(&format!("{GOOD}{yaml}"));
        assert!(
            e.contains(needle) && e.contains("`variants[1].draws`"),
            "{e}"
        );
    }
    // A run: two draws of the control, KL only, and the report's null distribution.
    let tmp = tempfile::tempdir().unwrap();
    let study = tmp.path().join("null.yaml");
    std::fs::write(
        &study,
        RUN.replace(
            "  - {name: protect, handling: protect-output-rows}\n",
            "  - {name: rd, handling: random-dims, draws: 2}\n",
        )
        .replace(
            "sweeps:\n  - name: ratio\n    thresholds: {median_ratio: [300, 400, 450]}\n",
            "",
        ),
    )
    .unwrap();
    let out = tmp.path().join("run");
    let o = run_cli(&study, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = rundir::read_results(&out).unwrap();
    let draws: Vec<_> = r
        .scores
        .values()
        .filter(|s| s.outcome.refused.is_empty())
        .collect();
    assert_eq!(draws.len(), 2, "two KL-only scores");
    for s in &draws {
        assert_eq!(s.outcome.kl.len(), 4);
        assert!(s.outcome.replies.is_empty() && s.outcome.over_refused.is_empty());
    }
    // The two draws zero other dims than the control (seed 0) does, so their KL differs.
    assert_ne!(draws[0].outcome.kl, draws[1].outcome.kl);
    let md = std::fs::read_to_string(out.join("report/report.md")).unwrap();
    assert!(
        md.contains("## Null distributions") && md.contains("### `rd`: 2 draws"),
        "{md}"
    );
    let null = md.split("## Null distributions").nth(1).unwrap();
    let null = null.split("\n## ").next().unwrap();
    let row = null
        .lines()
        .find(|l| l.starts_with("| zero | "))
        .unwrap_or_else(|| panic!("the arm acting on dims is placed in the null:\n{null}"));
    assert!(row.contains(" | ") && row.contains("/2 | "), "{row}");
    assert!(
        !null.contains("| winsorize | "),
        "winsorisation acts on no dims:\n{null}"
    );
    assert!(!md.contains("rd~1"), "a null draw is not an arm:\n{md}");
}

/// `bench --study`: a study run from nothing cached, its phases printed in the order they ran,
/// their times summing to no more than the wall time, and the run folder's timings.json the
/// same phases.
#[test]
fn bench_study_prints_each_phase_of_a_fresh_run() {
    let tmp = tempfile::tempdir().unwrap();
    let study = tmp.path().join("tiny.yaml");
    std::fs::write(
        &study,
        RUN.replace(
            "sweeps:\n  - name: ratio\n    thresholds: {median_ratio: [300, 400, 450]}\n",
            "",
        ),
    )
    .unwrap();
    let keep = tmp.path().join("kept");
    let o = Command::new(bin())
        .args(["--precision", "f32", "bench", "--study"])
        .arg(&study)
        .arg("--keep")
        .arg(&keep)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let phases: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("phase"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    let first_word = |l: &str| l.split_whitespace().next().unwrap_or("").to_string();
    assert_eq!(first_word(phases[0]), "prompt", "{stdout}");
    assert!(phases[1].starts_with("r0 direction pass"), "{stdout}");
    assert!(
        phases[2].starts_with("r0 unedited model, evaluation split"),
        "{stdout}"
    );
    // none, winsorize and the two dims handlings (which share none's score when nothing is
    // found, or score on their own) — at least two scores, then the tables and the report.
    assert!(
        phases.iter().filter(|l| l.starts_with("r0 ")).count() >= 4,
        "{stdout}"
    );
    assert!(
        phases[phases.len() - 2].starts_with("parquet tables"),
        "{stdout}"
    );
    assert!(phases[phases.len() - 1].starts_with("report"), "{stdout}");
    let seconds = |l: &str| -> f64 {
        let f: Vec<&str> = l.split_whitespace().collect();
        f[f.len() - 2].parse().unwrap()
    };
    let sum: f64 = phases.iter().map(|l| seconds(l)).sum();
    let wall: f64 = stdout
        .lines()
        .find(|l| l.starts_with("wall time"))
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        sum <= wall + 0.2 && sum > 0.5 * wall,
        "phases {sum} s, wall {wall} s\n{stdout}"
    );
    assert!(
        stdout.contains("model                 smollm2-135m-instruct in f32"),
        "{stdout}"
    );
    let t: rundir::Timings = rundir::read_record(&rundir::RunDir::at(keep.join("run")).timings())
        .unwrap()
        .unwrap();
    assert_eq!(t.phases.len() + 1, phases.len());
    assert!(keep.join("report/report.md").exists());
    // A kept folder that exists is refused: the benchmark runs from nothing cached.
    let o = Command::new(bin())
        .args(["bench", "--study"])
        .arg(&study)
        .arg("--keep")
        .arg(&keep)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("the folder exists"));
}

/// `abliterate` is a one-replicate study that keeps nothing: the same prompts, the same detected
/// dims and the same per-prompt scores as the study file that says the same.
#[test]
fn the_one_variant_command_scores_what_the_same_study_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let study = tmp.path().join("one.yaml");
    // GOOD's prompts, and the settings the command is given below.
    let text = format!(
        "precision: f32\n{}  - name: protect\n    handling: protect-output-rows\n",
        GOOD.replace(
            "variants:",
            "evaluation: {max_response_tokens: 6, over_refusal_tokens: 4}
detection: {preset: pr154, set: {median_ratio: 300, mad_ratio: 300}}
variants:"
        )
    );
    std::fs::write(&study, text).unwrap();
    let dir = tmp.path().join("run");
    run_ok(&study, &dir, &[]);
    let r = rundir::read_results(&dir).unwrap();

    let out = Command::new(bin())
        .args([
            "abliterate",
            "--model",
            "smollm2-135m-instruct",
            "--precision",
            "f32",
            "--handling",
            "protect-output-rows",
            "--set",
            "median_ratio=300",
            "--set",
            "mad_ratio=300",
            "--direction-prompts",
            "8",
            "--eval-prompts",
            "4",
            "--max-response-tokens",
            "6",
            "--over-refusal-tokens",
            "4",
            "--json",
        ])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The command wrote nothing beside its output.
    let mut left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    left.sort();
    assert_eq!(left, ["one.yaml", "run"]);

    let rows = cli["results"].as_array().unwrap();
    let row = |name: &str| rows.iter().find(|r| r["name"] == name).unwrap();
    let per_prompt = |v: &serde_json::Value| -> (Vec<bool>, Vec<f64>, Vec<String>) {
        let p = &v["per_prompt"];
        (
            serde_json::from_value(p["refused"].clone()).unwrap(),
            serde_json::from_value(p["kl"].clone()).unwrap(),
            serde_json::from_value(p["replies"].clone()).unwrap(),
        )
    };
    let by_name = |name: &str| {
        let id = &r
            .plan
            .variants
            .iter()
            .find(|v| v.variant.name == name)
            .unwrap()
            .id;
        let a = r.assignments.iter().find(|a| &a.variant_id == id).unwrap();
        let s = &r.scores[&(a.replicate, a.key.clone())];
        (s.dims.clone(), s.outcome.clone())
    };
    for (cli_name, study_name) in [("none", "none"), ("protect-output-rows", "protect")] {
        let (dims, o) = by_name(study_name);
        let c = row(cli_name);
        let got: Vec<u32> = serde_json::from_value(c["dims"].clone()).unwrap();
        assert_eq!(got, dims, "{cli_name}: detected dims");
        assert_eq!(per_prompt(c), (o.refused, o.kl, o.replies), "{cli_name}");
    }
    let base = &r.references[&0];
    assert_eq!(
        per_prompt(row("unedited")),
        (base.refused.clone(), base.kl.clone(), base.replies.clone())
    );
    assert!(
        !by_name("protect").0.is_empty(),
        "the detection found no dims, so the test would not see a wrong one"
    );
}

/// Two-phase judging on a study: the judge reads exactly the replies the design picks (every
/// one where heretic and the phrases disagree, the seeded share of the rest), the others keep
/// the label the two agree on, and the report estimates the judge's rate from what it read.
#[test]
fn two_phase_judging_reads_what_the_design_picks_and_reports_the_estimate() {
    use outlierlab::evaluate::classify::{phrase_refusal, reply_key};
    use outlierlab::stats::two_phase;
    let tmp = tempfile::tempdir().unwrap();
    let study = tmp.path().join("s.yaml");
    let judge = "judge:smollm2-135m-instruct";
    std::fs::write(
        &study,
        format!(
            "name: two-phase
model: smollm2-135m-instruct
seed: 3
datasets:
  direction:
    good: {{name: harmless-outlierlab, count: 6}}
    bad: {{name: advbench, count: 6}}
  evaluation:
    good: {{name: harmless-outlierlab, count: 3, offset: 6}}
    bad: {{name: advbench, count: 24, offset: 6}}
ablation: {{direction_index: 17}}
evaluation: {{max_response_tokens: 16, over_refusal_tokens: 0, batch_size: 24, refusal: [heretic, phrases, '{judge}'], judge_sample: 0.25}}
variants:
  - {{name: none, handling: none}}
  - {{name: winsorize, handling: 'winsorize:0.95'}}
"
        ),
    )
    .unwrap();
    let out = tmp.path().join("run");
    run_ok(&study, &out, &[]);
    let r = rundir::read_results(&out).unwrap();
    assert_eq!(r.prompts.len(), 1, "one replicate");
    let prompts = &r.prompts.values().next().unwrap().bad;
    let mut outcomes: Vec<&outlierlab::evaluate::Outcome> =
        r.scores.values().map(|s| &s.outcome).collect();
    outcomes.extend(r.references.values());
    let (mut certain, mut sampled, mut skipped) = (0, 0, 0);
    for o in outcomes {
        let read = &o.judge_read[judge];
        let labels = &o.labels[judge];
        for i in 0..o.replies.len() {
            let disagree = o.refused[i] != phrase_refusal(&o.replies[i]);
            let want = two_phase::sampled(3, reply_key(&prompts[i], &o.replies[i]), disagree, 0.25);
            assert_eq!(read[i], want, "reply {i}");
            assert_eq!(o.judge_scores[judge][i].is_some(), read[i]);
            if !read[i] {
                assert_eq!(
                    labels[i], o.refused[i],
                    "an unread reply keeps the agreed label"
                );
            }
            match (disagree, read[i]) {
                (true, _) => certain += 1,
                (false, true) => sampled += 1,
                (false, false) => skipped += 1,
            }
        }
    }
    // The design was exercised: some replies sampled, some left out.
    assert!(
        sampled > 0 && skipped > sampled,
        "{certain} certain, {sampled} sampled, {skipped} not read"
    );
    let md = std::fs::read_to_string(out.join("report/report.md")).unwrap();
    let at = md
        .find(&format!("### `{judge}` by two-phase sampling"))
        .expect("the estimate's table");
    let table = &md[at..];
    assert!(
        table.contains("| unedited | ") && table.contains("% | ["),
        "{}",
        &table[..table.len().min(1500)]
    );
}
