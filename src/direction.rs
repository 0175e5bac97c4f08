//! Stage 3: residuals at the last prompt position, the handling of massive activations, and the
//! refusal direction per hidden state.

use crate::model::{HiddenConvention, LoadedModel, Logits};
use crate::stats::{quantile_sorted, Rng};
use anyhow::{bail, Context, Result};
use candle_core::{Device, IndexOp, Tensor};
use serde::{Deserialize, Serialize};

/// The hidden state whose direction an edit takes by default in a model of `layers` layers:
/// the one at 60% depth, inside heretic's search range.
pub fn default_index(layers: usize) -> usize {
    (0.6 * (layers as f64 - 1.0)).round().max(0.0) as usize
}

/// Hidden states at the last prompt position: `data[(s * n + p) * d + j]` for hidden state `s`,
/// prompt `p`, dim `j`.
#[derive(Debug, Clone)]
pub struct Residuals {
    pub n: usize,
    pub states: usize,
    pub d: usize,
    pub data: Vec<f32>,
}

impl Residuals {
    pub fn row(&self, s: usize, p: usize) -> &[f32] {
        let i = (s * self.n + p) * self.d;
        &self.data[i..i + self.d]
    }

    pub fn row_mut(&mut self, s: usize, p: usize) -> &mut [f32] {
        let i = (s * self.n + p) * self.d;
        &mut self.data[i..i + self.d]
    }

    pub fn mean(&self, s: usize) -> Vec<f64> {
        let mut m = vec![0f64; self.d];
        for p in 0..self.n {
            for (a, &x) in m.iter_mut().zip(self.row(s, p)) {
                *a += x as f64;
            }
        }
        m.iter_mut().for_each(|a| *a /= self.n.max(1) as f64);
        m
    }
}

/// Runs `prompts` (rendered with the chat template) and keeps each hidden state at the last
/// position — the position whose output is the first generated token.
pub fn collect(
    lm: &LoadedModel,
    prompts: &[String],
    system: Option<&str>,
    convention: HiddenConvention,
    batch_size: usize,
    mut on_batch: impl FnMut(usize),
) -> Result<Residuals> {
    let states = lm.model.num_layers() + 1;
    let d = lm.model.hidden_size();
    let n = prompts.len();
    if n == 0 {
        bail!("no prompts to compute residuals from");
    }
    let mut data = vec![0f32; states * n * d];
    let mut done = 0;
    for chunk in prompts.chunks(batch_size.max(1)) {
        let enc = chunk
            .iter()
            .map(|p| lm.encode_chat(system, p))
            .collect::<Result<Vec<_>>>()?;
        let batch = lm.batch(&enc);
        let t = batch.seq_len();
        let out = lm.model.forward(&batch, true, Logits::None)?;
        for (s, h) in out.hidden_states(convention).iter().enumerate() {
            let last: Vec<Vec<f32>> = h.i((.., t - 1))?.to_vec2()?;
            for (b, row) in last.iter().enumerate() {
                let i = (s * n + done + b) * d;
                data[i..i + d].copy_from_slice(row);
            }
        }
        done += chunk.len();
        on_batch(chunk.len());
    }
    Ok(Residuals { n, states, d, data })
}

/// One way of handling massive activations. A variant combines several (`+` in the CLI).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Handling {
    /// Leave everything as it is.
    None,
    /// Per prompt and hidden state, clamp each component to ± the q-quantile of that vector's
    /// absolute components (heretic's `winsorization_quantile`).
    Winsorize { q: f64 },
    /// One q-quantile over a hidden state's whole prompts × hidden tensor (llm-abliteration's
    /// `--clip`).
    WinsorizeGlobal { q: f64 },
    /// Zero the detected dims in good and bad residuals before the means (PR #154's text).
    ZeroResidualDims,
    /// The edit leaves the detected dims' rows of each edited matrix untouched (PR #154's code).
    ProtectOutputRows,
    /// Control: zero as many random dims as were detected.
    RandomDims { seed: u64 },
    /// Control: rotate residuals by a seeded random orthogonal matrix, winsorize at q, rotate
    /// back — tells a real effect of the basis from an artefact of it.
    RandomRotation { q: f64, seed: u64 },
}

impl Handling {
    /// Parses `none`, `winsorize:0.95`, `winsorize-global:0.99`, `zero-residual-dims` (alias
    /// `pr154-text`), `protect-output-rows` (alias `pr154-code`), `random-dims[:SEED]`,
    /// `random-rotation:Q[:SEED]`.
    pub fn parse(s: &str) -> Result<Handling> {
        let mut it = s.trim().split(':');
        let name = it.next().unwrap_or("");
        let args: Vec<&str> = it.collect();
        let q = |i: usize| -> Result<f64> {
            let v: f64 = args
                .get(i)
                .with_context(|| format!("handling '{s}' needs a quantile, e.g. {name}:0.95"))?
                .parse()
                .with_context(|| format!("handling '{s}': the quantile must be a number"))?;
            if !(0.0..=1.0).contains(&v) {
                bail!("handling '{s}': the quantile must lie between 0 and 1");
            }
            Ok(v)
        };
        let seed = |i: usize| -> Result<u64> {
            args.get(i).map_or(Ok(0), |x| {
                x.parse()
                    .with_context(|| format!("handling '{s}': the seed must be a whole number"))
            })
        };
        Ok(match name {
            "none" => Handling::None,
            "winsorize" => Handling::Winsorize { q: q(0)? },
            "winsorize-global" => Handling::WinsorizeGlobal { q: q(0)? },
            // The PR describes one mitigation and implements another; each alias names which.
            "zero-residual-dims" | "pr154-text" => Handling::ZeroResidualDims,
            "protect-output-rows" | "pr154-code" => Handling::ProtectOutputRows,
            "random-dims" => Handling::RandomDims { seed: seed(0)? },
            "random-rotation" => Handling::RandomRotation {
                q: q(0)?,
                seed: seed(1)?,
            },
            other => {
                let names = [
                    "none",
                    "winsorize",
                    "winsorize-global",
                    "zero-residual-dims",
                    "pr154-text",
                    "protect-output-rows",
                    "pr154-code",
                    "random-dims",
                    "random-rotation",
                ];
                let hint = crate::util::did_you_mean(other, &names)
                    .map(|n| format!(" (did you mean '{n}'?)"))
                    .unwrap_or_default();
                bail!(
                    "unknown handling '{other}'{hint}; handlings: {}",
                    names.join(", ")
                )
            }
        })
    }

    /// Parses a `+`-joined combination.
    pub fn parse_list(s: &str) -> Result<Vec<Handling>> {
        let v = s
            .split('+')
            .map(Handling::parse)
            .collect::<Result<Vec<_>>>()?;
        Ok(v.into_iter().filter(|h| *h != Handling::None).collect())
    }

    pub fn label(&self) -> String {
        match self {
            Handling::None => "none".into(),
            Handling::Winsorize { q } => format!("winsorize:{q}"),
            Handling::WinsorizeGlobal { q } => format!("winsorize-global:{q}"),
            Handling::ZeroResidualDims => "zero-residual-dims".into(),
            Handling::ProtectOutputRows => "protect-output-rows".into(),
            Handling::RandomDims { seed } => format!("random-dims:{seed}"),
            Handling::RandomRotation { q, seed } => format!("random-rotation:{q}:{seed}"),
        }
    }

    /// The residual dims this handling zeroes, given the detected `dims` and the hidden size:
    /// the detected ones, as many drawn at random for the control, none for the others. The
    /// report calls this too, so the dims a control zeroed are printed, not re-derived.
    pub fn zeroed_dims(&self, dims: &[u32], d: usize) -> Vec<u32> {
        match self {
            Handling::ZeroResidualDims => dims.to_vec(),
            Handling::RandomDims { seed } => random_dims(d, dims.len(), *seed, dims),
            _ => Vec::new(),
        }
    }

    /// Whether this handling needs detected dims.
    pub fn uses_dims(&self) -> bool {
        matches!(
            self,
            Handling::ZeroResidualDims | Handling::ProtectOutputRows | Handling::RandomDims { .. }
        )
    }
}

/// The label with whose method it is, for reports: a reader checks "pr154" against the PR.
pub fn describe_list(h: &[Handling]) -> String {
    if h.is_empty() {
        return "none".into();
    }
    h.iter()
        .map(|x| match x {
            Handling::ZeroResidualDims => "zero-residual-dims (PR #154's text)".to_string(),
            Handling::ProtectOutputRows => "protect-output-rows (PR #154's code)".to_string(),
            Handling::Winsorize { q } => format!("winsorize:{q} (heretic's winsorization)"),
            other => other.label(),
        })
        .collect::<Vec<_>>()
        .join(" + ")
}

pub fn label_list(h: &[Handling]) -> String {
    if h.is_empty() {
        "none".into()
    } else {
        h.iter().map(Handling::label).collect::<Vec<_>>().join("+")
    }
}

/// Clamps `v` to ± the q-quantile of its absolute values (linear interpolation, as
/// torch.quantile).
pub fn winsorize_row(v: &mut [f32], q: f64) {
    let mut abs: Vec<f64> = v.iter().map(|x| x.abs() as f64).collect();
    abs.sort_by(f64::total_cmp);
    let t = quantile_sorted(&abs, q) as f32;
    for x in v.iter_mut() {
        *x = x.clamp(-t, t);
    }
}

fn winsorize_global(r: &mut Residuals, s: usize, q: f64) {
    let lo = s * r.n * r.d;
    let block = &mut r.data[lo..lo + r.n * r.d];
    let mut abs: Vec<f64> = block.iter().map(|x| x.abs() as f64).collect();
    abs.sort_by(f64::total_cmp);
    let t = quantile_sorted(&abs, q) as f32;
    block.iter_mut().for_each(|x| *x = x.clamp(-t, t));
}

/// A seeded random orthogonal matrix (Gram–Schmidt on a Gaussian matrix), `[d, d]` row-major.
pub fn random_orthogonal(d: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut m: Vec<Vec<f64>> = (0..d)
        .map(|_| (0..d).map(|_| rng.normal()).collect())
        .collect();
    for i in 0..d {
        for j in 0..i {
            let dot: f64 = (0..d).map(|k| m[i][k] * m[j][k]).sum();
            let (head, tail) = m.split_at_mut(i);
            for (a, b) in tail[0].iter_mut().zip(&head[j]) {
                *a -= dot * b;
            }
        }
        let norm = m[i].iter().map(|x| x * x).sum::<f64>().sqrt();
        m[i].iter_mut().for_each(|x| *x /= norm);
    }
    m.into_iter().flatten().map(|x| x as f32).collect()
}

fn rotate(r: &mut Residuals, q_mat: &Tensor, transpose: bool) -> Result<()> {
    for s in 0..r.states {
        let lo = s * r.n * r.d;
        let x = Tensor::from_slice(&r.data[lo..lo + r.n * r.d], (r.n, r.d), &Device::Cpu)?;
        // Rows are residuals: y = x Qᵀ rotates, y = x Q rotates back.
        let y = if transpose {
            x.matmul(q_mat)?
        } else {
            x.matmul(&q_mat.t()?)?
        };
        let v: Vec<f32> = y.flatten_all()?.to_vec1()?;
        r.data[lo..lo + r.n * r.d].copy_from_slice(&v);
    }
    Ok(())
}

/// `count` dims of `0..d` drawn with `seed`, none of them in `avoid` (the detected dims: a
/// control that zeroed one of them would not be a random control).
pub fn random_dims(d: usize, count: usize, seed: u64, avoid: &[u32]) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..d as u32).collect();
    Rng::new(seed ^ 0xD1B5_4A32_D192_ED03).shuffle(&mut idx);
    let mut v: Vec<u32> = idx
        .into_iter()
        .filter(|i| !avoid.contains(i))
        .take(count)
        .collect();
    v.sort_unstable();
    v
}

/// Applies the residual-side handlings to good and bad residuals in place. `dims` are the
/// detected dims. Returns the dims the edit must protect (protect-output-rows), if any.
pub fn apply_handlings(
    handlings: &[Handling],
    dims: &[u32],
    good: &mut Residuals,
    bad: &mut Residuals,
) -> Result<Vec<u32>> {
    let mut protect = Vec::new();
    for h in handlings {
        match h {
            Handling::None => {}
            Handling::Winsorize { q } => {
                for r in [&mut *good, &mut *bad] {
                    for s in 0..r.states {
                        for p in 0..r.n {
                            winsorize_row(r.row_mut(s, p), *q);
                        }
                    }
                }
            }
            Handling::WinsorizeGlobal { q } => {
                for r in [&mut *good, &mut *bad] {
                    for s in 0..r.states {
                        winsorize_global(r, s, *q);
                    }
                }
            }
            Handling::ZeroResidualDims | Handling::RandomDims { .. } => {
                let zero = h.zeroed_dims(dims, good.d);
                for r in [&mut *good, &mut *bad] {
                    for s in 0..r.states {
                        for p in 0..r.n {
                            let row = r.row_mut(s, p);
                            for &j in &zero {
                                row[j as usize] = 0.0;
                            }
                        }
                    }
                }
            }
            Handling::ProtectOutputRows => protect.extend_from_slice(dims),
            Handling::RandomRotation { q, seed } => {
                let q_mat = Tensor::from_vec(
                    random_orthogonal(good.d, *seed),
                    (good.d, good.d),
                    &Device::Cpu,
                )?;
                for r in [&mut *good, &mut *bad] {
                    rotate(r, &q_mat, false)?;
                    for s in 0..r.states {
                        for p in 0..r.n {
                            winsorize_row(r.row_mut(s, p), *q);
                        }
                    }
                    rotate(r, &q_mat, true)?;
                }
            }
        }
    }
    protect.sort_unstable();
    protect.dedup();
    Ok(protect)
}

/// Unit refusal directions, one per hidden state: `dirs[s]` has length d.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Directions {
    pub dirs: Vec<Vec<f32>>,
    pub orthogonalized: bool,
}

fn normalize(v: &mut [f64]) {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// normalise(mean(bad) − mean(good)); with `orthogonalize`, the component along the normalised
/// good mean is removed and the result normalised again (heretic's default).
pub fn refusal_directions(
    good: &Residuals,
    bad: &Residuals,
    orthogonalize: bool,
) -> Result<Directions> {
    if good.states != bad.states || good.d != bad.d {
        bail!("good and bad residuals come from different models");
    }
    let mut dirs = Vec::with_capacity(good.states);
    for s in 0..good.states {
        let g = good.mean(s);
        let b = bad.mean(s);
        let mut r: Vec<f64> = b.iter().zip(&g).map(|(x, y)| x - y).collect();
        normalize(&mut r);
        if orthogonalize {
            let mut gd = g.clone();
            normalize(&mut gd);
            let dot: f64 = r.iter().zip(&gd).map(|(x, y)| x * y).sum();
            r.iter_mut().zip(&gd).for_each(|(x, y)| *x -= dot * y);
            normalize(&mut r);
        }
        dirs.push(r.into_iter().map(|x| x as f32).collect());
    }
    Ok(Directions {
        dirs,
        orthogonalized: orthogonalize,
    })
}

impl Directions {
    /// heretic's `direction_index`: a float between hidden states, 0 = the first layer's output
    /// (the embedding output is index −1); the two neighbours are interpolated and renormalised.
    pub fn interpolated(&self, index: f64) -> Result<Vec<f32>> {
        let pos = index + 1.0;
        let lo = pos.floor();
        let w = pos - lo;
        let lo = lo as isize;
        if lo < 0 || lo as usize + 1 >= self.dirs.len() && w > 0.0 || lo as usize >= self.dirs.len()
        {
            bail!(
                "direction_index {index} is outside the model's layers (0..{})",
                self.dirs.len() - 2
            );
        }
        let a = &self.dirs[lo as usize];
        let mut v: Vec<f64> = if w > 0.0 {
            let b = &self.dirs[lo as usize + 1];
            a.iter()
                .zip(b)
                .map(|(x, y)| *x as f64 + w * (*y as f64 - *x as f64))
                .collect()
        } else {
            a.iter().map(|x| *x as f64).collect()
        };
        normalize(&mut v);
        Ok(v.into_iter().map(|x| x as f32).collect())
    }
}
