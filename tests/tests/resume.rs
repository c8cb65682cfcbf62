//! A run killed mid-training (SIGKILL) resumes from its last checkpoint and ends with the same
//! weights as an uninterrupted run; no metric point is lost or duplicated.
use db::{RunKind, RunStatus};
use std::time::Duration;

use ablate_tests::{
    ablate, checkpoint_step, kill_at_checkpoint, logged_steps, max_abs_diff, stderr,
};
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

/// The tiny spec with a 300-step VQ autoencoder fit as its cross-entropy tokenizer.
const TOKENIZER_FIT: [&str; 15] = [
    "run",
    "experiments/tiny.toml",
    "--no-report",
    "--set",
    "tokenizers.vq.kind=\"vq\"",
    "--set",
    "tokenizers.vq.steps=300",
    "--set",
    "tokenizers.vq.batch=16",
    "--set",
    "tokenizers.vq.width=8",
    "--set",
    "tokenizers.vq.downsample=4",
    "--set",
    "grid.\"generator.kind\"=[\"ar\"]",
];

/// The final weights a run recorded as its `model` artifact.
fn weights(db: &Db, run_id: i64) -> std::collections::HashMap<String, candle_core::Tensor> {
    let path = db
        .artifacts(run_id)
        .expect("artifacts")
        .into_iter()
        .find(|a| a.kind == "model")
        .map(|a| db.resolve(&a.path))
        .expect("a model artifact");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The largest |Δw| between the final weights of two runs (any tensor missing counts as a failure).
fn weight_difference(a_db: &Db, a: i64, b_db: &Db, b: i64) -> f32 {
    let (a, b) = (weights(a_db, a), weights(b_db, b));
    assert_eq!(a.len(), b.len(), "the same tensors");
    a.iter()
        .map(|(name, ta)| max_abs_diff(ta, &b[name]))
        .fold(0f32, f32::max)
}

/// A resumed run `r` is finished, has the weights of the same run in the clean root (max |Δw|
/// ≤ 1e-6, returned) and its loss logged at every second step up to `steps`, each once.
fn assert_resumed_like_clean(db: &Db, clean_db: &Db, r: &db::RunRow, steps: i64) -> f32 {
    assert_eq!(r.status, RunStatus::Finished, "{}", r.name);
    let clean_run = clean_db
        .run_by_hash(&r.hash)
        .expect("query")
        .expect("same run in the clean root");
    let worst = weight_difference(clean_db, clean_run.id, db, r.id);
    assert!(worst <= 1e-6, "{}: max |Δw| = {worst}", r.name);
    assert_eq!(
        logged_steps(db, r.id, "train/loss"),
        (1..=steps / 2).map(|i| i * 2).collect::<Vec<i64>>(),
        "{}",
        r.name
    );
    worst
}

/// The generator runs of the tiny experiment under a root, in order.
fn generator_runs(db: &Db) -> Vec<db::RunRow> {
    db.list_runs(Some("tiny"))
        .expect("runs")
        .into_iter()
        .filter(|r| r.kind == RunKind::Generator)
        .collect()
}

/// Start `ablate --root ROOT ARGS…`, wait (at most `limit`) until `ready` sees something, send
/// SIGTERM, and return what `ready` saw with the process's output once it has exited.
fn term_when<T>(
    root: &std::path::Path,
    args: &[&str],
    ready: impl Fn() -> Option<T>,
    limit: Duration,
) -> (Option<T>, std::process::Output) {
    let child = ablate_tests::spawn_ablate(root, args);
    let started = std::time::Instant::now();
    let mut seen = None;
    while seen.is_none() && started.elapsed() < limit {
        seen = ready();
        std::thread::sleep(Duration::from_millis(5));
    }
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    (seen, child.wait_with_output().expect("wait"))
}

/// The step of the first run's `checkpoint.json` under `root`, once there is one.
fn first_checkpoint_step(root: &std::path::Path) -> Option<u64> {
    let entry = std::fs::read_dir(root.join("artifacts"))
        .ok()?
        .next()?
        .ok()?;
    checkpoint_step(&entry.path().join("checkpoint.json"))
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
    let probe = || first_checkpoint_step(&killed);
    let killed_at = kill_at_checkpoint(&killed, &args, probe, Duration::from_secs(120));
    assert!(
        killed_at < 300,
        "killed after training had finished (step {killed_at})"
    );

    let db = Db::open_existing(&killed.join("ablate.sqlite")).expect("db");
    let clean_db = Db::open_existing(&clean.join("ablate.sqlite")).expect("clean db");
    let first = &generator_runs(&db)[0];
    assert_eq!(
        first.status,
        RunStatus::Running,
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
        .filter(|r| r.kind == RunKind::Generator)
        .collect();
    assert_eq!(runs.len(), 2);
    for r in &runs {
        let worst = assert_resumed_like_clean(&db, &clean_db, r, 300);
        eprintln!(
            "{}: killed at step {killed_at}, max |Δw| after resume = {worst:e}",
            r.name
        );
    }
}

/// The checkpoint folder (`HASH.ckpt`) of a tokenizer fit under `root`, once there is one.
fn tokenizer_checkpoints(root: &std::path::Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(root.join("cache/tokenizers"))
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".ckpt"))
        .map(|e| e.path())
}

/// The stored tokenizer of run hash `hash` under `root`.
fn tokenizer_file(root: &std::path::Path, hash: &str) -> std::path::PathBuf {
    root.join("cache/tokenizers")
        .join(format!("{hash}.safetensors"))
}

/// The tiny experiment's `vq` tokenizer run.
fn vq_tokenizer_run(db: &Db) -> db::RunRow {
    db.list_runs(Some("tiny"))
        .expect("runs")
        .into_iter()
        .find(|r| r.kind == RunKind::Tokenizer && r.name.contains("vq"))
        .expect("the vq tokenizer run")
}

/// An autoencoder tokenizer fit killed after a checkpoint continues from it on the next run and
/// ends with the same tokenizer as a fit that ran through; its curve has each step once.
#[test]
fn killed_tokenizer_fit_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clean = dir.path().join("clean");
    let killed = dir.path().join("killed");
    let args = TOKENIZER_FIT;
    let out = ablate(&clean, &args);
    assert!(out.status.success(), "{}", stderr(&out));

    let probe = || checkpoint_step(&tokenizer_checkpoints(&killed)?.join("checkpoint.json"));
    let killed_at = kill_at_checkpoint(&killed, &args, probe, Duration::from_secs(300));

    let out = ablate(&killed, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    // the checkpoint it resumed from: the one seen, or a later one written before the kill landed
    let resumed_at: u64 = err
        .split("resuming from its checkpoint at step ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resume message:\n{err}"));
    assert!(
        killed_at <= resumed_at && resumed_at < 300,
        "{killed_at} → {resumed_at}"
    );

    let db = Db::open_existing(&killed.join("ablate.sqlite")).expect("db");
    let clean_db = Db::open_existing(&clean.join("ablate.sqlite")).expect("clean db");
    let tokenizer = vq_tokenizer_run(&db);
    assert_eq!(tokenizer.status, RunStatus::Finished);
    let steps = logged_steps(&db, tokenizer.id, "train/loss");
    assert_eq!(steps, (1..=12).map(|i| i * 25).collect::<Vec<i64>>());
    // the same file, bit for bit in its tensors, as the uninterrupted fit
    let file = |root: &std::path::Path| tokenizer_file(root, &tokenizer.hash);
    let a = candle_core::safetensors::load(file(&clean), &Device::Cpu).expect("clean tokenizer");
    let b = candle_core::safetensors::load(file(&killed), &Device::Cpu).expect("resumed tokenizer");
    assert_eq!(a.len(), b.len());
    for (name, ta) in &a {
        assert_eq!(max_abs_diff(ta, &b[name]), 0.0, "{name}");
    }
    let clean_tok = clean_db
        .run_by_hash(&tokenizer.hash)
        .expect("query")
        .expect("same tokenizer run in the clean root");
    assert_eq!(clean_tok.status, RunStatus::Finished);
    eprintln!("tokenizer fit killed after its step-{killed_at} checkpoint; resumed bit-identical");
    // the checkpoints are gone once the tokenizer is saved
    assert!(!file(&killed).with_extension("ckpt").exists());
}

/// A tokenizer fit killed after a checkpoint whose latest checkpoint is then truncated: the
/// rerun names the damaged file, goes back to the previous checkpoint (or to step 0), records
/// that on the tokenizer's run, says "resuming" only for a checkpoint it verified, and ends
/// with the uninterrupted fit's tokenizer.
#[test]
fn a_damaged_tokenizer_checkpoint_is_passed_over_and_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clean = dir.path().join("clean");
    let killed = dir.path().join("killed");
    let args = TOKENIZER_FIT;
    let out = ablate(&clean, &args);
    assert!(out.status.success(), "{}", stderr(&out));

    let probe = || checkpoint_step(&tokenizer_checkpoints(&killed)?.join("checkpoint.json"));
    kill_at_checkpoint(&killed, &args, probe, Duration::from_secs(300));
    let ckpt = tokenizer_checkpoints(&killed).expect("the fit's checkpoint folder");
    let latest = checkpoint_step(&ckpt.join("checkpoint.json")).expect("latest step");
    let weights = ckpt.join(format!("checkpoint-{latest:08}.safetensors"));
    let size = std::fs::metadata(&weights).expect("weights").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .and_then(|f| f.set_len(size / 2))
        .expect("truncate");

    let out = ablate(&killed, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("checkpoint-{latest:08}.safetensors is damaged")),
        "{err}"
    );
    assert!(
        !err.contains(&format!("resuming from its checkpoint at step {latest}")),
        "{err}"
    );
    let db = Db::open_existing(&killed.join("ablate.sqlite")).expect("db");
    let tokenizer = vq_tokenizer_run(&db);
    assert_eq!(tokenizer.status, RunStatus::Finished);
    let note = tokenizer.params["checkpoint_recovered"]
        .as_str()
        .unwrap_or_else(|| panic!("not recorded: {}", tokenizer.params));
    assert!(note.contains(&format!("checkpoint-{latest:08}")), "{note}");
    let file = |root: &std::path::Path| tokenizer_file(root, &tokenizer.hash);
    let a = candle_core::safetensors::load(file(&clean), &Device::Cpu).expect("clean tokenizer");
    let b =
        candle_core::safetensors::load(file(&killed), &Device::Cpu).expect("refitted tokenizer");
    for (name, ta) in &a {
        assert_eq!(max_abs_diff(ta, &b[name]), 0.0, "{name}");
    }
    eprintln!("step-{latest} checkpoint truncated: {note}");
}

/// SIGTERM (what Slurm and Kubernetes send) mid-training: the run checkpoints where it is, is
/// marked interrupted, the process exits 143, and the next `ablate run` resumes it to the same
/// weights and the same logged averages as a run that was never stopped.
#[test]
fn sigterm_checkpoints_marks_interrupted_and_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clean = dir.path().join("clean");
    let stopped = dir.path().join("stopped");
    let mut args = vec!["run", "experiments/tiny.toml", "--no-report"];
    args.extend(ARGS);
    let out = ablate(&clean, &args);
    assert!(out.status.success(), "{}", stderr(&out));

    let probe = || first_checkpoint_step(&stopped);
    let (seen, out) = term_when(&stopped, &args, probe, Duration::from_secs(120));
    let seen = seen.expect("a first checkpoint");
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(143),
        "exit code 128 + SIGTERM:\n{err}"
    );
    assert!(err.contains("SIGTERM"), "{err}");
    let at = probe().expect("the stop's checkpoint");
    assert!(
        seen <= at && at < 300,
        "checkpointed at {at} (first seen {seen})"
    );

    let db = Db::open_existing(&stopped.join("ablate.sqlite")).expect("db");
    let first = &generator_runs(&db)[0];
    assert_eq!(
        first.status,
        RunStatus::Interrupted,
        "marked by the stopping process"
    );

    let out = ablate(&stopped, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let clean_db = Db::open_existing(&clean.join("ablate.sqlite")).expect("clean db");
    for r in db
        .list_runs(Some("tiny"))
        .expect("runs")
        .into_iter()
        .filter(|r| r.kind == RunKind::Generator)
    {
        assert_eq!(r.status, RunStatus::Finished);
        let clean_run = clean_db
            .run_by_hash(&r.hash)
            .expect("query")
            .expect("same run in the clean root");
        let worst = weight_difference(&clean_db, clean_run.id, &db, r.id);
        assert!(worst <= 1e-6, "{}: max |Δw| = {worst}", r.name);
        let losses = |d: &Db, id: i64| {
            d.metrics(id, Some("train/loss"))
                .expect("metrics")
                .into_iter()
                .map(|m| (m.step, m.value))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            losses(&db, r.id),
            losses(&clean_db, clean_run.id),
            "{}: the same logged averages, each step once",
            r.name
        );
    }
}

/// SIGTERM during an autoencoder tokenizer fit: it checkpoints where it is, ablate exits 143, and
/// the next run finishes the fit to the same tokenizer and the same curve as an unstopped fit.
#[test]
fn sigterm_during_a_tokenizer_fit_resumes_to_the_same_tokenizer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (clean, stopped) = (dir.path().join("clean"), dir.path().join("stopped"));
    let args = TOKENIZER_FIT;
    let out = ablate(&clean, &args);
    assert!(out.status.success(), "{}", stderr(&out));

    let tokenizers = stopped.join("cache/tokenizers");
    // the fit has started once its checkpoint folder exists
    let fitting = || {
        let d = std::fs::read_dir(&tokenizers).ok()?;
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".ckpt"))
            .then_some(())
    };
    let (_, out) = term_when(&stopped, &args, fitting, Duration::from_secs(300));
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));

    let db = Db::open_existing(&stopped.join("ablate.sqlite")).expect("db");
    let clean_db = Db::open_existing(&clean.join("ablate.sqlite")).expect("clean db");
    let tokenizer = |d: &Db| {
        d.list_runs(Some("tiny"))
            .expect("runs")
            .into_iter()
            .find(|r| r.kind == RunKind::Tokenizer && r.name.contains("vq"))
            .expect("the vq tokenizer run")
    };
    assert_ne!(
        tokenizer(&db).status,
        RunStatus::Finished,
        "stopped in the middle of the fit"
    );
    let out = ablate(&stopped, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let (a, b) = (tokenizer(&clean_db), tokenizer(&db));
    assert_eq!(a.hash, b.hash);
    let file =
        |root: &std::path::Path| root.join(format!("cache/tokenizers/{}.safetensors", a.hash));
    let ta = candle_core::safetensors::load(file(&clean), &Device::Cpu).expect("clean tokenizer");
    let tb = candle_core::safetensors::load(file(&stopped), &Device::Cpu).expect("resumed");
    for (name, t) in &ta {
        assert_eq!(max_abs_diff(t, &tb[name]), 0.0, "{name}");
    }
    let curve = |d: &Db, id: i64| {
        d.metrics(id, Some("train/loss"))
            .expect("metrics")
            .into_iter()
            .map(|m| (m.step, m.value))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        curve(&db, b.id),
        curve(&clean_db, a.id),
        "the same curve, each step once"
    );
}

/// SIGTERM to the parent of `ablate run --jobs 2` alone (as a scheduler may send it) reaches its
/// worker too: when the parent exits (143), no run is left `running`, and a rerun finishes them.
#[test]
fn sigterm_to_a_jobs_parent_stops_its_workers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let args = [
        "run",
        "experiments/tiny.toml",
        "--no-report",
        "--jobs",
        "2",
        "--set",
        // long enough that both processes are in the middle of a run when the signal lands
        "train.steps=1500",
        "--set",
        "train.checkpoint_every=20",
        "--set",
        "sample.count=10",
    ];
    let probe = || first_checkpoint_step(&root);
    let (_, out) = term_when(&root, &args, probe, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));

    let db = Db::open_existing(&root.join("ablate.sqlite")).expect("db");
    let running: Vec<_> = generator_runs(&db)
        .into_iter()
        .filter(|r| r.status == RunStatus::Running)
        .map(|r| r.name)
        .collect();
    assert!(running.is_empty(), "left running: {running:?}");
    assert!(
        generator_runs(&db)
            .iter()
            .any(|r| r.status == RunStatus::Interrupted),
        "the stopped runs are marked"
    );
    let out = ablate(&root, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(generator_runs(&db)
        .iter()
        .all(|r| r.status == RunStatus::Finished));
}

/// A cached tokenizer or feature net whose bytes changed after it was written (a bad disk, a
/// truncated copy) is not loaded: the rerun names it, fits it again and finishes.
#[test]
fn damaged_cached_tokenizer_and_feature_net_are_fitted_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let base = ["run", "experiments/tiny.toml", "--no-report", "--set"];
    let first = ablate(root, &[&base[..], &["sample.count=10"]].concat());
    assert!(first.status.success(), "{}", stderr(&first));
    let files = |sub: &str| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(root.join(sub))
            .expect("cache folder")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.is_file())
            .collect()
    };
    let cached: Vec<_> = files("cache/tokenizers")
        .into_iter()
        .chain(files("cache/classifiers"))
        .collect();
    assert!(cached.len() >= 2, "{cached:?}");
    for f in &cached {
        let mut bytes = std::fs::read(f).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        std::fs::write(f, bytes).expect("damage");
    }
    // new generator runs (another sample count is another run) that need both caches again
    let second = ablate(root, &[&base[..], &["sample.count=12"]].concat());
    let err = stderr(&second);
    assert!(second.status.success(), "{err}");
    assert!(
        err.contains("cached tokenizer") && err.contains("is damaged"),
        "{err}"
    );
    assert!(
        err.contains("cached feature net") && err.contains("is damaged"),
        "{err}"
    );
    assert!(err.contains("finished (0 earlier), 0 failed"), "{err}");
}

/// A `--jobs` parent killed outright (SIGKILL: no chance to stop its workers) leaves its worker
/// to finish every run, the parent's interrupted one included, and to write the report that the
/// parent would have written.
#[test]
fn a_worker_writes_the_report_when_its_parent_was_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let args = [
        "run",
        "experiments/tiny.toml",
        "--jobs",
        "2",
        "--set",
        "train.steps=400",
        "--set",
        "train.checkpoint_every=20",
        "--set",
        "sample.count=10",
    ];
    let mut parent = ablate_tests::spawn_ablate(&root, &args);
    let started = std::time::Instant::now();
    while first_checkpoint_step(&root).is_none() && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    parent.kill().expect("SIGKILL the parent");
    parent.wait().expect("reap the parent");
    // the worker carries on alone: wait for the report it writes
    let report = root.join("reports/tiny/report.md");
    let started = std::time::Instant::now();
    while !report.exists() && started.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(root.join("logs/worker-1.log")).unwrap_or_default();
    assert!(report.exists(), "no report; the worker's log:\n{log}");
    assert!(log.contains("is gone: writing the report"), "{log}");
    let db = Db::open_existing(&root.join("ablate.sqlite")).expect("db");
    let runs = generator_runs(&db);
    assert!(
        runs.iter().all(|r| r.status == RunStatus::Finished),
        "{:?}",
        runs.iter()
            .map(|r| (&r.name, &r.status))
            .collect::<Vec<_>>()
    );
}

/// The checkpoint step of every run folder under `root`, by folder: it changes whenever any
/// run writes a checkpoint.
fn checkpoint_steps(root: &std::path::Path) -> Vec<(std::path::PathBuf, Option<u64>)> {
    let mut steps: Vec<_> = std::fs::read_dir(root.join("artifacts"))
        .map(|dir| {
            dir.filter_map(|e| {
                let path = e.ok()?.path();
                let step = checkpoint_step(&path.join("checkpoint.json"));
                Some((path, step))
            })
            .collect()
        })
        .unwrap_or_default();
    steps.sort();
    steps
}

/// SIGKILL at 20 points (each a moment after a new checkpoint appears, plus a delay that varies
/// from kill to kill, so kills land mid-step, mid-write and mid-sampling too), a rerun after each:
/// the runs end with the weights of an uninterrupted run and every logged step exactly once.
#[test]
fn killed_at_twenty_points_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clean = dir.path().join("clean");
    let killed = dir.path().join("killed");
    // long enough for 20 kills: 75 checkpoints per run
    let args = [
        "run",
        "experiments/tiny.toml",
        "--no-report",
        "--set",
        "train.steps=1500",
        "--set",
        "train.checkpoint_every=20",
        "--set",
        "grid.\"generator.kind\"=[\"ar\"]",
        "--set",
        "sample.count=10",
    ];
    let out = ablate(&clean, &args);
    assert!(out.status.success(), "{}", stderr(&out));

    let mut kills = 0;
    for k in 0..40u64 {
        if kills == 20 {
            break;
        }
        let before = checkpoint_steps(&killed);
        let mut child = ablate_tests::spawn_ablate(&killed, &args);
        let started = std::time::Instant::now();
        let mut finished = false;
        loop {
            if child.try_wait().expect("poll").is_some() {
                finished = true;
                break;
            }
            if checkpoint_steps(&killed) != before || started.elapsed() > Duration::from_secs(120) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if finished {
            break;
        }
        std::thread::sleep(Duration::from_millis((k * 7) % 30));
        if child.try_wait().expect("poll").is_none() {
            child.kill().expect("SIGKILL");
            kills += 1;
        }
        let _ = child.wait();
    }
    let out = ablate(&killed, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        kills >= 20,
        "only {kills} kills landed before the runs finished"
    );

    let db = Db::open_existing(&killed.join("ablate.sqlite")).expect("db");
    let clean_db = Db::open_existing(&clean.join("ablate.sqlite")).expect("clean db");
    for r in generator_runs(&db) {
        let worst = assert_resumed_like_clean(&db, &clean_db, &r, 1500);
        eprintln!(
            "{}: {kills} kills, max |Δw| after resume = {worst:e}",
            r.name
        );
    }
}

/// The last line a killed process printed: where the kill landed.
fn last_line(out: &std::process::Output) -> String {
    let text = format!("{}{}", ablate_tests::stdout(out), stderr(out));
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(nothing printed yet)")
        .trim()
        .to_string()
}

/// SIGKILL at 20 moments spread over a whole `ablate run` of both generators (feature net,
/// tokenizer fits, training, sampling, evaluation, the report), rerunning the same command
/// after each: the end is the uninterrupted run's. Every run finishes with the clean
/// run's weights and each loss point logged once, the evaluations are the clean run's, the
/// database passes SQLite's integrity check and the report is written.
#[test]
fn killed_at_twenty_moments_across_the_stages_ends_like_an_uninterrupted_run() {
    const KILLS: usize = 20;
    const STEPS: i64 = 600;
    let dir = tempfile::tempdir().expect("tempdir");
    let clean = dir.path().join("clean");
    let killed = dir.path().join("killed");
    let args = [
        "run",
        "experiments/tiny.toml",
        "--set",
        "train.steps=600",
        "--set",
        "train.checkpoint_every=20",
        "--set",
        "sample.count=10",
    ];
    let out = ablate(&clean, &args);
    assert!(out.status.success(), "{}", stderr(&out));

    // kill after 60–1380 ms, the delays in a shuffled order; each rerun resumes where the last
    // one stopped, so the kills move through the stages. Once a rerun has finished by itself
    // (all runs done: it only plans and writes the report), the delays fall within its length.
    let mut landed: Vec<(u64, String)> = Vec::new();
    let mut whole_rerun_ms: Option<u64> = None;
    let mut attempts = 0u64;
    while landed.len() < KILLS {
        attempts += 1;
        assert!(attempts < 200, "only {} kills landed", landed.len());
        let mut delay = 60 + 120 * ((attempts * 5) % 12);
        if let Some(whole) = whole_rerun_ms {
            delay = 5 + delay % whole.max(1);
        }
        let mut child = ablate_tests::spawn_ablate(&killed, &args);
        let started = std::time::Instant::now();
        let mut alive = true;
        while alive && started.elapsed() < Duration::from_millis(delay) {
            alive = child.try_wait().expect("try_wait").is_none();
            std::thread::sleep(Duration::from_millis(2));
        }
        if alive {
            child.kill().expect("SIGKILL");
        }
        let out = child.wait_with_output().expect("wait");
        if alive {
            landed.push((delay, last_line(&out)));
        } else {
            assert!(out.status.success(), "{}", stderr(&out));
            if stderr(&out).contains("4 finished (4 earlier)") {
                whole_rerun_ms = Some(started.elapsed().as_millis() as u64);
            }
        }
    }
    let out = ablate(&killed, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    for (i, (delay, at)) in landed.iter().enumerate() {
        eprintln!("kill {:2} after {delay:3} ms, last line: {at}", i + 1);
    }

    let db = Db::open_existing(&killed.join("ablate.sqlite")).expect("db");
    let clean_db = Db::open_existing(&clean.join("ablate.sqlite")).expect("clean db");
    assert_eq!(
        db.integrity_check().expect("integrity"),
        Vec::<String>::new()
    );
    let runs = db.list_runs(Some("tiny")).expect("runs");
    assert!(
        runs.iter().all(|r| r.status == RunStatus::Finished),
        "{runs:?}"
    );
    let generators = generator_runs(&db);
    assert_eq!(generators.len(), 4);
    for r in &generators {
        let worst = assert_resumed_like_clean(&db, &clean_db, r, STEPS);
        let clean_run = clean_db.run_by_hash(&r.hash).expect("query").expect("run");
        let evals = |db: &Db, id| -> Vec<(i64, String, String, String, f64)> {
            db.evals_for_run(id)
                .expect("evals")
                .into_iter()
                .map(|e| (e.step, e.metric, e.feature_net, e.settings, e.value))
                .collect()
        };
        assert_eq!(
            evals(&db, r.id),
            evals(&clean_db, clean_run.id),
            "{}",
            r.name
        );
        eprintln!("{}: max |Δw| = {worst:e}, evals equal", r.name);
    }
    assert!(killed.join("reports/tiny/report.md").exists());
}
