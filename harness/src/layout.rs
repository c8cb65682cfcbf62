//! Where everything lives under the root folder: the database, caches, run artifacts, locks and
//! reports.
use std::path::{Path, PathBuf};

use db::Db;

/// The standard Inception weight file's name, looked for under `ROOT/weights/` when no file is
/// given.
pub const STANDARD_WEIGHTS: &str = "pt_inception-2015-12-05-6726825d.pth";

/// Where things live: `root/ablate.sqlite`, `root/cache/…`, `root/artifacts/HASH/…`, `root/reports/NAME/…`.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    /// A Postgres tracking database (`--db`) in place of `root/ablate.sqlite`.
    pub db_url: Option<String>,
}

impl Layout {
    /// Where the Inception weights are: `given`, else `ROOT/weights/pt_inception-….pth`.
    pub fn inception_weights(&self, given: Option<&Path>) -> crate::Result<PathBuf> {
        if let Some(p) = given {
            return Ok(p.to_path_buf());
        }
        let default = self.root.join("weights").join(STANDARD_WEIGHTS);
        if default.is_file() {
            return Ok(default);
        }
        Err(crate::Error::Usage(format!(
            "no Inception-v3 weights: pass --weights FILE ({STANDARD_WEIGHTS}, from \
             github.com/mseitzer/pytorch-fid releases, or a safetensors copy) or put the file at {}",
            default.display()
        )))
    }

    /// The SQLite tracking database's file (unused when [`Layout::db_url`] is set).
    pub fn db(&self) -> PathBuf {
        self.root.join("ablate.sqlite")
    }

    /// Opens the tracking database, creating the SQLite file if missing.
    pub fn open_db(&self) -> db::Result<Db> {
        match &self.db_url {
            Some(url) => Db::open_postgres(url, &self.root),
            None => Db::open(&self.db()),
        }
    }

    /// Opens a tracking database that must already exist ([`db::Error::NotFound`] when the
    /// SQLite file does not).
    pub fn open_existing_db(&self) -> db::Result<Db> {
        match &self.db_url {
            Some(url) => Db::open_postgres(url, &self.root),
            None => Db::open_existing(&self.db()),
        }
    }

    /// Opens the tracking database for commands that only read it: where the SQLite file (or its
    /// folder) cannot be written, read-only instead ([`Db::open_read_only`]).
    pub fn open_db_to_read(&self) -> db::Result<Db> {
        match self.open_existing_db() {
            Err(db::Error::Unwritable { .. }) if self.db_url.is_none() => {
                Db::open_read_only(&self.db())
            }
            other => other,
        }
    }

    /// The tracking database for messages: the SQLite file, or the URL without its password.
    pub fn db_location(&self) -> String {
        match &self.db_url {
            Some(url) => db::redact(url),
            None => self.db().display().to_string(),
        }
    }

    /// Whether there may be a tracking database to read (always, with a server).
    pub fn has_db(&self) -> bool {
        self.db_url.is_some() || self.db().exists()
    }
    pub fn tokenizer(&self, hash: &str) -> PathBuf {
        self.root
            .join("cache/tokenizers")
            .join(format!("{hash}.safetensors"))
    }
    /// Checkpoints of a tokenizer fit in progress (removed once the tokenizer is saved).
    pub fn tokenizer_checkpoints(&self, hash: &str) -> PathBuf {
        self.root
            .join("cache/tokenizers")
            .join(format!("{hash}.ckpt"))
    }
    pub fn classifier(&self, hash: &str) -> PathBuf {
        self.root
            .join("cache/classifiers")
            .join(format!("{hash}.safetensors"))
    }
    /// Reference statistics (and features) of a split, per data set, feature net and convention.
    pub fn reference_stats(&self, key: &str) -> PathBuf {
        self.root.join("cache/stats").join(format!("{key}.npz"))
    }
    /// The lock file of a run, a training or a shared stage (see [`crate::lock`]).
    pub fn lock(&self, name: &str) -> PathBuf {
        self.root.join("locks").join(format!("{name}.lock"))
    }
    pub fn run_dir(&self, hash: &str) -> PathBuf {
        self.root.join("artifacts").join(hash)
    }
    /// `reports/NAME`, with characters other than ASCII letters, digits, '-' and '_' replaced by
    /// '_'. When that changed the name, a short hash of the real name follows, so that two names
    /// that read alike after replacing ("名前", "日本") do not share (and overwrite) one folder.
    pub fn report_dir(&self, experiment: &str) -> PathBuf {
        let safe: String = experiment
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let folder = if safe == experiment {
            safe
        } else {
            let digest = crate::identity::content_hash(&serde_json::Value::from(experiment));
            format!("{safe}-{}", &digest[..8])
        };
        self.root.join("reports").join(folder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_folders_of_different_names_differ() {
        let layout = Layout {
            root: PathBuf::from("r"),
            db_url: None,
        };
        assert_eq!(layout.report_dir("tiny"), PathBuf::from("r/reports/tiny"));
        let (a, b) = (layout.report_dir("名前"), layout.report_dir("日本"));
        assert_ne!(
            a, b,
            "names that read alike after replacing get their own folders"
        );
        let a = a
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        assert!(a.starts_with("__-") && a.len() == 11, "{a}");
        assert_eq!(
            layout.report_dir("名前"),
            layout.report_dir("名前"),
            "stable"
        );
    }
}
