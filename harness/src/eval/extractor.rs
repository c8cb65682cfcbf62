//! One interface over the two feature nets for 8-bit images: the Inception-v3 FID network (with
//! its input convention) and a trained classifier checkpoint of the harness.
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use models::classifier::Classifier;
use models::inception::{Convention, InceptionV3, FEATURE_DIM, LOGIT_DIM};

use super::inception::{extract, ImagesU8};
use super::EvalError;

/// Features (n × dim) and logits (n × classes) of a set of images.
#[derive(Debug, Clone)]
pub struct Features {
    pub feats: Vec<f32>,
    pub logits: Vec<f32>,
    pub n: usize,
    pub dim: usize,
    pub classes: usize,
}

pub enum Extractor {
    Inception {
        net: Box<InceptionV3>,
        convention: Convention,
        batch: usize,
    },
    Classifier {
        model: Box<Classifier>,
        channels: usize,
    },
}

impl Extractor {
    /// The feature net as recorded with every eval row.
    pub fn name(&self) -> &'static str {
        match self {
            Extractor::Inception { .. } => "inception",
            Extractor::Classifier { .. } => "classifier",
        }
    }

    /// The input convention (`torch-fidelity`, `pytorch-fid`, or `unit` for the classifier's
    /// [0, 1] inputs).
    pub fn convention(&self) -> &'static str {
        match self {
            Extractor::Inception { convention, .. } => convention.as_str(),
            Extractor::Classifier { .. } => "unit",
        }
    }

    pub fn dim(&self) -> usize {
        match self {
            Extractor::Inception { .. } => FEATURE_DIM,
            Extractor::Classifier { model, .. } => model.feature_dim,
        }
    }

    pub fn extract(&self, images: &ImagesU8) -> Result<Features, EvalError> {
        match self {
            Extractor::Inception {
                net,
                convention,
                batch,
            } => {
                let f = extract(net, images, *convention, *batch)?;
                Ok(Features {
                    feats: f.pool,
                    logits: f.logits,
                    n: f.n,
                    dim: FEATURE_DIM,
                    classes: LOGIT_DIM,
                })
            }
            Extractor::Classifier { model, channels } => {
                let (n, h, w) = (images.n, images.height, images.width);
                let mut feats = Vec::with_capacity(n * model.feature_dim);
                let mut logits = Vec::with_capacity(n * model.num_classes);
                let len = images.channels * h * w;
                for chunk in images.pixels.chunks(256 * len.max(1)) {
                    let b = chunk.len() / len;
                    let x = Tensor::from_slice(chunk, (b, images.channels, h, w), &Device::Cpu)?
                        .to_dtype(DType::F32)?
                        .affine(1.0 / 255.0, 0.0)?;
                    let x = match (images.channels, *channels) {
                        (a, b) if a == b => x,
                        (3, 1) => x.mean_keepdim(1)?,
                        (1, 3) => x.repeat((1, 3, 1, 1))?,
                        (a, b) => {
                            return Err(EvalError::Input(format!(
                                "the classifier takes {b}-channel images, these have {a}"
                            )))
                        }
                    };
                    let (f, l) = model.forward(&x)?;
                    feats.extend(f.flatten_all()?.to_vec1::<f32>()?);
                    logits.extend(l.flatten_all()?.to_vec1::<f32>()?);
                }
                Ok(Features {
                    feats,
                    logits,
                    n,
                    dim: model.feature_dim,
                    classes: model.num_classes,
                })
            }
        }
    }
}

/// A classifier checkpoint written by the runner; its sizes are read from the tensor shapes.
pub fn load_classifier(path: &Path, device: &Device) -> Result<(Classifier, usize), EvalError> {
    let err = |m: String| EvalError::Weights {
        path: path.display().to_string(),
        message: m,
    };
    if !path.is_file() {
        return Err(err("no such file".into()));
    }
    let tensors = candle_core::safetensors::load(path, device)
        .map_err(|e| err(format!("not a readable safetensors file: {e}")))?;
    let dims = |name: &str| -> Result<Vec<usize>, EvalError> {
        tensors
            .get(name)
            .map(|t| t.dims().to_vec())
            .ok_or_else(|| err(format!("missing tensor '{name}'")))
    };
    let conv1 = dims("conv1.weight")?;
    let out = dims("out.weight")?;
    if conv1.len() != 4 || out.len() != 2 {
        return Err(err("not a classifier checkpoint".into()));
    }
    let (channels, classes, features) = (conv1[1], out[0], out[1]);
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    let model = Classifier::new(channels, classes, features, vb).map_err(|e| err(e.to_string()))?;
    Ok((model, channels))
}
