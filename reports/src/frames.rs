//! Database rows → polars DataFrames (there is no sqlx bridge: split rows into columns), and the
//! CSV export.

use std::path::Path;

use db::{EvalRecord, MetricRecord};
use polars::prelude::*;
use polars_io::csv::write::CsvWriter;
use polars_io::SerWriter;

use crate::fmt::fmt_num;
use crate::rows::RunInfo;
use crate::stats::{WITHOUT_CFG, WITH_CFG};
use crate::{Error, Result};

/// Long-format eval records: one row per (run, step, metric).
pub(crate) fn evals_frame(records: &[EvalRecord]) -> PolarsResult<DataFrame> {
    let r = records;
    DataFrame::new(
        r.len(),
        vec![
            Column::new(
                "run_id".into(),
                r.iter().map(|e| e.run_id).collect::<Vec<i64>>(),
            ),
            Column::new(
                "run_name".into(),
                r.iter().map(|e| e.run_name.as_str()).collect::<Vec<&str>>(),
            ),
            Column::new(
                "kind".into(),
                r.iter().map(|e| e.kind.as_str()).collect::<Vec<&str>>(),
            ),
            Column::new(
                "cell".into(),
                r.iter().map(|e| e.cell.as_str()).collect::<Vec<&str>>(),
            ),
            Column::new(
                "arm".into(),
                r.iter()
                    .map(|e| e.arm.as_deref())
                    .collect::<Vec<Option<&str>>>(),
            ),
            Column::new(
                "seed".into(),
                r.iter().map(|e| e.seed).collect::<Vec<i64>>(),
            ),
            Column::new(
                "step".into(),
                r.iter().map(|e| e.step).collect::<Vec<i64>>(),
            ),
            Column::new(
                "metric".into(),
                r.iter().map(|e| e.metric.as_str()).collect::<Vec<&str>>(),
            ),
            Column::new(
                "value".into(),
                r.iter().map(|e| e.value).collect::<Vec<f64>>(),
            ),
            Column::new(
                "sample_count".into(),
                r.iter().map(|e| e.sample_count).collect::<Vec<i64>>(),
            ),
            Column::new(
                "feature_net".into(),
                r.iter()
                    .map(|e| e.feature_net.as_str())
                    .collect::<Vec<&str>>(),
            ),
            Column::new(
                "settings".into(),
                r.iter().map(|e| e.settings.as_str()).collect::<Vec<&str>>(),
            ),
            Column::new(
                "position".into(),
                r.iter().map(|e| e.position).collect::<Vec<i64>>(),
            ),
        ],
    )
}

/// Metric history rows (one metric key): one row per (run, step).
pub(crate) fn metrics_frame(records: &[MetricRecord]) -> PolarsResult<DataFrame> {
    let r = records;
    DataFrame::new(
        r.len(),
        vec![
            Column::new(
                "run_id".into(),
                r.iter().map(|m| m.run_id).collect::<Vec<i64>>(),
            ),
            Column::new(
                "cell".into(),
                r.iter().map(|m| m.cell.as_str()).collect::<Vec<&str>>(),
            ),
            Column::new(
                "arm".into(),
                r.iter()
                    .map(|m| m.arm.as_deref())
                    .collect::<Vec<Option<&str>>>(),
            ),
            Column::new(
                "seed".into(),
                r.iter().map(|m| m.seed).collect::<Vec<i64>>(),
            ),
            Column::new(
                "step".into(),
                r.iter().map(|m| m.step).collect::<Vec<i64>>(),
            ),
            Column::new(
                "value".into(),
                r.iter().map(|m| m.value).collect::<Vec<f64>>(),
            ),
        ],
    )
}

/// The generator runs' descriptors: run_id, row (the Table 1 row key), row_label (its
/// descriptor for plots), guidance (`without` / `with`), cfg, curve_label (row label and CFG
/// scale).
pub(crate) fn runs_frame(runs: &[RunInfo]) -> PolarsResult<DataFrame> {
    let r = runs;
    DataFrame::new(
        r.len(),
        vec![
            Column::new(
                "run_id".into(),
                r.iter().map(|x| x.run_id).collect::<Vec<i64>>(),
            ),
            Column::new(
                "row".into(),
                r.iter().map(|x| x.row.key.as_str()).collect::<Vec<&str>>(),
            ),
            Column::new(
                "row_label".into(),
                r.iter().map(|x| x.row.short()).collect::<Vec<String>>(),
            ),
            Column::new(
                "guidance".into(),
                r.iter()
                    .map(|x| if x.guided() { WITH_CFG } else { WITHOUT_CFG })
                    .collect::<Vec<&str>>(),
            ),
            Column::new("cfg".into(), r.iter().map(|x| x.cfg).collect::<Vec<f64>>()),
            Column::new(
                "curve_label".into(),
                r.iter()
                    .map(|x| format!("{} · cfg {}", x.row.short(), fmt_num(x.cfg)))
                    .collect::<Vec<String>>(),
            ),
        ],
    )
}

/// (run_id, label, x) of the runs that have a value for sweep axis `axis`: x is the setting,
/// label the series the run belongs to (see [`RunInfo::sweep_group`]).
pub(crate) fn axis_frame(
    runs: &[RunInfo],
    axis: usize,
    varying: &[bool; 4],
) -> PolarsResult<DataFrame> {
    let r: Vec<&RunInfo> = runs.iter().filter(|x| !x.sweep[axis].is_nan()).collect();
    DataFrame::new(
        r.len(),
        vec![
            Column::new(
                "run_id".into(),
                r.iter().map(|x| x.run_id).collect::<Vec<i64>>(),
            ),
            Column::new(
                "label".into(),
                r.iter()
                    .map(|x| x.sweep_group(axis, varying))
                    .collect::<Vec<String>>(),
            ),
            Column::new(
                "x".into(),
                r.iter().map(|x| x.sweep[axis]).collect::<Vec<f64>>(),
            ),
        ],
    )
}

/// The long-format eval records with each generator run's Table 1 row, guidance and CFG scale
/// added (empty for other runs), for the CSV export.
pub(crate) fn long_frame(evals: &DataFrame, runs: &DataFrame) -> PolarsResult<DataFrame> {
    evals
        .clone()
        .lazy()
        .join(
            runs.clone()
                .lazy()
                .select([col("run_id"), col("row"), col("guidance"), col("cfg")]),
            [col("run_id")],
            [col("run_id")],
            JoinArgs {
                maintain_order: MaintainOrderJoin::Left,
                ..JoinArgs::new(JoinType::Left)
            },
        )
        .collect()
}

/// Writes `df` as CSV with a header row (durably: `db::files::write_atomic`).
pub(crate) fn write_csv(mut df: DataFrame, path: &Path) -> Result<()> {
    db::files::write_atomic(path, |tmp| -> std::result::Result<(), String> {
        let file = std::fs::File::create(tmp).map_err(|e| e.to_string())?;
        let mut writer = std::io::BufWriter::new(file);
        CsvWriter::new(&mut writer)
            .include_header(true)
            .finish(&mut df)
            .map_err(|e| e.to_string())?;
        std::io::Write::flush(&mut writer).map_err(|e| e.to_string())
    })
    .map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}
