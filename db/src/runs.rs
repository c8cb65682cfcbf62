//! Runs: registration, lifecycle and listing.

use crate::model::{canonical_json, RunRaw};
use crate::{Db, Error, NewRun, Result, RunRow};

/// The `runs` columns in [`RunRaw`] order, for a table aliased `r`.
macro_rules! run_cols {
    () => {
        "r.id, r.hash, r.kind, r.name, r.cell, r.arm, r.seed, r.params, r.status, r.stage, \
         r.created_at, r.started_at, r.ended_at, r.git_commit, r.git_dirty, r.host, r.device, \
         r.version, r.pid, r.error"
    };
}

fn to_rows(raw: Vec<RunRaw>) -> Result<Vec<RunRow>> {
    raw.into_iter().map(RunRow::try_from).collect()
}

impl Db {
    /// The run with content hash `hash`, if registered.
    pub fn run_by_hash(&self, hash: &str) -> Result<Option<RunRow>> {
        let raw: Option<RunRaw> = self.block_on(async {
            sqlx::query_as(concat!(
                "SELECT ",
                run_cols!(),
                " FROM runs r WHERE r.hash = $1"
            ))
            .bind(hash)
            .fetch_optional(self.pool())
            .await
        })?;
        raw.map(RunRow::try_from).transpose()
    }

    /// The run with id `id`, if any.
    pub fn run(&self, id: i64) -> Result<Option<RunRow>> {
        let raw: Option<RunRaw> = self.block_on(async {
            sqlx::query_as(concat!(
                "SELECT ",
                run_cols!(),
                " FROM runs r WHERE r.id = $1"
            ))
            .bind(id)
            .fetch_optional(self.pool())
            .await
        })?;
        raw.map(RunRow::try_from).transpose()
    }

    /// The database clock in the format of `started_at` / `ended_at` (ISO 8601, UTC, milliseconds),
    /// so that it compares with them as text.
    pub fn now(&self) -> Result<String> {
        self.block_on(async {
            Ok(sqlx::query_scalar(self.sql("SELECT {now}"))
                .fetch_one(self.pool())
                .await?)
        })
    }

    /// Registers a run as `queued` and links it to the experiment; its id.
    ///
    /// A run is identified by its hash: if the hash is already registered the existing id is
    /// returned and the row is left as it is. Either way the run is linked to `experiment_id`
    /// (at the next position in that experiment, counting from 0) unless it already is.
    /// [`Error::Invalid`] for an unknown `kind`, [`Error::NotFound`] for an unknown experiment.
    pub fn create_run(&self, experiment_id: i64, run: &NewRun) -> Result<i64> {
        self.create_run_in(experiment_id, None, run)
    }

    /// [`Db::create_run`], linking the run to version `version` of the experiment (the latest
    /// when `None`): a process that planned version 1 keeps linking its runs to version 1 while
    /// another process, started on a changed spec, has made version 2.
    pub fn create_run_in(
        &self,
        experiment_id: i64,
        version: Option<i64>,
        run: &NewRun,
    ) -> Result<i64> {
        let params = canonical_json(run.params);
        self.block_on(async {
            let mut tx = self.write_tx().await?;
            let experiment: Option<i64> =
                sqlx::query_scalar("SELECT id FROM experiments WHERE id = $1")
                    .bind(experiment_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if experiment.is_none() {
                return Err(Error::NotFound(format!("experiment id {experiment_id}")));
            }
            let existing: Option<i64> = sqlx::query_scalar("SELECT id FROM runs WHERE hash = $1")
                .bind(run.hash)
                .fetch_optional(&mut *tx)
                .await?;
            let run_id = match existing {
                Some(id) => id,
                None => {
                    sqlx::query_scalar(
                        "INSERT INTO runs (hash, kind, name, cell, arm, seed, params, status,
                                           git_commit, git_dirty, host, device, version)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8, $9, $10, $11, $12)
                         RETURNING id",
                    )
                    .bind(run.hash)
                    .bind(run.kind.as_str())
                    .bind(run.name)
                    .bind(run.cell)
                    .bind(run.arm)
                    .bind(run.seed)
                    .bind(&params)
                    .bind(run.git_commit)
                    .bind(i64::from(run.git_dirty))
                    .bind(run.host)
                    .bind(run.device)
                    .bind(run.version)
                    .fetch_one(&mut *tx)
                    .await?
                }
            };
            // linked to the version asked for, else the latest (Db::experiment_version made it)
            sqlx::query(
                "INSERT INTO experiment_runs (experiment_id, version, run_id, position)
                 SELECT $1, v.version, $2,
                        (SELECT COALESCE(MAX(position) + 1, 0) FROM experiment_runs
                         WHERE experiment_id = $1 AND version = v.version)
                 FROM (SELECT COALESCE($3, MAX(version), 1) AS version FROM experiment_versions
                       WHERE experiment_id = $1) v
                 WHERE true
                 ON CONFLICT DO NOTHING",
            )
            .bind(experiment_id)
            .bind(run_id)
            .bind(version)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(run_id)
        })
    }

    /// Marks the run `running` in process `pid` on `host`/`device`: sets `started_at` if it
    /// was never started, clears `ended_at` and `error`, and records the code state.
    pub fn start_run(
        &self,
        run_id: i64,
        pid: i64,
        host: &str,
        device: &str,
        git_commit: Option<&str>,
        git_dirty: bool,
    ) -> Result<()> {
        self.update_run(
            run_id,
            sqlx::query(self.sql("UPDATE runs SET status = 'running', started_at = COALESCE(started_at, {now}), ended_at = NULL, error = NULL, pid = $2, host = $3, device = $4,
                 git_commit = $5, git_dirty = $6
                 WHERE id = $1"))
            .bind(run_id)
            .bind(pid)
            .bind(host)
            .bind(device)
            .bind(git_commit)
            .bind(i64::from(git_dirty)),
        )
    }

    /// Adds (or replaces) the top-level entry `key` of the run's stored params: facts the
    /// harness learns while running (e.g. the built model's size), beside the resolved spec.
    pub fn set_run_param(&self, run_id: i64, key: &str, value: &serde_json::Value) -> Result<()> {
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(Error::Invalid(format!(
                "run param key: expected letters, digits and '_'; found '{key}'"
            )));
        }
        let value = value.clone();
        self.block_on(async {
            let mut tx = self.write_tx().await?;
            let params: Option<String> =
                sqlx::query_scalar("SELECT params FROM runs WHERE id = $1")
                    .bind(run_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some(params) = params else {
                return Err(Error::NotFound(format!("run id {run_id}")));
            };
            let mut params: serde_json::Value = serde_json::from_str(&params)?;
            let Some(object) = params.as_object_mut() else {
                return Err(Error::Invalid(format!(
                    "params of run id {run_id}: expected a JSON object"
                )));
            };
            object.insert(key.to_owned(), value);
            sqlx::query("UPDATE runs SET params = $2 WHERE id = $1")
                .bind(run_id)
                .bind(canonical_json(&params))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Records the stage the run is in (free text, e.g. `train`, `sample`, `eval`).
    pub fn set_stage(&self, run_id: i64, stage: &str) -> Result<()> {
        self.update_run(
            run_id,
            sqlx::query("UPDATE runs SET stage = $2 WHERE id = $1")
                .bind(run_id)
                .bind(stage),
        )
    }

    /// Marks the run `finished` at stage `done` and sets `ended_at`.
    pub fn finish_run(&self, run_id: i64) -> Result<()> {
        self.update_run(
            run_id,
            sqlx::query(self.sql("UPDATE runs SET status = 'finished', stage = 'done', error = NULL, ended_at = {now} WHERE id = $1"))
            .bind(run_id),
        )
    }

    /// Marks the run `failed` with `error` and sets `ended_at`.
    pub fn fail_run(&self, run_id: i64, error: &str) -> Result<()> {
        self.update_run(
            run_id,
            sqlx::query(self.sql(
                "UPDATE runs SET status = 'failed', error = $2, ended_at = {now} WHERE id = $1",
            ))
            .bind(run_id)
            .bind(error),
        )
    }

    /// Marks a `queued` or `running` run `interrupted` and sets `ended_at`; a run that already
    /// finished or failed is left as it is.
    pub fn mark_interrupted(&self, run_id: i64) -> Result<()> {
        self.block_on(async {
            let mut tx = self.write_tx().await?;
            let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM runs WHERE id = $1")
                .bind(run_id)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(Error::NotFound(format!("run id {run_id}")));
            }
            sqlx::query(self.sql("UPDATE runs SET status = 'interrupted', ended_at = {now} WHERE id = $1 AND status IN ('queued', 'running')"))
            .bind(run_id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Marks `interrupted` every run `running` on `host` whose pid is null or not alive
    /// according to `is_alive`; how many were marked. A run restarted under another pid
    /// between the check and the update is left alone.
    pub fn reap_dead_runs(&self, host: &str, is_alive: &dyn Fn(i64) -> bool) -> Result<usize> {
        let running: Vec<(i64, Option<i64>)> = self.block_on(async {
            sqlx::query_as("SELECT id, pid FROM runs WHERE status = 'running' AND host = $1")
                .bind(host)
                .fetch_all(self.pool())
                .await
        })?;
        let dead: Vec<(i64, Option<i64>)> = running
            .into_iter()
            .filter(|(_, pid)| pid.is_none_or(|pid| !is_alive(pid)))
            .collect();
        if dead.is_empty() {
            return Ok(0);
        }
        self.block_on(async {
            let mut tx = self.write_tx().await?;
            let mut reaped = 0;
            for (id, pid) in &dead {
                let done = sqlx::query(self.sql("UPDATE runs SET status = 'interrupted', ended_at = {now} WHERE id = $1 AND status = 'running' AND host = $2 AND pid IS NOT DISTINCT FROM $3"))
                .bind(id)
                .bind(host)
                .bind(pid)
                .execute(&mut *tx)
                .await?;
                reaped += done.rows_affected() as usize;
            }
            tx.commit().await?;
            Ok(reaped)
        })
    }

    /// Runs linked to the latest version of `experiment` in position order, or every run in id
    /// order when `None`. [`Error::NotFound`] if the experiment is not registered.
    pub fn list_runs(&self, experiment: Option<&str>) -> Result<Vec<RunRow>> {
        match experiment {
            Some(name) => self.list_version_runs(name, None),
            None => self.list_runs_in(None),
        }
    }

    /// Runs of version `version` of `experiment` (the latest when `None`), in position order.
    /// [`Error::NotFound`] if the experiment or that version does not exist.
    pub fn list_version_runs(&self, experiment: &str, version: Option<i64>) -> Result<Vec<RunRow>> {
        self.list_runs_in(Some((experiment, version)))
    }

    fn list_runs_in(&self, experiment: Option<(&str, Option<i64>)>) -> Result<Vec<RunRow>> {
        let raw: Vec<RunRaw> = self.block_on(async {
            match experiment {
                Some((name, version)) => {
                    let (experiment_id, version) = self.require_version(name, version).await?;
                    Ok::<_, Error>(
                        sqlx::query_as(concat!(
                            "SELECT ",
                            run_cols!(),
                            " FROM runs r JOIN experiment_runs er ON er.run_id = r.id
                             WHERE er.experiment_id = $1 AND er.version = $2
                             ORDER BY er.position, r.id"
                        ))
                        .bind(experiment_id)
                        .bind(version)
                        .fetch_all(self.pool())
                        .await?,
                    )
                }
                None => Ok(sqlx::query_as(concat!(
                    "SELECT ",
                    run_cols!(),
                    " FROM runs r ORDER BY r.id"
                ))
                .fetch_all(self.pool())
                .await?),
            }
        })?;
        to_rows(raw)
    }

    /// Executes a one-row UPDATE on run `run_id` in a write transaction;
    /// [`Error::NotFound`] if no such run.
    fn update_run<'q>(
        &self,
        run_id: i64,
        query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    ) -> Result<()> {
        self.block_on(async {
            let mut tx = self.write_tx().await?;
            let done = query.execute(&mut *tx).await?;
            if done.rows_affected() == 0 {
                return Err(Error::NotFound(format!("run id {run_id}")));
            }
            tx.commit().await?;
            Ok(())
        })
    }
}
