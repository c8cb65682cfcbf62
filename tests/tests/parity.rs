//! Parity with the reference MAR implementation, driven by the fixtures' manifest.json so any
//! folder in that format (ABLATE_PARITY_DIR) is checked the same way.
use std::collections::HashMap;
use std::path::Path;

use ablate_tests::{parity_dir, tolerance, worst_violation};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use models::diffloss::{DiffLoss, DiffLossConfig};
use models::diffusion::{GaussianDiffusion, Schedule};

fn manifest(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest.json is JSON")
}

fn load(dir: &Path, file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join(file), &Device::Cpu)
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor to f64")
}

fn check(what: &str, ours: &[f64], theirs: &[f64], tol: (f64, f64)) {
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{what}: length {} vs {}",
        ours.len(),
        theirs.len()
    );
    let (v, i) = worst_violation(ours, theirs, tol.0, tol.1);
    assert!(
        v <= 0.0,
        "{what}: index {i}: ours {} vs reference {} (atol {}, rtol {})",
        ours[i],
        theirs[i],
        tol.0,
        tol.1
    );
}

/// A fixture folder, the tensors of one of its files, and that file's (atol, rtol).
type Fixture = (std::path::PathBuf, HashMap<String, Tensor>, (f64, f64));

/// The fixture folder, the tensors of `file` and its manifest tolerance; None when skipped.
fn fixture(file: &str) -> Option<Fixture> {
    let dir = parity_dir()?;
    let tol = tolerance(
        manifest(&dir)[file]["tolerance"]
            .as_str()
            .expect("tolerance"),
    );
    let f = load(&dir, file);
    Some((dir, f, tol))
}

/// Compare a tensor of ours with the fixture tensor under the same key.
fn check_key(f: &HashMap<String, Tensor>, key: &str, ours: &Tensor, tol: (f64, f64)) {
    check(key, &f64s(ours), &f64s(&f[key]), tol);
}

fn timesteps(t: &Tensor) -> Vec<usize> {
    t.to_dtype(DType::I64)
        .and_then(|t| t.to_vec1::<i64>())
        .expect("timesteps")
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

#[test]
fn diffusion_schedules_match_the_reference() {
    let Some(dir) = parity_dir() else { return };
    let file = "diffusion_schedules.safetensors";
    let entry = &manifest(&dir)[file];
    let tol = tolerance(entry["tolerance"].as_str().expect("tolerance"));
    let fixtures = load(&dir, file);
    let mut checked = 0;
    let mut names: Vec<&String> = fixtures.keys().collect();
    names.sort();
    for name in names {
        let (process, array) = name.split_once('.').expect("<schedule>_<steps>.<array>");
        let (schedule, steps) = process.split_once('_').expect("<schedule>_<steps>");
        let schedule = match schedule {
            "cosine" => Schedule::Cosine,
            "linear" => Schedule::Linear,
            other => panic!("unknown schedule {other} in {name}"),
        };
        let steps: usize = steps.parse().expect("step count");
        let d = if steps == 1000 {
            GaussianDiffusion::training(schedule, 1000, true)
        } else {
            GaussianDiffusion::respaced(schedule, 1000, steps, true)
        };
        let n = d.num_timesteps();
        let ours: Vec<f64> = match array {
            "betas" => d.betas.clone(),
            "alphas_cumprod" => d.alphas_cumprod.clone(),
            "alphas_cumprod_prev" => d.alphas_cumprod_prev.clone(),
            "alphas_cumprod_next" => (0..n)
                .map(|i| {
                    if i + 1 < n {
                        d.alphas_cumprod[i + 1]
                    } else {
                        0.0
                    }
                })
                .collect(),
            "sqrt_alphas_cumprod" => d.sqrt_alphas_cumprod.clone(),
            "sqrt_one_minus_alphas_cumprod" => d.sqrt_one_minus_alphas_cumprod.clone(),
            "log_one_minus_alphas_cumprod" => {
                d.alphas_cumprod.iter().map(|a| (1.0 - a).ln()).collect()
            }
            "sqrt_recip_alphas_cumprod" => d.sqrt_recip_alphas_cumprod.clone(),
            "sqrt_recipm1_alphas_cumprod" => d.sqrt_recipm1_alphas_cumprod.clone(),
            "posterior_variance" => d.posterior_variance.clone(),
            "posterior_log_variance_clipped" => d.posterior_log_variance_clipped.clone(),
            "posterior_mean_coef1" => d.posterior_mean_coef1.clone(),
            "posterior_mean_coef2" => d.posterior_mean_coef2.clone(),
            "timestep_map" => d.timestep_map.iter().map(|&t| t as f64).collect(),
            other => panic!("{name}: unknown array {other}"),
        };
        check(name, &ours, &f64s(&fixtures[name]), tol);
        checked += 1;
    }
    assert!(checked > 0, "no schedule arrays in {file}");
}

/// The denoiser of diffloss_mlp.safetensors, built by our code from the reference names.
fn reference_diffloss(dir: &Path, sampling_steps: usize) -> (DiffLoss, HashMap<String, Tensor>) {
    let entry = &manifest(dir)["diffloss_mlp.safetensors"]["config"];
    let get = |k: &str| entry[k].as_u64().unwrap_or_else(|| panic!("config.{k}")) as usize;
    let (in_ch, out_ch) = (get("in_channels"), get("out_channels"));
    let cfg = DiffLossConfig {
        token_dim: in_ch,
        z_dim: get("z_channels"),
        width: get("width"),
        depth: get("depth"),
        train_steps: 1000,
        sampling_steps,
        schedule: Schedule::Cosine,
        learn_sigma: out_ch == 2 * in_ch,
        clip_denoised: false,
        precision: models::Precision::F32,
    };
    let weights: HashMap<String, Tensor> = load(dir, "diffloss_mlp.safetensors")
        .into_iter()
        .filter(|(k, _)| k.starts_with("net."))
        .collect();
    let (vb, variables) = trainable(weights);
    let dl = DiffLoss::new(&cfg, vb).expect("build the denoiser from the reference weights");
    (dl, variables)
}

/// Reference weights as f32 trainable variables: the VarBuilder a model is built from, and the
/// variables by name (to look up their gradients).
fn trainable(weights: HashMap<String, Tensor>) -> (VarBuilder<'static>, HashMap<String, Tensor>) {
    let variables: HashMap<String, Tensor> = weights
        .into_iter()
        .map(|(k, v)| {
            let var = v
                .to_dtype(DType::F32)
                .and_then(|t| candle_core::Var::from_tensor(&t))
                .expect("f32 variable");
            (k, var.as_tensor().clone())
        })
        .collect();
    let vb = VarBuilder::from_tensors(variables.clone(), DType::F32, &Device::Cpu);
    (vb, variables)
}

/// Every `grad.NAME` of a gradient fixture against the gradient of our variable NAME (after
/// stripping `prefix` from ours), under the manifest's gradient tolerance.
fn check_gradients(
    dir: &Path,
    file: &str,
    loss: &Tensor,
    variables: &HashMap<String, Tensor>,
    prefix: &str,
) {
    let tol = ablate_tests::gradient_tolerance(
        manifest(dir)[file]["tolerance"]
            .as_str()
            .expect("tolerance"),
    );
    let reference = load(dir, file);
    let grads = loss.backward().expect("backward");
    let mut checked = 0;
    let mut worst = (0f64, String::new());
    for (key, theirs) in &reference {
        let Some(name) = key.strip_prefix("grad.") else {
            continue;
        };
        let var = variables
            .get(&format!("{prefix}{name}"))
            .unwrap_or_else(|| panic!("{file}: {key} has no parameter {prefix}{name} of ours"));
        let ours = match grads.get(var) {
            Some(g) => f64s(g),
            // a parameter the loss does not reach (the reference's is all zero)
            None => vec![0.0; var.elem_count()],
        };
        let rel = ablate_tests::check_gradient(key, &ours, &f64s(theirs), tol);
        if rel >= worst.0 {
            worst = (rel, key.clone());
        }
        checked += 1;
    }
    assert!(checked > 0, "{file}: no grad.* tensors");
    eprintln!(
        "{file}: {checked} gradients within tolerance; worst relative L2 error {:e} ({})",
        worst.0, worst.1
    );
}

#[test]
fn diffloss_mlp_forward_and_guided_forward_match() {
    let Some((dir, f, tol)) = fixture("diffloss_mlp.safetensors") else {
        return;
    };
    let (dl, _) = reference_diffloss(&dir, 100);
    let t: Vec<f64> = timesteps(&f["input.t"])
        .into_iter()
        .map(|v| v as f64)
        .collect();
    let out = dl
        .net
        .forward(&f["input.x"], &t, &f["input.c"])
        .expect("forward");
    check_key(&f, "output.out", &out, tol);
    let out = dl
        .net
        .forward_with_cfg(&f["input_cfg.x"], &t, &f["input.c"], 3.0)
        .expect("guided forward");
    check_key(&f, "output_cfg.out", &out, tol);
}

#[test]
fn diffloss_training_terms_match() {
    let Some((dir, f, tol)) = fixture("diffloss_training_terms.safetensors") else {
        return;
    };
    let (dl, _) = reference_diffloss(&dir, 100);
    let t = timesteps(&f["input.t"]);
    let terms = dl
        .loss_terms(&f["input.x_start"], &f["input.c"], &t, &f["input.noise"])
        .expect("loss terms");
    check_key(&f, "output.mse", &terms.mse, tol);
    check_key(&f, "output.vb", terms.vb.as_ref().expect("vb term"), tol);
    check_key(&f, "output.loss", &terms.loss, tol);
    let masked =
        models::diffloss::masked_mean(&terms.loss, Some(&f["input.mask"])).expect("masked mean");
    check_key(&f, "output.masked_mean_loss", &masked, tol);
}

#[test]
fn diffloss_reverse_step_matches() {
    let Some((dir, f, tol)) = fixture("diffloss_sample_step.safetensors") else {
        return;
    };
    let (dl, _) = reference_diffloss(&dir, 100);
    let d = &dl.gen_diffusion;
    let t = timesteps(&f["input.t"]);
    let model_t: Vec<f64> = t.iter().map(|&i| d.timestep_map[i] as f64).collect();
    let out = dl
        .net
        .forward(&f["input.x_t"], &model_t, &f["input.c"])
        .expect("forward");
    let mv = d
        .p_mean_variance(&out, &f["input.x_t"], &t)
        .expect("p_mean_variance");
    check_key(&f, "output.mean", &mv.mean, tol);
    check_key(&f, "output.log_variance", &mv.log_variance, tol);
    check_key(&f, "output.pred_xstart", &mv.pred_xstart, tol);
    for (key, temperature) in [
        ("output.temp_1_0.sample", 1.0),
        ("output.temp_0_95.sample", 0.95),
    ] {
        let s = d
            .p_sample(&out, &f["input.x_t"], &t, temperature, &f["input.noise"])
            .expect("p_sample");
        check(key, &f64s(&s), &f64s(&f[key]), tol);
    }
    let out = dl
        .net
        .forward_with_cfg(&f["input_cfg.x_t"], &model_t, &f["input.c"], 2.5)
        .expect("guided forward");
    let mv = d
        .p_mean_variance(&out, &f["input_cfg.x_t"], &t)
        .expect("p_mean_variance");
    check_key(&f, "output_cfg.mean", &mv.mean, tol);
    check_key(&f, "output_cfg.log_variance", &mv.log_variance, tol);
}

#[test]
fn mar_sampling_schedule_matches() {
    let Some(dir) = parity_dir() else { return };
    let text = std::fs::read_to_string(dir.join("mar_sampling_schedule.json"))
        .expect("mar_sampling_schedule.json");
    let cases: serde_json::Value = serde_json::from_str(&text).expect("json");
    let mut checked = 0;
    for (name, case) in cases.as_object().expect("object") {
        let Some(rest) = name.strip_prefix("seq") else {
            continue;
        };
        let Some((seq, iters)) = rest.split_once("_iter") else {
            continue;
        };
        let (l, k): (usize, usize) = (
            seq.parse().expect("seq len"),
            iters.parse().expect("iterations"),
        );
        let opts = models::SampleOptions {
            num_iter: k,
            cfg: 3.0,
            cfg_schedule: models::CfgSchedule::Linear,
            temperature: 1.0,
        };
        let mut masked = l;
        for step in 0..k {
            let mask_len = models::mar::tokens_masked_after(step, k, l, masked);
            let predicted = if step + 1 == k {
                masked
            } else {
                masked - mask_len
            };
            assert_eq!(
                mask_len as u64,
                case["mask_len_after_step"][step].as_u64().expect("count"),
                "{name} step {step}"
            );
            assert_eq!(
                predicted as u64,
                case["tokens_predicted"][step].as_u64().expect("count"),
                "{name} step {step}"
            );
            let cfg = opts.cfg_at(l - mask_len, l);
            let want = case["linear_cfg_for_cfg3"][step].as_f64().expect("scale");
            assert!(
                (cfg - want).abs() <= 1e-12,
                "{name} step {step}: cfg {cfg} vs {want}"
            );
            masked = mask_len;
        }
        checked += 1;
    }
    assert!(checked > 0, "no seqN_iterK cases");
    let moments = cases
        .get("mask_ratio_truncnorm")
        .expect("mask_ratio_truncnorm moments");
    {
        let mean = moments["mean"].as_f64().expect("mean");
        let std = moments["std"].as_f64().expect("std");
        let mut rng = models::Rng::new(0);
        let n = 100_000;
        let draws: Vec<f64> = (0..n)
            .map(|_| models::mar::sample_mask_ratio(&mut rng))
            .collect();
        let m = draws.iter().sum::<f64>() / n as f64;
        let s = (draws.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n as f64).sqrt();
        assert!((m - mean).abs() <= 2e-3, "mask ratio mean {m} vs {mean}");
        assert!((s - std).abs() <= 2e-3, "mask ratio std {s} vs {std}");
    }
}

/// The generator configuration of a reference MAR fixture's `config`, and its patch size.
fn reference_mar_config(c: &serde_json::Value) -> (models::GeneratorConfig, usize) {
    let get = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("config.{k}")) as usize;
    let side = get("img_size") / get("vae_stride") / get("patch_size");
    let p = get("patch_size");
    let cfg = models::GeneratorConfig {
        kind: models::GeneratorKind::Mar,
        order: models::Order::Random,
        seq_len: side * side,
        token_dim: get("vae_embed_dim") * p * p,
        width: get("encoder_embed_dim"),
        depth: get("encoder_depth"),
        decoder_width: get("decoder_embed_dim"),
        decoder_depth: get("decoder_depth"),
        heads: get("encoder_num_heads"),
        decoder_heads: get("decoder_num_heads"),
        mlp_ratio: c["mlp_ratio"].as_f64().expect("mlp_ratio"),
        num_classes: get("class_num"),
        buffer_size: get("buffer_size"),
        label_drop: 0.0,
        // the fixtures' passes run with the masks they record and no dropout (forward_* with None)
        attn_dropout: c["attn_dropout"].as_f64().unwrap_or(0.0),
        proj_dropout: c["proj_dropout"].as_f64().unwrap_or(0.0),
        head: models::HeadConfig::Diffusion {
            width: get("diffloss_w"),
            depth: get("diffloss_d"),
            batch_mul: get("diffusion_batch_mul"),
            train_steps: 1000,
            sampling_steps: c["num_sampling_steps"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(100),
            schedule: Schedule::Cosine,
            learn_sigma: true,
            clip_denoised: false,
        },
        precision: models::Precision::F32,
    };
    (cfg, p)
}

/// The tensors of the reference MAR's training forward pass on a fixture's inputs.
struct MarPass {
    tokens: Tensor,
    labels: Vec<u32>,
    encoder_out: Tensor,
    z: Tensor,
    loss: Tensor,
}

/// patchify → encoder → decoder → Diffusion Loss on the fixture's mask, timesteps and noise
/// (rows repeated diffusion_batch_mul times, masked mean), as the reference computes its loss.
fn mar_training_pass(mar: &models::mar::Mar, f: &HashMap<String, Tensor>, p: usize) -> MarPass {
    let tokens = models::mar::patchify(&f["input.latents"], p).expect("patchify");
    let labels: Vec<u32> = f["input.labels"]
        .to_vec1::<i64>()
        .expect("labels")
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let mask: Vec<bool> = f64s(&f["input.mask"])
        .into_iter()
        .map(|v| v > 0.5)
        .collect();
    let class = mar
        .class_embedding(&labels, false)
        .expect("class embedding");
    let enc = mar
        .forward_encoder(
            &models::Tokens::Continuous(tokens.clone()),
            &mask,
            &class,
            None,
        )
        .expect("encoder");
    let z = mar.forward_decoder(&enc, &mask, None).expect("decoder");

    // loss: rows repeated diffusion_batch_mul times, fixed timesteps and noise, masked mean
    let models::head::Head::Diffusion {
        diffloss,
        batch_mul,
    } = mar.head()
    else {
        panic!("diffusion head")
    };
    let (b, l, d) = tokens.dims3().expect("dims");
    let target = tokens
        .reshape((b * l, d))
        .and_then(|t| t.repeat((*batch_mul, 1)))
        .expect("target rows");
    let zr = z
        .reshape((b * l, z.dim(2).expect("z dim")))
        .and_then(|t| t.repeat((*batch_mul, 1)))
        .expect("z rows");
    let mask_rows = f["input.mask"]
        .flatten_all()
        .and_then(|m| m.repeat(*batch_mul))
        .expect("mask rows");
    let terms = diffloss
        .loss_terms(
            &target,
            &zr,
            &timesteps(&f["input.loss_t"]),
            &f["input.loss_noise"],
        )
        .expect("loss terms");
    let loss = models::diffloss::masked_mean(&terms.loss, Some(&mask_rows)).expect("masked mean");
    MarPass {
        tokens,
        labels,
        encoder_out: enc,
        z,
        loss,
    }
}

#[test]
fn small_mar_matches_the_reference() {
    let Some(dir) = parity_dir() else { return };
    check_small_mar(&dir);
}

/// Our own fixture folder in the same format (tests/fixtures/make_parity_heads.py, the official
/// code): a MAR whose encoder has 4 heads and whose decoder has 2.
fn unequal_heads_dir() -> std::path::PathBuf {
    ablate_tests::workspace_root().join("tests/fixtures/parity-heads")
}

#[test]
fn small_mar_with_unequal_head_counts_matches_the_reference() {
    let dir = unequal_heads_dir();
    let c = &manifest(&dir)["mar_small.safetensors"]["config"];
    assert_ne!(c["encoder_num_heads"], c["decoder_num_heads"], "{c}");
    check_small_mar(&dir);
}

#[test]
fn small_mar_with_unequal_head_counts_gradients_match_the_reference() {
    check_small_mar_gradients(&unequal_heads_dir());
}

/// The reference MAR of `dir`'s mar_small.safetensors: patchify, encoder, decoder, loss, and the
/// first guided sampling step.
fn check_small_mar(dir: &Path) {
    let file = "mar_small.safetensors";
    let entry = &manifest(dir)[file];
    let tol = tolerance(entry["tolerance"].as_str().expect("tolerance"));
    let (cfg, p) = reference_mar_config(&entry["config"]);
    let f = load(dir, file);
    let weights: HashMap<String, Tensor> = f
        .iter()
        .filter(|(k, _)| !k.starts_with("input.") && !k.starts_with("output."))
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F32).expect("f32")))
        .collect();
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let mar = models::mar::Mar::new(&cfg, vb).expect("build MAR from the reference weights");

    let pass = mar_training_pass(&mar, &f, p);
    check_key(&f, "output.tokens", &pass.tokens, tol);
    check_key(&f, "output.encoder_out", &pass.encoder_out, tol);
    check_key(&f, "output.z", &pass.z, tol);
    check_key(&f, "output.loss", &pass.loss, tol);
    let (tokens, labels) = (pass.tokens, pass.labels);
    let (b, l, d) = tokens.dims3().expect("dims");

    // the first sampling step: everything masked, batch doubled with the fake class
    let all = vec![true; 2 * b * l];
    let class = mar
        .class_embedding(&labels, true)
        .expect("guided class embedding");
    let zeros = Tensor::zeros((2 * b, l, d), DType::F32, &Device::Cpu).expect("zeros");
    let enc = mar
        .forward_encoder(&models::Tokens::Continuous(zeros), &all, &class, None)
        .expect("encoder");
    let z = mar.forward_decoder(&enc, &all, None).expect("decoder");
    check_key(&f, "output.first_step_z", &z, tol);
}

/// The gradient of the Diffusion Loss (masked mean over rows) with respect to every parameter of
/// the MLP denoiser matches the reference's autograd.
#[test]
fn diffloss_mlp_gradients_match_the_reference() {
    let Some((dir, f, _)) = fixture("diffloss_training_terms.safetensors") else {
        return;
    };
    let (dl, variables) = reference_diffloss(&dir, 100);
    let terms = dl
        .loss_terms(
            &f["input.x_start"],
            &f["input.c"],
            &timesteps(&f["input.t"]),
            &f["input.noise"],
        )
        .expect("loss terms");
    let loss = models::diffloss::masked_mean(&terms.loss, Some(&f["input.mask"])).expect("mean");
    check_gradients(
        &dir,
        "diffloss_mlp_grads.safetensors",
        &loss,
        &variables,
        "net.",
    );
}

/// The gradient of the small MAR's training loss with respect to every parameter (encoder,
/// decoder, embeddings, Diffusion Loss MLP) matches the reference's autograd.
#[test]
fn small_mar_gradients_match_the_reference() {
    let Some(dir) = parity_dir() else { return };
    check_small_mar_gradients(&dir);
}

/// The gradients of `dir`'s mar_small loss against its mar_small_grads.safetensors.
fn check_small_mar_gradients(dir: &Path) {
    let file = "mar_small.safetensors";
    let (cfg, p) = reference_mar_config(&manifest(dir)[file]["config"]);
    let f = load(dir, file);
    let weights: HashMap<String, Tensor> = f
        .iter()
        .filter(|(k, _)| !k.starts_with("input.") && !k.starts_with("output."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (vb, variables) = trainable(weights);
    let mar = models::mar::Mar::new(&cfg, vb).expect("build MAR from the reference weights");
    let pass = mar_training_pass(&mar, &f, p);
    check_gradients(
        dir,
        "mar_small_grads.safetensors",
        &pass.loss,
        &variables,
        "",
    );
}

/// `ablate import` of the reference-format checkpoint made from mar_small's weights
/// (tests/fixtures/mar_small.pth), loaded back by `harness::import`, reproduces the reference
/// encoder and decoder outputs; its EMA weights (a perturbed copy) do not.
#[test]
fn imported_reference_checkpoint_reproduces_the_reference_mar() {
    // the .pth was made from this copy of the fixture, whatever ABLATE_PARITY_DIR says
    let dir = ablate_tests::workspace_root().join("tests/fixtures/parity");
    let file = "mar_small.safetensors";
    let tol = tolerance(
        manifest(&dir)[file]["tolerance"]
            .as_str()
            .expect("tolerance"),
    );
    let f = load(&dir, file);
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_dir = tmp.path().join("imported");
    let out = ablate_tests::ablate(
        tmp.path(),
        &[
            "import",
            "tests/fixtures/mar_small.pth",
            "--out",
            out_dir.to_str().expect("utf-8 path"),
            "--heads",
            "4",
        ],
    );
    assert!(
        out.status.success(),
        "ablate import failed:\n{}",
        ablate_tests::stderr(&out)
    );
    let cfg_path = out_dir.join("config.json");
    let config = harness::import::read_config(&cfg_path).expect("config.json");
    let forward = |weights: &str| {
        let mar = harness::import::load_mar(
            &out_dir.join(weights),
            &config,
            &cfg_path,
            None,
            &Device::Cpu,
        )
        .expect("load the imported MAR");
        let tokens =
            models::mar::patchify(&f["input.latents"], config.patch_size).expect("patchify");
        let labels: Vec<u32> = f["input.labels"]
            .to_vec1::<i64>()
            .expect("labels")
            .into_iter()
            .map(|v| v as u32)
            .collect();
        let mask: Vec<bool> = f64s(&f["input.mask"])
            .into_iter()
            .map(|v| v > 0.5)
            .collect();
        let class = mar
            .class_embedding(&labels, false)
            .expect("class embedding");
        let enc = mar
            .forward_encoder(&models::Tokens::Continuous(tokens), &mask, &class, None)
            .expect("encoder");
        let z = mar.forward_decoder(&enc, &mask, None).expect("decoder");
        (enc, z)
    };
    let (enc, z) = forward("model.safetensors");
    check_key(&f, "output.encoder_out", &enc, tol);
    check_key(&f, "output.z", &z, tol);
    let (_, z_ema) = forward("model_ema.safetensors");
    let (v, _) = worst_violation(&f64s(&z_ema), &f64s(&f["output.z"]), tol.0, tol.1);
    assert!(v > 0.0, "the EMA weights are a different (perturbed) set");
}

/// The Inception-v3 FID network, loaded by the harness's loader (the code that reads the real
/// weight file), against torch-fidelity and pytorch-fid on every input of the fixture.
#[test]
fn inception_fid_network_matches_both_conventions() {
    use harness::eval::inception::{extract, load_inception, ImagesU8};
    use models::inception::Convention;
    let Some(dir) = parity_dir() else { return };
    let io_file = "inception_fid_io.safetensors";
    let weights_file = "inception_fid_random_weights.safetensors";
    let m = manifest(&dir);
    assert!(
        m.get(weights_file).is_some(),
        "manifest.json lists {weights_file}"
    );
    let tol = tolerance(m[io_file]["tolerance"].as_str().expect("tolerance"));
    let net = load_inception(&dir.join(weights_file), &Device::Cpu).expect("load the weights");
    let f = load(&dir, io_file);
    let mut checked = 0;
    let mut inputs: Vec<&String> = f.keys().filter(|k| k.starts_with("input.")).collect();
    inputs.sort();
    for input in inputs {
        let name = input.trim_start_matches("input.");
        let t = &f[input];
        let (n, c, h, w) = t.dims4().expect("NCHW images");
        let images = ImagesU8 {
            pixels: t.flatten_all().and_then(|t| t.to_vec1::<u8>()).expect("u8"),
            n,
            channels: c,
            height: h,
            width: w,
        };
        for (conv, prefix) in [
            (Convention::TorchFidelity, "torch_fidelity"),
            (Convention::PytorchFid, "pytorch_fid"),
        ] {
            let pool_key = format!("output.{prefix}.{name}.pool3");
            let logits_key = format!("output.{prefix}.{name}.logits_unbiased");
            if !f.contains_key(&pool_key) && !f.contains_key(&logits_key) {
                continue;
            }
            let out = extract(&net, &images, conv, n).expect("forward");
            if f.contains_key(&pool_key) {
                let ours: Vec<f64> = out.pool.iter().map(|&v| v as f64).collect();
                check(&pool_key, &ours, &f64s(&f[&pool_key]), tol);
                checked += 1;
            }
            if f.contains_key(&logits_key) {
                let ours: Vec<f64> = out.logits.iter().map(|&v| v as f64).collect();
                check(&logits_key, &ours, &f64s(&f[&logits_key]), tol);
                checked += 1;
            }
        }
    }
    let outputs = f.keys().filter(|k| k.starts_with("output.")).count();
    assert_eq!(checked, outputs, "every output of {io_file} checked");
}

/// Tolerance of one metric and case from the metric_cases manifest text, e.g.
/// "FID: rtol 1e-6 (full_rank, close), 1e-5 (rank_deficient); IS: rtol 1e-6; …".
fn metric_tolerance(text: &str, metric: &str, case: &str) -> (f64, f64) {
    let section = text
        .split(';')
        .map(str::trim)
        .find(|s| s.starts_with(&format!("{metric}:")))
        .unwrap_or_else(|| panic!("no {metric} tolerance in {text:?}"));
    let body = &section[metric.len() + 1..];
    // "rtol 1e-6 (a, b), 1e-5 (c)": the number before the parenthesis that names the case
    let (mut kind, mut last) = ("rtol", None);
    let mut rest = body;
    while let Some(open) = rest.find('(') {
        for w in rest[..open].split(|c: char| c.is_whitespace() || c == ',') {
            match w {
                "rtol" | "atol" | "abs" => kind = if w == "rtol" { "rtol" } else { "atol" },
                _ => {
                    if let Ok(v) = w.parse::<f64>() {
                        last = Some(v)
                    }
                }
            }
        }
        let close = rest[open..]
            .find(')')
            .map(|c| open + c)
            .unwrap_or(rest.len());
        let names = &rest[open + 1..close];
        if names.split(',').any(|n| n.trim() == case) {
            let v = last.unwrap_or_else(|| panic!("{metric} tolerance for {case}"));
            return if kind == "rtol" { (0.0, v) } else { (v, 0.0) };
        }
        rest = &rest[(close + 1).min(rest.len())..];
    }
    // no parenthesis names the case (e.g. "rtol 1e-4 (float32 reference)"): one value for all
    tolerance(body)
}

fn features(f: &HashMap<String, Tensor>, key: &str) -> (Vec<f32>, usize, usize) {
    let t = &f[key];
    let (n, d) = t.dims2().expect("n × d");
    let v = t
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32");
    (v, n, d)
}

#[test]
fn metric_cases_match_pytorch_fid_and_torch_fidelity() {
    use harness::eval::metrics;
    let Some(dir) = parity_dir() else { return };
    let file = "metric_cases.safetensors";
    let text = manifest(&dir)[file]["tolerance"]
        .as_str()
        .expect("tolerance")
        .to_string();
    let f = load(&dir, file);
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("metric_cases.json")).expect("metric_cases.json"),
    )
    .expect("metric_cases.json is JSON");
    let cases = expected.as_object().expect("an object of cases");
    let mut checked = Vec::new();
    for (case, values) in cases {
        let key1 = format!("{case}.features_1");
        if !f.contains_key(&key1) {
            continue;
        }
        let (a, n1, d) = features(&f, &key1);
        let (b, n2, d2) = features(&f, &format!("{case}.features_2"));
        assert_eq!(d, d2, "{case}: feature widths");
        let ga = metrics::gaussian_stats(&a, n1, d).expect("stats");
        let gb = metrics::gaussian_stats(&b, n2, d).expect("stats");
        let fid = metrics::frechet_distance(&ga, &gb).expect("fid");
        let tol = metric_tolerance(&text, "FID", case);
        for reference in ["pytorch_fid", "torch_fidelity_fid"] {
            let theirs = values[reference].as_f64().expect("expected FID");
            check(&format!("{case} {reference}"), &[fid], &[theirs], tol);
            checked.push(format!("{case}/{reference}"));
        }
        // KID over one subset of min(n1, n2) rows is reproducible only when that is every row
        if n1 == n2 {
            let theirs = values["torch_fidelity_kid_one_subset_of_min_n"]
                .as_f64()
                .expect("expected KID");
            let (kid, _) =
                metrics::kernel_inception_distance(&a, n1, &b, n2, d, 1, n1, 0).expect("kid");
            check(
                &format!("{case} KID"),
                &[kid],
                &[theirs],
                metric_tolerance(&text, "KID", case),
            );
            checked.push(format!("{case}/kid"));
        }
    }
    let isc = &expected["isc"];
    let (logits, n, c) = features(&f, "isc.logits");
    let splits = isc["splits"].as_u64().expect("splits") as usize;
    assert_eq!(
        isc["shuffle"].as_bool(),
        Some(false),
        "IS without shuffling"
    );
    let (mean, std) = metrics::inception_score(&logits, n, c, splits).expect("is");
    let tol = metric_tolerance(&text, "IS", "isc");
    check(
        "IS mean",
        &[mean],
        &[isc["mean"].as_f64().expect("mean")],
        tol,
    );
    check("IS std", &[std], &[isc["std"].as_f64().expect("std")], tol);
    checked.push("isc".into());

    let prc = &expected["prc"];
    let (real, nr, d) = features(&f, "prc.real");
    let (generated, ng, _) = features(&f, "prc.generated");
    let k = prc["k"].as_u64().expect("k") as usize;
    let (precision, recall) =
        metrics::precision_recall(&real, nr, &generated, ng, d, k).expect("prc");
    let tol = tolerance(
        text.split(';')
            .find(|s| s.contains("precision/recall"))
            .expect("precision/recall tolerance"),
    );
    check(
        "precision",
        &[precision],
        &[prc["precision"].as_f64().expect("precision")],
        tol,
    );
    check(
        "recall",
        &[recall],
        &[prc["recall"].as_f64().expect("recall")],
        tol,
    );
    checked.push("prc".into());
    eprintln!("metric cases checked: {}", checked.join(", "));
    assert!(checked.len() >= 9, "{checked:?}");
}
