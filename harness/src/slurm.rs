//! `ablate slurm`: a Slurm array job for one spec. Every array task runs `ablate run SPEC` on the
//! shared root; the runner's locks let several processes share a spec's runs, each run done once
//! (as `--jobs` does on one machine). A last job, started when the array has ended, writes the
//! report. The scripts are plain bash, so they also run without Slurm: set SLURM_ARRAY_TASK_ID
//! and start them side by side.
//!
//! With `--nodes M` each array task is a job of M nodes that trains every run data-parallel over
//! them (`--nproc N` processes per node): one task per node runs `node.sh`, where node 0 runs the
//! spec (`ablate run --nnodes M`) and the others serve its ranks (`ablate ranks --node-rank K`),
//! meeting in `ROOT/ranks/job-SLURM_JOB_ID-SLURM_RESTART_COUNT` (a requeued job meets anew).
use std::path::{Path, PathBuf};

use anyhow::Context;

/// What the array job asks of Slurm.
#[derive(Debug, Clone)]
pub struct SlurmOptions {
    /// array tasks (processes sharing the spec's runs)
    pub tasks: usize,
    pub partition: Option<String>,
    /// GPUs per task; each task then runs on `cuda:0` of its allocation
    pub gpus_per_task: Option<usize>,
    /// wall-time limit of each task (`--time`, e.g. 04:00:00)
    pub time: Option<String>,
    /// spec overrides (`--set`), passed to every task
    pub set: Vec<String>,
    /// the Postgres tracking database (`--db`), passed to every task and the report job
    pub db: Option<String>,
    /// nodes of each task's data-parallel training (1: no data parallelism across nodes)
    pub nodes: usize,
    /// data-parallel processes per node (`ablate run --nproc`); with GPUs, one per GPU
    pub nproc: usize,
}

/// The scripts written for one experiment.
#[derive(Debug, Clone)]
pub struct SlurmScripts {
    pub array: PathBuf,
    pub report: PathBuf,
    pub submit: PathBuf,
    /// with `nodes` > 1: what each node's task runs
    pub node: Option<PathBuf>,
}

/// A value quoted for bash (single quotes, any inner quote closed and reopened).
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The `#SBATCH` header shared by the array and the report job.
fn header(name: &str, opts: &SlurmOptions, logs: &Path, array: bool) -> String {
    let mut h = String::from("#!/usr/bin/env bash\n");
    let job = if array {
        name.to_string()
    } else {
        format!("{name}-report")
    };
    h += &format!("#SBATCH --job-name={}\n", quote(&format!("ablate-{job}")));
    let log = if array { "%x-%A_%a.log" } else { "%x-%j.log" };
    h += &format!(
        "#SBATCH --output={}\n",
        quote(&logs.join(log).display().to_string())
    );
    if array {
        h += &format!("#SBATCH --array=0-{}\n", opts.tasks - 1);
        if opts.nodes > 1 {
            h += &format!(
                "#SBATCH --nodes={}\n#SBATCH --ntasks-per-node=1\n",
                opts.nodes
            );
        }
        if let Some(g) = opts.gpus_per_task {
            h += &format!("#SBATCH --gpus-per-task={g}\n");
        }
    }
    if let Some(p) = &opts.partition {
        h += &format!("#SBATCH --partition={}\n", quote(p));
    }
    if let Some(t) = &opts.time {
        h += &format!("#SBATCH --time={}\n", quote(t));
    }
    h += "set -euo pipefail\n";
    h
}

/// Write `array.sbatch`, `report.sbatch` and `submit.sh` for `spec` (experiment `name`) into
/// `dir`, for the `ablate` at `exe` working on `root`.
pub fn write_scripts(
    exe: &Path,
    root: &Path,
    spec: &Path,
    name: &str,
    opts: &SlurmOptions,
    dir: &Path,
) -> anyhow::Result<SlurmScripts> {
    if opts.tasks == 0 {
        anyhow::bail!("--tasks: expected at least 1, found 0");
    }
    if opts.nodes == 0 || opts.nproc == 0 {
        anyhow::bail!("--nodes and --nproc: expected at least 1");
    }
    let logs = dir.join("logs");
    db::files::create_folder(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let (exe, root, spec) = (
        quote(&exe.display().to_string()),
        quote(&root.display().to_string()),
        quote(&spec.display().to_string()),
    );
    let mut global = format!("--root {root}");
    if let Some(url) = &opts.db {
        global += &format!(" --db {}", quote(url));
    }
    let mut run = format!("{exe} {global} run {spec} --no-report --quiet");
    for s in &opts.set {
        run += &format!(" --set {}", quote(s));
    }
    match (opts.gpus_per_task, opts.nproc) {
        (None, _) => {}
        (Some(_), 1) => run += " --device cuda:0",
        // one rank process per GPU of the node
        (Some(_), n) => {
            let devices: Vec<String> = (0..n).map(|i| format!("\"cuda:{i}\"")).collect();
            run += &format!(
                " --set {}",
                quote(&format!("train.devices=[{}]", devices.join(",")))
            );
        }
    }
    if opts.nproc > 1 {
        run += &format!(" --nproc {}", opts.nproc);
    }
    // a task's CPUs, for its one process; rank processes share out the CPUs the task may use
    let threads = match opts.nproc {
        1 => {
            "export RAYON_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-${RAYON_NUM_THREADS:-}}\"\n\
              [ -n \"$RAYON_NUM_THREADS\" ] || unset RAYON_NUM_THREADS\n"
        }
        _ => "",
    };
    let node_path = dir.join("node.sh");
    let node = (opts.nodes > 1).then(|| {
        format!(
            "#!/usr/bin/env bash\n\
             # one task per node: node 0 runs the spec, data-parallel over the {nodes} nodes; every\n\
             # other node starts its ranks for each training node 0 posts, until node 0 is done\n\
             set -euo pipefail\n{threads}\
             node=\"${{SLURM_PROCID:-0}}\"\n\
             meet=\"job-${{SLURM_JOB_ID:-local}}-${{SLURM_RESTART_COUNT:-0}}\"\n\
             echo \"node $node of {nodes} on $(hostname)\"\n\
             if [ \"$node\" = 0 ]; then\n  \
               exec {run} --nnodes {nodes} --master-addr \"$(hostname)\" --rendezvous \"$meet\"\n\
             else\n  \
               exec {exe} {global} ranks --nproc {nproc} --nnodes {nodes} --node-rank \"$node\" \
             --rendezvous \"$meet\"\n\
             fi\n",
            nodes = opts.nodes,
            nproc = opts.nproc,
        )
    });
    let body = match &node {
        None => format!(
            "# every task runs the whole spec; runs are shared through the root's locks, each done once\n\
             {threads}echo \"task ${{SLURM_ARRAY_TASK_ID:-0}} on $(hostname)\"\n{run}\n"
        ),
        Some(_) => format!(
            "# every task runs the whole spec over its {} nodes (node.sh); runs are shared between\n\
             # the tasks through the root's locks, each done once\n\
             echo \"task ${{SLURM_ARRAY_TASK_ID:-0}} on $(hostname)\"\n\
             srun --kill-on-bad-exit=1 bash {}\n",
            opts.nodes,
            quote(&node_path.display().to_string())
        ),
    };
    let array = header(name, opts, &logs, true) + &body;
    let report =
        header(name, opts, &logs, false) + &format!("{exe} {global} report {}\n", quote(name));
    let array_path = dir.join("array.sbatch");
    let report_path = dir.join("report.sbatch");
    let submit = format!(
        "#!/usr/bin/env bash\n# submit the array, then the report once every task has ended\n\
         set -euo pipefail\n\
         array=$(sbatch --parsable {})\n\
         report=$(sbatch --parsable --dependency=afterany:\"${{array%%;*}}\" {})\n\
         echo \"array job $array, report job $report\"\n",
        quote(&array_path.display().to_string()),
        quote(&report_path.display().to_string()),
    );
    let submit_path = dir.join("submit.sh");
    let mut files = vec![
        (&array_path, &array),
        (&report_path, &report),
        (&submit_path, &submit),
    ];
    if let Some(text) = &node {
        files.push((&node_path, text));
    }
    for (path, text) in files {
        db::files::write_bytes(path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        make_executable(path)?;
    }
    Ok(SlurmScripts {
        array: array_path,
        report: report_path,
        submit: submit_path,
        node: node.is_some().then_some(node_path),
    })
}

fn make_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_name_the_array_the_options_and_the_dependent_report() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = SlurmOptions {
            tasks: 4,
            partition: Some("gpu".into()),
            gpus_per_task: Some(1),
            time: Some("02:00:00".into()),
            set: vec!["seeds=[0,1]".into(), "name=\"it's\"".into()],
            db: Some("postgres://me@db.cluster/ablate".into()),
            nodes: 1,
            nproc: 1,
        };
        let write = |opts: &SlurmOptions| {
            write_scripts(
                Path::new("/opt/ablate"),
                Path::new("/shared/root"),
                Path::new("/shared/t.toml"),
                "t",
                opts,
                dir.path(),
            )
            .expect("scripts")
        };
        let valid_bash = |p: &PathBuf| {
            let ok = std::process::Command::new("bash")
                .arg("-n")
                .arg(p)
                .status()
                .expect("bash -n");
            assert!(ok.success(), "{} is not valid bash", p.display());
        };
        let s = write(&opts);
        let array = std::fs::read_to_string(&s.array).expect("array");
        for line in [
            "#SBATCH --array=0-3",
            "#SBATCH --gpus-per-task=1",
            "#SBATCH --partition='gpu'",
            "#SBATCH --time='02:00:00'",
            "'/opt/ablate' --root '/shared/root' --db 'postgres://me@db.cluster/ablate' run \
             '/shared/t.toml' --no-report --quiet --set 'seeds=[0,1]' --set 'name=\"it'\\''s\"' --device cuda:0",
        ] {
            assert!(array.contains(line), "{line}\n{array}");
        }
        let report = std::fs::read_to_string(&s.report).expect("report");
        assert!(report.contains(
            "'/opt/ablate' --root '/shared/root' --db 'postgres://me@db.cluster/ablate' report 't'"
        ));
        assert!(!report.contains("--array"));
        let submit = std::fs::read_to_string(&s.submit).expect("submit");
        assert!(submit.contains("--dependency=afterany:"), "{submit}");
        for p in [&s.array, &s.report, &s.submit] {
            valid_bash(p);
        }
        // data-parallel over 2 nodes of 2 GPUs each: one task per node runs node.sh
        let dp = SlurmOptions {
            nodes: 2,
            nproc: 2,
            gpus_per_task: Some(2),
            ..opts.clone()
        };
        let s = write(&dp);
        let array = std::fs::read_to_string(&s.array).expect("array");
        let node_path = s.node.clone().expect("node.sh");
        let node = std::fs::read_to_string(&node_path).expect("node.sh");
        for (text, line) in [
            (&array, "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n"),
            (&array, "#SBATCH --gpus-per-task=2"),
            (
                &array,
                &format!("srun --kill-on-bad-exit=1 bash '{}'", node_path.display()),
            ),
            (&node, "node=\"${SLURM_PROCID:-0}\""),
            (
                &node,
                "meet=\"job-${SLURM_JOB_ID:-local}-${SLURM_RESTART_COUNT:-0}\"",
            ),
            (
                &node,
                "--set 'train.devices=[\"cuda:0\",\"cuda:1\"]' --nproc 2 --nnodes 2 \
                 --master-addr \"$(hostname)\" --rendezvous \"$meet\"",
            ),
            (
                &node,
                "exec '/opt/ablate' --root '/shared/root' --db 'postgres://me@db.cluster/ablate' \
                 ranks --nproc 2 --nnodes 2 --node-rank \"$node\" --rendezvous \"$meet\"",
            ),
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        assert!(!node.contains("--device cuda:0"), "{node}");
        for p in [&s.array, &node_path] {
            valid_bash(p);
        }

        let zero = SlurmOptions { tasks: 0, ..opts };
        assert!(write_scripts(
            Path::new("a"),
            Path::new("r"),
            Path::new("s"),
            "t",
            &zero,
            dir.path()
        )
        .is_err());
    }
}
