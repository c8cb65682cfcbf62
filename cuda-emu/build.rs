//! Compiles the fused ops' CUDA kernels (models/src/fused/kernels.cu) as C++ for the CPU, with
//! src/emu.h standing in for CUDA (see there) and src/emu.cpp as the launcher, into a static
//! library. The kernels' names are read from kernels.cu, so every `__global__` function can be
//! launched by name without a list to keep up to date.
use std::path::{Path, PathBuf};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fused = root.join("../models/src/fused");
    let kernels = fused.join("kernels.cu");
    for f in [
        kernels.as_path(),
        &root.join("src/emu.h"),
        &root.join("src/emu.cpp"),
        &root.join("include/cuda_bf16.h"),
    ] {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let source = std::fs::read_to_string(&kernels)
        .unwrap_or_else(|e| panic!("cuda-emu reads {}: {e}", kernels.display()));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let table: String = kernel_names(&source)
        .iter()
        .map(|name| format!("KERNEL({name})\n"))
        .collect();
    std::fs::write(out.join("kernels.inc"), table).expect("OUT_DIR is writable");
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .file(root.join("src/emu.cpp"))
        .include(root.join("src"))
        .include(root.join("include"))
        .include(&fused)
        .include(&out)
        .flag_if_supported("-Wno-unknown-pragmas")
        .opt_level(2)
        .compile("cuda_emu");
    println!("cargo:rustc-link-lib=pthread");
}

/// The names of the `__global__` functions: the identifier after `__global__ void`.
fn kernel_names(source: &str) -> Vec<String> {
    source
        .split("__global__")
        .skip(1)
        .filter_map(|rest| {
            let rest = rest.trim_start().strip_prefix("void")?;
            let name: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}
