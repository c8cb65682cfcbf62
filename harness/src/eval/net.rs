//! The feature net of every evaluation, in one type: the Inception-v3 FID network (with its input
//! convention) or a classifier trained by the harness on the data set's training split.
//! The runner scores generated images (floats in [0, 1]) with it, and `ablate fid` image folders
//! (8-bit pixels).
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use models::classifier::Classifier;
use models::inception::{Convention, InceptionV3, FEATURE_DIM, LOGIT_DIM};

use super::inception::{extract, ImagesU8};
use super::EvalError;
use crate::data::ImageSet;

/// Features (n × dim) and logits (n × classes) of a set of images.
#[derive(Debug, Clone)]
pub struct Features {
    pub feats: Vec<f32>,
    pub logits: Vec<f32>,
    pub n: usize,
    pub dim: usize,
    pub classes: usize,
}

/// The feature net an evaluation uses.
pub enum Net {
    /// a classifier of the harness, on [0, 1] images of `channels` channels, frozen
    Classifier {
        model: Box<Classifier>,
        channels: usize,
        device: Device,
    },
    /// the Inception-v3 FID network, on images quantised to 8 bits as PNGs store them, `batch`
    /// images per forward pass
    Inception {
        net: Box<InceptionV3>,
        convention: Convention,
        batch: usize,
    },
}

/// Images per forward pass of the classifier.
const CLASSIFIER_BATCH: usize = 500;

impl Net {
    /// The feature net as recorded with every eval row.
    pub fn name(&self) -> &'static str {
        match self {
            Net::Inception { .. } => "inception",
            Net::Classifier { .. } => "classifier",
        }
    }

    /// The input convention: `torch-fidelity` or `pytorch-fid` for Inception, `unit` for the
    /// classifier's [0, 1] inputs.
    pub fn convention(&self) -> &'static str {
        match self {
            Net::Inception { convention, .. } => convention.as_str(),
            Net::Classifier { .. } => "unit",
        }
    }

    /// The dimension of the features FID is computed on.
    pub fn dim(&self) -> usize {
        match self {
            Net::Inception { .. } => FEATURE_DIM,
            Net::Classifier { model, .. } => model.feature_dim,
        }
    }

    /// Features and logits of every image of a set of [0, 1] floats (generated samples, a data
    /// set's split). Inception sees them quantised to 8 bits, as if read back from PNGs.
    pub fn features(&self, set: &ImageSet) -> Result<Features, EvalError> {
        match self {
            Net::Inception { .. } => {
                let images =
                    ImagesU8::from_unit_floats(&set.images, set.n, set.channels, set.size)?;
                self.features_u8(&images)
            }
            Net::Classifier {
                model,
                channels,
                device,
            } => {
                let all: Vec<usize> = (0..set.n).collect();
                let batches = all
                    .chunks(CLASSIFIER_BATCH)
                    .map(|chunk| set.batch_tensor(chunk, device));
                classifier_features(model, *channels, set.n, set.channels, batches)
            }
        }
    }

    /// Features and logits of 8-bit images (an image folder).
    pub fn features_u8(&self, images: &ImagesU8) -> Result<Features, EvalError> {
        match self {
            Net::Inception {
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
            Net::Classifier {
                model,
                channels,
                device,
            } => {
                let (h, w) = (images.height, images.width);
                let len = (images.channels * h * w).max(1);
                let batches = images.pixels.chunks(CLASSIFIER_BATCH * len).map(|chunk| {
                    Tensor::from_slice(chunk, (chunk.len() / len, images.channels, h, w), device)?
                        .to_dtype(DType::F32)?
                        .affine(1.0 / 255.0, 0.0)
                });
                classifier_features(model, *channels, images.n, images.channels, batches)
            }
        }
    }
}

/// The classifier (trained on `wanted`-channel images) over `n` images in batches of [0, 1]
/// values with `channels` channels; grey and colour images are converted to the channels it
/// was trained on.
fn classifier_features(
    model: &Classifier,
    wanted: usize,
    n: usize,
    channels: usize,
    batches: impl Iterator<Item = candle_core::Result<Tensor>>,
) -> Result<Features, EvalError> {
    let mut feats = Vec::with_capacity(n * model.feature_dim);
    let mut logits = Vec::with_capacity(n * model.num_classes);
    for x in batches {
        let x = match (channels, wanted) {
            (a, b) if a == b => x?,
            (3, 1) => x?.mean_keepdim(1)?,
            (1, 3) => x?.repeat((1, 3, 1, 1))?,
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

/// A classifier checkpoint written by the runner, as a frozen feature net; its sizes are read
/// from the tensor shapes.
pub fn load_classifier(path: &Path, device: &Device) -> Result<Net, EvalError> {
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
    Ok(Net::Classifier {
        model: Box::new(model),
        channels,
        device: device.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;
    use models::init::seeded_var_builder;

    /// A random classifier for `channels`-channel images.
    fn classifier(channels: usize) -> Net {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 3, DType::F32, &Device::Cpu);
        let model = Classifier::new(channels, 5, 8, vb).expect("classifier");
        Net::Classifier {
            model: Box::new(model),
            channels,
            device: Device::Cpu,
        }
    }

    /// `n` images of 8-bit values, and the same as [0, 1] floats.
    fn images(n: usize, channels: usize, size: usize) -> (ImagesU8, ImageSet) {
        let pixels: Vec<u8> = (0..n * channels * size * size)
            .map(|i| ((i * 37 + i / 7) % 256) as u8)
            .collect();
        let floats = pixels.iter().map(|&p| p as f32 / 255.0).collect();
        let u8s = ImagesU8 {
            pixels,
            n,
            channels,
            height: size,
            width: size,
        };
        let set = ImageSet {
            images: floats,
            labels: vec![0; n],
            n,
            channels,
            size,
        };
        (u8s, set)
    }

    #[test]
    fn floats_and_8_bit_pixels_give_the_same_classifier_features() -> Result<(), EvalError> {
        let net = classifier(1);
        let (u8s, set) = images(CLASSIFIER_BATCH + 3, 1, 8);
        let (a, b) = (net.features(&set)?, net.features_u8(&u8s)?);
        assert_eq!((a.n, a.dim, a.classes), (b.n, b.dim, b.classes));
        assert_eq!((a.feats.len(), a.logits.len()), (a.n * 8, a.n * 5));
        let largest = a
            .feats
            .iter()
            .chain(&b.feats)
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(largest > 0.0, "features are all zero");
        for (x, y) in a
            .feats
            .iter()
            .zip(&b.feats)
            .chain(a.logits.iter().zip(&b.logits))
        {
            assert!((x - y).abs() <= 1e-5 * largest.max(1.0), "{x} against {y}");
        }
        Ok(())
    }

    #[test]
    fn colour_images_are_turned_grey_for_a_grey_classifier_and_other_counts_refused() {
        let net = classifier(1);
        let (rgb, _) = images(4, 3, 8);
        let f = net
            .features_u8(&rgb)
            .expect("colour images on a grey classifier");
        assert_eq!(f.n, 4);
        let (two, _) = images(4, 2, 8);
        let err = net.features_u8(&two).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("the classifier takes 1-channel images, these have 2")
        );
    }

    #[test]
    fn few_samples_are_named_by_how_they_bias_fid() {
        use super::super::FewSamples;
        assert_eq!(FewSamples::of(64, 64), Some(FewSamples::Singular));
        assert_eq!(FewSamples::of(65, 64), Some(FewSamples::Biased));
        assert_eq!(FewSamples::of(10_000, 2048), None);
        let w = FewSamples::Singular.warning("the samples", 500, 2048);
        assert!(
            w.contains("500 samples") && w.contains("2048 feature dimensions"),
            "{w}"
        );
    }
}
