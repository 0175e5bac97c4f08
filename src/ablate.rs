//! Stage 4: abliteration. Removes the refusal direction from the matrices that write into the
//! residual stream, with heretic's layer kernel, and undoes it exactly.

use crate::direction::Directions;
use crate::model::{Model, Writer, WriterSnapshot};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};

/// heretic's per-component kernel: full strength `max_weight` at `max_weight_position`, falling
/// linearly to `min_weight` at `min_weight_distance` layers away, nothing beyond.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    pub max_weight: f64,
    pub max_weight_position: f64,
    pub min_weight: f64,
    pub min_weight_distance: f64,
}

impl Kernel {
    /// λ for a 0-based layer, or None when the layer is left alone.
    pub fn weight(&self, layer: usize) -> Option<f64> {
        let distance = (layer as f64 - self.max_weight_position).abs();
        if distance > self.min_weight_distance {
            return None;
        }
        let frac = if self.min_weight_distance > 0.0 {
            distance / self.min_weight_distance
        } else {
            0.0
        };
        Some(self.max_weight + frac * (self.min_weight - self.max_weight))
    }
}

/// How rows (one per residual dim) of an edited matrix are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowNorm {
    /// ΔW = −λ v (vᵀ W).
    None,
    /// The edit is computed on row-normalised weights and scaled back by each row's norm:
    /// ΔW = −λ diag(‖W_r‖) v (vᵀ Ŵ).
    Pre,
    /// Like `pre`, then every row is renormalised to its original norm. Computed exactly here;
    /// heretic approximates this step with a rank-3 SVD of the change (a LoRA adapter).
    Full,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AblationParams {
    /// None = each layer uses its own direction (that of its output, heretic's convention).
    pub direction_index: Option<f64>,
    pub attn: Kernel,
    pub mlp: Kernel,
    pub row_norm: RowNorm,
}

impl AblationParams {
    /// A reasonable default for a model with `layers` layers: full strength around 60% depth,
    /// tapering over half the model (inside heretic's search ranges).
    pub fn default_for(layers: usize) -> AblationParams {
        let l = layers as f64;
        let k = Kernel {
            max_weight: 1.0,
            max_weight_position: (0.6 * (l - 1.0)).round(),
            min_weight: 0.5,
            min_weight_distance: (0.5 * l).round().max(1.0),
        };
        AblationParams {
            direction_index: Some((0.6 * (l - 1.0)).round()),
            attn: k,
            mlp: k,
            row_norm: RowNorm::None,
        }
    }

    pub fn kernel(&self, w: Writer) -> &Kernel {
        match w {
            Writer::AttnOut => &self.attn,
            Writer::MlpDown => &self.mlp,
        }
    }
}

/// Row norms of W `[rows, cols]` as `[rows, 1]`.
fn row_norms(w: &Tensor) -> Result<Tensor> {
    Ok(w.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

/// The edited matrix for one writer. `keep` holds 0 for protected rows (they stay exactly as
/// they were) and 1 elsewhere; None protects nothing.
pub fn edit_matrix(
    w: &Tensor,
    v: &Tensor,
    lambda: f64,
    norm: RowNorm,
    keep: Option<&Tensor>,
) -> Result<Tensor> {
    let d = w.dim(0)?;
    let v = v.reshape((d, 1))?;
    // Scaling the left factor by the mask zeroes the change on protected rows and nowhere else.
    let left = match keep {
        Some(m) => v.broadcast_mul(&m.reshape((d, 1))?)?,
        None => v.clone(),
    };
    let edited = match norm {
        RowNorm::None => {
            let vtw = v.t()?.matmul(w)?;
            (w - (left.matmul(&vtw)? * lambda)?)?
        }
        RowNorm::Pre => {
            let n = row_norms(w)?;
            let wn = w.broadcast_div(&n)?;
            let vtw = v.t()?.matmul(&wn)?;
            let delta = left.matmul(&vtw)?.broadcast_mul(&n)?;
            (w - (delta * lambda)?)?
        }
        RowNorm::Full => {
            let n = row_norms(w)?;
            let wn = w.broadcast_div(&n)?;
            let vtw = v.t()?.matmul(&wn)?;
            let moved = (&wn - (left.matmul(&vtw)? * lambda)?)?;
            let renormed = moved
                .broadcast_div(&row_norms(&moved)?)?
                .broadcast_mul(&n)?;
            match keep {
                // Renormalising a protected row reproduces it only up to rounding: put it back.
                Some(m) => {
                    let m = m.reshape((d, 1))?;
                    let delta = (renormed - w)?.broadcast_mul(&m)?;
                    (w + delta)?
                }
                None => renormed,
            }
        }
    };
    Ok(edited)
}

/// Applies the abliteration to `model` (its writers as they are now). Undo with
/// `model.restore_writers(&snapshot)` taken before.
pub fn abliterate(
    model: &mut Model,
    dirs: &Directions,
    params: &AblationParams,
    protect: &[u32],
) -> Result<EditSummary> {
    let layers = model.num_layers();
    let d = model.hidden_size();
    if dirs.dirs.len() != layers + 1 {
        bail!(
            "{} directions for a model with {} hidden states",
            dirs.dirs.len(),
            layers + 1
        );
    }
    let fixed = match params.direction_index {
        Some(i) => Some(dirs.interpolated(i)?),
        None => None,
    };
    let keep = if protect.is_empty() {
        None
    } else {
        let mut m = vec![1f32; d];
        for &j in protect {
            if j as usize >= d {
                bail!("protected dim {j} is outside the hidden size {d}");
            }
            m[j as usize] = 0.0;
        }
        Some(Tensor::from_vec(m, d, &Device::Cpu)?)
    };
    let mut summary = EditSummary::default();
    for layer in 0..layers {
        let dir = fixed.as_ref().unwrap_or(&dirs.dirs[layer + 1]);
        let v = Tensor::from_slice(dir, d, &Device::Cpu)?;
        for w in Writer::ALL {
            let Some(lambda) = params.kernel(w).weight(layer) else {
                continue;
            };
            if lambda == 0.0 {
                continue;
            }
            let edited = edit_matrix(
                &model.writer(layer, w),
                &v,
                lambda,
                params.row_norm,
                keep.as_ref(),
            )?;
            model.set_writer(layer, w, edited)?;
            summary.edited.push((layer, w, lambda));
        }
    }
    Ok(summary)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EditSummary {
    /// (layer, writer, λ) of every edited matrix.
    pub edited: Vec<(usize, Writer, f64)>,
}

/// Applies an edit for the duration of `f`, then restores the weights bit for bit.
pub fn with_edit<T>(
    model: &mut Model,
    dirs: &Directions,
    params: &AblationParams,
    protect: &[u32],
    f: impl FnOnce(&Model) -> Result<T>,
) -> Result<T> {
    let snap: WriterSnapshot = model.snapshot_writers();
    let res = abliterate(model, dirs, params, protect).and_then(|_| f(model));
    model.restore_writers(&snap)?;
    res
}
