//! Reports: reads the tracking database only, aggregates with polars, renders the paper's
//! Table 1 layout (Li et al. 2024) as Markdown and as a single-file HTML report, draws the plots
//! with plotters, and checks an experiment against a pinned baseline.
//!
//! Entry points:
//! - [`write_report`] writes into `out_dir`, for the [`Format`]s asked for:
//!   - `report.md` — the table (rows = generator / order / attention / predictions per step;
//!     columns = cross-entropy vs diffusion, FID and IS without and with CFG, mean ± std over
//!     seeds, the paired difference with a 95% paired-t interval and a verdict), plot and grid
//!     links;
//!   - `report.html` — the same table, the plots as inline SVG and the sample grids as PNG data
//!     URIs, in one file that opens offline;
//!   - the plots as `NAME.png` + `NAME.svg` (with Markdown or HTML): `fid_bars`,
//!     `fid_bars_cfg`, `loss_curves`, `fid_over_training`, `sweep_cfg`, `sweep_temperature`,
//!     `sweep_mar_steps`, `sweep_sampling_steps`, `fid_is_tradeoff` — each only when the data
//!     for it exists;
//!   - `samples/run-ID.png` — each generator run's sample grid (one row per class);
//!   - `metrics.csv` — every eval record of the experiment in long format.
//! - [`pin_baseline`] and [`check`]: see [`drift`].

pub mod drift;
mod fmt;
mod frames;
mod html;
mod plots;
mod rows;
mod stats;
mod table;
mod tokenizers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use db::{RunKind, RunStatus};

pub use drift::{CheckReport, CheckRow, Entry, Status, Tolerance};

pub use db::{ARM_CROSS_ENTROPY, ARM_DIFFUSION};
/// Metric key of the training loss drawn in `loss_curves`.
pub const LOSS_KEY: &str = "train/loss";
/// Artifact kind of a run's sample grid.
pub const SAMPLES_ARTIFACT: &str = "samples";

/// Everything that can go wrong while writing a report or checking drift.
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
    #[error("no experiment named '{0}' in the tracking database (see `ablate list`)")]
    UnknownExperiment(String),
    #[error("experiment '{experiment}' has no baseline named '{name}' (pin one with `ablate baseline pin {experiment} --name {name}`)")]
    UnknownBaseline { experiment: String, name: String },
    #[error("baseline '{name}': {message}")]
    Baseline { name: String, message: String },
    #[error("experiment '{0}' has no generator evaluation results (fid/is) to pin as a baseline")]
    NoResults(String),
}

impl Error {
    /// Errors caused by what the user asked for (an unknown name), not by the data or the
    /// machine: the CLI exits with 2 on these.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::UnknownExperiment(_) | Error::UnknownBaseline { .. }
        )
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// An output format of [`write_report`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Format {
    /// `report.md` (and the plot files it links).
    Markdown,
    /// `report.html`, self-contained (the plot files are written beside it, too).
    Html,
    /// `metrics.csv`.
    Csv,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Markdown, Format::Html, Format::Csv];
}

/// What [`write_report`] produced.
#[derive(Debug, Clone)]
pub struct ReportOutput {
    /// The Markdown text (as written to `report.md` when Markdown was asked for).
    pub markdown: String,
    /// Every file written: reports first, then plots, sample grids and the CSV.
    pub files: Vec<PathBuf>,
}

/// Everything read and aggregated for one experiment.
struct Loaded {
    /// Every run linked to the experiment and every eval record, as read.
    runs: Vec<db::RunRow>,
    evals: Vec<db::EvalRecord>,
    infos: Vec<rows::RunInfo>,
    /// Table rows in the experiment's run order.
    rows: Vec<rows::RowInfo>,
    evals_df: polars::prelude::DataFrame,
    runs_df: polars::prelude::DataFrame,
    summary: stats::Summary,
    /// (the version shown, the latest version): a report never mixes versions
    versions: (i64, i64),
}

fn load(db: &db::Db, experiment: &str, version: Option<i64>) -> Result<Loaded> {
    if db.experiment_id(experiment)?.is_none() {
        return Err(Error::UnknownExperiment(experiment.to_string()));
    }
    let latest = db
        .experiment_versions(experiment)?
        .last()
        .map_or(1, |v| v.0);
    let versions = (version.unwrap_or(latest), latest);
    let evals = db.evals_for_version(experiment, version)?;
    let runs = db.list_version_runs(experiment, version)?;
    let infos = rows::describe(&runs);
    let mut table_rows: Vec<rows::RowInfo> = Vec::new();
    for info in &infos {
        if !table_rows.iter().any(|r| r.key == info.row.key) {
            table_rows.push(info.row.clone());
        }
    }
    let evals_df = frames::evals_frame(&evals)?;
    let runs_df = frames::runs_frame(&infos)?;
    let summary = stats::summarize(&evals_df, &runs_df)?;
    Ok(Loaded {
        runs,
        evals,
        infos,
        rows: table_rows,
        evals_df,
        runs_df,
        summary,
        versions,
    })
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads the experiment from `db` and writes the report files of `formats` into `out_dir`
/// (created if missing). Works on partial experiments: rows without results show "missing".
/// [`Error::UnknownExperiment`] when the experiment is not registered.
pub fn write_report(
    db: &db::Db,
    experiment: &str,
    out_dir: &Path,
    formats: &[Format],
) -> Result<ReportOutput> {
    write_report_version(db, experiment, None, out_dir, formats)
}

/// [`write_report`] of version `version` of the experiment (the latest when `None`): a spec run
/// again with another configuration under the same name is a new version, and a report shows
/// exactly one.
pub fn write_report_version(
    db: &db::Db,
    experiment: &str,
    version: Option<i64>,
    out_dir: &Path,
    formats: &[Format],
) -> Result<ReportOutput> {
    let l = load(db, experiment, version)?;
    let want = |f: Format| formats.contains(&f);
    let documents = want(Format::Markdown) || want(Format::Html);
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;

    let table = table::table1(&l.rows, &l.summary, &l.infos);
    let mut notes = notes(&l);
    let mut figures = Vec::new();
    let mut grids = Vec::new();
    let mut grid_files = Vec::new();
    if documents {
        figures = draw_plots(db, experiment, &l, out_dir)?;
        let problems;
        (grids, grid_files, problems) = copy_grids(db, &l, out_dir)?;
        notes.extend(problems);
    }
    let csv_name = "metrics.csv";
    let csv = want(Format::Csv).then_some(csv_name);

    let plot_links: Vec<table::Link> = figures
        .iter()
        .map(|f| table::Link {
            title: f.title.clone(),
            files: [&f.png, &f.svg_path]
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect(),
        })
        .collect();
    let mut grid_links: Vec<table::Link> = Vec::new();
    for (g, file) in grids.iter().zip(&grid_files) {
        let name = file
            .as_ref()
            .and_then(|p: &PathBuf| p.strip_prefix(out_dir).ok())
            .map(|p| p.to_string_lossy().into_owned());
        match grid_links.last_mut() {
            Some(link) if link.title == g.row => link.files.extend(name),
            _ => grid_links.push(table::Link {
                title: g.row.clone(),
                files: name.into_iter().collect(),
            }),
        }
    }
    let tokenizer_table = tokenizer_table(db, &l)?;
    let markdown = table::markdown(
        experiment,
        &table,
        &notes,
        tokenizer_table.as_ref(),
        &plot_links,
        &grid_links,
        csv,
    );

    let mut files = Vec::new();
    if want(Format::Markdown) {
        let path = out_dir.join("report.md");
        db::files::write_bytes(&path, markdown.as_bytes()).map_err(io_err(&path))?;
        files.push(path);
    }
    if want(Format::Html) {
        let path = out_dir.join("report.html");
        let text = html::render(
            experiment,
            &table,
            &notes,
            tokenizer_table.as_ref(),
            &figures,
            &grids,
            csv,
        );
        db::files::write_bytes(&path, text.as_bytes()).map_err(io_err(&path))?;
        files.push(path);
    }
    for f in &figures {
        files.push(f.png.clone());
        files.push(f.svg_path.clone());
    }
    files.extend(grid_files.into_iter().flatten());
    if want(Format::Csv) {
        let path = out_dir.join(csv_name);
        frames::write_csv(frames::long_frame(&l.evals_df, &l.runs_df)?, &path)?;
        files.push(path);
    }
    Ok(ReportOutput { markdown, files })
}

/// The tokenizer table of an experiment, from its tokenizer runs' last reconstruction metrics.
fn tokenizer_table(db: &db::Db, l: &Loaded) -> Result<Option<tokenizers::TokenizerTable>> {
    let mut recon = Vec::new();
    for r in l.runs.iter().filter(|r| r.kind == RunKind::Tokenizer) {
        let mut last: BTreeMap<String, (i64, f64)> = BTreeMap::new();
        for m in db.metrics(r.id, None)? {
            let newer = last.get(&m.key).is_none_or(|(step, _)| m.step >= *step);
            if newer {
                last.insert(m.key.clone(), (m.step, m.value));
            }
        }
        recon.extend(last.into_iter().map(|(k, (_, v))| (r.id, k, v)));
    }
    Ok(tokenizers::tokenizer_table(&l.runs, &recon, &l.evals)?)
}

/// Remarks on partial experiments.
fn notes(l: &Loaded) -> Vec<String> {
    let mut by_status: BTreeMap<RunStatus, usize> = BTreeMap::new();
    for info in &l.infos {
        if info.status != RunStatus::Finished {
            *by_status.entry(info.status).or_default() += 1;
        }
    }
    let mut notes = Vec::new();
    if l.versions.1 > 1 {
        notes.push(format!(
            "Version {} of {} of this experiment: the spec was run under this name with {} \
             configurations, and a report shows the runs of one (`ablate report --version N` \
             for another; `ablate list` shows them).",
            l.versions.0, l.versions.1, l.versions.1
        ));
    }
    if !by_status.is_empty() {
        let parts: Vec<String> = by_status.iter().map(|(s, n)| format!("{n} {s}")).collect();
        notes.push(format!(
            "Partial experiment: {} of {} generator runs are not finished ({}); their entries \
             show as missing until they are.",
            by_status.values().sum::<usize>(),
            l.infos.len(),
            parts.join(", ")
        ));
    }
    notes
}

fn draw_plots(
    db: &db::Db,
    experiment: &str,
    l: &Loaded,
    out_dir: &Path,
) -> Result<Vec<plots::Figure>> {
    let mut figures = Vec::new();
    let has_fid = |guidance: &str| {
        l.summary
            .arms
            .iter()
            .any(|a| a.guidance == guidance && a.metric == stats::FID)
    };
    if has_fid(stats::WITHOUT_CFG) || !has_fid(stats::WITH_CFG) {
        figures.push(plots::fid_bars(
            out_dir,
            "fid_bars",
            "FID per row without CFG (mean ± std over seeds, lower is better)",
            &l.rows,
            &l.summary.arms,
            stats::WITHOUT_CFG,
        )?);
    }
    if has_fid(stats::WITH_CFG) {
        figures.push(plots::fid_bars(
            out_dir,
            "fid_bars_cfg",
            "FID per row with CFG, best scale per arm (mean ± std over seeds)",
            &l.rows,
            &l.summary.arms,
            stats::WITH_CFG,
        )?);
    }
    let losses = db.metrics_for_version(experiment, Some(l.versions.0), LOSS_KEY)?;
    let curves = stats::loss_curves(&frames::metrics_frame(&losses)?, &l.runs_df)?;
    if !curves.is_empty() {
        figures.push(plots::lines(
            out_dir,
            "loss_curves",
            "Training loss per arm (mean over seeds, band = ± std)",
            "step",
            LOSS_KEY,
            &curves,
        )?);
    }
    let over_training = stats::fid_over_training(&l.evals_df, &l.runs_df)?;
    if !over_training.is_empty() {
        figures.push(plots::lines(
            out_dir,
            "fid_over_training",
            "FID over training steps (mean over seeds, band = ± std)",
            "training step",
            "FID",
            &over_training,
        )?);
    }
    // A setting is swept when the runs that have results use two or more values of it.
    let evaluated: Vec<&rows::RunInfo> = l
        .infos
        .iter()
        .filter(|i| l.summary.arms.iter().any(|a| a.row == i.row.key))
        .collect();
    let mut varying = [false; 4];
    for (k, v) in varying.iter_mut().enumerate() {
        let mut values: Vec<f64> = evaluated
            .iter()
            .map(|i| i.sweep[k])
            .filter(|x| !x.is_nan())
            .collect();
        values.sort_by(f64::total_cmp);
        values.dedup();
        *v = values.len() >= 2;
    }
    for (k, axis) in rows::SWEEP_AXES.iter().enumerate() {
        if !varying[k] {
            continue;
        }
        let axis_df = frames::axis_frame(&l.infos, k, &varying)?;
        let sweep = stats::sweep(&l.evals_df, &l.runs_df, &axis_df)?;
        let has_line = |c: &[stats::Curve]| c.iter().any(|c| c.points.len() >= 2);
        if !has_line(&sweep.fid) && !has_line(&sweep.is) {
            continue;
        }
        figures.push(plots::sweep(
            out_dir,
            &format!("sweep_{}", axis.file),
            &format!(
                "FID and IS over {} (mean over seeds, band = ± std)",
                axis.name
            ),
            axis.name,
            &sweep,
        )?);
        if k == 0 {
            figures.push(plots::tradeoff(
                out_dir,
                "fid_is_tradeoff",
                "FID–IS trade-off over the CFG scale (mean over seeds)",
                &sweep,
            )?);
        }
    }
    Ok(figures)
}

/// The grids for the HTML report, the copied paths, and a note for each grid not shown.
type Grids = (Vec<html::Grid>, Vec<Option<PathBuf>>, Vec<String>);

/// Copies each generator run's sample grid into `out_dir/samples/run-ID.png`; the grids for
/// the HTML report (bytes inline), the copied paths (`None` where the file is gone or does not
/// match the sha256 recorded with it), and a note for each grid not shown.
fn copy_grids(db: &db::Db, l: &Loaded, out_dir: &Path) -> Result<Grids> {
    use sha2::{Digest, Sha256};
    let mut grids = Vec::new();
    let mut files = Vec::new();
    let mut problems = Vec::new();
    // Grouped by row, in table order.
    for row in &l.rows {
        for info in l.infos.iter().filter(|i| i.row.key == row.key) {
            let Some(artifact) = db
                .artifacts(info.run_id)?
                .into_iter()
                .rev()
                .find(|a| a.kind == SAMPLES_ARTIFACT)
            else {
                continue;
            };
            let caption = format!(
                "{} · seed {} · cfg {} · run {}",
                info.arm.as_deref().unwrap_or("?"),
                info.seed,
                fmt::fmt_num(info.cfg),
                info.run_id
            );
            let path = db.resolve(&artifact.path);
            let png = match std::fs::read(&path) {
                Ok(bytes) if hex::encode(Sha256::digest(&bytes)) == artifact.sha256 => Some(bytes),
                Ok(_) => {
                    problems.push(format!(
                        "The sample grid of run {} ({}) does not match the sha256 recorded \
                         with it, so it is not shown.",
                        info.run_id,
                        path.display()
                    ));
                    None
                }
                Err(e) => {
                    problems.push(format!(
                        "The sample grid of run {} ({}) cannot be read ({e}), so it is not shown.",
                        info.run_id,
                        path.display()
                    ));
                    None
                }
            };
            let copied = match &png {
                Some(bytes) => {
                    let dir = out_dir.join("samples");
                    let path = dir.join(format!("run-{}.png", info.run_id));
                    db::files::write_bytes(&path, bytes).map_err(io_err(&path))?;
                    Some(path)
                }
                None => None,
            };
            grids.push(html::Grid {
                row: row.short(),
                caption,
                png,
                path: artifact.path.clone(),
            });
            files.push(copied);
        }
    }
    Ok((grids, files, problems))
}

/// The current table entries of `experiment` (what a baseline stores).
pub fn current_entries(db: &db::Db, experiment: &str) -> Result<Vec<Entry>> {
    let l = load(db, experiment, None)?;
    let labels: BTreeMap<String, String> =
        l.rows.iter().map(|r| (r.key.clone(), r.short())).collect();
    let mut entries = drift::entries(&l.summary, &labels);
    // Table order: rows as in the table, without CFG before with, then arm and metric.
    let position = |row: &str| l.rows.iter().position(|r| r.key == row);
    entries.sort_by(|a, b| {
        (
            position(&a.row),
            a.guidance != stats::WITHOUT_CFG,
            &a.arm,
            &a.metric,
        )
            .cmp(&(
                position(&b.row),
                b.guidance != stats::WITHOUT_CFG,
                &b.arm,
                &b.metric,
            ))
    });
    Ok(entries)
}

/// Stores the current table entries of `experiment` as baseline `name` (replacing one of that
/// name); the entries stored. [`Error::NoResults`] when there is nothing to pin.
pub fn pin_baseline(db: &db::Db, experiment: &str, name: &str) -> Result<Vec<Entry>> {
    let entries = current_entries(db, experiment)?;
    if entries.is_empty() {
        return Err(Error::NoResults(experiment.to_string()));
    }
    drift::pin(db, experiment, name, entries.clone())?;
    Ok(entries)
}

/// Compares the current entries of `experiment` with baseline `baseline` under `tolerances`
/// (metric → tolerance).
pub fn check(
    db: &db::Db,
    experiment: &str,
    baseline: &str,
    tolerances: &BTreeMap<String, Tolerance>,
) -> Result<CheckReport> {
    let current = current_entries(db, experiment)?;
    let pinned = drift::load(db, experiment, baseline)?;
    Ok(drift::compare(
        experiment, baseline, &pinned, &current, tolerances,
    ))
}

#[cfg(test)]
mod tests;
