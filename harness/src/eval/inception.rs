//! The Inception-v3 FID network as a feature net: reading its weight file (the standard
//! `pt_inception-2015-12-05-6726825d.pth` or a safetensors copy with the same names), feature
//! extraction in batches, image folders, and reference statistics as `.npz` (`mu`, `sigma`; the
//! format of pytorch-fid and the ADM evaluation suite).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use models::inception::{expected_tensors, Convention, InceptionV3, FEATURE_DIM, LOGIT_DIM};
use rayon::prelude::*;

use super::metrics::Gaussian;
use super::EvalError;

fn weights_error(path: &Path, message: impl Into<String>) -> EvalError {
    EvalError::Weights {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Read every tensor of a `.pth` (PyTorch pickle) or `.safetensors` file.
fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>, EvalError> {
    if !path.is_file() {
        return Err(weights_error(path, "no such file"));
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if ext == "pth" || ext == "pt" || ext == "bin" {
        let all = candle_core::pickle::read_all(path)
            .map_err(|e| weights_error(path, format!("not a readable PyTorch file: {e}")))?;
        Ok(all.into_iter().collect())
    } else {
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| weights_error(path, format!("not a readable safetensors file: {e}")))
    }
}

/// Check names and shapes against what the network reads; the error names the first missing
/// or mis-shaped tensor (and how many more there are).
pub fn check_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), EvalError> {
    let mut problems = Vec::new();
    for (name, shape) in expected_tensors() {
        match tensors.get(&name) {
            None => problems.push(format!("missing tensor '{name}' (shape {shape:?})")),
            Some(t) if t.dims() != shape.as_slice() => problems.push(format!(
                "tensor '{name}' has shape {:?}, expected {shape:?}",
                t.dims()
            )),
            Some(_) => {}
        }
    }
    match problems.len() {
        0 => Ok(()),
        1 => Err(weights_error(path, problems.remove(0))),
        k => Err(weights_error(
            path,
            format!(
                "{} (and {} more problems: is this the Inception-v3 FID weight file?)",
                problems[0],
                k - 1
            ),
        )),
    }
}

/// Load the FID network from a weight file (float16 or float32; computed in float32).
pub fn load_inception(path: &Path, device: &Device) -> Result<InceptionV3, EvalError> {
    let tensors = read_tensors(path)?;
    check_tensors(path, &tensors)?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    InceptionV3::new(vb).map_err(|e| weights_error(path, e.to_string()))
}

/// A batch of same-sized 8-bit images, CHW each, with 1 or 3 channels.
#[derive(Debug, Clone)]
pub struct ImagesU8 {
    pub pixels: Vec<u8>,
    pub n: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImagesU8 {
    /// From values in [0, 1] (generated samples), quantised as a PNG would store them.
    pub fn from_unit_floats(
        values: &[f32],
        n: usize,
        channels: usize,
        size: usize,
    ) -> Result<Self, EvalError> {
        if values.len() != n * channels * size * size {
            return Err(EvalError::Input(format!(
                "{} pixel values for {n} images of {channels}×{size}×{size}",
                values.len()
            )));
        }
        let pixels = values
            .par_iter()
            .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        Ok(ImagesU8 {
            pixels,
            n,
            channels,
            height: size,
            width: size,
        })
    }

    fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }
}

/// Features (n × 2048) and bias-free logits (n × 1008) of the FID network.
#[derive(Debug, Clone)]
pub struct InceptionFeatures {
    pub pool: Vec<f32>,
    pub logits: Vec<f32>,
    pub n: usize,
}

/// Run the network over `images` in batches of `batch`; grey images are repeated to 3 channels.
pub fn extract(
    net: &InceptionV3,
    images: &ImagesU8,
    convention: Convention,
    batch: usize,
) -> Result<InceptionFeatures, EvalError> {
    if images.channels != 1 && images.channels != 3 {
        return Err(EvalError::Input(format!(
            "Inception-v3 needs 1- or 3-channel images, got {}",
            images.channels
        )));
    }
    let len = images.image_len();
    let mut pool = Vec::with_capacity(images.n * FEATURE_DIM);
    let mut logits = Vec::with_capacity(images.n * LOGIT_DIM);
    for chunk in images.pixels.chunks(batch.max(1) * len.max(1)) {
        let b = chunk.len() / len;
        let x = Tensor::from_slice(
            chunk,
            (b, images.channels, images.height, images.width),
            net.device(),
        )?;
        let x = if images.channels == 1 {
            x.repeat((1, 3, 1, 1))?
        } else {
            x
        };
        let out = net.forward(&x, convention)?;
        pool.extend(out.pool.flatten_all()?.to_vec1::<f32>()?);
        logits.extend(out.logits.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(InceptionFeatures {
        pool,
        logits,
        n: images.n,
    })
}

/// Every PNG or JPEG of a folder (sorted by name), decoded in parallel to 8-bit RGB; all images must
/// have one size.
pub fn read_folder(dir: &Path) -> Result<ImagesU8, EvalError> {
    let io = |e: std::io::Error| EvalError::Input(format!("{}: {e}", dir.display()));
    if !dir.is_dir() {
        return Err(EvalError::Input(format!(
            "{}: not a folder of images",
            dir.display()
        )));
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| crate::data::folder::is_image(p))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(EvalError::Input(format!(
            "{}: no .png or .jpg images in this folder",
            dir.display()
        )));
    }
    let decoded: Vec<(usize, usize, Vec<u8>)> = files
        .par_iter()
        .map(|p| {
            let img = image::open(p)
                .map_err(|e| EvalError::Input(format!("{}: {e}", p.display())))?
                .to_rgb8();
            let (w, h) = (img.width() as usize, img.height() as usize);
            let hwc = img.into_raw();
            let mut chw = vec![0u8; 3 * h * w];
            for (i, px) in hwc.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    chw[c * h * w + i] = px[c];
                }
            }
            Ok((h, w, chw))
        })
        .collect::<Result<_, EvalError>>()?;
    let (height, width) = (decoded[0].0, decoded[0].1);
    if let Some(i) = decoded
        .iter()
        .position(|(h, w, _)| (*h, *w) != (height, width))
    {
        return Err(EvalError::Input(format!(
            "{}: images differ in size ({} is {}×{}, {} is {}×{}); resize them to one size first",
            dir.display(),
            files[0].display(),
            width,
            height,
            files[i].display(),
            decoded[i].1,
            decoded[i].0
        )));
    }
    let n = decoded.len();
    let pixels = decoded.into_iter().flat_map(|(_, _, p)| p).collect();
    Ok(ImagesU8 {
        pixels,
        n,
        channels: 3,
        height,
        width,
    })
}

/// Read `mu` (d) and `sigma` (d×d) from an `.npz` (float64 or float32; other arrays, such as
/// the ADM suite's `arr_0`, are not read).
pub fn read_stats(path: &Path) -> Result<Gaussian, EvalError> {
    let err = |m: String| EvalError::Stats {
        path: path.display().to_string(),
        message: m,
    };
    if !path.is_file() {
        return Err(err("no such file".into()));
    }
    let npz = candle_core::npy::NpzTensors::new(path)
        .map_err(|e| err(format!("not a readable .npz file: {e}")))?;
    let get = |key: &str| -> Result<Tensor, EvalError> {
        let t = npz
            .get(key)
            .map_err(|e| err(format!("array '{key}': {e}")))?;
        t.ok_or_else(|| {
            let mut names: Vec<String> = npz.names().into_iter().cloned().collect();
            names.sort();
            err(format!(
                "no array '{key}' (it holds: {}); expected 'mu' and 'sigma' as written by pytorch-fid",
                names.join(", ")
            ))
        })
    };
    let mu = get("mu")?;
    let sigma = get("sigma")?;
    let d = mu.elem_count();
    if mu.rank() != 1 || sigma.dims() != [d, d] {
        return Err(err(format!(
            "'mu' has shape {:?} and 'sigma' {:?}; expected (d) and (d, d)",
            mu.dims(),
            sigma.dims()
        )));
    }
    let to_vec = |t: Tensor| -> Result<Vec<f64>, EvalError> {
        Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
    };
    let g = Gaussian {
        mu: to_vec(mu)?,
        sigma: to_vec(sigma)?,
        dim: d,
        n: 0,
    };
    g.validate().map_err(|e| err(e.to_string()))?;
    check_covariance(&g.sigma, d).map_err(err)?;
    Ok(g)
}

/// `sigma` must be a covariance, or the Fréchet distance is meaningless (a negative diagonal gave
/// "FID: -198", an asymmetric matrix 0): symmetric to 1e-6 of its largest entry, with a
/// non-negative diagonal, and positive semi-definite: no eigenvalue below −1e-6 of the largest
/// (rounding leaves a singular covariance's zero eigenvalues slightly negative).
fn check_covariance(sigma: &[f64], d: usize) -> Result<(), String> {
    let scale = sigma.iter().fold(0f64, |m, v| m.max(v.abs()));
    for i in 0..d {
        let v = sigma[i * d + i];
        if v < 0.0 {
            return Err(format!(
                "'sigma' is not a covariance: its diagonal entry ({i}, {i}) is {v}, a variance must be ≥ 0"
            ));
        }
        for j in i + 1..d {
            let (a, b) = (sigma[i * d + j], sigma[j * d + i]);
            if (a - b).abs() > 1e-6 * scale {
                return Err(format!(
                    "'sigma' is not a covariance: it is not symmetric, ({i}, {j}) is {a} but ({j}, {i}) is {b}"
                ));
            }
        }
    }
    let m = faer::Mat::<f64>::from_fn(d, d, |i, j| sigma[i * d + j]);
    let eigenvalues = m
        .self_adjoint_eigenvalues(faer::Side::Lower)
        .map_err(|_| "'sigma': its eigendecomposition did not converge".to_string())?;
    let largest = eigenvalues.iter().fold(0f64, |a, l| a.max(l.abs()));
    if let Some(&lowest) = eigenvalues.iter().min_by(|a, b| a.total_cmp(b)) {
        if lowest < -1e-6 * largest {
            return Err(format!(
                "'sigma' is not a covariance: it has a negative eigenvalue ({lowest:.4e}, the \
                 largest is {largest:.4e}), a covariance is positive semi-definite"
            ));
        }
    }
    Ok(())
}

/// Write `mu` and `sigma` as float64 arrays to an `.npz` (readable by pytorch-fid and NumPy).
pub fn write_stats(path: &Path, g: &Gaussian) -> Result<(), EvalError> {
    let err = |m: String| EvalError::Stats {
        path: path.display().to_string(),
        message: m,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        db::files::create_folder(dir).map_err(|e| err(e.to_string()))?;
    }
    let mu = Tensor::from_slice(&g.mu, g.dim, &Device::Cpu)?;
    let sigma = Tensor::from_slice(&g.sigma, (g.dim, g.dim), &Device::Cpu)?;
    db::files::write_atomic(path, |tmp| {
        Tensor::write_npz(&[("mu", &mu), ("sigma", &sigma)], tmp)
    })
    .map_err(|e| err(e.to_string()))
}

/// Write reference statistics with the features they came from (the extra `features` array is
/// ignored by pytorch-fid; KID and precision / recall need it).
pub fn write_reference(path: &Path, g: &Gaussian, features: &[f32]) -> Result<(), EvalError> {
    let err = |m: String| EvalError::Stats {
        path: path.display().to_string(),
        message: m,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        db::files::create_folder(dir).map_err(|e| err(e.to_string()))?;
    }
    let n = features.len() / g.dim.max(1);
    let mu = Tensor::from_slice(&g.mu, g.dim, &Device::Cpu)?;
    let sigma = Tensor::from_slice(&g.sigma, (g.dim, g.dim), &Device::Cpu)?;
    let feats = Tensor::from_slice(features, (n, g.dim), &Device::Cpu)?;
    db::files::write_atomic(path, |tmp| {
        Tensor::write_npz(&[("mu", &mu), ("sigma", &sigma), ("features", &feats)], tmp)
    })
    .map_err(|e| err(e.to_string()))
}

/// Read what [`write_reference`] wrote: the statistics (with their sample count) and features.
pub fn read_reference(path: &Path) -> Result<(Gaussian, Vec<f32>), EvalError> {
    let mut g = read_stats(path)?;
    let err = |m: String| EvalError::Stats {
        path: path.display().to_string(),
        message: m,
    };
    let npz = candle_core::npy::NpzTensors::new(path).map_err(|e| err(e.to_string()))?;
    let feats = npz
        .get("features")
        .map_err(|e| err(e.to_string()))?
        .ok_or_else(|| err("no array 'features'".into()))?;
    let (n, d) = feats.dims2()?;
    if d != g.dim {
        return Err(err(format!("features are {d}-d, statistics {}-d", g.dim)));
    }
    g.n = n;
    Ok((g, feats.flatten_all()?.to_vec1::<f32>()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_round_trip_and_missing_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = Gaussian {
            mu: vec![1.0, -2.5, 3.25],
            sigma: vec![2.0, 0.1, 0.0, 0.1, 1.0, 0.3, 0.0, 0.3, 4.0],
            dim: 3,
            n: 0,
        };
        let p = dir.path().join("s.npz");
        write_stats(&p, &g).expect("write");
        assert_eq!(read_stats(&p).expect("read"), g);

        let bad = dir.path().join("bad.npz");
        let t = Tensor::from_slice(&[1.0f64, 2.0], 2, &Device::Cpu).expect("tensor");
        Tensor::write_npz(&[("mean", &t)], &bad).expect("npz");
        let e = read_stats(&bad).expect_err("no mu").to_string();
        assert!(e.contains("bad.npz") && e.contains("'mu'"), "{e}");
    }

    #[test]
    fn sigma_must_be_a_covariance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s.npz");
        let write = |sigma: Vec<f64>| {
            let g = Gaussian {
                mu: vec![0.0, 0.0],
                sigma,
                dim: 2,
                n: 0,
            };
            write_stats(&p, &g).expect("write");
        };
        write(vec![-1.0, 0.0, 0.0, 1.0]);
        let e = read_stats(&p).expect_err("negative variance").to_string();
        assert!(
            e.contains("s.npz") && e.contains("(0, 0)") && e.contains("≥ 0"),
            "{e}"
        );
        write(vec![1.0, 0.5, -0.5, 1.0]);
        let e = read_stats(&p).expect_err("asymmetric").to_string();
        assert!(e.contains("not symmetric") && e.contains("(0, 1)"), "{e}");
        // symmetric with a positive diagonal, but indefinite: eigenvalues 3 and −1
        write(vec![1.0, 2.0, 2.0, 1.0]);
        let e = read_stats(&p).expect_err("indefinite").to_string();
        assert!(e.contains("negative eigenvalue (-1"), "{e}");
        write(vec![1.0, 0.5, 0.5, 1.0]);
        read_stats(&p).expect("a covariance");
    }

    #[test]
    fn missing_and_misshaped_weights_name_the_tensor() {
        let mut t: HashMap<String, Tensor> = expected_tensors()
            .into_iter()
            .map(|(n, s)| {
                let z = Tensor::zeros(s, DType::F32, &Device::Cpu).expect("zeros");
                (n, z)
            })
            .collect();
        let p = Path::new("w.safetensors");
        check_tensors(p, &t).expect("complete");
        t.remove("Mixed_6c.branch7x7_2.conv.weight");
        let e = check_tensors(p, &t).expect_err("missing").to_string();
        assert!(
            e.contains("missing tensor 'Mixed_6c.branch7x7_2.conv.weight'"),
            "{e}"
        );
        t.insert(
            "Mixed_6c.branch7x7_2.conv.weight".into(),
            Tensor::zeros((160, 160, 7, 1), DType::F32, &Device::Cpu).expect("zeros"),
        );
        let e = check_tensors(p, &t).expect_err("mis-shaped").to_string();
        assert!(
            e.contains("'Mixed_6c.branch7x7_2.conv.weight' has shape [160, 160, 7, 1]"),
            "{e}"
        );
    }
}
