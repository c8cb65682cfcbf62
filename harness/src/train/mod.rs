//! Training machinery shared by every stage: AdamW with no-decay groups, global-norm gradient
//! clipping, the warm-up learning-rate schedule, and checkpoints that resume exactly.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use models::fused::{self, AdamWStep};
use models::Rng;

use crate::spec::{LrScheduleSpec, TrainSpec};

pub mod collective;
pub mod generator;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod ranks;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] models::Error),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("training diverged at step {step}: loss is {loss}")]
    Diverged { step: usize, loss: f32 },
}

/// One parameter under AdamW.
struct Param {
    name: String,
    var: Var,
    decay: bool,
    /// the first and second moments stacked, `[m; v]`, as [`models::fused::adamw`] takes them
    moments: Tensor,
}

/// AdamW (Loshchilov & Hutter 2019) with per-parameter weight-decay groups and inspectable state,
/// so a checkpoint holds the moments and resuming continues the same trajectory.
pub struct AdamW {
    params: Vec<Param>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub t: usize,
}

/// The variables of a `VarMap` in name order, so optimizer and EMA state line up deterministically.
pub fn sorted_vars(varmap: &VarMap) -> candle_core::Result<Vec<(String, Var)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}

/// No weight decay on biases, norms, 1-D parameters, and the Diffusion Loss MLP (DESIGN.md).
pub fn decays(name: &str, var: &Var) -> bool {
    !(var.rank() <= 1
        || name.ends_with(".bias")
        || name.contains("norm")
        || name.contains("diffloss"))
}

impl AdamW {
    pub fn new(
        varmap: &VarMap,
        weight_decay: f64,
        beta1: f64,
        beta2: f64,
    ) -> candle_core::Result<Self> {
        let params = sorted_vars(varmap)?
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.zeros_like()?;
                Ok(Param {
                    decay: decays(&name, &var),
                    name,
                    moments: Tensor::stack(&[&zeros, &zeros], 0)?,
                    var,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            params,
            beta1,
            beta2,
            eps: 1e-8,
            weight_decay,
            t: 0,
        })
    }

    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.params.iter().map(|p| &p.var)
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> candle_core::Result<()> {
        self.scaled_step(grads, lr, 1.0)
    }

    /// One update with learning rate `lr` of the gradients times `grad_scale` (clipping's
    /// factor, applied inside the update: no pass of its own over the gradients).
    pub fn scaled_step(
        &mut self,
        grads: &GradStore,
        lr: f64,
        grad_scale: f64,
    ) -> candle_core::Result<()> {
        self.t += 1;
        let (beta1, beta2, eps, t) = (self.beta1, self.beta2, self.eps, self.t);
        let with_decay =
            AdamWStep::new(beta1, beta2, eps, lr, self.weight_decay, t).with_grad_scale(grad_scale);
        let without_decay =
            AdamWStep::new(beta1, beta2, eps, lr, 0.0, t).with_grad_scale(grad_scale);
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            // candle leaves a variable's gradient attached to the graph of the step that made it
            // (its activations): detached, the moments do not chain every step's graph together
            let g = &g.detach();
            let step = if p.decay { &with_decay } else { &without_decay };
            let (theta, moments) = fused::adamw(&p.var.as_tensor().detach(), &p.moments, g, step)?;
            p.moments = moments;
            p.var.set(&theta)?;
        }
        Ok(())
    }

    /// The optimizer step of every training loop: clip the gradients to a global L2 norm of
    /// `max_norm`, then one update with learning rate `lr`; the norm before clipping.
    pub fn clipped_step(
        &mut self,
        grads: &GradStore,
        max_norm: f64,
        lr: f64,
    ) -> candle_core::Result<f64> {
        let vars: Vec<Var> = self.vars().cloned().collect();
        let (norm, scale) = clip_factor(grads, &vars, max_norm)?;
        self.scaled_step(grads, lr, scale)?;
        Ok(norm)
    }

    /// Moments keyed `adam.m.NAME` / `adam.v.NAME`, for the checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for p in &self.params {
            for (i, key) in ["m", "v"].into_iter().enumerate() {
                if let Ok(moment) = p.moments.get(i) {
                    out.insert(format!("adam.{key}.{}", p.name), moment);
                }
            }
        }
        out
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, t: usize) -> Result<(), String> {
        for p in &mut self.params {
            let m = state
                .get(&format!("adam.m.{}", p.name))
                .ok_or_else(|| format!("missing adam.m.{}", p.name))?;
            let v = state
                .get(&format!("adam.v.{}", p.name))
                .ok_or_else(|| format!("missing adam.v.{}", p.name))?;
            if m.shape() != p.var.shape() || v.shape() != p.var.shape() {
                return Err(format!("optimizer state of {} has the wrong shape", p.name));
            }
            p.moments = Tensor::stack(&[m, v], 0).map_err(|e| format!("{}: {e}", p.name))?;
        }
        self.t = t;
        Ok(())
    }
}

/// Exponential moving average of the weights, used for evaluation (MAR evaluates EMA weights).
/// The decay ramps up as min(decay, (1 + t) / (10 + t)) so short runs get a usable average.
pub struct Ema {
    pub decay: f64,
    shadow: Vec<(String, Var, Tensor)>,
}

impl Ema {
    pub fn new(varmap: &VarMap, decay: f64) -> candle_core::Result<Self> {
        let shadow = sorted_vars(varmap)?
            .into_iter()
            .map(|(n, var)| {
                let avg = var.as_tensor().detach().copy()?;
                Ok((n, var, avg))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Ema { decay, shadow })
    }

    /// Fold in the current weights after optimizer step `t` (1-based).
    pub fn update(&mut self, t: usize) -> candle_core::Result<()> {
        let d = self.decay.min((1.0 + t as f64) / (10.0 + t as f64));
        for (_, var, avg) in &mut self.shadow {
            *avg = ((&*avg * d)? + (var.as_tensor().detach() * (1.0 - d))?)?;
        }
        Ok(())
    }

    /// The averaged weights under the parameter names.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.shadow
            .iter()
            .map(|(n, _, t)| (n.clone(), t.clone()))
            .collect()
    }

    /// Entries `ema.NAME`, for the checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        self.shadow
            .iter()
            .map(|(n, _, t)| (format!("ema.{n}"), t.clone()))
            .collect()
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<(), String> {
        for (n, var, avg) in &mut self.shadow {
            let t = state
                .get(&format!("ema.{n}"))
                .ok_or_else(|| format!("missing ema.{n}"))?;
            if t.shape() != var.shape() {
                return Err(format!("EMA weights of {n} have the wrong shape"));
            }
            *avg = t.clone();
        }
        Ok(())
    }
}

/// Clipping to a global L2 norm of `max_norm` (as torch's `clip_grad_norm_`): the norm of the
/// gradients of `vars` before clipping, and the factor that brings it to `max_norm` (1 when it
/// is within, or not finite). The norm takes one pass over all the gradients
/// ([`fused::sum_of_squares`]) and one read by the host.
pub fn clip_factor(
    grads: &GradStore,
    vars: &[Var],
    max_norm: f64,
) -> candle_core::Result<(f64, f64)> {
    let present: Vec<Tensor> = vars
        .iter()
        .filter_map(|v| grads.get(v.as_tensor()).cloned())
        .collect();
    let norm = fused::sum_of_squares(&present)?.sqrt();
    let scale = match norm > max_norm && norm.is_finite() {
        true => max_norm / (norm + 1e-6),
        false => 1.0,
    };
    Ok((norm, scale))
}

/// Learning rate at `step` (0-based): base_lr × batch / 256, linear warm-up, then constant or cosine.
pub fn lr_at(step: usize, t: &TrainSpec) -> f64 {
    let peak = t.base_lr * t.batch as f64 / 256.0;
    if step < t.warmup {
        return peak * (step + 1) as f64 / t.warmup as f64;
    }
    match t.lr_schedule {
        LrScheduleSpec::Constant => peak,
        LrScheduleSpec::Cosine => {
            let span = (t.steps - t.warmup).max(1) as f64;
            let progress = (step - t.warmup) as f64 / span;
            peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
        }
    }
}

/// What a checkpoint restores besides the tensors: the step to continue from, the training random
/// stream, and state a stage keeps of its own (e.g. a VQ tokenizer's code-use counters).
#[derive(Debug, Clone)]
pub struct Resume {
    pub step: usize,
    pub rng: Option<Rng>,
    pub extra: serde_json::Value,
}

/// What [`Checkpoint::load`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The checkpoint loaded; None: training starts at step 0.
    pub resume: Option<Resume>,
    /// Set when damaged checkpoints were passed over: which, and what was done instead (the
    /// previous checkpoint, or a start from step 0). Stages record it on their run.
    pub recovered: Option<String>,
}

/// A checkpoint as read from disk: verified, or damaged (and why).
enum Readable {
    Good(serde_json::Value, HashMap<String, Tensor>),
    Damaged(String),
}

/// A checkpoint: weights, optimizer (and EMA) state in `checkpoint-STEP.safetensors`, and
/// `checkpoint.json` naming that file with the step, the random stream and a stage's own state.
/// `checkpoint.json` is replaced last (write, then rename), so a process killed at any moment
/// leaves either the previous checkpoint or the new one, never weights of one step with the
/// counters of another.
pub struct Checkpoint;

impl Checkpoint {
    fn meta_path(dir: &Path) -> PathBuf {
        dir.join("checkpoint.json")
    }

    /// The checkpoint before the latest, kept as a fallback.
    fn prev_path(dir: &Path) -> PathBuf {
        dir.join("checkpoint-prev.json")
    }

    fn weights_name(step: usize) -> String {
        format!("checkpoint-{step:08}.safetensors")
    }

    /// Save weights + optimizer moments, then commit them with `checkpoint.json`; older weight
    /// files are removed afterwards.
    pub fn save(
        dir: &Path,
        varmap: &VarMap,
        opt: &AdamW,
        ema: Option<&Ema>,
        step: usize,
        rng: &Rng,
        extra: &impl serde::Serialize,
    ) -> Result<(), TrainError> {
        let err = |m: String| TrainError::Checkpoint {
            path: dir.to_path_buf(),
            message: m,
        };
        db::files::create_folder(dir).map_err(|e| err(e.to_string()))?;
        let mut tensors = opt.state();
        if let Some(ema) = ema {
            tensors.extend(ema.state());
        }
        {
            let data = varmap
                .data()
                .lock()
                .map_err(|_| err("variable map lock poisoned".into()))?;
            for (k, v) in data.iter() {
                tensors.insert(k.clone(), v.as_tensor().clone());
            }
        }
        let extra = serde_json::to_value(extra).map_err(|e| err(e.to_string()))?;
        let name = Self::weights_name(step);
        let weights = dir.join(&name);
        db::files::write_atomic(&weights, |tmp| {
            candle_core::safetensors::save(&tensors, tmp)
        })
        .map_err(|e| err(e.to_string()))?;
        // checked on load: a damaged file is found before its numbers are trained on
        let weights_sha256 = db::files::sha256_file(&weights).map_err(|e| err(e.to_string()))?;
        // u64 as strings: JSON readers that use doubles would round them
        let rng_state: Vec<String> = rng.state().iter().map(|v| v.to_string()).collect();
        let meta = serde_json::json!({
            "step": step,
            "adam_t": opt.t,
            "weights": name,
            "weights_sha256": weights_sha256,
            "rng": rng_state,
            "extra": extra,
        });
        // the checkpoint being replaced stays as the fallback (`checkpoint-prev.json`)
        let previous = std::fs::read(Self::meta_path(dir)).ok();
        if let Some(bytes) = &previous {
            db::files::write_bytes(&Self::prev_path(dir), bytes).map_err(|e| err(e.to_string()))?;
        }
        db::files::write_bytes(&Self::meta_path(dir), meta.to_string().as_bytes())
            .map_err(|e| err(e.to_string()))?;
        // the commit point has passed: weight files of neither checkpoint are garbage now
        let kept_previous = previous
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|m| m["weights"].as_str().map(str::to_string));
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                let kept = file == name || kept_previous.as_deref() == Some(file.as_str());
                let stale = file == "checkpoint.safetensors"
                    || (file.starts_with("checkpoint-") && file.ends_with(".safetensors") && !kept);
                if stale {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }

    /// The step of the checkpoint in `dir`, if there is a readable one.
    pub fn saved_step(dir: &Path) -> Option<usize> {
        let text = std::fs::read_to_string(Self::meta_path(dir)).ok()?;
        let meta: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some(meta["step"].as_u64()? as usize)
    }

    /// Load into an already-built model and optimizer; `resume` is None when there is no
    /// checkpoint. When the latest checkpoint is damaged (its weights no longer match their
    /// sha256, or cannot be read), the previous one is used; when both are, they are removed and
    /// training starts over, which reproduces the run from its seed. `recovered` says which.
    pub fn load(
        dir: &Path,
        varmap: &VarMap,
        opt: &mut AdamW,
        ema: Option<&mut Ema>,
    ) -> Result<Loaded, TrainError> {
        Self::load_with(dir, varmap, opt, ema, true)
    }

    /// [`Checkpoint::load`] that changes no file when `repair` is false: for the data-parallel
    /// ranks that read the checkpoint rank 0 has already loaded (and repaired).
    pub fn load_with(
        dir: &Path,
        varmap: &VarMap,
        opt: &mut AdamW,
        ema: Option<&mut Ema>,
        repair: bool,
    ) -> Result<Loaded, TrainError> {
        let mut damaged = Vec::new();
        for meta_path in [Self::meta_path(dir), Self::prev_path(dir)] {
            if !meta_path.exists() {
                continue;
            }
            match Self::read(dir, &meta_path, varmap)? {
                Readable::Good(meta, tensors) => {
                    let resume = Self::apply(dir, &meta, &tensors, varmap, opt, ema)?;
                    if repair && meta_path != Self::meta_path(dir) {
                        // the good one becomes the latest, so the damaged one is never kept
                        db::files::write_bytes(&Self::meta_path(dir), meta.to_string().as_bytes())
                            .and_then(|()| std::fs::remove_file(&meta_path))
                            .map_err(|e| TrainError::Checkpoint {
                                path: dir.to_path_buf(),
                                message: format!("promoting {}: {e}", meta_path.display()),
                            })?;
                    }
                    let recovered = (!damaged.is_empty()).then(|| {
                        let note = format!(
                            "{}; resumed from the previous checkpoint, at step {}",
                            damaged.join("; "),
                            resume.step
                        );
                        tracing::warn!("{note}");
                        note
                    });
                    return Ok(Loaded {
                        resume: Some(resume),
                        recovered,
                    });
                }
                Readable::Damaged(why) => damaged.push(why),
            }
        }
        if damaged.is_empty() {
            return Ok(Loaded::default());
        }
        let note = format!(
            "{}; no good checkpoint left: removed, training starts again from step 0",
            damaged.join("; ")
        );
        tracing::warn!("{note}");
        for p in [Self::meta_path(dir), Self::prev_path(dir)] {
            if repair && p.exists() {
                std::fs::remove_file(&p).map_err(|e| TrainError::Checkpoint {
                    path: dir.to_path_buf(),
                    message: format!("removing the damaged {}: {e}", p.display()),
                })?;
            }
        }
        Ok(Loaded {
            resume: None,
            recovered: Some(note),
        })
    }

    /// The checkpoint `meta_path` names, read and verified (nothing is loaded into the model).
    fn read(dir: &Path, meta_path: &Path, varmap: &VarMap) -> Result<Readable, TrainError> {
        let file = meta_path.display();
        let meta: serde_json::Value = match std::fs::read_to_string(meta_path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
        {
            Ok(m) => m,
            Err(e) => return Ok(Readable::Damaged(format!("{file} is unreadable ({e})"))),
        };
        // checkpoints of earlier versions: checkpoint.safetensors, and the stream in rng.json
        let weights = dir.join(meta["weights"].as_str().unwrap_or("checkpoint.safetensors"));
        if !weights.exists() {
            let missing = format!("{file} names {}, which does not exist", weights.display());
            return Ok(Readable::Damaged(missing));
        }
        if let Some(expected) = meta["weights_sha256"].as_str() {
            let found = db::files::sha256_file(&weights).map_err(|e| TrainError::Checkpoint {
                path: dir.to_path_buf(),
                message: e.to_string(),
            })?;
            if found != expected {
                let why = format!(
                    "checkpoint {} is damaged (its sha256 differs)",
                    weights.display()
                );
                return Ok(Readable::Damaged(why));
            }
        }
        let device = varmap
            .all_vars()
            .first()
            .map(|v| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        match candle_core::safetensors::load(&weights, &device) {
            Ok(tensors) => Ok(Readable::Good(meta, tensors)),
            Err(e) => Ok(Readable::Damaged(format!(
                "checkpoint {} is unreadable ({e})",
                weights.display()
            ))),
        }
    }

    /// Put a verified checkpoint's weights and optimizer (and EMA) state in place.
    fn apply(
        dir: &Path,
        meta: &serde_json::Value,
        tensors: &HashMap<String, Tensor>,
        varmap: &VarMap,
        opt: &mut AdamW,
        ema: Option<&mut Ema>,
    ) -> Result<Resume, TrainError> {
        let err = |m: String| TrainError::Checkpoint {
            path: dir.to_path_buf(),
            message: m,
        };
        let step = meta["step"]
            .as_u64()
            .ok_or_else(|| err("checkpoint.json has no step".into()))? as usize;
        let adam_t = meta["adam_t"].as_u64().unwrap_or(step as u64) as usize;
        let rng_state = if meta["rng"].is_array() {
            parse_rng_state(&meta["rng"])
        } else {
            std::fs::read_to_string(dir.join("rng.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .and_then(|v: serde_json::Value| parse_rng_state(&v))
        };
        {
            let data = varmap
                .data()
                .lock()
                .map_err(|_| err("variable map lock poisoned".into()))?;
            for (name, var) in data.iter() {
                let t = tensors
                    .get(name)
                    .ok_or_else(|| err(format!("missing tensor {name}")))?;
                if t.shape() != var.shape() {
                    return Err(err(format!(
                        "tensor {name} has shape {:?}, the model expects {:?}",
                        t.shape(),
                        var.shape()
                    )));
                }
                var.set(t)?;
            }
        }
        opt.load_state(tensors, adam_t).map_err(err)?;
        if let Some(ema) = ema {
            ema.load_state(tensors).map_err(err)?;
        }
        Ok(Resume {
            step,
            rng: rng_state.map(Rng::from_state),
            extra: meta["extra"].clone(),
        })
    }
}

/// Four u64 written as decimal strings.
fn parse_rng_state(v: &serde_json::Value) -> Option<[u64; 4]> {
    let words: Vec<u64> = v
        .as_array()?
        .iter()
        .filter_map(|x| x.as_str()?.parse().ok())
        .collect();
    words.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small seeded classifier's weights on the CPU and their AdamW.
    fn classifier_and_adamw() -> anyhow::Result<(VarMap, AdamW)> {
        let dev = candle_core::Device::Cpu;
        let varmap = VarMap::new();
        let vb = models::init::seeded_var_builder(&varmap, 0, candle_core::DType::F32, &dev);
        models::classifier::Classifier::new(1, 3, 8, vb)?;
        let opt = AdamW::new(&varmap, 1e-4, 0.9, 0.999)?;
        Ok((varmap, opt))
    }

    /// candle hands back a variable's gradient still attached to the step's graph; if the AdamW
    /// moments kept it, every step's activations would stay alive (measured before the fix: the
    /// feature-net classifier grew by ~25 MB per step, 20 GB over 800 steps).
    #[test]
    fn optimizer_state_holds_no_graph() -> anyhow::Result<()> {
        let dev = candle_core::Device::Cpu;
        let varmap = VarMap::new();
        let vb = models::init::seeded_var_builder(&varmap, 0, candle_core::DType::F32, &dev);
        let model = models::classifier::Classifier::new(1, 3, 8, vb)?;
        let mut opt = AdamW::new(&varmap, 1e-4, 0.9, 0.999)?;
        let mut ema = Ema::new(&varmap, 0.9)?;
        for step in 1..=2 {
            let x = Tensor::ones((4, 1, 8, 8), candle_core::DType::F32, &dev)?;
            let y = Tensor::new(&[0u32, 1, 2, 0], &dev)?;
            let (_, logits) = model.forward(&x)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let grads = loss.backward()?;
            // the premise: at least one raw gradient is attached to the graph
            let vars: Vec<Var> = opt.vars().cloned().collect();
            assert!(vars
                .iter()
                .filter_map(|v| grads.get(v.as_tensor()))
                .any(|g| g.track_op()));
            opt.step(&grads, 1e-3)?;
            ema.update(step)?;
        }
        for (name, t) in opt.state().into_iter().chain(ema.state()) {
            assert!(!t.track_op(), "{name} holds an autograd graph");
        }
        Ok(())
    }

    #[test]
    fn damaged_checkpoints_are_discarded_not_loaded() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (varmap, mut opt) = classifier_and_adamw()?;
        let rng = Rng::new(1);
        let weights = dir.path().join(Checkpoint::weights_name(5));
        for damage in ["flip a byte in the tail", "truncate"] {
            Checkpoint::save(dir.path(), &varmap, &opt, None, 5, &rng, &())?;
            assert!(Checkpoint::load(dir.path(), &varmap, &mut opt, None)?
                .resume
                .is_some());
            let mut bytes = std::fs::read(&weights)?;
            if damage == "truncate" {
                bytes.truncate(1000);
            } else {
                let last = bytes.len() - 3;
                bytes[last] ^= 0x55;
            }
            std::fs::write(&weights, &bytes)?;
            let (fresh, mut fresh_opt) = classifier_and_adamw()?;
            let loaded = Checkpoint::load(dir.path(), &fresh, &mut fresh_opt, None)?;
            assert!(loaded.resume.is_none(), "{damage}: starts over");
            let note = loaded.recovered.expect("the restart is reported");
            assert!(
                note.contains("starts again from step 0"),
                "{damage}: {note}"
            );
            assert!(
                !Checkpoint::meta_path(dir.path()).exists(),
                "{damage}: removed"
            );
        }
        Ok(())
    }

    #[test]
    fn a_damaged_latest_checkpoint_falls_back_to_the_previous_one() -> anyhow::Result<()> {
        let dev = candle_core::Device::Cpu;
        let dir = tempfile::tempdir()?;
        let build = |seed: u64| -> anyhow::Result<(VarMap, AdamW)> {
            let varmap = VarMap::new();
            let vb = models::init::seeded_var_builder(&varmap, seed, candle_core::DType::F32, &dev);
            models::classifier::Classifier::new(1, 3, 8, vb)?;
            let opt = AdamW::new(&varmap, 1e-4, 0.9, 0.999)?;
            Ok((varmap, opt))
        };
        let (first, opt) = build(1)?;
        Checkpoint::save(dir.path(), &first, &opt, None, 5, &Rng::new(1), &())?;
        let (second, opt) = build(2)?;
        Checkpoint::save(dir.path(), &second, &opt, None, 10, &Rng::new(2), &())?;
        let (w5, w10) = (
            dir.path().join(Checkpoint::weights_name(5)),
            dir.path().join(Checkpoint::weights_name(10)),
        );
        assert!(w5.exists() && w10.exists(), "the latest two are kept");
        let mut bytes = std::fs::read(&w10)?;
        let last = bytes.len() - 3;
        bytes[last] ^= 0x55;
        std::fs::write(&w10, &bytes)?;

        let (model, mut opt) = build(3)?;
        let loaded = Checkpoint::load(dir.path(), &model, &mut opt, None)?;
        let resume = loaded.resume.expect("the previous");
        assert_eq!(resume.step, 5);
        let note = loaded.recovered.expect("the recovery is reported");
        assert!(
            note.contains("checkpoint-00000010") && note.contains("step 5"),
            "{note}"
        );
        let saved = first.data().lock().expect("lock").clone();
        for (name, var) in model.data().lock().expect("lock").iter() {
            let diff = (var.as_tensor() - saved[name].as_tensor())?
                .abs()?
                .flatten_all()?
                .max(0)?;
            assert_eq!(diff.to_scalar::<f32>()?, 0.0, "{name}: step 5's weights");
        }
        // the next save keeps it as the previous one and drops the damaged step 10
        Checkpoint::save(dir.path(), &model, &opt, None, 15, &Rng::new(3), &())?;
        let w15 = dir.path().join(Checkpoint::weights_name(15));
        assert!(w15.exists() && !w10.exists());
        Ok(())
    }

    #[test]
    fn warmup_then_constant() {
        let mut t = TrainSpec {
            base_lr: 1e-3,
            batch: 256,
            warmup: 10,
            ..TrainSpec::default()
        };
        assert!((lr_at(0, &t) - 1e-4).abs() < 1e-12);
        assert!((lr_at(9, &t) - 1e-3).abs() < 1e-12);
        assert!((lr_at(100, &t) - 1e-3).abs() < 1e-12);
        t.lr_schedule = LrScheduleSpec::Cosine;
        t.steps = 110;
        assert!(lr_at(109, &t) < 1e-5);
    }

    #[test]
    fn clipping_bounds_the_global_norm() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let a = Var::new(&[1f32, 2.0], &dev)?;
        let b = Var::new(&[3f32], &dev)?;
        let loss = ((a.as_tensor().sum_all()? * 10.0)? + (b.as_tensor().sum_all()? * 20.0)?)?;
        let g = loss.backward()?;
        let vars = vec![a.clone(), b.clone()];
        let (norm, scale) = clip_factor(&g, &vars, 3.0)?;
        assert!((norm - (100f64 + 100.0 + 400.0).sqrt()).abs() < 1e-4);
        assert!((norm * scale - 3.0).abs() < 1e-5, "{}", norm * scale);
        assert_eq!(clip_factor(&g, &vars, 1e9)?.1, 1.0, "within the bound");
        Ok(())
    }

    /// The clipped step trains as the update of the gradients scaled first (the loop's former
    /// separate pass), bit for bit.
    #[test]
    fn a_clipped_step_is_a_step_on_scaled_gradients() -> anyhow::Result<()> {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::ones((4, 1, 8, 8), candle_core::DType::F32, &dev)?;
        let y = Tensor::new(&[0u32, 1, 2, 0], &dev)?;
        let grads_of = |varmap: &VarMap| -> anyhow::Result<GradStore> {
            let vb = candle_nn::VarBuilder::from_varmap(varmap, candle_core::DType::F32, &dev);
            let model = models::classifier::Classifier::new(1, 3, 8, vb)?;
            let (_, logits) = model.forward(&x)?;
            Ok(candle_nn::loss::cross_entropy(&logits, &y)?.backward()?)
        };
        let (clipped, mut opt) = classifier_and_adamw()?;
        let norm = opt.clipped_step(&grads_of(&clipped)?, 1e-3, 1e-2)?;
        assert!(norm > 1e-3, "the bound must clip: norm {norm}");
        let (scaled, mut plain) = classifier_and_adamw()?;
        let mut g = grads_of(&scaled)?;
        let vars: Vec<Var> = plain.vars().cloned().collect();
        for v in &vars {
            if let Some(gv) = g.remove(v.as_tensor()) {
                g.insert(v.as_tensor(), (gv * (1e-3 / (norm + 1e-6)))?);
            }
        }
        plain.step(&g, 1e-2)?;
        for (a, b) in opt.vars().zip(plain.vars()) {
            let (a, b) = (a.flatten_all()?, b.flatten_all()?);
            assert_eq!(a.to_vec1::<f32>()?, b.to_vec1::<f32>()?);
        }
        Ok(())
    }
}
