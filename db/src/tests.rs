//! Unit tests against real database files in temporary directories.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};

use serde_json::json;

use crate::{Db, Error, MetricPoint, NewEval, NewRun, RunKind, RunStatus};

fn temp_db() -> (tempfile::TempDir, PathBuf, Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("nested").join("ablate.sqlite");
    let db = Db::open(&path).expect("open");
    (dir, path, db)
}

/// Each case runs twice: as its own test on a fresh SQLite file, and in
/// `every_case_on_postgres` on a fresh database of one throwaway PostgreSQL cluster.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[test]
                fn $case() {
                    let (_dir, _path, db) = super::temp_db();
                    super::$case(&db);
                }
            )*
        }

        #[test]
        fn every_case_on_postgres() {
            let cluster = crate::testing::TempPostgres::start().expect("a throwaway PostgreSQL cluster");
            eprintln!("server: {}", cluster.version());
            $(
                let url = cluster.create_database().expect("a database");
                let root = tempfile::tempdir().expect("temp dir");
                let db = Db::open_postgres(&url, root.path()).expect("opening the database");
                eprintln!("case on postgres: {}", stringify!($case));
                $case(&db);
            )*
        }
    };
}

on_both_backends!(
    upsert_experiment_updates_spec,
    create_run_is_idempotent_and_links_second_experiment,
    run_lifecycle,
    reap_dead_runs_marks_only_dead_on_this_host,
    metric_writer_batches_and_replaces,
    delete_metrics_after_step,
    evals_join_experiment_and_replace,
    artifacts_and_baselines,
    one_db_shared_across_threads,
    now_compares_with_run_timestamps,
    set_run_param_adds_beside_the_spec_and_refuses_bad_keys,
    experiment_versions_keep_configurations_apart,
);

fn new_run<'a>(
    hash: &'a str,
    arm: Option<&'a str>,
    seed: i64,
    params: &'a serde_json::Value,
) -> NewRun<'a> {
    NewRun {
        hash,
        kind: RunKind::Generator,
        name: hash,
        cell: "ar-raster",
        arm,
        seed,
        params,
        git_commit: Some("abc123"),
        git_dirty: false,
        host: "hostA",
        device: "cpu",
        version: "0.1.0",
    }
}

fn point(key: &str, step: i64, value: f64) -> MetricPoint {
    MetricPoint {
        key: key.into(),
        step,
        value,
        wall_time: 1.0e9 + step as f64,
    }
}

#[test]
fn migrations_apply_and_reopen() {
    let (_dir, path, db) = temp_db();
    assert!(
        path.is_file(),
        "open creates the file and its parent directory"
    );
    let tables: Vec<String> = db
        .block_on(
            sqlx::query_scalar(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE '\\_%' ESCAPE '\\' ORDER BY name",
            )
            .fetch_all(db.pool()),
        )
        .expect("list tables");
    let tables: HashSet<&str> = tables.iter().map(String::as_str).collect();
    for t in [
        "experiments",
        "runs",
        "experiment_runs",
        "metrics",
        "latest_metrics",
        "evals",
        "artifacts",
        "baselines",
    ] {
        assert!(tables.contains(t), "missing {t}: {tables:?}");
    }
    let journal: String = db
        .block_on(sqlx::query_scalar("PRAGMA journal_mode").fetch_one(db.pool()))
        .expect("journal mode");
    assert_eq!(journal, "wal");
    let fk: i64 = db
        .block_on(sqlx::query_scalar("PRAGMA foreign_keys").fetch_one(db.pool()))
        .expect("foreign keys");
    assert_eq!(fk, 1);
    let applied: i64 = db
        .block_on(sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations").fetch_one(db.pool()))
        .expect("migrations");
    assert_eq!(applied, 2, "0001_init and 0002_experiment_versions");

    let id = db
        .upsert_experiment("e", "e.toml", "a = 1")
        .expect("upsert");
    drop(db);
    let db = Db::open_existing(&path).expect("reopen");
    assert_eq!(db.experiment_id("e").expect("lookup"), Some(id));
    assert_eq!(db.experiment_id("nope").expect("lookup"), None);
}

#[test]
fn open_existing_missing_file_names_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("absent.sqlite");
    match Db::open_existing(&path) {
        Err(Error::NotFound(msg)) => assert!(msg.contains("absent.sqlite"), "{msg}"),
        other => panic!("expected NotFound, got {:?}", other.map(|_| ())),
    }
    assert!(!path.exists(), "open_existing must not create the file");
}

fn upsert_experiment_updates_spec(db: &Db) {
    let a = db
        .upsert_experiment("exp", "a.toml", "x = 1")
        .expect("insert");
    let b = db
        .upsert_experiment("exp", "b.toml", "x = 2")
        .expect("update");
    assert_eq!(a, b);
    assert_eq!(
        db.experiment_spec("exp").expect("spec"),
        Some(("b.toml".to_string(), "x = 2".to_string()))
    );
    let list = db.list_experiments().expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(
        (
            list[0].name.as_str(),
            list[0].spec_path.as_str(),
            list[0].runs,
            list[0].finished
        ),
        ("exp", "b.toml", 0, 0)
    );
    assert!(
        list[0].created_at.ends_with('Z') && list[0].created_at.contains('T'),
        "{}",
        list[0].created_at
    );
}

fn create_run_is_idempotent_and_links_second_experiment(db: &Db) {
    let e1 = db.upsert_experiment("one", "one.toml", "").expect("e1");
    let e2 = db.upsert_experiment("two", "two.toml", "").expect("e2");
    let params = json!({"z": 1, "a": {"y": [1, 2], "b": true}});
    let mut tok = new_run("tok-hash", None, 0, &params);
    tok.kind = RunKind::Tokenizer;
    let t1 = db.create_run(e1, &tok).expect("create");
    let g1 = db
        .create_run(e1, &new_run("gen-1", Some("diffusion"), 7, &params))
        .expect("gen");
    // Same hash again, with different metadata: the existing id comes back, the row is untouched.
    let mut again = tok.clone();
    again.name = "renamed";
    again.host = "hostB";
    assert_eq!(db.create_run(e1, &again).expect("again"), t1);
    // Shared with a second experiment, where it is the first run.
    assert_eq!(db.create_run(e2, &again).expect("shared"), t1);

    let row = db
        .run_by_hash("tok-hash")
        .expect("by hash")
        .expect("exists");
    assert_eq!(row.id, t1);
    assert_eq!(
        (row.name.as_str(), row.host.as_str(), row.kind.as_str()),
        ("tok-hash", "hostA", "tokenizer")
    );
    assert_eq!(row.status, RunStatus::Queued);
    assert_eq!(row.params, params);
    assert_eq!(row.git_commit.as_deref(), Some("abc123"));
    assert!(!row.git_dirty);
    assert!(row.started_at.is_none() && row.ended_at.is_none() && row.pid.is_none());
    assert_eq!(
        db.run(g1).expect("run").expect("exists").arm.as_deref(),
        Some("diffusion")
    );
    assert!(db.run(9999).expect("run").is_none());
    assert!(db.run_by_hash("nope").expect("by hash").is_none());

    let ids = |name: &str| {
        db.list_runs(Some(name))
            .expect("list")
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids("one"), vec![t1, g1]);
    assert_eq!(ids("two"), vec![t1]);
    let g2 = db
        .create_run(e2, &new_run("gen-2", Some("cross-entropy"), 7, &params))
        .expect("gen2");
    assert_eq!(ids("two"), vec![t1, g2]);
    assert_eq!(
        db.list_runs(None)
            .expect("all")
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>(),
        vec![t1, g1, g2]
    );
    let positions: Vec<i64> = db
        .block_on(
            sqlx::query_scalar(
                "SELECT position FROM experiment_runs WHERE experiment_id = $1 ORDER BY position",
            )
            .bind(e1)
            .fetch_all(db.pool()),
        )
        .expect("positions");
    assert_eq!(positions, vec![0, 1]);

    let counts: Vec<(String, i64)> = db
        .list_experiments()
        .expect("list")
        .into_iter()
        .map(|e| (e.name, e.runs))
        .collect();
    assert_eq!(counts, vec![("one".to_string(), 2), ("two".to_string(), 2)]);

    assert!(matches!(
        db.list_runs(Some("missing")),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        "decoder".parse::<RunKind>(),
        Err(Error::Invalid(_))
    ));
    assert_eq!(
        "tokenizer".parse::<RunKind>().ok(),
        Some(RunKind::Tokenizer)
    );
    assert!(matches!(
        db.create_run(424242, &new_run("x", None, 0, &params)),
        Err(Error::NotFound(_))
    ));
}

fn run_lifecycle(db: &Db) {
    let e = db.upsert_experiment("e", "e.toml", "").expect("exp");
    let params = json!({});
    let id = db
        .create_run(e, &new_run("h", Some("diffusion"), 1, &params))
        .expect("run");

    db.start_run(id, 4242, "hostA", "cuda:0", Some("def456"), true)
        .expect("start");
    db.set_stage(id, "train").expect("stage");
    let r = db.run(id).expect("run").expect("exists");
    assert_eq!(
        (
            r.status.as_str(),
            r.stage.as_deref(),
            r.pid,
            r.device.as_str()
        ),
        ("running", Some("train"), Some(4242), "cuda:0")
    );
    assert_eq!(r.git_commit.as_deref(), Some("def456"));
    assert!(r.git_dirty);
    let started = r.started_at.clone().expect("started_at");

    db.fail_run(id, "out of memory").expect("fail");
    let r = db.run(id).expect("run").expect("exists");
    assert_eq!(
        (r.status.as_str(), r.error.as_deref()),
        ("failed", Some("out of memory"))
    );
    assert!(r.ended_at.is_some());

    // Restart keeps the first start time and clears the error.
    db.start_run(id, 4343, "hostA", "cpu", None, false)
        .expect("restart");
    let r = db.run(id).expect("run").expect("exists");
    assert_eq!(r.started_at.as_deref(), Some(started.as_str()));
    assert_eq!(
        (r.status.as_str(), r.error, r.ended_at, r.pid),
        ("running", None, None, Some(4343))
    );

    db.finish_run(id).expect("finish");
    let r = db.run(id).expect("run").expect("exists");
    assert_eq!(
        (r.status.as_str(), r.stage.as_deref()),
        ("finished", Some("done"))
    );
    assert!(r.ended_at.is_some());
    // A finished run is never turned into an interrupted one.
    db.mark_interrupted(id).expect("mark");
    assert_eq!(
        db.run(id).expect("run").expect("exists").status,
        RunStatus::Finished
    );
    assert_eq!(db.list_experiments().expect("list")[0].finished, 1);

    assert!(matches!(db.set_stage(777, "x"), Err(Error::NotFound(_))));
    assert!(matches!(db.mark_interrupted(777), Err(Error::NotFound(_))));

    let q = db
        .create_run(e, &new_run("h2", None, 1, &params))
        .expect("run");
    db.start_run(q, 1, "hostA", "cpu", None, false)
        .expect("start");
    db.mark_interrupted(q).expect("mark");
    assert_eq!(
        db.run(q).expect("run").expect("exists").status,
        RunStatus::Interrupted
    );

    for s in ["queued", "running", "finished", "failed", "interrupted"] {
        assert_eq!(s.parse::<RunStatus>().expect("parse").to_string(), s);
    }
    assert!(matches!(
        "done".parse::<RunStatus>(),
        Err(Error::Invalid(_))
    ));
}

fn reap_dead_runs_marks_only_dead_on_this_host(db: &Db) {
    let e = db.upsert_experiment("e", "e.toml", "").expect("exp");
    let params = json!({});
    let alive = db
        .create_run(e, &new_run("alive", None, 0, &params))
        .expect("r");
    let dead = db
        .create_run(e, &new_run("dead", None, 0, &params))
        .expect("r");
    let other_host = db
        .create_run(e, &new_run("other", None, 0, &params))
        .expect("r");
    let no_pid = db
        .create_run(e, &new_run("nopid", None, 0, &params))
        .expect("r");
    let queued = db
        .create_run(e, &new_run("queued", None, 0, &params))
        .expect("r");
    db.start_run(alive, 100, "hostA", "cpu", None, false)
        .expect("start");
    db.start_run(dead, 200, "hostA", "cpu", None, false)
        .expect("start");
    db.start_run(other_host, 200, "hostB", "cpu", None, false)
        .expect("start");
    db.start_run(no_pid, 1, "hostA", "cpu", None, false)
        .expect("start");
    db.block_on(
        sqlx::query("UPDATE runs SET pid = NULL WHERE id = $1")
            .bind(no_pid)
            .execute(db.pool()),
    )
    .expect("null pid");

    let reaped = db.reap_dead_runs("hostA", &|pid| pid == 100).expect("reap");
    assert_eq!(reaped, 2);
    let status = |id| db.run(id).expect("run").expect("exists").status;
    assert_eq!(status(alive), RunStatus::Running);
    assert_eq!(status(dead), RunStatus::Interrupted);
    assert_eq!(status(no_pid), RunStatus::Interrupted);
    assert_eq!(status(other_host), RunStatus::Running);
    assert_eq!(status(queued), RunStatus::Queued);
    assert!(db
        .run(dead)
        .expect("run")
        .expect("exists")
        .ended_at
        .is_some());
    assert_eq!(
        db.reap_dead_runs("hostA", &|pid| pid == 100).expect("reap"),
        0
    );
}

fn metric_writer_batches_and_replaces(db: &Db) {
    let e = db.upsert_experiment("e", "e.toml", "").expect("exp");
    let params = json!({});
    let run = db
        .create_run(e, &new_run("h", None, 0, &params))
        .expect("run");
    let stored = |db: &Db| db.metrics(run, None).expect("metrics").len();
    {
        let mut w = db.metric_writer(run, 3);
        w.push("loss", 1, 0.9).expect("push");
        w.push("loss", 2, 0.8).expect("push");
        assert_eq!(
            (w.pending(), stored(db)),
            (2, 0),
            "below the batch size nothing is written"
        );
        w.push("lr", 2, 1e-3).expect("push");
        assert_eq!(
            (w.pending(), stored(db)),
            (0, 3),
            "the third point writes the batch"
        );
        w.push("loss", 3, 0.7).expect("push");
        assert_eq!(stored(db), 3);
    } // drop flushes
    assert_eq!(stored(db), 4);

    // Re-inserting (key, step) replaces: a resumed run never duplicates.
    db.insert_metrics(run, &[point("loss", 2, 0.5), point("loss", 4, f64::NAN)])
        .expect("insert");
    let loss = db.metrics(run, Some("loss")).expect("loss");
    let steps: Vec<i64> = loss.iter().map(|p| p.step).collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    assert_eq!(loss[0].value, 0.9);
    assert_eq!(loss[1].value, 0.5);
    assert_eq!(loss[1].wall_time, 1.0e9 + 2.0);
    assert!(loss[3].value.is_nan(), "NaN survives as NaN");
    assert!(
        loss[0].wall_time > 1.6e9,
        "writer stamps UNIX time: {}",
        loss[0].wall_time
    );
    let all = db.metrics(run, None).expect("all");
    let keys: Vec<(&str, i64)> = all.iter().map(|p| (p.key.as_str(), p.step)).collect();
    assert_eq!(
        keys,
        vec![
            ("loss", 1),
            ("loss", 2),
            ("loss", 3),
            ("loss", 4),
            ("lr", 2)
        ]
    );

    let latest = db.latest_metrics(run).expect("latest");
    assert_eq!(latest.len(), 2);
    assert_eq!((latest[0].0.as_str(), latest[0].1), ("loss", 4));
    assert_eq!(latest[1], ("lr".to_string(), 2, 1e-3));

    let recs = db.metrics_for_experiment("e", "loss").expect("records");
    assert_eq!(recs.len(), 4);
    assert_eq!(
        (
            recs[1].run_id,
            recs[1].cell.as_str(),
            recs[1].step,
            recs[1].value
        ),
        (run, "ar-raster", 2, 0.5)
    );
    assert!(matches!(
        db.metrics_for_experiment("missing", "loss"),
        Err(Error::NotFound(_))
    ));
}

fn delete_metrics_after_step(db: &Db) {
    let e = db.upsert_experiment("e", "e.toml", "").expect("exp");
    let params = json!({});
    let run = db
        .create_run(e, &new_run("h", None, 0, &params))
        .expect("run");
    let other = db
        .create_run(e, &new_run("h2", None, 0, &params))
        .expect("run");
    let points: Vec<MetricPoint> = (0..10)
        .flat_map(|s| [point("loss", s, s as f64), point("acc", s, 1.0)])
        .collect();
    db.insert_metrics(run, &points).expect("insert");
    db.insert_metrics(other, &points).expect("insert");
    assert_eq!(db.delete_metrics_after(run, 6).expect("delete"), 6);
    let left = db.metrics(run, Some("loss")).expect("loss");
    assert_eq!(
        left.iter().map(|p| p.step).collect::<Vec<_>>(),
        (0..=6).collect::<Vec<_>>()
    );
    assert_eq!(
        db.metrics(other, None).expect("other").len(),
        20,
        "other runs untouched"
    );
    assert_eq!(db.delete_metrics_after(run, 6).expect("delete"), 0);
}

fn evals_join_experiment_and_replace(db: &Db) {
    let e = db.upsert_experiment("e", "e.toml", "").expect("exp");
    let params = json!({});
    let ce = db
        .create_run(e, &new_run("ce", Some("cross-entropy"), 1, &params))
        .expect("run");
    let diff = db
        .create_run(e, &new_run("diff", Some("diffusion"), 1, &params))
        .expect("run");
    let settings = json!({"cfg": 1.5, "steps": 64});
    let reordered = json!({"steps": 64, "cfg": 1.5});
    let eval = |run_id, metric, value| NewEval {
        run_id,
        step: 1000,
        metric,
        value,
        sample_count: 500,
        feature_net: "inception-v3",
        settings: &settings,
    };
    db.insert_eval(&eval(diff, "fid", 12.5)).expect("eval");
    db.insert_eval(&eval(diff, "is", 40.0)).expect("eval");
    db.insert_eval(&eval(ce, "fid", 20.0)).expect("eval");
    // Same identity (settings with keys in another order): replaced, not duplicated.
    let first = db.insert_eval(&eval(ce, "is", 30.0)).expect("eval");
    let again = db
        .insert_eval(&NewEval {
            value: 31.0,
            sample_count: 1000,
            settings: &reordered,
            ..eval(ce, "is", 0.0)
        })
        .expect("eval");
    assert_eq!(first, again);

    let rows = db.evals_for_experiment("e").expect("evals");
    let got: Vec<(i64, &str, f64, i64)> = rows
        .iter()
        .map(|r| (r.run_id, r.metric.as_str(), r.value, r.position))
        .collect();
    assert_eq!(
        got,
        vec![
            (ce, "fid", 20.0, 0),
            (ce, "is", 31.0, 0),
            (diff, "fid", 12.5, 1),
            (diff, "is", 40.0, 1)
        ]
    );
    assert_eq!(rows[1].sample_count, 1000);
    assert_eq!(
        (
            rows[0].run_name.as_str(),
            rows[0].kind.as_str(),
            rows[0].arm.as_deref(),
            rows[0].seed
        ),
        ("ce", "generator", Some("cross-entropy"), 1)
    );
    assert_eq!(rows[0].settings, r#"{"cfg":1.5,"steps":64}"#);
    assert_eq!(rows[0].feature_net, "inception-v3");

    let by_run = db.evals_for_run(diff).expect("evals");
    assert_eq!(
        by_run
            .iter()
            .map(|r| (r.metric.as_str(), r.value, r.position))
            .collect::<Vec<_>>(),
        vec![("fid", 12.5, 1), ("is", 40.0, 1)]
    );
    assert!(matches!(
        db.evals_for_experiment("missing"),
        Err(Error::NotFound(_))
    ));
}

fn artifacts_and_baselines(db: &Db) {
    let e = db.upsert_experiment("e", "e.toml", "").expect("exp");
    let params = json!({});
    let run = db
        .create_run(e, &new_run("h", None, 0, &params))
        .expect("run");
    let a = db
        .insert_artifact(run, "checkpoint", "ckpt/1000.safetensors", "aa", 10)
        .expect("artifact");
    let b = db
        .insert_artifact(run, "samples", "grid.png", "bb", 20)
        .expect("artifact");
    let a2 = db
        .insert_artifact(run, "checkpoint", "ckpt/1000.safetensors", "cc", 30)
        .expect("artifact");
    assert_eq!(a, a2);
    let rows = db.artifacts(run).expect("artifacts");
    assert_eq!(
        rows.iter()
            .map(|r| (r.id, r.sha256.as_str(), r.bytes))
            .collect::<Vec<_>>(),
        vec![(a, "cc", 30), (b, "bb", 20)]
    );
    assert!(
        matches!(
            db.insert_artifact(999, "x", "y", "z", 1),
            Err(Error::Sqlx(_))
        ),
        "foreign keys are enforced"
    );

    assert_eq!(db.baseline("e", "main").expect("baseline"), None);
    let p1 = json!({"fid": {"diffusion": 12.5}});
    let id = db.pin_baseline("e", "main", &p1).expect("pin");
    assert_eq!(db.baseline("e", "main").expect("baseline"), Some(p1));
    let p2 = json!({"fid": {"diffusion": 11.0}});
    assert_eq!(db.pin_baseline("e", "main", &p2).expect("pin"), id);
    assert_eq!(db.baseline("e", "main").expect("baseline"), Some(p2));
    assert_eq!(db.baseline("other", "main").expect("baseline"), None);
    assert!(matches!(
        db.pin_baseline("other", "main", &json!({})),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn concurrent_writers_on_one_file_never_lock() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("shared.sqlite");
    concurrent_writers_never_lock(Arc::new(move || Db::open(&path)), 2);
}

/// Concurrent writers on a fresh Postgres database: migrations applied once, no lost writes.
#[test]
fn concurrent_writers_on_one_postgres_database_never_lock() {
    let cluster = crate::testing::TempPostgres::start().expect("a throwaway PostgreSQL cluster");
    let url = cluster.create_database().expect("a database");
    let root = tempfile::tempdir().expect("temp dir");
    let root = root.path().to_path_buf();
    concurrent_writers_never_lock(Arc::new(move || Db::open_postgres(&url, &root)), 1);
}

/// Threads each open their own handle with `open` at the same moment (so that they also migrate a
/// fresh database at once) and write runs and metrics; `migrations` is how many the backend has.
fn concurrent_writers_never_lock(
    open: Arc<dyn Fn() -> crate::Result<Db> + Send + Sync>,
    migrations: i64,
) {
    const THREADS: usize = 8;
    const BATCHES: i64 = 100;
    const POINTS: i64 = 5;
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let open = Arc::clone(&open);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || -> crate::Result<i64> {
                barrier.wait(); // every thread opens (and migrates) a fresh database at once
                let db = open()?;
                let e = db.upsert_experiment("conc", "conc.toml", "")?;
                let params = json!({"thread": t});
                let hash = format!("run-{t}");
                let run = db.create_run(e, &new_run(&hash, None, t as i64, &params))?;
                db.start_run(run, t as i64, "hostA", "cpu", None, false)?;
                for b in 0..BATCHES {
                    let points: Vec<MetricPoint> = (0..POINTS)
                        .map(|i| point("loss", b * POINTS + i, t as f64))
                        .collect();
                    db.insert_metrics(run, &points)?;
                }
                db.finish_run(run)?;
                Ok(run)
            })
        })
        .collect();
    let mut runs = Vec::new();
    for h in handles {
        match h.join().expect("thread panicked") {
            Ok(run) => runs.push(run),
            Err(e) => panic!("a concurrent writer failed: {e}"),
        }
    }
    let db = open().expect("open");
    let list = db.list_experiments().expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].runs, list[0].finished),
        (THREADS as i64, THREADS as i64)
    );
    let mut positions: Vec<i64> = db
        .block_on(sqlx::query_scalar("SELECT position FROM experiment_runs").fetch_all(db.pool()))
        .expect("positions");
    positions.sort_unstable();
    assert_eq!(
        positions,
        (0..THREADS as i64).collect::<Vec<_>>(),
        "positions are unique"
    );
    for run in runs {
        let points = db.metrics(run, Some("loss")).expect("metrics");
        assert_eq!(points.len() as i64, BATCHES * POINTS);
        let seed = db.run(run).expect("run").expect("exists").seed;
        assert!(points.iter().all(|p| p.value == seed as f64));
    }
    let applied: i64 = db
        .block_on(sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations").fetch_one(db.pool()))
        .expect("migrations");
    assert_eq!(
        applied, migrations,
        "concurrent openers applied each migration once"
    );
}

/// A Postgres advisory lock is refused to another handle while held, released on drop, and
/// waited for; SQLite has none (its locks are files).
#[test]
fn advisory_locks_on_postgres() {
    let cluster = crate::testing::TempPostgres::start().expect("a throwaway PostgreSQL cluster");
    let url = cluster.create_database().expect("a database");
    let root = tempfile::tempdir().expect("temp dir");
    let (a, b) = (
        Db::open_postgres(&url, root.path()).expect("open"),
        Db::open_postgres(&url, root.path()).expect("open"),
    );
    let held = a
        .advisory_lock("run-x", false)
        .expect("lock")
        .expect("free at first");
    assert_eq!(held.name(), "run-x");
    assert!(
        b.advisory_lock("run-x", false).expect("lock").is_none(),
        "held by a"
    );
    assert!(
        b.advisory_lock("run-y", false).expect("lock").is_some(),
        "another name is free"
    );
    std::thread::scope(|s| {
        let waiter = s.spawn(|| b.advisory_lock("run-x", true).map(|l| l.is_some()));
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!waiter.is_finished(), "waits while a holds the lock");
        drop(held);
        assert!(
            waiter.join().expect("waiter").expect("lock"),
            "taken once a lets go"
        );
    });
    let (_dir, _path, sqlite) = temp_db();
    assert!(matches!(
        sqlite.advisory_lock("run-x", false),
        Err(Error::Invalid(_))
    ));
}

/// A Postgres URL that does not answer is named (without its password) with what to check.
#[test]
fn an_unreachable_postgres_is_named_with_what_to_check() {
    let root = tempfile::tempdir().expect("temp dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("postgres://me:secret@127.0.0.1:{port}/ablate");
    let err = Db::open_postgres(&url, root.path()).expect_err("nothing listens there");
    let msg = err.to_string();
    assert!(msg.contains(&format!("me:***@127.0.0.1:{port}")), "{msg}");
    assert!(!msg.contains("secret"), "{msg}");
    assert!(msg.contains("check that the server is running"), "{msg}");
    assert!(matches!(
        Db::open_postgres("mysql://x", root.path()),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn db_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Db>();
}

fn one_db_shared_across_threads(db: &Db) {
    let e = db.upsert_experiment("e", "e.toml", "").expect("exp");
    let params = json!({});
    let run = db
        .create_run(e, &new_run("h", None, 0, &params))
        .expect("run");
    std::thread::scope(|s| {
        for t in 0..4i64 {
            let db = &db;
            s.spawn(move || {
                let mut w = db.metric_writer(run, 7);
                for step in 0..50 {
                    w.push(&format!("k{t}"), step, step as f64).expect("push");
                }
                w.flush().expect("flush");
            });
        }
    });
    let latest = db.latest_metrics(run).expect("latest");
    assert_eq!(latest.len(), 4);
    assert!(latest
        .iter()
        .all(|(_, step, value)| *step == 49 && *value == 49.0));
    assert_eq!(db.metrics(run, None).expect("metrics").len(), 200);
}

/// `now()` is the clock `ended_at` uses, so the two compare as text: a run failed after a reading
/// of `now()` ends at or after it, and one failed before ends before a later reading.
fn now_compares_with_run_timestamps(db: &Db) {
    let e = db.upsert_experiment("e", "e.toml", "").expect("exp");
    let params = json!({});
    let before = db
        .create_run(e, &new_run("h1", None, 0, &params))
        .expect("run");
    db.fail_run(before, "x").expect("fail");
    std::thread::sleep(std::time::Duration::from_millis(5));
    let since = db.now().expect("now");
    let after = db
        .create_run(e, &new_run("h2", None, 0, &params))
        .expect("run");
    db.fail_run(after, "y").expect("fail");
    let ended = |id| {
        db.run(id)
            .expect("query")
            .expect("row")
            .ended_at
            .expect("ended")
    };
    assert_eq!(
        since.len(),
        ended(after).len(),
        "{since} vs {}",
        ended(after)
    );
    assert!(ended(before) < since, "{} < {since}", ended(before));
    assert!(ended(after) >= since, "{} >= {since}", ended(after));
}

fn set_run_param_adds_beside_the_spec_and_refuses_bad_keys(db: &Db) {
    let e = db.upsert_experiment("e", "e.toml", "").expect("exp");
    let params = json!({"generator": {"kind": "mar"}});
    let id = db
        .create_run(e, &new_run("h1", None, 0, &params))
        .expect("run");
    let model = json!({"param_count": 1234, "seq_len": 16});
    db.set_run_param(id, "model", &model).expect("set");
    let row = db.run(id).expect("query").expect("row");
    assert_eq!(row.params["model"], model);
    assert_eq!(row.params["generator"]["kind"], "mar", "the spec stays");
    db.set_run_param(id, "model", &json!({"param_count": 1}))
        .expect("replace");
    let row = db.run(id).expect("query").expect("row");
    assert_eq!(row.params["model"], json!({"param_count": 1}));
    assert!(matches!(
        db.set_run_param(id, "a.b", &json!(1)),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        db.set_run_param(999, "model", &json!(1)),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn artifact_paths_resolve_against_the_root() {
    let (dir, path, db) = temp_db();
    assert_eq!(db.root(), path.parent().expect("parent"));
    assert_eq!(
        db.resolve("artifacts/h/samples.png"),
        dir.path().join("nested/artifacts/h/samples.png")
    );
    assert_eq!(
        db.resolve("/elsewhere/x.png"),
        PathBuf::from("/elsewhere/x.png")
    );
}

/// A changed configuration under one name is a new version: runs link to the version that
/// planned them (a run planned by two versions is in both), and the runs, evals and metrics of
/// one version never include another's, nor twice the same run.
fn experiment_versions_keep_configurations_apart(db: &Db) {
    let exp = db
        .upsert_experiment("e", "e.toml", "a = 1")
        .expect("upsert");
    let params = json!({});
    assert_eq!(
        db.experiment_version(exp, "config-a", "a = 1").expect("v1"),
        1
    );
    let shared = db
        .create_run(exp, &new_run("shared", Some("diffusion"), 0, &params))
        .expect("run");
    let only_a = db
        .create_run(exp, &new_run("only-a", Some("diffusion"), 1, &params))
        .expect("run");
    // the same configuration again: still version 1
    assert_eq!(
        db.experiment_version(exp, "config-a", "a = 1").expect("v1"),
        1
    );
    assert_eq!(
        db.experiment_version(exp, "config-b", "a = 2").expect("v2"),
        2
    );
    assert_eq!(
        db.create_run(exp, &new_run("shared", Some("diffusion"), 0, &params))
            .expect("run"),
        shared
    );
    let only_b = db
        .create_run(exp, &new_run("only-b", Some("diffusion"), 2, &params))
        .expect("run");
    for run in [shared, only_a, only_b] {
        db.insert_eval(&NewEval {
            run_id: run,
            step: 10,
            metric: "fid",
            value: run as f64,
            sample_count: 10,
            feature_net: "f",
            settings: &json!({}),
        })
        .expect("eval");
        db.insert_metrics(run, &[point("train/loss", 1, run as f64)])
            .expect("metrics");
    }
    let ids = |v: Option<i64>| -> Vec<i64> {
        db.list_version_runs("e", v)
            .expect("runs")
            .iter()
            .map(|r| r.id)
            .collect()
    };
    assert_eq!(ids(None), vec![shared, only_b], "the latest version");
    assert_eq!(ids(Some(1)), vec![shared, only_a]);
    assert_eq!(db.list_runs(Some("e")).expect("runs").len(), 2);
    let evals: Vec<i64> = db
        .evals_for_version("e", Some(1))
        .expect("evals")
        .iter()
        .map(|e| e.run_id)
        .collect();
    assert_eq!(
        evals,
        vec![shared, only_a],
        "each run once, version 1's only"
    );
    let losses = db
        .metrics_for_version("e", None, "train/loss")
        .expect("metrics");
    assert_eq!(
        losses.iter().map(|m| m.run_id).collect::<Vec<_>>(),
        vec![shared, only_b]
    );
    let e = db
        .list_version_runs("e", Some(3))
        .expect_err("no version 3")
        .to_string();
    assert!(e.contains("version 3") && e.contains("1 to 2"), "{e}");
    let listed = db.list_experiments().expect("list");
    assert_eq!((listed[0].version, listed[0].runs), (2, 2));
    let versions = db.experiment_versions("e").expect("versions");
    assert_eq!(
        versions.iter().map(|v| (v.0, v.2)).collect::<Vec<_>>(),
        vec![(1, 2), (2, 2)]
    );
}

/// A database path that cannot be written is named with the reason and what to do, instead of
/// SQLite's bare "unable to open database file". (Root writes through chmod 444, so the test uses
/// a path that is a folder; `chattr +i` on a root gives the same message, "Operation not
/// permitted".)
#[test]
fn an_unwritable_database_is_named_with_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ablate.sqlite");
    std::fs::create_dir(&path).expect("a folder where the file should be");
    let Err(err) = Db::open(&path) else {
        panic!("a folder opened as a database")
    };
    let text = err.to_string();
    assert!(matches!(err, Error::Unwritable { .. }), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("cannot be written"), "{text}");
    assert!(text.contains("writable"), "{text}");
}

/// `copy_into` moves a SQLite history to Postgres with its ids, and new rows continue after them;
/// a database that already holds experiments is refused.
#[test]
fn a_sqlite_history_copies_into_postgres() {
    let (_dir, _path, sqlite) = temp_db();
    let e = sqlite
        .upsert_experiment("e", "e.toml", "a = 1")
        .expect("exp");
    sqlite
        .experiment_version(e, "c1", "a = 1")
        .expect("version");
    let params = json!({"lr": 0.1});
    let runs: Vec<i64> = (0..3)
        .map(|s| {
            sqlite
                .create_run(e, &new_run(&format!("h{s}"), Some("diffusion"), s, &params))
                .expect("run")
        })
        .collect();
    sqlite
        .start_run(runs[0], 7, "hostA", "cpu", None, true)
        .expect("start");
    sqlite.finish_run(runs[0]).expect("finish");
    let points: Vec<MetricPoint> = (0..450)
        .map(|s| point("loss", s, 1.0 / (s + 1) as f64))
        .collect();
    sqlite.insert_metrics(runs[0], &points).expect("metrics");
    sqlite
        .insert_metrics(runs[1], &[point("loss", 0, f64::NAN)])
        .expect("nan");
    let settings = json!({"cfg": 1.0});
    sqlite
        .insert_eval(&NewEval {
            run_id: runs[0],
            step: 450,
            metric: "fid",
            value: 12.5,
            sample_count: 64,
            feature_net: "classifier",
            settings: &settings,
        })
        .expect("eval");
    sqlite
        .insert_artifact(runs[0], "samples", "artifacts/h0/s.png", "ab", 10)
        .expect("artifact");
    sqlite
        .pin_baseline("e", "main", &json!({"fid": 12.5}))
        .expect("baseline");

    let cluster = crate::testing::TempPostgres::start().expect("a throwaway PostgreSQL cluster");
    let url = cluster.create_database().expect("a database");
    let root = tempfile::tempdir().expect("temp dir");
    let pg = Db::open_postgres(&url, root.path()).expect("open");
    let counts = sqlite.copy_into(&pg).expect("copy");
    let count = |t: &str| counts.iter().find(|(name, _)| *name == t).map(|(_, n)| *n);
    assert_eq!(count("runs"), Some(3));
    assert_eq!(count("metrics"), Some(451));

    let summary = |db: &Db| {
        let experiments: Vec<_> = db
            .list_experiments()
            .expect("list")
            .into_iter()
            .map(|x| (x.id, x.name, x.created_at, x.version, x.runs, x.finished))
            .collect();
        let runs: Vec<_> = db
            .list_runs(Some("e"))
            .expect("runs")
            .into_iter()
            .map(|r| {
                (
                    r.id,
                    r.hash,
                    r.status,
                    r.params,
                    r.git_dirty,
                    r.pid,
                    r.ended_at,
                )
            })
            .collect();
        let metrics: Vec<_> = db
            .metrics_for_experiment("e", "loss")
            .expect("metrics")
            .into_iter()
            .map(|m| (m.run_id, m.step, m.value.to_bits(), m.wall_time.to_bits()))
            .collect();
        let evals: Vec<_> = db
            .evals_for_experiment("e")
            .expect("evals")
            .into_iter()
            .map(|v| {
                (
                    v.run_id,
                    v.metric,
                    v.value.to_bits(),
                    v.settings,
                    v.position,
                )
            })
            .collect();
        (
            experiments,
            runs,
            metrics,
            evals,
            db.artifacts(runs_of(db)[0]).expect("artifacts").len(),
            db.baseline("e", "main").expect("baseline"),
        )
    };
    fn runs_of(db: &Db) -> Vec<i64> {
        db.list_runs(Some("e"))
            .expect("runs")
            .iter()
            .map(|r| r.id)
            .collect()
    }
    assert_eq!(summary(&sqlite), summary(&pg));
    let next = pg
        .create_run(e, &new_run("h9", None, 9, &params))
        .expect("new run");
    assert!(
        next > *runs.iter().max().expect("runs"),
        "ids continue after the copied ones"
    );
    assert!(matches!(sqlite.copy_into(&pg), Err(Error::Invalid(_))));
}

/// A database opened read-only reads everything and refuses every write, and leaves no file
/// beside it (no -wal, no -shm).
#[test]
fn a_read_only_database_reads_and_refuses_writes() {
    let (dir, path, db) = temp_db();
    let e = db.upsert_experiment("e", "e.toml", "a = 1").expect("exp");
    let params = json!({});
    let run = db
        .create_run(e, &new_run("h", None, 0, &params))
        .expect("run");
    db.insert_metrics(run, &[point("loss", 1, 0.5)])
        .expect("metrics");
    drop(db);
    let before: Vec<_> = std::fs::read_dir(path.parent().expect("folder"))
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    let ro = Db::open_read_only(&path).expect("open read-only");
    assert!(ro.location().ends_with("(read-only)"), "{}", ro.location());
    assert_eq!(ro.list_runs(Some("e")).expect("runs").len(), 1);
    assert_eq!(ro.metrics(run, None).expect("metrics").len(), 1);
    assert!(
        ro.upsert_experiment("f", "f.toml", "").is_err(),
        "writes are refused"
    );
    drop(ro);
    let after: Vec<_> = std::fs::read_dir(path.parent().expect("folder"))
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(before, after, "nothing written beside the database");
    assert!(matches!(
        Db::open_read_only(&dir.path().join("absent.sqlite")),
        Err(Error::NotFound(_))
    ));
}

/// A process that planned version 1 links its runs to version 1 even after another process made
/// version 2 (two configurations under one name, run at once).
#[test]
fn runs_link_to_the_version_their_process_planned() {
    let (_dir, _path, db) = temp_db();
    let e = db.upsert_experiment("e", "e.toml", "a = 1").expect("exp");
    assert_eq!(db.experiment_version(e, "c1", "a = 1").expect("v1"), 1);
    assert_eq!(db.experiment_version(e, "c2", "a = 2").expect("v2"), 2);
    let params = json!({});
    let late = db
        .create_run_in(e, Some(1), &new_run("late-v1", None, 0, &params))
        .expect("run");
    let latest = db
        .create_run(e, &new_run("v2", None, 0, &params))
        .expect("run");
    let ids = |v| -> Vec<i64> {
        db.list_version_runs("e", Some(v))
            .expect("runs")
            .iter()
            .map(|r| r.id)
            .collect()
    };
    assert_eq!(ids(1), vec![late]);
    assert_eq!(ids(2), vec![latest]);
}

/// `integrity_check` is empty for a sound file and names the damage in one whose last pages
/// were overwritten.
#[test]
fn integrity_check_finds_damaged_pages() {
    let (_dir, path, db) = temp_db();
    let e = db.upsert_experiment("e", "e.toml", "a = 1").expect("exp");
    let params = json!({});
    let run = db
        .create_run(e, &new_run("h", None, 0, &params))
        .expect("run");
    let points: Vec<_> = (0..4000).map(|i| point("loss", i, 0.5)).collect();
    db.insert_metrics(run, &points).expect("metrics");
    assert_eq!(db.integrity_check().expect("check"), Vec::<String>::new());
    drop(db);

    // overwrite the second half of the last pages (the metric rows written last)
    let mut bytes = std::fs::read(&path).expect("read");
    assert!(bytes.len() > 8 * 4096, "{} bytes", bytes.len());
    for page in (bytes.len() - 3 * 4096..bytes.len()).step_by(4096) {
        bytes[page + 2048..page + 4096].fill(0xA5);
    }
    std::fs::write(&path, bytes).expect("write");
    let db = Db::open_existing(&path).expect("open");
    let problems = db.integrity_check().expect("check");
    assert!(
        problems.iter().any(|p| p.starts_with("Tree ")),
        "{problems:?}"
    );
}
