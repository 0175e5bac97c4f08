//! Calibration of the verdict machinery, by simulation (no model needed): the corrections keep
//! their error rates under true nulls, the two paired tests are valid, power under planted
//! effects is close to the analytic value, and the whole family — arms, comparisons, intervals —
//! behaves end to end. Each bound allows three Monte Carlo standard errors.

use outlierlab::direction::Handling;
use outlierlab::evaluate::compare::{arms, family, StatsSettings, Units};
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
        let fam = family(arms(&items, &st), &st, &Units::SharedByPosition);
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
    let fam = family(arms(&items, &st), &st, &Units::SharedByPosition);
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
    let fam = family(arms(&items, &st), &st, &Units::SharedByPosition);
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

/// The design a study with replicates runs: the same `prompts` harmful and harmless prompts
/// scored under `draws` direction draws, one reference and `variants` other arms. Each prompt
/// has a refusal propensity and a KL scale of its own, an effect per arm that it keeps in every
/// draw (so a prompt's differences are correlated across draws), and a prompt × draw effect
/// shared by the arms. `interaction` adds a draw × arm effect (a procedure whose result moves
/// with the draw); `shift` moves the first variant's KL, `logit_shift` its refusal propensity.
struct Design {
    prompts: usize,
    draws: usize,
    variants: usize,
    interaction: f64,
    shift: f64,
    logit_shift: f64,
    /// The spread of the prompts' KL scales (log scale): 1 is heavy-tailed like real KL; the
    /// power check uses a milder one, where the normal approximation of MDDs is meant to hold.
    kl_spread: f64,
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl Design {
    /// outcomes[arm][draw]; arm 0 is `none`.
    fn simulate(&self, rng: &mut Rng) -> Vec<Vec<Outcome>> {
        let (p, arms) = (self.prompts, self.variants + 1);
        let propensity: Vec<f64> = (0..p).map(|_| -0.5 + 2.0 * rng.normal()).collect();
        let scale: Vec<f64> = (0..p).map(|_| self.kl_spread * rng.normal()).collect();
        let arm_prompt: Vec<Vec<(f64, f64)>> = (0..arms)
            .map(|_| {
                (0..p)
                    .map(|_| (1.5 * rng.normal(), 0.5 * rng.normal()))
                    .collect()
            })
            .collect();
        let mut out = vec![Vec::new(); arms];
        for _ in 0..self.draws {
            let prompt_draw: Vec<(f64, f64)> = (0..p)
                .map(|_| (0.5 * rng.normal(), 0.3 * rng.normal()))
                .collect();
            for (a, arm) in out.iter_mut().enumerate() {
                let (h_r, h_k) = (
                    self.interaction * 8.0 * rng.normal(),
                    self.interaction * rng.normal(),
                );
                let (s_r, s_k) = if a == 1 {
                    (self.logit_shift, self.shift)
                } else {
                    (0.0, 0.0)
                };
                let refused = (0..p)
                    .map(|i| {
                        let x = propensity[i] + arm_prompt[a][i].0 + prompt_draw[i].0 + h_r + s_r;
                        rng.uniform() < sigmoid(x)
                    })
                    .collect();
                let kl = (0..p)
                    .map(|i| {
                        let x =
                            scale[i] + arm_prompt[a][i].1 + prompt_draw[i].1 + 0.3 * rng.normal();
                        0.02 * x.exp() + h_k + s_k
                    })
                    .collect();
                arm.push(outcome(refused, kl));
            }
        }
        out
    }
}

fn replicated_family<'a>(
    outs: &'a [Vec<Outcome>],
    st: &StatsSettings,
) -> outlierlab::evaluate::compare::Family<'a> {
    let mut items = Vec::new();
    for (a, per_draw) in outs.iter().enumerate() {
        let (name, hs) = if a == 0 {
            ("none".to_string(), vec![])
        } else {
            (format!("v{a}"), vec![Handling::ZeroResidualDims])
        };
        for (r, o) in per_draw.iter().enumerate() {
            items.push((name.clone(), hs.clone(), r as u64, format!("k{a}-{r}"), o));
        }
    }
    family(arms(&items, st), st, &Units::SharedByPosition)
}

/// The pooled tests this project ran before prompts were units: McNemar on the discordant
/// pairs summed over draws, sign-flip over every (prompt, draw) difference; Holm over the family.
fn pooled_family_rejects(outs: &[Vec<Outcome>], alpha: f64) -> bool {
    let mut ps = Vec::new();
    for (a, per_draw) in outs.iter().enumerate().skip(1) {
        let parts: Vec<McNemar> = per_draw
            .iter()
            .zip(&outs[0])
            .map(|(v, r)| McNemar::new(&v.refused, &r.refused))
            .collect();
        ps.push(McNemar::pooled(&parts).p());
        let d: Vec<f64> = per_draw
            .iter()
            .zip(&outs[0])
            .flat_map(|(v, r)| {
                v.kl.iter()
                    .zip(&r.kl)
                    .map(|(x, y)| x - y)
                    .collect::<Vec<_>>()
            })
            .collect();
        ps.push(SignFlip::new(&d, 1999, a as u64).p());
    }
    decide(&ps, Correction::Holm, alpha)
        .iter()
        .any(|d| d.rejected)
}

/// Under the null of the prompt-level reading (the arms exchangeable on every prompt, whatever
/// the draw), the prompt-clustered family holds Holm's family-wise error at α on the replicated
/// design; the pooled tests that counted each (prompt, draw) pair as new evidence do not — the
/// reason the prompt became the unit. Interval and verdict agree on every test.
#[test]
fn replicated_prompts_are_one_unit_each() {
    let (sims, st) = (300, StatsSettings::default());
    let design = Design {
        prompts: 60,
        draws: 3,
        variants: 3,
        interaction: 0.0,
        shift: 0.0,
        logit_shift: 0.0,
        kl_spread: 1.0,
    };
    let mut rng = Rng::new(34);
    let (mut clustered, mut pooled) = (0usize, 0usize);
    for _ in 0..sims {
        let outs = design.simulate(&mut rng);
        let fam = replicated_family(&outs, &st);
        assert_eq!(
            (fam.comparisons.len(), fam.tests, fam.draw_tests),
            (3, 6, 6)
        );
        let mut any = false;
        for c in &fam.comparisons {
            for t in [&c.refusals, &c.kl] {
                assert_eq!((t.test.as_str(), t.prompts, t.n), ("sign-flip", 60, 180));
                assert_eq!(t.lo > 0.0 || t.hi < 0.0, t.verdict.decided(), "{t:?}");
                assert_eq!(t.verdict.decided(), t.p_adjusted <= st.alpha + 1e-15);
                any |= t.verdict.decided();
            }
        }
        clustered += any as usize;
        pooled += pooled_family_rejects(&outs, st.alpha) as usize;
    }
    let (fc, fp) = (clustered as f64 / sims as f64, pooled as f64 / sims as f64);
    eprintln!(
        "replicated design, {sims} null studies: FWER prompt-clustered {fc:.3}, pooled {fp:.3}"
    );
    assert!(
        fc <= 0.05 + 3.0 * se(0.05, sims),
        "prompt-clustered FWER {fc}"
    );
    assert!(
        fp > 0.05 + 3.0 * se(0.05, sims),
        "pooled FWER {fp}: the design should break it"
    );
}

/// A procedure whose effect moves with the draw (a draw × arm interaction, no effect on
/// average): read over prompts, the family rejects far too often — the realised draws do differ
/// — while the draw-level reading holds its family-wise error at α.
#[test]
fn the_draw_level_reading_holds_under_a_draw_interaction() {
    let (sims, st) = (300, StatsSettings::default());
    let design = Design {
        prompts: 60,
        draws: 3,
        variants: 3,
        interaction: 0.01,
        shift: 0.0,
        logit_shift: 0.0,
        kl_spread: 1.0,
    };
    let mut rng = Rng::new(35);
    let (mut prompts, mut draws) = (0usize, 0usize);
    for _ in 0..sims {
        let outs = design.simulate(&mut rng);
        let fam = replicated_family(&outs, &st);
        let mut by_prompts = false;
        let mut by_draws = false;
        for c in &fam.comparisons {
            for t in [&c.refusals, &c.kl] {
                by_prompts |= t.verdict.decided();
                let w = t
                    .over_draws
                    .as_ref()
                    .expect("3 draws have a draw-level reading");
                assert_eq!(w.reading.draws, 3);
                assert_eq!(w.lo > 0.0 || w.hi < 0.0, w.verdict.decided(), "{w:?}");
                by_draws |= w.verdict.decided();
            }
        }
        prompts += by_prompts as usize;
        draws += by_draws as usize;
    }
    let (fp, fd) = (prompts as f64 / sims as f64, draws as f64 / sims as f64);
    eprintln!(
        "draw × arm interaction, {sims} studies: FWER over prompts {fp:.3}, over draws {fd:.3}"
    );
    assert!(fd <= 0.05 + 3.0 * se(0.05, sims), "draw-level FWER {fd}");
    assert!(fp > 0.05 + 3.0 * se(0.05, sims), "prompt-level FWER {fp}");
    // Not a reading that never decides: a KL effect well beyond the draw spread is found.
    let (mut found, tries) = (0usize, 100);
    let design = Design {
        shift: -0.15,
        ..design
    };
    for _ in 0..tries {
        let outs = design.simulate(&mut rng);
        let fam = replicated_family(&outs, &st);
        let w = fam.comparisons[0].kl.over_draws.as_ref().unwrap();
        found += (w.verdict == Verdict::Better) as usize;
    }
    eprintln!("draw-level power at a KL shift of -0.15: {found}/{tries}");
    assert!(
        found * 2 > tries,
        "draw-level reading found {found}/{tries}"
    );
}

/// Power of the prompt-clustered tests on the replicated design: a KL shift planted at the
/// minimum detectable difference the family computes is found ~80% of the time, and a refusal
/// shift as often as the analytic power of the mean of per-prompt differences says.
#[test]
fn clustered_power_at_the_mdd() {
    let st = StatsSettings {
        correction: Correction::None,
        ..StatsSettings::default()
    };
    let base = Design {
        prompts: 100,
        draws: 3,
        variants: 1,
        interaction: 0.0,
        shift: 0.0,
        logit_shift: 0.0,
        kl_spread: 0.3,
    };
    // The per-prompt sd of the differences, from a large null design.
    let mut rng = Rng::new(36);
    let pilot = Design {
        prompts: 20_000,
        ..base
    }
    .simulate(&mut rng);
    let fam = replicated_family(&pilot, &st);
    let c = &fam.comparisons[0];
    let kl_sd = c.kl_sd;
    let mdd = power::mean_mdd(kl_sd, 100.0, st.alpha, st.power);
    // The refusal shift's true Δ and per-prompt sd, from a large design with the shift.
    let logit_shift = -1.0;
    let pilot = Design {
        prompts: 20_000,
        logit_shift,
        ..base
    }
    .simulate(&mut rng);
    let fam = replicated_family(&pilot, &st);
    let r = &fam.comparisons[0].refusals;
    let units_sd = {
        let draws = &pilot[1];
        let n = draws[0].refused.len();
        let d: Vec<f64> = (0..n)
            .map(|i| {
                draws
                    .iter()
                    .zip(&pilot[0])
                    .map(|(v, w)| v.refused[i] as i32 as f64 - w.refused[i] as i32 as f64)
                    .sum::<f64>()
                    / 3.0
            })
            .collect();
        let m = d.iter().sum::<f64>() / n as f64;
        (d.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    };
    let z = outlierlab::stats::normal_quantile(1.0 - st.alpha / 2.0);
    let analytic = outlierlab::stats::normal_cdf(r.estimate.abs() * 10.0 / units_sd - z);
    let sims = 400;
    let (mut found_kl, mut found_r) = (0usize, 0usize);
    let design = Design {
        shift: -mdd,
        logit_shift,
        ..base
    };
    for _ in 0..sims {
        let outs = design.simulate(&mut rng);
        let fam = replicated_family(&outs, &st);
        let c = &fam.comparisons[0];
        found_kl += (c.kl.verdict.decided() && c.kl.estimate < 0.0) as usize;
        found_r += (c.refusals.verdict.decided() && c.refusals.estimate < 0.0) as usize;
    }
    let (pk, pr) = (found_kl as f64 / sims as f64, found_r as f64 / sims as f64);
    eprintln!(
        "clustered power: KL at MDD {mdd:.5} (sd {kl_sd:.4}) {pk:.3} (want 0.8); refusals at Δ {:.3} {pr:.3} (analytic {analytic:.3})",
        r.estimate
    );
    assert!((pk - 0.8).abs() <= 3.0 * se(0.8, sims), "KL power {pk}");
    assert!(
        (pr - analytic).abs() <= 3.0 * se(analytic, sims),
        "refusal power {pr} vs {analytic}"
    );
}
