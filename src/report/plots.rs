//! The report's figures, drawn with plotters into PNG and SVG. Text uses DejaVu Sans compiled
//! into the binary (plotters' ab_glyph backend), so a machine without fonts draws the same PNG.

use crate::detect::summary::{Summary, CRITERIA};
use crate::study::rundir::TuneResult;
use anyhow::Result;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

pub const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bundled font parses (it is a fixed asset); a failure here would be a build defect.
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| ())
            .expect("DejaVu Sans is a valid font");
    });
}

/// One point of the trade-off: a variant (or several sharing one score), pooled over replicates.
#[derive(Debug, Clone)]
pub struct Point {
    pub label: String,
    pub rate: f64,
    pub rate_lo: f64,
    pub rate_hi: f64,
    pub kl: f64,
    pub kl_lo: f64,
    pub kl_hi: f64,
    pub baseline: bool,
}

/// Indices of the points no other point beats on both refusal rate and KL.
pub fn pareto(points: &[Point]) -> Vec<usize> {
    (0..points.len())
        .filter(|&i| {
            let p = &points[i];
            !points
                .iter()
                .any(|q| q.rate <= p.rate && q.kl <= p.kl && (q.rate < p.rate || q.kl < p.kl))
        })
        .collect()
}

macro_rules! both {
    ($dir:expr, $stem:expr, $size:expr, $f:ident, $($arg:expr),*) => {{
        register_font();
        let png = $dir.join(format!("{}.png", $stem));
        {
            let root = BitMapBackend::new(&png, $size).into_drawing_area();
            $f(&root, $($arg),*)?;
            root.present()?;
        }
        let svg = $dir.join(format!("{}.svg", $stem));
        {
            let root = SVGBackend::new(&svg, $size).into_drawing_area();
            $f(&root, $($arg),*)?;
            root.present()?;
        }
        Ok::<(), anyhow::Error>(())
    }};
}

fn font(size: u32) -> TextStyle<'static> {
    (FONT, size).into_font().color(&BLACK)
}

fn trunc(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// The series legend, upper right, the same on every chart.
fn legend<'a, DB, CT>(chart: &mut ChartContext<'a, DB, CT>, size: u32) -> Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    CT: plotters::coord::CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(font(size))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

const POINT: RGBColor = RGBColor(31, 119, 180);
const BASE: RGBColor = RGBColor(214, 39, 40);
const FRONT: RGBColor = RGBColor(44, 160, 44);

fn scatter<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, pts: &[Point]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let kl_max = pts.iter().map(|p| p.kl_hi).fold(0.0, f64::max).max(1e-3) * 1.15;
    let r_max = (pts.iter().map(|p| p.rate_hi).fold(0.0, f64::max) * 100.0 * 1.1).clamp(5.0, 100.0);
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Refusal rate vs KL divergence (95% intervals; lower-left is better)",
            font(20),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..kl_max, 0.0..r_max)?;
    chart
        .configure_mesh()
        .x_desc("KL divergence of the first-token distribution (nats, harmless prompts)")
        .y_desc("refusals on harmful prompts (%)")
        .label_style(font(14))
        .axis_desc_style(font(15))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let front = pareto(pts);
    let mut fp: Vec<(f64, f64)> = front
        .iter()
        .map(|&i| (pts[i].kl, 100.0 * pts[i].rate))
        .collect();
    fp.sort_by(|a, b| a.0.total_cmp(&b.0));
    chart
        .draw_series(LineSeries::new(fp, FRONT.stroke_width(2)))?
        .label("Pareto front")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], FRONT.stroke_width(2)));
    for p in pts {
        let c = if p.baseline { BASE } else { POINT };
        chart.draw_series(std::iter::once(ErrorBar::new_vertical(
            p.kl,
            100.0 * p.rate_lo,
            100.0 * p.rate,
            100.0 * p.rate_hi,
            c.stroke_width(1),
            8,
        )))?;
        chart.draw_series(std::iter::once(ErrorBar::new_horizontal(
            100.0 * p.rate,
            p.kl_lo,
            p.kl,
            p.kl_hi,
            c.stroke_width(1),
            8,
        )))?;
    }
    chart
        .draw_series(
            pts.iter()
                .filter(|p| !p.baseline)
                .map(|p| Circle::new((p.kl, 100.0 * p.rate), 5, POINT.filled())),
        )?
        .label("variant")
        .legend(|(x, y)| Circle::new((x + 9, y), 5, POINT.filled()));
    chart
        .draw_series(
            pts.iter()
                .filter(|p| p.baseline)
                .map(|p| TriangleMarker::new((p.kl, 100.0 * p.rate), 7, BASE.filled())),
        )?
        .label("baseline (none, winsorize)")
        .legend(|(x, y)| TriangleMarker::new((x + 9, y), 7, BASE.filled()));
    let label_all = pts.len() <= 12;
    // Labels that would overprint an earlier one move down a line, with a leader to the point.
    let (dx, dy) = (kl_max * 0.16, r_max * 0.035);
    let mut placed: Vec<(f64, f64)> = Vec::new();
    for (i, p) in pts.iter().enumerate() {
        if !(label_all || p.baseline || front.contains(&i)) {
            continue;
        }
        let (x, y0) = (p.kl, 100.0 * p.rate);
        let mut y = y0;
        while placed
            .iter()
            .any(|(px, py)| (px - x).abs() < dx && (py - y).abs() < dy)
        {
            y -= dy;
        }
        placed.push((x, y));
        if y != y0 {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(x, y0), (x + dx * 0.05, y)],
                BLACK.mix(0.4).stroke_width(1),
            )))?;
        }
        chart.draw_series(std::iter::once(Text::new(
            trunc(&p.label, 30),
            (x + if y != y0 { dx * 0.05 } else { 0.0 }, y),
            font(13).pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Left,
                plotters::style::text_anchor::VPos::Bottom,
            )),
        )))?;
    }
    legend(&mut chart, 14)?;
    Ok(())
}

fn bars<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, pts: &[Point]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(root.dim_in_pixel().0 / 2);
    let n = pts.len();
    for (area, kl) in [(left, false), (right, true)] {
        let max = if kl {
            pts.iter().map(|p| p.kl_hi).fold(0.0, f64::max).max(1e-3) * 1.1
        } else {
            (pts.iter().map(|p| p.rate_hi).fold(0.0, f64::max) * 110.0).clamp(5.0, 100.0)
        };
        let mut chart = ChartBuilder::on(&area)
            .caption(
                if kl {
                    "KL divergence (mean, 95% CI)"
                } else {
                    "Refusal rate (%, 95% Wilson)"
                },
                font(18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(if kl { 12 } else { 210 })
            .build_cartesian_2d(0.0..max, -0.5..(n as f64 - 0.5))?;
        let labels: Vec<String> = pts.iter().map(|p| trunc(&p.label, 30)).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&|y| {
                let i = y.round();
                if kl || (y - i).abs() > 1e-6 || i < 0.0 || i as usize >= labels.len() {
                    String::new()
                } else {
                    // The first variant on top.
                    labels[labels.len() - 1 - i as usize].clone()
                }
            })
            .x_desc(if kl { "nats" } else { "% of harmful prompts" })
            .label_style(font(13))
            .axis_desc_style(font(14))
            .draw()?;
        for (i, p) in pts.iter().enumerate() {
            let (v, lo, hi) = if kl {
                (p.kl, p.kl_lo, p.kl_hi)
            } else {
                (100.0 * p.rate, 100.0 * p.rate_lo, 100.0 * p.rate_hi)
            };
            let c = if p.baseline { BASE } else { POINT };
            let y = (n - 1 - i) as f64;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(0.0, y - 0.35), (v, y + 0.35)],
                c.mix(0.6).filled(),
            )))?;
            chart.draw_series(std::iter::once(ErrorBar::new_horizontal(
                y,
                lo,
                v,
                hi,
                BLACK.stroke_width(1),
                6,
            )))?;
        }
    }
    Ok(())
}

/// Blue (low) → yellow → red (high), for t in 0..=1.
fn heat_colour(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let (a, b, u) = if t < 0.5 {
        ((49.0, 54.0, 149.0), (254.0, 224.0, 144.0), t * 2.0)
    } else {
        ((254.0, 224.0, 144.0), (165.0, 0.0, 38.0), (t - 0.5) * 2.0)
    };
    let mix = |x: f64, y: f64| (x + (y - x) * u).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

fn heatmap<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, s: &Summary) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let mut dims: Vec<u32> = s.heat.iter().map(|c| c.dim).collect();
    dims.sort_unstable();
    dims.dedup();
    let lmax = s.states as f64;
    let (lo, hi) = s.heat.iter().fold((f64::INFINITY, 0.0f64), |(a, b), c| {
        let v = (c.peak_ratio.max(1.0) as f64).log10();
        (a.min(v), b.max(v))
    });
    let (main, legend) = root.split_horizontally(root.dim_in_pixel().0 - 110);
    let mut chart = ChartBuilder::on(&main)
        .caption(
            "Peak |a| / median(|h|) by hidden state and dim (entries above the scan floor)",
            font(18),
        )
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..(lmax - 0.5), -0.5..(dims.len() as f64 - 0.5))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .y_labels(dims.len())
        .y_label_formatter(&|y| {
            let i = y.round();
            if (y - i).abs() > 1e-6 || i < 0.0 || i as usize >= dims.len() {
                String::new()
            } else {
                let d = dims[i as usize];
                if s.base_dims.contains(&d) {
                    format!("{d} ●")
                } else {
                    d.to_string()
                }
            }
        })
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .x_desc("hidden state (0 = embeddings)")
        .y_desc("dim (● = detected by the study's detection)")
        .label_style(font(13))
        .axis_desc_style(font(14))
        .draw()?;
    let span = (hi - lo).max(1e-9);
    chart.draw_series(s.heat.iter().map(|c| {
        let y = dims.iter().position(|d| *d == c.dim).unwrap_or(0) as f64;
        let x = c.layer as f64;
        let t = ((c.peak_ratio.max(1.0) as f64).log10() - lo) / span;
        Rectangle::new(
            [(x - 0.5, y - 0.45), (x + 0.5, y + 0.45)],
            heat_colour(t).filled(),
        )
    }))?;
    // Colour scale.
    let mut scale = ChartBuilder::on(&legend)
        .margin_top(60)
        .margin_bottom(60)
        .margin_right(50)
        .right_y_label_area_size(45)
        .build_cartesian_2d(0.0..1.0, lo..hi.max(lo + 1e-9))?;
    scale
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(5)
        .y_label_formatter(&|v| format!("{:.0}×", 10f64.powf(*v)))
        .label_style(font(12))
        .draw()?;
    let steps = 40;
    scale.draw_series((0..steps).map(|i| {
        let a = lo + span * i as f64 / steps as f64;
        let b = lo + span * (i + 1) as f64 / steps as f64;
        Rectangle::new(
            [(0.0, a), (1.0, b)],
            heat_colour(i as f64 / (steps - 1) as f64).filled(),
        )
    }))?;
    Ok(())
}

fn peaks<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, s: &Summary) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(root.dim_in_pixel().1 / 2);
    let lmax = s.states as f64;
    for (area, ratio) in [(top, false), (bottom, true)] {
        let vals: Vec<(f64, f64)> = s
            .per_layer
            .iter()
            .map(|p| {
                (
                    p.layer as f64,
                    if ratio { p.peak_ratio } else { p.peak_abs } as f64,
                )
            })
            .filter(|(_, v)| *v > 0.0)
            .collect();
        let threshold = if ratio {
            s.base.median_ratio.map(|v| v as f64)
        } else {
            s.base.min_abs.map(|v| v as f64)
        };
        let vmax = vals
            .iter()
            .map(|v| v.1)
            .chain(threshold)
            .fold(1.0, f64::max)
            * 3.0;
        let vmin = vals
            .iter()
            .map(|v| v.1)
            .chain(threshold)
            .fold(f64::INFINITY, f64::min)
            .clamp(1e-3, f64::INFINITY)
            / 3.0;
        let mut chart = ChartBuilder::on(&area)
            .caption(
                if ratio {
                    "Per-layer peak |a| / median(|h|) of its position, against the median-ratio threshold"
                } else {
                    "Per-layer peak |a|, against the absolute threshold"
                },
                font(17),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5..(lmax - 0.5), (vmin..vmax).log_scale())?;
        chart
            .configure_mesh()
            .x_label_formatter(&|x| format!("{}", x.round() as i64))
            .x_desc("hidden state (0 = embeddings)")
            .y_desc(if ratio {
                "ratio (×, log)"
            } else {
                "|a| (log)"
            })
            .label_style(font(13))
            .axis_desc_style(font(14))
            .draw()?;
        chart
            .draw_series(LineSeries::new(vals.clone(), POINT.stroke_width(2)))?
            .label(if ratio { "peak ratio" } else { "peak |a|" })
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], POINT.stroke_width(2)));
        chart.draw_series(vals.iter().map(|v| Circle::new(*v, 3, POINT.filled())))?;
        if let Some(t) = threshold {
            chart
                .draw_series(LineSeries::new(
                    vec![(-0.5, t), (lmax - 0.5, t)],
                    BASE.stroke_width(2),
                ))?
                .label(format!(
                    "{} = {t}",
                    if ratio { "median_ratio" } else { "min_abs" }
                ))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BASE.stroke_width(2)));
        }
        legend(&mut chart, 13)?;
    }
    Ok(())
}

/// (which single criteria flag it, how many dims) for each observed combination.
pub fn overlap_counts(s: &Summary) -> Vec<([bool; 5], usize)> {
    let mut universe: Vec<u32> = s
        .single_criterion
        .iter()
        .filter(|(k, _)| k.as_str() != "persistence")
        .flat_map(|(_, v)| v.iter().copied())
        .collect();
    universe.sort_unstable();
    universe.dedup();
    let mut counts: std::collections::BTreeMap<[bool; 5], usize> = Default::default();
    for d in universe {
        let mut key = [false; 5];
        for (i, c) in CRITERIA.iter().enumerate() {
            key[i] = s
                .single_criterion
                .get(*c)
                .is_some_and(|v| v.binary_search(&d).is_ok());
        }
        *counts.entry(key).or_default() += 1;
    }
    let mut v: Vec<([bool; 5], usize)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

fn upset<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, s: &Summary) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let combos = overlap_counts(s);
    let n = combos.len().max(1);
    let h = root.dim_in_pixel().1;
    let (top, bottom) = root.split_vertically(h * 3 / 5);
    let ymax = combos.iter().map(|c| c.1).max().unwrap_or(1) as f64 * 1.15;
    let mut chart = ChartBuilder::on(&top)
        .caption(
            "Dims flagged by each criterion alone (cluster, persistence: with the scan floor)",
            font(15),
        )
        .margin(12)
        .x_label_area_size(6)
        .y_label_area_size(110)
        .build_cartesian_2d(-0.5..(n as f64 - 0.5), 0.0..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_label_formatter(&|v| format!("{}", v.round() as i64))
        .y_desc("dims")
        .label_style(font(13))
        .axis_desc_style(font(14))
        .draw()?;
    chart.draw_series(combos.iter().enumerate().map(|(i, c)| {
        Rectangle::new(
            [(i as f64 - 0.35, 0.0), (i as f64 + 0.35, c.1 as f64)],
            POINT.filled(),
        )
    }))?;
    chart.draw_series(combos.iter().enumerate().map(|(i, c)| {
        Text::new(
            c.1.to_string(),
            (i as f64 - 0.1, c.1 as f64 + ymax * 0.02),
            font(13),
        )
    }))?;
    let mut grid = ChartBuilder::on(&bottom)
        .margin(12)
        .margin_top(0)
        .x_label_area_size(6)
        .y_label_area_size(110)
        .build_cartesian_2d(-0.5..(n as f64 - 0.5), -0.5..4.5)?;
    grid.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(5)
        .y_label_formatter(&|y: &f64| {
            let i = y.round();
            if (y - i).abs() > 1e-6 || !(0.0..5.0).contains(&i) {
                String::new()
            } else {
                CRITERIA[4 - i as usize].to_string()
            }
        })
        .label_style(font(13))
        .draw()?;
    for (i, (key, _)) in combos.iter().enumerate() {
        let ys: Vec<f64> = (0..5).filter(|r| key[*r]).map(|r| 4.0 - r as f64).collect();
        grid.draw_series((0..5).map(|r| {
            let on = key[r];
            Circle::new(
                (i as f64, 4.0 - r as f64),
                6,
                if on {
                    BLACK.filled()
                } else {
                    RGBColor(210, 210, 210).filled()
                },
            )
        }))?;
        if ys.len() > 1 {
            let (a, b) = (
                ys.iter().cloned().fold(f64::INFINITY, f64::min),
                ys.iter().cloned().fold(0.0, f64::max),
            );
            grid.draw_series(LineSeries::new(
                vec![(i as f64, a), (i as f64, b)],
                BLACK.stroke_width(2),
            ))?;
        }
    }
    Ok(())
}

fn sweep_curves<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, s: &Summary) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let xmin = s
        .sweeps
        .values()
        .flatten()
        .map(|p| p.0)
        .fold(f64::INFINITY, f64::min)
        .max(1e-3);
    let xmax = s.sweeps.values().flatten().map(|p| p.0).fold(1.0, f64::max);
    let ymax = s
        .sweeps
        .values()
        .flatten()
        .map(|p| p.1)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Dims found vs threshold: alone (thick) and with the study's other criteria (dots)",
            font(18),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (xmin..xmax).log_scale(),
            (0.5..ymax * 1.5 + 1.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("threshold value (log)")
        .y_desc("dims detected + 1 (log)")
        .label_style(font(13))
        .axis_desc_style(font(14))
        .draw()?;
    let colours = [POINT, BASE, FRONT];
    for (name, curve) in &s.sweeps {
        let criterion = name.split(' ').next().unwrap_or("");
        let i = ["min_abs", "median_ratio", "mad_ratio"]
            .iter()
            .position(|c| *c == criterion)
            .unwrap_or(0);
        let c = colours[i % colours.len()];
        let alone = name.ends_with("(alone)");
        let width = if alone { 3 } else { 1 };
        chart
            .draw_series(LineSeries::new(
                curve.iter().map(|(x, y)| (*x, *y as f64 + 1.0)),
                c.stroke_width(width),
            ))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(width))
            });
        if !alone {
            chart.draw_series(
                curve
                    .iter()
                    .map(|(x, y)| Circle::new((*x, *y as f64 + 1.0), 3, c.filled())),
            )?;
        }
        let current = match criterion {
            "min_abs" => s.base.min_abs,
            "median_ratio" => s.base.median_ratio,
            "mad_ratio" => s.base.mad_ratio,
            _ => None,
        };
        if let Some(v) = current {
            let v = v as f64;
            let y = curve
                .iter()
                .min_by(|a, b| {
                    (a.0.ln() - v.ln())
                        .abs()
                        .total_cmp(&(b.0.ln() - v.ln()).abs())
                })
                .map_or(1.0, |p| p.1 as f64 + 1.0);
            chart.draw_series(std::iter::once(TriangleMarker::new((v, y), 8, c.filled())))?;
        }
    }
    legend(&mut chart, 14)?;
    Ok(())
}

fn trace<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, tunes: &[&TuneResult]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let n = tunes
        .iter()
        .map(|t| t.trials.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let ymax = tunes
        .iter()
        .flat_map(|t| t.trials.iter().map(|x| x.objective))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.1;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Threshold tuning: selection-split objective per trial (line: best so far)",
            font(18),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5..(n as f64 + 0.5), 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_labels(n.min(20))
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .x_desc("trial")
        .y_desc("objective (lower is better)")
        .label_style(font(13))
        .axis_desc_style(font(14))
        .draw()?;
    let colours = [POINT, BASE, FRONT, RGBColor(148, 103, 189)];
    for (i, t) in tunes.iter().enumerate() {
        let c = colours[i % colours.len()];
        let pts: Vec<(f64, f64)> = t
            .trials
            .iter()
            .map(|x| (x.index as f64 + 1.0, x.objective))
            .collect();
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled())))?;
        let mut best = f64::INFINITY;
        let run: Vec<(f64, f64)> = pts
            .iter()
            .map(|p| {
                best = best.min(p.1);
                (p.0, best)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(run, c.stroke_width(2)))?
            .label(format!("{} (replicate {})", t.name, t.replicate))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    legend(&mut chart, 14)?;
    Ok(())
}

/// One row of the forest plot: a comparison's difference on one metric, with its adjusted
/// interval over prompts and, with several draws, over draws.
#[derive(Debug, Clone)]
pub struct ForestRow {
    pub label: String,
    pub estimate: f64,
    pub lo: f64,
    pub hi: f64,
    pub draws: Option<(f64, f64)>,
    pub verdict: String,
}

const DRAWS: RGBColor = RGBColor(150, 150, 150);
const NEGLIGIBLE: RGBColor = RGBColor(148, 103, 189);

/// Paired differences with their adjusted intervals, refusals left and KL right, the margin as
/// a shaded band around 0: the figure that says at a glance what is better, what is inside the
/// margin and what cannot be told.
fn forest<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panels: &[(String, f64, Vec<ForestRow>); 2],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(root.dim_in_pixel().0 * 56 / 100);
    for (area, (title, margin, rows)) in [(left, &panels[0]), (right, &panels[1])] {
        let first = std::ptr::eq(rows, &panels[0].2);
        let n = rows.len();
        // The axis is set by the prompt-level intervals and the margin; wider draw-level
        // intervals run off its edges.
        let finite = |x: f64| x.is_finite().then_some(x.abs());
        let reach = rows
            .iter()
            .flat_map(|r| [finite(r.lo), finite(r.hi), finite(r.estimate)])
            .flatten()
            .fold(*margin, f64::max)
            * 1.25;
        let mut chart = ChartBuilder::on(&area)
            .caption(title.as_str(), font(17))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(if first { 260 } else { 12 })
            .build_cartesian_2d(-reach..reach, -0.5..(n.max(1) as f64 - 0.5))?;
        let labels: Vec<String> = rows.iter().map(|r| trunc(&r.label, 40)).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n.max(1))
            .y_label_formatter(&|y| {
                let i = y.round();
                if !first || (y - i).abs() > 1e-6 || i < 0.0 || i as usize >= labels.len() {
                    String::new()
                } else {
                    labels[labels.len() - 1 - i as usize].clone()
                }
            })
            .x_desc("variant − reference (lower is better)")
            .label_style(font(13))
            .axis_desc_style(font(14))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(-margin, -0.5), (*margin, n as f64 - 0.5)],
            FRONT.mix(0.15).filled(),
        )))?;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(0.0, -0.5), (0.0, n as f64 - 0.5)],
            BLACK.stroke_width(1),
        )))?;
        let clip = |x: f64| x.clamp(-reach, reach);
        for (i, r) in rows.iter().enumerate() {
            let y = (n - 1 - i) as f64;
            if let Some((lo, hi)) = r.draws {
                chart.draw_series(std::iter::once(PathElement::new(
                    vec![(clip(lo), y - 0.22), (clip(hi), y - 0.22)],
                    DRAWS.stroke_width(3),
                )))?;
            }
            let c = match r.verdict.as_str() {
                "better" => FRONT,
                "worse" => BASE,
                "negligible" => NEGLIGIBLE,
                _ => POINT,
            };
            chart.draw_series(std::iter::once(ErrorBar::new_horizontal(
                y,
                clip(r.lo),
                r.estimate,
                clip(r.hi),
                c.stroke_width(2),
                8,
            )))?;
            chart.draw_series(std::iter::once(Circle::new((r.estimate, y), 4, c.filled())))?;
        }
    }
    Ok(())
}

/// The forest plot of a report's comparisons (see [`ForestRow`]); returns its (stem, title).
pub fn draw_forest(
    dir: &Path,
    refusals: Vec<ForestRow>,
    kl: Vec<ForestRow>,
    margins: (f64, f64),
) -> Result<(String, String)> {
    let h = (150 + 30 * refusals.len() as u32).clamp(320, 2400);
    let panels = [
        (
            "Refusals (points), adjusted CI; band = ±margin".to_string(),
            margins.0,
            refusals,
        ),
        (
            "KL, adjusted CI; grey = over draws".to_string(),
            margins.1,
            kl,
        ),
    ];
    both!(dir, "forest", (1200, h), forest, &panels)?;
    Ok((
        "forest".into(),
        "Forest plot: paired differences with adjusted intervals".into(),
    ))
}

/// Draws every figure the data allow into `dir`; returns (file stem, title) of each.
pub fn draw_all(
    dir: &Path,
    points: &[Point],
    detection: Option<&Summary>,
    tunes: &[&TuneResult],
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    if !points.is_empty() {
        both!(dir, "refusal_vs_kl", (1000, 640), scatter, points)?;
        out.push((
            "refusal_vs_kl".into(),
            "Refusal rate vs KL, Pareto front".into(),
        ));
        let h = (120 + 34 * points.len() as u32).clamp(300, 2400);
        both!(dir, "variants", (1100, h), bars, points)?;
        out.push(("variants".into(), "Per-variant refusal rate and KL".into()));
    }
    if let Some(s) = detection {
        if !s.heat.is_empty() {
            let h = (160
                + 26 * s
                    .heat
                    .iter()
                    .map(|c| c.dim)
                    .collect::<std::collections::BTreeSet<_>>()
                    .len() as u32)
                .clamp(320, 1400);
            both!(dir, "detection_heatmap", (1000, h), heatmap, s)?;
            out.push((
                "detection_heatmap".into(),
                "Detection heatmap (layer × dim)".into(),
            ));
            both!(dir, "layer_peaks", (1000, 640), peaks, s)?;
            out.push((
                "layer_peaks".into(),
                "Per-layer peaks against the thresholds".into(),
            ));
        }
        if !overlap_counts(s).is_empty() {
            let w = (300 + 60 * overlap_counts(s).len() as u32).clamp(800, 1600);
            both!(dir, "criteria_overlap", (w, 520), upset, s)?;
            out.push(("criteria_overlap".into(), "Criteria overlap (UpSet)".into()));
        }
        if !s.sweeps.is_empty() {
            both!(dir, "threshold_sweep", (1000, 560), sweep_curves, s)?;
            out.push(("threshold_sweep".into(), "Dims found vs threshold".into()));
        }
    }
    if !tunes.is_empty() {
        both!(dir, "tuning_trace", (1000, 520), trace, tunes)?;
        out.push(("tuning_trace".into(), "Tuning trace".into()));
    }
    Ok(out)
}

/// Precision against recall (dims) along each threshold curve, with pr154's criteria subsets
/// (first scope) as points.
fn pr_curves<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    v: &crate::detect::validate::Validation,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!("{}: precision vs recall of the massive dims", v.model),
            font(18),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.02f64..1.02, -0.02f64..1.05)?;
    chart
        .configure_mesh()
        .x_desc("recall")
        .y_desc("precision")
        .label_style(font(13))
        .axis_desc_style(font(14))
        .draw()?;
    let colours = [POINT, BASE, FRONT, RGBColor(148, 103, 189)];
    let mut groups: Vec<&str> = v
        .scored
        .iter()
        .filter(|s| s.group.starts_with("curve "))
        .map(|s| s.group.as_str())
        .collect();
    groups.dedup();
    for (i, g) in groups.iter().enumerate() {
        let c = colours[i % colours.len()];
        let pts: Vec<(f64, f64)> = v
            .scored
            .iter()
            .filter(|s| s.group == *g && !s.dim.precision.is_nan() && !s.dim.recall.is_nan())
            .map(|s| (s.dim.recall, s.dim.precision))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(g.trim_start_matches("curve ").to_string() + " (threshold swept)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled())))?;
    }
    if let Some(g) = v.groups.first() {
        let pts: Vec<(f64, f64)> = v
            .scored
            .iter()
            .filter(|s| s.group == g.group && !s.dim.precision.is_nan() && !s.dim.recall.is_nan())
            .map(|s| (s.dim.recall, s.dim.precision))
            .collect();
        chart
            .draw_series(
                pts.iter()
                    .map(|p| TriangleMarker::new(*p, 6, BLACK.mix(0.5).filled())),
            )?
            .label("pr154 criteria subsets")
            .legend(|(x, y)| TriangleMarker::new((x + 9, y), 6, BLACK.mix(0.5).filled()));
    }
    legend(&mut chart, 13)?;
    Ok(())
}

/// Each candidate's damage from zeroing against holding at the mean, with the label thresholds.
fn damages<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    v: &crate::detect::validate::Validation,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let floor = 1e-5;
    let at = |x: f64| x.max(floor);
    let xmax = v
        .candidates
        .iter()
        .map(|c| at(c.damage.zero_kl))
        .fold(v.spec.zero_kl * 3.0, f64::max)
        * 2.0;
    let ymax = v
        .candidates
        .iter()
        .map(|c| at(c.damage.mean_kl))
        .fold(v.spec.mean_kl * 3.0, f64::max)
        * 2.0;
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!(
                "{}: damage of holding each candidate at zero vs at its mean",
                v.model
            ),
            font(18),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d((floor..xmax).log_scale(), (floor..ymax).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("KL at later positions, held at zero (nats, log)")
        .y_desc("KL, held at its mean (nats, log)")
        .label_style(font(13))
        .axis_desc_style(font(14))
        .draw()?;
    let grey = BASE.mix(0.5);
    chart.draw_series(LineSeries::new(
        vec![(v.spec.zero_kl, floor), (v.spec.zero_kl, ymax)],
        grey.stroke_width(2),
    ))?;
    chart.draw_series(LineSeries::new(
        vec![(floor, at(v.spec.mean_kl)), (xmax, at(v.spec.mean_kl))],
        grey.stroke_width(2),
    ))?;
    for massive in [false, true] {
        let c = if massive { BASE } else { POINT };
        let pts: Vec<&crate::detect::validate::Candidate> = v
            .candidates
            .iter()
            .filter(|x| x.massive == massive)
            .collect();
        chart
            .draw_series(
                pts.iter().map(|x| {
                    Circle::new((at(x.damage.zero_kl), at(x.damage.mean_kl)), 5, c.filled())
                }),
            )?
            .label(if massive { "massive" } else { "not massive" })
            .legend(move |(x, y)| Circle::new((x + 9, y), 5, c.filled()));
        chart.draw_series(pts.iter().map(|x| {
            Text::new(
                format!("{}", x.dim),
                (at(x.damage.zero_kl), at(x.damage.mean_kl)),
                font(12),
            )
        }))?;
    }
    legend(&mut chart, 13)?;
    Ok(())
}

/// The detection-validation figures; returns (file stem, title) of each.
pub fn draw_validation(
    dir: &Path,
    v: &crate::detect::validate::Validation,
    prefix: &str,
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let stem = format!("{prefix}damages");
    both!(dir, stem, (1000, 640), damages, v)?;
    out.push((stem, "Damage of zeroing vs holding at the mean".into()));
    if v.candidates.iter().any(|c| c.massive) {
        let stem = format!("{prefix}precision_recall");
        both!(dir, stem, (1000, 640), pr_curves, v)?;
        out.push((stem, "Precision vs recall as thresholds sweep".into()));
    }
    Ok(out)
}
