//! The tokenizer stage of a run: fit (resuming an autoencoder from its checkpoint), save, and
//! record its curves, reconstruction quality and codebook use. Whether a fit is needed, and the
//! locks, are the runner's.
use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use db::{Db, MetricPoint};

use super::autoencoder::CheckpointPlan;
use super::{TokenData, Tokenizer};
use crate::data::Dataset;
use crate::eval::{metrics, EvalNet};
use crate::record::{now, record_artifact, spinner};
use crate::spec::TokenizerSpec;
use crate::train::Checkpoint;
use crate::Result;

/// Steps between an autoencoder fit's checkpoints.
const CHECKPOINT_EVERY: usize = 100;

/// A tokenizer fit: its run, seed, configuration, and where its file and checkpoints go.
pub struct TokenizerJob<'a> {
    pub id: i64,
    pub seed: u64,
    pub spec: &'a TokenizerSpec,
    /// the tokenizer's name in the spec, for messages
    pub name: &'a str,
    pub path: &'a Path,
    /// where an autoencoder fit keeps its checkpoints
    pub checkpoints: &'a Path,
    pub quiet: bool,
}

/// Fit, save and record a tokenizer run: training curves (autoencoders), reconstruction of
/// the held-out split (MSE, PSNR, rFID with the feature net), codebook use; returns the
/// tokenizer and the training split's tokens. The run is marked running by the caller.
pub fn fit(
    db: &Db,
    job: &TokenizerJob,
    ds: &Dataset,
    fnet: &EvalNet,
    device: &Device,
    say: &dyn Fn(String),
) -> Result<(Tokenizer, TokenData)> {
    let TokenizerJob {
        id,
        seed,
        spec: tspec,
        name,
        path,
        checkpoints,
        quiet,
    } = *job;
    let t0 = Instant::now();
    let steps = if tspec.kind.is_autoencoder() {
        tspec.steps as u64
    } else {
        1
    };
    // a fit killed earlier continues from its checkpoint; curves logged after it are dropped (a
    // damaged checkpoint sends the fit further back, and its curves are logged again, equal)
    let resumed_at = Checkpoint::saved_step(checkpoints);
    db.delete_metrics_after(id, resumed_at.map_or(-1, |s| s as i64))?;
    let pb = spinner(quiet, steps, format!("fitting tokenizer {}", name));
    // said once the fit has read and verified its checkpoint
    let recording = std::cell::RefCell::new(None);
    let on_resume = |step: usize, recovered: Option<&str>| {
        pb.set_position(step as u64);
        let Some(note) = recovered else {
            say(format!(
                "    tokenizer {name}: resuming from its checkpoint at step {step}"
            ));
            return;
        };
        say(format!("    tokenizer {name}: {note}"));
        if let Err(e) = db.set_run_param(id, "checkpoint_recovered", &serde_json::json!(note)) {
            recording.borrow_mut().get_or_insert(e);
        }
    };
    let plan = CheckpointPlan {
        dir: checkpoints,
        every: CHECKPOINT_EVERY,
        on_resume: &on_resume,
    };
    // curves go to the database as they are logged, before the checkpoint that covers them
    let mut db_error = None;
    let result = Tokenizer::fit(
        tspec,
        &ds.train,
        seed,
        device,
        Some(plan),
        &mut |step, values| {
            pb.set_position(step as u64);
            let points: Vec<MetricPoint> = values
                .iter()
                .map(|&(key, value)| MetricPoint {
                    key: key.into(),
                    step: step as i64,
                    value,
                    wall_time: now(),
                })
                .collect();
            if let Err(e) = db.insert_metrics(id, &points) {
                db_error.get_or_insert(e);
            }
        },
    );
    pb.finish_and_clear();
    if let Some(e) = db_error.or(recording.into_inner()) {
        return Err(e.into());
    }
    let tok = result?;
    tok.save(path)?;
    // the saved tokenizer supersedes its checkpoints (if it had any)
    let _ = std::fs::remove_dir_all(checkpoints);
    let (recon, mse, psnr) = tok.reconstruct(&ds.test)?;
    let mut values = vec![("recon/mse", mse)];
    if psnr.is_finite() {
        values.push(("recon/psnr", psnr));
    }
    // rFID: reconstructions of the held-out split against its own statistics
    let f = fnet.net.features(&recon)?;
    let rec_stats = metrics::gaussian_stats(&f.feats, f.n, f.dim)?;
    // (clamped: identical statistics can give −1e-7 from rounding)
    let rfid = metrics::frechet_distance(&rec_stats, &fnet.reference)?.max(0.0);
    values.push(("recon/rfid", rfid));
    let data = tok.encode(&ds.train)?;
    if let Some((used, perplexity)) = tok.usage(&data) {
        values.push(("codebook/used", used as f64));
        values.push(("codebook/perplexity", perplexity));
    }
    let step = if tspec.kind.is_autoencoder() {
        tspec.steps as i64
    } else {
        0
    };
    let points: Vec<MetricPoint> = values
        .iter()
        .map(|&(key, value)| MetricPoint {
            key: key.into(),
            step,
            value,
            wall_time: now(),
        })
        .collect();
    db.insert_metrics(id, &points)?;
    if path.exists() {
        record_artifact(db, id, "tokenizer", path)?;
    }
    db.finish_run(id)?;
    say(format!(
        "    tokenizer {} fitted in {:.1} s (test reconstruction MSE {mse:.5}, rFID {rfid:.2})",
        name,
        t0.elapsed().as_secs_f64()
    ));
    Ok((tok, data))
}
