//! A lower bound on the memory a spec's cell needs, checked before anything runs.
use super::*;

/// Bytes one cell of a spec holds in memory at its peak, by the key that sizes each part, as a
/// lower bound: the data set's images (f32), the samples (images and their tokens, f32) and their
/// feature vectors (f64, up to Inception's 2048 per image).
pub fn memory_needed(spec: &Spec) -> Vec<(&'static str, usize, u128)> {
    let d = &spec.data;
    let channels: u128 = match d.source {
        DataSource::Mnist => 1,
        _ => 3,
    };
    let image = channels * (d.image_size as u128).pow(2) * 4;
    vec![
        ("data.train", d.train, d.train as u128 * image),
        ("data.test", d.test, d.test as u128 * image),
        (
            "sample.count",
            spec.sample.count,
            spec.sample.count as u128 * (2 * image + 2048 * 8),
        ),
    ]
}

/// Refuse a spec whose cells need more memory than `available` bytes: the error names the key
/// that asks for most, its value, the estimate and the limit (exit 2 before anything is written,
/// instead of an allocation abort after hours of training).
pub fn check_memory(loaded: &LoadedSpec, available: u64) -> Result<(), SpecError> {
    for cell in &loaded.cells {
        let parts = memory_needed(&cell.spec);
        let total: u128 = parts.iter().map(|p| p.2).sum();
        if total <= available as u128 {
            continue;
        }
        let (key, value, _) =
            parts
                .iter()
                .max_by_key(|p| p.2)
                .copied()
                .unwrap_or(("data.train", 0, 0));
        let (line, column) = locate(&loaded.source, key).unwrap_or((1, 1));
        let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
        return Err(SpecError::Invalid {
            path: loaded.path.display().to_string(),
            line,
            column,
            key: format!("{key}: "),
            message: format!(
                "{value} needs at least {:.1} GiB of memory in all (images, samples, features), \
                 more than the {:.1} GiB available here; lower it",
                gib(total),
                gib(available as u128)
            ),
        });
    }
    Ok(())
}

/// Memory this process may use: the cgroup's limit where one is set, else the system's
/// available memory (`/proc/meminfo`); None where neither can be read.
pub fn available_memory() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    match (cgroup, meminfo) {
        (Some(c), Some(m)) => Some(c.min(m)),
        (c, m) => c.or(m),
    }
}
