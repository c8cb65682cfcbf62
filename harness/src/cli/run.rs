//! `ablate run`, `slurm` and `plan`: a spec's runs, here or on a cluster.
use super::*;
use db::RunStatus;

/// `ablate run`.
pub(super) fn run_spec(layout: &Layout, quiet: bool, args: RunArgs) -> anyhow::Result<i32> {
    let RunArgs {
        spec,
        set,
        device,
        no_report,
        jobs,
        nproc,
        nnodes,
        master_addr,
        rendezvous,
    } = args;
    // on one node only this process's rank processes read its job files: a folder of its own
    let ranks_dir = match (nnodes, &rendezvous) {
        (1, None) => layout.root.join("ranks").join(format!(
            "{}-{}",
            harness::device::host_name(),
            std::process::id()
        )),
        _ => rendezvous_dir(layout, rendezvous.as_deref())?,
    };
    // the other nodes' `ablate ranks` serve until this is dropped, however this process ends:
    // first, so that a bad spec or flag below ends them too
    let _nodes = match nnodes {
        1 => None,
        _ => Some(harness::train::ranks::NodeZero::open(
            &ranks_dir,
            rendezvous.is_some(),
        )?),
    };
    // the spec is checked completely before anything touches the database
    let loaded = spec::load(&spec, &set)?;
    if let Some(available) = spec::available_memory() {
        spec::check_memory(&loaded, available)?;
    }
    if let Some(d) = &device {
        harness::device::parse_device(d)?;
    }
    if jobs == 0 {
        return Err(UsageError("--jobs: expected at least 1, found 0".into()).into());
    }
    check_nproc(nproc, nnodes, &loaded)?;
    if jobs > 1 && nnodes > 1 {
        return Err(UsageError(
            "--jobs with --nnodes: the other nodes serve one training at a time; run several \
             multi-node jobs instead, each with its own --rendezvous"
                .into(),
        )
        .into());
    }
    let started = std::time::Instant::now();
    let workers = if jobs > 1 {
        let threads = crate::workers::threads_per_job(jobs * nproc);
        db::files::create_folder(&layout.root)
            .with_context(|| format!("creating {}", layout.root.display()))?;
        let w = crate::workers::spawn(jobs, &layout.root, threads)?;
        eprintln!(
            "{jobs} processes share the runs, {threads} thread(s) each; workers log to {}",
            layout.root.join("logs").display()
        );
        Some(w)
    } else {
        None
    };
    let mut runner = Runner::open(layout.clone(), device, quiet)?;
    if nproc * nnodes > 1 {
        runner.process_ranks = Some(harness::train::ranks::ProcessRanks {
            nproc,
            nnodes,
            master_addr: master_addr.unwrap_or_else(|| runner.env.host.clone()),
            exe: std::env::current_exe().context("finding the ablate executable for --nproc")?,
            threads: crate::workers::threads_per_job(jobs * nproc),
            rendezvous: ranks_dir.clone(),
        });
    }
    let outcomes = runner.run_experiment(&loaded);
    if nnodes == 1 {
        // this process's job folder, empty once its trainings are over
        let _ = std::fs::remove_dir(&ranks_dir);
    }
    let outcomes = match outcomes {
        Ok(o) => o,
        Err(e) => {
            // a stop (SIGTERM to this process alone, as a scheduler may send it) reaches
            // the workers too; on any other error they finish their runs
            if let (Some(w), harness::Error::Stopped(stopped)) = (workers, &e) {
                for problem in w.stop(stopped.0) {
                    eprintln!("{problem}");
                }
            }
            return Err(e.into());
        }
    };
    // every run this process skipped it waited for, so the outcomes cover the whole spec
    for problem in workers.map(|w| w.wait()).unwrap_or_default() {
        eprintln!("{problem}");
    }
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| o.status != RunStatus::Finished)
        .collect();
    eprintln!(
        "{} run(s): {} finished ({} earlier), {} failed, in {:.1} s",
        outcomes.len(),
        outcomes.len() - failed.len(),
        outcomes.iter().filter(|o| o.cached).count(),
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    for f in &failed {
        eprintln!(
            "  failed: run {} ({} · {} · seed {}): {}",
            f.run_id,
            f.cell,
            f.arm.as_str(),
            f.seed,
            f.error.as_deref().unwrap_or("")
        );
    }
    // a worker of `--jobs` leaves the report to the process that started it, unless that
    // process is gone (killed): then the worker that finishes writes it
    let parent_gone =
        crate::workers::report_parent().is_some_and(|pid| !harness::device::pid_alive(pid));
    if parent_gone {
        eprintln!("the process that started this worker is gone: writing the report");
    }
    if !no_report || parent_gone {
        let out = layout.report_dir(&loaded.base.name);
        // processes sharing the spec write the report one at a time; the last one to
        // finish writes it with every run
        let safe = out.file_name().map(|n| n.to_string_lossy().into_owned());
        let lock = format!("report-{}", safe.unwrap_or_default());
        let _held = harness::lock::lock(layout, &runner.db, &lock)?;
        match reports::write_report(&runner.db, &loaded.base.name, &out, &reports::Format::ALL) {
            Ok(r) => {
                println!("{}", r.markdown);
                print_report_files(&r.files);
            }
            Err(e) => eprintln!("report not written: {e}"),
        }
    }
    println!("database: {}", layout.db_location());
    Ok(if failed.is_empty() { 0 } else { 1 })
}

/// `--nproc N --nnodes M` fits every run: N × M divides its batch, and a `train.devices` list
/// names N devices (one per process of a node).
fn check_nproc(nproc: usize, nnodes: usize, loaded: &spec::LoadedSpec) -> anyhow::Result<()> {
    if nproc == 0 || nnodes == 0 {
        let flag = if nproc == 0 { "--nproc" } else { "--nnodes" };
        return Err(UsageError(format!("{flag}: expected at least 1, found 0")).into());
    }
    let world = nproc * nnodes;
    if world == 1 {
        return Ok(());
    }
    for run in loaded.runs() {
        let t = &run.spec.train;
        if !t.batch.is_multiple_of(world) {
            return Err(UsageError(format!(
                "--nproc {nproc} --nnodes {nnodes}: {}: train.batch = {} cannot be shared by \
                 {world} processes; use counts whose product divides the batch",
                loaded.path.display(),
                t.batch
            ))
            .into());
        }
        if !t.devices.is_empty() && t.devices.len() != nproc {
            return Err(UsageError(format!(
                "--nproc {nproc}: {}: train.devices names {} device(s); name one per process, \
                 or leave train.devices out to put every process on the run's device",
                loaded.path.display(),
                t.devices.len()
            ))
            .into());
        }
    }
    Ok(())
}

/// The folder where the nodes of one data-parallel job meet: ROOT/ranks, or ROOT/ranks/NAME.
fn rendezvous_dir(layout: &Layout, name: Option<&str>) -> anyhow::Result<std::path::PathBuf> {
    let dir = layout.root.join("ranks");
    let Some(name) = name else {
        return Ok(dir);
    };
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(UsageError(format!(
            "--rendezvous '{name}': expected a name of ASCII letters, digits, '-', '_' and '.'"
        ))
        .into());
    }
    Ok(dir.join(name))
}

/// The hidden `ablate rank`: one rank process of `ablate run --nproc`.
pub(super) fn rank(args: RankArgs) -> anyhow::Result<i32> {
    let job = harness::train::ranks::RankJob::read(&args.job)?;
    harness::train::ranks::train_rank(&job, args.rank)?;
    Ok(0)
}

/// `ablate ranks`: serve node 0's trainings with this node's ranks.
pub(super) fn ranks(layout: &Layout, args: RanksArgs) -> anyhow::Result<i32> {
    let RanksArgs {
        nproc,
        nnodes,
        node_rank,
        rendezvous,
    } = args;
    if nproc == 0 {
        return Err(UsageError("--nproc: expected at least 1, found 0".into()).into());
    }
    let own_folder = rendezvous.is_some();
    let rendezvous = rendezvous_dir(layout, rendezvous.as_deref())?;
    let launch = harness::train::ranks::ProcessRanks {
        nproc,
        nnodes,
        master_addr: String::new(),
        exe: std::env::current_exe().context("finding the ablate executable")?,
        threads: crate::workers::threads_per_job(nproc),
        rendezvous,
    };
    // a line per training, and why one was not served or failed: shown even with --quiet
    let say = |m: String| eprintln!("{m}");
    let served = harness::train::ranks::serve_node(
        &layout.root.join("logs"),
        &launch,
        node_rank,
        own_folder,
        &say,
    )?;
    eprintln!("node {node_rank}: served {served} training(s); node 0's runs are done");
    Ok(0)
}

/// `ablate slurm`.
pub(super) fn slurm(layout: &Layout, args: SlurmArgs) -> anyhow::Result<i32> {
    let SlurmArgs {
        spec,
        tasks,
        partition,
        gpus_per_task,
        time,
        set,
        submit,
        nodes,
        nproc,
    } = args;
    // checked completely first, as `run` would check it (memory: on the tasks' nodes)
    let loaded = spec::load(&spec, &set)?;
    if tasks == 0 {
        return Err(UsageError("--tasks: expected at least 1, found 0".into()).into());
    }
    if let Some(g) = gpus_per_task.filter(|&g| nproc > 1 && g < nproc) {
        return Err(UsageError(format!(
            "--nproc {nproc} --gpus-per-task {g}: each of a node's processes needs its own GPU"
        ))
        .into());
    }
    check_nproc(nproc, nodes, &loaded)?;
    let absolute = |p: &std::path::Path| {
        std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
    };
    let root = absolute(&layout.root)?;
    let dir = root.join("slurm").join(
        layout
            .report_dir(&loaded.base.name)
            .file_name()
            .unwrap_or_default(),
    );
    let exe = std::env::current_exe().context("finding the ablate executable")?;
    let opts = crate::slurm::SlurmOptions {
        tasks,
        partition,
        gpus_per_task,
        time,
        set,
        db: layout.db_url.clone(),
        nodes,
        nproc,
    };
    let scripts = crate::slurm::write_scripts(
        &exe,
        &root,
        &absolute(&spec)?,
        &loaded.base.name,
        &opts,
        &dir,
    )?;
    println!("array job:  {}", scripts.array.display());
    println!("report job: {}", scripts.report.display());
    println!("submit:     {}", scripts.submit.display());
    if let Some(node) = &scripts.node {
        println!("each node:  {}", node.display());
    }
    if submit {
        let out = std::process::Command::new("bash")
            .arg(&scripts.submit)
            .output()
            .context("running sbatch (is Slurm installed here?)")?;
        if !out.status.success() {
            anyhow::bail!(
                "submitting failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(0)
}

/// `ablate plan`.
pub(super) fn plan(layout: &Layout, args: PlanArgs) -> anyhow::Result<i32> {
    let PlanArgs { spec, set } = args;
    let loaded = spec::load(&spec, &set)?;
    let db = if layout.has_db() {
        Some(open_db_to_read(layout)?)
    } else {
        None
    };
    println!(
        "{}: {} cell(s), {} run(s)",
        loaded.base.name,
        loaded.cells.len(),
        loaded.runs().len()
    );
    println!(
        "{:<18} {:<40} {:<14} {:>6}  status",
        "hash", "cell", "arm", "seed"
    );
    // the data's fingerprint is part of a run's identity (read once per data section)
    let mut fingerprints: std::collections::HashMap<String, String> = Default::default();
    for r in loaded.runs() {
        let key = serde_json::to_string(&r.spec.data)?;
        let fingerprint = match fingerprints.get(&key) {
            Some(f) => f.clone(),
            None => {
                let f = harness::data::identity_fingerprint(&r.spec.data)?;
                fingerprints.insert(key, f.clone());
                f
            }
        };
        let hash = r.hash(&fingerprint);
        let status = match &db {
            Some(db) => db
                .run_by_hash(&hash)?
                .map_or("new", |row| row.status.as_str()),
            None => "new",
        };
        println!(
            "{:<18} {:<40} {:<14} {:>6}  {}",
            hash,
            r.cell,
            r.arm.as_str(),
            r.seed,
            status
        );
    }
    Ok(0)
}
