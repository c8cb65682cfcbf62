//! Advisory locks that let several `ablate run` processes share one root, e.g. the same command
//! started N times on a many-core machine or as a Slurm job array over a shared folder. A stage
//! (the feature net, a tokenizer, a training) is done by whichever process takes its lock first;
//! the others run something else meanwhile, or wait and then reuse the result.
//!
//! With the SQLite database the locks are files under `ROOT/locks/` (flock); with a Postgres
//! database they are the server's advisory locks, so machines sharing it need no POSIX locks on a
//! network file system. Either way the lock is released when its process exits or dies (the OS
//! closes the file, or the server the session), so a killed process never leaves a stale lock.
use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

use db::{Backend, Db};

use crate::layout::Layout;

/// A held lock; released when dropped.
#[derive(Debug)]
pub enum Lock {
    /// A locked file under `ROOT/locks/`.
    File(File),
    /// A Postgres advisory lock.
    Server(db::AdvisoryLock),
}

/// Take lock `name` if no other process holds it; None when one does.
pub fn try_lock(layout: &Layout, db: &Db, name: &str) -> crate::Result<Option<Lock>> {
    take(layout, db, name, false)
}

/// Take lock `name`, waiting for the process that holds it.
pub fn lock(layout: &Layout, db: &Db, name: &str) -> crate::Result<Lock> {
    match take(layout, db, name, true)? {
        Some(held) => Ok(held),
        None => unreachable!("a waiting lock is always taken"),
    }
}

fn take(layout: &Layout, db: &Db, name: &str, wait: bool) -> crate::Result<Option<Lock>> {
    match db.backend() {
        Backend::Postgres => Ok(db
            .advisory_lock(&format!("ablate:{name}"), wait)?
            .map(Lock::Server)),
        Backend::Sqlite => {
            let path = layout.lock(name);
            let taken = if wait {
                lock_file(&path).map(Some)
            } else {
                try_lock_file(&path)
            };
            Ok(taken.map_err(crate::Error::file(&path))?.map(Lock::File))
        }
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        db::files::create_folder(dir)?;
    }
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// Lock the file at `path` if no other process holds it; None when one does.
fn try_lock_file(path: &Path) -> std::io::Result<Option<File>> {
    let file = open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// Lock the file at `path`, waiting for the process that holds it.
fn lock_file(path: &Path) -> std::io::Result<File> {
    let file = open(path)?;
    file.lock()?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// flock locks belong to an open file description: a second open of the same path in this
    /// process contends like another process would.
    #[test]
    fn a_held_lock_is_refused_until_dropped() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let layout = Layout {
            root: dir.path().to_path_buf(),
            db_url: None,
        };
        let db = layout.open_db()?;
        let held = try_lock(&layout, &db, "x")?.expect("free at first");
        assert!(layout.lock("x").is_file(), "a file under ROOT/locks");
        assert!(try_lock(&layout, &db, "x")?.is_none(), "held elsewhere");
        drop(held);
        let again = try_lock(&layout, &db, "x")?;
        assert!(again.is_some(), "released on drop");
        drop(again);
        let _blocking = lock(&layout, &db, "x")?;
        assert!(try_lock(&layout, &db, "x")?.is_none());
        Ok(())
    }
}
