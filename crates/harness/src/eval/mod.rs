//! Evaluation: the feature nets (the Inception-v3 FID network, or a small classifier trained on
//! the data set's training split for data without a standard one), feature extraction, and the
//! metrics (FID, IS, KID, precision / recall) in float64.
pub mod extractor;
pub mod inception;
pub mod metrics;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use models::classifier::Classifier;
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
    #[error("reference statistics {path}: {message}")]
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
        let tmp = path.with_extension("tmp");
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(|e| EvalError::Weights {
                path: d.display().to_string(),
                message: e.to_string(),
            })?;
        }
        self.varmap.save(&tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| EvalError::Weights {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    fn batch_tensor(&self, set: &ImageSet, idx: &[usize]) -> Result<Tensor, EvalError> {
        let len = set.image_len();
        let mut data = Vec::with_capacity(idx.len() * len);
        for &i in idx {
            data.extend_from_slice(&set.images[i * len..(i + 1) * len]);
        }
        Ok(Tensor::from_vec(
            data,
            (idx.len(), set.channels, set.size, set.size),
            &self.device,
        )?)
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
            let x = self.batch_tensor(&ds.train, idx)?;
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
            let x = self.batch_tensor(set, chunk)?;
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

/// FID and IS of generated images against reference statistics.
#[derive(Debug, Clone)]
pub struct Scores {
    pub fid: f64,
    pub is_mean: f64,
    pub is_std: f64,
    pub samples: usize,
}

pub fn score(
    net: &FeatureNet,
    reference: &metrics::Gaussian,
    generated: &ImageSet,
    is_splits: usize,
) -> Result<Scores, EvalError> {
    let (feats, logits) = net.extract(generated)?;
    let stats = metrics::gaussian_stats(&feats, generated.n, net.model.feature_dim)?;
    let fid = metrics::frechet_distance(&stats, reference)?;
    let classes = logits.len() / generated.n.max(1);
    let (is_mean, is_std) = metrics::inception_score(&logits, generated.n, classes, is_splits)?;
    Ok(Scores {
        fid,
        is_mean,
        is_std,
        samples: generated.n,
    })
}
