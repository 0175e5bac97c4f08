//! Student's t distribution (CDF and quantile), for the draw-level reading, whose units are the
//! direction draws: few of them, so the normal approximation would understate the interval.

/// ln Γ(x) for x > 0 (Lanczos, g = 7, nine terms; relative error ~1e-15).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection keeps the series in its accurate range.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The continued fraction of the regularised incomplete beta function (modified Lentz).
fn beta_fraction(a: f64, b: f64, x: f64) -> f64 {
    let tiny = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < tiny {
        d = tiny;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..10_000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        for aa in [
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ] {
            d = 1.0 + aa * d;
            if d.abs() < tiny {
                d = tiny;
            }
            c = 1.0 + aa / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            h *= d * c;
        }
        if (d * c - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// I_x(a, b), the regularised incomplete beta function.
pub(crate) fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    // The fraction converges fast on the side of the mean; the other side by symmetry.
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_fraction(b, a, 1.0 - x) / b
    }
}

/// P(T ≤ t) for T ~ t(df), df > 0 (not necessarily whole).
pub fn t_cdf(t: f64, df: f64) -> f64 {
    if t.is_infinite() {
        return if t > 0.0 { 1.0 } else { 0.0 };
    }
    let tail = 0.5 * incomplete_beta(0.5 * df, 0.5, df / (df + t * t));
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// Two-sided p-value of |T| ≥ |t|.
pub fn t_two_sided(t: f64, df: f64) -> f64 {
    if t.is_infinite() {
        return 0.0;
    }
    incomplete_beta(0.5 * df, 0.5, df / (df + t * t)).min(1.0)
}

/// The q-quantile of t(df), 0 < q < 1.
pub fn t_quantile(q: f64, df: f64) -> f64 {
    assert!(q > 0.0 && q < 1.0, "t_quantile needs 0 < q < 1, got {q}");
    if q < 0.5 {
        return -t_quantile(1.0 - q, df);
    }
    // Bracket, then bisect: the CDF is monotone and cheap next to what calls it.
    let mut hi = 1.0f64;
    while t_cdf(hi, df) < q {
        hi *= 2.0;
        if hi > 1e12 {
            return f64::INFINITY;
        }
    }
    let mut lo = 0.0f64;
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if t_cdf(mid, df) < q {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_matches_published_tables() {
        // Tables of Student's t: t(0.975; 1) = 12.7062, (2) 4.30265, (10) 2.22814, (30) 2.04227;
        // t(0.995; 4) = 4.60409. R: pt(2, 5) = 0.9490303; pt(-1.5, 2.5) = 0.1235...
        for (q, df, want) in [
            (0.975, 1.0, 12.706_204_736),
            (0.975, 2.0, 4.302_652_730),
            (0.975, 10.0, 2.228_138_852),
            (0.975, 30.0, 2.042_272_456),
            (0.995, 4.0, 4.604_094_871),
        ] {
            let got = t_quantile(q, df);
            assert!(
                (got - want).abs() < 1e-6 * want,
                "t({q}; {df}) = {got}, want {want}"
            );
        }
        assert!((t_cdf(2.0, 5.0) - 0.949_030_3).abs() < 1e-7);
        assert!((t_two_sided(2.0, 5.0) - 2.0 * (1.0 - 0.949_030_3)).abs() < 2e-7);
        // df = 1 is Cauchy: P(T ≤ 1) = 3/4.
        assert!((t_cdf(1.0, 1.0) - 0.75).abs() < 1e-12);
        assert!((t_cdf(-1.0, 1.0) - 0.25).abs() < 1e-12);
        // Large df tends to the normal.
        assert!((t_quantile(0.975, 1e7) - 1.959_964).abs() < 1e-5);
        // ln Γ at half-integers and integers.
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-13);
        assert!((ln_gamma(10.0) - 362_880f64.ln()).abs() < 1e-12);
    }
}
