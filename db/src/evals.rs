//! Evaluation results and artifacts.

use crate::model::{canonical_json, EvalRecordRaw};
use crate::{ArtifactRow, Db, Error, EvalRecord, NewEval, Result};

impl Db {
    /// Records an evaluation; a result with the same run, step, metric, feature net and
    /// settings replaces the stored one (value, sample count, time). Its id.
    pub fn insert_eval(&self, e: &NewEval) -> Result<i64> {
        let settings = canonical_json(e.settings);
        self.block_on(async {
            let mut tx = self.write_tx().await?;
            let id: i64 = sqlx::query_scalar(self.sql("INSERT INTO evals (run_id, step, metric, value, sample_count, feature_net, settings)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (run_id, step, metric, feature_net, settings) DO UPDATE
                 SET value = excluded.value, sample_count = excluded.sample_count, created_at = {now} RETURNING id"))
            .bind(e.run_id)
            .bind(e.step)
            .bind(e.metric)
            .bind(crate::metrics::not_nan(e.value))
            .bind(e.sample_count)
            .bind(e.feature_net)
            .bind(&settings)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(id)
        })
    }

    /// The evaluations of run `run_id`, ordered by step, metric, feature net, settings.
    pub fn evals_for_run(&self, run_id: i64) -> Result<Vec<EvalRecord>> {
        let rows: Vec<EvalRecordRaw> = self.block_on(async {
            sqlx::query_as(
                "SELECT v.run_id, r.name AS run_name, r.kind, r.cell, r.arm, r.seed, v.step,
                        v.metric, v.value, v.sample_count, v.feature_net, v.settings,
                        COALESCE((SELECT MIN(er.position) FROM experiment_runs er
                                  WHERE er.run_id = r.id), 0) AS position
                 FROM evals v JOIN runs r ON r.id = v.run_id
                 WHERE v.run_id = $1
                 ORDER BY v.step, v.metric, v.feature_net, v.settings",
            )
            .bind(run_id)
            .fetch_all(self.pool())
            .await
        })?;
        rows.into_iter().map(EvalRecord::try_from).collect()
    }

    /// The evaluations of every run of `experiment`, ordered by the run's position, seed,
    /// metric, then step, feature net and settings. [`Error::NotFound`] if the experiment is
    /// not registered.
    pub fn evals_for_experiment(&self, experiment: &str) -> Result<Vec<EvalRecord>> {
        self.evals_for_version(experiment, None)
    }

    /// [`Db::evals_for_experiment`] for version `version` of it (the latest when `None`).
    pub fn evals_for_version(
        &self,
        experiment: &str,
        version: Option<i64>,
    ) -> Result<Vec<EvalRecord>> {
        let rows: Vec<EvalRecordRaw> = self.block_on(async {
            let (experiment_id, version) = self.require_version(experiment, version).await?;
            Ok::<_, Error>(
                sqlx::query_as(
                    "SELECT v.run_id, r.name AS run_name, r.kind, r.cell, r.arm, r.seed, v.step,
                            v.metric, v.value, v.sample_count, v.feature_net, v.settings,
                            er.position
                     FROM evals v
                     JOIN runs r ON r.id = v.run_id
                     JOIN experiment_runs er ON er.run_id = r.id
                     WHERE er.experiment_id = $1 AND er.version = $2
                     ORDER BY er.position, r.seed, v.metric, v.step, v.feature_net, v.settings",
                )
                .bind(experiment_id)
                .bind(version)
                .fetch_all(self.pool())
                .await?,
            )
        })?;
        rows.into_iter().map(EvalRecord::try_from).collect()
    }

    /// Records an artifact of run `run_id`; one with the same kind and path is replaced
    /// (sha256, size, time). Its id.
    pub fn insert_artifact(
        &self,
        run_id: i64,
        kind: &str,
        path: &str,
        sha256: &str,
        bytes: i64,
    ) -> Result<i64> {
        self.block_on(async {
            let mut tx = self.write_tx().await?;
            let id: i64 = sqlx::query_scalar(self.sql("INSERT INTO artifacts (run_id, kind, path, sha256, bytes)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (run_id, kind, path) DO UPDATE
                 SET sha256 = excluded.sha256, bytes = excluded.bytes, created_at = {now} RETURNING id"))
            .bind(run_id)
            .bind(kind)
            .bind(path)
            .bind(sha256)
            .bind(bytes)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(id)
        })
    }

    /// The artifacts of run `run_id`, oldest first.
    pub fn artifacts(&self, run_id: i64) -> Result<Vec<ArtifactRow>> {
        self.block_on(async {
            Ok(sqlx::query_as(
                "SELECT id, run_id, kind, path, sha256, bytes, created_at
                 FROM artifacts WHERE run_id = $1 ORDER BY id",
            )
            .bind(run_id)
            .fetch_all(self.pool())
            .await?)
        })
    }
}
