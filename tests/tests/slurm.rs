//! `ablate slurm`: the array script runs as two local tasks (SLURM_ARRAY_TASK_ID 0 and 1, side by
//! side, as Slurm would start them), every run is done exactly once, and the report job writes
//! the report. Then the same on a real one-node Slurm (`scripts/slurm-local.sh`, as root):
//! `--submit` queues the array and the report job, and both end COMPLETED. That test skips
//! without Slurm (`slurmctld`) outside CI; under CI it fails without it (`.ci/run` installs it).
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ablate_tests::{
    ablate, ablate_bin, generator_runs, runs_done_here, stderr, stdout, workspace_root,
};
use db::RunStatus;

/// The tiny spec's report was written and its 4 generator runs are finished.
fn assert_tiny_done_and_reported(root: &std::path::Path) {
    assert!(root.join("reports/tiny/report.md").exists());
    let db = db::Db::open_existing(&root.join("ablate.sqlite")).expect("db");
    let generators = generator_runs(&db, "tiny");
    assert_eq!(generators.len(), 4);
    assert!(generators.iter().all(|r| r.status == RunStatus::Finished));
}

/// The script `ablate slurm` printed after `label` (e.g. "array job:") in its output `text`.
fn written_script(text: &str, label: &str) -> PathBuf {
    text.lines()
        .find_map(|l| l.strip_prefix(label))
        .map(|p| PathBuf::from(p.trim()))
        .unwrap_or_else(|| panic!("no '{label}' line in:\n{text}"))
}

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
    let (array, report) = (
        written_script(&text, "array job:"),
        written_script(&text, "report job:"),
    );
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
    assert_tiny_done_and_reported(&root);
    // a bad spec is refused before anything is written
    let bad = ablate(&root, &["slurm", "experiments/tiny.toml", "--tasks", "0"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
}

/// A throwaway one-node Slurm cluster (`scripts/slurm-local.sh start`), stopped when dropped,
/// whether the test passed or panicked. One at a time: two clusters on one host disturb each
/// other (their nodes never became idle when two tests started them together).
struct LocalSlurm {
    dir: tempfile::TempDir,
    conf: PathBuf,
    _alone: std::sync::MutexGuard<'static, ()>,
}

/// Held by the test whose cluster is running.
static ONE_CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl LocalSlurm {
    fn start() -> LocalSlurm {
        // a test that panicked with the cluster running still stopped it (Drop)
        let alone = ONE_CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new(workspace_root().join("scripts/slurm-local.sh"))
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("run scripts/slurm-local.sh");
        // stopped even when the start failed half-way (munged up, the node never idle)
        let conf = stdout(&out)
            .lines()
            .find_map(|l| l.strip_prefix("export SLURM_CONF="))
            .map(PathBuf::from);
        let cluster = LocalSlurm {
            conf: conf.clone().unwrap_or_default(),
            dir,
            _alone: alone,
        };
        assert!(
            out.status.success() && conf.is_some(),
            "starting Slurm failed:\n{}{}",
            stdout(&out),
            stderr(&out)
        );
        cluster
    }

    /// A Slurm client command (`squeue`, `scontrol`, …) for this cluster.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SLURM_CONF", &self.conf);
        cmd
    }

    /// A job's state (`scontrol show job`; one word per array task, e.g. "COMPLETED").
    fn states(&self, job: &str) -> Vec<String> {
        let out = self
            .command("scontrol")
            .args(["show", "job", "--oneliner", job])
            .output()
            .expect("scontrol");
        assert!(out.status.success(), "scontrol: {}", stderr(&out));
        stdout(&out)
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("JobState="))
            .map(str::to_string)
            .collect()
    }

    /// Whether every task of `job` has ended (in any state).
    fn ended(&self, job: &str) -> bool {
        let states = self.states(job);
        let running = |s: &String| {
            matches!(
                s.as_str(),
                "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING"
            )
        };
        !states.is_empty() && !states.iter().any(running)
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for name in ["slurmctld.log", "slurmd.log"] {
            let path = self.dir.path().join("log").join(name);
            text += &format!(
                "== {}\n{}\n",
                path.display(),
                std::fs::read_to_string(&path).unwrap_or_default()
            );
        }
        text
    }
}

impl Drop for LocalSlurm {
    fn drop(&mut self) {
        let _ = Command::new(workspace_root().join("scripts/slurm-local.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// Whether `program` is on PATH.
fn installed(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

#[test]
fn a_real_slurm_runs_the_array_and_the_report_job() {
    if !installed("slurmctld") {
        let msg = "Slurm is not installed (no slurmctld on PATH; apt-get install slurm-wlm)";
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        eprintln!("skipped: {msg}");
        return;
    }
    let bin = ablate_bin(); // built before the clock starts
    let cluster = LocalSlurm::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let out = Command::new(bin)
        .current_dir(workspace_root())
        .env("SLURM_CONF", &cluster.conf)
        .arg("--root")
        .arg(&root)
        .args([
            "slurm",
            "experiments/tiny.toml",
            "--tasks",
            "2",
            "--time",
            "00:10:00",
            "--set",
            "train.steps=60",
            "--submit",
        ])
        .output()
        .expect("run ablate slurm --submit");
    assert!(out.status.success(), "{}", stderr(&out));
    // "array job 12, report job 13"
    let text = stdout(&out);
    let ids = text
        .lines()
        .find_map(|l| l.strip_prefix("array job "))
        .and_then(|l| l.split_once(", report job "))
        .unwrap_or_else(|| panic!("no job ids in:\n{text}"));
    let (array, report) = (ids.0.trim().to_string(), ids.1.trim().to_string());

    // the report job starts once the array has ended, so its end is the end of both
    let start = Instant::now();
    while !cluster.ended(&report) {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the jobs did not end within 3 minutes: array {:?}, report {:?}\n{}",
            cluster.states(&array),
            cluster.states(&report),
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("array and report ended in {:.1?}", start.elapsed());
    let (array_states, report_states) = (cluster.states(&array), cluster.states(&report));
    let logs = root.join("slurm/tiny/logs");
    let log = |name: String| {
        std::fs::read_to_string(logs.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    assert_eq!(
        array_states,
        ["COMPLETED", "COMPLETED"],
        "{}",
        cluster.logs()
    );
    assert_eq!(
        report_states,
        ["COMPLETED"],
        "{}",
        log(format!("ablate-tiny-report-{report}.log"))
    );

    // every run done by exactly one task (each task's log holds its stdout and stderr)
    let mut done = 0;
    for task in 0..2 {
        let text = log(format!("ablate-tiny-{array}_{task}.log"));
        assert!(text.contains(&format!("task {task} on ")), "{text}");
        done += runs_done_here(&text, 4);
    }
    assert_eq!(done, 4, "each of the 4 runs done by exactly one task");
    assert_tiny_done_and_reported(&root);
}

/// The 4 generator runs of the tiny spec were trained data-parallel over 2 nodes.
fn assert_trained_over_two_nodes(root: &std::path::Path) {
    let db = db::Db::open_existing(&root.join("ablate.sqlite")).expect("db");
    let generators = generator_runs(&db, "tiny");
    assert_eq!(generators.len(), 4);
    for r in generators {
        assert_eq!(r.status, RunStatus::Finished, "{}", r.name);
        let dp = &r.params["data_parallel"];
        assert_eq!(dp["world_size"], 2, "{}: {dp}", r.name);
        assert_eq!(dp["nodes"], 2, "{}: {dp}", r.name);
    }
}

/// `bash node.sh` as Slurm starts it for task `procid` of job 77 after `restart` requeues.
fn node_task(node: &std::path::Path, procid: usize, restart: usize) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(node)
        .env("SLURM_PROCID", procid.to_string())
        .env("SLURM_JOB_ID", "77")
        .env("SLURM_RESTART_COUNT", restart.to_string())
        .current_dir(workspace_root());
    cmd
}

/// Both tasks of the node script side by side, as Slurm starts them; their outputs in task order.
fn both_nodes(node: &std::path::Path, restart: usize) -> Vec<std::process::Output> {
    let tasks: Vec<_> = (0..2)
        .map(|k| {
            node_task(node, k, restart)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start a node")
        })
        .collect();
    tasks
        .into_iter()
        .map(|t| t.wait_with_output().expect("node"))
        .collect()
}

/// `ablate slurm --nodes 2`: the node script, started as Slurm starts one task per node
/// (SLURM_PROCID 0 and 1, one SLURM_JOB_ID), trains every run over both "nodes": node 0 runs the
/// spec, node 1 serves the ranks of its 4 trainings and ends when node 0 is done.
#[test]
fn the_node_script_trains_every_run_over_two_local_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let out = ablate(
        &root,
        &[
            "slurm",
            "experiments/tiny.toml",
            "--tasks",
            "1",
            "--nodes",
            "2",
            "--set",
            "train.steps=60",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let node = written_script(&stdout(&out), "each node:");
    let outs = both_nodes(&node, 0);
    for o in &outs {
        assert!(o.status.success(), "{}", stderr(o));
    }
    assert!(
        stderr(&outs[1]).contains("served 4 training(s)"),
        "{}",
        stderr(&outs[1])
    );
    assert!(root.join("ranks/job-77-0/END").exists());
    assert_trained_over_two_nodes(&root);

    // a node that starts after node 0 has finished sees the job's end marker and ends too
    let late = node_task(&node, 1, 0).output().expect("a late node");
    assert!(late.status.success(), "{}", stderr(&late));
    assert!(
        stderr(&late).contains("served 0 training(s)"),
        "{}",
        stderr(&late)
    );
    // node 0 of a second job under the same rendezvous name is refused: its nodes could take
    // the first job's end for its own
    let again = node_task(&node, 0, 0).output().expect("node 0 again");
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("was used by a job that has ended"),
        "{}",
        stderr(&again)
    );
    // the same job requeued (SLURM_RESTART_COUNT=1) meets anew: both nodes end, the runs found
    // finished
    let requeued = both_nodes(&node, 1);
    for o in &requeued {
        assert!(o.status.success(), "{}", stderr(o));
    }
    assert!(root.join("ranks/job-77-1/END").exists());
}

/// The same node script under a real Slurm. This machine is one node, so the test asks sbatch
/// for the job's 2 tasks on that one node (`--nodes=1 --ntasks-per-node=2` on the command line,
/// over the script's one task per node): srun still starts node.sh once per task, each with its
/// SLURM_PROCID.
#[test]
fn a_real_slurm_runs_the_node_script_as_two_tasks() {
    if !installed("slurmctld") {
        let msg = "Slurm is not installed (no slurmctld on PATH; apt-get install slurm-wlm)";
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        eprintln!("skipped: {msg}");
        return;
    }
    let bin = ablate_bin();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let out = Command::new(bin)
        .current_dir(workspace_root())
        .arg("--root")
        .arg(&root)
        .args([
            "slurm",
            "experiments/tiny.toml",
            "--tasks",
            "1",
            "--nodes",
            "2",
            "--time",
            "00:10:00",
            "--set",
            "train.steps=60",
        ])
        .output()
        .expect("ablate slurm");
    assert!(out.status.success(), "{}", stderr(&out));
    let array = root.join("slurm/tiny/array.sbatch");
    let cluster = LocalSlurm::start();
    let out = cluster
        .command("sbatch")
        .current_dir(workspace_root())
        .args(["--parsable", "--nodes=1", "--ntasks-per-node=2"])
        .arg(&array)
        .output()
        .expect("sbatch");
    assert!(out.status.success(), "sbatch: {}", stderr(&out));
    let job = stdout(&out).trim().to_string();
    let start = Instant::now();
    while !cluster.ended(&job) {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the job did not end within 3 minutes: {:?}\n{}",
            cluster.states(&job),
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = root.join(format!("slurm/tiny/logs/ablate-tiny-{job}_0.log"));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        cluster.states(&job),
        ["COMPLETED"],
        "{text}\n{}",
        cluster.logs()
    );
    eprintln!("the 2-node job ended in {:.1?}:\n{text}", start.elapsed());
    for k in 0..2 {
        assert!(text.contains(&format!("node {k} of 2 on ")), "{text}");
    }
    assert!(text.contains("served 4 training(s)"), "{text}");
    assert_trained_over_two_nodes(&root);
}
