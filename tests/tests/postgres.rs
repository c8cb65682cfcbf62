//! The tracking database on a real PostgreSQL server (a throwaway cluster started by the test):
//! two `ablate run` processes share one spec through it, the report and listings read it, and
//! `ablate db copy` moves its history to a SQLite file and from there to a second server database.
//! PostgreSQL's server programs must be installed (`.ci/run` installs them); the test fails,
//! rather than skips, without them.
use ablate_tests::{ablate, spawn_ablate, stderr, stdout};
use db::testing::TempPostgres;
use db::Db;
use db::RunStatus;

#[test]
fn two_processes_share_one_spec_through_postgres_and_db_copy_moves_the_history() {
    let cluster = TempPostgres::start().expect("a throwaway PostgreSQL cluster");
    eprintln!("server: {}", cluster.version());
    let url = cluster.create_database().expect("a database");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("shared-root");
    let args = [
        "--db",
        url.as_str(),
        "run",
        "experiments/tiny.toml",
        "--set",
        "train.steps=100",
    ];
    let (a, b) = (spawn_ablate(&root, &args), spawn_ablate(&root, &args));
    let outs = [
        a.wait_with_output().expect("first process"),
        b.wait_with_output().expect("second process"),
    ];
    let mut executed = 0;
    for out in &outs {
        let err = stderr(out);
        assert!(out.status.success(), "stderr:\n{err}");
        executed += ablate_tests::runs_done_here(&err, 4);
        assert!(
            stdout(out).contains(&format!("database: {url}")),
            "{}",
            stdout(out)
        );
    }
    assert_eq!(executed, 4, "each run executed once across both processes");
    assert!(
        !root.join("ablate.sqlite").exists(),
        "no SQLite file beside a server database"
    );
    assert!(
        !root.join("locks").exists(),
        "the locks are the server's, not files under the root"
    );

    let db = Db::open_postgres(&url, &root).expect("open");
    let runs = db.list_runs(Some("tiny")).expect("runs");
    let generators = ablate_tests::generator_runs(&db, "tiny");
    assert_eq!(generators.len(), 4);
    for r in &runs {
        assert_eq!(r.status, RunStatus::Finished, "{}: {:?}", r.name, r.error);
    }
    for r in &generators {
        let fids = db.evals_for_run(r.id).expect("evals");
        assert_eq!(
            fids.iter().filter(|e| e.metric == "fid").count(),
            1,
            "{}",
            r.name
        );
        let steps = ablate_tests::logged_steps(&db, r.id, "train/loss");
        assert_eq!(
            steps,
            (1..=50).map(|i| i * 2).collect::<Vec<i64>>(),
            "{}",
            r.name
        );
    }

    // the report and the listing read the server
    let report = ablate(&root, &["--db", &url, "report", "tiny"]);
    assert!(report.status.success(), "{}", stderr(&report));
    assert!(
        stdout(&report).contains("| AR | raster | causal | 1 |"),
        "{}",
        stdout(&report)
    );
    let listed = ablate(&root, &["--db", &url, "list", "tiny"]);
    assert!(listed.status.success(), "{}", stderr(&listed));

    // Postgres → a SQLite file → a second Postgres database: the same listing each time
    let file = root.join("ablate.sqlite");
    let file = file.to_str().expect("utf-8 path");
    let copied = ablate(&root, &["db", "copy", &url, file]);
    assert!(copied.status.success(), "{}", stderr(&copied));
    assert!(stdout(&copied).contains("runs"), "{}", stdout(&copied));
    let from_file = ablate(&root, &["list", "tiny"]);
    assert!(from_file.status.success(), "{}", stderr(&from_file));
    assert_eq!(stdout(&from_file), stdout(&listed));
    let second = cluster.create_database().expect("a second database");
    let back = ablate(&root, &["db", "copy", file, &second]);
    assert!(back.status.success(), "{}", stderr(&back));
    let from_second = ablate(&root, &["--db", &second, "list", "tiny"]);
    assert_eq!(stdout(&from_second), stdout(&listed));
    // into a database that already has a history: refused, and it is left as it was
    let again = ablate(&root, &["db", "copy", file, &second]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("copy into an empty database"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        stdout(&ablate(&root, &["--db", &second, "list", "tiny"])),
        stdout(&listed)
    );

    // a server that does not answer is named with what to check
    let down = ablate(
        &root,
        &["--db", "postgres://me:secret@127.0.0.1:1/ablate", "list"],
    );
    assert!(!down.status.success());
    assert!(
        stderr(&down).contains("me:***@127.0.0.1:1"),
        "{}",
        stderr(&down)
    );
    assert!(!stderr(&down).contains("secret"), "{}", stderr(&down));
}
