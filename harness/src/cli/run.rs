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
    } = args;
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
    let started = std::time::Instant::now();
    let workers = if jobs > 1 {
        let threads = crate::workers::threads_per_job(jobs);
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
    let outcomes = match runner.run_experiment(&loaded) {
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
    } = args;
    // checked completely first, as `run` would check it (memory: on the tasks' nodes)
    let loaded = spec::load(&spec, &set)?;
    if tasks == 0 {
        return Err(UsageError("--tasks: expected at least 1, found 0".into()).into());
    }
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
