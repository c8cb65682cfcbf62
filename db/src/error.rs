//! The crate's single error type.

/// Everything that can go wrong while talking to the tracking database.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A query, connection or transaction failed.
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// Applying the schema migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A JSON column held text that does not parse.
    #[error("invalid JSON in the tracking database: {0}")]
    Json(#[from] serde_json::Error),
    /// A filesystem operation (creating the database directory, the runtime) failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The SQLite file or its folder cannot be written by this user: `why` is the system's
    /// answer for the file or the folder.
    #[error(
        "the tracking database {} cannot be written ({why}); ablate writes the file and, beside \
         it, SQLite's -wal and -shm files: make the file and its folder writable, or use another \
         --root",
        path.display()
    )]
    Unwritable {
        path: std::path::PathBuf,
        why: String,
    },
    /// The database server could not be reached or refused the connection.
    #[error("{0}")]
    Connect(String),
    /// A named or numbered row (database file, experiment, run) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// An argument or a stored value is outside what the schema allows.
    #[error("invalid value: {0}")]
    Invalid(String),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
