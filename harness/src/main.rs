//! `ablate`: declare an ablation grid in TOML, train the paired variants, evaluate, report.
fn main() {
    keep_freed_memory();
    std::process::exit(harness::cli::main());
}

/// candle allocates a fresh output for every op. glibc serves blocks above its mmap threshold
/// with mmap and unmaps them on free, so each large op paid page faults and TLB shootdowns:
/// about a quarter of a CPU training step at the time (mar-tiny 1.90 s → 1.41 s with this).
/// Serve every block from the heap and keep freed memory for reuse; peak RSS did not grow. A
/// user's own `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` still win.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |var: &str, param: libc::c_int| {
            if std::env::var_os(var).is_none() {
                // SAFETY: mallopt only changes allocator parameters; called before any thread starts
                unsafe { libc::mallopt(param, libc::c_int::MAX) };
            }
        };
        set("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD);
        set("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD);
    }
}
