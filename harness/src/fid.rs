//! `ablate fid A B`: FID between two image folders or `.npz` statistics (pytorch-fid's format),
//! IS of folders, and `--save-stats FOLDER OUT.npz`.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use models::inception::Convention;

use harness::eval::inception::{load_inception, read_folder, read_stats, write_stats};
use harness::eval::metrics::{self, Gaussian};
use harness::eval::net::load_classifier;
use harness::eval::{Features, FewSamples, Net};
use harness::layout::Layout;
use harness::Error::Usage;

#[derive(Debug, Clone)]
pub struct FidOptions {
    pub paths: Vec<PathBuf>,
    pub save_stats: bool,
    pub is: bool,
    pub weights: Option<PathBuf>,
    pub convention: String,
    pub feature_net: Option<String>,
    pub batch: usize,
}

/// Build the feature net the options ask for.
pub fn feature_net(layout: &Layout, o: &FidOptions, device: &Device) -> Result<Net> {
    if let Some(spec) = &o.feature_net {
        let Some(run) = spec.strip_prefix("classifier:") else {
            if spec == "inception" {
                return inception(layout, o, device);
            }
            return Err(Usage(format!(
                "--feature-net: expected inception or classifier:RUN, found '{spec}'"
            ))
            .into());
        };
        let path = classifier_checkpoint(layout, run)?;
        return Ok(load_classifier(&path, device)?);
    }
    inception(layout, o, device)
}

fn inception(layout: &Layout, o: &FidOptions, device: &Device) -> Result<Net> {
    let convention = Convention::parse(&o.convention).ok_or_else(|| {
        Usage(format!(
            "--convention: expected torch-fidelity or pytorch-fid, found '{}'",
            o.convention
        ))
    })?;
    let path = layout.inception_weights(o.weights.as_deref())?;
    Ok(Net::Inception {
        net: Box::new(load_inception(&path, device)?),
        convention,
        batch: o.batch.max(1),
    })
}

/// The checkpoint of a classifier feature-net run: a run id of the database, or its hash.
fn classifier_checkpoint(layout: &Layout, run: &str) -> Result<PathBuf> {
    let hash = match run.parse::<i64>() {
        Ok(id) => {
            let db = layout.open_existing_db().with_context(|| {
                format!("opening the tracking database {}", layout.db_location())
            })?;
            let row = db
                .run(id)?
                .ok_or_else(|| Usage(format!("--feature-net: no run {id}")))?;
            if row.kind != db::RunKind::Classifier {
                return Err(Usage(format!(
                    "--feature-net: run {id} is a {} run, not a feature-net (classifier) run",
                    row.kind
                ))
                .into());
            }
            row.hash
        }
        Err(_) => run.to_string(),
    };
    Ok(layout.classifier(&hash))
}

/// Statistics (and, for folders, features) of one side.
struct Side {
    stats: Gaussian,
    features: Option<Features>,
}

fn is_npz(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.eq_ignore_ascii_case("npz"))
        .unwrap_or(false)
}

fn side(path: &Path, net: &mut Option<Net>, make: &dyn Fn() -> Result<Net>) -> Result<Side> {
    if is_npz(path) {
        return Ok(Side {
            stats: read_stats(path)?,
            features: None,
        });
    }
    let images = read_folder(path)?;
    if net.is_none() {
        *net = Some(make()?);
    }
    let Some(net) = net.as_ref() else {
        bail!("feature net not built")
    };
    let f = net.features_u8(&images)?;
    if let Some(few) = FewSamples::of(f.n, f.dim) {
        eprintln!("{}", few.warning(&path.display().to_string(), f.n, f.dim));
    }
    let stats = metrics::gaussian_stats(&f.feats, f.n, f.dim)?;
    Ok(Side {
        stats,
        features: Some(f),
    })
}

/// Run `ablate fid`; prints the results on stdout.
pub fn run(layout: &Layout, o: &FidOptions) -> Result<()> {
    let device = Device::Cpu;
    if o.paths.len() != 2 {
        return Err(Usage(if o.save_stats {
            "usage: ablate fid --save-stats FOLDER OUT.npz".into()
        } else {
            "usage: ablate fid A B (each an image folder or an .npz with mu and sigma)".into()
        })
        .into());
    }
    let make = || feature_net(layout, o, &device);
    let mut net: Option<Net> = None;
    if o.save_stats {
        let (folder, out) = (&o.paths[0], &o.paths[1]);
        if is_npz(folder) {
            return Err(Usage(format!(
                "--save-stats: {} is already statistics; give an image folder",
                folder.display()
            ))
            .into());
        }
        let s = side(folder, &mut net, &make)?;
        write_stats(out, &s.stats)?;
        println!(
            "statistics of {} images written to {}",
            s.features.map(|f| f.n).unwrap_or(0),
            out.display()
        );
        return Ok(());
    }
    let a = side(&o.paths[0], &mut net, &make)?;
    let b = side(&o.paths[1], &mut net, &make)?;
    if a.stats.dim != b.stats.dim {
        bail!(
            "{} has {}-d statistics and {} {}-d: they come from different feature nets",
            o.paths[0].display(),
            a.stats.dim,
            o.paths[1].display(),
            b.stats.dim
        );
    }
    let fid = metrics::frechet_distance(&a.stats, &b.stats)?;
    println!("FID: {fid:.6}");
    if o.is {
        let mut any = false;
        for (path, s) in o.paths.iter().zip([&a, &b]) {
            if let Some(f) = &s.features {
                let (mean, std) = metrics::inception_score(&f.logits, f.n, f.classes, 10)?;
                println!("IS ({}): {mean:.6} ± {std:.6}", path.display());
                any = true;
            }
        }
        if !any {
            eprintln!("warning: --is needs an image folder; .npz statistics hold no logits");
        }
    }
    Ok(())
}
