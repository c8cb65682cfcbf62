//! What every stage does besides its work: a progress bar on the terminal, the wall clock of its
//! metric points, a record of each file it writes (path, sha256, size) in the database, and the
//! database behind the generator's training log.
use std::path::Path;

use db::{Db, MetricWriter};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{Error, Result};

/// A progress bar of `len` steps (hidden when `quiet`).
pub fn spinner(quiet: bool, len: u64, msg: String) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:40} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(msg);
    pb
}

/// Seconds since the UNIX epoch, the time of a metric point.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Record a file of the run (path, sha256, size) in the database. The path is relative to the
/// root ([`Db::resolve`] reads it back), so a root can be moved and a report rebuilt from any
/// folder; before, paths were relative to where `ablate run` started, which meant nothing to a
/// report rebuilt elsewhere (it embedded no sample grid, or another project's).
pub fn record_artifact(db: &Db, run_id: i64, kind: &str, path: &Path) -> Result<()> {
    let canonical = |p: &Path| std::fs::canonicalize(p).map_err(Error::file(p));
    let (path, root) = (canonical(path)?, canonical(&db.root())?);
    let stored = path.strip_prefix(&root).unwrap_or(&path);
    let sha = db::files::sha256_file(&path).map_err(Error::file(&path))?;
    let bytes = std::fs::metadata(&path).map_err(Error::file(&path))?.len();
    db.insert_artifact(
        run_id,
        kind,
        &stored.display().to_string(),
        &sha,
        bytes as i64,
    )?;
    Ok(())
}

/// Where stage 2 records the run's training curves and what became of its checkpoints. The
/// runner records into the database ([`RunRecorder`]); `train::generator`'s unit test keeps it
/// in memory.
pub trait Recorder {
    /// The run continues from its checkpoint at `step`: drop what was logged after that step
    /// (it is logged again, equal).
    fn discard_after(&mut self, step: usize) -> Result<()>;
    /// Damaged checkpoints were passed over; `note` says what the run went on from.
    fn checkpoint_recovered(&mut self, note: &str) -> Result<()>;
    /// One point of a training curve; it may wait for [`Recorder::flush`].
    fn log(&mut self, key: &'static str, step: usize, value: f64) -> Result<()>;
    /// Stores every point logged so far: called before each checkpoint, so that a checkpoint
    /// never gets ahead of the curves.
    fn flush(&mut self) -> Result<()>;
}

/// The generator's training log ([`Recorder`]) in the database, on run `run_id`: curves through a
/// buffered metric writer, and a `checkpoint_recovered` parameter beside the spec.
pub struct RunRecorder<'a> {
    db: &'a Db,
    run_id: i64,
    writer: MetricWriter<'a>,
}

impl<'a> RunRecorder<'a> {
    pub fn new(db: &'a Db, run_id: i64) -> Self {
        RunRecorder {
            db,
            run_id,
            writer: db.metric_writer(run_id, 100),
        }
    }
}

impl Recorder for RunRecorder<'_> {
    fn discard_after(&mut self, step: usize) -> Result<()> {
        self.db.delete_metrics_after(self.run_id, step as i64)?;
        Ok(())
    }

    fn checkpoint_recovered(&mut self, note: &str) -> Result<()> {
        let note = serde_json::json!(note);
        Ok(self
            .db
            .set_run_param(self.run_id, "checkpoint_recovered", &note)?)
    }

    fn log(&mut self, key: &'static str, step: usize, value: f64) -> Result<()> {
        Ok(self.writer.push(key, step as i64, value)?)
    }

    fn flush(&mut self) -> Result<()> {
        Ok(self.writer.flush()?)
    }
}
