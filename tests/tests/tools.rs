//! `ablate selftest` and `ablate bench`: their JSON lines and their refusals.
use ablate_tests::{ablate, stderr, stdout};

/// `ablate selftest`: one JSON object per check on stdout, a summary on stderr, exit 0 when every
/// check passes; a device this build cannot use is refused with the reason.
#[test]
fn selftest_prints_one_check_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = ablate(dir.path(), &["selftest", "--device", "cpu"]);
    assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    let checks: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(checks.len(), 60, "5 variants × 2 precisions × 5 + 6 + 4");
    for c in &checks {
        assert_eq!(c["pass"], true, "{c}");
        assert_eq!(c["device"], "cpu", "{c}");
        assert!(c["rel_err"]
            .as_f64()
            .is_some_and(|e| e <= c["tol"].as_f64().unwrap_or(-1.0)));
    }
    for name in [
        "mar-diffusion/bf16/grads",
        "ar-ce/f32/sample",
        "tokenizer-vq/codes",
        "inception/pool3",
    ] {
        assert!(checks.iter().any(|c| c["check"] == name), "missing {name}");
    }
    assert!(
        stderr(&out).contains("all 60 checks passed on cpu"),
        "{}",
        stderr(&out)
    );

    let bad = ablate(dir.path(), &["selftest", "--device", "gpu"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("expected 'cpu' or 'cuda:N'"),
        "{}",
        stderr(&bad)
    );
    // without a GPU (or without `--features cuda`) the error says which device and why
    let cuda = ablate(dir.path(), &["selftest", "--device", "cuda:0"]);
    if !cuda.status.success() {
        assert!(
            stderr(&cuda).contains("device 'cuda:0'"),
            "{}",
            stderr(&cuda)
        );
    }
}

/// `ablate bench`: one JSON object per workload with the keys the issue names, positive timings;
/// `--list` names the workloads; unknown workloads and precisions are refused with what is allowed.
#[test]
fn bench_prints_one_json_line_per_workload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = ablate(
        dir.path(),
        &["bench", "--workload", "ar-tiny-ce", "--steps", "1"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 1);
    let b = &lines[0];
    assert_eq!(b["workload"], "ar-tiny-ce");
    assert_eq!(b["device"], "cpu");
    assert_eq!(b["precision"], "f32");
    assert_eq!(b["train_steps_timed"], 1);
    for key in [
        "params",
        "train_step_s",
        "train_images_per_s",
        "sample_images_per_s",
        "peak_rss_bytes",
        "threads",
        "cpus_available",
    ] {
        let v = b[key].as_f64().unwrap_or(-1.0);
        assert!(v > 0.0, "{key} = {} in {b}", b[key]);
    }
    let per_s = b["train_images_per_s"].as_f64().unwrap_or(0.0);
    let step = b["train_step_s"].as_f64().unwrap_or(0.0);
    assert!((per_s * step - 64.0).abs() < 1e-6, "batch 64: {b}");

    let list = ablate(dir.path(), &["bench", "--list"]);
    for name in [
        "mar-tiny",
        "mar-tiny-ce",
        "ar-tiny",
        "ar-tiny-ce",
        "mar-base",
        "fid-10k",
    ] {
        assert!(stdout(&list).contains(name), "{}", stdout(&list));
    }
    let bad = ablate(dir.path(), &["bench", "--workload", "mar-huge"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("unknown workload 'mar-huge'; known: mar-tiny"),
        "{}",
        stderr(&bad)
    );
    let bad = ablate(dir.path(), &["bench", "--precision", "fp16"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("expected one of f32, bf16; found 'fp16'"),
        "{}",
        stderr(&bad)
    );
}
