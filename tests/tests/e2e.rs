//! End-to-end: the real CLI on tiny specs, checked against the real database and report files.
use ablate_tests::{ablate, max_abs_diff, stderr, stdout};
use db::Db;

#[test]
fn tiny_spec_runs_end_to_end_and_reruns_in_no_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let out = ablate(root, &["run", "experiments/tiny.toml"]);
    assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("| AR | raster | causal | 1 | 7.2k / 16.5k |"),
        "table printed, with each arm's parameter count:\n{text}"
    );
    assert!(text.contains("database: "), "{text}");

    let db = Db::open_existing(&root.join("ablate.sqlite")).expect("database exists");
    let runs = db.list_runs(Some("tiny")).expect("runs");
    let generators: Vec<_> = runs.iter().filter(|r| r.kind == "generator").collect();
    assert_eq!(generators.len(), 4, "2 cells × 2 arms × 1 seed");
    // size parity: AR (depth + decoder_depth blocks) and MAR (encoder + decoder) per arm
    for arm in ["cross-entropy", "diffusion"] {
        let size = |kind: &str| {
            generators
                .iter()
                .find(|r| r.arm.as_deref() == Some(arm) && r.params["generator"]["kind"] == kind)
                .and_then(|r| r.params["model"]["param_count"].as_f64())
                .unwrap_or_else(|| panic!("{kind} {arm}: a recorded parameter count"))
        };
        let ratio = size("ar") / size("mar");
        assert!(
            (0.85..=1.15).contains(&ratio),
            "{arm}: AR/MAR parameters {ratio}"
        );
    }
    for r in &generators {
        assert_eq!(r.status, "finished", "{}: {:?}", r.name, r.error);
        assert!(r.arm.is_some());
        assert_eq!(r.params["name"], "tiny");
        // the built model, recorded beside the spec: its size and tokens per image (8 px / 4)
        assert!(
            r.params["model"]["param_count"].as_u64().unwrap_or(0) > 1000,
            "{}",
            r.params
        );
        assert_eq!(r.params["model"]["seq_len"], 4, "{}", r.params);
        assert!(!r.host.is_empty());
        let evals = db.evals_for_run(r.id).expect("evals");
        let fid = evals.iter().find(|e| e.metric == "fid").expect("fid row");
        let is = evals.iter().find(|e| e.metric == "is").expect("is row");
        assert!(
            fid.value.is_finite() && fid.value >= 0.0,
            "fid {}",
            fid.value
        );
        assert!(
            is.value >= 1.0 - 1e-9 && is.value <= 3.0 + 1e-9,
            "IS of 3 classes in [1, 3]: {}",
            is.value
        );
        assert_eq!(fid.sample_count, 20);
        assert!(fid.feature_net.starts_with("classifier:"));
        // every row says which reference statistics and input convention it used
        let settings: serde_json::Value =
            serde_json::from_str(&fid.settings).expect("settings JSON");
        assert_eq!(settings["convention"], "unit", "{settings}");
        assert_eq!(settings["reference_count"], 60, "{settings}");
        assert!(
            settings["reference_stats"]
                .as_str()
                .is_some_and(|s| s.contains("-test-classifier-")),
            "{settings}"
        );
        for metric in ["kid", "kid_std", "precision", "recall"] {
            let row = evals
                .iter()
                .find(|e| e.metric == metric)
                .unwrap_or_else(|| panic!("{metric} row"));
            assert!(row.value.is_finite(), "{metric} {}", row.value);
            assert_eq!(row.sample_count, 20);
        }
        for metric in ["precision", "recall"] {
            let v = evals
                .iter()
                .find(|e| e.metric == metric)
                .expect("row")
                .value;
            assert!((0.0..=1.0).contains(&v), "{metric} {v}");
        }
        let losses = db.metrics(r.id, Some("train/loss")).expect("metrics");
        assert_eq!(
            losses.iter().map(|m| m.step).collect::<Vec<_>>(),
            vec![2, 4, 6]
        );
        let kinds: Vec<String> = db
            .artifacts(r.id)
            .expect("artifacts")
            .into_iter()
            .map(|a| a.kind)
            .collect();
        assert!(
            kinds.contains(&"model".to_string()) && kinds.contains(&"samples".to_string()),
            "{kinds:?}"
        );
    }
    // stage-1 runs: one tokenizer per arm (shared by both cells), one feature net
    assert_eq!(runs.iter().filter(|r| r.kind == "tokenizer").count(), 2);
    assert_eq!(runs.iter().filter(|r| r.kind == "classifier").count(), 1);
    let classifier = runs
        .iter()
        .find(|r| r.kind == "classifier")
        .expect("classifier run");
    let acc = db
        .metrics(classifier.id, Some("test/accuracy"))
        .expect("accuracy");
    assert_eq!(acc.len(), 1);

    // the report files, with the table's numbers taken from the database
    let report_dir = root.join("reports/tiny");
    let md = std::fs::read_to_string(report_dir.join("report.md")).expect("report.md");
    let ar_ce = generators
        .iter()
        .find(|r| r.cell == "generator.kind=ar" && r.arm.as_deref() == Some("cross-entropy"))
        .expect("ar ce run");
    let fid = db
        .evals_for_run(ar_ce.id)
        .expect("evals")
        .into_iter()
        .find(|e| e.metric == "fid")
        .expect("fid");
    assert!(
        md.contains(&format!("{:.2} ± – (n=1)", fid.value)),
        "report has the AR cross-entropy FID:\n{md}"
    );
    // 8×8 images in 4×4 patches = 4 tokens, sampled in 2 MAR steps: many per step
    assert!(md.contains("| MAR | random | bidirectional | many (2 steps) |"));
    let html = std::fs::read_to_string(report_dir.join("report.html")).expect("report.html");
    assert!(html.contains("<svg") && html.contains("data:image/png;base64,"));
    let png = std::fs::read(report_dir.join("fid_bars.png")).expect("fid_bars.png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let csv = std::fs::read_to_string(report_dir.join("metrics.csv")).expect("metrics.csv");
    assert!(csv.lines().count() > 4);

    // running again trains nothing
    let again = ablate(root, &["run", "experiments/tiny.toml"]);
    assert!(again.status.success(), "{}", stderr(&again));
    let err = stderr(&again);
    assert!(
        err.contains("4 run(s): 4 finished (4 earlier), 0 failed"),
        "{err}"
    );
    assert_eq!(
        db.list_runs(Some("tiny")).expect("runs").len(),
        runs.len(),
        "no new runs"
    );

    // plan, list and show read the same database
    let plan = stdout(&ablate(root, &["plan", "experiments/tiny.toml"]));
    assert_eq!(plan.matches("finished").count(), 4, "{plan}");
    let list = stdout(&ablate(root, &["list"]));
    assert!(list.contains("tiny"), "{list}");
    let show = ablate(root, &["show", &ar_ce.id.to_string()]);
    assert!(show.status.success());
    assert!(stdout(&show).contains("fid"), "{}", stdout(&show));
    // a sampling-only change (CFG) makes new runs that reuse the trained weights
    let cfg = ablate(
        root,
        &[
            "run",
            "experiments/tiny.toml",
            "--set",
            "sample.cfg=2.0",
            "--no-report",
        ],
    );
    assert!(cfg.status.success(), "{}", stderr(&cfg));
    let all = db.list_runs(Some("tiny")).expect("runs");
    let guided: Vec<_> = all
        .iter()
        .filter(|r| r.kind == "generator" && r.params["sample"]["cfg"] == 2.0)
        .collect();
    assert_eq!(guided.len(), 4);
    for g in &guided {
        assert_eq!(g.status, "finished");
        let twin = generators
            .iter()
            .find(|r| r.cell == g.cell && r.arm == g.arm)
            .expect("unguided twin");
        let model = |id: i64| {
            db.artifacts(id)
                .expect("artifacts")
                .into_iter()
                .find(|a| a.kind == "model")
                .expect("model")
                .path
        };
        assert_eq!(
            model(g.id),
            model(twin.id),
            "{}: weights are shared",
            g.name
        );
        assert!(db
            .evals_for_run(g.id)
            .expect("evals")
            .iter()
            .any(|e| e.metric == "fid"));
    }
    // compare a guided run with its unguided twin: the CFG scale is the difference
    let twin = generators
        .iter()
        .find(|r| r.cell == guided[0].cell && r.arm == guided[0].arm)
        .expect("twin");
    let cmp = ablate(
        root,
        &["compare", &twin.id.to_string(), &guided[0].id.to_string()],
    );
    assert!(cmp.status.success(), "{}", stderr(&cmp));
    let text = stdout(&cmp);
    assert!(
        text.contains("sample.cfg") && text.contains("fid"),
        "{text}"
    );
    assert!(
        !text.contains("train.steps"),
        "only differing parameters are listed:\n{text}"
    );
    // the report now has the CFG columns filled (scale 2, paired by seed)
    let rep = ablate(root, &["report", "tiny", "--format", "md"]);
    assert!(rep.status.success(), "{}", stderr(&rep));
    assert!(stdout(&rep).contains("(n=1, cfg 2)"), "{}", stdout(&rep));
    let bad_format = ablate(root, &["report", "tiny", "--format", "pdf"]);
    assert_eq!(bad_format.status.code(), Some(2));
    let unknown = ablate(root, &["report", "nope"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", stderr(&unknown));

    // baseline pin, then check: unchanged passes, a FID rise past the tolerance fails
    let pin = ablate(root, &["baseline", "pin", "tiny", "--name", "main"]);
    assert!(pin.status.success(), "{}", stderr(&pin));
    // the CFG run above is version 2 of the experiment: the baseline holds its 4 runs alone
    assert!(
        stdout(&pin).contains("8 entries pinned"),
        "{}",
        stdout(&pin)
    );
    // an existing name is not overwritten silently, and a name is needed
    let again = ablate(root, &["baseline", "pin", "tiny", "--name", "main"]);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
    let replaced = ablate(
        root,
        &["baseline", "pin", "tiny", "--name", "main", "--force"],
    );
    assert!(replaced.status.success(), "{}", stderr(&replaced));
    let unnamed = ablate(root, &["baseline", "pin", "tiny", "--name", ""]);
    assert_eq!(unnamed.status.code(), Some(2), "{}", stderr(&unnamed));
    let junit = root.join("junit/check.xml");
    let junit_arg = junit.to_str().expect("utf-8");
    let ok = ablate(
        root,
        &["check", "tiny", "--baseline", "main", "--junit", junit_arg],
    );
    assert_eq!(ok.status.code(), Some(0), "{}{}", stdout(&ok), stderr(&ok));
    assert!(stdout(&ok).contains("0 failing: ok"), "{}", stdout(&ok));
    let xml = std::fs::read_to_string(&junit).expect("junit");
    assert!(xml.contains("tests=\"8\" failures=\"0\""), "{xml}");
    // drift in a run of the version the baseline holds: AR cross-entropy at CFG 2
    let ar_ce_guided = guided
        .iter()
        .find(|r| r.cell == ar_ce.cell && r.arm == ar_ce.arm)
        .expect("guided AR cross-entropy run");
    let fid = db
        .evals_for_run(ar_ce_guided.id)
        .expect("evals")
        .into_iter()
        .find(|e| e.metric == "fid")
        .expect("fid");
    let settings: serde_json::Value = serde_json::from_str(&fid.settings).expect("json");
    db.insert_eval(&db::NewEval {
        run_id: ar_ce_guided.id,
        step: fid.step,
        metric: "fid",
        value: fid.value + 0.75,
        sample_count: fid.sample_count,
        feature_net: &fid.feature_net,
        settings: &settings,
    })
    .expect("raise the FID");
    let drift = ablate(
        root,
        &["check", "tiny", "--baseline", "main", "--junit", junit_arg],
    );
    let text = stdout(&drift);
    assert_eq!(drift.status.code(), Some(1), "{text}{}", stderr(&drift));
    assert!(
        text.contains("DRIFT") && text.contains("fid rise of 0.7500 exceeds the allowed 0.5000"),
        "{text}"
    );
    let xml = std::fs::read_to_string(&junit).expect("junit");
    assert!(
        xml.contains("failures=\"1\"") && xml.contains("<failure"),
        "{xml}"
    );
    for (args, what) in [
        (
            &["check", "tiny", "--baseline", "nope"][..],
            "no baseline named 'nope'",
        ),
        (
            &["check", "nope", "--baseline", "main"][..],
            "no experiment named 'nope'",
        ),
        (&["check", "tiny"][..], "--baseline"),
    ] {
        let out = ablate(root, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(what), "{args:?}: {}", stderr(&out));
    }

    let missing = ablate(root, &["show", "99999"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("no run with id 99999"));
}

/// Each bad spec is refused with file, line and key, exit code 2, and nothing written.
#[test]
fn bad_specs_are_refused_with_location_and_write_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let tiny =
        std::fs::read_to_string(ablate_tests::workspace_root().join("experiments/tiny.toml"))
            .expect("tiny spec");
    let cases = [
        (
            "unknown-key",
            tiny.replace("kind = \"ar\"\n", "kind = \"ar\"\nordr = \"raster\"\n"),
            "generator.ordr",
            "unknown field",
        ),
        (
            "wrong-type",
            tiny.replace("steps = 6", "steps = \"six\""),
            "train.steps",
            "invalid type",
        ),
        (
            "out-of-range",
            tiny.replace("steps = 6", "steps = 6\nbase_lr = -0.5"),
            "train.base_lr",
            "must be positive",
        ),
        (
            "bad-variant",
            tiny.replace("kind = \"ar\"\n", "kind = \"gpt\"\n"),
            "generator.kind",
            "unknown variant",
        ),
    ];
    for (name, text, key, what) in cases {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, &text).expect("write spec");
        let out = ablate(&root, &["run", path.to_str().expect("utf-8 path")]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        let line = text
            .lines()
            .position(|l| {
                let k = key.rsplit('.').next().unwrap_or(key);
                l.trim_start().starts_with(&format!("{k} ="))
                    && (name != "unknown-key" || l.contains("ordr"))
                    && (name != "bad-variant" || l.contains("gpt"))
            })
            .map(|i| i + 1)
            .expect("key in spec");
        assert!(
            err.contains(&format!("{}:{line}:", path.display())),
            "{name}: expected line {line}: {err}"
        );
        assert!(err.contains(key) && err.contains(what), "{name}: {err}");
        assert!(
            !root.join("ablate.sqlite").exists(),
            "{name}: the database was created"
        );
    }
    // with a database in place, a bad spec leaves it untouched
    let ok = ablate(&root, &["plan", "experiments/tiny.toml"]);
    assert!(ok.status.success());
    let bad = dir.path().join("unknown-key.toml");
    let good = ablate(
        &root,
        &[
            "run",
            "experiments/tiny.toml",
            "--set",
            "train.steps=2",
            "--set",
            "sample.count=10",
            "--no-report",
        ],
    );
    assert!(good.status.success(), "{}", stderr(&good));
    let db = Db::open_existing(&root.join("ablate.sqlite")).expect("db");
    let before = db.list_runs(None).expect("runs").len();
    let out = ablate(&root, &["run", bad.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2));
    let out = ablate(
        &root,
        &[
            "run",
            "experiments/tiny.toml",
            "--set",
            "sample.mar_steps=99",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("sample.mar_steps"),
        "{}",
        stderr(&out)
    );
    assert_eq!(db.list_runs(None).expect("runs").len(), before);
    assert_eq!(db.list_experiments().expect("experiments").len(), 1);
}

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

/// Writes `n` deterministic `size`×`size` RGB PNGs (pattern depends on `seed`) into `dir`.
fn write_pngs(dir: &std::path::Path, n: usize, size: u32, seed: u32) {
    std::fs::create_dir_all(dir).expect("folder");
    for i in 0..n as u32 {
        let img = image::RgbImage::from_fn(size, size, |x, y| {
            let v =
                |k: u32| ((x * (3 + k) + y * (5 + seed) + i * 37 + k * 11 + seed * 53) % 256) as u8;
            image::Rgb([v(0), v(1), v(2)])
        });
        img.save(dir.join(format!("{i:03}.png"))).expect("png");
    }
}

fn fid_value(text: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix("FID: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no FID line in:\n{text}"))
}

/// The random-weight Inception fixture (the real file is not available offline); None skips.
fn inception_fixture() -> Option<String> {
    let dir = ablate_tests::parity_dir()?;
    Some(
        dir.join("inception_fid_random_weights.safetensors")
            .display()
            .to_string(),
    )
}

#[test]
fn fid_on_folders_and_npz_statistics() {
    let Some(weights) = inception_fixture() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let (a, b) = (root.join("a"), root.join("b"));
    write_pngs(&a, 12, 40, 0);
    write_pngs(&b, 12, 40, 1);
    let (a_s, b_s) = (a.display().to_string(), b.display().to_string());

    let out = ablate(root, &["fid", &a_s, &b_s, "--weights", &weights, "--is"]);
    assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    let text = stdout(&out);
    let folders = fid_value(&text);
    assert!(folders.is_finite() && folders > 0.0, "{text}");
    assert!(text.contains("IS ("), "{text}");
    let err = stderr(&out);
    assert!(
        err.contains("only 12 samples"),
        "warned with the count:\n{err}"
    );

    // statistics saved as .npz give the same FID as the folders
    let (a_npz, b_npz) = (root.join("a.npz"), root.join("b.npz"));
    for (folder, npz) in [(&a_s, &a_npz), (&b_s, &b_npz)] {
        let npz = npz.display().to_string();
        let out = ablate(
            root,
            &["fid", "--save-stats", folder, &npz, "--weights", &weights],
        );
        assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    }
    let out = ablate(
        root,
        &[
            "fid",
            &a_npz.display().to_string(),
            &b_npz.display().to_string(),
        ],
    );
    assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    let from_npz = fid_value(&stdout(&out));
    assert!(
        (from_npz - folders).abs() <= 1e-9 * folders.abs().max(1.0),
        "{from_npz} vs {folders}"
    );
    // one side a folder, the other statistics
    let out = ablate(
        root,
        &[
            "fid",
            &a_s,
            &b_npz.display().to_string(),
            "--weights",
            &weights,
        ],
    );
    assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    assert!((fid_value(&stdout(&out)) - folders).abs() <= 1e-9 * folders.max(1.0));
}

#[test]
fn fid_errors_are_clear() {
    let Some(weights) = inception_fixture() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let a = root.join("a");
    write_pngs(&a, 3, 16, 0);
    let a_s = a.display().to_string();

    // an empty folder
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).expect("folder");
    let out = ablate(
        root,
        &[
            "fid",
            &empty.display().to_string(),
            &a_s,
            "--weights",
            &weights,
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no .png or .jpg images"),
        "{}",
        stderr(&out)
    );

    // an .npz without mu / sigma
    let bad = root.join("bad.npz");
    let t = candle_core::Tensor::from_slice(&[1.0f64, 2.0], 2, &candle_core::Device::Cpu)
        .expect("tensor");
    candle_core::Tensor::write_npz(&[("mean", &t)], &bad).expect("npz");
    let out = ablate(root, &["fid", &bad.display().to_string(), &a_s]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("bad.npz") && err.contains("no array 'mu'"),
        "{err}"
    );

    // weights with a missing and with a mis-shaped tensor
    let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu)
        .expect("fixture weights");
    let name = "Mixed_6b.branch7x7dbl_3.conv.weight";
    let original = tensors.remove(name).expect("tensor in the fixture");
    let missing = root.join("missing.safetensors");
    candle_core::safetensors::save(&tensors, &missing).expect("save");
    // `ablate fid A A --weights FILE`
    let fid_with = |weights: &std::path::Path| {
        ablate(
            root,
            &[
                "fid",
                &a_s,
                &a_s,
                "--weights",
                &weights.display().to_string(),
            ],
        )
    };
    let out = fid_with(&missing);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("missing tensor '{name}'")),
        "{}",
        stderr(&out)
    );
    tensors.insert(
        name.into(),
        original.t().expect("transpose").contiguous().expect("c"),
    );
    let shaped = root.join("shaped.safetensors");
    candle_core::safetensors::save(&tensors, &shaped).expect("save");
    let out = fid_with(&shaped);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("tensor '{name}' has shape")),
        "{}",
        stderr(&out)
    );

    // usage: one path, unknown convention
    let out = ablate(root, &["fid", &a_s]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = ablate(
        root,
        &[
            "fid",
            &a_s,
            &a_s,
            "--convention",
            "tf2",
            "--weights",
            &weights,
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--convention"), "{}", stderr(&out));
}

#[test]
fn eval_every_records_fid_over_training_and_plots_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let out = ablate(
        root,
        &[
            "run",
            "experiments/tiny.toml",
            "--set",
            "eval.every=2",
            "--set",
            "eval.every_count=10",
            "--set",
            "seeds=[0,1]",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let db = Db::open_existing(&root.join("ablate.sqlite")).expect("database");
    for r in db
        .list_runs(Some("tiny"))
        .expect("runs")
        .iter()
        .filter(|r| r.kind == "generator")
    {
        let fids: Vec<(i64, i64)> = db
            .evals_for_run(r.id)
            .expect("evals")
            .into_iter()
            .filter(|e| e.metric == "fid")
            .map(|e| (e.step, e.sample_count))
            .collect();
        // steps 2 and 4 during training with 10 samples, step 6 (the end) with all 20
        assert_eq!(fids, vec![(2, 10), (4, 10), (6, 20)], "{}", r.name);
    }
    let report = root.join("reports/tiny");
    assert!(report.join("fid_over_training.svg").exists());
    let html = std::fs::read_to_string(report.join("report.html")).expect("html");
    assert!(
        html.contains("FID over training steps"),
        "plot in the HTML report"
    );
}

/// `train.precision = "bf16"`: both generator kinds and both heads train and sample with bf16
/// products to a finite FID, and the setting is in each run's recorded params.
#[test]
fn tiny_spec_runs_in_bf16() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let out = ablate(
        root,
        &[
            "run",
            "experiments/tiny.toml",
            "--set",
            "train.precision=bf16",
        ],
    );
    assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    let db = Db::open_existing(&root.join("ablate.sqlite")).expect("database exists");
    let runs = db.list_runs(Some("tiny")).expect("runs");
    let generators: Vec<_> = runs.iter().filter(|r| r.kind == "generator").collect();
    assert_eq!(generators.len(), 4, "2 cells × 2 arms × 1 seed");
    for r in &generators {
        assert_eq!(r.status, "finished", "{}: {:?}", r.name, r.error);
        assert_eq!(r.params["train"]["precision"], "bf16", "{}", r.params);
        let evals = db.evals_for_run(r.id).expect("evals");
        let fid = evals.iter().find(|e| e.metric == "fid").expect("fid row");
        assert!(
            fid.value.is_finite() && fid.value >= 0.0,
            "{}: fid {}",
            r.name,
            fid.value
        );
        let losses = db.metrics(r.id, Some("train/loss")).expect("metrics");
        assert!(
            !losses.is_empty() && losses.iter().all(|m| m.value.is_finite()),
            "{}: losses {:?}",
            r.name,
            losses.iter().map(|m| m.value).collect::<Vec<_>>()
        );
    }
}

/// `ablate selftest`: one JSON object per check on stdout, a summary on stderr, exit 0 when every
/// check passes; a device this build cannot use is refused with the reason.
#[test]
fn selftest_prints_one_check_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = ablate(dir.path(), &["selftest", "--device", "cpu"]);
    assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    let checks: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(checks.len(), 60, "5 variants × 2 precisions × 5 + 6 + 4");
    for c in &checks {
        assert_eq!(c["pass"], true, "{c}");
        assert_eq!(c["device"], "cpu", "{c}");
        assert!(c["rel_err"]
            .as_f64()
            .is_some_and(|e| e <= c["tol"].as_f64().unwrap_or(-1.0)));
    }
    for name in [
        "mar-diffusion/bf16/grads",
        "ar-ce/f32/sample",
        "tokenizer-vq/codes",
        "inception/pool3",
    ] {
        assert!(checks.iter().any(|c| c["check"] == name), "missing {name}");
    }
    assert!(
        stderr(&out).contains("all 60 checks passed on cpu"),
        "{}",
        stderr(&out)
    );

    let bad = ablate(dir.path(), &["selftest", "--device", "gpu"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("expected 'cpu' or 'cuda:N'"),
        "{}",
        stderr(&bad)
    );
    // without a GPU (or without `--features cuda`) the error says which device and why
    let cuda = ablate(dir.path(), &["selftest", "--device", "cuda:0"]);
    if !cuda.status.success() {
        assert!(
            stderr(&cuda).contains("device 'cuda:0'"),
            "{}",
            stderr(&cuda)
        );
    }
}

/// Two `ablate run` processes on one spec and root share its runs: each run, tokenizer and the
/// feature net is done by exactly one of them, the other reuses it, and nothing is recorded twice.
#[test]
fn two_processes_share_one_spec_without_doing_anything_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let args = [
        "run",
        "experiments/tiny.toml",
        "--set",
        "train.steps=150",
        "--set",
        "seeds=[0,1]",
    ];
    let spawn = || ablate_tests::spawn_ablate(root, &args);
    let (a, b) = (spawn(), spawn());
    let outs = [
        a.wait_with_output().expect("first process"),
        b.wait_with_output().expect("second process"),
    ];
    let mut executed = 0;
    let (mut feature_nets, mut tokenizers) = (0, 0);
    for out in &outs {
        let err = stderr(out);
        assert!(out.status.success(), "stderr:\n{err}");
        // "8 run(s): 8 finished (K earlier), 0 failed": K were done by the other process
        executed += ablate_tests::runs_done_here(&err, 8);
        feature_nets += err.matches("feature net trained").count();
        tokenizers += err.lines().filter(|l| l.contains("fitted in")).count();
        assert!(stdout(out).contains("| AR | raster | causal | 1 |"));
    }
    assert_eq!(executed, 8, "each run executed once across both processes");
    assert_eq!(feature_nets, 1, "the feature net is trained once");
    // patch and k-means, per generator seed (the tokenizers follow the run seed here)
    assert_eq!(tokenizers, 4, "each tokenizer is fitted once");

    let db = Db::open_existing(&root.join("ablate.sqlite")).expect("database exists");
    let runs = db.list_runs(Some("tiny")).expect("runs");
    let generators: Vec<_> = runs.iter().filter(|r| r.kind == "generator").collect();
    assert_eq!(generators.len(), 8);
    for r in &runs {
        assert_eq!(r.status, "finished", "{}: {:?}", r.name, r.error);
    }
    for r in &generators {
        let evals = db.evals_for_run(r.id).expect("evals");
        assert_eq!(
            evals.iter().filter(|e| e.metric == "fid").count(),
            1,
            "{}",
            r.name
        );
        let steps = ablate_tests::logged_steps(&db, r.id, "train/loss");
        assert_eq!(
            steps,
            (1..=75).map(|i| i * 2).collect::<Vec<i64>>(),
            "{}",
            r.name
        );
    }
}

/// A run that fails in one of two processes sharing a spec is reported failed by the other, not
/// tried again; a later `ablate run` retries it.
#[test]
fn a_run_failed_by_another_process_is_not_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    // a learning rate that makes every run diverge at its first step
    let args = [
        "run",
        "experiments/tiny.toml",
        "--no-report",
        "--set",
        "train.base_lr=1e12",
        "--set",
        "seeds=[0,1]",
    ];
    let children = [
        ablate_tests::spawn_ablate(root, &args),
        ablate_tests::spawn_ablate(root, &args),
    ];
    let mut attempts = 0;
    for child in children {
        let out = child.wait_with_output().expect("process");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("8 run(s): 0 finished (0 earlier), 8 failed"),
            "{err}"
        );
        attempts += err.matches("    failed: training diverged").count();
    }
    assert_eq!(
        attempts, 8,
        "each failing run was tried once across both processes"
    );
    let again = ablate(root, &args);
    assert_eq!(
        stderr(&again)
            .matches("    failed: training diverged")
            .count(),
        8,
        "a new invocation retries failed runs:\n{}",
        stderr(&again)
    );
}

/// `ablate run --jobs 2` starts one worker that shares the runs with it: each run is done by one
/// of the two, the worker logs to ROOT/logs/ and leaves the report to the first process.
#[test]
fn jobs_start_workers_that_share_the_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let out = ablate(
        root,
        &[
            "run",
            "experiments/tiny.toml",
            "--jobs",
            "2",
            "--set",
            "train.steps=150",
            "--set",
            "seeds=[0,1]",
        ],
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("2 processes share the runs"), "{err}");
    let log = std::fs::read_to_string(root.join("logs/worker-1.log")).expect("worker log");
    let done_here = |text: &str| ablate_tests::runs_done_here(text, 8);
    assert_eq!(
        done_here(&err) + done_here(&log),
        8,
        "{err}\n--- worker:\n{log}"
    );
    assert!(
        !log.contains("# Ablation report"),
        "the worker writes no report"
    );
    assert!(root.join("reports/tiny/report.md").is_file());

    let zero = ablate(root, &["run", "experiments/tiny.toml", "--jobs", "0"]);
    assert_eq!(zero.status.code(), Some(2));
    assert!(
        stderr(&zero).contains("--jobs: expected at least 1"),
        "{}",
        stderr(&zero)
    );
}

/// `ablate bench`: one JSON object per workload with the keys the issue names, positive timings;
/// `--list` names the workloads; unknown workloads and precisions are refused with what is allowed.
#[test]
fn bench_prints_one_json_line_per_workload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = ablate(
        dir.path(),
        &["bench", "--workload", "ar-tiny-ce", "--steps", "1"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 1);
    let b = &lines[0];
    assert_eq!(b["workload"], "ar-tiny-ce");
    assert_eq!(b["device"], "cpu");
    assert_eq!(b["precision"], "f32");
    assert_eq!(b["train_steps_timed"], 1);
    for key in [
        "params",
        "train_step_s",
        "train_images_per_s",
        "sample_images_per_s",
        "peak_rss_bytes",
        "threads",
        "cpus_available",
    ] {
        let v = b[key].as_f64().unwrap_or(-1.0);
        assert!(v > 0.0, "{key} = {} in {b}", b[key]);
    }
    let per_s = b["train_images_per_s"].as_f64().unwrap_or(0.0);
    let step = b["train_step_s"].as_f64().unwrap_or(0.0);
    assert!((per_s * step - 64.0).abs() < 1e-6, "batch 64: {b}");

    let list = ablate(dir.path(), &["bench", "--list"]);
    for name in [
        "mar-tiny",
        "mar-tiny-ce",
        "ar-tiny",
        "ar-tiny-ce",
        "mar-base",
        "fid-10k",
    ] {
        assert!(stdout(&list).contains(name), "{}", stdout(&list));
    }
    let bad = ablate(dir.path(), &["bench", "--workload", "mar-huge"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("unknown workload 'mar-huge'; known: mar-tiny"),
        "{}",
        stderr(&bad)
    );
    let bad = ablate(dir.path(), &["bench", "--precision", "fp16"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("expected one of f32, bf16; found 'fp16'"),
        "{}",
        stderr(&bad)
    );
}

/// Sizes beyond this machine's memory are refused before anything is written (before, an
/// allocation abort after the whole training), naming the key.
#[test]
fn sizes_beyond_the_memory_exit_2_before_anything_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    for set in ["sample.count=10000000000", "data.train=100000000000"] {
        let out = ablate(&root, &["run", "experiments/tiny.toml", "--set", set]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{set}: {err}");
        let key = set.split('=').next().expect("key");
        assert!(
            err.contains(&format!("{key}: ")) && err.contains("GiB available"),
            "{err}"
        );
        assert!(
            !root.join("ablate.sqlite").exists(),
            "{set}: nothing written"
        );
    }
}
