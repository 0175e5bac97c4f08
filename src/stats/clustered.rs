//! Paired differences when the same prompts are scored under several direction draws.
//!
//! The prompt is the unit of evidence: a prompt scored under three draws is one prompt, not
//! three, and its differences are correlated across the draws (it refuses, or not, for reasons
//! of its own). So the prompt-level reading averages each prompt's differences over the draws it
//! appears in and tests those means — one value per prompt — with the sign-flip test of
//! [`super::paired`]. The draw itself is a second source of variance: the *draw-level* reading
//! treats the draws as a random factor and asks whether the effect generalises over them too.

use super::student::{t_quantile, t_two_sided};
use std::collections::HashMap;

/// Differences grouped by prompt: `units` holds one mean per distinct prompt, in the order the
/// prompts first appear (with no prompt repeated it is the input, in order); `per_draw` one mean
/// per draw.
#[derive(Debug, Clone)]
pub struct Clustered {
    pub units: Vec<f64>,
    pub per_draw: Vec<f64>,
    /// Some prompt appears in more than one draw.
    pub repeated: bool,
    /// (prompt, draw) differences in all.
    pub pairs: usize,
}

/// Groups differences `(prompt id, draw index, value)`; draw indices run over 0..draws.
pub fn cluster(diffs: &[(u64, usize, f64)], draws: usize) -> Clustered {
    let mut index: HashMap<u64, usize> = HashMap::new();
    let mut sums: Vec<(f64, usize)> = Vec::new();
    let mut draw_sums = vec![(0.0f64, 0usize); draws];
    for &(id, draw, x) in diffs {
        let i = *index.entry(id).or_insert_with(|| {
            sums.push((0.0, 0));
            sums.len() - 1
        });
        sums[i].0 += x;
        sums[i].1 += 1;
        draw_sums[draw].0 += x;
        draw_sums[draw].1 += 1;
    }
    Clustered {
        repeated: sums.iter().any(|s| s.1 > 1),
        units: sums.iter().map(|(s, n)| s / *n as f64).collect(),
        per_draw: draw_sums
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| s / *n as f64)
            .collect(),
        pairs: diffs.len(),
    }
}

fn mean_var(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n;
    let v = if x.len() < 2 {
        0.0
    } else {
        x.iter().map(|y| (y - m).powi(2)).sum::<f64>() / (n - 1.0)
    };
    (m, v)
}

/// The draw-level reading of one comparison: the R draws as a random factor.
///
/// Under a crossed model d[p, r] = μ + a[p] + b[r] + e[p, r] (prompt p, draw r), the grand
/// mean's variance is σa²/P + σb²/R + σe²/(PR). When the prompts are shared by the draws, the
/// prompt means estimate σa²/P + σe²/(PR) and the draw means σb²/R + σe²/(PR); their sum
/// overstates the variance by σe²/(PR), so this reading is conservative; the t reference has
/// the draw part's R − 1 degrees of freedom. When every draw has prompts of its own, the draw
/// means are independent estimates of μ and carry the variance alone (a t test on R means).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DrawReading {
    pub estimate: f64,
    /// Standard deviation of the per-draw estimates (the between-draw spread).
    pub spread: f64,
    pub draws: usize,
    pub se: f64,
    /// Degrees of freedom of the t reference (R − 1).
    pub df: f64,
    /// The prompt part of the variance (shared prompts only; 0 otherwise).
    pub prompt_var: f64,
}

impl DrawReading {
    /// None with fewer than two draws (there is no draw variance to read).
    pub fn new(c: &Clustered) -> Option<DrawReading> {
        let r = c.per_draw.len();
        if r < 2 {
            return None;
        }
        let (_, vd) = mean_var(&c.per_draw);
        let (estimate, vu) = mean_var(&c.units);
        let p = c.units.len();
        let draw_part = vd / r as f64;
        // R − 1 degrees of freedom, those of the draw part, whatever the prompt part's share:
        // with a few draws their variance is itself barely estimated, and Welch–Satterthwaite's
        // df, read off that estimate, runs liberal exactly when the draws happen to agree
        // (simulated in tests/calibration.rs).
        let prompt_var = if c.repeated && p >= 2 {
            vu / p as f64
        } else {
            0.0
        };
        let df = (r - 1) as f64;
        Some(DrawReading {
            estimate: if c.repeated {
                estimate
            } else {
                c.per_draw.iter().sum::<f64>() / r as f64
            },
            spread: vd.sqrt(),
            draws: r,
            se: (prompt_var + draw_part).sqrt(),
            df: df.max(1.0),
            prompt_var,
        })
    }

    /// Two-sided p of H0: μ = 0.
    pub fn p(&self) -> f64 {
        if self.se == 0.0 {
            return if self.estimate == 0.0 { 1.0 } else { 0.0 };
        }
        t_two_sided(self.estimate / self.se, self.df)
    }

    /// The interval at level `a` that inverts the same t test.
    pub fn interval(&self, a: f64) -> (f64, f64) {
        let q = t_quantile(1.0 - a / 2.0, self.df);
        (self.estimate - q * self.se, self.estimate + q * self.se)
    }

    /// Draws (with these prompts) for `power` to detect `delta` at level `a`: the smallest R'
    /// with (t₁₋ₐ/₂(R' − 1) + z_power)·√(prompt part + spread²/R') ≤ |delta|. None when the
    /// prompt part alone is too wide (more prompts first), or nothing was observed.
    pub fn draws_needed(&self, delta: f64, a: f64, power: f64) -> Option<usize> {
        if delta == 0.0 {
            return None;
        }
        let zp = super::normal_quantile(power);
        if (super::normal_quantile(1.0 - a / 2.0) + zp).powi(2) * self.prompt_var >= delta * delta {
            return None;
        }
        let enough = |r: usize| {
            let q = t_quantile(1.0 - a / 2.0, (r - 1) as f64) + zp;
            q * (self.prompt_var + self.spread * self.spread / r as f64).sqrt() <= delta.abs()
        };
        // Doubling, then bisection: `enough` holds from some R' on.
        let mut hi = 2usize;
        while !enough(hi) {
            hi *= 2;
            if hi > 1 << 24 {
                return None;
            }
        }
        let mut lo = hi / 2;
        while lo + 1 < hi {
            let mid = (lo + hi) / 2;
            if mid >= 2 && enough(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi)
    }
}

/// Where `x` falls in a null distribution of `null` draws (K of them), as empirical p-values
/// with the +1 that keeps them valid: `low` = (1 + #{draws ≤ x})/(K + 1), the chance of a draw
/// as low as x; `two_sided` = (1 + #{|draw| ≥ |x|})/(K + 1), as far from 0.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NullPosition {
    pub at_or_below: usize,
    pub low: f64,
    pub two_sided: f64,
}

pub fn null_position(null: &[f64], x: f64) -> NullPosition {
    let k = null.len() as f64;
    let at_or_below = null.iter().filter(|d| **d <= x).count();
    let far = null.iter().filter(|d| d.abs() >= x.abs()).count();
    NullPosition {
        at_or_below,
        low: (1.0 + at_or_below as f64) / (k + 1.0),
        two_sided: (1.0 + far as f64) / (k + 1.0),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn null_positions_count_the_draws_as_extreme() {
        let null = [-0.002, -0.001, 0.0, 0.001, 0.003];
        let p = super::null_position(&null, -0.0015);
        assert_eq!(p.at_or_below, 1);
        assert!((p.low - 2.0 / 6.0).abs() < 1e-12);
        // |d| ≥ 0.0015: −0.002 and 0.003.
        assert!((p.two_sided - 3.0 / 6.0).abs() < 1e-12);
        let beyond = super::null_position(&null, -0.01);
        assert_eq!((beyond.at_or_below, beyond.low), (0, 1.0 / 6.0));
    }

    use super::*;

    #[test]
    fn prompts_repeated_over_draws_are_one_unit_each() {
        // Three prompts, two draws; prompt 7 only in draw 1.
        let d = [
            (1, 0, 1.0),
            (2, 0, 0.0),
            (1, 1, 0.0),
            (2, 1, -1.0),
            (7, 1, 0.5),
        ];
        let c = cluster(&d, 2);
        assert_eq!(c.units, vec![0.5, -0.5, 0.5]);
        assert_eq!(c.per_draw, vec![0.5, -0.5 / 3.0]);
        assert!(c.repeated);
        assert_eq!(c.pairs, 5);
        // No repeats: the units are the input, in its order.
        let d = [(3, 0, 0.2), (1, 0, -0.1), (9, 1, 0.4)];
        let c = cluster(&d, 2);
        assert_eq!(c.units, vec![0.2, -0.1, 0.4]);
        assert!(!c.repeated);
    }

    #[test]
    fn draw_reading_adds_the_draw_variance_to_the_prompt_variance() {
        // Two prompts, three draws: d = 1 + draw effect (−1, 0, +1) + prompt effect (±0.5).
        let mut d = Vec::new();
        for (r, b) in [-1.0, 0.0, 1.0].iter().enumerate() {
            for (p, a) in [(10u64, 0.5), (11, -0.5)] {
                d.push((p, r, 1.0 + b + a));
            }
        }
        let c = cluster(&d, 3);
        let w = DrawReading::new(&c).unwrap();
        assert_eq!(w.draws, 3);
        assert!((w.estimate - 1.0).abs() < 1e-12);
        assert!((w.spread - 1.0).abs() < 1e-12);
        // Prompt means 1.5, 0.5: variance 0.5, over 2 prompts 0.25; draws: 1/3.
        assert!((w.prompt_var - 0.25).abs() < 1e-12);
        assert!((w.se - (0.25f64 + 1.0 / 3.0).sqrt()).abs() < 1e-12);
        let (lo, hi) = w.interval(0.05);
        assert!(lo < 0.0 && hi > 2.0, "{lo} {hi}");
        assert!(w.p() > 0.05);
        // The interval inverts the test: 0 is outside it exactly when p ≤ a.
        for a in [0.01, 0.05, 0.2, 0.5, 0.9] {
            let (lo, hi) = w.interval(a);
            assert_eq!(lo > 0.0 || hi < 0.0, w.p() <= a, "a = {a}");
        }
        assert!(DrawReading::new(&cluster(&d[..2], 3)).is_none());
    }

    #[test]
    fn draws_needed_shrinks_the_draw_part_to_the_power_bound() {
        let w = DrawReading {
            estimate: 0.01,
            spread: 0.01,
            draws: 3,
            se: 0.0,
            df: 2.0,
            prompt_var: 0.0,
        };
        let need = w.draws_needed(0.01, 0.05, 0.8).unwrap();
        // (t(0.975; R − 1) + 0.8416) / √R ≤ 1: R = 10 (t 2.262 → 0.981), R = 9 fails (2.306 → 1.049).
        assert_eq!(need, 10);
        let ok = |r: usize| {
            (super::t_quantile(0.975, (r - 1) as f64) + 0.841_621) / (r as f64).sqrt() <= 1.0
        };
        assert!(ok(need) && !ok(need - 1));
        let tight = DrawReading {
            prompt_var: 1.0,
            ..w
        };
        assert_eq!(tight.draws_needed(0.01, 0.05, 0.8), None);
        assert_eq!(w.draws_needed(0.0, 0.05, 0.8), None);
    }
}
