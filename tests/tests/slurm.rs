//! `ablate slurm`: the array script runs as two local tasks (SLURM_ARRAY_TASK_ID 0 and 1, side by
//! side, as Slurm would start them), every run is done exactly once, and the report job writes
//! the report. No Slurm daemon runs here (see the session note); the scripts are plain bash.
use ablate_tests::{ablate, runs_done_here, stderr, stdout, workspace_root};
use db::{RunKind, RunStatus};

#[test]
fn the_array_script_runs_as_two_local_tasks_then_the_report_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let out = ablate(
        &root,
        &[
            "slurm",
            "experiments/tiny.toml",
            "--tasks",
            "2",
            "--time",
            "00:10:00",
            "--set",
            "train.steps=60",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let script = |what: &str| -> std::path::PathBuf {
        let line = text
            .lines()
            .find(|l| l.starts_with(what))
            .unwrap_or_else(|| panic!("{what}: {text}"));
        line.split_whitespace().last().expect("path").into()
    };
    let (array, report) = (script("array job:"), script("report job:"));
    let tasks: Vec<_> = (0..2)
        .map(|k| {
            std::process::Command::new("bash")
                .arg(&array)
                .env("SLURM_ARRAY_TASK_ID", k.to_string())
                .current_dir(workspace_root())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start a task")
        })
        .collect();
    let mut done = 0;
    for t in tasks {
        let out = t.wait_with_output().expect("task");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        done += runs_done_here(&err, 4);
    }
    assert_eq!(done, 4, "each of the 4 runs done by exactly one task");
    let out = std::process::Command::new("bash")
        .arg(&report)
        .output()
        .expect("report job");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(root.join("reports/tiny/report.md").exists());
    let db = db::Db::open_existing(&root.join("ablate.sqlite")).expect("db");
    let runs = db.list_runs(Some("tiny")).expect("runs");
    let generators: Vec<_> = runs
        .iter()
        .filter(|r| r.kind == RunKind::Generator)
        .collect();
    assert_eq!(generators.len(), 4);
    assert!(generators.iter().all(|r| r.status == RunStatus::Finished));
    // a bad spec is refused before anything is written
    let bad = ablate(&root, &["slurm", "experiments/tiny.toml", "--tasks", "0"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
}
