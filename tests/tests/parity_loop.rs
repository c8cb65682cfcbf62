//! Parity of whole reverse processes of the Diffusion Loss sampler with the official MAR code
//! (`tests/fixtures/parity-loop`, made by its `make.py`): the 50-step respaced cosine process
//! without clipping, learned σ, with and without guidance, at temperatures 1 and 0.95, run by
//! our `DiffLoss::reverse_process` on the reference's x_T and per-step noise. Every step of the
//! trajectory is compared, relative to the largest |x| of that step: with these random weights
//! the first step of the cosine schedule multiplies the ε error by ~10³ and |x| reaches ~10⁵.
//! `ABLATE_PARITY_LOOP_DIR` points the test at another folder in the same format.
use std::collections::HashMap;
use std::path::PathBuf;

use ablate_tests::{tolerance, workspace_root, worst_violation};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use models::diffloss::{DiffLoss, DiffLossConfig};
use models::diffusion::Schedule;

const FILE: &str = "diffloss_sample_loop.safetensors";

fn fixture_dir() -> PathBuf {
    std::env::var_os("ABLATE_PARITY_LOOP_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("tests/fixtures/parity-loop"))
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor to f64")
}

/// |ours − theirs| ≤ atol·s + rtol·|theirs| with s = max(1, max |theirs|); returns the worst
/// |ours − theirs| / s.
fn check_scaled(what: &str, ours: &Tensor, theirs: &Tensor, tol: (f64, f64)) -> f64 {
    let (ours, theirs) = (f64s(ours), f64s(theirs));
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let s = theirs.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let scaled = |v: &[f64]| v.iter().map(|x| x / s).collect::<Vec<_>>();
    let (ours_s, theirs_s) = (scaled(&ours), scaled(&theirs));
    let (v, i) = worst_violation(&ours_s, &theirs_s, tol.0, tol.1);
    assert!(
        v <= 0.0,
        "{what}: index {i}: ours {} vs reference {} (largest |x| {s}, atol {} and rtol {} \
         relative to it)",
        ours[i],
        theirs[i],
        tol.0,
        tol.1
    );
    ours_s
        .iter()
        .zip(&theirs_s)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
}

#[test]
fn diffloss_reverse_process_matches_the_reference_loop() {
    let dir = fixture_dir();
    let text = std::fs::read_to_string(dir.join("manifest.json"))
        .unwrap_or_else(|e| panic!("{}/manifest.json: {e}", dir.display()));
    let manifest: serde_json::Value = serde_json::from_str(&text).expect("manifest.json is JSON");
    let entry = &manifest[FILE];
    let tol = tolerance(entry["tolerance"].as_str().expect("tolerance"));
    let config = &entry["config"];
    let get = |k: &str| config[k].as_u64().unwrap_or_else(|| panic!("config.{k}")) as usize;
    let schedule = match config["schedule"].as_str() {
        Some("cosine") => Schedule::Cosine,
        Some("linear") => Schedule::Linear,
        other => panic!("config.schedule: expected \"cosine\" or \"linear\", found {other:?}"),
    };
    let (in_ch, out_ch) = (get("in_channels"), get("out_channels"));
    let cfg = DiffLossConfig {
        token_dim: in_ch,
        z_dim: get("z_channels"),
        width: get("width"),
        depth: get("depth"),
        train_steps: get("train_steps"),
        sampling_steps: get("sampling_steps"),
        schedule,
        learn_sigma: out_ch == 2 * in_ch,
        clip_denoised: config["clip_denoised"].as_bool().expect("clip_denoised"),
        precision: models::Precision::F32,
    };
    let f: HashMap<String, Tensor> = candle_core::safetensors::load(dir.join(FILE), &Device::Cpu)
        .unwrap_or_else(|e| panic!("{FILE}: {e}"));
    let weights: HashMap<String, Tensor> = f
        .iter()
        .filter(|(k, _)| k.starts_with("net."))
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F32).expect("f32")))
        .collect();
    let dl = DiffLoss::new(
        &cfg,
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
    )
    .expect("the denoiser from the reference weights");
    let z = &f["input.c"];
    let cases = config["cases"].as_object().expect("config.cases");
    assert!(!cases.is_empty());
    for (case, c) in cases {
        let scale = c["cfg"].as_f64().expect("cfg");
        let temperature = c["temperature"].as_f64().expect("temperature");
        let x_t = &f[&format!("{case}.input.x_T")];
        let all = &f[&format!("{case}.input.noise")];
        let steps = all.dim(0).expect("steps");
        assert_eq!(steps, dl.gen_diffusion.num_timesteps(), "{case}: steps");
        let noise: Vec<Tensor> = (0..steps)
            .map(|k| all.get(k).expect("noise of a step"))
            .collect();
        let run = |k: usize| {
            dl.reverse_process(z, x_t.clone(), &noise[..k], temperature, scale)
                .expect("reverse process")
        };
        // the whole process, as DiffLoss::sample runs it
        let worst = check_scaled(
            &format!("{case}.output.sample"),
            &run(steps),
            &f[&format!("{case}.output.sample")],
            tol,
        );
        // and x after every step (the first k steps of the same process)
        let trajectory = &f[&format!("{case}.output.trajectory")];
        let mut worst_step = 0.0f64;
        for k in 1..=steps {
            let reference = trajectory.get(k - 1).expect("step of the trajectory");
            worst_step = worst_step.max(check_scaled(
                &format!("{case}: x after step {k} of {steps}"),
                &run(k),
                &reference,
                tol,
            ));
        }
        eprintln!(
            "{case}: worst |ours - reference| / max|reference|: sample {worst:.2e}, any step \
             {worst_step:.2e}"
        );
    }
}
