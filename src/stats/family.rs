//! Multiplicity and verdicts. A family is the set of distinct hypothesis tests one table
//! decides together; each correction here says, per test, the level it was held to, so the
//! interval printed beside a verdict can be computed at that same level.

use serde::{Deserialize, Serialize};

/// How the p-values of one family are corrected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Correction {
    /// Holm's step-down: the chance of *any* false "better"/"worse" in the family stays ≤ α
    /// (family-wise error; for confirmatory studies).
    #[default]
    Holm,
    /// Benjamini–Hochberg step-up: the expected share of false ones among the
    /// "better"/"worse" stays ≤ α (false-discovery rate; for exploratory sweeps).
    Bh,
    /// Each test at α on its own.
    None,
}

impl Correction {
    pub fn parse(s: &str) -> Option<Correction> {
        match s {
            "holm" => Some(Correction::Holm),
            "bh" => Some(Correction::Bh),
            "none" => Some(Correction::None),
            _ => None,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Correction::Holm => "Holm (family-wise error rate)",
            Correction::Bh => "Benjamini–Hochberg (false-discovery rate)",
            Correction::None => "none (each test at α alone)",
        }
    }
}

/// One test's outcome under the family's correction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub p: f64,
    pub p_adjusted: f64,
    /// The level this test was compared with: rejected ⇔ p ≤ level. Its interval is printed at
    /// confidence 1 − level.
    pub level: f64,
    pub rejected: bool,
}

/// Applies `correction` at `alpha` to the family `ps`.
///
/// Levels, chosen so that rejection ⇔ p ≤ level holds for every test:
/// - Holm: step j (0-based, ascending p) has α/(m − j); the rejected tests keep their step's
///   level, the rest the level of the first step that failed (every one of them has p above it);
/// - BH: with R rejections every test has level max(R, 1)·α/m (rejected p ≤ Rα/m; the others'
///   p exceed it by the step-up rule) — the false-coverage-rate level of Benjamini & Yekutieli;
/// - none: α.
pub fn decide(ps: &[f64], correction: Correction, alpha: f64) -> Vec<Decision> {
    let m = ps.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| ps[a].total_cmp(&ps[b]).then(a.cmp(&b)));
    let mut out: Vec<Decision> = ps
        .iter()
        .map(|&p| Decision {
            p,
            p_adjusted: p,
            level: alpha,
            rejected: p <= alpha,
        })
        .collect();
    match correction {
        Correction::None => {}
        Correction::Holm => {
            let mut running: f64 = 0.0;
            let mut failed_at: Option<f64> = None;
            for (j, &i) in order.iter().enumerate() {
                let level = alpha / (m - j) as f64;
                running = running.max(((m - j) as f64 * ps[i]).min(1.0));
                let d = &mut out[i];
                d.p_adjusted = running;
                match failed_at {
                    Some(l) => {
                        d.level = l;
                        d.rejected = false;
                    }
                    None if ps[i] <= level => {
                        d.level = level;
                        d.rejected = true;
                    }
                    None => {
                        failed_at = Some(level);
                        d.level = level;
                        d.rejected = false;
                    }
                }
            }
        }
        Correction::Bh => {
            let mut r = 0usize;
            for (j, &i) in order.iter().enumerate() {
                if ps[i] <= (j + 1) as f64 * alpha / m as f64 {
                    r = j + 1;
                }
            }
            let level = r.max(1) as f64 * alpha / m as f64;
            let mut running: f64 = 1.0;
            for (j, &i) in order.iter().enumerate().rev() {
                running = running.min((ps[i] * m as f64 / (j + 1) as f64).min(1.0));
                let d = &mut out[i];
                d.p_adjusted = running;
                d.level = level;
                d.rejected = j < r;
            }
        }
    }
    out
}

/// What a comparison of a variant with a reference concludes. Lower is better for refusals
/// and KL alike. (A variant whose score *is* the reference's is not compared at all: see
/// `evaluate::compare::Identity`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Significantly lower after the family's correction, by more than the margin could hide:
    /// the adjusted interval excludes 0 and reaches past −margin.
    Better,
    Worse,
    /// Real but small: the adjusted interval excludes 0 and lies within ± the margin.
    Negligible,
    /// Not different, and the adjusted interval lies within ± the margin.
    Equivalent,
    /// Neither: the data do not separate the two, nor show them within the margin.
    CannotTell,
}

impl Verdict {
    /// From a decided test and its interval at the decision's level; `margin` ≤ 0 or not finite
    /// means none is set (no difference is then *negligible* or *equivalent*).
    pub fn from_interval(rejected: bool, lo: f64, hi: f64, margin: f64) -> Verdict {
        let inside = margin > 0.0 && margin.is_finite() && -margin <= lo && hi <= margin;
        if rejected {
            assert!(
                hi < 0.0 || lo > 0.0,
                "a rejected test's interval excludes 0 ([{lo}, {hi}])"
            );
            if inside {
                return Verdict::Negligible;
            }
            return if hi < 0.0 {
                Verdict::Better
            } else {
                Verdict::Worse
            };
        }
        if inside {
            Verdict::Equivalent
        } else {
            Verdict::CannotTell
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Verdict::Better => "better",
            Verdict::Worse => "worse",
            Verdict::Negligible => "negligible",
            Verdict::Equivalent => "equivalent",
            Verdict::CannotTell => "cannot tell",
        }
    }

    /// Every verdict, in the order reports count them.
    pub const ALL: [Verdict; 5] = [
        Verdict::Better,
        Verdict::Worse,
        Verdict::Negligible,
        Verdict::Equivalent,
        Verdict::CannotTell,
    ];

    /// Whether the test rejected (the interval excludes 0).
    pub fn decided(self) -> bool {
        matches!(self, Verdict::Better | Verdict::Worse | Verdict::Negligible)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holm_and_bh_match_r_p_adjust() {
        // R: p.adjust(c(0.01, 0.02, 0.03, 0.04, 0.05), "holm") = 0.05 0.08 0.09 0.09 0.09
        //    p.adjust(..., "BH") = 0.05 0.05 0.05 0.05 0.05
        let ps = [0.01, 0.02, 0.03, 0.04, 0.05];
        let h = decide(&ps, Correction::Holm, 0.05);
        let want = [0.05, 0.08, 0.09, 0.09, 0.09];
        for (d, w) in h.iter().zip(want) {
            assert!((d.p_adjusted - w).abs() < 1e-12, "{d:?}");
        }
        let b = decide(&ps, Correction::Bh, 0.05);
        for d in &b {
            assert!((d.p_adjusted - 0.05).abs() < 1e-12, "{d:?}");
            assert!(d.rejected);
        }
        // Holm in the original order; monotone.
        let h = decide(&[0.01, 0.04, 0.03], Correction::Holm, 0.05);
        assert!((h[0].p_adjusted - 0.03).abs() < 1e-12);
        assert!((h[2].p_adjusted - 0.06).abs() < 1e-12);
        assert!((h[1].p_adjusted - 0.06).abs() < 1e-12);
    }

    /// Rejection ⇔ p ≤ level ⇔ adjusted p ≤ α, for every correction, on random families.
    #[test]
    fn levels_agree_with_adjusted_p() {
        let mut rng = crate::stats::Rng::new(9);
        for _ in 0..2000 {
            let m = 1 + rng.below(60);
            let ps: Vec<f64> = (0..m)
                .map(|_| {
                    let u = rng.uniform();
                    if rng.below(3) == 0 {
                        u * 1e-3
                    } else {
                        u
                    }
                })
                .collect();
            for c in [Correction::Holm, Correction::Bh, Correction::None] {
                for d in decide(&ps, c, 0.05) {
                    assert_eq!(d.rejected, d.p <= d.level, "{c:?} {d:?}");
                    assert_eq!(d.rejected, d.p_adjusted <= 0.05 + 1e-15, "{c:?} {d:?}");
                }
            }
        }
    }

    #[test]
    fn verdicts() {
        assert_eq!(
            Verdict::from_interval(true, -0.2, -0.1, 0.05),
            Verdict::Better
        );
        assert_eq!(Verdict::from_interval(true, 0.1, 0.2, 0.05), Verdict::Worse);
        assert_eq!(
            Verdict::from_interval(false, -0.04, 0.03, 0.05),
            Verdict::Equivalent
        );
        assert_eq!(
            Verdict::from_interval(false, -0.1, 0.03, 0.05),
            Verdict::CannotTell
        );
        // Real but inside the margin: the example, KL −0.0007 [−0.0012, −0.0001] at ±0.01.
        assert_eq!(
            Verdict::from_interval(true, -0.0012, -0.0001, 0.01),
            Verdict::Negligible
        );
        assert_eq!(
            Verdict::from_interval(true, 0.0001, 0.0012, 0.01),
            Verdict::Negligible
        );
        // Reaching past the margin on one side is enough to be better / worse.
        assert_eq!(
            Verdict::from_interval(true, -0.02, -0.001, 0.01),
            Verdict::Better
        );
        assert_eq!(
            Verdict::from_interval(true, 0.001, 0.011, 0.01),
            Verdict::Worse
        );
        // No margin set: never negligible nor equivalent.
        assert_eq!(
            Verdict::from_interval(true, -0.0012, -0.0001, 0.0),
            Verdict::Better
        );
        assert_eq!(
            Verdict::from_interval(false, -0.001, 0.001, f64::NAN),
            Verdict::CannotTell
        );
    }
}
