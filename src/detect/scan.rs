//! One pass over the hidden states: per-position and per-layer statistics, and every entry above
//! a low floor with the value of each criterion. Applying thresholds later is a filter over this
//! table, so a sweep of thousands of threshold sets never touches the model again.

use super::config::MedianKind;
use serde::{Deserialize, Serialize};

/// Where a scanned prompt came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Trigger,
    Good,
    Bad,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Trigger => "trigger",
            Source::Good => "good",
            Source::Bad => "bad",
        }
    }
}

/// The hidden states of one prompt, as the detector sees them.
#[derive(Debug, Clone)]
pub struct PromptStates {
    pub source: Source,
    pub text: String,
    /// Decoded token of each position (padding included).
    pub tokens: Vec<String>,
    /// false at padding positions.
    pub valid: Vec<bool>,
    /// `states[s]` is hidden state `s` (0 = embedding output), `[positions × hidden]` row-major.
    pub states: Vec<Vec<f32>>,
}

impl PromptStates {
    /// The last position (its batch pads on the left): where a chat prompt ends, and the one
    /// the refusal direction reads.
    pub fn last_position(&self) -> usize {
        self.valid.len() - 1
    }
}

/// Entries are kept when their ratio to either median, or their MAD z-score in either scope,
/// reaches `min_ratio`, or their |a| reaches `min_abs` when that is set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Floor {
    pub min_ratio: f32,
    pub min_abs: Option<f32>,
}

impl Default for Floor {
    fn default() -> Self {
        Floor {
            min_ratio: 20.0,
            min_abs: None,
        }
    }
}

pub const TOP_DEVIATIONS: usize = 10;

/// The small-cluster statistics of one hidden vector: the top-10 absolute deviations from the
/// median, the natural-log gaps between neighbours, the largest gap and what lies above it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cluster {
    /// Dims ordered by deviation, largest first (at most 10).
    pub top_dims: Vec<u32>,
    /// Index of the largest log gap: the cluster is `top_dims[..=gap_index]`.
    pub gap_index: u32,
    pub max_log_gap: f32,
    /// Sum of the log gaps before the largest one: the spread inside the cluster.
    pub intra_spread: f32,
}

impl Cluster {
    /// Criterion 4 for a cluster-size limit `m`.
    pub fn is_small(&self, m: usize) -> bool {
        (self.gap_index as usize) < m
            && self.max_log_gap > 1.0
            && self.max_log_gap > self.intra_spread
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PositionStats {
    pub layer: u32,
    pub prompt: u32,
    pub position: u32,
    pub valid: bool,
    pub max_abs: f32,
    pub argmax_dim: u32,
    pub median_abs: f32,
    /// Median absolute deviation of |h| from its median (unscaled; criterion 3 multiplies by 1.4826).
    pub mad: f32,
    pub cluster: Cluster,
    pub non_finite: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerStats {
    pub layer: u32,
    pub prompt: u32,
    /// Over all valid positions of this prompt at this layer.
    pub median_abs: f32,
    pub mad: f32,
}

/// One (layer, prompt, position, dim) above the floor, with every criterion's value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub layer: u32,
    pub prompt: u32,
    pub position: u32,
    pub dim: u32,
    pub value: f32,
    pub abs: f32,
    pub valid: bool,
    /// |a| / median(|h|) over the position.
    pub ratio_position: f32,
    /// |a| / median(|h|) over the layer's valid positions.
    pub ratio_layer: f32,
    /// | |a| − median | / (1.4826 × MAD), position scope.
    pub mad_z_position: f32,
    /// The same with the layer's median and MAD.
    pub mad_z_layer: f32,
    /// Rank of this dim among the position's top-10 deviations, if it is among them.
    pub deviation_rank: Option<u8>,
}

/// A NaN or infinite value: reported, never detected and never silently dropped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NonFinite {
    pub layer: u32,
    pub prompt: u32,
    pub position: u32,
    pub dim: u32,
    pub value: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptInfo {
    pub source: Source,
    pub text: String,
    pub tokens: Vec<String>,
    pub valid: Vec<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scan {
    pub num_states: usize,
    pub hidden_size: usize,
    pub median_kind: MedianKind,
    pub floor: Floor,
    pub prompts: Vec<PromptInfo>,
    pub positions: Vec<PositionStats>,
    pub layers: Vec<LayerStats>,
    pub entries: Vec<Entry>,
    pub non_finite: Vec<NonFinite>,
    /// Peak |a| of each dim over valid positions and over all positions.
    pub dim_peak_valid: Vec<f32>,
    pub dim_peak_all: Vec<f32>,
    /// Index of each prompt's first entry in `positions` (kept by `scan` and `merge`).
    #[serde(default)]
    pub offsets: Vec<usize>,
}

pub const MAD_SCALE: f32 = 1.4826;

/// Median of `v` (reordered in place). Empty → 0.
pub fn median(v: &mut [f32], kind: MedianKind) -> f32 {
    let n = v.len();
    if n == 0 {
        return 0.0;
    }
    let lo = (n - 1) / 2;
    let (_, m, upper) = v.select_nth_unstable_by(lo, f32::total_cmp);
    let m = *m;
    match kind {
        MedianKind::Lower => m,
        MedianKind::Average if n.is_multiple_of(2) => {
            let next = upper.iter().copied().fold(f32::INFINITY, f32::min);
            (m + next) / 2.0
        }
        MedianKind::Average => m,
    }
}

/// Median and MAD of the finite values of `abs`.
fn median_mad(abs: &[f32], kind: MedianKind, scratch: &mut Vec<f32>) -> (f32, f32) {
    scratch.clear();
    scratch.extend(abs.iter().copied().filter(|x| x.is_finite()));
    let med = median(scratch, kind);
    for x in scratch.iter_mut() {
        *x = (*x - med).abs();
    }
    let mad = median(scratch, kind);
    (med, mad)
}

fn ratio(num: f32, den: f32) -> f32 {
    if num == 0.0 {
        0.0
    } else if den == 0.0 {
        f32::INFINITY
    } else {
        num / den
    }
}

/// The small-cluster statistics of one vector of |h| with median `med`.
pub fn cluster_stats(abs: &[f32], med: f32) -> Cluster {
    let mut idx: Vec<u32> = (0..abs.len() as u32)
        .filter(|&j| abs[j as usize].is_finite())
        .collect();
    let dev = |j: u32| (abs[j as usize] - med).abs();
    let k = TOP_DEVIATIONS.min(idx.len());
    if k > 0 && idx.len() > k {
        idx.select_nth_unstable_by(k - 1, |&a, &b| dev(b).total_cmp(&dev(a)).then(a.cmp(&b)));
        idx.truncate(k);
    }
    idx.sort_by(|&a, &b| dev(b).total_cmp(&dev(a)).then(a.cmp(&b)));
    // A zero deviation has no logarithm; treat it as far below anything real.
    let logs: Vec<f32> = idx.iter().map(|&j| dev(j).max(1e-30).ln()).collect();
    let gaps: Vec<f32> = logs.windows(2).map(|w| w[0] - w[1]).collect();
    let (mut gi, mut g) = (0usize, f32::NEG_INFINITY);
    for (i, &x) in gaps.iter().enumerate() {
        if x > g {
            gi = i;
            g = x;
        }
    }
    if gaps.is_empty() {
        g = 0.0;
    }
    // `+ 0.0` turns the empty sum's −0.0 into 0.0.
    let intra = gaps.iter().take(gi).sum::<f32>() + 0.0;
    Cluster {
        top_dims: idx,
        gap_index: gi as u32,
        max_log_gap: g,
        intra_spread: intra,
    }
}

/// Scans every hidden state of every prompt.
pub fn scan(prompts: &[PromptStates], kind: MedianKind, floor: Floor) -> Scan {
    let num_states = prompts.first().map_or(0, |p| p.states.len());
    let d = prompts
        .first()
        .and_then(|p| p.states.first().map(|s| s.len() / p.tokens.len().max(1)))
        .unwrap_or(0);
    let mut out = Scan {
        num_states,
        hidden_size: d,
        median_kind: kind,
        floor,
        prompts: prompts
            .iter()
            .map(|p| PromptInfo {
                source: p.source,
                text: p.text.clone(),
                tokens: p.tokens.clone(),
                valid: p.valid.clone(),
            })
            .collect(),
        positions: Vec::new(),
        layers: Vec::new(),
        entries: Vec::new(),
        non_finite: Vec::new(),
        dim_peak_valid: vec![0.0; d],
        dim_peak_all: vec![0.0; d],
        offsets: Vec::new(),
    };
    let mut scratch = Vec::new();
    let mut abs = vec![0f32; d];
    for (pi, p) in prompts.iter().enumerate() {
        out.offsets.push(out.positions.len());
        let t = p.tokens.len();
        for (s, state) in p.states.iter().enumerate() {
            assert_eq!(
                state.len(),
                t * d,
                "hidden state {s} of prompt {pi} has the wrong size"
            );
            // The layer-wide median and MAD over valid positions.
            scratch.clear();
            for pos in (0..t).filter(|&pos| p.valid[pos]) {
                scratch.extend(
                    state[pos * d..(pos + 1) * d]
                        .iter()
                        .map(|x| x.abs())
                        .filter(|x| x.is_finite()),
                );
            }
            let layer_abs = std::mem::take(&mut scratch);
            let (lmed, lmad) = median_mad(&layer_abs, kind, &mut scratch);
            out.layers.push(LayerStats {
                layer: s as u32,
                prompt: pi as u32,
                median_abs: lmed,
                mad: lmad,
            });
            for pos in 0..t {
                let h = &state[pos * d..(pos + 1) * d];
                let mut non_finite = 0;
                for (j, x) in h.iter().enumerate() {
                    abs[j] = x.abs();
                    if !x.is_finite() {
                        non_finite += 1;
                        out.non_finite.push(NonFinite {
                            layer: s as u32,
                            prompt: pi as u32,
                            position: pos as u32,
                            dim: j as u32,
                            value: *x,
                        });
                    } else {
                        out.dim_peak_all[j] = out.dim_peak_all[j].max(abs[j]);
                        if p.valid[pos] {
                            out.dim_peak_valid[j] = out.dim_peak_valid[j].max(abs[j]);
                        }
                    }
                }
                let (med, mad) = median_mad(&abs, kind, &mut scratch);
                let cluster = cluster_stats(&abs, med);
                let (mut max_abs, mut argmax) = (0f32, 0u32);
                for (j, &a) in abs.iter().enumerate() {
                    if a.is_finite() && a > max_abs {
                        max_abs = a;
                        argmax = j as u32;
                    }
                }
                for (j, &a) in abs.iter().enumerate() {
                    if !a.is_finite() {
                        continue;
                    }
                    let rp = ratio(a, med);
                    let rl = ratio(a, lmed);
                    let zp = ratio((a - med).abs(), MAD_SCALE * mad);
                    let zl = ratio((a - lmed).abs(), MAD_SCALE * lmad);
                    let f = floor.min_ratio;
                    let keep = rp >= f
                        || rl >= f
                        || zp >= f
                        || zl >= f
                        || floor.min_abs.is_some_and(|m| a >= m);
                    if !keep {
                        continue;
                    }
                    out.entries.push(Entry {
                        layer: s as u32,
                        prompt: pi as u32,
                        position: pos as u32,
                        dim: j as u32,
                        value: h[j],
                        abs: a,
                        valid: p.valid[pos],
                        ratio_position: rp,
                        ratio_layer: rl,
                        mad_z_position: zp,
                        mad_z_layer: zl,
                        deviation_rank: cluster
                            .top_dims
                            .iter()
                            .position(|&x| x == j as u32)
                            .map(|r| r as u8),
                    });
                }
                out.positions.push(PositionStats {
                    layer: s as u32,
                    prompt: pi as u32,
                    position: pos as u32,
                    valid: p.valid[pos],
                    max_abs,
                    argmax_dim: argmax,
                    median_abs: med,
                    mad,
                    cluster,
                    non_finite,
                });
            }
            scratch = layer_abs;
        }
    }
    out
}

impl Scan {
    /// Appends the scan of further prompts (same model, median kind and floor).
    pub fn merge(&mut self, other: Scan) {
        let off = self.prompts.len() as u32;
        let base = self.positions.len();
        self.offsets.extend(other.offsets.iter().map(|o| o + base));
        self.prompts.extend(other.prompts);
        self.positions
            .extend(other.positions.into_iter().map(|mut p| {
                p.prompt += off;
                p
            }));
        self.layers.extend(other.layers.into_iter().map(|mut l| {
            l.prompt += off;
            l
        }));
        self.entries.extend(other.entries.into_iter().map(|mut e| {
            e.prompt += off;
            e
        }));
        self.non_finite
            .extend(other.non_finite.into_iter().map(|mut n| {
                n.prompt += off;
                n
            }));
        for (a, b) in self.dim_peak_valid.iter_mut().zip(other.dim_peak_valid) {
            *a = a.max(b);
        }
        for (a, b) in self.dim_peak_all.iter_mut().zip(other.dim_peak_all) {
            *a = a.max(b);
        }
    }

    pub fn position_stats(&self, layer: u32, prompt: u32, position: u32) -> Option<&PositionStats> {
        // positions are pushed prompt-major, then layer, then position.
        let p = &self.prompts[prompt as usize];
        let before: usize = match self.offsets.get(prompt as usize) {
            Some(&o) => o,
            None => self.prompts[..prompt as usize]
                .iter()
                .map(|q| q.tokens.len() * self.num_states)
                .sum(),
        };
        let i = before + layer as usize * p.tokens.len() + position as usize;
        self.positions
            .get(i)
            .filter(|s| s.layer == layer && s.prompt == prompt && s.position == position)
    }

    pub fn layer_stats(&self, layer: u32, prompt: u32) -> Option<&LayerStats> {
        self.layers
            .get(prompt as usize * self.num_states + layer as usize)
    }

    pub fn token(&self, prompt: u32, position: u32) -> &str {
        self.prompts[prompt as usize]
            .tokens
            .get(position as usize)
            .map_or("", |s| s.as_str())
    }
}
