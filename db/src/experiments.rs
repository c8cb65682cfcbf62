//! Experiments and the baselines pinned to them.

use crate::model::{canonical_json, ExperimentRow};
use crate::{Db, Error, Result};

impl Db {
    /// Registers experiment `name`, or updates its spec path and text if it exists; its id.
    pub fn upsert_experiment(&self, name: &str, spec_path: &str, spec_toml: &str) -> Result<i64> {
        self.block_on(async {
            let mut tx = self.write_tx().await?;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO experiments (name, spec_path, spec_toml) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE
                 SET spec_path = excluded.spec_path, spec_toml = excluded.spec_toml
                 RETURNING id",
            )
            .bind(name)
            .bind(spec_path)
            .bind(spec_toml)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(id)
        })
    }

    /// The version of experiment `experiment_id` whose resolved configuration hashes to
    /// `config_hash`: its latest version when that one has this configuration, else a new
    /// version (the next number), which becomes the latest. Runs created from now on are linked
    /// to it.
    pub fn experiment_version(
        &self,
        experiment_id: i64,
        config_hash: &str,
        spec_toml: &str,
    ) -> Result<i64> {
        self.block_on(async {
            let mut tx = self.write_tx().await?;
            let latest: Option<(i64, String)> = sqlx::query_as(
                "SELECT version, config_hash FROM experiment_versions
                 WHERE experiment_id = $1 ORDER BY version DESC LIMIT 1",
            )
            .bind(experiment_id)
            .fetch_optional(&mut *tx)
            .await?;
            let version = match latest {
                Some((v, hash)) if hash == config_hash => v,
                other => {
                    let next = other.map_or(1, |(v, _)| v + 1);
                    sqlx::query(
                        "INSERT INTO experiment_versions (experiment_id, version, config_hash,
                                                          spec_toml)
                         VALUES ($1, $2, $3, $4)",
                    )
                    .bind(experiment_id)
                    .bind(next)
                    .bind(config_hash)
                    .bind(spec_toml)
                    .execute(&mut *tx)
                    .await?;
                    next
                }
            };
            tx.commit().await?;
            Ok(version)
        })
    }

    /// The versions of experiment `name`: (version, created_at, runs linked), oldest first.
    pub fn experiment_versions(&self, name: &str) -> Result<Vec<(i64, String, i64)>> {
        self.block_on(async {
            let id = self.require_experiment(name).await?;
            Ok(sqlx::query_as(
                "SELECT v.version, v.created_at,
                        (SELECT COUNT(*) FROM experiment_runs er
                         WHERE er.experiment_id = v.experiment_id AND er.version = v.version)
                 FROM experiment_versions v WHERE v.experiment_id = $1 ORDER BY v.version",
            )
            .bind(id)
            .fetch_all(self.pool())
            .await?)
        })
    }

    /// The id of experiment `name`, if registered.
    pub fn experiment_id(&self, name: &str) -> Result<Option<i64>> {
        self.block_on(async {
            Ok(
                sqlx::query_scalar("SELECT id FROM experiments WHERE name = $1")
                    .bind(name)
                    .fetch_optional(self.pool())
                    .await?,
            )
        })
    }

    /// The spec (path, TOML text) stored for experiment `name`, if registered.
    pub fn experiment_spec(&self, name: &str) -> Result<Option<(String, String)>> {
        self.block_on(async {
            Ok(
                sqlx::query_as("SELECT spec_path, spec_toml FROM experiments WHERE name = $1")
                    .bind(name)
                    .fetch_optional(self.pool())
                    .await?,
            )
        })
    }

    /// Every experiment with its linked and finished run counts, oldest first.
    pub fn list_experiments(&self) -> Result<Vec<ExperimentRow>> {
        self.block_on(async {
            // counts of the latest version
            Ok(sqlx::query_as(
                "SELECT e.id, e.name, e.spec_path, e.created_at,
                        COALESCE((SELECT MAX(version) FROM experiment_versions
                                  WHERE experiment_id = e.id), 1) AS version,
                        COUNT(r.id) AS runs,
                        COALESCE(SUM(CASE WHEN r.status = 'finished' THEN 1 ELSE 0 END), 0) AS finished
                 FROM experiments e
                 LEFT JOIN experiment_runs er ON er.experiment_id = e.id
                      AND er.version = COALESCE((SELECT MAX(version) FROM experiment_versions
                                                 WHERE experiment_id = e.id), 1)
                 LEFT JOIN runs r ON r.id = er.run_id
                 GROUP BY e.id
                 ORDER BY e.id",
            )
            .fetch_all(self.pool())
            .await?)
        })
    }

    /// Pins (or replaces) baseline `name` of `experiment`; its id. [`Error::NotFound`] if the
    /// experiment is not registered.
    pub fn pin_baseline(
        &self,
        experiment: &str,
        name: &str,
        payload: &serde_json::Value,
    ) -> Result<i64> {
        let payload = canonical_json(payload);
        self.block_on(async {
            let mut tx = self.write_tx().await?;
            let experiment_id: i64 =
                sqlx::query_scalar("SELECT id FROM experiments WHERE name = $1")
                    .bind(experiment)
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("experiment '{experiment}'")))?;
            let id: i64 = sqlx::query_scalar(self.sql(
                "INSERT INTO baselines (name, experiment_id, payload) VALUES ($1, $2, $3)
                 ON CONFLICT (name, experiment_id) DO UPDATE
                 SET payload = excluded.payload, created_at = {now} RETURNING id",
            ))
            .bind(name)
            .bind(experiment_id)
            .bind(payload)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(id)
        })
    }

    /// The payload of baseline `name` of `experiment`; `None` if either is missing.
    pub fn baseline(&self, experiment: &str, name: &str) -> Result<Option<serde_json::Value>> {
        let payload: Option<String> = self.block_on(async {
            sqlx::query_scalar(
                "SELECT b.payload FROM baselines b
                 JOIN experiments e ON e.id = b.experiment_id
                 WHERE e.name = $1 AND b.name = $2",
            )
            .bind(experiment)
            .bind(name)
            .fetch_optional(self.pool())
            .await
        })?;
        payload
            .map(|text| serde_json::from_str(&text).map_err(Error::from))
            .transpose()
    }
}
