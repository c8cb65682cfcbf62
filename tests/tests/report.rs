//! `ablate report` rebuilt away from where the runs were made: artifacts are found by the paths
//! the database holds, whatever folder either command started in.
use std::process::Command;

use ablate_tests::{ablate_bin, stderr, workspace_root};

#[test]
fn a_report_rebuilt_from_another_folder_or_a_moved_root_embeds_the_sample_grids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let project = dir.path().join("project");
    std::fs::create_dir_all(&project).expect("project folder");
    let spec = workspace_root().join("experiments/tiny.toml");
    let spec = spec.to_str().expect("utf-8");

    // runs made inside the project with a relative root
    let out = Command::new(ablate_bin())
        .current_dir(&project)
        .args([
            "--root",
            "runs",
            "run",
            spec,
            "--set",
            "grid={}",
            "--no-report",
        ])
        .output()
        .expect("run ablate");
    assert!(out.status.success(), "{}", stderr(&out));

    // the report rebuilt from the parent folder, the root named absolutely
    let root = project.join("runs");
    let out = Command::new(ablate_bin())
        .current_dir(dir.path())
        .arg("--root")
        .arg(&root)
        .args(["report", "tiny", "--format", "html"])
        .output()
        .expect("report");
    assert!(out.status.success(), "{}", stderr(&out));
    let html = std::fs::read_to_string(root.join("reports/tiny/report.html")).expect("report.html");
    let grids = html.matches("alt=\"samples ").count();
    assert_eq!(grids, 2, "both runs' sample grids are embedded");

    // a moved root still finds its artifacts (they are stored relative to it)
    let moved = dir.path().join("moved");
    std::fs::rename(&root, &moved).expect("move the root");
    let out = Command::new(ablate_bin())
        .current_dir(dir.path())
        .arg("--root")
        .arg(&moved)
        .args(["report", "tiny", "--format", "html"])
        .output()
        .expect("report");
    assert!(out.status.success(), "{}", stderr(&out));
    let html =
        std::fs::read_to_string(moved.join("reports/tiny/report.html")).expect("report.html");
    assert_eq!(html.matches("alt=\"samples ").count(), 2, "after the move");
}

/// One experiment name run with two configurations (train.steps 6, then 20) becomes two
/// versions: the report shows the latest one's runs alone (the tokenizer table no longer averages
/// both configurations as seeds), `--version 1` the first, and `ablate list` the versions.
#[test]
fn a_changed_configuration_is_a_new_version_and_reports_never_mix_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let run = |args: &[&str]| {
        let out = Command::new(ablate_bin())
            .current_dir(workspace_root())
            .arg("--root")
            .arg(root)
            .args(args)
            .output()
            .expect("run ablate");
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        (
            String::from_utf8_lossy(&out.stdout).to_string(),
            stderr(&out),
        )
    };
    let tiny = ["run", "experiments/tiny.toml", "--no-report", "--set"];
    run(&[&tiny[..], &["train.steps=6"]].concat());
    let (_, err) = run(&[&tiny[..], &["train.steps=20"]].concat());
    assert!(err.contains("experiment 'tiny': version 2"), "{err}");
    // the same configuration again is the same version
    let (_, err) = run(&[&tiny[..], &["train.steps=20"]].concat());
    assert!(!err.contains("version 3"), "{err}");

    let (md, _) = run(&["report", "tiny", "--format", "md"]);
    assert!(md.contains("Version 2 of 2 of this experiment"), "{md}");
    let line = md
        .lines()
        .find(|l| l.starts_with("| patch | patch |"))
        .unwrap_or_else(|| panic!("tokenizer row: {md}"));
    // one seed: n=1 per configuration (mixing the two versions made it n=2)
    assert!(line.contains("(n=1)") && !line.contains("(n=2)"), "{line}");
    let (md1, _) = run(&["report", "tiny", "--format", "md", "--version", "1"]);
    assert!(md1.contains("Version 1 of 2 of this experiment"), "{md1}");
    assert_ne!(md, md1, "the versions' tables differ");

    let (list, _) = run(&["list"]);
    let row = list
        .lines()
        .find(|l| l.contains(" tiny "))
        .expect("tiny listed");
    assert!(
        row.split_whitespace().nth(2) == Some("2"),
        "version column: {list}"
    );
    let (runs, _) = run(&["list", "tiny"]);
    assert!(
        runs.contains("version 1: ") && runs.contains("version 2: "),
        "{runs}"
    );

    let out = Command::new(ablate_bin())
        .current_dir(workspace_root())
        .arg("--root")
        .arg(root)
        .args(["report", "tiny", "--version", "3"])
        .output()
        .expect("run ablate");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("version 3 of experiment 'tiny'"),
        "{}",
        stderr(&out)
    );
}

/// A root this user cannot write (a teammate's results): `list` and `report --out` read its
/// database read-only, `report` without `--out` says where to write instead, and `run` says the
/// database cannot be written. Needs another user: runs as root (CI), switching to `nobody`.
#[test]
fn a_root_this_user_cannot_write_is_read_read_only() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root_user = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let runuser = Command::new("runuser").arg("--help").output().is_ok();
    if !(root_user && runuser) {
        eprintln!("skipped: needs root and runuser to act as another user");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // the binary where `nobody` can run it, and a root it can read but not write
    let bin = dir.path().join("ablate");
    std::fs::copy(ablate_bin(), &bin).expect("copy the binary");
    let root = dir.path().join("root");
    let spec = workspace_root().join("experiments/tiny.toml");
    let made = Command::new(&bin)
        .args(["--root", root.to_str().expect("utf-8"), "run"])
        .arg(&spec)
        .arg("-q")
        .output()
        .expect("run");
    assert!(made.status.success(), "{}", stderr(&made));
    let out = dir.path().join("out");
    std::fs::create_dir(&out).expect("out folder");
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    for entry in walk(&root) {
        let mode = if entry.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let as_nobody = |args: &[&str]| {
        Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(&bin)
            .args(["--root", root.to_str().expect("utf-8")])
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("runuser")
    };
    let listed = as_nobody(&["list", "tiny"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(
        stderr(&listed).contains("opened read-only"),
        "{}",
        stderr(&listed)
    );
    let report = out.join("report");
    let written = as_nobody(&["report", "tiny", "--out", report.to_str().expect("utf-8")]);
    assert!(written.status.success(), "{}", stderr(&written));
    assert!(report.join("report.md").is_file());
    let refused = as_nobody(&["report", "tiny"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("--out DIR"),
        "{}",
        stderr(&refused)
    );
    let run = as_nobody(&["run", spec.to_str().expect("utf-8")]);
    assert!(!run.status.success());
    assert!(
        stderr(&run).contains("cannot be written"),
        "{}",
        stderr(&run)
    );
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .expect("root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("-wal") || n.ends_with("-shm"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "nothing written beside the database: {leftovers:?}"
    );
}

/// Every folder and file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for entry in std::fs::read_dir(dir).expect("folder").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
