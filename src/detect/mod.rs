//! Stage 2: massive-activation detection.
//!
//! `scan` runs once per model and prompt set and keeps every entry above a low floor with the
//! value of each criterion; `apply` turns a threshold set into detected dims, hits and
//! near-misses; `table` stores a scan as a polars DataFrame (parquet).

pub mod apply;
pub mod config;
pub mod heldout;
pub mod scan;
pub mod summary;
pub mod table;
pub mod validate;

pub use apply::{apply, Detection};
pub use config::{preset, DetectConfig, DetectionSettings};
pub use scan::{scan, Floor, PromptStates, Scan, Source};

use crate::model::{Batch, HiddenConvention, LoadedModel, Logits};
use anyhow::Result;
use candle_core::IndexOp;

/// Runs the model over `prompts` (rendered through the chat template) and returns each prompt's
/// hidden states at every position of its padded batch. A trigger prompt runs alone, unpadded,
/// as PR #154's `_init_massive_activation_dims` runs it; the others run in left-padded batches of
/// `batch_size`, their pad rows computed as `pad_rows` says.
pub fn collect_states(
    lm: &LoadedModel,
    prompts: &[(Source, String)],
    system: Option<&str>,
    convention: HiddenConvention,
    batch_size: usize,
    pad_rows: crate::model::PadRows,
    mut on_batch: impl FnMut(usize),
) -> Result<Vec<PromptStates>> {
    let mut out = Vec::with_capacity(prompts.len());
    let mut groups: Vec<&[(Source, String)]> = Vec::new();
    let mut rest = prompts;
    while !rest.is_empty() {
        let n = if rest[0].0 == Source::Trigger {
            1
        } else {
            rest.iter()
                .take(batch_size.max(1))
                .take_while(|(s, _)| *s != Source::Trigger)
                .count()
        };
        let (group, tail) = rest.split_at(n);
        groups.push(group);
        rest = tail;
    }
    for chunk in groups {
        let enc = chunk
            .iter()
            .map(|(_, text)| lm.encode_chat(system, text))
            .collect::<Result<Vec<_>>>()?;
        let batch: Batch = lm.batch(&enc).with_pad_rows(pad_rows);
        let fwd = lm.model.forward(&batch, true, Logits::None)?;
        let hs = fwd.hidden_states(convention);
        for (b, (source, text)) in chunk.iter().enumerate() {
            let tokens = batch.ids[b]
                .iter()
                .zip(&batch.mask[b])
                .map(|(&id, &m)| {
                    if m == 1 {
                        lm.tokenizer.token_text(id)
                    } else {
                        "<pad>".to_string()
                    }
                })
                .collect();
            let states = hs
                .iter()
                .map(|h| Ok(h.i(b)?.flatten_all()?.to_vec1::<f32>()?))
                .collect::<Result<Vec<_>>>()?;
            out.push(PromptStates {
                source: *source,
                text: text.clone(),
                tokens,
                valid: batch.mask[b].iter().map(|&m| m == 1).collect(),
                states,
            });
        }
        on_batch(chunk.len());
    }
    Ok(out)
}

/// What a scan is made with; every detection applied to one scan must agree with it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScanSettings {
    pub median_kind: config::MedianKind,
    pub floor: Floor,
    pub pad_rows: crate::model::PadRows,
}

impl ScanSettings {
    pub fn for_config(cfg: &DetectConfig) -> ScanSettings {
        ScanSettings {
            median_kind: cfg.median_kind,
            floor: floor_for(cfg),
            pad_rows: cfg.pad_rows,
        }
    }
}

/// The floor a scan needs so that `cfg` can be applied to it.
pub fn floor_for(cfg: &DetectConfig) -> Floor {
    let ratios = [cfg.median_ratio, cfg.mad_ratio, cfg.floor]
        .into_iter()
        .flatten();
    let loosest = ratios.fold(f32::INFINITY, f32::min);
    let default = Floor::default();
    if loosest.is_finite() {
        Floor {
            min_ratio: default.min_ratio.min(loosest),
            min_abs: None,
        }
    } else {
        Floor {
            min_ratio: default.min_ratio,
            min_abs: cfg.min_abs,
        }
    }
}
