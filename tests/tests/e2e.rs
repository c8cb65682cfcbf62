//! End-to-end: the real CLI on tiny specs, checked against the real database and report files:
//! run, rerun, report, bad specs, FID over training, bf16, and sizes beyond the memory. The other
//! files of this folder test one command or concern each (import, fid, sharing, tools, …).
use ablate_tests::{ablate, stderr, stdout};
use db::Db;
use db::{RunKind, RunStatus};

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
    let generators: Vec<_> = runs
        .iter()
        .filter(|r| r.kind == RunKind::Generator)
        .collect();
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
        assert_eq!(r.status, RunStatus::Finished, "{}: {:?}", r.name, r.error);
        assert!(r.arm.is_some());
        assert_eq!(r.params["name"], "tiny");
        // the built model, recorded beside the spec: its size and tokens per image (8 px / 4)
        assert!(
            r.params["model"]["param_count"].as_u64().unwrap_or(0) > 1000,
            "{}",
            r.params
        );
        assert_eq!(r.params["model"]["seq_len"], 4, "{}", r.params);
        // what reports read: the descriptor recorded with the built model
        let d = r.descriptor().expect("a recorded descriptor");
        assert_eq!(
            d.generator,
            r.params["generator"]["kind"].as_str().expect("kind")
        );
        assert_eq!((d.seq_len, d.train_steps, d.cfg), (4, 6, 1.0));
        assert_eq!(
            Some(d.param_count),
            r.params["model"]["param_count"].as_u64()
        );
        let arm = r.arm.as_deref().expect("arm");
        assert_eq!(d.tokenizer, if arm == "diffusion" { "patch" } else { "vq" });
        assert_eq!(d.sampling_steps.is_some(), arm == "diffusion");
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
    assert_eq!(
        runs.iter().filter(|r| r.kind == RunKind::Tokenizer).count(),
        2
    );
    assert_eq!(
        runs.iter()
            .filter(|r| r.kind == RunKind::Classifier)
            .count(),
        1
    );
    let classifier = runs
        .iter()
        .find(|r| r.kind == RunKind::Classifier)
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
        .filter(|r| r.kind == RunKind::Generator && r.params["sample"]["cfg"] == 2.0)
        .collect();
    assert_eq!(guided.len(), 4);
    for g in &guided {
        assert_eq!(g.status, RunStatus::Finished);
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
        .filter(|r| r.kind == RunKind::Generator)
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
    let generators: Vec<_> = runs
        .iter()
        .filter(|r| r.kind == RunKind::Generator)
        .collect();
    assert_eq!(generators.len(), 4, "2 cells × 2 arms × 1 seed");
    for r in &generators {
        assert_eq!(r.status, RunStatus::Finished, "{}: {:?}", r.name, r.error);
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
