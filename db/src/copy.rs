//! Copying a whole history from one tracking database to another (`ablate db copy`), e.g. from
//! a SQLite file to a Postgres server when a project outgrows one machine.

use sqlx::Row;

use crate::{Backend, Db, Error, Result};

/// How a column is read and bound.
#[derive(Clone, Copy)]
enum Kind {
    Int,
    Real,
    Text,
}
use Kind::{Int, Real, Text};

/// Every table, parents before children, with its columns.
const TABLES: &[(&str, &[(&str, Kind)])] = &[
    (
        "experiments",
        &[
            ("id", Int),
            ("name", Text),
            ("spec_path", Text),
            ("spec_toml", Text),
            ("created_at", Text),
        ],
    ),
    (
        "experiment_versions",
        &[
            ("experiment_id", Int),
            ("version", Int),
            ("config_hash", Text),
            ("spec_toml", Text),
            ("created_at", Text),
        ],
    ),
    (
        "runs",
        &[
            ("id", Int),
            ("hash", Text),
            ("kind", Text),
            ("name", Text),
            ("cell", Text),
            ("arm", Text),
            ("seed", Int),
            ("params", Text),
            ("status", Text),
            ("stage", Text),
            ("created_at", Text),
            ("started_at", Text),
            ("ended_at", Text),
            ("git_commit", Text),
            ("git_dirty", Int),
            ("host", Text),
            ("device", Text),
            ("version", Text),
            ("pid", Int),
            ("error", Text),
        ],
    ),
    (
        "experiment_runs",
        &[
            ("experiment_id", Int),
            ("version", Int),
            ("run_id", Int),
            ("position", Int),
        ],
    ),
    (
        "metrics",
        &[
            ("id", Int),
            ("run_id", Int),
            ("key", Text),
            ("step", Int),
            ("value", Real),
            ("wall_time", Real),
        ],
    ),
    (
        "evals",
        &[
            ("id", Int),
            ("run_id", Int),
            ("step", Int),
            ("metric", Text),
            ("value", Real),
            ("sample_count", Int),
            ("feature_net", Text),
            ("settings", Text),
            ("created_at", Text),
        ],
    ),
    (
        "artifacts",
        &[
            ("id", Int),
            ("run_id", Int),
            ("kind", Text),
            ("path", Text),
            ("sha256", Text),
            ("bytes", Int),
            ("created_at", Text),
        ],
    ),
    (
        "baselines",
        &[
            ("id", Int),
            ("name", Text),
            ("experiment_id", Int),
            ("created_at", Text),
            ("payload", Text),
        ],
    ),
];

/// Rows per INSERT statement.
const ROWS_PER_INSERT: usize = 200;

impl Db {
    /// Copies every row of this database into `dest`, ids included, in one transaction of
    /// `dest` (a failure leaves it as it was); how many rows each table had. `dest` must hold no
    /// experiment yet ([`Error::Invalid`] otherwise), so that no id can collide.
    pub fn copy_into(&self, dest: &Db) -> Result<Vec<(&'static str, u64)>> {
        let existing: i64 = dest.block_on(
            sqlx::query_scalar("SELECT COUNT(*) FROM experiments").fetch_one(dest.pool()),
        )?;
        if existing > 0 {
            return Err(Error::Invalid(format!(
                "{} already holds {existing} experiment(s): copy into an empty database",
                dest.location()
            )));
        }
        let mut counts = Vec::with_capacity(TABLES.len());
        let mut tx = dest.block_on(dest.write_tx())?;
        for &(table, columns) in TABLES {
            let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
            let select = format!("SELECT {} FROM {table}", names.join(", "));
            let rows =
                self.block_on(sqlx::query(sqlx::AssertSqlSafe(select)).fetch_all(self.pool()))?;
            for chunk in rows.chunks(ROWS_PER_INSERT) {
                let width = columns.len();
                let values: Vec<String> = (0..chunk.len())
                    .map(|r| {
                        let cells: Vec<String> =
                            (1..=width).map(|c| format!("${}", r * width + c)).collect();
                        format!("({})", cells.join(", "))
                    })
                    .collect();
                let insert = format!(
                    "INSERT INTO {table} ({}) VALUES {}",
                    names.join(", "),
                    values.join(", ")
                );
                let mut query = sqlx::query(sqlx::AssertSqlSafe(insert));
                for row in chunk {
                    for (i, (name, kind)) in columns.iter().enumerate() {
                        query = match kind {
                            Int => query.bind(row.try_get::<Option<i64>, _>(i)?),
                            Real => query.bind(row.try_get::<Option<f64>, _>(i)?),
                            Text => query.bind(
                                row.try_get::<Option<String>, _>(i)
                                    .map_err(|e| Error::Invalid(format!("{table}.{name}: {e}")))?,
                            ),
                        };
                    }
                }
                dest.block_on(query.execute(&mut *tx))?;
            }
            counts.push((table, rows.len() as u64));
        }
        if dest.backend() == Backend::Postgres {
            // identities continue after the copied ids
            for &(table, columns) in TABLES {
                if columns[0].0 == "id" {
                    let reset = format!(
                        "SELECT setval(pg_get_serial_sequence('{table}', 'id'), \
                         COALESCE(MAX(id), 0) + 1, false) FROM {table}"
                    );
                    dest.block_on(sqlx::query(sqlx::AssertSqlSafe(reset)).execute(&mut *tx))?;
                }
            }
        }
        dest.block_on(tx.commit())?;
        Ok(counts)
    }
}
