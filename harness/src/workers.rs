//! `ablate run --jobs N`: this process and N − 1 worker processes on one spec, sharing its runs
//! through the locks of [`harness::lock`], each with its share of the CPU threads. Small models use
//! many threads poorly; several processes with few threads each use a machine better.
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// The user's `RAYON_NUM_THREADS`, as it was before [`pin_cpu_threads`] set it.
fn user_threads() -> Option<usize> {
    static USER: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *USER.get_or_init(|| {
        std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
    })
}

/// Pin candle's CPU threads, each only where the user has not set it. Call first thing, before
/// any thread exists.
/// - `RAYON_NUM_THREADS` (matrix products and the fused ops): candle 0.11 otherwise counts the
///   physical cores again, by reading /proc/cpuinfo, for every matrix product (sampling runs
///   thousands of small ones; the reads showed in its profile).
/// - `CANDLE_NUM_THREADS=1`: candle's own pool for its remaining element-wise ops, whose caller
///   spin-waits for its workers. On a loaded machine a descheduled worker left the caller spinning
///   (half of a quickstart run's CPU time); the hot element-wise ops are fused and run on rayon
///   anyway. mar-tiny sampling 4.95 s → 4.64 s on an idle 2-core machine, training unchanged.
pub fn pin_cpu_threads() {
    if user_threads().is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Run `f` on a thread of rayon's global pool, the pool of the matrix products and the fused ops.
/// An op split from a pool thread hands its parts to the other threads through their queues; split
/// from any other thread, every op also puts that thread to sleep and wakes it when the parts are
/// done, and on a virtual machine each wake-up costs. Measured on 2 cores (mar-tiny training):
/// 2.04 s per step from the main thread, 1.55–1.61 s from the pool.
pub fn on_cpu_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // `scope` runs its body on a pool thread and blocks the calling thread until it returns
    rayon::scope(|_| f())
}

/// Threads per process: the user's `RAYON_NUM_THREADS` when set, else the cores this process may
/// use divided by `jobs` (at least 1).
pub fn threads_per_job(jobs: usize) -> usize {
    user_threads().unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / jobs.max(1)).max(1)
    })
}

/// The worker's command line: this invocation's arguments without `--jobs`, quiet, and without
/// the report (the first process writes it once every run is done).
pub fn worker_args(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for a in args {
        if skip_value {
            skip_value = false;
            continue;
        }
        let s = a.to_string_lossy();
        if s == "--jobs" {
            skip_value = true;
            continue;
        }
        if s.starts_with("--jobs=") {
            continue;
        }
        out.push(a.clone());
    }
    let has = |out: &[OsString], flags: &[&str]| out.iter().any(|a| flags.iter().any(|f| a == f));
    if !has(&out, &["--quiet", "-q"]) {
        out.push("--quiet".into());
    }
    if !has(&out, &["--no-report"]) {
        out.push("--no-report".into());
    }
    out
}

/// Set on a worker whose starting process writes the report (the user did not ask for
/// `--no-report`): that process's pid, so that the worker can write the report itself when the
/// process is gone by the time the runs are done.
const REPORT_PARENT: &str = "ABLATE_REPORT_PARENT";

/// In a worker of `--jobs`: the pid of the process that will write the report, if it will.
pub fn report_parent() -> Option<i64> {
    std::env::var(REPORT_PARENT).ok()?.parse().ok()
}

/// Worker processes started by [`spawn`].
pub struct Workers {
    children: Vec<(Child, PathBuf)>,
}

/// Start `jobs − 1` workers running this program with `worker_args` of this invocation, each with
/// `threads` threads, their output in `ROOT/logs/worker-K.log`.
pub fn spawn(jobs: usize, root: &Path, threads: usize) -> anyhow::Result<Workers> {
    let exe = std::env::current_exe().context("finding the ablate executable for --jobs")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let reports = !args.iter().any(|a| a == "--no-report");
    let args = worker_args(&args);
    let logs = root.join("logs");
    db::files::create_folder(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut children = Vec::new();
    for k in 1..jobs {
        let log = logs.join(format!("worker-{k}.log"));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = file
            .try_clone()
            .with_context(|| format!("opening {}", log.display()))?;
        let mut command = Command::new(&exe);
        if reports {
            command.env(REPORT_PARENT, std::process::id().to_string());
        }
        let child = command
            .args(&args)
            .env("RAYON_NUM_THREADS", threads.to_string())
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting worker {k} ({})", exe.display()))?;
        children.push((child, log));
    }
    Ok(Workers { children })
}

impl Workers {
    /// Pass a stop on to every worker (SIGTERM to each; they checkpoint and mark their runs
    /// interrupted as this process does), then wait for them.
    pub fn stop(self, signal: i32) -> Vec<String> {
        for (child, _) in &self.children {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) on a child process of ours; no memory is touched
                unsafe { libc::kill(pid, signal) };
            }
        }
        self.wait()
    }

    /// Wait for every worker; a line for each one that did not end well (a failed run counts).
    pub fn wait(self) -> Vec<String> {
        let mut problems = Vec::new();
        for (mut child, log) in self.children {
            match child.wait() {
                Ok(status) if status.success() => {}
                Ok(status) => problems.push(format!(
                    "worker {} ended with {status}; its log: {}",
                    child.id(),
                    log.display()
                )),
                Err(e) => problems.push(format!("worker {}: {e}", child.id())),
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<OsString> {
        s.iter().map(OsString::from).collect()
    }

    #[test]
    fn worker_arguments_drop_jobs_and_add_quiet_and_no_report() {
        let got = worker_args(&args(&[
            "--root", "r", "run", "s.toml", "--jobs", "4", "--set", "a=1",
        ]));
        assert_eq!(
            got,
            args(&[
                "--root",
                "r",
                "run",
                "s.toml",
                "--set",
                "a=1",
                "--quiet",
                "--no-report"
            ])
        );
        let got = worker_args(&args(&["-q", "run", "s.toml", "--jobs=2", "--no-report"]));
        assert_eq!(got, args(&["-q", "run", "s.toml", "--no-report"]));
    }

    #[test]
    fn threads_are_shared_out_but_never_zero() {
        if std::env::var("RAYON_NUM_THREADS").is_ok() {
            return; // the user's setting wins; covered by the branch above
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(threads_per_job(1), cores);
        assert_eq!(threads_per_job(cores * 4), 1);
    }
}
