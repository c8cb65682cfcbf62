//! Several `ablate run` processes on one spec (by hand, and with `--jobs`): each run done once.
use ablate_tests::{ablate, stderr, stdout};
use db::Db;
use db::RunStatus;

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
    let generators = ablate_tests::generator_runs(&db, "tiny");
    assert_eq!(generators.len(), 8);
    for r in &runs {
        assert_eq!(r.status, RunStatus::Finished, "{}: {:?}", r.name, r.error);
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
