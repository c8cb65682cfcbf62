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
            let listing = folder::list(dir)?;
            let all = folder::decode(&listing.files, spec.image_size)?;
            let (train, test, classes) = split_one(all, spec, listing.classes.len())?;
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
/// The fingerprint a run's identity takes from its data: the data set's, for data read from
/// files; none for synthetic data, which its spec determines.
pub fn identity_fingerprint(spec: &DataSpec) -> Result<String, DataError> {
    Ok(match spec.source {
        DataSource::Synthetic => String::new(),
        _ => load(spec)?.fingerprint,
    })
}

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
    db::files::write_atomic(path, |tmp| img.save(tmp)).map_err(image::ImageError::IoError)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// An IDX images file (magic 0x803) of `n` images `rows`×`cols`, pixel = (i + y + x) mod 256.
    fn idx_images(n: usize, rows: usize, cols: usize) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [0x803u32, n as u32, rows as u32, cols as u32] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        for i in 0..n {
            for y in 0..rows {
                for x in 0..cols {
                    b.push(((i + y + x) % 256) as u8);
                }
            }
        }
        b
    }

    fn idx_labels(n: usize) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [0x801u32, n as u32] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend((0..n).map(|i| (i % 10) as u8));
        b
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn spec(source: DataSource, path: &Path, train: usize, test: usize) -> DataSpec {
        DataSpec {
            source,
            path: Some(path.display().to_string()),
            image_size: 8,
            classes: None,
            train,
            test,
            seed: 0,
            hflip: false,
        }
    }

    fn err(source: DataSource, path: &Path) -> String {
        match load(&spec(source, path, 20, 10)) {
            Ok(_) => panic!("expected an error for {}", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn mnist_single_pair_gzip_splits_and_resizes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("images-idx3-ubyte.gz"),
            gzip(&idx_images(50, 28, 28)),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("labels-idx1-ubyte.gz"),
            gzip(&idx_labels(50)),
        )
        .unwrap();
        let ds = load(&spec(DataSource::Mnist, dir.path(), 30, 20)).unwrap();
        assert_eq!((ds.train.n, ds.test.n, ds.classes), (30, 20, 10));
        assert_eq!((ds.train.channels, ds.train.size), (1, 8));
        assert!(ds.train.images.iter().all(|v| (0.0..=1.0).contains(v)));
        // the same seed gives the same split; another seed another one
        let again = load(&spec(DataSource::Mnist, dir.path(), 30, 20)).unwrap();
        assert_eq!(ds.fingerprint, again.fingerprint);
        let mut other = spec(DataSource::Mnist, dir.path(), 30, 20);
        other.seed = 1;
        assert_ne!(load(&other).unwrap().fingerprint, ds.fingerprint);
    }

    #[test]
    fn mnist_train_and_t10k_raw_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(p.join("train-images-idx3-ubyte"), idx_images(40, 8, 8)).unwrap();
        std::fs::write(p.join("train-labels-idx1-ubyte"), idx_labels(40)).unwrap();
        std::fs::write(p.join("t10k-images-idx3-ubyte"), idx_images(20, 8, 8)).unwrap();
        std::fs::write(p.join("t10k-labels-idx1-ubyte"), idx_labels(20)).unwrap();
        let mut s = spec(DataSource::Mnist, p, 40, 20);
        s.classes = Some(5);
        // only labels 0..5 are kept: 20 of 40 training images
        let e = load(&s).err().unwrap().to_string();
        assert!(
            e.contains("data.train: 40 images requested") && e.contains("has 20"),
            "{e}"
        );
        s.train = 20;
        s.test = 10;
        let ds = load(&s).unwrap();
        assert!(ds.train.labels.iter().all(|&l| l < 5));
        assert_eq!(ds.classes, 5);
        // unscaled pixels are value / 255
        assert_eq!(ds.train.size, 8);
    }

    #[test]
    fn mnist_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = err(DataSource::Mnist, dir.path());
        assert!(
            e.contains("not found") && e.contains("train-images-idx3-ubyte"),
            "{e}"
        );
        std::fs::write(dir.path().join("images-idx3-ubyte"), idx_images(30, 8, 8)).unwrap();
        let e = err(DataSource::Mnist, dir.path());
        assert!(
            e.contains("labels-idx1-ubyte") && e.contains("not found"),
            "{e}"
        );
        let e = err(DataSource::Mnist, &dir.path().join("nope"));
        assert!(e.contains("nope: not found"), "{e}");
    }

    #[test]
    fn mnist_wrong_magic_number() {
        let dir = tempfile::tempdir().unwrap();
        // labels where images belong
        std::fs::write(dir.path().join("images-idx3-ubyte"), idx_labels(30)).unwrap();
        std::fs::write(dir.path().join("labels-idx1-ubyte"), idx_labels(30)).unwrap();
        let e = err(DataSource::Mnist, dir.path());
        assert!(
            e.contains("images-idx3-ubyte: wrong magic number 0x00000801 (expected 0x00000803)"),
            "{e}"
        );
    }

    #[test]
    fn mnist_truncated_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut images = idx_images(30, 8, 8);
        images.truncate(images.len() - 5);
        std::fs::write(dir.path().join("images-idx3-ubyte"), images).unwrap();
        std::fs::write(dir.path().join("labels-idx1-ubyte"), idx_labels(30)).unwrap();
        let e = err(DataSource::Mnist, dir.path());
        assert!(
            e.contains("images-idx3-ubyte: truncated: header says 30 images of 8×8"),
            "{e}"
        );
        // a cut gzip stream
        let gz = gzip(&idx_images(30, 8, 8));
        std::fs::remove_file(dir.path().join("images-idx3-ubyte")).unwrap();
        std::fs::write(dir.path().join("images-idx3-ubyte.gz"), &gz[..gz.len() / 2]).unwrap();
        let e = err(DataSource::Mnist, dir.path());
        assert!(
            e.contains("images-idx3-ubyte.gz: truncated: gzip stream"),
            "{e}"
        );
    }

    #[test]
    fn mnist_size_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(p.join("train-images-idx3-ubyte"), idx_images(40, 28, 28)).unwrap();
        std::fs::write(p.join("train-labels-idx1-ubyte"), idx_labels(40)).unwrap();
        std::fs::write(p.join("t10k-images-idx3-ubyte"), idx_images(20, 32, 32)).unwrap();
        std::fs::write(p.join("t10k-labels-idx1-ubyte"), idx_labels(20)).unwrap();
        let e = err(DataSource::Mnist, p);
        assert!(
            e.contains("size mismatch: training images are 28×28 but test images are 32×32"),
            "{e}"
        );
        // and labels that do not match the images in number
        std::fs::write(p.join("t10k-images-idx3-ubyte"), idx_images(20, 28, 28)).unwrap();
        std::fs::write(p.join("t10k-labels-idx1-ubyte"), idx_labels(19)).unwrap();
        let e = err(DataSource::Mnist, p);
        assert!(
            e.contains("t10k-labels-idx1-ubyte: size mismatch: 19 labels for 20 images"),
            "{e}"
        );
    }

    fn cifar_batch(n: usize) -> Vec<u8> {
        let mut b = Vec::new();
        for i in 0..n {
            b.push((i % 10) as u8);
            b.extend((0..3072).map(|j| ((i + j) % 256) as u8));
        }
        b
    }

    #[test]
    fn cifar10_batches_and_truncated_record() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("cifar-10-batches-bin");
        std::fs::create_dir(&d).unwrap();
        for i in 1..=5 {
            std::fs::write(d.join(format!("data_batch_{i}.bin")), cifar_batch(10)).unwrap();
        }
        std::fs::write(d.join("test_batch.bin"), cifar_batch(20)).unwrap();
        let ds = load(&spec(DataSource::Cifar10, dir.path(), 40, 15)).unwrap();
        assert_eq!(
            (ds.train.n, ds.test.n, ds.train.channels, ds.train.size),
            (40, 15, 3, 8)
        );
        let mut cut = cifar_batch(10);
        cut.truncate(cut.len() - 100);
        std::fs::write(d.join("data_batch_3.bin"), cut).unwrap();
        let e = err(DataSource::Cifar10, dir.path());
        assert!(
            e.contains("data_batch_3.bin: truncated") && e.contains("3073-byte records"),
            "{e}"
        );
        std::fs::remove_file(d.join("data_batch_3.bin")).unwrap();
        let e = err(DataSource::Cifar10, dir.path());
        assert!(e.contains("data_batch_3.bin: cannot read"), "{e}");
    }

    fn write_png(path: &Path, w: u32, h: u32, shade: u8) {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([shade, (x * 7) as u8, (y * 5) as u8])
        })
        .save(path)
        .unwrap();
    }

    #[test]
    fn image_folder_resizes_crops_and_reads_jpeg() {
        let dir = tempfile::tempdir().unwrap();
        for (c, shade) in [("cats", 30u8), ("dogs", 220)] {
            let d = dir.path().join(c);
            std::fs::create_dir(&d).unwrap();
            for i in 0..6 {
                write_png(&d.join(format!("{i}.png")), 20 + i, 12, shade);
            }
            image::RgbImage::from_pixel(16, 16, image::Rgb([shade, shade, shade]))
                .save(d.join("extra.jpg"))
                .unwrap();
            std::fs::write(d.join("notes.txt"), "not an image").unwrap();
        }
        let mut s = spec(DataSource::ImageFolder, dir.path(), 10, 4);
        s.image_size = 8;
        let ds = load(&s).unwrap();
        assert_eq!(
            (ds.classes, ds.train.n, ds.test.n, ds.train.channels),
            (2, 10, 4, 3)
        );
        // red channel keeps the class shade through resizing (cats dark, dogs bright)
        for set in [&ds.train, &ds.test] {
            for i in 0..set.n {
                let red = set.image(i).unwrap()[0];
                assert_eq!(red > 0.5, set.labels[i] == 1, "image {i} red {red}");
            }
        }
    }

    #[test]
    fn image_folder_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let e = err(DataSource::ImageFolder, dir.path());
        assert!(e.contains("no class subfolders"), "{e}");
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        for i in 0..20 {
            write_png(&a.join(format!("{i}.png")), 8, 8, 0);
        }
        let e = err(DataSource::ImageFolder, dir.path());
        assert!(
            e.contains("/b: class folder holds no PNG or JPEG images"),
            "{e}"
        );
        for i in 0..20 {
            write_png(&b.join(format!("{i}.png")), 8, 8, 0);
        }
        std::fs::write(b.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let e = err(DataSource::ImageFolder, dir.path());
        assert!(e.contains("broken.png: cannot decode"), "{e}");
    }

    #[test]
    fn real_sources_need_a_path() {
        let mut s = spec(DataSource::Mnist, Path::new("x"), 20, 10);
        s.path = None;
        let e = load(&s).err().unwrap().to_string();
        assert!(
            e.contains("data.path: required for data.source = \"mnist\""),
            "{e}"
        );
    }
}
