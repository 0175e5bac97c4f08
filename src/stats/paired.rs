//! Paired tests of two arms on the same prompts, each with the confidence interval that inverts
//! it. "Inverts" is the point: the interval at level `a` holds exactly the differences the test
//! would not reject at `a`, so "0 lies outside the interval" and "p ≤ a" are one statement and a
//! printed interval can never contradict the verdict beside it.

use super::{ln_choose, Rng};

/// P(X ≤ k) for X ~ Binomial(n, θ).
fn binom_cdf(k: usize, n: usize, theta: f64) -> f64 {
    if k >= n {
        return 1.0;
    }
    if theta <= 0.0 {
        return 1.0;
    }
    if theta >= 1.0 {
        return 0.0;
    }
    let (lt, l1t) = (theta.ln(), (1.0 - theta).ln());
    (0..=k)
        .map(|i| (ln_choose(n, i) + i as f64 * lt + (n - i) as f64 * l1t).exp())
        .sum::<f64>()
        .min(1.0)
}

/// P(X ≥ k) for X ~ Binomial(n, θ).
fn binom_sf(k: usize, n: usize, theta: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    1.0 - binom_cdf(k - 1, n, theta).min(1.0)
}

/// The θ in [lo, hi] where the monotone `f` crosses `target` (`f` increasing when `rising`).
/// The answer always lies strictly inside (lo, hi) when the bracket is open, which keeps the
/// side of ½ that the caller decided.
fn bisect(mut lo: f64, mut hi: f64, target: f64, rising: bool, f: impl Fn(f64) -> f64) -> f64 {
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        let below = if rising {
            f(mid) < target
        } else {
            f(mid) > target
        };
        if below {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Clopper–Pearson interval for a binomial proportion k/n at level `a` (two-sided, a/2 each
/// tail).
pub fn clopper_pearson(k: usize, n: usize, a: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let lo = if k == 0 {
        0.0
    } else {
        bisect(0.0, 1.0, a / 2.0, true, |t| binom_sf(k, n, t))
    };
    let hi = if k == n {
        1.0
    } else {
        bisect(0.0, 1.0, a / 2.0, false, |t| binom_cdf(k, n, t))
    };
    (lo, hi)
}

/// Exact McNemar test on paired binary outcomes (1 = refused): `b` prompts only the variant
/// refused, `c` only the reference, `n` pairs in all.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct McNemar {
    pub b: usize,
    pub c: usize,
    pub n: usize,
}

impl McNemar {
    pub fn new(variant: &[bool], reference: &[bool]) -> McNemar {
        assert_eq!(
            variant.len(),
            reference.len(),
            "paired outcomes must cover the same prompts"
        );
        let b = variant
            .iter()
            .zip(reference)
            .filter(|(v, r)| **v && !**r)
            .count();
        let c = variant
            .iter()
            .zip(reference)
            .filter(|(v, r)| !**v && **r)
            .count();
        McNemar {
            b,
            c,
            n: variant.len(),
        }
    }

    /// Strata (replicates) pooled: for matched pairs the Mantel–Haenszel statistic reduces to
    /// McNemar's on the summed discordant counts, and the exact conditional test is the same
    /// binomial on them.
    pub fn pooled(parts: &[McNemar]) -> McNemar {
        parts
            .iter()
            .fold(McNemar { b: 0, c: 0, n: 0 }, |a, x| McNemar {
                b: a.b + x.b,
                c: a.c + x.c,
                n: a.n + x.n,
            })
    }

    /// Difference in rates, variant − reference.
    pub fn estimate(&self) -> f64 {
        (self.b as f64 - self.c as f64) / self.n.max(1) as f64
    }

    pub fn discordance(&self) -> f64 {
        (self.b + self.c) as f64 / self.n.max(1) as f64
    }

    /// P(X ≤ min(b, c)) under X ~ Binomial(b + c, ½): the one tail both the p-value and the
    /// interval's side are read from.
    fn small_tail(&self) -> f64 {
        let d = self.b + self.c;
        if d == 0 {
            return 1.0;
        }
        binom_cdf(self.b.min(self.c), d, 0.5)
    }

    /// Two-sided exact p = min(1, 2 · P(X ≤ min(b, c))).
    pub fn p(&self) -> f64 {
        (2.0 * self.small_tail()).min(1.0)
    }

    /// Interval for the rate difference at level `a`: the Clopper–Pearson interval of
    /// θ = P(variant refused | the two disagree) — the exact inversion of this test — mapped to
    /// the difference Δ = π(2θ − 1), with the discordance rate π bounded by its own
    /// Clopper–Pearson interval at the same level (so the magnitude allows for how often the
    /// arms disagree at all; joint coverage ≥ 1 − 2a). 0 lies outside exactly when p ≤ a.
    pub fn interval(&self, a: f64) -> (f64, f64) {
        let d = self.b + self.c;
        if d == 0 {
            let (_, pu) = clopper_pearson(0, self.n, a);
            return (-pu, pu);
        }
        let rejected = self.p() <= a;
        let (b, c) = (self.b, self.c);
        // θ's bounds, each bisected on the side of ½ that the test decided.
        let lo_theta = if b == 0 {
            0.0
        } else if rejected && b > c {
            bisect(0.5, 1.0, a / 2.0, true, |t| binom_sf(b, d, t))
        } else {
            bisect(0.0, 0.5, a / 2.0, true, |t| binom_sf(b, d, t))
        };
        let hi_theta = if b == d {
            1.0
        } else if rejected && b < c {
            bisect(0.0, 0.5, a / 2.0, false, |t| binom_cdf(b, d, t))
        } else {
            bisect(0.5, 1.0, a / 2.0, false, |t| binom_cdf(b, d, t))
        };
        let (pl, pu) = clopper_pearson(d, self.n, a);
        let edge = |theta: f64| {
            let s = 2.0 * theta - 1.0;
            (pl * s, pu * s)
        };
        let (l_small, l_big) = edge(lo_theta);
        let (h_small, h_big) = edge(hi_theta);
        let lo = if lo_theta >= 0.5 { l_small } else { l_big };
        let hi = if hi_theta >= 0.5 { h_big } else { h_small };
        (lo, hi)
    }
}

/// Sign-flip permutation test of the mean of paired differences d = variant − reference (H0:
/// the two arms are exchangeable on every prompt, so each d is as likely to be −d), Monte Carlo
/// with `reps` random sign vectors: p = (k + 1)/(reps + 1), k = the flips with |Σ s·d| ≥ |Σ d|.
///
/// The interval inverts the same test with the same sign vectors under a shift model
/// (d − δ symmetric): for every flip r the set of shifts δ it counts against is an interval
/// around the estimate (the flipped sum moves at most as fast as the observed one), so the
/// accepted set is an interval too and its ends are order statistics of per-flip crossing points.
#[derive(Debug, Clone)]
pub struct SignFlip {
    pub n: usize,
    pub estimate: f64,
    /// Standard deviation of the differences (for power).
    pub sd: f64,
    pub reps: usize,
    /// Per flip: how far above (below) the estimate a shift still counts, sorted descending.
    up: Vec<f64>,
    down: Vec<f64>,
}

impl SignFlip {
    pub fn new(d: &[f64], reps: usize, seed: u64) -> SignFlip {
        let n = d.len();
        let nf = n as f64;
        let s: f64 = d.iter().sum();
        let estimate = if n == 0 { 0.0 } else { s / nf };
        let sd = if n < 2 {
            0.0
        } else {
            (d.iter().map(|x| (x - estimate).powi(2)).sum::<f64>() / (nf - 1.0)).sqrt()
        };
        let mut rng = Rng::new(seed);
        let words = n.div_ceil(64);
        let mut up = Vec::with_capacity(reps);
        let mut down = Vec::with_capacity(reps);
        let mut bits = vec![0u64; words];
        for _ in 0..reps {
            for w in bits.iter_mut() {
                *w = rng.next_u64();
            }
            // Σ s·d = 2 Σ_{s=+1} d − Σ d, Σ s = 2·#(+1) − n.
            let mut plus = 0.0;
            let mut count = 0usize;
            for (i, x) in d.iter().enumerate() {
                if bits[i / 64] >> (i % 64) & 1 == 1 {
                    plus += x;
                    count += 1;
                }
            }
            let a = 2.0 * plus - s;
            let b = (2 * count) as f64 - nf;
            let c = a - estimate * b;
            up.push(crossing(c, b, nf));
            down.push(crossing(c, -b, nf));
        }
        up.sort_by(|x, y| y.total_cmp(x));
        down.sort_by(|x, y| y.total_cmp(x));
        SignFlip {
            n,
            estimate,
            sd,
            reps,
            up,
            down,
        }
    }

    /// Flips counting against the shift δ (at δ = estimate every flip counts).
    fn count_at(&self, delta: f64) -> usize {
        let (v, x) = if delta >= self.estimate {
            (&self.up, delta - self.estimate)
        } else {
            (&self.down, self.estimate - delta)
        };
        // v is sorted descending: count the entries ≥ x.
        v.partition_point(|u| *u >= x)
    }

    fn p_at(&self, delta: f64) -> f64 {
        (self.count_at(delta) + 1) as f64 / (self.reps + 1) as f64
    }

    /// The p-value of H0: no difference. When every difference is zero the arms are
    /// indistinguishable and p = 1.
    pub fn p(&self) -> f64 {
        if self.n == 0 {
            return 1.0;
        }
        self.p_at(0.0)
    }

    /// The smallest p this test can show.
    pub fn p_floor(&self) -> f64 {
        1.0 / (self.reps + 1) as f64
    }

    /// The shifts δ whose test has p > a, as [lo, hi].
    pub fn interval(&self, a: f64) -> (f64, f64) {
        if self.n == 0 {
            return (0.0, 0.0);
        }
        // Accept δ when count(δ) ≥ need, the smallest count with (count + 1)/(reps + 1) > a.
        let mut need = 0usize;
        while need <= self.reps && (need + 1) as f64 / (self.reps + 1) as f64 <= a {
            need += 1;
        }
        if need == 0 {
            return (f64::NEG_INFINITY, f64::INFINITY);
        }
        let mut lo = self.estimate - self.down[need - 1];
        let mut hi = self.estimate + self.up[need - 1];
        // Float rounding of estimate ± crossing can land on 0 when the crossing equals
        // |estimate| to the last bit; the count decides, as it does for p.
        if self.p() <= a {
            if self.estimate < 0.0 && hi >= 0.0 {
                hi = -f64::MIN_POSITIVE;
            }
            if self.estimate > 0.0 && lo <= 0.0 {
                lo = f64::MIN_POSITIVE;
            }
        } else {
            lo = lo.min(0.0);
            hi = hi.max(0.0);
        }
        (lo, hi)
    }
}

/// How far above the estimate a shift u ≥ 0 keeps |c − u·b| ≥ n·u (the flipped sum still at
/// least as far from zero as the observed one): for |b| < n the positive root of
/// c² − 2cbu − (n² − b²)u² = 0.
fn crossing(c: f64, b: f64, n: f64) -> f64 {
    if b.abs() >= n {
        // All signs equal: the flipped sum is ± the observed one at every shift, so it always
        // counts (c is 0 up to rounding, which must not decide).
        return f64::INFINITY;
    }
    if c >= 0.0 {
        c / (n + b)
    } else {
        -c / (n - b)
    }
}

/// Monte Carlo resamples for a family of `m` tests at level `alpha`: the smallest attainable p,
/// 1/(R + 1), is at most α/(20m), so Holm's or Bonferroni's strictest level is reachable with room.
pub fn reps_for(m: usize, alpha: f64) -> usize {
    let need = (20.0 * m.max(1) as f64 / alpha).ceil() as usize;
    need.max(9_999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcnemar_published_values() {
        let t = |b, c| McNemar { b, c, n: 100 }.p();
        assert!((t(6, 0) - 0.03125).abs() < 1e-12);
        assert!((t(0, 6) - 0.03125).abs() < 1e-12);
        assert_eq!(t(0, 0), 1.0);
        assert_eq!(t(3, 3), 1.0);
        // 3 vs 6 discordant: p = 0.5078125 (binom.test(3, 9)).
        assert!((t(3, 6) - 0.507_812_5).abs() < 1e-9);
    }

    #[test]
    fn clopper_pearson_published_values() {
        // R: binom.test(7, 20)$conf.int = 0.1539092 0.5921885.
        let (lo, hi) = clopper_pearson(7, 20, 0.05);
        assert!((lo - 0.153_909_2).abs() < 1e-6, "{lo}");
        assert!((hi - 0.592_188_5).abs() < 1e-6, "{hi}");
        // 0 of 100: upper bound 1 − 0.025^(1/100) = 0.0362167.
        let (lo, hi) = clopper_pearson(0, 100, 0.05);
        assert_eq!(lo, 0.0);
        assert!((hi - (1.0 - 0.025f64.powf(0.01))).abs() < 1e-9);
    }

    /// The interval and the test are one procedure: over many tables and levels, 0 lies outside
    /// the interval exactly when p ≤ a, and the estimate lies inside.
    #[test]
    fn mcnemar_interval_agrees_with_test() {
        let mut rng = Rng::new(3);
        for _ in 0..1500 {
            let n = 20 + rng.below(300);
            let b = rng.below(n / 3 + 1);
            let c = rng.below(n / 3 + 1);
            let a = [0.05, 0.01, 0.05 / 68.0, 0.2, 0.05 / 300.0][rng.below(5)];
            let t = McNemar { b, c, n };
            let (lo, hi) = t.interval(a);
            let rejected = t.p() <= a;
            assert_eq!(rejected, lo > 0.0 || hi < 0.0, "{t:?} a={a} [{lo}, {hi}]");
            assert!(
                lo <= t.estimate() && t.estimate() <= hi,
                "{t:?} [{lo}, {hi}]"
            );
        }
    }

    #[test]
    fn signflip_interval_agrees_with_test() {
        let mut rng = Rng::new(11);
        for case in 0..400 {
            let n = 5 + rng.below(150);
            let shift = rng.normal() * 0.3;
            let mut d: Vec<f64> = (0..n).map(|_| rng.normal() + shift).collect();
            if case % 7 == 0 {
                // Many exact ties (two arms identical on most prompts).
                for x in d.iter_mut().skip(3) {
                    *x = 0.0;
                }
            }
            let t = SignFlip::new(&d, 999, case);
            for a in [0.05, 0.01, 0.2, 0.002] {
                let (lo, hi) = t.interval(a);
                let rejected = t.p() <= a;
                assert_eq!(rejected, lo > 0.0 || hi < 0.0, "case {case} a={a}");
                assert!(lo <= t.estimate && t.estimate <= hi);
            }
            // Brute force: the interval's ends are where the test at that shift turns.
            let a = 0.05;
            let (lo, hi) = t.interval(a);
            let p_shift = |delta: f64| {
                let s: f64 = d.iter().map(|x| x - delta).sum();
                let mut r2 = Rng::new(case);
                let words = n.div_ceil(64);
                let mut k = 0;
                let mut bits = vec![0u64; words];
                for _ in 0..999 {
                    for w in bits.iter_mut() {
                        *w = r2.next_u64();
                    }
                    let t: f64 = d
                        .iter()
                        .enumerate()
                        .map(|(i, x)| {
                            let s = if bits[i / 64] >> (i % 64) & 1 == 1 {
                                1.0
                            } else {
                                -1.0
                            };
                            s * (x - delta)
                        })
                        .sum();
                    if t.abs() >= s.abs() - 1e-12 * (1.0 + s.abs()) {
                        k += 1;
                    }
                }
                (k + 1) as f64 / 1000.0
            };
            if hi.is_finite() && lo.is_finite() && hi > lo {
                let w = hi - lo;
                assert!(p_shift(hi - 1e-6 * w) > a, "case {case}: just inside hi");
                assert!(p_shift(hi + 1e-3 * w) <= a, "case {case}: just outside hi");
                assert!(p_shift(lo + 1e-6 * w) > a, "case {case}: just inside lo");
                assert!(
                    p_shift(lo - 1e-3 * w) <= a,
                    "case {case}: just outside lo: n {n} est {} lo {lo} hi {hi} p(lo-) {} p(lo) {} p(lo+) {} down {:?}",
                    t.estimate,
                    p_shift(lo - 1e-3 * w),
                    p_shift(lo),
                    p_shift(lo + 1e-6 * w),
                    &t.down[..60]
                );
            }
        }
    }

    #[test]
    fn signflip_resolution_reaches_the_family_level() {
        // The smallest attainable p is below α/m for m = 300 at α = 0.05.
        let reps = reps_for(300, 0.05);
        assert!(1.0 / (reps + 1) as f64 <= 0.05 / 300.0 / 20.0);
        // And a large effect reaches it.
        let d: Vec<f64> = (0..100).map(|i| 1.0 + (i % 5) as f64 * 0.1).collect();
        let t = SignFlip::new(&d, reps, 1);
        assert_eq!(t.p(), t.p_floor());
        assert!(t.p() < 0.05 / 300.0);
    }

    #[test]
    fn identical_arms_are_not_different() {
        let d = vec![0.0; 100];
        let t = SignFlip::new(&d, 999, 1);
        assert_eq!(t.p(), 1.0);
        assert_eq!(t.interval(0.05), (0.0, 0.0));
        let m = McNemar::new(&[true, false, true], &[true, false, true]);
        assert_eq!(m.p(), 1.0);
        let (lo, hi) = m.interval(0.05);
        assert!(lo < 0.0 && hi > 0.0, "3 pairs cannot rule out a difference");
    }
}
