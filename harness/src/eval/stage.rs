//! The evaluation stage's pieces: the classifier feature net's training, the reference
//! statistics of the test split (cached under the root), and the eval rows a score becomes.
//! Which feature net a run uses, whether it is trained or reused, and the locks, are the runner's.
use std::path::Path;

use db::{Db, MetricPoint, NewEval};

use super::{metrics, EvalNet, FewSamples, Net, TrainableClassifier};
use crate::data::Dataset;
use crate::identity;
use crate::layout::Layout;
use crate::record::{now, record_artifact, spinner};
use crate::spec::{EvalSpec, PlannedRun};
use crate::Result;

/// Train the classifier feature net of run `id` on `ds`, save it to `path` and record its loss
/// curve and test accuracy; the accuracy.
pub fn train_feature_net(
    db: &Db,
    id: i64,
    net: &mut TrainableClassifier,
    ds: &Dataset,
    eval: &EvalSpec,
    path: &Path,
    quiet: bool,
) -> Result<f64> {
    let pb = spinner(
        quiet,
        eval.classifier_steps as u64,
        "training the feature net".into(),
    );
    // a fit that failed earlier logged a curve of its own
    db.delete_metrics_after(id, -1)?;
    let mut losses = Vec::new();
    let result = net.train(ds, eval, &mut |step, loss| {
        pb.set_position(step as u64 + 1);
        losses.push(MetricPoint {
            key: "train/loss".into(),
            step: step as i64 + 1,
            value: loss as f64,
            wall_time: now(),
        });
    });
    pb.finish_and_clear();
    db.insert_metrics(id, &losses)?;
    result?;
    net.save(path)?;
    let acc = net.accuracy(&ds.test)?;
    db.insert_metrics(
        id,
        &[MetricPoint {
            key: "test/accuracy".into(),
            step: eval.classifier_steps as i64,
            value: acc,
            wall_time: now(),
        }],
    )?;
    record_artifact(db, id, "checkpoint", path)?;
    db.finish_run(id)?;
    Ok(acc)
}

/// Attach the reference statistics of the test split, read from the cache when present.
pub fn with_reference(
    layout: &Layout,
    net: Net,
    name: String,
    net_id: &str,
    ds: &Dataset,
    say: &dyn Fn(String),
) -> Result<EvalNet> {
    let reference_id = identity::reference_stats(ds, net_id, net.convention());
    let path = layout.reference_stats(&reference_id);
    let cached = if path.is_file() {
        super::inception::read_reference(&path).ok()
    } else {
        None
    };
    let (reference, reference_features) = match cached {
        Some(c) => c,
        None => {
            let f = net.features(&ds.test)?;
            let g = metrics::gaussian_stats(&f.feats, f.n, f.dim)?;
            super::inception::write_reference(&path, &g, &f.feats)?;
            (g, f.feats)
        }
    };
    let dim = net.dim();
    if let Some(FewSamples::Singular) = FewSamples::of(reference.n, dim) {
        let warning = FewSamples::Singular.warning("the reference split", reference.n, dim);
        say(format!("    {warning}"));
    }
    Ok(EvalNet {
        net,
        name,
        reference_id,
        reference,
        reference_features,
    })
}

/// What an eval row records besides its value: the sampling settings, the reference statistics
/// and the input convention.
pub fn eval_settings(run: &PlannedRun, ds: &Dataset, fnet: &EvalNet) -> serde_json::Value {
    serde_json::json!({
        "cfg": run.spec.sample.cfg,
        "cfg_schedule": run.spec.sample.cfg_schedule,
        "temperature": run.spec.sample.temperature,
        "mar_steps": run.spec.sample.mar_steps,
        "sampling_steps": run.spec.head.sampling_steps,
        "reference": format!("{}:test", ds.name),
        "reference_stats": fnet.reference_id,
        "reference_count": fnet.reference.n,
        "convention": fnet.net.convention(),
    })
}

/// One eval row per metric of `scores` at `step`.
pub fn record_scores(
    db: &Db,
    run_id: i64,
    step: i64,
    scores: &super::Scores,
    settings: &serde_json::Value,
    fnet: &EvalNet,
) -> Result<()> {
    for (metric, value) in [
        ("fid", scores.fid),
        ("is", scores.is_mean),
        ("is_std", scores.is_std),
        ("kid", scores.kid),
        ("kid_std", scores.kid_std),
        ("precision", scores.precision),
        ("recall", scores.recall),
    ] {
        db.insert_eval(&NewEval {
            run_id,
            step,
            metric,
            value,
            sample_count: scores.samples as i64,
            feature_net: &fnet.name,
            settings,
        })?;
    }
    Ok(())
}
