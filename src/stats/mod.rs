//! The statistics that decide whether a difference is real.
//!
//! - [`wilson`]: a rate with its 95% interval (descriptive, per variant);
//! - [`paired`]: the two paired tests a comparison runs — exact McNemar for refusals, a sign-flip
//!   permutation test for per-prompt continuous metrics such as KL — each with the confidence
//!   interval that *inverts the same test*, so a printed interval and its verdict cannot disagree;
//! - [`family`]: multiplicity (Holm, Benjamini–Hochberg or none) over the distinct comparisons of a
//!   table, the per-test level each correction applies, and the verdicts (better, worse,
//!   equivalent within a margin, cannot tell);
//! - [`clustered`]: the same prompts under several direction draws — one unit per prompt, and
//!   the draw-level reading that treats the draws as a random factor ([`student`]'s t);
//! - [`power`]: minimum detectable differences and the prompts a difference would need;
//! - [`two_phase`]: a judge's refusal rate from the replies it read by design, not all of them;
//! - a seeded generator and a descriptive paired bootstrap.

pub mod clustered;
pub mod family;
pub mod paired;
pub mod power;
pub mod student;
pub mod two_phase;

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
pub(crate) fn ln_choose(n: usize, k: usize) -> f64 {
    ln_gamma1(n) - ln_gamma1(k) - ln_gamma1(n - k)
}

/// ln n!: a table up to 4096 (built once), Stirling's series above (relative error < 1e-15).
fn ln_gamma1(n: usize) -> f64 {
    static TABLE: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut v = vec![0.0f64; 4097];
        for i in 2..v.len() {
            v[i] = v[i - 1] + (i as f64).ln();
        }
        v
    });
    if let Some(x) = t.get(n) {
        return *x;
    }
    let x = n as f64 + 1.0;
    (x - 0.5) * x.ln() - x + 0.5 * (2.0 * std::f64::consts::PI).ln() + 1.0 / (12.0 * x)
        - 1.0 / (360.0 * x.powi(3))
        + 1.0 / (1260.0 * x.powi(5))
}

/// Standard normal CDF.
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

fn erfc(x: f64) -> f64 {
    // The Maclaurin series of erf cancels badly past ~2.5, where the continued fraction converges
    // fast; together they hold ~1e-14, ample for quantiles and power.
    let ax = x.abs();
    let r = if ax < 2.5 {
        // erf by its Maclaurin series.
        let mut sum = ax;
        let mut term = ax;
        let x2 = ax * ax;
        let mut k = 0.0;
        loop {
            k += 1.0;
            term *= -x2 / k;
            let add = term / (2.0 * k + 1.0);
            sum += add;
            if add.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        1.0 - 2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // Continued fraction (Lentz) for erfc.
        let mut f;
        let tiny = 1e-300;
        let b0 = ax;
        f = b0;
        let mut c = b0;
        let mut d = 0.0;
        for i in 1..300 {
            let a = i as f64 / 2.0;
            let b = ax;
            d = b + a * d;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + a / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        (-ax * ax).exp() / f / std::f64::consts::PI.sqrt()
    };
    if x < 0.0 {
        2.0 - r
    } else {
        r
    }
}

/// Standard normal quantile: Acklam's rational approximation polished by two Newton steps.
pub fn normal_quantile(p: f64) -> f64 {
    assert!(
        p > 0.0 && p < 1.0,
        "normal_quantile needs 0 < p < 1, got {p}"
    );
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let pl = 0.02425;
    let mut x = if p < pl {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - pl {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    for _ in 0..2 {
        let e = normal_cdf(x) - p;
        let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        x -= e / pdf;
    }
    x
}

/// A difference of means with its paired-bootstrap 95% interval and two-sided p-value
/// (descriptive: per-variant intervals; verdicts come from [`paired`]).
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
    fn bootstrap_sees_a_real_shift_and_no_shift() {
        let a: Vec<f64> = (0..100).map(|i| 0.5 + (i % 7) as f64 * 0.01).collect();
        let b: Vec<f64> = a.iter().map(|x| x - 0.2).collect();
        let d = paired_bootstrap(&a, &b, 2000, 1);
        assert!((d.estimate - 0.2).abs() < 1e-9 && d.lo > 0.19 && d.p < 0.01);
        let same = paired_bootstrap(&a, &a, 2000, 1);
        assert_eq!((same.estimate, same.p), (0.0, 1.0));
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
    fn normal_quantile_and_cdf_match_tables() {
        // Published values: z(0.975) = 1.959964, z(0.8) = 0.841621, z(0.999) = 3.090232.
        assert!((normal_quantile(0.975) - 1.959_963_985).abs() < 1e-7);
        assert!((normal_quantile(0.8) - 0.841_621_234).abs() < 1e-7);
        assert!((normal_quantile(0.999) - 3.090_232_306).abs() < 1e-7);
        assert!((normal_quantile(0.025) + 1.959_963_985).abs() < 1e-7);
        assert!((normal_cdf(1.959_963_985) - 0.975).abs() < 1e-9);
        assert!((normal_cdf(-1.0) - 0.158_655_254).abs() < 1e-9);
    }
}
