//! Database rows → polars DataFrames (there is no sqlx bridge: split rows into columns), and the
//! CSV export.

use std::path::Path;

use db::{EvalRecord, MetricRecord};
use polars::prelude::*;
use polars_io::csv::write::CsvWriter;
use polars_io::SerWriter;

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

/// Writes `df` as CSV with a header row.
pub(crate) fn write_csv(mut df: DataFrame, path: &Path) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut writer = std::io::BufWriter::new(file);
    CsvWriter::new(&mut writer)
        .include_header(true)
        .finish(&mut df)?;
    std::io::Write::flush(&mut writer).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}
