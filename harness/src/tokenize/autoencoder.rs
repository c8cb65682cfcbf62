//! Training, saving and loading the `vq` / `kl` autoencoder tokenizers.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use models::autoencoder::{code_usage, Autoencoder, AutoencoderConfig, Bottleneck};
use models::init::{frozen_var_builder, seeded_var_builder};
use models::Rng;

use super::{Backend, TokenizeError, TrainLog};
use crate::data::ImageSet;
use crate::spec::{TokenizerKind, TokenizerSpec};
use crate::train::{AdamW, Checkpoint, TrainError};

/// Name of the latent scale in a saved tokenizer.
const SCALE: &str = "tokenizer.scale";
/// Name of the VQ codebook variable (reference name of taming-transformers' quantizer).
const CODEBOOK: &str = "quantize.embedding.weight";
/// Training metrics are reported every this many steps (and at the last step).
const LOG_EVERY: usize = 25;
/// Linear warm-up of the learning rate over the first steps.
const WARMUP: usize = 50;

pub fn config(spec: &TokenizerSpec, channels: usize) -> AutoencoderConfig {
    AutoencoderConfig {
        in_channels: channels,
        width: spec.width,
        downsample: spec.downsample,
        latent_dim: spec.latent_dim,
        bottleneck: match spec.kind {
            TokenizerKind::Vq => Bottleneck::Vq {
                codebook: spec.codebook,
                beta: spec.beta,
            },
            _ => Bottleneck::Kl {
                kl_weight: spec.kl_weight,
            },
        },
    }
}

/// A trained autoencoder: its variables and the latent scale.
pub struct Trained {
    pub varmap: VarMap,
    pub scale: f64,
}

/// The images at `idx` on the autoencoder's [-1, 1] scale.
fn batch_tensor(set: &ImageSet, idx: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    set.batch_tensor(idx, device)?.affine(2.0, -1.0)
}

/// Where and how often a tokenizer fit saves its state, so a killed fit resumes instead of
/// starting over.
#[derive(Clone, Copy)]
pub struct CheckpointPlan<'a> {
    pub dir: &'a Path,
    /// steps between checkpoints; a multiple of the logging interval keeps the logged means exact
    pub every: usize,
    /// Told, when the fit found checkpoints, the step it continues from (0 when it starts over)
    /// and, when damaged checkpoints were passed over, what happened.
    pub on_resume: &'a dyn Fn(usize, Option<&str>),
}

/// Trains the autoencoder with Adam (no weight decay), linear warm-up, gradient clipping at 1.0
/// and, for VQ, restarts of codes unused over the last `restart_every` steps from encoder outputs.
/// With a checkpoint plan it continues from the last checkpoint in `dir` (weights, moments,
/// random stream, code-use counters): the result equals an uninterrupted fit.
pub fn train(
    spec: &TokenizerSpec,
    train: &ImageSet,
    seed: u64,
    device: &Device,
    checkpoint: Option<CheckpointPlan>,
    log: &mut TrainLog,
) -> Result<Trained, TokenizeError> {
    let cfg = config(spec, train.channels);
    let varmap = VarMap::new();
    let model = Autoencoder::new(&cfg, seeded_var_builder(&varmap, seed, DType::F32, device))?;
    let mut opt = AdamW::new(&varmap, 0.0, 0.9, 0.999)?;
    let mut rng = Rng::new(seed ^ 0xAE00_0001);
    let vocab = match cfg.bottleneck {
        Bottleneck::Vq { codebook, .. } => codebook,
        Bottleneck::Kl { .. } => 0,
    };
    let mut since_restart = vec![0usize; vocab];
    let (mut loss_sum, mut recon_sum, mut reg_sum, mut count) = (0f64, 0f64, 0f64, 0usize);
    let mut restarted = 0usize;
    let mut start = 0;
    if let Some(plan) = checkpoint {
        let loaded = Checkpoint::load(plan.dir, &varmap, &mut opt, None)?;
        if loaded.resume.is_some() || loaded.recovered.is_some() {
            let step = loaded.resume.as_ref().map_or(0, |r| r.step);
            (plan.on_resume)(step, loaded.recovered.as_deref());
        }
        if let Some(resume) = loaded.resume {
            let bad = |message: String| TrainError::Checkpoint {
                path: plan.dir.to_path_buf(),
                message,
            };
            let state: CodeState = serde_json::from_value(resume.extra)
                .map_err(|e| bad(format!("checkpoint.json: unreadable tokenizer state: {e}")))?;
            if state.since_restart.len() != vocab {
                return Err(bad(format!(
                    "checkpoint.json counts {} codes, the tokenizer has {vocab}",
                    state.since_restart.len()
                ))
                .into());
            }
            (since_restart, restarted) = (state.since_restart, state.restarted);
            (loss_sum, recon_sum, reg_sum, count) = state.log_sums;
            rng = resume.rng.unwrap_or(rng);
            start = resume.step;
        }
    }
    for step in start..spec.steps {
        let idx: Vec<usize> = (0..spec.batch).map(|_| rng.below(train.n)).collect();
        let x = batch_tensor(train, &idx, device)?;
        let out = model.losses(&x, &mut rng)?;
        let loss = out.loss.to_scalar::<f32>()?;
        if !loss.is_finite() {
            return Err(TokenizeError::Diverged { step, loss });
        }
        let lr = spec.lr * ((step + 1) as f64 / WARMUP as f64).min(1.0);
        opt.clipped_step(&out.loss.backward()?, 1.0, lr)?;
        loss_sum += loss as f64;
        recon_sum += out.recon.to_scalar::<f32>()? as f64;
        reg_sum += out.reg.to_scalar::<f32>()? as f64;
        count += 1;
        // this batch's codes (VQ), read from the device once
        let codes: Vec<u32> = match &out.codes {
            Some(c) => c.to_vec1()?,
            None => Vec::new(),
        };
        if let Some(latents) = &out.latents {
            for &c in &codes {
                since_restart[c as usize] += 1;
            }
            if spec.restart_every > 0 && (step + 1) % spec.restart_every == 0 {
                restarted += restart_dead_codes(&varmap, &since_restart, latents, &mut rng)?;
                since_restart.iter_mut().for_each(|n| *n = 0);
            }
        }
        if (step + 1) % LOG_EVERY == 0 || step + 1 == spec.steps {
            let n = count as f64;
            let reg_key = if vocab > 0 {
                "train/vq_loss"
            } else {
                "train/kl"
            };
            let mut values = vec![
                ("train/loss", loss_sum / n),
                ("train/recon_mse", recon_sum / n),
                (reg_key, reg_sum / n),
                ("train/lr", lr),
            ];
            if vocab > 0 {
                values.push(("train/batch_codes_used", code_usage(&codes, vocab).0 as f64));
                values.push(("train/codes_restarted", restarted as f64));
            }
            log(step + 1, &values);
            (loss_sum, recon_sum, reg_sum, count) = (0.0, 0.0, 0.0, 0);
        }
        let stop = crate::stop::requested();
        if let Some(plan) = checkpoint {
            let due = (step + 1) % plan.every.max(1) == 0 || stop.is_some();
            if due && step + 1 < spec.steps {
                let state = CodeState {
                    since_restart: since_restart.clone(),
                    restarted,
                    log_sums: (loss_sum, recon_sum, reg_sum, count),
                };
                Checkpoint::save(plan.dir, &varmap, &opt, None, step + 1, &rng, &state)?;
            }
        }
        if let Some(sig) = stop {
            return Err(TokenizeError::Stopped(crate::stop::Stopped(sig)));
        }
    }
    let scale = match (spec.kind, spec.scale) {
        (TokenizerKind::Kl, Some(s)) => s,
        (TokenizerKind::Kl, None) => {
            let frozen = Autoencoder::new(&cfg, frozen_var_builder(&varmap, DType::F32, device)?)?;
            1.0 / latent_std(&frozen, train, device)?
        }
        _ => 1.0,
    };
    Ok(Trained { varmap, scale })
}

/// A VQ fit's code-use counters, kept in its checkpoints (empty for KL).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CodeState {
    since_restart: Vec<usize>,
    restarted: usize,
    /// the curve's running sums since its last logged step (a stop between two; absent in
    /// checkpoints of earlier versions)
    #[serde(default)]
    log_sums: (f64, f64, f64, usize),
}

/// Standard deviation of the posterior means over the training split (LDM's scale factor is
/// 1/std of the latents; MAR's KL-16 uses a fixed 0.2325).
fn latent_std(
    model: &Autoencoder,
    train: &ImageSet,
    device: &Device,
) -> Result<f64, TokenizeError> {
    let (mut sum, mut sq, mut n) = (0f64, 0f64, 0f64);
    let all: Vec<usize> = (0..train.n).collect();
    for chunk in all.chunks(super::AE_BATCH) {
        let z = model.encode(&batch_tensor(train, chunk, device)?)?;
        for v in z.flatten_all()?.to_vec1::<f32>()? {
            sum += v as f64;
            sq += (v as f64).powi(2);
            n += 1.0;
        }
    }
    let var = (sq / n - (sum / n).powi(2)).max(0.0);
    if var <= 1e-12 || !var.is_finite() {
        return Err(TokenizeError::File {
            path: String::new(),
            message: "KL latents have zero variance; cannot compute the latent scale".into(),
        });
    }
    Ok(var.sqrt())
}

/// Re-seeds every code with no use since the last restart with a random encoder output of the
/// current batch (Dhariwal et al. 2020, Jukebox; Zeghidour et al. 2021); the number restarted.
fn restart_dead_codes(
    varmap: &VarMap,
    uses: &[usize],
    latents: &Tensor,
    rng: &mut Rng,
) -> Result<usize, TokenizeError> {
    let dead: Vec<usize> = (0..uses.len()).filter(|&i| uses[i] == 0).collect();
    if dead.is_empty() {
        return Ok(0);
    }
    let data = varmap.data().lock().map_err(|_| TokenizeError::File {
        path: String::new(),
        message: "variable map lock poisoned".into(),
    })?;
    let Some(var) = data.get(CODEBOOK) else {
        return Ok(0);
    };
    let mut codebook = var.as_tensor().to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let candidates = latents.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    if candidates.is_empty() {
        return Ok(0);
    }
    for &d in &dead {
        codebook[d] = candidates[rng.below(candidates.len())].clone();
    }
    let (k, dim) = (codebook.len(), codebook[0].len());
    let flat: Vec<f32> = codebook.into_iter().flatten().collect();
    var.set(&Tensor::from_vec(flat, (k, dim), var.device())?.to_dtype(var.dtype())?)?;
    Ok(dead.len())
}

/// The inference backend of a trained autoencoder (detached weights: no autograd graph).
pub fn backend(
    spec: &TokenizerSpec,
    trained: &Trained,
    train: &ImageSet,
    device: &Device,
) -> Result<Backend, TokenizeError> {
    let weights: HashMap<String, Tensor> = {
        let data = trained
            .varmap
            .data()
            .lock()
            .map_err(|_| TokenizeError::File {
                path: String::new(),
                message: "variable map lock poisoned".into(),
            })?;
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect()
    };
    build(spec, train.channels, weights, trained.scale, device)
}

fn build(
    spec: &TokenizerSpec,
    channels: usize,
    weights: HashMap<String, Tensor>,
    scale: f64,
    device: &Device,
) -> Result<Backend, TokenizeError> {
    let vb = candle_nn::VarBuilder::from_tensors(weights.clone(), DType::F32, device);
    let model = Autoencoder::new(&config(spec, channels), vb)?;
    Ok(Backend::Autoencoder {
        model: Box::new(model),
        weights,
        scale,
        device: device.clone(),
    })
}

/// The weights under their names plus the latent scale, as saved in one safetensors file.
pub fn tensors(
    weights: &HashMap<String, Tensor>,
    scale: f64,
) -> Result<HashMap<String, Tensor>, TokenizeError> {
    let mut t = weights.clone();
    t.insert(
        SCALE.to_string(),
        Tensor::new(&[scale as f32], &Device::Cpu)?,
    );
    Ok(t)
}

/// Loads an autoencoder tokenizer saved by [`save`]; a missing or mis-shaped tensor is named.
pub fn load(
    spec: &TokenizerSpec,
    channels: usize,
    path: &Path,
    device: &Device,
) -> Result<Backend, TokenizeError> {
    let file_err = |message: String| TokenizeError::File {
        path: path.display().to_string(),
        message,
    };
    let mut tensors =
        candle_core::safetensors::load(path, device).map_err(|e| file_err(e.to_string()))?;
    let scale = tensors
        .remove(SCALE)
        .ok_or_else(|| file_err(format!("no '{SCALE}' tensor")))?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?
        .first()
        .copied()
        .unwrap_or(1.0) as f64;
    build(spec, channels, tensors, scale, device).map_err(|e| file_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::super::{TokenData, Tokenizer};
    use super::*;
    use crate::data::synthetic::{generate, SyntheticConfig};

    fn spec(kind: &str, steps: usize) -> TokenizerSpec {
        let src = format!(
            "kind = \"{kind}\"\ndownsample = 4\nwidth = 8\nlatent_dim = 4\ncodebook = 32\n\
             restart_every = 10\nsteps = {steps}\nbatch = 16\nlr = 3e-3\n"
        );
        toml::from_str(&src).unwrap()
    }

    fn data() -> (ImageSet, ImageSet) {
        generate(&SyntheticConfig {
            classes: 4,
            image_size: 16,
            train: 200,
            test: 40,
            seed: 3,
        })
    }

    /// Reconstruction MSE on the held-out split after `steps` steps.
    fn mse_after(kind: &str, steps: usize) -> (f64, Tokenizer, Vec<usize>) {
        let (train, test) = data();
        let mut logged = Vec::new();
        let tok = Tokenizer::fit(
            &spec(kind, steps),
            &train,
            0,
            &Device::Cpu,
            None,
            &mut |s, _| logged.push(s),
        )
        .unwrap();
        let (rec, mse, _) = tok.reconstruct(&test).unwrap();
        assert_eq!((rec.n, rec.channels, rec.size), (40, 3, 16));
        (mse, tok, logged)
    }

    #[test]
    fn kl_reconstruction_improves_with_training() {
        let (before, _, _) = mse_after("kl", 1);
        let (after, tok, logged) = mse_after("kl", 60);
        assert!(after < 0.7 * before, "MSE {before} → {after}");
        assert_eq!(logged, vec![25, 50, 60]);
        // tokens are the scaled posterior means: unit standard deviation over the training split
        let (train, _) = data();
        let TokenData::Continuous(v) = tok.encode(&train).unwrap() else {
            panic!("KL tokens are continuous")
        };
        assert_eq!(v.len(), 200 * tok.seq_len() * tok.token_dim());
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!((var.sqrt() - 1.0).abs() < 1e-3, "std {}", var.sqrt());
    }

    #[test]
    fn vq_reconstruction_improves_and_codes_are_used() {
        let (before, _, _) = mse_after("vq", 1);
        let (after, tok, _) = mse_after("vq", 60);
        assert!(after < 0.7 * before, "MSE {before} → {after}");
        let (train, _) = data();
        let codes = tok.encode(&train).unwrap();
        assert!(matches!(codes, TokenData::Discrete(ref c) if c.len() == 200 * 16));
        let (used, perplexity) = tok.usage(&codes).unwrap();
        // dead-code restarts keep more than a handful of the 32 codes alive
        assert!(
            used >= 8 && perplexity > 4.0,
            "used {used}, perplexity {perplexity}"
        );
    }

    #[test]
    fn save_and_load_give_the_same_tokens() {
        let (_, tok, _) = mse_after("vq", 5);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        tok.save(&path).unwrap();
        let back = Tokenizer::load(&spec("vq", 5), 3, 16, &path, &Device::Cpu).unwrap();
        let (_, test) = data();
        let (a, b) = (tok.encode(&test).unwrap(), back.encode(&test).unwrap());
        match (a, b) {
            (TokenData::Discrete(a), TokenData::Discrete(b)) => assert_eq!(a, b),
            _ => panic!("VQ tokens are discrete"),
        }
        // a file missing a weight names it
        let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        t.remove("decoder.conv_out.weight");
        candle_core::safetensors::save(&t, &path).unwrap();
        let e = Tokenizer::load(&spec("vq", 5), 3, 16, &path, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("decoder.conv_out.weight"), "{e}");
    }

    /// A fit stopped after a checkpoint and started again ends with the same weights as one that
    /// ran through (weights, moments, random stream and code-use counters all restored), and
    /// logs each step once.
    #[test]
    fn a_stopped_fit_resumes_to_the_same_weights() {
        let (train, _) = data();
        let dir = tempfile::tempdir().unwrap();
        let fit = |steps: usize, ckpt: &Path, logged: &mut Vec<usize>| {
            let plan = CheckpointPlan {
                dir: ckpt,
                every: 25,
                on_resume: &|_, _| {},
            };
            super::train(
                &spec("vq", steps),
                &train,
                0,
                &Device::Cpu,
                Some(plan),
                &mut |s, _| logged.push(s),
            )
            .unwrap()
        };
        let mut straight = Vec::new();
        let whole = fit(60, &dir.path().join("a"), &mut straight);
        // "killed" at step 55: its last checkpoint is step 50
        let b = dir.path().join("b");
        let mut first = Vec::new();
        fit(55, &b, &mut first);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(b.join("checkpoint.json")).unwrap())
                .unwrap();
        assert_eq!(meta["step"], 50);
        assert_eq!(meta["extra"]["since_restart"].as_array().unwrap().len(), 32);
        let mut second = Vec::new();
        let resumed = fit(60, &b, &mut second);
        assert_eq!(second, vec![60], "steps 51–60 only");
        assert_eq!(straight, vec![25, 50, 60]);
        let (wa, wb) = (sorted(&whole.varmap), sorted(&resumed.varmap));
        assert_eq!(wa.len(), wb.len());
        for ((name, a), (_, b)) in wa.iter().zip(&wb) {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
        // the newest two weights files are kept (the previous one is the fallback)
        let mut files: Vec<String> = std::fs::read_dir(&b)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f.ends_with(".safetensors"))
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "checkpoint-00000025.safetensors",
                "checkpoint-00000050.safetensors"
            ]
        );
    }

    fn sorted(varmap: &VarMap) -> Vec<(String, Tensor)> {
        crate::train::sorted_vars(varmap)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect()
    }
}
