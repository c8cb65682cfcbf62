//! The harness library's error: one enum over what a run, a stage or a command can fail with,
//! and the exit code each kind means. The binary (`cli`) adds its own context with anyhow and
//! takes the exit code from here.

use crate::data::DataError;
use crate::eval::EvalError;
use crate::import::CheckpointError;
use crate::spec::SpecError;
use crate::stop::Stopped;
use crate::tokenize::TokenizeError;
use crate::train::collective::CollectiveError;
use crate::train::TrainError;

/// Everything the library's stages, runner and commands can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec (file, `--set` or validation): exit code 2.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A request that cannot be served as asked (an option, a missing setting): exit code 2.
    #[error("{0}")]
    Usage(String),
    /// A reference checkpoint that cannot be imported as given: exit code 2.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A stop was asked for (SIGINT, SIGTERM): exit code 128 + the signal.
    #[error(transparent)]
    Stopped(#[from] Stopped),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error(transparent)]
    Db(#[from] db::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] models::Error),
    #[error(transparent)]
    Metric(#[from] crate::eval::metrics::MetricError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    /// A file or folder operation, with the path it was on.
    #[error("{}: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A device that cannot be used as named.
    #[error("device '{name}': {message}")]
    Device { name: String, message: String },
    /// Anything else, said in full (e.g. a rank that panicked).
    #[error("{0}")]
    Other(String),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// [`Error::File`] for `path`.
    pub fn file(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::File {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The process's exit code for this error: 128 + the signal for a stop, 2 when the request
    /// was at fault (spec, usage, a checkpoint to import), 3 when another data-parallel rank
    /// stopped first (so that rank 0 reports that rank's failure, not this echo of it), 1 for a
    /// failure of the work.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Stopped(s) => s.exit_code(),
            Error::Spec(_) | Error::Usage(_) | Error::Checkpoint(_) => 2,
            Error::Collective(_) => 3,
            _ => 1,
        }
    }
}

/// An error and its causes on one line, each cause said once: a cause whose text the message
/// already holds (library errors often print their source inside their own text) is skipped.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cause = Some(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::AlreadyExists, "File exists");
        let e = Error::file(std::path::Path::new("/x"))(io);
        assert_eq!(describe(&e), "/x: File exists");
        // the CLI's context around a library error
        let wrapped = anyhow::Error::new(Error::Usage("inner".into())).context("outer");
        assert_eq!(describe(wrapped.as_ref()), "outer: inner");
    }

    #[test]
    fn exit_codes_follow_the_kind() {
        assert_eq!(Error::Usage("x".into()).exit_code(), 2);
        assert_eq!(Error::Other("x".into()).exit_code(), 1);
        assert_eq!(Error::Stopped(Stopped(15)).exit_code(), 143);
    }
}
