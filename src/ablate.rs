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

/// How rows (one per residual dim) of an edited matrix are treated. Written `none`, `pre`,
/// `full` or `full-lowrank:R` in study files and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum RowNorm {
    /// ΔW = −λ v (vᵀ W).
    None,
    /// The edit is computed on row-normalised weights and scaled back by each row's norm:
    /// ΔW = −λ diag(‖W_r‖) v (vᵀ Ŵ).
    Pre,
    /// Like `pre`, then every row is renormalised to its original norm, computed exactly.
    Full,
    /// heretic's `full` as heretic computes it (its default, rank 3): the exact change of `full`,
    /// stored as a rank-R approximation from a randomized SVD (torch.svd_lowrank's algorithm,
    /// 2R+4 columns, 6 power iterations), seeded the same before every matrix as heretic reseeds.
    FullLowrank { rank: usize },
}

/// heretic's default row normalisation.
pub const HERETIC_ROW_NORM: RowNorm = RowNorm::FullLowrank { rank: 3 };

impl RowNorm {
    pub fn parse(s: &str) -> Result<RowNorm> {
        Ok(match s.trim() {
            "none" => RowNorm::None,
            "pre" => RowNorm::Pre,
            "full" => RowNorm::Full,
            other => match other.strip_prefix("full-lowrank:") {
                Some(r) => match r.parse::<usize>() {
                    Ok(rank) if rank >= 1 => RowNorm::FullLowrank { rank },
                    _ => bail!("row_norm '{other}': the rank must be a whole number ≥ 1, e.g. full-lowrank:3"),
                },
                None => bail!(
                    "row_norm '{other}': expected none, pre, full (exact) or full-lowrank:R (heretic's approximation, default full-lowrank:3)"
                ),
            },
        })
    }

    pub fn label(&self) -> String {
        match self {
            RowNorm::None => "none".into(),
            RowNorm::Pre => "pre".into(),
            RowNorm::Full => "full".into(),
            RowNorm::FullLowrank { rank } => format!("full-lowrank:{rank}"),
        }
    }
}

impl TryFrom<String> for RowNorm {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<RowNorm> {
        RowNorm::parse(&s)
    }
}

impl From<RowNorm> for String {
    fn from(r: RowNorm) -> String {
        r.label()
    }
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
            direction_index: Some(crate::direction::default_index(layers) as f64),
            attn: k,
            mlp: k,
            row_norm: HERETIC_ROW_NORM,
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
        RowNorm::Full | RowNorm::FullLowrank { .. } => {
            let n = row_norms(w)?;
            let wn = w.broadcast_div(&n)?;
            let vtw = v.t()?.matmul(&wn)?;
            let moved = (&wn - (left.matmul(&vtw)? * lambda)?)?;
            let renormed = moved
                .broadcast_div(&row_norms(&moved)?)?
                .broadcast_mul(&n)?;
            match (norm, keep) {
                // As heretic (and PR #154's code, which zeroes protected rows of the change
                // before this step): the low-rank factorisation of the exact change.
                (RowNorm::FullLowrank { rank }, _) => {
                    let delta = (renormed - w)?;
                    (w + low_rank(&delta, rank, LOWRANK_SEED)?)?
                }
                // Renormalising a protected row reproduces it only up to rounding: put it back.
                (_, Some(m)) => {
                    let m = m.reshape((d, 1))?;
                    let delta = (renormed - w)?.broadcast_mul(&m)?;
                    (w + delta)?
                }
                (_, None) => renormed,
            }
        }
    };
    Ok(edited)
}

/// The seed set before every factorisation (heretic reseeds torch before each call).
pub const LOWRANK_SEED: u64 = 0;

/// The rank-`rank` approximation of `a` `[m, n]` by randomized SVD (Halko, Martinsson & Tropp;
/// the algorithm of torch.svd_lowrank): a Gaussian sketch of 2·rank+4 columns, 6 power
/// iterations with re-orthonormalisation, then the exact SVD of the small projected matrix.
/// Only the tiny (q×q) eigenproblem runs in f64; the products with `a` stay on the fast path.
pub fn low_rank(a: &Tensor, rank: usize, seed: u64) -> Result<Tensor> {
    let (m, n) = a.dims2()?;
    let q = (2 * rank + 4).min(m).min(n);
    let rank = rank.min(q);
    let mut rng = crate::stats::Rng::new(seed);
    let omega: Vec<f32> = (0..n * q).map(|_| rng.normal() as f32).collect();
    let omega = Tensor::from_vec(omega, (n, q), a.device())?;
    let at = a.t()?.contiguous()?;
    let mut basis = orthonormal(&a.matmul(&omega)?)?;
    for _ in 0..6 {
        let z = orthonormal(&at.matmul(&basis)?)?;
        basis = orthonormal(&a.matmul(&z)?)?;
    }
    let b = basis.t()?.contiguous()?.matmul(a)?; // [q, n]
    let bbt: Vec<f64> = b
        .matmul(&b.t()?)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    let top = top_eigenvectors(&bbt, q, rank); // q×rank, column-major
                                               // Projector onto the top-rank left singular vectors of b (in the sketch's basis).
    let mut proj = vec![0f32; q * q];
    for i in 0..q {
        for j in 0..q {
            proj[i * q + j] = (0..rank)
                .map(|k| top[k * q + i] * top[k * q + j])
                .sum::<f64>() as f32;
        }
    }
    let proj = Tensor::from_vec(proj, (q, q), a.device())?;
    Ok(basis.matmul(&proj)?.matmul(&b)?)
}

/// An orthonormal basis of the columns of `y` `[m, q]` (modified Gram–Schmidt, twice, in f64).
fn orthonormal(y: &Tensor) -> Result<Tensor> {
    let (m, q) = y.dims2()?;
    let flat = y.flatten_all()?.to_vec1::<f32>()?;
    let mut cols: Vec<Vec<f64>> = (0..q)
        .map(|j| (0..m).map(|i| f64::from(flat[i * q + j])).collect())
        .collect();
    for j in 0..q {
        for _pass in 0..2 {
            for k in 0..j {
                let dot: f64 = cols[j].iter().zip(&cols[k]).map(|(a, b)| a * b).sum();
                let (head, tail) = cols.split_at_mut(j);
                for (x, y) in tail[0].iter_mut().zip(&head[k]) {
                    *x -= dot * y;
                }
            }
        }
        let norm = cols[j].iter().map(|x| x * x).sum::<f64>().sqrt();
        // A column that vanished (rank below q) stays zero and so adds nothing.
        let inv = if norm > 1e-300 { 1.0 / norm } else { 0.0 };
        cols[j].iter_mut().for_each(|x| *x *= inv);
    }
    let mut out = vec![0f32; m * q];
    for (j, c) in cols.iter().enumerate() {
        for (i, x) in c.iter().enumerate() {
            out[i * q + j] = *x as f32;
        }
    }
    Ok(Tensor::from_vec(out, (m, q), y.device())?)
}

/// The eigenvectors of the symmetric q×q matrix `s` (row-major) with the `k` largest
/// eigenvalues, column-major (`k` vectors of length q), by cyclic Jacobi rotations.
fn top_eigenvectors(s: &[f64], q: usize, k: usize) -> Vec<f64> {
    let mut a = s.to_vec();
    let mut v = vec![0f64; q * q];
    for i in 0..q {
        v[i * q + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..q)
            .flat_map(|i| (0..q).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * q + j] * a[i * q + j])
            .sum();
        let scale: f64 = (0..q).map(|i| a[i * q + i] * a[i * q + i]).sum();
        if off <= 1e-30 * scale.max(1e-300) {
            break;
        }
        for p in 0..q {
            for r in p + 1..q {
                let apr = a[p * q + r];
                if apr.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[r * q + r] - a[p * q + p]) / (2.0 * apr);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let sn = t * c;
                for i in 0..q {
                    let (aip, air) = (a[i * q + p], a[i * q + r]);
                    a[i * q + p] = c * aip - sn * air;
                    a[i * q + r] = sn * aip + c * air;
                }
                for i in 0..q {
                    let (api, ari) = (a[p * q + i], a[r * q + i]);
                    a[p * q + i] = c * api - sn * ari;
                    a[r * q + i] = sn * api + c * ari;
                }
                for i in 0..q {
                    let (vip, vir) = (v[i * q + p], v[i * q + r]);
                    v[i * q + p] = c * vip - sn * vir;
                    v[i * q + r] = sn * vip + c * vir;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..q).collect();
    order.sort_by(|&x, &y| a[y * q + y].total_cmp(&a[x * q + x]));
    let mut out = Vec::with_capacity(k * q);
    for &col in order.iter().take(k) {
        out.extend((0..q).map(|i| v[i * q + col]));
    }
    out
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

/// The edit the family references check (tests/fixtures/reference/scripts/families.py): each
/// layer its own direction, `v_l[i] ∝ sin(0.37 i + 0.1 l + 0.2)` for hidden state l, heretic's
/// kernel on both writers, no row normalisation (ΔW = −λ v (vᵀ W), heretic's `none`).
pub fn reference_edit(
    layers: usize,
    hidden: usize,
) -> (crate::direction::Directions, AblationParams) {
    let dirs = (0..=layers)
        .map(|l| {
            let v: Vec<f64> = (0..hidden)
                .map(|i| (0.37 * i as f64 + 0.1 * l as f64 + 0.2).sin())
                .collect();
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| (x / n) as f32).collect()
        })
        .collect();
    let params = AblationParams {
        direction_index: None,
        attn: Kernel {
            max_weight: 1.2,
            max_weight_position: 1.0,
            min_weight: 0.4,
            min_weight_distance: 2.0,
        },
        mlp: Kernel {
            max_weight: 0.9,
            max_weight_position: 2.0,
            min_weight: 0.3,
            min_weight_distance: 1.5,
        },
        row_norm: RowNorm::None,
    };
    (
        crate::direction::Directions {
            dirs,
            orthogonalized: false,
        },
        params,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(m: usize, n: usize, seed: u64) -> Tensor {
        let mut rng = crate::stats::Rng::new(seed);
        let v: Vec<f32> = (0..m * n).map(|_| rng.normal() as f32).collect();
        Tensor::from_vec(v, (m, n), &Device::Cpu).unwrap()
    }

    fn fro(t: &Tensor) -> f32 {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn low_rank_reproduces_a_low_rank_matrix_and_is_seeded() {
        // Rank 2 → a rank-3 approximation is exact.
        let a = random(60, 2, 1).matmul(&random(2, 90, 2)).unwrap();
        let l = low_rank(&a, 3, 0).unwrap();
        assert!(fro(&(&a - &l).unwrap()) < 1e-4 * fro(&a));
        // Rank 1 kept of a rank-2 matrix is not the matrix (the check can fail).
        let l1 = low_rank(&a, 1, 0).unwrap();
        assert!(fro(&(&a - &l1).unwrap()) > 1e-2 * fro(&a));
        let b = random(40, 70, 3);
        let x = low_rank(&b, 3, 7).unwrap().to_vec2::<f32>().unwrap();
        let y = low_rank(&b, 3, 7).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(x, y);
    }

    #[test]
    fn row_norm_spellings() {
        assert_eq!(RowNorm::parse("full-lowrank:3").unwrap(), HERETIC_ROW_NORM);
        assert_eq!(RowNorm::parse("none").unwrap(), RowNorm::None);
        assert!(RowNorm::parse("full-lowrank:0").is_err());
        let e = RowNorm::parse("ful").unwrap_err().to_string();
        assert!(e.contains("full-lowrank:R"), "{e}");
        let y: RowNorm = serde_yaml::from_str("full-lowrank:5").unwrap();
        assert_eq!(y, RowNorm::FullLowrank { rank: 5 });
        assert_eq!(serde_json::to_string(&RowNorm::Full).unwrap(), "\"full\"");
    }
}
