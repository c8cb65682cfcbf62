//! `ablate bench`: throughput of named generator workloads, one JSON object per line. Times are
//! medians over timed steps after warm-up; the device is synchronised around every timing.
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use models::diffusion::Schedule;
use models::init::{frozen_var_builder, seeded_var_builder};
use models::CfgSchedule;
use models::{
    Generator, GeneratorConfig, GeneratorKind, HeadConfig, Order, Precision, Rng, SampleOptions,
};

use harness::train::{clip_factor, AdamW};

/// A named model size and batch.
#[derive(Debug, Clone)]
pub struct Workload {
    pub name: &'static str,
    pub kind: GeneratorKind,
    /// tokens per side (the sequence is side²)
    pub side: usize,
    pub token_dim: usize,
    pub width: usize,
    pub depth: usize,
    pub decoder_depth: usize,
    pub heads: usize,
    pub buffer: usize,
    pub mlp_width: usize,
    pub mlp_depth: usize,
    pub batch_mul: usize,
    pub batch: usize,
    pub classes: usize,
    /// Some(vocab): the cross-entropy head over a codebook of that size
    pub vocab: Option<usize>,
}

const fn tiny(name: &'static str, kind: GeneratorKind, vocab: Option<usize>) -> Workload {
    Workload {
        name,
        kind,
        side: 8,
        token_dim: 16,
        width: 128,
        depth: 4,
        decoder_depth: 4,
        heads: 4,
        buffer: 8,
        mlp_width: 256,
        mlp_depth: 3,
        batch_mul: 4,
        batch: 64,
        classes: 10,
        vocab,
    }
}

/// The workloads `ablate bench` knows. AR variants use depth + decoder_depth blocks.
pub fn workloads() -> Vec<Workload> {
    vec![
        tiny("mar-tiny", GeneratorKind::Mar, None),
        tiny("mar-tiny-ce", GeneratorKind::Mar, Some(1024)),
        tiny("ar-tiny", GeneratorKind::Ar, None),
        tiny("ar-tiny-ce", GeneratorKind::Ar, Some(1024)),
        // between the two: the reference bench's mar-small (../shared/bench/reference_mar.py)
        Workload {
            name: "mar-small",
            kind: GeneratorKind::Mar,
            side: 16,
            token_dim: 16,
            width: 256,
            depth: 6,
            decoder_depth: 6,
            heads: 8,
            buffer: 16,
            mlp_width: 512,
            mlp_depth: 3,
            batch_mul: 4,
            batch: 32,
            classes: 1000,
            vocab: None,
        },
        // MAR-B of the paper: 16×16 KL-16 tokens, width 768, 12 + 12 blocks, buffer 64, MLP 1024×3
        Workload {
            name: "mar-base",
            kind: GeneratorKind::Mar,
            side: 16,
            token_dim: 16,
            width: 768,
            depth: 12,
            decoder_depth: 12,
            heads: 12,
            buffer: 64,
            mlp_width: 1024,
            mlp_depth: 3,
            batch_mul: 4,
            batch: 64,
            classes: 1000,
            vocab: None,
        },
    ]
}

impl Workload {
    pub fn config(&self) -> GeneratorConfig {
        let ar = self.kind == GeneratorKind::Ar;
        GeneratorConfig {
            kind: self.kind,
            order: if ar { Order::Raster } else { Order::Random },
            seq_len: self.side * self.side,
            token_dim: self.token_dim,
            width: self.width,
            depth: if ar {
                self.depth + self.decoder_depth
            } else {
                self.depth
            },
            decoder_width: self.width,
            decoder_depth: self.decoder_depth,
            heads: self.heads,
            decoder_heads: self.heads,
            mlp_ratio: 4.0,
            num_classes: self.classes,
            buffer_size: self.buffer,
            label_drop: 0.1,
            // the reference bench trains with its default dropout too
            attn_dropout: 0.1,
            proj_dropout: 0.1,
            head: match self.vocab {
                Some(vocab) => HeadConfig::CrossEntropy { vocab },
                None => HeadConfig::Diffusion {
                    width: self.mlp_width,
                    depth: self.mlp_depth,
                    batch_mul: self.batch_mul,
                    train_steps: 1000,
                    sampling_steps: 100,
                    schedule: Schedule::Cosine,
                    learn_sigma: true,
                    clip_denoised: false,
                },
            },
            precision: Precision::F32,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Parse `--precision`: f32 or bf16.
pub fn parse_precision(s: &str) -> anyhow::Result<Precision> {
    match s {
        "f32" => Ok(Precision::F32),
        "bf16" => Ok(Precision::Bf16),
        other => anyhow::bail!("--precision: expected one of f32, bf16; found '{other}'"),
    }
}

/// How [`run`] measures a workload.
pub struct Options {
    /// Timed training steps (after 2 warm-up steps).
    pub steps: usize,
    pub precision: Precision,
    /// The device's peak TFLOP/s, for `mfu`.
    pub peak_tflops: Option<f64>,
    /// Also time the phases of a step ([`time_phases`]).
    pub phases: bool,
    /// Profile the host over the timed steps into this file ([`crate::profile`]).
    pub profile: Option<std::path::PathBuf>,
}

/// Train `steps` timed steps (after 2 warm-up steps) and sample 16 images with 16 MAR steps,
/// 100 diffusion steps and CFG 3.0, with the generator's products in `precision` (weights and
/// optimizer state f32, as in training); returns the JSON line. With `profile`, the timed steps
/// are profiled into that file ([`crate::profile`]).
pub fn run(
    w: &Workload,
    device: &Device,
    device_name: &str,
    o: &Options,
) -> anyhow::Result<serde_json::Value> {
    let Options {
        steps,
        precision,
        peak_tflops,
        phases,
        ref profile,
    } = *o;
    let cfg = GeneratorConfig {
        precision,
        ..w.config()
    };
    let varmap = VarMap::new();
    let generator = Generator::new(&cfg, seeded_var_builder(&varmap, 0, DType::F32, device))?;
    let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(&varmap, 0.02, 0.9, 0.95)?;
    let vars: Vec<_> = opt.vars().cloned().collect();
    let mut rng = Rng::new(0);
    let l = cfg.seq_len;
    let labels: Vec<u32> = (0..w.batch).map(|i| (i % w.classes) as u32).collect();
    let tokens = cfg.random_tokens(w.batch, &mut rng, device)?;
    let mut times = Vec::new();
    let mut host_profile = None;
    for step in 0..steps + 2 {
        if step == 2 {
            // the timed steps only
            host_profile = profile
                .as_deref()
                .map(crate::profile::HostProfile::start)
                .transpose()?;
        }
        device.synchronize()?;
        let t0 = Instant::now();
        let loss = generator.loss(&tokens, &labels, &mut rng)?;
        opt.clipped_step(&loss.backward()?, 3.0, 1e-4)?;
        device.synchronize()?;
        if step >= 2 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    if let Some(p) = host_profile {
        p.write()?;
    }
    let train_step_s = median(times);
    let phase_times = match phases {
        true => Some(time_phases(
            steps, device, &generator, &tokens, &labels, &vars, &mut opt, &mut rng,
        )?),
        false => None,
    };
    let frozen = Generator::new(&cfg, frozen_var_builder(&varmap, DType::F32, device)?)?;
    let opts = SampleOptions {
        num_iter: 16.min(l),
        cfg: 3.0,
        cfg_schedule: CfgSchedule::Linear,
        temperature: 1.0,
    };
    let sample_labels: Vec<u32> = (0..16).map(|i| (i % w.classes) as u32).collect();
    device.synchronize()?;
    let t0 = Instant::now();
    frozen.sample(&sample_labels, &opts, &mut rng)?;
    device.synchronize()?;
    let sample_s = t0.elapsed().as_secs_f64();
    let flops = cfg.train_flops_per_step(w.batch);
    let achieved = flops / train_step_s;
    Ok(serde_json::json!({
        "workload": w.name,
        "device": device_name,
        "precision": precision.as_str(),
        "params": params,
        "train_steps_timed": steps,
        "train_step_s": train_step_s,
        "train_images_per_s": w.batch as f64 / train_step_s,
        // matrix-product FLOPs of forward + backward (models::flops), per step and per second
        "model_flops_per_step": flops,
        "model_tflops_per_s": achieved / 1e12,
        // model FLOPs per second over the device's peak (--peak-tflops; CUDA only by default)
        "mfu": peak_tflops.map(|p| achieved / (p * 1e12)),
        "phases": phase_times,
        "sample_images": 16,
        "sample_s": sample_s,
        "sample_images_per_s": 16.0 / sample_s,
        "peak_rss_bytes": peak_rss_bytes(),
        // CPU threads of candle's kernels (RAYON_NUM_THREADS, else the physical cores) and the
        // CPUs this process may use (cgroup quota included): more threads than CPUs is slow
        "threads": candle_core::utils::get_num_threads(),
        "cpus_available": std::thread::available_parallelism().map_or(0, |n| n.get()),
    }))
}

/// Median seconds of each phase of a training step, the device synchronised after each, and
/// how long the host took to queue it (`*_queued_s`): a phase whose queueing takes as long as the
/// phase itself is bound by the host (kernel launches, allocations), not by the device.
#[allow(clippy::too_many_arguments)]
fn time_phases(
    steps: usize,
    device: &Device,
    generator: &Generator,
    tokens: &models::Tokens,
    labels: &[u32],
    vars: &[candle_core::Var],
    opt: &mut AdamW,
    rng: &mut Rng,
) -> anyhow::Result<serde_json::Value> {
    const NAMES: [&str; 7] = [
        "forward_s",
        "forward_queued_s",
        "backward_s",
        "backward_queued_s",
        "clip_s",
        "optimizer_s",
        "optimizer_queued_s",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); NAMES.len()];
    for _ in 0..steps {
        device.synchronize()?;
        let t0 = Instant::now();
        let loss = generator.loss(tokens, labels, rng)?;
        let queued = t0.elapsed();
        device.synchronize()?;
        let (forward, t1) = (t0.elapsed(), Instant::now());
        let grads = loss.backward()?;
        let backward_queued = t1.elapsed();
        device.synchronize()?;
        let (backward, t2) = (t1.elapsed(), Instant::now());
        let (_, scale) = clip_factor(&grads, vars, 3.0)?;
        device.synchronize()?;
        let (clip, t3) = (t2.elapsed(), Instant::now());
        opt.scaled_step(&grads, 1e-4, scale)?;
        let optimizer_queued = t3.elapsed();
        device.synchronize()?;
        let optimizer = t3.elapsed();
        let all = [
            forward,
            queued,
            backward,
            backward_queued,
            clip,
            optimizer,
            optimizer_queued,
        ];
        for (s, d) in samples.iter_mut().zip(all) {
            s.push(d.as_secs_f64());
        }
    }
    let map: serde_json::Map<String, serde_json::Value> = NAMES
        .iter()
        .zip(samples)
        .map(|(n, s)| (n.to_string(), median(s).into()))
        .collect();
    Ok(map.into())
}

/// Evaluation workloads: (name, what it measures).
pub const EVAL_WORKLOADS: &[(&str, &str)] = &[
    (
        "fid-10k",
        "FID of two 10000×2048 feature sets: statistics (float64) and Fréchet distance",
    ),
    (
        "inception-cpu",
        "Inception-v3 feature extraction, batches of 16 images of 256 px (random weights)",
    ),
];

/// Inception-v3 with random weights (unit batch norm), for timing and for the device self-test.
pub fn random_inception(
    rng: &mut Rng,
    device: &Device,
) -> anyhow::Result<models::inception::InceptionV3> {
    let tensors: std::collections::HashMap<String, Tensor> = models::inception::expected_tensors()
        .into_iter()
        .map(|(k, s)| {
            let t = if k.ends_with("running_var") || k.ends_with("bn.weight") {
                Tensor::ones(s, DType::F32, device)
            } else if k.ends_with("conv.weight") || k == "fc.weight" {
                rng.normal_tensor(&s, device)
                    .and_then(|t| t.affine(0.05, 0.0))
            } else {
                Tensor::zeros(s, DType::F32, device)
            };
            t.map(|t| (k, t))
        })
        .collect::<candle_core::Result<_>>()?;
    Ok(models::inception::InceptionV3::new(
        candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device),
    )?)
}

/// Run an evaluation workload (`steps` timed repetitions, median reported).
pub fn run_eval(
    name: &str,
    device: &Device,
    device_name: &str,
    steps: usize,
) -> anyhow::Result<serde_json::Value> {
    use harness::eval::metrics;
    let mut rng = Rng::new(0);
    match name {
        "fid-10k" => {
            let (n, d) = (10_000, 2048);
            // correlated features: a shared random mixing of independent normals
            let mix = rng
                .normal_tensor(&[d, d], &Device::Cpu)?
                .affine(0.03, 0.0)?;
            let mut sets = Vec::new();
            for shift in [0.0, 0.1] {
                let z = rng.normal_tensor(&[n, d], &Device::Cpu)?;
                let x = (z.matmul(&mix)?.relu()? + shift)?;
                sets.push(x.flatten_all()?.to_vec1::<f32>()?);
            }
            let (mut stats_t, mut fid_t, mut total_t) = (Vec::new(), Vec::new(), Vec::new());
            let mut fid = 0.0;
            for _ in 0..steps {
                let t0 = Instant::now();
                let a = metrics::gaussian_stats(&sets[0], n, d)?;
                let b = metrics::gaussian_stats(&sets[1], n, d)?;
                let t1 = Instant::now();
                fid = metrics::frechet_distance(&a, &b)?;
                let t2 = Instant::now();
                stats_t.push((t1 - t0).as_secs_f64());
                fid_t.push((t2 - t1).as_secs_f64());
                total_t.push((t2 - t0).as_secs_f64());
            }
            Ok(serde_json::json!({
                "workload": name,
                "device": "cpu",
                "samples": n,
                "dim": d,
                "repeats": steps,
                "stats_two_sets_s": median(stats_t),
                "frechet_distance_s": median(fid_t),
                "fid_total_s": median(total_t),
                "fid": fid,
                "threads": rayon::current_num_threads(),
            }))
        }
        "inception-cpu" => {
            let net = random_inception(&mut rng, device)?;
            let batch = 16;
            let pixels: Vec<u8> = (0..batch * 3 * 256 * 256)
                .map(|i| (i * 7919 % 251) as u8)
                .collect();
            let x = Tensor::from_vec(pixels, (batch, 3, 256, 256), device)?;
            let mut times = Vec::new();
            for step in 0..steps + 1 {
                device.synchronize()?;
                let t0 = Instant::now();
                let out = net.forward(&x, models::inception::Convention::TorchFidelity)?;
                out.pool.to_device(&Device::Cpu)?;
                device.synchronize()?;
                if step >= 1 {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
            let t = median(times);
            Ok(serde_json::json!({
                "workload": name,
                "device": device_name,
                "batch": batch,
                "input_px": 256,
                "batches_timed": steps,
                "batch_s": t,
                "images_per_s": batch as f64 / t,
                "peak_rss_bytes": peak_rss_bytes(),
            }))
        }
        other => anyhow::bail!("unknown evaluation workload '{other}'"),
    }
}

#[cfg(test)]
mod precision_tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarMap;
    use harness::train::{sorted_vars, AdamW, Ema};
    use models::{Generator, Precision, Rng};

    /// A bf16 step keeps the master weights, the AdamW moments and the EMA in f32 (CRATES.md: the
    /// moments take the variable's dtype), and moves every weight.
    #[test]
    fn bf16_step_keeps_master_weights_and_optimizer_state_f32() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for name in ["mar-tiny", "ar-tiny-ce"] {
            let w = super::workloads()
                .into_iter()
                .find(|w| w.name == name)
                .expect("workload");
            let cfg = models::GeneratorConfig {
                precision: Precision::Bf16,
                seq_len: 16,
                ..w.config()
            };
            let varmap = VarMap::new();
            let vb = models::init::seeded_var_builder(&varmap, 0, DType::F32, &dev);
            let g = Generator::new(&cfg, vb)?;
            let mut opt = AdamW::new(&varmap, 0.02, 0.9, 0.95)?;
            let mut ema = Ema::new(&varmap, 0.9)?;
            let before: HashMap<String, Tensor> = sorted_vars(&varmap)?
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().copy().expect("copy")))
                .collect();
            let mut rng = Rng::new(1);
            let labels: Vec<u32> = (0..4).collect();
            let tokens = cfg.random_tokens(4, &mut rng, &dev)?;
            let loss = g.loss(&tokens, &labels, &mut rng)?;
            assert_eq!(loss.dtype(), DType::F32);
            let grads = loss.backward()?;
            opt.clipped_step(&grads, 3.0, 1e-3)?;
            ema.update(1)?;
            for (n, v) in sorted_vars(&varmap)? {
                assert_eq!(v.dtype(), DType::F32, "{name}: weight {n}");
            }
            for (k, t) in opt.state().into_iter().chain(ema.state()) {
                assert_eq!(t.dtype(), DType::F32, "{name}: {k}");
            }
            // the weights that got a gradient (zero-initialised layers block the rest at init) moved
            let moved = sorted_vars(&varmap)?
                .into_iter()
                .filter(|(n, v)| {
                    let d = (v.as_tensor() - &before[n]).and_then(|d| d.abs()?.max_all());
                    d.and_then(|d| d.to_scalar::<f32>()).expect("diff") > 0.0
                })
                .count();
            let mut nonzero = 0;
            for v in opt.vars() {
                if let Some(g) = grads.get(v.as_tensor()) {
                    assert_eq!(g.dtype(), DType::F32, "{name}: gradients are f32");
                    if g.abs()?.max_all()?.to_scalar::<f32>()? > 0.0 {
                        nonzero += 1;
                    }
                }
            }
            assert!(
                moved >= nonzero && nonzero > 0,
                "{name}: {moved} moved, {nonzero} had a gradient"
            );
        }
        Ok(())
    }
}
