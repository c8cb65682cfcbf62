//! Data parallelism on the CPU, with the ranks as threads of one process (`train.devices`) and
//! as processes (`ablate run --nproc N`, summing over TCP): 2 and 4 ranks sharing each batch
//! train the same weights (within 1e-5 after 20 steps) and log the same metrics as one rank on
//! the whole batch, up to float rounding (their gradients are summed in another order).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use ablate_tests::{ablate, generator_runs, max_abs_diff, stderr};
use db::Db;

/// Every generator run's (final weights, metric rows), by run hash.
type Trained = BTreeMap<
    String,
    (
        BTreeMap<String, candle_core::Tensor>,
        Vec<(String, i64, f64)>,
    ),
>;

/// `ablate run` of the tiny spec's AR runs (both arms), checkpointed every 10 steps and logged
/// every 2: the runs the kill-and-resume tests stop.
const TINY_AR_CHECKPOINTED: [&str; 9] = [
    "run",
    "experiments/tiny.toml",
    "--no-report",
    "--set",
    "train.checkpoint_every=10",
    "--set",
    "train.log_every=2",
    "--set",
    "grid.\"generator.kind\"=[\"ar\"]",
];

/// How the ranks of one training run.
#[derive(Clone, Copy)]
enum Ranks {
    /// one rank, the whole batch
    One,
    /// `train.devices` with this many "cpu" entries: threads of the `ablate run` process
    Threads(usize),
    /// `--nproc N`: rank processes
    Processes(usize),
    /// `--nnodes M`, one process each: `ablate run` is node 0, and `ablate ranks` serves as
    /// each other node, on the same root (here all on this machine, over TCP)
    Nodes(usize),
}

fn train(root: &Path, ranks: Ranks) -> Trained {
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
    let count = match ranks {
        Ranks::One => 1,
        Ranks::Threads(w) | Ranks::Processes(w) | Ranks::Nodes(w) => w,
    };
    let (set, n) = (
        format!("train.devices={:?}", vec!["cpu"; count]),
        count.to_string(),
    );
    match ranks {
        Ranks::One => {}
        Ranks::Threads(_) => args.extend(["--set", &set]),
        Ranks::Processes(_) => args.extend(["--nproc", &n]),
        Ranks::Nodes(_) => args.extend(["--nnodes", &n, "--master-addr", "127.0.0.1"]),
    }
    let nodes: Vec<_> = match ranks {
        Ranks::Nodes(world) => (1..world)
            .map(|k| {
                let k = k.to_string();
                ablate_tests::spawn_ablate(
                    root,
                    &["ranks", "--nproc", "1", "--nnodes", &n, "--node-rank", &k],
                )
            })
            .collect(),
        _ => Vec::new(),
    };
    let out = ablate(root, &args);
    for node in nodes {
        // each node's `ablate ranks` ends once node 0's runs are done
        let served = node.wait_with_output().expect("ablate ranks");
        assert!(served.status.success(), "{}", stderr(&served));
        assert!(
            stderr(&served).contains("served 4 training(s)"),
            "{}",
            stderr(&served)
        );
    }
    assert!(out.status.success(), "{}", stderr(&out));
    let db = Db::open_existing(&root.join("ablate.sqlite")).expect("database");
    let mut trained = Trained::new();
    for run in generator_runs(&db, "tiny") {
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
        if let Ranks::Threads(world) | Ranks::Processes(world) | Ranks::Nodes(world) = ranks {
            let recorded = &run.params["data_parallel"];
            assert_eq!(
                recorded["world_size"], world,
                "the world size is recorded on the run"
            );
            let processes = matches!(ranks, Ranks::Processes(_) | Ranks::Nodes(_));
            assert_eq!(recorded["processes"].as_bool().unwrap_or(false), processes);
            if processes {
                assert_eq!(recorded["gradients"], "tcp", "CPU ranks sum through TCP");
            }
        }
        trained.insert(run.hash.clone(), (weights, metrics));
    }
    assert_eq!(trained.len(), 4, "AR and MAR, both arms");
    trained
}

#[test]
fn two_and_four_ranks_train_what_one_rank_trains() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = train(&dir.path().join("one"), Ranks::One);
    let mut by_threads = BTreeMap::new();
    for ranks in [
        Ranks::Threads(2),
        Ranks::Threads(4),
        Ranks::Processes(2),
        Ranks::Processes(4),
        Ranks::Nodes(2),
    ] {
        let (world, how) = match ranks {
            Ranks::Threads(w) => (w, "threads"),
            Ranks::Processes(w) => (w, "processes"),
            Ranks::Nodes(w) => (w, "nodes"),
            Ranks::One => unreachable!("compared with one rank"),
        };
        let many = train(&dir.path().join(format!("{how}-{world}")), ranks);
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
                "{world} {how}, run {hash}: weights differ by {worst}"
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
                "{world} {how}, run {hash}: the same metric rows"
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
                    "{world} {how}, run {hash}: {k} at step {s} is {b}, one rank logged {a}"
                );
            }
        }
        eprintln!(
            "{world} ranks as {how}: weights within {worst_weight:.2e} and train/* metrics \
             within {worst_metric:.2e} of one rank's"
        );
        // processes sum in the same order as threads: the same weights, bit for bit
        match ranks {
            Ranks::Threads(w) => {
                by_threads.insert(w, many);
            }
            _ => {
                let threads = &by_threads[&world];
                for (hash, (weights, _)) in &many {
                    for (name, t) in weights {
                        let d = max_abs_diff(t, &threads[hash].0[name]);
                        assert_eq!(
                            d, 0.0,
                            "{world} processes, run {hash}, {name}: {d} from threads"
                        );
                    }
                }
            }
        }
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
    // so are rank processes that do not divide it, and a device list of another length
    for (args, expected) in [
        (vec!["--nproc", "3"], "train.batch = 8"),
        (vec!["--nproc", "2", "--nnodes", "3"], "train.batch = 8"),
        (
            vec![
                "--nproc",
                "2",
                "--set",
                r#"train.devices=["cpu","cpu","cpu","cpu"]"#,
            ],
            "names 4 device(s)",
        ),
    ] {
        let root = dir.path().join("bad-nproc");
        let mut all = vec!["run", "experiments/tiny.toml"];
        all.extend(&args);
        let bad = ablate(&root, &all);
        assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
        assert!(
            stderr(&bad).contains(expected),
            "{args:?}: {}",
            stderr(&bad)
        );
        assert!(
            !root.join("ablate.sqlite").exists(),
            "{args:?}: refused before the database is touched"
        );
    }
}

/// A run trained on 2 ranks and killed after a checkpoint resumes on 4 ranks (the world size is
/// not part of its identity, and every world size that divides the batch reads the same global
/// batch), and ends where one rank ends: the weights within 1e-5, each step's metrics logged
/// once, with the world size of its last process recorded.
#[test]
fn a_run_killed_on_two_ranks_resumes_on_four() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = |devices: Option<&'static str>| {
        let mut a = TINY_AR_CHECKPOINTED.to_vec();
        a.extend(["--set", "train.steps=100"]);
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
    let generators = generator_runs(&four, "tiny");
    assert_eq!(generators.len(), 2);
    for run in &generators {
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

/// The `ablate rank` processes whose job file lies under `root`: (pid, rank).
fn rank_processes(root: &Path) -> Vec<(i32, usize)> {
    let jobs = root.join("ranks").to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            // `ablate rank JOB --rank R`
            let is_rank = args.get(1).is_some_and(|a| a == "rank")
                && args.get(2).is_some_and(|a| a.starts_with(&jobs));
            let rank = args.get(4)?.parse().ok()?;
            is_rank.then_some((pid, rank))
        })
        .collect()
}

/// Wait for `child` to end within `limit` (killing it and failing the test otherwise).
fn wait_within(mut child: std::process::Child, limit: Duration, what: &str) -> Output {
    let started = std::time::Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// The first training's folder under `root/artifacts`, once its first checkpoint exists (within 5
/// minutes), and that checkpoint's step.
fn first_checkpoint(root: &Path) -> (PathBuf, u64) {
    let waited = std::time::Instant::now();
    loop {
        let dir = std::fs::read_dir(root.join("artifacts"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.path());
        if let Some(dir) = dir {
            if let Some(step) = ablate_tests::checkpoint_step(&dir.join("checkpoint.json")) {
                return (dir, step);
            }
        }
        assert!(
            waited.elapsed() < Duration::from_secs(300),
            "no checkpoint within 5 minutes"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The run of the tiny experiment in `root` with `status`, waiting up to `limit` for it.
fn run_with_status(root: &Path, status: db::RunStatus, limit: Duration) -> db::RunRow {
    let db = Db::open_existing(&root.join("ablate.sqlite")).expect("db");
    let waited = std::time::Instant::now();
    loop {
        if let Some(r) = generator_runs(&db, "tiny")
            .into_iter()
            .find(|r| r.status == status)
        {
            return r;
        }
        assert!(
            waited.elapsed() < limit,
            "no {status:?} run within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Faults of rank processes, each on the tiny spec's AR runs (both arms) with a checkpoint every 10
/// steps, then resumed:
/// - a rank that cannot start (its device does not exist) fails the run with its own error;
/// - of 4 rank processes, rank 3 killed after the first checkpoint: the run fails with rank 3's
///   error (not with the echo of ranks 1 and 2, whose sums failed after it), promptly; it resumes
///   on 2 processes and logs each step once;
/// - SIGTERM to rank 0 in the middle of training stops every rank after the same step: the run is
///   checkpointed past its first checkpoint and marked interrupted, and resumes;
/// - on 2 nodes, the rank of node 1 killed: its node posts why, and the run fails with that;
/// - node 0 refused at once (bad flags): node 1 ends too.
///
/// No rank process is left behind by any of them.
#[test]
fn rank_processes_that_fail_die_or_stop_end_the_run_with_their_cause_and_it_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = |ranks: &[&'static str], extra: &[&'static str]| {
        let mut a = TINY_AR_CHECKPOINTED.to_vec();
        a.extend(ranks);
        a.extend(extra);
        a
    };
    let long = ["--set", "train.steps=1000"];
    let each_step_once = |root: &Path, id: i64| {
        let db = Db::open_existing(&root.join("ablate.sqlite")).expect("db");
        let run = db.run(id).expect("query").expect("the run");
        assert_eq!(run.status, db::RunStatus::Finished);
        assert_eq!(
            ablate_tests::logged_steps(&db, id, "train/loss"),
            (1..=500).map(|k| 2 * k).collect::<Vec<i64>>(),
            "each step logged once"
        );
    };

    // rank 1 on a device this machine does not have
    let root = dir.path().join("no-device");
    let out = ablate(
        &root,
        &spec(
            &["--nproc", "2"],
            &["--set", r#"train.devices=["cpu","cuda:7"]"#],
        ),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let failed = run_with_status(&root, db::RunStatus::Failed, Duration::ZERO);
    let error = failed.error.unwrap_or_default();
    assert!(
        error.contains("data-parallel rank 1") && error.contains("cuda:7"),
        "the run's error names the rank and its cause: {error}"
    );
    assert!(rank_processes(&root).is_empty(), "no rank process is left");

    // rank 3 of 4 killed after the first checkpoint
    let root = dir.path().join("killed");
    let child = ablate_tests::spawn_ablate(&root, &spec(&["--nproc", "4"], &long));
    let (training, _) = first_checkpoint(&root);
    let ranks = rank_processes(&root);
    assert_eq!(ranks.len(), 3, "three rank processes besides rank 0");
    let (pid, _) = ranks.iter().find(|(_, r)| *r == 3).expect("rank 3");
    // SAFETY: kill(2) on a process this test's command started; no memory is touched
    unsafe { libc::kill(*pid, libc::SIGKILL) };
    let killed = std::time::Instant::now();
    let failed = run_with_status(&root, db::RunStatus::Failed, Duration::from_secs(60));
    eprintln!(
        "rank 3 of 4 killed: the run was marked failed {:.2} s later",
        killed.elapsed().as_secs_f64()
    );
    let out = wait_within(child, Duration::from_secs(300), "ablate run");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let error = failed.error.clone().unwrap_or_default();
    assert!(
        error.contains("data-parallel rank 3 ended with signal: 9"),
        "the run's error is the killed rank's: {error}"
    );
    let stopped_at =
        ablate_tests::checkpoint_step(&training.join("checkpoint.json")).expect("a checkpoint");
    assert!(stopped_at < 1000, "killed after training had finished");
    let out = ablate(&root, &spec(&["--nproc", "2"], &long));
    assert!(out.status.success(), "{}", stderr(&out));
    each_step_once(&root, failed.id);
    assert!(rank_processes(&root).is_empty(), "no rank process is left");

    // SIGTERM to rank 0 alone (as a scheduler sends it), after the first checkpoint
    let root = dir.path().join("sigterm");
    let child = ablate_tests::spawn_ablate(&root, &spec(&["--nproc", "2"], &long));
    let (training, first) = first_checkpoint(&root);
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on the process this test started; no memory is touched
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let out = wait_within(child, Duration::from_secs(120), "ablate run");
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    assert!(rank_processes(&root).is_empty(), "no rank process is left");
    let interrupted = run_with_status(&root, db::RunStatus::Interrupted, Duration::ZERO);
    let at = ablate_tests::checkpoint_step(&training.join("checkpoint.json")).expect("checkpoint");
    assert!(
        at >= first && at < 1000,
        "checkpointed where it stopped, at step {at} (first checkpoint {first})"
    );
    let out = ablate(&root, &spec(&["--nproc", "2"], &long));
    assert!(out.status.success(), "{}", stderr(&out));
    each_step_once(&root, interrupted.id);
    eprintln!("SIGTERM after checkpoint {first}: stopped and checkpointed at step {at}, resumed");

    // on 2 nodes, the rank of node 1 killed after the first checkpoint
    let root = dir.path().join("remote");
    let node1 = ablate_tests::spawn_ablate(
        &root,
        &["ranks", "--nproc", "1", "--nnodes", "2", "--node-rank", "1"],
    );
    let node0 = ablate_tests::spawn_ablate(
        &root,
        &spec(&["--nnodes", "2", "--master-addr", "127.0.0.1"], &long),
    );
    first_checkpoint(&root);
    let ranks = rank_processes(&root);
    assert_eq!(ranks.len(), 1, "node 1's rank");
    // SAFETY: kill(2) on a process this test's command started; no memory is touched
    unsafe { libc::kill(ranks[0].0, libc::SIGKILL) };
    let out = wait_within(node0, Duration::from_secs(300), "node 0");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let served = wait_within(node1, Duration::from_secs(60), "node 1");
    assert!(served.status.success(), "{}", stderr(&served));
    let failed = run_with_status(&root, db::RunStatus::Failed, Duration::ZERO);
    let error = failed.error.unwrap_or_default();
    assert!(
        error.contains("node 1: data-parallel rank 1 ended with signal: 9"),
        "the run's error is the remote rank's: {error}"
    );
    assert!(rank_processes(&root).is_empty(), "no rank process is left");
    eprintln!("node 1's rank killed: {error}");

    // node 0 refused at once (a batch its ranks cannot share): node 1 ends too, having served
    // none (a rendezvous of this job's own, so whichever of the two starts first)
    let root = dir.path().join("refused");
    let node1 = ablate_tests::spawn_ablate(
        &root,
        &[
            "ranks",
            "--nproc",
            "1",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--rendezvous",
            "refused",
        ],
    );
    let out = ablate(
        &root,
        &spec(
            &["--nnodes", "2", "--master-addr", "127.0.0.1"],
            &["--rendezvous", "refused", "--set", "train.batch=7"],
        ),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let served = wait_within(node1, Duration::from_secs(60), "node 1");
    assert!(served.status.success(), "{}", stderr(&served));
    assert!(
        stderr(&served).contains("served 0 training(s)"),
        "{}",
        stderr(&served)
    );
}
