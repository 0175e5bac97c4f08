//! From a study file to concrete variants with stable ids: sweeps expanded, settings resolved.

use super::spec::{Study, Subsets, SweepSpec, CRITERIA};
use crate::datasets::Pair;
use crate::detect::config::MedianScope;
use crate::detect::DetectConfig;
use crate::direction::{self, Handling};
use crate::pipeline::Variant;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedVariant {
    /// A hash of the resolved settings (not of the name): the same settings get the same id in
    /// any study, so results can be reused and merged.
    pub id: String,
    pub variant: Variant,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub variants: Vec<PlannedVariant>,
    pub replicates: Vec<u64>,
    /// How every score is measured (reply length, classifiers, …): stored results are reused
    /// only under the same settings. Absent in runs made before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<super::spec::EvaluationSpec>,
    /// The precision the study runs in, `auto` resolved on this machine (absent: f32).
    #[serde(default, skip_serializing_if = "is_f32")]
    pub precision: crate::model::Precision,
    /// What a replicate redraws (absent: every split).
    #[serde(default, skip_serializing_if = "is_all")]
    pub redraw: super::spec::Redraw,
}

impl Plan {
    /// Whether the stored scores of `self` are scores of `other` too: the plans differ at most
    /// in the refusal classifiers (which label replies, never change a score's edit or KL).
    pub fn same_scores(&self, other: &Plan) -> bool {
        let canon = |p: &Plan| {
            let mut p = p.clone();
            if let Some(e) = &mut p.evaluation {
                let d = super::spec::EvaluationSpec::default();
                e.refusal = d.refusal;
                e.headline = d.headline;
                e.judge_threshold = d.judge_threshold;
                e.judge_sample = d.judge_sample;
            }
            serde_json::to_string(&p).ok()
        };
        canon(self).is_some() && canon(self) == canon(other)
    }

    /// How many variants `other` adds to `self` when it keeps every one of them and changes
    /// nothing else a score depends on (None otherwise): a study that gained arms resumes, its
    /// stored scores kept, its new arms scored.
    pub fn added_by(&self, other: &Plan) -> Option<usize> {
        let kept = self
            .variants
            .iter()
            .all(|v| other.variants.iter().any(|w| w.id == v.id));
        let added = other.variants.len().checked_sub(self.variants.len())?;
        let mut rest = other.clone();
        rest.variants = self.variants.clone();
        (kept && added > 0 && self.same_scores(&rest)).then_some(added)
    }
}

fn is_all(r: &super::spec::Redraw) -> bool {
    *r == super::spec::Redraw::All
}

fn is_f32(p: &crate::model::Precision) -> bool {
    *p == crate::model::Precision::F32
}

pub fn variant_id(v: &Variant) -> String {
    let mut canon = v.clone();
    canon.name = String::new();
    if !canon.needs_dims() {
        // Detection settings that no handling uses do not change the result.
        canon.detect = None;
    }
    canon.blank_control_name();
    let json = serde_json::to_string(&canon).expect("variants serialise");
    let h = Sha256::digest(json.as_bytes());
    h.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn criteria_off(c: &mut DetectConfig, keep: &[&str]) {
    for criterion in CRITERIA.iter().filter(|x| !keep.contains(x)) {
        c.switch_off(criterion);
    }
}

fn subsets(s: &Subsets) -> Vec<Vec<&str>> {
    match s {
        Subsets::All(_) => (0..32u32)
            .map(|mask| {
                CRITERIA
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, c)| *c)
                    .collect()
            })
            .collect(),
        Subsets::Listed(list) => list
            .iter()
            .map(|l| l.iter().map(String::as_str).collect())
            .collect(),
    }
}

fn expand_sweep(
    sw: &SweepSpec,
    base: &DetectConfig,
    ablation: &crate::ablate::AblationParams,
    orth: bool,
) -> Result<Vec<Variant>> {
    let mut out = Vec::new();
    let prefix = sw.name.clone().unwrap_or_else(|| "sweep".into());
    for q in &sw.winsorize {
        out.push(Variant {
            name: format!("winsorize-{q}"),
            handlings: vec![Handling::Winsorize { q: *q }],
            detect: None,
            ablation: ablation.clone(),
            orthogonalize: orth,
            search: None,
            tune: None,
            dims: None,
            null_draw_of: None,
        });
    }
    let detection_sweep =
        sw.criteria_subsets.is_some() || sw.median_scope.is_some() || !sw.thresholds.is_empty();
    if !detection_sweep {
        return Ok(out);
    }
    let handlings = Handling::parse_list(&sw.handling)?;
    let base = match &sw.detection {
        Some(d) => d.resolve()?,
        None => base.clone(),
    };
    let subs: Vec<Option<Vec<&str>>> = match &sw.criteria_subsets {
        Some(s) => subsets(s).into_iter().map(Some).collect(),
        None => vec![None],
    };
    let scopes: Vec<Option<&str>> = match &sw.median_scope {
        Some(v) => v.iter().map(|s| Some(s.as_str())).collect(),
        None => vec![None],
    };
    // The cartesian product of the threshold grids.
    let mut grids: Vec<Vec<(String, f64)>> = vec![Vec::new()];
    for (k, g) in &sw.thresholds {
        let vals = g.values()?;
        grids = grids
            .into_iter()
            .flat_map(|combo| {
                vals.iter().map(move |v| {
                    let mut c = combo.clone();
                    c.push((k.clone(), *v));
                    c
                })
            })
            .collect();
    }
    for sub in &subs {
        for scope in &scopes {
            for combo in &grids {
                let mut c = base.clone();
                let mut label = vec![prefix.clone()];
                for (k, v) in combo {
                    c.set(&format!("{k}={v}"))?;
                    label.push(format!("{k}={v}"));
                }
                if let Some(sub) = sub {
                    criteria_off(&mut c, sub);
                    // Without a value criterion the subset would take every dim; the scan floor
                    // becomes its value criterion, by name, so no report mistakes it for "none".
                    let floored = !c.has_value_criterion();
                    if floored {
                        c.floor = Some(crate::detect::config::FLOOR);
                    }
                    let mut names: Vec<&str> = sub.clone();
                    if floored {
                        names.push("floor");
                    }
                    label.push(names.join("+"));
                }
                if let Some(scope) = scope {
                    c.median_scope = if *scope == "layer" {
                        MedianScope::Layer
                    } else {
                        MedianScope::Position
                    };
                    label.push(format!("scope={scope}"));
                }
                out.push(Variant {
                    name: label.join(" "),
                    handlings: handlings.clone(),
                    detect: Some(c),
                    ablation: ablation.clone(),
                    orthogonalize: orth,
                    search: None,
                    tune: None,
                    dims: None,
                    null_draw_of: None,
                });
            }
        }
    }
    Ok(out)
}

/// Expands a study into its variants. `layers` is the model's layer count (ablation defaults
/// depend on it).
pub fn plan(study: &Study, layers: usize) -> Result<Plan> {
    let f = &study.file;
    let precision = f.precision.on_this_cpu();
    let base = f.detection.resolve()?;
    let (ablation, orth) = f.ablation.resolve(layers)?;
    let mut variants = Vec::new();
    for v in &f.variants {
        let handlings = Handling::parse_list(&v.handling)?;
        let detect = match &v.detection {
            Some(d) => d.resolve()?,
            None => base.clone(),
        };
        variants.push(Variant {
            name: v.name.clone(),
            handlings,
            // Named dims need no detection.
            detect: v.dims.is_none().then_some(detect),
            ablation: ablation.clone(),
            orthogonalize: orth,
            search: None,
            tune: None,
            dims: v.dims.clone(),
            null_draw_of: None,
        });
        // The control's null distribution: the same edit with the next K seeds, KL alone.
        let base = variants.last().expect("just pushed").clone();
        if let (Some(k), [Handling::RandomDims { seed }]) = (v.draws, base.handlings.as_slice()) {
            let seed = *seed;
            for j in 1..=k as u64 {
                variants.push(Variant {
                    name: format!("{}~{j}", v.name),
                    handlings: vec![Handling::RandomDims { seed: seed + j }],
                    null_draw_of: Some(v.name.clone()),
                    ..base.clone()
                });
            }
        }
    }
    for sw in &f.sweeps {
        variants.extend(expand_sweep(sw, &base, &ablation, orth)?);
    }
    for t in &f.tune {
        let detect = match &t.detection {
            Some(d) => d.resolve()?,
            None => base.clone(),
        };
        variants.push(Variant {
            name: t.name.clone(),
            handlings: Handling::parse_list(&t.handling)?,
            detect: Some(detect),
            ablation: ablation.clone(),
            orthogonalize: orth,
            search: None,
            tune: Some(t.clone()),
            dims: None,
            null_draw_of: None,
        });
    }
    for v in &mut variants {
        v.search = f.ablation.search.clone();
    }
    // The same settings twice are one variant (the first name wins).
    let mut seen = std::collections::HashSet::new();
    let mut planned = Vec::new();
    for v in variants {
        let id = variant_id(&v);
        if seen.insert(id.clone()) {
            planned.push(PlannedVariant { id, variant: v });
        }
    }
    let replicates = if f.replicates.is_empty() {
        vec![f.seed]
    } else {
        f.replicates.clone()
    };
    for pv in &planned {
        check_layers(&pv.variant.ablation, layers)
            .map_err(|e| anyhow::anyhow!("{}: variant '{}': {e}", study.path, pv.variant.name))?;
        if pv.variant.needs_detection() {
            if let Some(c) = &pv.variant.detect {
                check_shares_scan(&base, c).map_err(|e| {
                    anyhow::anyhow!("{}: variant '{}': {e}", study.path, pv.variant.name)
                })?;
            }
        }
    }
    Ok(Plan {
        variants: planned,
        replicates,
        evaluation: Some(f.evaluation.clone()),
        precision,
        redraw: f.redraw,
    })
}

/// A replicate's detections all read one scan, made with the study's `detection:` settings:
/// a variant that asks for another median, other pad rows or another trigger would silently get
/// the base's.
fn check_shares_scan(base: &DetectConfig, c: &DetectConfig) -> Result<()> {
    use crate::detect::config::Positions;
    if c.median_kind != base.median_kind {
        anyhow::bail!(
            "its detection takes the {:?} median but the study's `detection:` takes the {:?} one; \
             every detection of a study shares one scan, so set median_kind under `detection:`",
            c.median_kind,
            base.median_kind
        );
    }
    if c.positions == Positions::All && c.pad_rows != base.pad_rows {
        anyhow::bail!(
            "its detection scans padding computed as {:?} but the study's `detection:` computes pad rows as {:?}; \
             set pad_rows under `detection:`",
            c.pad_rows,
            base.pad_rows
        );
    }
    if c.sources.trigger.is_some() && c.sources.trigger != base.sources.trigger {
        anyhow::bail!(
            "its detection uses another trigger prompt than the study's `detection:`; set the trigger there"
        );
    }
    Ok(())
}

/// Layer-dependent settings against the model's layer count (written once: `validate` and
/// `run` both plan).
fn check_layers(p: &crate::ablate::AblationParams, layers: usize) -> Result<()> {
    let last = layers as f64 - 1.0;
    if let Some(d) = p.direction_index {
        if !(-1.0..=last).contains(&d) {
            anyhow::bail!(
                "ablation.direction_index {d} is outside this model's hidden states: it has {layers} layers, so use -1 (the embedding output) to {last}"
            );
        }
    }
    for (what, k) in [("attn", &p.attn), ("mlp", &p.mlp)] {
        if !(0.0..=last).contains(&k.max_weight_position) {
            anyhow::bail!(
                "ablation.{what}.max_weight_position {} is outside this model's layers (0 to {last})",
                k.max_weight_position
            );
        }
    }
    Ok(())
}

/// Label of a variant's handlings, for tables.
pub fn handling_label(v: &Variant) -> String {
    direction::label_list(&v.handlings)
}

/// One replicate's prompts, drawn from the loaded sets with its seed.
pub struct Splits {
    pub dir: Pair<Vec<String>>,
    pub eval: Pair<Vec<String>>,
    /// The prompt set each evaluation prompt was drawn from.
    pub eval_sources: Pair<Vec<String>>,
    /// Empty without a selection split.
    pub sel: Pair<Vec<String>>,
}

/// Draws every split for replicate `seed`, and checks on the drawn prompts what the study file
/// check can only check on offsets: no prompt is in two splits. With `Redraw::Direction` the
/// evaluation split is drawn with `base_seed` (the study's), the same for every replicate, and
/// the direction and selection splits are drawn with `seed` from the prompts it leaves (their
/// offsets count in that remainder).
pub fn draw_splits(
    d: &super::spec::DatasetsSpec,
    sets: &std::collections::BTreeMap<String, Vec<String>>,
    seed: u64,
    base_seed: u64,
    redraw: super::spec::Redraw,
) -> Result<Splits> {
    let loaded = |s: &super::spec::SetSpec| -> Result<&Vec<String>> {
        sets.get(&s.name)
            .ok_or_else(|| anyhow::anyhow!("prompt set '{}' was not loaded before the run", s.name))
    };
    let draw = |s: &super::spec::SetSpec, from: &[String], seed: u64| -> Result<Vec<String>> {
        crate::datasets::take(from, s.count, s.offset, s.sample.then_some(seed))
            .map_err(|e| anyhow::anyhow!("dataset {}: {e:#}", s.name))
    };
    let eval_seed = match redraw {
        super::spec::Redraw::All => seed,
        super::spec::Redraw::Direction => base_seed,
    };
    // A list's sets one after the other, and the set each prompt came from.
    let draw_list = |l: &super::spec::SetList,
                     pick: &dyn Fn(&super::spec::SetSpec) -> Result<Vec<String>>|
     -> Result<(Vec<String>, Vec<String>)> {
        let (mut out, mut from) = (Vec::new(), Vec::new());
        for s in &l.0 {
            let drawn = pick(s)?;
            from.extend(std::iter::repeat_n(s.name.clone(), drawn.len()));
            out.extend(drawn);
        }
        Ok((out, from))
    };
    let eval = |s: &super::spec::SetSpec| draw(s, loaded(s)?, eval_seed);
    let (good_eval, good_eval_sources) = draw_list(&d.evaluation.good, &eval)?;
    let (bad_eval, bad_eval_sources) = draw_list(&d.evaluation.bad, &eval)?;
    let held: std::collections::HashSet<&String> = good_eval.iter().chain(&bad_eval).collect();
    let rest_one = |s: &super::spec::SetSpec| -> Result<Vec<String>> {
        let all = loaded(s)?;
        match redraw {
            super::spec::Redraw::All => draw(s, all, seed),
            super::spec::Redraw::Direction => {
                let left: Vec<String> = all.iter().filter(|p| !held.contains(p)).cloned().collect();
                draw(s, &left, seed)
            }
        }
    };
    let rest = |l: &super::spec::SetList| Ok::<_, anyhow::Error>(draw_list(l, &rest_one)?.0);
    let (good_sel, bad_sel) = match &d.selection {
        Some(sel) => (rest(&sel.good)?, rest(&sel.bad)?),
        None => (Vec::new(), Vec::new()),
    };
    let s = Splits {
        dir: Pair::new(rest(&d.direction.good)?, rest(&d.direction.bad)?),
        eval: Pair::new(good_eval, bad_eval),
        eval_sources: Pair::new(good_eval_sources, bad_eval_sources),
        sel: Pair::new(good_sel, bad_sel),
    };
    for (a, b, what) in [
        (
            &s.dir.good,
            &s.eval.good,
            "harmless direction and evaluation",
        ),
        (&s.dir.bad, &s.eval.bad, "harmful direction and evaluation"),
        (
            &s.sel.good,
            &s.eval.good,
            "harmless selection and evaluation",
        ),
        (&s.sel.bad, &s.eval.bad, "harmful selection and evaluation"),
        (&s.sel.good, &s.dir.good, "harmless selection and direction"),
        (&s.sel.bad, &s.dir.bad, "harmful selection and direction"),
    ] {
        let set: std::collections::HashSet<&String> = a.iter().collect();
        if let Some(p) = b.iter().find(|p| set.contains(p)) {
            anyhow::bail!("replicate {seed}: {what} prompts overlap (e.g. {p:?})");
        }
    }
    Ok(s)
}
