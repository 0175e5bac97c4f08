//! Power: the smallest difference a comparison could have detected, and how many prompts a
//! difference would need. Normal approximations — Connor (1987) for McNemar's test, the
//! one-sample z form for the mean of paired differences — checked against simulations of the
//! exact tests in `tests/calibration.rs`.

use super::{normal_cdf, normal_quantile};

/// Power of the two-sided McNemar test at level `a` for a rate difference `delta`, discordance
/// `pi` (share of prompts where the arms disagree) and `n` pairs.
pub fn mcnemar_power(delta: f64, pi: f64, n: f64, a: f64) -> f64 {
    let delta = delta.abs();
    if delta <= 0.0 || pi <= 0.0 || delta > pi {
        return 0.0;
    }
    let za = normal_quantile(1.0 - a / 2.0);
    let var = (pi - delta * delta).max(1e-300);
    normal_cdf((delta * n.sqrt() - za * pi.sqrt()) / var.sqrt())
}

/// Pairs needed for McNemar's test to detect `delta` with `power` at level `a`, given
/// discordance `pi`. None when the difference cannot exist at that discordance (|Δ| > π).
pub fn mcnemar_prompts_needed(delta: f64, pi: f64, a: f64, power: f64) -> Option<f64> {
    let delta = delta.abs();
    if delta <= 0.0 || pi <= 0.0 || delta > pi {
        return None;
    }
    let za = normal_quantile(1.0 - a / 2.0);
    let zb = normal_quantile(power);
    let root = za * pi.sqrt() + zb * (pi - delta * delta).max(0.0).sqrt();
    Some((root / delta).powi(2))
}

/// The smallest |Δ| McNemar's test detects with `power` at level `a` with `n` pairs and
/// discordance `pi`; None when even Δ = π (every discordant pair one way) falls short.
pub fn mcnemar_mdd(pi: f64, n: f64, a: f64, power: f64) -> Option<f64> {
    if pi <= 0.0 || mcnemar_power(pi, pi, n, a) < power {
        return None;
    }
    let (mut lo, mut hi) = (0.0, pi);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if mcnemar_power(mid, pi, n, a) < power {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(hi)
}

/// The smallest |mean difference| detectable with `power` at level `a` from `n` paired
/// differences of standard deviation `sd`.
pub fn mean_mdd(sd: f64, n: f64, a: f64, power: f64) -> f64 {
    (normal_quantile(1.0 - a / 2.0) + normal_quantile(power)) * sd / n.sqrt()
}

/// Pairs needed to detect a mean difference `delta` with `power` at level `a`.
pub fn mean_prompts_needed(delta: f64, sd: f64, a: f64, power: f64) -> Option<f64> {
    if delta == 0.0 || sd <= 0.0 {
        return None;
    }
    let z = normal_quantile(1.0 - a / 2.0) + normal_quantile(power);
    Some((z * sd / delta.abs()).powi(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mdd_and_prompts_needed_invert_each_other() {
        let (pi, n, a) = (0.3, 100.0, 0.05);
        let mdd = mcnemar_mdd(pi, n, a, 0.8).unwrap();
        let back = mcnemar_prompts_needed(mdd, pi, a, 0.8).unwrap();
        assert!((back - n).abs() < 1e-6 * n, "{back}");
        let m = mean_mdd(0.05, 100.0, 0.05, 0.8);
        // (1.96 + 0.8416) · 0.05 / 10 = 0.014008
        assert!((m - 0.014_008).abs() < 1e-5, "{m}");
        let back = mean_prompts_needed(m, 0.05, 0.05, 0.8).unwrap();
        assert!((back - 100.0).abs() < 1e-6);
        // Connor's formula, worked by hand: π = 0.3, Δ = 0.1, α = 0.05, 80% → n = 233.09.
        let n = mcnemar_prompts_needed(0.1, 0.3, 0.05, 0.8).unwrap();
        assert!((n - 233.09).abs() < 0.05, "{n}");
        assert!(mcnemar_mdd(0.01, 100.0, 0.05, 0.8).is_none());
    }
}
