//! A run against another run of the same study (the study's `compare_with:`, or `report
//! --against`): what another precision or another commit changed — detected dims, tuned
//! thresholds, refusals and the prompts whose label flipped, KL, and the verdicts. Computed here
//! into plain data; `markdown` and `sentence` render it.

use super::*;
use crate::model::Precision;
use crate::study::rundir::EvalPrompts;

/// One variant (or the unedited model) here and there, over the replicates both ran.
pub struct Side {
    pub dims: Vec<u32>,
    pub refused: usize,
    pub prompts: usize,
    pub kl: f64,
}

pub struct Row {
    pub name: String,
    pub here: Side,
    pub there: Side,
    /// Harmful prompts both runs scored whose refusal label differs, of those both scored.
    pub flipped: usize,
    pub paired: usize,
    /// The largest |KL here − KL there| over the harmless prompts both scored.
    pub kl_max_diff: f64,
}

pub struct Tuned {
    pub name: String,
    pub here: BTreeMap<String, f64>,
    pub there: BTreeMap<String, f64>,
}

/// A comparison's verdicts (refusals, KL) here and there; `identical` where the variant had
/// the reference's very score, `–` where the run did not test the pair.
pub struct Verdicts {
    pub variant: String,
    pub reference: String,
    pub here: (String, String),
    pub there: (String, String),
}

pub struct Against {
    /// The other run folder, as named.
    pub path: String,
    pub here: Precision,
    pub there: Precision,
    pub unedited: Option<Row>,
    pub rows: Vec<Row>,
    pub tuned: Vec<Tuned>,
    pub verdicts: Vec<Verdicts>,
}

/// The comparison a report carries: with `report --against DIR`, against DIR (an error if it
/// cannot be read); else against the study's `compare_with:` folder, left out with a warning
/// when that folder is not there (a report is not lost to a missing comparison).
pub fn of_run(
    r: &RunResults,
    dir: &Path,
    d: &Decided,
    overrides: &Overrides,
) -> Result<Option<Against>> {
    if let Some(dir) = &overrides.against {
        let shown = dir.display().to_string();
        return compute(r, dir, &shown, &d.stats, &d.headline).map(Some);
    }
    let Some(shown) = &d.compare_with else {
        return Ok(None);
    };
    let other = Path::new(shown);
    // The compared run itself (the f32 run of a study that compares with it) says nothing.
    if let (Ok(a), Ok(b)) = (dir.canonicalize(), other.canonicalize()) {
        if a == b {
            return Ok(None);
        }
    }
    if !crate::study::rundir::RunDir::at(other).plan().exists() {
        eprintln!(
            "warning: compare_with: {shown} is not a run folder (no plan.json) from here; the report leaves out the comparison (run from the folder the path is relative to, or fix the study's `compare_with:`)"
        );
        return Ok(None);
    }
    compute(r, other, shown, &d.stats, &d.headline).map(Some)
}

/// `here` against the run folder `there_dir`, decided with `here`'s statistics settings and
/// refusals counted by `headline` in both.
pub fn compute(
    here: &RunResults,
    there_dir: &Path,
    shown: &str,
    st: &StatsSettings,
    headline: &str,
) -> Result<Against> {
    let there = read_results(there_dir).with_context(|| {
        format!("compare_with: cannot read the run folder {shown} (a run of this study to compare with)")
    })?;
    let reps: Vec<u64> = here
        .references
        .keys()
        .filter(|k| there.references.contains_key(k))
        .copied()
        .collect();
    if reps.is_empty() {
        bail!("compare_with: {shown} has no replicate (direction draw) in common with this run; compare runs of the same study");
    }
    let (out_here, out_there) = (
        outcomes_under(here, headline),
        outcomes_under(&there, headline),
    );
    let row = |name: Option<&str>| -> Option<Row> {
        let (h, ho) = side(here, &out_here, name, &reps)?;
        let (t, to) = side(&there, &out_there, name, &reps)?;
        let (mut flipped, mut paired, mut kl_max_diff) = (0, 0, 0.0f64);
        for (rep, a) in &ho {
            let Some(b) = to.get(rep) else { continue };
            for (x, y) in pairs(here, &there, *rep, |p| &p.bad, &a.refused, &b.refused) {
                paired += 1;
                flipped += usize::from(x != y);
            }
            for (x, y) in pairs(here, &there, *rep, |p| &p.good, &a.kl, &b.kl) {
                kl_max_diff = kl_max_diff.max((x - y).abs());
            }
        }
        Some(Row {
            name: name.unwrap_or("unedited").to_string(),
            here: h,
            there: t,
            flipped,
            paired,
            kl_max_diff,
        })
    };
    let names: Vec<&str> = here
        .plan
        .variants
        .iter()
        .filter(|v| !v.variant.kl_only())
        .map(|v| v.variant.name.as_str())
        .collect();
    let rows = names.iter().filter_map(|n| row(Some(n))).collect();
    let tuned = here
        .tunes
        .iter()
        .filter(|t| reps.contains(&t.replicate))
        .filter_map(|t| {
            let o = there
                .tunes
                .iter()
                .find(|u| u.name == t.name && u.replicate == t.replicate)?;
            Some(Tuned {
                name: t.name.clone(),
                here: t.thresholds.clone(),
                there: o.thresholds.clone(),
            })
        })
        .collect();
    let (fh, ft) = (
        family_of(here, st, &out_here),
        family_of(&there, st, &out_there),
    );
    let mut verdicts = Vec::new();
    for c in &fh.comparisons {
        let (v, r) = (&fh.arms[c.variant], &fh.arms[c.reference]);
        for name in &v.names {
            verdicts.push(Verdicts {
                variant: name.clone(),
                reference: r.names[0].clone(),
                here: verdict_of(&fh, name, &r.names[0]),
                there: verdict_of(&ft, name, &r.names[0]),
            });
        }
    }
    Ok(Against {
        path: shown.to_string(),
        here: here.plan.precision,
        there: there.plan.precision,
        unedited: row(None),
        rows,
        tuned,
        verdicts,
    })
}

/// A variant's (`None`: the unedited model's) figures summed over `reps`, and its outcome per
/// replicate.
fn side<'a>(
    r: &'a RunResults,
    outs: &'a BTreeMap<(u64, String), Outcome>,
    name: Option<&str>,
    reps: &[u64],
) -> Option<(Side, BTreeMap<u64, &'a Outcome>)> {
    let mut s = Side {
        dims: Vec::new(),
        refused: 0,
        prompts: 0,
        kl: 0.0,
    };
    let mut kl = Vec::new();
    let mut got = BTreeMap::new();
    for &rep in reps {
        let o = match name {
            None => r.references.get(&rep),
            Some(n) => variant_key(r, n, rep).and_then(|(k, dims)| {
                s.dims = dims;
                outs.get(&(rep, k))
            }),
        };
        if let Some(o) = o {
            got.insert(rep, o);
            s.refused += o.refused.iter().filter(|x| **x).count();
            s.prompts += o.refused.len();
            kl.extend(o.kl.iter().copied());
        }
    }
    s.kl = kl.iter().sum::<f64>() / kl.len().max(1) as f64;
    (!got.is_empty()).then_some((s, got))
}

/// The values of the prompts both runs scored in replicate `rep`, paired by prompt text where
/// both runs recorded their prompts, else by position (runs of one study with one seed draw
/// the same prompts in the same order; a run folder moved without its prompt files has none).
fn pairs<T: Copy>(
    here: &RunResults,
    there: &RunResults,
    rep: u64,
    side: impl Fn(&EvalPrompts) -> &Vec<String>,
    a: &[T],
    b: &[T],
) -> Vec<(T, T)> {
    match (here.prompts.get(&rep), there.prompts.get(&rep)) {
        (Some(pa), Some(pb)) => {
            let there: BTreeMap<&str, T> = side(pb)
                .iter()
                .map(String::as_str)
                .zip(b.iter().copied())
                .collect();
            side(pa)
                .iter()
                .zip(a)
                .filter_map(|(p, x)| there.get(p.as_str()).map(|y| (*x, *y)))
                .collect()
        }
        _ => a.iter().copied().zip(b.iter().copied()).collect(),
    }
}

/// The score key and dims a variant (by name) was assigned in a replicate.
fn variant_key(r: &RunResults, name: &str, rep: u64) -> Option<(String, Vec<u32>)> {
    let pv = r.plan.variants.iter().find(|v| v.variant.name == name)?;
    r.assignments
        .iter()
        .find(|a| a.variant_id == pv.id && a.replicate == rep)
        .map(|a| (a.key.clone(), a.dims.clone()))
}

/// `variant` against `reference` in a family: the two verdicts, `identical` when the variant
/// shares the reference's score, `–` when the family has no such comparison.
fn verdict_of(f: &Family, variant: &str, reference: &str) -> (String, String) {
    if f.identical
        .iter()
        .any(|i| i.variant == variant && i.reference == reference)
    {
        return ("identical".into(), "identical".into());
    }
    let found = f.comparisons.iter().find(|c| {
        f.arms[c.variant].names.iter().any(|n| n == variant)
            && f.arms[c.reference].names.iter().any(|n| n == reference)
    });
    match found {
        Some(c) => (
            c.refusals.verdict.label().to_string(),
            c.kl.verdict.label().to_string(),
        ),
        None => ("–".into(), "–".into()),
    }
}

impl Against {
    fn what(&self) -> String {
        if self.here == self.there {
            format!("the run in `{}` (also {})", self.path, self.here.name())
        } else {
            format!("the {} run in `{}`", self.there.name(), self.path)
        }
    }

    fn changed_dims(&self) -> Vec<&Row> {
        self.rows
            .iter()
            .filter(|r| r.here.dims != r.there.dims)
            .collect()
    }

    fn changed_verdicts(&self) -> usize {
        self.verdicts.iter().filter(|v| v.here != v.there).count()
    }

    /// One sentence: what changed, for the summary README quotes.
    pub fn sentence(&self) -> String {
        let flips: usize = self.rows.iter().map(|r| r.flipped).sum();
        let paired: usize = self.rows.iter().map(|r| r.paired).sum();
        let kl = self.rows.iter().map(|r| r.kl_max_diff).fold(0.0, f64::max);
        let dims = self.changed_dims();
        format!(
            "Against {}: detected dims {}; {} of {} harmful replies' refusal labels differ over the variants{}; per-prompt KL differs by at most {:.4}; {} of {} verdicts differ.",
            self.what(),
            if dims.is_empty() {
                format!("the same in all {} variants", self.rows.len())
            } else {
                format!(
                    "differ in {} of {} variants ({})",
                    dims.len(),
                    self.rows.len(),
                    dims.iter()
                        .map(|r| format!("`{}`", r.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            flips,
            paired,
            self.unedited
                .as_ref()
                .map(|u| format!(" ({} of {} for the unedited model)", u.flipped, u.paired))
                .unwrap_or_default(),
            kl,
            self.changed_verdicts(),
            self.verdicts.len()
        )
    }

    /// The section: the sentence, then per variant both runs' figures side by side.
    pub fn markdown(&self, md: &mut String) -> Result<()> {
        let (h, t) = (self.here.name(), self.there.name());
        let (h, t) = if h == t {
            ("here".to_string(), "there".to_string())
        } else {
            (h.to_string(), t.to_string())
        };
        writeln!(md, "## Against {}\n", self.what())?;
        writeln!(
            md,
            "The same study's results, compared prompt by prompt (by the prompt's text where both runs recorded their prompts, else by position). {}\n",
            self.sentence()
        )?;
        writeln!(
            md,
            "| variant | detected dims ({h} / {t}) | refusals ({h} / {t}) | labels that differ | mean KL ({h} / {t}) | largest per-prompt KL difference |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|")?;
        for r in self.unedited.iter().chain(&self.rows) {
            let dims = if r.name == "unedited" {
                "–".to_string()
            } else if r.here.dims == r.there.dims {
                format!("{} (same)", dims_cell(&r.here.dims))
            } else {
                format!(
                    "**{}** / {}",
                    dims_cell(&r.here.dims),
                    dims_cell(&r.there.dims)
                )
            };
            let refusals = format!(
                "{}{}/{} / {}/{}",
                if r.here.refused != r.there.refused {
                    "changed: "
                } else {
                    ""
                },
                r.here.refused,
                r.here.prompts,
                r.there.refused,
                r.there.prompts
            );
            writeln!(
                md,
                "| {} | {dims} | {refusals} | {} of {} | {:.4} / {:.4} | {:.4} |",
                r.name, r.flipped, r.paired, r.here.kl, r.there.kl, r.kl_max_diff
            )?;
        }
        writeln!(md)?;
        if !self.tuned.is_empty() {
            writeln!(md, "Tuned thresholds ({h} / {t}):\n")?;
            for x in &self.tuned {
                let keys: Vec<String> = x
                    .here
                    .iter()
                    .map(|(k, v)| {
                        let o = x.there.get(k).map_or("–".into(), |o| format!("{o:.1}"));
                        format!("{k} {v:.1} / {o}")
                    })
                    .collect();
                writeln!(md, "- `{}`: {}", x.name, keys.join("; "))?;
            }
            writeln!(md)?;
        }
        if !self.verdicts.is_empty() {
            writeln!(
                md,
                "Verdicts (refusals; KL), both runs decided with this study's statistics:\n"
            )?;
            writeln!(md, "| variant | reference | {h} | {t} |")?;
            writeln!(md, "|---|---|---|---|")?;
            for v in &self.verdicts {
                let mark = if v.here != v.there { " (changed)" } else { "" };
                writeln!(
                    md,
                    "| {} | {} | {}; {} | {}; {}{mark} |",
                    v.variant, v.reference, v.here.0, v.here.1, v.there.0, v.there.1
                )?;
            }
            writeln!(md)?;
        }
        Ok(())
    }
}
