//! End-to-end: the real CLI on tiny specs, checked against the real database and report files.
use ablate_tests::{ablate, stderr, stdout};
use db::Db;

#[test]
fn tiny_spec_runs_end_to_end_and_reruns_in_no_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let out = ablate(root, &["run", "experiments/tiny.toml"]);
    assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("| AR | raster | causal | 1 |"),
        "table printed:\n{text}"
    );
    assert!(text.contains("database: "), "{text}");

    let db = Db::open_existing(&root.join("ablate.sqlite")).expect("database exists");
    let runs = db.list_runs(Some("tiny")).expect("runs");
    let generators: Vec<_> = runs.iter().filter(|r| r.kind == "generator").collect();
    assert_eq!(generators.len(), 4, "2 cells × 2 arms × 1 seed");
    for r in &generators {
        assert_eq!(r.status, "finished", "{}: {:?}", r.name, r.error);
        assert!(r.arm.is_some());
        assert_eq!(r.params["name"], "tiny");
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
    assert!(
        stdout(&pin).contains("16 entries pinned"),
        "{}",
        stdout(&pin)
    );
    let junit = root.join("junit/check.xml");
    let junit_arg = junit.to_str().expect("utf-8");
    let ok = ablate(
        root,
        &["check", "tiny", "--baseline", "main", "--junit", junit_arg],
    );
    assert_eq!(ok.status.code(), Some(0), "{}{}", stdout(&ok), stderr(&ok));
    assert!(stdout(&ok).contains("0 failing: ok"), "{}", stdout(&ok));
    let xml = std::fs::read_to_string(&junit).expect("junit");
    assert!(xml.contains("tests=\"16\" failures=\"0\""), "{xml}");
    let fid = db
        .evals_for_run(ar_ce.id)
        .expect("evals")
        .into_iter()
        .find(|e| e.metric == "fid")
        .expect("fid");
    let settings: serde_json::Value = serde_json::from_str(&fid.settings).expect("json");
    db.insert_eval(&db::NewEval {
        run_id: ar_ce.id,
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
    let out = ablate(
        root,
        &[
            "fid",
            &a_s,
            &a_s,
            "--weights",
            &missing.display().to_string(),
        ],
    );
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
    let out = ablate(
        root,
        &[
            "fid",
            &a_s,
            &a_s,
            "--weights",
            &shaped.display().to_string(),
        ],
    );
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
