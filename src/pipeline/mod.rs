//! One variant from prompts to score: detect → handle → direction → abliterate → evaluate.

pub mod settings;

use crate::ablate::{self, AblationParams};
use crate::detect::{self, DetectConfig, Scan, Source};
use crate::direction::{self, Directions, Handling, Residuals};
use crate::evaluate::{Evaluator, Outcome};
use crate::model::{HiddenConvention, LoadedModel};
use anyhow::Result;
use serde::{Deserialize, Serialize};
pub use settings::{SearchSettings, TuneSettings};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    pub name: String,
    pub handlings: Vec<Handling>,
    /// Detection settings, used when a handling needs detected dims.
    pub detect: Option<DetectConfig>,
    pub ablation: AblationParams,
    pub orthogonalize: bool,
    /// The edit is searched on the selection split, starting from `ablation`'s ranges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<SearchSettings>,
    /// The detection thresholds are tuned on the selection split; `detect` holds the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tune: Option<TuneSettings>,
    /// The dims the handling acts on, named instead of detected (a study's `dims: [62]`), so a
    /// study can tell which dims carry an effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dims: Option<Vec<u32>>,
    /// One draw of a random control's null distribution (`draws: K` in a study): scored on the
    /// harmless prompts' KL alone, which needs no decoding. Names the control it is a draw of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub null_draw_of: Option<String>,
}

impl Variant {
    pub fn needs_dims(&self) -> bool {
        self.handlings.iter().any(Handling::uses_dims)
    }

    /// Scored on KL alone (a null draw).
    pub fn kl_only(&self) -> bool {
        self.null_draw_of.is_some()
    }

    /// Where settings are hashed (variant ids, score keys): the control a null draw belongs to
    /// is a name, not a setting, so it is blanked; that the variant is KL-only stays.
    pub fn blank_control_name(&mut self) {
        if self.kl_only() {
            self.null_draw_of = Some(String::new());
        }
    }

    /// Whether the dims come from a detection (a handling uses dims and none are named).
    pub fn needs_detection(&self) -> bool {
        self.needs_dims() && self.dims.is_none()
    }

    /// The loosest detection this variant may apply: for a tuned variant, every tuned
    /// threshold at its lower bound (the scan must keep everything it could ask for).
    pub fn loosest_detect(&self) -> Result<Option<DetectConfig>> {
        let Some(mut c) = self.detect.clone() else {
            return Ok(None);
        };
        if let Some(t) = &self.tune {
            for (k, (lo, _)) in &t.thresholds {
                c.set(&format!("{k}={lo}"))?;
            }
        }
        Ok(Some(c))
    }
}

/// The direction prompts' residuals (last position, every hidden state) and the detector's scan
/// of their full hidden states, computed in one pass over the model.
pub struct DirectionData {
    pub good: Residuals,
    pub bad: Residuals,
    /// Trigger prompt, then good, then bad prompts.
    pub scan: Option<Scan>,
}

/// Runs the direction prompts once. With `scan_kind`, also scans every hidden state of the
/// trigger prompt and of every direction prompt for massive activations.
#[allow(clippy::too_many_arguments)]
pub fn direction_data(
    lm: &LoadedModel,
    good: &[String],
    bad: &[String],
    trigger: Option<&str>,
    system: Option<&str>,
    convention: HiddenConvention,
    scan: Option<detect::ScanSettings>,
    batch_size: usize,
    mut progress: impl FnMut(usize),
) -> Result<DirectionData> {
    let Some(settings) = scan else {
        let g = direction::collect(lm, good, system, convention, batch_size, &mut progress)?;
        let b = direction::collect(lm, bad, system, convention, batch_size, &mut progress)?;
        return Ok(DirectionData {
            good: g,
            bad: b,
            scan: None,
        });
    };
    let mut prompts: Vec<(Source, String)> = Vec::new();
    if let Some(t) = trigger {
        prompts.push((Source::Trigger, t.to_string()));
    }
    prompts.extend(good.iter().map(|p| (Source::Good, p.clone())));
    prompts.extend(bad.iter().map(|p| (Source::Bad, p.clone())));
    let states = lm.model.num_layers() + 1;
    let d = lm.model.hidden_size();
    let mut g = Residuals {
        n: good.len(),
        states,
        d,
        data: vec![0.0; states * good.len() * d],
    };
    let mut b = Residuals {
        n: bad.len(),
        states,
        d,
        data: vec![0.0; states * bad.len() * d],
    };
    let (mut gi, mut bi) = (0, 0);
    let mut full: Option<Scan> = None;
    // Chunks keep the full hidden states of only a few batches in memory at a time.
    for chunk in prompts.chunks(batch_size.max(1) * 2) {
        let ps = detect::collect_states(
            lm,
            chunk,
            system,
            convention,
            batch_size,
            settings.pad_rows,
            &mut progress,
        )?;
        for p in &ps {
            let t = p.tokens.len();
            let (target, idx) = match p.source {
                Source::Good => (&mut g, &mut gi),
                Source::Bad => (&mut b, &mut bi),
                Source::Trigger => continue,
            };
            for (s, h) in p.states.iter().enumerate() {
                target
                    .row_mut(s, *idx)
                    .copy_from_slice(&h[(t - 1) * d..t * d]);
            }
            *idx += 1;
        }
        let part = detect::scan(&ps, settings.median_kind, settings.floor);
        match &mut full {
            None => full = Some(part),
            Some(s) => s.merge(part),
        }
    }
    Ok(DirectionData {
        good: g,
        bad: b,
        scan: full,
    })
}

/// What a variant resolved to before editing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prepared {
    pub dims: Vec<u32>,
    pub protect: Vec<u32>,
    pub directions: Directions,
}

/// The variant's edit given its (already resolved) dims.
pub fn prepare_with_dims(data: &DirectionData, v: &Variant, dims: &[u32]) -> Result<Prepared> {
    if let Some(d) = dims.iter().find(|d| **d as usize >= data.good.d) {
        anyhow::bail!(
            "variant {}: dim {d} does not exist (the model's hidden size is {}; dims count from 0)",
            v.name,
            data.good.d
        );
    }
    let mut good = data.good.clone();
    let mut bad = data.bad.clone();
    let protect = direction::apply_handlings(&v.handlings, dims, &mut good, &mut bad)?;
    let directions = direction::refusal_directions(&good, &bad, v.orthogonalize)?;
    Ok(Prepared {
        dims: dims.to_vec(),
        protect,
        directions,
    })
}

/// Edits the model, scores it, restores it bit for bit.
pub fn score(
    lm: &mut LoadedModel,
    ev: &Evaluator,
    v: &Variant,
    p: &Prepared,
    progress: impl FnMut(&str, usize),
) -> Result<Outcome> {
    let tok = &lm.tokenizer;
    let model = &mut lm.model;
    ablate::with_edit(model, &p.directions, &v.ablation, &p.protect, |m| {
        if v.kl_only() {
            ev.score_kl(m, progress)
        } else {
            ev.score(m, tok, progress)
        }
    })
}

/// Edits the model as `score` did, completes the outcome's cut replies
/// ([`Evaluator::complete`]), restores it. Returns (replies regenerated, labels changed).
pub fn complete(
    lm: &mut LoadedModel,
    ev: &Evaluator,
    v: &Variant,
    p: &Prepared,
    o: &mut Outcome,
    progress: impl FnMut(&str, usize),
) -> Result<(usize, usize)> {
    let tok = &lm.tokenizer;
    let model = &mut lm.model;
    ablate::with_edit(model, &p.directions, &v.ablation, &p.protect, |m| {
        ev.complete(m, tok, o, progress)
    })
}

pub fn default_ablation(lm: &LoadedModel) -> AblationParams {
    AblationParams::default_for(lm.model.num_layers())
}
