//! Two-phase sampling for a classifier too dear to run on every reply (the LLM judge).
//!
//! Phase one labels every reply of an arm with the cheap keyword classifiers. Phase two runs the
//! judge on every reply where those disagree (inclusion probability 1) and on each other reply
//! independently with probability `rate` (Poisson sampling, decided by a hash of the seed and
//! the reply, so a resumed or re-rendered run picks the same replies). The judge's refusal rate
//! over the arm is then the inverse-probability-weighted estimate: each judged reply weighted by
//! one over the share of its stratum that was judged, divided by the number of replies — the
//! rate the judge would give had it read every reply, in expectation over the sampling.
//!
//! Its interval generalises over prompts, as every verdict here does: a prompt is one unit
//! however many direction draws scored it (see [`estimate`]).

use super::student::incomplete_beta;
use serde::{Deserialize, Serialize};

/// One reply of an arm.
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    /// The prompt it answers (replies of one prompt under several draws share it).
    pub prompt: usize,
    /// The keyword classifiers disagree on it, so it is judged for certain.
    pub certain: bool,
    /// The judge's label (true = refusal) where it was judged.
    pub judged: Option<bool>,
}

/// Whether phase two judges the reply identified by `key`: always where `certain`, otherwise
/// with probability `rate`, reproducibly for a given `seed`.
pub fn sampled(seed: u64, key: u64, certain: bool, rate: f64) -> bool {
    if certain || rate >= 1.0 {
        return true;
    }
    let mut r = super::Rng::new(seed ^ key.wrapping_mul(0xA24B_AED4_963E_E407));
    r.uniform() < rate
}

/// The judge-based refusal rate of one arm and its 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub rate: f64,
    pub lo: f64,
    pub hi: f64,
    pub se: f64,
    /// Replies in the arm, how many the judge read, how many of them it read for certain.
    pub replies: usize,
    pub judged: usize,
    pub certain: usize,
    pub prompts: usize,
}

/// The estimate from the replies phase two judged. Every reply that [`sampled`] chose must
/// carry its label. None when there are no replies, a chosen reply has no label, or replies
/// left to sampling had none of them sampled.
///
/// The rate is the sum of two parts: the replies judged for certain, counted as they are, and
/// the others, whose judge rate is the sampled ones' (each weighted by one over the share of
/// its stratum that was judged: the realised share, which removes the variance of how many
/// Poisson sampling drew). The interval generalises over prompts and combines the two parts'
/// intervals by Zou and Donner's MOVER: the certain part's from the between-prompt variance of
/// its per-prompt sums and their covariance with the sampled part (normal); the sampled part's
/// Clopper–Pearson at its effective sample
/// size (the sampled rate's binomial variance over its between-prompt variance, so that replies
/// of one prompt under several draws are not counted as independent evidence), which keeps a
/// rare refusal among few sampled replies from getting the near-zero width a normal interval
/// would give it. Simulated on this design in the tests: at or above the nominal level,
/// conservative where few refusals are sampled.
pub fn estimate(replies: &[Reply], level: f64) -> Option<Estimate> {
    if replies.is_empty() || replies.iter().any(|r| r.certain && r.judged.is_none()) {
        return None;
    }
    let n = replies.len() as f64;
    let others = replies.iter().filter(|r| !r.certain).count();
    let sampled: Vec<bool> = replies
        .iter()
        .filter(|r| !r.certain)
        .filter_map(|r| r.judged)
        .collect();
    if others > 0 && sampled.is_empty() {
        return None;
    }
    let judged = replies.iter().filter(|r| r.judged.is_some()).count();
    let certain = replies.len() - others;
    let k = sampled.iter().filter(|x| **x).count();
    let q = if sampled.is_empty() {
        0.0
    } else {
        k as f64 / sampled.len() as f64
    };
    let w = if sampled.is_empty() {
        0.0
    } else {
        others as f64 / sampled.len() as f64
    };
    // Per prompt: the certain replies' refusals, and the sampled part's linearised share of q.
    let mut by_prompt: std::collections::BTreeMap<usize, (f64, f64)> = Default::default();
    for r in replies {
        let z = by_prompt.entry(r.prompt).or_insert((0.0, 0.0));
        let y = |x: bool| f64::from(u8::from(x));
        match (r.certain, r.judged) {
            (true, Some(x)) => z.0 += y(x),
            (false, Some(x)) => z.1 += (q + w * (y(x) - q)) / others as f64,
            (false, None) => z.1 += q / others as f64,
            (true, None) => unreachable!("checked above"),
        }
    }
    let u = by_prompt.len();
    let (d, a): (Vec<f64>, Vec<f64>) = by_prompt.into_values().unzip();
    // U/(U−1) Σ (x − x̄)²: the variance of a sum over prompts drawn with replacement.
    let var_of_sum = |x: &[f64]| {
        if u < 2 {
            return f64::NAN;
        }
        let m = x.iter().sum::<f64>() / u as f64;
        u as f64 / (u as f64 - 1.0) * x.iter().map(|v| (v - m).powi(2)).sum::<f64>()
    };
    let share = others as f64 / n;
    let certain_part = d.iter().sum::<f64>() / n;
    let rate = certain_part + share * q;
    let var_q = var_of_sum(&a);
    // The whole sum's variance holds the two parts' covariance (a prompt that is refused is
    // refused in both strata); the normal part carries it, and never less than its own variance.
    let whole: Vec<f64> = d
        .iter()
        .zip(&a)
        .map(|(x, y)| x + y * others as f64)
        .collect();
    let se = var_of_sum(&whole).sqrt() / n;
    let se_certain = (se * se - share * share * var_q)
        .max(var_of_sum(&d) / (n * n))
        .sqrt();
    if u < 2 {
        return Some(Estimate {
            rate,
            lo: 0.0,
            hi: 1.0,
            se,
            replies: replies.len(),
            judged,
            certain,
            prompts: u,
        });
    }
    let z = super::normal_quantile(1.0 - (1.0 - level) / 2.0);
    let (q_lo, q_hi) = if others == 0 {
        (0.0, 0.0)
    } else {
        let n_eff = if var_q > 0.0 && q > 0.0 && q < 1.0 {
            (q * (1.0 - q) / var_q).min(others as f64)
        } else {
            sampled.len() as f64
        };
        clopper_pearson_at(q, n_eff, level)
    };
    let (below, above) = (share * (q - q_lo), share * (q_hi - q));
    let spread = z * se_certain;
    Some(Estimate {
        rate,
        lo: (rate - below.hypot(spread)).max(0.0),
        hi: (rate + above.hypot(spread)).min(1.0),
        se,
        replies: replies.len(),
        judged,
        certain,
        prompts: u,
    })
}

/// The Clopper–Pearson interval of a proportion `p` observed on `n` trials, `n` possibly
/// fractional (the beta quantiles do not need whole counts), at level `level`.
fn clopper_pearson_at(p: f64, n: f64, level: f64) -> (f64, f64) {
    if n <= 0.0 {
        return (0.0, 1.0);
    }
    let a = (1.0 - level) / 2.0;
    let x = p * n;
    // I_θ(a, b) rises in θ; bisect for the quantile.
    let quantile = |alpha: f64, beta: f64, q: f64| {
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if incomplete_beta(alpha, beta, mid) < q {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    };
    let lo = if x <= 0.0 {
        0.0
    } else {
        quantile(x, n - x + 1.0, a)
    };
    let hi = if x >= n {
        1.0
    } else {
        quantile(x + 1.0, n - x, 1.0 - a)
    };
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Rng;

    /// A study's arm as the design runs it: `prompts` prompts, each scored under `draws`
    /// direction draws whose replies share the prompt's refusal propensity (correlated
    /// replicates); the judge's label is drawn from it, and the two keyword classifiers each
    /// agree with the judge with probability `keyword_ok` (so they disagree with each other on
    /// some replies). Returns the replies with the judge's label on those phase two picks, and
    /// the propensity's population mean (what the interval must cover).
    fn arm(
        rng: &mut Rng,
        prompts: usize,
        draws: usize,
        mean: f64,
        keyword_ok: f64,
        rate: f64,
        seed: u64,
    ) -> Vec<Reply> {
        let mut out = Vec::new();
        for p in 0..prompts {
            // A two-point mixture keeps a prompt's draws correlated: it is mostly refused or
            // mostly not, whichever direction scored it.
            let theta = if rng.uniform() < mean { 0.9 } else { 0.02 };
            for d in 0..draws {
                let judge = rng.uniform() < theta;
                let k1 = if rng.uniform() < keyword_ok {
                    judge
                } else {
                    !judge
                };
                let k2 = if rng.uniform() < keyword_ok {
                    judge
                } else {
                    !judge
                };
                let certain = k1 != k2;
                let key = (p * draws + d) as u64;
                let picked = sampled(seed, key, certain, rate);
                out.push(Reply {
                    prompt: p,
                    certain,
                    judged: picked.then_some(judge),
                });
            }
        }
        out
    }

    /// The population rate of `arm`'s judge labels: E[θ] for the two-point mixture.
    fn truth(mean: f64) -> f64 {
        mean * 0.9 + (1.0 - mean) * 0.02
    }

    #[test]
    fn the_estimate_is_unbiased_and_its_interval_covers_at_the_nominal_rate() {
        // (prompts, draws, mean, keyword accuracy, sampling rate)
        let cases = [
            (100, 1, 0.5, 0.9, 0.2),
            (300, 1, 0.1, 0.95, 0.1),
            (100, 3, 0.3, 0.85, 0.15),
            (200, 3, 0.1, 0.9, 0.05),
            (400, 3, 0.45, 0.8, 0.25),
        ];
        let sims = 2000;
        let mut rng = Rng::new(11);
        for (c, &(prompts, draws, mean, ok, rate)) in cases.iter().enumerate() {
            let want = truth(mean);
            let (mut sum, mut sum_sq, mut covered, mut judged) = (0.0, 0.0, 0usize, 0usize);
            for s in 0..sims {
                let replies = arm(
                    &mut rng,
                    prompts,
                    draws,
                    mean,
                    ok,
                    rate,
                    (c * sims + s) as u64,
                );
                let e = estimate(&replies, 0.95).unwrap();
                sum += e.rate;
                sum_sq += e.rate * e.rate;
                covered += usize::from(e.lo <= want && want <= e.hi);
                judged += e.judged;
            }
            let m = sum / sims as f64;
            let sd = (sum_sq / sims as f64 - m * m).sqrt();
            // The mean of `sims` estimates is within 4 of its standard errors of the truth.
            assert!(
                (m - want).abs() < 4.0 * sd / (sims as f64).sqrt(),
                "case {c}: mean estimate {m:.4} against {want:.4} (sd {sd:.4})"
            );
            let cov = covered as f64 / sims as f64;
            eprintln!(
                "case {c}: {prompts} prompts x {draws} draws, rate {rate}: mean {m:.4} (truth {want:.4}), coverage {cov:.3}, judged {:.0} of {}",
                judged as f64 / sims as f64,
                prompts * draws
            );
            // Binomial sd of a 95% coverage over 2,000 runs is 0.005: never below nominal by
            // more than 2 of them; Clopper–Pearson errs on the wide side where few refusals are
            // sampled.
            assert!(
                (0.94..=0.995).contains(&cov),
                "case {c}: coverage {cov:.3} (mean judged {:.0} of {})",
                judged as f64 / sims as f64,
                prompts * draws
            );
            assert!(
                judged < sims * prompts * draws,
                "phase two judged fewer than all"
            );
        }
    }

    #[test]
    fn sampling_is_reproducible_and_certain_replies_are_always_judged() {
        let picks =
            |seed| -> Vec<bool> { (0..1000).map(|k| sampled(seed, k, false, 0.2)).collect() };
        assert_eq!(picks(3), picks(3));
        assert_ne!(picks(3), picks(4));
        let share = picks(3).iter().filter(|x| **x).count() as f64 / 1000.0;
        assert!((0.16..0.24).contains(&share), "{share}");
        assert!((0..100).all(|k| sampled(9, k, true, 0.0)));
        // A certain reply without a label, or no replies at all: no estimate.
        let r = Reply {
            prompt: 0,
            certain: true,
            judged: None,
        };
        assert!(estimate(&[r], 0.95).is_none());
        assert!(estimate(&[], 0.95).is_none());
        // Judging everything gives the plain rate.
        let all: Vec<Reply> = (0..10)
            .map(|i| Reply {
                prompt: i,
                certain: false,
                judged: Some(i < 3),
            })
            .collect();
        let e = estimate(&all, 0.95).unwrap();
        assert!((e.rate - 0.3).abs() < 1e-12 && e.lo < 0.3 && e.hi > 0.3);
    }
}
