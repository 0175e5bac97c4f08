//! Stage 7: the report, rendered from a run directory alone (no model): Markdown tables that read
//! well pasted into a pull-request comment, every rate with its interval and every comparison
//! with its test and corrected verdict; figures as PNG and SVG; the same content as a
//! self-contained HTML page with the images beside it.
//!
//! The numbers are computed first (`data`: rows, settings, families; `answer`: the answer and the
//! forest's rows; the criteria's importance and the classifiers' agreement in their sections),
//! then each section renders them (`sections`, `verdicts`, `criteria`, `classifiers`,
//! `validation`), with the cell formats in `cells`; `summary` prints what README and a pull
//! request quote.

mod against;
pub mod answer;
mod cells;
mod classifiers;
mod criteria;
mod data;
mod html;
pub mod plots;
mod sections;
mod summary;
pub mod validation;
mod verdicts;

pub use cells::*;
use classifiers::*;
use criteria::*;
pub use data::*;
pub use html::*;
use sections::*;
pub use summary::*;
use verdicts::*;

use crate::evaluate::compare::{self, Family, MetricTest, StatsSettings};
use crate::evaluate::Outcome;
use crate::stats::family::{Correction, Verdict};
use crate::stats::{self, Rate};
use crate::study::rundir::{read_results, RunResults};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Renders `report.md` for the run in `dir` into `out`; returns its path.
pub fn render(dir: &Path, out: &Path) -> Result<PathBuf> {
    render_with(dir, out, &Overrides::default())
}

/// As [`render`], with the study's α or correction overridden.
pub fn render_with(dir: &Path, out: &Path, overrides: &Overrides) -> Result<PathBuf> {
    render_compared(dir, out, overrides, None)
}

/// As [`render_with`]; a detection validation also says how its labels agree with those of the
/// validation in `other` (the same study in another precision).
pub fn render_compared(
    dir: &Path,
    out: &Path,
    overrides: &Overrides,
    other: Option<&Path>,
) -> Result<PathBuf> {
    let validation = crate::study::rundir::read_validation(dir)?;
    let agreement = match (other, &validation) {
        (Some(o), Some(v)) => {
            let there = crate::study::rundir::read_validation(o)?.with_context(|| {
                format!(
                    "{} has no detection validation (validation/validation.json) to compare labels with",
                    o.display()
                )
            })?;
            Some(crate::detect::validate::LabelAgreement::of(v, &there))
        }
        (Some(_), None) => bail!(
            "--compare-labels: {} has no detection validation; it compares two validations' labels",
            dir.display()
        ),
        _ => None,
    };
    if let Some(v) = &validation {
        if crate::study::rundir::RunDir::at(dir)
            .read_plan()?
            .variants
            .is_empty()
        {
            return validation_report(dir, out, v, agreement.as_ref());
        }
    }
    let r = read_results(dir)?;
    let decided = settings(dir, overrides)?;
    let against = against::of_run(&r, dir, &decided, overrides)?;
    let Decided {
        stats: st,
        headline,
        study,
        ..
    } = decided;
    let name = run_name(dir, &study);
    let rows = rows(&r);
    let headline_outs = outcomes_under(&r, &headline);
    let fam = family_of(&r, &st, &headline_outs);
    let mut md = String::new();
    writeln!(md, "# {name}\n")?;
    header(&mut md, dir, &r, &fam, &st)?;
    writeln!(md, "{}\n", setup_line(&r))?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    answer_section(&mut md, out, &fam, &st)?;
    replicate_tables(&mut md, &r, &rows, &fam)?;
    verdict_section(&mut md, &fam, r.references.len())?;
    null_section(&mut md, &r, &fam)?;
    if let Some(a) = &against {
        a.markdown(&mut md)?;
    }
    if headline != "heretic" {
        writeln!(
            md,
            "The verdicts above count refusals by `{headline}` (the study's `evaluation.headline`).\n"
        )?;
    }
    classifier_section(&mut md, &r, &st, &headline)?;
    let points = pooled_points(&r);
    detected_dims_section(&mut md, &r)?;
    criteria_section(&mut md, &r)?;
    tuning_section(&mut md, &r, &rows)?;
    search_section(&mut md, &r)?;
    let tunes: Vec<&crate::study::rundir::TuneResult> = r.tunes.iter().collect();
    let mut figures = plots::draw_all(out, &points, r.detections.values().next(), &tunes)?;
    if let Some(v) = &validation {
        md.push_str(&validation::markdown(v, 2));
        figures.extend(plots::draw_validation(out, v, "validation_")?);
    }
    if !figures.is_empty() {
        writeln!(md, "## Figures\n")?;
        if r.detections.len() > 1 {
            writeln!(
                md,
                "Detection figures show replicate {}.\n",
                r.detections.keys().next().unwrap_or(&0)
            )?;
        }
        figures_list(&mut md, &figures)?;
    }
    reading_guide(&mut md, &st)?;
    finish(md, out, &name, &study)
}

/// Ends a report with its study file and writes report.md and report.html.
fn finish(mut md: String, out: &Path, name: &str, study: &str) -> Result<PathBuf> {
    writeln!(md, "## Study file\n\n```yaml\n{}\n```", study.trim_end())?;
    let path = out.join("report.md");
    crate::fs::write_atomic(&path, md.as_bytes())?;
    crate::fs::write_atomic(&out.join("report.html"), html(name, &md).as_bytes())?;
    Ok(path)
}

/// The figures, each under its title with its SVG linked.
fn figures_list(md: &mut String, figures: &[(String, String)]) -> Result<()> {
    for (stem, title) in figures {
        writeln!(
            md,
            "### {title}\n\n![{title}]({stem}.png)\n\n[SVG]({stem}.svg)\n"
        )?;
    }
    Ok(())
}

/// The report of a run that only validates detection: the section and its figures.
fn validation_report(
    dir: &Path,
    out: &Path,
    v: &crate::detect::validate::Validation,
    agreement: Option<&crate::detect::validate::LabelAgreement>,
) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "run".into());
    let study = std::fs::read_to_string(crate::study::rundir::RunDir::at(dir).study_file())
        .unwrap_or_default();
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut md = String::new();
    writeln!(md, "# {name}\n")?;
    writeln!(
        md,
        "Rendered by outlierlab {} from `{}`: a detection validation (no variants scored).\n",
        env!("CARGO_PKG_VERSION"),
        dir.display()
    )?;
    md.push_str(&validation::markdown_with(v, 2, agreement));
    let figures = plots::draw_validation(out, v, "")?;
    writeln!(md, "## Figures\n")?;
    figures_list(&mut md, &figures)?;
    finish(md, out, &name, &study)
}

/// The detection validations of several models side by side, with the recommended default:
/// `report.md` and `report.html` in `out`.
pub fn render_across(dirs: &[PathBuf], out: &Path) -> Result<PathBuf> {
    let (runs, rec) = across(dirs)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let md = validation::across_markdown(&runs, dirs, rec.as_ref());
    let path = out.join("report.md");
    crate::fs::write_atomic(&path, md.as_bytes())?;
    crate::fs::write_atomic(
        &out.join("report.html"),
        html("detection-validation", &md).as_bytes(),
    )?;
    Ok(path)
}

/// What README pastes from several detection validations.
pub fn across_summary(dirs: &[PathBuf]) -> Result<String> {
    let (runs, rec) = across(dirs)?;
    Ok(validation::across_summary(&runs, rec.as_ref()))
}

type Across = (
    Vec<(String, crate::detect::validate::Validation)>,
    Option<crate::detect::heldout::Recommendation>,
);

/// The validations of `dirs` read, and the recommendation computed from them.
fn across(dirs: &[PathBuf]) -> Result<Across> {
    let mut runs = Vec::new();
    for d in dirs {
        let v = crate::study::rundir::read_validation(d)?.with_context(|| {
            format!(
                "{} has no detection validation (validation/validation.json); --across takes the run folders of detection-validation studies",
                d.display()
            )
        })?;
        if v.heldout.is_none() {
            bail!(
                "{} was validated before held-out scoring existed; run its study again",
                d.display()
            );
        }
        runs.push((v.model.clone(), v));
    }
    let usable: Vec<(String, &crate::detect::heldout::HeldOut, bool)> = runs
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.heldout.as_ref().expect("checked above"),
                v.candidates.iter().any(|c| c.massive),
            )
        })
        .collect();
    let rec = crate::detect::heldout::recommend(&usable);
    Ok((runs, rec))
}
