//! Data parallelism on the CPU (`train.devices`, ranks as threads of one process): 2 and 4 ranks
//! sharing each batch train the same weights (within 1e-5 after 20 steps) and log the same
//! metrics as one rank on the whole batch, up to float rounding (their gradients are summed in
//! another order).
use db::RunKind;
use std::collections::BTreeMap;
use std::path::Path;

use ablate_tests::{ablate, max_abs_diff, stderr};
use db::Db;

/// Every generator run's (final weights, metric rows), by run hash.
type Trained = BTreeMap<
    String,
    (
        BTreeMap<String, candle_core::Tensor>,
        Vec<(String, i64, f64)>,
    ),
>;

fn train(root: &Path, devices: Option<&str>) -> Trained {
    let mut args = vec![
        "run",
        "experiments/tiny.toml",
        "--set",
        "train.steps=20",
        "--set",
        "train.log_every=1",
        "--set",
        "head.batch_mul=2",
        "--no-report",
    ];
    let set;
    if let Some(d) = devices {
        set = format!("train.devices={d}");
        args.extend(["--set", &set]);
    }
    let out = ablate(root, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let db = Db::open_existing(&root.join("ablate.sqlite")).expect("database");
    let mut trained = Trained::new();
    for run in db.list_runs(Some("tiny")).expect("runs") {
        if run.kind != RunKind::Generator {
            continue;
        }
        let model = db
            .artifacts(run.id)
            .expect("artifacts")
            .into_iter()
            .find(|a| a.kind == "model")
            .expect("a model artifact");
        let weights: BTreeMap<String, candle_core::Tensor> =
            candle_core::safetensors::load(db.resolve(&model.path), &candle_core::Device::Cpu)
                .expect("weights")
                .into_iter()
                .collect();
        let metrics = db
            .metrics(run.id, None)
            .expect("metrics")
            .into_iter()
            .map(|m| (m.key, m.step, m.value))
            .collect();
        if let Some(d) = devices {
            let world = d.matches("cpu").count();
            assert_eq!(
                run.params["data_parallel"]["world_size"], world,
                "the world size is recorded on the run"
            );
        }
        trained.insert(run.hash.clone(), (weights, metrics));
    }
    assert_eq!(trained.len(), 4, "AR and MAR, both arms");
    trained
}

#[test]
fn two_and_four_ranks_train_what_one_rank_trains() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = train(&dir.path().join("one"), None);
    for (world, devices) in [(2, r#"["cpu","cpu"]"#), (4, r#"["cpu","cpu","cpu","cpu"]"#)] {
        let many = train(&dir.path().join(format!("ranks-{world}")), Some(devices));
        assert_eq!(
            many.keys().collect::<Vec<_>>(),
            one.keys().collect::<Vec<_>>(),
            "the same run identities: the ranks are not part of them"
        );
        let (mut worst_weight, mut worst_metric) = (0f32, 0f64);
        for (hash, (weights, metrics)) in &one {
            let (w, m) = &many[hash];
            let mut worst = 0f32;
            for (name, t) in weights {
                let (t, other) = match name.ends_with("attn.qkv.bias") {
                    // the key bias moves no output (softmax ignores a constant added to all of a
                    // row's scores), so its gradient is 0 up to rounding, and AdamW, which
                    // divides by the gradient's scale, turns that rounding into steps of up to
                    // lr: it follows the summation order. The query and value biases are checked.
                    true => {
                        let third = t.dim(0).expect("bias") / 3;
                        let skip_key = |b: &candle_core::Tensor| {
                            candle_core::Tensor::cat(
                                &[
                                    b.narrow(0, 0, third).expect("q"),
                                    b.narrow(0, 2 * third, third).expect("v"),
                                ],
                                0,
                            )
                            .expect("q and v")
                        };
                        (skip_key(t), skip_key(&w[name]))
                    }
                    false => (t.clone(), w[name].clone()),
                };
                worst = worst.max(max_abs_diff(&t, &other));
            }
            assert!(
                worst <= 1e-5,
                "{world} ranks, run {hash}: weights differ by {worst}"
            );
            worst_weight = worst_weight.max(worst);
            let rows = |m: &Vec<(String, i64, f64)>| {
                m.iter()
                    .map(|(k, s, _)| (k.clone(), *s))
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                rows(m),
                rows(metrics),
                "{world} ranks, run {hash}: the same metric rows"
            );
            // the training log; time/* are wall-clock durations
            let logged = metrics
                .iter()
                .zip(m)
                .filter(|((k, _, _), _)| k.starts_with("train/"));
            for ((k, s, a), (_, _, b)) in logged {
                worst_metric = worst_metric.max((a - b).abs());
                assert!(
                    (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                    "{world} ranks, run {hash}: {k} at step {s} is {b}, one rank logged {a}"
                );
            }
        }
        eprintln!(
            "{world} ranks: weights within {worst_weight:.2e} and train/* metrics within \
             {worst_metric:.2e} of one rank's"
        );
    }

    // ranks that do not divide the batch are refused before anything runs
    let bad = ablate(
        &dir.path().join("bad"),
        &[
            "run",
            "experiments/tiny.toml",
            "--set",
            r#"train.devices=["cpu","cpu","cpu"]"#,
        ],
    );
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("train.devices") && stderr(&bad).contains("must divide"),
        "{}",
        stderr(&bad)
    );
}

/// A run trained on 2 ranks and killed after a checkpoint resumes on 4 ranks (the world size is
/// not part of its identity, and every world size that divides the batch reads the same global
/// batch), and ends where one rank ends: the weights within 1e-5, each step's metrics logged
/// once, with the world size of its last process recorded.
#[test]
fn a_run_killed_on_two_ranks_resumes_on_four() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = |devices: Option<&'static str>| {
        let mut a = vec![
            "run",
            "experiments/tiny.toml",
            "--no-report",
            "--set",
            "train.steps=100",
            "--set",
            "train.checkpoint_every=10",
            "--set",
            "train.log_every=2",
            "--set",
            "grid.\"generator.kind\"=[\"ar\"]",
        ];
        if let Some(d) = devices {
            a.extend(["--set", d]);
        }
        a
    };
    let clean = dir.path().join("one");
    let out = ablate(&clean, &args(None));
    assert!(out.status.success(), "{}", stderr(&out));

    let moved = dir.path().join("moved");
    let probe = || {
        let run = std::fs::read_dir(moved.join("artifacts"))
            .ok()?
            .next()?
            .ok()?;
        ablate_tests::checkpoint_step(&run.path().join("checkpoint.json"))
    };
    let killed_at = ablate_tests::kill_at_checkpoint(
        &moved,
        &args(Some(r#"train.devices=["cpu","cpu"]"#)),
        probe,
        std::time::Duration::from_secs(120),
    );
    assert!(killed_at < 100, "killed after training had finished");
    let out = ablate(
        &moved,
        &args(Some(r#"train.devices=["cpu","cpu","cpu","cpu"]"#)),
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let (one, four) = (
        Db::open_existing(&clean.join("ablate.sqlite")).expect("db"),
        Db::open_existing(&moved.join("ablate.sqlite")).expect("db"),
    );
    let runs = four.list_runs(Some("tiny")).expect("runs");
    let generators: Vec<_> = runs
        .iter()
        .filter(|r| r.kind == RunKind::Generator)
        .collect();
    assert_eq!(generators.len(), 2);
    for run in generators {
        let reference = one
            .run_by_hash(&run.hash)
            .expect("query")
            .expect("the same run on one rank");
        let weights = |db: &Db, id: i64| -> BTreeMap<String, candle_core::Tensor> {
            let model = db
                .artifacts(id)
                .expect("artifacts")
                .into_iter()
                .find(|a| a.kind == "model")
                .expect("a model artifact");
            candle_core::safetensors::load(db.resolve(&model.path), &candle_core::Device::Cpu)
                .expect("weights")
                .into_iter()
                .collect()
        };
        let (a, b) = (weights(&one, reference.id), weights(&four, run.id));
        let worst = a
            .iter()
            .filter(|(name, _)| !name.ends_with("attn.qkv.bias"))
            .map(|(name, t)| max_abs_diff(t, &b[name]))
            .fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{}: weights differ by {worst}", run.name);
        let loss = |db: &Db, id: i64| -> Vec<(i64, f64)> {
            db.metrics(id, Some("train/loss"))
                .expect("metrics")
                .into_iter()
                .map(|m| (m.step, m.value))
                .collect()
        };
        let (la, lb) = (loss(&one, reference.id), loss(&four, run.id));
        assert_eq!(
            la.iter().map(|p| p.0).collect::<Vec<_>>(),
            lb.iter().map(|p| p.0).collect::<Vec<_>>(),
            "{}: each step logged once",
            run.name
        );
        for ((s, x), (_, y)) in la.iter().zip(&lb) {
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                "step {s}: {y} vs {x}"
            );
        }
        assert_eq!(run.params["data_parallel"]["world_size"], 4);
        eprintln!(
            "{}: killed on 2 ranks after step {killed_at}, resumed on 4: max |Δw| {worst:.2e}",
            run.name
        );
    }
}
