//! `db`: the tracking database of `ablate`, and the only crate in the workspace that speaks SQL.
//!
//! It records experiments, runs (identified by the content hash of their resolved
//! configuration and shareable between experiments), metric histories, evaluations, artifacts
//! and pinned baselines in SQLite through sqlx, with the schema kept as migrations in
//! `db/migrations/` and applied on every open. It knows nothing of models.
//!
//! The API is synchronous: [`Db`] owns a current-thread tokio runtime and a small connection
//! pool, and every method blocks on its query. Do not call it from inside an async runtime.
//!
//! Concurrency: the database runs in WAL mode with a 30 s busy timeout, and every write
//! transaction starts with `BEGIN IMMEDIATE`, so several processes (or threads, each with its
//! own [`Db`]) can write to one file without "database is locked" errors. Committed rows
//! survive a killed process.
//!
//! Conventions: timestamps are RFC 3339 UTC text with milliseconds
//! (`2025-01-31T12:00:00.123Z`); JSON columns hold text with sorted object keys; a NaN metric or
//! eval value is stored as NULL and read back as NaN.

mod error;
mod evals;
mod experiments;
mod metrics;
mod model;
mod runs;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

pub use error::{Error, Result};
pub use metrics::MetricWriter;
pub use model::{
    ArtifactRow, EvalRecord, ExperimentRow, MetricPoint, MetricRecord, NewEval, NewRun, RunRow,
    RunStatus, RUN_KINDS,
};

/// SQL expression for "now" as RFC 3339 UTC text with milliseconds.
macro_rules! now_sql {
    () => {
        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
    };
}
pub(crate) use now_sql;

/// How long a connection waits for another writer's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections per [`Db`]; SQLite has one writer at a time, so more would not help.
const MAX_CONNECTIONS: u32 = 4;

/// A handle on the tracking database. Cheap to share by reference across threads; each
/// process (or thread) that wants its own connections may also open its own.
#[derive(Debug)]
pub struct Db {
    pool: SqlitePool,
    rt: tokio::runtime::Runtime,
    path: PathBuf,
}

impl Db {
    /// Opens the database at `path`, creating the file and its parent directory if missing,
    /// and applies pending migrations.
    pub fn open(path: &Path) -> Result<Db> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("creating directory {}: {e}", parent.display()),
                ))
            })?;
        }
        Db::connect(path, true)
    }

    /// Opens an existing database at `path` and applies pending migrations; a
    /// [`Error::NotFound`] naming the path if there is no such file.
    pub fn open_existing(path: &Path) -> Result<Db> {
        if !path.is_file() {
            return Err(Error::NotFound(format!(
                "tracking database {} does not exist",
                path.display()
            )));
        }
        Db::connect(path, false)
    }

    /// The file this handle was opened on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The root: the folder holding the database file, which artifact paths are relative to.
    pub fn root(&self) -> PathBuf {
        match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// Where a stored artifact path points: relative paths (what the harness records) are
    /// relative to [`Db::root`], so a root can be moved and reports rebuilt from anywhere;
    /// absolute paths stand as they are.
    pub fn resolve(&self, stored: &str) -> PathBuf {
        let p = Path::new(stored);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.root().join(p)
        }
    }

    fn connect(path: &Path, create: bool) -> Result<Db> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(create)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        // Several processes opening a fresh file at the same moment can see SQLITE_BUSY while
        // one of them switches the file to WAL (that switch does not always wait on the busy
        // handler); retry the open with a growing pause instead of failing.
        let mut attempt = 0u64;
        let pool = loop {
            match rt.block_on(Self::connect_pool(options.clone())) {
                Err(e) if attempt < 40 && e.to_string().contains("database is locked") => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10 * attempt));
                }
                Err(e) => {
                    // SQLite says only "unable to open database file" (or "readonly database")
                    // when the file or its folder cannot be written; say which and what to do
                    return Err(match unwritable(path) {
                        Some(why) => Error::Io(std::io::Error::new(
                            std::io::ErrorKind::PermissionDenied,
                            format!(
                                "the tracking database {} cannot be written ({why}); ablate \
                                 writes the file and, beside it, SQLite's -wal and -shm files: \
                                 make the file and its folder writable, or use another --root",
                                path.display()
                            ),
                        )),
                        None => e,
                    });
                }
                Ok(pool) => break pool,
            }
        };
        Ok(Db {
            pool,
            rt,
            path: path.to_path_buf(),
        })
    }

    async fn connect_pool(options: SqliteConnectOptions) -> Result<SqlitePool> {
        {
            let pool = SqlitePoolOptions::new()
                .max_connections(MAX_CONNECTIONS)
                .connect_with(options)
                .await?;
            // The migrator takes no lock on SQLite; running it inside an IMMEDIATE transaction
            // (its own transactions nest as savepoints) serialises concurrent openers, so a
            // second process sees the first one's migrations instead of re-applying them.
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
            sqlx::migrate!("./migrations").run(&mut tx).await?;
            tx.commit().await?;
            Ok::<_, Error>(pool)
        }
    }

    /// Runs `fut` to completion on this handle's runtime.
    pub(crate) fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.rt.block_on(fut)
    }

    /// Begins a write transaction that takes the write lock up front (waiting up to the busy
    /// timeout), so it can never fail later on a read-to-write lock upgrade.
    pub(crate) async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The id of experiment `name`, or [`Error::NotFound`].
    /// The latest version of experiment `experiment_id` (1 when none is recorded).
    pub(crate) async fn latest_version(&self, experiment_id: i64) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE(MAX(version), 1) FROM experiment_versions WHERE experiment_id = ?1",
        )
        .bind(experiment_id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Version `version` of experiment `name` (its id and the version number; the latest when
    /// `None`). [`Error::NotFound`] for an unknown experiment or version.
    pub(crate) async fn require_version(
        &self,
        name: &str,
        version: Option<i64>,
    ) -> Result<(i64, i64)> {
        let id = self.require_experiment(name).await?;
        let latest = self.latest_version(id).await?;
        match version {
            None => Ok((id, latest)),
            Some(v) if (1..=latest).contains(&v) => Ok((id, v)),
            Some(v) => Err(Error::NotFound(format!(
                "version {v} of experiment '{name}' (it has versions 1 to {latest})"
            ))),
        }
    }

    pub(crate) async fn require_experiment(&self, name: &str) -> Result<i64> {
        sqlx::query_scalar("SELECT id FROM experiments WHERE name = ?1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::NotFound(format!("experiment '{name}'")))
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        // Return every connection and close them cleanly (checkpointing the WAL). Blocking is
        // impossible inside another runtime; the connections then close as the pool drops.
        if tokio::runtime::Handle::try_current().is_err() {
            self.rt.block_on(self.pool.close());
        }
    }
}

/// Why the database file at `path` or its folder cannot be written, if one of them cannot: the
/// file is opened for appending (nothing is written) and a probe file is created and removed in
/// the folder.
fn unwritable(path: &Path) -> Option<String> {
    use std::fs::OpenOptions;
    if path.exists() {
        if let Err(e) = OpenOptions::new().append(true).open(path) {
            return Some(format!("{}: {e}", path.display()));
        }
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let probe = dir.join(format!(".ablate-write-probe-{}", std::process::id()));
    match OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            None
        }
        Err(e) => Some(format!("folder {}: {e}", dir.display())),
    }
}
