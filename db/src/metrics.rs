//! Metric histories: batched inserts, reads, and the buffered [`MetricWriter`].

use std::time::{SystemTime, UNIX_EPOCH};

use crate::model::MetricRecordRaw;
use crate::{Db, Error, MetricPoint, MetricRecord, Result};

impl Db {
    /// Writes `points` for run `run_id` in one write transaction. A point at an existing
    /// (key, step) replaces the stored one, so a resumed run never duplicates history.
    pub fn insert_metrics(&self, run_id: i64, points: &[MetricPoint]) -> Result<()> {
        if points.is_empty() {
            return Ok(());
        }
        self.block_on(async {
            let mut tx = self.write_tx().await?;
            for point in points {
                sqlx::query(
                    "INSERT INTO metrics (run_id, key, step, value, wall_time)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (run_id, key, step) DO UPDATE
                     SET value = excluded.value, wall_time = excluded.wall_time",
                )
                .bind(run_id)
                .bind(point.key.as_str())
                .bind(point.step)
                .bind(not_nan(point.value))
                .bind(point.wall_time)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// A buffered writer for run `run_id` that writes every `batch` points (at least 1).
    pub fn metric_writer(&self, run_id: i64, batch: usize) -> MetricWriter<'_> {
        let batch = batch.max(1);
        MetricWriter {
            db: self,
            run_id,
            batch,
            buffer: Vec::with_capacity(batch),
        }
    }

    /// The history of run `run_id`, of one key or of all, ordered by key then step.
    pub fn metrics(&self, run_id: i64, key: Option<&str>) -> Result<Vec<MetricPoint>> {
        let rows: Vec<(String, i64, Option<f64>, f64)> = self.block_on(async {
            sqlx::query_as(
                "SELECT key, step, value, wall_time FROM metrics
                 WHERE run_id = $1 AND ($2 IS NULL OR key = $2)
                 ORDER BY key, step",
            )
            .bind(run_id)
            .bind(key)
            .fetch_all(self.pool())
            .await
        })?;
        Ok(rows
            .into_iter()
            .map(|(key, step, value, wall_time)| MetricPoint {
                key,
                step,
                value: value.unwrap_or(f64::NAN),
                wall_time,
            })
            .collect())
    }

    /// The latest (highest-step) value of every key of run `run_id`, ordered by key; read from
    /// the `latest_metrics` view.
    pub fn latest_metrics(&self, run_id: i64) -> Result<Vec<(String, i64, f64)>> {
        let rows: Vec<(String, i64, Option<f64>)> = self.block_on(async {
            sqlx::query_as(
                "SELECT key, step, value FROM latest_metrics WHERE run_id = $1 ORDER BY key",
            )
            .bind(run_id)
            .fetch_all(self.pool())
            .await
        })?;
        Ok(rows
            .into_iter()
            .map(|(key, step, value)| (key, step, value.unwrap_or(f64::NAN)))
            .collect())
    }

    /// Deletes the points of run `run_id` with a step greater than `step` (used when resuming
    /// from the checkpoint at `step`); how many were deleted.
    pub fn delete_metrics_after(&self, run_id: i64, step: i64) -> Result<u64> {
        self.block_on(async {
            let mut tx = self.write_tx().await?;
            let done = sqlx::query("DELETE FROM metrics WHERE run_id = $1 AND step > $2")
                .bind(run_id)
                .bind(step)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(done.rows_affected())
        })
    }

    /// Key `key` of every run of `experiment`, ordered by the run's position, then step.
    /// [`crate::Error::NotFound`] if the experiment is not registered.
    pub fn metrics_for_experiment(&self, experiment: &str, key: &str) -> Result<Vec<MetricRecord>> {
        self.metrics_for_version(experiment, None, key)
    }

    /// [`Db::metrics_for_experiment`] for version `version` of it (the latest when `None`).
    pub fn metrics_for_version(
        &self,
        experiment: &str,
        version: Option<i64>,
        key: &str,
    ) -> Result<Vec<MetricRecord>> {
        let rows: Vec<MetricRecordRaw> = self.block_on(async {
            let (experiment_id, version) = self.require_version(experiment, version).await?;
            Ok::<_, crate::Error>(
                sqlx::query_as(
                    "SELECT m.run_id, r.cell, r.arm, r.seed, m.key, m.step, m.value, m.wall_time
                     FROM metrics m
                     JOIN runs r ON r.id = m.run_id
                     JOIN experiment_runs er ON er.run_id = r.id
                     WHERE er.experiment_id = $1 AND er.version = $3 AND m.key = $2
                     ORDER BY er.position, r.id, m.step",
                )
                .bind(experiment_id)
                .bind(key)
                .bind(version)
                .fetch_all(self.pool())
                .await?,
            )
        })?;
        Ok(rows.into_iter().map(MetricRecord::from).collect())
    }
}

/// Buffers metric points of one run and writes them in batches (see [`Db::metric_writer`]).
/// Dropping it flushes what is left, ignoring errors; call [`MetricWriter::flush`] to see them.
/// `value`, or NULL for NaN: SQLite stores a NaN as NULL, and Postgres is made to do the same.
pub(crate) fn not_nan(value: f64) -> Option<f64> {
    (!value.is_nan()).then_some(value)
}

#[derive(Debug)]
pub struct MetricWriter<'a> {
    db: &'a Db,
    run_id: i64,
    batch: usize,
    buffer: Vec<MetricPoint>,
}

impl MetricWriter<'_> {
    /// Buffers `value` of `key` at `step`, stamped with the current wall time (seconds since
    /// the UNIX epoch); writes the buffer once it holds `batch` points.
    pub fn push(&mut self, key: &str, step: i64, value: f64) -> Result<()> {
        let wall_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.buffer.push(MetricPoint {
            key: key.to_owned(),
            step,
            value,
            wall_time,
        });
        if self.buffer.len() >= self.batch {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the buffered points. On error they stay buffered for the next attempt.
    pub fn flush(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.db.insert_metrics(self.run_id, &self.buffer)?;
        self.buffer.clear();
        Ok(())
    }

    /// Points buffered and not yet written.
    pub fn pending(&self) -> usize {
        self.buffer.len()
    }

    /// The run this writer writes to.
    pub fn run_id(&self) -> i64 {
        self.run_id
    }
}

impl Drop for MetricWriter<'_> {
    /// A last flush for a writer dropped without [`MetricWriter::flush`] (e.g. on an error path).
    /// Drop cannot return the error, so it is logged, with how many points it cost: call `flush`
    /// to handle it.
    fn drop(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let pending = self.buffer.len();
        // Blocking inside another runtime would panic; the points are lost in that misuse.
        let result = if tokio::runtime::Handle::try_current().is_err() {
            self.flush()
        } else {
            Err(Error::Invalid("dropped inside an async runtime".into()))
        };
        if let Err(e) = result {
            tracing::warn!(
                run_id = self.run_id,
                "{pending} metric point(s) of run {} were not written: {e}",
                self.run_id
            );
        }
    }
}
