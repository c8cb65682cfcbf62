//! Plots drawn with plotters (headless: bitmap and SVG backends, text through an embedded
//! DejaVu Sans registered as "sans-serif"). Every figure is written as PNG and SVG, and the SVG
//! text is kept for the single-file HTML report.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

use crate::fmt::fmt_num;
use crate::rows::RowInfo;
use crate::stats::{ArmStat, Curve, Sweep, FID};
use crate::{Error, Result, ARM_CROSS_ENTROPY, ARM_DIFFUSION};

/// DejaVu Sans (Debian fonts-dejavu-core; licence in assets/DejaVuSans.LICENSE).
static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static FONT: Once = Once::new();

const FONT_FAMILY: &str = "sans-serif";
const CE_COLOR: RGBColor = RGBColor(31, 119, 180);
const DIFFUSION_COLOR: RGBColor = RGBColor(255, 127, 14);
const OTHER_COLOR: RGBColor = RGBColor(100, 100, 100);

type PlotResult = std::result::Result<(), Box<dyn StdError>>;

/// Registers the embedded font once per process; plotters cannot draw text without it.
fn ensure_font() {
    FONT.call_once(|| {
        plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT_BYTES)
            .unwrap_or_else(|_| panic!("embedded DejaVuSans.ttf is not a valid font"));
    });
}

fn arm_color(arm: &str) -> RGBColor {
    match arm {
        ARM_CROSS_ENTROPY => CE_COLOR,
        ARM_DIFFUSION => DIFFUSION_COLOR,
        _ => OTHER_COLOR,
    }
}

fn plot_error(path: &Path, e: Box<dyn StdError>) -> Error {
    Error::Plot {
        file: path.display().to_string(),
        message: e.to_string(),
    }
}

/// A figure written as `NAME.png` and `NAME.svg`.
#[derive(Debug, Clone)]
pub(crate) struct Figure {
    pub title: String,
    pub png: PathBuf,
    pub svg_path: PathBuf,
    /// The SVG document, for inlining.
    pub svg: String,
}

/// Draws `$draw(&root, args…)` once on a PNG and once on an SVG backend of `$size`, writes
/// `$dir/$name.{png,svg}` and evaluates to a [`Figure`].
macro_rules! figure {
    ($dir:expr, $name:expr, $title:expr, $size:expr, $draw:ident ( $($arg:expr),* )) => {{
        ensure_font();
        let png = $dir.join(format!("{}.png", $name));
        let svg_path = $dir.join(format!("{}.svg", $name));
        db::files::write_atomic(&png, |tmp| {
            let root = BitMapBackend::new(tmp, $size).into_drawing_area();
            $draw(&root, $($arg),*).map_err(|e| plot_error(&png, e))
        })
        .map_err(|source| Error::Io {
            path: png.clone(),
            source,
        })?;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, $size).into_drawing_area();
            $draw(&root, $($arg),*).map_err(|e| plot_error(&svg_path, e))?;
        }
        db::files::write_bytes(&svg_path, svg.as_bytes()).map_err(|source| Error::Io {
            path: svg_path.clone(),
            source,
        })?;
        Ok(Figure {
            title: $title.to_string(),
            png,
            svg_path,
            svg,
        })
    }};
}

/// Paired FID bars per Table 1 row for one guidance setting.
pub(crate) fn fid_bars(
    dir: &Path,
    name: &str,
    title: &str,
    rows: &[RowInfo],
    arms: &[ArmStat],
    guidance: &str,
) -> Result<Figure> {
    let size = ((160 + 230 * rows.len() as u32).max(800), 560);
    figure!(
        dir,
        name,
        title,
        size,
        draw_fid_bars(rows, arms, guidance, title)
    )
}

/// Lines of mean ± std (band) over x, one per curve.
pub(crate) fn lines(
    dir: &Path,
    name: &str,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    curves: &[Curve],
) -> Result<Figure> {
    figure!(
        dir,
        name,
        title,
        (960, 540),
        draw_lines(curves, title, x_desc, y_desc)
    )
}

/// FID (left) and IS (right) over a swept sampling setting.
pub(crate) fn sweep(
    dir: &Path,
    name: &str,
    title: &str,
    x_desc: &str,
    sweep: &Sweep,
) -> Result<Figure> {
    figure!(dir, name, title, (1280, 540), draw_sweep(sweep, x_desc))
}

/// The FID–IS trade-off over CFG scales: one line per (row, arm) through (IS, FID) points,
/// each point labelled with its scale.
pub(crate) fn tradeoff(dir: &Path, name: &str, title: &str, cfg_sweep: &Sweep) -> Result<Figure> {
    figure!(
        dir,
        name,
        title,
        (960, 600),
        draw_tradeoff(cfg_sweep, title)
    )
}

/// Two bars per row (cross-entropy left, diffusion right), error bars = std over seeds, the
/// mean written above each bar, "missing" where an arm has no FID.
fn draw_fid_bars<DB>(
    root: &DrawingArea<DB, Shift>,
    rows: &[RowInfo],
    arms: &[ArmStat],
    guidance: &str,
    title: &str,
) -> PlotResult
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    const LEFT: f64 = 0.12;
    const WIDTH: f64 = 0.38;
    root.fill(&WHITE)?;
    let fid = |row: &str, arm: &str| {
        arms.iter()
            .find(|s| s.row == row && s.arm == arm && s.metric == FID && s.guidance == guidance)
    };
    let top = arms
        .iter()
        .filter(|s| s.metric == FID && s.guidance == guidance)
        .map(|s| s.mean + s.std.unwrap_or(0.0))
        .fold(0.0f64, f64::max);
    let y_max = if top > 0.0 { top * 1.18 } else { 1.0 };
    let n = rows.len().max(1) as f64;
    // three descriptor lines, then one line per part of the setting ("key=value · key=value")
    let label_lines = 3 + rows
        .iter()
        .map(|r| setting_lines(&r.setting).len())
        .max()
        .unwrap_or(0) as u32;

    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT_FAMILY, 22))
        .margin(20)
        .x_label_area_size(20 + 19 * label_lines)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n, 0f64..y_max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .y_desc("FID")
        .light_line_style(RGBColor(235, 235, 235))
        .label_style((FONT_FAMILY, 14))
        .axis_desc_style((FONT_FAMILY, 16))
        .draw()?;

    let value_style =
        TextStyle::from((FONT_FAMILY, 13).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (k, arm) in [ARM_CROSS_ENTROPY, ARM_DIFFUSION].into_iter().enumerate() {
        let color = arm_color(arm);
        let x0 = |i: usize| i as f64 + LEFT + k as f64 * WIDTH;
        let center = |i: usize| x0(i) + WIDTH / 2.0;
        let present: Vec<(usize, &ArmStat)> = rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| fid(&r.key, arm).map(|s| (i, s)))
            .collect();

        chart
            .draw_series(present.iter().map(|&(i, s)| {
                Rectangle::new([(x0(i), 0.0), (x0(i) + WIDTH, s.mean)], color.filled())
            }))?
            .label(arm)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));

        // Error bars: a vertical line with a cap at each end.
        let cap = WIDTH / 6.0;
        let error_bars = present.iter().filter_map(|&(i, s)| {
            let sd = s.std?;
            let (lo, hi, c) = ((s.mean - sd).max(0.0), s.mean + sd, center(i));
            Some([
                vec![(c, lo), (c, hi)],
                vec![(c - cap, lo), (c + cap, lo)],
                vec![(c - cap, hi), (c + cap, hi)],
            ])
        });
        chart.draw_series(
            error_bars
                .flatten()
                .map(|segment| PathElement::new(segment, BLACK.stroke_width(2))),
        )?;

        chart.draw_series(present.iter().map(|&(i, s)| {
            let y = s.mean + s.std.unwrap_or(0.0) + y_max * 0.01;
            let text = if s.guidance == guidance && guidance == crate::stats::WITH_CFG {
                format!("{:.2} (cfg {})", s.mean, fmt_num(s.cfg))
            } else {
                format!("{:.2}", s.mean)
            };
            Text::new(text, (center(i), y), value_style.clone())
        }))?;

        let missing: Vec<usize> = (0..rows.len())
            .filter(|&i| fid(&rows[i].key, arm).is_none())
            .collect();
        chart.draw_series(
            missing
                .into_iter()
                .map(|i| Text::new("missing", (center(i), y_max * 0.02), value_style.clone())),
        )?;
    }

    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT_FAMILY, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    // Row descriptors under the axis, centred on each pair of bars (drawn in pixel coordinates
    // on the root area, since the x axis is numeric).
    let row_style =
        TextStyle::from((FONT_FAMILY, 15).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, row) in rows.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        let mut lines = vec![
            format!("{} · {}", row.generator, row.order),
            row.attention.clone(),
            format!("preds/step: {}", row.preds),
        ];
        lines.extend(setting_lines(&row.setting));
        for (k, line) in lines.into_iter().enumerate() {
            root.draw(&Text::new(
                line,
                (px, py + 8 + 19 * k as i32),
                row_style.clone(),
            ))?;
        }
    }
    root.present()?;
    Ok(())
}

/// A row's setting as label lines: one per grid key, so long settings do not run into the
/// neighbouring row's label.
fn setting_lines(setting: &str) -> Vec<String> {
    setting
        .split(" · ")
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

/// The value range of some curves' bands, padded; a unit range when empty.
fn ranges<'a>(
    points: impl Iterator<Item = &'a (f64, f64, Option<f64>)>,
) -> ((f64, f64), (f64, f64)) {
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, m, s) in points {
        let s = s.unwrap_or(0.0);
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_min = y_min.min(m - s);
        y_max = y_max.max(m + s);
    }
    if x_min > x_max {
        (x_min, x_max, y_min, y_max) = (0.0, 1.0, 0.0, 1.0);
    }
    if x_max <= x_min {
        let pad = x_min.abs().max(1.0) * 0.1;
        (x_min, x_max) = (x_min - pad, x_max + pad);
    }
    let pad = if y_max > y_min {
        (y_max - y_min) * 0.05
    } else {
        y_max.abs().max(1.0) * 0.1
    };
    ((x_min, x_max), (y_min - pad, y_max + pad))
}

/// Arm colours when each arm has one curve, else a palette.
fn curve_colors(curves: &[Curve]) -> Vec<RGBAColor> {
    let arm_coloured = [ARM_CROSS_ENTROPY, ARM_DIFFUSION]
        .iter()
        .all(|arm| curves.iter().filter(|c| c.arm == *arm).count() <= 1);
    curves
        .iter()
        .enumerate()
        .map(|(idx, c)| {
            if arm_coloured {
                arm_color(&c.arm).to_rgba()
            } else {
                Palette99::pick(idx).to_rgba()
            }
        })
        .collect()
}

fn draw_lines<DB>(
    root: &DrawingArea<DB, Shift>,
    curves: &[Curve],
    title: &str,
    x_desc: &str,
    y_desc: &str,
) -> PlotResult
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    draw_lines_on(root, curves, title, x_desc, y_desc)?;
    root.present()?;
    Ok(())
}

/// Mean lines with a ± std band (where some x has two or more runs) and point markers.
fn draw_lines_on<DB>(
    area: &DrawingArea<DB, Shift>,
    curves: &[Curve],
    title: &str,
    x_desc: &str,
    y_desc: &str,
) -> PlotResult
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    let ((x_min, x_max), (y_min, y_max)) = ranges(curves.iter().flat_map(|c| c.points.iter()));
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT_FAMILY, 20))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min..x_max, y_min..y_max)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| fmt_num((x * 1000.0).round() / 1000.0))
        .light_line_style(RGBColor(235, 235, 235))
        .label_style((FONT_FAMILY, 14))
        .axis_desc_style((FONT_FAMILY, 16))
        .draw()?;

    for (curve, color) in curves.iter().zip(curve_colors(curves)) {
        if curve.points.iter().any(|p| p.2.is_some()) {
            let upper = curve
                .points
                .iter()
                .map(|&(x, m, s)| (x, m + s.unwrap_or(0.0)));
            let lower = curve
                .points
                .iter()
                .rev()
                .map(|&(x, m, s)| (x, m - s.unwrap_or(0.0)));
            chart.draw_series(std::iter::once(Polygon::new(
                upper.chain(lower).collect::<Vec<_>>(),
                color.mix(0.2).filled(),
            )))?;
        }
        chart
            .draw_series(LineSeries::new(
                curve.points.iter().map(|&(x, m, _)| (x, m)),
                color.stroke_width(2),
            ))?
            .label(curve.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        if curve.points.len() <= 30 {
            chart.draw_series(
                curve
                    .points
                    .iter()
                    .map(|&(x, m, _)| Circle::new((x, m), 3, color.filled())),
            )?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT_FAMILY, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn draw_sweep<DB>(root: &DrawingArea<DB, Shift>, sweep: &Sweep, x_desc: &str) -> PlotResult
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(root.dim_in_pixel().0 / 2);
    draw_lines_on(
        &left,
        &sweep.fid,
        &format!("FID over {x_desc} (lower is better)"),
        x_desc,
        "FID",
    )?;
    draw_lines_on(
        &right,
        &sweep.is,
        &format!("IS over {x_desc} (higher is better)"),
        x_desc,
        "IS",
    )?;
    root.present()?;
    Ok(())
}

/// One line of the trade-off plot: (label, arm, (IS, FID, cfg) points).
type TradeoffSeries = (String, String, Vec<(f64, f64, f64)>);

/// (IS, FID, cfg) points of each (row, arm) of a CFG sweep, matched on the scale.
fn tradeoff_points(sweep: &Sweep) -> Vec<TradeoffSeries> {
    sweep
        .fid
        .iter()
        .filter_map(|f| {
            let is = sweep.is.iter().find(|c| c.label == f.label)?;
            let points: Vec<(f64, f64, f64)> = f
                .points
                .iter()
                .filter_map(|&(x, fid, _)| {
                    let (_, v, _) = is.points.iter().find(|p| p.0 == x)?;
                    Some((*v, fid, x))
                })
                .collect();
            (!points.is_empty()).then(|| (f.label.clone(), f.arm.clone(), points))
        })
        .collect()
}

fn draw_tradeoff<DB>(root: &DrawingArea<DB, Shift>, sweep: &Sweep, title: &str) -> PlotResult
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let series = tradeoff_points(sweep);
    let as_curves: Vec<Curve> = series
        .iter()
        .map(|(label, arm, pts)| Curve {
            label: label.clone(),
            arm: arm.clone(),
            points: pts.iter().map(|&(is, fid, _)| (is, fid, None)).collect(),
        })
        .collect();
    let ((x_min, x_max), (y_min, y_max)) = ranges(as_curves.iter().flat_map(|c| c.points.iter()));
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT_FAMILY, 20))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min..x_max, y_min..y_max)?;
    chart
        .configure_mesh()
        .x_desc("IS (higher is better)")
        .y_desc("FID (lower is better)")
        .light_line_style(RGBColor(235, 235, 235))
        .label_style((FONT_FAMILY, 14))
        .axis_desc_style((FONT_FAMILY, 16))
        .draw()?;
    let label_style =
        TextStyle::from((FONT_FAMILY, 12).into_font()).pos(Pos::new(HPos::Left, VPos::Bottom));
    for ((label, _, pts), color) in series.iter().zip(curve_colors(&as_curves)) {
        let mut sorted = pts.clone();
        sorted.sort_by(|a, b| a.2.total_cmp(&b.2));
        chart
            .draw_series(LineSeries::new(
                sorted.iter().map(|&(is, fid, _)| (is, fid)),
                color.stroke_width(2),
            ))?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(
            sorted
                .iter()
                .map(|&(is, fid, _)| Circle::new((is, fid), 4, color.filled())),
        )?;
        chart.draw_series(sorted.iter().map(|&(is, fid, cfg)| {
            Text::new(
                format!(" cfg {}", fmt_num(cfg)),
                (is, fid),
                label_style.clone(),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT_FAMILY, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
