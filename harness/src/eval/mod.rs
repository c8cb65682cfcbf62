//! Evaluation: the feature nets (the Inception-v3 FID network, or a small classifier trained on
//! the data set's training split for data without a standard one), feature extraction, and the
//! metrics (FID, IS, KID, precision / recall) in float64.
pub mod inception;
pub mod metrics;
pub mod net;
pub mod stage;

pub use net::{Features, Net};

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use models::classifier::Classifier;
use models::init::seeded_var_builder;
use models::Rng;

use crate::data::{Dataset, ImageSet};
use crate::spec::EvalSpec;
use crate::train::AdamW;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Metric(#[from] metrics::MetricError),
    #[error("feature net weights {path}: {message}")]
    Weights { path: String, message: String },
    #[error("FID statistics {path}: {message}")]
    Stats { path: String, message: String },
    #[error("{0}")]
    Input(String),
}

/// The classifier feature net while it is trained (or loaded from its checkpoint): 2-D features
/// for FID, logits for IS. [`TrainableClassifier::frozen`] turns it into the [`Net`] evaluations use.
pub struct TrainableClassifier {
    pub model: Classifier,
    pub varmap: VarMap,
    pub device: Device,
    channels: usize,
}

impl TrainableClassifier {
    pub fn new(
        channels: usize,
        classes: usize,
        spec: &EvalSpec,
        device: &Device,
    ) -> Result<Self, EvalError> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, spec.classifier_seed, DType::F32, device);
        let model = Classifier::new(channels, classes, spec.classifier_features, vb)?;
        Ok(TrainableClassifier {
            model,
            varmap,
            device: device.clone(),
            channels,
        })
    }

    pub fn load(&mut self, path: &Path) -> Result<(), EvalError> {
        self.varmap.load(path).map_err(|e| EvalError::Weights {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    pub fn save(&self, path: &Path) -> Result<(), EvalError> {
        db::files::write_atomic(path, |tmp| self.varmap.save(tmp)).map_err(|e| EvalError::Weights {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Train with cross-entropy on the training split; calls `progress(step, loss)`.
    pub fn train(
        &self,
        ds: &Dataset,
        spec: &EvalSpec,
        progress: &mut dyn FnMut(usize, f32),
    ) -> Result<(), EvalError> {
        let mut opt = AdamW::new(&self.varmap, 1e-4, 0.9, 0.999)?;
        let mut rng = Rng::new(spec.classifier_seed ^ 0xC1A5_51F1);
        let batch = 128.min(ds.train.n);
        let mut order = rng.permutation(ds.train.n);
        let mut pos = 0;
        for step in 0..spec.classifier_steps {
            if pos + batch > order.len() {
                order = rng.permutation(ds.train.n);
                pos = 0;
            }
            let idx = &order[pos..pos + batch];
            pos += batch;
            let x = ds.train.batch_tensor(idx, &self.device)?;
            let y: Vec<u32> = idx.iter().map(|&i| ds.train.labels[i]).collect();
            let y = Tensor::from_vec(y, batch, &self.device)?;
            let (_, logits) = self.model.forward(&x)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let lr = 2e-3 * (1.0 - step as f64 / spec.classifier_steps as f64).max(0.05);
            opt.clipped_step(&loss.backward()?, 5.0, lr)?;
            progress(step, loss.to_scalar::<f32>()?);
        }
        Ok(())
    }

    /// The weights as they are now, frozen (no autograd), as a feature net.
    pub fn frozen(&self) -> Result<Net, EvalError> {
        let model = Classifier::new(
            self.channels,
            self.model.num_classes,
            self.model.feature_dim,
            models::init::frozen_var_builder(&self.varmap, DType::F32, &self.device)?,
        )?;
        Ok(Net::Classifier {
            model: Box::new(model),
            channels: self.channels,
            device: self.device.clone(),
        })
    }

    /// Top-1 accuracy on a split.
    pub fn accuracy(&self, set: &ImageSet) -> Result<f64, EvalError> {
        let logits = self.frozen()?.features(set)?.logits;
        let classes = logits.len() / set.n.max(1);
        let correct = logits
            .chunks(classes)
            .zip(&set.labels)
            .filter(|(row, &label)| {
                let best = row
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, _)| i)
                    .unwrap_or(0);
                best == label as usize
            })
            .count();
        Ok(correct as f64 / set.n.max(1) as f64)
    }
}

/// A feature net with the reference statistics and features of a data set's held-out split.
pub struct EvalNet {
    pub net: Net,
    /// the `feature_net` column of eval rows: `classifier:DATASET` or `inception`
    pub name: String,
    /// (data set, split, feature net, convention) of the reference statistics
    pub reference_id: String,
    pub reference: metrics::Gaussian,
    pub reference_features: Vec<f32>,
}

/// Every metric of generated images against the reference split.
#[derive(Debug, Clone)]
pub struct Scores {
    pub fid: f64,
    pub is_mean: f64,
    pub is_std: f64,
    pub kid: f64,
    pub kid_std: f64,
    pub precision: f64,
    pub recall: f64,
    pub samples: usize,
}

/// Why `n` samples of `dim`-d features make an unreliable FID, when they do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FewSamples {
    /// n ≤ dim: the covariance is singular, and FID strongly biased upwards
    Singular,
    /// fewer than 10 000: FID is biased upwards, so only equal counts compare
    Biased,
}

impl FewSamples {
    pub fn of(n: usize, dim: usize) -> Option<FewSamples> {
        match n {
            n if n <= dim => Some(FewSamples::Singular),
            n if n < 10_000 => Some(FewSamples::Biased),
            _ => None,
        }
    }

    /// The warning about `what` (a folder, "the reference split", "the samples").
    pub fn warning(self, what: &str, n: usize, dim: usize) -> String {
        match self {
            FewSamples::Singular => format!(
                "warning: {what} has only {n} samples, not more than the {dim} feature dimensions: \
                 its covariance is singular and FID is strongly biased upwards (use 10000 or more; \
                 the paper's numbers use 50000)"
            ),
            FewSamples::Biased => format!(
                "warning: {what} has {n} samples; FID is biased upwards below about 10000 (the \
                 paper's numbers use 50000), so compare only values with equal counts"
            ),
        }
    }
}

/// KID subsets and subset size (torch-fidelity's defaults), and k of precision / recall.
pub const KID_SUBSETS: usize = 100;
pub const KID_SUBSET_SIZE: usize = 1000;
pub const PRC_K: usize = 3;

pub fn score(net: &EvalNet, generated: &ImageSet, is_splits: usize) -> Result<Scores, EvalError> {
    let f = net.net.features(generated)?;
    let stats = metrics::gaussian_stats(&f.feats, f.n, f.dim)?;
    let fid = metrics::frechet_distance(&stats, &net.reference)?;
    let (is_mean, is_std) = metrics::inception_score(&f.logits, f.n, f.classes, is_splits)?;
    let n_ref = net.reference.n;
    let (kid, kid_std) = metrics::kernel_inception_distance(
        &f.feats,
        f.n,
        &net.reference_features,
        n_ref,
        f.dim,
        KID_SUBSETS,
        KID_SUBSET_SIZE,
        0,
    )?;
    let (precision, recall) =
        metrics::precision_recall(&net.reference_features, n_ref, &f.feats, f.n, f.dim, PRC_K)?;
    Ok(Scores {
        fid,
        is_mean,
        is_std,
        kid,
        kid_std,
        precision,
        recall,
        samples: f.n,
    })
}
