//! `ablate selftest --device D`: does device D compute what the CPU computes?
//!
//! Every network is built twice from the same seed, on the CPU and on D. Initial weights, batches,
//! masks, orders and diffusion noise all come from our seeded `Rng` on the host, so both copies see
//! exactly the same inputs; only the kernels differ. The checks compare, per generator variant and
//! precision: the initial weights (must be equal), the loss, the gradients, the weights after a few
//! clipped AdamW steps, and a guided sample; then the tokenizers (VQ and KL autoencoders), the
//! classifier feature net and Inception-v3 (random weights). Each check is one JSON line.
//!
//! Tolerances are relative L2 errors, ‖device − cpu‖ / ‖cpu‖. The f32 ones leave room for a
//! different summation order only (~1e-6 observed); the bf16 ones are calibrated by a unit test that
//! runs the bf16 model against the f32 model on the CPU, a larger gap than bf16 on two devices.
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use models::autoencoder::{Autoencoder, AutoencoderConfig, Bottleneck};
use models::diffusion::Schedule;
use models::init::{frozen_var_builder, seeded_var_builder};
use models::CfgSchedule;
use models::{
    Generator, GeneratorConfig, GeneratorKind, HeadConfig, Order, Precision, Rng, SampleOptions,
    Tokens,
};
use serde::Serialize;

use harness::train::{sorted_vars, AdamW};

/// The result of one comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: String,
    pub device: String,
    /// ‖device − cpu‖ / ‖cpu‖ (for discrete samples: the share of tokens that differ)
    pub rel_err: f64,
    /// the largest |device − cpu| (for discrete samples: how many tokens differ)
    pub max_abs_err: f64,
    pub tol: f64,
    pub pass: bool,
    /// what failed besides the tolerance (a missing gradient, a shape mismatch)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Relative tolerances of one precision.
#[derive(Debug, Clone, Copy)]
pub struct Tolerances {
    pub loss: f64,
    pub grads: f64,
    pub weights: f64,
    pub continuous_sample: f64,
    /// share of discrete sampled tokens allowed to differ (a flipped draw changes what follows)
    pub discrete_sample: f64,
    pub features: f64,
}

pub const F32_TOL: Tolerances = Tolerances {
    loss: 1e-4,
    grads: 1e-3,
    weights: 1e-5,
    continuous_sample: 1e-3,
    discrete_sample: 0.05,
    features: 1e-3,
};

/// bf16 against f32 on the CPU measured at most: loss 1.9e-3, gradients 5.6e-3, weights after
/// three steps 6.4e-5, continuous samples 5.7e-3; these leave about 10× room.
pub const BF16_TOL: Tolerances = Tolerances {
    loss: 2e-2,
    grads: 5e-2,
    weights: 1e-3,
    continuous_sample: 5e-2,
    discrete_sample: 0.5,
    features: 1e-3,
};

fn tolerances(p: Precision) -> Tolerances {
    match p {
        Precision::F32 => F32_TOL,
        Precision::Bf16 => BF16_TOL,
    }
}

/// Values of a tensor on the host, as f64.
fn host(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()
}

/// Compare two value vectors: relative L2 error and largest absolute difference.
pub fn compare_values(name: &str, device: &str, reference: &[f64], got: &[f64], tol: f64) -> Check {
    let mut check = Check {
        check: name.to_string(),
        device: device.to_string(),
        rel_err: f64::INFINITY,
        max_abs_err: f64::INFINITY,
        tol,
        pass: false,
        problem: None,
    };
    if reference.len() != got.len() {
        check.problem = Some(format!(
            "{} values on the CPU, {} on the device",
            reference.len(),
            got.len()
        ));
        return check;
    }
    let (mut diff, mut norm, mut max_abs) = (0f64, 0f64, 0f64);
    for (a, b) in reference.iter().zip(got) {
        let d = (a - b).abs();
        diff += d * d;
        norm += a * a;
        max_abs = max_abs.max(if d.is_nan() { f64::INFINITY } else { d });
    }
    let rel = if norm > 0.0 {
        (diff / norm).sqrt()
    } else {
        diff.sqrt()
    };
    check.rel_err = if rel.is_nan() { f64::INFINITY } else { rel };
    check.max_abs_err = max_abs;
    check.pass = check.rel_err <= tol;
    check
}

/// Compare discrete samples: the share of positions that differ.
pub fn compare_codes(name: &str, device: &str, reference: &[u32], got: &[u32], tol: f64) -> Check {
    let differ = reference.iter().zip(got).filter(|(a, b)| a != b).count();
    let share = if reference.is_empty() {
        0.0
    } else {
        differ as f64 / reference.len() as f64
    };
    let len_ok = reference.len() == got.len();
    Check {
        check: name.to_string(),
        device: device.to_string(),
        rel_err: share,
        max_abs_err: differ as f64,
        tol,
        pass: len_ok && share <= tol,
        problem: (!len_ok).then(|| {
            format!(
                "{} tokens on the CPU, {} on the device",
                reference.len(),
                got.len()
            )
        }),
    }
}

/// One generator variant of the self-test: small enough to run on a CPU in about a second.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub name: &'static str,
    pub kind: GeneratorKind,
    pub order: Order,
    pub diffusion: bool,
}

pub const VARIANTS: [Variant; 5] = [
    Variant {
        name: "mar-diffusion",
        kind: GeneratorKind::Mar,
        order: Order::Random,
        diffusion: true,
    },
    Variant {
        name: "mar-ce",
        kind: GeneratorKind::Mar,
        order: Order::Random,
        diffusion: false,
    },
    Variant {
        name: "ar-diffusion",
        kind: GeneratorKind::Ar,
        order: Order::Raster,
        diffusion: true,
    },
    Variant {
        name: "ar-random-diffusion",
        kind: GeneratorKind::Ar,
        order: Order::Random,
        diffusion: true,
    },
    Variant {
        name: "ar-ce",
        kind: GeneratorKind::Ar,
        order: Order::Raster,
        diffusion: false,
    },
];

const VOCAB: usize = 32;
const BATCH: usize = 8;

impl Variant {
    pub fn config(&self, precision: Precision) -> GeneratorConfig {
        GeneratorConfig {
            kind: self.kind,
            order: self.order,
            seq_len: 16,
            token_dim: 4,
            width: 32,
            depth: 2,
            decoder_width: 32,
            decoder_depth: 2,
            heads: 4,
            // unequal head counts and dropout on, so that the device runs both paths
            decoder_heads: 2,
            mlp_ratio: 2.0,
            num_classes: 4,
            buffer_size: 4,
            label_drop: 0.1,
            attn_dropout: 0.1,
            proj_dropout: 0.1,
            head: if self.diffusion {
                HeadConfig::Diffusion {
                    width: 32,
                    depth: 2,
                    batch_mul: 2,
                    train_steps: 1000,
                    sampling_steps: 20,
                    schedule: Schedule::Cosine,
                    learn_sigma: true,
                    clip_denoised: false,
                }
            } else {
                HeadConfig::CrossEntropy { vocab: VOCAB }
            },
            precision,
        }
    }
}

/// What one device computed for a generator variant.
pub struct GeneratorOutcome {
    pub init: Vec<f64>,
    pub loss: Vec<f64>,
    /// every variable's gradient, in name order; None where the variable got none
    pub grads: Vec<(String, Option<Vec<f64>>)>,
    pub trained: Vec<f64>,
    pub sample: Sample,
}

pub enum Sample {
    Codes(Vec<u32>),
    Values(Vec<f64>),
}

fn concat_vars(varmap: &VarMap) -> candle_core::Result<Vec<f64>> {
    let mut out = Vec::new();
    for (_, v) in sorted_vars(varmap)? {
        out.extend(host(v.as_tensor())?);
    }
    Ok(out)
}

/// A generator with random weights and a batch of random tokens, the same on every device.
fn random_generator(
    cfg: &GeneratorConfig,
    device: &Device,
) -> Result<(VarMap, Generator, Tokens, Vec<u32>), anyhow::Error> {
    let varmap = VarMap::new();
    let generator = Generator::new(cfg, seeded_var_builder(&varmap, 7, DType::F32, device))?;
    // random values everywhere: zero-initialised layers would hide whole branches at init. Drawn
    // on the CPU and copied, so that both sides start from bit-identical weights (noise drawn on
    // a GPU matches the CPU's only to the last bits of log/sin/cos).
    let mut rng = Rng::new(11);
    for (_, v) in sorted_vars(&varmap)? {
        let r = rng
            .normal_tensor(v.dims(), &Device::Cpu)?
            .to_device(device)?;
        v.set(&(r * 0.2)?)?;
    }
    let labels: Vec<u32> = (0..BATCH).map(|i| (i % cfg.num_classes) as u32).collect();
    let tokens = cfg.random_tokens(BATCH, &mut rng, device)?;
    Ok((varmap, generator, tokens, labels))
}

/// Build, differentiate, train three steps and sample one variant on `device`.
pub fn run_generator(
    cfg: &GeneratorConfig,
    device: &Device,
) -> Result<GeneratorOutcome, anyhow::Error> {
    let (varmap, generator, tokens, labels) = random_generator(cfg, device)?;
    let init = concat_vars(&varmap)?;
    let loss = generator.loss(&tokens, &labels, &mut Rng::new(13))?;
    let grad_store = loss.backward()?;
    let grads = sorted_vars(&varmap)?
        .into_iter()
        .map(|(name, v)| {
            let g = grad_store.get(v.as_tensor()).map(host).transpose()?;
            Ok((name, g))
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let loss = host(&loss)?;

    let mut opt = AdamW::new(&varmap, 0.02, 0.9, 0.95)?;
    let mut step_rng = Rng::new(17);
    for _ in 0..3 {
        let loss = generator.loss(&tokens, &labels, &mut step_rng)?;
        opt.clipped_step(&loss.backward()?, 3.0, 1e-4)?;
    }
    let trained = concat_vars(&varmap)?;

    let frozen = Generator::new(cfg, frozen_var_builder(&varmap, DType::F32, device)?)?;
    let opts = SampleOptions {
        num_iter: 4,
        cfg: 2.0,
        cfg_schedule: CfgSchedule::Linear,
        temperature: 1.0,
    };
    let sample = match frozen.sample(&[0, 1, 2, 3], &opts, &mut Rng::new(19))? {
        Tokens::Discrete(t) => Sample::Codes(
            t.to_device(&Device::Cpu)?
                .to_dtype(DType::U32)?
                .flatten_all()?
                .to_vec1::<u32>()?,
        ),
        Tokens::Continuous(t) => Sample::Values(host(&t)?),
    };
    Ok(GeneratorOutcome {
        init,
        loss,
        grads,
        trained,
        sample,
    })
}

/// The checks of one variant: `got` (computed on `device`) against `reference` (the CPU).
pub fn compare_generator(
    prefix: &str,
    device: &str,
    reference: &GeneratorOutcome,
    got: &GeneratorOutcome,
    tol: &Tolerances,
) -> Vec<Check> {
    let name = |what: &str| format!("{prefix}/{what}");
    let mut out = vec![
        compare_values(&name("init"), device, &reference.init, &got.init, 0.0),
        compare_values(&name("loss"), device, &reference.loss, &got.loss, tol.loss),
    ];
    // gradients: all of them as one vector, and a variable missing its gradient on either side
    let (mut a, mut b, mut missing) = (Vec::new(), Vec::new(), Vec::new());
    for ((name_a, ga), (_, gb)) in reference.grads.iter().zip(&got.grads) {
        match (ga, gb) {
            (Some(ga), Some(gb)) => {
                a.extend_from_slice(ga);
                b.extend_from_slice(gb);
            }
            (None, None) => {}
            _ => missing.push(name_a.clone()),
        }
    }
    let mut grads = compare_values(&name("grads"), device, &a, &b, tol.grads);
    if reference.grads.len() != got.grads.len() {
        missing.push(format!(
            "{} variables on the CPU, {} on the device",
            reference.grads.len(),
            got.grads.len()
        ));
    }
    if !missing.is_empty() {
        grads.pass = false;
        grads.problem = Some(format!(
            "gradient present on one device only: {}",
            missing.join(", ")
        ));
    }
    out.push(grads);
    out.push(compare_values(
        &name("adamw-3-steps"),
        device,
        &reference.trained,
        &got.trained,
        tol.weights,
    ));
    out.push(match (&reference.sample, &got.sample) {
        (Sample::Codes(a), Sample::Codes(b)) => {
            compare_codes(&name("sample"), device, a, b, tol.discrete_sample)
        }
        (Sample::Values(a), Sample::Values(b)) => {
            compare_values(&name("sample"), device, a, b, tol.continuous_sample)
        }
        _ => {
            let mut c = compare_values(&name("sample"), device, &[], &[1.0], 0.0);
            c.problem = Some("sample kinds differ".into());
            c
        }
    });
    out
}

/// What one device computed for a tokenizer: loss, gradients (name order), tokens (codes as f64).
struct AeOutcome {
    loss: Vec<f64>,
    grads: Vec<f64>,
    tokens: Vec<f64>,
}

/// Losses, gradients and tokens of a small VQ or KL autoencoder on `device`.
fn run_autoencoder(bottleneck: Bottleneck, device: &Device) -> Result<AeOutcome, anyhow::Error> {
    let config = AutoencoderConfig {
        in_channels: 1,
        width: 8,
        downsample: 4,
        latent_dim: 4,
        bottleneck,
    };
    let varmap = VarMap::new();
    let ae = Autoencoder::new(&config, seeded_var_builder(&varmap, 23, DType::F32, device))?;
    let mut rng = Rng::new(29);
    let x = (rng.normal_tensor(&[4, 1, 16, 16], device)?.tanh())?;
    let losses = ae.losses(&x, &mut Rng::new(31))?;
    let grad_store = losses.loss.backward()?;
    let mut grads = Vec::new();
    for (_, v) in sorted_vars(&varmap)? {
        if let Some(g) = grad_store.get(v.as_tensor()) {
            grads.extend(host(g)?);
        }
    }
    Ok(AeOutcome {
        loss: host(&losses.loss)?,
        grads,
        tokens: host(&ae.encode(&x)?.to_dtype(DType::F32)?)?,
    })
}

/// Features and logits of the classifier feature net and of Inception-v3 (random weights).
fn run_feature_nets(device: &Device) -> Result<Vec<(&'static str, Vec<f64>)>, anyhow::Error> {
    let varmap = VarMap::new();
    let classifier = models::classifier::Classifier::new(
        1,
        10,
        64,
        seeded_var_builder(&varmap, 37, DType::F32, device),
    )?;
    let mut rng = Rng::new(41);
    let images = rng
        .normal_tensor(&[4, 1, 16, 16], device)?
        .tanh()?
        .affine(0.5, 0.5)?;
    let (features, logits) = classifier.forward(&images)?;
    let net = crate::bench::random_inception(&mut Rng::new(43), device)?;
    let pixels: Vec<u8> = (0..2 * 3 * 64 * 64)
        .map(|i| (i * 7919 % 251) as u8)
        .collect();
    let x = Tensor::from_vec(pixels, (2, 3, 64, 64), device)?;
    let out = net.forward(&x, models::inception::Convention::TorchFidelity)?;
    Ok(vec![
        ("classifier/features", host(&features)?),
        ("classifier/logits", host(&logits)?),
        ("inception/pool3", host(&out.pool)?),
        ("inception/logits", host(&out.logits)?),
    ])
}

/// Every check of the self-test: `device` against the CPU. `progress` is called after each group.
pub fn run(
    device: &Device,
    device_name: &str,
    mut progress: impl FnMut(&[Check]),
) -> Result<Vec<Check>, anyhow::Error> {
    let mut all = Vec::new();
    for precision in [Precision::F32, Precision::Bf16] {
        for v in VARIANTS {
            let cfg = v.config(precision);
            let reference = run_generator(&cfg, &Device::Cpu)?;
            let got = run_generator(&cfg, device)?;
            let prefix = format!("{}/{}", v.name, precision.as_str());
            let checks = compare_generator(
                &prefix,
                device_name,
                &reference,
                &got,
                &tolerances(precision),
            );
            progress(&checks);
            all.extend(checks);
        }
    }
    for (name, bottleneck) in [
        (
            "tokenizer-vq",
            Bottleneck::Vq {
                codebook: 16,
                beta: 0.25,
            },
        ),
        ("tokenizer-kl", Bottleneck::Kl { kl_weight: 1e-4 }),
    ] {
        let a = run_autoencoder(bottleneck, &Device::Cpu)?;
        let b = run_autoencoder(bottleneck, device)?;
        let mut checks = vec![
            compare_values(
                &format!("{name}/loss"),
                device_name,
                &a.loss,
                &b.loss,
                F32_TOL.loss,
            ),
            compare_values(
                &format!("{name}/grads"),
                device_name,
                &a.grads,
                &b.grads,
                F32_TOL.grads,
            ),
        ];
        checks.push(if matches!(bottleneck, Bottleneck::Vq { .. }) {
            let codes = |v: &[f64]| v.iter().map(|&c| c as u32).collect::<Vec<_>>();
            compare_codes(
                &format!("{name}/codes"),
                device_name,
                &codes(&a.tokens),
                &codes(&b.tokens),
                F32_TOL.discrete_sample,
            )
        } else {
            compare_values(
                &format!("{name}/tokens"),
                device_name,
                &a.tokens,
                &b.tokens,
                F32_TOL.features,
            )
        });
        progress(&checks);
        all.extend(checks);
    }
    #[cfg(feature = "nccl")]
    if matches!(device, Device::Cuda(_)) {
        let checks = nccl_checks(device, device_name)?;
        progress(&checks);
        all.extend(checks);
    }
    let reference = run_feature_nets(&Device::Cpu)?;
    let got = run_feature_nets(device)?;
    let checks: Vec<Check> = reference
        .iter()
        .zip(&got)
        .map(|((name, a), (_, b))| compare_values(name, device_name, a, b, F32_TOL.features))
        .collect();
    progress(&checks);
    all.extend(checks);
    Ok(all)
}

/// NCCL with one rank on `device` (data-parallel training's GPU collective, issue 16): summing
/// the gradients of a MAR step, in several buckets, must give them back unchanged (0 error), and
/// three steps that sum before each AdamW update must train as three steps without NCCL.
#[cfg(feature = "nccl")]
fn nccl_checks(device: &Device, device_name: &str) -> Result<Vec<Check>, anyhow::Error> {
    use harness::train::collective::Solo;
    use harness::train::nccl::NcclRanks;
    let ranks = NcclRanks::new(Solo, device)?;
    let cfg = VARIANTS[0].config(Precision::F32);
    let train = |nccl: Option<&NcclRanks<Solo>>| -> Result<_, anyhow::Error> {
        let (varmap, generator, tokens, labels) = random_generator(&cfg, device)?;
        let mut opt = AdamW::new(&varmap, 0.02, 0.9, 0.95)?;
        let vars: Vec<candle_core::Var> = opt.vars().cloned().collect();
        // about four buckets, so that values cross bucket ends
        let limit = vars.iter().map(|v| v.elem_count()).sum::<usize>() / 4;
        let flat = |grads: &candle_core::backprop::GradStore| -> candle_core::Result<Vec<f64>> {
            let mut out = Vec::new();
            for v in &vars {
                if let Some(g) = grads.get(v.as_tensor()) {
                    out.extend(host(g)?);
                }
            }
            Ok(out)
        };
        let mut rng = Rng::new(17);
        let mut summed = (Vec::new(), Vec::new());
        for step in 0..3 {
            let loss = generator.loss(&tokens, &labels, &mut rng)?;
            let mut grads = loss.backward()?;
            if let Some(ranks) = nccl {
                let before = flat(&grads)?;
                ranks.sum_in_buckets(&mut grads, &vars, limit)?;
                if step == 0 {
                    summed = (before, flat(&grads)?);
                }
            }
            opt.clipped_step(&grads, 3.0, 1e-4)?;
        }
        Ok((summed, concat_vars(&varmap)?))
    };
    let ((before, after), with_nccl) = train(Some(&ranks))?;
    let (_, without) = train(None)?;
    Ok(vec![
        compare_values("nccl/grads-summed-alone", device_name, &before, &after, 0.0),
        compare_values(
            "nccl/trained",
            device_name,
            &without,
            &with_nccl,
            F32_TOL.weights,
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_measure_relative_error_and_fail_out_of_tolerance() {
        let c = compare_values("x", "cpu", &[3.0, 4.0], &[3.0, 4.5], 0.2);
        assert!((c.rel_err - 0.1).abs() < 1e-12 && c.max_abs_err == 0.5 && c.pass);
        assert!(!compare_values("x", "cpu", &[3.0, 4.0], &[3.0, 4.5], 0.05).pass);
        assert!(!compare_values("x", "cpu", &[1.0], &[f64::NAN], 1.0).pass);
        let short = compare_values("x", "cpu", &[1.0, 2.0], &[1.0], 1.0);
        assert!(!short.pass && short.problem.is_some());
        let codes = compare_codes("c", "cpu", &[1, 2, 3, 4], &[1, 2, 3, 5], 0.25);
        assert_eq!(codes.rel_err, 0.25);
        assert!(codes.pass);
        assert!(!compare_codes("c", "cpu", &[1, 2, 3, 4], &[1, 2, 3, 5], 0.2).pass);
    }

    /// The bf16 tolerances hold even for bf16 against f32 on the CPU (a larger gap than bf16 on
    /// two devices), and they still catch a model that differs: another seed's weights.
    #[test]
    fn bf16_tolerances_are_calibrated_and_catch_a_different_model() -> anyhow::Result<()> {
        for v in VARIANTS {
            let f32_run = run_generator(&v.config(Precision::F32), &Device::Cpu)?;
            let bf16_run = run_generator(&v.config(Precision::Bf16), &Device::Cpu)?;
            for c in compare_generator(v.name, "cpu", &f32_run, &bf16_run, &BF16_TOL) {
                if c.check.ends_with("/sample") && !v.diffusion {
                    // a flipped draw in bf16 vs f32 can change the rest of a discrete sequence
                    continue;
                }
                assert!(c.pass, "{c:?}");
                if c.check.ends_with("/loss") || c.check.ends_with("/grads") {
                    assert!(c.rel_err > 0.0, "bf16 was not used: {c:?}");
                }
            }
        }
        // a perturbed gradient set fails
        let v = VARIANTS[0];
        let a = run_generator(&v.config(Precision::F32), &Device::Cpu)?;
        let mut b = run_generator(&v.config(Precision::F32), &Device::Cpu)?;
        for (_, g) in b.grads.iter_mut() {
            if let Some(g) = g {
                g.iter_mut().for_each(|x| *x *= 1.01);
            }
        }
        let checks = compare_generator("p", "cpu", &a, &b, &F32_TOL);
        let grads = checks.iter().find(|c| c.check == "p/grads").expect("grads");
        assert!(!grads.pass, "{grads:?}");
        // a gradient missing on one side fails even when the rest agree
        b.grads = a.grads.clone();
        b.grads[0].1 = None;
        let checks = compare_generator("p", "cpu", &a, &b, &F32_TOL);
        let grads = checks.iter().find(|c| c.check == "p/grads").expect("grads");
        assert!(!grads.pass && grads.problem.is_some(), "{grads:?}");
        Ok(())
    }

    /// CPU against CPU: every check passes, with identical initial weights.
    #[test]
    fn cpu_against_cpu_passes_every_check() -> anyhow::Result<()> {
        let mut groups = 0;
        let checks = run(&Device::Cpu, "cpu", |_| groups += 1)?;
        assert_eq!(groups, 2 * VARIANTS.len() + 3);
        assert_eq!(checks.len(), 2 * VARIANTS.len() * 5 + 3 * 2 + 4);
        for c in &checks {
            assert!(c.pass, "{c:?}");
        }
        Ok(())
    }
}
