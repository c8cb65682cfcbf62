//! `ablate bench --profile FILE`: a sampling profile of this process's threads (pprof, SIGPROF at
//! 997 Hz) over the timed training steps, written as two tables of function names: where the
//! samples were (self) and which functions were on the stack (inclusive). On CUDA it shows where
//! the host spends the step: queuing kernels, allocating, or waiting for the device.
//! Needs the `profile` feature (`cargo build --release --features profile`).
use std::path::{Path, PathBuf};

/// A running profile; [`HostProfile::write`] stops it and writes the tables.
pub struct HostProfile {
    #[cfg(feature = "profile")]
    guard: pprof::ProfilerGuard<'static>,
    path: PathBuf,
}

impl HostProfile {
    /// Start sampling; the tables go to `path` when written.
    pub fn start(path: &Path) -> anyhow::Result<HostProfile> {
        #[cfg(feature = "profile")]
        {
            let guard = pprof::ProfilerGuardBuilder::default()
                .frequency(997)
                .blocklist(&["libc", "libgcc", "pthread", "vdso"])
                .build()
                .map_err(|e| anyhow::anyhow!("starting the profiler: {e}"))?;
            Ok(HostProfile {
                guard,
                path: path.to_path_buf(),
            })
        }
        #[cfg(not(feature = "profile"))]
        {
            anyhow::bail!(
                "--profile {}: this ablate was built without the `profile` feature; rebuild with \
                 `cargo build --release -p harness --features profile`",
                path.display()
            )
        }
    }

    /// Stop sampling and write the tables to the file given at the start.
    pub fn write(self) -> anyhow::Result<()> {
        #[cfg(feature = "profile")]
        {
            let report = self
                .guard
                .report()
                .build()
                .map_err(|e| anyhow::anyhow!("building the profile: {e}"))?;
            let stacks: Vec<(Vec<String>, i64)> = report
                .data
                .iter()
                .map(|(frames, &count)| {
                    let names = frames
                        .frames
                        .iter()
                        .flatten()
                        .map(|s| s.name())
                        .filter(|n| !n.contains("pprof::") && !n.contains("perf_signal_handler"))
                        .collect();
                    (names, count as i64)
                })
                .collect();
            db::files::write_bytes(&self.path, tables(&stacks).as_bytes())?;
            Ok(())
        }
        #[cfg(not(feature = "profile"))]
        {
            anyhow::bail!("{}: no profile was started", self.path.display())
        }
    }
}

/// The self and inclusive tables of sampled stacks (innermost frame first), most samples first.
#[cfg_attr(not(feature = "profile"), allow(dead_code))]
fn tables(stacks: &[(Vec<String>, i64)]) -> String {
    use std::collections::{HashMap, HashSet};
    use std::fmt::Write;
    let total: i64 = stacks.iter().map(|(_, c)| c).sum();
    let mut own: HashMap<&str, i64> = HashMap::new();
    let mut inclusive: HashMap<&str, i64> = HashMap::new();
    for (names, count) in stacks {
        let leaf = names.first().map_or("(no frames)", |n| n.as_str());
        *own.entry(leaf).or_default() += count;
        let mut seen = HashSet::new();
        for n in names {
            if seen.insert(n.as_str()) {
                *inclusive.entry(n.as_str()).or_default() += count;
            }
        }
    }
    let mut out = format!("{total} samples\n");
    for (title, map, rows) in [("self", &own, 40), ("inclusive", &inclusive, 80)] {
        let mut v: Vec<_> = map.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let _ = writeln!(out, "\n== {title}: samples, share, function");
        for (name, c) in v.into_iter().take(rows) {
            let share = 100.0 * *c as f64 / total.max(1) as f64;
            let _ = writeln!(out, "{c:>8} {share:>6.2}%  {name}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_count_self_and_inclusive_once_per_stack() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // recursion: `f` twice in one stack counts once inclusively
        let stacks = vec![(s(&["leaf", "f", "f", "main"]), 3), (s(&["f", "main"]), 1)];
        let t = tables(&stacks);
        assert!(t.starts_with("4 samples"));
        let self_part = t.split("== inclusive").next().unwrap_or_default();
        assert!(self_part.contains("       3  75.00%  leaf"), "{t}");
        assert!(self_part.contains("       1  25.00%  f"), "{t}");
        let incl = t.split("== inclusive").nth(1).unwrap_or_default();
        assert!(incl.contains("       4 100.00%  f"), "{t}");
        assert!(incl.contains("       4 100.00%  main"), "{t}");
    }
}
