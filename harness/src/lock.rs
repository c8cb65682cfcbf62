//! Advisory file locks (flock) that let several `ablate run` processes share one root, e.g. the
//! same command started N times on a many-core machine or as a Slurm job array over a shared
//! folder. A stage (the feature net, a tokenizer, a training) is done by whichever process takes its
//! lock first; the others run something else meanwhile, or wait and then reuse the result. The
//! operating system releases a lock when its process exits or dies, so a killed process never
//! leaves a stale lock behind.
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// A held lock; released when dropped.
#[derive(Debug)]
pub struct Lock {
    _file: File,
    pub path: PathBuf,
}

fn open(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// Take the lock at `path` if no other process holds it; None when one does.
pub fn try_lock(path: &Path) -> std::io::Result<Option<Lock>> {
    let file = open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(Lock {
            _file: file,
            path: path.to_path_buf(),
        })),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// Take the lock at `path`, waiting for the process that holds it.
pub fn lock(path: &Path) -> std::io::Result<Lock> {
    let file = open(path)?;
    file.lock()?;
    Ok(Lock {
        _file: file,
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// flock locks belong to an open file description: a second open of the same path in this
    /// process contends like another process would.
    #[test]
    fn a_held_lock_is_refused_until_dropped() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("locks/x.lock");
        let held = try_lock(&path)?.expect("free at first");
        assert!(try_lock(&path)?.is_none(), "held elsewhere");
        drop(held);
        let again = try_lock(&path)?;
        assert!(again.is_some(), "released on drop");
        drop(again);
        let _blocking = lock(&path)?;
        assert!(try_lock(&path)?.is_none());
        Ok(())
    }
}
