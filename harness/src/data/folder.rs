//! `image-folder`: one subfolder per class (sorted by name), PNG or JPEG files inside, each
//! resized so its shorter side is the spec's size and centre-cropped, decoded in parallel.
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use rayon::prelude::*;

use super::{DataError, Raw};

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Whether `p` has a PNG or JPEG extension (any case).
pub(crate) fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

/// What an image folder holds.
pub struct Listing {
    /// class names: the subfolder names, sorted
    pub classes: Vec<String>,
    /// every image with its class index
    pub files: Vec<(PathBuf, u32)>,
}

/// The classes and images of an image folder.
pub fn list(dir: &Path) -> Result<Listing, DataError> {
    if !dir.is_dir() {
        return Err(DataError::Missing {
            path: dir.display().to_string(),
            what: "an image folder with one subfolder per class".into(),
        });
    }
    let classes: Vec<PathBuf> = sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    if classes.is_empty() {
        return Err(DataError::NoClasses {
            path: dir.display().to_string(),
        });
    }
    let mut names = Vec::new();
    let mut files = Vec::new();
    for (c, cdir) in classes.iter().enumerate() {
        let images: Vec<PathBuf> = sorted_entries(cdir)?
            .into_iter()
            .filter(|p| p.is_file() && is_image(p))
            .collect();
        if images.is_empty() {
            return Err(DataError::EmptyClass {
                path: cdir.display().to_string(),
            });
        }
        names.push(
            cdir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        files.extend(images.into_iter().map(|p| (p, c as u32)));
    }
    Ok(Listing {
        classes: names,
        files,
    })
}

/// Decodes, resizes (shorter side → `size`, Catmull-Rom) and centre-crops every file to RGB.
pub fn decode(files: &[(PathBuf, u32)], size: usize) -> Result<Raw, DataError> {
    let images: Vec<Vec<u8>> = files
        .par_iter()
        .map(|(path, _)| decode_one(path, size))
        .collect::<Result<_, _>>()?;
    let mut pixels = Vec::with_capacity(files.len() * 3 * size * size);
    for img in &images {
        pixels.extend_from_slice(img);
    }
    Ok(Raw {
        n: files.len(),
        pixels,
        labels: files.iter().map(|(_, c)| *c).collect(),
        channels: 3,
        height: size,
        width: size,
        source: files
            .first()
            .map(|(p, _)| p.display().to_string())
            .unwrap_or_default(),
    })
}

/// One image as CHW RGB bytes of `size`×`size`.
fn decode_one(path: &Path, size: usize) -> Result<Vec<u8>, DataError> {
    let img = image::ImageReader::open(path)
        .map_err(|e| DataError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?
        .decode()
        .map_err(|e| DataError::Decode {
            path: path.display().to_string(),
            message: e.to_string(),
        })?
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(DataError::Decode {
            path: path.display().to_string(),
            message: "image has no pixels".into(),
        });
    }
    // shorter side to `size`, keeping the aspect ratio, then the centre square
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(size as u32),
        ((h as f64 * scale).round() as u32).max(size as u32),
    );
    let resized = if (nw as usize, nh as usize) == (w, h) {
        img
    } else {
        image::imageops::resize(&img, nw, nh, FilterType::CatmullRom)
    };
    let (x0, y0) = ((nw as usize - size) / 2, (nh as usize - size) / 2);
    let mut out = vec![0u8; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let p = resized.get_pixel((x0 + x) as u32, (y0 + y) as u32);
            for ch in 0..3 {
                out[(ch * size + y) * size + x] = p[ch];
            }
        }
    }
    Ok(out)
}
