//! A run killed mid-training (SIGKILL) resumes from its last checkpoint and ends with the same
//! weights as an uninterrupted run; no metric point is lost or duplicated.
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ablate_tests::{ablate, ablate_bin, stderr, workspace_root};
use candle_core::Device;
use db::Db;

const ARGS: [&str; 8] = [
    "--set",
    "train.steps=300",
    "--set",
    "train.checkpoint_every=20",
    "--set",
    "grid.\"generator.kind\"=[\"ar\"]",
    "--set",
    "sample.count=10",
];

/// The final weights a run recorded as its `model` artifact.
fn weights(db: &Db, run_id: i64) -> std::collections::HashMap<String, candle_core::Tensor> {
    let path = db
        .artifacts(run_id)
        .expect("artifacts")
        .into_iter()
        .find(|a| a.kind == "model")
        .map(|a| std::path::PathBuf::from(a.path))
        .expect("a model artifact");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn killed_run_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clean = dir.path().join("clean");
    let killed = dir.path().join("killed");

    let mut args = vec!["run", "experiments/tiny.toml", "--no-report"];
    args.extend(ARGS);
    let out = ablate(&clean, &args);
    assert!(out.status.success(), "{}", stderr(&out));

    // start the same run and kill it once a checkpoint exists but training is not done
    let mut child = Command::new(ablate_bin())
        .current_dir(workspace_root())
        .arg("--root")
        .arg(&killed)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ablate");
    let started = Instant::now();
    let checkpoint_step = || -> Option<u64> {
        let entry = std::fs::read_dir(killed.join("artifacts"))
            .ok()?
            .next()?
            .ok()?;
        let text = std::fs::read_to_string(entry.path().join("checkpoint.json")).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()?["step"].as_u64()
    };
    let mut seen = None;
    while seen.is_none() && started.elapsed() < Duration::from_secs(120) {
        seen = checkpoint_step();
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    let killed_at = seen.expect("a checkpoint appeared within 120 s");
    assert!(
        killed_at < 300,
        "killed after training had finished (step {killed_at})"
    );

    let db = Db::open_existing(&killed.join("ablate.sqlite")).expect("db");
    let clean_db = Db::open_existing(&clean.join("ablate.sqlite")).expect("clean db");
    let first = db
        .list_runs(Some("tiny"))
        .expect("runs")
        .into_iter()
        .find(|r| r.kind == "generator")
        .expect("run");
    assert_eq!(
        first.status, "running",
        "the killed run is left running until reaped"
    );

    let out = ablate(&killed, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("marked interrupted"), "{err}");

    let runs: Vec<_> = db
        .list_runs(Some("tiny"))
        .expect("runs")
        .into_iter()
        .filter(|r| r.kind == "generator")
        .collect();
    assert_eq!(runs.len(), 2);
    for r in &runs {
        assert_eq!(r.status, "finished");
        let clean_run = clean_db
            .run_by_hash(&r.hash)
            .expect("query")
            .expect("same run in the clean root");
        let a = weights(&clean_db, clean_run.id);
        let b = weights(&db, r.id);
        assert_eq!(a.len(), b.len());
        let mut worst = 0f32;
        for (name, ta) in &a {
            let tb = &b[name];
            let d = (ta - tb)
                .and_then(|d| d.abs())
                .and_then(|d| d.max_all())
                .and_then(|d| d.to_scalar::<f32>())
                .expect("diff");
            worst = worst.max(d);
        }
        assert!(worst <= 1e-6, "{}: max |Δw| = {worst}", r.name);
        eprintln!(
            "{}: killed at step {killed_at}, max |Δw| after resume = {worst:e}",
            r.name
        );
        // every logged step exactly once
        let steps: Vec<i64> = db
            .metrics(r.id, Some("train/loss"))
            .expect("metrics")
            .into_iter()
            .map(|m| m.step)
            .collect();
        assert_eq!(
            steps,
            (1..=150).map(|i| i * 2).collect::<Vec<i64>>(),
            "{}",
            r.name
        );
    }
}
