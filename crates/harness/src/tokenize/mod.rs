//! Stage 1 of every run: images ↔ tokens. The diffusion arm's `patch` tokenizer takes p×p pixel
//! patches as continuous tokens; the cross-entropy arm's `kmeans` tokenizer quantizes the same
//! patches to a learned codebook, so the only difference between the arms is quantization.
pub mod kmeans;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::data::ImageSet;
use crate::spec::{TokenizerKind, TokenizerSpec};

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error(transparent)]
    KMeans(#[from] kmeans::KMeansError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer file {path}: {message}")]
    File { path: String, message: String },
}

/// Token data for a whole split, on the host.
#[derive(Debug, Clone)]
pub enum TokenData {
    /// N × L codes
    Discrete(Vec<u32>),
    /// N × L × C values
    Continuous(Vec<f32>),
}

#[derive(Debug, Clone)]
pub struct Tokenizer {
    pub kind: TokenizerKind,
    pub patch: usize,
    pub channels: usize,
    pub size: usize,
    pub codebook: Option<kmeans::KMeans>,
}

/// MAR's `patchify`: (N, C, H, W) in [0,1] → (N, L, C·p·p) in [-1, 1], channel-major in a token.
pub fn patchify(images: &[f32], n: usize, c: usize, size: usize, p: usize) -> Vec<f32> {
    let hp = size / p;
    let mut out = Vec::with_capacity(images.len());
    for i in 0..n {
        for by in 0..hp {
            for bx in 0..hp {
                for ch in 0..c {
                    for y in 0..p {
                        for x in 0..p {
                            let v = images[((i * c + ch) * size + by * p + y) * size + bx * p + x];
                            out.push(v * 2.0 - 1.0);
                        }
                    }
                }
            }
        }
    }
    out
}

/// Inverse of [`patchify`], back to [0, 1] (clamped).
pub fn unpatchify(tokens: &[f32], n: usize, c: usize, size: usize, p: usize) -> Vec<f32> {
    let hp = size / p;
    let mut out = vec![0f32; n * c * size * size];
    let mut k = 0;
    for i in 0..n {
        for by in 0..hp {
            for bx in 0..hp {
                for ch in 0..c {
                    for y in 0..p {
                        for x in 0..p {
                            out[((i * c + ch) * size + by * p + y) * size + bx * p + x] =
                                ((tokens[k] + 1.0) / 2.0).clamp(0.0, 1.0);
                            k += 1;
                        }
                    }
                }
            }
        }
    }
    out
}

impl Tokenizer {
    pub fn seq_len(&self) -> usize {
        (self.size / self.patch).pow(2)
    }

    pub fn token_dim(&self) -> usize {
        self.channels * self.patch * self.patch
    }

    pub fn vocab(&self) -> Option<usize> {
        self.codebook.as_ref().map(|k| k.k)
    }

    /// Fit on the training split (k-means for discrete tokenizers; nothing to learn for patches).
    pub fn fit(spec: &TokenizerSpec, train: &ImageSet, seed: u64) -> Result<Self, TokenizeError> {
        let codebook = match spec.kind {
            TokenizerKind::Patch => None,
            TokenizerKind::Kmeans => {
                let patches = patchify(
                    &train.images,
                    train.n,
                    train.channels,
                    train.size,
                    spec.patch,
                );
                let dim = train.channels * spec.patch * spec.patch;
                let n = patches.len() / dim;
                Some(kmeans::fit(
                    &patches,
                    n,
                    dim,
                    spec.codebook,
                    spec.iters,
                    seed,
                )?)
            }
        };
        Ok(Tokenizer {
            kind: spec.kind,
            patch: spec.patch,
            channels: train.channels,
            size: train.size,
            codebook,
        })
    }

    pub fn encode(&self, set: &ImageSet) -> TokenData {
        let patches = patchify(&set.images, set.n, set.channels, set.size, self.patch);
        match &self.codebook {
            None => TokenData::Continuous(patches),
            Some(km) => TokenData::Discrete(km.assign(&patches, patches.len() / self.token_dim())),
        }
    }

    /// Tokens back to images (N×C×H×W in [0, 1]).
    pub fn decode(&self, tokens: &TokenData, n: usize) -> Vec<f32> {
        let values = match (tokens, &self.codebook) {
            (TokenData::Continuous(v), _) => v.clone(),
            (TokenData::Discrete(codes), Some(km)) => km.decode(codes),
            (TokenData::Discrete(codes), None) => vec![0.0; codes.len() * self.token_dim()],
        };
        unpatchify(&values, n, self.channels, self.size, self.patch)
    }

    /// Reconstruction MSE and PSNR (pixels in [0, 1]) over a split.
    pub fn reconstruction(&self, set: &ImageSet) -> (f64, f64) {
        let rec = self.decode(&self.encode(set), set.n);
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
        (mse, psnr)
    }

    pub fn save(&self, path: &Path) -> Result<(), TokenizeError> {
        let mut t = HashMap::new();
        if let Some(km) = &self.codebook {
            t.insert(
                "codebook".to_string(),
                Tensor::from_vec(km.centroids.clone(), (km.k, km.dim), &Device::Cpu)?,
            );
        }
        let tmp = path.with_extension("tmp");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| TokenizeError::File {
                path: dir.display().to_string(),
                message: e.to_string(),
            })?;
        }
        candle_core::safetensors::save(&t, &tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| TokenizeError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    pub fn load(
        spec: &TokenizerSpec,
        channels: usize,
        size: usize,
        path: &Path,
    ) -> Result<Self, TokenizeError> {
        let codebook = match spec.kind {
            TokenizerKind::Patch => None,
            TokenizerKind::Kmeans => {
                let t = candle_core::safetensors::load(path, &Device::Cpu)?;
                let cb = t.get("codebook").ok_or_else(|| TokenizeError::File {
                    path: path.display().to_string(),
                    message: "no 'codebook' tensor".into(),
                })?;
                let (k, dim) = cb.dims2()?;
                Some(kmeans::KMeans {
                    centroids: cb.flatten_all()?.to_vec1::<f32>()?,
                    k,
                    dim,
                })
            }
        };
        Ok(Tokenizer {
            kind: spec.kind,
            patch: spec.patch,
            channels,
            size,
            codebook,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patchify_roundtrip() {
        let (n, c, s, p) = (2, 3, 8, 4);
        let imgs: Vec<f32> = (0..n * c * s * s).map(|i| (i % 97) as f32 / 96.0).collect();
        let t = patchify(&imgs, n, c, s, p);
        assert_eq!(t.len(), imgs.len());
        // token 0 of image 0 starts with channel 0's top-left pixel, mapped to [-1, 1]
        assert!((t[0] - (imgs[0] * 2.0 - 1.0)).abs() < 1e-6);
        let back = unpatchify(&t, n, c, s, p);
        for (a, b) in back.iter().zip(&imgs) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
