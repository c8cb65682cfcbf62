//! `ablate`: declare an ablation grid in TOML, train the paired variants, evaluate, report.
//! The commands live here, private to the binary (anyhow for their context); the work they call
//! is the `harness` library's, with typed errors.
mod bench;
mod cli;
mod compare;
mod fid;
mod profile;
mod selftest;
mod slurm;
mod workers;

fn main() {
    keep_freed_memory();
    std::process::exit(cli::main());
}

/// candle allocates a fresh output for every op. glibc serves blocks above its mmap threshold
/// with mmap and unmaps them on free, so each large op paid page faults and TLB shootdowns:
/// about a quarter of a CPU training step at the time (mar-tiny 1.90 s → 1.41 s with this).
/// Serve every block from the heap and keep freed memory for reuse; peak RSS did not grow.
/// One arena: the work runs on rayon's threads (`workers::on_cpu_pool`), and glibc gave each
/// thread an arena of its own, built of 64 MB heaps that a large tensor does not fit, which
/// raised mar-tiny's peak RSS from 2.5 to 3.9 GB. A user's own `MALLOC_MMAP_THRESHOLD_`,
/// `MALLOC_TRIM_THRESHOLD_` and `MALLOC_ARENA_MAX` still win.
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
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: as above
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
        }
    }
}
