//! How numbers are written in tables: rates, bounds, p-values, levels, verdict counts.

use super::*;

pub(super) fn pct(r: &Rate) -> String {
    format!(
        "{}/{} ({:.0}%, {:.0}–{:.0}%)",
        r.k,
        r.n,
        100.0 * r.rate,
        100.0 * r.lo,
        100.0 * r.hi
    )
}

/// A signed bound with enough digits that it never prints as a zero of the wrong side.
pub(super) fn bound(x: f64, scale: f64, decimals: usize) -> String {
    if x.is_infinite() {
        return if x > 0.0 {
            "+∞".into()
        } else {
            "-∞".into()
        };
    }
    // Means of per-prompt means can leave a zero difference as ±1e-17.
    let v = if (x * scale).abs() < 1e-12 {
        0.0
    } else {
        x * scale
    };
    let mut d = decimals;
    while d < 8
        && v != 0.0
        && format!("{:.*}", d, v.abs())
            .trim_matches(['0', '.'])
            .is_empty()
    {
        d += 1;
    }
    format!("{v:+.d$}")
}

pub(super) fn p_cell(t: &MetricTest) -> String {
    if t.p_adjusted < 1e-3 {
        format!("{:.1e}", t.p_adjusted)
    } else {
        format!("{:.3}", t.p_adjusted)
    }
}

pub(super) fn level_cell(level: f64) -> String {
    let c = 100.0 * (1.0 - level);
    if c >= 99.95 {
        format!("{:.3}%", c)
    } else {
        format!("{c:.1}%")
    }
}

pub(super) fn count(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.0}k", x / 1e3)
    } else {
        format!("{:.0}", x.ceil())
    }
}

/// For *cannot tell*: what this comparison could have detected, and what the observed
/// difference would need.
pub(super) fn power_cell(t: &MetricTest, scale: f64, unit: &str, decimals: usize) -> String {
    if t.verdict != Verdict::CannotTell {
        return String::new();
    }
    let mdd = match t.mdd {
        Some(m) => format!("{:.*}{unit}", decimals, m * scale),
        None if t.discordance == Some(0.0) => "undefined (no prompt differs)".into(),
        None => format!(
            "none: only {:.0}% of prompts differ, too few for the study's power",
            100.0 * t.discordance.unwrap_or(0.0)
        ),
    };
    let need = match t.prompts_needed {
        Some(n) => format!(
            "; {} prompts for the observed {}",
            count(n),
            bound(t.estimate, scale, decimals)
        ),
        None if t.estimate == 0.0 => "; no difference observed".into(),
        None => String::new(),
    };
    format!("MDD {mdd}{need}")
}

/// Difference [adjusted interval] | adjusted p | CI level | verdict.
pub(super) fn metric_cells(t: &MetricTest, scale: f64, decimals: usize) -> String {
    format!(
        "{} [{}, {}] | {} | {} | **{}**",
        bound(t.estimate, scale, decimals),
        bound(t.lo, scale, decimals),
        bound(t.hi, scale, decimals),
        p_cell(t),
        level_cell(t.level),
        t.verdict.label()
    )
}

pub(super) fn escape_cell(s: &str) -> String {
    s.replace('|', "\\|")
}

pub(super) fn dims_cell(d: &[u32]) -> String {
    if d.is_empty() {
        "–".into()
    } else {
        crate::util::dims_summary(d)
    }
}

pub(super) fn clip(s: &str, n: usize) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let t = crate::util::trunc(&one_line, n);
    t.replace('|', "\\|")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub(super) fn short(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub(super) fn fmt_params(p: &BTreeMap<String, f64>) -> String {
    p.iter()
        .map(|(k, v)| format!("{k} = {}", short(*v)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Verdict counts over the family's tests, in `Verdict::ALL`'s order.
pub fn verdict_counts_of(verdicts: impl Iterator<Item = Verdict>) -> String {
    let mut c: BTreeMap<Verdict, usize> = BTreeMap::new();
    for v in verdicts {
        *c.entry(v).or_default() += 1;
    }
    Verdict::ALL
        .iter()
        .map(|k| format!("{} {}", c.get(k).copied().unwrap_or(0), k.label()))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn verdict_counts(f: &Family) -> String {
    verdict_counts_of(
        f.comparisons
            .iter()
            .flat_map(|x| [x.refusals.verdict, x.kl.verdict]),
    )
}

pub(super) fn draw_counts(f: &Family) -> Option<String> {
    (f.draw_tests > 0).then(|| {
        verdict_counts_of(
            f.comparisons
                .iter()
                .flat_map(|x| [&x.refusals.over_draws, &x.kl.over_draws])
                .flatten()
                .map(|w| w.verdict),
        )
    })
}

/// The metric's scale, unit and decimals as reports print them.
pub const REFUSAL_FMT: (f64, &str, usize) = (100.0, " pts", 1);

pub const KL_FMT: (f64, &str, usize) = (1.0, "", 4);

/// The over-draws cells: per-draw estimates; [adjusted CI] verdict (draws needed).
pub(super) fn draw_cells(t: &MetricTest, (scale, _, d): (f64, &str, usize)) -> String {
    let per = t
        .per_replicate
        .iter()
        .map(|x| bound(*x, scale, d))
        .collect::<Vec<_>>()
        .join(", ");
    match &t.over_draws {
        None => format!("{per} | – | –"),
        Some(w) => format!(
            "{per} (sd {}) | [{}, {}] **{}** | {}",
            format_args!("{:.*}", d, w.reading.spread * scale),
            bound(w.lo, scale, d),
            bound(w.hi, scale, d),
            w.verdict.label(),
            match w.draws_needed {
                _ if w.verdict != Verdict::CannotTell => "–".into(),
                Some(n) => n.to_string(),
                None if w.estimate_is_zero() => "– (no difference)".into(),
                None => "– (more prompts first)".into(),
            }
        ),
    }
}
