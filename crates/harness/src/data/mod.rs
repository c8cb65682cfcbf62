//! Data sets behind one interface. Today: the generated `synthetic` set (the embedded default).
pub mod synthetic;

use sha2::{Digest, Sha256};

pub use synthetic::ImageSet;

use crate::spec::{DataSource, DataSpec};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("synthetic data: {0}")]
    Synthetic(#[from] synthetic::SyntheticError),
}

/// A data set: a training split, a held-out split for evaluation, and a fingerprint of the bytes.
pub struct Dataset {
    pub name: String,
    pub train: ImageSet,
    pub test: ImageSet,
    pub classes: usize,
    pub fingerprint: String,
}

pub fn load(spec: &DataSpec) -> Result<Dataset, DataError> {
    match spec.source {
        DataSource::Synthetic => {
            let cfg = synthetic::SyntheticConfig {
                classes: spec.classes,
                image_size: spec.image_size,
                train: spec.train,
                test: spec.test,
                seed: spec.seed,
            };
            cfg.validate()?;
            let (train, test) = synthetic::generate(&cfg);
            let fingerprint = fingerprint(&[&train, &test]);
            Ok(Dataset {
                name: format!("synthetic-{}px-{}c", spec.image_size, spec.classes),
                train,
                test,
                classes: spec.classes,
                fingerprint,
            })
        }
    }
}

/// sha256 over the pixels and labels of every split, hex, 16 chars.
pub fn fingerprint(sets: &[&ImageSet]) -> String {
    let mut h = Sha256::new();
    for s in sets {
        h.update((s.n as u64).to_le_bytes());
        for v in &s.images {
            h.update(v.to_le_bytes());
        }
        for l in &s.labels {
            h.update(l.to_le_bytes());
        }
    }
    hex::encode(h.finalize())[..16].to_string()
}

/// Write images (N×C×H×W in [0, 1]) as a PNG grid, `cols` per row, each pixel scaled by `scale`.
pub fn save_grid(
    path: &std::path::Path,
    images: &[f32],
    n: usize,
    c: usize,
    size: usize,
    cols: usize,
    scale: usize,
) -> Result<(), image::ImageError> {
    let cols = cols.max(1);
    let rows = n.div_ceil(cols);
    let cell = size * scale + 2;
    let (w, h) = ((cols * cell) as u32, (rows.max(1) * cell) as u32);
    let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    for i in 0..n {
        let (r, col) = (i / cols, i % cols);
        let base = i * c * size * size;
        for y in 0..size * scale {
            for x in 0..size * scale {
                let (sy, sx) = (y / scale, x / scale);
                let px = |ch: usize| {
                    let ch = ch.min(c - 1);
                    (images[base + ch * size * size + sy * size + sx].clamp(0.0, 1.0) * 255.0)
                        .round() as u8
                };
                img.put_pixel(
                    (col * cell + 1 + x) as u32,
                    (r * cell + 1 + y) as u32,
                    image::Rgb([px(0), px(1), px(2)]),
                );
            }
        }
    }
    img.save(path)
}
