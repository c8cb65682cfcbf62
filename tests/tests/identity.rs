//! A run's identity covers its data's content: the same spec over changed files is a new run,
//! and data that cannot be read is an error naming the folder, never a run skipped as finished.
use ablate_tests::{ablate, runs_done_here, stderr};
use db::{RunKind, RunStatus};

/// `n` 8×8 PNGs per class in `dir/class-K/`, inverted when `invert` is set.
fn write_classes(dir: &std::path::Path, classes: u32, n: u32, invert: bool) {
    for c in 0..classes {
        let sub = dir.join(format!("class-{c}"));
        std::fs::create_dir_all(&sub).expect("class folder");
        for i in 0..n {
            let img = image::RgbImage::from_fn(8, 8, |x, y| {
                let v = ((x * 29 + y * 13 + i * 7 + c * 71) % 200) as u8 + 20 * c as u8;
                let v = if invert { 255 - v } else { v };
                image::Rgb([v, v / 2, 255 - v])
            });
            img.save(sub.join(format!("{i:03}.png"))).expect("png");
        }
    }
}

#[test]
fn changed_data_under_the_same_path_is_run_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, data) = (dir.path().join("runs"), dir.path().join("digits"));
    write_classes(&data, 3, 30, false);
    let path = format!("data.path=\"{}\"", data.display());
    let args = [
        "run",
        "experiments/tiny.toml",
        "--set",
        "data.source=\"image-folder\"",
        "--set",
        &path,
        "--set",
        "data.train=60",
        "--set",
        "data.test=30",
        "--set",
        "grid={}",
    ];
    let run = || {
        let out = ablate(&root, &args);
        (out.status.success(), (), stderr(&out))
    };

    // the summary ("N run(s): …") goes to stderr with the progress
    let (ok, _, err) = run();
    assert!(ok, "first run:\n{err}");
    assert_eq!(runs_done_here(&err, 2), 2, "both arms trained:\n{err}");
    let (ok, _, err) = run();
    assert!(ok, "{err}");
    assert_eq!(runs_done_here(&err, 2), 0, "unchanged data: skipped");

    // the same path, other pixels
    write_classes(&data, 3, 30, true);
    let (ok, _, err) = run();
    assert!(ok, "{err}");
    assert_eq!(
        runs_done_here(&err, 2),
        2,
        "inverted images are new data, not finished runs:\n{err}"
    );
    let db = db::Db::open_existing(&root.join("ablate.sqlite")).expect("database");
    let generators: Vec<_> = db
        .list_runs(None)
        .expect("runs")
        .into_iter()
        .filter(|r| r.kind == RunKind::Generator)
        .collect();
    assert_eq!(generators.len(), 4, "two runs per version of the data");
    let hashes: std::collections::HashSet<_> = generators.iter().map(|r| &r.hash).collect();
    assert_eq!(hashes.len(), 4, "each run has its own identity");
    // changed data is a new version of the experiment: its report shows the new runs alone
    let latest = db.list_runs(Some("tiny")).expect("runs");
    assert_eq!(
        latest
            .iter()
            .filter(|r| r.kind == RunKind::Generator)
            .count(),
        2
    );

    // unreadable data fails with the folder named, and marks nothing finished
    std::fs::remove_dir_all(&data).expect("remove the data");
    let (ok, _, err) = run();
    assert!(!ok, "a run over missing data must fail");
    assert!(
        err.contains(&data.display().to_string()),
        "names the folder:\n{err}"
    );
    let finished = db
        .list_runs(None)
        .expect("runs")
        .into_iter()
        .filter(|r| r.kind == RunKind::Generator && r.status == RunStatus::Finished)
        .count();
    assert_eq!(finished, 4, "no run was added or marked finished");
}
