//! Calibration of the verdict machinery, by simulation (no model needed): the corrections keep
//! their error rates under true nulls, the two paired tests are valid, power under planted
//! effects is close to the analytic value, and the whole family — arms, comparisons, intervals —
//! behaves end to end. Each bound allows three Monte Carlo standard errors.

use outlierlab::direction::Handling;
use outlierlab::evaluate::compare::{arms, family, StatsSettings};
use outlierlab::evaluate::Outcome;
use outlierlab::stats::family::{decide, Correction, Verdict};
use outlierlab::stats::paired::{McNemar, SignFlip};
use outlierlab::stats::power;
use outlierlab::stats::Rng;

fn se(p: f64, n: usize) -> f64 {
    (p * (1.0 - p) / n as f64).sqrt()
}

/// Holm's family-wise error and BH's false-discovery rate, on uniform null p-values with
/// independent and with strongly correlated tests, and a mix of nulls and real effects.
#[test]
fn corrections_keep_their_error_rates() {
    let (alpha, sims, m) = (0.05, 20_000, 20);
    let mut rng = Rng::new(1);
    let (mut fwer_holm, mut fwer_holm_corr, mut fwer_none) = (0usize, 0usize, 0usize);
    let (mut fdr_bh, mut power_bh, mut power_holm) = (0.0f64, 0.0f64, 0.0f64);
    for _ in 0..sims {
        // All null, independent.
        let ps: Vec<f64> = (0..m).map(|_| rng.uniform()).collect();
        if decide(&ps, Correction::Holm, alpha)
            .iter()
            .any(|d| d.rejected)
        {
            fwer_holm += 1;
        }
        if decide(&ps, Correction::None, alpha)
            .iter()
            .any(|d| d.rejected)
        {
            fwer_none += 1;
        }
        // All null, equicorrelated (ρ = 0.8) z statistics, as comparisons that share a reference.
        let shared = rng.normal();
        let ps: Vec<f64> = (0..m)
            .map(|_| {
                let z = 0.8f64.sqrt() * shared + 0.2f64.sqrt() * rng.normal();
                2.0 * (1.0 - outlierlab::stats::normal_cdf(z.abs()))
            })
            .collect();
        if decide(&ps, Correction::Holm, alpha)
            .iter()
            .any(|d| d.rejected)
        {
            fwer_holm_corr += 1;
        }
        // Half null, half a real effect (z shifted by 3.5).
        let ps: Vec<f64> = (0..m)
            .map(|i| {
                let z = rng.normal() + if i < m / 2 { 0.0 } else { 3.5 };
                2.0 * (1.0 - outlierlab::stats::normal_cdf(z.abs()))
            })
            .collect();
        let bh = decide(&ps, Correction::Bh, alpha);
        let rejected = bh.iter().filter(|d| d.rejected).count();
        let false_ = bh.iter().take(m / 2).filter(|d| d.rejected).count();
        fdr_bh += false_ as f64 / rejected.max(1) as f64;
        power_bh += bh.iter().skip(m / 2).filter(|d| d.rejected).count() as f64 / (m / 2) as f64;
        let holm = decide(&ps, Correction::Holm, alpha);
        power_holm +=
            holm.iter().skip(m / 2).filter(|d| d.rejected).count() as f64 / (m / 2) as f64;
    }
    let f = |k: usize| k as f64 / sims as f64;
    let (holm, holm_corr, none) = (f(fwer_holm), f(fwer_holm_corr), f(fwer_none));
    let (fdr, pbh, pholm) = (
        fdr_bh / sims as f64,
        power_bh / sims as f64,
        power_holm / sims as f64,
    );
    eprintln!(
        "FWER: Holm {holm:.4} (independent), {holm_corr:.4} (ρ = 0.8), uncorrected {none:.4}; \
         BH FDR {fdr:.4} (bound α·m0/m = 0.025), power BH {pbh:.3} vs Holm {pholm:.3}"
    );
    assert!(holm <= alpha + 3.0 * se(alpha, sims), "Holm FWER {holm}");
    assert!(
        holm_corr <= alpha + 3.0 * se(alpha, sims),
        "Holm FWER, correlated {holm_corr}"
    );
    // Without correction, 20 independent tests make a false verdict likely: 1 − 0.95^20 = 0.64.
    assert!((none - 0.6415).abs() < 3.0 * se(0.6415, sims), "{none}");
    assert!(fdr <= 0.025 + 3.0 * se(0.05, sims), "BH FDR {fdr}");
    assert!(pbh > pholm, "BH should find more real effects than Holm");
}

/// Under exchangeable arms the two paired tests reject at most α of the time, at α and at a
/// family's level.
#[test]
fn paired_tests_are_valid_under_the_null() {
    let sims = 4000;
    let mut rng = Rng::new(2);
    let (mut mc05, mut mc01, mut sf05, mut sf01) = (0, 0, 0, 0);
    for s in 0..sims {
        let n = 100;
        // Refusals: prompt-specific rates, arms drawn independently from the same rate.
        let rates: Vec<f64> = (0..n).map(|_| rng.uniform()).collect();
        let a: Vec<bool> = rates.iter().map(|p| rng.uniform() < *p).collect();
        let b: Vec<bool> = rates.iter().map(|p| rng.uniform() < *p).collect();
        let p = McNemar::new(&a, &b).p();
        mc05 += (p <= 0.05) as usize;
        mc01 += (p <= 0.01) as usize;
        // KL: skewed per-prompt values (log-normal, prompt-specific scale), same law per arm.
        let d: Vec<f64> = (0..n)
            .map(|_| {
                let scale = (rng.normal() * 0.7).exp() * 0.05;
                scale * ((rng.normal()).exp() - (rng.normal()).exp())
            })
            .collect();
        let p = SignFlip::new(&d, 999, s as u64).p();
        sf05 += (p <= 0.05) as usize;
        sf01 += (p <= 0.01) as usize;
    }
    let f = |k: usize| k as f64 / sims as f64;
    eprintln!(
        "null rejection: McNemar {:.4} at 0.05, {:.4} at 0.01; sign-flip {:.4} at 0.05, {:.4} at 0.01",
        f(mc05),
        f(mc01),
        f(sf05),
        f(sf01)
    );
    assert!(f(mc05) <= 0.05 + 3.0 * se(0.05, sims));
    assert!(f(mc01) <= 0.01 + 3.0 * se(0.01, sims));
    assert!(f(sf05) <= 0.05 + 3.0 * se(0.05, sims));
    assert!(f(sf01) <= 0.01 + 3.0 * se(0.01, sims));
    // Not absurdly conservative either: the sign-flip test is exact, so near α.
    assert!(f(sf05) >= 0.05 - 3.0 * se(0.05, sims), "{}", f(sf05));
}

/// At the minimum detectable difference the simulated power of each test is close to the
/// analytic 80%.
#[test]
fn power_matches_the_analytic_value() {
    let (sims, power_target) = (3000, 0.8);
    let mut rng = Rng::new(3);
    // McNemar: n = 200 pairs, discordance 30%.
    let (n, pi, a) = (200usize, 0.3, 0.05);
    let delta = power::mcnemar_mdd(pi, n as f64, a, power_target).unwrap();
    let (p_up, p_down) = ((pi + delta) / 2.0, (pi - delta) / 2.0);
    let mut hits = 0;
    for _ in 0..sims {
        let (mut b, mut c) = (0, 0);
        for _ in 0..n {
            let u = rng.uniform();
            if u < p_up {
                b += 1;
            } else if u < p_up + p_down {
                c += 1;
            }
        }
        hits += (McNemar { b, c, n }.p() <= a) as usize;
    }
    let mc_power = hits as f64 / sims as f64;
    // KL: n = 100 differences, sd 0.05, shifted by the MDD.
    let (n, sd) = (100usize, 0.05);
    let shift = power::mean_mdd(sd, n as f64, a, power_target);
    let mut hits = 0;
    for s in 0..sims {
        let d: Vec<f64> = (0..n).map(|_| shift + sd * rng.normal()).collect();
        hits += (SignFlip::new(&d, 999, 1000 + s as u64).p() <= a) as usize;
    }
    let sf_power = hits as f64 / sims as f64;
    eprintln!(
        "power at the MDD: McNemar {mc_power:.3} (Δ = {:.1} pts at π = 0.3, n = 200), \
         sign-flip {sf_power:.3} (Δ = {shift:.4} at sd 0.05, n = 100); analytic 0.800",
        100.0 * delta
    );
    // The exact McNemar test is a little conservative against Connor's normal approximation.
    assert!((mc_power - power_target).abs() < 0.05, "McNemar {mc_power}");
    assert!(
        (sf_power - power_target).abs() < 0.04,
        "sign-flip {sf_power}"
    );
}

fn outcome(refused: Vec<bool>, kl: Vec<f64>) -> Outcome {
    Outcome {
        refused,
        replies: vec![],
        reply_tokens: vec![],
        kl,
        over_refused: vec![],
        seconds: 0.0,
        ..Default::default()
    }
}

/// End to end through arms and families, as a report builds them: one reference, ten variants
/// of which two share a score and one *is* the reference's score; every variant exchangeable
/// with the reference. The family has 9 distinct comparisons, the shared-score variants one
/// comparison, the reference's twin none; Holm's family-wise error stays at α; every interval
/// agrees with its verdict.
#[test]
fn study_families_under_the_null() {
    let sims = 300;
    let st = StatsSettings::default();
    let mut rng = Rng::new(4);
    let mut any_false = 0usize;
    for s in 0..sims {
        let n = 60;
        let rates: Vec<f64> = (0..n).map(|_| rng.uniform()).collect();
        let scales: Vec<f64> = (0..n).map(|_| (rng.normal()).exp() * 0.02).collect();
        let draw = |rng: &mut Rng| {
            outcome(
                rates.iter().map(|p| rng.uniform() < *p).collect(),
                scales.iter().map(|sc| sc * rng.normal().exp()).collect(),
            )
        };
        let outs: Vec<Outcome> = (0..9).map(|_| draw(&mut rng)).collect();
        let none = draw(&mut rng);
        let mut items: Vec<(String, Vec<Handling>, u64, String, &Outcome)> = vec![(
            "none".to_string(),
            vec![],
            0u64,
            "k-none".to_string(),
            &none,
        )];
        // The reference's twin: a detector that found nothing, so the same score key.
        items.push(("pr154".into(), vec![], 0, "k-none".into(), &none));
        for (i, o) in outs.iter().enumerate() {
            items.push((format!("v{i}"), vec![], 0, format!("k{i}"), o));
        }
        // v8's twin shares its score.
        items.push(("v8-twin".into(), vec![], 0, "k8".into(), &outs[8]));
        let hs = |name: &str| {
            if name == "none" || name == "pr154" {
                vec![]
            } else {
                vec![outlierlab::direction::Handling::ZeroResidualDims]
            }
        };
        let items: Vec<_> = items
            .into_iter()
            .map(|(n, _, r, k, o)| {
                let h = hs(&n);
                (n, h, r, k, o)
            })
            .collect();
        let fam = family(arms(&items, &st), &st);
        assert_eq!(fam.comparisons.len(), 9, "sim {s}");
        assert_eq!(fam.tests, 18);
        assert_eq!(fam.identical.len(), 1);
        assert_eq!(fam.identical[0].variant, "pr154");
        assert!(fam
            .arms
            .iter()
            .any(|a| a.names == vec!["v8".to_string(), "v8-twin".to_string()]));
        let mut false_here = false;
        for c in &fam.comparisons {
            for t in [&c.refusals, &c.kl] {
                let excludes = t.lo > 0.0 || t.hi < 0.0;
                let decided = matches!(t.verdict, Verdict::Better | Verdict::Worse);
                assert_eq!(excludes, decided, "interval and verdict disagree: {t:?}");
                assert_eq!(decided, t.p_adjusted <= st.alpha + 1e-15, "{t:?}");
                false_here |= decided;
            }
        }
        any_false += false_here as usize;
    }
    let fwer = any_false as f64 / sims as f64;
    eprintln!("end-to-end family-wise error over {sims} null studies: {fwer:.3}");
    assert!(fwer <= 0.05 + 3.0 * se(0.05, sims), "{fwer}");
}

/// A/A: a variant that shares the reference's score is identical, never tested; two arms with
/// equal outcomes but different scores are not different, and equivalent within the margins.
#[test]
fn a_a_comparisons() {
    let st = StatsSettings::default();
    let o = outcome(
        (0..100).map(|i| i % 3 == 0).collect(),
        (0..100).map(|i| 0.01 * (i % 7) as f64).collect(),
    );
    let items = vec![
        ("none".to_string(), vec![], 0u64, "a".to_string(), &o),
        ("same".to_string(), vec![], 0u64, "a".to_string(), &o),
    ];
    let fam = family(arms(&items, &st), &st);
    assert!(fam.comparisons.is_empty());
    assert_eq!(fam.identical.len(), 1);
    let items = vec![
        ("none".to_string(), vec![], 0u64, "a".to_string(), &o),
        (
            "copy".to_string(),
            vec![outlierlab::direction::Handling::ZeroResidualDims],
            0u64,
            "b".to_string(),
            &o,
        ),
    ];
    let fam = family(arms(&items, &st), &st);
    assert_eq!(fam.comparisons.len(), 1);
    let c = &fam.comparisons[0];
    assert_eq!(c.refusals.p, 1.0);
    assert_eq!(c.kl.p, 1.0);
    assert_eq!(c.kl.verdict, Verdict::Equivalent);
    // With 100 prompts and no discordant pair, the refusal bound is ±3.7 points: within ±5.
    assert_eq!(c.refusals.verdict, Verdict::Equivalent, "{:?}", c.refusals);
}

/// The family's KL test has the resolution a 300-test family needs.
#[test]
fn kl_resolution_for_300_tests() {
    let reps = outlierlab::stats::paired::reps_for(300, 0.05);
    assert!(1.0 / (reps as f64 + 1.0) < 0.05 / 300.0);
}
