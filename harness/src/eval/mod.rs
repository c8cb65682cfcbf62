//! Evaluation: the feature nets (the Inception-v3 FID network, or a small classifier trained on
//! the data set's training split for data without a standard one), feature extraction, and the
//! metrics (FID, IS, KID, precision / recall) in float64.
pub mod extractor;
pub mod inception;
pub mod metrics;
pub mod stage;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use models::classifier::Classifier;
use models::inception::{Convention, InceptionV3};
use models::init::seeded_var_builder;
use models::Rng;

use crate::data::{Dataset, ImageSet};
use crate::spec::EvalSpec;
use crate::train::{clip_grad_norm, AdamW};

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

/// The classifier used as feature net: 2-D features for FID, logits for IS.
pub struct FeatureNet {
    pub model: Classifier,
    pub varmap: VarMap,
    pub device: Device,
}

impl FeatureNet {
    pub fn new(
        channels: usize,
        classes: usize,
        spec: &EvalSpec,
        device: &Device,
    ) -> Result<Self, EvalError> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, spec.classifier_seed, DType::F32, device);
        let model = Classifier::new(channels, classes, spec.classifier_features, vb)?;
        Ok(FeatureNet {
            model,
            varmap,
            device: device.clone(),
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
        let vars: Vec<_> = opt.vars().cloned().collect();
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
            let mut grads = loss.backward()?;
            clip_grad_norm(&mut grads, &vars, 5.0)?;
            let lr = 2e-3 * (1.0 - step as f64 / spec.classifier_steps as f64).max(0.05);
            opt.step(&grads, lr)?;
            progress(step, loss.to_scalar::<f32>()?);
        }
        Ok(())
    }

    /// Features and logits for every image of a set, in batches (on frozen weights: no autograd).
    pub fn extract(&self, set: &ImageSet) -> Result<(Vec<f32>, Vec<f32>), EvalError> {
        let frozen = Classifier::new(
            set.channels,
            self.model.num_classes,
            self.model.feature_dim,
            models::init::frozen_var_builder(&self.varmap, DType::F32, &self.device)?,
        )?;
        let mut feats = Vec::with_capacity(set.n * self.model.feature_dim);
        let mut logits = Vec::new();
        let all: Vec<usize> = (0..set.n).collect();
        for chunk in all.chunks(500) {
            let x = set.batch_tensor(chunk, &self.device)?;
            let (f, l) = frozen.forward(&x)?;
            feats.extend(f.flatten_all()?.to_vec1::<f32>()?);
            logits.extend(l.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok((feats, logits))
    }

    /// Top-1 accuracy on a split.
    pub fn accuracy(&self, set: &ImageSet) -> Result<f64, EvalError> {
        let (_, logits) = self.extract(set)?;
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

/// The feature net an evaluation uses.
pub enum Net {
    /// the harness's classifier, on the [0, 1] float images directly
    Classifier(Box<FeatureNet>),
    /// the Inception-v3 FID network, on the images quantised to 8 bits as PNGs would be
    Inception {
        net: Box<InceptionV3>,
        convention: Convention,
    },
}

impl Net {
    /// (features n × dim, logits n × classes, dim, classes) of every image of a set.
    pub fn features(&self, set: &ImageSet) -> Result<extractor::Features, EvalError> {
        match self {
            Net::Classifier(f) => {
                let (feats, logits) = f.extract(set)?;
                Ok(extractor::Features {
                    feats,
                    logits,
                    n: set.n,
                    dim: f.model.feature_dim,
                    classes: f.model.num_classes,
                })
            }
            Net::Inception { net, convention } => {
                let images = inception::ImagesU8::from_unit_floats(
                    &set.images,
                    set.n,
                    set.channels,
                    set.size,
                )?;
                let f = inception::extract(net, &images, *convention, 16)?;
                Ok(extractor::Features {
                    feats: f.pool,
                    logits: f.logits,
                    n: f.n,
                    dim: models::inception::FEATURE_DIM,
                    classes: models::inception::LOGIT_DIM,
                })
            }
        }
    }

    /// `torch-fidelity` / `pytorch-fid` for Inception, `unit` for the classifier's [0, 1] inputs.
    pub fn convention(&self) -> &'static str {
        match self {
            Net::Classifier(_) => "unit",
            Net::Inception { convention, .. } => convention.as_str(),
        }
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
