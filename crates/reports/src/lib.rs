//! Reports: reads the tracking database only, aggregates with polars, renders the paper-style
//! table (Li et al. 2024, Table 1 layout) as Markdown and draws the plots with plotters.
//!
//! Entry point: [`write_report`]. It writes into `out_dir`:
//! - `report.md` — the table (mean ± std over seeds per arm, the paired difference
//!   diffusion − cross-entropy with a 95% paired-t interval and a verdict) and links to the plots;
//! - `fid_bars.png`, `fid_bars.svg` — paired FID bars per cell, error bars = std over seeds;
//! - `loss_curves.png` — mean training loss (`train/loss`) over step per arm (band = ± std over runs);
//! - `metrics.csv` — every eval record of the experiment in long format.

mod frames;
mod plots;
mod stats;
mod table;

use std::path::{Path, PathBuf};

/// Arm name of the VQ-token + softmax-head side of a pair.
pub const ARM_CROSS_ENTROPY: &str = "cross-entropy";
/// Arm name of the continuous-token + Diffusion Loss side of a pair.
pub const ARM_DIFFUSION: &str = "diffusion";
/// Run kind of generator runs (the only runs that enter the table and the loss plot).
pub const KIND_GENERATOR: &str = "generator";
/// Metric key of the training loss drawn in `loss_curves.png`.
pub const LOSS_KEY: &str = "train/loss";

/// Everything that can go wrong while writing a report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the tracking database: {0}")]
    Db(#[from] db::Error),
    #[error("aggregating results with polars: {0}")]
    Polars(#[from] polars::prelude::PolarsError),
    #[error("drawing {file}: {message}")]
    Plot { file: String, message: String },
    #[error("writing {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "experiment '{0}' has no generator evaluation results (fid/is) to report; \
         run `ablate run` first or check the experiment name"
    )]
    NoResults(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What [`write_report`] produced.
#[derive(Debug, Clone)]
pub struct ReportOutput {
    /// The Markdown text exactly as written to `report.md` (title, table, how-to-read line,
    /// plot links).
    pub markdown: String,
    /// Every file written, `report.md` first.
    pub files: Vec<PathBuf>,
}

/// Reads the evals and training-loss metrics of `experiment` from `db`, and writes
/// `report.md`, `fid_bars.png`, `fid_bars.svg`, `loss_curves.png` (when any `train/loss` was
/// recorded) and `metrics.csv` into `out_dir` (created if missing).
///
/// Fails with [`Error::NoResults`] when the experiment is unknown or has no generator run with a
/// `fid` or `is` evaluation.
pub fn write_report(db: &db::Db, experiment: &str, out_dir: &Path) -> Result<ReportOutput> {
    if db.experiment_id(experiment)?.is_none() {
        return Err(Error::NoResults(experiment.to_string()));
    }
    let evals = db.evals_for_experiment(experiment)?;
    let runs = db.list_runs(Some(experiment))?;
    let losses = db.metrics_for_experiment(experiment, LOSS_KEY)?;

    let evals_df = frames::evals_frame(&evals)?;
    let summary = stats::summarize(&evals_df)?;
    if summary.arms.is_empty() {
        return Err(Error::NoResults(experiment.to_string()));
    }

    // Cells that have generator runs but no usable evals still get a row ("missing").
    let mut cells = summary.cells.clone();
    for run in runs.iter().filter(|r| r.kind == KIND_GENERATOR) {
        if !cells.contains(&run.cell) {
            cells.push(run.cell.clone());
        }
    }

    std::fs::create_dir_all(out_dir).map_err(|source| Error::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;

    let mut files = Vec::new();
    let report_path = out_dir.join("report.md");
    let mut plot_files = Vec::new();

    let bars_png = out_dir.join("fid_bars.png");
    let bars_svg = out_dir.join("fid_bars.svg");
    plots::fid_bars_png(&bars_png, &cells, &summary.arms)?;
    plots::fid_bars_svg(&bars_svg, &cells, &summary.arms)?;
    plot_files.push(bars_png);
    plot_files.push(bars_svg);

    let generator_runs: Vec<i64> = runs
        .iter()
        .filter(|r| r.kind == KIND_GENERATOR)
        .map(|r| r.id)
        .collect();
    let loss_df = frames::metrics_frame(&losses)?;
    let curves = stats::loss_curves(&loss_df, &generator_runs)?;
    let loss_png = out_dir.join("loss_curves.png");
    let has_loss = !curves.is_empty();
    if has_loss {
        plots::loss_curves_png(&loss_png, &curves)?;
        plot_files.push(loss_png);
    }

    let csv_path = out_dir.join("metrics.csv");
    frames::write_csv(evals_df, &csv_path)?;

    let markdown = table::render(experiment, &cells, &summary, has_loss);
    std::fs::write(&report_path, &markdown).map_err(|source| Error::Io {
        path: report_path.clone(),
        source,
    })?;

    files.push(report_path);
    files.extend(plot_files);
    files.push(csv_path);
    Ok(ReportOutput { markdown, files })
}

#[cfg(test)]
mod tests;
