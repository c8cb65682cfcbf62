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
