//! Optimisation on the selection split: the edit per variant (`ablation.search`) and detection
//! thresholds (`tune`). Both minimise heretic's objective with argmin's particle swarm under a
//! fixed trial budget and seed; the chosen setting is then scored once, elsewhere, on the
//! evaluation prompts, so the reported figure is never the optimised one.

use super::rundir::{
    best, read_record, write_record, Memo, Scored, SearchResult, Trial, TuneResult,
};
use crate::ablate::{AblationParams, Kernel};
use crate::detect::{self, Scan};
use crate::evaluate::{Evaluator, Outcome};
use crate::model::LoadedModel;
use crate::pipeline::settings::{Sampler, SearchObjective, SearchSettings, TuneSettings};
use crate::pipeline::{self as variant, DirectionData, Variant};
use crate::util::progress_bar;
use anyhow::Result;
use argmin::core::{CostFunction, Executor};
use argmin::solver::particleswarm::ParticleSwarm;
use rand_xoshiro::rand_core::SeedableRng;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use std::time::Instant;

/// The selection split: its evaluator and the unedited model's score on it.
pub struct Selection {
    pub evaluator: Evaluator,
    pub base: Outcome,
}

/// heretic's two objectives summed: refusals relative to the unedited model, and KL — which
/// below `kl_target` is replaced by the refusal ratio scaled to the target, so that once the
/// edit is gentle enough only refusals matter.
pub fn objective(o: &Outcome, base_refusals: usize, kl_target: f64, kl_scale: f64) -> f64 {
    let k = o.refused.iter().filter(|x| **x).count();
    let ratio = k as f64 / base_refusals.max(1) as f64;
    let kl = o.kl_mean();
    let kl_term = if kl >= kl_target {
        kl / kl_scale
    } else {
        ratio * kl_target / kl_scale
    };
    kl_term + ratio
}

type Objective<'a> = &'a mut dyn FnMut(&[f64]) -> Result<f64>;

struct Budgeted<'a> {
    f: RefCell<Objective<'a>>,
    left: Cell<usize>,
}

impl CostFunction for Budgeted<'_> {
    type Param = Vec<f64>;
    type Output = f64;

    fn cost(&self, x: &Vec<f64>) -> Result<f64, argmin::core::Error> {
        // The swarm works in whole generations; evaluations past the budget are not run.
        if self.left.get() == 0 {
            return Ok(f64::INFINITY);
        }
        self.left.set(self.left.get() - 1);
        (self.f.borrow_mut())(x)
    }
}

/// Minimises `f` over the box `bounds` with a seeded particle swarm, calling `f` exactly
/// `trials` times (the last generation may be partial).
pub fn minimise(
    bounds: &[(f64, f64)],
    trials: usize,
    seed: u64,
    f: &mut dyn FnMut(&[f64]) -> Result<f64>,
) -> Result<()> {
    let particles = trials.clamp(1, 8);
    let generations = trials.div_ceil(particles);
    let lo: Vec<f64> = bounds.iter().map(|b| b.0).collect();
    let hi: Vec<f64> = bounds.iter().map(|b| b.1).collect();
    let rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
    let solver = ParticleSwarm::new((lo, hi), particles).with_rng_generator(rng);
    let cost = Budgeted {
        f: RefCell::new(f),
        left: Cell::new(trials),
    };
    Executor::new(cost, solver)
        .configure(|s| s.max_iters(generations.saturating_sub(1) as u64))
        .run()?;
    Ok(())
}

/// The edit's parameters searched, in heretic's ranges for a model with `layers` layers.
fn search_space(layers: usize, start: &AblationParams) -> Vec<(String, f64, f64)> {
    let last = layers.saturating_sub(1) as f64;
    let mut s = Vec::new();
    if start.direction_index.is_some() {
        s.push(("direction_index".into(), 0.4 * last, 0.9 * last));
    }
    for w in ["attn", "mlp"] {
        // heretic draws the MLP's strength from [−0.25, 1.5] and clamps it at 0 (params_at),
        // so a kernel can leave the MLP alone with positive probability.
        let low = if w == "mlp" { -0.25 } else { 0.8 };
        s.push((format!("{w}.max_weight"), low, 1.5));
        s.push((format!("{w}.max_weight_position"), 0.6 * last, last));
        // As a fraction of max_weight, so min <= max always holds.
        s.push((format!("{w}.min_weight_fraction"), 0.0, 1.0));
        s.push((
            format!("{w}.min_weight_distance"),
            1.0,
            (0.6 * last).max(1.0),
        ));
    }
    s
}

fn params_at(start: &AblationParams, names: &[String], x: &[f64]) -> AblationParams {
    let mut p = start.clone();
    let get = |n: &str| names.iter().position(|k| k == n).map(|i| x[i]);
    if let Some(d) = get("direction_index") {
        p.direction_index = Some(d);
    }
    for (w, k) in [("attn", &mut p.attn), ("mlp", &mut p.mlp)] {
        let mw = get(&format!("{w}.max_weight"))
            .map(|x| x.max(0.0))
            .unwrap_or(k.max_weight);
        *k = Kernel {
            max_weight: mw,
            max_weight_position: get(&format!("{w}.max_weight_position"))
                .unwrap_or(k.max_weight_position),
            min_weight: get(&format!("{w}.min_weight_fraction"))
                .map(|f| f * mw)
                .unwrap_or(k.min_weight),
            min_weight_distance: get(&format!("{w}.min_weight_distance"))
                .unwrap_or(k.min_weight_distance),
        };
    }
    p
}

fn scored_of(o: &Outcome, base_refusals: usize, kl_target: f64, kl_scale: f64) -> Scored {
    Scored {
        objective: objective(o, base_refusals, kl_target, kl_scale),
        refusals: refusals(o),
        n_bad: o.refused.len(),
        kl: o.kl_mean(),
    }
}

fn refusals(o: &Outcome) -> usize {
    o.refused.iter().filter(|x| **x).count()
}

/// Searches the edit for one variant (its dims already resolved into `prepared`).
pub fn search_edit(
    lm: &mut LoadedModel,
    sel: &Selection,
    v: &Variant,
    prepared: &variant::Prepared,
    spec: &SearchSettings,
    label: &str,
    memo: &mut Memo,
) -> Result<(AblationParams, f64, usize, Vec<Trial>, usize)> {
    let base_refusals = refusals(&sel.base);
    let space = search_space(lm.model.num_layers(), &v.ablation);
    let names: Vec<String> = space.iter().map(|s| s.0.clone()).collect();
    let bounds: Vec<(f64, f64)> = space.iter().map(|s| (s.1, s.2)).collect();
    let mut trials: Vec<Trial> = Vec::new();
    let n_work = sel.evaluator.work();
    let mut f = |x: &[f64]| -> Result<f64> {
        let t = Instant::now();
        let key = format!("{x:?}");
        let (sc, kept) = match memo.get(&key) {
            Some(sc) => (sc, true),
            None => {
                let mut vv = v.clone();
                vv.ablation = params_at(&v.ablation, &names, x);
                let pb = progress_bar(
                    n_work,
                    &format!("{label} search {}/{}", trials.len() + 1, spec.trials),
                );
                let o = variant::score(lm, &sel.evaluator, &vv, prepared, |_, n| pb.inc(n as u64))?;
                pb.finish_and_clear();
                let sc = scored_of(&o, base_refusals, spec.kl_target, spec.kl_scale);
                memo.put(key, sc)?;
                (sc, false)
            }
        };
        eprintln!(
            "  search {label} trial {:>2}/{}: refusals {}/{} KL {:.4} -> objective {:.4}{}",
            trials.len() + 1,
            spec.trials,
            sc.refusals,
            sc.n_bad,
            sc.kl,
            sc.objective,
            if kept {
                " (kept from an interrupted run)"
            } else {
                ""
            }
        );
        trials.push(Trial {
            index: trials.len(),
            params: names.iter().cloned().zip(x.iter().copied()).collect(),
            dims: None,
            objective: sc.objective,
            refusals: sc.refusals,
            n_bad: sc.n_bad,
            kl: sc.kl,
            scored: true,
            seconds: t.elapsed().as_secs_f64(),
        });
        Ok(sc.objective)
    };
    match spec.sampler() {
        Sampler::Swarm => minimise(&bounds, spec.trials, spec.seed, &mut f)?,
        Sampler::Random => {
            let mut rng = crate::stats::Rng::new(spec.seed);
            for _ in 0..spec.trials {
                let x: Vec<f64> = bounds
                    .iter()
                    .map(|(lo, hi)| lo + (hi - lo) * rng.uniform())
                    .collect();
                f(&x)?;
            }
        }
    }
    let b = match spec.objective {
        SearchObjective::Sum => best(&trials),
        SearchObjective::Pareto => pareto_choice(&trials, spec.max_kl),
    }
    .expect("at least one trial")
    .clone();
    let x: Vec<f64> = names.iter().map(|n| b.params[n]).collect();
    Ok((
        params_at(&v.ablation, &names, &x),
        b.objective,
        base_refusals,
        trials,
        b.index,
    ))
}

/// The trials no other trial beats on both refusals and KL (ties on both: the earliest).
pub fn pareto_front(trials: &[Trial]) -> Vec<usize> {
    let dominated = |t: &Trial| {
        trials.iter().any(|u| {
            (u.refusals <= t.refusals && u.kl <= t.kl)
                && (u.refusals < t.refusals || u.kl < t.kl || u.index < t.index)
        })
    };
    trials
        .iter()
        .filter(|t| !dominated(t))
        .map(|t| t.index)
        .collect()
}

/// The Pareto rule: among the front, the fewest refusals with KL ≤ `max_kl`, then the lowest
/// KL; when no trial is under the bound, the lowest KL of all.
pub fn pareto_choice(trials: &[Trial], max_kl: f64) -> Option<&Trial> {
    let front = pareto_front(trials);
    let on_front = || trials.iter().filter(|t| front.contains(&t.index));
    on_front()
        .filter(|t| t.kl <= max_kl)
        .min_by(|a, b| a.refusals.cmp(&b.refusals).then(a.kl.total_cmp(&b.kl)))
        .or_else(|| on_front().min_by(|a, b| a.kl.total_cmp(&b.kl)))
}

/// The rule a search chose by, in words, for reports.
pub fn rule(spec: &SearchSettings) -> String {
    match spec.objective {
        SearchObjective::Pareto => format!(
            "heretic's two objectives (refusals, KL) on the selection split; from their Pareto front, the fewest refusals with KL ≤ {} (then the lowest KL; if none is under the bound, the lowest KL); {:?} sampling",
            spec.max_kl,
            spec.sampler()
        ),
        SearchObjective::Sum => format!(
            "the summed objective (KL, or below KL {} the scaled refusal ratio, plus the refusal ratio); the lowest wins, ties to the lowest KL; {:?} sampling",
            spec.kl_target,
            spec.sampler()
        ),
    }
}

/// Tunes a variant's detection thresholds in log space. Thresholds that detect dims already
/// scored reuse that score, so the cost is one scoring per distinct dim set.
#[allow(clippy::too_many_arguments)]
pub fn tune_thresholds(
    lm: &mut LoadedModel,
    sel: &Selection,
    v: &Variant,
    variant_id: &str,
    replicate: u64,
    scan: &Scan,
    data: &DirectionData,
    spec: &TuneSettings,
    memo: &mut Memo,
) -> Result<TuneResult> {
    let t0 = Instant::now();
    let base_refusals = refusals(&sel.base);
    let names: Vec<String> = spec.thresholds.keys().cloned().collect();
    let bounds: Vec<(f64, f64)> = spec
        .thresholds
        .values()
        .map(|(lo, hi)| (lo.log10(), hi.log10()))
        .collect();
    let base_cfg = v
        .detect
        .clone()
        .ok_or_else(|| anyhow::anyhow!("tuned variant {} has no detection", v.name))?;
    // Dim sets met so far in this trace (a trial is `scored` when its dims are new here).
    let mut seen: std::collections::BTreeSet<Vec<u32>> = Default::default();
    let mut trials: Vec<Trial> = Vec::new();
    let n_work = sel.evaluator.work();
    let mut f = |x: &[f64]| -> Result<f64> {
        let t = Instant::now();
        let mut cfg = base_cfg.clone();
        let mut params = BTreeMap::new();
        for (k, lx) in names.iter().zip(x) {
            let val = 10f64.powf(*lx);
            cfg.set(&format!("{k}={val}"))?;
            params.insert(k.clone(), val);
        }
        let dims = detect::apply(&cfg, scan)?.dim_ids();
        let key = format!("{dims:?}");
        let scored = seen.insert(dims.clone());
        let (sc, kept) = match memo.get(&key) {
            Some(sc) => (sc, scored),
            None => {
                let prepared = variant::prepare_with_dims(data, v, &dims)?;
                let pb = progress_bar(
                    n_work,
                    &format!("tune {} trial {}/{}", v.name, trials.len() + 1, spec.trials),
                );
                let o = variant::score(lm, &sel.evaluator, v, &prepared, |_, n| pb.inc(n as u64))?;
                pb.finish_and_clear();
                let sc = scored_of(&o, base_refusals, spec.kl_target, spec.kl_scale);
                memo.put(key, sc)?;
                (sc, false)
            }
        };
        let obj = sc.objective;
        eprintln!(
            "  tune {} r{replicate} trial {:>2}/{}: {} -> dims {} objective {:.4}{}",
            v.name,
            trials.len() + 1,
            spec.trials,
            params
                .iter()
                .map(|(k, v)| format!("{k}={v:.1}"))
                .collect::<Vec<_>>()
                .join(" "),
            crate::util::dims_summary(&dims),
            obj,
            if kept {
                " (kept from an interrupted run)"
            } else if scored {
                ""
            } else {
                " (dims seen before)"
            }
        );
        trials.push(Trial {
            index: trials.len(),
            params,
            dims: Some(dims),
            objective: obj,
            refusals: sc.refusals,
            n_bad: sc.n_bad,
            kl: sc.kl,
            scored,
            seconds: t.elapsed().as_secs_f64(),
        });
        Ok(obj)
    };
    minimise(&bounds, spec.trials, spec.seed, &mut f)?;
    let b = best(&trials).expect("at least one trial").clone();
    Ok(TuneResult {
        variant_id: variant_id.to_string(),
        name: v.name.clone(),
        replicate,
        thresholds: b.params.clone(),
        dims: b.dims.clone().unwrap_or_default(),
        objective: b.objective,
        base_refusals,
        trials,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swarm_spends_exactly_the_budget_and_finds_a_bowl_minimum() {
        for trials in [1, 5, 8, 13, 40] {
            let mut calls = Vec::new();
            let mut f = |x: &[f64]| -> Result<f64> {
                calls.push(x.to_vec());
                Ok((x[0] - 0.3).powi(2) + (x[1] + 0.2).powi(2))
            };
            minimise(&[(-1.0, 1.0), (-1.0, 1.0)], trials, 7, &mut f).unwrap();
            assert_eq!(calls.len(), trials);
            assert!(calls.iter().flatten().all(|v| (-1.0..=1.0).contains(v)));
            if trials == 40 {
                let best = calls
                    .iter()
                    .map(|x| (x[0] - 0.3).powi(2) + (x[1] + 0.2).powi(2))
                    .fold(f64::INFINITY, f64::min);
                assert!(best < 0.01, "best {best}");
            }
        }
    }

    #[test]
    fn same_seed_same_trials() {
        let run = |seed| {
            let mut calls = Vec::new();
            let mut f = |x: &[f64]| -> Result<f64> {
                calls.push(x.to_vec());
                Ok(x[0].abs())
            };
            minimise(&[(-1.0, 1.0)], 12, seed, &mut f).unwrap();
            calls
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn objective_follows_heretic() {
        let o = |k: usize, kl: f64| Outcome {
            refused: (0..10).map(|i| i < k).collect(),
            replies: vec![String::new(); 10],
            reply_tokens: vec![0; 10],
            kl: vec![kl; 4],
            over_refused: vec![],
            seconds: 0.0,
            ..Default::default()
        };
        // Above the target: KL + refusal ratio.
        assert!((objective(&o(2, 0.5), 8, 0.01, 1.0) - (0.5 + 0.25)).abs() < 1e-12);
        // Below it, KL no longer counts: the refusal ratio, scaled to the target, stands in.
        assert!((objective(&o(2, 0.001), 8, 0.01, 1.0) - (0.25 * 0.01 + 0.25)).abs() < 1e-12);
        assert_eq!(
            objective(&o(2, 0.001), 8, 0.01, 1.0),
            objective(&o(2, 0.005), 8, 0.01, 1.0)
        );
    }
}

/// The stored search for one distinct edit, or a new one (resumed from its memo after an
/// interruption) written to `path`. `ids` = (score key, replicate, the variants sharing it).
pub fn stored_or_searched(
    lm: &mut LoadedModel,
    sel: Option<&Selection>,
    v: &Variant,
    prepared: &variant::Prepared,
    spec: &SearchSettings,
    path: &std::path::Path,
    (key, replicate, variant_ids): (&str, u64, Vec<String>),
) -> Result<SearchResult> {
    if let Some(sr) = read_record(path)? {
        return Ok(sr);
    }
    let sel = sel.ok_or_else(|| anyhow::anyhow!("ablation.search needs datasets.selection"))?;
    let t = Instant::now();
    let label = format!("r{replicate} {}", crate::util::trunc(&v.name, 24));
    let mut memo = Memo::load(&path.with_extension("partial"));
    let (params, objective, base_refusals, trials, chosen) =
        search_edit(lm, sel, v, prepared, spec, &label, &mut memo)?;
    let sr = SearchResult {
        key: key.to_string(),
        replicate,
        variant_ids,
        params,
        objective,
        base_refusals,
        pareto: pareto_front(&trials),
        chosen: Some(chosen),
        rule: rule(spec),
        trials,
        seconds: t.elapsed().as_secs_f64(),
    };
    write_record(path, &sr)?;
    memo.remove();
    Ok(sr)
}

/// Tunes one variant's thresholds on the selection split (resuming from its memo after an
/// interruption) and stores the result at `path`.
pub fn tune_and_store(
    lm: &mut LoadedModel,
    sel: &Selection,
    pv: &super::plan::PlannedVariant,
    seed: u64,
    scan: &Scan,
    data: &DirectionData,
    path: &std::path::Path,
) -> Result<TuneResult> {
    let spec = pv
        .variant
        .tune
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("variant {} is not tuned", pv.variant.name))?;
    eprintln!(
        "tuning {} on the selection split ({} trials)",
        pv.variant.name, spec.trials
    );
    let mut memo = Memo::load(&path.with_extension("partial"));
    let r = tune_thresholds(
        lm,
        sel,
        &pv.variant,
        &pv.id,
        seed,
        scan,
        data,
        spec,
        &mut memo,
    )?;
    write_record(path, &r)?;
    memo.remove();
    eprintln!(
        "tuned {} r{seed}: {} -> dims {} (selection objective {:.4}; {} distinct dim sets scored, {:.0} s)",
        pv.variant.name,
        r.thresholds
            .iter()
            .map(|(k, v)| format!("{k}={v:.1}"))
            .collect::<Vec<_>>()
            .join(" "),
        crate::util::dims_summary(&r.dims),
        r.objective,
        r.trials.iter().filter(|t| t.scored).count(),
        r.seconds
    );
    Ok(r)
}

#[cfg(test)]
mod pareto_tests {
    use super::*;

    fn t(index: usize, refusals: usize, kl: f64) -> Trial {
        Trial {
            index,
            params: BTreeMap::new(),
            dims: None,
            objective: 0.0,
            refusals,
            n_bad: 16,
            kl,
            scored: true,
            seconds: 0.0,
        }
    }

    #[test]
    fn front_and_rule() {
        let trials = vec![
            t(0, 10, 0.01),
            t(1, 4, 0.30),
            t(2, 2, 0.90),
            t(3, 5, 0.40), // dominated by 1
            t(4, 4, 0.30), // same as 1, later: dominated
            t(5, 0, 2.00),
        ];
        assert_eq!(pareto_front(&trials), vec![0, 1, 2, 5]);
        assert_eq!(pareto_choice(&trials, 0.5).unwrap().index, 1);
        assert_eq!(pareto_choice(&trials, 1.0).unwrap().index, 2);
        assert_eq!(pareto_choice(&trials, 5.0).unwrap().index, 5);
        // Nothing under the bound: the gentlest edit.
        assert_eq!(pareto_choice(&trials, 0.001).unwrap().index, 0);
    }

    #[test]
    fn mlp_strength_is_clamped_at_zero() {
        let start = AblationParams::default_for(24);
        let space = search_space(24, &start);
        let names: Vec<String> = space.iter().map(|s| s.0.clone()).collect();
        let i = names.iter().position(|n| n == "mlp.max_weight").unwrap();
        assert_eq!((space[i].1, space[i].2), (-0.25, 1.5));
        let j = names.iter().position(|n| n == "attn.max_weight").unwrap();
        assert_eq!((space[j].1, space[j].2), (0.8, 1.5));
        let mut x: Vec<f64> = space.iter().map(|s| s.2).collect();
        x[i] = -0.1;
        let p = params_at(&start, &names, &x);
        assert_eq!(p.mlp.max_weight, 0.0);
        assert_eq!(p.mlp.min_weight, 0.0);
        assert_eq!(p.mlp.weight(3).unwrap_or(0.0), 0.0);
    }
}
