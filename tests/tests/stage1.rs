//! Stage 1 end to end: real MNIST digits through the autoencoder tokenizers, and a tokenizer
//! shared by several cells is trained once.
use ablate_tests::{ablate, data_dir, stderr};
use db::Db;
use db::{RunKind, RunStatus};

/// A tiny MNIST spec: VQ vs KL autoencoders (downsample 4 → 4×4 latents), MAR, 3 cells.
fn mnist_spec(dir: &std::path::Path) -> std::path::PathBuf {
    let spec = format!(
        r#"
name = "mnist-tiny"
seeds = [0]

[data]
source = "mnist"
path = "{}"
image_size = 16
train = 300
test = 100

[tokenizers.kl]
kind = "kl"
downsample = 4
width = 8
latent_dim = 4
steps = 30
batch = 16
lr = 3e-3

[tokenizers.vq]
kind = "vq"
downsample = 4
width = 8
latent_dim = 4
codebook = 32
restart_every = 10
steps = 30
batch = 16
lr = 3e-3

[arms]
cross-entropy = {{ tokenizer = "vq" }}
diffusion = {{ tokenizer = "kl" }}

[generator]
kind = "mar"
width = 16
depth = 1
heads = 2

[head]
width = 16
depth = 1
batch_mul = 1
sampling_steps = 5

[train]
steps = 4
batch = 8
warmup = 2
log_every = 2

[sample]
count = 20
mar_steps = 2
batch = 10

[eval]
classifier_steps = 10
classifier_features = 8
is_splits = 2

[grid]
"train.steps" = [2, 3, 4]
"#,
        data_dir().join("mnist-10k").display()
    );
    let path = dir.join("mnist-tiny.toml");
    std::fs::write(&path, spec).expect("write spec");
    path
}

#[test]
fn mnist_autoencoder_tokenizers_trained_once_for_three_cells() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = mnist_spec(dir.path());
    let spec = spec.to_str().expect("utf-8 path");
    let out = ablate(dir.path(), &["run", spec, "--no-report"]);
    let err = stderr(&out);
    assert!(out.status.success(), "stderr:\n{err}");
    assert!(err.contains("6 run(s): 6 finished"), "{err}");
    // each tokenizer fitted once, although three cells use it
    assert_eq!(err.matches("tokenizer vq fitted").count(), 1, "{err}");
    assert_eq!(err.matches("tokenizer kl fitted").count(), 1, "{err}");

    let db = Db::open_existing(&dir.path().join("ablate.sqlite")).expect("database");
    let runs = db.list_runs(Some("mnist-tiny")).expect("runs");
    let tokenizers: Vec<_> = runs
        .iter()
        .filter(|r| r.kind == RunKind::Tokenizer)
        .collect();
    assert_eq!(
        tokenizers.len(),
        2,
        "one run per tokenizer, shared by 3 cells"
    );
    for t in &tokenizers {
        assert_eq!(t.status, RunStatus::Finished, "{}: {:?}", t.name, t.error);
        let last = |key: &str| {
            db.metrics(t.id, Some(key))
                .expect("metrics")
                .last()
                .unwrap_or_else(|| panic!("{}: no {key}", t.name))
                .value
        };
        let (mse, psnr, rfid) = (last("recon/mse"), last("recon/psnr"), last("recon/rfid"));
        assert!(mse > 0.0 && mse < 0.2, "{}: mse {mse}", t.name);
        assert!(psnr > 7.0, "{}: psnr {psnr}", t.name);
        assert!(rfid.is_finite() && rfid >= 0.0, "{}: rfid {rfid}", t.name);
        let curve = db.metrics(t.id, Some("train/recon_mse")).expect("curve");
        assert_eq!(
            curve.iter().map(|m| m.step).collect::<Vec<_>>(),
            vec![25, 30]
        );
        if t.name.contains("vq") {
            let used = last("codebook/used");
            assert!((1.0..=32.0).contains(&used), "codes used {used}");
            assert!(last("codebook/perplexity") >= 1.0);
        }
    }
    let generators: Vec<_> = runs
        .iter()
        .filter(|r| r.kind == RunKind::Generator)
        .collect();
    assert_eq!(generators.len(), 6);
    for g in &generators {
        assert_eq!(g.status, RunStatus::Finished, "{}: {:?}", g.name, g.error);
        let fid = db
            .evals_for_run(g.id)
            .expect("evals")
            .into_iter()
            .find(|e| e.metric == "fid")
            .expect("fid row");
        assert!(fid.value.is_finite());
    }

    // the report's tokenizer table: both tokenizers, their rFID, and the MAR FID with each
    let out = ablate(dir.path(), &["report", "mnist-tiny", "--format", "md"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let md = std::fs::read_to_string(dir.path().join("reports/mnist-tiny/report.md")).expect("md");
    assert!(md.contains("## Tokenizers"), "{md}");
    assert!(
        md.contains(
            "| tokenizer | kind | rFID | PSNR (dB) | codes used | perplexity | MAR FID | MAR IS |"
        ),
        "{md}"
    );
    for name in ["| vq | vq |", "| kl | kl |"] {
        let line = md
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name}: {md}"));
        // 3 cells of one seed each: n=3 generator runs per tokenizer
        assert!(
            line.contains("(n=3)") && !line.contains("missing"),
            "{line}"
        );
    }
}

/// tokenizer.sample_posterior and data.hflip change what the generator trains on (its loss curve)
/// but not the fitted tokenizer: toggling them reuses the KL tokenizer and trains new runs.
#[test]
fn posterior_draws_and_flips_train_new_runs_on_the_same_tokenizer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = mnist_spec(dir.path());
    let spec = spec.to_str().expect("utf-8 path");
    let run = |extra: &[&str]| {
        let mut args = vec!["run", spec, "--no-report", "--set", "grid={}"];
        for e in extra {
            args.extend(["--set", e]);
        }
        let out = ablate(dir.path(), &args);
        let err = stderr(&out);
        assert!(out.status.success(), "{extra:?}: {err}");
        err
    };
    let plain = run(&[]);
    assert!(plain.contains("tokenizer kl fitted"), "{plain}");
    let posterior = run(&["tokenizers.kl.sample_posterior=true"]);
    let flipped = run(&["data.hflip=true"]);
    for err in [&posterior, &flipped] {
        assert!(!err.contains("tokenizer kl fitted"), "refitted: {err}");
    }
    // posterior draws concern the KL arm alone; flips change what both arms train on
    assert!(posterior.contains("2 finished (1 earlier)"), "{posterior}");
    assert!(flipped.contains("2 finished (0 earlier)"), "{flipped}");
    let db = Db::open_existing(&dir.path().join("ablate.sqlite")).expect("database");
    // each configuration is a version of the experiment: all runs, across versions
    let runs = db.list_runs(None).expect("runs");
    let diffusion: Vec<_> = runs
        .iter()
        .filter(|r| r.kind == RunKind::Generator && r.name.contains("diffusion"))
        .collect();
    assert_eq!(diffusion.len(), 3, "plain, posterior draws, flips");
    let curves: Vec<Vec<f64>> = diffusion
        .iter()
        .map(|r| {
            assert_eq!(r.status, RunStatus::Finished, "{}: {:?}", r.name, r.error);
            db.metrics(r.id, Some("train/loss"))
                .expect("metrics")
                .iter()
                .map(|m| m.value)
                .collect()
        })
        .collect();
    assert_ne!(curves[0], curves[1], "posterior draws changed nothing");
    assert_ne!(curves[0], curves[2], "flips changed nothing");
    let e = ablate(
        dir.path(),
        &["run", spec, "--set", "tokenizers.vq.sample_posterior=true"],
    );
    let err = stderr(&e);
    assert_eq!(e.status.code(), Some(2), "{err}");
    assert!(err.contains("tokenizers.vq.sample_posterior"), "{err}");
}

#[test]
fn bad_data_path_fails_the_run_with_the_file_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = mnist_spec(dir.path());
    let spec = spec.to_str().expect("utf-8 path");
    let out = ablate(
        dir.path(),
        &[
            "run",
            spec,
            "--no-report",
            "--set",
            "data.path=/nonexistent/mnist",
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("/nonexistent/mnist: not found; expected an MNIST folder"),
        "{err}"
    );
}

/// A tokenizer fit that cannot store its result (a file where the tokenizer cache folder
/// belongs) fails its own run as well as the generator runs that needed it, and the message
/// names the file in the way: nothing is left `running`.
#[test]
fn a_tokenizer_that_cannot_be_stored_fails_its_run_with_the_file_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("cache")).expect("cache folder");
    std::fs::write(root.join("cache/tokenizers"), b"in the way").expect("blocking file");
    let out = ablate(
        &root,
        &[
            "run",
            "experiments/tiny.toml",
            "--no-report",
            "--set",
            "grid.\"generator.kind\"=[\"ar\"]",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    let in_the_way = format!(
        "{} is a file where ablate needs a folder: move it away",
        root.join("cache/tokenizers").display()
    );
    assert!(err.contains(&in_the_way), "{err}");
    let db = Db::open_existing(&root.join("ablate.sqlite")).expect("db");
    let runs = db.list_runs(Some("tiny")).expect("runs");
    let tokenizer = runs
        .iter()
        .find(|r| r.kind == RunKind::Tokenizer && r.name.contains("vq"))
        .expect("the k-means tokenizer's run");
    assert_eq!(tokenizer.status, RunStatus::Failed);
    assert!(
        tokenizer
            .error
            .as_deref()
            .is_some_and(|e| e.contains(&in_the_way)),
        "{:?}",
        tokenizer.error
    );
    assert!(
        runs.iter().all(|r| r.status != RunStatus::Running),
        "{runs:?}"
    );
}
