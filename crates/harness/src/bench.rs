//! `ablate bench`: throughput of named generator workloads, one JSON object per line. Times are
//! medians over timed steps after warm-up; the device is synchronised around every timing.
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use models::diffusion::Schedule;
use models::generator::CfgSchedule;
use models::init::{frozen_var_builder, seeded_var_builder};
use models::{
    Generator, GeneratorConfig, GeneratorKind, HeadConfig, Order, Rng, SampleOptions, Tokens,
};

use crate::train::{clip_grad_norm, AdamW};

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
            mlp_ratio: 4.0,
            num_classes: self.classes,
            buffer_size: self.buffer,
            label_drop: 0.1,
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

/// Train `steps` timed steps (after 2 warm-up steps) and sample 16 images with 16 MAR steps,
/// 100 diffusion steps and CFG 3.0; returns the JSON line.
pub fn run(
    w: &Workload,
    device: &Device,
    device_name: &str,
    steps: usize,
) -> anyhow::Result<serde_json::Value> {
    let cfg = w.config();
    let varmap = VarMap::new();
    let generator = Generator::new(&cfg, seeded_var_builder(&varmap, 0, DType::F32, device))?;
    let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(&varmap, 0.02, 0.9, 0.95)?;
    let vars: Vec<_> = opt.vars().cloned().collect();
    let mut rng = Rng::new(0);
    let l = cfg.seq_len;
    let labels: Vec<u32> = (0..w.batch).map(|i| (i % w.classes) as u32).collect();
    let tokens = match w.vocab {
        Some(v) => {
            let codes: Vec<u32> = (0..w.batch * l).map(|_| rng.below(v) as u32).collect();
            Tokens::Discrete(Tensor::from_vec(codes, (w.batch, l), device)?)
        }
        None => Tokens::Continuous(rng.normal_tensor(&[w.batch, l, w.token_dim], device)?),
    };
    let mut times = Vec::new();
    for step in 0..steps + 2 {
        device.synchronize()?;
        let t0 = Instant::now();
        let loss = generator.loss(&tokens, &labels, &mut rng)?;
        let mut grads = loss.backward()?;
        clip_grad_norm(&mut grads, &vars, 3.0)?;
        opt.step(&grads, 1e-4)?;
        device.synchronize()?;
        if step >= 2 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let train_step_s = median(times);
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
    Ok(serde_json::json!({
        "workload": w.name,
        "device": device_name,
        "params": params,
        "train_steps_timed": steps,
        "train_step_s": train_step_s,
        "train_images_per_s": w.batch as f64 / train_step_s,
        "sample_images": 16,
        "sample_s": sample_s,
        "sample_images_per_s": 16.0 / sample_s,
        "peak_rss_bytes": peak_rss_bytes(),
    }))
}
