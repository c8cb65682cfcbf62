//! Plots drawn with plotters (headless: bitmap and SVG backends, text through an embedded
//! DejaVu Sans registered as "sans-serif").

use std::error::Error as StdError;
use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

use crate::stats::{ArmStat, Curve, FID};
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

fn bars_size(cells: &[String]) -> (u32, u32) {
    ((200 + 150 * cells.len() as u32).max(800), 500)
}

pub(crate) fn fid_bars_png(path: &Path, cells: &[String], arms: &[ArmStat]) -> Result<()> {
    ensure_font();
    let root = BitMapBackend::new(path, bars_size(cells)).into_drawing_area();
    draw_fid_bars(&root, cells, arms).map_err(|e| plot_error(path, e))
}

pub(crate) fn fid_bars_svg(path: &Path, cells: &[String], arms: &[ArmStat]) -> Result<()> {
    ensure_font();
    let root = SVGBackend::new(path, bars_size(cells)).into_drawing_area();
    draw_fid_bars(&root, cells, arms).map_err(|e| plot_error(path, e))
}

/// Two bars per cell (cross-entropy left, diffusion right), error bars = std over seeds, the
/// mean written above each bar, "missing" where an arm has no FID.
fn draw_fid_bars<DB>(
    root: &DrawingArea<DB, Shift>,
    cells: &[String],
    arms: &[ArmStat],
) -> PlotResult
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    const LEFT: f64 = 0.12;
    const WIDTH: f64 = 0.38;
    root.fill(&WHITE)?;
    let fid = |cell: &str, arm: &str| {
        arms.iter()
            .find(|s| s.cell == cell && s.arm == arm && s.metric == FID)
    };
    let top = arms
        .iter()
        .filter(|s| s.metric == FID)
        .map(|s| s.mean + s.std.unwrap_or(0.0))
        .fold(0.0f64, f64::max);
    let y_max = if top > 0.0 { top * 1.18 } else { 1.0 };
    let n = cells.len().max(1) as f64;

    let mut chart = ChartBuilder::on(root)
        .caption(
            "FID per cell (mean ± std over seeds, lower is better)",
            (FONT_FAMILY, 22),
        )
        .margin(20)
        .x_label_area_size(45)
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
        let present: Vec<(usize, &ArmStat)> = cells
            .iter()
            .enumerate()
            .filter_map(|(i, c)| fid(c, arm).map(|s| (i, s)))
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
            Text::new(
                format!("{:.2}", s.mean),
                (center(i), y),
                value_style.clone(),
            )
        }))?;

        let missing: Vec<usize> = (0..cells.len())
            .filter(|&i| fid(&cells[i], arm).is_none())
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

    // Cell names under the axis, centred on each pair of bars (drawn in pixel coordinates on the
    // root area, since the x axis is numeric).
    let cell_style =
        TextStyle::from((FONT_FAMILY, 15).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, cell) in cells.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(cell.clone(), (px, py + 8), cell_style.clone()))?;
    }
    root.present()?;
    Ok(())
}

/// Training loss over step: one line per curve (mean over runs) with a ± std band.
pub(crate) fn loss_curves_png(path: &Path, curves: &[Curve]) -> Result<()> {
    ensure_font();
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    draw_loss_curves(&root, curves).map_err(|e| plot_error(path, e))
}

fn draw_loss_curves<DB>(root: &DrawingArea<DB, Shift>, curves: &[Curve]) -> PlotResult
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let points = curves.iter().flat_map(|c| c.points.iter());
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
        x_max = x_min + 1.0;
    }
    let pad = if y_max > y_min {
        (y_max - y_min) * 0.05
    } else {
        0.5
    };
    let (y_min, y_max) = (y_min - pad, y_max + pad);

    let mut chart = ChartBuilder::on(root)
        .caption(
            "Training loss (mean over runs, band = ± std)",
            (FONT_FAMILY, 22),
        )
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min..x_max, y_min..y_max)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .light_line_style(RGBColor(235, 235, 235))
        .y_desc("train/loss")
        .label_style((FONT_FAMILY, 14))
        .axis_desc_style((FONT_FAMILY, 16))
        .draw()?;

    // Arm colours (as in the bar plot) when each arm has one curve, else a palette.
    let arm_coloured = [ARM_CROSS_ENTROPY, ARM_DIFFUSION]
        .iter()
        .all(|arm| curves.iter().filter(|c| c.arm == *arm).count() <= 1);
    for (idx, curve) in curves.iter().enumerate() {
        let color: RGBAColor = if arm_coloured {
            arm_color(&curve.arm).to_rgba()
        } else {
            Palette99::pick(idx).to_rgba()
        };
        let upper = curve
            .points
            .iter()
            .map(|&(x, m, s)| (x, m + s.unwrap_or(0.0)));
        let lower = curve
            .points
            .iter()
            .rev()
            .map(|&(x, m, s)| (x, m - s.unwrap_or(0.0)));
        if curve.points.iter().any(|p| p.2.is_some()) {
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
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT_FAMILY, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
