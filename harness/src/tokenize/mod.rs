//! Stage 1 of every run: images ↔ tokens. Pixel-space twins: the diffusion arm's `patch`
//! tokenizer takes p×p pixel patches as continuous tokens and the cross-entropy arm's `kmeans`
//! quantizes the same patches to a learned codebook. Latent-space twins: `kl` and `vq` share one
//! conv autoencoder (models::autoencoder) and differ only in the bottleneck. Either way the only
//! difference between the arms is quantization.
pub mod autoencoder;
pub mod kmeans;
pub mod stage;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use models::autoencoder::{code_usage, Autoencoder};

use crate::data::ImageSet;
use crate::spec::{TokenizerKind, TokenizerSpec};

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error(transparent)]
    KMeans(#[from] kmeans::KMeansError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] models::Error),
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error("tokenizer file {path}: {message}")]
    File { path: String, message: String },
    #[error(transparent)]
    Stopped(#[from] crate::stop::Stopped),
    #[error("autoencoder training diverged at step {step} (loss {loss}); lower tokenizers.*.lr")]
    Diverged { step: usize, loss: f32 },
}

/// Images `start..start + AE_BATCH` of `set` (fewer at the end) as the autoencoder's input:
/// (B, C, S, S) on the [-1, 1] scale.
fn autoencoder_batch(
    set: &ImageSet,
    start: usize,
    device: &Device,
) -> Result<Tensor, TokenizeError> {
    let (len, b) = (set.image_len(), AE_BATCH.min(set.n - start));
    Ok(Tensor::from_slice(
        &set.images[start * len..(start + b) * len],
        (b, set.channels, set.size, set.size),
        device,
    )?
    .affine(2.0, -1.0)?)
}

/// Token data for a whole split, on the host.
#[derive(Debug, Clone)]
pub enum TokenData {
    /// N × L codes
    Discrete(Vec<u32>),
    /// N × L × C values
    Continuous(Vec<f32>),
}

/// How a tokenizer maps images to tokens.
#[derive(Debug, Clone)]
pub enum Backend {
    Patch {
        patch: usize,
    },
    Kmeans {
        patch: usize,
        km: kmeans::KMeans,
    },
    /// `scale` multiplies KL latents into tokens (1 for VQ); the model holds detached weights
    Autoencoder {
        model: Box<Autoencoder>,
        weights: HashMap<String, Tensor>,
        scale: f64,
        device: Device,
    },
}

#[derive(Debug, Clone)]
pub struct Tokenizer {
    pub kind: TokenizerKind,
    pub channels: usize,
    pub size: usize,
    pub backend: Backend,
}

/// Receives training metrics: (step, [(key, value)]).
pub type TrainLog<'a> = dyn FnMut(usize, &[(&'static str, f64)]) + 'a;

/// Images per forward pass when encoding or decoding with an autoencoder.
const AE_BATCH: usize = 256;

/// MAR's `patchify` ([`models::mar::patchify`]) of flat images in [0, 1]: (N, C, H, W) →
/// (N, L, C·p·p) in [-1, 1], channel-major in a token.
pub fn patchify(
    images: &[f32],
    n: usize,
    c: usize,
    size: usize,
    p: usize,
) -> candle_core::Result<Vec<f32>> {
    let x = Tensor::from_slice(images, (n, c, size, size), &Device::Cpu)?;
    models::mar::patchify(&x.affine(2.0, -1.0)?, p)?
        .flatten_all()?
        .to_vec1()
}

/// Inverse of [`patchify`], back to [0, 1] (clamped).
pub fn unpatchify(
    tokens: &[f32],
    n: usize,
    c: usize,
    size: usize,
    p: usize,
) -> candle_core::Result<Vec<f32>> {
    let side = size / p;
    let x = Tensor::from_slice(tokens, (n, side * side, c * p * p), &Device::Cpu)?;
    models::mar::unpatchify(&x, p)?
        .affine(0.5, 0.5)?
        .clamp(0f32, 1f32)?
        .flatten_all()?
        .to_vec1()
}

impl Tokenizer {
    pub fn seq_len(&self) -> usize {
        match &self.backend {
            Backend::Patch { patch } | Backend::Kmeans { patch, .. } => (self.size / patch).pow(2),
            Backend::Autoencoder { model, .. } => model.latent_side(self.size).pow(2),
        }
    }

    pub fn token_dim(&self) -> usize {
        match &self.backend {
            Backend::Patch { patch } | Backend::Kmeans { patch, .. } => {
                self.channels * patch * patch
            }
            Backend::Autoencoder { model, .. } => model.config.latent_dim,
        }
    }

    /// Codebook size of a discrete tokenizer.
    pub fn vocab(&self) -> Option<usize> {
        match &self.backend {
            Backend::Kmeans { km, .. } => Some(km.k),
            Backend::Autoencoder { model, .. } => model.codebook().map(|c| c.dims()[0]),
            Backend::Patch { .. } => None,
        }
    }

    /// Codes used and perplexity of a discrete tokenizer's codes.
    pub fn usage(&self, data: &TokenData) -> Option<(usize, f64)> {
        match (data, self.vocab()) {
            (TokenData::Discrete(codes), Some(k)) => Some(code_usage(codes, k)),
            _ => None,
        }
    }

    /// Fit on the training split: k-means for `kmeans`, nothing for `patch`, a trained
    /// autoencoder for `vq` / `kl` (`log` receives its training metrics per logged step; with a
    /// checkpoint plan the autoencoder continues from, and saves, checkpoints).
    pub fn fit(
        spec: &TokenizerSpec,
        train: &ImageSet,
        seed: u64,
        device: &Device,
        checkpoint: Option<autoencoder::CheckpointPlan>,
        log: &mut TrainLog,
    ) -> Result<Self, TokenizeError> {
        let backend = match spec.kind {
            TokenizerKind::Patch => Backend::Patch { patch: spec.patch },
            TokenizerKind::Kmeans => {
                let patches = patchify(
                    &train.images,
                    train.n,
                    train.channels,
                    train.size,
                    spec.patch,
                )?;
                let dim = train.channels * spec.patch * spec.patch;
                let n = patches.len() / dim;
                let km = kmeans::fit(&patches, n, dim, spec.codebook, spec.iters, seed)?;
                Backend::Kmeans {
                    patch: spec.patch,
                    km,
                }
            }
            TokenizerKind::Vq | TokenizerKind::Kl => {
                let trained = autoencoder::train(spec, train, seed, device, checkpoint, log)?;
                autoencoder::backend(spec, &trained, train, device)?
            }
        };
        Ok(Tokenizer {
            kind: spec.kind,
            channels: train.channels,
            size: train.size,
            backend,
        })
    }

    pub fn encode(&self, set: &ImageSet) -> Result<TokenData, TokenizeError> {
        match &self.backend {
            Backend::Patch { patch } => Ok(TokenData::Continuous(patchify(
                &set.images,
                set.n,
                set.channels,
                set.size,
                *patch,
            )?)),
            Backend::Kmeans { patch, km } => {
                let p = patchify(&set.images, set.n, set.channels, set.size, *patch)?;
                Ok(TokenData::Discrete(
                    km.assign(&p, p.len() / self.token_dim()),
                ))
            }
            Backend::Autoencoder {
                model,
                scale,
                device,
                ..
            } => {
                let mut codes = Vec::new();
                let mut values = Vec::new();
                for start in (0..set.n).step_by(AE_BATCH) {
                    let t = model.encode(&autoencoder_batch(set, start, device)?)?;
                    if model.codebook().is_some() {
                        codes.extend(t.flatten_all()?.to_vec1::<u32>()?);
                    } else {
                        values.extend((t * *scale)?.flatten_all()?.to_vec1::<f32>()?);
                    }
                }
                Ok(if model.codebook().is_some() {
                    TokenData::Discrete(codes)
                } else {
                    TokenData::Continuous(values)
                })
            }
        }
    }

    /// KL tokenizers: the posterior standard deviation of every token value of `set`, on the
    /// tokens' scale (N × L × C, beside [`Tokenizer::encode`]'s means); None for the others.
    pub fn posterior_std(&self, set: &ImageSet) -> Result<Option<Vec<f32>>, TokenizeError> {
        let Backend::Autoencoder {
            model,
            scale,
            device,
            ..
        } = &self.backend
        else {
            return Ok(None);
        };
        if model.codebook().is_some() {
            return Ok(None);
        }
        let mut values = Vec::with_capacity(set.n * self.seq_len() * self.token_dim());
        for start in (0..set.n).step_by(AE_BATCH) {
            if let Some(std) = model.encode_std(&autoencoder_batch(set, start, device)?)? {
                values.extend((std * *scale)?.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(Some(values))
    }

    /// Tokens back to images (N×C×H×W in [0, 1]).
    pub fn decode(&self, tokens: &TokenData, n: usize) -> Result<Vec<f32>, TokenizeError> {
        let (seq, dim) = (self.seq_len(), self.token_dim());
        match (&self.backend, tokens) {
            (Backend::Patch { patch }, TokenData::Continuous(v)) => {
                Ok(unpatchify(v, n, self.channels, self.size, *patch)?)
            }
            (Backend::Kmeans { patch, km }, TokenData::Discrete(codes)) => Ok(unpatchify(
                &km.decode(codes),
                n,
                self.channels,
                self.size,
                *patch,
            )?),
            (
                Backend::Autoencoder {
                    model,
                    scale,
                    device,
                    ..
                },
                data,
            ) => {
                let mut out = Vec::with_capacity(n * self.channels * self.size * self.size);
                for start in (0..n).step_by(AE_BATCH) {
                    let b = AE_BATCH.min(n - start);
                    let t = match data {
                        TokenData::Discrete(c) => Tensor::from_slice(
                            &c[start * seq..(start + b) * seq],
                            (b, seq),
                            device,
                        )?,
                        TokenData::Continuous(v) => {
                            (Tensor::from_slice(
                                &v[start * seq * dim..(start + b) * seq * dim],
                                (b, seq, dim),
                                device,
                            )? / *scale)?
                        }
                    };
                    let img = model
                        .decode_tokens(&t)?
                        .affine(0.5, 0.5)?
                        .clamp(0f32, 1f32)?;
                    out.extend(img.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
                }
                Ok(out)
            }
            _ => Err(TokenizeError::File {
                path: String::new(),
                message: "token kind does not match the tokenizer (discrete vs continuous)".into(),
            }),
        }
    }

    /// Reconstructions of a split and their MSE and PSNR (pixels in [0, 1]).
    pub fn reconstruct(&self, set: &ImageSet) -> Result<(ImageSet, f64, f64), TokenizeError> {
        let rec = self.decode(&self.encode(set)?, set.n)?;
        let mse = rec
            .iter()
            .zip(&set.images)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / rec.len().max(1) as f64;
        let psnr = if mse > 0.0 {
            10.0 * (1.0 / mse).log10()
        } else {
            f64::INFINITY
        };
        let images = ImageSet {
            images: rec,
            labels: set.labels.clone(),
            n: set.n,
            channels: set.channels,
            size: set.size,
        };
        Ok((images, mse, psnr))
    }

    pub fn save(&self, path: &Path) -> Result<(), TokenizeError> {
        let t: HashMap<String, Tensor> = match &self.backend {
            Backend::Patch { .. } => HashMap::new(),
            Backend::Kmeans { km, .. } => HashMap::from([(
                "codebook".to_string(),
                Tensor::from_vec(km.centroids.clone(), (km.k, km.dim), &Device::Cpu)?,
            )]),
            Backend::Autoencoder { weights, scale, .. } => autoencoder::tensors(weights, *scale)?,
        };
        save_tensors(&t, path)
    }

    pub fn load(
        spec: &TokenizerSpec,
        channels: usize,
        size: usize,
        path: &Path,
        device: &Device,
    ) -> Result<Self, TokenizeError> {
        let file_err = |message: String| TokenizeError::File {
            path: path.display().to_string(),
            message,
        };
        let backend = match spec.kind {
            TokenizerKind::Patch => Backend::Patch { patch: spec.patch },
            TokenizerKind::Kmeans => {
                let t = candle_core::safetensors::load(path, &Device::Cpu)
                    .map_err(|e| file_err(e.to_string()))?;
                let cb = t
                    .get("codebook")
                    .ok_or_else(|| file_err("no 'codebook' tensor".into()))?;
                let (k, dim) = cb.dims2()?;
                Backend::Kmeans {
                    patch: spec.patch,
                    km: kmeans::KMeans {
                        centroids: cb.flatten_all()?.to_vec1::<f32>()?,
                        k,
                        dim,
                    },
                }
            }
            TokenizerKind::Vq | TokenizerKind::Kl => {
                autoencoder::load(spec, channels, path, device)?
            }
        };
        Ok(Tokenizer {
            kind: spec.kind,
            channels,
            size,
            backend,
        })
    }
}

/// Writes tensors to `path` through a temporary file, so a crash never leaves half a file.
pub fn save_tensors(t: &HashMap<String, Tensor>, path: &Path) -> Result<(), TokenizeError> {
    let file_err = |p: &Path, e: &dyn std::fmt::Display| TokenizeError::File {
        path: p.display().to_string(),
        message: e.to_string(),
    };
    db::files::write_atomic(path, |tmp| candle_core::safetensors::save(t, tmp))
        .map_err(|e| file_err(path, &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patchify_roundtrip() -> candle_core::Result<()> {
        let (n, c, s, p) = (2, 3, 8, 4);
        let imgs: Vec<f32> = (0..n * c * s * s).map(|i| (i % 97) as f32 / 96.0).collect();
        let t = patchify(&imgs, n, c, s, p)?;
        assert_eq!(t.len(), imgs.len());
        // token 0 of image 0 starts with channel 0's top-left pixel, mapped to [-1, 1]
        assert!((t[0] - (imgs[0] * 2.0 - 1.0)).abs() < 1e-6);
        // token 1 (the patch right of token 0) starts with channel 0's pixel at column p
        let token = c * p * p;
        assert!((t[token] - (imgs[p] * 2.0 - 1.0)).abs() < 1e-6);
        // inside a token, channel 1 follows all p·p pixels of channel 0
        assert!((t[p * p] - (imgs[s * s] * 2.0 - 1.0)).abs() < 1e-6);
        let back = unpatchify(&t, n, c, s, p)?;
        for (a, b) in back.iter().zip(&imgs) {
            assert!((a - b).abs() < 1e-6);
        }
        Ok(())
    }
}
