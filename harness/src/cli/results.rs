//! Reading the tracking database: `report`, `list`, `show`, `compare`, `baseline`, `check`, `db`.
use super::*;

/// `ablate report`.
pub(super) fn report(layout: &Layout, args: ReportArgs) -> anyhow::Result<i32> {
    let ReportArgs {
        experiment,
        out,
        format,
        version,
    } = args;
    let db = open_db_to_read(layout)?;
    let out = out.unwrap_or_else(|| layout.report_dir(&experiment));
    let formats: Vec<reports::Format> = format.into_iter().map(Into::into).collect();
    let r = reports::write_report_version(&db, &experiment, version, &out, &formats).with_context(
        || {
            let hint = match db.is_read_only() {
                true => {
                    " (this root cannot be written here: --out DIR writes the report elsewhere)"
                }
                false => "",
            };
            format!(
                "writing the report of '{experiment}' into {}{hint}",
                out.display()
            )
        },
    )?;
    if formats.contains(&reports::Format::Markdown) {
        println!("{}", r.markdown);
    }
    print_report_files(&r.files);
    Ok(0)
}

/// `ablate db`.
pub(super) fn db(layout: &Layout, args: DbArgs) -> anyhow::Result<i32> {
    let DbArgs {
        action: DbAction::Copy { from, to },
    } = args;
    let source = open_location(&from, layout, false)?;
    let dest = open_location(&to, layout, true)?;
    let counts = source
        .copy_into(&dest)
        .with_context(|| format!("copying {} into {}", source.location(), dest.location()))?;
    for (table, rows) in &counts {
        println!("{table:<20} {rows:>9} row(s)");
    }
    println!("copied {} into {}", source.location(), dest.location());
    Ok(0)
}

/// `ablate baseline`.
pub(super) fn baseline(layout: &Layout, args: BaselineArgs) -> anyhow::Result<i32> {
    let BaselineArgs {
        action:
            BaselineAction::Pin {
                experiment,
                name,
                force,
            },
    } = args;
    if name.trim().is_empty() {
        return Err(UsageError("--name: expected a baseline name, found ''".into()).into());
    }
    let db = open_db(layout)?;
    if !force && db.baseline(&experiment, &name)?.is_some() {
        return Err(UsageError(format!(
            "baseline '{name}' of '{experiment}' exists; pass --force to overwrite it, \
                 or pin under another --name"
        ))
        .into());
    }
    let entries = reports::pin_baseline(&db, &experiment, &name)?;
    println!(
        "baseline '{name}' of '{experiment}': {} entries pinned",
        entries.len()
    );
    for e in &entries {
        let sd = e.std.map_or("–".to_string(), |s| format!("{s:.4}"));
        println!(
            "  {:<4} {:.4} ± {sd} (n={})  {}",
            e.metric,
            e.mean,
            e.n,
            e.name()
        );
    }
    Ok(0)
}

/// `ablate check`.
pub(super) fn check(layout: &Layout, args: CheckArgs) -> anyhow::Result<i32> {
    let CheckArgs {
        experiment,
        baseline,
        junit,
    } = args;
    let db = open_db_to_read(layout)?;
    let tolerances = drift_tolerances(&db, &experiment)?;
    let report = reports::check(&db, &experiment, &baseline, &tolerances)?;
    print!("{}", report.render_table());
    if let Some(path) = junit {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            db::files::create_folder(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        db::files::write_bytes(&path, report.junit_xml().as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        println!("junit: {}", path.display());
    }
    Ok(if report.failed() { 1 } else { 0 })
}

/// `ablate list`.
pub(super) fn list(layout: &Layout, args: ListArgs) -> anyhow::Result<i32> {
    let ListArgs { experiment } = args;
    let db = open_db_to_read(layout)?;
    // show runs whose process died as interrupted, not running
    db.reap_dead_runs(
        &harness::device::Environment::detect().host,
        &harness::device::pid_alive,
    )?;
    match experiment {
        None => {
            println!(
                "{:<4} {:<24} {:>7} {:>6} {:>9}  created",
                "id", "experiment", "version", "runs", "finished"
            );
            // runs and finished count the latest version
            for e in db.list_experiments()? {
                println!(
                    "{:<4} {:<24} {:>7} {:>6} {:>9}  {}",
                    e.id, e.name, e.version, e.runs, e.finished, e.created_at
                );
            }
        }
        Some(name) => {
            if db.experiment_id(&name)?.is_none() {
                anyhow::bail!("no experiment named '{name}' (see `ablate list`)");
            }
            let versions = db.experiment_versions(&name)?;
            if versions.len() > 1 {
                for (v, created, runs) in &versions {
                    println!("version {v}: {runs} runs, created {created}");
                }
                println!("the runs of the latest version:");
            }
            println!(
                "{:<5} {:<11} {:<12} {:<50} {:<10}",
                "run", "kind", "status", "name", "stage"
            );
            for r in db.list_runs(Some(&name))? {
                println!(
                    "{:<5} {:<11} {:<12} {:<50} {:<10}",
                    r.id,
                    r.kind,
                    r.status,
                    r.name,
                    r.stage.unwrap_or_default()
                );
            }
        }
    }
    Ok(0)
}

/// `ablate compare`.
pub(super) fn compare(layout: &Layout, args: CompareArgs) -> anyhow::Result<i32> {
    let CompareArgs { run_a, run_b } = args;
    let db = open_db_to_read(layout)?;
    let get = |id: i64| -> anyhow::Result<db::RunRow> {
        db.run(id)?
            .ok_or_else(|| anyhow::anyhow!("no run with id {id} (see `ablate list EXPERIMENT`)"))
    };
    let (a, b) = (get(run_a)?, get(run_b)?);
    println!("A = run {}: {}", a.id, a.name);
    println!("B = run {}: {}", b.id, b.name);
    let mut pa = a.params.clone();
    let mut pb = b.params.clone();
    for (p, r) in [(&mut pa, &a), (&mut pb, &b)] {
        if let Some(o) = p.as_object_mut() {
            o.insert("arm".into(), serde_json::json!(r.arm));
            o.insert("seed".into(), serde_json::json!(r.seed));
        }
    }
    let diff = crate::compare::differing(&pa, &pb);
    if diff.is_empty() {
        println!("parameters: identical");
    } else {
        println!("{:<32} {:<24} {:<24}", "parameter", "A", "B");
        for (k, va, vb) in diff {
            println!("{k:<32} {va:<24} {vb:<24}");
        }
    }
    let last = |id: i64| -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
        let mut m = std::collections::BTreeMap::new();
        let mut steps = std::collections::BTreeMap::new();
        for e in db.evals_for_run(id)? {
            if e.step >= *steps.get(&e.metric).unwrap_or(&i64::MIN) {
                steps.insert(e.metric.clone(), e.step);
                m.insert(e.metric, e.value);
            }
        }
        Ok(m)
    };
    let (ea, eb) = (last(a.id)?, last(b.id)?);
    let mut metrics: Vec<&String> = ea.keys().chain(eb.keys()).collect();
    metrics.sort();
    metrics.dedup();
    if !metrics.is_empty() {
        println!("{:<12} {:>12} {:>12} {:>12}", "metric", "A", "B", "B − A");
        for m in metrics {
            let fmt = |v: Option<&f64>| {
                v.map(|x| format!("{x:.4}"))
                    .unwrap_or_else(|| "missing".into())
            };
            let d = match (ea.get(m), eb.get(m)) {
                (Some(x), Some(y)) => format!("{:+.4}", y - x),
                _ => "–".into(),
            };
            println!(
                "{m:<12} {:>12} {:>12} {d:>12}",
                fmt(ea.get(m)),
                fmt(eb.get(m))
            );
        }
    }
    Ok(0)
}

/// `ablate show`.
pub(super) fn show(layout: &Layout, args: ShowArgs) -> anyhow::Result<i32> {
    let ShowArgs { run } = args;
    let db = open_db_to_read(layout)?;
    let r = db
        .run(run)?
        .ok_or_else(|| anyhow::anyhow!("no run with id {run} (see `ablate list EXPERIMENT`)"))?;
    println!("run {}: {}", r.id, r.name);
    println!(
        "  kind {} · status {} · stage {}",
        r.kind,
        r.status,
        r.stage.clone().unwrap_or_default()
    );
    println!(
        "  hash {} · seed {} · arm {}",
        r.hash,
        r.seed,
        r.arm.clone().unwrap_or_else(|| "-".into())
    );
    println!(
        "  host {} · device {} · version {} · pid {}",
        r.host,
        r.device,
        r.version,
        r.pid.map(|p| p.to_string()).unwrap_or_default()
    );
    println!(
        "  git {}{}",
        r.git_commit.clone().unwrap_or_else(|| "unknown".into()),
        if r.git_dirty { " (dirty)" } else { "" }
    );
    println!(
        "  created {} · started {} · ended {}",
        r.created_at,
        r.started_at.clone().unwrap_or_default(),
        r.ended_at.clone().unwrap_or_default()
    );
    if let Some(e) = &r.error {
        println!("  error: {e}");
    }
    let metrics = db.metrics(run, None)?;
    let mut last: std::collections::BTreeMap<String, (i64, f64, usize)> = Default::default();
    for m in &metrics {
        let e = last.entry(m.key.clone()).or_insert((m.step, m.value, 0));
        if m.step >= e.0 {
            e.0 = m.step;
            e.1 = m.value;
        }
        e.2 += 1;
    }
    if !last.is_empty() {
        println!("  metrics (last value, points):");
        for (k, (s, v, n)) in last {
            println!("    {k:<24} {v:>12.6} at step {s} ({n} points)");
        }
    }
    let evals = db.evals_for_run(run)?;
    if !evals.is_empty() {
        println!("  evals:");
        for e in evals {
            println!(
                "    {:<8} {:>10.4}  step {} · {} samples · {} · {}",
                e.metric, e.value, e.step, e.sample_count, e.feature_net, e.settings
            );
        }
    }
    let artifacts = db.artifacts(run)?;
    if !artifacts.is_empty() {
        println!("  artifacts:");
        for a in artifacts {
            println!(
                "    {:<10} {} ({} bytes, sha256 {})",
                a.kind,
                db.resolve(&a.path).display(),
                a.bytes,
                &a.sha256[..12.min(a.sha256.len())]
            );
        }
    }
    println!("  params: {}", serde_json::to_string(&r.params)?);
    Ok(0)
}
