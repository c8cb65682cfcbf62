//! `db`: the tracking database of `ablate`, and the only crate in the workspace that speaks SQL.
//!
//! It records experiments, runs (identified by the content hash of their resolved
//! configuration and shareable between experiments), metric histories, evaluations, artifacts
//! and pinned baselines, through sqlx's `Any` driver in one of two backends ([`Backend`]): a
//! SQLite file (the default, `db/migrations/`) or a PostgreSQL server shared by several machines
//! (`db/migrations-postgres/`, the same schema in Postgres's types). Migrations are applied on
//! every open. The SQL is written once for both: numbered parameters (`$1`), `ON CONFLICT`
//! upserts, and `{now}` for the server's clock (see `Db::sql`). It knows nothing of models.
//!
//! The API is synchronous: [`Db`] owns a current-thread tokio runtime and a small connection
//! pool, and every method blocks on its query. Do not call it from inside an async runtime.
//!
//! Concurrency: every write transaction takes the database's write lock first (SQLite:
//! `BEGIN IMMEDIATE` in WAL mode with a 30 s busy timeout; Postgres: a transaction-scoped
//! advisory lock), so several processes (or threads, each with its own [`Db`]) write one at a
//! time and never see "database is locked". Committed rows survive a killed process. On Postgres,
//! [`Db::advisory_lock`] gives the harness named locks that the server releases when their
//! process dies.
//!
//! Conventions: timestamps are RFC 3339 UTC text with milliseconds
//! (`2025-01-31T12:00:00.123Z`); JSON columns hold text with sorted object keys; a NaN metric or
//! eval value is stored as NULL and read back as NaN.
//!
//! [`files`] writes the files under the root that the database records or that reports write,
//! durably (temporary, fsync, rename, fsync of the folder), and hashes them in a stream.

mod copy;
mod error;
mod evals;
mod experiments;
pub mod files;
mod metrics;
mod model;
mod runs;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyConnection, AnyPool};
use sqlx::{AssertSqlSafe, Connection, Executor};

pub use error::{Error, Result};
pub use metrics::MetricWriter;
pub use model::{
    ArtifactRow, EvalRecord, ExperimentRow, MetricPoint, MetricRecord, NewEval, NewRun,
    RunDescriptor, RunKind, RunRow, RunStatus,
};
pub use model::{ARM_CROSS_ENTROPY, ARM_DIFFUSION};

/// How long a connection waits for another writer's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections per [`Db`]; SQLite has one writer at a time, so more would not help.
const MAX_CONNECTIONS: u32 = 4;
/// The Postgres advisory lock every write transaction takes first, so that writers run one at a
/// time as they do on SQLite (whose `BEGIN IMMEDIATE` takes the file's write lock).
const PG_WRITER_LOCK: i64 = 0x61_626c_6174_6500; // "ablate\0"

/// Which server holds the tracking database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file under the root (the default).
    Sqlite,
    /// A PostgreSQL server, shared by several machines.
    Postgres,
}

/// A handle on the tracking database. Cheap to share by reference across threads; each
/// process (or thread) that wants its own connections may also open its own.
#[derive(Debug)]
pub struct Db {
    pool: AnyPool,
    rt: tokio::runtime::Runtime,
    backend: Backend,
    /// The SQLite file, or the Postgres URL with its password removed.
    location: String,
    /// The folder that stored artifact paths are relative to.
    root: PathBuf,
    /// The Postgres URL (with its password), for the advisory locks' own connections.
    url: Option<String>,
    /// Opened with [`Db::open_read_only`]: every write fails.
    read_only: bool,
}

impl Db {
    /// Opens the database at `path`, creating the file and its parent directory if missing,
    /// and applies pending migrations.
    pub fn open(path: &Path) -> Result<Db> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            crate::files::create_folder(parent).map_err(|e| {
                Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("creating directory {}: {e}", parent.display()),
                ))
            })?;
        }
        Db::connect_sqlite(path, true)
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
        Db::connect_sqlite(path, false)
    }

    /// Opens an existing SQLite database only to read it, for a root this user cannot write (a
    /// teammate's results, a read-only mount): nothing is written, not even SQLite's -shm file
    /// (`immutable`, so nothing may write the file meanwhile). Its migrations must all be
    /// applied ([`Error::Invalid`] otherwise: open it once where it can be written).
    pub fn open_read_only(path: &Path) -> Result<Db> {
        if !path.is_file() {
            return Err(Error::NotFound(format!(
                "tracking database {} does not exist",
                path.display()
            )));
        }
        sqlx::any::install_default_drivers();
        let rt = runtime()?;
        let url = format!("sqlite://{}?mode=ro&immutable=1", path.display());
        let pool = rt.block_on(async {
            let pool = AnyPoolOptions::new()
                .max_connections(MAX_CONNECTIONS)
                .connect(&url)
                .await?;
            let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
                .fetch_one(&pool)
                .await?;
            let known = sqlx::migrate!("./migrations").migrations.len() as i64;
            if applied < known {
                return Err(Error::Invalid(format!(
                    "{} was written by an older ablate ({applied} of {known} schema migrations): \
                     open it once where it can be written, to bring it up to date",
                    path.display()
                )));
            }
            Ok::<_, Error>(pool)
        })?;
        Ok(Db {
            pool,
            rt,
            backend: Backend::Sqlite,
            location: format!("{} (read-only)", path.display()),
            root: folder_of(path),
            url: None,
            read_only: true,
        })
    }

    /// Opens the tracking database on the PostgreSQL server at `url`
    /// (`postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`) and applies pending migrations;
    /// stored artifact paths are relative to `root`, the folder the machines share.
    pub fn open_postgres(url: &str, root: &Path) -> Result<Db> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(Error::Invalid(format!(
                "database URL '{}': expected postgres://USER@HOST[:PORT]/DATABASE",
                redact(url)
            )));
        }
        sqlx::any::install_default_drivers();
        let rt = runtime()?;
        let pool = rt
            .block_on(async {
                // one plain connection first: the pool would retry a refused one until its
                // timeout, and a server that is down or a wrong URL should be said at once
                AnyConnection::connect(url).await?.close().await?;
                let pool = AnyPoolOptions::new()
                    .max_connections(MAX_CONNECTIONS)
                    .acquire_timeout(BUSY_TIMEOUT)
                    .connect(url)
                    .await?;
                // the Postgres migrator serialises concurrent openers with its own advisory lock
                sqlx::migrate!("./migrations-postgres").run(&pool).await?;
                Ok::<_, Error>(pool)
            })
            .map_err(|e| match e {
                Error::Sqlx(e) => Error::Connect(format!(
                    "the tracking database {} cannot be opened: {e}; check that the server is \
                     running, the URL's user, password and database, and that the database exists \
                     (createdb NAME)",
                    redact(url)
                )),
                other => other,
            })?;
        Ok(Db {
            pool,
            rt,
            backend: Backend::Postgres,
            location: redact(url),
            root: root.to_path_buf(),
            url: Some(url.to_owned()),
            read_only: false,
        })
    }

    /// Where this handle is connected: the SQLite file, or the Postgres URL without its password.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Whether this handle was opened with [`Db::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Which server holds this database.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The root: the folder that artifact paths are relative to (for SQLite, the folder holding
    /// the database file).
    pub fn root(&self) -> PathBuf {
        self.root.clone()
    }

    /// Where a stored artifact path points: relative paths (what the harness records) are
    /// relative to [`Db::root`], so a root can be moved and reports rebuilt from anywhere;
    /// absolute paths stand as they are.
    pub fn resolve(&self, stored: &str) -> PathBuf {
        let p = Path::new(stored);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.root.join(p)
        }
    }

    fn connect_sqlite(path: &Path, create: bool) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let rt = runtime()?;
        let url = format!(
            "sqlite://{}?mode={}",
            path.display(),
            if create { "rwc" } else { "rw" }
        );
        // Several processes opening a fresh file at the same moment can see SQLITE_BUSY while
        // one of them switches the file to WAL (that switch does not always wait on the busy
        // handler); retry the open with a growing pause instead of failing.
        let mut attempt = 0u64;
        let pool = loop {
            match rt.block_on(Self::connect_sqlite_pool(&url)) {
                Err(e) if attempt < 40 && e.to_string().contains("database is locked") => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10 * attempt));
                }
                Err(e) => {
                    // SQLite says only "unable to open database file" (or "readonly database")
                    // when the file or its folder cannot be written; say which and what to do
                    return Err(match unwritable(path) {
                        Some(why) => Error::Unwritable {
                            path: path.to_path_buf(),
                            why,
                        },
                        None => e,
                    });
                }
                Ok(pool) => break pool,
            }
        };
        Ok(Db {
            pool,
            rt,
            backend: Backend::Sqlite,
            location: path.display().to_string(),
            root: folder_of(path),
            url: None,
            read_only: false,
        })
    }

    async fn connect_sqlite_pool(url: &str) -> Result<AnyPool> {
        // WAL lets readers run beside the one writer; NORMAL syncs at checkpoints, which WAL
        // keeps consistent after a crash
        let pragmas = format!(
            "PRAGMA busy_timeout = {}; PRAGMA foreign_keys = ON; PRAGMA journal_mode = WAL; \
             PRAGMA synchronous = NORMAL;",
            BUSY_TIMEOUT.as_millis()
        );
        // one plain connection first: the pool would retry a failing one until its timeout, and
        // a file that cannot be written should be said at once
        let mut probe = AnyConnection::connect(url).await?;
        probe.execute(AssertSqlSafe(pragmas.clone())).await?;
        probe.close().await?;
        let pool = AnyPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .after_connect(move |conn, _| {
                let pragmas = pragmas.clone();
                Box::pin(async move {
                    conn.execute(AssertSqlSafe(pragmas)).await?;
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        // The migrator takes no lock on SQLite; running it inside an IMMEDIATE transaction
        // (its own transactions nest as savepoints) serialises concurrent openers, so a
        // second process sees the first one's migrations instead of re-applying them.
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::migrate!("./migrations").run(&mut *tx).await?;
        tx.commit().await?;
        Ok(pool)
    }

    /// Runs `fut` to completion on this handle's runtime.
    pub(crate) fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.rt.block_on(fut)
    }

    /// Begins a write transaction that takes the write lock up front, so that writers run one at
    /// a time: on SQLite `BEGIN IMMEDIATE` (waiting up to the busy timeout, and never failing
    /// later on a read-to-write upgrade), on Postgres a transaction-scoped advisory lock.
    pub(crate) async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        match self.backend {
            Backend::Sqlite => Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?),
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(PG_WRITER_LOCK)
                    .execute(&mut *tx)
                    .await?;
                Ok(tx)
            }
        }
    }

    /// SQLite's `PRAGMA integrity_check` over the whole file: empty when it answers "ok",
    /// otherwise each problem it lists. [`Error::Invalid`] on Postgres, which checks its own
    /// storage.
    pub fn integrity_check(&self) -> Result<Vec<String>> {
        if self.backend != Backend::Sqlite {
            return Err(Error::Invalid(
                "integrity_check is SQLite's; a Postgres server checks its own storage".into(),
            ));
        }
        let lines: Vec<String> = self.block_on(async {
            sqlx::query_scalar("PRAGMA integrity_check")
                .fetch_all(self.pool())
                .await
        })?;
        // one row per problem, or (as sqlx returns it here) one row of newline-separated lines
        Ok(lines
            .iter()
            .flat_map(|l| l.lines())
            .filter(|l| *l != "ok" && !l.starts_with("*** in database"))
            .map(str::to_string)
            .collect())
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// `sql` with `{now}` replaced by this server's expression for the current time as RFC 3339
    /// UTC text with milliseconds (`2025-01-31T12:00:00.123Z`), the format of every timestamp.
    pub(crate) fn sql(&self, sql: &str) -> AssertSqlSafe<String> {
        let now = match self.backend {
            Backend::Sqlite => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
            Backend::Postgres => {
                "to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
            }
        };
        AssertSqlSafe(sql.replace("{now}", now))
    }

    /// Takes the advisory lock `name` on the Postgres server if no other session holds it (None
    /// when one does), or waits for it (`wait`). The lock lives on a connection of its own and is
    /// released when the returned value is dropped, or by the server when the process dies.
    /// [`Error::Invalid`] on SQLite, whose locks are files beside it.
    pub fn advisory_lock(&self, name: &str, wait: bool) -> Result<Option<AdvisoryLock>> {
        let Some(url) = self.url.as_deref() else {
            return Err(Error::Invalid(format!(
                "advisory lock '{name}': only a Postgres tracking database has advisory locks"
            )));
        };
        // its own runtime and connection, so that the lock outlives any borrow of this handle
        let rt = runtime()?;
        let conn = rt.block_on(async {
            let mut conn = AnyConnection::connect(url).await?;
            // the server hashes the name to the lock's 64-bit key
            let taken: bool = if wait {
                sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
                    .bind(name)
                    .execute(&mut conn)
                    .await?;
                true
            } else {
                sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                    .bind(name)
                    .fetch_one(&mut conn)
                    .await?
            };
            Ok::<_, Error>(taken.then_some(conn))
        })?;
        Ok(conn.map(|conn| AdvisoryLock {
            rt,
            conn: Some(conn),
            name: name.to_owned(),
        }))
    }

    /// The latest version of experiment `experiment_id` (1 when none is recorded).
    pub(crate) async fn latest_version(&self, experiment_id: i64) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE(MAX(version), 1) FROM experiment_versions WHERE experiment_id = $1",
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
        sqlx::query_scalar("SELECT id FROM experiments WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::NotFound(format!("experiment '{name}'")))
    }
}

/// A held Postgres advisory lock (see [`Db::advisory_lock`]): a connection of its own, closed
/// (which releases the lock) when dropped.
#[derive(Debug)]
pub struct AdvisoryLock {
    rt: tokio::runtime::Runtime,
    conn: Option<AnyConnection>,
    name: String,
}

impl AdvisoryLock {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for AdvisoryLock {
    fn drop(&mut self) {
        // Closing the session releases its advisory locks; inside another runtime (where
        // blocking is impossible) dropping the socket does the same once the server notices.
        if let Some(conn) = self.conn.take() {
            if tokio::runtime::Handle::try_current().is_err() {
                let _ = self.rt.block_on(conn.close());
            }
        }
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

/// The folder holding the file at `path` (`.` for a bare file name): a SQLite database's root.
fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The current-thread runtime each handle blocks on.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `url` with its password replaced by `***`, for messages and the stored location.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Why the database file at `path` or its folder cannot be written, if one of them cannot: the
/// file is opened for appending (nothing is written) and a probe file is created and removed in
/// the folder.
fn unwritable(path: &Path) -> Option<String> {
    use std::fs::OpenOptions;
    if path.exists() {
        if let Err(e) = OpenOptions::new().append(true).open(path) {
            return Some(e.to_string());
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
