//! Compiles the fused ops' CUDA kernels (src/fused/kernels.cu) to PTX in OUT_DIR/fused.ptx, only
//! with the `cuda` feature: `nvcc --ptx -arch=sm_${CUDA_COMPUTE_CAP:-90}`, as candle-kernels does
//! (90 for H100/H200). Without the feature this does nothing, so builds need no CUDA toolchain.
use std::path::PathBuf;
use std::process::Command;

const KERNELS: &str = "src/fused/kernels.cu";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={KERNELS}");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    // "90" or "9.0"
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_else(|_| "90".to_string())
        .replace('.', "");
    if cap.is_empty() || !cap.chars().all(|c| c.is_ascii_digit()) {
        panic!("CUDA_COMPUTE_CAP must be a compute capability such as 90, got {cap:?}");
    }
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("fused.ptx");
    let output = Command::new(&nvcc)
        .args(["--ptx", "-O3"])
        .arg(format!("-arch=sm_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg(KERNELS)
        .output();
    match output {
        Ok(o) if o.status.success() => {
            // nvcc warnings would otherwise stay hidden in the build script's output
            for line in String::from_utf8_lossy(&o.stderr).lines() {
                if !line.trim().is_empty() {
                    println!("cargo:warning=nvcc: {line}");
                }
            }
        }
        Ok(o) => panic!(
            "`{nvcc} --ptx -arch=sm_{cap} {KERNELS}` failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "the `cuda` feature needs nvcc to compile {KERNELS}, but running `{nvcc}` failed: {e}. \
             Put a CUDA toolkit's nvcc on PATH (or set NVCC), e.g. \
             `eval \"$(scripts/cuda-toolchain.sh)\"`, or build without `--features cuda`."
        ),
    }
}
