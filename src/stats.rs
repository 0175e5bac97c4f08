//! The statistics that decide whether a difference is real: Wilson intervals for rates, exact
//! McNemar tests for paired refusal outcomes, paired bootstrap intervals for KL differences, and
//! Holm's correction over the comparisons of one table.

use serde::{Deserialize, Serialize};

/// A small, seedable generator (SplitMix64): every random choice in outlierlab derives from a
/// seed written to the results, so a run can be reproduced exactly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// A proportion with its 95% Wilson score interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub k: usize,
    pub n: usize,
    pub rate: f64,
    pub lo: f64,
    pub hi: f64,
}

const Z95: f64 = 1.959_963_984_540_054;

pub fn wilson(k: usize, n: usize) -> Rate {
    if n == 0 {
        return Rate {
            k,
            n,
            rate: f64::NAN,
            lo: 0.0,
            hi: 1.0,
        };
    }
    let (kf, nf) = (k as f64, n as f64);
    let p = kf / nf;
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / nf;
    let centre = (p + z2 / (2.0 * nf)) / denom;
    let half = Z95 * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt() / denom;
    // At k = 0 (k = n) the lower (upper) bound is exactly 0 (1); rounding would leave 1e-18.
    let lo = if k == 0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let hi = if k == n {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    Rate {
        k,
        n,
        rate: p,
        lo,
        hi,
    }
}

/// ln C(n, k).
fn ln_choose(n: usize, k: usize) -> f64 {
    ln_factorial(n) - ln_factorial(k) - ln_factorial(n - k)
}

fn ln_factorial(n: usize) -> f64 {
    (1..=n).map(|i| (i as f64).ln()).sum()
}

/// Exact two-sided McNemar test on the discordant pairs: `b` prompts where only A refused, `c`
/// where only B refused. p = min(1, 2 · P(X ≤ min(b, c))) with X ~ Binomial(b + c, ½).
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let m = b.min(c);
    let tail: f64 = (0..=m)
        .map(|i| (ln_choose(n, i) - n as f64 * std::f64::consts::LN_2).exp())
        .sum();
    (2.0 * tail).min(1.0)
}

/// A difference of means with its paired-bootstrap 95% interval and two-sided p-value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Difference {
    pub estimate: f64,
    pub lo: f64,
    pub hi: f64,
    pub p: f64,
}

/// Paired bootstrap of mean(a − b): prompts are resampled with replacement, `reps` times.
pub fn paired_bootstrap(a: &[f64], b: &[f64], reps: usize, seed: u64) -> Difference {
    assert_eq!(a.len(), b.len(), "paired samples must have the same length");
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let n = d.len();
    if n == 0 {
        return Difference {
            estimate: 0.0,
            lo: 0.0,
            hi: 0.0,
            p: 1.0,
        };
    }
    let estimate = d.iter().sum::<f64>() / n as f64;
    if d.iter().all(|x| *x == 0.0) {
        return Difference {
            estimate: 0.0,
            lo: 0.0,
            hi: 0.0,
            p: 1.0,
        };
    }
    let mut rng = Rng::new(seed);
    let mut means: Vec<f64> = (0..reps)
        .map(|_| (0..n).map(|_| d[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let q = |p: f64| quantile_sorted(&means, p);
    let below = means.iter().filter(|m| **m <= 0.0).count() as f64 / reps as f64;
    let above = means.iter().filter(|m| **m >= 0.0).count() as f64 / reps as f64;
    // The smallest p a bootstrap of this size can show is 1/reps; never report 0.
    let p = (2.0 * below.min(above)).clamp(1.0 / reps as f64, 1.0);
    Difference {
        estimate,
        lo: q(0.025),
        hi: q(0.975),
        p,
    }
}

/// Quantile with linear interpolation between order statistics (as `torch.quantile` and numpy's
/// default): position q·(n − 1).
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// Holm's step-down adjustment: adjusted p-values in the original order.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut adj = vec![0.0; m];
    let mut running: f64 = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        let v = ((m - rank) as f64 * p[i]).min(1.0);
        running = running.max(v);
        adj[i] = running;
    }
    adj
}

/// What a comparison of a variant against a reference concludes. Lower is better for refusals
/// and KL alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Better,
    Worse,
    CannotTell,
}

impl Verdict {
    /// `diff` is variant − reference; significant when the (adjusted) p is below `alpha`.
    pub fn from(diff: f64, p_adjusted: f64, alpha: f64) -> Verdict {
        if p_adjusted < alpha && diff < 0.0 {
            Verdict::Better
        } else if p_adjusted < alpha && diff > 0.0 {
            Verdict::Worse
        } else {
            Verdict::CannotTell
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Verdict::Better => "better",
            Verdict::Worse => "worse",
            Verdict::CannotTell => "cannot tell",
        }
    }
}

/// Refusal outcomes of two variants on the same prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairedRates {
    /// Prompts only the variant refused, and only the reference refused.
    pub only_variant: usize,
    pub only_reference: usize,
    pub diff: f64,
    pub p: f64,
}

pub fn paired_rates(variant: &[bool], reference: &[bool]) -> PairedRates {
    assert_eq!(
        variant.len(),
        reference.len(),
        "paired outcomes must cover the same prompts"
    );
    let only_variant = variant
        .iter()
        .zip(reference)
        .filter(|(v, r)| **v && !**r)
        .count();
    let only_reference = variant
        .iter()
        .zip(reference)
        .filter(|(v, r)| !**v && **r)
        .count();
    let n = variant.len().max(1) as f64;
    PairedRates {
        only_variant,
        only_reference,
        diff: (only_variant as f64 - only_reference as f64) / n,
        p: mcnemar_exact(only_variant, only_reference),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_3_of_100() {
        let r = wilson(3, 100);
        assert!((r.lo - 0.0103).abs() < 5e-4, "{r:?}");
        assert!((r.hi - 0.0845).abs() < 5e-4, "{r:?}");
        let zero = wilson(0, 100);
        assert_eq!(zero.lo, 0.0);
        assert!((zero.hi - 0.037).abs() < 1e-3);
        let all = wilson(100, 100);
        assert_eq!(all.hi, 1.0);
    }

    #[test]
    fn mcnemar_6_to_0() {
        assert!((mcnemar_exact(6, 0) - 0.03125).abs() < 1e-12);
        assert!((mcnemar_exact(0, 6) - 0.03125).abs() < 1e-12);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert_eq!(mcnemar_exact(3, 3), 1.0);
        // 3 vs 6 refusals on 100 prompts, all discordant: p = 0.51, noise.
        assert!((mcnemar_exact(3, 6) - 0.5078125).abs() < 1e-9);
    }

    #[test]
    fn holm_adjusts_in_order() {
        let adj = holm(&[0.01, 0.04, 0.03]);
        assert!((adj[0] - 0.03).abs() < 1e-12);
        assert!((adj[2] - 0.06).abs() < 1e-12);
        assert!(
            (adj[1] - 0.06).abs() < 1e-12,
            "monotone: never below a smaller p's adjustment"
        );
    }

    #[test]
    fn bootstrap_sees_a_real_shift_and_no_shift() {
        let a: Vec<f64> = (0..100).map(|i| 0.5 + (i % 7) as f64 * 0.01).collect();
        let b: Vec<f64> = a.iter().map(|x| x - 0.2).collect();
        let d = paired_bootstrap(&a, &b, 2000, 1);
        assert!((d.estimate - 0.2).abs() < 1e-9 && d.lo > 0.19 && d.p < 0.01);
        let same = paired_bootstrap(&a, &a, 2000, 1);
        assert_eq!((same.estimate, same.p), (0.0, 1.0));
        // Pure noise around zero: the interval covers 0.
        let mut rng = Rng::new(5);
        let x: Vec<f64> = (0..100).map(|_| rng.normal()).collect();
        let y: Vec<f64> = (0..100).map(|_| rng.normal()).collect();
        let n = paired_bootstrap(&x, &y, 2000, 2);
        assert!(n.lo < 0.0 && n.hi > 0.0, "{n:?}");
    }

    #[test]
    fn quantile_interpolates_like_torch() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile_sorted(&v, 0.5), 2.5);
        assert!((quantile_sorted(&v, 0.95) - 3.85).abs() < 1e-12);
        assert_eq!(quantile_sorted(&v, 1.0), 4.0);
    }

    #[test]
    fn verdicts() {
        assert_eq!(Verdict::from(-0.1, 0.01, 0.05), Verdict::Better);
        assert_eq!(Verdict::from(0.1, 0.01, 0.05), Verdict::Worse);
        assert_eq!(Verdict::from(-0.1, 0.2, 0.05), Verdict::CannotTell);
    }
}
