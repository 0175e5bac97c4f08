//! `validate --power`'s cost in advance: a study's wall time on this machine, from its token
//! counts and the per-token costs measured here now.

use crate::model::{self, LoadedModel};
use crate::study::plan::Plan;
use crate::study::spec::{PairSpec, Redraw, Study};
use anyhow::Result;
use std::fmt::Write;

/// What one token costs the study's model here: prefill and greedy decode, in seconds.
struct Rates {
    prefill: f64,
    decode: f64,
}

/// Measures the study's model (and its judge, if any) and prints each phase's estimated wall
/// time. Assumed: every reply runs to its length limit (early stops shorten them), every
/// variant and tuning trial is a distinct score (variants whose dims coincide share one), and a
/// direction pass costs its prefill (its detection's scan comes on top).
pub fn cost_in_advance(study: &Study, plan: &Plan) -> Result<String> {
    let Some(d) = &study.file.datasets else {
        return Ok(String::new());
    };
    let e = &study.file.evaluation;
    eprintln!(
        "measuring this machine's per-token costs on {} ...",
        study.file.model
    );
    let lm = model::load_with(&study.file.model, plan.precision)?;
    // Decoding's cost per token falls with the batch; the benchmark's own time rises with it.
    let batch = e.batch_size.clamp(1, 64);
    let rates = measure(&lm, batch)?;
    let system = (study.file.chat).then_some(study.file.system_prompt.as_str());
    let sets = crate::study::runner::load_sets(study)?;
    let mean_tokens = |p: &PairSpec| -> Result<(f64, f64)> {
        let mean = |list: &crate::study::spec::SetList| -> Result<f64> {
            let mut lens = Vec::new();
            for s in &list.0 {
                for text in sets[&s.name].iter().skip(s.offset).take(s.count.min(64)) {
                    lens.push(lm.encode_chat(system, text)?.ids.len() as f64);
                }
            }
            Ok(lens.iter().sum::<f64>() / lens.len().max(1) as f64)
        };
        Ok((mean(&p.good)?, mean(&p.bad)?))
    };
    // One score of a split: its prompts' prefill, then the replies to harmful prompts and the
    // over-refusal check on harmless ones, decoded to their limits.
    let score = |p: &PairSpec| -> Result<f64> {
        let (g, b) = mean_tokens(p)?;
        let (ng, nb) = (p.good.count() as f64, p.bad.count() as f64);
        let prefill = (ng * g + nb * b) * rates.prefill;
        let decode =
            (nb * e.max_response_tokens as f64 + ng * e.over_refusal_tokens as f64) * rates.decode;
        Ok(prefill + decode)
    };
    let reps = plan.replicates.len().max(1) as f64;
    let (dg, db) = mean_tokens(&d.direction)?;
    let direction = reps
        * (d.direction.good.count() as f64 * dg + d.direction.bad.count() as f64 * db)
        * rates.prefill;
    let one_eval = score(&d.evaluation)?;
    let one_selection = d.selection.as_ref().map(&score).transpose()?.unwrap_or(0.0);
    // The unedited model is scored once on a fixed evaluation split, per replicate otherwise.
    let reference_runs = if plan.redraw == Redraw::Direction {
        1.0
    } else {
        reps
    };
    let unedited = reference_runs * one_eval + reps * one_selection;
    let trials: usize = plan
        .variants
        .iter()
        .map(|v| {
            v.variant.tune.as_ref().map_or(0, |t| t.trials)
                + v.variant.search.as_ref().map_or(0, |s| s.trials)
        })
        .sum();
    let optimising = reps * trials as f64 * one_selection;
    let scores = reps * plan.variants.len() as f64 * one_eval;
    let judge = judge_cost(study, plan, d, reps, &rates)?;
    let total = direction + unedited + optimising + scores + judge.as_ref().map_or(0.0, |j| j.1);
    let mut out = String::new();
    writeln!(
        out,
        "cost in advance on this machine ({}; {}): prefill {:.0} tokens/s, decode {:.0} tokens/s at batch {batch}, measured now; \
         assuming every reply runs to its length limit, every variant and trial is a distinct score, and a direction pass \
         costs its prefill (its detection's scan comes on top):",
        model::cpu::describe(lm.model.precision() == model::Precision::Bf16),
        lm.model.precision().name(),
        1.0 / rates.prefill,
        1.0 / rates.decode,
    )?;
    let line = |out: &mut String, what: String, s: f64| writeln!(out, "  {what:<58} {}", clock(s));
    line(
        &mut out,
        format!("direction passes ({} replicate(s))", reps),
        direction,
    )?;
    line(
        &mut out,
        "unedited model (evaluation and selection splits)".into(),
        unedited,
    )?;
    if trials > 0 {
        line(
            &mut out,
            format!("tuning and search ({trials} trials a replicate)"),
            optimising,
        )?;
    }
    line(
        &mut out,
        format!(
            "scores ({} variants x {} replicate(s), {} each)",
            plan.variants.len(),
            reps,
            clock(one_eval)
        ),
        scores,
    )?;
    if let Some((what, s)) = judge {
        line(&mut out, what, s)?;
    }
    line(&mut out, "total".into(), total)?;
    Ok(out)
}

/// The judge's share: every reply judged once (its instructions computed once per batch), or
/// under two-phase judging the sampled share of them plus the disagreements (not known before
/// the run; counted as none).
fn judge_cost(
    study: &Study,
    plan: &Plan,
    d: &crate::study::spec::DatasetsSpec,
    reps: f64,
    model_rates: &Rates,
) -> Result<Option<(String, f64)>> {
    let e = &study.file.evaluation;
    let Some(spec) = e.refusal.iter().find_map(|c| c.strip_prefix("judge:")) else {
        return Ok(None);
    };
    // A study that judges with its own model has measured it already.
    let measured;
    let rates = if spec == study.file.model {
        model_rates
    } else {
        eprintln!("measuring the judge {spec} ...");
        measured = measure(&model::load_with(spec, plan.precision)?, 16)?;
        &measured
    };
    let replies = (plan.variants.len() as f64 + 1.0) * reps * d.evaluation.bad.count() as f64;
    // A reply and its request, as the judge reads them after its shared instructions.
    let tokens = e.max_response_tokens as f64 + 48.0;
    let judged = replies * e.judge_sample;
    Ok(Some((
        format!(
            "judge {spec} ({judged:.0} of {replies:.0} replies{})",
            if e.judge_sample < 1.0 {
                ", plus the disagreements"
            } else {
                ""
            }
        ),
        judged * tokens * rates.prefill,
    )))
}

/// Seconds per token of prefill and of batched decode, from one short benchmark.
fn measure(lm: &LoadedModel, batch: usize) -> Result<Rates> {
    let r = crate::bench::run(lm, batch, 16, 1)?;
    let prefill = 1.0 / r.prefill_tokens_per_s;
    // Too short to time against the prefill (under 2% of it): count it at prefill's rate, more
    // than it costs.
    let decode = r.decode_tokens_per_s.map_or(prefill, |t| 1.0 / t);
    Ok(Rates { prefill, decode })
}

fn clock(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.0} s")
    } else if s < 5400.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}
