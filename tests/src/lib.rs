//! Helpers for ablate's end-to-end tests: find (or build) the real `ablate` binary and run it.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root (this crate lives in `ROOT/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
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

/// Run `ablate --root ROOT ARGS…` from the workspace root.
pub fn ablate(root: &Path, args: &[&str]) -> Output {
    Command::new(ablate_bin())
        .current_dir(workspace_root())
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("run ablate")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
