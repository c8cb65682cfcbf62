//! `ablate import` and `ablate sample`: official MAR checkpoints converted exactly, sampled from, and bad ones refused.
use ablate_tests::{ablate, max_abs_diff, stderr, stdout};

/// The reference MAR weights the `.pth` fixtures were made from (tests/fixtures/make_mar_pth.py).
fn mar_small_weights() -> std::collections::HashMap<String, candle_core::Tensor> {
    let path = ablate_tests::workspace_root().join("tests/fixtures/parity/mar_small.safetensors");
    candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
        .expect("mar_small.safetensors")
        .into_iter()
        .filter(|(k, _)| !k.starts_with("input.") && !k.starts_with("output."))
        .collect()
}

fn load_safetensors(
    path: &std::path::Path,
) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// No `.NAME.tmp-*` folder or file is left beside an output.
fn assert_no_temporaries(dir: &std::path::Path) {
    let left: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "temporaries left behind: {left:?}");
}

#[test]
fn import_converts_a_reference_checkpoint_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("mar_small");
    let out = ablate(
        dir.path(),
        &[
            "import",
            "tests/fixtures/mar_small.pth",
            "--out",
            out_dir.to_str().expect("utf-8 path"),
            "--heads",
            "4",
        ],
    );
    assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    let text = stdout(&out);
    for want in [
        "entries: args, epoch, model, model_ema, optimizer (epoch 3)",
        "model: 92 tensors",
        "model_ema: 92 tensors",
        "parameters: 297760",
        "encoder 2×64 (4 heads), decoder 2×64 (4 heads)",
        "64 tokens (8×8 grid, patch 1) of width 16, buffer 8, 10 classes",
        "unused: none",
    ] {
        assert!(text.contains(want), "'{want}' not in:\n{text}");
    }

    // model.safetensors: the reference state_dict, names and values unchanged
    let reference = mar_small_weights();
    let model = load_safetensors(&out_dir.join("model.safetensors"));
    let mut names: Vec<&String> = model.keys().collect();
    names.sort();
    let mut want: Vec<&String> = reference.keys().collect();
    want.sort();
    assert_eq!(names, want);
    for (name, t) in &reference {
        assert_eq!(model[name].dims(), t.dims(), "{name}");
        assert_eq!(model[name].dtype(), t.dtype(), "{name}");
        assert_eq!(max_abs_diff(&model[name], t), 0.0, "{name} differs");
    }
    // model_ema.safetensors: the perturbed copy (same names, close but not equal values)
    let ema = load_safetensors(&out_dir.join("model_ema.safetensors"));
    assert_eq!(ema.len(), reference.len());
    let mut differs = 0;
    for (name, t) in &reference {
        let d = max_abs_diff(&ema[name], t);
        assert!(d < 1e-2, "{name}: EMA differs by {d}");
        if d > 0.0 {
            differs += 1;
        }
    }
    assert_eq!(differs, reference.len(), "every EMA tensor is perturbed");

    // config.json: the manifest's configuration of mar_small, under the same names
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            ablate_tests::workspace_root().join("tests/fixtures/parity/manifest.json"),
        )
        .expect("manifest"),
    )
    .expect("manifest json");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("config.json")).expect("config.json"),
    )
    .expect("config json");
    let want = manifest["mar_small.safetensors"]["config"]
        .as_object()
        .expect("config object");
    for (key, value) in want {
        let got = &config[key];
        let same = match (value.as_f64(), got.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => value == got,
        };
        assert!(same, "config.json {key}: {got} vs manifest {value}");
    }
    assert_eq!(config["seq_len"], 64);
    assert_eq!(config["token_embed_dim"], 16);
    assert_no_temporaries(dir.path());

    // importing again over the folder replaces it in place
    let again = ablate(
        dir.path(),
        &[
            "import",
            "tests/fixtures/mar_small.pth",
            "--out",
            out_dir.to_str().expect("utf-8 path"),
            "--heads",
            "4",
        ],
    );
    assert!(again.status.success(), "stderr:\n{}", stderr(&again));
    assert_no_temporaries(dir.path());
    assert_no_temporaries(&out_dir);
}

#[test]
fn sample_from_imported_weights_writes_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let imported = dir.path().join("imported");
    let imp = imported.to_str().expect("utf-8 path");
    let out = ablate(
        dir.path(),
        &[
            "import",
            "tests/fixtures/mar_small.pth",
            "--out",
            imp,
            "--heads",
            "4",
        ],
    );
    assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    let sample = |name: &str, extra: &[&str]| {
        let file = dir.path().join(name);
        let mut args = vec![
            "sample",
            "--weights",
            imp,
            "--classes",
            "0,1,2",
            "--count",
            "4",
            "--mar-steps",
            "4",
            "--cfg",
            "2.0",
            "--temperature",
            "0.9",
            "--diffusion-steps",
            "10",
            "--seed",
            "7",
            "--out",
            file.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra);
        let out = ablate(dir.path(), &args);
        assert!(out.status.success(), "stderr:\n{}", stderr(&out));
        assert!(
            stdout(&out).contains("tokens [4, 64, 16]"),
            "{}",
            stdout(&out)
        );
        load_safetensors(&file)
    };
    let ema = sample("ema.safetensors", &[]);
    let tokens = &ema["tokens"];
    assert_eq!(tokens.dims(), &[4, 64, 16]);
    assert_eq!(ema["latents"].dims(), &[4, 16, 8, 8]);
    let v = tokens
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("tokens");
    assert!(v.iter().all(|x| x.is_finite()), "finite tokens");
    assert!(v.iter().all(|x| *x != 0.0), "every token was sampled");
    assert_eq!(
        ema["labels"].to_vec1::<i64>().expect("labels"),
        vec![0, 1, 2, 0]
    );
    // latents are the reference's unpatchify of the tokens
    let back = models::mar::patchify(&ema["latents"], 1).expect("patchify");
    assert_eq!(max_abs_diff(&back, tokens), 0.0);
    // the same seed gives the same tokens; --no-ema samples from the other weights
    let again = sample("again.safetensors", &[]);
    assert_eq!(max_abs_diff(&again["tokens"], tokens), 0.0);
    let raw = sample("raw.safetensors", &["--no-ema"]);
    assert!(max_abs_diff(&raw["tokens"], tokens) > 0.0);
    assert_no_temporaries(dir.path());

    // a class the model does not have is a usage error
    let bad = ablate(
        dir.path(),
        &[
            "sample",
            "--weights",
            imp,
            "--classes",
            "10",
            "--out",
            "x.safetensors",
        ],
    );
    assert_eq!(bad.status.code(), Some(2), "stderr:\n{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("class 10 is out of range"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn bad_checkpoints_are_refused_with_the_file_named_and_nothing_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = ablate_tests::workspace_root();
    // a .pth cut in half (the zip directory at its end is gone)
    let full = std::fs::read(root.join("tests/fixtures/mar_small.pth")).expect("fixture");
    let truncated = dir.path().join("truncated.pth");
    std::fs::write(&truncated, &full[..full.len() / 2]).expect("write");
    let cases: Vec<(String, &[&str])> = vec![
        (
            truncated.display().to_string(),
            &["not a PyTorch checkpoint", "truncated"],
        ),
        (
            "tests/fixtures/no_model.pth".into(),
            &["no 'model' entry", "found: epoch, state_dict"],
        ),
        (
            "tests/fixtures/mar_small_bad_shape.pth".into(),
            &[
                "decoder_blocks.1.attn.proj.weight",
                "[64, 32]",
                "expected [64, 64]",
            ],
        ),
        ("tests/fixtures/missing.pth".into(), &["cannot open"]),
    ];
    for (file, wants) in cases {
        let out_dir = dir.path().join("out");
        let out = ablate(
            dir.path(),
            &[
                "import",
                &file,
                "--out",
                out_dir.to_str().expect("utf-8 path"),
            ],
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{file}: stderr:\n{err}");
        assert!(err.contains(&file), "{file} not named in: {err}");
        for want in wants {
            assert!(err.contains(want), "{file}: '{want}' not in: {err}");
        }
        assert!(
            !out_dir.exists(),
            "{file}: output written despite the error"
        );
        assert_no_temporaries(dir.path());
    }
}
