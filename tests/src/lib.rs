//! Helpers for ablate's end-to-end tests: find (or build) the real `ablate` binary and run it.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root (this crate lives in `ROOT/tests`). Read from the environment `cargo test`
/// gives the test process first: the path compiled into this library can be another clone's when
/// clones share a target folder (cargo reuses the library across them), and the binary built there
/// would be that clone's code.
pub fn workspace_root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest
        .parent()
        .expect("tests crate has a parent folder")
        .to_path_buf()
}

/// Path to the `ablate` binary of the profile these tests were built with, built on first use.
pub fn ablate_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/<test-binary>
        let exe = std::env::current_exe().expect("current exe");
        let profile_dir = exe
            .parent()
            .and_then(|p| p.parent())
            .expect("test binary lives in target/<profile>/deps")
            .to_path_buf();
        let release = profile_dir
            .file_name()
            .map(|n| n == "release")
            .unwrap_or(false);
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root())
            .args(["build", "-p", "harness", "--bin", "ablate"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the ablate binary");
        assert!(status.success(), "building the ablate binary failed");
        let bin = profile_dir.join("ablate");
        assert!(bin.exists(), "no binary at {}", bin.display());
        bin
    })
}

/// The command `ablate --root ROOT ARGS…`, run from the workspace root.
fn command(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(ablate_bin());
    cmd.current_dir(workspace_root())
        .arg("--root")
        .arg(root)
        .args(args);
    cmd
}

/// Run `ablate --root ROOT ARGS…` from the workspace root.
pub fn ablate(root: &Path, args: &[&str]) -> Output {
    command(root, args).output().expect("run ablate")
}

/// Start `ablate --root ROOT ARGS…` in the background with its output captured
/// (`wait_with_output` to collect it).
pub fn spawn_ablate(root: &Path, args: &[&str]) -> std::process::Child {
    command(root, args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ablate")
}

/// How many runs a process ran itself, from its "N run(s): N finished (K earlier), …" line
/// (K were finished before it reached them, e.g. by another process); panics unless all `total`
/// finished.
pub fn runs_done_here(text: &str, total: usize) -> usize {
    let head = format!("{total} run(s): {total} finished (");
    let summary = text
        .lines()
        .find(|l| l.starts_with(&head))
        .unwrap_or_else(|| panic!("no summary of {total} finished runs:\n{text}"));
    let earlier: usize = summary[head.len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    total - earlier
}

/// The largest |a − b| over two tensors of one shape (any float dtype), as f32.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_dtype(candle_core::DType::F32))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("difference")
}

/// The generator runs (no tokenizer or feature-net runs) of `experiment`.
pub fn generator_runs(db: &db::Db, experiment: &str) -> Vec<db::RunRow> {
    db.list_runs(Some(experiment))
        .expect("runs")
        .into_iter()
        .filter(|r| r.kind == db::RunKind::Generator)
        .collect()
}

/// The steps at which `key` was logged for run `run_id`, in order.
pub fn logged_steps(db: &db::Db, run_id: i64, key: &str) -> Vec<i64> {
    db.metrics(run_id, Some(key))
        .expect("metrics")
        .into_iter()
        .map(|m| m.step)
        .collect()
}

/// The step recorded in a `checkpoint.json`, once the file exists and is readable.
pub fn checkpoint_step(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["step"].as_u64()
}

/// Start `ablate --root ROOT ARGS…`, SIGKILL it as soon as `probe` sees a checkpoint (waiting at
/// most `limit`), and return the checkpoint step seen.
pub fn kill_at_checkpoint(
    root: &Path,
    args: &[&str],
    probe: impl Fn() -> Option<u64>,
    limit: std::time::Duration,
) -> u64 {
    let mut child = command(root, args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn ablate");
    let started = std::time::Instant::now();
    let mut seen = None;
    while seen.is_none() && started.elapsed() < limit {
        seen = probe();
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    seen.unwrap_or_else(|| panic!("no checkpoint appeared within {limit:?}"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The test data folder (MNIST digits in `mnist-10k/`): `ABLATE_DATA_DIR`, else `../shared/data`
/// from the project root, else the copy committed in `tests/fixtures/data`.
pub fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ABLATE_DATA_DIR") {
        return PathBuf::from(d);
    }
    let shared = workspace_root().join("../shared/data");
    if shared.join("mnist-10k").is_dir() {
        return shared;
    }
    workspace_root().join("tests/fixtures/data")
}

/// The parity fixture folder: `ABLATE_PARITY_DIR`, else `../shared/parity` from the project root,
/// else the copy committed in `tests/fixtures/parity` (the fixtures the tests use today).
/// Returns None (the caller skips) when it is missing outside CI; under CI a missing folder fails.
pub fn parity_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("ABLATE_PARITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let shared = workspace_root().join("../shared/parity");
            if shared.join("manifest.json").exists() {
                shared
            } else {
                workspace_root().join("tests/fixtures/parity")
            }
        });
    if dir.join("manifest.json").exists() {
        return Some(dir);
    }
    let msg = format!(
        "parity fixtures not found at {} (set ABLATE_PARITY_DIR to a folder with manifest.json)",
        dir.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("skipped: {msg}");
    None
}

/// (atol, rtol) parsed from a manifest tolerance text such as "atol 1e-5, rtol 1e-4" or "abs 1e-12".
pub fn tolerance(text: &str) -> (f64, f64) {
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .filter(|w| !w.is_empty())
        .collect();
    let mut atol = 0.0;
    let mut rtol = 0.0;
    for pair in words.windows(2) {
        if let Ok(v) = pair[1].parse::<f64>() {
            match pair[0] {
                "atol" | "abs" => atol = v,
                "rtol" => rtol = v,
                _ => {}
            }
        }
    }
    (atol, rtol)
}

/// Largest violation of |ours − theirs| ≤ atol + rtol·|theirs| (≤ 0 means within tolerance),
/// with the index where it happens.
pub fn worst_violation(ours: &[f64], theirs: &[f64], atol: f64, rtol: f64) -> (f64, usize) {
    assert_eq!(ours.len(), theirs.len(), "length mismatch");
    let mut worst = (f64::NEG_INFINITY, 0);
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let v = (a - b).abs() - (atol + rtol * b.abs());
        let v = if v.is_nan() { f64::INFINITY } else { v };
        if v > worst.0 {
            worst = (v, i);
        }
    }
    worst
}

/// A gradient fixture's tolerance: (a, r) from "max|ours - ref| <= a * max(1, max|ref|) ;
/// relative L2 error per tensor <= r", the two numbers that follow the two `<=`.
pub fn gradient_tolerance(text: &str) -> (f64, f64) {
    let bounds: Vec<f64> = text
        .split("<=")
        .skip(1)
        .filter_map(|part| {
            part.split(|c: char| c.is_whitespace() || c == '*' || c == ';')
                .find(|w| !w.is_empty())
                .and_then(|w| w.parse::<f64>().ok())
        })
        .collect();
    match bounds[..] {
        [a, r, ..] => (a, r),
        _ => panic!("gradient tolerance: expected two '<= NUMBER' bounds in '{text}'"),
    }
}

/// Check one gradient tensor against the reference's: max|ours − ref| ≤ a·max(1, max|ref|) and
/// ‖ours − ref‖₂ ≤ r·‖ref‖₂ (for an all-zero reference, only the first). Returns the relative
/// L2 error, for reporting.
pub fn check_gradient(name: &str, ours: &[f64], theirs: &[f64], (a, r): (f64, f64)) -> f64 {
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{name}: {} vs {} values",
        ours.len(),
        theirs.len()
    );
    let max_ref = theirs.iter().fold(0f64, |m, v| m.max(v.abs()));
    let (mut max_diff, mut diff2, mut ref2) = (0f64, 0f64, 0f64);
    for (o, t) in ours.iter().zip(theirs) {
        let d = o - t;
        max_diff = if d.is_nan() {
            f64::INFINITY
        } else {
            max_diff.max(d.abs())
        };
        diff2 += d * d;
        ref2 += t * t;
    }
    let bound = a * max_ref.max(1.0);
    assert!(
        max_diff <= bound,
        "{name}: max |ours - ref| = {max_diff:e} > {bound:e}"
    );
    let rel = if ref2 > 0.0 {
        (diff2 / ref2).sqrt()
    } else {
        0.0
    };
    assert!(rel <= r, "{name}: relative L2 error {rel:e} > {r:e}");
    rel
}
