//! Data sets behind one interface: `synthetic` (generated, the embedded default), `mnist` (IDX
//! files), `cifar10` (binary batches) and `image-folder` (one subfolder per class). Every set comes
//! out as a training split and a held-out split of N×C×H×W floats in [0, 1], with a fingerprint of
//! its bytes that goes into the identity of every run trained on it.
pub mod cifar;
pub mod folder;
pub mod idx;
pub mod synthetic;

use std::io::Read;
use std::path::Path;

use rayon::prelude::*;
use sha2::{Digest, Sha256};

pub use synthetic::ImageSet;

use crate::spec::{DataSource, DataSpec};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("synthetic data: {0}")]
    Synthetic(#[from] synthetic::SyntheticError),
    #[error("{path}: not found; expected {what}")]
    Missing { path: String, what: String },
    #[error("{path}: cannot read: {message}")]
    Io { path: String, message: String },
    #[error(
        "{path}: wrong magic number {found} (expected {expected}); is this the right IDX file?"
    )]
    BadMagic {
        path: String,
        expected: String,
        found: String,
    },
    #[error("{path}: truncated: {message}")]
    Truncated { path: String, message: String },
    #[error("{path}: cannot decode: {message}")]
    Decode { path: String, message: String },
    #[error("{path}: size mismatch: {message}")]
    SizeMismatch { path: String, message: String },
    #[error("{path}: class folder holds no PNG or JPEG images")]
    EmptyClass { path: String },
    #[error("{path}: no class subfolders (image-folder expects one subfolder per class)")]
    NoClasses { path: String },
    #[error("data.{key}: {requested} images requested but {path} has {available}{hint}")]
    TooFew {
        key: &'static str,
        path: String,
        requested: usize,
        available: usize,
        hint: String,
    },
    #[error("data.path: required for data.source = \"{0}\" (the folder holding the data)")]
    NoPath(&'static str),
    #[error("data.classes: {path} has {available} classes, {requested} requested")]
    Classes {
        path: String,
        requested: usize,
        available: usize,
    },
}

impl DataError {
    fn io(path: &Path, e: std::io::Error) -> Self {
        DataError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

/// A data set: a training split, a held-out split for evaluation, and a fingerprint of the bytes.
pub struct Dataset {
    pub name: String,
    pub train: ImageSet,
    pub test: ImageSet,
    pub classes: usize,
    pub fingerprint: String,
}

/// Decoded images at their stored size: u8 pixels, N×C×H×W.
pub struct Raw {
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
    pub n: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// the file (or first file) the images came from, for error messages
    pub source: String,
}

/// A file's bytes, gunzipped when it starts with the gzip magic number.
pub fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::Truncated {
                path: path.display().to_string(),
                message: format!("gzip stream: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(bytes)
    }
}

pub fn load(spec: &DataSpec) -> Result<Dataset, DataError> {
    let path = || {
        spec.path
            .as_deref()
            .map(Path::new)
            .ok_or(DataError::NoPath(spec.source.as_str()))
    };
    let (name, train, test, classes) = match spec.source {
        DataSource::Synthetic => {
            let classes = spec.classes.unwrap_or(synthetic::MAX_CLASSES);
            let cfg = synthetic::SyntheticConfig {
                classes,
                image_size: spec.image_size,
                train: spec.train,
                test: spec.test,
                seed: spec.seed,
            };
            cfg.validate()?;
            let (train, test) = synthetic::generate(&cfg);
            let name = format!("synthetic-{}px-{}c", spec.image_size, classes);
            (name, train, test, classes)
        }
        DataSource::Mnist => {
            let dir = path()?;
            let (train, test, classes) = match idx::load(dir)? {
                idx::Found::TrainTest { train, test } => split_pair(train, test, spec, 10)?,
                idx::Found::Single(all) => split_one(all, spec, 10)?,
            };
            (format!("mnist-{}px", spec.image_size), train, test, classes)
        }
        DataSource::Cifar10 => {
            let (train, test) = cifar::load(path()?)?;
            let (train, test, classes) = split_pair(train, test, spec, 10)?;
            (
                format!("cifar10-{}px", spec.image_size),
                train,
                test,
                classes,
            )
        }
        DataSource::ImageFolder => {
            let dir = path()?;
            let (names, files) = folder::list(dir)?;
            let all = folder::decode(&files, spec.image_size)?;
            let (train, test, classes) = split_one(all, spec, names.len())?;
            let base = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "images".into());
            (
                format!("{base}-{}px", spec.image_size),
                train,
                test,
                classes,
            )
        }
    };
    let fingerprint = fingerprint(&[&train, &test]);
    Ok(Dataset {
        name,
        train,
        test,
        classes,
        fingerprint,
    })
}

/// The number of classes kept: `data.classes` (the first k labels) or all `available`.
fn class_count(spec: &DataSpec, raw: &Raw, available: usize) -> Result<usize, DataError> {
    match spec.classes {
        Some(k) if !(2..=available).contains(&k) => Err(DataError::Classes {
            path: raw.source.clone(),
            requested: k,
            available,
        }),
        Some(k) => Ok(k),
        None => Ok(available),
    }
}

/// Indices of the images with a kept label, in a seeded random order.
fn shuffled(raw: &Raw, classes: usize, seed: u64, tag: u64) -> Vec<usize> {
    let order = models::Rng::new(seed ^ tag).permutation(raw.n);
    order
        .into_iter()
        .filter(|&i| (raw.labels[i] as usize) < classes)
        .collect()
}

fn too_few(key: &'static str, raw: &Raw, requested: usize, available: usize) -> DataError {
    DataError::TooFew {
        key,
        path: raw.source.clone(),
        requested,
        available,
        hint: " (with the classes kept); lower the count".into(),
    }
}

/// Separate training and test files: a seeded subset of each.
fn split_pair(
    train: Raw,
    test: Raw,
    spec: &DataSpec,
    available: usize,
) -> Result<(ImageSet, ImageSet, usize), DataError> {
    let classes = class_count(spec, &train, available)?;
    let tr = shuffled(&train, classes, spec.seed, 0x7472_6169);
    let te = shuffled(&test, classes, spec.seed, 0x7465_7374);
    if tr.len() < spec.train {
        return Err(too_few("train", &train, spec.train, tr.len()));
    }
    if te.len() < spec.test {
        return Err(too_few("test", &test, spec.test, te.len()));
    }
    Ok((
        take(&train, &tr[..spec.train], spec.image_size),
        take(&test, &te[..spec.test], spec.image_size),
        classes,
    ))
}

/// One pool of images: the first `test` of a seeded shuffle are held out, the next `train` train.
fn split_one(
    all: Raw,
    spec: &DataSpec,
    available: usize,
) -> Result<(ImageSet, ImageSet, usize), DataError> {
    let classes = class_count(spec, &all, available)?;
    let order = shuffled(&all, classes, spec.seed, 0x616c_6c5f);
    if order.len() < spec.train + spec.test {
        return Err(DataError::TooFew {
            key: "train",
            path: all.source.clone(),
            requested: spec.train + spec.test,
            available: order.len(),
            hint: format!(
                " (data.train {} + data.test {} are drawn from one pool); lower the counts",
                spec.train, spec.test
            ),
        });
    }
    let (te, rest) = order.split_at(spec.test);
    Ok((
        take(&all, &rest[..spec.train], spec.image_size),
        take(&all, te, spec.image_size),
        classes,
    ))
}

/// The images at `idx`, scaled to [0, 1] and resized (per channel, Catmull-Rom) to `size`×`size`.
fn take(raw: &Raw, idx: &[usize], size: usize) -> ImageSet {
    let (c, h, w) = (raw.channels, raw.height, raw.width);
    let src_len = c * h * w;
    let dst_len = c * size * size;
    let mut images = vec![0f32; idx.len() * dst_len];
    images
        .par_chunks_mut(dst_len)
        .zip(idx.par_iter())
        .for_each(|(out, &i)| {
            let src = &raw.pixels[i * src_len..(i + 1) * src_len];
            for ch in 0..c {
                let plane = &src[ch * h * w..(ch + 1) * h * w];
                let dst = &mut out[ch * size * size..(ch + 1) * size * size];
                if (h, w) == (size, size) {
                    for (d, &v) in dst.iter_mut().zip(plane) {
                        *d = v as f32 / 255.0;
                    }
                } else {
                    let img = image::GrayImage::from_raw(w as u32, h as u32, plane.to_vec())
                        .unwrap_or_default();
                    let r = image::imageops::resize(
                        &img,
                        size as u32,
                        size as u32,
                        image::imageops::FilterType::CatmullRom,
                    );
                    for (d, &v) in dst.iter_mut().zip(r.as_raw()) {
                        *d = v as f32 / 255.0;
                    }
                }
            }
        });
    ImageSet {
        images,
        labels: idx.iter().map(|&i| raw.labels[i]).collect(),
        n: idx.len(),
        channels: c,
        size,
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
